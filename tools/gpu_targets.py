"""Do the fused attention kernels compile for, and fit, the GPUs people have? Answered without a GPU.

Triton compiles ahead of time for a named target (``GPUTarget``) on a machine without one: PTX and a cubin
through the ``ptxas`` in Triton's wheel, or AMD code objects through its own linker. The compiled kernel
records the shared memory it needs, and that is what decides on a real GPU whether a launch starts: Triton
raises ``OutOfResources`` before the launch when a kernel needs more than the device allows per block.

This tool runs cd_convert's own launchers (``launch_attention_forward`` and ``launch_attention_backward``, with
their shape ladder from :mod:`cd_convert._attention_tiles`) on small CPU tensors, with each Triton kernel
replaced by a stand-in that compiles the launch for the target GPU (same arguments, so the same
specialisation and constants as on the device), and raises ``OutOfResources`` exactly as Triton's launcher
would when the kernel needs more shared memory than the target has. The real ladder code then picks its
shape. For each GPU, dtype and head width it prints the shape each pass took and the shared memory its kernels
need, or that none fits.

Usage::

    python -m tools.gpu_targets                                 # every GPU below, head widths 64, 128, 256
    python -m tools.gpu_targets --gpus A10,T4 --dtypes fp16 --head-dims 128

It must not run under ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Gpu:
    """A compile target and the shared memory one block may use there (the opt-in maximum, bytes)."""

    name: str
    backend: str  # "cuda" or "hip"
    arch: object  # compute capability as an int (90) for CUDA, "gfx942" for HIP
    warp_size: int
    shared_limit: int

    @property
    def capability(self) -> Tuple[int, int]:
        return (int(self.arch) // 10, int(self.arch) % 10) if self.backend == "cuda" else (0, 0)


#: Shared memory per block from NVIDIA's CUDA C++ Programming Guide (compute capabilities table, maximum
#: amount of shared memory per thread block) and AMD's CDNA documentation (64 KB LDS per workgroup).
GPUS: Dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("T4", "cuda", 75, 32, 64 * 1024),
        Gpu("A100", "cuda", 80, 32, 163 * 1024),
        Gpu("A10", "cuda", 86, 32, 99 * 1024),
        Gpu("L4", "cuda", 89, 32, 99 * 1024),
        Gpu("H100", "cuda", 90, 32, 227 * 1024),
        Gpu("MI300X", "hip", "gfx942", 64, 64 * 1024),
    )
}


@dataclass
class PassResult:
    """The shape a pass launched with on one GPU, the shared memory its kernels need, and the shapes refused."""

    tiles: Optional[str]
    shared: int
    refused: List[str]
    error: Optional[str] = None


class _CompilingStandIn:
    """Stands in for one ``triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` compiles for the GPU, checks
    its shared memory as Triton's launcher does, and launches nothing."""

    def __init__(self, kernel, gpu: Gpu, log: List[Tuple[str, int]], cache: Dict):
        self.kernel, self.gpu, self.log, self.cache = kernel, gpu, log, cache

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        from cd_convert._attention_tiles import OutOfResources

        kernel = self.kernel
        target = GPUTarget(self.gpu.backend, self.gpu.arch, self.gpu.warp_size)
        backend = make_backend(target)
        # As JITFunction.run does on a device: bind, specialise, pack the signature and constants.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        key = (self.gpu.backend, self.gpu.arch, kernel.fn.__name__, str(specialization), str(sorted(kwargs.items())))
        shared = self.cache.get(key)
        if shared is None:
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            compiled = _triton().compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
            shared = self.cache[key] = int(compiled.metadata.shared)
        if shared > self.gpu.shared_limit:
            self.log.clear()  # the try ends here: the log keeps the kernels of the try that launches
            raise OutOfResources(shared, self.gpu.shared_limit, "shared memory")
        self.log.append((kernel.fn.__name__, shared))


def _triton():
    import triton

    return triton


_KERNELS = ("_attention_forward", "_attention_delta", "_attention_backward_kv", "_attention_backward_q", "_finish")


@contextlib.contextmanager
def compiling_for(gpu: Gpu, log: List[Tuple[str, int]], cache: Dict) -> Iterator[None]:
    """Replace the attention launchers' kernels with stand-ins compiling for ``gpu``; forget the fitted shapes
    before and after (they belong to the stand-in GPU)."""
    from cd_convert import _attention_tiles, _triton_attention

    saved = {name: getattr(_triton_attention, name) for name in _KERNELS}
    _attention_tiles.forget_fitting_shapes()
    try:
        for name, kernel in saved.items():
            setattr(_triton_attention, name, _CompilingStandIn(kernel, gpu, log, cache))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(_triton_attention, name, kernel)
        _attention_tiles.forget_fitting_shapes()


def _run_pass(launch, log: List[Tuple[str, int]]) -> PassResult:
    """Run one launcher; the shape taken is the last one whose kernels all logged a launch."""
    log.clear()
    try:
        launch()
    except RuntimeError as error:
        return PassResult(None, 0, [], str(error))
    return PassResult(None, max(shared for _, shared in log), [])


def check(
    gpu: Gpu,
    dtype: torch.dtype,
    head_dim: int,
    *,
    causal: bool = False,
    cache: Optional[Dict] = None,
) -> Tuple[PassResult, PassResult]:
    """Run the forward and backward launchers for ``gpu`` on a ``(1, 2, 128, head_dim)`` attention call.

    Args:
        gpu: the target.
        dtype: the inputs' dtype.
        head_dim: D.
        causal: a causal call (else no mask).
        cache: compiled kernels' shared memory by target and launch, kept between calls to save compiling.

    Returns:
        ``(forward, backward)``: the shape each took (``M,N,WARPS,STAGES``) and the most shared memory one of its
        kernels needs, or the error when no shape fits.
    """
    from cd_convert import _attention_tiles, _triton_attention

    cache = {} if cache is None else cache
    q = torch.randn(1, 2, 128, head_dim, dtype=dtype)
    p_logit = torch.zeros(())
    seed = torch.zeros(1, dtype=torch.int64)
    lse = torch.zeros(2, 128)
    log: List[Tuple[str, int]] = []
    forward_ladder, backward_ladder, _ = _attention_tiles.tile_ladder(head_dim, q.element_size())
    results = []
    with compiling_for(gpu, log, cache):
        passes = (
            (
                "forward",
                forward_ladder,
                (),
                lambda: _triton_attention.launch_attention_forward(
                    q, q, q, None, p_logit, seed, causal, 0.125, 10.0, 5.0
                ),
            ),
            (
                "backward",
                backward_ladder,
                (True,),
                lambda: _triton_attention.launch_attention_backward(
                    q, q, q, None, q, q, lse, p_logit, seed, causal, 0.125, 10.0, 5.0, True
                ),
            ),
        )
        for pass_name, ladder, extra, launch in passes:
            result = _run_pass(launch, log)
            key = _triton_attention._variant(pass_name, ladder, q, None, p_logit, causal, *extra)
            index = _attention_tiles.fitting_index(key)
            if index is not None:
                result.tiles = str(ladder[index])
                result.refused = [str(tiles) for tiles in ladder[:index]]
            results.append(result)
    return results[0], results[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default=",".join(GPUS), help=f"comma-separated, of {', '.join(GPUS)}")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="64,128,256")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler this tool runs")
    from cd_convert.fused_attention import dtype_runs_on

    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 takes the kernels only where TF32 is allowed
    print(f"triton {_triton().__version__}, torch {torch.__version__}")
    print("| GPU | shared memory / block | dtype | D | forward shape | its shared | backward shape | its shared |")
    print("|---|---|---|---|---|---|---|---|")
    cache: Dict = {}
    all_fit = True
    started = time.perf_counter()
    for gpu_name in args.gpus.split(","):
        gpu = GPUS[gpu_name]
        for dtype_name in args.dtypes.split(","):
            if not dtype_runs_on(DTYPES[dtype_name], gpu.capability, hip=gpu.backend == "hip"):
                print(
                    f"| {gpu.name} | {gpu.shared_limit // 1024} KB | {dtype_name} | - | explicit attention "
                    f"(no tensor cores for it) | | | |"
                )
                continue
            for head_dim in (int(d) for d in args.head_dims.split(",")):
                forward, backward = check(gpu, DTYPES[dtype_name], head_dim, cache=cache)
                cells = []
                for result in (forward, backward):
                    if result.tiles is None:
                        all_fit = False
                        cells += ["NO SHAPE FITS", "-"]
                    else:
                        refused = f" (after {len(result.refused)} refused)" if result.refused else ""
                        cells += [f"{result.tiles}{refused}", f"{result.shared / 1024:.1f} KB"]
                print(
                    f"| {gpu.name} | {gpu.shared_limit // 1024} KB | {dtype_name} | {head_dim} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )
    print(f"({time.perf_counter() - started:.0f} s of compiling)", file=sys.stderr)
    return 0 if all_fit else 1


if __name__ == "__main__":
    raise SystemExit(main())
