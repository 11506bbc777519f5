"""The UCI benchmark's decisions on tiny synthetic inputs whose right answer is known.

Grid selection (highest validation LL), noise calibration (the LL-maximising variance of Gaussian residuals
is their mean square), the best-validation checkpoint (the weights of the best epoch come back), and the MC
test log-likelihood against values worked out by hand. No real training beyond a few tiny steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from benchmarks import uci, uci_merge
from benchmarks.datasets import UCIDataset, load_published, validation_split
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

    monkeypatch.setattr(uci.driver, "run_grid_point", fake_grid_point)
    monkeypatch.setattr(uci.driver, "run_concrete_tau", fake_concrete_tau)
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
        uci.training._train(model, fold, epochs, 0, lambda m, xb, yb: F.mse_loss(m(xb), yb), on_epoch)

    best = uci.train_keep_best(model, train, validate, epochs, eval_every)
    assert len(snapshots) == len(scores)
    assert (best.score, best.epoch) == (max(scores), best_epoch)
    want = snapshots[scores.index(max(scores))]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    # Training moved the weights after the best epoch (the last check differs), so restoring mattered.
    assert not torch.equal(snapshots[-1]["fc.weight"], want["fc.weight"])


def _spy_on_evaluations(monkeypatch, fake_val: list[float]) -> list[dict[str, torch.Tensor]]:
    """Make ``uci.concrete._hetero_eval`` record the model's state at each call and report ``fake_val[i]`` as the LL of
    the i-th call (the real LL after those). Returns the list the states are appended to."""
    seen: list[dict[str, torch.Tensor]] = []
    real_eval = uci.concrete._hetero_eval

    def spy(model, x, y, y_mean, y_std, samples, seed):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        rmse, ll = real_eval(model, x, y, y_mean, y_std, samples, seed)
        return (rmse, fake_val[len(seen) - 1]) if len(seen) <= len(fake_val) else (rmse, ll)

    monkeypatch.setattr(uci.concrete, "_hetero_eval", spy)
    return seen


def test_run_concrete_tests_the_best_validation_state(monkeypatch):
    """With fake validation scores peaking at epoch 2 of 4, the test evaluation sees epoch 2's weights."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    seen = _spy_on_evaluations(monkeypatch, [-3.0, -1.0, -2.0, -2.5])
    out = uci.run_concrete(
        ds, train_idx, test_idx, hidden=8, epochs=4, samples=4, seed=0, eval_every=1, val_samples=2, calibrate=False
    )
    assert len(seen) == 5  # 4 validation checks, then the test evaluation
    assert (out["val_ll"], out["best_epoch"], out["epochs_run"], out["noise_offset"]) == (-1.0, 2, 4, 0.0)
    for k, v in seen[-1].items():
        torch.testing.assert_close(v, seen[1][k], rtol=0, atol=0)
    assert not torch.equal(seen[3]["fc1.weight"], seen[1]["fc1.weight"])  # epoch 4 differs from epoch 2


@pytest.mark.parametrize(
    "epoch, best_epoch, patience, stop",
    [(10, 4, 6, True), (10, 5, 6, False), (10, 4, 0, False), (4, 4, 1, False), (5, 4, 1, True)],
)
def test_should_stop_after_patience_epochs_without_improvement(epoch, best_epoch, patience, stop):
    assert uci.should_stop(epoch, best_epoch, patience) is stop


def test_train_keep_best_stops_early_and_keeps_the_best_state():
    """Scores peak at the 2nd check (epoch 4 of 20, checks every 2): with patience 4, training ends at the
    check of epoch 8 (4 epochs later) and epoch 4's weights come back."""
    torch.manual_seed(0)
    model = _Line()
    x = torch.randn(16, 2)
    fold = uci.Fold(x, x @ torch.tensor([1.0, -2.0]) + 0.5, x, torch.zeros(16, dtype=torch.float64), 0.0, 1.0)
    scores = [0.1, 0.5, 0.4, 0.3, 0.9, 1.0]  # the later, better checks are never reached
    trained: list[int] = []
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate() -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return scores[len(snapshots) - 1]

    def train(on_epoch):
        def counting(epoch: int) -> bool:
            trained.append(epoch)
            return on_epoch(epoch)

        uci.training._train(model, fold, 20, 0, lambda m, xb, yb: F.mse_loss(m(xb), yb), counting)

    best = uci.train_keep_best(model, train, validate, epochs=20, eval_every=2, patience=4)
    assert trained == list(range(1, 9))
    assert (best.score, best.epoch, best.last_epoch, len(snapshots)) == (0.5, 4, 8, 4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0)


