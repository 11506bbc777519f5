"""An attention site's forward + backward on the GPU: the fused concrete-attention kernel against the alternatives.

For each shape (ViT-tiny and ViT-base attention at batch 64 and 256, causal language-model attention with head
widths 64 and 128), in bf16 (and fp32 for one shape), the variants run side by side, interleaved:

* ``sdpa``: ``F.scaled_dot_product_attention(dropout_p=0.1)``, what the unconverted model runs in training;
* ``sdpa_p0``: the same without dropout (the floor);
* ``fused``: :func:`cd_convert.fused_attention.fused_concrete_attention`, what a converted model runs now;
* ``explicit``: scores, softmax, a ``ConcreteDropout`` site on the probabilities, matmul (the fallback path).

Printed per variant: forward + backward time (median, ratio to ``sdpa``) and the peak memory the call adds
above its inputs (ratio to ``sdpa``). Each shape also checks the fused kernel against explicit attention in
fp32 on the same noise (``launch_attention_noise``): relative errors of the output and of every gradient.
``--tiles`` adds the fused kernel with other launch shapes (``CD_CONVERT_ATTENTION_TILES`` values), each
timed beside the others and checked for accuracy the same way. The fp32 shape runs with TF32 matmuls allowed
(the kernel takes fp32 only then; see :mod:`cd_convert.fused_attention`).

Run: ``python -m benchmarks.attention_kernel [--repeats R] [--inner N] [--shapes a,b] [--tiles "A|B"]
[--json PATH]`` (CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import common
from benchmarks.overhead import interleaved_times, summarize
from cd_convert import fused_attention
from cd_convert.fused_attention import TILES_VARIABLE
from cd_convert.layers import ConcreteDropout, reference_concrete_dropout
from cd_convert.sites.attention import explicit_attention

P = 0.1
TEMPERATURE = 0.1


@dataclass(frozen=True)
class Shape:
    """One attention call: ``(batch, heads, length, head width)``, causal or not, and the dtype."""

    label: str
    batch: int
    heads: int
    length: int
    dim: int
    causal: bool = False
    dtype: torch.dtype = torch.bfloat16
    tf32: bool = False


SHAPES = {
    s.label: s
    for s in (
        Shape("vit_tiny_b64", 64, 3, 197, 64),
        Shape("vit_base_b64", 64, 12, 197, 64),
        Shape("vit_base_b256", 256, 12, 197, 64),
        Shape("vit_base_b64_fp32", 64, 12, 197, 64, dtype=torch.float32, tf32=True),
        Shape("lm_d64_causal", 8, 16, 1024, 64, causal=True),
        Shape("lm_d128_causal", 4, 32, 2048, 128, causal=True),
    )
}


def _inputs(shape: Shape, device: torch.device):
    torch.manual_seed(0)
    size = (shape.batch, shape.heads, shape.length, shape.dim)
    q, k, v = (torch.randn(size, device=device, dtype=shape.dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(size, device=device, dtype=shape.dtype)


@contextlib.contextmanager
def tiles_set(tiles: Optional[str]) -> Iterator[None]:
    """``CD_CONVERT_ATTENTION_TILES`` set to ``tiles`` (None: unset, the defaults) for a block."""
    saved = os.environ.pop(TILES_VARIABLE, None)
    if tiles is not None:
        os.environ[TILES_VARIABLE] = tiles
    try:
        yield
    finally:
        os.environ.pop(TILES_VARIABLE, None)
        if saved is not None:
            os.environ[TILES_VARIABLE] = saved


def variants(shape: Shape, device: torch.device, tiles: Sequence[str] = ()) -> Dict[str, Callable[[], None]]:
    """name -> a function running one forward + backward of that variant on the shape's inputs.

    Args:
        shape: the call.
        device: where it runs.
        tiles: extra launch shapes of the fused kernel, each a variant ``fused[tiles]``.
    """
    q, k, v, grad = _inputs(shape, device)
    site = ConcreteDropout(init_p=P).to(device).train()
    p_logit = site.p_logit

    def run(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            for t in (q, k, v, p_logit):
                t.grad = None
            fn().backward(grad)

        return step

    def fused(launch: Optional[str]) -> Callable[[], None]:
        step = run(
            lambda: fused_attention.fused_concrete_attention(
                q, k, v, p_logit, is_causal=shape.causal, temperature=TEMPERATURE, eps=site.eps
            )
        )

        def with_tiles() -> None:
            with tiles_set(launch):
                step()

        return with_tiles

    fns = {
        "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=shape.causal)),
        "sdpa_p0": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)),
        "fused": fused(None),
        "explicit": run(lambda: explicit_attention(q, k, v, is_causal=shape.causal, dropout=site)),
    }
    fns.update({f"fused[{t}]": fused(t) for t in tiles})
    return fns


def peak_memory(fn: Callable[[], None]) -> int:
    """Bytes one call adds at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def accuracy(shape: Shape, device: torch.device) -> Dict[str, float]:
    """Relative errors of the fused kernel's output and gradients against fp32 explicit attention, same noise."""
    from cd_convert._triton_attention import launch_attention_noise

    q, k, v, grad = _inputs(shape, device)
    p_logit = torch.tensor(math.log(P / (1 - P)), device=device, requires_grad=True)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=device))  # the draw the forward pass makes first
    torch.manual_seed(7)
    out = fused_attention.fused_concrete_attention(
        q, k, v, p_logit, is_causal=shape.causal, temperature=TEMPERATURE, eps=1e-6
    )
    out.backward(grad)
    u = torch.empty(shape.batch, shape.heads, shape.length, shape.length, device=device)
    launch_attention_noise(u, seed)
    refs = [t.detach().float().requires_grad_() for t in (q, k, v, p_logit)]
    expected = explicit_attention(
        *refs[:3], is_causal=shape.causal, dropout=lambda w: reference_concrete_dropout(w, refs[3], u, TEMPERATURE)
    )
    expected.backward(grad.float())
    pairs = zip(
        ("out", "dq", "dk", "dv", "dlogit"),
        (out, q.grad, k.grad, v.grad, p_logit.grad),
        (expected, *(r.grad for r in refs)),
    )
    return {name: float((got.detach().float() - want).norm() / want.norm()) for name, got, want in pairs}


