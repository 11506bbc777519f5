"""Per-step overhead of Concrete Dropout on a small network: a UCI training epoch, one site, the regulariser.

On small networks the per-step cost is fixed Python and dispatcher work (an autograd node, a handful of aten
ops per site, the regulariser's bookkeeping), not arithmetic. Everything is measured side by side in one run
(variants interleaved, the order rotating every repeat, median of the repeats) and printed as ratios:

1. **A training epoch of the paper's UCI network**: ``Linear(F, 50) -> ReLU -> Linear(50, 1)``, 500 rows x
   8 features, batch 32 (16 steps, the last one partial), MSE loss, Adam; each step is forward, loss,
   ``zero_grad``, backward, ``step``. Variants: the network with ``nn.Dropout(0.1)`` in front of each Linear
   (the baseline), the network converted with ``cd_convert.convert(model, targets=[nn.Linear],
   dataset_size=500)`` trained on ``loss + cd_convert.regularization(model)``, and the converted network
   trained on the loss alone (the difference of the last two is the regulariser's share); and both networks
   with ``Adam(foreach=True)``, the multi-tensor update (PyTorch's default on CUDA, opt-in on the CPU), whose
   cost hardly grows with the number of parameter tensors (each site adds a p-logit). ``--compile`` adds
   both networks with the loss computation under ``torch.compile``. The aten ops one eager step dispatches
   are counted for both networks (each costs about the same fixed dispatch work here, so time follows count),
   and with ``--cpu-extension`` for the converted network on the C++ path.
   Goal: <= 1.3x the ``nn.Dropout`` epoch.
1b. **An epoch of the UCI protocol's own training loop** (``benchmarks/uci/training.py``'s ``train_epoch``: 1024 rows x
   13 features, batch 128, fused Adam): the grid's network (``nn.Dropout``, MSE plus weight decay) against
   the Concrete runs' network (converted ``NoiseNet``, heteroscedastic loss plus the regulariser), learning
   its rates and with them held (as ``concrete_freeze`` leaves them for the rest of its run). This per-step
   ratio is what divides the one-run recipe's saving in training batches against the 13-run grid.
2. **One site, forward + backward** (``y = site(x); y.backward(g)``, ``x`` requiring grad) at a tiny shape
   (32, 50) and a large one (64, 16384) fp32: ``ConcreteDropout(0.1)`` against ``nn.Dropout(0.1)``.
   Goal: <= 2x at the tiny shape. Then (2b) the same sites' forward pass under ``torch.no_grad`` in training
   mode: a Monte Carlo pass, or a site whose rate is held on an input that needs no gradient.
3. **``cd_convert.regularization(model)`` forward + backward alone**, for 2 sites (the UCI network) and 8, 12,
   16 and 50 sites (stacks of targeted ``Linear(16, 16)`` layers), in ms per call and per site; and the number
   of aten ops one call dispatches (forward and backward), counted with a ``TorchDispatchMode``. On the CPU
   each count is also timed with the host-float path off, paired: where its per-site loop stops paying.

On the CPU, sections 1, 1b and 2 also time the converted variants with the host-scalar paths switched off
(``cd_convert.host_scalars.ENABLED = False``: the sites' tensor formula and the regulariser's tensor form
that other devices use), side by side, so the gain of those paths is measured in the same run. With
``--cpu-extension`` they also time the opt-in C++ build of those paths (:mod:`cd_convert.cpu_extension`,
built before anything is timed), switched on only around its own variants; section 1 times it twice: with
its targeted Linears in the fused site-and-Linear node (:mod:`cd_convert.sites.fused_linear`, what
``enable()`` gives) and without that node (the C++ site, then ``nn.Linear``).

Run: ``python -m benchmarks.train_step [--device cpu] [--threads 1] [--repeats 30] [--compile] [--cpu-extension]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import cd_convert
from benchmarks import common, uci
from benchmarks.uci import concrete_net as uci_concrete_net
from benchmarks.uci import grid as uci_grid
from benchmarks.overhead import interleaved_times
from cd_convert import cpu_extension, host_scalars
from cd_convert.layers import ConcreteDropout
from cd_convert.sites import fused_linear

TARGET_EPOCH = 1.3
TARGET_SITE = 2.0
ROWS, FEATURES, HIDDEN, BATCH, DATASET_P = 500, 8, 50, 32, 0.1


# --------------------------------------------------------------------------------------------------- timing


def summarize(times: Dict[str, List[float]], base: str) -> Dict[str, Dict[str, float]]:
    """Median and quartiles in ms, the ratio of medians to ``base`` and the median of per-repeat ratios.

    Args:
        times: name -> per-call seconds, as returned by :func:`interleaved_times`.
        base: the name the ratios are taken against.

    Returns:
        name -> ``{"median_ms", "q1_ms", "q3_ms", "ratio", "paired_ratio"}``.
    """
    base_median = statistics.median(times[base])
    out: Dict[str, Dict[str, float]] = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {
            "median_ms": statistics.median(ts) * 1e3,
            "q1_ms": q[0] * 1e3,
            "q3_ms": q[2] * 1e3,
            "ratio": statistics.median(ts) / base_median,
            "paired_ratio": statistics.median(t / b for t, b in zip(ts, times[base])),
        }
    return out


def print_table(title: str, rows: Dict[str, Dict[str, float]], text: Dict[str, str], base: str) -> None:
    """A markdown table of median times and ratios to ``base``."""
    print(f"\n{title}\n")
    print(f"| variant | median ms | [q1, q3] ms | x {text[base]} | paired |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {text[name]} | {row['median_ms']:.3f} | [{row['q1_ms']:.3f}, {row['q3_ms']:.3f}] "
            f"| {row['ratio']:.2f}x | {row['paired_ratio']:.2f}x |"
        )


@contextlib.contextmanager
def tensor_path() -> Iterator[None]:
    """The host-scalar site path switched off (the tensor formula non-CPU devices use) inside the block."""
    previous = host_scalars.ENABLED
    host_scalars.ENABLED = False
    try:
        yield
    finally:
        host_scalars.ENABLED = previous


@contextlib.contextmanager
def cpp_path(package: Any = cd_convert) -> Iterator[None]:
    """``package``'s C++ CPU path switched on (:mod:`cd_convert.cpu_extension`; built beforehand) inside the block.

    Args:
        package: the ``cd_convert`` package whose path (``tools/ab_speed.py`` passes another revision's).
    """
    package.cpu_extension.enable()
    try:
        yield
    finally:
        package.cpu_extension.disable()


def within(context: Callable[[], ContextManager[None]], fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run inside a fresh ``context()`` on every call."""

    def wrapped() -> None:
        with context():
            fn()

    return wrapped


def on_tensor_path(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run on the tensor path (:func:`tensor_path`)."""
    return within(tensor_path, fn)


def on_cpu_extension(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run with the C++ CPU site switched on (:func:`cpp_path`)."""
    return within(cpp_path, fn)


def without_fused_linear(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, run with targeted Linears kept out of the extension's fused site-and-Linear node
    (:mod:`cd_convert.sites.fused_linear`): the C++ site, then ``nn.Linear``, as before that node existed."""

    def wrapped() -> None:
        enter = fused_linear.enter
        fused_linear.enter = lambda *args: None
        try:
            fn()
        finally:
            fused_linear.enter = enter

    return wrapped


#: Whether the sections also time the C++ CPU site (``--cpu-extension``; set by :func:`main`).
WITH_EXTENSION = False


# --------------------------------------------------------------------------------------------------- 1. epoch


def uci_network(device: torch.device, variant: str, seed: int = 0, package: Any = cd_convert) -> nn.Module:
    """The UCI network with ``nn.Dropout`` (``"dropout"``) or converted with concrete sites (``"concrete*"``).

    Args:
        device: where the parameters live.
        variant: ``"dropout"``, ``"concrete"`` or ``"concrete_noreg"``.
        seed: weights are initialised from this seed (the same weights for every variant).
        package: the ``cd_convert`` package that converts it (``tools/ab_speed.py`` passes another revision's).

    Returns:
        The network in training mode.
    """
    torch.manual_seed(seed)
    first, second = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, 1)
    if variant == "dropout":
        model: nn.Module = nn.Sequential(nn.Dropout(DATASET_P), first, nn.ReLU(), nn.Dropout(DATASET_P), second)
    else:
        model = package.convert(
            nn.Sequential(first, nn.ReLU(), second), targets=[nn.Linear], dataset_size=ROWS, init_p=DATASET_P
        )
    return model.to(device).train()


def step_fn(
    model: nn.Module,
    regularise: bool,
    compiled: bool = False,
    foreach: Optional[bool] = None,
    package: Any = cd_convert,
) -> Callable[[Tensor, Tensor], None]:
    """One training step of ``model`` on a batch: loss, ``zero_grad``, backward, Adam ``step``.

    Args:
        model: the network.
        regularise: add ``cd_convert.regularization(model)`` to the loss.
        compiled: run the loss (forward pass, loss and regulariser) under ``torch.compile``, as a user who
            compiles the step would; backward then runs the compiled backward graph, the optimizer stays eager.
        foreach: Adam's ``foreach`` argument. PyTorch's default (None) is the per-parameter loop on the CPU,
            whose cost grows with the number of parameter tensors (each site adds one); True updates all of
            them with a few multi-tensor ops.
        package: the ``cd_convert`` package whose ``regularization`` is added (the one that converted ``model``).

    Returns:
        A function of ``(x_batch, y_batch)``.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)

    def loss_of(xb: Tensor, yb: Tensor) -> Tensor:
        loss = F.mse_loss(model(xb), yb)
        return loss + package.regularization(model) if regularise else loss

    compute = torch.compile(loss_of) if compiled else loss_of

    def step(xb: Tensor, yb: Tensor) -> None:
        loss = compute(xb, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def epoch_fn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    regularise: bool,
    compiled: bool = False,
    foreach: Optional[bool] = None,
    package: Any = cd_convert,
) -> Callable[[], None]:
    """One epoch (a fresh permutation, ``ceil(rows / BATCH)`` Adam steps) of ``model`` on ``(x, y)``.

    Args:
        model: the network.
        x, y: the whole training set.
        regularise: add ``cd_convert.regularization(model)`` to the loss.
        compiled: compile the loss computation (see :func:`step_fn`).
        foreach: Adam's ``foreach`` argument (see :func:`step_fn`).
        package: the ``cd_convert`` package that converted ``model`` (see :func:`step_fn`).

    Returns:
        A no-argument function running one epoch.
    """
    step = step_fn(model, regularise, compiled, foreach, package)
    generator = torch.Generator().manual_seed(0)

    def fn() -> None:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], BATCH):
            idx = order[start : start + BATCH]
            step(x[idx], y[idx])

    return fn


EPOCH_TEXT = {
    "dropout": "nn.Dropout network",
    "concrete": "converted + regulariser",
    "concrete_noreg": "converted, no regulariser",
    "concrete_tensor": "converted + regulariser, tensor path (host-scalar sites off)",
    "concrete_cpp": "converted + regulariser, C++ CPU path (cpu_extension: fused site-and-Linear nodes)",
    "concrete_cpp_sites": "converted + regulariser, C++ CPU site, then nn.Linear (no fused node)",
    "dropout_foreach": "nn.Dropout network, Adam(foreach=True)",
    "concrete_foreach": "converted + regulariser, Adam(foreach=True)",
    "dropout_compiled": "nn.Dropout network, compiled loss",
    "concrete_compiled": "converted + regulariser, compiled loss",
}


#: Variants that are also compared with the nn.Dropout network trained the same way (optimizer, compilation).
OWN_BASELINE = {"concrete_foreach": "dropout_foreach", "concrete_compiled": "dropout_compiled"}


def epoch_data(device: torch.device) -> Tuple[Tensor, Tensor]:
    """The synthetic training set of section 1: ``ROWS x FEATURES`` inputs, a noisy linear target."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, FEATURES, device=device)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(ROWS, 1, device=device)


def epoch_section(device: torch.device, repeats: int, compiled: bool = False) -> Dict[str, Dict[str, float]]:
    """Time one UCI epoch of each variant, interleaved (with ``compiled``, also both networks compiled)."""
    x, y = epoch_data(device)
    fns = {
        "dropout": epoch_fn(uci_network(device, "dropout"), x, y, regularise=False),
        "concrete": epoch_fn(uci_network(device, "concrete"), x, y, regularise=True),
        "concrete_noreg": epoch_fn(uci_network(device, "concrete_noreg"), x, y, regularise=False),
    }
    if device.type == "cpu":
        fns["concrete_tensor"] = on_tensor_path(epoch_fn(uci_network(device, "concrete"), x, y, regularise=True))
        if WITH_EXTENSION:
            fns["concrete_cpp"] = on_cpu_extension(epoch_fn(uci_network(device, "concrete"), x, y, regularise=True))
            unfused = epoch_fn(uci_network(device, "concrete"), x, y, regularise=True)
            fns["concrete_cpp_sites"] = on_cpu_extension(without_fused_linear(unfused))
    # The multi-tensor Adam (the default on CUDA, opt-in on the CPU) for both networks: the per-parameter
    # loop's cost grows with the p-logits' count, the multi-tensor one's hardly does.
    fns["dropout_foreach"] = epoch_fn(uci_network(device, "dropout"), x, y, regularise=False, foreach=True)
    fns["concrete_foreach"] = epoch_fn(uci_network(device, "concrete"), x, y, regularise=True, foreach=True)
    if compiled:
        fns["dropout_compiled"] = epoch_fn(uci_network(device, "dropout"), x, y, regularise=False, compiled=True)
        fns["concrete_compiled"] = epoch_fn(uci_network(device, "concrete"), x, y, regularise=True, compiled=True)
    # More warm-up epochs with compiled variants: the first calls compile (and may recompile once).
    warmup = 5 if compiled else 3
    times = interleaved_times(fns, repeats, inner=3, warmup=warmup, device=device)
    rows = summarize(times, "dropout")
    for name, base in OWN_BASELINE.items():  # also against the nn.Dropout network run the same way
        if name in times:
            own = summarize({base: times[base], name: times[name]}, base)[name]
            rows[name]["own_ratio"], rows[name]["own_paired_ratio"] = own["ratio"], own["paired_ratio"]
    return rows


# ----------------------------------------------------------------------------- 1b. the UCI protocol's step

#: Section 1b's synthetic training set: Boston's 13 features, 8 batches of the protocol's 128 rows.
PROTOCOL_ROWS, PROTOCOL_FEATURES = 1024, 13
#: The grid point the ``nn.Dropout`` network trains with (any grid point costs the same per step).
PROTOCOL_P, PROTOCOL_TAU = 0.05, 0.1

PROTOCOL_TEXT = {
    "grid": "grid network (nn.Dropout, MSE + weight decay)",
    "concrete": "converted, learning its rates",
    "concrete_held": "converted, rates held (after concrete_freeze)",
    "concrete_tensor": "converted, learning its rates, tensor path",
    "concrete_cpp": "converted, learning its rates, C++ CPU site",
    "concrete_held_cpp": "converted, rates held, C++ CPU site",
}


def protocol_network(variant: str, device: torch.device, package: Any = cd_convert) -> nn.Module:
    """A network of ``benchmarks.uci`` with the protocol's hidden layer of 50, weights from seed 0.

    Args:
        variant: ``"grid"`` (``GridNet``: ``nn.Dropout`` in front of each Linear), ``"concrete"`` (``NoiseNet``
            converted as the Concrete runs convert it) or ``"concrete_held"`` (the same with every p-logit held,
            as ``concrete_freeze`` leaves it).
        device: where the parameters live.
        package: the ``cd_convert`` package that converts it.

    Returns:
        The network in training mode.
    """
    torch.manual_seed(0)
    if variant == "grid":
        return uci.GridNet(PROTOCOL_FEATURES, HIDDEN, PROTOCOL_P).to(device).train()
    net = uci.NoiseNet(PROTOCOL_FEATURES, HIDDEN)
    model = uci_concrete_net._concrete_net(net, PROTOCOL_ROWS, package=package, loss="heteroscedastic").to(device)
    if variant == "concrete_held":
        uci_concrete_net._stop_rates_training(model)
    return model.train()


def protocol_loss(package: Any = cd_convert) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """The Concrete runs' loss (``benchmarks.uci``): heteroscedastic Gaussian plus the regulariser."""
    return uci_concrete_net._concrete_loss(PROTOCOL_ROWS, 0.0, package)


def protocol_epoch_fn(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor]
) -> Callable[[], None]:
    """One epoch of ``benchmarks.uci``'s own training loop (its optimizer, batches and step) on ``(x, y)``."""
    optimizer = uci.protocol_optimizer(model)
    generator = torch.Generator().manual_seed(0)
    return lambda: uci.train_epoch(model, optimizer, x, y, generator, loss_fn)


