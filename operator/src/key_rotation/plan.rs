//! What a KeyRotation does next, and the status transitions around it, as pure functions.
//!
//! The reconcile shell calls [`plan`] with the object and `now`; it gets the next [`Action`] and
//! the status with every transition that needs no I/O already applied (a run begun, a manual
//! trigger accepted, a finished rotation moved to history, phase, `nextRotationAt`, conditions).
//! It then performs the action against the switch and applies the outcome with
//! [`record_started`], [`record_progress`], [`record_expired_previous`] or [`record_failure`],
//! and writes the status once. Because a run and its rotation id live in status, a restarted
//! operator follows a half-done rotation instead of starting a second one, and a start retried
//! after a crash reuses the same `Idempotency-Key`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use super::schedule::Schedule;
use crate::bank_switch::retry_delay;
use crate::bank_switch::validate::parse_duration;
use crate::crd::condition::{
    self, ConditionStatus, DEGRADED, DesiredCondition, PROGRESSING, READY, merge_conditions,
};
use crate::crd::key_rotation::{
    KeyRotation, KeyRotationSpec, KeyRotationStatus, RotatedKeyType, RotationRecord, RotationRun,
};

/// Annotation whose new value starts one run now (once per value).
pub const ROTATE_NOW_ANNOTATION: &str = "switchyard.io/rotate-now";

/// Per-terminal key state names in the switch's rotation totals.
const PENDING: &str = "PENDING";
const FAILED: &str = "FAILED";
/// Condition reason for a failed call to the switch.
const SWITCH_ERROR: &str = "SwitchError";

/// Lifecycle phase shown in `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing scheduled yet (no valid schedule evaluated).
    Idle,
    /// Waiting for the first run.
    Scheduled,
    /// A run is in progress.
    Rotating,
    /// The last run rotated every selected terminal.
    Succeeded,
    /// The last run left terminals on the old key, or the spec cannot be scheduled.
    Failed,
    /// `spec.suspend` is set and no run is in progress.
    Suspended,
}

impl Phase {
    /// The name written to `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Scheduled => "Scheduled",
            Self::Rotating => "Rotating",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Suspended => "Suspended",
        }
    }
}

/// Why a rotation starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// The schedule's window came.
    Scheduled,
    /// The `switchyard.io/rotate-now` annotation got a new value.
    Manual,
}

impl StartReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "Scheduled",
            Self::Manual => "Manual",
        }
    }
}

/// How a finished rotation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationResult {
    /// No key left PENDING or FAILED: every selected terminal is on the new key.
    Succeeded,
    /// `pendingTimeout` passed with keys still PENDING, or the switch reported FAILED keys.
    Failed,
}

impl RotationResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }
}

/// The next thing the reconcile shell does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until `until` (requeue exactly then).
    Wait {
        /// When to reconcile again.
        until: Timestamp,
    },
    /// `POST /v1/key-rotations` for this key type, with this `Idempotency-Key`.
    Start {
        /// Key type to rotate.
        key_type: RotatedKeyType,
        /// Why the run started.
        reason: StartReason,
        /// Stable per run and key type; prefix it with the object's uid.
        idempotency_key: String,
    },
    /// A rotation is in progress: `GET /v1/key-rotations/{id}` and [`record_progress`].
    Follow {
        /// Rotation id on the switch.
        rotation_id: String,
    },
    /// `POST /v1/key-rotations/{id}/expire-previous`, then [`record_expired_previous`].
    ExpirePrevious {
        /// Rotation id on the switch.
        rotation_id: String,
        /// When it became due (settled + gracePeriod).
        at: Timestamp,
    },
    /// A rotation finished and is already in `lastRotation`/`history` of the returned status:
    /// emit the Event and metric, write status, and reconcile again at once.
    Finish {
        /// Rotation id on the switch.
        rotation_id: String,
        /// Key type rotated.
        key_type: RotatedKeyType,
        /// How it went.
        result: RotationResult,
    },
    /// `spec.suspend` is set and no run is in progress: no requeue needed.
    Suspended,
    /// The switch failed recently; do nothing until `until`.
    BackOff {
        /// `status.nextRetryTime`.
        until: Timestamp,
    },
    /// The spec cannot be acted on; the Degraded condition says why. No requeue.
    InvalidSpec {
        /// What is wrong and which field.
        message: String,
    },
}

/// The planner's answer: the action and the status to write after performing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What to do next.
    pub action: Action,
    /// Status with the I/O-free transitions applied.
    pub status: KeyRotationStatus,
}

/// Errors from applying an outcome to status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `spec.activation.pendingTimeout` is not a positive duration.
    #[error("failed to parse spec.activation.pendingTimeout: {0}")]
    PendingTimeout(String),
    /// `spec.gracePeriod` is not a positive duration.
    #[error("failed to parse spec.gracePeriod: {0}")]
    GracePeriod(String),
    /// An outcome arrived for a rotation that status does not hold.
    #[error("failed to record progress: status.currentRotation is not rotation `{0}`")]
    NotCurrent(String),
}

fn ts(t: &Time) -> Timestamp {
    t.0
}

