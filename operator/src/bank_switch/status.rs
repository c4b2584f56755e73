//! Status of a BankSwitch from what reconcile observed; pure, plus the one status write.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::json;

use super::build::{ADMIN_PORT, FIELD_MANAGER, METRICS_PORT, component, names, selector_labels};
use super::dereference::SafStats;
use super::hibernation::{self, Step};
use super::scaling::ScalingDecision;
use super::validate::{StorageMode, ValidatedBankSwitch};
use crate::crd::bank_switch::{
    BankSwitch, BankSwitchStatus, EndpointsStatus, RetryStatus, StoreAndForwardStatus,
};
use crate::crd::condition::{
    self, ConditionStatus, DATABASE_MIGRATED, DEGRADED, DesiredCondition, MONITORING_CONFIGURED,
    PROGRESSING, READY, merge_conditions,
};

/// Where the database migration for the current spec stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationState {
    /// Embedded SQLite: `serve --migrate` migrates on start.
    OnStart,
    /// The Job was just created or is running.
    Running {
        /// Job name.
        job: String,
    },
    /// The Job succeeded; the switch Deployment may roll.
    Succeeded {
        /// Job name.
        job: String,
    },
    /// The Job failed; the switch Deployment is left as it was.
    Failed {
        /// Job name.
        job: String,
        /// The Job's failure message.
        message: String,
    },
}

impl MigrationState {
    /// Reads a Job's outcome from its status conditions.
    pub fn from_job(job: &Job) -> Self {
        let name = job.metadata.name.clone().unwrap_or_default();
        let conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let holds = |t: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == t && c.status == "True")
        };
        if holds("Complete").is_some() {
            Self::Succeeded { job: name }
        } else if let Some(failed) = holds("Failed") {
            Self::Failed {
                job: name,
                message: failed
                    .message
                    .clone()
                    .or_else(|| failed.reason.clone())
                    .unwrap_or_else(|| "the Job failed".into()),
            }
        } else {
            Self::Running { job: name }
        }
    }

    /// Whether the switch Deployment may be applied.
    pub fn allows_rollout(&self) -> bool {
        matches!(self, Self::OnStart | Self::Succeeded { .. })
    }
}

/// Whether monitoring objects are where the spec wants them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MonitoringState {
    /// Nothing requested.
    NotRequested,
    /// Requested and applied.
    Applied,
    /// Requested, but the cluster does not serve monitoring.coreos.com/v1.
    ApiNotServed,
}

/// What reconcile saw, for [`compute_status`].
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The validated BankSwitch.
    pub bs: &'a ValidatedBankSwitch,
    /// Switch Deployment as in the cluster (after any apply).
    pub switch_deployment: Option<&'a Deployment>,
    /// Migration outcome.
    pub migration: MigrationState,
    /// Monitoring outcome.
    pub monitoring: MonitoringState,
    /// SAF figures and the scaling decision, when drainers are managed.
    pub saf: Option<(Option<SafStats>, ScalingDecision)>,
    /// Image whose migration succeeded before (carried over).
    pub migrated_image: Option<String>,
    /// A switch container that keeps failing, from [`crash_report`].
    pub crash: Option<String>,
    /// Where `spec.hibernation` stands this reconcile.
    pub hibernation: Step,
}

