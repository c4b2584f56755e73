//! Pure builders for the transport-security objects of a BankSwitch (SPEC §7): the cert-manager
//! `Certificate` for `spec.tls.issuerRef`, the switch config's TLS file paths, and the
//! NetworkPolicies of `spec.networkPolicy`. No client here; `build_all` and the reconciler call
//! these.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::build::{
    ADMIN_PORT, METRICS_PORT, SECRETS_DIR, component, metadata, names, selector_labels,
};
use super::secrets::{SECRET_OPT_IN_LABEL, tls_secret_for};
use super::validate::{StorageMode, ValidatedBankSwitch};
use crate::crd::security::NetworkPeer;

/// Where the TLS Secret's files land inside the pods (under the projected Secrets volume).
pub const TLS_DIR: &str = "tls";
/// Labels of the operator's pods (chart and kustomize base), admitted to the admin port.
pub const OPERATOR_POD_NAME: &str = "switchyard-operator";

/// Name of the TLS Secret the pods mount: the given one, or `<name>-tls` kept by cert-manager.
pub fn tls_secret_name(bs: &ValidatedBankSwitch) -> Option<String> {
    let tls = bs.spec.tls.as_ref()?;
    Some(match &tls.secret_name {
        Some(name) => name.clone(),
        None => tls_secret_for(&bs.name),
    })
}

/// `cert-manager.io/v1` Certificate.
pub fn certificate_api_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cert-manager.io",
        "v1",
        "Certificate",
    ))
}

/// DNS names clients use for the switch's two Services (short, namespaced and FQDN forms).
pub fn service_dns_names(bs: &ValidatedBankSwitch) -> Vec<String> {
    let mut out = Vec::new();
    for svc in [names::admin_service(&bs.name), names::iso_service(&bs.name)] {
        out.push(svc.clone());
        out.push(format!("{svc}.{}", bs.namespace));
        out.push(format!("{svc}.{}.svc", bs.namespace));
        out.push(format!("{svc}.{}.svc.cluster.local", bs.namespace));
    }
    out
}

/// The Certificate for `spec.tls.issuerRef` (`None` without it). Its Secret carries the opt-in
/// label so the operator may read `ca.crt` from it.
pub fn build_certificate(bs: &ValidatedBankSwitch) -> Option<DynamicObject> {
    let tls = bs.spec.tls.as_ref()?;
    let issuer = tls.issuer_ref.as_ref()?;
    let secret = tls_secret_name(bs)?;
    let mut obj = DynamicObject::new(&names::switch(&bs.name), &certificate_api_resource())
        .within(&bs.namespace)
        .data(json!({
            "spec": {
                "secretName": secret,
                "secretTemplate": { "labels": { SECRET_OPT_IN_LABEL: bs.name } },
                "commonName": names::admin_service(&bs.name),
                "dnsNames": service_dns_names(bs).into_iter().chain(tls.dns_names.iter().cloned()).collect::<Vec<_>>(),
                "duration": "2160h",
                "renewBefore": "360h",
                "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
                "usages": ["digital signature", "server auth"],
                "issuerRef": { "name": issuer.name, "kind": issuer.kind.as_str(), "group": "cert-manager.io" },
            }
        }));
    obj.metadata = metadata(bs, names::switch(&bs.name), component::SWITCH);
    Some(obj)
}

/// `[admin.tls]` / `[iso8583.tls]` of the rendered config.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TlsSection {
    /// `tls.crt` of the mounted Secret.
    pub cert_file: String,
    /// `tls.key` of the mounted Secret.
    pub key_file: String,
    /// `ca.crt` when clients must present certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<String>,
}

/// The TLS sections of the switch config: (admin, iso8583).
pub fn tls_sections(bs: &ValidatedBankSwitch) -> (Option<TlsSection>, Option<TlsSection>) {
    let Some(tls) = bs.spec.tls.as_ref() else {
        return (None, None);
    };
    let file = |key: &str| format!("{SECRETS_DIR}/{TLS_DIR}/{key}");
    let admin = TlsSection {
        cert_file: file("tls.crt"),
        key_file: file("tls.key"),
        client_ca_file: None,
    };
    let iso = tls.iso8583.then(|| TlsSection {
        client_ca_file: tls.iso8583_client_auth.then(|| file("ca.crt")),
        ..admin.clone()
    });
    (Some(admin), iso)
}

fn label_selector(labels: Option<&BTreeMap<String, String>>) -> Option<LabelSelector> {
    labels.map(|l| LabelSelector {
        match_labels: Some(l.clone()),
        ..LabelSelector::default()
    })
}

