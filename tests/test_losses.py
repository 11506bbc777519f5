"""Tests for cd_convert.losses against hand values and torch's own Gaussian densities."""

from __future__ import annotations

import math

import pytest
import torch

from cd_convert.losses import gaussian_mixture_nll, gaussian_nll, heteroscedastic_gaussian

LOG_2PI = math.log(2 * math.pi)


def test_hand_values():
    mean, target = torch.tensor([1.0]), torch.tensor([3.0])
    # s = 0: exp(0) * (3 - 1)^2 + 0 = 4
    s = torch.tensor([0.0])
    assert heteroscedastic_gaussian(mean, s, target).item() == pytest.approx(4.0)
    assert gaussian_nll(mean, s, target).item() == pytest.approx(0.5 * (4.0 + LOG_2PI))
    # s = log 2: exp(-log 2) * 4 + log 2 = 2 + log 2
    s = torch.tensor([math.log(2.0)])
    assert heteroscedastic_gaussian(mean, s, target).item() == pytest.approx(2.0 + math.log(2.0))


def test_hand_values_multioutput_sum_over_d_mean_over_n():
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    s = torch.zeros(2, 2)
    # ex0: 1 + 4 = 5; ex1: 0 + 1 = 1 -> mean 3, sum 6
    assert heteroscedastic_gaussian(mean, s, target).item() == pytest.approx(3.0)
    assert heteroscedastic_gaussian(mean, s, target, reduction="sum").item() == pytest.approx(6.0)
    none = heteroscedastic_gaussian(mean, s, target, reduction="none")
    assert none.tolist() == pytest.approx([5.0, 1.0])


@pytest.mark.parametrize("shape", [(7,), (7, 1), (7, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_heteroscedastic_is_twice_nll_minus_log_2pi_per_dim(shape, reduction):
    g = torch.Generator().manual_seed(0)
    mean, target, s = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    d = 1 if len(shape) == 1 else shape[1]
    n_examples = {"mean": 1, "sum": shape[0], "none": 1}[reduction]  # constant is per example
    het = heteroscedastic_gaussian(mean, s, target, reduction=reduction)
    nll = gaussian_nll(mean, s, target, reduction=reduction)
    assert torch.allclose(het, 2 * nll - n_examples * d * LOG_2PI, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6,), (6, 4)])
def test_gaussian_nll_matches_torch_normal_log_prob(shape):
    g = torch.Generator().manual_seed(1)
    mean, target, s = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    log_prob = torch.distributions.Normal(mean, torch.exp(0.5 * s)).log_prob(target)
    per_example = -log_prob.reshape(shape[0], -1).sum(1)
    assert torch.allclose(gaussian_nll(mean, s, target, reduction="none"), per_example, rtol=1e-12)
    assert torch.allclose(gaussian_nll(mean, s, target), per_example.mean(), rtol=1e-12)
    # torch's gaussian_nll_loss (full=True) sums over every element for reduction="sum".
    ref = torch.nn.functional.gaussian_nll_loss(mean, target, torch.exp(s), full=True, reduction="sum")
    assert torch.allclose(gaussian_nll(mean, s, target, reduction="sum"), ref, rtol=1e-12)


def test_broadcast_log_variance_homoscedastic():
    g = torch.Generator().manual_seed(2)
    mean, target = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    s_dim = torch.tensor([0.1, -0.2, 0.3])  # one learned log variance per output dim
    full = s_dim.expand(5, 3)
    assert torch.allclose(gaussian_nll(mean, s_dim, target), gaussian_nll(mean, full, target))
    s_column = torch.tensor([[0.1], [0.2], [-0.1], [0.0], [0.4]])  # one per example, shared by the output dims
    assert torch.allclose(gaussian_nll(mean, s_column, target), gaussian_nll(mean, s_column.expand(5, 3), target))
    s_scalar = torch.tensor(0.5)
    assert torch.allclose(
        heteroscedastic_gaussian(mean, s_scalar, target),
        heteroscedastic_gaussian(mean, s_scalar.expand(5, 3), target),
    )


def test_gradients_flow():
    mean = torch.randn(4, 2, requires_grad=True)
    s = torch.zeros(4, 2, requires_grad=True)
    heteroscedastic_gaussian(mean, s, torch.randn(4, 2)).backward()
    assert mean.grad is not None and torch.isfinite(mean.grad).all()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss", [heteroscedastic_gaussian, gaussian_nll])
@pytest.mark.parametrize(
    "mean, s, target, reduction, match",
    [
        (torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4), "mean", r"as mean \(4, 1\).*\(4,\)"),
        (torch.zeros(4), torch.zeros(4, 1), torch.zeros(4), "mean", r"broadcast.*got shape \(4, 1\)"),
        (torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(4, 2), "mean", r"\(4, 2\).*got shape \(3, 2\)"),
        (torch.zeros(4, 2), torch.zeros(3), torch.zeros(4, 2), "mean", r"\(4, 2\).*got shape \(3,\)"),
        (torch.zeros(4, 2), torch.zeros(1, 4, 2), torch.zeros(4, 2), "mean", r"got shape \(1, 4, 2\)"),
        (torch.zeros(4), torch.zeros(4), torch.zeros(4), "avg", r"reduction must be one of"),
        (torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0), "mean", r"N >= 1.*got shape \(\)"),
        (torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), "mean", r"N >= 1.*got shape \(0, 2\)"),
    ],
)
def test_value_errors(loss, mean, s, target, reduction, match):
    with pytest.raises(ValueError, match=match):
        loss(mean, s, target, reduction=reduction)


