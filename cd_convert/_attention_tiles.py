"""Launch shapes of the fused attention kernels, and the search for one that fits the GPU's shared memory.

The default shapes were measured fastest on an H200 (``benchmarks.attention_kernel``), whose blocks may use 227 KB
of shared memory. Other GPUs allow far less: 163 KB on an A100, 99 KB on an A10, L4 or RTX 30/40-series card,
64 KB on a T4 or an AMD Instinct. A launch that needs more fails before it starts, with Triton's
``OutOfResources``, and the kernels then take the next, smaller shape of :func:`tile_ladder` (fewer pipeline
stages, then smaller tiles). The shape that worked is remembered per device and kernel variant, so the search
happens once per process. ``python -m tools.gpu_targets`` compiles every rung for several GPUs (no GPU needed) and
prints which one each GPU takes.

The noise does not depend on the launch shape (see :mod:`cd_convert._triton_attention`), so a smaller shape gives
the same mask; only the order of floating-point sums changes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Hashable, Optional, Tuple, TypeVar

from .fused_attention import TILES_VARIABLE, triton_release

try:  # Triton >= 3.0
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older Triton
    from triton.runtime.autotuner import OutOfResources

__all__ = [
    "OutOfResources",
    "Tiles",
    "eight_warps_compile",
    "tiles_for",
    "tile_ladder",
    "launch_in_fitting_shape",
    "fitting_index",
    "forget_fitting_shapes",
]

_Result = TypeVar("_Result")


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch shape: query rows x key columns per program, warps and software-pipeline stages
    (None: Triton's default)."""

    block_m: int
    block_n: int
    warps: int
    stages: Optional[int]

    def __str__(self) -> str:
        return f"{self.block_m},{self.block_n},{self.warps},{self.stages if self.stages is not None else 'default'}"


_TILES_FORM = (
    "expected 'M,N,WARPS,STAGES;M,N,WARPS,STAGES' (forward; backward) with M and N powers of two >= 16, WARPS a "
    "power of two up to 16 and STAGES >= 1, e.g. '64,64,4,2;64,64,4,2'"
)

