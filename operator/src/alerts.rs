//! The switch alerts, defined once: `charts/switchyard/observability/alerts.yaml`, the file
//! promtool tests and the chart ships, is embedded here at build time and rendered for one
//! BankSwitch.
//!
//! Rendering for one BankSwitch changes exactly two things, so the operator's PrometheusRule and
//! the chart's raise the same alerts with the same labels (Alertmanager merges them when both
//! are installed):
//! - every switch selector's `job=~".+-admin"` matcher becomes
//!   `namespace="<ns>",job="<name>-admin"` (the `job` Prometheus gives the operator's
//!   ServiceMonitor targets);
//! - the recording rules of the `switchyard-settings` group are inlined where they are used,
//!   because several BankSwitches each recording the same series would collide.
//!
//! The operator group (`switchyard-operator`) is left out: it watches the operator itself, which
//! the chart's rule covers once per cluster.

use serde::Deserialize;
use serde_json::Value;

/// The alert file, as committed in the chart.
pub const ALERTS_YAML: &str = include_str!("../../charts/switchyard/observability/alerts.yaml");
/// The matcher every switch selector in [`ALERTS_YAML`] carries, replaced per BankSwitch.
pub const SCOPE_MATCHER: &str = r#"job=~".+-admin""#;
/// Group with the alerts about the operator itself; not rendered per BankSwitch.
pub const OPERATOR_GROUP: &str = "switchyard-operator";
/// Group of recording rules holding thresholds; inlined per BankSwitch.
pub const SETTINGS_GROUP: &str = "switchyard-settings";

/// The embedded alert file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// The file is not a Prometheus rule file.
    #[error("the embedded alerts.yaml is not a Prometheus rule file")]
    Parse(#[source] serde_yaml::Error),
    /// A switch rule has no scope matcher, so it would watch every BankSwitch.
    #[error("alert rule {0} in alerts.yaml has no `job=~\".+-admin\"` matcher to scope")]
    Unscoped(String),
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Value>,
}

/// The matchers that select one BankSwitch's switch targets.
pub fn scope_for(namespace: &str, job: &str) -> String {
    format!(r#"namespace="{namespace}",job="{job}""#)
}

/// Every group of the alert file as plain JSON (name and rules), in file order.
pub fn file_groups() -> Result<Vec<Value>, AlertsError> {
    let file: Value = serde_yaml::from_str(ALERTS_YAML).map_err(AlertsError::Parse)?;
    Ok(file
        .get("groups")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// The switch alert groups for the BankSwitch whose metrics Prometheus scrapes as
/// `namespace`/`job` (`<name>-admin`).
pub fn scoped_groups(namespace: &str, job: &str) -> Result<Vec<Value>, AlertsError> {
    let file: RuleFile = serde_yaml::from_str(ALERTS_YAML).map_err(AlertsError::Parse)?;
    let scope = scope_for(namespace, job);
    // record name → its expression, for inlining
    let settings: Vec<(String, String)> = file
        .groups
        .iter()
        .filter(|g| g.name == SETTINGS_GROUP)
        .flat_map(|g| g.rules.iter())
        .filter_map(|r| {
            Some((
                r.get("record")?.as_str()?.to_owned(),
                r.get("expr")?.as_str()?.trim().to_owned(),
            ))
        })
        .collect();
    let mut out = Vec::new();
    for group in file.groups {
        if group.name == OPERATOR_GROUP || group.name == SETTINGS_GROUP {
            continue;
        }
        let mut rules = Vec::with_capacity(group.rules.len());
        for mut rule in group.rules {
            let name = rule
                .get("alert")
                .or_else(|| rule.get("record"))
                .and_then(Value::as_str)
                .unwrap_or("unnamed")
                .to_owned();
            let Some(expr) = rule.get("expr").and_then(Value::as_str) else {
                return Err(AlertsError::Unscoped(name));
            };
            if !expr.contains(SCOPE_MATCHER) {
                return Err(AlertsError::Unscoped(name));
            }
            let mut scoped = expr.replace(SCOPE_MATCHER, &scope);
            for (record, value) in &settings {
                scoped = scoped.replace(record.as_str(), &format!("({value})"));
            }
            rule["expr"] = Value::String(scoped);
            rules.push(rule);
        }
        out.push(serde_json::json!({ "name": group.name, "rules": rules }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alerts(groups: &[Value]) -> Vec<&Value> {
        groups
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .filter(|r| r.get("alert").is_some())
            .collect()
    }

    #[test]
    fn every_switch_alert_of_the_file_is_rendered_scoped_to_one_bankswitch() {
        let file = file_groups().expect("parses");
        let scoped = scoped_groups("payments", "atm-admin").expect("renders");
        let want: Vec<&str> = file
            .iter()
            .filter(|g| g["name"] != OPERATOR_GROUP)
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .filter_map(|r| r["alert"].as_str())
            .collect();
        let got: Vec<&str> = alerts(&scoped)
            .iter()
            .filter_map(|r| r["alert"].as_str())
            .collect();
        assert_eq!(got, want);
        assert!(want.contains(&"SwitchyardSwitchDown") && want.len() >= 10);
        for r in alerts(&scoped) {
            let expr = r["expr"].as_str().expect("expr");
            assert!(!expr.contains(".+-admin"), "{expr}");
            assert!(
                !expr.contains("switchyard:"),
                "recording rule left in {expr}"
            );
            // every selector of a switch metric names this BankSwitch
            for (at, _) in expr.match_indices("switchyard_") {
                let rest = &expr[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let selector = rest[end..]
                    .strip_prefix('{')
                    .and_then(|s| s.split('}').next())
                    .unwrap_or_default();
                assert!(
                    selector.starts_with(r#"namespace="payments",job="atm-admin""#),
                    "unscoped selector in {expr}"
                );
            }
            let annotations = &r["annotations"];
            for key in ["summary", "description", "runbook_url"] {
                assert!(annotations[key].as_str().is_some_and(|s| !s.is_empty()));
            }
        }
    }

    #[test]
    fn the_key_rotation_threshold_is_inlined() {
        let scoped = scoped_groups("ns", "x-admin").expect("renders");
        let key = alerts(&scoped)
            .into_iter()
            .find(|r| r["alert"] == "SwitchyardKeyTooOld")
            .expect("KeyTooOld");
        assert!(
            key["expr"]
                .as_str()
                .expect("expr")
                .contains("(vector(2592000))")
        );
    }
}
