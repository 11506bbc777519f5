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
  or a call inside an attention interface) are left out: their width is the key length, not a feature;
* ``scaled_dot_product_attention`` calls with ``dropout_p > 0`` that torch.fx could not see become fused
  sites, like the ones a trace finds;
* every fixed-rate mask drawn outside the forms above is reported (:mod:`cd_convert.mask_audit`), so that
  dropout written another way is listed as unsupported instead of silently keeping its rate;
* dropout whose output never reaches what the model returns (LiLT's last layout stream) is found
  (:mod:`cd_convert.reach`): a site there would get no gradient from the data, so it is left as it is.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .callsites import FUNCTIONAL_DROPOUTS, bind_functional, call_key, caller_frame, function_name, owner_method
from .consumers import TRANSPARENT_FUNCTIONS, TRANSPARENT_METHODS, ConsumerInfo, module_units
from .found import Discovery, Finding, FoundSite
from .integrations import transformers as hf
from .layers import ConcreteDropout, ConcreteDropoutBase
from .mask_audit import FixedMask, MaskAudit
from .reach import OutputReach
from .sites.attention import SDPA_ARGUMENTS
from .sites.attention_function import ATTENTION_FUNCTION, FUSED_OP, attention_function_rate
from .sites.base import ATTENTION_CONSUMER_NOTE, site_type_for
from .sites.non_sites import NON_SITE_FUNCTIONS, is_non_site_module
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
#: Attention functions taking a dropout rate: (report name, fused op of the site it becomes).
_SDPA = ("F.scaled_dot_product_attention", "scaled_dot_product_attention")
_MHA_FUNCTION = ("F.multi_head_attention_forward", FUSED_OP)
_SDPA_NOTE = "computed as explicit attention (softmax, concrete dropout, matmul) in training"
#: Calls whose masks are dropout in a form discovery recognises (converted, or reported by their own kind).
_KNOWN_MASK_FUNCTIONS = frozenset(
    {*FUNCTIONAL_DROPOUTS, *NON_SITE_FUNCTIONS, F.scaled_dot_product_attention, ATTENTION_FUNCTION}
)
#: Modules whose own code draws masks that their kind of site converts or reports (fused in torch's code).
_KNOWN_MASK_MODULES = (nn.MultiheadAttention, nn.RNNBase)


class _Recorder(TorchFunctionMode):
    def __init__(self, run: "_DryRun") -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Masks drawn inside a recognised call belong to it (see _DryRun.accounted).
        known = func in _KNOWN_MASK_FUNCTIONS
        self.run.known_calls += known
        try:
            result = func(*args, **kwargs)
        finally:
            self.run.known_calls -= known
        self.run.reach.propagate(func, args, kwargs, result)
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(SDPA_ARGUMENTS, args), **kwargs)
            self.run.attention_call(bound.get("dropout_p", 0.0), True, _SDPA, sys._getframe(1), result)
        elif func is ATTENTION_FUNCTION:
            p, training = attention_function_rate(args, kwargs)
            self.run.attention_call(p, training, _MHA_FUNCTION, sys._getframe(1), result)
        elif func in FUNCTIONAL_DROPOUTS:
            self.run.functional_call(func, args, kwargs, result, sys._getframe(1))
        elif func in _SOFTMAX_FUNCTIONS and isinstance(result, torch.Tensor):
            self.run.remember(result, _SOFTMAX)
        elif (func in TRANSPARENT_FUNCTIONS or func in _TRANSPARENT_TENSOR_METHODS) and args:
            source = self.run.produced_by.get(id(args[0]))
            if source is not None and isinstance(result, torch.Tensor):
                self.run.remember(result, source)
        return result


class _TaggedZero(float):
    """A rate of 0 that knows which attribute it was read from.

    A rate of 0 cannot be nudged (code such as ``if self.drop_rate:`` must take the branch it takes in the real
    model), so it is tagged instead: still 0.0 for every comparison and operation, it carries its attribute path
    to the call that receives it (torchvision's Swin passes ``self.attention_dropout = 0.0`` into its attention
    function). Arithmetic on it gives a plain float, and then the source is unknown, as for a nudged rate.
    """

    source: str

    def __new__(cls, source: str) -> "_TaggedZero":
        rate = super().__new__(cls, 0.0)
        rate.source = source
        return rate


