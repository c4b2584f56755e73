//! Reads what the spec points at outside the BankSwitch: the monitoring API's presence and the
//! switch's SAF figures (through its admin API, with a viewer token from a Secret).

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde::Deserialize;

use super::build::{ADMIN_PORT, names};
use super::validate::ValidatedBankSwitch;

/// `GET /v1/saf/stats` answer (the fields the operator uses; others are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafStats {
    /// Messages waiting for delivery.
    #[serde(default)]
    pub backlog: i64,
    /// Messages leased by a drainer right now.
    #[serde(default)]
    pub in_flight: i64,
    /// Age of the oldest waiting message.
    #[serde(default)]
    pub oldest_age_seconds: i64,
    /// Messages in the dead-letter list.
    #[serde(default)]
    pub dead_letters: i64,
}

/// Reading the SAF figures failed.
#[derive(Debug, thiserror::Error)]
pub enum SafStatsError {
    /// The viewer-token Secret could not be read.
    #[error("failed to read viewer token Secret {secret}")]
    ReadSecret {
        /// Secret name.
        secret: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Secret lacks the key or a `viewer:` line.
    #[error("failed to find a viewer token in Secret {secret} key {key}")]
    NoViewerToken {
        /// Secret name.
        secret: String,
        /// Key looked at.
        key: String,
    },
    /// The HTTP request failed (connect, timeout, status, body).
    #[error("failed to read {url}")]
    Http {
        /// URL asked.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
}

/// A bearer token; its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// Takes a token from a bare-token file or, with `tokens_file`, the first `viewer:` line.
    pub fn parse(contents: &str, tokens_file: bool) -> Option<Self> {
        if tokens_file {
            contents
                .lines()
                .filter_map(|l| l.trim().strip_prefix("viewer:"))
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(|t| Self(t.to_owned()))
        } else {
            let t = contents.trim();
            (!t.is_empty()).then(|| Self(t.to_owned()))
        }
    }
}

/// Where the operator gets SAF figures from; a trait so reconcile tests need no switch.
#[async_trait]
pub trait SafStatsSource: Send + Sync {
    /// Reads the figures for one BankSwitch.
    async fn fetch(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
    ) -> Result<SafStats, SafStatsError>;
}

/// The real source: plain HTTP to `<name>-admin.<ns>.svc:8080/v1/saf/stats`.
#[derive(Debug, Clone)]
pub struct HttpSafStats {
    http: reqwest::Client,
}

impl HttpSafStats {
    /// A client with a short timeout: a slow switch must not stall the reconcile loop.
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }
}

async fn viewer_token(
    client: &Client,
    bs: &ValidatedBankSwitch,
) -> Result<BearerToken, SafStatsError> {
    let admin = &bs.spec.admin;
    let (secret_ref, tokens_file) = match &admin.viewer_token_secret_ref {
        Some(r) => (r, false),
        None => (&admin.token_secret_ref, true),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &bs.namespace);
    let secret =
        secrets
            .get(&secret_ref.name)
            .await
            .map_err(|source| SafStatsError::ReadSecret {
                secret: secret_ref.name.clone(),
                source,
            })?;
    let no_token = || SafStatsError::NoViewerToken {
        secret: secret_ref.name.clone(),
        key: secret_ref.key.clone(),
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .ok_or_else(no_token)?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| no_token())?;
    BearerToken::parse(text, tokens_file).ok_or_else(no_token)
}

#[async_trait]
impl SafStatsSource for HttpSafStats {
    async fn fetch(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
    ) -> Result<SafStats, SafStatsError> {
        let token = viewer_token(client, bs).await?;
        let url = format!(
            "http://{}.{}.svc:{ADMIN_PORT}/v1/saf/stats",
            names::admin_service(&bs.name),
            bs.namespace
        );
        let http_err = |source| SafStatsError::Http {
            url: url.clone(),
            source,
        };
        self.http
            .get(&url)
            .bearer_auth(&token.0)
            .send()
            .await
            .map_err(http_err)?
            .error_for_status()
            .map_err(http_err)?
            .json::<SafStats>()
            .await
            .map_err(http_err)
    }
}

/// Whether `monitoring.coreos.com/v1` serves ServiceMonitor and PrometheusRule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitoringApis {
    /// `servicemonitors` is served.
    pub service_monitor: bool,
    /// `prometheusrules` is served.
    pub prometheus_rule: bool,
}

impl MonitoringApis {
    /// Both kinds are served.
    pub fn all_served(self) -> bool {
        self.service_monitor && self.prometheus_rule
    }
}

/// Asks API discovery which monitoring kinds exist (a 404 means none). Discovery is readable by
/// every authenticated user, so this needs no extra RBAC.
pub async fn discover_monitoring(client: &Client) -> Result<MonitoringApis, kube::Error> {
    match client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
    {
        Ok(list) => Ok(MonitoringApis {
            service_monitor: list.resources.iter().any(|r| r.name == "servicemonitors"),
            prometheus_rule: list.resources.iter().any(|r| r.name == "prometheusrules"),
        }),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(MonitoringApis::default()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewer_token_comes_from_the_viewer_line_only() {
        let file = "admin:s3cret-admin\nviewer: v1ewer \n";
        let token = BearerToken::parse(file, true).expect("token");
        assert_eq!(token.0, "v1ewer");
        assert!(BearerToken::parse("admin:only\n", true).is_none());
        assert_eq!(
            BearerToken::parse(" bare\n", false).map(|t| t.0),
            Some("bare".into())
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let token = BearerToken::parse("viewer:topsecret", true).expect("token");
        assert!(!format!("{token:?}").contains("topsecret"));
    }

    #[test]
    fn stats_json_shape_parses() {
        let stats: SafStats = serde_json::from_str(
            r#"{"backlog":250,"inFlight":3,"oldestAgeSeconds":42,"deadLetters":1,"byDestination":[]}"#,
        )
        .expect("parses");
        assert_eq!(
            stats,
            SafStats {
                backlog: 250,
                in_flight: 3,
                oldest_age_seconds: 42,
                dead_letters: 1
            }
        );
    }
}