/// Computes the next status; conditions keep their transition time when unchanged.
pub fn compute_status(
    previous: Option<&BankSwitchStatus>,
    observed: &Observed<'_>,
    now: &Time,
) -> BankSwitchStatus {
    let bs = observed.bs;
    let spec = &bs.spec;
    let dep_status = observed.switch_deployment.and_then(|d| d.status.as_ref());
    let replicas = dep_status.and_then(|s| s.replicas).unwrap_or(0);
    let ready = dep_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = dep_status.and_then(|s| s.updated_replicas).unwrap_or(0);
    let dep_generation_seen = observed.switch_deployment.is_some_and(|d| {
        d.metadata.generation.unwrap_or(0)
            <= dep_status.and_then(|s| s.observed_generation).unwrap_or(0)
    });
    let deadline_exceeded = dep_status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
        });
    let wanted = if observed.hibernation.scaled_to_zero() {
        0
    } else if bs.storage_mode == StorageMode::EmbeddedSqlite {
        spec.replicas.min(1)
    } else {
        spec.replicas
    };

    let migrated = match &observed.migration {
        MigrationState::OnStart => DesiredCondition::new(
            DATABASE_MIGRATED,
            true,
            "MigratesOnStart",
            "embedded SQLite: the switch applies migrations when it starts (serve --migrate)",
        ),
        MigrationState::Succeeded { job } => DesiredCondition::new(
            DATABASE_MIGRATED,
            true,
            "MigrationSucceeded",
            format!("migration Job {job} succeeded for image {}", spec.image),
        ),
        MigrationState::Running { job } => DesiredCondition::new(
            DATABASE_MIGRATED,
            false,
            "MigrationRunning",
            format!("migration Job {job} is running; pods roll when it succeeds"),
        ),
        MigrationState::Failed { job, message } => DesiredCondition::new(
            DATABASE_MIGRATED,
            false,
            "MigrationFailed",
            format!(
                "migration Job {job} failed: {message}. Pods keep the previous image; fix the \
                 cause (see `kubectl logs job/{job}`) and delete the Job to retry"
            ),
        ),
    };

    let monitoring = match observed.monitoring {
        MonitoringState::NotRequested => DesiredCondition::new(
            MONITORING_CONFIGURED,
            true,
            "NotRequested",
            "spec.monitoring requests no ServiceMonitor or PrometheusRule",
        ),
        MonitoringState::Applied => DesiredCondition::new(
            MONITORING_CONFIGURED,
            true,
            "Applied",
            "ServiceMonitor/PrometheusRule applied",
        ),
        MonitoringState::ApiNotServed => DesiredCondition::new(
            MONITORING_CONFIGURED,
            false,
            "MonitoringApiNotServed",
            "monitoring.coreos.com/v1 is not served in this cluster: install the Prometheus \
             Operator CRDs or disable spec.monitoring",
        ),
    };

    let degraded = if let MigrationState::Failed { .. } = observed.migration {
        DesiredCondition::new(DEGRADED, true, "MigrationFailed", migrated.message.clone())
    } else if let Some(crash) = &observed.crash {
        DesiredCondition::new(DEGRADED, true, "SwitchFailing", crash.clone())
    } else if deadline_exceeded {
        DesiredCondition::new(
            DEGRADED,
            true,
            "RolloutStuck",
            "the switch Deployment exceeded its progress deadline; check `kubectl describe` of \
             its pods (image, Secrets, probes)",
        )
    } else {
        DesiredCondition::new(DEGRADED, false, "AsExpected", "")
    };

    let rolling = matches!(observed.migration, MigrationState::Running { .. })
        || !dep_generation_seen
        || updated < wanted
        || replicas > wanted;
    let progressing = if spec.paused {
        DesiredCondition::new(
            PROGRESSING,
            false,
            "Paused",
            "spec.paused is true: no changes are applied",
        )
    } else if matches!(observed.migration, MigrationState::Failed { .. }) {
        DesiredCondition::new(
            PROGRESSING,
            false,
            "MigrationFailed",
            "rollout held until the migration succeeds",
        )
    } else if rolling {
        DesiredCondition::new(
            PROGRESSING,
            true,
            "RollingOut",
            format!("{updated}/{wanted} switch pods updated"),
        )
    } else {
        DesiredCondition::new(
            PROGRESSING,
            false,
            "Complete",
            "the switch runs the current spec",
        )
    };

    let all_ready = ready >= wanted
        && wanted > 0
        && degraded.status == ConditionStatus::False
        && matches!(observed.hibernation, Step::Awake | Step::Waking { .. });
    let mut ready_message = format!("{ready}/{wanted} switch pods ready");
    if bs.storage_mode == StorageMode::EmbeddedSqlite {
        ready_message.push_str("; embedded SQLite mode, not for production (set spec.database)");
    }
    // Ready comes first and its reason is the `Status` printer column: when something is
    // degraded, say what (MigrationFailed, RolloutStuck, …) rather than only "not ready".
    // hibernation says why no pod is ready, unless something is broken besides
    let hibernating_reason = match &observed.hibernation {
        Step::Draining(h) => {
            ready_message = format!("{ready_message}; hibernating: {}", h.message);
            Some(hibernation::HIBERNATING)
        }
        Step::Hibernated { status, .. } => {
            ready_message = format!("hibernated (spec.hibernation): {}", status.message);
            Some("Hibernated")
        }
        Step::Awake | Step::Waking { .. } => None,
    };
    let ready_reason = if let Some(reason) = hibernating_reason
        && degraded.status == ConditionStatus::False
    {
        reason.to_owned()
    } else if all_ready {
        "AllReplicasReady".to_owned()
    } else if degraded.status == ConditionStatus::True {
        degraded.reason.clone()
    } else {
        "ReplicasNotReady".to_owned()
    };
    let ready_cond = DesiredCondition::new(READY, all_ready, ready_reason, ready_message);

    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let mut desired = vec![ready_cond, progressing, degraded, migrated, monitoring];
    if let Some(c) = hibernated_condition(
        &observed.hibernation,
        condition::find(previous_conditions, hibernation::HIBERNATED),
        spec.replicas,
    ) {
        desired.push(c);
    }
    let conditions = merge_conditions(previous_conditions, desired, bs.generation, now);

    let store_and_forward = observed.saf.as_ref().map(|(stats, decision)| {
        // Keep the last known figures when the switch did not answer.
        let last = previous
            .and_then(|p| p.store_and_forward.clone())
            .unwrap_or_default();
        // the switch counts in u64; status (and kubectl's integer columns) in i64
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (backlog, in_flight, oldest_age_seconds, dead_letters) = match stats {
            Some(s) => (
                count(s.backlog),
                count(s.in_flight),
                count(s.oldest_age_seconds),
                count(s.dead_letters),
            ),
            None => (
                last.backlog,
                last.in_flight,
                last.oldest_age_seconds,
                last.dead_letters,
            ),
        };
        StoreAndForwardStatus {
            backlog,
            in_flight,
            oldest_age_seconds,
            dead_letters,
            drainer_replicas: decision.replicas,
            scaling_reason: decision.reason.to_string(),
        }
    });

    let migrated_image = match &observed.migration {
        MigrationState::Succeeded { .. } => Some(spec.image.clone()),
        _ => observed.migrated_image.clone(),
    };

    BankSwitchStatus {
        observed_generation: bs.generation,
        conditions,
        replicas,
        ready_replicas: ready,
        ready: format!("{ready}/{wanted}"),
        selector: pod_selector(bs),
        endpoints: Some(endpoints(bs)),
        store_and_forward,
        migrated_image,
        retry: None,
        hibernation: observed.hibernation.status(),
    }
}

