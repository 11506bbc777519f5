"""Merge UCI benchmark runs made over separate split ranges (``--first-split``) into one result.

Every run of ``benchmarks.uci`` is seeded by its split index, so splits run in separate processes give the
numbers a single run would. Given the ``*.details.json`` files of those runs, this prints the combined
table per data set and writes the combined summary JSON (same format as ``benchmarks.uci --json``).

Usage::

    python -m benchmarks.uci_merge results/uci_full_yacht.details.json results/uci_full_yacht_s19.details.json \\
        --json results/uci_yacht_merged.json

Each merged record gets ``source``, the file it came from. A method present in a later file replaces the
same split's record from an earlier file; ``--methods`` picks
which methods to keep from each file as ``file:method,method`` (default: all). When a file carries the
published per-split results (``"published"``, written by runs with the published files present), the merged
summary compares every method with them on the merged splits.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks import common
from benchmarks.uci.driver import _summarise
from benchmarks.uci.table import format_table


def merge(paths: list[str], only: dict[str, set[str]] | None = None) -> dict:
    """Combine per-split records of several ``details.json`` files.

    Args:
        paths: the files, in order (later records of the same split and method win).
        only: optional ``{path: {methods}}`` restricting what is taken from a file.

    Returns:
        ``{dataset: {"summary", "records", "splits", "val_grid", "dropout_rates", "tau_values"[, "published"]}}``.
    """
    merged: dict[str, dict] = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        for name, result in data.items():
            target = merged.setdefault(name, {"records": {}, "val_grids": []})
            for key in ("dropout_rates", "tau_values"):
                target[key] = result.get(key)
            if result.get("published") is not None:
                target["published"] = result["published"]
            if result.get("val_grid") is not None:
                target["val_grids"].append((result["splits"], np.asarray(result["val_grid"])))
            for method, records in result["records"].items():
                if only and path in only and method not in only[path]:
                    continue
                by_split = target["records"].setdefault(method, {})
                for record in records:
                    # The file it came from: wall-clock is only comparable between records of one run.
                    by_split[record["split"]] = {**record, "source": path}
    out = {}
    for name, target in merged.items():
        records = {m: [r[k] for k in sorted(r)] for m, r in target["records"].items()}
        weights = sum(w for w, _ in target["val_grids"])
        val_grid = sum(w * g for w, g in target["val_grids"]) / weights if target["val_grids"] else None
        out[name] = {
            "summary": _summarise(records, list(records), target.get("published")),
            "records": records,
            "splits": max(len(r) for r in records.values()),
            "val_grid": None if val_grid is None else val_grid.tolist(),
            "dropout_rates": target["dropout_rates"],
            "tau_values": target["tau_values"],
        }
        if target.get("published") is not None:
            out[name]["published"] = target["published"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("details", nargs="+", help="details.json files of benchmarks.uci runs, in order")
    ap.add_argument("--methods", action="append", default=[], help="file:method,method (repeatable)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    only = {}
    for spec in args.methods:
        path, _, methods = spec.rpartition(":")
        only[path] = set(methods.split(","))
    result = merge(args.details, only)
    for name, r in result.items():
        print(format_table(name, r) + "\n")
        splits = {m: sorted(x["split"] for x in recs) for m, recs in r["records"].items()}
        print(f"splits per method: { {m: len(s) for m, s in splits.items()} }\n")
    common.write_json(args.json, {name: r["summary"] for name, r in result.items()})
    return result


if __name__ == "__main__":
    main()
