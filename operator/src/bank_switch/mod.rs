//! The BankSwitch controller: dereference → validate → build → apply → status.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod hibernation;
pub mod scaling;
pub mod secrets;
pub mod security;
pub mod simulator;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, PropagationPolicy};
use kube::core::DynamicObject;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;

use self::apply::{Applier, ApplyError, is_ours};
use self::build::{BuildInputs, MANAGED_BY, component, monitoring_api_resource, names};
use self::dereference::{MonitoringApis, SafStatsSource, discover_monitoring};
use self::hibernation::{MaintenanceSource, Step};
use self::scaling::{SafObservation, ScalingHistory, ScalingPolicy};
use self::status::{MigrationState, MonitoringState, Observed};
use self::validate::{StorageMode, ValidatedBankSwitch};
use crate::crd::bank_switch::{BankSwitch, BankSwitchStatus, DrainerAutoscaler, HibernationPhase};
use crate::crd::condition::{self, ConditionStatus, DATABASE_MIGRATED, DEGRADED, READY};
use crate::events::error_chain;
use crate::metrics::Metrics;

/// Controller name used in metrics and Events.
pub const CONTROLLER: &str = "bankswitch";

/// A reconcile failed; the controller retries with backoff and shows it in status.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An apply, read or delete failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A builder failed.
    #[error(transparent)]
    Build(#[from] build::BuildError),
    /// Writing status failed.
    #[error("failed to write status of BankSwitch {name}")]
    Status {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// API discovery failed.
    #[error("failed to discover an optional API (monitoring.coreos.com or cert-manager.io)")]
    Discovery(#[source] kube::Error),
    /// The object has no namespace or name.
    #[error("failed to identify the BankSwitch: {0}")]
    Identity(String),
}

impl ReconcileError {
    /// Stable `reason` label for `switchyard_operator_reconcile_errors_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Apply(e) => e.metric_reason(),
            Self::Build(_) => "build",
            Self::Status { .. } => "status",
            Self::Discovery(_) => "discovery",
            Self::Identity(_) => "identity",
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder (reporter `switchyard-operator`).
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Where SAF figures come from.
    pub saf: Arc<dyn SafStatsSource>,
    /// How switch pods are asked to hibernate (`None`: no admin client, every ask fails).
    maintenance: Option<Arc<dyn MaintenanceSource>>,
    /// Drainer scaling memory per `namespace/name`.
    scaling: Mutex<HashMap<String, ScalingHistory>>,
    /// Consecutive failures per `namespace/name`.
    failures: Mutex<HashMap<String, i32>>,
    /// Monitoring API discovery, cached with the time it was asked.
    monitoring: Mutex<Option<(std::time::Instant, MonitoringApis)>>,
    /// cert-manager API discovery, cached with the time it was asked.
    cert_manager: Mutex<Option<(std::time::Instant, bool)>>,
    /// Namespace the operator runs in (its pods may reach the admin port).
    operator_namespace: String,
    /// `Some`: reconcile only BankSwitches in this namespace (watch-namespace mode, which needs
    /// only namespaced Roles); `None`: every namespace.
    watch_namespace: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `instance` (the pod name) tells Events of HA replicas apart.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        saf: Arc<dyn SafStatsSource>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: build::FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            saf,
            maintenance: None,
            scaling: Mutex::default(),
            failures: Mutex::default(),
            monitoring: Mutex::default(),
            cert_manager: Mutex::default(),
            operator_namespace: build::DEFAULT_OPERATOR_NAMESPACE.into(),
            watch_namespace: None,
        }
    }

    /// Sets the namespace the operator runs in (default `switchyard-system`).
    #[must_use]
    pub fn with_operator_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.operator_namespace = namespace.into();
        self
    }

    /// Asks switch pods to hibernate and resume through `source` (`spec.hibernation`).
    #[must_use]
    pub fn with_maintenance(mut self, source: Arc<dyn MaintenanceSource>) -> Self {
        self.maintenance = Some(source);
        self
    }

    /// Watches and reconciles only `namespace` (`None`: every namespace).
    #[must_use]
    pub fn with_watch_namespace(mut self, namespace: Option<String>) -> Self {
        self.watch_namespace = namespace;
        self
    }

    /// An `Api` over every watched namespace: one namespace in watch-namespace mode, else all.
    fn watched<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match &self.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    async fn cert_manager_served(&self) -> Result<bool, ReconcileError> {
        const TTL: Duration = Duration::from_secs(300);
        if let Ok(cache) = self.cert_manager.lock()
            && let Some((at, served)) = *cache
            && at.elapsed() < TTL
        {
            return Ok(served);
        }
        let served = dereference::discover_cert_manager(&self.client)
            .await
            .map_err(ReconcileError::Discovery)?;
        if let Ok(mut cache) = self.cert_manager.lock() {
            *cache = Some((std::time::Instant::now(), served));
        }
        Ok(served)
    }

    async fn monitoring_apis(&self) -> Result<MonitoringApis, ReconcileError> {
        const TTL: Duration = Duration::from_secs(300);
        if let Ok(cache) = self.monitoring.lock()
            && let Some((at, apis)) = *cache
            && at.elapsed() < TTL
        {
            return Ok(apis);
        }
        let apis = discover_monitoring(&self.client)
            .await
            .map_err(ReconcileError::Discovery)?;
        if let Ok(mut cache) = self.monitoring.lock() {
            *cache = Some((std::time::Instant::now(), apis));
        }
        Ok(apis)
    }
}

