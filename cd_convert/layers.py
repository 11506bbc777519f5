"""Concrete Dropout layers.

Concrete Dropout (Gal, Hron & Kendall, "Concrete Dropout", NeurIPS 2017, arXiv:1705.07832) replaces the
Bernoulli dropout mask by its continuous relaxation, so that the dropout probability ``p`` becomes a
parameter learned by gradient descent together with the weights:

    u ~ Uniform(0, 1)
    z = sigmoid((logit(p) + logit(u)) / t)        z ~= 1 means "dropped"
    y = x * (1 - z) / (1 - p)                       (inverted-dropout scaling)

``ConcreteDropout`` draws one ``z`` per element (temperature 0.1); ``ConcreteDropout1d/2d/3d`` draw one
``z`` per (sample, channel), like ``nn.Dropout1d/2d/3d`` (temperature 2/3, as the authors use for
convolutions). The regulariser that makes ``p`` learn lives in :mod:`cd_convert.collector`; the layers
only apply the mask.

Modes, as with ``nn.Dropout``: training draws relaxed masks, ``eval()`` is the identity. Monte Carlo
prediction (:func:`cd_convert.mc_mode`) sets :attr:`sampling` so that a site samples in eval mode too.

The forward pass is a custom autograd function that keeps only the mask ``z`` for the backward pass (the
input ``x`` is also saved, but it shares storage with the tensor the previous layer keeps anyway): a
direct implementation of the formula above keeps about four tensors of the input's size. The output is
not saved, so an in-place operation after the site (``nn.ReLU(inplace=True)``, ``out += identity``) is
allowed, as after ``nn.Dropout``. Without gradients (Monte Carlo prediction) the mask is built in place
with no autograd node. On a CUDA GPU in eager mode the relaxed mask runs as fused Triton kernels
(:mod:`cd_convert.fused`); the uniform noise comes from :mod:`cd_convert.noise`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import fused, host_scalars, noise
from ._scalars import scalar_tensor
from ._tracing import being_traced, functorch_active

__all__ = [
    "ConcreteDropout",
    "ConcreteDropout1d",
    "ConcreteDropout2d",
    "ConcreteDropout3d",
    "ConcreteDropoutBase",
    "concrete_dropout",
    "reference_concrete_dropout",
    "clamped_logit",
    "logit_bound",
    "validate_init_p",
    "validate_temperature",
    "InitP",
    "DEFAULT_EPS",
    "SAMPLING_MODES",
]

InitP = Union[float, Tuple[float, float], Sequence[float]]

#: Default bound on p: the learned rate stays inside [DEFAULT_EPS, 1 - DEFAULT_EPS].
DEFAULT_EPS = 1e-6
#: Sampling modes a site understands: relaxed Concrete mask, or a hard Bernoulli(p) mask.
SAMPLING_MODES = ("relaxed", "hard")


def _check_probability(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in (0, 1), got {value!r} ({type(value).__name__}).")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"{name} must lie strictly inside (0, 1), got {value!r}. "
            "A dropout rate of 0 or 1 has an infinite logit; pass e.g. init_p=0.1."
        )
    return float(value)


def validate_init_p(init_p: InitP) -> Tuple[float, float]:
    """Check an ``init_p`` argument and return it as a ``(low, high)`` pair.

    Args:
        init_p: a rate in (0, 1), or a ``(low, high)`` pair of rates with ``low <= high``.

    Returns:
        ``(low, high)``; equal for a single rate.

    Raises:
        ValueError / TypeError: with the value received and what to pass instead.
    """
    if isinstance(init_p, (tuple, list)):
        if len(init_p) != 2:
            raise ValueError(f"init_p as a range must be a (low, high) pair, got {init_p!r}.")
        low = _check_probability("init_p low", init_p[0])
        high = _check_probability("init_p high", init_p[1])
        if low > high:
            raise ValueError(f"init_p range must have low <= high, got {init_p!r}.")
        return low, high
    rate = _check_probability("init_p", init_p)
    return rate, rate


def validate_temperature(temperature: float) -> float:
    """Check a Concrete temperature.

    Args:
        temperature: the relaxation temperature t; must be a finite number > 0.

    Returns:
        The temperature as a float.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be > 0, got {temperature!r}. Use 0.1 for element-wise sites and 2/3 for "
            "channel-wise sites (the paper's values)."
        )
    return float(temperature)


