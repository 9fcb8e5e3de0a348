//! `/api/v1/tasks`: submit (one or a batch), get (optionally waiting for the end), list with
//! filters and pagination, cancel, and the per-task Server-Sent Events stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, Pagination};
use crate::cluster::{CancelError, SubmitError};
use crate::config::Config;
use crate::model::{Task, TaskEvent, TaskSpec, TaskStatus};
use crate::store::TaskFilter;

/// Body of `POST /api/v1/tasks` (and each element of a batch).
#[derive(Debug, Deserialize)]
pub struct TaskRequest {
    tool: Option<String>,
    /// Seed API synonym of `tool`.
    task_type: Option<String>,
    args: Option<Value>,
    /// Seed API synonym of `args`.
    parameters: Option<Value>,
    description: Option<String>,
    priority: Option<i32>,
    timeout_seconds: Option<f64>,
    max_attempts: Option<u32>,
    idempotency_key: Option<String>,
    node_id: Option<String>,
    capability: Option<String>,
}

impl TaskRequest {
    /// Validates and fills defaults. `at` prefixes parameter names in errors (batch index).
    pub(super) fn into_spec(self, cfg: &Config, at: &str) -> Result<TaskSpec, ApiError> {
        let p = |name: &str| format!("{at}{name}");
        let tool = match (self.tool, self.task_type) {
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => {
                return Err(ApiError::invalid(p("tool"), "`tool` is required"));
            }
        };
        if tool.is_empty() || tool.len() > 256 {
            return Err(ApiError::invalid(
                p("tool"),
                "`tool` must be 1 to 256 characters",
            ));
        }
        let args = match self.args.or(self.parameters) {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => {
                return Err(ApiError::invalid(p("args"), "`args` must be a JSON object"));
            }
        };
        let timeout_seconds = self
            .timeout_seconds
            .unwrap_or(cfg.default_task_timeout_seconds);
        if !(timeout_seconds > 0.0 && timeout_seconds <= cfg.max_task_timeout_seconds) {
            return Err(ApiError::invalid(
                p("timeout_seconds"),
                format!(
                    "`timeout_seconds` must be greater than 0 and at most {}",
                    cfg.max_task_timeout_seconds
                ),
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(cfg.default_max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return Err(ApiError::invalid(
                p("max_attempts"),
                "`max_attempts` must be between 1 and 100",
            ));
        }
        for (name, v) in [
            ("idempotency_key", &self.idempotency_key),
            ("node_id", &self.node_id),
            ("capability", &self.capability),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 256)
            {
                return Err(ApiError::invalid(
                    p(name),
                    format!("`{name}` must be 1 to 256 characters"),
                ));
            }
        }
        Ok(TaskSpec {
            tool,
            args,
            description: self.description,
            priority: self.priority.unwrap_or(cfg.default_priority),
            timeout_seconds,
            max_attempts,
            idempotency_key: self.idempotency_key,
            pinned_node: self.node_id,
            capability: self.capability,
        })
    }
}

pub(super) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::ForbiddenTool(_) => ApiError::forbidden(e.to_string()),
        SubmitError::UnknownNode(_) | SubmitError::NodeLacksTool { .. } => {
            ApiError::invalid("node_id", e.to_string())
        }
    }
}

/// Read barrier: waits until every change the engine made so far is durable, so a state an
/// answer shows (a result, a terminal status, an event) survives a crash of the hub right
/// after. Costs at most one group commit; immediate with the memory store. If the store is
/// failing, the answer goes out anyway after the wait (reads stay available).
pub(super) async fn durable_barrier(state: &AppState) {
    let durability = state.cluster.durability();
    if !durability.is_mirrored() {
        return;
    }
    let ticket = durability.ticket();
    if let Err(e) = durability.wait(ticket, crate::durable::DURABLE_WAIT).await {
        tracing::warn!(error = %e, "answering with a state the store has not confirmed");
    }
}

/// Submits and waits until the store has the tasks: a 201 means the tasks survive a crash.
/// While the store is failing nothing is submitted (503).
async fn submit_durably(
    state: &AppState,
    specs: Vec<TaskSpec>,
) -> Result<Vec<(crate::model::Task, bool)>, ApiError> {
    if let Some(shared) = &state.shared {
        return submit_shared(state, shared, specs).await;
    }
    let durability = state.cluster.durability();
    durability.check().map_err(ApiError::store_unavailable)?;
    let out = state.cluster.submit(specs).map_err(submit_error)?;
    let ticket = durability.ticket();
    durability
        .wait(ticket, crate::durable::DURABLE_WAIT)
        .await
        .map_err(ApiError::store_unavailable)?;
    Ok(out)
}

