//! Fuzz harness (feature `fuzzing`): drives [`crate::txn::handle_frame`] — the whole transaction
//! layer, over a real SQLite store — from untrusted bytes, and checks what must hold whatever
//! the bytes are.
//!
//! One harness serves both the `cargo-fuzz` target (`switch/fuzz`) and the proptest of the
//! normal test run (`switch/tests/fuzz_harness.rs`): both hand [`Harness::run`] raw bytes.
//! The bytes are read as *structured choices* through [`arbitrary::Unstructured`] — which
//! connection, which terminal, which MTI, processing code, card, amount, STAN, whether to MAC
//! correctly (TAK for financial messages, K_NM for network management), under an old key, a
//! wrong key or not at all, and whether to corrupt the frame after MACing — so a mutation of the
//! input still reaches the deep paths (authorization, PIN tries, duplicates, reversals, advices,
//! key exchange, server-initiated key pushes, sign-on replay) instead of dying at the MAC check.
//! Raw byte frames and replays of earlier frames are among the choices too.
//!
//! The harness plays the terminals: an ATM, a second ATM and an acquirer station, registered the
//! way the admin API registers them (TMK imported under the KEK, cards with a PVV made by the
//! HSM), with their working keys in clear on this side so it can MAC, encipher PINs and verify
//! the switch's answers. Every case starts from a copy of one template database on a tmpfs
//! (`/dev/shm` when there is one), so cases are independent and cheap.
//!
//! Checked after every frame ([`Violation`] otherwise):
//! - no panic (the caller sees one as a crash);
//! - an answer or a closed connection: a frame the switch answers gets a parseable message with
//!   the response MTI of the request and a response code of SPEC §3; a frame it does not answer
//!   closes the connection, unless it was not a request (an 0810, a response MTI);
//! - every MAC on an answer verifies under a key the terminal holds (its K_NM for 0810s, a TAK
//!   it was given for financial answers);
//! - a frame whose MAC cannot verify (missing, wrong, under the wrong key, or bytes changed
//!   after MACing) is never approved and changes nothing: no journal row, no balance, no PIN
//!   try, no key, no accepted sign-on, no session.
//!
//! And after every case: for every account, balance = opening balance − the approved,
//! unreversed withdrawals the journal holds for it (advices included); each account's daily
//! withdrawal total matches the journal too; at most one ACTIVE key per (terminal, key type).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use arbitrary::Unstructured;
use chrono::Utc;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::crypto::{ClearKey, ClearPin, Hsm, Kek, KeyCheckValue, Lmk, SoftHsm, TerminalKeys};
use crate::domain::{KeyOwner, KeyState, KeyType, ResponseCode, TerminalId};
use crate::health::Health;
use crate::iso8583::fields;
use crate::iso8583::{Message, Mti, Packager};
use crate::metrics::{Metrics, SwitchMetrics};
use crate::net::ConnState;
use crate::net::session::{OutboundFrame, SessionRegistry};
use crate::routing::{LinkDeps, Upstreams};
use crate::settings::Settings;
use crate::store::{
    self, AccountId, ConnectOptions, NewAccount, NewCard, NewKey, NewTerminal, Store, TerminalKind,
};
use crate::txn::SwitchContext;

/// Why the harness itself could not be set up (not a finding about the switch).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The template database or a case's copy of it.
    #[error("fuzz harness: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> HarnessError {
    move |e| HarnessError::Setup(format!("{what}: {e}"))
}

/// Something that must never happen, found by a fuzz input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {0}")]
pub struct Violation(pub String);

/// What one case did (for the proptest's coverage checks and for curiosity).
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Frames handed to `handle_frame`.
    pub frames: u32,
    /// Answers by MTI and response code, e.g. `"0210/00"`.
    pub answers: HashMap<String, u32>,
    /// Frames that closed their connection without an answer.
    pub closed: u32,
}

// Fixed test keys: the template database holds keys wrapped under this LMK, so every case must
// use the same one. Test material only, never a real key.
const LMK_HEX: &str = "6f1c2d3e4a5b69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const KEK_HEX: &str = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210";
const ON_US: &str = "6011";
const CURRENCY: &str = "360";
const PIN: &str = "1234";
/// At most this many operations per case, however long the input.
const MAX_OPS: usize = 48;
const CONNECTIONS: usize = 3;

/// A card as the terminal side knows it.
#[derive(Clone)]
struct CardFixture {
    pan: &'static str,
    expiry: &'static str,
    currency: &'static str,
}

const CARDS: &[CardFixture] = &[
    CardFixture {
        pan: "6011000000000001",
        expiry: "4912",
        currency: CURRENCY,
    },
    CardFixture {
        pan: "6011000000000002",
        expiry: "4912",
        currency: CURRENCY,
    },
    // on a USD account: a 360 withdrawal is a currency mismatch (12)
    CardFixture {
        pan: "6011000000000003",
        expiry: "4912",
        currency: "840",
    },
    // expired card
    CardFixture {
        pan: "6011000000000004",
        expiry: "2001",
        currency: CURRENCY,
    },
];

/// Accounts: (id, currency, opening balance, daily limit); cards 1..4 draw on them in order
/// (card 4 on account 1).
const ACCOUNTS: &[(&str, &str, i64, i64)] = &[
    ("ACC-FZ-1", CURRENCY, 1_000_000, 600_000),
    ("ACC-FZ-2", CURRENCY, 25_000, 10_000_000),
    ("ACC-FZ-3", "840", 500_000, 500_000),
];
const CARD_ACCOUNTS: [usize; 4] = [0, 1, 2, 0];

/// The terminals of the fixture: two ATMs and a station.
const TERMINALS: &[(&str, TerminalKind)] = &[
    ("ATM00001", TerminalKind::Atm),
    ("ATM00002", TerminalKind::Atm),
    ("STN00001", TerminalKind::Station),
];

struct TerminalFixture {
    id: TerminalId,
    keys: TerminalKeys,
}

