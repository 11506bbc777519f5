"""Dropout in forms no kind of site converts is reported, not silently left at its rate; fused attention that
torch.fx cannot see is found by the dry run.

The dry run watches every aten op that draws a fixed-rate mask (``cd_convert.mask_audit``): a mask drawn
outside a dropout module, a functional dropout call, fused attention or a known non-site becomes a report row
("unsupported", with a warning at conversion), and a per-example mask (drop-path) a "not a dropout site" row.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert as cd
from cd_convert.mask_audit import fixed_rate_mask


class _MaskedDropout(torch.autograd.Function):
    """Dropout as a custom autograd function (DeBERTa's ``XDropout`` is written this way)."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty_like(x).bernoulli_(1 - p).bool()
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.masked_fill(~keep, 0.0) * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0.0) * ctx.scale, None


class StableDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        return _MaskedDropout.apply(x, self.drop_prob) if self.training and self.drop_prob > 0 else x


class RandomlySkippedResidual(nn.Module):
    """Stochastic depth written inline: one mask value per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if not self.training:
            return x + self.fc(x)
        keep = x.new_empty(x.shape[0], 1).bernoulli_(0.8) / 0.8
        return x + self.fc(x) * keep


class BranchyAttention(nn.Module):
    """Attention with ``dropout_p`` passed into the fused kernel, in code torch.fx cannot trace (a data-dependent
    branch), like transformers' SDPA attention classes chosen at construction."""

    def __init__(self, dim: int = 8, heads: int = 2, p: float = 0.2) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads, self.attn_p = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, p

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if bool(x.sum() > -1e9):  # data-dependent: fx refuses it
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_p if self.training else 0.0)
        else:
            out = v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _fixed_masks(model: nn.Module, x: torch.Tensor):
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Detector(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if fixed_rate_mask(func, args, kwargs) is not None:
                calls.append(func.__name__.split(".")[0])
            return func(*args, **kwargs)

    with Detector():
        model(x)
    return calls


def _rows(model):
    return {row.name: row for row in cd.report(model).rows}


def test_fixed_rate_mask_recognises_the_aten_forms():
    # Hand-made calls of each op form, checked against the rate each one drops at.
    x = torch.ones(4, 3)
    bernoulli = torch.ops.aten.bernoulli_.float
    assert fixed_rate_mask(bernoulli, (x, 0.75), {}) == (0.25, x)
    assert fixed_rate_mask(bernoulli, (x, 1.0), {}) is None  # keeps everything
    assert fixed_rate_mask(torch.ops.aten.bernoulli.default, (x,), {})[0] is None  # a tensor of probabilities
    assert fixed_rate_mask(torch.ops.aten.native_dropout.default, (x, 0.3, True), {}) == (0.3, x)
    assert fixed_rate_mask(torch.ops.aten.native_dropout.default, (x, 0.3, False), {}) is None
    assert fixed_rate_mask(torch.ops.aten.native_dropout.default, (x, 0.0, True), {}) is None
    assert fixed_rate_mask(torch.ops.aten.add.Tensor, (x, x), {}) is None


def test_a_custom_dropout_is_reported_unsupported_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), StableDropout(0.2), nn.Linear(8, 2), nn.Dropout(0.1))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"1 dropout\(s\) in Sequential cannot be converted .* '1'"):
        converted = cd.convert(model, dataset_size=10, example_inputs=(x,))
    rows = _rows(converted)
    assert rows["1"].status == "unsupported"
    assert "aten.bernoulli_" in rows["1"].original and "p=0.2" in rows["1"].original
    assert "test_mask_audit.py" in rows["1"].original  # where the mask was drawn
    assert rows["3"].status == "converted"  # the nn.Dropout beside it is converted as before
    # The report is true: the custom mask is still drawn in training, the nn.Dropout's is not.
    assert _fixed_masks(converted.train(), x) == ["bernoulli_"]


def test_a_per_example_mask_is_drop_path_and_not_warned_about():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), RandomlySkippedResidual())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = cd.convert(model, dataset_size=10, example_inputs=(torch.randn(3, 8),))
    row = _rows(converted)["2"]
    assert row.status == "not a dropout site"
    assert "per-example mask" in row.original


def test_known_forms_leave_no_finding():
    # nn.Dropout, F.dropout, alpha dropout and nn.MultiheadAttention's own dropout are each a site or a known
    # non-site: the audit adds nothing for them.
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)

        def forward(self, x):
            x = F.alpha_dropout(F.dropout(self.fc(x), 0.1, self.training), 0.1, self.training)
            return self.mha(x, x, x)[0]

    model = nn.Sequential(nn.Dropout(0.1), Functional())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = cd.convert(model, dataset_size=10, example_inputs=(torch.randn(2, 3, 8),))
    statuses = {row.status for row in cd.report(converted).rows}
    assert "unsupported" not in statuses


def test_fused_attention_in_untraceable_code_becomes_a_site():
    torch.manual_seed(0)
    model = nn.Sequential(BranchyAttention(), nn.Linear(8, 2))
    x = torch.randn(2, 5, 8)
    assert _fixed_masks(model.train(), x)  # the original drops inside the fused kernel
    model.eval()
    converted = cd.convert(model, dataset_size=10, example_inputs=(x,))
    rows = [row for row in cd.report(converted).rows if row.kind == "fused"]
    assert [row.status for row in rows] == ["converted"], cd.report(converted)
    assert rows[0].original_p == pytest.approx(0.2)
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    converted.train()
    assert _fixed_masks(converted, x) == []
    converted(x).square().mean().backward()
    (logit,) = [p for n, p in converted.named_parameters() if n.endswith("p_logit")]
    assert logit.grad is not None and logit.grad != 0
