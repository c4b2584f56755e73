//! Logs and traces (SPEC §8 "Traces and logs").
//!
//! Logging: JSON lines in production (`--log-format json`, the default outside a terminal),
//! human-readable text for the demo; the level from `RUST_LOG` (default `info`). Every JSON
//! line written inside a span carries that span's `trace_id` and `span_id` (W3C hex), so Loki
//! can jump from a line to its trace.
//!
//! Traces: `tracing` spans become OpenTelemetry spans (`tracing-opentelemetry`). With an OTLP
//! endpoint (`[telemetry] otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`) sampled spans are
//! exported as OTLP over HTTP/protobuf by the SDK's batch processor on its own thread (the
//! `switchyard-telemetry` crate, which the operator uses too). A span
//! ends into a bounded queue without waiting: when the queue is full (the collector is down
//! or slow) the span is dropped and counted in `switchyard_trace_spans_dropped_total
//! {reason="queue_full"}`; spans of a batch the collector refused or never took are counted
//! with `reason="export_failed"`. A transaction never waits for the collector. Without an
//! endpoint nothing is recorded, but spans still get trace ids, so logs stay correlated.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use switchyard_telemetry::WithTraceIds;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Format;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::metrics::ReasonLabel;
use crate::settings::TraceExport;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

/// `service.name` of exported spans unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "switchyard-switch";

/// How long shutdown waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

fn count_dropped(reason: &'static str, n: u64) {
    crate::metrics::spans_dropped()
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc_by(n);
}

/// Holds the tracer provider; [`Telemetry::shutdown`] (or drop) flushes what is queued.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes queued spans (at most a few seconds) and stops the export thread.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Errors setting up the exporter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (an endpoint that is not a URL).
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
}

/// Installs the global subscriber with `default_level` unless `RUST_LOG` says otherwise, and
/// the OpenTelemetry layer: exporting to `export` when given, else ids only.
pub fn init(
    format: LogFormat,
    default_level: &str,
    export: Option<&TraceExport>,
) -> Result<Telemetry, TelemetryError> {
    let provider = tracer_provider(export, service_name())?;
    install(format, default_level, &provider);
    // spans made with the OpenTelemetry API directly ([`record_span`]) use the same provider
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| SERVICE_NAME.to_string())
}

/// The tracer provider for `export` (public for the tests, which build one against their own
/// receiver): see `switchyard_telemetry::tracer_provider`; drops are counted in
/// `switchyard_trace_spans_dropped_total{reason}`. Without `export`: nothing is sampled, spans
/// only carry ids.
pub fn tracer_provider(
    export: Option<&TraceExport>,
    service: String,
) -> Result<SdkTracerProvider, TelemetryError> {
    let export = export.map(|e| switchyard_telemetry::Export {
        endpoint: e.endpoint.clone(),
        sample_ratio: e.sample_ratio,
        max_queue_size: e.max_queue_size,
    });
    switchyard_telemetry::tracer_provider(export.as_ref(), service, count_dropped)
        .map_err(|e| TelemetryError::Exporter(e.to_string()))
}

fn install(format: LogFormat, default_level: &str, provider: &SdkTracerProvider) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .event_format(WithTraceIds(Format::default().json().flatten_event(true)))
            .boxed()
    } else {
        fmt.compact().boxed()
    };
    // Our spans at INFO are traced whatever RUST_LOG says about log lines.
    let traced = Targets::new()
        .with_target("switchyard_switch", LevelFilter::INFO)
        .with_target("switchyard_atm", LevelFilter::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_level(true)
        .with_filter(traced);
    let _ = Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or `None` when the
/// span has no valid context (no OpenTelemetry layer installed).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` continue the trace of a W3C `traceparent` (a request from an acquirer that
/// propagates its trace). A malformed value is ignored: the span starts a trace of its own.
/// Must run before the span is entered or has children.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) -> bool {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// The current span's trace id (hex), when it is sampled: the exemplar of a latency
/// observation, which should point at a trace that exists.
pub fn sampled_trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// Records a finished child span of `parent` that ran from `start` to `end` before it could be
/// a `tracing` span (the decode of a request whose parent trace is only known once decoded).
pub fn record_span(
    parent: &tracing::Span,
    name: &'static str,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
    attributes: Vec<opentelemetry::KeyValue>,
) {
    use opentelemetry::trace::{Span as _, Tracer as _};
    let cx = parent.context();
    if !cx.span().span_context().is_sampled() {
        return;
    }
    let tracer = opentelemetry::global::tracer(SERVICE_NAME);
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &cx);
    span.end_with_timestamp(end);
}