fn key(bs: &BankSwitch) -> String {
    format!("{}/{}", bs.namespace().unwrap_or_default(), bs.name_any())
}

/// `now`, truncated to whole seconds as the API server stores condition times.
fn now() -> Time {
    let ts = Timestamp::now();
    Time(Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Reconciles one BankSwitch; records metrics and retry status around [`reconcile_inner`].
pub async fn reconcile(bs: Arc<BankSwitch>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let span = tracing::info_span!("reconcile", namespace = %bs.namespace().unwrap_or_default(), name = %bs.name_any());
    let mut timer = ctx.metrics.reconcile_timer(CONTROLLER);
    let result = reconcile_inner(&bs, &ctx).instrument(span.clone()).await;
    match result {
        Ok(action) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key(&bs));
            }
            Ok(action)
        }
        Err(err) => {
            timer.fail(err.metric_reason());
            let attempts = ctx
                .failures
                .lock()
                .map(|mut f| {
                    let n = f.entry(key(&bs)).or_insert(0);
                    *n += 1;
                    *n
                })
                .unwrap_or(1);
            let delay = retry_delay(attempts);
            let next = Time(
                Timestamp::now()
                    .checked_add(SignedDuration::try_from(delay).unwrap_or(SignedDuration::ZERO))
                    .unwrap_or_else(|_| Timestamp::now()),
            );
            let message = error_chain(&err);
            tracing::warn!(parent: &span, error = %message, attempts, "reconcile failed");
            let previous = bs.status.clone().unwrap_or_default();
            let status = status::with_retry(previous.clone(), message.clone(), attempts, &next);
            let api: Api<BankSwitch> =
                Api::namespaced(ctx.client.clone(), &bs.namespace().unwrap_or_default());
            if let Err(e) = status::write_status(&api, &bs, &status).await {
                tracing::warn!(parent: &span, error = %e, "failed to record the retry in status");
            }
            // One Event per failure streak start, not per retry: the recorder would merge them
            // anyway, but this keeps the API quiet during long outages.
            if attempts == 1 {
                publish(&ctx, &bs, EventType::Warning, "ReconcileFailed", &message).await;
            }
            Err(err)
        }
    }
}

/// Backoff for failing reconciles: 5 s doubling to 5 min.
pub fn retry_delay(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 6)).unwrap_or(6);
    Duration::from_secs((5u64 << exp).min(300))
}

/// The requeue for a failed reconcile (the status already says when).
pub fn error_policy(bs: Arc<BankSwitch>, _err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let attempts = ctx
        .failures
        .lock()
        .ok()
        .and_then(|f| f.get(&key(&bs)).copied())
        .unwrap_or(1);
    Action::requeue(retry_delay(attempts))
}

async fn publish(ctx: &Context, bs: &BankSwitch, type_: EventType, reason: &str, note: &str) {
    crate::events::publish(&ctx.recorder, &bs.object_ref(&()), type_, reason, note).await;
}

