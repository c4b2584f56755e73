//! Store-and-forward (SAF) records and the pure rules both backends apply to them: advices
//! waiting for an upstream, their leases, retry schedule and dead letters (SPEC §6).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::StoreError;
use crate::settings::SafSettings;

/// Id of a queued advice: a database sequence, so it also orders advices enqueued at the same
/// instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AdviceId(pub i64);

impl fmt::Display for AdviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which advice is stored; the first attempt is sent with [`AdviceMti::mti`], every later one
/// with [`AdviceMti::repeat_mti`] so the issuer knows it may have seen it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AdviceMti {
    /// 0220: a stand-in approval the issuer must book.
    #[serde(rename = "0220")]
    Advice0220,
    /// 0420: a reversal of a withdrawal whose upstream answer never came.
    #[serde(rename = "0420")]
    Reversal0420,
}

impl AdviceMti {
    /// MTI of the first attempt.
    pub fn mti(self) -> &'static str {
        match self {
            AdviceMti::Advice0220 => "0220",
            AdviceMti::Reversal0420 => "0420",
        }
    }

    /// MTI of the second and later attempts.
    pub fn repeat_mti(self) -> &'static str {
        match self {
            AdviceMti::Advice0220 => "0221",
            AdviceMti::Reversal0420 => "0421",
        }
    }

    /// Parses a stored or requested MTI (`0220` or `0420`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "0220" => Some(AdviceMti::Advice0220),
            "0420" => Some(AdviceMti::Reversal0420),
            _ => None,
        }
    }
}

/// Where an advice is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AdviceStatus {
    /// Waiting for delivery (possibly leased by a drainer right now, or backing off).
    Queued,
    /// The upstream acknowledged it.
    Delivered,
    /// Refused for good or out of attempts; waits for an operator.
    DeadLetter,
    /// Withdrawn by an operator; never sent again.
    Cancelled,
}

impl AdviceStatus {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AdviceStatus::Queued => "queued",
            AdviceStatus::Delivered => "delivered",
            AdviceStatus::DeadLetter => "dead",
            AdviceStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(AdviceStatus::Queued),
            "delivered" => Some(AdviceStatus::Delivered),
            "dead" => Some(AdviceStatus::DeadLetter),
            "cancelled" => Some(AdviceStatus::Cancelled),
            _ => None,
        }
    }
}

/// An advice to queue for an upstream.
///
/// The payload is the message's ISO 8583 fields as JSON (field number → value), not the packed
/// bytes: each attempt is re-packed by the sender because the MTI changes to 0221/0421 from the
/// second attempt and the MAC must be computed under the link's TAK current at send time (keys
/// rotate while an advice waits). JSON also lets operators read a dead letter through the API.
/// Track data and PIN blocks (fields 35, 36, 45, and 52 or this profile's 123) are refused:
/// advices carry neither.
#[derive(Clone, PartialEq)]
pub struct NewAdvice {
    /// Upstream name (`[[upstreams]].name`).
    pub destination: String,
    /// 0 is delivered first.
    pub priority: u8,
    /// 0220 or 0420.
    pub mti: AdviceMti,
    /// Unique identity of the advice, e.g. `ACQ001:000123:1122153045` (station, STAN,
    /// transmission time); a second enqueue with the same key stores nothing.
    pub idempotency_key: String,
    /// ISO 8583 fields as JSON.
    pub payload: serde_json::Value,
    /// Journal id of the transaction the advice reports.
    pub reference: Option<String>,
    /// When the advice was created; FIFO order within a priority.
    pub created_at: DateTime<Utc>,
}

/// The payload holds card data (field 2): `Debug` shows only which fields it carries.
impl std::fmt::Debug for NewAdvice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: Vec<&String> = self
            .payload
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        f.debug_struct("NewAdvice")
            .field("destination", &self.destination)
            .field("priority", &self.priority)
            .field("mti", &self.mti)
            .field("idempotency_key", &self.idempotency_key)
            .field("payload_fields", &fields)
            .finish_non_exhaustive()
    }
}

/// What [`super::Database::saf_enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored as a new advice.
    Enqueued(AdviceId),
    /// The idempotency key was seen before (in any status); nothing stored.
    AlreadyQueued(AdviceId),
}

impl EnqueueOutcome {
    /// The advice's id either way.
    pub fn id(self) -> AdviceId {
        match self {
            EnqueueOutcome::Enqueued(id) | EnqueueOutcome::AlreadyQueued(id) => id,
        }
    }
}

