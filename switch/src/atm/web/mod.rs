//! `switchyard-atm web` (SPEC §7a): a browser ATM that is a real terminal of a switch. This
//! module is the I/O shell: it owns the terminal's connection ([`AtmClient`], which makes the
//! PIN blocks and MACs in this process), carries out what the pure [`machine::AtmMachine`] asks
//! for, keeps the ISO 8583 panel ([`journal`]), answers key changes the switch pushes while the
//! ATM is idle, and serves the page plus a small JSON/SSE API on loopback:
//!
//! - `GET /` the page; `GET /api/state` everything the page renders;
//! - `POST /api/key` `{"key":"5"}` a key press (see [`machine::Key`]);
//! - `POST /api/terminal/{sign-on|sign-off|key-exchange|reverse-last}` the side panel's buttons;
//! - `GET /api/events` server-sent events, one `state` event per change (key pushes included);
//! - `GET /healthz` for probes.

pub mod journal;
pub mod machine;
pub mod setup;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::journal::ExchangeView;
use self::machine::{AtmMachine, Key, MachineView, Outcome, TestCard, Txn};
use super::{AtmClient, AtmError, CardInput, Initiator, expect_code};
use crate::crypto::TerminalKeys;
use crate::domain::{KeyType, TerminalId};
use crate::iso8583::{Message, Packager};

/// The page: plain HTML, CSS and JS, no build step.
const PAGE: &str = include_str!("page.html");
/// Exchanges the panel keeps.
const JOURNAL_LEN: usize = 60;
/// An idle terminal sends an echo this often, well inside the switch's idle timeout (90 s).
const ECHO_EVERY: Duration = Duration::from_secs(30);
/// How long the idle loop listens for a pushed key change before letting a key press in.
const LISTEN_SLICE: Duration = Duration::from_millis(200);
/// Reconnect attempts while the terminal should be online but is not.
const RECONNECT_EVERY: Duration = Duration::from_secs(3);

/// What the web ATM runs as.
#[derive(Debug)]
pub struct WebAtmConfig {
    /// The switch's ISO 8583 address.
    pub iso_addr: String,
    /// This terminal.
    pub terminal: TerminalId,
    /// Its keys (the TMK at least).
    pub keys: TerminalKeys,
    /// Wire profile of the switch.
    pub packager: &'static Packager,
    /// Cards the card slot offers.
    pub cards: Vec<TestCard>,
}

/// The terminal's link to the switch. Locked for the whole of an exchange, so key presses,
/// panel buttons and the idle listener take turns on the one connection.
#[derive(Debug)]
struct Link {
    client: Option<AtmClient>,
    /// The keys while there is no client (before the first connect, after a lost connection).
    spare_keys: Option<TerminalKeys>,
    /// Whether the operator wants the terminal signed on (a sign-off button press says no).
    want_online: bool,
    signed_on: bool,
    last_traffic: Instant,
    last_attempt: Option<Instant>,
    /// The last approved withdrawal's request, which a reversal names.
    last_withdrawal: Option<Message>,
}

/// What the side panel shows besides the exchanges.
#[derive(Debug, Default)]
struct Panel {
    journal: VecDeque<ExchangeView>,
    seq: u64,
    connected: bool,
    signed_on: bool,
    kcv: [Option<String>; 3],
    events: VecDeque<String>,
    notice: Option<String>,
}

#[derive(Debug)]
struct Shared {
    iso_addr: String,
    terminal: TerminalId,
    packager: &'static Packager,
    machine: Mutex<AtmMachine>,
    link: tokio::sync::Mutex<Link>,
    panel: Mutex<Panel>,
    changes: broadcast::Sender<()>,
    /// Bumped on every change, so the page can drop a state older than one it has shown (a
    /// POST's answer and an SSE event may arrive in either order).
    version: AtomicU64,
}

/// A running web ATM (cheap to clone).
#[derive(Debug, Clone)]
pub struct WebAtm {
    shared: Arc<Shared>,
}

/// The whole state the page renders.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateView {
    /// Increases with every change.
    pub version: u64,
    /// The ATM front.
    pub atm: MachineView,
    /// Terminal status and keys.
    pub terminal: TerminalView,
    /// Newest first.
    pub exchanges: Vec<ExchangeView>,
    /// Key and link events, newest first.
    pub events: Vec<String>,
    /// Outcome of the last panel button.
    pub notice: Option<String>,
}

