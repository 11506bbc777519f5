"""A whole training step of converted timm models against the same models unconverted, side by side.

What a user runs: forward, cross-entropy (+ ``cd_convert.regularization(model)`` for the converted model),
``zero_grad``, backward, ``AdamW.step``; in fp32 and under bf16 autocast; eager and with the loss computation
(forward, loss, regulariser) under ``torch.compile``; and on CUDA, with ``--graphed``, the whole step captured
once in a CUDA graph and replayed (:class:`GraphedStep`: no per-op launch cost on the host). For each model
of :data:`CASES` and each batch size:

* **step time**: the variants' steps interleaved (the order rotating every repeat), medians, and the ratio to
  the unconverted model (also the median of per-repeat ratios, which the machine's drift affects less);
* **memory**: on CUDA the step's peak (``torch.cuda.max_memory_allocated`` above the level before the step,
  plus the variant's own parameters and optimizer state, so that the other variants resident on the device do
  not count); on the CPU the bytes autograd saves for the backward pass (``SavedTensorCounter``);
* **where the time goes**: a few profiled eager steps per variant, grouped by
  :mod:`benchmarks.kernel_breakdown` (GPU kernel time on CUDA, and beside it the host's CPU self time, which
  sets the pace of a host-bound step; CPU self time on the CPU);
* and the paper's UCI network's training epoch against the same network with ``nn.Dropout``
  (:func:`benchmarks.train_step.epoch_section`).

Variants: ``unconverted`` (the timm model with its dropout, fused attention where timm uses it),
``converted`` (``cd_convert.convert`` with the case's targets), and for models with timm's ``fused_attn``
switch ``explicit`` (unconverted with ``fused_attn=False``: a converted model trains its attention-dropout
sites on the explicit path, so this separates the cost of the sites from that of explicit attention).

Goal (the per-step overhead issue): converted <= 1.10x unconverted eager, <= 1.05x compiled, peak memory
<= 1.10x, on a GPU. On the CPU the same script runs a reduced version (small images and batches, no
``torch.compile`` unless asked): a proxy, to be labelled as one.

Run: ``python -m benchmarks.model_step [--device cuda] [--models a,b] [--batches 64,256] [--img-size 224]
[--precisions fp32,bf16] [--compile | --no-compile] [--graphed] [--repeats R] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cd_convert
from benchmarks import common
from benchmarks.kernel_breakdown import breakdown_with_host, format_breakdown
from benchmarks.overhead import SavedTensorCounter, interleaved_times
from benchmarks.train_step import epoch_section, summarize
from cd_convert.mc import concrete_sites

TARGET_EAGER, TARGET_COMPILED, TARGET_MEMORY = 1.10, 1.05, 1.10
DATASET_SIZE = 50_000


@dataclass(frozen=True)
class Case:
    """One model of the table.

    Attributes:
        label: the row's name.
        model: the timm model name.
        kwargs: ``timm.create_model`` arguments (the dropout rates).
        targets: ``convert``'s targets; None for its default (the model's dropout sites).
        gpu_bound_batch: the large batch run on CUDA, where the GPU rather than the host sets the pace.
    """

    label: str
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    targets: Optional[tuple] = None
    gpu_bound_batch: int = 256


_VIT_RATES = dict(drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1)
CASES: Dict[str, Case] = {
    c.label: c
    for c in (
        Case("vit_tiny", "vit_tiny_patch16_224", _VIT_RATES, gpu_bound_batch=512),
        Case("vit_base", "vit_base_patch16_224", _VIT_RATES),
        Case("convnext_tiny", "convnext_tiny", dict(drop_rate=0.1)),
        Case("resnet50_conv", "resnet50", dict(drop_rate=0.1), targets=(nn.Conv2d,)),
        Case("resnet50", "resnet50", dict(drop_rate=0.1)),
        Case("efficientnet_b0", "efficientnet_b0", dict(drop_rate=0.2)),
    )
}
VARIANTS = ("unconverted", "explicit", "converted")


def build_variants(case: Case, img_size: int, device: torch.device) -> Dict[str, nn.Module]:
    """The case's variants with identical weights, on ``device``, in training mode.

    Args:
        case: the model.
        img_size: input resolution (ViTs are built for it).
        device: where the models go.

    Returns:
        ``unconverted``, ``explicit`` (only for models with a ``fused_attn`` switch) and ``converted``.
    """
    import timm

    kwargs = dict(case.kwargs)
    if case.model.startswith("vit_"):
        kwargs["img_size"] = img_size
    torch.manual_seed(0)
    base = timm.create_model(case.model, pretrained=False, **kwargs)
    models = {"unconverted": base}
    if any(hasattr(m, "fused_attn") for m in base.modules()):
        explicit = copy.deepcopy(base)
        for module in explicit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        models["explicit"] = explicit
    targets = list(case.targets) if case.targets else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the conversion report's warnings are not what is measured here
        models["converted"] = cd_convert.convert(copy.deepcopy(base), targets=targets, dataset_size=DATASET_SIZE)
    return {name: model.to(device).train() for name, model in models.items()}


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a precision: ``fp32`` none, ``bf16`` bfloat16 autocast on ``device``."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}: use fp32 or bf16")


class TrainStep:
    """One training step as a user writes it: forward, cross-entropy (+ the regulariser), backward, AdamW.

    Calling it runs the step. :meth:`loss` computes the same loss eagerly, without stepping (for counting
    saved activations).

    Args:
        model: the network (its own AdamW is created here).
        x, target: the batch.
        converted: add ``cd_convert.regularization(model)`` to the loss.
        precision: ``fp32`` or ``bf16`` (autocast around the loss computation).
        compiled: run the loss computation under ``torch.compile``; backward runs the compiled backward graph
            and the optimizer stays eager.
    """

    def __init__(
        self, model: nn.Module, x: Tensor, target: Tensor, converted: bool, precision: str, compiled: bool
    ) -> None:
        self.model, self.x, self.target = model, x, target
        self.converted, self.precision = converted, precision
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self._compute = torch.compile(self._loss_of) if compiled else self._loss_of

    def _loss_of(self, inputs: Tensor, labels: Tensor) -> Tensor:
        with autocast_for(self.precision, inputs.device):
            loss = F.cross_entropy(self.model(inputs), labels)
            return loss + cd_convert.regularization(self.model) if self.converted else loss

    def loss(self) -> Tensor:
        """The batch's loss, eager, with its autograd graph."""
        return self._loss_of(self.x, self.target)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._compute(self.x, self.target).backward()
        self.optimizer.step()


