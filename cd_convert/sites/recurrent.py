"""Recurrent layers' inter-layer dropout (``nn.LSTM/GRU/RNN(dropout=p, num_layers > 1)``): unsupported.

The dropout is applied inside the fused recurrent kernel, where no concrete site can be placed; the layer
keeps its fixed rate and the report says so (with what to do instead).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .base import SearchContext, SiteKind, TraceContext

__all__ = ["RecurrentKind"]


class RecurrentKind(SiteKind):
    """Reports recurrent inter-layer dropout as unsupported; plans nothing."""

    name = "recurrent"

    def is_site_module(self, module: nn.Module) -> bool:
        return isinstance(module, nn.RNNBase)

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        module = ctx.modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, nn.RNNBase):
            return False
        self._report(ctx.discovery.findings, node.target, module)
        return True

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.RNNBase):
            return False
        self._report(ctx.discovery.findings, name, module)
        return True

    @staticmethod
    def _report(findings: list, name: str, module: nn.RNNBase) -> None:
        from ..found import Finding

        if module.dropout > 0 and module.num_layers > 1:
            findings.append(
                Finding(
                    name,
                    "unsupported",
                    f"{type(module).__name__}(dropout={module.dropout}) drops between layers inside the fused RNN "
                    "kernel; no concrete site can be placed there, so it keeps its fixed rate. Use separate "
                    "single-layer RNNs with nn.Dropout between them to learn that rate.",
                )
            )
