"""Tests for cd_convert.metrics against hand-computed values and independent references."""

from __future__ import annotations

import math

import pytest
import torch

from cd_convert.metrics import (
    PROB_FLOOR,
    accuracy,
    auroc,
    auroc_from_labels,
    brier,
    ece,
    gaussian_test_log_likelihood,
    mutual_information,
    nll,
    predictive_entropy,
    reliability_bins,
    rmse,
)

# Two examples, three classes, used for the hand-computed Brier / NLL / accuracy values.
PROBS_2 = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)
TARGET_2 = torch.tensor([0, 1])

# Five examples, three classes, four bins with edges 0, .25, .5, .75, 1 (exactly representable,
# so the two edge cases below are exact):
#   ex  probs                  target  conf   pred  correct  bin
#   0   [0.9,   0.05,  0.05 ]  0       0.9    0     yes      3  (.75, 1]
#   1   [0.75,  0.125, 0.125]  1       0.75   0     no       2  (.5, .75]   <- on edge .75
#   2   [0.125, 0.625, 0.25 ]  1       0.625  1     yes      2
#   3   [0.5,   0.25,  0.25 ]  2       0.5    0     no       1  (.25, .5]   <- on edge .5
#   4   [0.25,  0.4,   0.35 ]  1       0.4    1     yes      1
# bin 0: empty
# bin 1: n=2, conf=(0.5+0.4)/2=0.45,     acc=1/2 -> |0.5-0.45|   = 0.05
# bin 2: n=2, conf=(0.75+0.625)/2=0.6875, acc=1/2 -> |0.5-0.6875| = 0.1875
# bin 3: n=1, conf=0.9,                  acc=1   -> |1-0.9|      = 0.1
# ECE = 2/5*0.05 + 2/5*0.1875 + 1/5*0.1 = 0.02 + 0.075 + 0.02 = 0.115
# (With [lo, hi) bins the edge examples would move up and ECE would be 0.275.)
_ROWS_5 = [
    [0.9, 0.05, 0.05],
    [0.75, 0.125, 0.125],
    [0.125, 0.625, 0.25],
    [0.5, 0.25, 0.25],
    [0.25, 0.4, 0.35],
]
PROBS_5 = torch.tensor(_ROWS_5)
TARGET_5 = torch.tensor([0, 1, 1, 2, 1])


# ------------------------------------------------------------------------ classification


def test_accuracy_hand_and_logits():
    assert accuracy(PROBS_2, TARGET_2) == pytest.approx(0.5)  # ex0 right, ex1 predicts 2
    logits = torch.log(PROBS_5)  # argmax unchanged by a monotone map
    assert accuracy(logits, TARGET_5) == pytest.approx(3 / 5)


def test_nll_hand():
    # -(log 0.7 + log 0.3) / 2
    expected = -(math.log(0.7) + math.log(0.3)) / 2
    assert nll(PROBS_2, TARGET_2) == pytest.approx(expected, rel=1e-12)


def test_nll_zero_probability_is_floored_not_inf():
    probs = torch.tensor([[1.0, 0.0]])
    assert nll(probs, torch.tensor([1])) == pytest.approx(-math.log(PROB_FLOOR), rel=1e-6)


def test_nll_half_precision_stays_finite():
    # 1e-12 underflows in float16; the metric must upcast before clamping.
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    assert math.isfinite(nll(probs, torch.tensor([1])))


def test_brier_hand():
    # ex0: (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14
    # ex1: 0.3^2 + (0.3-1)^2 + 0.4^2 = 0.09 + 0.49 + 0.16 = 0.74
    assert brier(PROBS_2, TARGET_2) == pytest.approx((0.14 + 0.74) / 2, rel=1e-12)


def test_ece_hand():
    assert ece(PROBS_5, TARGET_5, n_bins=4) == pytest.approx(0.115, abs=1e-7)
    probs64 = torch.tensor(_ROWS_5, dtype=torch.float64)
    assert ece(probs64, TARGET_5, n_bins=4) == pytest.approx(0.115, abs=1e-12)


def test_ece_single_bin_is_accuracy_minus_mean_confidence():
    mean_conf = (0.9 + 0.75 + 0.625 + 0.5 + 0.4) / 5
    assert ece(PROBS_5, TARGET_5, n_bins=1) == pytest.approx(abs(3 / 5 - mean_conf), abs=1e-7)


