"""Planning: from what discovery found and what the user selected, the list of sites to create.

Nothing here touches the model. The plan holds, per site, the report row, the concrete class and its
initial rate, the change that will create it (:mod:`cd_convert.changes`) and the site's applications
(consumer weights) for the regulariser. Dropout that is not converted gets a report row saying why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type

import torch.nn as nn

from .changes import FusedAttentionSwitch, InputSite, MethodSite, ModuleSwap, find_rate_attribute
from .collector import Application
from .consumers import ConsumerInfo
from .found import Discovery, FoundSite
from .errors import TargetError
from .interception import interceptors
from .layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d, ConcreteDropoutBase, InitP
from .report import SiteRow
from .targets import DROPOUT_TYPES, Matcher, first_match, is_dropout_module, is_targetable

#: Report note of a site applied inside a transformers attention interface.
_EAGER_NOTE = (
    "attention runs in its eager implementation while the site is active (training, MC prediction): that keeps "
    "a batch x heads x L x L probability tensor per layer for the backward pass; in eval the model's own "
    "implementation runs. fused_attention=False keeps it fixed and fused"
)

#: Child name of the site inserted in front of a targeted layer.
INPUT_SITE_CHILD = "concrete_dropout"
_INPUT_SITE_TYPES: Dict[type, Type[ConcreteDropoutBase]] = {
    nn.Conv1d: ConcreteDropout1d,
    nn.Conv2d: ConcreteDropout2d,
    nn.Conv3d: ConcreteDropout3d,
}


@dataclass
class Options:
    """The user's conversion options that shape each site."""

    init_p: InitP
    temperature: Optional[float]
    channel_temperature: Optional[float]
    include_zero_rate: bool
    fused_attention: bool

    def initial_rate(self, p: Optional[float]) -> InitP:
        """A site starts at the original rate when it is usable (0 < p < 1), else at ``init_p``."""
        return p if p is not None and 0.0 < p < 1.0 else self.init_p

    def temperature_for(self, site_type: Type[ConcreteDropoutBase]) -> Optional[float]:
        """The user's temperature for this kind of site (None: the class default)."""
        return self.channel_temperature if site_type.channelwise else self.temperature


@dataclass
class PlannedSite:
    """One concrete site: its report row, how to build it, the change that installs it, its applications.

    Attributes:
        row: the report row (status "planned", or "existing" for a site converted earlier).
        site_type: the concrete class.
        init: the initial rate.
        temperature: None for the class default.
        change: the change record that installs the site (None for existing sites).
        applications: ``(consumer, units_hint)`` per application.
        extra_changes: further changes (e.g. the fused-attention switch).
        existing: the site is already in the model.
        exact_consumers: every application's output provably reaches weight layers only (fx), so the site
            may keep its output for the backward pass.
    """

    row: SiteRow
    site_type: Type[ConcreteDropoutBase]
    init: InitP
    temperature: Optional[float]
    change: Any
    applications: List[Tuple[Optional[ConsumerInfo], Optional[int]]] = field(default_factory=list)
    extra_changes: List[Any] = field(default_factory=list)
    existing: bool = False
    exact_consumers: bool = True

    def add_application(self, found: FoundSite) -> None:
        """Record one application of the site and note its consumer on the report row."""
        self.applications.append((found.consumer, found.units_hint))
        self.exact_consumers &= found.consumer is not None and found.found_by == "fx"
        if found.consumer is not None:
            text = consumer_text(found.consumer)
            if text not in self.row.consumer.split(" | "):
                self.row.consumer = f"{self.row.consumer} | {text}" if self.row.consumer else text
        else:
            note = f"no single consumer ({found.consumer_note}): entropy term only"
            if note not in self.row.notes:
                self.row.notes.append(note)


