"""Shared helpers of the chart checks: paths, the chart rendered with helm_lite, the kustomize
base rendered with kubectl."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from helm_lite import render_chart  # noqa: E402

REPO = TESTS.parents[1]
CHART = REPO / "charts" / "switchyard"
KUSTOMIZE_BASE = REPO / "charts" / "kustomize" / "base"
RELEASE = "switchyard"
NAMESPACE = "switchyard-system"


# A cluster with the Prometheus Operator, as `helm template --api-versions` would be told.
MONITORING_API_VERSIONS = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)


def render(values: dict | None = None, **kw):
    """The chart rendered like `helm template switchyard charts/switchyard -n switchyard-system
    --api-versions monitoring.coreos.com/v1/…` (pass api_versions=() for a cluster without the
    Prometheus Operator)."""
    kw.setdefault("api_versions", MONITORING_API_VERSIONS)
    kw.setdefault("release_name", RELEASE)
    kw.setdefault("namespace", NAMESPACE)
    return render_chart(CHART, values or {}, **kw)


def kustomize(path: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed to render the kustomize base (`kubectl kustomize`)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]
