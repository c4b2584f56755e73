//! "Money never depends on luck" (issue 10), end to end with two switches in this process (an
//! acquirer routing BIN 4111 to an issuer over a real link), the acquirer on SQLite and on
//! PostgreSQL:
//! - an issuer approval the acquirer cannot book while its store fails still becomes exactly
//!   one 0420, once the store is back — or, at shutdown, straight over the link;
//! - the drainer dead-letters stored advices it cannot send (corrupt payload, field numbers or
//!   values out of range) with a reason, and the rest keep flowing;
//! - an advice above the issuer's ceiling for the station is dead-lettered with a clear reason;
//! - the audit table refuses UPDATE and DELETE.
//!
//! The store is made to fail with triggers that refuse writes to the journal and the SAF queue
//! (added and dropped over a second connection), so the switch sees real database errors.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Backend, TestDb, TestSwitch, sample};
use serde_json::{Value, json};
use switchyard_switch::atm::{AtmClient, CardInput};
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::settings::{RouteSettings, UpstreamSettings};
use switchyard_switch::store::{AdviceMti, NewAdvice, NewAudit};

const PAN: &str = "4111111111111111";
const START: i64 = 1_000_000;

fn card() -> CardInput {
    CardInput {
        pan: PAN.into(),
        expiry: "2812".into(),
        pin: "1234".into(),
        currency: "360".into(),
    }
}

/// Polls `check` every 100 ms until it gives a value, for at most `secs` seconds.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Pair {
    issuer: TestSwitch,
    acquirer: TestSwitch,
}

impl Pair {
    /// An issuer (SQLite; BIN 4111 on-us, one card, station ACQ001 with a per-advice ceiling
    /// of 50,000) and an acquirer on `backend` whose link to it is up.
    async fn start(backend: Backend) -> Option<Pair> {
        let issuer = TestSwitch::start_with(Backend::Sqlite, |s| {
            s.routing.on_us = vec!["4111".into()];
            s.stations.advice_max_amount = 50_000;
        })
        .await?;
        issuer
            .admin
            .create_account("ISS-1", "360", START, START)
            .await
            .unwrap();
        issuer
            .admin
            .create_card(PAN, "2812", "ISS-1", "1234")
            .await
            .unwrap();
        let tmk = issuer
            .admin
            .provision_station(&issuer.kek, &TerminalId::new("ACQ001").unwrap())
            .await
            .unwrap();
        let tmk_file = issuer.dir.path().join("station.tmk");
        std::fs::write(&tmk_file, tmk.as_bytes()).unwrap();
        let upstream: UpstreamSettings = serde_json::from_value(json!({
            "name": "issuer-b",
            "endpoints": [issuer.iso()],
            "station_id": "ACQ001",
            "tmk_file": tmk_file,
            "heartbeat_interval": "1s",
            "timeout": "3s",
        }))
        .unwrap();
        let Some(acquirer) = TestSwitch::start_with(backend, |s| {
            s.routing.routes = vec![RouteSettings {
                prefix: "4111".into(),
                upstream: "issuer-b".into(),
            }];
            s.upstreams = vec![upstream];
            // the drainer runs inside the acquirer on both backends
            s.saf.in_process_drainer = Some(true);
            s.saf.poll_interval = Duration::from_millis(100);
            s.saf.backoff_initial = Duration::from_millis(200);
            s.saf.backoff_max = Duration::from_secs(1);
        })
        .await
        else {
            issuer.stop().await;
            return None;
        };
        let pair = Pair { issuer, acquirer };
        eventually("the acquirer's link to be up", 30, || async {
            let up = sample(
                &pair.acquirer.metrics().await,
                "switchyard_upstream_up{upstream=\"issuer-b\"}",
            );
            (up == Some(1.0)).then_some(())
        })
        .await;
        Some(pair)
    }

    async fn atm(&self) -> AtmClient {
        let mut atm = self.acquirer.atm("ATM00001").await;
        assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
        atm.exchange_key(KeyType::Tpk).await.unwrap();
        atm.exchange_key(KeyType::Tak).await.unwrap();
        atm
    }

    async fn issuer_balance(&self) -> i64 {
        common::balance(&self.issuer, "ISS-1").await
    }

    async fn acquirer_advices(&self) -> Vec<Value> {
        let list = self.acquirer.viewer.get("/v1/saf").await.unwrap();
        list.as_array().unwrap().clone()
    }

    async fn stop(self) {
        self.acquirer.stop().await;
        self.issuer.stop().await;
    }
}

