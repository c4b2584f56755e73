//! `spec.hibernation`: SAF-aware maintenance of a BankSwitch.
//!
//! Enabled, the operator asks every switch pod to hibernate (`POST /v1/maintenance/hibernate`,
//! each pod directly: a hibernating pod is not ready, so its Service no longer routes to it),
//! and polls their state. The pods stop accepting, finish in-flight transactions, close the
//! sessions, and wait while the drainers (still running) deliver the SAF backlog. Once every pod
//! is `drained` — or the drain timeout passed — the switch and drainer Deployments go to zero
//! replicas and condition `Hibernated` is True (reason `Drained`, or `DrainTimedOut` with the
//! backlog left). Disabled again, the replicas come back (`spec.replicas` for the switch, the
//! remembered drainer count) and `Hibernated` is False (`Resumed`); a drain still in progress is
//! called off on the pods (`POST /v1/maintenance/resume`).
//!
//! [`decide`] is pure; [`observe`] does the calls.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ListParams};

use super::build::DesiredObjects;
use super::validate::ValidatedBankSwitch;
use crate::crd::bank_switch::{HibernationPhase, HibernationStatus};
use crate::switch_admin::{
    BearerToken, HibernateRequest, MaintenanceState, MaintenanceStatus, SwitchAdmin,
    SwitchAdminError, TokenFormat, read_token,
};

/// Condition type.
pub const HIBERNATED: &str = "Hibernated";
/// `Hibernated` reason: every pod drained before the timeout.
pub const DRAINED: &str = "Drained";
/// `Hibernated` reason: scaled to zero at the timeout with work left (the message says what).
pub const DRAIN_TIMED_OUT: &str = "DrainTimedOut";
/// `Hibernated=False` and Ready reason while the pods drain.
pub const HIBERNATING: &str = "Hibernating";
/// `Hibernated=False` reason once the replicas are restored.
pub const RESUMED: &str = "Resumed";
/// How often a draining BankSwitch is looked at again.
pub const DRAIN_POLL: Duration = Duration::from_secs(5);
/// Slack after the drain timeout for pods that do not answer at all (the pods report
/// `timedOut` themselves at the deadline; this is for a pod that cannot be reached).
pub const UNREACHABLE_SLACK: Duration = Duration::from_secs(30);

/// One switch pod to call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchPod {
    /// Pod name.
    pub name: String,
    /// Pod IP (a pod without one yet cannot be asked).
    pub ip: Option<IpAddr>,
}

/// What one pod said (or why it could not be asked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReport {
    /// Pod name.
    pub pod: String,
    /// Its maintenance state, or the error.
    pub result: Result<MaintenanceStatus, String>,
}

/// How the operator reaches the switch pods' maintenance API; a trait so reconcile tests can
/// point it at a fake switch.
#[async_trait]
pub trait MaintenanceSource: Send + Sync {
    /// Asks `pod` to hibernate (unless it already does) with `drain_timeout` and returns its
    /// state.
    async fn hibernate(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
        pod: &SwitchPod,
        drain_timeout: Duration,
    ) -> Result<MaintenanceStatus, SwitchAdminError>;

    /// Asks `pod` to serve again.
    async fn resume(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
        pod: &SwitchPod,
    ) -> Result<MaintenanceStatus, SwitchAdminError>;
}

/// The real source: the switch admin API of each pod, with the admin token.
#[derive(Clone, Debug)]
pub struct HttpMaintenance {
    admin: SwitchAdmin,
}

impl HttpMaintenance {
    /// Calls through `admin` (shared with the other controllers).
    pub fn new(admin: SwitchAdmin) -> Self {
        Self { admin }
    }

    async fn access(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
        pod: &SwitchPod,
    ) -> Result<(crate::switch_admin::AdminTarget, BearerToken), SwitchAdminError> {
        // writes need the `admin` role; the tokens file is the only place one is configured
        let token = read_token(
            client,
            &bs.namespace,
            &bs.name,
            &bs.spec.admin.token_secret_ref,
            TokenFormat::TokensFile { role: "admin" },
        )
        .await?;
        let ip = pod.ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let target = self
            .admin
            .pod_target(client, &bs.namespace, &bs.name, &bs.spec, ip)
            .await?;
        Ok((target, token))
    }
}

