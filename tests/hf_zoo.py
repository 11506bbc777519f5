"""Tiny Hugging Face transformers models for the converter tests, and a detector for fixed-rate dropout.

Every model is built from a tiny config with random weights (nothing is downloaded) and with every
dropout rate its config offers set to a nonzero value, so that each dropout the architecture has is
really applied in training. ``fixed_rate_dropout_calls`` watches the aten ops a forward pass runs and
lists each dropout that still draws its mask at a fixed rate, so a test can check that a converted
model has none left.

Not a test file itself: tests import it (``from hf_zoo import HF_FAMILIES, ...``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

BATCH = 2
SEQ = 8
VOCAB = 100
NUM_LABELS = 3
IMAGE = 32
PATCH = 8

# The rates every builder uses; distinct so that a report can tell them apart.
HIDDEN_P = 0.1
ATTENTION_P = 0.15
ACTIVATION_P = 0.05
CLASSIFIER_P = 0.2
EMBEDDING_P = 0.12  # GPT-2's embd_pdrop
POOLER_P = 0.25  # DeBERTa-v2's ContextPooler

CORE_FAMILIES = ["bert", "distilbert", "deberta-v2", "gpt2", "llama", "t5", "bart", "vit", "whisper"]


class HFCase(NamedTuple):
    """What a builder returns; unpacks as ``model, inputs, loss_fn = builder()``."""

    model: nn.Module
    inputs: Dict[str, Any]
    loss_fn: Callable[[Any], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _make(model_cls: type, config: transformers.PretrainedConfig) -> nn.Module:
    """Build ``model_cls`` with random weights, asking for SDPA attention where the class supports it."""
    if getattr(model_cls, "_supports_sdpa", False):
        config._attn_implementation = "sdpa"
    return model_cls(config)


def _tokens(*shape: int, low: int = 3) -> torch.Tensor:
    """Random token ids that avoid the first few ids (used as pad/bos/eos in the configs)."""
    return torch.randint(low, VOCAB, shape)


def _ce_loss(targets: torch.Tensor, attr: str = "logits") -> Callable[[Any], torch.Tensor]:
    """Cross-entropy of ``output.<attr>`` (any leading shape, classes last) against fixed targets."""

    def loss_fn(output: Any) -> torch.Tensor:
        logits = getattr(output, attr)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return loss_fn


def _seq_classification(model_cls: type, config: transformers.PretrainedConfig) -> HFCase:
    """A sequence classifier on random tokens, scored against random labels."""
    model = _make(model_cls, config)
    inputs = {"input_ids": _tokens(BATCH, SEQ)}
    return HFCase(model, inputs, _ce_loss(torch.randint(0, NUM_LABELS, (BATCH,))))


def _causal_lm(model_cls: type, config: transformers.PretrainedConfig) -> HFCase:
    """A causal LM on random tokens, scored against random next tokens; no KV cache."""
    model = _make(model_cls, config)
    inputs = {"input_ids": _tokens(BATCH, SEQ), "use_cache": False}
    return HFCase(model, inputs, _ce_loss(torch.randint(0, VOCAB, (BATCH, SEQ))))


def _seq2seq_lm(model_cls: type, config: transformers.PretrainedConfig) -> HFCase:
    """An encoder-decoder LM with explicit decoder inputs (no labels, so no shifting); no KV cache."""
    model = _make(model_cls, config)
    inputs = {
        "input_ids": _tokens(BATCH, SEQ),
        "decoder_input_ids": _tokens(BATCH, SEQ),
        "use_cache": False,
    }
    return HFCase(model, inputs, _ce_loss(torch.randint(0, VOCAB, (BATCH, SEQ))))


# Shape fields shared by the BERT-like encoders.
_BERT_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=NUM_LABELS,
)

# ---------------------------------------------------------------------------------------------------
# Builders (each seeds the global RNG so the model, inputs and targets are the same every call)


def build_bert() -> HFCase:
    """BertForSequenceClassification: embedding/attention-output/FFN dropout, SDPA dropout, classifier."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        **_BERT_SHAPE,
        hidden_dropout_prob=HIDDEN_P,
        attention_probs_dropout_prob=ATTENTION_P,
        classifier_dropout=CLASSIFIER_P,
    )
    return _seq_classification(transformers.BertForSequenceClassification, config)


