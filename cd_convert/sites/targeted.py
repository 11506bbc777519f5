"""Targeted layers: a site on the input of each ``nn.Linear`` / ``nn.ConvNd`` that ``targets`` selects.

The layer gets a child ``concrete_dropout`` and a forward pre-hook (its own state_dict keys are unchanged);
``freeze`` turns it into ``nn.Sequential(nn.Dropout(p), layer)``. A layer that never runs as a module
(``nn.MultiheadAttention``'s ``out_proj``) gets no site: its parameter would get no gradient.

A targeted layer whose input already comes from a dropout site (directly or through ops that only move
data, :mod:`cd_convert.consumers`) **absorbs** it: that dropout becomes the layer's learned site, converted
by its own kind (module swap, routed call) from its own rate, and no input site is added, so each tensor is
dropped once. The planner selects such a dropout (:meth:`TargetedLayerKind.absorptions`) before the
targeted layers are planned; the layer's row then says "absorbed". A dropout that stays fixed (excluded,
rate 0 with ``include_zero_rate=False``) is not absorbed: the layer gets its own input site, as does a layer
that is excluded, already has an input site, or is reached only through other ops (ReLU, add, norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple, Type

import torch.nn as nn

from .. import cpu_extension
from ..consumers import ConsumerInfo
from ..found import Discovery, FoundSite
from ..layers import ConcreteDropoutBase
from ..recompute import LayerRecompute
from ..recompute import may_apply as may_recompute
from ..report import SiteRow
from ..targets import MODULE_SITE_TYPES, first_match
from . import fused_linear
from .base import Change, SiteKind, frozen_dropout, parent_of, remove_forward_hooks, submodule

if TYPE_CHECKING:
    from ..planning import PlannedSite, Planner

__all__ = ["TargetedLayerKind", "INPUT_SITE_CHILD"]

#: Child name of the site inserted in front of a targeted layer.
INPUT_SITE_CHILD = "concrete_dropout"
#: Layer type -> the site type on its input: a ConvNd's drops whole channels, as ``nn.DropoutNd`` does.
_INPUT_SITE_TYPES: Dict[type, Type[ConcreteDropoutBase]] = {
    nn.Conv1d: MODULE_SITE_TYPES[nn.Dropout1d],
    nn.Conv2d: MODULE_SITE_TYPES[nn.Dropout2d],
    nn.Conv3d: MODULE_SITE_TYPES[nn.Dropout3d],
}


class InputSiteHook:
    """Forward pre-hook that applies the layer's ``concrete_dropout`` child to its first input.

    Where the site runs in the fused kernels, the layer's call recomputes the masked input in the backward pass
    instead of saving it (:mod:`cd_convert.recompute`); :class:`InputSiteEnd`, registered by the first such call,
    ends that after each call. With the C++ CPU extension switched on, an ``nn.Linear`` whose training calls the
    extension's fused site-and-Linear node serves is put into fused mode (:mod:`cd_convert.sites.fused_linear`):
    this hook steps aside while the layer's forward applies the site.
    """

    def __init__(self, child: str) -> None:
        self.child = child
        self.recompute = LayerRecompute()
        self.end_hook_id: Optional[int] = None  # InputSiteEnd, registered by the first call that recomputes
        self.hook_id: Optional[int] = None  # its own id on the layer, set when registered (for the fused mode)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        site = getattr(module, self.child)
        if not site.active or not args:
            return None
        recompute = self.__dict__.get("recompute")  # None in a hook pickled before it existed
        if recompute is None or not may_recompute(args[0], site):
            if cpu_extension._MODULE is not None and len(args) == 1:  # from the next call on, maybe one fused node
                fused_linear.enter(module, site, args[0], self.child, self.__dict__.get("hook_id"), self)
            return (site(args[0]),) + tuple(args[1:])
        if self.end_hook_id not in module._forward_hooks:
            # Registered on first need, so that a layer that never recomputes (the CPU) pays for no forward hook;
            # hooks registered by a pre-hook run in the same call.
            self.end_hook_id = module.register_forward_hook(InputSiteEnd(self), always_call=True).id
        y = site(args[0], save_output=False)  # the layer's copy is recomputed: the site keeps the input
        recompute.enter(y)
        return (y,) + tuple(args[1:])


class InputSiteEnd:
    """Forward hook (``always_call``: also when the forward raises) that ends what the pre-hook's call started."""

    def __init__(self, start: InputSiteHook) -> None:
        self.start = start

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        recompute = self.start.__dict__.get("recompute")
        if recompute is not None:
            recompute.leave()


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
        hook = InputSiteHook(self.child)
        self.hook_id = hook.hook_id = layer.register_forward_pre_hook(hook).id

    def undo(self, root: nn.Module) -> None:
        layer = root.get_submodule(self.layer)
        start = layer._forward_pre_hooks.get(self.hook_id) or fused_linear.remove(layer)
        remove_forward_hooks(layer, self.hook_id, getattr(start, "end_hook_id", None))
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
    parent, attr = parent_of(model, name)
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return False
    if discovery.dry_run:
        return False  # the dry run saw every module that ran
    if discovery.method == "module search" or any(name.startswith(leaf + ".") for leaf in discovery.leaves):
        return None
    return False