class GraphedStep:
    """:class:`TrainStep`'s step captured once in a CUDA graph and replayed: forward, loss, regulariser, backward
    and ``AdamW(capturable=True)``, as PyTorch's whole-network capture recipe does it.

    Calling it replays the graph on the batch it was captured with. A captured concrete site draws a new seed at
    each replay (:func:`cd_convert.fused.draw_seed`), so every replay trains on new masks.

    Args:
        model: the network; a deep copy of it is captured and trained (with its own capturable AdamW).
        x, target: the batch (copied into the graph's static inputs).
        converted: add ``cd_convert.regularization(model)`` to the loss.
        precision: ``fp32`` or ``bf16`` (autocast, without its weight-cast cache, which capture does not allow).
    """

    def __init__(self, model: nn.Module, x: Tensor, target: Tensor, converted: bool, precision: str) -> None:
        # A fresh copy: the eager steps that ran before left the parameters' gradient-accumulation nodes bound
        # to the default stream, which broke the capture on an H200 (cudaErrorStreamCaptureImplicit).
        model = copy.deepcopy(model)
        self.model, self.x, self.target = model, x.clone(), target.clone()
        self.converted, self.precision = converted, precision
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, the regulariser's plan built, AdamW state made
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._loss().backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph
        with torch.cuda.graph(self.graph):
            self.loss = self._loss()
            self.loss.backward()
            self.optimizer.step()

    def _loss(self) -> Tensor:
        enabled = self.precision == "bf16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled, cache_enabled=False):
            loss = F.cross_entropy(self.model(self.x), self.target)
            return loss + cd_convert.regularization(self.model) if self.converted else loss

    def __call__(self) -> None:
        self.graph.replay()


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters and buffers and of the optimizer's state tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(step: TrainStep, device: torch.device) -> Dict[str, int]:
    """The memory one step of a variant takes.

    Args:
        step: the variant's (warmed-up) step.
        device: CUDA measures the allocator's peak; the CPU counts saved activations.

    Returns:
        ``saved`` (bytes autograd keeps for the backward pass) and on CUDA ``peak`` (the step's allocator peak
        above its starting level, plus the variant's resident parameters, buffers and optimizer state).
    """
    with SavedTensorCounter(exclude=list(step.model.parameters())) as counter:
        loss = step.loss()
    out = {"saved": counter.total()}
    del loss  # releases the graph before the peak is measured
    if device.type == "cuda":
        torch.cuda.synchronize()
        step.model.zero_grad(set_to_none=True)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - start + _resident_bytes(step.model, step.optimizer)
    return out


