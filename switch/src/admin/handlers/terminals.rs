//! Terminals (and acquirer stations): registration with TMK import, listing, session state,
//! operator sign-off, and the fleet's sessions.
//!
//! Session state comes from the store's session registry (issue 16), so every replica answers
//! the same whichever one holds the terminal.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::parse_id;
use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, IdempotencyKey, JsonBody, idempotent};
use crate::domain::{KeyOwner, KeyState, KeyType, TerminalId};
use crate::store::{LiveSession, NewAudit, NewKey, NewTerminal, Page, Terminal, TerminalKind};

/// A TMK delivered as a TR-31 key block under the switch's KEK.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TmkImport {
    /// TR-31 (ANSI X9.143) version D key block, the TMK wrapped under the KEK.
    pub key_block: String,
    /// Key check value of the TMK (6 hex characters); a mismatch refuses the import.
    pub kcv: String,
}

/// Registers a terminal or station.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTerminal {
    /// Terminal id (field 41), 1–8 characters `[A-Za-z0-9-_]`.
    pub id: String,
    /// Fleet group, used to select terminals in rotations.
    #[serde(default = "default_group")]
    pub group: String,
    /// `atm` (default) or `station` (an acquiring switch).
    #[serde(default)]
    pub kind: Option<String>,
    /// The terminal master key.
    pub tmk: TmkImport,
}

fn default_group() -> String {
    "default".to_string()
}

/// A terminal as the API shows it: registration plus its live session, wherever in the fleet.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerminalView {
    /// Terminal id.
    pub id: String,
    /// Fleet group.
    pub group: String,
    /// `atm` or `station`.
    pub kind: String,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// Whether it holds a signed-on connection to a replica of this switch.
    pub connected: bool,
    /// Whether that connection is signed on.
    pub signed_on: bool,
    /// The replica holding its (newest) session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Its live sessions (an ATM has at most one; a station one per connection).
    pub sessions: u32,
    /// Peer address of the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<String>,
    /// When it signed on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_on_at: Option<DateTime<Utc>>,
    /// Last frame received (from another replica: as of its last heartbeat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
}

fn kind_name(kind: TerminalKind) -> &'static str {
    match kind {
        TerminalKind::Atm => "atm",
        TerminalKind::Station => "station",
    }
}

fn view(state: &AdminState, t: &Terminal, sessions: &[LiveSession]) -> TerminalView {
    let mine: Vec<&LiveSession> = sessions.iter().filter(|s| s.terminal == t.id).collect();
    let newest = mine.last();
    // this replica's own session knows its last frame to the millisecond
    let local_seen = newest
        .filter(|s| s.replica == state.ctx.fleet.replica())
        .and_then(|_| state.ctx.sessions.info(&t.id))
        .and_then(|info| info.last_seen);
    TerminalView {
        id: t.id.to_string(),
        group: t.group.clone(),
        kind: kind_name(t.kind).to_string(),
        created_at: t.created_at,
        connected: newest.is_some(),
        signed_on: newest.is_some(),
        replica: newest.map(|s| s.replica.clone()),
        sessions: u32::try_from(mine.len()).unwrap_or(u32::MAX),
        remote_address: newest.map(|s| s.remote.clone()),
        signed_on_at: newest.map(|s| s.signed_on_at),
        last_seen: local_seen.or(newest.map(|s| s.last_seen)),
    }
}

/// The live sessions of `terminals` from the registry.
async fn sessions_of(
    state: &AdminState,
    terminals: &[TerminalId],
) -> Result<Vec<LiveSession>, ApiError> {
    Ok(state.ctx.store.live_sessions(terminals, Utc::now()).await?)
}

/// Registers a terminal and imports its TMK (TR-31 under the KEK; KCV checked).
#[utoipa::path(post, path = "/v1/terminals", request_body = CreateTerminal,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 201, description = "Registered", body = TerminalView),
        (status = 400, description = "Malformed request", body = Problem),
        (status = 409, description = "Terminal already registered", body = Problem),
        (status = 422, description = "Key block refused (bad block, wrong KEK, KCV mismatch)", body = Problem),
    ))]
pub async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<CreateTerminal>,
) -> Result<Response, ApiError> {
    let req = body.value;
    let id = parse_id(&req.id, |s| TerminalId::new(s))?;
    let kind = match req.kind.as_deref() {
        None | Some("atm") => TerminalKind::Atm,
        Some("station") => TerminalKind::Station,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "kind must be \"atm\" or \"station\", got {other:?}"
            )));
        }
    };
    if req.group.is_empty() || req.group.len() > 64 {
        return Err(ApiError::BadRequest(
            "group must be 1 to 64 characters".into(),
        ));
    }
    idempotent(&state, body.idempotency.as_ref(), || async {
        let kcv = parse_id(&req.tmk.kcv, |s| s.parse::<crate::crypto::KeyCheckValue>())?;
        let (wrapped, _) = state
            .ctx
            .hsm
            .import_under_kek(
                KeyType::Tmk,
                &KeyOwner::Terminal(id.clone()),
                &req.tmk.key_block,
                &kcv,
            )
            .map_err(|e| ApiError::Unprocessable(format!("failed to import the TMK: {e}")))?;
        let terminal = state
            .ctx
            .store
            .create_terminal(
                &NewTerminal {
                    id: id.clone(),
                    group: req.group.clone(),
                    kind,
                },
                &caller.name,
            )
            .await?;
        state
            .ctx
            .store
            .insert_key(
                &NewKey {
                    terminal_id: id.clone(),
                    key_type: KeyType::Tmk,
                    state: KeyState::Active,
                    wrapped,
                    kcv: kcv.to_string(),
                    rotation_id: None,
                    grace_seconds: state.ctx.settings.keys.grace.as_secs() as i64,
                },
                &caller.name,
            )
            .await?;
        let body =
            serde_json::to_value(view(&state, &terminal, &[])).map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::CREATED, body))
    })
    .await
}

