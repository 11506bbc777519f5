"""The whole UCI table: the grid-quality criterion, the side-by-side cost ratio, the table and figure."""

from __future__ import annotations

import json

import pytest

from benchmarks import uci_report


def _versus(ll_diff: float, ll_se: float, rmse_diff: float, rmse_se: float) -> dict:
    return dict(ll_diff_mean=ll_diff, ll_published_se=ll_se, rmse_diff_mean=rmse_diff, rmse_published_se=rmse_se)


@pytest.mark.parametrize(
    "versus, want",
    [
        (_versus(-0.04, 0.04, 0.18, 0.18), (True, True)),  # exactly one standard error behind: reached
        (_versus(-0.0401, 0.04, 0.1801, 0.18), (False, False)),  # just past it
        (_versus(0.3, 0.01, -0.5, 0.05), (True, True)),  # better than the grid
        (_versus(-0.07, 0.043, 0.0, 0.181), (False, True)),  # LL behind by more than its se, RMSE level
    ],
)
def test_reaches_grid_is_one_published_standard_error(versus, want):
    assert uci_report.reaches_grid(versus) == want


def test_cost_ratio_uses_only_the_common_splits_of_one_run():
    grid = [dict(split=0, wall_s=100.0), dict(split=1, wall_s=300.0), dict(split=2, wall_s=1e6)]
    one_run = [dict(split=0, wall_s=10.0), dict(split=1, wall_s=30.0), dict(split=5, wall_s=1.0)]
    assert uci_report.cost_ratio(grid, one_run) == pytest.approx(400.0 / 40.0)
    assert uci_report.cost_ratio(grid, [dict(split=9, wall_s=1.0)]) is None
    # Records merged from two runs: only split 0 was timed in the same run as the grid.
    grid = [dict(split=0, wall_s=100.0, source="a"), dict(split=1, wall_s=300.0, source="a")]
    other = [dict(split=0, wall_s=20.0, source="a"), dict(split=1, wall_s=1.0, source="b")]
    assert uci_report.cost_ratio(grid, other) == pytest.approx(5.0)
    assert uci_report.cost_ratio(grid[1:], other) is None


def _details(tmp_path, name: str, split: int, **methods: tuple[float, float, float]) -> str:
    """A details file of one run: ``method=(ll, rmse, wall_s)`` on one split."""
    published = {"ll": [-1.0, -2.0], "rmse": [1.0, 2.0]}
    records = {
        method: [dict(split=split, ll=ll, rmse=rmse, train_runs=1, wall_s=wall, forward_passes=10)]
        for method, (ll, rmse, wall) in methods.items()
    }
    data = {name: {"records": records, "splits": 1, "val_grid": None, "published": published}}
    path = tmp_path / f"{name}_{'_'.join(methods)}_{split}.details.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_whole_table_and_figure_from_pieces(tmp_path):
    """Two runs of one data set (the grid beside concrete on split 0, concrete alone on split 1): one table,
    differences paired, the cost ratio from the run that timed both."""
    paths = [
        _details(tmp_path, "toy", 0, grid=(-1.0, 1.0, 30.0), concrete=(-0.5, 1.0, 2.0)),
        _details(tmp_path, "toy", 1, concrete=(-2.5, 3.0, 2.0)),
    ]
    out = uci_report.main([*paths, "--plot", str(tmp_path / "fig.png"), "--json", str(tmp_path / "s.json")])
    table = uci_report.whole_table(out)
    # Published over splits 0-1: LL -1.5 +- 0.354, RMSE 1.5 +- 0.354 (std 0.5 / sqrt 2). concrete: LL diffs
    # +0.5, -0.5 -> 0.000 +- 0.354 (reached); RMSE diffs 0, +1 -> 0.5 +- 0.354, more than 0.354 behind.
    assert "| toy | published grid (same splits) | 2 | 1.500 ± 0.354 | -1.500 ± 0.354 |" in table
    row = "| toy | concrete | 2 | 2.000 ± 0.707 | -1.500 ± 0.707 | 0.000 ± 0.354 | 0.500 ± 0.354 | yes / no |"
    assert row in table
    assert table.rstrip().endswith("| 2.0 | 15.0x |")  # grid 30 s against concrete's 2 s on split 0
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "s.json").read_text())["toy"]) == {"concrete", "grid"}


def test_a_method_the_report_has_no_style_for_is_reported_after_the_known_ones(tmp_path):
    """A method name the report does not know (a new variant of ``benchmarks.uci``) gets its row and its points
    in the figure, after the known methods, instead of being dropped."""
    path = _details(tmp_path, "toy", 0, concrete=(-0.5, 1.0, 2.0), zz_new_variant=(-0.75, 1.5, 3.0))
    out = uci_report.main([path, "--plot", str(tmp_path / "fig.png")])
    lines = uci_report.whole_table(out).splitlines()
    names = [line.split("|")[2].strip() for line in lines if line.startswith("| toy |")]
    assert names == ["published grid (same splits)", "concrete", "zz_new_variant"]
    assert "| toy | zz_new_variant | 1 | 1.500 ± 0.000 | -0.750 ± 0.000 | 0.250 ± 0.000 |" in "\n".join(lines)
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_base_summaries_join_the_figure_and_the_written_summaries(tmp_path):
    """``--base``: an earlier report's summaries stay, a method run again replaces its own, a new method and a
    new data set join; the table lists only the details given."""
    base = {
        "toy": {"grid": {"ll_mean": -9.0}, "concrete": {"ll_mean": -9.0}},
        "old": {"concrete": {"ll_mean": -3.0}},
    }
    (tmp_path / "base.json").write_text(json.dumps(base))
    paths = [
        _details(tmp_path, "toy", 0, concrete=(-0.5, 1.0, 2.0), newer=(-0.25, 1.0, 2.0)),
        _details(tmp_path, "fresh", 0, newer=(-1.0, 1.0, 2.0)),
    ]
    out = uci_report.main(
        [
            *paths,
            "--base",
            str(tmp_path / "base.json"),
            "--json",
            str(tmp_path / "s.json"),
            "--plot",
            str(tmp_path / "f.png"),
        ]
    )
    written = json.loads((tmp_path / "s.json").read_text())
    assert list(written) == ["toy", "old", "fresh"]
    assert written["toy"]["grid"] == {"ll_mean": -9.0} and written["old"] == base["old"]
    assert written["toy"]["concrete"]["ll_mean"] == -0.5 and written["toy"]["newer"]["ll_mean"] == -0.25
    assert "| old |" not in uci_report.whole_table(out) and "| fresh | newer |" in uci_report.whole_table(out)
    assert (tmp_path / "f.png").stat().st_size > 0
