"""``benchmarks.uci_terms``: the regulariser's terms by hand, and the check against the library."""

from __future__ import annotations

import math

import pytest
import torch

import cd_convert
from benchmarks import uci, uci_terms


def _network(p: float) -> torch.nn.Module:
    """The benchmark's network (3 inputs, 4 hidden) for N = 50, tau = 2 (loss units), both rates at ``p``."""
    torch.manual_seed(0)
    model = uci.concrete_net._concrete_net(uci.PlainNet(3, 4), 50, loss="mse", tau=2.0)
    with torch.no_grad():
        model.fc1.weight.fill_(0.5)  # ||W1||^2 = 12 * 0.25 = 3
        model.fc2.weight.fill_(2.0)  # ||W2||^2 = 4 * 4 = 16
        for site, _ in uci_terms._sites(model):
            site.p_logit.fill_(math.log(p / (1 - p)))
    return model


def test_objective_terms_by_hand():
    p, n, tau, l2 = 0.2, 50, 2.0, uci.LENGTH_SCALE**2
    terms = uci_terms.objective_terms(_network(p))
    # mse preset: wr = l^2 / (tau N), dr = 2 / (tau N); K = in_features (3 and 4).
    wr, dr = l2 / (tau * n), 2 / (tau * n)
    entropy_per_unit = p * math.log(p) + (1 - p) * math.log(1 - p)
    assert terms["weight"] == pytest.approx(wr * (3 + 16) / (1 - p), rel=1e-5)
    assert terms["entropy"] == pytest.approx(dr * (3 + 4) * entropy_per_unit, rel=1e-5)
    assert terms["library"] == pytest.approx(terms["weight"] + terms["entropy"], rel=1e-5)
    scaled = uci_terms.objective_terms(_network(p), scale_to_mse=0.5)
    assert scaled["entropy"] == pytest.approx(0.5 * terms["entropy"], rel=1e-9)


def test_objective_terms_refuse_a_library_value_that_disagrees(monkeypatch):
    model = _network(0.1)
    real = cd_convert.regularization
    monkeypatch.setattr(cd_convert, "regularization", lambda m: real(m) * 1.01)
    with pytest.raises(RuntimeError, match="by definition"):
        uci_terms.objective_terms(model)


def test_terms_at_rates_restores_the_learned_rates():
    model = _network(0.3)
    fold = uci.Fold(torch.randn(20, 3), torch.randn(20), torch.randn(5, 3), torch.zeros(5, dtype=torch.float64), 0, 1)
    rows = uci_terms.terms_at_rates(model, fold, [0.01, 0.5], passes=3)
    assert [r["p"] for r in rows] == [0.01, 0.5]
    assert all(r["total"] == pytest.approx(r["data"] + r["weight"] + r["entropy"]) for r in rows)
    assert rows[0]["entropy"] > rows[1]["entropy"]  # more entropy (a more negative term) at p = 0.5
    assert list(cd_convert.dropout_rates(model).values()) == pytest.approx([0.3, 0.3], rel=1e-6)


def test_the_script_refuses_to_run_without_the_uci_files(monkeypatch):
    monkeypatch.delenv("CD_CONVERT_DATA", raising=False)
    with pytest.raises(SystemExit, match="needs the UCI files"):
        uci_terms.main([])
