"""Basic tests for cd_convert.convert / unconvert / freeze / set_regularizer: what a user of torch.nn
expects of a converted model (eval equality, state_dict keys, copies, devices, refusals)."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert as cd
from cd_convert.collector import COLLECTOR_ATTR, get_collector
from cd_convert.layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, p1=0.2, p2=0.3):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.drop1 = nn.Dropout(p1)
        self.fc2 = nn.Linear(16, 16)
        self.drop2 = nn.Dropout(p2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.drop1(torch.relu(self.fc1(x)))
        x = self.drop2(torch.relu(self.fc2(x)))
        return self.head(x)

    def extra_method(self):
        return "kept"


class CNN2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop1 = nn.Dropout2d(0.25)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop2 = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop1(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc(self.drop2(x))


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.drop = nn.Dropout1d(0.2)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.drop(torch.relu(self.conv1(x))))


class CNN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.drop = nn.Dropout3d(0.15)
        self.conv2 = nn.Conv3d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.drop(torch.relu(self.conv1(x))))


MODELS = [
    (MLP, (5, 6), {"drop1": ConcreteDropout, "drop2": ConcreteDropout}),
    (CNN2d, (2, 3, 8, 8), {"drop1": ConcreteDropout2d, "drop2": ConcreteDropout}),
    (CNN1d, (2, 3, 10), {"drop": ConcreteDropout1d}),
    (CNN3d, (2, 2, 4, 4, 4), {"drop": ConcreteDropout3d}),
]


def _sd_equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- eval equality, types


@pytest.mark.parametrize("cls,shape,expected", MODELS)
def test_eval_output_equal_to_original(cls, shape, expected):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    ref = model(x)
    converted = cd.convert(model, dataset_size=100)
    assert not converted.training
    assert torch.equal(converted(x), ref)
    for name, site_type in expected.items():
        assert type(converted.get_submodule(name)) is site_type


@pytest.mark.parametrize("cls,shape,expected", MODELS)
def test_learned_rate_starts_at_original_p(cls, shape, expected):
    model = cls()
    converted = cd.convert(model, dataset_size=100)
    rates = cd.dropout_rates(converted)
    for name in expected:
        assert rates[name] == pytest.approx(model.get_submodule(name).p, rel=1e-5)


def test_zero_rate_starts_at_init_p():
    model = MLP(p1=0.0, p2=0.3)
    converted = cd.convert(model, dataset_size=100, init_p=0.05)
    rates = cd.dropout_rates(converted)
    assert rates["drop1"] == pytest.approx(0.05, rel=1e-5)
    assert rates["drop2"] == pytest.approx(0.3, rel=1e-5)
    default = cd.dropout_rates(cd.convert(model, dataset_size=100))
    assert default["drop1"] == pytest.approx(0.1, rel=1e-5)


class RateZeroCalls(nn.Module):
    """Two functional calls at rate 0: one reads an attribute (a slot the model exposes, as timm's drop_rate=0.),
    one passes a literal (CTRL's dropout=0.0: this code never drops)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.head_drop = 0.0

    def forward(self, x):
        x = F.dropout(torch.relu(self.fc1(x)), self.head_drop, self.training)
        x = F.dropout(torch.relu(self.fc2(x)), 0.0, self.training)
        return self.fc3(x)


def test_a_rate_0_read_from_an_attribute_is_learned_and_a_literal_0_is_left():
    model = cd.convert(RateZeroCalls(), example_inputs=(torch.randn(3, 4),), dataset_size=100)
    rows = [(r.status, r.original_p) for r in cd.report(model).rows]
    assert sorted(rows) == [("converted", 0.0), ("skipped (p=0)", 0.0)]
    skipped = next(r for r in cd.report(model).rows if r.status == "skipped (p=0)")
    assert "written in the code" in skipped.notes[0]
    frozen = cd.freeze(model)  # strict: the learned site has its attribute to write to
    assert frozen.head_drop == pytest.approx(0.1, rel=1e-5)


def test_targets_linear_elementwise():
    model = CNN2d()
    # fc reads drop2's output: it absorbs drop2 (element-wise, from its own rate) instead of adding a site
    converted = cd.convert(model, targets=[nn.Linear], dataset_size=100, init_p=0.2)
    assert type(converted.drop2) is ConcreteDropout and not converted.drop2.channelwise
    assert cd.dropout_rates(converted) == pytest.approx({"drop2": 0.5}, rel=1e-5)
    assert not hasattr(converted.fc, "concrete_dropout")
    assert type(converted.drop1) is nn.Dropout2d  # drop1 feeds a Conv2d, which is not targeted
    # with drop2 excluded (kept fixed), fc gets its own element-wise input site at init_p
    converted = cd.convert(model, targets=[nn.Linear], exclude=["drop2"], dataset_size=100, init_p=0.2)
    site = converted.fc.concrete_dropout
    assert type(site) is ConcreteDropout and not site.channelwise
    assert cd.dropout_rates(converted) == pytest.approx({"fc.concrete_dropout": 0.2}, rel=1e-5)
    # the original dropout modules are left alone
    assert type(converted.drop1) is nn.Dropout2d and type(converted.drop2) is nn.Dropout


def test_targets_conv2d_channelwise():
    torch.manual_seed(1)
    model = CNN2d().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    converted = cd.convert(model, targets=[nn.Conv2d], dataset_size=100)
    # conv1 gets an input site; conv2 reads drop1's output, so it absorbs drop1 (channel-wise) instead
    assert set(cd.dropout_rates(converted)) == {"conv1.concrete_dropout", "drop1"}
    assert type(converted.conv1.concrete_dropout) is ConcreteDropout2d
    assert converted.conv1.concrete_dropout.temperature == pytest.approx(2 / 3)
    assert type(converted.drop1) is ConcreteDropout2d and converted.drop1.temperature == pytest.approx(2 / 3)
    assert torch.equal(converted(x), ref)  # eval: identity in front of the convs
    # K = in_channels for the channel-wise input site
    apps = {a.site: a for a in get_collector(converted).applications}
    assert apps["conv1.concrete_dropout"].units == 3
    assert apps["drop1"].consumer_weights == ("conv2.weight",) and apps["drop1"].units == 8
    # in training the mask on conv2's input is constant over space: check through a forward hook
    converted.train()
    seen = {}
    converted.drop1.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    converted(x)
    ratio = seen["o"] / torch.where(seen["i"] == 0, torch.ones_like(seen["i"]), seen["i"])
    nz = seen["i"] != 0
    for b in range(2):
        for c in range(8):
            vals = ratio[b, c][nz[b, c]]
            if vals.numel():
                assert torch.allclose(vals, vals[0].expand_as(vals), rtol=1e-5)


class MyLinear(nn.Linear):
    """A user subclass of nn.Linear (module-level, so picklable)."""


def test_subclass_of_linear_matched():
    model = nn.Sequential(MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    converted = cd.convert(model, targets=[nn.Linear], dataset_size=10)
    assert type(converted[0]) is MyLinear
    assert isinstance(converted[0].concrete_dropout, ConcreteDropout)
    assert set(cd.dropout_rates(converted)) == {"0.concrete_dropout", "2.concrete_dropout"}


def test_class_methods_and_state_dict_keys_kept():
    model = MLP()
    converted = cd.convert(model, dataset_size=100)
    assert type(converted) is type(model)
    assert converted.extra_method() == "kept"
    orig_keys = set(model.state_dict())
    new_keys = set(converted.state_dict())
    assert orig_keys <= new_keys
    added = new_keys - orig_keys
    assert added == {"drop1.p_logit", "drop2.p_logit"}
    assert all(k.endswith(".p_logit") for k in added)
    converted_t = cd.convert(model, targets=[nn.Linear], dataset_size=100)
    added_t = set(converted_t.state_dict()) - orig_keys
    # fc2 and head absorb drop1 and drop2 (their inputs); fc1's input has no dropout, so it gets a site
    assert added_t == {"fc1.concrete_dropout.p_logit", "drop1.p_logit", "drop2.p_logit"}


def test_inplace_false_leaves_original_untouched():
    model = MLP()
    sd = copy.deepcopy(model.state_dict())
    types = [(n, type(m)) for n, m in model.named_modules()]
    converted = cd.convert(model, dataset_size=100)
    assert converted is not model
    assert _sd_equal(model.state_dict(), sd)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert get_collector(model) is None
    # the converted copy does not share parameters with the original
    assert converted.fc1.weight is not model.fc1.weight
    cd.convert(model, targets=[nn.Linear], dataset_size=100)
    assert [(n, type(m)) for n, m in model.named_modules()] == types


def test_inplace_true_returns_same_object():
    model = MLP()
    converted = cd.convert(model, dataset_size=100, inplace=True)
    assert converted is model
    assert type(model.drop1) is ConcreteDropout


def test_dtype_device_preserved():
    model = MLP().double()
    converted = cd.convert(model, dataset_size=100)
    assert converted.drop1.p_logit.dtype == torch.float64
    assert converted.drop1.p_logit.device == model.fc1.weight.device
    x = torch.randn(3, 6, dtype=torch.float64)
    assert converted(x).dtype == torch.float64
    conv_t = cd.convert(model, targets=[nn.Linear], dataset_size=100)
    assert conv_t.fc1.concrete_dropout.p_logit.dtype == torch.float64


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_preserved(training):
    model = MLP().train(training)
    converted = cd.convert(model, dataset_size=100)
    assert converted.training == training
    assert all(m.training == training for m in converted.modules())
    conv_t = cd.convert(model, targets=[nn.Linear], dataset_size=100)
    assert all(m.training == training for m in conv_t.modules())


def test_mixed_mode_site_follows_replaced_module():
    model = MLP().train()
    model.drop2.eval()
    converted = cd.convert(model, dataset_size=100)
    assert converted.drop1.training and not converted.drop2.training


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_every_added_parameter_gets_gradient_from_data_loss(targets):
    torch.manual_seed(2)
    model = cd.convert(MLP(), targets=targets, dataset_size=100)
    model.train()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    added = [(n, p) for n, p in model.named_parameters() if n.endswith("p_logit")]
    assert added
    for name, p in added:
        assert p.grad is not None, name
        assert p.grad.item() != 0.0, name


def test_state_dict_round_trip_strict():
    torch.manual_seed(3)
    a = cd.convert(MLP(), dataset_size=100)
    with torch.no_grad():
        a.drop1.p_logit.fill_(-1.234)
    b = cd.convert(MLP(), dataset_size=100)
    b.load_state_dict(a.state_dict(), strict=True)
    assert _sd_equal(a.state_dict(), b.state_dict())
    assert cd.dropout_rates(b) == cd.dropout_rates(a)
    at = cd.convert(MLP(), targets=[nn.Linear], dataset_size=100)
    bt = cd.convert(MLP(), targets=[nn.Linear], dataset_size=100)
    bt.load_state_dict(at.state_dict(), strict=True)
    assert _sd_equal(at.state_dict(), bt.state_dict())


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_original_checkpoint_loads_with_missing_p_logits(targets):
    original = MLP()
    converted = cd.convert(MLP(), targets=targets, dataset_size=100)
    result = converted.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    expected_missing = {k for k in converted.state_dict() if k.endswith("p_logit")}
    assert set(result.missing_keys) == expected_missing and expected_missing
    assert torch.equal(converted.fc1.weight, original.fc1.weight)


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_deepcopy_and_torch_save_load(targets, tmp_path):
    torch.manual_seed(4)
    model = cd.convert(MLP(), targets=targets, dataset_size=100)
    reg = cd.regularization(model)
    dup = copy.deepcopy(model)
    assert get_collector(dup) is not None and get_collector(dup) is not get_collector(model)
    assert torch.equal(cd.regularization(dup), reg)
    with torch.no_grad():
        dup.fc2.weight.mul_(3)
    assert not torch.equal(cd.regularization(dup), reg)  # the copy reads its own parameters
    assert torch.equal(cd.regularization(model), reg)
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is MLP
    assert torch.equal(cd.regularization(loaded), reg)
    assert cd.dropout_rates(loaded) == cd.dropout_rates(model)
    x = torch.randn(4, 6)
    loaded.eval(), model.eval()
    assert torch.equal(loaded(x), model(x))
    # training still works on the loaded copy
    loaded.train()
    (loaded(x).sum() + cd.regularization(loaded)).backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if n.endswith("p_logit"))


@pytest.mark.parametrize("targets", [None, [nn.Linear], [nn.Conv2d]])
def test_unconvert_restores_keys_and_types(targets):
    model = CNN2d()
    types = [(n, type(m)) for n, m in model.named_modules()]
    sd = copy.deepcopy(model.state_dict())
    converted = cd.convert(model, targets=targets, dataset_size=100)
    back = cd.unconvert(converted)
    assert back is converted
    assert [(n, type(m)) for n, m in back.named_modules()] == types
    assert list(back.state_dict()) == list(sd)
    assert _sd_equal(back.state_dict(), sd)
    assert COLLECTOR_ATTR not in back.__dict__
    assert back.drop1.p == 0.25
    x = torch.randn(2, 3, 8, 8)
    model.eval(), back.eval()
    assert torch.equal(back(x), model(x))


def test_unconvert_unconverted_refused():
    with pytest.raises(cd.ConversionError, match="has not been converted"):
        cd.unconvert(MLP())


def _only_torch_nn(model):
    for m in model.modules():
        assert type(m).__module__.startswith("torch.nn") or isinstance(m, (MLP, CNN2d)), type(m)
        assert "cd_convert" not in type(m).__module__
        assert COLLECTOR_ATTR not in m.__dict__
        for hook in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()):
            assert "cd_convert" not in getattr(hook, "__module__", "") and "cd_convert" not in type(hook).__module__


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_freeze_plain_torch_with_learned_rates(targets):
    torch.manual_seed(5)
    model = cd.convert(MLP(), targets=targets, dataset_size=100)
    sites = list(cd.dropout_rates(model))
    with torch.no_grad():
        for name in sites:
            model.get_submodule(name).p_logit.fill_(-0.5)  # p = sigmoid(-0.5)
    learned = cd.dropout_rates(model)
    frozen = cd.freeze(model)
    assert frozen is not model and get_collector(model) is not None
    _only_torch_nn(frozen)
    if targets is None:
        dropouts = [frozen.get_submodule(n) for n in sites]
        assert all(type(m) is nn.Dropout for m in dropouts)
    else:
        # a targeted layer fc1 becomes nn.Sequential(nn.Dropout(p), fc1); the dropouts absorbed by fc2 and
        # head become nn.Dropout(p) at their own paths, and fc2 and head keep their keys
        assert sorted(sites) == ["drop1", "drop2", "fc1.concrete_dropout"]
        seq = frozen.fc1
        assert type(seq) is nn.Sequential and type(seq[0]) is nn.Dropout and type(seq[1]) is nn.Linear
        assert type(frozen.fc2) is nn.Linear and type(frozen.head) is nn.Linear
        assert type(frozen.drop1) is nn.Dropout and type(frozen.drop2) is nn.Dropout
        dropouts = [seq[0], frozen.drop1, frozen.drop2]
    assert len(dropouts) == len(sites)
    for m in dropouts:
        assert m.p == pytest.approx(learned[sites[0]], rel=1e-6)
    assert not any(k.endswith("p_logit") for k in frozen.state_dict())
    x = torch.randn(3, 6)
    frozen.eval(), model.eval()
    torch.testing.assert_close(frozen(x), model(x))


def test_freeze_loads_without_cd_convert(tmp_path):
    torch.manual_seed(6)
    model = cd.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2)),
                       dataset_size=100)
    with torch.no_grad():
        model[2].p_logit.fill_(0.0)
    frozen = cd.freeze(model).eval()
    x = torch.randn(3, 4)
    path = tmp_path / "frozen.pt"
    torch.save({"model": frozen, "x": x, "y": frozen(x)}, path)
    code = (
        "import sys; sys.modules['cd_convert'] = None\n"
        "import torch\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "m = d['model']\n"
        "assert all(type(s).__module__.startswith('torch.nn') for s in m.modules()), [type(s) for s in m.modules()]\n"
        "assert abs(m[2].p - 0.5) < 1e-6, m[2].p\n"
        "assert torch.equal(m(d['x']), d['y'])\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_freeze_unconverted_refused():
    with pytest.raises(cd.ConversionError, match="has not been converted"):
        cd.freeze(MLP())


# --------------------------------------------------------------------------- refusals


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()], copy.deepcopy(model.state_dict()),
            dict(model.__dict__).keys())


