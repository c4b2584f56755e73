"""Checks of the dashboards, alerts and runbooks: every metric they query is listed in
observability/metrics.txt and exported by the switch or the operator (or marked planned), the
dashboards are well-formed Grafana JSON on a `${datasource}` variable, every alert links to its
runbook section, and the chart ships exactly what promtool tested."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, REPO, render

OBSERVABILITY = CHART / "observability"
ALERTS = OBSERVABILITY / "alerts.yaml"
METRICS_LIST = OBSERVABILITY / "metrics.txt"
RUNBOOKS = CHART / "docs" / "runbooks.md"
# File name → the dashboard's stable uid.
DASHBOARDS = {
    "switch-fleet.json": "switchyard-switch-fleet",
    "operator.json": "switchyard-operator",
}
DEFAULT_RUNBOOKS = (
    "https://github.com/switchyard/switchyard/blob/main/charts/switchyard/docs/runbooks.md"
)
# SPEC §8: the alerts the contract asks for.
SPEC_ALERTS = {
    "SwitchyardSwitchDown",
    "SwitchyardHighErrorRate",
    "SwitchyardHighLatency",
    "SwitchyardSafBacklogHigh",
    "SwitchyardSafOldestTooOld",
    "SwitchyardCircuitOpen",
    "SwitchyardDeadLetters",
    "SwitchyardReversalsHeld",
    "SwitchyardKeyTooOld",
    "SwitchyardOperatorReconcileErrors",
    # issue 10 (data-plane security): profile v2 refusals and connection hygiene
    "SwitchyardNetworkManagementRefused",
    "SwitchyardConnectionsRejected",
    # issue 14 (backup and restore): scheduled backups of the embedded SQLite store
    "SwitchyardBackupStale",
}
METRIC_NAME = re.compile(r"\bswitchyard_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metrics_list() -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(METRICS_LIST.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        assert len(parts) == 2, f"metrics.txt:{n}: expected `<name> <source>`, got {line!r}"
        name, source = parts
        assert source in ("switch", "operator", "planned"), f"metrics.txt:{n}: source {source!r}"
        assert name not in out, f"metrics.txt:{n}: {name} listed twice"
        out[name] = source
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard(name: str) -> dict:
    return json.loads((CHART / "dashboards" / name).read_text())


PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}
# The switch dashboard's logs panel reads Loki through its own data source variable.
LOKI = {"type": "loki", "uid": "${loki}"}


def all_panels(d: dict) -> list[dict]:
    """Every panel, rows' nested panels included; rows themselves carry no query."""
    out = []
    for p in d.get("panels", []):
        out.extend(all_panels(p) if p.get("type") == "row" else [p])
    return out


def panels(d: dict) -> list[dict]:
    """Every Prometheus panel (all but the Loki logs panel)."""
    return [p for p in all_panels(d) if p.get("datasource") != LOKI]


def datasources(node) -> list:
    """Every `datasource` value anywhere in a dashboard (panels, targets, variables)."""
    if isinstance(node, list):
        return [ds for x in node for ds in datasources(x)]
    if isinstance(node, dict):
        own = [node["datasource"]] if "datasource" in node else []
        return own + [ds for k, v in node.items() if k != "datasource" for ds in datasources(v)]
    return []