def build_roberta() -> HFCase:
    """RobertaForSequenceClassification; the classification head has two dropouts."""
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        **_BERT_SHAPE,
        pad_token_id=1,  # positions start after the pad id, hence the spare max_position_embeddings
        hidden_dropout_prob=HIDDEN_P,
        attention_probs_dropout_prob=ATTENTION_P,
        classifier_dropout=CLASSIFIER_P,
    )
    return _seq_classification(transformers.RobertaForSequenceClassification, config)


def build_distilbert() -> HFCase:
    """DistilBertForSequenceClassification; DistilBERT names its fields differently (dim, n_layers...)."""
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
        dropout=HIDDEN_P,
        attention_dropout=ATTENTION_P,
        seq_classif_dropout=CLASSIFIER_P,
        qa_dropout=CLASSIFIER_P,  # read only by the question-answering head; set so no rate is left at 0
    )
    return _seq_classification(transformers.DistilBertForSequenceClassification, config)


def build_albert() -> HFCase:
    """AlbertForSequenceClassification; ALBERT's config defaults to no dropout, so every rate is set."""
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        **_BERT_SHAPE,
        embedding_size=16,
        hidden_dropout_prob=HIDDEN_P,
        attention_probs_dropout_prob=ATTENTION_P,
        classifier_dropout_prob=CLASSIFIER_P,
    )
    return _seq_classification(transformers.AlbertForSequenceClassification, config)


def build_electra() -> HFCase:
    """ElectraForSequenceClassification (the discriminator encoder with its classification head)."""
    torch.manual_seed(0)
    config = transformers.ElectraConfig(
        **_BERT_SHAPE,
        embedding_size=16,
        hidden_dropout_prob=HIDDEN_P,
        attention_probs_dropout_prob=ATTENTION_P,
        classifier_dropout=CLASSIFIER_P,
    )
    return _seq_classification(transformers.ElectraForSequenceClassification, config)


def build_deberta_v2() -> HFCase:
    """DebertaV2ForSequenceClassification with relative (disentangled) attention.

    DeBERTa-v2 has no SDPA path in this transformers version, so it runs its own eager attention
    (dropout on the attention probabilities through an nn.Dropout). ``cls_dropout`` is not a declared
    config field; the classifier reads it with getattr, so it is passed as an extra attribute.
    """
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        **_BERT_SHAPE,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=32,
        hidden_dropout_prob=HIDDEN_P,  # also the relative-position-embedding dropout (pos_dropout)
        attention_probs_dropout_prob=ATTENTION_P,
        pooler_dropout=POOLER_P,
        cls_dropout=CLASSIFIER_P,
    )
    return _seq_classification(transformers.DebertaV2ForSequenceClassification, config)


def build_gpt2() -> HFCase:
    """GPT2LMHeadModel: embedding, residual and attention (SDPA) dropout."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=HIDDEN_P,
        embd_pdrop=EMBEDDING_P,
        attn_pdrop=ATTENTION_P,
    )
    return _causal_lm(transformers.GPT2LMHeadModel, config)


# Shape fields shared by the Llama-like decoders (grouped-query attention: 4 query heads, 2 KV heads).
_LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_llama() -> HFCase:
    """LlamaForCausalLM; its only dropout is the attention dropout (inside SDPA)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_LLAMA_SHAPE, attention_dropout=ATTENTION_P)
    return _causal_lm(transformers.LlamaForCausalLM, config)


def build_mistral() -> HFCase:
    """MistralForCausalLM; only attention dropout. The sliding window is off (longer than the input)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**_LLAMA_SHAPE, sliding_window=None, attention_dropout=ATTENTION_P)
    return _causal_lm(transformers.MistralForCausalLM, config)


def build_qwen2() -> HFCase:
    """Qwen2ForCausalLM; only attention dropout."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**_LLAMA_SHAPE, attention_dropout=ATTENTION_P)
    return _causal_lm(transformers.Qwen2ForCausalLM, config)


