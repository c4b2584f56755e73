//! Terminal keys and fleet rotations. Key bytes never leave the switch: the API shows type,
//! version, state, KCV and timestamps only.

use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::parse_id;
use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, IdempotencyKey, JsonBody, idempotent};
use crate::domain::{KeyType, TerminalId};
use crate::store::{Activation, KeyId, KeyRecord, KeyTransition, RotationId, TerminalSelector};
use crate::txn::keys::{RotationError, rotate_terminal, start_fleet_rotation};
pub use switchyard_api::{CreateRotation, ExpirePreviousResult, RotationCreated, RotationView};

/// A key as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    /// Key id.
    pub id: String,
    /// Terminal id.
    pub terminal_id: String,
    /// `TMK`, `TPK` or `TAK`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// Version, increasing per terminal and type.
    pub version: i32,
    /// `PENDING`, `ACTIVE`, `EXPIRED` or `REVOKED`.
    pub state: String,
    /// Key check value (6 hex).
    pub kcv: String,
    /// Fleet rotation that made it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_id: Option<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it became ACTIVE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<DateTime<Utc>>,
    /// When it left ACTIVE (or was abandoned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<DateTime<Utc>>,
    /// Until when it still verifies PIN blocks and MACs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<DateTime<Utc>>,
}

impl From<&KeyRecord> for KeyView {
    fn from(k: &KeyRecord) -> Self {
        Self {
            id: k.id.to_string(),
            terminal_id: k.terminal_id.to_string(),
            key_type: k.key_type.as_str().to_string(),
            version: k.version,
            state: k.state.as_str().to_string(),
            kcv: k.kcv.clone(),
            rotation_id: k.rotation_id.as_ref().map(|r| r.to_string()),
            created_at: k.created_at,
            activated_at: k.activated_at,
            expired_at: k.expired_at,
            grace_until: k.grace_until,
        }
    }
}

async fn registered(state: &AdminState, tid: &str) -> Result<TerminalId, ApiError> {
    let id = parse_id(tid, |s| TerminalId::new(s))?;
    if state.ctx.store.get_terminal(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "terminal {id} is not registered"
        )));
    }
    Ok(id)
}

/// Every key of a terminal, newest first.
#[utoipa::path(get, path = "/v1/terminals/{tid}/keys", params(("tid" = String, Path, description = "Terminal id")),
    responses((status = 200, body = [KeyView]), (status = 404, body = Problem)))]
pub async fn list(
    State(state): State<AdminState>,
    Path(tid): Path<String>,
) -> Result<axum::Json<Vec<KeyView>>, ApiError> {
    let id = registered(&state, &tid).await?;
    let keys = state.ctx.store.list_keys(&id).await?;
    Ok(axum::Json(keys.iter().map(KeyView::from).collect()))
}

/// Result of a single-terminal rotation.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotateResult {
    /// The PENDING key.
    pub key: KeyView,
    /// Whether it was pushed on a live session now (else it is pushed at the next sign-on).
    pub pushed: bool,
}

/// Makes a PENDING TPK or TAK for the terminal and pushes it (0800/161) if signed on.
#[utoipa::path(post, path = "/v1/terminals/{tid}/keys/{type}/rotate",
    params(("tid" = String, Path, description = "Terminal id"), ("type" = String, Path, description = "TPK or TAK")),
    responses((status = 200, body = RotateResult), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn rotate(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path((tid, kt)): Path<(String, String)>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    let id = registered(&state, &tid).await?;
    let kt = parse_id(&kt, |s| s.parse::<KeyType>())?;
    if kt == KeyType::Tmk {
        return Err(ApiError::BadRequest(
            "the TMK is replaced by registering it again through key import, not rotated on the wire"
                .into(),
        ));
    }
    idempotent(&state, idem.as_ref(), || async {
        let (key, pushed) = rotate_terminal(&state.ctx, &id, kt, &caller.name).await?;
        json_answer(
            StatusCode::OK,
            RotateResult {
                key: KeyView::from(&key),
                pushed,
            },
        )
    })
    .await
}

/// A write's answer as [`idempotent`] records it.
fn json_answer(
    status: StatusCode,
    body: impl Serialize,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let body = serde_json::to_value(body).map_err(|_| ApiError::Internal)?;
    Ok((status, body))
}

async fn transition(
    state: &AdminState,
    caller: &Caller,
    id: &str,
    to: KeyTransition,
    idem: Option<&crate::admin::Idempotency>,
) -> Result<Response, ApiError> {
    let id = parse_id(id, |s| KeyId::new(s))?;
    idempotent(state, idem, || async {
        let key = state
            .ctx
            .store
            .transition_key(
                &id,
                to,
                state.ctx.settings.keys.grace,
                &caller.name,
                Utc::now(),
            )
            .await?;
        json_answer(StatusCode::OK, KeyView::from(&key))
    })
    .await
}

/// PENDING → ACTIVE (the previous ACTIVE key expires with the grace window).
#[utoipa::path(post, path = "/v1/keys/{id}/activate", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), (status = 404, body = Problem), (status = 409, description = "Not PENDING", body = Problem)))]
pub async fn activate(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    transition(&state, &caller, &id, KeyTransition::Activate, idem.as_ref()).await
}

/// ACTIVE or PENDING → EXPIRED (an ACTIVE key keeps verifying for the grace window).
#[utoipa::path(post, path = "/v1/keys/{id}/expire", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn expire(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    transition(&state, &caller, &id, KeyTransition::Expire, idem.as_ref()).await
}

/// Any state → REVOKED, at once and without grace (a compromised key).
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn revoke(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    transition(&state, &caller, &id, KeyTransition::Revoke, idem.as_ref()).await
}

