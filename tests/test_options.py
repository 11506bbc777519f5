"""ConvertOptions: defaults, validation before any change, one object for convert/plan/create_model, keyword
errors; the one rates function; warnings that point at the user's line."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert as cd
from cd_convert.collector import get_collector
from cd_convert.history import site_rates
from cd_convert.layers import ConcreteDropout

convert_module = importlib.import_module("cd_convert.convert")  # the attribute cd_convert.convert is the function


def _mlp() -> nn.Sequential:
    """Dropout at rate 0 (``2``), 0.2 (``5``) and 0.4 (``8``), each read by the next Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.4),
        nn.Linear(8, 2),
    )  # fmt: skip


def _snapshot(model: nn.Module):
    """Everything a conversion changes: module types by name, state_dict, the collector attribute."""
    types = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return types, state, get_collector(model)


def _same(model: nn.Module, snapshot) -> bool:
    types, state, collector = snapshot
    now = model.state_dict()
    return (
        [(name, type(m)) for name, m in model.named_modules()] == types
        and now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
        and get_collector(model) is collector
    )


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_documented_ones():
    expected = dict(
        exclude=None, dataset_size=None, length_scale=1e-2, loss="nll", tau=None, weight_regularizer=None,
        dropout_regularizer=None, init_p=0.1, temperature=None, channel_temperature=None, include_zero_rate=True,
        fused_attention=True, leaf_modules=(), autowrap_functions=(), example_inputs=None,
    )  # fmt: skip
    assert dataclasses.asdict(cd.ConvertOptions()) == expected
    # convert() spells the same options out as keywords (for help() and IDEs): same names, same defaults.
    parameters = inspect.signature(cd.convert).parameters
    keywords = {n: p.default for n, p in parameters.items() if n not in ("model", "targets", "inplace", "options")}
    assert keywords == expected
    assert cd.ConvertOptions().regularizer_scale() is None  # no silent default for N


# ---------------------------------------------------------------------------------------------- validation

BAD = [
    (dict(init_p=1.5), ValueError, "init_p"),
    (dict(init_p=(0.3, 0.1)), ValueError, "low <= high"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(channel_temperature="hot"), TypeError, "temperature must be a positive float"),
    (dict(dataset_size=-3), ValueError, "dataset_size must be a positive"),
    (dict(dataset_size=100, loss="l1"), ValueError, "loss must be one of"),
    (dict(dataset_size=100, tau=2.0), ValueError, "tau= is only used with loss='mse'"),
    (dict(dataset_size=100, weight_regularizer=1e-4, dropout_regularizer=1e-2), ValueError, "not both"),
    (dict(exclude=[nn.ReLU]), cd.TargetError, "exclude entry ReLU"),
    (dict(leaf_modules=[nn.Linear(2, 2)]), TypeError, "leaf_modules must be a list or tuple of module types"),
    (dict(autowrap_functions=[3]), TypeError, "autowrap_functions must be a list or tuple of functions"),
]


@pytest.mark.parametrize("bad, error, message", BAD, ids=[next(iter(b)) + str(i) for i, (b, _, _) in enumerate(BAD)])
def test_bad_option_refused_by_the_object_and_before_any_change(monkeypatch, bad, error, message):
    with pytest.raises(error, match=message):
        cd.ConvertOptions(**bad)
    with pytest.raises(error, match=message):
        dataclasses.replace(cd.ConvertOptions(), **bad)  # a changed copy is checked again

    def no_discovery(*args, **kwargs):
        raise AssertionError("discovery ran before the options were checked")

    monkeypatch.setattr(convert_module, "discover", no_discovery)
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        cd.convert(model, inplace=True, **bad)
    with pytest.raises(error, match=message):
        cd.plan(model, **bad)
    assert _same(model, before)


def test_options_are_frozen():
    options = cd.ConvertOptions(dataset_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.init_p = 0.5  # type: ignore[misc]


# ------------------------------------------------------------------ one object for convert, plan, create_model

# Rate-0 dropout skipped, site "5" excluded, element-wise temperature 0.3, heteroscedastic scale with N = 50.
OPTIONS = cd.ConvertOptions(dataset_size=50, loss="heteroscedastic", include_zero_rate=False, exclude=["5"],
                            temperature=0.3)  # fmt: skip


def test_convert_and_plan_honour_one_options_object():
    converted = cd.convert(_mlp(), options=OPTIONS)
    assert cd.dropout_rates(converted) == pytest.approx({"8": 0.4})
    assert type(converted[2]) is nn.Dropout and type(converted[5]) is nn.Dropout
    assert converted[8].temperature == 0.3
    scale = get_collector(converted).scale
    # heteroscedastic preset: wr = l^2 / N, dr = 2 / N
    assert (scale.weight_regularizer, scale.dropout_regularizer) == pytest.approx((1e-4 / 50, 2 / 50))

    report = cd.plan(_mlp(), options=OPTIONS)
    status = {row.name: row.status for row in report.rows}
    assert status == {"2": "skipped (p=0)", "5": "not selected", "8": "planned"}
    assert report.regularizer == "heteroscedastic preset: N=50, l=0.01"
    # keywords and the object are the same conversion
    by_keywords = cd.convert(_mlp(), **dataclasses.asdict(OPTIONS))
    assert cd.dropout_rates(by_keywords) == cd.dropout_rates(converted)
    assert get_collector(by_keywords).scale == scale


def test_create_model_honours_options_and_checks_them_before_building(monkeypatch):
    pytest.importorskip("timm")
    import timm

    import cd_convert.timm as cdt

    model = cdt.create_model("test_resnet", pretrained=False, drop_rate=0.2, num_classes=3, options=OPTIONS)
    (site,) = [m for m in model.modules() if isinstance(m, cd.ConcreteDropoutBase)]
    assert site.temperature == 0.3
    assert get_collector(model).scale.dropout_regularizer == pytest.approx(2 / 50)
    assert type(model).__name__ == "ResNet"

    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init_p"):
        cdt.create_model("test_resnet", init_p=2.0)
    with pytest.raises(TypeError, match=r"create_model\(\) got options= and the option keywords \['dataset_size'\]"):
        cdt.create_model("test_resnet", options=OPTIONS, dataset_size=3)
    assert built == []


# ------------------------------------------------------------------------------------------ keyword errors


def test_unknown_keyword_is_a_type_error_naming_it():
    model = _mlp()
    with pytest.raises(TypeError, match="dataset_sise"):
        cd.convert(model, dataset_sise=10)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"plan\(\) got unexpected keyword arguments \['dataset_sise'\]"):
        cd.plan(model, dataset_sise=10)


