//! Configuration: one TOML or YAML file, every key overridable by `SWITCHYARD_<SECTION>__<KEY>`.
//!
//! Precedence, lowest first: built-in defaults, the `--config` file, `DATABASE_URL` (as sqlx tools
//! expect), then `SWITCHYARD_*` variables. Secrets are never values in this file: they are read
//! from files (`*_file` keys) so Kubernetes Secrets can be mounted, and they never appear in
//! `Debug` output or error messages.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml, Yaml};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Failures while loading configuration or the secrets it points at.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file or an environment variable did not parse into the expected shape.
    #[error("failed to load configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A `*_file` secret could not be read.
    #[error("failed to read {what} from {path}: {source}")]
    SecretFile {
        /// Which secret, e.g. "database URL".
        what: &'static str,
        /// The file that was named in the configuration.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A value is present but unusable.
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// The whole switch configuration (SPEC §2 and §6).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The ATM and station channel.
    pub iso8583: IsoSettings,
    /// The authenticated admin REST API.
    pub admin: AdminSettings,
    /// Metrics and probes (unauthenticated).
    pub metrics: MetricsSettings,
    /// Where the ledger, keys and queues live.
    pub database: DatabaseSettings,
    /// Master keys and the key grace window.
    pub keys: KeySettings,
    /// BIN routing table.
    pub routing: RoutingSettings,
    /// Issuer hosts reached over ISO 8583 links.
    pub upstreams: Vec<UpstreamSettings>,
    /// Store-and-forward delivery.
    pub saf: SafSettings,
    /// What this switch, as an issuer, accepts from acquirer stations.
    pub stations: StationSettings,
    /// The fleet-wide session registry shared by the switch replicas.
    pub registry: RegistrySettings,
    /// Scheduled online backups of the embedded SQLite store.
    pub backup: BackupSettings,
    /// Trace export (SPEC §8 "Traces and logs").
    pub telemetry: TelemetrySettings,
}

/// `[telemetry]`: where spans go and how many. Unset keys fall back to the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_TRACES_SAMPLER_ARG` variables (see
/// [`TelemetrySettings::resolve`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Base URL of an OTLP/HTTP receiver (`http://collector:4318`; spans go to
    /// `<base>/v1/traces`). Unset (and no `OTEL_EXPORTER_OTLP_ENDPOINT`): nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded and exported, 0.0–1.0 (default 1.0). A request that arrives
    /// with a sampled W3C parent (field 48 `TP`) follows its parent's decision.
    pub sample_ratio: Option<f64>,
    /// Spans waiting for export at most; past it spans are dropped and counted in
    /// `switchyard_trace_spans_dropped_total{reason="queue_full"}`.
    pub max_queue_size: usize,
}

/// The export a process runs, after the configuration and the `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// Base URL of the OTLP/HTTP receiver, without `/v1/traces`.
    pub endpoint: String,
    /// 0.0–1.0.
    pub sample_ratio: f64,
    /// Bounded queue of finished spans.
    pub max_queue_size: usize,
}

impl TelemetrySettings {
    /// Default bound of the span queue.
    pub const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;

    /// What to export, given the process environment `env` (the standard `OTEL_*` variables
    /// fill keys left unset here): `None` when no endpoint is configured anywhere.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceExport>, SettingsError> {
        let endpoint = self
            .otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty());
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(SettingsError::Value(format!(
                "telemetry.otlp_endpoint must be an http:// or https:// URL, got {endpoint:?}"
            )));
        }
        let ratio = match self.sample_ratio {
            Some(r) => r,
            None => match env("OTEL_TRACES_SAMPLER_ARG") {
                Some(arg) => arg.trim().parse::<f64>().map_err(|_| {
                    SettingsError::Value(format!(
                        "OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1, got {arg:?}"
                    ))
                })?,
                None => 1.0,
            },
        };
        if !(0.0..=1.0).contains(&ratio) {
            return Err(SettingsError::Value(format!(
                "telemetry.sample_ratio must be between 0 and 1, got {ratio}"
            )));
        }
        let max_queue_size = if self.max_queue_size == 0 {
            Self::DEFAULT_MAX_QUEUE_SIZE
        } else {
            self.max_queue_size
        };
        Ok(Some(TraceExport {
            endpoint,
            sample_ratio: ratio,
            max_queue_size,
        }))
    }
}