#: ``(object, attribute, original value)`` of each rate :func:`_nudge_rates` changed on an object that is not a
#: module (a config), for :func:`_borrowed` to put back.
_ConfigRates = List[Tuple[Any, str, Any]]


def _nudge_rates(model: nn.Module, config_rates: _ConfigRates) -> Dict[float, Tuple[str, float]]:
    """Give every nonzero dropout-rate attribute of ``model`` a value of its own, and tag every rate of 0.

    Candidates are the ``p`` of dropout modules and float attributes whose name contains "drop", of the modules
    and of the configuration objects they hold (an attribute whose name contains "config" or "cfg" holding a plain
    object: ProphetNet's code reads ``self.config.dropout`` at each call). Rates of 0 stay 0 (code such as ``if
    self.drop_rate:`` must take the branch it takes in the real model) but become a :class:`_TaggedZero` that
    names its attribute.

    Args:
        model: the model (changed in place; :func:`_borrowed` puts every attribute back).
        config_rates: filled with what was changed on configuration objects (module attributes are put back
            with the modules' state).

    Returns:
        nudged value -> (``"module.path.attribute"``, original value).
    """
    sources: Dict[float, Tuple[str, float]] = {}
    seen_configs: set = set()
    count = 0

    def nudge(holder: Any, attr: str, value: Any, path: str) -> bool:
        nonlocal count
        if isinstance(value, bool) or not isinstance(value, float):
            return False
        if value == 0.0:
            return _set(holder, attr, _TaggedZero(path))
        if not 0.0 < value < 1.0:
            return False
        count += 1
        nudged = value + count * _NUDGE
        if nudged >= 1.0 or nudged in sources or not _set(holder, attr, nudged):
            return False
        sources[nudged] = (path, value)
        return True

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, value in list(vars(module).items()):
            if _is_config(attr, value) and id(value) not in seen_configs:
                seen_configs.add(id(value))
                for rate_attr, rate in list(vars(value).items()):
                    if _is_rate_name(rate_attr) and nudge(value, rate_attr, rate, f"{prefix}{attr}.{rate_attr}"):
                        config_rates.append((value, rate_attr, rate))
                continue
            if (attr == "p" and is_dropout_module(module)) or _is_rate_name(attr):
                nudge(module, attr, value, f"{prefix}{attr}")
    return sources


def _is_rate_name(attr: str) -> bool:
    """Whether an attribute's name marks it as a candidate dropout rate (``dropout``, ``attention_dropout``, ...)."""
    return "drop" in attr.lower() and attr[0] != "_"


def _is_config(attr: str, value: Any) -> bool:
    """Whether a module attribute holds a configuration object whose rates the module's code may read."""
    name = attr.lower()
    if "config" not in name and "cfg" not in name:
        return False
    if isinstance(value, (nn.Module, torch.Tensor, type)) or callable(value):
        return False
    return hasattr(value, "__dict__")


