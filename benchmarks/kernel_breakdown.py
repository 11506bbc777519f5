"""Where a training step's time goes: profiler events grouped into a few categories, in ms per step.

On CUDA the time grouped is the GPU kernels' device time; on the CPU it is the profiler's CPU events (aten ops,
autograd nodes, the optimizer's ``record_function`` ranges) with their *self* time, so that nested events are
not counted twice. Work inside the optimizer's ranges and cd_convert's autograd functions counts as theirs
(:data:`SCOPES`); everything else is grouped by name by the patterns of :data:`CATEGORIES`, the first match
winning. A heuristic, good enough to see which kind of work a conversion adds (site kernels, explicit attention
matmuls, dtype casts), not an exact attribution.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Dict, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

#: (category, pattern) in match order; names are matched case-insensitively. The Concrete Dropout site kernels
#: are cd_convert's Triton kernels (``_forward``, ``_backward``, ``_finish`` in ``cd_convert/_triton_kernels.py``)
#: and its autograd functions; the regulariser is its autograd function and the weight norms it takes.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("concrete sites", r"concrete|^_forward$|^_backward$|^_finish$"),
    ("regulariser", r"_regularizer|foreach_norm|linalg_vector_norm"),
    ("fused attention", r"flash|fmha|efficient_attention|scaled_dot_product|sdpa|cudnn_attn"),
    ("optimizer", r"adam|optimizer|multi_tensor|foreach_|fused_adam"),
    ("matmul / conv", r"gemm|matmul|bmm|addmm|aten::mm$|aten::linear|conv|cutlass|xmma|cudnn|wgrad|dgrad|sm\d\d_"),
    ("copy / cast", r"copy|cast|convert|aten::to$|clone|contiguous"),
    ("normalization", r"norm"),
    ("dropout / random", r"dropout|bernoulli|philox|rand|uniform"),
    ("softmax", r"softmax"),
    ("reduction", r"reduce|aten::sum|aten::mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(add|mul|div|sub|where|fill|gelu|relu|silu)"),
)
OTHER = "other"
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]


def category_of(event_name: str) -> str:
    """The category of a profiler event or kernel name.

    Args:
        event_name: an aten op (``aten::bmm``), an autograd node
            (``autograd::engine::evaluate_function: HostConcreteDropoutBackward``) or a CUDA kernel name.

    Returns:
        The first category of :data:`CATEGORIES` whose pattern is found in the name, else ``"other"``.
    """
    for name, pattern in _COMPILED:
        if pattern.search(event_name):
            return name
    return OTHER


#: (category, pattern) of the ranges whose whole contents count as one category, whatever the ops inside:
#: the optimizer's ``record_function`` ranges and cd_convert's autograd functions (their forward ranges and
#: backward nodes), so that Adam's per-parameter ``sqrt`` or a site's ``mul`` is not counted as elementwise work.
SCOPES: tuple[tuple[str, str], ...] = (
    ("optimizer", r"^Optimizer\."),
    ("concrete sites", r"concrete"),
    ("regulariser", r"_regularizer"),
)
_SCOPES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in SCOPES]


def scope_of(event) -> Optional[str]:
    """The category of the innermost enclosing range of :data:`SCOPES` (the event itself included), or None.

    Args:
        event: a profiler ``FunctionEvent`` of the CPU (with ``name`` and ``cpu_parent``).
    """
    while event is not None:
        for name, pattern in _SCOPES:
            if pattern.search(event.name):
                return name
        event = event.cpu_parent
    return None


def _add(table: Dict[str, float], key: str, us: float) -> None:
    table[key] = table.get(key, 0.0) + us


def _cpu_times(prof) -> Dict[str, float]:
    # Self time, so that nested events are not counted twice; the scope decides for ops inside a scoped range.
    table: Dict[str, float] = {}
    for event in prof.events():
        us = float(event.self_cpu_time_total)
        if us > 0:
            _add(table, scope_of(event) or category_of(event.name), us)
    return table


def _kernel_times(prof) -> Dict[str, float]:
    # Each kernel is linked to the CPU op (or range) that launched it; that op's scope decides, else the
    # kernel's own name. Kernel time the profiler could not link to a launching op is kept, by kernel name.
    table: Dict[str, float] = {}
    linked = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue
        for kernel in getattr(event, "kernels", ()):
            _add(table, scope_of(event) or category_of(kernel.name), float(kernel.duration))
            linked += float(kernel.duration)
    device_total = 0.0
    by_name: Dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:
            # Renamed from ``self_cuda_time_total`` in torch 2.4; both name the kernels' summed time.
            us = float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))
            device_total += us
            _add(by_name, category_of(event.key), us)
    if linked == 0.0:
        return by_name  # no kernel linked to an op (older profilers): group by kernel name alone
    if device_total - linked > 0.01 * device_total:
        _add(table, "kernels not linked to an op", device_total - linked)
    return table


def breakdown(fns: Mapping[str, Callable[[], None]], steps: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    """Profile ``steps`` calls of each function and group their time by category.

    Args:
        fns: name -> a no-argument function running one training step (already warmed up).
        steps: calls profiled per function.
        device: ``cuda``: group the GPU kernels' device time; ``cpu``: the CPU events' self time.

    Returns:
        name -> category -> ms per call, with ``"total"`` the sum over categories; categories with no time are
        left out.
    """
    return breakdown_with_host(fns, steps, device)[0]


def breakdown_with_host(
    fns: Mapping[str, Callable[[], None]], steps: int, device: torch.device
) -> tuple[Dict[str, Dict[str, float]], Dict[str, Dict[str, float]]]:
    """:func:`breakdown`, and from the same profiles the host's side: the CPU events' self time by category.

    On CUDA the host table shows what the launching costs (a host-bound step's time); on the CPU both tables
    are the same.

    Returns:
        ``(device tables, host tables)``, each name -> category -> ms per call with ``"total"``.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    device_out: Dict[str, Dict[str, float]] = {}
    host_out: Dict[str, Dict[str, float]] = {}
    for name, fn in fns.items():
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        host = _cpu_times(prof)
        for out, table in ((device_out, _kernel_times(prof) if cuda else host), (host_out, host)):
            per_step = {key: us / 1e3 / steps for key, us in table.items()}
            per_step["total"] = sum(per_step.values())
            out[name] = per_step
    return device_out, host_out


def format_breakdown(rows: Mapping[str, Mapping[str, float]], order: Sequence[str]) -> str:
    """A markdown table: one row per category (by decreasing time in the last column), one column per variant.

    Args:
        rows: :func:`breakdown`'s result.
        order: the variants, in column order.

    Returns:
        The table's lines joined.
    """
    categories = sorted(
        {c for name in order for c in rows[name] if c != "total"}, key=lambda c: -rows[order[-1]].get(c, 0.0)
    )
    lines = ["| ms per step | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    for category in [*categories, "total"]:
        cells = " | ".join(f"{rows[name].get(category, 0.0):.3f}" for name in order)
        lines.append(f"| {category} | {cells} |")
    return "\n".join(lines)
