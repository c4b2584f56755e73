//! The shared state of a running switch: what every transaction, admin handler and background
//! task reads (settings, store, HSM, sessions, links, metrics).
//!
//! It lives beside the transaction layer rather than in the wiring module so that nothing
//! imports the wiring: `app` builds a [`SwitchContext`], everyone else only uses one.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::warn;

use crate::crypto::Hsm;
use crate::domain::TerminalId;
use crate::health::Health;
use crate::iso8583::Packager;
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::net::session::SessionRegistry;
use crate::routing::Upstreams;
use crate::routing::held::HeldReversals;
use crate::settings::Settings;
use crate::store::{KeyCache, NewAudit, Store};

/// Everything a connection or an admin handler needs.
#[derive(Debug)]
pub struct SwitchContext {
    /// Effective configuration.
    pub settings: Settings,
    /// Wire profile.
    pub packager: &'static Packager,
    /// Ledger, keys, journal, audit (behind the key cache's invalidation).
    pub store: Store,
    /// Usable keys of financial requests, per terminal (`[keys] cache_ttl`).
    pub keys: Arc<KeyCache>,
    /// All cryptography.
    pub hsm: Arc<dyn Hsm>,
    /// Live sessions of this process (the connections it can write to).
    pub sessions: SessionRegistry,
    /// This replica's part in the fleet-wide session registry.
    pub fleet: super::fleet::Fleet,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Probe state.
    pub health: Arc<Health>,
    /// Links to the issuer hosts of `[[upstreams]]`.
    pub upstreams: Arc<Upstreams>,
    /// Reversal advices the store refused, retried until it takes them.
    pub held_reversals: Arc<HeldReversals>,
    /// Hibernation for maintenance (`/v1/maintenance`), and the ISO 8583 connections' tracker.
    pub maintenance: Maintenance,
}

impl SwitchContext {
    /// Audits a session event of a terminal (sign-on, sign-off, disconnect).
    pub async fn audit_session(&self, terminal: &TerminalId, action: &str, remote: &SocketAddr) {
        let entry = NewAudit {
            actor: format!("terminal:{terminal}"),
            action: action.to_string(),
            target: terminal.to_string(),
            result: "ok".into(),
            detail: serde_json::json!({ "remoteAddress": remote.to_string() }),
        };
        if let Err(err) = self.store.append_audit(&entry).await {
            warn!(error = %err, %terminal, action, "failed to audit session event");
        }
    }
}
