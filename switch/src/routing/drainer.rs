//! The store-and-forward drainer (SPEC §6): leases queued advices for every upstream whose link
//! is available, sends each (0220/0420 first, 0221/0421 on repeats) and settles it — delivered,
//! retried after backoff, or dead-lettered when the issuer refuses it for good.
//!
//! It runs in `switchyard-switch drain` processes (many against one PostgreSQL: leases use
//! `FOR UPDATE SKIP LOCKED`) and inside `serve` with the embedded SQLite store. Delivery is
//! at-least-once; the issuer applies an advice once by its identity (station, STAN, transmission
//! time), so a drainer that dies between sending and settling costs a repeat, never a second
//! effect. A batch is sent concurrently over the link (answers are matched by STAN), then settled.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{LinkError, UpstreamLink, Upstreams};
use crate::crypto::Hsm;
use crate::domain::mask_pan;
use crate::iso8583::fields;
use crate::iso8583::{Message, Mti, Packager};
use crate::settings::SafSettings;
use crate::store::{Advice, AdviceFailure, AdviceMti, RetryPolicy, Store, StoreError};

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The issuer acknowledged it (`00`; `21` for a reversal whose original it never booked).
    Delivered,
    /// Try again later, or dead-letter it now when `permanent`.
    Failed(AdviceFailure),
}

/// A drainer: one lease holder.
#[derive(Debug, Clone)]
pub struct Drainer {
    store: Store,
    upstreams: Arc<Upstreams>,
    settings: SafSettings,
    holder: String,
    hsm: Arc<dyn Hsm>,
}

impl Drainer {
    /// A drainer leasing as `holder` (unique per process: host name and a random suffix); `hsm`
    /// opens the sealed PANs of the advices it sends.
    pub fn new(
        store: Store,
        upstreams: Arc<Upstreams>,
        settings: SafSettings,
        holder: String,
        hsm: Arc<dyn Hsm>,
    ) -> Self {
        Self {
            store,
            upstreams,
            settings,
            holder,
            hsm,
        }
    }

