//! Profile v2 network management and connection hygiene over real sockets, on SQLite and
//! PostgreSQL: what an attacker with nothing but access to the ISO 8583 port can do (nothing),
//! replays, and a flood of idle sockets from one address.

mod common;

use std::time::Duration;

use common::{Backend, TestSwitch, sample};
use switchyard_switch::atm::{AtmClient, expect_code};
use switchyard_switch::crypto::TerminalKeys;
use switchyard_switch::domain::KeyType;
use switchyard_switch::iso8583::Message;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

fn code(m: &Message) -> &str {
    m.get_str(39).unwrap_or("")
}

/// (type, state, kcv) of every key of a terminal, as the admin API lists them.
async fn keys_of(sw: &TestSwitch, tid: &str) -> Vec<(String, String, String)> {
    let list = sw
        .viewer
        .get(&format!("/v1/terminals/{tid}/keys"))
        .await
        .unwrap();
    let mut keys: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["type"].as_str().unwrap().to_string(),
                k["state"].as_str().unwrap().to_string(),
                k["kcv"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    keys.sort();
    keys
}

/// An 0800 for `atm`'s terminal with code 70 and extra fields, MACed under K_NM when `mac`.
async fn network(
    atm: &mut AtmClient,
    code70: &str,
    extra: &[(u8, &str)],
    mac: bool,
) -> (Message, Vec<u8>) {
    let mut m = atm.new_request("0800").unwrap();
    m.set_str(70, code70);
    for (f, v) in extra {
        m.set_str(*f, v);
    }
    atm.request(m, mac).await.unwrap()
}

async fn forged_network_management_changes_nothing(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut real = sw.atm("ATM00001").await;
    expect_code(&real.network("001").await.unwrap(), "00").unwrap();
    real.exchange_key(KeyType::Tpk).await.unwrap();
    real.exchange_key(KeyType::Tak).await.unwrap();
    let before = keys_of(&sw, "ATM00001").await;

    // The attack of the security review: same terminal id, no TMK. First with no MAC at all,
    // then with a MAC under a K_NM derived from a TMK of the attacker's choosing.
    for forged_mac in [false, true] {
        let mut attacker = AtmClient::connect(
            &sw.iso(),
            real.id.clone(),
            TerminalKeys::generate(&mut rand::rng()),
            sw.packager,
        )
        .await
        .unwrap();
        for (code70, extra) in [
            ("001", vec![]),
            ("161", vec![(48u8, "TAK")]),
            ("162", vec![(48u8, "TAK"), (122u8, "ABCDEF")]),
            ("301", vec![]),
        ] {
            let (answer, _) = network(&mut attacker, code70, &extra, forged_mac).await;
            assert_eq!(code(&answer), "63", "0800/{code70} forged={forged_mac}");
            assert!(!answer.has(64) && !answer.has(128), "a 63 carries no MAC");
            assert!(!answer.has(120) && !answer.has(122), "no key material");
        }
    }
    assert_eq!(
        keys_of(&sw, "ATM00001").await,
        before,
        "no key made or activated"
    );
    // The real terminal's session was never replaced.
    expect_code(&real.network("301").await.unwrap(), "00").unwrap();
    let view = sw.viewer.get("/v1/terminals/ATM00001").await.unwrap();
    assert_eq!(view["signedOn"], true);
    let text = sw.metrics().await;
    assert!(sample(&text, "switchyard_mac_failures_total").unwrap() >= 8.0);
    let audit = sw.viewer.get("/v1/audit?limit=1000").await.unwrap();
    let refused = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "message.network" && r["target"] == "ATM00001")
        .count();
    assert!(refused >= 8, "every forged 0800 is audited: {refused}");
    sw.stop().await;
}
on_both_backends!(
    forged_network_management_is_refused_63_and_changes_nothing,
    forged_network_management_changes_nothing
);

async fn replayed_sign_on(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    let mut sign_on = atm.new_request("0800").unwrap();
    sign_on.set_str(70, "001");
    let stan = sign_on.get_str(11).unwrap().to_string();
    let captured = atm.pack(&mut sign_on, true).unwrap();
    let (answer, _) = atm.exchange_raw(&captured, &stan).await.unwrap();
    assert_eq!(code(&answer), "00");

    // The same frame from an eavesdropper's connection, and again on the terminal's own.
    let mut replayer = AtmClient::connect(&sw.iso(), atm.id.clone(), atm.keys.clone(), sw.packager)
        .await
        .unwrap();
    let (answer, _) = replayer.exchange_raw(&captured, &stan).await.unwrap();
    assert_eq!(code(&answer), "94");
    let (answer, _) = atm.exchange_raw(&captured, &stan).await.unwrap();
    assert_eq!(code(&answer), "94");
    // The live session was kept.
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    // The terminal itself signing on again (a new STAN) is accepted.
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    sw.stop().await;
}
on_both_backends!(
    replayed_sign_on_gets_94_and_keeps_the_session,
    replayed_sign_on
);

