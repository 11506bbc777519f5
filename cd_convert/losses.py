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

:func:`gaussian_mixture_nll` is a different kind of loss: the negative log of the MC predictive
density (the uniform mixture of T sampled Gaussians), the quantity the MC test log-likelihood
scores. It takes ``(T, N, *)`` samples and is meant for held-out data (learning the dropout
rates and the noise level on a validation set); it is not paired with a regulariser preset.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["heteroscedastic_gaussian", "gaussian_nll", "gaussian_mixture_nll", "LOG_2PI"]

#: ``log(2 * pi)``, the constant by which ``heteroscedastic_gaussian`` and
#: ``2 * gaussian_nll`` differ per output dim.
LOG_2PI = math.log(2 * math.pi)

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _check(mean: Tensor, log_variance: Tensor, target: Tensor, reduction: str) -> None:
    """Validate shapes and the reduction; raise ValueError naming expected vs given."""
    _check_reduction(reduction)
    if mean.ndim == 0 or mean.shape[0] == 0:
        raise ValueError(f"mean must have shape (N,) or (N, D) with N >= 1; got shape {tuple(mean.shape)}")
    # target is not broadcast: (N, 1) against (N,) would silently give an (N, N) loss.
    if target.shape != mean.shape:
        raise ValueError(
            f"target must have the same shape as mean {tuple(mean.shape)}; got shape {tuple(target.shape)}"
        )
    _check_log_variance("log_variance", log_variance, "mean", mean)


def _check_log_variance(name: str, log_variance: Tensor, mean_name: str, mean: Tensor) -> None:
    """Raise ValueError unless ``log_variance`` has ``mean``'s shape or broadcasts to it without enlarging it."""
    # The broadcasting rule, aligned from the right, on plain ints: torch.broadcast_shapes costs about 26 us a
    # call on the CPU, a fifth of the loss on a batch of 128.
    lv_shape, mean_shape = log_variance.shape, mean.shape
    offset = len(mean_shape) - len(lv_shape)
    ok = offset >= 0 and all(size == 1 or size == mean_shape[offset + i] for i, size in enumerate(lv_shape))
    if not ok:
        raise ValueError(
            f"{name} must have the shape of {mean_name} {tuple(mean.shape)} or broadcast to it "
            f"without enlarging it; got shape {tuple(log_variance.shape)}"
        )


def _scaled_squares(mean: Tensor, log_variance: Tensor, target: Tensor) -> Tensor:
    """``exp(-s) * (y - mu)^2 + s`` element-wise (broadcast): twice the NLL, less ``log(2 pi)``.

    One ``addcmul`` rather than a product and a sum: a dispatched op and an autograd node fewer, which is a
    measurable share of a small network's step on the CPU. (Dividing by ``exp(s)`` would save the negation too,
    but its backward squares ``exp(s)``, which overflows to an infinite gradient for ``s < -44`` in fp32.)
    """
    return torch.addcmul(log_variance, torch.exp(-log_variance), (target - mean).pow(2))


def _nll_elements(mean: Tensor, log_variance: Tensor, target: Tensor) -> Tensor:
    """``-log N(y; mu, exp(s))`` element-wise (broadcast)."""
    return 0.5 * (_scaled_squares(mean, log_variance, target) + LOG_2PI)


def _reduce(per_element: Tensor, reduction: str) -> Tensor:
    """Sum over the output dims (all but dim 0), then reduce over the N examples."""
    # One output dim: the elements are the examples' losses (the reshape and sum would copy them, and cost
    # four of the small-network loss's ~twenty dispatched ops forward and backward).
    per_example = per_element if per_element.dim() == 1 else per_element.reshape(per_element.shape[0], -1).sum(dim=1)
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
    return _reduce(_scaled_squares(mean, log_variance, target), reduction)


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
    return _reduce(_nll_elements(mean, log_variance, target), reduction)


def gaussian_mixture_nll(
    mean_samples: Tensor,
    log_variance_samples: Tensor,
    target: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-density of the MC predictive: the uniform mixture of T sampled Gaussians.

    Per example ``-log((1/T) sum_t N(y; mu_t, exp(s_t)))``, with each sample's density the product over the
    output dims, computed with ``logsumexp`` so far-off targets do not underflow. Its mean is minus the MC test
    log-likelihood (:func:`cd_convert.metrics.gaussian_test_log_likelihood`), here differentiable: with the
    samples drawn in training mode (relaxed masks) its gradient reaches the dropout rates.

    Unlike :func:`gaussian_nll` of one sample, which charges every sample's error in full and so always prefers
    less dropout noise, the mixture rewards samples that spread to cover the target: it is the objective of a
    validation check, for learning the rates and the noise level on held-out data.

    Args:
        mean_samples: ``(T, N)`` or ``(T, N, D)`` sampled means (T >= 1 passes of the same N examples).
        log_variance_samples: the sampled log variances, shape of ``mean_samples`` or broadcastable to it (e.g.
            a learned scalar).
        target: ``(N,)`` or ``(N, D)``: ``mean_samples.shape[1:]``.
        reduction: ``"mean"`` (over examples), ``"sum"`` or ``"none"`` (per example, ``(N,)``).

    Returns:
        Scalar loss in nats, or an ``(N,)`` tensor for ``reduction="none"``.
    """
    _check_reduction(reduction)
    if mean_samples.ndim < 2 or mean_samples.shape[0] == 0 or mean_samples.shape[1] == 0:
        raise ValueError(
            "mean_samples must have shape (T, N) or (T, N, D) with T >= 1 and N >= 1 (one slice per MC sample); "
            f"got shape {tuple(mean_samples.shape)}"
        )
    if target.shape != mean_samples.shape[1:]:
        raise ValueError(
            f"target must have shape {tuple(mean_samples.shape[1:])} (mean_samples.shape[1:]); "
            f"got shape {tuple(target.shape)}"
        )
    _check_log_variance("log_variance_samples", log_variance_samples, "mean_samples", mean_samples)
    t = mean_samples.shape[0]
    log_density = -_nll_elements(mean_samples, log_variance_samples, target)
    per_sample = log_density.reshape(t, mean_samples.shape[1], -1).sum(dim=2)  # (T, N): product over output dims
    per_example = math.log(t) - torch.logsumexp(per_sample, dim=0)
    return _reduce(per_example, reduction)
