//! Records the store reads and writes: terminals, keys, rotations, accounts, cards, the financial
//! journal, upstream link keys, audit records and admin idempotency entries.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::NewAdvice;
use crate::domain::{InvalidValue, KeyState, KeyType, ResponseCode, TerminalId, WrappedKey};

/// Defines an id newtype over `String`: 1–64 characters of `[A-Za-z0-9-_.:]`, so ids are safe
/// in URLs, logs and metric labels.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id.
            pub fn new(id: impl Into<String>) -> Result<Self, InvalidValue> {
                let id = id.into();
                validate_id($what, &id)?;
                Ok(Self(id))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}

fn validate_id(what: &'static str, id: &str) -> Result<(), InvalidValue> {
    if id.is_empty() || id.len() > 64 {
        return Err(InvalidValue {
            what,
            problem: format!("must be 1 to 64 characters, got {}", id.len()),
        });
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(InvalidValue {
            what,
            problem: "only letters, digits, '-', '_', '.' and ':' are allowed".into(),
        });
    }
    Ok(())
}

string_id!(
    /// Id of a stored key (generated, UUID v4 text).
    KeyId,
    "key id"
);
string_id!(
    /// Id of a ledger account, chosen by the bank (e.g. `ACC-1`).
    AccountId,
    "account id"
);
string_id!(
    /// Id of a card record (generated, `card-<uuid>`); never the PAN.
    CardId,
    "card id"
);
string_id!(
    /// Id of a fleet key rotation (chosen by the caller so retries are idempotent).
    RotationId,
    "rotation id"
);

impl KeyId {
    /// A fresh random key id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

impl RotationId {
    /// A fresh random rotation id (`rot-<uuid>`).
    pub fn generate() -> Self {
        Self(format!("rot-{}", uuid::Uuid::new_v4()))
    }
}

impl CardId {
    /// A fresh random card id.
    pub fn generate() -> Self {
        Self(format!("card-{}", uuid::Uuid::new_v4()))
    }
}

/// Which database engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Backend {
    /// Embedded SQLite: one switch replica.
    Sqlite,
    /// PostgreSQL: many replicas and drainers.
    Postgres,
}

impl Backend {
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// How far the database schema is from what this binary expects (readiness depends on it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Highest migration version applied successfully; `None` on an empty database.
    pub applied: Option<i64>,
    /// Highest migration version embedded in this binary.
    pub expected: i64,
    /// How many embedded migrations are not applied yet.
    pub pending: usize,
}

impl MigrationStatus {
    /// True when every embedded migration is applied.
    pub fn is_current(&self) -> bool {
        self.pending == 0
    }
}

/// Connection pool occupancy, for `switchyard_db_pool_connections{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections (idle + in use).
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
}

/// Keyset pagination: rows with an id greater than `after`, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Last id of the previous page; `None` for the first page.
    pub after: Option<String>,
    /// Page size; clamped to 1..=1000 (0 means the default, 100).
    pub limit: u32,
}

impl Page {
    /// The limit the store applies.
    pub fn effective_limit(&self) -> i64 {
        match self.limit {
            0 => 100,
            n => i64::from(n.min(1000)),
        }
    }
}

/// What a terminal record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TerminalKind {
    /// An ATM.
    Atm,
    /// An acquiring switch connecting to us as a station (SPEC §6).
    Station,
}

impl TerminalKind {
    /// Stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminalKind::Atm => "atm",
            TerminalKind::Station => "station",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "atm" => Some(TerminalKind::Atm),
            "station" => Some(TerminalKind::Station),
            _ => None,
        }
    }
}

/// A terminal to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTerminal {
    /// Field 41 id.
    pub id: TerminalId,
    /// Fleet group (region, branch) used by rotations' `groups` selector.
    pub group: String,
    /// ATM or acquirer station.
    pub kind: TerminalKind,
}

