//! Financial requests, 0200 → 0210: balance inquiry (`31xx00`) and cash withdrawal (`01xx00`).
//!
//! Order of checks, each with its documented answer: format (`30`, `12`), MAC (`63`, nothing
//! journaled: an unauthenticated message must not occupy a request identity), duplicate
//! (original answer, or `94` for different content), routing (`14`), card (`14`, `54`, `75`),
//! PIN (a try reserved first: `75` when three are settled or in flight; `55`, third consecutive
//! failure `75`), then the ledger in one store transaction (`13`, `51`, `61`,
//! `00`). Declines after the MAC check are journaled too, so a retransmitted wrong-PIN request
//! does not count as a second wrong PIN.

use chrono::{Datelike, Utc};
use rand::RngExt;
use tracing::{info, warn};

use super::{Reply, authenticate, request_digest, response_to};
use crate::app::SwitchContext;
use crate::crypto::{HsmError, PinCheck, Pvv};
use crate::domain::{KeyType, ResponseCode, TerminalId, WrappedKey};
use crate::iso8583::Message;
use crate::store::{
    AuthKind, AuthOutcome, AuthRequest, Card, JournalEntry, PinReservation, PinTry, RequestIdentity,
};

/// What a processing code asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Balance,
    Withdrawal,
}

/// Account type from processing code positions 3–4 (`00` default, `10` savings, `20` checking).
pub(crate) fn parse_processing_code(code: &str) -> Option<(Operation, &str)> {
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) || &code[4..] != "00" {
        return None;
    }
    let account_type = &code[2..4];
    if !matches!(account_type, "00" | "10" | "20") {
        return None;
    }
    match &code[..2] {
        "31" => Some((Operation::Balance, account_type)),
        "01" => Some((Operation::Withdrawal, account_type)),
        _ => None,
    }
}

/// PAN and expiry from field 2 + 14, or from track 2 (`PAN=YYMM…`, `D` accepted as separator).
pub(crate) fn card_data(request: &Message) -> Option<(String, String)> {
    if let (Some(pan), Some(expiry)) = (request.get_str(2), request.get_str(14)) {
        return Some((pan.to_string(), expiry.to_string()));
    }
    let track2 = request.get_str(35)?;
    let sep = track2.find(['=', 'D', 'd'])?;
    let pan = &track2[..sep];
    let expiry = track2.get(sep + 1..sep + 5)?;
    if pan.is_empty() || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((pan.to_string(), expiry.to_string()))
}

/// The request's identity (SPEC §3): terminal, STAN (11) and transmission date-time (7).
pub(crate) fn identity(terminal: &TerminalId, request: &Message) -> Option<RequestIdentity> {
    let stan = request.get_str(11)?;
    let transmission = request.get_str(7)?;
    Some(RequestIdentity {
        terminal_id: terminal.clone(),
        stan: stan.to_string(),
        transmission: transmission.to_string(),
    })
}

/// Where a PAN goes: our ledger, a named upstream, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Authorize against the local ledger.
    OnUs,
    /// Send to this upstream.
    Upstream(String),
    /// No prefix matches: `14`.
    Unroutable,
}

/// Longest-prefix match over the on-us prefixes and the routes (SPEC §6).
pub fn route_for(settings: &crate::settings::Settings, pan: &str) -> Route {
    let mut best: (usize, Route) = (0, Route::Unroutable);
    for prefix in &settings.routing.on_us {
        if pan.starts_with(prefix.as_str()) && prefix.len() > best.0 {
            best = (prefix.len(), Route::OnUs);
        }
    }
    for route in &settings.routing.routes {
        if pan.starts_with(route.prefix.as_str()) && route.prefix.len() > best.0 {
            best = (route.prefix.len(), Route::Upstream(route.upstream.clone()));
        }
    }
    best.1
}

/// Whether a `YYMM` expiry is before the current month.
pub(crate) fn is_expired(expiry: &str, now: chrono::DateTime<Utc>) -> bool {
    let (Ok(yy), Ok(mm)) = (expiry[..2].parse::<i32>(), expiry[2..].parse::<u32>()) else {
        return true;
    };
    let year = 2000 + yy;
    (year, mm) < (now.year(), now.month())
}

