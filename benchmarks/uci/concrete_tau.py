"""Variant (a), the paper's setting: learned rates, the mean squared error with a fixed tau chosen on validation
(``concrete_tau``), optionally with the epoch count chosen there too (``concrete_tau_stop``)."""

from __future__ import annotations

from .. import common
from .concrete_net import _concrete_net, _mse_with_regularizer, _site_rates
from .protocol import Fold, PlainNet, mc_rmse, mc_test_ll_tau
from .training import _fit_keep_best, _mc_concrete, _train


def run_concrete_tau(fold: Fold, hidden: int, tau: float, epochs: int, samples: int, seed: int):
    """Variant (a): learned p, MSE with fixed tau (converted to standardised units). Returns (rmse, ll, rates)."""
    common.seed_all(seed)
    n = fold.x_fit.shape[0]
    model = _concrete_net(PlainNet(fold.x_fit.shape[1], hidden), n, loss="mse", tau=tau * fold.y_std**2)

    _train(model, fold, epochs, seed, _mse_with_regularizer)
    pred = _mc_concrete(model, fold.x_eval, samples, seed + 1)
    mu = pred.samples.double() * fold.y_std + fold.y_mean
    rmse = mc_rmse(mu, fold.y_eval)
    return rmse, mc_test_ll_tau(mu, fold.y_eval, tau), _site_rates(model)


def run_concrete_tau_keep_best(
    fold: Fold, hidden: int, tau: float, epochs: int, seed: int, eval_every: int, val_samples: int, patience: int
) -> dict:
    """``concrete_tau_stop``'s validation run: variant (a) under the checkpoint rule, scored at its best check.

    The same objective as :func:`run_concrete_tau` (the paper's), trained on ``fold.x_fit`` and checked every
    ``eval_every`` epochs by MC test LL with ``tau`` on ``fold.x_eval`` (the validation split); the run stops
    ``patience`` epochs after its best check. Only the number of epochs is chosen, on the same held-out data
    that chooses tau.

    Args:
        fold: fitting set and validation set.
        hidden: hidden units.
        tau: the model precision (original units).
        epochs: the epoch budget.
        seed: the run's seed.
        eval_every: check interval in epochs.
        val_samples: MC passes per check.
        patience: early stop (:func:`should_stop`; 0: never).

    Returns:
        ``{"val_ll", "best_epoch", "rates"}`` of the best check.
    """
    common.seed_all(seed)
    n = fold.x_fit.shape[0]
    model = _concrete_net(PlainNet(fold.x_fit.shape[1], hidden), n, loss="mse", tau=tau * fold.y_std**2)

    def validate() -> float:
        mu = _mc_concrete(model, fold.x_eval, val_samples, seed + 7).samples.double() * fold.y_std + fold.y_mean
        return mc_test_ll_tau(mu, fold.y_eval, tau)

    best = _fit_keep_best(model, fold, epochs, seed, _mse_with_regularizer, validate, eval_every, patience)
    return dict(val_ll=best.score, best_epoch=best.epoch, rates=_site_rates(model))
