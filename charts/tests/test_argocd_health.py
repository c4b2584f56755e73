"""The Argo CD health checks (Lua) in charts/switchyard/docs/argocd give the right status for
BankSwitch and KeyRotation objects, on Lua 5.4 and on Lua 5.1 (Argo CD's gopher-lua level)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCS = Path(__file__).resolve().parents[1] / "switchyard" / "docs"
BANKSWITCH_LUA = DOCS / "argocd" / "bankswitch.lua"
KEYROTATION_LUA = DOCS / "argocd" / "keyrotation.lua"

# lua5.4 is required (installed by the test setup); lua5.1 is checked when present because
# Argo CD runs these scripts on gopher-lua, which implements Lua 5.1.
INTERPRETERS = [i for i in ("lua5.4", "lua5.1") if shutil.which(i)] or ["lua5.4"]


def lua_literal(v) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "{" + ", ".join(lua_literal(x) for x in v) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def run_health(script: Path, obj: dict, interpreter: str) -> tuple[str, str]:
    """Run a health script the way Argo CD does: `obj` is a global, the chunk returns hs."""
    if shutil.which(interpreter) is None:
        pytest.fail(f"{interpreter} is not installed (apt-get install -y {interpreter})")
    harness = (
        f"obj = {lua_literal(obj)}\n"
        f"local chunk = assert(loadfile({lua_literal(str(script))}))\n"
        "local hs = chunk()\n"
        'io.write(tostring(hs.status), "\\n", tostring(hs.message), "\\n")\n'
    )
    out = subprocess.run(
        [interpreter, "-"], input=harness, capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0, out.stderr
    status, message = out.stdout.split("\n", 1)
    return status, message.rstrip("\n")


def cond(ctype: str, status: str, message: str = "", reason: str = "Reconciled") -> dict:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-22T01:00:00Z",
    }


def bankswitch(generation=2, observed=2, conditions=None, paused=None, status=True) -> dict:
    obj = {
        "apiVersion": "switchyard.io/v1alpha1",
        "kind": "BankSwitch",
        "metadata": {"name": "demo", "namespace": "payments", "generation": generation},
        "spec": {"image": "switchyard-switch:0.1.0", "replicas": 1},
    }
    if paused is not None:
        obj["spec"]["paused"] = paused
    if status:
        obj["status"] = {"conditions": conditions or [], "replicas": 1, "readyReplicas": 1}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


READY = cond("Ready", "True", "1/1 replicas ready")
NOT_PROGRESSING = cond("Progressing", "False")
NOT_DEGRADED = cond("Degraded", "False")

BANKSWITCH_CASES = [
    (
        "ready and observed",
        bankswitch(conditions=[READY, NOT_PROGRESSING, NOT_DEGRADED]),
        "Healthy",
        "1/1 replicas ready",
    ),
    (
        "no status yet",
        bankswitch(status=False),
        "Progressing",
        "Waiting for the operator to reconcile this BankSwitch",
    ),
    (
        "status without observedGeneration",
        bankswitch(observed=None, conditions=[READY]),
        "Progressing",
        "Waiting for the operator to act on generation 2",
    ),
    (
        "stale ready status after a spec change",
        bankswitch(generation=3, observed=2, conditions=[READY]),
        "Progressing",
        "Waiting for the operator to act on generation 3",
    ),
    (
        "degraded wins over ready",
        bankswitch(
            conditions=[
                READY,
                cond(
                    "Degraded",
                    "True",
                    "failed to run migration Job demo-migrate-1a2b: BackoffLimitExceeded",
                    reason="MigrationFailed",
                ),
            ]
        ),
        "Degraded",
        "failed to run migration Job demo-migrate-1a2b: BackoffLimitExceeded",
    ),
    (
        "degraded without a message",
        bankswitch(conditions=[cond("Degraded", "True")]),
        "Degraded",
        "Degraded",
    ),
    (
        "rolling out",
        bankswitch(
            conditions=[
                cond("Ready", "True"),
                cond("Progressing", "True", "rolling out 2/3 updated"),
            ]
        ),
        "Progressing",
        "rolling out 2/3 updated",
    ),
    (
        "not ready, nothing else said",
        bankswitch(
            conditions=[
                cond("Ready", "False", "0/1 replicas ready: readiness probe failing"),
                NOT_PROGRESSING,
                NOT_DEGRADED,
            ]
        ),
        "Progressing",
        "0/1 replicas ready: readiness probe failing",
    ),
    (
        "no conditions yet",
        bankswitch(conditions=[]),
        "Progressing",
        "Waiting for the switch to become ready",
    ),
    (
        "paused",
        bankswitch(paused=True, conditions=[READY]),
        "Suspended",
        "Paused: the operator makes no changes to this switch (spec.paused)",
    ),
    (
        "paused false is normal",
        bankswitch(paused=False, conditions=[READY]),
        "Healthy",
        "1/1 replicas ready",
    ),
]


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize(
    "name,obj,status,message", BANKSWITCH_CASES, ids=[c[0] for c in BANKSWITCH_CASES]
)
def test_bankswitch_health(interpreter, name, obj, status, message):
    assert run_health(BANKSWITCH_LUA, obj, interpreter) == (status, message)


def keyrotation(phase=None, conditions=None, **status) -> dict:
    obj = {
        "apiVersion": "switchyard.io/v1alpha1",
        "kind": "KeyRotation",
        "metadata": {"name": "tpk-monthly", "namespace": "payments", "generation": 1},
        "spec": {
            "bankSwitchRef": {"name": "demo"},
            "keyTypes": ["TPK"],
            "schedule": {"every": "720h"},
        },
    }
    if phase is not None or conditions or status:
        obj["status"] = {"observedGeneration": 1, "conditions": conditions or [], **status}
        if phase is not None:
            obj["status"]["phase"] = phase
    return obj


KEYROTATION_CASES = [
    (
        "no status yet",
        keyrotation(),
        "Progressing",
        "Waiting for the operator to schedule this KeyRotation",
    ),
    (
        "failed",
        keyrotation(
            "Failed",
            [
                cond(
                    "Degraded",
                    "True",
                    "failed to start rotation: switch admin API answered 503",
                    reason="SwitchUnavailable",
                )
            ],
        ),
        "Degraded",
        "failed to start rotation: switch admin API answered 503",
    ),
    ("failed without a condition", keyrotation("Failed"), "Degraded", "Key rotation failed"),
    (
        "rotating",
        keyrotation("Rotating", currentRotation={"id": "r-1", "keyType": "TAK"}),
        "Progressing",
        "Rotating TAK keys",
    ),
    ("rotating, no details", keyrotation("Rotating"), "Progressing", "Rotating keys"),
    ("idle", keyrotation("Idle"), "Healthy", "Idle"),
    (
        "scheduled",
        keyrotation("Scheduled", nextRotationAt="2026-12-22T01:00:00Z"),
        "Healthy",
        "Scheduled; next rotation at 2026-12-22T01:00:00Z",
    ),
    ("succeeded", keyrotation("Succeeded"), "Healthy", "Succeeded"),
    (
        "suspended",
        keyrotation("Suspended"),
        "Suspended",
        "Suspended: no rotation starts (spec.suspend)",
    ),
    ("a phase from a newer operator", keyrotation("Paused"), "Unknown", "Unknown phase Paused"),
]


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize(
    "name,obj,status,message", KEYROTATION_CASES, ids=[c[0] for c in KEYROTATION_CASES]
)
def test_keyrotation_health(interpreter, name, obj, status, message):
    assert run_health(KEYROTATION_LUA, obj, interpreter) == (status, message)


def test_docs_page_carries_the_same_scripts_as_the_lua_files():
    """Users copy the argocd-cm snippet from the docs page: it must be the tested code."""
    page = (DOCS / "argocd-health.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    cms = [yaml.safe_load(b) for b in blocks]
    cms = [c for c in cms if isinstance(c, dict) and c.get("kind") == "ConfigMap"]
    assert len(cms) == 1, "expected one argocd-cm snippet in argocd-health.md"
    data = cms[0]["data"]
    assert (
        data["resource.customizations.health.switchyard.io_BankSwitch"]
        == BANKSWITCH_LUA.read_text()
    )
    assert (
        data["resource.customizations.health.switchyard.io_KeyRotation"]
        == KEYROTATION_LUA.read_text()
    )
