"""What discovery finds: dropout applications (:class:`FoundSite`), things left alone (:class:`Finding`), and
the whole result (:class:`Discovery`). Plain data, shared by discovery, the dry run and planning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Set, Type

from .callsites import CallKey
from .consumers import ConsumerInfo
from .layers import ConcreteDropoutBase

__all__ = ["FoundSite", "Finding", "Discovery"]


@dataclass
class FoundSite:
    """A dropout application found in the model.

    Attributes:
        kind: "module", "functional" or "fused".
        owner: qualified name of the module whose code applies it ("" for the root).
        module_name: for module sites, the ``nn.Dropout*`` module's name; for fused sites, the dropout module
            whose rate the fused op uses (if any).
        site_type: the concrete class to use.
        p: the original rate (None if not a constant).
        found_by: "fx", "module search" or "dry run".
        consumer: the consuming weights, or None.
        consumer_note: why there is no consumer, when there is none.
        called: True if seen in the trace/dry run, None if unknown.
        function: for functional sites, e.g. "F.dropout".
        key: for functional sites, the call location.
        method: for functional/fused sites, the owner's method that contains the call.
        fused_op: for fused sites, e.g. "scaled_dot_product_attention" or "MultiheadAttention".
        units_hint: size of the dropped feature dim, if known (K for sites whose consumer does not give it).
        rate_holder: where the call's rate is read from, as ``"module.path.attribute"`` (e.g.
            ``"encoder.layer.0.attention.self.dropout.p"``), when a dry run traced it; freeze writes the
            learned rate there.
        attention_interface: the call is made inside a transformers attention interface (attention dropout
            that only the eager implementation applies as a call).
        output_unused: the dry run saw the call but none of its outputs reached the model's outputs (a site
            there would get no gradient from the data; :mod:`cd_convert.reach`).
        notes: free-form notes for the report.
    """

    kind: str
    owner: str
    site_type: Type[ConcreteDropoutBase]
    p: Optional[float]
    found_by: str
    module_name: Optional[str] = None
    consumer: Optional[ConsumerInfo] = None
    consumer_note: str = ""
    called: Optional[bool] = True
    function: Optional[str] = None
    key: Optional[CallKey] = None
    method: Optional[str] = None
    fused_op: Optional[str] = None
    units_hint: Optional[int] = None
    rate_holder: Optional[str] = None
    attention_interface: bool = False
    output_unused: bool = False
    notes: List[str] = field(default_factory=list)


@dataclass
class Finding:
    """Something noteworthy that is not converted (unsupported fused dropout, drop-path, unused dropout)."""

    name: str
    status: str
    detail: str


@dataclass
class Discovery:
    """Everything discovery learned about a model.

    Attributes:
        sites: dropout applications found.
        findings: what is left alone, and why.
        called_modules: qualified names of modules seen called (trace or dry run).
        method: "fx", "fx + module search", "module search", "dry run".
        trace_error: why torch.fx failed, if it did.
        leaves: qualified names of modules treated as leaves (not traced through).
        dry_run: a dry run confirmed the sites (every module that ran was seen).
    """

    sites: List[FoundSite] = field(default_factory=list)
    findings: List[Finding] = field(default_factory=list)
    called_modules: Set[str] = field(default_factory=set)
    method: str = "fx"
    trace_error: Optional[str] = None
    leaves: Set[str] = field(default_factory=set)
    dry_run: bool = False
