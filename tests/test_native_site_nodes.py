"""The autograd behaviour of a site's node, alike on the Python path and on the C++ build (``csrc/host_site.cpp``:
the site's node and the fused site-and-Linear node): autograd's errors on a second backward pass through a freed
graph and on an input, a saved output or a Linear's weight changed in place, gradients that add up over a
retained graph, the refusal of dual tensors (forward-mode AD), and no node where no gradient is recorded. (Their
values and gradients against the Python path and a float64 reference: ``test_cpu_extension.py``,
``test_fused_linear.py``, ``test_deliveries.py``.)
"""

from __future__ import annotations

from typing import Callable, Tuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

import cd_convert as cd
from cd_convert import cpu_extension
from cd_convert.layers import ConcreteDropout
from cd_convert.sites.fused_linear import FusedLinearForward


def _site(save_output: bool) -> Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    site = ConcreteDropout(0.2).train()
    site.save_output = save_output
    return site, site


def _fused() -> Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A targeted Linear: on the C++ path it enters fused mode (one node for the site and the Linear) once warm."""
    torch.manual_seed(0)
    model = cd.convert(nn.Sequential(nn.Linear(8, 6)), targets=[nn.Linear], dataset_size=100).train()
    for _ in range(2):  # the layer enters fused mode at a call the node serves
        model(torch.randn(4, 8, requires_grad=True)).sum().backward()
    assert isinstance(vars(model[0]).get("forward"), FusedLinearForward) == (cpu_extension.loaded() is not None)
    model.zero_grad(set_to_none=True)
    return model[0].concrete_dropout, model


KINDS = {"site": lambda: _site(False), "site-saving-its-output": lambda: _site(True), "site-and-linear": _fused}


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_backward_pass_through_a_freed_graph_raises(host_path, kind):
    _, call = KINDS[kind]()
    y = call(torch.randn(4, 8, requires_grad=True)).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward()


@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_adds_the_same_gradients_twice(host_path, kind):
    site, call = KINDS[kind]()
    x = torch.randn(4, 8, requires_grad=True)
    y = (call(x) * torch.randn(4, 8 if kind != "site-and-linear" else 6)).sum()
    y.backward(retain_graph=True)
    once_x, once_logit = x.grad.clone(), site.p_logit.grad.clone()
    y.backward()
    torch.testing.assert_close(x.grad, 2 * once_x)
    torch.testing.assert_close(site.p_logit.grad, 2 * once_logit)


def test_an_input_changed_in_place_before_the_backward_pass_raises(host_path):
    _, call = KINDS["site"]()
    leaf = torch.randn(4, 8, requires_grad=True)
    x = leaf * 1.0  # a non-leaf input (saved for the backward pass), changed in place after the call
    y = call(x).sum()
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_linear_weight_changed_in_place_before_the_backward_pass_raises(host_path):
    _, model = KINDS["site-and-linear"]()
    y = model(torch.randn(4, 8, requires_grad=True)).sum()
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # saved for dL/dx
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_saved_output_changed_in_place_before_the_backward_pass_raises(host_path):
    _, call = KINDS["site-saving-its-output"]()
    y = call(torch.randn(4, 8, requires_grad=True))
    z = y.sum()
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_is_refused(host_path, kind):
    _, call = KINDS[kind]()
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(4, 8), torch.randn(4, 8))
        with pytest.raises((NotImplementedError, RuntimeError), match="(?i)jvp|forward-mode"):
            call(x)


@pytest.mark.parametrize("kind", KINDS)
def test_no_node_without_recorded_gradients(host_path, kind):
    site, call = KINDS[kind]()
    with torch.no_grad():
        assert call(torch.randn(4, 8)).grad_fn is None
    site.p_logit.requires_grad_(False)
    if kind == "site-and-linear":
        for p in call.parameters():
            p.requires_grad_(False)
    assert call(torch.randn(4, 8)).grad_fn is None
