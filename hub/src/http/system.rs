//! `GET /api/v1/system/status`: the hub's machine and cluster at a glance.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, json};

use super::AppState;
use crate::metrics;
use crate::model::NodeState;
use crate::model::TaskStatus;

/// Machine and cluster status.
///
/// `GET /api/v1/system/status`:
/// `{cpu_usage, memory_usage, memory_used_bytes, memory_total_bytes, gpu_usage,
/// active_sessions, sessions{node, log, events}, nodes{online, draining, offline, total},
/// tasks{queued, ..., timed_out, total}, queue_depth, dispatch_rate, uptime_seconds, version}`.
///
/// Usages are percent (0–100, whole machine), `null` until the first sample (2 s after start) or
/// without a GPU. `active_sessions` counts open node-channel and log-channel WebSockets and
/// `/v1/events` streams. `dispatch_rate` is task assignments per second over the last minute.
#[utoipa::path(
    get,
    path = "/api/v1/system/status",
    tag = "system",
    operation_id = "systemStatus",
    responses((status = 200, description = "The hub's machine and cluster", body = super::openapi::SystemStatus)),
    security(("bearer" = []))
)]
pub async fn status(State(state): State<AppState>) -> Response {
    let s = state.ops.system.sample();
    let h = state.cluster.health();
    let mut by_status = [0u64; 3];
    for n in state.cluster.node_states() {
        by_status[match n {
            NodeState::Online => 0,
            NodeState::Draining => 1,
            NodeState::Offline => 2,
        }] += 1;
    }
    let mut tasks = Map::new();
    for st in TaskStatus::ALL {
        tasks.insert(st.as_str().to_owned(), json!(h.tasks[st.index()]));
    }
    tasks.insert("total".to_owned(), json!(h.tasks.iter().sum::<u64>()));
    let node_sessions = metrics::connections("node");
    let log_sessions = metrics::connections("log");
    let sse = super::events::open_streams();
    Json(json!({
        "cpu_usage": s.cpu_usage,
        "memory_usage": s.memory_usage,
        "memory_used_bytes": s.memory_used_bytes,
        "memory_total_bytes": s.memory_total_bytes,
        "gpu_usage": s.gpu_usage,
        "active_sessions": node_sessions.max(0) as u64 + log_sessions.max(0) as u64 + sse,
        "sessions": {"node": node_sessions, "log": log_sessions, "events": sse},
        "nodes": {
            "online": by_status[0],
            "draining": by_status[1],
            "offline": by_status[2],
            "total": by_status.iter().sum::<u64>(),
        },
        "tasks": tasks,
        "queue_depth": h.queue_depth,
        "dispatch_rate": state.ops.system.dispatch_rate(),
        "uptime_seconds": state.cluster.uptime().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}