/// The template every case copies, and what the terminals know about it.
struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    template: PathBuf,
    hsm: Arc<dyn Hsm>,
    packager: &'static Packager,
    terminals: Vec<TerminalFixture>,
}

/// The fuzz harness: a template database built once, then one fresh copy per [`Harness::run`].
pub struct Harness {
    runtime: tokio::runtime::Runtime,
    fixture: Fixture,
    cases: AtomicU64,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("template", &self.fixture.template)
            .finish_non_exhaustive()
    }
}

fn settings() -> Settings {
    let mut settings = Settings::default();
    settings.routing.on_us = vec![ON_US.into()];
    settings
}

fn connect_options() -> ConnectOptions {
    ConnectOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_secs(30),
    }
}

impl Harness {
    /// Builds the template database (migrations, terminals with TMK/TPK/TAK, accounts, cards)
    /// in a fresh temporary directory, on tmpfs when the machine has `/dev/shm`.
    pub fn new() -> Result<Self, HarnessError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(setup("tokio runtime"))?;
        let fixture = runtime.block_on(Fixture::build())?;
        Ok(Self {
            runtime,
            fixture,
            cases: AtomicU64::new(0),
        })
    }

    /// Runs one case: a fresh copy of the template, the operations `data` chooses, then the
    /// ledger and key invariants. `Err` is a finding; setup failures panic (they are not about
    /// the input).
    pub fn run(&self, data: &[u8]) -> Result<Report, Violation> {
        let n = self.cases.fetch_add(1, Ordering::Relaxed);
        let path = self.fixture.dir.join(format!("case-{n}.db"));
        let result = self.runtime.block_on(async {
            let mut case = Case::open(&self.fixture, &path)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let outcome = case.drive(data).await;
            let outcome = match outcome {
                Ok(()) => case.check_ledger().await.map(|()| case.report.clone()),
                Err(v) => Err(v),
            };
            case.close().await;
            outcome
        });
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        result
    }
}

impl Fixture {
    async fn build() -> Result<Fixture, HarnessError> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("switchyard-fuzz")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("switchyard-fuzz").tempdir()
        }
        .map_err(setup("temporary directory"))?;
        let template = dir.path().join("template.db");
        let lmk = Lmk::from_hex(LMK_HEX).map_err(setup("LMK"))?;
        let kek_key = ClearKey::from_hex(KEK_HEX).map_err(setup("KEK"))?;
        let kek = Kek::from_key(kek_key.clone()).map_err(setup("KEK"))?;
        let hsm: Arc<dyn Hsm> = Arc::new(SoftHsm::new(lmk, Some(kek)));
        let settings = settings();
        let packager = Packager::by_name(&settings.iso8583.packager).map_err(setup("packager"))?;
        let store = store::connect(
            &format!("sqlite://{}", template.display()),
            &connect_options(),
        )
        .await
        .map_err(setup("template store"))?;
        store.migrate().await.map_err(setup("migrate"))?;

        let grace = settings.keys.grace.as_secs() as i64;
        let mut terminals = Vec::new();
        let mut rng = rand::rng();
        for (id, kind) in TERMINALS {
            let id = TerminalId::new(*id).map_err(setup("terminal id"))?;
            let mut keys = TerminalKeys::generate(&mut rng);
            // as POST /v1/terminals does it: the TMK arrives under the KEK, the HSM imports it
            let kek = Kek::from_key(kek_key.clone()).map_err(setup("KEK"))?;
            let (block, kcv) = keys.wrap_tmk_under_kek(&kek).map_err(setup("wrap TMK"))?;
            let (wrapped, _) = hsm
                .import_under_kek(KeyType::Tmk, &KeyOwner::Terminal(id.clone()), &block, &kcv)
                .map_err(setup("import TMK"))?;
            store
                .create_terminal(
                    &NewTerminal {
                        id: id.clone(),
                        group: "fuzz".into(),
                        kind: *kind,
                    },
                    "fuzz",
                )
                .await
                .map_err(setup("create terminal"))?;
            store
                .insert_key(
                    &NewKey {
                        terminal_id: id.clone(),
                        key_type: KeyType::Tmk,
                        state: KeyState::Active,
                        wrapped: wrapped.clone(),
                        kcv: kcv.to_string(),
                        rotation_id: None,
                        grace_seconds: grace,
                    },
                    "fuzz",
                )
                .await
                .map_err(setup("insert TMK"))?;
            // working keys, as a completed 161/162 exchange leaves them
            for kt in [KeyType::Tpk, KeyType::Tak] {
                let (key, key_kcv) = hsm
                    .generate_key(kt, &KeyOwner::Terminal(id.clone()))
                    .map_err(setup("generate key"))?;
                let block = hsm
                    .export_under_tmk(&wrapped, &key, kt)
                    .map_err(setup("export key"))?;
                keys.accept_key_block(kt, &block, &key_kcv)
                    .map_err(setup("accept key"))?;
                store
                    .insert_key(
                        &NewKey {
                            terminal_id: id.clone(),
                            key_type: kt,
                            state: KeyState::Active,
                            wrapped: key,
                            kcv: key_kcv.to_string(),
                            rotation_id: None,
                            grace_seconds: grace,
                        },
                        "fuzz",
                    )
                    .await
                    .map_err(setup("insert key"))?;
            }
            terminals.push(TerminalFixture { id, keys });
        }
        for (id, currency, balance, limit) in ACCOUNTS {
            store
                .create_account(
                    &NewAccount {
                        id: AccountId::new(*id).map_err(setup("account id"))?,
                        currency: (*currency).into(),
                        balance: *balance,
                        daily_withdrawal_limit: *limit,
                    },
                    "fuzz",
                )
                .await
                .map_err(setup("create account"))?;
        }
        let pin = ClearPin::new(PIN).map_err(setup("PIN"))?;
        for (card, account) in CARDS.iter().zip(CARD_ACCOUNTS) {
            let pvv = hsm.make_pvv(card.pan, &pin).map_err(setup("PVV"))?;
            store
                .create_card(
                    &NewCard {
                        pan_token: hsm.pan_token(card.pan),
                        last4: card.pan[card.pan.len() - 4..].to_string(),
                        expiry: card.expiry.into(),
                        account_id: AccountId::new(ACCOUNTS[account].0)
                            .map_err(setup("account id"))?,
                        pvv: pvv.to_hex(),
                        upstream: None,
                    },
                    "fuzz",
                )
                .await
                .map_err(setup("create card"))?;
        }
        store.close().await;
        Ok(Fixture {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            template,
            hsm,
            packager,
            terminals,
        })
    }
}

