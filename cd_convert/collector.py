"""The per-model collector: every concrete site of a converted model and the regulariser over them.

A converted model carries one :class:`Collector` as a plain attribute (not a submodule, so it adds no
state_dict keys and survives ``copy.deepcopy``, pickling and ``torch.save``). It records, for every
*application* of a site, the parameter path of the weight that consumes the dropped activations and the
number of units K. Names, not object references, are stored: a head replaced by ``reset_classifier`` is
then found again under its name.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_extension, host_regularizer, host_scalars
from ._tracing import compiling
from ._modules import parent_of, submodule
from .errors import ConversionError
from .layers import ConcreteDropoutBase, logit_bound
from .prior import RegularizerScale
from .report import SiteRow

__all__ = [
    "COLLECTOR_ATTR",
    "Application",
    "Collector",
    "dropout_rates",
    "get_collector",
    "iter_collectors",
    "regularization",
    "require_collector",
    "require_collectors",
]

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
    rows: List[SiteRow] = field(default_factory=list)
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

        Everything that does not change from step to step (which modules and weights are read, bounds, K,
        index and count tensors on the right device) comes from a cached :class:`_Plan`; each call reads the
        parameters afresh, so the value is never stale. The plan is rebuilt when the applications, the scale, a
        module on a site's or weight's path, or a logit's or weight's device, dtype or rank change.

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
        plan: Optional[_Plan] = self.__dict__.get(_PLAN_ATTR)
        if plan is not None:
            value = plan.native_call(self, root)
            if value is not None:
                return value
        if plan is not None and plan.describes(self, root):
            logits, weights = plan.read_tensors()
            if not plan.fits(logits, weights):
                plan = None
        else:
            plan = None
        if plan is None:
            plan = _Plan.build(self, root)
            self.__dict__[_PLAN_ATTR] = plan
            logits, weights = plan.read_tensors()
        return plan.compute(logits, weights)

    def invalidate(self) -> None:
        """Drop the cached plan of :meth:`regularization` (it is rebuilt on the next call).

        Not needed after ordinary changes (they are detected); for code that edits an :class:`Application` in
        place.
        """
        self.__dict__.pop(_PLAN_ATTR, None)

    def __getstate__(self) -> Dict[str, Any]:
        # The plan holds module references and device tensors: copies and pickles rebuild it instead.
        state = dict(self.__dict__)
        state.pop(_PLAN_ATTR, None)
        return state


#: Attribute of a :class:`Collector` that holds its cached :class:`_Plan` (not a dataclass field: not compared,
#: not copied, not pickled).
_PLAN_ATTR = "_plan"


class _Plan:
    """What :meth:`Collector.regularization` needs that does not change from step to step.

    Built once by :meth:`build` (name lookups, ``torch.tensor`` of bounds/K/indices, checks), then each call
    does only :meth:`describes` (identity checks on the applications, the scale and every module on the paths
    to the sites and weights), :meth:`read_tensors`, :meth:`fits` (devices, dtypes and ranks of the tensors
    read) and :meth:`compute` (the arithmetic: one autograd node, about sixteen aten ops forward and twelve
    backward whatever the number of sites; on the CPU, up to a dozen sites, two and four beside the reads of
    numbers, :mod:`cd_convert.host_regularizer`). With the C++ build on, :meth:`native_call` makes the module
    checks, the reads and the host path's tensor checks in one C++ call instead.

    The plan refers to submodules of the root but not to the root itself (which holds the collector that
    holds the plan): no reference cycle keeps a deleted model alive.
    """

    def __init__(self) -> None:
        self.root_id = 0
        self.applications: List[Application] = []
        self.scale: Optional[RegularizerScale] = None
        #: ``(parent, name, child)`` for every step of every path; parent None stands for the root.
        self.edges: List[Tuple[Optional[nn.Module], str, nn.Module]] = []
        self.sites: List[ConcreteDropoutBase] = []
        self.eps: List[float] = []
        #: ``(owner module, attribute)`` of each distinct consumer weight name, in first-seen order.
        self.weight_refs: List[Tuple[nn.Module, str]] = []
        self.meta: List[Tuple[torch.device, torch.dtype, int]] = []
        self.device = torch.device("cpu")
        self.stack_logits = False
        self.foreach_norms = False
        self.neg_bounds: Optional[Tensor] = None
        self.bounds: Optional[Tensor] = None
        self.units: Optional[Tensor] = None
        self.dropout_regularizer: Optional[Tensor] = None
        self.weight_regularizer: Optional[Tensor] = None
        #: positions of the applications with consumer weights; None when all have them (no indexing).
        self.index: Optional[Tensor] = None
        #: ``counts[k, j]``: how often weighted application k reads weight j; None when it is the identity.
        self.counts: Optional[Tensor] = None
        self.has_weights = False
        #: ``app_counts[a, j]``: how often application a reads weight j (zero rows for applications without
        #: weights), for the analytic path; None when it is the identity.
        self.app_counts: Optional[Tensor] = None
        #: For the analytic path: ``dropout_regularizer * K`` per application, the weight regulariser as a
        #: Python number (an ``addcmul`` factor) and ``2 * weight_regularizer`` (the weight gradient's factor).
        self.dropout_units: Optional[Tensor] = None
        self.weight_regularizer_value = 0.0
        self.two_weight_regularizer: Optional[Tensor] = None
        #: Constants of the CPU's host-float path (:mod:`cd_convert.host_regularizer`); None where it does not apply.
        self.host: Optional[host_regularizer.HostTerms] = None
        #: What the C++ build re-reads and checks on every call (:meth:`native_call`), as tuples: the path
        #: edges, the sites, their eps and the consumer weights' ``(owner, attribute)``.
        self.native_tree: Tuple[Any, ...] = ()

    @classmethod
    def build(cls, collector: Collector, root: nn.Module) -> "_Plan":
        """Resolve every name and build the constant tensors.

        Args:
            collector: the collector (with a scale and at least one application).
            root: the module its names are relative to.

        Returns:
            The plan; raises the collector's usual errors for missing modules, weights or units.
        """
        plan = cls()
        plan.root_id = id(root)
        plan.applications = list(collector.applications)
        plan.scale = collector.scale
        edges: Dict[Tuple[int, str], Tuple[Optional[nn.Module], str, nn.Module]] = {}
        apps = plan.applications
        plan.sites = [_resolve_module(root, app.site) for app in apps]
        for app in apps:
            _record_path(root, app.site, edges)
        names: Dict[str, int] = {}
        for app in apps:
            for name in app.consumer_weights:
                names.setdefault(name, len(names))
        for name in names:
            _resolve_parameter(root, name)  # the error messages of a missing weight
            module_name, _, attr = name.rpartition(".")
            owner = submodule(root, module_name)
            if module_name:
                _record_path(root, module_name, edges)
            plan.weight_refs.append((owner, attr))
        plan.edges = list(edges.values())
        plan.eps = [site.eps for site in plan.sites]
        logits, weights = plan.read_tensors()
        plan.meta = _meta(logits, weights)
        device = logits[0].device
        plan.device = device
        plan.stack_logits = all(t.dim() == 0 and t.device == device for t in logits)
        # Sharded weights (FSDP2's DTensors) take the per-weight path, which reduces each norm over its shards.
        plan.foreach_norms = all(w.device == device and not _is_dtensor(w) for w in weights)
        bound_values = [logit_bound(eps) for eps in plan.eps]
        unit_values = [float(_units(app, site)) for app, site in zip(apps, plan.sites)]
        bounds = torch.tensor(bound_values, device=device)
        plan.bounds, plan.neg_bounds = bounds, -bounds
        plan.units = torch.tensor(unit_values, device=device)
        # 0-dim tensors rather than Python floats: a Python number is wrapped into a new tensor on every
        # operation. In the dtype of the products they multiply (fp32, or the default dtype if wider: bounds
        # and K follow it), where the Python number would have been rounded the same way.
        dtype = torch.promote_types(torch.float32, bounds.dtype)
        plan.dropout_regularizer = torch.tensor(collector.scale.dropout_regularizer, dtype=dtype, device=device)
        plan.weight_regularizer = torch.tensor(collector.scale.weight_regularizer, dtype=dtype, device=device)
        weighted = [i for i, app in enumerate(apps) if app.consumer_weights]
        plan.has_weights = bool(weighted)
        if weighted:
            if len(weighted) < len(apps):
                plan.index = torch.tensor(weighted, device=device)
            owners = [k for k, i in enumerate(weighted) for _ in apps[i].consumer_weights]
            members = [names[name] for i in weighted for name in apps[i].consumer_weights]
            one_weight_each = owners == members  # one weight per weighted application, each its own
            if plan.index is not None or not one_weight_each:
                # How often each application reads each weight. A product rather than index_add/scatter_add,
                # which are nondeterministic on CUDA (and refused under torch.use_deterministic_algorithms).
                app_counts = torch.zeros(len(apps), len(names))
                for i in weighted:
                    for name in apps[i].consumer_weights:
                        app_counts[i, names[name]] += 1.0
                plan.app_counts = app_counts.to(device)
                if not one_weight_each:  # the autograd path's table: the weighted applications' rows only
                    plan.counts = app_counts[weighted].to(device)
        plan.dropout_units = plan.dropout_regularizer * plan.units
        plan.weight_regularizer_value = float(collector.scale.weight_regularizer)
        plan.two_weight_regularizer = 2.0 * plan.weight_regularizer
        # Per application, (weight index, how often it reads that weight): the count table of the host path.
        reads = [[(names[name], float(n)) for name, n in Counter(app.consumer_weights).items()] for app in apps]
        plan.host = host_regularizer.host_terms(
            logits,
            weights,
            bound_values,
            [float(collector.scale.dropout_regularizer) * k for k in unit_values],
            plan.weight_regularizer_value,
            reads,
        )
        plan.native_tree = (
            tuple(plan.edges),
            tuple(plan.sites),
            tuple(float(eps) for eps in plan.eps),
            tuple(plan.weight_refs),
        )
        return plan

    def describes(self, collector: Collector, root: nn.Module) -> bool:
        """Whether the plan still fits the collector and the module tree (identity checks only).

        Args:
            collector: the collector the plan was built for.
            root: the module passed to :meth:`Collector.regularization`.

        Returns:
            False when the applications or the scale were replaced or changed, or a module on a path to a
            site or consumer weight was replaced or removed.
        """
        if id(root) != self.root_id or collector.scale is not self.scale:
            return False
        # List equality compares identical elements by identity first: a C loop when nothing changed.
        if collector.applications != self.applications:
            return False
        for parent, name, child in self.edges:
            if (root if parent is None else parent)._modules.get(name) is not child:
                return False
        return True

    def native_call(self, collector: Collector, root: nn.Module) -> Optional[Tensor]:
        """The whole steady-state call on the C++ build of the host path, where it serves, else None.

        The C++ call (:func:`cd_convert.host_regularizer.regularize_tree`) makes :meth:`describes`' module checks,
        reads the tensors and checks what the host path needs of them (plain CPU tensors, the logits 0-dim in the
        plan's dtype, the weights float32/float64; the sites' eps unchanged) in one call: at the UCI step those
        checks in Python cost about as much as the regulariser's own forward pass. Checked here: the extension is
        on, the root, scale and applications are the plan's, and no tracer or functorch transform is active.

        Args:
            collector: the collector the plan was built for.
            root: the module passed to :meth:`Collector.regularization`.

        Returns:
            The regulariser, or None: the C++ path is off or does not apply, or something changed (the caller
            then takes the general path, which rebuilds the plan or raises its usual error).
        """
        if (
            self.host is None
            or cpu_extension._MODULE is None
            or id(root) != self.root_id
            or collector.scale is not self.scale
            or collector.applications != self.applications
            or not host_scalars.available()
        ):
            return None
        return host_regularizer.regularize_tree(self.host, root, self.native_tree)

    def read_tensors(self) -> Tuple[List[Tensor], List[Tensor]]:
        """The current p-logits (one per application) and distinct consumer weights.

        Read afresh every call: a parameter replaced in place of the old one (``load_state_dict(assign=True)``,
        a parametrisation that builds the weight on access) is seen.
        """
        logits = [_read_attribute(site, "p_logit") for site in self.sites]
        weights = [_read_attribute(owner, attr) for owner, attr in self.weight_refs]
        return logits, weights

    def fits(self, logits: Sequence[Tensor], weights: Sequence[Tensor]) -> bool:
        """Whether the tensors have the types, devices, dtypes and ranks the plan was built for (and the same eps)."""
        return _meta(logits, weights) == self.meta and [site.eps for site in self.sites] == self.eps

    def compute(self, logits: List[Tensor], weights: List[Tensor]) -> Tensor:
        """The regulariser from the current tensors: on the CPU for a few sites the host-float Function
        (:class:`cd_convert.host_regularizer.HostRegularizer`), else :class:`_Regularizer` where it applies,
        else autograd.

        Args:
            logits: from :meth:`read_tensors`.
            weights: from :meth:`read_tensors`.

        Returns:
            A 0-dim fp32 tensor.
        """
        # The analytic Functions take plain tensors on one device (a DTensor's norm is a collective: the
        # autograd path reduces it explicitly), in eager mode: compiled code fuses the autograd formula anyway,
        # so they would save nothing there. On the CPU, a few sites: the per-site arithmetic on Python floats.
        if self.host is not None and host_regularizer.serves(len(logits)) and host_scalars.available():
            return host_regularizer.regularize(self.host, logits, weights)
        if self.foreach_norms and not compiling():
            if self.stack_logits:
                return _Regularizer.apply(self, True, *logits, *weights)
            return _Regularizer.apply(self, False, self._stacked(logits), *weights)
        return self._compute_autograd(logits, weights)

    def _stacked(self, logits: List[Tensor]) -> Tensor:
        """The logits as one fp32 vector on the plan's device (one autograd node when they are 0-dim there)."""
        if self.stack_logits:
            raw = torch.stack(logits)
            return raw if raw.dtype == torch.float32 else raw.float()
        return torch.stack([t.float().reshape(()).to(self.device) for t in logits])

    def _compute_autograd(self, logits: List[Tensor], weights: List[Tensor]) -> Tensor:
        """The regulariser as a graph of aten ops, differentiated by autograd (DTensors, torch.compile).

        Args:
            logits: from :meth:`read_tensors`.
            weights: from :meth:`read_tensors`.

        Returns:
            A 0-dim fp32 tensor.
        """
        device = self.device
        raw = self._stacked(logits)
        detached = raw.detach()
        theta = raw + (detached.clamp(self.neg_bounds, self.bounds) - detached)  # straight-through clamp
        p, one_minus_p = torch.sigmoid(theta), torch.sigmoid(-theta)
        # p log p + (1 - p) log(1 - p) via log-sigmoid: finite for every clamped logit. (-theta twice, not one
        # shared negation: that would sum the two gradients in another order, changing them in the last bit.)
        neg_entropy = p * F.logsigmoid(theta) + one_minus_p * F.logsigmoid(-theta)
        total = self.dropout_regularizer * (self.units * neg_entropy).sum()
        if self.has_weights:
            squared = _squared_norms(weights, device, self.foreach_norms)
            if self.counts is not None:
                squared = self.counts @ squared
            kept = one_minus_p if self.index is None else one_minus_p[self.index]
            total = total + self.weight_regularizer * (squared / kept).sum()
        return total