/// `[backup]`: scheduled online backups of the embedded SQLite database, taken by the running
/// switch (`switchyard-switch backup` takes one by hand). Off while `schedule` is unset; a
/// PostgreSQL store refuses it (its backups come from the database: pg_dump, CloudNativePG).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupSettings {
    /// Five-field cron expression in UTC (minute hour day-of-month month day-of-week), e.g.
    /// `0 * * * *` for hourly. Unset: no scheduled backups.
    pub schedule: Option<String>,
    /// Directory the backups are written to (`switchyard-<UTC timestamp>.db`); created if
    /// missing. Put it on another volume than the database.
    pub dir: PathBuf,
    /// How many backups to keep: after each successful backup the oldest beyond this are
    /// deleted.
    pub retain: u32,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            schedule: None,
            dir: PathBuf::from("backups"),
            retain: 7,
        }
    }
}

/// `[registry]`: how this replica takes part in the fleet-wide session registry (issue 16).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// This replica's id in the registry. Default: the `POD_NAME` environment variable (the
    /// Downward API), else `HOSTNAME` inside Kubernetes (the pod name), else the host name plus
    /// a random suffix. Must be unique among the replicas sharing a store.
    pub replica_id: Option<String>,
    /// How often the replica renews its lease, records its sessions' traffic and checks the
    /// registry (the safety net for a missed notification).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a replica's sessions stay in the registry after its last renewal; after that
    /// any replica removes them. At least two heartbeat intervals.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            replica_id: None,
            heartbeat_interval: Duration::from_secs(2),
            lease: Duration::from_secs(10),
        }
    }
}

/// `[iso8583]`: the TCP channel terminals and stations connect to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IsoSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Wire profile: `ascii` or `binary-bitmap`.
    pub packager: String,
    /// Sessions with no traffic for this long are closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections beyond this are refused at accept.
    pub max_connections: usize,
    /// Connections from one IP address beyond this are closed at accept (SPEC §3, connection
    /// hygiene), so one address cannot take every connection slot.
    pub max_connections_per_ip: usize,
    /// A connection that has not signed on by then is closed.
    #[serde(with = "humantime_serde")]
    pub signon_timeout: Duration,
    /// Frames received before a successful sign-on (answered `58`, or refused network
    /// management) after which the connection is closed.
    pub max_unauthenticated_frames: u32,
    /// Frames whose length header claims more than this are refused and the connection closed.
    pub max_frame_bytes: usize,
    /// How long a shutdown waits for in-flight transactions before closing connections anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `[iso8583.tls]`: when set, the listener speaks TLS only (SPEC §2).
    pub tls: Option<ServerTlsSettings>,
}

impl Default for IsoSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8583)),
            packager: "ascii".into(),
            idle_timeout: Duration::from_secs(90),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            signon_timeout: Duration::from_secs(10),
            max_unauthenticated_frames: 8,
            max_frame_bytes: 8192,
            shutdown_timeout: Duration::from_secs(20),
            tls: None,
        }
    }
}

/// `[admin]`: the REST API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// File of `role:token` lines (roles `admin`, `viewer`).
    pub tokens_file: PathBuf,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Requests per second each client address, and each token, may make (a steady rate;
    /// `rate_limit_burst` more may come at once). Beyond it: `429` with `Retry-After`.
    pub rate_limit_per_second: u32,
    /// Requests a client address or token may make at once before the steady rate applies.
    pub rate_limit_burst: u32,
    /// Failed authentications (`401`) a client address may make per minute (as a burst, then
    /// one per `60 / n` seconds); beyond it every request from that address gets `429` until
    /// the budget refills, which stops token guessing.
    pub auth_failures_per_minute: u32,
    /// A connection that has not sent a request's complete headers within this long is closed
    /// (also an idle keep-alive connection). Slow clients cannot hold the server.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a request may take, reading its body included; then `503`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections beyond this are closed at accept.
    pub max_connections: usize,
    /// How long an `Idempotency-Key` is remembered: older records are deleted (checked every
    /// hour), and a retry after that runs as a new request. Between one hour and 366 days.
    #[serde(with = "humantime_serde")]
    pub idempotency_retention: Duration,
    /// `[admin.tls]`: when set, the admin API is HTTPS only (SPEC §2).
    pub tls: Option<ServerTlsSettings>,
}

