"""tools/ab_speed.py: another revision's package is really a second import, and a short comparison runs."""

import shutil
import subprocess
import tempfile

import pytest

import cd_convert

ab_speed = pytest.importorskip("tools.ab_speed")


def _in_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "-C", str(ab_speed.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(not _in_git_checkout(), reason="needs the git checkout this file belongs to")


def test_the_base_revision_is_a_separate_package():
    dest = tempfile.mkdtemp(prefix="cd_ab_test_")
    try:
        base = ab_speed.import_revision("HEAD", dest)
        assert base.__name__.startswith("cd_convert_") and base.__file__.startswith(dest)
        assert base.ConcreteDropout is not cd_convert.ConcreteDropout
        assert base.layers.concrete_dropout is not cd_convert.layers.concrete_dropout
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_short_comparison_reports_paired_ratios(capsys):
    out = ab_speed.main(["--rev", "HEAD", "--site-repeats", "3", "--epoch-repeats", "1", "--shape", "8x16"])
    assert set(out) == {"site", "epoch", "protocol", "protocol_held"}
    for ratios in out.values():
        assert set(ratios) == {"tree_vs_base", "tree_vs_dropout", "base_vs_dropout"}
        assert all(r > 0 for r in ratios.values())
    assert "working tree / base" in capsys.readouterr().out


def test_the_base_revisions_cpp_path_is_built_under_a_name_of_its_own(monkeypatch):
    # Two builds of one module name cannot be loaded into one process: the base's must get another name.
    from pathlib import Path

    from torch.utils import cpp_extension

    dest = tempfile.mkdtemp(prefix="cd_ab_test_")
    try:
        base = ab_speed.import_revision("HEAD", dest)
        calls = []
        monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "the base's build")
        assert ab_speed.build_extension(base) == "the base's build"
        (call,) = calls
        assert call["name"].startswith(base.__name__ + "_host_site_")
        assert call["sources"] == [str(Path(base.__file__).resolve().parent / "csrc" / "host_site.cpp")]
        assert base.cpu_extension._BUILT == "the base's build" and cd_convert.cpu_extension._BUILT != "the base's build"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_a_revision_without_the_cpp_path_is_refused_with_what_to_drop(tmp_path):
    import types

    package = types.ModuleType("cd_convert_old")
    (tmp_path / "cd_convert_old").mkdir()
    package.__file__ = str(tmp_path / "cd_convert_old" / "__init__.py")
    with pytest.raises(SystemExit, match="has no C\\+\\+ CPU path .*drop --cpu-extension"):
        ab_speed.build_extension(package)
