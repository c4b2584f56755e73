//! Trace export and trace-correlated logs, shared by `switchyard-switch` and
//! `switchyard-operator` (SPEC §8 "Traces and logs").
//!
//! [`tracer_provider`] builds the OpenTelemetry tracer provider both binaries use: a ratio
//! sampler that follows a sampled parent, and the OTLP over HTTP/protobuf exporter behind the
//! SDK's batch processor (its own thread). A span ends into a bounded queue without waiting:
//! when the queue is full (the collector is down or slow) the span is dropped and reported to
//! the caller's [`DropCounter`] with reason `queue_full`; spans of a batch the collector refused
//! or never took are reported with `export_failed`. Nothing that ends a span ever waits for the
//! collector.
//!
//! [`WithTraceIds`] is the JSON log line format with the current span's `trace_id` and
//! `span_id` appended, so Loki can jump from a line to its trace.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

/// One export request's timeout: the export thread is never held longer per try.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the batch processor waits to fill a batch before it sends what it has.
const SCHEDULED_DELAY: Duration = Duration::from_millis(500);

/// Where and how much to export.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// Base URL of the OTLP/HTTP receiver, without `/v1/traces`.
    pub endpoint: String,
    /// Share of new traces sampled, 0.0–1.0 (a sampled parent is always followed).
    pub sample_ratio: f64,
    /// Finished spans waiting for export at most; beyond, spans are dropped and counted.
    pub max_queue_size: usize,
}

/// Called with a reason (`queue_full`, `export_failed`) and a number of spans never exported;
/// each binary counts them in its own metric.
pub type DropCounter = fn(&'static str, u64);

/// The exporter could not be built (an endpoint that is not a URL).
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace exporter: {0}")]
pub struct ExporterError(String);

/// The tracer provider for `export`: without it nothing is sampled, but spans still get trace
/// ids, so logs stay correlated.
pub fn tracer_provider(
    export: Option<&Export>,
    service: String,
    dropped: DropCounter,
) -> Result<SdkTracerProvider, ExporterError> {
    let Some(export) = export else {
        return Ok(ids_only(service));
    };
    let resource = Resource::builder().with_service_name(service).build();
    // the exporter's HTTP client looks the process's rustls provider up
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!(
            "{}/v1/traces",
            export.endpoint.trim_end_matches('/')
        ))
        .with_timeout(EXPORT_TIMEOUT)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| ExporterError(e.to_string()))?;
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        queued: queued.clone(),
        dropped,
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(export.max_queue_size)
            .with_scheduled_delay(SCHEDULED_DELAY)
            .build(),
    )
    .build();
    let processor = BoundedQueue {
        inner: batch,
        queued,
        capacity: export.max_queue_size,
        dropped,
    };
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            export.sample_ratio,
        ))))
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// A provider that samples nothing: spans get trace ids (for log lines), nothing is exported.
pub fn ids_only(service: String) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build()
}

/// Bounds the spans waiting for export: counted from `on_end` until the exporter takes their
/// batch. The SDK's own queue has the same bound but does not expose its drops; this one is
/// checked first (it counts a superset: queued plus batched-not-yet-exported), so every span
/// dropped for a full queue is counted here.
struct BoundedQueue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: DropCounter,
}

impl fmt::Debug for BoundedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedQueue")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
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
            (self.dropped)("queue_full", 1);
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
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    dropped: DropCounter,
}

// The inner exporter is left out: its configuration may hold the collector's credentials
// (`OTEL_EXPORTER_OTLP_HEADERS`).
impl<E> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingExporter")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::AcqRel);
        let sent = self.inner.export(batch);
        let dropped = self.dropped;
        async move {
            let result = sent.await;
            if result.is_err() {
                dropped("export_failed", n as u64);
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

/// A JSON event format with the current span's `trace_id` and `span_id` (W3C hex) appended
/// when the span has a valid OpenTelemetry context; lines outside a span are left as they are.
#[derive(Debug)]
pub struct WithTraceIds(pub Format<Json>);

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
        let ids = ctx
            .lookup_current()
            .and_then(|span| {
                tracing::dispatcher::get_default(|d| {
                    tracing_opentelemetry::get_otel_context(&span.id(), d)
                })
            })
            .map(|cx| cx.span().span_context().clone())
            .filter(SpanContext::is_valid);
        let Some(sc) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};

    use super::*;

    static QUEUE_FULL: AtomicU64 = AtomicU64::new(0);

    fn count(reason: &'static str, n: u64) {
        if reason == "queue_full" {
            QUEUE_FULL.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[test]
    fn without_an_endpoint_nothing_is_sampled() {
        let provider = tracer_provider(None, "t".into(), count).expect("provider");
        let tracer = provider.tracer("t");
        tracer.in_span("s", |cx| {
            let sc = cx.span().span_context().clone();
            assert!(!sc.is_sampled());
        });
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // nothing listens on port 9: every batch fails; a queue of 4 fills at once
        let export = Export {
            endpoint: "http://127.0.0.1:9".into(),
            sample_ratio: 1.0,
            max_queue_size: 4,
        };
        let provider = tracer_provider(Some(&export), "t".into(), count).expect("provider");
        let tracer = provider.tracer("t");
        let before = QUEUE_FULL.load(Ordering::Relaxed);
        for _ in 0..50 {
            tracer.in_span("s", |_| {});
        }
        let dropped = QUEUE_FULL.load(Ordering::Relaxed) - before;
        // the batch thread may take up to one batch while the loop runs, no more
        assert!(dropped >= 50 - 2 * 4, "dropped {dropped} of 50");
        let _ = provider.shutdown_with_timeout(Duration::from_millis(100));
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_an_error() {
        let export = Export {
            endpoint: "not a url".into(),
            sample_ratio: 1.0,
            max_queue_size: 4,
        };
        assert!(tracer_provider(Some(&export), "t".into(), count).is_err());
    }
}
