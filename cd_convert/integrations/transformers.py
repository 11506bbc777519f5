"""HuggingFace transformers awareness: dry-run inputs, eager attention while a site is active, call provenance.

transformers models cannot be traced by torch.fx (their forwards are wrapped as ``(*args, **kwargs)``), and
their attention dropout is not a module call: an attention module passes a rate (``self.attention_dropout``,
``self.dropout.p``) as ``dropout=`` to an *attention interface* chosen by ``config._attn_implementation``
(eager, sdpa, flash, flex). Only the family's eager function applies it as an explicit ``F.dropout`` (or a
module call) on the attention probabilities. So, for these models:

* discovery runs one dry run on inputs built from the config (:func:`example_inputs_for`) with every config
  switched to eager attention (:func:`eager_attention`), where attention dropout shows up as a call;
* a call made inside an attention interface is recognised by :func:`called_through_attention_interface`;
* the converted model switches to eager attention only while one of its attention sites is active
  (training, Monte Carlo prediction), with :class:`EagerAttentionSwitch` on each ``PreTrainedModel`` (where
  the attention masks are built, in the format of the implementation) and on each attention module (so a
  gradient-checkpointing recomputation takes the same path). In eval the model's own implementation runs.

This module imports transformers lazily: nothing here requires it unless the model is a transformers model.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import ConversionError
from ..sites.base import Change, submodule

# ConcreteDropoutTrainer (module __getattr__ below) is public too, but not listed: a star import would then need
# transformers' Trainer and accelerate, which nothing else here needs.
__all__ = [
    "is_transformers_model",
    "example_inputs_for",
    "eager_attention",
    "attention_is_eager",
    "called_through_attention_interface",
    "eager_switches",
]

#: Name of the local variable in which transformers' attention modules hold the chosen attention function.
_INTERFACE_LOCAL = "attention_interface"
#: Keyword arguments of packed (padding-free) batches for flash attention, which eager attention cannot honour.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")
_BATCH, _SEQ = 2, 8


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules is a transformers ``PreTrainedModel``."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return any(isinstance(m, PreTrainedModel) for m in model.modules())


#: Where a config keeps its attention implementation (``_attn_implementation`` is a property over it whose setter
#: also rewrites the sub-configs; writing the field itself lets each config be restored exactly).
_IMPLEMENTATION = "_attn_implementation_internal"


def _with_sub_configs(config: Any) -> List[Any]:
    """``config`` and those of its sub-configs that select an attention implementation."""
    subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
    return [config] + [s for s in subs if s is not None and hasattr(s, "_attn_implementation")]


def _attention_configs(model: nn.Module) -> List[Any]:
    """Every distinct config object held by the model's modules that selects an attention implementation."""
    configs: Dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.update((id(c), c) for c in _with_sub_configs(config))
    return list(configs.values())


def _select_eager(configs: List[Any]) -> List[Tuple[Any, Optional[str]]]:
    """Set every config to eager attention; return what each held, for :func:`_restore`."""
    saved = [(config, config.__dict__.get(_IMPLEMENTATION)) for config in configs]
    for config, _ in saved:
        config.__dict__[_IMPLEMENTATION] = "eager"
    return saved


def _restore(saved: List[Tuple[Any, Optional[str]]]) -> None:
    for config, value in saved:
        config.__dict__[_IMPLEMENTATION] = value


