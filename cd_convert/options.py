"""``ConvertOptions``: every option of :func:`cd_convert.convert`, its default and its validation, once.

``convert``, ``plan`` and ``cd_convert.timm.create_model`` accept these options either as keyword
arguments (``convert(model, dataset_size=N, init_p=0.2)``) or as one object
(``convert(model, options=ConvertOptions(dataset_size=N, init_p=0.2))``), which can be kept, shared between
calls and changed with ``dataclasses.replace``. Either way the options are checked here, when the object is
built, before any model is touched; the planner reads the same object.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from .layers import ConcreteDropoutBase, InitP, validate_init_p, validate_temperature
from .prior import DEFAULT_LENGTH_SCALE, RegularizerScale, resolve_scale
from .targets import Matcher, parse_targets

__all__ = ["ConvertOptions", "OPTION_NAMES", "resolve_options", "explicit_options"]


@dataclass(frozen=True)
class ConvertOptions:
    """How :func:`cd_convert.convert` converts a model (everything but the model, ``targets`` and ``inplace``).

    Every field is checked when the object is built (``TypeError``/``ValueError``/``TargetError`` naming
    the field); an object that exists is valid.

    Attributes:
        exclude: module types, qualified-name globs, compiled regexes or predicates ``(name, module) -> bool``;
            matching sites/layers are left alone.
        dataset_size: training-set size N; with ``length_scale`` and ``loss`` it sets the regulariser.
        length_scale: prior length-scale l (default 1e-2).
        loss: ``"nll"``, ``"mse"`` (with ``tau``) or ``"heteroscedastic"``: the loss you minimise.
        tau: model precision for ``loss="mse"`` in the units of the loss.
        weight_regularizer: explicit wr (with ``dropout_regularizer``) instead of ``dataset_size``.
        dropout_regularizer: explicit dr (with ``weight_regularizer``).
        init_p: initial rate for sites without a usable original rate (and targeted layers without dropout in
            front of them): a float, or a ``(low, high)`` pair drawn uniformly in logit space. Sites with
            0 < p < 1 start at that p.
        temperature: temperature of element-wise sites (None: the class default 0.1).
        channel_temperature: temperature of channel-wise sites (None: the class default 2/3).
        include_zero_rate: also convert dropout whose original rate is 0 (starting at ``init_p``).
        fused_attention: convert dropout inside fused attention (explicit attention in training: costs the
            memory of the attention matrix). False leaves it fused, reported.
        leaf_modules: module types torch.fx should not trace into (their dropout modules are found by module
            search); timm's notrace lists are added automatically for timm models.
        autowrap_functions: functions torch.fx should not trace into.
        example_inputs: optional inputs for one dry-run forward (on a copy) that confirms which sites run and
            finds their consumers and functional dropout where torch.fx cannot trace: a tensor, a tuple of
            positional arguments or a dict of keyword arguments. transformers models get inputs built from
            their config when none are passed.
    """

    exclude: Optional[Any] = None
    dataset_size: Optional[int] = None
    length_scale: float = DEFAULT_LENGTH_SCALE
    loss: str = "nll"
    tau: Optional[float] = None
    weight_regularizer: Optional[float] = None
    dropout_regularizer: Optional[float] = None
    init_p: InitP = 0.1
    temperature: Optional[float] = None
    channel_temperature: Optional[float] = None
    include_zero_rate: bool = True
    fused_attention: bool = True
    leaf_modules: Sequence[type] = ()
    autowrap_functions: Sequence[Callable] = ()
    example_inputs: Optional[Any] = None

    def __post_init__(self) -> None:
        # All checks run here (also after dataclasses.replace), so that convert never meets a bad option
        # after it has started changing a model.
        self.regularizer_scale()
        validate_init_p(self.init_p)
        for value in (self.temperature, self.channel_temperature):
            if value is not None:
                validate_temperature(value)
        self.exclude_matchers()
        _check_items("leaf_modules", self.leaf_modules, lambda item: isinstance(item, type), "module types (classes)")
        _check_items("autowrap_functions", self.autowrap_functions, callable, "functions")

    def regularizer_scale(self) -> Optional[RegularizerScale]:
        """The regulariser's constants, or None when neither ``dataset_size`` nor explicit ones were given."""
        return resolve_scale(
            dataset_size=self.dataset_size,
            length_scale=self.length_scale,
            loss=self.loss,
            tau=self.tau,
            weight_regularizer=self.weight_regularizer,
            dropout_regularizer=self.dropout_regularizer,
        )

    def exclude_matchers(self) -> Optional[List[Matcher]]:
        """``exclude`` parsed (None when nothing is excluded)."""
        return parse_targets(self.exclude, "exclude")

    def initial_rate(self, p: Optional[float]) -> InitP:
        """A site starts at the original rate when it is usable (0 < p < 1), else at ``init_p``."""
        return p if p is not None and 0.0 < p < 1.0 else self.init_p

    def temperature_for(self, site_type: Type[ConcreteDropoutBase]) -> Optional[float]:
        """The user's temperature for this kind of site (None: the class default)."""
        return self.channel_temperature if site_type.channelwise else self.temperature


#: The option names: the keyword arguments that ``convert``, ``plan`` and ``create_model`` take as options.
OPTION_NAMES: Tuple[str, ...] = tuple(f.name for f in fields(ConvertOptions))
_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in fields(ConvertOptions) if f.default is not MISSING}


def _check_items(name: str, items: Any, accept: Callable[[Any], bool], what: str) -> None:
    """Raise TypeError unless ``items`` is a list/tuple/set whose every element passes ``accept``."""
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(accept(item) for item in items):
        raise TypeError(f"{name} must be a list or tuple of {what}, got {items!r}.")


def explicit_options(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The options among ``values`` that differ from their defaults (what a caller set).

    A function with the options as keyword parameters cannot tell a keyword passed with its default value
    from one left out; both mean the default, so only the others count as set.

    Args:
        values: option name -> value (other names are ignored).

    Returns:
        The options set to a non-default value.
    """
    return {name: values[name] for name in OPTION_NAMES if name in values and not _is_default(name, values[name])}


def _is_default(name: str, value: Any) -> bool:
    default = _DEFAULTS[name]
    # The type check first: it keeps tensors (example_inputs) and lists out of ==.
    return value is default or (type(value) is type(default) and value == default)


def resolve_options(options: Optional[ConvertOptions], keywords: Mapping[str, Any], caller: str) -> ConvertOptions:
    """The options of one call: ``options=`` or the option keywords, not both.

    Args:
        options: the ``options=`` argument (None when not passed).
        keywords: the option keywords the caller was given.
        caller: the public function's name, for messages.

    Returns:
        A validated :class:`ConvertOptions`.

    Raises:
        TypeError: for an unknown keyword, an ``options`` that is not a :class:`ConvertOptions`, or
            ``options=`` together with option keywords.
    """
    unknown = set(keywords) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {sorted(unknown)}.")
    if options is None:
        return ConvertOptions(**keywords)
    if not isinstance(options, ConvertOptions):
        raise TypeError(f"options must be a cd_convert.ConvertOptions, got {type(options).__name__}.")
    if keywords:
        names = sorted(keywords)
        raise TypeError(
            f"{caller}() got options= and the option keywords {names}; pass one or the other. To change a field "
            f"of the options: dataclasses.replace(options, {names[0]}=...)."
        )
    return options