def protocol_grid_epoch_fn(x: Tensor, y: Tensor, device: torch.device) -> Callable[[], None]:
    """One protocol epoch of the grid's network at :data:`PROTOCOL_P`, :data:`PROTOCOL_TAU` on ``(x, y)``."""
    grid_loss = uci_grid._grid_loss(PROTOCOL_P, PROTOCOL_TAU, PROTOCOL_ROWS)
    return protocol_epoch_fn(protocol_network("grid", device), x, y, grid_loss)


def protocol_data(device: torch.device) -> Tuple[Tensor, Tensor]:
    """Section 1b's standardised synthetic rows: ``(PROTOCOL_ROWS, PROTOCOL_FEATURES)`` inputs, a 1-D target."""
    torch.manual_seed(0)
    x = torch.randn(PROTOCOL_ROWS, PROTOCOL_FEATURES, device=device)
    y = x[:, :3].sum(dim=1) + 0.5 * torch.randn(PROTOCOL_ROWS, device=device)
    return x, (y - y.mean()) / y.std()


def protocol_section(device: torch.device, repeats: int) -> Dict[str, Dict[str, float]]:
    """Time one epoch of the UCI protocol's grid network and of its Concrete network, interleaved.

    The step ``python -m benchmarks.uci`` trains (fused Adam, batch 128): its per-step ratio is what the
    one-run recipe's wall-clock saving against the 13-run grid is divided by.
    """
    x, y = protocol_data(device)
    fns = {"grid": protocol_grid_epoch_fn(x, y, device)}
    for variant in ("concrete", "concrete_held"):
        fns[variant] = protocol_epoch_fn(protocol_network(variant, device), x, y, protocol_loss())
    if device.type == "cpu":
        model = protocol_network("concrete", device)
        fns["concrete_tensor"] = on_tensor_path(protocol_epoch_fn(model, x, y, protocol_loss()))
        if WITH_EXTENSION:
            for variant in ("concrete", "concrete_held"):
                model = protocol_network(variant, device)
                fns[f"{variant}_cpp"] = on_cpu_extension(protocol_epoch_fn(model, x, y, protocol_loss()))
    times = interleaved_times(fns, repeats, inner=3, warmup=3, device=device)
    return summarize(times, "grid")


