"""Consumers: the weight layers that read a dropout site's output in an fx graph; and producers' widths.

The search follows a site's output through ops that only move data (:data:`TRANSPARENT_METHODS`,
:data:`TRANSPARENT_FUNCTIONS`, :data:`TRANSPARENT_MODULES`); the consumers are ``nn.Linear``, ``nn.ConvNd``,
``F.linear``/``F.conv*`` with a module weight, and ``nn.MultiheadAttention`` (its input projection).

A site without a consumer still needs its width K (the dropped feature dim) for the entropy term;
:func:`produced_width` reads it off the layer that produces the site's input when the model fixes it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConsumerInfo",
    "TRANSPARENT_FUNCTIONS",
    "TRANSPARENT_METHODS",
    "find_consumer",
    "module_units",
    "per_mask_value_units",
    "produced_width",
]

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
#: Reads of a tensor's metadata (``x.view(x.size(0), -1)``): they do not consume its values.
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device", "is_contiguous"})
METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"})


@dataclass
class ConsumerInfo:
    """The weights that read a site's output.

    Attributes:
        modules: qualified names of the consuming modules (for the report).
        weights: qualified names of their weight parameters.
        units: K, the consumer's input features (Linear) or channels (ConvNd); None when K is the site's own
            width instead (a channel-wise site read by a Linear after a flatten: one mask value per channel,
            not per input feature of the Linear; see :func:`per_mask_value_units`).
    """

    modules: Tuple[str, ...]
    weights: Tuple[str, ...]
    units: Optional[int]


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


def _reads_metadata_only(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in METADATA_ATTRIBUTES
    )


def per_mask_value_units(consumer: ConsumerInfo, root: nn.Module) -> ConsumerInfo:
    """The consumer of a channel-wise site, with K counting the site's mask values.

    The entropy term counts the independent Bernoulli variables of the mask: a channel-wise site draws one
    per channel, so K is its channel count. A conv consumer's ``in_channels`` is that count; a Linear read
    through a flatten has ``in_features`` = channels x positions, which would overcount, so K is left to the
    site's own width (:attr:`ConsumerInfo.units` None).

    Args:
        consumer: the consumer found for a channel-wise site.
        root: the model.

    Returns:
        ``consumer`` itself when every weight is a conv weight, else a copy with ``units=None``.
    """
    try:
        convs = all(root.get_parameter(name).dim() > 2 for name in consumer.weights)
    except AttributeError:
        convs = False
    return consumer if convs else ConsumerInfo(consumer.modules, consumer.weights, None)


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
            if _reads_metadata_only(user):
                continue
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


#: Modules that keep their input's shape and dims (element-wise): a producer's width is looked for through them.
SHAPE_KEEPING_MODULES: Tuple[type, ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Dropout,
    nn.modules.dropout._DropoutNd,
)
SHAPE_KEEPING_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu6,
        F.gelu,
        F.silu,
        F.mish,
        F.tanh,
        F.sigmoid,
        F.leaky_relu,
        F.elu,
        F.hardswish,
        F.softplus,
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        F.dropout,
        torch.dropout,
    }
)
SHAPE_KEEPING_METHODS = frozenset(
    {"relu", "sigmoid", "tanh", "contiguous", "float", "double", "half", "bfloat16", "to", "type", "type_as", "clone"}
)
#: Broadcasting element-wise ops: the result's width is that of an operand whose width is known and not 1.
BROADCASTING_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
BROADCASTING_METHODS = frozenset({"add", "sub", "mul"})
_MAX_DEPTH = 32


def _module_width(module: nn.Module, channelwise: bool) -> Optional[int]:
    """The width a layer's output has by construction, in the dim a site of that kind drops."""
    if channelwise:
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.num_features
        return None
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_transposed_linear(module):
        return int(module.weight.shape[1])
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return None


def produced_width(
    node: Any, modules: Dict[str, nn.Module], root: nn.Module, channelwise: bool, depth: int = 0
) -> Optional[int]:
    """The width K of the tensor ``node`` computes, when the model fixes it (no input shapes needed).

    K is the last dim (element-wise sites) or the channel dim (channel-wise sites), never a batch or
    sequence dim: it is read off a producing ``nn.Linear`` (``out_features``), ``nn.LayerNorm``
    (``normalized_shape``), ``nn.Embedding``, ``F.linear``/``F.layer_norm``, a parameter added to the
    activations (its last dim, as a position embedding), or for channel-wise sites ``nn.ConvNd``
    (``out_channels``) / BatchNorm, through element-wise ops that keep every dim (activations, ``.to``).
    Ops that move dims (reshape, permute, softmax over attention scores) end the search: then None.

    Args:
        node: the fx node (or constant) whose value the site receives.
        modules: ``dict(root.named_modules())``.
        root: the traced model.
        channelwise: the site drops whole channels (dim 1) instead of elements (last dim).
        depth: recursion depth (internal).

    Returns:
        K, or None when the graph does not fix it.
    """
    if not isinstance(node, fx.Node) or depth > _MAX_DEPTH:
        return None
    walk = lambda arg: produced_width(arg, modules, root, channelwise, depth + 1)  # noqa: E731
    if node.op == "get_attr":
        try:
            tensor = root.get_parameter(node.target)
        except AttributeError:
            tensor = None
        # A parameter broadcast onto the activations (right-aligned) fixes their last dim, not dim 1.
        if isinstance(tensor, torch.Tensor) and not channelwise and tensor.dim() and tensor.shape[-1] != 1:
            return int(tensor.shape[-1])
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, SHAPE_KEEPING_MODULES):
            return walk(node.args[0]) if node.args else None
        return _module_width(module, channelwise) if module is not None else None
    if node.op == "call_function":
        if node.target is F.linear and not channelwise and len(node.args) > 1:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                try:
                    return int(root.get_parameter(weight.target).shape[0])  # (out_features, in_features)
                except AttributeError:
                    return None
            return None
        if node.target is F.layer_norm and not channelwise:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            return int(shape[-1]) if isinstance(shape, (tuple, list)) and shape and isinstance(shape[-1], int) else None
        if node.target in SHAPE_KEEPING_FUNCTIONS:
            return walk(node.args[0]) if node.args else None
        if node.target in BROADCASTING_FUNCTIONS:
            return _broadcast_width(node.args[:2], walk)
        return None
    if node.op == "call_method":
        if node.target in SHAPE_KEEPING_METHODS:
            return walk(node.args[0])
        if node.target in BROADCASTING_METHODS:
            return _broadcast_width(node.args[:2], walk)
    return None


def _broadcast_width(operands: Sequence[Any], walk: Callable[[Any], Optional[int]]) -> Optional[int]:
    # a + b broadcasts each dim: a known size other than 1 is the result's size (or the op would fail).
    for operand in operands:
        width = walk(operand)
        if width is not None and width != 1:
            return width
    return None
