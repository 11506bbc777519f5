"""Planning: from what discovery found and what the user selected, the list of sites to create.

Nothing here touches the model. The plan holds, per site, the report row, the concrete class and its
initial rate, the change that will create it and the site's applications (consumer weights) for the
regulariser. Dropout that is not converted gets a report row saying why. Each found site is planned by
the first kind of :mod:`cd_convert.sites.registry` that claims it; the planner holds what kinds share
(selection, naming, the rows).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple, Type

import torch.nn as nn

from .callsites import warn_stacklevel
from .collector import Application, get_collector
from .consumers import ConsumerInfo
from .errors import ConversionError, TargetError
from .found import Discovery, FoundSite
from .layers import ConcreteDropoutBase, InitP
from .options import ConvertOptions
from .report import SiteRow
from .sites import registry
from .targets import DROPOUT_TYPES, Matcher, first_match, is_targetable

__all__ = ["Planner", "Plan", "PlannedSite", "consumer_text"]


@dataclass
class PlannedSite:
    """One concrete site: its report row, how to build it, the change that installs it, its applications.

    Attributes:
        row: the report row (status "planned", or "existing" for a site converted earlier).
        site_type: the concrete class.
        init: the initial rate.
        temperature: None for the class default.
        change: the change record that installs the site (for an existing site: None, or the record that lets
            ``freeze`` turn a site written in the model's own code into ``nn.Dropout*``).
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
    #: ``(owner, method)`` -> locations of the calls there that are left at their fixed rate (see
    #: :attr:`cd_convert.interception.MethodInterceptor.left`).
    left_calls: Dict[Tuple[str, str], Set[Any]] = field(default_factory=dict)

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
                units = consumer.units if consumer is not None and consumer.units is not None else units_hint
                apps.append(Application(entry.row.name, weights, units))
        return apps


def consumer_text(consumer: Optional[ConsumerInfo]) -> str:
    """The consumer's weights as report text."""
    return ", ".join(consumer.weights) if consumer else ""


class Planner:
    """Builds a :class:`Plan` for one model; the kinds of site call back into it.

    Args:
        model: the model (read only).
        discovery: what discovery found.
        targets: parsed ``targets`` (None: every dropout site).
        exclude: parsed ``exclude``.
        options: the conversion options.

    Attributes:
        planned: site name -> planned site, in planning order.
        rows: the report rows.
        used: which ``targets`` entries matched something (by ``id``).
        shared_rates: (owner, method, function, rate attribute) -> the site of calls sharing one rate.
        cache: per-conversion values the kinds compute once (keyed by the kind's choice of name).
        absorbed: ``id(found)`` of the dropout sites that targeted layers read (each becomes their site).
        current: the found site being planned (None outside that loop), for :meth:`selected`.
    """

    def __init__(
        self,
        model: nn.Module,
        discovery: Discovery,
        targets: Optional[List[Matcher]],
        exclude: Optional[List[Matcher]],
        options: ConvertOptions,
    ) -> None:
        self.model = model
        self.discovery = discovery
        self.targets = targets
        self.exclude = exclude
        self.options = options
        self.modules = dict(model.named_modules())
        earlier = get_collector(model)
        self._earlier_rows: Dict[str, SiteRow] = {row.name: row for row in earlier.rows} if earlier else {}
        self.rows: List[SiteRow] = []
        self.left_calls: Dict[Tuple[str, str], Set[Any]] = {}
        self.planned: Dict[str, PlannedSite] = {}
        self.used: Dict[int, bool] = {id(m): False for m in (targets or [])}
        self.shared_rates: Dict[Tuple[str, str, str, str], PlannedSite] = {}
        self.cache: Dict[str, Any] = {}
        self._child_counts: Dict[Tuple[str, str], int] = {}
        # Dropout sites that targeted layers read (by id), and the site being planned: selection converts an
        # absorbed dropout even when ``targets`` names only the layers.
        self.absorbed: Set[int] = set()
        self.current: Optional[FoundSite] = None

    def build(self) -> Plan:
        """Plan every site; raise :class:`TargetError` when ``targets`` matched nothing."""
        layers = [
            (name, module)
            for name, module in self.modules.items()
            if self.targets is not None and is_targetable(module) and not self._excluded(name, module)
        ]
        self.absorbed = registry.TARGETED.absorptions(self, layers)
        for found in self.discovery.sites:
            kind = next((k for k in registry.PLANNERS if k.claims(found, self)), None)
            if kind is None:
                raise ConversionError(f"no kind of site plans {found.kind} site {found.module_name or found.owner!r}")
            self.current = found
            kind.plan(self, found)
        self.current = None
        for name, module in layers:  # after the dropout sites, so that a layer can see the site it absorbs
            registry.TARGETED.plan_layer(self, name, module)
        for finding in self.discovery.findings:
            self.rows.append(SiteRow(finding.name, "-", finding.status, finding.detail, found_by=self.discovery.method))
        self._check_targets_used()
        notes = []
        if self.discovery.trace_error:
            notes.append(
                f"torch.fx could not trace the model ({self.discovery.trace_error}); sites were found by module search"
                + (
                    ""
                    if self.discovery.dry_run
                    else "; functional dropout calls (F.dropout) are only found there with example_inputs="
                )
            )
        model_changes = [change for kind in registry.PLANNERS for change in kind.model_changes(self)]
        return Plan(
            list(self.planned.values()), self.rows, self.discovery.method, notes, model_changes, self.left_calls
        )

    # -- what the kinds of site share --------------------------------------------------------------
    def add(self, name: str, entry: PlannedSite) -> PlannedSite:
        """Record a planned site and its report row; return the entry to add applications to.

        A site already in the model is listed once however many ways discovery reached it (an attention
        module found by the trace and again by module search, a targeted layer's site found by module search
        and by ``targets``): the first entry is returned. Its initial rate is its current learned rate.
        """
        if entry.existing:
            previous = self.planned.get(name)
            if previous is not None and previous.existing:
                return previous
            site = self.modules.get(name)
            if isinstance(site, ConcreteDropoutBase) and not site.p_logit.is_meta:
                entry.init = float(site.p.detach())
            self._keep_first_description(entry.row)
        self.planned[name] = entry
        self.rows.append(entry.row)
        return entry

    def _keep_first_description(self, row: SiteRow) -> None:
        """Describe a site an earlier conversion made as that conversion did (kind, original, original rate).

        Seen again, a routed call's site or a fused attention's site is a concrete module the second discovery
        may reach as a plain module; what it was converted from is only known to the first conversion.
        """
        earlier = self._earlier_rows.get(row.name)
        if earlier is not None:
            row.kind, row.original, row.original_p = earlier.kind, earlier.original, earlier.original_p

    def selected(self, name: str, module: nn.Module) -> bool:
        """Whether ``targets``/``exclude`` select the site ``name`` (on ``module``); marks the matching entry used.

        A site that a targeted layer reads (absorbed) is selected unless ``exclude`` names it: excluding the
        dropout keeps it fixed, and the layer then gets its own input site.
        """
        if self._excluded(name, module):
            return False
        if self.targets is None:
            return True
        match = first_match(self.targets, name, module)
        if match is not None:
            self.used[id(match)] = True
        return match is not None or (self.current is not None and id(self.current) in self.absorbed)

    def dropout_type_targeted(self) -> bool:
        """Whether ``targets`` names a dropout type (which then selects functional dropout too)."""
        return any(isinstance(m.entry, type) and issubclass(m.entry, DROPOUT_TYPES) for m in self.targets or [])

    def skip_reason(self, found: FoundSite, selected: bool) -> Optional[Tuple[str, str]]:
        """``(status, note)`` when a found site is not converted (not selected, rate 0, kept fused), else None."""
        if not selected:
            return "not selected", "left as fixed dropout"
        if found.output_unused:
            return "output unused", (
                "its output did not reach the model's outputs in the dry run (the model computes it and drops it): "
                "a site would get no gradient from the data, so it stays as it is"
            )
        if found.p == 0.0 and not self.options.include_zero_rate:
            return "skipped (p=0)", "include_zero_rate=False: rate-0 dropout stays as it is"
        if found.p == 0.0 and self._literal_rate(found):
            return "skipped (p=0)", (
                "a call whose rate 0 is written in the code, not read from a float attribute of a module (CTRL's "
                "dropout=0.0): the model never drops here and a plain model could not carry a learned rate, so it "
                "stays as it is"
            )
        if (found.kind == "fused" or found.attention_interface) and not self.options.fused_attention:
            return "left fused", "fused_attention=False: the fused kernel keeps its fixed rate"
        return None

    def _literal_rate(self, found: FoundSite) -> bool:
        """Whether a call's rate is a literal: the dry run saw the call and traced its rate to no attribute (it tags
        every rate-0 attribute). torch.fx alone sees every rate as a constant, so without a dry run it cannot tell."""
        return self.discovery.dry_run and found.key is not None and found.module_name is None and not found.rate_holder

    def skip_row(self, found: FoundSite, name: str, original: str, reason: Tuple[str, str]) -> SiteRow:
        """The report row of a site that is not converted."""
        status, note = reason
        return SiteRow(name, "-", status, original, found.p, found_by=found.found_by, called=found.called, notes=[note])

    def new_child_name(self, owner: nn.Module, found: FoundSite) -> str:
        """A fresh attribute name on ``owner`` for the site of a call in ``found.method``."""
        attention = found.kind == "fused" or found.attention_interface
        base = f"{found.method}_attn_dropout" if attention and found.kind == "fused" else f"{found.method}_dropout"
        count = self._child_counts.get((found.owner, base), 0)
        self._child_counts[(found.owner, base)] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        suffix = 1
        while hasattr(owner, name):
            name = f"{base}_{count + suffix}"
            suffix += 1
        return name

    def _excluded(self, name: str, module: nn.Module) -> bool:
        return self.exclude is not None and first_match(self.exclude, name, module) is not None

    def _check_targets_used(self) -> None:
        if self.targets is None:
            return
        for matcher in self.targets:
            if not self.used[id(matcher)]:
                warnings.warn(
                    f"targets entry {matcher.label} matched no dropout site or targetable layer.",
                    stacklevel=warn_stacklevel(),
                )
        if not self.planned:
            raise TargetError(_nothing_matched_message(self.model, self.discovery, self.targets))


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
        "Pass targets=None to convert every dropout site, a layer type such as nn.Linear, or globs over the names "
        "above."
    )