def logit_bound(eps: float) -> float:
    """``logit(1 - eps)``: the p-logit is kept inside ``[-bound, bound]``."""
    return math.log1p(-eps) - math.log(eps)


def clamped_logit(p_logit: Tensor, eps: float) -> Tensor:
    """Clamp a p-logit so that p stays in [eps, 1 - eps], letting the gradient pass straight through.

    A plain ``clamp`` has zero gradient outside the range, so a logit pushed past the bound once would
    stay there forever; the straight-through form lets it come back when the gradient turns.

    Args:
        p_logit: the unconstrained logit.
        eps: the bound on p.

    Returns:
        The clamped logit (same dtype), with the gradient of the identity.
    """
    bound = logit_bound(eps)
    return p_logit + (p_logit.clamp(-bound, bound) - p_logit).detach()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit uniforms have only 2^8 (bf16) or 2^11 (fp16) levels: u == 0 would then occur often enough to
    # keep a unit alive regardless of p. Noise and mask are therefore computed in fp32 for those inputs.
    return torch.promote_types(dtype, torch.float32)


def noise_shape(x: Tensor, channelwise: bool, channel_dim: int = 1) -> Tuple[int, ...]:
    """Shape of the mask for ``x``: ``x.shape`` element-wise, ``(B, C, 1, ...)`` channel-wise.

    Args:
        x: the input.
        channelwise: one mask value per (sample, channel) when True.
        channel_dim: 1 for batched ``(B, C, ...)`` inputs, 0 for unbatched ``(C, ...)`` ones.

    Returns:
        The shape of ``u`` and ``z``.
    """
    if not channelwise:
        return tuple(x.shape)
    if x.dim() <= channel_dim:
        raise ValueError(
            f"channel-wise concrete dropout needs an input with a channel dim, got shape {tuple(x.shape)}."
        )
    return tuple(x.shape[: channel_dim + 1]) + (1,) * (x.dim() - channel_dim - 1)


