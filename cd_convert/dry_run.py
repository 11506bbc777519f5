"""One forward pass on example inputs that confirms what discovery inferred and finds what it could not see.

Runs on the model itself, borrowed in training mode with a forked RNG and restored exactly afterwards
(modes, BatchNorm statistics and every other buffer, the global RNG), so no copy of a large model is
needed. Forward hooks record which modules run; a ``TorchFunctionMode`` follows tensors through
data-moving ops and records functional dropout calls, so that:

* every site and targeted layer is known to be called (or not);
* sites found by module search get their consumer by tensor identity;
* functional dropout in models torch.fx cannot trace is found and attributed to its owner's method; one
  function shared by several modules (an attention function called by every layer) gives one call per
  owning module instance;
* the rate of each functional call is traced to the attribute it is read from (``self.dropout``,
  ``self.attention_dropout``, ``self.dropout.p``): for the pass, each candidate rate attribute of the
  model is nudged to a value no other holds, so the value a call receives names its source;
* for transformers models, attention runs in its eager implementation (where attention dropout is a call),
  and calls made inside an attention interface are marked, so that conversion can select that path while
  the site is active;
* each site's width K (the dropped feature dim of its first call, as the first training forward records it)
  is seen, so that the regulariser works before any forward; attention probabilities (a softmax's output,
  or a call inside an attention interface) are left out: their width is the key length, not a feature.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .callsites import FUNCTIONAL_DROPOUTS, bind_functional, call_key, caller_frame, function_name, owner_method
from .consumers import TRANSPARENT_FUNCTIONS, TRANSPARENT_METHODS, ConsumerInfo, module_units
from .found import Discovery, FoundSite
from .integrations import transformers as hf
from .layers import ConcreteDropoutBase
from .sites.base import ATTENTION_CONSUMER_NOTE, site_type_for
from .targets import is_dropout_module

__all__ = ["confirm_with_dry_run"]

#: Example inputs: positional arguments (a tuple or list) or keyword arguments (a dict).
ExampleInputs = Union[Sequence[Any], Dict[str, Any]]

_TRANSPARENT_TENSOR_METHODS = {
    getattr(torch.Tensor, name) for name in TRANSPARENT_METHODS if hasattr(torch.Tensor, name)
}
#: Spacing of the nudged rates: far below any meaningful difference of dropout rates, far above fp64 rounding.
_NUDGE = 2.0**-30
_SOFTMAX_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
#: The "producer" of softmax outputs (attention probabilities), followed through data-moving ops like a site's.
_SOFTMAX = "<softmax>"


class _Recorder(TorchFunctionMode):
    def __init__(self, run: "_DryRun") -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in FUNCTIONAL_DROPOUTS:
            self.run.functional_call(func, args, kwargs, result, sys._getframe(1))
        elif func in _SOFTMAX_FUNCTIONS and isinstance(result, torch.Tensor):
            self.run.remember(result, _SOFTMAX)
        elif (func in TRANSPARENT_FUNCTIONS or func in _TRANSPARENT_TENSOR_METHODS) and args:
            source = self.run.produced_by.get(id(args[0]))
            if source is not None and isinstance(result, torch.Tensor):
                self.run.remember(result, source)
        return result


def _nudge_rates(model: nn.Module) -> Tuple[Dict[float, Tuple[str, float]], List[Tuple[nn.Module, str, float]]]:
    """Give every nonzero dropout-rate attribute of ``model`` a value of its own.

    Candidates are the ``p`` of dropout modules and float attributes whose name contains "drop". Rates of 0
    are left at 0 (code such as ``if self.drop_rate:`` must take the branch it takes in the real model).

    Args:
        model: the model (changed in place; the caller restores it).

    Returns:
        nudged value -> (``"module.path.attribute"``, original value); and ``(module, attribute, original)``
        for each nudge, to restore.
    """
    sources: Dict[float, Tuple[str, float]] = {}
    restore: List[Tuple[nn.Module, str, float]] = []
    count = 0
    for name, module in model.named_modules():
        for attr, value in list(vars(module).items()):
            is_rate = (attr == "p" and is_dropout_module(module)) or ("drop" in attr.lower() and attr[0] != "_")
            if not is_rate or isinstance(value, bool) or not isinstance(value, float) or not 0.0 < value < 1.0:
                continue
            count += 1
            nudged = value + count * _NUDGE
            if nudged >= 1.0 or nudged in sources:
                continue
            setattr(module, attr, nudged)
            restore.append((module, attr, value))
            sources[nudged] = (f"{name}.{attr}" if name else attr, value)
    return sources, restore


class _DryRun:
    def __init__(self, model: nn.Module, rate_sources: Dict[float, Tuple[str, float]]) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.rate_sources = rate_sources
        self.stack: List[nn.Module] = []
        self.called: set = set()
        self.through_interface: set = set()
        self.produced_by: Dict[int, str] = {}
        self.keep_alive: List[torch.Tensor] = []
        self.consumers: Dict[str, List[ConsumerInfo]] = {}
        self.functional: Dict[Tuple[Any, str], Dict[str, Any]] = {}
        #: module name -> K of its first call (None: attention probabilities).
        self.widths: Dict[str, Optional[int]] = {}

    def remember(self, tensor: torch.Tensor, site: str) -> None:
        self.produced_by[id(tensor)] = site
        self.keep_alive.append(tensor)  # ids stay unique while the tensors live

    def pre_hook(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.stack.append(module)
        name = self.names.get(module, "")
        self.called.add(name)
        if is_dropout_module(module):
            caller = caller_frame(sys._getframe(1))
            if caller is not None and hf.called_through_attention_interface(caller):
                self.through_interface.add(name)
        if (is_dropout_module(module) or isinstance(module, ConcreteDropoutBase)) and name not in self.widths:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                attention = name in self.through_interface
                self.widths[name] = self.width(site_type_for(module), x, attention)
        if args and isinstance(args[0], torch.Tensor):
            source = self.produced_by.get(id(args[0]))
            units = module_units(module)
            if source is not None and units is not None:
                self.consumers.setdefault(source, []).append(ConsumerInfo((name,), (f"{name}.weight",), units))

    def post_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if (is_dropout_module(module) or isinstance(module, ConcreteDropoutBase)) and isinstance(output, torch.Tensor):
            self.remember(output, self.names.get(module, ""))

    def functional_call(self, func, args, kwargs, result, frame) -> None:
        owner = self.stack[-1] if self.stack else self.model
        owner_name = self.names.get(owner, "")
        caller = caller_frame(frame)
        if caller is None:
            return
        key = call_key(caller)
        bound = bind_functional(func, args, kwargs)
        p = bound.get("p")
        label = f"functional:{owner_name}:{key}"
        through_interface = hf.called_through_attention_interface(caller)
        x, previous = bound.get("input"), self.functional.get((key, owner_name))
        width = previous["width"] if previous is not None else None  # the first call's, as the site records it
        if previous is None and isinstance(x, torch.Tensor):
            width = self.width(FUNCTIONAL_DROPOUTS[func][1], x, through_interface)
        self.functional[(key, owner_name)] = {
            "func": func,
            "owner": owner_name,
            "method": owner_method(caller, owner),
            "p": p,
            "training": bound.get("training"),
            "label": label,
            "rate_holder": self.rate_sources[p][0] if isinstance(p, float) and p in self.rate_sources else None,
            "attention_interface": through_interface,
            "width": width,
        }
        if isinstance(result, torch.Tensor):
            self.remember(result, label)

    def width(self, site_type: Any, x: torch.Tensor, attention: bool) -> Optional[int]:
        """K of a dropout call on ``x`` (as the site's first forward records it); None for attention probabilities."""
        if attention or self.produced_by.get(id(x)) == _SOFTMAX:
            return None
        return site_type.feature_width(x.shape)

    def original_rate(self, p: Any) -> Optional[float]:
        """The rate a call would get in the real model (the nudge undone)."""
        if not isinstance(p, (int, float)) or isinstance(p, bool):
            return None
        source = self.rate_sources.get(p) if isinstance(p, float) else None
        return float(p) if source is None else source[1]


def _run(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(*example_inputs)


@contextlib.contextmanager
def _borrowed(model: nn.Module) -> Iterator[Dict[float, Tuple[str, float]]]:
    """The model itself, ready for a dry run, and exactly as it was afterwards (also on errors).

    The dry run borrows the model instead of a copy, so that converting a model that fills the memory does
    not need twice its size. For the duration: training mode, rates nudged (:func:`_nudge_rates`), eager
    attention for transformers models, no autograd, a forked RNG; then modes, rates, the attention
    implementation, the RNG and every buffer's values (BatchNorm statistics) are put back.

    Yields:
        The nudged rates' sources (nudged value -> (attribute path, original value)).
    """
    modes = {m: m.training for m in model.modules()}
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and not buffer.is_meta
    ]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    sources, nudges = _nudge_rates(model)
    try:
        model.train()
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), hf.eager_attention(model):
            yield sources
    finally:
        for module, attr, value in nudges:
            setattr(module, attr, value)
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)
        for module, mode in modes.items():
            module.training = mode


