//! Every Secret and key a BankSwitch references, checked before anything is applied, so a
//! mistyped name shows as `Degraded/SecretNotFound` in one reconcile instead of pods stuck in
//! `ContainerCreating` until the Deployment's progress deadline says `RolloutStuck`.
//!
//! Only presence is checked (the Secret exists, the key is in its `data`); values are never read
//! into a message, a log line or status. The format of key material is the switch's to judge at
//! start-up (a wrong LMK exits with a message the operator surfaces from the pod).
//!
//! The operator reads a Secret only when it carries the opt-in label
//! `switchyard.io/bankswitch: <name of the BankSwitch naming it>` ([`read_opted_in`]): the label
//! is first checked on the Secret's metadata alone, so a BankSwitch that names someone else's
//! Secret gets `SecretNotLabeled` and the Secret's data is never fetched.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::bank_switch::{BankSwitchSpec, SecretKeyRef};

/// Label a Secret must carry, valued with the BankSwitch's name, before the operator reads it.
pub const SECRET_OPT_IN_LABEL: &str = "switchyard.io/bankswitch";

/// A Secret could not be read for a BankSwitch.
#[derive(Debug, thiserror::Error)]
pub enum SecretAccessError {
    /// No Secret of that name in the namespace.
    #[error("Secret {secret} does not exist in this namespace")]
    NotFound {
        /// Secret name.
        secret: String,
    },
    /// The Secret exists but is not labelled for this BankSwitch; its data was not fetched.
    #[error(
        "Secret {secret} lacks the label {SECRET_OPT_IN_LABEL}={bankswitch}; the operator reads only Secrets labelled for the BankSwitch that names them (kubectl label secret {secret} {SECRET_OPT_IN_LABEL}={bankswitch})"
    )]
    NotLabeled {
        /// Secret name.
        secret: String,
        /// The BankSwitch the label must name.
        bankswitch: String,
    },
    /// The API server refused or failed the read.
    #[error("failed to read Secret {secret}")]
    Api {
        /// Secret name.
        secret: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

fn labelled_for(labels: Option<&BTreeMap<String, String>>, bankswitch: &str) -> bool {
    labels
        .and_then(|l| l.get(SECRET_OPT_IN_LABEL))
        .is_some_and(|v| v == bankswitch)
}

/// Reads Secret `name` for BankSwitch `bankswitch`: its metadata first (`get` with the
/// `PartialObjectMetadata` form, which carries no data), and the whole Secret only when the
/// opt-in label names that BankSwitch. The label is checked again on the full object, so a
/// label removed in between is not raced.
pub async fn read_opted_in(
    client: &Client,
    namespace: &str,
    bankswitch: &str,
    name: &str,
) -> Result<Secret, SecretAccessError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |source| SecretAccessError::Api {
        secret: name.to_owned(),
        source,
    };
    let not_found = || SecretAccessError::NotFound {
        secret: name.to_owned(),
    };
    let not_labeled = || SecretAccessError::NotLabeled {
        secret: name.to_owned(),
        bankswitch: bankswitch.to_owned(),
    };
    let meta = api
        .get_metadata_opt(name)
        .await
        .map_err(api_error)?
        .ok_or_else(not_found)?;
    if !labelled_for(meta.metadata.labels.as_ref(), bankswitch) {
        return Err(not_labeled());
    }
    let secret = api
        .get_opt(name)
        .await
        .map_err(api_error)?
        .ok_or_else(not_found)?;
    if !labelled_for(secret.metadata.labels.as_ref(), bankswitch) {
        return Err(not_labeled());
    }
    Ok(secret)
}

/// Why a referenced Secret cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretProblemKind {
    /// No Secret of that name in the BankSwitch's namespace.
    NotFound,
    /// The Secret exists but has no such key.
    KeyMissing,
    /// The Secret lacks the opt-in label for this BankSwitch (its data was not read).
    NotLabeled,
    /// The cert-manager Certificate has not produced its Secret yet.
    NotIssued,
}