/// `[admin.tls]` and `[iso8583.tls]`: a listener's certificate and, for mutual TLS, the CA its
/// clients' certificates must chain to. The files are PEM and re-read when they change, so a
/// cert-manager renewal needs no restart: new connections get the new certificate, open ones
/// keep the one they started with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// The certificate chain, leaf first (cert-manager's `tls.crt`).
    pub cert_file: PathBuf,
    /// The leaf's private key, PKCS#8, PKCS#1 or SEC1 (cert-manager's `tls.key`).
    pub key_file: PathBuf,
    /// CA certificates clients must present a certificate from; when set, a client without
    /// one (or with one from another CA) is refused during the handshake.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A connection that has not completed its handshake within this long is closed.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

/// `[[upstreams]] tls`: this switch's client side of a link to an issuer that requires TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// CA certificates the issuer's certificate must chain to (PEM).
    pub ca_file: PathBuf,
    /// Our client certificate chain, for issuers that require mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name the issuer's certificate must carry; defaults to the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tokens_file: PathBuf::from("/etc/switchyard/tokens"),
            max_body_bytes: 1024 * 1024,
            rate_limit_per_second: 50,
            rate_limit_burst: 500,
            auth_failures_per_minute: 20,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 256,
            idempotency_retention: Duration::from_secs(24 * 3600),
            tls: None,
        }
    }
}

/// `[metrics]`: `/metrics` and the probes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How often the gauges read from the store (keys, SAF backlog) are recomputed in the
    /// background; a scrape serves the last values and never queries the database.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// As `admin.header_read_timeout`, for this listener.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// As `admin.request_timeout`, for this listener.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections beyond this are closed at accept.
    pub max_connections: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            refresh_interval: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// `[database]`: `url` or `url_file` (a Kubernetes Secret mount); `sqlite://` or `postgres://`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL. Prefer `url_file` when it carries a password.
    pub url: Option<String>,
    /// File holding the connection URL.
    pub url_file: Option<PathBuf>,
    /// Pool size.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before failing with `96`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

/// The default store: an embedded SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://switchyard.db";

impl DatabaseSettings {
    /// The URL to connect to: `url_file` wins over `url`, and the default is embedded SQLite.
    pub fn resolve_url(&self) -> Result<Zeroizing<String>, SettingsError> {
        if let Some(path) = &self.url_file {
            let text = read_secret_file("database URL", path)?;
            return Ok(Zeroizing::new(text.trim().to_string()));
        }
        Ok(Zeroizing::new(
            self.url
                .clone()
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string()),
        ))
    }
}

/// `[keys]`: the LMK (wraps every key at rest), the KEK (TMK import) and the grace window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeySettings {
    /// Hex file with the 32-byte local master key.
    pub lmk_file: Option<PathBuf>,
    /// Hex file with the 16- or 32-byte key-encryption key for TMK import.
    pub kek_file: Option<PathBuf>,
    /// How long a replaced key still verifies PIN blocks and MACs.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How long this process serves a terminal's usable keys from memory after reading them:
    /// the bound on how late it sees a key change another replica made (its own changes are
    /// seen at once). `0s` reads the store for every financial request.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            lmk_file: None,
            kek_file: None,
            grace: Duration::from_secs(300),
            cache_ttl: Duration::from_secs(1),
        }
    }
}

/// `[routing]`: which card prefixes are ours and where the others go.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSettings {
    /// BIN prefixes authorized against the local ledger.
    pub on_us: Vec<String>,
    /// Prefixes routed to named upstreams; the longest matching prefix wins.
    pub routes: Vec<RouteSettings>,
}

/// One `[[routing.routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// PAN prefix.
    pub prefix: String,
    /// Name of an `[[upstreams]]` entry.
    pub upstream: String,
}

