//! `switchyard-atm load`: N provisioned terminals on N connections, each sending one scenario
//! in a loop (closed loop, or paced to a target total rate), then throughput and latency
//! percentiles. Every request is a real, MACed, PIN-carrying message; every answer is checked.
//! With `progress`, provisioning shows a progress bar and the run a live line each second
//! (answered/s, errors, p99 so far) on stderr.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use rand::RngExt;

use super::provision::AdminClient;
use super::{AtmClient, AtmError, CardInput};
use crate::domain::{KeyType, TerminalId};
use crate::iso8583::Packager;
use crate::iso8583::fields;
use crate::tls::TlsClient;

/// What each connection sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 0800/301 echo after sign-on.
    Echo,
    /// 0200 balance inquiry.
    Balance,
    /// 0200 cash withdrawal of a small amount.
    Withdrawal,
}

/// Options of a load run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Switch ISO 8583 address.
    pub iso_addr: String,
    /// Admin API, for provisioning.
    pub admin: AdminClient,
    /// KEK (clear, hex-decoded) to deliver TMKs under.
    pub kek: Vec<u8>,
    /// Connections (one terminal each).
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
    /// Target total requests per second (None: as fast as answers come).
    pub rate: Option<f64>,
    /// What to send.
    pub scenario: Scenario,
    /// Wire profile of the switch.
    pub packager: &'static Packager,
    /// BIN of the generated cards.
    pub bin: String,
    /// Where the cards and accounts are created: the issuer's admin API when the BIN is routed
    /// to an upstream (routed-latency runs); `None` creates them on `admin`'s switch.
    pub card_admin: Option<AdminClient>,
    /// TLS to the ISO 8583 port (`[iso8583.tls]`), or plain TCP.
    pub tls: Option<TlsClient>,
    /// Show a provisioning progress bar and a live line each second on stderr.
    pub progress: bool,
}

/// Counters the connections share while running, for the live line: approximate latency
/// percentiles from a log-linear histogram (16 sub-buckets per power of two, within ~6%),
/// so recording is one atomic add and no lock is taken on the request path.
#[derive(Debug)]
pub struct LiveStats {
    answered: AtomicU64,
    errors: AtomicU64,
    buckets: Vec<AtomicU64>,
}

const BUCKETS: usize = 32 + 59 * 16;

impl Default for LiveStats {
    fn default() -> Self {
        Self {
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < 32 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    32 + (e - 5) * 16 + ((us >> (e - 4)) & 0xF) as usize
}

/// The highest latency (µs) bucket `i` holds.
fn bucket_high(i: usize) -> u64 {
    if i < 32 {
        return i as u64;
    }
    let e = (i - 32) / 16 + 5;
    let sub = ((i - 32) % 16) as u128;
    let high = ((16 + sub + 1) << (e - 4)) - 1;
    u64::try_from(high).unwrap_or(u64::MAX)
}

impl LiveStats {
    /// Records one answer that took `us` microseconds.
    pub fn answered(&self, us: u64) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.buckets[bucket_of(us).min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one failed request.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers and errors so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// The `p`th percentile so far in microseconds (upper edge of its bucket).
    pub fn percentile_us(&self, p: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i);
            }
        }
        bucket_high(BUCKETS - 1)
    }
}

/// The live line: answered in the last interval per second, errors, p99 so far.
pub fn live_line(answered_per_s: f64, errors: u64, p99_us: u64, elapsed: Duration) -> String {
    format!(
        "{:>4}s  answered {answered_per_s:>8.0}/s  errors {errors}  p99 so far {:.2} ms",
        elapsed.as_secs(),
        p99_us as f64 / 1000.0
    )
}

fn provisioning_bar(show: bool, total: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} provisioning [{bar:40}] {pos}/{len} terminals ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Results.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered.
    pub answered: u64,
    /// Requests that failed (timeout, closed connection, codec).
    pub errors: u64,
    /// Answers by field 39.
    pub codes: BTreeMap<String, u64>,
    /// Wall time of the sending phase.
    pub elapsed: Duration,
    /// Latency percentiles in microseconds: p50, p95, p99, max.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