def build_opt() -> HFCase:
    """OPTForCausalLM: hidden and attention dropout.

    LayerDrop (``layerdrop``) stays 0: it skips whole layers by a ``torch.rand`` draw, not a dropout mask,
    and would make a gradient check flaky. OPT's modelling code reads no activation-dropout field.
    """
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=HIDDEN_P,
        attention_dropout=ATTENTION_P,
        layerdrop=0.0,
    )
    return _causal_lm(transformers.OPTForCausalLM, config)


def build_t5() -> HFCase:
    """T5ForConditionalGeneration: T5 has one rate, ``dropout_rate``, for every dropout (attention too)."""
    torch.manual_seed(0)
    config = transformers.T5Config(
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
        dropout_rate=HIDDEN_P,
        classifier_dropout=CLASSIFIER_P,  # read only by T5ForSequenceClassification; set for completeness
    )
    return _seq2seq_lm(transformers.T5ForConditionalGeneration, config)


def build_bart() -> HFCase:
    """BartForConditionalGeneration: hidden, attention and activation dropout; LayerDrop stays 0."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        dropout=HIDDEN_P,
        attention_dropout=ATTENTION_P,
        activation_dropout=ACTIVATION_P,
        classifier_dropout=CLASSIFIER_P,  # read only by BartForSequenceClassification; set for completeness
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
    )
    return _seq2seq_lm(transformers.BartForConditionalGeneration, config)


def build_vit() -> HFCase:
    """ViTForImageClassification on 32 px images in 8 px patches (16 patches + CLS)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=HIDDEN_P,
        attention_probs_dropout_prob=ATTENTION_P,
    )
    model = _make(transformers.ViTForImageClassification, config)
    inputs = {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE)}
    return HFCase(model, inputs, _ce_loss(torch.randint(0, NUM_LABELS, (BATCH,))))


def build_clip() -> HFCase:
    """CLIPModel (text and vision towers); the contrastive loss pairs image i with caption i.

    CLIP's only dropout is the attention dropout of each tower (the sub-configs of this transformers
    version declare no other dropout field).
    """
    torch.manual_seed(0)
    text_config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        attention_dropout=ATTENTION_P,
    )
    vision_config = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_dropout=ATTENTION_P,
    )
    config = transformers.CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    model = _make(transformers.CLIPModel, config)
    inputs = {"input_ids": _tokens(BATCH, SEQ), "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE)}
    return HFCase(model, inputs, _ce_loss(torch.arange(BATCH), attr="logits_per_image"))


def build_whisper() -> HFCase:
    """WhisperForConditionalGeneration on 8 mel bins x 16 frames (the encoder's two convs halve it to 8).

    The special-token ids are moved inside the tiny vocabulary; SpecAugment (``apply_spec_augment``)
    and LayerDrop stay off: neither is a dropout mask.
    """
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        dropout=HIDDEN_P,
        attention_dropout=ATTENTION_P,
        activation_dropout=ACTIVATION_P,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        apply_spec_augment=False,
    )
    model = _make(transformers.WhisperForConditionalGeneration, config)
    frames = 2 * config.max_source_positions  # the encoder insists on exactly this many input frames
    inputs = {
        "input_features": torch.randn(BATCH, config.num_mel_bins, frames),
        "decoder_input_ids": _tokens(BATCH, SEQ),
        "use_cache": False,
    }
    return HFCase(model, inputs, _ce_loss(torch.randint(0, VOCAB, (BATCH, SEQ))))


HF_FAMILIES: "OrderedDict[str, Callable[[], HFCase]]" = OrderedDict(
    [
        ("bert", build_bert),
        ("roberta", build_roberta),
        ("distilbert", build_distilbert),
        ("albert", build_albert),
        ("electra", build_electra),
        ("deberta-v2", build_deberta_v2),
        ("gpt2", build_gpt2),
        ("llama", build_llama),
        ("mistral", build_mistral),
        ("qwen2", build_qwen2),
        ("opt", build_opt),
        ("t5", build_t5),
        ("bart", build_bart),
        ("vit", build_vit),
        ("clip", build_clip),
        ("whisper", build_whisper),
    ]
)


