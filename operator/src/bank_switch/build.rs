//! Pure builders: the Kubernetes objects one `BankSwitch` needs, computed without a client.
//!
//! Every function here is deterministic in its inputs, so `render` output, snapshot tests and the
//! reconciler agree byte for byte, and a steady state compares equal to what the cluster holds.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecretProjection,
    SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, TopologySpreadConstraint,
    Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::validate::{StorageMode, ValidatedBankSwitch, format_duration, parse_duration};
use crate::crd::bank_switch::{DrainerAutoscaler, SecretKeyRef};

/// The one server-side-apply field manager of the operator.
pub const FIELD_MANAGER: &str = "switchyard-operator";
/// `app.kubernetes.io/managed-by` value; objects without it are never deleted by the operator.
pub const MANAGED_BY: &str = "switchyard-operator";
/// Pod-template annotation carrying the config hash, so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "switchyard.io/config-hash";
/// Label on migration Jobs naming the image they migrate for.
pub const IMAGE_HASH_LABEL: &str = "switchyard.io/image-hash";
/// Directory of the mounted switch config.
pub const CONFIG_DIR: &str = "/etc/switchyard/config";
/// Path of the switch config inside the pods.
pub const CONFIG_PATH: &str = "/etc/switchyard/config/switch.toml";
/// Root of the projected Secret files.
pub const SECRETS_DIR: &str = "/etc/switchyard/secrets";
/// Embedded-SQLite data directory (the PVC mount).
pub const DATA_DIR: &str = "/var/lib/switchyard";
/// Mount path of the `<name>-backup` PVC (`spec.backup`): the switch's `[backup] dir`.
pub const BACKUP_DIR: &str = "/var/lib/switchyard-backups";
/// Admin API container port.
pub const ADMIN_PORT: i32 = 8080;
/// Metrics and probes container port.
pub const METRICS_PORT: i32 = 9090;
/// UID/GID the switch runs as (the distroless `nonroot` user).
pub const RUN_AS: i64 = 65532;

/// Component label values (`app.kubernetes.io/component`).
pub mod component {
    /// Switch pods and their Deployment, PDB.
    pub const SWITCH: &str = "switch";
    /// SAF drainer pods and Deployment.
    pub const DRAINER: &str = "drainer";
    /// Database migration Jobs.
    pub const MIGRATION: &str = "migration";
    /// The config ConfigMap.
    pub const CONFIG: &str = "config";
    /// The ISO 8583 Service.
    pub const ISO: &str = "iso8583";
    /// The admin and metrics Service.
    pub const ADMIN: &str = "admin";
    /// The embedded-SQLite PVC.
    pub const DATA: &str = "data";
    /// The backup PVC (`spec.backup`).
    pub const BACKUP: &str = "backup";
    /// ServiceMonitor and PrometheusRule.
    pub const MONITORING: &str = "monitoring";
}

/// Facts the builders need that are not in the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInputs {
    /// Drainer replicas decided by the scaler (or `minReplicas` for an offline render).
    pub drainer_replicas: i32,
    /// Whether the cluster serves `monitoring.coreos.com/v1` (ServiceMonitor, PrometheusRule).
    pub monitoring_api_served: bool,
    /// Namespace the operator runs in: its pods may reach the admin port through the
    /// NetworkPolicy (unless `spec.networkPolicy.operatorNamespace` says otherwise).
    pub operator_namespace: String,
}

/// Namespace the chart and the kustomize base install the operator in.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "switchyard-system";

