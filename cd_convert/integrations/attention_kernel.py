"""The fused concrete-attention kernel, as the integrations' hooks reach it.

timm's and transformers' attention hooks decide per call whether an active attention site can run in the
fused kernel (:mod:`cd_convert.fused_attention`) and, if so, route the attention module's
``scaled_dot_product_attention`` call to it for the duration of the module's forward. The sites package
imports the integrations, so what this module needs from it is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._tracing import being_traced

__all__ = ["kernel_can_route", "open_route"]


@functools.lru_cache(maxsize=1)
def _imports() -> Tuple[Any, Callable, Callable]:
    from .. import fused_attention
    from ..sites.attention import kernel_applies
    from ..sites.attention_routing import route_torch_attention

    return fused_attention, kernel_applies, route_torch_attention


def kernel_can_route(sites: Sequence[nn.Module], device: Optional[torch.device]) -> bool:
    """Whether attention on ``device`` with these active sites can take the fused kernel.

    Args:
        sites: the attention sites involved.
        device: where the attention runs (None: unknown, which never routes).

    Returns:
        True when not under a tracer (a compiled graph keeps the explicit path, which Inductor fuses), the kernels
        are available, the device is a GPU (or the CPU under the tests' interpreter flag) and every site's mode
        is one the kernel draws (:func:`cd_convert.sites.attention.kernel_applies`).
    """
    if device is None or being_traced():
        return False
    fused_attention, kernel_applies, _ = _imports()
    return fused_attention.runs_on(device) and all(kernel_applies(site) for site in sites)


def open_route(site: nn.Module, training: bool) -> contextlib.ExitStack:
    """Route this thread's ``F.scaled_dot_product_attention`` calls to ``site`` until the returned stack closes.

    Args:
        site: the attention site.
        training: the attention module's training flag.

    Returns:
        An entered ``ExitStack``; ``close()`` it when the attention module's forward ends.
    """
    route_torch_attention = _imports()[2]
    stack = contextlib.ExitStack()
    stack.enter_context(route_torch_attention(site, training, dropout=False))
    return stack
