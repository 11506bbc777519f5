"""The regulariser right after convert: sites without a consuming weight get their width K at conversion
(issue 14, fix 3) where the model fixes it, and keep learning it at the first forward where it does not."""

from __future__ import annotations

import math
import warnings
from typing import Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert.collector import get_collector
from cd_convert.layers import ConcreteDropoutBase


def _units(model: nn.Module) -> Dict[str, object]:
    return {a.site: a.units for a in get_collector(model).applications if not a.consumer_weights}


def _observed_widths(model: nn.Module, *args, **kwargs) -> Dict[str, int]:
    """One training forward; K of each site read off its input with hooks (last dim, or dim 1 channel-wise)."""
    seen: Dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ConcreteDropoutBase):

            def hook(mod, inputs, name=name):
                x = inputs[0]
                seen.setdefault(name, x.shape[1] if mod.channelwise else x.shape[-1])

            handles.append(module.register_forward_pre_hook(hook))
    model.train()
    with torch.no_grad():
        model(*args, **kwargs)
    for handle in handles:
        handle.remove()
    return seen


def _formula(model: nn.Module, widths: Dict[str, int]) -> torch.Tensor:
    """The regulariser written out (Gal et al. 2017): per application, lambda_w ||W||^2 / (1 - p) + lambda_p K H(p)."""
    collector = get_collector(model)
    scale = collector.scale
    total = torch.zeros((), dtype=torch.float64)
    for app in collector.applications:
        p = torch.sigmoid(model.get_submodule(app.site).p_logit.detach().double())
        neg_entropy = p * torch.log(p) + (1 - p) * torch.log(1 - p)
        if app.consumer_weights:
            k = app.units  # the consumer's input width, set from the weight since before this fix
            for weight in app.consumer_weights:
                squared = model.get_parameter(weight).detach().double().pow(2).sum()
                total = total + scale.weight_regularizer * squared / (1 - p)
        else:
            k = widths[app.site]
        total = total + scale.dropout_regularizer * k * neg_entropy
    return total


def _tiny_vit(**kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        drop_rate=0.1,
        proj_drop_rate=0.1,
        **kwargs,
    )


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _check_right_after_convert(converted: nn.Module, expected_width: int, *args, **kwargs) -> None:
    assert set(_units(converted).values()) == {expected_width}  # every residual site: the feature width
    before = cd_convert.regularization(converted)  # no forward has run: must not raise
    widths = _observed_widths(converted, *args, **kwargs)
    assert {widths[name] for name in _units(converted)} == {expected_width}
    torch.testing.assert_close(before.double(), _formula(converted, widths))
    torch.testing.assert_close(cd_convert.regularization(converted), before)  # after the forward: the same


def test_tiny_vit_regulariser_right_after_convert():
    """timm's ViT: pos_drop (after the position embedding), proj_drop and mlp.drop2 (before residual adds)."""
    converted = cd_convert.convert(_tiny_vit(), dataset_size=1000, fused_attention=False)
    assert {"pos_drop", "blocks.0.attn.proj_drop", "blocks.1.mlp.drop2"} <= set(_units(converted))
    _check_right_after_convert(converted, 192, torch.randn(2, 3, 32, 32))


