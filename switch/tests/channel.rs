//! The ATM channel over real sockets: sign-on, echo, sign-off, sessions, idle timeout,
//! connection cap, graceful shutdown — on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{Backend, TestSwitch, sample};
use switchyard_switch::atm::expect_code;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn sign_on_echo_sign_off(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    expect_code(&atm.network("301").await.unwrap(), "00").unwrap();
    let view = sw.viewer.get("/v1/terminals/ATM00001").await.unwrap();
    assert_eq!(view["signedOn"], true);
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_terminals_signed_on"),
        Some(1.0)
    );
    expect_code(&atm.network("002").await.unwrap(), "00").unwrap();
    let view = sw.viewer.get("/v1/terminals/ATM00001").await.unwrap();
    assert_eq!(view["signedOn"], false);
    // Not signed on any more: echo and financial messages are refused.
    expect_code(&atm.network("301").await.unwrap(), "58").unwrap();
    assert_eq!(
        sample(&sw.metrics().await, "switchyard_terminals_signed_on"),
        Some(0.0)
    );
    sw.stop().await;
}
on_both_backends!(sign_on_echo_sign_off_works, sign_on_echo_sign_off);

async fn unknown_terminal_is_refused(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    atm.id = switchyard_switch::domain::TerminalId::new("GHOST").unwrap();
    expect_code(&atm.network("001").await.unwrap(), "58").unwrap();
    let audit = sw.viewer.get("/v1/audit").await.unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "session.sign-on-refused" && r["target"] == "GHOST"),
        "{audit}"
    );
    sw.stop().await;
}
on_both_backends!(
    unknown_terminal_is_refused_and_audited,
    unknown_terminal_is_refused
);

async fn disconnect_deregisters(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    drop(atm);
    // The session leaves the registry before the connection gauges drop (the disconnect is
    // audited in between): wait for all of them; scrapes are quick since they query nothing.
    for _ in 0..50 {
        let text = sw.metrics().await;
        if [
            "switchyard_terminals_signed_on",
            "switchyard_connections{state=\"signed_on\"}",
            "switchyard_connections{state=\"connected\"}",
        ]
        .iter()
        .all(|name| sample(&text, name) == Some(0.0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = sw.metrics().await;
    assert_eq!(sample(&text, "switchyard_terminals_signed_on"), Some(0.0));
    assert_eq!(
        sample(&text, "switchyard_connections{state=\"signed_on\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "switchyard_connections{state=\"connected\"}"),
        Some(0.0)
    );
    let view = sw.viewer.get("/v1/terminals/ATM00001").await.unwrap();
    assert_eq!(view["signedOn"], false);
    sw.stop().await;
}
on_both_backends!(disconnect_deregisters_the_session, disconnect_deregisters);

#[tokio::test]
async fn admin_sign_off_closes_the_connection() {
    let sw = TestSwitch::start(Backend::Sqlite).await.unwrap();
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    let res = sw
        .admin
        .post("/v1/terminals/ATM00001/sign-off", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(res["wasSignedOn"], true);
    assert!(
        atm.network("301").await.is_err(),
        "connection must be closed"
    );
    sw.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.iso8583.idle_timeout = Duration::from_millis(300);
    })
    .await
    .unwrap();
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(atm.network("301").await.is_err());
    sw.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| s.iso8583.max_connections = 2)
        .await
        .unwrap();
    let _a = TcpStream::connect(sw.iso()).await.unwrap();
    let _b = TcpStream::connect(sw.iso()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(sw.iso()).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("the refused connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        sample(
            &sw.metrics().await,
            "switchyard_connections_rejected_total{reason=\"max_connections\"}"
        ),
        Some(1.0)
    );
    sw.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_without_reading_the_body() {
    let sw = TestSwitch::start(Backend::Sqlite).await.unwrap();
    let mut s = TcpStream::connect(sw.iso()).await.unwrap();
    s.write_all(&[0xFF, 0xFF, b'0', b'8']).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        sample(
            &sw.metrics().await,
            "switchyard_frame_errors_total{reason=\"too_large\"}"
        ),
        Some(1.0)
    );
    sw.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_goes_unready_and_closes_sessions() {
    let sw = TestSwitch::start(Backend::Sqlite).await.unwrap();
    let mut atm = sw.atm("ATM00001").await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    let ready = format!("http://{}/readyz", sw.running.metrics_addr);
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);
    let ctx = sw.running.ctx.clone();
    let token = sw.running.shutdown_token();
    token.cancel();
    // Readiness goes false at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(ctx.health.readiness().is_err());
    // The terminal's connection is closed cleanly.
    assert!(atm.network("301").await.is_err());
    sw.stop().await;
}
