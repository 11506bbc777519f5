"""The MC-dropout grid: one grid point's run as published (``grid``) and under Concrete's checkpoint rule and
noise calibration (``grid_calibrated``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import common
from ..datasets import UCIDataset, validation_split
from .decisions import BestState, best_noise_log_variance, select_best
from .protocol import Fold, GridNet, _test_set, grid_weight_decay, mc_rmse, mc_test_ll_tau
from .training import _fit_keep_best, _mc_plain, _train


def _grid_loss(p: float, tau: float, n: int) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The grid's loss: mean squared error plus Keras-style weight decay on both kernels."""
    reg = grid_weight_decay(p, tau, n)

    def loss_fn(m: GridNet, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(m(xb), yb) + reg * (m.fc1.weight.pow(2).sum() + m.fc2.weight.pow(2).sum())

    return loss_fn


def run_grid_point(fold: Fold, hidden: int, p: float, tau: float, epochs: int, samples: int, seed: int):
    """Train one grid point on ``fold.x_fit`` and return (rmse, ll) on ``fold.x_eval``."""
    common.seed_all(seed)
    model = GridNet(fold.x_fit.shape[1], hidden, p)
    _train(model, fold, epochs, seed, _grid_loss(p, tau, fold.x_fit.shape[0]))
    common.seed_all(seed + 1)
    mu = _mc_plain(model, fold.x_eval, samples).double() * fold.y_std + fold.y_mean
    rmse = mc_rmse(mu, fold.y_eval)
    return rmse, mc_test_ll_tau(mu, fold.y_eval, tau)


def run_grid_point_keep_best(
    fold: Fold,
    hidden: int,
    p: float,
    tau: float,
    epochs: int,
    seed: int,
    eval_every: int,
    val_samples: int,
    patience: int = 0,
) -> tuple[GridNet, BestState]:
    """One grid point trained as :func:`run_grid_point` trains it, under concrete's checkpoint rule.

    Every ``eval_every`` epochs (and at the last) the model is scored by MC test LL with the fixed ``tau``
    on ``fold.x_eval`` (``val_samples`` passes); the best state is kept and loaded at the end. The checks
    draw their masks from a forked, seeded RNG, so the training trajectory is the one the same ``seed`` gives
    :func:`run_grid_point`.

    Args:
        fold: fitting set and validation set.
        hidden: hidden units.
        p: dropout rate of both layers.
        tau: model precision (original units) of the weight decay and of the validation LL.
        epochs: training epochs.
        seed: the run's seed.
        eval_every: check interval in epochs.
        val_samples: MC passes per check.
        patience: early stop as in :func:`train_keep_best` (0: never).

    Returns:
        The model (holding its best state) and the kept :class:`BestState`.
    """
    common.seed_all(seed)
    model = GridNet(fold.x_fit.shape[1], hidden, p)
    loss_fn = _grid_loss(p, tau, fold.x_fit.shape[0])

    def validate() -> float:
        with torch.random.fork_rng(devices=[]):  # the training's own RNG stream is left untouched
            torch.manual_seed(seed + 7)
            mu = _mc_plain(model, fold.x_eval, val_samples).double() * fold.y_std + fold.y_mean
        return mc_test_ll_tau(mu, fold.y_eval, tau)

    best = _fit_keep_best(model, fold, epochs, seed, loss_fn, validate, eval_every, patience)
    return model, best


def calibrate_grid_tau(model: GridNet, fold: Fold, tau: float, samples: int, seed: int) -> float:
    """Re-pick a plain-dropout model's tau by validation MC LL over concrete's calibration candidates.

    The candidates are the log-variances ``s0 + CALIBRATION_OFFSETS`` (standardised units) around
    ``s0 = log(1 / (tau * y_std^2))``, scored by :func:`best_noise_log_variance` as in :func:`calibrate_noise`.

    Args:
        model: the trained grid network.
        fold: its fitting set's scale and the validation set (``x_eval``, ``y_eval``).
        tau: the precision it was trained and selected with (original units).
        samples: MC passes on the validation set.
        seed: seed of those passes.

    Returns:
        The calibrated tau (original units).
    """
    common.seed_all(seed)
    mu = _mc_plain(model, fold.x_eval, samples).double() * fold.y_std + fold.y_mean
    s0 = math.log(1.0 / (tau * fold.y_std**2))
    best = best_noise_log_variance(mu, fold.y_eval, fold.y_std, s0)
    return 1.0 / (math.exp(best) * fold.y_std**2)


def run_grid_calibrated(
    ds: UCIDataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    hidden: int,
    epochs: int,
    samples: int,
    seeds: Callable[[int, int], int],
    test_seed: int,
    eval_every: int,
    val_samples: int,
    calibrate: bool = True,
    bar=None,
    patience: int = 0,
) -> dict:
    """The grid with concrete's checkpoint rule and noise calibration (see the module docstring).

    Args:
        ds: the data set (its p and tau grids).
        train_idx, test_idx: the split.
        hidden: hidden units.
        epochs: epochs per grid point.
        samples: MC passes at test.
        seeds: ``seeds(i, j)``: the training seed of grid point (p index i, tau index j).
        test_seed: seed of the calibration and test passes.
        eval_every: checkpoint interval in epochs.
        val_samples: MC passes per check and for the calibration.
        calibrate: re-pick tau on validation after the selection.
        bar: optional progress bar, updated per training run.
        patience: early stop of each grid point as in :func:`train_keep_best` (0: never).

    Returns:
        Record fields: rmse, ll, p, tau (used at test), tau_grid (selected), val_ll (its best check),
        best_epoch, val_grid (kept validation LL per point, nested list) and train_runs.
    """
    fit_idx, val_idx = validation_split(train_idx)
    fold = Fold.make(ds, fit_idx, val_idx)
    x_test, y_test = _test_set(ds, fit_idx, test_idx)
    grid = np.full((len(ds.dropout_rates), len(ds.tau_values)), -np.inf)
    kept: dict[tuple[int, int], tuple[GridNet, BestState]] = {}
    for i, p in enumerate(ds.dropout_rates):
        for j, tau in enumerate(ds.tau_values):
            model, best = run_grid_point_keep_best(
                fold, hidden, p, tau, epochs, seeds(i, j), eval_every, val_samples, patience
            )
            grid[i, j] = best.score
            kept[i, j] = (model, best)
            bar is not None and bar.update(1)
    i, j = select_best(grid)
    (model, best), p, tau_grid = kept[i, j], ds.dropout_rates[i], ds.tau_values[j]
    tau = calibrate_grid_tau(model, fold, tau_grid, val_samples, test_seed + 9) if calibrate else tau_grid
    common.seed_all(test_seed + 1)
    mu = _mc_plain(model, x_test, samples).double() * fold.y_std + fold.y_mean
    rmse = mc_rmse(mu, y_test)
    return dict(
        rmse=rmse,
        ll=mc_test_ll_tau(mu, y_test, tau),
        p=p,
        tau=tau,
        tau_grid=tau_grid,
        val_ll=best.score,
        best_epoch=best.epoch,
        val_grid=grid.tolist(),
        train_runs=grid.size,
    )
