//! Per-upstream circuit breaker (SPEC §6): a pure state machine driven by the caller's clock.
//!
//! CLOSED lets everything through and watches the failure rate over a rolling window; above
//! `failure_rate` with at least `min_volume` outcomes it opens. OPEN fails fast until
//! `reset_timeout` has passed, then HALF_OPEN lets a few probes through: the first success
//! closes the circuit, the first failure opens it again. Time only enters through the `now`
//! arguments, so tests and the link task decide what the clock says.
//!
//! The breaker does not judge outcomes: the caller reports a transient failure (timeout,
//! connection loss, `91`/`96`) with [`CircuitBreaker::record_failure`] and anything else —
//! including a declined transaction, which proves the issuer is up — with
//! [`CircuitBreaker::record_success`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::settings::CircuitBreakerSettings;

/// Probes HALF_OPEN lets through at once when the settings do not say otherwise.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 3;

/// What the breaker does with the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// A few probes are let through to test the upstream.
    HalfOpen,
    /// Requests fail fast without touching the upstream.
    Open,
}

impl BreakerState {
    /// Value of `switchyard_circuit_state{upstream}`: 0 closed, 1 half-open, 2 open.
    pub fn metric_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// Thresholds of one breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Failure ratio over the window (0.0–1.0) that, when exceeded, opens the circuit.
    pub failure_rate: f64,
    /// Outcomes the window must hold before the ratio counts; fewer never open the circuit.
    pub min_volume: u32,
    /// Length of the rolling window.
    pub window: Duration,
    /// How long the circuit stays open before probing.
    pub reset_timeout: Duration,
    /// Probes HALF_OPEN lets through at once (at least 1).
    pub half_open_probes: u32,
}

impl From<&CircuitBreakerSettings> for BreakerConfig {
    fn from(s: &CircuitBreakerSettings) -> Self {
        Self {
            failure_rate: s.failure_rate,
            min_volume: s.min_volume,
            window: s.window,
            reset_timeout: s.reset_timeout,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// When the current set of probe slots was handed out.
        since: Instant,
        /// Probes let through and not yet reported.
        in_flight: u32,
    },
}

/// One upstream's breaker. Not shared: the link task owning the upstream holds it (behind a
/// mutex if requests are sent from several tasks).
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Inner,
    /// Outcomes in the window while CLOSED, oldest first: (when, failed).
    outcomes: VecDeque<(Instant, bool)>,
    failures: usize,
}

