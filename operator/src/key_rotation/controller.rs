//! The KeyRotation controller: the thin I/O shell around [`plan`].
//!
//! Each reconcile reads the object fresh and its BankSwitch (dereference), asks [`plan`] what to
//! do at `now`, performs that one action against the switch admin API, records the outcome with
//! the `record_*` helpers, writes status only when it changed, and sleeps until the next
//! transition (the Wait or BackOff time; a short poll only while a rotation is being followed).
//!
//! Why the object is read fresh instead of taken from the watch cache: the cache can lag the
//! status this controller wrote a moment ago, and planning from a stale status would begin the
//! same run a second time. The `Idempotency-Key` (`<uid>-<run id>-<key type>`) makes such a retry
//! harmless for the switch, and a run is written to status before the switch is asked to start
//! it, so a retried start after a crash sends the same body (an `atTime` activation is computed
//! from the run's recorded start).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::plan::{
    Action, Plan, PlanError, RotationResult, StartReason, plan, record_expired_previous,
    record_failure, record_progress, record_started,
};
use crate::bank_switch::build::FIELD_MANAGER;
use crate::bank_switch::retry_delay;
use crate::bank_switch::validate::parse_duration;
use crate::crd::bank_switch::BankSwitch;
use crate::crd::condition::{
    Condition, ConditionStatus, DEGRADED, DesiredCondition, READY, merge_conditions,
};
use crate::crd::key_rotation::{
    ActivationMode, KeyRotation, KeyRotationSpec, KeyRotationStatus, RotatedKeyType,
};
use crate::events::error_chain;
use crate::metrics::Metrics;
use crate::switch_admin::{
    AdminTarget, BearerToken, CreateRotation, SwitchAdmin, SwitchAdminError, TokenFormat,
    read_token,
};

/// Controller name used in metrics and logs.
pub const CONTROLLER: &str = "keyrotation";
/// How often a running rotation's totals are read from the switch.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(15);
/// How soon a KeyRotation whose BankSwitch is missing looks again (the BankSwitch watch brings
/// its creation sooner).
pub const BANK_SWITCH_RECHECK: Duration = Duration::from_secs(60);
/// Requeue after a step whose next step needs no waiting (the status write triggers one too).
const AT_ONCE: Duration = Duration::from_secs(1);
/// Condition reason when `spec.bankSwitchRef` names nothing.
pub const BANK_SWITCH_NOT_FOUND: &str = "BankSwitchNotFound";
/// Condition reason for a spec the switch request cannot be built from.
const INVALID_SPEC: &str = "InvalidSpec";

/// A reconcile failed on the Kubernetes side; the controller retries with backoff. Failures of
/// the switch are not errors here: they go to status (with their own backoff) and conditions.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The object has no namespace or uid.
    #[error("failed to identify the KeyRotation: {0}")]
    Identity(String),
    /// Reading an object failed.
    #[error("failed to read {kind} {name}")]
    Get {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("failed to write status of KeyRotation {name}")]
    Status {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// Stable `reason` label for `switchyard_operator_reconcile_errors_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Identity(_) => "identity",
            Self::Get { .. } => "get",
            Self::Status { .. } => "status",
        }
    }
}

/// A call to the switch failed, or its answer could not be recorded.
#[derive(Debug, thiserror::Error)]
enum SwitchCallError {
    #[error(transparent)]
    Admin(#[from] SwitchAdminError),
    #[error(transparent)]
    Record(#[from] PlanError),
}

/// Shared state of the KeyRotation controller.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder (reporter `switchyard-operator`).
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// The switch admin API client (shared with the BankSwitch controller).
    pub admin: SwitchAdmin,
    /// Consecutive Kubernetes-side failures per `namespace/name`.
    failures: Mutex<HashMap<String, i32>>,
    /// `Some`: only this namespace is watched (watch-namespace mode); `None`: all.
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
        admin: SwitchAdmin,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            admin,
            failures: Mutex::default(),
            watch_namespace: None,
        }
    }

    /// Watches and reconciles only `namespace` (`None`: every namespace).
    #[must_use]
    pub fn with_watch_namespace(mut self, namespace: Option<String>) -> Self {
        self.watch_namespace = namespace;
        self
    }

    fn watched<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

