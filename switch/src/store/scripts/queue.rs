//! The store-and-forward queue (SPEC §6): enqueue, lease, settle, and the operator's actions.
//! The pure rules (backoff, dead-letter policy, validation) are in `store/saf.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn};
use super::super::*;
use super::common::*;

pub(crate) async fn lease(
    c: &mut impl Conn,
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
    // PostgreSQL: SKIP LOCKED makes concurrent drainers pass over rows another one is leasing
    // right now instead of waiting for it and then taking the same row; the CTE is evaluated
    // once. SQLite: the single writer makes select-and-mark one step for every other drainer.
    let rows = c
        .query(
            &format!(
                "WITH picked AS (SELECT id FROM saf_messages WHERE status = 'queued' \
                 AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until <= $3) \
                 AND ($4 IS NULL OR destination = $4) \
                 ORDER BY priority, created_at, id LIMIT $5{{for_update_skip_locked}}) \
                 UPDATE saf_messages SET lease_holder = $1, lease_until = $2, \
                 attempts = attempts + 1 \
                 WHERE id IN (SELECT id FROM picked) RETURNING {ADVICE_COLS}"
            ),
            &[
                Arg::from(holder),
                Arg::from(until),
                Arg::from(now),
                Arg::from(destination),
                Arg::from(limit.min(1000)),
            ],
        )
        .await?;
    let (mut leased, unreadable) = saf::sort_leased(&rows, |r| r.try_get("id"), advice_from_row)?;
    for (id, reason) in unreadable {
        // one row changed behind our back must not stall its destination's queue
        tracing::warn!(id, %reason, "unreadable advice dead-lettered");
        c.execute(
            saf::DEAD_LETTER_UNREADABLE,
            &[Arg::from(id), Arg::from(&reason), Arg::from(now)],
        )
        .await?;
        let detail = serde_json::json!({"permanent": true, "reason": reason});
        write_audit(
            c,
            now,
            &audit(holder, "saf.dead-letter", &id.to_string(), detail),
        )
        .await?;
    }
    // RETURNING has no defined order
    leased.sort_by_key(|a| (a.priority, a.created_at, a.id));
    Ok(leased)
}

pub(crate) async fn complete(
    c: &mut impl Conn,
    id: AdviceId,
    holder: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let advice = load_advice(c, id).await?;
    check_holder(&advice, holder)?;
    c.execute(
        "UPDATE saf_messages SET status = 'delivered', settled_at = $2, \
         lease_holder = NULL, lease_until = NULL WHERE id = $1",
        &[Arg::from(id.0), Arg::from(micros(now))],
    )
    .await?;
    Ok(())
}

pub(crate) async fn complete_many(
    c: &mut impl Conn,
    ids: &[AdviceId],
    holder: &str,
    now: DateTime<Utc>,
) -> Result<Vec<AdviceId>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    c.query(
        "UPDATE saf_messages SET status = 'delivered', settled_at = $3, \
         lease_holder = NULL, lease_until = NULL \
         WHERE id {in_list}$1{end_list} AND status = 'queued' AND lease_holder = $2 \
         RETURNING id",
        &[
            Arg::IntList(&ids),
            Arg::from(holder),
            Arg::from(micros(now)),
        ],
    )
    .await?
    .iter()
    .map(|r| r.first().map(AdviceId))
    .collect()
}

