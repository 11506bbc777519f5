"""transformers families that choose their attention class when the model is built (transformers 4.x).

Before the attention-interface refactor, a family picked one attention class per implementation from a table in
its modeling module (``{"eager": ..., "sdpa": ..., "flash_attention_2": ...}``; DistilBERT and BERT in
transformers 4.57, most families in 4.46). The class then runs its implementation whatever the config says
later, while the model still builds its attention masks in the format of the configured implementation. cd_convert
switches configs to eager attention for its dry run (and, while an attention site is active, for training); on
such a model that switch gives an SDPA class the 2-D mask of eager attention and the forward fails. The toy
family here mirrors DistilBERT's code in transformers 4.57, so that the installed transformers version does not
matter: its dropout is passed as ``dropout_p`` to ``scaled_dot_product_attention`` and must become a fused
attention site.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import cd_convert as cd  # noqa: E402
from cd_convert.integrations import transformers as hf  # noqa: E402

HIDDEN, HEADS, VOCAB = 8, 2, 16


class ToyConfig(transformers.PretrainedConfig):
    model_type = "cd_convert_toy_fixed_attention"

    def __init__(self, attention_dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.attention_dropout = attention_dropout


class EagerAttention(nn.Module):
    """Eager attention: takes the 2-D 0/1 padding mask and applies its dropout module to the probabilities."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        return (self.dropout(scores.softmax(-1)) @ v).transpose(1, 2).flatten(2)


class SdpaAttention(EagerAttention):
    """SDPA attention, as DistilBERT's ``DistilBertSdpaAttention``: the rate goes in as ``dropout_p``."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        return out.transpose(1, 2).flatten(2)


#: The family's table: the class is chosen from it when the model is built.
TOY_ATTENTION_CLASSES = {"eager": EagerAttention, "sdpa": SdpaAttention}


class ToyModel(transformers.PreTrainedModel):
    config_class = ToyConfig
    _supports_sdpa = True

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attention = TOY_ATTENTION_CLASSES[config._attn_implementation](config)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The mask's format follows the config, as DistilBertModel.forward's does.
        if self.config._attn_implementation == "eager":
            mask = attention_mask
        else:
            mask = attention_mask[:, None, None, :].bool()
        return self.head(self.attention(self.embed(input_ids), mask).mean(dim=1))


def _model(implementation: str) -> ToyModel:
    torch.manual_seed(0)
    config = ToyConfig()
    config._attn_implementation = implementation
    return ToyModel(config)


def _inputs():
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_the_class_table_names_the_implementation_each_class_was_built_for():
    assert hf._class_implementation(SdpaAttention) == "sdpa"
    assert hf._class_implementation(EagerAttention) == "eager"
    assert hf._class_implementation(nn.Linear) is None
    assert hf._built_for_another_implementation(_model("sdpa"))
    assert not hf._built_for_another_implementation(_model("eager"))


def test_a_model_built_with_sdpa_classes_converts_and_trains_on_its_sdpa_path():
    model, inputs = _model("sdpa"), _inputs()
    with torch.no_grad():
        expected = model.eval()(**inputs)
    converted = cd.convert(model.train(), dataset_size=100, example_inputs=inputs)
    rows = {row.name: row for row in cd.report(converted).rows}
    attention = [row for row in rows.values() if row.kind == "fused"]
    assert len(attention) == 1 and attention[0].status == "converted", rows
    assert model.config._attn_implementation == "sdpa"  # the dry run left the config as it was
    site = next(m for m in converted.modules() if isinstance(m, cd.ConcreteDropoutBase))
    loss = F.cross_entropy(converted.train()(**inputs), torch.tensor([0, 1, 1])) + cd.regularization(converted)
    loss.backward()
    assert site.p_logit.grad is not None and site.p_logit.grad.abs() > 0
    with torch.no_grad():
        assert torch.equal(converted.eval()(**inputs), expected)


def test_the_eager_build_of_the_same_family_keeps_its_dropout_module_site():
    model, inputs = _model("eager"), _inputs()
    converted = cd.convert(model.train(), dataset_size=100, example_inputs=inputs)
    kinds = sorted(row.kind for row in cd.report(converted).rows if row.status == "converted")
    assert kinds == ["module"]
