"""Fixtures of the cluster suite. Tests marked `cluster` need a real cluster (KUBECONFIG) and
the images SWITCHYARD_IMAGE and OPERATOR_IMAGE already pushed or loaded into it; without
KUBECONFIG they are skipped with the reason. Unmarked tests run offline."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s import (  # noqa: E402
    OPERATOR_DEPLOYMENT,
    OPERATOR_NAMESPACE,
    TIMEOUT,
    Kubectl,
    write_operator_overlay,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs a Kubernetes cluster (KUBECONFIG)")


def _skip_reason() -> str | None:
    if not os.environ.get("KUBECONFIG"):
        return (
            "no cluster: set KUBECONFIG to a kind or k3d cluster (and SWITCHYARD_IMAGE, "
            "OPERATOR_IMAGE loaded into it) to run the cluster suite; see e2e/cluster/run.sh"
        )
    if shutil.which("kubectl") is None:
        return "kubectl is not on PATH"
    missing = [v for v in ("SWITCHYARD_IMAGE", "OPERATOR_IMAGE") if not os.environ.get(v)]
    if missing:
        return f"set {' and '.join(missing)} to images the cluster can pull"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("cluster") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    return Kubectl()


@pytest.fixture(scope="session")
def operator(kubectl, tmp_path_factory):
    """The operator installed from the kustomize base with OPERATOR_IMAGE, and ready."""
    overlay = write_operator_overlay(
        tmp_path_factory.mktemp("overlay"), os.environ["OPERATOR_IMAGE"]
    )
    kubectl.run(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=switchyard-e2e",
        "-k",
        str(overlay),
    )
    # Whatever CRDs the base ships (KeyRotation may land after BankSwitch) must be served
    # before any custom resource is applied.
    rendered = yaml.safe_load_all(kubectl.run("kustomize", str(overlay)).stdout)
    crds = [
        d["metadata"]["name"] for d in rendered if d and d["kind"] == "CustomResourceDefinition"
    ]
    assert "bankswitches.switchyard.io" in crds
    for crd in crds:
        kubectl.run(
            "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s", timeout=90
        )
    kubectl.run(
        "-n",
        OPERATOR_NAMESPACE,
        "rollout",
        "status",
        f"deployment/{OPERATOR_DEPLOYMENT}",
        f"--timeout={int(TIMEOUT)}s",
        timeout=TIMEOUT + 30,
    )
    yield overlay
    if os.environ.get("E2E_UNINSTALL") == "1":
        # The CRDs stay (deleting them deletes every BankSwitch in the cluster) unless asked.
        rendered = kubectl.run("kustomize", str(overlay)).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        if os.environ.get("E2E_DELETE_CRDS") != "1":
            docs = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
        kubectl.run(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(docs),
        )


@pytest.fixture(scope="module")
def namespace(kubectl, operator, request):
    """A throwaway namespace that enforces the restricted Pod Security Standard, so the
    switch pods the operator builds must be non-root, read-only and capability-free."""
    name = f"switchyard-e2e-{secrets.token_hex(3)}"
    kubectl.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "labels": {
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "app.kubernetes.io/part-of": "switchyard-e2e",
                    },
                },
            }
        ]
    )
    yield name
    if request.session.testsfailed:
        _dump_diagnostics(kubectl, name)
    if os.environ.get("E2E_KEEP_NAMESPACE") != "1":
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def _dump_diagnostics(kubectl: Kubectl, ns: str) -> None:
    print(f"\n==== diagnostics for namespace {ns}")
    for args in (
        ["-n", ns, "get", "bsw,deploy,rs,pods,svc,cm,pvc,jobs", "-o", "wide"],
        ["-n", ns, "describe", "bsw"],
        ["-n", ns, "get", "events", "--sort-by=.lastTimestamp"],
        ["-n", OPERATOR_NAMESPACE, "logs", f"deployment/{OPERATOR_DEPLOYMENT}", "--tail=200"],
    ):
        out = kubectl.run(*args, check=False)
        print(f"---- kubectl {' '.join(args)}\n{out.stdout}{out.stderr}")
