"""Attention with a dropout argument: ``F.scaled_dot_product_attention(..., dropout_p=p)``.

Two forms, one kind ("fused"):

* an attention module with an explicit path that calls its own dropout module (timm's ``fused_attn``
  attention, see :mod:`cd_convert.integrations.timm`): the dropout module becomes the site and the module
  takes its explicit path only while the site is active;
* any other call: routed at run time and computed explicitly (softmax, concrete dropout on the
  probabilities, matmul) while the site is active; in eval the fused kernel runs with ``dropout_p=0``,
  exactly as the original code does in eval.

In training both run :func:`concrete_attention`: on a GPU, one flash-attention kernel that applies the
concrete mask inside (:mod:`cd_convert.fused_attention`, no attention matrix kept); elsewhere, or where the
kernel does not apply, explicit attention, which keeps the attention matrix for the backward pass.
``fused_attention=False`` opts out of converting such sites.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import fused_attention
from ..found import FoundSite
from ..integrations.timm import FusedAttentionSwitch, fused_attention_dropout
from ..layers import ConcreteDropout, ConcreteDropoutBase
from .base import (
    ATTENTION_CONSUMER_NOTE,
    SearchContext,
    SiteKind,
    TraceContext,
    joined,
    original_rate,
    site_type_for,
    submodule,
)
from .module import plan_module_site
from .routed import plan_routed_site, rate_attribute_of

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["SDPA_ARGUMENTS", "FusedAttentionKind", "concrete_attention", "explicit_attention", "kernel_applies"]

#: The parameter names of ``F.scaled_dot_product_attention``, in order (to bind a call's arguments).
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_EXPLICIT_PATH_NOTE = (
    "while the site is active (training, MC prediction) attention runs, on a GPU, in cd_convert's fused "
    "concrete-attention kernel (no attention matrix kept), elsewhere on its explicit path (fused_attn=False), "
    "which keeps the attention matrix for the backward pass. In eval the fused kernel runs as before"
)


def explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    dropout: Callable[[Tensor], Tensor],
) -> Tensor:
    """``scaled_dot_product_attention`` written out, with ``dropout`` applied to the attention weights.

    Args:
        query, key, value: ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``.
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(..., L, S)``.
        is_causal: apply a lower-triangular mask.
        scale: score scale, default ``1 / sqrt(E)``.
        enable_gqa: repeat key/value heads to match the query's (grouped-query attention).
        dropout: the function applied to the attention probabilities.

    Returns:
        ``(..., L, Ev)``.
    """
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    return dropout(weights) @ value


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type`` if autocast is on there, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument (CUDA only)
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" and torch.is_autocast_enabled() else None
    return torch.get_autocast_dtype(device_type) if enabled else None


def kernel_applies(site: nn.Module) -> bool:
    """Whether ``site``'s current mode can run in the fused attention kernel (given inputs it supports).

    The kernel draws the element-wise relaxed mask: training, or Monte Carlo prediction with relaxed sampling.
    """
    return (
        isinstance(site, ConcreteDropoutBase)
        and not site.channelwise
        and site.sampling in (None, "relaxed")
        and fused_attention.kernels_available()
    )


def concrete_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    site: nn.Module,
    training: bool,
) -> Tensor:
    """``scaled_dot_product_attention`` with ``site`` applied to the attention probabilities.

    One fused kernel where :func:`cd_convert.fused_attention.supports` holds and the site's mode allows it
    (:func:`kernel_applies`); else :func:`explicit_attention`. Under autocast the inputs are cast as
    ``scaled_dot_product_attention`` would cast them.

    Args:
        query, key, value, attn_mask, is_causal, scale, enable_gqa: as ``scaled_dot_product_attention``'s.
        site: an active concrete-dropout site.
        training: the calling module's training flag (passed on to the site).

    Returns:
        ``(..., L, Ev)``.
    """
    if kernel_applies(site) and fused_attention.runs_on(query.device):
        dtype = _autocast_dtype(query.device.type)
        cast = (query, key, value)
        if dtype is not None and query.is_floating_point():
            cast = tuple(t.to(dtype) for t in cast)
        if fused_attention.supports(*cast, attn_mask, enable_gqa) and fused_attention.compiles_for(
            *cast, site.p_logit, attn_mask, is_causal
        ):
            if site.units_seen is None:
                site.record_units(key.size(-2))  # what the explicit path's site would record: the key count
            return fused_attention.fused_concrete_attention(
                *cast,
                site.p_logit,
                attn_mask=attn_mask,
                is_causal=is_causal,
                scale=scale,
                temperature=site.temperature,
                eps=site.eps,
            )
    return explicit_attention(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, dropout=lambda w: site(w, training=training)
    )


def route_attention(owner: nn.Module, site: nn.Module, func: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
    """A routed ``scaled_dot_product_attention`` call: explicit with the site while active, else fused, no dropout."""
    bound = dict(zip(SDPA_ARGUMENTS, args))
    bound.update(kwargs)
    training = owner.training
    if not (training or site.sampling is not None):
        bound["dropout_p"] = 0.0  # what the original code does in eval: the fused kernel, no dropout
        return func(**bound)
    bound.pop("dropout_p", None)
    return concrete_attention(**bound, site=site, training=training)


def _fused_module_site(owner: str, name: str, module: nn.Module, found_by: str, called: Optional[bool]) -> FoundSite:
    """The site of an attention module whose dropout module's rate is passed into fused attention."""
    return FoundSite(
        kind=FusedAttentionKind.name,
        owner=owner,
        module_name=name,
        site_type=site_type_for(module),
        p=original_rate(module),
        found_by=found_by,
        consumer=None,
        consumer_note=ATTENTION_CONSUMER_NOTE,
        fused_op="scaled_dot_product_attention",
        called=called,
        notes=[_EXPLICIT_PATH_NOTE],
    )


