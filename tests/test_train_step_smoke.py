"""Fast checks of benchmarks/train_step.py: the per-step op count sees the sites, the regulariser and the extra
optimizer work, and a short run prints every section and writes its JSON."""

import json

import torch

from benchmarks import train_step


def test_step_op_counts_see_sites_regulariser_and_optimizer():
    counts = train_step.step_op_counts(torch.device("cpu"))
    dropout, concrete = counts["dropout"], counts["concrete"]
    # nn.Dropout draws a Bernoulli mask; a concrete site draws uniform noise and takes its logit (one per site).
    assert dropout.get("bernoulli_", 0) == 2 and "logit" not in dropout
    assert concrete.get("logit") == 2 and "bernoulli_" not in concrete
    # The regulariser's squared norms of the two consumer weights: one fused call.
    assert concrete.get("_foreach_norm") == 1 and "_foreach_norm" not in dropout
    # Adam's single-tensor loop runs one sqrt per parameter: 4 in both networks, plus the 2 p-logits.
    assert dropout["sqrt"] == 4 and concrete["sqrt"] == 6
    assert sum(concrete.values()) > sum(dropout.values())


def test_short_run_prints_every_section_and_writes_json(tmp_path, capsys):
    path = tmp_path / "train_step.json"
    old = torch.get_num_threads()
    try:
        out = train_step.main(["--repeats", "2", "--json", str(path)])
    finally:
        torch.set_num_threads(old)
    text = capsys.readouterr().out
    for heading in ("### 1. UCI network epoch", "### 2. One site", "### 3. `regularization()`"):
        assert heading in text
    assert "aten ops per eager training step" in text
    saved = json.loads(path.read_text())
    assert set(saved) >= {"epoch", "site", "regularizer", "step_ops"}
    assert set(saved["epoch"]) == {"dropout", "concrete", "concrete_noreg"}  # no compiled rows without --compile
    assert saved["epoch"]["dropout"]["ratio"] == 1.0
    assert out["step_ops"] == saved["step_ops"]
