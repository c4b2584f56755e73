//! The ISO 8583 channel: listener, framed connections, sessions, graceful shutdown.
//!
//! The channel knows frames and connections, not transactions: it serves any [`FrameHandler`]
//! (the transaction layer is one), so nothing here imports `txn` or the wiring.

pub mod connection;
pub mod server;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use async_trait::async_trait;
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

impl ConnState {
    /// A copy for one transaction processed beside the connection's loop (a station's
    /// pipelined financial messages): same terminal, same connection.
    pub fn view(&self) -> ConnState {
        ConnState {
            conn_id: self.conn_id,
            remote: self.remote,
            terminal: self.terminal.clone(),
            terminal_kind: self.terminal_kind,
            last_seen: self.last_seen.clone(),
            outbound: self.outbound.clone(),
            close: self.close.clone(),
            close_after_reply: false,
        }
    }
}

/// What the channel asks of the application: one frame in, at most one frame out.
#[async_trait]
pub trait FrameHandler: Send + Sync + std::fmt::Debug + 'static {
    /// Handles one frame received on `conn`; returns the bytes to answer with, if any. Sets
    /// `conn.close_after_reply` when the connection must close after this answer.
    async fn handle_frame(&self, conn: &mut ConnState, frame: &[u8]) -> Option<Vec<u8>>;
    /// Whether `frame` may be processed beside the connection's loop, answered whenever it
    /// finishes (an acquirer station's pipelined financial messages), instead of in order.
    fn runs_concurrently(&self, conn: &ConnState, frame: &[u8]) -> bool;
    /// The connection ended (after its last answer was written): release what it held.
    async fn connection_closed(&self, conn: &mut ConnState);
}
