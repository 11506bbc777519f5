"""Tests for cd_convert.collector: regularization() against the hand formula of the reference doc,
computed at call time, in fp32, on wrappers; dropout_rates; set_regularizer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import cd_convert as cd
from cd_convert import collector as cd_collector
from cd_convert import host_regularizer, host_scalars
from cd_convert.collector import COLLECTOR_ATTR, get_collector


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(6, 2),
    ).to(dtype)


def _hand(pairs, wr, dr):
    """sum over (W, p, K) of wr*||W||^2/(1-p) + dr*K*(p log p + (1-p) log(1-p)), in float64."""
    total = 0.0
    for w, p, k in pairs:
        sq = float(w.detach().double().pow(2).sum())
        total += wr * sq / (1 - p) + dr * k * (p * math.log(p) + (1 - p) * math.log(1 - p))
    return total


def test_dropout_modules_hand_formula():
    model = cd.convert(_mlp(), dataset_size=100, length_scale=0.5)
    wr, dr = 0.25 / 200, 1 / 100
    rates = cd.dropout_rates(model)
    assert set(rates) == {"2", "5"}
    expected = _hand([(model[3].weight, rates["2"], 8), (model[6].weight, rates["5"], 6)], wr, dr)
    reg = cd.regularization(model)
    assert reg.dim() == 0 and reg.dtype == torch.float32
    assert reg.item() == pytest.approx(expected, rel=1e-5)


def test_targets_linear_hand_formula():
    model = cd.convert(_mlp(), targets=[nn.Linear], dataset_size=20, loss="heteroscedastic", length_scale=0.1)
    wr, dr = 0.01 / 20, 2 / 20
    rates = cd.dropout_rates(model)
    # Linear 0 gets a site on its input; Linears 3 and 6 read dropouts 2 and 5, which they absorb (starting
    # from their own rates). Either way the layer's weight consumes the site, K = in_features
    assert rates == pytest.approx({"0.concrete_dropout": 0.1, "2": 0.2, "5": 0.3}, rel=1e-5)
    pairs = [(model[0].weight, rates["0.concrete_dropout"], 4),
             (model[3].weight, rates["2"], 8),
             (model[6].weight, rates["5"], 6)]
    assert cd.regularization(model).item() == pytest.approx(_hand(pairs, wr, dr), rel=1e-5)


def test_bias_not_part_of_w():
    model = cd.convert(_mlp(), dataset_size=100)
    before = cd.regularization(model).item()
    with torch.no_grad():
        model[3].bias.add_(10.0)
        model[6].bias.add_(10.0)
    assert cd.regularization(model).item() == before


def test_computed_at_call_time_without_forward():
    model = cd.convert(_mlp(), dataset_size=100)
    r0 = cd.regularization(model).item()
    with torch.no_grad():
        model[3].weight.mul_(2.0)
    r1 = cd.regularization(model).item()
    assert r1 != r0
    rates = cd.dropout_rates(model)
    assert r1 == pytest.approx(_hand([(model[3].weight, rates["2"], 8), (model[6].weight, rates["5"], 6)],
                                     1e-4 / 200, 1 / 100), rel=1e-5)
    with torch.no_grad():
        model[2].p_logit.fill_(0.0)  # p = 0.5
    r2 = cd.regularization(model).item()
    assert r2 != r1
    assert cd.dropout_rates(model)["2"] == pytest.approx(0.5)
    assert r2 == pytest.approx(_hand([(model[3].weight, 0.5, 8), (model[6].weight, rates["5"], 6)],
                                     1e-4 / 200, 1 / 100), rel=1e-5)


def test_gradient_reaches_p_logits_and_consumer_weights():
    model = cd.convert(_mlp(), dataset_size=100)
    cd.regularization(model).backward()
    assert model[2].p_logit.grad is not None and model[2].p_logit.grad.item() != 0
    assert model[5].p_logit.grad is not None
    assert model[3].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert model[0].weight.grad is None  # not a consumer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_fp32_for_other_dtypes(dtype):
    model = cd.convert(_mlp(dtype), dataset_size=100)
    assert model[2].p_logit.dtype == dtype
    reg = cd.regularization(model)
    assert reg.dtype == torch.float32 and torch.isfinite(reg)
    rates = cd.dropout_rates(model)
    expected = _hand([(model[3].weight, rates["2"], 8), (model[6].weight, rates["5"], 6)], 1e-4 / 200, 1 / 100)
    assert reg.item() == pytest.approx(expected, rel=1e-2 if dtype != torch.float64 else 1e-5)


def test_zero_when_no_collector():
    reg = cd.regularization(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert reg.dtype == torch.float32 and reg.dim() == 0 and reg.item() == 0.0
    reg64 = cd.regularization(nn.Linear(3, 3).double())
    assert reg64.dtype == torch.float32 and reg64.item() == 0.0
    assert cd.regularization(nn.ReLU()).item() == 0.0  # no parameters at all


def test_zero_when_collector_has_no_sites():
    model = cd.convert(_mlp(), dataset_size=10)
    get_collector(model).applications.clear()
    reg = cd.regularization(model)
    assert reg.dtype == torch.float32 and reg.item() == 0.0


def test_missing_dataset_size_raises():
    model = cd.convert(_mlp())
    with pytest.raises(RuntimeError, match="dataset_size"):
        cd.regularization(model)


def test_set_regularizer_changes_value():
    model = cd.convert(_mlp())
    cd.set_regularizer(model, dataset_size=100)
    r100 = cd.regularization(model).item()
    cd.set_regularizer(model, dataset_size=10)
    r10 = cd.regularization(model).item()
    assert r10 == pytest.approx(10 * r100, rel=1e-5)  # both terms scale as 1/N
    cd.set_regularizer(model, weight_regularizer=0.0, dropout_regularizer=1.0)
    rates = cd.dropout_rates(model)
    assert cd.regularization(model).item() == pytest.approx(
        _hand([(model[3].weight, rates["2"], 8), (model[6].weight, rates["5"], 6)], 0.0, 1.0), rel=1e-5)
    with pytest.raises(ValueError, match="needs dataset_size"):
        cd.set_regularizer(model)
    with pytest.raises(ValueError, match="dataset_size must be a positive"):
        cd.set_regularizer(model, dataset_size=-3)


def test_set_regularizer_on_unconverted_model_refused():
    with pytest.raises(cd.ConversionError, match="has not been converted"):
        cd.set_regularizer(_mlp(), dataset_size=10)


def test_dropout_rates_floats_keyed_by_site_name():
    model = cd.convert(_mlp(), dataset_size=100)
    rates = cd.dropout_rates(model)
    assert rates == pytest.approx({"2": 0.2, "5": 0.3}, rel=1e-5)
    assert all(type(v) is float for v in rates.values())
    with torch.no_grad():
        model[5].p_logit.fill_(0.0)
    assert cd.dropout_rates(model)["5"] == 0.5
    assert cd.dropout_rates(nn.Linear(2, 2)) == {}


def test_wrapper_equals_converted_model():
    model = cd.convert(_mlp(), dataset_size=100)
    wrapper = nn.Sequential(model)
    assert torch.equal(cd.regularization(wrapper), cd.regularization(model))
    assert cd.dropout_rates(wrapper) == {"0." + k: v for k, v in cd.dropout_rates(model).items()}
    # two converted models inside one container: the sum
    other = cd.convert(_mlp(), targets=[nn.Linear], dataset_size=50)
    both = nn.ModuleDict({"a": model, "b": other})
    assert cd.regularization(both).item() == pytest.approx(
        cd.regularization(model).item() + cd.regularization(other).item(), rel=1e-6)
    cd.set_regularizer(both, dataset_size=1000)
    assert get_collector(model).scale.dropout_regularizer == pytest.approx(1e-3)
    assert get_collector(other).scale.dropout_regularizer == pytest.approx(1e-3)


def test_collector_is_not_a_submodule_and_adds_no_state():
    model = cd.convert(_mlp(), dataset_size=100)
    assert COLLECTOR_ATTR in model.__dict__
    assert all(not k.startswith(COLLECTOR_ATTR) for k in model.state_dict())
    assert all(not n.startswith(COLLECTOR_ATTR) for n, _ in model.named_modules())


class _Tied(nn.Module):
    """Two Linear layers sharing one weight, each behind its own dropout."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 5)
        self.d1 = nn.Dropout(0.2)
        self.a = nn.Linear(5, 5)
        self.d2 = nn.Dropout(0.4)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.d2(torch.relu(self.a(self.d1(torch.relu(self.inp(x)))))))


