//! The admin REST API (SPEC §5): bearer-token roles, problem+json errors, size-limited bodies
//! with unknown fields refused, `Idempotency-Key` on writes (claimed in the write's own
//! transaction, kept only as MACs), an audit record for every write and every refused request
//! (401, 403, failed writes: who, from which address, what), rate limits per client address
//! and per token (`429` with `Retry-After`), and an OpenAPI document generated from the
//! handlers at `/v1/openapi.json`.

pub mod auth;
pub mod error;
pub mod handlers;
pub mod limits;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::client_addr;
use crate::store::{
    CLAIM_STALE_AFTER, IdempotencyClaim, IdempotencyRecord, NewAudit, StoredAnswer, with_claim,
};
use crate::txn::SwitchContext;
use auth::{Caller, Role, Tokens};
use error::ApiError;
use limits::RateLimits;

/// Shared state of the admin handlers.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The switch.
    pub ctx: Arc<SwitchContext>,
    /// Valid bearer tokens.
    pub tokens: Arc<Tokens>,
    /// Per-address and per-token rate limits.
    pub limits: Arc<RateLimits>,
}

impl AdminState {
    /// The state for `ctx`, with rate limits from `[admin]`.
    pub fn new(ctx: Arc<SwitchContext>, tokens: Arc<Tokens>) -> Self {
        let limits = Arc::new(RateLimits::new(&ctx.settings.admin));
        Self {
            ctx,
            tokens,
            limits,
        }
    }
}

/// The admin router (served on `[admin] listen` by [`crate::http::serve`], which gives each
/// request its client address).
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
        .route("/v1/sessions", get(handlers::terminals::fleet))
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
        .route("/v1/maintenance", get(handlers::maintenance::get_status))
        .route(
            "/v1/maintenance/hibernate",
            post(handlers::maintenance::hibernate),
        )
        .route(
            "/v1/maintenance/resume",
            post(handlers::maintenance::resume),
        )
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/v1/openapi.json", get(openapi_json))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /v1/openapi.json".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_by_address,
        ))
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// One `admin.request` span per request: method, route template (never the concrete path,
/// which may name a card) and status.
async fn trace_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let span = tracing::info_span!(
        "admin.request",
        otel.kind = "server",
        otel.name = format!("{} {route}", req.method()),
        http.request.method = %req.method(),
        http.route = route.as_str(),
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn openapi_json() -> Response {
    axum::Json(ApiDoc::openapi()).into_response()
}

/// Outermost: the per-address rate limit, and the block of an address that failed to
/// authenticate too often, before any token is looked at.
async fn limit_by_address(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let addr = client_addr(&req);
    if let Err((limit, err)) = state.limits.check_address(addr.ip()) {
        state.ctx.metrics.admin_rate_limited(limit);
        tracing::debug!(%addr, limit, "admin request rate-limited");
        return err.into_response();
    }
    next.run(req).await
}

/// Authenticates every request, refuses writes from viewers, applies the per-token rate
/// limit, and audits every refusal: 401 and 403 with who (the token's identity, or
/// `anonymous`), from which address and what; refused writes likewise.
async fn authenticate(State(state): State<AdminState>, mut req: Request, next: Next) -> Response {
    let addr = client_addr(&req);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")));
    let caller = token
        .flatten()
        .map(str::trim)
        .and_then(|t| state.tokens.authenticate(t));
    let Some(caller) = caller else {
        let reason = match token {
            None => "no Authorization header",
            Some(None) => "Authorization is not a bearer token",
            Some(Some(_)) => "unknown bearer token",
        };
        tracing::warn!(%addr, %method, path = %truncated(&path), reason, "admin request without a valid token");
        let err = ApiError::Unauthorized;
        audit_refusal(
            &state,
            "anonymous",
            &method,
            &path,
            addr,
            err.status(),
            reason,
        )
        .await;
        state.limits.auth_failed(addr.ip());
        return err.into_response();
    };
    let is_write = method != Method::GET && method != Method::HEAD;
    if is_write && caller.role != Role::Admin {
        let err = ApiError::Forbidden(format!(
            "role {} may only read; use an admin token to {method} {path}",
            caller.role.as_str()
        ));
        audit_refusal(
            &state,
            &caller.name,
            &method,
            &path,
            addr,
            err.status(),
            "read-only role",
        )
        .await;
        return err.into_response();
    }
    if let Err(err) = state.limits.check_token(&caller.name) {
        state.ctx.metrics.admin_rate_limited("token");
        tracing::debug!(%addr, caller = %caller.name, "admin request rate-limited");
        return err.into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let response = next.run(req).await;
    // Successful writes are audited by the store in the same transaction as the change; a
    // refused write changes nothing, and is audited here.
    if is_write && (response.status().is_client_error() || response.status().is_server_error()) {
        audit_refusal(
            &state,
            &caller.name,
            &method,
            &path,
            addr,
            response.status(),
            "",
        )
        .await;
    }
    response
}

/// At most this much of a request path goes into the audit log and the log lines (an
/// unauthenticated client chooses it).
const AUDITED_PATH_CHARS: usize = 256;

fn truncated(path: &str) -> String {
    path.chars().take(AUDITED_PATH_CHARS).collect()
}

async fn audit_refusal(
    state: &AdminState,
    actor: &str,
    method: &Method,
    path: &str,
    addr: SocketAddr,
    status: StatusCode,
    reason: &str,
) {
    let path = truncated(path);
    let mut detail = serde_json::json!({ "remoteAddress": addr.to_string() });
    if !reason.is_empty() {
        detail["reason"] = reason.into();
    }
    let entry = NewAudit {
        actor: actor.to_string(),
        action: format!("{method} {path}"),
        target: path,
        result: format!("refused: {}", status.as_u16()),
        detail,
    };
    if let Err(err) = state.ctx.store.append_audit(&entry).await {
        tracing::warn!(error = %err, "failed to audit a refused admin request");
    }
}

/// What an admin write keeps to recognise a retry of itself: MACs, computed by the HSM under
/// an LMK-derived key, of the caller and `Idempotency-Key`, and of the request (method, path,
/// body). Never the key, the body or a plain hash of either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    key_mac: String,
    request_mac: String,
}

impl Idempotency {
    /// Reads and checks the `Idempotency-Key` header; `None` without one.
    fn from_request(
        state: &AdminState,
        headers: &HeaderMap,
        caller: Option<&Caller>,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Option<Self>, ApiError> {
        let Some(value) = headers.get("idempotency-key") else {
            return Ok(None);
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= 255)
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                )
            })?;
        let actor = caller.map(|c| c.name.as_str()).unwrap_or("anonymous");
        let hsm = &state.ctx.hsm;
        Ok(Some(Self {
            key_mac: hsm.idempotency_mac(&[b"idempotency-key", actor.as_bytes(), key.as_bytes()]),
            request_mac: hsm.idempotency_mac(&[
                b"request",
                method.as_str().as_bytes(),
                path.as_bytes(),
                body,
            ]),
        }))
    }
}