/// Shared mode: the tasks are written to the shared store (and queued there for any hub) in
/// one script before the answer, all or none (a Redis error accepts nothing: 503); the engine
/// is not touched (this hub's claimer may adopt them like any other hub). A pinned node is not
/// checked (it may be connected to another hub).
async fn submit_shared(
    state: &AppState,
    shared: &crate::shared::SharedRedis,
    specs: Vec<TaskSpec>,
) -> Result<Vec<(crate::model::Task, bool)>, ApiError> {
    use crate::shared::SubmittedTask;
    for s in &specs {
        if s.tool == crate::cluster::INTERNAL_REQUEST_FILE
            && !state.config.allow_internal_request_file
        {
            return Err(submit_error(crate::cluster::SubmitError::ForbiddenTool(
                s.tool.clone(),
            )));
        }
    }
    let tasks: Vec<_> = specs.into_iter().map(crate::shared::new_task).collect();
    let results = shared
        .submit_batch(&tasks)
        .await
        .map_err(ApiError::store_unavailable)?;
    let mut out = Vec::with_capacity(tasks.len());
    for (task, r) in tasks.into_iter().zip(results) {
        match r {
            SubmittedTask::New { .. } => {
                crate::metrics::get().tasks_submitted.inc();
                out.push((task, true));
            }
            SubmittedTask::Existing(t) => out.push((*t, false)),
        }
    }
    Ok(out)
}

/// `POST /api/v1/tasks`: 201 with the task, or 200 with the existing task of the same
/// idempotency key.
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<TaskRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let spec = req.into_spec(&state.config, "")?;
    let mut out = submit_durably(&state, vec![spec]).await?;
    let Some((task, created)) = out.pop() else {
        return Err(ApiError::internal("submit returned no task"));
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(task.view())).into_response())
}

/// Body of `POST /api/v1/tasks/batch`.
#[derive(Debug, Deserialize)]
pub struct BatchRequest {
    tasks: Vec<TaskRequest>,
}

/// `POST /api/v1/tasks/batch`: up to `max_batch_tasks` tasks, accepted all or none; 201 with
/// `{"data": [task, ...]}` in request order.
pub async fn create_batch(
    State(state): State<AppState>,
    body: Result<Json<BatchRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    if req.tasks.is_empty() || req.tasks.len() > state.config.max_batch_tasks {
        return Err(ApiError::invalid(
            "tasks",
            format!(
                "`tasks` must hold 1 to {} tasks",
                state.config.max_batch_tasks
            ),
        ));
    }
    let specs = req
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.into_spec(&state.config, &format!("tasks[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let out = submit_durably(&state, specs).await?;
    let data: Vec<_> = out.iter().map(|(t, _)| t.view()).collect();
    Ok((StatusCode::CREATED, Json(json!({ "data": data }))).into_response())
}

/// Query of `GET /api/v1/tasks/{id}`.
#[derive(Debug, Deserialize)]
pub struct GetParams {
    /// Wait up to this many milliseconds (at most 60000) for the task to end.
    wait_ms: Option<u64>,
}

/// `GET /api/v1/tasks/{id}[?wait_ms=N]`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let task = wait_for_end(&state, &id, q.wait_ms.unwrap_or(0))
        .await
        .ok_or_else(|| ApiError::not_found("task", &id))?;
    Ok(Json(task.view()).into_response())
}

/// Waits up to `ms` milliseconds (at most 60000; 0 = not at all) for a task to end, or for the
/// hub to shut down, then returns the task as it is. `None` for an unknown task.
pub(super) async fn wait_for_end(state: &AppState, id: &str, ms: u64) -> Option<Task> {
    if ms > 0
        && let Some(rx) = state.cluster.wait(id)
    {
        let mut shutdown = state.shutdown.clone();
        // Answer early on shutdown, so a long poll never holds the hub's exit.
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_millis(ms.min(60_000)), rx) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
    if let Some(t) = state.cluster.get(id) {
        durable_barrier(state).await;
        return Some(t);
    }
    // Shared mode: a task this hub does not hold is read from the shared store, again at each
    // change another hub publishes (`Wake::Task`) and every second as a safety net.
    let shared = state.shared.as_ref()?;
    let mut wakes = shared.task_wakes();
    let until = tokio::time::Instant::now() + Duration::from_millis(ms.min(60_000));
    let mut shutdown = state.shutdown.clone();
    loop {
        let t = shared.get(id).await.ok().flatten();
        let done = t.as_ref().is_none_or(|t| t.status.is_terminal());
        if done || tokio::time::Instant::now() >= until || *shutdown.borrow() {
            return t;
        }
        tokio::select! {
            _ = crate::shared::SharedRedis::task_woken(&mut wakes, id) => {}
            _ = tokio::time::sleep(SHARED_SAFETY_POLL) => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        if let Some(t) = state.cluster.get(id) {
            return Some(t);
        }
    }
}

/// Shared mode: how often a reader following a task another hub holds reads its record when
/// no wake-up came (pub/sub messages are lost while the subscription reconnects).
const SHARED_SAFETY_POLL: Duration = Duration::from_secs(1);

/// Query of `GET /api/v1/tasks`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    tool: Option<String>,
    node_id: Option<String>,
    page: Option<usize>,
    limit: Option<usize>,
}

/// `GET /api/v1/tasks?status=&tool=&node_id=&page=&limit=`: newest first,
/// The `?status=` filter of task lists: `None` when absent or empty.
///
/// # Errors
/// 400 naming `status` for anything but a task state.
pub(super) fn status_filter(status: Option<&str>) -> Result<Option<TaskStatus>, ApiError> {
    match status.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => TaskStatus::parse(s).map(Some).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "`status` must be one of queued, assigned, running, succeeded, failed, cancelled, timed_out",
            )
        }),
    }
}

