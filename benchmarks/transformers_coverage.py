"""Coverage of cd_convert over Hugging Face transformers families, and what explicit attention costs.

    python -m benchmarks.transformers_coverage [--families bert,llama] [--json PATH] [--memory]

**Coverage** (default). Each family is built from a tiny config with random weights (nothing is downloaded),
with its task head (sequence or token classification, causal LM, conditional generation, image classification,
CTC) and with every dropout rate its config declares set nonzero (attention 0.15, activation 0.05, classifier /
final 0.2, embedding 0.12, others 0.1; sub-configs too), so that every dropout the architecture has is really
applied in training. LayerDrop, stochastic depth (``drop_path_rate``) and SpecAugment stay off: they
are not dropout masks. Then:

* it is converted with :func:`cd_convert.convert` and *no example inputs* (cd_convert builds its dry-run
  inputs from the config), timed; from :func:`cd_convert.report`: the sites by kind, the rows whose rate is
  read by a site elsewhere (``rate read``), the other rows by status (``not called``, ``left fused``,
  ``unsupported``, ``skipped (p=0)`` ...), and the sites with a consumer weight (the regulariser's weight
  terms);
* (a) **no fixed dropout**: one training forward of the converted model under a ``TorchDispatchMode`` that
  lists every aten op still drawing a mask at a fixed rate: ``bernoulli``/``bernoulli_`` with a keep
  probability below 1 (what ``F.dropout`` and the CPU math path of SDPA decompose into) or with a tensor of
  probabilities, ``native_dropout`` / ``dropout`` / ``feature_dropout`` with p > 0, and any
  scaled-dot-product-attention kernel with ``dropout_p`` > 0. The same count for the unconverted model in
  training is shown, so that the check is not vacuous;
* (b) **grads**: after backward of the data loss alone (cross-entropy of the logits against random targets)
  every ``p_logit`` has a nonzero, finite gradient;
* (c) **eval equal**: every output tensor of the converted model in eval is ``torch.equal`` to the
  unconverted model's;
* (d) **freeze equal**: the same for :func:`cd_convert.freeze` of the converted model.

Failures are reported, never worked around: a family that transformers cannot build (or run) here is
``not built`` with the reason, a family where ``convert`` raises is ``convert failed``, and a failed check
marks the family ``FAIL``; the error texts follow the table.

**Memory** (``--memory``). For a BERT-base-shaped encoder and a Llama-shaped decoder (hidden 768, 12 heads,
``--memory-layers`` layers, vocabulary 1024 so that the transformer body dominates, config-default dropout:
BERT 0.1 everywhere, Llama attention 0.0) at batch 4 and each ``--seq-lens`` length, one training
forward + backward (loss plus ``cd_convert.regularization`` for the converted models) of three models with
the same weights:

* ``unconverted``: the model itself, SDPA attention;
* ``converted``: the default conversion (attention dropout learned, so eager attention while training;
  Llama's rate-0 attention dropout is learned too, starting at 0.1);
* ``fused_attention=False``: attention dropout kept at its fixed rate inside the fused kernel.

Memory is the bytes autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``
(unique storages, each counted once, parameters excluded); time is the median of ``--repeats`` interleaved
samples (the order rotates each repeat). Both are printed as ratios to ``unconverted``. On the CPU, SDPA
with ``dropout_p`` > 0 takes its math path in training, which keeps the attention matrices too: there the
BERT ratios understate what explicit attention costs against a fused GPU kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cd_convert
from benchmarks.common import Timeout, guard
from benchmarks.overhead import SavedTensorCounter

BATCH = 2
SEQ = 8
VOCAB = 100
LABELS = 3
IMAGE = 32
PATCH = 8
AUDIO_SAMPLES = 400
MIB = 1024.0**2

# ------------------------------------------------------------------------------------------------ families


def _body(hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64, **fields: Any) -> Dict[str, Any]:
    """The body fields that most configs name alike (BERT's names), with further fields.

    Args:
        hidden: ``hidden_size``.
        layers: ``num_hidden_layers``.
        heads: ``num_attention_heads``.
        ffn: ``intermediate_size``, the feed-forward width.
        **fields: any other config fields (vocabulary, positions, special-token ids ...).

    Returns:
        Keyword arguments for a config class (or a sub-config dict).
    """
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, **fields
    )


#: Input fields of the patch-based image encoders (ViT and CLIP's vision tower).
_IMAGE_INPUT = dict(image_size=IMAGE, patch_size=PATCH, num_channels=3)
#: Config of the BERT-like encoders.
_BERT = _body(vocab_size=VOCAB, max_position_embeddings=64, num_labels=LABELS, pad_token_id=1)
#: Config of the Llama-like decoders (grouped-query attention: 4 query heads, 2 key/value heads).
_LLAMA = _body(
    vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
#: Config of the GPT-2-like decoders, which name their fields n_*.
_GPT2 = dict(
    vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=1, eos_token_id=2
)
#: Body of the BART-like encoder-decoders (Whisper's too); LayerDrop skips whole layers, no dropout mask: off.
_ENCODER_DECODER = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_layerdrop=0.0,
    decoder_layerdrop=0.0,
)
#: Config of the BART-like encoder-decoders, without their special-token ids.
_BART = dict(_ENCODER_DECODER, max_position_embeddings=64)
#: Special-token ids of BART and mBART.
_BART_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
#: Config of the ViT-like image classifiers.
_VIT = _body(num_labels=LABELS, **_IMAGE_INPUT)


@dataclass(frozen=True)
class Family:
    """A transformers family: the model and config classes (by name), the config's shape, the input kind.

    ``inputs`` is one of ``text``, ``causal``, ``seq2seq``, ``image``, ``text-image``, ``speech-seq2seq``,
    ``audio`` (see :func:`make_inputs`).
    """

    name: str
    model_class: str
    config_class: str
    config: Dict[str, Any]
    inputs: str


FAMILIES: List[Family] = [
    Family("bert", "BertForSequenceClassification", "BertConfig", _BERT, "text"),
    Family("roberta", "RobertaForSequenceClassification", "RobertaConfig", _BERT, "text"),
    Family("xlm-roberta", "XLMRobertaForSequenceClassification", "XLMRobertaConfig", _BERT, "text"),
    Family(
        "distilbert",
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        dict(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            num_labels=LABELS,
        ),
        "text",
    ),
    Family("albert", "AlbertForSequenceClassification", "AlbertConfig", dict(_BERT, embedding_size=16), "text"),
    Family("electra", "ElectraForSequenceClassification", "ElectraConfig", dict(_BERT, embedding_size=16), "text"),
    # cls_dropout is no declared field: DeBERTa's classifier reads it with getattr.
    Family(
        "deberta-v2",
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        dict(
            _BERT,
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=8,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            pooler_hidden_size=32,
            cls_dropout=0.0,
        ),
        "text",
    ),
    Family("mpnet", "MPNetForSequenceClassification", "MPNetConfig", _BERT, "text"),
    # Token classification, not sequence classification: the CLS token attends globally, so its output does
    # not depend on the last layer's local attention dropout, whose rate would get no gradient from a CLS loss.
    Family(
        "longformer", "LongformerForTokenClassification", "LongformerConfig", dict(_BERT, attention_window=4), "text"
    ),
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config", _GPT2, "causal"),
    Family(
        "gpt-neo",
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal",
    ),
    Family("gpt-j", "GPTJForCausalLM", "GPTJConfig", dict(_GPT2, rotary_dim=4), "causal"),
    Family(
        "gpt-neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(_LLAMA, num_key_value_heads=None, rotary_pct=0.5),
        "causal",
    ),
    Family("llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA, "causal"),
    Family("mistral", "MistralForCausalLM", "MistralConfig", dict(_LLAMA, sliding_window=None), "causal"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA, "causal"),
    Family("gemma", "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA, head_dim=8), "causal"),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(_LLAMA, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
        "causal",
    ),
    Family("phi", "PhiForCausalLM", "PhiConfig", dict(_LLAMA, partial_rotary_factor=0.5), "causal"),
    Family(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            layerdrop=0.0,
        ),
        "causal",
    ),
    Family(
        "bloom",
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "causal",
    ),
    Family(
        "falcon",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal",
    ),
    Family(
        "t5",
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    Family("bart", "BartForConditionalGeneration", "BartConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family("mbart", "MBartForConditionalGeneration", "MBartConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family(
        "pegasus",
        "PegasusForConditionalGeneration",
        "PegasusConfig",
        dict(_BART, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1),
        "seq2seq",
    ),
    Family(
        "marian",
        "MarianMTModel",
        "MarianConfig",
        dict(
            _BART,
            decoder_vocab_size=VOCAB,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            forced_eos_token_id=2,
        ),
        "seq2seq",
    ),
    Family("vit", "ViTForImageClassification", "ViTConfig", _VIT, "image"),
    Family("deit", "DeiTForImageClassification", "DeiTConfig", _VIT, "image"),
    Family("beit", "BeitForImageClassification", "BeitConfig", dict(_VIT, drop_path_rate=0.0), "image"),
    Family(
        "swin",
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=IMAGE,
            patch_size=4,
            num_channels=3,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
            mlp_ratio=2.0,
            num_labels=LABELS,
            drop_path_rate=0.0,
        ),
        "image",
    ),
    Family(
        "clip",
        "CLIPModel",
        "CLIPConfig",
        dict(
            projection_dim=16,
            text_config=_body(
                projection_dim=16,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
            ),
            vision_config=_body(projection_dim=16, **_IMAGE_INPUT),
        ),
        "text-image",
    ),
    # 8 mel bins x 16 frames (the encoder's two convolutions halve them to max_source_positions); the
    # special-token ids lie inside the tiny vocabulary. SpecAugment is no dropout mask: off.
    Family(
        "whisper",
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        dict(
            _ENCODER_DECODER,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            apply_spec_augment=False,
        ),
        "speech-seq2seq",
    ),
    Family(
        "wav2vec2",
        "Wav2Vec2ForCTC",
        "Wav2Vec2Config",
        _body(
            vocab_size=VOCAB,
            conv_dim=(16, 16),
            conv_kernel=(10, 3),
            conv_stride=(5, 2),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            pad_token_id=0,
            layerdrop=0.0,
            apply_spec_augment=False,
            mask_time_prob=0.0,
        ),
        "audio",
    ),
]

# ----------------------------------------------------------------------------------------- building a family

#: Config fields that look like rates but are not dropout masks (whole layers, residual branches).
_NOT_DROPOUT = ("layerdrop", "drop_path")


def is_dropout_field(key: str) -> bool:
    """Whether a config field holds a dropout rate (``hidden_dropout_prob``, ``attn_pdrop``, ``cls_dropout`` ...)."""
    key = key.lower()
    return ("dropout" in key or "pdrop" in key) and not any(word in key for word in _NOT_DROPOUT)


def rate_for(key: str) -> float:
    """The rate given to a dropout field, by what its name says it drops (distinct, so rows can be told apart)."""
    key = key.lower()
    if "att" in key:
        return 0.15
    if "act" in key:
        return 0.05
    if any(word in key for word in ("classif", "cls", "final", "qa_", "pooler")):
        return 0.2
    if "emb" in key:
        return 0.12
    return 0.1


def set_dropout_rates(config: Any) -> List[str]:
    """Set every dropout-rate field of ``config`` and of its sub-configs nonzero; returns the fields set."""
    configs = [("", config)]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            configs.append((key + ".", sub))
    set_fields = []
    for prefix, cfg in configs:
        for key, value in cfg.to_dict().items():
            numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if is_dropout_field(key) and numeric:
                setattr(cfg, key, rate_for(key))
                set_fields.append(prefix + key)
    return set_fields


def instantiate(model_cls: type, config: Any) -> nn.Module:
    """``model_cls(config)`` with random weights from seed 0, with SDPA attention where the class supports it.

    Args:
        model_cls: a transformers model class.
        config: its config; ``_attn_implementation`` is set on it.

    Returns:
        The model, the same on every call with the same config.
    """
    if getattr(model_cls, "_supports_sdpa", False):
        config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(config)


def build(family: Family) -> Tuple[nn.Module, List[str]]:
    """The family's model with random weights and every dropout rate nonzero, SDPA attention where supported.

    Args:
        family: the family to build.

    Returns:
        The model (in training mode, the same on every call) and the dropout fields set (see
        :func:`set_dropout_rates`).
    """
    import transformers

    model_cls = getattr(transformers, family.model_class)
    config = getattr(transformers, family.config_class)(**family.config)
    fields = set_dropout_rates(config)
    return instantiate(model_cls, config), fields


def make_inputs(kind: str, config: Any) -> Dict[str, Any]:
    """Keyword arguments of one forward (seeded); token ids avoid ids 0-2 (pad/bos/eos in the configs)."""
    generator = torch.Generator().manual_seed(1)

    def tokens() -> torch.Tensor:
        return torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)

    def pixels() -> torch.Tensor:
        return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)

    if kind == "text":
        return {"input_ids": tokens()}
    if kind == "causal":
        return {"input_ids": tokens(), "use_cache": False}
    if kind == "seq2seq":
        return {"input_ids": tokens(), "decoder_input_ids": tokens(), "use_cache": False}
    if kind == "image":
        return {"pixel_values": pixels()}
    if kind == "text-image":
        return {"input_ids": tokens(), "pixel_values": pixels()}
    if kind == "speech-seq2seq":
        frames = 2 * config.max_source_positions  # the encoder insists on exactly this many frames
        features = torch.randn(BATCH, config.num_mel_bins, frames, generator=generator)
        return {"input_features": features, "decoder_input_ids": tokens(), "use_cache": False}
    if kind == "audio":
        return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=generator)}
    raise ValueError(f"unknown input kind {kind!r}")


def output_tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor in a model output (ModelOutput, tuple, dict, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in output_tensors(value)]
    return []


def data_loss(output: Any) -> torch.Tensor:
    """Cross-entropy of the logits (classes last) against random targets drawn from a fixed seed."""
    logits = next(
        (getattr(output, name) for name in ("logits", "logits_per_image") if getattr(output, name, None) is not None),
        None,
    )
    if logits is None:
        logits = output_tensors(output)[0]
    generator = torch.Generator().manual_seed(2)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


# ------------------------------------------------------------------------------------- fixed-dropout detector
#
# What a dispatch mode sees (torch 2.14): F.dropout / nn.Dropout are CompositeImplicitAutograd, so on the CPU
# they arrive decomposed into ``aten.bernoulli_.float(mask, 1 - p)`` then a div and a mul; on CUDA (fused
# kernel) as ``aten.native_dropout(x, p, train)``. F.scaled_dot_product_attention with dropout_p > 0 takes the
# math path on the CPU, decomposed the same way (one ``bernoulli_`` on the attention probabilities); on an
# accelerator it reaches a fused kernel such as ``aten._scaled_dot_product_efficient_attention`` that carries
# ``dropout_p``. The composite ops (aten.dropout, feature_dropout, alpha_dropout, scaled_dot_product_attention)
# are matched too, for dispatch levels that see them undecomposed. Kernels run inside the mode do not re-enter
# it, so each dropout is listed once, whichever way it arrives.

#: aten ops whose schema carries the drop rate ``p`` (and maybe a ``train`` flag).
_DROPOUT_OPS = frozenset(
    {
        "native_dropout",
        "dropout",
        "dropout_",
        "feature_dropout",
        "feature_dropout_",
        "alpha_dropout",
        "alpha_dropout_",
        "feature_alpha_dropout",
        "feature_alpha_dropout_",
    }
)


def _argument(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], name: str) -> Any:
    """The value an aten op was called with for its schema argument ``name`` (the default when omitted)."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            if index < len(args) and not argument.kwarg_only:
                return args[index]
            return argument.default_value if argument.has_default_value() else None
    return None


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else "?"


def fixed_dropout(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Whether an aten op call draws a dropout mask at a fixed nonzero rate.

    Args:
        func: the aten op overload, as a dispatch mode receives it.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        A one-line description of the dropout (op, rate, input shape), or None when the call drops nothing
        at a fixed rate: ``native_dropout`` / ``dropout`` / ``feature_dropout`` (and the alpha variants) with
        p > 0 and train not False; a ``bernoulli`` draw with a keep probability below 1 or a tensor of
        probabilities; a scaled-dot-product-attention kernel with ``dropout_p`` > 0.
    """
    namespace, _, name = func._schema.name.partition("::")
    if namespace != "aten":
        return None
    op = f"aten.{func.__name__}"
    if name in _DROPOUT_OPS:
        # native_dropout's train=None means training.
        p, train = _argument(func, args, kwargs, "p"), _argument(func, args, kwargs, "train")
        return None if train is False or not p else f"{op} p={float(p):g} on {_shape(args[0])}"
    if name in ("bernoulli", "bernoulli_"):
        keep = _argument(func, args, kwargs, "p")  # the probability of a 1, i.e. of keeping
        if keep is None or isinstance(keep, torch.Tensor):
            return f"{op} with a tensor of probabilities on {_shape(args[0])}"
        return None if float(keep) >= 1.0 else f"{op} p={1.0 - float(keep):g} on {_shape(args[0])}"
    if "scaled_dot_product" in name and "attention" in name and not name.endswith("_backward"):
        p = _argument(func, args, kwargs, "dropout_p")
        return f"{op} dropout_p={float(p):g} on q{_shape(args[0])}" if p else None
    return None


class FixedDropoutDetector(TorchDispatchMode):
    """Lists every aten op run inside it that drops at a fixed rate (see :func:`fixed_dropout`) in ``calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        found = fixed_dropout(func, args, kwargs)
        if found is not None:
            self.calls.append(found)
        return func(*args, **kwargs)


def fixed_rate_dropout_calls(model: nn.Module, inputs: Dict[str, Any]) -> List[str]:
    """The fixed-rate dropouts of one forward ``model(**inputs)``, in the model's current train/eval mode.

    The pass runs without grad and on a fork of the CPU RNG, so the caller's random state is left as it was.

    Args:
        model: the model to run.
        inputs: its keyword inputs.

    Returns:
        One description per aten op that drew a mask at a fixed nonzero rate (see :func:`fixed_dropout`).
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad(), FixedDropoutDetector() as detector:
        model(**inputs)
    return detector.calls


# ---------------------------------------------------------------------------------------------- the checks


def error_text(err: BaseException) -> str:
    """``Type: message`` with the message on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass
class Check:
    """One check's outcome: passed or not, and a short text for the table."""

    ok: bool
    text: str


@dataclass
class FamilyResult:
    """Everything measured for one family (one JSON record; one table row)."""

    name: str
    result: str = ""  # pass / FAIL / not built / convert failed
    reason: str = ""
    dropout_fields: List[str] = field(default_factory=list)
    sites_by_kind: Dict[str, int] = field(default_factory=dict)
    rate_read: int = 0
    weight_terms: int = 0
    other_rows: Dict[str, int] = field(default_factory=dict)
    convert_s: Optional[float] = None
    original_fixed_dropout: Optional[int] = None
    checks: Dict[str, Check] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    report_notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, check: str, text: str, detail: str) -> None:
        """Record a failed check, with its short table text and its full error text."""
        self.checks[check] = Check(False, text)
        self.errors.append(f"{check}: {detail}")


CHECKS = ("no fixed dropout", "grads", "eval equal", "freeze equal")


def compare_outputs(reference: List[torch.Tensor], output: List[torch.Tensor]) -> Tuple[bool, str]:
    """Whether two output lists are ``torch.equal`` tensor by tensor; the table text and, if not, why."""
    if len(reference) != len(output):
        return False, f"{len(output)} output tensors, the original has {len(reference)}"
    differ = [(a, b) for a, b in zip(reference, output) if not torch.equal(a, b)]
    if not differ:
        return True, f"yes ({len(output)} tensors)"
    diffs = [float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("nan") for a, b in differ]
    return False, f"{len(differ)}/{len(output)} tensors differ, max abs diff {max(diffs):.3g}"


def run_family(family: Family, args: argparse.Namespace) -> FamilyResult:
    """Build, convert and check one family; every failure is caught and recorded, none is worked around."""
    res = FamilyResult(family.name)
    start = time.perf_counter()
    try:
        with guard(args.timeout):
            _run_family(family, args, res)
    except Timeout as err:
        res.errors.append(f"time guard: {err}")
        res.result = res.result or "FAIL"
    res.seconds = round(time.perf_counter() - start, 2)
    if not res.result:
        res.result = "pass" if all(c.ok for c in res.checks.values()) and len(res.checks) == len(CHECKS) else "FAIL"
    return res


def _run_family(family: Family, args: argparse.Namespace, res: FamilyResult) -> None:
    try:
        original, res.dropout_fields = build(family)
        inputs = make_inputs(family.inputs, original.config)
        original.eval()
        with torch.no_grad():
            reference = output_tensors(original(**inputs))
        res.original_fixed_dropout = len(fixed_rate_dropout_calls(original.train(), inputs))
        original.eval()
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - reported as "not built"
        res.result, res.reason = "not built", error_text(err)
        return

    try:
        t0 = time.perf_counter()
        converted = cd_convert.convert(original, dataset_size=args.dataset_size)
        res.convert_s = time.perf_counter() - t0
        report = cd_convert.report(converted)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - a cd_convert failure: the point of the benchmark
        res.result, res.reason = "convert failed", error_text(err)
        res.errors.append("convert: " + "".join(traceback.format_exception_only(type(err), err)).strip())
        return
    res.report_notes = list(report.notes)
    sites = report.sites
    res.sites_by_kind = dict(sorted(Counter(r.kind for r in sites).items()))
    res.weight_terms = sum(1 for r in sites if r.consumer)
    res.rate_read = sum(1 for r in report.rows if r.status == "rate read")
    res.other_rows = dict(
        sorted(Counter(r.status for r in report.rows if r not in sites and r.status != "rate read").items())
    )

    _check_training(converted, inputs, res)
    _check_eval(converted, inputs, reference, res, "eval equal")
    try:
        frozen = cd_convert.freeze(converted)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail("freeze equal", "freeze raised", error_text(err))
        return
    _check_eval(frozen, inputs, reference, res, "freeze equal")


def _check_training(converted: nn.Module, inputs: Dict[str, Any], res: FamilyResult) -> None:
    """Checks (a) and (b): one training forward under the detector, backward of the data loss alone."""
    converted.train()
    converted.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    try:
        with FixedDropoutDetector() as detector:
            output = converted(**inputs)
        loss = data_loss(output)
        loss.backward()
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail("no fixed dropout", "forward raised", error_text(err))
        res.fail("grads", "forward raised", error_text(err))
        return
    if detector.calls:
        res.fail(
            "no fixed dropout",
            f"NO: {len(detector.calls)} left",
            f"{len(detector.calls)} fixed-rate dropout op(s) in training, e.g. " + "; ".join(detector.calls[:3]),
        )
    elif not res.original_fixed_dropout:
        res.fail("no fixed dropout", "original has none", "the unconverted model applies no dropout in training")
    else:
        res.checks["no fixed dropout"] = Check(True, f"yes (was {res.original_fixed_dropout})")

    logits = [(n, p) for n, p in converted.named_parameters() if n.endswith("p_logit")]
    silent = [
        n
        for n, p in logits
        if p.grad is None or not bool(torch.isfinite(p.grad).all()) or not bool(p.grad.abs().sum() > 0)
    ]
    if not logits:
        res.fail("grads", "no p_logit", "the converted model has no p_logit parameter")
    elif silent:
        res.fail(
            "grads",
            f"NO: {len(silent)}/{len(logits)}",
            f"{len(silent)}/{len(logits)} p_logit without a nonzero finite gradient: " + ", ".join(silent[:4]),
        )
    else:
        res.checks["grads"] = Check(True, f"yes ({len(logits)})")


def _check_eval(
    model: nn.Module, inputs: Dict[str, Any], reference: List[torch.Tensor], res: FamilyResult, check: str
) -> None:
    """Checks (c) and (d): eval output tensor by tensor ``torch.equal`` to the unconverted model's."""
    model.eval()
    try:
        with torch.no_grad():
            output = output_tensors(model(**inputs))
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail(check, "forward raised", error_text(err))
        return
    ok, text = compare_outputs(reference, output)
    if ok:
        res.checks[check] = Check(True, text)
    else:
        res.fail(check, "NO", text)


# ----------------------------------------------------------------------------------------- coverage output


def _counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def print_coverage(results: List[FamilyResult]) -> None:
    """The markdown table, the error texts and the summary line."""
    header = (
        "family",
        "sites by kind",
        "rate read",
        "weight terms",
        "left fused/other",
        *CHECKS,
        "convert s",
        "result",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        if r.result in ("not built", "convert failed"):
            cells = [r.result] + ["-"] * (len(header) - 3)
        else:
            n_sites = sum(r.sites_by_kind.values())
            cells = [
                f"{n_sites}: {_counts(r.sites_by_kind)}",
                str(r.rate_read),
                f"{r.weight_terms}/{n_sites}",
                _counts(r.other_rows),
            ]
            cells += [r.checks[c].text if c in r.checks else "-" for c in CHECKS]
            cells.append(f"{r.convert_s:.2f}" if r.convert_s is not None else "-")
        print("| " + " | ".join([r.name, *cells, r.result]) + " |")
    print()
    for r in results:
        if r.result == "not built":
            print(f"- {r.name}: not built: {r.reason}")
        for error in r.errors:
            print(f"- {r.name}: {error}")
        if r.result == "FAIL":
            for note in r.report_notes:
                print(f"  - report note: {note}")
    passed = sum(r.result == "pass" for r in results)
    by_result = Counter(r.result for r in results)
    print(f"\n{passed} / {len(results)} families pass ({', '.join(f'{k} {v}' for k, v in sorted(by_result.items()))})")


# ------------------------------------------------------------------------------------------------- memory


MEMORY_VARIANTS = ("unconverted", "converted", "fused_attention=False")
MEMORY_HEADS = 12
MEMORY_VOCAB = 1024


def memory_models(shape: str, layers: int, dataset_size: int) -> Tuple[Dict[str, nn.Module], str]:
    """The three models of one shape with the same weights, in training mode, and a description of them.

    Args:
        shape: ``"bert"`` (a BERT-base-shaped classifier) or ``"llama"`` (a Llama-shaped causal LM).
        layers: their number of layers.
        dataset_size: passed to :func:`cd_convert.convert`.

    Returns:
        The models by :data:`MEMORY_VARIANTS` name, and the description printed above their table.
    """
    import transformers

    # Hidden 768 and 12 heads as in BERT-base; the vocabulary is kept small so that the body dominates.
    fields = dict(vocab_size=MEMORY_VOCAB, max_position_embeddings=512)
    if shape == "bert":
        model_cls: type = transformers.BertForSequenceClassification
        config = transformers.BertConfig(**_body(768, layers, MEMORY_HEADS, 3072, num_labels=LABELS, **fields))
        rates = f"dropout {config.hidden_dropout_prob:g}, attention dropout {config.attention_probs_dropout_prob:g}"
    else:
        model_cls = transformers.LlamaForCausalLM
        config = transformers.LlamaConfig(
            **_body(768, layers, MEMORY_HEADS, 2048, num_key_value_heads=MEMORY_HEADS, **fields)
        )
        rates = f"attention dropout {config.attention_dropout:g} (config default)"
    base = instantiate(model_cls, config)
    text = f"{model_cls.__name__}, hidden 768, 12 heads, {layers} layers, vocab 1024, {rates}"
    models = {
        "unconverted": base,
        "converted": cd_convert.convert(base, dataset_size=dataset_size),
        "fused_attention=False": cd_convert.convert(base, dataset_size=dataset_size, fused_attention=False),
    }
    for model in models.values():
        model.train()
    return models, text


def memory_step(model: nn.Module, inputs: Dict[str, Any], converted: bool) -> Callable[[], None]:
    """One training forward + backward (data loss, plus the regulariser for a converted model)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = data_loss(model(**inputs))
        if converted:
            loss = loss + cd_convert.regularization(model)
        loss.backward()

    return step


def saved_bytes(model: nn.Module, inputs: Dict[str, Any], converted: bool) -> int:
    """Saved-for-backward bytes of one training forward (parameters excluded), then backward to free them."""
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(exclude=list(model.parameters())) as counter:
        loss = data_loss(model(**inputs))
        if converted:
            loss = loss + cd_convert.regularization(model)
    total = counter.total()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def interleaved_times(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each step, one warm-up call each, then ``repeats`` samples in a rotating order."""
    for step in steps.values():
        step()
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def memory_section(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Saved bytes and time of one training step for each shape, length and variant; printed as it goes."""
    print(f"\n## What explicit attention costs: batch {args.memory_batch}, one training forward + backward\n")
    print(
        "Saved = bytes autograd keeps for backward (saved_tensors_hooks, unique storages, parameters excluded); "
        f"time = median of {args.repeats} interleaved samples; x = ratio to the unconverted model.\n"
    )
    results = []
    for shape in ("bert", "llama"):
        models, text = memory_models(shape, args.memory_layers, args.dataset_size)
        sites = {name: len(cd_convert.report(m).sites) if name != "unconverted" else 0 for name, m in models.items()}
        print(f"### {text}\n")
        print("| seq | model | sites | saved MiB | saved x | step ms | time x |")
        print("|---|---|---|---|---|---|---|")
        for seq in args.seq_lens:
            generator = torch.Generator().manual_seed(4)
            ids = torch.randint(3, MEMORY_VOCAB, (args.memory_batch, seq), generator=generator)
            inputs: Dict[str, Any] = {"input_ids": ids}
            if shape == "llama":
                inputs["use_cache"] = False
            saved = {name: saved_bytes(m, inputs, name != "unconverted") for name, m in models.items()}
            steps = {name: memory_step(m, inputs, name != "unconverted") for name, m in models.items()}
            times = interleaved_times(steps, args.repeats)
            median = {name: statistics.median(ts) for name, ts in times.items()}
            for name in MEMORY_VARIANTS:
                print(
                    f"| {seq} | {name} | {sites[name]} | {saved[name] / MIB:.1f} | "
                    f"{saved[name] / saved['unconverted']:.2f} | {median[name] * 1e3:.0f} | "
                    f"{median[name] / median['unconverted']:.2f} |"
                )
            results.append(
                {
                    "shape": shape,
                    "model": text,
                    "seq": seq,
                    "batch": args.memory_batch,
                    "layers": args.memory_layers,
                    "sites": sites,
                    "saved_bytes": saved,
                    "times_s": times,
                    "median_s": median,
                    "attention_matrix_bytes_per_layer": args.memory_batch * MEMORY_HEADS * seq * seq * 4,
                }
            )
        print()
        per_layer = ", ".join(
            f"seq {s}: {args.memory_batch * MEMORY_HEADS * s * s * 4 / MIB:.0f} MiB" for s in args.seq_lens
        )
        print(f"(one fp32 batch x heads x L x L attention tensor per layer: {per_layer})\n")
    return results


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    names = [f.name for f in FAMILIES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=None, help=f"comma-separated families (default all): {','.join(names)}")
    parser.add_argument("--json", default=None, help="write every record to this JSON file")
    parser.add_argument("--memory", action="store_true", help="also measure what explicit attention costs")
    parser.add_argument("--memory-layers", type=int, default=2, help="layers of the --memory models (default 2)")
    parser.add_argument("--memory-batch", type=int, default=4, help="batch of the --memory steps (default 4)")
    parser.add_argument("--seq-lens", default="256,512", help="sequence lengths of --memory (default 256,512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per --memory variant (default 3)")
    parser.add_argument("--dataset-size", type=int, default=1000, help="dataset_size passed to convert")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-clock guard per family in s (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.families:
        wanted = [n.strip() for n in args.families.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown families {unknown}; known: {', '.join(names)}")
        args.families = wanted
    else:
        args.families = names
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    return args


def environment(threads: int) -> Dict[str, Any]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    env = environment(args.threads)
    print(
        f"cd_convert transformers coverage: transformers {env['transformers']}, torch {env['torch']}, "
        f"{args.threads} thread(s), dataset_size {args.dataset_size}\n"
    )
    wall = time.perf_counter()
    by_name = {f.name: f for f in FAMILIES}
    results = []
    for name in args.families:
        res = run_family(by_name[name], args)
        results.append(res)
        print(f"  {name:12s} {res.result:14s} {res.seconds:6.2f} s", file=sys.stderr, flush=True)
    print_coverage(results)
    coverage_s = time.perf_counter() - wall
    print(f"coverage wall time {coverage_s:.0f} s")
    record: Dict[str, Any] = {"environment": env, "families": [asdict(r) for r in results], "coverage_s": coverage_s}
    if args.memory:
        record["memory"] = memory_section(args)
    record["wall_s"] = time.perf_counter() - wall
    print(f"total wall time {record['wall_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