/// The `Idempotency-Key` of a write without a body (its request is method and path).
#[derive(Debug)]
pub struct IdempotencyKey(pub Option<Idempotency>);

impl FromRequestParts<AdminState> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        Idempotency::from_request(
            state,
            &parts.headers,
            parts.extensions.get::<Caller>(),
            &parts.method,
            parts.uri.path(),
            b"",
        )
        .map(IdempotencyKey)
    }
}

/// A JSON request body: content type checked, size limited, unknown fields refused (the target
/// type uses `deny_unknown_fields`), plus its `Idempotency-Key`, if any.
#[derive(Debug)]
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// The request's idempotency record, when it came with an `Idempotency-Key`.
    pub idempotency: Option<Idempotency>,
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
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::TooLarge(limit))?;
        let idempotency = Idempotency::from_request(
            state,
            &parts.headers,
            parts.extensions.get::<Caller>(),
            &parts.method,
            parts.uri.path(),
            &bytes,
        )?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::BadRequest(format!(
                "failed to parse the JSON body: {e}; see /v1/openapi.json for the expected shape"
            ))
        })?;
        Ok(Self { value, idempotency })
    }
}

/// Runs a write once per `Idempotency-Key` (SPEC §5).
///
/// The key is claimed in the write's own transaction ([`with_claim`]): a retry with the same
/// key and request gets the recorded answer with `Idempotent-Replayed: true` and changes
/// nothing; a retry while the first attempt still runs gets `409` (`in-progress`, with
/// `Retry-After`), as does a concurrent attempt whose transaction lost the claim (it rolled
/// back). The same key with a different request is refused with `422`. A failed write whose
/// claim never committed records nothing (a retry runs it again); one that failed after an
/// earlier transaction of it committed records the error as its answer.
pub async fn idempotent<F, Fut>(
    state: &AdminState,
    idempotency: Option<&Idempotency>,
    write: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let Some(idem) = idempotency else {
        let (status, body) = write().await?;
        return Ok((status, axum::Json(body)).into_response());
    };
    let store = &state.ctx.store;
    if let Some(record) = store.idempotency_get(&idem.key_mac).await? {
        return answer_recorded(idem, record);
    }
    let claim = IdempotencyClaim {
        key_mac: idem.key_mac.clone(),
        request_mac: idem.request_mac.clone(),
        claim_id: uuid::Uuid::new_v4().simple().to_string(),
    };
    match with_claim(claim.clone(), write()).await {
        Ok((status, body)) => {
            let answer = StoredAnswer {
                status: status.as_u16(),
                body: body.to_string(),
            };
            match store.idempotency_finish(&claim, &answer).await {
                Ok(true) => {}
                // Another attempt claimed the key between our look-up and now, and our write
                // made no audited change: answer as that attempt does.
                Ok(false) => {
                    if let Some(record) = store.idempotency_get(&idem.key_mac).await? {
                        return answer_recorded(idem, record);
                    }
                }
                // The write is done; its answer is still the truth. A retry will be told the
                // first attempt's answer was not recorded.
                Err(err) => {
                    tracing::warn!(error = %err, "failed to record an Idempotency-Key answer")
                }
            }
            Ok((status, axum::Json(body)).into_response())
        }
        Err(err) => match store.idempotency_get(&idem.key_mac).await {
            Ok(Some(record)) if record.claim_id == claim.claim_id => {
                // Part of this write committed (with the claim) before a later step failed:
                // the error is this request's answer, for retries too.
                let answer = StoredAnswer {
                    status: err.status().as_u16(),
                    body: serde_json::to_string(&err.problem()).unwrap_or_default(),
                };
                if let Err(e) = store.idempotency_finish(&claim, &answer).await {
                    tracing::warn!(error = %e, "failed to record an Idempotency-Key answer");
                }
                Err(err)
            }
            // Another attempt of this request claimed the key (our transaction rolled back).
            Ok(Some(record)) => answer_recorded(idem, record),
            _ => Err(err),
        },
    }
}

