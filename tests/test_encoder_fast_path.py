"""torch's encoder layers stay off their eval fast path while a site samples (Monte Carlo prediction).

In eval, ``nn.TransformerEncoderLayer`` runs one fused kernel that skips its child modules, the sites among them.
torch 2.1-2.4 take that path even for a layer with forward hooks, so on them MC samples of a converted encoder were
all the same (checked on 2.4.1 before the switch: ``test_every_site_samples_under_mc_mode[transformer]`` failed).
Newer torch leaves the fast path for a hooked module, so here the switch is checked where it acts: the flags the
fast-path checks read while the layer's forward runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import cd_convert


def _encoder(dropout: float = 0.1) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _flags_seen_by_forward(model: nn.Module, x: torch.Tensor) -> dict:
    """``training`` of the encoder's first layer and of each layer as their forwards start (hooks registered after
    cd_convert's run after them)."""
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, m.training))
        for i, layer in enumerate(model.layers)
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_the_layers_take_their_ordinary_path_only_while_sites_sample():
    model = _encoder()
    x = torch.randn(3, 5, 16)
    converted = cd_convert.convert(model, dataset_size=50, example_inputs=(x,)).eval()
    with torch.no_grad():
        assert _flags_seen_by_forward(converted, x) == {0: False, 1: False}  # eval: the fast path as before
        with cd_convert.mc_mode(converted):
            assert _flags_seen_by_forward(converted, x) == {0: True, 1: True}
            first, second = converted(x), converted(x)
        assert not torch.equal(first, second)
        assert all(not m.training for m in converted.modules())  # every flag restored
        assert torch.equal(converted(x), model(x))


def test_undo_removes_the_switches():
    model = _encoder()
    x = torch.randn(3, 5, 16)
    hooks_before = [len(m._forward_pre_hooks) for m in model.modules()]
    converted = cd_convert.convert(model, dataset_size=50, example_inputs=(x,))
    assert sum(len(m._forward_pre_hooks) for m in (converted, *converted.layers)) >= 3
    plain = cd_convert.unconvert(converted)
    assert [len(m._forward_pre_hooks) for m in plain.modules()] == hooks_before


def test_a_layer_without_sites_gets_no_switch():
    model = _encoder(dropout=0.0)
    x = torch.randn(3, 5, 16)
    with pytest.warns(UserWarning, match="no dropout that cd_convert can convert"):
        converted = cd_convert.convert(model, dataset_size=50, example_inputs=(x,), include_zero_rate=False)
    assert not any(isinstance(m, cd_convert.ConcreteDropoutBase) for m in converted.modules())
    assert all(len(m._forward_pre_hooks) == 0 for m in converted.modules())
