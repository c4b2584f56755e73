//! Row mapping and the statements many scripts share (audit, journal claims, advice inserts).

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn, Row, Violation};
use super::super::*;
use crate::domain::{KeyOwner, ResponseCode, WrappedKey};

pub(crate) const TERMINAL_COLS: &str = "id, grp, kind, created_at";
pub(crate) const KEY_COLS: &str = "id, terminal_id, key_type, version, state, kcv, wrapped, \
     rotation_id, grace_seconds, created_at, activated_at, expired_at, grace_until";
pub(crate) const ACCOUNT_COLS: &str = "id, currency, balance, daily_withdrawal_limit, created_at";
pub(crate) const CARD_COLS: &str =
    "id, pan_token, last4, expiry, account_id, pvv, pin_tries, upstream, created_at";
pub(crate) const JOURNAL_COLS: &str = "id, terminal_id, stan, transmission, digest, mti, kind, \
     amount, currency, response_code, rrn, auth_code, ledger_balance, available_balance, \
     reversed, upstream_ref, created_at";
pub(crate) const ADVICE_COLS: &str = "id, destination, priority, mti, idempotency_key, \
     payload{as_text} AS payload, reference, status, attempts, next_attempt_at, lease_holder, \
     lease_until, last_error, created_at, settled_at";

/// `SELECT <cols> FROM <rest>`, built once per call site.
macro_rules! select {
    ($cols:expr, $rest:expr) => {
        &format!("SELECT {} {}", $cols, $rest)
    };
}
pub(crate) use select;

/// A statement's failure as the caller should hear it when it broke a foreign key.
pub(crate) fn on_foreign_key(err: StoreError, missing: impl FnOnce() -> StoreError) -> StoreError {
    if err.violation() == Some(Violation::ForeignKey) {
        missing()
    } else {
        err
    }
}

pub(crate) fn terminal_from_row(row: &Row) -> Result<Terminal, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Terminal {
        id: parse_terminal_id(row.try_get("id")?, "terminals.id")?,
        group: row.try_get("grp")?,
        kind: TerminalKind::parse(&kind)
            .ok_or_else(|| StoreError::corrupt(format!("terminals.kind {kind:?}")))?,
        created_at: row.try_get("created_at")?,
    })
}

pub(crate) fn key_from_row(row: &Row) -> Result<KeyRecord, StoreError> {
    let rotation: Option<String> = row.try_get("rotation_id")?;
    let terminal_id = parse_terminal_id(row.try_get("terminal_id")?, "keys.terminal_id")?;
    Ok(KeyRecord {
        id: KeyId::new(row.try_get::<String>("id")?).map_err(|_| StoreError::corrupt("keys.id"))?,
        key_type: parse_key_type(&row.try_get::<String>("key_type")?)?,
        version: row.try_get("version")?,
        state: parse_key_state(&row.try_get::<String>("state")?)?,
        kcv: row.try_get("kcv")?,
        // the row's terminal is who the HSM checks the key's binding against
        wrapped: WrappedKey::owned_by(
            row.try_get::<String>("wrapped")?,
            KeyOwner::Terminal(terminal_id.clone()),
        ),
        terminal_id,
        rotation_id: rotation
            .map(RotationId::new)
            .transpose()
            .map_err(|_| StoreError::corrupt("keys.rotation_id"))?,
        grace_seconds: row.try_get("grace_seconds")?,
        created_at: row.try_get("created_at")?,
        activated_at: row.try_get("activated_at")?,
        expired_at: row.try_get("expired_at")?,
        grace_until: row.try_get("grace_until")?,
    })
}

