//! Every Secret and key a BankSwitch references, checked before anything is applied, so a
//! mistyped name shows as `Degraded/SecretNotFound` in one reconcile instead of pods stuck in
//! `ContainerCreating` until the Deployment's progress deadline says `RolloutStuck`.
//!
//! Only presence is checked (the Secret exists, the key is in its `data`); values are never read
//! into a message, a log line or status. The format of key material is the switch's to judge at
//! start-up (a wrong LMK exits with a message the operator surfaces from the pod).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::bank_switch::{BankSwitchSpec, SecretKeyRef};

/// Why a referenced Secret cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretProblemKind {
    /// No Secret of that name in the BankSwitch's namespace.
    NotFound,
    /// The Secret exists but has no such key.
    KeyMissing,
}

impl SecretProblemKind {
    /// PascalCase condition and Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotFound => "SecretNotFound",
            Self::KeyMissing => "SecretKeyMissing",
        }
    }
}

/// One referenced Secret key that is not there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretProblem {
    /// What is wrong.
    pub kind: SecretProblemKind,
    /// The spec field that references it, e.g. `spec.keys.lmkSecretRef`.
    pub field: String,
    /// The reference.
    pub reference: SecretKeyRef,
}

impl std::fmt::Display for SecretProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SecretKeyRef { name, key } = &self.reference;
        match self.kind {
            SecretProblemKind::NotFound => write!(
                f,
                "{}: Secret {name} does not exist in this namespace; create it (key {key}) or fix the name",
                self.field
            ),
            SecretProblemKind::KeyMissing => write!(
                f,
                "{}: Secret {name} has no key {key}; add the key or fix spec's key name",
                self.field
            ),
        }
    }
}

/// Every Secret key the spec references, with the field that names it, in spec order.
pub fn referenced_secret_keys(spec: &BankSwitchSpec) -> Vec<(String, SecretKeyRef)> {
    let mut refs = Vec::new();
    if let Some(db) = &spec.database {
        refs.push((
            "spec.database.urlSecretRef".into(),
            db.url_secret_ref.clone(),
        ));
    }
    refs.push((
        "spec.keys.lmkSecretRef".into(),
        spec.keys.lmk_secret_ref.clone(),
    ));
    refs.push((
        "spec.keys.kekSecretRef".into(),
        spec.keys.kek_secret_ref.clone(),
    ));
    refs.push((
        "spec.admin.tokenSecretRef".into(),
        spec.admin.token_secret_ref.clone(),
    ));
    if let Some(viewer) = &spec.admin.viewer_token_secret_ref {
        refs.push(("spec.admin.viewerTokenSecretRef".into(), viewer.clone()));
    }
    for up in &spec.routing.upstreams {
        refs.push((
            format!("spec.routing.upstreams[{}].tmkSecretRef", up.name),
            up.tmk_secret_ref.clone(),
        ));
    }
    refs
}

/// Compares the references with the Secrets found (`None`: the Secret does not exist). Pure, so
/// the wording is unit-tested without an API server.
pub fn find_problems(
    refs: &[(String, SecretKeyRef)],
    found: &BTreeMap<String, Option<Secret>>,
) -> Vec<SecretProblem> {
    refs.iter()
        .filter_map(|(field, reference)| {
            let kind = match found.get(&reference.name) {
                Some(Some(secret)) => {
                    let has_key = secret
                        .data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&reference.key))
                        || secret
                            .string_data
                            .as_ref()
                            .is_some_and(|d| d.contains_key(&reference.key));
                    if has_key {
                        return None;
                    }
                    SecretProblemKind::KeyMissing
                }
                _ => SecretProblemKind::NotFound,
            };
            Some(SecretProblem {
                kind,
                field: field.clone(),
                reference: reference.clone(),
            })
        })
        .collect()
}

/// Reads each referenced Secret once (`get`, the only verb this needs) and returns what is
/// missing, in spec order. An API error other than 404 is returned as is (the reconcile retries).
pub async fn check_secret_refs(
    client: &Client,
    namespace: &str,
    spec: &BankSwitchSpec,
) -> Result<Vec<SecretProblem>, kube::Error> {
    let refs = referenced_secret_keys(spec);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut found = BTreeMap::new();
    for (_, reference) in &refs {
        if found.contains_key(&reference.name) {
            continue;
        }
        let secret = api.get_opt(&reference.name).await?;
        found.insert(reference.name.clone(), secret);
    }
    Ok(find_problems(&refs, &found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn spec() -> BankSwitchSpec {
        serde_yaml::from_str(
            "image: i\nkeys: {lmkSecretRef: {name: keys, key: lmk}, kekSecretRef: {name: keys, key: kek}}\n\
             admin: {tokenSecretRef: {name: admin, key: tokens}}\n",
        )
        .expect("spec")
    }

    fn secret(keys: &[&str]) -> Secret {
        Secret {
            data: Some(
                keys.iter()
                    .map(|k| ((*k).to_owned(), ByteString(b"secret-value".to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn missing_secret_and_missing_key_are_named_with_their_field() {
        let refs = referenced_secret_keys(&spec());
        let found = BTreeMap::from([("keys".to_owned(), Some(secret(&["lmk"])))]);
        let problems = find_problems(&refs, &found);
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].kind, SecretProblemKind::KeyMissing);
        assert_eq!(problems[0].field, "spec.keys.kekSecretRef");
        assert_eq!(problems[1].kind.reason(), "SecretNotFound");
        let text = problems[1].to_string();
        assert!(text.contains("spec.admin.tokenSecretRef") && text.contains("admin"));
        assert!(
            !problems
                .iter()
                .any(|p| p.to_string().contains("secret-value"))
        );
    }

    #[test]
    fn all_present_is_no_problem() {
        let refs = referenced_secret_keys(&spec());
        let found = BTreeMap::from([
            ("keys".to_owned(), Some(secret(&["lmk", "kek"]))),
            ("admin".to_owned(), Some(secret(&["tokens"]))),
        ]);
        assert!(find_problems(&refs, &found).is_empty());
    }
}
