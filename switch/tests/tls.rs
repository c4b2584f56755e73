//! Transport security over real loopback TLS (SPEC §2): the admin API over HTTPS with and
//! without client certificates, an ATM session over TLS, certificate rotation while connected,
//! a stalled handshake that blocks nobody, and an upstream link over mutual TLS between two
//! `switchyard-switch` processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::atm::session::{self, SessionOptions};
use switchyard_switch::atm::{AtmClient, CardInput};
use switchyard_switch::domain::{KeyType, TerminalId};
use switchyard_switch::iso8583::Packager;
use switchyard_switch::settings::ServerTlsSettings;
use switchyard_switch::tls::TlsClient;
use switchyard_switch::tls::dev::{DevCa, write_file};

use common::{Backend, TestSwitch, card, free_port, random_hex, sample};

/// A CA and the certificates a test needs, written into one directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `ca`'s certificate as `<name>.crt`.
    fn ca(&self, name: &str, ca: &DevCa) -> PathBuf {
        let p = self.path(&format!("{name}.crt"));
        write_file(&p, &ca.cert_pem(), false).unwrap();
        p
    }

    /// A server certificate for loopback from `ca`, written atomically (rename, as the kubelet
    /// swaps a Secret volume) as `<name>.crt` / `<name>.key`.
    fn server(&self, name: &str, ca: &DevCa) -> (PathBuf, PathBuf) {
        let cert = ca
            .server_cert(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        self.put(name, &cert.cert_pem, &cert.key_pem)
    }

    fn client(&self, name: &str, ca: &DevCa, cn: &str) -> (PathBuf, PathBuf) {
        let cert = ca.client_cert(cn).unwrap();
        self.put(name, &cert.cert_pem, &cert.key_pem)
    }

    fn put(&self, name: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        let tmp = self.path(".tmp");
        write_file(&tmp, cert, false).unwrap();
        std::fs::rename(&tmp, &c).unwrap();
        write_file(&tmp, key, true).unwrap();
        std::fs::rename(&tmp, &k).unwrap();
        (c, k)
    }
}

fn server_tls(
    (cert_file, key_file): (PathBuf, PathBuf),
    client_ca_file: Option<PathBuf>,
) -> ServerTlsSettings {
    ServerTlsSettings {
        cert_file,
        key_file,
        client_ca_file,
        handshake_timeout: Duration::from_millis(500),
    }
}

