//! Prometheus metrics: every name, help text and label set of the hub, declared here and
//! nowhere else.
//!
//! The metrics live in one process-wide registry ([`get`]); code elsewhere increments them
//! through the fields of [`Metrics`] or the small helpers below. Gauges that mirror the engine's
//! state (nodes by status, tasks by state, queue depth) are set from the engine when the
//! exposition is rendered ([`render`]). Labels never carry ids (no task, node, request or
//! connection id): only bounded sets such as status names, tools, routes and models.
//!
//! The output is the Prometheus text exposition format 0.0.4 (`prometheus::TextEncoder`), checked
//! in the test suite with `promtool check metrics`.

use std::sync::LazyLock;
use std::time::SystemTime;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::model::NodeState;
use crate::model::TaskStatus;

/// Content type of the text exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of latency histograms, in seconds (100 µs to 30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Buckets of task durations, in seconds (1 ms to 1 h).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Every metric of the hub.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    /// `apex_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `apex_uptime_seconds`.
    pub uptime_seconds: IntGauge,
    /// `apex_nodes{status}`: known nodes by `online`, `draining`, `offline`.
    pub nodes: IntGaugeVec,
    /// `apex_tasks{state}`: tasks held by the hub, by state.
    pub tasks: IntGaugeVec,
    /// `apex_queue_depth`: tasks waiting for a node.
    pub queue_depth: IntGauge,
    /// `apex_queued_tasks{tool}`: tasks waiting for a node, by tool.
    pub queued_tasks: IntGaugeVec,
    /// `apex_tool_nodes{tool}`: online (not draining) nodes offering each tool.
    pub tool_nodes: IntGaugeVec,
    /// `apex_tasks_submitted_total`.
    pub tasks_submitted: IntCounter,
    /// `apex_tasks_dispatched_total`: assignments sent to nodes (a migrated task counts again).
    pub tasks_dispatched: IntCounter,
    /// `apex_tasks_finished_total{tool, outcome}`: terminal transitions; `outcome` is the
    /// terminal state (`succeeded`, `failed`, `cancelled`, `timed_out`).
    pub tasks_finished: IntCounterVec,
    /// `apex_task_dispatch_latency_seconds`: time a task waited in the queue before an
    /// assignment (from submission or its last migration).
    pub dispatch_latency: Histogram,
    /// `apex_task_duration_seconds{tool, outcome}`: first assignment to terminal state.
    pub task_duration: HistogramVec,
    /// `apex_task_migrations_total`.
    pub migrations: IntCounter,
    /// `apex_websocket_connections{channel}`: open WebSocket connections, `node` or `log`.
    pub ws_connections: IntGaugeVec,
    /// `apex_node_frames_in_total`.
    pub frames_in: IntCounter,
    /// `apex_node_frames_out_total`.
    pub frames_out: IntCounter,
    /// `apex_node_frames_rejected_total{code}`: frames answered with an `error` frame, by code.
    pub frames_rejected: IntCounterVec,
    /// `apex_node_frames_shed_total`: frames dropped because a node's outbound queue was full.
    pub frames_shed: IntCounter,
    /// `apex_http_requests_total{method, route, status}`: `route` is the matched route pattern
    /// (`/api/v1/tasks/{id}`), or `unmatched`.
    pub http_requests: IntCounterVec,
    /// `apex_http_request_duration_seconds{method, route}`.
    pub http_duration: HistogramVec,
    /// `apex_stream_events_dropped_total{stream}`: events a slow subscriber skipped
    /// (`sse` for `/v1/events`, `log` for the log channel).
    pub stream_dropped: IntCounterVec,
    /// `apex_log_entries_total{type}`: entries published on the log channel.
    pub log_entries: IntCounterVec,
    /// `apex_log_clients_shed_total`: log clients disconnected because they stopped reading.
    pub log_clients_shed: IntCounter,
    /// `apex_llm_requests_total{provider, model, outcome}` (for the LLM gateway).
    pub llm_requests: IntCounterVec,
    /// `apex_llm_tokens_total{provider, model, kind}`: `kind` is `prompt` or `completion`.
    pub llm_tokens: IntCounterVec,
    /// `apex_llm_time_to_first_token_seconds{provider, model}`.
    pub llm_ttft: HistogramVec,
    /// `apex_llm_request_duration_seconds{provider, model}`.
    pub llm_duration: HistogramVec,
    /// `apex_rate_limited_total{class}`: requests refused with 429 by the rate limits, by route
    /// class (`standard`, `execute`, `test`, `llm`).
    pub rate_limited: IntCounterVec,
    /// `apex_rate_limit_store_errors_total`: rate-limit checks and token charges the store
    /// (Redis, in shared mode) failed; `on_store_error` decided what the request got.
    pub rate_limit_store_errors: IntCounter,
    /// `apex_ws_clients`: open client WebSocket connections (`GET /ws`) at this hub.
    pub ws_clients: IntGauge,
    /// `apex_research_step_overhead_seconds`: the research engine's own time per agent step
    /// (a DAG node), model and tool time excluded: from the step being ready (its group
    /// started) to its task being submitted, plus from its task ending to its end being
    /// recorded in the run's log.
    pub research_step_overhead: Histogram,
    /// `apex_research_runs_total{outcome}`: research and query runs that ended, by `completed`
    /// or `failed`.
    pub research_runs: IntCounterVec,
    /// `apex_ws_clients_shed_total`: client WebSocket connections closed because their
    /// outbound queue (`ws_queue_len` frames) was full: the client stopped reading.
    pub ws_clients_shed: IntCounter,
    /// `apex_schedule_fires_total{action, outcome}`: schedule fires claimed by this hub;
    /// `action` is `task` or `notification`, `outcome` `fired`, `skipped` (a missed fire of a
    /// `catch_up: false` schedule) or `failed` (the task was not accepted).
    pub schedule_fires: IntCounterVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let mut names = Vec::new();
    macro_rules! reg {
        ($m:expr) => {{
            let m = $m;
            for d in prometheus::core::Collector::desc(&m) {
                names.push(d.fq_name.clone());
            }
            registry.register(Box::new(m.clone()))?;
            m
        }};
    }
    let hist = |name: &str, help: &str, buckets: &[f64]| {
        HistogramOpts::new(name, help).buckets(buckets.to_vec())
    };
    Ok(Metrics {
        build_info: reg!(IntGaugeVec::new(
            Opts::new("apex_build_info", "Always 1; the hub's version as a label."),
            &["version"]
        )?),
        uptime_seconds: reg!(IntGauge::new(
            "apex_uptime_seconds",
            "Seconds since the hub started."
        )?),
        nodes: reg!(IntGaugeVec::new(
            Opts::new("apex_nodes", "Known nodes by status."),
            &["status"]
        )?),
        tasks: reg!(IntGaugeVec::new(
            Opts::new("apex_tasks", "Tasks held by the hub, by state."),
            &["state"]
        )?),
        queue_depth: reg!(IntGauge::new(
            "apex_queue_depth",
            "Tasks waiting for a node."
        )?),
        queued_tasks: reg!(IntGaugeVec::new(
            Opts::new("apex_queued_tasks", "Tasks waiting for a node, by tool."),
            &["tool"]
        )?),
        tool_nodes: reg!(IntGaugeVec::new(
            Opts::new(
                "apex_tool_nodes",
                "Online (not draining) nodes offering each tool."
            ),
            &["tool"]
        )?),
        tasks_submitted: reg!(IntCounter::new(
            "apex_tasks_submitted_total",
            "Tasks accepted (idempotent repeats excluded)."
        )?),
        tasks_dispatched: reg!(IntCounter::new(
            "apex_tasks_dispatched_total",
            "Task assignments sent to nodes; a migrated task counts again."
        )?),
        tasks_finished: reg!(IntCounterVec::new(
            Opts::new(
                "apex_tasks_finished_total",
                "Tasks that reached a terminal state, by tool and outcome."
            ),
            &["tool", "outcome"]
        )?),
        dispatch_latency: reg!(Histogram::with_opts(hist(
            "apex_task_dispatch_latency_seconds",
            "Time a task waited in the queue before an assignment.",
            LATENCY_BUCKETS
        ))?),
        task_duration: reg!(HistogramVec::new(
            hist(
                "apex_task_duration_seconds",
                "Time from a task's first assignment to its terminal state.",
                DURATION_BUCKETS
            ),
            &["tool", "outcome"]
        )?),
        migrations: reg!(IntCounter::new(
            "apex_task_migrations_total",
            "Tasks sent back to the queue after their node was lost or handed them back."
        )?),
        ws_connections: reg!(IntGaugeVec::new(
            Opts::new(
                "apex_websocket_connections",
                "Open WebSocket connections by channel (node, log)."
            ),
            &["channel"]
        )?),
        frames_in: reg!(IntCounter::new(
            "apex_node_frames_in_total",
            "Frames received from nodes."
        )?),
        frames_out: reg!(IntCounter::new(
            "apex_node_frames_out_total",
            "Frames written to nodes."
        )?),
        frames_rejected: reg!(IntCounterVec::new(
            Opts::new(
                "apex_node_frames_rejected_total",
                "Frames from nodes answered with an error frame, by error code."
            ),
            &["code"]
        )?),
        frames_shed: reg!(IntCounter::new(
            "apex_node_frames_shed_total",
            "Frames to nodes dropped because the node's outbound queue was full."
        )?),
        http_requests: reg!(IntCounterVec::new(
            Opts::new(
                "apex_http_requests_total",
                "HTTP requests by method, matched route and status code."
            ),
            &["method", "route", "status"]
        )?),
        http_duration: reg!(HistogramVec::new(
            hist(
                "apex_http_request_duration_seconds",
                "Time to produce an HTTP response (headers), by method and matched route.",
                LATENCY_BUCKETS
            ),
            &["method", "route"]
        )?),
        stream_dropped: reg!(IntCounterVec::new(
            Opts::new(
                "apex_stream_events_dropped_total",
                "Events skipped by slow subscribers, by stream (sse, log)."
            ),
            &["stream"]
        )?),
        log_entries: reg!(IntCounterVec::new(
            Opts::new(
                "apex_log_entries_total",
                "Entries published on the log channel, by type."
            ),
            &["type"]
        )?),
        log_clients_shed: reg!(IntCounter::new(
            "apex_log_clients_shed_total",
            "Log channel clients disconnected because they stopped reading."
        )?),
        llm_requests: reg!(IntCounterVec::new(
            Opts::new(
                "apex_llm_requests_total",
                "LLM requests by provider, model and outcome."
            ),
            &["provider", "model", "outcome"]
        )?),
        llm_tokens: reg!(IntCounterVec::new(
            Opts::new(
                "apex_llm_tokens_total",
                "LLM tokens by provider, model and kind (prompt, completion)."
            ),
            &["provider", "model", "kind"]
        )?),
        llm_ttft: reg!(HistogramVec::new(
            hist(
                "apex_llm_time_to_first_token_seconds",
                "Time from an LLM request to its first streamed token.",
                LATENCY_BUCKETS
            ),
            &["provider", "model"]
        )?),
        llm_duration: reg!(HistogramVec::new(
            hist(
                "apex_llm_request_duration_seconds",
                "Time from an LLM request to its last byte.",
                LATENCY_BUCKETS
            ),
            &["provider", "model"]
        )?),
        rate_limited: reg!(IntCounterVec::new(
            Opts::new(
                "apex_rate_limited_total",
                "Requests refused with 429 by the rate limits, by route class."
            ),
            &["class"]
        )?),
        rate_limit_store_errors: reg!(IntCounter::new(
            "apex_rate_limit_store_errors_total",
            "Rate-limit checks and token charges the rate-limit store failed."
        )?),
        ws_clients: reg!(IntGauge::new(
            "apex_ws_clients",
            "Open client WebSocket connections (GET /ws) at this hub."
        )?),
        research_step_overhead: reg!(Histogram::with_opts(hist(
            "apex_research_step_overhead_seconds",
            "The research engine's own time per agent step (ready to submitted, plus ended to recorded), model and tool time excluded.",
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
            ]
        ))?),
        research_runs: reg!(IntCounterVec::new(
            Opts::new(
                "apex_research_runs_total",
                "Research and query runs that ended, by outcome."
            ),
            &["outcome"]
        )?),
        ws_clients_shed: reg!(IntCounter::new(
            "apex_ws_clients_shed_total",
            "Client WebSocket connections closed because their outbound queue was full."
        )?),
        schedule_fires: reg!(IntCounterVec::new(
            Opts::new(
                "apex_schedule_fires_total",
                "Schedule fires claimed by this hub, by action and outcome."
            ),
            &["action", "outcome"]
        )?),
        registry,
        names,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(m) => {
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }
    // Only reachable through a bad declaration above, which the unit test catches.
    Err(e) => panic!("invalid metric declaration: {e}"),
});

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Every metric family name the hub declares (histograms without the `_bucket`, `_sum`,
/// `_count` suffixes), for checking dashboards and alert rules against.
pub fn names() -> Vec<String> {
    get().names.clone()
}

/// Seconds between two times (0 if `to` is earlier).
fn secs(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).map_or(0.0, |d| d.as_secs_f64())
}

