//! The fleet-wide session registry (issue 16): replica leases, sessions, and the record of key
//! pushes that paces a rotation across the whole fleet.
//!
//! Written once for both engines. On PostgreSQL the migration's triggers turn a removed session
//! and a key change into `NOTIFY`s for the other replicas; the scripts do not know about them, so
//! SQLite (one replica) runs exactly the same statements.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn, Row};
use super::super::*;
use crate::domain::{KeyType, TerminalId};

fn lease_end(now: DateTime<Utc>, lease: Duration) -> Result<DateTime<Utc>, StoreError> {
    chrono::Duration::from_std(lease)
        .ok()
        .filter(|d| *d > chrono::Duration::zero() && *d <= chrono::Duration::days(1))
        .map(|d| micros(now + d))
        .ok_or_else(|| StoreError::invalid("replica lease: must be above zero and at most a day"))
}

fn validate_replica(replica: &str) -> Result<(), StoreError> {
    if replica.is_empty() || replica.len() > 253 || replica.chars().any(char::is_control) {
        return Err(StoreError::invalid(
            "replica id: must be 1 to 253 printable characters",
        ));
    }
    Ok(())
}

fn session_ref(r: &Row) -> Result<SessionRef, StoreError> {
    Ok(SessionRef {
        replica: r.try_get("replica_id")?,
        conn_id: r.try_get("conn_id")?,
        terminal: parse_terminal_id(r.try_get("terminal_id")?, "terminal_sessions.terminal_id")?,
    })
}

/// Removes the key-push records of one session (it ended; a later session is pushed afresh).
async fn forget_pushes(c: &mut impl Conn, replica: &str, conn_id: i64) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM key_pushes WHERE replica_id = $1 AND conn_id = $2",
        &[Arg::from(replica), Arg::Int(conn_id)],
    )
    .await?;
    Ok(())
}

/// A replica starts: its sessions and pushes left from an earlier run are removed, its lease
/// begins. Returns how many stale sessions were removed.
pub(crate) async fn register_replica(
    c: &mut impl Conn,
    replica: &str,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    validate_replica(replica)?;
    let until = lease_end(now, lease)?;
    c.execute(
        "DELETE FROM key_pushes WHERE replica_id = $1",
        &[Arg::from(replica)],
    )
    .await?;
    let stale = c
        .execute(
            "DELETE FROM terminal_sessions WHERE replica_id = $1",
            &[Arg::from(replica)],
        )
        .await?;
    c.execute(
        "INSERT INTO switch_replicas (replica_id, started_at, lease_until) VALUES ($1, $2, $3) \
         ON CONFLICT (replica_id) DO UPDATE \
         SET started_at = excluded.started_at, lease_until = excluded.lease_until",
        &[Arg::from(replica), Arg::from(micros(now)), Arg::from(until)],
    )
    .await?;
    Ok(stale)
}

/// Renews the replica's lease, records traffic on its `active` connections, removes the
/// sessions of replicas whose lease ended, and returns the replica's own sessions.
pub(crate) async fn renew_replica(
    c: &mut impl Conn,
    replica: &str,
    lease: Duration,
    active: &[i64],
    now: DateTime<Utc>,
) -> Result<RegistrySweep, StoreError> {
    validate_replica(replica)?;
    let until = lease_end(now, lease)?;
    let now = micros(now);
    // replicas sweeping at once would delete the same rows in different orders
    c.lock_key("switchyard-registry-sweep").await?;
    let renewed = c
        .execute(
            "UPDATE switch_replicas SET lease_until = $2 WHERE replica_id = $1",
            &[Arg::from(replica), Arg::from(until)],
        )
        .await?;
    let re_registered = renewed == 0;
    if re_registered {
        c.execute(
            "INSERT INTO switch_replicas (replica_id, started_at, lease_until) VALUES ($1, $2, $3)",
            &[Arg::from(replica), Arg::from(now), Arg::from(until)],
        )
        .await?;
    }
    if !active.is_empty() {
        c.execute(
            "UPDATE terminal_sessions SET last_seen = $2 \
             WHERE replica_id = $1 AND conn_id {in_list}$3{end_list}",
            &[Arg::from(replica), Arg::from(now), Arg::IntList(active)],
        )
        .await?;
    }
    c.execute(
        "DELETE FROM switch_replicas WHERE lease_until < $1",
        &[Arg::from(now)],
    )
    .await?;
    c.execute(
        "DELETE FROM key_pushes WHERE replica_id NOT IN (SELECT replica_id FROM switch_replicas)",
        &[],
    )
    .await?;
    let expired_sessions = c
        .execute(
            "DELETE FROM terminal_sessions \
             WHERE replica_id NOT IN (SELECT replica_id FROM switch_replicas)",
            &[],
        )
        .await?;
    let own = c
        .query(
            "SELECT replica_id, conn_id, terminal_id FROM terminal_sessions \
             WHERE replica_id = $1 ORDER BY conn_id",
            &[Arg::from(replica)],
        )
        .await?
        .iter()
        .map(session_ref)
        .collect::<Result<_, _>>()?;
    Ok(RegistrySweep {
        own,
        re_registered,
        expired_sessions,
    })
}