def _assert_unchanged(model, snap):
    types, sd, attrs = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert _sd_equal(model.state_dict(), sd)
    assert get_collector(model) is None
    assert model.__dict__.keys() == attrs


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"targets": [int]}, cd.TargetError, "not a torch.nn.Module subclass"),
    ({"targets": [3]}, cd.TargetError, "is not understood"),
    ({"targets": [nn.LSTM]}, cd.TargetError, "LSTM is not supported: recurrent layers"),
    ({"targets": [nn.Conv3d]}, cd.TargetError, r"(?s)matched nothing.*fc1 \(Linear\)"),
    ({"targets": []}, cd.TargetError, "is empty"),
    ({"init_p": 0.0}, ValueError, r"strictly inside \(0, 1\)"),
    ({"init_p": 1.0}, ValueError, r"strictly inside \(0, 1\)"),
    ({"init_p": (0.3, 0.1)}, ValueError, "low <= high"),
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
    ({"channel_temperature": float("nan")}, ValueError, "temperature must be > 0"),
    ({"dataset_size": -5}, ValueError, "dataset_size must be a positive"),
    ({"dataset_size": 0}, ValueError, "dataset_size must be a positive"),
    ({"loss": "mse"}, ValueError, "needs tau"),
])
def test_refusals_before_anything_changes(kwargs, exc, match):
    model = MLP()
    snap = _snapshot(model)
    ctx = pytest.warns(UserWarning) if kwargs.get("targets") == [nn.Conv3d] else _null()
    with ctx:
        with pytest.raises(exc, match=match):
            cd.convert(model, inplace=True, **kwargs)
    _assert_unchanged(model, snap)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_nothing_matched_lists_what_model_has():
    with pytest.warns(UserWarning, match="matched no dropout site"):
        with pytest.raises(cd.TargetError) as info:
            cd.convert(MLP(), targets=[nn.Conv2d])
    text = str(info.value)
    assert "drop1" in text and "drop2" in text
    assert "fc1 (Linear)" in text and "head (Linear)" in text


