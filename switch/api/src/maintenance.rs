//! Maintenance of one switch pod (`/v1/maintenance`): hibernation stops taking work, lets what
//! is in flight finish, closes the terminals' sessions, and waits for the store-and-forward
//! backlog to be delivered, so the pod can be scaled to zero without stranding money movements.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest drain a hibernation may be given (one day).
pub const MAX_DRAIN_TIMEOUT_SECONDS: u64 = 86_400;

/// Asks the switch to hibernate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HibernateRequest {
    /// How long to wait for in-flight work and the SAF backlog before reporting `timedOut`
    /// (1 to 86400 seconds). A repeated request while hibernating keeps the first deadline.
    pub drain_timeout_seconds: u64,
}

/// Where a switch pod is in its maintenance cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum MaintenanceState {
    /// Accepting ISO 8583 connections and ready.
    Serving,
    /// Hibernating: not accepting, not ready; in-flight work, sessions or the SAF backlog are
    /// not done yet.
    Draining,
    /// Hibernating with nothing left: no connection, no held reversal, SAF backlog zero. Safe to
    /// scale to zero.
    Drained,
    /// Hibernating, and the drain timeout passed with work left (see the counts and `message`).
    /// The drainers keep going; the state becomes `drained` if the work finishes after all.
    TimedOut,
}

impl MaintenanceState {
    /// The JSON name (`serving`, `draining`, `drained`, `timedOut`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::TimedOut => "timedOut",
        }
    }
}

/// The maintenance state of one switch pod, with what it is still waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceStatus {
    /// `serving`, `draining`, `drained` or `timedOut`.
    pub state: MaintenanceState,
    /// Whether the ISO 8583 listener takes new connections (false while hibernating).
    pub accepting_connections: bool,
    /// When hibernation was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
    /// When the drain times out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<DateTime<Utc>>,
    /// ISO 8583 connections of this pod still open, each finishing at most the transaction it
    /// is processing before it closes.
    pub in_flight: u64,
    /// Terminals and stations with a live session on this pod.
    pub signed_on: u64,
    /// Reversal advices this pod holds in memory until the store takes them.
    pub held_reversals: u64,
    /// SAF advices waiting for delivery (the whole queue: every replica and drainer shares it).
    pub saf_backlog: u64,
    /// SAF advices given up (dead letters): not waited for, repaired through `/v1/saf`.
    pub saf_dead_letters: u64,
    /// What the state means now, e.g. what is still being waited for.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_have_their_documented_names() {
        for state in [
            MaintenanceState::Serving,
            MaintenanceState::Draining,
            MaintenanceState::Drained,
            MaintenanceState::TimedOut,
        ] {
            assert_eq!(
                serde_json::to_value(state).expect("serializes"),
                state.as_str()
            );
        }
    }

    #[test]
    fn a_hibernate_request_refuses_unknown_fields() {
        let ok: HibernateRequest =
            serde_json::from_str(r#"{"drainTimeoutSeconds":600}"#).expect("parses");
        assert_eq!(ok.drain_timeout_seconds, 600);
        assert!(
            serde_json::from_str::<HibernateRequest>(r#"{"drainTimeoutSeconds":1,"x":2}"#).is_err()
        );
        assert!(serde_json::from_str::<HibernateRequest>("{}").is_err());
    }
}
