"""Where the host's time goes in a converted training step: per-call costs and a step split into phases.

On a GPU a converted step is host-bound: the kernels are short and the CPU launching them is the bottleneck.
This script measures, with the GPU idle (small tensors, so wall-clock per call is the host's cost):

* **per call**, a ladder from one PyTorch op to a whole site: an ``x * 2``, ``nn.Dropout`` forward and forward +
  backward, the fused kernels' raw launches (``cd_convert._triton_kernels``), ``fused.supports``, the seed draw,
  ``fused.fused_concrete_dropout`` and a ``ConcreteDropout`` module, forward and forward + backward; and the
  fused attention kernel against ``scaled_dot_product_attention`` at a small shape;
* **per step**, a timm ViT-tiny training step (AdamW, the regulariser for the converted model), unconverted
  and converted, split into forward, backward, optimizer and the wait for the GPU at the end (host
  timestamps, no synchronisation inside the step: a phase that waits for the GPU shows that wait);
* **synchronisations**: the converted step run under ``torch.cuda.set_sync_debug_mode("warn")``; each
  warning is a call that made the host wait for the GPU, with the line of code that made it.

Usage: ``python -m benchmarks.host_cost [--device cuda] [--calls N] [--repeats R] [--json PATH]``. On the CPU
only the per-call ladder of the CPU paths runs (no Triton launches).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert import fused, fused_attention
from cd_convert.layers import logit_bound

from .common import environment, markdown_table, write_json

Call = Callable[[], Any]


def per_call_us(fn: Call, calls: int, repeats: int, device: torch.device) -> List[float]:
    """Microseconds per call of ``fn``: ``repeats`` samples of ``calls`` back-to-back calls, synchronised around."""
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return samples


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Call:
    def run() -> None:
        module(x).backward(grad)

    return run


def ladder(device: torch.device, shape: Sequence[int], dtype: torch.dtype) -> Dict[str, Call]:
    """The per-call variants at one shape, cheapest first."""
    x = torch.randn(*shape, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    grad = torch.ones_like(x)
    dropout = nn.Dropout(0.1).train()
    site = cd_convert.ConcreteDropout().to(device).train()
    p_logit = site.p_logit
    calls: Dict[str, Call] = {
        "x * 2": lambda: x * 2,
        "nn.Dropout forward": lambda: dropout(x),
        "nn.Dropout forward + backward": _forward_backward(dropout, xg, grad),
        "seed draw (fused.draw_seed)": lambda: fused.draw_seed(x.device),
        "ConcreteDropout forward + backward": _forward_backward(site, xg, grad),
    }
    if device.type == "cuda" and fused.supports(x):
        kernels = fused._kernels()
        y = torch.empty_like(x)
        bound = logit_bound(site.eps)
        seed = fused.draw_seed(x.device)
        calls["fused.supports"] = lambda: fused.supports(x)
        calls["Triton forward launch"] = lambda: kernels.launch_forward(
            x, y, p_logit, seed, 10.0, bound, False, 1, 1, False, 1024
        )
        gx = torch.empty_like(x)
        gl = torch.empty_like(p_logit)
        calls["Triton backward launches (2)"] = lambda: kernels.launch_backward(
            grad, x, gx, gl, p_logit, seed, 10.0, bound, False, 1, 1, False, False, 1024, 1024
        )

        def fused_call(inp: torch.Tensor) -> torch.Tensor:
            return fused.fused_concrete_dropout(
                inp, p_logit, temperature=0.1, eps=site.eps, channelwise=False, channel_dim=1, save_output=False
            )

        calls["fused_concrete_dropout forward (no grad)"] = lambda: fused_call(x)
        calls["fused_concrete_dropout forward + backward"] = lambda: fused_call(xg).backward(grad)
        calls["ConcreteDropout forward (graph kept)"] = lambda: site(xg)
    return calls


def attention_calls(device: torch.device, dtype: torch.dtype) -> Dict[str, Call]:
    """SDPA with dropout against the fused concrete-attention kernel, forward + backward, at a small shape."""
    q, k, v = (torch.randn(2, 3, 16, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.ones(2, 3, 16, 64, device=device, dtype=dtype)
    p_logit = torch.zeros((), device=device, requires_grad=True)
    calls: Dict[str, Call] = {
        "SDPA p=0.1 forward + backward": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).backward(grad)
    }
    if fused_attention.supports(q.detach(), k.detach(), v.detach()):

        def kernel() -> None:
            out = fused_attention.fused_concrete_attention(q, k, v, p_logit, temperature=0.1, eps=1e-7)
            out.backward(grad)

        calls["fused concrete attention forward + backward"] = kernel
    return calls


def measure_calls(calls: Dict[str, Call], device: torch.device, count: int, repeats: int) -> Dict[str, float]:
    """Median microseconds per call of each variant (after a warm-up that compiles the kernels)."""
    out = {}
    for name, fn in calls.items():
        for _ in range(5):
            fn()
        out[name] = statistics.median(per_call_us(fn, count, repeats, device))
    return out


def vit_steps(device: torch.device, precision: str) -> Dict[str, Callable[[], Dict[str, float]]]:
    """A ViT-tiny training step (batch 8, 224 px), unconverted and converted, timed by phase on the host."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(copy.deepcopy(model), dataset_size=1000)
    x = torch.randn(8, 3, 224, 224, device=device)
    target = torch.randint(0, 10, (8,), device=device)
    out = {}
    for name, net, regularised in (("unconverted", model, False), ("converted", converted, True)):
        net = net.to(device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(net: nn.Module = net, optimizer: torch.optim.Optimizer = optimizer, regularised: bool = regularised):
            stamps = [time.perf_counter()]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(net(x), target)
                if regularised:
                    loss = loss + cd_convert.regularization(net)
            stamps.append(time.perf_counter())
            loss.backward()
            stamps.append(time.perf_counter())
            optimizer.step()
            stamps.append(time.perf_counter())
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            phases = ("forward + loss", "backward", "optimizer", "wait for the GPU")
            return {phase: (b - a) * 1e3 for phase, a, b in zip(phases, stamps, stamps[1:])}

        out[name] = step
    return out


def phase_medians(steps: Dict[str, Callable[[], Dict[str, float]]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Median milliseconds of each phase per variant, the variants interleaved."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            samples[name].append(fn())
    out = {}
    for name, rows in samples.items():
        out[name] = {phase: statistics.median(r[phase] for r in rows) for phase in rows[0]}
        out[name]["total"] = statistics.median(sum(r.values()) for r in rows)
    return out


def synchronisations(step: Callable[[], Dict[str, float]]) -> List[str]:
    """The synchronising calls of one step, each as ``file:line: message`` (the Python line that made the call)."""
    found: List[str] = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" not in str(warning.message).lower():
            continue
        found.append(f"{warning.filename}:{warning.lineno}: {str(warning.message).splitlines()[0]}")
    return found


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    parser.add_argument("--repeats", type=int, default=7, help="samples per variant")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    result: Dict[str, Any] = {"environment": environment(torch.get_num_threads(), "cd_convert")}
    print(f"cd_convert host-cost benchmark: {result['environment']}")
    for label, shape, dtype in (
        ("tiny (32, 50) fp32", (32, 50), torch.float32),
        ("ViT-tiny activation (8, 197, 192) bf16", (8, 197, 192), torch.bfloat16),
    ):
        if device.type == "cpu" and dtype == torch.bfloat16:
            continue
        times = measure_calls(ladder(device, shape, dtype), device, args.calls, args.repeats)
        result[f"per_call {label}"] = times
        print(f"\n### Per call, {label}: host microseconds (GPU idle)\n")
        print(markdown_table(["call", "us"], [[name, f"{us:.1f}"] for name, us in times.items()]))
    if device.type == "cuda":
        times = measure_calls(attention_calls(device, torch.bfloat16), device, args.calls // 4, args.repeats)
        result["per_call attention"] = times
        print("\n### Per call, attention (2, 3, 16, 64) bf16: host microseconds\n")
        print(markdown_table(["call", "us"], [[name, f"{us:.1f}"] for name, us in times.items()]))
        for precision in ("bf16", "fp32"):
            steps = vit_steps(device, precision)
            phases = phase_medians(steps, args.repeats * 3)
            result[f"vit_tiny step {precision}"] = phases
            names = list(phases["unconverted"])
            print(f"\n### ViT-tiny training step, batch 8, {precision}: host milliseconds by phase (medians)\n")
            print(markdown_table(["phase", *phases], [[n, *(f"{phases[v][n]:.2f}" for v in phases)] for n in names]))
            found = synchronisations(steps["converted"])
            result[f"synchronisations {precision}"] = found
            print(f"\nSynchronising calls in one converted step ({precision}): {len(found)}")
            for line in sorted(set(found)):
                print(f"  {found.count(line)} x {line}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
