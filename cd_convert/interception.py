"""Run-time routing of functional and fused dropout calls to concrete sites, without a GraphModule.

A functional call such as ``F.dropout(x, p=self.drop_rate, training=self.training)`` lives in the
model's own code. Rather than retracing that code into a ``GraphModule`` (which would lose the class, its
methods, and bake ``self.training`` in), the owner's method is wrapped *on the instance*: while it runs, a
``TorchFunctionMode`` sees every dropout call, identifies it by its code location (file, function and
bytecode offset, the same at trace time and at run time) and hands it to the concrete site registered for
that location. Calls the trace did not see pass through unchanged, with a one-time warning.

``F.scaled_dot_product_attention(dropout_p=...)`` is routed the same way and computed explicitly
(softmax, concrete dropout, matmul) while the site is active; in eval it calls the fused kernel with
``dropout_p=0``, exactly as the original code does.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .callsites import FUNCTIONAL_DROPOUTS, CallKey, bind_functional, call_key, caller_frame

INTERCEPTOR_ATTR = "_cd_convert_interceptors"
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


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


class _Dispatch(TorchFunctionMode):
    def __init__(self, interceptor: "MethodInterceptor") -> None:
        super().__init__()
        self.interceptor = interceptor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FUNCTIONAL_DROPOUTS or func is F.scaled_dot_product_attention:
            handled, result = self.interceptor.dispatch(func, args, kwargs)
            if handled:
                return result
        return func(*args, **kwargs)


class MethodInterceptor:
    """Stands in for ``owner.<method>`` on the instance and routes its dropout calls to concrete sites.

    Args:
        owner: the module whose method contains the calls.
        method: the method's name (``"forward"``, ``"forward_head"``, ...).

    Attributes:
        routes: call location -> name of the site child module of ``owner``.
        catch_all: if set, every dropout / attention call made while the method runs goes to this child
            (used for ``nn.MultiheadAttention``, whose dropout is inside torch's own code).
    """

    def __init__(self, owner: nn.Module, method: str) -> None:
        self.owner = owner
        self.method = method
        self.routes: Dict[CallKey, str] = {}
        self.catch_all: Optional[str] = None
        self._warned = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = getattr(type(self.owner), self.method)
        if self.catch_all is not None:
            return self._call_attention_module(function, args, kwargs)
        with _Dispatch(self):
            return function(self.owner, *args, **kwargs)

    def _call_attention_module(self, function, args, kwargs):
        owner = self.owner
        site = getattr(owner, self.catch_all)
        # nn.MultiheadAttention skips its dropout when dropout == 0 or not training, and takes a fused fast
        # path in eval: force the path that calls dropout while the site is active, then restore.
        saved = (owner.training, owner.dropout)
        try:
            if site.active:
                owner.training = True
                owner.dropout = owner.dropout or 0.5
            with _route_torch_attention(site, saved[0]):
                return function(owner, *args, **kwargs)
        finally:
            owner.training, owner.dropout = saved

    def dispatch(self, func: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[bool, Any]:
        """Handle one intercepted call; returns ``(handled, result)``."""
        frame = caller_frame(sys._getframe(1))
        child = self.routes.get(call_key(frame)) if frame is not None else None
        if child is None:
            if func in FUNCTIONAL_DROPOUTS and not self._warned:
                self._warned = True
                warnings.warn(
                    f"a dropout call in {type(self.owner).__name__}.{self.method} was not seen when the model "
                    "was converted (a branch not taken at conversion time?); it keeps its fixed rate. "
                    "Convert again with example_inputs that take that branch.",
                    stacklevel=4,
                )
            return False, None
        site = getattr(self.owner, child)
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_NAMES, args))
            bound.update(kwargs)
            training = self.owner.training
            if not (training or site.sampling is not None):
                bound["dropout_p"] = 0.0  # what the original code does in eval: the fused kernel, no dropout
                return True, func(**bound)
            bound.pop("dropout_p", None)
            return True, explicit_attention(**bound, dropout=lambda w: site(w, training=training))
        bound = bind_functional(func, args, kwargs)
        return True, site(bound["input"], training=bool(bound["training"]))


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
def _route_torch_attention(site: nn.Module, training: bool):
    """Route the dropout inside ``F.multi_head_attention_forward`` to ``site`` for the current thread.

    torch's attention code calls ``dropout`` and ``scaled_dot_product_attention`` as globals of
    ``torch.nn.functional`` from inside a function that a ``TorchFunctionMode`` only sees from the outside,
    so those two globals are routed for the duration of the call (other threads get the real functions).
    """
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


def install(owner: nn.Module, method: str) -> MethodInterceptor:
    """Return the interceptor of ``owner.<method>``, installing it on the instance if needed."""
    registry: Dict[str, MethodInterceptor] = owner.__dict__.setdefault(INTERCEPTOR_ATTR, {})
    if method not in registry:
        interceptor = MethodInterceptor(owner, method)
        registry[method] = interceptor
        owner.__dict__[method] = interceptor
    return registry[method]


def uninstall(owner: nn.Module, method: str) -> None:
    """Remove the interceptor of ``owner.<method>`` (the class's method is visible again)."""
    registry = owner.__dict__.get(INTERCEPTOR_ATTR, {})
    registry.pop(method, None)
    owner.__dict__.pop(method, None)
    if not registry:
        owner.__dict__.pop(INTERCEPTOR_ATTR, None)


def interceptors(owner: nn.Module) -> Dict[str, MethodInterceptor]:
    """The interceptors installed on ``owner``, by method name."""
    return owner.__dict__.get(INTERCEPTOR_ATTR, {})
