"""A targeted nn.Linear and its input site in one C++ node (``cd_convert.sites.fused_linear``, with the opt-in
CPU extension): values against an independent float64 formula and against the site-then-Linear path, and the
fused mode's hand-back to the pre-hook wherever something else would see the layer's call."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import cd_convert
from cd_convert import cpu_extension
from cd_convert.sites import fused_linear
from cd_convert.sites.fused_linear import FusedLinearForward


@pytest.fixture
def extension(built):
    cpu_extension.enable()
    yield built
    cpu_extension.disable()


def _net(bias: bool = True, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=bias), nn.ReLU(), nn.Linear(16, 3, bias=bias)).to(dtype)
    return cd_convert.convert(model, targets=[nn.Linear], dataset_size=100, init_p=0.2)


def _fused(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The model after two training calls: the first records each site's width, the second puts the layers into
    fused mode."""
    model.train()
    for _ in range(2):
        model(x).sum().backward()
    model.zero_grad()
    for layer in (model[0], model[2]):
        assert isinstance(vars(layer).get("forward"), FusedLinearForward) and not layer._forward_pre_hooks
    return model


@pytest.mark.parametrize(
    "shape, bias, dtype",
    [((32, 8), True, torch.float32), ((4, 5, 8), True, torch.float32), ((32, 8), False, torch.float64)],
)
def test_the_fused_node_against_an_independent_float64_formula(extension, shape, bias, dtype):
    model = _fused(_net(bias, dtype), torch.randn(shape, dtype=dtype))
    layer, site = model[0], model[0].concrete_dropout
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(*shape[:-1], 16, dtype=dtype)
    torch.manual_seed(7)
    y = layer(x)
    assert type(y.grad_fn).__name__ != "AddmmBackward0"  # one node, not the Linear's
    y.backward(g)
    # The same noise (the node draws torch.rand of x's shape), the paper's formula in float64 with autograd.
    torch.manual_seed(7)
    u = torch.rand(shape, dtype=dtype).double()
    theta = site.p_logit.detach().double().requires_grad_()
    w = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_() if bias else None
    x64 = x.detach().double().requires_grad_()
    t = site.temperature
    keep = torch.sigmoid(-(theta + torch.log(u) - torch.log1p(-u)) / t) / (1 - torch.sigmoid(theta))
    reference = (x64 * keep) @ w.T + (b if bias else 0)
    reference.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y.double(), reference.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(layer.weight.grad.double(), w.grad, **tol)
    torch.testing.assert_close(site.p_logit.grad.double(), theta.grad, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b.grad, **tol)


def test_training_in_fused_mode_equals_the_site_then_the_linear(extension, monkeypatch):
    x, target = torch.randn(64, 8), torch.randn(64, 3)

    def train(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        for step in range(4):
            loss = (model(x[16 * step : 16 * step + 16]) - target[16 * step : 16 * step + 16]).square().mean()
            optimizer.zero_grad()
            (loss + cd_convert.regularization(model)).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    fused = train(_net())
    monkeypatch.setattr(fused_linear, "enter", lambda *args: None)  # the pre-hook path, on the same C++ site
    plain_model = _net()
    plain = train(plain_model)
    assert plain_model[0]._forward_pre_hooks and "forward" not in vars(plain_model[0])
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_gradient_penalty_through_the_fused_node_equals_the_one_through_the_pre_hook(extension, monkeypatch):
    # create_graph: the node's gradients stay functions of the upstream gradient (as the C++ site's do).
    x = torch.randn(6, 8)

    def penalised_grads(model):
        xg = x.clone().requires_grad_()
        torch.manual_seed(5)
        (gx,) = torch.autograd.grad(model(xg).square().sum(), xg, create_graph=True)
        gx.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    fused_model = _fused(_net(), x)
    fused = penalised_grads(fused_model)
    assert isinstance(vars(fused_model[0]).get("forward"), FusedLinearForward)
    monkeypatch.setattr(fused_linear, "enter", lambda *args: None)
    hooked = penalised_grads(_net())
    for a, b in zip(fused, hooked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_mode_hands_the_layer_back_when_anything_else_would_see_its_call(extension):
    x = torch.randn(6, 8)
    model = _fused(_net(), x)
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(type(args[0]).__name__))
    model(x)
    assert "forward" not in vars(model[2]) and len(model[2]._forward_pre_hooks) == 1  # the pre-hook is back
    model(x)
    assert seen == ["Tensor", "Tensor"]
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        model(x)  # a global module hook: every layer leaves
    finally:
        handle.remove()
    assert "forward" not in vars(model[0]) and len(model[0]._forward_pre_hooks) == 1
    model(x)
    model(x)
    assert isinstance(vars(model[0]).get("forward"), FusedLinearForward)  # back in fused mode once it is gone
    cpu_extension.disable()
    model(x)  # the extension switched off: the layer leaves again
    assert "forward" not in vars(model[0]) and len(model[0]._forward_pre_hooks) == 1
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(1)
        assert torch.equal(first, model(x))  # the site still applies through the pre-hook
        assert not torch.equal(first, model.eval()(x))


def test_a_layer_with_a_hook_of_its_own_never_enters_fused_mode(extension):
    # A pre-hook registered after conversion runs after the site's: it must keep seeing the masked input.
    model = _net()
    x = torch.randn(6, 8)
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(torch.equal(args[0], x)))
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    assert seen == [False, False, False] and "forward" not in vars(model[0])
    assert isinstance(vars(model[2]).get("forward"), FusedLinearForward)  # the other layer is fused


def test_cpu_autocast_and_eval_keep_the_linears_own_computation(extension):
    x = torch.randn(6, 8)
    model = _fused(_net(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # F.linear under autocast, as the original model
    reference = copy.deepcopy(model)
    cd_convert.unconvert(reference)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_unconvert_freeze_copy_and_pickle_in_fused_mode(extension):
    x = torch.randn(6, 8)
    model = _fused(_net(), x)
    clone = copy.deepcopy(model)
    assert vars(clone[0])["forward"].layer is clone[0]  # the copy's own layer
    loaded = pickle.loads(pickle.dumps(model))
    assert vars(loaded[2])["forward"].layer is loaded[2]
    clone(x).sum().backward()
    assert clone[0].weight.grad is not None and model[0].weight.grad is None
    frozen = cd_convert.freeze(model)
    assert isinstance(frozen[0], nn.Sequential) and "forward" not in vars(frozen[0][1])
    assert not frozen[0][1]._forward_pre_hooks
    cd_convert.unconvert(loaded)
    for layer in (loaded[0], loaded[2]):
        assert "forward" not in vars(layer) and not layer._forward_pre_hooks and not hasattr(layer, "concrete_dropout")