/// A replica stops (graceful shutdown): its sessions, pushes and lease are removed.
pub(crate) async fn release_replica(c: &mut impl Conn, replica: &str) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM key_pushes WHERE replica_id = $1",
        "DELETE FROM terminal_sessions WHERE replica_id = $1",
        "DELETE FROM switch_replicas WHERE replica_id = $1",
    ] {
        c.execute(sql, &[Arg::from(replica)]).await?;
    }
    Ok(())
}

/// Records a sign-on. An ATM's other sessions, wherever they are, are removed in the same
/// transaction (and returned, so their replicas close them); a station keeps its others. The
/// connection's previous session, of another terminal, is removed too.
pub(crate) async fn record_sign_on(
    c: &mut impl Conn,
    e: &SessionEntry,
    now: DateTime<Utc>,
) -> Result<Vec<SessionRef>, StoreError> {
    validate_replica(&e.replica)?;
    // two replicas signing the same ATM on at once must not both keep their session
    c.lock_key(&format!("switchyard-session:{}", e.terminal))
        .await?;
    let sql = match e.kind {
        TerminalKind::Atm => {
            "DELETE FROM terminal_sessions \
             WHERE (terminal_id = $1 AND NOT (replica_id = $2 AND conn_id = $3)) \
                OR (replica_id = $2 AND conn_id = $3 AND terminal_id <> $1) \
             RETURNING replica_id, conn_id, terminal_id"
        }
        TerminalKind::Station => {
            "DELETE FROM terminal_sessions \
             WHERE replica_id = $2 AND conn_id = $3 AND terminal_id <> $1 \
             RETURNING replica_id, conn_id, terminal_id"
        }
    };
    let removed: Vec<SessionRef> = c
        .query(
            sql,
            &[
                Arg::from(e.terminal.as_str()),
                Arg::from(e.replica.as_str()),
                Arg::Int(e.conn_id),
            ],
        )
        .await?
        .iter()
        .map(session_ref)
        .collect::<Result<_, _>>()?;
    for old in &removed {
        forget_pushes(c, &old.replica, old.conn_id).await?;
    }
    // the same connection signing on again keeps its row: no removal, so no notification
    c.execute(
        "INSERT INTO terminal_sessions \
         (replica_id, conn_id, terminal_id, kind, remote, signed_on_at, last_seen) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (replica_id, conn_id) DO UPDATE \
         SET remote = excluded.remote, signed_on_at = excluded.signed_on_at, \
             last_seen = excluded.last_seen",
        &[
            Arg::from(e.replica.as_str()),
            Arg::Int(e.conn_id),
            Arg::from(e.terminal.as_str()),
            Arg::from(e.kind.as_str()),
            Arg::from(e.remote.as_str()),
            Arg::from(micros(e.signed_on_at)),
            Arg::from(micros(now)),
        ],
    )
    .await?;
    Ok(removed
        .into_iter()
        .filter(|old| !(old.replica == e.replica && old.conn_id == e.conn_id))
        .collect())
}

/// A session ended (sign-off or disconnect). Returns whether it was recorded.
pub(crate) async fn record_session_end(
    c: &mut impl Conn,
    replica: &str,
    conn_id: i64,
) -> Result<bool, StoreError> {
    forget_pushes(c, replica, conn_id).await?;
    let removed = c
        .execute(
            "DELETE FROM terminal_sessions WHERE replica_id = $1 AND conn_id = $2",
            &[Arg::from(replica), Arg::Int(conn_id)],
        )
        .await?;
    Ok(removed > 0)
}

/// Removes every session of a terminal (an operator's sign-off) and returns them.
pub(crate) async fn remove_sessions(
    c: &mut impl Conn,
    terminal: &TerminalId,
) -> Result<Vec<SessionRef>, StoreError> {
    let removed: Vec<SessionRef> = c
        .query(
            "DELETE FROM terminal_sessions WHERE terminal_id = $1 \
             RETURNING replica_id, conn_id, terminal_id",
            &[Arg::from(terminal.as_str())],
        )
        .await?
        .iter()
        .map(session_ref)
        .collect::<Result<_, _>>()?;
    for old in &removed {
        forget_pushes(c, &old.replica, old.conn_id).await?;
    }
    Ok(removed)
}

