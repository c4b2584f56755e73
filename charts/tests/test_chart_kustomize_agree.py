"""The Helm chart and the kustomize base install the same operator.

Decision: `helm` cannot be installed on the project's machines, so the chart is rendered by
charts/tests/helm_lite.py, a renderer for the plain template subset the chart uses (it fails
on anything outside it). The comparison is therefore between real `kubectl kustomize` output
and a faithful-but-not-Helm rendering of the chart with default values. Limitation: a template
construct that Helm renders differently from helm_lite (none is known; the subset is small)
would not be caught here; `helm lint`/`helm template` should run wherever helm is available.
"""

from __future__ import annotations

import copy

import pytest
from chartlib import NAMESPACE

# Labels only Helm sets; everything else must be identical.
HELM_ONLY_LABELS = {"app.kubernetes.io/managed-by", "helm.sh/chart"}
# Only Helm reads its resource policy; the GitOps "never delete" annotations are in both.
CRD_ANNOTATIONS = {"helm.sh/resource-policy"}


def key(o: dict) -> tuple[str, str, str]:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


def by_key(objs: list[dict]) -> dict:
    out = {}
    for o in objs:
        # Helm hooks (the `helm test` Pod) are not part of the installed release.
        if "helm.sh/hook" in o["metadata"].get("annotations", {}):
            continue
        assert key(o) not in out, f"duplicate object {key(o)}"
        out[key(o)] = o
    return out


def normalized(o: dict) -> dict:
    o = copy.deepcopy(o)
    md = o["metadata"]
    for k in HELM_ONLY_LABELS:
        md.get("labels", {}).pop(k, None)
    if o["kind"] == "CustomResourceDefinition":
        for k in CRD_ANNOTATIONS:
            md.get("annotations", {}).pop(k, None)
    if not md.get("labels"):
        md.pop("labels", None)
    if not md.get("annotations"):
        md.pop("annotations", None)
    return o


def images(objs: list[dict]) -> set[str]:
    out = set()
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = o["spec"]["template"]["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                out.add(c["image"])
    return out


def test_same_kinds_and_names(chart_default, kustomize_base):
    chart = set(by_key(chart_default.objects))
    kust = set(by_key(kustomize_base))
    # Helm does not create the release namespace (`helm install --create-namespace` does);
    # the kustomize base has to.
    assert ("Namespace", "", NAMESPACE) in kust
    kust.discard(("Namespace", "", NAMESPACE))
    assert chart == kust
    assert {k[0] for k in chart} == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }


def test_same_rbac_rules_and_bindings(chart_default, kustomize_base):
    chart, kust = by_key(chart_default.objects), by_key(kustomize_base)
    rbac = [
        k for k in chart if k[0] in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")
    ]
    # the operator's ClusterRole and binding, the Lease Role and binding, view and edit
    assert len(rbac) == 6
    for k in rbac:
        for field in ("rules", "roleRef", "subjects"):
            assert chart[k].get(field) == kust[k].get(field), f"{k} {field} differ"


def test_same_images(chart_default, kustomize_base):
    assert images(chart_default.objects) == images(kustomize_base) == {"switchyard-operator:0.1.0"}


@pytest.mark.parametrize(
    "kind",
    [
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "CustomResourceDefinition",
        "ClusterRole",
        "Role",
        "ClusterRoleBinding",
        "RoleBinding",
    ],
)
def test_objects_identical_apart_from_helm_bookkeeping(chart_default, kustomize_base, kind):
    chart, kust = by_key(chart_default.objects), by_key(kustomize_base)
    keys = [k for k in chart if k[0] == kind]
    assert keys, f"chart renders no {kind}"
    for k in keys:
        assert normalized(chart[k]) == normalized(kust[k]), f"{k} differs"


def test_both_keep_the_crds(chart_default, kustomize_base):
    """Deleting a CRD deletes every BankSwitch and so every switch: neither install path may."""
    chart_crds = [o for o in chart_default.objects if o["kind"] == "CustomResourceDefinition"]
    for o in chart_crds:
        assert o["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    crds = [o for o in kustomize_base if o["kind"] == "CustomResourceDefinition"]
    assert {o["metadata"]["name"] for o in crds} >= {"bankswitches.switchyard.io"}
    # Argo CD and Flux render the chart themselves and ignore Helm's policy.
    for o in crds + chart_crds:
        ann = o["metadata"]["annotations"]
        assert "Delete=false" in ann["argocd.argoproj.io/sync-options"]
        assert ann["kustomize.toolkit.fluxcd.io/prune"] == "disabled"
