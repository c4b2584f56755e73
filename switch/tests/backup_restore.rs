//! Backup under load and restore (issue 14 item 6). A switch serves concurrent withdrawals on
//! embedded SQLite while a real `switchyard-switch backup` process copies the database; a
//! `restore` refuses the live database, then restores the backup into a fresh directory; a real
//! `switchyard-switch serve` starts on it, answers a new withdrawal, and the ledger invariant
//! (every balance = opening balance − approved, unreversed withdrawals in the journal; daily
//! totals = the journal) holds on the restored database before and after.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, TestSwitch, card, free_port};
use sqlx::Row;
use switchyard_switch::atm::AtmClient;
use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::domain::{KeyType, TerminalId};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-switch");
const START: i64 = 100_000_000;
const ACCOUNTS: usize = 4;
const AMOUNT: i64 = 1_000;

fn pan(i: usize) -> String {
    format!("601100000000{:04}", 7000 + i)
}

/// Runs `switchyard-switch --config <config> <args>`.
fn switch_cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("SWITCHYARD_TERMINATION_LOG", "/nonexistent")
        .output()
        .expect("run switchyard-switch")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The fuzz harness's ledger invariant, over a database file.
async fn assert_ledger_invariant(url: &str) -> usize {
    let db = sqlx::SqlitePool::connect(url).await.expect("open database");
    let rows = sqlx::query(
        "SELECT a.id, a.balance, \
         COALESCE((SELECT SUM(j.amount) FROM journal j WHERE j.account_id = a.id \
           AND j.kind = 'withdrawal' AND j.response_code = '00' AND j.reversed = 0), 0) AS debited, \
         (SELECT COUNT(*) FROM journal j WHERE j.account_id = a.id \
           AND j.kind = 'withdrawal' AND j.response_code = '00' AND j.reversed = 0) AS approved \
         FROM accounts a ORDER BY a.id",
    )
    .fetch_all(&db)
    .await
    .expect("read accounts");
    assert_eq!(rows.len(), ACCOUNTS);
    let mut approved_total = 0usize;
    for row in rows {
        let id: String = row.get("id");
        let balance: i64 = row.get("balance");
        let debited: i64 = row.get("debited");
        let approved: i64 = row.get("approved");
        assert_eq!(
            balance,
            START - debited,
            "account {id}: balance {balance} != opening {START} - approved unreversed withdrawals {debited}"
        );
        approved_total += approved as usize;
    }
    let days = sqlx::query(
        "SELECT d.account_id, d.total, \
         COALESCE((SELECT SUM(j.amount) FROM journal j WHERE j.account_id = d.account_id \
           AND j.business_day = d.day AND j.kind = 'withdrawal' AND j.response_code = '00' \
           AND j.reversed = 0), 0) AS journaled \
         FROM daily_withdrawals d",
    )
    .fetch_all(&db)
    .await
    .expect("read daily totals");
    for row in days {
        let id: String = row.get("account_id");
        let total: i64 = row.get("total");
        let journaled: i64 = row.get("journaled");
        assert_eq!(total, journaled, "account {id}: daily total != journal");
    }
    db.close().await;
    approved_total
}

