//! Drainer autoscaling from the SAF backlog; pure, so every rule is table-tested.
//!
//! desired = clamp(ceil(backlog / targetBacklogPerReplica), min, max). Scale up at once; scale
//! down only to the highest recommendation seen during `cooldown` (no flapping); to zero only
//! after backlog and in-flight leases stayed zero for the whole cooldown; an unreachable switch
//! keeps the current replicas.

use std::collections::VecDeque;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// Bounds and pacing from `spec.storeAndForward.drainers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingPolicy {
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Backlog one replica handles.
    pub target_backlog_per_replica: i64,
    /// Scale-down stabilization window.
    pub cooldown: Duration,
}

/// What the operator learned from `GET /v1/saf/stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SafObservation {
    /// The switch answered.
    Stats {
        /// Messages waiting.
        backlog: i64,
        /// Messages leased by drainers right now.
        in_flight: i64,
    },
    /// The switch could not be asked (down, starting, wrong token, ...).
    Unreachable {
        /// What went wrong, for the condition message.
        reason: String,
    },
}

/// Why the scaler picked its number; shown in status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScalingReason {
    /// Recommendation is at or above the current count: applied at once.
    ScaledUpOrSteady,
    /// Scaling down, but held at the highest recommendation within the cooldown.
    HeldByCooldown,
    /// Backlog and in-flight were zero for the whole cooldown.
    ScaledToZero,
    /// Scaled down to the highest recommendation within the cooldown.
    ScaledDown,
    /// The switch did not answer; the current count is kept.
    SwitchUnreachable(String),
    /// `drainers.autoscaler: external`: KEDA or an HPA sets the count; the operator only reads it.
    External,
    /// `spec.hibernation`: the drainers are at zero until the hibernation ends.
    Hibernated,
}

impl std::fmt::Display for ScalingReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ScaledUpOrSteady => f.write_str("replicas follow the backlog"),
            Self::HeldByCooldown => {
                f.write_str("holding at the highest recommendation seen within the cooldown")
            }
            Self::ScaledToZero => {
                f.write_str("backlog and in-flight stayed zero for the whole cooldown")
            }
            Self::ScaledDown => f.write_str("scaled down after the cooldown"),
            Self::SwitchUnreachable(why) => {
                write!(f, "switch unreachable, keeping current replicas: {why}")
            }
            Self::External => f.write_str(
                "drainers.autoscaler is external: replicas are set by KEDA or an HPA, not the operator",
            ),
            Self::Hibernated => {
                f.write_str("hibernated (spec.hibernation): no drainers until it ends")
            }
        }
    }
}

/// The scaler's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalingDecision {
    /// Replicas to set on the drainer Deployment.
    pub replicas: i32,
    /// Why.
    pub reason: ScalingReason,
}

/// What the scaler remembers between polls for one BankSwitch (kept in operator memory).
///
/// After an operator restart the history is empty; the first poll seeds it with the current
/// replicas, so a restart can delay a scale-down by one cooldown but never cause one early.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScalingHistory {
    recommendations: VecDeque<(Timestamp, i32)>,
    idle_since: Option<Timestamp>,
}

/// ceil(backlog / target), clamped to the policy bounds; at least one replica while leases are
/// in flight (scaling to zero would kill a drainer mid-delivery).
pub fn recommend(policy: &ScalingPolicy, backlog: i64, in_flight: i64) -> i32 {
    let target = policy.target_backlog_per_replica.max(1);
    let backlog = backlog.max(0);
    // Both are non-negative here, so this is ceil(backlog / target) without overflow.
    let mut wanted = backlog / target + i64::from(backlog % target != 0);
    if in_flight > 0 {
        wanted = wanted.max(1);
    }
    let wanted = i32::try_from(wanted).unwrap_or(i32::MAX);
    clamp(policy, wanted)
}

fn clamp(policy: &ScalingPolicy, replicas: i32) -> i32 {
    let max = policy.max_replicas.max(policy.min_replicas);
    replicas.clamp(policy.min_replicas, max)
}

fn since(now: Timestamp, d: Duration) -> Timestamp {
    let d = k8s_openapi::jiff::SignedDuration::try_from(d)
        .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
    now.checked_sub(d).unwrap_or(Timestamp::MIN)
}

