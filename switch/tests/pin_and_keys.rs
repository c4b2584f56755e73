//! PIN tries and key hygiene end to end (in-process switch, real sockets), on SQLite and
//! PostgreSQL (SPEC §4, NIST SP 800-57):
//! - wrong PINs for one card sent at the same instant from many terminals and a station's
//!   pipelined requests never get more than three PIN checks; the card ends blocked;
//! - answers are MACed under the ACTIVE TAK, never under a replaced one still in its grace;
//! - a key row moved to another terminal in the database is refused by the HSM.

mod common;

use std::sync::Arc;

use common::{Backend, TestSwitch, balance, card, sample};
use switchyard_switch::atm::{AtmClient, expect_code};
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::iso8583::Message;

const PAN: &str = "6011000000000004";

/// Signs on `atm` and exchanges its TPK and TAK.
async fn ready(mut atm: AtmClient) -> AtmClient {
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    atm.exchange_key(KeyType::Tpk).await.unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    atm
}

/// A registered station's process, signed on with its keys exchanged.
async fn station(sw: &TestSwitch, id: &str) -> AtmClient {
    let tid = TerminalId::new(id).unwrap();
    let keys = sw
        .admin
        .register_station(&sw.kek, &tid, "acquirers")
        .await
        .unwrap();
    ready(
        AtmClient::connect(&sw.iso(), tid, keys, sw.packager)
            .await
            .unwrap(),
    )
    .await
}

fn code(m: &Message) -> String {
    m.get_str(39).unwrap_or_default().to_string()
}

async fn card_view(sw: &TestSwitch, id: &str) -> serde_json::Value {
    sw.viewer.get(&format!("/v1/cards/{id}")).await.unwrap()
}

async fn concurrent_wrong_pins(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    sw.admin
        .create_account("ACC-1", "360", 100_000, 60_000)
        .await
        .unwrap();
    let issued = sw
        .admin
        .create_card(PAN, "2812", "ACC-1", "1234")
        .await
        .unwrap();
    let card_id = issued["id"].as_str().unwrap().to_string();
    let mut wrong = card(PAN);
    wrong.pin = "9999".into();

    const ATMS: usize = 8;
    const PIPELINED: usize = 8;
    let start = Arc::new(tokio::sync::Barrier::new(ATMS + 1));
    let mut tasks = Vec::new();
    for i in 0..ATMS {
        let mut atm = ready(sw.atm(&format!("PIN{i:05}")).await).await;
        let (start, wrong) = (start.clone(), wrong.clone());
        tasks.push(tokio::spawn(async move {
            let m = atm.financial("310000", &wrong, 0).unwrap();
            start.wait().await;
            vec![code(&atm.request(m, true).await.unwrap().0)]
        }));
    }
    let mut acquirer = station(&sw, "ACQ001").await;
    let requests: Vec<Message> = (0..PIPELINED)
        .map(|_| acquirer.financial("310000", &wrong, 0).unwrap())
        .collect();
    tasks.push(tokio::spawn({
        let start = start.clone();
        async move {
            start.wait().await;
            let answers = acquirer.pipeline(requests).await.unwrap();
            answers.iter().map(code).collect()
        }
    }));
    let mut codes: Vec<String> = Vec::new();
    for t in tasks {
        codes.extend(t.await.unwrap());
    }
    codes.sort();
    let mut expected = vec!["55".to_string(); 2];
    expected.extend(vec!["75".to_string(); ATMS + PIPELINED - 2]);
    assert_eq!(
        codes, expected,
        "two wrong PINs are told 55, the third blocks, everyone else finds no try left"
    );
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_pin_failures_total"),
        Some(3.0),
        "the HSM compared three PINs, no more"
    );
    let view = card_view(&sw, &card_id).await;
    assert_eq!(
        (view["pinTries"].as_u64(), view["pinBlocked"].as_bool()),
        (Some(3), Some(true)),
        "{view}"
    );

    // the right PIN now: 75 until the PIN is reset
    let mut atm = ready(sw.atm("PINRIGHT").await).await;
    assert_eq!(code(&atm.balance(&card(PAN)).await.unwrap()), "75");
    assert_eq!(card_view(&sw, &card_id).await["pinTries"].as_u64(), Some(3));
    sw.stop().await;
}
on_both_backends!(
    concurrent_wrong_pins_get_three_tries_at_most,
    concurrent_wrong_pins
);

/// The MAC of an answer as the ATM received it: the bytes before the MAC field, and the MAC.
fn answer_mac<'a>(sw: &TestSwitch, answer: &'a Message, raw: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    let mac = answer.get(64).expect("answer carries a MAC");
    (&raw[..raw.len() - sw.packager.mac_wire_len()], mac)
}

