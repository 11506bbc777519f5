"""Whether code is running under a compiler or tracer (torch.compile, torch.jit) or a functorch transform.

The fast paths of :mod:`cd_convert.noise`, :mod:`cd_convert.fused` and :mod:`cd_convert.host_scalars`
bypass ordinary tensor operations (bit tricks, Triton launches, numbers read back); under a tracer or a
transform they must step aside so that it sees plain ops.
"""

from __future__ import annotations

import threading

import torch

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

__all__ = ["being_traced", "compiling", "eager_and_untransformed", "functorch_active", "thread_key"]

#: torch's own check of functorch transforms (absent from some torch builds: then never active).
_functorch_check = getattr(torch._C, "_are_functorch_transforms_active", None)


def compiling() -> bool:
    """True while ``torch.compile`` (Dynamo) traces the current code (``torch.compiler.is_compiling`` on
    torch >= 2.3, ``torch._dynamo.is_compiling`` before it).

    Returns:
        Whether Dynamo is tracing.
    """
    return bool(_is_compiling())


def being_traced() -> bool:
    """True inside ``torch.compile`` (Dynamo), ``torch.jit.trace`` or ``torch.jit.script``.

    Returns:
        Whether the current code is being compiled or traced rather than run eagerly.
    """
    return bool(_is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ...), which wraps the tensors it sees.

    Returns:
        Whether functorch transforms are active (False on a torch without the check).
    """
    return bool(_functorch_check()) if _functorch_check is not None else False


def eager_and_untransformed() -> bool:
    """``not being_traced() and not functorch_active()`` in one call, for the checks made on every site and
    regulariser call (each Python call level costs about as much as the check itself).

    ``torch.jit.is_scripting()`` is left out: it is False wherever Python runs this function. Dynamo's own check
    comes first: under ``torch.compile`` it stops there, before the C functions Dynamo does not trace.

    Returns:
        True when running eagerly with no tracer and no functorch transform active.
    """
    if _is_compiling() or torch._C._is_tracing():
        return False
    return _functorch_check is None or not _functorch_check()


def thread_key() -> int:
    """The current thread's key for per-thread state of hooks (``nn.DataParallel`` replicas share hooks).

    Under ``torch.compile`` the key is 0: Dynamo cannot trace ``threading.get_ident`` (each call was a graph
    break in every attention module), and a compiled region runs on one thread.

    Returns:
        ``threading.get_ident()``, or 0 while compiling.
    """
    return 0 if _is_compiling() else threading.get_ident()