fn add(t: Timestamp, d: std::time::Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

fn duration(value: &str, err: fn(String) -> PlanError) -> Result<std::time::Duration, PlanError> {
    parse_duration(value).map_err(err)
}

/// Decides the next action for `kr` at `now`.
pub fn plan(kr: &KeyRotation, now: Timestamp) -> Plan {
    let spec = &kr.spec;
    let mut st = kr.status.clone().unwrap_or_default();
    let created_at = kr
        .metadata
        .creation_timestamp
        .as_ref()
        .map(ts)
        .unwrap_or(now);
    let trigger = kr
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROTATE_NOW_ANNOTATION))
        .filter(|v| !v.is_empty() && st.last_rotate_now.as_ref() != Some(*v))
        .cloned();

    let mut invalid = None;
    let action = decide(spec, &mut st, trigger, created_at, now, &mut invalid);
    st.phase = Some(phase(spec, &st, invalid.is_some()).as_str().to_owned());
    st.conditions = merge_conditions(
        &st.conditions,
        conditions(&st, invalid.as_deref(), None),
        kr.metadata.generation,
        &Time(now),
    );
    st.observed_generation = kr.metadata.generation;
    Plan { action, status: st }
}

fn decide(
    spec: &KeyRotationSpec,
    st: &mut KeyRotationStatus,
    trigger: Option<String>,
    created_at: Timestamp,
    now: Timestamp,
    invalid: &mut Option<String>,
) -> Action {
    if let Some(value) = trigger.clone() {
        if st.current_run.is_none() {
            // A trigger set while suspended is kept for when the object is resumed.
            if !spec.suspend {
                let anchor = st
                    .last_run_started_at
                    .as_ref()
                    .map(ts)
                    .unwrap_or(created_at);
                let id = manual_run_id(&value, anchor);
                begin_run(spec, st, StartReason::Manual, id, now);
                st.last_rotate_now = Some(value);
                clear_backoff(st);
            }
        } else if st.failed_attempts > 0 {
            // The run in progress is what the user asked for: retry it now instead of waiting.
            st.last_rotate_now = Some(value);
            clear_backoff(st);
        }
        // Otherwise a healthy run is in progress; the trigger starts a run after it finishes.
    }
    let waiting_trigger = trigger.filter(|v| st.last_rotate_now.as_ref() != Some(v));
    let backing_off = st
        .next_retry_time
        .as_ref()
        .map(ts)
        .filter(|until| st.failed_attempts > 0 && *until > now);

    if let Some(current) = st.current_rotation.clone() {
        if let Some(until) = backing_off {
            return Action::BackOff { until };
        }
        if current.previous_expired_at.is_some() {
            return finish(spec, st, current, now);
        }
        if let Some(settled) = current.settled_at.as_ref().map(ts) {
            let grace = match duration(&spec.grace_period, PlanError::GracePeriod) {
                Ok(g) => g,
                Err(e) => return invalid_spec(invalid, e.to_string()),
            };
            let at = add(settled, grace);
            return if at <= now {
                Action::ExpirePrevious {
                    rotation_id: current.id,
                    at,
                }
            } else {
                Action::Wait { until: at }
            };
        }
        return Action::Follow {
            rotation_id: current.id,
        };
    }

    if let Some(run) = st.current_run.clone() {
        if let Some(key_type) = run.remaining_key_types.first().copied() {
            if let Some(until) = backing_off {
                return Action::BackOff { until };
            }
            let reason = if run.reason == StartReason::Manual.as_str() {
                StartReason::Manual
            } else {
                StartReason::Scheduled
            };
            return Action::Start {
                key_type,
                reason,
                idempotency_key: format!("{}-{}", run.id, key_type_name(key_type)),
            };
        }
        // Every key type of the run is done; a trigger that waited for it starts the next run.
        st.current_run = None;
        if let Some(value) = waiting_trigger {
            return decide(spec, st, Some(value), created_at, now, invalid);
        }
    }

    if spec.suspend {
        st.next_rotation_at = None;
        return Action::Suspended;
    }
    if spec.key_types.is_empty() {
        st.next_rotation_at = None;
        return invalid_spec(
            invalid,
            "failed to read spec.keyTypes: list TPK and/or TAK".into(),
        );
    }
    let schedule = match Schedule::parse(&spec.schedule) {
        Ok(s) => s,
        Err(e) => {
            st.next_rotation_at = None;
            return invalid_spec(invalid, e.to_string());
        }
    };
    let anchor = st
        .last_run_started_at
        .as_ref()
        .map(ts)
        .unwrap_or(created_at);
    let next = match schedule.next_run(anchor, now) {
        Ok(n) => n,
        Err(e) => {
            st.next_rotation_at = None;
            return invalid_spec(invalid, e.to_string());
        }
    };
    if !next.due {
        st.next_rotation_at = Some(Time(next.at));
        return Action::Wait { until: next.at };
    }
    // The id names the window, not `now`: a start retried after a crash before the status write
    // computes the same window from the same anchor and so the same Idempotency-Key.
    begin_run(
        spec,
        st,
        StartReason::Scheduled,
        format!("scheduled-{}", next.window),
        now,
    );
    decide(spec, st, None, created_at, now, invalid)
}

/// Run id for a manual trigger: a digest of the annotation value, because the value is free text
/// (newlines, any length) and the id ends up in the `Idempotency-Key` header. The previous run's
/// start is mixed in so a value reused months later is a new run, while a start retried after a
/// lost status write (same anchor) keeps its key.
fn manual_run_id(value: &str, previous_run: Timestamp) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous_run.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(value.as_bytes());
    let digest = hasher.finalize();
    format!("manual-{}", hex::encode(&digest[..8]))
}

