"""``python -m benchmarks.uci``: the command line."""

from __future__ import annotations

import argparse
import sys

from cd_convert import cpu_extension

from .. import common
from ..datasets import UCIDataset, data_root, load_embedded_regression, load_published, load_uci, uci_datasets_in
from .driver import ALL_METHODS, METHODS, run_dataset, runs_per_split
from .table import format_table, plot

#: The first line of ``--help``.
DESCRIPTION = "UCI regression benchmark: the MC-dropout grid search against Concrete Dropout."
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
    """The command line's options (``python -m benchmarks.uci --help``)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.uci",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="concrete_freeze_warm(_decay): also test the state before the warm epochs (concrete_freeze's result "
        "on the same run; its MC passes count in the cost)",
    )
    ap.add_argument("--first-split", type=int, default=0, help="index of the first split to run")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--cpu-extension",
        action="store_true",
        help="run the Concrete sites and regulariser on cd_convert's opt-in C++ CPU path (cd_convert.cpu_extension)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark on the data sets asked for, print one table per set and write the JSON and figure.

    Args:
        argv: the command line (``sys.argv[1:]`` when None).

    Returns:
        ``{data set: summary}`` (:func:`benchmarks.uci.driver.run_dataset`'s summaries).
    """
    args = build_parser().parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:  # refused before any data is loaded or any run starts
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    common.set_threads(args.threads)
    if args.cpu_extension:  # built (or loaded from PyTorch's cache) before any run starts
        cpu_extension.enable()
        print("cd_convert.cpu_extension: on (the C++ CPU site and regulariser)", file=sys.stderr)
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
