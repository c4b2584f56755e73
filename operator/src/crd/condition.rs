//! Status conditions shared by the Switchyard custom resources, with transition times that stay put.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the switch is serving (all wanted replicas ready, nothing degraded).
pub const READY: &str = "Ready";
/// Condition type: the operator is rolling something out (migration, new pods, scaling).
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong that needs a human (invalid spec, failed migration, ...).
pub const DEGRADED: &str = "Degraded";
/// Condition type: the database schema matches the image (the migration Job succeeded).
pub const DATABASE_MIGRATED: &str = "DatabaseMigrated";
/// Condition type: ServiceMonitor/PrometheusRule are in place (or why they are not).
pub const MONITORING_CONFIGURED: &str = "MonitoringConfigured";

/// Whether a condition holds, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell yet.
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One observation about the resource, in the shape `kubectl wait --for=condition=…` understands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition: Ready, Progressing, Degraded, DatabaseMigrated or MonitoringConfigured.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable reason for the last transition, in PascalCase.
    pub reason: String,
    /// Human-readable explanation, saying what to do when something is wrong.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (not when the condition was last written).
    pub last_transition_time: Time,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition the reconciler wants, before transition-time bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    /// Condition type (one of the constants in this module).
    pub type_: &'static str,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl DesiredCondition {
    /// A condition with the given type, status, reason and message.
    pub fn new(
        type_: &'static str,
        status: impl Into<ConditionStatus>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges desired conditions into the previous ones.
///
/// The transition time is kept when the status did not change, so `kubectl get` shows how long a
/// condition has held and a status write happens only when something a user could see changed.
/// Conditions of other types in `previous` are dropped: the reconciler owns the whole list.
pub fn merge_conditions(
    previous: &[Condition],
    desired: Vec<DesiredCondition>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|d| {
            let old = previous.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match old {
                Some(old) if old.status == d.status => old.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: d.status,
                reason: d.reason,
                message: d.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The condition of the given type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_is_kept_when_status_is_unchanged() {
        let first = merge_conditions(
            &[],
            vec![DesiredCondition::new(
                READY,
                false,
                "Progressing",
                "waiting",
            )],
            Some(1),
            &at(100),
        );
        let second = merge_conditions(
            &first,
            vec![DesiredCondition::new(
                READY,
                false,
                "MigrationRunning",
                "still waiting",
            )],
            Some(2),
            &at(200),
        );
        assert_eq!(second[0].last_transition_time, at(100));
        assert_eq!(second[0].reason, "MigrationRunning");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn transition_time_moves_when_status_flips() {
        let first = merge_conditions(
            &[],
            vec![DesiredCondition::new(READY, false, "Progressing", "")],
            None,
            &at(100),
        );
        let second = merge_conditions(
            &first,
            vec![DesiredCondition::new(READY, true, "AllReplicasReady", "")],
            None,
            &at(300),
        );
        assert_eq!(second[0].status, ConditionStatus::True);
        assert_eq!(second[0].last_transition_time, at(300));
    }
}
