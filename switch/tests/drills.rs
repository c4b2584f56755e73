//! The reliability drills of SPEC §9 that need two switches: an acquirer routing BIN 4111 to an
//! issuer, where that BIN is on-us. Both are real `switchyard-switch` processes, killed and
//! restarted like in production; the drainers are real `switchyard-switch drain` processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::atm::{AtmClient, CardInput};
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::iso8583::Packager;
use switchyard_switch::store::{self, AdviceMti, ConnectOptions, NewAdvice};

use common::{Backend, TestDb, free_port, random_hex, sample};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-switch");
const ISSUER_PAN: &str = "4111111111111111";
const UNKNOWN_AT_ISSUER_PAN: &str = "4111999999999999";
const ISSUER_START: i64 = 1_000_000;

/// One switch process: its files, ports, admin client, and the child while it runs.
struct Node {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    iso: String,
    metrics: String,
    admin: AdminClient,
    kek: Vec<u8>,
    child: Option<Child>,
}

impl Node {
    /// Writes secrets and a config (`extra` is appended TOML) into `dir/name`.
    fn new(root: &Path, name: &'static str, database_url: &str, extra: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let kek_hex = random_hex(32);
        std::fs::write(dir.join("lmk.hex"), random_hex(32)).unwrap();
        std::fs::write(dir.join("kek.hex"), &kek_hex).unwrap();
        let token = format!("adm{}", random_hex(12));
        std::fs::write(dir.join("tokens"), format!("admin:{token}\n")).unwrap();
        let (iso, admin, metrics) = (free_port(), free_port(), free_port());
        let config = dir.join("switch.toml");
        std::fs::write(
            &config,
            format!(
                "[iso8583]\nlisten = \"127.0.0.1:{iso}\"\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\ntokens_file = \"{d}/tokens\"\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
                 [database]\nurl = \"{database_url}\"\n\
                 [keys]\nlmk_file = \"{d}/lmk.hex\"\nkek_file = \"{d}/kek.hex\"\n{extra}",
                d = dir.display()
            ),
        )
        .unwrap();
        Node {
            name,
            dir,
            config,
            iso: format!("127.0.0.1:{iso}"),
            metrics: format!("http://127.0.0.1:{metrics}"),
            admin: AdminClient::new(format!("http://127.0.0.1:{admin}"), token),
            kek: hex::decode(kek_hex).unwrap(),
            child: None,
        }
    }

    fn spawn(&self, args: &[&str], env: &[(&str, String)], log: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log-format")
            .arg("text")
            .args(args)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn switchyard-switch")
    }

    async fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        self.child = Some(self.spawn(&["serve", "--migrate"], &[], "serve.log"));
        let url = format!("{}/readyz", self.metrics);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(reqwest::get(&url).await, Ok(r) if r.status().is_success()) {
            // the process's own words say why it never got ready (a port taken, a store error)
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {} ready; its log:\n{}",
                self.name,
                self.log("serve.log")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no goodbye, nothing flushed beyond what was committed.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        sample(&text, name)
    }

    async fn balance(&self, account: &str) -> i64 {
        self.admin
            .get(&format!("/v1/accounts/{account}"))
            .await
            .unwrap()["balance"]
            .as_i64()
            .unwrap()
    }

    async fn saf_stats(&self) -> Value {
        self.admin.get("/v1/saf/stats").await.unwrap()
    }

    fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }
}

