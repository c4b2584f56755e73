//! Prometheus metrics of the switch. Names are the contract with the dashboards and alerts
//! (SPEC §8); change them only together with `charts/` and the runbooks.

use std::sync::Arc;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `mti` and `response_code` of an ISO 8583 message the switch sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// Message type of the request we answered (e.g. `0200`).
    pub mti: String,
    /// Field 39 of our answer, or `none` when the answer has none.
    pub response_code: String,
}

/// The exemplar of a latency observation: the trace that took that long (SPEC §8).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    /// W3C trace id (32 hex digits) of a sampled trace.
    pub trace_id: String,
}

/// One label called `type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Transaction or key type.
    pub r#type: String,
}

/// One label called `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Connection or pool state.
    pub state: String,
}

/// One label called `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why a frame was refused.
    pub reason: String,
}

/// `switchyard_trace_spans_dropped_total{reason}`, shared by every registry of the process (the
/// trace exporter in `crate::telemetry` is process-wide). Kept here so telemetry depends on
/// metrics and not the other way round.
static SPANS_DROPPED: LazyLock<Family<ReasonLabel, Counter>> = LazyLock::new(|| {
    let family = Family::<ReasonLabel, Counter>::default();
    for reason in ["queue_full", "export_failed"] {
        let _ = family.get_or_create(&ReasonLabel {
            reason: reason.into(),
        });
    }
    family
});

/// The dropped-spans counter family, shared by the exporter and every registry.
pub fn spans_dropped() -> &'static Family<ReasonLabel, Counter> {
    &SPANS_DROPPED
}

/// One label called `limit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// Which admin rate limit refused: `address`, `token` or `auth_failures`.
    pub limit: String,
}

/// One label called `server`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    /// Which HTTP server: `admin` or `metrics`.
    pub server: String,
}

/// Labels of `switchyard_tls_handshake_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    /// `iso8583`, `admin` (server side) or `upstream` (this switch's client side of a link).
    pub channel: String,
    /// `timeout`, `certificate` (the peer's certificate was missing or not trusted) or
    /// `protocol` (anything else: not TLS, no common version or cipher, reset mid-handshake).
    pub reason: String,
}

/// Labels of `switchyard_tls_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    /// `iso8583` or `admin`.
    pub channel: String,
    /// `ok` (new connections get the new certificate) or `failed` (the old one stays in use).
    pub result: String,
}

/// Labels of `switchyard_keys`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// TMK, TPK or TAK.
    pub r#type: String,
    /// PENDING, ACTIVE, EXPIRED or REVOKED.
    pub state: String,
}

/// Label of the per-upstream gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// `[[upstreams]].name`.
    pub upstream: String,
}

/// Labels of `switchyard_saf_backlog`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SafLabels {
    /// Upstream the advices go to.
    pub destination: String,
    /// Queue priority (0 highest).
    pub priority: String,
}

