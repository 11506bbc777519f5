"""Sites for calls in a model's own code (functional dropout, attention), routed at run time.

Shared by the functional, attention-argument and ``nn.MultiheadAttention`` kinds: the site is a child
module of the call's owner, and :mod:`cd_convert.interception` sends each call (identified by its code
location) to it through the kind's handler, or runs the whole method with it (a runner).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch.nn as nn

from ..errors import FreezeError
from ..found import FoundSite
from ..interception import Handler, Runner, install, interceptors, uninstall
from ..report import SiteRow
from ..targets import DROPOUT_TYPES
from .base import Change, joined, submodule

if TYPE_CHECKING:
    from ..planning import PlannedSite, Planner

__all__ = ["RoutedSite", "plan_routed_site", "rate_attribute_of"]


@dataclass
class RoutedSite(Change):
    """A site child of ``owner`` that receives the calls made at ``keys`` inside ``owner.<method>``.

    Attributes:
        site_name: qualified name of the site.
        owner: qualified name of the module whose method makes the calls.
        method: the method's name.
        child: the site's attribute name on the owner.
        keys: the call locations routed to the site.
        handler: computes a routed call with the site (None with a runner).
        runner: runs the whole method with the site (``nn.MultiheadAttention``).
        rate_attribute: where the owner's code reads the rate, relative to the owner (``"drop_rate"``,
            ``"dropout.p"``); ``freeze`` writes the learned rate there.
        kind: the kind of site.
    """

    site_name: str
    owner: str
    method: str
    child: str
    keys: List[Any] = field(default_factory=list)
    handler: Optional[Handler] = None
    runner: Optional[Runner] = None
    rate_attribute: Optional[str] = None
    kind: str = "functional"

    PATH_FIELDS = ("owner",)

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = submodule(root, self.owner)
        owner.add_module(self.child, site)
        interceptor = install(owner, self.method)
        if self.runner is not None:
            interceptor.runner = (self.child, self.runner)
        for key in self.keys:
            interceptor.routes[key] = (self.child, self.handler)

    def undo(self, root: nn.Module) -> None:
        owner = submodule(root, self.owner)
        interceptor = interceptors(owner).get(self.method)
        if interceptor is not None:
            for key in self.keys:
                interceptor.routes.pop(key, None)
            if self.runner is not None:
                interceptor.runner = None
            if interceptor.empty:
                uninstall(owner, self.method)
        delattr(owner, self.child)

    def freeze(self, root: nn.Module) -> None:
        if self.rate_attribute is None:
            raise FreezeError(self.freeze_blocker)
        owner = submodule(root, self.owner)
        p = float(getattr(owner, self.child).p.detach())
        self.undo(root)
        write_rate(owner, self.rate_attribute, p)

    def follows(self, root: nn.Module) -> nn.Module:
        return submodule(root, self.owner)

    def learned_rate(self, root: nn.Module) -> float:
        """The site's current drop probability (what :meth:`freeze` writes)."""
        return float(getattr(submodule(root, self.owner), self.child).p.detach())

    def rate_target(self, root: nn.Module) -> Optional[Tuple[nn.Module, str]]:
        """The module and the path below it that :meth:`freeze` writes (None without a rate attribute).

        Two sites with the same target write the same place: the last write would win. Plain objects on the way
        (a config) are copied per module by :func:`write_rate`, so the target stops at the last module.
        """
        if self.rate_attribute is None:
            return None
        return _last_module(submodule(root, self.owner), self.rate_attribute)

    @property
    def freeze_blocker(self) -> Optional[str]:
        if self.rate_attribute is not None:
            return None
        return (
            f"site {self.site_name!r} is a {self.kind} call whose rate is not read from an attribute of its module, "
            "so a plain model cannot carry the learned rate"
        )


