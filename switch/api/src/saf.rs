//! Store-and-forward queue figures (`GET /v1/saf/stats`): what the operator scales drainers
//! from and what hibernation waits on.

use serde::{Deserialize, Serialize};

/// Backlog of one destination and priority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BacklogView {
    /// Upstream name.
    pub destination: String,
    /// Priority (0 highest).
    pub priority: u8,
    /// Advices waiting (including those leased right now).
    pub count: u64,
}

/// Queue figures; the operator scales drainers from `backlog` and `inFlight`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SafStatsView {
    /// Advices waiting for delivery, all destinations.
    pub backlog: u64,
    /// Of those, leased by a drainer right now.
    pub in_flight: u64,
    /// Age of the oldest waiting advice, in seconds (0 when none).
    pub oldest_age_seconds: u64,
    /// Advices in the dead-letter list.
    pub dead_letters: u64,
    /// Advices delivered since the queue was created.
    pub delivered_total: u64,
    /// Backlog per destination and priority.
    pub by_destination: Vec<BacklogView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip_in_camel_case_and_ignore_new_fields() {
        let stats: SafStatsView = serde_json::from_str(
            r#"{"backlog":250,"inFlight":3,"oldestAgeSeconds":42,"deadLetters":1,"deliveredTotal":9,
                "byDestination":[{"destination":"issuer-b","priority":1,"count":250}],"later":true}"#,
        )
        .expect("parses");
        assert_eq!(stats.backlog, 250);
        assert_eq!(stats.by_destination[0].destination, "issuer-b");
        let json = serde_json::to_value(&stats).expect("serializes");
        assert_eq!(json["oldestAgeSeconds"], 42);
        assert!(json.get("later").is_none());
    }
}