/// Publishes an Event for every condition whose status changed (or appeared).
async fn publish_transitions(
    ctx: &Context,
    bs: &BankSwitch,
    previous: Option<&BankSwitchStatus>,
    next: &BankSwitchStatus,
) {
    let prev = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    for c in &next.conditions {
        let changed = condition::find(prev, &c.type_)
            .is_none_or(|old| old.status != c.status || old.reason != c.reason);
        if !changed {
            continue;
        }
        // Degraded carries MigrationFailed/InvalidSpec/RolloutStuck, so one Warning per problem.
        let bad = (c.type_ == DEGRADED && c.status == ConditionStatus::True)
            || c.reason == "MonitoringApiNotServed"
            || c.reason == hibernation::DRAIN_TIMED_OUT;
        let interesting = bad
            || c.type_ == hibernation::HIBERNATED
            || (c.type_ == READY && c.status == ConditionStatus::True)
            || (c.type_ == DATABASE_MIGRATED && c.reason == "MigrationSucceeded");
        if interesting {
            let type_ = if bad {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(ctx, bs, type_, &c.reason, &c.message).await;
        }
    }
}

async fn reconcile_inner(bs: &BankSwitch, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = bs
        .namespace()
        .ok_or_else(|| ReconcileError::Identity("metadata.namespace is missing".into()))?;
    let name = bs.name_any();
    let bs_api: Api<BankSwitch> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = now();

    // validate (pure)
    let validated = match validate::validate(bs) {
        Ok(v) => v,
        Err(err) => {
            let message = err.to_string();
            let status = status::invalid_spec_status(
                bs.status.as_ref(),
                bs.metadata.generation,
                &message,
                &now,
            );
            publish_transitions(ctx, bs, bs.status.as_ref(), &status).await;
            status::write_status(&bs_api, bs, &status)
                .await
                .map_err(|source| ReconcileError::Status {
                    name: name.clone(),
                    source,
                })?;
            // A spec that cannot work waits for the user to change it: no hot loop.
            return Ok(Action::await_change());
        }
    };
    // The cert-manager Certificate comes first: its Secret is one the pods mount, and it only
    // appears once cert-manager has issued it.
    if !validated.spec.paused
        && let Some(action) = reconcile_certificate(ctx, bs, &validated, &bs_api, &now).await?
    {
        return Ok(action);
    }
    // Every referenced Secret and key must exist before anything is applied: a pod that cannot
    // mount them would only show as RolloutStuck after the progress deadline.
    if !validated.spec.paused
        && let Some(action) = block_on_missing_secrets(ctx, bs, &bs_api, &namespace, &now).await?
    {
        return Ok(action);
    }
    let applier = Applier::new(ctx.client.clone(), &namespace);
    let owner_uid = bs.uid();
    let deployments: Api<Deployment> = applier.api();
    let jobs: Api<Job> = applier.api();

    // dereference: what the spec points at outside the object
    let wants_monitoring = validated.spec.monitoring.service_monitor.enabled
        || validated.spec.monitoring.prometheus_rule.enabled;
    // Asked even when nothing is requested, so objects left from an earlier spec get deleted;
    // a discovery failure only blocks the reconcile when monitoring is actually wanted.
    let monitoring_apis = if wants_monitoring {
        ctx.monitoring_apis().await?
    } else {
        ctx.monitoring_apis().await.unwrap_or_default()
    };
    let observed_switch = deployments
        .get_opt(&names::switch(&name))
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Deployment".into(),
            name: names::switch(&name),
            source,
        })?;
    let drainers_managed = validated.storage_mode == StorageMode::Postgres
        && validated.spec.store_and_forward.drainers.max_replicas > 0;
    let hibernation = hibernation_step(ctx, bs, &validated, observed_switch.as_ref()).await?;
    let mut saf = None;
    let mut drainer_replicas = validated.spec.store_and_forward.drainers.min_replicas;
    if drainers_managed && hibernation.scaled_to_zero() {
        // the scaler must not bring drainers back while hibernated
        drainer_replicas = 0;
        saf = Some((
            None,
            scaling::ScalingDecision {
                replicas: 0,
                reason: scaling::ScalingReason::Hibernated,
            },
        ));
    }
    // Paused: no scaling either, so status never shows a replica count that was not applied.
    if drainers_managed && !validated.spec.paused && !hibernation.scaled_to_zero() {
        let observed_drainer =
            deployments
                .get_opt(&names::drainer(&name))
                .await
                .map_err(|source| ApplyError::Get {
                    kind: "Deployment".into(),
                    name: names::drainer(&name),
                    source,
                })?;
        let current = observed_drainer
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(drainer_replicas);
        let ready_switches = observed_switch
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let (observation, stats) = if ready_switches == 0 {
            (
                SafObservation::Unreachable {
                    reason: "no ready switch pod to ask".into(),
                },
                None,
            )
        } else {
            match ctx.saf.fetch(&ctx.client, &validated).await {
                Ok(stats) => (
                    SafObservation::Stats {
                        backlog: i64::try_from(stats.backlog).unwrap_or(i64::MAX),
                        in_flight: i64::try_from(stats.in_flight).unwrap_or(i64::MAX),
                    },
                    Some(stats),
                ),
                Err(e) => (
                    SafObservation::Unreachable {
                        reason: error_chain(&e),
                    },
                    None,
                ),
            }
        };
        let drainers = &validated.spec.store_and_forward.drainers;
        let policy = ScalingPolicy {
            min_replicas: drainers.min_replicas,
            max_replicas: drainers.max_replicas,
            target_backlog_per_replica: drainers.target_backlog_per_replica,
            cooldown: validated.durations.drainer_cooldown,
        };
        let decision = if drainers.autoscaler == DrainerAutoscaler::External {
            // KEDA/HPA owns the count; report what it set.
            scaling::ScalingDecision {
                replicas: current,
                reason: scaling::ScalingReason::External,
            }
        } else {
            let mut histories = ctx
                .scaling
                .lock()
                .map_err(|_| ReconcileError::Identity("scaling state poisoned".into()))?;
            let history = histories.entry(key(bs)).or_default();
            scaling::decide(&policy, history, current, &observation, Timestamp::now())
        };
        drainer_replicas = decision.replicas;
        ctx.metrics
            .set_drainer_replicas(&namespace, &name, decision.replicas);
        saf = Some((stats, decision));
    }

    // build (pure)
    let mut desired = build::build_all(
        &validated,
        BuildInputs {
            drainer_replicas,
            monitoring_api_served: monitoring_apis.all_served(),
            operator_namespace: ctx.operator_namespace.clone(),
        },
    )?;
    match &hibernation {
        Step::Hibernated { .. } => hibernation::scale_to_zero(&mut desired),
        Step::Waking { previous } => hibernation::restore_drainers(&mut desired, previous),
        Step::Awake | Step::Draining(_) => {}
    }

    let paused = validated.spec.paused;
    let migration;
    let mut switch_deployment = observed_switch;
    let monitoring_state = if !wants_monitoring {
        MonitoringState::NotRequested
    } else if monitoring_apis.all_served() {
        MonitoringState::Applied
    } else {
        MonitoringState::ApiNotServed
    };

    if paused {
        migration = match &desired.migration_job {
            None => MigrationState::OnStart,
            Some(job) => {
                match jobs
                    .get_opt(&job.name_any())
                    .await
                    .map_err(|source| ApplyError::Get {
                        kind: "Job".into(),
                        name: job.name_any(),
                        source,
                    })? {
                    Some(j) => MigrationState::from_job(&j),
                    None => MigrationState::Running {
                        job: job.name_any(),
                    },
                }
            }
        };
    } else {
        // apply: everything the pods need before they can start
        applier
            .apply(&applier.api::<ConfigMap>(), &(), &desired.config_map)
            .await?;
        if let Some(pvc) = &desired.data_pvc {
            applier
                .apply(&applier.api::<PersistentVolumeClaim>(), &(), pvc)
                .await?;
        }
        if let Some(pvc) = &desired.backup_pvc {
            applier
                .apply(&applier.api::<PersistentVolumeClaim>(), &(), pvc)
                .await?;
        }
        applier
            .apply(&applier.api::<Service>(), &(), &desired.iso_service)
            .await?;
        applier
            .apply(&applier.api::<Service>(), &(), &desired.admin_service)
            .await?;
        let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = applier.api();
        for policy in &desired.network_policies {
            applier.apply(&policies, &(), policy).await?;
        }
        // turned off, or no drainers any more: remove what an earlier spec made (ours only)
        for policy in [names::switch(&name), names::drainer(&name)] {
            if !desired
                .network_policies
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(policy.as_str()))
            {
                applier
                    .delete_if_owned(&policies, &(), &policy, owner_uid.as_deref())
                    .await?;
            }
        }
        let pdbs: Api<PodDisruptionBudget> = applier.api();
        match &desired.pod_disruption_budget {
            Some(pdb) => {
                applier.apply(&pdbs, &(), pdb).await?;
            }
            None => {
                applier
                    .delete_if_owned(&pdbs, &(), &names::switch(&name), owner_uid.as_deref())
                    .await?;
            }
        }

        migration = match &desired.migration_job {
            None => MigrationState::OnStart,
            Some(job) => {
                let (job, _) = applier.apply(&jobs, &(), job).await?;
                MigrationState::from_job(&job)
            }
        };

        if migration.allows_rollout() {
            let (dep, _) = applier
                .apply(&deployments, &(), &desired.switch_deployment)
                .await?;
            switch_deployment = Some(dep);
            match &desired.drainer_deployment {
                Some(d) => {
                    applier.apply(&deployments, &(), d).await?;
                }
                None => {
                    applier
                        .delete_if_owned(
                            &deployments,
                            &(),
                            &names::drainer(&name),
                            owner_uid.as_deref(),
                        )
                        .await?;
                }
            }
            if let (MigrationState::Succeeded { job }, Some(uid)) =
                (&migration, owner_uid.as_deref())
            {
                delete_old_migrations(&jobs, &name, job, uid).await?;
            }
            simulator::apply(
                &applier,
                &deployments,
                &name,
                desired.simulator.as_ref(),
                owner_uid.as_deref(),
            )
            .await?;
        }

        for (kind, object) in [
            ("ServiceMonitor", &desired.service_monitor),
            ("PrometheusRule", &desired.prometheus_rule),
        ] {
            let served = match kind {
                "ServiceMonitor" => monitoring_apis.service_monitor,
                _ => monitoring_apis.prometheus_rule,
            };
            let ar = monitoring_api_resource(kind);
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &ar);
            match object {
                Some(obj) => {
                    applier.apply(&api, &ar, obj).await?;
                }
                // Without the API there is nothing to delete (and the call would 404).
                None if served => {
                    applier
                        .delete_if_owned(&api, &ar, &names::monitoring(&name), owner_uid.as_deref())
                        .await?;
                }
                None => {}
            }
        }
    }

    // Why a switch container keeps exiting, from its pods' last termination message.
    let crash = if paused {
        None
    } else {
        let pods: Api<Pod> = applier.api();
        let selector = status::pod_selector(&validated);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| ApplyError::Get {
                kind: "Pod".into(),
                name: selector.clone(),
                source,
            })?;
        status::crash_report(&list.items)
    };

    // status
    let observed = Observed {
        bs: &validated,
        switch_deployment: switch_deployment.as_ref(),
        migration: migration.clone(),
        monitoring: monitoring_state,
        saf,
        migrated_image: bs.status.as_ref().and_then(|s| s.migrated_image.clone()),
        crash,
        hibernation: hibernation.clone(),
    };
    let next = status::compute_status(bs.status.as_ref(), &observed, &now);
    publish_transitions(ctx, bs, bs.status.as_ref(), &next).await;
    status::write_status(&bs_api, bs, &next)
        .await
        .map_err(|source| ReconcileError::Status {
            name: name.clone(),
            source,
        })?;

    if matches!(hibernation, Step::Draining(_)) && !validated.spec.paused {
        return Ok(Action::requeue(hibernation::DRAIN_POLL));
    }
    Ok(next_action(&validated, &migration))
}