fn key(kr: &KeyRotation) -> String {
    format!("{}/{}", kr.namespace().unwrap_or_default(), kr.name_any())
}

/// `now`, truncated to whole seconds as the API server stores times, so a status written and
/// read back compares equal and a steady state makes no writes.
fn now_seconds() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// Reconciles one KeyRotation at the wall-clock time.
pub async fn reconcile(kr: Arc<KeyRotation>, ctx: Arc<Context>) -> Result<Requeue, ReconcileError> {
    reconcile_at(&kr, &ctx, now_seconds()).await
}

/// Reconciles one KeyRotation as if it were `now` (tests drive the clock through this).
pub async fn reconcile_at(
    kr: &KeyRotation,
    ctx: &Context,
    now: Timestamp,
) -> Result<Requeue, ReconcileError> {
    let span = tracing::info_span!("reconcile", controller = CONTROLLER,
        namespace = %kr.namespace().unwrap_or_default(), name = %kr.name_any());
    let mut timer = ctx.metrics.reconcile_timer(CONTROLLER);
    match reconcile_inner(kr, ctx, now).instrument(span.clone()).await {
        Ok(done) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key(kr));
            }
            if done.switch_failed {
                timer.fail("switch");
            }
            Ok(done.requeue)
        }
        Err(err) => {
            timer.fail(err.metric_reason());
            if let Ok(mut f) = ctx.failures.lock() {
                *f.entry(key(kr)).or_insert(0) += 1;
            }
            tracing::warn!(parent: &span, error = %error_chain(&err), "reconcile failed");
            Err(err)
        }
    }
}

/// The requeue for a failed reconcile: 5 s doubling to 5 min.
pub fn error_policy(kr: Arc<KeyRotation>, _err: &ReconcileError, ctx: Arc<Context>) -> Requeue {
    let attempts = ctx
        .failures
        .lock()
        .ok()
        .and_then(|f| f.get(&key(&kr)).copied())
        .unwrap_or(1);
    Requeue::requeue(retry_delay(attempts))
}

struct Reconciled {
    requeue: Requeue,
    switch_failed: bool,
}