async fn withdraw(atm: &mut AtmClient, amount: i64) -> String {
    let (_, answer) = atm.withdraw(&card(), amount).await.unwrap();
    answer.get_str(39).unwrap_or_default().to_string()
}

/// Runs `sql` (one statement per entry) on the test database over its own connection.
async fn raw(db: &TestDb, statements: &[&str]) -> Result<(), sqlx::Error> {
    if db.url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&db.url).await?;
        for sql in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&pool)
                .await?;
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await?;
        for sql in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&pool)
                .await?;
        }
        pool.close().await;
    }
    Ok(())
}

/// Makes the store refuse every new journal row and queued advice, as a failing database would.
async fn break_store(db: &TestDb) {
    let statements: &[&str] = if db.url.starts_with("sqlite:") {
        &[
            "CREATE TRIGGER test_fail_journal BEFORE INSERT ON journal \
             BEGIN SELECT RAISE(ABORT, 'store failing (test)'); END",
            "CREATE TRIGGER test_fail_saf BEFORE INSERT ON saf_messages \
             BEGIN SELECT RAISE(ABORT, 'store failing (test)'); END",
        ]
    } else {
        &[
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'store failing (test)'; END $$",
            "CREATE TRIGGER test_fail_journal BEFORE INSERT ON journal \
             FOR EACH ROW EXECUTE FUNCTION test_fail()",
            "CREATE TRIGGER test_fail_saf BEFORE INSERT ON saf_messages \
             FOR EACH ROW EXECUTE FUNCTION test_fail()",
        ]
    };
    raw(db, statements).await.expect("break the store");
}

async fn mend_store(db: &TestDb) {
    let statements: &[&str] = if db.url.starts_with("sqlite:") {
        &[
            "DROP TRIGGER test_fail_journal",
            "DROP TRIGGER test_fail_saf",
        ]
    } else {
        &[
            "DROP TRIGGER test_fail_journal ON journal",
            "DROP TRIGGER test_fail_saf ON saf_messages",
        ]
    };
    raw(db, statements).await.expect("mend the store");
}

fn reversals(advices: &[Value]) -> Vec<&Value> {
    advices.iter().filter(|a| a["mti"] == "0420").collect()
}

async fn approval_the_store_cannot_book_is_reversed_once(backend: Backend) {
    let Some(pair) = Pair::start(backend).await else {
        return;
    };
    let mut atm = pair.atm().await;
    assert_eq!(withdraw(&mut atm, 10_000).await, "00");
    assert_eq!(pair.issuer_balance().await, START - 10_000);

    // the issuer approves, the acquirer cannot book it nor queue the reversal
    break_store(&pair.acquirer.db).await;
    assert_eq!(withdraw(&mut atm, 20_000).await, "96");
    assert_eq!(pair.issuer_balance().await, START - 30_000);
    let held = &pair.acquirer.running.ctx.held_reversals;
    assert_eq!(held.len(), 1, "the reversal is held, not lost");
    let metrics = pair.acquirer.metrics().await;
    assert_eq!(sample(&metrics, "switchyard_reversals_held"), Some(1.0));
    assert_eq!(
        sample(&metrics, "switchyard_reversal_holds_total"),
        Some(1.0)
    );

    // retried while the store still fails: still one, held
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(held.len(), 1);
    assert!(reversals(&pair.acquirer_advices().await).is_empty());

    // the store is back: stored once, delivered, the issuer's debit undone
    mend_store(&pair.acquirer.db).await;
    eventually("the held reversal to be stored", 20, || async {
        held.is_empty().then_some(())
    })
    .await;
    eventually("the issuer to apply the reversal", 30, || async {
        (pair.issuer_balance().await == START - 10_000).then_some(())
    })
    .await;
    eventually("the reversal to be delivered", 30, || async {
        let advices = pair.acquirer_advices().await;
        let r = reversals(&advices);
        (r.len() == 1 && r[0]["status"] == "delivered").then_some(())
    })
    .await;
    assert_eq!(
        sample(&pair.acquirer.metrics().await, "switchyard_reversals_held"),
        Some(0.0)
    );
    // and stays once
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(reversals(&pair.acquirer_advices().await).len(), 1);
    assert_eq!(pair.issuer_balance().await, START - 10_000);
    pair.stop().await;
}
on_both_backends!(
    approval_the_store_cannot_book_is_reversed_once_test,
    approval_the_store_cannot_book_is_reversed_once
);

