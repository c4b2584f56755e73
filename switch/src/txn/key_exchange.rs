//! Key exchange on the wire (SPEC §3, network management codes 161 and 162).
//!
//! Terminal-initiated: 0800/161 with 48 = `TPK`|`TAK` → the switch makes (or re-delivers) a
//! PENDING key and answers 120 = TR-31 block under the terminal's TMK, 122 = KCV; the terminal
//! confirms with 0800/162 carrying its KCV, which activates the key. Server-initiated: the switch
//! sends 0800/161 on the live session; the terminal's 0810 with 39 = `00` and a matching 122
//! activates it. A KCV mismatch leaves the key PENDING and is audited. Activation is always a
//! single store transaction (previous ACTIVE → EXPIRED with a grace window).

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::Utc;
use tracing::{Instrument, debug, info, warn};

use super::SwitchContext;
use super::request::NetworkAction;
use super::{Reply, network, response_to};
use crate::domain::{KeyOwner, KeyState, KeyType, ResponseCode, TerminalId, WrappedKey};
use crate::iso8583::fields;
use crate::iso8583::{Message, Mti};
use crate::net::ConnState;
use crate::store::{KeyRecord, KeyTransition, NewAudit, NewKey, StoreError};

/// Key types a terminal may exchange on the wire (the TMK only arrives through the admin API).
const EXCHANGEABLE: [KeyType; 2] = [KeyType::Tpk, KeyType::Tak];

fn parse_key_type(request: &Message) -> Option<KeyType> {
    let kt = request
        .get_str(fields::KEY_TYPE)?
        .trim()
        .parse::<KeyType>()
        .ok()?;
    EXCHANGEABLE.contains(&kt).then_some(kt)
}

/// Handles 0800/161 and 0800/162 from a signed-on terminal on `conn`, authenticated under the
/// K_NM of `tmk` (its ACTIVE TMK, which a delivered key is wrapped under).
pub async fn handle_request(
    ctx: &SwitchContext,
    conn: &ConnState,
    terminal: &TerminalId,
    tmk: &WrappedKey,
    action: NetworkAction,
    request: &Message,
) -> Option<Reply> {
    let answer = |code| response_to(request, code).map(|m| Reply::plain(m, "key_exchange"));
    let Some(kt) = parse_key_type(request) else {
        return answer(ResponseCode::FormatError);
    };
    let result = match action {
        NetworkAction::KeyRequest => deliver(ctx, conn, terminal, tmk, kt, request).await,
        NetworkAction::KeyConfirm => confirm(ctx, terminal, kt, request).await,
        _ => return answer(ResponseCode::InvalidTransaction),
    };
    match result {
        Ok(reply) => Some(reply),
        Err(code) => answer(code),
    }
}

async fn deliver(
    ctx: &SwitchContext,
    conn: &ConnState,
    terminal: &TerminalId,
    tmk: &WrappedKey,
    kt: KeyType,
    request: &Message,
) -> Result<Reply, ResponseCode> {
    // The key goes to the terminal in this answer: recorded as delivered on this session, so
    // this replica's pusher never sends it again while the terminal is confirming it (the
    // pusher skips the terminal until the record is made).
    let _exchanging = ctx.fleet.exchanging(terminal);
    let key = pending_or_new(ctx, terminal, kt, "terminal")
        .await
        .map_err(|_| ResponseCode::SystemMalfunction)?;
    let now = Utc::now();
    let answer_by = now
        + chrono::Duration::from_std(super::fleet::PUSH_ANSWER_WAIT)
            .unwrap_or(chrono::Duration::zero());
    if let Err(err) = ctx
        .store
        .claim_push(
            &key.id,
            ctx.fleet.replica(),
            conn.conn_id as i64,
            now,
            answer_by,
        )
        .await
    {
        debug!(%terminal, error = %err, "failed to record a key delivered on request");
    }
    let block = key_block_for(ctx, terminal, tmk, &key)?;
    let mut message =
        response_to(request, ResponseCode::Approved).ok_or(ResponseCode::FormatError)?;
    message.set_str(fields::KEY_TYPE, kt.as_str());
    message.set_str(fields::KEY_BLOCK, &block);
    message.set_str(fields::KCV, &key.kcv);
    Ok(Reply::plain(message, "key_exchange"))
}

async fn confirm(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    kt: KeyType,
    request: &Message,
) -> Result<Reply, ResponseCode> {
    let Some(kcv) = request.get_str(fields::KCV) else {
        return Err(ResponseCode::FormatError);
    };
    let outcome = activate_matching(ctx, terminal, Some(kt), kcv).await;
    let code = match outcome {
        Activation::Activated | Activation::AlreadyActive => ResponseCode::Approved,
        Activation::NoPendingKey => ResponseCode::InvalidTransaction,
        Activation::Mismatch => ResponseCode::SecurityViolation,
        Activation::Failed => ResponseCode::SystemMalfunction,
    };
    let mut message = response_to(request, code).ok_or(ResponseCode::FormatError)?;
    message.set_str(fields::KEY_TYPE, kt.as_str());
    Ok(Reply::plain(message, "key_exchange"))
}

