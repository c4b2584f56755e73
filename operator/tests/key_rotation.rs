//! KeyRotation reconcile tests: the controller shell against the in-process fake Kubernetes API
//! and a fake switch admin API on 127.0.0.1, with the clock passed in.
//!
//! Scenarios: a scheduled rotation from start to finish at the right times; a manual trigger
//! starting exactly one rotation; an operator restart mid-rotation; the switch unavailable or
//! unreachable, then back; a missing BankSwitch; a suspended KeyRotation.

#[allow(dead_code)]
mod fake_api;
#[allow(dead_code)]
mod fake_switch;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, JobOutcome};
use fake_switch::{ADMIN_TOKEN, FakeSwitch};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use serde_json::{Value, json};
use switchyard_operator::crd::key_rotation::{KeyRotation, KeyRotationStatus};
use switchyard_operator::key_rotation::controller::{
    BANK_SWITCH_RECHECK, Context, FOLLOW_INTERVAL, reconcile_at,
};
use switchyard_operator::metrics::Metrics;
use switchyard_operator::switch_admin::{AdminEndpoint, SwitchAdmin};

const NS: &str = "payments";
const UID: &str = "0b7e4c1d-0000-4000-8000-00000000a001";
const CREATED: &str = "2026-01-01T00:00:00Z";
/// First `every: 720h` window after CREATED.
const WINDOW: &str = "2026-01-31T00:00:00Z";
const ROTATIONS: &str = "/v1/key-rotations";

fn t(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn plus(at: Timestamp, d: Duration) -> Timestamp {
    at.checked_add(k8s_openapi::jiff::SignedDuration::try_from(d).expect("duration"))
        .expect("in range")
}

fn kr_path() -> String {
    format!("/apis/switchyard.io/v1alpha1/namespaces/{NS}/keyrotations/monthly")
}
fn bs_path() -> String {
    format!("/apis/switchyard.io/v1alpha1/namespaces/{NS}/bankswitches/atm")
}

fn bank_switch() -> Value {
    json!({
        "apiVersion": "switchyard.io/v1alpha1", "kind": "BankSwitch",
        "metadata": {"name": "atm", "namespace": NS, "uid": "bs-uid-1", "generation": 1},
        "spec": {
            "image": "registry.example/switchyard/switch:0.1.0",
            "keys": {"lmkSecretRef": {"name": "atm-keys", "key": "lmk"},
                     "kekSecretRef": {"name": "atm-keys", "key": "kek"}},
            "admin": {"tokenSecretRef": {"name": "atm-admin", "key": "tokens"}}
        }
    })
}

fn admin_secret() -> Value {
    let tokens = format!("viewer:viewer-token-77\nadmin:{ADMIN_TOKEN}\n");
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "atm-admin", "namespace": NS,
                     "labels": {"switchyard.io/bankswitch": "atm"}},
        "data": {"tokens": fake_api::secret_value(tokens.as_bytes())}
    })
}

fn key_rotation(key_types: &[&str]) -> Value {
    json!({
        "apiVersion": "switchyard.io/v1alpha1", "kind": "KeyRotation",
        "metadata": {"name": "monthly", "namespace": NS, "uid": UID, "generation": 1,
                     "creationTimestamp": CREATED},
        "spec": {
            "bankSwitchRef": {"name": "atm"},
            "keyTypes": key_types,
            "terminals": {"all": true},
            "schedule": {"every": "720h"},
            "gracePeriod": "5m"
        }
    })
}

struct Harness {
    fake: FakeApi,
    switch: FakeSwitch,
    ctx: Arc<Context>,
}

impl Harness {
    /// A KeyRotation for `key_types`, its BankSwitch and admin Secret, and a switch with three
    /// terminals.
    async fn new(key_types: &[&str]) -> Self {
        let switch = FakeSwitch::start(&["ATM00001", "ATM00002", "ATM00003"]).await;
        let fake = FakeApi::new(JobOutcome::Complete, false);
        fake.insert(&kr_path(), key_rotation(key_types));
        fake.insert(&bs_path(), bank_switch());
        fake.insert(
            &format!("/api/v1/namespaces/{NS}/secrets/atm-admin"),
            admin_secret(),
        );
        let ctx = Self::context(&fake, &switch.base_url);
        Self { fake, switch, ctx }
    }

