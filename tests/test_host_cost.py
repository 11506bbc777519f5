"""benchmarks/host_cost.py: a short CPU run of the per-call ladder (the GPU stages need CUDA)."""

import json

from benchmarks import host_cost


def test_a_short_cpu_run_times_every_cpu_rung_and_writes_json(tmp_path):
    out = tmp_path / "host.json"
    result = host_cost.main(["--device", "cpu", "--calls", "3", "--repeats", "2", "--json", str(out)])
    ladder = result["per_call tiny (32, 50) fp32"]
    # The CPU rungs (no Triton launch, no attention kernel, no ViT step: those need CUDA).
    assert set(ladder) == {
        "x * 2",
        "nn.Dropout forward",
        "nn.Dropout forward + backward",
        "seed draw (fused.draw_seed)",
        "ConcreteDropout forward + backward",
    }
    assert all(value > 0 for value in ladder.values())
    assert json.loads(out.read_text())["per_call tiny (32, 50) fp32"] == ladder
