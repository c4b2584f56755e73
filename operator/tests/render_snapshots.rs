//! Snapshot tests of every object built for representative BankSwitch specs, plus the
//! properties a reviewer would check by eye (secrets never inlined, PDB never blocking drains).

use std::path::PathBuf;

use switchyard_operator::bank_switch::build::{
    BuildInputs, DesiredObjects, build_all, config_hash,
};
use switchyard_operator::bank_switch::validate::{ValidatedBankSwitch, validate};
use switchyard_operator::crd::BankSwitch;

fn fixture(name: &str) -> BankSwitch {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    serde_yaml::from_str(&text).expect("fixture is a BankSwitch")
}

fn built(
    name: &str,
    drainer_replicas: i32,
    monitoring_api_served: bool,
) -> (ValidatedBankSwitch, DesiredObjects) {
    let validated = validate(&fixture(name)).expect("fixture is valid");
    let objects = build_all(
        &validated,
        BuildInputs {
            drainer_replicas,
            monitoring_api_served,
        },
    )
    .expect("builds");
    (validated, objects)
}

fn snapshot_all(prefix: &str, objects: &DesiredObjects) {
    for value in objects.to_values().expect("serializes") {
        let kind = value["kind"].as_str().unwrap_or("unknown").to_owned();
        // Component, not name: the migration Job's name carries a hash that changes with it.
        let component = value["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        insta::assert_yaml_snapshot!(format!("{prefix}__{kind}__{component}"), value);
    }
}

#[test]
fn embedded_minimal_objects() {
    let (_, objects) = built("embedded-minimal.yaml", 0, true);
    snapshot_all("embedded-minimal", &objects);
}

#[test]
fn postgres_full_objects() {
    let (_, objects) = built("postgres-full.yaml", 2, true);
    snapshot_all("postgres-full", &objects);
}

#[test]
fn embedded_mode_is_one_replica_recreate_with_a_pvc_and_no_job_pdb_or_drainers() {
    let (_, o) = built("embedded-minimal.yaml", 0, true);
    let spec = o.switch_deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate")
    );
    assert_eq!(
        o.data_pvc.as_ref().and_then(|p| p.metadata.name.as_deref()),
        Some("demo-data")
    );
    assert!(o.migration_job.is_none());
    assert!(o.pod_disruption_budget.is_none());
    assert!(o.drainer_deployment.is_none());
    // Monitoring is opt-in: not requested in the minimal spec, so nothing even when served.
    assert!(o.service_monitor.is_none() && o.prometheus_rule.is_none());
}

#[test]
fn secrets_are_mounted_as_files_never_inlined() {
    let (_, o) = built("postgres-full.yaml", 1, true);
    let config = &o.config_map.data.as_ref().expect("data")["switch.toml"];
    assert!(config.contains(r#"url_file = "/etc/switchyard/secrets/database/url""#));
    assert!(config.contains(r#"lmk_file = "/etc/switchyard/secrets/keys/lmk""#));
    assert!(config.contains(r#"tmk_file = "/etc/switchyard/secrets/upstreams/issuer-b/tmk""#));
    assert!(!config.contains("postgres://"), "no URL inlined");
    let rendered = serde_json::to_string(&o.to_values().expect("values")).expect("json");
    assert!(
        !rendered.contains("\"env\""),
        "no Secret values through env either"
    );
}

#[test]
fn config_change_rolls_pods_but_operator_version_does_not_appear() {
    let (_, before) = built("postgres-full.yaml", 1, true);
    let mut bs = fixture("postgres-full.yaml");
    bs.spec.store_and_forward.max_attempts = 20;
    let after = build_all(
        &validate(&bs).expect("valid"),
        BuildInputs {
            drainer_replicas: 1,
            monitoring_api_served: true,
        },
    )
    .expect("builds");
    let hash = |o: &DesiredObjects| {
        o.switch_deployment
            .spec
            .as_ref()
            .expect("spec")
            .template
            .metadata
            .as_ref()
            .expect("meta")
            .annotations
            .as_ref()
            .expect("annotations")["switchyard.io/config-hash"]
            .clone()
    };
    assert_eq!(hash(&before), config_hash(&before.config_map));
    assert_ne!(
        hash(&before),
        hash(&after),
        "config change must roll the pods"
    );
    let template = serde_json::to_string(
        &before
            .switch_deployment
            .spec
            .as_ref()
            .expect("spec")
            .template,
    )
    .expect("json");
    assert!(
        !template.contains(env!("CARGO_PKG_VERSION")),
        "no operator version in the pod template"
    );
}

#[test]
fn pdb_exists_only_from_two_replicas_and_allows_one_eviction() {
    let (_, o) = built("postgres-full.yaml", 1, true);
    let pdb = o.pod_disruption_budget.expect("3 replicas get a PDB");
    assert_eq!(
        pdb.spec.and_then(|s| s.max_unavailable),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let mut bs = fixture("postgres-full.yaml");
    bs.spec.replicas = 1;
    let single = build_all(
        &validate(&bs).expect("valid"),
        BuildInputs {
            drainer_replicas: 1,
            monitoring_api_served: true,
        },
    )
    .expect("builds");
    assert!(
        single.pod_disruption_budget.is_none(),
        "one replica: a PDB would block drains"
    );
}

#[test]
fn monitoring_objects_need_the_api_and_carry_user_labels() {
    let (_, without_api) = built("postgres-full.yaml", 1, false);
    assert!(without_api.service_monitor.is_none() && without_api.prometheus_rule.is_none());
    let (_, with_api) = built("postgres-full.yaml", 1, true);
    let sm = with_api.service_monitor.expect("ServiceMonitor");
    let labels = sm.metadata.labels.expect("labels");
    assert_eq!(labels["release"], "kube-prometheus-stack");
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        "switchyard-operator"
    );
}

#[test]
fn migration_job_name_changes_with_the_image() {
    let (_, before) = built("postgres-full.yaml", 1, true);
    let mut bs = fixture("postgres-full.yaml");
    bs.spec.image = "registry.example/switchyard/switch:1.5.0".into();
    let after = build_all(
        &validate(&bs).expect("valid"),
        BuildInputs {
            drainer_replicas: 1,
            monitoring_api_served: true,
        },
    )
    .expect("builds");
    let name = |o: &DesiredObjects| {
        o.migration_job
            .as_ref()
            .and_then(|j| j.metadata.name.clone())
    };
    assert_ne!(name(&before), name(&after));
    let job = after.migration_job.expect("job");
    let args = job
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0]
        .args
        .clone();
    assert_eq!(
        args,
        Some(vec![
            "migrate".into(),
            "--config".into(),
            "/etc/switchyard/config/switch.toml".into()
        ])
    );
}
