//! The `BankSwitch` custom resource: one ISO 8583 switch deployment, as users write it.
//!
//! Every field's `///` doc becomes its description in the CRD schema (`kubectl explain bsw.spec…`),
//! so the docs here are written for the people who write the YAML.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Duration strings in the Go/Kubernetes style the switch config understands, e.g. `90s`, `5m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Desired state of one Switchyard ISO 8583 switch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchyard.io",
    version = "v1alpha1",
    kind = "BankSwitch",
    plural = "bankswitches",
    singular = "bankswitch",
    shortname = "bsw",
    category = "switchyard",
    namespaced,
    status = "BankSwitchStatus",
    doc = "One Switchyard ISO 8583 bank switch: the switch pods ATMs connect to, their database (PostgreSQL, or embedded SQLite for one replica), key Secrets, BIN routing to upstream issuers, store-and-forward drainers, monitoring and maintenance (hibernation, backups). The operator keeps the derived Deployments, Services, Jobs and monitoring objects in line with it and reports in status.conditions.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Ready switch pods / desired"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[0].reason","description":"Reason of the Ready condition (the first one): what the BankSwitch is waiting for or why it is unhealthy (Hibernating, Hibernated while spec.hibernation holds it)"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.storeAndForward.backlog","description":"Store-and-forward messages waiting for delivery"}"#,
    printcolumn = r#"{"name":"Drainers","type":"integer","priority":1,"jsonPath":".status.storeAndForward.drainerReplicas","description":"SAF drainer replicas the operator set"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters so derived names (<name>-migrate-<hash>) fit 63")
)]
#[x_kube(validation = kube::core::Rule::new("self.replicas <= 1 || has(self.database)").message("replicas > 1 needs spec.database: embedded SQLite runs exactly one replica"))]
#[serde(rename_all = "camelCase")]
pub struct BankSwitchSpec {
    /// Container image of the switch (`switchyard-switch`), e.g. `registry.example/switchyard:1.4.2`.
    /// Changing it runs the database migration Job for the new image before pods roll.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Image pull policy for the switch, migration and drainer containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Number of switch pods accepting ATM connections. More than one needs `database`.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// The ISO 8583 listener and its Service.
    #[serde(default)]
    pub iso8583: Iso8583Spec,

    /// PostgreSQL database. Absent: embedded SQLite on a PersistentVolumeClaim, exactly one replica,
    /// not for production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// Storage for embedded-SQLite mode (ignored when `database` is set).
    #[serde(default)]
    pub storage: StorageSpec,

    /// Scheduled backups of the embedded SQLite database to a second volume. Only without
    /// `database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Where the switch reads its key-encryption keys from.
    pub keys: KeysSpec,

    /// The admin REST API's bearer tokens.
    pub admin: AdminSpec,

    /// BIN routing table and upstream issuer hosts.
    #[serde(default)]
    pub routing: RoutingSpec,

    /// Store-and-forward queue settings and its drainer autoscaling.
    #[serde(default)]
    pub store_and_forward: StoreAndForwardSpec,

    /// Disruption budget and spreading of the switch pods.
    #[serde(default)]
    pub availability: AvailabilitySpec,

    /// How long a terminating pod may take to finish in-flight transactions.
    #[serde(default)]
    pub termination: TerminationSpec,

    /// Prometheus Operator objects (opt-in).
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Trace export of the switch and drainer pods (OTLP over HTTP/protobuf). Absent: no
    /// export (the pods' logs still carry trace ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,

    /// CPU and memory for each switch container (also used by the migration Job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables for every switch container (switch, drainers, migration
    /// Job), as in a Pod spec (`value` or `valueFrom`). `SWITCHYARD_<SECTION>__<KEY>` sets a
    /// switch configuration key this resource does not model (e.g.
    /// `SWITCHYARD_ADMIN__IDEMPOTENCY_RETENTION: 72h`); `RUST_LOG` the log level. Keys the
    /// operator renders from other fields (listen addresses, database, key and token files,
    /// TLS files, backup directory) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Scheduling and metadata overrides applied to the switch and drainer pods.
    #[serde(default)]
    pub pod_template: PodTemplateOverrides,

    /// When true the operator changes nothing for this BankSwitch (status is still reported).
    #[serde(default)]
    pub paused: bool,

    /// TLS for the admin API (the operator then talks HTTPS and verifies the CA) and,
    /// optionally, the ISO 8583 port. Absent: plain TCP and HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::security::TlsSpec>,

