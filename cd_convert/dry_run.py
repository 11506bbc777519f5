"""One forward pass on ``example_inputs`` that confirms what discovery inferred.

Runs on a deep copy of the model (training mode, forked RNG), so the user's model, its BatchNorm statistics
and the global RNG are untouched. Forward hooks record which modules run; a ``TorchFunctionMode`` follows
tensors through data-moving ops and records functional dropout calls, so that:

* every site and targeted layer is known to be called (or not);
* sites found by module search get their consumer by tensor identity;
* functional dropout in models torch.fx cannot trace is found and attributed to its owner's method.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .callsites import FUNCTIONAL_DROPOUTS, bind_functional, call_key, caller_frame, function_name, owner_method
from .consumers import TRANSPARENT_FUNCTIONS, TRANSPARENT_METHODS, ConsumerInfo, module_units
from .discover import Discovery, FoundSite
from .layers import ConcreteDropoutBase
from .targets import is_dropout_module

_TRANSPARENT_TENSOR_METHODS = {
    getattr(torch.Tensor, name) for name in TRANSPARENT_METHODS if hasattr(torch.Tensor, name)
}


class _Recorder(TorchFunctionMode):
    def __init__(self, run: "_DryRun") -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in FUNCTIONAL_DROPOUTS:
            self.run.functional_call(func, args, kwargs, result, sys._getframe(1))
        elif (func in TRANSPARENT_FUNCTIONS or func in _TRANSPARENT_TENSOR_METHODS) and args:
            source = self.run.produced_by.get(id(args[0]))
            if source is not None and isinstance(result, torch.Tensor):
                self.run.remember(result, source)
        return result


class _DryRun:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: List[nn.Module] = []
        self.called: set = set()
        self.produced_by: Dict[int, str] = {}
        self.keep_alive: List[torch.Tensor] = []
        self.consumers: Dict[str, List[ConsumerInfo]] = {}
        self.functional: Dict[Tuple, Dict[str, Any]] = {}

    def remember(self, tensor: torch.Tensor, site: str) -> None:
        self.produced_by[id(tensor)] = site
        self.keep_alive.append(tensor)  # ids stay unique while the tensors live

    def pre_hook(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.stack.append(module)
        name = self.names.get(module, "")
        self.called.add(name)
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
        method = owner_method(caller, owner)
        bound = bind_functional(func, args, kwargs)
        label = f"functional:{owner_name}:{key}"
        self.functional[key] = {
            "func": func,
            "owner": owner_name,
            "method": method,
            "p": bound.get("p"),
            "training": bound.get("training"),
            "label": label,
        }
        if isinstance(result, torch.Tensor):
            self.remember(result, label)


def confirm_with_dry_run(model: nn.Module, discovery: Discovery, example_inputs: Sequence[Any]) -> None:
    """Update ``discovery`` in place from one training-mode forward pass of a copy of ``model``.

    Args:
        model: the model (not changed).
        discovery: what tracing / module search found.
        example_inputs: positional inputs for ``model``.
    """
    replica = copy.deepcopy(model).train()
    run = _DryRun(replica)
    handles = []
    for module in replica.modules():
        handles.append(module.register_forward_pre_hook(run.pre_hook))
        handles.append(module.register_forward_hook(run.post_hook))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _Recorder(run):
            replica(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    discovery.called_modules |= run.called
    discovery.method = f"{discovery.method} + dry run"
    for site in discovery.sites:
        if site.module_name and site.kind == "module":
            site.called = site.module_name in run.called
            found = run.consumers.get(site.module_name)
            if site.consumer is None and found:
                _set_consumer(site, found)
        elif site.kind == "functional" and site.key is not None:
            site.called = site.key in run.functional
    known = {s.key for s in discovery.sites if s.key is not None}
    for key, call in run.functional.items():
        if key in known or call["training"] is False or call["method"] is None:
            continue
        site = FoundSite(
            kind="functional",
            owner=call["owner"],
            site_type=FUNCTIONAL_DROPOUTS[call["func"]][1],
            p=float(call["p"]) if isinstance(call["p"], (int, float)) else None,
            found_by="dry run",
            function=function_name(call["func"]),
            key=key,
            method=call["method"],
        )
        found = run.consumers.get(call["label"])
        if found:
            _set_consumer(site, found)
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
