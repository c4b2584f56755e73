//! Financial requests for cards of another issuer (SPEC §6): forwarded over the upstream link,
//! or approved in stand-in while the issuer is unavailable.
//!
//! The terminal's request was already checked (format, MAC, duplicate) by
//! [`super::authorize`]; this module decides what to journal and fills the [`AuthRequest`]:
//! - the issuer answered: its answer, journaled as given (`issuer_answer`), nothing local moves;
//! - the issuer is unavailable (link down, circuit open, answered `91`/`96`): stand-in, if
//!   enabled for the upstream, for withdrawals up to `stand_in.max_amount`, for cards whose
//!   stand-in data (PVV, account) the issuer shared, with the PIN verified here; the debit of
//!   the stand-in account and the 0220 advice for the issuer commit in one transaction;
//! - the request was sent but its answer never came (timeout, lost connection, untrustworthy
//!   answer): a withdrawal gets a 0420 reversal advice for what was sent, then stand-in as above.
//!
//! The PIN block is translated from the terminal's TPK to the link's TPK inside the HSM and the
//! message is MACed under the link's TAK by the link itself.
//!
//! The journal keeps how the issuer knows each routed or stand-in request (`upstream_ref`), so
//! that whatever undoes it here — the terminal's reversal, or an issuer approval that cannot be
//! paid out — becomes one 0420 advice for the issuer ([`forward_reversal`]). When the store
//! refuses that advice (it is failing, which is often why the approval could not be booked),
//! the advice is held in memory and retried until the store takes it
//! ([`crate::routing::held`]); while that hold is full, routed withdrawals are refused `96`.

use chrono::{DateTime, Utc};
use tracing::{Instrument, error, field, info, info_span, warn};

use super::SwitchContext;
use super::authorize::{PinReserved, Unposted, card_posting, pin_block_and_tpks};
use super::posting::{Journaled, Posting, StandIn};
use super::request::Financial;
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::{Message, Mti};
use crate::iso8583::{fields, private_data};
use crate::routing::drainer::advice_payload;
use crate::routing::{LinkAnswer, LinkError, UpstreamLink};
use crate::store::{AdviceMti, AuthKind, IssuerAnswer, NewAdvice};
use crate::telemetry;

/// Fields of the terminal's request that travel to the issuer as they are.
const FORWARDED: &[u8] = &[
    fields::PAN,
    fields::PROCESSING_CODE,
    fields::AMOUNT,
    fields::LOCAL_TIME,
    fields::LOCAL_DATE,
    fields::EXPIRY,
    fields::POS_ENTRY_MODE,
    fields::CURRENCY,
];

/// Priority of reversal advices: delivered before stand-in advices, so the issuer never sees a
/// stand-in debit while an uncertain one is still unreversed.
const REVERSAL_PRIORITY: u8 = 0;
/// Priority of stand-in advices.
const STAND_IN_PRIORITY: u8 = 1;

/// What to post for a card routed to `upstream`: the issuer's answer, a stand-in approval or
/// decline, or a decline of our own. `Err` is answered `96` and not journaled.
pub(crate) async fn authorize(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    fin: &Financial,
    head: &Journaled,
    upstream: &str,
) -> Result<Posting, Unposted> {
    let Some(link) = ctx.upstreams.get(upstream) else {
        // settings validation makes this unreachable; answer as for an unreachable issuer
        return Ok(Posting::decline(ResponseCode::IssuerUnavailable));
    };
    if matches!(head.kind, AuthKind::Withdrawal { .. }) && ctx.held_reversals.is_full() {
        // every held reversal is a debit an issuer keeps until the store is back: no new one
        // may arise that could not be held (`[saf] held_reversals_max`)
        warn!(
            upstream,
            "routed withdrawal refused: the hold of reversal advices is full"
        );
        return Err(Unposted::default());
    }
    let sent = match forward(ctx, link, terminal, request, &fin.pan, head).await {
        Ok(sent) => sent,
        Err(ResponseCode::SystemMalfunction) => return Err(Unposted::default()),
        Err(code) => return Ok(Posting::decline(code)),
    };
    match sent.result {
        Ok(answer) if !matches!(answer.code(), "91" | "96" | "63" | "58") => {
            Ok(Posting::IssuerAnswer {
                answer: issuer_answer(&answer),
                upstream_ref: sent.message.as_ref().map(|m| upstream_ref(link, m)),
            })
        }
        Ok(answer) => {
            info!(
                upstream,
                code = answer.code(),
                "issuer unavailable; trying stand-in"
            );
            stand_in(ctx, link, terminal, request, fin, head).await
        }
        Err(err) if err.maybe_delivered() => {
            warn!(upstream, error = %err, "no answer from the issuer");
            if matches!(head.kind, AuthKind::Withdrawal { .. })
                && let Some(message) = &sent.message
                && queue_reversal(ctx, link, &upstream_ref(link, message), message)
                    .await
                    .is_err()
            {
                return Err(Unposted::default());
            }
            stand_in(ctx, link, terminal, request, fin, head).await
        }
        Err(err) => {
            info!(upstream, error = %err, "issuer unavailable; trying stand-in");
            stand_in(ctx, link, terminal, request, fin, head).await
        }
    }
}

