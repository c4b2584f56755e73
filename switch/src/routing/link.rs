//! One upstream link (SPEC §6): a persistent ISO 8583 client connection from this (acquiring)
//! switch to an issuer host, on which we are a registered *station*.
//!
//! The link task connects to the primary endpoint (then the backups, in turn), signs on as the
//! station, obtains the link's TPK and TAK (from the store when another process of this switch
//! already exchanged them, else by key exchange under the shared TMK), echoes every
//! `heartbeat_interval`, and on any failure drops the connection and reconnects with capped,
//! jittered exponential backoff ([`super::backoff`]). Requests from many tasks share the
//! connection: each carries a STAN from a block reserved in the store (unique across every
//! process of this switch, since they all sign on as the same station) and its answer is matched
//! by (field 41, field 11). A request without an answer within `timeout` fails; the caller
//! decides whether that needs a reversal advice.
//!
//! Network management speaks profile v2 (SPEC §3): every 0800 the link sends (sign-on, echo,
//! key change, sign-off) and every 0810 it answers is MACed under the station's K_NM, which the
//! HSM derives from the shared TMK; the issuer's 0810s must verify under it too, so a link can
//! neither be hijacked nor be fed keys by anyone who does not hold the TMK.
//!
//! Hand-written rather than a generic client: the protocol (framing, sign-on, key exchange,
//! MAC on every financial message) is our core, and no crate speaks this profile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::ReconnectBackoff;
use super::breaker::{BreakerConfig, CircuitBreaker};
use crate::crypto::{ClearKey, Hsm, KeyCheckValue};
use crate::domain::{KeyOwner, KeyType, TerminalId, WrappedKey};
use crate::iso8583::fields;
use crate::iso8583::{Message, Mti, Packager, decode_frame, encode_frame};
use crate::metrics::Metrics;
use crate::settings::{ClientTlsSettings, UpstreamSettings};
use crate::store::{LinkKeys, Store};
use crate::tls::{NetStream, TlsClient};

/// STANs reserved from the store at a time. One reservation per thousand requests costs one
/// round trip; a crash wastes at most this many STANs of the million.
const STAN_BLOCK: u32 = 1000;

/// Largest frame accepted from an issuer.
const MAX_FRAME: usize = 65_535;

/// Link keys older than this are exchanged again at the next connect.
const KEY_REFRESH: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Why a request on the link got no usable answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// The circuit breaker is open: failing fast, nothing was sent.
    #[error("upstream {0}: circuit open")]
    CircuitOpen(String),
    /// The link is not connected and signed on: nothing was sent.
    #[error("upstream {0}: link down")]
    Down(String),
    /// Sent, but no answer within the timeout: the issuer may or may not have acted on it.
    #[error("upstream {0}: no answer within {1:?}")]
    Timeout(String, Duration),
    /// Sent, then the connection was lost before the answer: as uncertain as a timeout.
    #[error("upstream {0}: connection lost before the answer")]
    ConnectionLost(String),
    /// An answer came but its MAC does not verify: it cannot be trusted, as if none came.
    #[error("upstream {0}: answer MAC does not verify")]
    BadMac(String),
    /// The message could not be built, or the store could not give a STAN: nothing was sent.
    #[error("upstream {0}: failed to prepare the message: {1}")]
    Local(String, String),
}

impl LinkError {
    /// Whether the request may have reached the issuer (and been acted on) without an answer.
    pub fn maybe_delivered(&self) -> bool {
        matches!(
            self,
            LinkError::Timeout(..) | LinkError::ConnectionLost(_) | LinkError::BadMac(_)
        )
    }
}

/// An issuer's answer.
#[derive(Debug, Clone)]
pub struct LinkAnswer {
    /// The decoded answer.
    pub message: Message,
}

impl LinkAnswer {
    /// Field 39.
    pub fn code(&self) -> &str {
        self.message.get_str(fields::RESPONSE_CODE).unwrap_or("")
    }
}

