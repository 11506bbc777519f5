"""Looking modules up by qualified name, shared by the conversion (:mod:`cd_convert.sites`) and the regulariser.

A neutral module so that :mod:`cd_convert.collector`, which runs in every training step, does not depend on
the conversion machinery of :mod:`cd_convert.sites`.
"""

from __future__ import annotations

from typing import Tuple

import torch.nn as nn

__all__ = ["submodule", "parent_of"]


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, with ``""`` meaning ``root``.

    Args:
        root: the module the path starts from.
        path: a qualified module name below ``root`` (``"blocks.0.mlp"``), or ``""``.

    Returns:
        The module at ``path``.

    Raises:
        AttributeError: when ``root`` has no module at ``path``.
    """
    return root.get_submodule(path) if path else root


def parent_of(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """The module holding ``path`` and the attribute name under which it holds it.

    Args:
        root: the module the path starts from.
        path: a qualified name below ``root`` (of a module, parameter or buffer).

    Returns:
        ``(parent, attr)``: ``root`` itself for a name without a dot.

    Raises:
        AttributeError: when ``root`` has no module at the parent path.
    """
    parent_name, _, attr = path.rpartition(".")
    return submodule(root, parent_name), attr
