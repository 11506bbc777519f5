"""The CPU's site path: a concrete-dropout site whose scalar arithmetic runs on Python floats.

On the CPU every aten op costs a few microseconds of dispatch whatever its size. On the small networks where
that dominates (the paper's UCI network: one hidden layer of 50, batch 32) much of a site's work is scalar:
clamping the logit, ``1 / (1 - p)``, combining two sums into the logit's gradient. For tensors on the CPU,
reading a number (``Tensor.item``) is a memory read, not a device synchronisation, so
:class:`HostConcreteDropout` reads the logit once, does the scalar work in Python (float64) and dispatches
only the ops that touch whole tensors: after the noise, 7 aten ops in the forward pass (one of them the read
of the logit) and 8 in the backward (5 on whole tensors, two reads of sums and the logit's gradient), where
the tensor formula of :mod:`cd_convert.layers` dispatches 10 and 13. It also saves the mask with the
``1 / (1 - p)`` scale folded in, so the backward pass reads each saved tensor at most twice instead of
rebuilding ``y``, which makes it faster at large shapes too (``benchmarks/train_step.py`` measures both
paths side by side).

At small shapes the Python around the ops counts as much as the ops: a site's call is routed here by one
compact test (:func:`call_route`) before :func:`cd_convert.layers.concrete_dropout` does any general
set-up, and draws its noise through :func:`cd_convert.noise.eager_cpu_uniform` (``torch.rand`` below
:data:`cd_convert.noise.PACKED_MIN_NUMEL` elements). Measured side by side at (32, 50), one thread, the
routing and the small-mask noise made a site's forward + backward about 15% faster than going through the
general set-up and the packed noise draw.

Taken only on the CPU, in eager mode, for plain float32/float64 inputs with an element-wise mask and a 0-dim
logit (:func:`call_route`, :func:`site_applies`). Every other case (channel-wise masks, 16-bit inputs,
tracers, functorch), and every other device (where a scalar read would synchronise with the device), uses
the tensor formula; both compute the same values and gradients to rounding. The regulariser has the same
treatment for up to a dozen sites (:mod:`cd_convert.host_regularizer`). ``CD_CONVERT_HOST_SCALARS=0`` in the
environment, or ``cd_convert.host_scalars.ENABLED = False``, turns both paths off. :mod:`cd_convert.cpu_extension`
(opt-in) runs both in C++, without the Python around their ops.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_extension, noise
from ._scalars import scalar_tensor
from ._tracing import eager_and_untransformed

__all__ = [
    "ENABLED",
    "HostConcreteDropout",
    "available",
    "call_route",
    "masked_without_grad",
    "own_noise_call",
    "plain_cpu_float",
    "site_applies",
]

#: Master switch; the environment variable ``CD_CONVERT_HOST_SCALARS=0`` sets it to False at import.
ENABLED = os.environ.get("CD_CONVERT_HOST_SCALARS", "1") != "0"

_FLOAT_TYPES = (torch.float32, torch.float64)
#: Where the logit's gradient is built: explicitly, not on a default device set by the caller.
_CPU = torch.device("cpu")
#: Parameters are plain tensors here; subclasses (FakeTensor, DTensor, tensor wrappers) keep the tensor path.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_cpu_float(t: Tensor) -> bool:
    """Whether ``t`` is a plain (not subclassed) CPU float32/float64 tensor: what the host-float paths serve."""
    # is_cpu, not device.type: reading .device builds a torch.device object on every call.
    return type(t) in _PLAIN_TYPES and t.is_cpu and t.dtype in _FLOAT_TYPES


def site_applies(x: Tensor, p_logit: Tensor, uniform: Tensor) -> bool:
    """Whether :class:`HostConcreteDropout` can serve this call (the caller checks :data:`ENABLED` and rules out
    tracers and functorch transforms).

    Args:
        x: the site's input.
        p_logit: its logit.
        uniform: the noise, in the compute dtype (``x``'s own for float32/float64 inputs); an element-wise mask
            has ``x``'s shape.

    Returns:
        True for a CPU float32/float64 input with an element-wise mask and a 0-dim CPU logit.
    """
    return plain_cpu_float(x) and plain_cpu_float(p_logit) and p_logit.dim() == 0 and uniform.shape == x.shape


def available() -> bool:
    """Whether the host-float paths may run now: switched on, and no tracer or functorch transform active
    (they would see numbers read back instead of ops)."""
    return ENABLED and eager_and_untransformed()


def call_route(x: Tensor, p_logit: Tensor) -> Optional[bool]:
    """Which host-scalar function a relaxed call with the site's own element-wise noise takes, if any.

    The whole test for the common case, evaluated once, so that :func:`cd_convert.layers.concrete_dropout` can
    route the call before any of its general set-up (on a small mask that set-up costs as much as several ops).

    Args:
        x: the site's input.
        p_logit: its logit.

    Returns:
        None when the path is off, a tracer or functorch transform is active, or ``x`` and the 0-dim logit are not
        plain CPU float32/float64 tensors; otherwise True when gradients are recorded and needed
        (:class:`HostConcreteDropout`, a training call) and False when not (:func:`masked_without_grad`: Monte
        Carlo prediction under ``torch.no_grad``, or a site whose rate is held in front of an input that needs
        no gradient).
    """
    if not (plain_cpu_float(x) and plain_cpu_float(p_logit) and p_logit.dim() == 0 and available()):
        return None
    return torch.is_grad_enabled() and (x.requires_grad or p_logit.requires_grad)


def own_noise_call(
    x: Tensor, p_logit: Tensor, needs_grad: bool, temperature: float, bound: float, save_output: bool
) -> Tensor:
    """A routed call (:func:`call_route` returned ``needs_grad``) with the site's own noise: draw it, apply the mask.

    Through the C++ build of this path when :func:`cd_convert.cpu_extension.enable` switched it on (the same
    noise: large float32 masks take the packed draw here and pass it in, smaller ones ``torch.rand`` there).

    Args:
        x: the input (CPU, float32 or float64).
        p_logit: the unclamped 0-dim logit.
        needs_grad: :func:`call_route`'s answer: the autograd Function, else :func:`masked_without_grad`.
        temperature: Concrete temperature.
        bound: the clamp on the logit (:func:`cd_convert.layers.logit_bound`).
        save_output: keep ``y`` rather than ``x`` for the backward pass.

    Returns:
        ``x * w / (1 - p)``, a new tensor.
    """
    extension = cpu_extension._MODULE
    numel = x.numel()
    if extension is not None:
        uniform = noise.eager_cpu_uniform(x.shape, numel, x.dtype) if numel >= noise.PACKED_MIN_NUMEL else None
        return extension.site(x, p_logit, uniform, temperature, bound, save_output, needs_grad)
    uniform = noise.eager_cpu_uniform(x.shape, numel, x.dtype)
    if needs_grad:
        return HostConcreteDropout.apply(x, p_logit, uniform, temperature, bound, save_output)
    # Monte Carlo prediction, or a held rate on an input that needs no gradient.
    return masked_without_grad(x, p_logit, uniform, temperature, bound)


def _scaled_mask(uniform: Tensor, theta: float, temperature: float) -> Tuple[Tensor, float, float]:
    """The relaxed keep mask with the inverted-dropout scale folded in, built in place on ``uniform``.

    Args:
        uniform: the private noise buffer; overwritten.
        theta: the clamped logit.
        temperature: Concrete temperature.

    Returns:
        ``(m, p, 1 / (1 - p))`` with ``m = sigmoid(-(theta + logit(u)) / t) / (1 - p)``.
    """
    odds = math.exp(theta)  # p / (1 - p), at most 1/eps: the clamp keeps it finite
    inverse_kept = 1.0 + odds  # 1 / (1 - p)
    # Operands are cached 0-dim tensors (theta enters as alpha * 1): a Python number is wrapped into a new
    # tensor on every call, which costs about as much as the operation on a small mask.
    dtype = uniform.dtype
    mask = (
        uniform.logit_()
        .add_(scalar_tensor(1.0, dtype), alpha=theta)
        .mul_(scalar_tensor(-1.0 / temperature, dtype))
        .sigmoid_()
        .mul_(inverse_kept)
    )
    # p = odds / (1 + odds): no cancellation at small p, unlike 1 - 1 / inverse_kept.
    return mask, odds / inverse_kept, inverse_kept


def masked_without_grad(x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, bound: float) -> Tensor:
    """``x * w / (1 - p)`` with no autograd node: the relaxed mask for calls that need no gradient.

    The values of :class:`HostConcreteDropout`'s forward pass, in 7 aten ops after the noise where the tensor
    formula's no-gradient path (:func:`cd_convert.layers._relaxed_without_grad`) dispatches about twice as
    many: on the CPU it makes a Monte Carlo pass of a small network, or a site whose rate is held, 2-3x
    cheaper per call.

    Args:
        x: the input (CPU, float32 or float64); not modified.
        p_logit: the unclamped 0-dim logit.
        uniform: the noise, of ``x``'s shape and dtype; overwritten with the scaled mask.
        temperature: Concrete temperature.
        bound: the clamp on the logit (:func:`cd_convert.layers.logit_bound`).

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    theta = min(max(p_logit.item(), -bound), bound)
    mask, _p, _inverse_kept = _scaled_mask(uniform, theta, temperature)
    return x * mask


class HostConcreteDropout(torch.autograd.Function):
    """``y = x * w / (1 - p)`` with the relaxed mask ``w``, the logit handled as a Python float (CPU).

    With ``theta`` the clamped logit, ``p = sigmoid(theta)``, ``w = 1 - z = sigmoid(-(theta + logit(u)) / t)``
    and ``m = w / (1 - p)`` (the mask with the inverted-dropout scale folded in):

        y           = x * m
        dy/dx       = m
        dL/dlogit   = sum(g y (p - z / t)) = p S - (S - S_w) / t,   S = sum(g y),  S_w = sum(g y w) = (1 - p) sum(g y m)

    (the clamp straight-through, as in :func:`cd_convert.layers.clamped_logit`). Saved: ``m`` and ``x`` (or
    ``y`` with ``save_output``), the same memory as the general path's ``w`` and ``x``. The noise buffer is
    private to the call and becomes ``m`` in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, bound: float, save_output: bool
    ) -> Tensor:
        """The masked input.

        Args:
            ctx: the autograd context.
            x: the input (CPU, float32 or float64).
            p_logit: the unclamped 0-dim logit.
            uniform: the noise, of ``x``'s shape and dtype; overwritten with the scaled mask.
            temperature: Concrete temperature.
            bound: the clamp on the logit (:func:`cd_convert.layers.logit_bound`).
            save_output: keep ``y`` rather than ``x`` for the backward pass.

        Returns:
            ``x * w / (1 - p)``.
        """
        theta = min(max(p_logit.item(), -bound), bound)
        mask, p, inverse_kept = _scaled_mask(uniform, theta, temperature)
        y = x * mask
        ctx.constants = (p, inverse_kept, temperature, save_output, p_logit.dtype)
        ctx.save_for_backward(mask, y if save_output else x)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        """Gradients w.r.t. ``x`` and the logit (see the class docstring).

        Under ``create_graph`` (a gradient penalty) both stay tensor functions of ``grad_y`` and ``x``, so the
        second derivatives through them are those of the tensor formula (which, like this one, treats the
        clamped logit's own terms as constants).

        Args:
            ctx: the context saved by :meth:`forward`.
            grad_y: the output's gradient.

        Returns:
            ``(grad_x, grad_logit, None, None, None, None)``; None where not needed.
        """
        mask, activation = ctx.saved_tensors
        p, inverse_kept, temperature, saved_output, logit_dtype = ctx.constants
        needs_x, needs_logit = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_y * mask if needs_x or not saved_output else None
        grad_logit = None
        if needs_logit:
            # g * y: from the saved output, or as (g * m) * x, reusing grad_x.
            gy = grad_y * activation if saved_output else grad_x * activation
            if torch.is_grad_enabled():  # create_graph: no number read back, the graph stays connected
                total_t = gy.sum()
                kept_t = (gy * mask).sum() / inverse_kept
                grad_logit = (p * total_t - (total_t - kept_t) / temperature).to(logit_dtype)
            else:
                total = gy.sum().item()
                kept_total = gy.mul_(mask).sum().item() / inverse_kept  # sum(g y w), in place on gy
                value = p * total - (total - kept_total) / temperature
                grad_logit = torch.full((), value, dtype=logit_dtype, device=_CPU)
        return (grad_x if needs_x else None), grad_logit, None, None, None, None
