//! Reconcile tests against an in-process fake API server: create, change, removal, failed
//! migration, invalid spec, drainer scaling, and the steady state that must make no writes.

mod fake_api;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fake_api::{FakeApi, JobOutcome, Write};
use serde_json::{Value, json};
use switchyard_operator::bank_switch::dereference::{SafStats, SafStatsError, SafStatsSource};
use switchyard_operator::bank_switch::validate::ValidatedBankSwitch;
use switchyard_operator::bank_switch::{Context, reconcile};
use switchyard_operator::crd::BankSwitch;
use switchyard_operator::metrics::Metrics;

const NS: &str = "payments";

struct FixedSaf(Option<SafStats>);

#[async_trait]
impl SafStatsSource for FixedSaf {
    async fn fetch(
        &self,
        _: &kube::Client,
        _: &ValidatedBankSwitch,
    ) -> Result<SafStats, SafStatsError> {
        self.0.clone().ok_or_else(|| SafStatsError::NoToken {
            secret: "test".into(),
            key: "token".into(),
            role: "viewer",
        })
    }
}

fn bs_path(name: &str) -> String {
    format!("/apis/switchyard.io/v1alpha1/namespaces/{NS}/bankswitches/{name}")
}
fn deploy_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}")
}
fn pdb_path(name: &str) -> String {
    format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{name}")
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("yaml");
    serde_json::to_value(yaml).expect("json")
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

/// Creates every Secret (with its key) that a spec's `*SecretRef` fields name, so the operator's
/// Secret check passes unless a test removes one.
fn insert_referenced_secrets(fake: &FakeApi, bankswitch: &str, spec: &Value) {
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k.ends_with("SecretRef")
                        && let (Some(name), Some(key)) =
                            (child["name"].as_str(), child["key"].as_str())
                    {
                        out.push((name.to_owned(), key.to_owned()));
                    } else {
                        walk(child, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(spec, &mut refs);
    for (name, key) in refs {
        let path = secret_path(&name);
        let mut secret = fake.get(&path).unwrap_or_else(|| {
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": name, "namespace": NS,
                                "labels": {"switchyard.io/bankswitch": bankswitch}},
                   "data": {}})
        });
        // base64 of a placeholder value; only presence is checked
        secret["data"][key] = json!("cGxhY2Vob2xkZXI=");
        fake.insert(&path, secret);
    }
}

struct Harness {
    fake: FakeApi,
    ctx: Arc<Context>,
    name: String,
}

impl Harness {
    fn new(
        fixture_name: &str,
        outcome: JobOutcome,
        monitoring_api: bool,
        saf: Option<SafStats>,
    ) -> Self {
        let fake = FakeApi::new(outcome, monitoring_api);
        let obj = fixture(fixture_name);
        let name = obj["metadata"]["name"].as_str().expect("name").to_owned();
        insert_referenced_secrets(&fake, &name, &obj["spec"]);
        fake.insert(&bs_path(&name), obj);
        let ctx = Arc::new(Context::new(
            fake.client(),
            Arc::new(Metrics::default()),
            Arc::new(FixedSaf(saf)),
            Some("test".into()),
        ));
        Self { fake, ctx, name }
    }

    /// The BankSwitch as the API server holds it now.
    fn current(&self) -> BankSwitch {
        serde_json::from_value(self.fake.get(&bs_path(&self.name)).expect("stored"))
            .expect("BankSwitch")
    }

    /// Edits the stored BankSwitch spec like `kubectl apply` would (bumping generation).
    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut obj = self.fake.get(&bs_path(&self.name)).expect("stored");
        f(&mut obj["spec"]);
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        self.fake.insert(&bs_path(&self.name), obj);
    }

    async fn reconcile(&self) -> Vec<Write> {
        self.fake.clear_writes();
        reconcile(Arc::new(self.current()), Arc::clone(&self.ctx))
            .await
            .expect("reconcile succeeds");
        self.fake.writes()
    }

    fn condition(&self, type_: &str) -> Value {
        self.fake.condition(&bs_path(&self.name), type_)
    }

    fn event_reasons(&self) -> Vec<String> {
        self.fake.event_reasons(NS)
    }
}

fn patched(writes: &[Write], path: &str) -> bool {
    writes.iter().any(|w| w.method == "PATCH" && w.path == path)
}