def test_convert_non_module_refused():
    with pytest.raises(cd.ConversionError, match="expects a torch.nn.Module"):
        cd.convert(lambda x: x)


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_converting_twice_adds_nothing(targets):
    once = cd.convert(MLP(), targets=targets, dataset_size=100)
    keys = list(once.state_dict())
    n_sites = len(cd.dropout_rates(once))
    n_modules = len(list(once.modules()))
    twice = cd.convert(once, targets=targets)
    assert list(twice.state_dict()) == keys
    assert len(cd.dropout_rates(twice)) == n_sites
    assert len(list(twice.modules())) == n_modules
    assert len(get_collector(twice).applications) == len(get_collector(once).applications)
    # the scale survives a second convert without dataset_size
    assert torch.equal(cd.regularization(twice), cd.regularization(once))
    thrice = cd.convert(twice, targets=targets, inplace=True)
    assert list(thrice.state_dict()) == keys
    # unconvert after converting twice still restores the original
    assert [type(m) for m in cd.unconvert(thrice).modules()] == [type(m) for m in MLP().modules()]


def test_convert_then_set_regularizer():
    model = cd.convert(MLP())
    with pytest.raises(RuntimeError, match="dataset_size"):
        cd.regularization(model)
    cd.set_regularizer(model, dataset_size=1000, loss="mse", tau=2.0)
    scale = get_collector(model).scale
    assert scale.weight_regularizer == pytest.approx(1e-4 / 2000)
    assert scale.dropout_regularizer == pytest.approx(2 / 2000)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("targets", [None, [nn.Linear]])