/// A stored advice, as the admin API lists it and as a drainer receives it from a lease.
#[derive(Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Advice {
    /// Queue id.
    pub id: AdviceId,
    /// Upstream name.
    pub destination: String,
    /// 0 is delivered first.
    pub priority: u8,
    /// Original MTI (0220 or 0420).
    pub mti: AdviceMti,
    /// Unique identity.
    pub idempotency_key: String,
    /// ISO 8583 fields as JSON.
    pub payload: serde_json::Value,
    /// Journal id of the transaction reported.
    pub reference: Option<String>,
    /// Where it is in its life.
    pub status: AdviceStatus,
    /// Delivery attempts started so far, across requeues. A lease starts an attempt, so a
    /// leased advice counts the attempt it is leased for, and an advice whose drainer died
    /// mid-send counts that attempt too (it may have reached the issuer).
    pub attempts: u32,
    /// Earliest time of the next attempt.
    pub next_attempt_at: DateTime<Utc>,
    /// Drainer holding the lease, if one was taken and not settled.
    pub lease_holder: Option<String>,
    /// When that lease ends.
    pub lease_until: Option<DateTime<Utc>>,
    /// Why the last attempt failed (the dead letter's reason).
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was delivered, dead-lettered or cancelled.
    pub settled_at: Option<DateTime<Utc>>,
}

/// The payload holds card data (field 2): `Debug` shows only which fields it carries.
impl std::fmt::Debug for Advice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: Vec<&String> = self
            .payload
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        f.debug_struct("Advice")
            .field("destination", &self.destination)
            .field("priority", &self.priority)
            .field("mti", &self.mti)
            .field("idempotency_key", &self.idempotency_key)
            .field("payload_fields", &fields)
            .finish_non_exhaustive()
    }
}

impl Advice {
    /// The MTI to send a leased advice with: 0220/0420 on the first attempt, 0221/0421 on
    /// every later one (the issuer may have seen an earlier one).
    pub fn send_mti(&self) -> &'static str {
        if self.attempts <= 1 {
            self.mti.mti()
        } else {
            self.mti.repeat_mti()
        }
    }
}

/// Which advices [`super::Database::saf_list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafFilter {
    /// Only this status.
    pub status: Option<AdviceStatus>,
    /// Only this upstream.
    pub destination: Option<String>,
}

/// Why an attempt failed, as the sender judged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdviceFailure {
    /// Human-readable reason (response code, timeout, …); kept as the dead letter's reason.
    pub reason: String,
    /// The upstream refused the advice for good: dead-letter it now, do not retry.
    pub permanent: bool,
}

/// Attempts and backoff of SAF delivery (`[saf]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed attempts (since the last requeue) before the advice becomes a dead letter.
    pub max_attempts: u32,
    /// Delay after the first failure; doubles with each further failure.
    pub backoff_initial: Duration,
    /// Longest delay.
    pub backoff_max: Duration,
}

impl From<&SafSettings> for RetryPolicy {
    fn from(s: &SafSettings) -> Self {
        Self {
            max_attempts: s.max_attempts,
            backoff_initial: s.backoff_initial,
            backoff_max: s.backoff_max,
        }
    }
}

/// What [`super::Database::saf_fail`] did with the advice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailOutcome {
    /// It will be offered again at `next_attempt_at`.
    Retrying {
        /// Attempts made so far.
        attempts: u32,
        /// Earliest next attempt.
        next_attempt_at: DateTime<Utc>,
    },
    /// It is a dead letter now.
    DeadLettered {
        /// Attempts made so far.
        attempts: u32,
    },
}

/// Advices waiting for one (destination, priority), for `switchyard_saf_backlog`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SafBacklog {
    /// Upstream name.
    pub destination: String,
    /// Priority.
    pub priority: u8,
    /// Queued advices (including leased ones).
    pub count: u64,
}

/// Queue figures for the SAF gauges and the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SafStats {
    /// Queued advices per (destination, priority), ordered by both.
    pub backlog: Vec<SafBacklog>,
    /// Queued advices under a lease that has not ended.
    pub in_flight: u64,
    /// Age in whole seconds of the oldest queued advice; 0 when none.
    pub oldest_age_seconds: u64,
    /// Advices in the dead letter list.
    pub dead_letters: u64,
    /// Advices delivered since the queue was created.
    pub delivered_total: u64,
}

// ---------------------------------------------------------------------------------------------
// pure rules

/// ISO 8583 fields an advice may never hold: track 2 (35), track 3 (36), track 1 (45) and the
/// PIN block (52 in ISO 8583:1987, 123 in the Switchyard profile).
const FORBIDDEN_FIELDS: [&str; 5] = ["35", "36", "45", "52", "123"];

/// Longest reason kept with a failure; upstream text is not ours to store unbounded.
const REASON_MAX: usize = 500;