#[tokio::test]
async fn create_applies_every_object_and_reports_ready() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    let writes = h.reconcile().await;
    for path in [
        format!("/api/v1/namespaces/{NS}/configmaps/demo-config"),
        format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/demo-data"),
        format!("/api/v1/namespaces/{NS}/services/demo-iso"),
        format!("/api/v1/namespaces/{NS}/services/demo-admin"),
        deploy_path("demo-switch"),
        format!("{}/status", bs_path("demo")),
    ] {
        assert!(
            patched(&writes, &path),
            "expected an apply of {path}; writes: {writes:?}"
        );
    }
    let dep = h.fake.get(&deploy_path("demo-switch")).expect("deployment");
    assert_eq!(
        dep["metadata"]["ownerReferences"][0]["uid"],
        "6f1c2a9e-0000-4000-8000-000000000001"
    );
    assert_eq!(h.condition("Ready")["status"], "True");
    assert_eq!(h.condition("DatabaseMigrated")["reason"], "MigratesOnStart");
    assert!(
        h.condition("Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not for production"),
        "embedded mode must say it is not for production"
    );
    let status = h.current().status.expect("status");
    assert_eq!(status.ready_replicas, 1);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.endpoints.expect("endpoints").iso8583,
        "demo-iso.payments.svc:8583"
    );
}

#[tokio::test]
async fn second_pass_of_an_unchanged_object_makes_no_writes() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    assert!(!h.reconcile().await.is_empty());
    let ready_since = h.condition("Ready")["lastTransitionTime"].clone();
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![], "steady state must not write");
    assert_eq!(h.condition("Ready")["lastTransitionTime"], ready_since);
}

#[tokio::test]
async fn postgres_steady_state_with_drainers_and_monitoring_makes_no_writes() {
    let saf = SafStats {
        backlog: 450,
        in_flight: 2,
        oldest_age_seconds: 30,
        dead_letters: 0,
        ..SafStats::default()
    };
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, Some(saf));
    h.reconcile().await;
    // The first pass saw no ready switch yet (the Deployment was created in it); the second
    // reads the backlog and scales the drainers; the third must be quiet.
    h.reconcile().await;
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![], "steady state must not write");
}

#[tokio::test]
async fn spec_change_patches_the_config_and_rolls_the_deployment() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.reconcile().await;
    let hash_before = h.fake.get(&deploy_path("demo-switch")).expect("dep")["spec"]["template"]
        ["metadata"]["annotations"]["switchyard.io/config-hash"]
        .clone();
    h.edit(|spec| spec["storeAndForward"] = json!({"maxAttempts": 25}));
    let writes = h.reconcile().await;
    assert!(patched(
        &writes,
        &format!("/api/v1/namespaces/{NS}/configmaps/demo-config")
    ));
    assert!(patched(&writes, &deploy_path("demo-switch")));
    assert!(
        !patched(
            &writes,
            &format!("/api/v1/namespaces/{NS}/services/demo-iso")
        ),
        "unchanged objects are not re-applied"
    );
    let dep = h.fake.get(&deploy_path("demo-switch")).expect("dep");
    assert_ne!(
        dep["spec"]["template"]["metadata"]["annotations"]["switchyard.io/config-hash"],
        hash_before
    );
    let config = h
        .fake
        .get(&format!("/api/v1/namespaces/{NS}/configmaps/demo-config"))
        .expect("cm");
    assert!(
        config["data"]["switch.toml"]
            .as_str()
            .unwrap_or_default()
            .contains("max_attempts = 25")
    );
    assert_eq!(
        h.current().status.expect("status").observed_generation,
        Some(2)
    );
}

