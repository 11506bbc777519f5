"""A targeted layer absorbs the dropout on its input: that dropout becomes the layer's learned site (one site
per tensor), instead of a second site stacked behind the fixed dropout (issue 14)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert as cd
from cd_convert.collector import get_collector
from cd_convert.layers import ConcreteDropout, ConcreteDropout2d

from zoo import FunctionalHead, SharedDropout


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


def _neg_entropy(p: float) -> float:
    return p * math.log(p) + (1 - p) * math.log(1 - p)


def _row(model: nn.Module, name: str):
    return next(r for r in cd.report(model).rows if r.name == name)


def _apps(model: nn.Module):
    return {a.site: a for a in get_collector(model).applications}


def test_mlp_dropout_becomes_the_linear_site():
    model = cd.convert(_mlp(), targets=[nn.Linear], dataset_size=50, length_scale=0.1)
    # Linear 0 has no dropout in front: it gets an input site; Linear 3 reads dropout 2: that is its site
    assert cd.dropout_rates(model) == pytest.approx({"2": 0.2, "0.concrete_dropout": 0.1}, rel=1e-5)
    assert type(model[2]) is ConcreteDropout and not hasattr(model[3], "concrete_dropout")
    assert _apps(model)["2"].consumer_weights == ("3.weight",) and _apps(model)["2"].units == 8
    assert _row(model, "3").status == "absorbed" and "absorbed: learned by site 2" in _row(model, "3").notes
    assert "site for targeted 3" in _row(model, "2").notes
    # regulariser by hand: l^2/(2N) ||W||^2/(1-p) + K/N (p log p + (1-p) log(1-p)) per site, W the reader's
    wr, dr = 0.01 / 100, 1 / 50
    expected = sum(
        wr * float(w.detach().double().pow(2).sum()) / (1 - p) + dr * k * _neg_entropy(p)
        for w, p, k in [(model[0].weight, 0.1, 4), (model[3].weight, 0.2, 8)]
    )
    assert cd.regularization(model).item() == pytest.approx(expected, rel=1e-5)
    # in training the Linear reads exactly what the site returns: the tensor is dropped once
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.update(site=o))
    model[3].register_forward_pre_hook(lambda m, i: seen.update(layer=i[0]))
    model.train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = F.cross_entropy(model(x), y) + cd.regularization(model)
    assert torch.equal(seen["layer"], seen["site"])
    loss.backward()
    assert model[2].p_logit.grad is not None and model[2].p_logit.grad.item() != 0.0
    opt.step()
    assert cd.dropout_rates(model)["2"] != pytest.approx(0.2, rel=1e-6)


class _Reshaped(nn.Module):
    """Dropout reaching the Linear through data-moving ops only: an nn.Flatten, or permute/contiguous/view."""

    def __init__(self, methods: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 4 * 4, 2)
        self.methods = methods

    def forward(self, x):
        h = self.drop(torch.relu(self.conv(x)))
        h = h.permute(0, 2, 3, 1).contiguous().view(-1, 48) if self.methods else self.flatten(h)
        return self.fc(h)


@pytest.mark.parametrize("methods", [False, True])
def test_absorbed_through_data_moving_ops(methods):
    model = cd.convert(_Reshaped(methods), targets=[nn.Linear], dataset_size=10)
    assert cd.dropout_rates(model) == pytest.approx({"drop": 0.3}, rel=1e-5)
    assert not hasattr(model.fc, "concrete_dropout")
    assert _apps(model)["drop"].consumer_weights == ("fc.weight",) and _apps(model)["drop"].units == 48


def test_functional_dropout_absorbed():
    torch.manual_seed(1)
    original = FunctionalHead()
    model = cd.convert(original, targets=[nn.Linear], dataset_size=10)
    # fc reads F.dropout(p=drop_rate) in forward_head: the routed call is its site, from rate 0.25
    assert cd.dropout_rates(model) == pytest.approx({"forward_head_dropout": 0.25, "body.0.concrete_dropout": 0.1})
    assert not hasattr(model.fc, "concrete_dropout")
    assert _apps(model)["forward_head_dropout"].consumer_weights == ("fc.weight",)
    assert _row(model, "fc").status == "absorbed"
    model.train()
    cd.regularization(model).add(model(torch.randn(5, 8)).sum()).backward()
    assert model.forward_head_dropout.p_logit.grad is not None
    with torch.no_grad():
        model.forward_head_dropout.p_logit.fill_(0.0)  # p = 0.5
    frozen = cd.freeze(model)
    assert frozen.drop_rate == pytest.approx(0.5) and type(frozen.fc) is nn.Linear


class _QKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        x = self.drop(x)
        attn = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.out(attn @ self.v(x))


def test_qkv_share_one_site():
    torch.manual_seed(2)
    model = cd.convert(_QKV(), targets=[nn.Linear], dataset_size=20, length_scale=0.1)
    assert set(cd.dropout_rates(model)) == {"drop", "out.concrete_dropout"}
    assert not any(hasattr(getattr(model, n), "concrete_dropout") for n in "qkv")
    assert _apps(model)["drop"].consumer_weights == ("q.weight", "k.weight", "v.weight")
    assert [_row(model, n).status for n in "qkv"] == ["absorbed"] * 3
    assert "site for targeted q, k, v" in _row(model, "drop").notes
    # one entropy term (K = 8) and the three weights over one (1 - p)
    wr, dr, p = 0.01 / 40, 1 / 20, 0.1
    squared = sum(float(getattr(model, n).weight.detach().double().pow(2).sum()) for n in "qkv")
    out_sq = float(model.out.weight.detach().double().pow(2).sum())
    expected = wr * squared / (1 - p) + dr * 8 * _neg_entropy(p) + wr * out_sq / 0.9 + dr * 8 * _neg_entropy(0.1)
    assert cd.regularization(model).item() == pytest.approx(expected, rel=1e-5)


class _Between(nn.Module):
    """A dropout that reaches the Linear only through an op that is not data-moving."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 2)
        self.op = op

    def forward(self, x):
        h = self.drop(x)
        h = {"relu": lambda: torch.relu(h), "add": lambda: x + h, "norm": lambda: self.norm(h)}[self.op]()
        return self.fc(h)


