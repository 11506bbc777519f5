"""The converter on the model shapes of the design notes: every site found, eval unchanged, every added
parameter trained by the data loss alone, the regulariser tied to the consumer weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import cd_convert
from cd_convert.layers import ConcreteDropoutBase

from zoo import zoo

ZOO = zoo()


def _convert(factory, inputs, kwargs):
    torch.manual_seed(0)
    model = factory().eval()
    kwargs = dict(kwargs)
    if kwargs.pop("use_example_inputs", False):
        kwargs["example_inputs"] = inputs
    converted = cd_convert.convert(model, dataset_size=100, **kwargs)
    return model, converted


def _zoo_convert(name, **overrides):
    entry = next(z for z in ZOO if z[0] == name)
    kwargs = {**entry[3], **overrides}
    return _convert(entry[1], entry[2](), kwargs)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name,factory,make_inputs,kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_eval_output_identical(name, factory, make_inputs, kwargs):
    inputs = make_inputs()
    model, converted = _convert(factory, inputs, kwargs)
    converted.eval()
    with torch.no_grad():
        assert torch.equal(_first(converted(*inputs)), _first(model(*inputs)))
    assert type(converted) is type(model)
    original_keys = set(model.state_dict())
    added = set(converted.state_dict()) - original_keys
    assert original_keys <= set(converted.state_dict())
    assert all(k.endswith("p_logit") for k in added)


@pytest.mark.parametrize("name,factory,make_inputs,kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_every_added_parameter_gets_gradient_from_data_loss(name, factory, make_inputs, kwargs):
    inputs = make_inputs()
    _, converted = _convert(factory, inputs, kwargs)
    sites = [m for m in converted.modules() if isinstance(m, ConcreteDropoutBase)]
    assert sites, f"{name}: no site converted"
    converted.train()
    _first(converted(*inputs)).float().pow(2).mean().backward()
    for param_name, param in converted.named_parameters():
        if param_name.endswith("p_logit"):
            assert param.grad is not None and param.grad != 0, f"{name}: {param_name} got no gradient"


@pytest.mark.parametrize("name,factory,make_inputs,kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_regulariser_follows_consumer_weight(name, factory, make_inputs, kwargs):
    inputs = make_inputs()
    _, converted = _convert(factory, inputs, kwargs)
    converted.train()
    converted(*inputs)  # consumer-less sites learn their feature size on the first forward
    collector = converted.__dict__["_cd_convert_collector"]
    with_consumer = [a for a in collector.applications if a.consumer_weights]
    before = cd_convert.regularization(converted).item()
    if not with_consumer:  # entropy-only sites: the regulariser still follows p
        site = converted.get_submodule(collector.applications[0].site)
        with torch.no_grad():
            site.p_logit.add_(1.0)
        assert cd_convert.regularization(converted).item() != before
        return
    weight = converted.get_parameter(with_consumer[0].consumer_weights[0])
    with torch.no_grad():
        weight.mul_(2.0)
    assert cd_convert.regularization(converted).item() > before


def test_expected_sites_and_kinds():
    kinds = {}
    for name, factory, make_inputs, kwargs in ZOO:
        _, converted = _convert(factory, make_inputs(), kwargs)
        kinds[name] = sorted(r.kind for r in cd_convert.report(converted).sites)
    assert kinds["functional_head"] == ["functional"]
    assert kinds["residual"] == ["module", "module"]
    assert kinds["shared_dropout"] == ["module"]
    assert kinds["attention"] == ["fused"]
    assert kinds["attention_targets"] == ["targeted"]
    assert kinds["fused_sdpa"] == ["fused"]
    assert kinds["recurrent"] == ["module"]
    assert kinds["control_flow"] == ["functional", "module"]
    assert kinds["transformer"].count("fused") == 2 and kinds["transformer"].count("module") == 6


def test_report_details():
    _, converted = _zoo_convert("residual")
    rows = {r.name: r for r in cd_convert.report(converted).rows}
    assert rows["drop_flat"].consumer == "fc.weight"  # found through .flatten(1)
    assert rows["drop_res"].consumer == "" and any("entropy term only" in n for n in rows["drop_res"].notes)
    _, rec = _zoo_convert("recurrent")
    other = {r.name: r for r in cd_convert.report(rec).rows}
    assert other["rnn"].status == "unsupported" and "LSTM" in other["rnn"].original
    _, att = _zoo_convert("attention_targets")
    rows = {r.name: r for r in cd_convert.report(att).rows}
    assert rows["att.out_proj"].status == "not called"  # MHA never calls out_proj as a module
    text = str(cd_convert.report(att))
    assert "fc.concrete_dropout" in text and "not called" in text
    assert cd_convert.report(att).to_dict()["sites"][0]["name"] == "fc.concrete_dropout"


def test_shared_module_counts_each_consumer():
    _, converted = _zoo_convert("shared_dropout")
    apps = converted.__dict__["_cd_convert_collector"].applications
    assert sorted(a.consumer_weights for a in apps) == [("fc1.weight",), ("fc2.weight",)]


def test_control_flow_fallback_is_reported():
    _, converted = _zoo_convert("control_flow")
    rep = cd_convert.report(converted)
    assert "module search" in rep.method and "dry run" in rep.method
    assert any("could not trace" in n for n in rep.notes)


def test_plan_changes_nothing_and_convert_is_idempotent():
    model = zoo()[0][1]()
    keys = list(model.state_dict())
    rep = cd_convert.plan(model, dataset_size=10)
    assert [r.status for r in rep.sites] == ["planned"]
    assert list(model.state_dict()) == keys and "forward_head" not in model.__dict__
    once = cd_convert.convert(model, dataset_size=10)
    twice = cd_convert.convert(once, dataset_size=10)
    assert list(twice.state_dict()) == list(once.state_dict())
    assert len(cd_convert.dropout_rates(twice)) == 1


def test_unconvert_and_freeze_functional_site():
    model = zoo()[0][1]().eval()
    converted = cd_convert.convert(model, dataset_size=10)
    site = converted.get_submodule("forward_head_dropout")
    with torch.no_grad():
        site.p_logit.fill_(0.0)  # p = 0.5
    frozen = cd_convert.freeze(converted)
    assert frozen.drop_rate == pytest.approx(0.5)
    assert "forward_head" not in frozen.__dict__
    restored = cd_convert.unconvert(copy.deepcopy(converted))
    assert list(restored.state_dict()) == list(model.state_dict())
    assert restored.drop_rate == 0.25


def test_failed_apply_leaves_model_untouched(monkeypatch):
    model = zoo()[1][1]()
    keys = list(model.state_dict())
    from cd_convert.sites.module import ModuleSwap

    calls = {"n": 0}
    original = ModuleSwap.apply

    def fail_second(self, root, site):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, root, site)

    monkeypatch.setattr(ModuleSwap, "apply", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        cd_convert.convert(model, dataset_size=10, inplace=True)
    assert list(model.state_dict()) == keys
    assert all(not isinstance(m, ConcreteDropoutBase) for m in model.modules())


@st.composite
def mlp_specs(draw):
    widths = draw(st.lists(st.integers(2, 12), min_size=2, max_size=5))
    rates = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5]), min_size=len(widths) - 1, max_size=len(widths) - 1))
    flatten = draw(st.booleans())
    return widths, rates, flatten


@settings(max_examples=25, deadline=None)
@given(mlp_specs(), st.booleans())
def test_random_architectures(spec, targeted):
    widths, rates, flatten = spec
    layers = [nn.Flatten()] if flatten else []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Dropout(rates[i]), nn.Linear(w_in, w_out)]
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    x = torch.randn(4, widths[0])
    converted = cd_convert.convert(model, [nn.Linear] if targeted else None, dataset_size=50)
    converted.eval()
    assert torch.equal(converted(x), model(x))
    converted.train()
    converted(x).pow(2).mean().backward()
    grads = [p.grad for n, p in converted.named_parameters() if n.endswith("p_logit")]
    assert len(grads) == len(widths) - 1
    assert all(g is not None for g in grads)
    apps = converted.__dict__["_cd_convert_collector"].applications
    assert all(a.consumer_weights for a in apps)  # every site here feeds a Linear


@pytest.mark.parametrize("name,factory,make_inputs,kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_every_site_samples_under_mc_mode(name, factory, make_inputs, kwargs):
    """In MC mode each site draws masks (also functional, fused and MHA sites) while the model is in eval."""
    inputs = make_inputs()
    _, converted = _convert(factory, inputs, kwargs)
    converted.eval()
    sites = [m for m in converted.modules() if isinstance(m, ConcreteDropoutBase)]
    calls = {id(s): 0 for s in sites}
    handles = [s.register_forward_hook(lambda mod, a, o: calls.__setitem__(id(mod), calls[id(mod)] + 1)) for s in sites]
    with torch.no_grad(), cd_convert.mc_mode(converted):
        assert all(not m.training for m in converted.modules())
        first, second = _first(converted(*inputs)), _first(converted(*inputs))
    for handle in handles:
        handle.remove()
    assert not torch.equal(first, second)
    assert all(count > 0 for count in calls.values()), f"{name}: a site did not run under mc_mode"
    with torch.no_grad():
        assert torch.equal(_first(converted(*inputs)), _first(converted(*inputs)))  # eval again afterwards


def test_optional_forward_arguments_traced_at_their_defaults():
    """`if mask is None:` must take the branch a plain `model(x)` call takes (timm's hiera head)."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.2)
            self.head = nn.Linear(4, 2)

        def forward(self, x, mask=None):
            x = self.fc(x)
            if mask is None:
                x = self.head(self.drop(x))
            return x

    converted = cd_convert.convert(Masked(), dataset_size=10)
    assert isinstance(converted.drop, ConcreteDropoutBase)
    assert cd_convert.report(converted).method == "fx"
