"""A targeted layer's masked input recomputed in the backward pass instead of saved (cd_convert.recompute).

The same training step with the recomputation on and off must give bit-identical losses and gradients (the
forward kernel makes the same values from the same seed), the masked input must be freed after the forward
pass only when it is on, and other saved-tensor hooks must keep their behaviour. On a machine with a CUDA GPU
the tests run on it; without one under Triton's interpreter in a subprocess (as ``test_fused.py``).
"""

from __future__ import annotations

import copy
import gc
import os
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import cd_convert  # noqa: E402
from cd_convert import fused, recompute  # noqa: E402
from triton_interpreter import assert_passes_under_interpreter  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else ("cpu" if INTERPRETED else None)
runs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1 (see below)")
#: torch < 2.8 cannot say whether other saved-tensor hooks are active, so recomputation stays off there.
recomputes = pytest.mark.skipif(
    recompute._top_hooks is None, reason="torch < 2.8: no query of active saved-tensor hooks, recomputation is off"
)


@pytest.fixture(autouse=True)
def _kernels_on_cpu_when_interpreted(monkeypatch):
    monkeypatch.setattr(fused, "INTERPRET_ON_CPU", INTERPRETED)


@pytest.fixture
def recomputed(monkeypatch):
    """Counts the outputs made again in the backward pass."""
    calls = []
    original = fused.recompute_output

    def counting(node):
        calls.append(node)
        return original(node)

    monkeypatch.setattr(fused, "recompute_output", counting)
    return calls


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernels run directly here")
def test_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _converted_cnn(targets=(nn.Conv2d, nn.Linear)):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cd_convert.convert(model, targets=list(targets), dataset_size=100).to(DEVICE).train()


def _step(model, seed=1):
    """Loss and every gradient of one step with the masks drawn from ``seed``."""
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    target = torch.randint(0, 5, (4,), device=DEVICE)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target) + cd_convert.regularization(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@runs_kernels
@recomputes
def test_the_same_step_with_and_without_recomputation_is_bit_identical(monkeypatch, recomputed):
    model = _converted_cnn()
    loss_on, grads_on = _step(model)
    assert len(recomputed) == 3  # each targeted layer's masked input, made again once
    monkeypatch.setattr(recompute, "ENABLED", False)
    for site in cd_convert.mc.concrete_sites(model):
        site.save_output = False  # as the recomputing call runs the site (it keeps its input, not its output)
    loss_off, grads_off = _step(model)
    assert len(recomputed) == 3
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and any(n.endswith("p_logit") for n in grads_on)
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


@runs_kernels
@recomputes
@pytest.mark.parametrize("enabled", [True, False])
def test_the_masked_input_is_freed_after_the_forward_pass_only_when_recomputed(monkeypatch, enabled):
    monkeypatch.setattr(recompute, "ENABLED", enabled)
    model = _converted_cnn(targets=(nn.Conv2d,))
    outputs = []
    site = model[2].concrete_dropout  # the second conv's input site
    site.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    loss = model(x).square().mean()
    gc.collect()
    assert (outputs[0]() is None) == enabled  # kept only by the layer's saved input
    loss.backward()
    assert site.p_logit.grad is not None


@runs_kernels
def test_other_saved_tensor_hooks_keep_their_behaviour(recomputed):
    model = _converted_cnn(targets=(nn.Conv2d,))
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randn(4, 3, 6, 6, device=DEVICE)).square().mean()
    loss.backward()
    assert recomputed == [] and (4, 8, 6, 6) in packed  # the layer saved its masked input through the outer hook


@runs_kernels
@recomputes
def test_a_copied_model_and_one_trained_after_an_error_recompute_as_before(recomputed):
    model = _converted_cnn(targets=(nn.Conv2d,))
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 5, 6, 6, device=DEVICE))  # wrong channel count: the first conv raises
    copied = copy.deepcopy(model)
    for net in (model, copied):
        _step(net)
    assert len(recomputed) == 4
    assert recompute._other_hooks_active() is False  # the failed call left no hooks behind


@runs_kernels
@recomputes
def test_unconvert_after_a_recomputing_call_removes_every_hook():
    model = _converted_cnn(targets=(nn.Conv2d,))
    _step(model)
    assert all(model[i]._forward_hooks for i in (0, 2))  # the end hook, registered by the first recomputing call
    cd_convert.unconvert(model)
    for i in (0, 2):
        assert not model[i]._forward_hooks and not model[i]._forward_pre_hooks
        assert not model[i]._forward_hooks_always_called


def test_without_the_hook_query_other_hooks_are_assumed_active(monkeypatch):
    """On torch < 2.8 nothing says whether activation checkpointing or ``save_on_cpu`` hooks are active: the
    layer must then keep its input as before rather than push its own hooks over theirs."""
    monkeypatch.setattr(recompute, "_top_hooks", None)
    assert recompute._other_hooks_active() is True


def test_a_layer_that_never_recomputes_gets_no_forward_hook(monkeypatch):
    monkeypatch.setattr(fused, "INTERPRET_ON_CPU", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cd_convert.convert(model, targets=[nn.Conv2d, nn.Linear], dataset_size=100).train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()  # the CPU: the fused kernels never run here
    assert not model[0]._forward_hooks and not model[3]._forward_hooks  # no per-call hook cost on the CPU


@runs_kernels
@recomputes
def test_a_resnet_with_conv_targets_trains_the_same_with_its_inputs_recomputed(monkeypatch, recomputed):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cd_convert.convert(base, targets=[nn.Conv2d], dataset_size=100).to(DEVICE).train()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for site in cd_convert.mc.concrete_sites(model):
        site.save_output = False  # what a recomputing call runs the site with, for the comparison below

    def step():
        torch.manual_seed(3)
        x = torch.randn(2, 3, 32, 32, device=DEVICE)
        model.zero_grad(set_to_none=True)
        loss = model(x).logsumexp(1).mean() + cd_convert.regularization(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_on, grads_on = step()
    assert len(recomputed) == len(convs) == 20  # stem, 16 block convolutions, 3 downsamples
    monkeypatch.setattr(recompute, "ENABLED", False)
    loss_off, grads_off = step()
    assert torch.equal(loss_on, loss_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))


@runs_kernels
def test_inputs_the_kernels_do_not_take_are_kept_as_before(recomputed):
    model = _converted_cnn().double()  # float64: the PyTorch formula, not the fused kernels
    outputs = []
    site = model[2].concrete_dropout
    site.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    loss = model(torch.randn(4, 3, 6, 6, device=DEVICE, dtype=torch.float64)).square().mean()
    gc.collect()
    assert outputs[0]() is not None  # the layer keeps its masked input
    loss.backward()
    assert recomputed == [] and site.p_logit.grad is not None