/// `Hibernated`: present once a hibernation was ever asked for (then it stays, False with
/// `Resumed` after the wake-up, so `kubectl get` shows the last one).
fn hibernated_condition(
    step: &Step,
    previous: Option<&crate::crd::condition::Condition>,
    spec_replicas: i32,
) -> Option<DesiredCondition> {
    Some(match step {
        Step::Draining(h) => DesiredCondition::new(
            hibernation::HIBERNATED,
            false,
            hibernation::HIBERNATING,
            h.message.clone(),
        ),
        Step::Hibernated { status, reason } => DesiredCondition::new(
            hibernation::HIBERNATED,
            true,
            *reason,
            status.message.clone(),
        ),
        Step::Waking { previous } => DesiredCondition::new(
            hibernation::HIBERNATED,
            false,
            hibernation::RESUMED,
            format!(
                "hibernation ended: {spec_replicas} switch replica(s) (spec.replicas; {} before) and {} drainer(s) restored",
                previous.previous_replicas, previous.previous_drainer_replicas
            ),
        ),
        Step::Awake => {
            let old = previous?;
            DesiredCondition::new(
                hibernation::HIBERNATED,
                old.status,
                old.reason.clone(),
                old.message.clone(),
            )
        }
    })
}

/// Longest termination message quoted in a condition.
const MAX_TERMINATION_MESSAGE: usize = 1024;

