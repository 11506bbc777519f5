"""The fused attention kernels compile for GPUs this machine does not have, and fit their shared memory.

``tools.gpu_targets`` compiles the launches cd_convert's own launchers make (through Triton's ahead-of-time
compiler: ``ptxas`` for NVIDIA targets, no GPU needed) and raises Triton's ``OutOfResources`` where a kernel needs
more shared memory than the GPU gives a block, as the launch on the device would. The ladder of launch shapes
must then find one that fits. The cases are the tightest ones in the tool's full table: the widest heads the
kernels take, on the GPUs with the least shared memory per block (64 KB on a T4, 99 KB on the A10/L4 class).
The kernels compiled for the stand-in GPUs stay in Triton's in-memory caches under made-up device numbers
(1000 and up), apart from a real GPU's.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler these tests run", allow_module_level=True)

from tools.gpu_targets import GPUS, check, check_variants  # noqa: E402

CASES = [
    ("A10", torch.float16, 128),  # the default backward shapes need more than 99 KB here
    ("A10", torch.float32, 256),  # the widest fp32 heads: down to the smallest shape
    ("T4", torch.float16, 256),  # 64 KB
]


@pytest.fixture(autouse=True)
def _tf32():
    """fp32 takes the kernels only where TF32 matmuls are allowed (``fused_attention.supports``)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("gpu,dtype,head_dim", CASES, ids=[f"{g}-{d}-{h}".replace("torch.", "") for g, d, h in CASES])
def test_some_shape_of_the_ladder_fits_the_gpu(gpu, dtype, head_dim):
    limit = GPUS[gpu].shared_limit
    for result in check(GPUS[gpu], dtype, head_dim):
        assert result.error is None and result.tiles is not None, result.error
        assert 0 < result.shared <= limit


def test_the_defaults_measured_on_an_h100_class_gpu_stay_there():
    import triton

    # Triton 3.0-3.2 abort compiling 8-warp kernels of 16-bit heads 128 wide for Hopper: 4 warps there.
    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    warps = 8 if release >= (3, 3) else 4
    forward, backward = check(GPUS["H100"], torch.float16, 128)
    assert forward.refused == [] and backward.refused == []
    assert forward.tiles == backward.tiles == f"64,64,{warps},default"


def test_every_branch_of_the_kernels_compiles_for_a_hopper_gpu():
    # Masks, causal, grouped heads, an odd head width, no logit gradient; the site kernels' layouts and modes.
    # Hopper's code generation (wgmma) is the one the interpreter is furthest from.
    assert check_variants(GPUS["H100"], torch.bfloat16) == []


def test_the_compile_check_compiles_both_passes_for_the_device(monkeypatch):
    """``fused_attention.compiles_for`` with the real kernels, Triton's driver answering for an A100: the
    forward and backward kernels compile (``warmup``), nothing launches, and the variant is remembered."""
    from triton.runtime.driver import driver

    from cd_convert import fused_attention
    from tools.gpu_targets import _TargetDriver

    monkeypatch.setattr(fused_attention, "_COMPILED", set())
    monkeypatch.setattr(fused_attention, "_UNCOMPILABLE", {})
    saved = dict(vars(driver))
    driver.set_active(_TargetDriver(GPUS["A100"], device=999))
    try:
        q = torch.randn(1, 2, 40, 64, dtype=torch.bfloat16)
        mask = torch.ones(40, 40, dtype=torch.bool)
        p_logit = torch.zeros((), requires_grad=True)
        assert fused_attention.compiles_for(q, q, q, p_logit, mask, is_causal=True)
        assert len(fused_attention._COMPILED) == 1 and fused_attention._UNCOMPILABLE == {}
    finally:
        vars(driver).update(saved)


def test_the_tool_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    from tools.gpu_targets import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as raised:
        main(["--gpus", "T4"])
    assert raised.value.code == 2 and "unset TRITON_INTERPRET" in capsys.readouterr().err
