"""Monte Carlo prediction with Concrete Dropout models.

MC dropout (Gal & Ghahramani 2016) keeps the dropout masks stochastic at test time and averages T passes.
For a converted model that means: every module in eval mode (BatchNorm uses its running statistics, which
are never updated), but every concrete-dropout site still draws a mask.

Which mask: by default the *relaxed* Concrete mask with the site's training temperature, as the authors
do at test time (their Keras layer applies the same relaxed mask in training and prediction). With
``sampling="hard"`` each unit is instead dropped with probability exactly p (a Bernoulli(p) mask,
``y = x * b / (1 - p)``), i.e. classic MC dropout at the learned rate.

:func:`mc_mode` is the context manager that switches a model into that state; :func:`mc_predict` runs the
T passes batched (the input repeated T times along dim 0) and returns the predictive summaries described
in the README's "Monte Carlo prediction" section.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .layers import SAMPLING_MODES, ConcreteDropoutBase
from .metrics import gaussian_test_log_likelihood, predictive_entropy

__all__ = [
    "DEFAULT_CHUNK_BYTES_CPU",
    "DEFAULT_CHUNK_ROWS",
    "ClassificationPrediction",
    "RegressionPrediction",
    "concrete_sites",
    "mc_mode",
    "mc_predict",
]

#: Default bound on the rows of one batched forward pass on an accelerator (T * B rows are split into chunks
#: of this size): GPUs want large chunks to amortise kernel launches.
DEFAULT_CHUNK_ROWS = 4096
#: Default bound on the input bytes of one chunk on the CPU. There large chunks are slower, not faster: the
#: matrix products are already at full speed with a few hundred rows, while multi-megabyte activations
#: fall out of the caches and, freed and reallocated every pass, are handed back to the operating system
#: and page-faulted in again (measured on the MLP of benchmarks/mc_throughput.py, T=64, B=16: 1024-row
#: chunks took 12.3 ms with ~1200 page faults per call, 256-row chunks 11.1 ms with none).
DEFAULT_CHUNK_BYTES_CPU = 1 << 20

Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Any]]
TASKS = ("classification", "regression")


def concrete_sites(model: nn.Module) -> List[ConcreteDropoutBase]:
    """All concrete-dropout sites under ``model`` (including ``model`` itself), each once.

    Args:
        model: any module.

    Returns:
        The :class:`~cd_convert.layers.ConcreteDropoutBase` instances, in ``model.modules()`` order.
    """
    return [m for m in model.modules() if isinstance(m, ConcreteDropoutBase)]


def _check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING_MODES:
        raise ValueError(
            f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}: 'relaxed' samples the Concrete "
            "(relaxed) mask as the authors do at test time, 'hard' samples a Bernoulli(p) mask."
        )
    return sampling


@contextlib.contextmanager
def mc_mode(model: nn.Module, sampling: str = "relaxed") -> Iterator[nn.Module]:
    """Put a model into Monte Carlo dropout mode for the duration of a ``with`` block.

    Inside the block every module is in eval mode (BatchNorm normalises with its running statistics and
    does not update them, ``nn.Dropout`` is off), while every concrete-dropout site keeps sampling a mask.
    The sites' sampling is a separate flag (``site.sampling``), so it stays in effect if code inside the
    block calls ``model.eval()`` again.

    On exit, also when the block raises, every module's ``training`` flag and every site's previous
    ``sampling`` value are restored exactly, so mixed train/eval states (e.g. a frozen BatchNorm in a model
    otherwise in training) come back as they were. Nesting is allowed.

    Args:
        model: a model containing concrete-dropout sites (e.g. one returned by ``cd_convert.convert``).
        sampling: ``"relaxed"`` (default, the authors' choice): the relaxed Concrete mask with the site's
            temperature. ``"hard"``: a Bernoulli(p) mask, each unit dropped with probability exactly p.

    Yields:
        ``model`` itself.

    Raises:
        ValueError: for an unknown ``sampling``, or if the model has no concrete-dropout site (MC sampling
            would then silently return T identical deterministic passes).
    """
    _check_sampling(sampling)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mc_mode expects an nn.Module, got {type(model).__name__}.")
    sites = concrete_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no concrete-dropout sites, so MC prediction would repeat one "
            "deterministic pass. Call cd_convert.convert(model, ...) first (or add ConcreteDropout layers)."
        )
    # Record flags per module rather than calling model.train(previous) on exit: that would overwrite
    # submodules deliberately kept in another mode (frozen BatchNorm, a frozen backbone in eval).
    training_flags = [(module, module.training) for module in model.modules()]
    previous_sampling = [(site, site.sampling) for site in sites]
    try:
        model.eval()
        for site in sites:
            site.sampling = sampling
        yield model
    finally:
        for module, flag in training_flags:
            module.training = flag
        for site, previous in previous_sampling:
            site.sampling = previous


@dataclass
class ClassificationPrediction:
    """MC predictive summaries for a classifier.

    Attributes:
        probs: ``(B, C)`` predictive probabilities, the mean over T of the softmax of each pass.
        entropy: ``(B,)`` predictive entropy ``H[mean_t p_t]`` in nats (total uncertainty).
        mutual_information: ``(B,)`` ``H[mean_t p_t] - mean_t H[p_t]`` (epistemic part, BALD), in nats.
        samples: ``(T, B, C)`` per-pass probabilities when ``return_samples=True``, else None.
    """

    probs: Tensor
    entropy: Tensor
    mutual_information: Tensor
    samples: Optional[Tensor] = None

    @property
    def aleatoric_entropy(self) -> Tensor:
        """``(B,)`` expected entropy ``mean_t H[p_t]`` (the aleatoric part: entropy minus MI)."""
        return self.entropy - self.mutual_information


@dataclass
class RegressionPrediction:
    """MC predictive summaries for a regression model.

    Attributes:
        mean: predictive mean ``mean_t mu_t``, of the shape of one pass's (mean) output.
        variance: predictive variance, ``epistemic + aleatoric``.
        epistemic: ``var_t(mu_t)``, the population variance over the T passes (divided by T).
        aleatoric: ``mean_t exp(log_variance_t)`` for a ``(mean, log_variance)`` head; zeros for a model
            returning only a mean (add the homoscedastic noise ``1/tau`` yourself).
        samples: ``(T, B, ...)`` per-pass means when ``return_samples=True``, else None.
        log_variance_samples: ``(T, B, ...)`` per-pass log-variances of a heteroscedastic head when
            ``return_samples=True``, else None.
    """

    mean: Tensor
    variance: Tensor
    epistemic: Tensor
    aleatoric: Tensor
    samples: Optional[Tensor] = None
    log_variance_samples: Optional[Tensor] = None

    def test_log_likelihood(self, target: Tensor, noise_variance: Optional[Union[float, Tensor]] = None) -> float:
        """Average MC test log-likelihood ``logsumexp_t log N(y; mu_t, sigma_t^2) - log T``.

        Args:
            target: targets of the shape of :attr:`mean`.
            noise_variance: ``sigma^2`` for a model without a variance head (``1/tau``, in the units of
                the targets). Ignored for a heteroscedastic head, whose per-pass variances are used.

        Returns:
            The test log-likelihood in nats per test point.

        Raises:
            ValueError: if the samples were not kept (predict with ``return_samples=True``) or no noise
                variance is known.
        """
        if self.samples is None:
            raise ValueError("the per-pass samples were not kept: call mc_predict(..., return_samples=True).")
        if self.log_variance_samples is not None:
            sigma2: Union[float, Tensor] = self.log_variance_samples.exp()
        elif noise_variance is not None:
            sigma2 = noise_variance
        else:
            raise ValueError(
                "the model returns no log-variance: pass noise_variance=1/tau (in the units of the targets)."
            )
        return gaussian_test_log_likelihood(self.samples, target, sigma2=sigma2)


Prediction = Union[ClassificationPrediction, RegressionPrediction]


@dataclass
class _Batch:
    """The inputs of one MC prediction: positional tensors and keyword arguments, with their batch size."""

    args: Tuple[Tensor, ...]
    kwargs: Dict[str, Any]
    size: int

    def tensors(self) -> List[Tensor]:
        """Every batched input tensor."""
        return list(self.args) + [v for v in self.kwargs.values() if isinstance(v, Tensor)]

    def rows(self, start: int, stop: int) -> Tuple[Tuple[Tensor, ...], Dict[str, Any]]:
        """Rows ``start:stop`` of the inputs repeated T times along dim 0 (row ``t*B + i`` is example i)."""
        if start % self.size == 0 and (stop - start) % self.size == 0:
            reps = (stop - start) // self.size

            def take(t: Tensor) -> Tensor:
                return t.repeat(reps, *([1] * (t.dim() - 1)))
        else:  # a chunk that cuts through a pass (chunk_size not a multiple of B): gather the rows

            def take(t: Tensor) -> Tensor:
                return t.index_select(0, torch.arange(start, stop, device=t.device) % self.size)

        kwargs = {k: take(v) if isinstance(v, Tensor) else v for k, v in self.kwargs.items()}
        return tuple(take(t) for t in self.args), kwargs


def _as_inputs(x: Inputs) -> _Batch:
    if isinstance(x, Mapping):
        args: Tuple[Tensor, ...] = ()
        kwargs = dict(x)
        tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
        if not tensors:
            raise TypeError("x as a dict (keyword arguments, passed as model(**x)) must hold at least one tensor.")
    else:
        args = (x,) if isinstance(x, Tensor) else tuple(x)
        kwargs = {}
        tensors = list(args)
        if not args or not all(isinstance(t, Tensor) for t in args):
            raise TypeError(
                "x must be a tensor, a non-empty tuple of tensors (passed as model(*x)) or a dict of keyword "
                "arguments (passed as model(**x))."
            )
    batch = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
    if batch == 0:
        raise ValueError(f"x needs a non-empty batch dim 0, got shape {tuple(tensors[0].shape)}.")
    for t in tensors[1:]:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError(f"every input must have the same batch size {batch} in dim 0, got shape {tuple(t.shape)}.")
    return _Batch(args, kwargs, batch)


def _default_chunk_rows(inputs: _Batch, total: int) -> int:
    """Rows per forward pass when ``chunk_size`` is not given: whole passes, at least one, within the cap.

    The cap is :data:`DEFAULT_CHUNK_ROWS` rows on accelerators and :data:`DEFAULT_CHUNK_BYTES_CPU` bytes of
    input on the CPU.
    """
    batch = inputs.size
    tensors = inputs.tensors()
    if tensors[0].device.type == "cpu":
        row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
        cap = DEFAULT_CHUNK_BYTES_CPU // max(1, row_bytes)
    else:
        cap = DEFAULT_CHUNK_ROWS
    passes_total = total // batch
    passes_cap = max(1, cap // batch)
    # Equal chunks rather than full ones and a remainder: 64 passes under a cap of 20 run as 4 x 16.
    chunks = -(-passes_total // passes_cap)
    return -(-passes_total // chunks) * batch


def _main_output(output: Any) -> Any:
    """A model output object with ``logits`` (transformers' ``ModelOutput``, a dict) as its logits."""
    if isinstance(output, (Tensor, tuple, list)):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else output


def _infer_task(output: Any) -> str:
    if isinstance(output, (tuple, list)):
        return "regression"
    if isinstance(output, Tensor) and (output.dim() == 1 or output.shape[-1] == 1):
        return "regression"
    return "classification"


def _split_output(output: Any, task: str, rows: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Return ``(main, log_variance)`` of one chunk's output, checking its form against the task."""
    if isinstance(output, (tuple, list)):
        if task != "regression" or len(output) != 2 or not all(isinstance(o, Tensor) for o in output):
            raise ValueError(
                "a tuple output is read as (mean, log_variance) of a heteroscedastic regression head; got "
                f"{len(output)} element(s) with task={task!r}. Return logits for classification."
            )
        mean, log_variance = output
        if mean.shape != log_variance.shape:
            raise ValueError(
                f"mean and log_variance must have the same shape, got {tuple(mean.shape)} and "
                f"{tuple(log_variance.shape)}."
            )
    elif isinstance(output, Tensor):
        mean, log_variance = output, None
    else:
        raise TypeError(
            f"the model returned a {type(output).__name__}; mc_predict understands a tensor (logits or a "
            "regression mean) or a (mean, log_variance) tuple."
        )
    if mean.dim() == 0 or mean.shape[0] != rows:
        raise ValueError(
            f"the model output has shape {tuple(mean.shape)} for {rows} input rows; dim 0 must be the batch."
        )
    if task == "classification" and mean.dim() < 2:
        raise ValueError(
            f"classification expects (B, ..., C) logits, got shape {tuple(mean.shape)}. Pass task='regression' "
            "for a regression output."
        )
    return mean, log_variance


def _devices_in_use(model: nn.Module, inputs: _Batch) -> Set[str]:
    """Accelerator device types (e.g. ``{"cuda"}``) whose RNG the passes may draw from."""
    tensors = inputs.tensors() + list(model.parameters()) + list(model.buffers())
    return {t.device.type for t in tensors if t.device.type not in ("cpu", "meta")}


@contextlib.contextmanager
def _seeded(generator: Optional[torch.Generator], device_types: Set[str]) -> Iterator[None]:
    """Seed the global RNGs from ``generator`` inside the block and restore them afterwards.

    The sites draw their noise from the global RNG (``torch.rand``), so reproducibility comes from forking
    it: the seed is drawn from ``generator``, the global CPU and accelerator states are saved, seeded, and
    put back on exit. Without a generator the global RNG is used (and advanced) as usual.
    """
    if generator is None:
        yield
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with contextlib.ExitStack() as stack:
        # CPU state is always forked; devices=[] keeps fork_rng from touching any accelerator for it.
        stack.enter_context(torch.random.fork_rng(devices=[]))
        device_modules = []
        for device_type in sorted(device_types):
            module = torch.get_device_module(device_type)
            # All devices of the type: a model split over GPUs draws noise on each of them.
            devices = list(range(module.device_count()))
            stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device_type))
            device_modules.append(module)
        # Seed only the forked generators (torch.manual_seed would also reseed un-forked accelerators).
        torch.default_generator.manual_seed(seed)
        for module in device_modules:
            seed_all = getattr(module, "manual_seed_all", None) or module.manual_seed
            seed_all(seed)
        yield


def mc_predict(
    model: nn.Module,
    x: Inputs,
    samples: int = 64,
    *,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    task: Optional[str] = None,
    sampling: str = "relaxed",
    return_samples: bool = False,
) -> Prediction:
    """Monte Carlo prediction: T stochastic passes, batched, summarised.

    The input is repeated T times along dim 0 (``x.repeat(T, 1, ...)``: row ``t*B + i`` is pass t of
    example i) and run in chunks of at most ``chunk_size`` rows under :func:`mc_mode` and
    ``torch.no_grad()``. Every row gets its own independent mask, so one batched pass over T*B rows is T
    passes over the batch.

    The task is read from the model's output unless given: a ``(mean, log_variance)`` tuple/list is a
    heteroscedastic regression head; a 1-D tensor or one whose last dim is 1 is a regression mean;
    anything else is classification logits of shape ``(B, C)`` or ``(B, ..., C)`` such as a language model's
    per-token logits (softmax over the last dim); an output object with ``logits`` (transformers) gives
    its logits. Pass
    ``task="regression"`` for multi-output regression ``(B, D)``.

    Reproducibility: with a ``generator`` a seed drawn from it seeds the global RNGs for the duration of
    the call, and the global RNG state is restored afterwards; the same generator state gives identical
    outputs (the call advances ``generator``). The noise stream depends on how the rows are chunked, so a
    different ``chunk_size`` gives a different (equally valid) set of T masks, not the same numbers; the
    results agree within Monte Carlo error.

    Args:
        model: a model with concrete-dropout sites.
        x: a ``(B, ...)`` tensor, a tuple of tensors with the same B passed as ``model(*x)``, or a dict of
            keyword arguments passed as ``model(**x)`` (transformers models; its tensors share B, other values
            are passed as they are).
        samples: T, the number of stochastic passes (>= 1).
        chunk_size: most rows per forward pass; bounds activation memory. Default: all T*B rows, capped
            at :data:`DEFAULT_CHUNK_ROWS` rows (on the CPU: as many rows as fit in
            :data:`DEFAULT_CHUNK_BYTES_CPU` bytes of input) rounded down to whole passes, and at least one
            pass of B rows.
        generator: a ``torch.Generator`` for reproducible masks.
        task: ``"classification"`` or ``"regression"``; None infers it as described above.
        sampling: ``"relaxed"`` (default, the authors' choice) or ``"hard"`` Bernoulli(p) masks.
        return_samples: keep the per-pass outputs (``samples``, and ``log_variance_samples`` for a
            heteroscedastic head), of shape ``(T, B, ...)``.

    Returns:
        A :class:`ClassificationPrediction` or a :class:`RegressionPrediction`.

    Raises:
        ValueError: for bad arguments, a model without sites, or an output that does not fit the task.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}.")
    bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    if chunk_size is not None and bad_chunk:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}.")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be None, 'classification' or 'regression', got {task!r}.")
    _check_sampling(sampling)
    inputs = _as_inputs(x)
    batch = inputs.size
    total = samples * batch
    if chunk_size is None:
        chunk_size = _default_chunk_rows(inputs, total)

    summary: Optional[_Summary] = None
    with mc_mode(model, sampling), torch.no_grad(), _seeded(generator, _devices_in_use(model, inputs)):
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            args, kwargs = inputs.rows(start, stop)
            output = _main_output(model(*args, **kwargs))
            if summary is None:
                task = task or _infer_task(output)
                summary = (_ClassificationSummary if task == "classification" else _RegressionSummary)(
                    samples, batch, return_samples
                )
            summary.add(start, *_split_output(output, task, stop - start))
    assert summary is not None  # samples >= 1 and B >= 1: at least one chunk ran
    return summary.result()


def _float(t: Tensor) -> Tensor:
    # Summaries in at least fp32: half-precision outputs (autocast) would lose the small variances.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _stack_passes(chunks: List[Tensor], samples: int, batch: int) -> Tensor:
    """Concatenate chunk outputs (rows in ``t*B + i`` order) into ``(T, B, ...)``."""
    flat = torch.cat(chunks, dim=0)
    return flat.reshape(samples, batch, *flat.shape[1:])


class _Summary:
    """Accumulates the chunk outputs of one MC prediction (rows in ``t*B + i`` order)."""

    def __init__(self, samples: int, batch: int, return_samples: bool) -> None:
        self.samples = samples
        self.batch = batch
        self.return_samples = return_samples

    def add(self, start: int, main: Tensor, log_variance: Optional[Tensor]) -> None:
        raise NotImplementedError

    def result(self) -> Prediction:
        raise NotImplementedError


def _entropy(probs: Tensor) -> Tensor:
    """Predictive entropy over the last dim of ``(N, ..., C)`` probabilities (per-token for sequences)."""
    return predictive_entropy(probs.reshape(-1, probs.shape[-1])).reshape(probs.shape[:-1])


class _ClassificationSummary(_Summary):
    # Per-example sums are reduced chunk by chunk, so without return_samples only one chunk's
    # probabilities exist at a time: stacking all T*B*C of them (e.g. ImageNet's 1000 classes) could take
    # far more memory than the chunk's activations.

    def __init__(self, samples: int, batch: int, return_samples: bool) -> None:
        super().__init__(samples, batch, return_samples)
        self.prob_sum: Optional[Tensor] = None
        self.entropy_sum: Optional[Tensor] = None
        self.kept: List[Tensor] = []

    def add(self, start: int, main: Tensor, log_variance: Optional[Tensor]) -> None:
        probs = torch.softmax(_float(main), dim=-1)
        if self.prob_sum is None or self.entropy_sum is None:
            self.prob_sum = probs.new_zeros(self.batch, *probs.shape[1:])
            self.entropy_sum = probs.new_zeros(self.batch, *probs.shape[1:-1])
        examples = torch.arange(start, start + probs.shape[0], device=probs.device) % self.batch
        self.prob_sum.index_add_(0, examples, probs)
        self.entropy_sum.index_add_(0, examples, _entropy(probs))
        if self.return_samples:
            self.kept.append(probs)

    def result(self) -> ClassificationPrediction:
        assert self.prob_sum is not None and self.entropy_sum is not None
        mean_probs = self.prob_sum / self.samples
        entropy = _entropy(mean_probs)
        # MI = H[mean_t p_t] - mean_t H[p_t] >= 0 exactly; clamp the round-off, as
        # metrics.mutual_information does.
        mutual_information = (entropy - self.entropy_sum / self.samples).clamp_min(0.0)
        return ClassificationPrediction(
            probs=mean_probs,
            entropy=entropy,
            mutual_information=mutual_information,
            samples=_stack_passes(self.kept, self.samples, self.batch) if self.return_samples else None,
        )


class _RegressionSummary(_Summary):
    # Regression outputs are small (B x D per pass), so the passes are stacked and the variance computed
    # in one go (a two-pass variance: no cancellation for targets with a large mean).

    def __init__(self, samples: int, batch: int, return_samples: bool) -> None:
        super().__init__(samples, batch, return_samples)
        self.means: List[Tensor] = []
        self.log_variances: List[Tensor] = []

    def add(self, start: int, main: Tensor, log_variance: Optional[Tensor]) -> None:
        self.means.append(_float(main))
        if log_variance is not None:
            self.log_variances.append(_float(log_variance))

    def result(self) -> RegressionPrediction:
        mu = _stack_passes(self.means, self.samples, self.batch)
        mean = mu.mean(dim=0)
        epistemic = mu.var(dim=0, unbiased=False)
        log_variance: Optional[Tensor] = None
        if self.log_variances:
            log_variance = _stack_passes(self.log_variances, self.samples, self.batch)
            aleatoric = log_variance.exp().mean(dim=0)
        else:
            aleatoric = torch.zeros_like(mean)
        return RegressionPrediction(
            mean=mean,
            variance=epistemic + aleatoric,
            epistemic=epistemic,
            aleatoric=aleatoric,
            samples=mu if self.return_samples else None,
            log_variance_samples=log_variance if self.return_samples else None,
        )
