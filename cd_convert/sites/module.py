"""``nn.Dropout*`` modules called as modules: replaced by a concrete site at every path they are held under.

A module called at several places stays one site with one rate; each distinct consumer adds its weight
term. A module that a dry run saw never called gets no site (its parameter would get no gradient). A
concrete site written in the model's own code is kept as it is (:class:`OwnSite`): conversion only registers
it, ``unconvert`` leaves it, ``freeze`` turns it into the plain ``nn.Dropout*`` with its learned rate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from ..consumers import ConsumerInfo, find_consumer, module_units
from ..found import FoundSite
from ..layers import ConcreteDropoutBase
from ..report import SiteRow
from ..targets import foreign_dropout, is_dropout_module
from .base import (
    Change,
    SearchContext,
    SiteKind,
    TraceContext,
    frozen_dropout,
    joined,
    original_rate,
    parent_of,
    site_type_for,
    submodule,
)
from .targeted import INPUT_SITE_CHILD, TargetedLayerKind

if TYPE_CHECKING:
    from ..planning import PlannedSite, Planner

__all__ = ["ModuleKind", "ModuleSwap", "plan_module_site"]

#: Consumers inside torch.nn's transformer layers, which torch.fx cannot trace: dropout -> weight layer (None:
#: a residual add, whose width is d_model, ``linear2.out_features``).
_KNOWN_LAYOUTS: Dict[type, Dict[str, Optional[str]]] = {
    nn.TransformerEncoderLayer: {"dropout": "linear2", "dropout1": None, "dropout2": None},
    nn.TransformerDecoderLayer: {"dropout": "linear2", "dropout1": None, "dropout2": None, "dropout3": None},
}


@dataclass
class ModuleSwap(Change):
    """An ``nn.Dropout*`` module replaced by a concrete site at every path it is registered under."""

    site_name: str
    paths: List[str]
    original: nn.Module
    kind: str = "module"

    PATH_FIELDS = ("paths",)

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        for path in self.paths:
            parent, attr = parent_of(root, path)
            setattr(parent, attr, site)

    def undo(self, root: nn.Module) -> None:
        for path in self.paths:
            parent, attr = parent_of(root, path)
            setattr(parent, attr, self.original)

    def freeze(self, root: nn.Module) -> None:
        site = root.get_submodule(self.site_name)
        foreign = foreign_dropout(self.original)
        if foreign is None:
            frozen = frozen_dropout(site)
        else:  # the model's own dropout class again (DeBERTa's StableDropout), carrying the learned rate
            frozen = copy.deepcopy(self.original)
            setattr(frozen, foreign.rate_attribute, float(site.p.detach()))
            frozen.train(site.training)
        for path in self.paths:
            parent, attr = parent_of(root, path)
            setattr(parent, attr, frozen)

    def follows(self, root: nn.Module) -> nn.Module:
        return self.original


@dataclass
class OwnSite(Change):
    """A concrete site written in the model's own code, registered at every path it is held under.

    Conversion changes nothing but its ``save_output`` flag, which ``unconvert`` puts back, leaving the module
    itself (it is the user's); ``freeze`` replaces it by the plain ``nn.Dropout*`` of its kind with the
    learned rate, as for a swapped ``nn.Dropout``.
    """

    site_name: str
    paths: List[str]
    kind: str = "module"
    #: The site's own ``save_output`` before conversion (the converter may set it): undo puts it back.
    original_save_output: Optional[bool] = None

    PATH_FIELDS = ("paths",)

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        self.original_save_output = root.get_submodule(self.site_name).save_output

    def undo(self, root: nn.Module) -> None:
        if self.original_save_output is not None:
            root.get_submodule(self.site_name).save_output = self.original_save_output

    def freeze(self, root: nn.Module) -> None:
        frozen = frozen_dropout(root.get_submodule(self.site_name))
        for path in self.paths:
            parent, attr = parent_of(root, path)
            setattr(parent, attr, frozen)


def is_dropout_site_module(module: nn.Module) -> bool:
    """A plain ``nn.Dropout*`` or a concrete site written in the model's code."""
    return isinstance(module, ConcreteDropoutBase) or is_dropout_module(module)


def is_input_site(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the input site an earlier conversion put on a targeted Linear/ConvNd layer."""
    parent, attr = parent_of(model, name)
    return (
        attr == INPUT_SITE_CHILD
        and module_units(parent) is not None
        and isinstance(getattr(parent, attr, None), ConcreteDropoutBase)
    )


def known_consumer(model: nn.Module, name: str) -> Tuple[Optional[ConsumerInfo], str, Optional[int]]:
    """What module search knows of a dropout's consumer: inside torch.nn's transformer layers (which torch.fx
    cannot trace), and for the input site of a layer targeted by an earlier conversion.

    Args:
        model: the model.
        name: the dropout module's qualified name.

    Returns:
        ``(consumer, note, width)``: the consumer or None with the reason, and the width K when there is no
        consumer but the layout fixes it.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = submodule(model, parent_name)
    for klass, layout in _KNOWN_LAYOUTS.items():
        if isinstance(parent, klass) and attr in layout:
            target = layout[attr]
            if target is None:
                return None, f"output goes to a residual add in {klass.__name__}", parent.linear2.out_features
            full = joined(parent_name, target)
            return ConsumerInfo((full,), (f"{full}.weight",), getattr(parent, target).in_features), "", None
    if is_input_site(model, name):  # a targeted layer's pre-hook feeds the site's output to the layer
        return ConsumerInfo((parent_name,), (f"{parent_name}.weight",), module_units(parent)), "", None
    return None, "found by module search: consumer unknown (pass example_inputs for a dry run)", None


class ModuleKind(SiteKind):
    """A dropout module called as a module."""

    name = "module"

    def is_site_module(self, module: nn.Module) -> bool:
        return is_dropout_site_module(module)

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        module = ctx.modules.get(node.target) if node.op == "call_module" else None
        if module is None or not is_dropout_site_module(module):
            return False
        consumer, note = find_consumer(node, ctx.modules, ctx.model)
        ctx.discovery.sites.append(
            FoundSite(
                kind=self.name,
                owner=node.target.rpartition(".")[0],
                module_name=node.target,
                site_type=site_type_for(module),
                p=original_rate(module),
                found_by="fx",
                consumer=consumer,
                consumer_note=note,
            )
        )
        return True

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        if not is_dropout_site_module(module):
            return False
        consumer, note, width = known_consumer(ctx.model, name)
        ctx.add(
            FoundSite(
                kind=TargetedLayerKind.name if is_input_site(ctx.model, name) else self.name,
                owner=name.rpartition(".")[0],
                module_name=name,
                site_type=site_type_for(module),
                p=original_rate(module),
                found_by=ctx.found_by,
                consumer=consumer,
                consumer_note=note,
                called=None,
                units_hint=width,
            )
        )
        return True

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return found.module_name is not None

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        if found.called is False and found.kind == self.name:
            planner.rows.append(self._not_called_row(planner, found))
            return
        plan_module_site(planner, found, kind=found.kind)

    @staticmethod
    def _not_called_row(planner: "Planner", found: FoundSite) -> SiteRow:
        module = planner.modules[found.module_name]
        return SiteRow(
            found.module_name or "",
            "-",
            "not called",
            f"{type(module).__name__}(p={found.p:.3g})",
            found.p,
            found_by=found.found_by,
            called=False,
            notes=["never called in the dry run: no site created (its parameter would get no gradient)"],
        )


def plan_module_site(planner: "Planner", found: FoundSite, *, kind: str) -> Optional["PlannedSite"]:
    """Plan the site that replaces the dropout module ``found.module_name`` (one per module, all its calls).

    Args:
        planner: the planner.
        found: one application of the module.
        kind: the kind of site (report).

    Returns:
        The planned or existing site, or None when the module is not converted.
    """
    from ..planning import PlannedSite

    name = found.module_name
    module = planner.modules[name]
    existing = isinstance(module, ConcreteDropoutBase)
    original = f"{type(module).__name__}(p={found.p:.3g})"
    if not existing:
        skip = planner.skip_reason(found, planner.selected(name, module))
        if skip is not None:
            planner.rows.append(planner.skip_row(found, name, original, skip))
            return None
    entry = planner.planned.get(name)
    if entry is None:
        paths = [n for n, m in planner.model.named_modules(remove_duplicate=False) if m is module]
        row = SiteRow(
            name,
            kind,
            "existing" if existing else "planned",
            original,
            found.p,
            found_by=found.found_by,
            called=found.called,
            notes=list(found.notes),
        )
        entry = planner.add(
            name,
            PlannedSite(
                row,
                found.site_type,
                planner.options.initial_rate(found.p),
                planner.options.temperature_for(found.site_type),
                OwnSite(name, paths, kind=kind) if existing else ModuleSwap(name, paths, module, kind=kind),
                existing=existing,
            ),
        )
    entry.add_application(found)
    return entry
