"""HuggingFace transformers awareness: dry-run inputs, eager attention while a site is active, call provenance.

transformers models cannot be traced by torch.fx (their forwards are wrapped as ``(*args, **kwargs)``), and
their attention dropout is not a module call: an attention module passes a rate (``self.attention_dropout``,
``self.dropout.p``) as ``dropout=`` to an *attention interface* chosen by ``config._attn_implementation``
(eager, sdpa, flash, flex). Only the family's eager function applies it as an explicit ``F.dropout`` (or a
module call) on the attention probabilities. So, for these models:

* discovery runs one dry run on inputs built from the config (:func:`example_inputs_for`) with every config
  switched to eager attention (:func:`eager_attention`), where attention dropout shows up as a call;
* a call made inside an attention interface is recognised by :func:`called_through_attention_interface`;
* while one of its attention sites is active (training, Monte Carlo prediction) the converted model runs, on a
  GPU, its SDPA attention with each attention module's ``scaled_dot_product_attention`` call routed to the
  fused concrete-attention kernel, and elsewhere eager attention, with :class:`EagerAttentionSwitch` on each
  ``PreTrainedModel`` (where the attention masks are built, in the format of the implementation) and on each
  attention module (so a gradient-checkpointing recomputation takes the same path). In eval the model's own
  implementation runs.

This module imports transformers lazily: nothing here requires it unless the model is a transformers model.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .._tracing import thread_key
from ..sites.base import Change, remove_forward_hooks, submodule
from .attention_kernel import kernel_can_route, open_route
from .transformers_inputs import example_inputs_for

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


@functools.lru_cache(maxsize=None)
def _class_implementation(cls: type) -> Optional[str]:
    """The attention implementation ``cls`` was built for, where its family picks one class per implementation.

    Families not yet moved to attention interfaces (in transformers 4.x, e.g. DistilBERT) choose their attention
    class when the model is built, from a table in their modeling module (``{"eager": ..., "sdpa": ...,
    "flash_attention_2": ...}``); the class then runs that implementation whatever the config says later.

    Args:
        cls: a module class.

    Returns:
        The table's key for ``cls``, or None where no such table lists it.
    """
    namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    for table in namespace.values():
        if type(table) is dict and "eager" in table:
            for implementation, member in table.items():
                if member is cls:
                    return implementation
    return None


def _built_for_another_implementation(model: nn.Module) -> bool:
    """Whether a module of ``model`` is an attention class chosen at build time for a non-eager implementation."""
    return any(_class_implementation(type(module)) not in (None, "eager") for module in model.modules())


def _attention_configs(model: nn.Module) -> List[Any]:
    """Every distinct config object held by the model's modules that selects an attention implementation.

    The configs of a ``PreTrainedModel`` whose attention classes were chosen when it was built for another
    implementation than eager are left out: switching them to eager would only switch the format of the masks
    it builds (to the 2-D form eager attention takes) while the same SDPA or flash classes still run. Their
    dropout is passed as ``dropout_p`` to ``scaled_dot_product_attention`` and becomes a fused-attention site.
    """
    if "transformers" not in sys.modules:  # no transformers config can exist, and nothing here imports it
        return []
    from transformers import PreTrainedModel

    fixed = {
        id(c)
        for module in model.modules()
        if isinstance(module, PreTrainedModel) and _built_for_another_implementation(module)
        for c in _with_sub_configs(module.config)
    }
    configs: Dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.update((id(c), c) for c in _with_sub_configs(config) if id(c) not in fixed)
    return list(configs.values())


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
    saved = _select(_attention_configs(model), "eager")
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


# -- the run-time switch -------------------------------------------------------------------------------


def _params_device(module: nn.Module) -> Optional[torch.device]:
    """The device of the module's first parameter (None without parameters)."""
    return next((p.device for p in module.parameters()), None)


def _select(configs: List[Any], implementation: str) -> List[Tuple[Any, Optional[str]]]:
    """Set every config to ``implementation``; return what each held, for :func:`_restore`."""
    saved = [(config, config.__dict__.get(_IMPLEMENTATION)) for config in configs]
    for config, _ in saved:
        config.__dict__[_IMPLEMENTATION] = implementation
    return saved


