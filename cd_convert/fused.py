"""Fused Triton kernels for Concrete Dropout on the GPU.

Written with PyTorch operations, one concrete-dropout site launches about fifteen kernels in the forward pass
and twenty in the backward pass (noise, logit, sigmoid, scale, products, reductions, scalar work on the
logit). In eager mode on a GPU each launch costs microseconds of CPU time, so a site cost 6-8 times an
``nn.Dropout`` (forward + backward) and a converted timm ViT-tiny training step 1.57x the unconverted one at
224 px, batch 64 (measured on an H200, ``benchmarks/overhead.py --device cuda``). Here the forward pass is
one kernel and the backward pass two (measured: 2.8x ``nn.Dropout`` per site, 1.20x per ViT step):

* forward: draw the noise (Philox, counter-based: one ``tl.randint4x(seed, i // 4)`` call serves four
  elements), build the relaxed mask and write ``y = x * (1 - z) / (1 - p)``;
* backward: recompute the same noise from the seed (so no mask is saved: less memory than ``nn.Dropout``,
  which keeps a byte mask), write ``dx`` and per-block partial sums for the gradient of the logit; a
  second one-program kernel reduces the partials in a fixed order (deterministic) and writes the gradient.

The noise uses the same lattice as :mod:`cd_convert.noise`: ``u = (k + 1/2) * 2**-23`` with 23 random bits
``k``, strictly inside (0, 1). One seed per call is drawn by ``torch.randint`` on the input's device (see
:func:`draw_seed`) into a one-element tensor that the kernels read: no device sync, ``torch.manual_seed`` makes
runs repeatable, and a CUDA graph that captured the call draws a new seed at every replay (a seed passed as a
host number would be frozen into the graph).

The path is taken only where it is exact and safe (see :func:`supports`): a CUDA tensor (on a GPU Triton compiles
for: NVIDIA compute capability 7.0 or later, PyTorch's own rule for Triton, or AMD) in fp32, fp16 or
bf16, in contiguous (or, for 4-D/5-D inputs, channels-last) layout, fewer than 2**31 elements, Triton
importable, no ``torch.compile``/``jit`` tracing (Inductor fuses the PyTorch formula itself), no tensor
subclass. CUDA-graph capture is supported (``torch.cuda.graph``, ``torch.cuda.make_graphed_callables``): a
captured training step replays without the host's per-site launch cost. Everything else uses
the PyTorch formula of :mod:`cd_convert.layers`. ``CD_CONVERT_FUSED=0`` in the environment, or
``cd_convert.fused.ENABLED = False``, turns the kernels off.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._tracing import being_traced, functorch_active

__all__ = [
    "ENABLED", "INTERPRET_ON_CPU", "triton_runs_on", "nvidia_capability", "supports", "draw_seed",
    "fused_concrete_dropout", "made_by_fused_site", "recompute_output",
]

#: Master switch; the environment variable ``CD_CONVERT_FUSED=0`` sets it to False at import.
ENABLED = os.environ.get("CD_CONVERT_FUSED", "1") != "0"

#: Take the kernels for CPU tensors too (Triton's interpreter, ``TRITON_INTERPRET=1``): the tests set it to run
#: whole models through them without a GPU.
INTERPRET_ON_CPU = False

_BLOCK = 1024
_FINISH_BLOCK = 1024
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2**31 - 2 * _BLOCK  # int32 offsets, with room for the last block


#: The oldest Triton release the element-wise kernels were compiled with (2.3.1, for an H100 target). PyTorch 2.1
#: and 2.2 ship Triton 2.1 and 2.2, which could not be checked without a GPU: there sites use the PyTorch formula.
OLDEST_TRITON = (2, 3)


def triton_release(version: str) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a Triton version string such as ``"3.2.0+git35c6c7c6"``; None if unreadable."""
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    return major, minor