/// Answers waited for on one connection, by (field 41, field 11).
type Pending = Mutex<HashMap<(String, String), oneshot::Sender<LinkAnswer>>>;

/// The key a link message is MACed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkMac {
    /// Financial messages and advices: the link TAK.
    Tak,
    /// Network management (0800/0810): the station's K_NM, derived from the shared TMK.
    NetworkManagement,
}

/// What the read loop needs to authenticate the issuer's own 0800s and MAC its answers.
struct NmSigner {
    hsm: Arc<dyn Hsm>,
    packager: &'static Packager,
    tmk: WrappedKey,
    field41: String,
}

impl NmSigner {
    /// Whether a received message's MAC (the last field) verifies under K_NM.
    fn verify(&self, message: &Message, raw: &[u8]) -> bool {
        let Ok((input, mac)) = self.packager.received_mac(raw, message) else {
            return false;
        };
        matches!(
            self.hsm.verify_nm_mac(&self.tmk, &self.field41, input, mac),
            Ok(true)
        )
    }

    /// Packs `message` with its MAC under K_NM.
    fn pack(&self, mut message: Message) -> Option<Vec<u8>> {
        let field = crate::iso8583::mac_field_for(&message);
        message.set(field, vec![0u8; 8]);
        let input = self.packager.pack_mac_input(&message).ok()?;
        let mac = self
            .hsm
            .generate_nm_mac(&self.tmk, &self.field41, &input)
            .ok()?;
        message.set(field, mac);
        self.packager.pack(&message).ok()
    }
}

/// A connected, signed-on link.
struct Live {
    out: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    tpk: WrappedKey,
    tak: WrappedKey,
    lost: CancellationToken,
}

/// The block of STANs this process may use next.
#[derive(Debug, Default)]
struct StanBlock {
    next: u32,
    left: u32,
}

/// What a link needs from the switch around it.
#[derive(Clone)]
pub struct LinkDeps {
    /// Wire profile (the same as towards terminals).
    pub packager: &'static Packager,
    /// Cryptography.
    pub hsm: Arc<dyn Hsm>,
    /// STAN blocks and shared link keys.
    pub store: Store,
    /// `switchyard_upstream_up`, `switchyard_circuit_state`.
    pub metrics: Metrics,
}

impl std::fmt::Debug for LinkDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkDeps").finish_non_exhaustive()
    }
}