impl SecretProblemKind {
    /// PascalCase condition and Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotFound => "SecretNotFound",
            Self::KeyMissing => "SecretKeyMissing",
            Self::NotLabeled => "SecretNotLabeled",
            Self::NotIssued => "CertificateNotIssued",
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
    /// The BankSwitch whose name the opt-in label must carry.
    pub bankswitch: String,
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
            SecretProblemKind::NotLabeled => write!(
                f,
                "{}: Secret {name} lacks the label {SECRET_OPT_IN_LABEL}={bs}; the operator reads only Secrets labelled for the BankSwitch that names them (kubectl label secret {name} {SECRET_OPT_IN_LABEL}={bs})",
                self.field,
                bs = self.bankswitch
            ),
            SecretProblemKind::NotIssued => write!(
                f,
                "{}: cert-manager has not issued Secret {name} yet (see the Certificate's conditions: kubectl describe certificate)",
                self.field
            ),
        }
    }
}

/// Field name of the Secret cert-manager keeps for `spec.tls.issuerRef`.
pub const ISSUED_TLS_FIELD: &str = "spec.tls.issuerRef";

/// Every Secret key the spec of BankSwitch `name` references, with the field that names it, in
/// spec order. With `spec.tls` these include `tls.crt`, `tls.key` and `ca.crt` of the TLS Secret
/// (the one named, or `<name>-tls` that cert-manager issues).
pub fn referenced_secret_keys(name: &str, spec: &BankSwitchSpec) -> Vec<(String, SecretKeyRef)> {
    let mut refs = Vec::new();
    if let Some((field, secret)) = spec.database.as_ref().and_then(|db| db.url_secret()) {
        refs.push((field.into(), secret));
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
    if let Some(tls) = &spec.tls {
        let (field, secret) = match &tls.secret_name {
            Some(secret) => ("spec.tls.secretName", secret.clone()),
            None => (ISSUED_TLS_FIELD, tls_secret_for(name)),
        };
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            refs.push((
                field.into(),
                SecretKeyRef {
                    name: secret.clone(),
                    key: key.into(),
                },
            ));
        }
    }
    refs
}

/// Name of the Secret cert-manager keeps for BankSwitch `name` (`<name>-tls`).
pub fn tls_secret_for(name: &str) -> String {
    format!("{name}-tls")
}

/// What reading one referenced Secret found.
#[derive(Clone, Debug, PartialEq)]
pub enum SecretLookup {
    /// The Secret, labelled for the BankSwitch: the names of its keys (values are not kept).
    Found(std::collections::BTreeSet<String>),
    /// No such Secret.
    NotFound,
    /// The Secret exists without the opt-in label (not read).
    NotLabeled,
}

/// The keys a Secret has (in `data` or `stringData`), without their values.
pub fn key_names(secret: &Secret) -> std::collections::BTreeSet<String> {
    let data = secret.data.iter().flat_map(|d| d.keys());
    let string_data = secret.string_data.iter().flat_map(|d| d.keys());
    data.chain(string_data).cloned().collect()
}

/// Compares the references with the Secrets found. Pure, so the wording is unit-tested without
/// an API server.
pub fn find_problems(
    bankswitch: &str,
    refs: &[(String, SecretKeyRef)],
    found: &BTreeMap<String, SecretLookup>,
) -> Vec<SecretProblem> {
    let mut reported = std::collections::BTreeSet::new();
    refs.iter()
        .filter_map(|(field, reference)| {
            let kind = match found.get(&reference.name) {
                Some(SecretLookup::Found(keys)) => {
                    if keys.contains(&reference.key) {
                        return None;
                    }
                    SecretProblemKind::KeyMissing
                }
                Some(SecretLookup::NotLabeled) => SecretProblemKind::NotLabeled,
                _ if field == ISSUED_TLS_FIELD => SecretProblemKind::NotIssued,
                _ => SecretProblemKind::NotFound,
            };
            // a Secret that is missing or unlabelled is reported once per field, not once per key
            if kind != SecretProblemKind::KeyMissing
                && !reported.insert((field.clone(), reference.name.clone()))
            {
                return None;
            }
            Some(SecretProblem {
                kind,
                field: field.clone(),
                reference: reference.clone(),
                bankswitch: bankswitch.to_owned(),
            })
        })
        .collect()
}

