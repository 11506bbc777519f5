"""An optional C++ build of the CPU's concrete-dropout site and regulariser (opt-in).

On the CPU, at the small shapes of the paper's UCI network (batch 32, 50 units), a site's cost is mostly
per-call work around its few ops: the module's Python, the autograd Function's Python forward and backward,
and the engine's call back into Python. :func:`enable` compiles ``csrc/host_site.cpp`` with
``torch.utils.cpp_extension`` (a C++ compiler and ninja needed: ``pip install ninja``; about 30 s the first
time, then cached by PyTorch under ``~/.cache/torch_extensions``) and routes the calls that
:mod:`cd_convert.host_scalars` and :mod:`cd_convert.host_regularizer` serve through it, on the same noise:

* a site below :data:`cd_convert.noise.PACKED_MIN_NUMEL` elements makes one loop per pass: the forward pass
  computes the mask and the output in float64 without a logarithm or an exponential per element where
  ``1 / temperature`` is a whole number (within 2 units in the last place of a float64 reference), the
  backward pass sums the logit gradient's terms in float64; both agree with the Python path to rounding;
* larger sites, other temperatures and strided inputs run the Python path's ATen ops: bitwise its results;
* the regulariser: the Python path's float64 arithmetic in the same order, with the squared norms of small
  weights summed in float64 by one loop each (no op dispatched; the Python path squares a float32 norm), for
  any number of sites (the Python host path stops at :data:`cd_convert.host_regularizer.MAX_SITES`); its
  gradients for a p-logit or a targeted Linear's weight are handed to the site's node when that node runs
  later in the same backward pass, which adds them to its own (*deliveries*: no gradient tensor built for
  them, no sum where two gradients meet at one leaf); its steady-state call reads the p-logits and weights
  from the module tree and makes the cached plan's checks in C++ (the Python checks cost about as much as the
  regulariser's own forward pass at the UCI step), and its autograd node is a plain C++ node;
* a targeted ``nn.Linear`` and its input site: one autograd node for both in training
  (:mod:`cd_convert.sites.fused_linear`: the layer enters this *fused mode* at a call the node serves when
  nothing else hooks it, and leaves it when that changes), the values of the site followed by ``F.linear``.

``benchmarks/train_step.py --cpu-extension`` measures it side by side with the Python path.

It is opt-in because the first call compiles: a library that starts a compiler on import, or on a model's
first forward pass, surprises its users. Everything else (other devices, channel-wise masks, 16-bit inputs,
tracers) is unchanged, and :func:`disable` switches back.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["disable", "enable", "loaded"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "host_site.cpp"
#: The extension module while enabled; read by :func:`cd_convert.host_scalars.own_noise_call` on every call.
_MODULE: Optional[ModuleType] = None
#: The built module, kept across :func:`disable` so that enabling again does not rebuild.
_BUILT: Optional[ModuleType] = None


def enable(verbose: bool = False) -> ModuleType:
    """Build (or load the cached build of) the C++ site and route eligible CPU site calls through it.

    Args:
        verbose: show the compiler's output.

    Returns:
        The extension module.

    Raises:
        RuntimeError: if the extension cannot be built (no C++ compiler or ninja, no write access to the build
            folder); the message says what to install. Nothing is switched on then.
    """
    global _MODULE, _BUILT
    if _BUILT is None:
        _BUILT = _build(verbose)
    _MODULE = _BUILT
    return _BUILT


def disable() -> None:
    """Route CPU site calls back through the Python path (the built module stays loaded)."""
    global _MODULE
    _MODULE = None


def loaded() -> Optional[ModuleType]:
    """The extension module while enabled, else None."""
    return _MODULE


def _build_name(stem: str = "cd_convert") -> str:
    """The extension module's name: ``stem``, then the torch version, so that a build cached for another torch is
    never loaded into this one."""
    import torch

    return f"{stem}_host_site_" + re.sub(r"\W", "_", torch.__version__)


def _build(verbose: bool) -> ModuleType:
    """Compile and import ``csrc/host_site.cpp`` (PyTorch caches the build and rebuilds when the source changes)."""
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        return cpp_extension.load(
            name=_build_name(),
            sources=[str(_SOURCE)],
            extra_cflags=["-O3"],
            verbose=verbose,
        )
    except Exception as exc:  # compiler, ninja, file system: one message that says what to do
        raise RuntimeError(
            f"cd_convert.cpu_extension.enable() could not build the C++ CPU site ({type(exc).__name__}: {exc}). "
            "It needs a C++ compiler (g++ or clang) and ninja (pip install ninja). Without it cd_convert keeps its "
            "Python CPU path, which computes the same values."
        ) from exc