/// The terminal's PENDING key of type `kt`, or a new one. Re-delivering the same PENDING key
/// (instead of making another) keeps repeated 161s and retried pushes from piling up keys.
pub async fn pending_or_new(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    kt: KeyType,
    actor: &str,
) -> Result<KeyRecord, StoreError> {
    let usable = ctx.store.keys_for_use(terminal, kt, Utc::now()).await?;
    if let Some(pending) = usable.pending {
        return Ok(pending);
    }
    let (wrapped, kcv) = ctx
        .hsm
        .generate_key(kt, &KeyOwner::Terminal(terminal.clone()))
        .map_err(|e| StoreError::Corrupt {
            what: format!("failed to generate a {kt} key: {e}"),
        })?;
    ctx.store
        .insert_key(
            &NewKey {
                terminal_id: terminal.clone(),
                key_type: kt,
                state: KeyState::Pending,
                wrapped,
                kcv: kcv.to_string(),
                rotation_id: None,
                grace_seconds: ctx.settings.keys.grace.as_secs() as i64,
            },
            actor,
        )
        .await
}

/// The terminal's ACTIVE TMK (what keys are delivered under and K_NM is derived from).
async fn active_tmk(
    ctx: &SwitchContext,
    terminal: &TerminalId,
) -> Result<WrappedKey, ResponseCode> {
    ctx.store
        .keys_for_use(terminal, KeyType::Tmk, Utc::now())
        .await
        .map_err(|_| ResponseCode::SystemMalfunction)?
        .active
        .map(|tmk| tmk.wrapped)
        .ok_or_else(|| {
            warn!(%terminal, "key exchange refused: terminal has no ACTIVE TMK");
            ResponseCode::InvalidTransaction
        })
}

/// TR-31 block of `key` under the terminal's TMK `tmk`.
fn key_block_for(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    tmk: &WrappedKey,
    key: &KeyRecord,
) -> Result<String, ResponseCode> {
    ctx.hsm
        .export_under_tmk(tmk, &key.wrapped, key.key_type)
        .map_err(|e| {
            warn!(%terminal, error = %e, "failed to wrap a key under the TMK");
            ResponseCode::SystemMalfunction
        })
}

/// Result of matching a KCV from a terminal against its PENDING keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// A PENDING key matched and is now ACTIVE.
    Activated,
    /// The KCV is the ACTIVE key's (a repeated confirmation).
    AlreadyActive,
    /// Nothing PENDING of that type.
    NoPendingKey,
    /// A PENDING key exists but the KCV is not its own; it stays PENDING.
    Mismatch,
    /// The store failed.
    Failed,
}

/// Activates the PENDING key (of `kt`, or of any exchangeable type) whose KCV is `kcv`.
pub async fn activate_matching(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    kt: Option<KeyType>,
    kcv: &str,
) -> Activation {
    let types: Vec<KeyType> = kt.map(|k| vec![k]).unwrap_or_else(|| EXCHANGEABLE.to_vec());
    let now = Utc::now();
    let mut saw_pending = false;
    for kt in types {
        let usable = match ctx.store.keys_for_use(terminal, kt, now).await {
            Ok(u) => u,
            Err(_) => return Activation::Failed,
        };
        if let Some(pending) = usable.pending {
            saw_pending = true;
            if pending.kcv.eq_ignore_ascii_case(kcv.trim()) {
                return match ctx
                    .store
                    .transition_key(
                        &pending.id,
                        KeyTransition::Activate,
                        ctx.settings.keys.grace,
                        &format!("terminal:{terminal}"),
                        now,
                    )
                    .await
                {
                    Ok(_) => {
                        info!(%terminal, key_type = %kt, "key activated on terminal confirmation");
                        Activation::Activated
                    }
                    // Lost a race with another confirmation: the key is active either way.
                    Err(StoreError::InvalidTransition { .. }) => Activation::AlreadyActive,
                    Err(_) => Activation::Failed,
                };
            }
        }
        if usable
            .active
            .as_ref()
            .is_some_and(|a| a.kcv.eq_ignore_ascii_case(kcv.trim()))
        {
            return Activation::AlreadyActive;
        }
    }
    if saw_pending {
        let entry = NewAudit {
            actor: format!("terminal:{terminal}"),
            action: "key.confirm".into(),
            target: terminal.to_string(),
            result: "refused: KCV mismatch, key stays PENDING".into(),
            detail: serde_json::json!({ "kcv": kcv }),
        };
        let _ = ctx.store.append_audit(&entry).await;
        warn!(%terminal, "key confirmation refused: KCV does not match the PENDING key");
        Activation::Mismatch
    } else {
        Activation::NoPendingKey
    }
}