impl LoadReport {
    /// Answered requests per second.
    pub fn throughput(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "answered {} in {:.2}s = {:.0}/s, errors {}",
            self.answered,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.errors
        )?;
        writeln!(
            f,
            "latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50_us as f64 / 1000.0,
            self.p95_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0
        )?;
        write!(f, "response codes {:?}", self.codes)
    }
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Provisioning through the admin API failed.
    #[error(transparent)]
    Admin(#[from] super::provision::AdminClientError),
    /// A terminal could not connect, sign on or exchange keys.
    #[error("failed to prepare terminal {terminal}: {source}")]
    Terminal {
        /// Terminal id.
        terminal: String,
        /// Why.
        #[source]
        source: AtmError,
    },
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Provisions, connects and signs on every terminal, then runs the scenario.
pub async fn run(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    let run_tag: String = {
        let mut rng = rand::rng();
        (0..3)
            .map(|_| char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[rng.random_range(0..32)]))
            .collect()
    };
    let mut clients = Vec::with_capacity(opts.connections);
    let needs_card = opts.scenario != Scenario::Echo;
    let bar = provisioning_bar(opts.progress, opts.connections);
    for i in 0..opts.connections {
        bar.inc(1);
        let id = TerminalId::new(format!("L{run_tag}{i:04}")).map_err(|e| LoadError::Terminal {
            terminal: format!("#{i}"),
            source: AtmError::Protocol(e.to_string()),
        })?;
        let keys = opts.admin.register_terminal(&opts.kek, &id, "load").await?;
        let prepare = async {
            let mut client = AtmClient::connect_with(
                &opts.iso_addr,
                opts.tls.as_ref(),
                id.clone(),
                keys,
                opts.packager,
            )
            .await?;
            super::expect_code(&client.network("001").await?, "00")?;
            if needs_card {
                client.exchange_key(KeyType::Tpk).await?;
                client.exchange_key(KeyType::Tak).await?;
            }
            Ok::<_, AtmError>(client)
        };
        let client = prepare.await.map_err(|source| LoadError::Terminal {
            terminal: id.to_string(),
            source,
        })?;
        let card = if needs_card {
            let account = format!("LOAD-{run_tag}-{i}");
            let issuer = opts.card_admin.as_ref().unwrap_or(&opts.admin);
            issuer
                .create_account(&account, "360", 1_000_000_000_000, 1_000_000_000_000)
                .await?;
            let pan = format!(
                "{}{:0>width$}",
                opts.bin,
                format!("{}{i:05}", rand::rng().random_range(0..1000u32)),
                width = 16 - opts.bin.len()
            );
            let card = CardInput {
                pan,
                expiry: "3012".into(),
                pin: "1234".into(),
                currency: "360".into(),
            };
            issuer
                .create_card(&card.pan, &card.expiry, &account, &card.pin)
                .await?;
            Some(card)
        } else {
            None
        };
        clients.push((client, card));
    }
    bar.finish_and_clear();

    let per_connection_interval = opts
        .rate
        .map(|r| Duration::from_secs_f64(opts.connections as f64 / r.max(0.001)));
    let started = Instant::now();
    let deadline = started + opts.duration;
    let live = Arc::new(LiveStats::default());
    let reporter = opts
        .progress
        .then(|| tokio::spawn(report_live(live.clone(), started)));
    let mut tasks = Vec::new();
    let connections = clients.len().max(1) as f64;
    for (n, (mut client, card)) in clients.into_iter().enumerate() {
        let scenario = opts.scenario;
        let live = live.clone();
        // Paced connections take turns: the n-th starts n/connections of an interval late, so
        // requests arrive evenly spread rather than one from every connection at the same
        // instant (a burst as large as the connection count each interval, which measures the
        // burst's queue, not the rate).
        let first_tick = per_connection_interval
            .map(|every| tokio::time::Instant::now() + every.mul_f64(n as f64 / connections));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let mut ticker = per_connection_interval
                .zip(first_tick)
                .map(|(every, first)| {
                    let mut t = tokio::time::interval_at(first, every);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
            while Instant::now() < deadline {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let sent = Instant::now();
                let answer = match (scenario, &card) {
                    (Scenario::Echo, _) => client.network("301").await,
                    (Scenario::Balance, Some(card)) => client.balance(card).await,
                    (Scenario::Withdrawal, Some(card)) => {
                        client.withdraw(card, 100).await.map(|(_, a)| a)
                    }
                    _ => Err(AtmError::Protocol("scenario needs a card".into())),
                };
                match answer {
                    Ok(m) => {
                        let us = sent.elapsed().as_micros() as u64;
                        live.answered(us);
                        latencies.push(us);
                        *codes
                            .entry(
                                m.get_str(fields::RESPONSE_CODE)
                                    .unwrap_or("none")
                                    .to_string(),
                            )
                            .or_default() += 1;
                    }
                    Err(_) => {
                        live.error();
                        errors += 1;
                        break;
                    }
                }
            }
            let _ = client.network("002").await;
            (latencies, codes, errors)
        }));
    }
    let mut all = Vec::new();
    let mut report = LoadReport::default();
    for task in tasks {
        if let Ok((lat, codes, errors)) = task.await {
            all.extend(lat);
            for (k, v) in codes {
                *report.codes.entry(k).or_default() += v;
            }
            report.errors += errors;
        } else {
            report.errors += 1;
        }
    }
    report.elapsed = started.elapsed();
    if let Some(reporter) = reporter {
        reporter.abort();
        let _ = reporter.await;
    }
    all.sort_unstable();
    report.answered = all.len() as u64;
    report.p50_us = percentile(&all, 50.0);
    report.p95_us = percentile(&all, 95.0);
    report.p99_us = percentile(&all, 99.0);
    report.max_us = all.last().copied().unwrap_or(0);
    Ok(report)
}