def test_weight_tying_observed_behaviour():
    torch.manual_seed(1)
    model = cd.convert(_Tied(), dataset_size=100)
    rates = cd.dropout_rates(model)
    assert set(rates) == {"d1", "d2"}
    apps = get_collector(model).applications
    # Observed: each site gets its own application naming the consumer by its own path ("a.weight" for
    # d1, "b.weight" for d2; both resolve to the same tied tensor), so ||W||^2 of the shared weight is
    # counted once per site, each divided by its own (1 - p) -- the paper's per-layer KL with each use of
    # the weight treated as its own layer (the shared W is pulled twice as hard as an untied one).
    by_site = {a.site: a for a in apps}
    assert by_site["d1"].consumer_weights == ("a.weight",)
    assert by_site["d2"].consumer_weights == ("b.weight",)
    assert model.b.weight is model.a.weight
    w = model.a.weight
    expected = _hand([(w, rates["d1"], 5), (w, rates["d2"], 5)], 1e-4 / 200, 1 / 100)
    assert cd.regularization(model).item() == pytest.approx(expected, rel=1e-5)


def test_gradient_of_the_weight_term_is_2w_over_1_minus_p_even_for_zero_weights():
    model = cd.convert(_mlp(), dataset_size=100)
    with torch.no_grad():
        model[6].weight.zero_()  # zero-initialised heads are common (timm's head_init_scale, adapters)
    wr = 1e-4 / 200
    cd.regularization(model).backward()
    rates = cd.dropout_rates(model)
    assert torch.equal(model[6].weight.grad, torch.zeros_like(model[6].weight))
    torch.testing.assert_close(model[3].weight.grad, 2 * wr * model[3].weight.detach() / (1 - rates["2"]),
                               rtol=1e-5, atol=0)


