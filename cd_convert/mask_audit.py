"""Fixed-rate masks that no kind of site accounts for, seen at the aten level during a dry run.

Discovery recognises dropout by its form: ``nn.Dropout*`` modules, functional dropout calls, dropout rates
passed into fused attention, and the known non-sites (drop-path modules, alpha dropout, recurrent layers).
Dropout written some other way draws its mask below all of these: a custom autograd function calling
``bernoulli_`` (DeBERTa-style ``StableDropout``), dropout inside a torch function the model calls directly
(``F.multi_head_attention_forward`` without an ``nn.MultiheadAttention``), a ``scaled_dot_product_attention``
kernel reached some other way. Every such mask is an aten op (``bernoulli``, ``native_dropout``, a fused
attention kernel with ``dropout_p``), so a ``TorchDispatchMode`` active during the dry run sees all of them.
:class:`MaskAudit` lists the ones drawn outside every recognised form, with where they were drawn, so that
conversion reports them (status ``unsupported``, with a warning) instead of leaving them silently at their
fixed rate.

A mask with one value per example (shape ``(B, 1, ..., 1)``) is stochastic depth (drop-path), not dropout:
it is listed as "not a dropout site", without a warning.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .callsites import caller_frame

__all__ = ["FixedMask", "MaskAudit", "fixed_rate_mask"]

#: aten dropout ops taking ``p`` and ``train`` (what ``F.dropout`` and friends reach on each backend).
_DROPOUT_OPS = frozenset(
    {
        "native_dropout",
        "dropout",
        "dropout_",
        "feature_dropout",
        "feature_dropout_",
        "alpha_dropout",
        "alpha_dropout_",
        "feature_alpha_dropout",
        "feature_alpha_dropout_",
    }
)


@dataclass
class FixedMask:
    """One fixed-rate mask drawn outside every recognised form of dropout.

    Attributes:
        op: the aten op, e.g. ``"aten.bernoulli_.float"``.
        rate: the drop rate, when the op takes a number (None for a tensor of probabilities).
        shape: the mask's (or the attention query's) shape.
        per_example: one mask value per example (stochastic depth), not per unit.
        location: ``"file.py:line in function"`` of the model code that drew it, or "" when unknown.
    """

    op: str
    rate: Optional[float]
    shape: Tuple[int, ...]
    per_example: bool
    location: str

    def describe(self) -> str:
        """One line for a report row: the op, its rate and shape, and where it was drawn."""
        rate = f" p={self.rate:g}" if self.rate is not None else " with a tensor of probabilities"
        where = f" in {self.location}" if self.location else ""
        return f"{self.op}{rate} on {self.shape}{where}"


def _argument(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], name: str) -> Any:
    """The value an aten op was called with for its schema argument ``name`` (its default when omitted)."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            if index < len(args) and not argument.kwarg_only:
                return args[index]
            return argument.default_value if argument.has_default_value() else None
    return None


def fixed_rate_mask(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Tuple[Optional[float], Any]]:
    """Whether an aten op call draws a mask at a fixed nonzero rate.

    Args:
        func: the aten op overload, as a dispatch mode receives it.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        ``(rate, tensor)`` (the rate None for a tensor of probabilities; the tensor whose shape the mask has),
        or None: ``native_dropout`` / ``dropout`` / ``feature_dropout`` and the alpha variants with p > 0 and
        train not False, a ``bernoulli`` draw with a keep probability below 1 or a tensor of probabilities, a
        scaled-dot-product-attention kernel with ``dropout_p`` > 0.
    """
    namespace, _, name = func._schema.name.partition("::")
    if namespace != "aten" or not args:
        return None
    if name in _DROPOUT_OPS:
        p, train = _argument(func, args, kwargs, "p"), _argument(func, args, kwargs, "train")
        return None if train is False or not p else (float(p), args[0])
    if name in ("bernoulli", "bernoulli_"):
        keep = _argument(func, args, kwargs, "p")  # the probability of a 1, i.e. of keeping
        if keep is None or isinstance(keep, torch.Tensor):
            return None, args[0]
        return None if float(keep) >= 1.0 else (1.0 - float(keep), args[0])
    if "scaled_dot_product" in name and "attention" in name and not name.endswith("_backward"):
        p = _argument(func, args, kwargs, "dropout_p")
        return (float(p), args[0]) if p else None
    return None


def _per_example(tensor: Any) -> bool:
    shape = getattr(tensor, "shape", ())
    return len(shape) >= 2 and all(size == 1 for size in shape[1:])


def _location(frame: Any) -> str:
    if frame is None:
        return ""
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"


class MaskAudit(TorchDispatchMode):
    """Reports every fixed-rate mask drawn while ``accounted()`` is False.

    Args:
        accounted: whether a mask drawn now belongs to a recognised form of dropout (the dry run knows: inside
            a dropout module, a recorded functional dropout call, a known non-site).
        report: called with each :class:`FixedMask` that is not accounted for.
    """

    def __init__(self, accounted: Callable[[], bool], report: Callable[[FixedMask], None]) -> None:
        super().__init__()
        self.accounted = accounted
        self.report = report

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        found = fixed_rate_mask(func, args, kwargs)
        if found is not None and not self.accounted():
            rate, tensor = found
            self.report(
                FixedMask(
                    op=f"aten.{func.__name__}",
                    rate=rate,
                    shape=tuple(getattr(tensor, "shape", ())),
                    per_example=_per_example(tensor),
                    location=_location(caller_frame(sys._getframe(1))),
                )
            )
        return func(*args, **kwargs)
