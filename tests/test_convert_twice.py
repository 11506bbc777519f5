"""Converting a converted model, and planning on one, over the whole zoo and a few timm / transformers models
(issue 14).

``convert(convert(m))`` must find the sites already there and add none on top of them: the same modules,
state_dict keys, change records, applications, rates and regulariser. ``plan()`` on a converted model must
list each site exactly once, as "existing", with the rate it has learned. Each site is given a distinctive
learned rate first, so that a rate read from the wrong place (the original rate, the default ``init_p``)
shows.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import pytest
import torch
import torch.nn as nn

import cd_convert
from cd_convert.collector import get_collector
from cd_convert.layers import ConcreteDropoutBase
from zoo import zoo

SITE_STATUSES = ("planned", "existing", "converted")


class Model(NamedTuple):
    """A model to convert: a fresh instance, its inputs, and the options to convert it with."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    kwargs: Dict[str, Any]


def _zoo_models() -> Dict[str, Model]:
    models = {}
    for name, factory, inputs, kwargs in zoo():
        kwargs = dict(kwargs)
        if kwargs.pop("use_example_inputs", False):
            kwargs["example_inputs"] = inputs()
        models[name] = Model(factory, inputs, kwargs)
    return models


def _image() -> Any:
    return (torch.randn(2, 3, 32, 32),)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hf(family: str) -> Model:
    def case() -> Any:
        from hf_zoo import HF_FAMILIES

        return HF_FAMILIES[family]()

    return Model(lambda: case().model, lambda: case().inputs, {})


MODELS: Dict[str, Model] = _zoo_models()
MODELS.update(
    {
        # timm: attention passing attn_drop.p to the fused kernel (two blocks: cheap), traced with timm's lists
        "timm_deit_tiny": Model(
            _timm("deit_tiny_patch16_224", img_size=32, depth=2, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1),
            _image,
            {},
        ),
        # transformers: rate read + interface attention (BERT), a config float (Llama), functional calls
        # sharing one rate (BART)
        "hf_bert": _hf("bert"),
        "hf_llama": _hf("llama"),
        "hf_bart": _hf("bart"),
    }
)
_NEEDS = {"timm_": "timm", "hf_": "transformers"}


def _params(names: Any, known: Optional[Dict[str, str]] = None) -> List[Any]:
    """pytest params of model names: skipped without their framework, strict xfail for known gaps."""
    known = known or {}
    params = []
    for name in names:
        marks = []
        for prefix, package in _NEEDS.items():
            if name.startswith(prefix) and importlib.util.find_spec(package) is None:
                marks.append(pytest.mark.skip(reason=f"needs {package}"))
        if name in known:
            marks.append(pytest.mark.xfail(reason=known[name], strict=True))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


class Converted(NamedTuple):
    once: nn.Module
    twice: nn.Module
    learned: Dict[str, float]
    inputs: Any
    kwargs: Dict[str, Any]


