"""The fused attention kernels' launch shapes: the ladder of shapes and the search for one that fits the GPU.

The search is plain Python around the launches, tested here with a launch that refuses shapes as a GPU with
too little shared memory does (Triton's ``OutOfResources``, raised before a kernel starts). Whether the
shapes fit real GPUs is checked by compiling for them in ``test_gpu_targets.py``; the values under a refused
shape in ``test_fused_attention.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from cd_convert import _attention_tiles  # noqa: E402
from cd_convert._attention_tiles import OutOfResources, Tiles, launch_in_fitting_shape, tile_ladder  # noqa: E402
from cd_convert.fused_attention import TILES_VARIABLE  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(TILES_VARIABLE, raising=False)
    _attention_tiles.forget_fitting_shapes()
    yield
    _attention_tiles.forget_fitting_shapes()


def _area(tiles: Tiles) -> int:
    return tiles.block_m * tiles.block_n


@pytest.mark.parametrize("head_dim,element_size", [(64, 2), (128, 2), (256, 2), (64, 4), (256, 4), (24, 4)])
def test_each_ladder_starts_at_the_default_and_only_gets_smaller(head_dim, element_size):
    forward, backward, block_d = tile_ladder(head_dim, element_size)
    default_forward, default_backward, default_block_d = _attention_tiles.tiles_for(head_dim, element_size)
    assert (forward[0], backward[0], block_d) == (default_forward, default_backward, default_block_d)
    for ladder in (forward, backward):
        assert len(set(ladder)) == len(ladder)
        assert ladder[-1] == Tiles(16, 16, 4, 1)  # the least tl.dot takes, no pipelining
        for bigger, smaller in zip(ladder, ladder[1:]):
            assert _area(smaller) <= _area(bigger) and smaller.stages == 1


def test_the_variable_fixes_the_shapes_with_no_search(monkeypatch):
    monkeypatch.setenv(TILES_VARIABLE, "32,16,4,1;16,32,2,1")
    forward, backward, _ = tile_ladder(64, 2)
    assert forward == (Tiles(32, 16, 4, 1),) and backward == (Tiles(16, 32, 2, 1),)


class _Gpu:
    """Launches whose tiles have at most ``max_area`` elements; larger ones are refused as Triton refuses them."""

    def __init__(self, max_area: int):
        self.max_area = max_area
        self.tried: list = []

    def launch(self, tiles: Tiles) -> str:
        self.tried.append(tiles)
        if _area(tiles) > self.max_area:
            raise OutOfResources(_area(tiles) * 100, self.max_area * 100, "shared memory")
        return f"ran {tiles}"


def test_the_first_shape_that_fits_runs_and_is_remembered_for_the_variant():
    ladder, _, _ = tile_ladder(128, 2)  # 64x64 (default stages), 64x64 one stage, 32x32, 16x16
    gpu = _Gpu(max_area=32 * 32)
    assert launch_in_fitting_shape("variant", ladder, gpu.launch, "test") == f"ran {Tiles(32, 32, 4, 1)}"
    assert gpu.tried == list(ladder[:3])
    gpu.tried.clear()
    launch_in_fitting_shape("variant", ladder, gpu.launch, "test")
    assert gpu.tried == [Tiles(32, 32, 4, 1)]  # no search the second time
    gpu.tried.clear()
    launch_in_fitting_shape("another variant", ladder, gpu.launch, "test")
    assert gpu.tried == list(ladder[:3])  # each variant searches once


def test_no_shape_fitting_is_an_error_that_says_what_to_do(monkeypatch):
    ladder, _, _ = tile_ladder(128, 2)
    with pytest.raises(RuntimeError, match="fused_attention=False") as raised:
        launch_in_fitting_shape("variant", ladder, _Gpu(max_area=8 * 8).launch, "the forward pass of x")
    message = str(raised.value)
    assert "the forward pass of x" in message and "16,16,4,1" in message and "shared memory" in message
    assert isinstance(raised.value.__cause__, OutOfResources)
    monkeypatch.setenv(TILES_VARIABLE, "64,64,4,2;64,64,4,2")
    ladder, _, _ = tile_ladder(128, 2)
    with pytest.raises(RuntimeError, match=f"unset {TILES_VARIABLE}"):
        launch_in_fitting_shape("variant 2", ladder, _Gpu(max_area=32 * 32).launch, "the forward pass of x")


def test_other_failures_are_not_taken_for_a_shape_too_large():
    ladder, _, _ = tile_ladder(64, 2)

    def broken(tiles: Tiles) -> None:
        raise ValueError("a bug in a launcher")

    with pytest.raises(ValueError, match="a bug in a launcher"):
        launch_in_fitting_shape("variant", ladder, broken, "test")
    assert _attention_tiles.fitting_index("variant") is None


@pytest.mark.parametrize(
    "capability,version,allowed",
    [
        ((9, 0), "3.0.0", False),  # Hopper with Triton 3.0-3.2: the compiler aborts on the 8-warp kernels
        ((9, 0), "3.1.0", False),
        ((9, 0), "3.2.0+git35c6c7c6", False),
        ((9, 0), "3.3.1", True),
        ((9, 0), "3.8.0", True),
        ((8, 0), "3.0.0", True),  # an A100 compiles them with every release
        (None, "3.0.0", True),  # CPU (interpreter) or AMD
    ],
)
def test_eight_warps_are_avoided_where_the_compiler_aborts_on_them(capability, version, allowed):
    assert _attention_tiles.eight_warps_compile(capability, version) is allowed
    forward, backward, _ = tile_ladder(128, 2, eight_warps=allowed)
    assert max(tiles.warps for tiles in forward + backward) == (8 if allowed else 4)


def test_the_launchers_apply_the_rule_for_their_device(monkeypatch):
    import torch

    from cd_convert import _triton_attention

    q = torch.zeros(1, 2, 16, 128, dtype=torch.float16)
    monkeypatch.setattr(_triton_attention, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(_triton_attention.triton, "__version__", "3.2.0")
    forward, backward, _ = _triton_attention._ladders(q)
    assert max(tiles.warps for tiles in forward + backward) == 4
    monkeypatch.setattr(_triton_attention.triton, "__version__", "3.3.1")
    forward, backward, _ = _triton_attention._ladders(q)
    assert forward[0].warps == backward[0].warps == 8


def test_a_variable_asking_for_eight_warps_where_the_compiler_aborts_is_refused(monkeypatch):
    monkeypatch.setenv(TILES_VARIABLE, "64,64,8,2;64,64,4,2")
    with pytest.raises(ValueError, match="at most 4 warps"):
        tile_ladder(128, 2, eight_warps=False)
    forward, _, _ = tile_ladder(128, 2, eight_warps=True)
    assert forward == (Tiles(64, 64, 8, 2),)
    monkeypatch.setenv(TILES_VARIABLE, "64,64,4,2;32,32,2,1")
    assert tile_ladder(128, 2, eight_warps=False)[1] == (Tiles(32, 32, 2, 1),)
