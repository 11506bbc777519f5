"""Tests for cd_convert.layers against independent facts: finite differences, the paper's formula,
binomial statistics of the mask, nn.Dropout's eval behaviour, numerics at extreme logits. The gradient and
formula tests run on both eager paths: the CPU's host-scalar function (:mod:`cd_convert.host_scalars`) and
the tensor formula other devices use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cd_convert import host_scalars, noise
from cd_convert.layers import (
    DEFAULT_EPS,
    ConcreteDropout,
    ConcreteDropout1d,
    ConcreteDropout2d,
    ConcreteDropout3d,
    clamped_logit,
    concrete_dropout,
    reference_concrete_dropout,
)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _uniform(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # keep u away from 0 and 1 so the finite differences are well conditioned
    return torch.rand(shape, generator=g, dtype=dtype) * 0.98 + 0.01


def _by_hand(x, theta, u, t):
    """The paper's formula written out independently of the library (no clamp: theta within bounds)."""
    p = 1.0 / (1.0 + torch.exp(-theta))
    z = 1.0 / (1.0 + torch.exp(-(theta + torch.log(u) - torch.log(1 - u)) / t))
    return x * (1 - z) / (1 - p)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("t", [0.1, 2.0 / 3.0, 1.0])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_elementwise_gradcheck(t, p, eager_path):
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(_logit(p), dtype=torch.float64, requires_grad=True)
    u = _uniform((3, 5))

    def fn(x_, th_):
        return concrete_dropout(x_, th_, uniform=u, temperature=t)

    assert torch.autograd.gradcheck(fn, (x, theta), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "shape,channel_dim,noise",
    [
        ((2, 3, 4), 1, (2, 3, 1)),  # batched 1d
        ((3, 4), 0, (3, 1)),  # unbatched 1d
        ((2, 3, 4, 5), 1, (2, 3, 1, 1)),  # batched 2d
        ((3, 4, 5), 0, (3, 1, 1)),  # unbatched 2d
        ((2, 2, 3, 2, 2), 1, (2, 2, 1, 1, 1)),  # batched 3d
    ],
)
def test_channelwise_gradcheck(shape, channel_dim, noise):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(_logit(0.2), dtype=torch.float64, requires_grad=True)
    u = _uniform(noise, seed=3)

    def fn(x_, th_):
        return concrete_dropout(x_, th_, uniform=u, temperature=2 / 3, channelwise=True, channel_dim=channel_dim)

    assert torch.autograd.gradcheck(fn, (x, theta), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("channelwise", [False, True])
def test_matches_reference_and_hand_formula_values_and_grads(channelwise, eager_path):
    torch.manual_seed(2)
    t = 0.1 if not channelwise else 2 / 3
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    u = _uniform((4, 3, 1, 1) if channelwise else (4, 3, 5, 5), seed=5)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    th1 = torch.tensor(_logit(0.25), dtype=torch.float64, requires_grad=True)
    th2 = th1.detach().clone().requires_grad_(True)
    y1 = concrete_dropout(x1, th1, uniform=u, temperature=t, channelwise=channelwise)
    y2 = reference_concrete_dropout(x2, th2, u, t)
    y3 = _by_hand(x, torch.tensor(_logit(0.25), dtype=torch.float64), u, t)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y1.detach(), y3, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(x)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(th1.grad, th2.grad, rtol=1e-8, atol=1e-10)


def test_p_logit_gradient_matches_closed_form(eager_path):
    # dy/dtheta = y * (p - z/t), summed against the upstream gradient.
    x = torch.randn(50, dtype=torch.float64)
    u = _uniform((50,), seed=9)
    t = 0.1
    theta = torch.tensor(_logit(0.3), dtype=torch.float64, requires_grad=True)
    y = concrete_dropout(x, theta, uniform=u, temperature=t)
    y.sum().backward()
    th = theta.detach()
    p = torch.sigmoid(th)
    z = torch.sigmoid((th + torch.log(u) - torch.log1p(-u)) / t)
    expected = (y.detach() * (p - z / t)).sum()
    torch.testing.assert_close(theta.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(32, 50), (64, 16384)])  # torch.rand noise, and the packed draw
