//! Network management, 0800 → 0810 (SPEC §3, profile v2): sign-on `001`, sign-off `002`, echo
//! `301`, and key change `161`/`162` (handed to [`super::key_exchange`]).
//!
//! Every 0800 must carry a MAC under the sender's network-management key K_NM, which only the
//! holder of its TMK can derive (the HSM derives it from the stored TMK; it never leaves it).
//! Anything else is answered `63` without a MAC, audited, and changes nothing: no session is
//! opened or replaced, no key is made, activated or pushed. Every 0810 the switch sends to an
//! authenticated 0800 is MACed under the same K_NM, so the terminal can tell the switch from an
//! impostor too. A sign-on whose (11, 7) was accepted before is a replay: `94`, and the live
//! session stays.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};
use tracing::{info, warn};

use super::SwitchContext;
use super::request::NetworkAction;
use super::{Reply, key_exchange, response_to};
use crate::domain::{KeyType, ResponseCode, TerminalId, WrappedKey};
use crate::iso8583::Message;
use crate::iso8583::fields;
use crate::net::ConnState;
use crate::net::session::SessionHandle;
use crate::store::{NewAudit, SessionEntry, TerminalKind};

/// How long an accepted sign-on identity is remembered, and how far field 7 of a sign-on may be
/// from the switch's clock. Field 7 (`MMDDhhmmss`) has no year, so the two go together: a
/// sign-on older than the window is refused as stale instead of being looked up.
pub const SIGN_ON_REPLAY_WINDOW: ChronoDuration = ChronoDuration::days(7);

/// Handles an 0800 whose raw bytes are `raw`.
pub async fn handle(
    ctx: &SwitchContext,
    conn: &mut ConnState,
    action: NetworkAction,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, "network"));
    let terminal = match request
        .get_str(fields::TERMINAL_ID)
        .map(TerminalId::from_field41)
    {
        Some(Ok(tid)) => tid,
        // Field 41 is mandatory in every 0800 of the profile.
        _ => return plain(ResponseCode::FormatError),
    };
    let tmk = match authenticate(ctx, &terminal, request, raw).await {
        NmAuth::Valid(tmk) => tmk,
        NmAuth::NoTmk => {
            info!(%terminal, remote = %conn.remote, "0800 refused: terminal not registered or without an ACTIVE TMK");
            let audited = match action {
                NetworkAction::SignOn => "session.sign-on-refused",
                _ => "message.network",
            };
            audit_refusal(
                ctx,
                &terminal,
                conn,
                request,
                audited,
                "refused: not registered (58)",
            )
            .await;
            return plain(ResponseCode::NotPermittedToTerminal);
        }
        NmAuth::Invalid => {
            ctx.metrics.mac_failures.inc();
            warn!(%terminal, remote = %conn.remote, code = ?request.get_str(fields::NETWORK_CODE), "0800 refused: network-management MAC does not verify");
            audit_refusal(
                ctx,
                &terminal,
                conn,
                request,
                "message.network",
                "refused: MAC does not verify (63)",
            )
            .await;
            return plain(ResponseCode::SecurityViolation);
        }
        NmAuth::Unavailable => return plain(ResponseCode::SystemMalfunction),
    };
    let code = match action {
        NetworkAction::SignOn => sign_on(ctx, conn, request, &terminal).await,
        NetworkAction::SignOff => {
            if conn.terminal.as_ref() == Some(&terminal) {
                conn.terminal = None;
                conn.terminal_kind = None;
                if ctx.sessions.remove(&terminal, conn.conn_id) {
                    ctx.audit_session(&terminal, "session.sign-off", &conn.remote)
                        .await;
                }
                ctx.fleet.session_ended(ctx, conn.conn_id).await;
            }
            ResponseCode::Approved
        }
        // Echo keeps a session alive; from a connection that is not signed on as this terminal
        // it proves nothing, so it is refused like any other message.
        NetworkAction::Echo if conn.terminal.as_ref() == Some(&terminal) => ResponseCode::Approved,
        NetworkAction::Echo => ResponseCode::NotPermittedToTerminal,
        NetworkAction::KeyRequest | NetworkAction::KeyConfirm => {
            if conn.terminal.as_ref() != Some(&terminal) {
                ResponseCode::NotPermittedToTerminal
            } else {
                let reply =
                    key_exchange::handle_request(ctx, conn, &terminal, &tmk, action, request)
                        .await?;
                return Some(nm_reply(ctx, &tmk, &terminal, reply.message, reply.kind));
            }
        }
        NetworkAction::Other => ResponseCode::InvalidTransaction,
    };
    let message = response_to(request, code)?;
    Some(nm_reply(ctx, &tmk, &terminal, message, "network"))
}

