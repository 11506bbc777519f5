"""Packaging checks that need no wheel build: every subpackage is packaged, optional integrations are lazy.

The built wheel itself is checked by ``tests/smoke_installed.py`` (run by ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cd_convert

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "cd_convert"


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports cd_convert from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _source_packages() -> list:
    """Dotted names of the directories under cd_convert/ that hold .py files."""
    found = []
    for directory in [PACKAGE_DIR] + sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_dir()):
        if directory.name == "__pycache__" or not any(directory.glob("*.py")):
            continue
        found.append(".".join(directory.relative_to(ROOT).parts))
    return found


def test_every_source_directory_is_a_packaged_package():
    setuptools = pytest.importorskip("setuptools")
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")

    packages = _source_packages()
    assert "cd_convert.integrations" in packages
    missing_init = [name for name in packages if not (ROOT / name.replace(".", "/") / "__init__.py").is_file()]
    assert not missing_init, f"directories with .py files but no __init__.py: {missing_init}"
    found = set(setuptools.find_packages(where=str(ROOT), include=["cd_convert*"]))
    assert set(packages) <= found, sorted(set(packages) - found)
    # What the build will package, as setuptools reads pyproject.toml (a fixed `packages = [...]` list
    # would leave subpackages out of the wheel).
    config = pyprojecttoml.read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert set(packages) <= set(config["packages"]), sorted(set(packages) - set(config["packages"]))
    assert "py.typed" in config["package-data"]["cd_convert"]


def test_optional_integrations_are_lazy_attributes():
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    result = _python(
        "import json, sys, cd_convert\n"
        "eager = [m for m in ('timm', 'transformers', 'matplotlib', 'cd_convert.timm', 'cd_convert.plots') "
        "if m in sys.modules]\n"
        "listed = [n for n in ('timm', 'plots', 'integrations') if n in dir(cd_convert)]\n"
        "reached = [callable(cd_convert.timm.create_model), callable(cd_convert.plots.reliability_diagram),\n"
        "           cd_convert.integrations.__name__]\n"
        "print(json.dumps({'eager': eager, 'listed': listed, 'reached': reached}))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "eager": [],
        "listed": ["timm", "plots", "integrations"],
        "reached": [True, True, "cd_convert.integrations"],
    }


def test_missing_framework_error_names_the_extra():
    # None in sys.modules makes `import timm` / `import matplotlib` fail as if they were not installed.
    result = _python(
        "import json, sys\n"
        "sys.modules['timm'] = None\n"
        "sys.modules['matplotlib'] = None\n"
        "import cd_convert\n"
        "out = {'dir': [n for n in ('timm', 'plots') if n in dir(cd_convert)]}\n"
        "for attr in ('timm', 'plots'):\n"
        "    try:\n"
        "        getattr(cd_convert, attr)\n"
        "    except ImportError as err:\n"
        "        out[attr] = [type(err).__name__, err.name, str(err)]\n"
        "print(json.dumps(out))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["dir"] == []  # dir()-driven tools (help, inspect.getmembers) do not trip over them
    assert out["timm"][:2] == ["ImportError", "timm"]
    assert 'pip install "cd_convert[timm]"' in out["timm"][2]
    assert out["plots"][:2] == ["ImportError", "matplotlib"]
    assert 'pip install "cd_convert[bench]"' in out["plots"][2]


@pytest.mark.parametrize(
    "body, name",
    [
        ("from cd_convert._no_such_module import helper\n", "cd_convert._no_such_module"),
        ("from timm.layers import no_such_layer\n", "timm.layers"),  # timm is there: not a missing extra
        ("raise ImportError('broken on purpose')\n", None),
    ],
    ids=["own-module", "framework-api", "bare"],
)
def test_import_error_of_our_own_code_is_not_translated(tmp_path, monkeypatch, body, name):
    pytest.importorskip("timm")
    module = f"_cd_convert_broken_{abs(hash(body))}"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    # cd_convert.timm, served by a module that fails with an ImportError of its own.
    monkeypatch.setitem(cd_convert._LAZY_MODULES, "timm", (module, "timm", "timm"))
    monkeypatch.delitem(vars(cd_convert), "timm", raising=False)
    with pytest.raises(ImportError) as info:
        cd_convert.timm
    assert info.value.name == name
    assert "pip install" not in str(info.value)
    assert info.value.__cause__ is None
    assert module not in sys.modules


def test_convert_does_not_swallow_an_import_error_of_our_own_code():
    # Our timm integration failing to import is a bug to surface (at import or at conversion), not a
    # missing timm to tolerate by tracing without timm's lists.
    result = _python(
        "import sys\n"
        "sys.modules['cd_convert.integrations.timm'] = None\n"
        "try:\n"
        "    import cd_convert, torch\n"
        "    cd_convert.plan(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))\n"
        "except ImportError as err:\n"
        "    print(err.name)\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1:] == ["cd_convert.integrations.timm"], result.stdout
