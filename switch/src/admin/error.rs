//! Admin API errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every error says what went wrong and what to do; none carries key material, PINs, PANs or
//! database internals (store errors are logged server-side and answered generically).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

pub use switchyard_api::Problem;

/// An error answered by the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be understood.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no or unknown bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: authenticated, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with current state.
    #[error("{0}")]
    Conflict(String),
    /// 413.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 415.
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    /// 422: well-formed but invalid (e.g. a key block whose KCV does not match).
    #[error("{0}")]
    Unprocessable(String),
    /// 409: another attempt of this request (same `Idempotency-Key`) has claimed the key and
    /// not answered yet (`stale`: for longer than a write takes; presumed lost).
    #[error("{}", if *stale {
        "a request with this Idempotency-Key was applied but its answer was not recorded (the switch stopped mid-request); look the result up instead of retrying"
    } else {
        "a request with this Idempotency-Key is in progress; retry"
    })]
    InProgress {
        /// Claimed longer ago than any write takes.
        stale: bool,
    },
    /// 429: a rate limit of the admin API; `Retry-After` says when to come back.
    #[error("too many requests {scope}; retry after {retry_after} s")]
    TooManyRequests {
        /// Whose limit, e.g. "from this address".
        scope: &'static str,
        /// Whole seconds until a request would be accepted.
        retry_after: u64,
    },
    /// 503: the request took longer than the server's `request_timeout`.
    #[error("the request took longer than {}s; retry", .0.as_secs_f64())]
    TimedOut(std::time::Duration),
    /// 503: the store is unavailable; retry later.
    #[error("the switch's database is unavailable; retry later")]
    Unavailable,
    /// 500.
    #[error("internal error; see the switch log")]
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
            ),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Request too large",
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            ApiError::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                "Request refused",
            ),
            ApiError::InProgress { .. } => (StatusCode::CONFLICT, "in-progress", "In progress"),
            ApiError::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            ApiError::TimedOut(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request timed out",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        let (status, kind, title) = self.parts();
        Problem {
            kind: format!("https://switchyard.io/problems/{kind}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict { what } => ApiError::Conflict(format!("{what} already exists")),
            StoreError::InvalidTransition { from, to } => ApiError::Conflict(format!(
                "a key in state {from} cannot become {to}; list the terminal's keys to see their states"
            )),
            StoreError::LeaseLost { .. } | StoreError::AdviceState { .. } => {
                ApiError::Conflict(err.to_string())
            }
            StoreError::IdempotencyClaimed => ApiError::InProgress { stale: false },
            StoreError::Invalid { what } => ApiError::BadRequest(format!("invalid input: {what}")),
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "admin request failed: store unavailable");
                ApiError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "admin request failed");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let status = self.status();
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            ApiError::InProgress { stale: false } => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchyard\""),
            );
        }
        response
    }
}
