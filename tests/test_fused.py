"""Tests for the fused Triton kernels (cd_convert.fused) against the paper's formula written with autograd.

The noise a call used is regenerated from the same seed by an independent Philox4x32-10 written from its
specification (``fused_uniform_reference`` in ``test_noise_independence.py``, which also holds the statistics of
the noise), so forward values and both gradients are compared with ``reference_concrete_dropout`` on identical
noise. On a machine with a CUDA GPU the tests run on it; without one they run on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` must be set before Triton is imported, so ``test_under_triton_interpreter``
reruns this file in a subprocess).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from cd_convert import fused  # noqa: E402
from cd_convert.layers import ConcreteDropout2d, concrete_dropout, reference_concrete_dropout  # noqa: E402
from test_noise_independence import fused_uniform_reference  # noqa: E402  (tests/ is on sys.path, as for zoo)
from triton_interpreter import assert_passes_under_interpreter  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else ("cpu" if INTERPRETED else None)
runs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1 (see below)")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernels run directly here")
def test_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _run(x, p_logit, *, temperature, channelwise=False, save_output=False, eps=1e-6, seed_state=0):
    """Fused forward with a known seed; returns (y, seed)."""
    torch.manual_seed(seed_state)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device))  # what the forward pass draws first
    torch.manual_seed(seed_state)
    assert fused.supports(x, channelwise, 1, interpret=INTERPRETED)
    y = fused.fused_concrete_dropout(
        x, p_logit, temperature=temperature, eps=eps, channelwise=channelwise, channel_dim=1, save_output=save_output
    )
    return y, seed


def _noise(seed, count):
    """The uniforms of noise indices ``0 .. count - 1`` under ``seed``, from the independent Philox reference."""
    return fused_uniform_reference(seed, count).to(DEVICE)


def _assert_matches_reference(x, p_logit, y, grad_x, g, u, t):
    """Output, input gradient and logit gradient of a fused call equal the paper's formula (float64 autograd)
    on the same noise ``u``."""
    x_ref = x.double().requires_grad_()
    logit_ref = p_logit.detach().double().requires_grad_()
    y_ref = reference_concrete_dropout(x_ref, logit_ref, u.double(), t)
    y_ref.backward(g.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_logit.grad.double(), logit_ref.grad, rtol=1e-3, atol=1e-4)


@runs_kernels
@pytest.mark.parametrize("save_output", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_elementwise_values_and_gradients_match_the_formula(save_output, p):
    t = 0.1
    x = torch.randn(37, 53, device=DEVICE, requires_grad=True)
    p_logit = torch.tensor(math.log(p / (1 - p)), device=DEVICE, requires_grad=True)
    y, seed = _run(x, p_logit, temperature=t, save_output=save_output)
    g = torch.randn_like(y)
    y.backward(g)
    u = _noise(seed, x.numel()).view_as(x)
    _assert_matches_reference(x.detach(), p_logit, y, x.grad, g, u, t)


@runs_kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_channelwise_values_gradients_and_layout_independence(channels_last):
    t = 2 / 3
    base = torch.randn(4, 6, 5, 3, device=DEVICE)
    x = (base.contiguous(memory_format=torch.channels_last) if channels_last else base.clone()).requires_grad_()
    p_logit = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    y, seed = _run(x, p_logit, temperature=t, channelwise=True)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn(4, 6, 5, 3, device=DEVICE)
    y.backward(g)
    u = _noise(seed, 4 * 6).view(4, 6, 1, 1)  # one noise per (sample, channel), n * C + c
    _assert_matches_reference(base, p_logit, y, x.grad, g, u, t)


@runs_kernels
def test_noise_is_strictly_inside_the_unit_interval_and_uniform():
    u = torch.empty(1 << 16, device=DEVICE, dtype=torch.float32)
    fused._kernels().launch_noise(u, 12345)
    u = u.double().cpu()
    assert torch.equal(u, fused_uniform_reference(12345, u.numel()))
    k = u * 2.0**23 - 0.5
    assert torch.equal(k, k.round()) and 0 < u.min() and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)


@runs_kernels
def test_fraction_dropped_matches_p_and_seeds_differ_between_calls():
    x = torch.ones(200, 300, device=DEVICE)
    p_logit = torch.tensor(math.log(0.3 / 0.7), device=DEVICE)
    torch.manual_seed(0)
    y1 = fused.fused_concrete_dropout(
        x, p_logit, temperature=0.1, eps=1e-6, channelwise=False, channel_dim=1, save_output=False
    )
    y2 = fused.fused_concrete_dropout(
        x, p_logit, temperature=0.1, eps=1e-6, channelwise=False, channel_dim=1, save_output=False
    )
    assert not torch.equal(y1, y2)
    # keep < 1/2 <=> z > 1/2 <=> logistic > -logit(p): probability exactly p at any temperature.
    dropped = (y1 * 0.7 < 0.5).double().mean().item()
    assert abs(dropped - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x.numel())
    torch.manual_seed(0)
    y3 = fused.fused_concrete_dropout(
        x, p_logit, temperature=0.1, eps=1e-6, channelwise=False, channel_dim=1, save_output=False
    )
    assert torch.equal(y1, y3)  # torch.manual_seed makes it repeatable


@runs_kernels
@pytest.mark.parametrize("logit", [-50.0, 50.0])
def test_half_precision_saturates_and_clamp_is_straight_through(logit):
    x = torch.randn(64, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    p_logit = torch.tensor(logit, device=DEVICE, requires_grad=True)
    y, _ = _run(x, p_logit, temperature=0.1)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(p_logit.grad)


@runs_kernels
@pytest.mark.parametrize("logit", [-6.0, 6.0])
def test_logit_beyond_the_bound_uses_the_bound(logit):
    # eps = 0.01 bounds p to [0.01, 0.99]: theta = clamp(logit, -b, b) with b = log(0.99 / 0.01), written out
    # here, so a wrong bound (or none) in the kernels' launch parameters changes every output value.
    eps, t = 0.01, 0.5
    bound = math.log((1 - eps) / eps)
    x = torch.randn(41, 29, device=DEVICE)
    p_logit = torch.tensor(logit, device=DEVICE)
    y, seed = _run(x, p_logit, temperature=t, eps=eps)
    u = _noise(seed, x.numel()).view_as(x).double()
    theta = max(-bound, min(bound, logit))
    keep = torch.sigmoid(-(theta + torch.log(u) - torch.log1p(-u)) / t)
    expected = x.double() * keep / (1 - 1 / (1 + math.exp(-theta)))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)


@runs_kernels
def test_only_the_needed_gradient_is_computed():
    x = torch.randn(10, 20, device=DEVICE)
    p_logit = torch.tensor(0.0, device=DEVICE, requires_grad=True)
    y, _ = _run(x, p_logit, temperature=0.1)
    y.sum().backward()
    assert p_logit.grad is not None and x.grad is None
    x2 = torch.randn(10, 20, device=DEVICE, requires_grad=True)
    y2, _ = _run(x2, torch.tensor(0.0, device=DEVICE), temperature=0.1)
    y2.sum().backward()
    assert x2.grad is not None


@runs_kernels
def test_double_backward_is_refused_not_wrong():
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    p_logit = torch.tensor(0.0, device=DEVICE, requires_grad=True)
    y, _ = _run(x, p_logit, temperature=0.1)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


def test_functorch_transforms_use_the_pytorch_formula():
    seen = []

    def total(x):
        seen.append(fused.supports(x, interpret=True))
        return x.sum()

    torch.func.grad(total)(torch.ones(3))
    assert seen == [False] and fused.supports(torch.ones(3), interpret=True) == (fused._kernels() is not None)


@pytest.mark.parametrize(
    "capability,hip,runs",
    [((6, 0), False, False), ((6, 1), False, False), ((7, 0), False, True), ((7, 5), False, True),
     ((9, 0), False, True), ((9, 4), True, True)],
)
def test_the_kernels_are_taken_only_on_gpus_triton_compiles_for(capability, hip, runs):
    # P100 (6.0) and GTX 10-series (6.1): older than Triton's targets; V100 and later, and AMD GPUs: taken.
    assert fused.triton_runs_on(capability, hip=hip) is runs


@pytest.mark.parametrize("version,taken", [("2.1.0", False), ("2.2.0", False), ("2.3.1", True), ("3.6.0", True)])
def test_the_kernels_need_a_triton_release_they_were_compiled_with(monkeypatch, version, taken):
    # Triton 2.1 and 2.2 (PyTorch 2.1, 2.2) were never compiled against: the sites keep the PyTorch formula there.
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    fused._kernels.cache_clear()
    try:
        assert (fused._kernels() is not None) is taken
        assert fused.supports(torch.randn(4, 4), interpret=True) is taken
    finally:
        monkeypatch.undo()
        fused._kernels.cache_clear()


def test_unsupported_inputs_use_the_pytorch_formula():
    assert not fused.supports(torch.randn(4, 4))  # CPU without the interpreter flag
    assert not fused.supports(torch.randn(4, 4, dtype=torch.float64), interpret=True)
    assert not fused.supports(torch.randn(4, 6).t(), interpret=True)  # neither layout
    assert not fused.supports(torch.randn(0, 3), interpret=True)
    channels_last = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert not fused.supports(channels_last, True, 0, interpret=True)  # channels-last with channel dim 0
    previous = fused.ENABLED
    try:
        fused.ENABLED = False
        assert not fused.supports(torch.randn(4, 4), interpret=True)
    finally:
        fused.ENABLED = previous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sites_take_the_fused_path_on_cuda_and_learn():
    site = ConcreteDropout2d(0.2).cuda().train()
    x = torch.randn(8, 16, 6, 6, device="cuda", requires_grad=True)
    y = site(x)
    assert y.grad_fn is not None and "Fused" in type(y.grad_fn).__name__
    y.square().sum().backward()
    assert site.p_logit.grad is not None and torch.isfinite(site.p_logit.grad)
    with torch.no_grad():
        assert torch.equal(concrete_dropout(x, site.p_logit, training=False), x)
