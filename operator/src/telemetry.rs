//! Logging setup: JSON lines with the reconciled object's namespace/name from the span.

use tracing_subscriber::EnvFilter;

/// Installs a JSON subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .init();
}
