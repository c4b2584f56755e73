//! The registry of live sessions: one signed-on connection per ATM, any number per acquirer
//! station.
//!
//! An ATM's new sign-on replaces its old connection (which is told to close). A station is
//! every replica and SAF drainer of an acquiring switch signing on with the same station id, so
//! its sign-ons add sessions side by side. A disconnect removes only the session of its own
//! connection, so a late close of a replaced connection can never remove its successor.
//!
//! This is the process's own half of the sessions: the connections it can write to. The
//! fleet-wide half — which replica holds which terminal, what the admin API and
//! `switchyard_terminals_signed_on` report — is the store's session registry (`txn::fleet`),
//! which closes a session here when its terminal signs on at another replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::TerminalId;
use crate::store::TerminalKind;

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

/// One local session, as the fleet's heartbeat compares it with the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSession {
    /// The terminal or station.
    pub terminal: TerminalId,
    /// Its connection.
    pub conn_id: u64,
    /// Unix milliseconds of the connection's last frame.
    pub last_seen_ms: i64,
}

/// Live sessions of this process.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    /// Per terminal or station, its sessions oldest first; never an empty list.
    sessions: Mutex<HashMap<TerminalId, Vec<SessionHandle>>>,
}

impl SessionRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, Vec<SessionHandle>>> {
        // A panic while holding this lock would be a bug in this file; recover the map rather
        // than take every connection down with a poisoned lock.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `handle` as a session of `terminal`. An ATM's earlier session on another
    /// connection is replaced: it is returned, already told to close. A station keeps its
    /// other sessions. A repeated sign-on on the same connection returns the handle it
    /// supersedes and keeps the connection open.
    pub fn sign_on(
        &self,
        terminal: TerminalId,
        kind: TerminalKind,
        handle: SessionHandle,
    ) -> Option<SessionHandle> {
        let mut sessions = self.lock();
        let live = sessions.entry(terminal).or_default();
        let conn_id = handle.conn_id;
        let replaced = match kind {
            // an ATM has at most one session
            TerminalKind::Atm => std::mem::take(live).pop(),
            TerminalKind::Station => live
                .iter()
                .position(|h| h.conn_id == conn_id)
                .map(|i| live.remove(i)),
        };
        if let Some(old) = replaced.as_ref().filter(|old| old.conn_id != conn_id) {
            old.close.cancel();
        }
        live.push(handle);
        replaced
    }

    /// Removes the session of connection `conn_id`, if it still holds one of the terminal's.
    pub fn remove(&self, terminal: &TerminalId, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        let Some(live) = sessions.get_mut(terminal) else {
            return false;
        };
        let Some(i) = live.iter().position(|h| h.conn_id == conn_id) else {
            return false;
        };
        live.remove(i);
        if live.is_empty() {
            sessions.remove(terminal);
        }
        true
    }

    /// Closes and removes the session of connection `conn_id`, if it holds one of the
    /// terminal's (the registry says it was replaced or signed off elsewhere).
    pub fn close_conn(&self, terminal: &TerminalId, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        let Some(live) = sessions.get_mut(terminal) else {
            return false;
        };
        let Some(i) = live.iter().position(|h| h.conn_id == conn_id) else {
            return false;
        };
        live.remove(i).close.cancel();
        if live.is_empty() {
            sessions.remove(terminal);
        }
        true
    }