fn invalid_spec(invalid: &mut Option<String>, message: String) -> Action {
    *invalid = Some(message.clone());
    Action::InvalidSpec { message }
}

fn key_type_name(k: RotatedKeyType) -> &'static str {
    match k {
        RotatedKeyType::Tpk => "TPK",
        RotatedKeyType::Tak => "TAK",
    }
}

fn begin_run(
    spec: &KeyRotationSpec,
    st: &mut KeyRotationStatus,
    reason: StartReason,
    id: String,
    now: Timestamp,
) {
    st.current_run = Some(RotationRun {
        id,
        reason: reason.as_str().to_owned(),
        started_at: Time(now),
        remaining_key_types: spec.key_types.clone(),
    });
    st.last_run_started_at = Some(Time(now));
    st.next_rotation_at = None;
}

fn clear_backoff(st: &mut KeyRotationStatus) {
    st.failed_attempts = 0;
    st.next_retry_time = None;
}

fn finish(
    spec: &KeyRotationSpec,
    st: &mut KeyRotationStatus,
    mut current: RotationRecord,
    now: Timestamp,
) -> Action {
    let result = if current.result.as_deref() == Some(RotationResult::Failed.as_str()) {
        RotationResult::Failed
    } else {
        RotationResult::Succeeded
    };
    current.result = Some(result.as_str().to_owned());
    current.finished_at = Some(Time(now));
    let limit = usize::try_from(spec.history_limit).unwrap_or(0);
    st.history.insert(0, current.clone());
    st.history.truncate(limit);
    st.current_rotation = None;
    let action = Action::Finish {
        rotation_id: current.id.clone(),
        key_type: current.key_type,
        result,
    };
    st.last_rotation = Some(current);
    action
}

fn phase(spec: &KeyRotationSpec, st: &KeyRotationStatus, invalid: bool) -> Phase {
    if st.current_run.is_some() || st.current_rotation.is_some() {
        return Phase::Rotating;
    }
    if spec.suspend {
        return Phase::Suspended;
    }
    if invalid {
        return Phase::Failed;
    }
    if last_run_failed(st).is_some() {
        return Phase::Failed;
    }
    if st.last_rotation.is_some() {
        Phase::Succeeded
    } else if st.next_rotation_at.is_some() {
        Phase::Scheduled
    } else {
        Phase::Idle
    }
}

/// A failed rotation of the most recent run (one run rotates each key type once).
fn last_run_failed(st: &KeyRotationStatus) -> Option<&RotationRecord> {
    let run_start = st.last_run_started_at.as_ref().map(ts);
    st.history
        .iter()
        .chain(st.last_rotation.iter())
        .filter(|r| match (run_start, r.started_at.as_ref().map(ts)) {
            (Some(run), Some(started)) => started >= run,
            _ => true,
        })
        .find(|r| r.result.as_deref() == Some(RotationResult::Failed.as_str()))
}

fn conditions(
    st: &KeyRotationStatus,
    invalid: Option<&str>,
    failure: Option<String>,
) -> Vec<DesiredCondition> {
    let rotating = st.current_rotation.as_ref().map(|r| {
        format!(
            "rotating {} keys (rotation {})",
            key_type_name(r.key_type),
            r.id
        )
    });
    let progressing = match (&rotating, &st.current_run) {
        (Some(msg), _) => DesiredCondition::new(PROGRESSING, true, "Rotating", msg.clone()),
        (None, Some(run)) => DesiredCondition::new(
            PROGRESSING,
            true,
            "Starting",
            format!("starting run {}", run.id),
        ),
        (None, None) => DesiredCondition::new(PROGRESSING, false, "Idle", ""),
    };
    let previous_failure = failure.or_else(|| {
        condition::find(&st.conditions, DEGRADED)
            .filter(|c| c.status == ConditionStatus::True && c.reason == SWITCH_ERROR)
            .map(|c| c.message.clone())
    });
    let last_failed = last_run_failed(st);
    let degraded = if let Some(message) = invalid {
        DesiredCondition::new(DEGRADED, true, "InvalidSpec", message)
    } else if st.failed_attempts > 0 {
        DesiredCondition::new(
            DEGRADED,
            true,
            SWITCH_ERROR,
            previous_failure.unwrap_or_else(|| "failed to call the switch admin API".into()),
        )
    } else if let Some(r) = last_failed {
        DesiredCondition::new(
            DEGRADED,
            true,
            "RotationFailed",
            format!(
                "rotation {} left terminals off the new {} key ({}); check those terminals and trigger a rotation",
                r.id,
                key_type_name(r.key_type),
                totals_text(&r.totals)
            ),
        )
    } else {
        DesiredCondition::new(DEGRADED, false, "AsExpected", "")
    };
    let ready = if degraded.status == ConditionStatus::True {
        DesiredCondition::new(
            READY,
            false,
            degraded.reason.clone(),
            degraded.message.clone(),
        )
    } else {
        DesiredCondition::new(READY, true, "AsExpected", "")
    };
    vec![ready, progressing, degraded]
}