fn admin_token(sw: &TestSwitch) -> String {
    std::fs::read_to_string(sw.dir.path().join("tokens"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("admin:").map(str::to_string))
        .unwrap()
}

fn https_client(tls: &TlsClient) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls.config()).clone())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn metric(sw: &TestSwitch, name: &str) -> f64 {
    sample(&sw.metrics().await, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https_requires_a_client_certificate_from_its_ca() {
    let pki = Pki::new();
    let ca = DevCa::new("test CA").unwrap();
    let rogue_ca = DevCa::new("rogue CA").unwrap();
    let ca_file = pki.ca("ca", &ca);
    let server = pki.server("server", &ca);
    let client = pki.client("client", &ca, "operator");
    let rogue = pki.client("rogue", &rogue_ca, "operator");
    let client_ca = ca_file.clone();
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.tls = Some(server_tls(server, Some(client_ca)))
    })
    .await
    .unwrap();
    let url = format!(
        "https://127.0.0.1:{}/v1/saf/stats",
        sw.running.admin_addr.port()
    );
    let token = admin_token(&sw);

    // a stalled handshake (a TCP connection that never says hello) blocks nobody
    let stalled = tokio::net::TcpStream::connect(sw.running.admin_addr)
        .await
        .unwrap();

    let good = TlsClient::new(
        &ca_file,
        Some((client.0.as_path(), client.1.as_path())),
        None,
    )
    .unwrap();
    let resp = https_client(&good)
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("HTTPS with a client certificate from the client CA");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
    assert!(
        header("strict-transport-security").is_some_and(|v| v.starts_with("max-age=")),
        "HSTS when TLS is on"
    );

    // no client certificate, or one from another CA: refused in the handshake
    let anonymous = TlsClient::new(&ca_file, None, None).unwrap();
    let err = https_client(&anonymous)
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("no client certificate must be refused");
    assert!(!err.is_status(), "refused before any HTTP answer: {err:?}");
    let wrong =
        TlsClient::new(&ca_file, Some((rogue.0.as_path(), rogue.1.as_path())), None).unwrap();
    https_client(&wrong)
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("a client certificate from another CA must be refused");
    // plain HTTP gets no answer from an HTTPS-only port
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v1/saf/stats",
            sw.running.admin_addr.port()
        ))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP to the HTTPS port: {plain:?}");

    // the stalled connection is closed at its deadline and counted
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(stalled);
    let failures = |reason: &'static str| {
        format!("switchyard_tls_handshake_failures_total{{channel=\"admin\",reason=\"{reason}\"}}")
    };
    assert!(metric(&sw, &failures("certificate")).await >= 2.0);
    assert!(metric(&sw, &failures("timeout")).await >= 1.0);
    // and the server still serves
    let resp = https_client(&good)
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https_without_client_ca_serves_any_client() {
    let pki = Pki::new();
    let ca = DevCa::new("test CA").unwrap();
    let ca_file = pki.ca("ca", &ca);
    let server = pki.server("server", &ca);
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.tls = Some(server_tls(server, None))
    })
    .await
    .unwrap();
    let tls = TlsClient::new(&ca_file, None, None).unwrap();
    let admin = AdminClient::with_tls(
        format!("https://localhost:{}", sw.running.admin_addr.port()),
        admin_token(&sw),
        &tls,
    )
    .unwrap();
    let stats = admin
        .get("/v1/saf/stats")
        .await
        .expect("HTTPS, server auth only");
    assert!(stats["backlog"].is_u64());
    // a client that does not trust the CA refuses the server
    let other = Pki::new();
    let stranger = TlsClient::new(&other.ca("ca", &DevCa::new("x").unwrap()), None, None).unwrap();
    assert!(
        AdminClient::with_tls(
            format!("https://localhost:{}", sw.running.admin_addr.port()),
            admin_token(&sw),
            &stranger,
        )
        .unwrap()
        .get("/v1/saf/stats")
        .await
        .is_err()
    );
    sw.stop().await;
}

