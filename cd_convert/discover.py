"""Finding dropout sites, their owners and their consumers.

Discovery traces the model with ``torch.fx`` (dropout modules, ``nn.MultiheadAttention`` and recurrent
layers are leaves; everything else is traced through) and reads the graph:

* ``call_module`` of an ``nn.Dropout*``: a *module* site (one per call; a module called twice gives two
  applications of one learned rate);
* ``call_function`` of ``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout``, ``torch.feature_dropout``
  (and their in-place forms): a *functional* site, identified by the code location of the call;
* ``F.scaled_dot_product_attention(dropout_p=...)``, ``nn.MultiheadAttention(dropout=...)``: *fused* sites;
* ``nn.LSTM/GRU/RNN(dropout=...)``: reported as unsupported (the dropout is inside the fused kernel).

The consumer of a site is the weight layer that reads its output (:mod:`cd_convert.consumers`); call
locations of functional dropout are keyed as in :mod:`cd_convert.callsites`.

Modules that cannot be traced through (data-dependent control flow, or leaves such as
``nn.TransformerEncoderLayer``) are searched module by module instead, and an optional dry run on
``example_inputs`` confirms which sites run and which layer consumes each (by tensor identity).
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple, Type

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .callsites import (
    FUNCTIONAL_DROPOUTS,
    bind_functional,
    call_key,
    caller_frame,
    function_name,
    owner_method,
)
from .consumers import ConsumerInfo, find_consumer
from .found import Discovery, Finding, FoundSite
from .layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d, ConcreteDropoutBase
from .targets import DROPOUT_TYPES, is_dropout_module

#: Module type -> concrete site type.
MODULE_SITE_TYPES: Dict[Type[nn.Module], Type[ConcreteDropoutBase]] = {
    nn.Dropout: ConcreteDropout,
    nn.Dropout1d: ConcreteDropout1d,
    nn.Dropout2d: ConcreteDropout2d,
    nn.Dropout3d: ConcreteDropout3d,
}

#: Regularisation-free noise layers: left alone, listed in the report.
NON_SITE_NAMES = ("DropPath", "StochasticDepth", "DropBlock", "AlphaDropout", "FeatureAlphaDropout", "DropConnect")
NON_SITE_FUNCTIONS = {F.alpha_dropout: "F.alpha_dropout", F.feature_alpha_dropout: "F.feature_alpha_dropout"}


class SiteTracer(fx.Tracer):
    """An fx tracer that keeps dropout modules, attention and RNNs as leaves and records call locations.

    Args:
        leaf_modules: extra module types to keep as leaves (e.g. timm's notrace modules).
        autowrap_functions: functions to record as single nodes instead of tracing into them.
    """

    def __init__(self, leaf_modules: Sequence[type] = (), autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(autowrap_functions))
        self.extra_leaves = tuple(leaf_modules)
        self.leaf_names: Set[str] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, ConcreteDropoutBase) or isinstance(m, DROPOUT_TYPES):
            leaf = True
        elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase, nn.Linear, nn.modules.conv._ConvNd)) or isinstance(
            m, self.extra_leaves
        ):
            # Weight layers (subclasses included) stay single nodes so that they can be seen as consumers.
            leaf = True
        else:
            leaf = super().is_leaf_module(m, module_qualified_name)
        if leaf and any(True for _ in m.children()):
            self.leaf_names.add(module_qualified_name)
        return leaf

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **extra):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **extra)
        if kind == "call_function" and (target in FUNCTIONAL_DROPOUTS or target is F.scaled_dot_product_attention):
            frame = caller_frame(sys._getframe(1))
            if frame is not None:
                owner = self._current_owner()
                proxy.node.meta["cd_call_key"] = call_key(frame)
                proxy.node.meta["cd_method"] = owner_method(frame, owner)
        return proxy

    def _current_owner(self) -> Optional[nn.Module]:
        stack = getattr(self, "module_stack", None)
        if not stack:
            return self.root
        path = list(stack.values())[-1][0]
        try:
            return self.root.get_submodule(path) if path else self.root
        except AttributeError:
            return None


def _node_owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _const_float(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def is_non_site_module(module: nn.Module) -> bool:
    """Noise layers that are not dropout sites (drop-path, stochastic depth, alpha dropout)."""
    return any(part in type(module).__name__ for part in NON_SITE_NAMES)


def trace_graph(
    model: nn.Module, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable]
) -> Tuple[fx.Graph, SiteTracer]:
    """Trace ``model`` in training mode (so ``training=self.training`` branches are taken), restoring modes.

    Args:
        model: the model.
        leaf_modules: extra leaf module types.
        autowrap_functions: functions to keep as single nodes.

    Returns:
        The graph and the tracer (which knows the leaf modules that have children).
    """
    modes = {m: m.training for m in model.modules()}
    # A converted model's routed methods are set aside so the trace sees the original dropout calls.
    from .interception import INTERCEPTOR_ATTR

    routed = {m: {name: m.__dict__.pop(name) for name in m.__dict__.get(INTERCEPTOR_ATTR, {})} for m in model.modules()}
    tracer = SiteTracer(leaf_modules, autowrap_functions)
    try:
        model.train()
        graph = tracer.trace(model, concrete_args=_default_arguments(model))
    finally:
        for module, mode in modes.items():
            module.training = mode
        for module, methods in routed.items():
            module.__dict__.update(methods)
    return graph, tracer


def _default_arguments(model: nn.Module) -> Optional[Dict[str, Any]]:
    """forward's optional arguments held at their defaults while tracing.

    Traced as placeholders they would be Proxies, and code such as ``if mask is None:`` would take the
    branch the model does not take when called as ``model(x)`` (timm's hiera loses its head that way).
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    defaults = {
        p.name: p.default
        for p in parameters[1:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return defaults or None


def discover(
    model: nn.Module,
    *,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[Callable] = (),
    example_inputs: Optional[Any] = None,
) -> Discovery:
    """Find every dropout application in ``model``.

    Args:
        model: the model (not changed; its train/eval modes are restored).
        leaf_modules: module types not to trace into (their inner dropouts are found by module search).
        autowrap_functions: functions the tracer should not trace into.
        example_inputs: optional inputs (a tuple of positional or a dict of keyword arguments) for a dry run
            that confirms called-ness and consumers.

    Returns:
        A :class:`Discovery`.
    """
    discovery = Discovery()
    try:
        graph, tracer = trace_graph(model, leaf_modules, autowrap_functions)
    except Exception as err:  # torch.fx raises many types; any failure means "fall back"
        discovery.method = "module search"
        discovery.trace_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        _module_search(model, discovery, within=None)
    else:
        discovery.leaves = set(tracer.leaf_names)
        _read_graph(model, graph, discovery)
        inner = [name for name in discovery.leaves if _has_dropout_inside(model.get_submodule(name))]
        if inner:
            discovery.method = "fx + module search"
            for name in sorted(inner):
                _module_search(model, discovery, within=name)
    if example_inputs is not None:
        from .dry_run import confirm_with_dry_run

        confirm_with_dry_run(model, discovery, example_inputs)
    return discovery


def _has_dropout_inside(module: nn.Module) -> bool:
    """Whether a leaf module holds dropout (or attention / RNN) modules that the trace cannot see."""
    return any(
        is_dropout_module(m) or isinstance(m, (ConcreteDropoutBase, nn.MultiheadAttention, nn.RNNBase))
        for m in module.modules()
        if m is not module
    )


def _read_graph(model: nn.Module, graph: fx.Graph, discovery: Discovery) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    for node in graph.nodes:
        if node.op == "call_module":
            discovery.called_modules.add(node.target)
            module = modules.get(node.target)
            if module is None:
                continue
            if isinstance(module, ConcreteDropoutBase) or is_dropout_module(module):
                _add_module_site(discovery, node, module, modules, model)
            elif isinstance(module, nn.MultiheadAttention):
                _add_mha(discovery, node.target, module, "fx")
            elif isinstance(module, nn.RNNBase):
                _add_rnn(discovery, node.target, module)
            elif is_non_site_module(module):
                discovery.findings.append(
                    Finding(node.target, "not a dropout site", f"{type(module).__name__} is left as it is")
                )
        elif node.op == "call_function":
            if node.target in FUNCTIONAL_DROPOUTS:
                _add_functional_site(discovery, node, modules, model)
            elif node.target is F.scaled_dot_product_attention:
                _add_sdpa(discovery, node, modules, model)
            elif node.target in NON_SITE_FUNCTIONS:
                discovery.findings.append(
                    Finding(
                        _node_owner(node) or "<root>",
                        "not a dropout site",
                        f"{NON_SITE_FUNCTIONS[node.target]} is left as it is",
                    )
                )
    # Non-site noise modules that are traced through (e.g. timm DropPath) never appear as call_module.
    for name, module in model.named_modules():
        if is_non_site_module(module) and not any(f.name == name for f in discovery.findings):
            discovery.findings.append(Finding(name, "not a dropout site", f"{type(module).__name__} is left as it is"))


def _add_module_site(
    discovery: Discovery, node: fx.Node, module: nn.Module, modules: Dict[str, nn.Module], root: nn.Module
) -> None:
    consumer, note = find_consumer(node, modules, root)
    site_type = type(module) if isinstance(module, ConcreteDropoutBase) else _site_type_for(module)
    p = _original_rate(module)
    discovery.sites.append(
        FoundSite(
            kind="module",
            owner=node.target.rpartition(".")[0],
            module_name=node.target,
            site_type=site_type,
            p=p,
            found_by="fx",
            consumer=consumer,
            consumer_note=note,
        )
    )


def _original_rate(module: nn.Module) -> float:
    """The rate a dropout module applies now (a concrete site's current p)."""
    return float(module.p.detach()) if isinstance(module, ConcreteDropoutBase) else float(module.p)


def _fused_attention_site(owner: str, name: str, module: nn.Module, found_by: str, called: Optional[bool]) -> FoundSite:
    """The site of a timm-style attention module whose dropout module's rate is passed into fused attention."""
    return FoundSite(
        kind="fused",
        owner=owner,
        module_name=name,
        site_type=_site_type_for(module),
        p=_original_rate(module),
        found_by=found_by,
        consumer=None,
        consumer_note="attention probabilities are multiplied by values, not by a weight",
        fused_op="scaled_dot_product_attention",
        called=called,
        notes=[
            "attention takes its explicit path (fused_attn=False) while the site is active (training, MC prediction); "
            "that costs the memory of the attention matrix. In eval the fused kernel runs as before"
        ],
    )


def _site_type_for(module: nn.Module) -> Type[ConcreteDropoutBase]:
    for klass in type(module).__mro__:
        if klass in MODULE_SITE_TYPES:
            return MODULE_SITE_TYPES[klass]
    return ConcreteDropout


def _add_functional_site(discovery: Discovery, node: fx.Node, modules: Dict[str, nn.Module], root: nn.Module) -> None:
    bound = bind_functional(node.target, node.args, node.kwargs)
    owner = _node_owner(node)
    name = function_name(node.target)
    training = bound.get("training")
    p = _const_float(bound.get("p"))
    if training is False:
        discovery.findings.append(Finding(owner or "<root>", "not applied", f"{name}(training=False) never drops"))
        return
    key = node.meta.get("cd_call_key")
    method = node.meta.get("cd_method")
    consumer, note = find_consumer(node, modules, root)
    site = FoundSite(
        kind="functional",
        owner=owner,
        site_type=FUNCTIONAL_DROPOUTS[node.target][1],
        p=p,
        found_by="fx",
        consumer=consumer,
        consumer_note=note,
        function=name,
        key=key,
        method=method,
    )
    if bound.get("inplace") and not node.users:
        site.notes.append("in-place call whose result is unused: the concrete site returns a new tensor")
    if key is None or method is None:
        site.notes.append("call location could not be attributed to a method of its owner")
    discovery.sites.append(site)


def _add_sdpa(discovery: Discovery, node: fx.Node, modules: Dict[str, nn.Module], root: nn.Module) -> None:
    dropout_p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    owner_name = _node_owner(node)
    owner = modules.get(owner_name, root if owner_name == "" else None)
    p = _const_float(dropout_p)
    if isinstance(dropout_p, fx.Node):
        p = None
    attn_drop = _matching_dropout_child(owner, p) if owner is not None else None
    if owner is not None and hasattr(owner, "fused_attn") and attn_drop is not None:
        # timm-style attention: the module has an explicit path that calls its dropout module.
        child_name, child = attn_drop
        full = f"{owner_name}.{child_name}" if owner_name else child_name
        discovery.sites.append(_fused_attention_site(owner_name, full, child, "fx", called=True))
        return
    if p == 0.0:
        return  # a literal dropout_p=0: no dropout to convert
    discovery.sites.append(
        FoundSite(
            kind="fused",
            owner=owner_name,
            site_type=ConcreteDropout,
            p=p,
            found_by="fx",
            consumer=None,
            consumer_note="attention probabilities are multiplied by values, not by a weight",
            function="F.scaled_dot_product_attention",
            key=node.meta.get("cd_call_key"),
            method=node.meta.get("cd_method"),
            fused_op="scaled_dot_product_attention",
            notes=["computed as explicit attention (softmax, concrete dropout, matmul) in training"],
        )
    )


def _matching_dropout_child(owner: nn.Module, p: Optional[float]) -> Optional[Tuple[str, nn.Module]]:
    candidates = [
        (n, m) for n, m in owner.named_children() if is_dropout_module(m) or isinstance(m, ConcreteDropoutBase)
    ]
    if p is not None:
        same = [(n, m) for n, m in candidates if isinstance(m, DROPOUT_TYPES) and math.isclose(float(m.p), p)]
        candidates = same or candidates
    preferred = [c for c in candidates if "attn" in c[0]]
    pool = preferred or candidates
    return pool[0] if len(pool) >= 1 and (len(pool) == 1 or preferred) else None


def _add_mha(discovery: Discovery, name: str, module: nn.MultiheadAttention, found_by: str) -> None:
    existing = getattr(module, "concrete_attn_dropout", None)
    if module.dropout <= 0.0 and existing is None:
        return
    p = float(existing.p.detach()) if existing is not None else float(module.dropout)
    discovery.sites.append(
        FoundSite(
            kind="fused",
            owner=name,
            site_type=ConcreteDropout,
            p=p,
            found_by=found_by,
            consumer=None,
            consumer_note="attention weights are multiplied by values, not by a weight",
            fused_op="MultiheadAttention",
            method="forward",
            notes=["nn.MultiheadAttention's attention dropout applied by a concrete site inside its forward"],
        )
    )


def _add_rnn(discovery: Discovery, name: str, module: nn.RNNBase) -> None:
    if module.dropout > 0 and module.num_layers > 1:
        discovery.findings.append(
            Finding(
                name,
                "unsupported",
                f"{type(module).__name__}(dropout={module.dropout}) drops between layers inside the fused RNN kernel; "
                "no concrete site can be placed there, so it keeps its fixed rate. Use separate single-layer RNNs "
                "with nn.Dropout between them to learn that rate.",
            )
        )


#: Consumers inside torch.nn's transformer layers, which torch.fx cannot trace: dropout -> weight layer.
_KNOWN_LAYOUTS: Dict[type, Dict[str, Optional[str]]] = {
    nn.TransformerEncoderLayer: {"dropout": "linear2", "dropout1": None, "dropout2": None},
    nn.TransformerDecoderLayer: {"dropout": "linear2", "dropout1": None, "dropout2": None, "dropout3": None},
}


def _module_search(model: nn.Module, discovery: Discovery, within: Optional[str]) -> None:
    """Module-level search of dropout modules (whole model, or inside one leaf)."""
    root = model.get_submodule(within) if within else model
    prefix = f"{within}." if within else ""
    found_by = "module search"
    known = {s.module_name for s in discovery.sites if s.module_name}
    for rel, module in root.named_modules():
        name = prefix + rel if rel else (within or "")
        if name in known:
            continue
        if isinstance(module, ConcreteDropoutBase) or is_dropout_module(module):
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            if hasattr(parent, "fused_attn") and _matching_dropout_child(parent, None) == (
                name.rpartition(".")[2],
                module,
            ):
                # timm-style attention reads this module's rate into fused attention instead of calling it.
                discovery.sites.append(_fused_attention_site(parent_name, name, module, found_by, called=None))
                continue
            consumer, note = _known_consumer(model, name)
            discovery.sites.append(
                FoundSite(
                    kind="module",
                    owner=name.rpartition(".")[0],
                    module_name=name,
                    site_type=type(module) if isinstance(module, ConcreteDropoutBase) else _site_type_for(module),
                    p=_original_rate(module),
                    found_by=found_by,
                    consumer=consumer,
                    consumer_note=note,
                    called=None,
                )
            )
        elif isinstance(module, nn.MultiheadAttention):
            _add_mha(discovery, name, module, found_by)
            if discovery.sites and discovery.sites[-1].owner == name:
                discovery.sites[-1].called = None
        elif isinstance(module, nn.RNNBase):
            _add_rnn(discovery, name, module)
        elif is_non_site_module(module):
            discovery.findings.append(Finding(name, "not a dropout site", f"{type(module).__name__} is left as it is"))


def _known_consumer(model: nn.Module, name: str) -> Tuple[Optional[ConsumerInfo], str]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for klass, layout in _KNOWN_LAYOUTS.items():
        if isinstance(parent, klass) and attr in layout:
            target = layout[attr]
            if target is None:
                return None, f"output goes to a residual add in {klass.__name__}"
            layer = getattr(parent, target)
            full = f"{parent_name}.{target}" if parent_name else target
            return ConsumerInfo((full,), (f"{full}.weight",), layer.in_features), ""
    return None, "found by module search: consumer unknown (pass example_inputs for a dry run)"
