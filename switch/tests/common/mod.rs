//! Shared test harness: a real switch in-process on port 0, on SQLite or on PostgreSQL (a fresh
//! schema per test, from `SWITCHYARD_TEST_DATABASE_URL`; without it PostgreSQL tests skip,
//! except with `CI=true` where they fail).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use switchyard_switch::app::{self, Listeners, RunningSwitch, Secrets};
use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::atm::{AtmClient, CardInput};
use switchyard_switch::domain::TerminalId;
use switchyard_switch::iso8583::Packager;
use switchyard_switch::settings::Settings;
use switchyard_switch::store::{self, ConnectOptions, Store};

pub const PG_ENV: &str = "SWITCHYARD_TEST_DATABASE_URL";

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test; dropping the guard's schema happens in `cleanup`.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(sqlx::PgPool, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("switch.db").display());
                Some(TestDb {
                    url,
                    _dir: Some(dir),
                    pg_admin: None,
                })
            }
            Backend::Postgres => {
                let base = match std::env::var(PG_ENV) {
                    Ok(url) if !url.is_empty() => url,
                    _ => {
                        if std::env::var("CI").as_deref() == Ok("true") {
                            panic!("{PG_ENV} must be set when CI=true");
                        }
                        eprintln!("skipping PostgreSQL test: {PG_ENV} is not set");
                        return None;
                    }
                };
                let admin = sqlx::PgPool::connect(&base)
                    .await
                    .expect("connect to the test PostgreSQL");
                let schema = format!("it_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&admin)
                    .await
                    .expect("create test schema");
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                Some(TestDb {
                    url,
                    _dir: None,
                    pg_admin: Some((admin, schema)),
                })
            }
        }
    }

    pub async fn store(&self) -> Store {
        let store = store::connect(
            &self.url,
            &ConnectOptions {
                max_connections: 16,
                acquire_timeout: Duration::from_secs(30),
            },
        )
        .await
        .expect("open store");
        store.migrate().await.expect("migrate");
        store
    }

    pub async fn cleanup(self) {
        if let Some((admin, schema)) = self.pg_admin {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// A switch running in this process.
pub struct TestSwitch {
    pub running: RunningSwitch,
    pub admin: AdminClient,
    pub viewer: AdminClient,
    pub kek: Vec<u8>,
    pub dir: tempfile::TempDir,
    pub db: TestDb,
    pub packager: &'static Packager,
}

fn hex_key(len: usize) -> (Vec<u8>, String) {
    let key: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    let text = hex::encode(&key);
    (key, text)
}

impl TestSwitch {
    pub async fn start(backend: Backend) -> Option<TestSwitch> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        tweak: impl FnOnce(&mut Settings),
    ) -> Option<TestSwitch> {
        let db = TestDb::new(backend).await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| -> PathBuf { dir.path().join(name) };
        let (_, lmk) = hex_key(32);
        let (kek, kek_hex) = hex_key(32);
        std::fs::write(path("lmk.hex"), lmk).unwrap();
        std::fs::write(path("kek.hex"), kek_hex).unwrap();
        let admin_token = format!("adm{}", hex_key(16).1);
        let viewer_token = format!("vwr{}", hex_key(16).1);
        std::fs::write(
            path("tokens"),
            format!("admin:{admin_token}\nviewer:{viewer_token}\n"),
        )
        .unwrap();
        let mut settings = Settings::default();
        let local = "127.0.0.1:0".parse().unwrap();
        settings.iso8583.listen = local;
        settings.admin.listen = local;
        settings.metrics.listen = local;
        settings.admin.tokens_file = path("tokens");
        settings.keys.lmk_file = Some(path("lmk.hex"));
        settings.keys.kek_file = Some(path("kek.hex"));
        settings.database.url = Some(db.url.clone());
        settings.routing.on_us = vec!["6011".into()];
        tweak(&mut settings);
        let packager = Packager::by_name(&settings.iso8583.packager).unwrap();
        let store = db.store().await;
        let secrets = Secrets::load(&settings).expect("secrets");
        let listeners = Listeners::bind(&settings).await.expect("bind");
        let running = app::start(settings, secrets, store, listeners)
            .await
            .expect("start switch");
        let base = format!("http://{}", running.admin_addr);
        Some(TestSwitch {
            admin: AdminClient::new(base.clone(), admin_token),
            viewer: AdminClient::new(base, viewer_token),
            running,
            kek,
            dir,
            db,
            packager,
        })
    }

    pub fn iso(&self) -> String {
        self.running.iso_addr.to_string()
    }

    /// Registers a terminal (fresh TMK) and connects an ATM for it, not yet signed on.
    pub async fn atm(&self, id: &str) -> AtmClient {
        let tid = TerminalId::new(id).unwrap();
        let keys = self
            .admin
            .register_terminal(&self.kek, &tid, "it")
            .await
            .expect("register terminal");
        AtmClient::connect(&self.iso(), tid, keys, self.packager)
            .await
            .expect("connect")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.running.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.running.stop().await;
        self.db.cleanup().await;
    }
}

/// The simulator's view of a card issued with PIN `1234`, expiry `2812`, currency 360.
pub fn card(pan: &str) -> CardInput {
    CardInput {
        pan: pan.into(),
        expiry: "2812".into(),
        pin: "1234".into(),
        currency: "360".into(),
    }
}

/// An account's ledger balance, through the admin API.
pub async fn balance(sw: &TestSwitch, account: &str) -> i64 {
    sw.viewer
        .get(&format!("/v1/accounts/{account}"))
        .await
        .unwrap()["balance"]
        .as_i64()
        .unwrap()
}

/// Value of a sample line `name{labels} value` in a Prometheus text exposition.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A free TCP port on the loopback (bound, then released for the process under test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `bytes` random bytes as lowercase hex: throwaway LMKs, KEKs and tokens.
pub fn random_hex(bytes: usize) -> String {
    hex::encode(
        (0..bytes)
            .map(|_| rand::random::<u8>())
            .collect::<Vec<u8>>(),
    )
}

/// Runs `$body(backend)` as one test per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                $body(common::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                $body(common::Backend::Postgres).await;
            }
        }
    };
}
