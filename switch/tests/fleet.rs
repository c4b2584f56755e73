//! Scale-out (issue 16): three real `switchyard-switch serve` replicas on one PostgreSQL, ATMs
//! connected straight to each replica's port.
//!
//! - a fleet rotation started through one replica's admin API reaches every signed-on ATM on
//!   every replica, paced by `maxConcurrent` across the fleet, and every replica reports the
//!   same progress and the same session state;
//! - the same ATM signing on at another replica closes its first session at once;
//! - a replica killed with SIGKILL drops out of the registry when its lease ends; its ATMs,
//!   reconnected to the others, get the keys of a rotation they missed, and a key an ATM already
//!   confirmed is not pushed to it again;
//! - a key revoked through one replica stops verifying at another at once, although that
//!   replica's key cache would keep it for an hour (`keys.cache_ttl = 1h`).
//!
//! Needs `SWITCHYARD_TEST_DATABASE_URL` (skipped without it, required when `CI=true`).
//!
//! And, on both backends with the switch in this process: the heartbeat is the safety net
//! behind notifications — a session the registry no longer holds is closed, a registry row no
//! session backs is removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, random_hex};
use serde_json::{Value, json};
use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::atm::{AtmClient, AtmError, CardInput};
use switchyard_switch::crypto::TerminalKeys;
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::iso8583::Packager;
use switchyard_switch::store::{SessionEntry, TerminalKind};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-switch");
const PG_ENV: &str = "SWITCHYARD_TEST_DATABASE_URL";
/// Short enough that a dead replica drops out within seconds; the heartbeat is the safety net
/// behind the notifications, so a prompt close in this test is the notification's doing.
const HEARTBEAT: &str = "3s";
const LEASE: &str = "6s";

/// One replica: its config, ports, admin client, and the child while it runs.
struct Replica {
    name: &'static str,
    dir: PathBuf,
    iso: String,
    metrics: String,
    admin: AdminClient,
    child: Option<Child>,
}

impl Replica {
    /// A replica of the switch whose shared secrets are in `shared` (LMK, KEK, tokens).
    fn new(shared: &Path, name: &'static str, database_url: &str, token: &str) -> Replica {
        let dir = shared.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (iso, admin, metrics) = (free_port(), free_port(), free_port());
        std::fs::write(
            dir.join("switch.toml"),
            format!(
                "[iso8583]\nlisten = \"127.0.0.1:{iso}\"\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\ntokens_file = \"{s}/tokens\"\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\nrefresh_interval = \"500ms\"\n\
                 [database]\nurl = \"{database_url}\"\n\
                 [keys]\nlmk_file = \"{s}/lmk.hex\"\nkek_file = \"{s}/kek.hex\"\n\
                 cache_ttl = \"1h\"\n\
                 [registry]\nreplica_id = \"{name}\"\nheartbeat_interval = \"{HEARTBEAT}\"\n\
                 lease = \"{LEASE}\"\n\
                 [routing]\non_us = [\"6011\"]\n",
                s = shared.display()
            ),
        )
        .unwrap();
        Replica {
            name,
            dir,
            iso: format!("127.0.0.1:{iso}"),
            metrics: format!("http://127.0.0.1:{metrics}"),
            admin: AdminClient::new(format!("http://127.0.0.1:{admin}"), token),
            child: None,
        }
    }