def all_families() -> List[str]:
    """Every family name, in HF_FAMILIES order."""
    return list(HF_FAMILIES)


# ---------------------------------------------------------------------------------------------------
# Fixed-rate dropout detection
#
# What the dispatch mode sees (torch 2.14.1): F.dropout / nn.Dropout are CompositeImplicitAutograd, so
# on CPU they reach a dispatch mode already decomposed into ``aten.bernoulli_.float(mask, 1 - p)``
# followed by a div and a mul; on CUDA (fused kernel) they arrive as ``aten.native_dropout(x, p, train)``.
# F.scaled_dot_product_attention with dropout_p > 0 on CPU takes the math path, which is decomposed the
# same way (one ``bernoulli_.float`` on the attention probabilities); on accelerators it reaches a fused
# kernel such as ``aten._scaled_dot_product_efficient_attention`` that carries ``dropout_p``. The
# composite ops (aten.dropout, feature_dropout, alpha_dropout, scaled_dot_product_attention) are matched
# as well, for dispatch levels that see them before decomposition. Kernels run inside the mode do not
# re-enter it, so a dropout is reported once, whichever way it arrives.

# Ops whose schema carries the drop rate ``p`` and an optional ``train`` flag.
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


def _argument(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: Dict[str, Any], name: str) -> Any:
    """The value ``func`` was called with for its schema argument ``name`` (its default when omitted)."""
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


def _describe(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """A description when ``func`` applies a dropout mask at a nonzero fixed rate, else None."""
    namespace, _, name = func._schema.name.partition("::")
    if namespace != "aten":
        return None
    op = f"aten.{func.__name__}"  # e.g. aten.bernoulli_.float
    if name in _DROPOUT_OPS:
        p = _argument(func, args, kwargs, "p")
        train = _argument(func, args, kwargs, "train")
        if train is False or not p:  # native_dropout's train=None means training
            return None
        return f"{op} p={float(p):g} on {_shape(args[0])}"
    if name in ("bernoulli", "bernoulli_"):
        # The probability is that of keeping (drawing a 1): dropout calls bernoulli_(1 - p).
        keep = _argument(func, args, kwargs, "p")
        if keep is None:  # bernoulli.default: the input tensor holds the probabilities
            return f"{op} p=<input tensor> on {_shape(args[0])}"
        if isinstance(keep, torch.Tensor):
            return f"{op} p=<tensor {_shape(keep)}> on {_shape(args[0])}"
        if float(keep) >= 1.0:  # keeps everything: no dropout
            return None
        return f"{op} p={1.0 - float(keep):g} (keep {float(keep):g}) on {_shape(args[0])}"
    is_sdpa = name == "scaled_dot_product_attention" or (
        name.startswith("_scaled_dot_product_") and "attention" in name
    )
    if is_sdpa and not name.endswith("_backward"):
        p = _argument(func, args, kwargs, "dropout_p")
        if not p:
            return None
        return f"{op} dropout_p={float(p):g} on q{_shape(args[0])}"
    return None


class _DropoutRecorder(TorchDispatchMode):
    """Records a description of every fixed-rate dropout op that passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        description = _describe(func, args, kwargs)
        if description is not None:
            self.calls.append(description)
        return func(*args, **kwargs)


def fixed_rate_dropout_calls(model: nn.Module, inputs: Dict[str, Any]) -> List[str]:
    """Run ``model(**inputs)`` once, in the model's current train/eval mode, and list its fixed-rate dropouts.

    One entry per aten-level op that would draw a dropout mask at a fixed nonzero rate: native_dropout /
    dropout / feature_dropout (and the alpha variants) with p > 0 and train not False, any bernoulli draw
    that can drop (keep probability < 1, or a tensor of probabilities), and any scaled-dot-product
    attention kernel called with dropout_p > 0. The pass runs without grad and on a fork of the CPU RNG,
    so the caller's random state and autograd graph are untouched.
    """
    recorder = _DropoutRecorder()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), recorder:
        model(**inputs)
    return recorder.calls


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
