"""Typed errors: every refusal says what was wrong and what to pass instead."""

from __future__ import annotations

__all__ = ["ConversionError", "TargetError", "FreezeError"]


class ConversionError(ValueError):
    """The model or the arguments cannot be converted as asked; the model was not changed."""


class TargetError(ConversionError):
    """A ``targets``/``exclude`` entry is malformed, unsupported, or nothing matched."""


class FreezeError(RuntimeError):
    """A site cannot be written back as a plain ``torch.nn`` dropout."""