def test_refit_trains_on_the_whole_split_for_the_chosen_epochs_and_tests_with_the_first_runs_noise(monkeypatch):
    """The refit's fitting set is the whole training split (not its first 80%), it runs the given number of
    epochs, and it is tested with the first run's precision; the diagnostic scores the same samples with the
    refit's learned log-variance plus the offset (the earlier rule)."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    calls: dict = {}
    real_train, real_samples = uci.concrete._train, uci.concrete._hetero_samples

    def spy_train(model, fold, epochs, seed, loss_fn, on_epoch=None):
        calls["rows"], calls["epochs"] = fold.x_fit.shape[0], epochs
        real_train(model, fold, epochs, seed, loss_fn, on_epoch)
        calls["trained_log_var"] = float(model.log_var.detach())

    def spy_samples(model, x, y_mean, y_std, samples, seed):
        calls["test_log_var"], calls["test_rows"] = float(model.log_var.detach()), x.shape[0]
        calls["mu"], calls["sigma2"] = real_samples(model, x, y_mean, y_std, samples, seed)
        return calls["mu"], calls["sigma2"]

    monkeypatch.setattr(uci.concrete, "_train", spy_train)
    monkeypatch.setattr(uci.concrete, "_hetero_samples", spy_samples)
    out = uci.refit_concrete(
        ds, train_idx, test_idx, hidden=8, epochs=3, samples=4, seed=0, first_tau=2.0, noise_offset=-0.75
    )
    assert (calls["rows"], calls["epochs"], calls["test_rows"]) == (32, 3, 8)
    y_std = float(np.std(ds.y[train_idx]))
    # Precision 2.0 in original units is the log-variance log(1 / (2 y_std^2)) in the refit's standardised units.
    assert calls["test_log_var"] == pytest.approx(math.log(1 / (2.0 * y_std**2)), abs=1e-6)
    assert out["tau"] == pytest.approx(2.0, rel=1e-5)
    y = torch.as_tensor(ds.y[test_idx], dtype=torch.float64)

    def hand_ll(precision: float) -> float:  # MC mixture of Gaussians, written out
        per_point = (
            torch.logsumexp(-0.5 * precision * (y - calls["mu"]) ** 2, 0)
            - math.log(4)
            + 0.5 * math.log(precision / (2 * math.pi))
        )
        return float(per_point.mean())

    assert out["ll"] == pytest.approx(hand_ll(2.0), rel=1e-6)
    offset_precision = 1 / (math.exp(calls["trained_log_var"] - 0.75) * y_std**2)
    assert out["ll_offset_noise"] == pytest.approx(hand_ll(offset_precision), rel=1e-6)
    assert "ll_offset_noise" not in uci.refit_concrete(
        ds, train_idx, test_idx, hidden=8, epochs=1, samples=4, seed=0, first_tau=2.0
    )


def _fake_first_and_refit_runs(monkeypatch, rates: list[float]) -> tuple[dict, list, list]:
    """Replace ``run_concrete`` and ``refit_concrete`` by fakes that record their calls.

    Returns:
        ``(first, runs, refits)``: the first run's record (best epoch 7 of 9, offset 0.25, ``rates``; change it to
        change what later calls return), the first runs' ``(args, kwargs)`` and the refits' ``(args, kwargs)``.
    """
    first = dict(rmse=1.0, ll=-2.0, rates=rates, tau=3.0, val_ll=-1.5, best_epoch=7, epochs_run=9, noise_offset=0.25)
    runs, refits = [], []
    monkeypatch.setattr(uci.driver, "run_concrete", lambda *a, **k: runs.append((a, k)) or dict(first))
    monkeypatch.setattr(
        uci.driver,
        "refit_concrete",
        lambda *a, **k: refits.append((a, k)) or dict(rmse=0.5, ll=-1.0, rates=[0.1, 0.1], tau=4.0),
    )
    return first, runs, refits


def test_concrete_refit_reuses_the_first_run_and_refits_its_best_epoch(monkeypatch):
    """``concrete`` and ``concrete_refit`` share one first run; the refit gets its best epoch and offset."""
    ds = _tiny_dataset()
    first, runs, refits = _fake_first_and_refit_runs(monkeypatch, [0.1, 0.2])
    r = uci.run_dataset(ds, 1, 10, 2, 0, 1, 2, methods=("concrete", "concrete_refit"), patience=3)
    assert len(runs) == 1 and runs[0][0][-1] == 3  # one first run, with the patience passed on
    (_, _, _, _, epochs, _, _), kwargs = refits[0]
    assert (epochs, kwargs["noise_offset"], kwargs["first_tau"]) == (7, 0.25, 3.0)
    c, rf = r["records"]["concrete"][0], r["records"]["concrete_refit"][0]
    assert (c["ll"], c["train_runs"], rf["ll"], rf["train_runs"], rf["refit_epochs"]) == (-2.0, 1, -1.0, 2, 7)
    assert rf["first_run"]["best_epoch"] == 7
    # A run whose checks were all NaN (diverged) kept no state (best epoch 0): the refit trains the epochs it ran.
    first.update(best_epoch=0, val_ll=-math.inf)
    uci.run_dataset(ds, 1, 10, 2, 0, 1, 2, methods=("concrete_refit",), patience=3)
    assert refits[-1][0][4] == 9


def test_concrete_tau_stop_picks_tau_by_its_best_check_and_refits_for_that_many_epochs(monkeypatch):
    ds = _tiny_dataset()  # tau grid 1, 4, 16
    checks = {1.0: (-3.0, 50), 4.0: (-1.0, 30), 16.0: (-2.0, 90)}
    refits = []
    monkeypatch.setattr(
        uci.driver,
        "run_concrete_tau_keep_best",
        lambda fold, hidden, tau, *a: dict(val_ll=checks[tau][0], best_epoch=checks[tau][1], rates=[0.1, 0.2]),
    )

    def fake_refit(fold, hidden, tau, epochs, samples, seed):
        refits.append((fold.x_fit.shape[0], tau, epochs))
        return 1.0, -1.5, [0.1, 0.1]

    monkeypatch.setattr(uci.driver, "run_concrete_tau", fake_refit)
    r = uci.run_dataset(ds, 1, 100, 2, 0, 10, 2, methods=("concrete_tau_stop",), patience=25)
    assert refits == [(32, 4.0, 30)]  # the whole training split, the chosen tau, its best check's epoch
    rec = r["records"]["concrete_tau_stop"][0]
    assert (rec["tau"], rec["best_epoch"], rec["val_ll"], rec["ll"], rec["train_runs"]) == (4.0, 30, -1.0, -1.5, 4)


# ------------------------------------------------------------------------------------------ grid_calibrated


def test_calibrate_grid_tau_on_a_model_with_a_constant_output():
    """Zero weights make every pass output fc2's bias: the best tau is 1 / (mean square residual)."""
    y_mean, y_std = 1.0, 2.0
    y_eval = torch.tensor([2.0 + 3.0, 2.0 - 3.0, 2.0 + 1.0, 2.0 - 1.0], dtype=torch.float64)  # residuals +-3, +-1
    s_star = _best_log_variance((9 + 9 + 1 + 1) / 4, y_std)
    net = uci.GridNet(3, 4, p=0.5)
    with torch.no_grad():
        net.fc1.weight.zero_()
        net.fc2.weight.zero_()
        net.fc2.bias.fill_(0.5)  # 0.5 * y_std + y_mean = 2.0 in original units
    # Trained tau whose log-variance sits 0.8 above the optimum (a candidate at offset -0.8).
    tau0 = 1.0 / (math.exp(s_star + 0.8) * y_std**2)
    fold = uci.Fold(torch.zeros(1, 3), torch.zeros(1), torch.randn(4, 3), y_eval, y_mean, y_std)
    assert uci.calibrate_grid_tau(net, fold, tau0, samples=3, seed=0) == pytest.approx(1 / 5.0, rel=1e-9)


