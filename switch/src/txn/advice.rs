//! Advices from an acquirer station, 0220/0221 → 0230 (SPEC §6): the acquirer stood in for us,
//! approved a withdrawal and paid the cash out; we book it here, once however often the advice
//! is delivered.
//!
//! Order of checks, each with its documented answer: format (`30`; `12` for anything but a
//! cash withdrawal), MAC (`63`, nothing journaled), card (`14` unless on-us and registered
//! here), then the ledger as a forced post (`13`, `12` for a currency mismatch, else `00`) in the
//! store transaction that also recognises a repeat: the original answer byte for byte — a 0221
//! repeat counts as its 0220 — or `94` for different content. The identity is (station, STAN,
//! transmission date-time), so every redelivery by any of the acquirer's drainers finds the
//! first one's journal row. (No separate duplicate look-up first: advices arrive by the
//! thousand after an outage, and the transaction answers repeats anyway.)
//!
//! Force-posting has a ceiling per station (`[stations]`): an advice above the station's
//! per-advice amount, or one that would take the station's advices booked this UTC day above
//! its per-day amount, is answered `61` (exceeds withdrawal limit), audited, and not journaled.
//! The ceiling is checked after the repeat check, so a repeat of a booked advice still gets its
//! original answer.
//!
//! Not checked, on purpose: the PIN (an advice carries none; the acquirer verified it when it
//! stood in), the expiry, the balance and the daily limit (the cash is already out). Refusals
//! before the ledger are not journaled: once an operator fixed the cause (say, registered the
//! card), requeueing the dead-lettered advice books it.

use chrono::Utc;
use tracing::{Instrument, info, info_span, warn};

use super::SwitchContext;
use super::authorize::{Route, fill_outcome, new_auth_code, new_rrn, route_for};
use super::posting::{CardRef, Journaled, Posting, auth_request};
use super::request::AdviceBooking;
use super::{Reply, authenticate, request_digest, response_to};
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::Message;
use crate::iso8583::fields;
use crate::store::{AuthKind, AuthOutcome, ForcePostCeiling, JournalEntry, NewAudit, StoreError};

/// Handles an 0220 or 0221 from a signed-on station, read into `booking`.
pub async fn handle(
    ctx: &SwitchContext,
    station: &TerminalId,
    booking: &AdviceBooking,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, "advice"));
    let (id, pan, amount) = (
        booking.trace.identity(station),
        &booking.pan,
        booking.amount,
    );

    let tak = match authenticate(ctx, station, request, raw).await {
        Ok(tak) => tak,
        Err(code) => return plain(code),
    };
    let coded = |code: ResponseCode| {
        response_to(request, code).map(|m| Reply {
            message: m,
            mac_key: tak.clone(),
            kind: "advice",
        })
    };
    let answer = |entry: &JournalEntry| {
        coded(ResponseCode::Approved).map(|mut reply| {
            fill_outcome(&mut reply.message, entry);
            reply
        })
    };

    // A repeat (0221, or 0220 again) is recognised by the store's authorization below, which
    // answers it from the journal (or `94` for other content) without booking it again.
    let digest = request_digest(ctx, raw);

    if route_for(&ctx.settings, pan) != Route::OnUs {
        return coded(ResponseCode::InvalidCard);
    }
    // stand-in data the acquirer holds for us is no card of ours to book
    let card = match ctx
        .store
        .find_card(&ctx.hsm.pan_token(pan))
        .instrument(info_span!("store", op = "find_card"))
        .await
    {
        Ok(Some(card)) if card.upstream.is_none() => card,
        Ok(_) => {
            info!(%station, stan = %id.stan, "advice refused: card not issued here");
            return coded(ResponseCode::InvalidCard);
        }
        Err(_) => return coded(ResponseCode::SystemMalfunction),
    };

    let now = Utc::now();
    let (per_advice, per_day) = ctx.settings.stations.ceiling_for(station.as_str());
    let head = Journaled {
        identity: id,
        digest,
        mti: request.mti().as_str().to_string(),
        kind: AuthKind::Withdrawal { amount },
        currency: request
            .get_str(fields::CURRENCY)
            .unwrap_or_default()
            .to_string(),
        // the acquirer's references are what the cardholder's receipt shows: keep them
        rrn: reference(request, fields::RRN, 12).unwrap_or_else(|| new_rrn(now)),
        auth_code: reference(request, fields::AUTH_CODE, 6).unwrap_or_else(new_auth_code),
        now,
    };
    let posting = Posting::ForcedAdvice {
        card: CardRef {
            card_id: card.id,
            account_id: card.account_id,
        },
        ceiling: ForcePostCeiling {
            per_advice,
            per_day,
        },
    };
    let auth = auth_request(head, None, posting);
    match ctx
        .store
        .authorize(&auth)
        .instrument(info_span!("store", op = "book_advice"))
        .await
    {
        Ok(AuthOutcome::Done(entry)) | Ok(AuthOutcome::Duplicate(entry)) => {
            if entry.approved() {
                info!(%station, stan = %entry.identity.stan, amount, "advice booked");
            }
            answer(&entry)
        }
        Ok(AuthOutcome::ContentMismatch) => coded(ResponseCode::Duplicate),
        Err(StoreError::OverCeiling { what }) => {
            // not journaled: once the banks agreed and the ceiling was raised, the acquirer's
            // requeued advice books; audited, because an issuer wants to know who pushed
            warn!(%station, stan = %auth.identity.stan, amount, refused = %what, "advice refused: over the station's ceiling");
            let entry = NewAudit {
                actor: format!("station:{station}"),
                action: "advice.refused".into(),
                target: station.to_string(),
                result: "over-ceiling".into(),
                detail: serde_json::json!({
                    "stan": auth.identity.stan,
                    "transmission": auth.identity.transmission,
                    "amount": amount,
                    "reason": what,
                }),
            };
            if let Err(err) = ctx.store.append_audit(&entry).await {
                warn!(%station, error = %err, "failed to audit a refused advice");
            }
            coded(ResponseCode::ExceedsWithdrawalLimit)
        }
        Err(err) => {
            warn!(%station, error = %err, "advice failed in the store");
            coded(ResponseCode::SystemMalfunction)
        }
    }
}

/// Field `field` when it is `len` letters or digits (37 RRN, 38 authorization code).
fn reference(request: &Message, field: u8, len: usize) -> Option<String> {
    request
        .get_str(field)
        .filter(|v| v.len() == len && v.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::Mti;

    #[test]
    fn references_are_kept_only_when_well_formed() {
        let mut m = Message::new(Mti::parse("0220").unwrap());
        m.set_str(fields::RRN, "612345678901");
        m.set_str(fields::AUTH_CODE, "12 456");
        assert_eq!(
            reference(&m, fields::RRN, 12).as_deref(),
            Some("612345678901")
        );
        assert_eq!(reference(&m, fields::AUTH_CODE, 6), None);
        assert_eq!(reference(&m, fields::TERMINAL_ID, 8), None);
    }
}