    /// A NetworkPolicy admitting ATMs/stations to the ISO port, the operator to the admin port
    /// and Prometheus to the metrics port (on by default).
    #[serde(default)]
    pub network_policy: super::security::NetworkPolicySpec,

    /// A web ATM (`switchyard-atm web`, port 7070) wired to this switch, for staging and demos:
    /// a terminal of its own with test cards, provisioned through the admin API at start-up.
    #[serde(default)]
    pub simulator: SimulatorSpec,

    /// Maintenance: hibernate the switch (stop taking ATM work, finish in-flight transactions,
    /// close the sessions, wait for the store-and-forward backlog to be delivered), then scale
    /// the switch and drainer pods to zero. Turning it off brings them back.
    #[serde(default)]
    pub hibernation: HibernationSpec,
}

/// `spec.hibernation`: SAF-aware maintenance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HibernationSpec {
    /// True: hibernate now (the switch pods stop accepting and drain; then switch and drainer
    /// Deployments go to zero replicas and condition `Hibernated` is True). False again: the
    /// replicas are restored and the pods serve.
    #[serde(default)]
    pub enabled: bool,
    /// How long to wait for in-flight work and the SAF backlog before scaling to zero anyway
    /// (`Hibernated` then says `DrainTimedOut` with what was left), e.g. `10m`.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: String,
}

impl Default for HibernationSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> String {
    "10m".into()
}

/// `spec.simulator`: the web ATM Deployment and Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SimulatorSpec {
    /// Run the web ATM (never in production: it issues test cards on the switch).
    #[serde(default)]
    pub enabled: bool,
    /// Image holding `switchyard-atm` (default: the switch image, which contains it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// On-us BIN of the test cards it issues (default `6011`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_bin: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

/// Kubernetes image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node does not have the image.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The spelling Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// A key in a Secret in the BankSwitch's namespace. The operator mounts it as a file; it never
/// copies the value into a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The ISO 8583 listener ATMs connect to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Iso8583Spec {
    /// TCP port of the listener (container port and Service port).
    #[serde(default = "default_iso_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Wire format: `ascii` (ASCII bitmaps) or `binary-bitmap` (raw bitmaps and binary fields).
    #[serde(default)]
    pub packager: Packager,
    /// Close a terminal session with no traffic for this long (Go duration, e.g. `90s`).
    #[serde(default = "default_idle_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub idle_timeout: String,
    /// Maximum concurrent ATM connections per pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: i32,
    /// Largest frame accepted, in bytes; larger frames close the connection.
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 64, max = 65535))]
    pub max_frame_bytes: i32,
    /// The `<name>-iso` Service in front of the listener.
    #[serde(default)]
    pub service: IsoServiceSpec,
}

impl Default for Iso8583Spec {
    fn default() -> Self {
        Self {
            port: default_iso_port(),
            packager: Packager::default(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_frame_bytes: default_max_frame_bytes(),
            service: IsoServiceSpec::default(),
        }
    }
}

fn default_iso_port() -> i32 {
    8583
}
fn default_idle_timeout() -> String {
    "90s".into()
}
fn default_max_connections() -> i32 {
    10_000
}
fn default_max_frame_bytes() -> i32 {
    8192
}

/// ISO 8583 packager (wire format) of the listener.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Packager {
    /// ASCII MTI, hex-ASCII bitmaps, binary fields as hex (pyiso8583 `default_ascii`).
    #[default]
    Ascii,
    /// Raw bitmaps and binary fields (pyiso8583 `default`).
    BinaryBitmap,
}

impl Packager {
    /// The name the switch config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ascii => "ascii",
            Self::BinaryBitmap => "binary-bitmap",
        }
    }
}

/// The Service ATMs reach the switch through.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IsoServiceSpec {
    /// Service type: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations for the Service, e.g. cloud load-balancer settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service type for the ISO 8583 Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The spelling Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The PostgreSQL database shared by all switch and drainer pods: exactly one of
/// `urlSecretRef` (any PostgreSQL) or `cnpg` (a CloudNativePG Cluster, whose backups, PITR and
/// failover then come from CloudNativePG).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("has(self.urlSecretRef) != has(self.cnpg)").message("set exactly one of database.urlSecretRef or database.cnpg"))]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret key holding the `postgres://…` URL (with credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// A CloudNativePG `Cluster` in this namespace: the switch connects with the `uri` key of
    /// the `<cluster>-app` Secret CloudNativePG keeps (label that Secret for this BankSwitch,
    /// e.g. through the Cluster's `spec.inheritedMetadata.labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnpg: Option<CnpgSpec>,
}