/// The first switch container (pod order) that is not running after it exited non-zero, with its
/// last termination message: the switch writes why it refused to start (a malformed LMK or
/// tokens file, an unreachable database) and `terminationMessagePolicy:
/// FallbackToLogsOnError` puts the last log lines there when it could not.
pub fn crash_report(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        statuses.iter().find_map(|c| {
            if c.ready || c.state.as_ref().is_some_and(|s| s.running.is_some()) {
                return None;
            }
            let last = c.last_state.as_ref()?.terminated.as_ref()?;
            if last.exit_code == 0 {
                return None;
            }
            let mut message = last
                .message
                .as_deref()
                .unwrap_or("")
                .trim()
                .replace('\n', " | ");
            if message.len() > MAX_TERMINATION_MESSAGE {
                let mut cut = MAX_TERMINATION_MESSAGE;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push('…');
            }
            Some(format!(
                "container {} of pod {name} exited with code {} ({} restarts): {}",
                c.name,
                last.exit_code,
                c.restart_count,
                if message.is_empty() {
                    "no termination message"
                } else {
                    &message
                }
            ))
        })
    })
}

/// The switch pods' label selector as a string, for the scale subresource.
pub fn pod_selector(bs: &ValidatedBankSwitch) -> String {
    selector_labels(bs, component::SWITCH)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// In-cluster addresses of the switch Services.
pub fn endpoints(bs: &ValidatedBankSwitch) -> EndpointsStatus {
    let host = |svc: String| format!("{svc}.{}.svc", bs.namespace);
    EndpointsStatus {
        iso8583: format!(
            "{}:{}",
            host(names::iso_service(&bs.name)),
            bs.spec.iso8583.port
        ),
        admin: format!(
            "http://{}:{ADMIN_PORT}",
            host(names::admin_service(&bs.name))
        ),
        metrics: format!(
            "http://{}:{METRICS_PORT}",
            host(names::admin_service(&bs.name))
        ),
    }
}

/// Status for a spec that cannot work: Degraded with the reason, nothing else changes.
pub fn invalid_spec_status(
    previous: Option<&BankSwitchStatus>,
    generation: Option<i64>,
    message: &str,
    now: &Time,
) -> BankSwitchStatus {
    blocked_status(previous, generation, "InvalidSpec", message, now)
}

/// Status while the operator refuses to act (`reason`: InvalidSpec, SecretNotFound,
/// SecretKeyMissing): Ready false and Degraded true with the reason, Progressing false, the
/// other conditions and figures as they were.
pub fn blocked_status(
    previous: Option<&BankSwitchStatus>,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: &Time,
) -> BankSwitchStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let prev = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let waiting = match reason {
        "InvalidSpec" => "waiting for a spec change",
        "CertManagerApiNotServed" => "waiting for cert-manager or a spec change",
        "CertificateNotIssued" => "waiting for cert-manager to issue the certificate",
        _ => "waiting for the referenced Secret",
    };
    let mut desired = vec![
        DesiredCondition::new(READY, false, reason, message),
        DesiredCondition::new(PROGRESSING, false, reason, waiting),
        DesiredCondition::new(DEGRADED, true, reason, message),
    ];
    // Keep the other conditions as they were: nothing was done to change them.
    for kept in [DATABASE_MIGRATED, MONITORING_CONFIGURED] {
        if let Some(c) = condition::find(prev, kept) {
            desired.push(DesiredCondition {
                type_: kept,
                status: c.status,
                reason: c.reason.clone(),
                message: c.message.clone(),
            });
        }
    }
    status.conditions = merge_conditions(prev, desired, generation, now);
    status.observed_generation = generation;
    status.retry = None;
    status
}

/// Adds retry bookkeeping to a status after a failed reconcile.
pub fn with_retry(
    mut status: BankSwitchStatus,
    last_failure: String,
    failed_attempts: i32,
    next_retry: &Time,
) -> BankSwitchStatus {
    status.retry = Some(RetryStatus {
        last_failure,
        failed_attempts,
        next_retry_time: Some(next_retry.0.to_string()),
    });
    status
}