#[tokio::test]
async fn removed_feature_deletes_our_object_but_never_a_foreign_one() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, None);
    h.reconcile().await;
    assert!(
        h.fake.get(&pdb_path("acquirer-switch")).is_some(),
        "3 replicas get a PDB"
    );
    assert!(
        h.fake
            .get(&format!(
                "/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/acquirer"
            ))
            .is_some()
    );

    h.edit(|spec| {
        spec["replicas"] = json!(1);
        spec["monitoring"]["serviceMonitor"]["enabled"] = json!(false);
    });
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .any(|w| w.method == "DELETE" && w.path == pdb_path("acquirer-switch"))
    );
    assert!(h.fake.get(&pdb_path("acquirer-switch")).is_none());
    assert!(
        h.fake
            .get(&format!(
                "/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/acquirer"
            ))
            .is_none()
    );

    // Someone else's ServiceMonitor with the same name is left alone.
    let foreign = json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": "acquirer", "namespace": NS, "labels": {"team": "observability"}},
        "spec": {"endpoints": []}});
    h.fake.insert(
        &format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/acquirer"),
        foreign,
    );
    let writes = h.reconcile().await;
    assert!(
        !writes.iter().any(|w| w.method == "DELETE"),
        "foreign object deleted: {writes:?}"
    );
    assert!(
        h.fake
            .get(&format!(
                "/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/acquirer"
            ))
            .is_some()
    );
}

#[tokio::test]
async fn failed_migration_holds_the_rollout_and_says_so() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Failed, true, None);
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .any(|w| w.path.contains("/jobs/acquirer-migrate-")),
        "Job applied"
    );
    assert!(
        h.fake.get(&deploy_path("acquirer-switch")).is_none(),
        "no rollout before migration"
    );
    let migrated = h.condition("DatabaseMigrated");
    assert_eq!(migrated["status"], "False");
    assert_eq!(migrated["reason"], "MigrationFailed");
    assert!(
        migrated["message"]
            .as_str()
            .unwrap_or_default()
            .contains("backoff limit")
    );
    assert_eq!(h.condition("Degraded")["status"], "True");
    assert_eq!(
        h.condition("Progressing")["reason"],
        "MigrationFailed",
        "rollout is held"
    );
    assert!(
        h.event_reasons().contains(&"MigrationFailed".to_owned()),
        "events: {:?}",
        h.event_reasons()
    );
    // And it does not hot-loop: nothing changes on the next pass.
    assert_eq!(h.reconcile().await, vec![]);
}

#[tokio::test]
async fn running_migration_waits_then_rolls_out_after_success() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Running, true, None);
    h.reconcile().await;
    assert!(h.fake.get(&deploy_path("acquirer-switch")).is_none());
    assert_eq!(
        h.condition("DatabaseMigrated")["reason"],
        "MigrationRunning"
    );
    assert_eq!(h.condition("Progressing")["status"], "True");
    // The Job controller finishes the Job.
    let prefix = format!("/apis/batch/v1/namespaces/{NS}/jobs/");
    let job = h.fake.names_under(&prefix).pop().expect("a job");
    let mut obj = h.fake.get(&format!("{prefix}{job}")).expect("job");
    obj["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    h.fake.insert(&format!("{prefix}{job}"), obj);
    h.reconcile().await;
    assert!(h.fake.get(&deploy_path("acquirer-switch")).is_some());
    assert_eq!(h.condition("DatabaseMigrated")["status"], "True");
    assert_eq!(
        h.current()
            .status
            .expect("status")
            .migrated_image
            .as_deref(),
        Some("registry.example/switchyard/switch:1.4.2")
    );
}

#[tokio::test]
async fn invalid_spec_gets_a_condition_and_an_event_and_nothing_else() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.edit(|spec| spec["replicas"] = json!(3));
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "{writes:?}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.database")
    );
    assert!(h.event_reasons().contains(&"InvalidSpec".to_owned()));
    assert_eq!(
        h.reconcile().await,
        vec![],
        "waits for a change, no hot loop"
    );
}

#[tokio::test]
async fn drainers_scale_from_the_backlog() {
    let saf = SafStats {
        backlog: 450,
        in_flight: 0,
        oldest_age_seconds: 12,
        dead_letters: 1,
        ..SafStats::default()
    };
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, Some(saf));
    h.reconcile().await; // creates the switch; no ready pod to ask yet → minReplicas
    let drainer = h
        .fake
        .get(&deploy_path("acquirer-drainer"))
        .expect("drainer");
    assert_eq!(drainer["spec"]["replicas"], 1);
    h.reconcile().await;
    let drainer = h
        .fake
        .get(&deploy_path("acquirer-drainer"))
        .expect("drainer");
    assert_eq!(drainer["spec"]["replicas"], 3, "ceil(450 / 200) = 3");
    let saf = h
        .current()
        .status
        .expect("status")
        .store_and_forward
        .expect("saf");
    assert_eq!(
        (saf.backlog, saf.dead_letters, saf.drainer_replicas),
        (450, 1, 3)
    );
}

