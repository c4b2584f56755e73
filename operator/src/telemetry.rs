//! Logging and tracing: JSON lines with the reconciled object's namespace/name from the span,
//! and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, each reconcile and the Kubernetes API calls
//! inside it exported as OpenTelemetry spans (OTLP over HTTP/protobuf, sampled by
//! `OTEL_TRACES_SAMPLER_ARG`, default 1.0). Log lines written inside a span carry its
//! `trace_id` and `span_id`. The SDK's batch processor holds at most 2048 finished spans (the
//! standard `OTEL_BSP_MAX_QUEUE_SIZE`); beyond, spans are dropped rather than slow a reconcile.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "switchyard-operator";

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
    let resource = Resource::builder().with_service_name(service).build();
    let mut export_error = None;
    // the exporter's reqwest client is built on rustls without a bundled provider
    crate::switch_admin::install_crypto_provider();
    let provider = match endpoint.as_deref().map(|e| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{e}/v1/traces"))
            .with_timeout(Duration::from_secs(5))
            .build()
    }) {
        Some(Ok(exporter)) => SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
        other => {
            if let Some(Err(err)) = other {
                export_error = Some(err.to_string());
            }
            SdkTracerProvider::builder()
                .with_sampler(Sampler::AlwaysOff)
                .with_resource(resource)
                .build()
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .event_format(WithTraceIds(
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
            Some(body) => writeln!(
                writer,
                "{body},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                sc.trace_id(),
                sc.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}
