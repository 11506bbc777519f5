"""Do the fused attention kernels compile for, and fit, the GPUs people have? Answered without a GPU.

Triton compiles ahead of time for a named target (``GPUTarget``) on a machine without one: PTX and a cubin
through the ``ptxas`` in Triton's wheel, or AMD code objects through its own linker. The compiled kernel
records the shared memory it needs, and that is what decides on a real GPU whether a launch starts: Triton
raises ``OutOfResources`` before the launch when a kernel needs more than the device allows per block.

This tool runs cd_convert's own launchers (``launch_attention_forward`` and ``launch_attention_backward``, with
their shape ladder from :mod:`cd_convert._attention_tiles`) on small CPU tensors, with each Triton kernel
replaced by a stand-in that compiles the launch for the target GPU (``JITFunction.warmup`` with the same
arguments, so the same specialisation and constants as on the device, while a stand-in for Triton's driver
names the target; any Triton 3.x), and raises ``OutOfResources`` exactly as Triton's launcher
would when the kernel needs more shared memory than the target has. The real ladder code then picks its
shape. For each GPU, dtype and head width it prints the shape each pass took and the shared memory its kernels
need, or that none fits.

Usage::

    python -m tools.gpu_targets                                 # every GPU below, head widths 64, 128, 256
    python -m tools.gpu_targets --gpus A10,T4 --dtypes fp16 --head-dims 128
    PYTHONPATH=/tmp/triton-3.2:. python -m tools.gpu_targets --gpus H100 --isolate   # another Triton release

It must not run under ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


class _TargetDriver:
    """Stands in for Triton's GPU driver while compiling: answers the three questions ``JITFunction.run`` asks
    before it compiles (device, stream, target). Each GPU gets its own device number, so Triton's per-device
    caches of compiled kernels never mix two targets."""

    def __init__(self, gpu: Gpu, device: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(gpu.backend, gpu.arch, gpu.warp_size)
        self.device = device

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class _CompilingStandIn:
    """Stands in for one ``triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` compiles it for the GPU
    (``JITFunction.warmup``: the same binding, specialisation and options as a launch), checks its shared memory
    as Triton's launcher does, and launches nothing."""

    def __init__(self, kernel, gpu: Gpu, log: List[Tuple[str, int]]):
        self.kernel, self.gpu, self.log = kernel, gpu, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            from cd_convert._attention_tiles import OutOfResources

            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            shared = int(compiled.metadata.shared)
            if shared > self.gpu.shared_limit:
                self.log.clear()  # the try ends here: the log keeps the kernels of the try that launches
                raise OutOfResources(shared, self.gpu.shared_limit, "shared memory")
            self.log.append((self.kernel.fn.__name__, shared))

        return launch


def _triton():
    import triton

    return triton


_ATTENTION_KERNELS = (
    "_attention_forward",
    "_attention_delta",
    "_attention_backward_kv",
    "_attention_backward_q",
    "_finish",
)
_SITE_KERNELS = ("_forward", "_backward", "_finish", "_noise")


@contextlib.contextmanager
def compiling_for(gpu: Gpu, log: List[Tuple[str, int]]) -> Iterator[None]:
    """Replace the launchers' kernels (attention and element-wise sites) with stand-ins compiling for ``gpu``,
    with Triton's driver and the attention launchers' capability lookup answering for it; forget the fitted
    shapes before and after (they belong to the stand-in GPU).

    The kernels compiled for the stand-in GPU stay in Triton's in-memory caches under a made-up device number
    (1000 and up), apart from a real GPU's.
    """
    from triton.runtime.driver import driver

    from cd_convert import _attention_tiles, _triton_attention, _triton_kernels

    patched = [(_triton_attention, name) for name in (*_ATTENTION_KERNELS, "_device_capability")]
    patched += [(_triton_kernels, name) for name in _SITE_KERNELS]
    saved = {(module, name): getattr(module, name) for module, name in patched}
    _attention_tiles.forget_fitting_shapes()
    # Restored as it was: resetting would create the real driver, which fails where no GPU is.
    saved_driver_state = dict(vars(driver))
    driver.set_active(_TargetDriver(gpu, device=1000 + list(GPUS).index(gpu.name)))
    try:
        for (module, name), kernel in saved.items():
            if name != "_device_capability":
                setattr(module, name, _CompilingStandIn(kernel, gpu, log))
        # The launchers ask the device's compute capability (the 8-warp rule of Hopper with old Triton releases).
        capability = gpu.capability if gpu.backend == "cuda" else None
        _triton_attention._device_capability = lambda device: capability
        yield
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)
        vars(driver).update(saved_driver_state)
        _attention_tiles.forget_fitting_shapes()


def _variant_launches(dtype: torch.dtype) -> List[Tuple[str, Callable[[], None]]]:
    """``(description, launch)`` for the kernels' other compile-time branches, on small CPU tensors: masks
    (boolean, additive in fp32 under 16-bit inputs), causal, grouped heads, a head width off the power of two, no
    logit gradient, a logit in the inputs' dtype; and the element-wise site kernels in each layout and mode."""
    from cd_convert import _triton_attention, _triton_kernels, fused

    B, H, HKV, L, S, D = 2, 4, 2, 48, 40, 80
    q = torch.randn(B, H, L, D, dtype=dtype)
    kv = torch.randn(B, HKV, S, D, dtype=dtype)
    seed = torch.zeros(1, dtype=torch.int64)
    boolean = torch.ones(1, 1, L, S, dtype=torch.bool).expand(B, H, L, S)
    additive = torch.zeros(L, S, dtype=torch.float32).expand(B, H, L, S)
    lse = torch.zeros(B * H, L)
    launches = []
    for mask, causal, logit_dtype, need_logit, what in (
        (boolean, True, torch.float32, True, "attention: boolean mask, causal, grouped heads, D=80"),
        (additive, False, torch.float32, True, "attention: fp32 additive mask"),
        (None, True, dtype, False, "attention: logit in the inputs' dtype, no logit gradient"),
    ):
        p_logit = torch.zeros((), dtype=logit_dtype)

        def attention(mask=mask, causal=causal, p_logit=p_logit, need_logit=need_logit) -> None:
            _triton_attention.launch_attention_forward(q, kv, kv, mask, p_logit, seed, causal, 0.1, 10.0, 5.0)
            _triton_attention.launch_attention_backward(
                q, kv, kv, mask, q, q, lse, p_logit, seed, causal, 0.1, 10.0, 5.0, need_logit
            )

        launches.append((what, attention))
    x = torch.randn(4, 8, 4, 4, dtype=dtype)
    for channelwise, channels_last in ((False, False), (True, False), (True, True)):
        layout = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        inner, channels, cl = fused._noise_geometry(layout, channelwise, 1)
        p_logit = torch.zeros(())

        def site(x=layout, channelwise=channelwise, inner=inner, channels=channels, cl=cl, p_logit=p_logit) -> None:
            geometry = (p_logit, seed, 10.0, 5.0, channelwise, inner, channels, cl)
            _triton_kernels.launch_forward(x, torch.empty_like(x), *geometry, fused._BLOCK)
            for grad_x, grad_logit, saved in (
                (True, True, False),
                (True, True, True),
                (False, True, False),
                (True, False, False),
            ):
                _triton_kernels.launch_backward(
                    x,
                    x,
                    torch.empty_like(x) if grad_x else None,
                    torch.empty_like(p_logit) if grad_logit else None,
                    *geometry,
                    saved,
                    fused._BLOCK,
                    fused._FINISH_BLOCK,
                )

        launches.append((f"site: channelwise={channelwise}, channels_last={channels_last}", site))
    launches.append(("site noise", lambda: _triton_kernels.launch_noise(torch.empty(1000), 5)))
    return launches


def check_variants(gpu: Gpu, dtype: torch.dtype) -> List[str]:
    """Compile the kernels' other branches (:func:`_variant_launches`) for ``gpu``.

    Returns:
        One line per launch that failed to compile (or fitted no shape), with the error; empty when all compiled.
    """
    failures = []
    log: List[Tuple[str, int]] = []
    with compiling_for(gpu, log):
        for what, launch in _variant_launches(dtype):
            try:
                launch()
            except Exception as error:  # a compile error of any kind is what this check looks for
                failures.append(f"{what}: {type(error).__name__}: {str(error)[:400]}")
    return failures


def _run_pass(launch, log: List[Tuple[str, int]]) -> PassResult:
    """Run one launcher; the shape taken is the last one whose kernels all logged a launch."""
    from cd_convert._attention_tiles import OutOfResources

    log.clear()
    try:
        launch()
    except Exception as error:  # a compile failure of any kind is what this tool looks for
        if isinstance(error, RuntimeError) and isinstance(error.__cause__, OutOfResources):
            return PassResult(None, 0, [], f"no shape fits: {error}")
        return PassResult(None, 0, [], f"the compiler failed: {type(error).__name__}: {str(error)[-300:]}")
    return PassResult(None, max(shared for _, shared in log), [])


def check(gpu: Gpu, dtype: torch.dtype, head_dim: int, *, causal: bool = False) -> Tuple[PassResult, PassResult]:
    """Run the forward and backward launchers for ``gpu`` on a ``(1, 2, 128, head_dim)`` attention call.

    Args:
        gpu: the target.
        dtype: the inputs' dtype.
        head_dim: D.
        causal: a causal call (else no mask).

    Returns:
        ``(forward, backward)``: the shape each took (``M,N,WARPS,STAGES``) and the most shared memory one of its
        kernels needs, or the error when no shape fits.
    """
    from cd_convert import _attention_tiles, _triton_attention

    q = torch.randn(1, 2, 128, head_dim, dtype=dtype)
    p_logit = torch.zeros(())
    seed = torch.zeros(1, dtype=torch.int64)
    lse = torch.zeros(2, 128)
    log: List[Tuple[str, int]] = []
    results = []
    with compiling_for(gpu, log):
        forward_ladder, backward_ladder, _ = _triton_attention._ladders(q)  # as the launchers see this GPU
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
            elif result.error is None:
                raise AssertionError(f"{pass_name} launched, but under another key than {key}: update this tool")
            results.append(result)
    return results[0], results[1]


def _as_row(gpu: Gpu, dtype_name: str, head_dim: int, forward: PassResult, backward: PassResult) -> Dict:
    """One case's results, as the table and ``--json`` hold them."""
    return dict(
        gpu=gpu.name,
        shared_limit=gpu.shared_limit,
        dtype=dtype_name,
        head_dim=head_dim,
        forward=dataclasses.asdict(forward),
        backward=dataclasses.asdict(backward),
    )


def _row(gpu: Gpu, dtype_name: str, head_dim: int) -> Dict:
    """One case, compiled in this process."""
    return _as_row(gpu, dtype_name, head_dim, *check(gpu, DTYPES[dtype_name], head_dim))


def _isolated_row(gpu: Gpu, dtype_name: str, head_dim: int) -> Dict:
    """One case, compiled in a child process: a compiler that aborts (an LLVM ``UNREACHABLE``, a segfault) ends
    the child only, and the row says so."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        argv = ["--gpus", gpu.name, "--dtypes", dtype_name, "--head-dims", str(head_dim), "--json", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "tools.gpu_targets", *argv], capture_output=True, text=True, timeout=1800
        )
        if out.exists():
            return json.loads(out.read_text())["rows"][0]
    last_lines = " / ".join(line.strip() for line in done.stderr.strip().splitlines()[-2:])
    what = "the compiler crashed" if done.returncode < 0 else "the check failed"  # killed by a signal, or raised
    crashed = PassResult(None, 0, [], f"{what} (exit status {done.returncode}): {last_lines}")
    return _as_row(gpu, dtype_name, head_dim, crashed, crashed)


def _cells(row: Dict) -> List[str]:
    cells = []
    for name in ("forward", "backward"):
        result = row[name]
        if result["tiles"] is not None:
            refused = f" (after {len(result['refused'])} refused)" if result["refused"] else ""
            cells += [f"{result['tiles']}{refused}", f"{result['shared'] / 1024:.1f} KB"]
        elif result["error"] and result["error"].startswith("the compiler crashed"):
            cells += ["COMPILER CRASHED", result["error"][:160]]
        elif result["error"] and result["error"].startswith("the check failed"):
            cells += ["CHECK FAILED", result["error"][:160]]
        elif result["error"] and result["error"].startswith("the compiler failed"):
            cells += ["COMPILER FAILED", result["error"][:160]]
        else:
            cells += ["NO SHAPE FITS", "-"]
    return cells


def _print_variants(gpu_names: Sequence[str], dtype_names: Sequence[str]) -> int:
    """``--variants``: one line per GPU and dtype; exit status 1 if a launch failed to compile."""
    from cd_convert.fused_attention import dtype_runs_on

    all_compiled = True
    for gpu_name in gpu_names:
        gpu = GPUS[gpu_name]
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            if not dtype_runs_on(dtype, gpu.capability, gpu.backend == "hip", _triton().__version__):
                continue
            failures = check_variants(gpu, dtype)
            all_compiled = all_compiled and not failures
            verdict = "every branch compiled" if not failures else "FAILED: " + " | ".join(failures)
            print(f"{gpu.name} {dtype_name}: {verdict}", flush=True)
    return 0 if all_compiled else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default=",".join(GPUS), help=f"comma-separated, of {', '.join(GPUS)}")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--isolate", action="store_true", help="compile each case in a child process (survives compiler crashes)"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="instead of the shape table: compile the kernels' other branches (masks, causal, grouped heads, "
        "site layouts and modes) for each GPU and dtype",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler this tool runs")
    from cd_convert.fused_attention import dtype_runs_on

    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 takes the kernels only where TF32 is allowed
    print(f"triton {_triton().__version__}, torch {torch.__version__}")
    if args.variants:
        return _print_variants(args.gpus.split(","), args.dtypes.split(","))
    print("| GPU | shared memory / block | dtype | D | forward shape | its shared | backward shape | its shared |")
    print("|---|---|---|---|---|---|---|---|")
    rows: List[Dict] = []
    started = time.perf_counter()
    for gpu_name in args.gpus.split(","):
        gpu = GPUS[gpu_name]
        for dtype_name in args.dtypes.split(","):
            if not dtype_runs_on(DTYPES[dtype_name], gpu.capability, gpu.backend == "hip", _triton().__version__):
                print(
                    f"| {gpu.name} | {gpu.shared_limit // 1024} KB | {dtype_name} | - | explicit attention "
                    f"(no tensor cores for it, or this Triton cannot compile for it) | | | |"
                )
                continue
            for head_dim in (int(d) for d in args.head_dims.split(",")):
                row = (_isolated_row if args.isolate else _row)(gpu, dtype_name, head_dim)
                rows.append(row)
                print(
                    f"| {gpu.name} | {gpu.shared_limit // 1024} KB | {dtype_name} | {head_dim} | "
                    + " | ".join(_cells(row))
                    + " |",
                    flush=True,
                )
    print(f"({time.perf_counter() - started:.0f} s of compiling)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": _triton().__version__, "rows": rows}, indent=1))
    every_case_fits = all(row[name]["tiles"] is not None for row in rows for name in ("forward", "backward"))
    return 0 if every_case_fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