#[tokio::test]
async fn unreachable_switch_keeps_drainers_and_says_why() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, None);
    h.reconcile().await;
    h.reconcile().await;
    let saf = h
        .current()
        .status
        .expect("status")
        .store_and_forward
        .expect("saf");
    assert_eq!(saf.drainer_replicas, 1);
    assert!(
        saf.scaling_reason.contains("switch unreachable"),
        "{}",
        saf.scaling_reason
    );
}

#[tokio::test]
async fn monitoring_without_the_api_is_a_condition_not_an_error() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, false, None);
    let writes = h.reconcile().await;
    assert!(
        !writes
            .iter()
            .any(|w| w.path.contains("monitoring.coreos.com"))
    );
    let cond = h.condition("MonitoringConfigured");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "MonitoringApiNotServed");
}

#[tokio::test]
async fn paused_object_gets_no_changes() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.reconcile().await;
    h.edit(|spec| {
        spec["paused"] = json!(true);
        spec["image"] = json!("registry.example/switchyard/switch:9.9.9");
    });
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "{writes:?}"
    );
    let dep = h.fake.get(&deploy_path("demo-switch")).expect("dep");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/switchyard/switch:0.1.0"
    );
    assert_eq!(h.condition("Progressing")["reason"], "Paused");
}

#[tokio::test]
async fn turning_all_monitoring_off_deletes_both_objects() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, None);
    h.reconcile().await;
    let sm = format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/acquirer");
    let pr = format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/prometheusrules/acquirer");
    assert!(h.fake.get(&sm).is_some() && h.fake.get(&pr).is_some());
    h.edit(|spec| spec["monitoring"] = json!({}));
    let writes = h.reconcile().await;
    let deleted: Vec<_> = writes
        .iter()
        .filter(|w| w.method == "DELETE")
        .map(|w| w.path.clone())
        .collect();
    assert_eq!(deleted, vec![sm.clone(), pr.clone()]);
    assert_eq!(
        h.condition("MonitoringConfigured")["reason"],
        "NotRequested"
    );
}

#[tokio::test]
async fn failing_api_calls_are_visible_in_status_and_clear_on_success() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.fake.fail_writes_to(Some("/configmaps/"));
    for attempt in 1..=2 {
        let err = reconcile(Arc::new(h.current()), Arc::clone(&h.ctx))
            .await
            .expect_err("apply fails");
        assert!(
            err.to_string()
                .contains("failed to apply ConfigMap demo-config"),
            "{err}"
        );
        let retry = h
            .current()
            .status
            .expect("status")
            .retry
            .expect("retry info");
        assert_eq!(retry.failed_attempts, attempt);
        assert!(
            retry.last_failure.contains("etcdserver: request timed out"),
            "{}",
            retry.last_failure
        );
        assert!(retry.next_retry_time.is_some());
    }
    assert!(h.event_reasons().contains(&"ReconcileFailed".to_owned()));
    h.fake.fail_writes_to(None);
    h.reconcile().await;
    assert_eq!(
        h.current().status.expect("status").retry,
        None,
        "success clears the retry info"
    );
}

#[tokio::test]
async fn missing_secret_is_degraded_in_one_reconcile_with_one_event_and_nothing_applied() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.fake.remove(&secret_path("demo-keys"));
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "nothing may be applied before the Secrets exist: {writes:?}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotFound");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.keys.lmkSecretRef") && message.contains("demo-keys"),
        "{message}"
    );
    assert_eq!(h.condition("Ready")["reason"], "SecretNotFound");
    let status = h.current().status.expect("status");
    assert_eq!(
        status.conditions[0].type_, "Ready",
        "Ready first: the Status column"
    );
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == "SecretNotFound")
            .count(),
        1
    );
    // Still missing: no new Event, no write.
    assert_eq!(h.reconcile().await, vec![]);
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == "SecretNotFound")
            .count(),
        1
    );
    // Created: the next reconcile applies everything and clears the condition.
    insert_referenced_secrets(&h.fake, "demo", &fixture("embedded-minimal.yaml")["spec"]);
    let writes = h.reconcile().await;
    assert!(patched(&writes, &deploy_path("demo-switch")), "{writes:?}");
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert_eq!(h.condition("Ready")["status"], "True");
}

