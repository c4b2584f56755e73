//! The ISO 8583 channel: listener, framed connections, sessions, graceful shutdown.

pub mod connection;
pub mod server;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::TerminalId;
use crate::store::TerminalKind;
use session::OutboundFrame;

/// What the transaction layer knows about the connection a frame came in on.
#[derive(Debug)]
pub struct ConnState {
    /// Unique per process; tells sessions of successive connections apart.
    pub conn_id: u64,
    /// Peer address.
    pub remote: SocketAddr,
    /// The terminal signed on over this connection, if any.
    pub terminal: Option<TerminalId>,
    /// What `terminal` is (an ATM or an acquirer station), recorded at sign-on.
    pub terminal_kind: Option<TerminalKind>,
    /// Unix milliseconds of the last frame received (shared with the session registry).
    pub last_seen: Arc<AtomicI64>,
    /// Sender for server-initiated frames on this connection.
    pub outbound: mpsc::Sender<OutboundFrame>,
    /// Cancelled when the connection must close (replaced session, admin sign-off).
    pub close: CancellationToken,
    /// Set by the transaction layer when the connection must close after the current answer.
    pub close_after_reply: bool,
}