#[async_trait]
impl MaintenanceSource for HttpMaintenance {
    async fn hibernate(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
        pod: &SwitchPod,
        drain_timeout: Duration,
    ) -> Result<MaintenanceStatus, SwitchAdminError> {
        let (target, token) = self.access(client, bs, pod).await?;
        // a GET first: repeated POSTs would be audited as writes on every poll
        let now = self.admin.maintenance(&target, &token).await?;
        if now.state != MaintenanceState::Serving {
            return Ok(now);
        }
        let body = HibernateRequest {
            drain_timeout_seconds: drain_timeout.as_secs().max(1),
        };
        self.admin.hibernate(&target, &token, &body).await
    }

    async fn resume(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
        pod: &SwitchPod,
    ) -> Result<MaintenanceStatus, SwitchAdminError> {
        let (target, token) = self.access(client, bs, pod).await?;
        self.admin.resume(&target, &token).await
    }
}

/// What to do about hibernation in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not asked for, nothing to undo.
    Awake,
    /// The pods drain; replicas stay; look again after [`DRAIN_POLL`].
    Draining(HibernationStatus),
    /// Scale switch and drainers to zero; `reason` is [`DRAINED`] or [`DRAIN_TIMED_OUT`].
    Hibernated {
        /// The status to record.
        status: HibernationStatus,
        /// `Hibernated` condition reason.
        reason: &'static str,
    },
    /// Turned off: restore the replicas remembered in `previous`.
    Waking {
        /// The hibernation that ends.
        previous: HibernationStatus,
    },
}

impl Step {
    /// Whether the Deployments go to zero replicas.
    pub fn scaled_to_zero(&self) -> bool {
        matches!(self, Self::Hibernated { .. })
    }

    /// The `status.hibernation` to write.
    pub fn status(&self) -> Option<HibernationStatus> {
        match self {
            Self::Draining(s) | Self::Hibernated { status: s, .. } => Some(s.clone()),
            Self::Awake | Self::Waking { .. } => None,
        }
    }
}

/// Replicas observed before a hibernation starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObservedReplicas {
    /// The switch Deployment's `spec.replicas`.
    pub switch: i32,
    /// The drainer Deployment's `spec.replicas` (0 without one).
    pub drainers: i32,
}

fn rfc3339(t: Timestamp) -> String {
    t.to_string()
}

