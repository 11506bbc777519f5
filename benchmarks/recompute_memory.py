"""What a targeted layer's recomputed input saves: memory held for the backward pass, side by side.

For a timm model converted with ``targets=[nn.Conv2d]`` (a site in front of every convolution), the bytes
allocated during one training forward pass and still held when it ends (what autograd keeps for the backward
pass, plus the output), for three variants with identical weights: the unconverted model, the converted model
keeping each layer's masked input (``cd_convert.recompute.ENABLED = False``), and the converted model
recomputing it in the backward pass (the default, :mod:`cd_convert.recompute`).

On CUDA the figure is the allocator's growth over the forward pass. On the CPU the fused kernels run only
under Triton's interpreter, so run it as ``TRITON_INTERPRET=1 python -m benchmarks.recompute_memory`` (slow:
the interpreter executes each kernel program in numpy); the figure is then the profiler's self memory of the
forward pass's ops (allocations minus frees).

Usage: ``[TRITON_INTERPRET=1] python -m benchmarks.recompute_memory [--device cpu|cuda] [--models resnet18,...]
[--batch B] [--img-size S] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import cd_convert
from cd_convert import fused, recompute

from .common import markdown_table, write_json


def held_after_forward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes allocated during ``model(x)`` and still held when it returns; the backward pass then runs.

    Args:
        model: the network, in training mode.
        x: the batch.

    Returns:
        The bytes (CUDA: allocator growth; CPU: the profiler's self memory summed over the forward's ops).
    """
    if x.is_cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = model(x)
        held = torch.cuda.memory_allocated() - start
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(x)
        held = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage)
    out.float().logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)
    return held


def measure(name: str, batch: int, img_size: int, device: torch.device) -> Dict[str, float]:
    """The three variants' bytes held after the forward (second of two forward passes each), in MiB."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=10).to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(copy.deepcopy(base), targets=[nn.Conv2d], dataset_size=1000)
    converted = converted.to(device).train()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    variants: Dict[str, Callable[[], int]] = {
        "unconverted": lambda: held_after_forward(base, x),
        "converted, input kept": lambda: held_after_forward(converted, x),
        "converted, input recomputed": lambda: held_after_forward(converted, x),
    }
    out: Dict[str, float] = {}
    for label, run in variants.items():
        recompute.ENABLED = label != "converted, input kept"
        try:
            run()  # the first pass makes one-time allocations (weight layouts, kernel caches)
            out[label] = run() / 2**20
        finally:
            recompute.ENABLED = True
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="resnet18", help="comma-separated timm model names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("on the CPU the fused kernels run only under Triton's interpreter: set TRITON_INTERPRET=1")
        fused.INTERPRET_ON_CPU = True
    result: Dict[str, Any] = {"device": args.device, "batch": args.batch, "img_size": args.img_size, "models": {}}
    rows = []
    for name in args.models.split(","):
        held = measure(name, args.batch, args.img_size, device)
        result["models"][name] = held
        base = held["unconverted"]
        rows.append([name, *(f"{mib:.2f} MiB ({mib / base:.2f}x)" for mib in held.values())])
        write_json(args.json, result)
    print(
        f"Memory held after a training forward pass, {args.device}, batch {args.batch}, {args.img_size} px, "
        "targets=[nn.Conv2d]\n"
    )
    print(markdown_table(["model", "unconverted", "converted, input kept", "converted, input recomputed"], rows))
    return result


if __name__ == "__main__":
    main()