#[tokio::test]
async fn missing_secret_key_is_named() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    let mut secret = h.fake.get(&secret_path("demo-admin")).expect("secret");
    secret["data"] = json!({"other": "eA=="});
    h.fake.insert(&secret_path("demo-admin"), secret);
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "SecretKeyMissing");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.admin.tokenSecretRef") && message.contains("tokens"),
        "{message}"
    );
    assert!(h.event_reasons().contains(&"SecretKeyMissing".to_owned()));
}

#[tokio::test]
async fn a_crashing_switch_container_is_quoted_in_degraded() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    h.reconcile().await;
    h.fake.insert(
        &format!("/api/v1/namespaces/{NS}/pods/demo-switch-abc"),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo-switch-abc", "namespace": NS, "labels": {
                "app.kubernetes.io/name": "switchyard", "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "switch"}},
            "status": {"containerStatuses": [{"name": "switch", "ready": false, "restartCount": 4,
                "image": "i", "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 78,
                    "message": "keys.lmk_file: the LMK must be 64 hex digits (32 bytes)"}}}]}}),
    );
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SwitchFailing");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("64 hex digits") && message.contains("code 78"),
        "{message}"
    );
    assert_eq!(h.condition("Ready")["reason"], "SwitchFailing");
}

#[tokio::test]
async fn external_drainer_autoscaler_leaves_replicas_alone() {
    let saf = SafStats {
        backlog: 450,
        in_flight: 0,
        oldest_age_seconds: 12,
        dead_letters: 0,
        ..SafStats::default()
    };
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, Some(saf));
    h.edit(|spec| spec["storeAndForward"]["drainers"]["autoscaler"] = json!("external"));
    h.reconcile().await;
    h.reconcile().await;
    let drainer = h
        .fake
        .get(&deploy_path("acquirer-drainer"))
        .expect("drainer");
    assert!(
        drainer["spec"].get("replicas").is_none(),
        "replicas must not be in our apply: {}",
        drainer["spec"]
    );
    let status = h.current().status.expect("status");
    let saf = status.store_and_forward.expect("saf");
    assert_eq!(saf.backlog, 450);
    assert!(
        saf.scaling_reason.contains("external"),
        "{}",
        saf.scaling_reason
    );
}

#[tokio::test]
async fn status_carries_the_scale_selector_and_ready_column() {
    let h = Harness::new("postgres-full.yaml", JobOutcome::Complete, true, None);
    h.reconcile().await;
    h.reconcile().await;
    let status = h.current().status.expect("status");
    assert_eq!(status.ready, "3/3");
    assert_eq!(
        status.selector,
        "app.kubernetes.io/component=switch,app.kubernetes.io/instance=acquirer,app.kubernetes.io/name=switchyard"
    );
}

#[tokio::test]
async fn secret_without_the_opt_in_label_is_a_condition_not_a_read() {
    let h = Harness::new("embedded-minimal.yaml", JobOutcome::Complete, false, None);
    let path = secret_path("demo-admin");
    let mut secret = h.fake.get(&path).expect("secret");
    secret["metadata"]["labels"] = json!({"switchyard.io/bankswitch": "someone-else"});
    h.fake.insert(&path, secret);

    let writes = h.reconcile().await;
    // nothing applied: only the status and the Event
    assert!(!patched(&writes, &deploy_path("demo-switch")), "{writes:?}");
    assert!(
        !writes.iter().any(|w| w.path.contains("/configmaps/")),
        "{writes:?}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotLabeled");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.admin.tokenSecretRef")
            && message.contains("kubectl label secret demo-admin switchyard.io/bankswitch=demo"),
        "{message}"
    );
    // its data was never fetched: only its metadata (labelled Secrets are read whole)
    let full = h.fake.full_reads();
    assert!(!full.contains(&path), "{full:?}");
    assert!(full.contains(&secret_path("demo-keys")), "{full:?}");
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == "SecretNotLabeled")
            .count(),
        1
    );
    // unchanged: no write, no second Event
    assert_eq!(h.reconcile().await, vec![]);
    assert_eq!(h.event_reasons().len(), 1);

    // labelled for this BankSwitch: everything is applied
    let mut secret = h.fake.get(&path).expect("secret");
    secret["metadata"]["labels"] = json!({"switchyard.io/bankswitch": "demo"});
    h.fake.insert(&path, secret);
    let writes = h.reconcile().await;
    assert!(patched(&writes, &deploy_path("demo-switch")), "{writes:?}");
    assert_eq!(h.condition("Ready")["status"], "True");
}

