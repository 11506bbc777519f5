"""Dry-run inputs for HuggingFace transformers models, built from their configs.

transformers models cannot be traced by torch.fx, so cd_convert discovers their dropout in one dry run; a user
converting ``AutoModel.from_config(...)`` passes no inputs, and :func:`example_inputs_for` builds them from the
model's config and its forward's parameters: token ids, pixels, audio (raw samples, filter-bank features or a
spectrogram), patchified pixels (SigLIP2), decoder inputs, image tokens for vision-language models, and the
extra inputs some families need to take the path their dropout sits on. A forward this cannot serve raises a
:class:`~cd_convert.errors.ConversionError` that asks for ``example_inputs=``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from ..errors import ConversionError

__all__ = ["example_inputs_for"]

_BATCH, _SEQ = 2, 8


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


#: Config fields that give the image size (LayoutLMv3 calls it ``input_size``).
_IMAGE_SIZE_FIELDS = ("image_size", "input_size")


def _sub_config_with(config: Any, names: Tuple[str, ...], fields: Tuple[str, ...]) -> Any:
    """The first sub-config among ``names`` that sets one of ``fields``, else the config itself."""
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and _config_value(sub, *fields) is not None:
            return sub
    return config


def _vision_config(config: Any) -> Any:
    """Where the image shape is: the vision sub-config (``image_config`` in FLAVA), a vision encoder's config
    (VisionEncoderDecoder), or the config itself."""
    return _sub_config_with(config, ("vision_config", "image_config", "encoder"), _IMAGE_SIZE_FIELDS)


def _pixel_values(config: Any) -> torch.Tensor:
    vision = _vision_config(config)
    size = _config_value(vision, *_IMAGE_SIZE_FIELDS, default=224)
    size = size if isinstance(size, int) else int(size[0])
    channels = _config_value(vision, "num_channels", default=3)
    return torch.randn(_BATCH, channels, size, size)


def _input_features(config: Any) -> torch.Tensor:
    """Filter-bank features in the layout the config describes.

    Whisper: ``(B, mel bins, 2 * max_source_positions)``; Speech2Text: ``(B, frames, features per channel x
    channels)``; Wav2Vec2-BERT: ``(B, frames, feature_projection_input_dim)``.
    """
    if getattr(config, "input_feat_per_channel", None) is not None:
        return torch.randn(_BATCH, 4 * _SEQ, config.input_feat_per_channel * getattr(config, "input_channels", 1))
    if getattr(config, "feature_projection_input_dim", None) is not None:
        return torch.randn(_BATCH, 2 * _SEQ, config.feature_projection_input_dim)
    mel_bins = _config_value(config, "num_mel_bins", default=80)
    frames = 2 * _config_value(config, "max_source_positions", default=1500)
    return torch.randn(_BATCH, mel_bins, frames)


def _input_values(config: Any) -> torch.Tensor:
    """``input_values``: raw audio (wav2vec2, HuBERT, ...), enough samples for 16 frames after the convolutional
    feature encoder; or, for a model without one that reads a spectrogram (AST), ``(B, max_length, mel bins)``,
    the length its position embeddings are built for."""
    if getattr(config, "conv_stride", None) is None and getattr(config, "num_mel_bins", None) is not None:
        return torch.randn(_BATCH, _config_value(config, "max_length", default=1024), config.num_mel_bins)
    ratio = 1
    for stride in _config_value(config, "conv_stride", default=(320,)):
        ratio *= int(stride)
    return torch.randn(_BATCH, 16 * ratio)


def _patchified_pixels(config: Any) -> Dict[str, torch.Tensor]:
    """Pixels as a NaFlex model (SigLIP2) takes them: ``(B, patches, channels x patch x patch)`` flattened patches,
    an all-ones ``pixel_attention_mask`` and the patch grid's ``spatial_shapes`` (rows x columns = patches).
    """
    vision = _sub_config_with(config, ("vision_config",), ("num_patches",))  # it sets no image size
    patches = int(_config_value(vision, "num_patches", default=256))
    size = int(_config_value(vision, "patch_size", default=16))
    channels = int(_config_value(vision, "num_channels", default=3))
    rows = max(d for d in range(1, math.isqrt(patches) + 1) if patches % d == 0)
    return {
        "pixel_values": torch.randn(_BATCH, patches, channels * size * size),
        "pixel_attention_mask": torch.ones(_BATCH, patches, dtype=torch.long),
        "spatial_shapes": torch.tensor([[rows, patches // rows]] * _BATCH),
    }


def _audio_features(config: Any) -> torch.Tensor:
    """A text-audio model's (CLAP's) ``input_features``: one ``(time, mel bins)`` spectrogram per example, with a
    channel dimension; the audio encoder resizes the time axis itself."""
    return torch.randn(_BATCH, 1, 4 * _SEQ, _config_value(config.audio_config, "num_mel_bins", default=64))


def _with_image_places(inputs: Dict[str, Any], count: int) -> Dict[str, Any]:
    """Kosmos-2: ``count`` places for the image's latent queries after the first token, marked by
    ``image_embeds_position_mask`` (their token ids are replaced by the image features)."""
    ids = inputs["input_ids"]
    places = ids[:, 1:2].expand(-1, count)
    ids = torch.cat([ids[:, :1], places, ids[:, 1:]], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1 : 1 + count] = True
    inputs = dict(inputs, input_ids=ids, image_embeds_position_mask=mask)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def _sequence_length(config: Any) -> int:
    """8 tokens, or what the model needs to take its configured path.

    Reformer trains only on the product of its axial position shape; BigBird's block-sparse attention falls back
    to full attention on sequences of at most ``(5 + 2 * num_random_blocks) * block_size`` tokens.
    """
    block = getattr(config, "block_size", None)
    if getattr(config, "attention_type", None) == "block_sparse" and isinstance(block, int):
        return max(_SEQ, (6 + 2 * int(getattr(config, "num_random_blocks", 0))) * block)
    axial = getattr(config, "axial_pos_shape", None)
    if axial and getattr(config, "axial_pos_embds", True):
        return math.prod(int(size) for size in axial)
    return _SEQ


def _text_config(config: Any) -> Any:
    """Where the vocabulary is: the text sub-config, a text decoder's config (VisionEncoderDecoder), or the config."""
    return _sub_config_with(config, ("text_config", "decoder"), ("vocab_size",))


