"""Tests for cd_convert.prior: the presets equal the table of the reference doc, by hand values."""
from __future__ import annotations

import pytest

from cd_convert.prior import DEFAULT_LENGTH_SCALE, resolve_scale, validate_dataset_size


def test_default_length_scale_is_uci_value():
    assert DEFAULT_LENGTH_SCALE == 1e-2


def test_nll_preset_hand_values():
    # l = 0.1, N = 1000: wr = 0.01 / 2000 = 5e-6, dr = 1e-3
    s = resolve_scale(dataset_size=1000, length_scale=0.1, loss="nll")
    assert s.weight_regularizer == pytest.approx(5e-6, rel=1e-12)
    assert s.dropout_regularizer == pytest.approx(1e-3, rel=1e-12)


def test_nll_is_the_default_loss_and_length_scale():
    s = resolve_scale(dataset_size=50)
    # l = 1e-2: wr = 1e-4 / 100 = 1e-6, dr = 1/50
    assert s.weight_regularizer == pytest.approx(1e-6, rel=1e-12)
    assert s.dropout_regularizer == pytest.approx(0.02, rel=1e-12)


def test_mse_preset_hand_values():
    # l = 0.1, tau = 4, N = 500: wr = 0.01 / 2000 = 5e-6, dr = 2 / 2000 = 1e-3
    s = resolve_scale(dataset_size=500, length_scale=0.1, loss="mse", tau=4.0)
    assert s.weight_regularizer == pytest.approx(5e-6, rel=1e-12)
    assert s.dropout_regularizer == pytest.approx(1e-3, rel=1e-12)
    assert "tau" in s.description


def test_heteroscedastic_preset_hand_values():
    # the authors' toy setting: l = 1e-4, N = 10: wr = 1e-8 / 10 = 1e-9, dr = 2 / 10
    s = resolve_scale(dataset_size=10, length_scale=1e-4, loss="heteroscedastic")
    assert s.weight_regularizer == pytest.approx(1e-9, rel=1e-12)
    assert s.dropout_regularizer == pytest.approx(0.2, rel=1e-12)


def test_presets_ratio_rule():
    # heteroscedastic = 2 * nll; mse(tau) = (2 / tau) * nll
    nll = resolve_scale(dataset_size=123, length_scale=0.3, loss="nll")
    het = resolve_scale(dataset_size=123, length_scale=0.3, loss="heteroscedastic")
    mse = resolve_scale(dataset_size=123, length_scale=0.3, loss="mse", tau=0.5)
    assert het.weight_regularizer == pytest.approx(2 * nll.weight_regularizer)
    assert het.dropout_regularizer == pytest.approx(2 * nll.dropout_regularizer)
    assert mse.weight_regularizer == pytest.approx(4 * nll.weight_regularizer)
    assert mse.dropout_regularizer == pytest.approx(4 * nll.dropout_regularizer)


def test_explicit_constants():
    s = resolve_scale(weight_regularizer=1e-5, dropout_regularizer=2e-3)
    assert (s.weight_regularizer, s.dropout_regularizer) == (1e-5, 2e-3)
    s0 = resolve_scale(weight_regularizer=0.0, dropout_regularizer=0.0)
    assert (s0.weight_regularizer, s0.dropout_regularizer) == (0.0, 0.0)


def test_nothing_given_returns_none():
    assert resolve_scale() is None


def test_integral_float_dataset_size_accepted():
    assert validate_dataset_size(100.0) == 100
    assert resolve_scale(dataset_size=100.0).dropout_regularizer == pytest.approx(0.01)


@pytest.mark.parametrize("n", [0, -1, -1000])
def test_non_positive_dataset_size_refused(n):
    with pytest.raises(ValueError, match="dataset_size must be a positive number of training examples"):
        resolve_scale(dataset_size=n)


@pytest.mark.parametrize("n", [True, 10.5, "100", None.__class__])
def test_non_int_dataset_size_refused(n):
    with pytest.raises(TypeError, match="dataset_size must be a positive int"):
        validate_dataset_size(n)


def test_dataset_size_and_explicit_refused():
    with pytest.raises(ValueError, match="not both"):
        resolve_scale(dataset_size=10, weight_regularizer=1e-5, dropout_regularizer=1e-3)


@pytest.mark.parametrize("kwargs", [{"weight_regularizer": 1e-5}, {"dropout_regularizer": 1e-3}])
def test_only_one_explicit_refused(kwargs):
    with pytest.raises(ValueError, match="must be given together"):
        resolve_scale(**kwargs)


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"weight_regularizer": -1.0, "dropout_regularizer": 1e-3}, ValueError, "weight_regularizer must be a finite number >= 0"),
    ({"weight_regularizer": 1e-5, "dropout_regularizer": float("nan")}, ValueError, "dropout_regularizer must be a finite"),
    ({"weight_regularizer": "1", "dropout_regularizer": 1e-3}, TypeError, "weight_regularizer must be a number"),
])
def test_bad_explicit_values_refused(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        resolve_scale(**kwargs)


def test_mse_without_tau_refused():
    with pytest.raises(ValueError, match="loss='mse' needs tau="):
        resolve_scale(dataset_size=10, loss="mse")
    # refused even before a dataset size is known
    with pytest.raises(ValueError, match="needs tau"):
        resolve_scale(loss="mse")


@pytest.mark.parametrize("loss", ["nll", "heteroscedastic"])
def test_tau_with_other_preset_refused(loss):
    with pytest.raises(ValueError, match="tau= is only used with loss='mse'"):
        resolve_scale(dataset_size=10, loss=loss, tau=1.0)


@pytest.mark.parametrize("loss", ["NLL", "gaussian", "", "cross_entropy"])
def test_unknown_loss_refused(loss):
    with pytest.raises(ValueError, match="loss must be one of"):
        resolve_scale(dataset_size=10, loss=loss)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf")])
def test_bad_tau_refused(tau):
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        resolve_scale(dataset_size=10, loss="mse", tau=tau)


@pytest.mark.parametrize("l", [0.0, -0.1, float("nan")])
def test_bad_length_scale_refused(l):
    with pytest.raises(ValueError, match="length_scale must be a positive finite number"):
        resolve_scale(dataset_size=10, length_scale=l)
