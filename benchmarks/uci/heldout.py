"""``concrete_heldout``'s training: the weights on the fitting set, the rates and the noise level on the held-out
20% by the MC predictive log-density of relaxed passes."""

from __future__ import annotations

import torch
import torch.nn as nn

from cd_convert.losses import gaussian_mixture_nll

from .. import common
from . import training
from .concrete_net import _is_p_logit
from .protocol import Fold
from .training import PASSES, fused_adam

#: MC samples per held-out example in ``concrete_heldout``'s rate step (the mixture of its predictive LL).
HELDOUT_SAMPLES = 16
#: Adam's learning rate for ``concrete_heldout``'s rates and noise level.
HELDOUT_LR = 1e-3


def _is_rate_parameter(name: str) -> bool:
    """Whether a parameter of the converted ``NoiseNet`` is learned on held-out data by ``concrete_heldout``:
    the sites' p-logits and the noise level."""
    return _is_p_logit(name) or name == "log_var"


def _heldout_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, samples: int) -> torch.Tensor:
    """Minus the MC predictive log-density of ``yb`` (standardised) under ``samples`` relaxed-mask passes.

    The rows are repeated ``samples`` times in one batch: every row of a site's input draws its own mask, so the
    passes are independent.
    """
    mean, log_var = model(xb.repeat(samples, 1))
    shape = (samples, *yb.shape)
    return gaussian_mixture_nll(mean.reshape(shape), log_var.reshape(shape), yb)


def _train_heldout(model: nn.Module, fold: Fold, epochs: int, seed: int, loss_fn, samples: int, on_epoch=None) -> None:
    """``concrete_heldout``'s training: each epoch, the weights take Adam steps on the fitting set's batches
    (``loss_fn``, as :func:`_train`), then the rates and the noise level take Adam steps on the held-out
    set's batches (:func:`_heldout_loss`). ``on_epoch`` as in :func:`_train`."""
    common.seed_all(seed)
    g = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters())
    rate_params = [p for n, p in named if _is_rate_parameter(n)]
    weight_params = [p for n, p in named if not _is_rate_parameter(n)]
    weights_opt = fused_adam(weight_params, lr=1e-3)
    rates_opt = fused_adam(rate_params, lr=HELDOUT_LR)
    y_heldout = ((fold.y_eval - fold.y_mean) / fold.y_std).float()
    model.train()
    n, n_heldout = fold.x_fit.shape[0], fold.x_eval.shape[0]
    for epoch in range(epochs):
        for idx in common.batches(n, training.BATCH_SIZE, g):
            loss = loss_fn(model, fold.x_fit[idx], fold.y_fit[idx])
            # Only the weights' gradients: the rates' share of this loss (the regulariser's) is not used.
            for p, grad in zip(weight_params, torch.autograd.grad(loss, weight_params)):
                p.grad = grad
            weights_opt.step()
            PASSES.train_batches += 1
        for idx in common.batches(n_heldout, training.BATCH_SIZE, g):
            loss = _heldout_loss(model, fold.x_eval[idx], y_heldout[idx], samples)
            for p, grad in zip(rate_params, torch.autograd.grad(loss, rate_params)):
                p.grad = grad
            rates_opt.step()
            PASSES.train_batches += samples  # a step over ``samples`` copies of the batch
        if on_epoch is not None and on_epoch(epoch + 1):
            return
