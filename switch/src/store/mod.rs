//! The switch's persistent store: one [`Database`] trait, implemented once by [`CoreStore`]
//! over two engines chosen from the URL scheme, embedded per-backend migrations, and the pure
//! ledger and key-lifecycle rules.
//!
//! Layers, top to bottom:
//! - `scripts/` — every transaction script (authorize, reverse, key transitions, SAF lease and
//!   settle, rotations, STAN blocks…), written once over the [`sql::Conn`] primitives;
//! - this file — the trait, the pure rules the scripts apply (withdrawal decision, reversal
//!   plan, key-transition checks) and the migrations;
//! - `sql.rs` — the primitives: run a statement, rows of plain values, the locks whose form
//!   differs, and the few SQL markers each dialect renders;
//! - `postgres.rs`, `sqlite.rs` — the engines: binding and decoding, pools, transactions.
//!   PostgreSQL runs each script in its own READ COMMITTED transaction and locks what a
//!   decision depends on; SQLite runs scripts on one writer thread, many per commit.
//!
//! Admin writes run under an `Idempotency-Key` claim ([`with_claim`]); every audit insert made
//! inside one also inserts the claim, in the same transaction (see `idempotency.rs`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::domain::{KeyOwner, KeyState, KeyType, ResponseCode, TerminalId, WrappedKey};

mod engine;
mod error;
mod idempotency;
mod key_cache;
mod models;
mod postgres;
mod registry;
mod saf;
mod scripts;
mod sql;
mod sqlite;

pub use engine::CoreStore;
pub use error::{BoxError, StoreError};
pub use idempotency::{CLAIM_STALE_AFTER, with_claim};
pub use key_cache::{KeyCache, KeyCachingStore, Lookup, usable_at};
pub use models::*;
pub use postgres::{PgEngine, PostgresStore};
pub use registry::{
    FleetSessions, LiveSession, PushClaim, PushDue, RegistrySweep, ReplicaSessions, SessionEntry,
    SessionRef,
};
pub use saf::{
    Advice, AdviceFailure, AdviceId, AdviceMti, AdviceStatus, EnqueueOutcome, FailOutcome,
    NewAdvice, RetryPolicy, SafBacklog, SafFilter, SafStats, saf_backoff,
};
pub use sql::Violation;
pub use sqlite::{SqliteEngine, SqliteStore};

/// The store as the rest of the switch holds it.
pub type Store = Arc<dyn Database>;

/// Pool settings shared by both backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a caller waits for a connection (and, on SQLite, for the write lock) before the
    /// store reports itself unavailable.
    pub acquire_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens a store for `url`: `sqlite://…` / `sqlite::memory:` or `postgres://…` /
/// `postgresql://…`. Does not migrate; call [`Database::migrate`].
pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Store, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, opts).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url, opts).await?))
    } else {
        let scheme = url.split(':').next().unwrap_or_default();
        Err(StoreError::Config {
            what: format!(
                "unsupported database URL scheme {scheme:?}; use sqlite:// or postgres://"
            ),
        })
    }
}

/// Everything the switch persists. Implemented by [`SqliteStore`] and [`PostgresStore`].
#[async_trait]
pub trait Database: Send + Sync + std::fmt::Debug {
    /// Which engine this is.
    fn backend(&self) -> Backend;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Applied vs expected migrations; works on an empty database.
    async fn migration_status(&self) -> Result<MigrationStatus, StoreError>;
    /// Round trip to the database.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Pool occupancy.
    fn pool_stats(&self) -> PoolStats;
    /// Waits for checked-out connections to come back, then closes the pool (graceful shutdown,
    /// after in-flight transactions finished). Later calls fail as `Unavailable`.
    async fn close(&self);

    /// Registers a terminal (or acquirer station); `Conflict` if the id exists. Audited.
    async fn create_terminal(&self, t: &NewTerminal, actor: &str) -> Result<Terminal, StoreError>;
    /// Registers many terminals in one transaction (fleet onboarding); `Conflict` and nothing
    /// stored if any id exists. One audit record. Returns how many were registered.
    async fn create_terminals_bulk(
        &self,
        terminals: &[NewTerminal],
        actor: &str,
    ) -> Result<u64, StoreError>;
    /// One terminal.
    async fn get_terminal(&self, id: &TerminalId) -> Result<Option<Terminal>, StoreError>;
    /// Terminals ordered by id, keyset-paged.
    async fn list_terminals(&self, page: Page) -> Result<Vec<Terminal>, StoreError>;
    /// Ids of the registered terminals a selector covers, ordered, without duplicates. `All`
    /// and `Groups` leave acquirer stations out: a station's keys are exchanged by the acquirer
    /// itself, never pushed by a fleet rotation; `Ids` covers whatever it names.
    async fn terminals_in(&self, sel: &TerminalSelector) -> Result<Vec<TerminalId>, StoreError>;

