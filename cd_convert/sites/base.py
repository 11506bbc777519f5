"""The protocol every kind of dropout site implements, and the helpers the kinds share.

A *kind* of site (a dropout module, a functional call, attention with a dropout argument, ...) is one
:class:`SiteKind` subclass in one file of this package. It owns the three stages for that kind:

* **detection**: :meth:`SiteKind.detect_node` reads one node of the torch.fx graph and
  :meth:`SiteKind.detect_module` one module of a module-by-module search; each returns True when it
  claimed the node or module (recording a :class:`~cd_convert.found.FoundSite` or a
  :class:`~cd_convert.found.Finding`). The dry run (:mod:`cd_convert.dry_run`) is generic: it confirms and
  adds sites whatever their kind;
* **planning**: :meth:`SiteKind.claims` says whether the kind plans a found site and :meth:`SiteKind.plan`
  adds its report row and :class:`~cd_convert.planning.PlannedSite` to the planner;
* **changes**: the kind's :class:`Change` records apply, undo and freeze themselves on the model.

Kinds are tried in the order of :data:`cd_convert.sites.SITE_KINDS`, first match wins (as PEFT's
dispatchers). A new kind of site is a new file with one subclass, added to that list.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch.fx as fx
import torch.nn as nn

from .._modules import parent_of, submodule
from ..found import Discovery, Finding, FoundSite
from ..layers import ConcreteDropout, ConcreteDropoutBase
from ..targets import MODULE_SITE_TYPES, dropout_rate, foreign_dropout

if TYPE_CHECKING:  # the planner imports the kinds; the kinds only need its type
    from ..planning import Planner

__all__ = [
    "SiteKind",
    "Change",
    "TraceContext",
    "SearchContext",
    "ATTENTION_CONSUMER_NOTE",
    "any_of",
    "frozen_dropout",
    "joined",
    "original_rate",
    "parent_of",
    "remove_forward_hooks",
    "site_type_for",
    "submodule",
]

#: Concrete site class -> the plain torch.nn module a frozen site becomes.
FROZEN_TYPES: Dict[Type[ConcreteDropoutBase], Type[nn.Module]] = {v: k for k, v in MODULE_SITE_TYPES.items()}
#: Why attention dropout has no consuming weight (report text).
ATTENTION_CONSUMER_NOTE = "attention probabilities are multiplied by values, not by a weight"


def joined(prefix: str, name: str) -> str:
    """A qualified name below ``prefix`` (either may be empty)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def site_type_for(module: nn.Module) -> Type[ConcreteDropoutBase]:
    """The concrete class that replaces a dropout module (a concrete site keeps its own class)."""
    if isinstance(module, ConcreteDropoutBase):
        return type(module)
    foreign = foreign_dropout(module)
    if foreign is not None:
        return foreign.site_type
    for klass in type(module).__mro__:
        if klass in MODULE_SITE_TYPES:
            return MODULE_SITE_TYPES[klass]
    return ConcreteDropout


def original_rate(module: nn.Module) -> float:
    """The rate a dropout module applies now (a concrete site's current p)."""
    return float(module.p.detach()) if isinstance(module, ConcreteDropoutBase) else dropout_rate(module)


#: Input rank of a batched channel-wise input -> the plain module that drops whole channels of it.
_CHANNEL_DROPOUT_BY_RANK: Dict[int, Type[nn.Module]] = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}


def frozen_type(site_type: Type[ConcreteDropoutBase]) -> Type[nn.Module]:
    """The plain ``torch.nn`` class a concrete site class freezes to.

    Args:
        site_type: a concrete site class (a user's subclass too).

    Returns:
        The class of its nearest listed base (``ConcreteDropout2d`` -> ``nn.Dropout2d``); for a direct subclass
        of :class:`ConcreteDropoutBase`, ``nn.Dropout`` when element-wise, else the channel dropout of its
        batched input rank (``nn.Dropout2d`` when it declares none).
    """
    for klass in site_type.__mro__:
        if klass in FROZEN_TYPES:
            return FROZEN_TYPES[klass]
    if not site_type.channelwise:
        return nn.Dropout
    return _CHANNEL_DROPOUT_BY_RANK.get(max(site_type.expected_dims, default=4), nn.Dropout2d)


def frozen_dropout(site: ConcreteDropoutBase) -> nn.Module:
    """The plain ``nn.Dropout*`` with the site's learned rate (and its train/eval mode)."""
    module = frozen_type(type(site))(p=float(site.p.detach()))
    module.train(site.training)
    return module


