"""The site-kind protocol: dispatch order, and a new kind of site as one class plugged into the registry."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import cd_convert as cd
from cd_convert.consumers import find_consumer
from cd_convert.found import FoundSite
from cd_convert.layers import ConcreteDropout, ConcreteDropoutBase
from cd_convert.sites import registry
from cd_convert.sites.base import SiteKind, TraceContext
from cd_convert.sites.module import plan_module_site


class MaskNoise(nn.Module):
    """A hand-rolled dropout that is not an ``nn.Dropout``: no built-in kind knows it."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * torch.bernoulli(torch.full_like(x, 1 - self.rate)) / (1 - self.rate)


class MaskNoiseKind(SiteKind):
    """The whole of a new kind: detect the module in the trace, plan it like a dropout module."""

    name = "mask-noise"

    def is_site_module(self, module):
        return isinstance(module, MaskNoise)

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        module = ctx.modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, MaskNoise):
            return False
        consumer, note = find_consumer(node, ctx.modules, ctx.model)
        ctx.discovery.sites.append(
            FoundSite(
                kind=self.name,
                owner=node.target.rpartition(".")[0],
                module_name=node.target,
                site_type=ConcreteDropout,
                p=module.rate,
                found_by="fx",
                consumer=consumer,
                consumer_note=note,
            )
        )
        return True

    def claims(self, found, planner):
        return found.kind == self.name

    def plan(self, planner, found):
        plan_module_site(planner, found, kind=self.name)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), MaskNoise(0.3), nn.Linear(8, 2))


def test_unknown_noise_module_is_not_a_site():
    with pytest.warns(UserWarning, match="applies no dropout"):
        converted = cd.convert(_net(), dataset_size=10)
    assert cd.dropout_rates(converted) == {}


def test_a_new_kind_is_one_class_in_the_registry(monkeypatch):
    kind = MaskNoiseKind()
    monkeypatch.setattr(registry, "DETECTORS", (kind,) + registry.DETECTORS)
    monkeypatch.setattr(registry, "PLANNERS", (kind,) + registry.PLANNERS)
    original = _net()
    converted = cd.convert(original, dataset_size=10)
    row = next(r for r in cd.report(converted).rows if r.name == "2")
    assert (row.kind, row.status, row.consumer) == ("mask-noise", "converted", "3.weight")
    assert isinstance(converted[2], ConcreteDropoutBase)
    assert cd.dropout_rates(converted)["2"] == pytest.approx(0.3)
    x = torch.randn(5, 4)
    converted.train()
    converted(x).sum().backward()
    assert converted[2].p_logit.grad is not None
    frozen = cd.freeze(converted)
    assert type(frozen[2]) is nn.Dropout and frozen[2].p == pytest.approx(0.3)
    restored = cd.unconvert(converted)
    assert type(restored[2]) is MaskNoise


def test_planning_dispatch_is_first_match_in_order():
    """A dropout module whose rate is only read is a 'rate read' row, not a module site (order matters)."""
    names = [type(k).__name__ for k in registry.PLANNERS]
    assert names.index("RateAttributeKind") < names.index("ModuleKind")
    assert names.index("InterfaceAttentionKind") < names.index("FunctionalKind")
    detectors = [type(k).__name__ for k in registry.DETECTORS]
    assert detectors.index("FusedAttentionKind") < detectors.index("ModuleKind")


def test_freeze_writes_the_learned_rate_into_multihead_attention():
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Attend()
    converted = cd.convert(model, dataset_size=10)
    with torch.no_grad():
        converted.att.forward_attn_dropout.p_logit.fill_(-0.5)  # p = sigmoid(-0.5)
    frozen = cd.freeze(converted)
    assert type(frozen.att) is nn.MultiheadAttention and not hasattr(frozen.att, "forward_attn_dropout")
    assert frozen.att.dropout == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item())
    x = torch.randn(2, 5, 8)
    assert torch.equal(model.eval()(x), frozen.eval()(x))


@pytest.mark.parametrize("include_zero_rate", [True, False])
def test_multihead_attention_at_rate_zero_follows_the_rate_zero_policy(include_zero_rate):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 5, 8)
    converted = cd.convert(model, dataset_size=10, include_zero_rate=include_zero_rate)
    (row,) = [r for r in cd.report(converted).rows if r.name.startswith("mha")]
    if not include_zero_rate:
        assert row.status.startswith("skipped")
        return
    assert (row.kind, row.status, row.original_p) == ("fused", "converted", 0.0)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model.eval()(x))
    converted.train()(x).square().mean().backward()
    (logit,) = [p for n, p in converted.named_parameters() if n.endswith("p_logit")]
    assert logit.grad is not None and logit.grad != 0
