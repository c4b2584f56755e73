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
        "jsonPath: .status.conditions[?(@.type==\"Ready\")].status",
        "jsonPath: .status.storeAndForward.backlog",
        "rule: self.replicas <= 1 || has(self.database)",
        "rule: self.minReplicas <= self.maxReplicas",
        "x-kubernetes-list-type: map",
    ] {
        assert!(yaml.contains(needle), "CRD lacks `{needle}`");
    }
}
