"""The paper's Concrete network of the protocol: conversion, losses, the rates' handling and its MC evaluation
with a learned noise level, shared by every Concrete method."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert

from .. import common
from .decisions import best_noise_log_variance
from .protocol import LENGTH_SCALE, Fold, NoiseNet, mc_rmse
from .training import _mc_concrete


def _concrete_net(net: nn.Module, n: int, package: Any = cd_convert, **scale) -> nn.Module:
    """The paper's Concrete network: a learned site on the input of every Linear, the prior set for n examples.

    Args:
        net: the network without dropout.
        n: the number of examples it is fitted on.
        package: the ``cd_convert`` package that converts it (``tools/ab_speed.py`` passes another revision's).
        **scale: ``loss=`` and, for ``"mse"``, ``tau=`` (in the units of the loss).

    Returns:
        The converted network.
    """
    return package.convert(net, targets=[nn.Linear], dataset_size=n, length_scale=LENGTH_SCALE, **scale)


def _site_rates(model: nn.Module) -> list[float]:
    """The learned dropout rate of every site of a converted ``model``, in conversion order."""
    return [float(v) for v in cd_convert.dropout_rates(model).values()]


def _is_p_logit(name: str) -> bool:
    """Whether a parameter name is a concrete-dropout site's p-logit."""
    return name.endswith("p_logit")


def _stop_rates_training(model: nn.Module) -> None:
    """Hold every site's rate where it is: the p-logits get no gradient from here on, so Adam leaves them alone."""
    for name, param in model.named_parameters():
        if _is_p_logit(name):
            param.requires_grad_(False)


def _hold_rates(model: nn.Module, rates: Sequence[float]) -> None:
    """Set the sites of a converted ``model`` to ``rates`` (conversion order) and stop their p-logits training.

    Raises:
        ValueError: when the number of rates is not the number of sites.
    """
    names = list(cd_convert.dropout_rates(model))
    if len(names) != len(rates):
        raise ValueError(f"{len(rates)} rates given for the {len(names)} sites {names}")
    with torch.no_grad():
        for name, rate in zip(names, rates):
            model.get_submodule(name).p_logit.fill_(math.log(rate / (1.0 - rate)))
    _stop_rates_training(model)


def _mse_with_regularizer(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """``concrete_tau``'s loss: mean squared error plus the regulariser (preset ``loss="mse"``)."""
    return F.mse_loss(model(xb), yb) + cd_convert.regularization(model)


def _concrete_noise_net(fold: Fold, hidden: int) -> nn.Module:
    """``NoiseNet`` converted with the heteroscedastic preset for ``fold``'s fitting set."""
    return _concrete_net(NoiseNet(fold.x_fit.shape[1], hidden), fold.x_fit.shape[0], loss="heteroscedastic")


def _concrete_loss(
    n: int, noise_prior: float, package: Any = cd_convert
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Gaussian NLL with the learned noise, plus the regulariser and the optional prior on the log-variance
    (``package``'s loss and regulariser: ``tools/ab_speed.py`` passes another revision's)."""
    gaussian, regularization = package.losses.heteroscedastic_gaussian, package.regularization

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        mean, log_var = m(xb)
        loss = gaussian(mean, log_var, yb) + regularization(m)
        if noise_prior > 0:
            loss = loss + noise_prior * m.log_var.pow(2) / n
        return loss

    return loss_fn


def _tau_of(model: NoiseNet, y_std: float) -> float:
    """The model's noise precision in original units."""
    return 1.0 / (math.exp(float(model.log_var.detach())) * y_std**2)


def _hetero_samples(
    model: nn.Module, x: torch.Tensor, y_mean: float, y_std: float, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded MC samples of a learned-noise model: ``(mu, sigma2)``, each ``(T, N)`` in original units."""
    pred = _mc_concrete(model, x, samples, seed)
    mu = pred.samples.double() * y_std + y_mean
    return mu, pred.log_variance_samples.detach().double().exp() * y_std**2


def _hetero_eval(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_mean: float, y_std: float, samples: int, seed: int
) -> tuple[float, float]:
    """RMSE of the MC mean and MC test log-likelihood of a learned-noise model on ``(x, y)``."""
    mu, sigma2 = _hetero_samples(model, x, y_mean, y_std, samples, seed)
    return mc_rmse(mu, y), float(common.mc_gaussian_ll(mu, y, sigma2).mean())


def calibrate_noise(model: NoiseNet, fold: Fold, samples: int, seed: int) -> float:
    """Re-pick the homoscedastic log-variance by validation MC test LL (a 1-d search, no training).

    Returns the new log-variance (standardised units), which is also written into ``model.log_var``.
    """
    pred = _mc_concrete(model, fold.x_eval, samples, seed)
    mu = pred.samples.double() * fold.y_std + fold.y_mean
    best = best_noise_log_variance(mu, fold.y_eval, fold.y_std, float(model.log_var.detach()))
    with torch.no_grad():
        model.log_var.fill_(best)
    return best
