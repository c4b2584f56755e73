//! Keys and fleet rotations (SPEC §4): versions, lifecycle transitions, grace.
//!
//! Every key change of a terminal first locks the terminal's row (`{for_no_key_update}`), in id
//! order when there are several, so two racing changes queue and the second sees the first's
//! result (PostgreSQL; SQLite's writer runs one script at a time).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn};
use super::super::*;
use super::common::*;
use crate::domain::{KeyOwner, KeyState, KeyType, TerminalId, WrappedKey};

/// Expires the ACTIVE key of (terminal, type), returning its id.
async fn expire_active(
    c: &mut impl Conn,
    terminal: &str,
    key_type: KeyType,
    now: DateTime<Utc>,
    grace_until: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    c.scalar_opt(
        "UPDATE keys SET state = 'EXPIRED', expired_at = $3, grace_until = $4 \
         WHERE terminal_id = $1 AND key_type = $2 AND state = 'ACTIVE' RETURNING id",
        &[
            Arg::from(terminal),
            Arg::from(key_type.as_str()),
            Arg::from(now),
            Arg::from(grace_until),
        ],
    )
    .await
}

pub(crate) async fn insert(
    c: &mut impl Conn,
    k: &NewKey,
    actor: &str,
) -> Result<KeyRecord, StoreError> {
    validate_new_key(k)?;
    let now = micros(Utc::now());
    let grace_until = now + grace_seconds_delta(k.grace_seconds)?;
    let exists: Option<String> = c
        .scalar_opt(
            "SELECT id FROM terminals WHERE id = $1{for_no_key_update}",
            &[Arg::from(k.terminal_id.as_str())],
        )
        .await?;
    if exists.is_none() {
        return Err(StoreError::not_found(format!("terminal {}", k.terminal_id)));
    }
    let version: i32 = c
        .scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM keys WHERE terminal_id = $1 AND key_type = $2",
            &[Arg::from(k.terminal_id.as_str()), Arg::from(k.key_type.as_str())],
        )
        .await?;
    let previous = if k.state == KeyState::Active {
        expire_active(c, k.terminal_id.as_str(), k.key_type, now, grace_until).await?
    } else {
        None
    };
    let id = KeyId::generate();
    let activated_at = (k.state == KeyState::Active).then_some(now);
    c.execute(
        "INSERT INTO keys (id, terminal_id, key_type, version, state, kcv, wrapped, \
         rotation_id, grace_seconds, created_at, activated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            Arg::from(id.as_str()),
            Arg::from(k.terminal_id.as_str()),
            Arg::from(k.key_type.as_str()),
            Arg::from(version),
            Arg::from(k.state.as_str()),
            Arg::from(&k.kcv),
            Arg::from(&k.wrapped.0),
            Arg::from(k.rotation_id.as_ref().map(RotationId::as_str)),
            Arg::from(k.grace_seconds),
            Arg::from(now),
            Arg::from(activated_at),
        ],
    )
    .await
    .map_err(|e| on_foreign_key(e, || StoreError::not_found("the key's rotation")))?;
    let detail = serde_json::json!({
        "terminalId": k.terminal_id.as_str(), "type": k.key_type.as_str(),
        "version": version, "state": k.state.as_str(), "kcv": k.kcv,
        "expiredPrevious": previous,
    });
    write_audit(c, now, &audit(actor, "key.create", id.as_str(), detail)).await?;
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