/// An 0810 MACed under the terminal's K_NM. When the MAC cannot be made (the TMK does not open:
/// an altered record or the wrong LMK), the answer goes without one and the terminal refuses it.
fn nm_reply(
    ctx: &SwitchContext,
    tmk: &WrappedKey,
    terminal: &TerminalId,
    mut message: Message,
    kind: &'static str,
) -> Reply {
    if let Err(err) = mac_under_nm(ctx, tmk, terminal, &mut message) {
        warn!(%terminal, error = %err, "failed to MAC a network-management answer");
    }
    Reply::plain(message, kind)
}

/// Sets the MAC field (64, or 128 with a secondary bitmap) of `message` to its MAC under the
/// K_NM of `terminal` (SPEC §3): over the packed message up to the MAC field, MAC bit set.
pub fn mac_under_nm(
    ctx: &SwitchContext,
    tmk: &WrappedKey,
    terminal: &TerminalId,
    message: &mut Message,
) -> Result<(), String> {
    let field = crate::iso8583::mac_field_for(message);
    message.set(field, vec![0u8; 8]);
    let input = ctx
        .packager
        .pack_mac_input(message)
        .map_err(|e| e.to_string())?;
    let mac = ctx
        .hsm
        .generate_nm_mac(tmk, &terminal.to_field41(), &input)
        .map_err(|e| e.to_string())?;
    message.set(field, mac);
    Ok(())
}

/// Outcome of authenticating a network-management message.
#[derive(Debug)]
pub enum NmAuth {
    /// The MAC verifies under K_NM of this TMK.
    Valid(WrappedKey),
    /// The terminal is not registered, or has no ACTIVE TMK to derive K_NM from: `58`.
    NoTmk,
    /// The MAC is missing, malformed or wrong: `63`.
    Invalid,
    /// The store could not say: `96`.
    Unavailable,
}

/// Verifies the MAC of a received 0800 or 0810 (raw bytes `raw`) under the K_NM of `terminal`.
pub async fn authenticate(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    message: &Message,
    raw: &[u8],
) -> NmAuth {
    let tmk = match ctx
        .store
        .keys_for_use(terminal, KeyType::Tmk, Utc::now())
        .await
    {
        Ok(keys) => keys.active,
        Err(_) => return NmAuth::Unavailable,
    };
    let Some(tmk) = tmk else {
        return NmAuth::NoTmk;
    };
    let Ok((input, mac)) = ctx.packager.received_mac(raw, message) else {
        return NmAuth::Invalid;
    };
    match ctx
        .hsm
        .verify_nm_mac(&tmk.wrapped, &terminal.to_field41(), input, mac)
    {
        Ok(true) => NmAuth::Valid(tmk.wrapped),
        Ok(false) => NmAuth::Invalid,
        Err(err) => {
            warn!(%terminal, error = %err, "failed to open the terminal's TMK to check a network-management MAC");
            NmAuth::Invalid
        }
    }
}

/// Audits a refused network-management message (who, from where, what). Never carries key
/// material: only the MTI, code, STAN and the peer's address.
pub async fn audit_refusal(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    conn: &ConnState,
    message: &Message,
    action: &str,
    result: &str,
) {
    let entry = NewAudit {
        actor: format!("terminal:{terminal}"),
        action: action.into(),
        target: terminal.to_string(),
        result: result.into(),
        detail: serde_json::json!({
            "mti": message.mti().as_str(),
            "networkCode": message.get_str(fields::NETWORK_CODE),
            "stan": message.get_str(fields::STAN),
            "remoteAddress": conn.remote.to_string(),
        }),
    };
    if let Err(err) = ctx.store.append_audit(&entry).await {
        warn!(%terminal, error = %err, "failed to audit a refused network-management message");
    }
}

