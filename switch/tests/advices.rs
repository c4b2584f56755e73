//! The issuer side of upstream routing, end to end (in-process switch, real sockets), on SQLite
//! and PostgreSQL: acquirer stations signing on from several processes at once, 0220/0221
//! advices booked exactly once, their refusals, and 0420/0421 reversals from a station.

mod common;

use common::{Backend, TestSwitch, balance, card, sample};
use serde_json::json;
use switchyard_switch::atm::{AtmClient, expect_code, original_data_elements};
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::iso8583::{Message, Mti};

const PAN: &str = "6011000000000004";

/// Registers station `id` and signs on one process of it, with its TPK and TAK exchanged.
async fn station(sw: &TestSwitch, id: &str) -> AtmClient {
    let tid = TerminalId::new(id).unwrap();
    let keys = sw
        .admin
        .register_station(&sw.kek, &tid, "acquirers")
        .await
        .expect("register station");
    let mut process = AtmClient::connect(&sw.iso(), tid, keys, sw.packager)
        .await
        .unwrap();
    expect_code(&process.network("001").await.unwrap(), "00").unwrap();
    process.exchange_key(KeyType::Tpk).await.unwrap();
    process.exchange_key(KeyType::Tak).await.unwrap();
    process
}

/// Another process of the same station: it reuses the keys the first one exchanged.
async fn second_process(sw: &TestSwitch, first: &AtmClient) -> AtmClient {
    let mut process =
        AtmClient::connect(&sw.iso(), first.id.clone(), first.keys.clone(), sw.packager)
            .await
            .unwrap();
    expect_code(&process.network("001").await.unwrap(), "00").unwrap();
    process
}

async fn open_account(sw: &TestSwitch, account: &str, balance: i64, limit: i64) {
    sw.admin
        .create_account(account, "360", balance, limit)
        .await
        .unwrap();
    sw.admin
        .create_card(PAN, "2812", account, "1234")
        .await
        .unwrap();
}

/// A stand-in withdrawal advice as an acquirer sends it: card data, amount, the RRN and
/// authorization code the cardholder's receipt shows, no PIN.
fn advice(process: &mut AtmClient, pan: &str, amount: i64, rrn: &str) -> Message {
    let mut m = process.new_request("0220").unwrap();
    m.set_str(2, pan);
    m.set_str(3, "010000");
    m.set_str(4, &format!("{amount:012}"));
    m.set_str(14, "2812");
    m.set_str(37, rrn);
    m.set_str(38, "SI0001");
    m.set_str(49, "360");
    m
}

/// The same advice sent again, as a 0221 repeat.
fn repeat(m: &Message) -> Message {
    let mut again = m.clone();
    again.set_mti(Mti::parse("0221").unwrap());
    again
}

async fn send(process: &mut AtmClient, m: &Message) -> Message {
    process.request(m.clone(), true).await.unwrap().0
}

fn code(m: &Message) -> &str {
    m.get_str(39).unwrap_or_default()
}

async fn stations_sign_on_side_by_side(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut first = station(&sw, "ACQ001").await;
    let mut second = second_process(&sw, &first).await;
    // the second sign-on did not close the first: both carry traffic
    expect_code(&first.network("301").await.unwrap(), "00").unwrap();
    expect_code(&second.network("301").await.unwrap(), "00").unwrap();
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_terminals_signed_on"),
        Some(1.0)
    );
    let view = sw.viewer.get("/v1/terminals/ACQ001").await.unwrap();
    assert_eq!(
        (view["kind"].as_str(), view["signedOn"].as_bool()),
        (Some("station"), Some(true))
    );

    // one process leaving keeps the station signed on through the other
    expect_code(&second.network("002").await.unwrap(), "00").unwrap();
    drop(second);
    expect_code(&first.network("301").await.unwrap(), "00").unwrap();
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_terminals_signed_on"),
        Some(1.0)
    );

    // an ATM still has one session: its new sign-on replaces the old connection
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    let mut replacement =
        AtmClient::connect(&sw.iso(), atm.id.clone(), atm.keys.clone(), sw.packager)
            .await
            .unwrap();
    expect_code(&replacement.network("001").await.unwrap(), "00").unwrap();
    assert!(
        atm.network("301").await.is_err(),
        "replaced ATM connection is closed"
    );

    // fleet rotations leave the station out: its keys are the acquirer's to exchange
    let created = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TAK", "terminals": "all", "activation": "onConfirm"}),
        )
        .await
        .unwrap();
    assert_eq!(created["terminals"], 1);
    sw.stop().await;
}
on_both_backends!(
    stations_sign_on_side_by_side_test,
    stations_sign_on_side_by_side
);

