"""Figures for MC-dropout uncertainty: reliability diagram, learned rates over training, uncertainty under
a distribution shift (the rotated-digit figure), and :func:`rotated` to make that shift.

matplotlib is imported only inside the plotting functions (it is an optional dependency, installed by
``pip install cd_convert[bench]``). Figures are built with ``matplotlib.figure.Figure`` directly, never
through ``pyplot``: no backend is selected or changed, nothing is registered with pyplot's figure
manager (no leaked open figures in a loop), and the functions work on headless machines.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import ece, reliability_bins

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

__all__ = ["reliability_diagram", "rates_over_training", "uncertainty_vs_shift", "rotated"]

PathLike = Union[str, "os.PathLike[str]"]


def _new_figure(**kwargs: Any) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "cd_convert.plots needs matplotlib; install it with `pip install cd_convert[bench]` "
            "(or `pip install matplotlib`)."
        ) from err
    return Figure(**kwargs)


def _finish(fig: "Figure", path: Optional[PathLike]) -> "Figure":
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def _to_list(values: Any) -> List[float]:
    if isinstance(values, Tensor):
        return values.detach().cpu().double().tolist()
    return [float(v) for v in values]


def reliability_diagram(probs: Tensor, target: Tensor, n_bins: int = 15, path: Optional[PathLike] = None) -> "Figure":
    """Reliability diagram: accuracy against confidence per bin, with the ECE in the title.

    The bins are those of :func:`cd_convert.metrics.reliability_bins` (equal width over [0, 1]); empty
    bins are not drawn. A lower panel shows how many examples fall in each bin.

    Args:
        probs: ``(N, C)`` predictive probabilities (e.g. ``mc_predict(...).probs``).
        target: ``(N,)`` integer class indices.
        n_bins: number of confidence bins.
        path: optional file to save the figure to (format from the suffix, e.g. ``.png``).

    Returns:
        The matplotlib Figure.
    """
    bins = reliability_bins(probs, target, n_bins=n_bins)
    calibration_error = ece(probs, target, n_bins=n_bins)
    edges = _to_list(bins["edges"])
    lefts, width = edges[:-1], 1.0 / n_bins
    accuracy = _to_list(bins["accuracy"])
    confidence = _to_list(bins["confidence"])
    count = [int(c) for c in bins["count"].tolist()]
    filled = [i for i, c in enumerate(count) if c > 0]

    fig = _new_figure(figsize=(4.5, 5.5))
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0])
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.bar(
        [lefts[i] for i in filled],
        [accuracy[i] for i in filled],
        width=width,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    # The gap bars go from the accuracy to the mean confidence of the bin: red is over-confidence.
    ax.bar(
        [lefts[i] for i in filled],
        [confidence[i] - accuracy[i] for i in filled],
        bottom=[accuracy[i] for i in filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE = {100 * calibration_error:.2f}%)")
    ax.legend(loc="upper left", fontsize="small")

    ax_count = fig.add_subplot(grid[1], sharex=ax)
    ax_count.bar(lefts, count, width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    return _finish(fig, path)


def _history_series(history: Any) -> "tuple[List[float], Dict[str, List[float]]]":
    """``(epochs, {site: rates})`` from a RateLogger, its ``history`` records or a ``{site: rates}`` table."""
    records = getattr(history, "history", history)
    if isinstance(records, Mapping):
        table = {str(name): _to_list(values) for name, values in records.items()}
        length = max((len(v) for v in table.values()), default=0)
        return list(range(length)), table
    records = list(records)
    if not all(isinstance(r, Mapping) and "rates" in r for r in records):
        raise TypeError(
            "history must be a RateLogger, its .history (records with a 'rates' dict) or a {site: [p, ...]} "
            "table from RateLogger.as_table()."
        )
    epochs = [float(r.get("epoch", i)) for i, r in enumerate(records)]
    names: Dict[str, None] = {}
    for record in records:
        for name in record["rates"]:
            names.setdefault(name, None)
    table = {name: [float(r["rates"].get(name, math.nan)) for r in records] for name in names}
    return epochs, table


def rates_over_training(history: Any, path: Optional[PathLike] = None) -> "Figure":
    """The learned dropout rate of every site over training, one line per site.

    Args:
        history: a :class:`cd_convert.history.RateLogger`, its ``.history`` list, or the
            ``{site: [p, ...]}`` table of ``RateLogger.as_table()`` (then the x-axis is the record index).
        path: optional file to save the figure to.

    Returns:
        The matplotlib Figure.
    """
    epochs, table = _history_series(history)
    if not table:
        raise ValueError("the history holds no dropout rates (no records, or a model without sites).")
    fig = _new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, rates in table.items():
        ax.plot(
            epochs[: len(rates)], rates, marker="o" if len(rates) < 30 else None, markersize=3, label=name or "<model>"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("dropout rate p")
    ax.set_ylim(bottom=0)
    ax.set_title("Learned dropout rates")
    # Many sites (a converted ViT has dozens) would bury the plot under its legend: put it outside.
    if len(table) <= 12:
        ax.legend(fontsize="small")
    else:
        ax.legend(fontsize="x-small", ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _finish(fig, path)


def uncertainty_vs_shift(
    shifts: Sequence[float],
    values: Mapping[str, Any],
    xlabel: str = "rotation (degrees)",
    ylabel: str = "",
    title: str = "",
    path: Optional[PathLike] = None,
) -> "Figure":
    """Uncertainty (or class probabilities) against the size of a shift, e.g. a rotated digit.

    Each entry of ``values`` is one curve. A 1-D sequence of ``len(shifts)`` values is drawn as a line;
    a 2-D ``(len(shifts), T)`` array (e.g. a class probability in each of T MC passes) is drawn as a
    cloud of its T points per shift with its mean as a line, as in the MC-dropout rotated-digit figure.

    Args:
        shifts: the x-values (rotation angles, noise levels, ...).
        values: ``{label: values}``, e.g. ``{"entropy": ..., "mutual information": ...}`` or
            ``{"p(class 1)": ..., "p(class 7)": ...}``.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
        path: optional file to save the figure to.

    Returns:
        The matplotlib Figure.
    """
    xs = _to_list(shifts)
    if not values:
        raise ValueError("values is empty: pass {label: sequence of len(shifts)}.")
    fig = _new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for index, (label, series) in enumerate(values.items()):
        data = (
            series.detach().cpu().double()
            if isinstance(series, Tensor)
            else torch.as_tensor(series, dtype=torch.float64)
        )
        if data.shape[0] != len(xs) or data.dim() not in (1, 2):
            raise ValueError(
                f"values[{label!r}] must have shape ({len(xs)},) or ({len(xs)}, T) to match shifts, got "
                f"{tuple(data.shape)}."
            )
        color = f"C{index % 10}"
        if data.dim() == 2:
            cloud_x = [x for x in xs for _ in range(data.shape[1])]
            ax.scatter(cloud_x, data.reshape(-1).tolist(), s=4, alpha=0.15, color=color, linewidths=0)
            data = data.mean(dim=1)
        ax.plot(xs, data.tolist(), color=color, marker="o", markersize=3, label=str(label))
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return _finish(fig, path)


def rotated(x: Tensor, degrees: Union[float, Sequence[float], Tensor]) -> Tensor:
    """Rotate images counter-clockwise about their centre (bilinear, zeros outside), without torchvision.

    ``rotated(x, 90)`` equals ``torch.rot90(x, 1, dims=(-2, -1))`` for a square image, up to round-off.

    Args:
        x: ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` floating-point images.
        degrees: one angle for all images, or one per image (length B).

    Returns:
        A new tensor of ``x``'s shape, dtype and device.
    """
    if not x.is_floating_point():
        raise TypeError(f"rotated needs floating-point images, got {x.dtype}; convert with x.float() first.")
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"rotated expects (B, C, H, W), (C, H, W) or (H, W) images, got {tuple(x.shape)}.")
    original_shape = x.shape
    images = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    batch, _, height, width = images.shape
    angle = torch.as_tensor(degrees, dtype=torch.float64).flatten()
    if angle.numel() == 1:
        angle = angle.expand(batch)
    elif angle.numel() != batch:
        raise ValueError(f"degrees must be one angle or one per image ({batch}), got {angle.numel()}.")
    radians = angle * (math.pi / 180.0)
    cos, sin = radians.cos(), radians.sin()
    # affine_grid maps each output position to the input position it samples, in coordinates normalised
    # to [-1, 1] per axis; the aspect factors make the rotation rigid in pixels for non-square images.
    # With y pointing down, a visually counter-clockwise turn samples the input at (x', y') =
    # (cos x - sin y, sin x + cos y) for the output pixel (x, y).
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (height / width)
    theta[:, 1, 0] = sin * (width / height)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(device=x.device, dtype=_grid_dtype(x.dtype)), list(images.shape), align_corners=False)
    out = F.grid_sample(images.to(grid.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype).reshape(original_shape)


def _grid_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision grids put samples visibly off the pixel centres; sample in fp32 and cast back.
    return torch.promote_types(dtype, torch.float32)