/// A registered terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Terminal {
    /// Field 41 id.
    pub id: TerminalId,
    /// Fleet group.
    pub group: String,
    /// ATM or acquirer station.
    pub kind: TerminalKind,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// Which terminals a fleet operation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalSelector {
    /// Every registered terminal.
    All,
    /// These terminals (unregistered ids are left out of the answer).
    Ids(Vec<TerminalId>),
    /// Every terminal in one of these groups.
    Groups(Vec<String>),
}

/// A key to store (already wrapped under the LMK by the HSM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Owner terminal.
    pub terminal_id: TerminalId,
    /// TMK, TPK or TAK.
    pub key_type: KeyType,
    /// `Pending` (delivered, awaiting confirmation) or `Active` (TMK import).
    pub state: KeyState,
    /// The key under the LMK.
    pub wrapped: WrappedKey,
    /// Key check value (6 hex characters).
    pub kcv: String,
    /// Fleet rotation this key belongs to, if any.
    pub rotation_id: Option<RotationId>,
    /// Grace the key it replaces keeps when this one becomes ACTIVE.
    pub grace_seconds: i64,
}

/// A stored key. Serializes to the API shape of SPEC §5: never the key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    /// Key id.
    pub id: KeyId,
    /// Owner terminal.
    pub terminal_id: TerminalId,
    /// TMK, TPK or TAK.
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// 1, 2, … per (terminal, type).
    pub version: i32,
    /// Lifecycle state.
    pub state: KeyState,
    /// Key check value.
    pub kcv: String,
    /// The key under the LMK; its `Debug` is redacted and it is never serialized.
    #[serde(skip)]
    pub wrapped: WrappedKey,
    /// Fleet rotation this key belongs to, if any.
    pub rotation_id: Option<RotationId>,
    /// Grace the replaced key keeps when this one is activated.
    pub grace_seconds: i64,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// When it became ACTIVE.
    pub activated_at: Option<DateTime<Utc>>,
    /// When it stopped being ACTIVE or PENDING.
    pub expired_at: Option<DateTime<Utc>>,
    /// Until when cryptograms under it are still accepted (EXPIRED keys only).
    pub grace_until: Option<DateTime<Utc>>,
}

/// The keys a terminal's traffic may be checked against right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsableKeys {
    /// The ACTIVE key.
    pub active: Option<KeyRecord>,
    /// The newest PENDING key (awaiting the terminal's confirmation).
    pub pending: Option<KeyRecord>,
    /// EXPIRED keys whose grace has not ended, newest first.
    pub in_grace: Vec<KeyRecord>,
}

/// A key lifecycle step (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyTransition {
    /// PENDING → ACTIVE; the previous ACTIVE key of the same (terminal, type) expires with grace.
    Activate,
    /// ACTIVE → EXPIRED (with grace) or PENDING → EXPIRED (without).
    Expire,
    /// Anything but REVOKED → REVOKED, no grace.
    Revoke,
}

impl KeyTransition {
    /// The target state's name, as used in errors and audit records.
    pub fn target(self) -> &'static str {
        match self {
            KeyTransition::Activate => "ACTIVE",
            KeyTransition::Expire => "EXPIRED",
            KeyTransition::Revoke => "REVOKED",
        }
    }

    /// Audit action name.
    pub fn action(self) -> &'static str {
        match self {
            KeyTransition::Activate => "key.activate",
            KeyTransition::Expire => "key.expire",
            KeyTransition::Revoke => "key.revoke",
        }
    }
}

/// When the keys of a fleet rotation become ACTIVE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Activation {
    /// When each terminal confirms its new key (0800/162 or the 0810 to a server 161).
    OnConfirm,
    /// At a fixed time, confirmed or not.
    AtTime(DateTime<Utc>),
}

/// A fleet rotation to record together with its PENDING keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRotation {
    /// Caller-chosen id.
    pub id: RotationId,
    /// Which key type is rotated.
    pub key_type: KeyType,
    /// When the new keys become ACTIVE.
    pub activation: Activation,
    /// Grace the replaced keys keep.
    pub grace_seconds: i64,
}