# ------------------------------------------------------------------------------ gaussian_mixture_nll


def test_mixture_hand_values():
    target = torch.tensor([1.0])
    # Both samples one unit away, unit variance: the mixture is each component's density, 0.5 + 0.5 log 2pi.
    mean = torch.tensor([[0.0], [2.0]])
    assert gaussian_mixture_nll(mean, torch.zeros(()), target).item() == pytest.approx(0.5 + 0.5 * LOG_2PI)
    # One sample on the target, one 9 units off (density e^-40.5, negligible): -log(0.5 / sqrt(2 pi)).
    mean = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    assert gaussian_mixture_nll(mean, torch.zeros((), dtype=torch.float64), target.double()).item() == pytest.approx(
        math.log(2.0) + 0.5 * LOG_2PI, rel=1e-12
    )
    # The target 30 units from both (no underflow): both components equal, so 0.5 * 900 + 0.5 log 2pi.
    mean = torch.tensor([[31.0], [-29.0]])
    assert gaussian_mixture_nll(mean, torch.zeros(()), target).item() == pytest.approx(450.0 + 0.5 * LOG_2PI)


def test_mixture_of_one_sample_is_gaussian_nll():
    g = torch.Generator().manual_seed(3)
    mean, target, s = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for reduction in ("mean", "sum", "none"):
        assert torch.allclose(
            gaussian_mixture_nll(mean[None], s[None], target, reduction=reduction),
            gaussian_nll(mean, s, target, reduction=reduction),
            rtol=1e-12,
        )


def test_mixture_matches_a_mixture_distribution():
    g = torch.Generator().manual_seed(4)
    t, n, d = 6, 5, 3
    mean = torch.randn(t, n, d, generator=g, dtype=torch.float64)
    s = torch.randn(t, n, d, generator=g, dtype=torch.float64) * 0.3
    target = torch.randn(n, d, generator=g, dtype=torch.float64)
    components = torch.distributions.Independent(
        torch.distributions.Normal(mean.transpose(0, 1), torch.exp(0.5 * s).transpose(0, 1)), 1
    )
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(n, t, dtype=torch.float64)), components
    )
    expected = -mixture.log_prob(target)
    assert torch.allclose(gaussian_mixture_nll(mean, s, target, reduction="none"), expected, rtol=1e-12)
    assert torch.allclose(gaussian_mixture_nll(mean, s, target), expected.mean(), rtol=1e-12)


def test_mixture_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn((), generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randn(3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, v: gaussian_mixture_nll(m, v, target), (mean, s))


def test_mixture_prefers_spread_that_covers_the_target():
    # Why it is the held-out objective: with noise sd 0.1, one sample on the target and one 5 sd off beat two
    # samples that agree 2.5 sd off (mixture 0.5 * (phi(0) + phi(5)) > phi(2.5)), whereas the single-sample NLL
    # averaged over the samples (the training loss's view: each sample charged in full) prefers the agreement.
    target, s = torch.tensor([0.0]), torch.tensor(math.log(0.01))
    spread = torch.tensor([[0.0], [0.5]])
    agreed = torch.tensor([[0.25], [0.25]])
    assert gaussian_mixture_nll(spread, s, target) < gaussian_mixture_nll(agreed, s, target)
    each = lambda m: gaussian_nll(m.reshape(2), s, target.expand(2))  # noqa: E731
    assert each(spread) > each(agreed)


@pytest.mark.parametrize(
    "mean, s, target, reduction, match",
    [
        (torch.zeros(4), torch.zeros(()), torch.zeros(4), "mean", r"\(T, N\).*got shape \(4,\)"),
        (torch.zeros(0, 4), torch.zeros(()), torch.zeros(4), "mean", r"T >= 1.*got shape \(0, 4\)"),
        (torch.zeros(2, 4), torch.zeros(()), torch.zeros(4, 1), "mean", r"shape \(4,\).*got shape \(4, 1\)"),
        (torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(4), "mean", r"broadcast.*got shape \(3, 4\)"),
        (torch.zeros(2, 4), torch.zeros(()), torch.zeros(4), "avg", r"reduction must be one of"),
    ],
)
def test_mixture_value_errors(mean, s, target, reduction, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mixture_nll(mean, s, target, reduction=reduction)