static PUSH_STAN: AtomicU32 = AtomicU32::new(1);

/// Sends 0800/161 for `key` on the terminal's live session in this process, if it has one,
/// MACed under the terminal's K_NM (profile v2). Returns whether it was queued. Callers claim the
/// push in the registry first (`fleet::push_round`); a terminal that is offline gets the key
/// when it next signs on, wherever that is.
pub async fn push_key(ctx: &SwitchContext, terminal: &TerminalId, key: &KeyRecord) -> bool {
    let span = tracing::info_span!(
        "key.push",
        terminal_id = %terminal,
        key_type = key.key_type.as_str(),
        queued = tracing::field::Empty,
    );
    let queued = push_key_on_session(ctx, terminal, key)
        .instrument(span.clone())
        .await;
    span.record("queued", queued);
    queued
}

async fn push_key_on_session(ctx: &SwitchContext, terminal: &TerminalId, key: &KeyRecord) -> bool {
    let Some(session) = ctx.sessions.handle(terminal) else {
        return false;
    };
    let Ok(tmk) = active_tmk(ctx, terminal).await else {
        return false;
    };
    let Ok(block) = key_block_for(ctx, terminal, &tmk, key) else {
        return false;
    };
    let Ok(mti) = Mti::parse("0800") else {
        return false;
    };
    let mut message = Message::new(mti);
    message.set_str(
        fields::TRANSMISSION_DATE_TIME,
        &Utc::now().format("%m%d%H%M%S").to_string(),
    );
    let stan = PUSH_STAN.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    message.set_str(fields::STAN, &format!("{stan:06}"));
    message.set_str(fields::TERMINAL_ID, &terminal.to_field41());
    message.set_str(fields::KEY_TYPE, key.key_type.as_str());
    message.set_str(fields::NETWORK_CODE, "161");
    message.set_str(fields::KEY_BLOCK, &block);
    message.set_str(fields::KCV, &key.kcv);
    let packed = network::mac_under_nm(ctx, &tmk, terminal, &mut message)
        .and_then(|()| ctx.packager.pack(&message).map_err(|e| e.to_string()));
    match packed {
        Ok(bytes) => {
            let queued = session.outbound.try_send(bytes).is_ok();
            debug!(%terminal, key_type = %key.key_type, queued, "server-initiated key change");
            queued
        }
        Err(err) => {
            warn!(%terminal, error = %err, "failed to pack a key push");
            false
        }
    }
}

/// The terminal's 0810 to a server-initiated 0800/161: 39 = `00` and 122 = the KCV it computed,
/// MACed under its K_NM (profile v2). An 0810 whose MAC does not verify is counted, audited and
/// ignored: the key stays PENDING.
pub async fn on_terminal_answer(
    ctx: &SwitchContext,
    conn: &ConnState,
    answer: &Message,
    raw: &[u8],
) {
    let Some(terminal) = &conn.terminal else {
        return;
    };
    if answer.get_str(fields::NETWORK_CODE) != Some("161") {
        return;
    }
    match network::authenticate(ctx, terminal, answer, raw).await {
        network::NmAuth::Valid(_) => {}
        network::NmAuth::Invalid | network::NmAuth::NoTmk => {
            ctx.metrics.mac_failures.inc();
            warn!(%terminal, remote = %conn.remote, "answer to a key push ignored: network-management MAC does not verify");
            network::audit_refusal(
                ctx,
                terminal,
                conn,
                answer,
                "message.network",
                "refused: MAC does not verify, key stays PENDING",
            )
            .await;
            return;
        }
        network::NmAuth::Unavailable => return,
    }
    if answer.get_str(fields::RESPONSE_CODE) != Some("00") {
        info!(%terminal, code = ?answer.get_str(fields::RESPONSE_CODE), "terminal declined a key change; key stays PENDING");
        if let Some(kt) = parse_key_type(answer) {
            answered(ctx, conn, terminal, kt).await;
        }
        return;
    }
    let Some(kcv) = answer.get_str(fields::KCV) else {
        return;
    };
    let kt = parse_key_type(answer);
    activate_matching(ctx, terminal, kt, kcv).await;
    if let Some(kt) = kt {
        answered(ctx, conn, terminal, kt).await;
    }
}

/// The terminal answered a push: its rotation's slot is free, fleet-wide.
async fn answered(ctx: &SwitchContext, conn: &ConnState, terminal: &TerminalId, kt: KeyType) {
    if let Err(err) = ctx
        .store
        .push_answered(
            ctx.fleet.replica(),
            conn.conn_id as i64,
            terminal,
            kt,
            Utc::now(),
        )
        .await
    {
        // the slot frees itself when the push's answer time passes
        debug!(%terminal, error = %err, "failed to record the answer to a key push");
    }
    ctx.fleet.wake_pusher();
}