/// The terminal part of the panel.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminalView {
    /// Terminal id.
    pub id: String,
    /// Switch address.
    pub switch: String,
    /// TCP connection up.
    pub connected: bool,
    /// Signed on (0800/001 answered 00).
    pub signed_on: bool,
    /// KCVs the terminal holds: TMK, TPK, TAK (never the keys).
    pub keys: Vec<KeyView>,
}

/// A key the terminal holds.
#[derive(Debug, Serialize)]
pub struct KeyView {
    /// TMK, TPK or TAK.
    #[serde(rename = "type")]
    pub key_type: &'static str,
    /// Its KCV, or `None` when not loaded.
    pub kcv: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> String {
    chrono::Utc::now().format("%H:%M:%S").to_string()
}

impl WebAtm {
    /// A web ATM for `config`; call [`WebAtm::serve`] to run it.
    pub fn new(config: WebAtmConfig) -> Self {
        let (changes, _) = broadcast::channel(64);
        let kcv = [KeyType::Tmk, KeyType::Tpk, KeyType::Tak]
            .map(|kt| config.keys.kcv(kt).map(|k| k.to_string()));
        WebAtm {
            shared: Arc::new(Shared {
                iso_addr: config.iso_addr,
                machine: Mutex::new(AtmMachine::new(config.cards, config.terminal.as_str())),
                terminal: config.terminal,
                packager: config.packager,
                link: tokio::sync::Mutex::new(Link {
                    client: None,
                    spare_keys: Some(config.keys),
                    want_online: true,
                    signed_on: false,
                    last_traffic: Instant::now(),
                    last_attempt: None,
                    last_withdrawal: None,
                }),
                panel: Mutex::new(Panel {
                    kcv,
                    ..Panel::default()
                }),
                changes,
                version: AtomicU64::new(0),
            }),
        }
    }

    /// Serves the page on `listener` and keeps the terminal signed on until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let idle = tokio::spawn(self.clone().idle_loop(shutdown.clone()));
        let router = Router::new()
            .route("/", get(page))
            .route("/healthz", get(|| async { "ok" }))
            .route("/api/state", get(state))
            .route("/api/key", post(press))
            .route("/api/terminal/{action}", post(terminal_action))
            .route("/api/events", get(events))
            .with_state(self.clone());
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await;
        shutdown.cancel();
        let _ = idle.await;
        // Sign off cleanly, as an ATM being switched off does.
        let mut link = self.shared.link.lock().await;
        let signed_on = link.signed_on;
        if let Some(client) = link.client.as_mut()
            && signed_on
        {
            let _ = client.network("002").await;
        }
        result
    }

    /// Everything the page renders.
    pub fn snapshot(&self) -> StateView {
        let version = self.shared.version.load(Ordering::SeqCst);
        let atm = lock(&self.shared.machine).view();
        let panel = lock(&self.shared.panel);
        StateView {
            version,
            atm,
            terminal: TerminalView {
                id: self.shared.terminal.to_string(),
                switch: self.shared.iso_addr.clone(),
                connected: panel.connected,
                signed_on: panel.signed_on,
                keys: ["TMK", "TPK", "TAK"]
                    .into_iter()
                    .zip(panel.kcv.iter())
                    .map(|(key_type, kcv)| KeyView {
                        key_type,
                        kcv: kcv.clone(),
                    })
                    .collect(),
            },
            exchanges: panel.journal.iter().rev().cloned().collect(),
            events: panel.events.iter().rev().cloned().collect(),
            notice: panel.notice.clone(),
        }
    }

    fn changed(&self) {
        self.shared.version.fetch_add(1, Ordering::SeqCst);
        let _ = self.shared.changes.send(());
    }

    fn event(&self, text: String) {
        let mut panel = lock(&self.shared.panel);
        panel.events.push_back(format!("{} {text}", now()));
        while panel.events.len() > 20 {
            panel.events.pop_front();
        }
    }

    /// Moves what the client recorded into the panel, with the link status and key KCVs.
    fn sync_panel(&self, link: &mut Link) {
        if let Some(client) = link.client.as_mut() {
            self.push_exchanges(client.take_exchanges());
        }
        let keys = link
            .client
            .as_ref()
            .map(|c| &c.keys)
            .or(link.spare_keys.as_ref());
        let kcv = keys.map(|k| {
            [KeyType::Tmk, KeyType::Tpk, KeyType::Tak].map(|kt| k.kcv(kt).map(|v| v.to_string()))
        });
        let mut panel = lock(&self.shared.panel);
        panel.connected = link.client.is_some();
        panel.signed_on = link.signed_on;
        if let Some(kcv) = kcv {
            panel.kcv = kcv;
        }
    }

