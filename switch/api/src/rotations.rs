//! Fleet key rotations (`/v1/key-rotations`), which the KeyRotation controller drives.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

// Field order is fixed and absent options are left out, so a retried start sends the same bytes
// and the switch replays its first answer for the same `Idempotency-Key`. (A `//` comment: the
// `///` line below is the schema's description in the OpenAPI document.)
/// Starts a fleet rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRotation {
    /// `TPK` or `TAK`.
    pub key_type: String,
    /// `"all"`, `{"ids": [...]}` or `{"groups": [...]}`. `all` and `groups` leave acquirer
    /// stations out: an acquirer exchanges its station's keys itself.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub terminals: serde_json::Value,
    /// `onConfirm` (each key activates when its terminal confirms the KCV) or `atTime`.
    pub activation: String,
    /// With `atTime`: when the PENDING keys become ACTIVE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<DateTime<Utc>>,
    /// How long replaced keys keep verifying (default: the switch's `keys.grace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u64>,
    /// At most this many terminals between the key push and their answer at once (1 to
    /// 10,000; default: all at once). A terminal that does not answer within 30 s frees its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
}

/// A rotation's id and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RotationCreated {
    /// Rotation id.
    pub id: String,
    /// Terminals in it.
    pub terminals: usize,
}

/// Progress of a fleet rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RotationView {
    /// Rotation id.
    pub id: String,
    /// Key type.
    pub key_type: String,
    /// `onConfirm` or `atTime`.
    pub activation: String,
    /// With `atTime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<DateTime<Utc>>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// Terminals in it.
    pub terminals: u64,
    /// Its keys by state (`PENDING`, `ACTIVE`, `EXPIRED`, `REVOKED`).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub totals: std::collections::BTreeMap<String, u64>,
}

/// How many previous keys were ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ExpirePreviousResult {
    /// Rotation id.
    pub id: String,
    /// Previous keys whose grace window was ended now.
    pub expired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_leaves_absent_options_out_and_refuses_unknown_fields() {
        let body = CreateRotation {
            key_type: "TAK".into(),
            terminals: serde_json::json!("all"),
            activation: "onConfirm".into(),
            activate_at: None,
            grace_seconds: Some(300),
            max_concurrent: Some(50),
        };
        let json = serde_json::to_string(&body).expect("serializes");
        assert_eq!(
            json,
            r#"{"keyType":"TAK","terminals":"all","activation":"onConfirm","graceSeconds":300,"maxConcurrent":50}"#
        );
        assert_eq!(
            serde_json::from_str::<CreateRotation>(&json).expect("parses"),
            body
        );
        assert!(
            serde_json::from_str::<CreateRotation>(
                r#"{"keyType":"TAK","terminals":"all","activation":"onConfirm","color":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn an_activation_time_is_rfc3339_utc() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:10:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let body = CreateRotation {
            key_type: "TPK".into(),
            terminals: serde_json::json!({"ids": ["ATM1"]}),
            activation: "atTime".into(),
            activate_at: Some(at),
            grace_seconds: None,
            max_concurrent: None,
        };
        assert_eq!(
            serde_json::to_value(&body).expect("serializes")["activateAt"],
            "2026-01-01T00:10:00Z"
        );
    }
}