/// At shutdown with the store still failing, the held reversal goes straight to the issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_reversal_is_sent_over_the_link_at_shutdown() {
    let Some(pair) = Pair::start(Backend::Sqlite).await else {
        return;
    };
    let mut atm = pair.atm().await;
    assert_eq!(withdraw(&mut atm, 10_000).await, "00");
    break_store(&pair.acquirer.db).await;
    assert_eq!(withdraw(&mut atm, 20_000).await, "96");
    assert_eq!(pair.issuer_balance().await, START - 30_000);
    assert_eq!(pair.acquirer.running.ctx.held_reversals.len(), 1);
    drop(atm);

    let Pair { issuer, acquirer } = pair;
    acquirer.stop().await;
    assert_eq!(
        common::balance(&issuer, "ISS-1").await,
        START - 10_000,
        "the reversal reached the issuer although the acquirer's store never took it"
    );
    issuer.stop().await;
}

/// An advice as the acquirer's stand-in would queue it for the issuer, with `payload`.
fn stored_advice(key: &str, mti: AdviceMti, payload: Value) -> NewAdvice {
    NewAdvice {
        destination: "issuer-b".into(),
        priority: 1,
        mti,
        idempotency_key: key.into(),
        payload,
        reference: None,
        created_at: Utc::now(),
    }
}

fn good_payload(stan: &str, amount: i64) -> Value {
    json!({
        "2": PAN, "3": "010000", "4": format!("{amount:012}"),
        "7": Utc::now().format("%m%d%H%M%S").to_string(), "11": stan, "14": "2812",
        "37": "612300000001", "38": "SI0001", "41": "ACQ001  ", "49": "360"
    })
}

async fn malformed_advices_are_dead_lettered_and_the_rest_flow(backend: Backend) {
    let Some(pair) = Pair::start(backend).await else {
        return;
    };
    let store = pair.acquirer.running.ctx.store.clone();
    let with = |stan: &str, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut p = good_payload(stan, 1_000);
        f(p.as_object_mut().unwrap());
        p
    };
    let bad: Vec<(&str, AdviceMti, Value, &str)> = vec![
        (
            "field-zero",
            AdviceMti::Advice0220,
            with("900001", &|p| {
                p.insert("0".into(), json!("x"));
            }),
            "not a field of the profile",
        ),
        (
            "field-200",
            AdviceMti::Advice0220,
            with("900002", &|p| {
                p.insert("200".into(), json!("x"));
            }),
            "not a field of the profile",
        ),
        (
            "negative-amount",
            AdviceMti::Advice0220,
            with("900003", &|p| {
                p.insert("4".into(), json!("-00000001000"));
            }),
            "field 4",
        ),
        (
            "huge-amount",
            AdviceMti::Advice0220,
            with("900004", &|p| {
                p.insert("4".into(), json!("9999999999999999"));
            }),
            "field 4",
        ),
        (
            "zero-amount",
            AdviceMti::Advice0220,
            with("900005", &|p| {
                p.insert("4".into(), json!("000000000000"));
            }),
            "amount is zero",
        ),
        (
            "reversal-without-90",
            AdviceMti::Reversal0420,
            with("900006", &|_| {}),
            "no field 90",
        ),
        (
            "over-the-ceiling",
            AdviceMti::Advice0220,
            good_payload("900007", 60_000),
            "61: above the force-post ceiling",
        ),
        (
            "corrupt-json",
            AdviceMti::Advice0220,
            good_payload("900008", 1_000),
            "not a JSON object",
        ),
    ];
    // the drainer is running: the one to corrupt waits for an upstream nobody drains until
    // its payload is broken
    for (key, mti, payload, _) in &bad {
        let mut advice = stored_advice(key, *mti, payload.clone());
        if *key == "corrupt-json" {
            advice.destination = "parked".into();
        }
        store.saf_enqueue(&advice).await.unwrap();
    }
    // SQLite keeps text that is no JSON at all; PostgreSQL's JSONB only valid JSON
    let corrupt = if backend == Backend::Postgres {
        "UPDATE saf_messages SET payload = '[\"not\", \"fields\"]', destination = 'issuer-b' \
         WHERE idempotency_key = 'corrupt-json'"
    } else {
        "UPDATE saf_messages SET payload = '{\"2\": not json', destination = 'issuer-b' \
         WHERE idempotency_key = 'corrupt-json'"
    };
    raw(&pair.acquirer.db, &[corrupt]).await.unwrap();
    store
        .saf_enqueue(&stored_advice(
            "good",
            AdviceMti::Advice0220,
            good_payload("900010", 2_500),
        ))
        .await
        .unwrap();

    let advices = eventually("every advice to be settled", 40, || async {
        let advices = pair.acquirer_advices().await;
        let settled =
            advices.len() == bad.len() + 1 && advices.iter().all(|a| a["status"] != "queued");
        settled.then_some(advices)
    })
    .await;
    for (key, _, _, reason) in &bad {
        let a = advices
            .iter()
            .find(|a| a["idempotencyKey"] == *key)
            .unwrap();
        assert_eq!(a["status"], "deadLetter", "{key}: {a}");
        let why = a["lastError"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{key}: {why}");
        assert!(!why.contains(PAN), "{key}: no card data in the reason");
    }
    let good = advices
        .iter()
        .find(|a| a["idempotencyKey"] == "good")
        .unwrap();
    assert_eq!(good["status"], "delivered", "{good}");
    assert_eq!(pair.issuer_balance().await, START - 2_500);

    // the drainer is still alive
    store
        .saf_enqueue(&stored_advice(
            "after",
            AdviceMti::Advice0220,
            good_payload("900011", 500),
        ))
        .await
        .unwrap();
    eventually("a later advice to be delivered", 30, || async {
        (pair.issuer_balance().await == START - 3_000).then_some(())
    })
    .await;
    pair.stop().await;
}
on_both_backends!(
    malformed_advices_are_dead_lettered_and_the_rest_flow_test,
    malformed_advices_are_dead_lettered_and_the_rest_flow
);

