//! Liveness, readiness and startup state, and the unauthenticated metrics/probe listener.
//!
//! Liveness never depends on the database (a slow database must not get pods killed); readiness
//! is false while migrations are behind, the store is unreachable, or the process is draining.
//! `/metrics` never touches the database either: the gauges read from the store are recomputed
//! by [`refresh_gauges`] in the background, so any number of scrapes (or an unauthenticated
//! client hammering the port) costs no query.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, StateLabel};
use crate::store::Store;

/// Process health as the probes see it.
#[derive(Debug, Default)]
pub struct Health {
    started: AtomicBool,
    draining: AtomicBool,
    hibernating: AtomicBool,
    store_ready: AtomicBool,
    not_ready_reason: Mutex<Option<String>>,
}

impl Health {
    /// Marks start-up complete (listeners bound, store checked once).
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Readiness goes false at once and stays false: the process is shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Readiness is false while the process hibernates for maintenance (`/v1/maintenance`),
    /// so Services stop routing to it; resuming makes it ready again.
    pub fn set_hibernating(&self, hibernating: bool) {
        self.hibernating.store(hibernating, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Records the latest store check.
    pub fn set_store(&self, ready: bool, reason: Option<String>) {
        self.store_ready.store(ready, Ordering::SeqCst);
        *self
            .not_ready_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// `Ok(())` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining after SIGTERM".into());
        }
        if self.hibernating.load(Ordering::SeqCst) {
            return Err("hibernating for maintenance (see /v1/maintenance)".into());
        }
        if !self.started.load(Ordering::SeqCst) {
            return Err("starting".into());
        }
        if !self.store_ready.load(Ordering::SeqCst) {
            let reason = self
                .not_ready_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(reason.unwrap_or_else(|| "store not checked yet".into()));
        }
        Ok(())
    }
}

/// Checks the store every `interval` until `stop`: reachable and migrations current.
pub async fn watch_store(
    store: Store,
    health: Arc<Health>,
    metrics: Metrics,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let verdict = check_store(&store).await;
        health.set_store(verdict.is_ok(), verdict.err());
        let pool = store.pool_stats();
        metrics
            .db_pool_connections
            .get_or_create(&StateLabel {
                state: "open".into(),
            })
            .set(i64::from(pool.size));
        metrics
            .db_pool_connections
            .get_or_create(&StateLabel {
                state: "idle".into(),
            })
            .set(pool.idle as i64);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One readiness verdict for the store.
pub async fn check_store(store: &Store) -> Result<(), String> {
    if let Err(err) = store.ping().await {
        return Err(format!("store unreachable: {err}"));
    }
    match store.migration_status().await {
        Ok(status) if status.pending == 0 => Ok(()),
        Ok(status) => Err(format!(
            "database schema is behind this binary: {} migration(s) pending; run `switchyard-switch migrate`",
            status.pending
        )),
        Err(err) => Err(format!("failed to read migration status: {err}")),
    }
}

#[derive(Clone)]
struct ProbeState {
    health: Arc<Health>,
    metrics: Metrics,
}

#[derive(Serialize)]
struct ProbeBody<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Recomputes the gauges that are read from the store (key counts and ages, SAF backlog).
pub type ScrapeRefresh = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Runs `refresh` now and then every `interval` until `stop`. A refresh that takes longer than
/// the interval delays the next one rather than piling up.
pub async fn refresh_gauges(refresh: ScrapeRefresh, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = refresh() => {}
        }
    }
}

/// The `:9090` router: `/livez`, `/readyz`, `/startupz`, `/metrics`.
pub fn router(health: Arc<Health>, metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/livez",
            get(|| async { probe(StatusCode::OK, "ok", None) }),
        )
        .route("/readyz", get(readyz))
        .route("/startupz", get(startupz))
        .route("/metrics", get(metrics_text))
        .with_state(ProbeState { health, metrics })
}

fn probe(status: StatusCode, text: &str, reason: Option<String>) -> Response {
    (
        status,
        axum::Json(ProbeBody {
            status: text,
            reason,
        }),
    )
        .into_response()
}

async fn readyz(State(state): State<ProbeState>) -> Response {
    match state.health.readiness() {
        Ok(()) => probe(StatusCode::OK, "ready", None),
        Err(reason) => probe(StatusCode::SERVICE_UNAVAILABLE, "not ready", Some(reason)),
    }
}

async fn startupz(State(state): State<ProbeState>) -> Response {
    if state.health.started.load(Ordering::SeqCst) {
        probe(StatusCode::OK, "started", None)
    } else {
        probe(StatusCode::SERVICE_UNAVAILABLE, "starting", None)
    }
}

async fn metrics_text(State(state): State<ProbeState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_start_store_and_drain() {
        let h = Health::default();
        assert_eq!(h.readiness().unwrap_err(), "starting");
        h.set_started();
        assert!(h.readiness().is_err());
        h.set_store(false, Some("store unreachable: x".into()));
        assert_eq!(h.readiness().unwrap_err(), "store unreachable: x");
        h.set_store(true, None);
        assert!(h.readiness().is_ok());
        h.set_hibernating(true);
        assert!(h.readiness().unwrap_err().contains("hibernating"));
        h.set_hibernating(false);
        assert!(h.readiness().is_ok());
        h.set_draining();
        assert_eq!(h.readiness().unwrap_err(), "draining after SIGTERM");
        h.set_store(true, None);
        assert!(h.readiness().is_err(), "draining is final");
    }
}
