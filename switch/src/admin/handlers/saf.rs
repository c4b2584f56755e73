//! The store-and-forward queue as operators see and repair it: list, stats (what the operator
//! scales drainers from), retry now, cancel, and requeue a dead letter. Every repair is audited by
//! the store. Card numbers in advice payloads are masked: the API never shows a full PAN.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, Idempotency, IdempotencyKey, idempotent};
use crate::domain::mask_pan;
use crate::store::{Advice, AdviceId, AdviceStatus, Page, SafFilter};
pub use switchyard_api::{BacklogView, SafStatsView};

/// One queued, delivered, dead or cancelled advice.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdviceView {
    /// Advice id.
    pub id: i64,
    /// Upstream it goes to.
    pub destination: String,
    /// 0 is the highest priority.
    pub priority: u8,
    /// `0220` or `0420` (repeats go out as `0221`/`0421`).
    pub mti: String,
    /// Unique key; the same advice is never queued twice.
    pub idempotency_key: String,
    /// `queued`, `delivered`, `deadLetter` or `cancelled`.
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When the next attempt may start.
    pub next_attempt_at: DateTime<Utc>,
    /// Drainer holding it now, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// Until when that drainer holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime<Utc>>,
    /// Why the last attempt failed (for a dead letter: why it was given up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The message fields (field number → value), field 2 masked to its first six and last
    /// four digits.
    #[schema(value_type = Object)]
    pub fields: serde_json::Value,
    /// Journal entry it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
    /// When it was delivered, dead-lettered or cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<DateTime<Utc>>,
}

/// The payload as operators see it: field 2 masked (a sealed PAN shows the masked form kept
/// beside it; a PAN queued in clear by an older version is masked here).
fn masked_fields(payload: &serde_json::Value) -> serde_json::Value {
    let mut fields = payload.clone();
    if let Some(pan) = fields.get_mut("2") {
        let masked = match &*pan {
            serde_json::Value::String(clear) => mask_pan(clear),
            other => other
                .get("masked")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| "<redacted>".into()),
        };
        *pan = serde_json::Value::String(masked);
    }
    fields
}

impl From<&Advice> for AdviceView {
    fn from(a: &Advice) -> Self {
        Self {
            id: a.id.0,
            destination: a.destination.clone(),
            priority: a.priority,
            mti: a.mti.mti().to_string(),
            idempotency_key: a.idempotency_key.clone(),
            status: match a.status {
                AdviceStatus::Queued => "queued",
                AdviceStatus::Delivered => "delivered",
                AdviceStatus::DeadLetter => "deadLetter",
                AdviceStatus::Cancelled => "cancelled",
            }
            .to_string(),
            attempts: a.attempts,
            next_attempt_at: a.next_attempt_at,
            lease_holder: a.lease_holder.clone(),
            lease_until: a.lease_until,
            last_error: a.last_error.clone(),
            fields: masked_fields(&a.payload),
            reference: a.reference.clone(),
            created_at: a.created_at,
            settled_at: a.settled_at,
        }
    }
}

/// Filters and paging of the advice list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SafParams {
    /// `queued`, `delivered`, `deadLetter` or `cancelled`.
    pub status: Option<String>,
    /// Upstream name.
    pub destination: Option<String>,
    /// Advices after this id.
    pub after: Option<i64>,
    /// At most this many (1–1000, default 100).
    pub limit: Option<u32>,
}

/// Advices by id.
#[utoipa::path(get, path = "/v1/saf", params(SafParams),
    responses((status = 200, body = [AdviceView]), (status = 400, body = Problem)))]
pub async fn list(
    State(state): State<AdminState>,
    Query(params): Query<SafParams>,
) -> Result<axum::Json<Vec<AdviceView>>, ApiError> {
    let status = match params.status.as_deref() {
        None => None,
        Some("queued") => Some(AdviceStatus::Queued),
        Some("delivered") => Some(AdviceStatus::Delivered),
        Some("deadLetter") => Some(AdviceStatus::DeadLetter),
        Some("cancelled") => Some(AdviceStatus::Cancelled),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status must be queued, delivered, deadLetter or cancelled, got {other:?}"
            )));
        }
    };
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let advices = state
        .ctx
        .store
        .saf_list(
            &SafFilter {
                status,
                destination: params.destination,
            },
            Page {
                after: params.after.map(|a| a.to_string()),
                limit,
            },
        )
        .await?;
    Ok(axum::Json(advices.iter().map(AdviceView::from).collect()))
}