/// Why a link cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum LinkConfigError {
    /// Missing or unreadable TMK, bad station id, no endpoints.
    #[error("upstream {name}: {problem}")]
    Invalid {
        /// Upstream name.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// One upstream: its link, breaker and STAN block. Shared by every task that routes to it.
pub struct UpstreamLink {
    name: String,
    settings: UpstreamSettings,
    station: TerminalId,
    deps: LinkDeps,
    tmk: WrappedKey,
    breaker: Mutex<CircuitBreaker>,
    live: RwLock<Option<Arc<Live>>>,
    stans: tokio::sync::Mutex<StanBlock>,
    rekey: AtomicBool,
    /// Last published `up * 4 + circuit state`, so the gauges are set only on a change.
    published: AtomicI64,
    /// When the keys this process uses last were exchanged (by it or another process).
    keys_exchanged_at: Mutex<Option<chrono::DateTime<Utc>>>,
}

impl std::fmt::Debug for UpstreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLink")
            .field("name", &self.name)
            .field("station", &self.station)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl UpstreamLink {
    /// Builds the link: reads the TMK file and wraps the TMK under the LMK. Does not connect.
    pub fn new(settings: UpstreamSettings, deps: LinkDeps) -> Result<Arc<Self>, LinkConfigError> {
        let invalid = |problem: String| LinkConfigError::Invalid {
            name: settings.name.clone(),
            problem,
        };
        if settings.endpoints.is_empty() {
            return Err(invalid(
                "endpoints: at least one host:port is required".into(),
            ));
        }
        let station = TerminalId::new(settings.station_id.clone())
            .map_err(|e| invalid(format!("station_id: {e}")))?;
        let path = settings.tmk_file.as_ref().ok_or_else(|| {
            invalid(
                "tmk_file is required: a file with the TMK shared with the issuer, in hex".into(),
            )
        })?;
        let clear = ClearKey::from_hex_file(path)
            .map_err(|e| invalid(format!("tmk_file {}: {e}", path.display())))?;
        let (tmk, _) = deps
            .hsm
            .import_clear_key(
                KeyType::Tmk,
                clear,
                &KeyOwner::Upstream(settings.name.clone()),
            )
            .map_err(|e| invalid(format!("tmk_file {}: {e}", path.display())))?;
        let breaker = CircuitBreaker::new(BreakerConfig::from(&settings.circuit_breaker));
        let link = Arc::new(Self {
            name: settings.name.clone(),
            station,
            tmk,
            breaker: Mutex::new(breaker),
            live: RwLock::new(None),
            stans: tokio::sync::Mutex::new(StanBlock::default()),
            rekey: AtomicBool::new(false),
            published: AtomicI64::new(-1),
            keys_exchanged_at: Mutex::new(None),
            settings,
            deps,
        });
        link.publish_state();
        Ok(link)
    }

    /// Upstream name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Our station id at the issuer.
    pub fn station(&self) -> &TerminalId {
        &self.station
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// Connected, signed on and holding keys.
    pub fn is_up(&self) -> bool {
        self.live.read().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Whether a request now would be sent: link up and the breaker not open. Drainers look at
    /// this before leasing, so an issuer outage does not burn advices' attempts.
    pub fn is_available(&self) -> bool {
        self.is_up() && self.lock_breaker().would_allow(Instant::now())
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.live.read().ok().and_then(|l| l.clone())
    }

    fn set_live(&self, live: Option<Arc<Live>>) {
        if let Ok(mut slot) = self.live.write() {
            *slot = live;
        }
        self.publish_state();
    }

    /// Sets `switchyard_upstream_up` and `switchyard_circuit_state` when either changed (not on
    /// every request: the label lookup allocates).
    fn publish_state(&self) {
        let up = i64::from(self.is_up());
        let state = self.lock_breaker().state().metric_value();
        if self.published.swap(up * 4 + state, Ordering::Relaxed) != up * 4 + state {
            self.deps.metrics.set_upstream(&self.name, up, state);
        }
    }

    /// Runs `f` on the breaker at the current instant, then publishes a changed state.
    fn with_breaker<T>(&self, f: impl FnOnce(&mut CircuitBreaker, Instant) -> T) -> T {
        let out = f(&mut self.lock_breaker(), Instant::now());
        self.publish_state();
        out
    }

    /// A fresh STAN for a message on this link (also used for advices when they are queued).
    pub async fn next_stan(&self) -> Result<String, LinkError> {
        let mut block = self.stans.lock().await;
        if block.left == 0 {
            let first = self
                .deps
                .store
                .reserve_stans(self.station.as_str(), STAN_BLOCK)
                .await
                .map_err(|e| LinkError::Local(self.name.clone(), e.to_string()))?;
            block.next = first;
            block.left = STAN_BLOCK;
        }
        let stan = block.next;
        block.next = if block.next >= 999_999 {
            1
        } else {
            block.next + 1
        };
        block.left -= 1;
        Ok(format!("{stan:06}"))
    }

    /// Sends a financial request or advice and waits for its answer, through the breaker.
    ///
    /// The caller sets the fields; the link sets 41 (station) and, unless already present,
    /// 7 (now) and 11 (a fresh STAN), and MACs the message under the link TAK. An answer coded
    /// `91`, `96`, `63` or `58`, a timeout or a lost connection count as failures; any other
    /// answer (even a decline) proves the issuer is up. After `63` (or an answer whose MAC does
    /// not verify) the link reconnects and exchanges keys again; after `58` (the issuer lost our
    /// session) it reconnects and signs on again.
    pub async fn request(&self, message: Message) -> Result<LinkAnswer, LinkError> {
        if !self.with_breaker(|b, now| b.try_acquire(now)) {
            return Err(LinkError::CircuitOpen(self.name.clone()));
        }
        let result = match self.current() {
            Some(live) => self.exchange(&live, message, LinkMac::Tak).await,
            None => Err(LinkError::Down(self.name.clone())),
        };
        let failed = match &result {
            Ok(answer) => match answer.code() {
                "63" => {
                    self.reconnect(true, "issuer refused our MAC; exchanging link keys again");
                    true
                }
                "58" => {
                    self.reconnect(false, "issuer says we are not signed on; signing on again");
                    true
                }
                code => matches!(code, "91" | "96"),
            },
            Err(LinkError::BadMac(_)) => {
                self.reconnect(
                    true,
                    "issuer answer MAC does not verify; exchanging link keys again",
                );
                true
            }
            Err(LinkError::Local(..)) => false,
            Err(_) => true,
        };
        self.with_breaker(|b, now| {
            if failed {
                b.record_failure(now)
            } else {
                b.record_success(now)
            }
        });
        result
    }

    /// Counts a request that found the link down (before anything could be sent) as a failure
    /// in the breaker, as [`UpstreamLink::request`] would: a down link must open the circuit.
    pub fn report_down(&self) {
        self.with_breaker(|b, now| {
            if b.try_acquire(now) {
                b.record_failure(now);
            }
        });
    }

    /// Drops the current connection so the link task connects and signs on again; with `rekey`
    /// the next connect exchanges keys instead of reusing the stored ones.
    fn reconnect(&self, rekey: bool, why: &str) {
        if rekey {
            self.rekey.store(true, Ordering::SeqCst);
        }
        if let Some(live) = self.current() {
            warn!(upstream = %self.name, "{why}");
            live.lost.cancel();
        }
    }

    /// One request/answer on `live`: STAN, MAC, send, wait.
    async fn exchange(
        &self,
        live: &Live,
        mut message: Message,
        mac: LinkMac,
    ) -> Result<LinkAnswer, LinkError> {
        let local = |e: String| LinkError::Local(self.name.clone(), e);
        message.set_str(fields::TERMINAL_ID, &self.station.to_field41());
        if !message.has(fields::TRANSMISSION_DATE_TIME) {
            message.set_str(
                fields::TRANSMISSION_DATE_TIME,
                &Utc::now().format("%m%d%H%M%S").to_string(),
            );
        }
        if !message.has(fields::STAN) {
            let stan = self.next_stan().await?;
            message.set_str(fields::STAN, &stan);
        }
        let stan = message
            .get_str(fields::STAN)
            .unwrap_or_default()
            .to_string();
        let key = (self.station.as_str().to_string(), stan);
        let packager = self.deps.packager;
        let field = crate::iso8583::mac_field_for(&message);
        message.set(field, vec![0u8; 8]);
        let input = packager
            .pack_mac_input(&message)
            .map_err(|e| local(e.to_string()))?;
        let code = match mac {
            LinkMac::Tak => self.deps.hsm.generate_mac(&live.tak, &input),
            LinkMac::NetworkManagement => {
                self.deps
                    .hsm
                    .generate_nm_mac(&self.tmk, &self.station.to_field41(), &input)
            }
        }
        .map_err(|e| local(e.to_string()))?;
        message.set(field, code);
        let bytes = packager.pack(&message).map_err(|e| local(e.to_string()))?;

        let (tx, rx) = oneshot::channel();
        lock(&live.pending).insert(key.clone(), tx);
        if live.out.send(bytes).await.is_err() {
            lock(&live.pending).remove(&key);
            return Err(LinkError::ConnectionLost(self.name.clone()));
        }
        let timeout = self.settings.timeout;
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(LinkError::ConnectionLost(self.name.clone())),
            Err(_) => {
                lock(&live.pending).remove(&key);
                return Err(LinkError::Timeout(self.name.clone(), timeout));
            }
        };
        let authentic = matches!(answer.code(), "63" | "58")
            || self.answer_mac_ok(&live.tak, &answer.message, mac)
            || (mac == LinkMac::Tak && self.adopt_newer_keys(live, &answer.message).await);
        if !authentic {
            return Err(LinkError::BadMac(self.name.clone()));
        }
        Ok(answer)
    }

    /// The issuer MACs its answers under its ACTIVE TAK only (NIST SP 800-57). When another
    /// process of this acquirer exchanged newer link keys, ours is in its grace window at the
    /// issuer: it still verifies our requests, but the answers come under the newer TAK, which
    /// the store holds. If the answer verifies under the stored TAK, this connection takes the
    /// stored pair (the issuer's ACTIVE keys) and the answer is accepted.
    async fn adopt_newer_keys(&self, live: &Live, answer: &Message) -> bool {
        let Ok(Some(stored)) = self.deps.store.link_keys(&self.name).await else {
            return false;
        };
        if stored.tak == live.tak || !self.answer_mac_ok(&stored.tak, answer, LinkMac::Tak) {
            return false;
        }
        *lock(&self.keys_exchanged_at) = Some(stored.exchanged_at);
        let newer = Arc::new(Live {
            out: live.out.clone(),
            pending: live.pending.clone(),
            tpk: stored.tpk,
            tak: stored.tak,
            lost: live.lost.clone(),
        });
        if let Ok(mut slot) = self.live.write()
            && slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(&current.pending, &live.pending))
        {
            // still the same connection: requests from now on go out under the newer keys
            *slot = Some(newer);
        }
        info!(upstream = %self.name, "issuer answers under newer link keys; using them");
        true
    }

    /// Financial answers are MACed by the issuer under the link TAK (`tak`), network-management
    /// answers under K_NM (SPEC §3); declines for a format or MAC problem may come without one.
    fn answer_mac_ok(&self, tak: &WrappedKey, answer: &Message, mac_key: LinkMac) -> bool {
        let field = if answer.has(fields::MAC_SECONDARY) {
            128
        } else {
            64
        };
        let Some(mac) = answer.get(field).map(<[u8]>::to_vec) else {
            // answers to what the issuer could not authenticate or place carry no MAC
            return matches!(
                answer.get_str(fields::RESPONSE_CODE),
                Some("30" | "12" | "58")
            );
        };
        let mut unsigned = answer.clone();
        unsigned.set(field, vec![0u8; 8]);
        let Ok(input) = self.deps.packager.pack_mac_input(&unsigned) else {
            return false;
        };
        let verified = match mac_key {
            LinkMac::Tak => self.deps.hsm.verify_mac(tak, &input, &mac),
            LinkMac::NetworkManagement => {
                self.deps
                    .hsm
                    .verify_nm_mac(&self.tmk, &self.station.to_field41(), &input, &mac)
            }
        };
        matches!(verified, Ok(true))
    }

    /// The link task: connect, sign on, get keys, heartbeat; reconnect with backoff until
    /// `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = ReconnectBackoff::default();
        let mut endpoint = 0usize;
        loop {
            let addr = self.settings.endpoints[endpoint % self.settings.endpoints.len()].clone();
            let outcome = tokio::select! {
                _ = stop.cancelled() => break,
                outcome = self.session(&addr, &stop, &mut backoff) => outcome,
            };
            self.set_live(None);
            match outcome {
                Ok(()) if stop.is_cancelled() => break,
                Ok(()) => info!(upstream = %self.name, %addr, "link closed; reconnecting"),
                Err(err) => {
                    warn!(upstream = %self.name, %addr, error = %err, "link failed");
                    // the next attempt tries the next endpoint (primary, backup, primary, …)
                    endpoint = endpoint.wrapping_add(1);
                }
            }
            let delay = backoff.next_delay();
            debug!(upstream = %self.name, ?delay, "waiting before reconnecting");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.set_live(None);
        info!(upstream = %self.name, "link stopped");
    }

    /// One connection's life. `Ok` when it ended after having been up (reconnect to the same
    /// endpoint), `Err` when it failed before that.
    async fn session(
        &self,
        addr: &str,
        stop: &CancellationToken,
        backoff: &mut ReconnectBackoff,
    ) -> Result<(), String> {
        let stream = tokio::time::timeout(self.settings.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect timed out after {:?}", self.settings.timeout))?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let stream = match &self.settings.tls {
            None => NetStream::Plain(stream),
            Some(tls) => self.tls_connect(tls, addr, stream).await?,
        };
        let (reader, writer) = tokio::io::split(stream);
        let lost = CancellationToken::new();
        let pending: Arc<Pending> = Arc::new(Mutex::new(HashMap::new()));
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(1024);
        let writer_task = tokio::spawn(write_loop(writer, out_rx, lost.clone()));
        let signer = NmSigner {
            hsm: self.deps.hsm.clone(),
            packager: self.deps.packager,
            tmk: self.tmk.clone(),
            field41: self.station.to_field41(),
        };
        let reader_task = tokio::spawn(read_loop(
            reader,
            signer,
            pending.clone(),
            out_tx.clone(),
            lost.clone(),
        ));
        let result = self
            .establish(out_tx, pending, lost.clone(), stop, backoff)
            .await;
        lost.cancel();
        let _ = writer_task.await;
        let _ = reader_task.await;
        result
    }

    /// The TLS handshake of a link, within the link's `timeout`. The CA and client certificate
    /// files are read at every connect, so renewed files are used from the next connection on.
    async fn tls_connect(
        &self,
        tls: &ClientTlsSettings,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<NetStream, String> {
        let client = TlsClient::from_settings(tls).map_err(|e| e.to_string())?;
        let failed = |reason: &str| self.deps.metrics.tls_handshake_failed("upstream", reason);
        match tokio::time::timeout(self.settings.timeout, client.connect(addr, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => {
                failed(crate::tls::HandshakeFailure::classify(&err).as_str());
                Err(format!("TLS handshake: {err}"))
            }
            Err(_) => {
                failed("timeout");
                Err(format!(
                    "TLS handshake timed out after {:?}",
                    self.settings.timeout
                ))
            }
        }
    }

    async fn establish(
        &self,
        out: mpsc::Sender<Vec<u8>>,
        pending: Arc<Pending>,
        lost: CancellationToken,
        stop: &CancellationToken,
        backoff: &mut ReconnectBackoff,
    ) -> Result<(), String> {
        // Until keys are known, only unMACed network management flows.
        let mut live = Live {
            out,
            pending,
            tpk: WrappedKey::new(String::new()),
            tak: WrappedKey::new(String::new()),
            lost: lost.clone(),
        };
        let sign_on = self.network(&live, "001", &[]).await?;
        expect_approved(&sign_on, "sign-on")?;
        let keys = self.keys(&live).await?;
        live.tpk = keys.tpk;
        live.tak = keys.tak;
        let live = Arc::new(live);
        self.set_live(Some(live.clone()));
        backoff.reset();
        info!(upstream = %self.name, station = %self.station, "link up: signed on with keys");

        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // a clean goodbye; the answer does not matter
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.network(&live, "002", &[])).await;
                    return Ok(());
                }
                _ = lost.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    let echo = self.network(&live, "301", &[]).await;
                    match echo {
                        Ok(answer) if answer.code() == "00" => {}
                        Ok(answer) => {
                            warn!(upstream = %self.name, code = answer.code(), "echo refused; signing on again");
                            return Ok(());
                        }
                        Err(err) => {
                            warn!(upstream = %self.name, error = %err, "echo failed; reconnecting");
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// An 0800 with code 70 and extra fields, MACed under K_NM, outside the breaker.
    async fn network(
        &self,
        live: &Live,
        code: &str,
        fields: &[(u8, &str)],
    ) -> Result<LinkAnswer, String> {
        let mti = Mti::parse("0800").map_err(|e| e.to_string())?;
        let mut m = Message::new(mti);
        m.set_str(fields::NETWORK_CODE, code);
        for (n, v) in fields {
            m.set_str(*n, v);
        }
        self.exchange(live, m, LinkMac::NetworkManagement)
            .await
            .map_err(|e| format!("0800/{code}: {e}"))
    }

    /// The link keys: the ones this switch's processes share in the store when fresh, else a
    /// key exchange (161 + 162 per key type, as a terminal does) whose result is stored.
    ///
    /// After the issuer refused our MAC (`rekey`), keys another process stored since ours were
    /// obtained are tried first: several processes exchanging at once settle on the newest pair
    /// instead of taking turns replacing each other's keys.
    async fn keys(&self, live: &Live) -> Result<LinkKeys, String> {
        let forced = self.rekey.swap(false, Ordering::SeqCst);
        let ours = *lock(&self.keys_exchanged_at);
        let stored = self
            .deps
            .store
            .link_keys(&self.name)
            .await
            .map_err(|e| format!("read link keys: {e}"))?;
        if let Some(keys) = stored {
            let fresh = Utc::now() - keys.exchanged_at < KEY_REFRESH;
            let newer = ours.is_none_or(|at| keys.exchanged_at > at);
            if fresh && (!forced || newer) {
                *lock(&self.keys_exchanged_at) = Some(keys.exchanged_at);
                return Ok(keys);
            }
        }
        let tpk = self.exchange_key(live, KeyType::Tpk).await?;
        let tak = self.exchange_key(live, KeyType::Tak).await?;
        let keys = LinkKeys {
            tpk,
            tak,
            exchanged_at: Utc::now(),
        };
        self.deps
            .store
            .save_link_keys(&self.name, &keys)
            .await
            .map_err(|e| format!("store link keys: {e}"))?;
        info!(upstream = %self.name, "link keys exchanged");
        *lock(&self.keys_exchanged_at) = Some(keys.exchanged_at);
        Ok(keys)
    }

    async fn exchange_key(&self, live: &Live, kt: KeyType) -> Result<WrappedKey, String> {
        let answer = self.network(live, "161", &[(48, kt.as_str())]).await?;
        expect_approved(&answer, "key change 161")?;
        let block = answer
            .message
            .get_str(fields::KEY_BLOCK)
            .ok_or("key change 161: answer without a key block (120)")?;
        let kcv = answer
            .message
            .get_str(fields::KCV)
            .ok_or("key change 161: answer without a KCV (122)")?
            .parse::<KeyCheckValue>()
            .map_err(|e| format!("key change 161: field 122: {e}"))?;
        let (key, computed) = self
            .deps
            .hsm
            .import_under_tmk(&self.tmk, kt, block, &kcv)
            .map_err(|e| format!("key change 161: {e}"))?;
        let confirm = self
            .network(
                live,
                "162",
                &[(48, kt.as_str()), (122, &computed.to_string())],
            )
            .await?;
        expect_approved(&confirm, "key change 162")?;
        Ok(key)
    }

    /// Translates a terminal's PIN block to the link's TPK inside the HSM.
    pub fn translate_pin(
        &self,
        from_tpk: &WrappedKey,
        pan: &str,
        block: &[u8; 16],
    ) -> Result<[u8; 16], LinkError> {
        let live = self
            .current()
            .ok_or_else(|| LinkError::Down(self.name.clone()))?;
        self.deps
            .hsm
            .translate_pin(from_tpk, &live.tpk, pan, block)
            .map_err(|e| LinkError::Local(self.name.clone(), e.to_string()))
    }
}

fn expect_approved(answer: &LinkAnswer, what: &str) -> Result<(), String> {
    match answer.code() {
        "00" => Ok(()),
        code => Err(format!("{what} refused with {code:?}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes queued frames, several per system call when they pile up.
async fn write_loop(
    mut writer: tokio::io::WriteHalf<NetStream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    lost: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let first = tokio::select! {
            _ = lost.cancelled() => break,
            frame = rx.recv() => match frame { Some(f) => f, None => break },
        };
        buf.clear();
        if encode_frame(&first, &mut buf).is_err() {
            continue;
        }
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(frame) => {
                    let _ = encode_frame(&frame, &mut buf);
                }
                Err(_) => break,
            }
        }
        if writer.write_all(&buf).await.is_err() {
            break;
        }
    }
    lost.cancel();
    let _ = writer.shutdown().await;
}

/// Reads frames: answers go to whoever waits for their (41, 11); the issuer's own 0800s are
/// answered here under K_NM (echo approved, anything else `12`; a MAC that does not verify `63`).
async fn read_loop(
    mut reader: tokio::io::ReadHalf<NetStream>,
    signer: NmSigner,
    pending: Arc<Pending>,
    out: mpsc::Sender<Vec<u8>>,
    lost: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(8192);
    'conn: loop {
        loop {
            match decode_frame(&mut buf, MAX_FRAME) {
                Ok(Some(frame)) => {
                    let Ok(message) = signer.packager.unpack(&frame) else {
                        warn!("unparseable frame from the issuer; dropped");
                        continue;
                    };
                    if message.mti().as_str() == "0800" {
                        if let Some(bytes) = answer_issuer_request(&signer, &message, &frame) {
                            let _ = out.send(bytes).await;
                        }
                        continue;
                    }
                    let key = (
                        message
                            .get_str(fields::TERMINAL_ID)
                            .unwrap_or("")
                            .trim_end()
                            .to_string(),
                        message.get_str(fields::STAN).unwrap_or("").to_string(),
                    );
                    match lock(&pending).remove(&key) {
                        Some(waiter) => {
                            let _ = waiter.send(LinkAnswer { message });
                        }
                        None => debug!(
                            mti = message.mti().as_str(),
                            "answer nobody waits for (late or unknown STAN); dropped"
                        ),
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    warn!(error = %err, "bad framing from the issuer; dropping the link");
                    break 'conn;
                }
            }
        }
        let read = tokio::select! {
            _ = lost.cancelled() => break,
            read = reader.read_buf(&mut buf) => read,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    lost.cancel();
    // dropping the waiters tells every in-flight request the connection is gone
    lock(&pending).clear();
}

fn answer_issuer_request(signer: &NmSigner, request: &Message, raw: &[u8]) -> Option<Vec<u8>> {
    let authentic = signer.verify(request, raw);
    let code = match request.get_str(fields::NETWORK_CODE) {
        _ if !authentic => "63",
        Some("301") => "00",
        _ => "12",
    };
    let mut answer = Message::new(request.mti().response()?);
    for f in [
        fields::TRANSMISSION_DATE_TIME,
        fields::STAN,
        fields::TERMINAL_ID,
        fields::NETWORK_CODE,
    ] {
        if let Some(v) = request.get(f) {
            answer.set(f, v);
        }
    }
    answer.set_str(fields::RESPONSE_CODE, code);
    if authentic {
        signer.pack(answer)
    } else {
        warn!("an 0800 from the issuer whose MAC does not verify; answered 63");
        signer.packager.pack(&answer).ok()
    }
}
