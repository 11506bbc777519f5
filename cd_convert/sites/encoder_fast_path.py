"""Keep ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` off their eval fast path while a site is active.

In eval, torch's encoder layer runs one fused kernel (``torch._transformer_encoder_layer_fwd``) that reads the
attention and feed-forward weights directly and skips every child module, its dropouts included, and the
encoder turns padded batches into nested tensors for it. Under Monte Carlo prediction the model is in eval
while its sites sample, so the fast path would silently return the deterministic output: every MC sample the
same, zero uncertainty. Recent torch (2.14.1 here) leaves the fast path when a module has forward hooks (a
converted layer has some); older releases do not (checked: 2.1.2 and 2.4.1). This switch makes the layer take its
ordinary path while one of its sites is active, on every release: the fast-path checks read the module's own
``training`` flag (the layer's, and the encoder's first layer's), which is set for the call and restored; the
children keep their modes, so nothing else changes (the ordinary path in eval is what the fast path computes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .._tracing import thread_key
from .base import Change, remove_forward_hooks, submodule

__all__ = ["EncoderFastPathSwitch", "encoder_fast_path_switches"]

_FAST_PATH_OWNERS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


@dataclass
class EncoderFastPathHook:
    """Forward pre-hook and post-hook: the ordinary path while any of ``sites`` is active.

    Attributes:
        sites: the concrete sites below the module (shared references: a deep copy maps them to the copy's).
        calls: per thread, a stack of the flags each call set, as ``(module, training before)`` pairs.
    """

    sites: List[nn.Module]
    calls: Dict[int, List[List[Tuple[nn.Module, bool]]]] = field(default_factory=dict)

    @staticmethod
    def _flag_holders(module: nn.Module) -> List[nn.Module]:
        """The modules whose own ``training`` flag the fast-path check of ``module`` reads."""
        if isinstance(module, nn.TransformerEncoder):
            return list(module.layers[:1])  # the encoder checks its first layer
        return [module]

    def before(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        saved: List[Tuple[nn.Module, bool]] = []
        if not module.training and any(site.active for site in self.sites):
            for holder in self._flag_holders(module):
                saved.append((holder, holder.training))
                holder.training = True  # the flag only: children keep their eval mode
        self.calls.setdefault(thread_key(), []).append(saved)

    def after(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        calls = self.calls.get(thread_key())
        if calls:
            for holder, training in calls.pop():
                holder.training = training

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, calls={})  # open calls belong to a forward in progress


@dataclass
class EncoderFastPathSwitch(Change):
    """Installs :class:`EncoderFastPathHook` on one ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder``.

    Attributes:
        owner: qualified name of the layer or encoder.
        site_names: qualified names of the sites below it.
    """

    owner: str
    site_names: List[str]
    site_name: str = ""
    kind: str = "attribute"
    hook_ids: Tuple[int, int] = (-1, -1)

    PATH_FIELDS = ("owner", "site_names")

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = submodule(root, self.owner)
        hook = EncoderFastPathHook([root.get_submodule(name) for name in self.site_names])
        pre = owner.register_forward_pre_hook(hook.before)
        post = owner.register_forward_hook(hook.after, always_call=True)
        self.hook_ids = (pre.id, post.id)

    def undo(self, root: nn.Module) -> None:
        remove_forward_hooks(submodule(root, self.owner), *self.hook_ids)


def encoder_fast_path_switches(model: nn.Module, site_names: List[str]) -> List[EncoderFastPathSwitch]:
    """One switch per torch encoder layer or encoder that holds one of ``site_names`` (sites new in this
    conversion; a layer converted before keeps the switch it got then).

    Args:
        model: the model being converted.
        site_names: qualified names of the planned sites (a site routed inside a module, such as the attention
            dropout of ``nn.MultiheadAttention``, is named below that module).

    Returns:
        The switches, outermost first.
    """
    switches = []
    for name, module in model.named_modules():
        if isinstance(module, _FAST_PATH_OWNERS):
            below = [s for s in site_names if not name or s.startswith(name + ".")]
            if below:
                switches.append(EncoderFastPathSwitch(name, below))
    return switches
