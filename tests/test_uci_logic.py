"""The UCI benchmark's decisions on tiny synthetic inputs whose right answer is known.

Grid selection (highest validation LL), noise calibration (the LL-maximising variance of Gaussian residuals
is their mean square), the best-validation checkpoint (the weights of the best epoch come back), and the MC
test log-likelihood against values worked out by hand. No real training beyond a few tiny steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from benchmarks import uci
from benchmarks.datasets import UCIDataset
from cd_convert.metrics import gaussian_test_log_likelihood


def _tiny_dataset() -> UCIDataset:
    """40 points of a noisy linear function in 3 inputs, one in-memory split, a 4 p x 3 tau grid."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 3.0 + 0.3 * rng.normal(size=40)
    perm = rng.permutation(40)
    return UCIDataset(
        name="tiny",
        X=X,
        y=y,
        n_splits=1,
        n_hidden=8,
        n_epochs=1,
        dropout_rates=[0.005, 0.01, 0.05, 0.1],
        tau_values=[1.0, 4.0, 16.0],
        splits=[(perm[:32], perm[32:])],
    )


# ------------------------------------------------------------------------------------------ MC test LL


def test_mc_test_ll_tau_hand_value_three_samples():
    tau = 2.0
    y = torch.tensor([1.0, 0.0])
    mu = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 3.0]])  # T = 3 samples, 2 points
    # Point 1: squared errors 1, 1, 0 -> log(e^-1 + e^-1 + e^0); point 2: 0, 1, 9 -> log(1 + e^-1 + e^-9).
    const = -math.log(3) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(2.0)
    p1 = math.log(2 * math.exp(-1.0) + 1.0) + const
    p2 = math.log(1.0 + math.exp(-1.0) + math.exp(-9.0)) + const
    assert uci.mc_test_ll_tau(mu, y, tau) == pytest.approx((p1 + p2) / 2, abs=1e-12)
    # The library's metric is the same quantity (sigma^2 = 1 / tau).
    assert gaussian_test_log_likelihood(mu.double(), y.double(), sigma2=1 / tau) == pytest.approx(
        (p1 + p2) / 2, abs=1e-10
    )


def test_mc_test_ll_tau_one_sample_is_gaussian_log_density():
    # T = 1: log N(y; mu, 1/tau) = -0.5 log(2 pi / tau) - 0.5 tau (y - mu)^2, here tau = 4, y - mu = 0.5.
    hand = -0.5 * math.log(2 * math.pi / 4.0) - 0.5 * 4.0 * 0.25
    assert uci.mc_test_ll_tau(torch.tensor([[1.5]]), torch.tensor([2.0]), 4.0) == pytest.approx(hand, abs=1e-12)


# ------------------------------------------------------------------------------------------ selection

# Validation LL over 4 p x 3 tau; the best (-0.9) sits at p index 2, tau index 1, away from every edge.
FAKE_GRID = np.array(
    [
        [-3.0, -2.5, -2.8],
        [-2.0, -1.5, -1.9],
        [-1.2, -0.9, -1.1],
        [-4.0, -3.5, -3.9],
    ]
)


def test_select_best_picks_highest_validation_ll():
    assert uci.select_best(FAKE_GRID) == (2, 1)
    assert uci.select_best([-3.0, -1.0, -2.0]) == (1,)


def test_select_best_tie_goes_to_first_in_row_major_order():
    grid = np.array([[-2.0, -1.0], [-1.0, -3.0]])  # equal best at (0, 1) and (1, 0)
    assert uci.select_best(grid) == (0, 1)
    assert uci.select_best([-1.0, -5.0, -1.0]) == (0,)


