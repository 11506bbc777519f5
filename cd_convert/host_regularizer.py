"""The CPU's regulariser path: the per-site terms of :func:`cd_convert.regularization` on Python floats.

The regulariser of a small network is mostly scalar work: one clamped logit, ``p log p + (1 - p) log(1 - p)``
and ``1 / (1 - p)`` per site, combined with one squared norm per consumer weight. The tensor form
(:class:`cd_convert.collector._Regularizer`) does that work in about 16 aten ops forward and 12 backward
whatever the number of sites; on the CPU each costs a few microseconds of dispatch however small its
operand. For tensors on the CPU, reading a number is a memory read, not a device synchronisation, so
:class:`HostRegularizer` reads the logits and the weights' norms, does the per-site arithmetic in Python
(float64) and dispatches only what touches the weights and what autograd needs back as tensors: forward,
one ``_foreach_norm`` plus the reads and the 0-dim result; backward, one ``_foreach_mul`` for the weight
gradients and one tensor of the logits' gradients (then unbound). The Python loop grows with the number of
sites while the tensor form does not, so the Python path is taken only up to :data:`MAX_SITES` applications
(section 3 of ``benchmarks/train_step.py``, paired against the tensor form, one thread: 0.79x at 2 sites,
0.94x at 12, about 1x by 16); its C++ build (:mod:`cd_convert.cpu_extension`, opt-in) serves any number
(:func:`serves`).

Taken only on the CPU, in eager mode, for plain float32/float64 parameters (0-dim logits of one dtype): the
plan decides once (:func:`host_terms`), and each call checks that the plan still fits (types, devices,
dtypes), that the switch is on and that no tracer or functorch transform is active. Like the tensor form's
Function it has no double backward. ``CD_CONVERT_HOST_SCALARS=0`` (or ``cd_convert.host_scalars.ENABLED =
False``) turns it off together with the sites' host path. :func:`regularize` takes the C++ build of
:class:`HostRegularizer` while :func:`cd_convert.cpu_extension.enable` has switched it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_extension, host_scalars

__all__ = [
    "MAX_SITES",
    "HostRegularizer",
    "HostTerms",
    "host_terms",
    "log_sigmoid",
    "regularize",
    "regularize_tree",
    "serves",
]

#: Most applications the Python host path serves; beyond, the tensor form's fixed op count is cheaper than its
#: loop (the C++ build's loop is not: it serves any number).
MAX_SITES = 12


@dataclass(frozen=True)
class HostTerms:
    """The regulariser's constants as Python numbers (built once per plan).

    Attributes:
        bounds: the clamp on each application's logit (:func:`cd_convert.layers.logit_bound`).
        dropout_units: ``dropout_regularizer * K`` per application.
        weight_regularizer: the weight term's constant.
        reads: per application, ``(weight index, count)`` of each distinct consumer weight it reads.
        logit_dtype: the logits' dtype (their gradients are built in it).
        native: the same constants as the C++ extension's object, built on first use
            (:mod:`cd_convert.cpu_extension`), keyed by the extension module's id.
    """

    bounds: Tuple[float, ...]
    dropout_units: Tuple[float, ...]
    weight_regularizer: float
    reads: Tuple[Tuple[Tuple[int, float], ...], ...]
    logit_dtype: torch.dtype
    native: Dict[int, Any] = field(default_factory=dict, compare=False, repr=False)


def host_terms(
    logits: Sequence[Tensor],
    weights: Sequence[Tensor],
    bounds: Sequence[float],
    dropout_units: Sequence[float],
    weight_regularizer: float,
    reads: Sequence[Sequence[Tuple[int, float]]],
) -> Optional[HostTerms]:
    """The constants of the host path, or None where it does not apply.

    Args:
        logits: one p-logit per application, as read when the plan is built.
        weights: the distinct consumer weights.
        bounds: the clamp on each logit.
        dropout_units: ``dropout_regularizer * K`` per application.
        weight_regularizer: the weight term's constant.
        reads: per application, ``(weight index, count)`` pairs.

    Returns:
        None when the path is off or a logit or weight is not a plain CPU float32/float64 tensor (logits 0-dim
        and of one dtype). Whether the terms are used depends on the count at each call (:func:`serves`).
    """
    if not host_scalars.ENABLED or not logits:
        return None
    if not all(host_scalars.plain_cpu_float(t) and t.dim() == 0 for t in logits):
        return None
    if len({t.dtype for t in logits}) != 1 or not all(host_scalars.plain_cpu_float(w) for w in weights):
        return None
    return HostTerms(
        bounds=tuple(bounds),
        dropout_units=tuple(dropout_units),
        weight_regularizer=weight_regularizer,
        reads=tuple(tuple(app) for app in reads),
        logit_dtype=logits[0].dtype,
    )


def serves(count: int) -> bool:
    """Whether the host path is the cheaper form for ``count`` applications: up to :data:`MAX_SITES` in Python,
    any number while the C++ build is switched on (:func:`cd_convert.cpu_extension.enable`)."""
    return count <= MAX_SITES or cpu_extension._MODULE is not None


def regularize(terms: HostTerms, logits: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """The regulariser on the host path: :class:`HostRegularizer`, or its C++ build while
    :func:`cd_convert.cpu_extension.enable` has switched that on (the same value and gradients).

    Args:
        terms: the plan's constants.
        logits: one 0-dim p-logit per application.
        weights: the distinct consumer weights.

    Returns:
        A 0-dim fp32 CPU tensor.
    """
    extension = cpu_extension._MODULE
    if extension is None:
        return HostRegularizer.apply(terms, len(logits), *logits, *weights)
    return extension.regularizer(_native(terms, extension), list(logits), list(weights))


def regularize_tree(terms: HostTerms, root: Any, tree: Tuple[Any, ...]) -> Optional[Tensor]:
    """The C++ build's whole call: it reads the logits and weights from the module tree under ``root`` itself and
    checks that the tree and the tensors still fit the plan (see ``regularizer_of`` in ``csrc/host_site.cpp``).

    Args:
        terms: the plan's constants.
        root: the module the plan's names are relative to.
        tree: ``cd_convert.collector._Plan.native_tree``.

    Returns:
        The regulariser, or None when the C++ build is off or something no longer fits (the caller then takes
        the general path).
    """
    extension = cpu_extension._MODULE
    if extension is None:
        return None
    return extension.regularizer_of(_native(terms, extension), root, tree)


def _native(terms: HostTerms, extension: Any) -> Any:
    """The constants as ``extension``'s C++ object, built on first use and kept in ``terms``."""
    native = terms.native.get(id(extension))
    if native is None:
        native = extension.make_plan(
            list(terms.bounds),
            list(terms.dropout_units),
            terms.weight_regularizer,
            [list(app) for app in terms.reads],
            torch.empty(0, dtype=terms.logit_dtype),  # the dtype, as an empty tensor of it
        )
        terms.native[id(extension)] = native
    return native


