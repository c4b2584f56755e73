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
//! With TLS (`[admin.tls]`) the server is HTTPS only: each connection's handshake runs in its
//! own task under the TLS `handshake_timeout` before hyper sees a byte, so a client that never
//! finishes it holds one slot for that long and never the accept loop.
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
use crate::tls::{NetStream, ReloadingAcceptor};

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
    tls: Option<Arc<ReloadingAcceptor>>,
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
        let watcher = graceful.watcher();
        let http = http.clone();
        let (tls, stop) = (tls.clone(), stop.clone());
        tokio::spawn(async move {
            let stream = match tls {
                None => NetStream::Plain(stream),
                Some(tls) => tokio::select! {
                    _ = stop.cancelled() => return,
                    // a failure is counted by the acceptor and closes this socket only
                    done = tls.accept(stream) => match done {
                        Ok(stream) => stream,
                        Err(_) => return,
                    },
                },
            };
            let conn = watcher.watch(http.serve_connection(TokioIo::new(stream), service));
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

/// Headers every admin API answer carries: nothing is cached (answers hold account and key
/// state), content types are not sniffed, and with TLS on browsers are told to use HTTPS only
/// (`Strict-Transport-Security`, one year).
pub async fn security_headers(State(hsts): State<bool>, req: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, header};
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if hsts {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// The client address of a request served by [`serve`] (unspecified in router-only tests).
pub fn client_addr(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}