/// One `[[upstreams]]` entry: an issuer host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Name used by routes and metrics.
    pub name: String,
    /// `host:port` endpoints, primary first.
    pub endpoints: Vec<String>,
    /// Our station id at the issuer (field 41).
    pub station_id: String,
    /// File with the TMK shared with the issuer (hex).
    pub tmk_file: Option<PathBuf>,
    /// Echo interval on an idle link.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Per-request timeout.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSettings,
    /// Stand-in processing while the issuer is unavailable.
    #[serde(default)]
    pub stand_in: StandInSettings,
    /// TLS for the link (the issuer's CA, our client certificate for mTLS, the server name).
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Send the W3C `traceparent` of each routed 0200 to this issuer in field 48 (tag `TP`), so
    /// its spans join this switch's trace. Off: nothing is added to the wire.
    #[serde(default)]
    pub propagate_trace: bool,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(30)
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[upstreams.circuit_breaker]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Failure ratio over the window that opens the circuit.
    pub failure_rate: f64,
    /// Requests in the window before the ratio is considered.
    pub min_volume: u32,
    /// Rolling window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the circuit stays open before probing.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Duration,
}

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            min_volume: 5,
            window: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(30),
        }
    }
}

/// `[upstreams.stand_in]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandInSettings {
    /// Whether the switch approves on the issuer's behalf while it is down.
    pub enabled: bool,
    /// Largest amount (minor units) approved in stand-in.
    pub max_amount: i64,
}

/// `[saf]`: store-and-forward delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafSettings {
    /// Attempts before an advice becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Retry delay cap.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long a drainer owns a message before another may take it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Advices a drainer leases and sends at once per upstream (1 to 1000).
    pub batch_size: u32,
    /// How long an idle drainer waits before looking for due advices again.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Run a drainer inside `serve`. Unset: yes with the embedded SQLite store (one process owns
    /// it), no with PostgreSQL (run `switchyard-switch drain` processes instead).
    pub in_process_drainer: Option<bool>,
    /// Most reversal advices (0420) held in memory while the store refuses them; at this many,
    /// routed withdrawals are refused `96` before reaching the issuer until the hold drains.
    pub held_reversals_max: usize,
}

/// Default of `[saf] poll_interval`: how long an idle drainer waits before looking again.
pub const DEFAULT_SAF_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Default of `[saf] held_reversals_max`.
pub const DEFAULT_HELD_REVERSALS_MAX: usize = 10_000;

impl Default for SafSettings {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            batch_size: 100,
            poll_interval: DEFAULT_SAF_POLL_INTERVAL,
            in_process_drainer: None,
            held_reversals_max: DEFAULT_HELD_REVERSALS_MAX,
        }
    }
}

/// `[stations]`: what this switch, as an issuer, force-posts from the 0220/0221 advices of the
/// acquirer stations registered here (SPEC §6). An advice above a ceiling is answered `61` and
/// nothing is booked; the acquirer dead-letters it, and once the two banks agreed (and the
/// ceiling was raised here), the acquirer's operator requeues it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StationSettings {
    /// Largest amount (minor units) of one advice, for stations without an override.
    pub advice_max_amount: i64,
    /// Largest total (minor units) of one station's advices booked in one UTC day, for stations
    /// without an override.
    pub advice_daily_max_amount: i64,
    /// Per-station ceilings, by station id (`[stations.overrides.ACQ001]`); a key left out
    /// takes the default above.
    pub overrides: BTreeMap<String, StationOverride>,
}

/// `[stations.overrides.<station id>]`: one station's ceilings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StationOverride {
    /// Largest amount of one advice from this station.
    pub advice_max_amount: Option<i64>,
    /// Largest total of this station's advices in one UTC day.
    pub advice_daily_max_amount: Option<i64>,
}

/// Largest ceiling: field 4 holds 12 digits, and two such values add up without overflow.
pub const MAX_ADVICE_CEILING: i64 = 999_999_999_999;

impl Default for StationSettings {
    fn default() -> Self {
        // what an issuer would agree with an acquirer by default: an advice is one ATM
        // withdrawal (stand-in limits sit well below this), and a day's stand-in for one
        // acquirer is bounded; larger partners get an override
        Self {
            advice_max_amount: 1_000_000,
            advice_daily_max_amount: 50_000_000,
            overrides: BTreeMap::new(),
        }
    }
}

