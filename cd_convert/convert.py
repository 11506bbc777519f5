"""``convert``: discover -> plan -> validate -> apply; and ``plan``, ``report``, ``unconvert``, ``freeze``.

Every change is built and validated before any is applied; an error while applying undoes what was done,
so a model is never left half-converted. The model object keeps its class, methods and state_dict keys
(the sites add their own ``p_logit`` keys).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from .changes import AttributeChange, FusedAttentionSwitch, InputSite, MethodSite, ModuleSwap, find_rate_attribute
from .collector import COLLECTOR_ATTR, Application, Collector, get_collector, iter_collectors
from .discover import ConsumerInfo, Discovery, FoundSite, discover
from .errors import ConversionError, FreezeError, TargetError
from .layers import (
    ConcreteDropout,
    ConcreteDropout1d,
    ConcreteDropout2d,
    ConcreteDropout3d,
    ConcreteDropoutBase,
    InitP,
    validate_init_p,
    validate_temperature,
)
from .prior import DEFAULT_LENGTH_SCALE, resolve_scale, validate_dataset_size
from .interception import interceptors
from .report import Report, SiteRow
from .targets import Matcher, first_match, is_dropout_module, is_targetable, parse_targets

_INPUT_SITE_TYPES: Dict[type, Type[ConcreteDropoutBase]] = {
    nn.Conv1d: ConcreteDropout1d,
    nn.Conv2d: ConcreteDropout2d,
    nn.Conv3d: ConcreteDropout3d,
}
INPUT_SITE_CHILD = "concrete_dropout"


@dataclass
class _Options:
    init_p: InitP
    temperature: Optional[float]
    channel_temperature: Optional[float]
    include_zero_rate: bool
    fused_attention: bool


@dataclass
class _PlannedSite:
    """One concrete site to create, the change that creates it, and its applications."""

    row: SiteRow
    site_type: Type[ConcreteDropoutBase]
    init: InitP
    temperature: Optional[float]
    change: Any
    applications: List[Tuple[Optional[ConsumerInfo], Optional[int]]] = field(default_factory=list)
    extra_changes: List[Any] = field(default_factory=list)
    existing: bool = False
    exact_consumers: bool = True  # every application's output provably goes only to weight layers


@dataclass
class _Plan:
    sites: List[_PlannedSite]
    rows: List[SiteRow]
    method: str
    notes: List[str]


def _validate_common(init_p: InitP, temperature: Optional[float], channel_temperature: Optional[float]) -> None:
    validate_init_p(init_p)
    if temperature is not None:
        validate_temperature(temperature)
    if channel_temperature is not None:
        validate_temperature(channel_temperature)


def _initial_rate(p: Optional[float], options: _Options) -> InitP:
    if p is not None and 0.0 < p < 1.0:
        return p
    return options.init_p


def _temperature_for(site_type: Type[ConcreteDropoutBase], options: _Options) -> Optional[float]:
    return options.channel_temperature if site_type.channelwise else options.temperature


def _consumer_text(consumer: Optional[ConsumerInfo]) -> str:
    return ", ".join(consumer.weights) if consumer else ""


def _site_matches(matchers: Optional[List[Matcher]], name: str, module: nn.Module) -> Optional[Matcher]:
    if matchers is None:
        return None
    return first_match(matchers, name, module)


def _child_name(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name = f"{base}_{i}"
        i += 1
    return name


def _build_plan(
    model: nn.Module,
    discovery: Discovery,
    targets: Optional[List[Matcher]],
    exclude: Optional[List[Matcher]],
    options: _Options,
) -> _Plan:
    modules = dict(model.named_modules())
    rows: List[SiteRow] = []
    planned: Dict[str, _PlannedSite] = {}
    used_entries: Dict[int, bool] = {id(m): False for m in (targets or [])}
    reserved: Dict[Tuple[str, str], int] = {}

    def excluded(name: str, module: nn.Module) -> bool:
        return exclude is not None and first_match(exclude, name, module) is not None

    def selected(name: str, module: nn.Module) -> bool:
        if excluded(name, module):
            return False
        if targets is None:
            return True
        match = first_match(targets, name, module)
        if match is not None:
            used_entries[id(match)] = True
        return match is not None

    # 1. Dropout applications found in the model.
    for found in discovery.sites:
        if found.kind == "module" or (found.kind == "fused" and found.module_name):
            name = found.module_name
            module = modules[name]
            existing = isinstance(module, ConcreteDropoutBase)
            if not existing and not selected(name, module):
                rows.append(SiteRow(name, "-", "not selected", f"{type(module).__name__}(p={found.p:.3g})", found.p,
                                    found_by=found.found_by, called=found.called, notes=["left as fixed dropout"]))
                continue
            if not existing and found.p == 0.0 and not options.include_zero_rate:
                rows.append(SiteRow(name, "-", "skipped (p=0)", f"{type(module).__name__}(p=0)", 0.0,
                                    found_by=found.found_by, called=found.called,
                                    notes=["include_zero_rate=False: rate-0 dropout stays as it is"]))
                continue
            if found.kind == "fused" and not options.fused_attention:
                rows.append(SiteRow(name, "-", "left fused", f"{found.fused_op}(dropout_p={found.p:.3g})", found.p,
                                    found_by=found.found_by, notes=["fused_attention=False: the fused kernel keeps its fixed rate"]))
                continue
            entry = planned.get(name)
            if entry is None:
                paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
                row = SiteRow(
                    name=name,
                    kind=found.kind,
                    status="existing" if existing else "planned",
                    original=f"{type(module).__name__}(p={found.p:.3g})",
                    original_p=found.p,
                    found_by=found.found_by,
                    called=found.called,
                    notes=list(found.notes),
                )
                entry = _PlannedSite(
                    row=row,
                    site_type=found.site_type,
                    init=_initial_rate(found.p, options),
                    temperature=_temperature_for(found.site_type, options),
                    change=ModuleSwap(name, paths, module, kind=found.kind),
                    existing=existing,
                )
                if found.kind == "fused":
                    entry.extra_changes.append(FusedAttentionSwitch(found.owner, name.rpartition(".")[2], name))
                planned[name] = entry
                rows.append(row)
            entry.applications.append((found.consumer, found.units_hint))
            entry.exact_consumers &= found.consumer is not None and found.found_by == "fx"
            _note_consumer(entry.row, found)
            continue
        # Functional or generic fused call sites.
        owner = modules[found.owner] if found.owner else model
        label = f"{found.owner or '<root>'}.{found.method or '?'}"
        is_mha = found.fused_op == "MultiheadAttention"
        if (found.key is None and not is_mha) or found.method is None:
            rows.append(SiteRow(label, found.kind, "unsupported", f"{found.function} in {label}", found.p,
                                found_by=found.found_by, notes=["the call could not be attributed to a method; it keeps its fixed rate"]))
            continue
        routed = interceptors(owner).get(found.method)
        existing_child = None
        if routed is not None:
            existing_child = routed.catch_all if is_mha else routed.routes.get(found.key)
        if existing_child is not None:  # converted before: keep the site, refresh its consumer
            name = f"{found.owner}.{existing_child}" if found.owner else existing_child
            row = SiteRow(name, found.kind, "existing", f"{found.function or found.fused_op} in {label}", found.p,
                          found_by=found.found_by, called=found.called)
            entry = _PlannedSite(row, found.site_type, options.init_p, None, None, existing=True)
            entry.applications.append((found.consumer, found.units_hint))
            _note_consumer(row, found)
            planned[name] = entry
            rows.append(row)
            continue
        base = f"{found.method}_attn_dropout" if found.kind == "fused" else f"{found.method}_dropout"
        count = reserved.get((found.owner, base), 0)
        reserved[(found.owner, base)] = count + 1
        child = _child_name(owner, base if count == 0 else f"{base}_{count}")
        name = f"{found.owner}.{child}" if found.owner else child
        if not selected(name, owner) and not (targets is not None and _dropout_type_targeted(targets)):
            rows.append(SiteRow(name, "-", "not selected", f"{found.function or found.fused_op} in {label}", found.p,
                                found_by=found.found_by, notes=["left as fixed dropout"]))
            continue
        if found.p == 0.0 and not options.include_zero_rate:
            rows.append(SiteRow(name, "-", "skipped (p=0)", f"{found.function} in {label}", 0.0, found_by=found.found_by))
            continue
        if found.kind == "fused" and not options.fused_attention:
            rows.append(SiteRow(name, "-", "left fused", f"{found.function} in {label}", found.p, found_by=found.found_by,
                                notes=["fused_attention=False: the fused kernel keeps its fixed rate"]))
            continue
        row = SiteRow(
            name=name,
            kind=found.kind,
            status="planned",
            original=f"{found.function or found.fused_op} in {type(owner).__name__}.{found.method}",
            original_p=found.p,
            found_by=found.found_by,
            called=found.called,
            notes=list(found.notes),
        )
        change = MethodSite(
            name, found.owner, found.method, child, keys=[found.key] if found.key else [],
            catch_all=found.fused_op == "MultiheadAttention", kind=found.kind,
            rate_attribute=find_rate_attribute(owner, found.p) if found.kind == "functional" else None,
        )
        entry = _PlannedSite(row, found.site_type, _initial_rate(found.p, options),
                             _temperature_for(found.site_type, options), change)
        entry.applications.append((found.consumer, found.units_hint))
        entry.exact_consumers = found.consumer is not None and found.found_by == "fx"
        _note_consumer(row, found)
        planned[name] = entry
        rows.append(row)

    # 2. Sites in front of targeted layers.
    if targets is not None:
        for name, module in modules.items():
            if not is_targetable(module) or excluded(name, module):
                continue
            match = first_match(targets, name, module)
            if match is None:
                continue
            used_entries[id(match)] = True
            site_name = f"{name}.{INPUT_SITE_CHILD}"
            units = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            consumer = ConsumerInfo((name,), (f"{name}.weight",), units)
            original = _layer_text(module)
            existing_site = getattr(module, INPUT_SITE_CHILD, None)
            if isinstance(existing_site, ConcreteDropoutBase):  # already converted: keep it, add nothing
                row = SiteRow(site_name, "targeted", "existing", original, consumer=_consumer_text(consumer),
                              found_by="targets", called=True)
                entry = _PlannedSite(row, type(existing_site), options.init_p, None, None, existing=True)
                entry.applications.append((consumer, None))
                planned[site_name] = entry
                rows.append(row)
                continue
            called = _layer_called(model, name, discovery)
            if called is False:
                rows.append(SiteRow(name, "-", "not called", original, found_by="targets", called=False,
                                    notes=[_not_called_reason(model, name)]))
                continue
            site_type = next((t for k, t in _INPUT_SITE_TYPES.items() if isinstance(module, k)), ConcreteDropout)
            row = SiteRow(site_name, "targeted", "planned", original, None, consumer=_consumer_text(consumer),
                          found_by="targets", called=called)
            entry = _PlannedSite(row, site_type, options.init_p, _temperature_for(site_type, options),
                                 InputSite(site_name, name, INPUT_SITE_CHILD))
            entry.applications.append((consumer, None))
            planned[site_name] = entry
            rows.append(row)

    for finding in discovery.findings:
        rows.append(SiteRow(finding.name, "-", finding.status, finding.detail, found_by=discovery.method))

    # 3. Targets that matched nothing.
    if targets is not None:
        for matcher in targets:
            if not used_entries[id(matcher)]:
                warnings.warn(f"targets entry {matcher.label} matched no dropout site or targetable layer.", stacklevel=4)
        if not any(not p.existing for p in planned.values()) and not any(p.existing for p in planned.values()):
            raise TargetError(_nothing_matched_message(model, discovery, targets))
    notes = []
    if discovery.trace_error:
        notes.append(f"torch.fx could not trace the model ({discovery.trace_error}); sites were found by module search")
    return _Plan(list(planned.values()), rows, discovery.method, notes)


def _dropout_type_targeted(targets: List[Matcher]) -> bool:
    return any(isinstance(m.entry, type) and issubclass(m.entry, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) for m in targets)


def _note_consumer(row: SiteRow, found: FoundSite) -> None:
    if found.consumer is not None:
        text = _consumer_text(found.consumer)
        if text not in row.consumer.split(" | "):
            row.consumer = f"{row.consumer} | {text}" if row.consumer else text
    else:
        note = f"no single consumer ({found.consumer_note}): entropy term only"
        if note not in row.notes:
            row.notes.append(note)


def _layer_text(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__}({module.in_features}->{module.out_features}) input"
    return f"{type(module).__name__}({module.in_channels}->{module.out_channels}) input"


def _layer_called(model: nn.Module, name: str, discovery: Discovery) -> Optional[bool]:
    if name in discovery.called_modules:
        return True
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return False
    if discovery.method == "module search" or any(name.startswith(leaf + ".") for leaf in discovery.leaves):
        return None if not discovery.method.endswith("dry run") else False
    return False


def _not_called_reason(model: nn.Module, name: str) -> str:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention uses this layer's weight directly and never calls it: no site created"
    return "never called as a module in the forward pass: no site created (its parameter would get no gradient)"


def _nothing_matched_message(model: nn.Module, discovery: Discovery, targets: List[Matcher]) -> str:
    dropout_sites = [s.module_name or f"{s.owner or '<root>'}.{s.method} ({s.function or s.fused_op})" for s in discovery.sites]
    layers = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if is_targetable(m)]
    listing = lambda items: ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "") or "none"
    return (
        f"targets {[m.label for m in targets]} matched nothing to convert in {type(model).__name__}.\n"
        f"  dropout sites: {listing(dropout_sites)}\n"
        f"  targetable layers (Linear/ConvNd): {listing(layers)}\n"
        "Pass targets=None to convert every dropout site, a layer type such as nn.Linear, or globs over the names above."
    )


def _reference_tensor(model: nn.Module, entry: _PlannedSite) -> Tuple[torch.device, torch.dtype]:
    for consumer, _ in entry.applications:
        if consumer is not None:
            try:
                weight = model.get_parameter(consumer.weights[0])
                if weight.is_floating_point():
                    return weight.device, weight.dtype
            except AttributeError:
                pass
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _training_flag(model: nn.Module, entry: _PlannedSite) -> bool:
    change = entry.change
    if isinstance(change, ModuleSwap):
        return change.original.training
    path = change.layer if isinstance(change, InputSite) else change.owner
    return (model.get_submodule(path) if path else model).training


def _apply(model: nn.Module, plan: _Plan, collector: Collector) -> None:
    done: List[Any] = []
    try:
        for entry in plan.sites:
            if entry.existing:
                continue
            device, dtype = _reference_tensor(model, entry)
            site = entry.site_type(entry.init, entry.temperature, device=device, dtype=dtype)
            site.train(_training_flag(model, entry))
            entry.change.apply(model, site)
            done.append(entry.change)
            for extra in entry.extra_changes:
                extra.apply(model)
                done.append(extra)
            entry.row.status = "converted"
    except Exception:
        for change in reversed(done):
            change.undo(model)
        raise
    collector.changes.extend(done)
    for entry in plan.sites:
        site = _site_module(model, entry)
        if site is not None:
            # Keeping the output for the backward pass is free when only weight layers read it (they keep it).
            site.save_output = entry.exact_consumers and all(c is not None for c, _ in entry.applications)


def _site_module(model: nn.Module, entry: _PlannedSite) -> Optional[ConcreteDropoutBase]:
    try:
        module = model.get_submodule(entry.row.name)
    except AttributeError:
        return None
    return module if isinstance(module, ConcreteDropoutBase) else None


def _applications(plan: _Plan) -> List[Application]:
    apps: List[Application] = []
    seen = set()
    for entry in plan.sites:
        for consumer, units_hint in entry.applications:
            weights = consumer.weights if consumer else ()
            key = (entry.row.name, weights)
            if key in seen:
                continue
            seen.add(key)
            units = consumer.units if consumer else units_hint
            apps.append(Application(entry.row.name, weights, units))
    return apps


def _model_leaves_and_wraps(model: nn.Module, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable]) -> Tuple[List[type], List[Callable]]:
    leaves, wraps = list(leaf_modules), list(autowrap_functions)
    try:
        from .integrations.timm import notrace_for
    except ImportError:
        return leaves, wraps
    extra_leaves, extra_wraps = notrace_for(model)
    return leaves + list(extra_leaves), wraps + list(extra_wraps)


def _prepare(
    model: nn.Module,
    targets: Any,
    exclude: Any,
    init_p: InitP,
    temperature: Optional[float],
    channel_temperature: Optional[float],
    include_zero_rate: bool,
    fused_attention: bool,
    leaf_modules: Sequence[type],
    autowrap_functions: Sequence[Callable],
    example_inputs: Optional[Sequence[Any]],
) -> _Plan:
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert expects a torch.nn.Module, got {type(model).__name__}.")
    _validate_common(init_p, temperature, channel_temperature)
    matchers = parse_targets(targets, "targets")
    excluders = parse_targets(exclude, "exclude")
    options = _Options(init_p, temperature, channel_temperature, include_zero_rate, fused_attention)
    leaves, wraps = _model_leaves_and_wraps(model, leaf_modules, autowrap_functions)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    discovery = discover(model, leaf_modules=leaves, autowrap_functions=wraps, example_inputs=example_inputs)
    return _build_plan(model, discovery, matchers, excluders, options)


def convert(
    model: nn.Module,
    targets: Optional[Any] = None,
    *,
    exclude: Optional[Any] = None,
    dataset_size: Optional[int] = None,
    length_scale: float = DEFAULT_LENGTH_SCALE,
    loss: str = "nll",
    tau: Optional[float] = None,
    weight_regularizer: Optional[float] = None,
    dropout_regularizer: Optional[float] = None,
    init_p: InitP = 0.1,
    temperature: Optional[float] = None,
    channel_temperature: Optional[float] = None,
    include_zero_rate: bool = True,
    fused_attention: bool = True,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[Callable] = (),
    example_inputs: Optional[Any] = None,
    inplace: bool = False,
) -> nn.Module:
    """Turn a model's dropout (or the inputs of chosen layers) into learned Concrete Dropout sites.

    Args:
        model: any ``nn.Module``; it keeps its class, methods and state_dict keys.
        targets: None converts every dropout site (``nn.Dropout*`` modules, functional dropout, attention
            dropout). Otherwise a list of module types (``nn.Linear``, ``nn.Conv2d``: a site on each such
            layer's input), qualified-name globs, compiled regexes, predicates ``(name, module) -> bool``.
        exclude: the same forms; matching sites/layers are left alone.
        dataset_size: training-set size N; with ``length_scale`` and ``loss`` it sets the regulariser.
        length_scale: prior length-scale l (default 1e-2).
        loss: ``"nll"``, ``"mse"`` (with ``tau``) or ``"heteroscedastic"``: the loss you minimise.
        tau: model precision for ``loss="mse"`` in the units of the loss.
        weight_regularizer, dropout_regularizer: explicit constants instead of ``dataset_size``.
        init_p: initial rate for sites without a usable original rate (and targeted layers): a float, or a
            ``(low, high)`` pair drawn uniformly in logit space. Sites with 0 < p < 1 start at that p.
        temperature: temperature of element-wise sites (default 0.1).
        channel_temperature: temperature of channel-wise sites (default 2/3).
        include_zero_rate: also convert dropout whose original rate is 0 (starting at ``init_p``).
        fused_attention: convert dropout inside fused attention (explicit attention in training: costs the
            memory of the attention matrix). False leaves it fused, reported.
        leaf_modules: module types torch.fx should not trace into (their dropout modules are found by
            module search); timm's notrace lists are added automatically for timm models.
        autowrap_functions: functions torch.fx should not trace into.
        example_inputs: optional input(s) for one dry-run forward that confirms which sites run and their
            consumers (needed for models torch.fx cannot trace, to find functional dropout there).
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The converted model (``model`` itself when ``inplace=True``).

    Raises:
        ConversionError / TargetError / ValueError / TypeError: before anything is changed.
    """
    scale = resolve_scale(
        dataset_size=dataset_size, length_scale=length_scale, loss=loss, tau=tau,
        weight_regularizer=weight_regularizer, dropout_regularizer=dropout_regularizer,
    )
    plan_ = _prepare(model, targets, exclude, init_p, temperature, channel_temperature, include_zero_rate,
                     fused_attention, leaf_modules, autowrap_functions, example_inputs)
    if targets is None and not plan_.sites:
        warnings.warn(
            f"{type(model).__name__} applies no dropout that cd_convert can convert; nothing was changed. Pass "
            "targets=[nn.Linear] (or nn.Conv2d, globs, ...) to insert sites in front of layers, or create the model "
            "with a dropout rate > 0 (timm: drop_rate=0.1).",
            stacklevel=2,
        )
    target = model if inplace else copy.deepcopy(model)
    previous = get_collector(target)
    nested = [(m, c) for m, c in _all_collectors(target) if m is not target]
    collector = Collector(scale=scale if scale is not None else (previous.scale if previous else None))
    if previous is not None:
        collector.changes.extend(previous.changes)
    for module, inner in nested:
        collector.changes.extend(_rebase(inner.changes, target, module))
    _apply(target, plan_, collector)
    collector.applications = _applications(plan_)
    collector.notes = list(plan_.notes)
    collector.rows = plan_.rows  # type: ignore[attr-defined]
    collector.method = plan_.method  # type: ignore[attr-defined]
    for module, _ in nested:
        module.__dict__.pop(COLLECTOR_ATTR, None)
    target.__dict__[COLLECTOR_ATTR] = collector
    return target


def _all_collectors(model: nn.Module):
    for module in model.modules():
        collector = get_collector(module)
        if collector is not None:
            yield module, collector


def _rebase(changes: List[Any], root: nn.Module, module: nn.Module) -> List[Any]:
    prefix = next(n for n, m in root.named_modules() if m is module)
    rebased = []
    for change in changes:
        change = copy.copy(change)
        for attr in ("site_name", "layer", "owner"):
            value = getattr(change, attr, None)
            if isinstance(value, str):
                setattr(change, attr, f"{prefix}.{value}" if value else prefix)
        if isinstance(change, ModuleSwap):
            change.paths = [f"{prefix}.{p}" for p in change.paths]
        rebased.append(change)
    return rebased


def plan(model: nn.Module, targets: Optional[Any] = None, **kwargs: Any) -> Report:
    """What :func:`convert` would do, without changing anything.

    Args:
        model: the model.
        targets: as for :func:`convert`.
        **kwargs: the other keyword arguments of :func:`convert` (``inplace`` is ignored).

    Returns:
        A :class:`~cd_convert.report.Report` whose site rows have status "planned" (or "existing").
    """
    kwargs.pop("inplace", None)
    scale_args = {k: kwargs.pop(k) for k in ("dataset_size", "length_scale", "loss", "tau", "weight_regularizer", "dropout_regularizer") if k in kwargs}
    scale = resolve_scale(**scale_args)
    allowed = {"exclude", "init_p", "temperature", "channel_temperature", "include_zero_rate", "fused_attention",
               "leaf_modules", "autowrap_functions", "example_inputs"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"plan() got unexpected keyword arguments {sorted(unknown)}.")
    p = _prepare(
        model, targets, kwargs.get("exclude"), kwargs.get("init_p", 0.1), kwargs.get("temperature"),
        kwargs.get("channel_temperature"), kwargs.get("include_zero_rate", True), kwargs.get("fused_attention", True),
        kwargs.get("leaf_modules", ()), kwargs.get("autowrap_functions", ()), kwargs.get("example_inputs"),
    )
    for entry in p.sites:
        init = entry.init
        entry.row.p = init if isinstance(init, float) else None
    return Report(rows=p.rows, method=p.method, notes=p.notes, regularizer=scale.description if scale else "")


def report(model: nn.Module) -> Report:
    """The per-site report of a converted model, with the current learned rates.

    Args:
        model: a converted model.

    Returns:
        A :class:`~cd_convert.report.Report`.
    """
    collector = get_collector(model)
    if collector is None:
        raise ConversionError(f"{type(model).__name__} has not been converted; call cd_convert.convert(model) first.")
    rows = copy.deepcopy(getattr(collector, "rows", []))
    for row in rows:
        if row.status in ("converted", "existing"):
            try:
                p = model.get_submodule(row.name).p.detach()
                row.p = None if p.is_meta else float(p)
            except AttributeError:
                row.notes.append("site no longer in the model")
    scale = collector.scale.description if collector.scale else "not set (pass dataset_size=)"
    return Report(rows=rows, method=getattr(collector, "method", ""), notes=list(collector.notes), regularizer=scale)


def set_regularizer(
    model: nn.Module,
    *,
    dataset_size: Optional[int] = None,
    length_scale: float = DEFAULT_LENGTH_SCALE,
    loss: str = "nll",
    tau: Optional[float] = None,
    weight_regularizer: Optional[float] = None,
    dropout_regularizer: Optional[float] = None,
) -> None:
    """Set (or change) the regulariser's constants of a converted model.

    Args: as the same-named arguments of :func:`convert`; one of ``dataset_size`` or the explicit pair is
        required.
    """
    scale = resolve_scale(dataset_size=dataset_size, length_scale=length_scale, loss=loss, tau=tau,
                          weight_regularizer=weight_regularizer, dropout_regularizer=dropout_regularizer)
    if scale is None:
        raise ValueError("set_regularizer needs dataset_size=N (or weight_regularizer= and dropout_regularizer=).")
    collectors = list(iter_collectors(model))
    if not collectors:
        raise ConversionError(f"{type(model).__name__} has not been converted; call cd_convert.convert(model) first.")
    for _, collector in collectors:
        collector.scale = scale


def unconvert(model: nn.Module) -> nn.Module:
    """Restore the original modules, methods and state_dict keys (in place).

    Args:
        model: a converted model.

    Returns:
        The same object, as it was before conversion (the learned rates are dropped; see :func:`freeze`).
    """
    collector = get_collector(model)
    if collector is None:
        raise ConversionError(f"{type(model).__name__} has not been converted; nothing to undo.")
    for change in reversed(collector.changes):
        change.undo(model)
    model.__dict__.pop(COLLECTOR_ATTR, None)
    return model


def freeze(model: nn.Module, *, strict: bool = True, inplace: bool = False) -> nn.Module:
    """A plain PyTorch model whose sites are ``nn.Dropout*`` with the learned rates.

    Module sites become ``nn.Dropout*(p)`` at the same path; a targeted layer ``fc`` becomes
    ``nn.Sequential(nn.Dropout(p), fc)`` (its keys gain ``.1``); a functional site writes ``p`` into the
    owner's rate attribute (e.g. timm's ``drop_rate``). The result holds no cd_convert object and loads
    without cd_convert installed.

    Args:
        model: a converted model.
        strict: raise :class:`FreezeError` when a site's rate cannot be written back; with False such a site
            keeps its original rate and a warning names it.
        inplace: change ``model`` instead of a deep copy.

    Returns:
        The frozen model.
    """
    collector = get_collector(model)
    if collector is None:
        raise ConversionError(f"{type(model).__name__} has not been converted; nothing to freeze.")
    blocked = [c for c in collector.changes if isinstance(c, MethodSite) and c.rate_attribute is None]
    if blocked and strict:
        raise FreezeError(
            "these sites cannot be written back as a plain rate: "
            + ", ".join(c.site_name for c in blocked)
            + ". Pass strict=False to keep their original rates (a warning names them)."
        )
    target = model if inplace else copy.deepcopy(model)
    for change in reversed(get_collector(target).changes):
        if isinstance(change, MethodSite) and change.rate_attribute is None:
            warnings.warn(f"freeze: {change.site_name} keeps its original rate (no attribute to write p into).", stacklevel=2)
            change.undo(target)
        else:
            change.freeze(target)
    target.__dict__.pop(COLLECTOR_ATTR, None)
    return target