    /// Stores a key with version = previous max + 1 for its (terminal, type). `Active` (TMK
    /// import) expires the previous ACTIVE key with the new key's grace. Audited.
    async fn insert_key(&self, k: &NewKey, actor: &str) -> Result<KeyRecord, StoreError>;
    /// Stores a fleet rotation and its PENDING keys in one transaction. One audit record.
    async fn insert_keys_bulk(
        &self,
        keys: &[NewKey],
        rotation: &NewRotation,
        actor: &str,
    ) -> Result<(), StoreError>;
    /// One key.
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// A terminal's keys, by type then version.
    async fn list_keys(&self, terminal: &TerminalId) -> Result<Vec<KeyRecord>, StoreError>;
    /// The keys a terminal's traffic may be verified with at `now`.
    async fn keys_for_use(
        &self,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<UsableKeys, StoreError>;
    /// Key rows, by id after `after`, at most `limit`, whose block may carry no owner binding
    /// (written before keys were bound to their terminal, SPEC §4): a TR-31 header without
    /// optional blocks (characters 13–14 `00`), which every binding block adds. The HSM decides
    /// for each ([`crate::crypto::Hsm::rebind`]).
    async fn unbound_keys(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Replaces a key row's block with `new` (the same key re-wrapped, bound to its owner) iff
    /// the row still holds `old`; returns whether it did.
    async fn rewrap_key(
        &self,
        id: &KeyId,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError>;
    /// Moves a key through its lifecycle (SPEC §4); one transaction and one audit record.
    async fn transition_key(
        &self,
        id: &KeyId,
        to: KeyTransition,
        grace: Duration,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError>;
    /// A rotation and the counts of its keys by state.
    async fn rotation_totals(
        &self,
        rotation: &RotationId,
    ) -> Result<Option<RotationStatus>, StoreError>;
    /// Ends the grace (`grace_until = now`) of the previous keys of terminals whose key of this
    /// rotation is ACTIVE; returns how many keys. Audited.
    async fn expire_previous(
        &self,
        rotation: &RotationId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Keys by type and state, and the oldest ACTIVE key of each type (for the key gauges).
    async fn key_stats(&self) -> Result<KeyStats, StoreError>;
    /// PENDING keys of `atTime` rotations whose activation time has come, at most `limit`.
    async fn due_pending_keys(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// Opens an account; `Conflict` if the id exists. Audited.
    async fn create_account(&self, a: &NewAccount, actor: &str) -> Result<Account, StoreError>;
    /// One account.
    async fn get_account(&self, id: &AccountId) -> Result<Option<Account>, StoreError>;
    /// Registers a card; `Conflict` on a known PAN token, `NotFound` without its account. Audited.
    async fn create_card(&self, c: &NewCard, actor: &str) -> Result<Card, StoreError>;
    /// One card by id.
    async fn get_card(&self, id: &CardId) -> Result<Option<Card>, StoreError>;
    /// One card by PAN token.
    async fn find_card(&self, pan_token: &str) -> Result<Option<Card>, StoreError>;
    /// Reserves one PIN try on the card before its PIN is checked (SPEC §4), in one statement,
    /// so concurrent requests never get more than [`PIN_TRIES_LIMIT`] tries between resets:
    /// `Reserved` while settled wrong PINs plus tries still in flight (reserved less than
    /// [`PIN_RESERVATION_TTL`] ago) stay below the limit; else `Exhausted` when the settled
    /// ones alone reach it (blocked), `InFlight` when tries in flight fill the rest. `NotFound`
    /// for an unknown card. The try is settled by [`Database::authorize`] ([`AuthRequest::pin_try`])
    /// or given back with [`Database::release_pin_try`].
    async fn reserve_pin_try(
        &self,
        card: &CardId,
        now: DateTime<Utc>,
    ) -> Result<PinReservation, StoreError>;
    /// Gives back a reserved try that will not be settled (the request failed before its
    /// journal transaction committed): it counts as no try at all.
    async fn release_pin_try(&self, card: &CardId) -> Result<(), StoreError>;
    /// Everything an authorization of `key.identity` is decided on, in one read (one round
    /// trip): its journal row (a duplicate), the card and its PIN count, the account and the
    /// day's totals, and (`reserve_pin_at`) a PIN try reserved on the card in the same
    /// statement. Pass it back in [`AuthRequest::seen`]. `NotFound` never: what is missing is
    /// `None` in the view.
    async fn authorization_view(&self, key: &ViewKey) -> Result<AuthView, StoreError>;
    /// New PVV, tries back to 0. Audited.
    async fn reset_pin(&self, card: &CardId, pvv: &str, actor: &str) -> Result<(), StoreError>;

    /// The journal entry of a request identity.
    async fn find_request(&self, id: &RequestIdentity) -> Result<Option<JournalEntry>, StoreError>;
    /// Authorizes a balance inquiry or withdrawal against the ledger, journals an issuer's
    /// answer, or force-posts an issuer-side advice; queues a stand-in advice with an approval.
    /// Decided in Rust on the request's [`AuthView`], then written in one guarded statement
    /// (PostgreSQL: one round trip, no transaction around it): the journal row, the PIN count,
    /// the debit, the day's total and the advice commit or vanish together, and only if what
    /// the decision read is unchanged; if it changed, the store reads again and decides again.
    /// `Stale` only when the PIN was reset since it was checked (check it again).
    async fn authorize(&self, req: &AuthRequest) -> Result<AuthOutcome, StoreError>;
    /// Applies a reversal exactly once (one transaction).
    async fn reverse(&self, req: &ReversalRequest) -> Result<AuthOutcome, StoreError>;

    /// Reserves `count` (1..=100,000) consecutive STANs for an acquirer station and returns the
    /// first. STANs run 1..=999,999 and wrap, and so may a block: its i-th STAN is
    /// `((first - 1 + i) % 999_999) + 1`. A new station starts at 1. One statement, so
    /// processes sharing a PostgreSQL store never get overlapping blocks.
    async fn reserve_stans(&self, station: &str, count: u32) -> Result<u32, StoreError>;
    /// The working keys an acquirer process last exchanged with this upstream, if any.
    async fn link_keys(&self, upstream: &str) -> Result<Option<LinkKeys>, StoreError>;
    /// Stores an upstream's working keys, unless keys exchanged later are stored already (two
    /// processes exchanging at once keep the newer pair).
    async fn save_link_keys(&self, upstream: &str, keys: &LinkKeys) -> Result<(), StoreError>;

    /// Records a sign-on the switch accepts from `terminal`, identified by its STAN (field 11)
    /// and transmission date-time (field 7). `false` when that identity was accepted before: a
    /// replay (SPEC §3, profile v2). The terminal's records accepted before `prune_before` are
    /// removed in the same call, so the table holds one replay window per terminal.
    async fn accept_sign_on(
        &self,
        terminal: &TerminalId,
        stan: &str,
        transmitted: &str,
        now: DateTime<Utc>,
        prune_before: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Appends an audit record.
    async fn append_audit(&self, e: &NewAudit) -> Result<(), StoreError>;
    /// Audit records at or after `since`, oldest first; at most `limit` (0 means 100, capped at
    /// 1000).
    async fn list_audit(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// What is recorded for an admin `Idempotency-Key`, by its MAC.
    async fn idempotency_get(&self, key_mac: &str)
    -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Records the answer of the attempt holding `claim` (its claim committed with its write).
    /// When that attempt made no audited write, so nothing claimed the key, records claim and
    /// answer together now, unless another attempt claimed the key meanwhile. Returns whether
    /// the answer was recorded.
    async fn idempotency_finish(
        &self,
        claim: &IdempotencyClaim,
        answer: &StoredAnswer,
    ) -> Result<bool, StoreError>;
    /// Deletes up to `limit` `Idempotency-Key` records created before `before`; returns how many
    /// it deleted (fewer than `limit`: none older is left).
    async fn purge_idempotency(&self, before: DateTime<Utc>, limit: u32)
    -> Result<u64, StoreError>;

    /// Queues an advice for an upstream. A second enqueue with the same idempotency key stores
    /// nothing and answers `AlreadyQueued` with the first advice's id, whatever its status.
    async fn saf_enqueue(&self, a: &NewAdvice) -> Result<EnqueueOutcome, StoreError>;
    /// Leases up to `limit` (at most 1000) advices due at `now` (for one destination or all) to `holder` until
    /// `now + lease`, in delivery order: priority, then creation time, then id. An advice under
    /// a lease that has not ended is never handed out again; one whose lease ended is. Each
    /// lease starts an attempt (`attempts + 1`), so [`Advice::send_mti`] is right even after a
    /// drainer died mid-send. On
    /// PostgreSQL concurrent drainers skip each other's rows (`FOR UPDATE SKIP LOCKED`); on
    /// SQLite the write lock serializes them. `holder` must be unique per drainer instance.
    async fn saf_lease(
        &self,
        destination: Option<&str>,
        holder: &str,
        lease: Duration,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Advice>, StoreError>;
    /// Marks a leased advice delivered. `LeaseLost` (and nothing changed) unless `holder` still
    /// holds it; an ended lease nobody re-took still counts, since the delivery happened.
    async fn saf_complete(
        &self,
        id: AdviceId,
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// [`Database::saf_complete`] for many advices in one statement (what a drainer settles
    /// after sending a batch). Returns the ids it settled; the others were no longer held by
    /// `holder` (their lease ended and another drainer took them) and are left unchanged.
    async fn saf_complete_many(
        &self,
        ids: &[AdviceId],
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<AdviceId>, StoreError>;
    /// Records that the leased attempt failed: retried after exponential backoff, or a dead
    /// letter (audited) when refused for good or when the attempts since the last requeue
    /// reach `policy.max_attempts`. `LeaseLost` unless
    /// `holder` still holds it.
    async fn saf_fail(
        &self,
        id: AdviceId,
        holder: &str,
        failure: &AdviceFailure,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError>;
    /// One advice.
    async fn saf_get(&self, id: AdviceId) -> Result<Option<Advice>, StoreError>;
    /// Advices by id, keyset-paged (`page.after` is an advice id).
    async fn saf_list(&self, filter: &SafFilter, page: Page) -> Result<Vec<Advice>, StoreError>;
    /// Backlog, in-flight, oldest age, dead letters and deliveries at `now`.
    async fn saf_stats(&self, now: DateTime<Utc>) -> Result<SafStats, StoreError>;
    /// Makes a queued advice due now (an operator's "retry now"); a current lease is left to
    /// finish. `AdviceState` for a settled advice. Audited.
    async fn saf_retry(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError>;
    /// Withdraws a queued or dead-lettered advice for good. `AdviceState` while a drainer holds
    /// it (it may be on the wire) or once delivered. Audited.
    async fn saf_cancel(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError>;
    /// Puts a dead letter back in the queue, due now, with a fresh attempt budget (repeats
    /// still go out as 0221/0421). `AdviceState` unless it is a dead letter. Audited.
    async fn saf_requeue_dead_letter(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError>;

    // The fleet-wide session registry (issue 16; `registry.rs`, `scripts/sessions.rs`).

    /// A replica starts: removes its sessions and pushes left from an earlier run and starts its
    /// lease (`now + lease`). Returns how many stale sessions it removed.
    async fn register_replica(
        &self,
        replica: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    /// Renews the replica's lease (re-registering it if others already swept it), marks its
    /// `active` connections seen at `now`, removes every session of replicas whose lease ended,
    /// and returns the replica's own sessions as recorded.
    async fn renew_replica(
        &self,
        replica: &str,
        lease: Duration,
        active: &[i64],
        now: DateTime<Utc>,
    ) -> Result<RegistrySweep, StoreError>;
    /// A replica stops cleanly: its sessions, pushes and lease are removed.
    async fn release_replica(&self, replica: &str) -> Result<(), StoreError>;
    /// Records a sign-on. For an ATM, its sessions on other connections (on any replica) are
    /// removed in the same transaction and returned, for their replicas to close; a station's
    /// sessions live side by side. A connection signing on as another terminal leaves its
    /// previous one.
    async fn record_sign_on(
        &self,
        entry: &SessionEntry,
        now: DateTime<Utc>,
    ) -> Result<Vec<SessionRef>, StoreError>;
    /// A session ended (sign-off, disconnect); `false` if it was not recorded (already replaced
    /// or removed).
    async fn record_session_end(&self, replica: &str, conn_id: i64) -> Result<bool, StoreError>;
    /// Removes every session of `terminal` (an operator's sign-off) and returns them.
    async fn remove_sessions(&self, terminal: &TerminalId) -> Result<Vec<SessionRef>, StoreError>;
    /// The sessions of `terminals` whose replica's lease runs at `now`, by terminal, oldest
    /// sign-on first.
    async fn live_sessions(
        &self,
        terminals: &[TerminalId],
        now: DateTime<Utc>,
    ) -> Result<Vec<LiveSession>, StoreError>;
    /// Live replicas with their session counts, and the signed-on terminals fleet-wide.
    async fn fleet_sessions(&self, now: DateTime<Utc>) -> Result<FleetSessions, StoreError>;
    /// Records a fleet rotation's `maxConcurrent` (call before [`Database::insert_keys_bulk`],
    /// so its keys are never pushed unpaced).
    async fn set_rotation_pacing(
        &self,
        rotation: &RotationId,
        max_concurrent: u32,
    ) -> Result<(), StoreError>;
    /// Keys to push on `replica`'s sessions: each signed-on ATM's newest PENDING TPK and TAK not
    /// yet pushed on its current session, oldest first (a rotation's by terminal id), at most
    /// `limit`.
    async fn due_pushes(&self, replica: &str, limit: u32) -> Result<Vec<PushDue>, StoreError>;
    /// Claims the push of `key` on one session ([`PushClaim`]); a claimed push holds a slot of
    /// its rotation's `maxConcurrent` until its terminal answers or `answer_by`.
    async fn claim_push(
        &self,
        key: &KeyId,
        replica: &str,
        conn_id: i64,
        now: DateTime<Utc>,
        answer_by: DateTime<Utc>,
    ) -> Result<PushClaim, StoreError>;
    /// The terminal on this session answered a push of a `kt` key; returns how many pushes that
    /// settled.
    async fn push_answered(
        &self,
        replica: &str,
        conn_id: i64,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Embedded migrations

/// The migration versions compiled into this binary for `backend`, in order. `restore` checks
/// a backup against them before it replaces a database.
pub fn embedded_migration_versions(backend: Backend) -> Vec<i64> {
    let list = match backend {
        Backend::Sqlite => SQLITE_MIGRATIONS,
        Backend::Postgres => POSTGRES_MIGRATIONS,
    };
    list.iter().map(|m| m.version).collect()
}

/// One migration file compiled into the binary.
struct EmbeddedMigration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

/// `migrations/sqlite/`, in version order. A unit test checks this list against the folder so
/// a new file cannot be forgotten here.
const SQLITE_MIGRATIONS: &[EmbeddedMigration] = &[
    EmbeddedMigration {
        version: 20261122020000,
        description: "initial",
        sql: include_str!("../../../migrations/sqlite/20261122020000_initial.sql"),
    },
    EmbeddedMigration {
        version: 20261122030000,
        description: "saf",
        sql: include_str!("../../../migrations/sqlite/20261122030000_saf.sql"),
    },
    EmbeddedMigration {
        version: 20261123010000,
        description: "upstream_links",
        sql: include_str!("../../../migrations/sqlite/20261123010000_upstream_links.sql"),
    },
    EmbeddedMigration {
        version: 20261123020000,
        description: "journal_upstream_ref",
        sql: include_str!("../../../migrations/sqlite/20261123020000_journal_upstream_ref.sql"),
    },
    EmbeddedMigration {
        version: 20261130000100,
        description: "accepted_sign_ons",
        sql: include_str!("../../../migrations/sqlite/20261130000100_accepted_sign_ons.sql"),
    },
    EmbeddedMigration {
        version: 20261130010000,
        description: "pin_reservations",
        sql: include_str!("../../../migrations/sqlite/20261130010000_pin_reservations.sql"),
    },
    EmbeddedMigration {
        version: 20261130020000,
        description: "idempotency_claims",
        sql: include_str!("../../../migrations/sqlite/20261130020000_idempotency_claims.sql"),
    },
    EmbeddedMigration {
        version: 20261130030000,
        description: "audit_append_only",
        sql: include_str!("../../../migrations/sqlite/20261130030000_audit_append_only.sql"),
    },
    EmbeddedMigration {
        version: 20261130030100,
        description: "station_advice_ceilings",
        sql: include_str!("../../../migrations/sqlite/20261130030100_station_advice_ceilings.sql"),
    },
    EmbeddedMigration {
        version: 20261201000100,
        description: "guarded_posts",
        sql: include_str!("../../../migrations/sqlite/20261201000100_guarded_posts.sql"),
    },
    EmbeddedMigration {
        version: 20261201100000,
        description: "session_registry",
        sql: include_str!("../../../migrations/sqlite/20261201100000_session_registry.sql"),
    },
];

/// `migrations/postgres/`, in version order (checked like [`SQLITE_MIGRATIONS`]).
const POSTGRES_MIGRATIONS: &[EmbeddedMigration] = &[
    EmbeddedMigration {
        version: 20261122020000,
        description: "initial",
        sql: include_str!("../../../migrations/postgres/20261122020000_initial.sql"),
    },
    EmbeddedMigration {
        version: 20261122030000,
        description: "saf",
        sql: include_str!("../../../migrations/postgres/20261122030000_saf.sql"),
    },
    EmbeddedMigration {
        version: 20261123010000,
        description: "upstream_links",
        sql: include_str!("../../../migrations/postgres/20261123010000_upstream_links.sql"),
    },
    EmbeddedMigration {
        version: 20261123020000,
        description: "journal_upstream_ref",
        sql: include_str!("../../../migrations/postgres/20261123020000_journal_upstream_ref.sql"),
    },
    EmbeddedMigration {
        version: 20261130000100,
        description: "accepted_sign_ons",
        sql: include_str!("../../../migrations/postgres/20261130000100_accepted_sign_ons.sql"),
    },
    EmbeddedMigration {
        version: 20261130010000,
        description: "pin_reservations",
        sql: include_str!("../../../migrations/postgres/20261130010000_pin_reservations.sql"),
    },
    EmbeddedMigration {
        version: 20261130020000,
        description: "idempotency_claims",
        sql: include_str!("../../../migrations/postgres/20261130020000_idempotency_claims.sql"),
    },
    EmbeddedMigration {
        version: 20261130030000,
        description: "audit_append_only",
        sql: include_str!("../../../migrations/postgres/20261130030000_audit_append_only.sql"),
    },
    EmbeddedMigration {
        version: 20261130030100,
        description: "station_advice_ceilings",
        sql: include_str!(
            "../../../migrations/postgres/20261130030100_station_advice_ceilings.sql"
        ),
    },
    EmbeddedMigration {
        version: 20261201000100,
        description: "guarded_posts",
        sql: include_str!("../../../migrations/postgres/20261201000100_guarded_posts.sql"),
    },
    EmbeddedMigration {
        version: 20261201100000,
        description: "session_registry",
        sql: include_str!("../../../migrations/postgres/20261201100000_session_registry.sql"),
    },
];

/// Builds a sqlx migrator from embedded files. `sqlx::migrate!` would do the same but needs the
/// `sqlx-macros` proc-macro, which compiles a second copy of SQLite, ring and both drivers for the
/// host; checksums are computed the same way (SHA-384 of the file), so `sqlx migrate info`
/// agrees with what we record.
fn build_migrator(list: &[EmbeddedMigration]) -> Migrator {
    Migrator::with_migrations(
        list.iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    Cow::Borrowed(m.description),
                    MigrationType::Simple,
                    m.sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Compares the applied versions with the embedded list.
fn migration_status_from(applied: &[i64], list: &[EmbeddedMigration]) -> MigrationStatus {
    MigrationStatus {
        applied: applied.iter().copied().max(),
        expected: list.iter().map(|m| m.version).max().unwrap_or(0),
        pending: list
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count(),
    }
}

// ---------------------------------------------------------------------------------------------
// Pure rules shared by both backends

/// Checks a lifecycle step against SPEC §4.
fn check_transition(from: KeyState, to: KeyTransition) -> Result<(), StoreError> {
    let allowed = match to {
        KeyTransition::Activate => from == KeyState::Pending,
        KeyTransition::Expire => matches!(from, KeyState::Active | KeyState::Pending),
        KeyTransition::Revoke => from != KeyState::Revoked,
    };
    if allowed {
        Ok(())
    } else {
        Err(StoreError::InvalidTransition {
            from,
            to: to.target(),
        })
    }
}

/// The answer to a withdrawal, checked in the order the ATM holder should hear about it:
/// a nonsensical amount, then the daily limit, then the balance. A forced post (an issuer
/// booking a 0220 advice) skips limit and balance: the cash is already out.
fn withdrawal_decision(
    amount: i64,
    balance: i64,
    withdrawn_today: i64,
    limit: i64,
    force_post: bool,
) -> ResponseCode {
    if amount <= 0 {
        ResponseCode::InvalidAmount
    } else if force_post {
        ResponseCode::Approved
    } else if withdrawn_today
        .checked_add(amount)
        .is_none_or(|total| total > limit)
    {
        ResponseCode::ExceedsWithdrawalLimit
    } else if balance < amount {
        ResponseCode::InsufficientFunds
    } else {
        ResponseCode::Approved
    }
}

/// The per-advice part of the ceiling check; `None` when the amount is within it.
fn over_advice_ceiling(
    station: &TerminalId,
    amount: i64,
    ceiling: &ForcePostCeiling,
) -> Option<StoreError> {
    (amount > ceiling.per_advice).then(|| StoreError::OverCeiling {
        what: format!(
            "an advice of {amount} from station {station}: above its per-advice ceiling of {}",
            ceiling.per_advice
        ),
    })
}

/// The refusal when the per-day upsert changed nothing.
fn over_daily_ceiling(station: &TerminalId, amount: i64, ceiling: &ForcePostCeiling) -> StoreError {
    StoreError::OverCeiling {
        what: format!(
            "an advice of {amount} from station {station}: today's advices would pass its \
             per-day ceiling of {}",
            ceiling.per_day
        ),
    }
}

/// What a reversal does to its original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReversalPlan {
    /// Credit this amount back and mark the original reversed.
    Restore(i64),
    /// Approve; nothing to restore (declined original, balance inquiry, or already reversed).
    NothingToRestore,
    /// A reversal of a reversal is not a thing: `12`.
    Refuse,
}

fn reversal_plan(
    kind: JournalKind,
    response_code: &str,
    reversed: bool,
    amount: Option<i64>,
) -> ReversalPlan {
    match kind {
        JournalKind::Reversal => ReversalPlan::Refuse,
        JournalKind::Balance => ReversalPlan::NothingToRestore,
        JournalKind::Withdrawal => match amount {
            Some(a) if a > 0 && !reversed && response_code == ResponseCode::Approved.as_str() => {
                ReversalPlan::Restore(a)
            }
            _ => ReversalPlan::NothingToRestore,
        },
    }
}

/// What a finished request records besides its response code (see `finish_journal` in each
/// backend); `None` leaves the column as claimed.
#[derive(Debug, Default)]
struct Answer<'a> {
    /// Field 38, approved requests only.
    auth_code: Option<&'a str>,
    /// Ledger balance after the request.
    ledger: Option<i64>,
    /// Available balance after the request (the ledger one, except in an issuer's answer).
    available: Option<i64>,
    /// UTC day whose withdrawal total the request added to.
    business_day: Option<&'a str>,
    /// Amount, for a reversal: the original's.
    amount: Option<i64>,
    /// Currency, for a reversal: the original's.
    currency: Option<&'a str>,
    /// The journal row a reversal reversed.
    original_id: Option<&'a str>,
    /// For a reversal: the reversed original's `upstream_ref` (the issuer must hear of it).
    upstream_ref: Option<&'a str>,
}

/// Refuses contradictory options before a transaction starts. A decline may come with any of
/// them (it wins: nothing is applied, nothing queued).
fn validate_auth_request(req: &AuthRequest) -> Result<(), StoreError> {
    let conflict = match (&req.advice, &req.issuer_answer, req.force_post) {
        (Some(_), Some(_), _) => Some("advice and issuerAnswer"),
        (Some(_), _, true) => Some("advice and forcePost"),
        (_, Some(_), true) => Some("issuerAnswer and forcePost"),
        _ => None,
    };
    if let Some(PinTry { correct: false, .. }) = &req.pin_try
        && req.decline != Some(ResponseCode::IncorrectPin)
    {
        return Err(StoreError::invalid(
            "pinTry: a wrong PIN is declined 55 (the store makes it 75 on the third)",
        ));
    }
    match conflict {
        Some(both) => Err(StoreError::invalid(format!(
            "{both}: a request is stood in for at the acquirer, answered by its issuer, or \
             force-posted at the issuer, never two of these"
        ))),
        None => Ok(()),
    }
}

/// How an issuer's answer is journaled: as given, with no business day (no debit here).
fn issuer_journal_answer(answer: &IssuerAnswer) -> (ResponseCode, Answer<'_>) {
    (
        answer.response_code,
        Answer {
            auth_code: answer.auth_code.as_deref(),
            ledger: answer.ledger_balance,
            available: answer.available_balance,
            ..Answer::default()
        },
    )
}

// PIN tries (SPEC §4; the columns are described in the `pin_reservations` migration). The SQL is
// the same on both backends; `$n` placeholders, integer or TIMESTAMPTZ times.

// The limit is written into the statements below as the literal 3.
const _: () = assert!(PIN_TRIES_LIMIT == 3);

/// Reserves a try on the card whose `$col` is `$1`: `$2` now, `$3` now −
/// [`PIN_RESERVATION_TTL`]. Reservations whose newest is older than `$3` no longer count (a
/// process died holding them). One statement, so the check and the increment are atomic
/// (SQLite's write lock; PostgreSQL's row lock, with the condition re-checked on the updated
/// row). Changes a row only when a try was reserved.
macro_rules! reserve_pin_try_on {
    ($col:literal) => {
        concat!(
            "UPDATE cards SET \
             pin_pending = CASE WHEN pin_pending_at IS NULL OR pin_pending_at < $3 THEN 1 \
                                ELSE pin_pending + 1 END, \
             pin_pending_at = $2 \
             WHERE ",
            $col,
            " = $1 AND pin_tries + CASE WHEN pin_pending_at IS NULL OR pin_pending_at < $3 \
                                        THEN 0 ELSE pin_pending END < 3"
        )
    };
}
/// By card id, returning the settled tries.
const RESERVE_PIN_TRY: &str = concat!(reserve_pin_try_on!("id"), " RETURNING pin_tries");
/// By card id, as a step of the authorization view.
const RESERVE_PIN_TRY_BY_ID: &str = reserve_pin_try_on!("id");
/// By PAN token, likewise.
const RESERVE_PIN_TRY_BY_TOKEN: &str = reserve_pin_try_on!("pan_token");

/// Gives a reserved try back without settling it: `$1` card.
const RELEASE_PIN_TRY: &str = "UPDATE cards SET \
     pin_pending = CASE WHEN pin_pending > 0 THEN pin_pending - 1 ELSE 0 END WHERE id = $1";

/// The code a settled wrong PIN is journaled with: `55`, or `75` once it made three.
fn wrong_pin_code(settled_tries: i64) -> ResponseCode {
    if settled_tries >= i64::from(PIN_TRIES_LIMIT) {
        ResponseCode::PinTriesExceeded
    } else {
        ResponseCode::IncorrectPin
    }
}

/// The oldest reservation time that still counts at `now`.
fn pin_reservation_cutoff(now: DateTime<Utc>) -> DateTime<Utc> {
    now - chrono::Duration::from_std(PIN_RESERVATION_TTL).unwrap_or(chrono::Duration::zero())
}

/// Highest STAN; field 11 has six digits and `000000` is not used, so STANs wrap to 1.
const STAN_MAX: u32 = 999_999;

/// Most STANs one [`Database::reserve_stans`] call reserves.
const STAN_BLOCK_MAX: u32 = 100_000;

fn validate_stan_reservation(station: &str, count: u32) -> Result<(), StoreError> {
    validate_printable("station", station)?;
    if !(1..=STAN_BLOCK_MAX).contains(&count) {
        return Err(StoreError::invalid(format!(
            "count {count}: reserve between 1 and {STAN_BLOCK_MAX} STANs at a time"
        )));
    }
    Ok(())
}

/// The first STAN of a block of `count` once the station's counter moved on to `next`.
fn stan_block_first(next: i64, count: u32) -> Result<u32, StoreError> {
    let next = u32::try_from(next)
        .ok()
        .filter(|n| (1..=STAN_MAX).contains(n))
        .ok_or_else(|| StoreError::corrupt("stan_counters.next_stan"))?;
    Ok((next - 1 + STAN_MAX - count % STAN_MAX) % STAN_MAX + 1)
}

fn validate_link_keys(upstream: &str, keys: &LinkKeys) -> Result<(), StoreError> {
    validate_printable("upstream", upstream)?;
    if keys.tpk.0.is_empty() || keys.tak.0.is_empty() {
        return Err(StoreError::invalid("link keys: a wrapped key is empty"));
    }
    let ours = KeyOwner::Upstream(upstream.to_string());
    if [&keys.tpk, &keys.tak]
        .iter()
        .any(|k| k.owner().is_some_and(|owner| *owner != ours))
    {
        return Err(StoreError::invalid(format!(
            "link keys: made for another owner than upstream {upstream}"
        )));
    }
    Ok(())
}

/// Business day of the withdrawal limit: the UTC date of `now`.
pub fn utc_day(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%d").to_string()
}

/// Folds `SELECT key_type, state, COUNT(*)` and `SELECT key_type, MIN(activated_at)` rows.
fn key_stats_from(
    counts: Vec<(String, String, i64)>,
    oldest: Vec<(String, DateTime<Utc>)>,
) -> Result<KeyStats, StoreError> {
    let key_type = |t: &str| {
        t.parse::<KeyType>()
            .map_err(|_| StoreError::corrupt(format!("keys.key_type {t:?}")))
    };
    let mut stats = KeyStats::default();
    for (t, st, n) in counts {
        let state = st
            .parse::<KeyState>()
            .map_err(|_| StoreError::corrupt(format!("keys.state {st:?}")))?;
        stats.counts.push((key_type(&t)?, state, n.max(0) as u64));
    }
    for (t, at) in oldest {
        stats.oldest_active.push((key_type(&t)?, at));
    }
    Ok(stats)
}

/// Both engines keep microseconds; truncating first makes what we return equal what we read.
fn micros(now: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

fn grace_delta(grace: Duration) -> Result<chrono::Duration, StoreError> {
    chrono::Duration::from_std(grace)
        .ok()
        .filter(|d| *d <= chrono::Duration::days(3650))
        .ok_or_else(|| StoreError::invalid("grace: longer than ten years"))
}

fn grace_seconds_delta(seconds: i64) -> Result<chrono::Duration, StoreError> {
    if !(0..=10 * 365 * 86_400).contains(&seconds) {
        return Err(StoreError::invalid(format!(
            "graceSeconds {seconds}: must be between 0 and ten years"
        )));
    }
    Ok(chrono::Duration::seconds(seconds))
}

fn validate_new_key(k: &NewKey) -> Result<(), StoreError> {
    if !matches!(k.state, KeyState::Pending | KeyState::Active) {
        return Err(StoreError::invalid(format!(
            "key state {}: a new key is PENDING or ACTIVE",
            k.state
        )));
    }
    if k.kcv.len() != 6 || !k.kcv.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::invalid("kcv: must be 6 hex characters"));
    }
    if k.wrapped.0.is_empty() {
        return Err(StoreError::invalid("wrapped key: empty"));
    }
    // the HSM binds a key to the terminal it made it for; storing it on another row would only
    // make a key that refuses to open
    if let Some(owner) = k.wrapped.owner()
        && *owner != KeyOwner::Terminal(k.terminal_id.clone())
    {
        return Err(StoreError::invalid(format!(
            "wrapped key: made for {owner}, not for terminal {}",
            k.terminal_id
        )));
    }
    grace_seconds_delta(k.grace_seconds)?;
    Ok(())
}

fn validate_group(group: &str) -> Result<(), StoreError> {
    validate_printable("group", group)
}

/// A name (group, station, upstream): 1 to 64 characters, none of them a control character.
fn validate_printable(what: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > 64 || value.chars().any(char::is_control) {
        return Err(StoreError::invalid(format!(
            "{what}: must be 1 to 64 printable characters"
        )));
    }
    Ok(())
}

/// A fleet rotation's keys: all PENDING, of the rotation's type, one per terminal.
fn validate_bulk(keys: &[NewKey], rotation: &NewRotation) -> Result<(), StoreError> {
    grace_seconds_delta(rotation.grace_seconds)?;
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    for k in keys {
        validate_new_key(k)?;
        if k.state != KeyState::Pending {
            return Err(StoreError::invalid(format!(
                "key of terminal {}: rotation keys must be PENDING",
                k.terminal_id
            )));
        }
        if k.key_type != rotation.key_type {
            return Err(StoreError::invalid(format!(
                "key of terminal {}: type {} differs from the rotation's {}",
                k.terminal_id, k.key_type, rotation.key_type
            )));
        }
        if k.rotation_id.as_ref().is_some_and(|r| *r != rotation.id) {
            return Err(StoreError::invalid(format!(
                "key of terminal {}: belongs to another rotation",
                k.terminal_id
            )));
        }
        if !seen.insert(k.terminal_id.as_str()) {
            return Err(StoreError::invalid(format!(
                "terminal {}: more than one key in the rotation",
                k.terminal_id
            )));
        }
    }
    Ok(())
}

fn validate_new_account(a: &NewAccount) -> Result<(), StoreError> {
    if a.currency.len() != 3 || !a.currency.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::invalid(
            "currency: must be an ISO 4217 numeric code (3 digits)",
        ));
    }
    if a.balance < 0 {
        return Err(StoreError::invalid("balance: must not be negative"));
    }
    if a.daily_withdrawal_limit < 0 {
        return Err(StoreError::invalid(
            "dailyWithdrawalLimit: must not be negative",
        ));
    }
    Ok(())
}

fn validate_new_card(c: &NewCard) -> Result<(), StoreError> {
    if c.pan_token.is_empty() || !c.pan_token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::invalid("panToken: must be hex"));
    }
    if c.last4.len() != 4 || !c.last4.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::invalid("last4: must be 4 digits"));
    }
    if c.expiry.len() != 4 || !c.expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::invalid("expiry: must be YYMM"));
    }
    if c.pvv.is_empty() {
        return Err(StoreError::invalid("pvv: empty"));
    }
    Ok(())
}

fn parse_key_type(s: &str) -> Result<KeyType, StoreError> {
    s.parse()
        .map_err(|_| StoreError::corrupt(format!("keys.key_type {s:?}")))
}

fn parse_key_state(s: &str) -> Result<KeyState, StoreError> {
    s.parse()
        .map_err(|_| StoreError::corrupt(format!("keys.state {s:?}")))
}

fn parse_terminal_id(s: String, column: &str) -> Result<TerminalId, StoreError> {
    TerminalId::new(s).map_err(|_| StoreError::corrupt(column.to_string()))
}

fn totals_template() -> std::collections::BTreeMap<KeyState, u64> {
    KeyState::ALL.iter().map(|s| (*s, 0)).collect()
}

/// Largest number of rows per multi-row INSERT in bulk operations: 500 rows × 12 columns stays
/// well under SQLite's 32,766 and PostgreSQL's 65,535 bind parameters.
const BULK_CHUNK: usize = 500;

/// `($1,$2,…),($n,…)` for `rows` rows of `cols` columns.
fn values_placeholders(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push(',');
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push(',');
            }
            out.push('$');
            out.push_str(&(r * cols + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// Hides the password of a database URL for `Debug`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}:***@{host}")
        }
        None => authority.to_string(),
    };
    // a password may also come as a query parameter
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| {
                    if kv.to_ascii_lowercase().starts_with("password=") {
                        "password=***".to_string()
                    } else {
                        kv.to_string()
                    }
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_follows_spec_section_4() {
        use KeyState::*;
        use KeyTransition::*;
        let table = [
            (Pending, Activate, true),
            (Active, Activate, false),
            (Expired, Activate, false),
            (Revoked, Activate, false),
            (Pending, Expire, true),
            (Active, Expire, true),
            (Expired, Expire, false),
            (Revoked, Expire, false),
            (Pending, Revoke, true),
            (Active, Revoke, true),
            (Expired, Revoke, true),
            (Revoked, Revoke, false),
        ];
        for (from, to, ok) in table {
            assert_eq!(check_transition(from, to).is_ok(), ok, "{from} -> {to:?}");
        }
    }

    #[test]
    fn withdrawal_checks_amount_then_limit_then_balance() {
        assert_eq!(
            withdrawal_decision(0, 100, 0, 100, false),
            ResponseCode::InvalidAmount
        );
        assert_eq!(
            withdrawal_decision(-5, 100, 0, 100, false),
            ResponseCode::InvalidAmount
        );
        assert_eq!(
            withdrawal_decision(60, 10, 50, 100, false),
            ResponseCode::ExceedsWithdrawalLimit
        );
        assert_eq!(
            withdrawal_decision(60, 59, 40, 100, false),
            ResponseCode::InsufficientFunds
        );
        assert_eq!(
            withdrawal_decision(60, 60, 40, 100, false),
            ResponseCode::Approved
        );
        assert_eq!(
            withdrawal_decision(i64::MAX, i64::MAX, 1, i64::MAX, false),
            ResponseCode::ExceedsWithdrawalLimit
        );
    }

    #[test]
    fn forced_post_skips_limit_and_balance_but_not_the_amount() {
        assert_eq!(
            withdrawal_decision(60, 10, 50, 100, true),
            ResponseCode::Approved
        );
        assert_eq!(
            withdrawal_decision(0, 100, 0, 100, true),
            ResponseCode::InvalidAmount
        );
    }

    #[test]
    fn stan_blocks_start_where_the_counter_was_and_wrap() {
        // a new station: the counter moved from 1 to 51
        assert_eq!(stan_block_first(51, 50).unwrap(), 1);
        // 999,990..=999,999 then 1..=10: the counter stands at 11
        assert_eq!(stan_block_first(11, 20).unwrap(), 999_990);
        // a block ending exactly at 999,999 leaves the counter at 1
        assert_eq!(stan_block_first(1, 10).unwrap(), 999_990);
        assert!(stan_block_first(0, 1).is_err());
        assert!(stan_block_first(1_000_000, 1).is_err());
        assert!(validate_stan_reservation("ACQ001", 0).is_err());
        assert!(validate_stan_reservation("ACQ001", STAN_BLOCK_MAX + 1).is_err());
        assert!(validate_stan_reservation("", 1).is_err());
        assert!(validate_stan_reservation("ACQ001", STAN_BLOCK_MAX).is_ok());
    }

    #[test]
    fn reversal_restores_only_approved_unreversed_withdrawals() {
        use JournalKind::*;
        assert_eq!(
            reversal_plan(Withdrawal, "00", false, Some(100)),
            ReversalPlan::Restore(100)
        );
        assert_eq!(
            reversal_plan(Withdrawal, "00", true, Some(100)),
            ReversalPlan::NothingToRestore
        );
        assert_eq!(
            reversal_plan(Withdrawal, "51", false, Some(100)),
            ReversalPlan::NothingToRestore
        );
        assert_eq!(
            reversal_plan(Balance, "00", false, None),
            ReversalPlan::NothingToRestore
        );
        assert_eq!(
            reversal_plan(Reversal, "00", false, Some(100)),
            ReversalPlan::Refuse
        );
    }

    #[test]
    fn redacted_url_hides_passwords() {
        assert_eq!(
            redact_url("postgres://sw:hunter2@db:5432/switch?sslmode=require"),
            "postgres://sw:***@db:5432/switch?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/switch?user=a&password=hunter2"),
            "postgres://db/switch?user=a&password=***"
        );
        assert_eq!(
            redact_url("sqlite://switchyard.db"),
            "sqlite://switchyard.db"
        );
    }

    #[test]
    fn placeholders_number_rows_consecutively() {
        assert_eq!(values_placeholders(2, 3), "($1,$2,$3),($4,$5,$6)");
    }

    #[test]
    fn migration_status_counts_pending() {
        let s = migration_status_from(&[], SQLITE_MIGRATIONS);
        assert_eq!(s.applied, None);
        assert_eq!(s.pending, SQLITE_MIGRATIONS.len());
        let all: Vec<i64> = SQLITE_MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(migration_status_from(&all, SQLITE_MIGRATIONS).is_current());
    }

    /// The embedded lists must match the folders exactly (a forgotten file would never run).
    #[test]
    fn embedded_migrations_match_the_folders() {
        for (dir, list) in [
            ("sqlite", SQLITE_MIGRATIONS),
            ("postgres", POSTGRES_MIGRATIONS),
        ] {
            let path = format!("{}/../migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
            let mut files: Vec<(i64, String, String)> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "sql"))
                .map(|p| {
                    let name = p.file_stem().unwrap().to_str().unwrap().to_string();
                    let (v, d) = name.split_once('_').unwrap();
                    assert_eq!(v.len(), 14, "{name}: version must be YYYYMMDDHHMMSS");
                    (
                        v.parse().unwrap(),
                        d.to_string(),
                        std::fs::read_to_string(&p).unwrap(),
                    )
                })
                .collect();
            files.sort();
            let embedded: Vec<(i64, String, String)> = list
                .iter()
                .map(|m| (m.version, m.description.to_string(), m.sql.to_string()))
                .collect();
            assert_eq!(
                files, embedded,
                "migrations/{dir} differs from the embedded list"
            );
        }
    }
}