def confirm_with_dry_run(model: nn.Module, discovery: Discovery, example_inputs: ExampleInputs) -> None:
    """Update ``discovery`` in place from one training-mode forward pass of ``model``.

    Args:
        model: the model (borrowed, and left exactly as it was: see :func:`_borrowed`).
        discovery: what tracing / module search found.
        example_inputs: positional inputs (tuple or list) or keyword inputs (dict) for ``model``.
    """
    handles = []
    with _borrowed(model) as sources:
        run = _DryRun(model, sources)
        try:
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(run.pre_hook))
                handles.append(module.register_forward_hook(run.post_hook))
            with _Recorder(run):
                _run(model, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
    discovery.called_modules |= run.called
    discovery.method = f"{discovery.method} + dry run"
    discovery.dry_run = True
    for site in discovery.sites:
        if site.module_name and site.kind in ("module", "targeted"):  # sites called as modules
            site.called = site.module_name in run.called
            site.attention_interface = site.module_name in run.through_interface
            found = run.consumers.get(site.module_name)
            if site.consumer is None and found:
                _set_consumer(site, found)
            elif site.consumer is None and site.called:
                site.consumer_note = "no weight layer read its output in the dry run (a residual add, attention, ...)"
            if site.module_name in run.widths:
                site.units_hint = run.widths[site.module_name]
        elif site.kind == "functional" and site.key is not None:
            site.called = (site.key, site.owner) in run.functional
            if site.called:
                site.units_hint = run.functional[(site.key, site.owner)]["width"]
    known = {(s.key, s.owner) for s in discovery.sites if s.key is not None}
    for (key, owner), call in run.functional.items():
        if (key, owner) in known or call["training"] is False or call["method"] is None:
            continue
        site = FoundSite(
            kind="functional",
            owner=owner,
            site_type=FUNCTIONAL_DROPOUTS[call["func"]][1],
            p=run.original_rate(call["p"]),
            found_by="dry run",
            function=function_name(call["func"]),
            key=key,
            method=call["method"],
            rate_holder=call["rate_holder"],
            attention_interface=call["attention_interface"],
        )
        site.units_hint = call["width"]
        found = run.consumers.get(call["label"])
        if found:
            _set_consumer(site, found)
        elif call["attention_interface"]:
            site.consumer_note = ATTENTION_CONSUMER_NOTE
        else:
            site.consumer_note = "no weight layer read its output in the dry run"
        discovery.sites.append(site)


def _set_consumer(site: FoundSite, found: List[ConsumerInfo]) -> None:
    units = {c.units for c in found}
    if len(units) == 1:
        site.consumer = ConsumerInfo(
            tuple(dict.fromkeys(m for c in found for m in c.modules)),
            tuple(dict.fromkeys(w for c in found for w in c.weights)),
            units.pop(),
        )
        site.consumer_note = ""
        site.found_by = f"{site.found_by} + dry run"