def test_run_dataset_refits_the_selected_point(monkeypatch):
    """The grid and concrete_tau methods refit the point with the best fake validation LL."""
    ds = _tiny_dataset()
    assert FAKE_GRID.shape == (len(ds.dropout_rates), len(ds.tau_values))
    grid_calls, tau_calls = [], []

    def fake_grid_point(fold, hidden, p, tau, epochs, samples, seed):
        grid_calls.append((p, tau))
        ll = FAKE_GRID[ds.dropout_rates.index(p), ds.tau_values.index(tau)]
        return 1.0, float(ll)

    tau_ll = [-2.0, -3.0, -0.5]  # best tau: index 2

    def fake_concrete_tau(fold, hidden, tau, epochs, samples, seed):
        tau_calls.append(tau)
        return 1.0, tau_ll[ds.tau_values.index(tau)], [0.1, 0.2]

    monkeypatch.setattr(uci, "run_grid_point", fake_grid_point)
    monkeypatch.setattr(uci, "run_concrete_tau", fake_concrete_tau)
    r = uci.run_dataset(ds, 1, 1, 2, seed=0, eval_every=1, val_samples=2, methods=("grid", "concrete_tau"))

    grid_rec, tau_rec = r["records"]["grid"][0], r["records"]["concrete_tau"][0]
    assert (grid_rec["p"], grid_rec["tau"]) == (0.05, ds.tau_values[1])
    assert grid_calls[-1] == (0.05, ds.tau_values[1])  # the refit run is the chosen point
    np.testing.assert_array_equal(r["val_grid"], FAKE_GRID)
    assert tau_rec["tau"] == ds.tau_values[2] == tau_calls[-1]
    assert tau_rec["val_ll"] == -0.5


# ------------------------------------------------------------------------------------------ calibration


def _best_log_variance(mean_square: float, y_std: float) -> float:
    """The LL-maximising log-variance of a Gaussian with these residuals, in standardised units.

    d/dv [-0.5 log(2 pi v) - m / (2 v)] = 0 at v = m (the mean square residual); s = log(v / y_std^2).
    """
    return math.log(mean_square / y_std**2)


def test_best_noise_is_mean_square_of_gaussian_residuals():
    g = torch.Generator().manual_seed(0)
    y_std, sigma = 2.0, 0.7
    resid = sigma * torch.randn(200, generator=g, dtype=torch.float64)
    mu = torch.zeros(5, 200, dtype=torch.float64)  # 5 identical MC samples: the mixture is one Gaussian
    s_star = _best_log_variance(float(resid.pow(2).mean()), y_std)
    # Start 1.25 above the optimum, so that the optimum is a candidate (offset -1.25 on the 0.05 grid).
    best = uci.best_noise_log_variance(mu, resid, y_std, s_star + 1.25)
    assert best == pytest.approx(s_star, abs=1e-9)
    assert math.exp(best) * y_std**2 == pytest.approx(sigma**2, rel=0.25)  # and near the true sigma^2