def test_cpu_site_ignores_a_default_device_context(shape, eager_path):
    # Tensors built inside the site (noise, the logit's gradient) follow x, not `with torch.device(...)`.
    site = ConcreteDropout(0.1)
    x = torch.randn(shape, requires_grad=True)
    with torch.device("meta"):
        y = site(x)
        y.sum().backward()
    assert y.device.type == x.grad.device.type == site.p_logit.grad.device.type == "cpu"
    assert torch.isfinite(site.p_logit.grad) and site.p_logit.grad != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_of_exactly_zero_keeps_the_unit_with_finite_gradients(dtype, eager_path):
    # torch.rand (the CPU's small-mask noise) can return 0: logit(0) = -inf, so z = 0 and the unit is kept
    # with the inverted-dropout scale, the limit of u -> 0; outputs and gradients stay finite.
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    u = _uniform((4, 6), seed=3, dtype=dtype)
    u[0, 0] = u[2, 3] = 0.0
    t, theta0 = 0.1, -1.0
    theta = torch.tensor(theta0, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 6, dtype=dtype)
    y = concrete_dropout(x, theta, uniform=u, temperature=t)
    y.backward(g)
    p = 1.0 / (1.0 + math.exp(-theta0))
    x64, u64, g64 = x.detach().double(), u.double(), g.double()
    zero = u64 == 0
    z = torch.where(zero, torch.zeros_like(u64), torch.sigmoid((theta0 + torch.log(u64) - torch.log1p(-u64)) / t))
    expected_y = x64 * (1 - z) / (1 - p)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.detach().double(), expected_y, **tol)
    torch.testing.assert_close(y.detach().double()[zero], x64[zero] / (1 - p), **tol)
    torch.testing.assert_close(x.grad.double(), g64 * (1 - z) / (1 - p), **tol)
    torch.testing.assert_close(theta.grad.double(), (g64 * expected_y * (p - z / t)).sum(), **tol)
    with torch.no_grad():  # the mask built in place without autograd, and the hard (MC) mask
        relaxed = concrete_dropout(x, theta, uniform=u, temperature=t)
        hard = concrete_dropout(x, theta, uniform=u, sampling="hard")
    torch.testing.assert_close(relaxed.double(), expected_y, **tol)
    assert torch.isfinite(hard).all() and (hard[zero] == 0).all()  # u = 0 < p: dropped


@pytest.mark.parametrize(
    "dtype,channelwise,enabled,expected",
    [
        (torch.float32, False, True, "HostConcreteDropout"),
        (torch.float64, False, True, "HostConcreteDropout"),
        (torch.float32, False, False, "_EagerConcreteDropoutFunction"),
        (torch.float32, True, True, "_EagerConcreteDropoutFunction"),  # channel-wise mask: the tensor formula
        (torch.bfloat16, False, True, "_EagerConcreteDropoutFunction"),  # 16-bit input: fp32 mask, tensor formula
    ],
)
def test_cpu_calls_take_the_host_path_where_it_applies(monkeypatch, dtype, channelwise, enabled, expected):
    monkeypatch.setattr(host_scalars, "ENABLED", enabled)
    x = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    y = concrete_dropout(x, torch.tensor(-1.0, requires_grad=True), channelwise=channelwise)
    assert type(y.grad_fn).__name__.startswith(expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [0.1, 2.0 / 3.0])