async fn reconcile_inner(
    cached: &KeyRotation,
    ctx: &Context,
    now: Timestamp,
) -> Result<Reconciled, ReconcileError> {
    let namespace = cached
        .namespace()
        .ok_or_else(|| ReconcileError::Identity("metadata.namespace is missing".into()))?;
    let name = cached.name_any();
    let api: Api<KeyRotation> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(kr) = api
        .get_opt(&name)
        .await
        .map_err(|source| ReconcileError::Get {
            kind: "KeyRotation",
            name: name.clone(),
            source,
        })?
    else {
        ctx.metrics.set_next_rotation(&namespace, &name, None);
        return Ok(Reconciled {
            requeue: Requeue::await_change(),
            switch_failed: false,
        });
    };
    let uid = kr
        .uid()
        .ok_or_else(|| ReconcileError::Identity("metadata.uid is missing".into()))?;
    let generation = kr.metadata.generation;
    let stored = kr.status.clone().unwrap_or_default();
    let mut writer = StatusWriter {
        api: &api,
        name: &name,
        written: stored.clone(),
    };

    // dereference: the BankSwitch whose switch is asked
    let bs_name = &kr.spec.bank_switch_ref.name;
    let bank_switches: Api<BankSwitch> = Api::namespaced(ctx.client.clone(), &namespace);
    let bs = bank_switches
        .get_opt(bs_name)
        .await
        .map_err(|source| ReconcileError::Get {
            kind: "BankSwitch",
            name: bs_name.clone(),
            source,
        })?;
    let Some(bs) = bs else {
        let message = format!(
            "BankSwitch {bs_name} does not exist in namespace {namespace}; create it or fix spec.bankSwitchRef.name"
        );
        let status = with_problem(
            stored.clone(),
            BANK_SWITCH_NOT_FOUND,
            &message,
            generation,
            now,
        );
        publish_transitions(ctx, &kr, &stored, &status).await;
        writer.write(&status).await?;
        set_gauge(ctx, &namespace, &name, &status);
        return Ok(Reconciled {
            requeue: Requeue::requeue(BANK_SWITCH_RECHECK),
            switch_failed: false,
        });
    };

    // plan (pure), then the one action it asks for
    let Plan { action, status } = plan(&kr, now);
    let mut status = status;
    let mut switch_failed = false;
    let mut requeue = None;
    let mut failed = |status: KeyRotationStatus, err: SwitchCallError| {
        let message = error_chain(&err);
        tracing::warn!(error = %message, "switch admin API call failed");
        switch_failed = true;
        record_failure(status, &message, generation, now)
    };
    match action {
        Action::Wait { .. }
        | Action::BackOff { .. }
        | Action::Suspended
        | Action::InvalidSpec { .. } => {}
        Action::Start {
            key_type,
            reason,
            idempotency_key,
        } => {
            let run_started = status
                .current_run
                .as_ref()
                .map(|r| r.started_at.0)
                .unwrap_or(now);
            match build_create_rotation(&kr.spec, key_type, run_started) {
                Err(message) => {
                    // Nothing was sent: keep the stored status so the run begins once the spec
                    // is fixed (a spec change wakes the controller).
                    status = with_problem(stored.clone(), INVALID_SPEC, &message, generation, now);
                    requeue = Some(Requeue::await_change());
                }
                Ok(body) => {
                    if stored.current_run != status.current_run {
                        writer.write(&status).await?;
                    }
                    let idempotency_key = format!("{uid}-{idempotency_key}");
                    match start(ctx, &bs, &body, &idempotency_key).await {
                        Ok((id, terminals)) => {
                            status = record_started(status, key_type, id.clone(), now);
                            let why = match reason {
                                StartReason::Scheduled => "scheduled",
                                StartReason::Manual => "manual trigger",
                            };
                            let note = format!(
                                "started {} rotation {id} for {terminals} terminals ({why})",
                                key_type_name(key_type)
                            );
                            publish(ctx, &kr, EventType::Normal, "RotationStarted", &note).await;
                        }
                        Err(e) => status = failed(status, e),
                    }
                }
            }
        }
        Action::Follow { rotation_id } => {
            match follow(ctx, &bs, &kr.spec, status.clone(), &rotation_id, now).await {
                Ok(next) => status = next,
                Err(e) => status = failed(status, e),
            }
        }
        Action::ExpirePrevious { rotation_id, .. } => {
            match expire_previous(ctx, &bs, &rotation_id).await {
                Ok(expired) => {
                    status = record_expired_previous(status, now);
                    let note = format!(
                        "ended the grace period of {expired} previous keys of rotation {rotation_id}"
                    );
                    publish(ctx, &kr, EventType::Normal, "PreviousKeysExpired", &note).await;
                }
                Err(e) => status = failed(status, e.into()),
            }
        }
        Action::Finish {
            rotation_id,
            key_type,
            result,
        } => finished(ctx, &kr, &status, &rotation_id, key_type, result).await,
    }

    let (status, requeue) = match requeue {
        Some(requeue) => (status, requeue),
        None => settle(ctx, &kr, status, now).await,
    };
    publish_transitions(ctx, &kr, &stored, &status).await;
    writer.write(&status).await?;
    set_gauge(ctx, &namespace, &name, &status);
    Ok(Reconciled {
        requeue,
        switch_failed,
    })
}

