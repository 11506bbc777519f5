"""``nn.MultiheadAttention(dropout=p)``: its attention dropout as a concrete site applied inside its forward.

torch's attention code calls ``dropout`` and ``scaled_dot_product_attention`` as globals of
``torch.nn.functional`` from inside ``F.multi_head_attention_forward``, where a code location cannot tell
the calls apart, so the whole forward runs with those two globals routed to the site (a *runner*, with
:func:`cd_convert.sites.attention_routing.route_torch_attention`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from ..found import FoundSite
from ..layers import ConcreteDropout
from .attention_routing import route_torch_attention
from .base import ATTENTION_CONSUMER_NOTE, Change, SearchContext, SiteKind, TraceContext
from .encoder_fast_path import encoder_fast_path_switches
from .routed import plan_routed_site

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["MultiheadAttentionKind"]


def run_attention_module(owner: nn.Module, site: nn.Module, function: Callable, args: Tuple, kwargs: Dict) -> Any:
    """Run ``nn.MultiheadAttention.forward`` with its attention dropout applied by ``site``.

    The module skips its dropout when ``dropout == 0`` or not training, and takes a fused fast path in eval:
    while the site is active it is made to take the path that calls dropout, then restored.
    """
    saved = (owner.training, owner.dropout)
    try:
        if site.active:
            owner.training = True
            owner.dropout = owner.dropout or 0.5
        with route_torch_attention(site, saved[0]):
            return function(owner, *args, **kwargs)
    finally:
        owner.training, owner.dropout = saved


class MultiheadAttentionKind(SiteKind):
    """The attention dropout of ``nn.MultiheadAttention``."""

    name = "fused"

    def is_site_module(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        module = ctx.modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, nn.MultiheadAttention):
            return False
        self._record(ctx.discovery.sites, node.target, module, "fx", called=True)
        return True

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.MultiheadAttention):
            return False
        self._record(ctx.discovery.sites, name, module, ctx.found_by, called=None)
        return True

    @staticmethod
    def _record(sites: list, name: str, module: nn.MultiheadAttention, found_by: str, called: Optional[bool]) -> None:
        # A rate of 0 is recorded too: whether it becomes a site is the planner's rate-0 policy
        # (include_zero_rate), as for every other kind of dropout.
        sites.append(
            FoundSite(
                kind=MultiheadAttentionKind.name,
                owner=name,
                site_type=ConcreteDropout,
                p=float(module.dropout),
                found_by=found_by,
                consumer=None,
                consumer_note=ATTENTION_CONSUMER_NOTE,
                fused_op="MultiheadAttention",
                method="forward",
                called=called,
                notes=["nn.MultiheadAttention's attention dropout applied by a concrete site inside its forward"],
            )
        )

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.fused_op == "MultiheadAttention"

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        # freeze writes the learned rate into the module's own ``dropout`` float.
        plan_routed_site(planner, found, kind=self.name, runner=run_attention_module, rate_attribute="dropout")

    def model_changes(self, planner: "Planner") -> List[Change]:
        """Switches that keep torch's encoder layers (whose attention is this kind's module) off their eval fast
        path while a site below them is active: every new site counts, the layers' dropout modules too."""
        new_sites = [name for name, entry in planner.planned.items() if not entry.existing]
        return list(encoder_fast_path_switches(planner.model, new_sites))