/// The next hibernation step (pure). `reports` are the pods' answers this reconcile (asked only
/// while draining); `now` is the reconcile time.
pub fn decide(
    enabled: bool,
    drain_timeout: Duration,
    previous: Option<&HibernationStatus>,
    reports: &[PodReport],
    observed: ObservedReplicas,
    now: Timestamp,
) -> Step {
    let previous = previous.cloned();
    match (enabled, previous) {
        (false, None) => Step::Awake,
        (false, Some(previous)) => Step::Waking { previous },
        (true, Some(s)) if s.phase == HibernationPhase::Hibernated => carried(Some(&s)),
        (true, previous) => {
            let started_at = previous
                .as_ref()
                .map(|p| p.started_at.clone())
                .unwrap_or_else(|| rfc3339(now));
            let started: Timestamp = started_at.parse().unwrap_or(now);
            let (previous_replicas, previous_drainer_replicas) = match &previous {
                Some(p) => (p.previous_replicas, p.previous_drainer_replicas),
                None => (observed.switch, observed.drainers),
            };
            let elapsed = now.duration_since(started);
            let timeout = SignedDuration::try_from(drain_timeout).unwrap_or(SignedDuration::MAX);
            let slack = SignedDuration::try_from(UNREACHABLE_SLACK).unwrap_or(SignedDuration::ZERO);
            let backlog = reports
                .iter()
                .filter_map(|r| r.result.as_ref().ok())
                .map(|s| i64::try_from(s.saf_backlog).unwrap_or(i64::MAX))
                .max()
                .or_else(|| previous.as_ref().map(|p| p.saf_backlog))
                .unwrap_or(0);
            let state_of = |r: &PodReport| r.result.as_ref().ok().map(|s| s.state);
            let all_drained = reports
                .iter()
                .all(|r| state_of(r) == Some(MaintenanceState::Drained));
            let all_settled = reports.iter().all(|r| {
                matches!(
                    state_of(r),
                    Some(MaintenanceState::Drained | MaintenanceState::TimedOut)
                )
            });
            let pending: Vec<String> = reports
                .iter()
                .filter(|r| state_of(r) != Some(MaintenanceState::Drained))
                .map(|r| match &r.result {
                    Ok(s) => format!("{}: {}", r.pod, s.message),
                    Err(e) => format!("{}: {e}", r.pod),
                })
                .collect();
            let status = |phase, reason: &str, message: String| HibernationStatus {
                phase,
                started_at: started_at.clone(),
                previous_replicas,
                previous_drainer_replicas,
                reason: reason.to_owned(),
                saf_backlog: backlog,
                message,
            };
            if all_drained {
                let message = if reports.is_empty() {
                    "drained: no switch pod was running".to_owned()
                } else {
                    format!(
                        "drained: {} switch pod(s) finished their work and the SAF backlog is zero",
                        reports.len()
                    )
                };
                return Step::Hibernated {
                    status: status(HibernationPhase::Hibernated, DRAINED, message),
                    reason: DRAINED,
                };
            }
            let timed_out =
                (elapsed >= timeout && all_settled) || elapsed >= timeout.saturating_add(slack);
            if timed_out {
                return Step::Hibernated {
                    status: status(
                        HibernationPhase::Hibernated,
                        DRAIN_TIMED_OUT,
                        format!(
                            "drain timed out after {}; scaled to zero with {backlog} SAF advice(s) left (delivered when the drainers run again); {}",
                            humanize(drain_timeout),
                            pending.join("; ")
                        ),
                    ),
                    reason: DRAIN_TIMED_OUT,
                };
            }
            Step::Draining(status(
                HibernationPhase::Draining,
                "",
                format!("draining: {}", pending.join("; ")),
            ))
        }
    }
}

/// The step a reconcile that may not act (paused) reports: the recorded hibernation as it is.
pub fn carried(previous: Option<&HibernationStatus>) -> Step {
    match previous {
        None => Step::Awake,
        Some(s) if s.phase == HibernationPhase::Hibernated => Step::Hibernated {
            status: s.clone(),
            reason: if s.reason == DRAIN_TIMED_OUT {
                DRAIN_TIMED_OUT
            } else {
                DRAINED
            },
        },
        Some(s) => Step::Draining(s.clone()),
    }
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Scales what `desired` holds to zero: the switch and drainer Deployments (the drainer's
/// replicas are set even under an external autoscaler, which must be paused meanwhile).
pub fn scale_to_zero(desired: &mut DesiredObjects) {
    set_replicas(&mut desired.switch_deployment, 0);
    if let Some(drainer) = desired.drainer_deployment.as_mut() {
        set_replicas(drainer, 0);
    }
}

/// On wake: the drainers come back with at least the replicas they had before (an external
/// autoscaler cannot scale up from zero by itself; the operator's scaler takes over from there).
pub fn restore_drainers(desired: &mut DesiredObjects, previous: &HibernationStatus) {
    if let Some(drainer) = desired.drainer_deployment.as_mut() {
        let now = drainer.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        set_replicas(drainer, now.max(previous.previous_drainer_replicas));
    }
}

fn set_replicas(deployment: &mut Deployment, replicas: i32) {
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
}

/// The switch pods of `bs` (by the Deployment's selector).
pub async fn switch_pods(
    client: &Client,
    bs: &ValidatedBankSwitch,
) -> Result<Vec<SwitchPod>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &bs.namespace);
    let list = pods
        .list(&ListParams::default().labels(&super::status::pod_selector(bs)))
        .await?;
    Ok(list
        .items
        .into_iter()
        // a pod on its way out has nothing to drain any more
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| SwitchPod {
            name: p.metadata.name.clone().unwrap_or_default(),
            ip: p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
        })
        .collect())
}

