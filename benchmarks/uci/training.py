"""The protocol's training loop (Adam, batch 128, reshuffled each epoch) and the count of what it costs: every
training batch and every MC pass of the benchmark adds to :data:`PASSES`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import common
from .decisions import BestState, train_keep_best
from .protocol import Fold

BATCH_SIZE = 128


@dataclass
class PassCount:
    """Forward passes run so far: training mini-batches and MC evaluation passes (one per MC sample)."""

    train_batches: int = 0
    mc_passes: int = 0

    def since(self, before: "PassCount") -> dict[str, int]:
        """The passes run after the snapshot ``before``, as record fields (with their sum ``forward_passes``)."""
        train, mc = self.train_batches - before.train_batches, self.mc_passes - before.mc_passes
        return dict(train_batches=train, mc_passes=mc, forward_passes=train + mc)


#: The running count; every training batch and MC pass of the benchmark adds to it.
PASSES = PassCount()


def _cost_since(t0: float, passes0: PassCount) -> dict:
    """A record's cost fields since the snapshot (``time.perf_counter()``, ``copy.copy(PASSES)``):
    ``wall_s`` and the forward-pass counts."""
    return dict(wall_s=time.perf_counter() - t0, **PASSES.since(passes0))


def _mc_plain(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` MC passes of a plain-dropout model (global RNG), counted."""
    PASSES.mc_passes += samples
    return common.mc_passes_plain_dropout(model, x, samples)


def _mc_concrete(model: nn.Module, x: torch.Tensor, samples: int, seed: int):
    """``samples`` seeded MC passes of a converted model (with the samples), counted."""
    PASSES.mc_passes += samples
    return common.mc_predict(model, x, samples, seed, return_samples=True)


def fused_adam(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused where the installed torch has a fused Adam for the parameters' device (the same update, less
    per-step overhead), else the multi-tensor one (torch < 2.4 has no fused Adam on the CPU).

    Args:
        params: the parameters.
        lr: the learning rate.

    Returns:
        The optimizer.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, foreach=True)


def protocol_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The protocol's optimizer: Adam, learning rate 1e-3 (:func:`fused_adam`)."""
    return fused_adam(model.parameters(), lr=1e-3)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """One epoch of the protocol's training loop: batches of 128 in a fresh order, one optimizer step each.

    Args:
        model: the network (in training mode).
        optimizer: its optimizer (:func:`protocol_optimizer`).
        x, y: the rows it trains on.
        generator: draws the order.
        loss_fn: ``loss_fn(model, x_batch, y_batch)``, the whole loss of a step.
    """
    for idx in common.batches(x.shape[0], BATCH_SIZE, generator):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x[idx], y[idx])
        loss.backward()
        optimizer.step()
        PASSES.train_batches += 1


def _train(
    model: nn.Module, fold: Fold, epochs: int, seed: int, loss_fn, on_epoch=None, decay_to_zero: bool = False
) -> None:
    """Adam, batch 128, reshuffled every epoch; ``on_epoch(epoch)`` is called after each epoch and a True
    return ends the training there. With ``decay_to_zero`` the learning rate falls linearly over the epochs:
    epoch ``e`` (from 0) trains at ``1 - e / epochs`` of the protocol's, the last at ``1 / epochs`` of it."""
    common.seed_all(seed)
    g = torch.Generator().manual_seed(seed)
    opt = protocol_optimizer(model)
    base_rates = [group["lr"] for group in opt.param_groups]
    model.train()
    for epoch in range(epochs):
        if decay_to_zero:
            for group, rate in zip(opt.param_groups, base_rates):
                group["lr"] = rate * (1 - epoch / epochs)
        train_epoch(model, opt, fold.x_fit, fold.y_fit, g, loss_fn)
        if on_epoch is not None and on_epoch(epoch + 1):
            return


def _fit_keep_best(
    model: nn.Module,
    fold: Fold,
    epochs: int,
    seed: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    validate: Callable[[], float],
    eval_every: int,
    patience: int,
) -> BestState:
    """:func:`_train` on ``fold`` under the checkpoint rule and early stop of :func:`train_keep_best`."""
    return train_keep_best(
        model,
        lambda on_epoch: _train(model, fold, epochs, seed, loss_fn, on_epoch),
        validate,
        epochs,
        eval_every,
        patience,
    )