class _QKV(nn.Module):
    """One site read by three projections (several consumer weights for one application)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.q, self.k, self.v = nn.Linear(5, 3), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = self.drop(x)
        return self.q(h) + self.k(h) * self.v(h)


def test_several_consumer_weights_are_summed_per_site_and_fallback_agrees(monkeypatch):
    torch.manual_seed(1)
    model = cd.convert(_QKV(), dataset_size=50)
    p = cd.dropout_rates(model)["drop"]
    squared = sum(float(m.weight.detach().double().pow(2).sum()) for m in (model.q, model.k, model.v))
    expected = 1e-4 / 100 * squared / (1 - p) + 1 / 50 * 5 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert cd.regularization(model).item() == pytest.approx(expected, rel=1e-5)

    # The tensor form's one-by-one path (weights on another device, or a torch whose _foreach_norm lacks
    # dtype=) agrees.
    def unavailable(*args, **kwargs):
        raise TypeError("_foreach_norm() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(host_regularizer, "MAX_SITES", 0)
    get_collector(model).invalidate()
    monkeypatch.setattr(torch, "_foreach_norm", unavailable)
    assert cd.regularization(model).item() == pytest.approx(expected, rel=1e-5)


class _Shared(nn.Module):
    """d0: no consumer (K = 5, the dropped dim); d1: read by q and k; d2, d3: both read by ``head``."""

    def __init__(self):
        super().__init__()
        self.fc0, self.d0 = nn.Linear(5, 5), nn.Dropout(0.1)
        self.d1, self.q, self.k = nn.Dropout(0.1), nn.Linear(5, 4), nn.Linear(5, 4)
        self.d2, self.d3, self.head = nn.Dropout(0.1), nn.Dropout(0.1), nn.Linear(4, 3)

    def forward(self, x):
        g = self.d1(x + self.d0(self.fc0(x)))
        return self.head(self.d2(self.q(g))) + self.head(self.d3(self.k(g)))


#: (site, its consumer weights, K, p), written from the architecture of _Shared.
SHARED_SPEC = [
    ("d0", (), 5, 0.45),
    ("d1", ("q.weight", "k.weight"), 5, 0.08),
    ("d2", ("head.weight",), 4, 0.3),
    ("d3", ("head.weight",), 4, 0.7),
]


def _shared_model(dtype, logit_shape=()):
    torch.manual_seed(0)
    model = cd.convert(_Shared().to(dtype), weight_regularizer=0.05, dropout_regularizer=0.02)
    for site, _, _, p in SHARED_SPEC:
        logit = torch.full(logit_shape, math.log(p / (1 - p)), dtype=dtype)
        model.get_submodule(site).p_logit = nn.Parameter(logit)
    model(torch.randn(2, 5, dtype=dtype))  # d0's K is seen in the first forward
    return model


def _take_path(path, monkeypatch):
    """Make the next plan take ``path``: ``"host"`` (Python floats, the CPU default for a few fp32/fp64 sites),
    ``"analytic"`` (the tensor Function) or ``"autograd"`` (the graph DTensors and torch.compile take, forced
    by reporting a compile in progress)."""
    if path != "host":
        monkeypatch.setattr(host_regularizer, "MAX_SITES", 0)
    if path == "autograd":
        monkeypatch.setattr(cd_collector, "compiling", lambda: True)


def _node(reg):
    return type(reg.grad_fn).__name__


@pytest.mark.parametrize("path", ["host", "analytic", "autograd"])
@pytest.mark.parametrize(
    "dtype, logit_shape, rel",
    [(torch.float32, (), 1e-5), (torch.float64, (), 1e-5), (torch.bfloat16, (), 2e-2), (torch.float32, (1,), 1e-5)],
    ids=["fp32", "fp64", "bf16", "logits-of-shape-1"],
)
def test_value_and_gradients_of_every_logit_and_weight_are_the_written_out_formulas(
    dtype, logit_shape, rel, path, monkeypatch
):
    """d/dW = 2 W wr * sum over the sites reading W of 1/(1 - p); d/dlogit = wr S p/(1-p) + dr K theta p (1-p).

    Every weight-sharing case at once (no consumer, two weights for one site, one weight for two sites), in
    each parameter dtype (the gradient keeps it) and with 1-element logits (the stacked, non-0-dim path). Both
    ways of computing it: the analytic autograd Function (eager, plain tensors) and the autograd graph that
    DTensors and torch.compile take (forced here by reporting a compile in progress); and on the CPU, the
    per-site arithmetic on Python floats, which 16-bit parameters and logits of shape (1,) leave to the
    analytic Function.
    """
    wr, dr = 0.05, 0.02
    model = _shared_model(dtype, logit_shape)
    _take_path(path, monkeypatch)
    reg = cd.regularization(model)
    host_applies = dtype in (torch.float32, torch.float64) and logit_shape == ()
    expected_node = {
        "host": "HostRegularizerBackward" if host_applies else "_RegularizerBackward",
        "analytic": "_RegularizerBackward",
    }
    assert _node(reg) == expected_node.get(path, _node(reg)) and (path != "autograd" or "Regularizer" not in _node(reg))
    (reg * 3.0).backward()  # an upstream gradient of 3 scales every gradient
    value, pulls = 0.0, {}  # pulls: weight name -> sum over the sites reading it of 1/(1 - p)
    for site, weights, k, _ in SHARED_SPEC:
        logit = float(model.get_submodule(site).p_logit.detach().double().reshape(()))
        p = 1 / (1 + math.exp(-logit))
        squared = sum(float(model.get_parameter(w).detach().double().pow(2).sum()) for w in weights)
        value += wr * squared / (1 - p) + dr * k * (p * math.log(p) + (1 - p) * math.log(1 - p))
        expected = 3.0 * (wr * squared * p / (1 - p) + dr * k * logit * p * (1 - p))
        grad = model.get_submodule(site).p_logit.grad
        assert grad.dtype == dtype and grad.shape == logit_shape, site
        assert float(grad.double().reshape(())) == pytest.approx(expected, rel=rel), site
        for w in weights:
            pulls[w] = pulls.get(w, 0.0) + 1 / (1 - p)
    assert reg.dtype == torch.float32 and reg.item() == pytest.approx(value, rel=rel)
    assert set(pulls) == {"q.weight", "k.weight", "head.weight"}
    for name, pull in pulls.items():
        weight = model.get_parameter(name)
        assert weight.grad.dtype == dtype, name
        expected = 3.0 * 2 * wr * pull * weight.detach().double()
        torch.testing.assert_close(weight.grad.double(), expected, rtol=rel, atol=0, msg=name)
    # Not consumers: no gradient from the regulariser.
    assert model.fc0.weight.grad is None and model.head.bias.grad is None


@pytest.mark.parametrize("path", ["host", "analytic", "autograd"])
@pytest.mark.parametrize("logit", [20.0, -20.0], ids=["above", "below"])
def test_logit_past_the_bound_gradient_passes_straight_through(logit, path, monkeypatch):
    """p is taken at the bound theta = +-logit(1 - eps), and the gradient is the formula's there (not 0)."""
    wr, dr = 0.05, 0.02
    model = _shared_model(torch.float32)
    with torch.no_grad():
        model.d2.p_logit.fill_(logit)
    _take_path(path, monkeypatch)
    cd.regularization(model).backward()
    theta = math.copysign(math.log((1 - 1e-6) / 1e-6), logit)  # the sites' default eps = 1e-6, written out
    p = 1 / (1 + math.exp(-theta))
    squared = float(model.head.weight.detach().double().pow(2).sum())
    expected = wr * squared * p / (1 - p) + dr * 4 * theta * p * (1 - p)
    # A blocked clamp gives exactly 0. The autograd graph differentiates 1/(1 - p) through sigmoid(-theta),
    # whose backward forms 1 - (1 - p) in fp32 (a few % off in that term at p = 1e-6): a looser tolerance.
    rel = 1e-2 if path == "autograd" else 1e-4
    assert model.d2.p_logit.grad.item() == pytest.approx(expected, rel=rel)