    async fn start(&mut self, migrate: bool) {
        let log = std::fs::File::create(self.dir.join("serve.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(self.dir.join("switch.toml"))
            .arg("--log-format")
            .arg("text")
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log);
        if migrate {
            cmd.arg("--migrate");
        }
        self.child = Some(cmd.spawn().expect("spawn switchyard-switch"));
        let url = format!("{}/readyz", self.metrics);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(reqwest::get(&url).await, Ok(r) if r.status().is_success()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {} ready; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no goodbye, its registry rows stay until its lease ends.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    async fn terminal(&self, id: &str) -> Value {
        self.admin
            .get(&format!("/v1/terminals/{id}"))
            .await
            .unwrap()
    }

    async fn rotation(&self, id: &str) -> Value {
        self.admin
            .get(&format!("/v1/key-rotations/{id}"))
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
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

/// A fresh schema on the test server, and the URL that uses it; `None` without a server.
async fn postgres_schema() -> Option<(String, sqlx::PgPool, String)> {
    let url = match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{PG_ENV} must be set when CI=true");
            }
            eprintln!("skipping the scale-out drill: {PG_ENV} is not set");
            return None;
        }
    };
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let schema = format!("fleet_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    Some((scoped, admin, schema))
}

async fn sign_on(replica: &Replica, id: &TerminalId, keys: TerminalKeys) -> AtmClient {
    let mut atm = AtmClient::connect(&replica.iso, id.clone(), keys, Packager::ascii())
        .await
        .unwrap();
    let answer = atm.network("001").await.unwrap();
    assert_eq!(
        answer.get_str(39),
        Some("00"),
        "sign-on of {id} at {}",
        replica.name
    );
    atm
}

/// Waits for the push of a `kt` key and answers it (confirming its KCV).
async fn take_push(mut atm: AtmClient, kt: KeyType) -> AtmClient {
    let got = atm
        .wait_for_key_push(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{} got no {kt} push: {e}", atm.id));
    assert_eq!(got, kt, "{} was pushed the wrong key type", atm.id);
    atm
}

/// Whether the switch closed `atm`'s connection within `within` (a read ends without a frame).
async fn closed_within(atm: &mut AtmClient, within: Duration) -> bool {
    match tokio::time::timeout(within, atm.read_message()).await {
        Err(_) => false,
        Ok(Err(AtmError::Timeout(_))) => false,
        Ok(Err(_)) => true,
        Ok(Ok((m, _))) => panic!("expected a close, got {}", m.mti().as_str()),
    }
}

async fn start_rotation(replica: &Replica, kt: KeyType, max_concurrent: u32) -> String {
    let created = replica
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": kt.as_str(), "terminals": "all", "activation": "onConfirm",
                    "maxConcurrent": max_concurrent}),
        )
        .await
        .unwrap();
    assert_eq!(created["terminals"], 6);
    created["id"].as_str().unwrap().to_string()
}

/// Waits until every replica in `replicas` reports all six keys of `rotation` ACTIVE.
async fn wait_rotation_done(replicas: &[&Replica], rotation: &str) {
    for replica in replicas {
        eventually(
            &format!(
                "rotation {rotation} complete as {} reports it",
                replica.name
            ),
            30,
            || async {
                let status = replica.rotation(rotation).await;
                (status["totals"]["ACTIVE"] == 6 && status["totals"]["PENDING"] == 0).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_act_on_the_whole_fleet() {
    let Some((url, pg_admin, schema)) = postgres_schema().await else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let kek_hex = random_hex(32);
    std::fs::write(shared.path().join("lmk.hex"), random_hex(32)).unwrap();
    std::fs::write(shared.path().join("kek.hex"), &kek_hex).unwrap();
    let token = format!("adm{}", random_hex(12));
    std::fs::write(shared.path().join("tokens"), format!("admin:{token}\n")).unwrap();
    let kek = hex::decode(kek_hex).unwrap();

    let mut a = Replica::new(shared.path(), "switch-a", &url, &token);
    let mut b = Replica::new(shared.path(), "switch-b", &url, &token);
    let mut c = Replica::new(shared.path(), "switch-c", &url, &token);
    a.start(true).await;
    b.start(false).await;
    c.start(false).await;

    // six ATMs, two on each replica, with working keys
    let ids: Vec<TerminalId> = (1..=6)
        .map(|i| TerminalId::new(format!("ATM{i:04}")).unwrap())
        .collect();
    let mut atms = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let keys = a.admin.register_terminal(&kek, id, "fleet").await.unwrap();
        let replica = [&a, &b, &c][i / 2];
        let mut atm = sign_on(replica, id, keys).await;
        atm.exchange_key(KeyType::Tpk).await.unwrap();
        atm.exchange_key(KeyType::Tak).await.unwrap();
        atms.push(atm);
    }

    // every replica tells the same about every terminal, and about the fleet
    for (i, id) in ids.iter().enumerate() {
        let holder = ["switch-a", "switch-b", "switch-c"][i / 2];
        for replica in [&a, &b, &c] {
            let view = replica.terminal(id.as_str()).await;
            assert_eq!(view["signedOn"], true, "{id} at {}", replica.name);
            assert_eq!(view["replica"], holder, "{id} at {}", replica.name);
            assert_eq!(view["sessions"], 1);
        }
    }
    for replica in [&a, &b, &c] {
        let fleet = replica.admin.get("/v1/sessions").await.unwrap();
        assert_eq!(fleet["replica"], replica.name);
        assert_eq!(fleet["signedOn"], 6);
        let counts: Vec<(String, u64)> = fleet["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["sessions"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![
                ("switch-a".to_string(), 2),
                ("switch-b".to_string(), 2),
                ("switch-c".to_string(), 2)
            ]
        );
        eventually("the fleet-wide signed-on gauge", 10, || async {
            (replica.metric("switchyard_terminals_signed_on").await == Some(6.0)).then_some(())
        })
        .await;
    }

    // a fleet rotation through switch-a's admin API reaches the ATMs of all three replicas,
    // two at a time across the fleet
    let started = Instant::now();
    let rotation = start_rotation(&a, KeyType::Tpk, 2).await;
    let tasks: Vec<_> = atms
        .into_iter()
        .map(|atm| tokio::spawn(take_push(atm, KeyType::Tpk)))
        .collect();
    let mut atms = Vec::new();
    for task in tasks {
        atms.push(task.await.unwrap());
    }
    wait_rotation_done(&[&a, &b, &c], &rotation).await;
    eprintln!(
        "TPK rotation of 6 ATMs on 3 replicas done in {:?}",
        started.elapsed()
    );
    let (pa, pb, pc) = (
        a.rotation(&rotation).await,
        b.rotation(&rotation).await,
        c.rotation(&rotation).await,
    );
    assert_eq!(pa, pb);
    assert_eq!(pb, pc);

    // ATM0001 (at switch-a) signs on at switch-b: its session at switch-a closes at once
    let mut first = atms.remove(0);
    let moved_at = Instant::now();
    let second = sign_on(&b, &ids[0], first.keys.clone()).await;
    assert!(
        closed_within(&mut first, Duration::from_millis(2500)).await,
        "the first session of {} stayed open after it signed on at switch-b",
        ids[0]
    );
    eprintln!("replaced session closed after {:?}", moved_at.elapsed());
    drop(first);
    for replica in [&a, &b, &c] {
        let view = replica.terminal(ids[0].as_str()).await;
        assert_eq!(
            (view["replica"].as_str(), view["sessions"].as_u64()),
            (Some("switch-b"), Some(1))
        );
    }
    atms.insert(0, second);

    // SIGKILL switch-c: its ATMs lose their connection, its sessions leave the registry when
    // its lease ends
    c.kill();
    let killed = Instant::now();
    let mut orphans = atms.split_off(4);
    eventually("switch-c's sessions to expire", 30, || async {
        let fleet = a.admin.get("/v1/sessions").await.ok()?;
        let replicas: Vec<&str> = fleet["replicas"]
            .as_array()?
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        (replicas == ["switch-a", "switch-b"] && fleet["signedOn"] == 4).then_some(())
    })
    .await;
    eprintln!(
        "switch-c dropped out of the registry {:?} after SIGKILL",
        killed.elapsed()
    );
    for id in &ids[4..] {
        assert_eq!(b.terminal(id.as_str()).await["signedOn"], false);
    }

    // a TAK rotation starts while switch-c's ATMs are away; the others get theirs now
    let rotation = start_rotation(&b, KeyType::Tak, 2).await;
    let tasks: Vec<_> = atms
        .into_iter()
        .map(|atm| tokio::spawn(take_push(atm, KeyType::Tak)))
        .collect();
    let mut atms = Vec::new();
    for task in tasks {
        atms.push(task.await.unwrap());
    }
    // (an answer is processed after the ATM sent it)
    eventually("the four online ATMs' TAKs active", 10, || async {
        let status = b.rotation(&rotation).await;
        (status["totals"]["ACTIVE"] == 4 && status["totals"]["PENDING"] == 2).then_some(())
    })
    .await;
    // switch-c's ATMs reconnect to the surviving replicas and get the TAK at sign-on: only
    // the TAK, never the TPK they confirmed before
    let mut keys: Vec<TerminalKeys> = orphans.iter().map(|atm| atm.keys.clone()).collect();
    orphans.clear();
    let reconnected = vec![
        sign_on(&a, &ids[4], keys.remove(0)).await,
        sign_on(&b, &ids[5], keys.remove(0)).await,
    ];
    for atm in reconnected {
        atms.push(take_push(atm, KeyType::Tak).await);
    }
    wait_rotation_done(&[&a, &b], &rotation).await;

    // nothing more is pushed to anyone: every key was confirmed once
    for atm in &mut atms {
        match atm.wait_for_key_push(Duration::from_millis(1500)).await {
            Err(AtmError::Timeout(_)) => {}
            other => panic!("{} was pushed again: {other:?}", atm.id),
        }
    }
    for replica in [&a, &b] {
        let fleet = replica.admin.get("/v1/sessions").await.unwrap();
        assert_eq!(fleet["signedOn"], 6);
    }

    // ATM0003, at switch-b, transacts under its TAK (now in switch-b's key cache); the TAK is
    // revoked through switch-a; switch-b refuses the next MAC under it at once
    let mut atm = atms.remove(2);
    assert_eq!(atm.id, ids[2]);
    a.admin
        .create_account("ACC-F", "360", 500_000, 300_000)
        .await
        .unwrap();
    a.admin
        .create_card("6011000000000004", "2812", "ACC-F", "1234")
        .await
        .unwrap();
    let card = CardInput {
        pan: "6011000000000004".into(),
        expiry: "2812".into(),
        pin: "1234".into(),
        currency: "360".into(),
    };
    assert_eq!(atm.balance(&card).await.unwrap().get_str(39), Some("00"));
    let keys = a
        .admin
        .get(&format!("/v1/terminals/{}/keys", ids[2]))
        .await
        .unwrap();
    let tak = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["type"] == "TAK" && k["state"] == "ACTIVE")
        .expect("an ACTIVE TAK")["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.admin
        .post(&format!("/v1/keys/{tak}/revoke"), &json!({}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = atm.balance(&card).await;
    match refused {
        Ok(answer) => assert_eq!(
            answer.get_str(39),
            Some("63"),
            "switch-b still verified a MAC under a TAK revoked at switch-a"
        ),
        Err(err) => panic!("balance after the revocation: {err}"),
    }

    drop(atm);
    drop(atms);
    a.kill();
    b.kill();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pg_admin)
    .await;
}

/// Without any notification (SQLite has none; on PostgreSQL the row is removed without telling
/// the switch), the heartbeat closes a session the registry no longer holds and removes a row of
/// this replica that no session backs.
async fn heartbeat_is_the_safety_net(backend: common::Backend) {
    let Some(sw) = common::TestSwitch::start_with(backend, |s| {
        s.registry.heartbeat_interval = Duration::from_millis(300);
        s.registry.lease = Duration::from_secs(3);
    })
    .await
    else {
        return;
    };
    let ctx = sw.running.ctx.clone();
    let mut atm = sw.atm("ATM00001").await;
    assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
    let tid = atm.id.clone();
    let view = sw.viewer.get("/v1/terminals/ATM00001").await.unwrap();
    assert_eq!(view["replica"], ctx.fleet.replica());

    // a row of this replica for a connection it does not have
    let ghost = TerminalId::new("ATM00002").unwrap();
    sw.admin
        .register_terminal(&sw.kek, &ghost, "it")
        .await
        .unwrap();
    let stale = SessionEntry {
        replica: ctx.fleet.replica().to_string(),
        conn_id: 987_654,
        terminal: ghost.clone(),
        kind: TerminalKind::Atm,
        remote: "192.0.2.1:4000".into(),
        signed_on_at: chrono::Utc::now(),
    };
    ctx.store
        .record_sign_on(&stale, chrono::Utc::now())
        .await
        .unwrap();
    eventually("the unbacked registry row removed", 5, || async {
        let view = sw.viewer.get("/v1/terminals/ATM00002").await.ok()?;
        (view["signedOn"] == false).then_some(())
    })
    .await;

    // the ATM's row removed behind the switch's back (as if the notification was lost)
    match backend {
        common::Backend::Sqlite => {
            ctx.store.remove_sessions(&tid).await.unwrap();
        }
        common::Backend::Postgres => {
            // remove it with the notification trigger off, in one transaction
            let pool = sqlx::PgPool::connect(&sw.db.url).await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("ALTER TABLE terminal_sessions DISABLE TRIGGER terminal_sessions_removed")
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("DELETE FROM terminal_sessions WHERE terminal_id = $1")
                .bind(tid.as_str())
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("ALTER TABLE terminal_sessions ENABLE TRIGGER terminal_sessions_removed")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            pool.close().await;
        }
    }
    assert!(
        closed_within(&mut atm, Duration::from_secs(3)).await,
        "a session the registry no longer holds stayed open"
    );
    sw.stop().await;
}
on_both_backends!(the_heartbeat_is_the_safety_net, heartbeat_is_the_safety_net);
