"""timm awareness: the notrace modules and functions timm itself uses for torch.fx feature extraction."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .._tracing import thread_key
from ..sites.base import Change, remove_forward_hooks, submodule
from .attention_kernel import kernel_can_route, open_route

__all__ = ["notrace_for", "fused_attention_dropout", "FusedAttentionSwitch"]


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` (or one of its modules) comes from timm."""
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


def notrace_for(model: nn.Module) -> Tuple[List[type], List[Callable]]:
    """timm's notrace leaf modules and autowrapped functions when ``model`` uses timm, else empty lists.

    Args:
        model: any model.

    Returns:
        ``(leaf_module_types, autowrap_functions)``.
    """
    if not is_timm_model(model):
        return [], []
    try:
        from timm.layers import _fx
    except ImportError as err:  # timm absent or too old (no timm.layers._fx): trace without its lists
        if err.name != "timm" and not (err.name or "").startswith("timm."):
            raise  # any other ImportError (our code, a broken dependency of timm) surfaces
        return [], []
    return list(_fx.get_notrace_modules()), list(_fx.get_notrace_functions())


# -- timm attention with ``fused_attn``: an explicit path that calls its ``attn_drop`` module ----------


def fused_attention_dropout(owner: nn.Module, p: Optional[float]) -> Optional[Tuple[str, nn.Module]]:
    """The dropout child whose rate a timm-style attention module passes to fused attention, if any.

    timm's attention modules hold ``fused_attn`` and an ``attn_drop`` module: the fused path passes
    ``attn_drop.p`` as ``dropout_p``, the explicit path calls the module. With several dropout children,
    the one named like attention dropout (and, when ``p`` is known, with that rate) is taken.

    Args:
        owner: the module that calls ``scaled_dot_product_attention`` (or holds the dropout child).
        p: the ``dropout_p`` seen in the call, when it is a constant.

    Returns:
        ``(child_name, child)``, or None when ``owner`` is not such an attention module.
    """
    from ..layers import ConcreteDropoutBase
    from ..targets import DROPOUT_TYPES, is_dropout_module

    if not hasattr(owner, "fused_attn"):
        return None
    candidates = [
        (n, m) for n, m in owner.named_children() if is_dropout_module(m) or isinstance(m, ConcreteDropoutBase)
    ]
    if p is not None:
        same = [(n, m) for n, m in candidates if isinstance(m, DROPOUT_TYPES) and math.isclose(float(m.p), p)]
        candidates = same or candidates
    preferred = [c for c in candidates if "attn" in c[0]]
    pool = preferred or candidates
    return pool[0] if pool and (len(pool) == 1 or preferred) else None


class FusedAttentionHook:
    """Forward pre-hook: how a timm-style attention module computes attention while its dropout site is active.

    * site inactive (eval): the fused kernel runs exactly as before conversion (bit-identical outputs);
    * site active, and the fused concrete-attention kernel can run (a CUDA input, the element-wise relaxed
      mask, not under a tracer): the module keeps its fused path and its ``scaled_dot_product_attention`` call
      is routed to the kernel, which applies the site inside (:mod:`cd_convert.fused_attention`);
    * otherwise (CPU, Monte Carlo prediction's hard mask, ``torch.compile``): the explicit path, which calls
      the site on the attention probabilities.

    Args:
        child: the site's attribute name on the attention module.
        original: the module's ``fused_attn`` before conversion.
    """

    def __init__(self, child: str, original: bool) -> None:
        self.child = child
        self.original = original
        # Entered here, closed by FusedAttentionRouteEnd; per thread (nn.DataParallel's replicas share hooks).
        self._routes: Dict[int, List[contextlib.ExitStack]] = {}

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        site = getattr(module, self.child)
        if not site.active:
            module.fused_attn = self.original
            return
        x = args[0] if args else None
        device = x.device if isinstance(x, Tensor) else None
        if self.original and kernel_can_route([site], device):
            module.fused_attn = True
            self._routes.setdefault(thread_key(), []).append(open_route(site, module.training))
            return
        module.fused_attn = False

    def end(self) -> None:
        """Close the route the pre-hook opened for the call that is ending, if it opened one."""
        routes = self._routes.get(thread_key())
        if routes:
            routes.pop().close()

    def __getstate__(self) -> dict:
        return {"child": self.child, "original": self.original, "_routes": {}}  # open routes belong to a call


class FusedAttentionRouteEnd:
    """Forward hook (``always_call``: also when the forward raises) that ends the pre-hook's route."""

    def __init__(self, start: FusedAttentionHook) -> None:
        self.start = start

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        self.start.end()


@dataclass
class FusedAttentionSwitch(Change):
    """Installs :class:`FusedAttentionHook` (and its :class:`FusedAttentionRouteEnd`) on a timm-style attention
    module (one with ``fused_attn``).

    Attributes:
        owner: qualified name of the attention module.
        child: the site's attribute name on it.
    """

    owner: str
    child: str
    site_name: str = ""
    kind: str = "attribute"
    hook_id: int = -1
    end_hook_id: int = -1
    original: Any = None

    PATH_FIELDS = ("owner",)

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = submodule(root, self.owner)
        self.original = getattr(owner, "fused_attn", None)
        start = FusedAttentionHook(self.child, bool(self.original))
        self.hook_id = owner.register_forward_pre_hook(start).id
        self.end_hook_id = owner.register_forward_hook(FusedAttentionRouteEnd(start), always_call=True).id

    def undo(self, root: nn.Module) -> None:
        owner = submodule(root, self.owner)
        remove_forward_hooks(owner, self.hook_id, self.end_hook_id)
        if self.original is not None:
            owner.fused_attn = self.original
