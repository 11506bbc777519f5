"""UCI regression benchmark: the MC-dropout grid search against Concrete Dropout.

Three methods per train/test split (Gal & Ghahramani 2016 protocol, rerun in Gal, Hron, Kendall 2017):

``grid`` (the published baseline, reproduced as in yaringal/DropoutUncertaintyExps ``net.py``)
    One hidden ReLU layer of ``n_hidden`` units, ``nn.Dropout(p)`` on the input and on the hidden layer,
    Adam (lr 1e-3), batch 128, inputs and targets standardised on the fitting set. The grid is
    ``dropout_rates.txt`` x ``tau_values.txt``; each point is trained on the first 80% of the training
    split (:func:`benchmarks.datasets.validation_split`) and scored by MC test log-likelihood on the last
    20%; the best (p, tau) is refitted on the whole training split. 12 + 1 = 13 training runs per split.

    Weight decay, our reading of the original code: Keras ``W_regularizer=l2(reg)`` on every Dense kernel
    (not the biases) with ``reg = l^2 (1 - p) / (2 N tau)``, ``l = 1e-2``, ``N`` the number of examples the
    run is fitted on and ``tau`` the *raw* grid value (original units, exactly as published, although the
    net is trained on standardised targets). Keras' ``l2(reg)`` adds ``reg * sum(W**2)`` (no factor 1/2) to
    the per-batch *mean* squared error; so the loss here is
    ``mean_i (y_i - f(x_i))^2 + reg * (||W1||^2 + ||W2||^2)``. See :func:`grid_weight_decay`.

    Test metrics as in the original: T stochastic passes, means un-standardised,
    ``ll = logsumexp_t(-0.5 tau (y - mu_t)^2) - log T - 0.5 log 2pi + 0.5 log tau`` (original units) averaged
    over test points, and the RMSE of the MC mean.

``concrete_tau`` (Concrete Dropout, variant (a): learned p, tau still tuned)
    The same network without dropout, converted with ``cd_convert.convert(targets=[nn.Linear])`` (two sites:
    input and hidden). Loss: mean squared error on standardised targets, regulariser preset ``loss="mse"``
    with the precision converted to the units of the loss, ``tau * std(y_fit)^2`` (the units trap of the
    reference doc; the preset assumes ``loss = MSE = 2/tau * NLL + c``). tau is chosen on the same validation
    split by MC test LL (3 runs) and refitted on the whole training split: 4 training runs per split.

``concrete`` (variant (b): tuning-free, one training run per split)
    Learned p *and* a learned homoscedastic noise level (a scalar log-variance parameter), loss
    :func:`cd_convert.losses.heteroscedastic_gaussian` with preset ``loss="heteroscedastic"``.

    The trap: trained for the full 4000 epochs on small data sets the network keeps fitting the training
    targets, the learned noise variance follows the training residuals down, and the test LL collapses on
    some splits (overconfident; -4.94 was seen on one). The regulariser does not stop this: the noise
    parameter carries no prior. Our fix, chosen so that the method stays one training run:

    * **validation-based stop inside the run**: the run fits on the first 80% of the training split
      (the same ``validation_split`` the grid uses) and every ``--eval-every`` epochs scores the MC test LL
      on the last 20% (``--val-samples`` passes, a fixed generator). The state with the best validation LL
      is kept and used for testing; nothing is refitted. This is the textbook guard against exactly the
      failure seen (over-fitting of the noise level shows up directly as a falling held-out LL), it costs a
      few cheap forward passes and no extra training, and it uses held-out data the grid uses as well.
      The price: the final model sees 80% of the training split, not 100% as the grid's refit does.
      The run ends ``--patience`` epochs after its best check (default a quarter of the budget;
      :func:`should_stop`): the kept state cannot change after that point unless the validation LL recovers
      past its peak, and on the data sets whose best epoch is early most of the budget is saved.
    * by default (``--no-calibrate-noise`` turns it off) the noise level alone is re-picked after training
      by validation MC test LL (a 1-d search over the log-variance with the trained network's MC samples;
      no retraining).
      On yacht the learned noise came out too large (tau about 0.4 against the grid's 0.75), because the
      training residuals include those of the occasional dropped input feature, which the MC mixture then
      counts a second time; this corrects it for the price of a few forward passes.
    * optionally (``--noise-prior W``) a weak Gaussian prior on the log-variance towards log(1) = 0 (the
      variance of the standardised targets), ``W * s^2 / N`` added to the loss. Off by default.

``concrete_refit`` (opt-in; variant (b) with the grid's refit: two training runs per split)
    ``concrete``'s run, then the same recipe trained again on the whole training split for the first run's
    best epoch (the held-out 20% is used, as the grid uses it, to choose a setting, here the epoch count).
    Nothing is left to check or calibrate the refit on, so it is tested with the first run's calibrated noise
    level (:func:`refit_concrete`).

``concrete_freeze`` (opt-in; variant (b) with the rates fixed at the first declining check)
    ``concrete``'s run, except at the first validation check that does not beat the best one: there the best
    check's state is loaded back, the p-logits stop training (no gradient), and the weights and the noise level
    train on from that state under the same checkpoint rule; the patience counts from that check or a later
    best one (:func:`train_keep_best`'s ``on_first_decline``). Why: the training objective keeps lowering the
    rates as the network fits its 80% (``benchmarks.uci_terms`` shows it for the paper's setting), and the
    validation LL falls with them; a network whose rate is held fixed, as each grid point's is, can go on
    improving. One training run.

``concrete_freeze_refit`` (opt-in; ``concrete_freeze`` with the grid's refit: two training runs per split)
    ``concrete_freeze``'s run, then a refit on the whole training split as ``concrete_refit``'s, for the first
    run's best epoch and tested with its calibrated noise level, with one difference: the refit's sites hold the
    first run's rates for the whole run (``fixed_rates`` of :func:`refit_concrete`), as the grid's refit holds
    the chosen p. Learning the rates again would let them fall for as long as the refit trains.

``concrete_freeze_warm`` (opt-in; ``concrete_freeze`` with a warm refit: one training run per split)
    ``concrete_freeze``'s run and calibration, then the kept state trains on over the whole training split (the
    held-out 20% joined in, standardised with the fitting set's statistics) for a quarter of its best epoch
    (``WARM_FRACTION``), with the rates and the calibrated noise level held; it is tested as it ends
    (:func:`_continue_on_whole_split`). The grid's last step is a refit on the whole training split, which the
    one-run methods lack (``grid_calibrated``, the grid without it, is as far behind the published grid on
    wine as ``concrete``); a refit from scratch costs a second run, and this one starts from the chosen state,
    so a fraction of the epochs lets the joined rows in. A quarter: the joined rows are a quarter of the
    fitting set's.

``concrete_heldout`` (opt-in; variant (b) with the rates and the noise level learned on the held-out 20%)
    ``concrete``'s run (same network, fitting set, checks, checkpoint rule, early stop and calibration), with
    the parameters split between the two sets (:func:`run_concrete`'s ``heldout_samples``;
    :func:`_train_heldout`): each epoch the weights take their steps on the fitting set (heteroscedastic loss
    plus the regulariser), then the p-logits and the log-variance take theirs on the held-out set, minimising
    minus the MC predictive log-density of ``HELDOUT_SAMPLES`` relaxed passes
    (:func:`cd_convert.losses.gaussian_mixture_nll`). The training objective drives the rates down as the
    network fits its data (``benchmarks.uci_terms``); the held-out mixture is the quantity the grid selects its
    rate by, and it is differentiable in the rates because the masks are relaxed. One training run; a rate step
    costs ``HELDOUT_SAMPLES`` passes over its batch.

``concrete_tau_stop`` (opt-in; variant (a) with the epoch count chosen on validation)
    ``concrete_tau``'s objective and tau grid, with each tau's validation run under the checkpoint rule
    (:func:`run_concrete_tau_keep_best`); the tau whose best check is highest wins and the refit on the whole
    training split trains for that check's epoch. ``python -m benchmarks.uci_terms`` shows why this matters:
    the learned rates keep falling as the network fits the training data, and the validation LL peaks long
    before the 4000th epoch.

``grid_calibrated`` (opt-in: ``--methods grid,grid_calibrated,concrete``; the grid given concrete's extras)
    The grid above with the two advantages ``concrete`` has, so that the three compare like with like:

    * **the same checkpoint rule**: each of the 12 grid points is trained on the first 80% of the training
      split exactly as the grid's validation runs (same seeds, so the same training trajectory: the checks
      draw their dropout masks from a forked RNG) and every ``--eval-every`` epochs (and at the last) scored
      by MC test LL with the point's tau on the last 20% (``--val-samples`` passes); each point keeps its
      best-validation state (:func:`train_keep_best`). The (p, tau) with the best kept validation LL wins,
      and its kept state is tested; nothing is refitted (as in ``concrete``; the grid's refit is dropped).
    * **the same noise calibration** (``--calibrate-noise``, default; ``--no-calibrate-noise`` turns it off
      here too): the network has no noise parameter, so its tau is re-picked by validation MC LL with
      :func:`best_noise_log_variance` over the same candidates as ``concrete`` (``CALIBRATION_OFFSETS``
      around the chosen tau's log-variance, ``log(1 / (tau std(y_fit)^2))`` in standardised units), from
      ``--val-samples`` fresh MC passes. The test LL uses the calibrated tau. 12 training runs per split.

Cost: besides wall-clock and training runs, every record counts forward passes: ``train_batches`` (training
mini-batches, ``ceil(N_fit / 128)`` per epoch per run), ``mc_passes`` (one per MC sample of every
validation, checkpoint, calibration and test evaluation) and their sum ``forward_passes``. An MC pass is over
a whole evaluation set, a training batch over at most 128 rows: the two parts are reported separately.

Published per-split results: with ``<data dir>/uci-published/<name>/`` present
(:func:`benchmarks.datasets.load_published`), each method's summary gets ``vs_published``: the mean over the
splits run of (method - published grid) in test LL and RMSE on the *same* split indices, its standard error
(paired differences), and the published mean over those same splits (:func:`compare_with_published`).

Usage::

    python -m benchmarks.uci                                  # embedded sklearn diabetes, quick settings
    python -m benchmarks.uci --data-dir ../shared/datasets --datasets yacht --splits 20 --epochs 4000 \\
        --samples 10000 --json results/uci_full_yacht.json --plot results/uci_full_yacht.png
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert.losses import gaussian_mixture_nll

from . import common
from .datasets import (
    UCIDataset,
    data_root,
    load_embedded_regression,
    load_published,
    load_uci,
    standardize,
    uci_datasets_in,
    validation_split,
)

LENGTH_SCALE = 1e-2
BATCH_SIZE = 128
METHODS = ("grid", "concrete_tau", "concrete")  # the default run; ``grid_calibrated`` is opt-in
ALL_METHODS = (
    "grid",
    "grid_calibrated",
    "concrete_tau",
    "concrete_tau_stop",
    "concrete",
    "concrete_refit",
    "concrete_heldout",
    "concrete_freeze",
    "concrete_freeze_refit",
    "concrete_freeze_warm",
)

#: Published MC-dropout grid-search results (rmse, rmse_se, ll, ll_se): the reference doc's table, and for the
#: three larger sets the means of the published per-split files (the shared data's README).
PUBLISHED = {
    "bostonHousing": (2.90, 0.18, -2.40, 0.04),
    "energy": (0.54, 0.01, -1.21, 0.01),
    "wine-quality-red": (0.62, 0.01, -0.93, 0.01),
    "yacht": (0.67, 0.05, -1.25, 0.01),
    "naval-propulsion-plant": (0.001, 0.000, 4.450, 0.002),
    "power-plant": (4.014, 0.038, -2.808, 0.009),
    "protein-tertiary-structure": (4.274, 0.023, -2.871, 0.002),
}


# ------------------------------------------------------------------------------------------ models


class GridNet(nn.Module):
    """The protocol's network with plain dropout: Dropout(p) -> Dense(h, relu) -> Dropout(p) -> Dense(1)."""

    def __init__(self, d: int, hidden: int, p: float) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(p)
        self.fc1 = nn.Linear(d, hidden)
        self.drop_h = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop_h(F.relu(self.fc1(self.drop_in(x))))).squeeze(-1)


