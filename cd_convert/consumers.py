"""Consumers: the weight layers that read a dropout site's output in an fx graph.

The search follows a site's output through ops that only move data (:data:`TRANSPARENT_METHODS`,
:data:`TRANSPARENT_FUNCTIONS`, :data:`TRANSPARENT_MODULES`); the consumers are ``nn.Linear``, ``nn.ConvNd``,
``F.linear``/``F.conv*`` with a module weight, and ``nn.MultiheadAttention`` (its input projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

#: Tensor methods and functions that only move data: a site's consumer is looked for through them.
TRANSPARENT_METHODS = frozenset(
    {
        "flatten",
        "reshape",
        "view",
        "permute",
        "transpose",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "t",
        "view_as",
        "reshape_as",
        "to",
        "type",
        "float",
        "double",
        "half",
        "bfloat16",
        "type_as",
    }
)
TRANSPARENT_FUNCTIONS = frozenset(
    {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.t}
)
TRANSPARENT_MODULES: Tuple[type, ...] = (nn.Flatten, nn.Unflatten, nn.Identity)


@dataclass
class ConsumerInfo:
    """The weights that read a site's output.

    Attributes:
        modules: qualified names of the consuming modules (for the report).
        weights: qualified names of their weight parameters.
        units: K, the consumer's input features (Linear) or channels (ConvNd).
    """

    modules: Tuple[str, ...]
    weights: Tuple[str, ...]
    units: int


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer whose weight is stored as (in, out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def module_units(module: nn.Module) -> Optional[int]:
    """K of a weight layer: the input features (Linear, transformers' Conv1D) or input channels (ConvNd).

    Args:
        module: any module.

    Returns:
        K, or None when ``module`` is not a weight layer the regulariser knows.
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    if is_transposed_linear(module):
        return int(module.weight.shape[0])
    return None


def _weight_consumer(
    user: fx.Node, source: fx.Node, modules: Dict[str, nn.Module], root: nn.Module
) -> Optional[ConsumerInfo]:
    if user.op == "call_module":
        module = modules.get(user.target)
        if module is None:
            return None
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and user.args and user.args[0] is source:
            units = module_units(module)
            if units is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                return ConsumerInfo((user.target,), (f"{user.target}.weight",), units)
        if isinstance(module, nn.MultiheadAttention):
            positions = [i for i, a in enumerate(user.args[:3]) if a is source]
            positions += [
                ("query", "key", "value").index(k)
                for k, v in user.kwargs.items()
                if v is source and k in ("query", "key", "value")
            ]
            if positions:
                if module.in_proj_weight is not None:
                    return ConsumerInfo((user.target,), (f"{user.target}.in_proj_weight",), module.embed_dim)
                names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                weights = tuple(f"{user.target}.{names[i]}" for i in sorted(set(positions)))
                units = getattr(module, names[positions[0]]).shape[1]
                return ConsumerInfo((user.target,), weights, units)
        return None
    if user.op == "call_function" and user.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
        weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
        if user.args and user.args[0] is source and isinstance(weight, fx.Node) and weight.op == "get_attr":
            try:
                tensor = root.get_parameter(weight.target)
            except AttributeError:
                return None
            units = tensor.shape[1]
            if user.target is not F.linear:
                groups = user.args[6] if len(user.args) > 6 else user.kwargs.get("groups", 1)
                units *= int(groups)
            owner = weight.target.rpartition(".")[0]
            return ConsumerInfo((owner,), (weight.target,), units)
    return None


def _is_transparent(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in TRANSPARENT_METHODS
    if node.op == "call_function":
        return node.target in TRANSPARENT_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), TRANSPARENT_MODULES)
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def find_consumer(node: fx.Node, modules: Dict[str, nn.Module], root: nn.Module) -> Tuple[Optional[ConsumerInfo], str]:
    """Follow a site's output through data-moving ops to the weight layers that read it.

    Args:
        node: the site's graph node.
        modules: ``dict(root.named_modules())``.
        root: the traced model.

    Returns:
        ``(consumer, note)``: the consumer (several weights when several layers read the same dropped
        tensor, e.g. separate q/k/v projections), or None with the reason.
    """
    found: List[ConsumerInfo] = []
    frontier = [node]
    while frontier:
        current = frontier.pop()
        users = list(current.users)
        if not users:
            continue
        for user in users:
            if _is_transparent(user, modules) and user.args and user.args[0] is current:
                frontier.append(user)
                continue
            consumer = _weight_consumer(user, current, modules, root)
            if consumer is None:
                return None, f"output also goes to {_describe(user)}, not only to weight layers"
            found.append(consumer)
    if not found:
        return None, "output is not used by any layer"
    units = {c.units for c in found}
    if len(units) != 1:
        return None, "output is read by layers of different input widths"
    modules_ = tuple(dict.fromkeys(m for c in found for m in c.modules))
    weights = tuple(dict.fromkeys(w for c in found for w in c.weights))
    return ConsumerInfo(modules_, weights, units.pop()), ""
