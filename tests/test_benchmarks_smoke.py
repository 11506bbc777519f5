"""Fast end-to-end runs of the benchmark scripts (embedded sklearn data, tiny settings).

The checks use ranges known for these tiny runs: after 2 epochs the UCI networks predict little more than
the mean of the diabetes targets (std 77; a linear fit leaves about 54), so the RMSE is near the targets'
std and the test LL near that of a Gaussian with the grid's sigma (40-70) and errors of that size, about -6.
On the 8x8 digits one epoch (12 Adam steps) lifts accuracy far above chance (0.1), and heavy dropout slows
that down. The UCI decisions themselves are tested on synthetic inputs in ``test_uci_logic.py``.
"""

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import mnist, uci
from benchmarks.datasets import load_embedded_regression

SUMMARY_KEYS = {"rmse_mean", "rmse_se", "ll_mean", "ll_se", "train_runs", "wall_s", "forward_passes"}


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv("CD_CONVERT_DATA", raising=False)
    torch.set_num_threads(1)


def test_uci_main_json_records_and_summary(tmp_path):
    path = tmp_path / "uci.json"
    quick = "--splits 2 --epochs 2 --samples 8 --val-samples 4 --no-progress".split()
    uci.main([*quick, "--json", str(path), "--plot", str(tmp_path / "uci.png")])
    out = json.loads(path.read_text())
    details = json.loads((tmp_path / "uci.details.json").read_text())
    assert list(out) == list(details) == ["sklearn-diabetes"]
    summary, records = out["sklearn-diabetes"], details["sklearn-diabetes"]["records"]
    assert set(summary) == set(records) == {"grid", "concrete", "concrete_tau"}
    ds = load_embedded_regression(seed=0)
    y_std = float(ds.y.std())
    for method, s in summary.items():
        assert set(s) == SUMMARY_KEYS
        recs = records[method]
        assert [r["split"] for r in recs] == [0, 1]
        for key in ("rmse", "ll"):
            a, b = recs[0][key], recs[1][key]
            # Mean and standard error of two values, as the UCI papers report (std with ddof=0, / sqrt(n)).
            assert s[f"{key}_mean"] == pytest.approx((a + b) / 2, rel=1e-12)
            assert s[f"{key}_se"] == pytest.approx(abs(a - b) / 2 / math.sqrt(2), rel=1e-12)
        for r in recs:
            assert 0.6 * y_std < r["rmse"] < 1.3 * y_std  # e.g. means not un-standardised: about 170
            assert -7.0 < r["ll"] < -5.0  # e.g. a wrong sign on 0.5 log tau moves it by log(tau), about -8
    assert {m: s["train_runs"] for m, s in summary.items()} == {"grid": 2 * 13, "concrete_tau": 2 * 4, "concrete": 2}
    assert all(r["p"] in ds.dropout_rates and r["tau"] in ds.tau_values for r in records["grid"])
    assert all(r["tau"] in ds.tau_values for r in records["concrete_tau"])
    assert all(r["best_epoch"] in (1, 2) and math.isfinite(r["val_ll"]) for r in records["concrete"])
    assert (tmp_path / "uci.png").stat().st_size > 0


def test_uci_same_seed_same_numbers_other_seed_other_numbers():
    ds = load_embedded_regression(seed=0)
    a = uci.run_dataset(ds, 1, 2, 8, seed=3, eval_every=1, val_samples=4)["summary"]
    b = uci.run_dataset(ds, 1, 2, 8, seed=3, eval_every=1, val_samples=4)["summary"]
    c = uci.run_dataset(ds, 1, 2, 8, seed=4, eval_every=1, val_samples=4)["summary"]
    for m in a:
        assert a[m]["rmse_mean"] == b[m]["rmse_mean"] and a[m]["ll_mean"] == b[m]["ll_mean"]
        assert a[m]["rmse_mean"] != c[m]["rmse_mean"] and a[m]["ll_mean"] != c[m]["ll_mean"]


