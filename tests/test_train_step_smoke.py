"""Fast checks of benchmarks/train_step.py: the per-step op count sees the sites, the regulariser and the extra
optimizer work, and a short run prints every section and writes its JSON."""

import json

import pytest
import torch

from benchmarks import train_step


def test_step_op_counts_see_sites_regulariser_and_optimizer():
    counts = train_step.step_op_counts(torch.device("cpu"))
    dropout, concrete, tensor = counts["dropout"], counts["concrete"], counts["concrete_tensor"]
    # nn.Dropout draws a Bernoulli mask; a concrete site draws uniform noise and takes its logit (one per site):
    # in place on the noise on the CPU's host path, into a new tensor on the tensor path.
    assert dropout.get("bernoulli_", 0) == 2 and "logit" not in dropout and "logit_" not in dropout
    assert concrete.get("logit_") == 2 and "bernoulli_" not in concrete
    assert tensor.get("logit") == 2 and "logit_" not in tensor
    # The regulariser's squared norms of the two consumer weights: one fused call on either path.
    assert concrete.get("_foreach_norm") == tensor.get("_foreach_norm") == 1 and "_foreach_norm" not in dropout
    # The host paths clamp the logits in Python (the sites' and the regulariser's); the tensor path clamps in
    # each site and once in the regulariser.
    assert "clamp" not in concrete and tensor.get("clamp") == 3
    # Adam's single-tensor loop runs one sqrt per parameter: 4 in both networks, plus the 2 p-logits; the
    # multi-tensor one a single _foreach_sqrt for all of them.
    assert dropout["sqrt"] == 4 and concrete["sqrt"] == tensor["sqrt"] == 6
    assert counts["dropout_foreach"].get("_foreach_sqrt") == counts["concrete_foreach"].get("_foreach_sqrt") == 1
    assert "sqrt" not in counts["concrete_foreach"]
    assert sum(tensor.values()) > sum(concrete.values()) > sum(dropout.values())


def test_step_op_counts_on_the_cpp_path(built, monkeypatch):
    """The C++ path's step: fused site-and-Linear nodes and the regulariser's deliveries, counted as the
    benchmark prints them with --cpu-extension."""
    monkeypatch.setattr(train_step, "WITH_EXTENSION", True)
    counts = train_step.step_op_counts(torch.device("cpu"))
    cpp, python = counts["concrete_cpp"], counts["concrete"]
    # Forward: one addmm per fused node; backward: each weight's gradient with the regulariser's term delivered,
    # addmm(W, g^T, x m, beta=s), and one mm per node for dL/d(x m). No reshapes of the 2-D inputs.
    assert cpp.get("addmm") == 4 and cpp.get("mm") == 2 and "view" not in cpp
    # The regulariser: no norm op (a loop), no gradient tensors (delivered), and the engine sums nothing;
    # the one add is the loss plus the regulariser.
    assert not {"_foreach_norm", "_foreach_mul", "unbind", "mul", "logit_"} & set(cpp)
    assert cpp.get("add") == 1
    # Reads of a number: Adam's one per parameter (its step count) alone; the C++ code reads its numbers (the
    # logits, the regulariser's incoming gradient) from memory.
    assert cpp["_local_scalar_dense"] == cpp["sqrt"] == 6
    assert sum(cpp.values()) < sum(python.values())


def test_short_run_prints_every_section_and_writes_json(tmp_path, capsys):
    path = tmp_path / "train_step.json"
    old = torch.get_num_threads()
    try:
        out = train_step.main(["--repeats", "2", "--json", str(path)])
    finally:
        torch.set_num_threads(old)
    text = capsys.readouterr().out
    for heading in (
        "### 1. UCI network epoch",
        "### 1b. The UCI protocol's training epoch",
        "### 2. One site",
        "### 2b. One site forward without",
        "### 3. `regularization()`",
    ):
        assert heading in text
    assert "aten ops per eager training step" in text
    saved = json.loads(path.read_text())
    assert set(saved) >= {"epoch", "protocol", "site", "site_no_grad", "regularizer", "step_ops"}
    assert set(saved["protocol"]) == {"grid", "concrete", "concrete_held", "concrete_tensor"}
    assert saved["protocol"]["grid"]["ratio"] == 1.0
    # Section 3: each site count on both regulariser paths, paired.
    assert set(saved["regularizer"]) == {f"{n} sites" for n in train_step.REGULARIZER_SITES}
    assert all(row["paired_vs_tensor_path"] > 0 for row in saved["regularizer"].values())
    assert set(saved["site_no_grad"]["32x50"]) == {"dropout", "concrete", "concrete_tensor"}
    # The tensor-path row on the CPU and both networks with the multi-tensor Adam; no compiled rows without
    # --compile.
    epoch = saved["epoch"]
    assert set(epoch) == {
        "dropout",
        "concrete",
        "concrete_noreg",
        "concrete_tensor",
        "dropout_foreach",
        "concrete_foreach",
    }
    assert epoch["dropout"]["ratio"] == 1.0
    own = epoch["concrete_foreach"]["median_ms"] / epoch["dropout_foreach"]["median_ms"]
    # The benchmark divides the medians in seconds, this in milliseconds: equal up to rounding in the last bit.
    assert epoch["concrete_foreach"]["own_ratio"] == pytest.approx(own, rel=1e-12)
    assert "Adam(foreach=True) / " in text
    assert out["step_ops"] == saved["step_ops"]