def test_p_moves_under_strong_regulariser(targets):
    torch.manual_seed(7)
    model = cd.convert(MLP(), targets=targets, dataset_size=2, length_scale=1e-2)
    start = cd.dropout_rates(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + cd.regularization(model)
        loss.backward()
        opt.step()
    end = cd.dropout_rates(model)
    for name in start:
        assert abs(end[name] - start[name]) > 0.05, (name, start[name], end[name])
    # with N = 2 the entropy term dominates: rates are pulled up towards 0.5
    assert all(end[n] > start[n] for n in start)


def test_second_convert_with_more_targets_keeps_earlier_sites_in_regularizer():
    torch.manual_seed(8)
    first = cd.convert(MLP(), targets=["fc1"], dataset_size=100)
    second = cd.convert(first, targets=[nn.Linear])
    sites = set(cd.dropout_rates(second))
    # fc1's earlier site is kept; fc2 and head absorb the dropouts in front of them
    assert sites == {"fc1.concrete_dropout", "drop1", "drop2"}
    # every site still in the model must still be regularised (its application kept)
    regularised = {a.site for a in get_collector(second).applications}
    assert regularised == sites


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_freeze_half_precision_rate_at_upper_bound_is_below_one(dtype):
    model = cd.convert(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)).to(dtype),
                       dataset_size=100)
    with torch.no_grad():
        model[1].p_logit.fill_(1e4)
    assert cd.dropout_rates(model)["1"] < 1.0
    frozen = cd.freeze(model)
    assert type(frozen[1]) is nn.Dropout and 0.99 < frozen[1].p < 1.0