def _set(holder: Any, attr: str, value: Any) -> bool:
    """``setattr`` that reports failure instead of raising (a configuration class may validate assignments)."""
    try:
        setattr(holder, attr, value)
    except Exception:  # noqa: BLE001 - a rate that cannot be nudged is one the pass cannot trace, nothing more
        return False
    return True


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
        #: (call location, owner name) -> the call, for attention calls with dropout_p > 0 (SDPA, torch's MHA function).
        self.attention: Dict[Tuple[Any, str], Dict[str, Any]] = {}
        #: How many recognised dropout calls are running (their masks are accounted for).
        self.known_calls = 0
        #: (owner name, location) -> the first fixed-rate mask drawn there outside every recognised form.
        self.fixed_masks: Dict[Tuple[str, str], FixedMask] = {}
        #: Which dropout outputs reach the model's outputs: labels are module names and ``call_label`` tuples.
        self.reach = OutputReach()
        #: owner name -> the labels of the attention calls it made (any rate).
        self.attention_labels: Dict[str, Set[Hashable]] = {}

    def accounted(self) -> bool:
        """Whether a mask drawn now belongs to a recognised form of dropout (or a reported non-site)."""
        if self.known_calls:
            return True
        if not self.stack:
            return False
        inner = self.stack[-1]
        if is_dropout_module(inner) or isinstance(inner, ConcreteDropoutBase) or is_non_site_module(inner):
            return True
        return any(isinstance(m, _KNOWN_MASK_MODULES) for m in self.stack)

    def fixed_mask(self, mask: FixedMask) -> None:
        """Record a mask drawn outside every recognised form (the first one per owner and code location)."""
        owner = self.names.get(self.stack[-1], "") if self.stack else ""
        self.fixed_masks.setdefault((owner, mask.location), mask)

    def attention_call(self, p: Any, training: bool, function: Tuple[str, str], frame: Any, result: Any) -> None:
        """Record a training-mode attention call with a nonzero dropout rate.

        Args:
            p: the call's ``dropout_p``.
            training: its training flag (``F.multi_head_attention_forward`` drops nothing without it).
            function: the function's report name and the fused op it becomes (``_SDPA``, ``_MHA_FUNCTION``).
            frame: the frame that made the call (or a frame of torch's below it).
            result: what the call returned (its output is the site's).
        """
        caller = caller_frame(frame)
        if caller is None:
            return
        owner = self.stack[-1] if self.stack else self.model
        owner_name = self.names.get(owner, "")
        key = call_key(caller)
        # Every call is labelled, whatever its rate: a rate-0 call can still be a site (include_zero_rate).
        label = call_label(key, owner_name)
        self.reach.mark(result, label)
        self.attention_labels.setdefault(owner_name, set()).add(label)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0.0 or not training:
            return
        self.attention.setdefault(
            (key, owner_name),
            {
                "owner": owner_name,
                "method": owner_method(caller, owner),
                "p": p,
                "rate_holder": self.rate_holder(p),
                "function": function,
            },
        )

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
            name = self.names.get(module, "")
            self.remember(output, name)
            self.reach.mark(output, name, in_place=bool(getattr(module, "inplace", False)))

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
            "rate_holder": self.rate_holder(p),
            "attention_interface": through_interface,
            "width": width,
        }
        if isinstance(result, torch.Tensor):
            self.remember(result, label)
            self.reach.mark(result, call_label(key, owner_name), in_place=bool(bound.get("inplace", False)))

    def width(self, site_type: Any, x: torch.Tensor, attention: bool) -> Optional[int]:
        """K of a dropout call on ``x`` (as the site's first forward records it); None for attention probabilities."""
        if attention or self.produced_by.get(id(x)) == _SOFTMAX:
            return None
        return site_type.feature_width(x.shape)

    def rate_holder(self, p: Any) -> Optional[str]:
        """The attribute a call's rate was read from (``"module.path.attribute"``), when the pass can tell."""
        if isinstance(p, _TaggedZero):
            return p.source
        return self.rate_sources[p][0] if isinstance(p, float) and p in self.rate_sources else None

    def original_rate(self, p: Any) -> Optional[float]:
        """The rate a call would get in the real model (the nudge undone)."""
        if not isinstance(p, (int, float)) or isinstance(p, bool):
            return None
        source = self.rate_sources.get(p) if isinstance(p, float) else None
        return float(p) if source is None else source[1]


def call_label(key: Any, owner: str) -> Tuple[str, Any, str]:
    """The :class:`~cd_convert.reach.OutputReach` label of a dropout or attention call (module sites use their name)."""
    return ("call", key, owner)


def _run(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(*example_inputs)


#: What :func:`_module_state` keeps of a module: its own attributes, then its registered children, parameters
#: and buffers (each a name -> object dict, copied).
_ModuleState = Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], Dict[str, Any]]


def _registries(module: nn.Module) -> _ModuleState:
    return module.__dict__, module._modules, module._parameters, module._buffers