def test_calls_without_gradient_follow_the_formula_on_the_drawn_noise(monkeypatch, dtype, t):
    # Monte Carlo prediction (no_grad) and a held rate on an input that needs no gradient: the host path's mask
    # without an autograd node. The site draws torch.rand below the packed-draw size, so re-seeding and
    # drawing gives the noise it used.
    x = torch.randn(6, 9, dtype=dtype)
    theta = _logit(0.2)
    held = torch.tensor(theta, dtype=dtype)  # requires_grad off: the rate is held
    outputs = {}
    for enabled in (True, False):
        monkeypatch.setattr(host_scalars, "ENABLED", enabled)
        torch.manual_seed(11)
        with torch.no_grad():
            predicted = concrete_dropout(x, held.clone().requires_grad_(), temperature=t)
        torch.manual_seed(11)
        with_held_rate = concrete_dropout(x, held, temperature=t)  # grad mode, nothing needs a gradient
        assert predicted.grad_fn is None and with_held_rate.grad_fn is None
        assert torch.equal(predicted, with_held_rate)
        outputs[enabled] = predicted
    torch.manual_seed(11)
    u = torch.rand(6, 9, dtype=dtype)
    expected = _by_hand(x.double(), torch.tensor(theta, dtype=torch.float64), u.double(), t)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for enabled, y in outputs.items():
        torch.testing.assert_close(y.double(), expected, **tol)
    assert torch.equal(x, x.clone())  # the input is left as it was


@pytest.mark.parametrize("logit", [30.0, -30.0])
def test_calls_without_gradient_use_the_clamped_logit_beyond_the_bound(logit, eager_path):
    # The site's own noise (re-drawn from the seed), a held logit past the bound: it acts as the bound.
    x = torch.randn(6, 9, dtype=torch.float64)
    torch.manual_seed(5)
    with torch.no_grad():
        y = concrete_dropout(x, torch.tensor(logit, dtype=torch.float64), temperature=0.1)
    torch.manual_seed(5)
    u = torch.rand(6, 9, dtype=torch.float64)
    bound = math.log((1 - DEFAULT_EPS) / DEFAULT_EPS)
    expected = _by_hand(x, torch.tensor(math.copysign(bound, logit), dtype=torch.float64), u, 0.1)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-12)


def test_calls_without_gradient_take_the_host_path_only_where_it_applies(monkeypatch):
    calls = []
    real = host_scalars.masked_without_grad
    monkeypatch.setattr(host_scalars, "masked_without_grad", lambda *a: calls.append(1) or real(*a))
    logit = torch.tensor(-1.0, requires_grad=True)
    with torch.no_grad():
        concrete_dropout(torch.randn(2, 3), logit)
        assert len(calls) == 1
        concrete_dropout(torch.randn(2, 3, 4, 4), logit, channelwise=True)  # channel-wise: the tensor formula
        concrete_dropout(torch.randn(2, 3, dtype=torch.bfloat16), logit)  # 16-bit: fp32 mask, tensor formula
        concrete_dropout(torch.randn(2, 3), logit, sampling="hard")  # Bernoulli masks: not this path
        assert len(calls) == 1
    y = concrete_dropout(torch.randn(2, 3, requires_grad=True), logit.detach())  # x needs its gradient
    assert type(y.grad_fn).__name__.startswith("HostConcreteDropout") and len(calls) == 1
    monkeypatch.setattr(host_scalars, "ENABLED", False)
    with torch.no_grad():
        concrete_dropout(torch.randn(2, 3), logit)
    assert len(calls) == 1


