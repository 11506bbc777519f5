"""Cached 0-dim tensors used as operands in place of Python numbers (eager CPU paths)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["scalar_tensor"]


@functools.lru_cache(maxsize=64)
def scalar_tensor(value: float, dtype: torch.dtype) -> Tensor:
    """A cached 0-dim CPU tensor holding ``value`` in ``dtype``, used as an operand in place of a Python number.

    A Python number is wrapped into a new tensor on every call (about 3 us on the CPU, as much as the operation
    itself on a small mask); a CPU scalar tensor of the operand's dtype gives identical results and is also
    accepted by operations on other devices.

    Args:
        value: the number.
        dtype: its dtype (the other operand's).

    Returns:
        A shared tensor: never modify it.
    """
    with torch.inference_mode(False):  # usable outside inference mode even when first built inside it
        return torch.tensor(value, dtype=dtype, device="cpu")
