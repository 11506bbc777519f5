"""The torchvision coverage benchmark end to end on two small models: every check runs and passes."""

import json

import pytest

pytest.importorskip("torchvision")

from benchmarks import torchvision_coverage  # noqa: E402


def test_two_models_pass_every_check(tmp_path, capsys):
    out = tmp_path / "tv.json"
    assert (
        torchvision_coverage.main(["--models", "squeezenet1_1,mobilenet_v3_small", "--no-variants", "--json", str(out)])
        == 0
    )
    records = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(records) == {"squeezenet1_1", "mobilenet_v3_small"}
    for name, record in records.items():
        assert record["result"] == "pass", (name, record)
        assert sum(record["sites_by_kind"].values()) >= 1, (name, record)
    assert "squeezenet1_1" in capsys.readouterr().out  # the table
