"""Dropout module classes from outside torch.nn: DeBERTa's StableDropout (recognised) and registered classes."""

import math

import pytest
import torch
import torch.nn as nn

import cd_convert as cd
from benchmarks.dropout_detector import fixed_rate_dropout_calls
from cd_convert import targets


class _XDropout(torch.autograd.Function):
    """DeBERTa's XDropout, reduced to its training path: inverted dropout through a boolean mask."""

    @staticmethod
    def forward(ctx, x, p):
        mask = (1 - torch.empty_like(x).bernoulli_(1 - p)).to(torch.bool)
        ctx.scale = 1.0 / (1 - p)
        ctx.save_for_backward(mask)
        return x.masked_fill(mask, 0) * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(mask, 0) * ctx.scale, None


class StableDropout(nn.Module):
    """The form of transformers' (and Microsoft's DeBERTa package's) StableDropout."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob
        self.count = 0
        self.context_stack = None

    def forward(self, x):
        if self.training and self.drop_prob > 0:
            return _XDropout.apply(x, self.get_context())
        return x

    def get_context(self):
        return self.drop_prob


class Net(nn.Module):
    def __init__(self, dropout=StableDropout) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), dropout(0.2), nn.Linear(16, 1)

    def forward(self, x):  # keyword input: the dropout detector calls model(**inputs)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _pair(dropout=StableDropout):
    torch.manual_seed(0)
    original = Net(dropout)
    model = Net(dropout)
    model.load_state_dict(original.state_dict())
    x = torch.randn(6, 4)
    return original, cd.convert(model, example_inputs=(x,), dataset_size=100), x


def test_debertas_stable_dropout_becomes_a_site_and_freezes_back_to_its_own_class():
    original, model, x = _pair()
    (row,) = [r for r in cd.report(model).rows if r.status == "converted"]
    assert (row.name, row.kind, row.original, row.consumer) == ("drop", "module", "StableDropout(p=0.2)", "fc2.weight")
    assert model.drop.p.item() == pytest.approx(0.2)
    model.train()
    assert fixed_rate_dropout_calls(model, {"x": x}) == []
    model(x).square().mean().backward()
    assert model.drop.p_logit.grad != 0
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
        model.drop.p_logit.fill_(math.log(0.3 / 0.7))
    frozen = cd.freeze(model)
    assert type(frozen.drop) is StableDropout and frozen.drop.drop_prob == pytest.approx(0.3)
    assert frozen.drop is not original.drop and original.drop.drop_prob == 0.2
    torch.manual_seed(1)
    frozen.train()
    dropped = (frozen.drop(torch.ones(2000)) == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.04)  # the frozen module drops at the learned rate


def test_unconvert_puts_back_the_original_module():
    _, model, _ = _pair()
    held = model.drop
    cd.unconvert(model)
    assert type(model.drop) is StableDropout and model.drop.drop_prob == 0.2 and model.drop is not held


class RateDropout(nn.Module):
    """A dropout class of a user's own, its rate in ``rate``."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training:
            return x
        return x * torch.empty_like(x).bernoulli_(1 - self.rate) / (1 - self.rate)


def test_a_registered_class_converts_and_can_be_targeted(monkeypatch):
    monkeypatch.setattr(targets, "_FOREIGN_DROPOUTS", {})
    with pytest.warns(UserWarning, match="cannot be converted"):  # unknown: its mask is reported, not converted
        unknown = cd.convert(Net(RateDropout), example_inputs=(torch.randn(6, 4),), dataset_size=100)
    assert {r.name: r.status for r in cd.report(unknown).rows}["drop"] == "unsupported"
    cd.register_dropout_module(RateDropout, rate_attribute="rate")
    _, model, x = _pair(RateDropout)
    assert isinstance(model.drop, cd.ConcreteDropout) and model.drop.p.item() == pytest.approx(0.2)
    targeted = cd.convert(Net(RateDropout), targets=[RateDropout], example_inputs=(x,), dataset_size=100)
    assert isinstance(targeted.drop, cd.ConcreteDropout)
    assert type(cd.freeze(model).drop) is RateDropout


def test_registration_refuses_what_it_cannot_convert(monkeypatch):
    monkeypatch.setattr(targets, "_FOREIGN_DROPOUTS", {})
    with pytest.raises(TypeError, match="nn.Module subclass"):
        cd.register_dropout_module(object)
    with pytest.raises(TypeError, match="concrete site class"):
        cd.register_dropout_module(RateDropout, "rate", site_type=nn.Dropout)
    with pytest.raises(TypeError, match="converted already"):
        cd.register_dropout_module(nn.Dropout2d)
    assert targets._FOREIGN_DROPOUTS == {}