    /// A lease holder name unique to this process.
    pub fn holder_name() -> String {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "drainer".into());
        format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
    }

    /// Drains until `stop`: a batch in flight when `stop` comes is sent and settled first.
    pub async fn run(self, stop: CancellationToken) {
        info!(holder = %self.holder, "SAF drainer started");
        let policy = RetryPolicy::from(&self.settings);
        while !stop.is_cancelled() {
            let mut busy = false;
            for link in self.upstreams.iter() {
                if stop.is_cancelled() {
                    break;
                }
                if !link.is_available() {
                    continue;
                }
                match self.drain_batch(link, &policy).await {
                    Ok(n) => busy |= n > 0,
                    Err(err) => {
                        warn!(upstream = %link.name(), error = %err, "SAF lease failed");
                    }
                }
            }
            if !busy {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
        info!(holder = %self.holder, "SAF drainer stopped");
    }

    /// Leases one batch for `link`, sends it, settles it. Returns how many were leased.
    pub async fn drain_batch(
        &self,
        link: &Arc<UpstreamLink>,
        policy: &RetryPolicy,
    ) -> Result<usize, StoreError> {
        let batch = self
            .store
            .saf_lease(
                Some(link.name()),
                &self.holder,
                self.settings.lease,
                self.settings.batch_size,
                Utc::now(),
            )
            .await?;
        let leased = batch.len();
        if leased == 0 {
            return Ok(0);
        }
        debug!(upstream = %link.name(), leased, "sending advices");
        let outcomes = join_all(
            batch
                .iter()
                .map(|advice| deliver(self.hsm.as_ref(), link, advice)),
        )
        .await;
        let mut delivered = Vec::with_capacity(leased);
        for (advice, outcome) in batch.iter().zip(outcomes) {
            let failure = match outcome {
                Delivery::Delivered => {
                    delivered.push(advice.id);
                    continue;
                }
                Delivery::Failed(failure) => failure,
            };
            match self
                .store
                .saf_fail(advice.id, &self.holder, &failure, policy, Utc::now())
                .await
            {
                Ok(result) => {
                    debug!(id = %advice.id, ?result, reason = %failure.reason, "advice not delivered")
                }
                Err(StoreError::LeaseLost { what }) => {
                    // our lease ran out and another drainer took it: it will settle it
                    warn!(id = %advice.id, %what, "advice settled by another drainer");
                }
                Err(err) => {
                    // the lease expires and the advice is sent again as a repeat
                    warn!(id = %advice.id, error = %err, "failed to settle an advice");
                }
            }
        }
        // one statement for every delivery of the batch
        match self
            .store
            .saf_complete_many(&delivered, &self.holder, Utc::now())
            .await
        {
            Ok(settled) if settled.len() < delivered.len() => warn!(
                lost = delivered.len() - settled.len(),
                "advices settled by another drainer (our lease had ended)"
            ),
            Ok(_) => {}
            // the leases expire and the advices go out again as repeats, booked once
            Err(err) => {
                warn!(error = %err, count = delivered.len(), "failed to settle delivered advices")
            }
        }
        Ok(leased)
    }
}

/// Fields kept sealed in a queued advice: the PAN. The store never holds it in clear (cards are
/// kept by PAN token); the drainer opens it inside the HSM just before sending.
const SEALED_FIELDS: [u8; 1] = [2];

/// An advice's payload for `message`: every field as text, the PAN as
/// `{"sealed": <AES-SIV under the LMK>, "masked": "411111******1111"}` for the admin API.
/// Bitmaps and MACs are left out: each attempt is MACed when it is sent.
pub fn advice_payload(
    hsm: &dyn Hsm,
    message: &Message,
) -> Result<serde_json::Value, crate::crypto::HsmError> {
    let mut payload = serde_json::Map::new();
    for (n, value) in message.fields() {
        if matches!(n, 1 | 64 | 128) {
            continue;
        }
        let Ok(text) = std::str::from_utf8(value) else {
            continue;
        };
        let value = if SEALED_FIELDS.contains(&n) {
            serde_json::json!({
                "sealed": hsm.seal_card_data(&n.to_string(), text)?,
                "masked": mask_pan(text),
            })
        } else {
            serde_json::Value::String(text.to_string())
        };
        payload.insert(n.to_string(), value);
    }
    Ok(serde_json::Value::Object(payload))
}

/// The message to send for a leased advice: its stored fields under the MTI of this attempt,
/// sealed ones opened (a PAN queued in clear by an older version is sent as it is).
///
/// The payload comes from the database, so it is checked like network input: a field number
/// outside 2..=128, a value the profile's field table refuses (a negative or 13-digit amount, a
/// letter in a STAN), a zero amount, a missing identity (7, 11; 90 for a reversal) or a payload
/// that is no JSON object is refused with the reason — the drainer dead-letters the advice and
/// the rest keep flowing. Reasons name fields, never their values (they may be card data).
pub fn advice_message(hsm: &dyn Hsm, advice: &Advice) -> Result<Message, String> {
    let mti = Mti::parse(advice.send_mti()).map_err(|e| e.to_string())?;
    let fields = advice
        .payload
        .as_object()
        .ok_or("payload is not a JSON object of fields (corrupt or empty in the store)")?;
    let mut m = Message::new(mti);
    for (key, value) in fields {
        let n: u8 = key
            .parse()
            .map_err(|_| format!("payload key {key:?} is not a field number"))?;
        if n == 1 || n == 64 || n == 128 {
            continue; // bitmaps and MACs are made at send time
        }
        let spec = Packager::ascii()
            .field(n)
            .filter(|_| (2..=128).contains(&n))
            .ok_or_else(|| format!("payload key {n} is not a field of the profile (2 to 128)"))?;
        let clear;
        let text: &str = match (value.as_str(), value.get("sealed").and_then(|v| v.as_str())) {
            (Some(text), _) => text,
            (None, Some(sealed)) => {
                clear = hsm
                    .open_card_data(key, sealed)
                    .map_err(|e| format!("payload field {n}: {e}"))?;
                &clear
            }
            (None, None) => return Err(format!("payload field {n} is neither text nor sealed")),
        };
        spec.validate(text.as_bytes())
            .map_err(|e| format!("payload {e}"))?;
        m.set_str(n, text);
    }
    let required: &[u8] = match advice.mti {
        AdviceMti::Advice0220 => &[2, 3, 4, 7, 11],
        AdviceMti::Reversal0420 => &[7, 11, 90],
    };
    if let Some(n) = required.iter().find(|&&n| !m.has(n)) {
        return Err(format!("payload has no field {n}"));
    }
    if m.get_str(fields::AMOUNT)
        .is_some_and(|a| a.bytes().all(|b| b == b'0'))
    {
        return Err("payload field 4: the amount is zero".into());
    }
    // the field table passed every value; packing is the last word on what can be sent
    Packager::ascii()
        .pack(&m)
        .map_err(|e| format!("cannot pack the advice: {e}"))?;
    Ok(m)
}

/// Sends one advice and judges the answer (one `saf.deliver` span per attempt).
pub async fn deliver(hsm: &dyn Hsm, link: &UpstreamLink, advice: &Advice) -> Delivery {
    let span = tracing::info_span!(
        "saf.deliver",
        otel.kind = "client",
        advice_id = advice.id.0,
        destination = advice.destination.as_str(),
        attempt = advice.attempts,
        result = tracing::field::Empty,
    );
    let delivery = deliver_one(hsm, link, advice)
        .instrument(span.clone())
        .await;
    span.record(
        "result",
        match &delivery {
            Delivery::Delivered => "delivered",
            Delivery::Failed(f) if f.permanent => "failed_permanently",
            Delivery::Failed(_) => "failed",
        },
    );
    delivery
}

async fn deliver_one(hsm: &dyn Hsm, link: &UpstreamLink, advice: &Advice) -> Delivery {
    let fail =
        |reason: String, permanent: bool| Delivery::Failed(AdviceFailure { reason, permanent });
    let message = match advice_message(hsm, advice) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot build the advice: {e}"), true),
    };
    match link.request(message).await {
        Ok(answer) => match answer.code() {
            "00" => Delivery::Delivered,
            // nothing to do: a reversal whose original the issuer never booked, or a stand-in
            // advice whose reversal reached the issuer first
            "21" => Delivery::Delivered,
            code @ ("91" | "96" | "63" | "58") => {
                fail(format!("issuer answered {code} (temporary)"), false)
            }
            "" => fail("issuer answered without field 39".into(), true),
            "61" => fail(
                "issuer refused the advice with 61: above the force-post ceiling it grants \
                 this station (per advice or per day); agree a higher ceiling with the issuer, \
                 then requeue"
                    .into(),
                true,
            ),
            "13" => fail(
                "issuer refused the advice with 13: invalid amount".into(),
                true,
            ),
            code => fail(format!("issuer refused the advice with {code}"), true),
        },
        Err(err @ (LinkError::CircuitOpen(_) | LinkError::Down(_))) => {
            fail(format!("not sent: {err}"), false)
        }
        Err(err) => fail(err.to_string(), false),
    }
}