def _run(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _tensors(out: Any) -> List[torch.Tensor]:
    """Every tensor of an output (a tensor, a tuple, a transformers output object)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@functools.lru_cache(maxsize=None)
def _converted(name: str) -> Converted:
    """The model converted once (with distinctive learned rates), and that converted again.

    Cached: the tests below only read the two models (and a training forward, which changes no weight).
    """
    model = MODELS[name]
    torch.manual_seed(0)
    original = model.build()
    torch.manual_seed(1)
    inputs = model.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. LSTM inter-layer dropout, reported as unsupported
        once = cd_convert.convert(original, dataset_size=100, **model.kwargs)
    sites = sorted(n for n, m in once.named_modules() if isinstance(m, ConcreteDropoutBase))
    learned = {site: 0.33 + 0.01 * i for i, site in enumerate(sites)}  # none equals an original rate or init_p
    with torch.no_grad():
        for site, p in learned.items():
            once.get_submodule(site).p_logit.fill_(math.log(p / (1.0 - p)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice = cd_convert.convert(once, **model.kwargs)
    return Converted(once, twice, learned, inputs, model.kwargs)


def _applications(model: nn.Module) -> Counter:
    return Counter((a.site, a.consumer_weights, a.units) for a in get_collector(model).applications)


def _changes(model: nn.Module) -> Counter:
    return Counter((type(c).__name__, c.site_name) for c in get_collector(model).changes)


def _logits(model: nn.Module) -> List[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith("p_logit")]


def _rows(model: nn.Module) -> Dict[str, Any]:
    return {r.name: (r.kind, r.consumer) for r in cd_convert.report(model).rows}


@pytest.mark.parametrize("name", _params(MODELS))
def test_converting_twice_adds_no_site_and_keeps_the_rates(name):
    once, twice, learned, inputs, _ = _converted(name)
    assert learned, "every model here has sites"
    # No site on top of a site: the same modules at the same paths, the same parameters.
    assert [(n, type(m)) for n, m in twice.named_modules()] == [(n, type(m)) for n, m in once.named_modules()]
    assert list(twice.state_dict()) == list(once.state_dict())
    assert cd_convert.dropout_rates(twice) == cd_convert.dropout_rates(once)
    assert cd_convert.dropout_rates(twice) == pytest.approx(learned)
    # The same records: one change per site (unconvert and freeze undo each once), one term per application.
    assert _changes(twice) == _changes(once)
    assert _applications(twice) == _applications(once)
    once.eval(), twice.eval()
    with torch.no_grad():
        out_once, out_twice = _tensors(_run(once, inputs)), _tensors(_run(twice, inputs))
    assert len(out_once) == len(out_twice)
    assert all(torch.equal(a, b) for a, b in zip(out_once, out_twice))


@pytest.mark.parametrize("name", _params(MODELS))
def test_plan_on_a_converted_model_lists_each_site_once_with_its_learned_rate(name):
    once, _, learned, _, kwargs = _converted(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cd_convert.plan(once, **kwargs)
    names = [r.name for r in report.rows]
    assert len(names) == len(set(names)), [n for n, k in Counter(names).items() if k > 1]
    sites = [r for r in report.rows if r.status in SITE_STATUSES]
    assert {r.name: r.status for r in sites} == {site: "existing" for site in learned}
    assert {r.name: r.p for r in sites} == pytest.approx(learned)


@pytest.mark.parametrize("name", _params(MODELS))
def test_regularizer_of_the_twice_converted_model_equals_once(name):
    once, twice, _, inputs, _ = _converted(name)
    once.train(), twice.train()
    with torch.no_grad():  # a training forward gives consumer-less sites their width
        _run(once, inputs), _run(twice, inputs)
    reg_once, reg_twice = cd_convert.regularization(once), cd_convert.regularization(twice)
    # The same terms; only their order may differ (a site converted earlier is listed where it is found).
    torch.testing.assert_close(reg_twice, reg_once, rtol=1e-6, atol=0.0)
    grads_once = torch.autograd.grad(reg_once, _logits(once))
    grads_twice = torch.autograd.grad(reg_twice, _logits(twice))
    assert len(grads_once) == len(grads_twice)
    for a, b in zip(grads_once, grads_twice):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


# A second conversion may reach a routed call's or a fused attention's site as a plain module (module search
# or the dry run sees the site child); the report still describes it as the first conversion did.
@pytest.mark.parametrize("name", _params(MODELS))
def test_report_after_converting_twice_keeps_each_sites_kind_and_consumer(name):
    once, twice, _, _, _ = _converted(name)
    assert _rows(twice) == _rows(once)


def test_unconvert_after_converting_twice_restores_the_original():
    # One model per kind of change: module swap, routed call, input site, MHA runner, routed attention.
    for name in ("residual", "functional_head", "attention_targets", "attention", "fused_sdpa"):
        model = MODELS[name]
        original = model.build()
        twice = cd_convert.convert(cd_convert.convert(original, **model.kwargs), **model.kwargs)
        back = cd_convert.unconvert(copy.deepcopy(twice))
        assert [(n, type(m)) for n, m in back.named_modules()] == [(n, type(m)) for n, m in original.named_modules()]
        assert list(back.state_dict()) == list(original.state_dict()), name
