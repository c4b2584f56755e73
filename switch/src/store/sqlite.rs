//! SQLite backend: the embedded store of a single switch replica (and of `demo`).
//!
//! Writers take the database lock up front (`BEGIN IMMEDIATE`) so a transaction never reads a
//! balance that another writer is about to change; WAL keeps readers off the writers' path and
//! the busy timeout makes concurrent writers queue instead of failing. Timestamps are stored as
//! integer microseconds so comparisons are numeric.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};

use super::error::is_foreign_key_violation;
use super::saf;
use super::*;
use crate::domain::{KeyOwner, KeyState, KeyType, ResponseCode, TerminalId, WrappedKey};

macro_rules! terminal_cols {
    () => {
        "id, grp, kind, created_at"
    };
}
macro_rules! key_cols {
    () => {
        "id, terminal_id, key_type, version, state, kcv, wrapped, rotation_id, grace_seconds, \
         created_at, activated_at, expired_at, grace_until"
    };
}
macro_rules! account_cols {
    () => {
        "id, currency, balance, daily_withdrawal_limit, created_at"
    };
}
macro_rules! card_cols {
    () => {
        "id, pan_token, last4, expiry, account_id, pvv, pin_tries, upstream, created_at"
    };
}
macro_rules! journal_cols {
    () => {
        "id, terminal_id, stan, transmission, digest, mti, kind, amount, currency, response_code, \
         rrn, auth_code, ledger_balance, available_balance, reversed, upstream_ref, created_at"
    };
}

macro_rules! advice_cols {
    () => {
        "id, destination, priority, mti, idempotency_key, payload, reference, status, attempts, \
         next_attempt_at, lease_holder, lease_until, last_error, created_at, settled_at"
    };
}

/// Ends `tx` with an explicit ROLLBACK before returning an error: a dropped transaction is only
/// rolled back when its connection is next used, and until then its locks would make other
/// drainers skip (PostgreSQL) or wait for (SQLite) rows nobody is changing.
macro_rules! or_rollback {
    ($tx:ident, $result:expr) => {
        match $result {
            Ok(v) => v,
            Err(err) => {
                let _ = $tx.rollback().await;
                return Err(err);
            }
        }
    };
}

const MARK_REVERSED: &str = "UPDATE journal SET reversed = 1 WHERE id = $1";

/// The SQLite store. `Debug` shows the database path only.
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for write transactions. SQLite has a single writer; queueing writers
    /// here (the pool hands out its connection in FIFO order) replaces SQLite's busy-handler
    /// sleeps, which under many concurrent writers gave unfair waits of seconds and `96`s.
    writer: SqlitePool,
    url: String,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or `sqlite::memory:`).
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::Config {
                what: "invalid sqlite URL; expected sqlite://PATH".into(),
            })?
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            // money: a committed withdrawal must survive a power cut
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.acquire_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::from)?;
        // An in-memory database exists per connection: readers and the writer must share it.
        let writer = if url.contains(":memory:") || url.contains("mode=memory") {
            pool.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(opts.acquire_timeout)
                .connect_with(options)
                .await
                .map_err(StoreError::from)?
        };
        Ok(Self {
            pool,
            writer,
            url: redact_url(url),
        })
    }

    /// A write transaction holding the database write lock from its first statement.
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

// ---------------------------------------------------------------------------------------------
// value mapping