/// Everything the operator applies for one BankSwitch. `None` means "must not exist".
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObjects {
    /// Switch config (`switch.toml`).
    pub config_map: ConfigMap,
    /// Migration Job for the current image (PostgreSQL mode only; SQLite migrates on start).
    pub migration_job: Option<Job>,
    /// Switch Deployment.
    pub switch_deployment: Deployment,
    /// `<name>-iso` Service.
    pub iso_service: Service,
    /// `<name>-admin` Service (admin API and metrics).
    pub admin_service: Service,
    /// PodDisruptionBudget (only with two or more replicas).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// SAF drainer Deployment (PostgreSQL mode with maxReplicas > 0).
    pub drainer_deployment: Option<Deployment>,
    /// `<name>-data` PVC (embedded-SQLite mode).
    pub data_pvc: Option<PersistentVolumeClaim>,
    /// `<name>-backup` PVC (embedded-SQLite mode with `spec.backup`).
    pub backup_pvc: Option<PersistentVolumeClaim>,
    /// ServiceMonitor (opt-in and API served).
    pub service_monitor: Option<DynamicObject>,
    /// PrometheusRule (opt-in and API served).
    pub prometheus_rule: Option<DynamicObject>,
    /// cert-manager Certificate (`spec.tls.issuerRef`).
    pub certificate: Option<DynamicObject>,
    /// NetworkPolicies of `spec.networkPolicy` (empty when disabled).
    pub network_policies: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
    /// Web ATM Deployment and Service (`spec.simulator.enabled`).
    pub simulator: Option<super::simulator::SimulatorObjects>,
}

impl DesiredObjects {
    /// Every object that should exist, in apply order, as JSON (for `render`).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = Vec::new();
        fn push<T: Serialize>(
            out: &mut Vec<serde_json::Value>,
            v: Option<&T>,
        ) -> Result<(), serde_json::Error> {
            if let Some(v) = v {
                out.push(serde_json::to_value(v)?);
            }
            Ok(())
        }
        push(&mut out, Some(&self.config_map))?;
        push(&mut out, self.data_pvc.as_ref())?;
        push(&mut out, self.backup_pvc.as_ref())?;
        push(&mut out, Some(&self.iso_service))?;
        push(&mut out, Some(&self.admin_service))?;
        push(&mut out, self.migration_job.as_ref())?;
        push(&mut out, Some(&self.switch_deployment))?;
        push(&mut out, self.pod_disruption_budget.as_ref())?;
        push(&mut out, self.drainer_deployment.as_ref())?;
        push(&mut out, self.service_monitor.as_ref())?;
        push(&mut out, self.prometheus_rule.as_ref())?;
        push(&mut out, self.certificate.as_ref())?;
        for policy in &self.network_policies {
            push(&mut out, Some(policy))?;
        }
        if let Some(sim) = &self.simulator {
            push(&mut out, Some(&sim.service))?;
            push(&mut out, Some(&sim.deployment))?;
        }
        Ok(out)
    }
}

/// A builder could not produce an object.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The switch config could not be rendered as TOML.
    #[error("failed to render the switch config for {name} as TOML")]
    ConfigToml {
        /// BankSwitch name.
        name: String,
        /// Cause.
        #[source]
        source: toml::ser::Error,
    },
    /// The embedded alert file could not be rendered.
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertsError),
}

/// Names of the derived objects, in one place so builders, apply and tests agree.
pub mod names {
    /// ConfigMap with `switch.toml`.
    pub fn config(name: &str) -> String {
        format!("{name}-config")
    }
    /// Switch Deployment.
    pub fn switch(name: &str) -> String {
        format!("{name}-switch")
    }
    /// Drainer Deployment.
    pub fn drainer(name: &str) -> String {
        format!("{name}-drainer")
    }
    /// ISO 8583 Service.
    pub fn iso_service(name: &str) -> String {
        format!("{name}-iso")
    }
    /// Admin/metrics Service.
    pub fn admin_service(name: &str) -> String {
        format!("{name}-admin")
    }
    /// Embedded-SQLite PVC.
    pub fn data(name: &str) -> String {
        format!("{name}-data")
    }
    /// Backup PVC (`spec.backup`).
    pub fn backup(name: &str) -> String {
        format!("{name}-backup")
    }
    /// PodDisruptionBudget, ServiceMonitor and PrometheusRule share the BankSwitch name.
    pub fn monitoring(name: &str) -> String {
        name.to_owned()
    }
    /// Migration Job for a pod-template hash.
    pub fn migration(name: &str, hash: &str) -> String {
        format!("{name}-migrate-{hash}")
    }
}