/// A task was assigned at `now` after waiting in the queue since `queued_since`.
pub fn task_dispatched(queued_since: SystemTime, now: SystemTime) {
    let m = get();
    m.tasks_dispatched.inc();
    m.dispatch_latency.observe(secs(queued_since, now));
}

/// A task of `tool` reached the terminal state `outcome` at `now`.
pub fn task_finished(tool: &str, outcome: &str, started: Option<SystemTime>, now: SystemTime) {
    let m = get();
    m.tasks_finished.with_label_values(&[tool, outcome]).inc();
    if let Some(s) = started {
        m.task_duration
            .with_label_values(&[tool, outcome])
            .observe(secs(s, now));
    }
}

/// A frame from a node was rejected with error `code`.
pub fn frame_rejected(code: &str) {
    get().frames_rejected.with_label_values(&[code]).inc();
}

/// Counts an open WebSocket connection of `channel` until dropped.
pub struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    /// Increments `apex_websocket_connections{channel}`.
    pub fn open(channel: &'static str) -> Self {
        get().ws_connections.with_label_values(&[channel]).inc();
        Self(channel)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        get().ws_connections.with_label_values(&[self.0]).dec();
    }
}

/// Open WebSocket connections of `channel`.
pub fn connections(channel: &str) -> i64 {
    get().ws_connections.with_label_values(&[channel]).get()
}

