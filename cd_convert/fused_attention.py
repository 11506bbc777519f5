"""Fused attention with Concrete Dropout on the attention probabilities, in Triton (flash attention).

An attention site written out explicitly (scores, softmax, concrete dropout, matmul) keeps the
``batch x heads x L x S`` probabilities for the backward pass and runs several kernels over them, where the
original model ran one fused ``scaled_dot_product_attention``: on a GPU that cost the converted ViTs most of
their extra step time and memory. Here the forward pass is one flash-attention kernel that draws the relaxed
mask inside (the probabilities are never stored), and the backward pass two kernels that regenerate the same
noise from the seed, as flash attention does for its own dropout, and also accumulate the gradient of the
site's logit (see :mod:`cd_convert._triton_attention` for the formulas). Memory is that of fused attention:
``q, k, v``, the output and one float per query row.

Taken only where it is exact, safe and fast (:func:`supports`): CUDA tensors (or CPU under Triton's interpreter
in the tests) in fp16 or bf16, or in fp32 where PyTorch's own fp32 matmuls may use TF32
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision("high")``: in full fp32 the
kernel's dots cannot use the tensor cores, and a ViT-base attention call took 18x the time of
``scaled_dot_product_attention`` on an H200, where explicit attention takes about 1.0x); ``(B, H, L, D)`` with
``D <= 256``, on an NVIDIA GPU of compute capability 8.0 or later (7.5 for fp16: a T4 has no bf16 or TF32
tensor cores, and Triton compiles for nothing older) or an AMD GPU, with Triton 3.0 or later; key/value heads
dividing the query heads (grouped-query attention), a boolean or additive float mask that needs no gradient, the relaxed
training mask (Monte Carlo prediction's hard mask takes the explicit path), no ``torch.compile``/``jit``
tracing, no functorch transform. Everything else runs the explicit path. The seed is drawn on the device
(:func:`cd_convert.fused.draw_seed`), so CUDA-graph capture is supported.
``CD_CONVERT_FUSED=0`` turns these kernels off together with those of :mod:`cd_convert.fused`;
``CD_CONVERT_ATTENTION_TILES`` sets their launch shapes (:data:`TILES_VARIABLE`); without it, a GPU with less shared
memory than the default shapes need gets smaller ones (:mod:`cd_convert._attention_tiles`). A call whose kernels do
not compile with the installed Triton takes the explicit path with a warning (:func:`compiles_for`).

One difference from the explicit path: a query row whose keys are all masked gives zeros (explicit softmax
gives NaN there).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any, Dict, Hashable, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .fused import triton_release
from ._tracing import being_traced, functorch_active

__all__ = [
    "INTERPRET_ON_CPU", "TILES_VARIABLE", "kernels_available", "runs_on", "dtype_runs_on",
    "triton_version_takes_kernels", "supports", "compiles_for", "fused_concrete_attention",
]

#: ``M,N,WARPS,STAGES;M,N,WARPS,STAGES``: the forward's and the backward kernels' launch shapes instead of the
#: defaults (to tune for a GPU; a shape too large for the GPU's shared memory fails to compile). Forward: M query
#: rows per program, N keys per step. Backward: the key/value kernel holds N keys and steps over M query rows;
#: the query kernel holds N query rows and steps over M keys.
TILES_VARIABLE = "CD_CONVERT_ATTENTION_TILES"

#: Accept CPU tensors (for Triton's interpreter, ``TRITON_INTERPRET=1``): the tests set it to run whole models
#: through the kernels without a GPU.
INTERPRET_ON_CPU = False

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_MAX_ELEMENTS = 2**31 - 1  # the kernels index with int32


def triton_version_takes_kernels(version: str) -> bool:
    """Whether a Triton release compiles these kernels: 3.0 or later (``tl.exp2`` and ``tl.dot``'s
    ``input_precision`` arrived in 3.0; Triton 2.3.1 stops at the first, checked by compiling for an H100 target).
    PyTorch 2.4 and later ship Triton 3.

    Args:
        version: ``triton.__version__``, e.g. ``"3.0.0"`` or ``"3.2.0+git35c6c7c6"``.
    """
    release = triton_release(version)
    return release is not None and release >= (3, 0)


@functools.lru_cache(maxsize=1)
def _kernels() -> Optional[Any]:
    """The kernels, or None if Triton cannot be imported or is older than 3.0 (explicit attention then)."""
    try:
        import triton
    except ImportError:
        return None
    if not triton_version_takes_kernels(triton.__version__):
        return None
    from . import _triton_attention

    return _triton_attention


def kernels_available() -> bool:
    """Whether the kernels are switched on and Triton imports (no check of any input)."""
    return fused.ENABLED and _kernels() is not None


def runs_on(device: torch.device, interpret: Optional[bool] = None) -> bool:
    """Whether the kernels run on ``device``: a GPU, or the CPU under Triton's interpreter.

    Args:
        device: where the attention's tensors are.
        interpret: accept the CPU; default :data:`INTERPRET_ON_CPU`.
    """
    interpret = INTERPRET_ON_CPU if interpret is None else interpret
    return device.type == "cuda" or (interpret and device.type == "cpu")


#: The oldest NVIDIA compute capability the kernels take for each dtype: bf16 and TF32 tensor cores arrived with
#: 8.0 (A100); fp16 ones with 7.0, but Triton's oldest target is 7.5 (T4).
_MIN_CAPABILITY = {torch.float16: (7, 5), torch.bfloat16: (8, 0), torch.float32: (8, 0)}


def dtype_runs_on(
    dtype: torch.dtype, capability: Tuple[int, int], hip: bool = False, triton_version: Optional[str] = None
) -> bool:
    """Whether the kernels take ``dtype`` on a GPU of compute ``capability``.

    Args:
        dtype: the inputs' dtype (fp16, bf16 or fp32).
        capability: ``torch.cuda.get_device_capability``'s ``(major, minor)``.
        hip: an AMD GPU (ROCm), where every dtype is taken (the capability numbers are not NVIDIA's).
        triton_version: ``triton.__version__``, for the releases known not to compile the kernels for a GPU:
            Triton 3.3 fails on them for a T4 (7.5; "PassManager::run failed" in ``ConvertTritonGPUToLLVM``),
            where 3.0-3.2, 3.4, 3.5 and 3.8 compile them (``python -m tools.gpu_targets --variants``).

    Returns:
        True when the GPU has tensor cores for ``dtype`` (fp32: TF32) and Triton compiles for it.
    """
    if hip:
        return True
    if triton_version is not None and tuple(capability) < (8, 0) and triton_release(triton_version) == (3, 3):
        return False
    return tuple(capability) >= _MIN_CAPABILITY[dtype]


@functools.lru_cache(maxsize=None)
def _device_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """:func:`dtype_runs_on` for a CUDA device and the installed Triton, looked up once per device and dtype."""
    import triton  # importable: supports() asks kernels_available() first

    capability = fused.nvidia_capability(device)
    return dtype_runs_on(dtype, capability or (0, 0), capability is None, triton.__version__)


def supports(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    enable_gqa: bool = False,
    *,
    interpret: Optional[bool] = None,
) -> bool:
    """Whether :func:`fused_concrete_attention` can compute this attention call.

    Args:
        query, key, value: the call's tensors.
        attn_mask: its mask, if any.
        enable_gqa: the call allows fewer key/value heads than query heads.
        interpret: accept CPU tensors (Triton's interpreter); default :data:`INTERPRET_ON_CPU`.

    Returns:
        True when every condition in the module docstring holds.
    """
    if being_traced():
        return False
    if not kernels_available() or functorch_active():
        return False
    tensors = (query, key, value)
    if any(type(t) is not Tensor for t in tensors) or (attn_mask is not None and type(attn_mask) is not Tensor):
        return False
    if not runs_on(query.device, interpret):
        return False
    if any(t.device != query.device or t.dtype != query.dtype or t.dim() != 4 for t in (key, value)):
        return False
    if query.dim() != 4 or query.dtype not in _FLOAT_TYPES or any(t.numel() > _MAX_ELEMENTS for t in tensors):
        return False
    if query.dtype == torch.float32 and query.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        return False  # full-fp32 dots without tensor cores: far slower than explicit attention (module docstring)
    if query.is_cuda and not _device_takes(query.device, query.dtype):
        return False
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3] or key.shape[3] != dim or value.shape[3] != dim:
        return False
    if dim > _MAX_HEAD_DIM or kv_heads == 0 or heads % kv_heads or (kv_heads != heads and not enable_gqa):
        return False
    if min(length, key.shape[2]) == 0 or length * (key.shape[2] + 3) // 4 >= 2**31:
        return False
    if attn_mask is not None:
        if attn_mask.requires_grad or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            return False
        try:
            torch.broadcast_shapes(attn_mask.shape, (batch, heads, length, key.shape[2]))
        except RuntimeError:
            return False
    return True


# Kernel variants (device, dtypes, head width, mask kind, causal, logit gradient, tiles) compiled, or that failed to
# compile, with the error.
_COMPILED: Set[Hashable] = set()
_UNCOMPILABLE: Dict[Hashable, str] = {}


def compiles_for(
    query: Tensor, key: Tensor, value: Tensor, p_logit: Tensor, attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> bool:
    """Whether the kernels of this call's variant compile: checked once per variant, by compiling (not launching)
    the forward and backward kernels, so that a Triton release or GPU on which they do not compile (as Triton 3.3
    for a T4) makes the call take explicit attention, with a warning, instead of failing at its first launch or,
    worse, at the first backward pass. Call where :func:`supports` is True.

    Args:
        query, key, value, p_logit, attn_mask, is_causal: as :func:`fused_concrete_attention`'s.

    Returns:
        True when both passes compiled for this variant (then and every later time), or under Triton's
        interpreter (nothing is compiled there).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    kernels = _kernels()
    need_logit = p_logit.requires_grad and torch.is_grad_enabled()
    # The key reads only the mask's dtype: the expanded mask the kernels take is made below, when compiling.
    variant = kernels._variant("compile", (os.environ.get(TILES_VARIABLE),), query, attn_mask, p_logit, is_causal,
                               need_logit)
    if variant in _COMPILED:
        return True
    if variant in _UNCOMPILABLE:
        return False
    batch, heads, length, _ = query.shape
    mask = _expanded_mask(attn_mask, torch.Size((batch, heads, length, key.shape[2])), query.device)
    seed = torch.zeros(1, dtype=torch.int64, device=query.device)
    settings = (bool(is_causal), 0.125, 10.0, 5.0)  # floats: the kernels take them as fp32 whatever their value
    try:
        out, lse = kernels.launch_attention_forward(query, key, value, mask, p_logit, seed, *settings,
                                                    compile_only=True)
        kernels.launch_attention_backward(query, key, value, mask, out, out, lse, p_logit, seed, *settings,
                                          need_logit, compile_only=True)
    except torch.cuda.OutOfMemoryError:
        raise  # not the kernels' fault: the caller's memory
    except Exception as error:  # any compiler failure: Triton's CompilationError, MLIR pass failures, ...
        _UNCOMPILABLE[variant] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"cd_convert: the fused attention kernels do not compile for {query.dtype} heads {query.shape[-1]} wide on "
            f"{query.device} with this Triton ({type(error).__name__}: {str(error)[:300]}); calls like this one use "
            "explicit attention (correct, more memory). Another Triton release may compile them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    _COMPILED.add(variant)
    return True


def _expanded_mask(attn_mask: Optional[Tensor], shape: torch.Size, device: torch.device) -> Optional[Tensor]:
    """The mask expanded (not copied) to ``shape``: the kernels read the caller's boolean or float tensor, so the
    saved mask is the model's own one (a transformers model shares one mask among its layers)."""
    if attn_mask is None:
        return None
    return attn_mask.to(device).expand(shape)


class _FusedConcreteAttention(torch.autograd.Function):
    """Flash attention with the relaxed Concrete mask on the probabilities (kernels in ``_triton_attention``)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        p_logit: Tensor,
        mask: Optional[Tensor],
        is_causal: bool,
        sm_scale: float,
        temperature: float,
        bound: float,
    ) -> Tensor:
        seed = fused.draw_seed(query.device)
        out, lse = _kernels().launch_attention_forward(
            query, key, value, mask, p_logit, seed, is_causal, sm_scale, 1.0 / temperature, bound
        )
        ctx.save_for_backward(query, key, value, mask, out, lse, p_logit)
        ctx.seed = seed  # not an input or output of the function: kept on ctx
        ctx.settings = (is_causal, sm_scale, 1.0 / temperature, bound)
        return out

    @staticmethod
    @once_differentiable  # the kernels are not differentiable: a double backward raises instead of being wrong
    def backward(ctx: Any, grad_out: Tensor):
        query, key, value, mask, out, lse, p_logit = ctx.saved_tensors
        seed = ctx.seed
        is_causal, sm_scale, inv_t, bound = ctx.settings
        dq, dk, dv, grad_logit = _kernels().launch_attention_backward(
            query,
            key,
            value,
            mask,
            out,
            grad_out,
            lse,
            p_logit,
            seed,
            is_causal,
            sm_scale,
            inv_t,
            bound,
            need_logit=ctx.needs_input_grad[3],
        )
        return dq, dk, dv, grad_logit, None, None, None, None, None


def fused_concrete_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    p_logit: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    temperature: float,
    eps: float,
) -> Tensor:
    """``softmax(scale * q k^T + mask)`` with the relaxed Concrete mask, times ``value`` (call where
    :func:`supports` is True).

    Args:
        query, key, value: ``(B, H, L, D)``, ``(B, HKV, S, D)``, ``(B, HKV, S, D)``; HKV divides H.
        p_logit: the site's unclamped 0-dim logit of p (clamped inside with a straight-through gradient, as
            :func:`cd_convert.layers.clamped_logit` does).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(B, H, L, S)``.
        is_causal: mask key j for query i when j > i (top-left aligned, as ``scaled_dot_product_attention``).
        scale: the scores' scale, default ``1 / sqrt(D)``.
        temperature: Concrete temperature.
        eps: bound on p.

    Returns:
        ``(B, H, L, D)`` in the inputs' dtype.
    """
    from .layers import logit_bound  # here: layers imports fused, which this module imports

    batch, heads, length, dim = query.shape
    mask = _expanded_mask(attn_mask, torch.Size((batch, heads, length, key.shape[2])), query.device)
    sm_scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    return _FusedConcreteAttention.apply(
        query, key, value, p_logit, mask, bool(is_causal), sm_scale, float(temperature), logit_bound(eps)
    )
