//! What the fleet-wide session registry holds (issue 16): which replica holds which terminal's
//! session, under a lease the replica renews, and which keys were pushed to which session.
//!
//! The scripts are in `scripts/sessions.rs`; how the switch uses the registry (heartbeat, prompt
//! closing of replaced sessions, cross-replica key pushes) is in `txn::fleet`.

use chrono::{DateTime, Utc};

use super::{KeyId, RotationId, TerminalKind};
use crate::domain::{KeyType, TerminalId};

/// One signed-on connection, as its replica records it at sign-on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// The replica holding the connection.
    pub replica: String,
    /// The connection, unique within its replica's run.
    pub conn_id: i64,
    /// The terminal or station signed on.
    pub terminal: TerminalId,
    /// ATM (one session fleet-wide) or station (one per connection).
    pub kind: TerminalKind,
    /// Peer address of the connection.
    pub remote: String,
    /// When it signed on.
    pub signed_on_at: DateTime<Utc>,
}

/// A session by its place: the replica and connection that hold it, and its terminal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionRef {
    /// The replica holding the connection.
    pub replica: String,
    /// The connection.
    pub conn_id: i64,
    /// The terminal.
    pub terminal: TerminalId,
}

/// A session whose replica's lease has not ended, as every replica reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// The terminal.
    pub terminal: TerminalId,
    /// The replica holding it.
    pub replica: String,
    /// The connection on that replica.
    pub conn_id: i64,
    /// Its peer address.
    pub remote: String,
    /// When it signed on.
    pub signed_on_at: DateTime<Utc>,
    /// Last traffic its replica recorded (at a heartbeat, so up to one interval old).
    pub last_seen: DateTime<Utc>,
}

/// What a lease renewal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySweep {
    /// This replica's sessions as the registry holds them. A local session missing here was
    /// replaced (its terminal signed on elsewhere) or signed off by an operator elsewhere.
    pub own: Vec<SessionRef>,
    /// The replica's row was gone (its lease had ended, so others swept its sessions) and was
    /// made again.
    pub re_registered: bool,
    /// Sessions of replicas whose lease had ended, removed now.
    pub expired_sessions: u64,
}

/// One replica's share of the fleet's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSessions {
    /// Replica id.
    pub replica: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Until when its lease runs.
    pub lease_until: DateTime<Utc>,
    /// Its signed-on sessions.
    pub sessions: u64,
}

/// A PENDING key that a replica should push on one of its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDue {
    /// The key.
    pub key_id: KeyId,
    /// Its terminal.
    pub terminal: TerminalId,
    /// Its type (TPK or TAK).
    pub key_type: KeyType,
    /// The connection holding the terminal's session on this replica.
    pub conn_id: i64,
    /// The fleet rotation it belongs to, if any.
    pub rotation: Option<RotationId>,
}

/// The answer to a claim to push a key on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushClaim {
    /// Recorded: push it now.
    Claimed,
    /// Its rotation has `maxConcurrent` pushes awaiting an answer across the fleet; try later.
    RotationFull,
    /// Already pushed on this session, or no longer PENDING: nothing to send.
    NotDue,
}

/// The fleet's live sessions at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSessions {
    /// Replicas whose lease runs, by id, with their session counts.
    pub replicas: Vec<ReplicaSessions>,
    /// Terminals and stations with at least one live session (`switchyard_terminals_signed_on`).
    pub terminals: u64,
}