def step_op_counts(device: torch.device) -> Dict[str, Dict[str, int]]:
    """Aten ops one eager training step dispatches, for the ``nn.Dropout`` network and the converted one.

    On a network this small each op costs a few microseconds of fixed dispatch work whatever its size, so the
    op count says where the converted step's extra time goes.

    Args:
        device: where the networks live.

    Returns:
        ``{"dropout": {op: count}, "concrete": {op: count}}`` for one steady-state step (after warm-up steps);
        on the CPU also ``"concrete_tensor"``, the converted step with the host-scalar site path off, and with
        ``--cpu-extension`` ``"concrete_cpp"``, the step on the C++ path (fused site-and-Linear nodes); and
        ``"dropout_foreach"``, ``"concrete_foreach"``: both networks with ``Adam(foreach=True)``.
    """
    x, y = epoch_data(device)
    xb, yb = x[:BATCH], y[:BATCH]
    out: Dict[str, Dict[str, int]] = {}
    variants = [("dropout", "dropout"), ("concrete", "concrete")]
    if device.type == "cpu":
        variants.append(("concrete_tensor", "concrete"))
        if WITH_EXTENSION:
            variants.append(("concrete_cpp", "concrete"))
    variants += [("dropout_foreach", "dropout"), ("concrete_foreach", "concrete")]
    for name, variant in variants:
        foreach = True if name.endswith("_foreach") else None
        step = step_fn(uci_network(device, variant), regularise=variant == "concrete", foreach=foreach)
        path = {"concrete_tensor": tensor_path, "concrete_cpp": cpp_path}.get(name, contextlib.nullcontext)
        with path():
            for _ in range(3):  # warm: on the C++ path the layers enter fused mode in the second call
                step(xb, yb)
            with AtenCounter() as counter:
                step(xb, yb)
        out[name] = dict(counter.counts)
    return out