@dataclass
class Plan:
    """The complete plan of one conversion."""

    sites: List[PlannedSite]
    rows: List[SiteRow]
    method: str
    notes: List[str]
    model_changes: List[Any] = field(default_factory=list)

    def applications(self) -> List[Application]:
        """The regulariser's applications: one per (site, consumer weights), duplicates merged."""
        apps: List[Application] = []
        seen = set()
        for entry in self.sites:
            for consumer, units_hint in entry.applications:
                weights = consumer.weights if consumer else ()
                if (entry.row.name, weights) in seen:
                    continue
                seen.add((entry.row.name, weights))
                apps.append(Application(entry.row.name, weights, consumer.units if consumer else units_hint))
        return apps


def consumer_text(consumer: Optional[ConsumerInfo]) -> str:
    """The consumer's weights as report text."""
    return ", ".join(consumer.weights) if consumer else ""


class Planner:
    """Builds a :class:`Plan` for one model.

    Args:
        model: the model (read only).
        discovery: what discovery found.
        targets: parsed ``targets`` (None: every dropout site).
        exclude: parsed ``exclude``.
        options: the conversion options.
    """

    def __init__(
        self,
        model: nn.Module,
        discovery: Discovery,
        targets: Optional[List[Matcher]],
        exclude: Optional[List[Matcher]],
        options: Options,
    ) -> None:
        self.model = model
        self.discovery = discovery
        self.targets = targets
        self.exclude = exclude
        self.options = options
        self.modules = dict(model.named_modules())
        self.rows: List[SiteRow] = []
        self.planned: Dict[str, PlannedSite] = {}
        self.used: Dict[int, bool] = {id(m): False for m in (targets or [])}
        self.child_counts: Dict[Tuple[str, str], int] = {}
        #: (owner, method, function, rate holder) -> the planned site of calls that share one rate.
        self.shared_rate: Dict[Tuple[str, str, str, str], PlannedSite] = {}
        #: planned site name -> the module that applies it inside a transformers attention interface.
        self.attention_owners: Dict[str, str] = {}

    def build(self) -> Plan:
        """Plan every site; raise :class:`TargetError` when ``targets`` matched nothing."""
        read_rates = self._rates_read_by_calls()
        for found in self.discovery.sites:
            if found.module_name and found.module_name in read_rates and found.called is not True:
                self.rows.append(self._rate_holder_row(found, read_rates[found.module_name]))
            elif found.module_name and found.called is False and found.kind == "module":
                self.rows.append(self._not_called_row(found))
            elif found.module_name:
                self._plan_module_site(found)
            else:
                self._plan_call_site(found)
        if self.targets is not None:
            for name, module in self.modules.items():
                if is_targetable(module) and not self._excluded(name, module):
                    self._plan_targeted_layer(name, module)
        for finding in self.discovery.findings:
            self.rows.append(SiteRow(finding.name, "-", finding.status, finding.detail, found_by=self.discovery.method))
        self._check_targets_used()
        notes = []
        if self.discovery.trace_error:
            notes.append(
                f"torch.fx could not trace the model ({self.discovery.trace_error}); sites were found by module search"
                + (
                    ""
                    if "dry run" in self.discovery.method
                    else "; functional dropout calls (F.dropout) are only found there with example_inputs="
                )
            )
        model_changes = self._attention_switches()
        return Plan(list(self.planned.values()), self.rows, self.discovery.method, notes, model_changes)

    # -- transformers-style attention ---------------------------------------------------------------
    def _rates_read_by_calls(self) -> Dict[str, FoundSite]:
        """Dropout modules whose ``p`` a functional call reads (BERT's attention dropout) -> that call."""
        read: Dict[str, FoundSite] = {}
        for found in self.discovery.sites:
            holder = found.rate_holder
            if found.module_name is None and holder and holder.endswith(".p"):
                module = self.modules.get(holder[: -len(".p")])
                if module is not None and is_dropout_module(module):
                    read[holder[: -len(".p")]] = found
        return read

    def _rate_holder_row(self, found: FoundSite, reader: FoundSite) -> SiteRow:
        where = f"{reader.owner or '<root>'}.{reader.method}"
        return SiteRow(
            found.module_name or "",
            "-",
            "rate read",
            f"{type(self.modules[found.module_name]).__name__}(p={found.p:.3g})",
            found.p,
            found_by=found.found_by,
            called=found.called,
            notes=[f"never called; its rate is passed to the dropout call in {where}, which becomes the learned site"],
        )

    def _not_called_row(self, found: FoundSite) -> SiteRow:
        return SiteRow(
            found.module_name or "",
            "-",
            "not called",
            f"{type(self.modules[found.module_name]).__name__}(p={found.p:.3g})",
            found.p,
            found_by=found.found_by,
            called=False,
            notes=["never called in the dry run: no site created (its parameter would get no gradient)"],
        )

    def _attention_switches(self) -> List[Any]:
        """Eager-attention switches for the sites applied inside transformers attention interfaces."""
        new = {name: owner for name, owner in self.attention_owners.items() if not self.planned[name].existing}
        if not new:
            return []
        from .integrations.transformers import eager_switches

        return eager_switches(self.model, new)

    # -- selection ---------------------------------------------------------------------------------
    def _excluded(self, name: str, module: nn.Module) -> bool:
        return self.exclude is not None and first_match(self.exclude, name, module) is not None

    def _selected(self, name: str, module: nn.Module) -> bool:
        if self._excluded(name, module):
            return False
        if self.targets is None:
            return True
        match = first_match(self.targets, name, module)
        if match is not None:
            self.used[id(match)] = True
        return match is not None

    def _dropout_type_targeted(self) -> bool:
        return any(isinstance(m.entry, type) and issubclass(m.entry, DROPOUT_TYPES) for m in self.targets or [])

    def _skip_row(self, found: FoundSite, name: str, original: str, selected: bool) -> Optional[SiteRow]:
        """A report row when the site is not converted (not selected, rate 0, fused kept), else None."""
        if not selected:
            status, note = "not selected", "left as fixed dropout"
        elif found.p == 0.0 and not self.options.include_zero_rate:
            status, note = "skipped (p=0)", "include_zero_rate=False: rate-0 dropout stays as it is"
        elif (found.kind == "fused" or found.attention_interface) and not self.options.fused_attention:
            status, note = "left fused", "fused_attention=False: the fused kernel keeps its fixed rate"
        else:
            return None
        return SiteRow(name, "-", status, original, found.p, found_by=found.found_by, called=found.called, notes=[note])

    def _add(self, name: str, entry: PlannedSite) -> PlannedSite:
        self.planned[name] = entry
        self.rows.append(entry.row)
        return entry

    # -- the three kinds of site ---------------------------------------------------------------------
    def _plan_module_site(self, found: FoundSite) -> None:
        """An ``nn.Dropout*`` module (called, or whose rate a fused attention reads)."""
        name = found.module_name
        module = self.modules[name]
        existing = isinstance(module, ConcreteDropoutBase)
        original = f"{type(module).__name__}(p={found.p:.3g})"
        if not existing:
            skip = self._skip_row(found, name, original, self._selected(name, module))
            if skip is not None:
                self.rows.append(skip)
                return
        entry = self.planned.get(name)
        kind = "attention" if found.attention_interface else found.kind
        if entry is None:
            paths = [n for n, m in self.model.named_modules(remove_duplicate=False) if m is module]
            row = SiteRow(
                name,
                kind,
                "existing" if existing else "planned",
                original,
                found.p,
                found_by=found.found_by,
                called=found.called,
                notes=list(found.notes),
            )
            entry = self._add(
                name,
                PlannedSite(
                    row,
                    found.site_type,
                    self.options.initial_rate(found.p),
                    self.options.temperature_for(found.site_type),
                    None if existing else ModuleSwap(name, paths, module, kind=kind),
                    existing=existing,
                ),
            )
            if found.attention_interface:
                self.attention_owners[name] = name.rpartition(".")[0]
                entry.row.notes.append(_EAGER_NOTE)
            if found.kind == "fused" and not existing:
                entry.extra_changes.append(FusedAttentionSwitch(found.owner, name.rpartition(".")[2], name))
        entry.add_application(found)

    def _plan_call_site(self, found: FoundSite) -> None:
        """A functional dropout call, a fused ``scaled_dot_product_attention``, or MHA's attention dropout."""
        owner = self.modules[found.owner] if found.owner else self.model
        label = f"{found.owner or '<root>'}.{found.method or '?'}"
        what = found.function or found.fused_op
        is_mha = found.fused_op == "MultiheadAttention"
        if (found.key is None and not is_mha) or found.method is None:
            self.rows.append(
                SiteRow(
                    label,
                    found.kind,
                    "unsupported",
                    f"{what} in {label}",
                    found.p,
                    found_by=found.found_by,
                    notes=["the call could not be attributed to a method; it keeps its fixed rate"],
                )
            )
            return
        routed = interceptors(owner).get(found.method)
        existing_child = (routed.catch_all if is_mha else routed.routes.get(found.key)) if routed else None
        if existing_child is not None:  # converted before: keep the site, refresh its consumer
            name = f"{found.owner}.{existing_child}" if found.owner else existing_child
            row = SiteRow(
                name,
                found.kind,
                "existing",
                f"{what} in {label}",
                found.p,
                found_by=found.found_by,
                called=found.called,
            )
            self._add(
                name, PlannedSite(row, found.site_type, self.options.init_p, None, None, existing=True)
            ).add_application(found)
            return
        share_key = (found.owner, found.method, what or "", found.rate_holder or "")
        shared = self.shared_rate.get(share_key) if found.rate_holder else None
        if shared is not None:  # another call reading the same rate attribute: the same learned rate
            shared.change.keys.append(found.key)
            shared.add_application(found)
            return
        child = self._new_child_name(owner, found)
        name = f"{found.owner}.{child}" if found.owner else child
        selected = self._selected(name, owner) or self._dropout_type_targeted()
        skip = self._skip_row(found, name, f"{what} in {label}", selected)
        if skip is not None:
            self.rows.append(skip)
            return
        kind = "attention" if found.attention_interface else found.kind
        row = SiteRow(
            name,
            kind,
            "planned",
            f"{what} in {type(owner).__name__}.{found.method}",
            found.p,
            found_by=found.found_by,
            called=found.called,
            notes=list(found.notes),
        )
        change = MethodSite(
            name,
            found.owner,
            found.method,
            child,
            keys=[found.key] if found.key else [],
            catch_all=is_mha,
            kind=kind,
            rate_attribute=self._rate_attribute(owner, found),
        )
        entry = PlannedSite(
            row,
            found.site_type,
            self.options.initial_rate(found.p),
            self.options.temperature_for(found.site_type),
            change,
        )
        self._add(name, entry).add_application(found)
        if found.rate_holder:
            self.shared_rate[share_key] = entry
            row.notes.append(f"rate read from {found.rate_holder}; freeze writes the learned rate there")
        if found.attention_interface:
            self.attention_owners[name] = found.owner
            row.notes.append(_EAGER_NOTE)

    def _rate_attribute(self, owner: nn.Module, found: FoundSite) -> Optional[str]:
        """Where freeze writes the learned rate, relative to the owner (``"dropout"``, ``"dropout.p"``)."""
        if found.kind != "functional":
            return None
        holder = found.rate_holder
        if holder is not None:
            prefix = f"{found.owner}." if found.owner else ""
            if holder.startswith(prefix):
                return holder[len(prefix) :]
        return find_rate_attribute(owner, found.p)

    def _new_child_name(self, owner: nn.Module, found: FoundSite) -> str:
        base = f"{found.method}_attn_dropout" if found.kind == "fused" else f"{found.method}_dropout"
        count = self.child_counts.get((found.owner, base), 0)
        self.child_counts[(found.owner, base)] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        suffix = 1
        while hasattr(owner, name):
            name = f"{base}_{count + suffix}"
            suffix += 1
        return name

    def _plan_targeted_layer(self, name: str, module: nn.Module) -> None:
        """A site in front of a targeted Linear/ConvNd layer."""
        match = first_match(self.targets, name, module)
        if match is None:
            return
        self.used[id(match)] = True
        site_name = f"{name}.{INPUT_SITE_CHILD}"
        units = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        consumer = ConsumerInfo((name,), (f"{name}.weight",), units)
        original = _layer_text(module)
        existing = getattr(module, INPUT_SITE_CHILD, None)
        if isinstance(existing, ConcreteDropoutBase):  # already converted: keep it, add nothing
            row = SiteRow(
                site_name,
                "targeted",
                "existing",
                original,
                consumer=consumer_text(consumer),
                found_by="targets",
                called=True,
            )
            entry = self._add(
                site_name, PlannedSite(row, type(existing), self.options.init_p, None, None, existing=True)
            )
            entry.applications.append((consumer, None))
            return
        called = _layer_called(self.model, name, self.discovery)
        if called is False:
            self.rows.append(
                SiteRow(
                    name,
                    "-",
                    "not called",
                    original,
                    found_by="targets",
                    called=False,
                    notes=[_not_called_reason(self.model, name)],
                )
            )
            return
        site_type = next((t for k, t in _INPUT_SITE_TYPES.items() if isinstance(module, k)), ConcreteDropout)
        row = SiteRow(
            site_name,
            "targeted",
            "planned",
            original,
            None,
            consumer=consumer_text(consumer),
            found_by="targets",
            called=called,
        )
        entry = self._add(
            site_name,
            PlannedSite(
                row,
                site_type,
                self.options.init_p,
                self.options.temperature_for(site_type),
                InputSite(site_name, name, INPUT_SITE_CHILD),
            ),
        )
        entry.applications.append((consumer, None))

    def _check_targets_used(self) -> None:
        if self.targets is None:
            return
        for matcher in self.targets:
            if not self.used[id(matcher)]:
                warnings.warn(
                    f"targets entry {matcher.label} matched no dropout site or targetable layer.", stacklevel=5
                )
        if not self.planned:
            raise TargetError(_nothing_matched_message(self.model, self.discovery, self.targets))


