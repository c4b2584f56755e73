//! Offline rendering: every object the operator would apply for a BankSwitch file, as YAML.
//!
//! Used in GitOps pull requests (`switchyard-operator render -f bankswitch.yaml`) and by the
//! schema-validation test; it shares the builders with the controller, so what is reviewed is
//! what gets applied.

use serde::Deserialize;

use crate::bank_switch::build::{BuildInputs, build_all};
use crate::bank_switch::validate::{ValidationError, validate};
use crate::crd::BankSwitch;

/// Assumptions a render makes about the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Namespace for objects whose file has none.
    pub default_namespace: String,
    /// Render ServiceMonitor/PrometheusRule as if the monitoring API were served.
    pub monitoring_api_served: bool,
    /// Namespace the operator runs in (its pods may reach the admin port).
    pub operator_namespace: String,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            default_namespace: "default".into(),
            monitoring_api_served: true,
            operator_namespace: crate::bank_switch::build::DEFAULT_OPERATOR_NAMESPACE.into(),
        }
    }
}

/// Rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not a BankSwitch.
    #[error("failed to parse BankSwitch YAML document {index}")]
    Parse {
        /// 0-based document index.
        index: usize,
        /// Cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A builder failed.
    #[error(transparent)]
    Build(#[from] crate::bank_switch::build::BuildError),
    /// An object could not be written as YAML.
    #[error("failed to write rendered object as YAML")]
    Yaml(#[source] serde_yaml::Error),
    /// An object could not be converted.
    #[error("failed to convert rendered object")]
    Json(#[source] serde_json::Error),
}

/// Renders every BankSwitch document in `input` to a multi-document YAML stream.
pub fn render(input: &str, opts: &RenderOptions) -> Result<String, RenderError> {
    let mut docs = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| RenderError::Parse { index, source })?;
        if value.is_null() {
            continue;
        }
        let mut bs: BankSwitch =
            serde_yaml::from_value(value).map_err(|source| RenderError::Parse { index, source })?;
        if bs.metadata.namespace.is_none() {
            bs.metadata.namespace = Some(opts.default_namespace.clone());
        }
        let validated = validate(&bs)?;
        let objects = build_all(
            &validated,
            BuildInputs {
                drainer_replicas: validated.spec.store_and_forward.drainers.min_replicas,
                monitoring_api_served: opts.monitoring_api_served,
                operator_namespace: opts.operator_namespace.clone(),
            },
        )?;
        for obj in objects.to_values().map_err(RenderError::Json)? {
            docs.push(serde_yaml::to_string(&obj).map_err(RenderError::Yaml)?);
        }
    }
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect::<String>())
}