/// Where `spec.hibernation` stands: while draining, every switch pod is asked to hibernate (or
/// says how far it got); a drain called off mid-way is resumed on the pods. Paused: the
/// recorded state, no calls.
async fn hibernation_step(
    ctx: &Context,
    bs: &BankSwitch,
    validated: &ValidatedBankSwitch,
    observed_switch: Option<&Deployment>,
) -> Result<Step, ReconcileError> {
    let previous = bs.status.as_ref().and_then(|s| s.hibernation.as_ref());
    if validated.spec.paused {
        return Ok(hibernation::carried(previous));
    }
    let enabled = validated.spec.hibernation.enabled;
    let timeout = validated.durations.hibernation_drain_timeout;
    let draining = previous.is_none_or(|p| p.phase == HibernationPhase::Draining);
    let asks_pods = (enabled && draining)
        || (!enabled && previous.is_some_and(|p| p.phase == HibernationPhase::Draining));
    let pods = if asks_pods {
        hibernation::switch_pods(&ctx.client, validated)
            .await
            .map_err(|source| ApplyError::Get {
                kind: "Pod".into(),
                name: status::pod_selector(validated),
                source,
            })?
    } else {
        Vec::new()
    };
    let now = Timestamp::now();
    let reports = if enabled && draining {
        let remaining = hibernation::remaining(previous, timeout, now);
        match &ctx.maintenance {
            Some(source) => {
                hibernation::observe(source.as_ref(), &ctx.client, validated, &pods, remaining)
                    .await
            }
            None => pods
                .iter()
                .map(|p| hibernation::PodReport {
                    pod: p.name.clone(),
                    result: Err("the operator has no switch admin client".into()),
                })
                .collect(),
        }
    } else {
        Vec::new()
    };
    let observed = hibernation::ObservedReplicas {
        switch: observed_switch
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(validated.spec.replicas),
        drainers: if previous.is_none() && enabled {
            observed_drainer_replicas(ctx, validated).await?
        } else {
            0
        },
    };
    let step = hibernation::decide(enabled, timeout, previous, &reports, observed, now);
    if !enabled
        && asks_pods
        && let Some(source) = &ctx.maintenance
    {
        // called off mid-drain: the pods serve again (they are still there)
        for pod in pods.iter().filter(|p| p.ip.is_some()) {
            if let Err(e) = source.resume(&ctx.client, validated, pod).await {
                tracing::warn!(pod = %pod.name, error = %error_chain(&e), "failed to resume a hibernating switch pod; restart it to serve again");
            }
        }
    }
    Ok(step)
}