@pytest.mark.parametrize("op", ["relu", "add", "norm"])
def test_not_absorbed_through_other_ops(op):
    model = cd.convert(_Between(op), targets=[nn.Linear], dataset_size=10)
    assert set(cd.dropout_rates(model)) == {"fc.concrete_dropout"}
    assert type(model.drop) is nn.Dropout and model.drop.p == 0.2


def test_glob_matching_dropout_and_layer_gives_one_site():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model.add_module("classifier", nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 2)))
    converted = cd.convert(model, targets=["classifier.*"], dataset_size=10)
    assert cd.dropout_rates(converted) == pytest.approx({"classifier.0": 0.2}, rel=1e-5)
    assert not hasattr(converted.classifier[1], "concrete_dropout")
    assert _row(converted, "classifier.1").status == "absorbed"


def test_exclude_the_dropout_or_the_layer():
    # excluding the dropout keeps it fixed; the targeted layer then gets its own site (behind it), reported
    model = cd.convert(_mlp(), targets=[nn.Linear], exclude=["2"], dataset_size=10, init_p=0.05)
    assert cd.dropout_rates(model) == pytest.approx({"0.concrete_dropout": 0.05, "3.concrete_dropout": 0.05})
    assert type(model[2]) is nn.Dropout and model[2].p == 0.2
    assert "input comes from dropout 2, which stays fixed" in _row(model, "3.concrete_dropout").notes
    # excluding the layer: nothing absorbs the dropout, which targets does not name: it stays fixed
    model = cd.convert(_mlp(), targets=[nn.Linear], exclude=["3"], dataset_size=10)
    assert set(cd.dropout_rates(model)) == {"0.concrete_dropout"}
    assert type(model[2]) is nn.Dropout


