//! The CRDs' CEL rules (`x-kubernetes-validations`) compiled and evaluated client-side, so a
//! rule that does not compile or does not hold is caught here rather than by `kubectl apply`.

use std::path::PathBuf;

use kube::core::cel::Validator;
use serde_json::{Value, json};
use switchyard_operator::crd::{BankSwitch, KeyRotation};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The schema as committed in `crds/` (what users install).
fn schema(file: &str) -> Value {
    let text = std::fs::read_to_string(root().join("../crds").join(file)).expect("CRD file");
    let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A fixture after defaulting (serde applies the same defaults the schema declares).
fn bank_switch(edit: impl FnOnce(&mut Value)) -> Value {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/postgres-full.yaml")).expect("fixture");
    let bs: BankSwitch = serde_yaml::from_str(&text).expect("BankSwitch");
    let mut value = serde_json::to_value(&bs).expect("json");
    edit(&mut value);
    value
}

fn key_rotation(edit: impl FnOnce(&mut Value)) -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/keyrotation/monthly.yaml"))
        .expect("fixture");
    let kr: KeyRotation = serde_yaml::from_str(&text).expect("KeyRotation");
    let mut value = serde_json::to_value(&kr).expect("json");
    edit(&mut value);
    value
}

/// One change to a valid object.
type Edit = Box<dyn FnOnce(&mut Value)>;

fn errors(schema: &Value, object: &Value) -> String {
    match Validator::new().validate(schema, object, None) {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn valid_objects_pass_every_rule() {
    let bs_schema = schema("bankswitches.switchyard.io.yaml");
    assert_eq!(errors(&bs_schema, &bank_switch(|_| {})), "");
    let embedded: BankSwitch = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/embedded-minimal.yaml"))
            .expect("fixture"),
    )
    .expect("BankSwitch");
    assert_eq!(
        errors(&bs_schema, &serde_json::to_value(&embedded).expect("json")),
        ""
    );
    assert_eq!(
        errors(
            &schema("keyrotations.switchyard.io.yaml"),
            &key_rotation(|_| {})
        ),
        ""
    );
    // a CloudNativePG Cluster instead of a URL Secret, and embedded SQLite with backups
    for fixture in ["postgres-cnpg.yaml", "embedded-backup.yaml"] {
        let bs: BankSwitch = serde_yaml::from_str(
            &std::fs::read_to_string(root().join("tests/fixtures").join(fixture)).expect("fixture"),
        )
        .expect("BankSwitch");
        assert_eq!(
            errors(&bs_schema, &serde_json::to_value(&bs).expect("json")),
            "",
            "{fixture}"
        );
    }
    // TLS from cert-manager and a narrowed NetworkPolicy hold every rule too
    let tls: BankSwitch = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tls-cert-manager.yaml"))
            .expect("fixture"),
    )
    .expect("BankSwitch");
    assert_eq!(
        errors(&bs_schema, &serde_json::to_value(&tls).expect("json")),
        ""
    );
}

#[test]
fn bank_switch_rules_reject_what_cannot_work() {
    let s = schema("bankswitches.switchyard.io.yaml");
    let cases: Vec<(&str, Edit)> = vec![
        (
            "replicas > 1 needs spec.database",
            Box::new(|v: &mut Value| {
                v["spec"].as_object_mut().expect("spec").remove("database");
            }),
        ),
        (
            "set exactly one of database.urlSecretRef or database.cnpg",
            Box::new(|v: &mut Value| {
                v["spec"]["database"]["cnpg"] = json!({"clusterRef": {"name": "payments-db"}});
            }),
        ),
        (
            "set exactly one of database.urlSecretRef or database.cnpg",
            Box::new(|v: &mut Value| {
                v["spec"]["database"] = json!({});
            }),
        ),
        (
            "minReplicas must not exceed maxReplicas",
            Box::new(|v: &mut Value| {
                v["spec"]["storeAndForward"]["drainers"]["minReplicas"] = json!(9);
            }),
        ),
        (
            "every route must name an upstream",
            Box::new(|v: &mut Value| {
                v["spec"]["routing"]["routes"] = json!([{"prefix": "5", "upstream": "nobody"}]);
            }),
        ),
        (
            "preStopDelaySeconds must be shorter",
            Box::new(|v: &mut Value| {
                v["spec"]["termination"]["preStopDelaySeconds"] = json!(90);
            }),
        ),
        (
            "at most 40 characters",
            Box::new(|v: &mut Value| {
                v["metadata"]["name"] = json!("a".repeat(41));
            }),
        ),
        (
            "tls needs exactly one of issuerRef",
            Box::new(|v: &mut Value| {
                v["spec"]["tls"] = json!({"issuerRef": {"name": "ca"}, "secretName": "mine"});
            }),
        ),
        (
            "tls needs exactly one of issuerRef",
            Box::new(|v: &mut Value| {
                v["spec"]["tls"] = json!({"iso8583": true});
            }),
        ),
        (
            "a peer is either a cidr or namespace/pod selectors",
            Box::new(|v: &mut Value| {
                v["spec"]["networkPolicy"]["isoFrom"] =
                    json!([{"cidr": "10.0.0.0/8", "podSelector": {"app": "atm"}}]);
            }),
        ),
        (
            "a peer is either a cidr or namespace/pod selectors",
            Box::new(|v: &mut Value| {
                v["spec"]["networkPolicy"]["adminFrom"] = json!([{}]);
            }),
        ),
    ];
    for (message, edit) in cases {
        let found = errors(&s, &bank_switch(edit));
        assert!(
            found.contains(message),
            "expected `{message}`, got: {found}"
        );
    }
}

#[test]
fn key_rotation_rules_demand_exactly_one_choice() {
    let s = schema("keyrotations.switchyard.io.yaml");
    let both = errors(
        &s,
        &key_rotation(|v| v["spec"]["terminals"]["ids"] = json!(["ATM00001"])),
    );
    assert!(both.contains("exactly one of terminals"), "{both}");
    let none = errors(
        &s,
        &key_rotation(|v| v["spec"]["terminals"]["all"] = json!(false)),
    );
    assert!(none.contains("exactly one of terminals"), "{none}");
    let two = errors(
        &s,
        &key_rotation(|v| v["spec"]["schedule"]["every"] = json!("720h")),
    );
    assert!(two.contains("exactly one of schedule"), "{two}");
}
