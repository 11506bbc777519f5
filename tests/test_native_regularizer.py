"""The C++ build's regulariser (``csrc/host_site.cpp``): its checked steady-state call and its autograd node.

``regularizer_of`` reads the logits and weights from the module tree itself and makes the plan's checks there;
it must step aside (return None, so that the Python path rebuilds the plan) on every change that would make its
value or gradients wrong. Its node is a plain autograd Node, which must keep what a
``torch.autograd.Function`` gave: autograd's errors on a second backward pass and on a weight changed in place,
once-differentiability, and no node where no gradient is recorded.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.utils import parametrize

import cd_convert as cd
from cd_convert import cpu_extension, host_regularizer
from cd_convert.collector import _PLAN_ATTR, get_collector

X, TARGET = torch.randn(32, 8), torch.randn(32, 1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return cd.convert(model, targets=[nn.Linear], weight_regularizer=0.05, dropout_regularizer=0.01, init_p=0.2)


@pytest.fixture
def native(built):
    """The C++ build switched on for one test."""
    cpu_extension.enable()
    yield
    cpu_extension.disable()


def _checked_call(model: nn.Module) -> Optional[torch.Tensor]:
    """The C++ build's checked call on the model's current plan, as Collector.regularization makes it."""
    plan = get_collector(model).__dict__[_PLAN_ATTR]
    return host_regularizer.regularize_tree(plan.host, model, plan.native_tree)


def _python_value(model: nn.Module) -> torch.Tensor:
    """The regulariser on the Python host path with a plan built afresh (the reference)."""
    get_collector(model).invalidate()
    cpu_extension.disable()
    try:
        return cd.regularization(model)
    finally:
        cpu_extension.enable()


class _Marked(nn.Parameter):
    """A parameter subclass (as FSDP's DTensor or a tensor wrapper is a tensor subclass): never read by the host
    paths."""


def _replace_a_module_on_the_path(model: nn.Module) -> None:
    old = model[2]
    new = nn.Linear(16, 1)  # another weight
    new.concrete_dropout = old.concrete_dropout  # the same site, under a new parent
    model[2] = new


def _replace_a_site(model: nn.Module) -> None:
    model[0].concrete_dropout = type(model[0].concrete_dropout)(0.5)


def _logit_to_float64(model: nn.Module) -> None:
    model[0].concrete_dropout.double()


def _logit_as_a_plain_attribute(model: nn.Module) -> None:
    site = model[0].concrete_dropout
    value = site.p_logit.detach().clone().requires_grad_()
    del site.p_logit
    site.p_logit = value  # no longer a registered parameter


def _logit_of_a_tensor_subclass(model: nn.Module) -> None:
    site = model[2].concrete_dropout
    site.p_logit = _Marked(site.p_logit.detach().clone())


def _eps_changed(model: nn.Module) -> None:
    model[0].concrete_dropout.eps = 0.3  # the bound now clamps the logit of p = 0.2


def _weight_parametrized(model: nn.Module) -> None:
    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2.0 * w

    parametrize.register_parametrization(model[0], "weight", Doubled())


def _weight_replaced_by_a_subclass(model: nn.Module) -> None:
    model[2].weight = _Marked(model[2].weight.detach().clone())


#: Each change, and whether it changes the regulariser's value (the others change what the host path may read).
CHANGES = [
    (_replace_a_module_on_the_path, True),
    (_replace_a_site, True),
    (_logit_to_float64, False),
    (_logit_as_a_plain_attribute, False),
    (_logit_of_a_tensor_subclass, False),
    (_eps_changed, True),
    (_weight_parametrized, True),
    (_weight_replaced_by_a_subclass, False),
]


@pytest.mark.parametrize("change, changes_value", CHANGES, ids=[f.__name__.strip("_") for f, _ in CHANGES])
def test_the_checked_call_steps_aside_after_each_change_and_the_value_is_then_right(native, change, changes_value):
    model = _model()
    first = cd.regularization(model)
    served = _checked_call(model)
    assert served is not None and torch.equal(served, first)
    change(model)
    assert _checked_call(model) is None  # the plan no longer fits: the Python path takes the call
    value = cd.regularization(model)
    torch.testing.assert_close(value, _python_value(model), rtol=1e-6, atol=0.0)
    if changes_value:
        assert not torch.allclose(value, first, rtol=1e-4, atol=0.0)
    else:  # the same value, computed on another path (the tensor form for subclasses): equal to rounding
        torch.testing.assert_close(value, first, rtol=1e-6, atol=0.0)


def test_after_a_logit_turns_float64_its_gradient_is_float64(native):
    model = _model()
    cd.regularization(model)
    _logit_to_float64(model)
    cd.regularization(model).backward()
    assert model[0].concrete_dropout.p_logit.grad.dtype == torch.float64


def test_a_steady_state_call_is_the_checked_call(native):
    model = _model()
    cd.regularization(model)
    plan = get_collector(model).__dict__[_PLAN_ATTR]
    reg = cd.regularization(model)
    assert get_collector(model).__dict__[_PLAN_ATTR] is plan
    assert reg.grad_fn.name() == "CdConvertRegularizerBackward"
    torch.testing.assert_close(reg, _python_value(model), rtol=1e-6, atol=0.0)


def test_a_second_backward_pass_through_a_freed_graph_raises(native):
    model = _model()
    reg = cd.regularization(model)
    reg.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        reg.backward()


def test_retain_graph_allows_a_second_backward_pass_that_doubles_the_gradients(native):
    model = _model()
    reg = cd.regularization(model)
    reg.backward(retain_graph=True)
    once = model[0].weight.grad.clone()
    reg.backward()
    torch.testing.assert_close(model[0].weight.grad, 2 * once)


def test_a_weight_changed_in_place_before_the_backward_pass_raises(native):
    model = _model()
    reg = cd.regularization(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reg.backward()


def test_its_gradients_cannot_be_differentiated_again(native):
    model = _model()
    logit = model[0].concrete_dropout.p_logit
    (grad,) = torch.autograd.grad(cd.regularization(model) * logit, logit, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.backward()


def test_no_node_without_recorded_gradients(native):
    model = _model()
    with torch.no_grad():
        assert cd.regularization(model).grad_fn is None
    model.requires_grad_(False)
    reg = cd.regularization(model)
    assert reg.grad_fn is None and not reg.requires_grad
    model.requires_grad_(True)
    model[0].requires_grad_(False)  # the first site's logit and weight held: gradients for the second only
    loss = F.mse_loss(model(X), TARGET) + cd.regularization(model)
    loss.backward()
    assert model[0].weight.grad is None and model[0].concrete_dropout.p_logit.grad is None
    assert model[2].weight.grad is not None and model[2].concrete_dropout.p_logit.grad is not None


@pytest.mark.parametrize("path", ["python", "cpp"])
def test_forward_mode_ad_is_refused_on_both_paths(built, path):
    """Neither path has a forward-mode derivative: a dual tensor is refused, never given a silently lost tangent."""
    if path == "cpp":
        cpu_extension.enable()
    model = _model()
    site = model[0].concrete_dropout
    value = site.p_logit.detach().clone()
    del site.p_logit
    try:
        with fwAD.dual_level():
            site.p_logit = fwAD.make_dual(value, torch.ones(()))
            with pytest.raises(NotImplementedError):
                cd.regularization(model)
    finally:
        cpu_extension.disable()


class _Nested(nn.Module):
    """Sites two and three levels down, a weight tied between two layers (read by two applications, under two
    names), a Linear read through a Sequential, and a site whose output no weight layer reads (entropy term
    only)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 12))
        self.block = nn.ModuleDict({"drop": nn.Dropout(0.3), "proj": nn.Linear(12, 12)})
        self.head = nn.Linear(12, 12)
        self.head.weight = self.block["proj"].weight  # tied
        self.drop_out = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = self.block["proj"](self.block["drop"](h)) + self.head(self.block["drop"](h))
        return self.drop_out(h)  # dropout on the output: no consumer weight