def test_reliability_bins_hand():
    bins = reliability_bins(PROBS_5, TARGET_5, n_bins=4)
    assert bins["count"].tolist() == [0, 2, 2, 1]
    assert torch.allclose(bins["edges"], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # Empty bin -> NaN so a plot skips it.
    assert math.isnan(bins["confidence"][0]) and math.isnan(bins["accuracy"][0])
    assert bins["confidence"][1:].tolist() == pytest.approx([0.45, 0.6875, 0.9])
    assert bins["accuracy"][1:].tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_reliability_bins_zero_confidence_in_first_bin():
    bins = reliability_bins(torch.zeros(1, 2), torch.tensor([0]), n_bins=4)
    assert bins["count"].tolist() == [1, 0, 0, 0]


def test_perfectly_calibrated_ece_is_zero():
    # Confidence 0.75 (bin (.5, .75]) and exactly 3 of 4 correct.
    probs = torch.tensor([[0.75, 0.25]]).repeat(4, 1)
    assert ece(probs, torch.tensor([0, 0, 0, 1]), n_bins=10) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- regression


def _normal_pdf(y: float, mu: float, var: float) -> float:
    return math.exp(-((y - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def test_test_log_likelihood_hand_T2_homoscedastic():
    mu = torch.tensor([[1.0, 2.0], [3.0, 2.5]], dtype=torch.float64)  # (T=2, N=2)
    y = torch.tensor([2.0, 2.0], dtype=torch.float64)
    s2 = 0.5
    # ll_i = log( (p(y_i | mu_1i) + p(y_i | mu_2i)) / 2 ), averaged over i: density-space formula.
    ll0 = math.log((_normal_pdf(2.0, 1.0, s2) + _normal_pdf(2.0, 3.0, s2)) / 2)
    ll1 = math.log((_normal_pdf(2.0, 2.0, s2) + _normal_pdf(2.0, 2.5, s2)) / 2)
    got = gaussian_test_log_likelihood(mu, y, sigma2=s2)
    assert got == pytest.approx((ll0 + ll1) / 2, rel=1e-12)
    # A 0-dim tensor and a full tensor of the same value give the same answer.
    assert gaussian_test_log_likelihood(mu, y, sigma2=torch.tensor(s2)) == pytest.approx(got, rel=1e-12)
    full = torch.full_like(mu, s2)
    assert gaussian_test_log_likelihood(mu, y, sigma2=full) == pytest.approx(got, rel=1e-12)


def test_test_log_likelihood_hand_T2_heteroscedastic_multioutput():
    mu = torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]], dtype=torch.float64)  # (T=2, N=1, D=2)
    var = torch.tensor([[[1.0, 2.0]], [[0.5, 4.0]]], dtype=torch.float64)
    y = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    # Per sample the D=2 densities multiply (log-densities add); then average over T.
    p1 = _normal_pdf(0.5, 0.0, 1.0) * _normal_pdf(0.0, 1.0, 2.0)
    p2 = _normal_pdf(0.5, 1.0, 0.5) * _normal_pdf(0.0, 1.0, 4.0)
    expected = math.log((p1 + p2) / 2)
    assert gaussian_test_log_likelihood(mu, y, sigma2=var) == pytest.approx(expected, rel=1e-12)


def test_test_log_likelihood_far_points_do_not_underflow():
    # exp(-1e4) underflows; log-space evaluation must give the (finite) dominant term.
    mu = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([100.0])
    got = gaussian_test_log_likelihood(mu, y, sigma2=1.0)
    top = -0.5 * math.log(2 * math.pi) - 0.5 * 99.0**2  # the nearer sample dominates
    assert math.isfinite(got)
    assert got == pytest.approx(top - math.log(2), rel=1e-6)


def test_rmse_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.0, 0.0, 3.0, 2.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt((0 + 4 + 0 + 4) / 4))


# ------------------------------------------------------------------------------- AUROC


def test_auroc_hand_with_ties():
    neg = torch.tensor([0.1, 0.4, 0.35, 0.8])
    pos = torch.tensor([0.35, 0.8, 0.9])
    # Pairs (pos > neg counts 1, tie counts 1/2):
    #   pos 0.35: >0.1 (1), <0.4 (0), =0.35 (.5), <0.8 (0)  -> 1.5
    #   pos 0.8 : >0.1, >0.4, >0.35 (3), =0.8 (.5)          -> 3.5
    #   pos 0.9 : above all four                            -> 4
    # AUROC = (1.5 + 3.5 + 4) / (3 * 4) = 9 / 12 = 0.75
    assert auroc(neg, pos) == 0.75


def test_auroc_extremes():
    a, b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert auroc(a, b) == 1.0
    assert auroc(b, a) == 0.0
    assert auroc(torch.ones(5), torch.ones(3)) == 0.5  # all tied
    assert auroc(torch.tensor([1, 2]), torch.tensor([2.5])) == 1.0  # mixed dtypes


def test_auroc_from_labels_matches_split():
    scores = torch.tensor([0.1, 0.35, 0.4, 0.8, 0.35, 0.8, 0.9])
    labels = torch.tensor([False, False, False, False, True, True, True])
    assert auroc_from_labels(scores, labels) == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    g = torch.Generator().manual_seed(seed)
    n = 300
    scores = torch.randint(0, 12, (n,), generator=g).double() / 4  # many ties
    labels = torch.rand(n, generator=g) < 0.3
    scores = scores + 0.5 * labels  # some signal so AUROC != 0.5
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert auroc_from_labels(scores, labels) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------- uncertainty


