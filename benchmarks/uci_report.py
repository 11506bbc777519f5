"""The whole UCI table and its figure, from any number of ``benchmarks.uci`` runs.

Takes the ``*.details.json`` files of runs over any data sets and split ranges (merged as
:mod:`benchmarks.uci_merge` merges them) and prints one markdown table: per data set the published grid and
every method run, with the paired difference from the published grid on the same splits, whether the method
reaches the grid's quality (:func:`reaches_grid`), its cost per split, and, where our grid ran on the same
splits, the grid's wall-clock over the method's (:func:`cost_ratio`). ``--plot`` draws the test-LL and
RMSE differences per data set with their standard errors, one marker per method. ``--base`` adds the
summaries of an earlier report (its ``--json`` output) to the figure and the written summaries, under the
methods run here: a new method joins the published figure without the earlier runs' files.

Usage::

    python -m benchmarks.uci_report results/full/*.details.json --json docs/results/uci_full.json \\
        --plot docs/figures/uci_full.png
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from benchmarks import common
from benchmarks.uci_merge import merge

__all__ = ["reaches_grid", "cost_ratio", "whole_table", "with_base", "plot", "main"]

#: Row order and plot markers of the methods.
METHOD_STYLE = {
    "grid": ("o", "tab:blue"),
    "grid_calibrated": ("s", "tab:cyan"),
    "concrete_tau": ("*", "black"),
    "concrete_tau_stop": ("P", "tab:gray"),
    "concrete": ("X", "tab:red"),
    "concrete_refit": ("D", "tab:orange"),
    "concrete_freeze": ("^", "tab:purple"),
    "concrete_freeze_refit": ("p", "tab:brown"),
    "concrete_freeze_warm": ("h", "tab:pink"),
    "concrete_freeze_warm_decay": ("H", "goldenrod"),
    "concrete_heldout": ("v", "tab:green"),
}
#: The marker and colour of a method missing from :data:`METHOD_STYLE` (it is still reported, after the others).
OTHER_STYLE = ("x", "tab:olive")


def method_order(methods) -> list[str]:
    """``methods`` in :data:`METHOD_STYLE`'s order, any it does not know after them in name order (a method added
    to ``benchmarks.uci`` and not here is reported, not dropped)."""
    present = set(methods)
    return [m for m in METHOD_STYLE if m in present] + sorted(present - set(METHOD_STYLE))


def reaches_grid(versus: dict) -> tuple[bool, bool]:
    """Whether a method reaches the published grid's quality on the same splits.

    The criterion: mean test LL at least the published mean minus one standard error of the published
    values, and mean RMSE at most the published mean plus one standard error (both over the same splits).

    Args:
        versus: a summary's ``vs_published`` (:func:`benchmarks.uci.compare_with_published`).

    Returns:
        ``(ll_ok, rmse_ok)``.
    """
    ll_ok = versus["ll_diff_mean"] >= -versus["ll_published_se"]
    rmse_ok = versus["rmse_diff_mean"] <= versus["rmse_published_se"]
    return bool(ll_ok), bool(rmse_ok)


def _digits(scale: float) -> int:
    """Decimals that show about three significant digits of values of size ``scale`` (at least 3)."""
    return max(3, 2 - math.floor(math.log10(abs(scale)))) if scale and math.isfinite(scale) else 3


def _per_split(records: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in records])) if records and all(key in r for r in records) else float("nan")


def cost_ratio(grid: list[dict], other: list[dict]) -> float | None:
    """The grid's total wall-clock over another method's, on the splits both ran in the same run.

    Only records of one run of ``benchmarks.uci`` (the same ``source`` file, when merged records carry it) are
    paired: methods run together share the machine's load, which is what makes the ratio a side-by-side
    measurement.

    Args:
        grid: the grid's per-split records.
        other: the other method's per-split records.

    Returns:
        ``sum(grid wall_s) / sum(other wall_s)`` over those splits; None when there are none.
    """
    mine = {r["split"]: r for r in other}
    pairs = [
        (r["wall_s"], mine[r["split"]]["wall_s"])
        for r in grid
        if r["split"] in mine and r.get("source") == mine[r["split"]].get("source")
    ]
    if not pairs:
        return None
    return sum(g for g, _ in pairs) / sum(o for _, o in pairs)


def whole_table(merged: dict) -> str:
    """One markdown table over all data sets and methods of ``merged`` (:func:`benchmarks.uci_merge.merge`)."""
    header = [
        "data set",
        "method",
        "splits",
        "RMSE",
        "test LL",
        "LL - published",
        "RMSE - published",
        "reaches grid (LL, RMSE)",
        "training runs / split",
        "forward passes / split",
        "wall-clock s / split",
        "grid's wall-clock / this (same splits, same run)",
    ]
    rows = []
    for name, result in merged.items():
        methods = method_order(result["records"])
        # The published row over the splits of the method that ran the most (each row's differences are
        # paired over that method's own splits).
        compared = [result["summary"][m]["vs_published"] for m in methods if "vs_published" in result["summary"][m]]
        first = max(compared, key=lambda v: len(v["splits"]), default=None)
        grid = result["records"].get("grid")
        rmse_digits = _digits(first["rmse_published"]) if first is not None else 3
        if first is not None:
            rows.append(
                [
                    name,
                    "published grid (same splits)",
                    len(first["splits"]),
                    common.pm(first["rmse_published"], first["rmse_published_se"], rmse_digits),
                    common.pm(first["ll_published"], first["ll_published_se"], 3),
                    *["-"] * 7,
                ]
            )
        for m in methods:
            s, recs = result["summary"][m], result["records"][m]
            v = s.get("vs_published")
            reach = "-" if v is None else " / ".join("yes" if ok else "no" for ok in reaches_grid(v))
            rows.append(
                [
                    name,
                    m,
                    len(recs),
                    common.pm(s["rmse_mean"], s["rmse_se"], rmse_digits),
                    common.pm(s["ll_mean"], s["ll_se"], 3),
                    "-" if v is None else common.pm(v["ll_diff_mean"], v["ll_diff_se"], 3),
                    "-" if v is None else common.pm(v["rmse_diff_mean"], v["rmse_diff_se"], rmse_digits),
                    reach,
                    f"{s['train_runs'] / len(recs):.0f}",
                    f"{_per_split(recs, 'forward_passes'):,.0f}",
                    f"{_per_split(recs, 'wall_s'):.1f}",
                    "-" if grid is None or m == "grid" or (r := cost_ratio(grid, recs)) is None else f"{r:.1f}x",
                ]
            )
    return common.markdown_table(header, rows)


def plot(merged: dict, path: str) -> None:
    """Test-LL and relative RMSE differences from the published grid (same splits) per data set, with the
    standard error of the paired differences; the grey bar is the published grid's own standard error."""
    names = [n for n, r in merged.items() if any("vs_published" in s for s in r["summary"].values())]
    fig, axes = common.new_figure(1, 2, figsize=(max(7.0, 1.6 * len(names) + 3), 4.2), squeeze=False)
    x = np.arange(len(names))
    methods = method_order(m for r in merged.values() for m in r["summary"])
    offsets = np.linspace(-0.25, 0.25, max(len(methods), 2))
    for ax, key, label in (
        (axes[0][0], "ll", "test LL - published grid (nats; symlog beyond 0.1)"),
        (axes[0][1], "rmse", "RMSE - published grid (relative)"),
    ):
        for i, name in enumerate(names):
            v0 = next(s["vs_published"] for s in merged[name]["summary"].values() if "vs_published" in s)
            se = v0[f"{key}_published_se"] / (abs(v0["rmse_published"]) if key == "rmse" else 1.0)
            ax.bar(i, 2 * se, bottom=-se, width=0.7, color="0.85", zorder=1)
        for method, dx in zip(methods, offsets):
            marker, color = METHOD_STYLE.get(method, OTHER_STYLE)
            xs, ys, es = [], [], []
            for i, name in enumerate(names):
                v = merged[name]["summary"].get(method, {}).get("vs_published")
                if v is None:
                    continue
                scale = abs(v["rmse_published"]) if key == "rmse" else 1.0
                xs.append(i + dx)
                ys.append(v[f"{key}_diff_mean"] / scale)
                es.append(v[f"{key}_diff_se"] / scale)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=marker, color=color, label=method, zorder=3, capsize=2)
        if key == "ll":
            # Linear within +-0.1 nats, logarithmic beyond: one set far ahead (naval) keeps the others readable.
            ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0.0, color="0.4", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
    axes[0][0].set_title("higher is better; grey: published grid ± 1 se", fontsize=9)
    axes[0][1].set_title("lower is better", fontsize=9)
    axes[0][0].legend(fontsize=7)
    common.save_figure(fig, path)