/// Queue figures.
#[utoipa::path(get, path = "/v1/saf/stats",
    responses((status = 200, body = SafStatsView)))]
pub async fn stats(State(state): State<AdminState>) -> Result<axum::Json<SafStatsView>, ApiError> {
    let stats = state.ctx.store.saf_stats(Utc::now()).await?;
    Ok(axum::Json(SafStatsView {
        backlog: stats.backlog.iter().map(|b| b.count).sum(),
        in_flight: stats.in_flight,
        oldest_age_seconds: stats.oldest_age_seconds,
        dead_letters: stats.dead_letters,
        delivered_total: stats.delivered_total,
        by_destination: stats
            .backlog
            .into_iter()
            .map(|b| BacklogView {
                destination: b.destination,
                priority: b.priority,
                count: b.count,
            })
            .collect(),
    }))
}

fn advice_id(raw: &str) -> Result<AdviceId, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .map(AdviceId)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("advice id must be a positive integer, got {raw:?}"))
        })
}

/// The three operator repairs; each is audited by the store.
#[derive(Debug, Clone, Copy)]
enum Repair {
    Retry,
    Cancel,
    Requeue,
}

async fn repair(
    state: &AdminState,
    caller: &Caller,
    id: &str,
    action: Repair,
    idem: Option<&Idempotency>,
) -> Result<Response, ApiError> {
    let id = advice_id(id)?;
    let store = &state.ctx.store;
    if store.saf_get(id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "advice {} does not exist",
            id.0
        )));
    }
    idempotent(state, idem, || async {
        let (actor, now) = (caller.name.as_str(), Utc::now());
        let advice = match action {
            Repair::Retry => store.saf_retry(id, actor, now).await?,
            Repair::Cancel => store.saf_cancel(id, actor, now).await?,
            Repair::Requeue => store.saf_requeue_dead_letter(id, actor, now).await?,
        };
        let body =
            serde_json::to_value(AdviceView::from(&advice)).map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::OK, body))
    })
    .await
}

/// Makes a queued advice due now.
#[utoipa::path(post, path = "/v1/saf/{id}/retry", params(("id" = i64, Path, description = "Advice id")),
    responses((status = 200, body = AdviceView), (status = 404, body = Problem), (status = 409, description = "Already settled", body = Problem)))]
pub async fn retry(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    repair(&state, &caller, &id, Repair::Retry, idem.as_ref()).await
}

/// Withdraws a queued or dead-lettered advice for good (not while a drainer holds it).
#[utoipa::path(post, path = "/v1/saf/{id}/cancel", params(("id" = i64, Path, description = "Advice id")),
    responses((status = 200, body = AdviceView), (status = 404, body = Problem), (status = 409, description = "Leased or delivered", body = Problem)))]
pub async fn cancel(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    repair(&state, &caller, &id, Repair::Cancel, idem.as_ref()).await
}

/// Puts a dead letter back in the queue with a fresh attempt budget.
#[utoipa::path(post, path = "/v1/saf/dead-letters/{id}/requeue", params(("id" = i64, Path, description = "Advice id")),
    responses((status = 200, body = AdviceView), (status = 404, body = Problem), (status = 409, description = "Not a dead letter", body = Problem)))]
pub async fn requeue(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    repair(&state, &caller, &id, Repair::Requeue, idem.as_ref()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pans_are_masked_and_anything_else_hidden() {
        assert_eq!(mask_pan("6011000000000004"), "601100******0004");
        assert_eq!(mask_pan("4111111111111111111"), "411111*********1111");
        assert_eq!(mask_pan("12345"), "<redacted>");
        let fields =
            masked_fields(&serde_json::json!({"2": "6011000000000004", "4": "000000010000"}));
        assert_eq!(fields["2"], "601100******0004");
        assert_eq!(fields["4"], "000000010000");
        let sealed = serde_json::json!({"2": {"sealed": "9f0c", "masked": "411111******1111"}});
        assert_eq!(masked_fields(&sealed)["2"], "411111******1111");
        assert_eq!(
            masked_fields(&serde_json::json!({"2": {"x": 1}}))["2"],
            "<redacted>"
        );
    }
}