@pytest.mark.parametrize("include_zero_rate", [True, False])
def test_rate_zero_dropout(include_zero_rate):
    model = _mlp()
    model[2].p = 0.0
    converted = cd.convert(model, targets=["3"], include_zero_rate=include_zero_rate, init_p=0.15, dataset_size=10)
    if include_zero_rate:  # absorbed, starting at init_p as any rate-0 dropout
        assert cd.dropout_rates(converted) == pytest.approx({"2": 0.15})
    else:  # the rate-0 dropout stays as it is: the layer gets its own site
        assert cd.dropout_rates(converted) == pytest.approx({"3.concrete_dropout": 0.15})
        assert type(converted[2]) is nn.Dropout


def test_dropout_called_twice_is_one_site_for_all_its_calls():
    # drop feeds fc1 (not targeted) and, called again, fc2 (targeted): one module, one site, both consumers
    model = cd.convert(SharedDropout(), targets=["fc2"], dataset_size=10)
    assert cd.dropout_rates(model) == pytest.approx({"drop": 0.3}, rel=1e-5)
    weights = [a.consumer_weights for a in get_collector(model).applications]
    assert weights == [("fc1.weight",), ("fc2.weight",)]


def test_freeze_unconvert_round_trip_and_second_convert():
    torch.manual_seed(3)
    original = _mlp().eval()
    keys = list(original.state_dict())
    x = torch.randn(5, 4)
    model = cd.convert(original, targets=["3"], dataset_size=10)
    assert list(model.state_dict()) == keys[:2] + ["2.p_logit"] + keys[2:]  # the layer keeps its keys
    assert torch.equal(model(x), original(x))
    twice = cd.convert(model, targets=["3"])  # the absorbed site is kept, nothing is added
    assert list(twice.state_dict()) == list(model.state_dict()) and _row(twice, "3").status == "absorbed"
    with torch.no_grad():
        model[2].p_logit.fill_(-1.0)
    frozen = cd.freeze(model)
    assert [type(m) for m in frozen] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert frozen[2].p == pytest.approx(1 / (1 + math.e))  # sigmoid(-1) at the dropout's own path
    assert list(frozen.state_dict()) == keys
    assert torch.equal(frozen(x), original(x))
    back = cd.unconvert(copy.deepcopy(model))
    assert [type(m) for m in back] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear] and back[2].p == 0.2
    assert list(back.state_dict()) == keys


def test_layer_with_an_earlier_input_site_keeps_it():
    # converted before with the dropout excluded: a second convert keeps that site and the dropout fixed
    first = cd.convert(_mlp(), targets=["3"], exclude=["2"], dataset_size=10)
    second = cd.convert(first, targets=["3"])
    assert set(cd.dropout_rates(second)) == {"3.concrete_dropout"}
    assert type(second[2]) is nn.Dropout


def test_conv2d_absorbs_dropout2d_channelwise():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.25), nn.Conv2d(6, 4, 1))
    converted = cd.convert(model, targets=["3"], dataset_size=10)
    site = converted[2]
    assert type(site) is ConcreteDropout2d and site.temperature == pytest.approx(2 / 3)
    assert cd.dropout_rates(converted) == pytest.approx({"2": 0.25})
    assert _apps(converted)["2"].consumer_weights == ("3.weight",) and _apps(converted)["2"].units == 6
    # training: one mask value per (sample, channel), constant over space
    seen = {}
    site.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    converted.train()(torch.randn(2, 3, 5, 5))
    nonzero = seen["i"] != 0
    ratio = torch.where(nonzero, seen["o"] / torch.where(nonzero, seen["i"], 1.0), float("nan"))
    for b in range(2):
        for c in range(6):
            values = ratio[b, c][nonzero[b, c]]
            assert torch.allclose(values, values[0].expand_as(values), rtol=1e-5)
