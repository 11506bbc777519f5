"""The transformers families of :mod:`benchmarks.transformers_coverage`: tiny configs, how to build each model with
every dropout rate nonzero, its inputs and its data loss.

Each :class:`Family` names a model class and its config class (looked up in ``transformers`` when built, so a
family whose classes this transformers version lacks is reported as not built), the config's fields and the
kind of inputs its forward takes. Nothing is downloaded: weights are random (seed 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 2
SEQ = 8
VOCAB = 100
LABELS = 3
IMAGE = 32
PATCH = 8
AUDIO_SAMPLES = 400

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
#: Config of the T5-like encoder-decoders.
_T5 = dict(
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
#: Config of the hierarchical (Swin-like) image classifiers: 4-pixel patches, two stages of one block.
_SWIN = dict(
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
)
#: Config of the SegFormer/PVT-like image encoders: two stages, spatial-reduction attention.
_SEGFORMER = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    sr_ratios=[2, 1],
    hidden_sizes=[16, 32],
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
    num_labels=LABELS,
    drop_path_rate=0.0,
)
#: Config of the ConvNeXt-like image classifiers.
_CONVNEXT = dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE, num_labels=LABELS)
#: Config of the Mamba-like decoders (no attention, no dropout).
_MAMBA = dict(
    vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, intermediate_size=64, time_step_rank=4
)
#: Config of the wav2vec2-like CTC models: a two-layer convolutional feature encoder (stride 10) on raw audio.
#: SpecAugment is no dropout mask: off.
_WAV2VEC2 = _body(
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
)
#: Text tower of the CLIP-like dual encoders.
_CLIP_TEXT = _body(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
#: Image token id of the vision-language decoders (inside the vocabulary, above the ids make_inputs draws).
_IMAGE_TOKEN = 99


def _randomise_query_tokens(model: nn.Module) -> None:
    """BLIP-2 initialises its query tokens to zero: the Q-Former's first dropouts then drop zeros, no gradient."""
    model.query_tokens.normal_(0.0, 1.0)


def _no_attention_dropout(config: Any) -> None:
    """DiffLlama raises in training when ``attention_dropout > 0``: the one dropout it has is left at 0."""
    config.attention_dropout = 0.0


@dataclass(frozen=True)
class Family:
    """A transformers family: the model and config classes (by name), the config's shape, the input kind.

    ``inputs`` is one of the kinds of :func:`make_inputs` (``text``, ``causal``, ``seq2seq``, ``image``,
    ``text-image``, ``speech-seq2seq``, ``audio`` and the model-specific ones).

    Every family is first converted with no example inputs (cd_convert builds its dry-run inputs from the
    config). ``example_inputs=True`` marks a family whose forward needs inputs that cd_convert may not build
    (a comment above it says which): when that conversion fails, or leaves a fixed-rate dropout in a training
    forward on the family's inputs (a branch the dry run did not run), the family is converted again with
    its inputs passed as ``example_inputs=`` and checked on that. The table's ``inputs`` column then says
    ``given``, and what happened without them is printed after the table. Unmarked families never get them.

    ``adjust_config`` edits the config after the dropout rates are set; ``adjust_model`` edits the built
    model's parameters (under ``torch.no_grad()``, seeded). ``note`` is printed after the table when the
    family does not pass.
    """

    name: str
    model_class: str
    config_class: str
    config: Dict[str, Any]
    inputs: str
    example_inputs: bool = False
    adjust_config: Optional[Callable[[Any], None]] = None
    adjust_model: Optional[Callable[[nn.Module], None]] = None
    note: str = ""