/// Plans once more with the outcome recorded: the status then carries every I/O-free transition
/// that follows from it (conditions after a recovery, a finished rotation moved to history,
/// `nextRotationAt`), and the next action says when to wake up. A rotation finished by this
/// re-plan gets its Event and metric here, because no later plan would report it again.
async fn settle(
    ctx: &Context,
    kr: &KeyRotation,
    mut status: KeyRotationStatus,
    now: Timestamp,
) -> (KeyRotationStatus, Requeue) {
    let mut next = kr.clone();
    // Bounded: each Finish moves one rotation to history; a run has at most two.
    for _ in 0..3 {
        next.status = Some(status);
        let Plan {
            action,
            status: planned,
        } = plan(&next, now);
        status = planned;
        let requeue = match action {
            Action::Finish {
                rotation_id,
                key_type,
                result,
            } => {
                finished(ctx, kr, &status, &rotation_id, key_type, result).await;
                continue;
            }
            Action::Wait { until } | Action::BackOff { until } => {
                Requeue::requeue(until_from(now, until))
            }
            Action::Follow { .. } => Requeue::requeue(FOLLOW_INTERVAL),
            Action::Start { .. } | Action::ExpirePrevious { .. } => Requeue::requeue(AT_ONCE),
            // A spec change (or a new rotate-now value) is what changes these; the watch
            // brings it.
            Action::Suspended | Action::InvalidSpec { .. } => Requeue::await_change(),
        };
        return (status, requeue);
    }
    (status, Requeue::requeue(AT_ONCE))
}

/// The Event and metric of a finished fleet rotation.
async fn finished(
    ctx: &Context,
    kr: &KeyRotation,
    status: &KeyRotationStatus,
    rotation_id: &str,
    key_type: RotatedKeyType,
    result: RotationResult,
) {
    let (label, type_, reason) = match result {
        RotationResult::Succeeded => ("succeeded", EventType::Normal, "RotationSucceeded"),
        RotationResult::Failed => ("failed", EventType::Warning, "RotationFailed"),
    };
    ctx.metrics.inc_key_rotations(label);
    let totals = status
        .last_rotation
        .as_ref()
        .map(|r| totals_text(&r.totals))
        .unwrap_or_default();
    let note = format!(
        "{} rotation {rotation_id} {label} ({totals})",
        key_type_name(key_type)
    );
    publish(ctx, kr, type_, reason, &note).await;
}

/// The wait from `now` to `until` (zero if it has passed).
pub fn until_from(now: Timestamp, until: Timestamp) -> Duration {
    Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO)
}

fn set_gauge(ctx: &Context, namespace: &str, name: &str, status: &KeyRotationStatus) {
    let at = status.next_rotation_at.as_ref().map(|t| t.0.as_second());
    ctx.metrics.set_next_rotation(namespace, name, at);
}

fn key_type_name(k: RotatedKeyType) -> &'static str {
    match k {
        RotatedKeyType::Tpk => "TPK",
        RotatedKeyType::Tak => "TAK",
    }
}