impl StationSettings {
    /// The ceilings for `station` as (per advice, per UTC day): its override where set, else
    /// the defaults.
    pub fn ceiling_for(&self, station: &str) -> (i64, i64) {
        let o = self.overrides.get(station);
        (
            o.and_then(|o| o.advice_max_amount)
                .unwrap_or(self.advice_max_amount),
            o.and_then(|o| o.advice_daily_max_amount)
                .unwrap_or(self.advice_daily_max_amount),
        )
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let check = |what: String, v: i64| {
            if (1..=MAX_ADVICE_CEILING).contains(&v) {
                Ok(())
            } else {
                Err(SettingsError::Value(format!(
                    "{what} must be between 1 and {MAX_ADVICE_CEILING} (minor units), got {v}"
                )))
            }
        };
        check("stations.advice_max_amount".into(), self.advice_max_amount)?;
        check(
            "stations.advice_daily_max_amount".into(),
            self.advice_daily_max_amount,
        )?;
        for (station, o) in &self.overrides {
            if let Some(v) = o.advice_max_amount {
                check(format!("stations.overrides.{station}.advice_max_amount"), v)?;
            }
            if let Some(v) = o.advice_daily_max_amount {
                check(
                    format!("stations.overrides.{station}.advice_daily_max_amount"),
                    v,
                )?;
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Loads defaults, then `file` (TOML or YAML by extension), then `DATABASE_URL`, then
    /// `SWITCHYARD_<SECTION>__<KEY>` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with an explicit environment, so tests need not mutate the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError::Value(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            figment = match path.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") => figment.merge(Yaml::file(path)),
                _ => figment.merge(Toml::file(path)),
            };
        }
        let env: BTreeMap<String, String> = env.into_iter().collect();
        if let Some(url) = env.get("DATABASE_URL") {
            figment = figment.merge(Serialized::default("database.url", url));
        }
        // figment's `Env` provider reads the process environment; translating the variables
        // ourselves keeps tests hermetic and lets `DATABASE_URL` sit between file and overrides.
        for (key, value) in &env {
            // Only `SWITCHYARD_<SECTION>__<KEY>` is configuration; other SWITCHYARD_ variables
            // (SWITCHYARD_CONFIG for --config, test harness variables) are not ours to parse.
            let Some(rest) = key.strip_prefix("SWITCHYARD_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Serialized::default(&path, parse_env_value(value)));
        }
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        // the configured keys alone (the OTEL_* fallbacks are checked when the process starts)
        self.telemetry.resolve(|_| None)?;
        if let Some(ratio) = self.telemetry.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return Err(SettingsError::Value(format!(
                "telemetry.sample_ratio must be between 0 and 1, got {ratio}"
            )));
        }
        if !matches!(self.iso8583.packager.as_str(), "ascii" | "binary-bitmap") {
            return Err(SettingsError::Value(format!(
                "iso8583.packager must be \"ascii\" or \"binary-bitmap\", got {:?}",
                self.iso8583.packager
            )));
        }
        if self.iso8583.max_frame_bytes < 64 || self.iso8583.max_frame_bytes > 65_535 {
            return Err(SettingsError::Value(
                "iso8583.max_frame_bytes must be between 64 and 65535 (2-byte length header)"
                    .into(),
            ));
        }
        if self.iso8583.max_connections == 0 {
            return Err(SettingsError::Value(
                "iso8583.max_connections must be at least 1".into(),
            ));
        }
        if self.iso8583.max_connections_per_ip == 0 {
            return Err(SettingsError::Value(
                "iso8583.max_connections_per_ip must be at least 1".into(),
            ));
        }
        if self.iso8583.max_unauthenticated_frames == 0 {
            return Err(SettingsError::Value(
                "iso8583.max_unauthenticated_frames must be at least 1 (the sign-on itself)".into(),
            ));
        }
        if self.iso8583.signon_timeout.is_zero() {
            return Err(SettingsError::Value(
                "iso8583.signon_timeout must be longer than 0s".into(),
            ));
        }
        if self.backup.retain == 0 {
            return Err(SettingsError::Value(
                "backup.retain must be at least 1 (the backups to keep)".into(),
            ));
        }
        let admin = &self.admin;
        if admin.rate_limit_per_second == 0
            || admin.rate_limit_burst == 0
            || admin.auth_failures_per_minute == 0
        {
            return Err(SettingsError::Value(
                "admin.rate_limit_per_second, admin.rate_limit_burst and admin.auth_failures_per_minute must be at least 1"
                    .into(),
            ));
        }
        for (what, max_connections, timeouts) in [
            (
                "admin",
                admin.max_connections,
                [admin.header_read_timeout, admin.request_timeout],
            ),
            (
                "metrics",
                self.metrics.max_connections,
                [
                    self.metrics.header_read_timeout,
                    self.metrics.request_timeout,
                ],
            ),
        ] {
            if max_connections == 0 || timeouts.iter().any(Duration::is_zero) {
                return Err(SettingsError::Value(format!(
                    "{what}.max_connections, {what}.header_read_timeout and {what}.request_timeout must be above zero"
                )));
            }
        }
        if admin.idempotency_retention < Duration::from_secs(3600)
            || admin.idempotency_retention > Duration::from_secs(366 * 24 * 3600)
        {
            return Err(SettingsError::Value(
                "admin.idempotency_retention must be between 1h and 366d".into(),
            ));
        }
        if self.metrics.refresh_interval.is_zero() {
            return Err(SettingsError::Value(
                "metrics.refresh_interval must be above zero".into(),
            ));
        }
        if self.saf.batch_size == 0 || self.saf.batch_size > 1000 {
            return Err(SettingsError::Value(
                "saf.batch_size must be between 1 and 1000".into(),
            ));
        }
        if self.saf.held_reversals_max == 0 {
            return Err(SettingsError::Value(
                "saf.held_reversals_max must be at least 1".into(),
            ));
        }
        self.stations.validate()?;
        if self.registry.heartbeat_interval.is_zero()
            || self.registry.lease < self.registry.heartbeat_interval * 2
            || self.registry.lease > Duration::from_secs(3600)
        {
            return Err(SettingsError::Value(
                "registry.lease must be at least two registry.heartbeat_interval and at most 1h"
                    .into(),
            ));
        }
        if let Some(id) = &self.registry.replica_id
            && (id.is_empty() || id.len() > 253 || id.chars().any(char::is_control))
        {
            return Err(SettingsError::Value(
                "registry.replica_id must be 1 to 253 printable characters".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            if !names.insert(u.name.as_str()) {
                return Err(SettingsError::Value(format!(
                    "upstreams: name {:?} is configured twice",
                    u.name
                )));
            }
            if u.endpoints.is_empty() {
                return Err(SettingsError::Value(format!(
                    "upstreams {:?}: endpoints must list at least one host:port",
                    u.name
                )));
            }
            if u.tmk_file.is_none() {
                return Err(SettingsError::Value(format!(
                    "upstreams {:?}: tmk_file is required (the TMK shared with the issuer, hex)",
                    u.name
                )));
            }
            if u.timeout.is_zero() || u.heartbeat_interval.is_zero() {
                return Err(SettingsError::Value(format!(
                    "upstreams {:?}: timeout and heartbeat_interval must be above zero",
                    u.name
                )));
            }
        }
        for upstream in &self.upstreams {
            if let Some(tls) = &upstream.tls
                && tls.cert_file.is_some() != tls.key_file.is_some()
            {
                return Err(SettingsError::Value(format!(
                    "upstreams {:?}: tls.cert_file and tls.key_file go together (both for mutual TLS, or neither)",
                    upstream.name
                )));
            }
        }
        for route in &self.routing.routes {
            if !self.upstreams.iter().any(|u| u.name == route.upstream) {
                return Err(SettingsError::Value(format!(
                    "routing.routes: prefix {} names upstream {:?}, which is not configured in [[upstreams]]",
                    route.prefix, route.upstream
                )));
            }
        }
        for prefix in self
            .routing
            .on_us
            .iter()
            .chain(self.routing.routes.iter().map(|r| &r.prefix))
        {
            if prefix.is_empty() || prefix.len() > 11 || !prefix.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(SettingsError::Value(format!(
                    "routing prefix {prefix:?} must be 1 to 11 digits"
                )));
            }
        }
        Ok(())
    }
}

/// Environment values are text; numbers and booleans are given their type so that
/// `SWITCHYARD_ISO8583__MAX_CONNECTIONS=500` fills an integer field. Lists use TOML syntax
/// (`SWITCHYARD_ROUTING__ON_US='["6011"]'`).
fn parse_env_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = raw.trim();
    if (trimmed.starts_with('[') || trimmed.starts_with('{'))
        && let Ok(v) = toml_value(trimmed)
    {
        return v;
    }
    if let Ok(b) = trimmed.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(i) = trimmed.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = trimmed.parse::<f64>()
        && trimmed.contains('.')
    {
        return Value::from(f);
    }
    Value::from(raw.to_string())
}

