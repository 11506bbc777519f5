"""Fast smoke tests of the benchmark scripts (embedded sklearn data, tiny settings) and their formulas."""
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import mnist, uci
from benchmarks.datasets import load_embedded_regression
from cd_convert.metrics import gaussian_test_log_likelihood

SUMMARY_KEYS = {"rmse_mean", "rmse_se", "ll_mean", "ll_se", "train_runs", "wall_s"}


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv("CD_CONVERT_DATA", raising=False)
    torch.set_num_threads(1)


def test_uci_json_structure(tmp_path):
    path = tmp_path / "uci.json"
    uci.main(["--splits", "2", "--epochs", "2", "--samples", "8", "--val-samples", "4", "--json", str(path),
              "--plot", str(tmp_path / "uci.png"), "--no-progress"])
    out = json.loads(path.read_text())
    assert list(out) == ["sklearn-diabetes"]
    assert set(out["sklearn-diabetes"]) == {"grid", "concrete", "concrete_tau"}
    for method, summary in out["sklearn-diabetes"].items():
        assert set(summary) == SUMMARY_KEYS
        assert all(math.isfinite(v) for v in summary.values())
    runs = {m: s["train_runs"] for m, s in out["sklearn-diabetes"].items()}
    assert runs == {"grid": 2 * 13, "concrete_tau": 2 * 4, "concrete": 2}
    assert (tmp_path / "uci.png").stat().st_size > 0
    assert (tmp_path / "uci.details.json").exists()


def test_uci_same_seed_same_numbers():
    ds = load_embedded_regression(seed=0)
    a = uci.run_dataset(ds, 1, 2, 8, seed=3, eval_every=1, val_samples=4)["summary"]
    b = uci.run_dataset(ds, 1, 2, 8, seed=3, eval_every=1, val_samples=4)["summary"]
    for m in a:
        assert a[m]["rmse_mean"] == b[m]["rmse_mean"] and a[m]["ll_mean"] == b[m]["ll_mean"]


def test_mnist_quick_on_digits(tmp_path):
    path = tmp_path / "mnist.json"
    mnist.main(["--epochs", "1", "--samples", "2", "--json", str(path), "--no-progress"])
    out = json.loads(path.read_text())
    assert set(out["grid"]) == {"0.0", "0.1", "0.2", "0.3", "0.5"}
    for r in out["grid"].values():
        assert set(r) == {"accuracy", "nll", "ece", "wall_s"}
        assert 0.0 <= r["accuracy"] <= 1.0
    assert set(out["concrete"]) == {"accuracy", "nll", "ece", "wall_s", "rates"}
    assert len(out["concrete"]["rates"]) == 4  # a site before every Linear


def test_mnist_cnn_has_four_sites():
    import cd_convert
    import torch.nn as nn
    data = {"x_train": np.zeros((2, 1, 8, 8), np.float32)}
    model = cd_convert.convert(mnist.make_model("cnn", data, None), targets=[nn.Linear, nn.Conv2d],
                               dataset_size=100, length_scale=0.1, loss="nll")
    assert len(cd_convert.dropout_rates(model)) == 4
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_grid_weight_decay_hand_value():
    # l = 1e-2, p = 0.05, tau = 0.5, N = 200: 1e-4 * 0.95 / (2 * 200 * 0.5) = 4.75e-7
    assert uci.grid_weight_decay(0.05, 0.5, 200) == pytest.approx(4.75e-7, rel=1e-12)


def test_mc_ll_formula_hand_value():
    tau = 2.0
    y = torch.tensor([1.0])
    mu = torch.tensor([[0.0], [2.0], [1.0]])  # T = 3
    # logsumexp(-0.5*2*[1, 1, 0]) - log 3 - 0.5 log 2pi + 0.5 log 2
    hand = math.log(2 * math.exp(-1.0) + 1.0) - math.log(3) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(2)
    assert uci.mc_test_ll_tau(mu, y, tau) == pytest.approx(hand, abs=1e-12)
    assert gaussian_test_log_likelihood(mu.double(), y.double(), sigma2=1 / tau) == pytest.approx(hand, abs=1e-10)


def test_uci_concrete_noise_calibration_runs():
    ds = load_embedded_regression(seed=0)
    r = uci.run_dataset(ds, 1, 2, 8, seed=0, eval_every=1, val_samples=4, methods=("concrete",), calibrate=True)
    rec = r["records"]["concrete"][0]
    assert rec["train_runs"] == 1 and math.isfinite(rec["ll"]) and rec["tau"] > 0