    fn push_exchanges(&self, exchanges: Vec<super::Exchange>) {
        let mut pushes = Vec::new();
        {
            let mut panel = lock(&self.shared.panel);
            for x in &exchanges {
                panel.seq += 1;
                let view = journal::view(panel.seq, x);
                if x.initiator == Initiator::Switch {
                    pushes.push(format!(
                        "switch pushed a new {} (KCV {}); terminal answered {}",
                        x.request.get_str(48).unwrap_or("key"),
                        x.request.get_str(122).unwrap_or("?"),
                        match x.answer.as_ref().and_then(|a| a.get_str(39)) {
                            Some("00") => "00: installed, the switch activates it",
                            _ => "63: refused, key not installed",
                        }
                    ));
                }
                panel.journal.push_back(view);
            }
            while panel.journal.len() > JOURNAL_LEN {
                panel.journal.pop_front();
            }
        }
        for p in pushes {
            self.event(p);
        }
    }

    /// Connects and signs on if the terminal should be online and is not; fetches working
    /// keys the terminal does not hold yet.
    async fn ensure_online(&self, link: &mut Link) -> Result<(), AtmError> {
        if link.client.is_some() && link.signed_on {
            return Ok(());
        }
        link.last_attempt = Some(Instant::now());
        if link.client.is_none() {
            let keys = link
                .spare_keys
                .take()
                .ok_or_else(|| AtmError::Protocol("terminal keys missing".into()))?;
            match AtmClient::connect(
                &self.shared.iso_addr,
                self.shared.terminal.clone(),
                keys.clone(),
                self.shared.packager,
            )
            .await
            {
                Ok(mut client) => {
                    client.record_exchanges();
                    link.client = Some(client);
                    self.event(format!("connected to {}", self.shared.iso_addr));
                }
                Err(e) => {
                    link.spare_keys = Some(keys);
                    return Err(e);
                }
            }
        }
        let result = self.sign_on_and_fetch_keys(link).await;
        if let Err(e) = &result {
            self.lost(link, e);
        }
        result
    }

    async fn sign_on_and_fetch_keys(&self, link: &mut Link) -> Result<(), AtmError> {
        let client = link.client.as_mut().ok_or(AtmError::Closed)?;
        let answer = client.network("001").await?;
        expect_code(&answer, "00")?;
        link.signed_on = true;
        link.last_traffic = Instant::now();
        self.event("signed on (0800/001 → 00)".into());
        for kt in [KeyType::Tpk, KeyType::Tak] {
            if client.keys.kcv(kt).is_none() {
                let kcv = client.exchange_key(kt).await?;
                self.event(format!("{kt} exchanged, KCV {kcv} now ACTIVE"));
            }
        }
        Ok(())
    }

    /// After a transport failure the connection's state is unknown: drop it, keep the keys.
    fn lost(&self, link: &mut Link, error: &AtmError) {
        if matches!(
            error,
            AtmError::Io(_) | AtmError::Closed | AtmError::Timeout(_) | AtmError::Codec(_)
        ) && let Some(mut client) = link.client.take()
        {
            // keep what was recorded before the failure
            self.push_exchanges(client.take_exchanges());
            link.spare_keys = Some(client.keys);
            link.signed_on = false;
            self.event(format!("link lost: {error}"));
        }
    }

    /// Carries out a customer transaction with the card in the slot and the PIN entered.
    async fn authorize(&self, txn: Txn) -> Outcome {
        let card = {
            let machine = lock(&self.shared.machine);
            machine.card_and_pin().map(|(card, pin)| CardInput {
                pan: card.pan.clone(),
                expiry: card.expiry.clone(),
                pin: pin.to_string(),
                currency: card.currency.clone(),
            })
        };
        let Some(card) = card else {
            return Outcome::NoAnswer;
        };
        let mut link = self.shared.link.lock().await;
        let outcome = self.authorize_on(&mut link, txn, &card).await;
        self.sync_panel(&mut link);
        outcome
    }

