"""The benchmark's choices as small pure functions, so that each can be tested on inputs with a known answer:
which candidate wins, which noise level calibration picks, when a run is checked and stopped, and the
checkpoint rule that keeps the best-validation state."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import common


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
