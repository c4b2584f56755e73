//! The `KeyRotation` custom resource (SPEC §7): scheduled terminal-key rotation for the terminals
//! of one BankSwitch. Only the API type lives here; the controller core is `crate::key_rotation`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Desired key-rotation policy for the terminals of one BankSwitch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchyard.io",
    version = "v1alpha1",
    kind = "KeyRotation",
    plural = "keyrotations",
    singular = "keyrotation",
    shortname = "krot",
    category = "switchyard",
    namespaced,
    status = "KeyRotationStatus",
    doc = "Scheduled rotation of terminal working keys (TPK, TAK) for the terminals of one BankSwitch: when (every/cron), which terminals, how new keys become active and how long the previous ones stay accepted. Trigger one at once with the annotation switchyard.io/rotate-now.",
    printcolumn = r#"{"name":"BankSwitch","type":"string","jsonPath":".spec.bankSwitchRef.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Next","type":"date","jsonPath":".status.nextRotationAt","description":"When the next rotation starts"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastRotation.finishedAt","description":"When the last rotation finished"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationSpec {
    /// The BankSwitch (same namespace) whose terminals are rotated.
    pub bank_switch_ref: BankSwitchRef,
    /// Key types to rotate, each as its own fleet rotation: `TPK` (PIN) and/or `TAK` (MAC).
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    pub key_types: Vec<RotatedKeyType>,
    /// Which terminals: exactly one of `all`, `ids` or `groups`.
    pub terminals: TerminalSelector,
    /// When rotations start: exactly one of `every` or `cron`.
    pub schedule: RotationSchedule,
    /// When a new key becomes ACTIVE.
    #[serde(default)]
    pub activation: ActivationSpec,
    /// How long PIN blocks and MACs under the previous key stay accepted (Go duration).
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub grace_period: String,
    /// Terminals rotated at the same time: the switch pushes the next terminal's key once one
    /// of these has answered (or after 30 s without an answer).
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent: i32,
    /// When true no new rotation starts; a running one finishes.
    #[serde(default)]
    pub suspend: bool,
    /// Finished rotations kept in `status.history`.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub history_limit: i32,
}

fn default_grace_period() -> String {
    "5m".into()
}
fn default_max_concurrent() -> i32 {
    100
}
fn default_history_limit() -> i32 {
    10
}

/// A BankSwitch in the KeyRotation's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BankSwitchRef {
    /// BankSwitch name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A terminal key type that can be rotated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RotatedKeyType {
    /// Terminal PIN key.
    #[serde(rename = "TPK")]
    Tpk,
    /// Terminal authentication (MAC) key.
    #[serde(rename = "TAK")]
    Tak,
}

/// Terminal selection.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("(self.all ? 1 : 0) + (size(self.ids) > 0 ? 1 : 0) + (size(self.groups) > 0 ? 1 : 0) == 1").message("set exactly one of terminals.all, terminals.ids or terminals.groups"))]
#[serde(rename_all = "camelCase")]
pub struct TerminalSelector {
    /// Every registered terminal.
    #[serde(default)]
    pub all: bool,
    /// These terminal ids.
    #[serde(default)]
    #[schemars(length(max = 10000), inner(length(min = 1, max = 16)))]
    pub ids: Vec<String>,
    /// Terminals in these groups.
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(min = 1, max = 63)))]
    pub groups: Vec<String>,
}

/// Rotation schedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("has(self.every) != has(self.cron)").message("set exactly one of schedule.every or schedule.cron"))]
#[serde(rename_all = "camelCase")]
pub struct RotationSchedule {
    /// Fixed period since the last rotation started (Go duration, e.g. `720h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub every: Option<String>,
    /// Five-field cron expression, evaluated in UTC (e.g. `0 3 1 * *`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 100))]
    pub cron: Option<String>,
}

/// When new keys are activated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivationSpec {
    /// `onConfirm`: when the terminal confirms the KCV; `atTime`: all at once after `activateAfter`.
    #[serde(default)]
    pub mode: ActivationMode,
    /// For `atTime`: delay after the rotation starts (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub activate_after: Option<String>,
    /// A PENDING key not confirmed within this time is reported as failed (Go duration).
    #[serde(default = "default_pending_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub pending_timeout: String,
}

impl Default for ActivationSpec {
    fn default() -> Self {
        Self {
            mode: ActivationMode::default(),
            activate_after: None,
            pending_timeout: default_pending_timeout(),
        }
    }
}

fn default_pending_timeout() -> String {
    "24h".into()
}

/// Activation mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ActivationMode {
    /// Activate each key when its terminal confirms it.
    #[default]
    OnConfirm,
    /// Activate at a fixed time after the rotation starts.
    AtTime,
}

/// Observed rotation state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationStatus {
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Idle, Scheduled, Rotating, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The run in progress: one fleet rotation per key type of `keyTypes`, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_run: Option<RotationRun>,
    /// When the current or most recent run started; the schedule counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_started_at: Option<Time>,
    /// The last `switchyard.io/rotate-now` annotation value acted on, so each value triggers once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotate_now: Option<String>,
    /// Consecutive failed calls to the switch; reset by a success or a new manual trigger.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: i32,
    /// When the last call to the switch failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// When the operator calls the switch again after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,
    /// The rotation in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_rotation: Option<RotationRecord>,
    /// The last finished rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<RotationRecord>,
    /// When the next rotation starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// Finished rotations, newest first (at most `historyLimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RotationRecord>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// A run: every key type of `keyTypes` rotated once, one after the other.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationRun {
    /// Stable id of the run (`scheduled-<time>` or `manual-<annotation value>`); with the key type
    /// it forms the `Idempotency-Key`, so a retried start never creates a second rotation.
    pub id: String,
    /// `Scheduled` or `Manual`.
    pub reason: String,
    /// When the run started.
    pub started_at: Time,
    /// Key types not started yet, in order; the first is started next.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remaining_key_types: Vec<RotatedKeyType>,
}

/// One fleet rotation on the switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    /// Rotation id from `POST /v1/key-rotations`.
    pub id: String,
    /// Key type rotated.
    pub key_type: RotatedKeyType,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Terminal keys by state (PENDING, ACTIVE, EXPIRED, REVOKED, FAILED).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub totals: BTreeMap<String, i64>,
    /// When no new key was PENDING any more, or `pendingTimeout` passed; `gracePeriod` counts
    /// from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<Time>,
    /// When `expire-previous` was called on the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_expired_at: Option<Time>,
    /// `Succeeded` (every selected terminal on the new key) or `Failed`; set when finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn example_parses_with_defaults() {
        let kr: KeyRotation = serde_yaml::from_str(include_str!(
            "../../tests/fixtures/keyrotation/monthly.yaml"
        ))
        .expect("parses");
        assert_eq!(
            kr.spec.key_types,
            [RotatedKeyType::Tpk, RotatedKeyType::Tak]
        );
        assert_eq!(kr.spec.history_limit, 10);
        assert_eq!(kr.spec.activation.mode, ActivationMode::OnConfirm);
    }

    #[test]
    fn crd_enforces_one_terminal_selection_and_one_schedule() {
        let yaml = serde_yaml::to_string(&KeyRotation::crd()).expect("yaml");
        assert!(yaml.contains("has(self.every) != has(self.cron)"));
        assert!(
            yaml.contains("set exactly one of terminals.all, terminals.ids or terminals.groups")
        );
        assert!(yaml.contains("- krot"));
    }
}