fn totals_text(totals: &BTreeMap<String, i64>) -> String {
    totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The switch accepted `POST /v1/key-rotations` for the run's next key type.
pub fn record_started(
    mut st: KeyRotationStatus,
    key_type: RotatedKeyType,
    rotation_id: String,
    now: Timestamp,
) -> KeyRotationStatus {
    if let Some(run) = st.current_run.as_mut()
        && let Some(pos) = run.remaining_key_types.iter().position(|k| *k == key_type)
    {
        run.remaining_key_types.remove(pos);
    }
    st.current_rotation = Some(RotationRecord {
        id: rotation_id,
        key_type,
        started_at: Some(Time(now)),
        finished_at: None,
        totals: BTreeMap::new(),
        settled_at: None,
        previous_expired_at: None,
        result: None,
    });
    clear_backoff(&mut st);
    st
}

/// The switch reported the rotation's totals by key state.
///
/// The rotation settles when no key is PENDING, or when `pendingTimeout` has passed since it
/// started; `gracePeriod` then counts from the settle time before the previous keys expire.
pub fn record_progress(
    spec: &KeyRotationSpec,
    mut st: KeyRotationStatus,
    rotation_id: &str,
    totals: BTreeMap<String, i64>,
    now: Timestamp,
) -> Result<KeyRotationStatus, PlanError> {
    let timeout = duration(&spec.activation.pending_timeout, PlanError::PendingTimeout)?;
    let current = st
        .current_rotation
        .as_mut()
        .filter(|r| r.id == rotation_id)
        .ok_or_else(|| PlanError::NotCurrent(rotation_id.to_owned()))?;
    let pending = totals.get(PENDING).copied().unwrap_or(0);
    let failed = totals.get(FAILED).copied().unwrap_or(0);
    let started = current.started_at.as_ref().map(ts).unwrap_or(now);
    let timed_out = add(started, timeout) <= now;
    if current.settled_at.is_none() && (pending == 0 || timed_out) {
        current.settled_at = Some(Time(now));
        let result = if pending == 0 && failed == 0 {
            RotationResult::Succeeded
        } else {
            RotationResult::Failed
        };
        current.result = Some(result.as_str().to_owned());
    }
    current.totals = totals;
    clear_backoff(&mut st);
    Ok(st)
}

/// The switch accepted `expire-previous` for the current rotation.
pub fn record_expired_previous(mut st: KeyRotationStatus, now: Timestamp) -> KeyRotationStatus {
    if let Some(current) = st.current_rotation.as_mut() {
        current.previous_expired_at = Some(Time(now));
    }
    clear_backoff(&mut st);
    st
}

/// A call to the switch failed: count it and back off exponentially (5 s doubling to 5 min).
///
/// `message` goes into the Degraded condition; it must not carry secrets (tokens, key bytes).
pub fn record_failure(
    mut st: KeyRotationStatus,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> KeyRotationStatus {
    st.failed_attempts = st.failed_attempts.saturating_add(1);
    st.last_failure_time = Some(Time(now));
    st.next_retry_time = Some(Time(add(now, retry_delay(st.failed_attempts))));
    let text = format!(
        "{message}; attempt {}, retrying at {}",
        st.failed_attempts,
        add(now, retry_delay(st.failed_attempts))
    );
    let desired = conditions(&st, None, Some(text));
    st.conditions = merge_conditions(&st.conditions, desired, generation, &Time(now));
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::key_rotation::{
        ActivationSpec, BankSwitchRef, RotationSchedule, TerminalSelector,
    };
    use kube::api::ObjectMeta;
    use rstest::rstest;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("valid timestamp")
    }

    fn spec(schedule: RotationSchedule) -> KeyRotationSpec {
        KeyRotationSpec {
            bank_switch_ref: BankSwitchRef {
                name: "switch".into(),
            },
            key_types: vec![RotatedKeyType::Tpk, RotatedKeyType::Tak],
            terminals: TerminalSelector {
                all: true,
                ids: vec![],
                groups: vec![],
            },
            schedule,
            activation: ActivationSpec::default(),
            grace_period: "5m".into(),
            max_concurrent: 100,
            suspend: false,
            history_limit: 10,
        }
    }

    fn every(d: &str) -> RotationSchedule {
        RotationSchedule {
            every: Some(d.into()),
            cron: None,
        }
    }

    fn cron(c: &str) -> RotationSchedule {
        RotationSchedule {
            every: None,
            cron: Some(c.into()),
        }
    }

    const CREATED: &str = "2026-01-01T00:00:00Z";

    /// A KeyRotation created at `CREATED`, as the API server would hand it back.
    fn object(
        spec: KeyRotationSpec,
        status: &KeyRotationStatus,
        rotate_now: Option<&str>,
    ) -> KeyRotation {
        let mut kr = KeyRotation::new("monthly", spec);
        kr.metadata = ObjectMeta {
            name: Some("monthly".into()),
            namespace: Some("payments".into()),
            generation: Some(1),
            creation_timestamp: Some(Time(t(CREATED))),
            annotations: rotate_now
                .map(|v| BTreeMap::from([(ROTATE_NOW_ANNOTATION.to_owned(), v.to_owned())])),
            ..ObjectMeta::default()
        };
        // Round-trip through JSON as the API server stores it, so nothing lives only in memory
        // (this is what an operator restart sees).
        let json = serde_json::to_string(status).expect("status serializes");
        kr.status = Some(serde_json::from_str(&json).expect("status deserializes"));
        kr
    }

    fn totals(pending: i64, active: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([
            ("PENDING".to_owned(), pending),
            ("ACTIVE".to_owned(), active),
        ])
    }

    fn cond<'a>(st: &'a KeyRotationStatus, type_: &str) -> &'a condition::Condition {
        condition::find(&st.conditions, type_).expect("condition present")
    }

    /// Drives one key type from Start to Finish against a switch that confirms every terminal.
    fn rotate_one(
        spec: &KeyRotationSpec,
        st: KeyRotationStatus,
        id: &str,
        now: Timestamp,
    ) -> (KeyRotationStatus, Timestamp) {
        let p = plan(&object(spec.clone(), &st, None), now);
        let Action::Start { key_type, .. } = p.action else {
            panic!("expected Start, got {:?}", p.action)
        };
        let st = record_started(p.status, key_type, id.into(), now);
        let st = record_progress(spec, st, id, totals(0, 10), now).expect("progress");
        let later = add(now, std::time::Duration::from_secs(300));
        let p = plan(&object(spec.clone(), &st, None), later);
        assert!(
            matches!(p.action, Action::ExpirePrevious { .. }),
            "{:?}",
            p.action
        );
        let st = record_expired_previous(p.status, later);
        let p = plan(&object(spec.clone(), &st, None), later);
        assert!(matches!(p.action, Action::Finish { .. }), "{:?}", p.action);
        (p.status, later)
    }

    #[test]
    fn fresh_object_waits_for_the_first_window() {
        let p = plan(
            &object(spec(every("720h")), &KeyRotationStatus::default(), None),
            t("2026-01-02T00:00:00Z"),
        );
        assert_eq!(
            p.action,
            Action::Wait {
                until: t("2026-01-31T00:00:00Z")
            }
        );
        assert_eq!(p.status.phase.as_deref(), Some("Scheduled"));
        assert_eq!(
            p.status.next_rotation_at,
            Some(Time(t("2026-01-31T00:00:00Z")))
        );
        assert_eq!(cond(&p.status, READY).status, ConditionStatus::True);
        assert_eq!(p.status.observed_generation, Some(1));
    }

    #[test]
    fn due_window_starts_the_first_key_type_with_a_stable_idempotency_key() {
        let s = spec(every("720h"));
        let first = plan(
            &object(s.clone(), &KeyRotationStatus::default(), None),
            t("2026-01-31T00:00:00Z"),
        );
        assert_eq!(
            first.action,
            Action::Start {
                key_type: RotatedKeyType::Tpk,
                reason: StartReason::Scheduled,
                idempotency_key: "scheduled-2026-01-31T00:00:00Z-TPK".into(),
            }
        );
        let run = first.status.current_run.clone().expect("run begun");
        assert_eq!(
            run.remaining_key_types,
            [RotatedKeyType::Tpk, RotatedKeyType::Tak]
        );
        assert_eq!(first.status.phase.as_deref(), Some("Rotating"));
        assert_eq!(first.status.next_rotation_at, None);
        // The status write was lost (crash after the POST): planning again later from the old
        // status gives the same key, so the switch returns the same rotation.
        let again = plan(
            &object(s, &KeyRotationStatus::default(), None),
            t("2026-01-31T00:00:42Z"),
        );
        assert_eq!(again.action, first.action);
    }

    #[test]
    fn a_run_rotates_each_key_type_in_order_then_waits_for_the_next_window() {
        let s = spec(every("720h"));
        let start = t("2026-01-31T00:00:00Z");
        let (st, now) = rotate_one(&s, KeyRotationStatus::default(), "rot-tpk", start);
        assert_eq!(
            st.last_rotation.as_ref().map(|r| r.key_type),
            Some(RotatedKeyType::Tpk)
        );
        let p = plan(&object(s.clone(), &st, None), now);
        assert_eq!(
            p.action,
            Action::Start {
                key_type: RotatedKeyType::Tak,
                reason: StartReason::Scheduled,
                idempotency_key: "scheduled-2026-01-31T00:00:00Z-TAK".into(),
            }
        );
        let (st, now) = rotate_one(&s, st, "rot-tak", now);
        let p = plan(&object(s, &st, None), now);
        // Counted from the run's start, not from when it finished.
        assert_eq!(
            p.action,
            Action::Wait {
                until: t("2026-03-02T00:00:00Z")
            }
        );
        assert_eq!(p.status.phase.as_deref(), Some("Succeeded"));
        assert_eq!(p.status.current_run, None);
        let ids: Vec<_> = p.status.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["rot-tak", "rot-tpk"], "newest first");
        assert!(
            p.status
                .history
                .iter()
                .all(|r| r.result.as_deref() == Some("Succeeded"))
        );
        assert_eq!(cond(&p.status, PROGRESSING).status, ConditionStatus::False);
    }

    #[test]
    fn follows_until_no_key_is_pending_then_waits_the_grace_period() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let st = record_started(p.status, RotatedKeyType::Tpk, "rot-1".into(), now);
        let p = plan(&object(s.clone(), &st, None), now);
        assert_eq!(
            p.action,
            Action::Follow {
                rotation_id: "rot-1".into()
            }
        );
        let st = record_progress(
            &s,
            p.status,
            "rot-1",
            totals(4, 6),
            t("2026-01-31T01:00:00Z"),
        )
        .expect("progress");
        assert_eq!(
            st.current_rotation
                .as_ref()
                .and_then(|r| r.settled_at.clone()),
            None
        );
        let p = plan(&object(s.clone(), &st, None), t("2026-01-31T01:00:00Z"));
        assert_eq!(
            p.action,
            Action::Follow {
                rotation_id: "rot-1".into()
            }
        );
        let settled = t("2026-01-31T02:00:00Z");
        let st = record_progress(&s, p.status, "rot-1", totals(0, 10), settled).expect("progress");
        let p = plan(&object(s.clone(), &st, None), t("2026-01-31T02:04:59Z"));
        assert_eq!(
            p.action,
            Action::Wait {
                until: t("2026-01-31T02:05:00Z")
            },
            "grace period not over"
        );
        let p = plan(&object(s, &st, None), t("2026-01-31T02:05:00Z"));
        assert_eq!(
            p.action,
            Action::ExpirePrevious {
                rotation_id: "rot-1".into(),
                at: t("2026-01-31T02:05:00Z")
            }
        );
    }

    #[test]
    fn pending_timeout_settles_the_rotation_as_failed() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let st = record_started(p.status, RotatedKeyType::Tpk, "rot-1".into(), now);
        let st = record_progress(&s, st, "rot-1", totals(3, 7), t("2026-01-31T23:59:59Z"))
            .expect("progress");
        assert_eq!(
            st.current_rotation
                .as_ref()
                .and_then(|r| r.settled_at.clone()),
            None
        );
        let timeout = t("2026-02-01T00:00:00Z");
        let st = record_progress(&s, st, "rot-1", totals(3, 7), timeout).expect("progress");
        let p = plan(
            &object(s.clone(), &st, None),
            add(timeout, std::time::Duration::from_secs(300)),
        );
        assert!(
            matches!(p.action, Action::ExpirePrevious { .. }),
            "{:?}",
            p.action
        );
        let st = record_expired_previous(p.status, t("2026-02-01T00:05:00Z"));
        let p = plan(&object(s, &st, None), t("2026-02-01T00:05:00Z"));
        assert_eq!(
            p.action,
            Action::Finish {
                rotation_id: "rot-1".into(),
                key_type: RotatedKeyType::Tpk,
                result: RotationResult::Failed
            }
        );
        let degraded = cond(&p.status, DEGRADED);
        assert_eq!(degraded.status, ConditionStatus::True);
        assert_eq!(degraded.reason, "RotationFailed");
        assert!(
            degraded.message.contains("PENDING=3"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn failed_keys_reported_by_the_switch_fail_the_rotation() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let st = record_started(
            KeyRotationStatus::default(),
            RotatedKeyType::Tpk,
            "rot-1".into(),
            now,
        );
        let mut tot = totals(0, 9);
        tot.insert("FAILED".into(), 1);
        let st = record_progress(&s, st, "rot-1", tot, now).expect("progress");
        assert_eq!(
            st.current_rotation.and_then(|r| r.result).as_deref(),
            Some("Failed")
        );
    }

    #[test]
    fn restart_mid_rotation_follows_and_never_starts_a_second_one() {
        let s = spec(cron("0 3 * * *"));
        let now = t("2026-01-05T03:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let st = record_started(p.status, RotatedKeyType::Tpk, "rot-7".into(), now);
        // Operator restarts two days later: the schedule is overdue and a manual trigger is set,
        // yet the rotation in status is followed.
        let p = plan(&object(s, &st, Some("again")), t("2026-01-07T09:00:00Z"));
        assert_eq!(
            p.action,
            Action::Follow {
                rotation_id: "rot-7".into()
            }
        );
        assert_eq!(
            p.status.last_rotate_now, None,
            "trigger waits for the run to finish"
        );
    }

    #[test]
    fn restart_between_key_types_starts_the_remaining_one() {
        let s = spec(every("720h"));
        let (st, now) = rotate_one(
            &s,
            KeyRotationStatus::default(),
            "rot-tpk",
            t("2026-01-31T00:00:00Z"),
        );
        let p = plan(
            &object(s, &st, None),
            add(now, std::time::Duration::from_secs(3600)),
        );
        assert!(
            matches!(
                p.action,
                Action::Start {
                    key_type: RotatedKeyType::Tak,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
    }

    #[test]
    fn missed_windows_after_downtime_start_one_run() {
        let s = spec(cron("0 3 * * *"));
        let last = KeyRotationStatus {
            last_run_started_at: Some(Time(t("2026-01-05T03:00:00Z"))),
            ..KeyRotationStatus::default()
        };
        let now = t("2026-01-10T11:00:00Z");
        let p = plan(&object(s.clone(), &last, None), now);
        assert!(
            matches!(
                p.action,
                Action::Start {
                    key_type: RotatedKeyType::Tpk,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
        let (st, now) = rotate_one(&s, last, "r1", now);
        let (st, now) = rotate_one(&s, st, "r2", now);
        let p = plan(&object(s, &st, None), now);
        assert_eq!(
            p.action,
            Action::Wait {
                until: t("2026-01-11T03:00:00Z")
            },
            "no second catch-up run"
        );
    }

    #[test]
    fn suspend_stops_new_runs_and_resume_starts_one_once() {
        let mut s = spec(every("720h"));
        s.suspend = true;
        let p = plan(
            &object(s.clone(), &KeyRotationStatus::default(), None),
            t("2026-03-01T00:00:00Z"),
        );
        assert_eq!(p.action, Action::Suspended);
        assert_eq!(p.status.phase.as_deref(), Some("Suspended"));
        assert_eq!(p.status.next_rotation_at, None);
        s.suspend = false;
        let p = plan(
            &object(s.clone(), &p.status, None),
            t("2026-03-01T00:00:00Z"),
        );
        assert!(
            matches!(
                p.action,
                Action::Start {
                    reason: StartReason::Scheduled,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
    }

    #[test]
    fn suspend_lets_a_running_rotation_finish() {
        let mut s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let st = record_started(p.status, RotatedKeyType::Tpk, "rot-1".into(), now);
        s.suspend = true;
        let p = plan(&object(s.clone(), &st, None), now);
        assert_eq!(
            p.action,
            Action::Follow {
                rotation_id: "rot-1".into()
            }
        );
        assert_eq!(p.status.phase.as_deref(), Some("Rotating"));
    }

    #[test]
    fn manual_trigger_starts_one_run_per_new_value() {
        let s = spec(every("720h"));
        let now = t("2026-01-10T00:00:00Z");
        let p = plan(
            &object(s.clone(), &KeyRotationStatus::default(), Some("2026-01-10")),
            now,
        );
        assert_eq!(
            p.action,
            Action::Start {
                key_type: RotatedKeyType::Tpk,
                reason: StartReason::Manual,
                idempotency_key: format!("{}-TPK", manual_run_id("2026-01-10", t(CREATED))),
            }
        );
        assert_eq!(p.status.last_rotate_now.as_deref(), Some("2026-01-10"));
        let (st, now) = rotate_one(&s, p.status, "m1", now);
        let (st, now) = rotate_one(&s, st, "m2", now);
        // Same value still on the object: nothing more starts; the schedule counts from the run.
        let p = plan(&object(s.clone(), &st, Some("2026-01-10")), now);
        assert_eq!(
            p.action,
            Action::Wait {
                until: t("2026-02-09T00:00:00Z")
            }
        );
        // A new value starts another run.
        let p = plan(&object(s, &p.status, Some("2026-01-10b")), now);
        assert!(
            matches!(
                p.action,
                Action::Start {
                    reason: StartReason::Manual,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
    }

    #[test]
    fn manual_trigger_value_never_reaches_the_idempotency_header_raw() {
        let s = spec(every("720h"));
        let value = "rotate\r\nX-Injected: 1 because auditors asked";
        let p = plan(
            &object(s, &KeyRotationStatus::default(), Some(value)),
            t("2026-01-10T00:00:00Z"),
        );
        let Action::Start {
            idempotency_key, ..
        } = &p.action
        else {
            panic!("expected Start, got {:?}", p.action)
        };
        assert!(
            idempotency_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{idempotency_key}"
        );
        assert_ne!(
            manual_run_id("a", t(CREATED)),
            manual_run_id("b", t(CREATED))
        );
        assert_ne!(
            manual_run_id("a", t(CREATED)),
            manual_run_id("a", t("2026-02-01T00:00:00Z")),
            "a value reused after another run is a new run"
        );
        assert_eq!(p.status.last_rotate_now.as_deref(), Some(value));
    }

    #[test]
    fn manual_start_retried_after_a_lost_status_write_keeps_its_key() {
        let s = spec(every("720h"));
        let st = KeyRotationStatus::default();
        let first = plan(
            &object(s.clone(), &st, Some("go")),
            t("2026-01-10T00:00:00Z"),
        );
        let again = plan(&object(s, &st, Some("go")), t("2026-01-10T00:03:00Z"));
        assert!(
            matches!(first.action, Action::Start { .. }),
            "{:?}",
            first.action
        );
        assert_eq!(again.action, first.action);
    }

    #[test]
    fn manual_trigger_during_a_healthy_run_starts_after_it() {
        let s = spec(every("720h"));
        let start = t("2026-01-31T00:00:00Z");
        let p = plan(
            &object(s.clone(), &KeyRotationStatus::default(), None),
            start,
        );
        let (st, now) = rotate_one(&s, p.status.clone(), "r1", start);
        let p2 = plan(&object(s.clone(), &st, Some("now")), now);
        assert!(
            matches!(
                p2.action,
                Action::Start {
                    key_type: RotatedKeyType::Tak,
                    reason: StartReason::Scheduled,
                    ..
                }
            ),
            "{:?}",
            p2.action
        );
        let (st, now) = rotate_one(&s, p2.status, "r2", now);
        // The finishing plan already ran; the next one sees the run done and the waiting trigger.
        let p3 = plan(&object(s, &st, Some("now")), now);
        assert_eq!(
            p3.action,
            Action::Start {
                key_type: RotatedKeyType::Tpk,
                reason: StartReason::Manual,
                idempotency_key: format!("{}-TPK", manual_run_id("now", start)),
            }
        );
    }

    #[test]
    fn manual_trigger_while_suspended_waits_for_resume() {
        let mut s = spec(every("720h"));
        s.suspend = true;
        let now = t("2026-01-02T00:00:00Z");
        let p = plan(
            &object(s.clone(), &KeyRotationStatus::default(), Some("x")),
            now,
        );
        assert_eq!(p.action, Action::Suspended);
        assert_eq!(p.status.last_rotate_now, None);
        s.suspend = false;
        let p = plan(&object(s, &p.status, Some("x")), now);
        assert!(
            matches!(
                p.action,
                Action::Start {
                    reason: StartReason::Manual,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
    }

    #[rstest]
    #[case::first(1, 5)]
    #[case::second(2, 10)]
    #[case::third(3, 20)]
    #[case::capped(12, 300)]
    fn switch_errors_back_off_exponentially(#[case] failures: i32, #[case] delay_secs: u64) {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let Action::Start {
            idempotency_key, ..
        } = p.action.clone()
        else {
            panic!("expected Start")
        };
        let mut st = p.status;
        for _ in 0..failures {
            st = record_failure(
                st,
                "failed to start rotation: connection refused",
                Some(1),
                now,
            );
        }
        assert_eq!(st.failed_attempts, failures);
        let until = add(now, std::time::Duration::from_secs(delay_secs));
        assert_eq!(st.next_retry_time, Some(Time(until)));
        assert_eq!(st.last_failure_time, Some(Time(now)));
        let p = plan(&object(s.clone(), &st, None), now);
        assert_eq!(p.action, Action::BackOff { until });
        let degraded = cond(&p.status, DEGRADED);
        assert_eq!(
            (degraded.status, degraded.reason.as_str()),
            (ConditionStatus::True, "SwitchError")
        );
        assert!(
            degraded.message.contains("connection refused"),
            "{}",
            degraded.message
        );
        assert_eq!(cond(&p.status, READY).status, ConditionStatus::False);
        // When the backoff is over the same start is retried with the same key.
        let p = plan(&object(s, &st, None), until);
        assert!(
            matches!(&p.action, Action::Start { idempotency_key: k, .. } if *k == idempotency_key),
            "{:?}",
            p.action
        );
    }

    #[test]
    fn manual_trigger_resets_the_backoff() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let p = plan(&object(s.clone(), &KeyRotationStatus::default(), None), now);
        let mut st = p.status;
        for _ in 0..6 {
            st = record_failure(st, "failed to start rotation: 503", Some(1), now);
        }
        let later = t("2026-01-31T00:01:00Z");
        assert!(matches!(
            plan(&object(s.clone(), &st, None), later).action,
            Action::BackOff { .. }
        ));
        let p = plan(&object(s, &st, Some("retry")), later);
        assert!(
            matches!(
                p.action,
                Action::Start {
                    key_type: RotatedKeyType::Tpk,
                    ..
                }
            ),
            "{:?}",
            p.action
        );
        assert_eq!(p.status.failed_attempts, 0);
        assert_eq!(p.status.next_retry_time, None);
        assert_eq!(p.status.last_rotate_now.as_deref(), Some("retry"));
    }

    #[test]
    fn a_successful_call_clears_the_failure_streak() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let st = record_started(
            KeyRotationStatus::default(),
            RotatedKeyType::Tpk,
            "r".into(),
            now,
        );
        let st = record_failure(st, "failed to read rotation: timeout", Some(1), now);
        let st = record_progress(&s, st, "r", totals(1, 1), t("2026-01-31T00:10:00Z"))
            .expect("progress");
        assert_eq!(st.failed_attempts, 0);
        let p = plan(&object(s, &st, None), t("2026-01-31T00:10:00Z"));
        assert_eq!(cond(&p.status, DEGRADED).status, ConditionStatus::False);
    }

    #[rstest]
    #[case::zero(0, 0)]
    #[case::two(2, 2)]
    #[case::ten(10, 3)]
    fn history_is_bounded_by_history_limit(#[case] limit: i32, #[case] kept: usize) {
        let mut s = spec(every("24h"));
        s.key_types = vec![RotatedKeyType::Tpk];
        s.history_limit = limit;
        let mut st = KeyRotationStatus::default();
        let mut now = t("2026-01-02T00:00:00Z");
        for i in 0..3 {
            (st, now) = rotate_one(&s, st, &format!("r{i}"), now);
            now = add(now, std::time::Duration::from_secs(86_400));
        }
        assert_eq!(st.history.len(), kept);
        assert_eq!(st.last_rotation.map(|r| r.id).as_deref(), Some("r2"));
    }

    #[rstest]
    #[case::bad_cron(cron("0 3 * *"), "spec.schedule.cron")]
    #[case::bad_every(every("0s"), "spec.schedule.every")]
    #[case::never_matches(cron("0 0 30 2 *"), "spec.schedule.cron")]
    fn an_unschedulable_spec_is_a_condition_not_a_crash(
        #[case] schedule: RotationSchedule,
        #[case] field: &str,
    ) {
        let p = plan(
            &object(spec(schedule), &KeyRotationStatus::default(), None),
            t("2026-01-02T00:00:00Z"),
        );
        let Action::InvalidSpec { message } = &p.action else {
            panic!("expected InvalidSpec, got {:?}", p.action)
        };
        assert!(message.contains(field), "{message}");
        assert_eq!(p.status.phase.as_deref(), Some("Failed"));
        let degraded = cond(&p.status, DEGRADED);
        assert_eq!(
            (degraded.reason.as_str(), degraded.message.as_str()),
            ("InvalidSpec", message.as_str())
        );
    }

    #[test]
    fn progress_for_another_rotation_is_refused() {
        let s = spec(every("720h"));
        let now = t("2026-01-31T00:00:00Z");
        let st = record_started(
            KeyRotationStatus::default(),
            RotatedKeyType::Tpk,
            "r1".into(),
            now,
        );
        assert_eq!(
            record_progress(&s, st, "r0", totals(0, 1), now),
            Err(PlanError::NotCurrent("r0".into()))
        );
    }

    #[test]
    fn condition_transition_time_is_kept_while_waiting() {
        let s = spec(every("720h"));
        let p = plan(
            &object(s.clone(), &KeyRotationStatus::default(), None),
            t("2026-01-02T00:00:00Z"),
        );
        let p2 = plan(&object(s, &p.status, None), t("2026-01-03T00:00:00Z"));
        assert_eq!(p2.status, p.status, "a steady state writes nothing new");
    }
}
