//! The accept loop and the per-connection task.
//!
//! Entry points take an already-bound listener and a shutdown token (tests bind port 0). A
//! semaphore caps connections; the cap is enforced at accept by closing the surplus socket at
//! once, so an overload never queues unbounded work. Shutdown: the listener stops accepting,
//! every connection finishes the transaction it is processing, writes its answer, and closes.
//!
//! Connection hygiene (SPEC §3): at most `max_connections_per_ip` connections per peer address
//! (further ones are closed at accept), a connection must sign on within `signon_timeout`, and
//! one that sends `max_unauthenticated_frames` frames without signing on is closed. Each refusal
//! is counted in `switchyard_connections_rejected_total{reason}`. So a flood of idle or
//! unauthenticated sockets from one address holds neither connection slots nor tasks for long,
//! and signed-on terminals keep transacting.
//!
//! With `[iso8583.tls]` the listener speaks TLS only: the handshake runs in the connection's
//! task under `handshake_timeout` (counted in `switchyard_tls_handshake_failures_total` when it
//! fails), after the per-IP and connection caps, so a slow or failed handshake holds neither the
//! accept loop nor more than one slot. The sign-on deadline starts once the handshake is done.
//!
//! A terminal's requests are processed one after the other, in order. An acquirer station
//! multiplexes the requests and advices of many ATMs on one link and matches answers by STAN,
//! so its financial messages are processed concurrently (up to [`STATION_PIPELINE`] at once,
//! which also bounds what one link can make us queue), and answered as each one finishes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::connection::{Connection, ReadError};
use super::{ConnState, FrameHandler};
use crate::iso8583::FrameError;
use crate::metrics::Metrics;
use crate::settings::IsoSettings;
use crate::tls::{NetStream, ReloadingAcceptor};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Financial messages of one station connection processed at once.
pub const STATION_PIPELINE: usize = 128;

/// What a connection task needs besides its socket: the application's handler, the channel's
/// limits, and where to count.
struct Channel {
    handler: Arc<dyn FrameHandler>,
    settings: IsoSettings,
    metrics: Metrics,
}

/// Accepts connections until `shutdown` is cancelled, then returns; connection tasks are spawned
/// on `tracker` so the caller can wait for them to finish. Every frame goes to `handler`; the
/// limits are `[iso8583]`'s.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn FrameHandler>,
    settings: IsoSettings,
    metrics: Metrics,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    tls: Option<Arc<ReloadingAcceptor>>,
) {
    let ctx = Arc::new(Channel {
        handler,
        settings,
        metrics,
    });
    let limit = Arc::new(Semaphore::new(ctx.settings.max_connections));
    let per_ip = Arc::new(PerIpConnections::new(ctx.settings.max_connections_per_ip));
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
        let Some(ip_slot) = per_ip.clone().admit(remote.ip()) else {
            ctx.metrics.connection_rejected("per_ip_limit");
            debug!(%remote, max = ctx.settings.max_connections_per_ip, "connection refused: max_connections_per_ip reached");
            drop(stream);
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.metrics.connection_rejected("max_connections");
            warn!(%remote, max = ctx.settings.max_connections, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let stream = match tls {
                None => NetStream::Plain(stream),
                Some(tls) => {
                    let handshake = tls.accept(stream);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        done = handshake => match done {
                            Ok(stream) => stream,
                            // counted by the acceptor; nothing was said, nothing to audit
                            Err(_) => return,
                        },
                    }
                }
            };
            handle_connection(ctx, stream, remote, shutdown).await;
            drop(permit);
            drop(ip_slot);
        });
    }
    info!("ISO 8583 listener stopped accepting");
}

