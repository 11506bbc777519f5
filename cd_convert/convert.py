"""``convert``: discover -> plan -> validate -> apply; and ``plan``, ``report``, ``unconvert``, ``freeze``.

Every change is built and validated before any is applied; an error while applying undoes what was done,
so a model is never left half-converted. The model object keeps its class, methods and state_dict keys
(the sites add their own ``p_logit`` keys).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .collector import COLLECTOR_ATTR, Collector, get_collector, iter_collectors
from .discover import discover
from .errors import ConversionError, FreezeError
from .integrations.timm import notrace_for
from .layers import ConcreteDropoutBase, InitP, validate_init_p, validate_temperature
from .planning import Options, Plan, PlannedSite, Planner
from .prior import DEFAULT_LENGTH_SCALE, resolve_scale
from .report import Report
from .targets import parse_targets


#: Keyword arguments of :func:`convert` that set the regulariser's scale.
SCALE_OPTIONS = ("dataset_size", "length_scale", "loss", "tau", "weight_regularizer", "dropout_regularizer")
#: Keyword arguments of :func:`convert` that shape discovery and the sites.
SITE_OPTIONS = (
    "exclude",
    "init_p",
    "temperature",
    "channel_temperature",
    "include_zero_rate",
    "fused_attention",
    "leaf_modules",
    "autowrap_functions",
    "example_inputs",
)


def _validate_common(init_p: InitP, temperature: Optional[float], channel_temperature: Optional[float]) -> None:
    validate_init_p(init_p)
    for value in (temperature, channel_temperature):
        if value is not None:
            validate_temperature(value)


def _reference_tensor(model: nn.Module, entry: PlannedSite) -> Tuple[torch.device, torch.dtype]:
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


def _apply(model: nn.Module, plan: Plan, collector: Collector) -> None:
    done: List[Any] = []
    try:
        for entry in plan.sites:
            if entry.existing:
                continue
            device, dtype = _reference_tensor(model, entry)
            site = entry.site_type(entry.init, entry.temperature, device=device, dtype=dtype)
            site.train(entry.change.follows(model).training)
            entry.change.apply(model, site)
            done.append(entry.change)
            for extra in entry.extra_changes:
                extra.apply(model)
                done.append(extra)
            entry.row.status = "converted"
        for change in plan.model_changes:
            change.apply(model)
            done.append(change)
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


def _site_module(model: nn.Module, entry: PlannedSite) -> Optional[ConcreteDropoutBase]:
    try:
        module = model.get_submodule(entry.row.name)
    except AttributeError:
        return None
    return module if isinstance(module, ConcreteDropoutBase) else None


def _model_leaves_and_wraps(
    model: nn.Module, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable]
) -> Tuple[List[type], List[Callable]]:
    leaves, wraps = list(leaf_modules), list(autowrap_functions)
    extra_leaves, extra_wraps = notrace_for(model)  # empty unless the model uses timm (then timm is installed)
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
) -> Plan:
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert expects a torch.nn.Module, got {type(model).__name__}.")
    _validate_common(init_p, temperature, channel_temperature)
    matchers = parse_targets(targets, "targets")
    excluders = parse_targets(exclude, "exclude")
    options = Options(init_p, temperature, channel_temperature, include_zero_rate, fused_attention)
    leaves, wraps = _model_leaves_and_wraps(model, leaf_modules, autowrap_functions)
    notes: List[str] = []
    if example_inputs is None:
        example_inputs, note = _automatic_inputs(model)
        notes += [note] if note else []
    elif not isinstance(example_inputs, (tuple, list, dict)):
        example_inputs = (example_inputs,)
    discovery = discover(model, leaf_modules=leaves, autowrap_functions=wraps, example_inputs=example_inputs)
    plan_ = Planner(model, discovery, matchers, excluders, options).build()
    plan_.notes[:0] = notes
    return plan_


def _automatic_inputs(model: nn.Module) -> Tuple[Optional[Dict[str, Any]], str]:
    """Dry-run inputs built from a transformers model's config (its attention dropout is only seen running).

    Returns:
        ``(inputs, note)``: the inputs or None, and a report note when they could not be built.
    """
    from .integrations import transformers as hf

    if not hf.is_transformers_model(model):
        return None, ""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None, (
            f"{type(model).__name__} holds transformers models but is not one: pass example_inputs= (a tuple of "
            "positional or a dict of keyword arguments) so that a dry run finds attention dropout and consumers"
        )
    try:
        return hf.example_inputs_for(model), ""
    except ConversionError as err:
        return None, str(err)


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
        example_inputs: optional inputs for one dry-run forward (on a copy) that confirms which sites run and
            finds their consumers and functional dropout where torch.fx cannot trace: a tensor, a tuple of
            positional arguments or a dict of keyword arguments. transformers models get inputs built from
            their config when none are passed.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The converted model (``model`` itself when ``inplace=True``).

    Raises:
        ConversionError / TargetError / ValueError / TypeError: before anything is changed.
    """
    scale = resolve_scale(
        dataset_size=dataset_size,
        length_scale=length_scale,
        loss=loss,
        tau=tau,
        weight_regularizer=weight_regularizer,
        dropout_regularizer=dropout_regularizer,
    )
    plan_ = _prepare(
        model,
        targets,
        exclude,
        init_p,
        temperature,
        channel_temperature,
        include_zero_rate,
        fused_attention,
        leaf_modules,
        autowrap_functions,
        example_inputs,
    )
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
    collector.applications = plan_.applications()
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
    """The changes recorded on ``module`` (converted earlier), re-expressed from ``root``."""
    prefix = next(n for n, m in root.named_modules() if m is module)
    return [change.rebased(prefix) for change in changes]


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
    scale_args = {k: kwargs.pop(k) for k in SCALE_OPTIONS if k in kwargs}
    scale = resolve_scale(**scale_args)
    unknown = set(kwargs) - set(SITE_OPTIONS)
    if unknown:
        raise TypeError(f"plan() got unexpected keyword arguments {sorted(unknown)}.")
    p = _prepare(
        model,
        targets,
        kwargs.get("exclude"),
        kwargs.get("init_p", 0.1),
        kwargs.get("temperature"),
        kwargs.get("channel_temperature"),
        kwargs.get("include_zero_rate", True),
        kwargs.get("fused_attention", True),
        kwargs.get("leaf_modules", ()),
        kwargs.get("autowrap_functions", ()),
        kwargs.get("example_inputs"),
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
    scale = resolve_scale(
        dataset_size=dataset_size,
        length_scale=length_scale,
        loss=loss,
        tau=tau,
        weight_regularizer=weight_regularizer,
        dropout_regularizer=dropout_regularizer,
    )
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
    blocked = [c for c in collector.changes if c.freeze_blocker is not None]
    if blocked and strict:
        raise FreezeError(
            "these sites cannot be written back as a plain rate: "
            + "; ".join(c.freeze_blocker for c in blocked)
            + ". Pass strict=False to keep their original rates (a warning names them)."
        )
    target = model if inplace else copy.deepcopy(model)
    for change in reversed(get_collector(target).changes):
        if change.freeze_blocker is not None:
            warnings.warn(
                f"freeze: {change.site_name} keeps its original rate (no attribute to write p into).", stacklevel=2
            )
            change.undo(target)
        else:
            change.freeze(target)
    target.__dict__.pop(COLLECTOR_ATTR, None)
    return target