    /// A fresh controller context, as a restarted operator process would build.
    fn context(fake: &FakeApi, base_url: &str) -> Arc<Context> {
        let admin =
            SwitchAdmin::new(AdminEndpoint::Fixed(base_url.to_owned())).expect("http client");
        Arc::new(Context::new(
            fake.client(),
            Arc::new(Metrics::default()),
            admin,
            Some("test".into()),
        ))
    }

    fn object(&self) -> KeyRotation {
        serde_json::from_value(self.fake.get(&kr_path()).expect("stored")).expect("KeyRotation")
    }

    fn status(&self) -> KeyRotationStatus {
        self.object().status.unwrap_or_default()
    }

    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut obj = self.fake.get(&kr_path()).expect("stored");
        f(&mut obj);
        self.fake.insert(&kr_path(), obj);
    }

    fn annotate_rotate_now(&self, value: &str) {
        self.edit(|o| {
            o["metadata"]["annotations"] = json!({"switchyard.io/rotate-now": value});
        });
    }

    async fn reconcile(&self, now: Timestamp) -> Requeue {
        reconcile_at(&self.object(), &self.ctx, now)
            .await
            .expect("reconcile succeeds")
    }

    fn condition(&self, type_: &str) -> Value {
        self.fake.condition(&kr_path(), type_)
    }

    /// `(type, reason, note)` of every Event recorded for the object.
    fn events(&self) -> Vec<(String, String, String)> {
        self.fake
            .events(NS)
            .iter()
            .filter_map(|e| {
                Some((
                    e["type"].as_str()?.to_owned(),
                    e["reason"].as_str()?.to_owned(),
                    e["note"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect()
    }

    fn event_count(&self, reason: &str) -> usize {
        self.events().iter().filter(|e| e.1 == reason).count()
    }

    fn metrics(&self) -> String {
        self.ctx.metrics.encode().expect("metrics encode")
    }

    fn status_writes(&self) -> usize {
        let path = format!("{}/status", kr_path());
        self.fake
            .writes()
            .iter()
            .filter(|w| w.method == "PATCH" && w.path == path)
            .count()
    }
}

#[tokio::test]
async fn scheduled_rotation_runs_at_its_window_and_not_before() {
    let h = Harness::new(&["TPK"]).await;

    // An hour after creation: sleep exactly until the window, call nothing.
    let now = plus(t(CREATED), secs(3600));
    let requeue = h.reconcile(now).await;
    assert_eq!(
        requeue,
        Requeue::requeue(t(WINDOW).duration_since(now).try_into().expect("positive"))
    );
    assert_eq!(h.switch.calls(), vec![], "nothing is due yet");
    let status = h.status();
    assert_eq!(status.phase.as_deref(), Some("Scheduled"));
    assert_eq!(status.next_rotation_at.map(|t| t.0), Some(t(WINDOW)));
    assert!(
        h.metrics().contains(&format!(
            "switchyard_operator_next_rotation_timestamp_seconds{{keyrotation=\"{NS}/monthly\"}} {}",
            t(WINDOW).as_second()
        )),
        "{}",
        h.metrics()
    );

    // A second look a minute before the window: same answer, and no write at all.
    h.fake.clear_writes();
    let now = plus(t(CREATED), secs(30 * 24 * 3600 - 60));
    assert_eq!(h.reconcile(now).await, Requeue::requeue(secs(60)));
    assert_eq!(h.fake.writes(), vec![], "steady state must not write");
    assert_eq!(h.switch.calls(), vec![]);

    // At the window: one POST with the uid-prefixed idempotency key and the spec's body.
    let requeue = h.reconcile(t(WINDOW)).await;
    assert_eq!(requeue, Requeue::requeue(FOLLOW_INTERVAL));
    let posts = h.switch.calls_to("POST", ROTATIONS);
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(
        posts[0].idempotency_key.as_deref(),
        Some(format!("{UID}-scheduled-{WINDOW}-TPK").as_str())
    );
    assert_eq!(
        posts[0].body,
        json!({"keyType": "TPK", "terminals": "all", "activation": "onConfirm", "graceSeconds": 300, "maxConcurrent": 100})
    );
    let status = h.status();
    let current = status.current_rotation.expect("current rotation");
    assert_eq!(current.id, "rot-1");
    assert_eq!(status.phase.as_deref(), Some("Rotating"));
    assert_eq!(h.condition("Progressing")["status"], "True");
    assert_eq!(h.event_count("RotationStarted"), 1);
    assert!(
        !h.metrics()
            .contains("switchyard_operator_next_rotation_timestamp_seconds{"),
        "no next rotation while one runs"
    );

    // Progress comes from the switch: still pending → keep following.
    h.switch.clear_calls();
    let now = plus(t(WINDOW), FOLLOW_INTERVAL);
    assert_eq!(h.reconcile(now).await, Requeue::requeue(FOLLOW_INTERVAL));
    assert_eq!(h.switch.calls_to("GET", "/v1/key-rotations/rot-1").len(), 1);
    assert_eq!(
        h.status()
            .current_rotation
            .expect("current")
            .totals
            .get("PENDING"),
        Some(&3)
    );

    // Every terminal confirmed: settled, and the previous keys live for the grace period.
    h.switch.confirm_all();
    let settled = plus(now, FOLLOW_INTERVAL);
    assert_eq!(h.reconcile(settled).await, Requeue::requeue(secs(300)));
    let current = h.status().current_rotation.expect("current");
    assert_eq!(current.totals.get("ACTIVE"), Some(&3));
    assert_eq!(current.settled_at.map(|t| t.0), Some(settled));
    assert!(!h.switch.previous_expired("rot-1"));

    // Grace over: expire-previous, then the rotation is finished and counted.
    let graced = plus(settled, secs(300));
    h.reconcile(graced).await;
    assert_eq!(
        h.switch
            .calls_to("POST", "/v1/key-rotations/rot-1/expire-previous")
            .len(),
        1
    );
    assert!(h.switch.previous_expired("rot-1"));
    let requeue = h.reconcile(graced).await;
    let status = h.status();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    assert!(status.current_rotation.is_none());
    let last = status.last_rotation.expect("last rotation");
    assert_eq!(last.id, "rot-1");
    assert_eq!(last.result.as_deref(), Some("Succeeded"));
    assert_eq!(h.event_count("RotationSucceeded"), 1);
    assert!(
        h.metrics()
            .contains(r#"switchyard_operator_key_rotations_total{result="succeeded"} 1"#)
    );
    assert!(h.metrics().contains(
        r#"switchyard_operator_reconcile_total{controller="keyrotation",result="success"}"#
    ));
    // The next window counts from the run's start.
    let next = plus(t(WINDOW), secs(720 * 3600));
    assert_eq!(status.next_rotation_at.map(|t| t.0), Some(next));
    assert_eq!(
        requeue,
        Requeue::requeue(next.duration_since(graced).try_into().expect("positive"))
    );
    assert_eq!(h.switch.rotation_count(), 1);
}

#[tokio::test]
async fn run_rotates_each_key_type_in_turn() {
    let h = Harness::new(&["TPK", "TAK"]).await;
    h.reconcile(t(WINDOW)).await;
    h.switch.confirm_all();
    let mut now = t(WINDOW);
    // follow → settle → grace → expire → finish → start TAK
    for _ in 0..6 {
        now = plus(now, secs(300));
        h.reconcile(now).await;
    }
    let posts = h.switch.calls_to("POST", ROTATIONS);
    let keys: Vec<_> = posts
        .iter()
        .map(|c| c.idempotency_key.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            format!("{UID}-scheduled-{WINDOW}-TPK"),
            format!("{UID}-scheduled-{WINDOW}-TAK")
        ]
    );
    assert_eq!(h.switch.key_type("rot-2").as_deref(), Some("TAK"));
}

#[tokio::test]
async fn manual_trigger_starts_exactly_one_rotation_even_when_reconciled_twice() {
    let h = Harness::new(&["TPK"]).await;
    let now = plus(t(CREATED), secs(3600));
    h.annotate_rotate_now("1767229200");
    let stale = h.object();

    h.reconcile(now).await;
    h.reconcile(now).await;
    // A watch cache that lags the status write hands over the pre-start object: still one.
    reconcile_at(&stale, &h.ctx, now).await.expect("reconcile");

    let posts = h.switch.calls_to("POST", ROTATIONS);
    assert_eq!(posts.len(), 1, "{posts:?}");
    let key = posts[0].idempotency_key.clone().expect("idempotency key");
    assert!(key.starts_with(&format!("{UID}-manual-")), "{key}");
    assert!(key.ends_with("-TPK"), "{key}");
    assert!(
        !key.contains("1767229200"),
        "the raw annotation value stays out of headers"
    );
    assert_eq!(h.switch.rotation_count(), 1);
    let status = h.status();
    assert_eq!(status.last_rotate_now.as_deref(), Some("1767229200"));
    assert_eq!(status.current_run.expect("run").reason, "Manual");
}

#[tokio::test]
async fn start_retried_after_a_lost_status_write_reuses_its_idempotency_key() {
    let h = Harness::new(&["TPK"]).await;
    h.annotate_rotate_now("again");
    let now = plus(t(CREATED), secs(3600));
    h.reconcile(now).await;
    // The operator died after the POST, before status said so: status is as it was.
    h.edit(|o| {
        o["status"] = Value::Null;
    });
    h.reconcile(plus(now, secs(5))).await;

    let posts = h.switch.calls_to("POST", ROTATIONS);
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].idempotency_key, posts[1].idempotency_key);
    assert_eq!(posts[0].body, posts[1].body);
    assert_eq!(
        h.switch.rotation_count(),
        1,
        "the switch replays; no second rotation"
    );
    assert_eq!(h.status().current_rotation.expect("current").id, "rot-1");
}

#[tokio::test]
async fn restart_mid_rotation_follows_it_and_never_posts_again() {
    let h = Harness::new(&["TPK"]).await;
    h.reconcile(t(WINDOW)).await;
    assert_eq!(h.status().current_rotation.expect("current").id, "rot-1");

    // A new operator process: new context, state only from the object's status.
    let restarted = Harness {
        fake: h.fake.clone(),
        switch: h.switch.clone(),
        ctx: Harness::context(&h.fake, &h.switch.base_url),
    };
    h.switch.clear_calls();
    let requeue = restarted.reconcile(plus(t(WINDOW), secs(60))).await;
    assert_eq!(requeue, Requeue::requeue(FOLLOW_INTERVAL));
    let calls = h.switch.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].method, "GET");
    assert_eq!(calls[0].path, "/v1/key-rotations/rot-1");
    assert_eq!(h.switch.rotation_count(), 1);
}

