"""``nn.MultiheadAttention(dropout=p)``: its attention dropout as a concrete site applied inside its forward.

torch's attention code calls ``dropout`` and ``scaled_dot_product_attention`` as globals of
``torch.nn.functional`` from inside ``F.multi_head_attention_forward``, where a code location cannot tell
the calls apart, so the whole forward runs with those two globals routed to the site (a *runner*).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..found import FoundSite
from ..layers import ConcreteDropout
from .attention import explicit_attention
from .base import ATTENTION_CONSUMER_NOTE, SearchContext, SiteKind, TraceContext
from .routed import plan_routed_site

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["MultiheadAttentionKind"]

_ORIGINAL_DROPOUT = F.dropout
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_routing = threading.local()


def _routed_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    route = getattr(_routing, "route", None)
    if route is None:  # another thread, or no attention module running: the real function
        return _ORIGINAL_DROPOUT(input, p, training, inplace)
    site, flag = route
    return site(input, training=flag)


def _routed_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **extra: Any,
) -> Tensor:
    route = getattr(_routing, "route", None)
    if route is None:
        return _ORIGINAL_SDPA(query, key, value, attn_mask, dropout_p, is_causal, **extra)
    site, flag = route
    if not site.active:
        return _ORIGINAL_SDPA(query, key, value, attn_mask, 0.0, is_causal, **extra)
    return explicit_attention(
        query, key, value, attn_mask, is_causal, **extra, dropout=lambda w: site(w, training=flag)
    )


@contextlib.contextmanager
def _route_torch_attention(site: nn.Module, training: bool) -> Iterator[None]:
    """Route ``F.dropout`` and ``F.scaled_dot_product_attention`` to ``site`` for the current thread."""
    previous = getattr(_routing, "route", None)
    _routing.route = (site, training)
    patched = F.dropout is not _routed_dropout
    if patched:
        F.dropout = _routed_dropout
        F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        _routing.route = previous
        if patched:
            F.dropout = _ORIGINAL_DROPOUT
            F.scaled_dot_product_attention = _ORIGINAL_SDPA


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
        with _route_torch_attention(site, saved[0]):
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
