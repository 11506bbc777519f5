"""One data set's run: every method asked for on each split, with its cost, summarised and compared with the
published grid on the same splits."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import common
from ..datasets import UCIDataset, validation_split
from .concrete import ONE_RUN_VARIANTS, REFITS, refit_concrete, run_concrete
from .concrete_tau import run_concrete_tau, run_concrete_tau_keep_best
from .decisions import select_best
from .grid import run_grid_calibrated, run_grid_point
from .protocol import Fold
from .training import PASSES, _cost_since

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
    "concrete_freeze_warm_decay",
)


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


@dataclass
class SplitRun:
    """One split of one data set and the protocol's settings: what every method's run on it needs.

    Attributes:
        ds: the data set.
        k: the split index (every run is seeded by it).
        train_idx, test_idx: the split.
        val_fold: the fitting set (first 80% of ``train_idx``) with the validation set as its evaluation set.
        full_fold: the whole training split with the test set.
        epochs, samples, seed, eval_every, val_samples, noise_prior, calibrate, patience, warm_diagnostic:
            as in :func:`run_dataset`.
        bar: optional progress bar, advanced by one per training run.
    """

    ds: UCIDataset
    k: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    val_fold: Fold
    full_fold: Fold
    epochs: int
    samples: int
    seed: int
    eval_every: int
    val_samples: int
    noise_prior: float
    calibrate: bool
    patience: int
    warm_diagnostic: bool
    bar: Any = None

    def run_seed(self, *path: int) -> int:
        """The seed of one run on this split (:func:`benchmarks.common.run_seed`)."""
        return common.run_seed(self.seed, self.k, *path)

    def ran(self) -> None:
        """One training run is done (the progress bar's unit)."""
        if self.bar is not None:
            self.bar.update(1)


def _costed(make_record: Callable[[], dict]) -> dict:
    """``make_record()`` followed by its cost since the call: wall-clock and forward passes (:func:`_cost_since`)."""
    t0, passes0 = time.perf_counter(), copy.copy(PASSES)
    record = make_record()
    return {**record, **_cost_since(t0, passes0)}


def _grid(run: SplitRun, val_grids: list[np.ndarray]) -> dict:
    """``grid``: the 12 points on the fitting set, the best (p, tau) by validation LL refitted on the whole split.

    Args:
        run: the split.
        val_grids: gets the validation LL of every point, ``(len(p), len(tau))``, appended.

    Returns:
        The record (cost not included).
    """
    ds = run.ds
    grid = np.full((len(ds.dropout_rates), len(ds.tau_values)), -np.inf)
    for i, p in enumerate(ds.dropout_rates):
        for j, tau in enumerate(ds.tau_values):
            _, grid[i, j] = run_grid_point(
                run.val_fold, ds.n_hidden, p, tau, run.epochs, run.samples, run.run_seed(1, i, j)
            )
            run.ran()
    i, j = select_best(grid)
    p, tau = ds.dropout_rates[i], ds.tau_values[j]
    rmse, ll = run_grid_point(run.full_fold, ds.n_hidden, p, tau, run.epochs, run.samples, run.run_seed(2))
    run.ran()
    val_grids.append(grid)
    return dict(split=run.k, rmse=rmse, ll=ll, p=p, tau=tau, train_runs=grid.size + 1)


def _grid_calibrated(run: SplitRun) -> dict:
    """``grid_calibrated``: the grid under concrete's checkpoint rule and noise calibration (cost not included)."""
    record = run_grid_calibrated(
        run.ds,
        run.train_idx,
        run.test_idx,
        run.ds.n_hidden,
        run.epochs,
        run.samples,
        # The grid's own validation-run seeds: the same networks, only checkpoint and calibration differ.
        lambda i, j: run.run_seed(1, i, j),
        run.run_seed(6),
        run.eval_every,
        run.val_samples,
        run.calibrate,
        run.bar,
        run.patience,
    )
    return dict(split=run.k, **record)


def _concrete_tau(run: SplitRun, stop: bool) -> dict:
    """``concrete_tau`` (``stop`` False) and ``concrete_tau_stop``: one run per tau on the fitting set, the best tau
    refitted on the whole split; with ``stop`` the epoch count is chosen on validation too and the refit trains
    for that many epochs (cost not included)."""
    ds = run.ds
    checks = []
    for j, tau in enumerate(ds.tau_values):
        seed = run.run_seed(3, j)
        if stop:
            check = run_concrete_tau_keep_best(
                run.val_fold, ds.n_hidden, tau, run.epochs, seed, run.eval_every, run.val_samples, run.patience
            )
            checks.append(check)
        else:
            _, ll, rates = run_concrete_tau(run.val_fold, ds.n_hidden, tau, run.epochs, run.samples, seed)
            checks.append(dict(val_ll=ll, best_epoch=run.epochs, rates=rates))
        run.ran()
    (j,) = select_best([c["val_ll"] for c in checks])
    tau, refit_epochs = ds.tau_values[j], checks[j]["best_epoch"] or run.epochs  # 0: no finite check
    rmse, ll, rates = run_concrete_tau(run.full_fold, ds.n_hidden, tau, refit_epochs, run.samples, run.run_seed(4))
    run.ran()
    record = dict(
        split=run.k,
        rmse=rmse,
        ll=ll,
        tau=tau,
        rates=rates,
        val_ll=checks[j]["val_ll"],
        val_rates=checks[j]["rates"],
    )
    if stop:
        record["best_epoch"] = refit_epochs
    return dict(**record, train_runs=len(ds.tau_values) + 1)


def _one_run_and_refits(run: SplitRun, base: str, refits: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """A one-run variant of ``concrete`` (:data:`ONE_RUN_VARIANTS`) and the refits of it asked for (:data:`REFITS`).

    The refits share the first run, and their cost counts it. With the one-run method also asked for, the first
    run's test evaluation is counted in the refits' cost too (a user of a refit would skip it), so the cost shown
    is an upper bound; asked for alone, a refit's first run is not tested.

    Returns:
        ``{method: record}`` (costs included) for ``base`` when it is in ``methods`` and for each refit; the first
        run's record is under ``"_first"`` for the log.
    """
    t0, passes0 = time.perf_counter(), copy.copy(PASSES)
    variant = dict(ONE_RUN_VARIANTS[base])
    if run.warm_diagnostic and variant.get("warm_fraction"):
        variant["test_before_warm"] = True
    first = run_concrete(
        run.ds,
        run.train_idx,
        run.test_idx,
        run.ds.n_hidden,
        run.epochs,
        run.samples,
        run.run_seed(5),  # concrete's seed for every variant: the same initial network, paired
        run.eval_every,
        run.val_samples,
        run.noise_prior,
        run.calibrate,
        run.patience,
        **variant,
        test=base in methods,
    )
    run.ran()
    out = {"_first": first}
    if base in methods:
        out[base] = dict(split=run.k, **first, train_runs=1, **_cost_since(t0, passes0))
    for method in refits:
        # No finite validation score (a diverged run) leaves best_epoch 0: refit the epochs it ran.
        refit_epochs = first["best_epoch"] or first["epochs_run"]
        second = refit_concrete(
            run.ds,
            run.train_idx,
            run.test_idx,
            run.ds.n_hidden,
            refit_epochs,
            run.samples,
            run.run_seed(7),
            first_tau=first["tau"],
            noise_offset=first["noise_offset"],
            noise_prior=run.noise_prior,
            fixed_rates=first["rates"] if REFITS[method][1] else None,
        )
        run.ran()
        out[method] = dict(
            split=run.k,
            **second,
            refit_epochs=refit_epochs,
            first_run=first,
            train_runs=2,
            **_cost_since(t0, passes0),
        )
    return out


def _log_line(name: str, k: int, records: dict, methods: Sequence[str], first_runs: dict[str, dict]) -> str:
    """One split's line of the progress log: each method's test result and each one-run variant's rates."""
    parts = [
        f"{m}: rmse {records[m][-1]['rmse']:.3f} ll {records[m][-1]['ll']:.3f} tau {records[m][-1]['tau']:.3g}"
        for m in methods
    ]
    for base, first in first_runs.items():
        rates = [round(r, 3) for r in first["rates"]]
        parts.append(f"{base} p {rates} best epoch {first['best_epoch']} of {first['epochs_run']}")
    return f"[{name}] split {k}: " + "; ".join(parts)


def run_dataset(
    ds: UCIDataset,
    splits: int,
    epochs: int,
    samples: int,
    seed: int,
    eval_every: int,
    val_samples: int,
    noise_prior: float = 0.0,
    methods: Sequence[str] = METHODS,
    bar: Any = None,
    log: Callable[[str], None] | None = None,
    on_split: Callable[[dict], None] | None = None,
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
    ``forward_passes``).

    Args:
        ds: the data set.
        splits: how many splits to run.
        epochs: the epoch budget of every run.
        samples: MC passes at test.
        seed: the base seed (each run's seed derives from it and the split).
        eval_every: validation check interval in epochs.
        val_samples: MC passes per validation check and calibration.
        noise_prior: weight of the prior on the Concrete runs' log-variance (0: none).
        methods: from :data:`ALL_METHODS`.
        bar: optional progress bar, advanced by one per training run.
        log: called with one line per split.
        on_split: called with the result so far after each split.
        calibrate: re-pick the noise level on validation after training (``concrete`` and ``grid_calibrated``).
        first_split: the first split's index.
        published: per-split published grid results; each method's summary then gets ``vs_published``
            (:func:`compare_with_published`) and the result keeps ``published``.
        patience: early stop of the runs under the checkpoint rule (0: never).
        warm_diagnostic: ``concrete_freeze_warm`` also tests its state before the warm epochs (run_concrete's
            ``test_before_warm``; those MC passes are counted in its cost).

    Returns:
        ``{"summary", "records", "val_grid", "dropout_rates", "tau_values", "splits", "first_split"[,
        "published"]}``.
    """
    records: dict[str, list[dict]] = {m: [] for m in methods}
    val_grid = []  # per split: array (len(p), len(tau)) of validation LL
    for k in range(first_split, first_split + splits):
        train_idx, test_idx = ds.split(k)
        fit_idx, val_idx = validation_split(train_idx)
        run = SplitRun(
            ds,
            k,
            train_idx,
            test_idx,
            Fold.make(ds, fit_idx, val_idx),
            Fold.make(ds, train_idx, test_idx),
            epochs,
            samples,
            seed,
            eval_every,
            val_samples,
            noise_prior,
            calibrate,
            patience,
            warm_diagnostic,
            bar,
        )
        if "grid" in methods:
            records["grid"].append(_costed(lambda: _grid(run, val_grid)))
        if "grid_calibrated" in methods:
            records["grid_calibrated"].append(_costed(lambda: _grid_calibrated(run)))
        for method in ("concrete_tau", "concrete_tau_stop"):
            if method in methods:
                records[method].append(_costed(lambda: _concrete_tau(run, stop=method == "concrete_tau_stop")))
        first_runs: dict[str, dict] = {}  # the one-run variants' records on this split, for the log
        for base, refits in _first_runs(methods).items():
            out = _one_run_and_refits(run, base, refits, methods)
            first_runs[base] = out.pop("_first")
            for method, record in out.items():
                records[method].append(record)
        if log is not None:
            log(_log_line(ds.name, k, records, methods, first_runs))
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
