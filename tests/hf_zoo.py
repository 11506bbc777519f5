"""Tiny Hugging Face transformers models for the converter tests, and a detector for fixed-rate dropout.

Both come from the coverage benchmark (:mod:`benchmarks.transformers_families`,
:mod:`benchmarks.transformers_coverage`), the one source of the tiny configs and of the
detector: every model is built from a tiny config with random weights (nothing is downloaded) and with every
dropout rate its config declares set nonzero, so that each dropout the architecture has is really applied in
training; ``fixed_rate_dropout_calls`` lists each dropout of a forward pass that still draws its mask at a
fixed rate, so a test can check that a converted model has none left. This module adapts them to what the
tests unpack, and checks the detector itself (``_self_check``).

Not a test file itself: tests import it (``from hf_zoo import HF_FAMILIES, ...``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import transformers_families as families
from benchmarks.dropout_detector import fixed_rate_dropout_calls

__all__ = ["CORE_FAMILIES", "HF_FAMILIES", "HFCase", "TESTED_FAMILIES", "fixed_rate_dropout_calls"]

#: The families the slower tests (freeze, converting twice) run on.
CORE_FAMILIES = ["bert", "distilbert", "deberta-v2", "gpt2", "llama", "t5", "bart", "vit", "whisper"]


class HFCase(NamedTuple):
    """What a builder returns; unpacks as ``model, inputs, loss_fn = builder()``."""

    model: nn.Module
    inputs: Dict[str, Any]
    loss_fn: Callable[[Any], torch.Tensor]


def _builder(family: families.Family) -> Callable[[], HFCase]:
    """A zero-argument builder of one benchmark family.

    Args:
        family: the benchmark's family.

    Returns:
        A function returning a fresh model (same weights every call), its keyword inputs and a
        cross-entropy loss of its logits against fixed random targets.
    """

    def build() -> HFCase:
        model, _ = families.build(family)
        return HFCase(model, families.make_inputs(family.inputs, model.config), families.data_loss)

    build.__name__ = f"build_{family.name}"
    return build


#: The benchmark families the tests run on (the benchmark covers more; these keep the suite fast).
TESTED_FAMILIES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta-v2",
    "mpnet",
    "longformer",
    "gpt2",
    "gpt-neo",
    "gpt-j",
    "gpt-neox",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "starcoder2",
    "phi",
    "opt",
    "bloom",
    "falcon",
    "t5",
    "bart",
    "mbart",
    "pegasus",
    "marian",
    "vit",
    "deit",
    "beit",
    "swin",
    "clip",
    "whisper",
    "wav2vec2",
)

_BY_NAME = {family.name: family for family in families.FAMILIES}

#: The tested families of the coverage benchmark, in the order above: name -> builder.
HF_FAMILIES: "OrderedDict[str, Callable[[], HFCase]]" = OrderedDict(
    (name, _builder(_BY_NAME[name])) for name in TESTED_FAMILIES
)


# ---------------------------------------------------------------------------------------------------
# A check of the detector itself


class _Call(nn.Module):
    """``fn(x, inner, training)`` as a module taking ``x``; ``inner`` (a submodule or None) follows its mode."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, Optional[nn.Module], bool], torch.Tensor],
        inner: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.inner, self.training)


def _sdpa(q: torch.Tensor, training: bool, p: float = 0.1, is_causal: bool = False) -> torch.Tensor:
    """Self-attention through F.scaled_dot_product_attention, with dropout_p=p only in training."""
    return F.scaled_dot_product_attention(q, q, q, dropout_p=p if training else 0.0, is_causal=is_causal)


def _self_check() -> None:
    """Assert the detector sees nn.Dropout, F.dropout, SDPA dropout and native_dropout, only in training.

    Each dropout must be reported exactly once in train mode and not at all in eval mode; rate-0
    dropout and plain random noise must not be reported; the caller's RNG state must be left as it was.
    """
    x = {"x": torch.randn(2, 8, 16)}
    q = {"x": torch.randn(2, 2, 8, 4)}
    cases = [
        ("nn.Dropout", _Call(lambda t, m, training: m(t), nn.Dropout(0.1)), x),
        ("F.dropout", _Call(lambda t, m, training: F.dropout(t, 0.1, training)), x),
        ("F.dropout1d", _Call(lambda t, m, training: F.dropout1d(t, 0.1, training)), x),
        ("SDPA", _Call(lambda t, m, training: _sdpa(t, training)), q),
        ("SDPA causal", _Call(lambda t, m, training: _sdpa(t, training, is_causal=True)), q),
        ("native_dropout", _Call(lambda t, m, training: torch.native_dropout(t, 0.1, training)[0]), x),
        (
            "nn.MultiheadAttention",
            _Call(
                lambda t, m, training: m(t, t, t, need_weights=False)[0],
                nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True),
            ),
            x,
        ),
    ]
    # On CPU, SDPA with dropout decomposes into a bernoulli_ draw; on accelerators it reaches a fused
    # kernel carrying dropout_p. Meta tensors run those kernels' shape functions, so check them here.
    meta_q = {"x": torch.randn(2, 2, 8, 4, device="meta")}
    aten = torch.ops.aten
    cases += [
        (
            "efficient-attention kernel",
            _Call(
                lambda t, m, training: aten._scaled_dot_product_efficient_attention(
                    t, t, t, None, False, 0.1 if training else 0.0
                )[0]
            ),
            meta_q,
        ),
        (
            "flash-attention kernel",
            _Call(
                lambda t, m, training: aten._scaled_dot_product_flash_attention(
                    t, t, t, dropout_p=0.1 if training else 0.0
                )[0]
            ),
            meta_q,
        ),
    ]
    for label, module, inputs in cases:
        found = fixed_rate_dropout_calls(module.train(), inputs)
        assert len(found) == 1, f"{label} in train mode: expected 1 fixed dropout, found {found}"
        found = fixed_rate_dropout_calls(module.eval(), inputs)
        assert found == [], f"{label} in eval mode: expected none, found {found}"

    not_dropout = [
        ("nn.Dropout(0)", _Call(lambda t, m, training: m(t), nn.Dropout(0.0)), x),
        ("SDPA dropout_p=0", _Call(lambda t, m, training: _sdpa(t, training, p=0.0)), q),
        ("uniform noise", _Call(lambda t, m, training: t + torch.rand_like(t)), x),
    ]
    for label, module, inputs in not_dropout:
        found = fixed_rate_dropout_calls(module.train(), inputs)
        assert found == [], f"{label}: expected no fixed dropout, found {found}"

    state = torch.random.get_rng_state()
    fixed_rate_dropout_calls(_Call(lambda t, m, training: m(t), nn.Dropout(0.5)).train(), x)
    assert torch.equal(state, torch.random.get_rng_state()), "fixed_rate_dropout_calls moved the RNG"
