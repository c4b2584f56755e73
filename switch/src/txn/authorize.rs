//! Financial requests, 0200 → 0210: balance inquiry (`31xx00`) and cash withdrawal (`01xx00`).
//!
//! Order of checks, each with its documented answer: format (`30`, `12`), MAC (`63`, nothing
//! journaled: an unauthenticated message must not occupy a request identity), duplicate
//! (original answer, or `94` for different content), routing (`14`), card (`14`, `54`, `75`),
//! PIN (`55`, third consecutive failure `75`), then the ledger (`13`, `51`, `61`, `00`).
//! Declines after the MAC check are journaled too, so a retransmitted wrong-PIN request does
//! not count as a second wrong PIN.
//!
//! Two store round trips on the common path: one read of everything the request is decided on
//! (its journal row, card, account, the day's total: [`crate::store::AuthView`]), and one guarded write of
//! the decision, which the store decides again should the view have changed meanwhile.

use chrono::{Datelike, Utc};
use rand::RngExt;
use tracing::{Instrument, info, info_span, warn};

use super::SwitchContext;
use super::posting::{CardRef, Journaled, Posting, auth_request};
use super::request::Financial;
use super::{Reply, authenticate, request_digest, response_to};
use crate::crypto::{HsmError, PinCheck, Pvv};
use crate::domain::{KeyType, ResponseCode, TerminalId, WrappedKey};
use crate::iso8583::Message;
use crate::iso8583::fields;
use crate::store::{
    AuthKind, AuthOutcome, AuthView, Card, CardId, CardLookup, JournalEntry, PinReservation,
    PinTry, StoreError, ViewKey, utc_day,
};

/// What a processing code asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `31xx00`.
    Balance,
    /// `01xx00`.
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
    if let (Some(pan), Some(expiry)) = (
        request.get_str(fields::PAN),
        request.get_str(fields::EXPIRY),
    ) {
        return Some((pan.to_string(), expiry.to_string()));
    }
    let track2 = request.get_str(fields::TRACK2)?;
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

