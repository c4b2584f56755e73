//! The two HTTP servers (admin API on `[admin] listen`, metrics and probes on `[metrics]
//! listen`), served with hyper directly rather than `axum::serve` for three limits a slow or
//! flooding client must not get around:
//!
//! - a **connection cap**: a connection beyond `max_connections` is closed at accept (counted in
//!   `switchyard_http_connections_rejected_total{server}`), so a flood of sockets cannot exhaust
//!   file descriptors or memory;
//! - a **header-read timeout**: a connection that has not sent a request's complete headers
//!   within `header_read_timeout` is closed. hyper arms this timer whenever it waits for a
//!   request head, so it also closes idle keep-alive connections and Slowloris clients that send
//!   a header byte at a time;
//! - a **request timeout**: a request (reading its body included) that takes longer than
//!   `request_timeout` is answered `503` problem+json, so a client trickling its body cannot
//!   hold a slot either.
//!
//! Each request carries the client's address as axum [`ConnectInfo`] (the admin API audits and
//! rate-limits by it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::admin::error::ApiError;
use crate::metrics::Metrics;

/// Limits of one HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// `admin` or `metrics` (the `server` label of the metrics).
    pub server: &'static str,
    /// Longest wait for a request's complete headers (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Longest a request may take, body included.
    pub request_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl HttpLimits {
    /// The admin API's limits.
    pub fn admin(s: &crate::settings::AdminSettings) -> Self {
        Self {
            server: "admin",
            header_read_timeout: s.header_read_timeout,
            request_timeout: s.request_timeout,
            max_connections: s.max_connections,
        }
    }

    /// The metrics and probes listener's limits.
    pub fn metrics(s: &crate::settings::MetricsSettings) -> Self {
        Self {
            server: "metrics",
            header_read_timeout: s.header_read_timeout,
            request_timeout: s.request_timeout,
            max_connections: s.max_connections,
        }
    }
}

/// Serves `router` on `listener` until `stop`, then lets open connections finish their request
/// (at most `request_timeout`) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let router = router.layer(middleware::from_fn_with_state(
        limits.request_timeout,
        request_timeout,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // e.g. EMFILE: back off instead of spinning on the error
                    warn!(server = limits.server, error = %err, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connection_rejected(limits.server);
            debug!(server = limits.server, %remote, "HTTP connection refused: max_connections open");
            drop(stream);
            continue;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%remote, error = %err, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            server = limits.server,
            "HTTP connections still open after the request timeout; closing them"
        );
    }
}

async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(limit).into_response(),
    }
}

/// The client address of a request served by [`serve`] (unspecified in router-only tests).
pub fn client_addr(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}
