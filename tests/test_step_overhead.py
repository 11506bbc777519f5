"""Per-step overhead of the regulariser, tested by what can fail rather than by time: a steady-state
``regularization()`` call dispatches a bounded number of aten ops, builds no tensor from Python data and looks
up no module by name; its cached plan is rebuilt (and the value right) after every change that matters."""

from __future__ import annotations

import collections
import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import cd_convert as cd
from cd_convert import host_regularizer
from cd_convert.collector import _PLAN_ATTR, get_collector
from cd_convert.layers import ConcreteDropout

#: Forward aten ops of one steady-state call: a constant, whatever the number of sites (measured on torch 2.14:
#: 16; before the analytic regulariser, 26 + 1 per site).
FORWARD_BASE, FORWARD_PER_SITE = 20, 0
#: Backward aten ops (measured: 12 + 2 per site, the 2 being the accumulation into each site's p_logit.grad and
#: weight.grad; before the analytic backward, 30 + 9 per site, mostly each consumer weight's norm backward).
BACKWARD_BASE, BACKWARD_PER_SITE = 18, 2


class _Ops(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _uci(dataset_size: int = 500) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 50), nn.ReLU(), nn.Linear(50, 1))
    return cd.convert(model, targets=[nn.Linear], dataset_size=dataset_size)


def _deep(sites: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(sites):
        layers += [nn.Linear(6, 6)] + ([nn.ReLU()] if i + 1 < sites else [])
    return cd.convert(nn.Sequential(*layers), targets=[nn.Linear], dataset_size=100)


def _hand(model: nn.Module, wr: float, dr: float) -> float:
    """sum over sites of wr*||W||^2/(1-p) + dr*K*(p log p + (1-p) log(1-p)) in float64 (site on a Linear's input)."""
    total = 0.0
    for name, p in cd.dropout_rates(model).items():
        layer = model.get_submodule(name.rpartition(".")[0])
        sq = float(layer.weight.detach().double().pow(2).sum())
        k = layer.in_features
        total += wr * sq / (1 - p) + dr * k * (p * math.log(p) + (1 - p) * math.log(1 - p))
    return total


def _fresh(model: nn.Module) -> torch.Tensor:
    """The regulariser computed with a newly built plan (the reference for a cached one)."""
    collector = get_collector(model)
    collector.invalidate()
    return cd.regularization(model)


def _plan(model: nn.Module):
    return get_collector(model).__dict__.get(_PLAN_ATTR)


# ------------------------------------------------------------------------------------------ steady-state cost


@pytest.fixture
def tensor_form(monkeypatch):
    """The regulariser's tensor form: what runs off the CPU (where reading a number would wait for the device),
    and on the CPU beyond ``host_regularizer.MAX_SITES`` applications or with the host paths off."""
    monkeypatch.setattr(host_regularizer, "MAX_SITES", 0)


def _steady_counts(model: nn.Module):
    cd.regularization(model).backward()  # builds the plan
    with _Ops() as forward:
        reg = cd.regularization(model)
    with _Ops() as backward:
        reg.backward()
    return forward, backward


@pytest.mark.parametrize("sites", [2, 50])
def test_steady_state_call_dispatches_a_bounded_number_of_aten_ops(sites, tensor_form):
    model = _uci() if sites == 2 else _deep(sites)
    assert len(cd.dropout_rates(model)) == sites
    forward, backward = _steady_counts(model)
    assert forward.total <= FORWARD_BASE + FORWARD_PER_SITE * sites, forward.counts
    assert backward.total <= BACKWARD_BASE + BACKWARD_PER_SITE * sites, backward.counts


def test_op_count_grows_only_by_the_gradient_accumulation_per_site(tensor_form):
    small, small_backward = _steady_counts(_deep(2))
    large, large_backward = _steady_counts(_deep(40))
    assert large.total - small.total <= FORWARD_PER_SITE * 38, (small.counts, large.counts)
    # Backward: one add_ into .grad per parameter (a p_logit and a weight per site); the derivatives themselves
    # are a fixed handful of vector ops, not a replay of the forward per site.
    assert large_backward.total - small_backward.total <= 2 * 38, (small_backward.counts, large_backward.counts)
    assert large_backward.counts["add_"] - small_backward.counts["add_"] == 2 * 38
    # What grows with the sites is bookkeeping (one detach per logit in the dispatch trace), not arithmetic.
    for name in ("sigmoid", "log_sigmoid_forward", "clamp", "_foreach_norm", "stack", "sum"):
        assert large.counts[name] == small.counts[name], name


def test_steady_state_call_makes_no_tensor_from_python_data_no_item_no_name_lookup(monkeypatch, tensor_form):
    model = _uci()
    expected = cd.regularization(model).detach().clone()

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} called in a steady-state regularization() call")

        return fail

    monkeypatch.setattr(torch, "tensor", refuse("torch.tensor"))
    monkeypatch.setattr(torch, "as_tensor", refuse("torch.as_tensor"))
    monkeypatch.setattr(torch.Tensor, "item", refuse("Tensor.item"))
    monkeypatch.setattr(torch.Tensor, "tolist", refuse("Tensor.tolist"))
    monkeypatch.setattr(nn.Module, "get_submodule", refuse("get_submodule"))
    with _Ops() as ops:
        reg = cd.regularization(model)
        reg.backward()
    assert torch.equal(reg.detach(), expected)
    # No CPU scalar list lifted into a tensor, no copy to another dtype/device, no host sync.
    for op in ("lift_fresh", "lift_fresh_copy", "_to_copy", "_local_scalar_dense", "index"):
        assert ops.counts[op] == 0, (op, ops.counts)