/// A rotation and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// Rotation id.
    pub id: RotationId,
    /// Rotated key type.
    pub key_type: KeyType,
    /// When the keys become ACTIVE.
    pub activation: Activation,
    /// Grace the replaced keys keep.
    pub grace_seconds: i64,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// Keys of this rotation by state; every state is present, zeros included.
    pub totals: BTreeMap<KeyState, u64>,
    /// How many terminals got a key in this rotation.
    pub terminals: u64,
}

/// A ledger account to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    /// Bank-chosen id.
    pub id: AccountId,
    /// ISO 4217 numeric currency (3 digits).
    pub currency: String,
    /// Opening balance in minor units (≥ 0).
    pub balance: i64,
    /// Most that may be withdrawn per UTC day, minor units (≥ 0).
    pub daily_withdrawal_limit: i64,
}

/// A ledger account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    /// Account id.
    pub id: AccountId,
    /// ISO 4217 numeric currency.
    pub currency: String,
    /// Ledger balance in minor units.
    pub balance: i64,
    /// Daily withdrawal limit in minor units.
    pub daily_withdrawal_limit: i64,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
}

/// A card to register. The store never sees the PAN, only its keyed hash.
#[derive(Clone, PartialEq, Eq)]
pub struct NewCard {
    /// Keyed hash of the PAN (hex), computed by the HSM.
    pub pan_token: String,
    /// Last four PAN digits, for display.
    pub last4: String,
    /// Expiry `YYMM`.
    pub expiry: String,
    /// Account the card draws on.
    pub account_id: AccountId,
    /// PIN verification value (keyed hash under the PVK).
    pub pvv: String,
    /// Upstream issuer whose stand-in data this card is, if any.
    pub upstream: Option<String>,
}

impl fmt::Debug for NewCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewCard")
            .field("last4", &self.last4)
            .field("expiry", &self.expiry)
            .field("account_id", &self.account_id)
            .field("pvv", &"<redacted>")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// A registered card.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Card {
    /// Card id.
    pub id: CardId,
    /// Keyed hash of the PAN.
    pub pan_token: String,
    /// Last four PAN digits.
    pub last4: String,
    /// Expiry `YYMM`.
    pub expiry: String,
    /// Account the card draws on.
    pub account_id: AccountId,
    /// PIN verification value; never serialized, redacted in `Debug`.
    #[serde(skip)]
    pub pvv: String,
    /// Consecutive wrong PINs.
    pub pin_tries: u32,
    /// Three or more consecutive wrong PINs: `75` until a PIN reset.
    pub pin_blocked: bool,
    /// Upstream issuer whose stand-in data this card is, if any.
    pub upstream: Option<String>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

impl fmt::Debug for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card")
            .field("id", &self.id)
            .field("last4", &self.last4)
            .field("expiry", &self.expiry)
            .field("account_id", &self.account_id)
            .field("pvv", &"<redacted>")
            .field("pin_tries", &self.pin_tries)
            .field("pin_blocked", &self.pin_blocked)
            .field("upstream", &self.upstream)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Consecutive wrong PINs after which the card's PIN is blocked (SPEC §4).
pub const PIN_TRIES_LIMIT: u32 = 3;

/// How long a reserved PIN try ([`super::Database::reserve_pin_try`]) counts while its request
/// has not settled it. A request settles its try within seconds (HSM check, then the journal
/// transaction, whose connection wait is bounded by the pool's acquire timeout); only a process
/// that died between reserving and settling leaves one behind, and it must not cost the
/// cardholder a try forever. Reservations are counted per card, not one by one: they stop
/// counting together once the card's newest reservation is this old.
pub const PIN_RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// What [`super::Database::reserve_pin_try`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReservation {
    /// A try is reserved for this request: check the PIN, then settle it ([`PinTry`] in the
    /// journal transaction) or release it.
    Reserved,
    /// Three consecutive wrong PINs are settled: the card is blocked (`75`), the PIN is not
    /// checked.
    Exhausted,
    /// Fewer than three wrong PINs are settled, but tries other requests reserved and are still
    /// checking make three: ask again once they settle.
    InFlight,
}