def test_host_path_keeps_the_noise_private_and_second_derivatives_equal_the_tensor_path(monkeypatch):
    # A gradient penalty: d/dx of sum((dL/dx)^2), L = sum(y^2), through the site, on both paths.
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    logit = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    u = _uniform((5, 7))
    u_before = u.clone()
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(host_scalars, "ENABLED", enabled)
        y = concrete_dropout(x, logit, uniform=u, temperature=0.1)
        assert type(y.grad_fn).__name__.startswith("HostConcreteDropout" if enabled else "_Eager")
        grad_x, grad_logit = torch.autograd.grad(y.square().sum(), (x, logit), create_graph=True)
        results.append((grad_logit.detach(), *torch.autograd.grad(grad_x.square().sum(), (x, logit))))
    assert torch.equal(u, u_before)  # the mask is built in place on a copy, never on the caller's noise
    for host, tensor in zip(*results):
        torch.testing.assert_close(host, tensor, rtol=1e-10, atol=1e-12)
    # By hand: y = x m, dL/dx = 2 x m^2, d/dx sum((2 x m^2)^2) = 8 x m^4.
    m = (y / x).detach()
    torch.testing.assert_close(results[0][1], 8 * x.detach() * m**4, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- module forms


@pytest.mark.parametrize(
    "cls,shape",
    [
        (ConcreteDropout, (4, 7)),
        (ConcreteDropout, (7,)),
        (ConcreteDropout1d, (4, 3, 6)),
        (ConcreteDropout1d, (3, 6)),
        (ConcreteDropout2d, (4, 3, 5, 5)),
        (ConcreteDropout2d, (3, 5, 5)),
        (ConcreteDropout3d, (2, 3, 2, 4, 4)),
        (ConcreteDropout3d, (3, 2, 4, 4)),
    ],
)
def test_modules_batched_unbatched_shape_and_grad(cls, shape):
    torch.manual_seed(3)
    m = cls(init_p=0.3)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.p_logit.grad is not None and m.p_logit.grad.item() != 0.0


@pytest.mark.parametrize(
    "cls,shape,spatial_dims",
    [
        (ConcreteDropout1d, (8, 6, 20), (2,)),
        (ConcreteDropout1d, (6, 20), (1,)),
        (ConcreteDropout2d, (8, 6, 5, 5), (2, 3)),
        (ConcreteDropout2d, (6, 5, 5), (1, 2)),
        (ConcreteDropout3d, (4, 6, 3, 4, 4), (2, 3, 4)),
        (ConcreteDropout3d, (6, 3, 4, 4), (1, 2, 3)),
    ],
)
def test_channelwise_mask_constant_over_spatial_positions(cls, shape, spatial_dims):
    torch.manual_seed(4)
    m = cls(init_p=0.5)
    x = torch.ones(shape)
    y = m(x)  # y = keep factor, one per (sample, channel)
    ref = y.amax(dim=spatial_dims, keepdim=True)
    assert torch.equal(y, ref.expand_as(y))
    # and not constant over channels (relaxed masks differ per channel)
    assert y.flatten().unique().numel() > 1


def test_elementwise_mask_differs_per_element():
    m = ConcreteDropout(0.5)
    y = m(torch.ones(4, 3, 5, 5))
    assert y.flatten().unique().numel() > 100


def test_conv2d_site_wrong_rank_raises():
    m = ConcreteDropout2d()
    with pytest.raises(ValueError, match="ConcreteDropout2d expects a 3-D or 4-D input"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="got shape"):
        m(torch.randn(1, 2, 3, 4, 5))
    with pytest.raises(ValueError):
        ConcreteDropout1d()(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError):
        ConcreteDropout3d()(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    "cls,shape",
    [
        (ConcreteDropout, (3, 4)),
        (ConcreteDropout2d, (2, 3, 4, 4)),
        (ConcreteDropout1d, (2, 3, 4)),
        (ConcreteDropout3d, (2, 3, 2, 2, 2)),
    ],
)
def test_eval_is_identity_like_nn_dropout(cls, shape):
    m = cls(0.4).eval()
    x = torch.randn(shape)
    y = m(x)
    assert y is x
    ref = nn.Dropout(0.4).eval()
    assert ref(x) is x  # same contract as torch's dropout
    # also through the functional form
    assert concrete_dropout(x, m.p_logit, training=False) is x


def test_fraction_dropped_at_temperature_01():
    # Exact fact: z > 1/2  <=>  logit(u) > -theta  <=>  u > 1 - p, at any temperature; z > 1/2 <=> y * (1 - p) < 1/2.
    n = 400_000
    for p in (0.1, 0.5):
        # Controlled noise: the quantile grid u_i = (i + 1/2) / n, of which exactly n * p lie above 1 - p (the
        # nearest grid points are 1.25e-6 from 1 - p, far beyond float64 error).
        grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        for with_grad in (False, True):  # the no-grad path (MC prediction) and the autograd one (training)
            theta = torch.tensor(_logit(p), dtype=torch.float64, requires_grad=with_grad)
            y = concrete_dropout(torch.ones(n, dtype=torch.float64), theta, uniform=grid, temperature=0.1)
            assert int((y.detach() * (1 - p) < 0.5).sum()) == round(n * p), with_grad
        # The module's own noise (seeded): the fraction is p within five binomial standard errors.
        torch.manual_seed(5)
        y = ConcreteDropout(p)(torch.ones(n))
        frac = (y * (1 - p) < 0.5).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (p, frac)


@pytest.mark.parametrize(
    "cls,shape,noise_shape",
    [
        (ConcreteDropout, (6, 7), (6, 7)),
        (ConcreteDropout2d, (3, 4, 2, 2), (3, 4, 1, 1)),
        (ConcreteDropout1d, (4, 5), (4, 1)),  # unbatched: the channel is dim 0
    ],
)
def test_module_output_is_the_formula_on_the_noise_it_draws(cls, shape, noise_shape):
    """In training a site draws one uniform of the mask's shape from the global generator (CPU float32:
    :func:`cd_convert.noise.uniform`) and returns the paper's formula on it."""
    m = cls(0.3).train()
    x = torch.randn(shape)
    torch.manual_seed(13)
    y = m(x)
    torch.manual_seed(13)
    u = noise.uniform(noise_shape, device=torch.device("cpu"), dtype=torch.float32).double()
    expected = _by_hand(x.double(), torch.tensor(m.p_logit.item(), dtype=torch.float64), u, m.temperature)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


def test_channelwise_fraction_dropped():
    torch.manual_seed(6)
    p = 0.3
    m = ConcreteDropout2d(p, temperature=0.1)
    y = m(torch.ones(2000, 100, 2, 2))
    frac = (y[:, :, 0, 0] * (1 - p) < 0.5).double().mean().item()
    n = 200_000
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_output_mean_approximately_unbiased():
    torch.manual_seed(7)
    # E[1 - z] under u ~ U(0, 1), by the midpoint rule on a fine grid of u.
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    for p in (0.1, 0.3, 0.5):
        m = ConcreteDropout(p)  # t = 0.1
        x = torch.rand(500_000) + 1.0
        y = m(x).double()
        theta = m.p_logit.item()
        keep_mean = torch.sigmoid(-(theta + torch.log(grid) - torch.log1p(-grid)) / 0.1).mean().item()
        # E[y] = E[x] E[1 - z] / (1 - p) (x and the mask independent), within five standard errors.
        expected = x.double().mean().item() * keep_mean / (1 - torch.sigmoid(torch.tensor(theta)).item())
        assert abs(y.mean().item() - expected) < 5 * y.std().item() / math.sqrt(y.numel())
        # at t=0.1 the relaxation's mean of z is close to p: within 3% of the input mean
        assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.03)


