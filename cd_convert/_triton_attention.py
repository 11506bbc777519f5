"""The Triton kernels behind :mod:`cd_convert.fused_attention` (imported only when Triton is installed).

Flash attention (online softmax over key blocks, probabilities never stored) with a Concrete Dropout mask
on the attention probabilities, drawn inside the kernels and regenerated from the seed in the backward pass:

    P = softmax(scale * Q K^T + mask),   Pd = P * keep * s,   O = Pd V,
    keep = sigmoid(-(theta + logit(u)) / t),   s = 1 / (1 - p) = 1 + exp(theta).

Backward (``g = dO V^T``, the gradient of ``Pd``; ``delta_i = sum_j g_ij Pd_ij = dO_i . O_i``):
``dV = Pd^T dO``, ``dS = P * (g * keep * s - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, and for
the logit, as for an element-wise site, ``d theta = p * sum(g Pd) - (sum(g Pd) - sum(g Pd keep)) / t``.

Noise: element ``(b, h, i, j)`` of the ``(B, H, L, S)`` probabilities takes word ``j % 4`` of the Philox4x32-10
call with counter ``(i * G + j // 4, b * H + h, 0, 0)`` and key ``(seed, 0)``, where ``G = ceil(S / 4)``, so one
call serves four neighbours of a row; ``u = (k + 1/2) * 2**-23`` with ``k`` its low 23 bits, as everywhere in
cd_convert.
"""

import functools
import math
from typing import Any, Callable, Hashable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._attention_tiles import (
    Tiles, eight_warps_compile, fitting_index, launch_in_fitting_shape, tile_ladder, tiles_for,
)
from ._triton_kernels import _clamped_theta, _finish, _uniform
from .fused import nvidia_capability as _device_capability  # a module name, so the tools can stand in for a GPU