def _consumer_modules(model: nn.Module, consumer: Optional[ConsumerInfo]) -> List[nn.Module]:
    """The weight layers of a site's consumer (they read its output through data-moving ops only)."""
    modules = []
    for name in consumer.modules if consumer is not None else ():
        try:
            modules.append(submodule(model, name))
        except AttributeError:  # a consumer named by a path the model no longer has
            continue
    return modules


def _dropout_label(found: FoundSite) -> str:
    """A found dropout site as report text."""
    if found.module_name:
        return found.module_name
    return f"{found.owner or '<root>'}.{found.method or '?'} ({found.function or found.fused_op})"


def _absorber(planner: "Planner", module: nn.Module) -> Optional["PlannedSite"]:
    """The planned (or existing) site whose output ``module`` reads through data-moving ops, if any."""
    for entry in planner.planned.values():
        for consumer, _ in entry.applications:
            if any(reader is module for reader in _consumer_modules(planner.model, consumer)):
                return entry
    return None


def _note_site_for(row: SiteRow, layer: str) -> None:
    """Say on an absorbing site's row which targeted layers it is the site for (one note, layers appended)."""
    prefix = "site for targeted "
    for i, note in enumerate(row.notes):
        if note.startswith(prefix):
            row.notes[i] = f"{note}, {layer}"
            return
    row.notes.append(f"{prefix}{layer}")


def _not_called_reason(model: nn.Module, name: str) -> str:
    if isinstance(parent_of(model, name)[0], nn.MultiheadAttention):
        return "nn.MultiheadAttention uses this layer's weight directly and never calls it: no site created"
    return "never called as a module in the forward pass: no site created (its parameter would get no gradient)"


class TargetedLayerKind(SiteKind):
    """A site in front of a targeted weight layer (planned per layer, not from discovery)."""

    name = "targeted"

    def absorptions(self, planner: "Planner", layers: Sequence[Tuple[str, nn.Module]]) -> Set[int]:
        """The found dropout sites that targeted layers absorb (to be selected even if ``targets`` names
        only the layers).

        A site is absorbed when a layer that ``targets`` selects reads its output directly or through
        data-moving ops, unless the layer already has an input site (converted earlier: the dropout in
        front of it stays as it was). A dropout module is one site for all its calls, so when one call is
        absorbed every call of that module is.

        Args:
            planner: the planner (no ``targets`` entry is marked used here).
            layers: the targetable layers that ``exclude`` leaves, as ``(name, module)``.

        Returns:
            ``id(found)`` of every absorbed site of ``planner.discovery``.
        """
        targeted = {
            id(module)
            for name, module in layers
            if first_match(planner.targets or [], name, module) is not None
            and not isinstance(getattr(module, INPUT_SITE_CHILD, None), ConcreteDropoutBase)
        }
        read = {
            id(found): found.module_name
            for found in planner.discovery.sites
            if any(id(m) in targeted for m in _consumer_modules(planner.model, found.consumer))
        }
        modules = {name for name in read.values() if name}
        return {id(found) for found in planner.discovery.sites if id(found) in read or found.module_name in modules}

    def plan_layer(self, planner: "Planner", name: str, module: nn.Module) -> None:
        """Plan the site in front of ``module`` when ``targets`` selects it, or note that the dropout site
        already in front of it is its site (absorbed)."""
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
        absorber = _absorber(planner, module)
        if absorber is not None:  # the dropout feeding the layer is its site: one site per tensor
            planner.rows.append(
                SiteRow(
                    name,
                    self.name,
                    "absorbed",
                    original,
                    consumer=consumer_text(consumer),
                    found_by="targets",
                    called=called,
                    notes=[f"absorbed: learned by site {absorber.row.name}"],
                )
            )
            _note_site_for(absorber.row, name)
            return
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
        default = MODULE_SITE_TYPES[nn.Dropout]  # nn.Linear: element-wise
        site_type = next((t for k, t in _INPUT_SITE_TYPES.items() if isinstance(module, k)), default)
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
        fixed = [
            _dropout_label(f) for f in planner.discovery.sites if module in _consumer_modules(planner.model, f.consumer)
        ]
        if fixed:  # the dropout in front was left as it is (excluded, rate 0 kept): this site comes after it
            row.notes.append(f"input comes from dropout {', '.join(dict.fromkeys(fixed))}, which stays fixed")
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