#: The smallest shape of every ladder: 16 x 16 tiles are the least ``tl.dot`` takes; one stage keeps no
#: operand tile in flight. ``tools.gpu_targets`` checks that it fits 64 KB GPUs at every head width the kernels
#: accept, in the dtypes :func:`cd_convert.fused_attention.supports` sends there.
_SMALLEST = (Tiles(32, 32, 4, 1), Tiles(16, 16, 4, 1))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _parse_tiles(text: str) -> Tuple[Tiles, Tiles]:
    try:
        parts = [tuple(int(v) for v in part.split(",")) for part in text.split(";")]
        forward, backward = (Tiles(*part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{TILES_VARIABLE}={text!r}: {_TILES_FORM}") from None
    for tiles in (forward, backward):
        blocks_ok = all(b >= 16 and b & (b - 1) == 0 for b in (tiles.block_m, tiles.block_n))
        if not blocks_ok or tiles.warps not in (1, 2, 4, 8, 16) or (tiles.stages or 0) < 1:
            raise ValueError(f"{TILES_VARIABLE}={text!r}: {_TILES_FORM}")
    return forward, backward


def eight_warps_compile(capability: Optional[Tuple[int, int]], triton_version: str) -> bool:
    """Whether the kernels may use 8 warps: not on a Hopper GPU (compute capability 9.x) with Triton older than
    3.3, whose compiler aborts the process on the 8-warp kernels of 16-bit heads 128 wide (an LLVM ``UNREACHABLE``
    in 3.0 and 3.1, a failed assertion in ``LinearLayout::reshape`` in 3.2; found by ``tools.gpu_targets
    --isolate`` with each release). An abort cannot be caught, so it is avoided before the first launch.

    Args:
        capability: the CUDA device's compute capability, or None for other devices.
        triton_version: ``triton.__version__``.
    """
    if capability is None or capability[0] != 9:
        return True
    release = triton_release(triton_version)
    return release is None or release >= (3, 3)


def tiles_for(head_dim: int, element_size: int, eight_warps: bool = True) -> Tuple[Tiles, Tiles, int]:
    """``(forward tiles, backward tiles, BLOCK_D)`` first tried for a head width and element size.

    Default: 64 x 64 tiles while a row of a tile is at most 256 bytes (16-bit heads up to 128 wide, fp32 up to
    64), else 32 x 32; 8 warps for 128-wide heads; Triton's default pipeline stages (the launch shapes measured
    fastest on an H200, ``benchmarks.attention_kernel``). ``CD_CONVERT_ATTENTION_TILES`` replaces them.

    Args:
        head_dim: the heads' width D.
        element_size: bytes per element of the inputs.
        eight_warps: False where 8 warps must be avoided (:func:`eight_warps_compile`): 4 instead.
    """
    block_d = max(16, _next_power_of_2(head_dim))
    override = os.environ.get(TILES_VARIABLE)
    if override:
        return (*_parse_tiles(override), block_d)
    block = 64 if block_d * element_size <= 256 else 32
    tiles = Tiles(block, block, 8 if block_d >= 128 and block == 64 and eight_warps else 4, None)
    return tiles, tiles, block_d


def tile_ladder(
    head_dim: int, element_size: int, eight_warps: bool = True
) -> Tuple[Tuple[Tiles, ...], Tuple[Tiles, ...], int]:
    """The launch shapes to try, in order, for the forward kernel and for the backward kernels, and ``BLOCK_D``.

    Each ladder starts at :func:`tiles_for`'s shape, then the same tiles with one pipeline stage (less than half
    the shared memory on the GPUs measured), then 32 x 32 and 16 x 16 tiles with one stage. With
    ``CD_CONVERT_ATTENTION_TILES`` set, the ladders hold only the shapes it names: the user's choice is kept, and
    a shape that does not fit fails with a message that says so (more than 4 warps where ``eight_warps`` is False
    raise ``ValueError`` before any launch).

    Args:
        head_dim: the heads' width D.
        element_size: bytes per element of the inputs.
        eight_warps: False where 8 warps must be avoided (:func:`eight_warps_compile`).
    """
    return _cached_ladders(head_dim, element_size, eight_warps, os.environ.get(TILES_VARIABLE))


@functools.lru_cache(maxsize=64)
def _cached_ladders(
    head_dim: int, element_size: int, eight_warps: bool, override: Optional[str]
) -> Tuple[Tuple[Tiles, ...], Tuple[Tiles, ...], int]:
    """:func:`tile_ladder`, built once per head width, element size, warp rule and variable value (every launch
    asks for it)."""
    forward, backward, block_d = tiles_for(head_dim, element_size, eight_warps)
    if override:
        if not eight_warps and max(forward.warps, backward.warps) > 4:
            # The compiler would abort the process: refuse with a message instead.
            raise ValueError(
                f"{TILES_VARIABLE}={override!r} asks for {max(forward.warps, backward.warps)} "
                "warps, on which Triton releases older than 3.3 abort the process when compiling for a Hopper GPU; "
                "use at most 4 warps, or upgrade Triton (PyTorch 2.7 or later ships 3.3)"
            )
        return (forward,), (backward,), block_d

    def ladder(first: Tiles) -> Tuple[Tiles, ...]:
        rungs = (first, replace(first, stages=1), *_SMALLEST)
        return tuple(dict.fromkeys(rungs))  # without repeats, in order

    return ladder(forward), ladder(backward), block_d


# (device, pass, variant) -> index of the first rung that launched.
_FITTING: Dict[Hashable, int] = {}


def forget_fitting_shapes() -> None:
    """Forget the shapes found so far (the next launch of each variant starts its ladder again)."""
    _FITTING.clear()


def fitting_index(key: Hashable) -> Optional[int]:
    """The ladder index that launched for ``key``, or None if no launch with ``key`` has finished yet."""
    return _FITTING.get(key)


def launch_in_fitting_shape(
    key: Hashable, ladder: Tuple[Tiles, ...], launch: Callable[[Tiles], _Result], what: str
) -> _Result:
    """Run ``launch`` with the first shape of ``ladder`` whose kernels fit the GPU, starting from the one that
    fitted last time for ``key``.

    Args:
        key: the device and kernel variant (everything that changes the kernels' shared memory besides the shape).
        ladder: the shapes, largest first (:func:`tile_ladder`).
        launch: launches the pass's kernels with a shape. It must have no effect when it raises
            ``OutOfResources``: Triton raises it before a kernel starts, and a pass's kernels only write
            outputs that the next try writes again.
        what: the pass and inputs, for the error message.

    Returns:
        What ``launch`` returned.

    Raises:
        RuntimeError: no shape fits; it names the shapes tried, the shared memory the last one needed, and what to
            do.
    """
    start = _FITTING.get(key, 0)
    failure: Optional[BaseException] = None
    for index in range(start, len(ladder)):
        try:
            result = launch(ladder[index])
        except OutOfResources as error:
            failure = error
            continue
        _FITTING[key] = index
        return result
    tried = "; ".join(str(tiles) for tiles in ladder[start:])
    hint = (
        f"unset {TILES_VARIABLE} or set it to a smaller shape"
        if os.environ.get(TILES_VARIABLE)
        else "convert with fused_attention=False to use explicit attention for this model"
    )
    raise RuntimeError(
        f"cd_convert's fused attention kernels do not fit this GPU for {what}: every launch shape tried "
        f"(M,N,WARPS,STAGES: {tried}) needs more than the GPU has ({failure}). To train anyway, {hint}."
    ) from failure
