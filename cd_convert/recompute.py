"""A fused site's output, saved by the layer it feeds, recomputed from the seed in the backward pass.

A site inserted in front of a targeted ``Conv``/``Linear`` layer makes a new tensor ``y`` (the masked input),
and the layer keeps ``y`` for its weight gradient: one more activation per targeted layer, which the
unconverted model never had (a ResNet-50 with ``targets=[nn.Conv2d]`` peaked at 1.46x the unconverted
model's memory in bf16 on an H200). The fused kernels (:mod:`cd_convert.fused`) make ``y`` from the site's
input ``x``, its logit and a seed, all of which the site keeps anyway, so while the layer runs its forward
these saved-tensor hooks store a reference to the site's autograd node instead of ``y``, and the backward pass
makes ``y`` again with one forward kernel (bit for bit the same values): the layer's saved input costs no
memory.

The site then keeps ``x`` for its own backward pass, not ``y`` (its ``save_output`` is overridden for the
call): the two together keep one tensor, as before, but ``x`` is often kept anyway by the op that made it
(a ReLU keeps its output), where ``y`` never was. It applies where it is exact and safe: ``y`` is the direct,
unmodified output of the fused function, and no other saved-tensor hooks are active (activation
checkpointing, ``save_on_cpu`` and the like keep their own behaviour: the layer then saves ``y`` as before).
``CD_CONVERT_RECOMPUTE=0`` in the environment, or ``cd_convert.recompute.ENABLED = False``, turns it off.
"""

from __future__ import annotations

import os
import threading
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from . import fused

__all__ = ["ENABLED", "may_apply", "applies", "LayerRecompute"]

#: Master switch; the environment variable ``CD_CONVERT_RECOMPUTE=0`` sets it to False at import.
ENABLED = os.environ.get("CD_CONVERT_RECOMPUTE", "1") != "0"

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _other_hooks_active() -> bool:
    """Whether saved-tensor hooks are already active (unknown on a torch without the query: assume they are)."""
    if _top_hooks is None:
        return True
    try:
        return _top_hooks(False) is not None  # the argument: ignore_is_tracing (recent torch)
    except TypeError:  # older torch: no argument
        return _top_hooks() is not None


def may_apply(x: Any, site: Any) -> bool:
    """Whether a targeted layer's site, called on ``x``, should keep ``x`` so that its output can be recomputed.

    Args:
        x: the layer's input.
        site: the layer's (active) input site.

    Returns:
        True where the site's call will take the fused kernels (a GPU tensor they support, or the CPU under the
        tests' interpreter flag; the relaxed mask; not under a tracer), gradients are enabled and no other
        saved-tensor hooks are active. Elsewhere the site keeps what it always keeps.
    """
    if not (ENABLED and isinstance(x, Tensor) and (x.is_cuda or fused.INTERPRET_ON_CPU)):
        return False
    if site.sampling not in (None, "relaxed") or not torch.is_grad_enabled() or _other_hooks_active():
        return False
    channel_dim = site._channel_dim(x) if site.channelwise else 1
    return fused.supports(x, site.channelwise, channel_dim, interpret=fused.INTERPRET_ON_CPU)


def applies(y: Any) -> bool:
    """Whether ``y``, a site's output, can be recomputed instead of saved by the layer it feeds.

    Args:
        y: what the site returned (called where :func:`may_apply` held).

    Returns:
        True for the unmodified output of the fused function that kept its input.
    """
    return isinstance(y, Tensor) and fused.made_by_fused_site(y)


class _Recomputed:
    """What a layer saves instead of a site's output: the site's autograd node (it holds ``x``, the logit and
    the seed)."""

    __slots__ = ("node",)

    def __init__(self, node: Any) -> None:
        self.node = node


class _Hooks:
    """The pack/unpack pair for one layer call: ``y`` becomes a :class:`_Recomputed`, everything else is kept."""

    def __init__(self, y: Tensor) -> None:
        self.node = y.grad_fn

    def pack(self, t: Tensor) -> Any:
        # Only y itself has the site's node as its grad_fn (a view of it has a view's node; an in-place change
        # replaces the node and bumps the version).
        if t.grad_fn is self.node and t._version == 0:
            return _Recomputed(self.node)
        return t

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        if isinstance(saved, _Recomputed):
            return fused.recompute_output(saved.node)
        return saved


class LayerRecompute:
    """Enter the hooks for one targeted layer call (after its input site ran) and leave them when it ends.

    Only calls that recompute push an entry, so a call that does not (the CPU, eval) costs one attribute test at
    its end. Per thread: ``nn.DataParallel``'s replicas share the layer's hooks.
    """

    def __init__(self) -> None:
        self._open = threading.local()

    def enter(self, y: Any) -> None:
        """Start recomputing ``y`` for the layer call that is starting, where :func:`applies`.

        Args:
            y: the site's output.
        """
        if applies(y):
            hooks = _Hooks(y)
            context = torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)
            context.__enter__()
            self._stack().append(context)

    def leave(self) -> None:
        """End the hooks of the call that is ending, if it entered any.

        A layer calling itself would end its outer call's hooks early: that outer call then saves the rest of
        what it saves as usual (what was already packed is still recomputed). Nothing is left open either way.
        """
        stack = getattr(self._open, "stack", None)
        if stack:
            stack.pop().__exit__(None, None, None)

    def _stack(self) -> List[Any]:
        stack: Optional[List[Any]] = getattr(self._open, "stack", None)
        if stack is None:
            stack = self._open.stack = []
        return stack

    def __getstate__(self) -> Tuple[()]:
        return ()  # open hooks belong to a call in progress

    def __setstate__(self, state: Tuple[()]) -> None:
        self._open = threading.local()
