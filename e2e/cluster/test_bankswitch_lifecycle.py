"""A BankSwitch on a real cluster, as a platform team would drive it: apply the embedded
example, watch it become Ready, change the spec and see the pods roll, delete it and see the
operator's objects go. Tests run in order and share one BankSwitch."""

from __future__ import annotations

import os

import pytest
from k8s import (
    OPERATOR_DEPLOYMENT,
    OPERATOR_NAMESPACE,
    TIMEOUT,
    ImageRef,
    condition,
    example_objects,
    owned_by,
    wait_for,
)

pytestmark = pytest.mark.cluster

NAME = "demo"  # metadata.name in charts/switchyard/examples/bankswitch-embedded.yaml
OWNED_KINDS = "deployments,services,configmaps,jobs,poddisruptionbudgets"


def bsw(kubectl, ns):
    return kubectl.get_or_none("-n", ns, "bankswitch", NAME)


def ready_and_current(obj):
    if not obj:
        return None
    c = condition(obj, "Ready")
    status = obj.get("status") or {}
    if (
        c
        and c["status"] == "True"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    ):
        return obj
    return None


def owned(kubectl, ns, uid, kinds=OWNED_KINDS):
    return owned_by(kubectl.json("-n", ns, "get", kinds)["items"], uid)


def switch_deployment(kubectl, ns, uid):
    deps = [
        o
        for o in owned(kubectl, ns, uid, "deployments")
        if "drain" not in " ".join(o["spec"]["template"]["spec"]["containers"][0].get("args", []))
    ]
    assert len(deps) == 1, f"expected one switch Deployment owned by {NAME}, got {len(deps)}"
    return deps[0]


def test_operator_is_running_with_the_given_image(kubectl, operator):
    dep = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "deployment", OPERATOR_DEPLOYMENT)
    image = ImageRef.parse(dep["spec"]["template"]["spec"]["containers"][0]["image"])
    wanted = ImageRef.parse(os.environ["OPERATOR_IMAGE"])
    assert image.name == wanted.name
    assert (image.digest or image.tag) == (wanted.digest or wanted.tag or "latest")
    assert dep["status"].get("availableReplicas", 0) >= 1


def test_embedded_example_becomes_ready(kubectl, namespace):
    kubectl.apply(example_objects("embedded", os.environ["SWITCHYARD_IMAGE"]), namespace)
    obj = wait_for(
        f"BankSwitch {namespace}/{NAME} Ready=True at its current generation",
        lambda: ready_and_current(bsw(kubectl, namespace)),
        TIMEOUT,
    )
    assert obj["status"]["readyReplicas"] == 1
    # What a user watching `kubectl get bsw` sees: the printer columns.
    table = kubectl.run("-n", namespace, "get", "bsw", NAME).stdout
    header, row = table.splitlines()[:2]
    for column in ("READY", "REPLICAS", "BACKLOG", "AGE"):
        assert column in header.split(), header
    assert row.split()[:2] == [NAME, "True"], table


def test_operator_built_the_switch_objects(kubectl, namespace):
    uid = bsw(kubectl, namespace)["metadata"]["uid"]
    dep = switch_deployment(kubectl, namespace, uid)
    assert dep["spec"]["replicas"] == 1
    assert dep["status"].get("readyReplicas") == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == os.environ["SWITCHYARD_IMAGE"]
    services = owned(kubectl, namespace, uid, "services")
    ports = {p["port"] for s in services for p in s["spec"]["ports"]}
    assert 8583 in ports, f"no ISO 8583 Service among {[s['metadata']['name'] for s in services]}"
    assert {8080, 9090} & ports, "no admin/metrics Service"
    assert owned(kubectl, namespace, uid, "configmaps"), "no switch config ConfigMap"
    # Embedded SQLite keeps its data on a claim; the pod is ready, so the claim is bound.
    claims = kubectl.json("-n", namespace, "get", "persistentvolumeclaims")["items"]
    mounted = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert mounted, "the switch pod mounts no PersistentVolumeClaim in embedded mode"
    bound = {c["metadata"]["name"] for c in claims if c["status"].get("phase") == "Bound"}
    assert mounted <= bound
    # spec.networkPolicy is on by default: the switch pods admit the admin port from the operator
    # only (the API server accepted the policy the operator built, and the pod is still ready)
    policies = owned(kubectl, namespace, uid, "networkpolicies")
    assert [p["metadata"]["name"] for p in policies] == [f"{NAME}-switch"]
    admin_rules = [
        r for r in policies[0]["spec"]["ingress"] if {"port": 8080, "protocol": "TCP"} in r["ports"]
    ]
    assert admin_rules and admin_rules[0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "switchyard-operator"
    }