def _to_input_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a mask product computed in fp32 back to the input's dtype, saturating fp16 instead of overflowing.

    The inverted-dropout scale reaches ``1/eps`` when p sits at its upper bound, far beyond fp16's range.
    """
    y = y.to(dtype)
    if dtype == torch.float16:
        finfo = torch.finfo(torch.float16)
        y = y.clamp_(-finfo.max, finfo.max)
    return y


def _relaxed_without_grad(x: Tensor, theta: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """The relaxed mask when no gradient is needed (Monte Carlo prediction, ``torch.no_grad``).

    Same formula as :class:`_ConcreteDropoutFunction`, but the mask and the inverted-dropout scale are built
    in place on the (private) noise buffer and applied in one product: no autograd node, one buffer fewer.

    Args:
        x: the input.
        theta: the clamped p-logit.
        uniform: the noise, in the compute dtype; overwritten.
        temperature: Concrete temperature.

    Returns:
        ``x * (1 - z) / (1 - p)`` in ``x``'s dtype.
    """
    theta = theta.detach().to(uniform.dtype)
    logistic = uniform.logit_()
    # s = -(theta + logit(u)) / t as one pass: torch.add(a, b, alpha) is a + alpha * b, written in place.
    s = torch.add(-theta / temperature, logistic, alpha=-1.0 / temperature, out=logistic)
    keep = s.sigmoid_().mul_(torch.sigmoid(-theta).reciprocal())
    return _to_input_dtype(x * keep, x.dtype)


def _relaxed_forward(
    x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, bound: float, constants: bool = False
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The relaxed mask's forward pass, shared by both autograd functions (runs without autograd).

    Args:
        x: the input.
        p_logit: the unclamped p-logit.
        uniform: the noise, in the compute dtype.
        temperature: Concrete temperature.
        bound: the clamp on the logit (:func:`logit_bound`).
        constants: pass the temperature as a cached scalar tensor (:func:`scalar_tensor`); eager mode only,
            tracers get the Python number.

    Returns:
        ``(y, keep, theta, scale)``: the output, the mask ``w = 1 - z`` to save (in ``x``'s dtype unless it is
        channel-wise, hence smaller), the clamped logit and ``1 / (1 - p)``, both in the compute dtype.
    """
    # The clamp of clamped_logit without its autograd nodes: the function's backward passes the logit's
    # gradient straight through (the straight-through estimator), so only the value is needed here.
    theta = p_logit.clamp(-bound, bound)
    if theta.dtype != uniform.dtype:
        theta = theta.to(uniform.dtype)
    # w = 1 - z = sigmoid(-(theta + logit(u)) / t), computed in place on one fresh buffer.
    factor = scalar_tensor(-1.0 / temperature, uniform.dtype) if constants else -1.0 / temperature
    keep = torch.logit(uniform).add_(theta).mul_(factor).sigmoid_()
    scale = torch.sigmoid(-theta).reciprocal()
    y = (x * keep).mul_(scale)
    if y.dtype != x.dtype:
        y = _to_input_dtype(y, x.dtype)
    saved = keep if keep.numel() < x.numel() or keep.dtype == x.dtype else keep.to(x.dtype)
    return y, saved, theta, scale


