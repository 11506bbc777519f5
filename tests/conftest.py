"""Shared fixtures."""

from __future__ import annotations

import pytest

from cd_convert import cpu_extension, fused_attention, host_scalars


@pytest.fixture(params=["host", "tensor"])
def eager_path(request, monkeypatch):
    """Each eager path in turn: the CPU's host-scalar functions (:mod:`cd_convert.host_scalars`), and the
    tensor formulas every other device uses (host scalars switched off). Returns ``"host"`` or ``"tensor"``."""
    monkeypatch.setattr(host_scalars, "ENABLED", request.param == "host")
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch):
    """The fused concrete-attention kernel's forward calls, as the shapes of their queries."""
    calls = []
    original = fused_attention._FusedConcreteAttention.apply

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(fused_attention._FusedConcreteAttention, "apply", counting)
    return calls


@pytest.fixture(params=["python", "cpp"])
def host_path(request):
    """The CPU's host path in Python, then its C++ build (:mod:`cd_convert.cpu_extension`, switched on for the test;
    skipped where it cannot be built). Returns ``"python"`` or ``"cpp"``."""
    if request.param == "cpp":
        request.getfixturevalue("built")
        cpu_extension.enable()
    yield request.param
    cpu_extension.disable()


@pytest.fixture(scope="module")
def built():
    """The C++ CPU extension (:mod:`cd_convert.cpu_extension`), built once per test module and switched off again
    after it; the test is skipped, with the build's error, where no C++ compiler or ninja is found."""
    try:
        module = cpu_extension.enable()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    cpu_extension.disable()
    yield module
    cpu_extension.disable()
