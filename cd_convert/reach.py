"""Which dropout applications' outputs reach a model's outputs: labels carried through the dry run's ops.

Some models apply dropout to a tensor that never reaches what they return: LiLT's last layer computes a
layout stream that the encoder drops, PEGASUS-X's last layer updates global tokens that no output reads,
PaliGemma never reads its SigLIP tower's pooling head. A concrete site there would get no gradient from the
data: its rate would move under the prior alone, and a report of "learned" rates would list it as learned.

:class:`OutputReach` is fed by the dry run's ``TorchFunctionMode``, which sees every torch function, tensor
method and ``torch.ops`` call of the forward pass. Each dropout output is marked with its site's label; each
op gives its tensor results the union of its tensor arguments' labels (an in-place op, ``out=`` or an
in-place dropout also labels the storage it writes, so that every view of it carries the labels too); at the
end, the labels on the tensors the model returns are the sites that reach its outputs.

Every uncertainty errs towards "reaches". A pass in which no marked output reaches the model's outputs at all
(an output type whose tensors cannot be found, an op outside torch such as a custom kernel called through
pybind) is inconclusive, and so is a pass with an in-place write of labelled values on a torch that does not
keep one Python object per storage (before 2.1, where storages cannot be told apart): :meth:`OutputReach.unused`
then names nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, Hashable, Iterator, List, Optional, Set

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["OutputReach", "tensors_in"]

_NONE: FrozenSet[Hashable] = frozenset()
#: How deep :func:`tensors_in` looks into nested containers and plain objects (model outputs nest a few levels).
_MAX_DEPTH = 8


def tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``: itself, or inside lists, tuples, dicts (``ModelOutput``), dataclasses and plain
    objects' attributes, up to a few levels deep.

    Args:
        value: an op's arguments or results, or a model's return value.
        depth: the current nesting level.

    Yields:
        The tensors found (a tensor held twice is yielded twice).
    """
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth >= _MAX_DEPTH or value is None or isinstance(value, (str, bytes, int, float, bool, complex)):
        return
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)) and not callable(value):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from tensors_in(item, depth + 1)


def _writes_first_argument(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``copy_``, ``__setitem__``, ``__iadd__``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and name.endswith("__") and name != "__init__")
    return name.endswith("_")


class OutputReach:
    """The labels of the dropout outputs each tensor of a forward pass was computed from.

    Labels live on tensors and, after an in-place write, on the written storage; both are held weakly, so the
    pass frees what the model frees.
    """

    def __init__(self) -> None:
        self._by_tensor: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._by_storage: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._marked: Set[Hashable] = set()
        #: False once the pass cannot tell (an in-place write where storages cannot be told apart).
        self.conclusive = True

    def labels_of(self, tensor: torch.Tensor) -> FrozenSet[Hashable]:
        """The labels ``tensor`` carries, its own and its storage's."""
        own = self._by_tensor.get(tensor, _NONE)
        if self._by_storage:
            storage = _storage(tensor)
            shared = self._by_storage.get(storage, _NONE) if storage is not None else _NONE
            if shared:
                return own | shared
        return own

    def propagate(self, func: Any, args: Any, kwargs: Optional[Dict[str, Any]], result: Any) -> None:
        """Give ``func``'s results (and what it wrote in place) the labels of its tensor arguments.

        Args:
            func: the function the pass called.
            args, kwargs: its arguments.
            result: what it returned.
        """
        try:
            self._propagate(func, args, kwargs, result)
        except Exception:  # noqa: BLE001 - an argument this walk cannot read must not stop the conversion
            self.conclusive = False

    def _propagate(self, func: Any, args: Any, kwargs: Optional[Dict[str, Any]], result: Any) -> None:
        written: List[torch.Tensor] = []
        if args and isinstance(args[0], torch.Tensor) and _writes_first_argument(func):
            written.append(args[0])
        if kwargs and "out" in kwargs:
            written.extend(tensors_in(kwargs["out"]))
        results = list(tensors_in(result))
        if not results and not written:
            return
        labels: FrozenSet[Hashable] = _NONE
        for tensor in tensors_in((args, kwargs)):
            found = self.labels_of(tensor)
            if found:
                labels = labels | found
        if not labels:
            return
        for tensor in results:
            self._add(tensor, labels)
        for tensor in written:
            self._add(tensor, labels, in_place=True)

    def mark(self, output: Any, label: Hashable, in_place: bool = False) -> None:
        """Label a dropout application's output (a tensor or a tuple of them, as attention functions return).

        Args:
            output: what the dropout call or module returned.
            label: the site's label.
            in_place: the dropout overwrote its input (``inplace=True``): every view of it now holds dropped values.
        """
        self._marked.add(label)
        for tensor in tensors_in(output):
            self._add(tensor, frozenset((label,)), in_place=in_place)

    def reaching(self, output: Any) -> FrozenSet[Hashable]:
        """The labels carried by the tensors in ``output`` (a model's return value)."""
        labels: FrozenSet[Hashable] = _NONE
        for tensor in tensors_in(output):
            labels = labels | self.labels_of(tensor)
        return labels

    def unused(self, output: Any) -> Set[Hashable]:
        """The marked labels whose outputs do not reach ``output``; empty when the pass is inconclusive.

        Args:
            output: the model's return value from the pass.

        Returns:
            The labels of the dropout applications none of whose outputs reach the model's outputs, or an empty
            set when no marked label reaches them at all (then the pass cannot tell; see the module docstring).
        """
        reached = self.reaching(output)
        if not self.conclusive or not reached & self._marked:
            return set()
        return self._marked - reached

    def _add(self, tensor: torch.Tensor, labels: FrozenSet[Hashable], in_place: bool = False) -> None:
        current = self._by_tensor.get(tensor, _NONE)
        if not labels <= current:
            self._by_tensor[tensor] = current | labels
        if in_place:
            storage = _storage(tensor)
            if storage is None or not _STORAGES_KEEP_IDENTITY:
                self.conclusive = False
            else:
                self._by_storage[storage] = self._by_storage.get(storage, _NONE) | labels


def _storage(tensor: torch.Tensor) -> Optional[Any]:
    """``tensor``'s storage object, or None for tensors without one (sparse, nested, some subclasses)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


def _storages_keep_identity() -> bool:
    """Whether this torch returns one Python object per storage (then a storage can key a weak dictionary)."""
    tensor = torch.zeros(2)
    return tensor.untyped_storage() is tensor[1:].untyped_storage()


_STORAGES_KEEP_IDENTITY = _storages_keep_identity()