def _relaxed_backward(
    ctx: Any, grad_y: Optional[Tensor], theta: Tensor, scale: Tensor
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the relaxed mask w.r.t. ``x`` and the p-logit (see :class:`_ConcreteDropoutFunction`).

    Args:
        ctx: the autograd context (``saved_tensors``: p-logit, mask, x or y; ``temperature``, ``x_dtype``,
            ``saved_output``).
        grad_y: the output's gradient, or None when the output did not reach the loss.
        theta: the clamped logit in the compute dtype.
        scale: ``1 / (1 - p)`` in the compute dtype.

    Returns:
        ``(grad_x, grad_p_logit)``; None where not needed.
    """
    if grad_y is None:  # grads are not materialised: y did not reach the loss
        return None, None
    p_logit, keep, activation = ctx.saved_tensors
    cdt = theta.dtype
    # .to() is skipped where the dtype already matches: each no-op call still costs a dispatch on small tensors.
    w = keep if keep.dtype == cdt else keep.to(cdt)
    g = grad_y if grad_y.dtype == cdt else grad_y.to(cdt)
    act = activation if activation.dtype == cdt else activation.to(cdt)
    grad_x = grad_p_logit = None
    if ctx.needs_input_grad[0]:
        grad_x = (g * w).mul_(scale)
        if grad_x.dtype != ctx.x_dtype:
            grad_x = grad_x.to(ctx.x_dtype)
    if ctx.needs_input_grad[1]:
        # g * y, from the saved output or rebuilt from the input.
        gy = g * act if ctx.saved_output else (g * act).mul_(w).mul_(scale)
        if w.numel() < gy.numel():
            # Channel-wise mask: reduce over the broadcast (spatial) dims before the dot products.
            reduce_dims = [d for d in range(gy.dim()) if w.shape[d] == 1 and gy.shape[d] != 1]
            gy = gy.sum(dim=reduce_dims, keepdim=True)
        gy_sum = gy.sum()
        gyw_sum = (gy * w).sum()  # sum of grad * y * (1 - z)
        grad = torch.sigmoid(theta) * gy_sum - (gy_sum - gyw_sum) / ctx.temperature
        if grad.dtype != p_logit.dtype:
            grad = grad.to(p_logit.dtype)
        # grad is 0-dim; an int test, because comparing torch.Size objects goes through Python (sym_eq).
        grad_p_logit = grad if p_logit.dim() == 0 else grad.reshape(p_logit.shape)
    return grad_x, grad_p_logit


class _ConcreteDropoutFunction(torch.autograd.Function):
    """y = x * (1 - z) / (1 - p) with z the relaxed mask; saves only 1 - z and x for the backward pass.

    With theta = clamp(p_logit), s = (theta + logit(u)) / t, z = sigmoid(s), w = 1 - z = sigmoid(-s) and
    p = sigmoid(theta):
        dy/dx       = w / (1 - p)
        dy/dp_logit = y * (p - z / t) = x * w / (1 - p) * (p - (1 - w) / t)
    (the clamp is straight-through: its gradient is the identity, as in :func:`clamped_logit`).

    Saved for the backward pass: ``w`` and either ``x`` (default: safe whatever follows the site) or ``y``
    (``save_output=True``: free when the next layer keeps ``y`` anyway, as Linear/Conv do, but an in-place op
    on ``y`` would then break the backward pass, so the converter only asks for it when the trace shows that
    weight layers alone read the output).

    This is the ``setup_context`` form that ``torch.func`` transforms require. In eager mode
    :class:`_EagerConcreteDropoutFunction` runs the same code: ``Function.apply`` binds the default arguments
    of a ``setup_context``-style ``forward`` with ``inspect.signature`` on every call (measured: 60 us per call
    against 10 us for the ``ctx`` form, more than the whole site costs at small shapes).
    """

    @staticmethod
    def forward(
        x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, bound: float, save_output: bool
    ) -> Tuple[Tensor, Tensor]:
        y, saved, _theta, _scale = _relaxed_forward(x, p_logit, uniform, temperature, bound)
        return y, saved

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p_logit, _uniform, temperature, bound, save_output = inputs
        y, keep = output
        ctx.temperature = temperature
        ctx.bound = bound
        ctx.x_dtype = x.dtype
        ctx.saved_output = save_output
        ctx.save_for_backward(p_logit, keep, y if save_output else x)
        ctx.mark_non_differentiable(keep)
        # The mask output never receives a gradient; without this autograd zero-fills one of its size.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], _grad_keep: Optional[Tensor]):
        p_logit = ctx.saved_tensors[0]
        theta = p_logit.clamp(-ctx.bound, ctx.bound).to(_compute_dtype(ctx.x_dtype))
        grad_x, grad_p_logit = _relaxed_backward(ctx, grad_y, theta, torch.sigmoid(-theta).reciprocal())
        return grad_x, grad_p_logit, None, None, None, None


class _EagerConcreteDropoutFunction(torch.autograd.Function):
    """The eager-mode form of :class:`_ConcreteDropoutFunction` (``forward(ctx, ...)``, one output).

    Same values and gradients; the clamped logit and ``1 / (1 - p)`` of the forward pass are kept on ``ctx``
    (two 0-dim tensors) instead of being recomputed in the backward pass.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, bound: float, save_output: bool
    ) -> Tensor:
        y, keep, theta, scale = _relaxed_forward(x, p_logit, uniform, temperature, bound, constants=True)
        ctx.temperature = scalar_tensor(temperature, theta.dtype)
        ctx.x_dtype = x.dtype
        ctx.saved_output = save_output
        ctx.theta, ctx.scale = theta, scale
        ctx.save_for_backward(p_logit, keep, y if save_output else x)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x, grad_p_logit = _relaxed_backward(ctx, grad_y, ctx.theta, ctx.scale)
        return grad_x, grad_p_logit, None, None, None, None


