//! A small stateful fake of the switch admin API's fleet-rotation endpoints (SPEC §5), served
//! on 127.0.0.1 port 0, for KeyRotation reconcile tests.
//!
//! It keeps a fleet of terminals and, per rotation, each terminal's new key state; honours
//! `Idempotency-Key` like the switch (same key and body → the stored answer, same key with
//! another body → 422); requires the `admin` bearer token; can answer 503 to everything; and
//! records every request so tests assert the exact calls. It also plays `/v1/maintenance`
//! (hibernation), with the state set by the test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The token the fake accepts for writes and reads.
pub const ADMIN_TOKEN: &str = "admin-token-3f9c";

/// One request as the fake received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `GET` or `POST`.
    pub method: String,
    /// Path, e.g. `/v1/key-rotations`.
    pub path: String,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// JSON body (`Null` when empty).
    pub body: Value,
}

#[derive(Debug)]
struct Rotation {
    key_type: String,
    /// terminal id → state of its new key (`PENDING` or `ACTIVE`).
    keys: BTreeMap<String, String>,
    previous_expired: bool,
}

#[derive(Debug, Default)]
struct SwitchState {
    terminals: Vec<String>,
    rotations: BTreeMap<String, Rotation>,
    idempotency: BTreeMap<String, (Value, Value)>,
    calls: Vec<Call>,
    unavailable: bool,
    /// `GET /v1/maintenance` answer; `None` until first asked (then `serving`).
    maintenance: Option<Value>,
}

/// Handle to a running fake switch.
#[derive(Clone, Debug)]
pub struct FakeSwitch {
    state: Arc<Mutex<SwitchState>>,
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
}

