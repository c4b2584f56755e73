//! Reversal advices (0420) the store would not take, held in memory until it does (issue 10,
//! "money never depends on luck").
//!
//! A 0420 tells an issuer to undo a debit we will not pay out: its approval came back for a
//! withdrawal the terminal already reversed, or the store failed while booking it, or its answer
//! never came. If the store is failing at that moment, the SAF enqueue fails too — and without
//! this module the reversal was gone, leaving the cardholder debited at the issuer for cash
//! never dispensed. So the advice is kept here, in order, and offered to the store again every
//! [`RETRY_INTERVAL`] until it takes it. The SAF enqueue is idempotent on the advice's key (one
//! reversal per original), so a store that took an advice but failed to say so stores nothing
//! twice: exactly one 0420 in the queue.
//!
//! Bounded: at `[saf] held_reversals_max`, routed withdrawals are refused `96` before anything
//! reaches an issuer (see `txn::routed`), so no new debt can arise that could not be held;
//! what was in flight is still held, so the bound is that plus one per in-flight request, and
//! nothing is ever dropped. `switchyard_reversals_held` says how many wait (alert
//! `SwitchyardReversalsHeld`), `switchyard_reversal_holds_total` how many ever did.
//!
//! At shutdown ([`HeldReversals::last_attempt`]) the store is tried once more; what it still
//! refuses is sent straight to the issuer over the link, which is still up then. That bypasses
//! the queue's ordering and record, which is why it is only done when the alternative is losing
//! the reversal: the issuer applies a 0420 once by its identity, so if the store did take it
//! after all, the drainer's later delivery is an answered repeat. What cannot be sent either is
//! logged at error level, one line per advice, with what an operator needs to reverse it by
//! hand (upstream, original's identity, amount, masked PAN) and never the PAN itself.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Upstreams;
use super::drainer::{Delivery, deliver};
use crate::crypto::Hsm;
use crate::metrics::Metrics;
use crate::store::{Advice, AdviceId, AdviceStatus, NewAdvice, Store, StoreError};

/// How often held advices are offered to the store again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Default of `[saf] held_reversals_max`.
pub const DEFAULT_CAPACITY: usize = crate::settings::DEFAULT_HELD_REVERSALS_MAX;

/// The held reversal advices of this process, oldest first.
#[derive(Debug)]
pub struct HeldReversals {
    queue: Mutex<VecDeque<NewAdvice>>,
    capacity: usize,
    metrics: Metrics,
}

