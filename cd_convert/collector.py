"""The per-model collector: every concrete site of a converted model and the regulariser over them.

A converted model carries one :class:`Collector` as a plain attribute (not a submodule, so it adds no
state_dict keys and survives ``copy.deepcopy``, pickling and ``torch.save``). It records, for every
*application* of a site, the parameter path of the weight that consumes the dropped activations and the
number of units K. Names, not object references, are stored: a head replaced by ``reset_classifier`` is
then found again under its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import ConcreteDropoutBase
from .prior import RegularizerScale

COLLECTOR_ATTR = "_cd_convert_collector"


@dataclass
class Application:
    """One place where a site's mask is applied, and what the regulariser needs for it.

    Attributes:
        site: qualified name of the concrete-dropout module.
        consumer_weights: qualified names of the weights that consume the output (several when e.g. separate
            q/k/v projections read the same dropped tensor); empty: only the entropy term is used.
        units: K, the consumer's input features (or input channels for ConvNd consumers); for a site
            without consumer, None: the size of the dropped feature dim, seen in the first forward pass.
    """

    site: str
    consumer_weights: Tuple[str, ...]
    units: Optional[int]


@dataclass
class Collector:
    """All sites of one converted model, the regulariser's scale, and the record of what was changed.

    Attributes:
        applications: one entry per site application (a shared module called twice has two).
        scale: the regulariser constants, or None until ``dataset_size`` (or explicit constants) is given.
        changes: the conversion's change records, used by ``report``, ``unconvert`` and ``freeze``.
        notes: conversion-level notes (how sites were found, what was left alone).
        rows: the report rows of the conversion (:class:`cd_convert.report.SiteRow`).
        method: how the sites were found.
    """

    applications: List[Application] = field(default_factory=list)
    scale: Optional[RegularizerScale] = None
    changes: List[Any] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rows: List[Any] = field(default_factory=list)
    method: str = ""

    def site_names(self) -> List[str]:
        """Names of the distinct site modules, in the order they were converted."""
        seen: Dict[str, None] = {}
        for change in self.changes:
            if change.kind != "attribute":
                seen.setdefault(change.site_name, None)
        for app in self.applications:
            seen.setdefault(app.site, None)
        return list(seen)

    def regularization(self, root: nn.Module) -> Tensor:
        """The whole regulariser of the sites under ``root``, from the current parameters, in fp32.

        Args:
            root: the module this collector is attached to.

        Returns:
            A 0-dim fp32 tensor, differentiable w.r.t. every p-logit and consumer weight.
        """
        if self.scale is None:
            raise RuntimeError(
                "the regulariser's scale is unknown: pass dataset_size=N (the number of training examples) to "
                "cd_convert.convert(...) or cd_convert.set_regularizer(model, dataset_size=N), or give explicit "
                "weight_regularizer= and dropout_regularizer=. There is no default for N: it sets how strongly "
                "the prior pulls the dropout rates."
            )
        if not self.applications:
            device = next((p.device for p in root.parameters()), torch.device("cpu"))
            return torch.zeros((), dtype=torch.float32, device=device)
        # All applications at once: a handful of ops whatever the number of sites (the per-step cost of a
        # site-by-site loop is noticeable on small networks).
        sites = [_resolve_module(root, app.site) for app in self.applications]
        device = sites[0].p_logit.device
        logits = [site.p_logit for site in sites]
        if all(t.dim() == 0 and t.device == device for t in logits):
            raw = torch.stack(logits).float()  # one autograd node for all sites
        else:
            raw = torch.stack([t.float().reshape(()).to(device) for t in logits])
        bounds = torch.tensor([math.log1p(-site.eps) - math.log(site.eps) for site in sites], device=device)
        theta = raw + (torch.maximum(torch.minimum(raw, bounds), -bounds) - raw).detach()  # straight-through clamp
        p, one_minus_p = torch.sigmoid(theta), torch.sigmoid(-theta)
        # p log p + (1 - p) log(1 - p) via log-sigmoid: finite for every clamped logit.
        neg_entropy = p * F.logsigmoid(theta) + one_minus_p * F.logsigmoid(-theta)
        units = torch.tensor([float(_units(app, site)) for app, site in zip(self.applications, sites)], device=device)
        total = self.scale.dropout_regularizer * (units * neg_entropy).sum()
        weighted = [i for i, app in enumerate(self.applications) if app.consumer_weights]
        if weighted:
            squared = _consumer_squared_norms(root, [self.applications[i] for i in weighted], device)
            index = torch.tensor(weighted, device=device)
            total = total + self.scale.weight_regularizer * (squared / one_minus_p[index]).sum()
        return total


def _consumer_squared_norms(root: nn.Module, apps: Sequence[Application], device: torch.device) -> Tensor:
    """Per application, the sum of ``||W||^2`` over its consumer weights, as an fp32 vector on ``device``.

    Each distinct weight's norm is computed once and counted for every site that consumes it (the KL term is
    per site, so a tied weight counts once per site), and the norms come from one ``torch._foreach_norm`` call
    where possible: a site-by-site loop of ``pow``/``sum`` launches several kernels per weight, which in eager
    mode on a GPU costs more CPU time than the arithmetic.

    Args:
        root: the module the applications' names are relative to.
        apps: applications with at least one consumer weight.
        device: where the result lives (the device of the first site's logit).

    Returns:
        A ``(len(apps),)`` fp32 tensor, differentiable w.r.t. every consumer weight.
    """
    names: Dict[str, int] = {}
    for app in apps:
        for name in app.consumer_weights:
            names.setdefault(name, len(names))
    squared = _squared_norms([_resolve_parameter(root, name) for name in names], device)
    owners = [k for k, app in enumerate(apps) for _ in app.consumer_weights]
    members = [names[name] for app in apps for name in app.consumer_weights]
    if owners == members:  # one weight per application, each its own: already in order
        return squared
    # counts[k, j]: how often application k reads weight j. A product rather than index_add/scatter_add,
    # which are nondeterministic on CUDA (and refused under torch.use_deterministic_algorithms).
    counts = torch.zeros(len(apps), len(names))
    for owner, member in zip(owners, members):
        counts[owner, member] += 1.0
    return counts.to(device) @ squared


def _squared_norms(weights: Sequence[Tensor], device: torch.device) -> Tensor:
    """``||w||^2`` of each weight in fp32 on ``device``: one fused call when all live there, else one by one."""
    if all(w.device == device for w in weights):
        try:
            # The norm's gradient w / ||w|| is defined as 0 at w = 0 (PyTorch's norm backward), so zero-initialised
            # weights get the correct gradient 2w = 0 of ||w||^2.
            return torch.stack(torch._foreach_norm(list(weights), 2, dtype=torch.float32)).square()
        except (TypeError, RuntimeError, AttributeError):  # a torch without the dtype argument
            pass
    return torch.stack([w.float().pow(2).sum().to(device) for w in weights])


def _units(app: Application, site: ConcreteDropoutBase) -> int:
    if app.units is not None:
        return app.units
    seen = site.units_seen
    if seen is None:
        raise RuntimeError(
            f"site {app.site!r} has no consuming weight layer, so its entropy term uses the size of the dropped "
            "feature dim, which is known after the first forward pass in training mode. Run a forward pass "
            "before calling cd_convert.regularization(model)."
        )
    return seen


def _resolve_module(root: nn.Module, name: str) -> ConcreteDropoutBase:
    try:
        module = root.get_submodule(name)
    except AttributeError as err:
        raise RuntimeError(
            f"concrete-dropout site {name!r} is no longer in the model (was a module replaced after "
            "conversion?). Call cd_convert.convert(model) again to refresh the collector."
        ) from err
    if not isinstance(module, ConcreteDropoutBase):
        raise RuntimeError(
            f"{name!r} should be a concrete-dropout site but is a {type(module).__name__}; call "
            "cd_convert.convert(model) again to refresh the collector."
        )
    return module


def _resolve_parameter(root: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(module_name) if module_name else root
        weight = getattr(owner, attr)
    except AttributeError as err:
        raise RuntimeError(
            f"the consumer weight {name!r} is no longer in the model (was the layer replaced, e.g. by "
            "reset_classifier?). Call cd_convert.convert(model) again to refresh the collector."
        ) from err
    if not isinstance(weight, Tensor):
        raise RuntimeError(f"consumer weight {name!r} is not a tensor (got {type(weight).__name__}).")
    return weight


def get_collector(module: nn.Module) -> Optional[Collector]:
    """The collector attached to ``module`` itself, if any."""
    return module.__dict__.get(COLLECTOR_ATTR)


def iter_collectors(model: nn.Module) -> Iterator[Tuple[nn.Module, Collector]]:
    """Yield ``(owner, collector)`` for the outermost converted modules under ``model``.

    The model itself, or converted submodules (e.g. ``ddp.module`` or a converted backbone inside a bigger
    model). A converted module's own descendants are not searched again.
    """
    own = get_collector(model)
    if own is not None:
        yield model, own
        return
    for child in model.children():
        yield from iter_collectors(child)


def regularization(model: nn.Module) -> Tensor:
    """The Concrete Dropout regulariser of a converted model, to add to the loss once per step.

    Computed from the parameters at call time (nothing cached from a forward pass), in fp32; zero when the
    model has no sites. Works on wrappers (``DistributedDataParallel``, a container holding a converted
    model) by summing over the converted modules inside.

    Args:
        model: a model returned by :func:`cd_convert.convert` (or a module containing one).

    Returns:
        A 0-dim fp32 tensor.

    Raises:
        RuntimeError: if no ``dataset_size`` (or explicit constants) was given for a model with sites.
    """
    total: Optional[Tensor] = None
    for owner, collector in iter_collectors(model):
        term = collector.regularization(owner)
        total = term if total is None else total + term.to(total.device)
    if total is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    return total


def dropout_rates(model: nn.Module) -> Dict[str, float]:
    """The learned drop probability of every site, ``{site_name: p}``.

    Args:
        model: a converted model (or a module containing converted ones).

    Returns:
        Python floats keyed by the site's qualified name relative to ``model``.
    """
    rates: Dict[str, float] = {}
    for owner, collector in iter_collectors(model):
        prefix = _relative_prefix(model, owner)
        for name in collector.site_names():
            site = _resolve_module(owner, name)
            rates[prefix + name] = float(site.p.detach())
    return rates


def _relative_prefix(model: nn.Module, owner: nn.Module) -> str:
    if owner is model:
        return ""
    for name, module in model.named_modules():
        if module is owner:
            return name + "."
    return ""
