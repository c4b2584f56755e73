//! The operator's one client for the switch's admin REST API (SPEC §5): bearer tokens read from
//! the BankSwitch's Secrets, SAF figures for drainer scaling, and fleet key rotations.
//!
//! Tokens never reach logs, errors or `Debug` output; error messages carry the URL, the HTTP
//! status and the switch's problem `detail` (which the switch keeps free of secrets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::bank_switch::build::{ADMIN_PORT, names};
use crate::bank_switch::secrets::{SecretAccessError, read_opted_in, tls_secret_for};
use crate::crd::bank_switch::{BankSwitchSpec, SecretKeyRef};

/// How long one admin API call may take: a slow switch must not stall the reconcile loop.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest problem `detail` kept from an error answer.
const MAX_DETAIL: usize = 300;

/// A call to the switch admin API (or reading the token for it) failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchAdminError {
    /// The token or TLS Secret could not be read (missing, not labelled for the BankSwitch, or
    /// an API error).
    #[error("failed to read the Secret for the switch admin API")]
    ReadSecret(#[source] SecretAccessError),
    /// The TLS Secret has no usable `ca.crt` to verify the admin API's certificate with.
    #[error(
        "Secret {secret} has no usable ca.crt (PEM certificates) to verify the switch admin API with"
    )]
    NoCa {
        /// Secret name.
        secret: String,
    },
    /// The HTTPS client for a CA could not be built.
    #[error("failed to build an HTTPS client trusting the CA in Secret {secret}")]
    Client {
        /// Secret name.
        secret: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The Secret lacks the key, or the tokens file has no line for the role.
    #[error(
        "failed to find a {role} token in Secret {secret} key {key}; add a `{role}:<token>` line"
    )]
    NoToken {
        /// Secret name.
        secret: String,
        /// Key looked at.
        key: String,
        /// Role wanted (`viewer` or `admin`).
        role: &'static str,
    },
    /// The request did not get an answer (connect, timeout, reading the body).
    #[error("failed to reach the switch admin API at {url}")]
    Request {
        /// URL asked.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The switch answered with an error status.
    #[error("the switch admin API answered {status} to {method} {url}: {detail}")]
    Status {
        /// HTTP method.
        method: &'static str,
        /// URL asked.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The problem document's `detail`, or the status text.
        detail: String,
    },
    /// The answer was not the JSON shape expected.
    #[error("failed to decode the switch admin API answer from {url}")]
    Decode {
        /// URL asked.
        url: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
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

/// How a token is stored in its Secret key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// The whole value is the token (`spec.admin.viewerTokenSecretRef`).
    Bare,
    /// A tokens file with `role:token` lines (`spec.admin.tokenSecretRef`); the first line of the
    /// role is used.
    TokensFile {
        /// `viewer` or `admin`.
        role: &'static str,
    },
}

impl TokenFormat {
    fn role(self) -> &'static str {
        match self {
            Self::Bare => "viewer",
            Self::TokensFile { role } => role,
        }
    }
}

impl BearerToken {
    /// Takes a token out of a Secret value.
    pub fn parse(contents: &str, format: TokenFormat) -> Option<Self> {
        match format {
            TokenFormat::TokensFile { role } => contents
                .lines()
                .filter_map(|l| l.trim().strip_prefix(role)?.strip_prefix(':'))
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(|t| Self(t.to_owned())),
            TokenFormat::Bare => {
                let t = contents.trim();
                (!t.is_empty()).then(|| Self(t.to_owned()))
            }
        }
    }

    /// The token value, for the `Authorization` header only.
    fn expose(&self) -> &str {
        &self.0
    }
}

/// Reads a token from `secret_ref` in `namespace`; the Secret must carry the opt-in label for
/// BankSwitch `bankswitch`.
pub async fn read_token(
    client: &Client,
    namespace: &str,
    bankswitch: &str,
    secret_ref: &SecretKeyRef,
    format: TokenFormat,
) -> Result<BearerToken, SwitchAdminError> {
    let secret = read_opted_in(client, namespace, bankswitch, &secret_ref.name)
        .await
        .map_err(SwitchAdminError::ReadSecret)?;
    let no_token = || SwitchAdminError::NoToken {
        secret: secret_ref.name.clone(),
        key: secret_ref.key.clone(),
        role: format.role(),
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .ok_or_else(no_token)?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| no_token())?;
    BearerToken::parse(text, format).ok_or_else(no_token)
}