/// A PIN try reserved for a request and checked in the HSM, settled by
/// [`super::Database::authorize`] with the journal row that explains it (they are written
/// together or not at all):
/// - a wrong PIN turns the reservation into a consecutive failure (`pin_tries + 1`); the
///   journal gets `55`, or `75` when that makes three;
/// - a correct PIN ends the run of settled wrong PINs (`pin_tries = 0`) and gives back its own
///   reservation, but leaves the tries other requests reserved and are still checking: they
///   settle after it, as wrong PINs following the correct one;
/// - a request that turns out to be a duplicate only gives its reservation back (the original
///   already counted).
///
/// The settled count is written only if it is still the one the decision read, so settling
/// tries concurrently never loses one.
#[derive(Clone, PartialEq, Eq)]
pub struct PinTry {
    /// The card the PIN was checked for.
    pub card_id: CardId,
    /// Whether the PIN matched the card's PVV.
    pub correct: bool,
    /// The PVV it was checked against: if the PIN was reset since, the check says nothing
    /// about the new one and the request is decided again ([`super::StoreError::Stale`]).
    pub pvv: String,
}

impl fmt::Debug for PinTry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinTry")
            .field("card_id", &self.card_id)
            .field("correct", &self.correct)
            .field("pvv", &"<redacted>")
            .finish()
    }
}

/// How a request names its card when the view is read. `Debug` leaves the PAN token out: it
/// names one card across every log line that would carry it.
#[derive(Clone, PartialEq, Eq)]
pub enum CardLookup {
    /// By id.
    Id(CardId),
    /// By the PAN's token (the HSM's keyed hash; never the PAN).
    PanToken(String),
}

impl fmt::Debug for CardLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CardLookup::Id(id) => f.debug_tuple("Id").field(id).finish(),
            CardLookup::PanToken(_) => f.write_str("PanToken(***)"),
        }
    }
}

/// What to read for an authorization ([`super::Database::authorization_view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewKey {
    /// The request identity (duplicates, and a reversal that came first).
    pub identity: RequestIdentity,
    /// The card, if the request has one.
    pub card: Option<CardLookup>,
    /// The account, when it is not the card's.
    pub account: Option<AccountId>,
    /// The acquirer station whose advice ceilings count (force-posts): the store takes the
    /// advice's share of the station's per-day ceiling in the same statement as the read.
    pub station: Option<TerminalId>,
    /// The business day (UTC `YYYY-MM-DD`) of the daily totals.
    pub day: String,
    /// Reserve a PIN try on the card at this time, in the same statement as the read (see
    /// [`super::Database::reserve_pin_try`]); the view says how it went.
    pub reserve_pin_at: Option<DateTime<Utc>>,
}

/// Everything an authorization is decided on, read in one statement: the request identity's
/// journal row, the card and its PIN count, the account, the day's totals. A posting decided on
/// it is written only if all of that is unchanged ([`AuthRequest::seen`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthView {
    pub(crate) key: ViewKey,
    /// The identity's journal row and its request digest; an empty digest marks a row a
    /// reversal placed before its original arrived.
    pub(crate) journal: Option<(String, JournalEntry)>,
    /// A reversal naming this identity was journaled (by a version that placed no row).
    pub(crate) reversed_before: bool,
    pub(crate) card: Option<Card>,
    pub(crate) account: Option<Account>,
    /// The account's withdrawals on `key.day`.
    pub(crate) withdrawn: i64,
    /// How reserving a PIN try went, when the key asked for one and the card exists.
    pub(crate) pin_reservation: Option<PinReservation>,
}

