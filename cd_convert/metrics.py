"""Evaluation metrics for MC-dropout / Concrete Dropout models.

Plain torch, any device. Scalar metrics return Python floats; per-example and per-bin
quantities are returned as tensors.

Conventions:

* Classification: ``probs`` has shape ``(N, C)`` and holds probabilities (typically the MC
  average of softmax outputs, ``prob_samples.mean(0)``); ``target`` has shape ``(N,)`` and
  holds integer class indices.
* MC samples are stacked along a leading dimension of size ``T``.
* Bad shapes, dtypes, values or empty inputs raise ``ValueError`` saying what was expected
  and what was given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PROB_FLOOR",
    "accuracy",
    "nll",
    "gaussian_test_log_likelihood",
    "rmse",
    "ece",
    "reliability_bins",
    "brier",
    "auroc",
    "auroc_from_labels",
    "predictive_entropy",
    "mutual_information",
]

#: Probabilities are clamped to at least this value before taking logs in :func:`nll`, so a
#: confidently wrong prediction (p == 0 for the true class) costs -log(1e-12) ~= 27.6 nats
#: instead of producing ``inf``.
PROB_FLOOR = 1e-12

# Tolerance for "is this a probability?": softmax outputs can exceed 1 by round-off.
_PROB_TOL = 1e-4


# ----------------------------------------------------------------------------- helpers


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _as_float(x: Tensor) -> Tensor:
    """Return ``x`` as a floating tensor of at least float32 precision.

    Half precision cannot represent :data:`PROB_FLOOR` (it would underflow to 0 and give
    ``inf`` in :func:`nll`) and loses accuracy in sums, so float16/bfloat16 are upcast.
    """
    if not x.is_floating_point() or torch.finfo(x.dtype).bits < 32:
        return x.to(torch.float32)
    return x


def _check_classification(probs: Tensor, target: Tensor, name: str = "probs") -> tuple[Tensor, Tensor]:
    """Validate an ``(N, C)`` score tensor against an ``(N,)`` integer target."""
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, C) with C >= 1; got shape {_shape(probs)}")
    n, c = probs.shape
    if n == 0:
        raise ValueError(f"{name} is empty (shape {_shape(probs)}); need at least one example")
    if target.ndim != 1 or target.shape[0] != n:
        raise ValueError(
            f"target must have shape ({n},) to match {name} of shape {_shape(probs)}; got shape {_shape(target)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices; got dtype {target.dtype}")
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"target class indices must lie in [0, {c - 1}] for C={c}; got range [{lo}, {hi}]")
    return _as_float(probs), target


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    """Reject values outside [0, 1]: the usual cause is passing logits where probabilities are expected."""
    if probs.numel() == 0:
        return
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} must be finite probabilities; got NaN or inf")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < -_PROB_TOL or hi > 1 + _PROB_TOL:
        raise ValueError(
            f"{name} must be probabilities in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
            "(pass softmax outputs, not logits)"
        )


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int; got {n_bins!r}")


def _entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) over the last dim; xlogy makes 0 * log 0 == 0 instead of NaN."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


# ------------------------------------------------------------------------ classification


def accuracy(probs_or_logits: Tensor, target: Tensor) -> float:
    """Fraction of examples whose argmax over the last dim equals the target.

    Args:
        probs_or_logits: ``(N, C)`` probabilities or logits (argmax is the same for both).
        target: ``(N,)`` integer class indices.

    Returns:
        Accuracy in [0, 1].
    """
    scores, target = _check_classification(probs_or_logits, target, "probs_or_logits")
    return (scores.argmax(dim=-1) == target).float().mean().item()


def nll(probs: Tensor, target: Tensor) -> float:
    """Mean negative log-likelihood (nats) of the targets under predictive probabilities.

    Args:
        probs: ``(N, C)`` probabilities (e.g. the MC-averaged softmax), not logits.
        target: ``(N,)`` integer class indices.

    Returns:
        ``mean_i -log(max(probs[i, target[i]], PROB_FLOOR))`` with ``PROB_FLOOR = 1e-12``,
        the floor keeping the result finite when a true class gets probability 0.
    """
    probs, target = _check_classification(probs, target)
    _check_probs(probs)
    p_true = probs.gather(1, target.unsqueeze(1)).squeeze(1)
    return -torch.log(p_true.clamp_min(PROB_FLOOR)).mean().item()


def brier(probs: Tensor, target: Tensor) -> float:
    """Multi-class Brier score.

    Args:
        probs: ``(N, C)`` probabilities.
        target: ``(N,)`` integer class indices.

    Returns:
        ``mean_i sum_k (probs[i, k] - onehot(target[i])_k)^2``, in [0, 2].
    """
    probs, target = _check_classification(probs, target)
    _check_probs(probs)
    onehot = F.one_hot(target, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=-1).mean().item()


def _bin_sums(probs: Tensor, target: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-bin count, sum of confidences and number correct, plus the bin edges.

    Bins are equal-width over [0, 1]: bin 0 is [0, 1/B], bin b > 0 is (b/B, (b+1)/B].
    """
    probs, target = _check_classification(probs, target)
    _check_probs(probs)
    _check_n_bins(n_bins)
    conf, pred = probs.max(dim=-1)
    # Edges in the confidences' own dtype so that a confidence equal to an edge value
    # (e.g. 0.5 with 4 bins) compares equal to that edge and lands in the lower bin.
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=conf.dtype, device=conf.device)
    # bucketize(right=False) returns i with inner[i-1] < x <= inner[i]: exactly the
    # (lo, hi] convention, with x <= first inner edge (incl. 0) in bin 0 and anything
    # above the last inner edge (incl. 1 + round-off) in the last bin.
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    # Accumulate in float64 so large N does not lose precision (MPS has no float64).
    acc_dtype = torch.float32 if conf.device.type == "mps" else torch.float64
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=acc_dtype, device=conf.device).index_add_(0, idx, conf.to(acc_dtype))
    correct = (pred == target).to(acc_dtype)
    correct_sum = torch.zeros(n_bins, dtype=acc_dtype, device=conf.device).index_add_(0, idx, correct)
    return edges, count, conf_sum, correct_sum


