"""Helpers shared by the benchmark scripts (toy, uci, mnist, main).

Everything here is plain torch/numpy. Long benchmark runs should use one thread
(:func:`set_threads`), because the benchmark machines are shared.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import random
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

import cd_convert

LOG_2PI = math.log(2 * math.pi)


def requested_device(name: str) -> torch.device | None:
    """The device a benchmark was asked to measure on, or None (with a message) when it is a missing GPU.

    Args:
        name: ``"cpu"`` or ``"cuda"``.

    Returns:
        The device, or None when ``name`` is ``"cuda"`` and no GPU is available.
    """
    if name == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: nothing measured (run with --device cpu).")
        return None
    return torch.device(name)


def environment(threads: int, package: str) -> dict[str, Any]:
    """Versions and machine for a benchmark's JSON record: torch, ``package`` (a module name, e.g.
    ``"transformers"``), Python, the platform, torch's thread count and the CPU count."""
    import importlib
    import platform

    return {
        "torch": torch.__version__,
        package: importlib.import_module(package).__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), to print beside timings; None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover  (Windows)
        return None


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (None leaves torch's default)."""
    if n is not None and n > 0:
        torch.set_num_threads(n)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def run_seed(*parts: int) -> int:
    """A deterministic per-run seed from integers (base seed, split, run number ...)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**31 - 1)
    return s


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (std with ddof=0 over sqrt(n), as the UCI papers report); se=0 for n=1."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    se = float(a.std() / math.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


class Timer:
    """Context manager that accumulates wall-clock seconds into ``self.seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t0


def batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterable[torch.Tensor]:
    """Index batches over ``n`` examples (a fresh permutation per call, last batch partial, like Keras)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def mc_passes_plain_dropout(model: nn.Module, x: torch.Tensor, samples: int, chunk_rows: int = 200_000) -> torch.Tensor:
    """T stochastic passes of a plain ``nn.Dropout`` model (no BatchNorm): ``(T, B, ...)`` outputs.

    MC dropout for such a model is simply ``model.train()`` under ``no_grad``; the previous mode is restored.
    """
    was_training = model.training
    model.train()
    try:
        per_chunk = max(1, chunk_rows // max(1, x.shape[0]))
        outs = []
        done = 0
        while done < samples:
            t = min(per_chunk, samples - done)
            rep = x.repeat(t, *([1] * (x.dim() - 1)))
            out = model(rep)
            outs.append(out.reshape(t, x.shape[0], *out.shape[1:]))
            done += t
        return torch.cat(outs, 0)
    finally:
        model.train(was_training)


def mc_predict(model: nn.Module, x: torch.Tensor, samples: int, seed: int, **kwargs: Any):
    """``cd_convert.mc_predict`` with a seeded generator (same seed, same masks)."""
    g = torch.Generator().manual_seed(seed)
    return cd_convert.mc_predict(model, x, samples=samples, generator=g, **kwargs)


def mc_gaussian_ll(mu: torch.Tensor, y: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """Per-point MC test log-likelihood ``logsumexp_t log N(y; mu_t, sigma2_t) - log T``.

    With a scalar ``sigma2 = 1/tau`` this is exactly the expression of Gal & Ghahramani's code:
    ``logsumexp_t(-0.5 tau (y - mu_t)^2) - log T - 0.5 log 2pi + 0.5 log tau``.

    Args:
        mu: ``(T, N)`` sampled means, in the units of ``y``.
        y: ``(N,)`` targets.
        sigma2: noise variance, scalar or ``(T, N)``.

    Returns:
        ``(N,)`` float64 tensor.
    """
    mu = mu.double()
    var = torch.as_tensor(sigma2, dtype=torch.float64)
    logd = -0.5 * (torch.log(2 * math.pi * var) + (y.double()[None] - mu) ** 2 / var)
    return torch.logsumexp(logd, 0) - math.log(mu.shape[0])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


def pm(mean: float, se: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    if not path:
        return
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float))


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool = False):
    """tqdm if available (to stderr), else a plain iterator."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        class _Null:
            def __init__(self, it):
                self.it = it
            def __iter__(self):
                return iter(self.it)
            def update(self, n=1):
                pass
            def close(self):
                pass
            def set_postfix_str(self, s):
                pass
        return _Null(iterable if iterable is not None else [])
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, mininterval=2.0)


def new_figure(*args: Any, **kwargs: Any):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)


def call_quietly(fn: Callable, *a: Any, **k: Any) -> Any:
    return fn(*a, **k)


# -- a wall-clock guard for the coverage sweeps ------------------------------------------------------------


class Timeout(Exception):
    """A family ran longer than its time guard."""


@contextlib.contextmanager
def guard(seconds: float) -> Iterator[None]:
    """Raise :class:`Timeout` when the block runs longer than ``seconds`` (SIGALRM; 0 disables it)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Timeout(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