def test_options_and_option_keywords_together_refused():
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"convert\(\) got options= and the option keywords \['init_p'\]"):
        cd.convert(model, options=OPTIONS, init_p=0.3, inplace=True)
    with pytest.raises(TypeError, match=r"plan\(\) got options= and the option keywords \['dataset_size'\]"):
        cd.plan(model, options=OPTIONS, dataset_size=10)
    with pytest.raises(TypeError, match="options must be a cd_convert.ConvertOptions, got dict"):
        cd.convert(model, options={"dataset_size": 10})  # type: ignore[arg-type]
    assert _same(model, before)
    # A keyword left at its default cannot be told from one not passed: it does not conflict.
    converted = cd.convert(model, options=OPTIONS, init_p=0.1)
    assert cd.dropout_rates(converted) == pytest.approx({"8": 0.4})


# ------------------------------------------------------------------------------------- the rates function


def test_dropout_rates_is_the_one_rates_function():
    assert site_rates is cd.dropout_rates
    converted = cd.convert(_mlp(), dataset_size=10)
    # Collector sites first, in conversion order; then a site added after conversion (never registered).
    converted.add_module("late", ConcreteDropout(0.35))
    rates = cd.dropout_rates(converted)
    assert list(rates) == ["2", "5", "8", "late"]
    assert rates == pytest.approx({"2": 0.1, "5": 0.2, "8": 0.4, "late": 0.35})  # rate 0 starts at init_p
    # A site reached first under another name than the collector's is listed once, under the collector's name.
    wrapper = nn.ModuleDict({"shortcut": converted[5], "net": converted})
    assert list(cd.dropout_rates(wrapper)) == ["net.2", "net.5", "net.8", "net.late"]
    assert cd.dropout_rates(ConcreteDropout(0.25)) == pytest.approx({"": 0.25})  # a bare site


def test_not_converted_refusals_name_the_class_and_what_to_do():
    expected = "Sequential has not been converted; call cd_convert.convert(model) first."
    for call in (lambda m: cd.report(m), lambda m: cd.set_regularizer(m, dataset_size=10)):
        with pytest.raises(cd.ConversionError) as err:
            call(_mlp())
        assert str(err.value) == expected
    # set_regularizer reaches converted models inside a wrapper; report wants the converted model itself.
    wrapper = nn.Sequential(cd.convert(_mlp()))
    cd.set_regularizer(wrapper, dataset_size=10)
    assert get_collector(wrapper[0]).scale.dropout_regularizer == pytest.approx(1 / 10)
    with pytest.raises(cd.ConversionError, match="Sequential has not been converted"):
        cd.report(wrapper)


# ----------------------------------------------------------------------------------- warning stack levels


def _warnings_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, caught


def test_conversion_warnings_point_at_the_callers_line():
    no_dropout = nn.Sequential(nn.Linear(2, 2))
    _, caught = _warnings_of(lambda: cd.convert(no_dropout))
    assert [(w.filename, "applies no dropout" in str(w.message)) for w in caught] == [(__file__, True)]

    _, caught = _warnings_of(lambda: cd.plan(_mlp(), targets=[nn.Linear, "nothing.*"]))
    assert [(w.filename, "matched no dropout site" in str(w.message)) for w in caught] == [(__file__, True)]


def test_warnings_through_create_model_point_at_the_callers_line():
    pytest.importorskip("timm")
    import cd_convert.timm as cdt

    # One more library frame than convert(): a fixed stacklevel would name cd_convert/timm.py.
    _, caught = _warnings_of(lambda: cdt.create_model("test_resnet", pretrained=False, num_classes=3))
    assert [(w.filename, "applies no dropout" in str(w.message)) for w in caught] == [(__file__, True)]
    _, caught = _warnings_of(
        lambda: cdt.create_model("test_resnet", pretrained=False, drop_rate=0.2, targets=[nn.Linear, "nothing.*"])
    )
    assert [(w.filename, "matched no dropout site" in str(w.message)) for w in caught] == [(__file__, True)]


class _LateBranch(nn.Module):
    """A functional dropout that the conversion sees, and one in a branch it does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.fc(x), 0.2, self.training)
        if self.late:
            x = F.dropout(x, 0.3, self.training)
        return x


def test_unseen_dropout_call_warning_points_at_the_models_line():
    model = cd.convert(_LateBranch(), dataset_size=10).train()
    model.late = True
    _, caught = _warnings_of(lambda: model(torch.randn(2, 4)))
    late_line = inspect.getsourcelines(_LateBranch.forward)[1] + 3  # the F.dropout under ``if self.late``
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, late_line)]
    assert "was not seen when the model was converted" in str(caught[0].message)