def measure(shape: Shape, device: torch.device, repeats: int, inner: int, tiles: Sequence[str] = ()) -> Dict[str, Any]:
    """Times, peak memory and accuracy of every variant on one shape (see the module docstring)."""
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = shape.tf32
    failed: Dict[str, str] = {}
    try:
        fns = variants(shape, device, tiles)
        for launch in tiles:  # a launch shape this GPU cannot run (shared memory, registers) is reported, not fatal
            try:
                fns[f"fused[{launch}]"]()
            except Exception as err:  # noqa: BLE001 - Triton's compile errors have no common base class
                failed[launch] = f"{type(err).__name__}: {str(err)[:200]}"
                del fns[f"fused[{launch}]"]
        times = summarize(interleaved_times(fns, repeats, inner, warmup=3, device=device), "sdpa")
        memory = {name: peak_memory(fn) for name, fn in fns.items()}
        errors = {}
        for launch in (None, *[t for t in tiles if t not in failed]):
            with tiles_set(launch):
                errors["fused" if launch is None else f"fused[{launch}]"] = accuracy(shape, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return {
        "shape": shape.__dict__ | {"dtype": str(shape.dtype)},
        "time": times,
        "memory": memory,
        "accuracy": errors,
        "failed_tiles": failed,
    }


def print_shape(label: str, res: Dict[str, Any]) -> None:
    s = res["shape"]
    print(
        f"\n### {label}: batch {s['batch']}, {s['heads']} heads, length {s['length']}, width {s['dim']}, "
        f"{s['dtype']}{', causal' if s['causal'] else ''}"
    )
    rows = []
    base_mem = res["memory"]["sdpa"]
    for name, t in res["time"].items():
        mem = res["memory"][name]
        rows.append(
            [name, f"{t['median_ms']:.3f}", f"{t['ratio']:.2f}x", f"{mem / 2**20:.1f}", f"{mem / base_mem:.2f}x"]
        )
    print(common.markdown_table(["variant", "fwd+bwd ms", "/ sdpa", "peak MiB above inputs", "/ sdpa"], rows))
    for launch, error in res.get("failed_tiles", {}).items():
        print(f"fused[{launch}] did not run: {error}")
    for name, errors in res["accuracy"].items():
        text = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        print(f"{name} vs fp32 explicit attention on the same noise, relative error: {text}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--tiles", default="", help="'|'-separated CD_CONVERT_ATTENTION_TILES values to compare")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    device = common.requested_device("cuda")
    if device is None:
        return None
    if not fused_attention.supports(*[torch.zeros(1, 1, 4, 16, device=device, dtype=torch.bfloat16)] * 3):
        print("the fused attention kernel is not available here (Triton missing or CD_CONVERT_FUSED=0)")
        return None
    labels = args.shapes.split(",") if args.shapes else list(SHAPES)
    unknown = [label for label in labels if label not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    results: Dict[str, Any] = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__}}
    print(f"attention-site benchmark: {results['environment']}; repeats {args.repeats} x {args.inner}")
    for label in labels:
        tiles = [t for t in args.tiles.split("|") if t]
        results[label] = measure(SHAPES[label], device, args.repeats, args.inner, tiles)
        print_shape(label, results[label])
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