def test_mnist_quick_on_digits(tmp_path):
    path = tmp_path / "mnist.json"
    mnist.main(["--epochs", "1", "--samples", "2", "--json", str(path), "--no-progress"])
    out = json.loads(path.read_text())
    grid, concrete = out["grid"], out["concrete"]
    assert set(grid) == {"0.0", "0.1", "0.2", "0.3", "0.5"}
    assert set(concrete) == {"accuracy", "nll", "ece", "wall_s", "rates"}
    for r in [*grid.values(), concrete]:
        assert set(r) >= {"accuracy", "nll", "ece", "wall_s"}
        assert r["accuracy"] > 0.2  # chance is 0.1 (seen: 0.28 at p=0.5, 0.71-0.82 at p=0 over seeds 0-3)
        assert r["nll"] < math.log(10)  # better than the uniform prediction
    assert grid["0.0"]["accuracy"] > 0.6 and concrete["accuracy"] > 0.6
    # Dropout's effect after 12 steps: p=0.5 learns much slower (seen: gap 0.45 in accuracy, 1.0 in NLL).
    assert grid["0.0"]["accuracy"] > grid["0.5"]["accuracy"] + 0.2
    assert grid["0.0"]["nll"] < grid["0.5"]["nll"] - 0.5
    assert len(concrete["rates"]) == 4  # a site before every Linear
    # Rates start at 0.1 and move about 1e-3 in logit per Adam step: 12 steps leave them near 0.1.
    assert all(0.09 < p < 0.11 for p in concrete["rates"].values())


def test_mnist_cnn_has_four_sites():
    import cd_convert
    import torch.nn as nn

    data = {"x_train": np.zeros((2, 1, 8, 8), np.float32)}
    model = cd_convert.convert(
        mnist.make_model("cnn", data, None),
        targets=[nn.Linear, nn.Conv2d],
        dataset_size=100,
        length_scale=0.1,
        loss="nll",
    )
    assert len(cd_convert.dropout_rates(model)) == 4
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_grid_weight_decay_hand_value():
    # l = 1e-2, p = 0.05, tau = 0.5, N = 200: 1e-4 * 0.95 / (2 * 200 * 0.5) = 4.75e-7
    assert uci.grid_weight_decay(0.05, 0.5, 200) == pytest.approx(4.75e-7, rel=1e-12)


def test_uci_noise_calibration_changes_only_the_noise():
    """Calibration comes after training and the checkpoint and re-picks only the log-variance."""
    ds = load_embedded_regression(seed=0)
    on, off = (
        uci.run_dataset(ds, 1, 2, 8, seed=0, eval_every=1, val_samples=4, methods=("concrete",), calibrate=c)[
            "records"
        ]["concrete"][0]
        for c in (True, False)
    )
    assert on["train_runs"] == off["train_runs"] == 1
    # Same network, same MC masks: the mean predictions, rates and the checkpoint are untouched ...
    assert on["rmse"] == off["rmse"] and on["rates"] == off["rates"]
    assert (on["val_ll"], on["best_epoch"]) == (off["val_ll"], off["best_epoch"])
    # ... the noise moved, within the search window of +-3 in log-variance.
    assert on["tau"] != off["tau"] and on["ll"] != off["ll"]
    assert abs(math.log(on["tau"] / off["tau"])) <= 3.0 + 1e-9


def test_main_job_writes_both_comparisons(tmp_path):
    """README command 1's job at tiny settings: every regression method and the digits comparison, and files."""
    from benchmarks import main as main_job

    argv = "--splits 1 --epochs 4 --samples 6 --digits-epochs 1 --digits-samples 2 --no-progress".split()
    out = main_job.main([*argv, "--out", str(tmp_path)])
    summary = out["regression"]["sklearn-diabetes"]
    assert list(summary) == [
        "grid",
        "concrete_tau",
        "concrete",
        "concrete_refit",
        "concrete_freeze_refit",
        "concrete_freeze_warm",
    ]
    assert {m: s["train_runs"] for m, s in summary.items()} == {
        "grid": 13,
        "concrete_tau": 4,
        "concrete": 1,
        "concrete_refit": 2,
        "concrete_freeze_refit": 2,
        "concrete_freeze_warm": 1,
    }
    assert set(out["classification"]) >= {"grid", "concrete"}
    for name in ("main.json", "uci_diabetes.png", "digits.png"):
        assert (tmp_path / name).stat().st_size > 0