def test_entropy_of_uniform_is_log_c():
    for c in (2, 3, 10):
        h = predictive_entropy(torch.full((4, c), 1.0 / c))
        assert torch.allclose(h, torch.full((4,), math.log(c)))


def test_entropy_and_mi_with_zero_probabilities():
    onehot = torch.tensor([[1.0, 0.0, 0.0]])
    assert predictive_entropy(onehot).tolist() == [0.0]  # 0 log 0 = 0, not NaN
    # Two confident samples that disagree: mean is uniform over 2 classes, each sample has
    # entropy 0, so MI = log 2. Two identical samples: MI = 0.
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    agree = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    assert mutual_information(disagree).item() == pytest.approx(math.log(2))
    assert mutual_information(agree).item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_mi_nonnegative_and_below_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    # Peaked softmaxes so some samples are near one-hot; a few exactly identical samples
    # exercise the round-off clamp.
    samples = torch.softmax(5 * torch.randn(8, 50, 6, generator=g), dim=-1)
    samples[:, :5] = samples[0, :5]
    mi = mutual_information(samples)
    h = predictive_entropy(samples.mean(0))
    assert mi.shape == (50,) and h.shape == (50,)
    assert (mi >= 0).all()
    assert (h >= mi - 1e-6).all()
    assert (h <= math.log(6) + 1e-6).all()


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (accuracy, (torch.rand(3), torch.tensor([0, 1, 0])), r"shape \(N, C\).*got shape \(3,\)"),
        (nll, (torch.rand(3, 2), torch.tensor([0, 1])), r"shape \(3,\).*got shape \(2,\)"),
        (nll, (torch.rand(3, 2), torch.tensor([0.0, 1.0, 0.0])), r"integer class indices"),
        (nll, (torch.rand(2, 2), torch.tensor([0, 2])), r"\[0, 1\].*got range \[0, 2\]"),
        (nll, (torch.tensor([[3.0, -1.0], [0.5, 0.2]]), torch.tensor([0, 1])), r"not logits"),
        (nll, (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), r"empty"),
        (brier, (torch.rand(2, 2), torch.tensor([[0], [1]])), r"shape \(2,\).*got shape \(2, 1\)"),
        (ece, (PROBS_5, TARGET_5, 0), r"n_bins must be a positive int"),
        (reliability_bins, (PROBS_5, TARGET_5[:4]), r"shape \(5,\).*got shape \(4,\)"),
        (rmse, (torch.zeros(3, 1), torch.zeros(3)), r"same shape.*\(3, 1\) and \(3,\)"),
        (auroc, (torch.tensor([]), torch.tensor([1.0])), r"scores_negative is empty"),
        (auroc, (torch.tensor([1.0]), torch.tensor([])), r"scores_positive is empty"),
        (auroc, (torch.tensor([[1.0]]), torch.tensor([1.0])), r"1-D.*got shape \(1, 1\)"),
        (auroc, (torch.tensor([float("nan")]), torch.tensor([1.0])), r"NaN"),
        (auroc_from_labels, (torch.rand(3), torch.tensor([0, 1, 1])), r"bool tensor"),
        (auroc_from_labels, (torch.rand(3), torch.tensor([True, False])), r"shape \(3,\).*got \(2,\)"),
        (auroc_from_labels, (torch.rand(3), torch.ones(3, dtype=torch.bool)), r"scores_negative is empty"),
        (predictive_entropy, (torch.rand(4, 2, 3),), r"shape \(N, C\).*\(4, 2, 3\).*mean\(0\)"),
        (mutual_information, (torch.rand(2, 3),), r"shape \(T, N, C\).*got shape \(2, 3\)"),
    ],
)
def test_value_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize(
    "mu, y, sigma2, match",
    [
        (torch.zeros(5), torch.zeros(5), 1.0, r"\(T, N\) or \(T, N, D\).*got shape \(5,\)"),
        (torch.zeros(2, 5), torch.zeros(4), 1.0, r"shape \(5,\).*got shape \(4,\)"),
        (torch.zeros(2, 5, 3), torch.zeros(5), 1.0, r"shape \(5, 3\).*got shape \(5,\)"),
        (torch.zeros(2, 5), torch.zeros(5), torch.ones(5), r"shape of mu_samples \(2, 5\).*got shape \(5,\)"),
        (torch.zeros(2, 5), torch.zeros(5), 0.0, r"strictly positive"),
        (torch.zeros(0, 5), torch.zeros(5), 1.0, r"T >= 1 and N >= 1"),
    ],
)
def test_test_log_likelihood_value_errors(mu, y, sigma2, match):
    with pytest.raises(ValueError, match=match):
        gaussian_test_log_likelihood(mu, y, sigma2=sigma2)