impl FakeSwitch {
    /// Serves a fake with these terminals until the test's runtime ends.
    pub async fn start(terminals: &[&str]) -> Self {
        let state = Arc::new(Mutex::new(SwitchState {
            terminals: terminals.iter().map(|t| (*t).to_owned()).collect(),
            ..SwitchState::default()
        }));
        let app = Router::new()
            .route("/v1/key-rotations", post(create))
            .route("/v1/key-rotations/{id}", get(read))
            .route("/v1/key-rotations/{id}/expire-previous", post(expire))
            .route("/v1/maintenance", get(maintenance_get))
            .route("/v1/maintenance/hibernate", post(maintenance_hibernate))
            .route("/v1/maintenance/resume", post(maintenance_resume))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            state,
            base_url: format!("http://{addr}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SwitchState> {
        self.state.lock().expect("fake switch lock")
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Requests with this method and path.
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && c.path == path)
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Rotations created on the switch.
    pub fn rotation_count(&self) -> usize {
        self.lock().rotations.len()
    }

    /// Answer 503 (database unavailable) to everything, or stop doing so.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// Every terminal confirms its new key: PENDING → ACTIVE.
    pub fn confirm_all(&self) {
        for rotation in self.lock().rotations.values_mut() {
            for state in rotation.keys.values_mut() {
                *state = "ACTIVE".into();
            }
        }
    }

    /// Whether `expire-previous` was called for the rotation.
    pub fn previous_expired(&self, id: &str) -> bool {
        self.lock()
            .rotations
            .get(id)
            .is_some_and(|r| r.previous_expired)
    }

    /// Sets what the switch reports of its maintenance state (as a real one would while it
    /// drains): `state` and the SAF backlog.
    pub fn set_maintenance(&self, state: &str, saf_backlog: u64) {
        let mut st = self.lock();
        st.maintenance = Some(maintenance_status(state, saf_backlog));
    }

    /// The maintenance state the switch reports now.
    pub fn maintenance_state(&self) -> String {
        self.lock()
            .maintenance
            .as_ref()
            .and_then(|m| m["state"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "serving".into())
    }

    /// Key type of a rotation.
    pub fn key_type(&self, id: &str) -> Option<String> {
        self.lock().rotations.get(id).map(|r| r.key_type.clone())
    }
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (
        status,
        [("content-type", "application/problem+json")],
        json!({"type": "https://switchyard.io/problems/x", "title": "x",
               "status": status.as_u16(), "detail": detail})
        .to_string(),
    )
        .into_response()
}

/// Records the call; the refusal (503, or 401 without the admin token) if there is one.
fn admit(
    st: &mut SwitchState,
    method: &str,
    path: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    st.calls.push(Call {
        method: method.into(),
        path,
        idempotency_key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    });
    if st.unavailable {
        return Some(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the switch's database is unavailable; retry later",
        ));
    }
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {ADMIN_TOKEN}"));
    (!authorized).then(|| problem(StatusCode::UNAUTHORIZED, "missing or invalid bearer token"))
}

async fn create(
    State(state): State<Arc<Mutex<SwitchState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(&mut st, "POST", "/v1/key-rotations".into(), &headers, &body) {
        return r;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let key = st.calls.last().and_then(|c| c.idempotency_key.clone());
    if let Some(key) = &key
        && let Some((stored_request, stored_answer)) = st.idempotency.get(key)
    {
        if stored_request != &request {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was already used with a different request; use a new key",
            );
        }
        return (StatusCode::CREATED, axum::Json(stored_answer.clone())).into_response();
    }
    let selected: Vec<String> = match &request["terminals"] {
        Value::String(s) if s == "all" => st.terminals.clone(),
        Value::Object(m) if m.contains_key("ids") => m["ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        _ => st.terminals.clone(),
    };
    if selected.is_empty() {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "no terminal to rotate");
    }
    let id = format!("rot-{}", st.rotations.len() + 1);
    st.rotations.insert(
        id.clone(),
        Rotation {
            key_type: request["keyType"].as_str().unwrap_or_default().to_owned(),
            keys: selected
                .iter()
                .map(|t| (t.clone(), "PENDING".to_owned()))
                .collect(),
            previous_expired: false,
        },
    );
    let answer = json!({"id": id, "terminals": selected.len()});
    if let Some(key) = key {
        st.idempotency.insert(key, (request, answer.clone()));
    }
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

async fn read(
    State(state): State<Arc<Mutex<SwitchState>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(
        &mut st,
        "GET",
        format!("/v1/key-rotations/{id}"),
        &headers,
        &[],
    ) {
        return r;
    }
    let Some(rotation) = st.rotations.get(&id) else {
        return problem(
            StatusCode::NOT_FOUND,
            &format!("rotation {id} does not exist"),
        );
    };
    let mut totals: BTreeMap<String, u64> = ["PENDING", "ACTIVE", "EXPIRED", "REVOKED"]
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    for state in rotation.keys.values() {
        *totals.entry(state.clone()).or_default() += 1;
    }
    axum::Json(json!({
        "id": id, "keyType": rotation.key_type, "activation": "onConfirm",
        "createdAt": "2026-01-01T00:00:00Z", "terminals": rotation.keys.len(), "totals": totals,
    }))
    .into_response()
}

async fn expire(
    State(state): State<Arc<Mutex<SwitchState>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(
        &mut st,
        "POST",
        format!("/v1/key-rotations/{id}/expire-previous"),
        &headers,
        &[],
    ) {
        return r;
    }
    let Some(rotation) = st.rotations.get_mut(&id) else {
        return problem(
            StatusCode::NOT_FOUND,
            &format!("rotation {id} does not exist"),
        );
    };
    rotation.previous_expired = true;
    let expired = rotation.keys.values().filter(|s| *s == "ACTIVE").count();
    axum::Json(json!({"id": id, "expired": expired})).into_response()
}

fn maintenance_status(state: &str, saf_backlog: u64) -> Value {
    json!({"state": state, "acceptingConnections": state == "serving", "inFlight": 0,
           "signedOn": 0, "heldReversals": 0, "safBacklog": saf_backlog, "safDeadLetters": 0,
           "message": format!("{state}: {saf_backlog} SAF advice(s) to be delivered")})
}

async fn maintenance_get(
    State(state): State<Arc<Mutex<SwitchState>>>,
    headers: HeaderMap,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(&mut st, "GET", "/v1/maintenance".into(), &headers, &[]) {
        return r;
    }
    let status = st
        .maintenance
        .get_or_insert_with(|| maintenance_status("serving", 0))
        .clone();
    axum::Json(status).into_response()
}

async fn maintenance_hibernate(
    State(state): State<Arc<Mutex<SwitchState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(
        &mut st,
        "POST",
        "/v1/maintenance/hibernate".into(),
        &headers,
        &body,
    ) {
        return r;
    }
    let Ok(request) = serde_json::from_slice::<switchyard_api::HibernateRequest>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "body must be {\"drainTimeoutSeconds\": n}",
        );
    };
    if request.drain_timeout_seconds == 0 {
        return problem(
            StatusCode::BAD_REQUEST,
            "drainTimeoutSeconds must be 1 to 86400",
        );
    }
    let backlog = st
        .maintenance
        .as_ref()
        .and_then(|m| m["safBacklog"].as_u64())
        .unwrap_or(0);
    let current = st
        .maintenance
        .get_or_insert_with(|| maintenance_status("serving", 0));
    if current["state"] == "serving" {
        *current = maintenance_status("draining", backlog);
    }
    (StatusCode::ACCEPTED, axum::Json(current.clone())).into_response()
}

async fn maintenance_resume(
    State(state): State<Arc<Mutex<SwitchState>>>,
    headers: HeaderMap,
) -> Response {
    let mut st = state.lock().expect("lock");
    if let Some(r) = admit(
        &mut st,
        "POST",
        "/v1/maintenance/resume".into(),
        &headers,
        &[],
    ) {
        return r;
    }
    let status = maintenance_status("serving", 0);
    st.maintenance = Some(status.clone());
    (StatusCode::ACCEPTED, axum::Json(status)).into_response()
}
