"""Dropout whose output never reaches the model's outputs is reported ``output unused`` and left as it is.

The independent fact in each case is autograd on the unconverted model: the loss has no gradient with respect
to the output of an unused dropout (``torch.autograd.grad(..., allow_unused=True)`` gives None), and has one
for every dropout that is converted. cd_convert's dry run decides without autograd (it follows labels through
the ops it sees, :mod:`cd_convert.reach`), so the two can disagree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert


def _rows(model: nn.Module) -> Dict[str, str]:
    return {row.name: row.status for row in cd_convert.report(model).rows}


def _dropout_outputs_reaching(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> Dict[str, bool]:
    """For each ``nn.Dropout`` module of the unconverted model: whether the loss depends on any of its outputs
    (autograd; a module called twice reaches when one of its calls does).

    Args:
        model: the model (run in training mode).
        loss_of: the loss of one forward pass of it.
    """
    outputs: List[Tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.append((name, out)))
        for name, module in model.named_modules()
        if isinstance(module, nn.Dropout)
    ]
    try:
        loss = loss_of(model.train())
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(loss, [t for _, t in outputs], allow_unused=True)
    reaching: Dict[str, bool] = {}
    for (name, _), grad in zip(outputs, grads):
        reaching[name] = reaching.get(name, False) or grad is not None
    return reaching


def _output_sum(x: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    """The sum of every output tensor of a forward pass on ``x`` (which requires grad: dropout on the input too)."""
    return lambda model: sum(t.float().sum() for t in _tensors(model(x.detach().requires_grad_())))


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, Pairs):
        value = [value.first, value.second]
    return [t for item in value for t in _tensors(item)] if isinstance(value, (list, tuple)) else []


class SideBranch(nn.Module):
    """A module dropout and a functional dropout whose results the forward computes and drops."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.live, self.dead = nn.Dropout(0.1), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(self.live(x))
        side = self.b(self.dead(x))  # computed and dropped, as LiLT's last layout stream
        F.dropout(side, 0.4, self.training)
        return F.dropout(h, 0.3, self.training)


def test_unused_dropout_is_reported_and_left_alone():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    model = SideBranch()
    reaching = _dropout_outputs_reaching(model, _output_sum(x))
    assert reaching == {"live": True, "dead": False}  # the independent fact

    converted = cd_convert.convert(model, dataset_size=100, example_inputs=(x,))
    by_rate = {row.original_p: row.status for row in cd_convert.report(converted).rows}
    assert by_rate == {0.1: "converted", 0.2: "output unused", 0.3: "converted", 0.4: "output unused"}, by_rate
    assert type(converted.dead) is nn.Dropout and converted.dead.p == 0.2
    # The converted sites learn from the data: every p-logit gets a data gradient. The calls left alone pass
    # through the routed forward without the warning about calls the conversion never saw.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted.train()(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for n, p in converted.named_parameters() if "p_logit" in n)


class WrittenThroughViews(nn.Module):
    """Dropout outputs that reach the output only through writes into views of a buffer taken before the write,
    beside an unused dropout (which shows that the pass could tell)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.in_place = nn.Dropout(0.1), nn.Dropout(0.2), nn.Dropout(0.3, inplace=True)
        self.unused = nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffer = torch.zeros(x.shape[0], 3 * x.shape[1])
        whole = buffer.view(-1)  # a view taken before any write
        left = buffer[:, : x.shape[1]]
        left.copy_(self.first(x))  # an in-place op on another view
        buffer[:, x.shape[1] : 2 * x.shape[1]] = self.second(x)  # __setitem__
        scratch = x * 2
        alias = scratch.view(-1)
        self.in_place(scratch)  # in-place dropout: only its input's views carry the result
        self.unused(x)
        return whole + alias.repeat(3)


def test_writes_through_views_reach_the_output():
    x = torch.randn(2, 4)
    model = WrittenThroughViews()
    converted = cd_convert.convert(model, dataset_size=100, example_inputs=(x,))
    rows = _rows(converted)
    assert rows == {"first": "converted", "second": "converted", "in_place": "converted", "unused": "output unused"}


@dataclass
class Pairs:
    """A dataclass with slots (no ``__dict__``), as some model outputs are."""

    __slots__ = ("first", "second")
    first: torch.Tensor
    second: torch.Tensor


class NestedOutputs(nn.Module):
    """Dropout that reaches only one field of a dataclass inside a dict inside a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.used, self.unused = nn.Dropout(0.1), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor):
        self.lin(self.unused(x))
        return ({"pair": Pairs(first=x + 1, second=self.lin(self.used(x)))}, x.mean())


def test_outputs_are_found_in_nested_containers():
    x = torch.randn(3, 4)
    model = NestedOutputs()
    assert _dropout_outputs_reaching(model, _output_sum(x)) == {"used": True, "unused": False}
    rows = _rows(cd_convert.convert(model, dataset_size=100, example_inputs=(x,)))
    assert rows["used"] == "converted" and rows["unused"] == "output unused"


class ThroughNumpy(nn.Module):
    """The output leaves torch through numpy: labels are lost, so the pass cannot tell and skips nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.drop(x))
        return torch.from_numpy(h.detach().numpy().copy())


def test_an_inconclusive_pass_skips_nothing():
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = _rows(cd_convert.convert(ThroughNumpy(), dataset_size=100, example_inputs=(x,)))
    assert rows["drop"] == "converted"


class UnusedAttention(nn.Module):
    """An ``nn.MultiheadAttention`` whose result is dropped beside one whose result is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.dropped = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dropped(x, x, x)
        return self.kept(x, x, x)[0]


def test_unused_attention_dropout():
    x = torch.randn(2, 5, 8)
    model = UnusedAttention()
    converted = cd_convert.convert(model, dataset_size=100, example_inputs=(x,))
    statuses = {row.name.split(".")[0]: row.status for row in cd_convert.report(converted).rows}
    assert statuses == {"kept": "converted", "dropped": "output unused"}, statuses


def test_lilt_last_layout_stream():
    """LiLT's encoder returns the text stream only: the last layer's layout-stream dropouts are unused."""
    pytest.importorskip("transformers")
    from benchmarks import transformers_families as families

    family = next(f for f in families.FAMILIES if f.name == "lilt")
    model, _ = families.build(family)
    inputs, loss_fn = families.make_inputs(family.inputs, model.config), families.data_loss
    # The attention dropout is called twice (on the text and the layout probabilities): unused only when neither
    # of its outputs reaches the loss.
    reaching = _dropout_outputs_reaching(model, lambda m: loss_fn(m(**inputs)))
    dead = {name for name, reaches in reaching.items() if not reaches}
    assert dead  # the independent fact: some dropout outputs do not reach the loss

    converted = cd_convert.convert(model, dataset_size=100)
    rows = _rows(converted)
    assert {name for name, status in rows.items() if status == "output unused"} == dead
    assert all(rows[name] == "converted" for name in reaching if name not in dead)