def with_base(merged: dict, base: dict) -> dict:
    """Summaries of an earlier report with ``merged``'s laid over them, in the shape :func:`plot` reads.

    Args:
        merged: per data set ``{"summary": {method: summary}, ...}`` (:func:`benchmarks.uci_merge.merge`).
        base: per data set ``{method: summary}``, an earlier report's ``--json`` output.

    Returns:
        Per data set ``{"summary": {method: summary}}``: the earlier data sets first, in their order, then any
        new ones; a method in both takes ``merged``'s summary.
    """
    out = {name: {"summary": dict(summaries)} for name, summaries in base.items()}
    for name, result in merged.items():
        out.setdefault(name, {"summary": {}})["summary"].update(result["summary"])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("details", nargs="+", help="details.json files of benchmarks.uci runs")
    ap.add_argument("--json", default=None, help="write the merged summaries here")
    ap.add_argument("--plot", default=None, help="write the figure here")
    ap.add_argument(
        "--base",
        default=None,
        help="an earlier report's --json output: its summaries join the figure and the written summaries "
        "(the table lists the details given here only)",
    )
    args = ap.parse_args(argv)
    merged = merge(args.details)
    print(whole_table(merged))
    summaries = merged
    if args.base:
        with open(args.base) as f:
            summaries = with_base(merged, json.load(f))
    common.write_json(args.json, {name: r["summary"] for name, r in summaries.items()})
    if args.plot:
        plot(summaries, args.plot)
    return merged


if __name__ == "__main__":
    main()