/// `switchyard-atm` against a plain ISO 8583 port with an HTTPS admin API: `--admin-ca` verifies
/// the admin API alone; `--tls-ca` would also put the ISO port under TLS, which it does not speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atm_tool_verifies_an_https_admin_api_with_its_own_ca() {
    let pki = Pki::new();
    let ca = DevCa::new("admin CA").unwrap();
    let ca_file = pki.ca("admin-ca", &ca);
    let server = pki.server("admin", &ca);
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.admin.tls = Some(server_tls(server, None))
    })
    .await
    .unwrap();
    let run = |ca_flag: &'static str, n: u32| {
        let dir = sw.dir.path().to_path_buf();
        let (iso, admin) = (sw.iso(), sw.running.admin_addr.port());
        let ca_file = ca_file.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_switchyard-atm"))
                .args([
                    "--iso",
                    &iso,
                    "--admin",
                    &format!("https://localhost:{admin}"),
                ])
                .arg("--token-file")
                .arg(dir.join("tokens"))
                .arg("--kek-file")
                .arg(dir.join("kek.hex"))
                .arg(ca_flag)
                .arg(&ca_file)
                .args(["session", "--terminal", &format!("ATM000{n}")])
                .args(["--pan", &format!("60110000000000{n}")])
                .args(["--account", &format!("ACC-{n}")])
                .output()
                .unwrap()
        })
    };
    let out = run("--admin-ca", 91).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.to_lowercase().contains("withdrawal"), "{stdout}");
    // the same CA given as --tls-ca: the admin API is reached as before (a new terminal is
    // provisioned), but the tool speaks TLS to the plain ISO port and fails there
    let out = run("--tls-ca", 92).await.unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atm_session_runs_over_mutual_tls_and_plain_tcp_gets_nothing() {
    let pki = Pki::new();
    let ca = DevCa::new("test CA").unwrap();
    let ca_file = pki.ca("ca", &ca);
    let server = pki.server("server", &ca);
    let atm_cert = pki.client("atm", &ca, "ATM00001");
    let client_ca = ca_file.clone();
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.iso8583.tls = Some(server_tls(server, Some(client_ca)))
    })
    .await
    .unwrap();
    let tls = TlsClient::new(
        &ca_file,
        Some((atm_cert.0.as_path(), atm_cert.1.as_path())),
        Some("localhost".into()),
    )
    .unwrap();
    let mut lines = Vec::new();
    session::run(
        SessionOptions {
            iso_addr: sw.iso(),
            admin: sw.admin.clone(),
            kek: sw.kek.clone(),
            terminal: TerminalId::new("ATM00001").unwrap(),
            card: card("6011000000000004"),
            account: "ACC-1".into(),
            provision_card: true,
            packager: sw.packager,
            tls: Some(tls),
        },
        |l| lines.push(l),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));

    // a terminal speaking plain ISO 8583 to the TLS port never gets an answer
    let mut plain = sw.atm("ATM00002").await;
    assert!(plain.network("001").await.is_err());
    sw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_reaches_new_connections_and_open_ones_keep_working() {
    let pki = Pki::new();
    let old_ca = DevCa::new("old CA").unwrap();
    let new_ca = DevCa::new("new CA").unwrap();
    let old_ca_file = pki.ca("old-ca", &old_ca);
    let new_ca_file = pki.ca("new-ca", &new_ca);
    let server = pki.server("server", &old_ca);
    let sw = TestSwitch::start_with(Backend::Sqlite, |s| {
        s.iso8583.tls = Some(server_tls(server, None))
    })
    .await
    .unwrap();
    let trusts_old = TlsClient::new(&old_ca_file, None, Some("localhost".into())).unwrap();
    let trusts_new = TlsClient::new(&new_ca_file, None, Some("localhost".into())).unwrap();
    let connect = |id: &'static str, tls: TlsClient| {
        let (admin, kek, iso, packager) = (sw.admin.clone(), sw.kek.clone(), sw.iso(), sw.packager);
        async move {
            let tid = TerminalId::new(id).unwrap();
            let keys = admin.register_terminal(&kek, &tid, "it").await.unwrap();
            AtmClient::connect_with(&iso, Some(&tls), tid, keys, packager).await
        }
    };
    let mut open = connect("ATM00011", trusts_old.clone()).await.unwrap();
    assert_eq!(open.network("001").await.unwrap().get_str(39), Some("00"));

    // cert-manager renews: the Secret volume's files are swapped
    pki.server("server", &new_ca);
    assert!(
        connect("ATM00012", trusts_old.clone()).await.is_err(),
        "a new connection must get the renewed certificate"
    );
    let mut renewed = connect("ATM00013", trusts_new.clone()).await.unwrap();
    assert_eq!(
        renewed.network("001").await.unwrap().get_str(39),
        Some("00")
    );
    // the connection opened before the renewal keeps working
    assert_eq!(open.network("301").await.unwrap().get_str(39), Some("00"));
    assert_eq!(
        metric(
            &sw,
            "switchyard_tls_reloads_total{channel=\"iso8583\",result=\"ok\"}"
        )
        .await,
        1.0
    );

    // a renewal caught half-written keeps the previous certificate in use
    write_file(&pki.path("server.key"), "not a key", true).unwrap();
    let mut still = connect("ATM00014", trusts_new).await.unwrap();
    assert_eq!(still.network("001").await.unwrap().get_str(39), Some("00"));
    assert_eq!(
        metric(
            &sw,
            "switchyard_tls_reloads_total{channel=\"iso8583\",result=\"failed\"}"
        )
        .await,
        1.0
    );
    sw.stop().await;
}

// --- an upstream link over mutual TLS between two processes -------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-switch");

/// One `switchyard-switch serve` process on SQLite with plain admin and metrics ports.
struct Process {
    iso: String,
    metrics: String,
    admin: AdminClient,
    kek: Vec<u8>,
    dir: PathBuf,
    child: Child,
}