def test_tiny_bert_regulariser_right_after_convert():
    """BERT's hidden dropouts before LayerNorm(x + residual): width from the transformers dry run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(_tiny_bert(), dataset_size=1000, fused_attention=False)
    assert "bert.encoder.layer.1.output.dropout" in _units(converted)
    _check_right_after_convert(converted, 16, input_ids=torch.randint(0, 50, (2, 7)))


def test_attention_probabilities_keep_learning_their_width_at_the_first_forward():
    """Attention dropout's width is the key length, not a feature: still unknown at conversion, said so, and
    learnt by the first forward (17 tokens: a class token and (32 / 8)^2 patches)."""
    converted = cd_convert.convert(_tiny_vit(attn_drop_rate=0.1), dataset_size=1000)
    units = _units(converted)
    assert units["blocks.0.attn.attn_drop"] is None and units["pos_drop"] == 192
    with pytest.raises(RuntimeError, match="attn_drop"):
        cd_convert.regularization(converted)
    rows = {r.name: r for r in cd_convert.report(converted).sites}
    assert any("first training forward" in note for note in rows["blocks.0.attn.attn_drop"].notes)
    assert not any("first training forward" in note for note in rows["pos_drop"].notes)
    widths = _observed_widths(converted, torch.randn(2, 3, 32, 32))
    assert widths["blocks.0.attn.attn_drop"] == 17
    torch.testing.assert_close(cd_convert.regularization(converted).double(), _formula(converted, widths))


def test_bert_attention_sites_have_no_width_at_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(_tiny_bert(), dataset_size=1000)
    units = _units(converted)
    attention = [name for name in units if name.endswith("self.forward_dropout")]
    assert attention and all(units[name] is None for name in attention)
    assert units["bert.encoder.layer.0.output.dropout"] == 16


class Widths(nn.Module):
    """Residual sites (no consumer) behind producers that fix their width, and some that do not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.pos = nn.Parameter(torch.zeros(1, 3, 6))
        self.conv = nn.Conv2d(3, 5, 1)
        self.after_linear = nn.Dropout(0.1)
        self.after_norm_act = nn.Dropout(0.1)
        self.after_pos_add = nn.Dropout(0.1)
        self.channels = nn.Dropout2d(0.1)
        self.elements_after_conv = nn.Dropout(0.1)
        self.after_reshape = nn.Dropout(0.1)
        self.on_probabilities = nn.Dropout(0.1)

    def forward(self, x, img):
        h = self.fc(x)  # (B, 3, 6)
        h = h + self.after_linear(h)
        g = self.norm(h)
        g = g + self.after_norm_act(F.gelu(g))
        t = h + self.pos
        t = t + self.after_pos_add(t)
        c = self.conv(img)  # (B, 5, H, W)
        c = c + self.channels(c)
        c = c + self.elements_after_conv(c)  # last dim W: the conv does not fix it
        r = h.reshape(h.shape[0], -1)
        r = r + self.after_reshape(r)
        a = torch.softmax(h @ h.transpose(1, 2), dim=-1)  # (B, 3, 3) attention probabilities
        a = self.on_probabilities(a) @ h
        return g.sum() + t.sum() + c.sum() + r.sum() + a.sum()


def _widths_inputs():
    return torch.randn(2, 3, 4), torch.randn(2, 3, 4, 7)


def test_widths_from_producers_without_inputs():
    converted = cd_convert.convert(Widths(), dataset_size=100)
    assert _units(converted) == {
        "after_linear": 6,
        "after_norm_act": 6,
        "after_pos_add": 6,
        "channels": 5,
        "elements_after_conv": None,  # would be W, which only an input fixes
        "after_reshape": None,
        "on_probabilities": None,
    }


def test_widths_from_a_dry_run_are_what_the_first_forward_records():
    x, img = _widths_inputs()
    converted = cd_convert.convert(Widths(), dataset_size=100, example_inputs=(x, img))
    units = _units(converted)
    assert units.pop("on_probabilities") is None  # the key length, not a feature
    widths = _observed_widths(converted, x, img)
    assert units == {name: widths[name] for name in units}
    assert units["elements_after_conv"] == 7 and units["after_reshape"] == 18


def test_unknown_width_still_raises_then_is_learnt():
    """Unchanged where nothing fixes K: the error before the first forward, then K from that forward."""
    model = nn.Sequential(nn.Dropout(0.2), nn.Tanh())
    converted = cd_convert.convert(model, dataset_size=100)
    with pytest.raises(RuntimeError, match="first forward pass"):
        cd_convert.regularization(converted)
    widths = _observed_widths(converted, torch.randn(3, 9))
    assert widths == {"0": 9}
    converted(torch.randn(3, 5))  # a later input of another width does not change K (as before)
    p = float(converted[0].p.detach())
    expected = get_collector(converted).scale.dropout_regularizer * 9 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(cd_convert.regularization(converted).detach()) == pytest.approx(expected, rel=1e-5)


def test_torch_transformer_residual_dropouts_get_d_model_without_inputs():
    """Found by module search (no dry run): dropout1/dropout2 feed residual adds of width d_model."""
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    converted = cd_convert.convert(model, dataset_size=100)
    units = _units(converted)
    assert units["layers.0.dropout1"] == 16 and units["layers.0.dropout2"] == 16
