"""Attention dropout applied inside a transformers attention interface (kind "attention").

transformers' attention modules pass their rate as ``dropout=`` to the attention function that
``config._attn_implementation`` selects; only the eager function applies it as a call (``F.dropout`` on the
probabilities, or GPT-2's ``attn_dropout`` module). The dry run sees that call with eager attention selected
and marks it; this kind plans it like a functional call (or a module) and adds, once for the model, the
switches that select, while such a site is active, SDPA routed to the fused kernel on a GPU or eager attention
elsewhere (:mod:`cd_convert.integrations.transformers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

from ..found import FoundSite
from .base import SiteKind, submodule
from .functional import route_functional
from .module import plan_module_site
from .routed import plan_routed_site, rate_attribute_of

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["InterfaceAttentionKind"]

_EAGER_NOTE = (
    "while the site is active (training, MC prediction) attention runs, on a GPU, as SDPA with the site applied "
    "in cd_convert's fused concrete-attention kernel (no attention matrix kept), elsewhere in its eager "
    "implementation, which keeps a batch x heads x L x L probability tensor per layer for the backward pass; in "
    "eval the model's own implementation runs. fused_attention=False keeps it fixed and fused"
)


class InterfaceAttentionKind(SiteKind):
    """Attention dropout inside a transformers attention interface."""

    name = "attention"

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.attention_interface

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        if found.module_name is not None:
            owner = found.module_name.rpartition(".")[0]
            entry = plan_module_site(planner, found, kind=self.name)
        else:
            owner = found.owner
            rate = rate_attribute_of(submodule(planner.model, found.owner), found, planner.model)
            entry = plan_routed_site(planner, found, kind=self.name, handler=route_functional, rate_attribute=rate)
        if entry is None or entry.existing:
            return
        planner.cache.setdefault("attention_owners", {})[entry.row.name] = owner
        if _EAGER_NOTE not in entry.row.notes:
            entry.row.notes.append(_EAGER_NOTE)

    def model_changes(self, planner: "Planner") -> List[Any]:
        """The eager-attention switches for every attention site planned in this conversion."""
        owners = planner.cache.get("attention_owners")
        if not owners:
            return []
        from ..integrations.transformers import eager_switches

        return eager_switches(planner.model, owners)
