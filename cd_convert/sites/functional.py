"""Functional dropout in the model's code: ``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout``,
``torch.feature_dropout`` (and their in-place forms).

Found as fx ``call_function`` nodes (or by the dry run), identified by the code location of the call and
routed at run time to a site child of the owner (``forward_head_dropout``); ``freeze`` writes the learned
rate into the attribute the call reads (timm's ``drop_rate``, BART's ``dropout``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from ..callsites import FUNCTIONAL_DROPOUTS, bind_functional, function_name
from ..consumers import find_consumer
from ..found import Finding, FoundSite
from .base import SiteKind, TraceContext, submodule
from .routed import plan_routed_site, rate_attribute_of

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["FunctionalKind", "route_functional"]


def route_functional(owner: nn.Module, site: nn.Module, func: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
    """A routed functional-dropout call, computed by its site (which honours the call's ``training=``)."""
    bound = bind_functional(func, args, kwargs)
    return site(bound["input"], training=bool(bound["training"]))


def _const_float(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class FunctionalKind(SiteKind):
    """A functional dropout call."""

    name = "functional"

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        if node.op != "call_function" or node.target not in FUNCTIONAL_DROPOUTS:
            return False
        bound = bind_functional(node.target, node.args, node.kwargs)
        owner = ctx.owner_name(node)
        label = function_name(node.target)
        if bound.get("training") is False:
            ctx.discovery.findings.append(
                Finding(owner or "<root>", "not applied", f"{label}(training=False) never drops")
            )
            return True
        key = node.meta.get("cd_call_key")
        method = node.meta.get("cd_method")
        consumer, note = find_consumer(node, ctx.modules, ctx.model)
        site = FoundSite(
            kind=self.name,
            owner=owner,
            site_type=FUNCTIONAL_DROPOUTS[node.target][1],
            p=_const_float(bound.get("p")),
            found_by="fx",
            consumer=consumer,
            consumer_note=note,
            function=label,
            key=key,
            method=method,
        )
        if bound.get("inplace") and not node.users:
            site.notes.append("in-place call whose result is unused: the concrete site returns a new tensor")
        if key is None or method is None:
            site.notes.append("call location could not be attributed to a method of its owner")
        ctx.discovery.sites.append(site)
        return True

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.kind == self.name

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        owner = submodule(planner.model, found.owner)
        rate_attribute = rate_attribute_of(owner, found, planner.model)
        plan_routed_site(planner, found, kind=self.name, handler=route_functional, rate_attribute=rate_attribute)
