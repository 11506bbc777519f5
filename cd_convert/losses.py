"""Gaussian regression losses for models that predict a mean and a log variance.

Both losses take ``mean`` and ``target`` of shape ``(N,)`` or ``(N, D)`` (more generally
``(N, *)``: every non-batch dim is an output dim), sum over the output dims and reduce over
the N examples. ``log_variance`` is ``s = log sigma^2``: either the same shape as ``mean``
(heteroscedastic) or anything that broadcasts to it, e.g. a learned scalar or ``(D,)``
parameter (homoscedastic). Predicting ``s`` rather than ``sigma^2`` keeps the variance
positive without a constraint.

Which loss goes with which Concrete Dropout regulariser preset (N = training set size):

* :func:`gaussian_nll` is the proper negative log-likelihood: preset ``"nll"``
  (``wr = l^2 / (2N)``, ``dr = 1 / N``).
* :func:`heteroscedastic_gaussian` is the authors' form, 2 x NLL minus a constant: preset
  ``"heteroscedastic"`` (``wr = l^2 / N``, ``dr = 2 / N``), i.e. the same regulariser scaled
  by the same factor 2, so the optimum is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["heteroscedastic_gaussian", "gaussian_nll", "LOG_2PI"]

#: ``log(2 * pi)``, the constant by which ``heteroscedastic_gaussian`` and
#: ``2 * gaussian_nll`` differ per output dim.
LOG_2PI = math.log(2 * math.pi)

_REDUCTIONS = ("mean", "sum", "none")


def _check(mean: Tensor, log_variance: Tensor, target: Tensor, reduction: str) -> None:
    """Validate shapes and the reduction; raise ValueError naming expected vs given."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if mean.ndim == 0 or mean.shape[0] == 0:
        raise ValueError(f"mean must have shape (N,) or (N, D) with N >= 1; got shape {tuple(mean.shape)}")
    # target is not broadcast: (N, 1) against (N,) would silently give an (N, N) loss.
    if target.shape != mean.shape:
        raise ValueError(
            f"target must have the same shape as mean {tuple(mean.shape)}; got shape {tuple(target.shape)}"
        )
    try:
        ok = torch.broadcast_shapes(log_variance.shape, mean.shape) == mean.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"log_variance must have the shape of mean {tuple(mean.shape)} or broadcast to it "
            f"without enlarging it; got shape {tuple(log_variance.shape)}"
        )


def _reduce(per_element: Tensor, reduction: str) -> Tensor:
    """Sum over the output dims (all but dim 0), then reduce over the N examples."""
    per_example = per_element.reshape(per_element.shape[0], -1).sum(dim=1)
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def heteroscedastic_gaussian(
    mean: Tensor,
    log_variance: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Heteroscedastic regression loss in the form of the Concrete Dropout authors' code.

    Per output dim the loss is ``exp(-s) * (y - mu)^2 + s`` with ``s = log_variance``; it
    is summed over the output dim D and averaged over examples. This equals 2 * Gaussian
    NLL minus a constant (log 2*pi): per example,
    ``heteroscedastic_gaussian = 2 * gaussian_nll - D * log(2*pi)``. That factor of 2 is
    why it matches the regulariser preset "heteroscedastic" (wr = l^2/N, dr = 2/N), which
    is the "nll" preset (wr = l^2/(2N), dr = 1/N) times 2.

    Args:
        mean: ``(N,)`` or ``(N, D)`` predicted means.
        log_variance: predicted log variances ``s``, shape of ``mean`` or broadcastable to it.
        target: observed values, same shape as ``mean``.
        reduction: ``"mean"`` (over examples), ``"sum"`` or ``"none"`` (per example, ``(N,)``).

    Returns:
        Scalar loss, or an ``(N,)`` tensor for ``reduction="none"``.
    """
    _check(mean, log_variance, target, reduction)
    per_element = torch.exp(-log_variance) * (target - mean).pow(2) + log_variance
    return _reduce(per_element, reduction)


def gaussian_nll(
    mean: Tensor,
    log_variance: Tensor,
    target: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Gaussian negative log-likelihood with predicted log variance.

    Per output dim ``0.5 * (exp(-s) * (y - mu)^2 + s + log(2*pi))`` with ``s = log_variance``
    (exactly ``-log N(y; mu, exp(s))``), summed over the output dim D and averaged over
    examples. Matches the regulariser preset "nll" (wr = l^2/(2N), dr = 1/N).

    Args:
        mean: ``(N,)`` or ``(N, D)`` predicted means.
        log_variance: predicted log variances ``s``, shape of ``mean`` or broadcastable to it.
        target: observed values, same shape as ``mean``.
        reduction: ``"mean"`` (over examples), ``"sum"`` or ``"none"`` (per example, ``(N,)``).

    Returns:
        Scalar loss in nats, or an ``(N,)`` tensor for ``reduction="none"``.
    """
    _check(mean, log_variance, target, reduction)
    per_element = 0.5 * (torch.exp(-log_variance) * (target - mean).pow(2) + log_variance + LOG_2PI)
    return _reduce(per_element, reduction)