/// `{"data": [...], "meta": {"total", "page", "limit", "pages"}}`.
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let status = status_filter(q.status.as_deref())?;
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let filter = TaskFilter {
        status,
        tool: q.tool.filter(|s| !s.is_empty()),
        node_id: q.node_id.filter(|s| !s.is_empty()),
    };
    list_page(&state, &filter, pages).await
}

/// One page of the tasks matching `filter` as a list body: from the shared store in shared
/// mode (every hub's tasks), else from this hub's engine.
///
/// # Errors
/// 503 `store_unavailable` if the shared store cannot be read.
pub(super) async fn list_page(
    state: &AppState,
    filter: &TaskFilter,
    pages: Pagination,
) -> Result<Response, ApiError> {
    let p = match &state.shared {
        Some(shared) => shared
            .list(filter, pages.page, pages.limit)
            .await
            .map_err(ApiError::store_unavailable)?,
        None => {
            let p = state.cluster.list(filter, pages.page, pages.limit);
            durable_barrier(state).await;
            p
        }
    };
    let data: Vec<_> = p.tasks.iter().map(|t| t.view()).collect();
    Ok(pages.body(&data, p.total).into_response())
}

/// `POST /api/v1/tasks/{id}/cancel`: 200 with the cancelled task; 409 if it already ended.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.cluster.cancel(&id) {
        Ok(t) => Ok(Json(t.view()).into_response()),
        Err(CancelError::NotFound) if state.shared.is_some() => cancel_shared(&state, &id).await,
        Err(CancelError::NotFound) => Err(ApiError::not_found("task", &id)),
        Err(e @ CancelError::Terminal(_)) => Err(ApiError::conflict(e.to_string())),
    }
}

/// Shared mode, a task this hub does not hold: a queued task is cancelled in the shared store;
/// for one another hub holds, that hub is asked (pub/sub) and the answer waits up to 10 s for
/// the shared record to show the end (409 if it does not).
async fn cancel_shared(state: &AppState, id: &str) -> Result<Response, ApiError> {
    let Some(shared) = &state.shared else {
        return Err(ApiError::not_found("task", id));
    };
    let unavailable = ApiError::store_unavailable;
    let Some(mut t) = shared.get(id).await.map_err(unavailable)? else {
        return Err(ApiError::not_found("task", id));
    };
    if t.status.is_terminal() {
        return Err(ApiError::conflict(
            CancelError::Terminal(t.status.as_str()).to_string(),
        ));
    }
    if t.status == crate::model::TaskStatus::Queued {
        let now = std::time::SystemTime::now();
        let err = apex_protocol::ErrorInfo::new("task_cancelled", "the task was cancelled");
        t.status = crate::model::TaskStatus::Cancelled;
        t.updated_at = now;
        t.finished_at = Some(now);
        t.message = Some(err.message.clone());
        t.error = Some(err.clone());
        t.events.push(TaskEvent {
            kind: crate::model::EventKind::TaskCancelled,
            task_id: t.id.clone(),
            seq: u32::try_from(t.events.len() + 1).unwrap_or(u32::MAX),
            attempt: t.attempt,
            node_id: t.node_id.clone(),
            status: t.status,
            progress: None,
            message: None,
            error: Some(err),
            timestamp: now,
        });
        if shared.finish_queued(&t).await.map_err(unavailable)? {
            return Ok(Json(t.view()).into_response());
        }
    }
    // Held by a hub (perhaps claimed just now): ask the holder, and answer once the shared
    // record shows the task ended.
    shared.request_cancel(id).await.map_err(unavailable)?;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match shared.get(id).await.map_err(unavailable)? {
            Some(t) if t.status.is_terminal() => return Ok(Json(t.view()).into_response()),
            Some(_) if tokio::time::Instant::now() < until => {}
            _ => {
                return Err(ApiError::conflict(format!(
                    "task {id} is held by another hub, which did not confirm the cancel within 10 s"
                )));
            }
        }
    }
}

