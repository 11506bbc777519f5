"""Whether code is running under a compiler or tracer (torch.compile, torch.jit).

The fast paths of :mod:`cd_convert.noise` and :mod:`cd_convert.fused` bypass ordinary tensor operations
(bit tricks, Triton launches); under a tracer they must step aside so that the tracer sees plain ops.
"""

from __future__ import annotations

import torch

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

__all__ = ["being_traced"]


def being_traced() -> bool:
    """True inside ``torch.compile`` (Dynamo), ``torch.jit.trace`` or ``torch.jit.script``.

    Returns:
        Whether the current code is being compiled or traced rather than run eagerly.
    """
    return bool(_is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())