/// `spec.database.cnpg`: the CloudNativePG Cluster that holds the switch's database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CnpgSpec {
    /// The `postgresql.cnpg.io/v1` Cluster, in the BankSwitch's namespace.
    pub cluster_ref: CnpgClusterRef,
}

/// A CloudNativePG Cluster by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CnpgClusterRef {
    /// Name of the Cluster.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The key of CloudNativePG's application Secret (`<cluster>-app`) holding the connection URI.
pub const CNPG_URI_KEY: &str = "uri";

impl DatabaseSpec {
    /// The Secret key the switch reads its database URL from, and the spec field that names it:
    /// `urlSecretRef` as written, or `<cluster>-app`/`uri` for `cnpg.clusterRef`. `None` only for
    /// a spec with neither (refused by validation).
    pub fn url_secret(&self) -> Option<(&'static str, SecretKeyRef)> {
        match (&self.url_secret_ref, &self.cnpg) {
            (Some(r), _) => Some(("spec.database.urlSecretRef", r.clone())),
            (None, Some(cnpg)) => Some((
                "spec.database.cnpg.clusterRef",
                SecretKeyRef {
                    name: format!("{}-app", cnpg.cluster_ref.name),
                    key: CNPG_URI_KEY.into(),
                },
            )),
            (None, None) => None,
        }
    }
}

/// `spec.backup`: scheduled online backups of the embedded SQLite database, written by the
/// switch to a second PersistentVolumeClaim (`<name>-backup`). Embedded SQLite only: with
/// `spec.database` the database's own backups apply (CloudNativePG: continuous WAL archiving and
/// point-in-time recovery).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Five-field cron expression in UTC (minute hour day-of-month month day-of-week), e.g.
    /// `0 * * * *` for hourly. The recovery point objective is this interval.
    #[schemars(length(min = 1, max = 128))]
    pub schedule: String,
    /// How many backups to keep; older ones are deleted after each successful backup.
    #[serde(default = "default_backup_retain")]
    #[schemars(range(min = 1, max = 1000))]
    pub retain: i32,
    /// The `<name>-backup` claim. It has no owner reference: deleting the BankSwitch keeps
    /// the backups (delete the claim by hand when they are no longer needed).
    #[serde(default)]
    pub volume: BackupVolumeSpec,
}

fn default_backup_retain() -> i32 {
    7
}

/// The backup PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeSpec {
    /// Size of the claim: room for `retain` copies of the database.
    #[serde(default = "default_backup_size")]
    pub size: Quantity,
    /// StorageClass of the claim; absent means the cluster default. Prefer a class on other
    /// disks than the data volume's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for BackupVolumeSpec {
    fn default() -> Self {
        Self {
            size: default_backup_size(),
            storage_class_name: None,
        }
    }
}

fn default_backup_size() -> Quantity {
    Quantity("5Gi".into())
}

/// Persistent volume for embedded-SQLite mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of the `<name>-data` PersistentVolumeClaim.
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// StorageClass of the claim; absent means the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_storage_size() -> Quantity {
    Quantity("1Gi".into())
}

/// Key material the switch reads from mounted Secret files (hex-encoded AES keys).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeysSpec {
    /// Secret key with the local master key (32 bytes, hex) that wraps keys at rest.
    pub lmk_secret_ref: SecretKeyRef,
    /// Secret key with the key-import key (16 or 32 bytes, hex) for TMK import.
    pub kek_secret_ref: SecretKeyRef,
    /// How long PIN blocks and MACs under a replaced key are still accepted (Go duration).
    #[serde(default = "default_key_grace")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub grace: String,
}

fn default_key_grace() -> String {
    "5m".into()
}

/// Admin REST API authentication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminSpec {
    /// Secret key with the tokens file: one `role:token` line per token, roles `admin` and `viewer`.
    pub token_secret_ref: SecretKeyRef,
    /// Secret key with a bare `viewer` token the operator uses to read `/v1/saf/stats`.
    /// Absent: the operator uses the first `viewer:` line of `tokenSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer_token_secret_ref: Option<SecretKeyRef>,
}

