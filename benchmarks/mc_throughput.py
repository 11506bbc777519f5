"""MC prediction throughput: batched ``mc_predict`` against a Python loop of T forward passes.

Model: an MLP 784-512-512-10 with a ConcreteDropout site before each Linear (3 sites), T = 64 passes over a
batch of 16, on the CPU with torch's default thread count (``--threads`` to change it; ``--device cuda`` to
time a GPU instead). Both methods are timed side by side in one run, alternating, and the median of several
repeats is reported. The batched mean probabilities are also checked against the loop's: they are
different draws, so they agree only within Monte Carlo error.

Run: ``python -m benchmarks.mc_throughput [--samples 64] [--batch 16] [--repeats 15] [--threads N]
[--device cpu] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from cd_convert.layers import ConcreteDropout
from cd_convert.mc import mc_mode, mc_predict

TARGET_RATIO = 2.0


def build_mlp(init_p: float = 0.2) -> nn.Sequential:
    """MLP 784-512-512-10 with a ConcreteDropout site before each Linear.

    Args:
        init_p: initial drop rate of every site.

    Returns:
        The model, in eval mode.
    """
    return nn.Sequential(
        ConcreteDropout(init_p), nn.Linear(784, 512), nn.ReLU(),
        ConcreteDropout(init_p), nn.Linear(512, 512), nn.ReLU(),
        ConcreteDropout(init_p), nn.Linear(512, 10),
    ).eval()


def loop_predict(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """The baseline: T separate forward passes in a Python loop.

    Args:
        model: the model.
        x: ``(B, 784)`` inputs.
        samples: T.

    Returns:
        ``(T, B, C)`` softmax probabilities of each pass.
    """
    with mc_mode(model), torch.no_grad():
        return torch.stack([torch.softmax(model(x), dim=-1) for _ in range(samples)])


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on Windows
        return None


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
    return time.perf_counter() - start


def run(samples: int = 64, batch: int = 16, repeats: int = 15, seed: int = 0, device: str = "cpu") -> Dict[str, Any]:
    """Time both methods and check that they agree.

    Args:
        samples: T, passes per prediction.
        batch: B, examples per prediction.
        repeats: timed repeats of each method (after one warm-up each).
        seed: seed of the model and the inputs.
        device: where the model and the inputs live.

    Returns:
        The measurements (seconds, ratio, agreement statistics) as a JSON-serialisable dict.
    """
    where = torch.device(device)
    torch.manual_seed(seed)
    model = build_mlp().to(where)
    x = torch.randn(batch, 784, device=where)

    methods: Dict[str, Callable[[], Any]] = {
        "batched": lambda: mc_predict(model, x, samples),
        "loop": lambda: loop_predict(model, x, samples),
    }
    for fn in methods.values():
        fn()  # warm-up: allocator, thread pool
    times: Dict[str, List[float]] = {name: [] for name in methods}
    load_before = _load_average()
    for _ in range(repeats):
        # Interleave the methods so that drifts in machine load affect all alike.
        for name, fn in methods.items():
            times[name].append(_time(fn, where))
    load_after = _load_average()
    t_batched = statistics.median(times["batched"])
    t_loop = statistics.median(times["loop"])

    # Agreement: both estimate the same predictive mean with T passes each; their difference has standard
    # error sqrt(se_batched^2 + se_loop^2), with se = std_t(p_t) / sqrt(T) per (example, class).
    prediction = mc_predict(model, x, samples, return_samples=True)
    loop_samples = loop_predict(model, x, samples)
    diff = (prediction.probs - loop_samples.mean(0)).abs()
    se_batched = prediction.samples.std(0) / math.sqrt(samples)
    se_loop = loop_samples.std(0) / math.sqrt(samples)
    se_diff = (se_batched.pow(2) + se_loop.pow(2)).sqrt()
    z = diff / se_diff.clamp_min(1e-12)
    return {
        "samples": samples,
        "batch": batch,
        "repeats": repeats,
        "device": str(where) if where.type == "cpu" else torch.cuda.get_device_name(where),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": [load_before, load_after],
        "batched_s": t_batched,
        "loop_s": t_loop,
        "ratio": t_loop / t_batched,
        "target_ratio": TARGET_RATIO,
        "batched_predictions_per_s": batch / t_batched,
        "loop_predictions_per_s": batch / t_loop,
        "max_abs_diff": float(diff.max()),
        "mc_standard_error_max": float(se_diff.max()),
        "mc_standard_error_median": float(se_diff.median()),
        "max_z": float(z.max()),
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The result dict (also printed, and written to ``--json`` if given).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="T, MC passes (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="B, examples (default 16)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per method (default 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device such as cuda")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(samples=args.samples, batch=args.batch, repeats=args.repeats, seed=args.seed, device=args.device)
    print(f"MC prediction, MLP 784-512-512-10 (3 concrete sites), T={result['samples']}, "
          f"B={result['batch']}, {result['device']}, CPU threads={result['threads']}, "
          f"median of {result['repeats']}:")
    print(f"  batched mc_predict : {1e3 * result['batched_s']:8.2f} ms")
    print(f"  loop of T passes   : {1e3 * result['loop_s']:8.2f} ms")
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "BELOW"
    print(f"  speed-up (loop / batched): {result['ratio']:.2f}x ({verdict} the {TARGET_RATIO:.0f}x target)")
    print(f"  agreement of the mean probabilities: max |diff| = {result['max_abs_diff']:.4g}, "
          f"MC standard error of the difference: max {result['mc_standard_error_max']:.4g}, "
          f"median {result['mc_standard_error_median']:.4g}; max z = {result['max_z']:.2f} "
          f"over {result['batch'] * 10} values")
    loads = [v for v in result["load_average_1min"] if v is not None]
    if loads and max(loads) > result["threads"]:
        print(f"  WARNING: 1-min load average {max(loads):.1f} > {result['threads']} threads: other processes "
              "compete for the CPU, the times (and their ratio) are not reliable.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