/// One simulated connection.
struct Conn {
    state: ConnState,
    outbound: mpsc::Receiver<OutboundFrame>,
    /// Frames the switch pushed (0800/161) and the terminal has not answered yet.
    pushed: Vec<Vec<u8>>,
}

/// What the terminal side knows about one terminal during a case.
struct TermModel {
    id: TerminalId,
    /// The keys the terminal uses now.
    keys: TerminalKeys,
    /// Every key set it has held or been offered (answers may be MACed under any TAK the switch
    /// still accepts; an offered key may have been activated by a confirmation we lost track of).
    known: Vec<TerminalKeys>,
    /// Key blocks delivered by a 161 and not yet confirmed: key type → (block, KCV).
    offered: HashMap<KeyType, (String, String)>,
}

/// How a frame is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MacMode {
    /// Under the right key (TAK for financial messages, K_NM for 08xx).
    Correct,
    /// Under a key the terminal held before (valid in the grace window, or not).
    Previous,
    /// No MAC field.
    Missing,
    /// Eight random bytes.
    Garbage,
    /// Under the other key kind (K_NM for a financial message, TAK for network management).
    WrongKey,
}

/// A frame the harness sent, for replays and reversals.
#[derive(Clone)]
struct Sent {
    frame: Vec<u8>,
    message: Message,
}

struct Case {
    ctx: SwitchContext,
    db: SqlitePool,
    conns: Vec<Conn>,
    terms: Vec<TermModel>,
    sent: Vec<Sent>,
    next_conn_id: u64,
    stan: u32,
    report: Report,
}

/// A snapshot of everything an unauthenticated frame must not change.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    journal: i64,
    balances: String,
    keys: String,
    pin_tries: String,
    sign_ons: i64,
    saf: i64,
    session: Option<TerminalId>,
}

fn now_f7() -> String {
    Utc::now().format("%m%d%H%M%S").to_string()
}

