"""The protocol's fixed parts: its networks, its metrics, the published table and the standardised folds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..datasets import UCIDataset, standardize

LENGTH_SCALE = 1e-2

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
        """The fold of ``ds``'s rows ``fit_idx`` (fitting) and ``eval_idx`` (evaluation), inputs standardised with
        the fitting rows' statistics and the fitting targets too; the evaluation targets stay in original units.

        Args:
            ds: the data set.
            fit_idx: rows to fit on.
            eval_idx: rows to evaluate on.

        Returns:
            The fold.
        """
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


def _test_set(ds: UCIDataset, fit_idx: np.ndarray, test_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Test inputs standardised with the fitting set's statistics (the model was trained on those), and the
    test targets in original units."""
    x_mean, x_std, _ = standardize(ds.X[fit_idx])
    x_test = torch.as_tensor((ds.X[test_idx] - x_mean) / x_std, dtype=torch.float32)
    return x_test, torch.as_tensor(ds.y[test_idx], dtype=torch.float64)