/// Where the admin API of a BankSwitch is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEndpoint {
    /// `http(s)://<name>-admin.<namespace>.svc:8080`, the Service the operator builds (`https`
    /// when the BankSwitch has `spec.tls`).
    ClusterService,
    /// One base URL for every BankSwitch (tests, or an operator run outside the cluster through
    /// a port-forward).
    Fixed(String),
}

/// `GET /v1/saf/stats` answer.
pub use switchyard_api::SafStatsView as SafStats;
pub use switchyard_api::{
    CreateRotation, ExpirePreviousResult as PreviousExpired, HibernateRequest, MaintenanceState,
    MaintenanceStatus, Problem, RotationCreated, RotationView as RotationProgress,
};

/// One BankSwitch's admin API: its base URL and the HTTP client to reach it with (one that
/// trusts only that BankSwitch's CA when it serves HTTPS).
#[derive(Clone, Debug)]
pub struct AdminTarget {
    /// Base URL, e.g. `https://atm-admin.payments.svc:8080`.
    pub base: String,
    http: reqwest::Client,
}

/// The HTTP clients for every switch admin API call the operator makes.
#[derive(Clone, Debug)]
pub struct SwitchAdmin {
    http: reqwest::Client,
    endpoint: AdminEndpoint,
    /// HTTPS clients by the SHA-256 of the CA bundle they trust: one connection pool per CA,
    /// built once (a cert-manager CA is shared by every BankSwitch it issued for).
    tls_clients: Arc<Mutex<HashMap<[u8; 32], reqwest::Client>>>,
}