/// Delay before the next attempt after `failures` failed attempts (≥ 1): `initial`, doubled per
/// further failure, capped at `max`. No jitter: drainers lease in batches from a shared queue,
/// so advices do not retry in lockstep the way reconnecting clients do, and a deterministic
/// schedule is what an operator reading `nextAttemptAt` expects.
pub fn saf_backoff(policy: &RetryPolicy, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    policy
        .backoff_initial
        .checked_mul(1u32 << doublings)
        .unwrap_or(policy.backoff_max)
        .min(policy.backoff_max)
}

/// Whether a failure ends the advice's delivery: refused for good, or the attempt budget since
/// the last requeue is spent.
pub(crate) fn is_dead_letter(
    policy: &RetryPolicy,
    failures_since_requeue: u32,
    permanent: bool,
) -> bool {
    permanent || failures_since_requeue >= policy.max_attempts.max(1)
}

/// `now + delay`, refusing absurd delays instead of overflowing.
pub(crate) fn after(now: DateTime<Utc>, delay: Duration) -> Result<DateTime<Utc>, StoreError> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| StoreError::invalid(format!("delay {delay:?}: too long")))
}

pub(crate) fn validate_new_advice(a: &NewAdvice) -> Result<(), StoreError> {
    let printable =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.contains(char::is_control);
    if !printable(&a.destination, 64) {
        return Err(StoreError::invalid(
            "destination: must be 1 to 64 printable characters",
        ));
    }
    if !printable(&a.idempotency_key, 128) {
        return Err(StoreError::invalid(
            "idempotencyKey: must be 1 to 128 printable characters",
        ));
    }
    let Some(fields) = a.payload.as_object() else {
        return Err(StoreError::invalid(
            "payload: must be a JSON object of ISO 8583 fields",
        ));
    };
    // an advice waits in the database for days and is listed by the admin API: it must not
    // carry what PCI DSS forbids storing after authorization
    if let Some(f) = FORBIDDEN_FIELDS.iter().find(|f| fields.contains_key(**f)) {
        return Err(StoreError::invalid(format!(
            "payload: field {f} (track data or PIN block) must not be stored in an advice"
        )));
    }
    Ok(())
}

pub(crate) fn validate_holder(holder: &str) -> Result<(), StoreError> {
    if holder.is_empty() || holder.len() > 128 || holder.contains(char::is_control) {
        return Err(StoreError::invalid(
            "lease holder: must be 1 to 128 printable characters",
        ));
    }
    Ok(())
}

/// The failure reason as stored: control characters replaced, at most [`REASON_MAX`] bytes.
pub(crate) fn clean_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(REASON_MAX));
    for c in reason.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > REASON_MAX {
            break;
        }
        out.push(c);
    }
    out
}

/// An operator may cancel a queued advice nobody is sending right now, or a dead letter.
pub(crate) fn check_cancel(a: &Advice, now: DateTime<Utc>) -> Result<(), StoreError> {
    let id = a.id;
    match a.status {
        AdviceStatus::Queued => match (&a.lease_holder, a.lease_until) {
            (Some(holder), Some(until)) if until > now => Err(StoreError::AdviceState {
                what: format!(
                    "cancel advice {id}: drainer {holder} is sending it until {until}; \
                     try again after the lease ends"
                ),
            }),
            _ => Ok(()),
        },
        AdviceStatus::DeadLetter => Ok(()),
        AdviceStatus::Delivered | AdviceStatus::Cancelled => Err(StoreError::AdviceState {
            what: format!("cancel advice {id}: it is already {}", a.status.as_str()),
        }),
    }
}

pub(crate) fn parse_advice_after(page_after: Option<&str>) -> Result<i64, StoreError> {
    match page_after {
        None => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .map_err(|_| StoreError::invalid(format!("after {s:?}: must be an advice id"))),
    }
}

pub(crate) fn advice_priority(v: i64) -> Result<u8, StoreError> {
    u8::try_from(v).map_err(|_| StoreError::corrupt("saf_messages.priority"))
}

pub(crate) fn advice_count(v: i64, column: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::corrupt(column.to_string()))
}

pub(crate) fn advice_mti(s: &str) -> Result<AdviceMti, StoreError> {
    AdviceMti::parse(s).ok_or_else(|| StoreError::corrupt(format!("saf_messages.mti {s:?}")))
}

pub(crate) fn advice_status(s: &str) -> Result<AdviceStatus, StoreError> {
    AdviceStatus::parse(s).ok_or_else(|| StoreError::corrupt(format!("saf_messages.status {s:?}")))
}