/// The live sessions (their replica's lease runs at `now`) of `terminals`, by terminal then
/// sign-on time.
pub(crate) async fn live_sessions(
    c: &mut impl Conn,
    terminals: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<LiveSession>, StoreError> {
    if terminals.is_empty() {
        return Ok(Vec::new());
    }
    c.query(
        "SELECT s.terminal_id, s.replica_id, s.conn_id, s.remote, s.signed_on_at, s.last_seen \
         FROM terminal_sessions s JOIN switch_replicas r ON r.replica_id = s.replica_id \
         WHERE r.lease_until > $1 AND s.terminal_id {in_list}$2{end_list} \
         ORDER BY s.terminal_id, s.signed_on_at, s.replica_id, s.conn_id",
        &[Arg::from(micros(now)), Arg::List(terminals)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(LiveSession {
            terminal: parse_terminal_id(
                r.try_get("terminal_id")?,
                "terminal_sessions.terminal_id",
            )?,
            replica: r.try_get("replica_id")?,
            conn_id: r.try_get("conn_id")?,
            remote: r.try_get("remote")?,
            signed_on_at: r.try_get("signed_on_at")?,
            last_seen: r.try_get("last_seen")?,
        })
    })
    .collect()
}

/// Replicas whose lease runs at `now`, their session counts, and how many terminals are signed
/// on fleet-wide.
pub(crate) async fn fleet_sessions(
    c: &mut impl Conn,
    now: DateTime<Utc>,
) -> Result<FleetSessions, StoreError> {
    let now = micros(now);
    let replicas = c
        .query(
            "SELECT r.replica_id, r.started_at, r.lease_until, COUNT(s.conn_id) AS sessions \
             FROM switch_replicas r \
             LEFT JOIN terminal_sessions s ON s.replica_id = r.replica_id \
             WHERE r.lease_until > $1 \
             GROUP BY r.replica_id, r.started_at, r.lease_until ORDER BY r.replica_id",
            &[Arg::from(now)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(ReplicaSessions {
                replica: r.try_get("replica_id")?,
                started_at: r.try_get("started_at")?,
                lease_until: r.try_get("lease_until")?,
                sessions: r.try_get::<i64>("sessions")?.max(0) as u64,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let terminals: i64 = c
        .scalar(
            "SELECT COUNT(DISTINCT s.terminal_id) FROM terminal_sessions s \
             JOIN switch_replicas r ON r.replica_id = s.replica_id WHERE r.lease_until > $1",
            &[Arg::from(now)],
        )
        .await?;
    Ok(FleetSessions {
        replicas,
        terminals: terminals.max(0) as u64,
    })
}

/// Records a rotation's fleet-wide `maxConcurrent`, before its keys exist.
pub(crate) async fn set_rotation_pacing(
    c: &mut impl Conn,
    rotation: &RotationId,
    max_concurrent: u32,
) -> Result<(), StoreError> {
    if max_concurrent == 0 {
        return Err(StoreError::invalid("maxConcurrent: must be at least 1"));
    }
    c.execute(
        "INSERT INTO rotation_pacing (rotation_id, max_concurrent) VALUES ($1, $2) \
         ON CONFLICT (rotation_id) DO UPDATE SET max_concurrent = excluded.max_concurrent",
        &[Arg::from(rotation.as_str()), Arg::from(max_concurrent)],
    )
    .await?;
    Ok(())
}

/// The newest PENDING TPK and TAK of the ATMs signed on at `replica` that were not pushed on
/// their current session yet, oldest key first (a rotation's keys by terminal id), at most
/// `limit`.
pub(crate) async fn due_pushes(
    c: &mut impl Conn,
    replica: &str,
    limit: u32,
) -> Result<Vec<PushDue>, StoreError> {
    c.query(
        "SELECT k.id, k.terminal_id, k.key_type, k.rotation_id, s.conn_id \
         FROM terminal_sessions s \
         JOIN keys k ON k.terminal_id = s.terminal_id \
         WHERE s.replica_id = $1 AND s.kind = 'atm' \
           AND k.state = 'PENDING' AND k.key_type IN ('TPK', 'TAK') \
           AND NOT EXISTS (SELECT 1 FROM keys n WHERE n.terminal_id = k.terminal_id \
                AND n.key_type = k.key_type AND n.state = 'PENDING' AND n.version > k.version) \
           AND NOT EXISTS (SELECT 1 FROM key_pushes p WHERE p.key_id = k.id \
                AND p.replica_id = s.replica_id AND p.conn_id = s.conn_id) \
         ORDER BY k.created_at, k.terminal_id, k.key_type LIMIT $2",
        &[Arg::from(replica), Arg::from(limit.clamp(1, 1000))],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(PushDue {
            key_id: KeyId::new(r.try_get::<String>("id")?)
                .map_err(|_| StoreError::corrupt("keys.id"))?,
            terminal: parse_terminal_id(r.try_get("terminal_id")?, "keys.terminal_id")?,
            key_type: parse_key_type(&r.try_get::<String>("key_type")?)?,
            conn_id: r.try_get("conn_id")?,
            rotation: r
                .try_get::<Option<String>>("rotation_id")?
                .map(RotationId::new)
                .transpose()
                .map_err(|_| StoreError::corrupt("keys.rotation_id"))?,
        })
    })
    .collect()
}

/// Claims the push of a key on one session: `NotDue` when the key is no longer PENDING, the
/// session has ended or the key was pushed on it already; `RotationFull` when the key's rotation
/// already has `maxConcurrent` pushes awaiting their terminal's answer (before `answer_by`)
/// anywhere in the fleet.
pub(crate) async fn claim_push(
    c: &mut impl Conn,
    key: &KeyId,
    replica: &str,
    conn_id: i64,
    now: DateTime<Utc>,
    answer_by: DateTime<Utc>,
) -> Result<PushClaim, StoreError> {
    let now = micros(now);
    let Some(row) = c
        .query_opt(
            "SELECT k.state, k.rotation_id, p.max_concurrent FROM keys k \
             LEFT JOIN rotation_pacing p ON p.rotation_id = k.rotation_id WHERE k.id = $1",
            &[Arg::from(key.as_str())],
        )
        .await?
    else {
        return Ok(PushClaim::NotDue);
    };
    if row.try_get::<String>("state")? != KeyState::Pending.as_str() {
        return Ok(PushClaim::NotDue);
    }
    let session: Option<i64> = c
        .scalar_opt(
            "SELECT conn_id FROM terminal_sessions WHERE replica_id = $1 AND conn_id = $2",
            &[Arg::from(replica), Arg::Int(conn_id)],
        )
        .await?;
    if session.is_none() {
        return Ok(PushClaim::NotDue);
    }
    let rotation: Option<String> = row.try_get("rotation_id")?;
    if let (Some(rotation), Some(max)) = (rotation, row.try_get::<Option<i64>>("max_concurrent")?) {
        // every replica pushing this rotation counts and claims under one lock
        c.lock_key(&format!("switchyard-rotation-push:{rotation}"))
            .await?;
        let in_flight: i64 = c
            .scalar(
                "SELECT COUNT(*) FROM key_pushes p JOIN keys k ON k.id = p.key_id \
                 WHERE k.rotation_id = $1 AND k.state = 'PENDING' \
                   AND p.answered_at IS NULL AND p.answer_by > $2",
                &[Arg::from(rotation.as_str()), Arg::from(now)],
            )
            .await?;
        if in_flight >= max {
            return Ok(PushClaim::RotationFull);
        }
    }
    let inserted = c
        .execute(
            "INSERT INTO key_pushes (key_id, replica_id, conn_id, pushed_at, answer_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                Arg::from(key.as_str()),
                Arg::from(replica),
                Arg::Int(conn_id),
                Arg::from(now),
                Arg::from(micros(answer_by)),
            ],
        )
        .await?;
    Ok(if inserted == 1 {
        PushClaim::Claimed
    } else {
        PushClaim::NotDue
    })
}

/// The terminal on this session answered its push of a `kt` key (accepted or declined): the
/// push no longer holds a slot of its rotation. Returns how many pushes it settled.
pub(crate) async fn push_answered(
    c: &mut impl Conn,
    replica: &str,
    conn_id: i64,
    terminal: &TerminalId,
    kt: KeyType,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    c.execute(
        "UPDATE key_pushes SET answered_at = $5 \
         WHERE replica_id = $1 AND conn_id = $2 AND answered_at IS NULL \
           AND key_id IN (SELECT id FROM keys WHERE terminal_id = $3 AND key_type = $4)",
        &[
            Arg::from(replica),
            Arg::Int(conn_id),
            Arg::from(terminal.as_str()),
            Arg::from(kt.as_str()),
            Arg::from(micros(now)),
        ],
    )
    .await
}