/// Open connections per peer address, capped.
#[derive(Debug)]
struct PerIpConnections {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place in its address's count; given back on drop.
#[derive(Debug)]
struct IpSlot {
    ip: IpAddr,
    owner: Arc<PerIpConnections>,
}

impl PerIpConnections {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more connection from `ip`, or `None` when it already has `max`.
    fn admit(self: Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        {
            let mut open = self.lock();
            let count = open.entry(ip).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
        }
        Some(IpSlot { ip, owner: self })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn handle_connection(
    ctx: Arc<Channel>,
    stream: NetStream,
    remote: std::net::SocketAddr,
    shutdown: CancellationToken,
) {
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let connected = ctx.metrics.connections_in("connected");
    let signed_on = ctx.metrics.connections_in("signed_on");
    connected.inc();
    debug!(conn_id, %remote, "connection opened");

    let mut conn = Connection::new(stream, ctx.settings.max_frame_bytes);
    let (outbound_tx, mut outbound_rx) = mpsc::channel(64);
    let pipeline = Arc::new(Semaphore::new(STATION_PIPELINE));
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
    let idle = ctx.settings.idle_timeout;
    let mut idle_deadline = Instant::now() + idle;
    let mut was_signed_on = false;
    // Until it signs on, a connection has `signon_timeout` and a few frames to do so.
    let signon_timeout = ctx.settings.signon_timeout;
    let mut signon_deadline = Instant::now() + signon_timeout;
    let max_unauthenticated = ctx.settings.max_unauthenticated_frames;
    let mut unauthenticated_frames = 0u32;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = state.close.cancelled() => break,
            _ = tokio::time::sleep_until(idle_deadline) => {
                debug!(conn_id, %remote, "closing idle connection");
                break;
            }
            _ = tokio::time::sleep_until(signon_deadline), if state.terminal.is_none() => {
                ctx.metrics.connection_rejected("signon_timeout");
                debug!(conn_id, %remote, ?signon_timeout, "closing connection: no sign-on in time");
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
                    if ctx.handler.runs_concurrently(&state, &frame) {
                        // waits (and stops reading) while the pipeline is full
                        let Ok(permit) = pipeline.clone().acquire_owned().await else { break };
                        let mut view = state.view();
                        let (handler, out) = (ctx.handler.clone(), state.outbound.clone());
                        tokio::spawn(async move {
                            if let Some(reply) = handler.handle_frame(&mut view, &frame).await {
                                let _ = out.send(reply).await;
                            }
                            drop(permit);
                        });
                        continue;
                    }
                    // The transaction runs to completion even if shutdown starts meanwhile:
                    // it is not part of the select, so it cannot be dropped half-way.
                    let reply = ctx.handler.handle_frame(&mut state, &frame).await;
                    if let Some(reply) = reply
                        && let Err(err) = conn.write_frame(&reply).await {
                            debug!(conn_id, error = %err, "failed to write reply");
                            break;
                        }
                    let now_signed_on = state.terminal.is_some();
                    if now_signed_on != was_signed_on {
                        if now_signed_on { connected.dec(); signed_on.inc(); } else { signed_on.dec(); connected.inc(); }
                        was_signed_on = now_signed_on;
                        // signed off: the clock for signing on again starts now
                        signon_deadline = Instant::now() + signon_timeout;
                        unauthenticated_frames = 0;
                    }
                    if !now_signed_on {
                        unauthenticated_frames += 1;
                        if unauthenticated_frames >= max_unauthenticated {
                            ctx.metrics.connection_rejected("unauthenticated_frames");
                            info!(conn_id, %remote, frames = unauthenticated_frames, "closing connection: too many frames without a sign-on");
                            break;
                        }
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

    // A station's transactions still running finish and are answered before the close.
    let all = u32::try_from(STATION_PIPELINE).unwrap_or(u32::MAX);
    let finished = pipeline.acquire_many(all);
    tokio::pin!(finished);
    loop {
        tokio::select! {
            _ = &mut finished => break,
            Some(frame) = outbound_rx.recv() => {
                if conn.write_frame(&frame).await.is_err() {
                    break;
                }
            }
        }
    }
    while let Ok(frame) = outbound_rx.try_recv() {
        if conn.write_frame(&frame).await.is_err() {
            break;
        }
    }
    conn.shutdown().await;
    ctx.handler.connection_closed(&mut state).await;
    if was_signed_on {
        signed_on.dec();
    } else {
        connected.dec();
    }
    debug!(conn_id, %remote, "connection closed");
}