class FusedAttentionKind(SiteKind):
    """Dropout passed as ``dropout_p`` into ``scaled_dot_product_attention``."""

    name = "fused"

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            return False
        dropout_p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        p = None if isinstance(dropout_p, fx.Node) else float(dropout_p)
        owner_name = ctx.owner_name(node)
        owner = ctx.module(owner_name)
        child = fused_attention_dropout(owner, p) if owner is not None else None
        if child is not None:
            full = joined(owner_name, child[0])
            ctx.discovery.sites.append(_fused_module_site(owner_name, full, child[1], "fx", called=True))
            return True
        if p == 0.0:
            return True  # a literal dropout_p=0: no dropout to convert
        ctx.discovery.sites.append(
            FoundSite(
                kind=self.name,
                owner=owner_name,
                site_type=ConcreteDropout,
                p=p,
                found_by="fx",
                consumer=None,
                consumer_note=ATTENTION_CONSUMER_NOTE,
                function="F.scaled_dot_product_attention",
                key=node.meta.get("cd_call_key"),
                method=node.meta.get("cd_method"),
                fused_op="scaled_dot_product_attention",
                notes=["computed as explicit attention (softmax, concrete dropout, matmul) in training"],
            )
        )
        return True

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        parent_name, _, attr = name.rpartition(".")
        parent = submodule(ctx.model, parent_name)
        if name == "" or fused_attention_dropout(parent, None) != (attr, module):
            return False
        ctx.add(_fused_module_site(parent_name, name, module, ctx.found_by, called=None))
        return True

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.kind == self.name and found.fused_op == "scaled_dot_product_attention"

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        if found.module_name is None:
            owner = submodule(planner.model, found.owner)
            # Where freeze writes the learned rate (self.p).
            rate_attribute = rate_attribute_of(owner, found, planner.model)
            plan_routed_site(planner, found, kind=self.name, handler=route_attention, rate_attribute=rate_attribute)
            return
        first = found.module_name not in planner.planned
        entry = plan_module_site(planner, found, kind=self.name)
        if entry is not None and first and not entry.existing:
            child = found.module_name.rpartition(".")[2]
            entry.extra_changes.append(FusedAttentionSwitch(found.owner, child, found.module_name))