def _layer_text(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__}({module.in_features}->{module.out_features}) input"
    return f"{type(module).__name__}({module.in_channels}->{module.out_channels}) input"


def _layer_called(model: nn.Module, name: str, discovery: Discovery) -> Optional[bool]:
    """Whether a targeted layer runs as a module: True (seen), False (known not to), None (not known)."""
    if name in discovery.called_modules:
        return True
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return False
    if discovery.method.endswith("dry run"):
        return False  # the dry run saw every module that ran
    if discovery.method == "module search" or any(name.startswith(leaf + ".") for leaf in discovery.leaves):
        return None
    return False


def _not_called_reason(model: nn.Module, name: str) -> str:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention uses this layer's weight directly and never calls it: no site created"
    return "never called as a module in the forward pass: no site created (its parameter would get no gradient)"


def _nothing_matched_message(model: nn.Module, discovery: Discovery, targets: List[Matcher]) -> str:
    def listing(items: List[str]) -> str:
        shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
        return shown or "none"

    dropout_sites = [
        s.module_name or f"{s.owner or '<root>'}.{s.method} ({s.function or s.fused_op})" for s in discovery.sites
    ]
    layers = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if is_targetable(m)]
    return (
        f"targets {[m.label for m in targets]} matched nothing to convert in {type(model).__name__}.\n"
        f"  dropout sites: {listing(dropout_sites)}\n"
        f"  targetable layers (Linear/ConvNd): {listing(layers)}\n"
        "Pass targets=None to convert every dropout site, a layer type such as nn.Linear, or globs over the names above."
    )