/// Handles an 0200 from a signed-on terminal.
pub async fn handle(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, "financial"));
    let Some((op, account_type)) = request.get_str(3).and_then(parse_processing_code) else {
        return plain(if request.has(3) {
            ResponseCode::InvalidTransaction
        } else {
            ResponseCode::FormatError
        });
    };
    let kind = match op {
        Operation::Balance => "balance",
        Operation::Withdrawal => "withdrawal",
    };
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, kind));
    let (Some(id), Some((pan, expiry))) = (identity(terminal, request), card_data(request)) else {
        return plain(ResponseCode::FormatError);
    };

    let tak = match authenticate(ctx, terminal, request, raw).await {
        Ok(tak) => tak,
        Err(code) => return plain(code),
    };
    let answer = |entry: &JournalEntry| {
        response_to(request, ResponseCode::Approved).map(|mut m| {
            fill_from_journal(&mut m, entry, account_type);
            Reply {
                message: m,
                mac_key: tak.clone(),
                kind,
            }
        })
    };
    let coded = |code: ResponseCode| {
        response_to(request, code).map(|m| Reply {
            message: m,
            mac_key: tak.clone(),
            kind,
        })
    };

    let digest = request_digest(ctx, raw);
    match ctx.store.find_request(&id).await {
        Ok(Some(entry)) if entry.digest == digest => return answer(&entry),
        Ok(Some(_)) => return coded(ResponseCode::Duplicate),
        Ok(None) => {}
        Err(_) => return coded(ResponseCode::SystemMalfunction),
    }

    let amount = match op {
        Operation::Balance => 0,
        Operation::Withdrawal => match request.get_str(4).map(str::parse::<i64>) {
            Some(Ok(a)) => a,
            _ => return coded(ResponseCode::FormatError),
        },
    };
    let now = Utc::now();
    let mut auth = AuthRequest {
        identity: id,
        digest,
        mti: request.mti().as_str().to_string(),
        kind: match op {
            Operation::Balance => AuthKind::Balance,
            Operation::Withdrawal => AuthKind::Withdrawal { amount },
        },
        card_id: None,
        account_id: None,
        currency: request.get_str(49).unwrap_or_default().to_string(),
        rrn: new_rrn(now),
        auth_code: new_auth_code(),
        decline: None,
        now,
        advice: None,
        issuer_answer: None,
        force_post: false,
        force_post_ceiling: None,
        upstream_ref: None,
        pin_try: None,
    };

    let decline = match route_for(&ctx.settings, &pan) {
        Route::OnUs => check_card_and_pin(ctx, terminal, request, &pan, &expiry, &mut auth).await,
        Route::Unroutable => Err(ResponseCode::InvalidCard),
        Route::Upstream(name) => {
            super::routed::authorize(ctx, terminal, request, &pan, &expiry, &mut auth, &name).await
        }
    };
    match decline {
        Ok(()) => {}
        Err(ResponseCode::SystemMalfunction) => {
            release_pin_try(ctx, terminal, &auth).await;
            return coded(ResponseCode::SystemMalfunction);
        }
        Err(code) => auth.decline = Some(code),
    }

    let outcome = ctx.store.authorize(&auth).await;
    if outcome.is_err() {
        release_pin_try(ctx, terminal, &auth).await;
    }
    if let (Some(issuer), Some(reference)) = (&auth.issuer_answer, &auth.upstream_ref)
        && issuer.response_code == ResponseCode::Approved
        && !matches!(&outcome, Ok(AuthOutcome::Done(e)) if e.approved())
    {
        // The issuer approved a withdrawal we will not pay out: it was reversed before the
        // answer came, is a concurrent duplicate, or the store failed. The issuer must undo it.
        warn!(%terminal, reference, "issuer approval not paid out; queuing a reversal for the issuer");
        let _ = super::routed::forward_reversal(ctx, reference, request).await;
    }
    match outcome {
        Ok(AuthOutcome::Done(entry)) => {
            if entry.approved() && op == Operation::Withdrawal {
                let stand_in = auth.advice.is_some();
                if stand_in {
                    ctx.metrics.standin.inc();
                }
                info!(%terminal, stan = %entry.identity.stan, amount, stand_in, "withdrawal approved");
            }
            answer(&entry)
        }
        Ok(AuthOutcome::Duplicate(entry)) => answer(&entry),
        Ok(AuthOutcome::ContentMismatch) => coded(ResponseCode::Duplicate),
        Err(err) => {
            warn!(%terminal, error = %err, "authorization failed in the store");
            coded(ResponseCode::SystemMalfunction)
        }
    }
}

/// Card status and PIN. `Err(code)` is the decline to journal (`96` is not journaled).
async fn check_card_and_pin(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    pan: &str,
    expiry: &str,
    auth: &mut AuthRequest,
) -> Result<(), ResponseCode> {
    let card: Card = match ctx.store.find_card(&ctx.hsm.pan_token(pan)).await {
        Ok(Some(card)) if card.upstream.is_none() => card,
        Ok(_) => return Err(ResponseCode::InvalidCard),
        Err(_) => return Err(ResponseCode::SystemMalfunction),
    };
    auth.card_id = Some(card.id.clone());
    auth.account_id = Some(card.account_id.clone());
    if card.expiry != expiry {
        return Err(ResponseCode::ExpiredCard);
    }
    if is_expired(&card.expiry, auth.now) {
        return Err(ResponseCode::ExpiredCard);
    }
    if card.pin_blocked {
        return Err(ResponseCode::PinTriesExceeded);
    }
    verify_pin(ctx, terminal, request, pan, &card, auth).await
}