#[tokio::test]
async fn switch_unavailable_backs_off_with_a_condition_then_recovers() {
    let h = Harness::new(&["TPK"]).await;
    h.switch.set_unavailable(true);

    let requeue = h.reconcile(t(WINDOW)).await;
    assert_eq!(requeue, Requeue::requeue(secs(5)), "first retry after 5 s");
    let status = h.status();
    assert_eq!(status.failed_attempts, 1);
    assert_eq!(status.last_failure_time.map(|t| t.0), Some(t(WINDOW)));
    assert_eq!(
        status.next_retry_time.map(|t| t.0),
        Some(plus(t(WINDOW), secs(5)))
    );
    assert!(
        status.current_run.is_some(),
        "the run is recorded before the switch is asked"
    );
    assert_eq!(h.condition("Degraded")["status"], "True");
    assert_eq!(h.condition("Degraded")["reason"], "SwitchError");
    assert_eq!(h.condition("Ready")["status"], "False");
    let message = h.condition("Degraded")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("503"), "{message}");
    assert!(!message.contains(ADMIN_TOKEN), "no token in conditions");
    assert_eq!(h.event_count("SwitchError"), 1);
    assert!(
        h.events()
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "SwitchError")
    );
    assert!(h.metrics().contains(
        r#"switchyard_operator_reconcile_errors_total{controller="keyrotation",reason="switch"} 1"#
    ));

    // Before nextRetryTime: no call, sleep the rest of the backoff.
    h.switch.clear_calls();
    assert_eq!(
        h.reconcile(plus(t(WINDOW), secs(2))).await,
        Requeue::requeue(secs(3))
    );
    assert_eq!(h.switch.calls(), vec![]);

    // Still down at nextRetryTime: the backoff doubles; still one Warning for the streak.
    assert_eq!(
        h.reconcile(plus(t(WINDOW), secs(5))).await,
        Requeue::requeue(secs(10))
    );
    assert_eq!(h.status().failed_attempts, 2);
    assert_eq!(h.event_count("SwitchError"), 1);

    // Back: the retry uses the same Idempotency-Key, the failure streak and condition clear.
    h.switch.set_unavailable(false);
    let back = plus(t(WINDOW), secs(15));
    assert_eq!(h.reconcile(back).await, Requeue::requeue(FOLLOW_INTERVAL));
    let posts = h.switch.calls_to("POST", ROTATIONS);
    assert_eq!(posts.len(), 2);
    assert!(posts
        .iter()
        .all(|p| p.idempotency_key.as_deref() == Some(&format!("{UID}-scheduled-{WINDOW}-TPK"))));
    assert_eq!(h.switch.rotation_count(), 1);
    let status = h.status();
    assert_eq!(status.failed_attempts, 0);
    assert!(status.next_retry_time.is_none());
    assert_eq!(status.current_rotation.expect("current").id, "rot-1");
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert_eq!(h.condition("Ready")["status"], "True");
    assert_eq!(h.event_count("Recovered"), 1);
}