/// Writes status with server-side apply (so removed fields disappear) when it differs from
/// what the object already shows; returns whether it wrote.
pub async fn write_status(
    api: &Api<BankSwitch>,
    bs: &BankSwitch,
    status: &BankSwitchStatus,
) -> Result<bool, kube::Error> {
    if bs.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let name = bs.meta().name.clone().unwrap_or_default();
    let body = json!({
        "apiVersion": BankSwitch::api_version(&()),
        "kind": BankSwitch::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank_switch::scaling::ScalingReason;
    use crate::bank_switch::validate::validate;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn validated(replicas: i32, database: bool) -> ValidatedBankSwitch {
        let mut yaml = format!(
            "apiVersion: switchyard.io/v1alpha1\nkind: BankSwitch\nmetadata: {{name: atm, namespace: ns, generation: 4}}\n\
             spec:\n  image: img:1\n  replicas: {replicas}\n  keys: {{lmkSecretRef: {{name: k, key: l}}, kekSecretRef: {{name: k, key: k}}}}\n  \
             admin: {{tokenSecretRef: {{name: a, key: t}}}}\n"
        );
        if database {
            yaml.push_str("  database: {urlSecretRef: {name: db, key: url}}\n");
        }
        validate(&serde_yaml::from_str(&yaml).expect("parses")).expect("valid")
    }

    fn deployment(replicas: i32, ready: i32, stuck: bool) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta {
                generation: Some(2),
                ..Default::default()
            },
            spec: None,
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                updated_replicas: Some(replicas),
                conditions: stuck.then(|| {
                    vec![DeploymentCondition {
                        type_: "Progressing".into(),
                        status: "False".into(),
                        reason: Some("ProgressDeadlineExceeded".into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).expect("valid"))
    }

    fn cond<'a>(s: &'a BankSwitchStatus, t: &str) -> &'a condition::Condition {
        condition::find(&s.conditions, t).expect("condition present")
    }

    #[test]
    fn all_ready_is_ready_and_not_progressing() {
        let bs = validated(3, true);
        let dep = deployment(3, 3, false);
        let observed = Observed {
            bs: &bs,
            switch_deployment: Some(&dep),
            migration: MigrationState::Succeeded { job: "j".into() },
            monitoring: MonitoringState::NotRequested,
            saf: None,
            migrated_image: None,
            crash: None,
            hibernation: Step::Awake,
        };
        let s = compute_status(None, &observed, &now());
        assert_eq!(cond(&s, READY).status, ConditionStatus::True);
        assert_eq!(cond(&s, PROGRESSING).reason, "Complete");
        assert_eq!(cond(&s, DEGRADED).status, ConditionStatus::False);
        assert_eq!((s.replicas, s.ready_replicas), (3, 3));
        assert_eq!(s.migrated_image.as_deref(), Some("img:1"));
        assert_eq!(s.observed_generation, Some(4));
    }

    #[test]
    fn stuck_rollout_is_degraded_and_not_ready() {
        let bs = validated(3, true);
        let dep = deployment(3, 1, true);
        let observed = Observed {
            bs: &bs,
            switch_deployment: Some(&dep),
            migration: MigrationState::Succeeded { job: "j".into() },
            monitoring: MonitoringState::NotRequested,
            saf: None,
            migrated_image: None,
            crash: None,
            hibernation: Step::Awake,
        };
        let s = compute_status(None, &observed, &now());
        assert_eq!(cond(&s, DEGRADED).reason, "RolloutStuck");
        assert_eq!(cond(&s, READY).status, ConditionStatus::False);
    }

    #[test]
    fn unreachable_switch_keeps_the_last_known_saf_figures() {
        let bs = validated(2, true);
        let dep = deployment(2, 2, false);
        let previous = BankSwitchStatus {
            store_and_forward: Some(StoreAndForwardStatus {
                backlog: 70,
                dead_letters: 2,
                drainer_replicas: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let decision = ScalingDecision {
            replicas: 1,
            reason: ScalingReason::SwitchUnreachable("timeout".into()),
        };
        let observed = Observed {
            bs: &bs,
            switch_deployment: Some(&dep),
            migration: MigrationState::Succeeded { job: "j".into() },
            monitoring: MonitoringState::NotRequested,
            saf: Some((None, decision)),
            migrated_image: None,
            crash: None,
            hibernation: Step::Awake,
        };
        let s = compute_status(Some(&previous), &observed, &now());
        let saf = s.store_and_forward.expect("saf");
        assert_eq!(
            (saf.backlog, saf.dead_letters, saf.drainer_replicas),
            (70, 2, 1)
        );
        assert!(saf.scaling_reason.contains("timeout"));
    }

    #[test]
    fn job_outcome_is_read_from_its_conditions() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m"},
            "status": {"conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}
        }))
        .expect("job");
        assert_eq!(
            MigrationState::from_job(&job),
            MigrationState::Failed {
                job: "m".into(),
                message: "boom".into()
            }
        );
        let running: Job =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "m"}})).expect("job");
        assert!(!MigrationState::from_job(&running).allows_rollout());
    }
}
