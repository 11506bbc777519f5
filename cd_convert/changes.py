"""The changes a conversion makes to a model, each able to apply, undo and freeze itself.

Every change is recorded in the model's collector, so ``unconvert`` can restore the original modules and
state_dict keys exactly and ``freeze`` can write the learned rates back as plain ``nn.Dropout*`` modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch.nn as nn

from .errors import FreezeError
from .interception import install, interceptors, uninstall
from .layers import ConcreteDropoutBase
from .targets import DROPOUT_TYPES

#: Concrete site class name -> the plain torch.nn module a frozen site becomes.
_FROZEN_TYPES = {
    "ConcreteDropout": nn.Dropout,
    "ConcreteDropout1d": nn.Dropout1d,
    "ConcreteDropout2d": nn.Dropout2d,
    "ConcreteDropout3d": nn.Dropout3d,
}


def _parent(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent_name, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def frozen_dropout(site: ConcreteDropoutBase) -> nn.Module:
    """The plain ``nn.Dropout*`` with the site's learned rate (and its train/eval mode)."""
    module = _FROZEN_TYPES[type(site).__name__](p=float(site.p.detach()))
    module.train(site.training)
    return module


@dataclass
class ModuleSwap:
    """An ``nn.Dropout*`` module replaced by a concrete site at every path it is registered under."""

    site_name: str
    paths: List[str]
    original: nn.Module
    kind: str = "module"

    def apply(self, root: nn.Module, site: nn.Module) -> None:
        for path in self.paths:
            parent, attr = _parent(root, path)
            setattr(parent, attr, site)

    def undo(self, root: nn.Module) -> None:
        for path in self.paths:
            parent, attr = _parent(root, path)
            setattr(parent, attr, self.original)

    def freeze(self, root: nn.Module) -> None:
        site = root.get_submodule(self.site_name)
        frozen = frozen_dropout(site)
        for path in self.paths:
            parent, attr = _parent(root, path)
            setattr(parent, attr, frozen)


class InputSiteHook:
    """Forward pre-hook that applies the layer's ``concrete_dropout`` child to its first input."""

    def __init__(self, child: str) -> None:
        self.child = child

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        site = getattr(module, self.child)
        if not site.active or not args:
            return None
        return (site(args[0]),) + tuple(args[1:])


@dataclass
class InputSite:
    """A site inserted on the input of a targeted Linear/Conv layer (child module + forward pre-hook)."""

    site_name: str
    layer: str
    child: str
    hook_id: int = -1
    kind: str = "targeted"

    def apply(self, root: nn.Module, site: nn.Module) -> None:
        layer = root.get_submodule(self.layer)
        layer.add_module(self.child, site)
        handle = layer.register_forward_pre_hook(InputSiteHook(self.child))
        self.hook_id = handle.id

    def undo(self, root: nn.Module) -> None:
        layer = root.get_submodule(self.layer)
        layer._forward_pre_hooks.pop(self.hook_id, None)
        delattr(layer, self.child)

    def freeze(self, root: nn.Module) -> None:
        # A plain model cannot carry our hook, so the layer becomes Sequential(Dropout, layer): its keys gain
        # a ".1" (documented in the README).
        layer = root.get_submodule(self.layer)
        site = getattr(layer, self.child)
        self.undo(root)
        parent, attr = _parent(root, self.layer)
        setattr(parent, attr, nn.Sequential(frozen_dropout(site), layer))