impl AuthView {
    /// The answered request under this identity and its digest, if there is one.
    pub fn answered(&self) -> Option<(&str, &JournalEntry)> {
        self.journal
            .as_ref()
            .filter(|(digest, _)| !digest.is_empty())
            .map(|(digest, entry)| (digest.as_str(), entry))
    }

    /// The card, as read.
    pub fn card(&self) -> Option<&Card> {
        self.card.as_ref()
    }

    /// How reserving a PIN try went (when the key asked for one and the card exists).
    pub fn pin_reservation(&self) -> Option<PinReservation> {
        self.pin_reservation
    }
}

/// What identifies a request (SPEC §3 duplicates): terminal, STAN (field 11), transmission
/// date-time (field 7).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestIdentity {
    /// Field 41.
    pub terminal_id: TerminalId,
    /// Field 11, 6 digits.
    pub stan: String,
    /// Field 7, `MMDDhhmmss`.
    pub transmission: String,
}

impl RequestIdentity {
    /// Validates STAN (6 digits) and transmission date-time (10 digits).
    pub fn new(
        terminal_id: TerminalId,
        stan: impl Into<String>,
        transmission: impl Into<String>,
    ) -> Result<Self, InvalidValue> {
        let stan = stan.into();
        let transmission = transmission.into();
        if stan.len() != 6 || !stan.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue {
                what: "STAN",
                problem: "must be 6 digits".into(),
            });
        }
        if transmission.len() != 10 || !transmission.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue {
                what: "transmission date-time",
                problem: "must be 10 digits (MMDDhhmmss)".into(),
            });
        }
        Ok(Self {
            terminal_id,
            stan,
            transmission,
        })
    }
}

/// What an 0200 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthKind {
    /// Balance inquiry (processing code 31xx00).
    Balance,
    /// Cash withdrawal (processing code 01xx00) of `amount` minor units.
    Withdrawal {
        /// Field 4.
        amount: i64,
    },
}

/// A financial request to authorize against the local ledger, written all together or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthRequest {
    /// Duplicate-detection identity.
    pub identity: RequestIdentity,
    /// Opaque digest of the request content; same identity + other digest ⇒ `94`.
    pub digest: String,
    /// Request MTI (e.g. `0200`).
    pub mti: String,
    /// Balance inquiry or withdrawal.
    pub kind: AuthKind,
    /// Card used, when known.
    pub card_id: Option<CardId>,
    /// Account to authorize against (required unless `decline` is set).
    pub account_id: Option<AccountId>,
    /// Field 49.
    pub currency: String,
    /// Field 37 assigned by the switch.
    pub rrn: String,
    /// Field 38 to give if approved.
    pub auth_code: String,
    /// The caller already declined (bad PIN, expired card, …): journal this code, touch nothing.
    pub decline: Option<ResponseCode>,
    /// Business time; its UTC day is the day of the withdrawal limit.
    pub now: DateTime<Utc>,
    /// Stand-in: enqueue this advice in the same database transaction iff the request is
    /// approved now (response `00`, processed now — not a duplicate). Never enqueued for a
    /// decline. An advice whose idempotency key is already queued is left as it is; one without
    /// a `reference` gets the journal id.
    pub advice: Option<NewAdvice>,
    /// Routed to an issuer: journal this answer (code, auth code, balances) as the response and
    /// touch no account; `account_id` may be None.
    pub issuer_answer: Option<IssuerAnswer>,
    /// An issuer posting a 0220 advice: approve without the balance and daily-limit checks (the
    /// acquirer already paid the cash out; the debit still counts toward the day's total and
    /// may take the balance below zero). Currency mismatch still declines `12`; unknown account
    /// is an error as today.
    pub force_post: bool,
    /// With `force_post`: the station's ceilings. An advice above either is refused with
    /// [`StoreError::OverCeiling`](super::StoreError::OverCeiling) and nothing is journaled or
    /// counted, so once an operator raised the ceiling the acquirer's requeued advice books. A
    /// repeat of an advice already booked gets its original answer whatever the ceiling is now.
    pub force_post_ceiling: Option<ForcePostCeiling>,
    /// `upstream:MTI:STAN:transmission` of the message sent (or advised) to an issuer for this
    /// request, kept in the journal so a later reversal can be forwarded.
    pub upstream_ref: Option<String>,
    /// The PIN checked for this request, counted with its journal row (see [`PinTry`]). A wrong
    /// PIN must come with `decline` = `55`; the store journals `75` instead when it is the
    /// third consecutive one.
    pub pin_try: Option<PinTry>,
    /// The view the caller decided on (its card and PIN checks), read with
    /// [`super::Database::authorization_view`] for this request: the store posts against it
    /// and reads again only if it changed. `None`: the store reads it.
    pub seen: Option<AuthView>,
}