@pytest.mark.parametrize("sites", [2, 12])
def test_host_path_dispatches_two_ops_forward_and_four_backward_beside_reads_and_accumulation(sites):
    """On the CPU, up to MAX_SITES sites: one fused norm call and the result forward; the upstream gradient's
    read, one tensor of the logits' gradients (unbound) and one fused product for the weights' backward."""
    assert sites <= host_regularizer.MAX_SITES
    model = _uci() if sites == 2 else _deep(sites)
    forward, backward = _steady_counts(model)
    # One read per logit and per consumer weight's norm (memory reads on the CPU).
    assert dict(forward.counts) == {"_foreach_norm": 1, "_local_scalar_dense": 2 * sites, "full": 1}
    assert backward.counts["add_"] == 2 * sites  # accumulation into each p_logit.grad and weight.grad
    rest = {op: n for op, n in backward.counts.items() if op != "add_"}
    assert rest == {"ones_like": 1, "_local_scalar_dense": 1, "lift_fresh": 1, "unbind": 1, "_foreach_mul": 1}
    n = 500 if sites == 2 else 100  # the dataset sizes _uci and _deep convert with
    assert cd.regularization(model).item() == pytest.approx(_hand(model, 1e-4 / (2 * n), 1 / n), rel=1e-6)


def test_host_path_never_serves_tensors_off_the_cpu_or_16_bit_or_beyond_its_limit():
    """Where a read would wait for a device, or the tensors are not plain fp32/fp64 0-dim logits: the tensor form."""
    logits = [torch.zeros((), requires_grad=True) for _ in range(2)]
    weights = [torch.ones(3, 3, requires_grad=True)]
    args = ([1.0, 1.0], [0.1, 0.1], 0.01, [[(0, 1.0)], []])
    assert host_regularizer.host_terms(logits, weights, *args) is not None
    meta = [torch.zeros((), device="meta") for _ in range(2)]
    assert host_regularizer.host_terms(meta, weights, *args) is None
    assert host_regularizer.host_terms(logits, [torch.ones(3, 3, device="meta")], *args) is None
    assert host_regularizer.host_terms(logits, [torch.ones(3, 3, dtype=torch.bfloat16)], *args) is None
    assert host_regularizer.host_terms([t.reshape(1) for t in logits], weights, *args) is None
    mixed = [logits[0], torch.zeros((), dtype=torch.float64)]
    assert host_regularizer.host_terms(mixed, weights, *args) is None
    many = [torch.zeros(()) for _ in range(host_regularizer.MAX_SITES + 1)]
    count = len(many)
    # Built for any count; beyond MAX_SITES only the C++ build (off here) serves them.
    assert host_regularizer.host_terms(many, weights, [1.0] * count, [0.1] * count, 0.01, [[]] * count) is not None
    assert host_regularizer.serves(count - 1) and not host_regularizer.serves(count)