def log_sigmoid(v: float) -> float:
    """``log(sigmoid(v))`` without overflow or cancellation at either end."""
    if v >= 0.0:
        return -math.log1p(math.exp(-v))
    return v - math.log1p(math.exp(v))


class HostRegularizer(torch.autograd.Function):
    """The regulariser with its per-application arithmetic on Python floats (CPU; see the module docstring).

    The same value and derivatives as :class:`cd_convert.collector._Regularizer`, with ``theta_a`` the clamped
    logit (straight-through), ``p_a = sigmoid(theta_a)`` and ``S_a`` the count-weighted sum of the squared norms
    of application a's consumer weights:

        R           = sum_a  wr * S_a / (1 - p_a) + dr * K_a * (p_a log p_a + (1 - p_a) log(1 - p_a))
        dR/dlogit_a = wr * S_a * p_a / (1 - p_a) + dr * K_a * theta_a * p_a (1 - p_a)
        dR/dW_j     = 2 W_j * wr * sum over the reads (a, j, count) of count / (1 - p_a)
    """

    @staticmethod
    def forward(ctx: Any, terms: HostTerms, count: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        """The value.

        Args:
            ctx: the autograd context.
            terms: the constants.
            count: the number of logits at the front of ``tensors``.
            tensors: the 0-dim logits, then the distinct consumer weights.

        Returns:
            A 0-dim fp32 CPU tensor.
        """
        logits, weights = tensors[:count], tensors[count:]
        # One op for all norms; squared in float64 after the read.
        squared = [n.item() ** 2 for n in torch._foreach_norm(list(weights), 2)] if weights else []
        wr = terms.weight_regularizer
        total = 0.0
        logit_grads: List[float] = []
        weight_scales = [0.0] * len(weights)
        for logit, bound, dropout_units, reads in zip(logits, terms.bounds, terms.dropout_units, terms.reads):
            theta = min(max(logit.item(), -bound), bound)
            log_p, log_kept = log_sigmoid(theta), log_sigmoid(-theta)
            p, kept = math.exp(log_p), math.exp(log_kept)
            inverse_kept = 1.0 + math.exp(theta)  # 1 / (1 - p); the clamp keeps it finite
            weight_sum = 0.0
            for j, reads_of_j in reads:
                weight_sum += reads_of_j * squared[j]
                weight_scales[j] += reads_of_j * inverse_kept
            total += dropout_units * (p * log_p + kept * log_kept) + wr * weight_sum * inverse_kept
            # d[p log p + (1 - p) log(1 - p)]/dtheta = theta p (1 - p); d[1 / (1 - p)]/dtheta = p / (1 - p).
            logit_grads.append(dropout_units * theta * p * kept + wr * weight_sum * p * inverse_kept)
        ctx.terms = terms
        ctx.count = count
        ctx.logit_grads = logit_grads
        ctx.weight_scales = [2.0 * wr * s for s in weight_scales]
        ctx.save_for_backward(*weights)
        return torch.full((), total, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        """The gradients w.r.t. the logits and the weights.

        Args:
            ctx: the context saved by :meth:`forward`.
            grad: the gradient of the loss w.r.t. the regulariser (0-dim, CPU).

        Returns:
            None for ``terms`` and ``count``, then one gradient per tensor input (None where not needed).
        """
        g = grad.item()
        count = ctx.count
        logit_grads: Tuple[Optional[Tensor], ...] = (None,) * count
        if any(ctx.needs_input_grad[2 : 2 + count]):
            logit_grads = torch.tensor([v * g for v in ctx.logit_grads], dtype=ctx.terms.logit_dtype).unbind()
        weights = ctx.saved_tensors
        weight_grads: Tuple[Optional[Tensor], ...] = (None,) * len(weights)
        if weights and any(ctx.needs_input_grad[2 + count :]):
            # Python numbers keep each gradient in its weight's dtype; 2 W * 0 = 0 for a zero weight.
            weight_grads = tuple(torch._foreach_mul(list(weights), [s * g for s in ctx.weight_scales]))
        return (None, None, *logit_grads, *weight_grads)