class PlainNet(nn.Module):
    """The same network without dropout; ``convert(targets=[nn.Linear])`` puts a site before each Linear."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1)


class NoiseNet(PlainNet):
    """PlainNet plus a learned homoscedastic log-variance ``s`` (in standardised units); returns (mean, s)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__(d, hidden)
        self.log_var = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor):
        mean = super().forward(x)
        return mean, self.log_var.expand_as(mean)


def grid_weight_decay(p: float, tau: float, n: int, length_scale: float = LENGTH_SCALE) -> float:
    """Coefficient of ``sum(W**2)`` in the grid's loss: ``l^2 (1 - p) / (2 N tau)`` (Keras ``l2(reg)``)."""
    return length_scale**2 * (1.0 - p) / (2.0 * n * tau)


def mc_test_ll_tau(mu_samples: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """The original code's MC test LL with a fixed precision (all in original units), averaged over points:
    ``logsumexp_t(-0.5 tau (y - mu_t)^2) - log T - 0.5 log 2pi + 0.5 log tau``."""
    mu = mu_samples.double()
    yy = y.double()[None]
    ll = (
        torch.logsumexp(-0.5 * tau * (yy - mu) ** 2, 0)
        - math.log(mu.shape[0])
        - 0.5 * math.log(2 * math.pi)
        + 0.5 * math.log(tau)
    )
    return float(ll.mean())


def mc_rmse(mu: torch.Tensor, y: torch.Tensor) -> float:
    """RMSE of the MC mean: ``mu`` is ``(T, N)`` sampled means, ``y`` the ``(N,)`` targets (same units)."""
    return float((mu.mean(0) - y).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------ decisions
# The benchmark's choices as small pure functions, so that each can be tested on inputs with a known answer.


def select_best(val_ll: np.ndarray | Sequence[float]) -> tuple[int, ...]:
    """Index of the highest validation log-likelihood: the paper's rule for picking (p, tau) or tau.

    Ties go to the first maximum in row-major order (for the grid: the earliest p, then the earliest tau, in
    the order of ``dropout_rates.txt`` / ``tau_values.txt``), as ``np.argmax`` does. A NaN score counts as
    the maximum (``np.argmax`` semantics, kept so that earlier results reproduce).

    Args:
        val_ll: validation LL per candidate, any shape (the grid is ``(len(p), len(tau))``).

    Returns:
        The multi-index of the chosen candidate (a 1-tuple for a 1-d input).
    """
    scores = np.asarray(val_ll)
    return tuple(int(i) for i in np.unravel_index(np.argmax(scores), scores.shape))


#: Offsets (log-variance, standardised units) around the trained value that noise calibration tries.
CALIBRATION_OFFSETS = np.linspace(-3.0, 3.0, 121)


def best_noise_log_variance(
    mu: torch.Tensor, y: torch.Tensor, y_std: float, s0: float, offsets: np.ndarray = CALIBRATION_OFFSETS
) -> float:
    """The candidate homoscedastic log-variance with the highest MC log-likelihood on ``(mu, y)``.

    Args:
        mu: ``(T, N)`` sampled means in original units.
        y: ``(N,)`` targets in original units.
        y_std: the target's standard deviation; a log-variance ``s`` means variance ``exp(s) * y_std**2``.
        s0: the trained log-variance (standardised units); the candidates are ``s0 + offsets``.
        offsets: the search grid around ``s0``.

    Returns:
        The best candidate ``s0 + offset`` (the first of equal ones).
    """
    candidates = s0 + offsets
    lls = [float(common.mc_gaussian_ll(mu, y, math.exp(c) * y_std**2).mean()) for c in candidates]
    return float(candidates[int(np.argmax(lls))])


def is_eval_epoch(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether the (1-based) ``epoch`` gets a validation check: every ``eval_every`` epochs and the last one."""
    return epoch % eval_every == 0 or epoch == epochs


def should_stop(epoch: int, best_epoch: int, patience: int) -> bool:
    """The early-stopping rule: stop once ``patience`` epochs have passed without a better validation check.

    Args:
        epoch: the (1-based) epoch just checked.
        best_epoch: the epoch of the best check so far.
        patience: epochs without improvement that end the run; 0 never stops early.

    Returns:
        Whether to end the training after ``epoch``.
    """
    return patience > 0 and epoch - best_epoch >= patience


class BestState:
    """The model state of the best validation score offered so far (a strictly better score replaces it).

    Attributes:
        score: the best score (``-inf`` before the first offer).
        state: a deep copy of the model's ``state_dict`` at that score, or None.
        epoch: the epoch of that score (0 before the first offer).
        last_epoch: the last epoch trained (set by :func:`train_keep_best`; below the budget after an early stop).
        declined_at: the epoch of the first check that did not beat the best, where :func:`train_keep_best`
            called its ``on_first_decline`` (0: not called).
    """

    def __init__(self) -> None:
        self.score = -math.inf
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = 0
        self.last_epoch = 0
        self.declined_at = 0

    def offer(self, model: nn.Module, score: float, epoch: int) -> bool:
        """Keep ``model``'s state if ``score`` beats the best so far; ties keep the earlier state.

        Returns:
            Whether the state was kept.
        """
        if not score > self.score:
            return False
        # A copy: state_dict() aliases the live parameters, which training goes on changing.
        self.score, self.state, self.epoch = score, copy.deepcopy(model.state_dict()), epoch
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the kept state into ``model`` (nothing to do if nothing was offered)."""
        if self.state is not None:
            model.load_state_dict(self.state)


def train_keep_best(
    model: nn.Module,
    train: Callable[[Callable[[int], None]], None],
    validate: Callable[[], float],
    epochs: int,
    eval_every: int,
    patience: int = 0,
    on_first_decline: Callable[[], None] | None = None,
) -> BestState:
    """Train with validation checks and end with the state of the best check (the checkpoint rule).

    Args:
        model: the model ``train`` updates; switched back to ``train()`` after each check.
        train: runs the training, calling its argument ``on_epoch(epoch)`` after each epoch (1-based) and
            ending the training when it returns True.
        validate: the validation score of ``model`` as it is now (higher is better).
        epochs: the number of epochs ``train`` runs (the last one is always checked).
        eval_every: check interval in epochs.
        patience: end the training at the first check ``patience`` or more epochs after the best one
            (:func:`should_stop`); 0 trains all ``epochs``.
        on_first_decline: when given, at the first check that does not beat the best, the best state is
            loaded back into ``model`` and this is called (``concrete_freeze`` fixes the rates there); the
            training goes on from that state, and the patience counts from that check or a later best one.
            Its epoch is ``BestState.declined_at``.

    Returns:
        The kept best (score, state, epoch, last_epoch); its state has been loaded into ``model``.
    """
    best = BestState()

    def on_epoch(epoch: int) -> bool:
        best.last_epoch = epoch
        if not is_eval_epoch(epoch, eval_every, epochs):
            return False
        improved = best.offer(model, validate(), epoch)
        if not improved and on_first_decline is not None and best.declined_at == 0 and best.state is not None:
            best.restore(model)
            on_first_decline()
            best.declined_at = epoch
        model.train()
        return should_stop(epoch, max(best.epoch, best.declined_at), patience)

    train(on_epoch)
    best.restore(model)
    return best


# ------------------------------------------------------------------------------------------ cost


@dataclass
class PassCount:
    """Forward passes run so far: training mini-batches and MC evaluation passes (one per MC sample)."""

    train_batches: int = 0
    mc_passes: int = 0

    def since(self, before: "PassCount") -> dict[str, int]:
        """The passes run after the snapshot ``before``, as record fields (with their sum ``forward_passes``)."""
        train, mc = self.train_batches - before.train_batches, self.mc_passes - before.mc_passes
        return dict(train_batches=train, mc_passes=mc, forward_passes=train + mc)


#: The running count; every training batch and MC pass of this module adds to it.
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


# ------------------------------------------------------------------------------------------ training


@dataclass
class Fold:
    """Standardised tensors of one fitting set and one evaluation set, with the target's scale."""

    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor  # original units
    y_mean: float
    y_std: float

    @staticmethod
    def make(ds: UCIDataset, fit_idx: np.ndarray, eval_idx: np.ndarray) -> "Fold":
        _, _, (xf, xe) = standardize(ds.X[fit_idx], ds.X[eval_idx])
        ym, ys, (yf,) = standardize(ds.y[fit_idx])
        return Fold(
            _float32(xf),
            _float32(yf),
            _float32(xe),
            torch.as_tensor(ds.y[eval_idx], dtype=torch.float64),
            float(ym),
            float(ys),
        )


def _float32(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor of a (standardised) numpy array."""
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def protocol_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The protocol's optimizer: Adam, learning rate 1e-3 (fused: the same update, less per-step overhead)."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


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


def _train(model: nn.Module, fold: Fold, epochs: int, seed: int, loss_fn, on_epoch=None) -> None:
    """Adam, batch 128, reshuffled every epoch; ``on_epoch(epoch)`` is called after each epoch and a True
    return ends the training there."""
    common.seed_all(seed)
    g = torch.Generator().manual_seed(seed)
    opt = protocol_optimizer(model)
    model.train()
    for epoch in range(epochs):
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


def _mse_with_regularizer(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """``concrete_tau``'s loss: mean squared error plus the regulariser (preset ``loss="mse"``)."""
    return F.mse_loss(model(xb), yb) + cd_convert.regularization(model)


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
    return [float(v) for v in cd_convert.dropout_rates(model).values()]


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


def _test_set(ds: UCIDataset, fit_idx: np.ndarray, test_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Test inputs standardised with the fitting set's statistics (the model was trained on those), and the
    test targets in original units."""
    x_mean, x_std, _ = standardize(ds.X[fit_idx])
    x_test = torch.as_tensor((ds.X[test_idx] - x_mean) / x_std, dtype=torch.float32)
    return x_test, torch.as_tensor(ds.y[test_idx], dtype=torch.float64)


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
        _continue_on_whole_split(model, ds, fit_idx, train_idx, fold, warm_epochs, seed + 11, loss_fn)
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
    """
    _, _, (_, x_all) = standardize(ds.X[fit_idx], ds.X[train_idx])
    y_all = (ds.y[train_idx] - fold.y_mean) / fold.y_std
    whole = Fold(_float32(x_all), _float32(y_all), fold.x_eval, fold.y_eval, fold.y_mean, fold.y_std)
    _stop_rates_training(model)
    model.log_var.requires_grad_(False)
    try:
        _train(model, whole, epochs, seed, loss_fn)
    finally:
        model.log_var.requires_grad_(True)


#: Epochs ``concrete_freeze_warm`` trains on over the whole training split, as a fraction of its best epoch.
WARM_FRACTION = 0.25
#: MC samples per held-out example in ``concrete_heldout``'s rate step (the mixture of its predictive LL).
HELDOUT_SAMPLES = 16
#: Adam's learning rate for ``concrete_heldout``'s rates and noise level.
HELDOUT_LR = 1e-3

#: The one-run variants of ``concrete``: method -> :func:`run_concrete`'s keyword arguments.
ONE_RUN_VARIANTS = {
    "concrete": {},
    "concrete_freeze": dict(freeze_rates=True),
    "concrete_heldout": dict(heldout_samples=HELDOUT_SAMPLES),
    "concrete_freeze_warm": dict(freeze_rates=True, warm_fraction=WARM_FRACTION),
}
#: The two-run methods: method -> (the one-run variant it refits, whether the refit keeps that run's rates fixed).
REFITS = {
    "concrete_refit": ("concrete", False),
    "concrete_freeze_refit": ("concrete_freeze", True),
}


def _is_p_logit(name: str) -> bool:
    """Whether a parameter name is a concrete-dropout site's p-logit."""
    return name.endswith("p_logit")


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
    weights_opt = torch.optim.Adam(weight_params, lr=1e-3, fused=True)
    rates_opt = torch.optim.Adam(rate_params, lr=HELDOUT_LR, fused=True)
    y_heldout = ((fold.y_eval - fold.y_mean) / fold.y_std).float()
    model.train()
    n, n_heldout = fold.x_fit.shape[0], fold.x_eval.shape[0]
    for epoch in range(epochs):
        for idx in common.batches(n, BATCH_SIZE, g):
            loss = loss_fn(model, fold.x_fit[idx], fold.y_fit[idx])
            # Only the weights' gradients: the rates' share of this loss (the regulariser's) is not used.
            for p, grad in zip(weight_params, torch.autograd.grad(loss, weight_params)):
                p.grad = grad
            weights_opt.step()
            PASSES.train_batches += 1
        for idx in common.batches(n_heldout, BATCH_SIZE, g):
            loss = _heldout_loss(model, fold.x_eval[idx], y_heldout[idx], samples)
            for p, grad in zip(rate_params, torch.autograd.grad(loss, rate_params)):
                p.grad = grad
            rates_opt.step()
            PASSES.train_batches += samples  # a step over ``samples`` copies of the batch
        if on_epoch is not None and on_epoch(epoch + 1):
            return


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


def _first_runs(methods: Sequence[str]) -> dict[str, list[str]]:
    """The one-run variants that ``methods`` need a run of, each with the refits of it asked for (:data:`REFITS`).

    A variant runs when it is asked for itself or when one of its refits is; the refits share its run.
    """
    runs = {}
    for base in ONE_RUN_VARIANTS:
        refits = [m for m, (of, _) in REFITS.items() if of == base and m in methods]
        if base in methods or refits:
            runs[base] = refits
    return runs


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


# ------------------------------------------------------------------------------------------ published


def compare_with_published(records: Sequence[dict], published: dict[str, Sequence[float]]) -> dict | None:
    """Paired comparison of per-split records with the published grid on the same split indices.

    Args:
        records: one method's per-split records (``split``, ``ll``, ``rmse``).
        published: ``{"ll": [...], "rmse": [...]}`` indexed by split (:func:`benchmarks.datasets.load_published`).

    Returns:
        ``{"splits", "ll_diff_mean", "ll_diff_se", "ll_published", "ll_published_se", "rmse_diff_mean",
        "rmse_diff_se", "rmse_published", "rmse_published_se"}``: mean and standard error (``common.mean_se``)
        over the splits of (method - published), and the published mean and standard error over those same
        splits; None when no record has a published counterpart. Splits beyond the published files are left
        out.
    """
    recs = [r for r in records if 0 <= r["split"] < len(published["ll"])]
    if not recs:
        return None
    out: dict = {"splits": [int(r["split"]) for r in recs]}
    for key in ("ll", "rmse"):
        pub = [float(published[key][r["split"]]) for r in recs]
        out[f"{key}_diff_mean"], out[f"{key}_diff_se"] = common.mean_se([r[key] - q for r, q in zip(recs, pub)])
        out[f"{key}_published"], out[f"{key}_published_se"] = common.mean_se(pub)
    return out


# ------------------------------------------------------------------------------------------ driver


def run_dataset(
    ds: UCIDataset,
    splits: int,
    epochs: int,
    samples: int,
    seed: int,
    eval_every: int,
    val_samples: int,
    noise_prior: float = 0.0,
    methods=METHODS,
    bar=None,
    log=None,
    on_split=None,
    calibrate: bool = True,
    first_split: int = 0,
    published: dict[str, list[float]] | None = None,
    patience: int = 0,
    warm_diagnostic: bool = False,
) -> dict:
    """All methods on ``splits`` splits of ``ds`` from ``first_split`` on; returns per-split records and summaries.

    Every run is seeded by its split index, so a range of splits run on its own gives the same numbers as
    the same splits inside a longer run (long protocols can be split across processes and merged). Each
    record carries its cost (``wall_s``, ``train_runs``, ``train_batches``, ``mc_passes``,
    ``forward_passes``). With ``published`` (per-split published grid results) the summary of each method
    gets ``vs_published`` (:func:`compare_with_published`) and the result keeps ``published``. With
    ``warm_diagnostic``, ``concrete_freeze_warm`` also tests its state before the warm epochs (run_concrete's
    ``test_before_warm``; those MC passes are counted in its cost).
    """
    hidden = ds.n_hidden
    records: dict[str, list[dict]] = {m: [] for m in methods}
    val_grid = []  # per split: array (len(p), len(tau)) of validation LL
    for k in range(first_split, first_split + splits):
        train_idx, test_idx = ds.split(k)
        fit_idx, val_idx = validation_split(train_idx)
        val_fold = Fold.make(ds, fit_idx, val_idx)
        full_fold = Fold.make(ds, train_idx, test_idx)
        first_runs: dict[str, dict] = {}  # the one-run variants' records on this split, for the log

        if "grid" in methods:
            t0, passes0 = time.perf_counter(), copy.copy(PASSES)
            grid = np.full((len(ds.dropout_rates), len(ds.tau_values)), -np.inf)
            for i, p in enumerate(ds.dropout_rates):
                for j, tau in enumerate(ds.tau_values):
                    _, grid[i, j] = run_grid_point(
                        val_fold, hidden, p, tau, epochs, samples, common.run_seed(seed, k, 1, i, j)
                    )
                    bar is not None and bar.update(1)
            i, j = select_best(grid)
            p, tau = ds.dropout_rates[i], ds.tau_values[j]
            rmse, ll = run_grid_point(full_fold, hidden, p, tau, epochs, samples, common.run_seed(seed, k, 2))
            bar is not None and bar.update(1)
            val_grid.append(grid)
            records["grid"].append(
                dict(
                    split=k,
                    rmse=rmse,
                    ll=ll,
                    p=p,
                    tau=tau,
                    train_runs=grid.size + 1,
                    **_cost_since(t0, passes0),
                )
            )

        if "grid_calibrated" in methods:
            t0, passes0 = time.perf_counter(), copy.copy(PASSES)
            rec = run_grid_calibrated(
                ds,
                train_idx,
                test_idx,
                hidden,
                epochs,
                samples,
                # The grid's own validation-run seeds: the same networks, only checkpoint and calibration differ.
                lambda i, j: common.run_seed(seed, k, 1, i, j),
                common.run_seed(seed, k, 6),
                eval_every,
                val_samples,
                calibrate,
                bar,
                patience,
            )
            records["grid_calibrated"].append(dict(split=k, **rec, **_cost_since(t0, passes0)))

        # concrete_tau and concrete_tau_stop: one run per tau on the fitting set, the best tau refitted on the
        # whole split; _stop also chooses the epoch count on validation (and refits for that many epochs).
        for method in ("concrete_tau", "concrete_tau_stop"):
            if method not in methods:
                continue
            stop = method == "concrete_tau_stop"
            t0, passes0 = time.perf_counter(), copy.copy(PASSES)
            checks = []
            for j, tau in enumerate(ds.tau_values):
                run = common.run_seed(seed, k, 3, j)
                if stop:
                    check = run_concrete_tau_keep_best(
                        val_fold, hidden, tau, epochs, run, eval_every, val_samples, patience
                    )
                    checks.append(check)
                else:
                    _, ll, rates = run_concrete_tau(val_fold, hidden, tau, epochs, samples, run)
                    checks.append(dict(val_ll=ll, best_epoch=epochs, rates=rates))
                bar is not None and bar.update(1)
            (j,) = select_best([c["val_ll"] for c in checks])
            tau, refit_epochs = ds.tau_values[j], checks[j]["best_epoch"] or epochs  # 0: no finite check
            refit_seed = common.run_seed(seed, k, 4)
            rmse, ll, rates = run_concrete_tau(full_fold, hidden, tau, refit_epochs, samples, refit_seed)
            bar is not None and bar.update(1)
            record = dict(
                split=k,
                rmse=rmse,
                ll=ll,
                tau=tau,
                rates=rates,
                val_ll=checks[j]["val_ll"],
                val_rates=checks[j]["rates"],
            )
            if stop:
                record["best_epoch"] = refit_epochs
            records[method].append(
                dict(
                    **record,
                    train_runs=len(ds.tau_values) + 1,
                    **_cost_since(t0, passes0),
                )
            )

        def concrete_run(**variant) -> dict:
            """``concrete``'s run on split k (its seed for every variant: the same initial network, paired)."""
            return run_concrete(
                ds,
                train_idx,
                test_idx,
                hidden,
                epochs,
                samples,
                common.run_seed(seed, k, 5),
                eval_every,
                val_samples,
                noise_prior,
                calibrate,
                patience,
                **variant,
            )

        # The one-run variants of concrete, each followed by its refit when that is asked for (the two share
        # the first run, and the refit's cost counts it).
        for base, refits in _first_runs(methods).items():
            t0, passes0 = time.perf_counter(), copy.copy(PASSES)
            variant = dict(ONE_RUN_VARIANTS[base])
            if warm_diagnostic and variant.get("warm_fraction"):
                variant["test_before_warm"] = True
            first = concrete_run(**variant, test=base in methods)
            first_runs[base] = first
            bar is not None and bar.update(1)
            if base in methods:
                records[base].append(dict(split=k, **first, train_runs=1, **_cost_since(t0, passes0)))
            for method in refits:
                # No finite validation score (a diverged run) leaves best_epoch 0: refit the epochs it ran.
                refit_epochs = first["best_epoch"] or first["epochs_run"]
                second = refit_concrete(
                    ds,
                    train_idx,
                    test_idx,
                    hidden,
                    refit_epochs,
                    samples,
                    common.run_seed(seed, k, 7),
                    first_tau=first["tau"],
                    noise_offset=first["noise_offset"],
                    noise_prior=noise_prior,
                    fixed_rates=first["rates"] if REFITS[method][1] else None,
                )
                bar is not None and bar.update(1)
                # With the one-run method also asked for, the first run's test evaluation is counted here too
                # (a user of the refit would skip it), so the cost shown is an upper bound; asked for alone, the
                # refit's first run is not tested.
                records[method].append(
                    dict(
                        split=k,
                        **second,
                        refit_epochs=refit_epochs,
                        first_run=first,
                        train_runs=2,
                        **_cost_since(t0, passes0),
                    )
                )
        if log is not None:
            parts = [
                f"{m}: rmse {records[m][-1]['rmse']:.3f} ll {records[m][-1]['ll']:.3f} tau {records[m][-1]['tau']:.3g}"
                for m in methods
            ]
            for base, first in first_runs.items():
                rates = [round(r, 3) for r in first["rates"]]
                parts.append(f"{base} p {rates} best epoch {first['best_epoch']} of {first['epochs_run']}")
            log(f"[{ds.name}] split {k}: " + "; ".join(parts))
        result = {
            "summary": _summarise(records, methods, published),
            "records": records,
            "val_grid": np.mean(val_grid, 0).tolist() if val_grid else None,
            "dropout_rates": ds.dropout_rates,
            "tau_values": ds.tau_values,
            "splits": k + 1 - first_split,
            "first_split": first_split,
        }
        if published is not None:
            result["published"] = published
        if on_split is not None:
            on_split(result)
    return result


def runs_per_split(ds: UCIDataset, methods: Sequence[str]) -> int:
    """Training runs :func:`run_dataset` makes per split for ``methods`` (a refit shares its one-run variant's
    run, :data:`REFITS`): the progress bar's unit."""
    points = len(ds.dropout_rates) * len(ds.tau_values)
    return (
        (points + 1 if "grid" in methods else 0)
        + (points if "grid_calibrated" in methods else 0)
        + (len(ds.tau_values) + 1 if "concrete_tau" in methods else 0)
        + (len(ds.tau_values) + 1 if "concrete_tau_stop" in methods else 0)
        + sum(1 + len(refits) for refits in _first_runs(methods).values())
    )


def _summarise(records: dict, methods, published: dict[str, list[float]] | None = None) -> dict:
    """Mean and standard error of test RMSE and LL per method, summed costs, and the published comparison.

    Args:
        records: per-method lists of per-split records.
        methods: the methods to summarise.
        published: per-split published grid results, or None.

    Returns:
        ``{method: {rmse_mean, rmse_se, ll_mean, ll_se, train_runs, wall_s, forward_passes[, vs_published]}}``;
        ``forward_passes`` is None when a record lacks the count (files written before it was recorded).
    """
    summary = {}
    for m in methods:
        rm, rs = common.mean_se([r["rmse"] for r in records[m]])
        lm, ls = common.mean_se([r["ll"] for r in records[m]])
        summary[m] = dict(
            rmse_mean=rm,
            rmse_se=rs,
            ll_mean=lm,
            ll_se=ls,
            train_runs=int(sum(r["train_runs"] for r in records[m])),
            wall_s=float(sum(r["wall_s"] for r in records[m])),
            forward_passes=(
                int(sum(r["forward_passes"] for r in records[m]))
                if all("forward_passes" in r for r in records[m])
                else None
            ),
        )
        versus = compare_with_published(records[m], published) if published is not None else None
        if versus is not None:
            summary[m]["vs_published"] = versus
    return summary


def _format_passes(records: Sequence[dict]) -> str:
    """Total forward passes as ``total (train + MC)``, or ``-`` for records without the count."""
    if not records or not all("forward_passes" in r for r in records):
        return "-"
    train, mc = (sum(r[k] for r in records) for k in ("train_batches", "mc_passes"))
    return f"{train + mc:,} ({train:,} + {mc:,})"


def _format_versus(v: dict | None, key: str) -> str:
    """``diff +- se (published mean over the same splits)`` of one metric, or ``-``."""
    if v is None:
        return "-"
    return f"{common.pm(v[f'{key}_diff_mean'], v[f'{key}_diff_se'], 3)} (pub. {v[f'{key}_published']:.3f})"


def format_table(name: str, result: dict) -> str:
    """A markdown table of one data set's result: metrics, costs, chosen/learned settings, and, when the
    published per-split results were loaded, the paired differences with the published grid."""
    rows = []
    versus = any("vs_published" in s for s in result["summary"].values())
    pub = PUBLISHED.get(name)
    if pub:
        rows.append(
            ["MC dropout grid (published)", common.pm(pub[0], pub[1]), common.pm(pub[2], pub[3]), "-", "-", "-", "-"]
            + (["-", "-"] if versus else [])
        )
    for m, s in result["summary"].items():
        rec = result["records"][m]
        if "rates" in rec[0]:  # learned rates (the Concrete methods); the grid's records hold its chosen p
            rates = np.mean([r["rates"] for r in rec], 0)
            extra = "p=" + "/".join(f"{r:.3f}" for r in rates) + (f", tau={np.mean([r['tau'] for r in rec]):.3g}")
        else:
            extra = "p=" + f"{np.mean([r['p'] for r in rec]):.3f}" + f", tau={np.mean([r['tau'] for r in rec]):.3g}"
        rows.append(
            [
                m,
                common.pm(s["rmse_mean"], s["rmse_se"], 3),
                common.pm(s["ll_mean"], s["ll_se"], 3),
                s["train_runs"],
                _format_passes(rec),
                f"{s['wall_s']:.1f}",
                extra,
            ]
            + (
                [_format_versus(s.get("vs_published"), "ll"), _format_versus(s.get("vs_published"), "rmse")]
                if versus
                else []
            )
        )
    header = [
        "method",
        "RMSE",
        "test LL",
        "training runs",
        "forward passes (train + MC)",
        "wall-clock s",
        "mean chosen / learned (input/hidden)",
    ] + (["test LL - published, same splits", "RMSE - published, same splits"] if versus else [])
    return f"### {name} ({result['splits']} splits)\n\n" + common.markdown_table(header, rows)


def plot(results: dict, path: str) -> None:
    """Validation LL over the grid (p on x, one line per tau), mean over splits, with the concrete runs marked."""
    names = list(results)
    fig, axes = common.new_figure(1, len(names), figsize=(5.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        if r["val_grid"] is not None:
            grid = np.asarray(r["val_grid"])
            for j, tau in enumerate(r["tau_values"]):
                ax.plot(r["dropout_rates"], grid[:, j], marker="o", label=f"grid, tau={tau:.3g}")
        # (method, record key of its learned rates, marker, size, colour): one point at its mean hidden p
        for method, rates_key, marker, size, color in (
            ("concrete_tau", "val_rates", "*", 200, "k"),
            ("concrete", "rates", "X", 150, "red"),
        ):
            records = r["records"].get(method)
            if records:
                ax.scatter(
                    [np.mean([x[rates_key][-1] for x in records])],
                    [np.mean([x["val_ll"] for x in records])],
                    marker=marker,
                    s=size,
                    color=color,
                    zorder=5,
                    label=f"{method} (hidden p)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("dropout probability p")
        ax.set_ylabel("validation log-likelihood (mean over splits)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


PROTOCOL_EPOCHS_MULTIPLIER = 100  # the published runs: 100 x n_epochs.txt


def _epochs_arg(value: str) -> int | str:
    """``--epochs``: a positive int, or ``"protocol"``."""
    if value == "protocol":
        return value
    try:
        epochs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs or 'protocol', got {value!r}") from None
    if epochs < 1:
        raise argparse.ArgumentTypeError(f"epochs must be at least 1, got {epochs}")
    return epochs


def epochs_for(ds: UCIDataset, epochs: int | str) -> int:
    """The epoch budget of ``ds``: ``epochs``, or for ``"protocol"`` the published 100 x ``n_epochs.txt``."""
    return ds.n_epochs * PROTOCOL_EPOCHS_MULTIPLIER if epochs == "protocol" else int(epochs)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", default=None, help="data folder (default $CD_CONVERT_DATA); none: sklearn diabetes")
    ap.add_argument(
        "--datasets",
        default=None,
        help="comma-separated UCI names (default: every UCI set in the data folder, or the embedded set)",
    )
    ap.add_argument("--splits", type=int, default=5, help="number of splits (protocol: 20)")
    ap.add_argument(
        "--epochs",
        type=_epochs_arg,
        default=400,
        help="epochs per run, or 'protocol': 100 x the data set's n_epochs.txt (4000; protein 2000)",
    )
    ap.add_argument("--samples", type=int, default=1000, help="MC samples T at validation/test (protocol: 10000)")
    ap.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="concrete(_refit), concrete_tau_stop, grid_calibrated: validation check interval in epochs "
        "(default epochs // 40, at least 1)",
    )
    ap.add_argument(
        "--val-samples",
        type=int,
        default=200,
        help="concrete(_refit), concrete_tau_stop, grid_calibrated: MC samples per validation check and calibration",
    )
    ap.add_argument(
        "--patience",
        type=int,
        default=None,
        help="concrete(_refit), concrete_tau_stop, grid_calibrated: end a run this many epochs after its best "
        "validation check (default epochs // 4; 0: never stop early)",
    )
    ap.add_argument("--noise-prior", type=float, default=0.0, help="concrete: weight of a prior on the log-variance")
    ap.add_argument(
        "--calibrate-noise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="concrete, grid_calibrated: re-pick the noise level by validation LL after training (default on)",
    )
    ap.add_argument(
        "--warm-diagnostic",
        action="store_true",
        help="concrete_freeze_warm: also test the state before its warm epochs (concrete_freeze's result on the "
        "same run; its MC passes count in the cost)",
    )
    ap.add_argument("--first-split", type=int, default=0, help="index of the first split to run")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:  # refused before any data is loaded or any run starts
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    common.set_threads(args.threads)
    root = data_root(args.data_dir)
    if root is None:
        datasets = [load_embedded_regression(seed=args.seed)]
        if args.datasets:
            print(
                "note: no data directory; --datasets ignored, using the embedded sklearn diabetes set", file=sys.stderr
            )
    else:
        names = args.datasets.split(",") if args.datasets else uci_datasets_in(root)
        if not names:
            raise SystemExit(f"no UCI data set folders under {root / 'uci'}; pass --datasets or another --data-dir")
        datasets = [load_uci(n, root) for n in names]
    results, out = {}, {}
    for ds in datasets:
        epochs = epochs_for(ds, args.epochs)
        eval_every = args.eval_every or max(1, epochs // 40)
        splits = min(args.splits, ds.n_splits - args.first_split)
        bar = common.progress(
            total=splits * runs_per_split(ds, methods), desc=f"{ds.name} runs", disable=args.no_progress
        )

        def partial(result: dict, name: str = ds.name) -> None:
            # Incremental JSON (summary and details), so an interrupted long run keeps its finished splits;
            # "_splits_done" marks an unfinished data set and is gone from the final file.
            common.write_json(args.json, {**out, name: {**result["summary"], "_splits_done": result["splits"]}})
            common.write_json(str(args.json).removesuffix(".json") + ".details.json", {**results, name: result})

        r = run_dataset(
            ds,
            splits,
            epochs,
            args.samples,
            args.seed,
            eval_every,
            args.val_samples,
            args.noise_prior,
            methods,
            bar,
            log=lambda s: print(s, file=sys.stderr, flush=True),
            on_split=partial if args.json else None,
            calibrate=args.calibrate_noise,
            first_split=args.first_split,
            published=load_published(ds.name, root) if root is not None else None,
            patience=epochs // 4 if args.patience is None else args.patience,
            warm_diagnostic=args.warm_diagnostic,
        )
        bar.close()
        results[ds.name] = r
        out[ds.name] = r["summary"]
        print(format_table(ds.name, r) + "\n", flush=True)
        common.write_json(args.json, out)
        if args.json:  # per-split records, grids and learned rates beside the summary
            common.write_json(str(args.json).removesuffix(".json") + ".details.json", results)
    if args.plot:
        plot(results, args.plot)
    return out


if __name__ == "__main__":
    main()