class _Regularizer(torch.autograd.Function):
    """The regulariser of a :class:`_Plan` as one autograd node with an analytic backward.

    Forward computes, without recording a graph,

        sum_a  wr * S_a / (1 - p_a) + dr * K_a * (p_a log p_a + (1 - p_a) log(1 - p_a)),

    ``p = sigmoid(theta)``, ``theta`` the clamped logit and ``S_a`` the summed ``||W||^2`` of application a's
    consumer weights. Backward writes the derivatives out (the clamp straight-through):

        d/d logit_a = wr * S_a * p_a / (1 - p_a) + dr * K_a * theta_a * p_a (1 - p_a)
        d/d W       = 2 W * wr * sum over the applications a reading W of 1 / (1 - p_a)

    which costs a handful of ops however many sites, where autograd replays every forward op (and the norm
    backward of each weight). Only for plain tensors on the plan's device in eager mode: see :meth:`_Plan.compute`.
    """

    @staticmethod
    def forward(ctx: Any, plan: _Plan, separate: bool, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        """The value.

        Args:
            ctx: the autograd context.
            plan: the plan (constants: bounds, K, counts, regulariser constants).
            separate: True when ``tensors`` starts with one 0-dim logit per application; False when it starts
                with their fp32 vector on the plan's device.
            tensors: the logit(s), then the distinct consumer weights in the plan's order.

        Returns:
            A 0-dim tensor (fp32).
        """
        count = len(plan.sites) if separate else 1
        logits, weights = tensors[:count], tensors[count:]
        raw = torch.stack(logits) if separate else logits[0]
        if raw.dtype != torch.float32:
            raw = raw.float()
        theta = raw.clamp(plan.neg_bounds, plan.bounds)
        neg_theta = theta.neg()
        p, one_minus_p = torch.sigmoid(theta), torch.sigmoid(neg_theta)
        # log-sigmoid rather than log(p): finite at every clamped logit, and as accurate as the autograd path.
        neg_entropy = torch.addcmul(p * F.logsigmoid(theta), one_minus_p, F.logsigmoid(neg_theta))
        terms = plan.dropout_units * neg_entropy  # one term per application, summed once at the end
        squared: Optional[Tensor] = None
        inverse_kept: Optional[Tensor] = None
        if plan.has_weights:
            squared = _squared_norms(weights, plan.device, True)
            if plan.app_counts is not None:
                # A product and a sum rather than a matmul, which autocast would run in low precision.
                squared = (plan.app_counts * squared).sum(1)
            inverse_kept = one_minus_p.reciprocal()
            terms = torch.addcmul(terms, squared, inverse_kept, value=plan.weight_regularizer_value)
        total = terms.sum()
        ctx.plan, ctx.separate = plan, separate
        ctx.count = count
        ctx.save_for_backward(theta, p, one_minus_p, squared, inverse_kept, *weights)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        """The gradients w.r.t. the logit(s) and the weights, written out (see the class docstring).

        Args:
            ctx: the autograd context saved by :meth:`forward`.
            grad: the gradient of the loss w.r.t. the regulariser (0-dim).

        Returns:
            None for ``plan`` and ``separate``, then one gradient per tensor input.
        """
        plan: _Plan = ctx.plan
        theta, p, one_minus_p, squared, inverse_kept, *weights = ctx.saved_tensors
        # d[p log p + (1 - p) log(1 - p)]/dtheta = (log p - log(1 - p)) p (1 - p) = theta p (1 - p).
        grad_theta = plan.dropout_units * (theta * p * one_minus_p)
        weight_grads: List[Optional[Tensor]] = [None] * len(weights)
        if plan.has_weights:
            # d[1 / (1 - p)]/dtheta = p (1 - p) / (1 - p)^2 = p / (1 - p).
            grad_theta = torch.addcmul(grad_theta, squared, p * inverse_kept, value=plan.weight_regularizer_value)
            if any(ctx.needs_input_grad[2 + ctx.count :]):
                per_weight = inverse_kept
                if plan.app_counts is not None:  # sum 1/(1 - p_a) over the applications reading each weight
                    per_weight = (plan.app_counts * inverse_kept.unsqueeze(1)).sum(0)
                scale = (plan.two_weight_regularizer * grad) * per_weight
                # 0-dim factors keep each gradient in its weight's dtype; 2 W * 0 = 0 for a zero weight.
                weight_grads = list(torch._foreach_mul(list(weights), list(scale.unbind())))
        grad_theta = grad_theta * grad
        # fp32 gradients: autograd casts each to its input's dtype.
        logit_grads = grad_theta.unbind() if ctx.separate else (grad_theta,)
        return (None, None, *logit_grads, *weight_grads)


def _meta(logits: Sequence[Tensor], weights: Sequence[Tensor]) -> List[Tuple[type, torch.device, torch.dtype, int]]:
    """Type, device, dtype and rank of each tensor: what the plan's constants and fast paths depend on.

    The type is there because FSDP2 swaps a module's parameters between sharded DTensors and plain unsharded
    tensors around each forward: a plan built for one must not be used for the other.
    """
    return [(type(t), t.device, t.dtype, t.dim()) for t in logits] + [
        (type(t), t.device, t.dtype, t.dim()) for t in weights
    ]


def _is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. a parameter sharded by FSDP2's ``fully_shard``).

    Looked up in ``sys.modules`` rather than imported: no tensor is a DTensor unless that module was loaded, and
    importing it costs time (and is impossible in torch builds without distributed support).
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _full(t: Tensor) -> Tensor:
    """``t`` itself, or for a DTensor the whole tensor as a plain one (shards gathered or partial sums
    all-reduced over the ranks, differentiably)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _record_path(root: nn.Module, name: str, edges: Dict[Tuple[int, str], Any]) -> None:
    """Add each ``(parent, attribute, child)`` step from ``root`` to the module called ``name`` to ``edges``."""
    parent: Optional[nn.Module] = None
    module = root
    for part in name.split("."):
        child = module._modules.get(part)
        if child is None:  # not a registered submodule (get_submodule accepted it): never cache it
            child = getattr(module, part)
        edges.setdefault((id(parent), part), (parent, part, child))
        parent, module = child, child


def _read_attribute(owner: nn.Module, attr: str) -> Tensor:
    """``getattr(owner, attr)``, reading a registered parameter directly (Module.__getattr__ is Python code)."""
    weight = owner._parameters.get(attr)
    return weight if weight is not None else getattr(owner, attr)


def _squared_norms(weights: Sequence[Tensor], device: torch.device, same_device: Optional[bool] = None) -> Tensor:
    """``||w||^2`` of each weight in fp32 on ``device``: one fused call when all live there, else one by one.

    A sharded weight (a DTensor, as FSDP2's ``fully_shard`` leaves parameters between forward passes) gives
    the squared norm of the whole weight: each rank sums the squares of its shard and the partial sums are
    all-reduced (``full_tensor``). Its gradient on each rank is that rank's shard of ``2w``. Every rank must
    then compute the regulariser (it is a collective), as it does when it is added to each rank's loss.

    Args:
        weights: the weights.
        device: where the result lives.
        same_device: whether every weight is on ``device`` and none is a DTensor (checked here when None).

    Returns:
        A ``(len(weights),)`` fp32 tensor.
    """
    if same_device is None:
        same_device = all(w.device == device and not _is_dtensor(w) for w in weights)
    if same_device:
        try:
            # The norm's gradient w / ||w|| is defined as 0 at w = 0 (PyTorch's norm backward), so zero-initialised
            # weights get the correct gradient 2w = 0 of ||w||^2.
            return torch.stack(torch._foreach_norm(list(weights), 2, dtype=torch.float32)).square()
        except (TypeError, RuntimeError, AttributeError):  # a torch without the dtype argument
            pass
    # The sum is local (a partial sum per shard) before _full all-reduces it: only one number travels per weight.
    return torch.stack([_full(w.float().pow(2).sum()).to(device) for w in weights])


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
    try:
        owner, attr = parent_of(root, name)
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
        TypeError: if ``model`` is not a module.
        ConversionError: if the model holds concrete-dropout layers that no conversion registered (their
            ``p_logit`` would train with no prior).
        RuntimeError: if no ``dataset_size`` (or explicit constants) was given for a model with sites.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"regularization expects the converted model (a torch.nn.Module), got {type(model).__name__}. "
            "Pass the model itself, e.g. loss = loss_fn(model(x), y) + cd_convert.regularization(model)."
        )
    own = get_collector(model)
    if own is not None:  # the common case, without the generator of iter_collectors
        return own.regularization(model)
    total: Optional[Tensor] = None
    for owner, collector in iter_collectors(model):
        term = collector.regularization(owner)
        total = term if total is None else total + term.to(total.device)
    if total is None:
        # Only here (no converted module at all), so a steady-state call pays nothing for the check.
        unregistered = [name for name, m in model.named_modules() if isinstance(m, ConcreteDropoutBase)]
        if unregistered:
            shown = ", ".join(repr(n) for n in unregistered[:3]) + (" ..." if len(unregistered) > 3 else "")
            raise ConversionError(
                f"{type(model).__name__} holds {len(unregistered)} concrete-dropout layer(s) ({shown}) that no "
                "conversion registered, so their rates would train with no prior. Call "
                "model = cd_convert.convert(model, dataset_size=N) once before training: it registers the layers "
                "written in the model's code and finds their consumers."
            )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    return total


def dropout_rates(model: nn.Module) -> Dict[str, float]:
    """The drop probability of every concrete-dropout site under ``model``, ``{qualified_name: p}``.

    Sites known to a converted model's collector come first, in conversion order and under the collector's
    names; every other :class:`~cd_convert.layers.ConcreteDropoutBase` found by ``named_modules`` follows (a
    hand-written model that was never converted, a site added after conversion). Each site is listed once.

    Args:
        model: any module: a converted model, a module containing converted ones, or a hand-written model.

    Returns:
        Python floats keyed by the site's qualified name relative to ``model`` (``""`` for a bare site).

    Raises:
        RuntimeError: when a site a collector registered is no longer in the model.
    """
    rates: Dict[str, float] = {}
    seen = set()
    for owner, collector in iter_collectors(model):
        prefix = _relative_prefix(model, owner)
        for name in collector.site_names():
            site = _resolve_module(owner, name)
            rates[prefix + name] = float(site.p.detach())
            seen.add(id(site))
    for name, module in model.named_modules():
        # By identity: a shared site reached under another name than the collector's is still listed once.
        if isinstance(module, ConcreteDropoutBase) and id(module) not in seen:
            rates[name] = float(module.p.detach())
    return rates


def _relative_prefix(model: nn.Module, owner: nn.Module) -> str:
    if owner is model:
        return ""
    for name, module in model.named_modules():
        if module is owner:
            return name + "."
    return ""


def require_collector(model: Any, action: str) -> Collector:
    """The collector of a converted ``model``; a :class:`ConversionError` when it was not converted.

    Args:
        model: the model passed to a public function.
        action: what to do instead, appended to the message (e.g. ``"call cd_convert.convert(model) first."``).

    Returns:
        The collector attached to ``model`` itself.
    """
    collector = get_collector(model) if isinstance(model, nn.Module) else None
    if collector is None:
        raise _not_converted(model, action)
    return collector


def require_collectors(model: Any, action: str) -> List[Tuple[nn.Module, Collector]]:
    """Like :func:`require_collector` for wrappers too: every ``(owner, collector)`` of :func:`iter_collectors`.

    Args:
        model: the model, or a module containing converted ones (DDP, a container).
        action: what to do instead, appended to the message.

    Returns:
        At least one ``(owner, collector)``.
    """
    found = list(iter_collectors(model)) if isinstance(model, nn.Module) else []
    if not found:
        raise _not_converted(model, action)
    return found


def _not_converted(model: Any, action: str) -> ConversionError:
    return ConversionError(f"{type(model).__name__} has not been converted; {action}")
