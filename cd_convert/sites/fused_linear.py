"""A targeted ``nn.Linear`` and its input site in one C++ autograd node (with :mod:`cd_convert.cpu_extension`).

On the CPU, at the paper's UCI shape (batch 32, 50 units), a training step costs per autograd node, per op and
per Python call more than per element. A targeted layer's input site and the layer are two nodes (the site's,
and the Linear's ``addmm`` with its weight's transpose) behind a forward pre-hook, which also sends every call
of the layer through ``Module.__call__``'s slower path for hooked modules. The extension's ``site_linear``
computes both in one node: the same mask on the same noise, ``y = (x m) W^T + b``, and in the backward pass two
matmuls, one sum and one loop for the input's and the logit's gradients; the values are those of the site
followed by ``F.linear``.

While the extension is switched on, the input-site pre-hook (:class:`cd_convert.sites.targeted.InputSiteHook`)
puts a layer into *fused mode* at a call the node applies to, when nothing else hooks the layer
(:func:`enter`): the pre-hook steps aside and :class:`FusedLinearForward`, on the layer's instance, applies the
site itself, in the node where it applies and as the site followed by ``F.linear`` otherwise. It hands the layer
back to the pre-hook (:meth:`FusedLinearForward.leave`) when another hook appears on the layer (or a global module
hook), the extension is switched off, or an input arrives on another device (where the pre-hook's recomputation
serves a GPU).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_extension, host_scalars, replicas
from ..layers import ConcreteDropoutBase, logit_bound

__all__ = ["FusedLinearForward", "applies", "enter", "remove"]

_module_hooks = nn.modules.module  # the global hook registries live in this module


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


def applies(layer: nn.Module, site: nn.Module, x: Any) -> bool:
    """Whether the fused node computes this call of ``layer`` with its input site ``site``.

    It does for a training call, with gradients, of an exact ``nn.Linear`` with an element-wise site on plain CPU
    float32/float64 tensors of one dtype, without CPU autocast, while the extension is switched on and nothing
    hooks the site (its call is not made as a module call) or every module (global hooks). This runs on every
    call: it reads the modules' dicts directly, as ``Module.__getattr__`` costs about a microsecond a lookup.

    Args:
        layer: the targeted layer.
        site: its input site.
        x: the layer's input.

    Returns:
        True when the call can run in ``site_linear``.
    """
    if (
        cpu_extension._MODULE is None
        or type(layer) is not nn.Linear
        or not isinstance(site, ConcreteDropoutBase)
        or site.channelwise
        or site.sampling is not None
        or not site.training
        or site.units_seen is None  # the site's first call records its width: let it make that call
    ):
        return False
    params = layer._parameters
    weight, bias = params["weight"], params["bias"]
    if not (
        host_scalars.call_route(x, site._parameters["p_logit"])  # None off the route, False without gradients
        and x.dim() >= 1
        and x.size(-1) == layer.in_features
        and host_scalars.plain_cpu_float(weight)
        and weight.dtype == x.dtype
        and (bias is None or (host_scalars.plain_cpu_float(bias) and bias.dtype == x.dtype))
    ):
        return False
    if site._forward_pre_hooks or site._forward_hooks or _module_hooks._global_forward_pre_hooks:
        return False
    return not (_module_hooks._global_forward_hooks or _autocast_on_cpu())


class FusedLinearForward:
    """Stands in for a targeted ``nn.Linear``'s ``forward`` on the instance while the layer is in fused mode.

    Args:
        layer: the layer.
        child: the name of its input site.
        hook_id: the id its input-site pre-hook was registered under.
        hook: that pre-hook, put back by :meth:`leave`.
    """

    def __init__(self, layer: nn.Linear, child: str, hook_id: int, hook: Callable) -> None:
        self.layer = layer
        self.child = child
        self.hook_id = hook_id
        self.hook = hook

    def __call__(self, input: Any) -> Tensor:
        layer = self.layer
        site = layer._modules[self.child]
        params = layer._parameters
        if (
            layer._forward_pre_hooks
            or layer._forward_hooks
            or _module_hooks._global_forward_pre_hooks
            or _module_hooks._global_forward_hooks
            or cpu_extension._MODULE is None
            or (isinstance(input, Tensor) and not input.is_cpu)
        ):
            # Other hooks would see the unmasked input (or miss the pre-hook's masked one), or the pre-hook serves
            # this device better: this call is computed below, the next ones go through the pre-hook again.
            self.leave()
        elif applies(layer, site, input):
            return cpu_extension._MODULE.site_linear(
                input,
                site._parameters["p_logit"],
                params["weight"],
                params["bias"],
                None,
                site.temperature,
                logit_bound(site.eps),
            )
        if site.active:
            input = site(input)
        return F.linear(input, params["weight"], params["bias"])

    def leave(self) -> None:
        """Hand the layer back to its input-site pre-hook (registered again under its id)."""
        layer = self.layer
        if layer.__dict__.get("forward") is self:
            del layer.__dict__["forward"]
            layer._forward_pre_hooks[self.hook_id] = self.hook
            replicas.untrack(layer)


def enter(layer: nn.Module, site: nn.Module, x: Any, child: str, hook_id: Optional[int], hook: Callable) -> None:
    """Put ``layer`` into fused mode if the fused node applies to this call and nothing else hooks the layer.

    Called by the input-site pre-hook while the extension is switched on; the call itself still takes the
    pre-hook's path (``Module.__call__`` has read the layer's ``forward`` before running its pre-hooks).

    Args:
        layer: the targeted layer.
        site: its input site (active).
        x: the layer's input.
        child: the site's name on the layer.
        hook_id: the id the pre-hook is registered under (None: not known, no fused mode).
        hook: the pre-hook.
    """
    if (
        hook_id is None
        or "forward" in layer.__dict__  # someone else's forward wrapper: keep out of its way
        or list(layer._forward_pre_hooks) != [hook_id]
        or layer._forward_hooks
        or not applies(layer, site, x)
    ):
        return
    layer.__dict__["forward"] = FusedLinearForward(layer, child, hook_id, hook)
    del layer._forward_pre_hooks[hook_id]
    replicas.track(layer)


def remove(layer: nn.Module) -> Optional[Callable]:
    """Take ``layer`` out of fused mode without handing it back (undo, freeze).

    Returns:
        The input-site pre-hook the layer had set aside, or None when it was not in fused mode.
    """
    current = layer.__dict__.get("forward")
    if not isinstance(current, FusedLinearForward):
        return None
    del layer.__dict__["forward"]
    replicas.untrack(layer)
    return current.hook


def _in_fused_mode(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), FusedLinearForward)


def _rebind_fused(module: nn.Module, replica: nn.Module) -> None:
    """An ``nn.DataParallel`` replica of a layer in fused mode goes through the input-site pre-hook (see
    :mod:`cd_convert.replicas`), in a pre-hook dict of its own: the copied ``__dict__`` shares the original's."""
    fused = replica.__dict__.pop("forward")
    hooks = OrderedDict(replica._forward_pre_hooks)
    hooks[fused.hook_id] = fused.hook
    replica._forward_pre_hooks = hooks


replicas.register_rebinder(_in_fused_mode, _rebind_fused)