    async fn authorize_on(&self, link: &mut Link, txn: Txn, card: &CardInput) -> Outcome {
        if link.want_online
            && let Err(e) = self.ensure_online(link).await
        {
            self.event(format!("switch unreachable: {e}"));
            return Outcome::NoAnswer;
        }
        let Some(client) = link.client.as_mut() else {
            return Outcome::NoAnswer;
        };
        link.last_traffic = Instant::now();
        let result = match txn {
            Txn::Balance => client.balance(card).await,
            Txn::Withdraw(amount) => match client.withdraw(card, amount).await {
                Ok((request, answer)) => {
                    if answer.get_str(39) == Some("00") {
                        link.last_withdrawal = Some(request);
                    }
                    Ok(answer)
                }
                Err(e) => Err(e),
            },
            Txn::Reverse(_) => match link.last_withdrawal.take() {
                Some(original) => {
                    let answer = client.reverse(&original).await;
                    if !matches!(&answer, Ok(a) if a.get_str(39) == Some("00")) {
                        link.last_withdrawal = Some(original);
                    }
                    answer
                }
                None => Err(AtmError::Protocol("no withdrawal to reverse".into())),
            },
        };
        match result {
            Ok(answer) => outcome_of(&answer),
            Err(e) => {
                self.lost(link, &e);
                Outcome::NoAnswer
            }
        }
    }

    /// A panel button.
    async fn operate(&self, action: &str) -> Result<String, String> {
        let mut link = self.shared.link.lock().await;
        let result = self.operate_on(&mut link, action).await;
        self.sync_panel(&mut link);
        result
    }

    async fn operate_on(&self, link: &mut Link, action: &str) -> Result<String, String> {
        link.last_traffic = Instant::now();
        match action {
            "sign-on" => {
                link.want_online = true;
                link.signed_on = false;
                self.ensure_online(link).await.map_err(|e| e.to_string())?;
                Ok("signed on".into())
            }
            "sign-off" => {
                link.want_online = false;
                let client = link.client.as_mut().ok_or("not connected")?;
                let answer = client.network("002").await.map_err(|e| e.to_string())?;
                link.signed_on = false;
                self.event(format!(
                    "signed off (0800/002 → {})",
                    answer.get_str(39).unwrap_or("?")
                ));
                Ok("signed off".into())
            }
            "key-exchange" => {
                self.ensure_online(link).await.map_err(|e| e.to_string())?;
                let client = link.client.as_mut().ok_or("not connected")?;
                let mut done = Vec::new();
                for kt in [KeyType::Tpk, KeyType::Tak] {
                    let kcv = client.exchange_key(kt).await.map_err(|e| e.to_string())?;
                    self.event(format!("{kt} exchanged, KCV {kcv} now ACTIVE"));
                    done.push(format!("{kt} {kcv}"));
                }
                Ok(format!("new keys active: {}", done.join(", ")))
            }
            "reverse-last" => {
                let original = link
                    .last_withdrawal
                    .clone()
                    .ok_or("no approved withdrawal to reverse")?;
                let client = link.client.as_mut().ok_or("not connected")?;
                let answer = client.reverse(&original).await.map_err(|e| e.to_string())?;
                let code = answer.get_str(39).unwrap_or("?").to_string();
                if code == "00" {
                    link.last_withdrawal = None;
                }
                Ok(format!(
                    "0400 reversal → {code} ({})",
                    journal::response_text(&code)
                ))
            }
            other => Err(format!("unknown action {other:?}")),
        }
    }