/// Handles an 0200 from a signed-on terminal, read into `fin`. The whole flow, top to bottom:
/// authenticate → dedupe → route (card and PIN here, or the issuer) → post → answer.
pub async fn handle(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    fin: &Financial,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let kind = fin.kind();

    // 1. authenticate: nothing unauthenticated is journaled or answered under a MAC
    let tak = match authenticate(ctx, terminal, request, raw).await {
        Ok(tak) => tak,
        Err(code) => return response_to(request, code).map(|m| Reply::plain(m, kind)),
    };
    let coded = |code: ResponseCode| {
        response_to(request, code).map(|m| Reply {
            message: m,
            mac_key: tak.clone(),
            kind,
        })
    };
    let answer = |entry: &JournalEntry| {
        coded(ResponseCode::Approved).map(|mut reply| {
            fill_from_journal(&mut reply.message, entry, &fin.account_type);
            reply
        })
    };

    // 2. dedupe: a retransmission gets its original answer, other content under its identity `94`
    let identity = fin.trace.identity(terminal);
    let digest = request_digest(ctx, raw);
    let now = Utc::now();
    let route = route_for(&ctx.settings, &fin.pan);
    // an on-us PIN reserves its try in the same statement (SPEC §4)
    let pin_block = route == Route::OnUs && request.get(fields::PIN_BLOCK).is_some();
    let key = ViewKey {
        identity: identity.clone(),
        card: Some(CardLookup::PanToken(ctx.hsm.pan_token(&fin.pan))),
        account: None,
        station: None,
        day: utc_day(now),
        reserve_pin_at: pin_block.then_some(now),
    };
    let Ok(mut view) = read_view(ctx, terminal, &key)
        .instrument(info_span!("store", op = "authorization_view"))
        .await
    else {
        return coded(ResponseCode::SystemMalfunction);
    };
    // the reservation this request holds until its posting settles it, or gives back
    let mut reserved = reserved_card(&view);
    if let Some((seen, entry)) = view.answered() {
        // a duplicate: the original counted its PIN try
        release_pin_try(ctx, terminal, reserved.as_ref()).await;
        return if seen == digest {
            answer(entry)
        } else {
            coded(ResponseCode::Duplicate)
        };
    }
    let Some(amount) = fin.amount else {
        release_pin_try(ctx, terminal, reserved.as_ref()).await;
        return coded(ResponseCode::FormatError);
    };
    let head = Journaled {
        identity,
        digest,
        mti: request.mti().as_str().to_string(),
        kind: match fin.operation {
            Operation::Balance => AuthKind::Balance,
            Operation::Withdrawal => AuthKind::Withdrawal { amount },
        },
        currency: request
            .get_str(fields::CURRENCY)
            .unwrap_or_default()
            .to_string(),
        rrn: new_rrn(now),
        auth_code: new_auth_code(),
        now,
    };

    let mut rounds = 0;
    let (outcome, stand_in, issuer_approval) = loop {
        // 3. route: what to post
        let decided = match &route {
            Route::OnUs => on_us(ctx, terminal, request, fin, &view, now).await,
            Route::Unroutable => Ok(Posting::decline(ResponseCode::InvalidCard)),
            Route::Upstream(name) => {
                super::routed::authorize(ctx, terminal, request, fin, &head, name).await
            }
        };
        let posting = match decided {
            Ok(posting) => posting,
            Err(Unposted { pin_try }) => {
                release_pin_try(ctx, terminal, reserved.as_ref()).await;
                release_pin_try(ctx, terminal, pin_try.as_ref().map(|p| &p.card_id)).await;
                return coded(ResponseCode::SystemMalfunction);
            }
        };
        // from here the try this request holds is its posting's (settled by it): one declined
        // before its PIN was checked (card, expiry, no usable TPK) gives the view's back
        let held = posting.pin_try().map(|p| p.card_id.clone());
        if held.is_none() {
            release_pin_try(ctx, terminal, reserved.as_ref()).await;
        }
        reserved = held;

        // 4. post: one guarded write
        let stand_in = posting.is_stand_in();
        let issuer_approval = match &posting {
            Posting::IssuerAnswer {
                answer,
                upstream_ref: Some(reference),
            } if answer.response_code == ResponseCode::Approved => Some(reference.clone()),
            _ => None,
        };
        let outcome = ctx
            .store
            .authorize(&auth_request(head.clone(), Some(view), posting))
            .instrument(info_span!("store", op = "authorize"))
            .await;
        // the card's PIN was reset after it was checked: check it again (on-us only; a routed
        // request is never sent twice)
        if outcome.is_err() {
            release_pin_try(ctx, terminal, reserved.take().as_ref()).await;
        }
        if matches!(outcome, Err(StoreError::Stale)) && route == Route::OnUs && rounds < 2 {
            rounds += 1;
            match read_view(ctx, terminal, &key)
                .instrument(info_span!("store", op = "authorization_view"))
                .await
            {
                Ok(fresh) => view = fresh,
                Err(_) => return coded(ResponseCode::SystemMalfunction),
            }
            reserved = reserved_card(&view);
            continue;
        }
        break (outcome, stand_in, issuer_approval);
    };
    if let Some(reference) = &issuer_approval
        && !matches!(&outcome, Ok(AuthOutcome::Done(e)) if e.approved())
    {
        // The issuer approved a withdrawal we will not pay out: it was reversed before the
        // answer came, is a concurrent duplicate, or the store failed. The issuer must undo it.
        warn!(%terminal, reference, "issuer approval not paid out; queuing a reversal for the issuer");
        let _ = super::routed::forward_reversal(ctx, reference, request).await;
    }

    // 5. answer
    match outcome {
        Ok(AuthOutcome::Done(entry)) => {
            if entry.approved() && fin.operation == Operation::Withdrawal {
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

/// A request that will not be journaled (answered `96`), with the PIN try it reserved itself
/// and must give back (stand-in; an on-us request's try is the view's).
#[derive(Debug, Default)]
pub(crate) struct Unposted {
    /// The try reserved (and checked) before it failed.
    pub pin_try: Option<PinTry>,
}

/// An on-us card (as the request's view read it, with its PIN try reserved): status and PIN
/// decide between a decline and a ledger posting.
async fn on_us(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    fin: &Financial,
    view: &AuthView,
    now: chrono::DateTime<Utc>,
) -> Result<Posting, Unposted> {
    match view.card() {
        Some(card) if card.upstream.is_none() => {
            let reserved = match view.pin_reservation() {
                Some(PinReservation::Reserved) => true,
                Some(PinReservation::Exhausted | PinReservation::InFlight) => {
                    return Ok(Posting::Decline {
                        code: ResponseCode::PinTriesExceeded,
                        card: Some(CardRef {
                            card_id: card.id.clone(),
                            account_id: card.account_id.clone(),
                        }),
                        pin_try: None,
                    });
                }
                // no PIN block: declined 55 without a try
                None => false,
            };
            let pin = PinReserved(reserved);
            card_posting(ctx, terminal, request, fin, card, now, pin).await
        }
        _ => Ok(Posting::decline(ResponseCode::InvalidCard)),
    }
}

/// Reads the request's view; while the card's remaining PIN tries are held by requests still
/// checking, waits for them to settle (at most [`PIN_TRY_WAIT`]) and reserves again, so a
/// cardholder's own concurrent requests all go through.
async fn read_view(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    key: &ViewKey,
) -> Result<AuthView, StoreError> {
    let waited_since = std::time::Instant::now();
    loop {
        let view = ctx.store.authorization_view(key).await?;
        if view.pin_reservation() != Some(PinReservation::InFlight) || view.answered().is_some() {
            return Ok(view);
        }
        if waited_since.elapsed() >= PIN_TRY_WAIT {
            warn!(%terminal, "no PIN try came free in time");
            return Ok(view);
        }
        tokio::time::sleep(PIN_TRY_POLL).await;
    }
}

/// The card on which the view reserved a PIN try, if it did.
fn reserved_card(view: &AuthView) -> Option<CardId> {
    match (view.pin_reservation(), view.card()) {
        (Some(PinReservation::Reserved), Some(card)) => Some(card.id.clone()),
        _ => None,
    }
}

/// Whether the caller already holds a reserved PIN try for the card.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PinReserved(pub bool);

/// A registered card's checks (expiry, PIN block status, PIN) and, when they pass, its ledger
/// posting. Shared by on-us requests and stand-in.
pub(crate) async fn card_posting(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    fin: &Financial,
    card: &Card,
    now: chrono::DateTime<Utc>,
    reserved: PinReserved,
) -> Result<Posting, Unposted> {
    let on = CardRef {
        card_id: card.id.clone(),
        account_id: card.account_id.clone(),
    };
    let decline = |code, pin_try| {
        Ok(Posting::Decline {
            code,
            card: Some(on.clone()),
            pin_try,
        })
    };
    if card.expiry != fin.expiry || is_expired(&card.expiry, now) {
        return decline(ResponseCode::ExpiredCard, None);
    }
    if card.pin_blocked {
        return decline(ResponseCode::PinTriesExceeded, None);
    }
    match verify_pin(ctx, terminal, request, &fin.pan, card, reserved)
        .instrument(info_span!("pin"))
        .await
    {
        Ok(pin_try) if pin_try.correct => Ok(Posting::Ledger {
            card: on.clone(),
            pin_try: Some(pin_try),
            stand_in: None,
        }),
        // the store journals 75 instead when this is the third consecutive wrong PIN
        Ok(pin_try) => decline(ResponseCode::IncorrectPin, Some(pin_try)),
        Err(ResponseCode::SystemMalfunction) => Err(Unposted::default()),
        Err(code) => decline(code, None),
    }
}

/// How long a request waits for PIN tries other requests hold to settle before it answers `75`:
/// a try is held for an HSM check and one journal transaction, milliseconds; only a flood of
/// requests for one card, or tries a dead process holds (they stop counting after
/// [`crate::store::PIN_RESERVATION_TTL`]), waits this long.
const PIN_TRY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often a waiting request asks again.
const PIN_TRY_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Verifies the PIN block of field 123 against the card's PVV under the terminal's TPK (or one
/// in its grace window), under a PIN try reserved first (SPEC §4): by the caller (`reserved`,
/// with the request's view) or here.
///
/// `Ok` with the settled try (`correct` or not); `Err` for an answer that consumed no try.
///
/// The try is reserved in the database before the HSM sees the block, in one statement, so
/// concurrent requests for one card (many terminals, a station's pipelined requests) never
/// check more than three PINs between resets: with three wrong PINs settled the answer is `75`
/// and the PIN is not checked; while tries in flight fill the three, the request waits for
/// them to settle (at most [`PIN_TRY_WAIT`], then `75`). The reserved try is settled in the journal transaction
/// (the [`Posting`]'s [`PinTry`]): a wrong PIN counts (`55`, `75` when it is the third
/// consecutive one), a correct one ends the run of settled wrong PINs without touching tries
/// other requests are still checking. A request that fails before its journal row commits
/// (`96`) gives its try back, so no try is ever consumed without a journal record saying why.
pub(crate) async fn verify_pin(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    pan: &str,
    card: &Card,
    reserved: PinReserved,
) -> Result<PinTry, ResponseCode> {
    let (block, tpks, cached) = pin_block_and_tpks(ctx, terminal, request).await?;
    let pvv = Pvv::from_hex(&card.pvv).map_err(|_| {
        warn!(card = %card.id, "stored PVV is unreadable");
        ResponseCode::SystemMalfunction
    })?;
    let waited_since = std::time::Instant::now();
    // (the on-us path reserved its try with the request's view)
    if !reserved.0 {
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
    }
    // (matched, compared): whether a TPK opened the block to a match, and whether any opened it
    let check = |tpks: &[WrappedKey]| {
        let mut compared = false;
        for tpk in tpks {
            match ctx.hsm.verify_pin(tpk, pan, &block, &pvv) {
                Ok(PinCheck::Match) => return (true, true),
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
        (false, compared)
    };
    let (mut matched, mut compared) = check(&tpks);
    if !matched && cached {
        // cached keys may miss a TPK another replica activated since: a try is never counted
        // wrong on them alone
        let (again_matched, again_compared) = check(&newer_tpks(ctx, terminal, &tpks).await);
        matched = again_matched;
        compared |= again_compared;
    }
    if !compared {
        // The terminal has no TPK the HSM will open (none, or one bound to another terminal:
        // a key row moved here). No PIN was compared, so no try is consumed: `63`.
        if let Err(err) = ctx.store.release_pin_try(&card.id).await {
            warn!(%terminal, card = %card.id, error = %err, "failed to give back a reserved PIN try");
        }
        return Err(ResponseCode::SecurityViolation);
    }
    if !matched {
        ctx.metrics.pin_failures.inc();
    }
    Ok(PinTry {
        card_id: card.id.clone(),
        correct: matched,
        pvv: card.pvv.clone(),
    })
}

/// Gives back a reserved PIN try when its journal transaction will not settle it (the
/// request is answered `96`). If the store cannot take even that, the try stops counting after
/// [`crate::store::PIN_RESERVATION_TTL`].
async fn release_pin_try(ctx: &SwitchContext, terminal: &TerminalId, card: Option<&CardId>) {
    let Some(card) = card else {
        return;
    };
    if let Err(err) = ctx.store.release_pin_try(card).await {
        warn!(%terminal, %card, error = %err, "failed to give back a reserved PIN try");
    }
}

/// The PIN block of field 123 (hex of 16 bytes) and the terminal's TPKs that may have
/// enciphered it: the ACTIVE one, then those still in their grace window, from the key cache
/// (the flag says so; see [`newer_tpks`]). `55` without a readable block, `96` when the store
/// fails.
pub(crate) async fn pin_block_and_tpks(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
) -> Result<([u8; 16], Vec<WrappedKey>, bool), ResponseCode> {
    let block = request
        .get_str(fields::PIN_BLOCK)
        .and_then(|hex_block| hex::decode(hex_block).ok())
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .ok_or(ResponseCode::IncorrectPin)?;
    let lookup = ctx
        .keys
        .usable(ctx.store.as_ref(), terminal, KeyType::Tpk, Utc::now())
        .await
        .map_err(|_| ResponseCode::SystemMalfunction)?;
    Ok((block, usable_tpks(lookup.keys), lookup.cached))
}

fn usable_tpks(keys: crate::store::UsableKeys) -> Vec<WrappedKey> {
    keys.active
        .into_iter()
        .chain(keys.in_grace)
        .map(|k| k.wrapped)
        .collect()
}

/// The terminal's usable TPKs read from the store now, except those in `seen`: asked when a
/// PIN block opened under none of the cached ones. Empty when the store cannot say.
pub(crate) async fn newer_tpks(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    seen: &[WrappedKey],
) -> Vec<WrappedKey> {
    match ctx
        .keys
        .read(ctx.store.as_ref(), terminal, KeyType::Tpk, Utc::now())
        .await
    {
        Ok(lookup) => usable_tpks(lookup.keys)
            .into_iter()
            .filter(|k| !seen.contains(k))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Sets 37, 38, 39 and (for approvals with balances) 54 from the journal entry.
fn fill_from_journal(m: &mut Message, entry: &JournalEntry, account_type: &str) {
    fill_outcome(m, entry);
    if let (Some(ledger), Some(available)) = (entry.ledger_balance, entry.available_balance) {
        m.set_str(
            fields::ADDITIONAL_AMOUNTS,
            &additional_amounts(account_type, &entry.currency, ledger, available),
        );
    }
}

/// Sets 39, 37 and (when approved) 38 from the journal entry: what every answer to a
/// journaled request repeats byte for byte.
pub(crate) fn fill_outcome(m: &mut Message, entry: &JournalEntry) {
    m.set_str(fields::RESPONSE_CODE, &entry.response_code);
    m.set_str(fields::RRN, &entry.rrn);
    if let Some(code) = &entry.auth_code {
        m.set_str(fields::AUTH_CODE, code);
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
