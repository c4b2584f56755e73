//! Operator metrics (SPEC §8 names), exposed on `/metrics` in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `{controller,result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `bankswitch` or `keyrotation`.
    pub controller: String,
    /// `success` or `error`.
    pub result: String,
}

/// `{controller}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// Controller name.
    pub controller: String,
}

/// `{controller,reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Controller name.
    pub controller: String,
    /// Stable error reason (the error variant).
    pub reason: String,
}

/// `{bankswitch}` as `namespace/name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BankSwitchLabels {
    /// `namespace/name`.
    pub bankswitch: String,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms … ~16 s: a reconcile is a handful of API round trips.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// All operator metrics plus their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_total: Family<ReconcileLabels, Counter>,
    reconcile_duration: HistogramFamily,
    reconcile_errors: Family<ErrorLabels, Counter>,
    drainer_replicas: Family<BankSwitchLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconcile_total = Family::<ReconcileLabels, Counter>::default();
        let reconcile_duration = HistogramFamily::new_with_constructor(duration_histogram);
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let drainer_replicas = Family::<BankSwitchLabels, Gauge>::default();
        // Counter names get their `_total` suffix from the encoder.
        registry.register(
            "switchyard_operator_reconcile",
            "Reconciles by controller and result",
            reconcile_total.clone(),
        );
        registry.register(
            "switchyard_operator_reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "switchyard_operator_reconcile_errors",
            "Failed reconciles by controller and error reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "switchyard_operator_drainer_replicas",
            "SAF drainer replicas set per BankSwitch",
            drainer_replicas.clone(),
        );
        Self {
            registry,
            reconcile_total,
            reconcile_duration,
            reconcile_errors,
            drainer_replicas,
        }
    }
}

impl Metrics {
    /// Starts timing one reconcile; the returned guard records duration and result on drop.
    pub fn reconcile_timer(self: &Arc<Self>, controller: &'static str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: Arc::clone(self),
            controller,
            start: Instant::now(),
            error_reason: None,
        }
    }

    /// Sets the drainer replica gauge of one BankSwitch.
    pub fn set_drainer_replicas(&self, namespace: &str, name: &str, replicas: i32) {
        self.drainer_replicas
            .get_or_create(&BankSwitchLabels {
                bankswitch: format!("{namespace}/{name}"),
            })
            .set(i64::from(replicas));
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records one reconcile when dropped (so early returns and `?` are counted too).
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: &'static str,
    start: Instant,
    error_reason: Option<&'static str>,
}

impl ReconcileTimer {
    /// Marks this reconcile as failed with a stable reason label.
    pub fn fail(&mut self, reason: &'static str) {
        self.error_reason = Some(reason);
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        let controller = self.controller.to_owned();
        self.metrics
            .reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.clone(),
            })
            .observe(self.start.elapsed().as_secs_f64());
        let result = if self.error_reason.is_some() {
            "error"
        } else {
            "success"
        };
        self.metrics
            .reconcile_total
            .get_or_create(&ReconcileLabels {
                controller: controller.clone(),
                result: result.into(),
            })
            .inc();
        if let Some(reason) = self.error_reason {
            self.metrics
                .reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller,
                    reason: reason.into(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_metric_names_are_exposed() {
        let metrics = Arc::new(Metrics::default());
        drop(metrics.reconcile_timer("bankswitch"));
        let mut failed = metrics.reconcile_timer("bankswitch");
        failed.fail("apply");
        drop(failed);
        metrics.set_drainer_replicas("payments", "atm", 3);
        let text = metrics.encode().expect("encodes");
        for needle in [
            r#"switchyard_operator_reconcile_total{controller="bankswitch",result="success"} 1"#,
            r#"switchyard_operator_reconcile_total{controller="bankswitch",result="error"} 1"#,
            r#"switchyard_operator_reconcile_errors_total{controller="bankswitch",reason="apply"} 1"#,
            r#"switchyard_operator_reconcile_duration_seconds_count{controller="bankswitch"} 2"#,
            r#"switchyard_operator_drainer_replicas{bankswitch="payments/atm"} 3"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