/// How much an issuer force-posts from one acquirer station's advices (`[stations]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcePostCeiling {
    /// Largest amount (minor units) of one advice.
    pub per_advice: i64,
    /// Largest total (minor units) of the advices booked for the station in one UTC day.
    pub per_day: i64,
}

/// What an issuer answered to a request routed to it, journaled as the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerAnswer {
    /// Field 39 from the issuer.
    pub response_code: ResponseCode,
    /// Field 38 from the issuer.
    pub auth_code: Option<String>,
    /// Ledger balance from the issuer's field 54.
    pub ledger_balance: Option<i64>,
    /// Available balance from the issuer's field 54.
    pub available_balance: Option<i64>,
}

/// An upstream link's working keys, wrapped under the LMK. Debug redacts the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkKeys {
    /// PIN key of the link.
    pub tpk: WrappedKey,
    /// MAC key of the link.
    pub tak: WrappedKey,
    /// When the acquirer finished exchanging them; the newer pair wins.
    pub exchanged_at: DateTime<Utc>,
}

impl fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkKeys")
            .field("tpk", &"<redacted>")
            .field("tak", &"<redacted>")
            .field("exchanged_at", &self.exchanged_at)
            .finish()
    }
}

/// What a journal row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum JournalKind {
    /// Balance inquiry.
    Balance,
    /// Cash withdrawal.
    Withdrawal,
    /// Reversal (0400/0420/0421) of an earlier request.
    Reversal,
}

impl JournalKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalKind::Balance => "balance",
            JournalKind::Withdrawal => "withdrawal",
            JournalKind::Reversal => "reversal",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "balance" => Some(JournalKind::Balance),
            "withdrawal" => Some(JournalKind::Withdrawal),
            "reversal" => Some(JournalKind::Reversal),
            _ => None,
        }
    }
}

/// One answered financial request: enough to repeat the original response to a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JournalEntry {
    /// Journal row id.
    pub id: String,
    /// Request identity.
    pub identity: RequestIdentity,
    /// Digest of the request content (tells a retransmission from a different request).
    #[serde(skip)]
    pub digest: String,
    /// Request MTI.
    pub mti: String,
    /// What was asked.
    pub kind: JournalKind,
    /// Withdrawal amount (for a reversal: the amount of the original withdrawal, if found).
    pub amount: Option<i64>,
    /// Currency (empty for a reversal whose original is unknown).
    pub currency: String,
    /// Field 39 given.
    pub response_code: String,
    /// Field 37.
    pub rrn: String,
    /// Field 38, only when approved.
    pub auth_code: Option<String>,
    /// Ledger balance after the request (approved balance inquiries and withdrawals).
    pub ledger_balance: Option<i64>,
    /// Available balance after the request.
    pub available_balance: Option<i64>,
    /// True once a reversal restored this request's effect.
    pub reversed: bool,
    /// `upstream:MTI:STAN:transmission` of the message an issuer knows this request by (routed
    /// or stand-in); on a reversal, its original's, when the reversal reversed it.
    #[serde(skip)]
    pub upstream_ref: Option<String>,
    /// When it was answered.
    pub created_at: DateTime<Utc>,
}