/// A stored payload. Text that is not JSON (changed behind our back) reads as `null` rather
/// than failing the whole read: the admin API can still list the advice, and the drainer
/// dead-letters it ("payload is not a JSON object") instead of the queue stalling on it.
pub(crate) fn advice_payload(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}

/// Leased rows sorted by [`sort_leased`]: the readable advices, and the id and reason of each
/// row that could not be read.
pub(crate) type SortedLease = (Vec<Advice>, Vec<(i64, String)>);

/// Sorts leased rows into readable advices and unreadable ones (id and why), so one corrupt
/// row is dead-lettered instead of failing every lease of its destination forever.
pub(crate) fn sort_leased<R>(
    rows: &[R],
    id_of: impl Fn(&R) -> Result<i64, StoreError>,
    decode: impl Fn(&R) -> Result<Advice, StoreError>,
) -> Result<SortedLease, StoreError> {
    let mut good = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for row in rows {
        match decode(row) {
            Ok(a) => good.push(a),
            Err(err) => bad.push((id_of(row)?, clean_reason(&format!("stored advice: {err}")))),
        }
    }
    Ok((good, bad))
}

/// Dead-letters an unreadable leased row (see [`sort_leased`]): same columns both backends.
pub(crate) const DEAD_LETTER_UNREADABLE: &str = "UPDATE saf_messages SET status = 'dead', \
     last_error = $2, settled_at = $3, lease_holder = NULL, lease_until = NULL WHERE id = $1";

/// Whole seconds from `oldest` to `now`, 0 if `oldest` is in the future or absent.
pub(crate) fn age_seconds(oldest: Option<DateTime<Utc>>, now: DateTime<Utc>) -> u64 {
    oldest
        .map(|t| (now - t).num_seconds().max(0) as u64)
        .unwrap_or(0)
}

/// Why a drainer may not settle an advice it thinks it holds.
pub(crate) fn lease_lost(id: AdviceId, status: AdviceStatus, holder: Option<&str>) -> StoreError {
    let why = match (status, holder) {
        (AdviceStatus::Queued, Some(h)) => format!("it is leased by {h}"),
        (AdviceStatus::Queued, None) => "it is not leased".to_string(),
        (s, _) => format!("it is {}", s.as_str()),
    };
    StoreError::LeaseLost {
        what: format!("advice {id}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_from_initial_and_caps() {
        let got: Vec<u64> = (1..=9)
            .map(|n| saf_backoff(&policy(), n).as_secs())
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(saf_backoff(&policy(), u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn dead_letter_on_permanent_or_spent_budget() {
        assert!(!is_dead_letter(&policy(), 9, false));
        assert!(is_dead_letter(&policy(), 10, false));
        assert!(is_dead_letter(&policy(), 1, true));
        let zero = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        // a zero budget still allows the attempt that just failed, never an endless loop
        assert!(is_dead_letter(&zero, 1, false));
    }

    #[test]
    fn repeats_use_the_repeat_mti() {
        assert_eq!(AdviceMti::Advice0220.repeat_mti(), "0221");
        assert_eq!(AdviceMti::Reversal0420.repeat_mti(), "0421");
        assert_eq!(AdviceMti::parse("0200"), None);
    }

    #[test]
    fn reasons_are_bounded_and_single_line() {
        assert_eq!(clean_reason("timeout\nafter 5s"), "timeout after 5s");
        let long = "é".repeat(400);
        let cleaned = clean_reason(&long);
        assert!(cleaned.len() <= REASON_MAX);
        assert!(cleaned.chars().all(|c| c == 'é'));
    }

    #[test]
    fn advice_validation_names_the_field() {
        let ok = NewAdvice {
            destination: "issuer-b".into(),
            priority: 0,
            mti: AdviceMti::Advice0220,
            idempotency_key: "ACQ001:000123:1122153045".into(),
            payload: serde_json::json!({"11": "000123"}),
            reference: None,
            created_at: Utc::now(),
        };
        assert!(validate_new_advice(&ok).is_ok());
        let err = validate_new_advice(&NewAdvice {
            payload: serde_json::json!("raw"),
            ..ok.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("payload"));
        let err = validate_new_advice(&NewAdvice {
            payload: serde_json::json!({"11": "000123", "52": "0123456789ABCDEF"}),
            ..ok.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("field 52"), "{err}");
        // this profile carries the PIN block in field 123
        let err = validate_new_advice(&NewAdvice {
            payload: serde_json::json!({"11": "000123", "123": "0123456789ABCDEF0123456789ABCDEF"}),
            ..ok.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("field 123"), "{err}");
        let err = validate_new_advice(&NewAdvice {
            destination: String::new(),
            ..ok
        })
        .unwrap_err();
        assert!(err.to_string().contains("destination"));
    }
}