/// All switch metrics, registered once per process (tests make their own).
#[derive(Debug)]
pub struct SwitchMetrics {
    registry: Registry,
    /// `switchyard_iso_messages_total{mti,response_code}`.
    pub iso_messages: Family<MessageLabels, Counter>,
    /// `switchyard_transaction_duration_seconds{type}`, with the trace id of a sampled request
    /// as each bucket's exemplar (OpenMetrics).
    pub transaction_duration: Family<TypeLabel, HistogramWithExemplars<TraceExemplar>>,
    /// `switchyard_connections{state}`: `connected` (not signed on) and `signed_on`.
    pub connections: Family<StateLabel, Gauge>,
    /// `switchyard_terminals_signed_on`.
    pub terminals_signed_on: Gauge,
    /// `switchyard_frame_errors_total{reason}`.
    pub frame_errors: Family<ReasonLabel, Counter>,
    /// `switchyard_connections_rejected_total{reason}`: connections refused or closed by the
    /// channel's limits (`max_connections`, `per_ip_limit`, `signon_timeout`,
    /// `unauthenticated_frames`).
    pub connections_rejected: Family<ReasonLabel, Counter>,
    /// `switchyard_mac_failures_total`.
    pub mac_failures: Counter,
    /// `switchyard_pin_failures_total`.
    pub pin_failures: Counter,
    /// `switchyard_key_cache_hits_total`: usable-key lookups of financial requests served from
    /// the key cache.
    pub key_cache_hits: Counter,
    /// `switchyard_key_cache_misses_total`: usable-key lookups that read the store.
    pub key_cache_misses: Counter,
    /// `switchyard_keys{type,state}`, refreshed at scrape time.
    pub keys: Family<KeyLabels, Gauge>,
    /// `switchyard_key_age_seconds{type}`: age of the oldest ACTIVE key, refreshed at scrape.
    pub key_age_seconds: Family<TypeLabel, Gauge>,
    /// `switchyard_db_pool_connections{state}`: `open` and `idle`, refreshed at scrape time.
    pub db_pool_connections: Family<StateLabel, Gauge>,
    /// `switchyard_saf_backlog{destination,priority}`, refreshed at scrape time.
    pub saf_backlog: Family<SafLabels, Gauge>,
    /// `switchyard_saf_oldest_age_seconds`, refreshed at scrape time.
    pub saf_oldest_age_seconds: Gauge,
    /// `switchyard_saf_delivered_total`: advanced to the store's delivered count at scrape time.
    pub saf_delivered: Counter,
    /// `switchyard_saf_dead_letters`, refreshed at scrape time.
    pub saf_dead_letters: Gauge,
    /// `switchyard_upstream_up{upstream}`: 1 while the link is signed on with keys.
    pub upstream_up: Family<UpstreamLabel, Gauge>,
    /// `switchyard_circuit_state{upstream}`: 0 closed, 1 half-open, 2 open.
    pub circuit_state: Family<UpstreamLabel, Gauge>,
    /// `switchyard_standin_total`: withdrawals approved in stand-in.
    pub standin: Counter,
    /// `switchyard_reversals_held`: 0420 advices kept in memory because the store refused them.
    pub reversals_held: Gauge,
    /// `switchyard_reversal_holds_total`: 0420 advices ever put on hold.
    pub reversal_holds: Counter,
    /// `switchyard_admin_rate_limited_total{limit}`: admin requests answered `429`.
    pub admin_rate_limited: Family<LimitLabel, Counter>,
    /// `switchyard_http_connections_rejected_total{server}`: HTTP connections closed at accept
    /// because the server's `max_connections` were open.
    pub http_connections_rejected: Family<ServerLabel, Counter>,
    /// `switchyard_tls_handshake_failures_total{channel,reason}`: TLS handshakes that failed.
    pub tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    /// `switchyard_tls_reloads_total{channel,result}`: certificate files re-read after they
    /// changed on disk.
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
    /// `switchyard_backup_last_success_timestamp_seconds`: Unix time the last scheduled or
    /// manual-in-process backup of the embedded SQLite store completed (0: none yet).
    pub backup_last_success_timestamp: Gauge,
    /// `switchyard_backup_failures_total`: scheduled backups that failed.
    pub backup_failures: Counter,
    /// `switchyard_backup_last_duration_seconds`: how long the last successful backup took.
    pub backup_last_duration_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `switchyard_backup_last_size_bytes`: size of the last successful backup file.
    pub backup_last_size_bytes: Gauge,
    /// `switchyard_backup_interval_seconds`: the nominal gap between scheduled backups (0: no
    /// `[backup] schedule`); the backup-stale alert compares the last success with it.
    pub backup_interval_seconds: Gauge,
    /// Backlog label sets set so far, so a destination that emptied drops to zero.
    saf_known: std::sync::Mutex<std::collections::HashSet<SafLabels>>,
}

/// Request MTIs the switch answers (see `txn::handle_frame`); any other is counted as `other`.
const KNOWN_MTIS: &[&str] = &["0200", "0220", "0221", "0400", "0420", "0421", "0800"];

/// Seconds buckets for transaction latency: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