/// What was sent (if anything) and what came back.
struct Sent {
    message: Option<Message>,
    result: Result<LinkAnswer, LinkError>,
}

/// Translates the PIN, builds the issuer's 0200 and sends it. `Err` only for a PIN block that
/// no key of the terminal deciphers (`55`) or a store failure (`96`).
async fn forward(
    ctx: &SwitchContext,
    link: &UpstreamLink,
    terminal: &TerminalId,
    request: &Message,
    pan: &str,
    head: &Journaled,
) -> Result<Sent, ResponseCode> {
    let not_sent = |err| {
        Ok(Sent {
            message: None,
            result: Err(err),
        })
    };
    if !link.is_up() {
        link.report_down();
        return not_sent(LinkError::Down(link.name().to_string()));
    }
    // PIN translation (terminal TPK → link TPK) inside the HSM
    let pin_span = info_span!("pin", translate = true);
    let (block, tpks, cached) = pin_block_and_tpks(ctx, terminal, request)
        .instrument(pin_span.clone())
        .await?;
    let translate = |tpks: &[crate::domain::WrappedKey]| {
        for tpk in tpks {
            match link.translate_pin(tpk, pan, &block) {
                Ok(out) => return Ok(Some(out)),
                Err(err @ LinkError::Down(_)) => return Err(err),
                Err(_) => {}
            }
        }
        Ok(None)
    };
    let mut translated = pin_span.in_scope(|| translate(&tpks));
    if matches!(translated, Ok(None)) && cached {
        // a TPK another replica activated may be missing from the cached keys
        let newer = super::authorize::newer_tpks(ctx, terminal, &tpks)
            .instrument(pin_span.clone())
            .await;
        translated = pin_span.in_scope(|| translate(&newer));
    }
    drop(pin_span);
    let translated = match translated {
        Ok(found) => found,
        Err(err) => {
            link.report_down();
            return not_sent(err);
        }
    };
    let Some(translated) = translated else {
        // not a format 4 block under any key the terminal holds: the issuer could only say 55
        ctx.metrics.pin_failures.inc();
        return Err(ResponseCode::IncorrectPin);
    };
    let mut message =
        Message::new(Mti::parse("0200").map_err(|_| ResponseCode::SystemMalfunction)?);
    for &f in FORWARDED {
        if let Some(v) = request.get(f) {
            message.set(f, v);
        }
    }
    if !message.has(fields::PAN) {
        // track 2 only: the issuer gets PAN and expiry, never the track
        message.set_str(fields::PAN, pan);
    }
    if let Some((_, expiry)) = super::authorize::card_data(request) {
        message.set_str(fields::EXPIRY, &expiry);
    }
    message.set_str(fields::RRN, &head.rrn);
    message.set_str(fields::PIN_BLOCK, &hex::encode_upper(translated));
    let stan = match link.next_stan().await {
        Ok(s) => s,
        Err(err) => return not_sent(err),
    };
    message.set_str(
        fields::TRANSMISSION_DATE_TIME,
        &transmission_time(Utc::now()),
    );
    message.set_str(fields::STAN, &stan);
    let span = info_span!(
        "upstream",
        otel.kind = "client",
        upstream = link.name(),
        station_id = link.station().as_str(),
        stan = stan.as_str(),
        response_code = field::Empty,
        error = field::Empty,
    );
    if link.settings().propagate_trace
        && let Some(field48) =
            telemetry::traceparent(&span).and_then(|tp| private_data::encode_traceparent(&tp))
    {
        // the issuer's spans join this trace as children of this one (README "Traces and
        // logs": field 48, tag `TP`); without `propagate_trace` nothing is added to the wire
        message.set_str(fields::PRIVATE_DATA, &field48);
    }
    let result = link.request(message.clone()).instrument(span.clone()).await;
    match &result {
        Ok(answer) => span.record("response_code", answer.code()),
        Err(err) => span.record("error", tracing::field::display(err)),
    };
    Ok(Sent {
        message: Some(message),
        result,
    })
}