def test_plan_is_reused_while_nothing_changes_and_value_tracks_parameters(host_path):
    model = _uci()
    first = cd.regularization(model)
    plan = _plan(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[2].concrete_dropout.p_logit.add_(0.5)
    second = cd.regularization(model)
    assert _plan(model) is plan
    assert not torch.equal(first, second)
    assert second.item() == pytest.approx(_hand(model, 1e-4 / 1000, 1 / 500), rel=1e-5)
    assert torch.equal(second, _fresh(model))


# ------------------------------------------------------------------------------------------ invalidation


def test_after_convert_adds_sites_the_value_includes_them(host_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 50), nn.ReLU(), nn.Dropout(0.2), nn.Linear(50, 1))
    model = cd.convert(base, dataset_size=500)  # one site: the Dropout module
    one_site = cd.regularization(model)
    assert len(cd.dropout_rates(model)) == 1
    model = cd.convert(model, targets=[nn.Linear], dataset_size=500, inplace=True)
    assert len(cd.dropout_rates(model)) > 1
    more = cd.regularization(model)
    assert not torch.equal(one_site, more)
    assert torch.equal(more, _fresh(model))


def test_after_moving_to_float64_the_plan_is_rebuilt_and_the_value_right(host_path):
    model = _uci()
    cd.regularization(model)
    plan = _plan(model)
    model = model.to(torch.float64)  # parameters keep their identity: only the fingerprint sees the change
    assert model[0].concrete_dropout.p_logit.dtype == torch.float64
    reg = cd.regularization(model)
    assert _plan(model) is not plan
    assert reg.dtype == torch.float32
    assert torch.equal(reg, _fresh(model))
    assert reg.item() == pytest.approx(_hand(model, 1e-4 / 1000, 1 / 500), rel=1e-5)
    reg.backward()
    assert model[0].weight.grad.dtype == torch.float64


def test_after_set_regularizer_the_new_constants_are_used(host_path):
    model = _uci()
    before = cd.regularization(model)
    cd.set_regularizer(model, dataset_size=50, length_scale=0.1)
    after = cd.regularization(model)
    assert after.item() == pytest.approx(_hand(model, 0.01 / 100, 1 / 50), rel=1e-5)
    assert not torch.equal(before, after)


def test_after_a_site_module_is_replaced_its_new_logit_is_read(host_path):
    model = _uci()
    cd.regularization(model)
    new_site = ConcreteDropout(0.5)
    model[2].concrete_dropout = new_site
    reg = cd.regularization(model)
    assert cd.dropout_rates(model)["2.concrete_dropout"] == pytest.approx(0.5)
    assert reg.item() == pytest.approx(_hand(model, 1e-4 / 1000, 1 / 500), rel=1e-5)
    reg.backward()
    assert new_site.p_logit.grad is not None


def test_after_eps_changes_the_new_bound_is_used(host_path):
    model = _uci()
    site = model[0].concrete_dropout
    with torch.no_grad():
        site.p_logit.fill_(-20.0)  # beyond the bound: p is the bound itself
    cd.regularization(model)
    site.eps = 1e-2
    reg = cd.regularization(model)
    assert cd.dropout_rates(model)["0.concrete_dropout"] == pytest.approx(1e-2)
    assert reg.item() == pytest.approx(_hand(model, 1e-4 / 1000, 1 / 500), rel=1e-5)


def test_copies_and_pickles_rebuild_the_plan_for_their_own_parameters(host_path):
    model = _uci()
    cd.regularization(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _plan(twin) is None
        reg = cd.regularization(twin)
        assert torch.equal(reg, cd.regularization(model))
        reg.backward()
        assert twin[0].weight.grad is not None and twin[0].concrete_dropout.p_logit.grad is not None
        assert model[0].weight.grad is None and model[0].concrete_dropout.p_logit.grad is None
