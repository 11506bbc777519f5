"""The main benchmark job: a quick grid-search vs Concrete Dropout comparison on the embedded data sets.

    python -m benchmarks.main [--out results/] [--seed 0]

1. UCI-style regression on sklearn's diabetes set (:func:`benchmarks.datasets.load_embedded_regression`):
   the MC-dropout grid (4 p x 3 tau, validation-selected, refitted), Concrete Dropout with a tuned tau
   (``concrete_tau``), the tuning-free Concrete Dropout (``concrete``), its refit on the whole training
   split (``concrete_refit``), the run with its rates fixed at the first declining validation check
   refitted with those rates held (``concrete_freeze_refit``), and the same run trained on over the whole
   split from its kept state (``concrete_freeze_warm``, one run), see :mod:`benchmarks.uci`.
2. MNIST-style classification on sklearn's 8x8 digits: an ``nn.Dropout`` grid over p against one Concrete
   run, see :mod:`benchmarks.mnist`.

Needs no data directory and no network; finishes in a few minutes on 2 cores. Prints the markdown tables and
writes ``uci_diabetes.png``, ``digits.png`` and ``main.json`` into ``--out``. Same seed, same numbers.
Settings are scaled down from the papers' (epochs, splits, MC samples): use ``benchmarks.uci`` /
``benchmarks.mnist`` with a data directory for the published protocol.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time


from . import common, mnist, uci
from .datasets import load_embedded_digits, load_embedded_regression


def plot_digits(out: dict, path: pathlib.Path) -> None:
    labels = [f"p={p}" for p in out["grid"]] + ["concrete"]
    rows = list(out["grid"].values()) + [out["concrete"]]
    fig, axes = common.new_figure(1, 3, figsize=(12, 3.6))
    for ax, key in zip(axes, ("accuracy", "nll", "ece")):
        ax.bar(range(len(rows)), [r[key] for r in rows],
               color=["tab:blue"] * len(out["grid"]) + ["tab:red"])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, fontsize=8)
        ax.set_title(key)
        if key == "accuracy":
            lo = min(r[key] for r in rows)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=200, help="regression epochs per run")
    ap.add_argument("--samples", type=int, default=500, help="regression MC samples")
    ap.add_argument("--digits-epochs", type=int, default=30)
    ap.add_argument("--digits-samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    ds = load_embedded_regression(seed=args.seed)
    methods = (*uci.METHODS, "concrete_refit", "concrete_freeze_refit", "concrete_freeze_warm")
    bar = common.progress(total=args.splits * uci.runs_per_split(ds, methods), desc="regression runs",
                          disable=args.no_progress)
    # The benchmark's defaults: a check every epochs // 40 with 200 MC passes, early stop after epochs // 4.
    reg = uci.run_dataset(ds, args.splits, args.epochs, args.samples, args.seed, max(1, args.epochs // 40),
                          200, methods=methods, bar=bar, patience=args.epochs // 4)
    bar.close()
    print(uci.format_table(ds.name, reg) + "\n", flush=True)
    uci.plot({ds.name: reg}, out_dir / "uci_diabetes.png")

    digits = load_embedded_digits(split_seed=args.seed)
    cls = mnist.run_comparison(digits, "mlp", args.digits_epochs, args.digits_samples, args.seed, 1e-2,
                               progress=not args.no_progress)
    print(mnist.format_table(cls, f"mlp on sklearn digits 8x8, {args.digits_epochs} epochs, "
                                  f"T={args.digits_samples}") + "\n", flush=True)
    plot_digits(cls, out_dir / "digits.png")

    result = {"regression": {ds.name: reg["summary"]}, "classification": cls,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    common.write_json(out_dir / "main.json", result)
    print(f"wrote {out_dir / 'uci_diabetes.png'}, {out_dir / 'digits.png'}, {out_dir / 'main.json'} "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