fn totals_text(totals: &BTreeMap<String, i64>) -> String {
    totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `POST /v1/key-rotations` body for one key type of a run (pure).
///
/// `run_started_at` is the run's recorded start, so a retried start sends the same body.
/// `maxConcurrent` paces the switch's key pushes (terminals between push and answer at once).
pub fn build_create_rotation(
    spec: &KeyRotationSpec,
    key_type: RotatedKeyType,
    run_started_at: Timestamp,
) -> Result<CreateRotation, String> {
    let t = &spec.terminals;
    let terminals = if t.all {
        json!("all")
    } else if !t.ids.is_empty() {
        json!({ "ids": t.ids })
    } else if !t.groups.is_empty() {
        json!({ "groups": t.groups })
    } else {
        return Err(
            "failed to read spec.terminals: set exactly one of terminals.all, terminals.ids or terminals.groups".into(),
        );
    };
    let grace = parse_duration(&spec.grace_period)
        .map_err(|e| format!("failed to parse spec.gracePeriod: {e}"))?;
    let (activation, activate_at) = match spec.activation.mode {
        ActivationMode::OnConfirm => ("onConfirm", None),
        ActivationMode::AtTime => {
            let after = spec.activation.activate_after.as_deref().ok_or_else(|| {
                "failed to read spec.activation.activateAfter: activation mode atTime needs it (e.g. 10m)".to_owned()
            })?;
            let after = parse_duration(after)
                .map_err(|e| format!("failed to parse spec.activation.activateAfter: {e}"))?;
            let at = SignedDuration::try_from(after)
                .ok()
                .and_then(|d| run_started_at.checked_add(d).ok())
                .ok_or_else(|| {
                    "failed to add spec.activation.activateAfter to the run start: out of range"
                        .to_owned()
                })?;
            let at = chrono::DateTime::from_timestamp(
                at.as_second(),
                at.subsec_nanosecond().unsigned_abs(),
            )
            .ok_or_else(|| {
                "failed to add spec.activation.activateAfter to the run start: out of range"
                    .to_owned()
            })?;
            ("atTime", Some(at))
        }
    };
    Ok(CreateRotation {
        key_type: key_type_name(key_type).to_owned(),
        terminals,
        activation: activation.to_owned(),
        activate_at,
        grace_seconds: Some(grace.as_secs()),
        max_concurrent: Some(usize::try_from(spec.max_concurrent.max(1)).unwrap_or(1)),
    })
}

/// Reads the admin token and where (and how: HTTPS with the BankSwitch's CA under `spec.tls`)
/// to reach the BankSwitch's admin API.
async fn admin_access(
    ctx: &Context,
    bs: &BankSwitch,
) -> Result<(AdminTarget, BearerToken), SwitchAdminError> {
    let namespace = bs.namespace().unwrap_or_default();
    let name = bs.name_any();
    // Writes need the `admin` role; the tokens file is the only place one is configured.
    let token = read_token(
        &ctx.client,
        &namespace,
        &name,
        &bs.spec.admin.token_secret_ref,
        TokenFormat::TokensFile { role: "admin" },
    )
    .await?;
    let target = ctx
        .admin
        .target(&ctx.client, &namespace, &name, &bs.spec)
        .await?;
    Ok((target, token))
}

async fn start(
    ctx: &Context,
    bs: &BankSwitch,
    body: &CreateRotation,
    idempotency_key: &str,
) -> Result<(String, u64), SwitchCallError> {
    let (base, token) = admin_access(ctx, bs).await?;
    let created = ctx
        .admin
        .create_rotation(&base, &token, body, idempotency_key)
        .await?;
    Ok((
        created.id,
        u64::try_from(created.terminals).unwrap_or(u64::MAX),
    ))
}

async fn follow(
    ctx: &Context,
    bs: &BankSwitch,
    spec: &KeyRotationSpec,
    status: KeyRotationStatus,
    rotation_id: &str,
    now: Timestamp,
) -> Result<KeyRotationStatus, SwitchCallError> {
    let (base, token) = admin_access(ctx, bs).await?;
    let progress = ctx.admin.rotation(&base, &token, rotation_id).await?;
    let totals = progress
        .totals
        .into_iter()
        .map(|(state, n)| (state, i64::try_from(n).unwrap_or(i64::MAX)))
        .collect();
    Ok(record_progress(spec, status, rotation_id, totals, now)?)
}

async fn expire_previous(
    ctx: &Context,
    bs: &BankSwitch,
    rotation_id: &str,
) -> Result<u64, SwitchAdminError> {
    let (base, token) = admin_access(ctx, bs).await?;
    Ok(ctx
        .admin
        .expire_previous(&base, &token, rotation_id)
        .await?
        .expired)
}

/// `status` with Ready=False and Degraded=True for `reason`; other conditions and their
/// transition times stay as they were.
fn with_problem(
    mut status: KeyRotationStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> KeyRotationStatus {
    let merged = merge_conditions(
        &status.conditions,
        vec![
            DesiredCondition::new(READY, false, reason, message),
            DesiredCondition::new(DEGRADED, true, reason, message),
        ],
        generation,
        &Time(now),
    );
    let mut conditions: Vec<Condition> = status
        .conditions
        .iter()
        .map(|c| {
            merged
                .iter()
                .find(|m| m.type_ == c.type_)
                .unwrap_or(c)
                .clone()
        })
        .collect();
    for m in merged {
        if !conditions.iter().any(|c| c.type_ == m.type_) {
            conditions.push(m);
        }
    }
    status.conditions = conditions;
    status.observed_generation = generation;
    status
}

/// Writes status with server-side apply, only when it differs from what was last written.
struct StatusWriter<'a> {
    api: &'a Api<KeyRotation>,
    name: &'a str,
    written: KeyRotationStatus,
}

impl StatusWriter<'_> {
    async fn write(&mut self, status: &KeyRotationStatus) -> Result<bool, ReconcileError> {
        if &self.written == status {
            return Ok(false);
        }
        let body = json!({
            "apiVersion": KeyRotation::api_version(&()),
            "kind": KeyRotation::kind(&()),
            "status": status,
        });
        self.api
            .patch_status(
                self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| ReconcileError::Status {
                name: self.name.to_owned(),
                source,
            })?;
        self.written = status.clone();
        Ok(true)
    }
}

