"""Shared fixtures."""

from __future__ import annotations

import pytest

from cd_convert import host_scalars


@pytest.fixture(params=["host", "tensor"])
def eager_path(request, monkeypatch):
    """Each eager path in turn: the CPU's host-scalar functions (:mod:`cd_convert.host_scalars`), and the
    tensor formulas every other device uses (host scalars switched off). Returns ``"host"`` or ``"tensor"``."""
    monkeypatch.setattr(host_scalars, "ENABLED", request.param == "host")
    return request.param
