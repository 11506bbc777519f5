"""Tests for the fused concrete-attention kernels (cd_convert.fused_attention) and the sites that use them.

The reference is attention written out in float64 with autograd (scores, softmax, the paper's formula
``reference_concrete_dropout`` on the probabilities, matmul), on the noise the kernel used, which is regenerated
by an independent Philox4x32-10 (``philox4x32_10`` in ``test_noise_independence.py``, pinned by the Random123
known answers) from the mapping ``cd_convert._triton_attention`` documents. On a machine with a CUDA GPU the
kernel tests run on it; without one they run on CPU tensors under Triton's interpreter, in a subprocess
(``test_under_triton_interpreter``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import cd_convert  # noqa: E402
from cd_convert import fused_attention  # noqa: E402
from cd_convert.layers import reference_concrete_dropout  # noqa: E402
from cd_convert.sites import attention_routing  # noqa: E402
from test_noise_independence import philox4x32_10  # noqa: E402  (tests/ is on sys.path)
from triton_interpreter import assert_passes_under_interpreter  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else ("cpu" if INTERPRETED else None)
runs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1 (see below)")
EPS = 1e-6


@pytest.fixture(autouse=True)
def _kernels_on_cpu_when_interpreted(monkeypatch):
    monkeypatch.setattr(fused_attention, "INTERPRET_ON_CPU", INTERPRETED)


@pytest.fixture(autouse=True)
def _tf32_allowed(monkeypatch):
    """On a GPU the kernel takes fp32 inputs only where TF32 matmuls are allowed (fused_attention.supports)."""
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernels run directly here")
def test_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def attention_uniform_reference(seed: int, batch: int, heads: int, length: int, keys: int) -> torch.Tensor:
    """The uniforms of a ``(batch, heads, length, keys)`` call: element (b, h, i, j) takes word j % 4 of the Philox
    call with counter (i * G + j // 4, b * heads + h, 0, 0), key (seed, 0), G = ceil(keys / 4)."""
    groups = (keys + 3) // 4
    out = torch.empty(batch * heads, length, keys, dtype=torch.float64)
    rows, cols = np.meshgrid(np.arange(length), np.arange(groups), indexing="ij")
    for bh in range(batch * heads):
        counters = np.zeros((length * groups, 4), dtype=np.uint64)
        counters[:, 0] = (rows * groups + cols).reshape(-1)
        counters[:, 1] = bh
        words = philox4x32_10(counters, (seed, 0)).reshape(length, groups * 4)[:, :keys]
        out[bh] = torch.from_numpy(((words & np.uint64(0x7FFFFF)).astype(np.float64) + 0.5) / 2.0**23)
    return out.view(batch, heads, length, keys)


def _seeded_call(q, k, v, p_logit, seed_state=0, temperature=0.1, **kwargs):
    """The fused call with a known seed; returns (out, seed)."""
    torch.manual_seed(seed_state)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=q.device))  # what the forward pass draws first
    torch.manual_seed(seed_state)
    out = fused_attention.fused_concrete_attention(q, k, v, p_logit, temperature=temperature, eps=EPS, **kwargs)
    return out, seed