fn parse_selector(value: &serde_json::Value) -> Result<TerminalSelector, ApiError> {
    let bad = || {
        ApiError::BadRequest(
            "terminals must be \"all\", {\"ids\": [\"ATM1\", …]} or {\"groups\": [\"jakarta\", …]}"
                .into(),
        )
    };
    match value {
        serde_json::Value::String(s) if s == "all" => Ok(TerminalSelector::All),
        serde_json::Value::Object(map) if map.len() == 1 => {
            let (kind, list) = map.iter().next().ok_or_else(bad)?;
            let items: Vec<String> = serde_json::from_value(list.clone()).map_err(|_| bad())?;
            if items.is_empty() {
                return Err(bad());
            }
            match kind.as_str() {
                "ids" => Ok(TerminalSelector::Ids(
                    items
                        .iter()
                        .map(|s| parse_id(s, |s| TerminalId::new(s)))
                        .collect::<Result<_, _>>()?,
                )),
                "groups" => Ok(TerminalSelector::Groups(items)),
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

/// Starts a fleet rotation: a PENDING key per selected terminal, pushed to live sessions.
#[utoipa::path(post, path = "/v1/key-rotations", request_body = CreateRotation,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe (the operator always sends one)")),
    responses((status = 201, body = RotationCreated), (status = 400, body = Problem), (status = 422, description = "Nothing to rotate", body = Problem)))]
pub async fn create_rotation(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<CreateRotation>,
) -> Result<Response, ApiError> {
    let req = body.value;
    let kt = parse_id(&req.key_type, |s| s.parse::<KeyType>())?;
    if kt == KeyType::Tmk {
        return Err(ApiError::BadRequest("keyType must be TPK or TAK".into()));
    }
    let selector = parse_selector(&req.terminals)?;
    let activation = match (req.activation.as_str(), req.activate_at) {
        ("onConfirm", None) => Activation::OnConfirm,
        ("atTime", Some(at)) => Activation::AtTime(at),
        ("atTime", None) => {
            return Err(ApiError::BadRequest(
                "activation atTime needs activateAt (RFC 3339)".into(),
            ));
        }
        ("onConfirm", Some(_)) => {
            return Err(ApiError::BadRequest(
                "activateAt only goes with activation atTime".into(),
            ));
        }
        (other, _) => {
            return Err(ApiError::BadRequest(format!(
                "activation must be onConfirm or atTime, got {other:?}"
            )));
        }
    };
    let grace = req
        .grace_seconds
        .map(Duration::from_secs)
        .unwrap_or(state.ctx.settings.keys.grace);
    if req
        .max_concurrent
        .is_some_and(|n| !(1..=10_000).contains(&n))
    {
        return Err(ApiError::BadRequest(
            "maxConcurrent must be 1 to 10000".into(),
        ));
    }
    idempotent(&state, body.idempotency.as_ref(), || async {
        let (id, terminals) = start_fleet_rotation(
            state.ctx.clone(),
            kt,
            &selector,
            activation,
            grace,
            req.max_concurrent,
            &caller.name,
        )
        .await
        .map_err(ApiError::from)?;
        let body = serde_json::to_value(RotationCreated {
            id: id.to_string(),
            terminals,
        })
        .map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::CREATED, body))
    })
    .await
}

/// Totals by key state.
#[utoipa::path(get, path = "/v1/key-rotations/{id}", params(("id" = String, Path, description = "Rotation id")),
    responses((status = 200, body = RotationView), (status = 404, body = Problem)))]
pub async fn get_rotation(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<axum::Json<RotationView>, ApiError> {
    let id = parse_id(&id, |s| RotationId::new(s))?;
    let status = state
        .ctx
        .store
        .rotation_totals(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("rotation {id} does not exist")))?;
    let (activation, activate_at) = match status.activation {
        Activation::OnConfirm => ("onConfirm", None),
        Activation::AtTime(at) => ("atTime", Some(at)),
    };
    let mut totals: std::collections::BTreeMap<String, u64> = crate::domain::KeyState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    for (state, n) in status.totals {
        totals.insert(state.as_str().to_string(), n);
    }
    Ok(axum::Json(RotationView {
        id: status.id.to_string(),
        key_type: status.key_type.as_str().to_string(),
        activation: activation.to_string(),
        activate_at,
        created_at: status.created_at,
        terminals: status.terminals,
        totals,
    }))
}

/// Ends the grace window of the keys this rotation replaced (terminals whose new key is ACTIVE).
#[utoipa::path(post, path = "/v1/key-rotations/{id}/expire-previous", params(("id" = String, Path, description = "Rotation id")),
    responses((status = 200, body = ExpirePreviousResult), (status = 404, body = Problem)))]
pub async fn expire_previous(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, |s| RotationId::new(s))?;
    if state.ctx.store.rotation_totals(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("rotation {id} does not exist")));
    }
    idempotent(&state, idem.as_ref(), || async {
        let expired = state
            .ctx
            .store
            .expire_previous(&id, &caller.name, Utc::now())
            .await?;
        json_answer(
            StatusCode::OK,
            ExpirePreviousResult {
                id: id.to_string(),
                expired,
            },
        )
    })
    .await
}

impl From<RotationError> for ApiError {
    fn from(e: RotationError) -> Self {
        match e {
            RotationError::NoTerminals => ApiError::Unprocessable(e.to_string()),
            RotationError::Hsm(_) => {
                tracing::error!(error = %e, "fleet rotation failed");
                ApiError::Internal
            }
            RotationError::Store(s) => ApiError::from(s),
        }
    }
}