impl SwitchAdmin {
    /// A client with a short per-request timeout.
    pub fn new(endpoint: AdminEndpoint) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()?,
            endpoint,
            tls_clients: Arc::default(),
        })
    }

    /// Base URL of the admin API of BankSwitch `name` in `namespace`, `https` when `tls`.
    pub fn base_url(&self, namespace: &str, name: &str, tls: bool) -> String {
        match &self.endpoint {
            AdminEndpoint::ClusterService => format!(
                "{}://{}.{namespace}.svc:{ADMIN_PORT}",
                if tls { "https" } else { "http" },
                names::admin_service(name)
            ),
            AdminEndpoint::Fixed(url) => url.trim_end_matches('/').to_owned(),
        }
    }

    /// The target for `base`, trusting only the PEM certificates in `ca_pem` when given (no
    /// system roots: the admin API's certificate comes from the BankSwitch's own CA). `secret`
    /// names where the CA came from, for errors.
    pub fn target_with_ca(
        &self,
        base: String,
        ca_pem: Option<&[u8]>,
        secret: &str,
    ) -> Result<AdminTarget, SwitchAdminError> {
        let Some(pem) = ca_pem else {
            return Ok(AdminTarget {
                base,
                http: self.http.clone(),
            });
        };
        let digest: [u8; 32] = Sha256::digest(pem).into();
        if let Ok(cache) = self.tls_clients.lock()
            && let Some(http) = cache.get(&digest)
        {
            return Ok(AdminTarget {
                base,
                http: http.clone(),
            });
        }
        let no_ca = || SwitchAdminError::NoCa {
            secret: secret.to_owned(),
        };
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|_| no_ca())?;
        if certs.is_empty() {
            return Err(no_ca());
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tls_certs_only(certs)
            .tls_version_min(reqwest::tls::Version::TLS_1_2)
            // the token must never leave in clear once the switch speaks TLS
            .https_only(true)
            .build()
            .map_err(|source| SwitchAdminError::Client {
                secret: secret.to_owned(),
                source,
            })?;
        if let Ok(mut cache) = self.tls_clients.lock() {
            cache.insert(digest, http.clone());
        }
        Ok(AdminTarget { base, http })
    }

    /// The target for BankSwitch `name` in `namespace`: plain HTTP without `spec.tls`, else
    /// HTTPS verified against `ca.crt` of its TLS Secret (read only with the opt-in label).
    pub async fn target(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        spec: &BankSwitchSpec,
    ) -> Result<AdminTarget, SwitchAdminError> {
        let Some(tls) = &spec.tls else {
            return self.target_with_ca(self.base_url(namespace, name, false), None, "");
        };
        let (secret_name, ca) = read_ca(client, namespace, name, tls).await?;
        self.target_with_ca(
            self.base_url(namespace, name, true),
            Some(&ca),
            &secret_name,
        )
    }

    /// The target for one switch pod of BankSwitch `name`: the admin Service's URL (so HTTPS
    /// verifies the same certificate name) resolved to the pod's own address. A hibernating pod
    /// is not ready and its Service no longer routes to it, so maintenance calls go to each
    /// pod. With a fixed endpoint (tests, a port-forward) it is that endpoint.
    pub async fn pod_target(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        spec: &BankSwitchSpec,
        pod_ip: IpAddr,
    ) -> Result<AdminTarget, SwitchAdminError> {
        if matches!(self.endpoint, AdminEndpoint::Fixed(_)) {
            return self.target(client, namespace, name, spec).await;
        }
        let host = format!("{}.{namespace}.svc", names::admin_service(name));
        let port = u16::try_from(ADMIN_PORT).unwrap_or(8080);
        let builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .resolve(&host, SocketAddr::new(pod_ip, port));
        let (builder, secret_name) = match &spec.tls {
            None => (builder, String::new()),
            Some(tls) => {
                let (secret_name, ca) = read_ca(client, namespace, name, tls).await?;
                let certs = reqwest::Certificate::from_pem_bundle(&ca)
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| SwitchAdminError::NoCa {
                        secret: secret_name.clone(),
                    })?;
                let builder = builder
                    .tls_certs_only(certs)
                    .tls_version_min(reqwest::tls::Version::TLS_1_2)
                    .https_only(true);
                (builder, secret_name)
            }
        };
        let http = builder.build().map_err(|source| SwitchAdminError::Client {
            secret: secret_name,
            source,
        })?;
        Ok(AdminTarget {
            base: self.base_url(namespace, name, spec.tls.is_some()),
            http,
        })
    }

    /// `GET /v1/maintenance` (viewer or admin token).
    pub async fn maintenance(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
    ) -> Result<MaintenanceStatus, SwitchAdminError> {
        let url = format!("{}/v1/maintenance", target.base);
        self.send("GET", target.http.get(&url), url, token).await
    }

    /// `POST /v1/maintenance/hibernate` (admin token). Idempotent: a hibernating switch keeps
    /// its first deadline.
    pub async fn hibernate(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
        body: &HibernateRequest,
    ) -> Result<MaintenanceStatus, SwitchAdminError> {
        let url = format!("{}/v1/maintenance/hibernate", target.base);
        self.send("POST", target.http.post(&url).json(body), url, token)
            .await
    }

    /// `POST /v1/maintenance/resume` (admin token).
    pub async fn resume(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
    ) -> Result<MaintenanceStatus, SwitchAdminError> {
        let url = format!("{}/v1/maintenance/resume", target.base);
        self.send("POST", target.http.post(&url), url, token).await
    }

    /// `GET /v1/saf/stats` (viewer token).
    pub async fn saf_stats(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
    ) -> Result<SafStats, SwitchAdminError> {
        let url = format!("{}/v1/saf/stats", target.base);
        self.send("GET", target.http.get(&url), url, token).await
    }

    /// `POST /v1/key-rotations` with an `Idempotency-Key` (admin token).
    pub async fn create_rotation(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
        body: &CreateRotation,
        idempotency_key: &str,
    ) -> Result<RotationCreated, SwitchAdminError> {
        let url = format!("{}/v1/key-rotations", target.base);
        let request = target
            .http
            .post(&url)
            .header("Idempotency-Key", idempotency_key)
            .json(body);
        self.send("POST", request, url, token).await
    }

    /// `GET /v1/key-rotations/{id}`.
    pub async fn rotation(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
        id: &str,
    ) -> Result<RotationProgress, SwitchAdminError> {
        let url = format!("{}/v1/key-rotations/{}", target.base, path_segment(id));
        self.send("GET", target.http.get(&url), url, token).await
    }

    /// `POST /v1/key-rotations/{id}/expire-previous` (admin token).
    pub async fn expire_previous(
        &self,
        target: &AdminTarget,
        token: &BearerToken,
        id: &str,
    ) -> Result<PreviousExpired, SwitchAdminError> {
        let url = format!(
            "{}/v1/key-rotations/{}/expire-previous",
            target.base,
            path_segment(id)
        );
        self.send("POST", target.http.post(&url), url, token).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &'static str,
        request: reqwest::RequestBuilder,
        url: String,
        token: &BearerToken,
    ) -> Result<T, SwitchAdminError> {
        let request_err = |source| SwitchAdminError::Request {
            url: url.clone(),
            source,
        };
        let response = request
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(request_err)?;
        let status = response.status();
        let body = response.bytes().await.map_err(request_err)?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<Problem>(&body)
                .ok()
                .map(|p| p.detail)
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
            return Err(SwitchAdminError::Status {
                method,
                url,
                status: status.as_u16(),
                detail: detail.chars().take(MAX_DETAIL).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| SwitchAdminError::Decode { url, source })
    }
}