def _reference(q, k, v, p_logit, u, temperature, attn_mask=None, is_causal=False):
    """Explicit attention in float64 with autograd, concrete dropout on the probabilities with noise ``u``."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, -1)
    return reference_concrete_dropout(weights, p_logit, u, temperature, EPS) @ v


def _compare(shape, *, kv_heads=None, causal=False, mask=None, p=0.3, temperature=0.1, dtype=torch.float32, tol=1e-4):
    if DEVICE == "cuda" and dtype == torch.float32:
        tol = max(tol, 5e-3)  # fp32 takes the kernel with TF32 dots only (see the tf32 fixture)
    batch, heads, length, keys, dim = shape
    kv_heads = kv_heads or heads
    torch.manual_seed(1)
    q = torch.randn(batch, heads, length, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, keys, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, keys, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    p_logit = torch.tensor(math.log(p / (1 - p)), device=DEVICE, requires_grad=True)
    mask_dev = None if mask is None else mask.to(DEVICE)
    assert fused_attention.supports(q, k, v, mask_dev, enable_gqa=kv_heads != heads)
    out, seed = _seeded_call(q, k, v, p_logit, temperature=temperature, attn_mask=mask_dev, is_causal=causal)
    grad = torch.randn_like(out)
    out.backward(grad)

    u = attention_uniform_reference(seed, batch, heads, length, keys)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, p_logit)]
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    expected = _reference(*refs, u, temperature, ref_mask, causal)
    expected.backward(grad.double().cpu())
    for name, got, want in zip(
        ("out", "dq", "dk", "dv", "dlogit"),
        (out, q.grad, k.grad, v.grad, p_logit.grad),
        (expected, *(r.grad for r in refs)),
    ):
        err = float((got.double().cpu() - want).norm() / want.norm())
        assert err < tol, f"{name}: relative error {err:.2e}"


@runs_kernels
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_values_and_all_gradients_match_explicit_attention_with_the_formula(p):
    _compare((2, 3, 37, 41, 24), p=p)  # lengths and head width off the tile sizes


@runs_kernels
def test_wide_heads_take_the_small_tiles():
    _compare((1, 2, 45, 50, 80))  # fp32 rows of 128 floats: 32 x 32 tiles, a head width off the power of two


@runs_kernels
def test_other_launch_shapes_give_the_same_results(monkeypatch):
    # Unequal blocks: the backward's two kernels walk the tiles transposed; causal skipping and grouped heads.
    monkeypatch.setenv(fused_attention.TILES_VARIABLE, "32,16,4,1;16,32,2,1")
    _compare((1, 2, 30, 45, 16), causal=True)
    _compare((2, 4, 21, 37, 16), kv_heads=2)


@runs_kernels
def test_a_shape_refused_for_shared_memory_gives_way_to_a_smaller_one_with_the_same_results(monkeypatch):
    """As on a GPU with less shared memory than the default shapes need: Triton refuses the launch before it
    starts; the next shape of the ladder runs, with the same noise, and is remembered."""
    from cd_convert import _attention_tiles, _triton_attention

    refused = []

    def refusing_default_shapes(name):
        kernel = getattr(_triton_attention, name)

        class Refusing:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if "num_stages" not in kwargs:  # the default shapes leave the stages to Triton
                        refused.append(name)
                        raise _attention_tiles.OutOfResources(200 * 1024, 99 * 1024, "shared memory")
                    return kernel[grid](*args, **kwargs)

                return launch

        return Refusing()

    # The backward's query kernel runs after its key/value kernel launched: the whole pass is redone.
    for name in ("_attention_forward", "_attention_backward_q"):
        monkeypatch.setattr(_triton_attention, name, refusing_default_shapes(name))
    _attention_tiles.forget_fitting_shapes()
    try:
        _compare((2, 3, 37, 41, 24))
        assert refused == ["_attention_forward", "_attention_backward_q"]
        _compare((1, 3, 20, 41, 24))
        assert refused == ["_attention_forward", "_attention_backward_q"]  # the fitted shapes are remembered
    finally:
        _attention_tiles.forget_fitting_shapes()


@pytest.mark.skipif(DEVICE != "cuda", reason="16-bit dots: on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_a_vit_shape(dtype):
    _compare((2, 3, 197, 197, 64), dtype=dtype, tol=2e-2)


@runs_kernels
def test_the_benchmark_script_runs_and_checks_its_accuracy():
    from benchmarks.attention_kernel import Shape, accuracy, tiles_set, variants

    shape = Shape("tiny", 1, 2, 20, 16, dtype=torch.float32)
    small_tiles = "32,16,4,1;16,32,2,1"  # other launch shapes than the defaults, through the variable
    steps = variants(shape, torch.device(DEVICE), [small_tiles])
    assert set(steps) == {"sdpa", "sdpa_p0", "fused", "explicit", f"fused[{small_tiles}]"}
    for step in steps.values():
        step()
    tol = 1e-4 if DEVICE == "cpu" else 5e-3  # TF32 on a GPU
    assert max(accuracy(shape, torch.device(DEVICE)).values()) < tol
    with tiles_set(small_tiles):
        assert max(accuracy(shape, torch.device(DEVICE)).values()) < tol
        assert fused_attention.TILES_VARIABLE in os.environ
    assert fused_attention.TILES_VARIABLE not in os.environ


@pytest.mark.parametrize(
    "capability,hip,takes",
    [
        ((7, 0), False, {"float16": False, "bfloat16": False, "float32": False}),  # V100: older than Triton's targets
        ((7, 5), False, {"float16": True, "bfloat16": False, "float32": False}),  # T4: fp16 tensor cores only
        ((8, 0), False, {"float16": True, "bfloat16": True, "float32": True}),  # A100: bf16 and TF32 too
        ((9, 0), False, {"float16": True, "bfloat16": True, "float32": True}),
        ((9, 4), True, {"float16": True, "bfloat16": True, "float32": True}),  # AMD: not NVIDIA's numbering
    ],
)
def test_the_kernels_take_a_dtype_only_on_gpus_with_tensor_cores_for_it(capability, hip, takes):
    for name, expected in takes.items():
        assert fused_attention.dtype_runs_on(getattr(torch, name), capability, hip=hip) is expected, name


@pytest.mark.parametrize(
    "version,capability,takes",
    [("3.3.1", (7, 5), False), ("3.3.0", (7, 5), False), ("3.2.0", (7, 5), True), ("3.4.0", (7, 5), True),
     ("3.3.1", (8, 0), True), ("3.3.1", (9, 0), True)],
)
def test_triton_3_3_leaves_attention_explicit_on_a_t4(version, capability, takes):
    # Triton 3.3 fails to compile the kernels for compute capability 7.5 (tools.gpu_targets --variants).
    assert fused_attention.dtype_runs_on(torch.float16, capability, triton_version=version) is takes


@pytest.mark.parametrize(
    "version,takes",
    [("2.3.1", False), ("2.1.0", False), ("3.0.0", True), ("3.2.0+git35c6c7c6", True), ("3.8.0", True),
     ("10.0.0", True), ("unknown", False)],
)
def test_triton_releases_older_than_3_leave_attention_explicit(version, takes):
    # Triton 2.x has no tl.exp2 and no input_precision for tl.dot: the kernels would not compile.
    assert fused_attention.triton_version_takes_kernels(version) is takes


class _FakeKernels:
    """Stands in for ``_triton_attention`` where no GPU is: its launchers record compile-only calls and fail as a
    compiler that cannot build the kernels would, for the dtypes in ``failing``."""

    def __init__(self, failing=(), error=RuntimeError("PassManager::run failed")):
        from cd_convert import _triton_attention

        self._variant = _triton_attention._variant
        self.failing, self.error, self.calls = failing, error, []

    def launch_attention_forward(self, q, *args, compile_only=False):
        self.calls.append(("forward", q.dtype, compile_only))
        if q.dtype in self.failing:
            raise self.error
        return torch.empty_like(q), torch.empty(q.shape[0] * q.shape[1], q.shape[2])

    def launch_attention_backward(self, q, *args, compile_only=False):
        self.calls.append(("backward", q.dtype, compile_only))


@pytest.fixture
def fake_kernels(monkeypatch):
    def install(**kwargs):
        kernels = _FakeKernels(**kwargs)
        monkeypatch.setattr(fused_attention, "_kernels", lambda: kernels)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setattr(fused_attention, "_COMPILED", set())
        monkeypatch.setattr(fused_attention, "_UNCOMPILABLE", {})
        return kernels

    return install


def test_a_variant_whose_kernels_do_not_compile_takes_explicit_attention_with_one_warning(fake_kernels):
    kernels = fake_kernels(failing=(torch.float16,))
    q = torch.zeros(1, 2, 16, 32, dtype=torch.float16)
    p_logit = torch.zeros((), requires_grad=True)
    with pytest.warns(RuntimeWarning, match="do not compile.*PassManager::run failed.*explicit attention"):
        assert not fused_attention.compiles_for(q, q, q, p_logit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second compile
        assert not fused_attention.compiles_for(q, q, q, p_logit)
    assert kernels.calls == [("forward", torch.float16, True)]
    q32 = q.float()  # another variant compiles: both passes, once
    assert fused_attention.compiles_for(q32, q32, q32, p_logit) and fused_attention.compiles_for(q32, q32, q32, p_logit)
    assert kernels.calls[1:] == [("forward", torch.float32, True), ("backward", torch.float32, True)]


def test_running_out_of_memory_while_compiling_is_not_taken_for_a_compiler_failure(fake_kernels):
    fake_kernels(failing=(torch.float16,), error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    q = torch.zeros(1, 2, 16, 32, dtype=torch.float16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused_attention.compiles_for(q, q, q, torch.zeros(()))
    assert fused_attention._UNCOMPILABLE == {}


def test_bad_tiles_are_refused_with_the_expected_form(monkeypatch):
    pytest.importorskip("cd_convert._triton_attention")
    from cd_convert._triton_attention import tiles_for

    for bad in ("64,64,4", "64,48,4,2;64,64,4,2", "64,64,3,2;64,64,4,2", "x"):
        monkeypatch.setenv(fused_attention.TILES_VARIABLE, bad)
        with pytest.raises(ValueError, match="M,N,WARPS,STAGES"):
            tiles_for(64, 2)
    monkeypatch.setenv(fused_attention.TILES_VARIABLE, "128,64,8,3;32,64,4,2")
    forward, backward, block_d = tiles_for(80, 2)
    assert (forward.block_m, forward.block_n, forward.warps, forward.stages, backward.block_m, block_d) == (
        128,
        64,
        8,
        3,
        32,
        128,
    )


@runs_kernels
@pytest.mark.parametrize("length,keys", [(41, 41), (30, 45)])
def test_causal_masking_is_top_left_aligned(length, keys):
    _compare((1, 2, length, keys, 16), causal=True)


@runs_kernels
def test_grouped_query_heads_share_keys_and_values():
    _compare((2, 4, 20, 33, 16), kv_heads=1)


@runs_kernels
def test_boolean_and_broadcast_additive_masks():
    torch.manual_seed(3)
    _compare((2, 3, 17, 23, 16), mask=torch.rand(2, 1, 17, 23) > 0.3)
    _compare((2, 3, 17, 23, 16), mask=torch.randn(1, 3, 1, 23))


@runs_kernels
def test_the_noise_kernel_draws_what_the_reference_philox_draws():
    from cd_convert._triton_attention import launch_attention_noise

    u = torch.empty(2, 3, 9, 22, device=DEVICE)
    launch_attention_noise(u, 1234567)
    assert torch.equal(u.double().cpu(), attention_uniform_reference(1234567, 2, 3, 9, 22))


@runs_kernels
def test_the_dropped_fraction_matches_p_and_each_call_draws_new_noise():
    torch.manual_seed(0)
    q = torch.zeros(1, 1, 64, 16, device=DEVICE)
    k = torch.zeros(1, 1, 1, 16, device=DEVICE)
    v = torch.ones(1, 1, 1, 16, device=DEVICE)
    p_logit = torch.tensor(math.log(0.3 / 0.7), device=DEVICE)
    outs = [fused_attention.fused_concrete_attention(q, k, v, p_logit, temperature=0.01, eps=EPS) for _ in range(8)]
    # One key, value 1: the output is keep / (1 - p), near 0 where dropped and 1/0.7 where kept (t = 0.01).
    kept = torch.cat([o[..., 0].flatten() for o in outs]) * 0.7
    assert abs(float((kept < 0.5).float().mean()) - 0.3) < 0.07  # 512 draws: 4 standard deviations
    assert not torch.equal(outs[0], outs[1])


@runs_kernels
def test_a_fully_masked_row_gives_zeros_and_finite_gradients():
    q = torch.randn(1, 1, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 5, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool, device=DEVICE)
    mask[2] = False
    p_logit = torch.tensor(-2.0, device=DEVICE, requires_grad=True)
    out = fused_attention.fused_concrete_attention(q, k, v, p_logit, attn_mask=mask, temperature=0.1, eps=EPS)
    out.sum().backward()
    assert torch.equal(out[0, 0, 2], torch.zeros(16, device=DEVICE))
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad, p_logit.grad))


@runs_kernels
def test_only_the_needed_gradients_and_no_double_backward():
    q = torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
    p_logit = torch.tensor(-1.0, device=DEVICE)  # a frozen rate
    out = fused_attention.fused_concrete_attention(q, k, v, p_logit, temperature=0.1, eps=EPS)
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert grad_q.shape == q.shape and p_logit.grad is None
    with pytest.raises(RuntimeError):
        grad_q.sum().backward()


def test_inputs_the_kernel_does_not_take_are_refused():
    ok = dict(interpret=True)
    q = torch.randn(2, 4, 8, 16)
    assert fused_attention.supports(q, q, q, **ok) == fused_attention.kernels_available()
    if not fused_attention.kernels_available():
        return
    assert not fused_attention.supports(q, q, q, interpret=False)  # CPU tensors, no interpreter
    wide = torch.randn(1, 1, 8, 320)
    assert not fused_attention.supports(wide, wide, wide, **ok)  # head width above 256
    assert not fused_attention.supports(q, q.half(), q, **ok)  # mixed dtypes
    assert not fused_attention.supports(q[0], q[0], q[0], **ok)  # 3-D
    three_kv = torch.randn(2, 3, 8, 16)
    assert not fused_attention.supports(q, three_kv, three_kv, enable_gqa=True, **ok)  # 3 does not divide 4
    two_kv = torch.randn(2, 2, 8, 16)
    assert not fused_attention.supports(q, two_kv, two_kv, **ok)  # fewer key heads without enable_gqa
    assert fused_attention.supports(q, two_kv, two_kv, enable_gqa=True, **ok)
    assert not fused_attention.supports(q, q, q, torch.zeros(8, 8, requires_grad=True), **ok)  # a learned bias
    assert not fused_attention.supports(q, q, q, torch.zeros(3, 8, 8), **ok)  # mask does not broadcast
    assert not fused_attention.supports(q.int(), q.int(), q.int(), **ok)


# ------------------------------------------------------------------------------ sites that use the kernel


def _converted_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    rates = dict(drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, **rates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(copy.deepcopy(base), dataset_size=1000)
    return base.to(DEVICE), converted.to(DEVICE)


@runs_kernels
def test_timm_attention_trains_through_the_kernel_and_equals_the_original_as_p_vanishes(kernel_calls):
    base, converted = _converted_vit()
    with torch.no_grad():
        for name, param in converted.named_parameters():
            if name.endswith("p_logit"):
                param.fill_(-30.0)  # p at its bound 1e-6: every mask keeps (nearly) everything
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    converted.train()
    out = converted(x)
    out.sum().backward()
    assert len(kernel_calls) == 2  # one per block
    base.eval()  # the original with dropout off
    expected = base(x)
    expected.sum().backward()
    # On a GPU the kernel's fp32 dots are TF32 (about 1e-3 relative) while the original's attention is full fp32.
    tol = 1e-4 if DEVICE == "cpu" else 2e-2
    params = dict(converted.named_parameters())
    pairs = [("output", out, expected)] + [(n, params[n].grad, p.grad) for n, p in base.named_parameters()]
    for name, got, want in pairs:
        assert float((got - want).norm()) <= tol * float(want.norm()) + 1e-7, name
    assert params["blocks.0.attn.attn_drop.p_logit"].grad is not None
    assert F.scaled_dot_product_attention is attention_routing._ORIGINAL_SDPA  # the routes were closed


@runs_kernels
def test_a_model_whose_attention_kernels_do_not_compile_trains_through_explicit_attention(kernel_calls, monkeypatch):
    monkeypatch.setattr(fused_attention, "compiles_for", lambda *args, **kwargs: False)
    _, converted = _converted_vit()
    converted.train()
    out = converted(torch.randn(2, 3, 32, 32, device=DEVICE))
    (out.sum() + cd_convert.regularization(converted)).backward()
    assert kernel_calls == []  # explicit attention with the site on the probabilities
    assert converted.get_parameter("blocks.0.attn.attn_drop.p_logit").grad is not None


@runs_kernels
def test_timm_attention_uses_the_kernel_for_relaxed_sampling_only(kernel_calls):
    _, converted = _converted_vit()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    converted.eval()
    converted(x)
    assert kernel_calls == []  # eval: the original fused attention, no dropout
    with cd_convert.mc_mode(converted, "hard"):
        converted(x)
    assert kernel_calls == []  # Bernoulli masks: the explicit path
    with cd_convert.mc_mode(converted, "relaxed"):
        converted(x)
    assert len(kernel_calls) == 2


class _FunctionalAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0, is_causal=True)
        return y.transpose(1, 2).reshape(x.shape)


@runs_kernels
def test_a_functional_attention_call_and_multihead_attention_use_the_kernel(kernel_calls):
    model = nn.Sequential(_FunctionalAttention(), nn.Linear(16, 4)).to(DEVICE)
    converted = cd_convert.convert(model, dataset_size=100)
    converted.train()
    converted(torch.randn(3, 10, 16, device=DEVICE)).sum().backward()
    assert len(kernel_calls) == 1
    assert next(p for n, p in converted.named_parameters() if n.endswith("p_logit")).grad is not None

    mha = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True).to(DEVICE)
    wrapped = cd_convert.convert(nn.Sequential(mha), dataset_size=100).train()
    x = torch.randn(3, 10, 16, device=DEVICE)
    wrapped[0](x, x, x, need_weights=False)[0].sum().backward()  # the SDPA path of torch's code
    assert len(kernel_calls) == 2


@runs_kernels
# StarCoder2's attention module also calls F.dropout on its output, a site routed by its code location.
@pytest.mark.parametrize(
    "family,attention_calls", [("bert", 2), ("gpt2", 2), ("llama", 2), ("bart", 6), ("starcoder2", 2)]
)
def test_transformers_attention_trains_through_the_kernel_in_sdpa_mode(family, attention_calls, kernel_calls):
    pytest.importorskip("transformers")
    from hf_zoo import HF_FAMILIES

    model, inputs, loss_fn = HF_FAMILIES[family]()
    assert model.config._attn_implementation == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(copy.deepcopy(model), dataset_size=100)
    model, converted = model.to(DEVICE), converted.to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        for name, param in converted.named_parameters():
            if name.endswith("p_logit"):
                param.fill_(-30.0)  # p at its bound: the masks keep (nearly) everything
    converted.train()
    loss = loss_fn(converted(**inputs))
    loss.backward()
    assert len(kernel_calls) == attention_calls  # every attention call, self and cross, went through the kernel
    assert converted.config._attn_implementation == "sdpa"  # restored after the forward
    assert F.scaled_dot_product_attention is attention_routing._ORIGINAL_SDPA
    model.eval()  # the original with dropout off
    expected = loss_fn(model(**inputs))
    expected.backward()
    tol = 1e-4 if DEVICE == "cpu" else 2e-2
    assert abs(float(loss) - float(expected)) <= tol * abs(float(expected))
    params = dict(converted.named_parameters())
    grads = [(n, params[n].grad, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    largest = max(float(want.norm()) for _, _, want in grads)
    for name, got, want in grads:  # key biases have (nearly) zero gradient: compare against the largest
        assert float((got - want).norm()) <= tol * max(float(want.norm()), 1e-3 * largest), name
    attention_logits = [n for n in params if n.endswith("p_logit") and "forward_dropout" in n]
    assert attention_logits and all(params[n].grad is not None for n in attention_logits)
    converted.eval()
    kernel_calls.clear()
    converted(**inputs)
    assert kernel_calls == []
    with cd_convert.mc_mode(converted, "hard"):  # Bernoulli masks: eager attention, as on the CPU
        converted(**inputs)
    assert kernel_calls == []
    with cd_convert.mc_mode(converted, "relaxed"):
        converted(**inputs)
    assert len(kernel_calls) == attention_calls


@runs_kernels
def test_a_transformers_model_set_to_eager_attention_stays_eager(kernel_calls):
    pytest.importorskip("transformers")
    from hf_zoo import HF_FAMILIES

    model, inputs, loss_fn = HF_FAMILIES["llama"]()
    model.config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cd_convert.convert(model, dataset_size=100).to(DEVICE).train()
    loss_fn(converted(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})).backward()
    assert kernel_calls == []


@runs_kernels
def test_a_route_opened_on_one_thread_is_closed_only_by_that_thread():
    # nn.DataParallel's replicas share their hooks across threads: each thread closes its own route.
    import threading

    from cd_convert.integrations.timm import FusedAttentionHook

    _, converted = _converted_vit()
    attention = converted.blocks[0].attn
    hook = next(h for h in attention._forward_pre_hooks.values() if isinstance(h, FusedAttentionHook))
    converted.train()
    hook(attention, (torch.randn(1, 5, 192, device=DEVICE),))
    assert F.scaled_dot_product_attention is not attention_routing._ORIGINAL_SDPA  # this thread's route is open
    other = threading.Thread(target=hook.end)
    other.start()
    other.join()
    assert F.scaled_dot_product_attention is not attention_routing._ORIGINAL_SDPA  # another thread's end: no effect
    hook.end()
    assert F.scaled_dot_product_attention is attention_routing._ORIGINAL_SDPA


@pytest.mark.skipif(not INTERPRETED, reason="the option runs under Triton's interpreter")
def test_coverage_benchmark_runs_a_family_through_the_interpreted_kernel(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from benchmarks import transformers_coverage

    # The option patches the module for the rest of the process: restore it after the test.
    monkeypatch.setattr(fused_attention._FusedConcreteAttention, "apply", fused_attention._FusedConcreteAttention.apply)
    out = tmp_path / "coverage.json"
    assert transformers_coverage.main(["--families", "llama", "--kernel-interpreted", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["attention_kernel_calls"] > 0 and record["families"][0]["result"] == "pass"


def test_the_interpreted_coverage_option_needs_the_interpreter(monkeypatch):
    from benchmarks import transformers_coverage

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        transformers_coverage.parse_args(["--kernel-interpreted"])
