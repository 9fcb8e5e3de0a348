//! OpenTelemetry traces, on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable:
//! a base URL such as `http://collector:4318`; `/v1/traces` is appended). Spans are exported
//! over OTLP/HTTP with JSON encoding by the SDK's batch processor (its own thread, blocking
//! reqwest client); the other standard `OTEL_*` variables (`OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_SERVICE_NAME`, ...) apply.
//!
//! What is exported:
//! - `HTTP {method} {route}` server spans for every request (`tracing` spans made in
//!   `http::router`, bridged by `tracing-opentelemetry`), continuing an incoming W3C
//!   `traceparent` header ([`continue_trace`]);
//! - one `task {tool}` span per task, from acceptance to its terminal state, child of the
//!   request that submitted it, with the task's lifecycle events (`task_assigned`,
//!   `task_migrated`, ...) as span events;
//! - LLM calls, through [`llm_span`] (for the LLM gateway).
//!
//! The submitting request's context travels to the node as `task_assign.metadata.traceparent`
//! (W3C Trace Context), so the node's `execute {tool}` span joins the same trace.
//!
//! When the variable is unset nothing is installed and every hook here is a cheap no-op.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::model::{Task, TaskStatus};

/// Whether a tracer provider is installed.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Name of the tracer (instrumentation scope) of the hub's own spans.
const SCOPE: &str = "apex-hub";

/// An installed tracer provider; call [`Telemetry::shutdown`] before exiting to flush.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Installs OTLP/HTTP (JSON) export for `service` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
///
/// # Errors
/// The exporter could not be built (e.g. a malformed endpoint).
pub fn init_from_env(service: &'static str) -> Result<Option<Telemetry>, String> {
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
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::Relaxed);
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
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(SCOPE))
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("apex-hub: flushing traces failed: {e}");
        }
    }
}

/// Whether traces are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether per-request spans (`HTTP {method} {route}`, `chat {model}`) are worth creating:
/// when traces are exported, or when the log filter lets `DEBUG` through for the hub (then log
/// lines show them as context). Otherwise the hot paths skip them: creating a span and
/// formatting its fields costs several microseconds per request, and nothing would read it.
pub fn request_spans() -> bool {
    enabled() || tracing::enabled!(target: "apex_hub::http", tracing::Level::DEBUG)
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct OneCarrier<'a>(&'a str);

impl Extractor for OneCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The W3C `traceparent` of the current `tracing` span (the HTTP request being served), if
/// traces are exported and the span is sampled.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut map));
    map.remove("traceparent")
}

/// Makes `span` continue the trace of an incoming W3C `traceparent` (an HTTP header), if any.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(tp) = traceparent {
        let parent = parent_of(tp);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
}

fn parent_of(traceparent: &str) -> Context {
    TraceContextPropagator::new().extract(&OneCarrier(traceparent))
}

/// Exports the `task {tool}` span of a task that just ended: from acceptance to the terminal
/// state, child of `traceparent`, with the task's events as span events.
pub fn task_span(traceparent: &str, task: &Task) {
    if !enabled() {
        return;
    }
    let tracer = global::tracer(SCOPE);
    let events = task
        .events
        .iter()
        .map(|e| {
            let mut attrs = vec![KeyValue::new("task.attempt", i64::from(e.attempt))];
            if let Some(n) = &e.node_id {
                attrs.push(KeyValue::new("node.id", n.clone()));
            }
            if let Some(m) = &e.message {
                attrs.push(KeyValue::new("message", m.clone()));
            }
            opentelemetry::trace::Event::new(e.kind.as_str(), e.timestamp, attrs, 0)
        })
        .collect();
    let mut attrs = vec![
        KeyValue::new("task.id", task.id.clone()),
        KeyValue::new("task.tool", task.spec.tool.clone()),
        KeyValue::new("task.status", task.status.as_str()),
        KeyValue::new("task.attempts", i64::from(task.attempt)),
    ];
    if let Some(n) = &task.node_id {
        attrs.push(KeyValue::new("node.id", n.clone()));
    }
    let mut span = tracer
        .span_builder(format!("task {}", task.spec.tool))
        .with_kind(SpanKind::Internal)
        .with_start_time(task.created_at)
        .with_attributes(attrs)
        .with_events(events)
        .start_with_context(&tracer, &parent_of(traceparent));
    if task.status != TaskStatus::Succeeded {
        let why = task
            .error
            .as_ref()
            .map_or_else(|| task.status.as_str().to_owned(), |e| e.code.clone());
        span.set_status(Status::error(why));
    }
    span.end_with_timestamp(task.finished_at.unwrap_or_else(SystemTime::now));
}

/// A span for one LLM call (`chat {model}`, client kind, OpenTelemetry GenAI attribute
/// names), child of the current span. Enter it around the upstream call; record
/// `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens` on it when known.
///
/// [`tracing::Span::none`] when [`request_spans`] is false.
pub fn llm_span(provider: &str, model: &str) -> tracing::Span {
    if !request_spans() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "llm.call",
        otel.name = %format!("chat {model}"),
        otel.kind = "client",
        gen_ai.system = %provider,
        gen_ai.request.model = %model,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn disabled_hooks_do_nothing() {
        assert!(current_traceparent().is_none());
    }

    #[test]
    fn a_traceparent_parses_into_a_remote_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parent_of(tp);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