def _token_ids(config: Any) -> torch.Tensor:
    text = _text_config(config)
    vocab = _config_value(text, "vocab_size", default=100)
    generator = torch.Generator().manual_seed(0)
    # Start at 3 so that no id is a pad/bos/eos id of the usual tokenizers (BART shifts on pad tokens).
    return torch.randint(min(3, vocab - 1), vocab, (_BATCH, _sequence_length(text)), generator=generator)


def example_inputs_for(model: nn.Module) -> Dict[str, Any]:
    """Keyword arguments for one training-mode forward of a transformers model, built from its config.

    Covers text (``input_ids`` with an all-ones ``attention_mask``), vision (``pixel_values``; patchified for
    NaFlex models), audio (``input_features``, raw or spectrogram ``input_values``), text-image and text-audio
    models (both), encoder-decoders (``decoder_input_ids``), image tokens and image places of
    vision-language models; ``use_cache=False`` where accepted. Tensors are put on the model's device, floating
    ones in its floating dtype.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        A dict for ``model(**inputs)``.

    Raises:
        ConversionError: when the forward needs an input this function cannot build; pass
            ``example_inputs=`` to :func:`cd_convert.convert` then.
    """
    config = model.config
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    main = getattr(model, "main_input_name", "input_ids")
    builders = {
        "input_ids": _token_ids,
        "pixel_values": _pixel_values,
        "input_features": _input_features,
        "input_values": _input_values,
    }
    inputs: Dict[str, Any] = {}
    if main not in builders:
        raise ConversionError(
            f"cannot build a dry-run input {main!r} for {type(model).__name__}; pass "
            "example_inputs={...} (keyword arguments of the model's forward) to cd_convert.convert."
        )
    inputs[main] = builders[main](config)
    for name in ("input_ids", "pixel_values"):
        if name != main and name in parameters and _has_sub_config_for(config, name):
            inputs[name] = builders[name](config)
    if "pixel_values" in inputs and "spatial_shapes" in parameters:
        inputs.update(_patchified_pixels(config))
    if main != "input_features" and "input_features" in parameters and getattr(config, "audio_config", None):
        inputs["input_features"] = _audio_features(config)
    if "input_ids" in inputs and "attention_mask" in parameters:
        # An explicit all-ones mask: without one, masks are derived from positions (data-dependent code that
        # a model on the meta device cannot run).
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    text = _text_config(config)
    eos, vocab = getattr(text, "eos_token_id", None), _config_value(text, "vocab_size", default=0)
    if type(model).__name__.endswith("ForSequenceClassification") and "input_ids" in inputs:
        # Sequence classifiers of encoder-decoders (BART) read the state at each example's end-of-sequence token.
        if isinstance(eos, int) and 0 <= eos < vocab:
            inputs["input_ids"][:, -1] = eos
    if "encoder_hidden_states" in parameters and getattr(config, "add_cross_attention", False):
        # A decoder with cross-attention (GPT-2, BERT as a decoder): without encoder states that attention and
        # its dropout never run.
        hidden = _config_value(config, "hidden_size", "n_embd", default=32)
        inputs["encoder_hidden_states"] = torch.randn(_BATCH, _SEQ, hidden)
    if type(model).__name__.endswith("ForMultipleChoice"):
        # (batch, choices, length): two choices per example.
        for name in ("input_ids", "attention_mask"):
            if name in inputs:
                inputs[name] = inputs[name].unsqueeze(1).expand(-1, 2, -1).contiguous()
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        start = _config_value(config, "decoder_start_token_id", "bos_token_id", default=0)
        ids = _token_ids(config)
        ids[:, 0] = start
        inputs["decoder_input_ids"] = ids
    latent_queries = getattr(config, "latent_query_num", None)
    if "image_embeds_position_mask" in parameters and isinstance(latent_queries, int) and "input_ids" in inputs:
        inputs = _with_image_places(inputs, latent_queries)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return _with_image_tokens(model, _on_model_device(model, inputs))


