"""Variant (b), one run with learned rates and noise level (``concrete`` and its one-run variants), and the
refit on the whole training split that the two-run methods add."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import common
from ..datasets import UCIDataset, standardize, validation_split
from .concrete_net import (
    _concrete_loss,
    _concrete_noise_net,
    _hetero_eval,
    _hetero_samples,
    _hold_rates,
    _site_rates,
    _stop_rates_training,
    _tau_of,
    calibrate_noise,
)
from .decisions import train_keep_best
from .heldout import HELDOUT_SAMPLES, _train_heldout
from .protocol import Fold, _float32, _test_set, mc_rmse
from .training import _train

#: Epochs ``concrete_freeze_warm`` trains on over the whole training split, as a fraction of its best epoch.
WARM_FRACTION = 0.25

#: The one-run variants of ``concrete``: method -> :func:`run_concrete`'s keyword arguments.
ONE_RUN_VARIANTS = {
    "concrete": {},
    "concrete_freeze": dict(freeze_rates=True),
    "concrete_heldout": dict(heldout_samples=HELDOUT_SAMPLES),
    "concrete_freeze_warm": dict(freeze_rates=True, warm_fraction=WARM_FRACTION),
    "concrete_freeze_warm_decay": dict(freeze_rates=True, warm_fraction=WARM_FRACTION, warm_decay=True),
}
#: The two-run methods: method -> (the one-run variant it refits, whether the refit keeps that run's rates fixed).
REFITS = {
    "concrete_refit": ("concrete", False),
    "concrete_freeze_refit": ("concrete_freeze", True),
}


def run_concrete(
    ds: UCIDataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    hidden: int,
    epochs: int,
    samples: int,
    seed: int,
    eval_every: int,
    val_samples: int,
    noise_prior: float = 0.0,
    calibrate: bool = True,
    patience: int = 0,
    freeze_rates: bool = False,
    heldout_samples: int = 0,
    warm_fraction: float = 0.0,
    warm_decay: bool = False,
    test_before_warm: bool = False,
    test: bool = True,
) -> dict:
    """Variant (b): one run, learned p and noise, best validation-LL state kept.

    Args:
        ds: the data set.
        train_idx, test_idx: the split; the run fits on the first 80% of ``train_idx`` and validates on the rest.
        hidden: hidden units.
        epochs: the epoch budget.
        samples: MC passes at test.
        seed: the run's seed.
        eval_every: validation check interval in epochs.
        val_samples: MC passes per check and for the calibration.
        noise_prior: weight of the prior on the log-variance (0: none).
        calibrate: re-pick the noise level on the validation set after training.
        patience: end the run this many epochs after the best check (:func:`should_stop`; 0: never).
        freeze_rates: ``concrete_freeze``: at the first check that does not beat the best, go back to the best
            check's state and fix the rates there; the weights and the noise level train on (the patience then
            counts from that check or a later best one).
        heldout_samples: ``concrete_heldout`` when > 0: the rates and the noise level train on the held-out
            20% with the mixture NLL of this many relaxed passes (:func:`_train_heldout`), the weights on the 80%.
        warm_fraction: ``concrete_freeze_warm`` when > 0: after the calibration, the kept state trains on over
            the whole training split (the held-out 20% joined in) for this fraction of its best epoch, with the
            rates and the calibrated noise level held (:func:`_continue_on_whole_split`).
        warm_decay: ``concrete_freeze_warm_decay``: the warm epochs' learning rate falls linearly to zero, so
            that they end near a minimum instead of wherever the last constant-rate steps left the weights.
        test_before_warm: with ``warm_fraction``, also score the state before the warm epochs on the test set
            (``rmse_before_warm``, ``ll_before_warm``: ``concrete_freeze``'s result on the same run, paired).
        test: score the kept state on the test set (off when only a refit of this run is tested: its MC passes
            would be counted in the refit's cost for nothing).

    Returns:
        Record fields: ``rmse``, ``ll`` (test; absent without ``test``), ``rates``, ``tau`` (used at test,
        original units), ``val_ll`` and ``best_epoch`` (the kept check), ``epochs_run`` and ``noise_offset``
        (calibrated minus trained log-variance, 0 without calibration); with ``freeze_rates`` also ``frozen_at``
        (the epoch of the check that fixed the rates, 0 if none did).
    """
    fit_idx, val_idx = validation_split(train_idx)
    fold = Fold.make(ds, fit_idx, val_idx)
    x_test, y_test = _test_set(ds, fit_idx, test_idx)

    common.seed_all(seed)
    model = _concrete_noise_net(fold, hidden)
    loss_fn = _concrete_loss(fold.x_fit.shape[0], noise_prior)

    def validate() -> float:
        return _hetero_eval(model, fold.x_eval, fold.y_eval, fold.y_mean, fold.y_std, val_samples, seed + 7)[1]

    def train(on_epoch: Callable[[int], bool]) -> None:
        if heldout_samples > 0:
            _train_heldout(model, fold, epochs, seed, loss_fn, heldout_samples, on_epoch)
        else:
            _train(model, fold, epochs, seed, loss_fn, on_epoch)

    best = train_keep_best(
        model,
        train,
        validate,
        epochs,
        eval_every,
        patience,
        (lambda: _stop_rates_training(model)) if freeze_rates else None,
    )
    trained = float(model.log_var.detach())
    offset = calibrate_noise(model, fold, val_samples, seed + 9) - trained if calibrate else 0.0
    record = {}
    if warm_fraction > 0:
        if test_before_warm:
            record["rmse_before_warm"], record["ll_before_warm"] = _hetero_eval(
                model, x_test, y_test, fold.y_mean, fold.y_std, samples, seed + 1
            )
        warm_epochs = max(1, round(best.epoch * warm_fraction))
        _continue_on_whole_split(model, ds, fit_idx, train_idx, fold, warm_epochs, seed + 11, loss_fn, warm_decay)
        record["warm_epochs"] = warm_epochs
    if test:
        record["rmse"], record["ll"] = _hetero_eval(model, x_test, y_test, fold.y_mean, fold.y_std, samples, seed + 1)
    record.update(
        rates=_site_rates(model),
        tau=_tau_of(model, fold.y_std),
        val_ll=best.score,
        best_epoch=best.epoch,
        epochs_run=best.last_epoch,
        noise_offset=offset,
    )
    if freeze_rates:
        record["frozen_at"] = best.declined_at
    return record


def _continue_on_whole_split(
    model: nn.Module,
    ds: UCIDataset,
    fit_idx: np.ndarray,
    train_idx: np.ndarray,
    fold: Fold,
    epochs: int,
    seed: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    decay_to_zero: bool = False,
) -> None:
    """Train ``model``'s weights on over the whole training split, its rates and noise level held.

    The rows are standardised with the fitting set's statistics, as the model was trained and is tested. This
    is a refit without a second run: the state chosen on validation is warm, and the held-out rows join in.

    Args:
        model: the converted ``NoiseNet`` in its kept, calibrated state.
        ds: the data set.
        fit_idx: the fitting rows (their statistics standardise).
        train_idx: the whole training split.
        fold: the run's fold (its target scale).
        epochs: epochs to train on.
        seed: the shuffling seed.
        loss_fn: the run's loss.
        decay_to_zero: the learning rate falls linearly to zero over the epochs (:func:`_train`).
    """
    _, _, (_, x_all) = standardize(ds.X[fit_idx], ds.X[train_idx])
    y_all = (ds.y[train_idx] - fold.y_mean) / fold.y_std
    whole = Fold(_float32(x_all), _float32(y_all), fold.x_eval, fold.y_eval, fold.y_mean, fold.y_std)
    _stop_rates_training(model)
    model.log_var.requires_grad_(False)
    try:
        _train(model, whole, epochs, seed, loss_fn, decay_to_zero=decay_to_zero)
    finally:
        model.log_var.requires_grad_(True)


def refit_concrete(
    ds: UCIDataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    hidden: int,
    epochs: int,
    samples: int,
    seed: int,
    first_tau: float,
    noise_offset: float | None = None,
    noise_prior: float = 0.0,
    fixed_rates: Sequence[float] | None = None,
) -> dict:
    """``concrete_refit``'s second run: the same network on the whole training split, as the grid refits.

    It trains for the epoch count the first run's validation chose, and it is tested with the first run's
    calibrated noise level. No held-out data is left to check or calibrate the refit, and its own learned
    noise follows its training residuals down: it trains on 25% more rows for as many epochs, so it fits them
    more closely. On Boston, moved by the first run's calibration offset, its precision came out 1.1-1.7x
    (median 1.5x) the first run's calibrated one, and the test LL paid for it on the splits with large
    residuals. The first run's calibrated level is the only one measured on held-out data.

    Args:
        ds: the data set.
        train_idx, test_idx: the split.
        hidden: hidden units.
        epochs: the first run's best epoch.
        samples: MC passes at test.
        seed: the run's seed.
        first_tau: the first run's precision (original units; calibrated unless calibration is off), used at
            test.
        noise_offset: the first run's ``noise_offset``; when given, the record also has ``ll_offset_noise``,
            the test LL of the same MC samples with the refit's learned log-variance moved by that offset
            instead (the earlier noise rule, kept as a diagnostic; not part of the method).
        noise_prior: as in :func:`run_concrete`.
        fixed_rates: ``concrete_freeze_refit``: the first run's rates, one per site in conversion order; the
            refit's sites hold them for the whole run (no gradient), as a grid point's refit holds its p. None:
            the rates train (``concrete_refit``).

    Returns:
        Record fields: ``rmse``, ``ll``, ``rates``, ``tau`` (used at test, original units)[, ``ll_offset_noise``].
    """
    fold = Fold.make(ds, train_idx, test_idx)
    common.seed_all(seed)
    model = _concrete_noise_net(fold, hidden)
    if fixed_rates is not None:
        _hold_rates(model, fixed_rates)
    _train(model, fold, epochs, seed, _concrete_loss(fold.x_fit.shape[0], noise_prior))
    learned = float(model.log_var.detach())
    with torch.no_grad():  # the first run's precision in the refit's standardised units
        model.log_var.fill_(math.log(1.0 / (first_tau * fold.y_std**2)))
    mu, sigma2 = _hetero_samples(model, fold.x_eval, fold.y_mean, fold.y_std, samples, seed + 1)
    out = dict(
        rmse=mc_rmse(mu, fold.y_eval),
        ll=float(common.mc_gaussian_ll(mu, fold.y_eval, sigma2).mean()),
        rates=_site_rates(model),
        tau=_tau_of(model, fold.y_std),
    )
    if noise_offset is not None:
        offset_sigma2 = math.exp(learned + noise_offset) * fold.y_std**2
        out["ll_offset_noise"] = float(common.mc_gaussian_ll(mu, fold.y_eval, offset_sigma2).mean())
    return out
