//! Ledger accounts (on-us cards authorize against these).

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::parse_id;
use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, JsonBody, idempotent};
use crate::store::{Account, AccountId, NewAccount};

/// Opens an account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAccount {
    /// Account id, 1–34 characters.
    pub id: String,
    /// ISO 4217 numeric currency, e.g. `360`.
    pub currency: String,
    /// Opening balance in minor units (≥ 0).
    pub balance: i64,
    /// Cash withdrawn per UTC day may not exceed this (minor units, ≥ 0).
    pub daily_withdrawal_limit: i64,
}

/// An account.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    /// Account id.
    pub id: String,
    /// ISO 4217 numeric currency.
    pub currency: String,
    /// Balance in minor units.
    pub balance: i64,
    /// Daily withdrawal limit in minor units.
    pub daily_withdrawal_limit: i64,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
}

impl From<&Account> for AccountView {
    fn from(a: &Account) -> Self {
        Self {
            id: a.id.to_string(),
            currency: a.currency.clone(),
            balance: a.balance,
            daily_withdrawal_limit: a.daily_withdrawal_limit,
            created_at: a.created_at,
        }
    }
}

/// Opens an account.
#[utoipa::path(post, path = "/v1/accounts", request_body = CreateAccount,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 201, body = AccountView), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<CreateAccount>,
) -> Result<Response, ApiError> {
    let req = body.value;
    let id = parse_id(&req.id, |s| AccountId::new(s))?;
    if req.currency.len() != 3 || !req.currency.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(
            "currency must be an ISO 4217 numeric code, e.g. \"360\"".into(),
        ));
    }
    if req.balance < 0 || req.daily_withdrawal_limit < 0 {
        return Err(ApiError::BadRequest(
            "balance and dailyWithdrawalLimit must not be negative".into(),
        ));
    }
    idempotent(&state, body.idempotency.as_ref(), || async {
        let account = state
            .ctx
            .store
            .create_account(
                &NewAccount {
                    id,
                    currency: req.currency.clone(),
                    balance: req.balance,
                    daily_withdrawal_limit: req.daily_withdrawal_limit,
                },
                &caller.name,
            )
            .await?;
        let body =
            serde_json::to_value(AccountView::from(&account)).map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::CREATED, body))
    })
    .await
}

/// One account with its current balance.
#[utoipa::path(get, path = "/v1/accounts/{id}", params(("id" = String, Path, description = "Account id")),
    responses((status = 200, body = AccountView), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<axum::Json<AccountView>, ApiError> {
    let id = parse_id(&id, |s| AccountId::new(s))?;
    let account = state
        .ctx
        .store
        .get_account(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("account {id} does not exist")))?;
    Ok(axum::Json(AccountView::from(&account)))
}