impl Drop for Node {
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

fn backlog(stats: &Value) -> u64 {
    stats["backlog"].as_u64().expect("backlog in /v1/saf/stats")
}

const ACQUIRER_ROUTING: &str = r#"
[routing]
on_us = ["6011"]
[[routing.routes]]
prefix = "4111"
upstream = "issuer-b"
"#;

fn upstream_config(issuer_iso: &str, tmk_file: &Path) -> String {
    format!(
        r#"
[[upstreams]]
name = "issuer-b"
endpoints = ["{issuer_iso}"]
station_id = "ACQ001"
tmk_file = "{}"
heartbeat_interval = "1s"
timeout = "2s"
[upstreams.circuit_breaker]
failure_rate = 0.5
min_volume = 3
window = "10s"
reset_timeout = "2s"
[upstreams.stand_in]
enabled = true
max_amount = 100000
"#,
        tmk_file.display()
    )
}

const FAST_SAF: &str = r#"
[saf]
max_attempts = 5
backoff_initial = "200ms"
backoff_max = "1s"
lease = "3s"
poll_interval = "100ms"
"#;

/// The issuer knows the acquirer as station ACQ001 with a TMK; returns the TMK's file for the
/// acquirer's `[[upstreams]].tmk_file`.
async fn register_station(issuer: &Node, root: &Path) -> PathBuf {
    let tmk = issuer
        .admin
        .provision_station(&issuer.kek, &TerminalId::new("ACQ001").unwrap())
        .await
        .unwrap();
    let path = root.join("station.tmk");
    std::fs::write(&path, tmk.as_bytes()).unwrap();
    path
}

/// An issuer switch with BIN 4111 on-us, card and account seeded, and station ACQ001
/// registered; returns it running, with the station's TMK file for the acquirer.
async fn start_issuer(root: &Path, database_url: &str) -> (Node, PathBuf) {
    let mut issuer = Node::new(
        root,
        "issuer",
        database_url,
        "[routing]\non_us = [\"4111\"]\n",
    );
    issuer.start().await;
    seed_issuer(&issuer).await;
    let tmk = register_station(&issuer, root).await;
    (issuer, tmk)
}

async fn seed_issuer(issuer: &Node) {
    issuer
        .admin
        .create_account("ISS-1", "360", ISSUER_START, 100_000_000)
        .await
        .unwrap();
    issuer
        .admin
        .create_card(ISSUER_PAN, "2812", "ISS-1", "1234")
        .await
        .unwrap();
}

/// Stand-in data the issuer shared: the card's PVV (from its PIN) on an acquirer account that
/// caps what stand-in pays out.
async fn seed_stand_in(acquirer: &Node, cap: i64) {
    acquirer
        .admin
        .create_account("STIP-B", "360", cap, cap)
        .await
        .unwrap();
    acquirer
        .admin
        .post(
            "/v1/cards",
            &json!({"pan": ISSUER_PAN, "expiry": "2812", "accountId": "STIP-B",
                    "pin": "1234", "upstream": "issuer-b"}),
        )
        .await
        .unwrap();
}

async fn atm(acquirer: &Node, id: &str) -> AtmClient {
    let tid = TerminalId::new(id).unwrap();
    let keys = acquirer
        .admin
        .register_terminal(&acquirer.kek, &tid, "it")
        .await
        .unwrap();
    let mut atm = AtmClient::connect(&acquirer.iso, tid, keys, Packager::ascii())
        .await
        .unwrap();
    assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
    atm.exchange_key(KeyType::Tpk).await.unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    atm
}

fn card() -> CardInput {
    CardInput {
        pan: ISSUER_PAN.into(),
        expiry: "2812".into(),
        pin: "1234".into(),
        currency: "360".into(),
    }
}

async fn withdraw(atm: &mut AtmClient, amount: i64) -> String {
    let (_, answer) = atm.withdraw(&card(), amount).await.unwrap();
    answer.get_str(39).unwrap_or_default().to_string()
}

const UP: &str = "switchyard_upstream_up{upstream=\"issuer-b\"}";
const CIRCUIT: &str = "switchyard_circuit_state{upstream=\"issuer-b\"}";

async fn wait_link_up(acquirer: &Node) {
    eventually("the acquirer's link to be up", 40, || async {
        (acquirer.metric(UP).await == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issuer_outage_stands_in_and_every_advice_lands_once() {
    let root = tempfile::tempdir().unwrap();
    let db = |name: &str| format!("sqlite://{}", root.path().join(name).display());
    let (mut issuer, tmk) = start_issuer(root.path(), &db("issuer.db")).await;

    let extra = format!(
        "{ACQUIRER_ROUTING}{}{FAST_SAF}",
        upstream_config(&issuer.iso, &tmk)
    );
    let mut acquirer = Node::new(root.path(), "acquirer", &db("acquirer.db"), &extra);
    acquirer.start().await;
    seed_stand_in(&acquirer, 500_000).await;
    wait_link_up(&acquirer).await;
    let mut atm = atm(&acquirer, "ATM00001").await;

    // routed: the issuer answers, the issuer's ledger moves
    assert_eq!(withdraw(&mut atm, 10_000).await, "00");
    let balance = atm.balance(&card()).await.unwrap();
    assert_eq!(balance.get_str(39), Some("00"));
    assert!(balance.get_str(54).unwrap().contains("000000990000"));
    assert_eq!(issuer.balance("ISS-1").await, ISSUER_START - 10_000);
    assert_eq!(
        acquirer.balance("STIP-B").await,
        500_000,
        "routed: no stand-in money moved"
    );
    // the ATM reverses a routed withdrawal: answered at once, the issuer gets a 0420
    let (request, answer) = atm.withdraw(&card(), 7_000).await.unwrap();
    assert_eq!(answer.get_str(39), Some("00"));
    assert_eq!(atm.reverse(&request).await.unwrap().get_str(39), Some("00"));
    assert_eq!(
        atm.reverse(&request).await.unwrap().get_str(39),
        Some("00"),
        "repeat"
    );
    eventually("the routed reversal to reach the issuer", 20, || async {
        (issuer.balance("ISS-1").await == ISSUER_START - 10_000).then_some(())
    })
    .await;
    assert_eq!(
        acquirer.saf_stats().await["deliveredTotal"],
        1,
        "one 0420 for two 0400s"
    );

    // issuer killed: stand-in up to the limit, 91 above it and for balance inquiries
    issuer.kill();
    for _ in 0..3 {
        assert_eq!(withdraw(&mut atm, 20_000).await, "00");
    }
    // a stand-in approval the ATM reverses: its 0420 overtakes its 0220 at the issuer
    let (request, answer) = atm.withdraw(&card(), 4_000).await.unwrap();
    assert_eq!(answer.get_str(39), Some("00"));
    assert_eq!(atm.reverse(&request).await.unwrap().get_str(39), Some("00"));
    assert_eq!(withdraw(&mut atm, 200_000).await, "91");
    assert_eq!(atm.balance(&card()).await.unwrap().get_str(39), Some("91"));
    assert_eq!(acquirer.metric("switchyard_standin_total").await, Some(4.0));
    assert_eq!(acquirer.balance("STIP-B").await, 500_000 - 60_000);
    assert_eq!(backlog(&acquirer.saf_stats().await), 5);
    // the queued advices keep the PAN sealed: masked in the API, never in clear in the store
    let queued = acquirer.admin.get("/v1/saf?status=queued").await.unwrap();
    for advice in queued.as_array().unwrap() {
        assert_eq!(advice["fields"]["2"], "411111******1111", "{advice}");
    }
    let store = store::connect(
        &db("acquirer.db"),
        &ConnectOptions {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(10),
        },
    )
    .await
    .unwrap();
    let stored = store
        .saf_list(&Default::default(), Default::default())
        .await
        .unwrap();
    assert_eq!(stored.len(), 6, "the five queued and the delivered 0420");
    for advice in &stored {
        assert!(!advice.payload.to_string().contains(ISSUER_PAN));
    }
    store.close().await;
    // the failures opened the circuit
    eventually("the circuit to open", 10, || async {
        (acquirer.metric(CIRCUIT).await == Some(2.0)).then_some(())
    })
    .await;

    // issuer back: every advice is applied once, the circuit closes
    issuer.start().await;
    eventually("the backlog to drain", 60, || async {
        let stats = acquirer.saf_stats().await;
        (backlog(&stats) == 0 && stats["deliveredTotal"] == 6).then_some(())
    })
    .await;
    assert_eq!(
        issuer.balance("ISS-1").await,
        ISSUER_START - 10_000 - 60_000
    );
    eventually("the circuit to close", 20, || async {
        (acquirer.metric(CIRCUIT).await == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(withdraw(&mut atm, 5_000).await, "00");
    assert_eq!(issuer.balance("ISS-1").await, ISSUER_START - 75_000);
    assert_eq!(acquirer.metric(UP).await, Some(1.0));
    assert_eq!(acquirer.saf_stats().await["deadLetters"], 0);
}

/// Queues an advice straight into the acquirer's queue, as stand-in would (used for a poison
/// advice the issuer can never apply).
fn poison_advice() -> NewAdvice {
    let now = chrono::Utc::now();
    NewAdvice {
        destination: "issuer-b".into(),
        priority: 1,
        mti: AdviceMti::Advice0220,
        idempotency_key: "ACQ001:999001:poison".into(),
        payload: json!({
            "2": UNKNOWN_AT_ISSUER_PAN, "3": "010000", "4": "000000001000",
            "7": now.format("%m%d%H%M%S").to_string(), "11": "999001", "14": "2812",
            "41": "ACQ001  ", "49": "360"
        }),
        reference: None,
        created_at: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_drainers_on_one_postgres_apply_each_advice_once() {
    let Some(acq_db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let issuer_db = format!("sqlite://{}", root.path().join("issuer.db").display());
    let (mut issuer, tmk) = start_issuer(root.path(), &issuer_db).await;
    issuer.kill();

    let extra = format!(
        "{ACQUIRER_ROUTING}{}{FAST_SAF}",
        upstream_config(&issuer.iso, &tmk)
    );
    let mut acquirer = Node::new(root.path(), "acquirer", &acq_db.url, &extra);
    acquirer.start().await;
    seed_stand_in(&acquirer, 10_000_000).await;
    let mut atm = atm(&acquirer, "ATM00001").await;

    // the issuer is down from the start: every withdrawal stands in
    const N: i64 = 150;
    for _ in 0..N {
        assert_eq!(withdraw(&mut atm, 1_000).await, "00");
    }
    let store = store::connect(
        &acq_db.url,
        &ConnectOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(10),
        },
    )
    .await
    .unwrap();
    store.saf_enqueue(&poison_advice()).await.unwrap();
    // a drainer that leased ten advices and died before settling them
    let crashed = store
        .saf_lease(
            Some("issuer-b"),
            "crashed-drainer",
            Duration::from_secs(2),
            10,
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(crashed.len(), 10);
    assert_eq!(backlog(&acquirer.saf_stats().await), N as u64 + 1);

    issuer.start().await;
    let drainer_env = || {
        vec![(
            "SWITCHYARD_METRICS__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )]
    };
    let mut drainers: Vec<Child> = (0..3)
        .map(|i| acquirer.spawn(&["drain"], &drainer_env(), &format!("drain-{i}.log")))
        .collect();
    // kill one drainer as soon as deliveries are under way
    eventually("deliveries to start", 60, || async {
        let stats = acquirer.saf_stats().await;
        (stats["deliveredTotal"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let _ = drainers[0].kill();
    let _ = drainers[0].wait();

    let stats = eventually("every advice to be settled", 90, || async {
        let stats = acquirer.saf_stats().await;
        (backlog(&stats) == 0).then_some(stats)
    })
    .await;
    let dead = acquirer
        .admin
        .get("/v1/saf?status=deadLetter")
        .await
        .unwrap();
    assert_eq!(stats["deliveredTotal"], N, "{stats} {dead}");
    assert_eq!(stats["deadLetters"], 1, "{stats} {dead}");
    let reason = dead[0]["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("14"),
        "dead letter reason: {reason} ({dead})"
    );
    // exactly once in effect at the issuer, whatever was sent twice
    assert_eq!(issuer.balance("ISS-1").await, ISSUER_START - N * 1_000);
    let repeats: usize = (0..3)
        .map(|i| acquirer.log(&format!("drain-{i}.log")))
        .map(|l| l.matches("settled by another drainer").count())
        .sum();
    eprintln!("lease conflicts seen by drainers: {repeats}");

    for d in drainers.iter_mut() {
        let _ = d.kill();
        let _ = d.wait();
    }
    drop(acquirer);
    drop(issuer);
    store.close().await;
    acq_db.cleanup().await;
}

/// A TCP relay between the acquirer and the issuer that can lose the issuer's `0200`s on the
/// way in, or its `0210`s on the way back: a request or an answer that never arrives.
struct LossyLink {
    addr: String,
    lose_requests: Arc<AtomicBool>,
    lose_answers: Arc<AtomicBool>,
}

impl LossyLink {
    async fn start(issuer: String) -> LossyLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let lose_requests = Arc::new(AtomicBool::new(false));
        let lose_answers = Arc::new(AtomicBool::new(false));
        let (requests, answers) = (lose_requests.clone(), lose_answers.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&issuer).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(relay(cr, sw, b"0200", requests.clone()));
                tokio::spawn(relay(sr, cw, b"0210", answers.clone()));
            }
        });
        LossyLink {
            addr,
            lose_requests,
            lose_answers,
        }
    }
}

/// Copies length-prefixed frames, dropping those of MTI `lose` while `on` is set.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    lose: &'static [u8; 4],
    on: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut len = [0u8; 2];
        if from.read_exact(&mut len).await.is_err() {
            break;
        }
        let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if from.read_exact(&mut frame).await.is_err() {
            break;
        }
        if on.load(Ordering::SeqCst) && frame.starts_with(lose) {
            continue;
        }
        if to.write_all(&len).await.is_err() || to.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unanswered_withdrawals_are_reversed_and_stood_in_once() {
    let root = tempfile::tempdir().unwrap();
    let db = |name: &str| format!("sqlite://{}", root.path().join(name).display());
    let (issuer, tmk) = start_issuer(root.path(), &db("issuer.db")).await;
    let lossy = LossyLink::start(issuer.iso.clone()).await;

    // the primary endpoint is dead: the link must come up on the backup
    let dead = format!("127.0.0.1:{}", free_port());
    let upstream = upstream_config(&dead, &tmk).replace(
        &format!("endpoints = [\"{dead}\"]"),
        &format!("endpoints = [\"{dead}\", \"{}\"]", lossy.addr),
    );
    let extra = format!("{ACQUIRER_ROUTING}{upstream}{FAST_SAF}");
    let mut acquirer = Node::new(root.path(), "acquirer", &db("acquirer.db"), &extra);
    acquirer.start().await;
    seed_stand_in(&acquirer, 500_000).await;
    wait_link_up(&acquirer).await;
    let mut atm = atm(&acquirer, "ATM00001").await;
    assert_eq!(withdraw(&mut atm, 10_000).await, "00");
    assert_eq!(issuer.balance("ISS-1").await, ISSUER_START - 10_000);

    // the issuer books the withdrawal but its answer is lost: a 0420 undoes the issuer's
    // debit, stand-in pays the cardholder and books it again with a 0220
    lossy.lose_answers.store(true, Ordering::SeqCst);
    assert_eq!(withdraw(&mut atm, 3_000).await, "00");
    lossy.lose_answers.store(false, Ordering::SeqCst);
    // the request itself is lost: the 0420 finds nothing to reverse, the 0220 books it
    lossy.lose_requests.store(true, Ordering::SeqCst);
    assert_eq!(withdraw(&mut atm, 2_000).await, "00");
    lossy.lose_requests.store(false, Ordering::SeqCst);
    assert_eq!(acquirer.metric("switchyard_standin_total").await, Some(2.0));

    let stats = eventually("the advices to be delivered", 60, || async {
        let stats = acquirer.saf_stats().await;
        (backlog(&stats) == 0 && stats["deliveredTotal"] == 4).then_some(stats)
    })
    .await;
    assert_eq!(stats["deadLetters"], 0, "{stats}");
    // every withdrawal the cardholder got cash for is booked once at the issuer, no more
    assert_eq!(
        issuer.balance("ISS-1").await,
        ISSUER_START - 10_000 - 3_000 - 2_000
    );
    assert_eq!(acquirer.balance("STIP-B").await, 500_000 - 5_000);
    // two lost answers are below the breaker's minimum volume: still closed
    assert_eq!(acquirer.metric(CIRCUIT).await, Some(0.0));
}

/// `GET /v1/maintenance` of `node`.
async fn maintenance(node: &Node) -> Value {
    node.admin.get("/v1/maintenance").await.unwrap()
}

/// Hibernation (SAF-aware maintenance) on a real acquirer process: a withdrawal in flight when
/// it starts is answered, the ATM's session is closed, new connections are refused and
/// readiness is false; with the issuer down the drain times out and says what is left; once the
/// issuer is back the in-process drainer delivers the backlog and the pod is drained; resuming
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hibernation_finishes_in_flight_work_and_waits_for_the_saf_backlog() {
    let root = tempfile::tempdir().unwrap();
    let db = |name: &str| format!("sqlite://{}", root.path().join(name).display());
    let (mut issuer, tmk) = start_issuer(root.path(), &db("issuer.db")).await;
    let lossy = LossyLink::start(issuer.iso.clone()).await;
    let extra = format!(
        "{ACQUIRER_ROUTING}{}{FAST_SAF}",
        upstream_config(&lossy.addr, &tmk)
    );
    let mut acquirer = Node::new(root.path(), "acquirer", &db("acquirer.db"), &extra);
    acquirer.start().await;
    seed_stand_in(&acquirer, 500_000).await;
    wait_link_up(&acquirer).await;
    let mut atm = atm(&acquirer, "ATM00001").await;
    assert_eq!(withdraw(&mut atm, 10_000).await, "00");
    let serving = maintenance(&acquirer).await;
    assert_eq!(serving["state"], "serving", "{serving}");
    assert_eq!(serving["acceptingConnections"], true, "{serving}");

    // a withdrawal whose issuer answer is lost is in flight (the link times out after 2 s)
    lossy.lose_answers.store(true, Ordering::SeqCst);
    let in_flight = tokio::spawn(async move {
        let code = withdraw(&mut atm, 3_000).await;
        (atm, code)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = acquirer
        .admin
        .post(
            "/v1/maintenance/hibernate",
            &json!({"drainTimeoutSeconds": 4}),
        )
        .await
        .unwrap();
    assert_eq!(started["state"], "draining", "{started}");
    // the issuer goes away: the advices of the unanswered withdrawal cannot be delivered
    issuer.kill();
    lossy.lose_answers.store(false, Ordering::SeqCst);

    let (mut atm, code) = in_flight.await.unwrap();
    assert_eq!(
        code, "00",
        "the in-flight withdrawal is answered (stood in)"
    );
    // then its connection is closed: the next request gets no answer
    assert!(
        atm.network("301").await.is_err(),
        "the ATM's session must be closed"
    );
    let ready = format!("{}/readyz", acquirer.metrics);
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 503);
    eventually("new ISO 8583 connections to be refused", 10, || async {
        tokio::net::TcpStream::connect(&acquirer.iso)
            .await
            .is_err()
            .then_some(())
    })
    .await;

    let timed_out = eventually("the drain to time out", 20, || async {
        let m = maintenance(&acquirer).await;
        (m["state"] == "timedOut").then_some(m)
    })
    .await;
    assert_eq!(timed_out["acceptingConnections"], false, "{timed_out}");
    assert_eq!(timed_out["inFlight"], 0, "{timed_out}");
    assert_eq!(timed_out["signedOn"], 0, "{timed_out}");
    assert!(
        timed_out["safBacklog"].as_u64().unwrap() >= 1,
        "{timed_out}"
    );
    assert!(
        timed_out["message"]
            .as_str()
            .unwrap()
            .contains("SAF advice"),
        "{timed_out}"
    );
    // a repeat changes nothing: the first deadline stands
    let again = acquirer
        .admin
        .post(
            "/v1/maintenance/hibernate",
            &json!({"drainTimeoutSeconds": 600}),
        )
        .await
        .unwrap();
    assert_eq!(again["drainDeadline"], timed_out["drainDeadline"]);
    assert_eq!(again["state"], "timedOut", "{again}");

    // the issuer is back: the drainer (still running) delivers, and the pod is drained
    issuer.start().await;
    let drained = eventually("the pod to be drained", 60, || async {
        let m = maintenance(&acquirer).await;
        (m["state"] == "drained").then_some(m)
    })
    .await;
    assert_eq!(drained["safBacklog"], 0, "{drained}");
    assert_eq!(backlog(&acquirer.saf_stats().await), 0);

    // resume: ready again, and a terminal signs on and transacts
    acquirer
        .admin
        .post("/v1/maintenance/resume", &json!({}))
        .await
        .unwrap();
    eventually("the pod to serve again", 20, || async {
        let m = maintenance(&acquirer).await;
        let ready = reqwest::get(&ready).await.ok()?.status().is_success();
        (m["state"] == "serving" && ready).then_some(())
    })
    .await;
    let mut atm = self::atm(&acquirer, "ATM00002").await;
    assert_eq!(withdraw(&mut atm, 1_000).await, "00");
    // requests and resumes are audited
    let audit = acquirer.admin.get("/v1/audit").await.unwrap().to_string();
    assert!(audit.contains("maintenance.hibernate"), "{audit}");
    assert!(audit.contains("maintenance.resume"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hibernation_request_out_of_range_is_refused_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", root.path().join("s.db").display());
    let mut node = Node::new(root.path(), "switch", &db, "");
    node.start().await;
    for body in [
        json!({"drainTimeoutSeconds": 0}),
        json!({"drainTimeoutSeconds": 86_401}),
        json!({"drainTimeoutSeconds": 5, "now": true}),
        json!({}),
    ] {
        let err = node
            .admin
            .post("/v1/maintenance/hibernate", &body)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("400"), "{body}: {err}");
    }
    let m = maintenance(&node).await;
    assert_eq!(m["state"], "serving", "{m}");
    let ready = reqwest::get(format!("{}/readyz", node.metrics))
        .await
        .unwrap();
    assert!(ready.status().is_success());
}

/// PostgreSQL mode: the switch runs no drainer of its own, so a hibernating switch with a SAF
/// backlog times out until a `drain` process (another pod in Kubernetes) delivers it; then the
/// switch reports drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hibernation_on_postgres_is_drained_by_the_drainer_processes() {
    let Some(acq_db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let issuer_db = format!("sqlite://{}", root.path().join("issuer.db").display());
    let (mut issuer, tmk) = start_issuer(root.path(), &issuer_db).await;
    issuer.kill();
    let extra = format!(
        "{ACQUIRER_ROUTING}{}{FAST_SAF}",
        upstream_config(&issuer.iso, &tmk)
    );
    let mut acquirer = Node::new(root.path(), "acquirer", &acq_db.url, &extra);
    acquirer.start().await;
    seed_stand_in(&acquirer, 1_000_000).await;
    let mut atm = atm(&acquirer, "ATM00001").await;
    for _ in 0..3 {
        assert_eq!(withdraw(&mut atm, 1_000).await, "00", "stand-in");
    }
    assert_eq!(backlog(&acquirer.saf_stats().await), 3);

    let started = acquirer
        .admin
        .post(
            "/v1/maintenance/hibernate",
            &json!({"drainTimeoutSeconds": 2}),
        )
        .await
        .unwrap();
    assert_eq!(started["state"], "draining", "{started}");
    let timed_out = eventually("the drain to time out", 20, || async {
        let m = maintenance(&acquirer).await;
        (m["state"] == "timedOut").then_some(m)
    })
    .await;
    assert_eq!(timed_out["safBacklog"], 3, "{timed_out}");
    assert_eq!(timed_out["signedOn"], 0, "{timed_out}");

    // the issuer and a drainer process come: the backlog is delivered, the switch is drained
    issuer.start().await;
    let mut drainer = acquirer.spawn(
        &["drain"],
        &[(
            "SWITCHYARD_METRICS__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )],
        "drain.log",
    );
    let drained = eventually("the switch to be drained", 60, || async {
        let m = maintenance(&acquirer).await;
        (m["state"] == "drained").then_some(m)
    })
    .await;
    assert_eq!(drained["safBacklog"], 0, "{drained}");
    assert_eq!(issuer.balance("ISS-1").await, ISSUER_START - 3_000);
    let _ = drainer.kill();
    let _ = drainer.wait();
    drop(acquirer);
    drop(issuer);
    acq_db.cleanup().await;
}