# --------------------------------------------------------------------------------------------------- 2. site


def site_fn(site: nn.Module, shape: Tuple[int, int], device: torch.device) -> Callable[[], None]:
    """Forward + backward of one site on a fresh leaf input of ``shape``."""
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)

    logit = getattr(site, "p_logit", None)  # a site of any cd_convert revision (tools/ab_speed.py)

    def fn() -> None:
        x.grad = None
        site(x).backward(grad)
        if logit is not None:
            logit.grad = None

    return fn


def site_no_grad_fn(site: nn.Module, shape: Tuple[int, int], device: torch.device) -> Callable[[], None]:
    """One site's forward pass under ``torch.no_grad`` (a Monte Carlo pass; a held rate on the input)."""
    x = torch.randn(shape, device=device)

    def fn() -> None:
        with torch.no_grad():
            site(x)

    return fn


SITE_TEXT = {
    "dropout": "nn.Dropout(0.1)",
    "concrete": "ConcreteDropout(0.1)",
    "concrete_tensor": "ConcreteDropout(0.1), tensor path",
    "concrete_cpp": "ConcreteDropout(0.1), C++ CPU site",
}


def site_section(
    shape: Tuple[int, int],
    device: torch.device,
    repeats: int,
    make_fn: Callable[[nn.Module, Tuple[int, int], torch.device], Callable[[], None]] = site_fn,
    elements_per_sample: int = 200_000,
) -> Dict[str, Dict[str, float]]:
    """Time one site's call at ``shape`` against ``nn.Dropout``'s: forward + backward (:func:`site_fn`), or the
    forward pass without gradients (:func:`site_no_grad_fn`, what a Monte Carlo pass runs).

    Args:
        shape: the input's shape.
        device: where to run.
        repeats: timed samples per variant.
        make_fn: builds the timed call from a site, the shape and the device.
        elements_per_sample: calls per sample are this over the input's size (1 to 200 calls).

    Returns:
        :func:`summarize`'s rows against ``"dropout"``.
    """
    inner = max(1, min(200, elements_per_sample // (shape[0] * shape[1])))
    fns = {
        "dropout": make_fn(nn.Dropout(0.1).to(device).train(), shape, device),
        "concrete": make_fn(ConcreteDropout(0.1).to(device).train(), shape, device),
    }
    if device.type == "cpu":
        fns["concrete_tensor"] = on_tensor_path(make_fn(ConcreteDropout(0.1).to(device).train(), shape, device))
        if WITH_EXTENSION:
            fns["concrete_cpp"] = on_cpu_extension(make_fn(ConcreteDropout(0.1).to(device).train(), shape, device))
    return summarize(interleaved_times(fns, repeats, inner=inner, warmup=5, device=device), "dropout")


# --------------------------------------------------------------------------------------------------- 3. regulariser


def many_sites(count: int, device: torch.device, width: int = 16) -> nn.Module:
    """``count`` targeted ``Linear(width, width)`` layers with ReLUs between, converted: ``count`` sites."""
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for i in range(count):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i + 1 < count else [])
    return cd_convert.convert(nn.Sequential(*layers), targets=[nn.Linear], dataset_size=ROWS).to(device).train()


def regularizer_fn(model: nn.Module) -> Callable[[], None]:
    """``cd_convert.regularization(model).backward()``, gradients cleared each call."""
    params = list(model.parameters())

    def fn() -> None:
        for p in params:
            p.grad = None
        cd_convert.regularization(model).backward()

    return fn


class AtenCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (by overload name)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: nn.Module) -> Dict[str, Any]:
    """Aten ops of one steady-state ``regularization()`` call: forward and backward separately.

    Args:
        model: a converted model (a first call has already run, so any cache is warm).

    Returns:
        ``{"forward": n, "backward": m, "forward_ops": {...}, "backward_ops": {...}}``.
    """
    cd_convert.regularization(model).backward()  # warm
    with AtenCounter() as fwd:
        reg = cd_convert.regularization(model)
    with AtenCounter() as bwd:
        reg.backward()
    return {
        "forward": sum(fwd.counts.values()),
        "backward": sum(bwd.counts.values()),
        "forward_ops": dict(fwd.counts),
        "backward_ops": dict(bwd.counts),
    }


