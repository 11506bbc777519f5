"""benchmarks/model_step.py and benchmarks/kernel_breakdown.py: the categories of profiler names, the scoping of
ops inside the optimizer's and cd_convert's ranges, the CUDA kernel grouping (on a stand-in profile), and a
short CPU run of the benchmark."""

import json
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks import kernel_breakdown, model_step
from benchmarks.kernel_breakdown import category_of, scope_of


@pytest.mark.parametrize(
    "name, category",
    [
        ("aten::bmm", "matmul / conv"),
        ("aten::mm", "matmul / conv"),
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn", "matmul / conv"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul / conv"),
        ("_forward", "concrete sites"),  # cd_convert's Triton kernels
        ("_finish", "concrete sites"),
        ("autograd::engine::evaluate_function: HostConcreteDropoutBackward", "concrete sites"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "fused attention"),
        ("aten::_scaled_dot_product_efficient_attention", "fused attention"),
        ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copy / cast"),
        ("aten::_to_copy", "copy / cast"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("aten::_foreach_norm", "regulariser"),
        ("aten::native_layer_norm", "normalization"),
        ("aten::bernoulli_", "dropout / random"),
        ("aten::_softmax", "softmax"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "elementwise"),
        ("aten::view", "other"),
    ],
)
def test_category_of_known_names(name, category):
    assert category_of(name) == category


def _event(name, parent=None, device_type=DeviceType.CPU, kernels=(), self_cpu=0.0):
    return SimpleNamespace(
        name=name,
        key=name,
        cpu_parent=parent,
        device_type=device_type,
        kernels=list(kernels),
        self_cpu_time_total=self_cpu,
    )


def test_scope_wins_over_the_op_name():
    step = _event("Optimizer.step#AdamW.step")
    sqrt = _event("aten::sqrt", parent=_event("aten::something", parent=step))
    assert scope_of(sqrt) == "optimizer"  # Adam's per-parameter sqrt is the optimizer's, not elementwise
    backward = _event("autograd::engine::evaluate_function: HostConcreteDropoutBackward")
    assert scope_of(_event("aten::mul", parent=backward)) == "concrete sites"
    assert scope_of(_event("aten::mul", parent=_event("aten::linear"))) is None


Kernel = namedtuple("Kernel", ["name", "device", "duration"])


class _FakeProfile:
    """Stand-in for a CUDA profile: CPU events with linked kernels, and the device events' averages."""

    def __init__(self, events, device_averages):
        self._events, self._averages = events, device_averages

    def events(self):
        return self._events

    def key_averages(self):
        return self._averages


def _device_average(name, us):
    return SimpleNamespace(key=name, device_type=DeviceType.CUDA, self_device_time_total=us)


def test_kernel_times_follow_the_launching_scope_and_keep_unlinked_time():
    site = _event("_FusedConcreteDropout")
    adam = _event("Optimizer.step#AdamW.step")
    events = [
        site,
        _event("aten::empty_like", parent=site, kernels=[Kernel("_forward", 0, 30.0)]),
        _event("aten::_foreach_add_", parent=adam, kernels=[Kernel("multi_tensor_apply_kernel", 0, 20.0)]),
        _event("aten::bmm", kernels=[Kernel("ampere_sgemm_64x64_nn", 0, 40.0)]),
    ]
    averages = [_device_average("_forward", 30.0), _device_average("x", 20.0), _device_average("y", 60.0)]
    table = kernel_breakdown._kernel_times(_FakeProfile(events, averages))
    # 110 us of kernels, 90 linked to an op: the 20 others are reported as such, not dropped.
    assert table == {
        "concrete sites": 30.0,
        "optimizer": 20.0,
        "matmul / conv": 40.0,
        "kernels not linked to an op": 20.0,
    }


def test_kernel_times_fall_back_to_kernel_names_when_nothing_is_linked():
    averages = [_device_average("_backward", 5.0), _device_average("flash_bwd_kernel", 7.0)]
    table = kernel_breakdown._kernel_times(_FakeProfile([_event("aten::mul")], averages))
    assert table == {"concrete sites": 5.0, "fused attention": 7.0}


def test_cpu_breakdown_sees_the_sites_and_regulariser_only_in_the_converted_model():
    models = model_step.build_variants(model_step.CASES["vit_tiny"], 32, torch.device("cpu"))
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    steps = {
        name: model_step.TrainStep(model, x, target, name == "converted", "fp32", compiled=False)
        for name, model in models.items()
    }
    for step in steps.values():
        step()
    rows = kernel_breakdown.breakdown(steps, 1, torch.device("cpu"))
    assert rows["converted"]["concrete sites"] > 0 and rows["converted"]["regulariser"] > 0
    for name in ("unconverted", "explicit"):
        assert "concrete sites" not in rows[name] and "regulariser" not in rows[name]
    # timm's fused attention only in the unconverted model; the others take the explicit path in training.
    assert rows["unconverted"]["fused attention"] > 0
    assert "fused attention" not in rows["explicit"] and "fused attention" not in rows["converted"]
    for row in rows.values():
        parts = sum(v for k, v in row.items() if k != "total")
        assert row["total"] == pytest.approx(parts) and row["optimizer"] > 0


def test_short_cpu_run_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "model_step.json"
    old = torch.get_num_threads()
    try:
        model_step.main(
            [
                "--models",
                "vit_tiny,resnet50",
                "--batches",
                "2",
                "--img-size",
                "32",
                "--repeats",
                "2",
                "--profile-steps",
                "1",
                "--uci-repeats",
                "1",
                "--threads",
                "1",
                "--json",
                str(path),
            ]
        )
    finally:
        torch.set_num_threads(old)
    text = capsys.readouterr().out
    saved = json.loads(path.read_text())
    vit, resnet = saved["models"]["vit_tiny b2"], saved["models"]["resnet50 b2"]
    # ViT-tiny's 50 sites: 12 blocks x 4 dropouts, the position and head dropout; resnet50's one head dropout.
    assert vit["sites"] == 50 and resnet["sites"] == 1
    assert set(vit["fp32"]["eager"]) == {"unconverted", "explicit", "converted"}
    assert set(resnet["fp32"]["eager"]) == {"unconverted", "converted"}
    assert vit["fp32"]["eager"]["unconverted"]["ratio"] == 1.0
    # A converted ViT keeps a mask per site for the backward pass: more saved bytes than the unconverted model.
    assert vit["fp32"]["memory"]["converted"]["saved"] > vit["fp32"]["memory"]["unconverted"]["saved"]
    assert "compiled" not in vit["fp32"] and "bf16" not in vit  # the CPU defaults: eager, fp32
    assert "uci_epoch" in saved and "UCI network epoch" in text
    assert "| vit_tiny b2 | 50 | fp32 |" in text


def test_unknown_precision_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        model_step.main(["--precisions", "fp16", "--models", "resnet50"])


def test_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(SystemExit, match=r"unknown model\(s\) \['vit_huge'\]: choose from vit_tiny, vit_base"):
        model_step.main(["--models", "vit_tiny,vit_huge"])