def _with_image_tokens(model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """For a vision-language model (LLaVA, PaliGemma, ...): one image token in ``input_ids`` per image feature.

    These models put each image's features where ``input_ids`` holds their image token and refuse a count that
    does not match. The count is read from ``get_image_features`` on the built pixels (its ``pooler_output``:
    the projected features, one ``(tokens, dim)`` tensor per image, a ``(images, tokens, dim)`` tensor or every
    image's features in one ``(images * tokens, dim)`` tensor), run
    without gradients on a fork of the RNG. Models without an integer ``image_token_id`` or that method, or
    whose features cannot be read this way, keep their inputs (the dry run then says what went wrong).
    """
    token = getattr(model.config, "image_token_id", None)
    ids, pixels = inputs.get("input_ids"), inputs.get("pixel_values")
    if not isinstance(token, int) or ids is None or pixels is None or not hasattr(model, "get_image_features"):
        return inputs
    devices = [pixels.device.index or 0] if pixels.device.type == "cuda" else []
    features = None
    # (batch, channels, height, width), or (batch, images, channels, height, width) as Idefics takes them.
    for candidate in (pixels, pixels.unsqueeze(1)):
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                features = model.get_image_features(pixel_values=candidate)
        except Exception:  # noqa: BLE001 - any failure leaves the inputs as they were
            continue
        pixels = candidate
        break
    if features is None:
        return inputs
    features = getattr(features, "pooler_output", features)
    first = features[0] if isinstance(features, (list, tuple)) else features
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        return inputs
    count = first.shape[-2]
    if first is features and first.dim() == 2:
        # One (images * tokens, dim) tensor, every image's features in a row (Idefics2 in transformers 4.x).
        images = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)
        if count % images:
            return inputs
        count //= images
    image_ids = torch.full((ids.shape[0], count), token, dtype=ids.dtype, device=ids.device)
    inputs = dict(inputs, input_ids=torch.cat([image_ids, ids], dim=1), pixel_values=pixels)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def _on_model_device(model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """Inputs on the model's device, floating ones in its floating dtype (a bf16 model takes bf16 pixels)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        return inputs
    device, dtype = params[0].device, params[0].dtype
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        moved[name] = value
    return moved


def _has_sub_config_for(config: Any, name: str) -> bool:
    """Whether a model whose main input is another one takes ``name`` too.

    Text-image models (CLIP, SigLIP, FLAVA, ...) hold both sub-configs; a single-config text-image model (ViLT,
    LayoutLMv3) has a vocabulary and an image size.
    """
    if name == "input_ids":
        return getattr(config, "text_config", None) is not None
    if getattr(config, "vision_config", None) is not None or getattr(config, "image_config", None) is not None:
        return True
    return _config_value(config, *_IMAGE_SIZE_FIELDS) is not None and getattr(config, "vocab_size", None) is not None