impl JournalEntry {
    /// True when the response was `00`.
    pub fn approved(&self) -> bool {
        self.response_code == ResponseCode::Approved.as_str()
    }
}

/// What became of an authorization or reversal request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Processed now; the entry holds the response.
    Done(JournalEntry),
    /// Seen before with the same content: answer exactly as the first time, nothing changed.
    Duplicate(JournalEntry),
    /// Seen before with different content: answer `94`, nothing changed.
    ContentMismatch,
}

/// A reversal (0400/0420/0421) to apply exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReversalRequest {
    /// Identity of the reversal message itself.
    pub identity: RequestIdentity,
    /// Opaque digest of the reversal's content.
    pub digest: String,
    /// Reversal MTI.
    pub mti: String,
    /// The original request, from field 90 (same terminal).
    pub original: RequestIdentity,
    /// Field 37.
    pub rrn: String,
    /// Business time.
    pub now: DateTime<Utc>,
}

/// An audit record to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAudit {
    /// Who (token name, `system`, `operator`).
    pub actor: String,
    /// What, e.g. `terminal.create`, `key.activate`.
    pub action: String,
    /// On what (an id).
    pub target: String,
    /// `ok`, `denied`, `failed`, …
    pub result: String,
    /// Anything else worth keeping; never secrets.
    pub detail: serde_json::Value,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Monotonic id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Outcome.
    pub result: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// An admin write's claim on its `Idempotency-Key`, inserted in the write's own transaction
/// (see [`crate::store::with_claim`]). Only MACs are kept: `key_mac` of the caller and the key,
/// `request_mac` of method, path and body, both under an LMK-derived key inside the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// MAC of the caller's identity and the `Idempotency-Key` (the record's primary key).
    pub key_mac: String,
    /// MAC of the request; a retry whose MAC differs is refused.
    pub request_mac: String,
    /// Random id of this attempt, so an attempt recognises its own claim.
    pub claim_id: String,
}

/// The answer recorded for an `Idempotency-Key`, replayed to retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// HTTP status.
    pub status: u16,
    /// Response body (JSON; a problem document for an error answer).
    pub body: String,
}