/// Prints [`live_line`] each second: on a terminal as one line redrawn in place (indicatif),
/// elsewhere (CI logs) as a plain line per second.
async fn report_live(live: Arc<LiveStats>, started: Instant) {
    let spinner = if std::io::stderr().is_terminal() {
        let s = ProgressBar::new_spinner();
        s.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Some(s)
    } else {
        None
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, Instant::now());
    loop {
        tick.tick().await;
        let (answered, errors) = live.totals();
        let now = Instant::now();
        let rate = (answered - last.0) as f64 / now.duration_since(last.1).as_secs_f64().max(1e-9);
        last = (answered, now);
        let line = live_line(rate, errors, live.percentile_us(99.0), started.elapsed());
        match &spinner {
            Some(s) => {
                s.set_message(line);
                s.tick();
            }
            None => eprintln!("{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_histogram_percentiles_are_within_a_bucket() {
        let live = LiveStats::default();
        for us in 1..=10_000u64 {
            live.answered(us);
        }
        live.error();
        assert_eq!(live.totals(), (10_000, 1));
        let p99 = live.percentile_us(99.0);
        assert!((9_900..=9_900 * 107 / 100).contains(&p99), "{p99}");
        let p50 = live.percentile_us(50.0);
        assert!((5_000..=5_000 * 107 / 100).contains(&p50), "{p50}");
        assert_eq!(LiveStats::default().percentile_us(99.0), 0);
        for us in [0, 1, 31, 32, 33, 1000, 123_456, u64::MAX / 2, u64::MAX] {
            assert!(bucket_high(bucket_of(us)) >= us, "{us}");
        }
        assert!(live_line(1234.4, 2, 1500, Duration::from_secs(3)).contains("p99 so far 1.50 ms"));
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
