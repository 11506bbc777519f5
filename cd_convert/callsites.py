"""Call sites of functional dropout in user code: how to name one and how to find it at run time.

A functional call (``F.dropout(x, p=self.drop_rate, training=self.training)``) is identified by the code
location of the call instruction (file, first line and name of the function, bytecode offset). The same
key is computed when torch.fx traces the call, when a dry run records it, and when the converted model
runs, so a call found at conversion time is recognised again at run time.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConcreteDropoutBase
from .targets import MODULE_SITE_TYPES

__all__ = [
    "FUNCTIONAL_DROPOUTS",
    "CallKey",
    "bind_functional",
    "call_key",
    "caller_frame",
    "function_name",
    "owner_method",
    "warn_stacklevel",
]

CallKey = Tuple[str, int, str, int]

_F_PARAMS = ("input", "p", "training", "inplace")
_TORCH_PARAMS = ("input", "p", "train")
#: Functional dropouts: function -> (parameter names, site type); the site type is that of the ``nn.Dropout*``
#: module that drops the same units (channels, for the feature dropouts).
FUNCTIONAL_DROPOUTS: Dict[Callable, Tuple[Tuple[str, ...], Type[ConcreteDropoutBase]]] = {
    F.dropout: (_F_PARAMS, MODULE_SITE_TYPES[nn.Dropout]),
    F.dropout1d: (_F_PARAMS, MODULE_SITE_TYPES[nn.Dropout1d]),
    F.dropout2d: (_F_PARAMS, MODULE_SITE_TYPES[nn.Dropout2d]),
    F.dropout3d: (_F_PARAMS, MODULE_SITE_TYPES[nn.Dropout3d]),
    torch.dropout: (_TORCH_PARAMS, MODULE_SITE_TYPES[nn.Dropout]),
    torch.dropout_: (_TORCH_PARAMS, MODULE_SITE_TYPES[nn.Dropout]),
    torch.feature_dropout: (_TORCH_PARAMS, MODULE_SITE_TYPES[nn.Dropout2d]),
    torch.feature_dropout_: (_TORCH_PARAMS, MODULE_SITE_TYPES[nn.Dropout2d]),
}
_FUNCTIONAL_DEFAULTS = {"p": 0.5, "training": True, "train": True, "inplace": False}

# With the separator: a user's file in a sibling folder such as ``cd_convert_examples/`` is not library code.
_SKIP_DIRS = tuple(os.path.join(os.path.dirname(p), "") for p in (torch.__file__, os.path.abspath(__file__)))


def _is_library_frame(frame) -> bool:
    return frame.f_code.co_filename.startswith(_SKIP_DIRS)


def caller_frame(start) -> Any:
    """The first frame above ``start`` that is neither torch's nor cd_convert's own code."""
    frame = start
    while frame is not None and _is_library_frame(frame):
        frame = frame.f_back
    return frame


def warn_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line: the first frame outside cd_convert and torch.

    Called in the argument list of ``warnings.warn`` (``stacklevel=warn_stacklevel()``), so that level 1 is the
    function that warns. torch's frames are skipped too: a warning raised while torch dispatches a call of the
    user's model code (``F.dropout`` seen by a ``TorchFunctionMode``) belongs to that model code.

    Returns:
        The level of the first user frame; 1 when every frame is library code.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_library_frame(frame):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def call_key(frame) -> CallKey:
    """A stable identity for one call instruction in user code (same at trace time and at run time)."""
    code = frame.f_code
    return (code.co_filename, code.co_firstlineno, code.co_name, frame.f_lasti)


def function_name(func: Callable) -> str:
    """Readable name of a dropout function (``F.dropout``, ``torch.dropout``)."""
    module = "F" if getattr(func, "__module__", "") == "torch.nn.functional" else "torch"
    return f"{module}.{func.__name__}"


def bind_functional(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Bind a functional-dropout call's arguments to their names (defaults filled in)."""
    names = FUNCTIONAL_DROPOUTS[func][0]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for name in names[1:]:
        bound.setdefault(name, _FUNCTIONAL_DEFAULTS[name])
    if "train" in bound:
        bound["training"] = bound.pop("train")
    return bound


def owner_method(frame, owner: Optional[nn.Module]) -> Optional[str]:
    """Name of the owner's own method that is (or contains) the calling frame.

    Walks outward from the call to the first frame that runs a method of ``type(owner)`` (not one of
    ``nn.Module``'s own, such as ``_call_impl``) with ``owner`` as its first argument. Decorated methods
    (transformers wraps forwards in ``can_return_tuple``, ``deprecate_kwarg``, ...) are unwrapped first.
    """
    if owner is None:
        return None
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and frame.f_locals.get(code.co_varnames[0]) is owner:
            name = code.co_name
            func = getattr(type(owner), name, None)
            inner = inspect.unwrap(func) if callable(func) else func
            if getattr(inner, "__code__", None) is code and func is not getattr(nn.Module, name, None):
                return name
        frame = frame.f_back
    return None