def _module_state(module: nn.Module) -> _ModuleState:
    """Shallow copies of a module's attribute dict and of its children, parameters and buffers dicts."""
    return tuple(dict(registry) for registry in _registries(module))  # type: ignore[return-value]


def _restore_module_state(module: nn.Module, state: _ModuleState) -> None:
    """Put back every entry of :func:`_module_state` that was replaced, added or removed (by identity)."""
    for current, saved in zip(_registries(module), state):
        if current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items()):
            current.clear()
            current.update(saved)


@contextlib.contextmanager
def _borrowed(model: nn.Module) -> Iterator[Dict[float, Tuple[str, float]]]:
    """The model itself, ready for a dry run, and exactly as it was afterwards (also on errors).

    The dry run borrows the model instead of a copy, so that converting a model that fills the memory does
    not need twice its size. For the duration: training mode, rates nudged (:func:`_nudge_rates`), no
    autograd, a forked RNG; then modes, rates, the RNG and every buffer's values (BatchNorm statistics) are
    put back. (Eager attention for the main pass is :func:`cd_convert.integrations.transformers.eager_attention`,
    which restores the implementation itself.)

    Yields:
        The nudged rates' sources (nudged value -> (attribute path, original value)).
    """
    # Every module's attributes (its mode, the rates nudged below) and registered children, parameters and
    # buffers are put back by identity afterwards: that also undoes what the forward changes in the model itself
    # (BigBird switches to full attention on short inputs, swapping in new attention modules).
    states = [(module, _module_state(module)) for module in model.modules()]
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and not buffer.is_meta
    ]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    config_rates: _ConfigRates = []
    try:
        sources = _nudge_rates(model, config_rates)
        model.train()
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield sources
    finally:
        for holder, attr, value in reversed(config_rates):
            _set(holder, attr, value)
        for module, state in states:
            _restore_module_state(module, state)
        with torch.no_grad():  # the buffers' values, which the forward may update in place (BatchNorm)
            for _, _, buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def _hooked(model: nn.Module, run: _DryRun) -> Iterator[None]:
    """``run``'s forward pre- and post-hooks on every module of ``model`` for the duration."""
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(run.pre_hook))
            handles.append(module.register_forward_hook(run.post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _native_pass(
    model: nn.Module, sources: Dict[float, Tuple[str, float]], example_inputs: ExampleInputs
) -> Optional[_DryRun]:
    """A pass with the model's own attention implementation, recording which modules and dropout calls run.

    Attention modules of transformers may choose their path by the configured implementation in their own code
    (Falcon's ALiBi attention passes ``self.attention_dropout.p`` into ``scaled_dot_product_attention`` and calls
    the module only on its eager path). The main pass forces eager attention; comparing it with this one finds
    the dropout that only the eager path applies, whose sites then need eager attention while active.

    Returns:
        The pass's record, or None when the implementation cannot run here (flash attention on the CPU).
    """
    native = _DryRun(model, sources)
    rng = torch.get_rng_state()
    try:
        with _hooked(model, native), _Recorder(native):
            _run(model, example_inputs)
    except Exception:  # the main pass, on eager attention, reports any failure of the model itself
        return None
    finally:
        torch.set_rng_state(rng)  # the main pass draws what it would have drawn alone
    return native


def _mark_eager_only(run: _DryRun, native: _DryRun) -> None:
    """Count the dropout that only forced eager attention applied as attention-interface dropout.

    A dropout module (or functional call) is eager-only when the main pass ran it and the native pass did not,
    although the native pass ran the module that holds it (so a layer skipped at random, LayerDrop, is not
    mistaken for one).
    """
    for name in run.called - native.called:
        parent = name.rpartition(".")[0]
        module = run.model.get_submodule(name)
        if is_dropout_module(module) and parent in native.called:
            run.through_interface.add(name)
    for key, call in run.functional.items():
        if key not in native.functional and call["owner"] in native.called:
            call["attention_interface"] = True


def confirm_with_dry_run(model: nn.Module, discovery: Discovery, example_inputs: ExampleInputs) -> None:
    """Update ``discovery`` in place from one training-mode forward pass of ``model``.

    Args:
        model: the model (borrowed, and left exactly as it was: see :func:`_borrowed`).
        discovery: what tracing / module search found.
        example_inputs: positional inputs (tuple or list) or keyword inputs (dict) for ``model``.
    """
    with _borrowed(model) as sources:
        native = None if hf.attention_is_eager(model) else _native_pass(model, sources, example_inputs)
        run = _DryRun(model, sources)
        with hf.eager_attention(model), _hooked(model, run), _Recorder(run), MaskAudit(run.accounted, run.fixed_mask):
            output = _run(model, example_inputs)
        unused = run.reach.unused(output)
        del output
    if native is not None:
        _mark_eager_only(run, native)
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
            site.output_unused = site.kind == "module" and site.called and site.module_name in unused
        elif site.kind == "functional" and site.key is not None:
            site.called = (site.key, site.owner) in run.functional
            site.output_unused = call_label(site.key, site.owner) in unused
            if site.called:
                call = run.functional[(site.key, site.owner)]
                site.units_hint = call["width"]
                # torch.fx sees a call's rate as a constant: where it is read from is known from the pass only.
                site.rate_holder = site.rate_holder or call["rate_holder"]
        elif site.kind == "fused" and site.key is not None and (site.key, site.owner) in run.attention:
            # The same for an attention call torch.fx found: by value alone, AST's attention_probs_dropout_prob
            # could not be told from its unused dropout module's p, and freeze would have nowhere to write.
            site.called = True
            site.rate_holder = site.rate_holder or run.attention[(site.key, site.owner)]["rate_holder"]
            site.output_unused = call_label(site.key, site.owner) in unused
        elif site.kind == "fused" and site.key is None:
            # An attention module's own fused dropout (nn.MultiheadAttention, a dropout module's rate passed into
            # SDPA): unused when every attention call the module made is.
            labels = run.attention_labels.get(site.owner, set())
            site.output_unused = bool(labels) and labels <= unused
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
            output_unused=call_label(key, owner) in unused,
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
    _add_attention_sites(discovery, run, unused)
    _add_fixed_mask_findings(discovery, run)


def _add_attention_sites(discovery: Discovery, run: _DryRun, unused: Set[Hashable]) -> None:
    """Fused sites for the ``scaled_dot_product_attention`` calls with dropout that discovery had not found."""
    known = {(s.key, s.owner) for s in discovery.sites if s.key is not None}
    # An attention module whose dropout module's rate is passed into the kernel is already a site (no key).
    fused_owners = {s.owner for s in discovery.sites if s.kind == "fused" and s.key is None}
    for (key, owner), call in run.attention.items():
        if (key, owner) in known or owner in fused_owners or call["method"] is None:
            continue
        discovery.sites.append(
            FoundSite(
                kind="fused",
                owner=owner,
                site_type=ConcreteDropout,
                p=run.original_rate(call["p"]),
                found_by="dry run",
                consumer_note=ATTENTION_CONSUMER_NOTE,
                function=call["function"][0],
                key=key,
                method=call["method"],
                fused_op=call["function"][1],
                rate_holder=call["rate_holder"],
                notes=[] if call["function"] is _MHA_FUNCTION else [_SDPA_NOTE],
                output_unused=call_label(key, owner) in unused,
            )
        )


def _add_fixed_mask_findings(discovery: Discovery, run: _DryRun) -> None:
    """A finding for each fixed-rate mask drawn outside every recognised form of dropout."""
    for (owner, _), mask in run.fixed_masks.items():
        name = owner or "<root>"
        if mask.per_example:
            detail = f"a per-example mask ({mask.describe()}): stochastic depth or drop-path, left as it is"
            discovery.findings.append(Finding(name, "not a dropout site", detail))
            continue
        detail = (
            f"a fixed-rate mask ({mask.describe()}) is drawn outside the forms of dropout cd_convert converts "
            "(nn.Dropout* modules, F.dropout calls, dropout_p of scaled_dot_product_attention), so it keeps its "
            "fixed rate. To learn that rate, apply the dropout with nn.Dropout or F.dropout in the model's code"
        )
        discovery.findings.append(Finding(name, "unsupported", detail))


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