/// Builds every object for a validated BankSwitch.
pub fn build_all(
    bs: &ValidatedBankSwitch,
    inputs: BuildInputs,
) -> Result<DesiredObjects, BuildError> {
    let config_map = build_config_map(bs)?;
    let config_hash = config_hash(&config_map);
    let postgres = bs.storage_mode == StorageMode::Postgres;
    let monitoring = &bs.spec.monitoring;
    Ok(DesiredObjects {
        migration_job: postgres.then(|| build_migration_job(bs)),
        switch_deployment: build_switch_deployment(bs, &config_hash),
        iso_service: build_iso_service(bs),
        admin_service: build_admin_service(bs),
        pod_disruption_budget: build_pod_disruption_budget(bs),
        drainer_deployment: (postgres && bs.spec.store_and_forward.drainers.max_replicas > 0)
            .then(|| build_drainer_deployment(bs, &config_hash, inputs.drainer_replicas)),
        data_pvc: (!postgres).then(|| build_data_pvc(bs)),
        backup_pvc: build_backup_pvc(bs),
        service_monitor: (monitoring.service_monitor.enabled && inputs.monitoring_api_served)
            .then(|| build_service_monitor(bs)),
        prometheus_rule: if monitoring.prometheus_rule.enabled && inputs.monitoring_api_served {
            Some(build_prometheus_rule(bs)?)
        } else {
            None
        },
        certificate: super::security::build_certificate(bs),
        network_policies: super::security::build_network_policies(bs, &inputs.operator_namespace),
        simulator: super::simulator::build_simulator(bs),
        config_map,
    })
}

/// Labels every object carries (`app.kubernetes.io/*`).
pub fn labels(bs: &ValidatedBankSwitch, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(bs, component);
    l.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    l
}

/// The subset of labels used in selectors (stable for the object's life).
pub fn selector_labels(bs: &ValidatedBankSwitch, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "switchyard".into()),
        ("app.kubernetes.io/instance".into(), bs.name.clone()),
        ("app.kubernetes.io/component".into(), component.into()),
    ])
}

pub(super) fn metadata(bs: &ValidatedBankSwitch, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(bs.namespace.clone()),
        labels: Some(labels(bs, component)),
        owner_references: bs.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..5])
}

// ---------------------------------------------------------------------------------------------
// Config

#[derive(Serialize)]
struct SwitchConfig {
    iso8583: IsoSection,
    admin: AdminSection,
    metrics: MetricsSection,
    database: DatabaseSection,
    keys: KeysSection,
    saf: SafSection,
    routing: RoutingSection,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upstreams: Vec<UpstreamSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backup: Option<BackupSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry: Option<TelemetrySection>,
}

#[derive(Serialize)]
struct TelemetrySection {
    otlp_endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_ratio: Option<f64>,
}

#[derive(Serialize)]
struct BackupSection {
    schedule: String,
    dir: String,
    retain: i32,
}

#[derive(Serialize)]
struct IsoSection {
    listen: String,
    packager: &'static str,
    idle_timeout: String,
    max_connections: i32,
    max_frame_bytes: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<super::security::TlsSection>,
}

#[derive(Serialize)]
struct AdminSection {
    listen: String,
    tokens_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<super::security::TlsSection>,
}

#[derive(Serialize)]
struct MetricsSection {
    listen: String,
}

#[derive(Serialize)]
struct DatabaseSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url_file: Option<String>,
}

#[derive(Serialize)]
struct KeysSection {
    lmk_file: String,
    kek_file: String,
    grace: String,
}

#[derive(Serialize)]
struct SafSection {
    max_attempts: i32,
    backoff_initial: String,
    backoff_max: String,
    lease: String,
}

#[derive(Serialize)]
struct RoutingSection {
    on_us: Vec<String>,
    routes: Vec<RouteEntry>,
}

#[derive(Serialize)]
struct RouteEntry {
    prefix: String,
    upstream: String,
}

#[derive(Serialize)]
struct UpstreamSection {
    name: String,
    endpoints: Vec<String>,
    station_id: String,
    tmk_file: String,
    heartbeat_interval: String,
    timeout: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    propagate_trace: bool,
    circuit_breaker: CircuitBreakerSection,
    stand_in: StandInSection,
}

