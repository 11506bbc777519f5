"""The Triton kernels behind :mod:`cd_convert.fused` (imported only when Triton is installed).

Notation as in :mod:`cd_convert.layers`: theta = clamped logit of p, L = logit(u) logistic noise,
keep = 1 - z = sigmoid(-(theta + L) / t), scale = 1 / (1 - p) = 1 + exp(theta), y = x * keep * scale.
Gradients (see ``_ConcreteDropoutFunction``): dx = g * keep * scale and
d theta = p * sum(g * y) - (sum(g * y) - sum(g * y * keep)) / t.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch_forward", "launch_backward", "launch_noise"]

#: 2**-23: spacing of the noise lattice u = (k + 1/2) * 2**-23.
_LATTICE = tl.constexpr(1.1920928955078125e-07)
_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _clamped_theta(theta_ptr, bound):
    theta = tl.load(theta_ptr).to(tl.float32)
    return tl.minimum(tl.maximum(theta, -bound), bound)


@triton.jit
def _tile(block_start, BLOCK: tl.constexpr):
    """Memory offsets of one block as a ``[BLOCK // 4, 4]`` tile: row g holds elements 4g .. 4g + 3."""
    return block_start + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]


@triton.jit
def _pick(lane, r0, r1, r2, r3):
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def _random_bits(seed, block_start, offsets, inner, channels, CHANNELWISE: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """32 random bits for each element of the ``offsets`` tile: noise index i gets output i % 4 of Philox call i // 4.

    One Philox4x32 call yields four words. Element-wise, noise index = memory index, so each call serves a row
    of four elements (a quarter of the work of one call per element, which made the kernels compute-bound).
    Channel-wise, the elements of a row share one channel's noise and each computes its channel's call.
    """
    if CHANNELWISE:
        if CHANNELS_LAST:
            noise_index = (offsets // (inner * channels)) * channels + offsets % channels
        else:
            noise_index = offsets // inner
        r0, r1, r2, r3 = tl.randint4x(seed, noise_index // 4)
        bits = _pick(noise_index % 4, r0, r1, r2, r3)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, block_start // 4 + tl.arange(0, BLOCK // 4))
        bits = _pick(tl.arange(0, 4)[None, :], r0[:, None], r1[:, None], r2[:, None], r3[:, None])
    return bits


@triton.jit
def _uniform(bits):
    """u = (k + 1/2) * 2**-23 from the low 23 of 32 random bits: the lattice of :mod:`cd_convert.noise`."""
    return ((bits & 0x7FFFFF).to(tl.float32) + 0.5) * _LATTICE


@triton.jit
def _keep(bits, theta, inv_t):
    """The relaxed keep-mask 1 - z from 32 random bits."""
    u = _uniform(bits)
    logistic = tl.log(u) - tl.log(1.0 - u)
    # sigmoid(-s) = 1 / (1 + exp(s)): exp overflows to inf for large s, giving exactly 0 (dropped).
    return 1.0 / (1.0 + tl.exp((theta + logistic) * inv_t))


@triton.jit
def _forward(x_ptr, y_ptr, theta_ptr, seed_ptr, n, inv_t, bound, inner, channels, CHANNELWISE: tl.constexpr,
             CHANNELS_LAST: tl.constexpr, SATURATE_FP16: tl.constexpr, BLOCK: tl.constexpr):
    block_start = tl.program_id(0) * BLOCK
    offsets = _tile(block_start, BLOCK)
    in_range = offsets < n
    theta = _clamped_theta(theta_ptr, bound)
    seed = tl.load(seed_ptr)
    bits = _random_bits(seed, block_start, offsets, inner, channels, CHANNELWISE, CHANNELS_LAST, BLOCK)
    keep = _keep(bits, theta, inv_t)
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    y = x * keep * (1.0 + tl.exp(theta))
    if SATURATE_FP16:
        # Saturate instead of overflowing (the scale reaches 1/eps); comparisons keep NaN as NaN.
        y = tl.where(y > _FP16_MAX, _FP16_MAX, tl.where(y < -_FP16_MAX, -_FP16_MAX, y))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _backward(g_ptr, act_ptr, gx_ptr, partial_ptr, theta_ptr, seed_ptr, n, num_blocks, inv_t, bound, inner,
              channels, CHANNELWISE: tl.constexpr, CHANNELS_LAST: tl.constexpr, SAVED_OUTPUT: tl.constexpr,
              NEED_X: tl.constexpr, NEED_LOGIT: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    block_start = block * BLOCK
    offsets = _tile(block_start, BLOCK)
    in_range = offsets < n
    theta = _clamped_theta(theta_ptr, bound)
    scale = 1.0 + tl.exp(theta)
    seed = tl.load(seed_ptr)
    bits = _random_bits(seed, block_start, offsets, inner, channels, CHANNELWISE, CHANNELS_LAST, BLOCK)
    keep = _keep(bits, theta, inv_t)
    g = tl.load(g_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if NEED_X:
        tl.store(gx_ptr + offsets, (g * keep * scale).to(gx_ptr.dtype.element_ty), mask=in_range)
    if NEED_LOGIT:
        activation = tl.load(act_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        if SAVED_OUTPUT:
            gy = g * activation
        else:
            gy = g * activation * keep * scale
        # Per-block partial sums; _finish adds them in a fixed order (no atomics: deterministic).
        tl.store(partial_ptr + block, tl.sum(tl.sum(gy, axis=1), axis=0))
        tl.store(partial_ptr + num_blocks + block, tl.sum(tl.sum(gy * keep, axis=1), axis=0))


@triton.jit
def _finish(partial_ptr, out_ptr, theta_ptr, num_blocks, inv_t, bound, BLOCK: tl.constexpr):
    sum_gy = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gy_keep = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_blocks, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < num_blocks
        sum_gy += tl.load(partial_ptr + index, mask=valid, other=0.0)
        sum_gy_keep += tl.load(partial_ptr + num_blocks + index, mask=valid, other=0.0)
    total = tl.sum(sum_gy, axis=0)
    total_keep = tl.sum(sum_gy_keep, axis=0)
    theta = _clamped_theta(theta_ptr, bound)
    p = 1.0 / (1.0 + tl.exp(-theta))
    grad = p * total - (total - total_keep) * inv_t
    tl.store(out_ptr, grad.to(out_ptr.dtype.element_ty))


def launch_forward(x: Tensor, y: Tensor, p_logit: Tensor, seed: Tensor, inv_t: float, bound: float,
                   channelwise: bool, inner: int, channels: int, channels_last: bool, block: int) -> None:
    """Write ``y`` (same layout as ``x``) from ``x``; ``seed`` is a one-element int64 tensor on ``x``'s device."""
    n = x.numel()
    _forward[(triton.cdiv(n, block),)](
        x, y, p_logit, seed, n, inv_t, bound, inner, channels, CHANNELWISE=channelwise,
        CHANNELS_LAST=channels_last, SATURATE_FP16=x.dtype == torch.float16, BLOCK=block,
    )


def launch_backward(grad_y: Tensor, activation: Tensor, grad_x: "Tensor | None", grad_logit: "Tensor | None",
                    p_logit: Tensor, seed: Tensor, inv_t: float, bound: float, channelwise: bool, inner: int,
                    channels: int, channels_last: bool, saved_output: bool, block: int, finish_block: int) -> None:
    """Write ``grad_x`` and ``grad_logit`` (either may be None: not needed)."""
    n = activation.numel()
    num_blocks = triton.cdiv(n, block)
    partials = torch.empty(2 * num_blocks, device=activation.device, dtype=torch.float32) if grad_logit is not None \
        else grad_y  # an unused placeholder pointer
    _backward[(num_blocks,)](
        grad_y, activation, grad_x if grad_x is not None else grad_y, partials, p_logit, seed, n, num_blocks,
        inv_t, bound, inner, channels, CHANNELWISE=channelwise, CHANNELS_LAST=channels_last, SAVED_OUTPUT=saved_output,
        NEED_X=grad_x is not None, NEED_LOGIT=grad_logit is not None, BLOCK=block,
    )
    if grad_logit is not None:
        _finish[(1,)](partials, grad_logit, p_logit, num_blocks, inv_t, bound, BLOCK=finish_block)


@triton.jit(do_not_specialize=["seed"])
def _noise(u_ptr, seed, n, BLOCK: tl.constexpr):
    block_start = tl.program_id(0) * BLOCK
    offsets = _tile(block_start, BLOCK)
    bits = _random_bits(seed, block_start, offsets, 1, 1, False, False, BLOCK)
    tl.store(u_ptr + offsets, _uniform(bits), mask=offsets < n)


def launch_noise(u: Tensor, seed: int, block: int = 1024) -> None:
    """Fill the float32 tensor ``u`` with the noise of stream ``seed`` at noise indices ``0 .. u.numel()-1``.

    The uniforms a forward pass with this seed used: element i (or, channel-wise, logical channel
    ``n * C + c``) got ``u.flatten()[i]``. The tests use it to compare the kernels with the PyTorch formula.
    """
    n = u.numel()
    _noise[(triton.cdiv(n, block),)](u, seed, n, BLOCK=block)