/// BIN routing: which card prefixes are on-us and which go to which upstream.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("self.routes.all(r, self.upstreams.exists(u, u.name == r.upstream))").message("every route must name an upstream listed in routing.upstreams"))]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// PAN prefixes authorized against the local ledger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(regex(pattern = r"^[0-9]{1,19}$")))]
    pub on_us: Vec<String>,
    /// PAN prefix → upstream; the longest matching prefix wins.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub routes: Vec<RouteSpec>,
    /// Issuer hosts the switch keeps persistent ISO 8583 links to.
    #[serde(default)]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub upstreams: Vec<UpstreamSpec>,
}

/// One BIN route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RouteSpec {
    /// PAN prefix (1–19 digits).
    #[schemars(regex(pattern = r"^[0-9]{1,19}$"))]
    pub prefix: String,
    /// Name of the upstream in `routing.upstreams`.
    #[schemars(length(min = 1, max = 63))]
    pub upstream: String,
}

/// An upstream issuer host (primary and backup endpoints).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Name routes refer to; also the metric label `upstream`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// `host:port` endpoints, tried in order (primary first).
    #[schemars(length(min = 1, max = 8), inner(length(min = 3, max = 261)))]
    pub endpoints: Vec<String>,
    /// Our station id at the issuer (field 41 on the link).
    #[schemars(length(min = 1, max = 16))]
    pub station_id: String,
    /// Secret key with the link TMK shared with the issuer (hex).
    pub tmk_secret_ref: SecretKeyRef,
    /// Echo interval on an idle link (Go duration).
    #[serde(default = "default_heartbeat")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub heartbeat_interval: String,
    /// Per-request timeout (Go duration).
    #[serde(default = "default_upstream_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub timeout: String,
    /// Circuit breaker around the link.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// Stand-in processing (STIP) while the issuer is unavailable.
    #[serde(default)]
    pub stand_in: StandInSpec,
    /// Send the W3C `traceparent` of each routed request in field 48 (tag `TP`) so the
    /// issuer's spans join this switch's trace. Only for issuers that expect it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub propagate_trace: bool,
}

fn default_heartbeat() -> String {
    "30s".into()
}
fn default_upstream_timeout() -> String {
    "5s".into()
}

/// Circuit breaker thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Failure ratio (0–1) over `window` that opens the circuit.
    #[serde(default = "default_failure_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate: f64,
    /// Minimum requests in `window` before the ratio counts.
    #[serde(default = "default_min_volume")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_volume: i32,
    /// Rolling window (Go duration).
    #[serde(default = "default_window")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub window: String,
    /// Time OPEN before probing again (Go duration).
    #[serde(default = "default_reset_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub reset_timeout: String,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            failure_rate: default_failure_rate(),
            min_volume: default_min_volume(),
            window: default_window(),
            reset_timeout: default_reset_timeout(),
        }
    }
}

fn default_failure_rate() -> f64 {
    0.5
}
fn default_min_volume() -> i32 {
    5
}
fn default_window() -> String {
    "10s".into()
}
fn default_reset_timeout() -> String {
    "30s".into()
}

/// Stand-in processing limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StandInSpec {
    /// Approve withdrawals on the issuer's behalf while it is unavailable.
    #[serde(default)]
    pub enabled: bool,
    /// Largest stand-in withdrawal, in minor currency units.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_amount: i64,
}

/// Store-and-forward queue settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreAndForwardSpec {
    /// Drainer Deployment autoscaling (PostgreSQL mode only).
    #[serde(default)]
    pub drainers: DrainersSpec,
    /// Deliveries tried before an advice goes to the dead-letter list.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
    /// Retry backoff between delivery attempts.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// How long a drainer holds a message before another may take it (Go duration).
    #[serde(default = "default_lease")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub lease: String,
}

impl Default for StoreAndForwardSpec {
    fn default() -> Self {
        Self {
            drainers: DrainersSpec::default(),
            max_attempts: default_max_attempts(),
            backoff: BackoffSpec::default(),
            lease: default_lease(),
        }
    }
}

fn default_max_attempts() -> i32 {
    10
}
fn default_lease() -> String {
    "30s".into()
}

/// Exponential backoff between delivery attempts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffSpec {
    /// First retry delay (Go duration).
    #[serde(default = "default_backoff_initial")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub initial: String,
    /// Largest retry delay (Go duration).
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub max: String,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_initial() -> String {
    "1s".into()
}
fn default_backoff_max() -> String {
    "60s".into()
}

