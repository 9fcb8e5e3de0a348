//! OpenTelemetry traces for the node, on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (a base URL;
//! `/v1/traces` is appended). Spans go over OTLP/HTTP with JSON encoding from the SDK's batch
//! processor; the standard `OTEL_*` variables apply.
//!
//! Each task runs inside an `execute {tool}` span whose parent is the W3C `traceparent` the hub
//! put in `task_assign.metadata`, so it joins the trace of the HTTP request that created the
//! task. Without the variable nothing is installed and [`task_span`] is a plain `tracing` span.

use std::collections::HashMap;

use apex_protocol::TaskAssign;
use opentelemetry::global;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// An installed tracer provider; call [`Telemetry::shutdown`] before exiting to flush.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Installs OTLP/HTTP (JSON) export as service `apex-node` when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set. Call outside an async runtime or from a blocking context.
///
/// # Errors
/// The exporter could not be built.
pub fn init_from_env() -> Result<Option<Telemetry>, String> {
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .is_none_or(|v| v.trim().is_empty())
    {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .build()
        .map_err(|e| format!("cannot set up OTLP export: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("apex-node").build())
        .build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    Ok(Some(Telemetry { provider }))
}

impl Telemetry {
    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("apex-node"))
    }

    /// Exports what is buffered and stops the exporter (blocks).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("apex-node: flushing traces failed: {e}");
        }
    }
}

/// The span a task runs in: `execute {tool}` at INFO, child of `metadata.traceparent` when the
/// hub sent one.
pub fn task_span(task: &TaskAssign) -> tracing::Span {
    let span = tracing::info_span!(
        "task.execute",
        otel.name = %format!("execute {}", task.tool_name),
        task.id = %task.task_id,
        task.tool = %task.tool_name,
        task.attempt = task.attempt.unwrap_or(0),
    );
    if let Some(tp) = task
        .metadata
        .as_ref()
        .and_then(|m| m.get("traceparent"))
        .and_then(|v| v.as_str())
    {
        let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}