def concrete_dropout(
    x: Tensor,
    p_logit: Tensor,
    *,
    temperature: float = 0.1,
    channelwise: bool = False,
    channel_dim: int = 1,
    training: bool = True,
    sampling: str = "relaxed",
    eps: float = DEFAULT_EPS,
    uniform: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    save_output: bool = False,
) -> Tensor:
    """Functional Concrete Dropout.

    Args:
        x: input of any shape (channel-wise: ``(B, C, ...)`` or unbatched ``(C, ...)``).
        p_logit: scalar tensor, the logit of the drop probability.
        temperature: Concrete temperature t > 0.
        channelwise: one mask value per (sample, channel) instead of per element.
        channel_dim: index of the channel dim for channel-wise masks (0 for unbatched inputs).
        training: when False the function is the identity (like ``F.dropout``).
        sampling: ``"relaxed"`` (Concrete mask, differentiable in p) or ``"hard"`` (Bernoulli(p) mask,
            used for Monte Carlo prediction; no gradient to p).
        eps: p is kept inside ``[eps, 1 - eps]``.
        uniform: optional noise ``u`` in (0, 1) of the mask's shape (tests use it to hold the noise fixed).
        generator: optional ``torch.Generator`` for reproducible noise.
        save_output: keep the output instead of the input for the backward pass (see
            ``_ConcreteDropoutFunction``); only safe when no in-place op modifies the output.

    Returns:
        A new tensor of ``x``'s shape, dtype and device; ``x`` is never modified.
    """
    if not training:
        return x
    # The two fast paths of a training call with the site's own noise come first: on small masks the general
    # set-up below costs as much as several ops (x.is_cuda first: the cheap test that splits them).
    if sampling == "relaxed" and uniform is None and generator is None:
        # A GPU, or the CPU where the tests run the kernels under Triton's interpreter.
        if x.is_cuda or fused.INTERPRET_ON_CPU:
            if fused.supports(x, channelwise, channel_dim, interpret=fused.INTERPRET_ON_CPU):
                return fused.fused_concrete_dropout(
                    x,
                    p_logit,
                    temperature=temperature,
                    eps=eps,
                    channelwise=channelwise,
                    channel_dim=channel_dim,
                    save_output=save_output,
                )
        if not x.is_cuda and not channelwise:
            # CPU float32/float64 with an element-wise mask: the scalar work on Python floats, fewer ops.
            needs_grad = host_scalars.call_route(x, p_logit)
            if needs_grad is not None:
                return host_scalars.own_noise_call(x, p_logit, needs_grad, temperature, logit_bound(eps), save_output)
    cdt = _compute_dtype(x.dtype)
    shape = noise_shape(x, channelwise, channel_dim)
    if uniform is None:
        uniform = noise.uniform(shape, device=x.device, dtype=cdt, generator=generator)
    else:
        # A private copy: the no-grad path computes the mask in place on the noise buffer.
        uniform = uniform.to(device=x.device, dtype=cdt, copy=True)
    if sampling == "relaxed" and torch.is_grad_enabled() and (x.requires_grad or p_logit.requires_grad):
        # The clamp happens inside the function (no autograd nodes for it); its gradient is straight-through.
        if being_traced() or functorch_active():
            y, _ = _ConcreteDropoutFunction.apply(x, p_logit, uniform, temperature, logit_bound(eps), save_output)
            return y
        # A given noise tensor or generator on the CPU path (the site's own noise was routed above).
        if host_scalars.ENABLED and host_scalars.site_applies(x, p_logit, uniform):
            return host_scalars.HostConcreteDropout.apply(
                x, p_logit, uniform, temperature, logit_bound(eps), save_output
            )
        return _EagerConcreteDropoutFunction.apply(x, p_logit, uniform, temperature, logit_bound(eps), save_output)
    theta = clamped_logit(p_logit, eps)
    if sampling == "hard":
        theta = theta.detach().to(cdt)
        # In place on the private noise buffer (kept where u >= p): temporaries of this size page-fault on the CPU.
        keep = uniform.ge_(torch.sigmoid(theta)).mul_(torch.sigmoid(-theta).reciprocal())
        return _to_input_dtype(x * keep, x.dtype)
    if sampling != "relaxed":
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}.")
    return _relaxed_without_grad(x, theta, uniform, temperature)


