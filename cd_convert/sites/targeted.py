"""Targeted layers: a site on the input of each ``nn.Linear`` / ``nn.ConvNd`` that ``targets`` selects.

The layer gets a child ``concrete_dropout`` and a forward pre-hook (its own state_dict keys are unchanged);
``freeze`` turns it into ``nn.Sequential(nn.Dropout(p), layer)``. A layer that never runs as a module
(``nn.MultiheadAttention``'s ``out_proj``) gets no site: its parameter would get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Type

import torch.nn as nn

from ..consumers import ConsumerInfo
from ..found import Discovery
from ..layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d, ConcreteDropoutBase
from ..report import SiteRow
from ..targets import first_match
from .base import Change, SiteKind, frozen_dropout, parent_of, submodule

if TYPE_CHECKING:
    from ..planning import Planner

#: Child name of the site inserted in front of a targeted layer.
INPUT_SITE_CHILD = "concrete_dropout"
_INPUT_SITE_TYPES: Dict[type, Type[ConcreteDropoutBase]] = {
    nn.Conv1d: ConcreteDropout1d,
    nn.Conv2d: ConcreteDropout2d,
    nn.Conv3d: ConcreteDropout3d,
}


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
class InputSite(Change):
    """A site inserted on the input of a targeted Linear/Conv layer (child module + forward pre-hook)."""

    site_name: str
    layer: str
    child: str
    hook_id: int = -1
    kind: str = "targeted"

    PATH_FIELDS = ("layer",)

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        layer = root.get_submodule(self.layer)
        layer.add_module(self.child, site)
        self.hook_id = layer.register_forward_pre_hook(InputSiteHook(self.child)).id

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
        parent, attr = parent_of(root, self.layer)
        setattr(parent, attr, nn.Sequential(frozen_dropout(site), layer))

    def follows(self, root: nn.Module) -> nn.Module:
        return root.get_submodule(self.layer)


def layer_text(module: nn.Module) -> str:
    """A targeted layer as report text."""
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__}({module.in_features}->{module.out_features}) input"
    return f"{type(module).__name__}({module.in_channels}->{module.out_channels}) input"


def layer_called(model: nn.Module, name: str, discovery: Discovery) -> Optional[bool]:
    """Whether a targeted layer runs as a module: True (seen), False (known not to), None (not known)."""
    if name in discovery.called_modules:
        return True
    parent_name, _, attr = name.rpartition(".")
    if isinstance(submodule(model, parent_name), nn.MultiheadAttention) and attr == "out_proj":
        return False
    if discovery.dry_run:
        return False  # the dry run saw every module that ran
    if discovery.method == "module search" or any(name.startswith(leaf + ".") for leaf in discovery.leaves):
        return None
    return False


def _not_called_reason(model: nn.Module, name: str) -> str:
    if isinstance(submodule(model, name.rpartition(".")[0]), nn.MultiheadAttention):
        return "nn.MultiheadAttention uses this layer's weight directly and never calls it: no site created"
    return "never called as a module in the forward pass: no site created (its parameter would get no gradient)"


class TargetedLayerKind(SiteKind):
    """A site in front of a targeted weight layer (planned per layer, not from discovery)."""

    name = "targeted"

    def plan_layer(self, planner: "Planner", name: str, module: nn.Module) -> None:
        """Plan the site in front of ``module`` when ``targets`` selects it."""
        from ..planning import PlannedSite, consumer_text

        match = first_match(planner.targets, name, module)
        if match is None:
            return
        planner.used[id(match)] = True
        site_name = f"{name}.{INPUT_SITE_CHILD}"
        units = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        consumer = ConsumerInfo((name,), (f"{name}.weight",), units)
        original = layer_text(module)
        existing = getattr(module, INPUT_SITE_CHILD, None)
        if isinstance(existing, ConcreteDropoutBase):  # already converted: keep it, add nothing
            row = SiteRow(
                site_name,
                self.name,
                "existing",
                original,
                consumer=consumer_text(consumer),
                found_by="targets",
                called=True,
            )
            entry = planner.add(
                site_name, PlannedSite(row, type(existing), planner.options.init_p, None, None, existing=True)
            )
            entry.applications.append((consumer, None))
            return
        called = layer_called(planner.model, name, planner.discovery)
        if called is False:
            planner.rows.append(
                SiteRow(
                    name,
                    "-",
                    "not called",
                    original,
                    found_by="targets",
                    called=False,
                    notes=[_not_called_reason(planner.model, name)],
                )
            )
            return
        site_type = next((t for k, t in _INPUT_SITE_TYPES.items() if isinstance(module, k)), ConcreteDropout)
        row = SiteRow(
            site_name,
            self.name,
            "planned",
            original,
            None,
            consumer=consumer_text(consumer),
            found_by="targets",
            called=called,
        )
        entry = planner.add(
            site_name,
            PlannedSite(
                row,
                site_type,
                planner.options.init_p,
                planner.options.temperature_for(site_type),
                InputSite(site_name, name, INPUT_SITE_CHILD),
            ),
        )
        entry.applications.append((consumer, None))