impl Process {
    async fn start(root: &Path, name: &str, extra: &str) -> Process {
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
                 [database]\nurl = \"sqlite://{d}/switch.db\"\n\
                 [keys]\nlmk_file = \"{d}/lmk.hex\"\nkek_file = \"{d}/kek.hex\"\n{extra}",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "text", "serve", "--migrate"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Process {
            iso: format!("127.0.0.1:{iso}"),
            metrics: format!("http://127.0.0.1:{metrics}"),
            admin: AdminClient::new(format!("http://127.0.0.1:{admin}"), token),
            kek: hex::decode(kek_hex).unwrap(),
            dir,
            child,
        };
        let ready = format!("{}/readyz", p.metrics);
        p.eventually("ready", || async {
            matches!(reqwest::get(&ready).await, Ok(r) if r.status().is_success()).then_some(())
        })
        .await;
        p
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

    async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<()>>,
    {
        let deadline = Instant::now() + Duration::from_secs(40);
        while check().await.is_none() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_link_over_mutual_tls_between_two_switches() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let ca = DevCa::new("interbank CA").unwrap();
    let ca_file = pki.ca("ca", &ca);
    let (issuer_cert, issuer_key) = pki.server("issuer", &ca);
    let (acq_cert, acq_key) = pki.client("acquirer", &ca, "ACQ001");

    // the issuer: BIN 4111 on-us, ISO 8583 port TLS only with client certificates required
    let issuer = Process::start(
        root.path(),
        "issuer",
        &format!(
            "[routing]\non_us = [\"4111\"]\n\
             [iso8583.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            issuer_cert.display(),
            issuer_key.display(),
            ca_file.display()
        ),
    )
    .await;
    issuer
        .admin
        .create_account("ISS-1", "360", 1_000_000, 100_000_000)
        .await
        .unwrap();
    issuer
        .admin
        .create_card("4111111111111111", "2812", "ISS-1", "1234")
        .await
        .unwrap();
    let tmk = issuer
        .admin
        .provision_station(&issuer.kek, &TerminalId::new("ACQ001").unwrap())
        .await
        .unwrap();
    let tmk_file = root.path().join("station.tmk");
    std::fs::write(&tmk_file, tmk.as_bytes()).unwrap();

    // the acquirer routes 4111 to the issuer over mTLS
    let acquirer = Process::start(
        root.path(),
        "acquirer",
        &format!(
            "[routing]\non_us = [\"6011\"]\n\
             [[routing.routes]]\nprefix = \"4111\"\nupstream = \"issuer-b\"\n\
             [[upstreams]]\nname = \"issuer-b\"\nendpoints = [\"{}\"]\nstation_id = \"ACQ001\"\n\
             tmk_file = \"{}\"\nheartbeat_interval = \"1s\"\ntimeout = \"2s\"\n\
             tls = {{ ca_file = \"{}\", cert_file = \"{}\", key_file = \"{}\", server_name = \"localhost\" }}\n",
            issuer.iso,
            tmk_file.display(),
            ca_file.display(),
            acq_cert.display(),
            acq_key.display()
        ),
    )
    .await;
    let up = "switchyard_upstream_up{upstream=\"issuer-b\"}";
    acquirer
        .eventually("the link over mTLS to be up", || async {
            (acquirer.metric(up).await == Some(1.0)).then_some(())
        })
        .await;

    // an ATM on the acquirer withdraws with the issuer's card: approved by the issuer
    let tid = TerminalId::new("ATM00021").unwrap();
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
    let issuer_card = CardInput {
        pan: "4111111111111111".into(),
        expiry: "2812".into(),
        pin: "1234".into(),
        currency: "360".into(),
    };
    let (_, answer) = atm.withdraw(&issuer_card, 5_000).await.unwrap();
    assert_eq!(
        answer.get_str(39),
        Some("00"),
        "routed over mTLS and approved"
    );
    let balance = issuer.admin.get("/v1/accounts/ISS-1").await.unwrap()["balance"]
        .as_i64()
        .unwrap();
    assert_eq!(balance, 995_000, "the issuer booked it");

    // a station without a client certificate is refused by the issuer in the handshake
    let anonymous = TlsClient::new(&ca_file, None, Some("localhost".into())).unwrap();
    let tid = TerminalId::new("ATM00099").unwrap();
    let keys = issuer
        .admin
        .register_terminal(&issuer.kek, &tid, "it")
        .await
        .unwrap();
    match AtmClient::connect_with(&issuer.iso, Some(&anonymous), tid, keys, Packager::ascii()).await
    {
        Err(_) => {}
        Ok(mut c) => assert!(c.network("001").await.is_err()),
    }
    issuer
        .eventually("the refused handshake to be counted", || async {
            let n = issuer
                .metric(
                    "switchyard_tls_handshake_failures_total{channel=\"iso8583\",reason=\"certificate\"}",
                )
                .await;
            (n >= Some(1.0)).then_some(())
        })
        .await;
}
