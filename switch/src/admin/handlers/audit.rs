//! The audit log: who did what to which object, and the result.

use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::admin::AdminState;
use crate::admin::error::ApiError;

/// Audit query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// RFC 3339 time; records at or after it (default: the last 24 hours).
    pub since: Option<DateTime<Utc>>,
    /// At most this many records (1–1000, default 200).
    pub limit: Option<u32>,
}

/// One audit record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    /// Record id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: `admin#N` / `viewer#N` (token line), `terminal:ID`, or `switch`.
    pub actor: String,
    /// What.
    pub action: String,
    /// On which object.
    pub target: String,
    /// Outcome.
    pub result: String,
    /// Extra facts (never key material, PINs or PANs).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Audit records, oldest first.
#[utoipa::path(get, path = "/v1/audit", params(AuditParams),
    responses((status = 200, body = [AuditView])))]
pub async fn list(
    State(state): State<AdminState>,
    Query(params): Query<AuditParams>,
) -> Result<axum::Json<Vec<AuditView>>, ApiError> {
    let limit = params.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let since = params
        .since
        .unwrap_or_else(|| Utc::now() - chrono::Duration::hours(24));
    let records = state.ctx.store.list_audit(since, limit).await?;
    Ok(axum::Json(
        records
            .into_iter()
            .map(|r| AuditView {
                id: r.id,
                at: r.at,
                actor: r.actor,
                action: r.action,
                target: r.target,
                result: r.result,
                detail: r.detail,
            })
            .collect(),
    ))
}