def reliability_bins(probs: Tensor, target: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Per-bin statistics for a reliability diagram (same binning as :func:`ece`).

    Args:
        probs: ``(N, C)`` probabilities; confidence is the max probability per example.
        target: ``(N,)`` integer class indices.
        n_bins: number of equal-width confidence bins over [0, 1]; bin 0 is [0, 1/B],
            the others are (lo, hi].

    Returns:
        Dict of tensors of length ``n_bins`` (``edges`` has ``n_bins + 1``):
        ``"confidence"`` mean confidence per bin, ``"accuracy"`` fraction correct per bin
        (both NaN for empty bins, so plots skip them rather than draw a fake 0),
        ``"count"`` number of examples per bin (int64), ``"edges"`` the bin edges.
    """
    edges, count, conf_sum, correct_sum = _bin_sums(probs, target, n_bins)
    denom = count.to(conf_sum.dtype)  # 0/0 -> NaN marks empty bins
    return {
        "confidence": conf_sum / denom,
        "accuracy": correct_sum / denom,
        "count": count,
        "edges": edges,
    }


def ece(probs: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` where confidence is the max probability,
    bins are equal-width over [0, 1] with bin 0 = [0, 1/B] and the others (lo, hi], and
    empty bins contribute nothing.

    Args:
        probs: ``(N, C)`` probabilities.
        target: ``(N,)`` integer class indices.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1].
    """
    _, _, conf_sum, correct_sum = _bin_sums(probs, target, n_bins)
    # (n_b / N) * |correct_b / n_b - conf_b_sum / n_b| == |correct_b - conf_b_sum| / N,
    # which needs no special case for empty bins.
    return ((correct_sum - conf_sum).abs().sum() / probs.shape[0]).item()


# ----------------------------------------------------------------------------- regression


def gaussian_test_log_likelihood(
    mu_samples: Tensor,
    target: Tensor,
    *,
    sigma2: Tensor | float,
) -> float:
    """MC-dropout Gaussian test log-likelihood (Gal & Ghahramani 2016; Gal et al. 2017).

    The predictive is the uniform mixture of the T Gaussians ``N(mu_t, sigma2_t)``, so per
    test point ``ll_i = logsumexp_t(log N(y_i; mu_t, sigma2_t)) - log T``, computed in log
    space so far-off points do not underflow. For ``D > 1`` output dims the log-density of
    each sample is summed over D (independent dims). The result is ``mean_i ll_i``.

    Args:
        mu_samples: ``(T, N)`` or ``(T, N, D)`` predicted means, one slice per MC sample.
        target: ``(N,)`` or ``(N, D)``, i.e. ``mu_samples.shape[1:]``.
        sigma2: noise variance (> 0): a float / 0-dim tensor (homoscedastic, e.g. 1 / tau)
            or a tensor of shape ``mu_samples.shape`` (heteroscedastic, per sample and point,
            e.g. ``exp(log_variance_samples)``).

    Returns:
        Average test log-likelihood in nats per test point (higher is better).
    """
    if mu_samples.ndim not in (2, 3):
        raise ValueError(f"mu_samples must have shape (T, N) or (T, N, D); got shape {_shape(mu_samples)}")
    if mu_samples.shape[0] == 0 or mu_samples.shape[1] == 0:
        raise ValueError(f"mu_samples needs T >= 1 and N >= 1; got shape {_shape(mu_samples)}")
    if target.shape != mu_samples.shape[1:]:
        raise ValueError(
            f"target must have shape {_shape(mu_samples)[1:]} (mu_samples.shape[1:]); got shape {_shape(target)}"
        )
    mu = _as_float(mu_samples)
    if isinstance(sigma2, Tensor) and sigma2.ndim > 0:
        if sigma2.shape != mu.shape:
            raise ValueError(
                f"sigma2 must be a scalar or have the shape of mu_samples {_shape(mu)}; got shape {_shape(sigma2)}"
            )
        var = sigma2.to(mu.dtype)
    else:
        var = torch.as_tensor(sigma2, dtype=mu.dtype, device=mu.device)
    if not bool((var > 0).all()):
        raise ValueError("sigma2 must be strictly positive")

    log_density = -0.5 * (torch.log(2 * math.pi * var) + (target.to(mu.dtype) - mu).pow(2) / var)
    if log_density.ndim == 3:
        log_density = log_density.sum(dim=-1)  # independent output dims: (T, N)
    ll = torch.logsumexp(log_density, dim=0) - math.log(mu.shape[0])
    return ll.mean().item()


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error over all elements.

    Args:
        pred: predictions (e.g. the MC mean), any shape.
        target: same shape as ``pred``; shapes are not broadcast, because (N, 1) against
            (N,) would silently compare every prediction with every target.

    Returns:
        ``sqrt(mean((pred - target)^2))``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape; got {_shape(pred)} and {_shape(target)}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty (shape {_shape(pred)})")
    diff = _as_float(pred) - target.to(_as_float(pred).dtype)
    return diff.pow(2).mean().sqrt().item()


# ------------------------------------------------------------------------------- AUROC


def _check_scores(scores: Tensor, name: str) -> Tensor:
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (n,); got shape {_shape(scores)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: AUROC needs at least one negative and one positive example")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; AUROC is undefined")
    return scores


def auroc(scores_negative: Tensor, scores_positive: Tensor) -> float:
    """Area under the ROC curve for a score separating two sets (higher = more positive).

    Computed as the Mann-Whitney U statistic, ``P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg)``,
    from average ranks of the pooled scores (O(n log n); ties handled exactly).

    Args:
        scores_negative: ``(n_neg,)`` scores of the negatives (e.g. correctly classified or
            in-distribution examples).
        scores_positive: ``(n_pos,)`` scores of the positives (e.g. misclassified or
            out-of-distribution examples, expected to have higher uncertainty).

    Returns:
        AUROC in [0, 1]; 0.5 means no separation.
    """
    neg = _check_scores(scores_negative, "scores_negative")
    pos = _check_scores(scores_positive, "scores_positive")
    n_neg, n_pos = neg.numel(), pos.numel()
    if neg.dtype != pos.dtype:
        dtype = torch.promote_types(neg.dtype, pos.dtype)
        neg, pos = neg.to(dtype), pos.to(dtype)
    pooled = torch.cat([neg, pos])
    _, inverse, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    # A group of tied values occupying 1-based ranks start+1 .. start+count gets the average
    # rank start + (count + 1) / 2. Doubling it gives 2 * end - count + 1 (end = start + count),
    # an integer, so the rank sum and U are exact in int64.
    ends = torch.cumsum(counts, dim=0)
    twice_rank = 2 * ends - counts + 1
    twice_rank_sum_pos = int(twice_rank[inverse[n_neg:]].sum())
    twice_u = twice_rank_sum_pos - n_pos * (n_pos + 1)
    return twice_u / (2 * n_pos * n_neg)


def auroc_from_labels(scores: Tensor, is_positive: Tensor) -> float:
    """:func:`auroc` for pooled scores with a boolean positive mask.

    Args:
        scores: ``(n,)`` scores, higher meaning "more likely positive".
        is_positive: ``(n,)`` bool tensor, True for positives.

    Returns:
        AUROC in [0, 1].
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D with shape (n,); got shape {_shape(scores)}")
    if is_positive.shape != scores.shape:
        raise ValueError(f"is_positive must have shape {_shape(scores)} like scores; got {_shape(is_positive)}")
    if is_positive.dtype != torch.bool:
        raise ValueError(f"is_positive must be a bool tensor; got dtype {is_positive.dtype}")
    return auroc(scores[~is_positive], scores[is_positive])


# ------------------------------------------------------------------------- uncertainty


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of the predictive distribution, per example.

    Args:
        probs: ``(N, C)`` predictive probabilities; for MC samples pass the average
            ``prob_samples.mean(0)`` to get ``H[mean_t p_t]``.

    Returns:
        ``(N,)`` tensor, ``-sum_k p_k log p_k`` with ``0 log 0 = 0``; in [0, log C].
    """
    if probs.ndim != 2:
        raise ValueError(
            f"probs must have shape (N, C); got shape {_shape(probs)} "
            "(for MC samples of shape (T, N, C), pass prob_samples.mean(0))"
        )
    probs = _as_float(probs)
    _check_probs(probs)
    return _entropy(probs)


def mutual_information(prob_samples: Tensor) -> Tensor:
    """Mutual information between prediction and weights (BALD), per example.

    ``MI = H[mean_t p_t] - mean_t H[p_t]``: the part of the predictive entropy due to the
    MC samples disagreeing (epistemic uncertainty).

    Args:
        prob_samples: ``(T, N, C)`` probabilities, one slice per MC sample.

    Returns:
        ``(N,)`` tensor in [0, log C]; clamped at 0, since MI >= 0 exactly but round-off can
        make the difference of two entropies slightly negative.
    """
    if prob_samples.ndim != 3 or 0 in prob_samples.shape:
        raise ValueError(f"prob_samples must have shape (T, N, C) with T, N, C >= 1; got shape {_shape(prob_samples)}")
    prob_samples = _as_float(prob_samples)
    _check_probs(prob_samples, "prob_samples")
    mi = _entropy(prob_samples.mean(dim=0)) - _entropy(prob_samples).mean(dim=0)
    return mi.clamp_min(0.0)
