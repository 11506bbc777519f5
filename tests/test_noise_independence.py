"""The fused kernels' noise (cd_convert.fused) against Philox4x32-10 written from its specification, and
statistics that see whether every element gets its own noise.

The reference below is Philox4x32-10 as published by Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011), pinned by the Random123 known-answer vectors, plus the mapping the kernels document:
noise index ``i`` takes word ``i % 4`` of the Philox call with counter ``(i // 4, 0, 0, 0)`` and key
``(seed, 0)`` (``tl.randint4x(seed, i // 4)``), and ``u = (k + 1/2) * 2**-23`` with ``k`` the low 23 bits of
that word. Nothing here calls the kernels' own helpers, so a kernel that hands one word to several elements
(or the wrong word to one) differs from it.

``test_fused.py`` imports :func:`fused_uniform_reference` to regenerate the noise of a fused call. The
statistics read the noise back from a fused forward pass (at p = 1/2 and t = 1 the output is ``2 (1 - u)``).
Like ``test_fused.py``, the kernel tests run on a CUDA GPU, or on CPU tensors under Triton's interpreter in a
subprocess.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Tuple

import numpy as np
import pytest
import torch

from cd_convert import fused
from triton_interpreter import assert_passes_under_interpreter

_MASK32 = np.uint64(0xFFFFFFFF)
#: Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, Random123 ``philox.h``).
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LOW_23 = np.uint64((1 << 23) - 1)


def philox4x32_10(counters: np.ndarray, key: Tuple[int, int]) -> np.ndarray:
    """Philox4x32 with 10 rounds.

    Each round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit products split in 32-bit halves),
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by ``(W0, W1)`` between rounds.

    Args:
        counters: ``(n, 4)`` array of 32-bit counter words (any integer dtype).
        key: the two 32-bit key words ``(k0, k1)``.

    Returns:
        ``(n, 4)`` uint64 array of the output words (each below 2**32).
    """
    c0, c1, c2, c3 = (counters[:, j].astype(np.uint64) for j in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        # Both factors are below 2**32, so the uint64 product is exact.
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1)


def fused_uniform_reference(seed: int, count: int) -> torch.Tensor:
    """The uniforms the fused kernels draw for noise indices ``0 .. count - 1`` with ``seed``.

    Args:
        seed: the kernel seed (below 2**31, as :mod:`cd_convert.fused` draws it).
        count: how many noise indices.

    Returns:
        A float64 CPU tensor of ``count`` values ``(k + 1/2) * 2**-23``.
    """
    calls = (count + 3) // 4
    counters = np.zeros((calls, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(calls, dtype=np.uint64)
    words = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).reshape(-1)[:count]
    k = (words & _LOW_23).astype(np.float64)
    return torch.from_numpy((k + 0.5) / 2.0**23)


# Random123 tests/kat_vectors, "philox4x32 10" lines: counter words, key words, output words.
_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", _KNOWN_ANSWERS)
def test_reference_philox_matches_the_random123_known_answers(counter, key, expected):
    got = philox4x32_10(np.array([counter], dtype=np.uint64), key)
    assert [int(w) for w in got[0]] == list(expected)


def test_reference_uniforms_lie_on_the_lattice_in_word_order():
    u = fused_uniform_reference(7, 10)
    words = philox4x32_10(np.array([[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]]), (7, 0)).reshape(-1)
    assert torch.equal(u, torch.tensor([((int(w) & 0x7FFFFF) + 0.5) / 2**23 for w in words[:10]]))


# ------------------------------------------------------------------------------ the kernels' own noise

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else ("cpu" if INTERPRETED else None)
runs_kernels = pytest.mark.skipif(
    DEVICE is None or not HAS_TRITON, reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1 (see below)"
)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernels run directly here")
def test_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _forward_noise(count: int, seed_state: int) -> Tuple[torch.Tensor, int]:
    """The uniforms of one fused element-wise forward pass, read back from its output, and its seed.

    At p = 1/2 (logit 0) and t = 1 the output for x = 1 is ``(1 - z) / (1 - p) = 2 * sigmoid(-logit(u)) = 2 (1 - u)``.
    """
    x = torch.ones(count, device=DEVICE)
    torch.manual_seed(seed_state)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device))  # what the forward pass draws first
    torch.manual_seed(seed_state)
    assert fused.supports(x, interpret=INTERPRETED)
    y = fused.fused_concrete_dropout(
        x,
        torch.zeros((), device=DEVICE),
        temperature=1.0,
        eps=1e-6,
        channelwise=False,
        channel_dim=1,
        save_output=False,
    )
    return 1.0 - y.double().cpu() / 2.0, seed


@runs_kernels
@pytest.mark.parametrize("count", [1, 7, 4 * 1024 + 5])  # under one Philox call, a partial call, several blocks
def test_forward_noise_is_the_philox_reference(count):
    u, seed = _forward_noise(count, seed_state=count)
    # The kernel's float32 log/exp/division leave about 1e-6 of error; neighbouring lattice values (or the
    # wrong Philox word) differ by at least 2**-23 and typically by 1/3.
    torch.testing.assert_close(u, fused_uniform_reference(seed, count), rtol=0, atol=2e-6)


@runs_kernels
def test_neighbouring_elements_are_independent_and_uniform():
    n = 1 << 14
    u, _ = _forward_noise(n, seed_state=3)
    centred = u - 0.5
    # Lags 1-3 stay inside one Philox call (its four words), lag 4 is the next call: each correlation of
    # independent U(0,1) draws is 0 with standard error 1/sqrt(n); four elements sharing one word give 0.75.
    for lag in (1, 2, 3, 4):
        correlation = 12 * (centred[lag:] * centred[:-lag]).mean().item()
        assert abs(correlation) < 5 / math.sqrt(n), lag
    # Every group of four (one Philox call) holds four different values. Two independent lattice draws
    # coincide, or land within the kernel's float32 error, with probability about 2**-21 per pair:
    # 6 pairs x 4096 groups make about 0.01 expected repeats, so allow one.
    groups = u.view(-1, 4).sort(dim=1).values
    repeats = int((groups.diff(dim=1) < 1e-6).sum())
    assert repeats <= 1
    # Uniform marginals: the Kolmogorov-Smirnov distance to U(0, 1) is below its 0.999 quantile (1.95/sqrt(n)).
    ordered = u.sort().values
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - ordered, ordered - (ranks - 1) / n).max().item()
    assert distance < 1.95 / math.sqrt(n)


@runs_kernels
def test_channelwise_noise_is_one_reference_value_per_sample_and_channel():
    # Channel-wise, logical channel n * C + c takes noise index n * C + c, whatever the memory layout.
    x = torch.ones(3, 5, 2, 2, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device))
    torch.manual_seed(11)
    assert fused.supports(x, True, 1, interpret=INTERPRETED)
    y = fused.fused_concrete_dropout(
        x, torch.zeros((), device=DEVICE), temperature=1.0, eps=1e-6, channelwise=True, channel_dim=1, save_output=False
    )
    expected = fused_uniform_reference(seed, 15).view(3, 5, 1, 1).expand(3, 5, 2, 2)
    torch.testing.assert_close(1.0 - y.double().cpu() / 2.0, expected, rtol=0, atol=2e-6)