# ------------------------------------------------------------------------------------------ published results


def _write_published(root, name: str, ll: list[float], rmse: list[float]) -> None:
    """The real format: one value per line, split K on line K+1, in ``uci-published/<name>/``."""
    folder = root / "uci-published" / name
    folder.mkdir(parents=True)
    (folder / "test_ll.txt").write_text("".join(f"{v!r}\n" for v in ll))
    (folder / "test_MC_rmse.txt").write_text("".join(f"{v!r}\n" for v in rmse))


def test_load_published_reads_one_value_per_split(tmp_path, monkeypatch):
    _write_published(tmp_path, "yacht", [-1.3110059312080142, -1.25, -0.5], [0.885646995095317, 0.6, 2.0])
    got = load_published("yacht", tmp_path)
    assert got == {"ll": [-1.3110059312080142, -1.25, -0.5], "rmse": [0.885646995095317, 0.6, 2.0]}
    monkeypatch.setenv("CD_CONVERT_DATA", str(tmp_path))  # the data directory from the environment
    assert load_published("yacht") == got
    assert load_published("energy", tmp_path) is None  # absent: no comparison, no error
    _write_published(tmp_path, "short", [-1.0, -2.0], [1.0])
    with pytest.raises(ValueError, match="2 LL values but 1 RMSE"):
        load_published("short", tmp_path)


def test_compare_with_published_pairs_the_same_splits():
    published = {"ll": [-1.0, -2.0, -3.0, -4.0, -5.0], "rmse": [1.0, 2.0, 3.0, 4.0, 5.0]}
    records = [dict(split=3, ll=-3.5, rmse=3.0), dict(split=0, ll=0.0, rmse=1.5)]
    v = uci.compare_with_published(records, published)
    assert v["splits"] == [3, 0]
    # LL differences: -3.5 - (-4) = 0.5 and 0 - (-1) = 1.0 -> mean 0.75, se = std(ddof=0) / sqrt(2) = 0.25 / 1.414
    assert v["ll_diff_mean"] == pytest.approx(0.75, abs=1e-12)
    assert v["ll_diff_se"] == pytest.approx(0.25 / math.sqrt(2), abs=1e-12)
    assert v["ll_published"] == pytest.approx(-2.5, abs=1e-12)  # mean of splits 3 and 0, not of all five (-3)
    assert v["ll_published_se"] == pytest.approx(1.5 / math.sqrt(2), abs=1e-12)  # -4 and -1: std 1.5
    # RMSE differences: 3 - 4 = -1 and 1.5 - 1 = 0.5 -> mean -0.25, se 0.75 / sqrt(2).
    assert v["rmse_diff_mean"] == pytest.approx(-0.25, abs=1e-12)
    assert v["rmse_diff_se"] == pytest.approx(0.75 / math.sqrt(2), abs=1e-12)
    assert v["rmse_published"] == pytest.approx(2.5, abs=1e-12)
    assert v["rmse_published_se"] == pytest.approx(1.5 / math.sqrt(2), abs=1e-12)
    assert uci.compare_with_published([dict(split=7, ll=0.0, rmse=0.0)], published) is None  # no such split


