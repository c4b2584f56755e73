"""Fixtures of the chart checks (helpers live in chartlib.py, importable by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chartlib import KUSTOMIZE_BASE, kustomize, render  # noqa: E402


@pytest.fixture(scope="session")
def chart_default():
    return render()


@pytest.fixture(scope="session")
def kustomize_base():
    return kustomize(KUSTOMIZE_BASE)
