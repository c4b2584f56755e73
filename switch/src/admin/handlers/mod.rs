//! Admin API handlers, one module per resource.

pub mod accounts;
pub mod audit;
pub mod cards;
pub mod keys;
pub mod maintenance;
pub mod saf;
pub mod terminals;

use super::error::ApiError;

/// Parses a path or body identifier, turning a validation error into a 400 that names it.
pub(crate) fn parse_id<T, E: std::fmt::Display>(
    raw: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, ApiError> {
    parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}