/// The answer to an attempt whose key is already claimed.
fn answer_recorded(idem: &Idempotency, record: IdempotencyRecord) -> Result<Response, ApiError> {
    if record.request_mac != idem.request_mac {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was already used with a different request; use a new key".into(),
        ));
    }
    let Some(answer) = record.answer else {
        let age = (Utc::now() - record.created_at)
            .to_std()
            .unwrap_or_default();
        return Err(ApiError::InProgress {
            stale: age > CLAIM_STALE_AFTER,
        });
    };
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    let mut response =
        (status, [(header::CONTENT_TYPE, content_type)], answer.body).into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
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
        handlers::terminals::fleet,
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
        handlers::maintenance::get_status,
        handlers::maintenance::hibernate,
        handlers::maintenance::resume,
    ),
    components(schemas(error::Problem)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// How often expired `Idempotency-Key` records are looked for.
const IDEMPOTENCY_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Records one purge statement deletes at most.
const IDEMPOTENCY_PURGE_CHUNK: u32 = 1000;

/// Deletes `Idempotency-Key` records older than `admin.idempotency_retention`, now and every
/// hour, until `stop`; in chunks, so a large backlog never holds the table in one transaction.
/// Every replica may run it: deleting what another replica deleted is nothing.
pub async fn purge_idempotency_records(
    ctx: Arc<SwitchContext>,
    stop: tokio_util::sync::CancellationToken,
) {
    let retention = ctx.settings.admin.idempotency_retention;
    let mut tick = tokio::time::interval(IDEMPOTENCY_PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // settings keep the retention within a year, which always converts
        let Some(before) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| Utc::now().checked_sub_signed(r))
        else {
            tracing::error!("admin.idempotency_retention is out of range; records are not purged");
            return;
        };
        let mut purged = 0u64;
        loop {
            match ctx
                .store
                .purge_idempotency(before, IDEMPOTENCY_PURGE_CHUNK)
                .await
            {
                Ok(n) => {
                    purged += n;
                    if n < u64::from(IDEMPOTENCY_PURGE_CHUNK) || stop.is_cancelled() {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "purging expired Idempotency-Key records failed; will retry");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::info!(purged, "expired Idempotency-Key records deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document clients generate code from: any change to it shows up here, reviewed.
    #[test]
    fn openapi_document_is_pinned() {
        let doc = serde_json::to_string_pretty(&ApiDoc::openapi()).expect("serializes");
        insta::assert_snapshot!("openapi", doc);
    }
}
