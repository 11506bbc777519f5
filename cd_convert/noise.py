"""Uniform noise for the dropout masks, with a faster draw for CPU float32.

PyTorch's CPU generator fills a tensor serially on one core: ``torch.rand`` costs about 2 ns per element
(mostly per-element overhead around the Mersenne Twister) whatever the thread count. For the large masks
of a batched Monte Carlo prediction or of a CPU training step that serial fill is a quarter of the whole
forward pass (measured on the MLP of ``benchmarks/mc_throughput.py``), while the matrix products around
it use every core.

For CPU float32 noise, :func:`uniform` therefore draws 64-bit words (``random_`` on an int64 tensor: two
Mersenne-Twister outputs per word, about 1.3 ns per 32 bits) and turns each 32-bit half into one float
with three in-place, multi-threaded bit operations: 23 random bits become the mantissa of a float in
[1, 2), and subtracting ``1 - 2**-24`` gives

    u = (k + 1/2) * 2**-23,   k uniform on {0, ..., 2**23 - 1}.

That lattice lies strictly inside (0, 1) and is symmetric (``1 - u`` is on it too), so ``logit(u)`` is
always finite and exactly symmetric, unlike ``torch.rand``'s ``[0, 1)``, where ``u == 0`` has probability
2**-24 and gives an infinite logit. The resolution (2**-23) is one bit coarser than ``torch.rand``'s.

Small draws (fewer than :data:`PACKED_MIN_NUMEL` elements) use ``torch.rand``: there the packed draw's
eight dispatched ops cost more than the serial fill they save. At (32, 50), the paper's UCI network, a
site's forward + backward took about 40 us (17%) less with ``torch.rand`` (measured side by side, one
thread); the two cost the same between 8k and 32k elements with one and with two threads, and the packed
draw wins above (its bit operations are single-threaded below ATen's grain size of 32k elements, so the
crossover does not move with the thread count). ``torch.rand`` can return exactly 0 (probability 2**-24 per
element); every site formula maps it to the limit ``logit(0) = -inf``, i.e. a kept unit (``w = 1``), with a
finite output and finite gradients (tested), as it already did for float64 noise.

Draws come from the given generator (the global one by default), so ``torch.manual_seed`` makes runs
repeatable as before; the packed draw's values differ from ``torch.rand``'s for the same state. Other
dtypes, other devices, tensor subclasses and code being compiled or traced use ``torch.rand``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ._tracing import being_traced

__all__ = ["PACKED_MIN_NUMEL", "eager_cpu_uniform", "uniform"]

#: Passed explicitly: a ``torch.device(...)`` context or ``torch.set_default_device`` must not move CPU noise.
_CPU = torch.device("cpu")
#: CPU float32 draws of at least this many elements use the packed draw; smaller ones ``torch.rand``.
PACKED_MIN_NUMEL = 16384
#: 23 random bits: the mantissa of a float32.
_MANTISSA_MASK = (1 << 23) - 1
#: Bit pattern of the float32 1.0 (sign 0, biased exponent 127, mantissa 0).
_FLOAT32_ONE_BITS = 0x3F800000
#: 1 + k * 2**-23 minus this is (k + 1/2) * 2**-23, computed exactly (Sterbenz: the operands are within 2x).
_OFFSET = 1.0 - 2.0**-24
#: The same three constants as CPU tensors (``_OFFSET`` is exact in float32: 24 significant bits).
_MANTISSA_MASK_T = torch.tensor(_MANTISSA_MASK, dtype=torch.int32, device="cpu")
_FLOAT32_ONE_BITS_T = torch.tensor(_FLOAT32_ONE_BITS, dtype=torch.int32, device="cpu")
_OFFSET_T = torch.tensor(_OFFSET, dtype=torch.float32, device="cpu")


def _generator_kwargs(generator: Optional[torch.Generator]) -> Dict[str, torch.Generator]:
    # generator=None is not passed explicitly: with symbolic shapes (torch.compile's dynamic dims) that
    # overload needs concrete sizes.
    return {} if generator is None else {"generator": generator}


def _serial(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]
) -> Tensor:
    return torch.rand(shape, device=device, dtype=dtype, **_generator_kwargs(generator))


def _packed_float32(shape: Sequence[int], numel: int, generator: Optional[torch.Generator]) -> Optional[Tensor]:
    """CPU float32 noise from packed 64-bit draws, or None when the tensor would be a subclass."""
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=_CPU)  # not the default device
    if type(words) is not Tensor:  # FakeTensor or another subclass mode: keep the ordinary op
        return None
    # random_() on int64 draws on [0, 2**63): each 32-bit half has at least 31 random low bits.
    words.random_(**_generator_kwargs(generator))
    halves = words.view(torch.int32)
    if numel % 2:
        halves = halves[:numel]
    # The constants are 0-dim tensors of the operand's dtype, not Python numbers: a Python scalar is wrapped
    # into a tensor on every call, which costs more than the bit operation itself on small masks (same values).
    halves = halves.view(shape).bitwise_and_(_MANTISSA_MASK_T).bitwise_or_(_FLOAT32_ONE_BITS_T)
    return halves.view(torch.float32).sub_(_OFFSET_T)


def uniform(
    shape: Sequence[int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """A new tensor of independent uniform draws in (0, 1), like ``torch.rand``.

    Args:
        shape: the shape of the noise.
        device: where to create it.
        dtype: a floating dtype. CPU float32 draws of at least :data:`PACKED_MIN_NUMEL` elements use the
            packed draw described in the module docstring.
        generator: the generator to draw from; the global one when None.

    Returns:
        A tensor of the given shape, device and dtype.
    """
    device = torch.device(device)
    # Compilers and tracers get the ordinary op (Inductor generates its own parallel random numbers).
    if device.type == "cpu" and not being_traced():
        return eager_cpu_uniform(shape, math.prod(int(size) for size in shape), dtype, generator)
    return _serial(shape, device, dtype, generator)


def eager_cpu_uniform(
    shape: Sequence[int], numel: int, dtype: torch.dtype, generator: Optional[torch.Generator] = None
) -> Tensor:
    """:func:`uniform` on the CPU for a caller that has already ruled out tracers and compilers.

    The site's CPU path (:func:`cd_convert.layers.concrete_dropout`, routing to
    :mod:`cd_convert.host_scalars`) calls this directly, having checked what :func:`uniform` would check
    again: on a small mask each check costs a measurable share of the site.

    Args:
        shape: the shape of the noise.
        numel: its number of elements.
        dtype: a floating dtype.
        generator: the generator to draw from; the global one when None.

    Returns:
        A new CPU tensor of uniform draws: the packed draw for float32 with at least
        :data:`PACKED_MIN_NUMEL` elements, ``torch.rand`` otherwise.
    """
    if dtype == torch.float32 and numel >= PACKED_MIN_NUMEL:
        noise = _packed_float32(shape, numel, generator)
        if noise is not None:
            return noise
    return _serial(shape, _CPU, dtype, generator)
