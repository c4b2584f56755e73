//! `spec.simulator`: the web ATM (`switchyard-atm web`, SPEC §7a) as a Deployment and Service
//! beside the switch, for staging. Pure builders; the pod provisions its own terminal and test
//! cards through the switch's admin API at start-up, with the admin token and KEK from the
//! BankSwitch's Secrets (only those two: it never sees the LMK or the database URL). With
//! `spec.tls` it reaches both ports over TLS and verifies them against `ca.crt` of the TLS
//! Secret (only that key is mounted: never the switch's private key).

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecretProjection,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::build::{ADMIN_PORT, RUN_AS, labels, names, selector_labels};
use super::validate::ValidatedBankSwitch;

/// Component label of the web ATM's objects.
pub const COMPONENT: &str = "simulator";
/// The web ATM's HTTP port.
pub const WEB_PORT: i32 = 7070;
/// Where its two Secret files are mounted.
const SECRETS_DIR: &str = "/etc/switchyard-atm";
/// The binary inside the switch image.
const ATM_BINARY: &str = "/usr/local/bin/switchyard-atm";

/// Name of the web ATM's Deployment and Service.
pub fn name(bs_name: &str) -> String {
    format!("{bs_name}-atm")
}

/// The web ATM's objects, when `spec.simulator.enabled`.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorObjects {
    /// One replica of `switchyard-atm web`.
    pub deployment: Deployment,
    /// ClusterIP Service on port 7070 (reach it with `kubectl port-forward`).
    pub service: Service,
}

/// Both objects, or `None` when the simulator is off (then they must not exist).
pub fn build_simulator(bs: &ValidatedBankSwitch) -> Option<SimulatorObjects> {
    bs.spec.simulator.enabled.then(|| SimulatorObjects {
        deployment: build_simulator_deployment(bs),
        service: build_simulator_service(bs),
    })
}

fn metadata(bs: &ValidatedBankSwitch) -> ObjectMeta {
    ObjectMeta {
        name: Some(name(&bs.name)),
        namespace: Some(bs.namespace.clone()),
        labels: Some(labels(bs, COMPONENT)),
        owner_references: bs.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

/// The web ATM Deployment: `switchyard-atm web` on 0.0.0.0:7070 against the switch's ISO and
/// admin Services, hardened like the switch pods, probed on `/healthz`.
pub fn build_simulator_deployment(bs: &ValidatedBankSwitch) -> Deployment {
    let spec = &bs.spec;
    // validation requires `tls.iso8583` with a simulator: `switchyard-atm --tls-ca` speaks TLS
    // on the ISO port and verifies the https admin URL with the same CA
    let tls_secret = super::security::tls_secret_name(bs);
    let svc = |service: String| format!("{service}.{}.svc", bs.namespace);
    let mut env_vars = vec![
        env(
            "SWITCHYARD_ATM_ISO",
            format!(
                "{}:{}",
                svc(names::iso_service(&bs.name)),
                spec.iso8583.port
            ),
        ),
        env(
            "SWITCHYARD_ATM_ADMIN",
            format!(
                "{}://{}:{ADMIN_PORT}",
                if tls_secret.is_some() {
                    "https"
                } else {
                    "http"
                },
                svc(names::admin_service(&bs.name))
            ),
        ),
        env(
            "SWITCHYARD_ATM_TOKEN_FILE",
            format!("{SECRETS_DIR}/admin/tokens"),
        ),
        env("SWITCHYARD_ATM_KEK_FILE", format!("{SECRETS_DIR}/keys/kek")),
        env("SWITCHYARD_ATM_LISTEN", format!("0.0.0.0:{WEB_PORT}")),
        env(
            "SWITCHYARD_ATM_PACKAGER",
            spec.iso8583.packager.as_str().to_owned(),
        ),
    ];
    if let Some(bin) = &spec.simulator.card_bin {
        env_vars.push(env("SWITCHYARD_ATM_BIN", bin.clone()));
    }
    let probe = |period: i32, failure_threshold: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let secret = |source: &crate::crd::bank_switch::SecretKeyRef, path: &str| VolumeProjection {
        secret: Some(SecretProjection {
            name: source.name.clone(),
            items: Some(vec![KeyToPath {
                key: source.key.clone(),
                path: path.into(),
                mode: None,
            }]),
            optional: Some(false),
        }),
        ..VolumeProjection::default()
    };
    let container = Container {
        name: "web-atm".into(),
        image: Some(
            spec.simulator
                .image
                .clone()
                .unwrap_or_else(|| spec.image.clone()),
        ),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec![ATM_BINARY.into()]),
        args: Some(match &tls_secret {
            Some(_) => vec![
                "--tls-ca".into(),
                format!("{SECRETS_DIR}/tls/ca.crt"),
                "web".into(),
            ],
            None => vec!["web".into()],
        }),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WEB_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe(5, 3)),
        liveness_probe: Some(probe(10, 6)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "secrets".into(),
            mount_path: SECRETS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let overrides = &spec.pod_template;
    Deployment {
        metadata: metadata(bs),
        spec: Some(DeploymentSpec {
            // One terminal, one connection: a second replica would be a second ATM.
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector_labels(bs, COMPONENT)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(bs, COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: (!overrides.node_selector.is_empty())
                        .then(|| overrides.node_selector.clone()),
                    tolerations: (!overrides.tolerations.is_empty())
                        .then(|| overrides.tolerations.clone()),
                    image_pull_secrets: (!overrides.image_pull_secrets.is_empty())
                        .then(|| overrides.image_pull_secrets.clone()),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "secrets".into(),
                        projected: Some(ProjectedVolumeSource {
                            default_mode: Some(0o440),
                            sources: Some(
                                [
                                    secret(&spec.admin.token_secret_ref, "admin/tokens"),
                                    secret(&spec.keys.kek_secret_ref, "keys/kek"),
                                ]
                                .into_iter()
                                .chain(tls_secret.iter().map(|name| {
                                    secret(
                                        &crate::crd::bank_switch::SecretKeyRef {
                                            name: name.clone(),
                                            key: "ca.crt".into(),
                                        },
                                        "tls/ca.crt",
                                    )
                                }))
                                .collect(),
                            ),
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// ClusterIP Service `<name>-atm` on port 7070.
pub fn build_simulator_service(bs: &ValidatedBankSwitch) -> Service {
    Service {
        metadata: metadata(bs),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(bs, COMPONENT)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: WEB_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Applies the web ATM's objects, or deletes ours when the simulator is off. Runs after the
/// switch Deployment is applied, so the web ATM starts against a switch that is rolling out.
pub async fn apply(
    applier: &super::apply::Applier,
    deployments: &kube::Api<Deployment>,
    bs_name: &str,
    desired: Option<&SimulatorObjects>,
    owner_uid: Option<&str>,
) -> Result<(), super::apply::ApplyError> {
    let services: kube::Api<Service> = applier.api();
    match desired {
        Some(sim) => {
            applier.apply(&services, &(), &sim.service).await?;
            applier.apply(deployments, &(), &sim.deployment).await?;
        }
        None => {
            applier
                .delete_if_owned(deployments, &(), &name(bs_name), owner_uid)
                .await?;
            applier
                .delete_if_owned(&services, &(), &name(bs_name), owner_uid)
                .await?;
        }
    }
    Ok(())
}
