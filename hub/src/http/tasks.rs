//! `/api/v1/tasks`: submit (one or a batch), get (optionally waiting for the end), list with
//! filters and pagination, cancel, and the per-task Server-Sent Events stream. Each handler
//! maps its request to the task service (`crate::tasks`) and its answer to HTTP; none knows
//! whether the hub runs alone or in shared mode.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, Pagination};
use crate::config::Config;
use crate::engine::SubmitError;
use crate::model::{TaskEvent, TaskSpec, TaskStatus};
use crate::principal::Principal;
use crate::store::TaskFilter;
use crate::tasks::Error as TaskError;

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
            owner: None,
        })
    }
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Submit(e @ SubmitError::ForbiddenTool(_)) => {
                ApiError::forbidden(e.to_string())
            }
            TaskError::Submit(e) => ApiError::invalid("node_id", e.to_string()),
            TaskError::NotFound(id) => ApiError::not_found("task", &id),
            e @ (TaskError::Terminal(_) | TaskError::CancelUnconfirmed(_)) => {
                ApiError::conflict(e.to_string())
            }
            TaskError::StoreUnavailable(cause) => ApiError::store_unavailable(cause),
            e @ TaskError::ShuttingDown => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                e.to_string(),
                None,
            ),
        }
    }
}

/// `POST /api/v1/tasks`: 201 with the task, or 200 with the existing task of the same
/// idempotency key. The 201 is sent once the task is durable.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    body: Result<Json<TaskRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let spec = req.into_spec(&state.config, "")?;
    created(&state, &caller, spec).await
}

/// Submits one task for `caller` through the task service: 201 with it, or 200 with the
/// caller's existing task of the same idempotency key (`POST /api/v1/tasks`).
pub(super) async fn created(
    state: &AppState,
    caller: &Principal,
    spec: TaskSpec,
) -> Result<Response, ApiError> {
    let (task, created) = submit_one(state, caller, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(task.view())).into_response())
}

/// Submits one task for `caller` through the task service; returns it and whether it was
/// created now.
pub(super) async fn submit_one(
    state: &AppState,
    caller: &Principal,
    spec: TaskSpec,
) -> Result<(crate::model::Task, bool), ApiError> {
    state
        .tasks
        .submit(caller, vec![spec])
        .await?
        .pop()
        .ok_or_else(|| ApiError::internal("submit returned no task"))
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
    Extension(caller): Extension<Principal>,
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
    let out = state.tasks.submit(&caller, specs).await?;
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
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0));
    let task = state
        .tasks
        .get(&caller, &id, wait)
        .await?
        .ok_or_else(|| ApiError::not_found("task", &id))?;
    Ok(Json(task.view()).into_response())
}

/// Query of `GET /api/v1/tasks`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    tool: Option<String>,
    node_id: Option<String>,
    page: Option<usize>,
    limit: Option<usize>,
}

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

/// `GET /api/v1/tasks?status=&tool=&node_id=&page=&limit=`: newest first,
/// `{"data": [...], "meta": {"total", "page", "limit", "pages"}}`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let status = status_filter(q.status.as_deref())?;
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let filter = TaskFilter {
        status,
        tool: q.tool.filter(|s| !s.is_empty()),
        node_id: q.node_id.filter(|s| !s.is_empty()),
        owner: None,
    };
    list_page(&state, &caller, &filter, pages).await
}

/// One page of the tasks matching `filter` that `caller` may see, as a list body (every hub's
/// tasks in shared mode).
///
/// # Errors
/// 503 `store_unavailable` if the shared store cannot be read.
pub(super) async fn list_page(
    state: &AppState,
    caller: &Principal,
    filter: &TaskFilter,
    pages: Pagination,
) -> Result<Response, ApiError> {
    let p = state
        .tasks
        .list(caller, filter, pages.page, pages.limit)
        .await?;
    let data: Vec<_> = p.tasks.iter().map(|t| t.view()).collect();
    Ok(pages.body(&data, p.total).into_response())
}

/// `POST /api/v1/tasks/{id}/cancel`: 200 with the cancelled task; 409 if it already ended.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = state.tasks.cancel(&caller, &id).await?;
    Ok(Json(t.view()).into_response())
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
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let Some(rx) = state.tasks.events(&caller, &id, resume_after).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let stream = ReceiverStream::new(rx).map(|e| Ok::<_, Infallible>(sse_event(&e)));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
