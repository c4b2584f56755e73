//! `spec.hibernation` reconcile tests on the fake API server, with the switch's maintenance API
//! played by the fake switch over real HTTP: enable → draining (pods asked once, replicas kept)
//! → drained → switch and drainers at zero with `Hibernated=True`; a drain that times out; and
//! disable → replicas restored, `Hibernated=False`.

#[allow(dead_code)]
mod fake_api;
#[allow(dead_code)]
mod fake_switch;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fake_api::{FakeApi, JobOutcome};
use fake_switch::{ADMIN_TOKEN, FakeSwitch};
use serde_json::{Value, json};
use switchyard_operator::bank_switch::dereference::{SafStats, SafStatsError, SafStatsSource};
use switchyard_operator::bank_switch::hibernation::HttpMaintenance;
use switchyard_operator::bank_switch::validate::ValidatedBankSwitch;
use switchyard_operator::bank_switch::{Context, reconcile};
use switchyard_operator::crd::BankSwitch;
use switchyard_operator::metrics::Metrics;
use switchyard_operator::switch_admin::{AdminEndpoint, SwitchAdmin};

const NS: &str = "payments";
const NAME: &str = "acquirer";

struct FixedSaf;

#[async_trait]
impl SafStatsSource for FixedSaf {
    async fn fetch(
        &self,
        _: &kube::Client,
        _: &ValidatedBankSwitch,
    ) -> Result<SafStats, SafStatsError> {
        Ok(SafStats {
            backlog: 450,
            in_flight: 2,
            ..SafStats::default()
        })
    }
}

fn bs_path() -> String {
    format!("/apis/switchyard.io/v1alpha1/namespaces/{NS}/bankswitches/{NAME}")
}
fn deploy_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}")
}

/// Every Secret the postgres-full fixture names, labelled for it; the admin tokens file holds
/// the fake switch's admin token.
fn insert_secrets(fake: &FakeApi) {
    let secrets: [(&str, &[(&str, &str)]); 5] = [
        ("acquirer-db", &[("url", "postgres://x")]),
        ("acquirer-keys", &[("lmk", "00"), ("kek", "00")]),
        ("acquirer-admin", &[("tokens", "")]),
        ("acquirer-operator-token", &[("token", "viewer-token")]),
        ("issuer-b-link", &[("tmk", "00")]),
    ];
    for (name, keys) in secrets {
        let mut data = serde_json::Map::new();
        for (k, v) in keys {
            let v = if *k == "tokens" {
                format!("admin:{ADMIN_TOKEN}\n")
            } else {
                (*v).to_owned()
            };
            data.insert((*k).to_owned(), fake_api::secret_value(v.as_bytes()));
        }
        fake.insert(
            &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": name, "namespace": NS,
                                "labels": {"switchyard.io/bankswitch": NAME}},
                   "data": data}),
        );
    }
}

/// A running switch pod, as the Deployment controller would make it.
fn insert_pod(fake: &FakeApi, name: &str) {
    fake.insert(
        &format!("/api/v1/namespaces/{NS}/pods/{name}"),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": NS, "labels": {
                   "app.kubernetes.io/name": "switchyard",
                   "app.kubernetes.io/instance": NAME,
                   "app.kubernetes.io/component": "switch"}},
               "status": {"phase": "Running", "podIP": "10.0.0.7"}}),
    );
}

struct Harness {
    fake: FakeApi,
    switch: FakeSwitch,
    ctx: Arc<Context>,
}

impl Harness {
    async fn new() -> Self {
        let switch = FakeSwitch::start(&[]).await;
        let fake = FakeApi::new(JobOutcome::Complete, false);
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/postgres-full.yaml");
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("yaml");
        let mut obj = serde_json::to_value(yaml).expect("json");
        // monitoring needs an API this fake does not serve; not what these tests are about
        obj["spec"]["monitoring"] = json!({});
        fake.insert(&bs_path(), obj);
        insert_secrets(&fake);
        let admin =
            SwitchAdmin::new(AdminEndpoint::Fixed(switch.base_url.clone())).expect("http client");
        let ctx = Arc::new(
            Context::new(
                fake.client(),
                Arc::new(Metrics::default()),
                Arc::new(FixedSaf),
                Some("test".into()),
            )
            .with_maintenance(Arc::new(HttpMaintenance::new(admin))),
        );
        let h = Self { fake, switch, ctx };
        // the BankSwitch runs: Deployments applied, drainers scaled from the backlog
        h.reconcile().await;
        h.reconcile().await;
        insert_pod(&h.fake, "acquirer-switch-abc");
        h
    }