def _memory_key(memory: Dict[str, int]) -> str:
    """The memory figure a record compares: the CUDA peak where measured, else the saved activations."""
    return "peak" if "peak" in memory else "saved"


def measure(
    case: Case,
    batch: int,
    img_size: int,
    device: torch.device,
    precisions: Sequence[str],
    compiled: bool,
    repeats: int,
    inner: int,
    profile_steps: int,
    graphed: bool = False,
) -> Dict[str, Any]:
    """Every measurement of one model at one batch size.

    Returns:
        ``sites``, and per precision: ``eager``, ``compiled`` and ``graphed`` (:func:`benchmarks.train_step.summarize`
        rows, ratios to ``unconverted``), ``memory`` (per variant), ``breakdown`` (per variant, ms per step).
    """
    models = build_variants(case, img_size, device)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    result: Dict[str, Any] = {"batch": batch, "img_size": img_size, "sites": len(concrete_sites(models["converted"]))}
    for precision in precisions:
        steps = {name: TrainStep(m, x, target, name == "converted", precision, False) for name, m in models.items()}
        times = interleaved_times(steps, repeats, inner, warmup=2, device=device)
        row: Dict[str, Any] = {"eager": summarize(times, "unconverted")}
        row["memory"] = {name: step_memory(step, device) for name, step in steps.items()}
        if profile_steps > 0:
            row["breakdown"], host = breakdown_with_host(steps, profile_steps, device)
            if device.type == "cuda":
                row["host_breakdown"] = host
        if compiled:
            compiled_steps = {
                name: TrainStep(m, x, target, name == "converted", precision, True) for name, m in models.items()
            }
            times = interleaved_times(compiled_steps, repeats, inner, warmup=3, device=device)
            row["compiled"] = summarize(times, "unconverted")
            torch._dynamo.reset()  # the next precision compiles afresh; keeps the cache from growing
        if graphed:
            graphed_steps = {
                name: GraphedStep(m, x, target, name == "converted", precision) for name, m in models.items()
            }
            times = interleaved_times(graphed_steps, repeats, inner, warmup=2, device=device)
            row["graphed"] = summarize(times, "unconverted")
            del graphed_steps
        result[precision] = row
        del steps
    return result


def _ratio(rows: Optional[Dict[str, Dict[str, float]]], name: str) -> str:
    if not rows or name not in rows:
        return "-"
    row = rows[name]
    return f"{row['ratio']:.2f}x (paired {row['paired_ratio']:.2f}x; {row['median_ms']:.1f} ms)"


def print_case(label: str, res: Dict[str, Any], precisions: Sequence[str], device: torch.device) -> None:
    """The case's rows: step-time and memory ratios per precision, then the time breakdowns."""
    print(f"\n### {label}: {res['sites']} sites, batch {res['batch']}, {res['img_size']} px")
    memory_key = _memory_key(res[precisions[0]]["memory"]["unconverted"])
    print(
        f"\n| precision | variant | eager step / unconverted | compiled step / unconverted | "
        f"CUDA-graph step / unconverted | {'peak memory' if device.type == 'cuda' else 'saved activations'} "
        "/ unconverted |"
    )
    print("|---|---|---|---|---|---|")
    for precision in precisions:
        row = res[precision]
        base_memory = row["memory"]["unconverted"][memory_key]
        for name in row["eager"]:
            mem = row["memory"][name][memory_key]
            print(
                f"| {precision} | {name} | {_ratio(row['eager'], name)} | {_ratio(row.get('compiled'), name)} "
                f"| {_ratio(row.get('graphed'), name)} | {mem / base_memory:.2f}x ({mem / 2**20:.1f} MiB) |"
            )
    for precision in precisions:
        if "breakdown" in res[precision]:
            unit = "GPU kernel time" if device.type == "cuda" else "CPU self time"
            print(f"\n{label}, {precision}, eager: {unit} by category")
            print(format_breakdown(res[precision]["breakdown"], list(res[precision]["breakdown"])))
        if "host_breakdown" in res[precision]:
            print(f"\n{label}, {precision}, eager: host CPU self time by category (profiled; the launching)")
            print(format_breakdown(res[precision]["host_breakdown"], list(res[precision]["host_breakdown"])))


