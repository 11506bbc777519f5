"""``nn.DataParallel`` replicas of modules that conversion gave instance-level methods.

Routed calls (:mod:`cd_convert.interception`) and fused mode (:mod:`cd_convert.sites.fused_linear`) put a callable
on a module's instance (``module.forward``) that refers to that module. ``nn.DataParallel`` replicates every module
for each device at each forward with ``module._replicate_for_data_parallel()``, which copies the instance's
``__dict__``: left alone, a replica's ``forward`` would still be the original's, computing with the original's
parameters (on the first device) instead of the replica's.

A module with such a method therefore also gets :class:`ReplicateHook` as its instance's
``_replicate_for_data_parallel``: it makes the replica as torch does, then lets each registered rebinder give
the replica its own instance-level state (interceptors bound to the replica, fused mode handed back to the
input-site pre-hook on the replica only).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch.nn as nn

__all__ = ["REPLICATE_ATTR", "ReplicateHook", "register_rebinder", "track", "untrack"]

#: The method ``torch.nn.parallel.replicate`` calls on every module.
REPLICATE_ATTR = "_replicate_for_data_parallel"

#: ``(needs, rebind)`` pairs: ``needs(module)`` says whether a module still has instance-level state of that
#: kind; ``rebind(module, replica)`` gives a fresh replica its own.
_REBINDERS: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module, nn.Module], None]]] = []


def register_rebinder(needs: Callable[[nn.Module], bool], rebind: Callable[[nn.Module, nn.Module], None]) -> None:
    """Register one kind of instance-level state (called once, where that state is defined).

    Args:
        needs: whether a module holds state of this kind.
        rebind: gives ``replica`` (just made from ``module``) its own state of this kind.
    """
    _REBINDERS.append((needs, rebind))


class ReplicateHook:
    """Stands in for ``module._replicate_for_data_parallel`` on the instance.

    Args:
        module: the module it belongs to.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        module = self.module
        replica = type(module)._replicate_for_data_parallel(module)
        del replica.__dict__[REPLICATE_ATTR]  # DataParallel never replicates a replica
        for needs, rebind in _REBINDERS:
            if needs(module):
                rebind(module, replica)
        return replica


def track(module: nn.Module) -> None:
    """Give ``module`` its :class:`ReplicateHook` (once)."""
    if not isinstance(module.__dict__.get(REPLICATE_ATTR), ReplicateHook):
        module.__dict__[REPLICATE_ATTR] = ReplicateHook(module)


def untrack(module: nn.Module) -> None:
    """Remove ``module``'s :class:`ReplicateHook` once it holds no instance-level state of any registered kind."""
    if isinstance(module.__dict__.get(REPLICATE_ATTR), ReplicateHook) and not any(
        needs(module) for needs, _ in _REBINDERS
    ):
        del module.__dict__[REPLICATE_ATTR]