impl Default for SwitchMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SwitchMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let iso_messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "switchyard_iso_messages",
            "ISO 8583 messages answered, by request MTI and response code",
            iso_messages.clone(),
        );
        let transaction_duration =
            Family::<TypeLabel, HistogramWithExemplars<TraceExemplar>>::new_with_constructor(
                new_latency_histogram as fn() -> HistogramWithExemplars<TraceExemplar>,
            );
        registry.register(
            "switchyard_transaction_duration_seconds",
            "Time from a request frame read to its response written, by transaction type",
            transaction_duration.clone(),
        );
        let connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "switchyard_connections",
            "Open ISO 8583 connections, by state (connected, signed_on)",
            connections.clone(),
        );
        let terminals_signed_on = Gauge::default();
        registry.register(
            "switchyard_terminals_signed_on",
            "Terminals and stations with a live signed-on session",
            terminals_signed_on.clone(),
        );
        let frame_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "switchyard_frame_errors",
            "Frames refused or unreadable, by reason (too_large, truncated, malformed)",
            frame_errors.clone(),
        );
        let connections_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "switchyard_connections_rejected",
            "Connections refused at accept or closed before sign-on by the channel's limits, by \
             reason (max_connections, per_ip_limit, signon_timeout, unauthenticated_frames)",
            connections_rejected.clone(),
        );
        let mac_failures = Counter::default();
        registry.register(
            "switchyard_mac_failures",
            "Messages refused with 63 because their MAC did not verify",
            mac_failures.clone(),
        );
        let pin_failures = Counter::default();
        registry.register(
            "switchyard_pin_failures",
            "PIN verifications that failed (wrong PIN or undecipherable block)",
            pin_failures.clone(),
        );
        let key_cache_hits = Counter::default();
        registry.register(
            "switchyard_key_cache_hits",
            "Usable-key lookups of financial requests served from the key cache",
            key_cache_hits.clone(),
        );
        let key_cache_misses = Counter::default();
        registry.register(
            "switchyard_key_cache_misses",
            "Usable-key lookups of financial requests that read the store",
            key_cache_misses.clone(),
        );
        let keys = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "switchyard_keys",
            "Terminal keys by type and lifecycle state",
            keys.clone(),
        );
        let key_age_seconds = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "switchyard_key_age_seconds",
            "Age of the oldest ACTIVE key of each type, in seconds",
            key_age_seconds.clone(),
        );
        let db_pool_connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "switchyard_db_pool_connections",
            "Database pool connections by state (open, idle)",
            db_pool_connections.clone(),
        );
        let saf_backlog = Family::<SafLabels, Gauge>::default();
        registry.register(
            "switchyard_saf_backlog",
            "Store-and-forward advices waiting for delivery, by destination and priority",
            saf_backlog.clone(),
        );
        let saf_oldest_age_seconds = Gauge::default();
        registry.register(
            "switchyard_saf_oldest_age_seconds",
            "Age of the oldest advice waiting for delivery, in seconds",
            saf_oldest_age_seconds.clone(),
        );
        let saf_delivered = Counter::default();
        registry.register(
            "switchyard_saf_delivered",
            "Store-and-forward advices delivered (acknowledged by the upstream)",
            saf_delivered.clone(),
        );
        let saf_dead_letters = Gauge::default();
        registry.register(
            "switchyard_saf_dead_letters",
            "Advices in the dead-letter list, waiting for an operator",
            saf_dead_letters.clone(),
        );
        let upstream_up = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "switchyard_upstream_up",
            "1 while the link to the upstream is connected, signed on and holds keys",
            upstream_up.clone(),
        );
        let circuit_state = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "switchyard_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        let standin = Counter::default();
        registry.register(
            "switchyard_standin",
            "Withdrawals approved in stand-in while their issuer was unavailable",
            standin.clone(),
        );
        for reason in [
            "max_connections",
            "per_ip_limit",
            "signon_timeout",
            "unauthenticated_frames",
        ] {
            // present from the start, so a rate() over them is 0 rather than absent
            let _ = connections_rejected.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        let reversals_held = Gauge::default();
        registry.register(
            "switchyard_reversals_held",
            "Reversal advices (0420) held in memory because the store refused them; retried until it takes them",
            reversals_held.clone(),
        );
        let reversal_holds = Counter::default();
        registry.register(
            "switchyard_reversal_holds",
            "Reversal advices (0420) put on hold in memory because the store refused them",
            reversal_holds.clone(),
        );
        let admin_rate_limited = Family::<LimitLabel, Counter>::default();
        registry.register(
            "switchyard_admin_rate_limited",
            "Admin API requests refused with 429, by limit (address, token, auth_failures)",
            admin_rate_limited.clone(),
        );
        let http_connections_rejected = Family::<ServerLabel, Counter>::default();
        registry.register(
            "switchyard_http_connections_rejected",
            "HTTP connections closed at accept because max_connections were open, by server (admin, metrics)",
            http_connections_rejected.clone(),
        );
        let tls_handshake_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            "switchyard_tls_handshake_failures",
            "TLS handshakes that failed, by channel (iso8583, admin, upstream) and reason (timeout, certificate, protocol)",
            tls_handshake_failures.clone(),
        );
        let tls_reloads = Family::<TlsReloadLabels, Counter>::default();
        registry.register(
            "switchyard_tls_reloads",
            "Certificate files re-read after they changed, by channel and result (ok, failed: the previous certificate stays in use)",
            tls_reloads.clone(),
        );
        let backup_last_success_timestamp = Gauge::default();
        registry.register(
            "switchyard_backup_last_success_timestamp_seconds",
            "Unix time the last backup of the embedded SQLite store by this process completed (0: none yet)",
            backup_last_success_timestamp.clone(),
        );
        let backup_failures = Counter::default();
        registry.register(
            "switchyard_backup_failures",
            "Scheduled backups of the embedded SQLite store that failed",
            backup_failures.clone(),
        );
        let backup_last_duration_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "switchyard_backup_last_duration_seconds",
            "How long the last successful backup took",
            backup_last_duration_seconds.clone(),
        );
        let backup_last_size_bytes = Gauge::default();
        registry.register(
            "switchyard_backup_last_size_bytes",
            "Size of the last successful backup file",
            backup_last_size_bytes.clone(),
        );
        let backup_interval_seconds = Gauge::default();
        registry.register(
            "switchyard_backup_interval_seconds",
            "Nominal seconds between scheduled backups ([backup] schedule); 0 when scheduled backups are off",
            backup_interval_seconds.clone(),
        );
        // process-wide (the exporter is): every registry shows the same counters
        let trace_spans_dropped = Family::<ReasonLabel, Counter>::clone(spans_dropped());
        registry.register(
            "switchyard_trace_spans_dropped",
            "Finished spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector refused or never took the batch)",
            trace_spans_dropped.clone(),
        );
        for state in ["connected", "signed_on"] {
            connections
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(0);
        }
        Self {
            registry,
            iso_messages,
            transaction_duration,
            connections,
            terminals_signed_on,
            frame_errors,
            connections_rejected,
            mac_failures,
            pin_failures,
            key_cache_hits,
            key_cache_misses,
            keys,
            key_age_seconds,
            db_pool_connections,
            saf_backlog,
            saf_oldest_age_seconds,
            saf_delivered,
            saf_dead_letters,
            reversals_held,
            reversal_holds,
            upstream_up,
            circuit_state,
            standin,
            admin_rate_limited,
            http_connections_rejected,
            tls_handshake_failures,
            tls_reloads,
            backup_last_success_timestamp,
            backup_failures,
            backup_last_duration_seconds,
            backup_last_size_bytes,
            backup_interval_seconds,
            saf_known: Default::default(),
        }
    }

    /// Sets an upstream's link and breaker gauges.
    pub fn set_upstream(&self, upstream: &str, up: i64, circuit_state: i64) {
        let labels = UpstreamLabel {
            upstream: upstream.to_string(),
        };
        self.upstream_up.get_or_create(&labels).set(up);
        self.circuit_state.get_or_create(&labels).set(circuit_state);
    }

    /// Sets the SAF gauges from the store's figures. The delivered counter is advanced to the
    /// store's total (delivered rows are never deleted, so it only grows); a destination whose
    /// backlog emptied drops to zero rather than keep its last value.
    pub fn set_saf(&self, stats: &crate::store::SafStats) {
        let mut known = self.saf_known.lock().unwrap_or_else(|p| p.into_inner());
        for labels in known.iter() {
            self.saf_backlog.get_or_create(labels).set(0);
        }
        for b in &stats.backlog {
            let labels = SafLabels {
                destination: b.destination.clone(),
                priority: b.priority.to_string(),
            };
            self.saf_backlog
                .get_or_create(&labels)
                .set(i64::try_from(b.count).unwrap_or(i64::MAX));
            known.insert(labels);
        }
        self.saf_oldest_age_seconds
            .set(i64::try_from(stats.oldest_age_seconds).unwrap_or(i64::MAX));
        self.saf_dead_letters
            .set(i64::try_from(stats.dead_letters).unwrap_or(i64::MAX));
        let counted = self.saf_delivered.get();
        if stats.delivered_total > counted {
            self.saf_delivered.inc_by(stats.delivered_total - counted);
        }
    }

    /// Counts one answered message. An MTI the switch does not handle is counted as `other`:
    /// the MTI comes from the network, and a label per value sent would let anyone grow the
    /// series without bound.
    pub fn message(&self, mti: &str, response_code: Option<&str>) {
        let mti = if KNOWN_MTIS.contains(&mti) {
            mti
        } else {
            "other"
        };
        self.iso_messages
            .get_or_create(&MessageLabels {
                mti: mti.to_string(),
                response_code: response_code.unwrap_or("none").to_string(),
            })
            .inc();
    }

    /// Records a transaction's latency; `trace_id` (of a sampled trace) becomes the exemplar.
    pub fn observe_duration(&self, kind: &str, seconds: f64, trace_id: Option<String>) {
        self.transaction_duration
            .get_or_create(&TypeLabel {
                r#type: kind.to_string(),
            })
            .observe(
                seconds,
                trace_id.map(|trace_id| TraceExemplar { trace_id }),
                None,
            );
    }

    /// Counts a refused frame.
    pub fn frame_error(&self, reason: &str) {
        self.frame_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a connection refused or closed by one of the channel's limits.
    pub fn connection_rejected(&self, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts an admin request refused with `429` by `limit`.
    pub fn admin_rate_limited(&self, limit: &str) {
        self.admin_rate_limited
            .get_or_create(&LimitLabel {
                limit: limit.to_string(),
            })
            .inc();
    }

    /// Counts an HTTP connection of `server` closed at accept.
    pub fn http_connection_rejected(&self, server: &str) {
        self.http_connections_rejected
            .get_or_create(&ServerLabel {
                server: server.to_string(),
            })
            .inc();
    }

    /// Counts a failed TLS handshake on `channel`.
    pub fn tls_handshake_failed(&self, channel: &str, reason: &str) {
        self.tls_handshake_failures
            .get_or_create(&TlsFailureLabels {
                channel: channel.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a certificate reload on `channel` (`ok` or `failed`).
    pub fn tls_reloaded(&self, channel: &str, result: &str) {
        self.tls_reloads
            .get_or_create(&TlsReloadLabels {
                channel: channel.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Gauge of connections in `state`.
    pub fn connections_in(&self, state: &str) -> Gauge {
        self.connections
            .get_or_create(&StateLabel {
                state: state.to_string(),
            })
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on a fmt error from our own labels.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn new_latency_histogram() -> HistogramWithExemplars<TraceExemplar> {
    HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter())
}

/// Shared handle.
pub type Metrics = Arc<SwitchMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_spec_names() {
        let m = SwitchMetrics::new();
        m.message("0800", Some("00"));
        m.observe_duration("balance", 0.002, None);
        m.frame_error("too_large");
        let text = m.encode();
        for name in [
            "switchyard_iso_messages_total{mti=\"0800\",response_code=\"00\"} 1",
            "switchyard_transaction_duration_seconds_bucket{le=\"0.0025\",type=\"balance\"} 1",
            "switchyard_connections{state=\"signed_on\"} 0",
            "switchyard_terminals_signed_on 0",
            "switchyard_frame_errors_total{reason=\"too_large\"} 1",
            "switchyard_mac_failures_total 0",
            "switchyard_pin_failures_total 0",
            "switchyard_key_cache_hits_total 0",
            "switchyard_key_cache_misses_total 0",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }

    #[test]
    fn latency_buckets_carry_trace_exemplars() {
        let m = SwitchMetrics::new();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        m.observe_duration("withdrawal", 0.03, Some(trace.to_string()));
        m.observe_duration("withdrawal", 0.0004, None);
        let text = m.encode();
        let bucket = text
            .lines()
            .find(|l| {
                l.starts_with("switchyard_transaction_duration_seconds_bucket{le=\"0.05\",type=\"withdrawal\"}")
            })
            .unwrap_or_default();
        assert!(
            bucket.contains(&format!("# {{trace_id=\"{trace}\"}} 0.03")),
            "no exemplar on the 0.05 bucket: {bucket}\n{text}"
        );
        assert!(
            text.contains("switchyard_trace_spans_dropped_total{reason=\"queue_full\"}"),
            "{text}"
        );
    }

    #[test]
    fn unknown_mtis_share_one_label() {
        let m = SwitchMetrics::new();
        for i in 0..1000 {
            m.message(&format!("{:04}", 1000 + i), Some("12"));
        }
        m.message("????", None);
        m.message("0200", Some("00"));
        let text = m.encode();
        assert!(
            text.contains("switchyard_iso_messages_total{mti=\"other\",response_code=\"12\"} 1000"),
            "{text}"
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with("switchyard_iso_messages_total{"))
            .count();
        assert_eq!(series, 3, "{text}");
    }
}