/// The issuer's answer as the journal keeps it. A code outside the profile is `05`.
fn issuer_answer(answer: &LinkAnswer) -> IssuerAnswer {
    let code = ResponseCode::parse(answer.code()).unwrap_or(ResponseCode::DoNotHonour);
    let (ledger, available) = answer
        .message
        .get_str(fields::ADDITIONAL_AMOUNTS)
        .map(parse_balances)
        .unwrap_or((None, None));
    let approved = code == ResponseCode::Approved;
    IssuerAnswer {
        response_code: code,
        auth_code: approved
            .then(|| {
                answer
                    .message
                    .get_str(fields::AUTH_CODE)
                    .map(str::to_string)
            })
            .flatten(),
        ledger_balance: approved.then_some(ledger).flatten(),
        available_balance: approved.then_some(available).flatten(),
    }
}

/// Field 54 entries (20 characters: account type 2, amount type 2, currency 3, sign, amount 12):
/// `01` ledger and `02` available.
fn parse_balances(field: &str) -> (Option<i64>, Option<i64>) {
    let mut ledger = None;
    let mut available = None;
    let bytes = field.as_bytes();
    for entry in bytes.chunks(20).filter(|c| c.len() == 20) {
        let Ok(text) = std::str::from_utf8(entry) else {
            continue;
        };
        let Ok(amount) = text[8..].parse::<i64>() else {
            continue;
        };
        let amount = if &text[7..8] == "D" { -amount } else { amount };
        match &text[2..4] {
            "01" => ledger = Some(amount),
            "02" => available = Some(amount),
            _ => {}
        }
    }
    (ledger, available)
}

/// Stand-in processing for an unavailable issuer: within the link's policy, the card's shared
/// stand-in data and PIN decide, and an approval carries the 0220 that tells the issuer.
async fn stand_in(
    ctx: &SwitchContext,
    link: &UpstreamLink,
    terminal: &TerminalId,
    request: &Message,
    fin: &Financial,
    head: &Journaled,
) -> Result<Posting, Unposted> {
    let unavailable = Ok(Posting::decline(ResponseCode::IssuerUnavailable));
    let policy = &link.settings().stand_in;
    let AuthKind::Withdrawal { amount } = head.kind else {
        // no balance to tell on the issuer's behalf
        return unavailable;
    };
    if !policy.enabled || amount > policy.max_amount {
        return unavailable;
    }
    let card = match ctx
        .store
        .find_card(&ctx.hsm.pan_token(&fin.pan))
        .instrument(info_span!("store", op = "find_card"))
        .await
    {
        Ok(Some(card)) if card.upstream.as_deref() == Some(link.name()) => card,
        // no stand-in data shared for this card: stand-in never skips the PIN
        Ok(_) => return unavailable,
        Err(_) => return Err(Unposted::default()),
    };
    let posting = card_posting(
        ctx,
        terminal,
        request,
        fin,
        &card,
        head.now,
        PinReserved(false),
    )
    .await?;
    let Posting::Ledger { card, pin_try, .. } = posting else {
        return Ok(posting);
    };
    let unposted = || Unposted {
        pin_try: pin_try.clone(),
    };
    let stan = link.next_stan().await.map_err(|_| unposted())?;
    let mut advice = Message::new(Mti::parse("0220").map_err(|_| unposted())?);
    for &f in FORWARDED {
        if let Some(v) = request.get(f) {
            advice.set(f, v);
        }
    }
    advice.set_str(fields::PAN, &fin.pan);
    advice.set_str(fields::EXPIRY, &fin.expiry);
    advice.set_str(fields::TRANSMISSION_DATE_TIME, &transmission_time(head.now));
    advice.set_str(fields::STAN, &stan);
    advice.set_str(fields::RRN, &head.rrn);
    advice.set_str(fields::AUTH_CODE, &head.auth_code);
    advice.set_str(fields::TERMINAL_ID, &link.station().to_field41());
    let upstream_ref = upstream_ref(link, &advice);
    let advice = new_advice(
        ctx,
        link,
        AdviceMti::Advice0220,
        STAND_IN_PRIORITY,
        &advice,
        head.now,
    )
    .map_err(|_| unposted())?;
    Ok(Posting::Ledger {
        card,
        pin_try,
        stand_in: Some(StandIn {
            advice,
            upstream_ref,
        }),
    })
}

/// `upstream:MTI:STAN:transmission`: how the issuer knows a message we sent or advised.
fn upstream_ref(link: &UpstreamLink, message: &Message) -> String {
    format!(
        "{}:{}:{}:{}",
        link.name(),
        message.mti().as_str(),
        message.get_str(fields::STAN).unwrap_or_default(),
        message
            .get_str(fields::TRANSMISSION_DATE_TIME)
            .unwrap_or_default()
    )
}

