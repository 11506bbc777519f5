"""The regulariser's value and its gradient w.r.t. every ``p_logit``, against hand computations (issue 15).

Per site (README, "The regulariser"; docs/concrete-dropout.md):

    wr * ||W||^2 / (1 - p) + dr * K * (p log p + (1 - p) log(1 - p))

with W the consuming layer's weight (summed over the weights when several layers read the site; a weight read
by several sites counted once per site), K its input features or input *channels* for a conv, and for a site
without consumer K the size of the dropped feature dim (last dim element-wise, channel dim channel-wise). p
is ``sigmoid(clamp(p_logit, -b, b))`` with ``b = logit(1 - eps)``, the clamp straight-through. Every
expectation below is written out in float64 from that statement alone: K is read off the architecture, p
off the logit the test wrote, ||W||^2 off the stored weights.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn as nn

import cd_convert as cd
from cd_convert.collector import get_collector

#: The sites' default bound on p, and the logit bound it implies (written out, not imported).
EPS = 1e-6
BOUND = math.log((1 - EPS) / EPS)

#: (site name, consumer weight names, K), written from the architecture by hand.
Spec = List[Tuple[str, Tuple[str, ...], int]]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _set_rates(model: nn.Module, rates: Dict[str, float]) -> None:
    """Write ``p_logit = logit(p)`` into each named site, so that every site has its own rate."""
    with torch.no_grad():
        for name, p in rates.items():
            model.get_submodule(name).p_logit.fill_(_logit(p))


def _stored_logit(model: nn.Module, site: str) -> float:
    """The logit as stored (after rounding to the parameter's dtype), in float64."""
    return float(model.get_submodule(site).p_logit.detach().double())


def _squared_norm(model: nn.Module, weights: Sequence[str]) -> float:
    """sum of ||W||^2 over the named weights, in float64 from the stored values."""
    return sum(float(model.get_parameter(w).detach().double().pow(2).sum()) for w in weights)


def _site_term(squared: float, logit: float, k: int, wr: float, dr: float) -> float:
    """wr * ||W||^2 / (1 - p) + dr * K * (p log p + (1 - p) log(1 - p)) with p = sigmoid(clamped logit)."""
    theta = min(max(logit, -BOUND), BOUND)
    p = 1.0 / (1.0 + math.exp(-theta))
    return wr * squared / (1.0 - p) + dr * k * (p * math.log(p) + (1.0 - p) * math.log1p(-p))


def _site_grad(squared: float, logit: float, k: int, wr: float, dr: float) -> float:
    """d(site term)/d(p_logit), the clamp straight-through.

    dp/dtheta = p (1 - p), so d[1/(1-p)]/dtheta = p / (1 - p) and d[p log p + (1-p) log(1-p)]/dtheta =
    (log p - log(1 - p)) p (1 - p) = theta p (1 - p).
    """
    theta = min(max(logit, -BOUND), BOUND)
    p = 1.0 / (1.0 + math.exp(-theta))
    return wr * squared * p / (1.0 - p) + dr * k * theta * p * (1.0 - p)


def _hand(model: nn.Module, spec: Spec, wr: float, dr: float) -> Tuple[float, Dict[str, float]]:
    """The hand value and the hand gradient w.r.t. each site's p_logit."""
    total, grads = 0.0, {}
    for site, weights, k in spec:
        squared, logit = _squared_norm(model, weights), _stored_logit(model, site)
        total += _site_term(squared, logit, k, wr, dr)
        grads[site] = _site_grad(squared, logit, k, wr, dr)
    return total, grads


def _check(model: nn.Module, spec: Spec, wr: float, dr: float, rel: float = 1e-5, grad_rel: float = 1e-4) -> None:
    """regularization(model) and each p_logit's gradient equal the hand values of ``spec``."""
    expected, expected_grads = _hand(model, spec, wr, dr)
    model.zero_grad(set_to_none=True)
    reg = cd.regularization(model)
    assert reg.item() == pytest.approx(expected, rel=rel)
    reg.backward()
    for site, grad in expected_grads.items():
        assert model.get_submodule(site).p_logit.grad.item() == pytest.approx(grad, rel=grad_rel), site


def _sites(model: nn.Module) -> List[str]:
    return [app.site for app in get_collector(model).applications]


# ---------------------------------------------------------------------------------------------------------
# Conv consumers: K is the consumer's *input* channels (in != out here, so out_channels would show).


def test_conv_consumers_k_is_in_channels_elementwise_and_channelwise():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Dropout2d(0.2),  # channel-wise site read by Conv2d(3 -> 7): K = 3
        nn.Conv2d(3, 7, 3),
        nn.Dropout(0.3),  # element-wise site read by Conv2d(7 -> 4): K = 7
        nn.Conv2d(7, 4, 1),
    )
    wr, dr = 1e-3, 0.05
    model = cd.convert(net, weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == ["1", "3"]
    _set_rates(model, {"1": 0.15, "3": 0.4})
    _check(model, [("1", ("2.weight",), 3), ("3", ("4.weight",), 7)], wr, dr)


def test_targeted_conv_site_k_is_in_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 7, 3), nn.ReLU(), nn.Conv2d(7, 2, 1))
    wr, dr = 1e-3, 0.05
    model = cd.convert(net, targets=[nn.Conv2d], weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == ["0.concrete_dropout", "2.concrete_dropout"]
    _set_rates(model, {"0.concrete_dropout": 0.25, "2.concrete_dropout": 0.06})
    _check(model, [("0.concrete_dropout", ("0.weight",), 3), ("2.concrete_dropout", ("2.weight",), 7)], wr, dr)


class _ChannelsThenDense(nn.Module):
    """Dropout2d -> flatten (written with a shape read) -> Linear, as in the paper's spatial MNIST CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.drop_channels = nn.Dropout2d(0.2)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.drop_units = nn.Dropout(0.3)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop_channels(torch.relu(self.conv(x)))
        h = torch.relu(self.fc(h.view(h.size(0), -1)))
        h = self.drop_units(h)
        return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("with_dry_run", [False, True])
def test_channelwise_site_read_through_flatten_counts_its_channels(with_dry_run):
    # A channel-wise mask has one Bernoulli variable per channel (4 here), each zeroing 25 inputs of fc at
    # once: K = 4, not fc.in_features = 100. The weight term still uses fc's weight. The shape reads
    # (h.size(0), h.shape[0]) only read metadata, so fc and head are still the consumers.
    torch.manual_seed(0)
    wr, dr = 1e-3, 0.05
    inputs = (torch.randn(3, 2, 5, 5),) if with_dry_run else None
    model = cd.convert(_ChannelsThenDense(), weight_regularizer=wr, dropout_regularizer=dr, example_inputs=inputs)
    assert _sites(model) == ["drop_channels", "drop_units"]
    _set_rates(model, {"drop_channels": 0.35, "drop_units": 0.12})
    spec = [("drop_channels", ("fc.weight",), 4), ("drop_units", ("head.weight",), 6)]
    _check(model, spec, wr, dr)  # known right after convert: conv.out_channels fixes the width
    model.train()
    model(torch.randn(2, 2, 5, 5))
    _check(model, spec, wr, dr)


# ---------------------------------------------------------------------------------------------------------
# Sites without consumer (a residual branch): K is the dropped feature dim of the input, never the batch.


class _ResidualLinear(nn.Module):
    """``x + drop(fc(x))`` on (B, L, C) inputs: the site's output goes to an add, so it has no consumer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc(x))


class _ResidualConv(nn.Module):
    """``x + drop2d(conv(x))`` on (B, C, H, W) inputs: a channel-wise site without consumer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout2d(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.conv(x))


@pytest.mark.parametrize(
    "make, shape, k",
    [
        (lambda: _ResidualLinear(5), (2, 3, 5), 5),  # (B, L, C): element-wise K = C, the last dim
        (lambda: _ResidualConv(5), (2, 5, 3, 4), 5),  # (B, C, H, W): channel-wise K = C, dim 1
    ],
    ids=["elementwise-BLC", "channelwise-BCHW"],
)
def test_consumerless_site_k_is_the_dropped_feature_dim(make, shape, k):
    torch.manual_seed(0)
    wr, dr = 1e-3, 0.05
    model = cd.convert(make(), weight_regularizer=wr, dropout_regularizer=dr)
    assert get_collector(model).applications[0].consumer_weights == ()
    _set_rates(model, {"drop": 0.3})
    model.train()
    model(torch.randn(*shape))  # one training forward: K is known after it in every design
    # Batch 2 and the other dims differ from C = 5: K taken from any other dim changes the value.
    _check(model, [("drop", (), k)], wr, dr)


class _ReshapedResidual(nn.Module):
    """A site behind a reshape: no layer of the model fixes its width, so the first forward has to give K."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.drop2d = nn.Dropout2d(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 3, -1)  # (B, 3, 20 / 3 ...): the width depends on the input only
        h = h + self.drop(h)
        g = h.reshape(h.shape[0], 6, -1, 1)
        return g + self.drop2d(g)


def test_width_unknown_at_conversion_is_learnt_from_the_first_forward_not_the_batch():
    torch.manual_seed(0)
    wr, dr = 1e-3, 0.05
    model = cd.convert(_ReshapedResidual(), weight_regularizer=wr, dropout_regularizer=dr)
    row_notes = {row.name: " ".join(row.notes) for row in cd.report(model).rows}
    assert "first training forward" in row_notes["drop"] and "first training forward" in row_notes["drop2d"]
    with pytest.raises(RuntimeError, match="forward"):
        cd.regularization(model)
    _set_rates(model, {"drop": 0.3, "drop2d": 0.2})
    model.train()
    model(torch.randn(4, 30))  # drop sees (4, 3, 10): K = 10; drop2d sees (4, 6, 5, 1): K = 6 channels
    _check(model, [("drop", (), 10), ("drop2d", (), 6)], wr, dr)
    model(torch.randn(7, 30))  # another batch size changes nothing
    _check(model, [("drop", (), 10), ("drop2d", (), 6)], wr, dr)


class _ConsumerlessFirst(nn.Module):
    """A residual site (no consumer) first, then two consumed sites: the weighted sites are not 0..n-1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.d0 = nn.Linear(5, 5), nn.Dropout(0.1)
        self.d1, self.fc1 = nn.Dropout(0.1), nn.Linear(5, 3)
        self.d2, self.fc2 = nn.Dropout(0.1), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.d0(self.fc0(x))
        return self.fc2(self.d2(self.fc1(self.d1(h))))


class _ConsumerlessLast(nn.Module):
    """Two consumed sites, then a residual site (no consumer) last."""

    def __init__(self) -> None:
        super().__init__()
        self.d1, self.fc1 = nn.Dropout(0.1), nn.Linear(5, 3)
        self.d2, self.fc2 = nn.Dropout(0.1), nn.Linear(3, 6)
        self.fc0, self.d0 = nn.Linear(6, 6), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.d2(self.fc1(self.d1(x))))
        return h + self.d0(self.fc0(h))


def test_changed_applications_are_seen_by_the_cached_plan():
    # The regulariser caches its constants; a collector whose applications change (a re-conversion, or code
    # that edits them) must give the regulariser of the new applications, not of the cached ones.
    torch.manual_seed(0)
    wr, dr = 1e-3, 0.05
    model = cd.convert(_ConsumerlessFirst(), weight_regularizer=wr, dropout_regularizer=dr)
    model.train()
    model(torch.randn(2, 3, 5))
    full = cd.regularization(model).item()
    collector = get_collector(model)
    first, *rest = collector.applications
    assert first.site == "d0"
    collector.applications = rest
    assert cd.regularization(model).item() != pytest.approx(full, rel=1e-6)
    collector.applications = [first]
    _check(model, [("d0", (), 5)], wr, dr)


@pytest.mark.parametrize(
    "make, order, spec",
    [
        (
            _ConsumerlessFirst,
            ["d0", "d1", "d2"],
            [("d0", (), 5), ("d1", ("fc1.weight",), 5), ("d2", ("fc2.weight",), 3)],
        ),
        (
            _ConsumerlessLast,
            ["d1", "d2", "d0"],
            [("d1", ("fc1.weight",), 5), ("d2", ("fc2.weight",), 3), ("d0", (), 6)],
        ),
    ],
    ids=["consumerless-first", "consumerless-last"],
)
def test_each_weight_term_uses_its_own_sites_rate(make, order, spec):
    torch.manual_seed(0)
    # Weight term comparable to the entropy term, and far-apart rates: a (1 - p) of the wrong site shows.
    wr, dr = 0.05, 0.02
    model = cd.convert(make(), weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == order
    _set_rates(model, {"d0": 0.6, "d1": 0.05, "d2": 0.3})
    model.train()
    model(torch.randn(2, 3, 5))
    _check(model, spec, wr, dr)


# ---------------------------------------------------------------------------------------------------------
# Several consumers of one site, one consumer shared by two sites, and a consumer-less site first.


class _Mixed(nn.Module):
    """d0: no consumer; d1: read by q and k (||W||^2 summed); d2, d3: both read by ``shared`` (counted per site)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.d0 = nn.Linear(5, 5), nn.Dropout(0.1)
        self.d1, self.q, self.k = nn.Dropout(0.1), nn.Linear(5, 4), nn.Linear(5, 4)
        self.d2, self.d3, self.shared = nn.Dropout(0.1), nn.Dropout(0.1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.d0(self.fc0(x))
        g = self.d1(h)
        return self.shared(self.d2(self.q(g))) + self.shared(self.d3(self.k(g)))


MIXED_SPEC: Spec = [
    ("d0", (), 5),
    ("d1", ("q.weight", "k.weight"), 5),
    ("d2", ("shared.weight",), 4),
    ("d3", ("shared.weight",), 4),
]
MIXED_RATES = {"d0": 0.45, "d1": 0.08, "d2": 0.3, "d3": 0.7}


def _mixed(dtype: torch.dtype, wr: float, dr: float) -> nn.Module:
    torch.manual_seed(0)
    model = cd.convert(_Mixed().to(dtype), weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == ["d0", "d1", "d2", "d3"]
    _set_rates(model, MIXED_RATES)
    model.train()
    model(torch.randn(2, 3, 5, dtype=dtype))
    return model


def test_several_consumers_and_shared_consumer_hand_values():
    wr, dr = 0.05, 0.02
    _check(_mixed(torch.float32, wr, dr), MIXED_SPEC, wr, dr)


def test_gradients_match_finite_differences_of_the_formula_in_float64():
    """Central differences of the float64 hand formula against autograd of the library (fp32 inside)."""
    wr, dr = 0.05, 0.02
    model = _mixed(torch.float64, wr, dr)
    logits = {site: _stored_logit(model, site) for site, _, _ in MIXED_SPEC}
    weights = {name: model.get_parameter(name).detach().clone() for _, names, _ in MIXED_SPEC for name in names}

    def formula(logits: Dict[str, float], weights: Dict[str, torch.Tensor]) -> float:
        return sum(
            _site_term(sum(float(weights[w].pow(2).sum()) for w in names), logits[site], k, wr, dr)
            for site, names, k in MIXED_SPEC
        )

    cd.regularization(model).backward()
    h = 1e-6
    for site in logits:
        up, down = dict(logits), dict(logits)
        up[site] += h
        down[site] -= h
        fd = (formula(up, weights) - formula(down, weights)) / (2 * h)
        assert model.get_submodule(site).p_logit.grad.item() == pytest.approx(fd, rel=1e-5), site
    # The shared weight gets both sites' pulls: 2 wr W (1/(1-p2) + 1/(1-p3)); checked entry by entry.
    shared = weights["shared.weight"]
    fd_grad = torch.empty_like(shared)
    for index in range(shared.numel()):
        step = torch.zeros_like(shared).view(-1)
        step[index] = h
        up = {**weights, "shared.weight": shared + step.view_as(shared)}
        down = {**weights, "shared.weight": shared - step.view_as(shared)}
        fd_grad.view(-1)[index] = (formula(logits, up) - formula(logits, down)) / (2 * h)
    torch.testing.assert_close(model.shared.weight.grad, fd_grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# A logit past the clamp bound: value at the bound, gradient straight through.


@pytest.mark.parametrize("logit", [20.0, -20.0], ids=["above", "below"])
def test_logit_past_the_bound_value_at_bound_and_gradient_straight_through(logit):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.1), nn.Linear(6, 3), nn.Dropout(0.1), nn.Linear(3, 2))
    # wr small: at p = 1 - eps the weight term is wr ||W||^2 / eps.
    wr, dr = 1e-6, 0.05
    model = cd.convert(net, weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == ["1", "3"]
    _set_rates(model, {"3": 0.2})
    with torch.no_grad():
        model[1].p_logit.fill_(logit)
    assert abs(logit) > BOUND
    spec = [("1", ("2.weight",), 6), ("3", ("4.weight",), 3)]
    expected_grad = _site_grad(_squared_norm(model, ["2.weight"]), logit, 6, wr, dr)
    # The hand gradient at the bound is far from zero (a plain clamp would give exactly 0).
    assert abs(expected_grad) > 1e-6
    _check(model, spec, wr, dr)


# ---------------------------------------------------------------------------------------------------------
# Low-precision consumer weights: ||W||^2 must be accumulated in fp32, not computed in 16 bits and cast.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_squared_norms_to_fp32_accuracy(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Dropout2d(0.1), nn.Conv2d(3, 7, 3), nn.Flatten(), nn.Dropout(0.1), nn.Linear(7, 4)
    ).to(dtype)
    # wr large: the weight term is nearly all of the total, so an error of a 16-bit norm (2^-11 or 2^-8
    # relative, squared) is far above the tolerance; fp32 accumulation is good to about 1e-7.
    wr, dr = 1.0, 0.01
    model = cd.convert(net, weight_regularizer=wr, dropout_regularizer=dr)
    assert _sites(model) == ["1", "4"]
    _set_rates(model, {"1": 0.2, "4": 0.45})
    spec = [("1", ("2.weight",), 3), ("4", ("5.weight",), 7)]
    weight_part, _ = _hand(model, spec, wr, 0.0)
    expected, _ = _hand(model, spec, wr, dr)
    assert weight_part > 0.9 * expected
    reg = cd.regularization(model)
    assert reg.dtype == torch.float32
    assert reg.item() == pytest.approx(expected, rel=1e-5)
    # The gradient is cast to the logit's dtype: equal up to that dtype's rounding.
    _check(model, spec, wr, dr, rel=1e-5, grad_rel=torch.finfo(dtype).eps)