def test_run_dataset_summary_and_table_compare_with_published(monkeypatch):
    ds = _tiny_dataset()
    monkeypatch.setattr(uci.driver, "run_grid_point", lambda fold, hidden, p, tau, *a: (2.0, -1.0))
    published = {"ll": [-1.5], "rmse": [2.5]}
    r = uci.run_dataset(ds, 1, 1, 2, seed=0, eval_every=1, val_samples=2, methods=("grid",), published=published)
    v = r["summary"]["grid"]["vs_published"]
    assert (v["ll_diff_mean"], v["rmse_diff_mean"], v["splits"]) == (0.5, -0.5, [0])
    assert "| 0.500 ± 0.000 (pub. -1.500) | -0.500 ± 0.000 (pub. 2.500) |" in uci.format_table("tiny", r)
    assert r["published"] == published  # kept for uci_merge


# ------------------------------------------------------------------------------------------ cost


def test_forward_pass_count_of_a_tiny_run(monkeypatch):
    """Counts worked out by hand for batch 10: the fit set (25 rows) has 3 batches, the training split (32) 4."""
    monkeypatch.setattr(uci.training, "BATCH_SIZE", 10)
    ds = _tiny_dataset()
    epochs, samples, eval_every, val_samples = 3, 3, 2, 2  # checks at epochs 2 and 3
    r = uci.run_dataset(ds, 1, epochs, samples, 0, eval_every, val_samples, methods=uci.ALL_METHODS)
    want = {
        # 12 points x 3 batches x 3 epochs + refit 4 x 3; MC: 12 validations x 3 + test 3.
        "grid": (12 * 3 * 3 + 4 * 3, 12 * 3 + 3),
        # 12 points x 3 x 3; MC: 12 points x 2 checks x 2 + calibration 2 + test 3.
        "grid_calibrated": (12 * 3 * 3, 12 * 2 * 2 + 2 + 3),
        # 3 taus x 3 x 3 + refit 4 x 3; MC: 3 validations x 3 + test 3.
        "concrete_tau": (3 * 3 * 3 + 4 * 3, 3 * 3 + 3),
        # 3 x 3; MC: 2 checks x 2 + calibration 2 + test 3.
        "concrete": (3 * 3, 2 * 2 + 2 + 3),
        # concrete's run, then the refit: best epoch (2 or 3) x 4 batches; MC: concrete's + test 3.
        "concrete_refit": (3 * 3 + r["records"]["concrete"][0]["best_epoch"] * 4, 2 * 2 + 2 + 3 + 3),
        # 3 taus x 3 x 3 + refit at the chosen run's best epoch x 4; MC: 3 taus x 2 checks x 2 + test 3.
        "concrete_tau_stop": (3 * 3 * 3 + r["records"]["concrete_tau_stop"][0]["best_epoch"] * 4, 3 * 2 * 2 + 3),
        # concrete's batches, plus a rate step per epoch on the held-out set (7 rows: one batch) counted as
        # HELDOUT_SAMPLES passes; MC as concrete.
        "concrete_heldout": (3 * 3 + 3 * uci.heldout.HELDOUT_SAMPLES, 2 * 2 + 2 + 3),
        # concrete's run (the freeze changes which parameters train, not the batches or checks).
        "concrete_freeze": (3 * 3, 2 * 2 + 2 + 3),
        # concrete_freeze's run, then its refit: best epoch x 4 batches; MC: concrete_freeze's + test 3.
        "concrete_freeze_refit": (
            3 * 3 + r["records"]["concrete_freeze"][0]["best_epoch"] * 4,
            2 * 2 + 2 + 3 + 3,
        ),
        # concrete_freeze's run, then its warm epochs on the training split (4 batches each); MC as concrete.
        "concrete_freeze_warm": (3 * 3 + r["records"]["concrete_freeze_warm"][0]["warm_epochs"] * 4, 2 * 2 + 2 + 3),
        # the same, its warm epochs at a decaying learning rate: the same batches and passes.
        "concrete_freeze_warm_decay": (
            3 * 3 + r["records"]["concrete_freeze_warm_decay"][0]["warm_epochs"] * 4,
            2 * 2 + 2 + 3,
        ),
    }
    for m, (train, mc) in want.items():
        rec = r["records"][m][0]
        assert (rec["train_batches"], rec["mc_passes"], rec["forward_passes"]) == (train, mc, train + mc), m
        assert r["summary"][m]["forward_passes"] == train + mc


