"""The printed table of one data set's result and the validation-grid figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import common
from .protocol import PUBLISHED


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