/// Shared mode, a task this hub does not hold: its events from the shared record, read again
/// at each change another hub publishes (`Wake::Task`, and every second as a safety net),
/// until the terminal one.
async fn events_shared(
    state: &AppState,
    id: String,
    resume_after: u32,
) -> Result<Response, ApiError> {
    let Some(shared) = state.shared.clone() else {
        return Err(ApiError::not_found("task", &id));
    };
    // Subscribed before the first read, so no change after it is missed.
    let mut wakes = shared.task_wakes();
    let Some(task) = shared.get(&id).await.map_err(ApiError::store_unavailable)? else {
        return Err(ApiError::not_found("task", &id));
    };
    if task.status.is_terminal() && task.events.iter().all(|e| e.seq <= resume_after) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut last = resume_after;
        let mut task = Some(task);
        loop {
            if let Some(t) = task.take() {
                for e in &t.events {
                    if e.seq <= last {
                        continue;
                    }
                    last = e.seq;
                    if tx.send(Ok(sse_event(e))).await.is_err() || e.kind.is_terminal() {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = crate::shared::SharedRedis::task_woken(&mut wakes, &id) => {}
                _ = tokio::time::sleep(SHARED_SAFETY_POLL) => {}
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match shared.get(&id).await {
                Ok(Some(t)) => task = Some(t),
                Ok(None) => return,
                Err(e) => tracing::warn!(error = %e, task_id = %id, "shared task events not read"),
            }
        }
    });
    Ok(
        Sse::new(ReceiverStream::<Result<Event, Infallible>>::new(rx))
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

fn sse_event(e: &TaskEvent) -> Event {
    Event::default()
        .event(e.kind.as_str())
        .id(e.seq.to_string())
        .json_data(e)
        .unwrap_or_else(|_| Event::default().comment("unencodable event"))
}

/// `GET /api/v1/tasks/{id}/events`: the task's past events, then live ones; the stream ends
/// after the terminal event (or when the hub shuts down). Each event's SSE `id` is its `seq`:
/// a reconnecting client sending `Last-Event-ID` gets only newer events, and 204 No Content
/// (which stops browser `EventSource` retries) once the task has ended and nothing is newer.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    // Subscribe before reading the past, so no event falls between the two.
    let mut live = state.cluster.subscribe();
    let Some(task) = state.cluster.get(&id) else {
        if state.shared.is_some() {
            return events_shared(&state, id, resume_after).await;
        }
        return Err(ApiError::not_found("task", &id));
    };
    let backlog = state.cluster.events_after(&id, resume_after);
    if task.status.is_terminal() && backlog.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let cluster = state.cluster.clone();
    let mut shutdown = state.shutdown.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let mut last = resume_after;
        let mut backlog = backlog;
        loop {
            // Events go out once they are durable (the engine queued them before this point).
            if !backlog.is_empty() {
                durable_barrier(&state).await;
            }
            for e in backlog.drain(..) {
                if e.seq <= last {
                    continue;
                }
                last = e.seq;
                if tx.send(Ok(sse_event(&e))).await.is_err() || e.kind.is_terminal() {
                    return;
                }
            }
            tokio::select! {
                r = live.recv() => match r {
                    Ok(e) if e.task_id == id && e.seq > last => backlog.push((*e).clone()),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        backlog = cluster.events_after(&id, last);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    });
    Ok(
        Sse::new(ReceiverStream::<Result<Event, Infallible>>::new(rx))
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}