async fn publish(ctx: &Context, kr: &KeyRotation, type_: EventType, reason: &str, note: &str) {
    crate::events::publish(&ctx.recorder, &kr.object_ref(&()), type_, reason, note).await;
}

/// A Warning when Degraded turns True (or changes reason), a Normal `Recovered` when it clears:
/// one Event per problem, not one per retry.
async fn publish_transitions(
    ctx: &Context,
    kr: &KeyRotation,
    previous: &KeyRotationStatus,
    next: &KeyRotationStatus,
) {
    let find = |s: &KeyRotationStatus| s.conditions.iter().find(|c| c.type_ == DEGRADED).cloned();
    let (old, new) = (find(previous), find(next));
    let Some(new) = new else { return };
    let was_degraded = old
        .as_ref()
        .is_some_and(|c| c.status == ConditionStatus::True);
    if new.status == ConditionStatus::True {
        let changed = old
            .as_ref()
            .is_none_or(|o| o.status != new.status || o.reason != new.reason);
        if changed {
            publish(ctx, kr, EventType::Warning, &new.reason, &new.message).await;
        }
    } else if was_degraded {
        let reason = old.map(|o| o.reason).unwrap_or_default();
        let note = format!("recovered from {reason}");
        publish(ctx, kr, EventType::Normal, "Recovered", &note).await;
    }
}