@functools.lru_cache(maxsize=1)
def _kernels() -> Optional[Any]:
    """The compiled-on-first-use kernels, or None if Triton cannot be imported or is older than
    :data:`OLDEST_TRITON`."""
    try:
        import triton

        release = triton_release(triton.__version__)
        if release is None or release < OLDEST_TRITON:
            return None
        from . import _triton_kernels
    except ImportError:  # no Triton (CPU-only PyTorch, some platforms)
        return None
    return _triton_kernels


def _layout(x: Tensor) -> Optional[str]:
    """``"contiguous"``, ``"channels_last"`` or None (another layout: not supported)."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return None


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the memory layout of ``like`` (a copy only if it differs), e.g. an expanded gradient."""
    if _layout(like) == "channels_last":
        fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


def triton_runs_on(capability: Tuple[int, int], hip: bool = False) -> bool:
    """Whether Triton compiles for a GPU: NVIDIA compute capability 7.0 or later (a P100 is too old; PyTorch's
    Inductor refuses Triton below 7.0 for the same reason), or any AMD GPU.

    Args:
        capability: ``torch.cuda.get_device_capability``'s ``(major, minor)``.
        hip: an AMD GPU (ROCm), whose capability numbers are not NVIDIA's.
    """
    return hip or tuple(capability) >= (7, 0)


