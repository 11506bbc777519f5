"""Attention dropout inside ``F.multi_head_attention_forward`` called from a model's own code (WavLM).

Some attention modules call torch's attention function directly instead of holding an
``nn.MultiheadAttention`` (transformers' WavLM passes ``self.dropout`` and ``self.training`` to it). torch's
function applies the rate itself, as ``dropout`` on the attention weights or as ``dropout_p`` of
``scaled_dot_product_attention``, where no code location of the model's own can be routed. The call itself
can: it is a torch function, so the dry run's ``TorchFunctionMode`` sees it with its rate, and at run time
the owner's method routes it, by its code location, to :func:`route_attention_function`. That runs torch's
function with those two globals sent to the site (:func:`cd_convert.sites.attention_routing.
route_torch_attention`), as ``nn.MultiheadAttention``'s runner does for the module's forward.

torch.fx cannot trace torch's function (it checks its inputs' ranks), so this kind has no fx detection: a model
calling it is found by the dry run, which transformers models get without example inputs.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

import torch.nn as nn
import torch.nn.functional as F

from ..found import FoundSite
from .attention_routing import route_torch_attention
from .base import SiteKind, submodule
from .routed import plan_routed_site, rate_attribute_of

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["ATTENTION_FUNCTION", "AttentionFunctionKind", "attention_function_rate", "route_attention_function"]

#: The torch function whose dropout this kind converts, and its name in reports.
ATTENTION_FUNCTION = F.multi_head_attention_forward
FUSED_OP = "multi_head_attention_forward"
#: Its parameter names in order, to bind a call's positional arguments (read from torch, so every release binds).
_PARAMETERS = tuple(inspect.signature(ATTENTION_FUNCTION).parameters)
_NOTE = (
    "torch's F.multi_head_attention_forward runs with its attention dropout applied by the site: explicit "
    "attention (softmax, concrete dropout, matmul) while the site is active, the call unchanged otherwise"
)


def _bound(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(zip(_PARAMETERS, args))
    bound.update(kwargs)
    return bound


def attention_function_rate(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, bool]:
    """The rate and training flag one ``F.multi_head_attention_forward`` call was made with.

    Args:
        args: the call's positional arguments.
        kwargs: its keyword arguments.

    Returns:
        ``(dropout_p, training)``; ``training`` is torch's default (True) when the call does not pass it.
    """
    bound = _bound(args, kwargs)
    return bound.get("dropout_p"), bool(bound.get("training", True))


def route_attention_function(
    owner: nn.Module, site: nn.Module, func: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Any:
    """A routed ``F.multi_head_attention_forward`` call, its attention dropout applied by ``site``.

    Args:
        owner: the module whose method made the call.
        site: its concrete site.
        func: torch's function.
        args: the call's positional arguments.
        kwargs: its keyword arguments.

    Returns:
        What torch's function returns: ``(attn_output, attn_weights)``.
    """
    bound = _bound(args, kwargs)
    training = bool(bound.get("training", True))
    if not (training or site.sampling is not None):
        return func(*args, **kwargs)  # eval: torch's function as the original code calls it (no dropout)
    # torch applies its dropout only when training and dropout_p > 0 (a site converted from rate 0 too); the
    # routed dropout then asks the site, which uses its own rate and the call's training flag.
    bound["training"] = True
    bound["dropout_p"] = bound.get("dropout_p") or 0.5
    with route_torch_attention(site, training):
        return func(**bound)


class AttentionFunctionKind(SiteKind):
    """The attention dropout of an ``F.multi_head_attention_forward`` call in a model's own code."""

    name = "fused"

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.fused_op == FUSED_OP

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        owner = submodule(planner.model, found.owner)
        entry = plan_routed_site(
            planner,
            found,
            kind=self.name,
            handler=route_attention_function,
            # freeze writes the rate there (WavLM: self.dropout)
            rate_attribute=rate_attribute_of(owner, found, planner.model),
        )
        if entry is not None and not entry.existing and _NOTE not in entry.row.notes:
            entry.row.notes.append(_NOTE)
