"""Noise layers that are not dropout sites: drop-path / stochastic depth, DropBlock, alpha dropout.

They carry no Concrete Dropout interpretation (they drop whole residual branches, blocks, or keep
self-normalising statistics), so they are left as they are and listed in the report.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..found import Finding
from .base import SearchContext, SiteKind, TraceContext

__all__ = ["NonSiteKind"]

NON_SITE_NAMES = ("DropPath", "StochasticDepth", "DropBlock", "AlphaDropout", "FeatureAlphaDropout", "DropConnect")
NON_SITE_FUNCTIONS = {F.alpha_dropout: "F.alpha_dropout", F.feature_alpha_dropout: "F.feature_alpha_dropout"}


def is_non_site_module(module: nn.Module) -> bool:
    """Noise layers that are not dropout sites (drop-path, stochastic depth, alpha dropout)."""
    return any(part in type(module).__name__ for part in NON_SITE_NAMES)


def _left_alone(name: str, what: str) -> Finding:
    return Finding(name, "not a dropout site", f"{what} is left as it is")


class NonSiteKind(SiteKind):
    """Lists noise layers that are not dropout sites; plans nothing."""

    name = "not a site"

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        if node.op == "call_module":
            module = ctx.modules.get(node.target)
            if module is None or not is_non_site_module(module):
                return False
            ctx.discovery.findings.append(_left_alone(node.target, type(module).__name__))
            return True
        if node.op == "call_function" and node.target in NON_SITE_FUNCTIONS:
            ctx.discovery.findings.append(
                _left_alone(ctx.owner_name(node) or "<root>", NON_SITE_FUNCTIONS[node.target])
            )
            return True
        return False

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        if not is_non_site_module(module):
            return False
        ctx.finding(name, "not a dropout site", f"{type(module).__name__} is left as it is")
        return True

    def after_trace(self, ctx: TraceContext) -> None:
        # Noise modules the trace goes through (timm's DropPath) never appear as call_module nodes.
        listed = {f.name for f in ctx.discovery.findings}
        for name, module in ctx.model.named_modules():
            if is_non_site_module(module) and name not in listed:
                ctx.discovery.findings.append(_left_alone(name, type(module).__name__))