def attention_is_eager(model: nn.Module) -> bool:
    """Whether every attention config of ``model`` already selects eager attention (True without any)."""
    return all(config._attn_implementation in (None, "eager") for config in _attention_configs(model))


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch every attention config of ``model`` to ``"eager"`` for the duration, then restore each exactly.

    Args:
        model: any model (a no-op for models without transformers configs).
    """
    saved = _select_eager(_attention_configs(model))
    try:
        yield
    finally:
        _restore(saved)


def called_through_attention_interface(frame: Any) -> bool:
    """Whether a dropout call made in ``frame`` is attention dropout of a transformers attention module.

    transformers' attention modules keep the chosen attention function in a local named
    ``attention_interface``. A call is attention dropout when, walking outward from it, the first frame that
    holds that local has called (directly or not) the interface's code (the eager function), or when the call
    is made in another method of the same attention module (GPT-2's upcast path). A call made in the
    attention module's ``forward`` itself (its output dropout) is not.

    Args:
        frame: the first frame of model code at the call (torch's and cd_convert's own frames skipped).

    Returns:
        True for attention dropout.
    """
    first, passed = frame, set()
    while frame is not None:
        code = frame.f_code
        interface = frame.f_locals.get(_INTERFACE_LOCAL) if _INTERFACE_LOCAL in code.co_varnames else None
        if interface is not None:
            if frame is first:
                return False
            inner = getattr(getattr(interface, "__wrapped__", interface), "__code__", None)
            owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
            first_self = first.f_locals.get(first.f_code.co_varnames[0]) if first.f_code.co_argcount else None
            return inner in passed or (owner is not None and first_self is owner)
        passed.add(code)
        frame = frame.f_back
    return False


# -- inputs for a dry run ------------------------------------------------------------------------------


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
    """Raw audio (wav2vec2, HuBERT, ...): enough samples for 16 frames after the convolutional feature encoder."""
    ratio = 1
    for stride in _config_value(config, "conv_stride", default=(320,)):
        ratio *= int(stride)
    return torch.randn(_BATCH, 16 * ratio)


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

    Covers text (``input_ids`` with an all-ones ``attention_mask``), vision (``pixel_values``), audio
    (``input_features``, raw ``input_values``), text-image models (both) and encoder-decoders
    (``decoder_input_ids``); ``use_cache=False`` where accepted. Tensors are put on the model's device, floating
    ones in its floating dtype.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        A dict for ``model(**inputs)``.

    Raises:
        ConversionError: when the forward needs an input this function cannot build; pass
            ``example_inputs=`` to :func:`cd_convert.convert` then.
    """
    import inspect

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
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return _with_image_tokens(model, _on_model_device(model, inputs))


def _with_image_tokens(model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """For a vision-language model (LLaVA, PaliGemma, ...): one image token in ``input_ids`` per image feature.

    These models put each image's features where ``input_ids`` holds their image token and refuse a count that
    does not match. The count is read from ``get_image_features`` on the built pixels (its ``pooler_output``:
    the projected features, one ``(tokens, dim)`` tensor per image or a ``(images, tokens, dim)`` tensor), run
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


# -- the run-time switch -------------------------------------------------------------------------------


@dataclass
class EagerAttentionHook:
    """Forward pre-hook (and its matching post-hook) that selects eager attention while ``sites`` are active.

    Attributes:
        sites: the concrete sites whose activity needs the eager path (shared references, so a deep copy of
            the model maps them to the copy's sites).
        saved: the implementation to restore, per nesting level.
    """

    sites: List[nn.Module]
    saved: List[List[Tuple[Any, Optional[str]]]] = field(default_factory=list)

    def before(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        current = module.config.__dict__.get(_IMPLEMENTATION)
        if current not in (None, "eager") and any(site.active for site in self.sites):
            _refuse_packed_sequences(module, current, kwargs)
            self.saved.append(_select_eager(_with_sub_configs(module.config)))
        else:
            self.saved.append([])

    def after(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        if self.saved:
            _restore(self.saved.pop())


def _refuse_packed_sequences(module: nn.Module, implementation: str, kwargs: Dict[str, Any]) -> None:
    """Eager attention cannot reproduce flash attention over packed sequences (no mask, restarting positions)."""
    packed = any(kwargs.get(name) is not None for name in _PACKED_KWARGS)
    positions = kwargs.get("position_ids")
    if not packed and "flash" in implementation and isinstance(positions, torch.Tensor) and positions.dim() == 2:
        packed = bool((positions[:, 1:] < positions[:, :-1]).any())
    if packed:
        raise RuntimeError(
            f"{type(module).__name__}: packed sequences with {implementation} cannot be computed by the explicit "
            "attention that learned attention dropout needs. Pad the batch (attention_mask) instead of packing, or "
            "convert with fused_attention=False to keep attention dropout fixed and fused."
        )


@dataclass
class EagerAttentionSwitch(Change):
    """Installs :class:`EagerAttentionHook` on one module that holds a transformers config.

    Attributes:
        owner: qualified name of the module (a ``PreTrainedModel`` or an attention module).
        site_names: qualified names of the attention sites whose activity selects the eager path.
    """

    owner: str
    site_names: List[str]
    site_name: str = ""
    kind: str = "attribute"
    hook_ids: Tuple[int, int] = (-1, -1)

    PATH_FIELDS = ("owner", "site_names")

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        owner = submodule(root, self.owner)
        hook = EagerAttentionHook([root.get_submodule(name) for name in self.site_names])
        pre = owner.register_forward_pre_hook(hook.before, with_kwargs=True)
        post = owner.register_forward_hook(hook.after, with_kwargs=True, always_call=True)
        self.hook_ids = (pre.id, post.id)

    def undo(self, root: nn.Module) -> None:
        owner = submodule(root, self.owner)
        pre, post = self.hook_ids
        owner._forward_pre_hooks.pop(pre, None)
        owner._forward_pre_hooks_with_kwargs.pop(pre, None)
        owner._forward_hooks.pop(post, None)
        owner._forward_hooks_with_kwargs.pop(post, None)
        owner._forward_hooks_always_called.pop(post, None)


def eager_switches(model: nn.Module, attention_sites: Dict[str, str]) -> List[EagerAttentionSwitch]:
    """The switches for a model's attention sites: one per attention module and per ``PreTrainedModel`` above.

    Args:
        model: the model.
        attention_sites: site name -> qualified name of the attention module that applies it.

    Returns:
        One :class:`EagerAttentionSwitch` per module, with the sites below it.
    """
    if not attention_sites:
        return []
    from transformers import PreTrainedModel

    holders: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            below = [
                s for s, owner in attention_sites.items() if not name or owner == name or owner.startswith(name + ".")
            ]
            if below:
                holders[name] = below
    for site, owner in attention_sites.items():
        module = submodule(model, owner)
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            holders.setdefault(owner, [])
            if site not in holders[owner]:
                holders[owner].append(site)
    return [EagerAttentionSwitch(owner, sites) for owner, sites in holders.items()]


def __getattr__(name: str) -> Any:
    # The Trainer subclass needs transformers at import time; everything above does not.
    if name == "ConcreteDropoutTrainer":
        try:
            from .hf_trainer import ConcreteDropoutTrainer
        except ImportError as err:
            if err.name not in ("transformers", "accelerate"):
                raise
            raise ImportError(
                f"ConcreteDropoutTrainer needs transformers' Trainer, which needs {err.name}: "
                'pip install "cd_convert[transformers]" "transformers[torch]"',
                name=err.name,
            ) from err
        return ConcreteDropoutTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
