"""timm awareness: the notrace modules and functions timm itself uses for torch.fx feature extraction."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch.nn as nn


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
    except ImportError:  # timm too old or absent: trace without its lists
        return [], []
    return list(_fx.get_notrace_modules()), list(_fx.get_notrace_functions())