impl HeldReversals {
    /// An empty hold; at `capacity` advices, [`HeldReversals::is_full`] turns true.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        metrics.reversals_held.set(0);
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<NewAdvice>> {
        // a panic elsewhere while holding the lock leaves a consistent queue: keep using it
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, held: usize) {
        self.metrics
            .reversals_held
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// Keeps `advice` (which the store just refused because of `why`) until the store takes
    /// it. Never refuses: an advice with the key of one already held is the same reversal
    /// asked for again (a terminal repeating its 0400) and is not held twice.
    pub fn hold(&self, advice: NewAdvice, why: &dyn std::fmt::Display) {
        let mut queue = self.lock();
        if queue
            .iter()
            .any(|a| a.idempotency_key == advice.idempotency_key)
        {
            return;
        }
        error!(
            upstream = %advice.destination,
            key = %advice.idempotency_key,
            held = queue.len() + 1,
            reason = %why,
            "the store refused a reversal advice; holding it in memory and retrying until the store takes it"
        );
        queue.push_back(advice);
        self.metrics.reversal_holds.inc();
        self.publish(queue.len());
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether the hold reached `[saf] held_reversals_max`: routed withdrawals are refused
    /// until it drains.
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    /// Offers the held advices to the store, oldest first, until it refuses one (a failing
    /// store is not asked once per advice, each waiting out the pool's timeout). An advice
    /// without its STAN yet (the store could not reserve one when it was made) gets one now.
    /// Returns how many are still held.
    pub async fn flush(&self, store: &Store, upstreams: &Upstreams) -> usize {
        // an advice the store refuses as invalid will never be taken: it goes to the back
        // (and keeps the alert firing) rather than block the others; one pass at most
        let mut budget = self.len();
        while budget > 0 {
            budget -= 1;
            let Some(mut advice) = self.lock().pop_front() else {
                break;
            };
            if let Err(err) = assign_stan(&mut advice, upstreams).await {
                self.put_back_front(advice);
                warn!(error = %err, "held reversal advices still wait: no STAN");
                break;
            }
            match store.saf_enqueue(&advice).await {
                Ok(outcome) => {
                    info!(
                        upstream = %advice.destination,
                        key = %advice.idempotency_key,
                        id = %outcome.id(),
                        "held reversal advice stored in the SAF queue"
                    );
                    let left = self.lock().len();
                    self.publish(left);
                }
                Err(err @ StoreError::Invalid { .. }) => {
                    error!(
                        upstream = %advice.destination,
                        key = %advice.idempotency_key,
                        error = %err,
                        "the store refuses a held reversal advice as invalid; it stays held: reverse it by hand"
                    );
                    self.lock().push_back(advice);
                }
                Err(err) => {
                    self.put_back_front(advice);
                    warn!(error = %err, held = self.len(), "held reversal advices still wait: the store refused again");
                    break;
                }
            }
        }
        let left = self.len();
        self.publish(left);
        left
    }

    fn put_back_front(&self, advice: NewAdvice) {
        let mut queue = self.lock();
        queue.push_front(advice);
        self.publish(queue.len());
    }

    /// Retries every [`RETRY_INTERVAL`] until `stop`.
    pub async fn run(&self, store: Store, upstreams: &Upstreams, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RETRY_INTERVAL) => {}
            }
            if !self.is_empty() {
                self.flush(&store, upstreams).await;
            }
        }
    }

    /// At shutdown, with the links still up: the store once more, then straight to the issuer
    /// for what it refuses, then a loud log line for each that is still not anywhere. Returns
    /// how many could be neither stored nor sent.
    pub async fn last_attempt(&self, store: &Store, upstreams: &Upstreams, hsm: &dyn Hsm) -> usize {
        if self.is_empty() || self.flush(store, upstreams).await == 0 {
            return 0;
        }
        let rest: Vec<NewAdvice> = self.lock().drain(..).collect();
        warn!(
            held = rest.len(),
            "shutdown: the store still refuses held reversal advices; sending them straight to their issuers"
        );
        let mut lost = 0;
        for advice in rest {
            let why = match upstreams.get(&advice.destination) {
                None => "its upstream is not configured".to_string(),
                Some(_) if advice.payload.get("11").is_none() => {
                    "it has no STAN (the store could not reserve one)".to_string()
                }
                Some(link) => match deliver(hsm, link, &as_leased(&advice)).await {
                    Delivery::Delivered => {
                        warn!(
                            upstream = %advice.destination,
                            key = %advice.idempotency_key,
                            "shutdown: held reversal advice delivered straight to the issuer; it is not in the SAF queue"
                        );
                        continue;
                    }
                    Delivery::Failed(failure) => failure.reason,
                },
            };
            lost += 1;
            error!(
                upstream = %advice.destination,
                key = %advice.idempotency_key,
                original = advice.payload.get("90").and_then(|v| v.as_str()).and_then(|f| f.get(..20)).unwrap_or("unknown"),
                amount = advice.payload.get("4").and_then(|v| v.as_str()).unwrap_or("unknown"),
                card = advice.payload.get("2").and_then(|v| v.get("masked")).and_then(|v| v.as_str()).unwrap_or("unknown"),
                reason = %why,
                "REVERSAL LOST AT SHUTDOWN: neither stored nor delivered; the issuer still holds this debit; reverse it by hand"
            );
        }
        self.publish(0);
        lost
    }
}