/// Drainer autoscaling: replicas = clamp(ceil(backlog / targetBacklogPerReplica), min, max).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("self.minReplicas <= self.maxReplicas").message("storeAndForward.drainers.minReplicas must not exceed maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct DrainersSpec {
    /// Who sets the drainer replica count: `operator` (from the SAF backlog, the fields below) or
    /// `external` (the operator leaves `replicas` of `<name>-drainer` alone, for a KEDA
    /// ScaledObject or an HPA; see README "Drainers scaled by KEDA").
    #[serde(default)]
    pub autoscaler: DrainerAutoscaler,
    /// Fewest drainer pods. 0 lets drainers scale to zero after a quiet `cooldown`.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,
    /// Most drainer pods.
    #[serde(default = "default_max_drainers")]
    #[schemars(range(min = 0, max = 100))]
    pub max_replicas: i32,
    /// Queued messages one drainer is expected to handle.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1))]
    pub target_backlog_per_replica: i64,
    /// How often the operator reads the backlog from the switch (Go duration).
    #[serde(default = "default_poll_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub poll_interval: String,
    /// Scale down only to the highest recommendation seen this long (Go duration).
    #[serde(default = "default_cooldown")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub cooldown: String,
    /// CPU and memory for each drainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for DrainersSpec {
    fn default() -> Self {
        Self {
            autoscaler: DrainerAutoscaler::default(),
            min_replicas: 0,
            max_replicas: default_max_drainers(),
            target_backlog_per_replica: default_target_backlog(),
            poll_interval: default_poll_interval(),
            cooldown: default_cooldown(),
            resources: None,
        }
    }
}

/// Who scales the drainer Deployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DrainerAutoscaler {
    /// The operator, from `/v1/saf/stats` (clamp(ceil(backlog / target), min, max)).
    #[default]
    Operator,
    /// Something else (KEDA, HPA); the operator creates the Deployment but never sets replicas.
    External,
}

fn default_max_drainers() -> i32 {
    4
}
fn default_target_backlog() -> i64 {
    100
}
fn default_poll_interval() -> String {
    "30s".into()
}
fn default_cooldown() -> String {
    "5m".into()
}

/// Disruption budget and pod spreading.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilitySpec {
    /// PodDisruptionBudget `<name>-switch` with `maxUnavailable: 1`, only created with 2 or more
    /// replicas so it never blocks a node drain.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,
    /// Spread switch pods over zones and nodes (soft: `ScheduleAnyway`).
    #[serde(default)]
    pub topology_spread: TopologySpreadSpec,
}

/// PodDisruptionBudget switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PodDisruptionBudgetSpec {
    /// Create the budget (when replicas ≥ 2).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Topology spread of switch pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpreadSpec {
    /// Add topology spread constraints.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Node label keys to spread over, one soft constraint each.
    #[serde(default = "default_topology_keys")]
    #[schemars(length(max = 4))]
    pub topology_keys: Vec<String>,
    /// Allowed difference in pod count between domains.
    #[serde(default = "default_max_skew")]
    #[schemars(range(min = 1, max = 10))]
    pub max_skew: i32,
}

impl Default for TopologySpreadSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            topology_keys: default_topology_keys(),
            max_skew: default_max_skew(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_topology_keys() -> Vec<String> {
    vec![
        "topology.kubernetes.io/zone".into(),
        "kubernetes.io/hostname".into(),
    ]
}
fn default_max_skew() -> i32 {
    1
}

/// Graceful shutdown of switch pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("self.preStopDelaySeconds < self.gracePeriodSeconds").message("termination.preStopDelaySeconds must be shorter than gracePeriodSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct TerminationSpec {
    /// Pod `terminationGracePeriodSeconds`: time to finish in-flight transactions after SIGTERM.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 1, max = 3600))]
    pub grace_period_seconds: i64,
    /// preStop sleep so Service endpoints drop the pod before it gets SIGTERM.
    #[serde(default = "default_pre_stop")]
    #[schemars(range(min = 0, max = 300))]
    pub pre_stop_delay_seconds: i64,
}

impl Default for TerminationSpec {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace_period(),
            pre_stop_delay_seconds: default_pre_stop(),
        }
    }
}

fn default_grace_period() -> i64 {
    60
}
fn default_pre_stop() -> i64 {
    5
}

/// `spec.telemetry`: where the switch exports its spans (rendered into `[telemetry]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// Base URL of an OTLP/HTTP receiver, e.g. `http://otel-collector.monitoring:4318` (spans
    /// go to `<url>/v1/traces`).
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub otlp_endpoint: String,
    /// Share of new traces recorded and exported, 0–1 (default 1). A request that continues an
    /// acquirer's trace follows the acquirer's decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<f64>,
}

