//! The transport-security parts of a `BankSwitch` spec (SPEC §7): `tls` (a cert-manager
//! Certificate or an existing TLS Secret) and `networkPolicy`.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// TLS for the admin API and, with `iso8583: true`, the ATM channel. Exactly one of
/// `issuerRef` (cert-manager issues and renews `<name>-tls`) or `secretName` (an existing
/// `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`). The Secret must carry the
/// label `switchyard.io/bankswitch: <name>` (a cert-manager Certificate made by the operator
/// sets it) so the operator may read its `ca.crt` to verify the admin API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("has(self.issuerRef) != has(self.secretName)").message("tls needs exactly one of issuerRef (cert-manager) or secretName (an existing TLS Secret)"))]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A cert-manager Issuer or ClusterIssuer; the operator creates a Certificate for the
    /// switch's Services and mounts the Secret cert-manager keeps renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// An existing `kubernetes.io/tls` Secret in this namespace (`tls.crt`, `tls.key`, `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Also serve the ISO 8583 (ATM and station) port over TLS. Terminals then need the CA.
    #[serde(default)]
    pub iso8583: bool,
    /// Require client certificates signed by the Secret's `ca.crt` on the ISO 8583 port (mTLS).
    #[serde(default)]
    pub iso8583_client_auth: bool,
    /// More DNS names for the cert-manager Certificate besides the Services' own, e.g. the name
    /// ATMs dial through the load balancer (`issuerRef` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub dns_names: Vec<String>,
}

/// A cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the Issuer or ClusterIssuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (this namespace) or `ClusterIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
}

/// Kind of cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IssuerKind {
    /// A namespaced `Issuer` in the BankSwitch's namespace.
    #[default]
    Issuer,
    /// A cluster-wide `ClusterIssuer`.
    ClusterIssuer,
}

impl IssuerKind {
    /// The kind as cert-manager spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issuer => "Issuer",
            Self::ClusterIssuer => "ClusterIssuer",
        }
    }
}

/// Which traffic may reach the switch pods (a NetworkPolicy the operator owns).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy (default true). Off: all traffic the cluster allows.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may reach the ISO 8583 port (ATMs, acquirer stations, their load balancer's
    /// addresses). Empty: any source (the channel authenticates terminals by MAC and, with
    /// mTLS, by certificate); list peers to narrow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iso_from: Vec<NetworkPeer>,
    /// Who besides the operator may reach the admin API port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_from: Vec<NetworkPeer>,
    /// Namespace of the Prometheus that scrapes the metrics port.
    #[serde(default = "default_monitoring_namespace")]
    #[schemars(length(min = 1, max = 63))]
    pub monitoring_namespace: String,
    /// Namespace of the operator whose pods the admin API admits. Absent: the namespace the
    /// operator runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub operator_namespace: Option<String>,
    /// Port of the PostgreSQL server (switch and drainer pods may connect to it; the database
    /// URL itself is a Secret the operator does not read).
    #[serde(default = "default_database_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub database_port: i32,
    /// Where the drainers and switch pods may connect besides the database and upstreams
    /// named in the spec and DNS: CIDRs of the database and issuers when they are outside the
    /// cluster (their addresses cannot be derived from host names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_to: Vec<NetworkPeer>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            iso_from: Vec::new(),
            admin_from: Vec::new(),
            monitoring_namespace: default_monitoring_namespace(),
            operator_namespace: None,
            database_port: default_database_port(),
            egress_to: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_monitoring_namespace() -> String {
    "monitoring".into()
}

fn default_database_port() -> i32 {
    5432
}

/// One allowed peer: an address block, or pods selected by namespace and pod labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("has(self.cidr) != (has(self.namespaceSelector) || has(self.podSelector))").message("a peer is either a cidr or namespace/pod selectors"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkPeer {
    /// An address block, e.g. `10.20.0.0/16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub cidr: Option<String>,
    /// Namespaces by label (`matchLabels`); with `podSelector` alone: this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<std::collections::BTreeMap<String, String>>,
    /// Pods by label (`matchLabels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<std::collections::BTreeMap<String, String>>,
}
