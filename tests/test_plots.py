"""Tests for cd_convert.plots: the figures are written as PNG files, and rotated() rotates correctly."""
from __future__ import annotations

import sys

import pytest
import torch

from cd_convert.history import RateLogger
from cd_convert.layers import ConcreteDropout
from cd_convert.plots import rates_over_training, reliability_diagram, rotated, uncertainty_vs_shift

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_reliability_diagram_writes_png(tmp_path) -> None:
    from matplotlib.figure import Figure

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(200, 4) * 2, dim=-1)
    target = torch.randint(0, 4, (200,))
    path = tmp_path / "reliability.png"
    fig = reliability_diagram(probs, target, n_bins=10, path=path)
    assert isinstance(fig, Figure)
    assert is_png(path)
    assert "ECE" in fig.axes[0].get_title()
    # Without a path nothing is written, the figure is still returned.
    assert isinstance(reliability_diagram(probs, target), Figure)


def test_rates_over_training_from_logger_records_and_table(tmp_path) -> None:
    model = torch.nn.Sequential(ConcreteDropout(0.1), torch.nn.Linear(3, 3), ConcreteDropout(0.2))
    logger = RateLogger(model)
    for epoch in range(4):
        with torch.no_grad():
            model[2].p_logit.add_(0.1)
        logger.log(epoch=epoch)
    for name, history in (("logger", logger), ("records", logger.history), ("table", logger.as_table())):
        path = tmp_path / f"rates_{name}.png"
        fig = rates_over_training(history, path=path)
        assert is_png(path)
        lines = fig.axes[0].get_lines()
        assert len(lines) == 2
        assert list(lines[1].get_ydata()) == pytest.approx(logger.as_table()["2"])
    with pytest.raises(ValueError, match="no dropout rates"):
        rates_over_training([])
    with pytest.raises(TypeError, match="RateLogger"):
        rates_over_training([{"epoch": 0}])


def test_uncertainty_vs_shift_lines_and_sample_clouds(tmp_path) -> None:
    shifts = list(range(0, 181, 20))
    entropy = torch.linspace(0.1, 2.0, len(shifts))
    class_prob_samples = torch.rand(len(shifts), 30)  # (shifts, T) cloud per shift
    path = tmp_path / "shift.png"
    fig = uncertainty_vs_shift(
        shifts, {"entropy": entropy, "MI": [0.05] * len(shifts), "p(class 1)": class_prob_samples},
        ylabel="nats / probability", title="rotated digit", path=path,
    )
    assert is_png(path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "rotation (degrees)"
    assert len(ax.get_lines()) == 3
    assert list(ax.get_lines()[2].get_ydata()) == pytest.approx(class_prob_samples.double().mean(1).tolist())
    with pytest.raises(ValueError, match="match shifts"):
        uncertainty_vs_shift(shifts, {"bad": [1.0, 2.0]})


def test_missing_matplotlib_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"cd_convert\[bench\]"):
        uncertainty_vs_shift([0, 1], {"a": [0.0, 1.0]})


def test_rotated_matches_rot90_and_flips() -> None:
    torch.manual_seed(0)
    square = torch.rand(2, 3, 7, 7)
    torch.testing.assert_close(rotated(square, 90), torch.rot90(square, 1, dims=(-2, -1)))
    torch.testing.assert_close(rotated(square, -90), torch.rot90(square, -1, dims=(-2, -1)))
    torch.testing.assert_close(rotated(square, 0), square)
    wide = torch.rand(2, 1, 6, 10)
    torch.testing.assert_close(rotated(wide, 180), torch.flip(wide, dims=(-2, -1)))
    # One angle per image.
    both = rotated(square, [90.0, 0.0])
    torch.testing.assert_close(both[0], torch.rot90(square[0], 1, dims=(-2, -1)))
    torch.testing.assert_close(both[1], square[1])


def test_rotated_shapes_dtypes_and_errors() -> None:
    image = torch.rand(28, 28)
    out = rotated(image, 45.0)
    assert out.shape == image.shape and out.dtype == image.dtype
    # Rotation about the centre keeps the centre pixel.
    assert rotated(image, 30)[14, 14] != 0
    assert rotated(torch.rand(1, 28, 28, dtype=torch.float64), 10).dtype == torch.float64
    with pytest.raises(TypeError, match="floating-point"):
        rotated(torch.zeros(28, 28, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="one per image"):
        rotated(torch.rand(3, 1, 8, 8), [1.0, 2.0])
    with pytest.raises(ValueError, match="images"):
        rotated(torch.rand(8), 1.0)
