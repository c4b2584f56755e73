//! Reads what the spec points at outside the BankSwitch: the monitoring API's presence and the
//! switch's SAF figures (through its admin API, with a viewer token from a Secret).

use async_trait::async_trait;
use kube::Client;

use super::validate::ValidatedBankSwitch;
pub use crate::switch_admin::SafStats;
use crate::switch_admin::{SwitchAdmin, SwitchAdminError, TokenFormat, read_token};

/// Reading the SAF figures failed (the token Secret, or the call to the switch).
pub type SafStatsError = SwitchAdminError;

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

/// The real source: `GET /v1/saf/stats` on the BankSwitch's admin Service, with a viewer token.
#[derive(Debug, Clone)]
pub struct HttpSafStats {
    admin: SwitchAdmin,
}

impl HttpSafStats {
    /// Reads SAF figures through `admin` (shared with the KeyRotation controller).
    pub fn new(admin: SwitchAdmin) -> Self {
        Self { admin }
    }
}

#[async_trait]
impl SafStatsSource for HttpSafStats {
    async fn fetch(
        &self,
        client: &Client,
        bs: &ValidatedBankSwitch,
    ) -> Result<SafStats, SafStatsError> {
        let admin = &bs.spec.admin;
        let (secret_ref, format) = match &admin.viewer_token_secret_ref {
            Some(r) => (r, TokenFormat::Bare),
            None => (
                &admin.token_secret_ref,
                TokenFormat::TokensFile { role: "viewer" },
            ),
        };
        let token = read_token(client, &bs.namespace, &bs.name, secret_ref, format).await?;
        let target = self
            .admin
            .target(client, &bs.namespace, &bs.name, &bs.spec)
            .await?;
        self.admin.saf_stats(&target, &token).await
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

/// Whether `cert-manager.io/v1` serves Certificates (a 404 means cert-manager is absent).
/// Discovery needs no RBAC beyond what every authenticated user has.
pub async fn discover_cert_manager(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources("cert-manager.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "certificates")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