fn certificate_path(name: &str) -> String {
    format!("/apis/cert-manager.io/v1/namespaces/{NS}/certificates/{name}")
}

#[tokio::test]
async fn issuer_ref_without_cert_manager_is_a_condition_and_one_event_not_a_crash_loop() {
    let h = Harness::new("tls-cert-manager.yaml", JobOutcome::Complete, false, None);
    let writes = h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "CertManagerApiNotServed");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.tls.secretName"),
        "the message names the way out"
    );
    assert_eq!(h.condition("Ready")["status"], "False");
    // nothing applied (the pods could never mount the Secret), only status and the Event
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "{writes:?}"
    );
    assert_eq!(h.event_reasons(), ["CertManagerApiNotServed"]);
    // the next passes: the reconcile succeeds (no error backoff), no writes, no new Event
    assert_eq!(h.reconcile().await, vec![]);
    assert_eq!(h.reconcile().await, vec![]);
    assert_eq!(h.event_reasons().len(), 1);
}

#[tokio::test]
async fn issuer_ref_applies_the_certificate_and_waits_for_its_secret() {
    let h = Harness::new("tls-cert-manager.yaml", JobOutcome::Complete, false, None);
    h.fake.set_cert_manager_api(true);
    let writes = h.reconcile().await;
    assert!(
        patched(&writes, &certificate_path("secure-switch")),
        "{writes:?}"
    );
    let cert = h
        .fake
        .get(&certificate_path("secure-switch"))
        .expect("Certificate");
    assert_eq!(cert["spec"]["secretName"], "secure-tls");
    assert!(
        !patched(&writes, &deploy_path("secure-switch")),
        "{writes:?}"
    );
    assert_eq!(h.condition("Degraded")["reason"], "CertificateNotIssued");

    // cert-manager issues the Secret (with the label from secretTemplate)
    h.fake.insert(
        &secret_path("secure-tls"),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "secure-tls", "namespace": NS,
                            "labels": {"switchyard.io/bankswitch": "secure"}},
               "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "ca.crt": "Y2E="}}),
    );
    let writes = h.reconcile().await;
    for path in [
        deploy_path("secure-switch"),
        format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/secure-switch"),
        format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/secure-drainer"),
    ] {
        assert!(patched(&writes, &path), "expected {path}: {writes:?}");
    }
    assert_eq!(h.condition("Ready")["status"], "True");
    // the pass that created the Deployment saw no ready switch yet; the one after it settles
    h.reconcile().await;
    // steady state, the Certificate included: nothing written
    assert_eq!(h.reconcile().await, vec![]);

    // tls removed: the Certificate goes (ours), the Secret stays (cert-manager's)
    h.edit(|spec| {
        spec.as_object_mut().expect("spec").remove("tls");
    });
    h.reconcile().await;
    assert!(h.fake.get(&certificate_path("secure-switch")).is_none());
    // networkPolicy off: both policies go
    h.edit(|spec| spec["networkPolicy"]["enabled"] = json!(false));
    h.reconcile().await;
    assert!(
        h.fake
            .names_under(&format!(
                "/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/"
            ))
            .is_empty()
    );
}

#[tokio::test]
async fn simulator_is_applied_when_enabled_and_removed_when_turned_off() {
    let h = Harness::new("embedded-simulator.yaml", JobOutcome::Complete, false, None);
    let writes = h.reconcile().await;
    let service = format!("/api/v1/namespaces/{NS}/services/staging-atm");
    assert!(patched(&writes, &deploy_path("staging-atm")), "{writes:?}");
    assert!(patched(&writes, &service), "{writes:?}");
    h.reconcile().await;
    assert_eq!(h.reconcile().await, vec![], "steady state with the web ATM");
    h.edit(|spec| spec["simulator"]["enabled"] = json!(false));
    h.reconcile().await;
    assert!(h.fake.get(&deploy_path("staging-atm")).is_none());
    assert!(h.fake.get(&service).is_none());
    assert!(h.fake.get(&deploy_path("staging-switch")).is_some());
}