pub(crate) async fn insert_bulk(
    c: &mut impl Conn,
    keys: &[NewKey],
    rotation: &NewRotation,
    actor: &str,
) -> Result<(), StoreError> {
    validate_bulk(keys, rotation)?;
    let now = micros(Utc::now());
    let (activation, activate_at) = match rotation.activation {
        Activation::OnConfirm => ("onConfirm", None),
        Activation::AtTime(t) => ("atTime", Some(micros(t))),
    };
    let done = c
        .execute(
            "INSERT INTO key_rotations (id, key_type, activation, activate_at, grace_seconds, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            &[
                Arg::from(rotation.id.as_str()),
                Arg::from(rotation.key_type.as_str()),
                Arg::from(activation),
                Arg::from(activate_at),
                Arg::from(rotation.grace_seconds),
                Arg::from(now),
            ],
        )
        .await?;
    if done == 0 {
        return Err(StoreError::conflict(format!("rotation {}", rotation.id)));
    }
    // lock the terminals (in id order, like every other key transaction) so no concurrent
    // key insert can take the versions computed below
    let mut ids: Vec<String> = keys
        .iter()
        .map(|k| k.terminal_id.as_str().to_string())
        .collect();
    ids.sort();
    let locked = c
        .query(
            "SELECT id FROM terminals WHERE id {in_list}$1{end_list} ORDER BY id{for_no_key_update}",
            &[Arg::List(&ids)],
        )
        .await?
        .iter()
        .map(|r| r.first())
        .collect::<Result<Vec<String>, _>>()?;
    if locked.len() != ids.len() {
        let locked: std::collections::HashSet<&str> = locked.iter().map(String::as_str).collect();
        let missing = ids
            .iter()
            .find(|id| !locked.contains(id.as_str()))
            .map(String::as_str)
            .unwrap_or("?");
        return Err(StoreError::not_found(format!(
            "terminal {missing} of rotation {}",
            rotation.id
        )));
    }
    let rows = c
        .query(
            "SELECT terminal_id, MAX(version) AS v FROM keys \
             WHERE key_type = $1 AND terminal_id {in_list}$2{end_list} GROUP BY terminal_id",
            &[Arg::from(rotation.key_type.as_str()), Arg::List(&ids)],
        )
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
        let new_ids: Vec<String> = chunk
            .iter()
            .map(|_| KeyId::generate().to_string())
            .collect();
        let mut args = Vec::with_capacity(chunk.len() * COLS);
        for (k, id) in chunk.iter().zip(&new_ids) {
            let version = versions.get(k.terminal_id.as_str()).copied().unwrap_or(0) + 1;
            args.extend([
                Arg::from(id),
                Arg::from(k.terminal_id.as_str()),
                Arg::from(rotation.key_type.as_str()),
                Arg::from(version),
                Arg::from(KeyState::Pending.as_str()),
                Arg::from(&k.kcv),
                Arg::from(&k.wrapped.0),
                Arg::from(rotation.id.as_str()),
                Arg::from(rotation.grace_seconds),
                Arg::from(now),
            ]);
        }
        c.execute(&sql, &args).await.map_err(|e| {
            on_foreign_key(e, || {
                StoreError::not_found(format!("a terminal of rotation {}", rotation.id))
            })
        })?;
    }
    // A terminal holds at most one PENDING key per type that matters: older PENDING keys
    // of the rotated terminals are abandoned so they can never be activated later.
    c.execute(
        "UPDATE keys SET state = 'EXPIRED', expired_at = $1 \
         WHERE key_type = $2 AND state = 'PENDING' AND rotation_id IS DISTINCT FROM $3 \
           AND terminal_id IN (SELECT terminal_id FROM keys WHERE rotation_id = $3)",
        &[
            Arg::from(now),
            Arg::from(rotation.key_type.as_str()),
            Arg::from(rotation.id.as_str()),
        ],
    )
    .await?;
    let detail = serde_json::json!({
        "keyType": rotation.key_type.as_str(), "keys": keys.len(),
        "activation": activation, "graceSeconds": rotation.grace_seconds,
    });
    write_audit(
        c,
        now,
        &audit(actor, "rotation.create", rotation.id.as_str(), detail),
    )
    .await?;
    Ok(())
}

pub(crate) async fn list(
    c: &mut impl Conn,
    terminal: &TerminalId,
) -> Result<Vec<KeyRecord>, StoreError> {
    c.query(
        select!(
            KEY_COLS,
            "FROM keys WHERE terminal_id = $1 ORDER BY key_type, version"
        ),
        &[Arg::from(terminal.as_str())],
    )
    .await?
    .iter()
    .map(key_from_row)
    .collect()
}

pub(crate) async fn unbound(
    c: &mut impl Conn,
    after: Option<&KeyId>,
    limit: u32,
) -> Result<Vec<KeyRecord>, StoreError> {
    c.query(
        select!(
            KEY_COLS,
            "FROM keys WHERE substr(wrapped, 13, 2) = '00' AND id > $1 ORDER BY id LIMIT $2"
        ),
        &[
            Arg::from(after.map_or("", KeyId::as_str)),
            Arg::from(limit.clamp(1, 1000)),
        ],
    )
    .await?
    .iter()
    .map(key_from_row)
    .collect()
}