    /// Every local session (for the heartbeat's comparison with the registry).
    pub fn snapshot(&self) -> Vec<LocalSession> {
        self.lock()
            .iter()
            .flat_map(|(terminal, live)| {
                live.iter().map(|h| LocalSession {
                    terminal: terminal.clone(),
                    conn_id: h.conn_id,
                    last_seen_ms: h.last_seen.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    /// Closes every session of the terminal or station (admin sign-off). Returns whether there
    /// was one.
    pub fn force_sign_off(&self, terminal: &TerminalId) -> bool {
        // The connection tasks remove their entries when they end; remove them now too so the
        // API shows the terminal signed off as soon as the call returns.
        let Some(live) = self.lock().remove(terminal) else {
            return false;
        };
        for handle in live {
            handle.close.cancel();
        }
        true
    }

    /// Whether connection `conn_id` holds a live session of the terminal.
    pub fn is_current(&self, terminal: &TerminalId, conn_id: u64) -> bool {
        self.lock()
            .get(terminal)
            .is_some_and(|live| live.iter().any(|h| h.conn_id == conn_id))
    }

    /// The handle of the newest live session (to push a server-initiated message).
    pub fn handle(&self, terminal: &TerminalId) -> Option<SessionHandle> {
        self.lock()
            .get(terminal)
            .and_then(|live| live.last())
            .cloned()
    }

    /// What the admin API shows of the newest session.
    pub fn info(&self, terminal: &TerminalId) -> Option<SessionInfo> {
        self.lock()
            .get(terminal)
            .and_then(|live| live.last())
            .map(|h| SessionInfo {
                remote: h.remote,
                signed_on_at: h.signed_on_at,
                last_seen: DateTime::from_timestamp_millis(h.last_seen.load(Ordering::Relaxed)),
            })
    }

    /// Number of terminals and stations with a live session.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live session's close token (graceful shutdown tells them all).
    pub fn close_all(&self) {
        for handle in self.lock().values().flatten() {
            handle.close.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn registry() -> SessionRegistry {
        SessionRegistry::new()
    }

    #[test]
    fn a_new_sign_on_replaces_and_closes_the_old_session() {
        let reg = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let first = handle(1);
        assert!(
            reg.sign_on(tid.clone(), TerminalKind::Atm, first.clone())
                .is_none()
        );
        let replaced = reg
            .sign_on(tid.clone(), TerminalKind::Atm, handle(2))
            .unwrap();
        assert_eq!(replaced.conn_id, 1);
        assert!(first.close.is_cancelled());
        assert!(reg.is_current(&tid, 2));
    }

    #[test]
    fn signing_on_again_on_the_same_connection_keeps_it_open() {
        let reg = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let h = handle(3);
        reg.sign_on(tid.clone(), TerminalKind::Atm, h.clone());
        reg.sign_on(tid.clone(), TerminalKind::Atm, h.clone());
        assert!(!h.close.is_cancelled());
    }

    #[test]
    fn a_late_disconnect_of_the_replaced_connection_keeps_the_new_session() {
        let reg = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        reg.sign_on(tid.clone(), TerminalKind::Atm, handle(1));
        reg.sign_on(tid.clone(), TerminalKind::Atm, handle(2));
        assert!(!reg.remove(&tid, 1));
        assert!(reg.is_current(&tid, 2));
        assert!(reg.remove(&tid, 2));
        assert!(reg.info(&tid).is_none());
        assert!(reg.is_empty());
    }

    #[test]
    fn a_station_keeps_every_session_and_counts_once() {
        let reg = registry();
        let station = TerminalId::new("ACQ001").unwrap();
        let (first, second) = (handle(1), handle(2));
        assert!(
            reg.sign_on(station.clone(), TerminalKind::Station, first.clone())
                .is_none()
        );
        assert!(
            reg.sign_on(station.clone(), TerminalKind::Station, second.clone())
                .is_none()
        );
        assert!(!first.close.is_cancelled() && !second.close.is_cancelled());
        assert!(reg.is_current(&station, 1) && reg.is_current(&station, 2));
        // signing on again on the same connection neither closes it nor adds a session
        let again = reg.sign_on(station.clone(), TerminalKind::Station, handle(2));
        assert_eq!(again.map(|h| h.conn_id), Some(2));
        assert!(!second.close.is_cancelled());
        assert!(reg.remove(&station, 1));
        assert!(reg.is_current(&station, 2));
        assert!(reg.remove(&station, 2));
        assert!(reg.is_empty());
    }

    #[test]
    fn force_sign_off_of_a_station_closes_all_its_sessions() {
        let reg = registry();
        let station = TerminalId::new("ACQ001").unwrap();
        let (first, second) = (handle(1), handle(2));
        reg.sign_on(station.clone(), TerminalKind::Station, first.clone());
        reg.sign_on(station.clone(), TerminalKind::Station, second.clone());
        assert!(reg.force_sign_off(&station));
        assert!(first.close.is_cancelled() && second.close.is_cancelled());
        // the connections' own late removals change nothing
        assert!(!reg.remove(&station, 1));
    }

    #[test]
    fn close_conn_closes_only_that_connection() {
        let reg = registry();
        let station = TerminalId::new("ACQ001").unwrap();
        let (first, second) = (handle(1), handle(2));
        reg.sign_on(station.clone(), TerminalKind::Station, first.clone());
        reg.sign_on(station.clone(), TerminalKind::Station, second.clone());
        assert!(reg.close_conn(&station, 1));
        assert!(first.close.is_cancelled() && !second.close.is_cancelled());
        assert!(!reg.close_conn(&station, 1));
        let seen: Vec<u64> = reg.snapshot().iter().map(|s| s.conn_id).collect();
        assert_eq!(seen, vec![2]);
        assert!(reg.close_conn(&station, 2));
        assert!(reg.is_empty());
    }

    #[test]
    fn force_sign_off_closes_and_removes() {
        let reg = registry();
        let tid = TerminalId::new("ATM1").unwrap();
        let h = handle(7);
        reg.sign_on(tid.clone(), TerminalKind::Atm, h.clone());
        assert!(reg.force_sign_off(&tid));
        assert!(h.close.is_cancelled());
        assert!(!reg.force_sign_off(&tid));
    }
}
