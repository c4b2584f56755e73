"""operator/RBAC.md, the chart and the kustomize base grant the same rules.

RBAC.md's tables are parsed (apiGroups, resources, verbs: the back-quoted names in each cell)
into (apiGroup, resource, verb) triples per role and compared with the rules of the rendered
chart (default values, and watch-namespace mode) and of `kubectl kustomize` of the base.
resourceNames are compared separately for the Lease."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
from chartlib import NAMESPACE, REPO, render

RBAC_MD = REPO / "operator" / "RBAC.md"
OPERATOR = "switchyard-operator"


def doc_tables() -> dict[str, set[tuple[str, str, str]]]:
    """Role name (from each `## … \\`name\\`` heading) → the triples of its table."""
    tables: dict[str, set[tuple[str, str, str]]] = {}
    current = None
    for line in RBAC_MD.read_text().splitlines():
        heading = re.match(r"^## (?:ClusterRole|Role) `([^`]+)`", line)
        if heading:
            current = heading.group(1)
            continue
        if line.startswith("## "):
            current = None
            continue
        if current is None or not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        groups, resources, verbs = (re.findall(r"`([^`]*)`", c) for c in cells[:3])
        groups = ["" if g == '""' else g for g in groups]
        triples = {(g, r, v) for g in groups for r in resources for v in verbs}
        tables.setdefault(current, set()).update(triples)
    return tables


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def roles(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {
        (o["kind"], o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
    }


def test_the_doc_has_every_role():
    assert set(doc_tables()) == {
        OPERATOR,
        f"{OPERATOR}-leader-election",
        f"{OPERATOR}-view",
        f"{OPERATOR}-edit",
    }


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_chart_and_kustomize_grant_exactly_what_the_doc_says(source, chart_default, kustomize_base):
    objects = chart_default.objects if source == "chart" else kustomize_base
    found = roles(objects)
    doc = doc_tables()
    expected = {
        ("ClusterRole", OPERATOR): doc[OPERATOR],
        ("Role", f"{OPERATOR}-leader-election"): doc[f"{OPERATOR}-leader-election"],
        ("ClusterRole", f"{OPERATOR}-view"): doc[f"{OPERATOR}-view"],
        ("ClusterRole", f"{OPERATOR}-edit"): doc[f"{OPERATOR}-edit"],
    }
    assert set(found) == set(expected)
    for key, triples in expected.items():
        got = rule_triples(found[key]["rules"])
        assert got == triples, (
            f"{source} {key}: only in {source}: {sorted(got - triples)}; "
            f"only in RBAC.md: {sorted(triples - got)}"
        )


def test_the_lease_rules_are_limited_by_name_except_create(chart_default):
    role = roles(chart_default.objects)[("Role", f"{OPERATOR}-leader-election")]
    for rule in role["rules"]:
        if rule["verbs"] != ["create"]:
            assert rule.get("resourceNames") == [OPERATOR], rule


def test_watch_namespace_mode_needs_no_cluster_role():
    r = render({"watchNamespace": "payments"})
    found = roles(r.objects)
    doc = doc_tables()
    assert ("ClusterRole", OPERATOR) not in found
    assert not [
        o
        for o in r.objects
        if o["kind"] == "ClusterRoleBinding" and o["metadata"]["name"] == OPERATOR
    ]
    role = found[("Role", OPERATOR)]
    assert role["metadata"]["namespace"] == "payments"
    assert rule_triples(role["rules"]) == doc[OPERATOR]
    binding = next(
        o
        for o in r.objects
        if o["kind"] == "RoleBinding" and o["metadata"]["name"] == OPERATOR
    )
    assert binding["metadata"]["namespace"] == "payments"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": OPERATOR,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}
    ]
    env = next(o for o in r.objects if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    assert {"name": "SWITCHYARD_WATCH_NAMESPACE", "value": "payments"} in env
    # every object is valid for Kubernetes 1.33 (strict), the Role and RoleBinding included
    for o in r.objects:
        if o["kind"] != "CustomResourceDefinition":
            kubernetes_validate.validate(o, "1.33.0", strict=True)
    # the user-facing roles are cluster-wide by nature and stay; they can be turned off
    assert ("ClusterRole", f"{OPERATOR}-view") in found
    off = render({"watchNamespace": "payments", "rbac": {"create": True, "aggregateToDefaultRoles": False}})
    assert not [o for o in off.objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_default_install_watches_every_namespace(chart_default):
    env = next(o for o in chart_default.objects if o["kind"] == "Deployment")["spec"]["template"][
        "spec"
    ]["containers"][0]["env"]
    assert "SWITCHYARD_WATCH_NAMESPACE" not in {e["name"] for e in env}
