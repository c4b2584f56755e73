"""Every object the chart, the kustomize base and the examples give to Kubernetes is valid for
Kubernetes 1.33 (strict: unknown fields are errors), checked offline with kubernetes-validate.
BankSwitch examples are checked against the CRD's own schema, strictly as the API server's
field validation would (unknown fields refused); CEL rules are not evaluated here."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartlib import CHART, KUSTOMIZE_BASE, render

K8S_VERSION = "1.33.0"
# Prometheus Operator kinds: kubernetes-validate ships only the core API schemas.
NOT_IN_CORE_SCHEMAS = {"ServiceMonitor", "PrometheusRule"}
EXAMPLES = CHART / "examples"


def validate_all(objects: list[dict]) -> list[str]:
    """Validate strictly; return the kinds that had no schema (only CRD-defined kinds may)."""
    unvalidated = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.append(o["kind"])
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{o['kind']}/{o['metadata'].get('name')} is invalid for "
                f"Kubernetes {K8S_VERSION}: {e.message} at {list(e.path)}"
            )
    return unvalidated


def test_validation_is_strict_enough_to_catch_a_typo():
    dep = copy.deepcopy([o for o in render().objects if o["kind"] == "Deployment"][0])
    dep["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_kustomize_base_is_valid(kustomize_base):
    assert validate_all(kustomize_base) == []


def test_chart_with_defaults_is_valid(chart_default):
    assert validate_all(chart_default.objects) == []


def test_chart_with_every_option_is_valid():
    values = {
        "replicas": 3,
        "image": {"digest": "sha256:" + "0" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {
                                "matchLabels": {"app.kubernetes.io/name": "switchyard-operator"}
                            },
                        },
                    }
                ]
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "payments"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "service": {"type": "ClusterIP", "annotations": {"example.com/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "Payments"}},
    }
    rendered = render(values, extra_files={"dashboards/overview.json": "{}"})
    assert sorted(validate_all(rendered.objects)) == sorted(NOT_IN_CORE_SCHEMAS)


def load_examples() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


def test_example_secrets_are_valid():
    secrets = [o for _, o in load_examples() if o["kind"] == "Secret"]
    assert len(secrets) >= 4
    assert validate_all(secrets) == []


def strict_schema(s):
    """A CRD structural schema as a JSON Schema that refuses unknown fields, the way the API
    server's strict field validation (the kubectl default) does."""
    if isinstance(s, list):
        return [strict_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = dict(s)
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    int_or_string = s.pop("x-kubernetes-int-or-string", False)
    for k in [k for k in s if k.startswith("x-kubernetes-")]:
        s.pop(k)
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {name: strict_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = strict_schema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = strict_schema(v)
        elif k == "nullable":
            continue
        else:
            out[k] = v
    if int_or_string:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_spec_schema(kind: str) -> dict:
    for f in sorted((CHART / "files" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"][0]
            return strict_schema(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    pytest.fail(f"no CRD for {kind} in charts/switchyard/files/crds")


@pytest.mark.parametrize(
    "filename,obj",
    [(f, o) for f, o in load_examples() if o["kind"] == "BankSwitch"],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_example_bankswitches_match_the_crd(filename, obj):
    assert obj["apiVersion"] == "switchyard.io/v1alpha1"
    jsonschema.validate(obj["spec"], crd_spec_schema("BankSwitch"))


def test_strict_crd_schema_refuses_an_unknown_field():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "replicas": {"type": "integer"},
                "podTemplate": {
                    "type": "object",
                    "properties": {},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            },
        }
    )
    jsonschema.validate({"replicas": 1, "podTemplate": {"anything": 1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"replica": 1}, schema)


def test_examples_reference_only_secrets_they_ship():
    """Applying the example Secrets and then the BankSwitch must not leave a dangling ref."""
    examples = load_examples()
    for flavour in ("embedded", "postgres"):
        secrets = {}
        for f, o in examples:
            if f == f"secrets-{flavour}.yaml":
                secrets[o["metadata"]["name"]] = set(o.get("stringData", {})) | set(
                    o.get("data", {})
                )
        bsw = [o for f, o in examples if f == f"bankswitch-{flavour}.yaml"]
        assert len(bsw) == 1
        refs = list(_secret_refs(bsw[0]["spec"]))
        assert refs
        for name, key in refs:
            assert key in secrets.get(name, set()), f"{flavour}: {name}/{key} is not in the example"


def _secret_refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k.endswith("SecretRef") and isinstance(v, dict):
                yield v["name"], v["key"]
            else:
                yield from _secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _secret_refs(v)


def test_examples_shape_matches_the_brief():
    ex = {f: o for f, o in load_examples() if o["kind"] == "BankSwitch"}
    embedded = ex["bankswitch-embedded.yaml"]["spec"]
    assert "database" not in embedded and embedded["replicas"] == 1
    pg = ex["bankswitch-postgres.yaml"]["spec"]
    assert pg["replicas"] == 3 and pg["database"]["urlSecretRef"]
    assert len(pg["routing"]["upstreams"]) == 1
    assert pg["routing"]["routes"][0]["upstream"] == pg["routing"]["upstreams"][0]["name"]
    d = pg["storeAndForward"]["drainers"]
    # one drainer always on, more from the backlog
    assert (d["minReplicas"], d["maxReplicas"]) == (1, 5)
    assert (
        pg["monitoring"]["serviceMonitor"]["enabled"]
        and pg["monitoring"]["prometheusRule"]["enabled"]
    )
    assert pg["availability"]["podDisruptionBudget"]["enabled"]
    assert pg["availability"]["topologySpread"]["enabled"]


def test_kustomize_base_lists_every_synced_crd():
    listed = yaml.safe_load((KUSTOMIZE_BASE / "crds" / "kustomization.yaml").read_text())[
        "resources"
    ]
    on_disk = sorted(
        p.name for p in (KUSTOMIZE_BASE / "crds").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert sorted(listed) == on_disk
    assert on_disk == sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
