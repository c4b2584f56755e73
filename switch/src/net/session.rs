//! The registry of live sessions: at most one signed-on connection per terminal or station.
//!
//! A new sign-on replaces the old connection (it is told to close); a disconnect removes the
//! session only if it is still the one registered, so a late close of a replaced connection can
//! never remove its successor. Gauges are updated here, in one place, so they cannot drift.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::TerminalId;
use crate::metrics::Metrics;

/// A frame the switch sends on a terminal's connection on its own initiative (e.g. a key push).
pub type OutboundFrame = Vec<u8>;

/// What the registry holds for one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The connection that owns the session.
    pub conn_id: u64,
    /// Peer address of that connection.
    pub remote: SocketAddr,
    /// When the terminal signed on.
    pub signed_on_at: DateTime<Utc>,
    /// Unix milliseconds of the last frame received on the connection.
    pub last_seen: Arc<AtomicI64>,
    /// Queue of server-initiated frames for the connection.
    pub outbound: mpsc::Sender<OutboundFrame>,
    /// Cancelled to make the connection close (replaced, or signed off by an operator).
    pub close: CancellationToken,
}

/// A read-only view for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Peer address.
    pub remote: SocketAddr,
    /// When the terminal signed on.
    pub signed_on_at: DateTime<Utc>,
    /// Last frame received.
    pub last_seen: Option<DateTime<Utc>>,
}

/// Live sessions of this process.
#[derive(Debug)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<TerminalId, SessionHandle>>,
    metrics: Metrics,
}

impl SessionRegistry {
    /// An empty registry reporting to `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, SessionHandle>> {
        // A panic while holding this lock would be a bug in this file; recover the map rather
        // than take every connection down with a poisoned lock.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `handle` as the terminal's session and returns the one it replaced, which has
    /// already been told to close.
    pub fn sign_on(&self, terminal: TerminalId, handle: SessionHandle) -> Option<SessionHandle> {
        let mut sessions = self.lock();
        let conn_id = handle.conn_id;
        let replaced = sessions.insert(terminal, handle);
        if let Some(old) = &replaced {
            // A repeated sign-on on the same connection keeps it open.
            if old.conn_id != conn_id {
                old.close.cancel();
            }
        } else {
            self.metrics.terminals_signed_on.inc();
        }
        replaced
    }

    /// Removes the terminal's session if connection `conn_id` still owns it.
    pub fn remove(&self, terminal: &TerminalId, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        match sessions.get(terminal) {
            Some(handle) if handle.conn_id == conn_id => {
                sessions.remove(terminal);
                self.metrics.terminals_signed_on.dec();
                true
            }
            _ => false,
        }
    }

    /// Closes the terminal's session (admin sign-off). Returns whether there was one.
    pub fn force_sign_off(&self, terminal: &TerminalId) -> bool {
        let handle = self.lock().get(terminal).cloned();
        match handle {
            Some(handle) => {
                handle.close.cancel();
                // The connection task removes the entry when it ends; remove it now too so the
                // API shows the terminal signed off as soon as the call returns.
                self.remove(terminal, handle.conn_id)
            }
            None => false,
        }
    }

    /// Whether connection `conn_id` holds the terminal's live session.
    pub fn is_current(&self, terminal: &TerminalId, conn_id: u64) -> bool {
        self.lock()
            .get(terminal)
            .is_some_and(|h| h.conn_id == conn_id)
    }

    /// The handle of a live session (to push a server-initiated message).
    pub fn handle(&self, terminal: &TerminalId) -> Option<SessionHandle> {
        self.lock().get(terminal).cloned()
    }

    /// What the admin API shows of a session.
    pub fn info(&self, terminal: &TerminalId) -> Option<SessionInfo> {
        self.lock().get(terminal).map(|h| SessionInfo {
            remote: h.remote,
            signed_on_at: h.signed_on_at,
            last_seen: DateTime::from_timestamp_millis(h.last_seen.load(Ordering::Relaxed)),
        })
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live session's close token (graceful shutdown tells them all).
    pub fn close_all(&self) {
        for handle in self.lock().values() {
            handle.close.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SwitchMetrics;

    fn handle(conn_id: u64) -> SessionHandle {
        let (tx, _rx) = mpsc::channel(1);
        SessionHandle {
            conn_id,
            remote: SocketAddr::from(([127, 0, 0, 1], 4000 + conn_id as u16)),
            signed_on_at: Utc::now(),
            last_seen: Arc::new(AtomicI64::new(Utc::now().timestamp_millis())),
            outbound: tx,
            close: CancellationToken::new(),
        }
    }

    fn registry() -> (SessionRegistry, Metrics) {
        let metrics = Arc::new(SwitchMetrics::new());
        (SessionRegistry::new(metrics.clone()), metrics)
    }

    #[test]
    fn a_new_sign_on_replaces_and_closes_the_old_session() {
        let (reg, metrics) = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let first = handle(1);
        assert!(reg.sign_on(tid.clone(), first.clone()).is_none());
        let replaced = reg.sign_on(tid.clone(), handle(2)).unwrap();
        assert_eq!(replaced.conn_id, 1);
        assert!(first.close.is_cancelled());
        assert!(reg.is_current(&tid, 2));
        assert_eq!(metrics.terminals_signed_on.get(), 1);
    }

    #[test]
    fn signing_on_again_on_the_same_connection_keeps_it_open() {
        let (reg, metrics) = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let h = handle(3);
        reg.sign_on(tid.clone(), h.clone());
        reg.sign_on(tid.clone(), h.clone());
        assert!(!h.close.is_cancelled());
        assert_eq!(metrics.terminals_signed_on.get(), 1);
    }

    #[test]
    fn a_late_disconnect_of_the_replaced_connection_keeps_the_new_session() {
        let (reg, metrics) = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        reg.sign_on(tid.clone(), handle(1));
        reg.sign_on(tid.clone(), handle(2));
        assert!(!reg.remove(&tid, 1));
        assert!(reg.is_current(&tid, 2));
        assert!(reg.remove(&tid, 2));
        assert!(reg.info(&tid).is_none());
        assert_eq!(metrics.terminals_signed_on.get(), 0);
        assert!(reg.is_empty());
    }

    #[test]
    fn force_sign_off_closes_and_removes() {
        let (reg, metrics) = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let h = handle(7);
        reg.sign_on(tid.clone(), h.clone());
        assert!(reg.force_sign_off(&tid));
        assert!(h.close.is_cancelled());
        assert!(!reg.force_sign_off(&tid));
        assert_eq!(metrics.terminals_signed_on.get(), 0);
    }
}
