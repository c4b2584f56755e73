//! Maintenance of this switch pod: hibernate (stop taking work, finish in-flight, close the
//! sessions, wait for the SAF backlog to be delivered) and resume. The operator drives it for
//! BankSwitch `spec.hibernation`; see [`crate::maintenance`] for what each state means.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use switchyard_api::maintenance::MAX_DRAIN_TIMEOUT_SECONDS;
use tracing::info;

use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, JsonBody};
use crate::maintenance::{self, DrainFacts};
use crate::store::NewAudit;
use crate::txn::SwitchContext;
pub use switchyard_api::{HibernateRequest, MaintenanceState, MaintenanceStatus};

/// The state of this pod now, with what a drain still waits for.
async fn current(ctx: &SwitchContext) -> Result<MaintenanceStatus, ApiError> {
    let now = Utc::now();
    let saf = ctx.store.saf_stats(now).await?;
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let facts = DrainFacts {
        accepting: ctx.maintenance.accepting(),
        in_flight: count(ctx.maintenance.connections().len()),
        signed_on: count(ctx.sessions.len()),
        held_reversals: count(ctx.held_reversals.len()),
        saf_backlog: saf.backlog.iter().map(|b| b.count).sum(),
        saf_dead_letters: saf.dead_letters,
    };
    Ok(maintenance::status(
        ctx.maintenance.hibernation(),
        &facts,
        now,
    ))
}

async fn audit(state: &AdminState, caller: &Caller, action: &str, detail: serde_json::Value) {
    let entry = NewAudit {
        actor: caller.name.clone(),
        action: action.into(),
        target: state.ctx.fleet.replica().to_string(),
        result: "ok".into(),
        detail,
    };
    if let Err(err) = state.ctx.store.append_audit(&entry).await {
        tracing::warn!(error = %err, action, "failed to audit a maintenance request");
    }
}

/// The maintenance state of this switch pod: `serving`, `draining`, `drained` or `timedOut`.
#[utoipa::path(get, path = "/v1/maintenance",
    responses((status = 200, body = MaintenanceStatus), (status = 503, description = "The store is unavailable", body = Problem)))]
pub async fn get_status(
    State(state): State<AdminState>,
) -> Result<axum::Json<MaintenanceStatus>, ApiError> {
    Ok(axum::Json(current(&state.ctx).await?))
}

/// Hibernates this switch pod: readiness goes false, the ISO 8583 listener stops accepting
/// (new connections are refused), in-flight transactions finish and sessions close; the links,
/// the SAF drainer and this API keep running. Poll `GET /v1/maintenance` until `drained` (or
/// `timedOut`). A repeat while hibernating changes nothing and keeps the first deadline.
#[utoipa::path(post, path = "/v1/maintenance/hibernate", request_body = HibernateRequest,
    responses((status = 202, description = "Hibernating; the state as of now", body = MaintenanceStatus), (status = 400, body = Problem)))]
pub async fn hibernate(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<HibernateRequest>,
) -> Result<Response, ApiError> {
    let seconds = body.value.drain_timeout_seconds;
    if !(1..=MAX_DRAIN_TIMEOUT_SECONDS).contains(&seconds) {
        return Err(ApiError::BadRequest(format!(
            "drainTimeoutSeconds must be 1 to {MAX_DRAIN_TIMEOUT_SECONDS}, got {seconds}"
        )));
    }
    let ctx = &state.ctx;
    if ctx
        .maintenance
        .hibernate(Duration::from_secs(seconds), Utc::now())
    {
        // at once, before the channel has closed: Services stop routing new connections here
        ctx.health.set_hibernating(true);
        info!(caller = %caller.name, drain_timeout_seconds = seconds, "hibernation requested");
        audit(
            &state,
            &caller,
            "maintenance.hibernate",
            serde_json::json!({ "drainTimeoutSeconds": seconds }),
        )
        .await;
    }
    Ok((StatusCode::ACCEPTED, axum::Json(current(ctx).await?)).into_response())
}

/// Ends a hibernation: the ISO 8583 listener opens again and readiness returns. Poll
/// `GET /v1/maintenance` until `serving`. Without a hibernation it changes nothing.
#[utoipa::path(post, path = "/v1/maintenance/resume",
    responses((status = 202, description = "Resuming; the state as of now", body = MaintenanceStatus)))]
pub async fn resume(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let ctx = &state.ctx;
    if ctx.maintenance.resume() {
        info!(caller = %caller.name, "resume from hibernation requested");
        audit(
            &state,
            &caller,
            "maintenance.resume",
            serde_json::Value::Null,
        )
        .await;
    }
    Ok((StatusCode::ACCEPTED, axum::Json(current(ctx).await?)).into_response())
}