/// When field 7 (`MMDDhhmmss`, UTC, no year) was sent, taking the year that puts it nearest to
/// `now`. `None` when it is not a valid date-time.
pub fn transmission_time(field7: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if field7.len() != 10 || !field7.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| field7.get(range)?.parse::<u32>().ok();
    let (month, day, hour, minute, second) =
        (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    [now.year() - 1, now.year(), now.year() + 1]
        .into_iter()
        .filter_map(|year| {
            let naive =
                NaiveDate::from_ymd_opt(year, month, day)?.and_hms_opt(hour, minute, second)?;
            Utc.from_local_datetime(&naive).single()
        })
        .min_by_key(|t| (*t - now).num_seconds().unsigned_abs())
}

async fn sign_on(
    ctx: &SwitchContext,
    conn: &mut ConnState,
    request: &Message,
    terminal: &TerminalId,
) -> ResponseCode {
    if ctx.health.is_draining() {
        // Shutting down: let the terminal sign on to another instance.
        return ResponseCode::IssuerUnavailable;
    }
    let kind = match ctx.store.get_terminal(terminal).await {
        Ok(Some(registered)) => registered.kind,
        Ok(None) => return ResponseCode::NotPermittedToTerminal,
        Err(_) => return ResponseCode::SystemMalfunction,
    };
    // Replay protection: the (11, 7) of every accepted sign-on is remembered for the window, and
    // a sign-on sent outside the window is stale (its identity may have been forgotten).
    let now = Utc::now();
    let (Some(stan), Some(f7)) = (
        request.get_str(fields::STAN),
        request.get_str(fields::TRANSMISSION_DATE_TIME),
    ) else {
        return ResponseCode::FormatError;
    };
    let Some(sent) = transmission_time(f7, now) else {
        return ResponseCode::FormatError;
    };
    if (sent - now).abs() > SIGN_ON_REPLAY_WINDOW {
        warn!(%terminal, remote = %conn.remote, "sign-on refused: field 7 is outside the replay window");
        audit_refusal(
            ctx,
            terminal,
            conn,
            request,
            "message.network",
            "refused: stale sign-on (94)",
        )
        .await;
        return ResponseCode::Duplicate;
    }
    match ctx
        .store
        .accept_sign_on(terminal, stan, f7, now, now - SIGN_ON_REPLAY_WINDOW)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            warn!(%terminal, remote = %conn.remote, "sign-on refused: replay of an accepted sign-on");
            audit_refusal(
                ctx,
                terminal,
                conn,
                request,
                "message.network",
                "refused: replayed sign-on (94)",
            )
            .await;
            return ResponseCode::Duplicate;
        }
        Err(_) => return ResponseCode::SystemMalfunction,
    }
    // The fleet-wide registry first: an ATM's sessions elsewhere are removed in the same
    // transaction, and the replicas holding them close them (SPEC §3: one live session).
    if !ctx.fleet.is_registered() {
        return ResponseCode::SystemMalfunction;
    }
    let _signing_on = ctx.fleet.signing_on(conn.conn_id);
    let entry = SessionEntry {
        replica: ctx.fleet.replica().to_string(),
        conn_id: conn.conn_id as i64,
        terminal: terminal.clone(),
        kind,
        remote: conn.remote.to_string(),
        signed_on_at: now,
    };
    match ctx.store.record_sign_on(&entry, now).await {
        Ok(removed) => ctx.fleet.close_removed(ctx, &removed),
        Err(err) => {
            warn!(%terminal, error = %err, "sign-on refused: the session registry could not record it");
            return ResponseCode::SystemMalfunction;
        }
    }
    // The same connection signing on as another terminal gives up its previous session.
    if let Some(previous) = conn.terminal.take()
        && &previous != terminal
    {
        ctx.sessions.remove(&previous, conn.conn_id);
    }
    // An ATM's new sign-on replaces its old connection; a station's replicas and drainers all
    // sign on with its id, so a station's sessions live side by side.
    let replaced = ctx.sessions.sign_on(
        terminal.clone(),
        kind,
        SessionHandle {
            conn_id: conn.conn_id,
            remote: conn.remote,
            signed_on_at: now,
            last_seen: conn.last_seen.clone(),
            outbound: conn.outbound.clone(),
            close: conn.close.clone(),
        },
    );
    if let Some(old) = replaced.filter(|old| old.conn_id != conn.conn_id) {
        info!(%terminal, old = %old.remote, new = %conn.remote, "sign-on replaced an older session");
    }
    conn.terminal = Some(terminal.clone());
    conn.terminal_kind = Some(kind);
    ctx.fleet.refresh_gauge(ctx).await;
    ctx.audit_session(terminal, "session.sign-on", &conn.remote)
        .await;
    // Keys generated while an ATM was away are pushed now, after this answer. A station
    // exchanges its keys itself (0800/161 + 162) and shares them among its processes; a key
    // pushed to one of its sessions would change them behind the others' backs.
    if kind == TerminalKind::Atm {
        ctx.fleet.wake_pusher();
    }
    ResponseCode::Approved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn field_7_takes_the_year_nearest_the_clock() {
        let now = at("2026-11-30T09:00:00Z");
        assert_eq!(
            transmission_time("1130085959", now),
            Some(at("2026-11-30T08:59:59Z"))
        );
        // just after new year, a message sent on 31 December is from last year
        assert_eq!(
            transmission_time("1231235959", at("2027-01-01T00:00:05Z")),
            Some(at("2026-12-31T23:59:59Z"))
        );
        // a terminal a little ahead across new year
        assert_eq!(
            transmission_time("0101000001", at("2026-12-31T23:59:59Z")),
            Some(at("2027-01-01T00:00:01Z"))
        );
    }

    #[test]
    fn invalid_field_7_is_refused() {
        let now = at("2026-11-30T09:00:00Z");
        for bad in [
            "",
            "113008595",
            "11300859599",
            "1330085959",
            "0230120000",
            "11a0085959",
            "1130246000",
        ] {
            assert_eq!(transmission_time(bad, now), None, "{bad:?}");
        }
        // 29 February exists in a leap year near the clock
        assert!(transmission_time("0229120000", at("2028-03-01T00:00:00Z")).is_some());
    }
}