async fn advice_is_booked_once(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    open_account(&sw, "ACC-1", 100_000, 60_000).await;
    let mut first = station(&sw, "ACQ001").await;
    let mut second = second_process(&sw, &first).await;

    // delivered, then repeated by another drainer twice: booked once, answered alike
    let m = advice(&mut first, PAN, 10_000, "612300000001");
    let answer = send(&mut first, &m).await;
    assert_eq!(answer.mti().as_str(), "0230");
    assert_eq!(
        (code(&answer), answer.get_str(37), answer.get_str(38)),
        ("00", Some("612300000001"), Some("SI0001"))
    );
    assert!(answer.has(64), "the answer carries a MAC");
    for _ in 0..2 {
        let again = send(&mut second, &repeat(&m)).await;
        assert_eq!(again.mti().as_str(), "0230");
        assert_eq!(
            (code(&again), again.get_str(37), again.get_str(38)),
            ("00", Some("612300000001"), Some("SI0001"))
        );
    }
    assert_eq!(balance(&sw, "ACC-1").await, 90_000);

    // the first delivery lost on the way: the 0221 books it, the late 0220 changes nothing
    let m = advice(&mut first, PAN, 20_000, "612300000002");
    assert_eq!(code(&send(&mut second, &repeat(&m)).await), "00");
    assert_eq!(code(&send(&mut first, &m).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 70_000);

    // the same identity with other content is not booked
    let mut altered = m.clone();
    altered.set_str(4, &format!("{:012}", 1));
    assert_eq!(code(&send(&mut first, &altered).await), "94");

    // past the daily limit and the balance: the cash is already out, so it is booked
    let m = advice(&mut first, PAN, 80_000, "612300000003");
    assert_eq!(code(&send(&mut first, &m).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, -10_000);
    sw.stop().await;
}
on_both_backends!(advice_is_booked_once_test, advice_is_booked_once);

async fn advice_refusals_change_nothing(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    open_account(&sw, "ACC-1", 100_000, 60_000).await;
    let mut acq = station(&sw, "ACQ001").await;

    // a card of ours we never issued, and a card that is not ours at all
    let unknown = advice(&mut acq, "6011999999999999", 5_000, "612300000010");
    assert_eq!(code(&send(&mut acq, &unknown).await), "14");
    let foreign = advice(&mut acq, "4111111111111111", 5_000, "612300000011");
    assert_eq!(code(&send(&mut acq, &foreign).await), "14");

    // a MAC that does not verify
    let mut m = advice(&mut acq, PAN, 5_000, "612300000012");
    let stan = m.get_str(11).unwrap().to_string();
    let mut bytes = acq.pack(&mut m, true).unwrap();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    let (answer, _) = acq.exchange_raw(&bytes, &stan).await.unwrap();
    assert_eq!(code(&answer), "63");

    // malformed: no amount; and a balance inquiry is never advised
    let mut no_amount = advice(&mut acq, PAN, 5_000, "612300000013");
    no_amount.remove(4);
    assert_eq!(code(&send(&mut acq, &no_amount).await), "30");
    let mut inquiry = advice(&mut acq, PAN, 5_000, "612300000014");
    inquiry.set_str(3, "310000");
    assert_eq!(code(&send(&mut acq, &inquiry).await), "12");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);

    // the MAC-refused advice was not journaled: delivered again intact, it is booked
    assert_eq!(code(&send(&mut acq, &repeat(&m)).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 95_000);

    // only stations book advices: an ATM gets 12, a connection not signed on 58
    let mut atm = sw.atm("ATM00001").await;
    let m = advice(&mut atm, PAN, 5_000, "612300000015");
    assert_eq!(code(&atm.request(m, false).await.unwrap().0), "58");
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    let m = advice(&mut atm, PAN, 5_000, "612300000016");
    assert_eq!(code(&send(&mut atm, &m).await), "12");
    assert_eq!(balance(&sw, "ACC-1").await, 95_000);
    sw.stop().await;
}
on_both_backends!(
    advice_refusals_change_nothing_test,
    advice_refusals_change_nothing
);

/// A 0420 (or its 0421 repeat) reversing `original`, as a station sends it.
fn reversal_advice(process: &mut AtmClient, original: &Message, mti: &str) -> Message {
    let mut m = process.new_request(mti).unwrap();
    for f in [2u8, 3, 4, 14, 49] {
        if let Some(v) = original.get(f) {
            m.set(f, v);
        }
    }
    m.set_str(90, &original_data_elements(original));
    m
}

async fn station_reversals_apply_once(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    open_account(&sw, "ACC-1", 100_000, 60_000).await;
    let mut acq = station(&sw, "ACQ001").await;
    let c = card(PAN);

    // a forwarded 0200, reversed by a 0420 and its 0421 repeat: credited once
    let (original, answer) = acq.withdraw(&c, 10_000).await.unwrap();
    assert_eq!(code(&answer), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 90_000);
    let rev = reversal_advice(&mut acq, &original, "0420");
    let answer = send(&mut acq, &rev).await;
    assert_eq!((answer.mti().as_str(), code(&answer)), ("0430", "00"));
    let mut again = rev.clone();
    again.set_mti(Mti::parse("0421").unwrap());
    assert_eq!(code(&send(&mut acq, &again).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);

    // the reversal overtook its original: recorded and answered 21; the late original is
    // answered 21 too and debits nothing
    let late = acq.financial("010000", &c, 7_000).unwrap();
    let rev = reversal_advice(&mut acq, &late, "0420");
    assert_eq!(code(&send(&mut acq, &rev).await), "21");
    assert_eq!(code(&send(&mut acq, &late).await), "21");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);
    sw.stop().await;
}
on_both_backends!(
    station_reversals_apply_once_test,
    station_reversals_apply_once
);

async fn station_ceilings_bound_forced_posts(backend: Backend) {
    let Some(sw) = TestSwitch::start_with(backend, |s| {
        s.stations.advice_daily_max_amount = 1_000_000;
        s.stations.overrides.insert(
            "ACQ001".into(),
            switchyard_switch::settings::StationOverride {
                advice_max_amount: Some(50_000),
                advice_daily_max_amount: Some(80_000),
            },
        );
    })
    .await
    else {
        return;
    };
    open_account(&sw, "ACC-1", 100_000, 60_000).await;
    let mut acq = station(&sw, "ACQ001").await;

    // above the per-advice ceiling: 61, nothing booked, audited
    let big = advice(&mut acq, PAN, 50_001, "612300000020");
    assert_eq!(code(&send(&mut acq, &big).await), "61");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);
    let audit = sw.viewer.get("/v1/audit?limit=1000").await.unwrap();
    let refused: Vec<&serde_json::Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "advice.refused")
        .collect();
    assert_eq!(refused.len(), 1, "{audit}");
    assert_eq!(refused[0]["actor"], "station:ACQ001");
    assert!(
        !refused[0].to_string().contains(PAN),
        "no card data audited"
    );

    // up to the per-day ceiling (50,000 + 30,000 = 80,000), past the account's daily limit
    let first = advice(&mut acq, PAN, 50_000, "612300000021");
    assert_eq!(code(&send(&mut acq, &first).await), "00");
    let second = advice(&mut acq, PAN, 30_000, "612300000022");
    assert_eq!(code(&send(&mut acq, &second).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 20_000);
    // one more minor unit today is refused; a repeat of a booked one still gets its answer
    let more = advice(&mut acq, PAN, 1, "612300000023");
    assert_eq!(code(&send(&mut acq, &more).await), "61");
    assert_eq!(code(&send(&mut acq, &repeat(&second)).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 20_000);

    // the refused advice was not journaled: the same identity is refused again, not `94`
    assert_eq!(code(&send(&mut acq, &repeat(&more)).await), "61");

    // another station has its own day, under the defaults
    let mut other = station(&sw, "ACQ002").await;
    let m = advice(&mut other, PAN, 5_000, "612300000024");
    assert_eq!(code(&send(&mut other, &m).await), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 15_000);
    sw.stop().await;
}
on_both_backends!(
    station_ceilings_bound_forced_posts_test,
    station_ceilings_bound_forced_posts
);
