//! Cards: the PAN is kept only as a keyed hash plus its last four digits, the PIN only as a PVV.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use super::parse_id;
use crate::admin::auth::Caller;
use crate::admin::error::{ApiError, Problem};
use crate::admin::{AdminState, JsonBody, idempotent};
use crate::crypto::ClearPin;
use crate::store::{AccountId, Card, CardId, NewCard};

/// Issues a card on an account. The PAN and PIN are used once and never stored or returned.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCard {
    /// Primary account number, 12–19 digits.
    #[schema(value_type = String)]
    pub pan: Zeroizing<String>,
    /// Expiry `YYMM`.
    pub expiry: String,
    /// The account the card draws on.
    pub account_id: String,
    /// Initial PIN, 4–12 digits; stored only as a PIN verification value.
    #[schema(value_type = String)]
    pub pin: Zeroizing<String>,
    /// Name of an upstream whose stand-in data this card is (cards of another issuer).
    #[serde(default)]
    pub upstream: Option<String>,
}

impl std::fmt::Debug for CreateCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateCard")
            .field("pan", &"<redacted>")
            .field("expiry", &self.expiry)
            .field("account_id", &self.account_id)
            .field("pin", &"<redacted>")
            .field("upstream", &self.upstream)
            .finish()
    }
}

/// A card as the API shows it: never the PAN, never the PIN or PVV.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CardView {
    /// Card id (use it for PIN resets).
    pub id: String,
    /// Last four digits of the PAN.
    pub last4: String,
    /// Expiry `YYMM`.
    pub expiry: String,
    /// Account id.
    pub account_id: String,
    /// Consecutive wrong PINs.
    pub pin_tries: u32,
    /// Whether the PIN is blocked (three wrong PINs; reset with pin-reset).
    pub pin_blocked: bool,
    /// Upstream this card's stand-in data belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
}

impl From<&Card> for CardView {
    fn from(c: &Card) -> Self {
        Self {
            id: c.id.to_string(),
            last4: c.last4.clone(),
            expiry: c.expiry.clone(),
            account_id: c.account_id.to_string(),
            pin_tries: c.pin_tries,
            pin_blocked: c.pin_blocked,
            upstream: c.upstream.clone(),
            created_at: c.created_at,
        }
    }
}

pub(crate) fn validate_pan(pan: &str) -> Result<(), ApiError> {
    if !(12..=19).contains(&pan.len()) || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest("pan must be 12 to 19 digits".into()));
    }
    Ok(())
}

pub(crate) fn validate_expiry(expiry: &str) -> Result<(), ApiError> {
    let ok = expiry.len() == 4
        && expiry.bytes().all(|b| b.is_ascii_digit())
        && matches!(expiry[2..].parse::<u8>(), Ok(1..=12));
    if !ok {
        return Err(ApiError::BadRequest(
            "expiry must be YYMM with a month 01 to 12".into(),
        ));
    }
    Ok(())
}

fn clear_pin(pin: &str) -> Result<ClearPin, ApiError> {
    ClearPin::new(pin).map_err(|_| ApiError::BadRequest("pin must be 4 to 12 digits".into()))
}

/// Issues a card.
#[utoipa::path(post, path = "/v1/cards", request_body = CreateCard,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 201, body = CardView), (status = 400, body = Problem), (status = 404, description = "Account does not exist", body = Problem), (status = 409, description = "Card already issued", body = Problem)))]
pub async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<CreateCard>,
) -> Result<Response, ApiError> {
    let req = body.value;
    validate_pan(&req.pan)?;
    validate_expiry(&req.expiry)?;
    let account_id = parse_id(&req.account_id, |s| AccountId::new(s))?;
    let pin = clear_pin(&req.pin)?;
    if let Some(upstream) = &req.upstream
        && !state
            .ctx
            .settings
            .upstreams
            .iter()
            .any(|u| &u.name == upstream)
    {
        return Err(ApiError::BadRequest(format!(
            "upstream {upstream:?} is not configured on this switch"
        )));
    }
    idempotent(&state, body.idempotency.as_ref(), || async {
        let pvv = state.ctx.hsm.make_pvv(&req.pan, &pin).map_err(|e| {
            ApiError::Unprocessable(format!("failed to derive the PIN verification value: {e}"))
        })?;
        let card = state
            .ctx
            .store
            .create_card(
                &NewCard {
                    pan_token: state.ctx.hsm.pan_token(&req.pan),
                    last4: req.pan[req.pan.len() - 4..].to_string(),
                    expiry: req.expiry.clone(),
                    account_id: account_id.clone(),
                    pvv: pvv.to_hex(),
                    upstream: req.upstream.clone(),
                },
                &caller.name,
            )
            .await?;
        let body = serde_json::to_value(CardView::from(&card)).map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::CREATED, body))
    })
    .await
}

/// One card.
#[utoipa::path(get, path = "/v1/cards/{id}", params(("id" = String, Path, description = "Card id")),
    responses((status = 200, body = CardView), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<axum::Json<CardView>, ApiError> {
    let id = parse_id(&id, |s| CardId::new(s))?;
    let card = state
        .ctx
        .store
        .get_card(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("card {id} does not exist")))?;
    Ok(axum::Json(CardView::from(&card)))
}

/// A new PIN.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PinReset {
    /// New PIN, 4–12 digits.
    #[schema(value_type = String)]
    pub pin: Zeroizing<String>,
    /// The card's PAN, needed to derive the PVV (the switch keeps only a keyed hash of it).
    #[schema(value_type = String)]
    pub pan: Zeroizing<String>,
}

impl std::fmt::Debug for PinReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinReset(<redacted>)")
    }
}

/// Sets a new PIN and unblocks it.
#[utoipa::path(post, path = "/v1/cards/{id}/pin-reset", request_body = PinReset, params(("id" = String, Path, description = "Card id")),
    responses((status = 200, body = CardView), (status = 404, body = Problem), (status = 422, description = "The PAN does not belong to this card", body = Problem)))]
pub async fn pin_reset(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: JsonBody<PinReset>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, |s| CardId::new(s))?;
    let req = body.value;
    validate_pan(&req.pan)?;
    let pin = clear_pin(&req.pin)?;
    idempotent(&state, body.idempotency.as_ref(), || async {
        let card = state
            .ctx
            .store
            .get_card(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("card {id} does not exist")))?;
        if state.ctx.hsm.pan_token(&req.pan) != card.pan_token {
            return Err(ApiError::Unprocessable(
                "the PAN given does not belong to this card".into(),
            ));
        }
        let pvv = state.ctx.hsm.make_pvv(&req.pan, &pin).map_err(|e| {
            ApiError::Unprocessable(format!("failed to derive the PIN verification value: {e}"))
        })?;
        state
            .ctx
            .store
            .reset_pin(&id, &pvv.to_hex(), &caller.name)
            .await?;
        let card = state
            .ctx
            .store
            .get_card(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("card {id} does not exist")))?;
        let body = serde_json::to_value(CardView::from(&card)).map_err(|_| ApiError::Internal)?;
        Ok((StatusCode::OK, body))
    })
    .await
}
