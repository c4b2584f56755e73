//! Reversals: 0400 → 0410 and reversal advices 0420/0421 → 0430 (SPEC §3).
//!
//! Field 90 names the original (MTI, STAN, transmission date-time, …). The store restores the
//! funds of an approved withdrawal exactly once, however often the reversal arrives; an unknown
//! original is answered `21` and recorded.

use chrono::Utc;
use tracing::{Instrument, info_span};

use super::SwitchContext;
use super::authorize::new_rrn;
use super::request::Reversal;
use super::{Reply, authenticate, request_digest, response_to};
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::Message;
use crate::iso8583::fields;
use crate::store::{AuthOutcome, ReversalRequest};

/// Handles 0400, 0420 and 0421 from a signed-on terminal, read into `reversal`.
pub async fn handle(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    reversal: &Reversal,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, "reversal"));
    let id = reversal.trace.identity(terminal);
    let original = reversal.original.identity(terminal);
    let tak = match authenticate(ctx, terminal, request, raw).await {
        Ok(tak) => tak,
        Err(code) => return plain(code),
    };
    let coded = |code: ResponseCode| {
        response_to(request, code).map(|m| Reply {
            message: m,
            mac_key: tak.clone(),
            kind: "reversal",
        })
    };
    let now = Utc::now();
    let outcome = ctx
        .store
        .reverse(&ReversalRequest {
            identity: id,
            digest: request_digest(ctx, raw),
            mti: request.mti().as_str().to_string(),
            original,
            rrn: new_rrn(now),
            now,
        })
        .instrument(info_span!("store", op = "reverse"))
        .await;
    match outcome {
        Ok(AuthOutcome::Done(entry)) | Ok(AuthOutcome::Duplicate(entry)) => {
            let mut code = ResponseCode::parse(&entry.response_code)
                .unwrap_or(ResponseCode::SystemMalfunction);
            // A routed or stand-in withdrawal: the issuer reverses it too, through the queue.
            // A repeat of this reversal queues nothing new (one 0420 per original).
            if let Some(reference) = &entry.upstream_ref
                && code == ResponseCode::Approved
                && super::routed::forward_reversal(ctx, reference, request)
                    .await
                    .is_err()
            {
                // answered 96 so the terminal repeats it; the repeat tries again
                code = ResponseCode::SystemMalfunction;
            }
            coded(code).map(|mut reply| {
                reply.message.set_str(fields::RRN, &entry.rrn);
                reply
            })
        }
        Ok(AuthOutcome::ContentMismatch) => coded(ResponseCode::Duplicate),
        Err(err) => {
            tracing::warn!(%terminal, error = %err, "reversal failed in the store");
            coded(ResponseCode::SystemMalfunction)
        }
    }
}