async fn forged_answer_to_a_key_push(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    let rotated = sw
        .admin
        .post(
            "/v1/terminals/ATM00001/keys/TAK/rotate",
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let kcv = rotated["key"]["kcv"].as_str().unwrap().to_string();
    let (push, raw) = atm.read_message().await.unwrap();
    assert_eq!(
        (push.mti().as_str(), push.get_str(70)),
        ("0800", Some("161"))
    );
    assert!(
        atm.nm_mac_verifies(&push, &raw),
        "the push is MACed under K_NM"
    );

    // Answers with the right KCV that do not verify under K_NM: none, and one under a key of
    // someone else's choosing.
    let mut forged = Message::new(switchyard_switch::iso8583::Mti::parse("0810").unwrap());
    for f in [7u8, 11, 41, 48, 70] {
        forged.set(f, push.get(f).unwrap());
    }
    forged.set_str(39, "00");
    forged.set_str(122, &kcv);
    let unmacd = atm.pack(&mut forged.clone(), false).unwrap();
    atm.send_frame(&unmacd).await.unwrap();
    let impostor = AtmClient::connect(
        &sw.iso(),
        atm.id.clone(),
        TerminalKeys::generate(&mut rand::rng()),
        sw.packager,
    )
    .await
    .unwrap();
    let wrong_key = impostor.pack(&mut forged.clone(), true).unwrap();
    atm.send_frame(&wrong_key).await.unwrap();
    // The connection's frames are processed in order: once the echo is answered, both were read.
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    assert!(
        keys_of(&sw, "ATM00001")
            .await
            .contains(&("TAK".into(), "PENDING".into(), kcv.clone())),
        "an answer that does not verify under K_NM activates nothing"
    );
    // The terminal's real answer activates it.
    atm.answer_key_push(&push, &raw).await.unwrap();
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    assert!(
        keys_of(&sw, "ATM00001")
            .await
            .contains(&("TAK".into(), "ACTIVE".into(), kcv)),
    );
    sw.stop().await;
}
on_both_backends!(
    an_unmacd_answer_to_a_key_push_activates_nothing,
    forged_answer_to_a_key_push
);

/// A connection from `ip` (another loopback address, so the test's terminal on 127.0.0.1 has
/// its own per-address budget).
async fn connect_from(ip: &str, to: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{ip}:0").parse().unwrap())?;
    socket.connect(to.parse().unwrap()).await
}

async fn closed_by_peer(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn idle_flood_from_one_address(backend: Backend) {
    let Some(sw) = TestSwitch::start_with(backend, |s| {
        s.iso8583.max_connections = 40;
        s.iso8583.max_connections_per_ip = 8;
        s.iso8583.signon_timeout = Duration::from_millis(800);
    })
    .await
    else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();

    // 100 idle sockets from one address: only 8 are kept, and those only until signon_timeout.
    let mut flood = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = connect_from("127.0.0.2", &sw.iso()).await {
            flood.push(s);
        }
    }
    // The signed-on terminal keeps transacting, and a new terminal can still connect.
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    let mut other = sw.atm("ATM00002").await;
    expect_code(&other.network("001").await.unwrap(), "00").unwrap();
    let text = sw.metrics().await;
    assert!(
        sample(
            &text,
            "switchyard_connections_rejected_total{reason=\"per_ip_limit\"}"
        )
        .unwrap()
            >= 92.0,
        "{text}"
    );
    let mut open = 0;
    for s in flood.iter_mut() {
        if !closed_by_peer(s, Duration::from_millis(10)).await {
            open += 1;
        }
    }
    assert!(
        open <= 8,
        "at most max_connections_per_ip stay open: {open}"
    );
    // After signon_timeout, the idle ones are gone too.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for s in flood.iter_mut() {
        assert!(closed_by_peer(s, Duration::from_millis(500)).await);
    }
    let text = sw.metrics().await;
    assert!(
        sample(
            &text,
            "switchyard_connections_rejected_total{reason=\"signon_timeout\"}"
        )
        .unwrap()
            >= 8.0
    );
    // The signed-on sessions are not subject to the sign-on timeout.
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    expect_code(&other.network("301").await.unwrap(), "00").unwrap();
    sw.stop().await;
}
on_both_backends!(
    an_idle_flood_from_one_address_does_not_stop_signed_on_terminals,
    idle_flood_from_one_address
);

#[tokio::test]
async fn frames_before_sign_on_close_the_connection_at_the_limit() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.iso8583.max_unauthenticated_frames = 3;
    })
    .await
    .unwrap();
    let mut atm = sw.atm("ATM00001").await;
    let card = common::card("6011000000000004");
    for i in 0..3 {
        // a 0200 before sign-on (no keys yet, so unMACed): 58
        let mut m = atm.new_request("0200").unwrap();
        m.set_str(2, &card.pan);
        m.set_str(3, "310000");
        m.set_str(4, "000000000000");
        let (answer, _) = atm.request(m, false).await.unwrap();
        assert_eq!(code(&answer), "58", "frame {i}");
    }
    assert!(
        atm.network("001").await.is_err(),
        "the connection was closed after the third unauthenticated frame"
    );
    let text = sw.metrics().await;
    assert_eq!(
        sample(
            &text,
            "switchyard_connections_rejected_total{reason=\"unauthenticated_frames\"}"
        ),
        Some(1.0)
    );
    sw.stop().await;
}