/// Decides the drainer replicas for one poll and updates `history`.
pub fn decide(
    policy: &ScalingPolicy,
    history: &mut ScalingHistory,
    current: i32,
    observation: &SafObservation,
    now: Timestamp,
) -> ScalingDecision {
    let (backlog, in_flight) = match observation {
        SafObservation::Unreachable { reason } => {
            // Bounds still apply: they are the user's explicit wish, the backlog is unknown.
            return ScalingDecision {
                replicas: clamp(policy, current),
                reason: ScalingReason::SwitchUnreachable(reason.clone()),
            };
        }
        SafObservation::Stats { backlog, in_flight } => (*backlog, *in_flight),
    };

    if history.recommendations.is_empty() {
        history
            .recommendations
            .push_back((now, clamp(policy, current)));
    }
    let window_start = since(now, policy.cooldown);
    // Recommendations are a step function: the newest one at or before the window start is
    // the value in force then, so keep it and drop only the ones it superseded.
    while history
        .recommendations
        .get(1)
        .is_some_and(|(t, _)| *t <= window_start)
    {
        history.recommendations.pop_front();
    }

    let recommendation = recommend(policy, backlog, in_flight);
    history.recommendations.push_back((now, recommendation));
    if backlog <= 0 && in_flight <= 0 {
        history.idle_since.get_or_insert(now);
    } else {
        history.idle_since = None;
    }

    if recommendation >= current {
        return ScalingDecision {
            replicas: recommendation,
            reason: ScalingReason::ScaledUpOrSteady,
        };
    }
    let highest = history
        .recommendations
        .iter()
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(recommendation);
    let mut target = clamp(policy, highest.min(current));
    let idle_long_enough = history.idle_since.is_some_and(|t| t <= window_start);
    if target == 0 && !idle_long_enough {
        // Zero only after a whole quiet cooldown; keep one drainer until then.
        target = clamp(policy, current.min(1));
    }
    let reason = if target == 0 {
        ScalingReason::ScaledToZero
    } else if target == current {
        ScalingReason::HeldByCooldown
    } else {
        ScalingReason::ScaledDown
    };
    ScalingDecision {
        replicas: target,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const POLICY: ScalingPolicy = ScalingPolicy {
        min_replicas: 0,
        max_replicas: 5,
        target_backlog_per_replica: 100,
        cooldown: Duration::from_secs(300),
    };

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid")
    }

    fn stats(backlog: i64, in_flight: i64) -> SafObservation {
        SafObservation::Stats { backlog, in_flight }
    }

    #[rstest]
    #[case(0, 0, 0)]
    #[case(1, 0, 1)]
    #[case(100, 0, 1)]
    #[case(101, 0, 2)]
    #[case(450, 0, 5)]
    #[case(100_000, 0, 5)]
    #[case(0, 3, 1)]
    #[case(-7, 0, 0)]
    fn recommendation_is_ceil_of_backlog_clamped(
        #[case] backlog: i64,
        #[case] in_flight: i64,
        #[case] want: i32,
    ) {
        assert_eq!(recommend(&POLICY, backlog, in_flight), want);
    }

    #[rstest]
    #[case(2, 4, 0, 2)]
    #[case(2, 4, 1000, 4)]
    #[case(3, 3, 0, 3)]
    fn recommendation_respects_min_and_max(
        #[case] min: i32,
        #[case] max: i32,
        #[case] backlog: i64,
        #[case] want: i32,
    ) {
        let policy = ScalingPolicy {
            min_replicas: min,
            max_replicas: max,
            ..POLICY
        };
        assert_eq!(recommend(&policy, backlog, 0), want);
    }

    /// One poll sequence: (seconds, backlog, in_flight) → expected replicas after each poll.
    #[rstest]
    #[case::scale_up_at_once(1, &[(0, 350, 0)], &[4])]
    #[case::hold_during_cooldown_then_step_down(
        4,
        &[(0, 400, 0), (60, 100, 0), (200, 100, 0), (301, 100, 0), (361, 100, 0)],
        &[4, 4, 4, 4, 1]
    )]
    #[case::no_flapping_on_a_dip(
        3,
        &[(0, 300, 0), (30, 0, 0), (60, 300, 0), (90, 0, 0)],
        &[3, 3, 3, 3]
    )]
    #[case::zero_only_after_a_quiet_cooldown(
        1,
        &[(0, 0, 0), (120, 0, 0), (299, 0, 0), (300, 0, 0)],
        &[1, 1, 1, 0]
    )]
    #[case::in_flight_leases_block_scale_to_zero(
        1,
        &[(0, 0, 2), (200, 0, 0), (400, 0, 0), (501, 0, 0)],
        &[1, 1, 1, 0]
    )]
    #[case::new_work_resets_the_quiet_period(
        1,
        &[(0, 0, 0), (200, 5, 0), (400, 0, 0), (600, 0, 0), (700, 0, 0)],
        &[1, 1, 1, 1, 0]
    )]
    fn polls_follow_the_rules(
        #[case] start: i32,
        #[case] polls: &[(i64, i64, i64)],
        #[case] want: &[i32],
    ) {
        let mut history = ScalingHistory::default();
        let mut current = start;
        let mut got = Vec::new();
        for (secs, backlog, in_flight) in polls {
            current = decide(
                &POLICY,
                &mut history,
                current,
                &stats(*backlog, *in_flight),
                t(*secs),
            )
            .replicas;
            got.push(current);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn unreachable_switch_keeps_current_replicas_and_says_so() {
        let mut history = ScalingHistory::default();
        let decision = decide(
            &POLICY,
            &mut history,
            3,
            &SafObservation::Unreachable {
                reason: "connection refused".into(),
            },
            t(0),
        );
        assert_eq!(decision.replicas, 3);
        assert!(decision.reason.to_string().contains("connection refused"));
        assert_eq!(history, ScalingHistory::default(), "no data, no history");
    }

    #[test]
    fn lowered_max_applies_at_once_even_when_unreachable() {
        let policy = ScalingPolicy {
            max_replicas: 2,
            ..POLICY
        };
        let mut history = ScalingHistory::default();
        let unreachable = SafObservation::Unreachable {
            reason: "timeout".into(),
        };
        assert_eq!(
            decide(&policy, &mut history, 5, &unreachable, t(0)).replicas,
            2
        );
        assert_eq!(
            decide(&policy, &mut history, 5, &stats(1000, 0), t(0)).replicas,
            2
        );
    }

    #[test]
    fn first_poll_after_a_restart_does_not_scale_down_early() {
        let mut history = ScalingHistory::default();
        let first = decide(&POLICY, &mut history, 4, &stats(0, 0), t(0));
        assert_eq!(first.replicas, 4);
        assert_eq!(first.reason, ScalingReason::HeldByCooldown);
        let later = decide(&POLICY, &mut history, 4, &stats(0, 0), t(301));
        assert_eq!(later.replicas, 0);
        assert_eq!(later.reason, ScalingReason::ScaledToZero);
    }
}
