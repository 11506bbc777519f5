"""Finding dropout sites, their owners and their consumers: the traversal, generic over the kinds of site.

Discovery traces the model with ``torch.fx`` in training mode (modules that are or hold sites, and weight
layers, are leaves; everything else is traced through) and offers every node to the kinds of
:mod:`cd_convert.sites.registry` in order; the first that claims it records the site or finding. Modules
that cannot be traced through (data-dependent control flow, or leaves such as
``nn.TransformerEncoderLayer``) are searched module by module instead, each module offered to the kinds
the same way, and an optional dry run (:mod:`cd_convert.dry_run`) confirms which sites run, finds their
consumers by tensor identity, and finds calls the trace could not see.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._modules import submodule
from .callsites import FUNCTIONAL_DROPOUTS, bind_functional, call_key, caller_frame, owner_method
from .consumers import per_mask_value_units, produced_width
from .errors import ConversionError
from .found import Discovery, FoundSite
from .layers import ConcreteDropoutBase
from .sites.base import SearchContext, TraceContext, any_of
from .sites import registry
from .targets import is_dropout_module

__all__ = ["discover"]

#: Row note of a consumer-less site whose width K is known only once the model has run.
WIDTH_UNKNOWN_NOTE = (
    "its width K (entropy term) is learnt at the first training forward: cd_convert.regularization(model) "
    "raises until one has run"
)


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
        if any_of(registry.DETECTORS, m):
            leaf = True
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(m, self.extra_leaves):
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
            return submodule(self.root, path)
        except AttributeError:
            return None


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
        inner = [name for name in discovery.leaves if _holds_sites(model.get_submodule(name))]
        if inner:
            discovery.method = "fx + module search"
            for name in sorted(inner):
                _module_search(model, discovery, within=name)
    if example_inputs is not None:
        from .dry_run import confirm_with_dry_run

        try:
            confirm_with_dry_run(model, discovery, example_inputs)
        except Exception as err:  # the model's own forward failed on these inputs; the model is restored
            raise ConversionError(
                f"the dry run of {type(model).__name__} on {_describe(example_inputs)} failed with "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Nothing was changed. The "
                "dry run calls the model in training mode: pass example_inputs= that its forward accepts in training "
                "(a tuple of positional or a dict of keyword arguments; a detection model, for one, needs its "
                "targets too)."
            ) from err
    for site in discovery.sites:
        if site.consumer is not None and site.site_type.channelwise:
            site.consumer = per_mask_value_units(site.consumer, model)
        width_from_consumer = site.consumer is not None and site.consumer.units is not None
        if not width_from_consumer and site.units_hint is None and site.called is not False:
            site.notes.append(WIDTH_UNKNOWN_NOTE)
    return discovery


def _describe(example_inputs: Any) -> str:
    if isinstance(example_inputs, dict):
        return "keyword inputs " + ", ".join(f"{k}={_shape(v)}" for k, v in example_inputs.items())
    return "inputs (" + ", ".join(_shape(v) for v in example_inputs) + ")"


def _shape(value: Any) -> str:
    """An input as error-message text: tensors by shape, also inside lists, tuples and dicts (never values)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"tensor{tuple(shape)}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_shape(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in list(value.items())[:6]) + "}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _holds_sites(module: nn.Module) -> bool:
    """Whether a leaf module holds modules with sites below it, which the trace cannot see."""
    return any(any_of(registry.DETECTORS, m) for m in module.modules() if m is not module)


def _read_graph(model: nn.Module, graph: fx.Graph, discovery: Discovery) -> None:
    """Offer every node to the kinds of site, in order; the first that claims it records it."""
    ctx = TraceContext(model, dict(model.named_modules(remove_duplicate=False)), discovery)
    for node in graph.nodes:
        if node.op == "call_module":
            discovery.called_modules.add(node.target)
        if node.op in ("call_module", "call_function"):
            before = len(discovery.sites)
            any(kind.detect_node(ctx, node) for kind in registry.DETECTORS)
            _set_widths(ctx, node, discovery.sites[before:])
    for kind in registry.DETECTORS:
        kind.after_trace(ctx)


def _dropout_input(ctx: TraceContext, node: fx.Node) -> Optional[Any]:
    """The input of a node that applies dropout (a dropout or concrete module, a functional call), else None."""
    if node.op == "call_module":
        module = ctx.modules.get(node.target)
        if isinstance(module, ConcreteDropoutBase) or is_dropout_module(module):
            return node.args[0] if node.args else node.kwargs.get("input")
        return None
    if node.op == "call_function" and node.target in FUNCTIONAL_DROPOUTS:
        return bind_functional(node.target, node.args, node.kwargs).get("input")
    return None


def _set_widths(ctx: TraceContext, node: fx.Node, sites: Sequence[FoundSite]) -> None:
    """Give the sites just found at ``node`` their width K when the graph fixes it (used when no consumer does).

    Without it the regulariser learns K from the first training forward and raises until then. Attention
    sites (kind "fused") drop probabilities whose width is the key length, which the model does not fix.
    """
    source = _dropout_input(ctx, node)
    if source is None:
        return
    for site in sites:
        if site.units_hint is None and site.kind != "fused":
            site.units_hint = produced_width(source, ctx.modules, ctx.model, site.site_type.channelwise)


def _module_search(model: nn.Module, discovery: Discovery, within: Optional[str]) -> None:
    """Module-by-module search (whole model, or inside one leaf): each module offered to the kinds in order."""
    root = submodule(model, within or "")
    prefix = f"{within}." if within else ""
    ctx = SearchContext(model, discovery, {s.module_name for s in discovery.sites if s.module_name})
    for rel, module in root.named_modules():
        name = prefix + rel if rel else (within or "")
        if name not in ctx.known:
            any(kind.detect_module(ctx, name, module) for kind in registry.DETECTORS)