@dataclass
class MethodSite:
    """A site for a functional or fused call inside ``owner.<method>``, routed by call location."""

    site_name: str
    owner: str
    method: str
    child: str
    keys: List[Any] = field(default_factory=list)
    catch_all: bool = False
    rate_attribute: Optional[str] = None
    kind: str = "functional"

    def apply(self, root: nn.Module, site: nn.Module) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        owner.add_module(self.child, site)
        interceptor = install(owner, self.method)
        if self.catch_all:
            interceptor.catch_all = self.child
        for key in self.keys:
            interceptor.routes[key] = self.child

    def undo(self, root: nn.Module) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        interceptor = interceptors(owner).get(self.method)
        if interceptor is not None:
            for key in self.keys:
                interceptor.routes.pop(key, None)
            if self.catch_all:
                interceptor.catch_all = None
            if not interceptor.routes and interceptor.catch_all is None:
                uninstall(owner, self.method)
        delattr(owner, self.child)

    def freeze(self, root: nn.Module) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        site = getattr(owner, self.child)
        p = float(site.p.detach())
        if self.rate_attribute is None:
            raise FreezeError(
                f"site {self.site_name!r} is a {self.kind} call whose rate is not read from an attribute of "
                f"{type(owner).__name__}, so a plain model cannot carry the learned p={p:.4g}. Pass "
                "strict=False to freeze(...) to keep the original rate there (a warning names it)."
            )
        self.undo(root)
        holder_path, _, attribute = self.rate_attribute.rpartition(".")
        setattr(owner.get_submodule(holder_path) if holder_path else owner, attribute, p)


@dataclass
class AttributeChange:
    """A plain attribute set on a module (e.g. ``fused_attn = False``), restored on undo."""

    owner: str
    attribute: str
    old: Any
    new: Any
    site_name: str = ""
    kind: str = "attribute"

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        setattr(owner, self.attribute, self.new)

    def undo(self, root: nn.Module) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        setattr(owner, self.attribute, self.old)

    def freeze(self, root: nn.Module) -> None:
        self.undo(root)


class FusedAttentionHook:
    """Forward pre-hook: the attention module takes its explicit path only while its dropout site is active.

    In eval the fused kernel runs exactly as before conversion (bit-identical outputs, no extra memory);
    in training and Monte Carlo prediction the explicit path applies the concrete site.
    """

    def __init__(self, child: str) -> None:
        self.child = child

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        module.fused_attn = self.original and not getattr(module, self.child).active

    original: bool = True


@dataclass
class FusedAttentionSwitch:
    """Installs :class:`FusedAttentionHook` on a timm-style attention module (one with ``fused_attn``)."""

    owner: str
    child: str
    site_name: str = ""
    hook_id: int = -1
    original: Any = None
    kind: str = "attribute"

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        self.original = getattr(owner, "fused_attn", None)
        hook = FusedAttentionHook(self.child)
        hook.original = bool(self.original)
        self.hook_id = owner.register_forward_pre_hook(hook).id

    def undo(self, root: nn.Module) -> None:
        owner = root.get_submodule(self.owner) if self.owner else root
        owner._forward_pre_hooks.pop(self.hook_id, None)
        if self.original is not None:
            owner.fused_attn = self.original

    def freeze(self, root: nn.Module) -> None:
        self.undo(root)


def find_rate_attribute(owner: nn.Module, p: Optional[float]) -> Optional[str]:
    """Where a functional call's rate is read from, by value: the owner's float attribute equal to it (timm's
    ``drop_rate``), or a dropout child's ``p``; one whose name says "drop" wins over others.

    Args:
        owner: the module whose method makes the call.
        p: the rate the call was seen with.

    Returns:
        A path relative to ``owner`` (``"drop_rate"``, ``"dropout.p"``), or None when no single one matches.
    """
    if p is None:
        return None
    candidates = [
        name
        for name, value in vars(owner).items()
        if not name.startswith("_")
        and isinstance(value, float)
        and not isinstance(value, bool)
        and math.isclose(value, p, abs_tol=1e-12)
    ]
    candidates += [
        f"{name}.p"
        for name, child in owner.named_children()
        if isinstance(child, DROPOUT_TYPES) and math.isclose(float(child.p), p, abs_tol=1e-12)
    ]
    named = [c for c in candidates if "drop" in c.lower()]
    pool = named if len(candidates) > 1 else candidates
    return pool[0] if len(pool) == 1 else None
