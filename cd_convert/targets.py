"""Parsing and matching of ``targets`` and ``exclude``.

An entry is one of:

* a module type: matches instances (``isinstance``, so subclasses count);
* a string: a glob over qualified module names (``fnmatch``, e.g. ``"blocks.*.mlp.fc?"``);
* a compiled regular expression: must match the whole qualified name;
* a predicate ``(name, module) -> bool``.

Types are restricted to what a site can be placed in front of (``nn.Linear`` and ``nn.ConvNd``
subclasses) or converted (``nn.Dropout*``); anything else is refused with the reason. The table of those
dropout types and the site class each becomes (:data:`MODULE_SITE_TYPES`) is here, the one the package reads.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union, cast

import torch.nn as nn

from .errors import TargetError
from .layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d, ConcreteDropoutBase

__all__ = [
    "MODULE_SITE_TYPES",
    "DROPOUT_TYPES",
    "Matcher",
    "dropout_rate",
    "foreign_dropout",
    "parse_targets",
    "first_match",
    "is_dropout_module",
    "is_targetable",
    "register_dropout_module",
]

TargetEntry = Union[type, str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]

#: Layers a site can be inserted in front of (their weight then consumes the site's output).
TARGETABLE_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Dropout module type -> the concrete site type that replaces it (a subclass maps to its nearest listed base).
#: The one table of dropout types: functional dropouts and targeted layers name their site type through it.
MODULE_SITE_TYPES: Dict[Type[nn.Module], Type[ConcreteDropoutBase]] = {
    nn.Dropout: ConcreteDropout,
    nn.Dropout1d: ConcreteDropout1d,
    nn.Dropout2d: ConcreteDropout2d,
    nn.Dropout3d: ConcreteDropout3d,
}
#: Dropout modules that become concrete sites.
DROPOUT_TYPES: Tuple[type, ...] = tuple(MODULE_SITE_TYPES)

_UNSUPPORTED_REASONS = {
    nn.RNNBase: "recurrent layers apply their weights inside a fused kernel, so no site can be placed on the "
    "input of each weight; target the Linear layers around them instead",
    nn.MultiheadAttention: "nn.MultiheadAttention uses its projection weights directly; its attention dropout "
    "is handled with targets=None, and its input can be targeted through the Linear that produces it",
    nn.Embedding: "an embedding consumes indices, not activations, so there is nothing to drop in front of it",
    nn.AlphaDropout: "AlphaDropout keeps self-normalising statistics that the concrete relaxation does not",
    nn.FeatureAlphaDropout: "FeatureAlphaDropout keeps self-normalising statistics that the concrete relaxation "
    "does not",
}


def is_targetable(module: nn.Module) -> bool:
    """Whether a site can be inserted in front of ``module``."""
    return isinstance(module, TARGETABLE_TYPES)


@dataclass(frozen=True)
class ForeignDropout:
    """A dropout module class from outside ``torch.nn`` that converts like ``nn.Dropout*``.

    Attributes:
        rate_attribute: the float attribute holding its drop rate (``freeze`` writes the learned rate there).
        site_type: the concrete site that replaces it (its mask's shape: element-wise, channel-wise).
    """

    rate_attribute: str
    site_type: Type[ConcreteDropoutBase]


#: Registered classes (:func:`register_dropout_module`); subclasses count.
_FOREIGN_DROPOUTS: Dict[type, ForeignDropout] = {}
#: DeBERTa's ``StableDropout`` (transformers' DeBERTa and DeBERTa-v2 before 5.0, SEW-D; Microsoft's DeBERTa
#: package): inverted element-wise dropout at ``drop_prob`` through a custom autograd function. Recognised by
#: its form, so that no copy of it (each model file has its own) needs to be imported or registered.
_STABLE_DROPOUT = ForeignDropout("drop_prob", ConcreteDropout)


def register_dropout_module(
    cls: Type[nn.Module], rate_attribute: str = "p", site_type: Type[ConcreteDropoutBase] = ConcreteDropout
) -> None:
    """Make ``convert`` treat a dropout module class of your own (or a library's) like ``nn.Dropout``.

    The class must apply inverted dropout in training (each unit zeroed with the rate, survivors scaled by
    ``1 / (1 - rate)``; whole channels for a channel-wise ``site_type``) and return its input in eval. Its
    instances are then replaced by concrete sites, and ``freeze`` puts back a copy of the original module with
    the learned rate in ``rate_attribute``.

    Args:
        cls: the module class (subclasses count).
        rate_attribute: the name of its float drop-rate attribute.
        site_type: the concrete site that replaces it: :class:`~cd_convert.layers.ConcreteDropout`
            (element-wise) or a channel-wise one such as :class:`~cd_convert.layers.ConcreteDropout2d`.

    Raises:
        TypeError: if ``cls`` is not an ``nn.Module`` subclass, or ``site_type`` not a concrete site class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_dropout_module expects an nn.Module subclass, got {cls!r}.")
    if not (isinstance(site_type, type) and issubclass(site_type, ConcreteDropoutBase)):
        raise TypeError(
            f"site_type must be a concrete site class such as cd_convert.layers.ConcreteDropout, got {site_type!r}."
        )
    if issubclass(cls, (ConcreteDropoutBase, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        raise TypeError(f"{cls.__name__} is converted already; register only classes outside torch.nn's dropout.")
    _FOREIGN_DROPOUTS[cls] = ForeignDropout(rate_attribute, site_type)


def foreign_dropout(module: nn.Module) -> Optional[ForeignDropout]:
    """How a dropout module from outside ``torch.nn`` converts, or None when it is not one.

    Args:
        module: any module.

    Returns:
        The registered entry of its class (or nearest registered base), DeBERTa's ``StableDropout`` recognised by
        its form, else None. An instance whose rate attribute is not a float is not one.
    """
    klass = type(module)
    entry = next((_FOREIGN_DROPOUTS[k] for k in klass.__mro__ if k in _FOREIGN_DROPOUTS), None)
    if entry is None and klass.__name__ == "StableDropout" and callable(getattr(module, "get_context", None)):
        entry = _STABLE_DROPOUT
    if entry is None:
        return None
    rate = getattr(module, entry.rate_attribute, None)
    return entry if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None


def is_dropout_module(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Dropout*`` (not alpha dropout) or a registered foreign dropout class."""
    return (
        type(module) in DROPOUT_TYPES
        or (isinstance(module, DROPOUT_TYPES) and not isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout)))
        or foreign_dropout(module) is not None
    )


def dropout_rate(module: nn.Module) -> float:
    """The rate a dropout module (``nn.Dropout*`` or foreign, :func:`foreign_dropout`) applies."""
    foreign = foreign_dropout(module)
    return float(getattr(module, foreign.rate_attribute) if foreign is not None else module.p)


@dataclass
class Matcher:
    """One parsed ``targets``/``exclude`` entry.

    Attributes:
        entry: what the user passed.
        test: ``(name, module) -> bool``.
        label: a readable form for messages.
    """

    entry: Any
    test: Callable[[str, nn.Module], bool]
    label: str

    def __call__(self, name: str, module: nn.Module) -> bool:
        return bool(self.test(name, module))


def _type_matcher(entry: type, arg: str) -> Matcher:
    if not issubclass(entry, nn.Module):
        raise TargetError(f"{arg} entry {entry!r} is a type but not a torch.nn.Module subclass.")
    for bad, reason in _UNSUPPORTED_REASONS.items():
        if issubclass(entry, bad):
            raise TargetError(f"{arg} entry {entry.__name__} is not supported: {reason}.")
    if not issubclass(entry, TARGETABLE_TYPES + DROPOUT_TYPES + tuple(_FOREIGN_DROPOUTS)):
        raise TargetError(
            f"{arg} entry {entry.__name__} is not a layer a site can be placed in front of. Module types must "
            "be nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d (or subclasses) or nn.Dropout*. To select every "
            "such layer inside a block, pass a glob such as 'blocks.*' or a predicate (name, module) -> bool."
        )
    return Matcher(entry, lambda name, module: isinstance(module, entry), entry.__name__)


def _parse_entry(entry: Any, arg: str) -> Matcher:
    if isinstance(entry, type):
        return _type_matcher(entry, arg)
    if isinstance(entry, str):
        if not entry:
            raise TargetError(f"{arg} entry is an empty string; pass a qualified-name glob such as 'head.*'.")
        return Matcher(entry, lambda name, module: fnmatch.fnmatchcase(name, entry), repr(entry))
    if isinstance(entry, re.Pattern):
        return Matcher(entry, lambda name, module: entry.fullmatch(name) is not None, f"re({entry.pattern!r})")
    if callable(entry):
        label = getattr(entry, "__name__", repr(entry))
        return Matcher(entry, entry, f"predicate {label}")
    raise TargetError(
        f"{arg} entry {entry!r} ({type(entry).__name__}) is not understood. Pass module types (nn.Linear), "
        "qualified-name globs ('classifier.*'), compiled regexes (re.compile(r'blocks\\.\\d+\\.mlp\\.fc1')) or "
        "predicates (name, module) -> bool."
    )


def parse_targets(
    entries: Optional[Union[TargetEntry, Sequence[TargetEntry]]], arg: str = "targets"
) -> Optional[List[Matcher]]:
    """Parse a ``targets``/``exclude`` argument.

    Args:
        entries: None, one entry, or a list/tuple of entries (types, globs, regexes, predicates).
        arg: the argument's name, for messages.

    Returns:
        None for None, else one :class:`Matcher` per entry.

    Raises:
        TargetError: for an entry that is not understood or a module type that cannot be targeted.
    """
    if entries is None:
        return None
    if isinstance(entries, (type, str, re.Pattern)) or (callable(entries) and not isinstance(entries, (list, tuple))):
        entries = [cast(TargetEntry, entries)]  # one entry passed alone
    if not isinstance(entries, (list, tuple, set, frozenset)):
        raise TargetError(f"{arg} must be a list of entries, got {type(entries).__name__}.")
    if len(entries) == 0:
        raise TargetError(f"{arg} is empty; pass None to convert every dropout site, or list what to target.")
    return [_parse_entry(e, arg) for e in entries]


def first_match(matchers: Iterable[Matcher], name: str, module: nn.Module) -> Optional[Matcher]:
    """The first matcher that accepts ``(name, module)``, or None."""
    for matcher in matchers:
        if matcher(name, module):
            return matcher
    return None