FAMILIES: List[Family] = [
    # ------------------------------------------------------------------------------------ text encoders
    Family("bert", "BertForSequenceClassification", "BertConfig", _BERT, "text"),
    Family("bert-token-cls", "BertForTokenClassification", "BertConfig", _BERT, "text"),
    Family("bert-qa", "BertForQuestionAnswering", "BertConfig", dict(_BERT, num_labels=2), "text"),
    # Its forward needs input_ids of shape (batch, choices, length).
    Family(
        "bert-multiple-choice",
        "BertForMultipleChoice",
        "BertConfig",
        _BERT,
        "multiple-choice",
        example_inputs=True,
    ),
    Family("roberta", "RobertaForSequenceClassification", "RobertaConfig", _BERT, "text"),
    Family("roberta-mlm", "RobertaForMaskedLM", "RobertaConfig", _BERT, "text"),
    Family("xlm-roberta", "XLMRobertaForSequenceClassification", "XLMRobertaConfig", _BERT, "text"),
    Family("xlm-roberta-xl", "XLMRobertaXLForSequenceClassification", "XLMRobertaXLConfig", _BERT, "text"),
    Family("camembert", "CamembertForSequenceClassification", "CamembertConfig", _BERT, "text"),
    Family("data2vec-text", "Data2VecTextForSequenceClassification", "Data2VecTextConfig", _BERT, "text"),
    Family(
        "roberta-prelayernorm",
        "RobertaPreLayerNormForSequenceClassification",
        "RobertaPreLayerNormConfig",
        _BERT,
        "text",
    ),
    Family("xmod", "XmodForSequenceClassification", "XmodConfig", dict(_BERT, default_language="en_XX"), "text"),
    Family("ernie", "ErnieForSequenceClassification", "ErnieConfig", _BERT, "text"),
    Family("megatron-bert", "MegatronBertForSequenceClassification", "MegatronBertConfig", _BERT, "text"),
    Family("ibert", "IBertForSequenceClassification", "IBertConfig", _BERT, "text"),
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
    Family("convbert", "ConvBertForSequenceClassification", "ConvBertConfig", dict(_BERT, embedding_size=32), "text"),
    Family(
        "mobilebert",
        "MobileBertForSequenceClassification",
        "MobileBertConfig",
        dict(_BERT, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
        "text",
    ),
    Family(
        "squeezebert",
        "SqueezeBertForSequenceClassification",
        "SqueezeBertConfig",
        dict(_BERT, embedding_size=32, q_groups=2, k_groups=2, v_groups=2, intermediate_groups=2, output_groups=2),
        "text",
    ),
    Family(
        "rembert",
        "RemBertForSequenceClassification",
        "RemBertConfig",
        dict(_BERT, input_embedding_size=16, output_embedding_size=16),
        "text",
    ),
    Family("roformer", "RoFormerForSequenceClassification", "RoFormerConfig", dict(_BERT, embedding_size=32), "text"),
    Family(
        "esm",
        "EsmForSequenceClassification",
        "EsmConfig",
        dict(_BERT, mask_token_id=4, position_embedding_type="rotary"),
        "text",
    ),
    Family("nomic-bert", "NomicBertForSequenceClassification", "NomicBertConfig", _BERT, "text"),
    Family(
        "modernbert",
        "ModernBertForSequenceClassification",
        "ModernBertConfig",
        dict(
            _BERT,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            global_attn_every_n_layers=2,
            local_attention=4,
        ),
        "text",
    ),
    Family("eurobert", "EuroBertForSequenceClassification", "EuroBertConfig", dict(_LLAMA, num_labels=LABELS), "text"),
    Family(
        "deberta",
        "DebertaForSequenceClassification",
        "DebertaConfig",
        dict(
            _BERT,
            relative_attention=True,
            max_relative_positions=16,
            pos_att_type=["c2p", "p2c"],
            pooler_hidden_size=32,
        ),
        "text",
    ),
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
    Family(
        "xlm",
        "XLMForSequenceClassification",
        "XLMConfig",
        dict(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=LABELS),
        "text",
    ),
    Family(
        "flaubert",
        "FlaubertForSequenceClassification",
        "FlaubertConfig",
        dict(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=LABELS),
        "text",
    ),
    Family(
        "xlnet",
        "XLNetForSequenceClassification",
        "XLNetConfig",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_layer=2,
            n_head=4,
            d_inner=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            num_labels=LABELS,
        ),
        "text",
    ),
    Family(
        "funnel",
        "FunnelForSequenceClassification",
        "FunnelConfig",
        dict(
            vocab_size=VOCAB,
            block_sizes=[1, 1],
            block_repeats=[1, 1],
            num_decoder_layers=1,
            d_model=32,
            n_head=4,
            d_head=8,
            d_inner=64,
            num_labels=LABELS,
        ),
        "text",
    ),
    # FNet mixes tokens with a Fourier transform: no attention.
    Family(
        "fnet",
        "FNetForSequenceClassification",
        "FNetConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=LABELS,
            pad_token_id=1,
        ),
        "text",
    ),
    Family(
        "nystromformer",
        "NystromformerForSequenceClassification",
        "NystromformerConfig",
        dict(_BERT, num_landmarks=4, segment_means_seq_len=8, conv_kernel_size=3),
        "text",
    ),
    Family(
        "big-bird",
        "BigBirdForSequenceClassification",
        "BigBirdConfig",
        dict(_BERT, attention_type="original_full"),
        "text",
    ),
    # Block-sparse attention needs more than 14 tokens with these blocks (shorter inputs fall back to full
    # attention): 16 tokens.
    Family(
        "big-bird-sparse",
        "BigBirdForSequenceClassification",
        "BigBirdConfig",
        dict(_BERT, attention_type="block_sparse", block_size=2, num_random_blocks=1, max_position_embeddings=128),
        "text-16",
    ),
    # Token classification, not sequence classification: the CLS token attends globally, so its output does
    # not depend on the last layer's local attention dropout, whose rate would get no gradient from a CLS loss.
    Family(
        "longformer", "LongformerForTokenClassification", "LongformerConfig", dict(_BERT, attention_window=4), "text"
    ),
    # Characters (Unicode code points) in, downsampled for the deep stack, upsampled for the token head.
    Family(
        "canine",
        "CanineForTokenClassification",
        "CanineConfig",
        _body(
            num_labels=LABELS,
            downsampling_rate=2,
            upsampling_kernel_size=2,
            num_hash_functions=2,
            num_hash_buckets=64,
            local_transformer_stride=4,
            max_position_embeddings=64,
        ),
        "text",
    ),
    Family("layoutlm", "LayoutLMForSequenceClassification", "LayoutLMConfig", _BERT, "layout"),
    Family(
        "lilt",
        "LiltForSequenceClassification",
        "LiltConfig",
        dict(_BERT, hidden_size=48, channel_shrink_ratio=4),
        "layout",
        note="LiLT's encoder returns only the text stream: the last layer's layout-stream output (and its "
        "dropout) does not reach any output",
    ),
    Family("markuplm", "MarkupLMForSequenceClassification", "MarkupLMConfig", _BERT, "text"),
    Family("t5-encoder", "T5EncoderModel", "T5Config", _T5, "text"),
    # ------------------------------------------------------------------------------------------ decoders
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config", _GPT2, "causal"),
    # Its forward needs encoder_hidden_states, without which the cross-attention never runs.
    Family(
        "gpt2-cross-attention",
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(_GPT2, add_cross_attention=True),
        "causal-cross-attention",
        example_inputs=True,
    ),
    Family("gpt-bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", _GPT2, "causal"),
    Family("gpt-bigcode-mha", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(_GPT2, multi_query=False), "causal"),
    # OpenAI GPT takes no use_cache.
    Family(
        "openai-gpt",
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "text",
    ),
    # CTRL passes a literal dropout=0.0 to its attention: learned from init_p (the rate-0 policy).
    Family(
        "ctrl",
        "CTRLLMHeadModel",
        "CTRLConfig",
        dict(vocab_size=VOCAB, n_positions=64, n_embd=32, dff=64, n_layer=2, n_head=4),
        "causal",
    ),
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
        "codegen",
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(
            vocab_size=VOCAB,
            n_positions=64,
            n_ctx=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal",
    ),
    Family(
        "gpt-neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(_LLAMA, num_key_value_heads=None, rotary_pct=0.5),
        "causal",
    ),
    Family(
        "gpt-neox-japanese",
        "GPTNeoXJapaneseForCausalLM",
        "GPTNeoXJapaneseConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_multiple_size=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal",
    ),
    Family("llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA, "causal"),
    Family("llama-seqcls", "LlamaForSequenceClassification", "LlamaConfig", dict(_LLAMA, num_labels=LABELS), "text"),
    Family("mistral", "MistralForCausalLM", "MistralConfig", dict(_LLAMA, sliding_window=None), "causal"),
    Family("mixtral", "MixtralForCausalLM", "MixtralConfig", dict(_LLAMA, num_local_experts=4), "causal"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA, "causal"),
    Family(
        "qwen2-moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            _LLAMA, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2
        ),
        "causal",
    ),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(_LLAMA, head_dim=8), "causal"),
    Family(
        "qwen3-moe",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_LLAMA, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
        "causal",
    ),
    Family("gemma", "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA, head_dim=8), "causal"),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(_LLAMA, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
        "causal",
    ),
    Family(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(_LLAMA, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
        "causal",
    ),
    Family(
        "recurrent-gemma",
        "RecurrentGemmaForCausalLM",
        "RecurrentGemmaConfig",
        dict(
            _LLAMA,
            num_hidden_layers=3,
            lru_width=32,
            attention_window_size=8,
            head_dim=8,
            num_key_value_heads=4,
            block_types=["recurrent", "attention"],
        ),
        "causal",
    ),
    Family("phi", "PhiForCausalLM", "PhiConfig", dict(_LLAMA, partial_rotary_factor=0.5), "causal"),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", _LLAMA, "causal"),
    Family("phimoe", "PhimoeForCausalLM", "PhimoeConfig", dict(_LLAMA, num_local_experts=4), "causal"),
    Family("olmo", "OlmoForCausalLM", "OlmoConfig", _LLAMA, "causal"),
    Family("olmo2", "Olmo2ForCausalLM", "Olmo2Config", _LLAMA, "causal"),
    Family("olmo3", "Olmo3ForCausalLM", "Olmo3Config", dict(_LLAMA, sliding_window=4), "causal"),
    Family("olmoe", "OlmoeForCausalLM", "OlmoeConfig", dict(_LLAMA, num_experts=4, num_experts_per_tok=2), "causal"),
    Family("cohere", "CohereForCausalLM", "CohereConfig", _LLAMA, "causal"),
    Family("cohere2", "Cohere2ForCausalLM", "Cohere2Config", dict(_LLAMA, sliding_window=4), "causal"),
    Family("stablelm", "StableLmForCausalLM", "StableLmConfig", _LLAMA, "causal"),
    Family("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", _LLAMA, "causal"),
    Family("granite", "GraniteForCausalLM", "GraniteConfig", _LLAMA, "causal"),
    Family("granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig", dict(_LLAMA, num_local_experts=4), "causal"),
    Family("persimmon", "PersimmonForCausalLM", "PersimmonConfig", dict(_LLAMA, num_key_value_heads=None), "causal"),
    Family(
        "gpt-oss",
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            _LLAMA,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "causal",
    ),
    Family(
        "deepseek-v3",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            _LLAMA,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "causal",
    ),
    Family("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config", _LLAMA, "causal"),
    Family("helium", "HeliumForCausalLM", "HeliumConfig", dict(_LLAMA, head_dim=8), "causal"),
    Family("glm4", "Glm4ForCausalLM", "Glm4Config", dict(_LLAMA, head_dim=8), "causal"),
    Family("nemotron", "NemotronForCausalLM", "NemotronConfig", dict(_LLAMA, head_dim=8), "causal"),
    Family("exaone4", "Exaone4ForCausalLM", "Exaone4Config", dict(_LLAMA, sliding_window=4), "causal"),
    Family(
        "diffllama",
        "DiffLlamaForCausalLM",
        "DiffLlamaConfig",
        _LLAMA,
        "causal",
        adjust_config=_no_attention_dropout,
        note="DiffLlama raises in training when attention_dropout > 0, so it is built with 0",
    ),
    Family(
        "jamba",
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            _LLAMA,
            num_experts=2,
            num_experts_per_tok=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            use_mamba_kernels=False,
            mamba_d_state=4,
            mamba_dt_rank=4,
        ),
        "causal",
    ),
    Family("mamba", "MambaForCausalLM", "MambaConfig", _MAMBA, "causal"),
    Family("falcon-mamba", "FalconMambaForCausalLM", "FalconMambaConfig", dict(_MAMBA, use_mambapy=True), "causal"),
    Family(
        "rwkv",
        "RwkvForCausalLM",
        "RwkvConfig",
        dict(
            vocab_size=VOCAB,
            context_length=64,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
        ),
        "causal",
    ),
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
        "xglm",
        "XGLMForCausalLM",
        "XGLMConfig",
        dict(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            d_model=32,
            ffn_dim=64,
            num_layers=2,
            attention_heads=4,
            layerdrop=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "causal",
    ),
    Family("biogpt", "BioGptForCausalLM", "BioGptConfig", dict(_BERT, layerdrop=0.0), "causal"),
    Family(
        "mpt",
        "MptForCausalLM",
        "MptConfig",
        dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB),
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
        "falcon-alibi",
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
            alibi=True,
        ),
        "causal",
    ),
    Family(
        "falcon-new-arch",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            new_decoder_architecture=True,
        ),
        "causal",
    ),
    Family(
        "modernbert-decoder",
        "ModernBertDecoderForCausalLM",
        "ModernBertDecoderConfig",
        dict(_BERT, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=4),
        "causal",
    ),
    Family("bert-lm-decoder", "BertLMHeadModel", "BertConfig", dict(_BERT, is_decoder=True), "causal"),
    Family("bert-generation", "BertGenerationDecoder", "BertGenerationConfig", dict(_BERT, is_decoder=True), "causal"),
    # LSH attention draws random rotations: hash_seed fixes them, so the eval outputs can be compared. Its
    # forward needs training inputs of exactly prod(axial_pos_shape) = 4 x 4 = 16 tokens.
    Family(
        "reformer",
        "ReformerModelWithLMHead",
        "ReformerConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            attention_head_size=8,
            num_attention_heads=4,
            attn_layers=["local", "lsh"],
            axial_pos_shape=[4, 4],
            axial_pos_embds_dim=[16, 16],
            feed_forward_size=64,
            local_attn_chunk_length=4,
            lsh_attn_chunk_length=4,
            num_buckets=2,
            max_position_embeddings=16,
            is_decoder=True,
            pad_token_id=0,
            eos_token_id=2,
            hash_seed=0,
        ),
        "causal-16",
        example_inputs=True,
    ),
    # ---------------------------------------------------------------------------------- encoder-decoders
    Family("t5", "T5ForConditionalGeneration", "T5Config", _T5, "seq2seq"),
    Family("mt5", "MT5ForConditionalGeneration", "MT5Config", _T5, "seq2seq"),
    Family("umt5", "UMT5ForConditionalGeneration", "UMT5Config", _T5, "seq2seq"),
    Family(
        "longt5",
        "LongT5ForConditionalGeneration",
        "LongT5Config",
        dict(_T5, local_radius=2, global_block_size=4),
        "seq2seq",
    ),
    Family(
        "longt5-tglobal",
        "LongT5ForConditionalGeneration",
        "LongT5Config",
        dict(_T5, local_radius=2, global_block_size=4, encoder_attention_type="transient-global"),
        "seq2seq",
    ),
    Family(
        "switch-transformers",
        "SwitchTransformersForConditionalGeneration",
        "SwitchTransformersConfig",
        dict(
            _T5,
            num_experts=2,
            expert_capacity=8,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            router_jitter_noise=0.0,
        ),
        "seq2seq",
    ),
    Family(
        "t5gemma",
        "T5GemmaForConditionalGeneration",
        "T5GemmaConfig",
        dict(
            encoder=dict(_LLAMA, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
            decoder=dict(_LLAMA, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
            vocab_size=VOCAB,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "seq2seq",
    ),
    Family("bart", "BartForConditionalGeneration", "BartConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    # Its forward needs an <eos> token in every row of input_ids (the head reads the last one).
    Family(
        "bart-seqcls",
        "BartForSequenceClassification",
        "BartConfig",
        dict(_BART, **_BART_IDS, num_labels=LABELS),
        "seq2seq-classification",
        example_inputs=True,
    ),
    Family("mbart", "MBartForConditionalGeneration", "MBartConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family("plbart", "PLBartForConditionalGeneration", "PLBartConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family("mvp", "MvpForConditionalGeneration", "MvpConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family("m2m100", "M2M100ForConditionalGeneration", "M2M100Config", dict(_BART, **_BART_IDS), "seq2seq"),
    Family(
        "nllb-moe",
        "NllbMoeForConditionalGeneration",
        "NllbMoeConfig",
        dict(_BART, **_BART_IDS, num_experts=4, expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=2),
        "seq2seq",
    ),
    Family("blenderbot", "BlenderbotForConditionalGeneration", "BlenderbotConfig", dict(_BART, **_BART_IDS), "seq2seq"),
    Family(
        "blenderbot-small",
        "BlenderbotSmallForConditionalGeneration",
        "BlenderbotSmallConfig",
        dict(_BART, **_BART_IDS),
        "seq2seq",
    ),
    Family(
        "pegasus",
        "PegasusForConditionalGeneration",
        "PegasusConfig",
        dict(_BART, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1),
        "seq2seq",
    ),
    Family(
        "pegasus-x",
        "PegasusXForConditionalGeneration",
        "PegasusXConfig",
        dict(
            _BART,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            num_global_tokens=4,
            block_size=4,
            stagger_local_blocks=True,
        ),
        "seq2seq",
        note="PEGASUS-X's encoder returns only the token states: the last layer's attention of the global "
        "tokens (and the dropout on its probabilities) does not reach any output",
    ),
    Family(
        "bigbird-pegasus",
        "BigBirdPegasusForConditionalGeneration",
        "BigBirdPegasusConfig",
        dict(_BART, pad_token_id=0, eos_token_id=1, decoder_start_token_id=2, attention_type="original_full"),
        "seq2seq",
    ),
    Family(
        "led",
        "LEDForConditionalGeneration",
        "LEDConfig",
        dict(
            _ENCODER_DECODER,
            max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64,
            attention_window=4,
            **_BART_IDS,
        ),
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
    Family(
        "fsmt",
        "FSMTForConditionalGeneration",
        "FSMTConfig",
        dict(
            langs=["en", "de"],
            src_vocab_size=VOCAB,
            tgt_vocab_size=VOCAB,
            d_model=32,
            max_position_embeddings=64,
            encoder_ffn_dim=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            decoder_ffn_dim=64,
            decoder_layers=2,
            decoder_attention_heads=4,
        ),
        "seq2seq",
    ),
    Family(
        "prophetnet",
        "ProphetNetForConditionalGeneration",
        "ProphetNetConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            encoder_ffn_dim=64,
            num_encoder_layers=2,
            num_encoder_attention_heads=4,
            decoder_ffn_dim=64,
            num_decoder_layers=2,
            num_decoder_attention_heads=4,
            max_position_embeddings=64,
            ngram=2,
            num_buckets=8,
            relative_max_distance=16,
        ),
        "seq2seq",
    ),
    # The text-to-text model of SeamlessM4T (the speech and unit towers are built tiny, unused).
    Family(
        "seamless-m4t",
        "SeamlessM4TForTextToText",
        "SeamlessM4TConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            speech_encoder_layers=1,
            speech_encoder_attention_heads=4,
            speech_encoder_intermediate_size=64,
            speech_encoder_layerdrop=0.0,
            t2u_encoder_layers=1,
            t2u_decoder_layers=1,
            t2u_encoder_attention_heads=4,
            t2u_decoder_attention_heads=4,
            t2u_encoder_ffn_dim=64,
            t2u_decoder_ffn_dim=64,
            t2u_vocab_size=50,
            t2u_max_position_embeddings=64,
            unit_hifi_gan_vocab_size=50,
            unit_embed_dim=32,
            upsample_initial_channel=16,
        ),
        "seq2seq",
    ),
    Family(
        "bert2bert",
        "EncoderDecoderModel",
        "EncoderDecoderConfig",
        dict(
            encoder=dict(_BERT, model_type="bert"),
            decoder=dict(_BERT, model_type="bert", is_decoder=True, add_cross_attention=True),
            decoder_start_token_id=3,
            pad_token_id=1,
        ),
        "seq2seq",
    ),
    # --------------------------------------------------------------------------------------------- vision
    Family("vit", "ViTForImageClassification", "ViTConfig", _VIT, "image"),
    Family("deit", "DeiTForImageClassification", "DeiTConfig", _VIT, "image"),
    Family("beit", "BeitForImageClassification", "BeitConfig", dict(_VIT, drop_path_rate=0.0), "image"),
    Family(
        "data2vec-vision",
        "Data2VecVisionForImageClassification",
        "Data2VecVisionConfig",
        dict(_VIT, drop_path_rate=0.0, use_relative_position_bias=True),
        "image",
    ),
    Family("vit-msn", "ViTMSNForImageClassification", "ViTMSNConfig", _VIT, "image"),
    Family("ijepa", "IJepaForImageClassification", "IJepaConfig", _VIT, "image"),
    Family("dinov2", "Dinov2ForImageClassification", "Dinov2Config", dict(_VIT, mlp_ratio=2), "image"),
    Family(
        "dinov2-registers",
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        dict(_VIT, mlp_ratio=2, num_register_tokens=2),
        "image",
    ),
    # Pre-training masks random patches: the noise that picks them is an input, so every forward masks alike.
    Family(
        "vit-mae",
        "ViTMAEForPreTraining",
        "ViTMAEConfig",
        dict(
            _VIT,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
            mask_ratio=0.25,
        ),
        "image-mae",
    ),
    Family(
        "yolos",
        "YolosForObjectDetection",
        "YolosConfig",
        dict(_VIT, num_detection_tokens=4, image_size=[IMAGE, IMAGE]),
        "image",
    ),
    Family(
        "dpt",
        "DPTForDepthEstimation",
        "DPTConfig",
        dict(
            _VIT,
            num_hidden_layers=4,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 8, 16, 16],
            fusion_hidden_size=16,
            reassemble_factors=[4, 2, 1, 0.5],
        ),
        "image",
    ),
    Family("swin", "SwinForImageClassification", "SwinConfig", _SWIN, "image"),
    Family("swinv2", "Swinv2ForImageClassification", "Swinv2Config", _SWIN, "image"),
    Family(
        "focalnet",
        "FocalNetForImageClassification",
        "FocalNetConfig",
        dict(
            image_size=IMAGE,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            focal_levels=[2, 2],
            focal_windows=[3, 3],
            num_labels=LABELS,
            drop_path_rate=0.0,
        ),
        "image",
    ),
    Family(
        "hiera",
        "HieraForImageClassification",
        "HieraConfig",
        dict(
            embed_dim=16,
            image_size=[IMAGE, IMAGE],
            patch_size=[3, 3],
            patch_stride=[2, 2],
            patch_padding=[1, 1],
            depths=[1, 1],
            num_heads=[1, 2],
            embed_dim_multiplier=2.0,
            num_query_pool=1,
            query_stride=[2, 2],
            masked_unit_size=[4, 4],
            masked_unit_attention=[True, False],
            num_labels=LABELS,
            drop_path_rate=0.0,
        ),
        "image",
    ),
    Family("segformer", "SegformerForImageClassification", "SegformerConfig", _SEGFORMER, "image"),
    Family(
        "segformer-segmentation",
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        dict(_SEGFORMER, decoder_hidden_size=16),
        "image",
    ),
    Family(
        "pvt",
        "PvtForImageClassification",
        "PvtConfig",
        dict(
            image_size=IMAGE,
            num_encoder_blocks=2,
            depths=[1, 1],
            sequence_reduction_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[4, 2],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            num_labels=LABELS,
            drop_path_rate=0.0,
        ),
        "image",
    ),
    Family("pvt-v2", "PvtV2ForImageClassification", "PvtV2Config", dict(_SEGFORMER, image_size=IMAGE), "image"),
    # CvT's rates are per stage (lists), so they are set here: attention 0.15, MLP 0.1.
    Family(
        "cvt",
        "CvtForImageClassification",
        "CvtConfig",
        dict(
            embed_dim=[16, 32],
            num_heads=[1, 2],
            depth=[2, 2],
            patch_sizes=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[2, 1],
            mlp_ratio=[2.0, 2.0],
            attention_drop_rate=[0.15, 0.15],
            drop_rate=[0.1, 0.1],
            drop_path_rate=[0.0, 0.0],
            qkv_bias=[True, True],
            cls_token=[False, True],
            qkv_projection_method=["dw_bn", "dw_bn"],
            kernel_qkv=[3, 3],
            padding_kv=[1, 1],
            stride_kv=[2, 2],
            padding_q=[1, 1],
            stride_q=[1, 1],
            num_labels=LABELS,
        ),
        "image",
    ),
    Family(
        "mobilevit",
        "MobileViTForImageClassification",
        "MobileViTConfig",
        dict(
            image_size=IMAGE,
            patch_size=2,
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
            num_attention_heads=2,
            num_labels=LABELS,
        ),
        "image",
    ),
    Family(
        "mobilevitv2",
        "MobileViTV2ForImageClassification",
        "MobileViTV2Config",
        dict(image_size=2 * IMAGE, patch_size=2, width_multiplier=0.25, num_labels=LABELS),
        "image-config-size",
    ),
    # SwiftFormer's rates have names of their own (drop_mlp_rate, drop_conv_encoder_rate): set here.
    Family(
        "swiftformer",
        "SwiftFormerForImageClassification",
        "SwiftFormerConfig",
        dict(
            image_size=IMAGE,
            depths=[1, 1, 1, 1],
            embed_dims=[8, 8, 16, 16],
            num_labels=LABELS,
            drop_path_rate=0.0,
            drop_mlp_rate=0.1,
            drop_conv_encoder_rate=0.1,
        ),
        "image",
    ),
    Family(
        "efficientnet",
        "EfficientNetForImageClassification",
        "EfficientNetConfig",
        dict(image_size=IMAGE, width_coefficient=0.1, depth_coefficient=0.1, num_labels=LABELS, hidden_dim=128),
        "image",
    ),
    Family(
        "mobilenet-v2",
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        dict(image_size=IMAGE, depth_multiplier=0.25, num_labels=LABELS),
        "image",
    ),
    Family("convnext", "ConvNextForImageClassification", "ConvNextConfig", _CONVNEXT, "image"),
    Family("convnextv2", "ConvNextV2ForImageClassification", "ConvNextV2Config", _CONVNEXT, "image"),
    Family(
        "levit",
        "LevitForImageClassification",
        "LevitConfig",
        dict(
            image_size=IMAGE,
            hidden_sizes=[16, 32, 48],
            num_attention_heads=[1, 2, 3],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            num_labels=LABELS,
        ),
        "image",
    ),
    Family(
        "poolformer",
        "PoolFormerForImageClassification",
        "PoolFormerConfig",
        dict(
            num_channels=3,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_encoder_blocks=2,
            patch_sizes=[7, 3],
            strides=[4, 2],
            padding=[2, 1],
            num_labels=LABELS,
            drop_path_rate=0.0,
        ),
        "image",
    ),
    # ---------------------------------------------------------------------------------------------- audio
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
    Family("wav2vec2", "Wav2Vec2ForCTC", "Wav2Vec2Config", _WAV2VEC2, "audio"),
    Family(
        "wav2vec2-conformer",
        "Wav2Vec2ConformerForCTC",
        "Wav2Vec2ConformerConfig",
        dict(_WAV2VEC2, conv_depthwise_kernel_size=3, position_embeddings_type="relative"),
        "audio",
    ),
    # Its forward needs input_features of shape (batch, frames, feature_projection_input_dim).
    Family(
        "wav2vec2-bert",
        "Wav2Vec2BertForCTC",
        "Wav2Vec2BertConfig",
        _body(
            vocab_size=VOCAB,
            feature_projection_input_dim=16,
            conv_depthwise_kernel_size=3,
            pad_token_id=0,
            layerdrop=0.0,
            apply_spec_augment=False,
            mask_time_prob=0.0,
            position_embeddings_type="relative_key",
            left_max_position_embeddings=8,
            right_max_position_embeddings=8,
        ),
        "speech-features-ctc",
        example_inputs=True,
    ),
    Family("hubert", "HubertForCTC", "HubertConfig", _WAV2VEC2, "audio"),
    Family(
        "data2vec-audio",
        "Data2VecAudioForCTC",
        "Data2VecAudioConfig",
        dict(_WAV2VEC2, conv_pos_kernel_size=5, num_conv_pos_embeddings=2),
        "audio",
    ),
    Family("unispeech", "UniSpeechForCTC", "UniSpeechConfig", _WAV2VEC2, "audio"),
    Family("unispeech-sat", "UniSpeechSatForCTC", "UniSpeechSatConfig", _WAV2VEC2, "audio"),
    Family("sew", "SEWForCTC", "SEWConfig", dict(_WAV2VEC2, squeeze_factor=2), "audio"),
    Family(
        "sew-d",
        "SEWDForCTC",
        "SEWDConfig",
        dict(
            _WAV2VEC2,
            squeeze_factor=2,
            max_position_embeddings=32,
            position_buckets=8,
            share_att_key=True,
            relative_attention=True,
            pos_att_type=("p2c", "c2p"),
        ),
        "audio",
        note="SEW-D applies its dropout through DeBERTa's StableDropout (a custom autograd function): recognised "
        "by its form and converted like nn.Dropout; freeze puts StableDropout back with the learned rate",
    ),
    Family(
        "wavlm",
        "WavLMForCTC",
        "WavLMConfig",
        dict(_WAV2VEC2, num_buckets=16, max_bucket_distance=32),
        "audio",
        note="WavLM passes its attention dropout into F.multi_head_attention_forward (no nn.MultiheadAttention): "
        "the call is routed and torch's function runs with its dropout applied by the site",
    ),
    Family(
        "speecht5",
        "SpeechT5ForSpeechToText",
        "SpeechT5Config",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
            conv_dim=(16, 16),
            conv_kernel=(10, 3),
            conv_stride=(5, 2),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            apply_spec_augment=False,
            mask_time_prob=0.0,
            encoder_max_relative_position=16,
            max_speech_positions=1000,
            max_text_positions=64,
        ),
        "audio-seq2seq",
    ),
    Family(
        "moonshine",
        "MoonshineForConditionalGeneration",
        "MoonshineConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2,
            encoder_num_attention_heads=4,
            decoder_num_attention_heads=4,
            encoder_num_key_value_heads=4,
            decoder_num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        "audio-seq2seq",
    ),
    # Its forward needs input_features of shape (batch, frames, input_feat_per_channel).
    Family(
        "speech-to-text",
        "Speech2TextForConditionalGeneration",
        "Speech2TextConfig",
        dict(
            _ENCODER_DECODER,
            max_source_positions=64,
            max_target_positions=64,
            input_feat_per_channel=8,
            input_channels=1,
            conv_channels=16,
            num_conv_layers=2,
            conv_kernel_sizes=(5, 5),
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "speech-features-seq2seq",
        example_inputs=True,
    ),
    # Its forward needs a (batch, time, mel) spectrogram as input_values.
    Family(
        "ast",
        "ASTForAudioClassification",
        "ASTConfig",
        _body(num_labels=LABELS, patch_size=4, frequency_stride=4, time_stride=4, max_length=16, num_mel_bins=16),
        "spectrogram",
        example_inputs=True,
    ),
    # ----------------------------------------------------------------------------------------- multimodal
    Family(
        "clip",
        "CLIPModel",
        "CLIPConfig",
        dict(
            projection_dim=16,
            text_config=dict(_CLIP_TEXT, projection_dim=16),
            vision_config=_body(projection_dim=16, **_IMAGE_INPUT),
        ),
        "text-image",
    ),
    Family(
        "chinese-clip",
        "ChineseCLIPModel",
        "ChineseCLIPConfig",
        dict(projection_dim=16, text_config=dict(_BERT), vision_config=_body(**_IMAGE_INPUT)),
        "text-image",
    ),
    Family(
        "altclip",
        "AltCLIPModel",
        "AltCLIPConfig",
        dict(
            projection_dim=16,
            text_config=dict(_BERT, project_dim=16, max_position_embeddings=64),
            vision_config=_body(**_IMAGE_INPUT),
        ),
        "text-image",
    ),
    Family(
        "siglip",
        "SiglipModel",
        "SiglipConfig",
        dict(text_config=dict(_CLIP_TEXT, projection_size=32), vision_config=_body(**_IMAGE_INPUT)),
        "text-image",
    ),
    # Its forward needs flattened patches with their attention mask and grid shapes.
    Family(
        "siglip2",
        "Siglip2Model",
        "Siglip2Config",
        dict(
            text_config=dict(_CLIP_TEXT, projection_size=32),
            vision_config=_body(num_channels=3, patch_size=PATCH, num_patches=16),
        ),
        "siglip2",
        example_inputs=True,
    ),
    Family(
        "owlvit",
        "OwlViTModel",
        "OwlViTConfig",
        dict(
            projection_dim=16,
            text_config=dict(_CLIP_TEXT, max_position_embeddings=16),
            vision_config=_body(**_IMAGE_INPUT),
        ),
        "text-image",
    ),
    Family(
        "align",
        "AlignModel",
        "AlignConfig",
        dict(
            projection_dim=32,
            text_config=dict(_BERT),
            vision_config=dict(image_size=IMAGE, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
        ),
        "text-image",
    ),
    Family(
        "groupvit",
        "GroupViTModel",
        "GroupViTConfig",
        dict(
            projection_dim=16,
            projection_intermediate_dim=32,
            text_config=_CLIP_TEXT,
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                depths=[1, 1],
                num_group_tokens=[4, 0],
                num_output_groups=[4, 4],
                num_attention_heads=4,
                image_size=IMAGE,
                patch_size=PATCH,
            ),
        ),
        "text-image",
    ),
    # Its forward needs a (batch, 1, time, mel) spectrogram as input_features beside input_ids.
    Family(
        "clap",
        "ClapModel",
        "ClapConfig",
        dict(
            projection_dim=16,
            text_config=dict(_BERT, projection_dim=16),
            audio_config=dict(
                window_size=4,
                num_mel_bins=16,
                spec_size=32,
                patch_size=4,
                patch_stride=[4, 4],
                hidden_size=32,
                projection_dim=16,
                depths=[1, 1],
                num_attention_heads=[2, 4],
                patch_embeds_hidden_size=16,
                num_hidden_layers=2,
                drop_path_rate=0.0,
            ),
        ),
        "text-audio",
        example_inputs=True,
    ),
    # Its forward needs pixel_values beside input_ids (its vision config is called image_config), without which
    # the image and multimodal towers never run.
    Family(
        "flava",
        "FlavaModel",
        "FlavaConfig",
        dict(
            projection_dim=16,
            hidden_size=32,
            text_config=dict(_BERT),
            image_config=_body(**_IMAGE_INPUT),
            multimodal_config=_body(),
        ),
        "text-image",
        example_inputs=True,
    ),
    Family(
        "bridgetower",
        "BridgeTowerModel",
        "BridgeTowerConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            text_config=dict(_BERT),
            vision_config=dict(hidden_size=64, num_hidden_layers=2, patch_size=PATCH, image_size=IMAGE),
        ),
        "text-image",
    ),
    # Its forward needs pixel_values of shape (batch, num_images, 3, height, width) beside input_ids.
    Family(
        "vilt",
        "ViltForImagesAndTextClassification",
        "ViltConfig",
        dict(_BERT, **_IMAGE_INPUT, max_position_embeddings=16, num_images=1),
        "text-images",
        example_inputs=True,
    ),
    # Its forward needs pixel_values beside input_ids.
    Family(
        "vilt-vqa",
        "ViltForQuestionAnswering",
        "ViltConfig",
        dict(_BERT, **_IMAGE_INPUT, max_position_embeddings=16),
        "text-image",
        example_inputs=True,
    ),
    # Its forward needs bbox, and pixel_values without which the image patches' dropout never runs.
    Family(
        "layoutlmv3",
        "LayoutLMv3ForSequenceClassification",
        "LayoutLMv3Config",
        dict(
            _BERT,
            coordinate_size=4,
            shape_size=8,
            input_size=IMAGE,
            patch_size=PATCH,
            rel_pos_bins=8,
            max_rel_pos=16,
            rel_2d_pos_bins=8,
            max_rel_2d_pos=32,
        ),
        "layout-image",
        example_inputs=True,
    ),
    Family(
        "blip",
        "BlipForConditionalGeneration",
        "BlipConfig",
        dict(
            projection_dim=16,
            text_config=_body(
                vocab_size=VOCAB,
                encoder_hidden_size=32,
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                sep_token_id=2,
            ),
            vision_config=_body(**_IMAGE_INPUT),
        ),
        "text-image",
    ),
    Family(
        "blip-2",
        "Blip2ForConditionalGeneration",
        "Blip2Config",
        dict(
            num_query_tokens=4,
            vision_config=_body(**_IMAGE_INPUT),
            qformer_config=dict(_BERT, encoder_hidden_size=32),
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=64,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
                model_type="opt",
                pad_token_id=1,
                bos_token_id=2,
                eos_token_id=2,
            ),
            image_token_index=_IMAGE_TOKEN,
        ),
        "blip-2",
        adjust_model=_randomise_query_tokens,
    ),
    Family(
        "git",
        "GitForCausalLM",
        "GitConfig",
        dict(_BERT, vision_config=_body(**_IMAGE_INPUT), bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "text-image",
    ),
    # Its forward needs pixel_values at the encoder's image size beside decoder_input_ids.
    Family(
        "vit-gpt2",
        "VisionEncoderDecoderModel",
        "VisionEncoderDecoderConfig",
        dict(
            encoder=dict(_VIT, model_type="vit"),
            decoder=dict(_GPT2, model_type="gpt2", add_cross_attention=True),
            decoder_start_token_id=1,
            pad_token_id=0,
        ),
        "image-seq2seq",
        example_inputs=True,
    ),
    # Its forward needs image_embeds_position_mask marking the image features' places in input_ids.
    Family(
        "kosmos-2",
        "Kosmos2ForConditionalGeneration",
        "Kosmos2Config",
        dict(
            latent_query_num=4,
            text_config=dict(
                vocab_size=VOCAB,
                embed_dim=32,
                layers=2,
                attention_heads=4,
                ffn_dim=64,
                max_position_embeddings=64,
                layerdrop=0.0,
            ),
            vision_config=_body(**_IMAGE_INPUT),
        ),
        "kosmos-2",
        example_inputs=True,
    ),
    # Its forward needs one image token per image feature in input_ids.
    Family(
        "llava",
        "LlavaForConditionalGeneration",
        "LlavaConfig",
        dict(
            text_config=dict(_LLAMA, model_type="llama"),
            vision_config=dict(_body(**_IMAGE_INPUT), model_type="clip_vision_model"),
            image_token_id=_IMAGE_TOKEN,
            vision_feature_layer=-1,
        ),
        "image-tokens",
        example_inputs=True,
    ),
    # Its forward needs one image token per image feature in input_ids.
    Family(
        "paligemma",
        "PaliGemmaForConditionalGeneration",
        "PaliGemmaConfig",
        dict(
            text_config=dict(_LLAMA, model_type="gemma", head_dim=8),
            vision_config=dict(_body(**_IMAGE_INPUT), model_type="siglip_vision_model"),
            image_token_id=_IMAGE_TOKEN,
            projection_dim=32,
        ),
        "paligemma",
        example_inputs=True,
    ),
    # Its forward needs image tokens in input_ids and pixel_values of shape (batch, images, 3, height, width).
    Family(
        "idefics2",
        "Idefics2ForConditionalGeneration",
        "Idefics2Config",
        dict(
            text_config=dict(_LLAMA, model_type="mistral"),
            vision_config=_body(**_IMAGE_INPUT),
            perceiver_config=dict(
                hidden_size=32,
                resampler_n_latents=4,
                resampler_depth=1,
                resampler_n_heads=2,
                resampler_head_dim=8,
                num_key_value_heads=2,
            ),
            image_token_id=_IMAGE_TOKEN,
        ),
        "idefics2",
        example_inputs=True,
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
                try:
                    setattr(cfg, key, rate_for(key))
                except Exception:  # noqa: BLE001 - huggingface_hub's StrictDataclassFieldValidationError
                    # A validated field typed int (MPT's attn_pdrop): the rate is written past the validator.
                    cfg.__dict__[key] = rate_for(key)
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
    if family.adjust_config is not None:
        family.adjust_config(config)
    model = instantiate(model_cls, config)
    if family.adjust_model is not None:
        torch.manual_seed(7)
        with torch.no_grad():
            family.adjust_model(model)
    return model, fields


def make_inputs(kind: str, config: Any) -> Dict[str, Any]:
    """Keyword arguments of one forward (seeded); token ids avoid ids 0-2 (pad/bos/eos in the configs).

    The common kinds: ``text`` (input_ids), ``causal`` (with ``use_cache=False``), ``seq2seq`` (with
    decoder_input_ids), ``image`` (pixel_values), ``text-image``, ``speech-seq2seq`` (mel features),
    ``audio`` (raw samples). The others are what one family's forward needs (see the branches).
    """
    generator = torch.Generator().manual_seed(1)

    def tokens(seq: int = SEQ) -> torch.Tensor:
        return torch.randint(3, VOCAB, (BATCH, seq), generator=generator)

    def pixels(size: int = IMAGE) -> torch.Tensor:
        return torch.randn(BATCH, 3, size, size, generator=generator)

    def boxes() -> torch.Tensor:
        corner = torch.randint(0, 400, (BATCH, SEQ, 2), generator=generator)
        return torch.cat([corner, corner + 100], -1)

    def with_image_tokens(count: int, token: int) -> torch.Tensor:
        """BOS, ``count`` image tokens (the image features' places), then SEQ text tokens."""
        ids = torch.randint(3, _IMAGE_TOKEN - 1, (BATCH, 1 + count + SEQ), generator=generator)
        ids[:, 0] = 1
        ids[:, 1 : 1 + count] = token
        return ids

    if kind == "text":
        return {"input_ids": tokens()}
    if kind == "text-16":
        return {"input_ids": tokens(16)}
    if kind == "multiple-choice":  # 3 choices per example
        return {"input_ids": torch.randint(3, VOCAB, (BATCH, 3, SEQ), generator=generator)}
    if kind == "layout":  # a box per token
        return {"input_ids": tokens(), "bbox": boxes()}
    if kind == "layout-image":
        return {"input_ids": tokens(), "bbox": boxes(), "pixel_values": pixels(config.input_size)}
    if kind == "causal":
        return {"input_ids": tokens(), "use_cache": False}
    if kind == "causal-16":
        return {"input_ids": tokens(16), "use_cache": False}
    if kind == "causal-cross-attention":  # a decoder reading 5 encoder states
        states = torch.randn(BATCH, 5, config.n_embd, generator=generator)
        return {"input_ids": tokens(), "encoder_hidden_states": states, "use_cache": False}
    if kind == "seq2seq":
        return {"input_ids": tokens(), "decoder_input_ids": tokens(), "use_cache": False}
    if kind == "seq2seq-classification":  # the head reads each row's last <eos>
        ids = tokens()
        ids[:, -1] = config.eos_token_id
        return {"input_ids": ids, "use_cache": False}
    if kind == "image":
        return {"pixel_values": pixels()}
    if kind == "image-config-size":  # MobileViTV2 halves 32 pixels too often: its config's size
        return {"pixel_values": pixels(config.image_size)}
    if kind == "image-mae":  # the noise that picks the masked patches, as an input
        patches = (config.image_size // config.patch_size) ** 2
        return {"pixel_values": pixels(), "noise": torch.rand(BATCH, patches, generator=generator)}
    if kind == "image-seq2seq":
        return {"pixel_values": pixels(), "decoder_input_ids": tokens()}
    if kind == "text-image":
        return {"input_ids": tokens(), "pixel_values": pixels()}
    if kind == "text-images":  # one image per example, with its own dimension
        return {"input_ids": tokens(), "pixel_values": pixels().unsqueeze(1)}
    if kind == "siglip2":  # flattened patches, their mask and the patch grid's shape
        vision = config.vision_config
        side = int(vision.num_patches**0.5)
        patches = torch.randn(BATCH, vision.num_patches, 3 * vision.patch_size**2, generator=generator)
        return {
            "input_ids": tokens(),
            "pixel_values": patches,
            "pixel_attention_mask": torch.ones(BATCH, vision.num_patches, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * BATCH),
        }
    if kind == "text-audio":  # CLAP: a (1, time, mel) spectrogram
        mel = config.audio_config.num_mel_bins
        return {"input_ids": tokens(), "input_features": torch.randn(BATCH, 1, 32, mel, generator=generator)}
    if kind == "image-tokens":  # LLaVA: one image token per patch
        count = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return {
            "input_ids": with_image_tokens(count, config.image_token_id),
            "pixel_values": pixels(),
            "use_cache": False,
        }
    if kind == "paligemma":  # image tokens as prefix (token type 0), text as suffix (token type 1)
        count = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        ids = with_image_tokens(count, config.image_token_id)
        token_type_ids = torch.zeros_like(ids)
        token_type_ids[:, 1 + count + SEQ // 2 :] = 1
        return {"input_ids": ids, "pixel_values": pixels(), "token_type_ids": token_type_ids, "use_cache": False}
    if kind == "idefics2":  # one image per example, resampled to resampler_n_latents tokens
        ids = with_image_tokens(config.perceiver_config.resampler_n_latents, config.image_token_id)
        return {"input_ids": ids, "pixel_values": pixels().unsqueeze(1), "use_cache": False}
    if kind == "blip-2":  # one image token per query token
        ids = with_image_tokens(config.num_query_tokens, config.image_token_index)
        return {"input_ids": ids, "pixel_values": pixels(), "use_cache": False}
    if kind == "kosmos-2":  # the latent queries' places in the text, marked by image_embeds_position_mask
        ids = with_image_tokens(config.latent_query_num, 3)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 1 : 1 + config.latent_query_num] = True
        return {"input_ids": ids, "pixel_values": pixels(), "image_embeds_position_mask": mask, "use_cache": False}
    if kind == "speech-seq2seq":
        frames = 2 * config.max_source_positions  # the encoder insists on exactly this many frames
        features = torch.randn(BATCH, config.num_mel_bins, frames, generator=generator)
        return {"input_features": features, "decoder_input_ids": tokens(), "use_cache": False}
    if kind == "speech-features-seq2seq":  # Speech2Text: (time, features), 32 frames
        width = config.input_feat_per_channel * config.input_channels
        features = torch.randn(BATCH, 32, width, generator=generator)
        return {"input_features": features, "decoder_input_ids": tokens(), "use_cache": False}
    if kind == "speech-features-ctc":  # Wav2Vec2-BERT: (time, features), 32 frames
        return {"input_features": torch.randn(BATCH, 32, config.feature_projection_input_dim, generator=generator)}
    if kind == "spectrogram":  # AST: (time, mel)
        spectrogram = torch.randn(BATCH, config.max_length, config.num_mel_bins, generator=generator)
        return {"input_values": spectrogram}
    if kind == "audio":
        return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=generator)}
    if kind == "audio-seq2seq":  # raw audio in, text out
        audio = torch.randn(BATCH, 4000, generator=generator)
        return {"input_values": audio, "decoder_input_ids": tokens(), "use_cache": False}
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


def _cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (classes last) against random targets drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(2)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator).to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def data_loss(output: Any) -> torch.Tensor:
    """Cross-entropy of the logits (classes last) against random targets drawn from a fixed seed.

    An output without logits (the embeddings of a multi-tower model such as FLAVA or BridgeTower, a depth map)
    gets the sum of that loss over every floating-point output tensor that needs a gradient, so that every
    tower the outputs depend on is in the loss, not only the first output's.
    """
    logits = next(
        (getattr(output, name) for name in ("logits", "logits_per_image") if getattr(output, name, None) is not None),
        None,
    )
    if logits is not None:
        return _cross_entropy(logits)
    tensors = output_tensors(output)
    trained = [t for t in tensors if t.is_floating_point() and t.requires_grad and t.dim() > 0]
    if not trained:
        return _cross_entropy(tensors[0])
    return sum((_cross_entropy(t) for t in trained), torch.zeros((), device=trained[0].device))