    fn current(&self) -> BankSwitch {
        serde_json::from_value(self.fake.get(&bs_path()).expect("stored")).expect("BankSwitch")
    }

    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut obj = self.fake.get(&bs_path()).expect("stored");
        f(&mut obj["spec"]);
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        self.fake.insert(&bs_path(), obj);
    }

    /// Rewrites `status.hibernation.startedAt` as if the drain had begun `secs` ago.
    fn started_ago(&self, secs: i64) {
        let mut obj = self.fake.get(&bs_path()).expect("stored");
        let ts = k8s_openapi::jiff::Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .expect("time");
        obj["status"]["hibernation"]["startedAt"] = json!(ts.to_string());
        self.fake.insert(&bs_path(), obj);
    }

    async fn reconcile(&self) -> kube::runtime::controller::Action {
        self.fake.clear_writes();
        reconcile(Arc::new(self.current()), Arc::clone(&self.ctx))
            .await
            .expect("reconcile succeeds")
    }

    fn replicas(&self, deployment: &str) -> Option<i64> {
        self.fake.get(&deploy_path(deployment)).expect("deployment")["spec"]["replicas"].as_i64()
    }

    fn condition(&self, type_: &str) -> Value {
        self.fake.condition(&bs_path(), type_)
    }

    fn event_reasons(&self) -> Vec<String> {
        self.fake.event_reasons(NS)
    }

    fn hibernate_calls(&self) -> usize {
        self.switch
            .calls_to("POST", "/v1/maintenance/hibernate")
            .len()
    }
}

#[tokio::test]
async fn enable_drains_then_scales_to_zero_and_disable_restores() {
    let h = Harness::new().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(3));
    let drainers_before = h.replicas("acquirer-drainer").expect("drainer replicas");
    assert!(drainers_before > 0);
    assert!(h.condition("Hibernated").is_null(), "absent until used");

    // enable: the pod is asked once, replicas stay while it drains
    h.switch.set_maintenance("serving", 12);
    h.edit(|spec| spec["hibernation"] = json!({"enabled": true, "drainTimeout": "10m"}));
    let action = h.reconcile().await;
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
    );
    assert_eq!(h.hibernate_calls(), 1);
    let body = &h.switch.calls_to("POST", "/v1/maintenance/hibernate")[0].body;
    assert_eq!(body["drainTimeoutSeconds"], 600, "{body}");
    assert_eq!(h.switch.maintenance_state(), "draining");
    assert_eq!(h.replicas("acquirer-switch"), Some(3));
    assert_eq!(
        h.replicas("acquirer-drainer"),
        Some(drainers_before),
        "drainers keep delivering"
    );
    let hibernated = h.condition("Hibernated");
    assert_eq!(hibernated["status"], "False");
    assert_eq!(hibernated["reason"], "Hibernating");
    assert_eq!(h.condition("Ready")["reason"], "Hibernating");
    let status = h.current().status.expect("status");
    let hib = status.hibernation.expect("status.hibernation");
    assert_eq!(
        (hib.previous_replicas, hib.previous_drainer_replicas),
        (3, drainers_before as i32)
    );

    // still draining: asked again with a GET only, no second POST (it would be audited)
    h.switch.set_maintenance("draining", 4);
    h.reconcile().await;
    assert_eq!(h.hibernate_calls(), 1);
    assert_eq!(
        h.current()
            .status
            .expect("status")
            .hibernation
            .expect("h")
            .saf_backlog,
        4
    );

    // drained: scaled to zero, Hibernated=True
    h.switch.set_maintenance("drained", 0);
    h.reconcile().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(0));
    assert_eq!(h.replicas("acquirer-drainer"), Some(0));
    let hibernated = h.condition("Hibernated");
    assert_eq!(hibernated["status"], "True");
    assert_eq!(hibernated["reason"], "Drained");
    assert_eq!(
        h.condition("Ready")["reason"],
        "Hibernated",
        "the Status column says it"
    );
    let status = h.current().status.expect("status");
    assert_eq!(status.ready, "0/0");
    assert_eq!(
        status.store_and_forward.expect("saf").drainer_replicas,
        0,
        "the drainer autoscaler does not bring them back"
    );
    let reasons = h.event_reasons();
    assert!(reasons.iter().any(|r| r == "Hibernating"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "Drained"), "{reasons:?}");

    // hibernated and unchanged: no calls to the (gone) switch, no writes
    h.switch.clear_calls();
    h.reconcile().await;
    h.reconcile().await;
    assert!(h.switch.calls().is_empty(), "{:?}", h.switch.calls());
    assert_eq!(
        h.fake.writes(),
        vec![],
        "a hibernated steady state makes no writes"
    );

    // disable: replicas back, Hibernated=False/Resumed, status.hibernation gone
    h.edit(|spec| spec["hibernation"]["enabled"] = json!(false));
    h.reconcile().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(3));
    assert!(
        h.replicas("acquirer-drainer").expect("drainers") >= drainers_before,
        "drainers restored"
    );
    let hibernated = h.condition("Hibernated");
    assert_eq!(hibernated["status"], "False");
    assert_eq!(hibernated["reason"], "Resumed");
    assert!(h.current().status.expect("status").hibernation.is_none());
    assert!(h.event_reasons().iter().any(|r| r == "Resumed"));
}

