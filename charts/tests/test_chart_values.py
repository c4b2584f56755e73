"""What users of the chart notice when they change values: objects appear and disappear, names,
labels and security settings come out right, and values.schema.json refuses mistakes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from chartlib import CHART, NAMESPACE, render
from helm_lite import TemplateError


def objs(rendered, kind):
    return [o for o in rendered.objects if o["kind"] == kind]


def one(rendered, kind):
    found = objs(rendered, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_cluster_role(rendered, name="switchyard-operator"):
    """The operator's ClusterRole (the others are the user-facing aggregated ones)."""
    found = [o for o in objs(rendered, "ClusterRole") if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected the ClusterRole {name}"
    return found[0]


# --- values.schema.json ------------------------------------------------------------------


def check_jsonschema(values_file: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    return subprocess.run(
        [exe, "--schemafile", str(CHART / "values.schema.json"), str(values_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_values_yaml_matches_its_schema():
    out = check_jsonschema(CHART / "values.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "bad,why",
    [
        ("replica: 3\n", "a typo of replicas"),
        ("replicas: 0\n", "no operator at all"),
        ("replicas: two\n", "not a number"),
        ("image:\n  repository: x\n  pullPolicy: Sometimes\n", "unknown pull policy"),
        ("image:\n  repository: x\n  pullPolicy: Always\n  digest: latest\n", "digest not sha256"),
        ("serviceMonitor:\n  enabled: true\n  interval: 30\n", "interval without a unit"),
        ("crds:\n  install: true\n  keep: 'no'\n", "keep is not a boolean"),
        ("rbac:\n  create: true\n  extraRules: []\n", "unknown key under rbac"),
        (
            "podDisruptionBudget:\n  enabled: true\n  maxUnavailable: 0\n",
            "a PDB that blocks drains",
        ),
    ],
)
def test_schema_refuses_mistakes(tmp_path, bad, why):
    # Merge the mistake over the defaults, as `helm install -f mine.yaml` does.
    import yaml
    from helm_lite import deep_merge

    values = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(bad))
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    out = check_jsonschema(f)
    assert out.returncode != 0, f"schema accepted {why}: {bad!r}"


def test_render_validates_values_like_helm():
    with pytest.raises(jsonschema.ValidationError):
        render({"replicas": "2"})


# --- names, labels, images ---------------------------------------------------------------


def test_default_names_follow_the_release():
    assert one(render(), "Deployment")["metadata"]["name"] == "switchyard-operator"
    r = render(release_name="payments")
    assert one(r, "Deployment")["metadata"]["name"] == "payments-switchyard-operator"
    assert one(r, "ClusterRoleBinding")["subjects"][0]["name"] == "payments-switchyard-operator"
    r = render({"fullnameOverride": "sy"})
    assert {
        o["metadata"]["name"] for o in r.objects if o["kind"] != "CustomResourceDefinition"
    } == {"sy", "sy-leader-election", "sy-test-readyz", "sy-view", "sy-edit"}


def test_image_tag_defaults_to_app_version_and_digest_wins():
    dep = one(render(), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "switchyard-operator:0.1.0"
    dep = one(render({"image": {"repository": "reg.example/sy/op", "tag": "1.2.3"}}), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/sy/op:1.2.3"
    digest = "sha256:" + "a" * 64
    dep = one(render({"image": {"digest": digest}}), "Deployment")
    assert (
        dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"switchyard-operator@{digest}"
    )


def test_service_and_pdb_select_the_operator_pods():
    r = render()
    pod_labels = one(r, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        one(r, "Service")["spec"]["selector"],
        one(r, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(r, "Deployment")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()


def test_chart_upgrade_alone_does_not_restart_the_operator(tmp_path):
    """No chart or app version in the pod template: a chart bump with the same image leaves
    the pod template unchanged, so Kubernetes does not roll the operator pods."""
    import shutil as sh

    from helm_lite import render_chart

    newer = tmp_path / "chart"
    sh.copytree(CHART, newer)
    chart_yaml = newer / "Chart.yaml"
    chart_yaml.write_text(
        chart_yaml.read_text()
        .replace("version: 0.1.0", "version: 0.2.0")
        .replace('appVersion: "0.1.0"', 'appVersion: "0.2.0"')
    )
    pinned = {"image": {"tag": "0.1.0"}}
    old = one(render(pinned), "Deployment")
    new = one(
        render_chart(newer, pinned, release_name="switchyard", namespace=NAMESPACE), "Deployment"
    )
    assert old["metadata"]["labels"] != new["metadata"]["labels"]  # the bump is visible
    assert old["spec"]["template"] == new["spec"]["template"]


def test_operator_contract_env_args_and_probes():
    c = one(render({"logLevel": "debug"}), "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert c["args"] == ["run"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RUST_LOG"]["value"] == "debug"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_pod_meets_restricted_pod_security():
    spec = one(render(), "Deployment")["spec"]["template"]["spec"]
    c = spec["containers"][0]["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["readOnlyRootFilesystem"] is True
    assert c["allowPrivilegeEscalation"] is False
    assert c["capabilities"]["drop"] == ["ALL"]


def test_scheduling_values_reach_the_pod():
    values = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "payments", "effect": "NoSchedule"}
        ],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "payments"},
        "imagePullSecrets": [{"name": "regcred"}],
    }
    spec = one(render(values), "Deployment")["spec"]["template"]
    assert spec["spec"]["nodeSelector"] == values["nodeSelector"]
    assert spec["spec"]["tolerations"] == values["tolerations"]
    assert spec["spec"]["affinity"] == values["affinity"]
    assert spec["spec"]["priorityClassName"] == "system-cluster-critical"
    assert spec["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["metadata"]["annotations"] == {"a": "b"}
    assert spec["metadata"]["labels"]["team"] == "payments"
    bare = one(render(), "Deployment")["spec"]["template"]
    assert (
        not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"}
        & bare["spec"].keys()
    )
    assert "annotations" not in bare["metadata"]


# --- RBAC --------------------------------------------------------------------------------


def test_rbac_is_least_privilege():
    r = render()
    rules = operator_cluster_role(r)["rules"] + one(r, "Role")["rules"]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
    secrets = [x for x in rules if "secrets" in x["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    ], "Secrets: get only, never list/watch (operator/RBAC.md)"
    for rule in rules:
        if rule["resources"] != ["secrets"]:
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]


def allowed(rules, group, resource, verb, name=None):
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            if name is None or not rule.get("resourceNames") or name in rule["resourceNames"]:
                return True
    return False


@pytest.mark.parametrize(
    "group,resource,verb",
    [
        ("switchyard.io", "bankswitches", "watch"),
        ("switchyard.io", "keyrotations/status", "patch"),
        ("switchyard.io", "bankswitches/status", "patch"),
        ("", "configmaps", "create"),
        ("", "services", "patch"),
        ("", "persistentvolumeclaims", "create"),
        ("events.k8s.io", "events", "patch"),
        ("networking.k8s.io", "networkpolicies", "delete"),
        ("cert-manager.io", "certificates", "create"),
        ("apps", "deployments", "patch"),
        ("batch", "jobs", "delete"),
        ("policy", "poddisruptionbudgets", "create"),
        ("monitoring.coreos.com", "servicemonitors", "create"),
        ("monitoring.coreos.com", "prometheusrules", "delete"),
    ],
)
def test_cluster_role_allows_what_the_operator_does(group, resource, verb):
    assert allowed(operator_cluster_role(render())["rules"], group, resource, verb)


@pytest.mark.parametrize(
    "group,resource,verb",
    [
        ("", "secrets", "create"),
        ("", "secrets", "delete"),
        ("", "secrets", "list"),
        ("", "secrets", "watch"),
        ("", "pods", "delete"),
        ("batch", "jobs", "update"),
        ("switchyard.io", "bankswitches", "patch"),
        ("", "services", "delete"),
        ("cert-manager.io", "issuers", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("rbac.authorization.k8s.io", "clusterroles", "create"),
    ],
)
def test_cluster_role_denies_the_rest(group, resource, verb):
    assert not allowed(operator_cluster_role(render())["rules"], group, resource, verb)


def test_lease_role_covers_only_the_operator_lease():
    r = render()
    role = one(r, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = role["rules"]
    for verb in ("get", "patch"):
        assert allowed(rules, "coordination.k8s.io", "leases", verb, "switchyard-operator")
        assert not allowed(rules, "coordination.k8s.io", "leases", verb, "someone-elses-lease")
    assert allowed(rules, "coordination.k8s.io", "leases", "create")
    assert not allowed(rules, "coordination.k8s.io", "leases", "delete")
    assert not allowed(rules, "coordination.k8s.io", "leases", "update")
    binding = one(r, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "switchyard-operator", "namespace": NAMESPACE}
    ]


def test_rbac_and_service_account_can_be_brought_by_the_user():
    r = render(
        {
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "platform-operator"},
        }
    )
    kinds = {o["kind"] for o in r.objects}
    assert not kinds & {
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    }
    dep = one(r, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"


# --- optional objects --------------------------------------------------------------------


@pytest.mark.parametrize("replicas,pdb", [(1, False), (2, True), (3, True)])
def test_pdb_only_with_standbys_so_it_never_blocks_a_drain(replicas, pdb):
    r = render({"replicas": replicas})
    assert one(r, "Deployment")["spec"]["replicas"] == replicas
    found = objs(r, "PodDisruptionBudget")
    assert bool(found) == pdb
    if pdb:
        assert found[0]["spec"] == {
            "maxUnavailable": 1,
            "selector": one(r, "Deployment")["spec"]["selector"],
        }
    assert not objs(
        render({"replicas": 3, "podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget"
    )


def test_service_monitor_is_opt_in_and_carries_user_labels():
    assert not objs(render(), "ServiceMonitor")
    r = render(
        {
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "prometheus"},
                "interval": "15s",
            }
        }
    )
    sm = one(r, "ServiceMonitor")
    svc = one(r, "Service")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    ep = sm["spec"]["endpoints"]
    assert ep == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert svc["spec"]["ports"][0]["name"] == "metrics"


def test_prometheus_rule_is_opt_in_and_carries_the_labels():
    # What the rule contains is checked against observability/alerts.yaml in
    # test_observability.py.
    assert not objs(render(), "PrometheusRule")
    r = render({"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}})
    pr = one(r, "PrometheusRule")
    assert pr["metadata"]["labels"]["release"] == "prometheus"
    alerts = {rule.get("alert") for g in pr["spec"]["groups"] for rule in g["rules"]}
    assert "SwitchyardOperatorReconcileErrors" in alerts
    # Prometheus templating must reach Prometheus untouched by Helm.
    rules = [rule for g in pr["spec"]["groups"] for rule in g["rules"] if "alert" in rule]
    assert any("{{ $labels.controller }}" in rule["annotations"]["summary"] for rule in rules)


def test_dashboards_are_opt_in_configmaps_for_the_grafana_sidecar():
    dash = {"dashboards/switchyard-overview.json": '{"title": "Switchyard overview"}'}
    assert not objs(render(extra_files=dash), "ConfigMap")
    r = render(
        {
            "dashboards": {
                "enabled": True,
                "annotations": {"grafana_folder": "Payments"},
                "namespace": "monitoring",
            }
        },
        extra_files=dash,
    )
    cms = {c["metadata"]["name"]: c for c in objs(r, "ConfigMap")}
    # One ConfigMap per file: the two shipped dashboards and the extra one.
    assert set(cms) == {
        "switchyard-operator-dashboard-switchyard-overview",
        "switchyard-operator-dashboard-switch-fleet",
        "switchyard-operator-dashboard-operator",
    }
    cm = cms["switchyard-operator-dashboard-switchyard-overview"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Payments"}
    assert cm["data"] == {"switchyard-overview.json": '{"title": "Switchyard overview"}'}


def test_crds_installed_and_kept_by_default_and_both_switchable():
    crds = objs(render(), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} >= {"bankswitches.switchyard.io"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    unkept = objs(render({"crds": {"install": True, "keep": False}}), "CustomResourceDefinition")
    assert unkept and all(not c["metadata"].get("annotations") for c in unkept)
    assert not objs(render({"crds": {"install": False, "keep": True}}), "CustomResourceDefinition")


def test_crd_templates_render_the_synced_files_unchanged_apart_from_keep():
    import yaml

    rendered = {
        c["metadata"]["name"]: c
        for c in objs(
            render({"crds": {"install": True, "keep": False}}), "CustomResourceDefinition"
        )
    }
    files = sorted((CHART / "files" / "crds").glob("*.yaml"))
    assert files
    for f in files:
        src = yaml.safe_load(f.read_text())
        assert rendered[src["metadata"]["name"]] == src


def test_notes_tell_the_user_what_to_do_next():
    notes = render().notes
    assert "kubectl -n switchyard-system rollout status deployment/switchyard-operator" in notes
    assert "get bsw" in notes
    assert "WARNING" not in notes
    assert "WARNING: crds.keep is false" in render({"crds": {"install": True, "keep": False}}).notes
    assert "install the CRDs yourself" in render({"crds": {"install": False, "keep": True}}).notes


def test_templates_stay_in_the_plain_subset(tmp_path):
    """A template using a function outside the subset fails the checks instead of rendering."""
    import shutil as sh

    from helm_lite import render_chart

    chart = tmp_path / "chart"
    sh.copytree(CHART, chart)
    (chart / "templates" / "extra.yaml").write_text('{{ lookup "v1" "Secret" "ns" "name" }}\n')
    with pytest.raises(TemplateError, match="lookup"):
        render_chart(chart, {})


# --- chart hygiene: capabilities guards, the helm test hook, Chart.yaml metadata -----------------


@pytest.mark.parametrize(
    ("value", "kind"), [("serviceMonitor", "ServiceMonitor"), ("prometheusRule", "PrometheusRule")]
)
def test_monitoring_objects_fail_clearly_without_the_prometheus_operator_api(value, kind):
    with pytest.raises(TemplateError, match=rf"{value}.enabled is true but .* {kind}"):
        render({value: {"enabled": True}}, api_versions=())
    # Served: rendered; not asked for: nothing, whatever the cluster serves.
    assert [o for o in render({value: {"enabled": True}}).objects if o["kind"] == kind]
    assert not [o for o in render(api_versions=()).objects if o["kind"] == kind]


def test_helm_test_hook_checks_the_operator_readyz():
    (pod,) = [o for o in render().objects if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (svc,) = [o for o in render().objects if o["kind"] == "Service"]
    url = pod["spec"]["containers"][0]["command"][-1]
    assert url == (
        f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}/readyz"
    )
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and sc["readOnlyRootFilesystem"]


def test_chart_metadata_has_home_icon_and_sources():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    icon = chart["icon"].rsplit("/", 1)[-1]
    assert (CHART / icon).is_file(), "the icon the URL points at is committed in the chart"


def test_notes_only_name_commands_that_work_after_install():
    notes = render().notes
    # After `helm install` the user has no chart directory: no relative file paths to apply.
    assert "-f examples/" not in notes
    assert "helm test switchyard -n switchyard-system" in notes
    assert "kubectl -n payments apply -f - <<'YAML'" in notes and "\nYAML\n" in notes