pub(crate) fn account_from_row(row: &Row) -> Result<Account, StoreError> {
    Ok(Account {
        id: AccountId::new(row.try_get::<String>("id")?)
            .map_err(|_| StoreError::corrupt("accounts.id"))?,
        currency: row.try_get("currency")?,
        balance: row.try_get("balance")?,
        daily_withdrawal_limit: row.try_get("daily_withdrawal_limit")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(crate) fn card_from_row(row: &Row) -> Result<Card, StoreError> {
    let tries: i64 = row.try_get("pin_tries")?;
    let pin_tries = u32::try_from(tries).map_err(|_| StoreError::corrupt("cards.pin_tries"))?;
    Ok(Card {
        id: CardId::new(row.try_get::<String>("id")?)
            .map_err(|_| StoreError::corrupt("cards.id"))?,
        pan_token: row.try_get("pan_token")?,
        last4: row.try_get("last4")?,
        expiry: row.try_get("expiry")?,
        account_id: AccountId::new(row.try_get::<String>("account_id")?)
            .map_err(|_| StoreError::corrupt("cards.account_id"))?,
        pvv: row.try_get("pvv")?,
        pin_tries,
        pin_blocked: pin_tries >= PIN_TRIES_LIMIT,
        upstream: row.try_get("upstream")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A journal row and the digest of the request that made it.
pub(crate) fn journal_from_row(row: &Row) -> Result<(String, JournalEntry), StoreError> {
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
        created_at: row.try_get("created_at")?,
        digest: row.try_get("digest")?,
    };
    Ok((entry.digest.clone(), entry))
}

pub(crate) fn audit_from_row(row: &Row) -> Result<AuditRecord, StoreError> {
    let detail: String = row.try_get("detail")?;
    Ok(AuditRecord {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        result: row.try_get("result")?,
        detail: serde_json::from_str(&detail).map_err(|_| StoreError::corrupt("audit.detail"))?,
    })
}

pub(crate) fn advice_from_row(row: &Row) -> Result<Advice, StoreError> {
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
        next_attempt_at: row.try_get("next_attempt_at")?,
        lease_holder: row.try_get("lease_holder")?,
        lease_until: row.try_get("lease_until")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        settled_at: row.try_get("settled_at")?,
    })
}

/// Inserts the `Idempotency-Key` claim of the admin write running on this task, if any, in the
/// transaction `c` is in (see `idempotency.rs`; an engine that runs scripts on its own thread
/// carries the claim there). `IdempotencyClaimed` when another attempt holds the key: the
/// caller's transaction then rolls back.
pub(crate) async fn claim_in(c: &mut impl Conn, at: DateTime<Utc>) -> Result<(), StoreError> {
    let Some(claim) = idempotency::current_claim() else {
        return Ok(());
    };
    let done = c
        .execute(
            "INSERT INTO idempotency_claims (key_mac, request_mac, claim_id, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key_mac) DO NOTHING",
            &[
                Arg::from(&claim.key_mac),
                Arg::from(&claim.request_mac),
                Arg::from(&claim.claim_id),
                Arg::from(at),
            ],
        )
        .await?;
    if done == 1 {
        return Ok(());
    }
    let holder: Option<String> = c
        .scalar_opt(
            "SELECT claim_id FROM idempotency_claims WHERE key_mac = $1",
            &[Arg::from(&claim.key_mac)],
        )
        .await?;
    if holder.as_deref() == Some(claim.claim_id.as_str()) {
        Ok(())
    } else {
        Err(StoreError::IdempotencyClaimed)
    }
}

/// Appends an audit record in the caller's transaction, with the admin write's claim if any.
pub(crate) async fn write_audit(
    c: &mut impl Conn,
    at: DateTime<Utc>,
    e: &NewAudit,
) -> Result<(), StoreError> {
    claim_in(c, at).await?;
    let detail = e.detail.to_string();
    c.execute(
        "INSERT INTO audit (at, actor, action, target, result, detail) \
         VALUES ($1, $2, $3, $4, $5, $6{jsonb})",
        &[
            Arg::from(at),
            Arg::from(&e.actor),
            Arg::from(&e.action),
            Arg::from(&e.target),
            Arg::from(&e.result),
            Arg::Json(&detail),
        ],
    )
    .await?;
    Ok(())
}

pub(crate) fn audit(
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> NewAudit {
    NewAudit {
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        result: "ok".to_string(),
        detail,
    }
}

pub(crate) async fn load_key(c: &mut impl Conn, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    c.query_opt(
        select!(KEY_COLS, "FROM keys WHERE id = $1"),
        &[Arg::from(id)],
    )
    .await?
    .as_ref()
    .map(key_from_row)
    .transpose()
}

pub(crate) async fn load_journal(
    c: &mut impl Conn,
    id: &RequestIdentity,
) -> Result<Option<(String, JournalEntry)>, StoreError> {
    c.query_opt(
        select!(
            JOURNAL_COLS,
            "FROM journal WHERE terminal_id = $1 AND stan = $2 AND transmission = $3"
        ),
        &[
            Arg::from(id.terminal_id.as_str()),
            Arg::from(&id.stan),
            Arg::from(&id.transmission),
        ],
    )
    .await?
    .as_ref()
    .map(journal_from_row)
    .transpose()
}

/// Loads an advice and locks its row until the transaction ends.
pub(crate) async fn load_advice(c: &mut impl Conn, id: AdviceId) -> Result<Advice, StoreError> {
    c.query_opt(
        select!(ADVICE_COLS, "FROM saf_messages WHERE id = $1{for_update}"),
        &[Arg::from(id.0)],
    )
    .await?
    .as_ref()
    .map(advice_from_row)
    .transpose()?
    .ok_or_else(|| StoreError::not_found(format!("advice {id}")))
}

/// Checks that `holder` still holds a queued advice; the error says who does instead.
pub(crate) fn check_holder(a: &Advice, holder: &str) -> Result<(), StoreError> {
    if a.status == AdviceStatus::Queued && a.lease_holder.as_deref() == Some(holder) {
        Ok(())
    } else {
        Err(saf::lease_lost(a.id, a.status, a.lease_holder.as_deref()))
    }
}

/// What a journal row is claimed with.
pub(crate) struct Claim<'a> {
    pub(crate) identity: &'a RequestIdentity,
    pub(crate) digest: &'a str,
    pub(crate) mti: &'a str,
    pub(crate) kind: JournalKind,
    pub(crate) amount: Option<i64>,
    pub(crate) currency: &'a str,
    pub(crate) rrn: &'a str,
    pub(crate) account: Option<&'a AccountId>,
    pub(crate) card: Option<&'a CardId>,
    pub(crate) reversal_of: Option<&'a RequestIdentity>,
    pub(crate) upstream_ref: Option<&'a str>,
    pub(crate) now: DateTime<Utc>,
}

/// Claims a request identity by inserting its journal row (response `96` until the end of the
/// transaction). `None` when the identity exists: then the existing row decides the answer.
pub(crate) async fn claim_identity(
    c: &mut impl Conn,
    claim: &Claim<'_>,
) -> Result<Option<String>, StoreError> {
    let id = uuid::Uuid::new_v4().to_string();
    let identity = claim.identity;
    let done = c
        .execute(
            "INSERT INTO journal (id, terminal_id, stan, transmission, digest, mti, kind, amount, \
             currency, response_code, rrn, account_id, card_id, created_at, orig_terminal_id, \
             orig_stan, orig_transmission, upstream_ref) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '96', $10, $11, $12, $13, $14, $15, \
             $16, $17) ON CONFLICT (terminal_id, stan, transmission) DO NOTHING",
            &[
                Arg::from(&id),
                Arg::from(identity.terminal_id.as_str()),
                Arg::from(&identity.stan),
                Arg::from(&identity.transmission),
                Arg::from(claim.digest),
                Arg::from(claim.mti),
                Arg::from(claim.kind.as_str()),
                Arg::from(claim.amount),
                Arg::from(claim.currency),
                Arg::from(claim.rrn),
                Arg::from(claim.account.map(AccountId::as_str)),
                Arg::from(claim.card.map(CardId::as_str)),
                Arg::from(claim.now),
                Arg::from(claim.reversal_of.map(|o| o.terminal_id.as_str())),
                Arg::from(claim.reversal_of.map(|o| o.stan.as_str())),
                Arg::from(claim.reversal_of.map(|o| o.transmission.as_str())),
                Arg::from(claim.upstream_ref),
            ],
        )
        .await?;
    Ok((done == 1).then_some(id))
}

/// Serializes everything that concerns one request identity: its authorization and any reversal
/// that names it. Without it a reversal could miss an original whose transaction is still in
/// flight (invisible at READ COMMITTED), answer `21`, and let the debit stand. Released at commit.
pub(crate) async fn lock_identity(
    c: &mut impl Conn,
    id: &RequestIdentity,
) -> Result<(), StoreError> {
    let key = format!(
        "journal\u{1f}{}\u{1f}{}\u{1f}{}",
        id.terminal_id, id.stan, id.transmission
    );
    c.lock_key(&key).await
}

/// The answer to a request whose identity is already journaled.
pub(crate) async fn answer_existing(
    c: &mut impl Conn,
    identity: &RequestIdentity,
    digest: &str,
) -> Result<AuthOutcome, StoreError> {
    let (stored_digest, entry) = load_journal(c, identity)
        .await?
        .ok_or_else(|| StoreError::corrupt("journal: claimed identity vanished"))?;
    Ok(if stored_digest == digest {
        AuthOutcome::Duplicate(entry)
    } else {
        AuthOutcome::ContentMismatch
    })
}

/// Writes the final answer onto a claimed journal row and returns the entry.
pub(crate) async fn finish_journal(
    c: &mut impl Conn,
    journal_id: &str,
    code: ResponseCode,
    answer: &Answer<'_>,
) -> Result<JournalEntry, StoreError> {
    // one round trip: the row comes back with the update
    let row = c
        .query_one(
            &format!(
                "UPDATE journal SET response_code = $2, auth_code = $3, ledger_balance = $4, \
                 available_balance = $9, business_day = $5, amount = COALESCE($6, amount), \
                 currency = COALESCE($7, currency), original_id = $8, \
                 upstream_ref = COALESCE($10, upstream_ref) WHERE id = $1 RETURNING {JOURNAL_COLS}"
            ),
            &[
                Arg::from(journal_id),
                Arg::from(code.as_str()),
                Arg::from(answer.auth_code),
                Arg::from(answer.ledger),
                Arg::from(answer.business_day),
                Arg::from(answer.amount),
                Arg::from(answer.currency),
                Arg::from(answer.original_id),
                Arg::from(answer.available),
                Arg::from(answer.upstream_ref),
            ],
        )
        .await?;
    Ok(journal_from_row(&row)?.1)
}

/// Queues an advice inside the caller's transaction (validated here, so every path that queues
/// one applies the same rules).
pub(crate) async fn insert_advice(
    c: &mut impl Conn,
    a: &NewAdvice,
) -> Result<EnqueueOutcome, StoreError> {
    saf::validate_new_advice(a)?;
    let payload = a.payload.to_string();
    let inserted: Option<i64> = c
        .scalar_opt(
            "INSERT INTO saf_messages (destination, priority, mti, idempotency_key, payload, \
             reference, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5{jsonb}, $6, $7, $7) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            &[
                Arg::from(&a.destination),
                Arg::from(i64::from(a.priority)),
                Arg::from(a.mti.mti()),
                Arg::from(&a.idempotency_key),
                Arg::Json(&payload),
                Arg::from(a.reference.as_deref()),
                Arg::from(micros(a.created_at)),
            ],
        )
        .await?;
    Ok(match inserted {
        Some(id) => EnqueueOutcome::Enqueued(AdviceId(id)),
        None => {
            // PostgreSQL: ON CONFLICT waited for the transaction that inserted the key to
            // commit; this statement's fresh READ COMMITTED snapshot sees its row
            let id: i64 = c
                .scalar(
                    "SELECT id FROM saf_messages WHERE idempotency_key = $1",
                    &[Arg::from(&a.idempotency_key)],
                )
                .await?;
            EnqueueOutcome::AlreadyQueued(AdviceId(id))
        }
    })
}