/// The drainer Deployment's `spec.replicas` now (0 without one).
async fn observed_drainer_replicas(
    ctx: &Context,
    validated: &ValidatedBankSwitch,
) -> Result<i32, ReconcileError> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &validated.namespace);
    let name = names::drainer(&validated.name);
    let drainer = deployments
        .get_opt(&name)
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Deployment".into(),
            name,
            source,
        })?;
    Ok(drainer
        .and_then(|d| d.spec)
        .and_then(|s| s.replicas)
        .unwrap_or(0))
}

/// Secrets are not watched (the operator may only `get` them), so a BankSwitch waiting for one
/// looks again this often.
pub const SECRET_RECHECK: Duration = Duration::from_secs(30);

/// A BankSwitch whose `spec.tls.issuerRef` needs cert-manager, in a cluster without it, looks
/// again this often (installing cert-manager is not something a watch would tell us).
pub const CERT_MANAGER_RECHECK: Duration = Duration::from_secs(300);

/// Condition and Event reason when `spec.tls.issuerRef` is set and cert-manager is not served.
pub const CERT_MANAGER_NOT_SERVED: &str = "CertManagerApiNotServed";

/// `spec.tls.issuerRef`: applies the cert-manager Certificate, or, when cert-manager's API is
/// not served, writes `Degraded/CertManagerApiNotServed` (one Event, through the condition
/// transition), applies nothing and returns the slow requeue. Without `issuerRef`, a
/// Certificate left from an earlier spec is deleted (ours only).
async fn reconcile_certificate(
    ctx: &Context,
    bs: &BankSwitch,
    validated: &ValidatedBankSwitch,
    bs_api: &Api<BankSwitch>,
    now: &Time,
) -> Result<Option<Action>, ReconcileError> {
    let wanted = security::build_certificate(validated);
    let served = if wanted.is_some() {
        ctx.cert_manager_served().await?
    } else {
        // Nothing to create: a discovery failure only skips the clean-up this time.
        ctx.cert_manager_served().await.unwrap_or(false)
    };
    let ar = security::certificate_api_resource();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &validated.namespace, &ar);
    let applier = Applier::new(ctx.client.clone(), &validated.namespace);
    match wanted {
        Some(certificate) if served => {
            applier.apply(&api, &ar, &certificate).await?;
            Ok(None)
        }
        Some(_) => {
            let message = format!(
                "spec.tls.issuerRef needs cert-manager, but the cert-manager.io/v1 Certificate API is not served in this cluster; install cert-manager, or set spec.tls.secretName to an existing kubernetes.io/tls Secret (labelled {}={}). Nothing else is changed until then.",
                secrets::SECRET_OPT_IN_LABEL,
                validated.name
            );
            let status = status::blocked_status(
                bs.status.as_ref(),
                bs.metadata.generation,
                CERT_MANAGER_NOT_SERVED,
                &message,
                now,
            );
            publish_transitions(ctx, bs, bs.status.as_ref(), &status).await;
            status::write_status(bs_api, bs, &status)
                .await
                .map_err(|source| ReconcileError::Status {
                    name: bs.name_any(),
                    source,
                })?;
            Ok(Some(Action::requeue(CERT_MANAGER_RECHECK)))
        }
        None if served => {
            applier
                .delete_if_owned(
                    &api,
                    &ar,
                    &names::switch(&validated.name),
                    bs.uid().as_deref(),
                )
                .await?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Checks the referenced Secrets; when one is missing, writes `Degraded` naming it (one Event
/// per new problem, via the condition transition) and returns the requeue. Nothing is applied.
async fn block_on_missing_secrets(
    ctx: &Context,
    bs: &BankSwitch,
    bs_api: &Api<BankSwitch>,
    namespace: &str,
    now: &Time,
) -> Result<Option<Action>, ReconcileError> {
    let problems = secrets::check_secret_refs(&ctx.client, namespace, &bs.name_any(), &bs.spec)
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Secret".into(),
            name: namespace.to_owned(),
            source,
        })?;
    let Some(first) = problems.first() else {
        return Ok(None);
    };
    let mut message = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    message.push_str(". Nothing else is changed until it exists.");
    let status = status::blocked_status(
        bs.status.as_ref(),
        bs.metadata.generation,
        first.kind.reason(),
        &message,
        now,
    );
    publish_transitions(ctx, bs, bs.status.as_ref(), &status).await;
    status::write_status(bs_api, bs, &status)
        .await
        .map_err(|source| ReconcileError::Status {
            name: bs.name_any(),
            source,
        })?;
    Ok(Some(Action::requeue(SECRET_RECHECK)))
}

/// When to look again: at the drainer poll interval when drainers are managed, soon while a
/// migration runs, otherwise a slow resync (watches bring changes sooner).
fn next_action(bs: &ValidatedBankSwitch, migration: &MigrationState) -> Action {
    if bs.spec.paused {
        return Action::await_change();
    }
    if matches!(migration, MigrationState::Running { .. }) {
        return Action::requeue(Duration::from_secs(10));
    }
    if bs.storage_mode == StorageMode::Postgres
        && bs.spec.store_and_forward.drainers.max_replicas > 0
    {
        return Action::requeue(bs.durations.drainer_poll_interval);
    }
    Action::requeue(Duration::from_secs(300))
}

/// Deletes migration Jobs of this BankSwitch other than `current` (ours only).
async fn delete_old_migrations(
    jobs: &Api<Job>,
    name: &str,
    current: &str,
    owner_uid: &str,
) -> Result<(), ApplyError> {
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/component={},app.kubernetes.io/managed-by={MANAGED_BY}",
        component::MIGRATION
    );
    let list = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Job".into(),
            name: selector.clone(),
            source,
        })?;
    for job in list.items {
        let job_name = job.name_any();
        if job_name == current || !is_ours(&job, owner_uid) {
            continue;
        }
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        jobs.delete(&job_name, &params)
            .await
            .map_err(|source| ApplyError::Delete {
                kind: "Job".into(),
                name: job_name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Runs the BankSwitch controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(ctx.watched::<BankSwitch>(), watcher::Config::default())
        .owns(ctx.watched::<Deployment>(), owned.clone())
        .owns(ctx.watched::<Job>(), owned.clone())
        .owns(ctx.watched::<Service>(), owned.clone())
        .owns(ctx.watched::<ConfigMap>(), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => {
                    tracing::debug!(namespace = ?obj.namespace, name = %obj.name, "reconciled")
                }
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}
