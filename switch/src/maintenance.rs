//! Hibernation of one switch process (SAF-aware maintenance, `/v1/maintenance`).
//!
//! Asked to hibernate, the process goes not-ready (Services stop routing to it) and closes its
//! ISO 8583 channel exactly as SIGTERM does — the listener stops accepting (new connections are
//! refused), each connection finishes the transaction it is processing, answers it and closes,
//! and sessions left after the grace period are closed — but it keeps everything else running:
//! the upstream links, the SAF drainer, held reversals, the admin API and the probes. It is
//! *drained* once nothing is left: no open connection, no session, no held reversal, and a SAF
//! backlog of zero. If that does not happen before the drain deadline it reports *timed out*
//! with what is left (and becomes drained if the work finishes later). Resuming reopens the
//! listener.
//!
//! This module holds the request and computes the state ([`status`] is pure); the wiring
//! (`app`) closes and reopens the channel when [`Maintenance::wanted`] changes.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use switchyard_api::{MaintenanceState, MaintenanceStatus};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// What the operator (or an admin) asked of the ISO 8583 channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Accept connections.
    Serve,
    /// Stop accepting, finish in-flight work, close sessions.
    Hibernate,
}

/// A hibernation in progress: when it was asked for and when its drain times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hibernation {
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// When the drain times out.
    pub deadline: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Inner {
    hibernation: Option<Hibernation>,
    accepting: bool,
}

/// The maintenance state of this process, shared by the admin API and the wiring.
#[derive(Debug)]
pub struct Maintenance {
    wanted: watch::Sender<Wanted>,
    inner: Mutex<Inner>,
    /// The ISO 8583 connection tasks: the wiring spawns them here, the API counts them.
    connections: TaskTracker,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self::new()
    }
}

impl Maintenance {
    /// Serving (the listener reports itself open once it is).
    pub fn new() -> Self {
        Self {
            wanted: watch::Sender::new(Wanted::Serve),
            inner: Mutex::default(),
            connections: TaskTracker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // nothing here can panic while holding it; recover rather than fail every request
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to hibernate with `drain_timeout` from `now`. Returns `true` when this started it;
    /// `false` when a hibernation was already under way (its first deadline is kept, so a
    /// retried or repeated request cannot extend the drain forever).
    pub fn hibernate(&self, drain_timeout: Duration, now: DateTime<Utc>) -> bool {
        let mut inner = self.lock();
        if inner.hibernation.is_some() {
            return false;
        }
        let deadline = chrono::Duration::from_std(drain_timeout)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        inner.hibernation = Some(Hibernation {
            requested_at: now,
            deadline,
        });
        drop(inner);
        self.wanted.send_replace(Wanted::Hibernate);
        true
    }

    /// Asks to serve again. Returns `false` when not hibernating (nothing to do). The
    /// hibernation stays recorded until the wiring has reopened the listener ([`Self::resumed`]).
    pub fn resume(&self) -> bool {
        if self.lock().hibernation.is_none() {
            return false;
        }
        self.wanted.send_replace(Wanted::Serve);
        true
    }

    /// The wiring reopened the listener: the hibernation is over.
    pub fn resumed(&self) {
        let mut inner = self.lock();
        inner.hibernation = None;
        inner.accepting = true;
    }

    /// What is wanted now; the wiring waits on its changes.
    pub fn wanted(&self) -> watch::Receiver<Wanted> {
        self.wanted.subscribe()
    }

    /// The wiring says whether the ISO 8583 listener takes connections.
    pub fn set_accepting(&self, accepting: bool) {
        self.lock().accepting = accepting;
    }

    /// Whether the ISO 8583 listener takes connections.
    pub fn accepting(&self) -> bool {
        self.lock().accepting
    }

    /// The hibernation in progress, if any.
    pub fn hibernation(&self) -> Option<Hibernation> {
        self.lock().hibernation
    }

    /// The tracker the ISO 8583 connection tasks run on.
    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }
}

/// What a drain waits for, as counted now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainFacts {
    /// The ISO 8583 listener takes connections.
    pub accepting: bool,
    /// ISO 8583 connections still open.
    pub in_flight: u64,
    /// Live sessions of this process.
    pub signed_on: u64,
    /// Reversal advices held in memory until the store takes them.
    pub held_reversals: u64,
    /// SAF advices waiting for delivery (the whole queue).
    pub saf_backlog: u64,
    /// SAF dead letters (not waited for).
    pub saf_dead_letters: u64,
}