def test_dry_run_borrows_the_model_and_restores_it_exactly():
    """The dry run runs on the model itself (no copy) and puts back modes, buffers, rates and the RNG."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 6)
            self.drop_rate = 0.25
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace, so the dry run does the work
                return x
            h = nn.functional.dropout(self.bn(self.fc(x)), p=self.drop_rate, training=self.training)
            return self.drop(h)

    torch.manual_seed(0)
    model = Net().eval()
    model.bn.train()  # a mixed mode must come back as it was
    x = torch.randn(4, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    report = cd.plan(model, example_inputs=(x,))
    assert {r.kind for r in report.rows} == {"module", "functional"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert (model.training, model.bn.training, model.fc.training) == (False, True, False)
    assert model.drop_rate == 0.25 and model.drop.p == 0.3
    functional = next(r for r in report.rows if r.kind == "functional")
    assert functional.original.startswith("F.dropout") and functional.p == 0.25


def test_a_forward_that_changes_its_own_module_is_undone_after_the_dry_run():
    """A forward that rewires the model (BigBird falls back to full attention on short inputs, swapping in new
    attention modules) must not leave the caller's model, or the converted copy, changed by the dry run."""

    class SelfRewiring(nn.Module):
        def __init__(self):
            super().__init__()
            self.mode, self.path = "sparse", nn.Linear(6, 6)
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace, so the dry run does the work
                return x
            if x.shape[0] < 8 and self.mode == "sparse":
                self.mode, self.path = "full", nn.Linear(6, 6)  # a permanent switch, as BigBird makes it
                self.cache = x.shape
            return self.drop(self.path(x))

    torch.manual_seed(0)
    model = SelfRewiring()
    path = model.path
    converted = cd.convert(model, dataset_size=10, example_inputs=(torch.randn(4, 6),))
    for m in (model, converted):
        assert m.mode == "sparse" and not hasattr(m, "cache")
    assert model.path is path
    assert {n for n, _ in converted.named_parameters()} == {"path.weight", "path.bias", "drop.p_logit"}
    x = torch.randn(16, 6)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model.eval()(x))


