"""Attention calls with a dropout rate, seen in the dry run: ``F.multi_head_attention_forward`` called from a
model's own code (WavLM's form), and where the rate of an SDPA call torch.fx found is read from."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert as cd
from benchmarks.dropout_detector import fixed_rate_dropout_calls

EMBED, HEADS, LENGTH, BATCH = 8, 2, 5, 3


class FunctionAttention(nn.Module):
    """Self-attention through torch's function, with its own projections (as transformers' WavLMAttention)."""

    def __init__(self, dropout: float = 0.2, need_weights: bool = True) -> None:
        super().__init__()
        self.attn_drop = dropout
        self.need_weights = need_weights
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(EMBED, EMBED) for _ in range(3))
        self.out_proj = nn.Linear(EMBED, EMBED)

    def forward(self, x: torch.Tensor, training=None) -> torch.Tensor:  # x: (L, B, E)
        out, _ = F.multi_head_attention_forward(
            x,
            x,
            x,
            EMBED,
            HEADS,
            None,
            torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)),
            None,
            None,
            False,
            self.attn_drop,
            self.out_proj.weight,
            self.out_proj.bias,
            self.training if training is None else training,
            need_weights=self.need_weights,
            use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
        )
        return out


class Net(nn.Module):
    def __init__(self, need_weights: bool = True) -> None:
        super().__init__()
        self.attention = FunctionAttention(need_weights=need_weights)
        self.head = nn.Linear(EMBED, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # keyword input: the dropout detector calls model(**inputs)
        return self.head(self.attention(x))


def _converted(need_weights: bool = True):
    torch.manual_seed(0)
    original = Net(need_weights)
    model = Net(need_weights)
    model.load_state_dict(original.state_dict())
    x = torch.randn(LENGTH, BATCH, EMBED)
    return original, cd.convert(model, example_inputs=(x,), dataset_size=100), x


def _site_name(model: nn.Module) -> str:
    rows = [r for r in cd.report(model).rows if r.status == "converted"]
    assert [(r.kind, r.original) for r in rows] == [
        ("fused", "F.multi_head_attention_forward in FunctionAttention.forward")
    ]
    return rows[0].name


@pytest.mark.parametrize("need_weights", [True, False])
def test_the_rate_passed_to_torchs_attention_function_becomes_a_learned_site(need_weights):
    original, model, x = _converted(need_weights)
    site = model.get_submodule(_site_name(model))
    assert site.p.item() == pytest.approx(0.2)
    model.train()
    assert fixed_rate_dropout_calls(model, {"x": x}) == []  # torch's fixed-rate dropout no longer runs
    torch.manual_seed(1)
    model(x).square().mean().backward()
    assert site.p_logit.grad is not None and site.p_logit.grad != 0 and torch.isfinite(site.p_logit.grad)
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))  # eval: torch's function as the original code calls it


def test_the_site_drops_the_attention_probabilities_and_nothing_else():
    # An independent computation of the training forward: with the site's input and output captured, the output
    # must be softmax(q k^T / sqrt(d)) -> [site] -> @ v -> out_proj -> head, written out here by hand.
    _, model, x = _converted()
    site = model.get_submodule(_site_name(model))
    seen = {}
    site.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    model.train()
    y = model(x)
    attention = model.attention
    head_dim = EMBED // HEADS

    def heads(t):  # (L, B, E) -> (B * H, L, d), as torch's function arranges them
        return t.reshape(LENGTH, BATCH * HEADS, head_dim).transpose(0, 1)

    q, k, v = (heads(proj(x)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    probabilities = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
    torch.testing.assert_close(seen["inp"].reshape(probabilities.shape), probabilities)
    assert not torch.equal(seen["out"], seen["inp"])  # a mask was applied
    mixed = (seen["out"].reshape(probabilities.shape) @ v).transpose(0, 1).reshape(LENGTH, BATCH, EMBED)
    torch.testing.assert_close(y, model.head(attention.out_proj(mixed)))


def test_monte_carlo_samples_differ_and_an_explicit_training_false_is_kept():
    original, model, x = _converted()
    with torch.no_grad(), cd.mc_mode(model):
        first, second = model(x), model(x)
    assert not torch.equal(first, second)
    model.train()
    original.train()
    with torch.no_grad():  # the call's own training=False drops nothing, as in the original model
        assert torch.equal(model.attention(x, training=False), original.attention(x, training=False))


def test_freeze_writes_the_learned_rate_where_the_call_reads_it_and_unconvert_restores_the_method():
    _, model, x = _converted()
    site = model.get_submodule(_site_name(model))
    with torch.no_grad():
        site.p_logit.fill_(math.log(0.3 / 0.7))
    frozen = cd.freeze(model)
    assert frozen.attention.attn_drop == pytest.approx(0.3)
    assert "forward" not in vars(frozen.attention)  # the class's own method again
    model2 = _converted()[1]
    cd.unconvert(model2)
    assert "forward" not in vars(model2.attention) and model2.attention.attn_drop == 0.2


class OwnMultiheadAttention(nn.MultiheadAttention):
    """A subclass whose forward, in user code, calls torch's function itself."""

    def forward(self, x):
        return F.multi_head_attention_forward(
            x,
            x,
            x,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            None,
            None,
            False,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            self.training,
        )


@pytest.mark.parametrize("attention_type", [nn.MultiheadAttention, OwnMultiheadAttention])
def test_multihead_attention_modules_keep_their_own_kind(attention_type):
    # nn.MultiheadAttention (and a subclass) call the same torch function from their forward: one site of the
    # module's kind, not a second one for the call.
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = attention_type(EMBED, HEADS, dropout=0.1)

        def forward(self, x):
            return self.mha(x, x, x)[0] if attention_type is nn.MultiheadAttention else self.mha(x)[0]

    model = cd.convert(Wrap(), example_inputs=(torch.randn(LENGTH, BATCH, EMBED),), dataset_size=100)
    rows = [(r.name, r.kind, r.original) for r in cd.report(model).rows if r.status == "converted"]
    name = type(model.mha).__name__
    assert rows == [("mha.forward_attn_dropout", "fused", f"MultiheadAttention in {name}.forward")]


class AmbiguousRateAttention(nn.Module):
    """SDPA attention as transformers 4.x's AST writes it: the rate in ``attention_probs_dropout_prob`` and, unused on
    this path, a dropout module of the same rate (by value the two cannot be told apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.dropout = nn.Dropout(0.2)
        self.attention_probs_dropout_prob = 0.2

    def forward(self, x):  # (B, L, E); traceable by torch.fx
        q, k, v = self.qkv(x).reshape(BATCH, LENGTH, 3, HEADS, EMBED // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, None, self.attention_probs_dropout_prob if self.training else 0.0)
        return out.transpose(1, 2).reshape(BATCH, LENGTH, EMBED)


def test_freeze_writes_an_fx_found_attention_rate_to_the_attribute_the_call_reads():
    model = cd.convert(AmbiguousRateAttention(), example_inputs=(torch.randn(BATCH, LENGTH, EMBED),), dataset_size=100)
    (row,) = [r for r in cd.report(model).rows if r.status == "converted"]
    assert (row.kind, row.found_by) == ("fused", "fx")
    with torch.no_grad():
        model.get_submodule(row.name).p_logit.fill_(math.log(0.3 / 0.7))
    frozen = cd.freeze(model)
    assert frozen.attention_probs_dropout_prob == pytest.approx(0.3) and frozen.dropout.p == 0.2