/// The maintenance state for `hibernation` given `facts` at `now` (pure).
pub fn status(
    hibernation: Option<Hibernation>,
    facts: &DrainFacts,
    now: DateTime<Utc>,
) -> MaintenanceStatus {
    let mut left = Vec::new();
    if facts.accepting {
        left.push("the ISO 8583 listener to stop accepting".to_string());
    }
    if facts.in_flight > 0 {
        left.push(format!(
            "{} ISO 8583 connection(s) to finish and close",
            facts.in_flight
        ));
    }
    if facts.signed_on > 0 {
        left.push(format!("{} session(s) to close", facts.signed_on));
    }
    if facts.held_reversals > 0 {
        left.push(format!(
            "{} held reversal advice(s) to reach the store",
            facts.held_reversals
        ));
    }
    if facts.saf_backlog > 0 {
        left.push(format!(
            "{} SAF advice(s) to be delivered",
            facts.saf_backlog
        ));
    }
    let (state, message) = match hibernation {
        None => (
            MaintenanceState::Serving,
            "serving: accepting ISO 8583 connections".to_string(),
        ),
        Some(_) if left.is_empty() => (
            MaintenanceState::Drained,
            "drained: no connection, session, held reversal or SAF backlog left; safe to scale to zero".to_string(),
        ),
        Some(h) if now >= h.deadline => (
            MaintenanceState::TimedOut,
            format!(
                "drain timed out at {}; still waiting for {} (drainers keep delivering)",
                h.deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                left.join(", ")
            ),
        ),
        Some(_) => (
            MaintenanceState::Draining,
            format!("draining: waiting for {}", left.join(", ")),
        ),
    };
    MaintenanceStatus {
        state,
        accepting_connections: facts.accepting,
        requested_at: hibernation.map(|h| h.requested_at),
        drain_deadline: hibernation.map(|h| h.deadline),
        in_flight: facts.in_flight,
        signed_on: facts.signed_on,
        held_reversals: facts.held_reversals,
        saf_backlog: facts.saf_backlog,
        saf_dead_letters: facts.saf_dead_letters,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn hibernating() -> Option<Hibernation> {
        Some(Hibernation {
            requested_at: t("2026-01-01T00:00:00Z"),
            deadline: t("2026-01-01T00:05:00Z"),
        })
    }

    const BEFORE: &str = "2026-01-01T00:01:00Z";
    const AFTER: &str = "2026-01-01T00:05:00Z";

    fn quiet() -> DrainFacts {
        DrainFacts::default()
    }

    #[rstest]
    #[case::serving(None, DrainFacts { accepting: true, in_flight: 3, ..quiet() }, BEFORE, MaintenanceState::Serving)]
    #[case::listener_still_open(hibernating(), DrainFacts { accepting: true, ..quiet() }, BEFORE, MaintenanceState::Draining)]
    #[case::connection_finishing(hibernating(), DrainFacts { in_flight: 1, ..quiet() }, BEFORE, MaintenanceState::Draining)]
    #[case::session_left(hibernating(), DrainFacts { signed_on: 1, ..quiet() }, BEFORE, MaintenanceState::Draining)]
    #[case::held_reversal(hibernating(), DrainFacts { held_reversals: 1, ..quiet() }, BEFORE, MaintenanceState::Draining)]
    #[case::backlog(hibernating(), DrainFacts { saf_backlog: 4, ..quiet() }, BEFORE, MaintenanceState::Draining)]
    #[case::backlog_past_deadline(hibernating(), DrainFacts { saf_backlog: 4, ..quiet() }, AFTER, MaintenanceState::TimedOut)]
    #[case::dead_letters_are_not_waited_for(hibernating(), DrainFacts { saf_dead_letters: 2, ..quiet() }, BEFORE, MaintenanceState::Drained)]
    #[case::drained_late_is_drained(hibernating(), quiet(), AFTER, MaintenanceState::Drained)]
    fn state_follows_what_is_left(
        #[case] hibernation: Option<Hibernation>,
        #[case] facts: DrainFacts,
        #[case] now: &str,
        #[case] want: MaintenanceState,
    ) {
        let s = status(hibernation, &facts, t(now));
        assert_eq!(s.state, want, "{}", s.message);
    }

    #[test]
    fn a_timeout_names_what_is_left() {
        let facts = DrainFacts {
            saf_backlog: 4,
            held_reversals: 1,
            ..quiet()
        };
        let s = status(hibernating(), &facts, t(AFTER));
        assert!(s.message.contains("4 SAF advice(s)"), "{}", s.message);
        assert!(s.message.contains("1 held reversal"), "{}", s.message);
        assert_eq!(s.drain_deadline, Some(t("2026-01-01T00:05:00Z")));
    }

    #[test]
    fn a_repeated_request_keeps_the_first_deadline_and_resume_waits_for_the_listener() {
        let m = Maintenance::new();
        m.set_accepting(true);
        assert!(m.hibernate(Duration::from_secs(60), t("2026-01-01T00:00:00Z")));
        assert!(!m.hibernate(Duration::from_secs(600), t("2026-01-01T00:00:30Z")));
        let h = m.hibernation().expect("hibernating");
        assert_eq!(h.deadline, t("2026-01-01T00:01:00Z"));
        assert_eq!(*m.wanted().borrow(), Wanted::Hibernate);
        assert!(m.resume());
        assert_eq!(*m.wanted().borrow(), Wanted::Serve);
        assert!(
            m.hibernation().is_some(),
            "until the listener is open again"
        );
        m.resumed();
        assert!(m.hibernation().is_none());
        assert!(!m.resume(), "nothing to resume");
    }
}
