"""Regulariser constants from the data-set size, the prior length-scale and the loss the user minimises.

Per site the regulariser is ``wr * ||W||^2 / (1 - p) + dr * K * (p log p + (1 - p) log(1 - p))``
(Gal, Hron & Kendall 2017, eq. 3 with inverted-dropout scaling). ``wr`` and ``dr`` must carry the same
factor that turns the per-example mean NLL into the loss actually minimised:

=================  =================  ===============
loss preset        wr                 dr
=================  =================  ===============
``"nll"``          l^2 / (2 N)        1 / N
``"mse"``          l^2 / (tau N)      2 / (tau N)
``"heteroscedastic"``  l^2 / N        2 / N
=================  =================  ===============

``"nll"``: cross-entropy or a Gaussian NLL (per-example mean). ``"mse"``: mean squared error with a fixed
model precision ``tau`` *in the units of the loss* (standardised targets: ``tau * std(y)**2``).
``"heteroscedastic"``: the authors' ``exp(-s) (y - mu)^2 + s``, i.e. twice the Gaussian NLL
(:func:`cd_convert.losses.heteroscedastic_gaussian`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["DEFAULT_LENGTH_SCALE", "LOSS_PRESETS", "RegularizerScale", "resolve_scale", "validate_dataset_size"]

LOSS_PRESETS = ("nll", "mse", "heteroscedastic")
DEFAULT_LENGTH_SCALE = 1e-2


@dataclass(frozen=True)
class RegularizerScale:
    """The two constants of the regulariser and where they came from.

    Attributes:
        weight_regularizer: ``wr``, multiplies ``||W||^2 / (1 - p)``.
        dropout_regularizer: ``dr``, multiplies ``K * (p log p + (1 - p) log(1 - p))``.
        description: how they were derived (for reports).
    """

    weight_regularizer: float
    dropout_regularizer: float
    description: str


def _positive_finite(name: str, value: Optional[float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def _non_negative_finite(name: str, value: Optional[float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def validate_dataset_size(dataset_size: int) -> int:
    """Check a training-set size.

    Args:
        dataset_size: number of training examples N.

    Returns:
        N as an int.
    """
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int):
        if isinstance(dataset_size, float) and dataset_size.is_integer():
            dataset_size = int(dataset_size)
        else:
            raise TypeError(
                f"dataset_size must be a positive int (the number of training examples), got {dataset_size!r}."
            )
    if dataset_size <= 0:
        raise ValueError(
            f"dataset_size must be a positive number of training examples, got {dataset_size}. Pass len(train_dataset)."
        )
    return dataset_size


def resolve_scale(
    *,
    dataset_size: Optional[int] = None,
    length_scale: float = DEFAULT_LENGTH_SCALE,
    loss: str = "nll",
    tau: Optional[float] = None,
    weight_regularizer: Optional[float] = None,
    dropout_regularizer: Optional[float] = None,
) -> Optional[RegularizerScale]:
    """Turn the user's description of the training set and loss into ``(wr, dr)``.

    Args:
        dataset_size: training-set size N; with ``length_scale`` and ``loss`` it fixes wr and dr.
        length_scale: prior length-scale l (default 1e-2, the paper's UCI value).
        loss: ``"nll"``, ``"mse"`` (needs ``tau``) or ``"heteroscedastic"``; see the module docstring.
        tau: model precision for ``loss="mse"``, in the units of the loss.
        weight_regularizer: explicit wr (with ``dropout_regularizer``, instead of ``dataset_size``).
        dropout_regularizer: explicit dr.

    Returns:
        The scale, or None when neither ``dataset_size`` nor explicit constants were given.
    """
    explicit = (weight_regularizer, dropout_regularizer)
    if any(v is not None for v in explicit):
        if dataset_size is not None:
            raise ValueError(
                "pass either dataset_size= (with length_scale= and loss=) or explicit weight_regularizer= and "
                "dropout_regularizer=, not both."
            )
        if None in explicit:
            raise ValueError("weight_regularizer= and dropout_regularizer= must be given together.")
        wr = _non_negative_finite("weight_regularizer", weight_regularizer)
        dr = _non_negative_finite("dropout_regularizer", dropout_regularizer)
        return RegularizerScale(wr, dr, f"explicit wr={wr:.3g}, dr={dr:.3g}")
    if loss not in LOSS_PRESETS:
        raise ValueError(f"loss must be one of {LOSS_PRESETS}, got {loss!r}.")
    if tau is not None and loss != "mse":
        raise ValueError(f"tau= is only used with loss='mse', got loss={loss!r}.")
    if loss == "mse" and tau is None:
        raise ValueError("loss='mse' needs tau= (the model precision in the units of the loss).")
    if dataset_size is None:
        return None
    n = validate_dataset_size(dataset_size)
    l2 = _positive_finite("length_scale", length_scale) ** 2
    if loss == "nll":
        wr, dr = l2 / (2 * n), 1.0 / n
    elif loss == "heteroscedastic":
        wr, dr = l2 / n, 2.0 / n
    else:
        t = _positive_finite("tau", tau)
        wr, dr = l2 / (t * n), 2.0 / (t * n)
    extra = f", tau={tau:.4g}" if loss == "mse" else ""
    return RegularizerScale(wr, dr, f"{loss} preset: N={n}, l={length_scale:.3g}{extra}")
