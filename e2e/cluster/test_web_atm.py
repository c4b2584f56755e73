"""From a BankSwitch with `spec.simulator.enabled` to a person withdrawing cash in the web ATM,
the README's cluster path: apply the staging example, wait for the switch and the web ATM,
port-forward the web ATM's Service, and withdraw through its API (the same key presses the page
posts). The web ATM provisioned its own terminal and cards through the admin API at start-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request

import pytest
import yaml
from k8s import EXAMPLES, TIMEOUT, condition, wait_for

pytestmark = pytest.mark.cluster

NAME = "demo"  # metadata.name in charts/switchyard/examples/bankswitch-staging-atm.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_a_person_withdraws_cash_in_the_web_atm(kubectl, namespace):
    switch_image = os.environ["SWITCHYARD_IMAGE"]
    objs = [d for d in yaml.safe_load_all((EXAMPLES / "secrets-embedded.yaml").read_text()) if d]
    bsw = yaml.safe_load((EXAMPLES / "bankswitch-staging-atm.yaml").read_text())
    bsw["spec"]["image"] = switch_image
    kubectl.apply(objs + [bsw], namespace)

    def ready():
        obj = kubectl.get_or_none("-n", namespace, "bankswitch", NAME)
        c = condition(obj, "Ready") if obj else None
        return obj if c and c["status"] == "True" else None

    wait_for("BankSwitch Ready", ready, TIMEOUT)
    kubectl.run("-n", namespace, "rollout", "status", f"deployment/{NAME}-atm",
                f"--timeout={int(TIMEOUT)}s", timeout=TIMEOUT + 30)
    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", "-n", namespace, "port-forward", f"svc/{NAME}-atm", f"{port}:7070"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        state = wait_for("web ATM signed on", lambda: _signed_on(url), TIMEOUT)
        assert state["atm"]["screen"] == "welcome"
        for key in ["insert:0", "1", "2", "3", "4", "enter", "L1", "L2"]:
            state = call(url + "/api/key", {"key": key})
        assert state["atm"]["screen"] == "take-cash", state["atm"]
        assert state["atm"]["cash"] == "200.00"
        for key in ["take-cash", "R3"]:
            state = call(url + "/api/key", {"key": key})
        receipt = "\n".join(state["atm"]["receipt"])
        assert "WITHDRAWAL 200.00" in receipt and "AVAILABLE 4,800.00" in receipt, receipt
        state = call(url + "/api/key", {"key": "take-card"})
        assert state["atm"]["screen"] == "welcome"
        summaries = [x["summary"] for x in state["exchanges"]]
        assert "0200 cash withdrawal" in summaries
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def _signed_on(url: str):
    try:
        state = call(url + "/api/state")
    except OSError:
        return None
    return state if state["terminal"]["signedOn"] else None
