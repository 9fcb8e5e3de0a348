//! `GET /v1/events`: one Server-Sent Events stream of node and task changes, for dashboards.
//!
//! Each SSE message is `data: {"type": "node_event", "event", "payload", "timestamp"}` (no SSE
//! `event:` field, so `EventSource.onmessage` gets everything) with a per-stream increasing
//! `id`:
//! - node changes: `event` is `node_registered`, `node_drained`,
//!   `node_undrained`, `node_lost` or `node_removed`; `payload` is `{node_id, status, reason?,
//!   node?}` (`node` as `GET /v1/nodes/{id}` shows it);
//! - task changes: `event` is the task event kind (`task_created`, `task_assigned`,
//!   `task_progress`, `task_migrated`, `task_completed`, `task_failed`, `task_cancelled`,
//!   `task_timed_out`) and `payload` the task event as on `/api/v1/tasks/{id}/events`;
//! - `events_dropped`: this client fell behind the engine's buffers (8192 task events, 1024 node
//!   events); `payload` is `{skipped, total_skipped}` and the skipped events are gone (re-read
//!   the lists).
//!
//! `?topics=nodes`, `?topics=tasks` or `?topics=nodes,tasks` (default) choose what to receive.
//! The hub never waits for a slow client: each one reads bounded broadcast channels. A stream
//! ends when the caller's credential is revoked (logout, key deleted), at this hub or another.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState};
use crate::metrics;
use crate::model::Rfc3339;
use crate::principal::Principal;

/// `/v1/events` streams open in this process.
static OPEN: AtomicU64 = AtomicU64::new(0);

/// How many `/v1/events` streams are open.
pub fn open_streams() -> u64 {
    OPEN.load(Ordering::Relaxed)
}

struct OpenGuard;

impl OpenGuard {
    fn new() -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// `nodes`, `tasks` or `nodes,tasks` (the default).
    #[param(example = "nodes,tasks")]
    topics: Option<String>,
}

fn message(event: &str, payload: Value, at: SystemTime) -> Value {
    json!({
        "type": "node_event",
        "event": event,
        "payload": payload,
        "timestamp": Rfc3339(at),
    })
}

/// Node and task changes (SSE).
///
/// `GET /v1/events[?topics=nodes,tasks]`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    operation_id = "streamEvents",
    params(EventsParams),
    responses(
        (status = 200, description = "Server-Sent Events, each `data: {\"type\": \"node_event\", \"event\", \"payload\", \"timestamp\"}` with an increasing `id`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid `topics`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn stream(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let (mut want_nodes, mut want_tasks) = (true, true);
    if let Some(t) = q.topics.as_deref().filter(|t| !t.is_empty()) {
        (want_nodes, want_tasks) = (false, false);
        for part in t.split(',').map(str::trim) {
            match part {
                "nodes" => want_nodes = true,
                "tasks" => want_tasks = true,
                _ => {
                    return Err(ApiError::invalid(
                        "topics",
                        "`topics` is a comma-separated list of `nodes` and `tasks`",
                    ));
                }
            }
        }
    }
    let mut nodes = state.cluster.subscribe_nodes();
    let mut tasks = state.cluster.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let mut shutdown = state.shutdown.clone();
    let dropped = metrics::get().stream_dropped.with_label_values(&["sse"]);
    tokio::spawn(async move {
        let _open = OpenGuard::new();
        let mut id: u64 = 0;
        let mut total_skipped: u64 = 0;
        loop {
            let msg = tokio::select! {
                n = nodes.recv(), if want_nodes => match n {
                    Ok(e) => message(e.kind.as_str(), json!(&*e), e.timestamp),
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        total_skipped += k;
                        dropped.inc_by(k);
                        message("events_dropped", json!({"skipped": k, "total_skipped": total_skipped}), SystemTime::now())
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                t = tasks.recv(), if want_tasks => match t {
                    Ok(e) => message(e.kind.as_str(), json!(&*e), e.timestamp),
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        total_skipped += k;
                        dropped.inc_by(k);
                        message("events_dropped", json!({"skipped": k, "total_skipped": total_skipped}), SystemTime::now())
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            id += 1;
            let ev = Event::default()
                .id(id.to_string())
                .json_data(&msg)
                .unwrap_or_else(|_| Event::default().comment("unencodable event"));
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    });
    let stream = super::auth::until_revoked(&state, principal, ReceiverStream::new(rx));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