@functools.lru_cache(maxsize=None)
def nvidia_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """An NVIDIA GPU's compute capability, looked up once per device; None for an AMD GPU (ROCm, whose numbers
    are not NVIDIA's) and for other devices."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _device_runs_triton(device: torch.device) -> bool:
    """:func:`triton_runs_on` for a CUDA device."""
    capability = nvidia_capability(device)
    return capability is None or triton_runs_on(capability)


def supports(x: Tensor, channelwise: bool = False, channel_dim: int = 1, *, interpret: bool = False) -> bool:
    """Whether the fused kernels can run on ``x``.

    Args:
        x: the input of a site.
        channelwise: whether the mask is per (sample, channel).
        channel_dim: the channel dim of a channel-wise mask (channels-last layouts need it to be 1).
        interpret: accept CPU tensors (Triton's interpreter, ``TRITON_INTERPRET=1``; used by the tests).

    Returns:
        True when every condition in the module docstring holds.
    """
    # Tracers first: under torch.compile the checks below are not even looked at.
    if being_traced():
        return False
    # vmap/grad wrap tensors: a kernel launch on them would bypass the transform.
    if not ENABLED or type(x) is not Tensor or functorch_active():
        return False
    if not (x.is_cuda or (interpret and x.device.type == "cpu")):
        return False
    if x.is_cuda and not _device_runs_triton(x.device):
        return False
    layout = _layout(x)
    if x.dtype not in _FLOAT_TYPES or x.numel() == 0 or x.numel() > _MAX_ELEMENTS or layout is None:
        return False
    if channelwise and layout == "channels_last" and channel_dim != 1:
        return False
    return _kernels() is not None


def draw_seed(device: torch.device) -> Tensor:
    """One call's noise seed: a one-element int64 tensor in ``[0, 2**31 - 1)`` drawn on ``device``.

    Drawn by PyTorch's generator of that device, so ``torch.manual_seed`` fixes it, and as a device op, so a
    CUDA graph that captured it draws afresh at each replay (PyTorch advances a captured generator's offset).
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def _noise_geometry(x: Tensor, channelwise: bool, channel_dim: int) -> Tuple[int, int, bool]:
    """``(inner, channels, channels_last)`` that map a memory index to its noise index.

    Element-wise: every element has its own noise (inner = 1). Channel-wise, contiguous ``(N, C, *S)``:
    noise index = index // S. Channels-last ``(N, *S, C)`` in memory: noise index = (index // (S*C))*C + index % C.
    Both give the logical index ``n * C + c``, so the noise does not depend on the memory layout.
    """
    if not channelwise:
        return 1, 1, False
    channels = x.shape[channel_dim]
    inner = math.prod(x.shape[channel_dim + 1:])
    return inner, channels, _layout(x) == "channels_last"


def _masked(x: Tensor, p_logit: Tensor, seed: Tensor, geometry: Tuple[float, float, bool, int, int, bool]) -> Tensor:
    """The forward kernel's output for ``x`` under ``seed``; ``geometry``: ``(temperature, bound, channelwise,
    inner, channels, channels_last)``."""
    temperature, bound, channelwise, inner, channels, channels_last = geometry
    y = torch.empty_like(x)  # same layout as x: the kernels walk memory order
    _kernels().launch_forward(x, y, p_logit, seed, 1.0 / temperature, bound, channelwise, inner, channels,
                              channels_last, _BLOCK)
    return y


class _FusedConcreteDropout(torch.autograd.Function):
    """``y = x * (1 - z) / (1 - p)`` with the relaxed mask drawn and recomputed inside Triton kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p_logit: Tensor, temperature: float, bound: float, channelwise: bool,
                channel_dim: int, save_output: bool) -> Tensor:
        seed = draw_seed(x.device)
        geometry = (temperature, bound, channelwise, *_noise_geometry(x, channelwise, channel_dim))
        y = _masked(x, p_logit, seed, geometry)
        ctx.seed = seed  # not an input or output of the function: kept on ctx
        ctx.geometry = geometry
        ctx.saved_output = save_output
        ctx.save_for_backward(p_logit, y if save_output else x)
        return y

    @staticmethod
    @once_differentiable  # the kernels are not differentiable: a double backward raises instead of being wrong
    def backward(ctx: Any, grad_y: Tensor):
        kernels = _kernels()
        p_logit, activation = ctx.saved_tensors
        seed = ctx.seed
        temperature, bound, channelwise, inner, channels, channels_last = ctx.geometry
        grad_y = _in_layout_of(grad_y, activation)  # the kernels walk both in the same memory order
        need_x, need_logit = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(activation) if need_x else None
        grad_logit = torch.empty_like(p_logit) if need_logit else None
        kernels.launch_backward(grad_y, activation, grad_x, grad_logit, p_logit, seed, 1.0 / temperature, bound,
                                channelwise, inner, channels, channels_last, ctx.saved_output, _BLOCK,
                                _FINISH_BLOCK)
        return grad_x, grad_logit, None, None, None, None, None


def fused_concrete_dropout(x: Tensor, p_logit: Tensor, *, temperature: float, eps: float, channelwise: bool,
                           channel_dim: int, save_output: bool) -> Tensor:
    """Relaxed Concrete Dropout in fused kernels (call only where :func:`supports` is True).

    Args:
        x: the input.
        p_logit: the unclamped 0-dim logit of p; it is clamped to ``[logit(eps), logit(1 - eps)]`` inside the
            kernels with a straight-through gradient, as :func:`cd_convert.layers.clamped_logit` does.
        temperature: Concrete temperature.
        eps: bound on p.
        channelwise: one mask value per (sample, channel).
        channel_dim: index of the channel dim for channel-wise masks.
        save_output: keep ``y`` instead of ``x`` for the backward pass.

    Returns:
        ``x * (1 - z) / (1 - p)``, a new tensor of ``x``'s shape, dtype and layout.
    """
    from .layers import logit_bound  # here: layers imports this module at its top

    bound = logit_bound(eps)
    return _FusedConcreteDropout.apply(x, p_logit, temperature, bound, channelwise, channel_dim, save_output)


def made_by_fused_site(y: Tensor) -> bool:
    """Whether ``y`` is the unmodified output of :func:`fused_concrete_dropout` that kept its input (so that
    :func:`recompute_output` can make it again)."""
    node = y.grad_fn
    return type(node) is _FusedConcreteDropout._backward_cls and not node.saved_output and y._version == 0


def recompute_output(node: Any) -> Tensor:
    """The output of the fused call whose autograd node is ``node``, made again from the same input, logit and
    seed (the same values, bit for bit).

    Args:
        node: ``y.grad_fn`` of a ``y`` for which :func:`made_by_fused_site` held.

    Returns:
        A new tensor equal to ``y``. Raises autograd's usual error if the input or logit was modified in place.
    """
    p_logit, x = node.saved_tensors
    return _masked(x, p_logit, node.seed, node.geometry)