/// Reads each referenced Secret once ([`read_opted_in`]: `get`, the only verb this needs, and
/// only the metadata of an unlabelled one) and returns what is missing, in spec order. An API
/// error other than 404 is returned as is (the reconcile retries).
pub async fn check_secret_refs(
    client: &Client,
    namespace: &str,
    bankswitch: &str,
    spec: &BankSwitchSpec,
) -> Result<Vec<SecretProblem>, kube::Error> {
    let refs = referenced_secret_keys(bankswitch, spec);
    let mut found = BTreeMap::new();
    for (_, reference) in &refs {
        if found.contains_key(&reference.name) {
            continue;
        }
        let lookup = match read_opted_in(client, namespace, bankswitch, &reference.name).await {
            Ok(secret) => SecretLookup::Found(key_names(&secret)),
            Err(SecretAccessError::NotFound { .. }) => SecretLookup::NotFound,
            Err(SecretAccessError::NotLabeled { .. }) => SecretLookup::NotLabeled,
            Err(SecretAccessError::Api { source, .. }) => return Err(source),
        };
        found.insert(reference.name.clone(), lookup);
    }
    Ok(find_problems(bankswitch, &refs, &found))
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

    fn secret(keys: &[&str]) -> SecretLookup {
        SecretLookup::Found(key_names(&Secret {
            data: Some(
                keys.iter()
                    .map(|k| ((*k).to_owned(), ByteString(b"secret-value".to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }))
    }

    #[test]
    fn missing_secret_and_missing_key_are_named_with_their_field() {
        let refs = referenced_secret_keys("bsw", &spec());
        let found = BTreeMap::from([("keys".to_owned(), secret(&["lmk"]))]);
        let problems = find_problems("bsw", &refs, &found);
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
        let refs = referenced_secret_keys("bsw", &spec());
        let found = BTreeMap::from([
            ("keys".to_owned(), secret(&["lmk", "kek"])),
            ("admin".to_owned(), secret(&["tokens"])),
        ]);
        assert!(find_problems("bsw", &refs, &found).is_empty());
    }

    #[test]
    fn an_unlabelled_secret_is_named_once_with_the_label_to_add() {
        let refs = referenced_secret_keys("bsw", &spec());
        let found = BTreeMap::from([
            ("keys".to_owned(), SecretLookup::NotLabeled),
            ("admin".to_owned(), secret(&["tokens"])),
        ]);
        let problems = find_problems("bsw", &refs, &found);
        // lmk and kek live in one Secret: one problem per field that names it
        assert_eq!(problems.len(), 2);
        assert!(
            problems
                .iter()
                .all(|p| p.kind == SecretProblemKind::NotLabeled)
        );
        let text = problems[0].to_string();
        assert!(text.contains("kubectl label secret keys switchyard.io/bankswitch=bsw"));
        assert_eq!(problems[0].kind.reason(), "SecretNotLabeled");
    }

    #[test]
    fn tls_secrets_are_referenced_with_their_three_keys() {
        let mut with_secret = spec();
        with_secret.tls =
            Some(serde_yaml::from_str("secretName: mine\niso8583: true\n").expect("tls"));
        let refs = referenced_secret_keys("bsw", &with_secret);
        let tls: Vec<_> = refs
            .iter()
            .filter(|(f, _)| f == "spec.tls.secretName")
            .map(|(_, r)| (r.name.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            tls,
            [("mine", "tls.crt"), ("mine", "tls.key"), ("mine", "ca.crt")]
        );

        let mut issued = spec();
        issued.tls = Some(serde_yaml::from_str("issuerRef: {name: ca}\n").expect("tls"));
        let refs = referenced_secret_keys("bsw", &issued);
        let found = BTreeMap::from([
            ("keys".to_owned(), secret(&["lmk", "kek"])),
            ("admin".to_owned(), secret(&["tokens"])),
        ]);
        let problems = find_problems("bsw", &refs, &found);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].kind, SecretProblemKind::NotIssued);
        assert_eq!(problems[0].reference.name, "bsw-tls");
    }
}