/// Tells the issuer that a request it knows by `reference` (see [`upstream_ref`]) is reversed:
/// queues a 0420 whose field 90 names it, with the card and amount fields of `source` (the
/// terminal's reversal, or the request itself). Queued once per original however often this
/// runs (the idempotency key is the original's identity). Used when a terminal reverses a routed
/// or stand-in withdrawal, and when a routed withdrawal turns out to have been reversed before
/// the issuer's approval came back.
pub(crate) async fn forward_reversal(
    ctx: &SwitchContext,
    reference: &str,
    source: &Message,
) -> Result<(), ResponseCode> {
    let Some(link) = reference
        .rsplitn(4, ':')
        .nth(3)
        .and_then(|name| ctx.upstreams.get(name))
    else {
        error!(
            reference,
            "cannot forward a reversal: its upstream is no longer configured"
        );
        return Err(ResponseCode::SystemMalfunction);
    };
    queue_reversal(ctx, link, reference, source).await
}

/// Queues a 0420 for the original the issuer knows by `reference`.
async fn queue_reversal(
    ctx: &SwitchContext,
    link: &UpstreamLink,
    reference: &str,
    source: &Message,
) -> Result<(), ResponseCode> {
    let mut parts = reference.rsplitn(4, ':');
    let (Some(f7), Some(stan), Some(mti)) = (parts.next(), parts.next(), parts.next()) else {
        error!(reference, "unreadable upstream reference");
        return Err(ResponseCode::SystemMalfunction);
    };
    let now = Utc::now();
    // STANs come from the store too: without one now, the held advice gets it when the store
    // is back (field 11 is the advice's identity at the issuer, so never one per attempt)
    let stan_new = match link.next_stan().await {
        Ok(stan) => Some(stan),
        Err(err) => {
            warn!(upstream = %link.name(), error = %err, "no STAN for a reversal advice yet");
            None
        }
    };
    let mut reversal =
        Message::new(Mti::parse("0420").map_err(|_| ResponseCode::SystemMalfunction)?);
    for &f in FORWARDED {
        if let Some(v) = source.get(f) {
            reversal.set(f, v);
        }
    }
    reversal.set_str(fields::TRANSMISSION_DATE_TIME, &transmission_time(now));
    if let Some(stan) = &stan_new {
        reversal.set_str(fields::STAN, stan);
    }
    reversal.set_str(fields::TERMINAL_ID, &link.station().to_field41());
    reversal.set_str(
        fields::ORIGINAL_DATA,
        &format!("{mti}{stan}{f7}{}", "0".repeat(22)),
    );
    let mut advice = new_advice(
        ctx,
        link,
        AdviceMti::Reversal0420,
        REVERSAL_PRIORITY,
        &reversal,
        now,
    )?;
    // one reversal per original, whichever path (timeout, terminal's 0400, its repeats) asks
    advice.idempotency_key = format!("{}:{stan}:{f7}:reversal", link.station());
    if stan_new.is_none() {
        ctx.held_reversals
            .hold(advice, &"the store could not reserve a STAN");
        return Err(ResponseCode::SystemMalfunction);
    }
    match ctx
        .store
        .saf_enqueue(&advice)
        .instrument(info_span!("store", op = "saf_enqueue"))
        .await
    {
        Ok(_) => Ok(()),
        Err(err) => {
            // The issuer may hold a debit we cannot reverse now: the advice waits in memory
            // until the store takes it (never lost to a failing store), and we refuse to stand
            // in on top of it.
            ctx.held_reversals.hold(advice, &err);
            Err(ResponseCode::SystemMalfunction)
        }
    }
}

/// An advice carrying `message`'s fields, identified like the issuer will identify it.
fn new_advice(
    ctx: &SwitchContext,
    link: &UpstreamLink,
    mti: AdviceMti,
    priority: u8,
    message: &Message,
    now: DateTime<Utc>,
) -> Result<NewAdvice, ResponseCode> {
    let payload = advice_payload(ctx.hsm.as_ref(), message).map_err(|err| {
        error!(upstream = %link.name(), error = %err, "failed to seal an advice's card data");
        ResponseCode::SystemMalfunction
    })?;
    Ok(NewAdvice {
        destination: link.name().to_string(),
        priority,
        mti,
        idempotency_key: format!(
            "{}:{}:{}",
            link.station(),
            message.get_str(fields::STAN).unwrap_or_default(),
            message
                .get_str(fields::TRANSMISSION_DATE_TIME)
                .unwrap_or_default()
        ),
        payload,
        reference: None,
        created_at: now,
    })
}

fn transmission_time(now: DateTime<Utc>) -> String {
    now.format("%m%d%H%M%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balances_are_read_from_field_54() {
        let f = super::super::authorize::additional_amounts("00", "360", 500_000, -25);
        assert_eq!(parse_balances(&f), (Some(500_000), Some(-25)));
        assert_eq!(parse_balances("garbage"), (None, None));
        assert_eq!(parse_balances(""), (None, None));
    }
}