@dataclass
class EagerAttentionHook:
    """Forward pre-hook (and its matching post-hook): how attention runs while ``sites`` are active.

    * On a GPU, where the fused concrete-attention kernel can take every site (:mod:`cd_convert.fused_attention`):
      the model runs its ``sdpa`` attention (selected on a ``PreTrainedModel`` whose implementation is another
      fused one and whose class supports SDPA) and each attention module routes its
      ``scaled_dot_product_attention`` call to its site, which the kernel applies: no attention matrix is kept.
    * Otherwise: eager attention, whose dropout call the site replaces (the attention matrix is kept).

    A model configured for eager attention stays eager. In eval the model's own implementation runs.

    Attributes:
        sites: the concrete sites whose activity changes the path (shared references, so a deep copy of the
            model maps them to the copy's sites).
        model_level: the hook sits on a ``PreTrainedModel`` (it selects the implementation the attention masks
            are built for); else on an attention module (it routes the call).
        routable: every attention module below a model-level hook applies exactly one site (the kernel's route
            needs to know which).
        calls: per thread, per nesting level, what :meth:`after` undoes: the implementations to restore and the
            open route (None where none was opened).
    """

    sites: List[nn.Module]
    model_level: bool = False
    routable: bool = True
    calls: Dict[int, List[Tuple[List[Tuple[Any, Optional[str]]], Optional[contextlib.ExitStack]]]] = field(
        default_factory=dict
    )

    def _kernel_applies(self, module: nn.Module, current: Optional[str]) -> bool:
        if current in (None, "eager") or not self.routable:
            return False  # a model set to eager stays eager
        if self.model_level:
            if current != "sdpa" and not getattr(type(module), "_supports_sdpa", False):
                return False
        elif current != "sdpa" or len(self.sites) != 1:
            return False  # an attention module called on its own with another implementation: eager
        return kernel_can_route(self.sites, _params_device(module))

    def before(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        current = module.config.__dict__.get(_IMPLEMENTATION)
        saved: List[Tuple[Any, Optional[str]]] = []
        route = None
        if current not in (None, "eager") and any(site.active for site in self.sites):
            _refuse_packed_sequences(module, current, kwargs)
            if not self._kernel_applies(module, current):
                saved = _select(_with_sub_configs(module.config), "eager")
            elif self.model_level:
                saved = _select(_with_sub_configs(module.config), "sdpa") if current != "sdpa" else []
            else:
                route = open_route(self.sites[0], module.training)
        self.calls.setdefault(thread_key(), []).append((saved, route))

    def after(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        calls = self.calls.get(thread_key())
        if calls:
            saved, route = calls.pop()
            if route is not None:
                route.close()
            _restore(saved)

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, calls={})  # open calls belong to a forward in progress


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
        site_names: qualified names of the attention sites whose activity switches the implementation.
        routable: see :class:`EagerAttentionHook`.
    """

    owner: str
    site_names: List[str]
    site_name: str = ""
    kind: str = "attribute"
    hook_ids: Tuple[int, int] = (-1, -1)
    routable: bool = True

    PATH_FIELDS = ("owner", "site_names")

    def apply(self, root: nn.Module, site: Optional[nn.Module] = None) -> None:
        from transformers import PreTrainedModel

        owner = submodule(root, self.owner)
        sites = [root.get_submodule(name) for name in self.site_names]
        hook = EagerAttentionHook(sites, model_level=isinstance(owner, PreTrainedModel), routable=self.routable)
        pre = owner.register_forward_pre_hook(hook.before, with_kwargs=True)
        post = owner.register_forward_hook(hook.after, with_kwargs=True, always_call=True)
        self.hook_ids = (pre.id, post.id)

    def undo(self, root: nn.Module) -> None:
        remove_forward_hooks(submodule(root, self.owner), *self.hook_ids)


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
    # The kernel's route is opened by the attention module's own switch and needs to know its one site: a model
    # above an attention module with several sites, or with no switch of its own, stays eager.
    per_owner: Dict[str, int] = {}
    for owner in attention_sites.values():
        per_owner[owner] = per_owner.get(owner, 0) + 1

    def routable(sites: List[str]) -> bool:
        owners = {attention_sites[s] for s in sites}
        return all(per_owner[o] == 1 and o in holders for o in owners)

    return [EagerAttentionSwitch(owner, sites, routable=routable(sites)) for owner, sites in holders.items()]


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