@dataclass
class TraceContext:
    """What a kind needs to read one fx node: the model, its modules by name, and the discovery to fill.

    Attributes:
        model: the traced model.
        modules: qualified name -> module, every alias included.
        discovery: the result being built.
    """

    model: nn.Module
    modules: Dict[str, nn.Module]
    discovery: Discovery

    def owner_name(self, node: fx.Node) -> str:
        """Qualified name of the module whose code made the call (``""`` for the root)."""
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else ""

    def module(self, name: str) -> Optional[nn.Module]:
        """The module of that name (the root for ``""``), or None."""
        return self.model if name == "" else self.modules.get(name)


@dataclass
class SearchContext:
    """What a kind needs to look at one module during a module-by-module search.

    Attributes:
        model: the model.
        discovery: the result being built.
        known: qualified names of modules already recorded as sites (by the trace).
    """

    model: nn.Module
    discovery: Discovery
    known: set

    found_by: ClassVar[str] = "module search"

    def add(self, site: FoundSite) -> None:
        self.discovery.sites.append(site)
        if site.module_name:
            self.known.add(site.module_name)

    def finding(self, name: str, status: str, detail: str) -> None:
        self.discovery.findings.append(Finding(name, status, detail))


class SiteKind:
    """One kind of dropout site. Override what the kind needs; every method has a do-nothing default.

    Attributes:
        name: the kind as the report shows it.
    """

    name: ClassVar[str] = ""

    def is_site_module(self, module: nn.Module) -> bool:
        """Whether ``module`` is (or holds, fused inside) a site of this kind: torch.fx keeps such modules as
        leaves, and a leaf that holds one below it is searched module by module."""
        return False

    def detect_node(self, ctx: TraceContext, node: fx.Node) -> bool:
        """Record what this fx node means for this kind; True when the node is claimed."""
        return False

    def detect_module(self, ctx: SearchContext, name: str, module: nn.Module) -> bool:
        """Record what this module means for this kind (module search); True when it is claimed."""
        return False

    def after_trace(self, ctx: TraceContext) -> None:
        """Called once after all nodes were read (for what a trace goes through without a node)."""

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        """Whether this kind plans ``found``."""
        return False

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        """Add the report row and the planned site (or a row saying why there is none) for ``found``."""
        raise NotImplementedError(f"{type(self).__name__} plans no sites")

    def model_changes(self, planner: "Planner") -> List["Change"]:
        """Changes this kind needs once per conversion, after its sites (applied after every site)."""
        return []


class Change:
    """A change to the model that can apply, undo and freeze itself.

    Subclasses are dataclasses; :attr:`PATH_FIELDS` names their fields that hold qualified module names,
    so that a change recorded on a submodule can be re-expressed from an enclosing model.

    Attributes:
        site_name: the site this change installs ("" for a change that installs none).
        kind: the kind of site, for the report.
    """

    PATH_FIELDS: ClassVar[Tuple[str, ...]] = ()
    site_name: str
    kind: str

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        raise NotImplementedError

    def undo(self, root: nn.Module) -> None:
        raise NotImplementedError

    def freeze(self, root: nn.Module) -> None:
        """Leave a plain PyTorch model: the learned rate written where the model reads it."""
        self.undo(root)

    def follows(self, root: nn.Module) -> nn.Module:
        """The module whose train/eval mode the new site starts in."""
        return root

    @property
    def freeze_blocker(self) -> Optional[str]:
        """Why ``freeze`` cannot write the learned rate back (None when it can)."""
        return None

    def rebased(self, prefix: str) -> "Change":
        """A copy whose module paths are relative to a model that holds this one's root at ``prefix``."""
        change = copy.copy(self)
        for name in ("site_name",) + self.PATH_FIELDS:
            value = getattr(change, name)
            if name == "site_name" and not value:
                continue  # a change that installs no site
            if isinstance(value, str):
                setattr(change, name, joined(prefix, value))
            elif isinstance(value, list):
                setattr(change, name, [joined(prefix, v) for v in value])
        return change


def remove_forward_hooks(module: nn.Module, pre_hook_id: Optional[int], post_hook_id: Optional[int]) -> None:
    """Remove a forward pre-hook and a forward hook by their handles' ids, whichever registration options they had
    (``with_kwargs``, ``always_call``): what a :class:`Change` that installed a pair undoes.

    Args:
        module: the module holding the hooks.
        pre_hook_id: the pre-hook handle's ``id`` (None: none registered).
        post_hook_id: the forward hook handle's ``id`` (None: none registered).
    """
    module._forward_pre_hooks.pop(pre_hook_id, None)
    module._forward_pre_hooks_with_kwargs.pop(pre_hook_id, None)
    module._forward_hooks.pop(post_hook_id, None)
    module._forward_hooks_with_kwargs.pop(post_hook_id, None)
    module._forward_hooks_always_called.pop(post_hook_id, None)


def any_of(kinds: Any, module: nn.Module) -> bool:
    """Whether any of ``kinds`` sees a site in ``module``."""
    return any(kind.is_site_module(module) for kind in kinds)