#: Site counts of section 3: the UCI network's 2, then targeted stacks around the host path's limit and 50.
REGULARIZER_SITES = (2, 8, 12, 16, 50)


def regularizer_section(device: torch.device, repeats: int) -> Dict[str, Any]:
    """Time and count ``regularization()`` for each of :data:`REGULARIZER_SITES` sites.

    On the CPU each count is also timed on the tensor path (host-scalar paths off), interleaved with the
    default, so the paired ratio shows where the host path's per-site Python loop stops paying
    (:data:`cd_convert.host_regularizer.MAX_SITES`); with ``--cpu-extension`` also on the C++ build, which
    serves every count.
    """

    def network(count: int) -> nn.Module:  # a fresh model per variant: each keeps its own regulariser plan
        return uci_network(device, "concrete") if count == 2 else many_sites(count, device)

    models = {n: network(n) for n in REGULARIZER_SITES}
    fns = {f"{n} sites": regularizer_fn(m) for n, m in models.items()}
    if device.type == "cpu":
        for n in REGULARIZER_SITES:
            fns[f"{n} sites, tensor path"] = on_tensor_path(regularizer_fn(network(n)))
            if WITH_EXTENSION:
                fns[f"{n} sites, C++"] = on_cpu_extension(regularizer_fn(network(n)))
    times = interleaved_times(fns, repeats, inner=20, warmup=5, device=device)
    out: Dict[str, Any] = {}
    for n, m in models.items():
        name = f"{n} sites"
        median = statistics.median(times[name]) * 1e3
        out[name] = {"sites": n, "median_ms": median, "per_site_ms": median / n, **count_ops(m)}
        tensor = times.get(f"{name}, tensor path")
        if tensor is not None:
            out[name]["tensor_path_ms"] = statistics.median(tensor) * 1e3
            out[name]["paired_vs_tensor_path"] = statistics.median(a / b for a, b in zip(times[name], tensor))
        native = times.get(f"{name}, C++")
        if native is not None:
            out[name]["cpp_ms"] = statistics.median(native) * 1e3
            out[name]["cpp_paired_vs_default"] = statistics.median(a / b for a, b in zip(native, times[name]))
    return out


