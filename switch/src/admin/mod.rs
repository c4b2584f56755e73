//! The admin REST API (SPEC §5): bearer-token roles, problem+json errors, size-limited bodies
//! with unknown fields refused, `Idempotency-Key` on writes, an audit record for every write,
//! and an OpenAPI document generated from the handlers at `/v1/openapi.json`.

pub mod auth;
pub mod error;
pub mod handlers;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::app::SwitchContext;
use crate::store::{NewAudit, StoredResponse};
use auth::{Caller, Role, Tokens};
use error::ApiError;

/// Shared state of the admin handlers.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The switch.
    pub ctx: Arc<SwitchContext>,
    /// Valid bearer tokens.
    pub tokens: Arc<Tokens>,
}

/// The admin router (served on `[admin] listen`).
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route(
            "/v1/terminals",
            post(handlers::terminals::create).get(handlers::terminals::list),
        )
        .route("/v1/terminals/{tid}", get(handlers::terminals::get_one))
        .route(
            "/v1/terminals/{tid}/sign-off",
            post(handlers::terminals::sign_off),
        )
        .route("/v1/terminals/{tid}/keys", get(handlers::keys::list))
        .route(
            "/v1/terminals/{tid}/keys/{type}/rotate",
            post(handlers::keys::rotate),
        )
        .route("/v1/keys/{id}/activate", post(handlers::keys::activate))
        .route("/v1/keys/{id}/expire", post(handlers::keys::expire))
        .route("/v1/keys/{id}/revoke", post(handlers::keys::revoke))
        .route("/v1/key-rotations", post(handlers::keys::create_rotation))
        .route("/v1/key-rotations/{id}", get(handlers::keys::get_rotation))
        .route(
            "/v1/key-rotations/{id}/expire-previous",
            post(handlers::keys::expire_previous),
        )
        .route("/v1/accounts", post(handlers::accounts::create))
        .route("/v1/accounts/{id}", get(handlers::accounts::get_one))
        .route("/v1/cards", post(handlers::cards::create))
        .route("/v1/cards/{id}", get(handlers::cards::get_one))
        .route("/v1/cards/{id}/pin-reset", post(handlers::cards::pin_reset))
        .route("/v1/audit", get(handlers::audit::list))
        .route("/v1/saf", get(handlers::saf::list))
        .route("/v1/saf/stats", get(handlers::saf::stats))
        .route("/v1/saf/{id}/retry", post(handlers::saf::retry))
        .route("/v1/saf/{id}/cancel", post(handlers::saf::cancel))
        .route(
            "/v1/saf/dead-letters/{id}/requeue",
            post(handlers::saf::requeue),
        )
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/v1/openapi.json", get(openapi_json))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /v1/openapi.json".into()) })
        .with_state(state)
}

async fn openapi_json() -> Response {
    axum::Json(ApiDoc::openapi()).into_response()
}

/// Authenticates every request, refuses writes from viewers, and audits refused writes.
async fn authenticate(State(state): State<AdminState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(caller) = token.and_then(|t| state.tokens.authenticate(t)) else {
        tracing::warn!(method = %req.method(), path = %req.uri().path(), "admin request without a valid token");
        return ApiError::Unauthorized.into_response();
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let is_write = method != Method::GET && method != Method::HEAD;
    if is_write && caller.role != Role::Admin {
        let err = ApiError::Forbidden(format!(
            "role {} may only read; use an admin token to {method} {path}",
            caller.role.as_str()
        ));
        audit_refusal(&state, &caller, &method, &path, err.status()).await;
        return err.into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let response = next.run(req).await;
    // Successful writes are audited by the store in the same transaction as the change; a
    // refused write changes nothing, and is audited here.
    if is_write && (response.status().is_client_error() || response.status().is_server_error()) {
        audit_refusal(&state, &caller, &method, &path, response.status()).await;
    }
    response
}

async fn audit_refusal(
    state: &AdminState,
    caller: &Caller,
    method: &Method,
    path: &str,
    status: StatusCode,
) {
    let entry = NewAudit {
        actor: caller.name.clone(),
        action: format!("{method} {path}"),
        target: path.to_string(),
        result: format!("refused: {}", status.as_u16()),
        detail: serde_json::Value::Null,
    };
    if let Err(err) = state.ctx.store.append_audit(&entry).await {
        tracing::warn!(error = %err, "failed to audit a refused admin write");
    }
}

/// A JSON request body: content type checked, size limited, unknown fields refused (the target
/// type uses `deny_unknown_fields`), plus a digest of the body for `Idempotency-Key` checks.
#[derive(Debug)]
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// Hex SHA-256 of method, path and body.
    pub digest: String,
}

impl<T: DeserializeOwned> FromRequest<AdminState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AdminState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.ctx.settings.admin.max_body_bytes;
        let mut hasher = Sha256::new();
        hasher.update(req.method().as_str().as_bytes());
        hasher.update(b" ");
        hasher.update(req.uri().path().as_bytes());
        hasher.update(b"\n");
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::TooLarge(limit))?;
        hasher.update(&bytes);
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::BadRequest(format!(
                "failed to parse the JSON body: {e}; see /v1/openapi.json for the expected shape"
            ))
        })?;
        Ok(Self {
            value,
            digest: hex::encode(hasher.finalize()),
        })
    }
}

/// Runs a write once per `Idempotency-Key`: a retry with the same key and body gets the stored
/// answer (and changes nothing); the same key with a different body is refused.
pub async fn idempotent<F, Fut>(
    state: &AdminState,
    caller: &Caller,
    headers: &HeaderMap,
    digest: &str,
    write: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                    )
                })?;
            Some(key.to_string())
        }
    };
    if let Some(key) = &key
        && let Some(stored) = state.ctx.store.idempotency_get(key, &caller.name).await?
    {
        if stored.request_hash != digest {
            return Err(ApiError::Unprocessable(
                "this Idempotency-Key was already used with a different request; use a new key"
                    .into(),
            ));
        }
        let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            stored.body,
        )
            .into_response();
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(response);
    }
    let (status, body) = write().await?;
    if let Some(key) = &key {
        let stored = StoredResponse {
            request_hash: digest.to_string(),
            status: status.as_u16(),
            body: body.to_string(),
        };
        state
            .ctx
            .store
            .idempotency_put(key, &caller.name, &stored)
            .await?;
    }
    Ok((status, axum::Json(body)).into_response())
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of the admin API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Switchyard admin API",
        description = "Manage terminals, keys, cards, accounts and the store-and-forward queue of a Switchyard switch. Writes need an admin token; viewers may read. Errors are application/problem+json."
    ),
    paths(
        handlers::terminals::create,
        handlers::terminals::list,
        handlers::terminals::get_one,
        handlers::terminals::sign_off,
        handlers::keys::list,
        handlers::keys::rotate,
        handlers::keys::activate,
        handlers::keys::expire,
        handlers::keys::revoke,
        handlers::keys::create_rotation,
        handlers::keys::get_rotation,
        handlers::keys::expire_previous,
        handlers::accounts::create,
        handlers::accounts::get_one,
        handlers::cards::create,
        handlers::cards::get_one,
        handlers::cards::pin_reset,
        handlers::audit::list,
        handlers::saf::list,
        handlers::saf::stats,
        handlers::saf::retry,
        handlers::saf::cancel,
        handlers::saf::requeue,
    ),
    components(schemas(error::Problem)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;
