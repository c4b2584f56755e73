//! Snapshot tests of every object built for representative BankSwitch specs, plus the
//! properties a reviewer would check by eye (secrets never inlined, PDB never blocking drains).

use std::path::PathBuf;

use serde_json::Value;
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
            operator_namespace: "switchyard-system".into(),
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
fn embedded_backup_objects() {
    let (_, objects) = built("embedded-backup.yaml", 0, true);
    snapshot_all("embedded-backup", &objects);
}

#[test]
fn postgres_cnpg_reads_the_cluster_app_secret_and_has_no_backup_volume() {
    let (_, o) = built("postgres-cnpg.yaml", 1, false);
    assert!(o.backup_pvc.is_none() && o.data_pvc.is_none());
    let pod = o
        .switch_deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let text = serde_json::to_string(&pod.volumes).expect("json");
    assert!(
        text.contains(r#""name":"payments-db-app""#)
            && text.contains(r#"{"key":"uri","path":"database/url"}"#),
        "{text}"
    );
    let config = o.config_map.data.as_ref().expect("data")["switch.toml"].clone();
    assert!(
        config.contains("url_file = \"/etc/switchyard/secrets/database/url\""),
        "{config}"
    );
    assert!(!config.contains("[backup]"), "{config}");
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
    // no Secret values through env either: the only variables are the spec's own `env`
    fn env_names(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(vars)) = m.get("env") {
                    out.extend(
                        vars.iter()
                            .filter_map(|e| e["name"].as_str().map(String::from)),
                    );
                }
                m.values().for_each(|x| env_names(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| env_names(x, out)),
            _ => {}
        }
    }
    let values = serde_json::to_value(o.to_values().expect("values")).expect("json");
    let mut names = Vec::new();
    env_names(&values, &mut names);
    names.sort();
    names.dedup();
    assert_eq!(
        names,
        ["RUST_LOG", "SWITCHYARD_ADMIN__IDEMPOTENCY_RETENTION"]
    );
    assert!(!values.to_string().contains("secretKeyRef"));
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
            operator_namespace: "switchyard-system".into(),
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
            operator_namespace: "switchyard-system".into(),
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
            operator_namespace: "switchyard-system".into(),
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

#[test]
fn tls_cert_manager_objects() {
    let (_, objects) = built("tls-cert-manager.yaml", 1, true);
    snapshot_all("tls-cert-manager", &objects);
}

#[test]
fn cert_manager_certificate_covers_both_services_and_labels_its_secret() {
    let (_, o) = built("tls-cert-manager.yaml", 1, true);
    let cert =
        serde_json::to_value(o.certificate.expect("issuerRef makes a Certificate")).expect("json");
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    assert_eq!(cert["kind"], "Certificate");
    let spec = &cert["spec"];
    assert_eq!(spec["secretName"], "secure-tls");
    // the opt-in label lets the operator read ca.crt to verify the admin API
    assert_eq!(
        spec["secretTemplate"]["labels"]["switchyard.io/bankswitch"],
        "secure"
    );
    assert_eq!(spec["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(spec["issuerRef"]["name"], "payments-ca");
    let dns: Vec<&str> = spec["dnsNames"]
        .as_array()
        .expect("dnsNames")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    // what the operator dials, and what ATMs inside the cluster dial
    assert!(dns.contains(&"secure-admin.payments.svc"));
    assert!(dns.contains(&"secure-iso.payments.svc.cluster.local"));
    // and the name ATMs dial through the load balancer
    assert!(dns.contains(&"atm.acquirer.example"));
    assert_eq!(cert["metadata"]["ownerReferences"][0]["kind"], "BankSwitch");

    // secretName instead: no Certificate, the named Secret is mounted
    let mut bs = fixture("tls-cert-manager.yaml");
    let tls = bs.spec.tls.as_mut().expect("tls");
    tls.issuer_ref = None;
    tls.dns_names.clear();
    tls.secret_name = Some("bring-your-own".into());
    let o = build_all(
        &validate(&bs).expect("valid"),
        BuildInputs {
            drainer_replicas: 1,
            monitoring_api_served: true,
            operator_namespace: "switchyard-system".into(),
        },
    )
    .expect("builds");
    assert!(o.certificate.is_none());
    let pod = serde_json::to_string(&o.switch_deployment).expect("json");
    assert!(
        pod.contains("bring-your-own"),
        "the given Secret is mounted"
    );
}

#[test]
fn tls_is_wired_into_the_config_as_mounted_files() {
    let (_, o) = built("tls-cert-manager.yaml", 1, true);
    let config: toml::Value =
        toml::from_str(&o.config_map.data.as_ref().expect("data")["switch.toml"]).expect("toml");
    let dir = "/etc/switchyard/secrets/tls";
    assert_eq!(
        config["admin"]["tls"]["cert_file"].as_str(),
        Some(format!("{dir}/tls.crt").as_str())
    );
    assert_eq!(
        config["admin"]["tls"]["key_file"].as_str(),
        Some(format!("{dir}/tls.key").as_str())
    );
    assert!(
        config["admin"]["tls"].get("client_ca_file").is_none(),
        "the operator authenticates with its token, not a client certificate"
    );
    assert_eq!(
        config["iso8583"]["tls"]["client_ca_file"].as_str(),
        Some(format!("{dir}/ca.crt").as_str()),
        "iso8583ClientAuth: mTLS on the ATM channel"
    );
    // the files are there: every config path under the secrets dir is a projected item
    let pod = serde_json::to_value(&o.switch_deployment).expect("json");
    let items = pod.pointer("/spec/template/spec/volumes").expect("volumes");
    let text = items.to_string();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(text.contains(&format!("\"tls/{key}\"")), "{key} is mounted");
    }

    let (_, plain) = built("postgres-full.yaml", 1, true);
    let config = &plain.config_map.data.as_ref().expect("data")["switch.toml"];
    assert!(!config.contains("tls"), "no spec.tls: plain TCP and HTTP");
}

#[test]
fn network_policies_admit_only_what_each_port_is_for() {
    let (_, o) = built("tls-cert-manager.yaml", 1, true);
    let policies: Vec<Value> = o
        .network_policies
        .iter()
        .map(|p| serde_json::to_value(p).expect("json"))
        .collect();
    assert_eq!(policies.len(), 2, "switch and drainer");
    let switch = &policies[0]["spec"];
    assert_eq!(
        switch["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "switch"
    );
    let ingress = switch["ingress"].as_array().expect("ingress");
    let port_of = |rule: &Value| rule["ports"][0]["port"].as_i64();
    let iso = ingress
        .iter()
        .find(|r| port_of(r) == Some(8583))
        .expect("iso");
    assert_eq!(iso["from"][0]["ipBlock"]["cidr"], "10.40.0.0/16");
    assert_eq!(
        iso["from"][1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "stations"
    );
    let admin = ingress
        .iter()
        .find(|r| port_of(r) == Some(8080))
        .expect("admin");
    // the operator's pods in its namespace (both selectors in one peer: AND)
    assert_eq!(
        admin["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "switchyard-system"
    );
    assert_eq!(
        admin["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "switchyard-operator"
    );
    assert_eq!(
        admin["from"][1]["podSelector"]["matchLabels"]["app"],
        "support-console"
    );
    let metrics = ingress
        .iter()
        .find(|r| port_of(r) == Some(9090))
        .expect("metrics");
    assert_eq!(
        metrics["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(ingress.len(), 3, "nothing else gets in");

    let drainer = &policies[1]["spec"];
    assert_eq!(
        drainer["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "drainer"
    );
    assert_eq!(
        drainer["ingress"].as_array().map(Vec::len),
        Some(1),
        "drainers admit only metrics scrapes"
    );
    // egress: DNS, then the database and upstream ports to the listed block only
    let egress = drainer["egress"].as_array().expect("egress");
    assert_eq!(egress.len(), 2);
    assert_eq!(egress[0]["ports"][0]["port"], 53);
    let ports: Vec<i64> = egress[1]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [9443, 6432]);
    assert_eq!(egress[1]["to"][0]["ipBlock"]["cidr"], "10.60.0.0/24");

    // embedded SQLite with no upstreams: only DNS out, and no drainer policy
    let (_, embedded) = built("embedded-minimal.yaml", 0, true);
    assert_eq!(embedded.network_policies.len(), 1);
    let egress =
        serde_json::to_value(&embedded.network_policies[0]).expect("json")["spec"]["egress"]
            .clone();
    assert_eq!(egress.as_array().map(Vec::len), Some(1));

    // turned off: none
    let mut bs = fixture("tls-cert-manager.yaml");
    bs.spec.network_policy.enabled = false;
    let off = build_all(
        &validate(&bs).expect("valid"),
        BuildInputs {
            drainer_replicas: 1,
            monitoring_api_served: true,
            operator_namespace: "switchyard-system".into(),
        },
    )
    .expect("builds");
    assert!(off.network_policies.is_empty());
}

#[test]
fn bad_tls_and_peer_specs_are_refused_with_their_field() {
    let mut bs = fixture("tls-cert-manager.yaml");
    bs.spec.tls.as_mut().expect("tls").secret_name = Some("also".into());
    bs.spec.tls.as_mut().expect("tls").dns_names = vec!["-bad.example".into()];
    bs.spec.network_policy.iso_from[0].cidr = Some("10.40.0.0/33".into());
    bs.spec.network_policy.egress_to[0].cidr = None;
    let err = validate(&bs).expect_err("invalid").to_string();
    assert!(
        err.contains("spec.tls: needs exactly one of issuerRef"),
        "{err}"
    );
    assert!(err.contains("spec.networkPolicy.isoFrom[0].cidr"), "{err}");
    assert!(err.contains("spec.tls.dnsNames[0]"), "{err}");
    assert!(
        err.contains("spec.networkPolicy.egressTo[0]: needs a cidr"),
        "{err}"
    );
    let mut bs = fixture("tls-cert-manager.yaml");
    bs.spec.tls.as_mut().expect("tls").iso8583 = false;
    let err = validate(&bs).expect_err("invalid").to_string();
    assert!(err.contains("spec.tls.iso8583ClientAuth"), "{err}");
}