def print_regularizer(res: Dict[str, Any]) -> None:
    print("\n### 3. `regularization()` forward + backward alone\n")
    print(
        "| model | median ms | ms per site | aten ops forward | backward | forward per site "
        "| tensor path ms | paired / tensor path | C++ (cpu_extension) ms | paired C++ / default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in res.items():
        tensor = row.get("tensor_path_ms")
        versus = f"{tensor:.3f} | {row['paired_vs_tensor_path']:.3f}" if tensor is not None else "- | -"
        native = row.get("cpp_ms")
        native_text = f"{native:.3f} | {row['cpp_paired_vs_default']:.3f}" if native is not None else "- | -"
        print(
            f"| {name} | {row['median_ms']:.3f} | {row['per_site_ms']:.4f} | {row['forward']} | "
            f"{row['backward']} | {row['forward'] / row['sites']:.1f} | {versus} | {native_text} |"
        )
    for name, row in res.items():
        ops = ", ".join(f"{k} {v}" for k, v in sorted(row["forward_ops"].items(), key=lambda kv: -kv[1]))
        print(f"\n{name}, forward ops: {ops}")


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="samples per variant (default 30)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both networks' epochs with the loss under torch.compile (slow to start)",
    )
    parser.add_argument(
        "--cpu-extension",
        action="store_true",
        help="also time the C++ CPU site (cd_convert.cpu_extension; builds it first, about 30 s the first time)",
    )
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    device = common.requested_device(args.device)
    if device is None:
        return None
    torch.set_num_threads(args.threads)
    global WITH_EXTENSION
    WITH_EXTENSION = bool(args.cpu_extension) and device.type == "cpu"
    if WITH_EXTENSION:
        cpu_extension.enable()  # built (or loaded from PyTorch's cache) before anything is timed
        cpu_extension.disable()
    load = common.load_average()
    print(
        f"cd_convert train-step benchmark: device {device}, torch {torch.__version__}, {args.threads} threads, "
        f"repeats {args.repeats}, load average {load}"
    )
    results: Dict[str, Any] = {
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "load_average": load,
        "cpu_extension": WITH_EXTENSION,
    }

    results["epoch"] = epoch_section(device, args.repeats, args.compile)
    print_table(
        f"### 1. UCI network epoch ({ROWS} x {FEATURES}, batch {BATCH}, Adam; goal <= {TARGET_EPOCH}x)",
        results["epoch"],
        EPOCH_TEXT,
        "dropout",
    )
    share = results["epoch"]["concrete"]["median_ms"] - results["epoch"]["concrete_noreg"]["median_ms"]
    print(
        f"\nregulariser's share of the converted epoch: {share:.3f} ms "
        f"({share / results['epoch']['concrete']['median_ms']:.0%})"
    )
    for name, base in OWN_BASELINE.items():
        row = results["epoch"].get(name)
        if row is not None:
            ratios = f"{row['own_ratio']:.2f}x (paired {row['own_paired_ratio']:.2f}x)"
            print(f"{EPOCH_TEXT[name]} / {EPOCH_TEXT[base]}: {ratios}")
    results["protocol"] = protocol_section(device, args.repeats)
    print_table(
        f"### 1b. The UCI protocol's training epoch ({PROTOCOL_ROWS} x {PROTOCOL_FEATURES}, batch {uci.BATCH_SIZE}, "
        "fused Adam, as `benchmarks.uci` trains)",
        results["protocol"],
        PROTOCOL_TEXT,
        "grid",
    )
    results["step_ops"] = step_op_counts(device)
    totals = {v: sum(c.values()) for v, c in results["step_ops"].items()}
    print(
        f"\naten ops per eager training step: nn.Dropout network {totals['dropout']}, converted "
        f"{totals['concrete']} ({totals['concrete'] / totals['dropout']:.2f}x)"
        + (f", converted on the tensor path {totals['concrete_tensor']}" if "concrete_tensor" in totals else "")
        + (f", converted on the C++ path {totals['concrete_cpp']}" if "concrete_cpp" in totals else "")
        + f"; with Adam(foreach=True): {totals['dropout_foreach']} and {totals['concrete_foreach']}"
    )

    results["site"] = {}
    for shape in ((32, 50), (64, 16384)):
        rows = site_section(shape, device, args.repeats)
        results["site"][f"{shape[0]}x{shape[1]}"] = rows
        goal = f"; goal <= {TARGET_SITE}x" if shape == (32, 50) else ""
        print_table(f"### 2. One site forward + backward, {shape} fp32{goal}", rows, SITE_TEXT, "dropout")
    results["site_no_grad"] = {}
    for shape in ((32, 50), (64, 16384)):
        rows = site_section(shape, device, args.repeats, site_no_grad_fn, elements_per_sample=400_000)
        results["site_no_grad"][f"{shape[0]}x{shape[1]}"] = rows
        print_table(
            f"### 2b. One site forward without gradients (an MC pass), {shape} fp32", rows, SITE_TEXT, "dropout"
        )

    results["regularizer"] = regularizer_section(device, args.repeats)
    print_regularizer(results["regularizer"])

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