/// Asks every pod to hibernate and collects their answers.
pub async fn observe(
    source: &dyn MaintenanceSource,
    client: &Client,
    bs: &ValidatedBankSwitch,
    pods: &[SwitchPod],
    remaining: Duration,
) -> Vec<PodReport> {
    let mut reports = Vec::with_capacity(pods.len());
    for pod in pods {
        let result = if pod.ip.is_none() {
            Err("no pod IP yet".to_owned())
        } else {
            source
                .hibernate(client, bs, pod, remaining)
                .await
                .map_err(|e| crate::events::error_chain(&e))
        };
        reports.push(PodReport {
            pod: pod.name.clone(),
            result,
        });
    }
    reports
}

/// The drain time left for a hibernation that started at `started_at` (the full timeout when it
/// starts now), at least a second.
pub fn remaining(
    previous: Option<&HibernationStatus>,
    drain_timeout: Duration,
    now: Timestamp,
) -> Duration {
    let Some(started) = previous.and_then(|p| p.started_at.parse::<Timestamp>().ok()) else {
        return drain_timeout;
    };
    let elapsed = Duration::try_from(now.duration_since(started)).unwrap_or_default();
    drain_timeout
        .saturating_sub(elapsed)
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn pod(name: &str, state: MaintenanceState, backlog: u64) -> PodReport {
        PodReport {
            pod: name.into(),
            result: Ok(MaintenanceStatus {
                state,
                accepting_connections: false,
                requested_at: None,
                drain_deadline: None,
                in_flight: 0,
                signed_on: 0,
                held_reversals: 0,
                saf_backlog: backlog,
                saf_dead_letters: 0,
                message: format!("{} with {backlog}", state.as_str()),
            }),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(600);
    const OBSERVED: ObservedReplicas = ObservedReplicas {
        switch: 3,
        drainers: 2,
    };

    #[test]
    fn enabling_starts_draining_and_remembers_the_replicas() {
        let now = t("2026-01-01T00:00:00Z");
        let step = decide(
            true,
            TIMEOUT,
            None,
            &[pod("a", MaintenanceState::Draining, 5)],
            OBSERVED,
            now,
        );
        let Step::Draining(s) = step else {
            panic!("{step:?}")
        };
        assert_eq!(s.phase, HibernationPhase::Draining);
        assert_eq!((s.previous_replicas, s.previous_drainer_replicas), (3, 2));
        assert_eq!(s.started_at, "2026-01-01T00:00:00Z");
        assert_eq!(s.saf_backlog, 5);
    }

    #[test]
    fn every_pod_drained_scales_to_zero() {
        let previous = HibernationStatus {
            phase: HibernationPhase::Draining,
            started_at: "2026-01-01T00:00:00Z".into(),
            previous_replicas: 3,
            previous_drainer_replicas: 2,
            reason: String::new(),
            saf_backlog: 5,
            message: String::new(),
        };
        let reports = [
            pod("a", MaintenanceState::Drained, 0),
            pod("b", MaintenanceState::Draining, 0),
        ];
        let now = t("2026-01-01T00:01:00Z");
        assert!(matches!(
            decide(true, TIMEOUT, Some(&previous), &reports, OBSERVED, now),
            Step::Draining(_)
        ));
        let reports = [
            pod("a", MaintenanceState::Drained, 0),
            pod("b", MaintenanceState::Drained, 0),
        ];
        let step = decide(true, TIMEOUT, Some(&previous), &reports, OBSERVED, now);
        assert!(step.scaled_to_zero());
        let Step::Hibernated { status, reason } = step else {
            panic!()
        };
        assert_eq!(reason, DRAINED);
        assert_eq!(status.previous_replicas, 3, "kept from the start");
        // and it stays hibernated without asking the pods again
        let again = decide(true, TIMEOUT, Some(&status), &[], OBSERVED, now);
        assert!(matches!(
            again,
            Step::Hibernated {
                reason: DRAINED,
                ..
            }
        ));
    }

    #[test]
    fn timeout_scales_to_zero_and_says_what_was_left() {
        let previous = HibernationStatus {
            phase: HibernationPhase::Draining,
            started_at: "2026-01-01T00:00:00Z".into(),
            previous_replicas: 1,
            previous_drainer_replicas: 0,
            reason: String::new(),
            saf_backlog: 0,
            message: String::new(),
        };
        let reports = [pod("a", MaintenanceState::TimedOut, 7)];
        let step = decide(
            true,
            TIMEOUT,
            Some(&previous),
            &reports,
            OBSERVED,
            t("2026-01-01T00:10:00Z"),
        );
        let Step::Hibernated { status, reason } = step else {
            panic!("{step:?}")
        };
        assert_eq!(reason, DRAIN_TIMED_OUT);
        assert!(
            status.message.contains("7 SAF advice(s) left"),
            "{}",
            status.message
        );
        // an unreachable pod is waited for a little longer, then given up on
        let unreachable = [PodReport {
            pod: "a".into(),
            result: Err("connection refused".into()),
        }];
        assert!(matches!(
            decide(
                true,
                TIMEOUT,
                Some(&previous),
                &unreachable,
                OBSERVED,
                t("2026-01-01T00:10:05Z")
            ),
            Step::Draining(_)
        ));
        let step = decide(
            true,
            TIMEOUT,
            Some(&previous),
            &unreachable,
            OBSERVED,
            t("2026-01-01T00:10:31Z"),
        );
        let Step::Hibernated { status, reason } = step else {
            panic!("{step:?}")
        };
        assert_eq!(reason, DRAIN_TIMED_OUT);
        assert!(
            status.message.contains("connection refused"),
            "{}",
            status.message
        );
        // the timed-out reason survives later reconciles
        let again = decide(
            true,
            TIMEOUT,
            Some(&status),
            &[],
            OBSERVED,
            t("2026-01-01T01:00:00Z"),
        );
        assert!(matches!(
            again,
            Step::Hibernated {
                reason: DRAIN_TIMED_OUT,
                ..
            }
        ));
    }

    #[test]
    fn disabling_wakes_and_nothing_is_awake() {
        let previous = HibernationStatus {
            phase: HibernationPhase::Hibernated,
            started_at: "2026-01-01T00:00:00Z".into(),
            previous_replicas: 3,
            previous_drainer_replicas: 2,
            reason: DRAINED.into(),
            saf_backlog: 0,
            message: "drained: 3 switch pod(s)".into(),
        };
        let now = t("2026-01-01T01:00:00Z");
        assert!(matches!(
            decide(false, TIMEOUT, Some(&previous), &[], OBSERVED, now),
            Step::Waking { .. }
        ));
        assert_eq!(
            decide(false, TIMEOUT, None, &[], OBSERVED, now),
            Step::Awake
        );
    }

    #[test]
    fn remaining_time_counts_from_the_start() {
        let previous = HibernationStatus {
            phase: HibernationPhase::Draining,
            started_at: "2026-01-01T00:00:00Z".into(),
            previous_replicas: 1,
            previous_drainer_replicas: 0,
            reason: String::new(),
            saf_backlog: 0,
            message: String::new(),
        };
        assert_eq!(
            remaining(Some(&previous), TIMEOUT, t("2026-01-01T00:04:00Z")),
            Duration::from_secs(360)
        );
        assert_eq!(
            remaining(Some(&previous), TIMEOUT, t("2026-01-01T02:00:00Z")),
            Duration::from_secs(1)
        );
        assert_eq!(remaining(None, TIMEOUT, t("2026-01-01T02:00:00Z")), TIMEOUT);
    }
}