async fn audit_is_append_only(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let store = db.store().await;
    store
        .append_audit(&NewAudit {
            actor: "admin".into(),
            action: "terminal.create".into(),
            target: "ATM00001".into(),
            result: "ok".into(),
            detail: json!({}),
        })
        .await
        .unwrap();
    for sql in [
        "UPDATE audit SET result = 'denied'",
        "DELETE FROM audit",
        "UPDATE audit SET actor = 'nobody' WHERE id = 1",
    ] {
        let err = raw(&db, &[sql]).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    if backend == Backend::Postgres {
        let err = raw(&db, &["TRUNCATE audit"]).await.expect_err("truncate");
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    // appending still works, and what was written is as written
    store
        .append_audit(&NewAudit {
            actor: "admin".into(),
            action: "terminal.create".into(),
            target: "ATM00002".into(),
            result: "ok".into(),
            detail: json!({}),
        })
        .await
        .unwrap();
    let records = store
        .list_audit(Utc::now() - chrono::Duration::hours(1), 10)
        .await
        .unwrap();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.actor == "admin" && r.result == "ok")
    );
    store.close().await;
    db.cleanup().await;
}
on_both_backends!(audit_is_append_only_test, audit_is_append_only);

/// Status and reason of the advice with `key`, read past the store (its row may not decode).
async fn raw_status(db: &TestDb, key: &str) -> (String, Option<String>) {
    let sql = "SELECT status, last_error FROM saf_messages WHERE idempotency_key = $1";
    if db.url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        let row: (String, Option<String>) = sqlx::query_as(sql)
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        row
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let row: (String, Option<String>) = sqlx::query_as(sql)
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        row
    }
}

async fn unreadable_advice_is_dead_lettered_at_lease(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let store = db.store().await;
    for (i, key) in ["first", "unreadable", "last"].iter().enumerate() {
        store
            .saf_enqueue(&stored_advice(
                key,
                AdviceMti::Advice0220,
                good_payload(&format!("90002{i}"), 1_000),
            ))
            .await
            .unwrap();
    }
    // a timestamp no clock can hold, written behind the store's back
    let corrupt = if backend == Backend::Postgres {
        "UPDATE saf_messages SET created_at = 'infinity' WHERE idempotency_key = 'unreadable'"
    } else {
        "UPDATE saf_messages SET created_at = 9223372036854775807 WHERE idempotency_key = 'unreadable'"
    };
    raw(&db, &[corrupt]).await.unwrap();
    // leasing neither fails nor panics: the readable ones come, the other is a dead letter
    let leased = store
        .saf_lease(
            Some("issuer-b"),
            "drainer-1",
            Duration::from_secs(30),
            10,
            Utc::now(),
        )
        .await
        .unwrap();
    let keys: Vec<&str> = leased.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["first", "last"]);
    let (status, reason) = raw_status(&db, "unreadable").await;
    assert_eq!(status, "dead");
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("created_at"), "{reason}");
    // and it is not leased again
    let again = store
        .saf_lease(
            Some("issuer-b"),
            "drainer-2",
            Duration::from_secs(30),
            10,
            Utc::now() + chrono::Duration::minutes(5),
        )
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        2,
        "the two live leases ended; the dead letter stays dead"
    );
    store.close().await;
    db.cleanup().await;
}
on_both_backends!(
    unreadable_advice_is_dead_lettered_at_lease_test,
    unreadable_advice_is_dead_lettered_at_lease
);
