"""The C++ regulariser's gradients delivered to the site nodes that run later in the same backward pass
(``csrc/host_site.cpp``, "deliveries"): every way of running the backward pass gives the gradients of the Python
path (where the regulariser returns every gradient itself), and on a training step the regulariser then adds no
op to the backward pass."""

from __future__ import annotations

from collections import Counter
import weakref
from typing import Callable, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cd_convert
from cd_convert import cpu_extension
from cd_convert.sites import fused_linear
from cd_convert.sites.fused_linear import FusedLinearForward

X, X2, TARGET = torch.randn(32, 8), torch.randn(32, 8), torch.randn(32, 3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    # Constants large enough that both of the regulariser's terms show in every gradient at the tolerance below.
    return cd_convert.convert(
        model, targets=[nn.Linear], weight_regularizer=0.05, dropout_regularizer=0.01, init_p=0.2
    ).train()


def _loss(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    return F.mse_loss(model(x), TARGET)


def _logits(model: nn.Module) -> List[torch.Tensor]:
    return [model[0].concrete_dropout.p_logit, model[2].concrete_dropout.p_logit]


def _weights(model: nn.Module) -> List[torch.Tensor]:
    return [model[0].weight, model[2].weight]


def _warm(model: nn.Module, x: torch.Tensor = X) -> bool:
    """Two training calls (the first records the sites' widths, the second puts a layer into fused mode where the
    extension is on and serves it); returns whether the first layer is in fused mode."""
    for _ in range(2):
        model(x).sum().backward()
    return isinstance(vars(model[0]).get("forward"), FusedLinearForward)


def _backward(model: nn.Module) -> None:
    (_loss(model) + cd_convert.regularization(model)).backward()


def _regulariser_first(model: nn.Module) -> None:
    # Its node is older than the sites' nodes: it runs after them, too late to deliver.
    r = cd_convert.regularization(model)
    (_loss(model) + r).backward()


def _scaled(model: nn.Module) -> None:
    (_loss(model) + 0.25 * cd_convert.regularization(model)).backward()


def _grad_of_logits(model: nn.Module) -> None:
    grads = torch.autograd.grad(_loss(model) + cd_convert.regularization(model), _logits(model))
    for logit, grad in zip(_logits(model), grads):
        logit.grad = grad


def _grad_of_weights(model: nn.Module) -> None:
    grads = torch.autograd.grad(_loss(model) + cd_convert.regularization(model), _weights(model))
    for weight, grad in zip(_weights(model), grads):
        weight.grad = grad


def _backward_with_inputs(model: nn.Module) -> None:
    (_loss(model) + cd_convert.regularization(model)).backward(inputs=[model[0].weight, _logits(model)[1]])


def _other_forward_pass_unused(model: nn.Module) -> None:
    # The newest site nodes belong to a forward pass this loss does not use (kept alive): nothing is delivered
    # to them.
    loss = _loss(model, X)
    other = model(X2)
    (loss + cd_convert.regularization(model)).backward()
    del other


def _retained_graph_twice(model: nn.Module) -> None:
    loss = _loss(model) + cd_convert.regularization(model)
    loss.backward(retain_graph=True)
    loss.backward()


def _regulariser_alone_after_a_forward_pass(model: nn.Module) -> None:
    output = model(X)  # its nodes alive, outside the regulariser's graph
    cd_convert.regularization(model).backward()
    del output


def _gradient_penalty(model: nn.Module) -> None:
    x = X.clone().requires_grad_()
    loss = F.mse_loss(model(x), TARGET) + cd_convert.regularization(model)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + gx.square().sum()).backward()


SCENARIOS: List[Callable[[nn.Module], None]] = [
    _backward,
    _regulariser_first,
    _scaled,
    _grad_of_logits,
    _grad_of_weights,
    _backward_with_inputs,
    _other_forward_pass_unused,
    _retained_graph_twice,
    _regulariser_alone_after_a_forward_pass,
    _gradient_penalty,
]


def _gradients(scenario: Callable[[nn.Module], None], extension: bool, fused: bool) -> List[torch.Tensor]:
    """Every parameter's gradient after ``scenario`` (zero where none), on the C++ path (in fused mode or through
    the pre-hook) or on the Python path, on the same noise."""
    model = _model()
    if extension:
        cpu_extension.enable()
    try:
        assert _warm(model) == (extension and fused)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        scenario(model)
    finally:
        cpu_extension.disable()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-node", "site-then-linear"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_gradients_equal_the_python_paths(built, monkeypatch, scenario, fused):
    if not fused:
        monkeypatch.setattr(fused_linear, "enter", lambda *args: None)  # HostSite nodes: logit deliveries only
    native = _gradients(scenario, extension=True, fused=fused)
    python = _gradients(scenario, extension=False, fused=fused)
    assert any(g.abs().sum() > 0 for g in python)
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_on_a_training_step_the_regulariser_adds_no_op_to_the_backward_pass(built):
    """Both logits' and both weights' gradients are delivered to the fused nodes, and the regulariser's incoming
    gradient is read from memory: the backward pass dispatches no op for the regulariser (without deliveries: two
    logit gradients, one multiply, four sums; reading the gradient with item(): one more)."""
    model = _model()
    cpu_extension.enable()
    try:
        assert _warm(model)
        counts = {}
        for regularise in (False, True):
            model.zero_grad(set_to_none=True)
            loss = _loss(model)
            if regularise:
                loss = loss + cd_convert.regularization(model)
            with _OpCount() as count:
                loss.backward()
            counts[regularise] = count.ops
    finally:
        cpu_extension.disable()
    with_regulariser, without = Counter(counts[True]), Counter(counts[False])
    # The weights' gradients: addmm(W, g^T, x m, beta=s) in place of mm(g^T, x m), and nothing else.
    assert with_regulariser - without == Counter({"aten.addmm.default": 2})
    assert without - with_regulariser == Counter({"aten.mm.default": 2})


class _Packed:
    """What a saved-tensor hook keeps in place of a saved tensor: weakly referenced by the test, alive exactly as
    long as the node that saved it. It holds the tensor detached: holding a saved output itself would make a
    reference cycle (node, hook object, output, node) that no garbage collector can see through."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-node", "site-then-linear"])
def test_dropped_graphs_free_their_site_nodes_saved_tensors_at_once(built, monkeypatch, fused):
    """The registry that finds site nodes must not keep them, or the tensors they saved, alive: were it to hold
    a node weakly, freeing the node (and its saved mask and input) would wait until that reference went (a build
    that did grew the peak memory by 192 MiB over 200 such graphs of 4 MiB tensors). Every tensor a node saves
    goes through a saved-tensor hook here, into an object the test references weakly: once a forward pass's
    output is dropped, none of them may be alive. (Deterministic, where the peak memory also depends on the
    allocator's state.)"""
    if not fused:
        monkeypatch.setattr(fused_linear, "enter", lambda *args: None)
    torch.manual_seed(0)
    model = cd_convert.convert(nn.Sequential(nn.Linear(64, 2)), targets=[nn.Linear], dataset_size=100).train()
    x = torch.randn(16, 64)
    packed: List[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> _Packed:
        holder = _Packed(tensor)
        packed.append(weakref.ref(holder))
        return holder

    cpu_extension.enable()
    try:
        assert _warm(model, x) == fused
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            for _ in range(20):
                model(x)  # the graph is dropped at once
    finally:
        cpu_extension.disable()
    assert len(packed) >= 20 * 2  # each pass saved the mask and an activation at least
    alive = sum(ref() is not None for ref in packed)
    assert alive == 0, f"{alive} of {len(packed)} tensors saved by 20 dropped graphs are still alive"
