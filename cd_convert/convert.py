"""``convert``: discover -> plan -> validate -> apply; and ``plan``, ``report``, ``unconvert``, ``freeze``.

Every change is built and validated before any is applied; an error while applying undoes what was done,
so a model is never left half-converted. The model object keeps its class, methods and state_dict keys
(the sites add their own ``p_logit`` keys).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .callsites import warn_stacklevel
from .collector import COLLECTOR_ATTR, Collector, get_collector, require_collector, require_collectors
from .discover import discover
from .errors import ConversionError, FreezeError
from .integrations.timm import notrace_for
from .interception import interceptors
from .layers import ConcreteDropoutBase, InitP
from .options import ConvertOptions, explicit_options, resolve_options
from .planning import Plan, PlannedSite, Planner
from .prior import DEFAULT_LENGTH_SCALE, resolve_scale
from .report import Report
from .sites.routed import RoutedSite
from .targets import parse_targets

__all__ = ["convert", "plan", "report", "set_regularizer", "unconvert", "freeze"]


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
    # Sites an earlier conversion made have their change recorded; a site written in the model's own code does
    # not: its change (which applies nothing) is recorded now, so that freeze turns it into nn.Dropout*.
    recorded = {change.site_name for change in collector.changes}
    try:
        for entry in plan.sites:
            if entry.existing:
                if entry.change is not None and entry.row.name not in recorded:
                    entry.change.apply(model)
                    done.append(entry.change)
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
    _mark_left_calls(model, plan)
    for entry in plan.sites:
        site = _site_module(model, entry)
        if site is not None:
            # Keeping the output for the backward pass is free when only weight layers read it (they keep it).
            site.save_output = entry.exact_consumers and all(c is not None for c, _ in entry.applications)


def _mark_left_calls(model: nn.Module, plan: Plan) -> None:
    """Tell each method interceptor which of its method's calls the plan left at their fixed rate, so that
    it does not warn about them as calls the conversion never saw."""
    for (owner, method), keys in plan.left_calls.items():
        interceptor = interceptors(model.get_submodule(owner)).get(method)
        if interceptor is not None:
            interceptor.left.update(keys)


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


def _prepare(model: nn.Module, targets: Any, options: ConvertOptions) -> Plan:
    """Discover and plan (the model is only read).

    Args:
        model: the model.
        targets: the ``targets`` argument.
        options: the validated options.

    Returns:
        The plan.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert expects a torch.nn.Module, got {type(model).__name__}.")
    matchers = parse_targets(targets, "targets")
    leaves, wraps = _model_leaves_and_wraps(model, options.leaf_modules, options.autowrap_functions)
    notes: List[str] = []
    example_inputs = options.example_inputs
    if example_inputs is None:
        example_inputs, note = _automatic_inputs(model)
        notes += [note] if note else []
    elif not isinstance(example_inputs, (tuple, list, dict)):
        example_inputs = (example_inputs,)
    discovery = discover(model, leaf_modules=leaves, autowrap_functions=wraps, example_inputs=example_inputs)
    plan_ = Planner(model, discovery, matchers, options.exclude_matchers(), options).build()
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
    options: Optional[ConvertOptions] = None,
) -> nn.Module:
    """Turn a model's dropout (or the inputs of chosen layers) into learned Concrete Dropout sites.

    The keyword arguments from ``exclude`` to ``example_inputs`` are the fields of
    :class:`~cd_convert.options.ConvertOptions`, with the same defaults; each is documented there. They can
    also be passed as one object, ``options=ConvertOptions(...)`` (then none of them may be set as well).

    Args:
        model: any ``nn.Module``; it keeps its class, methods and state_dict keys.
        targets: None converts every dropout site (``nn.Dropout*`` modules, functional dropout, attention
            dropout). Otherwise a list of module types (``nn.Linear``, ``nn.Conv2d``: a site on each such
            layer's input, or the dropout already in front of it, which becomes that site), qualified-name
            globs, compiled regexes, predicates ``(name, module) -> bool``.
        exclude: the same forms as ``targets``; matching sites/layers are left alone.
        dataset_size, length_scale, loss, tau, weight_regularizer, dropout_regularizer: the regulariser's
            scale (``dataset_size=len(train_set)`` with the default ``loss="nll"`` for a classifier).
        init_p, temperature, channel_temperature, include_zero_rate, fused_attention: how sites start.
        leaf_modules, autowrap_functions, example_inputs: how sites are found.
        inplace: change ``model`` itself instead of a deep copy.
        options: all of the options above as one :class:`~cd_convert.options.ConvertOptions`.

    Returns:
        The converted model (``model`` itself when ``inplace=True``).

    Raises:
        ConversionError / TargetError / ValueError / TypeError: before anything is changed.
    """
    # The option keywords are this function's parameters: the ones set to other values than their defaults
    # are the options given (a test keeps the parameters and ConvertOptions' fields the same).
    options = resolve_options(options, explicit_options(locals()), "convert")
    scale = options.regularizer_scale()
    plan_ = _prepare(model, targets, options)
    if targets is None and not plan_.sites:
        warnings.warn(
            f"{type(model).__name__} applies no dropout that cd_convert can convert; nothing was changed. Pass "
            "targets=[nn.Linear] (or nn.Conv2d, globs, ...) to insert sites in front of layers, or create the model "
            "with a dropout rate > 0 (timm: drop_rate=0.1).",
            stacklevel=warn_stacklevel(),
        )
    _warn_unsupported(model, plan_)
    _warn_not_called(model, plan_)
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
    collector.rows = plan_.rows
    collector.method = plan_.method
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
        **kwargs: the other keyword arguments of :func:`convert`: the option keywords or ``options=``
            (``inplace`` is ignored).

    Returns:
        A :class:`~cd_convert.report.Report` whose site rows have status "planned" (or "existing").
    """
    kwargs.pop("inplace", None)
    options = resolve_options(kwargs.pop("options", None), kwargs, "plan")
    scale = options.regularizer_scale()
    p = _prepare(model, targets, options)
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
    collector = require_collector(model, "call cd_convert.convert(model) first.")
    rows = copy.deepcopy(collector.rows)
    for row in rows:
        if row.status in ("converted", "existing"):
            try:
                p = model.get_submodule(row.name).p.detach()
                row.p = None if p.is_meta else float(p)
            except AttributeError:
                row.notes.append("site no longer in the model")
    scale = collector.scale.description if collector.scale else "not set (pass dataset_size=)"
    return Report(rows=rows, method=collector.method, notes=list(collector.notes), regularizer=scale)


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
    for _, collector in require_collectors(model, "call cd_convert.convert(model) first."):
        collector.scale = scale


def unconvert(model: nn.Module) -> nn.Module:
    """Restore the original modules, methods and state_dict keys (in place).

    Args:
        model: a converted model.

    Returns:
        The same object, as it was before conversion (the learned rates are dropped; see :func:`freeze`).
        Concrete sites written in the model's own code stay as they are, with their learned rates.
    """
    collector = require_collector(model, "nothing to undo.")
    for change in reversed(collector.changes):
        change.undo(model)
    model.__dict__.pop(COLLECTOR_ATTR, None)
    return model


def freeze(model: nn.Module, *, strict: bool = True, inplace: bool = False) -> nn.Module:
    """A plain PyTorch model whose sites are ``nn.Dropout*`` with the learned rates.

    Module sites (also concrete sites written in the model's own code, and dropout absorbed by a targeted
    layer) become ``nn.Dropout*(p)`` at the same path, ``nn.Dropout1d/2d/3d`` for channel-wise ones; a targeted
    layer ``fc`` with a site of its own becomes ``nn.Sequential(nn.Dropout(p), fc)`` (its keys gain ``.1``); a
    functional site writes ``p`` into the owner's rate attribute (e.g. timm's ``drop_rate``). The result holds
    no cd_convert object and loads without cd_convert installed.

    Args:
        model: a converted model.
        strict: raise :class:`FreezeError` when a site's rate cannot be written back; with False such a site
            keeps its original rate and a warning names it.
        inplace: change ``model`` instead of a deep copy.

    Returns:
        The frozen model.
    """
    collector = require_collector(model, "nothing to freeze.")
    blockers = {c.site_name: c.freeze_blocker for c in collector.changes if c.freeze_blocker is not None}
    blockers.update(_shared_rate_blockers(model, collector.changes))
    if blockers and strict:
        raise FreezeError(
            "these sites cannot be written back as a plain rate: "
            + "; ".join(dict.fromkeys(blockers.values()))
            + ". Pass strict=False to keep their original rates (a warning names them)."
        )
    target = model if inplace else copy.deepcopy(model)
    for change in reversed(get_collector(target).changes):
        if change.site_name in blockers:
            warnings.warn(
                f"freeze: {change.site_name} keeps its original rate ({blockers[change.site_name]}).",
                stacklevel=warn_stacklevel(),
            )
            change.undo(target)
        else:
            change.freeze(target)
    target.__dict__.pop(COLLECTOR_ATTR, None)
    return target


def _shared_rate_blockers(model: nn.Module, changes: Sequence[Any]) -> Dict[str, str]:
    """Sites whose learned rates differ but that would write them into the same attribute, by site name.

    Calls in one method reading one rate attribute share one site; calls in different methods of a module (or
    modules sharing one dropout module) that read the same attribute get a site each, and learn their own rates.
    A plain model reads one number there, so freeze cannot carry both: the last write would silently win.

    Args:
        model: the converted model.
        changes: its collector's changes.

    Returns:
        ``{site name: why}`` for every site of such a group (empty when every group's rates agree).
    """
    groups: Dict[Tuple[int, str], List[RoutedSite]] = {}
    for change in changes:
        if isinstance(change, RoutedSite) and change.freeze_blocker is None:
            holder, path = change.rate_target(model)
            groups.setdefault((id(holder), path), []).append(change)
    blockers: Dict[str, str] = {}
    for (_, attribute), group in groups.items():
        rates = [change.learned_rate(model) for change in group]
        if len(group) < 2 or max(rates) - min(rates) <= 1e-6:
            continue
        why = (
            "sites "
            + ", ".join(f"{c.site_name!r} (p={p:.4g})" for c, p in zip(group, rates))
            + f" learned different rates, but the model's code reads all of them from {attribute!r} of one module, "
            "which holds one number (the converted model keeps each site's own rate)"
        )
        blockers.update({change.site_name: why for change in group})
    return blockers


def _shown(names: List[str]) -> str:
    """The first three names, quoted, and how many more."""
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


#: A qualified name's indices (``layers.3``, ``expert_2``), replaced to compare parallel copies of a module.
_INDEX = re.compile(r"\d+")


def _warn_not_called(model: nn.Module, plan_: Plan) -> None:
    """One warning naming the dropout modules the dry run never saw running while a parallel copy of them ran.

    Such a module gets no site (its p-logit would get no gradient from the inputs seen) and keeps its fixed
    rate. When a copy of it at another index ran (the same qualified name but for its numbers: a
    mixture-of-experts expert no token was routed to, beside one that was), the model does call it on other
    inputs, and the user should know. A module with no copy that ran is most often one the model defines and
    never uses (ALBERT's and XLNet's layer dropouts, an attention dropout whose rate goes to SDPA): it stays a
    report row only, as do rate-0 modules, which change nothing when they run.
    """
    ran = {_INDEX.sub("#", row.name) for row in plan_.rows if row.called}
    names = [
        row.name
        for row in plan_.rows
        if row.status == "not called" and (row.original_p or 0.0) > 0.0 and _INDEX.sub("#", row.name) in ran
    ]
    if names:
        warnings.warn(
            f"{len(names)} dropout module(s) in {type(model).__name__} never ran in the dry run, although a parallel "
            f"copy of each did, and keep their fixed rate: {_shown(names)}. Pass example_inputs that reach them "
            "(for a mixture of experts: inputs routed to every expert). cd_convert.report(model) lists them "
            "(status 'not called').",
            stacklevel=warn_stacklevel(),
        )


def _warn_unsupported(model: nn.Module, plan_: Plan) -> None:
    """One warning naming the dropouts that keep their fixed rate because no kind of site can take them."""
    names = [row.name for row in plan_.rows if row.status == "unsupported"]
    if names:
        warnings.warn(
            f"{len(names)} dropout(s) in {type(model).__name__} cannot be converted and keep their fixed rate: "
            f"{_shown(names)}. cd_convert.report(model) says why for each (rows with status 'unsupported').",
            stacklevel=warn_stacklevel(),
        )