#[tokio::test]
async fn a_drain_that_times_out_scales_to_zero_and_says_what_was_left() {
    let h = Harness::new().await;
    h.switch.set_maintenance("serving", 9);
    h.edit(|spec| spec["hibernation"] = json!({"enabled": true, "drainTimeout": "2m"}));
    h.reconcile().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(3));

    // the pod says it timed out with a backlog, and the timeout has passed
    h.switch.set_maintenance("timedOut", 9);
    h.started_ago(121);
    h.reconcile().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(0));
    assert_eq!(h.replicas("acquirer-drainer"), Some(0));
    let hibernated = h.condition("Hibernated");
    assert_eq!(hibernated["status"], "True");
    assert_eq!(hibernated["reason"], "DrainTimedOut");
    let message = hibernated["message"].as_str().unwrap_or_default();
    assert!(message.contains("9 SAF advice(s) left"), "{message}");
    assert!(h.event_reasons().iter().any(|r| r == "DrainTimedOut"));
}

#[tokio::test]
async fn a_switch_that_cannot_be_reached_is_given_up_on_after_the_timeout() {
    let h = Harness::new().await;
    h.switch.set_unavailable(true);
    h.edit(|spec| spec["hibernation"] = json!({"enabled": true, "drainTimeout": "1m"}));
    h.reconcile().await;
    assert_eq!(
        h.replicas("acquirer-switch"),
        Some(3),
        "not before the timeout"
    );
    assert_eq!(h.condition("Hibernated")["reason"], "Hibernating");
    h.started_ago(95);
    h.reconcile().await;
    assert_eq!(h.replicas("acquirer-switch"), Some(0));
    let message = h.condition("Hibernated")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("503"), "{message}");
}

#[tokio::test]
async fn calling_it_off_mid_drain_resumes_the_pods() {
    let h = Harness::new().await;
    h.edit(|spec| spec["hibernation"] = json!({"enabled": true}));
    h.reconcile().await;
    assert_eq!(h.switch.maintenance_state(), "draining");
    h.edit(|spec| spec["hibernation"]["enabled"] = json!(false));
    h.reconcile().await;
    assert_eq!(h.switch.calls_to("POST", "/v1/maintenance/resume").len(), 1);
    assert_eq!(h.switch.maintenance_state(), "serving");
    assert_eq!(h.replicas("acquirer-switch"), Some(3));
    assert_eq!(h.condition("Hibernated")["reason"], "Resumed");
}

#[tokio::test]
async fn a_drain_timeout_over_a_day_is_an_invalid_spec() {
    let h = Harness::new().await;
    h.edit(|spec| spec["hibernation"] = json!({"enabled": true, "drainTimeout": "25h"}));
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.hibernation.drainTimeout"),
        "{degraded}"
    );
    assert_eq!(h.hibernate_calls(), 0);
    assert_eq!(h.replicas("acquirer-switch"), Some(3));
}