/// The engine's state at scrape time, as the state gauges show it (built by
/// `Cluster::gauges`, so this module does not depend on the engine).
#[derive(Debug, Clone, Default)]
pub struct ClusterGauges {
    /// Time since the engine started.
    pub uptime: std::time::Duration,
    /// The status of every known node.
    pub node_states: Vec<NodeState>,
    /// Tasks by status, indexed by [`TaskStatus::index`].
    pub tasks: [u64; 7],
    /// Tasks waiting for a node.
    pub queue_depth: usize,
    /// Queued tasks per tool.
    pub queued_by_tool: std::collections::HashMap<String, usize>,
    /// Online (not draining) nodes per tool they offer.
    pub tool_nodes: std::collections::HashMap<String, usize>,
}

/// Sets the state gauges from `g` and renders the text exposition.
///
/// # Errors
/// An encoding error of the prometheus crate (not expected for valid metrics).
pub fn render(g: &ClusterGauges) -> Result<String, prometheus::Error> {
    let m = get();
    m.uptime_seconds
        .set(i64::try_from(g.uptime.as_secs()).unwrap_or(i64::MAX));
    let mut by_status = [0i64; 3];
    for n in &g.node_states {
        by_status[match n {
            NodeState::Online => 0,
            NodeState::Draining => 1,
            NodeState::Offline => 2,
        }] += 1;
    }
    for (i, s) in ["online", "draining", "offline"].into_iter().enumerate() {
        m.nodes.with_label_values(&[s]).set(by_status[i]);
    }
    for s in TaskStatus::ALL {
        m.tasks
            .with_label_values(&[s.as_str()])
            .set(i64::try_from(g.tasks[s.index()]).unwrap_or(i64::MAX));
    }
    m.queue_depth
        .set(i64::try_from(g.queue_depth).unwrap_or(i64::MAX));
    // Rebuilt each time, so tools nobody queues for or offers any more disappear.
    m.queued_tasks.reset();
    for (tool, n) in &g.queued_by_tool {
        m.queued_tasks
            .with_label_values(&[tool.as_str()])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    m.tool_nodes.reset();
    for (tool, n) in &g.tool_nodes {
        m.tool_nodes
            .with_label_values(&[tool.as_str()])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    // Make the channel gauges and drop counters appear before their first use.
    for c in ["node", "log"] {
        m.ws_connections.with_label_values(&[c]);
    }
    for s in ["sse", "log"] {
        m.stream_dropped.with_label_values(&[s]);
    }
    for c in ["standard", "execute", "test", "llm"] {
        m.rate_limited.with_label_values(&[c]);
    }
    let mut out = String::new();
    TextEncoder::new().encode_utf8(&m.registry.gather(), &mut out)?;
    Ok(out)
}

/// The encoder's content type (for callers that want to check it).
pub fn encoder_content_type() -> String {
    TextEncoder::new().format_type().to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_valid() {
        build().unwrap();
    }

    #[test]
    fn content_type_matches_the_encoder() {
        assert!(CONTENT_TYPE.starts_with(&encoder_content_type()));
    }
}