/// Sets field 11 of a held advice that was made without one.
async fn assign_stan(advice: &mut NewAdvice, upstreams: &Upstreams) -> Result<(), String> {
    if advice.payload.get("11").is_some() {
        return Ok(());
    }
    let link = upstreams
        .get(&advice.destination)
        .ok_or_else(|| format!("upstream {} is not configured", advice.destination))?;
    let stan = link.next_stan().await.map_err(|e| e.to_string())?;
    match advice.payload.as_object_mut() {
        Some(fields) => {
            fields.insert("11".into(), serde_json::Value::String(stan));
            Ok(())
        }
        None => Err("payload is not a JSON object".into()),
    }
}

/// A held advice as the drainer's sender takes it: first attempt, so it goes out as 0420.
fn as_leased(advice: &NewAdvice) -> Advice {
    Advice {
        id: AdviceId(0),
        destination: advice.destination.clone(),
        priority: advice.priority,
        mti: advice.mti,
        idempotency_key: advice.idempotency_key.clone(),
        payload: advice.payload.clone(),
        reference: advice.reference.clone(),
        status: AdviceStatus::Queued,
        attempts: 1,
        next_attempt_at: Utc::now(),
        lease_holder: None,
        lease_until: None,
        last_error: None,
        created_at: advice.created_at,
        settled_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SwitchMetrics;
    use crate::store::{AdviceMti, ConnectOptions, SafFilter};
    use std::sync::Arc;

    fn reversal(key: &str) -> NewAdvice {
        NewAdvice {
            destination: "issuer-b".into(),
            priority: 0,
            mti: AdviceMti::Reversal0420,
            idempotency_key: key.into(),
            payload: serde_json::json!({"4": "000000001000", "7": "1122153045", "11": "000777",
                "90": format!("0200000041{}{}", "1122150000", "0".repeat(22))}),
            reference: None,
            created_at: Utc::now(),
        }
    }

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}", dir.path().join("held.db").display());
        let store = crate::store::connect(&url, &ConnectOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    #[tokio::test]
    async fn held_until_the_store_takes_them_then_stored_once_in_order() {
        let metrics = Arc::new(SwitchMetrics::new());
        let held = HeldReversals::new(2, metrics.clone());
        let upstreams = Upstreams::default();
        held.hold(reversal("ACQ001:000041:1122150000:reversal"), &"store down");
        // the same reversal asked for again (a terminal repeating its 0400): held once
        held.hold(reversal("ACQ001:000041:1122150000:reversal"), &"store down");
        assert_eq!(held.len(), 1);
        assert!(!held.is_full());
        held.hold(reversal("ACQ001:000042:1122150000:reversal"), &"store down");
        assert!(held.is_full());
        assert_eq!(metrics.reversals_held.get(), 2);
        assert_eq!(metrics.reversal_holds.get(), 2);

        // a store that refuses: nothing lost, order kept
        let dir = tempfile::tempdir().unwrap();
        let failing = store(&dir).await;
        failing.close().await;
        assert_eq!(held.flush(&failing, &upstreams).await, 2);
        assert_eq!(held.len(), 2);

        // the store is back: both stored, oldest first
        let store = store(&dir).await;
        assert_eq!(held.flush(&store, &upstreams).await, 0);
        assert_eq!(metrics.reversals_held.get(), 0);
        // the store had taken the first after all, and it is held again: still one row
        held.hold(
            reversal("ACQ001:000041:1122150000:reversal"),
            &"lost answer",
        );
        assert_eq!(held.flush(&store, &upstreams).await, 0);
        let queued = store
            .saf_list(&SafFilter::default(), crate::store::Page::default())
            .await
            .unwrap();
        let keys: Vec<&str> = queued.iter().map(|a| a.idempotency_key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "ACQ001:000041:1122150000:reversal",
                "ACQ001:000042:1122150000:reversal"
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn an_advice_without_a_stan_waits_for_one() {
        let held = HeldReversals::new(10, Arc::new(SwitchMetrics::new()));
        let mut advice = reversal("ACQ001:000043:1122150000:reversal");
        advice.payload.as_object_mut().unwrap().remove("11");
        held.hold(advice, &"no STAN");
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        // its upstream is not configured here, so no STAN can be had: it stays held
        assert_eq!(held.flush(&store, &Upstreams::default()).await, 1);
        store.close().await;
    }
}