/// Runs the KeyRotation controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::new(ctx.watched::<KeyRotation>(), watcher::Config::default());
    let store = controller.store();
    let by_bank_switch = store.clone();
    let controller = controller.watches(
        ctx.watched::<BankSwitch>(),
        watcher::Config::default(),
        // A BankSwitch created, changed or deleted wakes the KeyRotations that point at it.
        move |bs: BankSwitch| {
            let namespace = bs.namespace();
            let name = bs.name_any();
            by_bank_switch
                .state()
                .into_iter()
                .filter(|kr| kr.namespace() == namespace && kr.spec.bank_switch_ref.name == name)
                .map(|kr| ObjectRef::from_obj(&*kr))
                .collect::<Vec<_>>()
        },
    );
    // A deleted KeyRotation is never reconciled again; drop its next-rotation series.
    let metrics = Arc::clone(&ctx.metrics);
    let prune = async move {
        if store.wait_until_ready().await.is_err() {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            metrics.retain_next_rotations(|namespace, name| {
                store.get(&ObjectRef::new(name).within(namespace)).is_some()
            });
        }
    };
    let controller = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => {
                    tracing::debug!(namespace = ?obj.namespace, name = %obj.name, "reconciled")
                }
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        });
    tokio::select! {
        () = controller => {},
        () = prune => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::key_rotation::{
        ActivationSpec, BankSwitchRef, RotationSchedule, TerminalSelector,
    };

    fn spec() -> KeyRotationSpec {
        KeyRotationSpec {
            bank_switch_ref: BankSwitchRef { name: "atm".into() },
            key_types: vec![RotatedKeyType::Tpk],
            terminals: TerminalSelector {
                all: false,
                ids: vec!["ATM00001".into(), "ATM00002".into()],
                groups: vec![],
            },
            schedule: RotationSchedule {
                every: Some("720h".into()),
                cron: None,
            },
            activation: ActivationSpec::default(),
            grace_period: "10m".into(),
            max_concurrent: 100,
            suspend: false,
            history_limit: 10,
        }
    }

    fn t(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn on_confirm_request_names_the_terminals_and_grace() {
        let body = build_create_rotation(&spec(), RotatedKeyType::Tpk, t("2026-02-01T00:00:00Z"))
            .expect("builds");
        assert_eq!(
            serde_json::to_value(&body).expect("json"),
            json!({"keyType": "TPK", "terminals": {"ids": ["ATM00001", "ATM00002"]},
                   "activation": "onConfirm", "graceSeconds": 600, "maxConcurrent": 100})
        );
    }

    #[test]
    fn at_time_activation_counts_from_the_run_start() {
        let mut spec = spec();
        spec.terminals = TerminalSelector {
            all: false,
            ids: vec![],
            groups: vec!["jakarta".into()],
        };
        spec.activation.mode = ActivationMode::AtTime;
        spec.activation.activate_after = Some("30m".into());
        let body = build_create_rotation(&spec, RotatedKeyType::Tak, t("2026-02-01T00:00:00Z"))
            .expect("builds");
        assert_eq!(body.activation, "atTime");
        assert_eq!(
            body.activate_at
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            Some("2026-02-01T00:30:00Z".to_owned())
        );
        assert_eq!(body.terminals, json!({"groups": ["jakarta"]}));
        assert_eq!(body.key_type, "TAK");
    }

    #[test]
    fn at_time_without_a_delay_is_a_spec_error_naming_the_field() {
        let mut spec = spec();
        spec.activation.mode = ActivationMode::AtTime;
        let err = build_create_rotation(&spec, RotatedKeyType::Tpk, t("2026-02-01T00:00:00Z"))
            .expect_err("refused");
        assert!(err.contains("spec.activation.activateAfter"), "{err}");
    }

    #[test]
    fn problem_conditions_keep_other_types_and_transition_times() {
        let at = |s| Time(t(s));
        let status = KeyRotationStatus {
            conditions: merge_conditions(
                &[],
                vec![
                    DesiredCondition::new(READY, true, "AsExpected", ""),
                    DesiredCondition::new(crate::crd::condition::PROGRESSING, false, "Idle", ""),
                    DesiredCondition::new(DEGRADED, false, "AsExpected", ""),
                ],
                Some(1),
                &at("2026-01-01T00:00:00Z"),
            ),
            ..KeyRotationStatus::default()
        };
        let once = with_problem(
            status,
            BANK_SWITCH_NOT_FOUND,
            "gone",
            Some(1),
            t("2026-01-02T00:00:00Z"),
        );
        let twice = with_problem(
            once.clone(),
            BANK_SWITCH_NOT_FOUND,
            "gone",
            Some(1),
            t("2026-01-03T00:00:00Z"),
        );
        assert_eq!(once, twice, "a repeated problem changes nothing");
        let types: Vec<_> = twice.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [READY, crate::crd::condition::PROGRESSING, DEGRADED]);
        assert_eq!(twice.conditions[0].status, ConditionStatus::False);
        assert_eq!(
            twice.conditions[0].last_transition_time,
            at("2026-01-02T00:00:00Z")
        );
        assert_eq!(
            twice.conditions[1].last_transition_time,
            at("2026-01-01T00:00:00Z")
        );
    }

    #[test]
    fn waits_are_exact_and_never_negative() {
        let now = t("2026-01-01T00:00:00Z");
        assert_eq!(
            until_from(now, t("2026-01-31T00:00:00Z")),
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(until_from(now, t("2025-12-31T00:00:00Z")), Duration::ZERO);
    }
}