#[derive(Serialize)]
struct CircuitBreakerSection {
    failure_rate: f64,
    min_volume: i32,
    window: String,
    reset_timeout: String,
}

#[derive(Serialize)]
struct StandInSection {
    enabled: bool,
    max_amount: i64,
}

/// A Secret file the pods mount: where it comes from and where it lands under [`SECRETS_DIR`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct SecretFile {
    source: SecretKeyRef,
    /// Path relative to [`SECRETS_DIR`].
    path: String,
}

/// Every Secret file the switch reads, in a fixed order.
fn secret_files(bs: &ValidatedBankSwitch) -> Vec<SecretFile> {
    let spec = &bs.spec;
    let mut files = Vec::new();
    if let Some((_, source)) = spec.database.as_ref().and_then(|db| db.url_secret()) {
        files.push(SecretFile {
            source,
            path: "database/url".into(),
        });
    }
    files.push(SecretFile {
        source: spec.keys.lmk_secret_ref.clone(),
        path: "keys/lmk".into(),
    });
    files.push(SecretFile {
        source: spec.keys.kek_secret_ref.clone(),
        path: "keys/kek".into(),
    });
    files.push(SecretFile {
        source: spec.admin.token_secret_ref.clone(),
        path: "admin/tokens".into(),
    });
    for up in &spec.routing.upstreams {
        files.push(SecretFile {
            source: up.tmk_secret_ref.clone(),
            path: format!("upstreams/{}/tmk", up.name),
        });
    }
    // the TLS Secret's files; the kubelet updates projected Secrets in place on renewal, and
    // the switch re-reads them (no restart)
    if let Some(secret) = super::security::tls_secret_name(bs) {
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            files.push(SecretFile {
                source: SecretKeyRef {
                    name: secret.clone(),
                    key: key.into(),
                },
                path: format!("{}/{key}", super::security::TLS_DIR),
            });
        }
    }
    files
}

/// Normalizes a duration the validator already accepted; falls back to the text as written.
fn duration_text(value: &str) -> String {
    parse_duration(value)
        .map(format_duration)
        .unwrap_or_else(|_| value.to_owned())
}