impl Case {
    async fn open(fx: &Fixture, path: &Path) -> Result<Case, HarnessError> {
        std::fs::copy(&fx.template, path).map_err(setup("copy template"))?;
        let url = format!("sqlite://{}", path.display());
        let store: Store = store::connect(&url, &connect_options())
            .await
            .map_err(setup("case store"))?;
        let db = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .busy_timeout(Duration::from_secs(30)),
            )
            .await
            .map_err(setup("case reader"))?;
        let settings = settings();
        let metrics: Metrics = Arc::new(SwitchMetrics::new());
        let upstreams = Arc::new(
            Upstreams::new(
                &settings.upstreams,
                &LinkDeps {
                    packager: fx.packager,
                    hsm: fx.hsm.clone(),
                    store: store.clone(),
                    metrics: metrics.clone(),
                },
            )
            .map_err(setup("upstreams"))?,
        );
        let held_reversals = Arc::new(crate::routing::held::HeldReversals::new(
            1000,
            metrics.clone(),
        ));
        let ctx = SwitchContext {
            held_reversals,
            settings,
            packager: fx.packager,
            store,
            // the harness changes keys behind the context's back: no cache
            keys: Arc::new(crate::store::KeyCache::new(
                std::time::Duration::ZERO,
                metrics.key_cache_hits.clone(),
                metrics.key_cache_misses.clone(),
            )),
            hsm: fx.hsm.clone(),
            sessions: SessionRegistry::new(),
            fleet: crate::txn::fleet::Fleet::new(&Default::default()),
            metrics,
            health: Arc::new(Health::default()),
            upstreams,
            maintenance: crate::maintenance::Maintenance::new(),
        };
        if !ctx.fleet.register(&ctx).await {
            return Err(HarnessError::Setup(
                "failed to register in the session registry".into(),
            ));
        }
        let terms = fx
            .terminals
            .iter()
            .map(|t| TermModel {
                id: t.id.clone(),
                keys: t.keys.clone(),
                known: vec![t.keys.clone()],
                offered: HashMap::new(),
            })
            .collect();
        let mut case = Case {
            ctx,
            db,
            conns: Vec::new(),
            terms,
            sent: Vec::new(),
            next_conn_id: 1,
            stan: 0,
            report: Report::default(),
        };
        for _ in 0..CONNECTIONS {
            let conn = case.new_conn();
            case.conns.push(conn);
        }
        Ok(case)
    }

    async fn close(self) {
        self.ctx.store.close().await;
        self.db.close().await;
    }

    fn new_conn(&mut self) -> Conn {
        let (tx, rx) = mpsc::channel(16);
        let conn_id = self.next_conn_id;
        self.next_conn_id += 1;
        Conn {
            state: ConnState {
                conn_id,
                remote: std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    40_000 + (conn_id % 20_000) as u16,
                )),
                terminal: None,
                terminal_kind: None,
                last_seen: Arc::new(AtomicI64::new(0)),
                outbound: tx,
                close: CancellationToken::new(),
                close_after_reply: false,
            },
            outbound: rx,
            pushed: Vec::new(),
        }
    }

    /// What the server does when a connection closes: deregister its session, then a new
    /// connection takes the slot (the terminal reconnects).
    fn reconnect(&mut self, i: usize) {
        let fresh = self.new_conn();
        let old = std::mem::replace(&mut self.conns[i], fresh);
        if let Some(terminal) = &old.state.terminal {
            self.ctx.sessions.remove(terminal, old.state.conn_id);
        }
    }

    fn next_stan(&mut self) -> String {
        self.stan += 1;
        format!("{:06}", 100_000 + self.stan)
    }

    async fn drive(&mut self, data: &[u8]) -> Result<(), Violation> {
        let mut u = Unstructured::new(data);
        let mut ops = 0;
        while !u.is_empty() && ops < MAX_OPS {
            ops += 1;
            match self.step(&mut u).await {
                Ok(result) => result?,
                // the input ran out in the middle of a choice: the case is over
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// One operation. The outer `Result` is the input running out, the inner one a finding.
    async fn step(&mut self, u: &mut Unstructured<'_>) -> arbitrary::Result<Result<(), Violation>> {
        let c = u.choose_index(CONNECTIONS)?;
        let op: u8 = u.int_in_range(0..=99)?;
        let built = match op {
            // raw bytes, sometimes behind a plausible MTI
            0..=5 => {
                let mut frame = Vec::new();
                if u.arbitrary::<bool>()? {
                    let mti = *u.choose(&[
                        "0800", "0810", "0200", "0220", "0221", "0400", "0420", "0421", "0100",
                        "0210", "9999",
                    ])?;
                    frame.extend_from_slice(mti.as_bytes());
                }
                let len = u.int_in_range(0..=160)?;
                frame.extend_from_slice(u.bytes(len.min(u.len()))?);
                Some((frame, false))
            }
            // replay an earlier frame, perhaps on another connection
            6..=11 if !self.sent.is_empty() => {
                let i = u.choose_index(self.sent.len())?;
                Some((self.sent[i].frame.clone(), false))
            }
            // answer a key push waiting on this connection
            12..=17 if !self.conns[c].pushed.is_empty() => {
                return self.answer_push(u, c).await;
            }
            _ => self.build_request(u, c, op)?,
        };
        let Some((mut frame, mut unauthenticated)) = built else {
            return Ok(Ok(()));
        };
        // change bytes after MACing: the MAC must catch it
        if u.ratio(1, 8)? {
            let before = frame.clone();
            corrupt(u, &mut frame)?;
            if !self.same_authenticated_content(&before, &frame) {
                unauthenticated = true;
            }
        }
        Ok(self.send(c, frame, unauthenticated).await)
    }

    /// Whether two frames carry the same MAC input and MAC (a case change in the hex MAC is no
    /// change at all).
    fn same_authenticated_content(&self, a: &[u8], b: &[u8]) -> bool {
        let w = self.ctx.packager.mac_wire_len();
        a.len() == b.len()
            && a.len() >= w
            && a[..a.len() - w] == b[..b.len() - w]
            && a[a.len() - w..].eq_ignore_ascii_case(&b[b.len() - w..])
    }

    /// Builds a well-formed request (then perhaps bent) and MACs it as chosen. `None` when the
    /// choices make something the packager cannot pack. The flag says the frame cannot carry a
    /// valid MAC.
    fn build_request(
        &mut self,
        u: &mut Unstructured<'_>,
        c: usize,
        op: u8,
    ) -> arbitrary::Result<Option<(Vec<u8>, bool)>> {
        // mostly the terminal signed on over this connection, else any, else a stranger
        let t = match (&self.conns[c].state.terminal, u.int_in_range(0..=9u8)?) {
            (Some(tid), 0..=6) => self.terms.iter().position(|m| &m.id == tid),
            (_, 0..=8) => Some(u.choose_index(self.terms.len())?),
            _ => None,
        };
        let field41 = match t {
            Some(t) => self.terms[t].id.to_field41(),
            None => (*u.choose(&["ATM00099", "        ", "atm00001", "ATM0000\u{1}"])?).to_string(),
        };
        // a connection that is not signed on mostly signs on first, so that financial traffic
        // gets past the `58` of an unknown session
        let sign_on_first = self.conns[c].state.terminal.is_none() && op >= 46 && u.ratio(3, 4)?;
        let op = if sign_on_first { 18 } else { op };
        let mut m;
        let network;
        match op {
            // network management
            18..=45 => {
                network = true;
                m = Message::new(Mti::NETWORK_REQUEST);
                let code = if sign_on_first {
                    "001"
                } else {
                    *u.choose(&[
                        "001", "001", "002", "301", "301", "161", "161", "162", "162", "999",
                    ])?
                };
                m.set_str(fields::NETWORK_CODE, code);
                if matches!(code, "161" | "162") {
                    let kt = *u.choose(&["TAK", "TPK", "TMK", "XYZ"])?;
                    m.set_str(fields::KEY_TYPE, kt);
                    if code == "162" {
                        let kcv = match (t, kt.parse::<KeyType>()) {
                            (Some(t), Ok(kt)) if u.ratio(3, 4)? => {
                                self.terms[t].offered.get(&kt).map(|(_, kcv)| kcv.clone())
                            }
                            _ => None,
                        };
                        let kcv = match kcv {
                            Some(k) => k,
                            None => hex::encode_upper(u.bytes(3)?),
                        };
                        m.set_str(fields::KCV, &kcv);
                    }
                }
            }
            // financial requests
            46..=75 => {
                network = false;
                m = Message::new(
                    Mti::parse("0200").map_err(|_| arbitrary::Error::IncorrectFormat)?,
                );
                let pcode = *u.choose(&[
                    "010000", "011000", "012000", "310000", "311000", "000000", "01000X", "013000",
                ])?;
                m.set_str(fields::PROCESSING_CODE, pcode);
                self.card_fields(u, &mut m, t)?;
            }
            // advices (a station's stand-in withdrawals)
            76..=85 => {
                network = false;
                let mti = *u.choose(&["0220", "0221"])?;
                m = Message::new(Mti::parse(mti).map_err(|_| arbitrary::Error::IncorrectFormat)?);
                m.set_str(
                    fields::PROCESSING_CODE,
                    u.choose(&["010000", "010000", "310000"])?,
                );
                self.card_fields(u, &mut m, t)?;
                m.remove(fields::PIN_BLOCK);
                if u.arbitrary::<bool>()? {
                    m.set_str(fields::RRN, "612345678901");
                    m.set_str(fields::AUTH_CODE, "A1B2C3");
                }
            }
            // reversals of something sent before, or of nothing
            _ => {
                network = false;
                let mti = *u.choose(&["0400", "0420", "0421"])?;
                m = Message::new(Mti::parse(mti).map_err(|_| arbitrary::Error::IncorrectFormat)?);
                // mostly an 0200 this terminal sent: only those can be found
                let same_terminal = u.ratio(7, 8)?;
                let originals: Vec<usize> = (0..self.sent.len())
                    .filter(|&i| {
                        let sent = &self.sent[i].message;
                        sent.mti().as_str() == "0200"
                            && (!same_terminal
                                || sent.get_str(fields::TERMINAL_ID) == Some(field41.as_str()))
                    })
                    .collect();
                let f90 = if !originals.is_empty() && u.ratio(4, 5)? {
                    let orig = &self.sent[originals[u.choose_index(originals.len())?]].message;
                    for f in [
                        fields::PAN,
                        fields::PROCESSING_CODE,
                        fields::AMOUNT,
                        fields::LOCAL_TIME,
                        fields::LOCAL_DATE,
                        fields::EXPIRY,
                        fields::POS_ENTRY_MODE,
                        fields::CARD_ACCEPTOR_ID,
                        fields::CURRENCY,
                    ] {
                        if let Some(v) = orig.get(f) {
                            m.set(f, v);
                        }
                    }
                    crate::atm::original_data_elements(orig)
                } else {
                    let mut f = String::from("0200");
                    f.push_str(&format!("{:06}", u.int_in_range(0..=999_999u32)?));
                    f.push_str(&now_f7());
                    f.push_str(&"0".repeat(22));
                    if u.ratio(1, 6)? {
                        f.truncate(u.int_in_range(0..=41)?);
                    }
                    f
                };
                m.set_str(fields::ORIGINAL_DATA, &f90);
            }
        }
        // identity: now, or a recent STAN again (duplicates), or odd values
        let (stan, f7) = match u.int_in_range(0..=9u8)? {
            0..=5 => (self.next_stan(), now_f7()),
            6..=7 if !self.sent.is_empty() => {
                let prev = &self.sent[u.choose_index(self.sent.len())?].message;
                (
                    prev.get_str(fields::STAN).unwrap_or("000001").to_string(),
                    prev.get_str(fields::TRANSMISSION_DATE_TIME)
                        .unwrap_or("0101000000")
                        .to_string(),
                )
            }
            8 => (self.next_stan(), "0101000000".into()),
            _ => (
                format!("{:06}", u.int_in_range(0..=999_999u32)?),
                (*u.choose(&["1332250000", "0230120000", "9999999999"])?).to_string(),
            ),
        };
        m.set_str(fields::TRANSMISSION_DATE_TIME, &f7);
        m.set_str(fields::STAN, &stan);
        m.set_str(fields::TERMINAL_ID, &field41);
        // bend a field: set a random one to a random value, or drop one
        for _ in 0..u.int_in_range(0..=2u8)? {
            if !u.ratio(1, 5)? {
                continue;
            }
            let field: u8 = u.int_in_range(2..=127)?;
            if u.arbitrary::<bool>()? {
                m.remove(field);
            } else {
                let len = u.int_in_range(0..=24)?;
                let value = u.bytes(len.min(u.len()))?.to_vec();
                m.set(field, value);
            }
        }
        let mode = *u.choose(&[
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Previous,
            MacMode::Missing,
            MacMode::Garbage,
            MacMode::WrongKey,
        ])?;
        let garbage: [u8; 8] = u.arbitrary()?;
        let frame = self.mac_and_pack(&mut m, t, &field41, network, mode, garbage);
        let unauthenticated = match (t, mode) {
            // a stranger has no key: nothing it sends verifies
            (None, _) => true,
            (_, MacMode::Missing | MacMode::Garbage | MacMode::WrongKey) => true,
            _ => false,
        };
        Ok(frame.map(|f| {
            self.sent.push(Sent {
                frame: f.clone(),
                message: m,
            });
            if self.sent.len() > 64 {
                self.sent.remove(0);
            }
            (f, unauthenticated)
        }))
    }

    /// Card, amount, PIN block and the other fields of an 0200/0220.
    fn card_fields(
        &self,
        u: &mut Unstructured<'_>,
        m: &mut Message,
        t: Option<usize>,
    ) -> arbitrary::Result<()> {
        let (pan, expiry, currency) = match u.int_in_range(0..=9u8)? {
            0..=7 => {
                let card = u.choose(CARDS)?;
                (card.pan.to_string(), card.expiry.to_string(), card.currency)
            }
            // on-us but not issued, another issuer's, nonsense
            8 => (
                (*u.choose(&["6011999999999999", "4111111111111111", "6011"])?).to_string(),
                "4912".to_string(),
                CURRENCY,
            ),
            _ => (
                format!("6011{:012}", u.int_in_range(0..=999_999_999_999u64)?),
                format!("{:04}", u.int_in_range(0..=9999u16)?),
                CURRENCY,
            ),
        };
        let currency = if u.ratio(1, 10)? { "978" } else { currency };
        if u.ratio(1, 8)? {
            m.set_str(fields::TRACK2, &format!("{pan}={expiry}101"));
        } else {
            m.set_str(fields::PAN, &pan);
            m.set_str(fields::EXPIRY, &expiry);
        }
        let amount: i64 = match u.int_in_range(0..=9u8)? {
            0..=5 => i64::from(u.int_in_range(1..=400u32)?) * 100,
            6 => i64::from(u.int_in_range(1..=100u32)?) * 10_000,
            7 => 0,
            8 => 999_999_999_999,
            _ => i64::from(u.arbitrary::<u32>()?),
        };
        m.set_str(fields::AMOUNT, &format!("{amount:012}"));
        let now = Utc::now();
        m.set_str(fields::LOCAL_TIME, &now.format("%H%M%S").to_string());
        m.set_str(fields::LOCAL_DATE, &now.format("%m%d").to_string());
        m.set_str(fields::POS_ENTRY_MODE, "051");
        m.set_str(fields::CARD_ACCEPTOR_ID, "SWITCHYARD-FUZZ");
        m.set_str(fields::CURRENCY, currency);
        let pin = match u.int_in_range(0..=9u8)? {
            0..=6 => PIN.to_string(),
            7..=8 => "9999".to_string(),
            _ => String::new(),
        };
        let block = match (t, ClearPin::new(&pin)) {
            (Some(t), Ok(pin)) => self.terms[t]
                .keys
                .encipher_pin(&pan, &pin)
                .ok()
                .map(hex::encode_upper),
            _ => None,
        };
        match block {
            Some(b) => m.set_str(fields::PIN_BLOCK, &b),
            None => m.set_str(fields::PIN_BLOCK, &hex::encode_upper(u.bytes(16)?)),
        }
        Ok(())
    }

    /// Sets the MAC as `mode` says and packs. `None` when the message cannot be packed.
    fn mac_and_pack(
        &self,
        m: &mut Message,
        t: Option<usize>,
        field41: &str,
        network: bool,
        mode: MacMode,
        garbage: [u8; 8],
    ) -> Option<Vec<u8>> {
        let packager = self.ctx.packager;
        let field = crate::iso8583::mac_field_for(m);
        if mode == MacMode::Missing {
            m.remove(fields::MAC);
            m.remove(fields::MAC_SECONDARY);
            return packager.pack(m).ok();
        }
        m.set(field, [0u8; 8]);
        let input = packager.pack_mac_input(m).ok()?;
        let mac = match t {
            None => garbage,
            Some(t) => {
                let term = &self.terms[t];
                let keys = match mode {
                    MacMode::Previous => term.known.first().unwrap_or(&term.keys),
                    _ => &term.keys,
                };
                let nm = network != (mode == MacMode::WrongKey);
                match mode {
                    MacMode::Garbage => garbage,
                    _ if nm => keys.nm_mac(field41, &input),
                    _ => keys.mac(&input).unwrap_or(garbage),
                }
            }
        };
        m.set(field, mac);
        packager.pack(m).ok()
    }

    /// The terminal answers a pushed 0800/161: verify its MAC, take the key, answer 0810 (MACed
    /// or not, accepting or declining, as the input says).
    async fn answer_push(
        &mut self,
        u: &mut Unstructured<'_>,
        c: usize,
    ) -> arbitrary::Result<Result<(), Violation>> {
        let i = u.choose_index(self.conns[c].pushed.len())?;
        let raw = self.conns[c].pushed.remove(i);
        let packager = self.ctx.packager;
        let Ok(push) = packager.unpack(&raw) else {
            return Ok(Err(Violation(
                "the switch pushed a frame it cannot parse itself".into(),
            )));
        };
        let Some(t) = push
            .get_str(fields::TERMINAL_ID)
            .and_then(|f| TerminalId::from_field41(f).ok())
            .and_then(|id| self.terms.iter().position(|m| m.id == id))
        else {
            return Ok(Err(Violation(format!(
                "the switch pushed a key to an unknown terminal: {:?}",
                push.get_str(fields::TERMINAL_ID)
            ))));
        };
        if !self.nm_verifies(t, &push, &raw) {
            return Ok(Err(Violation(
                "a pushed 0800/161 does not verify under the terminal's K_NM".into(),
            )));
        }
        let kt = push
            .get_str(fields::KEY_TYPE)
            .and_then(|s| s.parse::<KeyType>().ok());
        let block = push
            .get_str(fields::KEY_BLOCK)
            .unwrap_or_default()
            .to_string();
        let kcv = push.get_str(fields::KCV).unwrap_or_default().to_string();
        let mut answer = Message::new(Mti::NETWORK_RESPONSE);
        for f in [
            fields::TRANSMISSION_DATE_TIME,
            fields::STAN,
            fields::TERMINAL_ID,
            fields::KEY_TYPE,
            fields::NETWORK_CODE,
        ] {
            if let Some(v) = push.get(f) {
                answer.set(f, v);
            }
        }
        let accept = u.ratio(4, 5)?;
        let mut candidate = self.terms[t].keys.clone();
        let accepted = accept
            && match (kt, kcv.parse::<KeyCheckValue>()) {
                (Some(kt), Ok(k)) => candidate.accept_key_block(kt, &block, &k).is_ok(),
                _ => false,
            };
        let mut confirms = false;
        if accepted {
            answer.set_str(fields::RESPONSE_CODE, "00");
            confirms = u.ratio(7, 8)?;
            let computed = if confirms {
                kcv.clone()
            } else {
                hex::encode_upper(u.bytes(3)?)
            };
            answer.set_str(fields::KCV, &computed);
        } else {
            answer.set_str(fields::RESPONSE_CODE, "63");
        }
        let mode = *u.choose(&[
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Correct,
            MacMode::Garbage,
        ])?;
        let garbage: [u8; 8] = u.arbitrary()?;
        let field41 = self.terms[t].id.to_field41();
        if confirms && mode == MacMode::Correct {
            // from here the terminal uses the new key (the switch activates it on this answer)
            self.terms[t].known.push(candidate.clone());
            self.terms[t].keys = candidate;
        }
        let Some(frame) = self.mac_and_pack(&mut answer, Some(t), &field41, true, mode, garbage)
        else {
            return Ok(Ok(()));
        };
        Ok(self.send(c, frame, mode != MacMode::Correct).await)
    }

    fn nm_verifies(&self, t: usize, m: &Message, raw: &[u8]) -> bool {
        let field = if m.has(fields::MAC_SECONDARY) {
            128
        } else {
            64
        };
        let w = self.ctx.packager.mac_wire_len();
        let (Some(mac), Some(input)) = (
            m.get(field),
            raw.len().checked_sub(w).and_then(|end| raw.get(..end)),
        ) else {
            return false;
        };
        let term = &self.terms[t];
        term.keys.verify_nm_mac(&term.id.to_field41(), input, mac)
    }

    fn tak_verifies(&self, t: usize, m: &Message, raw: &[u8]) -> bool {
        let field = if m.has(fields::MAC_SECONDARY) {
            128
        } else {
            64
        };
        let w = self.ctx.packager.mac_wire_len();
        let (Some(mac), Some(input)) = (
            m.get(field),
            raw.len().checked_sub(w).and_then(|end| raw.get(..end)),
        ) else {
            return false;
        };
        self.terms[t]
            .known
            .iter()
            .chain(std::iter::once(&self.terms[t].keys))
            .any(|keys| keys.verify_mac(input, mac).unwrap_or(false))
    }

    async fn fingerprint(&self, c: usize) -> Result<Fingerprint, Violation> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM journal) AS journal, \
             (SELECT COALESCE(group_concat(id || ':' || balance, ','), '') FROM (SELECT id, balance FROM accounts ORDER BY id)) AS balances, \
             (SELECT COALESCE(group_concat(id || ':' || state, ','), '') FROM (SELECT id, state FROM keys ORDER BY id)) AS keys, \
             (SELECT COALESCE(group_concat(id || ':' || pin_tries, ','), '') FROM (SELECT id, pin_tries FROM cards ORDER BY id)) AS pin_tries, \
             (SELECT COUNT(*) FROM accepted_sign_ons) AS sign_ons, \
             (SELECT COUNT(*) FROM saf_messages) AS saf",
        )
        .fetch_one(&self.db)
        .await
        .map_err(|e| Violation(format!("harness: failed to read the database: {e}")))?;
        let get_i = |n: &str| row.try_get::<i64, _>(n).unwrap_or(-1);
        let get_s = |n: &str| row.try_get::<String, _>(n).unwrap_or_default();
        Ok(Fingerprint {
            journal: get_i("journal"),
            balances: get_s("balances"),
            keys: get_s("keys"),
            pin_tries: get_s("pin_tries"),
            sign_ons: get_i("sign_ons"),
            saf: get_i("saf"),
            session: self.conns[c].state.terminal.clone(),
        })
    }

    /// Hands one frame to the switch on connection `c` and checks the outcome.
    async fn send(
        &mut self,
        c: usize,
        frame: Vec<u8>,
        unauthenticated: bool,
    ) -> Result<(), Violation> {
        let before = if unauthenticated {
            Some(self.fingerprint(c).await?)
        } else {
            None
        };
        self.report.frames += 1;
        let answer = crate::txn::handle_frame(&self.ctx, &mut self.conns[c].state, &frame).await;
        let request = self.ctx.packager.unpack(&frame).ok();
        let verdict = self.check_answer(c, &frame, request.as_ref(), answer.as_deref());
        if let Some(before) = before {
            let after = self.fingerprint(c).await?;
            if before != after {
                return Err(Violation(format!(
                    "a frame without a valid MAC changed state: before {before:?}, after {after:?}, frame {}",
                    String::from_utf8_lossy(&frame)
                )));
            }
            if matches!(&verdict, Ok(Some((_, code))) if code == "00") {
                return Err(Violation(format!(
                    "a frame without a valid MAC was approved: {}",
                    String::from_utf8_lossy(&frame)
                )));
            }
        }
        verdict?;
        // what the server would do next: due keys are pushed, pushes go out, closed
        // connections reconnect
        crate::txn::fleet::push_round(&self.ctx).await;
        for conn in &mut self.conns {
            while let Ok(pushed) = conn.outbound.try_recv() {
                conn.pushed.push(pushed);
            }
        }
        for i in 0..self.conns.len() {
            let state = &self.conns[i].state;
            if state.close_after_reply || state.close.is_cancelled() {
                self.reconnect(i);
            }
        }
        Ok(())
    }

    /// The answer is documented: `Ok(Some((mti, code)))` for an answer, `Ok(None)` for a frame
    /// rightly left unanswered.
    fn check_answer(
        &mut self,
        c: usize,
        frame: &[u8],
        request: Option<&Message>,
        answer: Option<&[u8]>,
    ) -> Result<Option<(String, String)>, Violation> {
        let shown = || String::from_utf8_lossy(frame).into_owned();
        let Some(answer) = answer else {
            let unanswerable =
                request.is_some_and(|r| r.mti().response().is_none() || r.mti().as_str() == "0810");
            if self.conns[c].state.close_after_reply {
                self.report.closed += 1;
                return Ok(None);
            }
            if unanswerable {
                return Ok(None);
            }
            return Err(Violation(format!(
                "no answer and the connection stays open: {}",
                shown()
            )));
        };
        let parsed = self.ctx.packager.unpack(answer).map_err(|e| {
            Violation(format!(
                "the switch's answer does not parse ({e}): {}",
                shown()
            ))
        })?;
        let code = parsed
            .get_str(fields::RESPONSE_CODE)
            .unwrap_or_default()
            .to_string();
        if ResponseCode::parse(&code).is_none() {
            return Err(Violation(format!(
                "answer with an undocumented response code {code:?}: {}",
                shown()
            )));
        }
        let mti = parsed.mti().as_str().to_string();
        match request {
            Some(r) => {
                if r.mti().response() != Some(parsed.mti()) {
                    return Err(Violation(format!(
                        "{} answered with {mti}: {}",
                        r.mti().as_str(),
                        shown()
                    )));
                }
            }
            // an unparseable request is answered 30 or not at all
            None => {
                if code != ResponseCode::FormatError.as_str() {
                    return Err(Violation(format!(
                        "an unparseable frame was answered {code}: {}",
                        shown()
                    )));
                }
            }
        }
        if parsed.has(fields::MAC) || parsed.has(fields::MAC_SECONDARY) {
            let t = parsed
                .get_str(fields::TERMINAL_ID)
                .and_then(|f| TerminalId::from_field41(f).ok())
                .and_then(|id| self.terms.iter().position(|m| m.id == id));
            let verifies = match t {
                Some(t) if mti == "0810" => self.nm_verifies(t, &parsed, answer),
                Some(t) => self.tak_verifies(t, &parsed, answer),
                None => false,
            };
            if !verifies {
                return Err(Violation(format!(
                    "answer {mti}/{code} carries a MAC the terminal cannot verify: {}",
                    shown()
                )));
            }
        }
        // the terminal takes a delivered key (it confirms it with a later 162)
        if mti == "0810" && code == "00" && parsed.get_str(fields::NETWORK_CODE) == Some("161") {
            self.take_offer(&parsed);
        }
        if mti == "0810" && code == "00" && parsed.get_str(fields::NETWORK_CODE) == Some("162") {
            self.take_confirmed(&parsed);
        }
        *self
            .report
            .answers
            .entry(format!("{mti}/{code}"))
            .or_default() += 1;
        Ok(Some((mti, code)))
    }

    fn term_of(&self, m: &Message) -> Option<usize> {
        let id = TerminalId::from_field41(m.get_str(fields::TERMINAL_ID)?).ok()?;
        self.terms.iter().position(|t| t.id == id)
    }

    fn take_offer(&mut self, answer: &Message) {
        let (Some(t), Some(kt), Some(block), Some(kcv)) = (
            self.term_of(answer),
            answer
                .get_str(fields::KEY_TYPE)
                .and_then(|s| s.parse::<KeyType>().ok()),
            answer.get_str(fields::KEY_BLOCK),
            answer.get_str(fields::KCV),
        ) else {
            return;
        };
        let (block, kcv) = (block.to_string(), kcv.to_string());
        // remember it among the known keys at once: a later 162 from any input may activate it
        if let Ok(k) = kcv.parse::<KeyCheckValue>() {
            let mut candidate = self.terms[t].keys.clone();
            if candidate.accept_key_block(kt, &block, &k).is_ok() {
                self.terms[t].known.push(candidate);
            }
        }
        self.terms[t].offered.insert(kt, (block, kcv));
    }

    fn take_confirmed(&mut self, answer: &Message) {
        let (Some(t), Some(kt)) = (
            self.term_of(answer),
            answer
                .get_str(fields::KEY_TYPE)
                .and_then(|s| s.parse::<KeyType>().ok()),
        ) else {
            return;
        };
        if let Some((block, kcv)) = self.terms[t].offered.remove(&kt)
            && let Ok(k) = kcv.parse::<KeyCheckValue>()
        {
            let mut keys = self.terms[t].keys.clone();
            if keys.accept_key_block(kt, &block, &k).is_ok() {
                self.terms[t].known.push(keys.clone());
                self.terms[t].keys = keys;
            }
        }
    }

    /// The ledger and key invariants over the whole database.
    async fn check_ledger(&self) -> Result<(), Violation> {
        let read = |e: sqlx::Error| Violation(format!("harness: failed to read the database: {e}"));
        let rows = sqlx::query(
            "SELECT a.id, a.balance, \
             COALESCE((SELECT SUM(j.amount) FROM journal j WHERE j.account_id = a.id \
               AND j.kind = 'withdrawal' AND j.response_code = '00' AND j.reversed = 0), 0) AS debited \
             FROM accounts a ORDER BY a.id",
        )
        .fetch_all(&self.db)
        .await
        .map_err(read)?;
        for row in rows {
            let id: String = row.try_get("id").map_err(read)?;
            let balance: i64 = row.try_get("balance").map_err(read)?;
            let debited: i64 = row.try_get("debited").map_err(read)?;
            let opening = ACCOUNTS
                .iter()
                .find(|a| a.0 == id)
                .map(|a| a.2)
                .ok_or_else(|| Violation(format!("an account appeared: {id}")))?;
            if balance != opening - debited {
                return Err(Violation(format!(
                    "account {id}: balance {balance} != opening {opening} - approved unreversed withdrawals {debited}"
                )));
            }
        }
        let days = sqlx::query(
            "SELECT d.account_id, d.day, d.total, \
             COALESCE((SELECT SUM(j.amount) FROM journal j WHERE j.account_id = d.account_id \
               AND j.business_day = d.day AND j.kind = 'withdrawal' AND j.response_code = '00' \
               AND j.reversed = 0), 0) AS journaled \
             FROM daily_withdrawals d",
        )
        .fetch_all(&self.db)
        .await
        .map_err(read)?;
        for row in days {
            let total: i64 = row.try_get("total").map_err(read)?;
            let journaled: i64 = row.try_get("journaled").map_err(read)?;
            if total != journaled {
                let id: String = row.try_get("account_id").map_err(read)?;
                return Err(Violation(format!(
                    "account {id}: daily withdrawal total {total} != journal {journaled}"
                )));
            }
        }
        let doubled: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT terminal_id, key_type, COUNT(*) FROM keys WHERE state = 'ACTIVE' \
             GROUP BY terminal_id, key_type HAVING COUNT(*) > 1",
        )
        .fetch_all(&self.db)
        .await
        .map_err(read)?;
        if let Some((terminal, kt, n)) = doubled.first() {
            return Err(Violation(format!("{terminal} has {n} ACTIVE {kt} keys")));
        }
        Ok(())
    }
}

/// Changes the frame: flip, overwrite, insert or delete bytes, or cut it short.
fn corrupt(u: &mut Unstructured<'_>, frame: &mut Vec<u8>) -> arbitrary::Result<()> {
    for _ in 0..u.int_in_range(1..=3u8)? {
        if frame.is_empty() {
            frame.push(u.arbitrary()?);
            continue;
        }
        let at = u.choose_index(frame.len())?;
        match u.int_in_range(0..=4u8)? {
            0 => frame[at] ^= 1 << u.int_in_range(0..=7u8)?,
            1 => frame[at] = u.arbitrary()?,
            2 => frame.insert(at, u.arbitrary()?),
            3 => {
                frame.remove(at);
            }
            _ => frame.truncate(at),
        }
    }
    Ok(())
}