/// Paging of the terminal list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Return terminals after this id.
    pub after: Option<String>,
    /// At most this many (1–1000, default 100).
    pub limit: Option<u32>,
}

/// Terminals ordered by id, in pages.
#[utoipa::path(get, path = "/v1/terminals", params(ListParams),
    responses((status = 200, description = "A page of terminals", body = [TerminalView])))]
pub async fn list(
    State(state): State<AdminState>,
    Query(params): Query<ListParams>,
) -> Result<axum::Json<Vec<TerminalView>>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let terminals = state
        .ctx
        .store
        .list_terminals(Page {
            after: params.after,
            limit,
        })
        .await?;
    let ids: Vec<TerminalId> = terminals.iter().map(|t| t.id.clone()).collect();
    let sessions = sessions_of(&state, &ids).await?;
    Ok(axum::Json(
        terminals
            .iter()
            .map(|t| view(&state, t, &sessions))
            .collect(),
    ))
}

/// One terminal with its session state.
#[utoipa::path(get, path = "/v1/terminals/{tid}", params(("tid" = String, Path, description = "Terminal id")),
    responses((status = 200, body = TerminalView), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AdminState>,
    Path(tid): Path<String>,
) -> Result<axum::Json<TerminalView>, ApiError> {
    let id = parse_id(&tid, |s| TerminalId::new(s))?;
    let terminal = state
        .ctx
        .store
        .get_terminal(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("terminal {id} is not registered")))?;
    let sessions = sessions_of(&state, std::slice::from_ref(&terminal.id)).await?;
    Ok(axum::Json(view(&state, &terminal, &sessions)))
}

/// Result of a sign-off.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignOffResult {
    /// Terminal id.
    pub id: String,
    /// Whether a live session was closed.
    pub was_signed_on: bool,
}

/// Closes the terminal's session; it must sign on again before any transaction.
#[utoipa::path(post, path = "/v1/terminals/{tid}/sign-off", params(("tid" = String, Path, description = "Terminal id")),
    responses((status = 200, body = SignOffResult), (status = 404, body = Problem)))]
pub async fn sign_off(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(tid): Path<String>,
    IdempotencyKey(idem): IdempotencyKey,
) -> Result<Response, ApiError> {
    let id = parse_id(&tid, |s| TerminalId::new(s))?;
    if state.ctx.store.get_terminal(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "terminal {id} is not registered"
        )));
    }
    idempotent(&state, idem.as_ref(), || async {
        // removed from the registry: the replicas holding them close them (this one at once)
        let removed = state.ctx.store.remove_sessions(&id).await?;
        state.ctx.fleet.close_removed(&state.ctx, &removed);
        let was_signed_on = state.ctx.sessions.force_sign_off(&id) || !removed.is_empty();
        state.ctx.fleet.refresh_gauge(&state.ctx).await;
        state
            .ctx
            .store
            .append_audit(&NewAudit {
                actor: caller.name.clone(),
                action: "terminal.sign-off".into(),
                target: id.to_string(),
                result: if was_signed_on {
                    "signed off"
                } else {
                    "was not signed on"
                }
                .into(),
                detail: serde_json::Value::Null,
            })
            .await?;
        let body = serde_json::to_value(SignOffResult {
            id: id.to_string(),
            was_signed_on,
        })
        .map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::OK, body))
    })
    .await
}

/// One replica's share of the fleet's sessions.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// Replica id (the pod name in Kubernetes).
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Until when its lease runs; it is renewed every heartbeat.
    pub lease_until: DateTime<Utc>,
    /// Its signed-on sessions.
    pub sessions: u64,
}

/// The fleet's sessions as the registry holds them.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    /// The replica that answered.
    pub replica: String,
    /// Terminals and stations signed on anywhere in the fleet.
    pub signed_on: u64,
    /// Live replicas (lease running), by id.
    pub replicas: Vec<ReplicaView>,
}

/// Replicas whose lease runs, their session counts, and the terminals signed on fleet-wide.
#[utoipa::path(get, path = "/v1/sessions",
    responses((status = 200, body = FleetView)))]
pub async fn fleet(State(state): State<AdminState>) -> Result<axum::Json<FleetView>, ApiError> {
    let fleet = state.ctx.store.fleet_sessions(Utc::now()).await?;
    Ok(axum::Json(FleetView {
        replica: state.ctx.fleet.replica().to_string(),
        signed_on: fleet.terminals,
        replicas: fleet
            .replicas
            .into_iter()
            .map(|r| ReplicaView {
                id: r.replica,
                started_at: r.started_at,
                lease_until: r.lease_until,
                sessions: r.sessions,
            })
            .collect(),
    }))
}
