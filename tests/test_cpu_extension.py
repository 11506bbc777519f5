"""The opt-in C++ CPU site and regulariser (:mod:`cd_convert.cpu_extension`) against the Python path and an
independent float64 reference.

The extension is built once per session (about 30-40 s with a cold cache). Where no C++ compiler or ninja is
available the tests that need the build are skipped with the build's error as the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert import cpu_extension
from cd_convert.layers import ConcreteDropout, reference_concrete_dropout


@pytest.fixture
def toggle(built):
    """Runs a function with the extension on or off: ``toggle(on, fn)``; always off afterwards."""

    def run(on, fn):
        (cpu_extension.enable if on else cpu_extension.disable)()
        try:
            return fn()
        finally:
            cpu_extension.disable()

    yield run
    cpu_extension.disable()


def _site_call(site, x, g, seed):
    """Output, input gradient and logit gradient of one training call on the noise of ``seed``."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    site.p_logit.grad = None
    torch.manual_seed(seed)
    y = site(x)
    y.backward(g)
    return y.detach(), (x.grad.clone() if x.grad is not None else None), site.p_logit.grad.clone(), y.grad_fn


# Small inputs at t = 0.1 take the fused loops (the output to rounding: the mask is computed another way);
# (130, 130) has more elements than PACKED_MIN_NUMEL (the packed noise, the ATen ops: bitwise) and t = 0.15
# has no whole-number inverse (the forward pass on the ATen ops, the backward pass fused).
@pytest.mark.parametrize(
    "shape, temperature, fused_forward, fused_backward",
    [((32, 50), 0.1, True, True), ((3,), 0.1, True, True), ((130, 130), 0.1, False, False), ((32, 50), 0.15, False, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("save_output", [False, True])
def test_site_equals_the_python_path(toggle, shape, temperature, fused_forward, fused_backward, dtype, save_output):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(shape, dtype=dtype)
    site = ConcreteDropout(0.1, temperature=temperature).train()
    site.save_output = save_output
    python = toggle(False, lambda: _site_call(site, x, g, seed=5))
    native = toggle(True, lambda: _site_call(site, x, g, seed=5))
    assert type(native[3]).__name__ == "CppFunction" and type(python[3]).__name__ != "CppFunction"
    if fused_forward:  # float64 arithmetic rounded once against float ops: a few units in the last place
        tol = 1e-13 if dtype == torch.float64 else 5e-7
        torch.testing.assert_close(native[0], python[0], rtol=tol, atol=tol)
        torch.testing.assert_close(native[1], python[1], rtol=tol, atol=tol)
    else:  # the same ATen ops on the same noise
        assert torch.equal(native[0], python[0]) and torch.equal(native[1], python[1])
    if fused_backward:  # float64 sums in C++ against the input dtype's in Python
        tol = 1e-12 if dtype == torch.float64 else 2e-4
        torch.testing.assert_close(native[2], python[2], rtol=tol, atol=tol * max(1.0, python[2].abs().item()))
    else:
        assert torch.equal(native[2], python[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_forward_is_within_two_ulp_of_a_float64_reference(toggle, dtype):
    """The one-pass mask (no logarithm or exponential per element) against the formula in float64."""
    site = ConcreteDropout(0.1).train()
    torch.manual_seed(7)
    x = torch.randn(64, 200, dtype=dtype)

    def call():
        torch.manual_seed(11)
        with torch.no_grad():
            return site(x)

    y = toggle(True, call)
    torch.manual_seed(11)
    u = torch.rand(64, 200, dtype=dtype).double()
    theta = site.p_logit.detach().double()
    # The keep mask as w = sigmoid(-(theta + logit u) / t) directly: 1 - z would round tiny w to 0 in float64.
    reference = x.double() * torch.sigmoid(-(theta + torch.logit(u)) / 0.1) / torch.sigmoid(-theta)
    info = torch.finfo(dtype)
    # float32: two units in the last place (the mask rounded once, then y = x m). float64: the reference's own
    # logit and sigmoid round at about 1e-15, amplified by 1 / t.
    rtol = 2 * info.eps if dtype == torch.float32 else 1e-12
    error = (y.double() - reference).abs()
    assert bool((error <= rtol * reference.abs() + info.tiny).all()), (error / reference.abs()).max()


@pytest.mark.parametrize("save_output", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_logit_gradient_matches_a_float64_reference(toggle, save_output, input_grad):
    """The fused backward loop (small inputs) against the paper's formula in float64 through autograd."""
    errors = []
    for seed in range(8):
        torch.manual_seed(100 + seed)
        x = torch.randn(32, 50, requires_grad=input_grad)
        g = torch.randn(32, 50)
        site = ConcreteDropout(0.1).train()
        site.save_output = save_output
        y, grad_x, grad_logit, _ = toggle(True, lambda: _site_call(site, x, g, seed=seed))
        torch.manual_seed(seed)
        u = torch.rand(32, 50).double()  # the noise the site drew (torch.rand below the packed-draw size)
        x64 = x.detach().double().requires_grad_()
        logit64 = site.p_logit.detach().double().requires_grad_()
        y64 = reference_concrete_dropout(x64, logit64, u, 0.1)
        y64.backward(g.double())
        torch.testing.assert_close(y.double(), y64, rtol=3e-7, atol=1e-12)
        if input_grad:
            torch.testing.assert_close(grad_x.double(), x64.grad, rtol=1e-5, atol=1e-6)
        errors.append(abs(grad_logit.item() - logit64.grad.item()) / abs(logit64.grad.item()))
    # Measured: at most 3e-5 relative (the float32 mask's own rounding); the Python path's float32 sums: 5e-4.
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_calls_without_gradient_equal_the_python_path(toggle, mode):
    """A Monte Carlo pass (no_grad) or inference mode: no autograd node, the values of the Python path."""
    site = ConcreteDropout(0.1).train()
    x = torch.randn(32, 50)

    def call():
        torch.manual_seed(9)
        with mode():
            return site(x).clone()

    native, python = toggle(True, call), toggle(False, call)
    assert not native.requires_grad
    torch.testing.assert_close(native, python, rtol=5e-7, atol=5e-7)


def test_second_derivatives_equal_the_python_path(toggle):
    """Under create_graph the C++ backward stays a tensor function, as the Python one does (the second pass's
    first-order call takes the fused loop: float64 sums, so equal to the float32 sums' rounding)."""
    site = ConcreteDropout(0.1).train()
    x0 = torch.randn(16, 8)

    def penalty():
        x = x0.clone().requires_grad_()
        site.p_logit.grad = None
        torch.manual_seed(2)
        y = site(x)
        (grad_x,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
        (grad_x**2).sum().backward()
        return site.p_logit.grad.clone()

    torch.testing.assert_close(toggle(True, penalty), toggle(False, penalty), rtol=2e-4, atol=1e-5)


def _uci_network(count=2):
    torch.manual_seed(0)
    layers = []
    for i in range(count):
        layers += [nn.Linear(8 if i == 0 else 20, 20 if i + 1 < count else 1)] + ([nn.ReLU()] if i + 1 < count else [])
    return cd_convert.convert(nn.Sequential(*layers), targets=[nn.Linear], dataset_size=500)


def _regularizer_value_and_grads(model, scale=1.0):
    """The regulariser's value, the gradients ``scale * r`` gives the parameters it reads, and its grad_fn."""
    model.zero_grad(set_to_none=True)
    r = cd_convert.regularization(model)
    (scale * r).backward()
    return r.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], r.grad_fn


@pytest.mark.parametrize("count", [2, 8])
def test_regularizer_equals_the_python_path(toggle, count):
    model = _uci_network(count)

    def value_and_grads():
        return _regularizer_value_and_grads(model, scale=3.0)

    native, python = toggle(True, value_and_grads), toggle(False, value_and_grads)
    assert type(native[2]).__name__ == "CppFunction" and type(python[2]).__name__ == "HostRegularizerBackward"
    # The same float64 arithmetic in the same order, but the C++ loop sums the squares in float64 where the
    # Python path squares a float32 norm: equal to float32 rounding.
    torch.testing.assert_close(native[0], python[0], rtol=1e-6, atol=0.0)
    assert len(native[1]) == len(python[1]) == 2 * count  # each weight and each p-logit
    for a, b in zip(native[1], python[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_regularizer_is_once_differentiable(toggle):
    model = _uci_network()

    def first_then_second():
        r = cd_convert.regularization(model)
        # r * r: the regulariser's incoming gradient (2 r) itself needs a gradient under create_graph.
        grads = torch.autograd.grad(r * r, list(model.parameters()), create_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            sum(g.sum() for g in grads if g is not None).backward()
        return [g.detach() for g in grads if g is not None]

    native, python = toggle(True, first_then_second), toggle(False, first_then_second)
    assert all(torch.equal(a, b) for a, b in zip(native, python))


def test_a_converted_network_trains_as_on_the_python_path(toggle):
    """Twenty Adam steps of the UCI network with the regulariser: the C++ path's losses follow the Python path's
    (the logit gradients differ in their last bits, so the runs drift apart only by rounding)."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)

    def train():
        model = _uci_network()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        losses, kinds = [], set()
        model[0].concrete_dropout.register_forward_hook(lambda m, i, o: kinds.add(type(o.grad_fn).__name__))
        for _ in range(20):
            loss = F.mse_loss(model(x), y) + cd_convert.regularization(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, cd_convert.dropout_rates(model), kinds

    (native_losses, native_rates, native_kinds) = toggle(True, train)
    (python_losses, python_rates, python_kinds) = toggle(False, train)
    assert native_kinds == {"CppFunction"} and python_kinds == {"HostConcreteDropoutBackward"}
    assert native_losses[-1] < native_losses[0]
    torch.testing.assert_close(torch.tensor(native_losses), torch.tensor(python_losses), rtol=1e-4, atol=1e-5)
    assert native_rates.keys() == python_rates.keys()
    for name in native_rates:
        assert native_rates[name] == pytest.approx(python_rates[name], rel=1e-4)


def test_enable_routes_and_disable_restores(built):
    site = ConcreteDropout(0.1).train()
    x = torch.randn(4, 5, requires_grad=True)
    try:
        assert cpu_extension.enable() is built and cpu_extension.loaded() is built
        assert type(site(x).grad_fn).__name__ == "CppFunction"
    finally:
        cpu_extension.disable()
    assert cpu_extension.loaded() is None
    assert type(site(x).grad_fn).__name__ == "HostConcreteDropoutBackward"


def test_a_failed_build_says_what_to_install_and_switches_nothing_on(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("c++: command not found")

    monkeypatch.setattr(cpu_extension, "_BUILT", None)
    monkeypatch.setattr(cpu_extension, "_MODULE", None)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler .* ninja \(pip install ninja\)"):
        cpu_extension.enable()
    assert cpu_extension.loaded() is None


def test_strided_inputs_take_the_aten_ops_bitwise(toggle):
    """A transposed (non-contiguous) input: the forward pass on the Python path's ops, bitwise its output."""
    site = ConcreteDropout(0.1).train()
    base = torch.randn(50, 32)
    g = torch.randn(32, 50)

    def call():
        x = base.t().requires_grad_()
        site.p_logit.grad = None
        torch.manual_seed(1)
        y = site(x)
        y.backward(g)
        return y.detach(), x.grad.clone(), site.p_logit.grad.clone(), y.grad_fn

    native, python = toggle(True, call), toggle(False, call)
    assert type(native[3]).__name__ == "CppFunction"
    assert torch.equal(native[0], python[0]) and torch.equal(native[1], python[1])
    torch.testing.assert_close(native[2], python[2], rtol=2e-4, atol=1e-4)


def test_the_cpp_regularizer_serves_models_beyond_the_python_paths_limit(toggle):
    """16 sites: past host_regularizer.MAX_SITES the Python path hands over to the tensor form; the C++ build
    serves them, with the same value and gradients to rounding."""
    from cd_convert import host_regularizer

    count = host_regularizer.MAX_SITES + 4
    model = _uci_network(count)

    def value_and_grads():
        return _regularizer_value_and_grads(model)

    native, tensor_form = toggle(True, value_and_grads), toggle(False, value_and_grads)
    assert type(native[2]).__name__ == "CppFunction" and type(tensor_form[2]).__name__ == "_RegularizerBackward"
    torch.testing.assert_close(native[0], tensor_form[0], rtol=1e-6, atol=1e-7)
    assert len(native[1]) == len(tensor_form[1]) == 2 * count
    for a, b in zip(native[1], tensor_form[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_lazily_negated_logit_is_read_as_its_value(built):
    """The C++ code reads one-element tensors from memory; a view carrying torch's lazy negation bit
    (``torch._neg_view``) stores the un-negated number, so it must go through ``item()``."""
    x = torch.randn(4, 5)
    outputs = []
    for logit in (torch._neg_view(torch.tensor(2.0)), torch.tensor(-2.0)):
        torch.manual_seed(0)
        outputs.append(built.site(x, logit, None, 0.1, 10.0, False, False))
    assert torch.equal(*outputs)