def test_best_noise_uses_the_mc_mixture_not_the_mc_mean():
    # Samples +a and -a around y = 0: the mean prediction is exact, but every mixture component misses
    # by a, so the mixture LL is log N(0; a, v), maximal at v = a^2 (standardised: y_std = 1).
    a = 0.5
    mu = torch.tensor([[a, a, a], [-a, -a, -a]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.float64)
    s_star = math.log(a**2)
    assert uci.best_noise_log_variance(mu, y, 1.0, s_star - 2.0) == pytest.approx(s_star, abs=1e-9)


def test_calibrate_noise_on_a_model_with_a_constant_output():
    """Zero weights make every MC pass output fc2's bias, so the best variance is known in closed form."""
    y_mean, y_std = 1.0, 2.0
    y_eval = torch.tensor([2.0 + 3.0, 2.0 - 3.0, 2.0 + 1.0, 2.0 - 1.0], dtype=torch.float64)  # residuals +-3, +-1
    s_star = _best_log_variance((9 + 9 + 1 + 1) / 4, y_std)  # log(5 / 4)
    net = uci.NoiseNet(3, 4)
    with torch.no_grad():
        net.fc1.weight.zero_()
        net.fc2.weight.zero_()
        net.fc2.bias.fill_(0.5)  # standardised: prediction 0.5 * y_std + y_mean = 2.0 in original units
        net.log_var.fill_(s_star + 0.8)  # the optimum is the candidate at offset -0.8
    model = cd_convert.convert(net, targets=[nn.Linear], dataset_size=10, length_scale=1e-2, loss="heteroscedastic")
    fold = uci.Fold(torch.zeros(1, 3), torch.zeros(1), torch.randn(4, 3), y_eval, y_mean, y_std)
    best = uci.calibrate_noise(model, fold, samples=3, seed=0)
    assert best == pytest.approx(s_star, abs=1e-6)  # log_var is float32: s0 carries its rounding
    assert float(model.log_var.detach()) == pytest.approx(s_star, abs=1e-6)  # written into the model


# ------------------------------------------------------------------------------------------ checkpoint


def test_eval_epochs_every_k_and_the_last():
    assert [e for e in range(1, 11) if uci.is_eval_epoch(e, 4, 10)] == [4, 8, 10]
    assert [e for e in range(1, 4) if uci.is_eval_epoch(e, 1, 3)] == [1, 2, 3]


def test_best_state_keeps_the_earlier_of_equal_scores():
    model = nn.Linear(1, 1)
    best = uci.BestState()
    for epoch, score in enumerate([1.0, 3.0, 3.0, 2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        best.offer(model, score, epoch)
    assert (best.score, best.epoch) == (3.0, 2)
    best.restore(model)
    assert float(model.weight.detach()) == 2.0


class _Line(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


@pytest.mark.parametrize(
    "eval_every, scores, best_epoch",
    [
        (1, [0.1, 0.5, 0.9, 0.2, 0.3, 0.4], 3),  # best in the middle: the last state must not survive
        (4, [0.2, 0.1], 4),  # checks at epochs 4 and 6 only (every 4th and the last); epoch 4 wins
    ],
)
def test_train_keep_best_restores_the_best_epochs_weights(eval_every, scores, best_epoch):
    torch.manual_seed(0)
    model = _Line()
    x = torch.randn(16, 2)
    fold = uci.Fold(x, x @ torch.tensor([1.0, -2.0]) + 0.5, x, torch.zeros(16, dtype=torch.float64), 0.0, 1.0)
    epochs = 6
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate() -> float:
        # Each check must find the model back in training mode, then switches it off, as an eval would.
        assert model.training
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        model.eval()
        return scores[len(snapshots) - 1]

    def train(on_epoch):
        uci._train(model, fold, epochs, 0, lambda m, xb, yb: F.mse_loss(m(xb), yb), on_epoch)

    best = uci.train_keep_best(model, train, validate, epochs, eval_every)
    assert len(snapshots) == len(scores)
    assert (best.score, best.epoch) == (max(scores), best_epoch)
    want = snapshots[scores.index(max(scores))]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    # Training moved the weights after the best epoch (the last check differs), so restoring mattered.
    assert not torch.equal(snapshots[-1]["fc.weight"], want["fc.weight"])


def test_run_concrete_tests_the_best_validation_state(monkeypatch):
    """With fake validation scores peaking at epoch 2 of 4, the test evaluation sees epoch 2's weights."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    fake_val = [-3.0, -1.0, -2.0, -2.5]
    seen: list[dict[str, torch.Tensor]] = []
    real_eval = uci._hetero_eval

    def spy(model, x, y, y_mean, y_std, samples, seed):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        rmse, ll = real_eval(model, x, y, y_mean, y_std, samples, seed)
        return (rmse, fake_val[len(seen) - 1]) if len(seen) <= len(fake_val) else (rmse, ll)

    monkeypatch.setattr(uci, "_hetero_eval", spy)
    out = uci.run_concrete(
        ds, train_idx, test_idx, hidden=8, epochs=4, samples=4, seed=0, eval_every=1, val_samples=2, calibrate=False
    )
    assert len(seen) == 5  # 4 validation checks, then the test evaluation
    assert out[4:] == (-1.0, 2)  # best validation ll and epoch
    for k, v in seen[-1].items():
        torch.testing.assert_close(v, seen[1][k], rtol=0, atol=0)
    assert not torch.equal(seen[3]["fc1.weight"], seen[1]["fc1.weight"])  # epoch 4 differs from epoch 2
