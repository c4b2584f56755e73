//! The accept loop and the per-connection task.
//!
//! Entry points take an already-bound listener and a shutdown token (tests bind port 0). A
//! semaphore caps connections; the cap is enforced at accept by closing the surplus socket at
//! once, so an overload never queues unbounded work. Shutdown: the listener stops accepting,
//! every connection finishes the transaction it is processing, writes its answer, and closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::ConnState;
use super::connection::{Connection, ReadError};
use crate::app::SwitchContext;
use crate::iso8583::FrameError;
use crate::txn;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until `shutdown` is cancelled, then returns; connection tasks are spawned
/// on `tracker` so the caller can wait for them to finish.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SwitchContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(ctx.settings.iso8583.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %err, "failed to accept ISO 8583 connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.metrics.connections_rejected.inc();
            warn!(%remote, max = ctx.settings.iso8583.max_connections, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            handle_connection(ctx, stream, remote, shutdown).await;
            drop(permit);
        });
    }
    info!("ISO 8583 listener stopped accepting");
}

async fn handle_connection(
    ctx: Arc<SwitchContext>,
    stream: TcpStream,
    remote: std::net::SocketAddr,
    shutdown: CancellationToken,
) {
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let connected = ctx.metrics.connections_in("connected");
    let signed_on = ctx.metrics.connections_in("signed_on");
    connected.inc();
    debug!(conn_id, %remote, "connection opened");

    let mut conn = Connection::new(stream, ctx.settings.iso8583.max_frame_bytes);
    let (outbound_tx, mut outbound_rx) = mpsc::channel(16);
    let mut state = ConnState {
        conn_id,
        remote,
        terminal: None,
        terminal_kind: None,
        last_seen: Arc::new(AtomicI64::new(Utc::now().timestamp_millis())),
        outbound: outbound_tx,
        close: CancellationToken::new(),
        close_after_reply: false,
    };
    let idle = ctx.settings.iso8583.idle_timeout;
    let mut idle_deadline = Instant::now() + idle;
    let mut was_signed_on = false;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = state.close.cancelled() => break,
            _ = tokio::time::sleep_until(idle_deadline) => {
                debug!(conn_id, %remote, "closing idle connection");
                break;
            }
            Some(frame) = outbound_rx.recv() => {
                if let Err(err) = conn.write_frame(&frame).await {
                    debug!(conn_id, error = %err, "failed to write server-initiated frame");
                    break;
                }
            }
            read = conn.read_frame() => match read {
                Ok(Some(frame)) => {
                    idle_deadline = Instant::now() + idle;
                    state.last_seen.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
                    // The transaction runs to completion even if shutdown starts meanwhile:
                    // it is not part of the select, so it cannot be dropped half-way.
                    let reply = txn::handle_frame(&ctx, &mut state, &frame).await;
                    if let Some(reply) = reply
                        && let Err(err) = conn.write_frame(&reply).await {
                            debug!(conn_id, error = %err, "failed to write reply");
                            break;
                        }
                    let now_signed_on = state.terminal.is_some();
                    if now_signed_on != was_signed_on {
                        if now_signed_on { connected.dec(); signed_on.inc(); } else { signed_on.dec(); connected.inc(); }
                        was_signed_on = now_signed_on;
                    }
                    if state.close_after_reply {
                        break;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    let reason = match &err {
                        ReadError::Frame(FrameError::TooLarge { .. }) => "too_large",
                        ReadError::Frame(_) => "malformed",
                        ReadError::Truncated(_) => "truncated",
                        ReadError::Io(_) => "io",
                    };
                    if reason != "io" {
                        ctx.metrics.frame_error(reason);
                    }
                    info!(conn_id, %remote, error = %err, "closing connection");
                    break;
                }
            }
        }
    }

    conn.shutdown().await;
    if let Some(terminal) = state.terminal.take()
        && ctx.sessions.remove(&terminal, conn_id)
    {
        ctx.audit_session(&terminal, "session.disconnect", &remote)
            .await;
    }
    if was_signed_on {
        signed_on.dec();
    } else {
        connected.dec();
    }
    debug!(conn_id, %remote, "connection closed");
}