def test_merge_compares_the_merged_splits_with_published(tmp_path):
    """Two pieces of a protocol (splits 0 and 2) merge into one comparison over exactly those splits."""
    published = {"ll": [-1.0, -2.0, -3.0], "rmse": [1.0, 2.0, 3.0]}
    paths = []
    for k, ll in ((0, -1.5), (2, -2.0)):
        piece = {
            "tiny": {
                "records": {"grid": [dict(split=k, ll=ll, rmse=1.0, train_runs=1, wall_s=0.0)]},
                "splits": 1,
                "val_grid": None,
                "published": published,
            }
        }
        paths.append(str(tmp_path / f"piece{k}.details.json"))
        with open(paths[-1], "w") as fh:
            json.dump(piece, fh)
    v = uci_merge.merge(paths)["tiny"]["summary"]["grid"]["vs_published"]
    # LL differences -0.5 and +1.0 -> mean 0.25, se 0.75 / sqrt(2); published mean over splits 0 and 2: -2.
    assert v["splits"] == [0, 2]
    assert v["ll_diff_mean"] == pytest.approx(0.25, abs=1e-12)
    assert v["ll_diff_se"] == pytest.approx(0.75 / math.sqrt(2), abs=1e-12)
    assert v["ll_published"] == pytest.approx(-2.0, abs=1e-12)


def test_unknown_method_is_refused_before_any_run(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the methods were checked")

    monkeypatch.setattr(uci.cli, "load_embedded_regression", no_data, raising=False)
    monkeypatch.setattr(uci.cli, "load_uci", no_data, raising=False)
    with pytest.raises(SystemExit, match=r"unknown methods \['grid_search'\]; choose from grid"):
        uci.main(["--methods", "grid,grid_search"])


# ------------------------------------------------------------------------------------------ command line


def test_protocol_epochs_are_100_times_the_data_sets_n_epochs():
    ds = _tiny_dataset()  # n_epochs 1
    assert uci.epochs_for(ds, "protocol") == 100
    assert uci.epochs_for(ds, 37) == 37
    parser = uci.cli.build_parser()
    assert parser.parse_args(["--epochs", "protocol"]).epochs == "protocol"
    assert parser.parse_args(["--epochs", "12"]).epochs == 12
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--epochs", bad])


def test_a_data_dir_without_uci_folders_is_refused(tmp_path):
    (tmp_path / "uci").mkdir()
    with pytest.raises(SystemExit, match="no UCI data set folders under .*; pass --datasets"):
        uci.main(["--data-dir", str(tmp_path), "--no-progress"])


# ------------------------------------------------------------------------------------------ concrete_heldout


def _heldout_run(ds: UCIDataset, loss_fn=None, epochs: int = 1) -> dict[str, torch.Tensor]:
    """Parameters of a ``concrete_heldout`` network after ``epochs`` epochs of :func:`uci.heldout._train_heldout`."""
    train_idx, _ = ds.split(0)
    fit_idx, val_idx = validation_split(train_idx)
    fold = uci.Fold.make(ds, fit_idx, val_idx)
    torch.manual_seed(0)
    model = uci.concrete_net._concrete_noise_net(fold, ds.n_hidden)
    uci.heldout._train_heldout(model, fold, epochs, 3, loss_fn or uci.concrete_net._concrete_loss(fold.x_fit.shape[0], 0.0), 4)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_heldout_training_splits_the_parameters_between_the_two_sets():
    ds = _tiny_dataset()
    base = _heldout_run(ds)
    rates = [n for n in base if uci.heldout._is_rate_parameter(n)]
    assert len(rates) == 3 and "log_var" in rates, rates  # the two sites' p-logits and the noise level
    weights = [n for n in base if n not in rates]

    # The held-out targets moved: after one epoch (weight steps first) the weights are the same; the rates are
    # not after three (Adam's first step is +-lr whatever the gradient's size, so one step may coincide).
    moved = _tiny_dataset()
    train_idx, _ = moved.split(0)
    _, val_idx = validation_split(train_idx)
    moved.y[val_idx] += 5.0
    other = _heldout_run(moved)
    assert all(torch.equal(base[n], other[n]) for n in weights)
    base3, other3 = _heldout_run(ds, epochs=3), _heldout_run(moved, epochs=3)
    assert all(not torch.equal(base3[n], other3[n]) for n in rates)

    # A term of the fitting loss that only the rates feel is not applied to them (nor to the weights).
    def with_rate_term(m, xb, yb):
        extra = sum(p.sum() for n, p in m.named_parameters() if uci.heldout._is_rate_parameter(n))
        return uci.concrete_net._concrete_loss(xb.shape[0], 0.0)(m, xb, yb) + 100.0 * extra

    pushed = _heldout_run(ds, with_rate_term)
    assert all(torch.equal(base[n], pushed[n]) for n in base)


def test_heldout_loss_is_the_mixture_nll_of_repeated_rows():
    # A network whose mean ignores the masks (zero input weights would not; a constant output does): the loss
    # is then the Gaussian NLL of the constant prediction, whatever the number of samples.
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_var = nn.Parameter(torch.tensor(math.log(4.0)))

        def forward(self, x):
            return torch.full((x.shape[0],), 1.0), self.log_var.expand(x.shape[0])

    x, y = torch.zeros(3, 2), torch.tensor([1.0, 3.0, -1.0])
    # Squared errors 0, 4, 4 with variance 4: mean of 0.5 * (e2 / 4 + log 4 + log 2 pi).
    expected = 0.5 * ((0 + 1 + 1) / 3 + math.log(4.0) + math.log(2 * math.pi))
    for samples in (1, 5):
        assert uci.heldout._heldout_loss(Constant(), x, y, samples).item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ concrete_freeze


def test_first_decline_restores_the_best_state_once_and_restarts_the_patience():
    """Checks every 2 of 20 epochs, scores 0.1, 0.5 (epoch 4), 0.4 (epoch 6: the first decline), then lower:
    the callback runs once, at epoch 6, on epoch 4's weights; with patience 4 the run ends at epoch 10 (4 after
    the decline), not at epoch 8 (4 after the best)."""
    torch.manual_seed(0)
    model = _Line()
    x = torch.randn(16, 2)
    fold = uci.Fold(x, x @ torch.tensor([1.0, -2.0]) + 0.5, x, torch.zeros(16, dtype=torch.float64), 0.0, 1.0)
    scores = [0.1, 0.5, 0.4, 0.3, 0.2, 0.9]
    snapshots: list[dict[str, torch.Tensor]] = []
    calls: list[dict[str, torch.Tensor]] = []

    def validate() -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return scores[len(snapshots) - 1]

    def declined() -> None:
        calls.append({k: v.clone() for k, v in model.state_dict().items()})

    def train(on_epoch):
        uci.training._train(model, fold, 20, 0, lambda m, xb, yb: F.mse_loss(m(xb), yb), on_epoch)

    best = uci.train_keep_best(model, train, validate, epochs=20, eval_every=2, patience=4, on_first_decline=declined)
    assert len(calls) == 1 and best.declined_at == 6
    for k, v in calls[0].items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0)  # epoch 4's state, not epoch 6's
    assert not torch.equal(snapshots[2]["fc.weight"], snapshots[1]["fc.weight"])
    assert (best.score, best.epoch, best.last_epoch, len(snapshots)) == (0.5, 4, 10, 5)
    # Training went on from epoch 4's weights: the check at epoch 8 is two epochs of training from them.
    assert not torch.equal(snapshots[3]["fc.weight"], snapshots[2]["fc.weight"])


