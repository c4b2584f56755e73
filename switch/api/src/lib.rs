//! The request and response bodies of the Switchyard admin REST API (SPEC §5) that more than one
//! program speaks: the switch serves them, the operator calls them. One definition, so the two
//! cannot drift apart.
//!
//! JSON is camelCase. Request bodies refuse unknown fields (the switch answers `400`); response
//! bodies do not, so a newer switch may add fields an older operator ignores. With the feature
//! `openapi` every type also derives `utoipa::ToSchema` for the switch's `/v1/openapi.json`.
#![forbid(unsafe_code)]

pub mod maintenance;
pub mod problem;
pub mod rotations;
pub mod saf;

pub use maintenance::{HibernateRequest, MaintenanceState, MaintenanceStatus};
pub use problem::Problem;
pub use rotations::{CreateRotation, ExpirePreviousResult, RotationCreated, RotationView};
pub use saf::{BacklogView, SafStatsView};
