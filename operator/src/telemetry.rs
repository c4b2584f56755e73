//! Logging and tracing: JSON lines with the reconciled object's namespace/name from the span,
//! and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, each reconcile and the Kubernetes API calls
//! inside it exported as OpenTelemetry spans (OTLP over HTTP/protobuf, sampled by
//! `OTEL_TRACES_SAMPLER_ARG`, default 1.0). Log lines written inside a span carry its
//! `trace_id` and `span_id`. The SDK's batch processor holds at most 2048 finished spans (the
//! standard `OTEL_BSP_MAX_QUEUE_SIZE`); beyond, spans are dropped rather than slow a reconcile.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Format;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "switchyard-operator";
/// Default bound of the span queue.
const DEFAULT_QUEUE_SIZE: usize = 2048;

/// Keeps the tracer provider; dropping it flushes queued spans (bounded wait).
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(Duration::from_secs(3));
        }
    }
}

/// Finished spans waiting for export at most (the standard `OTEL_BSP_MAX_QUEUE_SIZE`).
fn queue_size() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_QUEUE_SIZE)
}

/// Installs the JSON subscriber (`RUST_LOG` overrides the default `info` level) and the
/// OpenTelemetry layer; exports when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init() -> Telemetry {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty());
    let ratio = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        .ok()
        .and_then(|r| r.trim().parse::<f64>().ok())
        .filter(|r| (0.0..=1.0).contains(r))
        .unwrap_or(1.0);
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| SERVICE_NAME.to_string());
    let export = endpoint
        .as_ref()
        .map(|endpoint| switchyard_telemetry::Export {
            endpoint: endpoint.clone(),
            sample_ratio: ratio,
            max_queue_size: queue_size(),
        });
    let (provider, export_error) = match switchyard_telemetry::tracer_provider(
        export.as_ref(),
        service.clone(),
        crate::metrics::count_dropped_spans,
    ) {
        Ok(provider) => (provider, None),
        Err(err) => (
            switchyard_telemetry::ids_only(service),
            Some(err.to_string()),
        ),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .event_format(switchyard_telemetry::WithTraceIds(
            Format::default()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_target(false),
        ))
        .with_filter(filter);
    // reconciles (INFO) and kube's per-request `HTTP` spans (DEBUG) are traced whatever
    // RUST_LOG says about log lines
    let traced = Targets::new()
        .with_target("switchyard_operator", LevelFilter::INFO)
        .with_target("kube_client", LevelFilter::DEBUG);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_filter(traced);
    let _ = Registry::default().with(fmt).with(otel).try_init();
    if let Some(err) = export_error {
        tracing::error!(error = %err, "OTLP exporter could not be built; traces are not exported");
    } else if let Some(e) = &endpoint {
        tracing::info!(endpoint = %e, sample_ratio = ratio, "exporting traces over OTLP/HTTP");
    }
    Telemetry {
        provider: Some(provider),
    }
}
