"""Fast smoke tests of benchmarks/overhead.py: the saved-tensor count at a small shape, and a --quick run."""
import json

import torch

from benchmarks import overhead


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
    rows = {v: overhead.block_memory(v, 4, 16, 256, "relu", device)["saved"] for v in ("none", "concrete_x", "concrete_y", "reference")}
    act = 4 * 256 * 4
    # In Linear -> ReLU -> site -> Linear a lean site adds its mask plus the new output y the next Linear keeps.
    assert rows["concrete_x"] - rows["none"] <= 2 * act + 64
    assert rows["concrete_y"] == rows["concrete_x"]
    assert rows["reference"] > rows["concrete_x"]


def test_quick_run_writes_json(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    old = torch.get_num_threads()
    try:
        overhead.main(["--quick", "--repeats", "2", "--json", str(path), "--img-size", "32", "--batch", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(old)
    out = json.loads(path.read_text())
    assert set(out) >= {"environment", "memory", "site_time", "train_step"}
    assert out["site_time"]["eager"]["dropout"]["ratio"] == 1.0
    assert out["train_step"]["sites"] > 0
    assert "Saved-activation memory" in capsys.readouterr().out


def test_cuda_absent_skips_cleanly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert overhead.main(["--device", "cuda"]) is None
    assert "CUDA is not available" in capsys.readouterr().out