def test_host_path_is_taken_for_a_few_plain_cpu_sites_and_switched_off_per_call(monkeypatch):
    """Up to MAX_SITES applications on plain fp32/fp64 CPU tensors; the switch is honoured by a built plan."""
    model = _shared_model(torch.float32)
    assert _node(cd.regularization(model)) == "HostRegularizerBackward"
    expected = cd.regularization(model).item()
    monkeypatch.setattr(host_scalars, "ENABLED", False)
    reg = cd.regularization(model)
    assert _node(reg) == "_RegularizerBackward" and reg.item() == pytest.approx(expected, rel=1e-6)
    monkeypatch.setattr(host_scalars, "ENABLED", True)
    monkeypatch.setattr(host_regularizer, "MAX_SITES", len(SHARED_SPEC) - 1)  # one site too many
    get_collector(model).invalidate()
    assert _node(cd.regularization(model)) == "_RegularizerBackward"


@pytest.mark.parametrize("path", ["host", "analytic"])
def test_held_rates_get_no_gradient_and_the_weights_the_formula(path, monkeypatch):
    """p-logits that do not require grad (rates held, as concrete_freeze leaves them) get none; weights do."""
    wr = 0.05
    model = _shared_model(torch.float64)
    for site, *_ in SHARED_SPEC:
        model.get_submodule(site).p_logit.requires_grad_(False)
    _take_path(path, monkeypatch)
    cd.regularization(model).backward()
    for site, *_ in SHARED_SPEC:
        assert model.get_submodule(site).p_logit.grad is None, site
    p = {site: rate for site, _, _, rate in SHARED_SPEC}
    pull = 1 / (1 - p["d2"]) + 1 / (1 - p["d3"])  # head.weight is read by d2 and d3
    expected = 2 * wr * pull * model.head.weight.detach()
    # The host path works in float64 throughout; the analytic Function in fp32, cast to the weight's dtype.
    rtol = 1e-12 if path == "host" else 1e-6
    torch.testing.assert_close(model.head.weight.grad, expected, rtol=rtol, atol=0)