#[tokio::test]
async fn cnpg_cluster_app_secret_is_checked_in_one_reconcile_then_mounted() {
    let h = Harness::new("postgres-cnpg.yaml", JobOutcome::Complete, false, None);
    // CloudNativePG has not made `<cluster>-app` yet (or it lacks our label): named at once
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "nothing may be applied before the Secret exists: {writes:?}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "SecretNotFound");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.database.cnpg.clusterRef") && message.contains("payments-db-app"),
        "{message}"
    );
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == "SecretNotFound")
            .count(),
        1
    );
    // CloudNativePG's Secret, labelled through the Cluster's inheritedMetadata
    h.fake.insert(
        &secret_path("payments-db-app"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "payments-db-app", "namespace": NS,
                            "labels": {"switchyard.io/bankswitch": "atm",
                                       "cnpg.io/cluster": "payments-db"}},
               "type": "kubernetes.io/basic-auth",
               "data": {"username": "YXBw", "password": "eA==", "uri": "cG9zdGdyZXNxbDovL3g="}}),
    );
    let writes = h.reconcile().await;
    assert!(patched(&writes, &deploy_path("atm-switch")), "{writes:?}");
    assert_eq!(h.condition("Degraded")["status"], "False");
    let dep = h.fake.get(&deploy_path("atm-switch")).expect("deployment");
    let sources = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "secrets")
        .unwrap()["projected"]["sources"]
        .clone();
    assert!(
        sources
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["secret"]["name"] == "payments-db-app"
                && s["secret"]["items"][0] == json!({"key": "uri", "path": "database/url"})),
        "{sources}"
    );
}

#[tokio::test]
async fn database_with_both_a_url_secret_and_cnpg_is_an_invalid_spec() {
    let h = Harness::new("postgres-cnpg.yaml", JobOutcome::Complete, false, None);
    h.edit(|spec| spec["database"]["urlSecretRef"] = json!({"name": "atm-db", "key": "url"}));
    let writes = h.reconcile().await;
    assert!(
        writes
            .iter()
            .all(|w| w.path.ends_with("/status") || w.path.contains("/events")),
        "{writes:?}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exactly one of urlSecretRef"),
        "{degraded}"
    );
    assert!(h.event_reasons().contains(&"InvalidSpec".to_owned()));
}

#[tokio::test]
async fn backup_volume_is_applied_unowned_and_rendered_into_the_config() {
    let h = Harness::new("embedded-backup.yaml", JobOutcome::Complete, false, None);
    let writes = h.reconcile().await;
    let pvc_path = format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/demo-backup");
    assert!(patched(&writes, &pvc_path), "{writes:?}");
    let pvc = h.fake.get(&pvc_path).expect("backup claim");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "10Gi");
    assert_eq!(pvc["spec"]["storageClassName"], "backup-hdd");
    // deleting the BankSwitch must not garbage-collect the backups
    assert!(pvc["metadata"]["ownerReferences"].is_null(), "{pvc}");
    let config = h
        .fake
        .get(&format!("/api/v1/namespaces/{NS}/configmaps/demo-config"))
        .expect("config")["data"]["switch.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        config.contains("[backup]")
            && config.contains("schedule = \"0 * * * *\"")
            && config.contains("dir = \"/var/lib/switchyard-backups\"")
            && config.contains("retain = 24"),
        "{config}"
    );
    assert_eq!(h.condition("Ready")["status"], "True");
    assert_eq!(h.reconcile().await, vec![], "steady state must not write");
}

#[tokio::test]
async fn backup_with_postgres_is_an_invalid_spec_with_an_event() {
    let h = Harness::new("postgres-cnpg.yaml", JobOutcome::Complete, false, None);
    h.edit(|spec| spec["backup"] = json!({"schedule": "0 * * * *"}));
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.backup") && message.contains("CloudNativePG"),
        "{message}"
    );
    assert!(h.event_reasons().contains(&"InvalidSpec".to_owned()));
    assert!(
        h.fake
            .get(&format!(
                "/api/v1/namespaces/{NS}/persistentvolumeclaims/atm-backup"
            ))
            .is_none()
    );
}