fn peer(p: &NetworkPeer) -> NetworkPolicyPeer {
    match &p.cidr {
        Some(cidr) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.clone(),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        },
        None => NetworkPolicyPeer {
            namespace_selector: label_selector(p.namespace_selector.as_ref()),
            pod_selector: label_selector(p.pod_selector.as_ref()),
            ..NetworkPolicyPeer::default()
        },
    }
}

fn namespace_peer(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: label_selector(Some(&BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            namespace.to_string(),
        )]))),
        ..NetworkPolicyPeer::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        end_port: None,
    }
}

fn dns_egress() -> NetworkPolicyEgressRule {
    let port = |protocol: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(53)),
        protocol: Some(protocol.into()),
        end_port: None,
    };
    NetworkPolicyEgressRule {
        ports: Some(vec![port("UDP"), port("TCP")]),
        to: None,
    }
}

/// Ports of the upstream endpoints (`host:port`), sorted and deduplicated.
fn upstream_ports(bs: &ValidatedBankSwitch) -> Vec<i32> {
    let mut ports: Vec<i32> = bs
        .spec
        .routing
        .upstreams
        .iter()
        .flat_map(|u| u.endpoints.iter())
        .filter_map(|e| e.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Egress of switch and drainer pods: DNS, then the database and upstream ports only — to the
/// `egressTo` peers when listed (host names cannot become addresses in a policy), else to any
/// address on those ports.
fn egress(bs: &ValidatedBankSwitch) -> Vec<NetworkPolicyEgressRule> {
    let np = &bs.spec.network_policy;
    let mut ports: Vec<NetworkPolicyPort> = upstream_ports(bs).into_iter().map(tcp).collect();
    if bs.storage_mode == StorageMode::Postgres {
        ports.push(tcp(np.database_port));
    }
    let mut rules = vec![dns_egress()];
    if !ports.is_empty() {
        rules.push(NetworkPolicyEgressRule {
            ports: Some(ports),
            to: (!np.egress_to.is_empty()).then(|| np.egress_to.iter().map(peer).collect()),
        });
    }
    rules
}

fn policy(
    bs: &ValidatedBankSwitch,
    name: String,
    pods: &str,
    ingress: Vec<NetworkPolicyIngressRule>,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: metadata(bs, name, pods),
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(bs, pods)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress(bs)),
        }),
    }
}

/// The NetworkPolicies of `spec.networkPolicy` (empty when disabled): switch pods admit the
/// ISO port from `isoFrom` (from anywhere when it is empty), the admin port from the operator's namespace and `adminFrom`, the
/// metrics port from the monitoring namespace; drainer pods admit only metrics scrapes; both
/// reach only DNS, the database and the upstream ports.
pub fn build_network_policies(
    bs: &ValidatedBankSwitch,
    operator_namespace: &str,
) -> Vec<NetworkPolicy> {
    let np = &bs.spec.network_policy;
    if !np.enabled {
        return Vec::new();
    }
    let metrics = NetworkPolicyIngressRule {
        from: Some(vec![namespace_peer(&np.monitoring_namespace)]),
        ports: Some(vec![tcp(METRICS_PORT)]),
    };
    // the operator's pods only (namespace AND pod labels), not everything in its namespace
    let operator = NetworkPolicyPeer {
        pod_selector: label_selector(Some(&BTreeMap::from([(
            "app.kubernetes.io/name".to_string(),
            OPERATOR_POD_NAME.to_string(),
        )]))),
        ..namespace_peer(
            np.operator_namespace
                .as_deref()
                .unwrap_or(operator_namespace),
        )
    };
    let mut admin_from = vec![operator];
    admin_from.extend(np.admin_from.iter().map(peer));
    // the web ATM provisions its terminal through the admin API and is an ATM on the ISO port
    let simulator = bs.spec.simulator.enabled.then(|| NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(bs, super::simulator::COMPONENT)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    });
    admin_from.extend(simulator.clone());
    let iso_from = (!np.iso_from.is_empty()).then(|| {
        np.iso_from
            .iter()
            .map(peer)
            .chain(simulator)
            .collect::<Vec<_>>()
    });
    let switch_ingress = vec![
        NetworkPolicyIngressRule {
            // an absent `from` admits every source: ATMs arrive through a load balancer from
            // anywhere, and the channel authenticates them (MACs, and certificates with mTLS)
            from: iso_from,
            ports: Some(vec![tcp(bs.spec.iso8583.port)]),
        },
        NetworkPolicyIngressRule {
            from: Some(admin_from),
            ports: Some(vec![tcp(ADMIN_PORT)]),
        },
        metrics.clone(),
    ];
    let mut out = vec![policy(
        bs,
        names::switch(&bs.name),
        component::SWITCH,
        switch_ingress,
    )];
    if bs.storage_mode == StorageMode::Postgres {
        out.push(policy(
            bs,
            names::drainer(&bs.name),
            component::DRAINER,
            vec![metrics],
        ));
    }
    out
}
