//! Operator metrics (SPEC §8 names), exposed on `/metrics` in the OpenMetrics text format.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};
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

/// `{result}` of a finished key rotation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationResultLabels {
    /// `succeeded` or `failed`.
    pub result: String,
}

/// `{keyrotation}` as `namespace/name`.
///
/// Not `namespace` and `name`: Prometheus sets `namespace` from the scraped operator pod, and a
/// metric label of the same name would be renamed to `exported_namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyRotationLabels {
    /// `namespace/name`.
    pub keyrotation: String,
}

/// `{reason}` of spans never exported.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `queue_full` or `export_failed`.
    pub reason: String,
}

/// `switchyard_operator_trace_spans_dropped_total{reason}`: process-wide, because the tracer
/// is installed before the metrics exist and counts from the export thread.
static SPANS_DROPPED: LazyLock<Family<ReasonLabel, Counter>> = LazyLock::new(Family::default);

/// Counts `n` finished spans that were never exported (the telemetry crate's drop callback).
pub fn count_dropped_spans(reason: &'static str, n: u64) {
    SPANS_DROPPED
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc_by(n);
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
    key_rotations: Family<RotationResultLabels, Counter>,
    next_rotation: Family<KeyRotationLabels, Gauge>,
    /// Series of `next_rotation` that exist, so deleted KeyRotations can be dropped.
    next_rotation_keys: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconcile_total = Family::<ReconcileLabels, Counter>::default();
        let reconcile_duration = HistogramFamily::new_with_constructor(duration_histogram);
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let drainer_replicas = Family::<BankSwitchLabels, Gauge>::default();
        let key_rotations = Family::<RotationResultLabels, Counter>::default();
        let next_rotation = Family::<KeyRotationLabels, Gauge>::default();
        let trace_spans_dropped = Family::<ReasonLabel, Counter>::clone(&SPANS_DROPPED);
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
        registry.register(
            "switchyard_operator_key_rotations",
            "Finished fleet key rotations (one per key type of a run) by result",
            key_rotations.clone(),
        );
        registry.register(
            "switchyard_operator_next_rotation_timestamp_seconds",
            "When the next scheduled rotation of a KeyRotation starts (Unix seconds); absent while one runs or it is suspended",
            next_rotation.clone(),
        );
        registry.register(
            "switchyard_operator_trace_spans_dropped",
            "Finished spans never exported, by reason (queue_full: the collector is down or slow; export_failed: a batch it refused)",
            trace_spans_dropped.clone(),
        );
        Self {
            registry,
            reconcile_total,
            reconcile_duration,
            reconcile_errors,
            drainer_replicas,
            key_rotations,
            next_rotation,
            next_rotation_keys: Mutex::default(),
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

    /// Counts one finished fleet rotation; `result` is `succeeded` or `failed`.
    pub fn inc_key_rotations(&self, result: &str) {
        self.key_rotations
            .get_or_create(&RotationResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Sets (or, with `None`, removes) the next-rotation time of one KeyRotation.
    pub fn set_next_rotation(&self, namespace: &str, name: &str, at_unix_seconds: Option<i64>) {
        let key = format!("{namespace}/{name}");
        let labels = KeyRotationLabels {
            keyrotation: key.clone(),
        };
        let Ok(mut keys) = self.next_rotation_keys.lock() else {
            return;
        };
        match at_unix_seconds {
            Some(at) => {
                self.next_rotation.get_or_create(&labels).set(at);
                keys.insert(key);
            }
            None => {
                self.next_rotation.remove(&labels);
                keys.remove(&key);
            }
        }
    }

    /// Drops the next-rotation series of KeyRotations for which `exists(namespace, name)` is
    /// false (deleted objects, which are never reconciled again).
    pub fn retain_next_rotations(&self, exists: impl Fn(&str, &str) -> bool) {
        let Ok(mut keys) = self.next_rotation_keys.lock() else {
            return;
        };
        keys.retain(|key| {
            let (namespace, name) = key.split_once('/').unwrap_or(("", key));
            let keep = exists(namespace, name);
            if !keep {
                self.next_rotation.remove(&KeyRotationLabels {
                    keyrotation: key.clone(),
                });
            }
            keep
        });
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
        drop(metrics.reconcile_timer("keyrotation"));
        metrics.inc_key_rotations("succeeded");
        metrics.set_next_rotation("payments", "monthly", Some(1_767_225_600));
        // what the telemetry crate's drop callback reports (the export thread, in production)
        count_dropped_spans("queue_full", 2);
        let text = metrics.encode().expect("encodes");
        for needle in [
            r#"switchyard_operator_reconcile_total{controller="bankswitch",result="success"} 1"#,
            r#"switchyard_operator_reconcile_total{controller="bankswitch",result="error"} 1"#,
            r#"switchyard_operator_reconcile_errors_total{controller="bankswitch",reason="apply"} 1"#,
            r#"switchyard_operator_reconcile_duration_seconds_count{controller="bankswitch"} 2"#,
            r#"switchyard_operator_drainer_replicas{bankswitch="payments/atm"} 3"#,
            r#"switchyard_operator_reconcile_total{controller="keyrotation",result="success"} 1"#,
            r#"switchyard_operator_key_rotations_total{result="succeeded"} 1"#,
            r#"switchyard_operator_next_rotation_timestamp_seconds{keyrotation="payments/monthly"} 1767225600"#,
            r#"switchyard_operator_trace_spans_dropped_total{reason="queue_full"} 2"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn next_rotation_series_go_away_with_their_keyrotation() {
        let metrics = Metrics::default();
        metrics.set_next_rotation("payments", "monthly", Some(100));
        metrics.set_next_rotation("payments", "weekly", Some(200));
        metrics.set_next_rotation("payments", "weekly", None);
        metrics.set_next_rotation("cards", "daily", Some(300));
        metrics.retain_next_rotations(|ns, name| ns == "payments" && name == "monthly");
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(r#"{keyrotation="payments/monthly"} 100"#),
            "{text}"
        );
        assert!(!text.contains("payments/weekly"), "{text}");
        assert!(!text.contains("cards/daily"), "{text}");
    }
}