#[tokio::test]
async fn unreachable_switch_is_a_failure_condition_not_a_crash() {
    let h = Harness::new(&["TPK"]).await;
    // A port nobody listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let down = Harness {
        fake: h.fake.clone(),
        switch: h.switch.clone(),
        ctx: Harness::context(&h.fake, &format!("http://{closed}")),
    };
    let requeue = down.reconcile(t(WINDOW)).await;
    assert_eq!(requeue, Requeue::requeue(secs(5)));
    let status = down.status();
    assert_eq!(status.failed_attempts, 1);
    assert!(status.next_retry_time.is_some());
    let message = down.condition("Degraded")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("failed to reach the switch admin API"),
        "{message}"
    );
    assert!(!message.contains(ADMIN_TOKEN));
    assert!(
        down.events()
            .iter()
            .all(|(_, _, note)| !note.contains(ADMIN_TOKEN))
    );
}

#[tokio::test]
async fn missing_bank_switch_is_a_condition_and_a_later_look() {
    let h = Harness::new(&["TPK"]).await;
    let path = bs_path();
    let bank_switch = h.fake.get(&path).expect("stored");
    h.fake
        .0
        .lock()
        .expect("lock")
        .objects
        .remove(&path)
        .expect("removed");

    let requeue = h.reconcile(t(WINDOW)).await;
    assert_eq!(requeue, Requeue::requeue(BANK_SWITCH_RECHECK));
    assert_eq!(h.condition("Ready")["status"], "False");
    assert_eq!(h.condition("Ready")["reason"], "BankSwitchNotFound");
    assert!(
        h.condition("Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.bankSwitchRef.name")
    );
    assert!(
        h.events()
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "BankSwitchNotFound")
    );
    assert_eq!(h.switch.calls(), vec![]);
    // Looking again changes nothing and writes nothing.
    h.fake.clear_writes();
    h.reconcile(plus(t(WINDOW), secs(60))).await;
    assert_eq!(h.status_writes(), 0);
    assert_eq!(h.event_count("BankSwitchNotFound"), 1);

    // The BankSwitch appears: the due rotation starts.
    h.fake.insert(&path, bank_switch);
    h.reconcile(plus(t(WINDOW), secs(120))).await;
    assert_eq!(h.switch.calls_to("POST", ROTATIONS).len(), 1);
    assert_eq!(h.condition("Ready")["status"], "True");
}

#[tokio::test]
async fn suspended_key_rotation_starts_no_rotation() {
    let h = Harness::new(&["TPK"]).await;
    h.edit(|o| {
        o["spec"]["suspend"] = json!(true);
        o["metadata"]["generation"] = json!(2);
    });
    h.annotate_rotate_now("while-suspended");

    let requeue = h.reconcile(plus(t(WINDOW), secs(3600))).await;
    assert_eq!(requeue, Requeue::await_change());
    assert_eq!(h.switch.calls(), vec![]);
    let status = h.status();
    assert_eq!(status.phase.as_deref(), Some("Suspended"));
    assert!(status.next_rotation_at.is_none());
    assert!(
        !h.metrics()
            .contains("switchyard_operator_next_rotation_timestamp_seconds{")
    );

    // Resumed: one run starts for the missed window and the waiting trigger.
    h.edit(|o| {
        o["spec"]["suspend"] = json!(false);
        o["metadata"]["generation"] = json!(3);
    });
    h.reconcile(plus(t(WINDOW), secs(7200))).await;
    assert_eq!(h.switch.calls_to("POST", ROTATIONS).len(), 1);
}