def test_a_nested_model_with_a_tied_weight_gets_the_python_paths_value_and_gradients(native):
    torch.manual_seed(0)
    model = cd.convert(_Nested(), dataset_size=100, example_inputs=(torch.randn(4, 8),))
    collector = get_collector(model)
    assert any(not app.consumer_weights for app in collector.applications)  # the entropy-only site
    model(torch.randn(4, 8))  # the entropy-only site's K is the feature count it has seen
    results = {}
    for path in ("python", "cpp"):
        (cpu_extension.enable if path == "cpp" else cpu_extension.disable)()
        model.zero_grad(set_to_none=True)
        collector.invalidate()
        cd.regularization(model)  # builds the plan
        reg = cd.regularization(model)  # the steady-state call
        reg.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[path] = (reg.detach(), grads, reg.grad_fn.name())
    assert results["cpp"][2] == "CdConvertRegularizerBackward"
    assert _checked_call(model) is not None  # served by the checked call, not the Python path
    torch.testing.assert_close(results["cpp"][0], results["python"][0], rtol=1e-6, atol=0.0)
    assert results["cpp"][1].keys() == results["python"][1].keys()
    for name, grad in results["python"][1].items():
        torch.testing.assert_close(results["cpp"][1][name], grad, rtol=1e-5, atol=1e-9)