def dashboard_queries(d: dict) -> list[str]:
    qs = [t.get("expr", "") for p in panels(d) for t in p.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            qs.append(q.get("query", "") if isinstance(q, dict) else q)
    return qs


def queried_metrics() -> dict[str, set[str]]:
    """Metric name → where it is queried."""
    used: dict[str, set[str]] = {}
    sources = [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules()]
    sources += [(f"dashboard {n}", q) for n in DASHBOARDS for q in dashboard_queries(dashboard(n))]
    for where, expr in sources:
        for m in METRIC_NAME.findall(expr):
            used.setdefault(m, set()).add(where)
    return used


def listed_name(queried: str, listed: dict[str, str]) -> str | None:
    if queried in listed:
        return queried
    for suffix in HISTOGRAM_SUFFIXES:
        if queried.endswith(suffix) and queried[: -len(suffix)] in listed:
            return queried[: -len(suffix)]
    return None


def exported_names(sources: list[Path]) -> set[str]:
    """Names a prometheus-client registry exports, from its `register("name", …, value)` calls:
    counters gain `_total`; histograms are listed by their base name like gauges."""
    names = set()
    for path in sources:
        text = path.read_text()
        registrations = re.finditer(
            r'register\(\s*"([a-z0-9_]+)"\s*,.*?,\s*([a-z_][a-z0-9_]*)\.clone\(\)', text, re.S
        )
        for m in registrations:
            name, var = m.groups()
            decl = re.search(rf"let\s+{var}\s*(?::[^=]*)?=\s*([^;]*);", text)
            kind = decl.group(1) if decl else ""
            if "Counter" in kind and "Histogram" not in kind:
                names.add(name + "_total")
            else:
                names.add(name)
    return names


# --- metrics.txt against the queries and the sources ------------------------------------------


def test_every_queried_metric_is_listed():
    listed = metrics_list()
    missing = {m: sorted(w) for m, w in queried_metrics().items() if not listed_name(m, listed)}
    assert not missing, f"add these to charts/switchyard/observability/metrics.txt: {missing}"


def test_every_listed_metric_is_queried():
    used = {listed_name(m, metrics_list()) for m in queried_metrics()}
    stale = sorted(set(metrics_list()) - used)
    assert not stale, f"metrics.txt lists metrics no dashboard or alert uses: {stale}"


def test_switch_metrics_are_registered_and_planned_ones_not_yet():
    exported = exported_names([REPO / "switch" / "src" / "metrics.rs"])
    assert "switchyard_iso_messages_total" in exported, "parser lost track of switch/src/metrics.rs"
    listed = metrics_list()
    missing = sorted(n for n, s in listed.items() if s == "switch" and n not in exported)
    assert not missing, f"marked `switch` but not registered in switch/src/metrics.rs: {missing}"
    landed = sorted(n for n, s in listed.items() if s == "planned" and n in exported)
    assert not landed, f"now registered by the switch: mark them `switch` in metrics.txt: {landed}"


def test_operator_metrics_are_registered():
    sources = sorted((REPO / "operator" / "src").rglob("*.rs"))
    exported = {n for n in exported_names(sources) if n.startswith("switchyard_operator_")}
    if not exported:
        pytest.skip(
            "operator/src registers no switchyard_operator_* metric yet (operator not merged): "
            "operator names in metrics.txt are unchecked"
        )
    listed = metrics_list()
    missing = sorted(n for n, s in listed.items() if s == "operator" and n not in exported)
    assert not missing, f"SPEC §8 operator metrics not registered in operator/src: {missing}"


def test_dashboards_cover_the_metrics_of_spec_section_8():
    fleet = " ".join(dashboard_queries(dashboard("switch-fleet.json")))
    operator = " ".join(dashboard_queries(dashboard("operator.json")))
    listed = metrics_list()
    for name, source in listed.items():
        on_operator_board = name.startswith("switchyard_operator_")
        if name == "switchyard_operator_drainer_replicas" or not on_operator_board:
            assert name in fleet, f"switch-fleet.json shows no panel for {name}"
        else:
            assert name in operator, f"operator.json shows no panel for {name}"


# --- dashboards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_well_formed_on_the_datasource_variable(name):
    d = dashboard(name)
    assert d["uid"] == DASHBOARDS[name], "the uid must stay stable so upgrades replace in place"
    assert d["title"].startswith("Switchyard / ")
    assert "id" not in d or d["id"] is None, "an exported id pins the dashboard to one Grafana"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= variables.keys()
    ps = panels(d)
    assert len(ps) >= 5
    every = all_panels(d)
    ids = [p["id"] for p in d["panels"]] + [p["id"] for p in every if p not in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique (rows included)"
    for p in ps:
        where = f"{name}: panel {p.get('title')!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys(), where
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, where
        assert p.get("targets"), f"{where} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr"
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}", where
            # Scoped to the selected BankSwitches, except the operator's per-BankSwitch gauge.
            assert "$namespace" in t["expr"], f"{where}: query ignores the namespace variable"
    fixed = [ds for ds in datasources(d) if ds not in (PROMETHEUS, LOKI)]
    assert not fixed, f"{name} names a datasource other than the variables: {fixed}"


def test_switch_latency_panel_shows_trace_exemplars_and_a_loki_logs_panel():
    d = dashboard("switch-fleet.json")
    latency = [p for p in panels(d) if "switchyard_transaction_duration_seconds_bucket" in
               " ".join(t["expr"] for t in p["targets"])]
    assert latency, "no latency panel"
    for p in latency:
        assert all(t.get("exemplar") is True for t in p["targets"]), p["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["loki"]["type"] == "datasource" and variables["loki"]["query"] == "loki"
    logs = [p for p in all_panels(d) if p.get("datasource") == LOKI]
    assert len(logs) == 1 and logs[0]["type"] == "logs"
    for t in logs[0]["targets"]:
        assert t["datasource"] == LOKI
        # LogQL on the switch containers of the selected namespaces, filterable by trace id
        assert "$namespace" in t["expr"] and "| json" in t["expr"] and "trace_id" in t["expr"]


def promtool_check_rules(tmp_path: Path, groups: list[dict]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is needed: apt-get install -y --no-install-recommends prometheus")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# Grafana's variables replaced by what they expand to, so promtool can parse the query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".+", "$job": ".+"}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_queries_are_valid_promql(name, tmp_path):
    rules = []
    for i, p in enumerate(panels(dashboard(name))):
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{name}: panel {p['title']!r} uses an unknown variable"
            rules.append({"record": f"dashboard:panel_{i}_{t['refId']}", "expr": expr})
    promtool_check_rules(tmp_path, [{"name": name, "rules": rules}])


# --- alerts and runbooks --------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_are_the_spec_ones_with_runbook_sections():
    rules = [r for r in alert_rules() if "alert" in r]
    assert {r["alert"] for r in rules} == SPEC_ALERTS
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"(?m)^## (.+)$", RUNBOOKS.read_text())
    }
    for r in rules:
        a = r["annotations"]
        assert a.get("summary") and a.get("description"), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert a["runbook_url"] == f"{DEFAULT_RUNBOOKS}#{r['alert'].lower()}", r["alert"]
        assert r["alert"].lower() in anchors, f"runbooks.md has no section `## {r['alert']}`"


def test_runbook_sections_have_the_expected_parts():
    text = RUNBOOKS.read_text()
    sections = re.split(r"(?m)^## ", text)[1:]
    by_name = {s.split("\n", 1)[0].strip(): s for s in sections}
    for alert in SPEC_ALERTS:
        body = by_name.get(alert, "")
        for part in ("Symptom", "Impact", "First checks", "Mitigation", "Do not"):
            assert f"**{part}" in body, f"runbooks.md § {alert} lacks **{part}**"


# --- the chart ships what promtool tested --------------------------------------------------------


def test_prometheus_rule_ships_the_rule_file_with_the_chart_values():
    file_groups = yaml.safe_load(ALERTS.read_text())["groups"]
    extra = {"alert": "Mine", "expr": "vector(1) > 0", "for": "1m"}
    (pr,) = [
        o
        for o in render(
            {
                "prometheusRule": {
                    "enabled": True,
                    "keyRotationPeriodSeconds": 864000,
                    "runbookBaseUrl": "https://wiki.example.com/switchyard",
                    "additionalRules": [extra],
                }
            }
        ).objects
        if o["kind"] == "PrometheusRule"
    ]
    groups = pr["spec"]["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in file_groups] + [
        "switchyard-additional"
    ]
    assert groups[0]["rules"] == [
        {"record": "switchyard:key_rotation_period_seconds", "expr": "vector(864000)"}
    ]
    assert groups[-1]["rules"] == [extra]
    for shipped, tested in zip(groups[1:-1], file_groups[1:]):
        for s, t in zip(shipped["rules"], tested["rules"], strict=True):
            assert s["expr"] == t["expr"] and s.get("for") == t.get("for")
            assert s["annotations"]["runbook_url"] == t["annotations"]["runbook_url"].replace(
                DEFAULT_RUNBOOKS, "https://wiki.example.com/switchyard"
            )
            # Prometheus templating must reach Prometheus untouched by Helm.
            assert s["annotations"]["summary"] == t["annotations"]["summary"]


def test_prometheus_rule_defaults_keep_the_tested_threshold_and_links():
    (pr,) = [
        o
        for o in render({"prometheusRule": {"enabled": True}}).objects
        if o["kind"] == "PrometheusRule"
    ]
    file_groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert pr["spec"]["groups"] == file_groups


def test_rendered_rules_pass_promtool(tmp_path):
    (pr,) = [
        o
        for o in render(
            {"prometheusRule": {"enabled": True, "keyRotationPeriodSeconds": 604800}}
        ).objects
        if o["kind"] == "PrometheusRule"
    ]
    promtool_check_rules(tmp_path, pr["spec"]["groups"])


def test_dashboards_ship_as_sidecar_configmaps_unchanged():
    cms = {
        o["metadata"]["name"]: o
        for o in render({"dashboards": {"enabled": True}}).objects
        if o["kind"] == "ConfigMap"
    }
    for file, _ in DASHBOARDS.items():
        cm = cms[f"switchyard-operator-dashboard-{file.removesuffix('.json')}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][file]) == dashboard(file)


# --- one alert set: the operator's per-BankSwitch PrometheusRule is this file, scoped -------------

OPERATOR_BIN = REPO / "target" / "debug" / "switchyard-operator"
ALERTS_TEST = OBSERVABILITY / "alerts_test.yaml"
SCOPE = 'job=~".+-admin"'


def operator_rendered_rule(namespace: str, name: str) -> dict:
    """The PrometheusRule `switchyard-operator render` produces for a BankSwitch with
    spec.monitoring.prometheusRule.enabled (the builder the controller applies)."""
    if not OPERATOR_BIN.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{OPERATOR_BIN} is missing: `cargo build -p switchyard-operator` first")
        pytest.skip(f"{OPERATOR_BIN} not built; `cargo build -p switchyard-operator`")
    bs = {
        "apiVersion": "switchyard.io/v1alpha1",
        "kind": "BankSwitch",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "registry.example/switchyard/switch:0.1.0",
            "keys": {
                "lmkSecretRef": {"name": "k", "key": "lmk"},
                "kekSecretRef": {"name": "k", "key": "kek"},
            },
            "admin": {"tokenSecretRef": {"name": "a", "key": "tokens"}},
            "monitoring": {"prometheusRule": {"enabled": True}},
        },
    }
    out = subprocess.run(
        [str(OPERATOR_BIN), "render", "-f", "-"],
        input=yaml.safe_dump(bs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (pr,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PrometheusRule"]
    return pr


def test_operator_and_chart_render_the_same_alerts():
    """The chart's PrometheusRule and the operator's differ only in the scope matcher and the
    inlined settings; anything else (a rule, threshold, severity, annotation) fails here."""
    (chart,) = [
        o
        for o in render({"prometheusRule": {"enabled": True}}).objects
        if o["kind"] == "PrometheusRule"
    ]
    chart_groups = {g["name"]: g for g in chart["spec"]["groups"]}
    settings = {
        r["record"]: r["expr"].strip() for r in chart_groups["switchyard-settings"]["rules"]
    }
    operator = operator_rendered_rule("payments", "atm")["spec"]["groups"]
    assert [g["name"] for g in operator] == [
        n for n in chart_groups if n not in ("switchyard-settings", "switchyard-operator")
    ]
    for group in operator:
        for ours, theirs in zip(group["rules"], chart_groups[group["name"]]["rules"], strict=True):
            expected = dict(theirs)
            expr = theirs["expr"].replace(SCOPE, 'namespace="payments",job="atm-admin"')
            for record, value in settings.items():
                expr = expr.replace(record, f"({value})")
            expected["expr"] = expr
            assert ours == expected, theirs.get("alert")


def test_operator_rendered_rules_pass_promtool(tmp_path):
    promtool_check_rules(tmp_path, operator_rendered_rule("payments", "atm")["spec"]["groups"])


def test_every_switch_selector_carries_the_scope_matcher():
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        if group["name"] in ("switchyard-settings", "switchyard-operator"):
            continue
        for r in group["rules"]:
            for m in re.finditer(r"\b(switchyard_[a-z0-9_]+|up)\b(\{[^}]*\})?", r["expr"]):
                assert m.group(2) and SCOPE in m.group(2), f"{r['alert']}: {m.group(0)}"


def test_promtool_tests_cover_every_alert_firing_and_quiet():
    """alerts_test.yaml has, for every alert, a case where it fires and one where it stays quiet."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    assert alerts <= fires, f"no promtool case where these fire: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"no promtool case where these stay quiet: {sorted(alerts - quiet)}"