pub(crate) async fn rewrap(
    c: &mut impl Conn,
    id: &KeyId,
    old: &WrappedKey,
    new: &WrappedKey,
) -> Result<bool, StoreError> {
    if new.0.is_empty() {
        return Err(StoreError::invalid("wrapped key: empty"));
    }
    let done = c
        .execute(
            "UPDATE keys SET wrapped = $3 WHERE id = $1 AND wrapped = $2",
            &[Arg::from(id.as_str()), Arg::from(&old.0), Arg::from(&new.0)],
        )
        .await?;
    Ok(done == 1)
}

pub(crate) async fn for_use(
    c: &mut impl Conn,
    terminal: &TerminalId,
    kt: KeyType,
    now: DateTime<Utc>,
) -> Result<UsableKeys, StoreError> {
    let now = micros(now);
    let rows = c
        .query(
            select!(
                KEY_COLS,
                "FROM keys WHERE terminal_id = $1 AND key_type = $2 \
                 AND (state IN ('ACTIVE', 'PENDING') OR (state = 'EXPIRED' AND grace_until > $3)) \
                 ORDER BY version DESC"
            ),
            &[
                Arg::from(terminal.as_str()),
                Arg::from(kt.as_str()),
                Arg::from(now),
            ],
        )
        .await?;
    let keys = rows
        .iter()
        .map(key_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(usable_at(keys, now))
}

pub(crate) async fn transition(
    c: &mut impl Conn,
    id: &KeyId,
    to: KeyTransition,
    grace: Duration,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<KeyRecord, StoreError> {
    let now = micros(now);
    let grace_until = now + grace_delta(grace)?;
    let terminal: Option<String> = c
        .scalar_opt(
            "SELECT terminal_id FROM keys WHERE id = $1",
            &[Arg::from(id.as_str())],
        )
        .await?;
    let Some(terminal) = terminal else {
        return Err(StoreError::not_found(format!("key {id}")));
    };
    // every key change of a terminal holds its row lock: two racing activations queue here
    // and the second one sees the first one's result
    c.query(
        "SELECT id FROM terminals WHERE id = $1{for_no_key_update}",
        &[Arg::from(&terminal)],
    )
    .await?;
    let key = load_key(c, id.as_str())
        .await?
        .ok_or_else(|| StoreError::not_found(format!("key {id}")))?;
    check_transition(key.state, to)?;
    let mut previous: Option<String> = None;
    match to {
        KeyTransition::Activate => {
            previous =
                expire_active(c, key.terminal_id.as_str(), key.key_type, now, grace_until).await?;
            c.execute(
                "UPDATE keys SET state = 'ACTIVE', activated_at = $2 WHERE id = $1",
                &[Arg::from(id.as_str()), Arg::from(now)],
            )
            .await?;
        }
        KeyTransition::Expire => {
            let until = (key.state == KeyState::Active).then_some(grace_until);
            c.execute(
                "UPDATE keys SET state = 'EXPIRED', expired_at = $2, grace_until = $3 \
                 WHERE id = $1",
                &[Arg::from(id.as_str()), Arg::from(now), Arg::from(until)],
            )
            .await?;
        }
        KeyTransition::Revoke => {
            c.execute(
                "UPDATE keys SET state = 'REVOKED', grace_until = NULL, \
                 expired_at = COALESCE(expired_at, $2) WHERE id = $1",
                &[Arg::from(id.as_str()), Arg::from(now)],
            )
            .await?;
        }
    }
    let detail = serde_json::json!({
        "terminalId": key.terminal_id.as_str(), "type": key.key_type.as_str(),
        "version": key.version, "from": key.state.as_str(), "to": to.target(),
        "expiredPrevious": previous,
    });
    write_audit(c, now, &audit(actor, to.action(), id.as_str(), detail)).await?;
    load_key(c, id.as_str())
        .await?
        .ok_or_else(|| StoreError::corrupt("keys: updated key vanished"))
}

pub(crate) async fn rotation_totals(
    c: &mut impl Conn,
    rotation: &RotationId,
) -> Result<Option<RotationStatus>, StoreError> {
    let Some(row) = c
        .query_opt(
            "SELECT id, key_type, activation, activate_at, grace_seconds, created_at, \
             (SELECT COUNT(DISTINCT terminal_id) FROM keys WHERE rotation_id = $1) AS terminals \
             FROM key_rotations WHERE id = $1",
            &[Arg::from(rotation.as_str())],
        )
        .await?
    else {
        return Ok(None);
    };
    let activation: String = row.try_get("activation")?;
    let activation = match (activation.as_str(), row.try_get("activate_at")?) {
        ("onConfirm", None) => Activation::OnConfirm,
        ("atTime", Some(t)) => Activation::AtTime(t),
        _ => return Err(StoreError::corrupt("key_rotations.activation")),
    };
    let mut totals: BTreeMap<KeyState, u64> = totals_template();
    let counts = c
        .query(
            "SELECT state, COUNT(*) AS n FROM keys WHERE rotation_id = $1 GROUP BY state",
            &[Arg::from(rotation.as_str())],
        )
        .await?;
    for r in &counts {
        let state = parse_key_state(&r.try_get::<String>("state")?)?;
        let n: i64 = r.try_get("n")?;
        totals.insert(state, u64::try_from(n).unwrap_or(0));
    }
    let terminals: i64 = row.try_get("terminals")?;
    Ok(Some(RotationStatus {
        id: rotation.clone(),
        key_type: parse_key_type(&row.try_get::<String>("key_type")?)?,
        activation,
        grace_seconds: row.try_get("grace_seconds")?,
        created_at: row.try_get("created_at")?,
        totals,
        terminals: u64::try_from(terminals).unwrap_or(0),
    }))
}

pub(crate) async fn expire_previous(
    c: &mut impl Conn,
    rotation: &RotationId,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let now = micros(now);
    let key_type: Option<String> = c
        .scalar_opt(
            "SELECT key_type FROM key_rotations WHERE id = $1",
            &[Arg::from(rotation.as_str())],
        )
        .await?;
    let Some(key_type) = key_type else {
        return Err(StoreError::not_found(format!("rotation {rotation}")));
    };
    let n = c
        .execute(
            "UPDATE keys SET grace_until = $3 \
             WHERE key_type = $2 AND state = 'EXPIRED' AND grace_until > $3 \
               AND (rotation_id IS NULL OR rotation_id <> $1) \
               AND terminal_id IN (SELECT terminal_id FROM keys \
                                   WHERE rotation_id = $1 AND state = 'ACTIVE')",
            &[
                Arg::from(rotation.as_str()),
                Arg::from(&key_type),
                Arg::from(now),
            ],
        )
        .await?;
    let detail = serde_json::json!({"keyType": key_type, "keys": n});
    write_audit(
        c,
        now,
        &audit(actor, "rotation.expire-previous", rotation.as_str(), detail),
    )
    .await?;
    Ok(n)
}

pub(crate) async fn stats(c: &mut impl Conn) -> Result<KeyStats, StoreError> {
    let rows = c
        .query(
            "SELECT key_type, state, COUNT(*) AS n FROM keys GROUP BY key_type, state",
            &[],
        )
        .await?;
    let mut counts = Vec::with_capacity(rows.len());
    for row in &rows {
        counts.push((
            row.try_get("key_type")?,
            row.try_get("state")?,
            row.try_get("n")?,
        ));
    }
    let rows = c
        .query(
            "SELECT key_type, MIN(activated_at) AS oldest FROM keys \
             WHERE state = 'ACTIVE' AND activated_at IS NOT NULL GROUP BY key_type",
            &[],
        )
        .await?;
    let mut oldest = Vec::with_capacity(rows.len());
    for row in &rows {
        oldest.push((row.try_get("key_type")?, row.try_get("oldest")?));
    }
    key_stats_from(counts, oldest)
}

pub(crate) async fn due_pending(
    c: &mut impl Conn,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<KeyRecord>, StoreError> {
    c.query(
        select!(
            KEY_COLS,
            "FROM keys WHERE state = 'PENDING' AND rotation_id IN \
             (SELECT id FROM key_rotations WHERE activation = 'atTime' AND activate_at <= $1) \
             ORDER BY created_at LIMIT $2"
        ),
        &[Arg::from(micros(now)), Arg::from(limit)],
    )
    .await?
    .iter()
    .map(key_from_row)
    .collect()
}