/// Renders `switch.toml` (SPEC §2, §6 keys). Secrets appear only as `*_file` paths.
pub fn build_switch_config(bs: &ValidatedBankSwitch) -> Result<String, BuildError> {
    let spec = &bs.spec;
    let file_for = |path: &str| format!("{SECRETS_DIR}/{path}");
    let (admin_tls, iso_tls) = super::security::tls_sections(bs);
    let config = SwitchConfig {
        iso8583: IsoSection {
            listen: format!("0.0.0.0:{}", spec.iso8583.port),
            packager: spec.iso8583.packager.as_str(),
            idle_timeout: duration_text(&spec.iso8583.idle_timeout),
            max_connections: spec.iso8583.max_connections,
            max_frame_bytes: spec.iso8583.max_frame_bytes,
            tls: iso_tls,
        },
        admin: AdminSection {
            listen: format!("0.0.0.0:{ADMIN_PORT}"),
            tokens_file: file_for("admin/tokens"),
            tls: admin_tls,
        },
        metrics: MetricsSection {
            listen: format!("0.0.0.0:{METRICS_PORT}"),
        },
        database: match bs.storage_mode {
            StorageMode::Postgres => DatabaseSection {
                url: None,
                url_file: Some(file_for("database/url")),
            },
            StorageMode::EmbeddedSqlite => DatabaseSection {
                url: Some(format!("sqlite://{DATA_DIR}/switchyard.db?mode=rwc")),
                url_file: None,
            },
        },
        keys: KeysSection {
            lmk_file: file_for("keys/lmk"),
            kek_file: file_for("keys/kek"),
            grace: duration_text(&spec.keys.grace),
        },
        saf: SafSection {
            max_attempts: spec.store_and_forward.max_attempts,
            backoff_initial: duration_text(&spec.store_and_forward.backoff.initial),
            backoff_max: duration_text(&spec.store_and_forward.backoff.max),
            lease: duration_text(&spec.store_and_forward.lease),
        },
        routing: RoutingSection {
            on_us: spec.routing.on_us.clone(),
            routes: spec
                .routing
                .routes
                .iter()
                .map(|r| RouteEntry {
                    prefix: r.prefix.clone(),
                    upstream: r.upstream.clone(),
                })
                .collect(),
        },
        upstreams: spec
            .routing
            .upstreams
            .iter()
            .map(|u| UpstreamSection {
                name: u.name.clone(),
                endpoints: u.endpoints.clone(),
                station_id: u.station_id.clone(),
                tmk_file: file_for(&format!("upstreams/{}/tmk", u.name)),
                heartbeat_interval: duration_text(&u.heartbeat_interval),
                timeout: duration_text(&u.timeout),
                propagate_trace: u.propagate_trace,
                circuit_breaker: CircuitBreakerSection {
                    failure_rate: u.circuit_breaker.failure_rate,
                    min_volume: u.circuit_breaker.min_volume,
                    window: duration_text(&u.circuit_breaker.window),
                    reset_timeout: duration_text(&u.circuit_breaker.reset_timeout),
                },
                stand_in: StandInSection {
                    enabled: u.stand_in.enabled,
                    max_amount: u.stand_in.max_amount,
                },
            })
            .collect(),
        backup: backup_spec(bs).map(|b| BackupSection {
            schedule: b.schedule.clone(),
            dir: BACKUP_DIR.into(),
            retain: b.retain,
        }),
        telemetry: spec.telemetry.as_ref().map(|t| TelemetrySection {
            otlp_endpoint: t.otlp_endpoint.clone(),
            sample_ratio: t.sample_ratio,
        }),
    };
    let body = toml::to_string(&config).map_err(|source| BuildError::ConfigToml {
        name: bs.name.clone(),
        source,
    })?;
    Ok(format!(
        "# Rendered by switchyard-operator from BankSwitch {}/{}; edits are overwritten.\n{body}",
        bs.namespace, bs.name
    ))
}

/// The ConfigMap holding `switch.toml`.
pub fn build_config_map(bs: &ValidatedBankSwitch) -> Result<ConfigMap, BuildError> {
    Ok(ConfigMap {
        metadata: metadata(bs, names::config(&bs.name), component::CONFIG),
        data: Some(BTreeMap::from([(
            "switch.toml".to_owned(),
            build_switch_config(bs)?,
        )])),
        ..ConfigMap::default()
    })
}