def test_spec_change_rolls_the_switch_pods(kubectl, namespace):
    before_obj = bsw(kubectl, namespace)
    uid = before_obj["metadata"]["uid"]
    before = switch_deployment(kubectl, namespace, uid)
    kubectl.run(
        "-n",
        namespace,
        "patch",
        "bankswitch",
        NAME,
        "--type=merge",
        "-p",
        '{"spec":{"iso8583":{"idleTimeout":"120s"}}}',
    )

    def rolled():
        dep = switch_deployment(kubectl, namespace, uid)
        if dep["spec"]["template"] == before["spec"]["template"]:
            return None
        st = dep.get("status") or {}
        done = (
            st.get("observedGeneration") == dep["metadata"]["generation"]
            and st.get("updatedReplicas") == dep["spec"]["replicas"]
            and st.get("readyReplicas") == dep["spec"]["replicas"]
            and not st.get("unavailableReplicas")
        )
        return dep if done else None

    wait_for("the switch Deployment to roll out the new config", rolled, TIMEOUT)
    configs = owned(kubectl, namespace, uid, "configmaps")
    assert any("120s" in v for cm in configs for v in (cm.get("data") or {}).values()), (
        "the new idleTimeout is not in the switch config"
    )
    after = wait_for(
        "BankSwitch Ready at the new generation",
        lambda: ready_and_current(bsw(kubectl, namespace)),
        TIMEOUT,
    )
    assert after["metadata"]["generation"] > before_obj["metadata"]["generation"]


def test_hibernation_drains_scales_to_zero_and_back(kubectl, namespace):
    """spec.hibernation: the operator asks the (embedded, idle) switch pod to hibernate, sees it
    drained, scales it to zero with Hibernated=True; turned off, the pod comes back Ready."""
    uid = bsw(kubectl, namespace)["metadata"]["uid"]

    def patch(enabled):
        body = '{"spec":{"hibernation":{"enabled":%s,"drainTimeout":"2m"}}}' % str(enabled).lower()
        kubectl.run("-n", namespace, "patch", "bankswitch", NAME, "--type=merge", "-p", body)

    def hibernated():
        obj = bsw(kubectl, namespace)
        c = condition(obj, "Hibernated") if obj else None
        return obj if c and c["status"] == "True" else None

    patch(True)
    obj = wait_for(f"BankSwitch {namespace}/{NAME} Hibernated=True", hibernated, TIMEOUT)
    assert condition(obj, "Hibernated")["reason"] == "Drained", condition(obj, "Hibernated")
    assert condition(obj, "Ready")["reason"] == "Hibernated"
    assert obj["status"]["hibernation"]["previousReplicas"] == 1
    assert switch_deployment(kubectl, namespace, uid)["spec"]["replicas"] == 0
    table = kubectl.run("-n", namespace, "get", "bsw", NAME).stdout
    assert "Hibernated" in table, table

    patch(False)
    obj = wait_for(
        "BankSwitch Ready again after the hibernation",
        lambda: ready_and_current(bsw(kubectl, namespace)),
        TIMEOUT,
    )
    assert condition(obj, "Hibernated")["reason"] == "Resumed"
    assert switch_deployment(kubectl, namespace, uid)["spec"]["replicas"] == 1


def test_delete_removes_what_the_operator_built(kubectl, namespace):
    uid = bsw(kubectl, namespace)["metadata"]["uid"]
    assert owned(kubectl, namespace, uid)
    kubectl.run(
        "-n",
        namespace,
        "delete",
        "bankswitch",
        NAME,
        f"--timeout={int(TIMEOUT)}s",
        timeout=TIMEOUT + 30,
    )
    wait_for(
        "the BankSwitch's Deployments, Services, ConfigMaps and Jobs to be deleted",
        lambda: not owned(kubectl, namespace, uid),
        TIMEOUT,
    )
    assert bsw(kubectl, namespace) is None