/// How long an idle drainer waits before looking again (also `[saf].poll_interval`'s default).
pub const DEFAULT_POLL_INTERVAL: Duration = crate::settings::DEFAULT_SAF_POLL_INTERVAL;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AdviceId, AdviceStatus};

    fn advice(attempts: u32) -> Advice {
        Advice {
            id: AdviceId(7),
            destination: "issuer-b".into(),
            priority: 1,
            mti: AdviceMti::Advice0220,
            idempotency_key: "ACQ001:000042:1122153045".into(),
            payload: serde_json::json!({"2": "4111111111111111", "3": "010000",
                "4": "000000005000", "7": "1122153045", "11": "000042", "64": "x"}),
            reference: None,
            status: AdviceStatus::Queued,
            attempts,
            next_attempt_at: Utc::now(),
            lease_holder: None,
            lease_until: None,
            last_error: None,
            created_at: Utc::now(),
            settled_at: None,
        }
    }

    fn hsm() -> crate::crypto::SoftHsm {
        crate::crypto::SoftHsm::new(crate::crypto::Lmk::generate(&mut rand::rng()), None)
    }

    #[test]
    fn first_attempt_is_0220_then_0221() {
        let hsm = hsm();
        let m = advice_message(&hsm, &advice(1)).unwrap();
        assert_eq!(m.mti().as_str(), "0220");
        assert_eq!(m.get_str(fields::AMOUNT), Some("000000005000"));
        assert!(!m.has(fields::MAC), "the stored MAC is never replayed");
        assert_eq!(
            advice_message(&hsm, &advice(2)).unwrap().mti().as_str(),
            "0221"
        );
    }

    #[test]
    fn the_pan_is_stored_sealed_and_sent_in_clear() {
        let hsm = hsm();
        let mut m = Message::new(Mti::parse("0220").unwrap());
        m.set_str(fields::PAN, "4111111111111111");
        m.set_str(fields::PROCESSING_CODE, "010000");
        m.set_str(fields::AMOUNT, "000000005000");
        m.set_str(fields::TRANSMISSION_DATE_TIME, "1122153045");
        m.set_str(fields::STAN, "000042");
        m.set(fields::MAC, [0u8; 8]);
        let payload = advice_payload(&hsm, &m).unwrap();
        let stored = payload.to_string();
        assert!(!stored.contains("4111111111111111"), "{stored}");
        assert_eq!(payload["2"]["masked"], "411111******1111");
        assert!(payload.get("64").is_none());
        let mut a = advice(1);
        a.payload = payload;
        let sent = advice_message(&hsm, &a).unwrap();
        assert_eq!(sent.get_str(fields::PAN), Some("4111111111111111"));
        assert_eq!(sent.get_str(fields::AMOUNT), Some("000000005000"));
        // sealed under another LMK (or altered): refused, and the reason shows no card data
        let err = advice_message(&self::hsm(), &a).unwrap_err();
        assert!(err.contains("field 2") && !err.contains("4111"), "{err}");
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let hsm = hsm();
        let mut a = advice(1);
        a.payload = serde_json::json!({"x": "1"});
        assert!(
            advice_message(&hsm, &a)
                .unwrap_err()
                .contains("field number")
        );
        a.payload = serde_json::json!({"4": 5});
        assert!(
            advice_message(&hsm, &a)
                .unwrap_err()
                .contains("neither text nor sealed")
        );
    }

    /// What the database holds is checked like network input: refused with a reason that
    /// names the field, never a panic, never the value.
    #[test]
    fn out_of_range_stored_fields_are_refused_not_panicked_on() {
        let hsm = hsm();
        let refused = |change: &dyn Fn(&mut serde_json::Value), mti: AdviceMti| {
            let mut a = advice(1);
            a.mti = mti;
            change(&mut a.payload);
            advice_message(&hsm, &a).unwrap_err()
        };
        let set = |k: &'static str, v: &'static str| {
            move |p: &mut serde_json::Value| {
                p[k] = serde_json::json!(v);
            }
        };
        type Change = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Change, AdviceMti, &str)> = vec![
            // Message::set asserts 2..=128: these used to panic the drainer
            (
                Box::new(set("0", "x")),
                AdviceMti::Advice0220,
                "not a field of the profile",
            ),
            (
                Box::new(set("129", "x")),
                AdviceMti::Advice0220,
                "not a field of the profile",
            ),
            (
                Box::new(set("255", "x")),
                AdviceMti::Advice0220,
                "not a field of the profile",
            ),
            (
                Box::new(set("4", "-00000005000")),
                AdviceMti::Advice0220,
                "field 4",
            ),
            (
                Box::new(set("4", "99999999999999999999")),
                AdviceMti::Advice0220,
                "field 4",
            ),
            (
                Box::new(set("4", "000000000000")),
                AdviceMti::Advice0220,
                "amount is zero",
            ),
            (
                Box::new(set("11", "12345X")),
                AdviceMti::Advice0220,
                "field 11",
            ),
            (
                Box::new(set("2", "4111x11111111111")),
                AdviceMti::Advice0220,
                "field 2",
            ),
            (
                Box::new(|p: &mut serde_json::Value| {
                    p.as_object_mut().unwrap().remove("11");
                }),
                AdviceMti::Advice0220,
                "no field 11",
            ),
            (
                Box::new(|_: &mut serde_json::Value| {}),
                AdviceMti::Reversal0420,
                "no field 90",
            ),
            (
                Box::new(set("90", "0200")),
                AdviceMti::Reversal0420,
                "field 90",
            ),
            (
                Box::new(|p: &mut serde_json::Value| {
                    *p = serde_json::Value::Null;
                }),
                AdviceMti::Advice0220,
                "not a JSON object",
            ),
        ];
        for (change, mti, reason) in cases {
            let err = refused(&*change, mti);
            assert!(err.contains(reason), "{reason}: {err}");
            assert!(!err.contains("4111"), "no card data in {err}");
        }
        // a well-formed reversal passes
        let mut a = advice(1);
        a.mti = AdviceMti::Reversal0420;
        a.payload["90"] =
            serde_json::json!(format!("0200000041{}{}", "1122153045", "0".repeat(22)));
        assert_eq!(advice_message(&hsm, &a).unwrap().mti().as_str(), "0420");
    }
}
