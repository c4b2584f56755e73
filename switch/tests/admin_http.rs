//! The admin and metrics HTTP servers under abuse, and `Idempotency-Key` races, over real HTTP
//! against a switch on port 0, on SQLite and PostgreSQL: concurrent retries of a fleet rotation
//! create one rotation; the database keeps no clear PAN and no plain hash of a request body;
//! 401 and 403 are audited with the client address; bursts get `429` with `Retry-After`; slow
//! clients are cut off and connections capped; bogus MTIs share one `other` label; `/metrics`
//! serves gauges computed in the background, not per scrape.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Backend, TestSwitch, sample};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use switchyard_switch::domain::TerminalId;
use switchyard_switch::iso8583::{Message, Mti};
use switchyard_switch::net::connection::Connection;
use switchyard_switch::store::{AdviceMti, NewAdvice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The admin token of the test switch (the first line of its tokens file).
fn admin_token(sw: &TestSwitch) -> String {
    token(sw, "admin")
}

fn token(sw: &TestSwitch, role: &str) -> String {
    std::fs::read_to_string(sw.dir.path().join("tokens"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{role}:")).map(str::to_string))
        .unwrap()
}

fn url(sw: &TestSwitch, path: &str) -> String {
    format!("http://{}{path}", sw.running.admin_addr)
}

/// POSTs `body` (exact bytes) with an optional `Idempotency-Key`.
async fn post_raw(
    sw: &TestSwitch,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new()
        .post(url(sw, path))
        .bearer_auth(admin_token(sw))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let value = resp.json().await.unwrap_or(Value::Null);
    (status, headers, value)
}

async fn register(sw: &TestSwitch, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("IDEM{i:04}");
        sw.admin
            .register_terminal(&sw.kek, &TerminalId::new(&id).unwrap(), "idem")
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

async fn concurrent_rotation_retries_create_one_rotation(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let ids = register(&sw, 5).await;
    let body =
        json!({"keyType": "TAK", "terminals": {"groups": ["idem"]}, "activation": "onConfirm"})
            .to_string();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, token, body) = (
            url(&sw, "/v1/key-rotations"),
            admin_token(&sw),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .header("Idempotency-Key", "rotation-2026-11-30")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            (status, retry_after, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut rotation_ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            201 => {
                rotation_ids.insert(body["id"].as_str().unwrap().to_string());
                assert_eq!(body["terminals"], 5);
            }
            409 => {
                assert_eq!(body["type"], "https://switchyard.io/problems/in-progress");
                assert!(retry_after.is_some());
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(rotation_ids.len(), 1, "{rotation_ids:?}");
    // Each terminal got exactly one new TAK.
    for id in &ids {
        let keys = sw
            .viewer
            .get(&format!("/v1/terminals/{id}/keys"))
            .await
            .unwrap();
        let taks = keys
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["type"] == "TAK")
            .count();
        assert_eq!(taks, 1, "terminal {id}: {keys}");
    }
    // A retry now replays the answer.
    let (status, headers, replay) =
        post_raw(&sw, "/v1/key-rotations", &body, Some("rotation-2026-11-30")).await;
    assert_eq!(status, 201);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(
        replay["id"].as_str(),
        rotation_ids.first().map(String::as_str)
    );
    // The same key with another request: 422, nothing made.
    let other =
        json!({"keyType": "TPK", "terminals": "all", "activation": "onConfirm"}).to_string();
    let (status, _, problem) = post_raw(
        &sw,
        "/v1/key-rotations",
        &other,
        Some("rotation-2026-11-30"),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("different request")
    );
    let keys = sw
        .viewer
        .get(&format!("/v1/terminals/{}/keys", ids[0]))
        .await
        .unwrap();
    assert!(!keys.as_array().unwrap().iter().any(|k| k["type"] == "TPK"));
    // Bodyless writes take a key too: a replayed sign-off.
    let signoff = format!("/v1/terminals/{}/sign-off", ids[0]);
    let (s1, _, b1) = post_raw(&sw, &signoff, "", Some("so-1")).await;
    let (s2, h2, b2) = post_raw(&sw, &signoff, "", Some("so-1")).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2);
    assert_eq!(h2["idempotent-replayed"], "true");
    sw.stop().await;
}
on_both_backends!(
    concurrent_rotation_retries,
    concurrent_rotation_retries_create_one_rotation
);

/// Every byte of the database as text: the SQLite files, or every PostgreSQL table's rows.
async fn database_dump(sw: &TestSwitch, backend: Backend) -> Vec<u8> {
    match backend {
        Backend::Sqlite => {
            let path = sw.db.url.trim_start_matches("sqlite://").to_string();
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm"] {
                if let Ok(b) = std::fs::read(format!("{path}{suffix}")) {
                    bytes.extend(b);
                }
            }
            bytes
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&sw.db.url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = current_schema()",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            assert!(
                tables.iter().any(|t| t == "idempotency_claims"),
                "{tables:?}"
            );
            let mut text = String::new();
            for t in tables {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT t::text FROM \"{t}\" t"
                )))
                .fetch_all(&pool)
                .await
                .unwrap();
                text.push_str(&rows.join("\n"));
            }
            pool.close().await;
            text.into_bytes()
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn database_keeps_no_pan_and_no_plain_body_hash(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let (status, _, _) = post_raw(
        &sw,
        "/v1/accounts",
        &json!({"id": "ACC-HASH", "currency": "360", "balance": 1000, "dailyWithdrawalLimit": 1000})
            .to_string(),
        Some("acc-1"),
    )
    .await;
    assert_eq!(status, 201);
    let pans = ["6011000000001234", "6011000000005678", "6011000000009999"];
    let mut bodies = Vec::new();
    for (i, pan) in pans.iter().enumerate() {
        let body = json!({"pan": pan, "expiry": "2812", "accountId": "ACC-HASH", "pin": format!("{}", 4321 + i)})
            .to_string();
        let (status, _, card) = post_raw(&sw, "/v1/cards", &body, Some(&format!("card-{i}"))).await;
        assert_eq!(status, 201, "{card}");
        // a retry is recognised, without the body being kept
        let (status, headers, again) =
            post_raw(&sw, "/v1/cards", &body, Some(&format!("card-{i}"))).await;
        assert_eq!((status, &again), (201, &card));
        assert_eq!(headers["idempotent-replayed"], "true");
        let reset = json!({"pan": pan, "pin": "9876"}).to_string();
        let path = format!("/v1/cards/{}/pin-reset", card["id"].as_str().unwrap());
        let (status, _, _) = post_raw(&sw, &path, &reset, Some(&format!("reset-{i}"))).await;
        assert_eq!(status, 200);
        bodies.push(("/v1/cards".to_string(), body));
        bodies.push((path, reset));
    }
    let dump = database_dump(&sw, backend).await;
    assert!(dump.len() > 1000, "the dump is not empty");
    for pan in pans {
        assert!(
            !contains(&dump, pan.as_bytes()),
            "clear PAN {pan} in the database"
        );
    }
    for (path, body) in &bodies {
        for preimage in [format!("POST {path}\n{body}"), body.clone()] {
            let digest = Sha256::digest(preimage.as_bytes());
            assert!(
                !contains(&dump, hex::encode(digest).as_bytes()),
                "plain SHA-256 of a request body in the database"
            );
            assert!(!contains(&dump, &digest), "raw SHA-256 in the database");
        }
    }
    sw.stop().await;
}
on_both_backends!(
    no_pan_or_body_hash_at_rest,
    database_keeps_no_pan_and_no_plain_body_hash
);

async fn refusals_are_audited_with_the_address(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let client = reqwest::Client::new();
    let none = client.get(url(&sw, "/v1/terminals")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let bad = client
        .get(url(&sw, "/v1/terminals"))
        .bearer_auth("not-a-token-at-all-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let viewer_write = client
        .post(url(&sw, "/v1/accounts"))
        .bearer_auth(token(&sw, "viewer"))
        .header("content-type", "application/json")
        .body(r#"{"id":"ACC-V","currency":"360","balance":1,"dailyWithdrawalLimit":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(viewer_write.status(), 403);
    let audit = sw.viewer.get("/v1/audit?limit=1000").await.unwrap();
    let refused: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["result"]
                .as_str()
                .unwrap_or("")
                .starts_with("refused: 40")
        })
        .collect();
    let find = |actor_prefix: &str, result: &str, reason: &str| {
        refused.iter().any(|r| {
            r["actor"].as_str().unwrap().starts_with(actor_prefix)
                && r["result"] == result
                && r["detail"]["remoteAddress"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:"))
                && r["detail"]["reason"] == reason
        })
    };
    assert!(
        find("anonymous", "refused: 401", "no Authorization header"),
        "{refused:?}"
    );
    assert!(
        find("anonymous", "refused: 401", "unknown bearer token"),
        "{refused:?}"
    );
    assert!(
        find("viewer#", "refused: 403", "read-only role"),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r["action"] == "GET /v1/terminals" && r["target"] == "/v1/terminals")
    );
    assert!(
        !audit.to_string().contains("not-a-token-at-all"),
        "a presented token is never audited"
    );
    sw.stop().await;
}
on_both_backends!(refusals_audited, refusals_are_audited_with_the_address);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_get_429_with_retry_after() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.rate_limit_per_second = 1;
        s.admin.rate_limit_burst = 5;
        s.admin.auth_failures_per_minute = 3;
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let viewer = token(&sw, "viewer");
    let mut limited = None;
    for _ in 0..10 {
        let resp = client
            .get(url(&sw, "/v1/terminals"))
            .bearer_auth(&viewer)
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
    }
    let resp = limited.expect("a burst beyond the limit is refused");
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["status"], 429);
    assert_eq!(
        problem["type"],
        "https://switchyard.io/problems/rate-limited"
    );
    let text = sw.metrics().await;
    assert!(
        sample(
            &text,
            "switchyard_admin_rate_limited_total{limit=\"address\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_authentications_block_the_address() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.auth_failures_per_minute = 3;
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    for _ in 0..4 {
        let resp = client
            .get(url(&sw, "/v1/terminals"))
            .bearer_auth("guess-guess-guess-guess")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    // Even the right token is not looked at now: guessing gets nowhere.
    let resp = client
        .get(url(&sw, "/v1/terminals"))
        .bearer_auth(token(&sw, "viewer"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let text = sw.metrics().await;
    assert_eq!(
        sample(
            &text,
            "switchyard_admin_rate_limited_total{limit=\"auth_failures\"}"
        ),
        Some(1.0),
        "{text}"
    );
    sw.stop().await;
}

/// Sends a request head a few bytes at a time, forever; returns how long until the server
/// closed the connection.
async fn slowloris(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return started.elapsed(),
                // a 408 or similar before closing is fine too
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    return started.elapsed();
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a slow client held the connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_connections_capped() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.header_read_timeout = Duration::from_millis(600);
        s.metrics.header_read_timeout = Duration::from_millis(600);
        s.metrics.max_connections = 2;
    })
    .await
    .unwrap();
    for addr in [sw.running.admin_addr, sw.running.metrics_addr] {
        let held = slowloris(addr).await;
        assert!(held < Duration::from_secs(3), "{addr}: held {held:?}");
    }
    // Two idle sockets fill the metrics server; a third is closed at accept.
    let _a = TcpStream::connect(sw.running.metrics_addr).await.unwrap();
    let _b = TcpStream::connect(sw.running.metrics_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(sw.running.metrics_addr).await.unwrap();
    let _ = c.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is not served");
    // The idle ones are closed by the header timeout, and the server serves again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let text = sw.metrics().await;
    assert!(
        sample(
            &text,
            "switchyard_http_connections_rejected_total{server=\"metrics\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_bodies_hit_the_request_timeout() {
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.request_timeout = Duration::from_millis(500);
    })
    .await
    .unwrap();
    let mut s = TcpStream::connect(sw.running.admin_addr).await.unwrap();
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        admin_token(&sw)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bogus_mtis_share_one_label() {
    let sw = TestSwitch::start(Backend::Sqlite).await.unwrap();
    let mut sent = 0;
    // a few frames per connection, so per-connection limits on unauthenticated frames do not
    // matter to what is measured here
    while sent < 1000 {
        let stream = TcpStream::connect(sw.iso()).await.unwrap();
        let mut conn = Connection::new(stream, 8192);
        for _ in 0..4 {
            // 1000..=1999 and 9000..: none is an MTI the switch handles
            let digits = if sent % 2 == 0 {
                1000 + sent
            } else {
                9000 + sent
            };
            let mut m = Message::new(Mti::parse(&format!("{digits:04}")).unwrap());
            m.set_str(11, "000001");
            m.set_str(41, "ATM00001");
            let frame = sw.packager.pack(&m).unwrap();
            if conn.write_frame(&frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        conn.shutdown().await;
        // read what the switch answers until it closes, so no frame is lost to a reset
        while let Ok(Some(_)) = conn.read_frame().await {}
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = sw.metrics().await;
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("switchyard_iso_messages_total{"))
            .collect();
        assert!(
            series.iter().all(|l| l.contains("mti=\"other\"")),
            "{series:?}"
        );
        let counted: f64 = series
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted >= 1000.0 {
            assert!(series.len() <= 2, "{series:?}");
            break;
        }
        assert!(Instant::now() < deadline, "counted {counted}: {series:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrapes_serve_the_background_gauges_without_querying() {
    // A refresh interval far longer than the test: the only refresh is the one at start.
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.metrics.refresh_interval = Duration::from_secs(3600);
    })
    .await
    .unwrap();
    let wait_for_first = Instant::now() + Duration::from_secs(5);
    // `switchyard_keys` series exist only once a refresh has set them
    while sample(
        &sw.metrics().await,
        "switchyard_keys{type=\"TAK\",state=\"ACTIVE\"}",
    )
    .is_none()
    {
        assert!(Instant::now() < wait_for_first, "the first refresh ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = sw.running.ctx.store.clone();
    store
        .saf_enqueue(&NewAdvice {
            destination: "issuer-b".into(),
            priority: 0,
            mti: AdviceMti::Advice0220,
            idempotency_key: "ACQ001:1".into(),
            payload: json!({"3": "010000", "4": "000000010000", "11": "000001"}),
            reference: None,
            created_at: Utc::now(),
        })
        .await
        .unwrap();
    // The store says 1; a scrape still says what the last refresh computed.
    for _ in 0..20 {
        let text = sw.metrics().await;
        assert_eq!(
            sample(
                &text,
                "switchyard_saf_backlog{destination=\"issuer-b\",priority=\"0\"}"
            ),
            None,
            "a scrape queried the store"
        );
    }
    sw.stop().await;
}
