"""Two revisions' CPU training cost side by side in one process: is a change faster, and by how much?

Separate benchmark runs on a shared machine differ by 10-20% in absolute time, which hides the few-percent
changes that per-call work on small networks comes down to. This tool exports another revision's
``cd_convert`` package (``git archive``) into a temporary folder, imports it under another name next to the
working tree's, and times both with the same functions of ``benchmarks/train_step.py``, interleaved (the
order rotating every repeat):

1. one site's forward + backward (``ConcreteDropout(0.1)`` of each revision, ``nn.Dropout(0.1)`` for scale)
   at ``--shape``;
2. one epoch of the paper's UCI network (``benchmarks/train_step.py``, section 1) converted by each
   revision and trained on its loss plus that revision's ``regularization``, and the ``nn.Dropout`` network;
3. one epoch of the UCI protocol's own training loop (``benchmarks/train_step.py``, section 1b: the step
   ``benchmarks.uci`` trains, heteroscedastic loss and fused Adam), the Concrete network of each revision
   learning its rates and with them held, and the grid's ``nn.Dropout`` network.

It prints each variant's median and, what to read, the median of per-repeat ratios working tree / base
(paired: both measured within the same round). With ``--cpu-extension`` each revision's variants run on its own
build of the opt-in C++ CPU path (:mod:`cd_convert.cpu_extension`), switched on around them only; the base
revision's ``csrc/host_site.cpp`` is built under a name of its own (two builds of one name cannot be loaded into
one process), so a change to the C++ code is measured side by side too. The package is imported from the
revision's tree, so it must not import itself by absolute name (``cd_convert`` uses relative imports
throughout).

Usage::

    python -m tools.ab_speed --rev HEAD~1                   # the last commit's change
    python -m tools.ab_speed --rev 4de9d4b --shape 64x16384 --site-repeats 40
    python -m tools.ab_speed --rev HEAD --cpu-extension --site-repeats 100 --epoch-repeats 100
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import cd_convert
from benchmarks import train_step
from benchmarks.overhead import interleaved_times

#: The repository this file belongs to (tools/ sits at its root).
REPO_ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, dest: str) -> ModuleType:
    """Import ``rev``'s ``cd_convert`` package, exported into ``dest``, as ``cd_convert_<sha>``.

    Args:
        rev: a git revision of this repository.
        dest: an empty folder that outlives the import (the package's files are read from it).

    Returns:
        The imported package.

    Raises:
        subprocess.CalledProcessError: if ``rev`` is not a revision of the repository.
    """
    sha = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", sha, "cd_convert"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    name = f"cd_convert_{sha}"
    os.rename(os.path.join(dest, "cd_convert"), os.path.join(dest, name))
    # An earlier import of the same revision read its files from a folder that may be gone: import afresh.
    for stale in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
        del sys.modules[stale]
    sys.path.insert(0, dest)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(dest)


def build_extension(package: ModuleType) -> ModuleType:
    """Build ``package``'s C++ CPU path under a module name of its own and hand it to its ``cpu_extension``
    (which then loads that build instead of building its own).

    Args:
        package: a ``cd_convert`` package imported by :func:`import_revision`.

    Returns:
        The built extension module.

    Raises:
        SystemExit: if the revision has no C++ CPU path.
    """
    source = Path(package.__file__).resolve().parent / "csrc" / "host_site.cpp"
    if not source.exists():
        raise SystemExit(f"{package.__name__} has no C++ CPU path ({source} is missing): drop --cpu-extension")
    from torch.utils import cpp_extension

    extension = importlib.import_module(package.__name__ + ".cpu_extension")
    name = cd_convert.cpu_extension._build_name(package.__name__)
    extension._BUILT = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=["-O3"])
    return extension._BUILT


#: Whether the revisions' variants run on their C++ CPU paths (``--cpu-extension``; set by :func:`main`).
WITH_EXTENSION = False


def _own(package: ModuleType, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run on ``package``'s C++ CPU path while :data:`WITH_EXTENSION` is set (else ``fn`` itself)."""
    return train_step.within(lambda: train_step.cpp_path(package), fn) if WITH_EXTENSION else fn


def site_times(base: ModuleType, shape: Tuple[int, int], repeats: int) -> Dict[str, List[float]]:
    """Seconds per forward + backward of one site of each revision and of ``nn.Dropout``, interleaved."""
    device = torch.device("cpu")
    numel = shape[0] * shape[1]
    fns = {
        "dropout": train_step.site_fn(nn.Dropout(0.1).train(), shape, device),
        "base": _own(base, train_step.site_fn(base.ConcreteDropout(0.1).train(), shape, device)),
        "tree": _own(cd_convert, train_step.site_fn(cd_convert.ConcreteDropout(0.1).train(), shape, device)),
    }
    return interleaved_times(fns, repeats, inner=max(1, min(100, 200_000 // numel)), warmup=20, device=device)


def epoch_times(base: ModuleType, repeats: int) -> Dict[str, List[float]]:
    """Seconds per UCI-network epoch converted by each revision and with ``nn.Dropout``, interleaved."""
    device = torch.device("cpu")
    x, y = train_step.epoch_data(device)

    def converted(package: ModuleType):
        model = train_step.uci_network(device, "concrete", package=package)
        return _own(package, train_step.epoch_fn(model, x, y, regularise=True, package=package))

    fns = {
        "dropout": train_step.epoch_fn(train_step.uci_network(device, "dropout"), x, y, regularise=False),
        "base": converted(base),
        "tree": converted(cd_convert),
    }
    return interleaved_times(fns, repeats, inner=1, warmup=3, device=device)


def protocol_times(base: ModuleType, repeats: int) -> Dict[str, List[float]]:
    """Seconds per epoch of the UCI protocol's loop: each revision's Concrete network (rates learned and held)
    and the grid network, interleaved."""
    device = torch.device("cpu")
    x, y = train_step.protocol_data(device)

    def converted(package: ModuleType, variant: str):
        model = train_step.protocol_network(variant, device, package=package)
        return _own(package, train_step.protocol_epoch_fn(model, x, y, train_step.protocol_loss(package)))

    fns = {
        "dropout": train_step.protocol_grid_epoch_fn(x, y, device),
        "base": converted(base, "concrete"),
        "tree": converted(cd_convert, "concrete"),
        "base_held": converted(base, "concrete_held"),
        "tree_held": converted(cd_convert, "concrete_held"),
    }
    return interleaved_times(fns, repeats, inner=1, warmup=3, device=device)


def _subset(times: Dict[str, List[float]], suffix: str) -> Dict[str, List[float]]:
    """``dropout``, ``base`` and ``tree`` from ``times``, the last two read from the keys ending in ``suffix``."""
    return {"dropout": times["dropout"], "base": times["base" + suffix], "tree": times["tree" + suffix]}


def report(title: str, times: Dict[str, List[float]], unit: str, scale: float) -> Dict[str, float]:
    """Print medians and paired ratios; return ``{"tree_vs_base", "tree_vs_dropout", "base_vs_dropout"}``."""
    against_dropout = train_step.summarize(times, "dropout")
    ratios = {
        "tree_vs_base": train_step.summarize(times, "base")["tree"]["paired_ratio"],
        "tree_vs_dropout": against_dropout["tree"]["paired_ratio"],
        "base_vs_dropout": against_dropout["base"]["paired_ratio"],
    }
    medians = ", ".join(f"{name} {statistics.median(ts) * scale:.1f} {unit}" for name, ts in times.items())
    print(f"\n{title}: {medians}")
    print(
        f"  working tree / base {ratios['tree_vs_base']:.3f} (paired); x nn.Dropout: working tree "
        f"{ratios['tree_vs_dropout']:.2f}, base {ratios['base_vs_dropout']:.2f}"
    )
    return ratios


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the revision to compare the working tree with (default HEAD)")
    parser.add_argument("--shape", default="32x50", help="the site's input shape, ROWSxCOLS (default 32x50)")
    parser.add_argument("--site-repeats", type=int, default=150, help="site samples per variant (default 150)")
    parser.add_argument("--epoch-repeats", type=int, default=150, help="epochs per variant (default 150; 0 skips)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--cpu-extension",
        action="store_true",
        help="run each revision's variants on its own build of the opt-in C++ CPU path (both built first)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    global WITH_EXTENSION
    args = parse_args(argv)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    torch.set_num_threads(args.threads)
    dest = tempfile.mkdtemp(prefix="cd_ab_")
    try:
        base = import_revision(args.rev, dest)
        WITH_EXTENSION = args.cpu_extension
        if WITH_EXTENSION:  # both builds before anything is timed
            build_extension(base)
            cd_convert.cpu_extension.enable()
            cd_convert.cpu_extension.disable()
        path = ", each on its C++ CPU path" if WITH_EXTENSION else ""
        print(
            f"working tree against {args.rev} ({base.__name__}){path}; torch {torch.__version__}, "
            f"{args.threads} thread(s)"
        )
        out = {"site": report(f"site ({rows}, {cols})", site_times(base, (rows, cols), args.site_repeats), "us", 1e6)}
        if args.epoch_repeats:
            out["epoch"] = report("UCI-network epoch", epoch_times(base, args.epoch_repeats), "ms", 1e3)
            times = protocol_times(base, args.epoch_repeats)
            out["protocol"] = report("UCI protocol epoch, rates learned", _subset(times, ""), "ms", 1e3)
            out["protocol_held"] = report("UCI protocol epoch, rates held", _subset(times, "_held"), "ms", 1e3)
        return out
    finally:
        WITH_EXTENSION = False
        shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