def summary_rows(results: Dict[str, Dict[str, Any]], precisions: Sequence[str]) -> List[List[str]]:
    """One line per (model, batch, precision): the converted model's ratios against the goals."""
    rows = []
    for key, res in results.items():
        for precision in precisions:
            row = res[precision]
            eager = row["eager"]["converted"]["ratio"]
            compiled = row.get("compiled", {}).get("converted", {}).get("ratio")
            graphed = row.get("graphed", {}).get("converted", {}).get("ratio")
            memory_key = _memory_key(row["memory"]["converted"])
            memory = row["memory"]["converted"][memory_key] / row["memory"]["unconverted"][memory_key]
            rows.append(
                [
                    key,
                    str(res["sites"]),
                    precision,
                    f"{eager:.2f}x" + (" ok" if eager <= TARGET_EAGER else ""),
                    "-" if compiled is None else f"{compiled:.2f}x" + (" ok" if compiled <= TARGET_COMPILED else ""),
                    "-" if graphed is None else f"{graphed:.2f}x" + (" ok" if graphed <= TARGET_EAGER else ""),
                    f"{memory:.2f}x" + (" ok" if memory <= TARGET_MEMORY else ""),
                ]
            )
    return rows


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    parser.add_argument(
        "--batches",
        default=None,
        help="comma-separated batch sizes (default: CUDA 64 and each model's GPU-bound batch; CPU 8)",
    )
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: CUDA 224, CPU 64)")
    parser.add_argument(
        "--precisions",
        default=None,
        help="of fp32, bf16 (default: CUDA both; CPU fp32, where bf16 convolutions are slow)",
    )
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="also time compiled steps")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager steps only")
    parser.add_argument(
        "--graphed", action="store_true", help="also time the eager step captured in a CUDA graph (CUDA only)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="samples per variant (default: CUDA 20, CPU 5)")
    parser.add_argument("--inner", type=int, default=None, help="steps per sample (default: CUDA 5, CPU 1)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (0: no breakdown)")
    parser.add_argument("--uci-repeats", type=int, default=20, help="UCI-network epoch samples (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    device = common.requested_device(args.device)
    if device is None:
        return None
    common.set_threads(args.threads)
    cuda = device.type == "cuda"
    labels = args.models.split(",") if args.models else list(CASES)
    unknown = [label for label in labels if label not in CASES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {', '.join(CASES)}")
    precisions = [p for p in (args.precisions or ("fp32,bf16" if cuda else "fp32")).split(",") if p]
    for precision in precisions:
        autocast_for(precision, device)  # rejects an unknown name before anything runs
    img_size = args.img_size or (224 if cuda else 64)
    compiled = cuda if args.compile is None else args.compile
    repeats = args.repeats or (20 if cuda else 5)
    inner = args.inner or (5 if cuda else 1)
    environment = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": common.load_average(),
    }
    print(f"cd_convert model-step benchmark: {environment}; repeats {repeats} x {inner} steps, compiled {compiled}")
    results: Dict[str, Any] = {"environment": environment, "models": {}}
    for label in labels:
        case = CASES[label]
        batches = _int_list(args.batches) if args.batches else ([64, case.gpu_bound_batch] if cuda else [8])
        for batch in batches:
            res = measure(
                case, batch, img_size, device, precisions, compiled, repeats, inner, args.profile_steps,
                graphed=args.graphed and cuda,
            )
            key = f"{label} b{batch}"
            results["models"][key] = res
            print_case(key, res, precisions, device)
            common.write_json(args.json, results)
    print(
        "\n### Converted / unconverted, against the goals (eager and CUDA graph <= 1.10x, compiled <= 1.05x, "
        "memory <= 1.10x)\n"
    )
    header = ["model, batch", "sites", "precision", "eager step", "compiled step", "CUDA-graph step", "memory"]
    print(common.markdown_table(header, summary_rows(results["models"], precisions)))
    if args.uci_repeats > 0:
        epoch = epoch_section(device, args.uci_repeats)
        results["uci_epoch"] = epoch
        print(
            f"\nUCI network epoch, converted + regulariser / nn.Dropout network: {epoch['concrete']['ratio']:.2f}x "
            f"(paired {epoch['concrete']['paired_ratio']:.2f}x; goal <= 1.3x)"
        )
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