def test_log_sigmoid_is_finite_and_accurate_at_both_ends():
    """The host path's log-sigmoid against math written out: no overflow at +-800, no cancellation near 0."""
    for v in (-800.0, -30.0, -1.0, 0.0, 1e-9, 2.5, 40.0, 800.0):
        expected = -math.log1p(math.exp(-v)) if v > -700 else v  # log(1 / (1 + e^-v)); -> v as v -> -inf
        assert host_regularizer.log_sigmoid(v) == pytest.approx(expected, rel=1e-15, abs=1e-300), v
    assert host_regularizer.log_sigmoid(40.0) == pytest.approx(-math.exp(-40.0), rel=1e-12)  # not rounded to 0


def test_value_and_gradients_under_autocast_stay_fp32():
    """Called inside an autocast region (as a loss often is), the regulariser is still computed in fp32."""
    model = _shared_model(torch.float32)
    expected = cd.regularization(model).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reg = cd.regularization(model)
    reg.backward()
    assert reg.dtype == torch.float32 and reg.item() == expected
    assert model.head.weight.grad.dtype == torch.float32


def test_regularization_refuses_unregistered_layers_and_non_modules():
    """Layers written in the model's code but never registered would train p with no prior: an error."""
    from cd_convert.errors import ConversionError
    from cd_convert.layers import ConcreteDropout

    model = nn.Sequential(nn.Linear(4, 4), ConcreteDropout(0.2), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match=r"1 concrete-dropout layer\(s\) \('1'\).*cd_convert.convert"):
        cd.regularization(model)
    with pytest.raises(TypeError, match="converted model"):
        cd.regularization(model(torch.randn(2, 4)))
    # A model with no dropout at all still gives an exact zero (nothing to regularise).
    plain = nn.Sequential(nn.Linear(4, 2))
    assert cd.regularization(plain).item() == 0.0
    converted = cd.convert(model, dataset_size=10)
    assert torch.isfinite(cd.regularization(converted))