impl CircuitBreaker {
    /// A closed breaker with an empty window.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Inner::Closed,
            outcomes: VecDeque::new(),
            failures: 0,
        }
    }

    /// The state as last decided (an OPEN breaker whose timeout has passed reports OPEN until
    /// the next [`CircuitBreaker::try_acquire`] moves it to HALF_OPEN).
    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether [`CircuitBreaker::try_acquire`] could let a request through at `now`, without
    /// taking a probe slot: CLOSED, HALF_OPEN, or OPEN with its reset timeout passed.
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.inner {
            Inner::Open { until } => now >= until,
            _ => true,
        }
    }

    /// Whether a request may go to the upstream at `now`. `false` means fail fast (answer `91`
    /// or stand in). In HALF_OPEN a `true` hands out a probe slot: report its outcome.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed => true,
            Inner::Open { until } => {
                if now >= until {
                    self.inner = Inner::HalfOpen {
                        since: now,
                        in_flight: 1,
                    };
                    true
                } else {
                    false
                }
            }
            Inner::HalfOpen { since, in_flight } => {
                if in_flight < self.config.half_open_probes.max(1) {
                    self.inner = Inner::HalfOpen {
                        since,
                        in_flight: in_flight + 1,
                    };
                    true
                } else if now.saturating_duration_since(since) >= self.config.reset_timeout {
                    // probes that never reported (the caller gave up on them) must not keep
                    // the circuit half-open for ever
                    self.inner = Inner::HalfOpen {
                        since: now,
                        in_flight: 1,
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Reports a request the upstream answered (approved or declined alike).
    pub fn record_success(&mut self, now: Instant) {
        match self.inner {
            Inner::Closed => self.push(now, false),
            Inner::HalfOpen { .. } => self.close(),
            // a late answer to a request sent before the circuit opened proves little; the
            // probes after `reset_timeout` decide
            Inner::Open { .. } => {}
        }
    }

    /// Reports a transient failure (timeout, connection loss, `91`/`96`).
    pub fn record_failure(&mut self, now: Instant) {
        match self.inner {
            Inner::Closed => {
                self.push(now, true);
                if self.rate_exceeded() {
                    self.open(now);
                }
            }
            Inner::HalfOpen { .. } => self.open(now),
            Inner::Open { .. } => {}
        }
    }

    fn push(&mut self, now: Instant, failed: bool) {
        self.outcomes.push_back((now, failed));
        if failed {
            self.failures += 1;
        }
        self.prune(now);
    }

    /// Drops outcomes older than the window.
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, failed)) = self.outcomes.front() {
            if now.saturating_duration_since(at) < self.config.window {
                break;
            }
            self.outcomes.pop_front();
            if failed {
                self.failures -= 1;
            }
        }
    }

    fn rate_exceeded(&self) -> bool {
        let total = self.outcomes.len();
        total > 0
            && total >= self.config.min_volume as usize
            && (self.failures as f64 / total as f64) > self.config.failure_rate
    }

    fn open(&mut self, now: Instant) {
        self.inner = Inner::Open {
            until: now + self.config.reset_timeout,
        };
        self.clear();
    }

    fn close(&mut self) {
        self.inner = Inner::Closed;
        // the failures that opened the circuit are history once the upstream answered
        self.clear();
    }

    fn clear(&mut self) {
        self.outcomes.clear();
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 0.5,
            min_volume: 5,
            window: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(30),
            half_open_probes: 2,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A breaker that saw `outcomes` (true = failure), one per 100 ms from `t0`.
    fn after(t0: Instant, outcomes: &[bool]) -> CircuitBreaker {
        let mut b = CircuitBreaker::new(config());
        for (i, failed) in outcomes.iter().enumerate() {
            let now = t0 + ms(100 * i as u64);
            assert!(
                b.try_acquire(now) || *failed,
                "closed breaker refused request {i}"
            );
            if *failed {
                b.record_failure(now);
            } else {
                b.record_success(now);
            }
        }
        b
    }

    fn opened(t0: Instant) -> CircuitBreaker {
        let b = after(t0, &[true; 5]);
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[rstest]
    #[case::below_min_volume(&[true, true, true, true], BreakerState::Closed)]
    #[case::all_failed_at_min_volume(&[true, true, true, true, true], BreakerState::Open)]
    #[case::three_of_five_failed(&[false, false, true, true, true], BreakerState::Open)]
    #[case::two_of_five_failed(&[false, false, false, true, true], BreakerState::Closed)]
    #[case::exactly_the_rate_does_not_open(&[false, true, false, true, false, true], BreakerState::Closed)]
    #[case::above_the_rate_opens(&[false, true, false, true, true, true], BreakerState::Open)]
    #[case::successes_only(&[false; 20], BreakerState::Closed)]
    fn closed_opens_only_above_rate_with_volume(
        #[case] outcomes: &[bool],
        #[case] expected: BreakerState,
    ) {
        let b = after(Instant::now(), outcomes);
        assert_eq!(b.state(), expected);
    }

    #[test]
    fn failures_leave_the_rolling_window() {
        let t0 = Instant::now();
        let mut b = after(t0, &[true, true, true, true]);
        // 10 s later the first four failures are out of the window: one more is not enough
        let later = t0 + Duration::from_secs(10) + ms(400);
        b.record_failure(later);
        assert_eq!(b.state(), BreakerState::Closed);
        // but five within the window are
        for i in 1..=4 {
            b.record_failure(later + ms(i));
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[rstest]
    #[case::just_opened(0, false, BreakerState::Open)]
    #[case::before_reset_timeout(29_999, false, BreakerState::Open)]
    #[case::at_reset_timeout(30_000, true, BreakerState::HalfOpen)]
    #[case::long_after(300_000, true, BreakerState::HalfOpen)]
    fn open_fails_fast_until_reset_timeout(
        #[case] elapsed_ms: u64,
        #[case] allowed: bool,
        #[case] expected: BreakerState,
    ) {
        let t0 = Instant::now();
        let mut b = opened(t0);
        // the circuit opened on the fifth failure, 400 ms after t0
        let opened_at = t0 + ms(400);
        assert_eq!(b.would_allow(opened_at + ms(elapsed_ms)), allowed);
        assert_eq!(b.state(), BreakerState::Open, "asking takes no probe slot");
        assert_eq!(b.try_acquire(opened_at + ms(elapsed_ms)), allowed);
        assert_eq!(b.state(), expected);
    }

    #[test]
    fn half_open_lets_only_a_few_probes_through() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let probe_at = t0 + ms(400) + Duration::from_secs(30);
        assert!(b.try_acquire(probe_at));
        assert!(b.try_acquire(probe_at));
        assert!(
            !b.try_acquire(probe_at),
            "third concurrent probe let through"
        );
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // probes that never report free their slots after another reset_timeout
        assert!(!b.try_acquire(probe_at + Duration::from_secs(29)));
        assert!(b.try_acquire(probe_at + Duration::from_secs(30)));
    }

    #[rstest]
    #[case::success_closes(false, BreakerState::Closed)]
    #[case::failure_reopens(true, BreakerState::Open)]
    fn half_open_probe_outcome_decides(#[case] failed: bool, #[case] expected: BreakerState) {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let probe_at = t0 + ms(400) + Duration::from_secs(30);
        assert!(b.try_acquire(probe_at));
        if failed {
            b.record_failure(probe_at + ms(5));
        } else {
            b.record_success(probe_at + ms(5));
        }
        assert_eq!(b.state(), expected);
        // reopened: a full reset_timeout from the failed probe before the next probe
        let next = probe_at + ms(5) + Duration::from_secs(30);
        assert_eq!(b.try_acquire(next - ms(1)), !failed);
        assert!(b.try_acquire(next));
    }

    #[test]
    fn closing_forgets_the_failures_that_opened_it() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let probe_at = t0 + ms(400) + Duration::from_secs(30);
        assert!(b.try_acquire(probe_at));
        b.record_success(probe_at);
        // four fresh failures are below min_volume on their own
        for i in 0..4 {
            b.record_failure(probe_at + ms(i));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn late_outcomes_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.record_success(t0 + ms(500));
        assert_eq!(b.state(), BreakerState::Open);
        b.record_failure(t0 + Duration::from_secs(29));
        // the failure did not push the reset further out
        assert!(b.try_acquire(t0 + ms(400) + Duration::from_secs(30)));
    }

    #[rstest]
    #[case(BreakerState::Closed, 0)]
    #[case(BreakerState::HalfOpen, 1)]
    #[case(BreakerState::Open, 2)]
    fn metric_values_follow_the_dashboard_contract(
        #[case] state: BreakerState,
        #[case] value: i64,
    ) {
        assert_eq!(state.metric_value(), value);
    }

    #[test]
    fn settings_map_to_config() {
        let c = BreakerConfig::from(&CircuitBreakerSettings::default());
        assert_eq!(c.min_volume, 5);
        assert_eq!(c.reset_timeout, Duration::from_secs(30));
        assert_eq!(c.half_open_probes, DEFAULT_HALF_OPEN_PROBES);
    }
}