    /// While nobody presses a key: listen for key changes the switch pushes, send an echo
    /// when the line has been quiet, reconnect after a lost connection.
    async fn idle_loop(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            let mut link = self.shared.link.lock().await;
            let before = lock(&self.shared.panel).seq;
            let was_connected = link.client.is_some();
            if link.client.is_none() || (link.want_online && !link.signed_on) {
                let due = link
                    .last_attempt
                    .is_none_or(|t| t.elapsed() >= RECONNECT_EVERY);
                if link.want_online && due {
                    if let Err(e) = self.ensure_online(&mut link).await {
                        let mut panel = lock(&self.shared.panel);
                        panel.notice = Some(format!("switch unreachable, retrying: {e}"));
                    }
                    self.sync_panel(&mut link);
                    self.changed();
                }
                if link.client.is_none() {
                    drop(link);
                    tokio::time::sleep(LISTEN_SLICE).await;
                    continue;
                }
            }
            let echo_due = link.signed_on && link.last_traffic.elapsed() >= ECHO_EVERY;
            let Some(client) = link.client.as_mut() else {
                continue;
            };
            let result = if echo_due {
                client.network("301").await.map(|_| ())
            } else {
                match client.wait_for_key_push(LISTEN_SLICE).await {
                    Ok(_) | Err(AtmError::Timeout(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            if echo_due {
                link.last_traffic = Instant::now();
            }
            if let Err(e) = result {
                self.lost(&mut link, &e);
            }
            self.sync_panel(&mut link);
            let after = lock(&self.shared.panel).seq;
            if after != before || was_connected != link.client.is_some() {
                self.changed();
            }
        }
    }
}

fn outcome_of(answer: &Message) -> Outcome {
    match answer.get_str(39) {
        Some("00") => {
            let (ledger, available) = balances(answer);
            Outcome::Approved {
                auth_code: answer.get_str(38).map(str::to_string),
                rrn: answer.get_str(37).map(str::to_string),
                available,
                ledger,
            }
        }
        Some(code) => Outcome::Declined(code.to_string()),
        None => Outcome::NoAnswer,
    }
}

/// Ledger (`01`) and available (`02`) amounts of field 54's 20-character entries.
fn balances(answer: &Message) -> (Option<i64>, Option<i64>) {
    let Some(f54) = answer.get_str(54) else {
        return (None, None);
    };
    let (mut ledger, mut available) = (None, None);
    for entry in f54.as_bytes().chunks(20) {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        if entry.len() != 20 {
            continue;
        }
        let Ok(amount) = entry[8..].parse::<i64>() else {
            continue;
        };
        let amount = if &entry[7..8] == "D" { -amount } else { amount };
        match &entry[2..4] {
            "01" => ledger = Some(amount),
            "02" => available = Some(amount),
            _ => {}
        }
    }
    (ledger, available)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(PAGE),
    )
}

async fn state(State(atm): State<WebAtm>) -> Json<StateView> {
    Json(atm.snapshot())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPress {
    key: String,
}

fn problem(status: StatusCode, detail: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({"type": "about:blank", "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail})),
    )
        .into_response()
}

async fn press(State(atm): State<WebAtm>, Json(body): Json<KeyPress>) -> Response {
    let key: Key = match body.key.parse() {
        Ok(key) => key,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let txn = lock(&atm.shared.machine).press(key);
    atm.changed();
    if let Some(txn) = txn {
        // Run to completion even if the browser goes away, so the machine never stays in
        // "processing" with an answer nobody fed back.
        let worker = atm.clone();
        let task = tokio::spawn(async move {
            let outcome = worker.authorize(txn).await;
            lock(&worker.shared.machine).complete(outcome);
            worker.changed();
        });
        if task.await.is_err() {
            lock(&atm.shared.machine).complete(Outcome::NoAnswer);
            atm.changed();
        }
    }
    Json(atm.snapshot()).into_response()
}

async fn terminal_action(State(atm): State<WebAtm>, Path(action): Path<String>) -> Response {
    if !matches!(
        action.as_str(),
        "sign-on" | "sign-off" | "key-exchange" | "reverse-last"
    ) {
        return problem(
            StatusCode::NOT_FOUND,
            "actions are sign-on, sign-off, key-exchange and reverse-last".into(),
        );
    }
    let worker = atm.clone();
    let result = tokio::spawn(async move { worker.operate(&action).await })
        .await
        .unwrap_or_else(|e| Err(format!("action failed: {e}")));
    lock(&atm.shared.panel).notice = Some(match result {
        Ok(text) => text,
        Err(text) => format!("failed: {text}"),
    });
    atm.changed();
    Json(atm.snapshot()).into_response()
}

async fn events(State(atm): State<WebAtm>) -> impl IntoResponse {
    let receiver = atm.shared.changes.subscribe();
    let first = true;
    let stream = futures::stream::unfold(
        (atm, receiver, first),
        |(atm, mut receiver, first)| async move {
            if !first {
                match receiver.recv().await {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
            let data = serde_json::to_string(&atm.snapshot()).unwrap_or_else(|_| "{}".into());
            let event: Result<Event, Infallible> = Ok(Event::default().event("state").data(data));
            Some((event, (atm, receiver, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::Mti;

    #[test]
    fn balances_of_field_54() {
        let mut m = Message::new(Mti::parse("0210").unwrap());
        m.set_str(54, "0001360C0000005000000002360C000000450000");
        assert_eq!(balances(&m), (Some(500_000), Some(450_000)));
        m.set_str(54, "0001360D000000000100");
        assert_eq!(balances(&m), (Some(-100), None));
        m.set_str(54, "garbage");
        assert_eq!(balances(&m), (None, None));
    }

    #[test]
    fn outcomes_follow_field_39() {
        let mut m = Message::new(Mti::parse("0210").unwrap());
        m.set_str(39, "55");
        assert_eq!(outcome_of(&m), Outcome::Declined("55".into()));
        m.set_str(39, "00");
        m.set_str(38, "654321");
        assert!(
            matches!(outcome_of(&m), Outcome::Approved { auth_code: Some(c), .. } if c == "654321")
        );
    }
}