def test_a_failing_dry_run_names_nested_inputs_by_shape_and_says_it_trains():
    class Detector(nn.Module):  # like torchvision's detection models: targets are required in training
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.2)

        def forward(self, images, targets=None):
            if self.training and targets is None:
                raise AssertionError("targets should not be none when in training mode")
            return [self.drop(image) for image in images]

    images = [torch.randn(3, 40, 50), torch.randn(3, 40, 50)]
    with pytest.raises(cd.ConversionError) as caught:
        cd.convert(Detector(), dataset_size=10, example_inputs=(images,))
    message = str(caught.value)
    assert "on inputs ([tensor(3, 40, 50), tensor(3, 40, 50)])" in message
    assert "training mode" in message and len(message) < 600 and "\n" not in message


def test_a_failing_dry_run_is_a_clear_error_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.2), nn.Linear(3, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cd.ConversionError, match=r"dry run of Sequential on inputs \(tensor\(2, 5\)\) failed"):
        cd.convert(model, dataset_size=10, example_inputs=(torch.randn(2, 5),), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[1]) is nn.Dropout and model.training


def _attention_like(x, attention_dropout: float, dropout: float, training: bool):
    # Both rates reach F.dropout as arguments of a plain function, as in torchvision's shifted_window_attention.
    x = nn.functional.dropout(x.softmax(-1), p=attention_dropout, training=training)
    return nn.functional.dropout(x, p=dropout, training=training)