async fn ready_atm(iso: &str, admin: &AdminClient, kek: &[u8], id: &str) -> AtmClient {
    let tid = TerminalId::new(id).unwrap();
    let keys = admin
        .register_terminal(kek, &tid, "it")
        .await
        .expect("register terminal");
    let mut atm = AtmClient::connect(
        iso,
        tid,
        keys,
        switchyard_switch::iso8583::Packager::by_name("ascii").unwrap(),
    )
    .await
    .expect("connect");
    assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
    atm.exchange_key(KeyType::Tpk).await.unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    atm
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_load_restores_to_a_consistent_ledger() {
    let sw = TestSwitch::start(Backend::Sqlite).await.expect("sqlite");
    for i in 0..ACCOUNTS {
        let account = format!("ACC-B{i}");
        sw.admin
            .create_account(&account, "360", START, START)
            .await
            .unwrap();
        sw.admin
            .create_card(&pan(i), "2812", &account, "1234")
            .await
            .unwrap();
    }
    // one config for the CLI against the live database (backup and restore only read
    // [database])
    let live_config = sw.dir.path().join("cli.toml");
    std::fs::write(
        &live_config,
        format!("[database]\nurl = \"{}\"\n", sw.db.url),
    )
    .unwrap();

    // the load: one ATM per account, withdrawing until told to stop
    let stop = Arc::new(AtomicBool::new(false));
    let approved = Arc::new(AtomicI64::new(0));
    let mut load = Vec::new();
    for i in 0..ACCOUNTS {
        let mut atm = sw.atm(&format!("ATMB{i:04}")).await;
        assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
        atm.exchange_key(KeyType::Tpk).await.unwrap();
        atm.exchange_key(KeyType::Tak).await.unwrap();
        let (stop, approved) = (stop.clone(), approved.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (_, answer) = atm.withdraw(&card(&pan(i)), AMOUNT).await.unwrap();
                assert_eq!(answer.get_str(39), Some("00"));
                approved.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let wait_for = |n: i64| {
        let approved = approved.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while approved.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "load too slow");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(40).await;

    // backups while the withdrawals go on: a real process, its own connection
    let backup = sw.dir.path().join("under-load.db");
    let before = approved.load(Ordering::Relaxed);
    let out = switch_cli(&live_config, &["backup", "--to", backup.to_str().unwrap()]);
    let after = approved.load(Ordering::Relaxed);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("backed up to"),
        "{}",
        text(&out)
    );
    eprintln!(
        "withdrawals approved while the backup ran: {}",
        after - before
    );
    // never overwrites
    let again = switch_cli(&live_config, &["backup", "--to", backup.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    // the running switch's database cannot be restored over
    let refused = switch_cli(
        &live_config,
        &["restore", "--from", backup.to_str().unwrap()],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("in use"), "{}", text(&refused));

    wait_for(after + 40).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let live_approved = assert_ledger_invariant(&sw.db.url).await;
    assert_eq!(live_approved as i64, approved.load(Ordering::Relaxed));

    // restore into a fresh directory
    let fresh = tempfile::tempdir().unwrap();
    let restored_url = format!("sqlite://{}", fresh.path().join("switch.db").display());
    // the same Secrets as the switch the backup came from (its keys are wrapped under that
    // LMK); copied, as the test switch's directory goes away with it
    let [lmk, kek, tokens] = ["lmk.hex", "kek.hex", "tokens"].map(|name| {
        let to = fresh.path().join(name);
        std::fs::copy(sw.dir.path().join(name), &to).unwrap();
        to
    });
    let (iso, admin, metrics) = (free_port(), free_port(), free_port());
    let config = fresh.path().join("switch.toml");
    std::fs::write(
        &config,
        format!(
            "[iso8583]\nlisten = \"127.0.0.1:{iso}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntokens_file = \"{tokens}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [database]\nurl = \"{restored_url}\"\n\
             [keys]\nlmk_file = \"{lmk}\"\nkek_file = \"{kek}\"\n\
             [routing]\non_us = [\"6011\"]\n",
            tokens = tokens.display(),
            lmk = lmk.display(),
            kek = kek.display(),
        ),
    )
    .unwrap();
    let out = switch_cli(&config, &["restore", "--from", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let in_backup = assert_ledger_invariant(&restored_url).await;
    eprintln!("approved withdrawals in the backup: {in_backup} of {live_approved}");
    // a snapshot from the middle of the load: everything committed before it started
    assert!(in_backup as i64 >= before, "{in_backup} < {before}");
    assert!(in_backup < live_approved, "the backup is not a later state");
    sw.stop().await;

    // a switch on the restored database serves: the same LMK unwraps its keys
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("SWITCHYARD_TERMINATION_LOG", "/nonexistent")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(fresh.path().join("serve.log")).unwrap())
        .spawn()
        .expect("start the restored switch");
    let _serve = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = reqwest::get(format!("http://127.0.0.1:{metrics}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restored switch never ready: {}",
            std::fs::read_to_string(fresh.path().join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("admin:").map(str::to_owned))
        .unwrap();
    let client = AdminClient::new(format!("http://127.0.0.1:{admin}"), token);
    let kek_bytes = hex::decode(std::fs::read_to_string(&kek).unwrap().trim()).unwrap();
    let mut atm = ready_atm(&format!("127.0.0.1:{iso}"), &client, &kek_bytes, "ATMR0001").await;
    let (_, answer) = atm.withdraw(&card(&pan(0)), AMOUNT).await.unwrap();
    assert_eq!(answer.get_str(39), Some("00"));
    let balance = client.get("/v1/accounts/ACC-B0").await.unwrap()["balance"]
        .as_i64()
        .unwrap();
    assert!(balance < START);
    drop(atm);
    assert_eq!(assert_ledger_invariant(&restored_url).await, in_backup + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_schedule_backs_up_at_start_and_reports_it() {
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("nested");
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.backup.schedule = Some("0 * * * *".into());
        s.backup.dir = dir.clone();
        s.backup.retain = 2;
    })
    .await
    .expect("sqlite");
    // no backup younger than one period exists: one is taken at once
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with("switchyard-") && n.ends_with(".db"))
        });
        if let Some(name) = found {
            break dir.join(name);
        }
        assert!(Instant::now() < deadline, "no backup at start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = sw.metrics().await;
    assert_eq!(
        common::sample(&metrics, "switchyard_backup_interval_seconds"),
        Some(3600.0)
    );
    let last = common::sample(&metrics, "switchyard_backup_last_success_timestamp_seconds")
        .expect("gauge");
    assert!(last > 1.7e9, "{metrics}");
    assert_eq!(
        common::sample(&metrics, "switchyard_backup_failures_total"),
        Some(0.0)
    );
    // the file is a complete, checked database of this switch
    let url = format!("sqlite://{}", file.display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(applied > 0);
    db.close().await;
    sw.stop().await;
}

#[test]
fn backup_and_restore_refuse_a_postgres_store_without_leaking_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pg.toml");
    std::fs::write(
        &config,
        "[database]\nurl = \"postgres://app:hunter2secret@127.0.0.1:1/app\"\n",
    )
    .unwrap();
    let file = dir.path().join("x.db");
    for args in [
        ["backup", "--to", file.to_str().unwrap()],
        ["restore", "--from", file.to_str().unwrap()],
    ] {
        let out = switch_cli(&config, &args);
        assert!(!out.status.success(), "{}", text(&out));
        let said = text(&out);
        assert!(
            said.contains("pg_dump") && said.contains("CloudNativePG"),
            "{said}"
        );
        assert!(!said.contains("hunter2secret"), "{said}");
    }
}
