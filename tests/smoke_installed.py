"""Smoke test of an *installed* (non-editable) cd_convert wheel; run by .ci/run, not collected by pytest.

Run it from a directory outside the source tree, in an environment holding the wheel plus timm::

    cd "$(mktemp -d)" && python -I /path/to/checkout/tests/smoke_installed.py

(``-I`` keeps the script's own directory off ``sys.path``.) It exits non-zero on any failure.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[1]
# Third-party frameworks that some modules need and that are optional extras (triton: the fused kernels).
OPTIONAL_FRAMEWORKS = ("timm", "transformers", "matplotlib", "triton")
# A small timm model that torch.fx can trace only with timm's notrace lists (its LocalWindowAttention
# branches on tensor shapes and is a notrace leaf); it accepts a 32-pixel input, so a step takes a second.
TIMM_MODEL = "efficientvit_m0"


def check_lazy_attributes() -> None:
    import cd_convert

    eager = [m for m in ("timm", "transformers", "matplotlib") if m in sys.modules]
    assert not eager, f"import cd_convert imported optional frameworks eagerly: {eager}"
    assert "cd_convert.timm" not in sys.modules
    create_model = cd_convert.timm.create_model  # no `import cd_convert.timm`
    assert callable(create_model) and "cd_convert.timm" in sys.modules
    if importlib.util.find_spec("matplotlib") is None:
        try:
            cd_convert.plots
        except ImportError as err:
            assert 'pip install "cd_convert[bench]"' in str(err), str(err)
        else:
            raise AssertionError("cd_convert.plots without matplotlib should raise ImportError naming the extra")
    else:
        assert callable(cd_convert.plots.reliability_diagram)


def check_installed_files() -> None:
    import cd_convert

    location = Path(cd_convert.__file__).resolve()
    assert SOURCE_TREE not in location.parents, f"cd_convert imported from the source tree: {location}"
    files = {str(f).replace("\\", "/") for f in importlib.metadata.files("cd_convert") or ()}
    wanted_files = ("cd_convert/integrations/__init__.py", "cd_convert/integrations/timm.py", "cd_convert/py.typed")
    # The C++ source that cd_convert.cpu_extension.enable() compiles on the user's machine.
    for wanted in wanted_files + ("cd_convert/csrc/host_site.cpp",):
        assert wanted in files, f"{wanted} missing from the installed distribution"
    assert (location.parent / "integrations" / "timm.py").is_file()
    print(f"installed at {location.parent}")


def import_every_module() -> None:
    import cd_convert

    imported, skipped = [], []
    # A subpackage that fails to import is yielded first and imported below (skipped or raised there);
    # walk_packages' own failed import of it only stops the walk from descending into it.
    for info in pkgutil.walk_packages(cd_convert.__path__, prefix="cd_convert.", onerror=lambda name: None):
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            top = (err.name or "").partition(".")[0]
            if top in OPTIONAL_FRAMEWORKS and importlib.util.find_spec(top) is None:
                skipped.append(f"{info.name} (needs {top})")
                continue
            raise
        imported.append(info.name)
    assert "cd_convert.integrations.timm" in imported, imported
    print(f"imported {len(imported)} modules; skipped for a missing optional framework: {', '.join(skipped) or 'none'}")


def convert_and_train_timm_model() -> None:
    import timm
    import torch
    import torch.fx
    import torch.nn.functional as F

    import cd_convert
    from cd_convert.integrations.timm import notrace_for

    torch.manual_seed(0)
    model = timm.create_model(TIMM_MODEL, pretrained=False, drop_rate=0.1, num_classes=10, img_size=32)
    # torch.fx alone cannot trace this model; with timm's notrace lists (as cd_convert passes them) it can.
    try:
        torch.fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises several types
        plain = type(err).__name__
    else:
        raise AssertionError(f"{TIMM_MODEL} traces without timm's notrace lists: pick a model that needs them")
    leaves, wraps = notrace_for(model)
    assert leaves and wraps, "timm's notrace lists not found"

    class NotraceTracer(torch.fx.Tracer):
        def __init__(self) -> None:
            super().__init__(autowrap_functions=tuple(wraps))

        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, tuple(leaves)) or super().is_leaf_module(m, qualname)

    NotraceTracer().trace(model)

    model = cd_convert.convert(model, dataset_size=100)
    report = cd_convert.report(model)
    assert report.method == "fx", report
    rates = cd_convert.dropout_rates(model)
    assert rates, report

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(model(x), y) + cd_convert.regularization(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss.detach()), loss
    after = cd_convert.dropout_rates(model)
    assert after.keys() == rates.keys() and after != rates, (rates, after)
    print(
        f"{TIMM_MODEL}: torch.fx alone fails ({plain}), cd_convert found its sites by {report.method!r} with "
        f"timm's notrace lists; {len(rates)} site(s); one training step, loss {float(loss.detach()):.3f}"
    )


def main() -> int:
    check_lazy_attributes()  # first: the walk below imports every submodule
    check_installed_files()
    import_every_module()
    convert_and_train_timm_model()
    print("smoke test of the installed wheel: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