/// Hash of the ConfigMap data; changes roll the switch and drainer pods.
pub fn config_hash(config_map: &ConfigMap) -> String {
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get("switch.toml"))
        .map(String::as_str)
        .unwrap_or_default();
    short_hash(text.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Pods

fn volumes(bs: &ValidatedBankSwitch) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config(&bs.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "secrets".into(),
            projected: Some(ProjectedVolumeSource {
                // Readable by the pod's group (fsGroup) only: these are keys and credentials.
                default_mode: Some(0o440),
                sources: Some(
                    secret_files(bs)
                        .into_iter()
                        .map(|f| VolumeProjection {
                            secret: Some(SecretProjection {
                                name: f.source.name.clone(),
                                items: Some(vec![KeyToPath {
                                    key: f.source.key.clone(),
                                    path: f.path.clone(),
                                    mode: None,
                                }]),
                                optional: Some(false),
                            }),
                            ..VolumeProjection::default()
                        })
                        .collect(),
                ),
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if bs.storage_mode == StorageMode::EmbeddedSqlite {
        volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::data(&bs.name),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    if backup_spec(bs).is_some() {
        volumes.push(Volume {
            name: "backup".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::backup(&bs.name),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    volumes
}

fn volume_mounts(bs: &ValidatedBankSwitch) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("secrets", SECRETS_DIR, true),
        mount("tmp", "/tmp", false),
    ];
    if bs.storage_mode == StorageMode::EmbeddedSqlite {
        mounts.push(mount("data", DATA_DIR, false));
    }
    if backup_spec(bs).is_some() {
        mounts.push(mount("backup", BACKUP_DIR, false));
    }
    mounts
}

fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn non_empty<K: Ord, V>(map: BTreeMap<K, V>) -> Option<BTreeMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Pod template shared by switch and drainer pods: overrides first, our labels win.
fn pod_template(
    bs: &ValidatedBankSwitch,
    component: &str,
    config_hash: Option<&str>,
    container: Container,
    restart_policy: Option<&str>,
) -> PodTemplateSpec {
    let overrides = &bs.spec.pod_template;
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(bs, component));
    let mut annotations = overrides.annotations.clone();
    if let Some(hash) = config_hash {
        annotations.insert(CONFIG_HASH_ANNOTATION.into(), hash.into());
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: non_empty(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            // The switch never talks to the Kubernetes API: no token in the pod.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security_context()),
            node_selector: non_empty(overrides.node_selector.clone()),
            tolerations: non_empty_vec(overrides.tolerations.clone()),
            affinity: overrides.affinity.clone(),
            priority_class_name: overrides.priority_class_name.clone(),
            image_pull_secrets: non_empty_vec(overrides.image_pull_secrets.clone()),
            restart_policy: restart_policy.map(Into::into),
            containers: vec![container],
            volumes: Some(volumes(bs)),
            ..PodSpec::default()
        }),
    }
}

fn base_container(bs: &ValidatedBankSwitch, name: &str, args: Vec<String>) -> Container {
    Container {
        name: name.into(),
        image: Some(bs.spec.image.clone()),
        image_pull_policy: bs.spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(args),
        security_context: Some(container_security_context()),
        volume_mounts: Some(volume_mounts(bs)),
        // The switch writes why it refused to start; without that file, the last log lines.
        // The operator quotes it in the Degraded condition (status::crash_report).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        env: non_empty_vec(bs.spec.env.clone()),
        ..Container::default()
    }
}

fn config_args(subcommand: &str) -> Vec<String> {
    vec![subcommand.into(), "--config".into(), CONFIG_PATH.into()]
}

/// The switch Deployment: probes on the metrics port, preStop delay and grace period for
/// draining, hardened security context, spread, and the config hash on the pod template.
/// It carries no operator version, so upgrading the operator alone never restarts switch pods.
pub fn build_switch_deployment(bs: &ValidatedBankSwitch, config_hash: &str) -> Deployment {
    let spec = &bs.spec;
    let embedded = bs.storage_mode == StorageMode::EmbeddedSqlite;
    let mut args = config_args("serve");
    if embedded {
        // The PVC is ReadWriteOnce and only this pod may open the SQLite file, so a separate
        // migration Job cannot run; the SPEC's `serve --migrate` covers that case.
        args.push("--migrate".into());
    }
    let mut container = base_container(bs, "switch", args);
    container.ports = Some(vec![
        port("iso8583", spec.iso8583.port),
        port("admin", ADMIN_PORT),
        port("metrics", METRICS_PORT),
    ]);
    // Up to 5 minutes to start (first-run migrations in SQLite mode), then quick readiness.
    container.startup_probe = Some(http_probe("/startupz", 5, 60));
    container.readiness_probe = Some(http_probe("/readyz", 5, 2));
    container.liveness_probe = Some(http_probe("/livez", 10, 3));
    if spec.termination.pre_stop_delay_seconds > 0 {
        container.lifecycle = Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: spec.termination.pre_stop_delay_seconds,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    container.resources = spec.resources.clone();

    let mut template = pod_template(bs, component::SWITCH, Some(config_hash), container, None);
    if let Some(pod) = template.spec.as_mut() {
        pod.termination_grace_period_seconds =
            Some(spec.termination.grace_period_seconds + spec.termination.pre_stop_delay_seconds);
        let spread = &spec.availability.topology_spread;
        if spread.enabled && !spread.topology_keys.is_empty() {
            pod.topology_spread_constraints = Some(
                spread
                    .topology_keys
                    .iter()
                    .map(|key| TopologySpreadConstraint {
                        max_skew: spread.max_skew,
                        topology_key: key.clone(),
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(bs, component::SWITCH)),
                            ..LabelSelector::default()
                        }),
                        ..TopologySpreadConstraint::default()
                    })
                    .collect(),
            );
        }
    }

    Deployment {
        metadata: metadata(bs, names::switch(&bs.name), component::SWITCH),
        spec: Some(DeploymentSpec {
            replicas: Some(if embedded {
                spec.replicas.min(1)
            } else {
                spec.replicas
            }),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(selector_labels(bs, component::SWITCH)),
                ..LabelSelector::default()
            },
            strategy: Some(if embedded {
                // Two pods must never open the same SQLite file on a RWO volume.
                DeploymentStrategy {
                    type_: Some("Recreate".into()),
                    rolling_update: None,
                }
            } else {
                DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }
            }),
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The SAF drainer Deployment (`switchyard-switch drain`), replicas from the scaler.
pub fn build_drainer_deployment(
    bs: &ValidatedBankSwitch,
    config_hash: &str,
    replicas: i32,
) -> Deployment {
    let mut container = base_container(bs, "drainer", config_args("drain"));
    container.ports = Some(vec![port("metrics", METRICS_PORT)]);
    container.liveness_probe = Some(http_probe("/livez", 10, 3));
    container.resources = bs.spec.store_and_forward.drainers.resources.clone();
    let mut template = pod_template(bs, component::DRAINER, Some(config_hash), container, None);
    if let Some(pod) = template.spec.as_mut() {
        // A drainer finishes or abandons its lease; an abandoned lease expires and is re-driven.
        pod.termination_grace_period_seconds = Some(bs.spec.termination.grace_period_seconds);
    }
    Deployment {
        metadata: metadata(bs, names::drainer(&bs.name), component::DRAINER),
        spec: Some(DeploymentSpec {
            // External autoscaler: no replicas in our apply, so server-side apply leaves the
            // field to KEDA/the HPA instead of resetting it on every reconcile.
            replicas: (bs.spec.store_and_forward.drainers.autoscaler
                == DrainerAutoscaler::Operator)
                .then_some(replicas),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(selector_labels(bs, component::DRAINER)),
                ..LabelSelector::default()
            },
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Hash identifying a migration: the Job's pod template (image, config source, secrets).
/// Job templates are immutable, so a different template needs a different Job name.
pub fn migration_hash(bs: &ValidatedBankSwitch) -> String {
    let template = migration_pod_template(bs);
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    short_hash(&bytes)
}

fn migration_pod_template(bs: &ValidatedBankSwitch) -> PodTemplateSpec {
    let mut container = base_container(bs, "migrate", config_args("migrate"));
    container.resources = bs.spec.resources.clone();
    pod_template(bs, component::MIGRATION, None, container, Some("Never"))
}

/// The migration Job for the current image (`switchyard-switch migrate`).
pub fn build_migration_job(bs: &ValidatedBankSwitch) -> Job {
    let hash = migration_hash(bs);
    let mut meta = metadata(bs, names::migration(&bs.name, &hash), component::MIGRATION);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(IMAGE_HASH_LABEL.into(), hash);
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            active_deadline_seconds: Some(900),
            template: migration_pod_template(bs),
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// `<name>-iso`: the ATM-facing Service, type and annotations from the spec.
pub fn build_iso_service(bs: &ValidatedBankSwitch) -> Service {
    let svc = &bs.spec.iso8583.service;
    let mut meta = metadata(bs, names::iso_service(&bs.name), component::ISO);
    meta.annotations = non_empty(svc.annotations.clone());
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(svc.type_.as_str().into()),
            selector: Some(selector_labels(bs, component::SWITCH)),
            ports: Some(vec![ServicePort {
                name: Some("iso8583".into()),
                port: bs.spec.iso8583.port,
                target_port: Some(IntOrString::String("iso8583".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `<name>-admin`: admin API (8080) and metrics (9090), cluster-internal.
pub fn build_admin_service(bs: &ValidatedBankSwitch) -> Service {
    let svc_port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: metadata(bs, names::admin_service(&bs.name), component::ADMIN),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(bs, component::SWITCH)),
            ports: Some(vec![
                svc_port("admin", ADMIN_PORT),
                svc_port("metrics", METRICS_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// PodDisruptionBudget with `maxUnavailable: 1`, only for two or more replicas: with fewer, any
/// budget would block node drains, so none is made.
pub fn build_pod_disruption_budget(bs: &ValidatedBankSwitch) -> Option<PodDisruptionBudget> {
    let spec = &bs.spec;
    if !spec.availability.pod_disruption_budget.enabled
        || spec.replicas < 2
        || bs.storage_mode == StorageMode::EmbeddedSqlite
    {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: metadata(bs, names::switch(&bs.name), component::SWITCH),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(bs, component::SWITCH)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

/// `<name>-data`: the embedded-SQLite volume.
pub fn build_data_pvc(bs: &ValidatedBankSwitch) -> PersistentVolumeClaim {
    let storage = &bs.spec.storage;
    PersistentVolumeClaim {
        metadata: metadata(bs, names::data(&bs.name), component::DATA),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), storage.size.clone())])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// `spec.backup` when it applies: embedded SQLite only (validation refuses it with
/// `spec.database`; this keeps the builders from mounting a volume nothing writes to anyway).
fn backup_spec(bs: &ValidatedBankSwitch) -> Option<&crate::crd::bank_switch::BackupSpec> {
    bs.spec
        .backup
        .as_ref()
        .filter(|_| bs.storage_mode == StorageMode::EmbeddedSqlite)
}

/// `<name>-backup`: the volume scheduled backups are written to. No owner reference, unlike
/// every other object: deleting the BankSwitch (or its data volume) must not take the backups
/// with it, they are what a restore starts from.
pub fn build_backup_pvc(bs: &ValidatedBankSwitch) -> Option<PersistentVolumeClaim> {
    let volume = &backup_spec(bs)?.volume;
    let mut metadata = metadata(bs, names::backup(&bs.name), component::BACKUP);
    metadata.owner_references = None;
    Some(PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: volume.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), volume.size.clone())])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// The `monitoring.coreos.com/v1` resource for a kind (ServiceMonitor, PrometheusRule).
pub fn monitoring_api_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind))
}

fn monitoring_object(
    bs: &ValidatedBankSwitch,
    kind: &str,
    extra_labels: &BTreeMap<String, String>,
    spec: serde_json::Value,
) -> DynamicObject {
    let mut meta = metadata(bs, names::monitoring(&bs.name), component::MONITORING);
    // User labels (Prometheus selectors) first; ours win so ownership checks keep working.
    let mut all = extra_labels.clone();
    all.extend(meta.labels.take().unwrap_or_default());
    meta.labels = Some(all);
    let mut obj = DynamicObject::new(&bs.name, &monitoring_api_resource(kind))
        .within(&bs.namespace)
        .data(json!({ "spec": spec }));
    obj.metadata = meta;
    obj
}

/// ServiceMonitor scraping `<name>-admin`'s metrics port.
pub fn build_service_monitor(bs: &ValidatedBankSwitch) -> DynamicObject {
    let sm = &bs.spec.monitoring.service_monitor;
    monitoring_object(
        bs,
        "ServiceMonitor",
        &sm.labels,
        json!({
            "selector": { "matchLabels": selector_labels(bs, component::ADMIN) },
            "endpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "interval": sm.interval,
            }],
        }),
    )
}

/// PrometheusRule with the SPEC §8 switch alerts, scoped to this BankSwitch's scrape job: the
/// chart's `observability/alerts.yaml` rendered by [`crate::alerts::scoped_groups`], so the
/// operator and the chart ship one alert set.
pub fn build_prometheus_rule(bs: &ValidatedBankSwitch) -> Result<DynamicObject, BuildError> {
    let groups = crate::alerts::scoped_groups(&bs.namespace, &names::admin_service(&bs.name))?;
    Ok(monitoring_object(
        bs,
        "PrometheusRule",
        &bs.spec.monitoring.prometheus_rule.labels,
        json!({ "groups": groups }),
    ))
}
