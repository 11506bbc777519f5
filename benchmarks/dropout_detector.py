"""A detector of fixed-rate dropout at the aten level, shared by the coverage benchmarks.

Independent of cd_convert's own code on purpose (cd_convert has a similar audit, :mod:`cd_convert.mask_audit`):
the benchmarks use it to check what a conversion left behind, so it must not share that code's mistakes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

#
# What a dispatch mode sees (torch 2.14): F.dropout / nn.Dropout are CompositeImplicitAutograd, so on the CPU
# they arrive decomposed into ``aten.bernoulli_.float(mask, 1 - p)`` then a div and a mul; on CUDA (fused
# kernel) as ``aten.native_dropout(x, p, train)``. F.scaled_dot_product_attention with dropout_p > 0 takes the
# math path on the CPU, decomposed the same way (one ``bernoulli_`` on the attention probabilities); on an
# accelerator it reaches a fused kernel such as ``aten._scaled_dot_product_efficient_attention`` that carries
# ``dropout_p``. The composite ops (aten.dropout, feature_dropout, alpha_dropout, scaled_dot_product_attention)
# are matched too, for dispatch levels that see them undecomposed. Kernels run inside the mode do not re-enter
# it, so each dropout is listed once, whichever way it arrives.

#: aten ops whose schema carries the drop rate ``p`` (and maybe a ``train`` flag).
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


def _argument(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], name: str) -> Any:
    """The value an aten op was called with for its schema argument ``name`` (the default when omitted)."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            if index < len(args) and not argument.kwarg_only:
                return args[index]
            return argument.default_value if argument.has_default_value() else None
    return None


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else "?"


def fixed_dropout(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Whether an aten op call draws a dropout mask at a fixed nonzero rate.

    Args:
        func: the aten op overload, as a dispatch mode receives it.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        A one-line description of the dropout (op, rate, input shape), or None when the call drops nothing
        at a fixed rate: ``native_dropout`` / ``dropout`` / ``feature_dropout`` (and the alpha variants) with
        p > 0 and train not False; a ``bernoulli`` draw with a keep probability below 1 or a tensor of
        probabilities; a scaled-dot-product-attention kernel with ``dropout_p`` > 0.
    """
    namespace, _, name = func._schema.name.partition("::")
    if namespace != "aten":
        return None
    op = f"aten.{func.__name__}"
    if name in _DROPOUT_OPS:
        # native_dropout's train=None means training.
        p, train = _argument(func, args, kwargs, "p"), _argument(func, args, kwargs, "train")
        return None if train is False or not p else f"{op} p={float(p):g} on {_shape(args[0])}"
    if name in ("bernoulli", "bernoulli_"):
        keep = _argument(func, args, kwargs, "p")  # the probability of a 1, i.e. of keeping
        if keep is None or isinstance(keep, torch.Tensor):
            return f"{op} with a tensor of probabilities on {_shape(args[0])}"
        return None if float(keep) >= 1.0 else f"{op} p={1.0 - float(keep):g} on {_shape(args[0])}"
    if "scaled_dot_product" in name and "attention" in name and not name.endswith("_backward"):
        p = _argument(func, args, kwargs, "dropout_p")
        return f"{op} dropout_p={float(p):g} on q{_shape(args[0])}" if p else None
    return None


class FixedDropoutDetector(TorchDispatchMode):
    """Lists every aten op run inside it that drops at a fixed rate (see :func:`fixed_dropout`) in ``calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        found = fixed_dropout(func, args, kwargs)
        if found is not None:
            self.calls.append(found)
        return func(*args, **kwargs)


def fixed_rate_dropout_calls(model: nn.Module, inputs: Dict[str, Any]) -> List[str]:
    """The fixed-rate dropouts of one forward ``model(**inputs)``, in the model's current train/eval mode.

    The pass runs without grad and on a fork of the CPU RNG, so the caller's random state is left as it was.

    Args:
        model: the model to run.
        inputs: its keyword inputs.

    Returns:
        One description per aten op that drew a mask at a fixed nonzero rate (see :func:`fixed_dropout`).
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad(), FixedDropoutDetector() as detector:
        model(**inputs)
    return detector.calls