pub(crate) async fn fail(
    c: &mut impl Conn,
    id: AdviceId,
    holder: &str,
    failure: &AdviceFailure,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<FailOutcome, StoreError> {
    let now = micros(now);
    let reason = saf::clean_reason(&failure.reason);
    let advice = load_advice(c, id).await?;
    check_holder(&advice, holder)?;
    let at_requeue: i64 = c
        .scalar(
            "SELECT attempts_at_requeue FROM saf_messages WHERE id = $1",
            &[Arg::from(id.0)],
        )
        .await?;
    // the lease already counted this attempt (a drainer that crashed mid-send made one too)
    let attempts = advice.attempts;
    let failures = attempts
        .saturating_sub(saf::advice_count(
            at_requeue,
            "saf_messages.attempts_at_requeue",
        )?)
        .max(1);
    if saf::is_dead_letter(policy, failures, failure.permanent) {
        c.execute(
            "UPDATE saf_messages SET status = 'dead', last_error = $2, settled_at = $3, \
             lease_holder = NULL, lease_until = NULL WHERE id = $1",
            &[Arg::from(id.0), Arg::from(&reason), Arg::from(now)],
        )
        .await?;
        let detail = serde_json::json!({"destination": advice.destination,
            "attempts": attempts, "permanent": failure.permanent, "reason": reason});
        write_audit(
            c,
            now,
            &audit(holder, "saf.dead-letter", &id.to_string(), detail),
        )
        .await?;
        Ok(FailOutcome::DeadLettered { attempts })
    } else {
        let next = saf::after(now, saf_backoff(policy, failures))?;
        c.execute(
            "UPDATE saf_messages SET last_error = $2, next_attempt_at = $3, \
             lease_holder = NULL, lease_until = NULL WHERE id = $1",
            &[Arg::from(id.0), Arg::from(&reason), Arg::from(next)],
        )
        .await?;
        Ok(FailOutcome::Retrying {
            attempts,
            next_attempt_at: next,
        })
    }
}

pub(crate) async fn get(c: &mut impl Conn, id: AdviceId) -> Result<Option<Advice>, StoreError> {
    c.query_opt(
        select!(ADVICE_COLS, "FROM saf_messages WHERE id = $1"),
        &[Arg::from(id.0)],
    )
    .await?
    .as_ref()
    .map(advice_from_row)
    .transpose()
}

pub(crate) async fn list(
    c: &mut impl Conn,
    filter: &SafFilter,
    page: &Page,
) -> Result<Vec<Advice>, StoreError> {
    let after = saf::parse_advice_after(page.after.as_deref())?;
    c.query(
        select!(
            ADVICE_COLS,
            "FROM saf_messages WHERE id > $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR destination = $3) ORDER BY id LIMIT $4"
        ),
        &[
            Arg::from(after),
            Arg::from(filter.status.map(AdviceStatus::as_str)),
            Arg::from(filter.destination.as_deref()),
            Arg::from(page.effective_limit()),
        ],
    )
    .await?
    .iter()
    .map(advice_from_row)
    .collect()
}

pub(crate) async fn stats(c: &mut impl Conn, now: DateTime<Utc>) -> Result<SafStats, StoreError> {
    let now = micros(now);
    // one snapshot: the figures describe the same instant
    c.snapshot().await?;
    let backlog = c
        .query(
            "SELECT destination, priority, COUNT(*) AS n FROM saf_messages \
             WHERE status = 'queued' GROUP BY destination, priority \
             ORDER BY destination, priority",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(SafBacklog {
                destination: r.try_get("destination")?,
                priority: saf::advice_priority(r.try_get("priority")?)?,
                count: r.try_get::<i64>("n")?.max(0) as u64,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let row = c
        .query_one(
            "SELECT \
             COALESCE(SUM(CASE WHEN status = 'queued' AND lease_until > $1 THEN 1 ELSE 0 END), 0) \
               AS in_flight, \
             COALESCE(SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END), 0) AS dead, \
             COALESCE(SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END), 0) AS delivered, \
             MIN(CASE WHEN status = 'queued' THEN created_at END) AS oldest FROM saf_messages",
            &[Arg::from(now)],
        )
        .await?;
    let count =
        |col: &str| -> Result<u64, StoreError> { Ok(row.try_get::<i64>(col)?.max(0) as u64) };
    Ok(SafStats {
        backlog,
        in_flight: count("in_flight")?,
        oldest_age_seconds: saf::age_seconds(row.try_get("oldest")?, now),
        dead_letters: count("dead")?,
        delivered_total: count("delivered")?,
    })
}

/// The operator's retry: a queued advice becomes due now.
pub(crate) async fn retry(
    c: &mut impl Conn,
    id: AdviceId,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Advice, StoreError> {
    let now = micros(now);
    let advice = load_advice(c, id).await?;
    if advice.status != AdviceStatus::Queued {
        return Err(StoreError::AdviceState {
            what: format!(
                "retry advice {id}: it is {}; only queued advices are retried \
                 (requeue a dead letter instead)",
                advice.status.as_str()
            ),
        });
    }
    c.execute(
        "UPDATE saf_messages SET next_attempt_at = $2 WHERE id = $1",
        &[Arg::from(id.0), Arg::from(now)],
    )
    .await?;
    let detail = serde_json::json!({"destination": advice.destination});
    write_audit(c, now, &audit(actor, "saf.retry", &id.to_string(), detail)).await?;
    load_advice(c, id).await
}

pub(crate) async fn cancel(
    c: &mut impl Conn,
    id: AdviceId,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Advice, StoreError> {
    let now = micros(now);
    let advice = load_advice(c, id).await?;
    saf::check_cancel(&advice, now)?;
    c.execute(
        "UPDATE saf_messages SET status = 'cancelled', settled_at = $2, \
         lease_holder = NULL, lease_until = NULL WHERE id = $1",
        &[Arg::from(id.0), Arg::from(now)],
    )
    .await?;
    let detail = serde_json::json!({"destination": advice.destination,
        "from": advice.status.as_str()});
    write_audit(c, now, &audit(actor, "saf.cancel", &id.to_string(), detail)).await?;
    load_advice(c, id).await
}

pub(crate) async fn requeue_dead_letter(
    c: &mut impl Conn,
    id: AdviceId,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Advice, StoreError> {
    let now = micros(now);
    let advice = load_advice(c, id).await?;
    if advice.status != AdviceStatus::DeadLetter {
        return Err(StoreError::AdviceState {
            what: format!(
                "requeue advice {id}: it is {}, not a dead letter",
                advice.status.as_str()
            ),
        });
    }
    c.execute(
        "UPDATE saf_messages SET status = 'queued', attempts_at_requeue = attempts, \
         next_attempt_at = $2, settled_at = NULL WHERE id = $1",
        &[Arg::from(id.0), Arg::from(now)],
    )
    .await?;
    let detail = serde_json::json!({"destination": advice.destination,
        "attempts": advice.attempts, "lastError": advice.last_error});
    write_audit(
        c,
        now,
        &audit(actor, "saf.requeue", &id.to_string(), detail),
    )
    .await?;
    load_advice(c, id).await
}
