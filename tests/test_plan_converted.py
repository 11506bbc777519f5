"""plan() of an already converted model: each site listed once, "existing", at its learned rate (issue 14, fix 2)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import cd_convert
from zoo import Attention, zoo

ZOO = {name: (factory, inputs, kwargs) for name, factory, inputs, kwargs in zoo()}


def _kwargs(name: str) -> dict:
    _, inputs, kwargs = ZOO[name]
    kwargs = dict(kwargs)
    if kwargs.pop("use_example_inputs", False):
        kwargs["example_inputs"] = inputs()
    return kwargs


def _learned(model: nn.Module) -> dict:
    """Give every site a rate of its own, far from init_p and from the original rates (as training would)."""
    rates = {}
    with torch.no_grad():
        for i, name in enumerate(cd_convert.dropout_rates(model)):
            p = 0.41 + 0.013 * i
            model.get_submodule(name).p_logit.fill_(math.log(p / (1 - p)))
            rates[name] = p
    return rates


@pytest.mark.parametrize("name", list(ZOO))
def test_plan_of_a_converted_zoo_model_lists_each_site_once(name):
    torch.manual_seed(0)
    factory, _, _ = ZOO[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(factory(), dataset_size=100, **_kwargs(name))
        learned = _learned(converted)
        report = cd_convert.plan(converted, **_kwargs(name))
    names = [row.name for row in report.sites]
    assert len(names) == len(set(names)), names
    assert sorted(names) == sorted(learned)
    for row in report.sites:
        assert row.status == "existing", row
        assert row.p == pytest.approx(learned[row.name], abs=1e-6), row.name


def test_multihead_attention_site_once_with_its_kind():
    converted = cd_convert.convert(Attention(), dataset_size=100)
    learned = _learned(converted)
    (row,) = cd_convert.plan(converted).sites
    assert (row.name, row.kind, row.status) == ("att.forward_attn_dropout", "fused", "existing")
    assert row.p == pytest.approx(learned[row.name], abs=1e-6)


def test_targeted_site_once_and_its_consumer_kept():
    """A targeted layer's site, found by module search and by targets, is one row with the layer's weight."""
    converted = cd_convert.convert(Attention(), targets=[nn.Linear], dataset_size=100)
    for targets in ([nn.Linear], None):  # None also plans the attention dropout, not converted before
        (row,) = [r for r in cd_convert.plan(converted, targets=targets).sites if r.status == "existing"]
        assert (row.name, row.kind, row.consumer) == ("fc.concrete_dropout", "targeted", "fc.weight")


def test_converting_again_keeps_the_regulariser():
    """Converting a converted model again registers each application once: the regulariser is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    for kwargs in ({}, {"targets": [nn.Linear]}):
        converted = cd_convert.convert(Attention(), dataset_size=100, **kwargs)
        _learned(converted)
        converted(x)  # consumer-less sites learn their width
        again = cd_convert.convert(converted, dataset_size=100, **kwargs)
        torch.testing.assert_close(cd_convert.regularization(again), cd_convert.regularization(converted))
