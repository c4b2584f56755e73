//! Server-side apply under one field manager, skipped when the cluster already matches, and
//! deletion that never touches objects the operator did not create.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::build::{FIELD_MANAGER, MANAGED_BY};

/// Annotation holding the hash of what the operator last applied; a spec change that only
/// removes a field still changes it, which a subset comparison alone would miss.
pub const APPLIED_HASH_ANNOTATION: &str = "switchyard.io/applied-hash";

/// A Kubernetes API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading the current object failed.
    #[error("failed to read {kind} {name}")]
    Get {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Server-side apply failed.
    #[error("failed to apply {kind} {name}")]
    Apply {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting an object failed.
    #[error("failed to delete {kind} {name}")]
    Delete {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The object could not be serialized for hashing.
    #[error("failed to serialize {kind} {name}")]
    Serialize {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

impl ApplyError {
    /// Stable short label for metrics (`reason`).
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Get { .. } => "get",
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::Serialize { .. } => "serialize",
        }
    }
}

/// Applies objects into one namespace.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// True when every field set in `desired` has the same value in `observed`.
///
/// The API server adds defaults and status, so equality is "desired is contained in observed";
/// lists must match element by element. Resource quantities under `requests`/`limits` compare by
/// value, because the server rewrites them canonically (`0.5` → `500m`, `1024Mi` → `1Gi`) and a
/// textual comparison would re-apply such a spec forever.
pub fn is_subset(desired: &Value, observed: &Value) -> bool {
    subset_in(desired, observed, false)
}

fn subset_in(desired: &Value, observed: &Value, quantities: bool) -> bool {
    match (desired, observed) {
        (Value::Null, _) => true,
        (Value::Object(d), Value::Object(o)) => d.iter().all(|(k, dv)| {
            // Inside `requests`/`limits` every value is a quantity.
            let q = quantities || k == "requests" || k == "limits";
            dv.is_null() || o.get(k).is_some_and(|ov| subset_in(dv, ov, q))
        }),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| is_subset(dv, ov))
        }
        (Value::Number(d), Value::Number(o)) => d.as_f64() == o.as_f64(),
        (Value::String(d), Value::String(o)) if quantities && d != o => {
            matches!((parse_quantity(d), parse_quantity(o)), (Some(a), Some(b)) if (a - b).abs() <= a.abs() * 1e-9)
        }
        (d, o) => d == o,
    }
}

/// Value of a Kubernetes quantity (`500m`, `1.5Gi`, `2e3`), or `None` if it is not one.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// Hash of an object's desired JSON (without the hash annotation itself).
pub fn desired_hash(desired: &Value) -> String {
    let digest = Sha256::digest(desired.to_string().as_bytes());
    hex::encode(&digest[..8])
}

impl Applier {
    /// An applier for `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
        }
    }

    /// The typed API for `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Applies `desired` unless the cluster already holds it; returns the object as it now is
    /// and whether a write happened.
    pub async fn apply<K>(
        &self,
        api: &Api<K>,
        dt: &K::DynamicType,
        desired: &K,
    ) -> Result<(K, bool), ApplyError>
    where
        K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    {
        let kind = K::kind(dt).into_owned();
        let name = desired.name_any();
        let serialize_err = |source| ApplyError::Serialize {
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        let hash = desired_hash(&serde_json::to_value(desired).map_err(serialize_err)?);
        let mut stamped = desired.clone();
        stamped
            .annotations_mut()
            .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
        let desired_json = serde_json::to_value(&stamped).map_err(serialize_err)?;

        let existing = api.get_opt(&name).await.map_err(|source| ApplyError::Get {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
        if let Some(existing) = existing {
            let same_hash = existing.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash);
            let observed = serde_json::to_value(&existing).map_err(serialize_err)?;
            if same_hash && is_subset(&desired_json, &observed) {
                return Ok((existing, false));
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = api
            .patch(&name, &params, &Patch::Apply(&desired_json))
            .await
            .map_err(|source| ApplyError::Apply {
                kind: kind.clone(),
                name: name.clone(),
                source,
            })?;
        tracing::info!(%kind, %name, "applied");
        Ok((applied, true))
    }

    /// Deletes `name` if it exists, is controlled by `owner_uid` and carries our managed-by
    /// label; anything else is left alone. Returns whether a delete was sent.
    pub async fn delete_if_owned<K>(
        &self,
        api: &Api<K>,
        dt: &K::DynamicType,
        name: &str,
        owner_uid: Option<&str>,
    ) -> Result<bool, ApplyError>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
    {
        let kind = K::kind(dt).into_owned();
        let Some(owner_uid) = owner_uid else {
            return Ok(false);
        };
        let existing = api.get_opt(name).await.map_err(|source| ApplyError::Get {
            kind: kind.clone(),
            name: name.to_owned(),
            source,
        })?;
        let Some(existing) = existing else {
            return Ok(false);
        };
        if !is_ours(&existing, owner_uid) {
            tracing::info!(%kind, %name, "not created by switchyard-operator; leaving it");
            return Ok(false);
        }
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        api.delete(name, &params)
            .await
            .map_err(|source| ApplyError::Delete {
                kind: kind.clone(),
                name: name.to_owned(),
                source,
            })?;
        tracing::info!(%kind, %name, "deleted: no longer in the spec");
        Ok(true)
    }
}

/// Whether an object was created by this operator for the BankSwitch with `owner_uid`.
pub fn is_ours<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    let managed = obj
        .meta()
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == MANAGED_BY);
    let owned = obj.meta().owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.uid == owner_uid && r.controller == Some(true))
    });
    managed && owned
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_drift() {
        let desired =
            json!({"spec": {"replicas": 2, "ports": [{"name": "iso8583", "port": 8583}]}});
        let observed = json!({"spec": {"replicas": 2, "progressDeadlineSeconds": 600,
            "ports": [{"name": "iso8583", "port": 8583, "protocol": "TCP"}]}, "status": {}});
        assert!(is_subset(&desired, &observed));
    }

    #[test]
    fn changed_value_or_list_length_is_drift() {
        let desired = json!({"spec": {"replicas": 3}});
        assert!(!is_subset(&desired, &json!({"spec": {"replicas": 2}})));
        let desired = json!({"args": ["serve", "--config", "x"]});
        assert!(!is_subset(&desired, &json!({"args": ["serve"]})));
        assert!(!is_subset(&json!({"a": 1}), &json!({})));
    }

    #[test]
    fn canonicalized_quantities_are_not_drift_but_other_strings_are() {
        let desired = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}}});
        let observed = json!({"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}});
        assert!(is_subset(&desired, &observed));
        let bigger = json!({"resources": {"requests": {"cpu": "600m", "memory": "1Gi"}}});
        assert!(!is_subset(&desired, &bigger));
        assert!(!is_subset(
            &json!({"image": "0.5"}),
            &json!({"image": "500m"})
        ));
    }

    #[test]
    fn quantities_parse_with_all_suffixes() {
        assert_eq!(parse_quantity("250m"), Some(0.25));
        assert_eq!(parse_quantity("2Ki"), Some(2048.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("1Gb"), None);
        assert_eq!(parse_quantity("abc"), None);
    }
}