def test_no_in_place_change_of_input(eager_path):
    torch.manual_seed(8)
    for m, shape in ((ConcreteDropout(0.3), (5, 6)), (ConcreteDropout2d(0.3), (2, 3, 4, 4))):
        x = torch.randn(shape)
        before = x.clone()
        y = m(x)
        assert torch.equal(x, before)
        assert y.data_ptr() != x.data_ptr()


def test_no_in_place_with_requires_grad_and_relu_after(eager_path):
    torch.manual_seed(9)
    lin = nn.Linear(6, 6)
    m = ConcreteDropout(0.3)
    x = torch.randn(4, 6, requires_grad=True)
    h = torch.relu(lin(x))
    h_before = h.detach().clone()
    y = torch.relu(m(h))
    assert torch.equal(h.detach(), h_before)
    y.sum().backward()  # would fail if the ReLU output were modified in place
    assert x.grad is not None and m.p_logit.grad is not None
    # relu -> site -> relu in place also fine
    h2 = torch.relu(lin(x))
    out = nn.ReLU(inplace=True)(m(h2))
    out.sum().backward()


# --------------------------------------------------------------------------- dtypes, numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
@pytest.mark.parametrize("cls,shape", [(ConcreteDropout, (4, 8)), (ConcreteDropout2d, (2, 3, 4, 4))])
def test_output_dtype_equals_input_dtype(dtype, cls, shape, eager_path):
    m = cls(0.2)
    x = torch.randn(shape).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.device == x.device
    m.sampling = "hard"
    m.eval()
    assert m(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logit", [50.0, -50.0, 1e4, -1e4])
def test_half_precision_extreme_logits_finite(dtype, logit):
    from cd_convert.collector import Application, Collector
    from cd_convert.prior import RegularizerScale

    torch.manual_seed(10)
    for cls, shape in ((ConcreteDropout, (4, 16)), (ConcreteDropout2d, (2, 3, 4, 4))):
        m = cls(0.1, dtype=dtype)
        with torch.no_grad():
            m.p_logit.fill_(logit)
        x = torch.randn(shape).to(dtype).requires_grad_(True)
        y = m(x)
        assert torch.isfinite(y).all()
        y.float().sum().backward()
        assert torch.isfinite(x.grad.float()).all()
        assert torch.isfinite(m.p_logit.grad.float()).all()
        # p is reported in >= fp32 even for a 16-bit logit: in [eps, 1 - eps], never exactly 0 or 1
        assert m.p.dtype == torch.float32
        assert DEFAULT_EPS * 0.99 <= m.p.item() and 1 - m.p.item() >= 0.9 * DEFAULT_EPS
        root = nn.Sequential(m)
        col = Collector(applications=[Application("0", (), 16)], scale=RegularizerScale(1e-4, 1e-3, ""))
        reg = col.regularization(root)
        assert reg.dtype == torch.float32 and torch.isfinite(reg)


def test_noise_on_input_dtype_and_device_and_generator_reproducible():
    theta = torch.tensor(_logit(0.3))
    x = torch.randn(100, dtype=torch.float64)
    g1 = torch.Generator().manual_seed(11)
    g2 = torch.Generator().manual_seed(11)
    y1 = concrete_dropout(x, theta, generator=g1)
    y2 = concrete_dropout(x, theta, generator=g2)
    assert torch.equal(y1, y2) and y1.dtype == torch.float64


# --------------------------------------------------------------------------- p, clamp, init


def test_p_property_tracks_logit():
    m = ConcreteDropout(0.1)
    assert m.p.item() == pytest.approx(0.1, rel=1e-6)
    with torch.no_grad():
        m.p_logit.fill_(_logit(0.42))
    assert m.p.item() == pytest.approx(0.42, rel=1e-6)
    with torch.no_grad():
        m.p_logit.add_(1.0)
    assert m.p.item() == pytest.approx(1 / (1 + math.exp(-(_logit(0.42) + 1))), rel=1e-6)
    # p is differentiable w.r.t. the logit
    m.p.backward()
    assert m.p_logit.grad is not None
    for extreme in (100.0, -100.0, 1e6, -1e6):
        with torch.no_grad():
            m.p_logit.fill_(extreme)
        p = m.p.item()
        # fp32 cannot hold 1 - 1e-6 exactly (rounds to 1 - 9.5e-7): allow that rounding, never 0 or 1
        assert DEFAULT_EPS * (1 - 1e-3) <= p and 1 - p >= 0.9 * DEFAULT_EPS


def test_p_stays_in_eps_bounds_custom_eps():
    m = ConcreteDropout(0.1, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        m.p_logit.fill_(40.0)
    assert m.p.item() == pytest.approx(1 - 1e-3, rel=1e-9)
    with torch.no_grad():
        m.p_logit.fill_(-40.0)
    assert m.p.item() == pytest.approx(1e-3, rel=1e-9)


def test_straight_through_clamp_gradient_beyond_bound(eager_path):
    theta = torch.tensor(100.0, requires_grad=True)
    c = clamped_logit(theta, 1e-6)
    assert c.item() == pytest.approx(math.log1p(-1e-6) - math.log(1e-6), rel=1e-5)
    c.backward()
    assert theta.grad.item() == 1.0
    # through the whole layer: a logit far beyond the bound still receives a gradient
    m = ConcreteDropout(0.1)
    with torch.no_grad():
        m.p_logit.fill_(-60.0)
    m(torch.randn(64, 8)).pow(2).sum().backward()
    assert m.p_logit.grad is not None and m.p_logit.grad.item() != 0.0


@pytest.mark.parametrize("logit", [-60.0, 60.0])
def test_training_output_uses_the_clamped_logit_beyond_the_bound(logit, eager_path):
    # p is held in [eps, 1 - eps]: a logit past the bound acts as the bound itself, log((1 - eps) / eps).
    x = torch.ones(6, dtype=torch.float64)
    u = torch.tensor([1e-7, 1e-3, 0.3, 0.7, 1 - 1e-3, 1 - 1e-7], dtype=torch.float64)
    # A logit that requires grad: the training path (an autograd function), not the no-grad one.
    y = concrete_dropout(x, torch.tensor(logit, dtype=torch.float64, requires_grad=True), uniform=u, temperature=0.1)
    assert y.grad_fn is not None
    y = y.detach()
    bound = math.log((1 - DEFAULT_EPS) / DEFAULT_EPS)
    expected = _by_hand(x, torch.tensor(math.copysign(bound, logit), dtype=torch.float64), u, 0.1)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(y, _by_hand(x, torch.tensor(logit, dtype=torch.float64), u, 0.1))


def test_init_p_float():
    for p in (0.01, 0.1, 0.5, 0.9):
        m = ConcreteDropout(p)
        assert m.p.item() == pytest.approx(p, rel=1e-5)
        assert m.init_p == (p, p)


def test_init_p_range_draws_within_range_in_logit_space():
    lo, hi = 0.05, 0.5
    draws = []
    for seed in range(200):
        m = ConcreteDropout((lo, hi))
        g = torch.Generator().manual_seed(seed)
        m.reset_parameters(generator=g)
        draws.append(m.p_logit.item())
    draws = torch.tensor(draws)
    assert (draws >= _logit(lo) - 1e-5).all() and (draws <= _logit(hi) + 1e-5).all()
    # uniform in logit space: mean of the logit near the midpoint of the logits (not of the rates)
    mid = 0.5 * (_logit(lo) + _logit(hi))
    width = _logit(hi) - _logit(lo)
    assert abs(draws.mean().item() - mid) < 4 * width / math.sqrt(12 * 200)
    assert draws.std().item() > 0.2 * width
    # list form also accepted
    assert ConcreteDropout([0.1, 0.2]).init_p == (0.1, 0.2)


@pytest.mark.parametrize(
    "bad,exc,msg",
    [
        (0.0, ValueError, r"strictly inside \(0, 1\)"),
        (1.0, ValueError, r"strictly inside \(0, 1\)"),
        (-0.1, ValueError, r"strictly inside \(0, 1\)"),
        (1.5, ValueError, r"strictly inside \(0, 1\)"),
        (True, TypeError, "must be a float"),
        ("0.1", TypeError, "must be a float"),
        ((0.1, 0.2, 0.3), ValueError, r"\(low, high\) pair"),
        ((0.1,), ValueError, r"\(low, high\) pair"),
        ((0.5, 0.1), ValueError, "low <= high"),
        ((0.0, 0.5), ValueError, r"init_p low must lie strictly inside"),
        ((0.1, 1.0), ValueError, r"init_p high must lie strictly inside"),
    ],
)
def test_init_p_refusals(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        ConcreteDropout(bad)


@pytest.mark.parametrize(
    "bad,exc",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_temperature_refusals(bad, exc):
    with pytest.raises(exc, match="temperature must be"):
        ConcreteDropout(0.1, temperature=bad)
    with pytest.raises(exc, match="temperature must be"):
        ConcreteDropout2d(0.1, temperature=bad)


def test_default_temperatures():
    assert ConcreteDropout().temperature == pytest.approx(0.1)
    assert ConcreteDropout2d().temperature == pytest.approx(2 / 3)
    assert ConcreteDropout(temperature=0.5).temperature == 0.5


def test_unknown_sampling_refused():
    with pytest.raises(ValueError, match="sampling must be one of"):
        concrete_dropout(torch.randn(3), torch.tensor(0.0), sampling="soft")


# --------------------------------------------------------------------------- hard sampling


@pytest.mark.parametrize("cls,shape", [(ConcreteDropout, (200, 50)), (ConcreteDropout2d, (50, 40, 3, 3))])
def test_hard_sampling_exact_zero_or_scaled(cls, shape):
    torch.manual_seed(12)
    p = 0.3
    m = cls(p, dtype=torch.float64).eval()
    m.sampling = "hard"
    x = torch.rand(shape, dtype=torch.float64) + 0.5
    y = m(x)
    scaled = x / (1 - m.p.detach())
    is_zero = y == 0
    is_scaled = torch.isclose(y, scaled, rtol=1e-12, atol=0)
    assert (is_zero | is_scaled).all()
    frac = is_zero.double().mean().item()
    n = is_zero.numel() if cls is ConcreteDropout else shape[0] * shape[1]
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    if cls is ConcreteDropout2d:
        assert torch.equal(is_zero, is_zero[:, :, :1, :1].expand_as(is_zero))


def test_hard_sampling_functional_given_noise():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    u = torch.tensor([0.1, 0.2, 0.6, 0.9], dtype=torch.float64)
    theta = torch.tensor(_logit(0.5), dtype=torch.float64)
    y = concrete_dropout(x, theta, uniform=u, sampling="hard")
    # dropped where u < p
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 6.0, 8.0], dtype=torch.float64))


def test_sampling_attribute_samples_in_eval():
    m = ConcreteDropout(0.5).eval()
    x = torch.ones(1000)
    assert m(x) is x
    m.sampling = "relaxed"
    assert not torch.equal(m(x), x)


@pytest.mark.parametrize("channelwise", [False, True])
def test_saved_output_path_has_the_same_gradients(channelwise, eager_path):
    """save_output=True keeps y instead of x: gradients must not change."""
    from cd_convert.layers import concrete_dropout

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    logit = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    u = torch.rand((3, 4, 1) if channelwise else (3, 4, 5), dtype=torch.float64)
    grads = []
    for save_output in (False, True):
        y = concrete_dropout(x, logit, temperature=0.3, channelwise=channelwise, uniform=u, save_output=save_output)
        grads.append(torch.autograd.grad((y * torch.arange(60, dtype=torch.float64).view(3, 4, 5)).sum(), (x, logit)))
    torch.testing.assert_close(grads[0], grads[1])

    def check(a, b):
        return concrete_dropout(a, b, temperature=0.3, channelwise=channelwise, uniform=u, save_output=True)

    assert torch.autograd.gradcheck(check, (x, logit))


def test_converter_keeps_output_only_where_weight_layers_alone_read_it():
    import cd_convert

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.drop_res = nn.Dropout(0.1)
            self.drop = nn.Dropout(0.1)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc1(x)
            h = self.drop_res(h)
            h += x  # in place on the site's output: the site must keep its input instead
            return self.fc2(self.drop(h))

    converted = cd_convert.convert(Net(), dataset_size=10)
    assert converted.drop.save_output and not converted.drop_res.save_output
    converted.train()
    converted(torch.randn(3, 4)).sum().backward()  # no "modified by an inplace operation" error
    assert converted.drop_res.p_logit.grad is not None


def test_activation_checkpointing_recomputes_the_same_masks(eager_path):
    # torch.utils.checkpoint replays the forward pass in the backward with the RNG state restored: the sites must
    # draw the same noise again, so the gradients equal those of the run without checkpointing.
    import copy

    import cd_convert
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    model = cd_convert.convert(net, targets=[nn.Linear], dataset_size=100)
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    plain(x).sum().backward()
    torch.manual_seed(1)
    checkpoint(checkpointed, x, use_reentrant=False).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