# The kernels' long argument lists stay packed, as in _triton_kernels.py.
# fmt: off
__all__ = ["launch_attention_forward", "launch_attention_backward", "launch_attention_noise", "tiles_for"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LOG2E_HOST = math.log2(math.e)
_FINISH_BLOCK = 1024


@triton.jit
def _random_words(seed, bh, rows, start_n, groups_per_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The 32-bit words of a ``[BLOCK_M, BLOCK_N]`` tile (rows ``rows``, columns ``start_n ..``; start_n % 4 == 0)."""
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    # The counter's words: (i * G + j // 4, b * H + h, 0, 0); i * G + j // 4 < 2**31 (fused_attention.supports).
    c0 = (rows[:, None] * groups_per_row + groups[None, :]).to(tl.uint32, bitcast=True)
    c1 = c0 * 0 + bh.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # join(join(r0, r2), join(r1, r3)) is [M, N/4, 2, 2] whose row-major order is r0, r1, r2, r3.
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_N])


@triton.jit
def _keep(seed, bh, rows, start_n, groups_per_row, theta_log2, inv_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep = sigmoid(-(theta + logit(u)) / t) = 1 / (1 + 2**(theta log2(e) / t + log2(u / (1 - u)) / t))."""
    u = _uniform(_random_words(seed, bh, rows, start_n, groups_per_row, BLOCK_M, BLOCK_N))
    return 1.0 / (1.0 + tl.exp2(theta_log2 + tl.log2(u / (1.0 - u)) * inv_t))


@triton.jit
def _logit_terms(theta_ptr, bound, inv_t):
    """``(theta log2(e) / t, 1 / (1 - p))`` of the clamped logit, the two numbers every kernel needs of it."""
    theta = _clamped_theta(theta_ptr, bound)
    return theta * _LOG2E * inv_t, 1.0 + tl.exp(theta)


@triton.jit
def _scores(
    q, k_t, mask_ptrs, rows, cols, L, S, qk_scale, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``log2(e) * (scale * q k^T + mask)`` for one tile, -inf where a key is masked or out of range.

    MASK_KIND: 0 none, 1 an additive float mask, 2 a boolean mask (True: attend), read as the caller's tensor.
    """
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    valid = (rows[:, None] < L) & (cols[None, :] < S)
    if MASK_KIND == 1:
        s += tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32) * _LOG2E
    if MASK_KIND == 2:
        valid = valid & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _attention_forward(
    Q, K, V, Mask, Out, Lse, theta_ptr, seed_ptr, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh,
    smm, smn, sob, soh, som, sod, H, GROUP, L, S, D, groups_per_row, qk_scale, inv_t, bound,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seed = tl.load(seed_ptr)  # a device tensor: a CUDA graph replays with a new seed
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
        mask=(rows[:, None] < L) & (dims[None, :] < D),
        other=0.0,
    )
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    m_base = Mask + b * smb + h * smh
    theta_log2, scale = _logit_terms(theta_ptr, bound, inv_t)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = tl.minimum(S, start_m + BLOCK_M) if IS_CAUSAL else S
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(
            k_base + cols[None, :] * skn + dims[:, None] * skd,
            mask=(cols[None, :] < S) & (dims[:, None] < D),
            other=0.0,
        )
        s = _scores(
            q, k_t, m_base + rows[:, None] * smm + cols[None, :] * smn, rows, cols, L, S, qk_scale, MASK_KIND,
            IS_CAUSAL, DOT_PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: nothing to rescale
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        keep = _keep(seed, bh, rows, start_n, groups_per_row, theta_log2, inv_t, BLOCK_M, BLOCK_N)
        v = tl.load(
            v_base + cols[:, None] * svn + dims[None, :] * svd,
            mask=(cols[:, None] < S) & (dims[None, :] < D),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot((p * keep).to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # A fully masked row (no key to attend to) gives 0, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    m_final = tl.where(m_i == float("-inf"), 0.0, m_i)
    out = acc * (scale / l_safe)[:, None]
    tl.store(
        Out + b * sob + h * soh + rows[:, None] * som + dims[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=(rows[:, None] < L) & (dims[None, :] < D),
    )
    tl.store(Lse + bh * L + rows, m_final + tl.log2(l_safe), mask=rows < L)


@triton.jit
def _query_rows(Q, dO, Lse, Delta, b, h, bh, rows, dims, L, D, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd):
    """A backward kernel's view of some query rows: ``q``, ``dO``, and their log2-sum-exp and ``delta``."""
    valid = (rows[:, None] < L) & (dims[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd, mask=valid, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + rows[:, None] * sdm + dims[None, :] * sdd, mask=valid, other=0.0)
    lse = tl.load(Lse + bh * L + rows, mask=rows < L, other=0.0)
    delta = tl.load(Delta + bh * L + rows, mask=rows < L, other=0.0)
    return q, do, lse, delta


@triton.jit
def _attention_backward_kv(
    Q, K, V, Mask, dO, Lse, Delta, dK, dV, theta_ptr, seed_ptr, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn,
    svd, smb, smh, smm, smn, sdb, sdh, sdm, sdd, H, HKV, GROUP, L, S, D, groups_per_row, qk_scale, sm_scale, inv_t,
    bound, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV of one key block, summed over the query heads that share it (grouped-query attention)."""
    seed = tl.load(seed_ptr)  # a device tensor: a CUDA graph replays with a new seed
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b, kvh = bkv // HKV, bkv % HKV
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims[None, :] * svd, mask=kv_mask, other=0.0)
    k_t = tl.trans(k)
    theta_log2, scale = _logit_terms(theta_ptr, bound, inv_t)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_m = (start_n // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0  # earlier queries see none of these keys
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        for start_m in range(first_m, L, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_rows(Q, dO, Lse, Delta, b, h, bh, rows, dims, L, D, sqb, sqh, sqm, sqd, sdb,
                                            sdh, sdm, sdd)
            s = _scores(
                q,
                k_t,
                Mask + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn,
                rows, cols, L, S, qk_scale, MASK_KIND, IS_CAUSAL, DOT_PRECISION,
            )
            p = tl.exp2(s - lse[:, None])
            dropped = _keep(seed, bh, rows, start_n, groups_per_row, theta_log2, inv_t, BLOCK_M, BLOCK_N) * scale
            dv += tl.dot(tl.trans((p * dropped).to(do.dtype)), do, input_precision=DOT_PRECISION)
            g_pd = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (g_pd * dropped - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out_mask = (cols[:, None] < S) & (dims[None, :] < D)
    offsets = bkv * S * D + cols[:, None] * D + dims[None, :]  # dK, dV: contiguous (B, HKV, S, D)
    tl.store(dK + offsets, (dk * sm_scale).to(dK.dtype.element_ty), mask=out_mask)
    tl.store(dV + offsets, dv.to(dV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attention_backward_q(
    Q, K, V, Mask, dO, Lse, Delta, dQ, Partial, theta_ptr, seed_ptr, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh,
    svn, svd, smb, smh, smm, smn, sdb, sdh, sdm, sdd, H, GROUP, L, S, D, groups_per_row, num_programs, qk_scale,
    sm_scale, inv_t, bound, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, NEED_LOGIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block, and the block's two partial sums for the logit's gradient."""
    seed = tl.load(seed_ptr)  # a device tensor: a CUDA graph replays with a new seed
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = (rows[:, None] < L) & (dims[None, :] < D)
    q, do, lse, delta = _query_rows(Q, dO, Lse, Delta, b, h, bh, rows, dims, L, D, sqb, sqh, sqm, sqd, sdb, sdh, sdm,
                                    sdd)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    theta_log2, scale = _logit_terms(theta_ptr, bound, inv_t)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sum_g_pd = tl.zeros([BLOCK_M], tl.float32)
    sum_g_pd_keep = tl.zeros([BLOCK_M], tl.float32)
    end_n = tl.minimum(S, start_m + BLOCK_M) if IS_CAUSAL else S
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = (cols[:, None] < S) & (dims[None, :] < D)
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :] * skd, mask=col_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + dims[None, :] * svd, mask=col_mask, other=0.0)
        s = _scores(
            q,
            tl.trans(k),
            Mask + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn,
            rows, cols, L, S, qk_scale, MASK_KIND, IS_CAUSAL, DOT_PRECISION,
        )
        p = tl.exp2(s - lse[:, None])
        keep = _keep(seed, bh, rows, start_n, groups_per_row, theta_log2, inv_t, BLOCK_M, BLOCK_N)
        g_pd = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (g_pd * keep * scale - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if NEED_LOGIT:
            g_y = g_pd * p * keep * scale
            sum_g_pd += tl.sum(g_y, 1)
            sum_g_pd_keep += tl.sum(g_y * keep, 1)
    tl.store(
        dQ + bh * L * D + rows[:, None] * D + dims[None, :], (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_mask
    )
    if NEED_LOGIT:
        # Per-program partial sums, added by _finish in a fixed order (no atomics: deterministic).
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(Partial + program, tl.sum(sum_g_pd, 0))
        tl.store(Partial + num_programs + program, tl.sum(sum_g_pd_keep, 0))


@triton.jit
def _attention_delta(
    Out, dO, Delta, H, L, D, sob, soh, som, sod, sdb, sdh, sdm, sdd, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """delta_i = dO_i . O_i in fp32, read from the 16-bit tensors (no fp32 copies of them)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    valid = (rows[:, None] < L) & (dims[None, :] < D)
    o = tl.load(Out + b * sob + h * soh + rows[:, None] * som + dims[None, :] * sod, mask=valid, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + rows[:, None] * sdm + dims[None, :] * sdd, mask=valid, other=0.0)
    tl.store(Delta + bh * L + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < L)


@triton.jit(do_not_specialize=["seed"])
def _attention_noise(U, seed, H, L, S, groups_per_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(2)
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    u = _uniform(_random_words(seed, bh, rows, start_n, groups_per_row, BLOCK_M, BLOCK_N))
    tl.store(U + bh * L * S + rows[:, None] * S + cols[None, :], u, mask=(rows[:, None] < L) & (cols[None, :] < S))


# ---------------------------------------------------------------------------------------------- launchers


def _launch_options(tiles: Tiles) -> dict:
    """``num_warps`` and, where set, ``num_stages`` (else Triton's default)."""
    options = {"num_warps": tiles.warps}
    if tiles.stages is not None:
        options["num_stages"] = tiles.stages
    return options


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where PyTorch's own matmuls use it (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype != torch.float32:
        return "ieee"  # 16-bit operands: the value is ignored
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _mask_kind(mask: Optional[Tensor]) -> int:
    """The kernels' ``MASK_KIND``: 0 no mask, 1 additive float, 2 boolean."""
    return 0 if mask is None else (2 if mask.dtype == torch.bool else 1)


def _mask_strides(mask: Optional[Tensor]) -> Tuple[int, int, int, int]:
    return tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)


def _ladders(q: Tensor) -> Tuple[Tuple[Tiles, ...], Tuple[Tiles, ...], int]:
    """:func:`tile_ladder` for ``q``'s head width, element size and device."""
    eight_warps = eight_warps_compile(_device_capability(q.device), triton.__version__)
    return tile_ladder(q.shape[-1], q.element_size(), eight_warps)


def _kernel_call(kernel: Any, grid: Tuple[int, ...], compile_only: bool) -> Callable[..., Any]:
    """``kernel[grid]``, or with ``compile_only`` its ``warmup``: compiled for the device with the same arguments,
    nothing launched."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]


def _in_fitting_shape(key: Hashable, ladder: Tuple[Tiles, ...], launch: Callable[[Tiles], None], what: str,
                      compile_only: bool) -> None:
    """:func:`launch_in_fitting_shape`, or with ``compile_only`` one compile in the shape a launch would try
    first (a compile does not tell whether the shape fits: that is known only at a launch)."""
    if compile_only:
        index = fitting_index(key)
        launch(ladder[index if index is not None else 0])
    else:
        launch_in_fitting_shape(key, ladder, launch, what)


def launch_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], p_logit: Tensor, seed: Tensor, is_causal: bool,
    sm_scale: float, inv_t: float, bound: float, compile_only: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Output ``(B, H, L, D)`` and the log2-sum-exp of the scores ``(B * H, L)`` (fp32) for the backward pass.

    Args:
        q, k, v: ``(B, H, L, D)``, ``(B, HKV, S, D)``, ``(B, HKV, S, D)``, any strides.
        mask: boolean (True: attend) or additive float mask expanded to ``(B, H, L, S)`` (broadcast dims may have
            stride 0), or None.
        p_logit: the 0-dim logit of p.
        seed: the noise stream, a one-element int64 tensor on the inputs' device.
        is_causal: key j is masked for query i when j > i.
        sm_scale: the scores' scale.
        inv_t: 1 / temperature.
        bound: the logit's clamp.
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    ladder, _, block_d = _ladders(q)
    out = torch.empty((B, H, L, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, L), device=q.device, dtype=torch.float32)

    def launch(tiles: Tiles) -> None:
        _kernel_call(_attention_forward, (triton.cdiv(L, tiles.block_m), B * H), compile_only)(
            q, k, v, mask if mask is not None else q, out, lse, p_logit, seed, *q.stride(), *k.stride(),
            *v.stride(), *_mask_strides(mask), *out.stride(), H, H // k.shape[1], L, S, D, triton.cdiv(S, 4),
            sm_scale * _LOG2E_HOST, inv_t, bound, MASK_KIND=_mask_kind(mask), IS_CAUSAL=is_causal,
            DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d,
            **_launch_options(tiles),
        )

    key = _variant("forward", ladder, q, mask, p_logit, is_causal)
    _in_fitting_shape(key, ladder, launch, _described("forward", q), compile_only)
    return out, lse


def _variant(pass_name: str, ladder: Tuple[Tiles, ...], q: Tensor, mask: Optional[Tensor], p_logit: Tensor,
             is_causal: bool, *extra: Hashable) -> Hashable:
    """What, besides the launch shape, sets the shared memory a pass's kernels need: the key under which the
    shape that fitted is remembered."""
    mask_dtype = mask.dtype if mask is not None else None
    return (pass_name, ladder, q.device, q.dtype, q.shape[-1], mask_dtype, p_logit.dtype, is_causal,
            _dot_precision(q.dtype), *extra)


def _described(pass_name: str, q: Tensor) -> str:
    return f"the {pass_name} pass of {q.dtype} heads {q.shape[-1]} wide on {q.device}"


def launch_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, grad_out: Tensor, lse: Tensor,
    p_logit: Tensor, seed: Tensor, is_causal: bool, sm_scale: float, inv_t: float, bound: float, need_logit: bool,
    compile_only: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, d p_logit)`` (contiguous; the last None when ``need_logit`` is False)."""
    B, H, L, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    _, ladder, block_d = _ladders(q)
    # delta_i = dO_i . O_i (= sum_j g_ij Pd_ij), in fp32.
    delta = torch.empty((B * H, L), device=q.device, dtype=torch.float32)
    dq = torch.empty((B, H, L, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, HKV, S, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, HKV, S, D), device=q.device, dtype=v.dtype)
    grad_logit = torch.empty_like(p_logit) if need_logit else None
    mask_arg = mask if mask is not None else q
    strides = (*q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask), *grad_out.stride())
    qk_scale = sm_scale * _LOG2E_HOST

    def launch(tiles: Tiles) -> None:
        # Every kernel here only writes its outputs, so a try that fails part-way is redone whole.
        _kernel_call(_attention_delta, (triton.cdiv(L, 64), B * H), compile_only)(
            out, grad_out, delta, H, L, D, *out.stride(), *grad_out.stride(), BLOCK_M=64, BLOCK_D=block_d
        )
        # The key/value kernel holds BLOCK_N keys and loops over BLOCK_M query rows; the query kernel holds the
        # tiles' N query rows and loops over M keys (the same shape of work, transposed).
        common = dict(
            MASK_KIND=_mask_kind(mask), IS_CAUSAL=is_causal, DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_D=block_d, **_launch_options(tiles),
        )
        _kernel_call(_attention_backward_kv, (triton.cdiv(S, tiles.block_n), B * HKV), compile_only)(
            q, k, v, mask_arg, grad_out, lse, delta, dk, dv, p_logit, seed, *strides, H, HKV, H // HKV, L, S, D,
            triton.cdiv(S, 4), qk_scale, sm_scale, inv_t, bound, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            **common,
        )
        grid = (triton.cdiv(L, tiles.block_n), B * H)
        num_programs = grid[0] * grid[1]
        partial = torch.empty(2 * num_programs, device=q.device, dtype=torch.float32) if need_logit else lse
        _kernel_call(_attention_backward_q, grid, compile_only)(
            q, k, v, mask_arg, grad_out, lse, delta, dq, partial, p_logit, seed, *strides, H, H // HKV, L, S, D,
            triton.cdiv(S, 4), num_programs, qk_scale, sm_scale, inv_t, bound, NEED_LOGIT=need_logit,
            BLOCK_M=tiles.block_n, BLOCK_N=tiles.block_m, **common,
        )
        if need_logit:
            _kernel_call(_finish, (1,), compile_only)(
                partial, grad_logit, p_logit, num_programs, inv_t, bound, BLOCK=_FINISH_BLOCK
            )

    key = _variant("backward", ladder, q, mask, p_logit, is_causal, need_logit)
    _in_fitting_shape(key, ladder, launch, _described("backward", q), compile_only)
    return dq, dk, dv, grad_logit


def launch_attention_noise(u: Tensor, seed: int) -> None:
    """Fill the float32 ``(B, H, L, S)`` tensor ``u`` with the uniforms a forward pass with ``seed`` used.

    The tests use it to compare the kernels with explicit attention and the paper's formula on the same noise.
    """
    B, H, L, S = u.shape
    block = 32
    _attention_noise[(triton.cdiv(L, block), triton.cdiv(S, block), B * H)](
        u, seed, H, L, S, triton.cdiv(S, 4), BLOCK_M=block, BLOCK_N=block
    )