class _TwoRates(nn.Module):
    def __init__(self, attention_dropout: float, dropout: float):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.attention_dropout, self.dropout = attention_dropout, dropout

    def forward(self, x):
        return _attention_like(self.fc(x), self.attention_dropout, self.dropout, self.training)


@pytest.mark.parametrize("rates", [(0.0, 0.0), (0.1, 0.2)])
def test_freeze_writes_rates_passed_through_a_function_to_their_attributes(rates):
    # Rates of 0 are tagged in the dry run (two attributes both 0.0 cannot be told apart by value), and the rate
    # source a dry run traces is kept for calls torch.fx found.
    torch.manual_seed(0)
    model = _TwoRates(*rates)
    converted = cd.convert(model, dataset_size=10, example_inputs=(torch.randn(2, 6),))
    sites = {n: m for n, m in converted.named_modules() if isinstance(m, cd.ConcreteDropoutBase)}
    assert len(sites) == 2
    with torch.no_grad():
        for site, p in zip(sites.values(), (0.3, 0.4)):
            site.p_logit.fill_(math.log(p / (1 - p)))
    frozen = cd.freeze(converted)
    assert (frozen.attention_dropout, frozen.dropout) == pytest.approx((0.3, 0.4))
    assert (model.attention_dropout, model.dropout) == rates and type(model.dropout) is float


class TwoOfThreeExperts(nn.Module):
    """A mixture of experts whose third expert only large batches reach; a dropout the model never uses; and
    two rate-0 copies of which only the first runs."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)) for _ in range(3))
        self.unused = nn.Dropout(0.2)
        self.idle = nn.ModuleList([nn.Dropout(0.0), nn.Dropout(0.0)])

    def forward(self, x):
        routed = 3 if x.shape[0] > 100 else 2
        return self.idle[0](sum(self.experts[i](x) for i in range(routed)))


def test_an_expert_the_dry_run_never_reaches_is_warned_about_and_reported():
    with pytest.warns(
        UserWarning, match=r"1 dropout module\(s\) in TwoOfThreeExperts never ran in the dry run"
    ) as caught:
        converted = cd.convert(TwoOfThreeExperts(), dataset_size=10, example_inputs=(torch.randn(3, 8),))
    message = next(str(w.message) for w in caught if "never ran" in str(w.message))
    assert "'experts.2.1'" in message and "example_inputs" in message
    # No copy of it ran: a module the model never uses; a rate-0 copy changes nothing when it runs.
    assert "unused" not in message and "idle" not in message
    assert type(converted.experts[2][1]) is nn.Dropout and converted.experts[2][1].p == 0.1  # kept, as it says
    statuses = {r.name: r.status for r in cd.report(converted).rows}
    assert statuses["experts.2.1"] == statuses["unused"] == "not called"
    # Inputs that reach the expert: converted, and no such warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reached = cd.convert(TwoOfThreeExperts(), dataset_size=10, example_inputs=(torch.randn(101, 8),))
    assert not [w for w in caught if "never ran" in str(w.message)]
    assert "experts.2.1" in cd.dropout_rates(reached)
