"""benchmarks/recompute_memory.py: its memory figure on a network whose saved tensors are known by hand."""

import pytest
import torch
import torch.nn as nn

from benchmarks import recompute_memory


def test_held_after_forward_is_what_autograd_keeps_plus_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).train()
    x = torch.randn(64, 256)
    activation = 64 * 256 * 4
    # The ReLU's output (kept by the ReLU and the second Linear) and the model's output; the first Linear's
    # output is freed (ReLU keeps its result, not its input).
    assert recompute_memory.held_after_forward(model, x) == 2 * activation
    assert all(p.grad is None for p in model.parameters())  # the backward ran and the gradients were cleared


def test_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        recompute_memory.main(["--device", "cpu"])
