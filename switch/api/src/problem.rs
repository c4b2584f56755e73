//! Errors as RFC 9457 problem details (`application/problem+json`).

use serde::{Deserialize, Serialize};

/// A problem details document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A URI naming the kind of problem (stable, for clients to branch on).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened in this case and what to do.
    pub detail: String,
}
