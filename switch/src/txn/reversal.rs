//! Reversals: 0400 → 0410 and reversal advices 0420/0421 → 0430 (SPEC §3).
//!
//! Field 90 names the original (MTI, STAN, transmission date-time, …). The store restores the
//! funds of an approved withdrawal exactly once, however often the reversal arrives; an unknown
//! original is answered `21` and recorded.

use chrono::Utc;

use super::authorize::{identity, new_rrn};
use super::{Reply, authenticate, request_digest, response_to};
use crate::app::SwitchContext;
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::Message;
use crate::store::{AuthOutcome, RequestIdentity, ReversalRequest};

/// Original data elements (field 90): MTI 4, STAN 6, transmission date-time 10, then acquiring
/// and forwarding institution ids (11 + 11) which we do not need to find the original.
fn original_identity(terminal: &TerminalId, field90: &str) -> Option<RequestIdentity> {
    if field90.len() < 20 || !field90.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(RequestIdentity {
        terminal_id: terminal.clone(),
        stan: field90[4..10].to_string(),
        transmission: field90[10..20].to_string(),
    })
}

/// Handles 0400, 0420 and 0421 from a signed-on terminal.
pub async fn handle(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    raw: &[u8],
) -> Option<Reply> {
    let plain = |code| response_to(request, code).map(|m| Reply::plain(m, "reversal"));
    let (Some(id), Some(original)) = (
        identity(terminal, request),
        request
            .get_str(90)
            .and_then(|f| original_identity(terminal, f)),
    ) else {
        return plain(ResponseCode::FormatError);
    };
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
                reply.message.set_str(37, &entry.rrn);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_90_names_the_original() {
        let tid = TerminalId::new("ATM1").unwrap();
        let f90 = "020000012311221530450000000000000000000000";
        let id = original_identity(&tid, f90).unwrap();
        assert_eq!(id.stan, "000123");
        assert_eq!(id.transmission, "1122153045");
        assert!(original_identity(&tid, "0200").is_none());
        assert!(original_identity(&tid, "02000001231122153045XXXXXXXXXXX").is_none());
    }
}
