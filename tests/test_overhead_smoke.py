"""Fast smoke tests of benchmarks/overhead.py: the saved-tensor count at a small shape, the timing harness on
functions of known cost, and a --quick run."""

import json
import math
import statistics
import time

import pytest
import torch

from benchmarks import overhead
from cd_convert.layers import ConcreteDropoutBase


def test_lean_site_saves_less_than_reference():
    shape = (4, 256)
    act = 4 * 256 * 4
    lean = overhead.site_alone_memory("concrete_y", shape, torch.device("cpu"))
    lean_x = overhead.site_alone_memory("concrete_x", shape, torch.device("cpu"))
    ref = overhead.site_alone_memory("reference", shape, torch.device("cpu"))
    # save_output=True keeps y (shared with the next layer) and one mask-sized tensor of its own, never x.
    assert lean["shared_y"] == act and lean["shared_x"] == 0
    assert lean_x["shared_x"] == act and lean_x["shared_y"] == 0
    assert lean["own"] < ref["own"]
    assert lean["own"] <= act + 64  # the mask (plus a scalar)
    assert ref["own"] >= 2 * act


def test_block_memory_shares_neighbours():
    device = torch.device("cpu")
    rows = {
        v: overhead.block_memory(v, 4, 16, 256, "relu", device)["saved"]
        for v in ("none", "concrete_x", "concrete_y", "reference")
    }
    act = 4 * 256 * 4
    # In Linear -> ReLU -> site -> Linear a lean site adds its mask plus the new output y the next Linear keeps.
    assert rows["concrete_x"] - rows["none"] <= 2 * act + 64
    assert rows["concrete_y"] == rows["concrete_x"]
    assert rows["reference"] > rows["concrete_x"]


def test_quick_run_writes_json(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    old = torch.get_num_threads()
    try:
        overhead.main(
            ["--quick", "--repeats", "2", "--json", str(path), "--img-size", "32", "--batch", "2", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(old)
    out = json.loads(path.read_text())
    assert set(out) >= {"environment", "memory", "site_time", "train_step"}
    assert set(out["site_time"]["eager"]) == set(overhead.SITE_VARIANTS)
    for row in out["site_time"]["eager"].values():
        assert row["repeats"] == 2 and row["median_ms"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    step = out["train_step"]
    assert step["sites"] > 0
    for table in ("time_vs_fused", "time_vs_explicit"):
        ratio = step[table]["concrete"]["ratio"]
        assert math.isfinite(ratio) and ratio > 0
    assert "Saved-activation memory" in capsys.readouterr().out


def test_interleaved_times_measure_each_function_under_its_own_name():
    calls = {"fast": 0, "slow": 0}

    def work(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)

        return fn

    fns = {"fast": work("fast", 0.001), "slow": work("slow", 0.01)}
    times = overhead.interleaved_times(fns, repeats=4, inner=2, warmup=1, device=torch.device("cpu"))
    assert calls == {"fast": 1 + 4 * 2, "slow": 1 + 4 * 2}
    assert [len(times[name]) for name in ("fast", "slow")] == [4, 4]
    # sleep() never returns early; scheduling delays on a loaded machine are far below the tenfold gap.
    assert min(times["slow"]) >= 0.01
    assert statistics.median(times["slow"]) > 2 * statistics.median(times["fast"])


def test_summarize_ratios_by_hand():
    res = overhead.summarize({"base": [1.0, 2.0, 3.0], "other": [2.0, 6.0, 6.0]}, "base")
    assert res["other"]["median_ms"] == 6000.0 and res["other"]["repeats"] == 3
    assert res["other"]["ratio"] == 3.0  # median 6 over median 2
    assert res["other"]["paired_ratio_median"] == 2.0  # median of 2/1, 6/2, 6/3
    assert res["base"]["ratio"] == 1.0


def test_step_section_times_the_converted_model_as_concrete(monkeypatch):
    pytest.importorskip("timm")

    def fake_step(model, x, target, converted):
        # A step costs 1 ms without sites and 8 ms with them: the ratios show which model each row timed.
        has_sites = any(isinstance(m, ConcreteDropoutBase) for m in model.modules())
        assert converted == has_sites  # the regulariser is added for the converted model only
        return lambda: time.sleep(0.008 if has_sites else 0.001)

    monkeypatch.setattr(overhead, "train_step_fn", fake_step)
    res = overhead.step_section(img_size=32, batch=2, device=torch.device("cpu"), repeats=3, inner=1, depth=1)
    assert res["sites"] > 0
    assert res["time_vs_fused"]["concrete"]["ratio"] > 2
    assert res["time_vs_explicit"]["concrete"]["ratio"] > 2
    assert res["time_vs_fused"]["dropout_explicit"]["ratio"] < 2


def test_cuda_absent_skips_cleanly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert overhead.main(["--device", "cuda"]) is None
    assert "CUDA is not available" in capsys.readouterr().out
