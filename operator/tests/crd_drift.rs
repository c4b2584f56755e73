//! CI's drift check: the committed `crds/` must equal what the Rust types generate.

use std::path::PathBuf;

use switchyard_operator::crd;

#[test]
fn committed_crds_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for definition in crd::all() {
        let path = dir.join(crd::file_name(&definition));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd::to_yaml(&definition).expect("CRD serializes");
        assert!(
            committed == generated,
            "{} differs from the code; run `cargo run -p switchyard-operator -- crd --out-dir crds/` \
             and commit the result",
            path.display()
        );
    }
}

#[test]
fn crd_has_what_kubectl_users_rely_on() {
    let yaml = crd::all_yaml().expect("CRDs serialize");
    for needle in [
        "shortNames:\n    - bsw",
        "categories:\n    - switchyard",
        "status: {}",
        "jsonPath: .status.ready",
        "jsonPath: .status.conditions[0].reason",
        "specReplicasPath: .spec.replicas",
        "statusReplicasPath: .status.replicas",
        "labelSelectorPath: .status.selector",
        "jsonPath: .status.storeAndForward.backlog",
        "rule: self.replicas <= 1 || has(self.database)",
        "rule: self.minReplicas <= self.maxReplicas",
        "x-kubernetes-list-type: map",
    ] {
        assert!(yaml.contains(needle), "CRD lacks `{needle}`");
    }
    assert!(
        !yaml.contains("Auto-generated derived type"),
        "both CRDs need a real top-level description for `kubectl explain`"
    );
}

#[test]
fn conditions_are_a_map_keyed_on_type_in_both_crds() {
    for crd in crd::all() {
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema");
        let status = &schema.properties.as_ref().expect("properties")["status"];
        let conditions = &status.properties.as_ref().expect("status properties")["conditions"];
        assert_eq!(conditions.x_kubernetes_list_type.as_deref(), Some("map"));
        assert_eq!(
            conditions.x_kubernetes_list_map_keys.as_deref(),
            Some(&["type".to_owned()][..])
        );
    }
}