fn toml_value(text: &str) -> Result<figment::value::Value, Box<figment::Error>> {
    let wrapped = format!("v = {text}");
    let dict = Figment::from(Toml::string(&wrapped))
        .extract::<BTreeMap<String, figment::value::Value>>()
        .map_err(Box::new)?;
    dict.get("v")
        .cloned()
        .ok_or_else(|| Box::new(figment::Error::from("empty value".to_string())))
}

/// Reads a secret file; the error names the file, never its contents.
pub fn read_secret_file(what: &'static str, path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|source| SettingsError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces the password in a connection URL with `***` for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.iso8583.listen.port(), 8583);
        assert_eq!(s.admin.listen.port(), 8080);
        assert_eq!(s.metrics.listen.port(), 9090);
        assert_eq!(s.iso8583.idle_timeout, Duration::from_secs(90));
        assert_eq!(s.iso8583.max_frame_bytes, 8192);
        assert_eq!(
            s.database.resolve_url().unwrap().as_str(),
            DEFAULT_DATABASE_URL
        );
        assert_eq!(s.keys.grace, Duration::from_secs(300));
    }

    #[test]
    fn env_overrides_file_and_database_url() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switch.toml");
        std::fs::write(
            &file,
            "[iso8583]\nlisten = \"127.0.0.1:1000\"\nidle_timeout = \"30s\"\n[database]\nurl = \"sqlite://a.db\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("SWITCHYARD_ISO8583__LISTEN", "127.0.0.1:18583"),
                ("SWITCHYARD_ISO8583__MAX_CONNECTIONS", "500"),
                ("DATABASE_URL", "postgres://u:p@h/db"),
                ("SWITCHYARD_ROUTING__ON_US", "[\"6011\", \"4000\"]"),
            ]),
        )
        .unwrap();
        assert_eq!(s.iso8583.listen.port(), 18583);
        assert_eq!(s.iso8583.max_connections, 500);
        assert_eq!(s.iso8583.idle_timeout, Duration::from_secs(30));
        assert_eq!(s.database.url.as_deref(), Some("postgres://u:p@h/db"));
        assert_eq!(s.routing.on_us, vec!["6011", "4000"]);

        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("DATABASE_URL", "postgres://u:p@h/db"),
                ("SWITCHYARD_DATABASE__URL", "sqlite://b.db"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url.as_deref(), Some("sqlite://b.db"));
    }

    #[test]
    fn only_section_key_variables_are_configuration() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_CONFIG", "/etc/switchyard/switch.toml"),
                ("SWITCHYARD_BIN", "/usr/local/bin/switchyard-switch"),
                ("SWITCHYARD_TEST_DATABASE_URL", "postgres://x"),
                ("SWITCHYARD_METRICS__LISTEN", "127.0.0.1:19090"),
            ]),
        )
        .unwrap();
        assert_eq!(s.metrics.listen.port(), 19090);
    }

    #[test]
    fn yaml_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switch.yaml");
        std::fs::write(&file, "iso8583:\n  packager: binary-bitmap\n").unwrap();
        let s = Settings::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(s.iso8583.packager, "binary-bitmap");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switch.toml");
        std::fs::write(&file, "[iso8583]\nlisten_port = 1\n").unwrap();
        let err = Settings::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");

        let err = Settings::load_from(None, env(&[("SWITCHYARD_ISO8583__PACKAGER", "ebcdic")]))
            .unwrap_err();
        assert!(err.to_string().contains("packager"), "{err}");

        let err = Settings::load_from(
            None,
            env(&[("SWITCHYARD_ISO8583__IDLE_TIMEOUT", "ninety seconds")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("idle_timeout"), "{err}");
    }

    #[test]
    fn url_file_wins_and_secrets_stay_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("url");
        std::fs::write(&secret, "postgres://app:s3cret@db:5432/switch\n").unwrap();
        let s = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_DATABASE__URL", "postgres://x:hunter2@db/x"),
                ("SWITCHYARD_DATABASE__URL_FILE", secret.to_str().unwrap()),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.database.resolve_url().unwrap().as_str(),
            "postgres://app:s3cret@db:5432/switch"
        );
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("x:***@db/x"), "{debug}");
    }

    #[test]
    fn a_missing_secret_file_is_named_in_the_error() {
        let s = Settings::load_from(
            None,
            env(&[("SWITCHYARD_DATABASE__URL_FILE", "/nonexistent/url")]),
        )
        .unwrap();
        let err = s.database.resolve_url().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/url"), "{err}");
    }

    #[test]
    fn station_ceilings_default_take_overrides_and_refuse_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switch.toml");
        std::fs::write(
            &file,
            "[stations]\nadvice_daily_max_amount = 2000000\n\
             [stations.overrides.ACQ001]\nadvice_max_amount = 300000\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(s.stations.ceiling_for("ACQ001"), (300_000, 2_000_000));
        assert_eq!(s.stations.ceiling_for("ACQ002"), (1_000_000, 2_000_000));

        for bad in ["0", "-5", "1000000000000"] {
            let err = Settings::load_from(
                None,
                env(&[("SWITCHYARD_STATIONS__ADVICE_MAX_AMOUNT", bad)]),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("stations.advice_max_amount"),
                "{err}"
            );
        }
    }

    #[test]
    fn idempotency_retention_defaults_to_a_day_and_refuses_less_than_an_hour_or_over_a_year() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(
            s.admin.idempotency_retention,
            Duration::from_secs(24 * 3600)
        );
        let s = Settings::load_from(
            None,
            env(&[("SWITCHYARD_ADMIN__IDEMPOTENCY_RETENTION", "7d")]),
        )
        .unwrap();
        assert_eq!(
            s.admin.idempotency_retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        for bad in ["10m", "400d"] {
            let err = Settings::load_from(
                None,
                env(&[("SWITCHYARD_ADMIN__IDEMPOTENCY_RETENTION", bad)]),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("admin.idempotency_retention"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_route_to_an_unknown_upstream_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switch.toml");
        std::fs::write(
            &file,
            "[[routing.routes]]\nprefix = \"4111\"\nupstream = \"issuer-b\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("issuer-b"), "{err}");
    }

    #[test]
    fn telemetry_falls_back_to_the_otel_variables() {
        let otel = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318/".to_string()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("0.25".to_string()),
            _ => None,
        };
        let none = Settings::default().telemetry.resolve(|_| None).unwrap();
        assert_eq!(none, None, "no endpoint anywhere: no export");
        let from_env = Settings::default()
            .telemetry
            .resolve(otel)
            .unwrap()
            .unwrap();
        assert_eq!(from_env.endpoint, "http://collector:4318");
        assert_eq!(from_env.sample_ratio, 0.25);
        assert_eq!(
            from_env.max_queue_size,
            TelemetrySettings::DEFAULT_MAX_QUEUE_SIZE
        );

        let settings = Settings::load_from(
            None,
            env(&[
                ("SWITCHYARD_TELEMETRY__OTLP_ENDPOINT", "http://tempo:4318"),
                ("SWITCHYARD_TELEMETRY__SAMPLE_RATIO", "0.01"),
            ]),
        )
        .unwrap();
        let configured = settings.telemetry.resolve(otel).unwrap().unwrap();
        assert_eq!(configured.endpoint, "http://tempo:4318", "the key wins");
        assert_eq!(configured.sample_ratio, 0.01);
        let only_endpoint = TelemetrySettings {
            otlp_endpoint: Some("https://otel.example:4318".into()),
            ..Default::default()
        };
        assert_eq!(
            only_endpoint
                .resolve(|_| None)
                .unwrap()
                .unwrap()
                .sample_ratio,
            1.0
        );
    }

    #[test]
    fn bad_telemetry_values_are_refused() {
        for (key, value) in [
            ("SWITCHYARD_TELEMETRY__SAMPLE_RATIO", "1.5"),
            ("SWITCHYARD_TELEMETRY__OTLP_ENDPOINT", "collector:4318"),
        ] {
            let err = Settings::load_from(None, env(&[(key, value)])).unwrap_err();
            assert!(err.to_string().contains("telemetry."), "{key}: {err}");
        }
        let bad_env = TelemetrySettings {
            otlp_endpoint: Some("http://c:4318".into()),
            ..Default::default()
        };
        let err = bad_env
            .resolve(|k| (k == "OTEL_TRACES_SAMPLER_ARG").then(|| "lots".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
    }

    #[test]
    fn propagate_trace_is_off_unless_set() {
        let upstream: UpstreamSettings = serde_json::from_value(serde_json::json!({
            "name": "issuer-b",
            "endpoints": ["127.0.0.1:1"],
            "station_id": "ACQ001",
        }))
        .unwrap();
        assert!(!upstream.propagate_trace);
    }
}
