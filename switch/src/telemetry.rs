//! Logs and traces (SPEC §8 "Traces and logs").
//!
//! Logging: JSON lines in production (`--log-format json`, the default outside a terminal),
//! human-readable text for the demo; the level from `RUST_LOG` (default `info`). Every JSON
//! line written inside a span carries that span's `trace_id` and `span_id` (W3C hex), so Loki
//! can jump from a line to its trace.
//!
//! Traces: `tracing` spans become OpenTelemetry spans (`tracing-opentelemetry`). With an OTLP
//! endpoint (`[telemetry] otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`) sampled spans are
//! exported as OTLP over HTTP/protobuf by the SDK's batch processor on its own thread. A span
//! ends into a bounded queue without waiting: when the queue is full (the collector is down
//! or slow) the span is dropped and counted in `switchyard_trace_spans_dropped_total
//! {reason="queue_full"}`; spans of a batch the collector refused or never took are counted
//! with `reason="export_failed"`. A transaction never waits for the collector. Without an
//! endpoint nothing is recorded, but spans still get trace ids, so logs stay correlated.

use std::collections::HashMap;
use std::fmt;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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
/// One export request's timeout: the export thread is never held longer per try.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

fn count_dropped(reason: &str, n: u64) {
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
/// receiver): a ratio sampler that follows a sampled parent, the OTLP/HTTP exporter behind a
/// bounded batch queue. Without `export`: nothing is sampled, spans only carry ids.
pub fn tracer_provider(
    export: Option<&TraceExport>,
    service: String,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder().with_service_name(service).build();
    let Some(export) = export else {
        return Ok(SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .with_resource(resource)
            .build());
    };
    // reqwest looks the rustls provider up (we build it without one of its own)
    crate::tls::install_crypto_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", export.endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        queued: queued.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(export.max_queue_size)
            .with_scheduled_delay(Duration::from_millis(500))
            .build(),
    )
    .build();
    let processor = BoundedQueue {
        inner: batch,
        queued,
        capacity: export.max_queue_size,
    };
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            export.sample_ratio,
        ))))
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
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

/// The JSON event format with the current span's `trace_id` and `span_id` appended.
#[derive(Debug)]
struct WithTraceIds(Format<Json>);

impl<S> FormatEvent<S, JsonFields> for WithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        // read before formatting: the formatter holds span extensions while it writes
        let ids = ctx.lookup_current().and_then(|span| {
            tracing::dispatcher::get_default(|d| {
                tracing_opentelemetry::get_otel_context(&span.id(), d)
            })
        });
        let ids = ids
            .map(|cx| cx.span().span_context().clone())
            .filter(SpanContext::is_valid);
        let Some(sc) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let trimmed = line.trim_end();
        match trimmed.strip_suffix('}') {
            Some(body) => {
                let sep = if body.trim_end().ends_with('{') {
                    ""
                } else {
                    ","
                };
                writeln!(
                    writer,
                    "{body}{sep}\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                    sc.trace_id(),
                    sc.span_id()
                )
            }
            None => writer.write_str(&line),
        }
    }
}

/// Bounds the spans waiting for export: counted from `on_end` until the exporter takes their
/// batch. The SDK's own queue has the same bound but does not expose its drops; this one is
/// checked first (it counts a superset: queued plus batched-not-yet-exported), so every span
/// dropped for a full queue is counted here.
#[derive(Debug)]
struct BoundedQueue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            count_dropped("queue_full", 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, releasing queue places as batches leave and counting failed batches.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::AcqRel);
        let sent = self.inner.export(batch);
        async move {
            let result = sent.await;
            if result.is_err() {
                count_dropped("export_failed", n as u64);
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
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