/// How long a request waits for PIN tries other requests hold to settle before it answers `75`:
/// a try is held for an HSM check and one journal transaction, milliseconds; only a flood of
/// requests for one card, or tries a dead process holds (they stop counting after
/// [`crate::store::PIN_RESERVATION_TTL`]), waits this long.
const PIN_TRY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often a waiting request asks again.
const PIN_TRY_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Verifies the PIN block of field 123 against the card's PVV under the terminal's TPK (or one
/// in its grace window), under a PIN try reserved first (SPEC §4).
///
/// The try is reserved in the database before the HSM sees the block, in one statement, so
/// concurrent requests for one card (many terminals, a station's pipelined requests) never
/// check more than three PINs between resets: with three wrong PINs settled the answer is `75`
/// and the PIN is not checked; while tries in flight fill the three, the request waits for
/// them to settle (at most [`PIN_TRY_WAIT`], then `75`). The reserved try is settled in the journal transaction
/// ([`crate::store::PinTry`] on `auth`): a wrong PIN counts (`55`, `75` when it is the third
/// consecutive one), a correct one ends the run of settled wrong PINs without touching tries
/// other requests are still checking. A request that fails before its journal row commits
/// (`96`) gives its try back, so no try is ever consumed without a journal record saying why.
pub(crate) async fn verify_pin(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    pan: &str,
    card: &Card,
    auth: &mut AuthRequest,
) -> Result<(), ResponseCode> {
    let (block, tpks) = pin_block_and_tpks(ctx, terminal, request).await?;
    let pvv = Pvv::from_hex(&card.pvv).map_err(|_| {
        warn!(card = %card.id, "stored PVV is unreadable");
        ResponseCode::SystemMalfunction
    })?;
    let waited_since = std::time::Instant::now();
    loop {
        match ctx.store.reserve_pin_try(&card.id, Utc::now()).await {
            Ok(PinReservation::Reserved) => break,
            Ok(PinReservation::Exhausted) => return Err(ResponseCode::PinTriesExceeded),
            // the cardholder's own concurrent requests (or a flood of guesses): wait for the
            // tries in flight to settle, then take one, or find the card blocked
            Ok(PinReservation::InFlight) if waited_since.elapsed() < PIN_TRY_WAIT => {
                tokio::time::sleep(PIN_TRY_POLL).await;
            }
            Ok(PinReservation::InFlight) => {
                warn!(%terminal, card = %card.id, "no PIN try came free in time");
                return Err(ResponseCode::PinTriesExceeded);
            }
            Err(_) => return Err(ResponseCode::SystemMalfunction),
        }
    }
    let mut matched = false;
    let mut compared = false;
    for tpk in &tpks {
        match ctx.hsm.verify_pin(tpk, pan, &block, &pvv) {
            Ok(PinCheck::Match) => {
                matched = true;
                compared = true;
                break;
            }
            Ok(_) => compared = true,
            Err(
                err @ (HsmError::StoredKey(_)
                | HsmError::WrongOwner { .. }
                | HsmError::WrongKeyType { .. }),
            ) => warn!(%terminal, error = %err, "TPK refused by the HSM"),
            Err(err) => {
                compared = true;
                warn!(%terminal, error = %err, "PIN verification error");
            }
        }
    }
    if !compared {
        // The terminal has no TPK the HSM will open (none, or one bound to another terminal:
        // a key row moved here). No PIN was compared, so no try is consumed: `63`.
        if let Err(err) = ctx.store.release_pin_try(&card.id).await {
            warn!(%terminal, card = %card.id, error = %err, "failed to give back a reserved PIN try");
        }
        return Err(ResponseCode::SecurityViolation);
    }
    auth.pin_try = Some(PinTry {
        card_id: card.id.clone(),
        correct: matched,
    });
    if matched {
        return Ok(());
    }
    ctx.metrics.pin_failures.inc();
    // the store journals 75 instead when this is the third consecutive wrong PIN
    Err(ResponseCode::IncorrectPin)
}

/// Gives back the PIN try `auth` reserved when its journal transaction will not settle it (the
/// request is answered `96`). If the store cannot take even that, the try stops counting after
/// [`crate::store::PIN_RESERVATION_TTL`].
async fn release_pin_try(ctx: &SwitchContext, terminal: &TerminalId, auth: &AuthRequest) {
    let Some(pin) = &auth.pin_try else {
        return;
    };
    if let Err(err) = ctx.store.release_pin_try(&pin.card_id).await {
        warn!(%terminal, card = %pin.card_id, error = %err, "failed to give back a reserved PIN try");
    }
}

/// The PIN block of field 123 (hex of 16 bytes) and the terminal's TPKs that may have
/// enciphered it: the ACTIVE one, then those still in their grace window. `55` without a
/// readable block, `96` when the store fails.
pub(crate) async fn pin_block_and_tpks(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
) -> Result<([u8; 16], Vec<WrappedKey>), ResponseCode> {
    let block = request
        .get_str(123)
        .and_then(|hex_block| hex::decode(hex_block).ok())
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .ok_or(ResponseCode::IncorrectPin)?;
    let keys = ctx
        .store
        .keys_for_use(terminal, KeyType::Tpk, Utc::now())
        .await
        .map_err(|_| ResponseCode::SystemMalfunction)?;
    let tpks = keys
        .active
        .into_iter()
        .chain(keys.in_grace)
        .map(|k| k.wrapped)
        .collect();
    Ok((block, tpks))
}

/// Sets 37, 38, 39 and (for approvals with balances) 54 from the journal entry.
fn fill_from_journal(m: &mut Message, entry: &JournalEntry, account_type: &str) {
    fill_outcome(m, entry);
    if let (Some(ledger), Some(available)) = (entry.ledger_balance, entry.available_balance) {
        m.set_str(
            54,
            &additional_amounts(account_type, &entry.currency, ledger, available),
        );
    }
}

/// Sets 39, 37 and (when approved) 38 from the journal entry: what every answer to a
/// journaled request repeats byte for byte.
pub(crate) fn fill_outcome(m: &mut Message, entry: &JournalEntry) {
    m.set_str(39, &entry.response_code);
    m.set_str(37, &entry.rrn);
    if let Some(code) = &entry.auth_code {
        m.set_str(38, code);
    }
}

/// Field 54: two 20-character entries, ledger (`01`) and available (`02`) balance.
pub(crate) fn additional_amounts(
    account_type: &str,
    currency: &str,
    ledger: i64,
    available: i64,
) -> String {
    let entry = |amount_type: &str, amount: i64| {
        let sign = if amount < 0 { 'D' } else { 'C' };
        format!(
            "{account_type}{amount_type}{currency:0>3}{sign}{:012}",
            amount.unsigned_abs()
        )
    };
    format!("{}{}", entry("01", ledger), entry("02", available))
}

/// Retrieval reference number (field 37): `YDDD` (Julian date) and eight random digits.
pub(crate) fn new_rrn(now: chrono::DateTime<Utc>) -> String {
    let n: u32 = rand::rng().random_range(0..100_000_000);
    format!("{}{:03}{n:08}", now.year() % 10, now.ordinal())
}

/// Authorization code (field 38): six random digits.
pub(crate) fn new_auth_code() -> String {
    let n: u32 = rand::rng().random_range(0..1_000_000);
    format!("{n:06}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{RouteSettings, Settings};

    #[test]
    fn processing_codes() {
        assert_eq!(
            parse_processing_code("310000"),
            Some((Operation::Balance, "00"))
        );
        assert_eq!(
            parse_processing_code("012000"),
            Some((Operation::Withdrawal, "20"))
        );
        assert_eq!(parse_processing_code("013000"), None);
        assert_eq!(parse_processing_code("400000"), None);
        assert_eq!(parse_processing_code("31000"), None);
    }

    #[test]
    fn longest_prefix_wins() {
        let mut s = Settings::default();
        s.routing.on_us = vec!["6011".into()];
        s.routing.routes = vec![
            RouteSettings {
                prefix: "60".into(),
                upstream: "a".into(),
            },
            RouteSettings {
                prefix: "601100".into(),
                upstream: "b".into(),
            },
        ];
        assert_eq!(
            route_for(&s, "6011000000000004"),
            Route::Upstream("b".into())
        );
        assert_eq!(route_for(&s, "6011990000000004"), Route::OnUs);
        assert_eq!(
            route_for(&s, "6099000000000004"),
            Route::Upstream("a".into())
        );
        assert_eq!(route_for(&s, "4111111111111111"), Route::Unroutable);
    }

    #[test]
    fn field_54_layout() {
        let f = additional_amounts("00", "360", 500_000, 480_000);
        assert_eq!(f.len(), 40);
        assert_eq!(&f[..20], "0001360C000000500000");
        assert_eq!(&f[20..], "0002360C000000480000");
    }

    #[test]
    fn expiry_is_compared_by_month() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(!is_expired("2611", now));
        assert!(is_expired("2610", now));
        assert!(!is_expired("2812", now));
    }

    #[test]
    fn rrn_and_auth_code_shapes() {
        let rrn = new_rrn(Utc::now());
        assert_eq!(rrn.len(), 12);
        assert!(rrn.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(new_auth_code().len(), 6);
    }
}