/// Prometheus Operator integration; both objects are opt-in.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// ServiceMonitor scraping the switch's metrics port.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// PrometheusRule with the switch alerts.
    #[serde(default)]
    pub prometheus_rule: PrometheusRuleSpec,
}

/// ServiceMonitor settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Create the ServiceMonitor (needs the monitoring.coreos.com API in the cluster).
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval (Go duration).
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub interval: String,
    /// Extra labels so your Prometheus' `serviceMonitorSelector` picks it up.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_scrape_interval(),
            labels: BTreeMap::new(),
        }
    }
}

fn default_scrape_interval() -> String {
    "30s".into()
}

/// PrometheusRule settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRuleSpec {
    /// Create the PrometheusRule (needs the monitoring.coreos.com API in the cluster).
    #[serde(default)]
    pub enabled: bool,
    /// Extra labels so your Prometheus' `ruleSelector` picks it up.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Overrides for the switch and drainer pod templates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra pod annotations (e.g. for a service mesh or log shipper).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels; the operator's own `app.kubernetes.io/*` labels win on conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BankSwitchStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (always first; its reason is the `Status` column), Progressing, Degraded,
    /// DatabaseMigrated, MonitoringConfigured, and Hibernated once `spec.hibernation` was used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Switch pods that exist (from the Deployment).
    #[serde(default)]
    pub replicas: i32,
    /// Switch pods that are ready (from the Deployment).
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired` switch pods, for `kubectl get` (e.g. `2/3`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ready: String,
    /// Label selector of the switch pods, for the scale subresource (HPA, KEDA, `kubectl scale`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// In-cluster addresses of the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<EndpointsStatus>,
    /// Store-and-forward queue figures as last read from the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_and_forward: Option<StoreAndForwardStatus>,
    /// Image whose database migration last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_image: Option<String>,
    /// Retry bookkeeping while reconciles fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryStatus>,
    /// Where a hibernation (`spec.hibernation`) stands, and the replicas it will restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernation: Option<HibernationStatus>,
}

/// Where a hibernation stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub enum HibernationPhase {
    /// The switch pods are stopping work and waiting for the SAF backlog.
    Draining,
    /// Switch and drainer Deployments are at zero replicas.
    Hibernated,
}

/// `status.hibernation`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HibernationStatus {
    /// `Draining` or `Hibernated`.
    pub phase: HibernationPhase,
    /// When the operator began draining (RFC 3339).
    pub started_at: String,
    /// Switch replicas before the hibernation (the Deployment's); restored when it ends
    /// (`spec.replicas` wins if someone scaled the BankSwitch meanwhile).
    pub previous_replicas: i32,
    /// Drainer replicas before the hibernation; restored when it ends.
    pub previous_drainer_replicas: i32,
    /// `Drained` or `DrainTimedOut` once hibernated (empty while draining).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// SAF backlog the switch pods last reported while draining.
    #[serde(default)]
    pub saf_backlog: i64,
    /// What the drain is waiting for, or how it ended.
    #[serde(default)]
    pub message: String,
}

/// Where to reach the switch inside the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsStatus {
    /// ISO 8583 `host:port` for ATMs and peer switches.
    pub iso8583: String,
    /// Admin REST API base URL.
    pub admin: String,
    /// Metrics and probes base URL.
    pub metrics: String,
}

/// SAF figures and drainer scaling.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreAndForwardStatus {
    /// Messages waiting for delivery.
    #[serde(default)]
    pub backlog: i64,
    /// Messages leased by a drainer right now.
    #[serde(default)]
    pub in_flight: i64,
    /// Age of the oldest waiting message, in seconds.
    #[serde(default)]
    pub oldest_age_seconds: i64,
    /// Messages in the dead-letter list.
    #[serde(default)]
    pub dead_letters: i64,
    /// Drainer replicas the operator set.
    #[serde(default)]
    pub drainer_replicas: i32,
    /// Why the drainers have that many replicas.
    #[serde(default)]
    pub scaling_reason: String,
}

/// Retry bookkeeping so failing reconciles are visible without reading operator logs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryStatus {
    /// What failed last time.
    pub last_failure: String,
    /// Consecutive failed reconciles.
    pub failed_attempts: i32,
    /// When the operator tries again (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<String>,
}