/// What the store knows of an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The request it was claimed for (MAC).
    pub request_mac: String,
    /// The attempt that claimed it.
    pub claim_id: String,
    /// The answer, once the attempt finished; `None` while it runs.
    pub answer: Option<StoredAnswer>,
    /// When it was claimed.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_empty_long_and_odd_characters() {
        assert!(AccountId::new("ACC-1").is_ok());
        assert!(AccountId::new("").is_err());
        assert!(AccountId::new("a".repeat(65)).is_err());
        assert!(RotationId::new("rot 1").is_err());
        assert!(CardId::new("card-1/../x").is_err());
        assert!(KeyId::new(KeyId::generate().to_string()).is_ok());
        assert!(CardId::generate().as_str().starts_with("card-"));
    }

    #[test]
    fn a_view_key_never_shows_the_pan_token() {
        let key = ViewKey {
            identity: RequestIdentity::new(
                TerminalId::new("ATM1").unwrap(),
                "000001",
                "1122013045",
            )
            .unwrap(),
            card: Some(CardLookup::PanToken(
                "9f86d081884c7d659a2feaa0c55ad015".into(),
            )),
            account: None,
            station: None,
            day: "2026-11-30".into(),
            reserve_pin_at: None,
        };
        let shown = format!("{key:?}");
        assert!(!shown.contains("9f86d081"), "{shown}");
        assert!(shown.contains("PanToken(***)"), "{shown}");
    }

    #[test]
    fn request_identity_checks_stan_and_transmission() {
        let t = TerminalId::new("ATM1").unwrap();
        assert!(RequestIdentity::new(t.clone(), "000001", "1122013045").is_ok());
        assert!(RequestIdentity::new(t.clone(), "1", "1122013045").is_err());
        assert!(RequestIdentity::new(t.clone(), "00000A", "1122013045").is_err());
        assert!(RequestIdentity::new(t, "000001", "11220130").is_err());
    }

    #[test]
    fn card_debug_hides_the_pvv() {
        let card = Card {
            id: CardId::new("card-1").unwrap(),
            pan_token: "ab".into(),
            last4: "0004".into(),
            expiry: "2812".into(),
            account_id: AccountId::new("ACC-1").unwrap(),
            pvv: "SECRETPVV".into(),
            pin_tries: 0,
            pin_blocked: false,
            upstream: None,
            created_at: Utc::now(),
        };
        assert!(!format!("{card:?}").contains("SECRETPVV"));
        assert!(!serde_json::to_string(&card).unwrap().contains("SECRETPVV"));
    }

    #[test]
    fn key_record_never_shows_the_wrapped_key() {
        let key = KeyRecord {
            id: KeyId::generate(),
            terminal_id: TerminalId::new("ATM1").unwrap(),
            key_type: KeyType::Tpk,
            version: 1,
            state: KeyState::Active,
            kcv: "1A2B3C".into(),
            wrapped: WrappedKey::new("DEADBEEFWRAPPED"),
            rotation_id: None,
            grace_seconds: 300,
            created_at: Utc::now(),
            activated_at: None,
            expired_at: None,
            grace_until: None,
        };
        assert!(!format!("{key:?}").contains("DEADBEEFWRAPPED"));
        let json = serde_json::to_string(&key).unwrap();
        assert!(!json.contains("DEADBEEFWRAPPED"));
        assert!(json.contains("\"type\":\"TPK\""));
    }

    #[test]
    fn link_keys_debug_hides_the_keys() {
        let keys = LinkKeys {
            tpk: WrappedKey::new("WRAPPEDTPKBYTES"),
            tak: WrappedKey::new("WRAPPEDTAKBYTES"),
            exchanged_at: Utc::now(),
        };
        let shown = format!("{keys:?}");
        assert!(!shown.contains("WRAPPEDTPKBYTES") && !shown.contains("WRAPPEDTAKBYTES"));
        assert!(
            !shown.contains("chars"),
            "not even the wrapped length: {shown}"
        );
    }

    #[test]
    fn api_shapes_are_camel_case() {
        let account = Account {
            id: AccountId::new("ACC-1").unwrap(),
            currency: "360".into(),
            balance: 500_000,
            daily_withdrawal_limit: 300_000,
            created_at: DateTime::from_timestamp(0, 0).unwrap(),
        };
        assert_eq!(
            serde_json::to_value(&account).unwrap(),
            serde_json::json!({"id": "ACC-1", "currency": "360", "balance": 500000,
                "dailyWithdrawalLimit": 300000, "createdAt": "1970-01-01T00:00:00Z"})
        );
        let mut totals = BTreeMap::new();
        totals.insert(KeyState::Pending, 2u64);
        let status = RotationStatus {
            id: RotationId::new("rot-1").unwrap(),
            key_type: KeyType::Tpk,
            activation: Activation::OnConfirm,
            grace_seconds: 300,
            created_at: DateTime::from_timestamp(0, 0).unwrap(),
            totals,
            terminals: 2,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["keyType"], "TPK");
        assert_eq!(json["activation"], "onConfirm");
        assert_eq!(json["totals"]["PENDING"], 2);
    }

    #[test]
    fn page_limit_is_clamped() {
        assert_eq!(Page::default().effective_limit(), 100);
        assert_eq!(
            Page {
                after: None,
                limit: 5000
            }
            .effective_limit(),
            1000
        );
    }
}

/// Key counts for the `switchyard_keys` and `switchyard_key_age_seconds` gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Keys by type and state (absent pairs are zero).
    pub counts: Vec<(KeyType, KeyState, u64)>,
    /// Activation time of the oldest ACTIVE key of each type.
    pub oldest_active: Vec<(KeyType, DateTime<Utc>)>,
}
