//! Sign-on replay records, acquirer STAN blocks, link keys, the audit trail and admin
//! `Idempotency-Key` answers.

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn};
use super::super::*;
use super::common::*;
use crate::domain::{KeyOwner, TerminalId, WrappedKey};

pub(crate) async fn accept_sign_on(
    c: &mut impl Conn,
    terminal: &TerminalId,
    stan: &str,
    transmitted: &str,
    now: DateTime<Utc>,
    prune_before: DateTime<Utc>,
) -> Result<bool, StoreError> {
    c.execute(
        "DELETE FROM accepted_sign_ons WHERE terminal_id = $1 AND accepted_at < $2",
        &[
            Arg::from(terminal.as_str()),
            Arg::from(micros(prune_before)),
        ],
    )
    .await?;
    let inserted = c
        .execute(
            "INSERT INTO accepted_sign_ons (terminal_id, stan, transmitted, accepted_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[
                Arg::from(terminal.as_str()),
                Arg::from(stan),
                Arg::from(transmitted),
                Arg::from(micros(now)),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

pub(crate) async fn reserve_stans(
    c: &mut impl Conn,
    station: &str,
    count: u32,
) -> Result<u32, StoreError> {
    validate_stan_reservation(station, count)?;
    // one statement: the row lock (or SQLite's write lock) makes read-and-advance atomic
    let next: i64 = c
        .scalar(
            "INSERT INTO stan_counters (station, next_stan) VALUES ($1, $2 % 999999 + 1) \
             ON CONFLICT (station) DO UPDATE \
             SET next_stan = (stan_counters.next_stan - 1 + $2) % 999999 + 1 \
             RETURNING next_stan",
            &[Arg::from(station), Arg::from(count)],
        )
        .await?;
    stan_block_first(next, count)
}

pub(crate) async fn link_keys(
    c: &mut impl Conn,
    upstream: &str,
) -> Result<Option<LinkKeys>, StoreError> {
    let row = c
        .query_opt(
            "SELECT tpk, tak, exchanged_at FROM link_keys WHERE upstream = $1",
            &[Arg::from(upstream)],
        )
        .await?;
    row.map(|r| {
        Ok(LinkKeys {
            tpk: WrappedKey::owned_by(
                r.try_get::<String>("tpk")?,
                KeyOwner::Upstream(upstream.to_string()),
            ),
            tak: WrappedKey::owned_by(
                r.try_get::<String>("tak")?,
                KeyOwner::Upstream(upstream.to_string()),
            ),
            exchanged_at: r.try_get("exchanged_at")?,
        })
    })
    .transpose()
}

pub(crate) async fn save_link_keys(
    c: &mut impl Conn,
    upstream: &str,
    keys: &LinkKeys,
) -> Result<(), StoreError> {
    validate_link_keys(upstream, keys)?;
    c.execute(
        "INSERT INTO link_keys (upstream, tpk, tak, exchanged_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (upstream) DO UPDATE \
         SET tpk = excluded.tpk, tak = excluded.tak, exchanged_at = excluded.exchanged_at \
         WHERE link_keys.exchanged_at < excluded.exchanged_at",
        &[
            Arg::from(upstream),
            Arg::from(&keys.tpk.0),
            Arg::from(&keys.tak.0),
            Arg::from(micros(keys.exchanged_at)),
        ],
    )
    .await?;
    Ok(())
}

pub(crate) async fn append_audit(c: &mut impl Conn, e: &NewAudit) -> Result<(), StoreError> {
    // with an admin write's claim, the claim and the audit record commit together
    write_audit(c, micros(Utc::now()), e).await
}

pub(crate) async fn list_audit(
    c: &mut impl Conn,
    since: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    let limit = Page { after: None, limit }.effective_limit();
    c.query(
        "SELECT id, at, actor, action, target, result, detail{as_text} AS detail FROM audit \
         WHERE at >= $1 ORDER BY at, id LIMIT $2",
        &[Arg::from(micros(since)), Arg::from(limit)],
    )
    .await?
    .iter()
    .map(audit_from_row)
    .collect()
}

pub(crate) async fn idempotency_get(
    c: &mut impl Conn,
    key_mac: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let row = c
        .query_opt(
            "SELECT request_mac, claim_id, status, body, created_at FROM idempotency_claims \
             WHERE key_mac = $1",
            &[Arg::from(key_mac)],
        )
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
            created_at: r.try_get("created_at")?,
        })
    })
    .transpose()
}

pub(crate) async fn idempotency_finish(
    c: &mut impl Conn,
    claim: &IdempotencyClaim,
    answer: &StoredAnswer,
) -> Result<bool, StoreError> {
    let updated = c
        .execute(
            "UPDATE idempotency_claims SET status = $1, body = $2 \
             WHERE key_mac = $3 AND claim_id = $4 AND status IS NULL",
            &[
                Arg::from(u32::from(answer.status)),
                Arg::from(&answer.body),
                Arg::from(&claim.key_mac),
                Arg::from(&claim.claim_id),
            ],
        )
        .await?;
    if updated == 1 {
        return Ok(true);
    }
    let inserted = c
        .execute(
            "INSERT INTO idempotency_claims \
             (key_mac, request_mac, claim_id, status, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_mac) DO NOTHING",
            &[
                Arg::from(&claim.key_mac),
                Arg::from(&claim.request_mac),
                Arg::from(&claim.claim_id),
                Arg::from(u32::from(answer.status)),
                Arg::from(&answer.body),
                Arg::from(micros(Utc::now())),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Deletes up to `limit` claims created before `before` (a bounded statement: a large backlog
/// goes in several short transactions rather than one that holds the table).
pub(crate) async fn purge_idempotency(
    c: &mut impl Conn,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    c.execute(
        "DELETE FROM idempotency_claims WHERE key_mac IN \
         (SELECT key_mac FROM idempotency_claims WHERE created_at < $1 LIMIT $2)",
        &[Arg::from(micros(before)), Arg::from(limit)],
    )
    .await
}
