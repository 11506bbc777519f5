"""Rates a model's code reads from a configuration object at each call (``p=self.config.dropout``).

ProphetNet's encoder calls ``F.dropout(hidden_states, p=self.config.dropout, ...)``, with a config object that
every module of the encoder shares. The dry run traces such a rate to the config's attribute; each call gets
its own site, and ``freeze`` gives each owner a private copy of the config holding its learned rate. The
independent fact checked is what the frozen model's code passes to ``F.dropout`` at run time.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cd_convert


class _Block(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(F.dropout(x, p=self.config.dropout, training=self.training))


class SharedConfigNet(nn.Module):
    """Two blocks reading ``self.config.dropout`` from one config object the model also holds."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(dropout=0.1, attention_dropout=0.0, hidden_size=8)
        self.first, self.second = _Block(self.config), _Block(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class _DropoutRates(TorchFunctionMode):
    """The rate of every ``F.dropout`` call, with the module whose forward made it."""

    def __init__(self, names: Dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls: List[Tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            frame = sys._getframe(1)
            while frame is not None and not isinstance(frame.f_locals.get("self"), nn.Module):
                frame = frame.f_back
            owner = self.names.get(id(frame.f_locals["self"]), "?") if frame is not None else "?"
            self.calls.append((owner, float(kwargs.get("p", args[1] if len(args) > 1 else 0.5))))
        return func(*args, **kwargs)


def _rates_in_training(model: nn.Module, *inputs) -> List[Tuple[str, float]]:
    with _DropoutRates({id(m): n for n, m in model.named_modules()}) as mode:
        model.train()(*inputs)
    return mode.calls


def _set_rates(model: nn.Module, rates: Dict[str, float]) -> None:
    with torch.no_grad():
        for name, p in rates.items():
            model.get_submodule(name).p_logit.fill_(math.log(p / (1 - p)))


def test_each_reader_of_a_shared_config_rate_gets_its_own_site_and_rate():
    x = torch.randn(4, 8)
    model = SharedConfigNet()
    converted = cd_convert.convert(model, dataset_size=100, example_inputs=(x,))
    # The dry run put the config back exactly (nudged rates, and the 0 it tagged, are plain floats again).
    assert model.config.dropout == 0.1 and type(model.config.attention_dropout) is float
    sites = {r.name: r for r in cd_convert.report(converted).sites}
    assert set(sites) == {"first.forward_dropout", "second.forward_dropout"}
    # The note names the path the rate is read from (not the config object) and where freeze writes it.
    assert all(r.notes[0].startswith("rate read from config.dropout; ") for r in sites.values())
    assert all(r.notes[0].endswith("as self.config.dropout") for r in sites.values())

    _set_rates(converted, {"first.forward_dropout": 0.2, "second.forward_dropout": 0.35})
    frozen = cd_convert.freeze(converted)
    calls = _rates_in_training(frozen, x)
    assert [(owner, round(p, 5)) for owner, p in calls] == [("first", 0.2), ("second", 0.35)]
    # Each block holds its own copy; the model's config keeps the original rate.
    assert frozen.config.dropout == 0.1
    assert frozen.first.config is not frozen.second.config
    assert frozen.first.config.hidden_size == 8  # the copy keeps every other field


def test_prophetnet_freeze_writes_each_learned_rate():
    pytest.importorskip("transformers")
    from benchmarks import transformers_families as families

    family = next(f for f in families.FAMILIES if f.name == "prophetnet")
    model, _ = families.build(family)
    inputs = families.make_inputs(family.inputs, model.config)
    converted = cd_convert.convert(model, dataset_size=100)
    site = "prophetnet.encoder.forward_dropout"
    assert site in {r.name for r in cd_convert.report(converted).sites}
    _set_rates(converted, {site: 0.27})
    frozen = cd_convert.freeze(converted)
    with _DropoutRates({id(m): n for n, m in frozen.named_modules()}) as mode:
        frozen.train()(**inputs)
    assert ("prophetnet.encoder", 0.27) in [(owner, round(p, 5)) for owner, p in mode.calls]
    # Only the encoder's own copy changed: the config the rest of the model holds keeps its rate.
    others = [m.config for n, m in frozen.named_modules() if n != "prophetnet.encoder" and hasattr(m, "config")]
    assert others and all(c.dropout == model.config.dropout for c in others)


class _TwoMethods(nn.Module):
    """One module whose two methods read the same rate: ``self.drop_rate``, or ``self.config.dropout``."""

    def __init__(self, through_config: bool) -> None:
        super().__init__()
        self.through_config = through_config
        self.drop_rate = 0.2
        self.config = SimpleNamespace(dropout=0.2)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def rate(self) -> float:
        return self.config.dropout if self.through_config else self.drop_rate

    def first(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.a(x), self.rate(), self.training)

    def second(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.rate(), self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.second(self.first(x)))


@pytest.mark.parametrize("through_config", [False, True], ids=["attribute", "config"])
def test_freeze_refuses_two_learned_rates_that_one_attribute_would_have_to_hold(through_config):
    """Calls in two methods reading one attribute get a site each; a plain model reads one number there, so
    freeze must not let the last write win silently."""
    model = cd_convert.convert(_TwoMethods(through_config), dataset_size=100)
    sites = [m for m in model.modules() if isinstance(m, cd_convert.ConcreteDropoutBase)]
    assert len(sites) == 2
    # Equal rates (here: as converted) are written back.
    assert cd_convert.freeze(model).rate() == pytest.approx(0.2)
    with torch.no_grad():
        sites[0].p_logit.fill_(-1.0)  # p = 0.269
        sites[1].p_logit.fill_(-3.0)  # p = 0.047
    before = dict(cd_convert.dropout_rates(model))
    with pytest.raises(cd_convert.FreezeError, match=r"first_dropout.*p=0\.2689.*second_dropout.*p=0\.04743"):
        cd_convert.freeze(model, inplace=True)
    assert cd_convert.dropout_rates(model) == before  # nothing changed
    with pytest.warns(UserWarning, match="keeps its original rate"):
        frozen = cd_convert.freeze(model, strict=False)
    assert frozen.rate() == pytest.approx(0.2)  # both calls keep the rate the code had
    assert not any(isinstance(m, cd_convert.ConcreteDropoutBase) for m in frozen.modules())
