"""The kinds of site in the order they are tried (first match wins), for detection and for planning.

To add a kind: write one file with a :class:`~cd_convert.sites.base.SiteKind` subclass (and its change
records), then add an instance here, before any kind that would otherwise claim its nodes or sites.
"""

from __future__ import annotations

from typing import Tuple

from .attention import FusedAttentionKind
from .attention_function import AttentionFunctionKind
from .base import SiteKind
from .functional import FunctionalKind
from .interface_attention import InterfaceAttentionKind
from .mha import MultiheadAttentionKind
from .module import ModuleKind
from .non_sites import NonSiteKind
from .rate_attribute import RateAttributeKind
from .recurrent import RecurrentKind
from .targeted import TargetedLayerKind

__all__ = ["DETECTORS", "PLANNERS", "TARGETED"]

#: Detection order: a timm attention module's dropout is a fused site before it is a plain module.
DETECTORS: Tuple[SiteKind, ...] = (
    FusedAttentionKind(),
    MultiheadAttentionKind(),
    ModuleKind(),
    FunctionalKind(),
    RecurrentKind(),
    NonSiteKind(),
)
#: Planning order: a module whose rate is only read, and attention-interface calls, before the general kinds.
PLANNERS: Tuple[SiteKind, ...] = (
    RateAttributeKind(),
    InterfaceAttentionKind(),
    MultiheadAttentionKind(),
    AttentionFunctionKind(),
    FusedAttentionKind(),
    ModuleKind(),
    FunctionalKind(),
)
#: Sites in front of targeted layers (planned per layer, not from discovery).
TARGETED = TargetedLayerKind()