def find_rate_attribute(owner: nn.Module, p: Optional[float]) -> Optional[str]:
    """Where a call's rate is read from, by value: the owner's float attribute equal to it (timm's
    ``drop_rate``) or a dropout child's ``p``; a name that says "drop" wins over others.

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
        if not name.startswith("_") and isinstance(value, float) and math.isclose(value, p, abs_tol=1e-12)
    ]
    candidates += [
        f"{name}.p"
        for name, child in owner.named_children()
        if isinstance(child, DROPOUT_TYPES) and math.isclose(float(child.p), p, abs_tol=1e-12)
    ]
    named = [c for c in candidates if "drop" in c.lower()]
    pool = named if len(candidates) > 1 else candidates
    return pool[0] if len(pool) == 1 else None


def rate_attribute_of(owner: nn.Module, found: FoundSite, root: nn.Module) -> Optional[str]:
    """Where freeze writes a functional call's learned rate: the dry run's traced source, else by value.

    Args:
        owner: the module whose method makes the call.
        found: the call.
        root: the model (where the dry run's ``rate_holder`` path starts).

    Returns:
        A path relative to ``owner`` (``"drop_rate"``, ``"dropout.p"``, ``"config.dropout"``), or None.
    """
    if found.rate_holder is not None:
        prefix = f"{found.owner}." if found.owner else ""
        if found.rate_holder.startswith(prefix):
            return found.rate_holder[len(prefix) :]
        shared = _through_shared_object(root, owner, found.rate_holder)
        if shared is not None:
            return shared
    return find_rate_attribute(owner, found.p)


def _through_shared_object(root: nn.Module, owner: nn.Module, holder: str) -> Optional[str]:
    """``holder`` (a path from ``root``, such as ``"config.dropout"``) relative to ``owner``, when the object that
    holds the rate is not a module and ``owner`` holds it too, as every module of ProphetNet holds the model's
    config and reads ``self.config.dropout``."""
    object_path, _, rate = holder.rpartition(".")
    if not object_path:
        return None
    try:
        holder_object = functools.reduce(getattr, object_path.split("."), root)
    except AttributeError:
        return None
    if isinstance(holder_object, nn.Module):
        return None
    for name, value in vars(owner).items():
        if value is holder_object:
            return f"{name}.{rate}"
    return None


def _rate_note(owner: nn.Module, holder: str, rate_attribute: Optional[str]) -> str:
    """The report note of a site whose rate is read from ``holder``: where freeze writes the learned rate."""
    if rate_attribute is None:
        return f"rate read from {holder}"
    if "." in _last_module(owner, rate_attribute)[1]:  # a plain object on the way
        return (
            f"rate read from {holder}; freeze writes the learned rate into a copy of the object holding it (a config "
            f"other modules share) that only this site's module holds, as self.{rate_attribute}"
        )
    return f"rate read from {holder}; freeze writes the learned rate there"


def _last_module(owner: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """The last module on ``path`` (relative to ``owner``) and the rest of the path below it, which starts at a
    plain object (a config) when one is on the way, else is the final attribute.

    Args:
        owner: where the path starts.
        path: e.g. ``"drop_rate"``, ``"dropout.p"``, ``"config.dropout"``.

    Returns:
        ``(module, rest)``: ``(owner, "config.dropout")``, ``(owner.dropout, "p")``.
    """
    module = owner
    *parents, attribute = path.split(".")
    for i, name in enumerate(parents):
        child = getattr(module, name, None)
        if not isinstance(child, nn.Module):
            return module, ".".join([*parents[i:], attribute])
        module = child
    return module, attribute


def write_rate(owner: nn.Module, path: str, p: float) -> None:
    """Set the rate at ``path`` (relative to ``owner``) to ``p``, as the owner's code will read it.

    A rate held by a plain object on the way (a transformers config, which every module of the model shares) is
    written into a shallow copy of that object that only ``owner`` holds, so that the other modules keep reading
    their own rates (and the model's ``config`` its original values).

    Args:
        owner: the module whose code reads the rate.
        path: e.g. ``"drop_rate"``, ``"dropout.p"``, ``"config.dropout"``.
        p: the rate.
    """
    *parents, attribute = path.split(".")
    holder: object = owner
    for name in parents:
        child = getattr(holder, name)
        if not isinstance(child, nn.Module):
            child = copy.copy(child)
            setattr(holder, name, child)
        holder = child
    setattr(holder, attribute, p)


def plan_routed_site(
    planner: "Planner",
    found: FoundSite,
    *,
    kind: str,
    handler: Optional[Handler] = None,
    runner: Optional[Runner] = None,
    rate_attribute: Optional[str] = None,
) -> Optional["PlannedSite"]:
    """Plan the site of a call in ``found.owner``'s method (or add a row saying why there is none).

    Calls in one method reading the same rate attribute (``self.dropout`` of BART's two residual dropouts)
    become one site with one rate.

    Args:
        planner: the planner.
        found: the call.
        kind: the kind of site (report).
        handler: how a routed call is computed with the site.
        runner: or how the whole method runs with it.
        rate_attribute: where freeze writes the learned rate (relative to the owner).

    Returns:
        The planned (or existing, or shared) site, or None when the call is not converted.
    """
    from ..planning import PlannedSite

    owner = submodule(planner.model, found.owner)
    label = f"{found.owner or '<root>'}.{found.method or '?'}"
    what = found.function or found.fused_op
    if (found.key is None and runner is None) or found.method is None:
        planner.rows.append(
            SiteRow(
                label,
                found.kind,
                "unsupported",
                f"{what} in {label}",
                found.p,
                found_by=found.found_by,
                notes=["the call could not be attributed to a method; it keeps its fixed rate"],
            )
        )
        return None
    routed = interceptors(owner).get(found.method)
    existing_child = routed.child_for(None if runner else found.key) if routed else None
    if existing_child is not None:  # converted before: keep the site, refresh its consumer
        name = joined(found.owner, existing_child)
        row = SiteRow(
            name, kind, "existing", f"{what} in {label}", found.p, found_by=found.found_by, called=found.called
        )
        entry = planner.add(name, PlannedSite(row, found.site_type, planner.options.init_p, None, None, existing=True))
        entry.add_application(found)
        return entry
    share_key = (found.owner, found.method, what or "", found.rate_holder or "")
    shared = planner.shared_rates.get(share_key) if found.rate_holder else None
    if shared is not None:
        shared.change.keys.append(found.key)
        shared.add_application(found)
        return shared
    child = planner.new_child_name(owner, found)
    name = joined(found.owner, child)
    selected = planner.selected(name, owner) or planner.dropout_type_targeted()
    skip = planner.skip_reason(found, selected)
    if skip is not None:
        planner.rows.append(planner.skip_row(found, name, f"{what} in {label}", skip))
        if found.key is not None and found.method is not None:
            planner.left_calls.setdefault((found.owner, found.method), set()).add(found.key)
        return None
    row = SiteRow(
        name,
        kind,
        "planned",
        f"{what} in {type(owner).__name__}.{found.method}",
        found.p,
        found_by=found.found_by,
        called=found.called,
        notes=list(found.notes),
    )
    change = RoutedSite(
        name,
        found.owner,
        found.method,
        child,
        keys=[found.key] if found.key is not None and runner is None else [],
        handler=handler,
        runner=runner,
        rate_attribute=rate_attribute,
        kind=kind,
    )
    entry = PlannedSite(
        row,
        found.site_type,
        planner.options.initial_rate(found.p),
        planner.options.temperature_for(found.site_type),
        change,
    )
    planner.add(name, entry).add_application(found)
    if found.rate_holder:
        planner.shared_rates[share_key] = entry
        if not found.rate_holder.endswith(".p"):  # a dropout module's p has a "rate read" row of its own
            row.notes.append(_rate_note(owner, found.rate_holder, rate_attribute))
    return entry