def test_concrete_freeze_fixes_the_rates_at_the_best_check_and_trains_the_weights_on(monkeypatch):
    """Fake validation scores peak at epoch 2 of 6 and first decline at epoch 3: from then on the p-logits keep
    epoch 2's values while the weights and the noise level move; plain ``concrete`` keeps moving its rates."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    fake_val = [-3.0, -1.0, -2.0, -1.5, -1.2, -1.1]
    seen = _spy_on_evaluations(monkeypatch, fake_val)
    kw = dict(hidden=8, epochs=6, samples=4, seed=0, eval_every=1, val_samples=2, calibrate=False)
    out = uci.run_concrete(ds, train_idx, test_idx, freeze_rates=True, **kw)
    logits = [k for k in seen[0] if k.endswith("p_logit")]
    assert len(logits) == 2 and out["frozen_at"] == 3 and out["best_epoch"] == 2
    for k in logits:  # checks at epochs 4, 5, 6 (after the freeze) hold epoch 2's rates
        for check in (3, 4, 5):
            torch.testing.assert_close(seen[check][k], seen[1][k], rtol=0, atol=0)
    assert not torch.equal(seen[5]["fc1.weight"], seen[3]["fc1.weight"])
    assert not torch.equal(seen[5]["log_var"], seen[3]["log_var"])

    seen.clear()
    plain = uci.run_concrete(ds, train_idx, test_idx, **kw)
    assert "frozen_at" not in plain
    assert not torch.equal(seen[5][logits[0]], seen[1][logits[0]])


def test_refit_with_fixed_rates_holds_them_while_the_weights_train():
    """``concrete_freeze_refit``'s refit: the sites hold the given rates through training (they would fall or
    rise otherwise), the weights and the noise level move; a wrong number of rates is refused."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    kw = dict(hidden=8, epochs=5, samples=4, seed=0, first_tau=2.0)
    held = uci.refit_concrete(ds, train_idx, test_idx, fixed_rates=[0.03, 0.25], **kw)
    assert held["rates"] == pytest.approx([0.03, 0.25], rel=1e-5)
    # Five epochs are enough to move rates that train: the held ones stayed put because they were held.
    model = uci.concrete_net._concrete_noise_net(uci.Fold.make(ds, train_idx, test_idx), 8)
    free = uci.refit_concrete(ds, train_idx, test_idx, **kw)
    assert free["rates"] != pytest.approx(list(cd_convert.dropout_rates(model).values()), rel=1e-4)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    uci.concrete_net._hold_rates(model, [0.03, 0.25])
    fold = uci.Fold.make(ds, train_idx, test_idx)
    uci.training._train(model, fold, 3, 0, uci.concrete_net._concrete_loss(32, 0.0))
    assert list(cd_convert.dropout_rates(model).values()) == pytest.approx([0.03, 0.25], rel=1e-5)
    assert not torch.equal(model.state_dict()["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(model.state_dict()["log_var"], before["log_var"])
    with pytest.raises(ValueError, match="1 rates given for the 2 sites"):
        uci.concrete_net._hold_rates(model, [0.1])


def _warm_start(monkeypatch):
    """What the warm epochs start from on the tiny set, batches of 10: ``(ds, fit_idx, train_idx, fold, model,
    loss)``, the model freshly built and the loss ``concrete``'s."""
    monkeypatch.setattr(uci.training, "BATCH_SIZE", 10)
    ds = _tiny_dataset()
    train_idx, _ = ds.split(0)
    fit_idx, val_idx = validation_split(train_idx)
    fold = uci.Fold.make(ds, fit_idx, val_idx)
    model = uci.concrete_net._concrete_noise_net(fold, 8)
    return ds, fit_idx, train_idx, fold, model, uci.concrete_net._concrete_loss(len(fit_idx), 0.0)


def test_warm_epochs_train_the_weights_on_the_whole_split_with_rates_and_noise_held(monkeypatch):
    """``concrete_freeze_warm``'s last step: every row of the training split (standardised with the fitting
    set's statistics, as the model was trained) in each epoch, 4 batches of 10 per epoch; the p-logits and the
    noise level stay exactly where they were and the weights move; the noise level trains again afterwards."""
    ds, fit_idx, train_idx, fold, model, loss = _warm_start(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows: list[torch.Tensor] = []

    def spy(m, xb, yb):
        rows.append(torch.cat([xb, yb.reshape(-1, 1)], 1))
        return loss(m, xb, yb)

    batches0 = uci.PASSES.train_batches
    uci.concrete._continue_on_whole_split(model, ds, fit_idx, train_idx, fold, 2, 0, spy)
    assert uci.PASSES.train_batches - batches0 == 2 * 4
    mean, std = ds.X[fit_idx].mean(0), ds.X[fit_idx].std(0)
    y = (ds.y[train_idx] - ds.y[fit_idx].mean()) / ds.y[fit_idx].std()
    want = torch.as_tensor(np.column_stack([(ds.X[train_idx] - mean) / std, y]), dtype=torch.float32)
    for epoch in (rows[:4], rows[4:]):  # each epoch: every row of the split once
        seen = torch.cat(epoch)
        torch.testing.assert_close(seen[seen[:, 0].argsort()], want[want[:, 0].argsort()])
    after = model.state_dict()
    for k in before:
        if k.endswith("p_logit") or k == "log_var":
            assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert model.log_var.requires_grad


@pytest.mark.parametrize("decay, rates", [(False, [1.0, 1.0, 1.0, 1.0]), (True, [1.0, 0.75, 0.5, 0.25])])
def test_decayed_warm_epochs_step_at_a_rate_falling_linearly_to_zero(monkeypatch, decay, rates):
    """With ``decay_to_zero`` the warm epochs' steps use 1, 3/4, 1/2 and 1/4 of the protocol's learning rate
    over 4 epochs (every step of an epoch the same); without it, the protocol's rate throughout."""
    ds, fit_idx, train_idx, fold, model, loss = _warm_start(monkeypatch)
    stepped: list[float] = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: stepped.append(self.param_groups[0]["lr"]) or real_step(self)
    )
    uci.concrete._continue_on_whole_split(model, ds, fit_idx, train_idx, fold, 4, 0, loss, decay)
    assert stepped == pytest.approx([1e-3 * r for r in rates for _ in range(4)])  # 4 batches of 10 per epoch


def test_the_decayed_variant_is_the_same_run_with_other_warm_epochs(monkeypatch):
    """``concrete_freeze_warm_decay`` shares ``concrete_freeze_warm``'s run and warm-epoch count (the state
    before the warm epochs tests the same) and ends elsewhere."""
    monkeypatch.setattr(uci.training, "BATCH_SIZE", 10)
    ds = _tiny_dataset()
    r = uci.run_dataset(
        ds, 1, 8, 3, 0, 2, 2, methods=("concrete_freeze_warm", "concrete_freeze_warm_decay"), warm_diagnostic=True
    )
    const, decayed = r["records"]["concrete_freeze_warm"][0], r["records"]["concrete_freeze_warm_decay"][0]
    assert (decayed["ll_before_warm"], decayed["warm_epochs"]) == (const["ll_before_warm"], const["warm_epochs"])
    assert decayed["warm_epochs"] > 1 and decayed["ll"] != const["ll"]


def test_concrete_freeze_warm_trains_a_quarter_of_its_best_epoch_after_the_calibration(monkeypatch):
    """The warm epochs are WARM_FRACTION of the kept check's epoch, at least one, and come after the
    calibration: the tested noise level is the calibrated one."""
    ds = _tiny_dataset()
    train_idx, test_idx = ds.split(0)
    _spy_on_evaluations(monkeypatch, [-3.0, -1.0, -2.0, -1.5, -1.2, -1.1, -1.05, -0.9])  # best: epoch 8
    warm: list[tuple[int, float]] = []
    real = uci.concrete._continue_on_whole_split
    monkeypatch.setattr(
        uci.concrete,
        "_continue_on_whole_split",
        lambda model, *a: warm.append((a[4], float(model.log_var.detach()))) or real(model, *a),
    )

    def calibrated(model, *a):  # a level the search would not pick, to be recognised later
        with torch.no_grad():
            model.log_var.fill_(0.37)
        return 0.37

    monkeypatch.setattr(uci.concrete, "calibrate_noise", calibrated)
    kw = dict(hidden=8, epochs=8, samples=4, seed=0, eval_every=1, val_samples=2)
    out = uci.run_concrete(ds, train_idx, test_idx, freeze_rates=True, warm_fraction=uci.WARM_FRACTION, **kw)
    assert out["best_epoch"] == 8 and out["warm_epochs"] == 2 and warm[0][0] == 2  # 8 / 4
    y_std = ds.y[validation_split(train_idx)[0]].std()
    # It warmed with the calibrated level, held it, and was tested with it.
    assert warm[0][1] == pytest.approx(0.37) and out["tau"] == pytest.approx(1.0 / (math.exp(0.37) * y_std**2))


def test_the_warm_diagnostic_tests_the_same_run_before_its_warm_epochs(monkeypatch):
    """``warm_diagnostic``: the record also has the test score of the state before the warm epochs, which is
    ``concrete_freeze``'s on the same seed, and its test passes (3) are counted; without it, neither."""
    monkeypatch.setattr(uci.training, "BATCH_SIZE", 10)
    ds = _tiny_dataset()
    plain = uci.run_dataset(ds, 1, 3, 3, 0, 2, 2, methods=("concrete_freeze", "concrete_freeze_warm"))
    diag = uci.run_dataset(ds, 1, 3, 3, 0, 2, 2, methods=("concrete_freeze_warm",), warm_diagnostic=True)
    frozen, warm = plain["records"]["concrete_freeze"][0], diag["records"]["concrete_freeze_warm"][0]
    assert "ll_before_warm" not in plain["records"]["concrete_freeze_warm"][0]
    assert (warm["ll_before_warm"], warm["rmse_before_warm"]) == (frozen["ll"], frozen["rmse"])
    assert warm["ll"] == plain["records"]["concrete_freeze_warm"][0]["ll"]
    assert warm["mc_passes"] == plain["records"]["concrete_freeze_warm"][0]["mc_passes"] + 3


@pytest.mark.parametrize(
    "methods, runs, refit_rates",
    [
        (("concrete_freeze_refit",), [dict(freeze_rates=True, test=False)], [0.03, 0.07]),
        (("concrete_freeze", "concrete_freeze_refit"), [dict(freeze_rates=True, test=True)], [0.03, 0.07]),
        (("concrete_refit",), [dict(test=False)], None),
        (("concrete", "concrete_freeze_refit"), [dict(test=True), dict(freeze_rates=True, test=False)], [0.03, 0.07]),
    ],
)
def test_each_refit_reuses_its_own_first_run(monkeypatch, methods, runs, refit_rates):
    """A refit shares its one-run variant's run (one run, not two), refits that run's best epoch, and only
    ``concrete_freeze_refit`` passes that run's rates to be held; the first run is tested only when its own
    method is asked for."""
    ds = _tiny_dataset()
    _, seen_runs, refits = _fake_first_and_refit_runs(monkeypatch, [0.03, 0.07])
    r = uci.run_dataset(ds, 1, 10, 2, 0, 1, 2, methods=methods)
    assert [kwargs for _, kwargs in seen_runs] == runs
    assert len(refits) == 1 and refits[0][0][4] == 7 and refits[0][1]["fixed_rates"] == refit_rates
    assert uci.runs_per_split(ds, methods) == len(runs) + 1
    refit_method = next(m for m in methods if m in uci.REFITS)
    assert r["records"][refit_method][0]["train_runs"] == 2
    assert set(r["records"]) == set(methods)


def test_a_refit_asked_for_alone_does_not_test_its_first_run(monkeypatch):
    """Without its one-run method, a refit's first run skips the test evaluation: the cost has the refit's test
    passes only (hand count for batch 10 as in the test above: 3 x 3 + best epoch x 4 batches; MC 2 checks x 2
    + calibration 2 + the refit's test 3)."""
    monkeypatch.setattr(uci.training, "BATCH_SIZE", 10)
    ds = _tiny_dataset()
    r = uci.run_dataset(ds, 1, 3, 3, 0, 2, 2, methods=("concrete_freeze_refit",))
    rec = r["records"]["concrete_freeze_refit"][0]
    assert "ll" not in rec["first_run"] and "ll" in rec
    assert (rec["train_batches"], rec["mc_passes"]) == (3 * 3 + rec["refit_epochs"] * 4, 2 * 2 + 2 + 3)
