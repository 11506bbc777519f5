"""Tests for cd_convert.noise: the packed CPU float32 uniform draw against independent facts (its exact
lattice, bit frequencies and moments of U(0, 1) within binomial/CLT error), reproducibility, and the
fall-back to ``torch.rand`` (identical values) for other dtypes and for small draws."""

from __future__ import annotations

import math

import pytest
import torch

from cd_convert import noise
from cd_convert.layers import ConcreteDropout, concrete_dropout

CPU = torch.device("cpu")


def _draw(shape, seed=0):
    return noise.uniform(shape, device=CPU, dtype=torch.float32, generator=torch.Generator().manual_seed(seed))


def test_values_lie_on_the_open_symmetric_lattice():
    u = _draw((1000, 777))
    # u = (k + 1/2) * 2**-23 with integer k in [0, 2**23): never 0 or 1, so logit(u) is always finite.
    k = u.double() * 2.0**23 - 0.5
    assert torch.equal(k, k.round())
    assert k.min() >= 0 and k.max() <= 2**23 - 1
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert torch.isfinite(torch.logit(u)).all()
    # The lattice is symmetric: 1 - u is exactly representable and on it.
    k_flip = (1.0 - u).double() * 2.0**23 - 0.5
    assert torch.equal(k_flip, k_flip.round())


def test_every_mantissa_bit_is_fair_and_moments_match_uniform():
    n = 1 << 20
    u = _draw((n,), seed=3)
    k = (u.double() * 2.0**23 - 0.5).round().long()
    tolerance = 5 * math.sqrt(0.25 / n)  # five binomial standard errors
    for bit in range(23):
        assert abs(((k >> bit) & 1).double().mean().item() - 0.5) < tolerance, bit
    # Mean 1/2 (sd 1/sqrt(12 n)) and variance 1/12 (sd of the sample variance: sqrt(1/180 / n)).
    assert abs(u.double().mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(u.double().var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # Neighbours are independent: the lag-1 correlation of U(0,1) draws is 0 within 5/sqrt(n).
    centred = u.double() - 0.5
    correlation = (centred[1:] * centred[:-1]).mean().item() * 12
    assert abs(correlation) < 5 / math.sqrt(n)


def test_ten_equal_bins_pass_a_chi_square_test():
    n = 200_000
    counts = torch.histc(_draw((n,), seed=5), bins=10, min=0.0, max=1.0)
    chi2 = (((counts - n / 10) ** 2) / (n / 10)).sum().item()
    assert chi2 < 33.7  # the 0.9999 quantile of chi-square with 9 degrees of freedom


# Small shapes (torch.rand) and packed ones with an odd element count (the last 64-bit word half used).
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (7, 1, 3), (2, 3, 4, 5), (16385,), (131, 127), (2, 3, 4, 683)])
def test_shapes_including_odd_and_empty(shape):
    u = _draw(shape)
    assert u.shape == shape and u.dtype == torch.float32 and u.is_contiguous()
    if u.numel():
        assert 0 <= u.min() and u.max() < 1
    if u.numel() >= noise.PACKED_MIN_NUMEL:  # the packed draw: on the open lattice
        k = u.double() * 2.0**23 - 0.5
        assert torch.equal(k, k.round()) and u.min() > 0


def test_small_draws_are_torch_rand_and_large_ones_the_packed_lattice():
    below, at = noise.PACKED_MIN_NUMEL - 1, noise.PACKED_MIN_NUMEL
    assert torch.equal(_draw((below,), seed=4), torch.rand((below,), generator=torch.Generator().manual_seed(4)))
    packed = _draw((at,), seed=4)
    assert not torch.equal(packed, torch.rand((at,), generator=torch.Generator().manual_seed(4)))
    k = packed.double() * 2.0**23 - 0.5
    assert torch.equal(k, k.round())


@pytest.mark.parametrize("numel", [1001, 20001])
def test_generator_state_determines_the_draw_and_is_advanced(numel):
    g = torch.Generator().manual_seed(7)
    first = noise.uniform((numel,), device=CPU, dtype=torch.float32, generator=g)
    second = noise.uniform((numel,), device=CPU, dtype=torch.float32, generator=g)
    assert not torch.equal(first, second)
    assert torch.equal(first, _draw((numel,), seed=7))


@pytest.mark.parametrize("shape", [(64, 33), (512, 33)])
def test_global_seed_makes_runs_repeatable(shape):
    torch.manual_seed(21)
    a = noise.uniform(shape, device=CPU, dtype=torch.float32)
    torch.manual_seed(21)
    b = noise.uniform(shape, device=CPU, dtype=torch.float32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_are_exactly_torch_rand(dtype):
    g1 = torch.Generator().manual_seed(9)
    g2 = torch.Generator().manual_seed(9)
    got = noise.uniform((5, 6), device=CPU, dtype=dtype, generator=g1)
    assert torch.equal(got, torch.rand((5, 6), dtype=dtype, generator=g2))


def test_under_torch_compile_the_ordinary_op_is_traced():
    compiled = torch.compile(lambda x: noise.uniform(x.shape, device=x.device, dtype=x.dtype) * x, backend="eager")
    y = compiled(torch.ones(4, 8))
    assert y.shape == (4, 8) and ((y >= 0) & (y < 1)).all()


# ---------------------------------------------------------------- the mask without autograd


@pytest.mark.parametrize("channelwise,shape", [(False, (40, 30)), (True, (6, 5, 4, 4))])
def test_relaxed_mask_without_grad_equals_the_autograd_path(channelwise, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.4, dtype=torch.float64)
    noise_shape = (shape[0], shape[1], 1, 1) if channelwise else shape
    u = torch.rand(noise_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    kept = u.clone()
    t = 2 / 3 if channelwise else 0.1
    with_grad = concrete_dropout(x, theta, uniform=u, temperature=t, channelwise=channelwise)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = concrete_dropout(x, theta, uniform=u, temperature=t, channelwise=channelwise)
    assert without.grad_fn is None
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(u, kept)  # the caller's noise is not overwritten by the in-place mask computation


def test_mc_sampling_site_in_inference_mode():
    p, t = 0.3, 0.1
    site = ConcreteDropout(p).eval()
    site.sampling = "relaxed"
    with torch.inference_mode():
        y = site(torch.ones(500, 300))
    # y = (1 - z) / (1 - p) < 1/2  <=>  z > c = 1 - (1 - p) / 2  <=>  logistic noise > t * logit(c) - logit(p),
    # which has probability sigmoid(logit(p) - t * logit(c)).
    c = 1 - (1 - p) / 2
    expected = 1 / (1 + math.exp(-(math.log(p / (1 - p)) - t * math.log(c / (1 - c)))))
    n = y.numel()
    assert abs((y < 0.5).double().mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
