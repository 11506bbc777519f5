"""Routing ``torch.nn.functional``'s ``dropout`` and ``scaled_dot_product_attention`` to a site, per thread.

Some attention code calls these as globals of ``torch.nn.functional`` where no code location tells the calls
apart (torch's own ``multi_head_attention_forward``) or where a per-call ``TorchFunctionMode`` would cost
more than the call (timm's fused attention path). While :func:`route_torch_attention` is active the two
globals are replaced by routers that hand the current thread's calls to the site; other threads get the real
functions. The replacement is reference-counted across threads: the globals go back when the last routed
call on any thread ends, never while another thread is still inside one. ``F.dropout`` is replaced only where
asked: a replaced ``F.dropout`` would hide its callers' code locations from the routes of
:mod:`cd_convert.interception`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import concrete_attention

__all__ = ["route_torch_attention"]

_ORIGINAL_DROPOUT = F.dropout
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_ORIGINALS = {"dropout": _ORIGINAL_DROPOUT, "scaled_dot_product_attention": _ORIGINAL_SDPA}
_routing = threading.local()
_lock = threading.Lock()
_users: Dict[str, int] = {}  # how many threads are inside a patch of each function


def _routed_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    route = getattr(_routing, "route", None)
    if route is None or not route[2]:  # another thread, no routed module running, or dropout not routed
        return _ORIGINAL_DROPOUT(input, p, training, inplace)
    site, flag, _ = route
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
    site, flag, _ = route
    if not site.active:
        return _ORIGINAL_SDPA(query, key, value, attn_mask, 0.0, is_causal, **extra)
    return concrete_attention(query, key, value, attn_mask, is_causal, **extra, site=site, training=flag)


@contextlib.contextmanager
def _patched(name: str, router: Any) -> Iterator[None]:
    """``F.<name>`` replaced by ``router`` while any thread is inside such a block (reference-counted)."""
    with _lock:
        _users[name] = _users.get(name, 0) + 1
        if _users[name] == 1:
            setattr(F, name, router)
    try:
        yield
    finally:
        with _lock:
            _users[name] -= 1
            if _users[name] == 0:
                setattr(F, name, _ORIGINALS[name])


@contextlib.contextmanager
def route_torch_attention(site: nn.Module, training: bool, *, dropout: bool = True) -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` (and ``F.dropout`` if ``dropout``) to ``site`` for this thread.

    Args:
        site: the concrete site; an inactive site makes attention run with ``dropout_p=0``.
        training: the training flag passed on to the site.
        dropout: route ``F.dropout`` calls too (torch's attention code). False leaves ``F.dropout`` untouched
            (timm's and transformers' attention modules, whose other dropout calls are sites of their own,
            routed by their code location).

    Yields:
        Nothing; the routes end when the block does.
    """
    previous = getattr(_routing, "route", None)
    _routing.route = (site, training, dropout)
    try:
        with contextlib.ExitStack() as patches:
            patches.enter_context(_patched("scaled_dot_product_attention", _routed_sdpa))
            if dropout:
                patches.enter_context(_patched("dropout", _routed_dropout))
            yield
    finally:
        _routing.route = previous