async fn answers_under_the_active_tak(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    sw.admin
        .create_account("ACC-1", "360", 100_000, 60_000)
        .await
        .unwrap();
    sw.admin
        .create_card(PAN, "2812", "ACC-1", "1234")
        .await
        .unwrap();
    let mut atm = ready(sw.atm("ATM00001").await).await;
    let old_keys = atm.keys.clone();
    // a new TAK: the old one is EXPIRED and in its grace window
    atm.exchange_key(KeyType::Tak).await.unwrap();
    let new_keys = atm.keys.clone();

    // a request MACed under the old TAK (sent before the ATM took the new one) still verifies,
    // but its answer comes under the ACTIVE TAK only
    let mut request = atm.financial("310000", &card(PAN), 0).unwrap();
    let stan = request.get_str(11).unwrap().to_string();
    atm.keys = old_keys.clone();
    let bytes = atm.pack(&mut request, true).unwrap();
    atm.keys = new_keys.clone();
    let (answer, raw) = atm.exchange_raw(&bytes, &stan).await.unwrap();
    assert_eq!(code(&answer), "00", "verified under the TAK in grace");
    let (input, mac) = answer_mac(&sw, &answer, &raw);
    assert!(
        new_keys.verify_mac(input, mac).unwrap(),
        "answer MACed under the ACTIVE TAK"
    );
    assert!(
        !old_keys.verify_mac(input, mac).unwrap(),
        "never under the EXPIRED one"
    );

    // the simulator, holding the new key it confirmed, accepts what the switch answers
    expect_code(&atm.balance(&card(PAN)).await.unwrap(), "00").unwrap();
    let (_, answer) = atm.withdraw(&card(PAN), 1_000).await.unwrap();
    expect_code(&answer, "00").unwrap();
    assert_eq!(balance(&sw, "ACC-1").await, 99_000);
    sw.stop().await;
}
on_both_backends!(
    answers_are_maced_under_the_active_tak,
    answers_under_the_active_tak
);

/// Runs one SQL statement against the switch's database, as someone with write access to it
/// (but not to the LMK) could.
async fn tamper(sw: &TestSwitch, backend: Backend, sql: &str) -> u64 {
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&sw.db.url).await.unwrap();
            let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            done.rows_affected()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&sw.db.url).await.unwrap();
            let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            done.rows_affected()
        }
    }
}

async fn moved_key_rows(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    sw.admin
        .create_account("ACC-1", "360", 100_000, 60_000)
        .await
        .unwrap();
    let issued = sw
        .admin
        .create_card(PAN, "2812", "ACC-1", "1234")
        .await
        .unwrap();
    let card_id = issued["id"].as_str().unwrap().to_string();
    // the attacker controls ATM00666 and knows its keys; ATM00001 is a terminal of the bank
    let mut mine = ready(sw.atm("ATM00666").await).await;
    expect_code(&mine.balance(&card(PAN)).await.unwrap(), "00").unwrap();
    drop(ready(sw.atm("ATM00001").await).await);

    // with write access to the database only: retire the victim's keys and move the
    // attacker's key rows (TMK, TPK, TAK) over to the victim
    let retired = tamper(
        &sw,
        backend,
        "UPDATE keys SET state = 'REVOKED' WHERE terminal_id = 'ATM00001' AND state = 'ACTIVE'",
    )
    .await;
    assert_eq!(retired, 3);
    let moved = tamper(
        &sw,
        backend,
        "UPDATE keys SET terminal_id = 'ATM00001', version = version + 100 WHERE terminal_id = 'ATM00666' AND state = 'ACTIVE'",
    )
    .await;
    assert_eq!(moved, 3);
    // written behind the switch's back, as another replica would: seen once the usable keys
    // the switch cached for the terminals end their `[keys] cache_ttl`
    tokio::time::sleep(sw.running.ctx.settings.keys.cache_ttl).await;

    // posing as the victim with the attacker's keys gets nothing
    let mut posing = AtmClient::connect(
        &sw.iso(),
        TerminalId::new("ATM00001").unwrap(),
        mine.keys.clone(),
        sw.packager,
    )
    .await
    .unwrap();
    let signed_on = posing.network("001").await.map(|m| code(&m)).ok();
    if signed_on.as_deref() == Some("00") {
        // (an authenticated sign-on refuses it already: the TMK row is bound to ATM00666)
        let (_, answer) = posing.withdraw(&card(PAN), 5_000).await.unwrap();
        assert_eq!(
            code(&answer),
            "63",
            "MAC under a TAK bound to another terminal"
        );
        assert!(answer.get(64).is_none(), "a refusal carries no MAC");
    }
    assert_eq!(balance(&sw, "ACC-1").await, 100_000, "no money moved");
    // and the attacker's own terminal has no keys left to use either
    assert_eq!(code(&mine.balance(&card(PAN)).await.unwrap()), "63");

    // a TPK row moved to a terminal: its PIN checks fail (63), at no cost to the cardholder
    let mut teller = ready(sw.atm("ATM00002").await).await;
    expect_code(&teller.balance(&card(PAN)).await.unwrap(), "00").unwrap();
    drop(ready(sw.atm("ATM00777").await).await);
    tamper(
        &sw,
        backend,
        "UPDATE keys SET state = 'REVOKED' WHERE terminal_id = 'ATM00002' AND key_type = 'TPK'",
    )
    .await;
    let moved = tamper(
        &sw,
        backend,
        "UPDATE keys SET terminal_id = 'ATM00002', version = version + 100 WHERE terminal_id = 'ATM00777' \
         AND key_type = 'TPK' AND state = 'ACTIVE'",
    )
    .await;
    assert_eq!(moved, 1);
    tokio::time::sleep(sw.running.ctx.settings.keys.cache_ttl).await;
    assert_eq!(code(&teller.balance(&card(PAN)).await.unwrap()), "63");
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_pin_failures_total"),
        Some(0.0),
        "a refused key is not a wrong PIN"
    );
    assert_eq!(card_view(&sw, &card_id).await["pinTries"].as_u64(), Some(0));
    sw.stop().await;
}
on_both_backends!(
    key_rows_moved_to_another_terminal_are_refused,
    moved_key_rows
);