def reference_concrete_dropout(
    x: Tensor, p_logit: Tensor, uniform: Tensor, temperature: float, eps: float = DEFAULT_EPS
) -> Tensor:
    """The paper's formula written directly with autograd (no custom backward).

    Used by the tests as the independent reference for the fused implementation, and by the overhead
    benchmark to show what the fused version saves.

    Args:
        x: input.
        p_logit: scalar logit of p.
        uniform: the noise u, broadcastable to ``x``.
        temperature: Concrete temperature.
        eps: bound on p.

    Returns:
        ``x * (1 - z) / (1 - p)``.
    """
    theta = clamped_logit(p_logit, eps)
    p = torch.sigmoid(theta)
    z = torch.sigmoid((theta + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    return x * (1 - z) / (1 - p)


class _ConcreteDropoutNd(nn.Module):
    """Shared implementation of the concrete-dropout sites; use the public subclasses."""

    channelwise: bool = False
    default_temperature: float = 0.1
    expected_dims: Tuple[int, ...] = ()

    def __init__(
        self,
        init_p: InitP = 0.1,
        temperature: Optional[float] = None,
        *,
        eps: float = DEFAULT_EPS,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.init_p = validate_init_p(init_p)
        self.temperature = validate_temperature(self.default_temperature if temperature is None else temperature)
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}.")
        self.eps = float(eps)
        self.p_logit = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        #: None: follow ``self.training``. "relaxed"/"hard": sample even in eval (Monte Carlo prediction).
        self.sampling: Optional[str] = None
        #: Keep the output (not the input) for the backward pass. Set by the converter for sites whose output
        #: only weight layers read (they keep it anyway); False is safe whatever follows the site.
        self.save_output: bool = False
        #: Size of the dropped feature dim (channels for channel-wise sites), recorded by the first active
        #: forward pass; the regulariser uses it as K for sites with no consuming weight layer.
        self.units_seen: Optional[int] = None
        self.reset_parameters()

    def record_units(self, units: int) -> None:
        """Record the dropped feature dim's size (:attr:`units_seen`), on an ``nn.DataParallel`` replica also on
        the module it replicates, where the regulariser reads it (a replica is discarded after its forward).

        Args:
            units: K, as :meth:`feature_width` gives it for the call's input.
        """
        self.units_seen = units
        original = self.__dict__.get("_replica_of")
        if original is not None and original.units_seen is None:
            original.units_seen = units

    def _replicate_for_data_parallel(self) -> "ConcreteDropoutBase":
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_replica_of"] = self
        return replica

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw the initial logit uniformly in ``[logit(low), logit(high)]`` of ``init_p``.

        Args:
            generator: optional ``torch.Generator`` for a reproducible draw.
        """
        low, high = (math.log(v) - math.log1p(-v) for v in self.init_p)
        with torch.no_grad():
            draw = torch.rand((), generator=generator).item()
            self.p_logit.fill_(low + (high - low) * draw)

    @property
    def p(self) -> Tensor:
        """The current drop probability, a 0-dim tensor computed from the logit (never a stale copy).

        Computed in at least fp32: in fp16/bf16, ``1 - eps`` rounds to 1 (a frozen ``nn.Dropout(p=1)``).
        """
        theta = self.p_logit.to(_compute_dtype(self.p_logit.dtype))
        return torch.sigmoid(clamped_logit(theta, self.eps))

    @property
    def active(self) -> bool:
        """Whether a forward pass applies a mask now (training, or Monte Carlo sampling requested)."""
        return self.training or self.sampling is not None

    def _check_input(self, x: Tensor) -> None:
        if self.expected_dims and x.dim() not in self.expected_dims:
            raise ValueError(
                f"{type(self).__name__} expects a {' or '.join(f'{d}-D' for d in self.expected_dims)} input "
                f"(batched or unbatched), got shape {tuple(x.shape)}."
            )

    def _channel_dim(self, x: Tensor) -> int:
        return self._channel_dim_of(x.dim())

    @classmethod
    def _channel_dim_of(cls, ndim: int) -> int:
        # Unbatched inputs ((C, ...), the smaller accepted rank) carry the channel in dim 0.
        return 0 if cls.expected_dims and ndim == min(cls.expected_dims) else 1

    @classmethod
    def feature_width(cls, shape: Sequence[int]) -> int:
        """K for an input of ``shape``: the size of the dropped feature dim, as the first forward records it.

        Args:
            shape: the input's shape.

        Returns:
            The channel dim's size for channel-wise sites, the last dim's for element-wise ones (1 for a
            0-dim input).
        """
        if not len(shape):
            return 1
        return int(shape[cls._channel_dim_of(len(shape))] if cls.channelwise else shape[-1])

    def forward(self, x: Tensor, *, training: Optional[bool] = None, save_output: Optional[bool] = None) -> Tensor:
        """Apply the mask.

        Args:
            x: the input.
            training: override of ``self.training`` (functional call sites pass their own flag).
            save_output: override of ``self.save_output`` (a targeted layer that recomputes the output keeps
                the input instead).

        Returns:
            The masked input (a new tensor), or ``x`` itself when inactive.
        """
        is_training = self.training if training is None else training
        if not (is_training or self.sampling is not None):
            return x
        if self.expected_dims:
            self._check_input(x)
        if self.units_seen is None:
            self.record_units(self.feature_width(x.shape))
        # A site asked to sample (Monte Carlo prediction) uses its mode in training too.
        return concrete_dropout(
            x,
            self.p_logit,
            temperature=self.temperature,
            channelwise=self.channelwise,
            channel_dim=self._channel_dim(x) if self.channelwise else 1,
            sampling=self.sampling or "relaxed",
            eps=self.eps,
            save_output=self.save_output if save_output is None else save_output,
        )

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4g}, temperature={self.temperature:.4g}"


class ConcreteDropout(_ConcreteDropoutNd):
    """Element-wise Concrete Dropout, the learned-rate counterpart of ``nn.Dropout``.

    Args:
        init_p: initial drop rate in (0, 1), or a ``(low, high)`` pair drawn uniformly in logit space.
            Default 0.1, as in the paper.
        temperature: Concrete temperature, default 0.1.
        eps: p is kept in ``[eps, 1 - eps]``.
        device, dtype: of the ``p_logit`` parameter.

    Use in a hand-written model like ``nn.Dropout``; then call :func:`cd_convert.convert` once on the
    model (with ``dataset_size=``) so the regulariser knows which layer consumes each site.
    """


class _ChannelConcreteDropout(_ConcreteDropoutNd):
    channelwise = True
    default_temperature = 2.0 / 3.0


class ConcreteDropout1d(_ChannelConcreteDropout):
    """Channel-wise Concrete Dropout for ``(N, C, L)`` or ``(C, L)`` inputs, like ``nn.Dropout1d``.

    One mask value per (sample, channel); temperature 2/3 by default. Arguments as :class:`ConcreteDropout`.
    """

    expected_dims = (2, 3)


class ConcreteDropout2d(_ChannelConcreteDropout):
    """Channel-wise Concrete Dropout for ``(N, C, H, W)`` or ``(C, H, W)`` inputs, like ``nn.Dropout2d``.

    One mask value per (sample, channel); temperature 2/3 by default. Arguments as :class:`ConcreteDropout`.
    """

    expected_dims = (3, 4)


class ConcreteDropout3d(_ChannelConcreteDropout):
    """Channel-wise Concrete Dropout for ``(N, C, D, H, W)`` or ``(C, D, H, W)`` inputs, like ``nn.Dropout3d``.

    One mask value per (sample, channel); temperature 2/3 by default. Arguments as :class:`ConcreteDropout`.
    """

    expected_dims = (4, 5)


ConcreteDropoutBase = _ConcreteDropoutNd
