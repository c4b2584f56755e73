//! `spec.simulator`: the web ATM's Deployment and Service, snapshot-tested, plus what a
//! reviewer checks by eye (only the admin token and KEK reach the pod; the objects go away
//! when the simulator is turned off).

use std::path::PathBuf;

use switchyard_operator::bank_switch::build::{BuildInputs, build_all};
use switchyard_operator::bank_switch::simulator::{self, WEB_PORT};
use switchyard_operator::bank_switch::validate::validate;
use switchyard_operator::crd::BankSwitch;

fn fixture(name: &str) -> BankSwitch {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("BankSwitch")
}

fn inputs() -> BuildInputs {
    BuildInputs {
        drainer_replicas: 0,
        monitoring_api_served: false,
        operator_namespace: "switchyard-system".into(),
    }
}

#[test]
fn simulator_objects_snapshot() {
    let validated = validate(&fixture("embedded-simulator.yaml")).expect("valid");
    let sim = build_all(&validated, inputs())
        .expect("builds")
        .simulator
        .expect("simulator enabled");
    insta::assert_yaml_snapshot!("simulator__Deployment", sim.deployment);
    insta::assert_yaml_snapshot!("simulator__Service", sim.service);
}

#[test]
fn the_web_atm_gets_the_admin_token_and_kek_only_and_talks_to_this_switch() {
    let validated = validate(&fixture("embedded-simulator.yaml")).expect("valid");
    let dep = simulator::build_simulator_deployment(&validated);
    let pod = dep.spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap();
    let projected = volumes[0].projected.as_ref().unwrap();
    let keys: Vec<(String, String)> = projected
        .sources
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| {
            let s = s.secret.as_ref().unwrap();
            (s.name.clone(), s.items.as_ref().unwrap()[0].key.clone())
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ("staging-admin".to_string(), "tokens".to_string()),
            ("staging-keys".to_string(), "kek".to_string())
        ],
        "never the LMK or the database URL"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/local/bin/switchyard-atm".to_string()][..])
    );
    let env: std::collections::BTreeMap<_, _> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e.value.clone().unwrap()))
        .collect();
    assert_eq!(env["SWITCHYARD_ATM_ISO"], "staging-iso.payments.svc:8583");
    assert_eq!(
        env["SWITCHYARD_ATM_ADMIN"],
        "http://staging-admin.payments.svc:8080"
    );
    assert_eq!(env["SWITCHYARD_ATM_LISTEN"], format!("0.0.0.0:{WEB_PORT}"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
}

#[test]
fn no_simulator_unless_enabled() {
    let validated = validate(&fixture("embedded-minimal.yaml")).expect("valid");
    let objects = build_all(&validated, inputs()).expect("builds");
    assert!(objects.simulator.is_none());
    let rendered = objects.to_values().unwrap();
    assert!(
        rendered
            .iter()
            .all(|v| v["metadata"]["name"].as_str() != Some("demo-atm"))
    );
}

#[test]
fn with_tls_the_web_atm_speaks_tls_to_both_ports_and_mounts_only_the_ca() {
    let mut bs = fixture("embedded-simulator.yaml");
    bs.spec.tls =
        Some(serde_yaml::from_str("issuerRef: {name: ca}\niso8583: true\n").expect("tls"));
    let validated = validate(&bs).expect("valid");
    let dep = simulator::build_simulator_deployment(&validated);
    let pod = dep.spec.expect("spec").template.spec.expect("pod");
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_deref(),
        Some(
            &[
                "--tls-ca".to_string(),
                "/etc/switchyard-atm/tls/ca.crt".to_string(),
                "web".to_string()
            ][..]
        )
    );
    let admin = c
        .env
        .as_ref()
        .expect("env")
        .iter()
        .find(|e| e.name == "SWITCHYARD_ATM_ADMIN")
        .and_then(|e| e.value.clone());
    assert_eq!(
        admin.as_deref(),
        Some("https://staging-admin.payments.svc:8080")
    );
    let sources = pod.volumes.expect("volumes")[0]
        .projected
        .clone()
        .expect("projected")
        .sources
        .expect("sources");
    let tls: Vec<(String, String)> = sources
        .iter()
        .filter_map(|s| s.secret.as_ref())
        .filter(|s| s.name == "staging-tls")
        .flat_map(|s| s.items.clone().unwrap_or_default())
        .map(|i| (i.key, i.path))
        .collect();
    assert_eq!(
        tls,
        [("ca.crt".to_string(), "tls/ca.crt".to_string())],
        "the CA only, never the switch's private key"
    );

    // the ISO port plain (or mTLS) cannot work for the web ATM: refused with the field
    bs.spec.tls.as_mut().expect("tls").iso8583 = false;
    let err = validate(&bs).expect_err("invalid").to_string();
    assert!(err.contains("spec.simulator.enabled"), "{err}");
}

#[test]
fn the_network_policy_lets_the_web_atm_reach_the_iso_and_admin_ports() {
    let mut bs = fixture("embedded-simulator.yaml");
    bs.spec.network_policy.iso_from =
        vec![serde_yaml::from_str("cidr: 10.40.0.0/16").expect("peer")];
    let objects = build_all(&validate(&bs).expect("valid"), inputs()).expect("builds");
    let policy = serde_json::to_value(&objects.network_policies[0]).expect("json");
    let ingress = policy["spec"]["ingress"]
        .as_array()
        .expect("ingress")
        .clone();
    let from_simulator = |port: i64| {
        ingress
            .iter()
            .filter(|r| r["ports"][0]["port"].as_i64() == Some(port))
            .flat_map(|r| r["from"].as_array().cloned().unwrap_or_default())
            .any(|p| {
                p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "simulator"
                    && p["namespaceSelector"].is_null()
            })
    };
    assert!(from_simulator(8583), "{ingress:?}");
    assert!(from_simulator(8080), "{ingress:?}");
    // without a simulator, no such peer
    bs.spec.simulator.enabled = false;
    let objects = build_all(&validate(&bs).expect("valid"), inputs()).expect("builds");
    let text = serde_json::to_string(&objects.network_policies[0]).expect("json");
    assert!(!text.contains("simulator"));
}