fn enc(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn ts(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>, StoreError> {
    let v: i64 = row.try_get(col)?;
    DateTime::from_timestamp_micros(v).ok_or_else(|| StoreError::corrupt(col.to_string()))
}

fn opt_ts(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let v: Option<i64> = row.try_get(col)?;
    v.map(|v| {
        DateTime::from_timestamp_micros(v).ok_or_else(|| StoreError::corrupt(col.to_string()))
    })
    .transpose()
}

fn terminal_from_row(row: &SqliteRow) -> Result<Terminal, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Terminal {
        id: parse_terminal_id(row.try_get("id")?, "terminals.id")?,
        group: row.try_get("grp")?,
        kind: TerminalKind::parse(&kind)
            .ok_or_else(|| StoreError::corrupt(format!("terminals.kind {kind:?}")))?,
        created_at: ts(row, "created_at")?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let rotation: Option<String> = row.try_get("rotation_id")?;
    let terminal_id = parse_terminal_id(row.try_get("terminal_id")?, "keys.terminal_id")?;
    Ok(KeyRecord {
        id: KeyId::new(row.try_get::<String, _>("id")?)
            .map_err(|_| StoreError::corrupt("keys.id"))?,
        key_type: parse_key_type(row.try_get("key_type")?)?,
        version: row.try_get("version")?,
        state: parse_key_state(row.try_get("state")?)?,
        kcv: row.try_get("kcv")?,
        // the row's terminal is who the HSM checks the key's binding against
        wrapped: WrappedKey::owned_by(
            row.try_get::<String, _>("wrapped")?,
            KeyOwner::Terminal(terminal_id.clone()),
        ),
        terminal_id,
        rotation_id: rotation
            .map(RotationId::new)
            .transpose()
            .map_err(|_| StoreError::corrupt("keys.rotation_id"))?,
        grace_seconds: row.try_get("grace_seconds")?,
        created_at: ts(row, "created_at")?,
        activated_at: opt_ts(row, "activated_at")?,
        expired_at: opt_ts(row, "expired_at")?,
        grace_until: opt_ts(row, "grace_until")?,
    })
}

fn account_from_row(row: &SqliteRow) -> Result<Account, StoreError> {
    Ok(Account {
        id: AccountId::new(row.try_get::<String, _>("id")?)
            .map_err(|_| StoreError::corrupt("accounts.id"))?,
        currency: row.try_get("currency")?,
        balance: row.try_get("balance")?,
        daily_withdrawal_limit: row.try_get("daily_withdrawal_limit")?,
        created_at: ts(row, "created_at")?,
    })
}

fn card_from_row(row: &SqliteRow) -> Result<Card, StoreError> {
    let tries: i64 = row.try_get("pin_tries")?;
    let pin_tries = u32::try_from(tries).map_err(|_| StoreError::corrupt("cards.pin_tries"))?;
    Ok(Card {
        id: CardId::new(row.try_get::<String, _>("id")?)
            .map_err(|_| StoreError::corrupt("cards.id"))?,
        pan_token: row.try_get("pan_token")?,
        last4: row.try_get("last4")?,
        expiry: row.try_get("expiry")?,
        account_id: AccountId::new(row.try_get::<String, _>("account_id")?)
            .map_err(|_| StoreError::corrupt("cards.account_id"))?,
        pvv: row.try_get("pvv")?,
        pin_tries,
        pin_blocked: pin_tries >= PIN_TRIES_LIMIT,
        upstream: row.try_get("upstream")?,
        created_at: ts(row, "created_at")?,
    })
}

/// A journal row and the digest of the request that made it.
fn journal_from_row(row: &SqliteRow) -> Result<(String, JournalEntry), StoreError> {
    let kind: String = row.try_get("kind")?;
    let entry = JournalEntry {
        id: row.try_get("id")?,
        identity: RequestIdentity {
            terminal_id: parse_terminal_id(row.try_get("terminal_id")?, "journal.terminal_id")?,
            stan: row.try_get("stan")?,
            transmission: row.try_get("transmission")?,
        },
        mti: row.try_get("mti")?,
        kind: JournalKind::parse(&kind)
            .ok_or_else(|| StoreError::corrupt(format!("journal.kind {kind:?}")))?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        response_code: row.try_get("response_code")?,
        rrn: row.try_get("rrn")?,
        auth_code: row.try_get("auth_code")?,
        ledger_balance: row.try_get("ledger_balance")?,
        available_balance: row.try_get("available_balance")?,
        reversed: row.try_get("reversed")?,
        upstream_ref: row.try_get("upstream_ref")?,
        created_at: ts(row, "created_at")?,
        digest: row.try_get("digest")?,
    };
    Ok((entry.digest.clone(), entry))
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
    let detail: String = row.try_get("detail")?;
    Ok(AuditRecord {
        id: row.try_get("id")?,
        at: ts(row, "at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        result: row.try_get("result")?,
        detail: serde_json::from_str(&detail).map_err(|_| StoreError::corrupt("audit.detail"))?,
    })
}

fn advice_from_row(row: &SqliteRow) -> Result<Advice, StoreError> {
    let mti: String = row.try_get("mti")?;
    let status: String = row.try_get("status")?;
    let payload: String = row.try_get("payload")?;
    Ok(Advice {
        id: AdviceId(row.try_get("id")?),
        destination: row.try_get("destination")?,
        priority: saf::advice_priority(row.try_get("priority")?)?,
        mti: saf::advice_mti(&mti)?,
        idempotency_key: row.try_get("idempotency_key")?,
        payload: saf::advice_payload(&payload),
        reference: row.try_get("reference")?,
        status: saf::advice_status(&status)?,
        attempts: saf::advice_count(row.try_get("attempts")?, "saf_messages.attempts")?,
        next_attempt_at: ts(row, "next_attempt_at")?,
        lease_holder: row.try_get("lease_holder")?,
        lease_until: opt_ts(row, "lease_until")?,
        last_error: row.try_get("last_error")?,
        created_at: ts(row, "created_at")?,
        settled_at: opt_ts(row, "settled_at")?,
    })
}

async fn load_advice(conn: &mut SqliteConnection, id: AdviceId) -> Result<Advice, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        advice_cols!(),
        " FROM saf_messages WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(advice_from_row)
    .transpose()?
    .ok_or_else(|| StoreError::not_found(format!("advice {id}")))
}

/// Counts a force-posted advice toward its station's ceilings (see [`CLAIM_STATION_ADVICE`]).
async fn claim_station_advice(
    conn: &mut SqliteConnection,
    station: &TerminalId,
    day: &str,
    amount: i64,
    ceiling: &ForcePostCeiling,
) -> Result<(), StoreError> {
    if let Some(refused) = over_advice_ceiling(station, amount, ceiling) {
        return Err(refused);
    }
    let total: Option<i64> = sqlx::query_scalar(CLAIM_STATION_ADVICE)
        .bind(station.as_str())
        .bind(day)
        .bind(amount)
        .bind(ceiling.per_day)
        .fetch_optional(&mut *conn)
        .await?;
    match total {
        Some(_) => Ok(()),
        None => Err(over_daily_ceiling(station, amount, ceiling)),
    }
}

/// Checks that `holder` still holds a queued advice; the error says who does instead.
fn check_holder(a: &Advice, holder: &str) -> Result<(), StoreError> {
    if a.status == AdviceStatus::Queued && a.lease_holder.as_deref() == Some(holder) {
        Ok(())
    } else {
        Err(saf::lease_lost(a.id, a.status, a.lease_holder.as_deref()))
    }
}

// ---------------------------------------------------------------------------------------------
// statements used inside transactions

/// Inserts the `Idempotency-Key` claim of the admin write running on this task, if any, in the
/// transaction `conn` is in (see `idempotency.rs`). `IdempotencyClaimed` when another attempt
/// holds the key: the caller's transaction then rolls back.
async fn claim_in(conn: &mut SqliteConnection, at: DateTime<Utc>) -> Result<(), StoreError> {
    let Some(claim) = idempotency::current_claim() else {
        return Ok(());
    };
    let done = sqlx::query(
        "INSERT INTO idempotency_claims (key_mac, request_mac, claim_id, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (key_mac) DO NOTHING",
    )
    .bind(&claim.key_mac)
    .bind(&claim.request_mac)
    .bind(&claim.claim_id)
    .bind(enc(at))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(());
    }
    let holder: Option<String> =
        sqlx::query_scalar("SELECT claim_id FROM idempotency_claims WHERE key_mac = $1")
            .bind(&claim.key_mac)
            .fetch_optional(&mut *conn)
            .await?;
    if holder.as_deref() == Some(claim.claim_id.as_str()) {
        Ok(())
    } else {
        Err(StoreError::IdempotencyClaimed)
    }
}

async fn write_audit(
    conn: &mut SqliteConnection,
    at: DateTime<Utc>,
    e: &NewAudit,
) -> Result<(), StoreError> {
    claim_in(conn, at).await?;
    sqlx::query(
        "INSERT INTO audit (at, actor, action, target, result, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(enc(at))
    .bind(&e.actor)
    .bind(&e.action)
    .bind(&e.target)
    .bind(&e.result)
    .bind(e.detail.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn audit(actor: &str, action: &str, target: &str, detail: serde_json::Value) -> NewAudit {
    NewAudit {
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        result: "ok".to_string(),
        detail,
    }
}

async fn load_key(conn: &mut SqliteConnection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    sqlx::query(concat!("SELECT ", key_cols!(), " FROM keys WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(key_from_row)
        .transpose()
}

async fn load_journal(
    conn: &mut SqliteConnection,
    id: &RequestIdentity,
) -> Result<Option<(String, JournalEntry)>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        journal_cols!(),
        " FROM journal WHERE terminal_id = $1 AND stan = $2 AND transmission = $3"
    ))
    .bind(id.terminal_id.as_str())
    .bind(&id.stan)
    .bind(&id.transmission)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(journal_from_row)
    .transpose()
}

/// Claims a request identity by inserting its journal row (response `96` until the end of the
/// transaction). `None` when the identity exists: then the existing row decides the answer.
#[allow(clippy::too_many_arguments)]
async fn claim_identity(
    conn: &mut SqliteConnection,
    identity: &RequestIdentity,
    digest: &str,
    mti: &str,
    kind: JournalKind,
    amount: Option<i64>,
    currency: &str,
    rrn: &str,
    account: Option<&AccountId>,
    card: Option<&CardId>,
    reversal_of: Option<&RequestIdentity>,
    upstream_ref: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    let id = uuid::Uuid::new_v4().to_string();
    let done = sqlx::query(
        "INSERT INTO journal (id, terminal_id, stan, transmission, digest, mti, kind, amount, \
         currency, response_code, rrn, account_id, card_id, created_at, orig_terminal_id, \
         orig_stan, orig_transmission, upstream_ref) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '96', $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT (terminal_id, stan, transmission) DO NOTHING",
    )
    .bind(&id)
    .bind(identity.terminal_id.as_str())
    .bind(&identity.stan)
    .bind(&identity.transmission)
    .bind(digest)
    .bind(mti)
    .bind(kind.as_str())
    .bind(amount)
    .bind(currency)
    .bind(rrn)
    .bind(account.map(AccountId::as_str))
    .bind(card.map(CardId::as_str))
    .bind(enc(now))
    .bind(reversal_of.map(|o| o.terminal_id.as_str()))
    .bind(reversal_of.map(|o| o.stan.as_str()))
    .bind(reversal_of.map(|o| o.transmission.as_str()))
    .bind(upstream_ref)
    .execute(&mut *conn)
    .await?;
    Ok((done.rows_affected() == 1).then_some(id))
}

/// The answer to a request whose identity is already journaled.
/// Settles a reserved PIN try (see [`PinTry`]) in the journal transaction; returns the code a
/// wrong PIN is journaled with (`55`, or `75` when it makes three), `None` for a correct one.
async fn settle_pin_try(
    conn: &mut SqliteConnection,
    pin: &PinTry,
) -> Result<Option<ResponseCode>, StoreError> {
    let tries: Option<i64> = sqlx::query_scalar(SETTLE_PIN_TRY)
        .bind(pin.card_id.as_str())
        .bind(pin.correct)
        .fetch_optional(&mut *conn)
        .await?;
    let tries = tries.ok_or_else(|| StoreError::not_found(format!("card {}", pin.card_id)))?;
    Ok((!pin.correct).then(|| wrong_pin_code(tries)))
}

async fn answer_existing(
    conn: &mut SqliteConnection,
    identity: &RequestIdentity,
    digest: &str,
) -> Result<AuthOutcome, StoreError> {
    let (stored_digest, entry) = load_journal(conn, identity)
        .await?
        .ok_or_else(|| StoreError::corrupt("journal: claimed identity vanished"))?;
    Ok(if stored_digest == digest {
        AuthOutcome::Duplicate(entry)
    } else {
        AuthOutcome::ContentMismatch
    })
}

/// Writes the final answer onto a claimed journal row and returns the entry.
async fn finish_journal(
    conn: &mut SqliteConnection,
    journal_id: &str,
    code: ResponseCode,
    answer: &Answer<'_>,
) -> Result<JournalEntry, StoreError> {
    // one round trip: the row comes back with the update
    let row = sqlx::query(concat!(
        "UPDATE journal SET response_code = $2, auth_code = $3, ledger_balance = $4, \
         available_balance = $9, business_day = $5, amount = COALESCE($6, amount), \
         currency = COALESCE($7, currency), original_id = $8, \
         upstream_ref = COALESCE($10, upstream_ref) WHERE id = $1 RETURNING ",
        journal_cols!()
    ))
    .bind(journal_id)
    .bind(code.as_str())
    .bind(answer.auth_code)
    .bind(answer.ledger)
    .bind(answer.business_day)
    .bind(answer.amount)
    .bind(answer.currency)
    .bind(answer.original_id)
    .bind(answer.available)
    .bind(answer.upstream_ref)
    .fetch_one(&mut *conn)
    .await?;
    Ok(journal_from_row(&row)?.1)
}

/// Queues an advice inside the caller's transaction (validated here, so every path that queues
/// one applies the same rules).
async fn insert_advice(
    conn: &mut SqliteConnection,
    a: &NewAdvice,
) -> Result<EnqueueOutcome, StoreError> {
    saf::validate_new_advice(a)?;
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO saf_messages (destination, priority, mti, idempotency_key, payload, \
         reference, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(&a.destination)
    .bind(i64::from(a.priority))
    .bind(a.mti.mti())
    .bind(&a.idempotency_key)
    .bind(a.payload.to_string())
    .bind(a.reference.as_deref())
    .bind(enc(micros(a.created_at)))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match inserted {
        Some(id) => EnqueueOutcome::Enqueued(AdviceId(id)),
        None => {
            let id: i64 =
                sqlx::query_scalar("SELECT id FROM saf_messages WHERE idempotency_key = $1")
                    .bind(&a.idempotency_key)
                    .fetch_one(&mut *conn)
                    .await?;
            EnqueueOutcome::AlreadyQueued(AdviceId(id))
        }
    })
}

#[async_trait]
impl Database for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        build_migrator(SQLITE_MIGRATIONS).run(&self.pool).await?;
        Ok(())
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        let applied: Vec<i64> = if exists > 0 {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = 1")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(migration_status_from(&applied, SQLITE_MIGRATIONS))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
        }
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    async fn create_terminal(&self, t: &NewTerminal, actor: &str) -> Result<Terminal, StoreError> {
        validate_group(&t.group)?;
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO terminals (id, grp, kind, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(t.id.as_str())
        .bind(&t.group)
        .bind(t.kind.as_str())
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::conflict(format!("terminal {}", t.id)));
        }
        let detail = serde_json::json!({"group": t.group, "kind": t.kind.as_str()});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "terminal.create", t.id.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(Terminal {
            id: t.id.clone(),
            group: t.group.clone(),
            kind: t.kind,
            created_at: now,
        })
    }

    async fn create_terminals_bulk(
        &self,
        terminals: &[NewTerminal],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let mut seen = std::collections::HashSet::with_capacity(terminals.len());
        for t in terminals {
            validate_group(&t.group)?;
            if !seen.insert(t.id.as_str()) {
                return Err(StoreError::invalid(format!(
                    "terminal {}: listed twice",
                    t.id
                )));
            }
        }
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let mut inserted = 0;
        for chunk in terminals.chunks(BULK_CHUNK) {
            let sql = format!(
                "INSERT INTO terminals (id, grp, kind, created_at) VALUES {} \
                 ON CONFLICT (id) DO NOTHING",
                values_placeholders(chunk.len(), 4)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for t in chunk {
                q = q
                    .bind(t.id.as_str().to_string())
                    .bind(t.group.clone())
                    .bind(t.kind.as_str())
                    .bind(enc(now));
            }
            let done = q.execute(&mut *tx).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::conflict(
                    "terminals: at least one id is already registered",
                ));
            }
            inserted += done.rows_affected();
        }
        let detail = serde_json::json!({"terminals": inserted});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "terminal.create-bulk", "terminals", detail),
        )
        .await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn get_terminal(&self, id: &TerminalId) -> Result<Option<Terminal>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            terminal_cols!(),
            " FROM terminals WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(terminal_from_row)
        .transpose()
    }

    async fn list_terminals(&self, page: Page) -> Result<Vec<Terminal>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            terminal_cols!(),
            " FROM terminals WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2"
        ))
        .bind(page.after.as_deref())
        .bind(page.effective_limit())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(terminal_from_row)
        .collect()
    }

    async fn terminals_in(&self, sel: &TerminalSelector) -> Result<Vec<TerminalId>, StoreError> {
        let (sql, wanted): (&'static str, Vec<String>) = match sel {
            TerminalSelector::All => {
                let rows: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM terminals WHERE kind <> 'station' ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?;
                return rows
                    .into_iter()
                    .map(|id| parse_terminal_id(id, "terminals.id"))
                    .collect();
            }
            TerminalSelector::Ids(ids) => (
                "SELECT id FROM terminals WHERE id IN (SELECT value FROM json_each($1))",
                ids.iter().map(|i| i.as_str().to_string()).collect(),
            ),
            TerminalSelector::Groups(groups) => (
                "SELECT id FROM terminals WHERE grp IN (SELECT value FROM json_each($1)) \
                 AND kind <> 'station'",
                groups.clone(),
            ),
        };
        // one JSON array parameter instead of thousands of bind variables
        let wanted =
            serde_json::to_string(&wanted).map_err(|_| StoreError::invalid("terminal selector"))?;
        let mut ids: Vec<String> = sqlx::query_scalar(sql)
            .bind(wanted)
            .fetch_all(&self.pool)
            .await?;
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| parse_terminal_id(id, "terminals.id"))
            .collect()
    }

    async fn insert_key(&self, k: &NewKey, actor: &str) -> Result<KeyRecord, StoreError> {
        validate_new_key(k)?;
        let now = micros(Utc::now());
        let grace_until = now + grace_seconds_delta(k.grace_seconds)?;
        let mut tx = self.begin().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM terminals WHERE id = $1")
            .bind(k.terminal_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::not_found(format!("terminal {}", k.terminal_id)));
        }
        let version: i32 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM keys WHERE terminal_id = $1 AND key_type = $2",
        )
        .bind(k.terminal_id.as_str())
        .bind(k.key_type.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let mut previous: Option<String> = None;
        if k.state == KeyState::Active {
            previous = sqlx::query_scalar(
                "UPDATE keys SET state = 'EXPIRED', expired_at = $3, grace_until = $4 \
                 WHERE terminal_id = $1 AND key_type = $2 AND state = 'ACTIVE' RETURNING id",
            )
            .bind(k.terminal_id.as_str())
            .bind(k.key_type.as_str())
            .bind(enc(now))
            .bind(enc(grace_until))
            .fetch_optional(&mut *tx)
            .await?;
        }
        let id = KeyId::generate();
        let activated_at = (k.state == KeyState::Active).then_some(now);
        sqlx::query(
            "INSERT INTO keys (id, terminal_id, key_type, version, state, kcv, wrapped, \
             rotation_id, grace_seconds, created_at, activated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id.as_str())
        .bind(k.terminal_id.as_str())
        .bind(k.key_type.as_str())
        .bind(version)
        .bind(k.state.as_str())
        .bind(&k.kcv)
        .bind(&k.wrapped.0)
        .bind(k.rotation_id.as_ref().map(RotationId::as_str))
        .bind(k.grace_seconds)
        .bind(enc(now))
        .bind(activated_at.map(enc))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                StoreError::not_found("the key's rotation")
            } else {
                e.into()
            }
        })?;
        let detail = serde_json::json!({
            "terminalId": k.terminal_id.as_str(), "type": k.key_type.as_str(),
            "version": version, "state": k.state.as_str(), "kcv": k.kcv,
            "expiredPrevious": previous,
        });
        write_audit(
            &mut tx,
            now,
            &audit(actor, "key.create", id.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(KeyRecord {
            id,
            terminal_id: k.terminal_id.clone(),
            key_type: k.key_type,
            version,
            state: k.state,
            kcv: k.kcv.clone(),
            wrapped: WrappedKey::owned_by(
                k.wrapped.0.clone(),
                KeyOwner::Terminal(k.terminal_id.clone()),
            ),
            rotation_id: k.rotation_id.clone(),
            grace_seconds: k.grace_seconds,
            created_at: now,
            activated_at,
            expired_at: None,
            grace_until: None,
        })
    }

    async fn insert_keys_bulk(
        &self,
        keys: &[NewKey],
        rotation: &NewRotation,
        actor: &str,
    ) -> Result<(), StoreError> {
        validate_bulk(keys, rotation)?;
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let (activation, activate_at) = match rotation.activation {
            Activation::OnConfirm => ("onConfirm", None),
            Activation::AtTime(t) => ("atTime", Some(enc(micros(t)))),
        };
        let done = sqlx::query(
            "INSERT INTO key_rotations (id, key_type, activation, activate_at, grace_seconds, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(rotation.id.as_str())
        .bind(rotation.key_type.as_str())
        .bind(activation)
        .bind(activate_at)
        .bind(rotation.grace_seconds)
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::conflict(format!("rotation {}", rotation.id)));
        }
        let rows = sqlx::query(
            "SELECT terminal_id, MAX(version) AS v FROM keys WHERE key_type = $1 GROUP BY terminal_id",
        )
        .bind(rotation.key_type.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut versions: HashMap<String, i32> = HashMap::with_capacity(rows.len());
        for row in &rows {
            versions.insert(row.try_get("terminal_id")?, row.try_get("v")?);
        }
        const COLS: usize = 10;
        for chunk in keys.chunks(BULK_CHUNK) {
            let sql = format!(
                "INSERT INTO keys (id, terminal_id, key_type, version, state, kcv, wrapped, \
                 rotation_id, grace_seconds, created_at) VALUES {}",
                values_placeholders(chunk.len(), COLS)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for k in chunk {
                let version = versions.get(k.terminal_id.as_str()).copied().unwrap_or(0) + 1;
                q = q
                    .bind(KeyId::generate().to_string())
                    .bind(k.terminal_id.as_str().to_string())
                    .bind(rotation.key_type.as_str())
                    .bind(version)
                    .bind(KeyState::Pending.as_str())
                    .bind(k.kcv.clone())
                    .bind(k.wrapped.0.clone())
                    .bind(rotation.id.as_str().to_string())
                    .bind(rotation.grace_seconds)
                    .bind(enc(now));
            }
            q.execute(&mut *tx).await.map_err(|e| {
                if is_foreign_key_violation(&e) {
                    StoreError::not_found(format!("a terminal of rotation {}", rotation.id))
                } else {
                    e.into()
                }
            })?;
        }
        // A terminal holds at most one PENDING key per type that matters: older PENDING keys
        // of the rotated terminals are abandoned so they can never be activated later.
        sqlx::query(
            "UPDATE keys SET state = 'EXPIRED', expired_at = $1 \
             WHERE key_type = $2 AND state = 'PENDING' AND rotation_id IS DISTINCT FROM $3 \
               AND terminal_id IN (SELECT terminal_id FROM keys WHERE rotation_id = $3)",
        )
        .bind(enc(now))
        .bind(rotation.key_type.as_str())
        .bind(rotation.id.as_str())
        .execute(&mut *tx)
        .await?;
        let detail = serde_json::json!({
            "keyType": rotation.key_type.as_str(), "keys": keys.len(),
            "activation": activation, "graceSeconds": rotation.grace_seconds,
        });
        write_audit(
            &mut tx,
            now,
            &audit(actor, "rotation.create", rotation.id.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load_key(&mut conn, id.as_str()).await
    }

    async fn list_keys(&self, terminal: &TerminalId) -> Result<Vec<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_cols!(),
            " FROM keys WHERE terminal_id = $1 ORDER BY key_type, version"
        ))
        .bind(terminal.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn unbound_keys(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_cols!(),
            " FROM keys WHERE substr(wrapped, 13, 2) = '00' AND id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.map_or("", KeyId::as_str))
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn rewrap_key(
        &self,
        id: &KeyId,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        if new.0.is_empty() {
            return Err(StoreError::invalid("wrapped key: empty"));
        }
        let done = sqlx::query("UPDATE keys SET wrapped = $3 WHERE id = $1 AND wrapped = $2")
            .bind(id.as_str())
            .bind(&old.0)
            .bind(&new.0)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn keys_for_use(
        &self,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<UsableKeys, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_cols!(),
            " FROM keys WHERE terminal_id = $1 AND key_type = $2 \
              AND (state IN ('ACTIVE', 'PENDING') OR (state = 'EXPIRED' AND grace_until > $3)) \
              ORDER BY version DESC"
        ))
        .bind(terminal.as_str())
        .bind(kt.as_str())
        .bind(enc(micros(now)))
        .fetch_all(&self.pool)
        .await?;
        let mut usable = UsableKeys::default();
        for row in &rows {
            let key = key_from_row(row)?;
            match key.state {
                KeyState::Active if usable.active.is_none() => usable.active = Some(key),
                KeyState::Pending if usable.pending.is_none() => usable.pending = Some(key),
                KeyState::Expired => usable.in_grace.push(key),
                _ => {}
            }
        }
        Ok(usable)
    }

    async fn transition_key(
        &self,
        id: &KeyId,
        to: KeyTransition,
        grace: Duration,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        let now = micros(now);
        let grace_until = now + grace_delta(grace)?;
        let mut tx = self.begin().await?;
        let key = load_key(&mut tx, id.as_str())
            .await?
            .ok_or_else(|| StoreError::not_found(format!("key {id}")))?;
        check_transition(key.state, to)?;
        let mut previous: Option<String> = None;
        match to {
            KeyTransition::Activate => {
                previous = sqlx::query_scalar(
                    "UPDATE keys SET state = 'EXPIRED', expired_at = $3, grace_until = $4 \
                     WHERE terminal_id = $1 AND key_type = $2 AND state = 'ACTIVE' RETURNING id",
                )
                .bind(key.terminal_id.as_str())
                .bind(key.key_type.as_str())
                .bind(enc(now))
                .bind(enc(grace_until))
                .fetch_optional(&mut *tx)
                .await?;
                sqlx::query("UPDATE keys SET state = 'ACTIVE', activated_at = $2 WHERE id = $1")
                    .bind(id.as_str())
                    .bind(enc(now))
                    .execute(&mut *tx)
                    .await?;
            }
            KeyTransition::Expire => {
                let until = (key.state == KeyState::Active).then_some(enc(grace_until));
                sqlx::query(
                    "UPDATE keys SET state = 'EXPIRED', expired_at = $2, grace_until = $3 \
                     WHERE id = $1",
                )
                .bind(id.as_str())
                .bind(enc(now))
                .bind(until)
                .execute(&mut *tx)
                .await?;
            }
            KeyTransition::Revoke => {
                sqlx::query(
                    "UPDATE keys SET state = 'REVOKED', grace_until = NULL, \
                     expired_at = COALESCE(expired_at, $2) WHERE id = $1",
                )
                .bind(id.as_str())
                .bind(enc(now))
                .execute(&mut *tx)
                .await?;
            }
        }
        let detail = serde_json::json!({
            "terminalId": key.terminal_id.as_str(), "type": key.key_type.as_str(),
            "version": key.version, "from": key.state.as_str(), "to": to.target(),
            "expiredPrevious": previous,
        });
        write_audit(
            &mut tx,
            now,
            &audit(actor, to.action(), id.as_str(), detail),
        )
        .await?;
        let updated = load_key(&mut tx, id.as_str())
            .await?
            .ok_or_else(|| StoreError::corrupt("keys: updated key vanished"))?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn rotation_totals(
        &self,
        rotation: &RotationId,
    ) -> Result<Option<RotationStatus>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT id, key_type, activation, activate_at, grace_seconds, created_at, \
             (SELECT COUNT(DISTINCT terminal_id) FROM keys WHERE rotation_id = $1) AS terminals \
             FROM key_rotations WHERE id = $1",
        )
        .bind(rotation.as_str())
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let activation: String = row.try_get("activation")?;
        let activation = match (activation.as_str(), opt_ts(&row, "activate_at")?) {
            ("onConfirm", None) => Activation::OnConfirm,
            ("atTime", Some(t)) => Activation::AtTime(t),
            _ => return Err(StoreError::corrupt("key_rotations.activation")),
        };
        let mut totals: BTreeMap<KeyState, u64> = totals_template();
        let counts = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM keys WHERE rotation_id = $1 GROUP BY state",
        )
        .bind(rotation.as_str())
        .fetch_all(&self.pool)
        .await?;
        for c in &counts {
            let state = parse_key_state(c.try_get("state")?)?;
            let n: i64 = c.try_get("n")?;
            totals.insert(state, u64::try_from(n).unwrap_or(0));
        }
        let terminals: i64 = row.try_get("terminals")?;
        Ok(Some(RotationStatus {
            id: rotation.clone(),
            key_type: parse_key_type(row.try_get("key_type")?)?,
            activation,
            grace_seconds: row.try_get("grace_seconds")?,
            created_at: ts(&row, "created_at")?,
            totals,
            terminals: u64::try_from(terminals).unwrap_or(0),
        }))
    }

    async fn expire_previous(
        &self,
        rotation: &RotationId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let now = micros(now);
        let mut tx = self.begin().await?;
        let key_type: Option<String> =
            sqlx::query_scalar("SELECT key_type FROM key_rotations WHERE id = $1")
                .bind(rotation.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(key_type) = key_type else {
            return Err(StoreError::not_found(format!("rotation {rotation}")));
        };
        let done = sqlx::query(
            "UPDATE keys SET grace_until = $3 \
             WHERE key_type = $2 AND state = 'EXPIRED' AND grace_until > $3 \
               AND (rotation_id IS NULL OR rotation_id <> $1) \
               AND terminal_id IN (SELECT terminal_id FROM keys \
                                   WHERE rotation_id = $1 AND state = 'ACTIVE')",
        )
        .bind(rotation.as_str())
        .bind(&key_type)
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        let n = done.rows_affected();
        let detail = serde_json::json!({"keyType": key_type, "keys": n});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "rotation.expire-previous", rotation.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn key_stats(&self) -> Result<KeyStats, StoreError> {
        let rows =
            sqlx::query("SELECT key_type, state, COUNT(*) AS n FROM keys GROUP BY key_type, state")
                .fetch_all(&self.pool)
                .await?;
        let mut counts = Vec::with_capacity(rows.len());
        for row in &rows {
            counts.push((
                row.try_get("key_type")?,
                row.try_get("state")?,
                row.try_get("n")?,
            ));
        }
        let rows = sqlx::query(
            "SELECT key_type, MIN(activated_at) AS oldest FROM keys \
             WHERE state = 'ACTIVE' AND activated_at IS NOT NULL GROUP BY key_type",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut oldest = Vec::with_capacity(rows.len());
        for row in &rows {
            oldest.push((row.try_get("key_type")?, ts(row, "oldest")?));
        }
        super::key_stats_from(counts, oldest)
    }

    async fn due_pending_keys(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_cols!(),
            " FROM keys WHERE state = 'PENDING' AND rotation_id IN \
              (SELECT id FROM key_rotations WHERE activation = 'atTime' AND activate_at <= $1) \
              ORDER BY created_at LIMIT $2"
        ))
        .bind(enc(micros(now)))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn create_account(&self, a: &NewAccount, actor: &str) -> Result<Account, StoreError> {
        validate_new_account(a)?;
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO accounts (id, currency, balance, daily_withdrawal_limit, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(a.id.as_str())
        .bind(&a.currency)
        .bind(a.balance)
        .bind(a.daily_withdrawal_limit)
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::conflict(format!("account {}", a.id)));
        }
        let detail = serde_json::json!({
            "currency": a.currency, "balance": a.balance,
            "dailyWithdrawalLimit": a.daily_withdrawal_limit,
        });
        write_audit(
            &mut tx,
            now,
            &audit(actor, "account.create", a.id.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(Account {
            id: a.id.clone(),
            currency: a.currency.clone(),
            balance: a.balance,
            daily_withdrawal_limit: a.daily_withdrawal_limit,
            created_at: now,
        })
    }

    async fn get_account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            account_cols!(),
            " FROM accounts WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(account_from_row)
        .transpose()
    }

    async fn create_card(&self, c: &NewCard, actor: &str) -> Result<Card, StoreError> {
        validate_new_card(c)?;
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let account: Option<String> = sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1")
            .bind(c.account_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if account.is_none() {
            return Err(StoreError::not_found(format!("account {}", c.account_id)));
        }
        let id = CardId::generate();
        let done = sqlx::query(
            "INSERT INTO cards (id, pan_token, last4, expiry, account_id, pvv, pin_tries, upstream, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8) \
             ON CONFLICT (pan_token) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(&c.pan_token)
        .bind(&c.last4)
        .bind(&c.expiry)
        .bind(c.account_id.as_str())
        .bind(&c.pvv)
        .bind(c.upstream.as_deref())
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::conflict(format!(
                "card ending {}: this PAN is already registered",
                c.last4
            )));
        }
        let detail = serde_json::json!({
            "last4": c.last4, "expiry": c.expiry, "accountId": c.account_id.as_str(),
            "upstream": c.upstream,
        });
        write_audit(
            &mut tx,
            now,
            &audit(actor, "card.create", id.as_str(), detail),
        )
        .await?;
        tx.commit().await?;
        Ok(Card {
            id,
            pan_token: c.pan_token.clone(),
            last4: c.last4.clone(),
            expiry: c.expiry.clone(),
            account_id: c.account_id.clone(),
            pvv: c.pvv.clone(),
            pin_tries: 0,
            pin_blocked: false,
            upstream: c.upstream.clone(),
            created_at: now,
        })
    }

    async fn get_card(&self, id: &CardId) -> Result<Option<Card>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            card_cols!(),
            " FROM cards WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(card_from_row)
        .transpose()
    }

    async fn find_card(&self, pan_token: &str) -> Result<Option<Card>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            card_cols!(),
            " FROM cards WHERE pan_token = $1"
        ))
        .bind(pan_token)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(card_from_row)
        .transpose()
    }

    async fn reserve_pin_try(
        &self,
        card: &CardId,
        now: DateTime<Utc>,
    ) -> Result<PinReservation, StoreError> {
        let now = micros(now);
        let reserved: Option<i64> = sqlx::query_scalar(RESERVE_PIN_TRY)
            .bind(card.as_str())
            .bind(enc(now))
            .bind(enc(pin_reservation_cutoff(now)))
            .fetch_optional(&self.writer)
            .await?;
        if reserved.is_some() {
            return Ok(PinReservation::Reserved);
        }
        let settled: Option<i64> = sqlx::query_scalar("SELECT pin_tries FROM cards WHERE id = $1")
            .bind(card.as_str())
            .fetch_optional(&self.pool)
            .await?;
        match settled {
            Some(tries) if tries >= i64::from(PIN_TRIES_LIMIT) => Ok(PinReservation::Exhausted),
            Some(_) => Ok(PinReservation::InFlight),
            None => Err(StoreError::not_found(format!("card {card}"))),
        }
    }

    async fn release_pin_try(&self, card: &CardId) -> Result<(), StoreError> {
        let done = sqlx::query(RELEASE_PIN_TRY)
            .bind(card.as_str())
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found(format!("card {card}")));
        }
        Ok(())
    }

    async fn reset_pin(&self, card: &CardId, pvv: &str, actor: &str) -> Result<(), StoreError> {
        if pvv.is_empty() {
            return Err(StoreError::invalid("pvv: empty"));
        }
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE cards SET pvv = $2, pin_tries = 0 WHERE id = $1")
            .bind(card.as_str())
            .bind(pvv)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found(format!("card {card}")));
        }
        write_audit(
            &mut tx,
            now,
            &audit(
                actor,
                "card.pin-reset",
                card.as_str(),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_request(&self, id: &RequestIdentity) -> Result<Option<JournalEntry>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(load_journal(&mut conn, id).await?.map(|(_, e)| e))
    }

    async fn authorize(&self, req: &AuthRequest) -> Result<AuthOutcome, StoreError> {
        validate_auth_request(req)?;
        let now = micros(req.now);
        let (kind, amount) = match req.kind {
            AuthKind::Balance => (JournalKind::Balance, None),
            AuthKind::Withdrawal { amount } => (JournalKind::Withdrawal, Some(amount)),
        };
        let mut tx = self.begin().await?;
        let Some(journal_id) = claim_identity(
            &mut tx,
            &req.identity,
            &req.digest,
            &req.mti,
            kind,
            amount,
            &req.currency,
            &req.rrn,
            req.account_id.as_ref(),
            req.card_id.as_ref(),
            None,
            req.upstream_ref.as_deref(),
            now,
        )
        .await?
        else {
            // a duplicate: the original counted its PIN try, this one gives its own back
            let Some(pin) = &req.pin_try else {
                return answer_existing(&mut tx, &req.identity, &req.digest).await;
            };
            sqlx::query(RELEASE_PIN_TRY)
                .bind(pin.card_id.as_str())
                .execute(&mut *tx)
                .await?;
            let outcome = answer_existing(&mut tx, &req.identity, &req.digest).await?;
            tx.commit().await?;
            return Ok(outcome);
        };

        // the PIN count and the journal row that explains it commit together
        let pin_code = match &req.pin_try {
            Some(pin) => settle_pin_try(&mut tx, pin).await?,
            None => None,
        };
        if let Some(code) = pin_code.or(req.decline) {
            let entry = finish_journal(&mut tx, &journal_id, code, &Answer::default()).await?;
            tx.commit().await?;
            return Ok(AuthOutcome::Done(entry));
        }

        // the terminal gave up on this request and reversed it before it reached us (or while
        // it was in flight): apply nothing, so the reversal and the request net to zero
        let reversed_before: Option<String> = sqlx::query_scalar(
            "SELECT id FROM journal WHERE kind = 'reversal' AND orig_terminal_id = $1 \
             AND orig_stan = $2 AND orig_transmission = $3 LIMIT 1",
        )
        .bind(req.identity.terminal_id.as_str())
        .bind(&req.identity.stan)
        .bind(&req.identity.transmission)
        .fetch_optional(&mut *tx)
        .await?;
        if reversed_before.is_some() {
            sqlx::query(MARK_REVERSED)
                .bind(&journal_id)
                .execute(&mut *tx)
                .await?;
            let entry = finish_journal(
                &mut tx,
                &journal_id,
                ResponseCode::NoActionTaken,
                &Answer::default(),
            )
            .await?;
            tx.commit().await?;
            return Ok(AuthOutcome::Done(entry));
        }

        if let Some(issuer) = &req.issuer_answer {
            let (code, answer) = issuer_journal_answer(issuer);
            let entry = finish_journal(&mut tx, &journal_id, code, &answer).await?;
            tx.commit().await?;
            return Ok(AuthOutcome::Done(entry));
        }

        let account_id = req
            .account_id
            .as_ref()
            .ok_or_else(|| StoreError::invalid("accountId: required to authorize"))?;
        let account = sqlx::query(
            "SELECT currency, balance, daily_withdrawal_limit FROM accounts WHERE id = $1",
        )
        .bind(account_id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("account {account_id}")))?;
        let currency: String = account.try_get("currency")?;
        let balance: i64 = account.try_get("balance")?;
        let limit: i64 = account.try_get("daily_withdrawal_limit")?;

        let (code, ledger, day) = if currency != req.currency {
            // no currency conversion in the switch: refuse rather than debit the wrong amount
            (ResponseCode::InvalidTransaction, None, None)
        } else {
            match req.kind {
                AuthKind::Balance => (ResponseCode::Approved, Some(balance), None),
                AuthKind::Withdrawal { amount } => {
                    let day = utc_day(now);
                    if let Some(ceiling) = req.force_post_ceiling.filter(|_| req.force_post)
                        && amount > 0
                    {
                        or_rollback!(
                            tx,
                            claim_station_advice(
                                &mut tx,
                                &req.identity.terminal_id,
                                &day,
                                amount,
                                &ceiling
                            )
                            .await
                        );
                    }
                    let withdrawn: i64 = sqlx::query_scalar(
                        "SELECT COALESCE((SELECT total FROM daily_withdrawals \
                         WHERE account_id = $1 AND day = $2), 0)",
                    )
                    .bind(account_id.as_str())
                    .bind(&day)
                    .fetch_one(&mut *tx)
                    .await?;
                    match withdrawal_decision(amount, balance, withdrawn, limit, req.force_post) {
                        ResponseCode::Approved => {
                            // a forced post may overdraw; anything else never does
                            let new_balance: Option<i64> = sqlx::query_scalar(
                                "UPDATE accounts SET balance = balance - $2 \
                                 WHERE id = $1 AND ($3 OR balance >= $2) RETURNING balance",
                            )
                            .bind(account_id.as_str())
                            .bind(amount)
                            .bind(req.force_post)
                            .fetch_optional(&mut *tx)
                            .await?;
                            match new_balance {
                                Some(b) => {
                                    sqlx::query(
                                        "INSERT INTO daily_withdrawals (account_id, day, total) \
                                         VALUES ($1, $2, $3) ON CONFLICT (account_id, day) \
                                         DO UPDATE SET total = daily_withdrawals.total + excluded.total",
                                    )
                                    .bind(account_id.as_str())
                                    .bind(&day)
                                    .bind(amount)
                                    .execute(&mut *tx)
                                    .await?;
                                    (ResponseCode::Approved, Some(b), Some(day))
                                }
                                // the write lock makes this unreachable; refuse rather than overdraw
                                None => (ResponseCode::InsufficientFunds, None, None),
                            }
                        }
                        other => (other, None, None),
                    }
                }
            }
        };
        let auth_code = (code == ResponseCode::Approved).then_some(req.auth_code.as_str());
        let entry = finish_journal(
            &mut tx,
            &journal_id,
            code,
            &Answer {
                auth_code,
                ledger,
                available: ledger,
                business_day: day.as_deref(),
                ..Answer::default()
            },
        )
        .await?;
        if let Some(advice) = req.advice.as_ref().filter(|_| entry.approved()) {
            let advice = NewAdvice {
                reference: advice
                    .reference
                    .clone()
                    .or_else(|| Some(journal_id.clone())),
                ..advice.clone()
            };
            or_rollback!(tx, insert_advice(&mut tx, &advice).await);
        }
        tx.commit().await?;
        Ok(AuthOutcome::Done(entry))
    }

    async fn reverse(&self, req: &ReversalRequest) -> Result<AuthOutcome, StoreError> {
        let now = micros(req.now);
        let mut tx = self.begin().await?;
        let Some(journal_id) = claim_identity(
            &mut tx,
            &req.identity,
            &req.digest,
            &req.mti,
            JournalKind::Reversal,
            None,
            "",
            &req.rrn,
            None,
            None,
            Some(&req.original),
            None,
            now,
        )
        .await?
        else {
            return answer_existing(&mut tx, &req.identity, &req.digest).await;
        };
        let original = sqlx::query(
            "SELECT id, kind, amount, currency, response_code, reversed, account_id, business_day, \
             upstream_ref \
             FROM journal WHERE terminal_id = $1 AND stan = $2 AND transmission = $3 AND id <> $4",
        )
        .bind(req.original.terminal_id.as_str())
        .bind(&req.original.stan)
        .bind(&req.original.transmission)
        .bind(&journal_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(original) = original else {
            let entry = finish_journal(
                &mut tx,
                &journal_id,
                ResponseCode::NoActionTaken,
                &Answer::default(),
            )
            .await?;
            tx.commit().await?;
            return Ok(AuthOutcome::Done(entry));
        };
        let original_id: String = original.try_get("id")?;
        let kind: String = original.try_get("kind")?;
        let kind = JournalKind::parse(&kind)
            .ok_or_else(|| StoreError::corrupt(format!("journal.kind {kind:?}")))?;
        let amount: Option<i64> = original.try_get("amount")?;
        let currency: String = original.try_get("currency")?;
        let response_code: String = original.try_get("response_code")?;
        let reversed: bool = original.try_get("reversed")?;
        let account_id: Option<String> = original.try_get("account_id")?;
        let business_day: Option<String> = original.try_get("business_day")?;
        let upstream_ref: Option<String> = original.try_get("upstream_ref")?;
        let mut forwarded = None;

        let (code, ledger) = match reversal_plan(kind, &response_code, reversed, amount) {
            ReversalPlan::Refuse => (ResponseCode::InvalidTransaction, None),
            ReversalPlan::NothingToRestore => (ResponseCode::Approved, None),
            ReversalPlan::Restore(_) if account_id.is_none() && upstream_ref.is_some() => {
                // routed: the issuer holds the money; the caller forwards the reversal
                sqlx::query(MARK_REVERSED)
                    .bind(&original_id)
                    .execute(&mut *tx)
                    .await?;
                forwarded = upstream_ref.as_deref();
                (ResponseCode::Approved, None)
            }
            ReversalPlan::Restore(amount) => {
                let account_id = account_id
                    .ok_or_else(|| StoreError::corrupt("journal.account_id of a withdrawal"))?;
                // a stand-in approval: the issuer booked (or will book) its advice too
                forwarded = upstream_ref.as_deref();
                let new_balance: i64 = sqlx::query_scalar(
                    "UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING balance",
                )
                .bind(&account_id)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE daily_withdrawals SET total = CASE WHEN total > $3 THEN total - $3 \
                     ELSE 0 END WHERE account_id = $1 AND day = $2",
                )
                .bind(&account_id)
                .bind(business_day.as_deref())
                .bind(amount)
                .execute(&mut *tx)
                .await?;
                sqlx::query(MARK_REVERSED)
                    .bind(&original_id)
                    .execute(&mut *tx)
                    .await?;
                (ResponseCode::Approved, Some(new_balance))
            }
        };
        let entry = finish_journal(
            &mut tx,
            &journal_id,
            code,
            &Answer {
                ledger,
                available: ledger,
                amount,
                currency: Some(&currency),
                original_id: Some(&original_id),
                upstream_ref: forwarded,
                ..Answer::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(AuthOutcome::Done(entry))
    }

    async fn accept_sign_on(
        &self,
        terminal: &TerminalId,
        stan: &str,
        transmitted: &str,
        now: DateTime<Utc>,
        prune_before: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM accepted_sign_ons WHERE terminal_id = $1 AND accepted_at < $2")
            .bind(terminal.as_str())
            .bind(enc(micros(prune_before)))
            .execute(&self.writer)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO accepted_sign_ons (terminal_id, stan, transmitted, accepted_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(terminal.as_str())
        .bind(stan)
        .bind(transmitted)
        .bind(enc(micros(now)))
        .execute(&self.writer)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn reserve_stans(&self, station: &str, count: u32) -> Result<u32, StoreError> {
        validate_stan_reservation(station, count)?;
        // one statement: the row lock (or SQLite's write lock) makes read-and-advance atomic
        let next: i64 = sqlx::query_scalar(
            "INSERT INTO stan_counters (station, next_stan) VALUES ($1, $2 % 999999 + 1) \
             ON CONFLICT (station) DO UPDATE \
             SET next_stan = (stan_counters.next_stan - 1 + $2) % 999999 + 1 \
             RETURNING next_stan",
        )
        .bind(station)
        .bind(i64::from(count))
        .fetch_one(&self.writer)
        .await?;
        stan_block_first(next, count)
    }

    async fn link_keys(&self, upstream: &str) -> Result<Option<LinkKeys>, StoreError> {
        let row = sqlx::query("SELECT tpk, tak, exchanged_at FROM link_keys WHERE upstream = $1")
            .bind(upstream)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(LinkKeys {
                tpk: WrappedKey::owned_by(
                    r.try_get::<String, _>("tpk")?,
                    KeyOwner::Upstream(upstream.to_string()),
                ),
                tak: WrappedKey::owned_by(
                    r.try_get::<String, _>("tak")?,
                    KeyOwner::Upstream(upstream.to_string()),
                ),
                exchanged_at: ts(&r, "exchanged_at")?,
            })
        })
        .transpose()
    }

    async fn save_link_keys(&self, upstream: &str, keys: &LinkKeys) -> Result<(), StoreError> {
        validate_link_keys(upstream, keys)?;
        sqlx::query(
            "INSERT INTO link_keys (upstream, tpk, tak, exchanged_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (upstream) DO UPDATE \
             SET tpk = excluded.tpk, tak = excluded.tak, exchanged_at = excluded.exchanged_at \
             WHERE link_keys.exchanged_at < excluded.exchanged_at",
        )
        .bind(upstream)
        .bind(&keys.tpk.0)
        .bind(&keys.tak.0)
        .bind(enc(micros(keys.exchanged_at)))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn append_audit(&self, e: &NewAudit) -> Result<(), StoreError> {
        if idempotency::current_claim().is_some() {
            // the claim and the audit record commit together
            let mut tx = self.begin().await?;
            write_audit(&mut tx, micros(Utc::now()), e).await?;
            tx.commit().await?;
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        write_audit(&mut conn, micros(Utc::now()), e).await
    }

    async fn list_audit(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = Page { after: None, limit }.effective_limit();
        sqlx::query(
            "SELECT id, at, actor, action, target, result, detail FROM audit \
             WHERE at >= $1 ORDER BY at, id LIMIT $2",
        )
        .bind(enc(micros(since)))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn idempotency_get(
        &self,
        key_mac: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT request_mac, claim_id, status, body, created_at FROM idempotency_claims \
             WHERE key_mac = $1",
        )
        .bind(key_mac)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let status: Option<i64> = r.try_get("status")?;
            let body: Option<String> = r.try_get("body")?;
            let answer = match (status, body) {
                (Some(status), Some(body)) => Some(StoredAnswer {
                    status: u16::try_from(status)
                        .map_err(|_| StoreError::corrupt("idempotency_claims.status"))?,
                    body,
                }),
                _ => None,
            };
            Ok(IdempotencyRecord {
                request_mac: r.try_get("request_mac")?,
                claim_id: r.try_get("claim_id")?,
                answer,
                created_at: ts(&r, "created_at")?,
            })
        })
        .transpose()
    }

    async fn idempotency_finish(
        &self,
        claim: &IdempotencyClaim,
        answer: &StoredAnswer,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query(
            "UPDATE idempotency_claims SET status = $1, body = $2 \
             WHERE key_mac = $3 AND claim_id = $4 AND status IS NULL",
        )
        .bind(i64::from(answer.status))
        .bind(&answer.body)
        .bind(&claim.key_mac)
        .bind(&claim.claim_id)
        .execute(&mut *tx)
        .await?;
        let recorded = if updated.rows_affected() == 1 {
            true
        } else {
            sqlx::query(
                "INSERT INTO idempotency_claims \
                 (key_mac, request_mac, claim_id, status, body, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_mac) DO NOTHING",
            )
            .bind(&claim.key_mac)
            .bind(&claim.request_mac)
            .bind(&claim.claim_id)
            .bind(i64::from(answer.status))
            .bind(&answer.body)
            .bind(enc(micros(Utc::now())))
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        };
        tx.commit().await?;
        Ok(recorded)
    }

    async fn saf_enqueue(&self, a: &NewAdvice) -> Result<EnqueueOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = or_rollback!(tx, insert_advice(&mut tx, a).await);
        tx.commit().await?;
        Ok(outcome)
    }

    async fn saf_lease(
        &self,
        destination: Option<&str>,
        holder: &str,
        lease: Duration,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Advice>, StoreError> {
        saf::validate_holder(holder)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = micros(now);
        let until = saf::after(now, lease)?;
        // the write lock taken by BEGIN IMMEDIATE makes select-and-mark one step for every
        // other drainer: none can lease between our read and our update
        let mut tx = self.begin().await?;
        let rows = sqlx::query(concat!(
            "UPDATE saf_messages SET lease_holder = $1, lease_until = $2, \
             attempts = attempts + 1 WHERE id IN (\
             SELECT id FROM saf_messages WHERE status = 'queued' AND next_attempt_at <= $3 \
             AND (lease_until IS NULL OR lease_until <= $3) \
             AND ($4 IS NULL OR destination = $4) \
             ORDER BY priority, created_at, id LIMIT $5) RETURNING ",
            advice_cols!()
        ))
        .bind(holder)
        .bind(enc(until))
        .bind(enc(now))
        .bind(destination)
        .bind(i64::from(limit.min(1000)))
        .fetch_all(&mut *tx)
        .await?;
        let (mut leased, unreadable) = or_rollback!(
            tx,
            saf::sort_leased(&rows, |r| Ok(r.try_get("id")?), advice_from_row)
        );
        for (id, reason) in unreadable {
            // one row changed behind our back must not stall its destination's queue
            tracing::warn!(id, %reason, "unreadable advice dead-lettered");
            sqlx::query(saf::DEAD_LETTER_UNREADABLE)
                .bind(id)
                .bind(&reason)
                .bind(enc(now))
                .execute(&mut *tx)
                .await?;
            let detail = serde_json::json!({"permanent": true, "reason": reason});
            write_audit(
                &mut tx,
                now,
                &audit(holder, "saf.dead-letter", &id.to_string(), detail),
            )
            .await?;
        }
        tx.commit().await?;
        // RETURNING has no defined order
        leased.sort_by_key(|a| (a.priority, a.created_at, a.id));
        Ok(leased)
    }

    async fn saf_complete(
        &self,
        id: AdviceId,
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let advice = or_rollback!(tx, load_advice(&mut tx, id).await);
        or_rollback!(tx, check_holder(&advice, holder));
        sqlx::query(
            "UPDATE saf_messages SET status = 'delivered', settled_at = $2, \
             lease_holder = NULL, lease_until = NULL WHERE id = $1",
        )
        .bind(id.0)
        .bind(enc(micros(now)))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn saf_complete_many(
        &self,
        ids: &[AdviceId],
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<AdviceId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // SQLite has no array parameters: one placeholder per id (a batch is at most 1000)
        let list = (3..ids.len() + 3)
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE saf_messages SET status = 'delivered', settled_at = $2, \
             lease_holder = NULL, lease_until = NULL \
             WHERE status = 'queued' AND lease_holder = $1 AND id IN ({list}) RETURNING id"
        );
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
            .bind(holder)
            .bind(enc(micros(now)));
        for id in ids {
            query = query.bind(id.0);
        }
        let settled = query.fetch_all(&self.pool).await?;
        Ok(settled.into_iter().map(AdviceId).collect())
    }

    async fn saf_fail(
        &self,
        id: AdviceId,
        holder: &str,
        failure: &AdviceFailure,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        let now = micros(now);
        let reason = saf::clean_reason(&failure.reason);
        let mut tx = self.begin().await?;
        let advice = or_rollback!(tx, load_advice(&mut tx, id).await);
        or_rollback!(tx, check_holder(&advice, holder));
        let at_requeue: i64 =
            sqlx::query_scalar("SELECT attempts_at_requeue FROM saf_messages WHERE id = $1")
                .bind(id.0)
                .fetch_one(&mut *tx)
                .await?;
        // the lease already counted this attempt (a drainer that crashed mid-send made one too)
        let attempts = advice.attempts;
        let failures = attempts
            .saturating_sub(saf::advice_count(
                at_requeue,
                "saf_messages.attempts_at_requeue",
            )?)
            .max(1);
        let outcome = if saf::is_dead_letter(policy, failures, failure.permanent) {
            sqlx::query(
                "UPDATE saf_messages SET status = 'dead', last_error = $2, settled_at = $3, \
                 lease_holder = NULL, lease_until = NULL WHERE id = $1",
            )
            .bind(id.0)
            .bind(&reason)
            .bind(enc(now))
            .execute(&mut *tx)
            .await?;
            let detail = serde_json::json!({"destination": advice.destination,
                "attempts": attempts, "permanent": failure.permanent, "reason": reason});
            write_audit(
                &mut tx,
                now,
                &audit(holder, "saf.dead-letter", &id.to_string(), detail),
            )
            .await?;
            FailOutcome::DeadLettered { attempts }
        } else {
            let next = saf::after(now, saf_backoff(policy, failures))?;
            sqlx::query(
                "UPDATE saf_messages SET last_error = $2, next_attempt_at = $3, \
                 lease_holder = NULL, lease_until = NULL WHERE id = $1",
            )
            .bind(id.0)
            .bind(&reason)
            .bind(enc(next))
            .execute(&mut *tx)
            .await?;
            FailOutcome::Retrying {
                attempts,
                next_attempt_at: next,
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn saf_get(&self, id: AdviceId) -> Result<Option<Advice>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            advice_cols!(),
            " FROM saf_messages WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(advice_from_row)
        .transpose()
    }

    async fn saf_list(&self, filter: &SafFilter, page: Page) -> Result<Vec<Advice>, StoreError> {
        let after = saf::parse_advice_after(page.after.as_deref())?;
        sqlx::query(concat!(
            "SELECT ",
            advice_cols!(),
            " FROM saf_messages WHERE id > $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR destination = $3) ORDER BY id LIMIT $4"
        ))
        .bind(after)
        .bind(filter.status.map(AdviceStatus::as_str))
        .bind(filter.destination.as_deref())
        .bind(page.effective_limit())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(advice_from_row)
        .collect()
    }

    async fn saf_stats(&self, now: DateTime<Utc>) -> Result<SafStats, StoreError> {
        let now = micros(now);
        // one read transaction: the figures describe the same instant
        let mut tx = self.pool.begin().await?;
        let backlog = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT destination, priority, COUNT(*) FROM saf_messages WHERE status = 'queued' \
             GROUP BY destination, priority ORDER BY destination, priority",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(destination, priority, count)| {
            Ok(SafBacklog {
                destination,
                priority: saf::advice_priority(priority)?,
                count: count.max(0) as u64,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        let (in_flight, dead, delivered, oldest): (i64, i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT \
             COALESCE(SUM(CASE WHEN status = 'queued' AND lease_until > $1 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END), 0), \
             MIN(CASE WHEN status = 'queued' THEN created_at END) FROM saf_messages",
        )
        .bind(enc(now))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let oldest = oldest
            .map(|v| {
                DateTime::from_timestamp_micros(v)
                    .ok_or_else(|| StoreError::corrupt("saf_messages.created_at"))
            })
            .transpose()?;
        Ok(SafStats {
            backlog,
            in_flight: in_flight.max(0) as u64,
            oldest_age_seconds: saf::age_seconds(oldest, now),
            dead_letters: dead.max(0) as u64,
            delivered_total: delivered.max(0) as u64,
        })
    }

    async fn saf_retry(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let now = micros(now);
        let mut tx = self.begin().await?;
        let advice = or_rollback!(tx, load_advice(&mut tx, id).await);
        if advice.status != AdviceStatus::Queued {
            let _ = tx.rollback().await;
            return Err(StoreError::AdviceState {
                what: format!(
                    "retry advice {id}: it is {}; only queued advices are retried \
                     (requeue a dead letter instead)",
                    advice.status.as_str()
                ),
            });
        }
        sqlx::query("UPDATE saf_messages SET next_attempt_at = $2 WHERE id = $1")
            .bind(id.0)
            .bind(enc(now))
            .execute(&mut *tx)
            .await?;
        let detail = serde_json::json!({"destination": advice.destination});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "saf.retry", &id.to_string(), detail),
        )
        .await?;
        let advice = load_advice(&mut tx, id).await?;
        tx.commit().await?;
        Ok(advice)
    }

    async fn saf_cancel(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let now = micros(now);
        let mut tx = self.begin().await?;
        let advice = or_rollback!(tx, load_advice(&mut tx, id).await);
        or_rollback!(tx, saf::check_cancel(&advice, now));
        sqlx::query(
            "UPDATE saf_messages SET status = 'cancelled', settled_at = $2, \
             lease_holder = NULL, lease_until = NULL WHERE id = $1",
        )
        .bind(id.0)
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        let detail = serde_json::json!({"destination": advice.destination,
            "from": advice.status.as_str()});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "saf.cancel", &id.to_string(), detail),
        )
        .await?;
        let advice = load_advice(&mut tx, id).await?;
        tx.commit().await?;
        Ok(advice)
    }

    async fn saf_requeue_dead_letter(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let now = micros(now);
        let mut tx = self.begin().await?;
        let advice = or_rollback!(tx, load_advice(&mut tx, id).await);
        if advice.status != AdviceStatus::DeadLetter {
            let _ = tx.rollback().await;
            return Err(StoreError::AdviceState {
                what: format!(
                    "requeue advice {id}: it is {}, not a dead letter",
                    advice.status.as_str()
                ),
            });
        }
        sqlx::query(
            "UPDATE saf_messages SET status = 'queued', attempts_at_requeue = attempts, \
             next_attempt_at = $2, settled_at = NULL WHERE id = $1",
        )
        .bind(id.0)
        .bind(enc(now))
        .execute(&mut *tx)
        .await?;
        let detail = serde_json::json!({"destination": advice.destination,
            "attempts": advice.attempts, "lastError": advice.last_error});
        write_audit(
            &mut tx,
            now,
            &audit(actor, "saf.requeue", &id.to_string(), detail),
        )
        .await?;
        let advice = load_advice(&mut tx, id).await?;
        tx.commit().await?;
        Ok(advice)
    }
}