/// The BankSwitch's TLS Secret name and its `ca.crt` (read only with the opt-in label).
async fn read_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    tls: &crate::crd::security::TlsSpec,
) -> Result<(String, Vec<u8>), SwitchAdminError> {
    let secret_name = tls
        .secret_name
        .clone()
        .unwrap_or_else(|| tls_secret_for(name));
    let secret = read_opted_in(client, namespace, name, &secret_name)
        .await
        .map_err(SwitchAdminError::ReadSecret)?;
    let ca = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .filter(|ca| !ca.0.is_empty())
        .ok_or_else(|| SwitchAdminError::NoCa {
            secret: secret_name.clone(),
        })?;
    Ok((secret_name, ca.0.clone()))
}

/// Installs rustls' `ring` provider as the process default. reqwest is built on rustls without
/// a bundled provider (no aws-lc-rs), so this must run before any client is built; another
/// caller may have installed it already, which is fine.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rotation id comes from the switch; keep it to one path segment whatever it contains.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_line_of_the_wanted_role_only() {
        let file = "admin:s3cret-admin\nviewer: v1ewer \nadministrator:nope\n";
        let viewer = TokenFormat::TokensFile { role: "viewer" };
        let admin = TokenFormat::TokensFile { role: "admin" };
        assert_eq!(
            BearerToken::parse(file, viewer).map(|t| t.0),
            Some("v1ewer".into())
        );
        assert_eq!(
            BearerToken::parse(file, admin).map(|t| t.0),
            Some("s3cret-admin".into())
        );
        assert!(BearerToken::parse("admin:only\n", viewer).is_none());
        assert!(BearerToken::parse("administrator:x\n", admin).is_none());
        assert_eq!(
            BearerToken::parse(" bare\n", TokenFormat::Bare).map(|t| t.0),
            Some("bare".into())
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let token = BearerToken::parse(
            "viewer:topsecret",
            TokenFormat::TokensFile { role: "viewer" },
        )
        .expect("token");
        assert!(!format!("{token:?}").contains("topsecret"));
    }

    #[test]
    fn stats_json_shape_parses() {
        let stats: SafStats = serde_json::from_str(
            r#"{"backlog":250,"inFlight":3,"oldestAgeSeconds":42,"deadLetters":1,"deliveredTotal":0,"byDestination":[]}"#,
        )
        .expect("parses");
        assert_eq!(
            stats,
            SafStats {
                backlog: 250,
                in_flight: 3,
                oldest_age_seconds: 42,
                dead_letters: 1,
                ..SafStats::default()
            }
        );
    }

    #[test]
    fn rotation_shapes_match_the_switch() {
        let view: RotationProgress = serde_json::from_str(
            r#"{"id":"r-1","keyType":"TPK","activation":"onConfirm","createdAt":"2026-01-01T00:00:00Z",
                "terminals":3,"totals":{"ACTIVE":2,"EXPIRED":0,"PENDING":1,"REVOKED":0}}"#,
        )
        .expect("parses");
        assert_eq!(view.totals.get("PENDING"), Some(&1));
        // the request body's wire form is tested where the type lives (switchyard-api)
    }

    #[test]
    fn rotation_ids_stay_one_path_segment() {
        assert_eq!(path_segment("rot-01_a.b~"), "rot-01_a.b~");
        assert_eq!(path_segment("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn cluster_and_fixed_endpoints() {
        let admin = SwitchAdmin::new(AdminEndpoint::ClusterService).expect("client");
        assert_eq!(
            admin.base_url("payments", "atm", false),
            "http://atm-admin.payments.svc:8080"
        );
        assert_eq!(
            admin.base_url("payments", "atm", true),
            "https://atm-admin.payments.svc:8080"
        );
        let admin =
            SwitchAdmin::new(AdminEndpoint::Fixed("http://127.0.0.1:1/".into())).expect("client");
        assert_eq!(
            admin.base_url("payments", "atm", true),
            "http://127.0.0.1:1"
        );
    }
}
