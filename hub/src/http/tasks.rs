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
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, AppState, Pagination, Sort};
use crate::config::Config;
use crate::engine::SubmitError;
use crate::model::{TaskEvent, TaskSpec, TaskStatus, TaskView};
use crate::principal::Principal;
use crate::store::TaskFilter;
use crate::tasks::Error as TaskError;

/// Body of `POST /api/v1/tasks` (and each element of a batch).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"tool": "echo", "args": {"text": "hi"}, "priority": 5}))]
pub struct TaskRequest {
    /// The tool to run (1 to 256 characters); required unless `task_type` is given.
    tool: Option<String>,
    /// Seed API synonym of `tool`.
    task_type: Option<String>,
    /// The tool's arguments, a JSON object (default `{}`).
    #[schema(value_type = Option<Object>)]
    args: Option<Value>,
    /// Seed API synonym of `args`.
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    /// Free text.
    description: Option<String>,
    /// Higher runs first (default from the config).
    priority: Option<i32>,
    /// Budget from submission, greater than 0 and at most the config's maximum.
    timeout_seconds: Option<f64>,
    /// Assignments allowed, 1 to 100.
    max_attempts: Option<u32>,
    /// A second submission with the same key answers 200 with the first task.
    idempotency_key: Option<String>,
    /// Run only on this node.
    node_id: Option<String>,
    /// Run only on a node offering this capability.
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
            e @ TaskError::PluginDisabled(_) => ApiError::custom(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "plugin_disabled",
                e.to_string(),
                None,
            ),
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

/// Submit a task.
///
/// `POST /api/v1/tasks`: 201 with the task, or 200 with the existing task of the same
/// idempotency key. The 201 is sent once the task is durable.
#[utoipa::path(
    post,
    path = "/api/v1/tasks",
    tag = "tasks",
    operation_id = "createTask",
    request_body = TaskRequest,
    responses(
        (status = 201, description = "The task, accepted and durable", body = TaskView),
        (status = 200, description = "The task already accepted under this idempotency key", body = TaskView),
        (status = 400, description = "Invalid body (`error.param` names the field)", body = ErrorBody),
        (status = 403, description = "The tool is forbidden by the hub's policy", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
        (status = 415, description = "Body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The task store is unavailable; nothing was accepted", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchRequest {
    /// 1 to `max_batch_tasks` tasks, accepted all or none.
    tasks: Vec<TaskRequest>,
}

/// Submit tasks, all or none.
///
/// `POST /api/v1/tasks/batch`: up to `max_batch_tasks` tasks, accepted all or none; 201 with
/// `{"data": [task, ...]}` in request order.
#[utoipa::path(
    post,
    path = "/api/v1/tasks/batch",
    tag = "tasks",
    operation_id = "createTaskBatch",
    request_body = BatchRequest,
    responses(
        (status = 201, description = "Every task, in request order", body = super::openapi::TaskBatch),
        (status = 400, description = "Invalid body (`error.param` is e.g. `tasks[2].tool`)", body = ErrorBody),
        (status = 403, description = "A tool is forbidden by the hub's policy", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
        (status = 415, description = "Body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The task store is unavailable; nothing was accepted", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Wait up to this many milliseconds (at most 60000) for the task to end.
    wait_ms: Option<u64>,
}

/// Get a task (optionally waiting for its end).
///
/// `GET /api/v1/tasks/{id}[?wait_ms=N]`.
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}",
    tag = "tasks",
    operation_id = "getTask",
    params(("id" = String, Path, description = "Task id"), GetParams),
    responses(
        (status = 200, description = "The task (when it ended, or when `wait_ms` ran out)", body = TaskView),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only tasks in this state.
    #[param(inline, value_type = Option<TaskStatus>)]
    status: Option<String>,
    /// Only tasks of this tool.
    tool: Option<String>,
    /// Only tasks whose current or last attempt is on this node.
    node_id: Option<String>,
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Tasks per page, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `-created_at` (newest first, the default) or `created_at` (oldest first).
    #[param(example = "-created_at")]
    sort: Option<String>,
}

/// What task lists sort by (`sort=created_at` oldest first, `sort=-created_at` newest first,
/// the default).
pub(super) const SORT_FIELDS: &[&str] = &["created_at"];

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

/// List tasks.
///
/// `GET /api/v1/tasks?status=&tool=&node_id=&page=&limit=&sort=`: newest first unless
/// `sort=created_at`, `{"data": [...], "meta": {"total", "page", "limit", "pages"}}`.
#[utoipa::path(
    get,
    path = "/api/v1/tasks",
    tag = "tasks",
    operation_id = "listTasks",
    params(ListParams),
    responses(
        (status = 200, description = "One page of tasks", body = super::openapi::TaskList),
        (status = 400, description = "Invalid query (`error.param` names it: `status`, `page`, `limit`, `sort`)", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let status = status_filter(q.status.as_deref())?;
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let sort = Sort::parse(q.sort.as_deref(), SORT_FIELDS, Sort::NEWEST_FIRST)?;
    let filter = TaskFilter {
        status,
        tool: q.tool.filter(|s| !s.is_empty()),
        node_id: q.node_id.filter(|s| !s.is_empty()),
        owner: None,
    };
    list_page(&state, &caller, &filter, sort, pages).await
}

/// One page of the tasks matching `filter` that `caller` may see, in `sort` order (a field of
/// [`SORT_FIELDS`]), as a list body (every hub's tasks in shared mode).
///
/// # Errors
/// 503 `store_unavailable` if the shared store cannot be read.
pub(super) async fn list_page(
    state: &AppState,
    caller: &Principal,
    filter: &TaskFilter,
    sort: Sort,
    pages: Pagination,
) -> Result<Response, ApiError> {
    let p = state
        .tasks
        .list(caller, filter, sort.order(), pages.page, pages.limit)
        .await?;
    let data: Vec<_> = p.tasks.iter().map(|t| t.view()).collect();
    Ok(pages.body(&data, p.total).into_response())
}

/// Cancel a task.
///
/// `POST /api/v1/tasks/{id}/cancel`: 200 with the cancelled task; 409 if it already ended.
#[utoipa::path(
    post,
    path = "/api/v1/tasks/{id}/cancel",
    tag = "tasks",
    operation_id = "cancelTask",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The cancelled task", body = TaskView),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The task already ended (or another hub did not confirm)", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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

/// Follow a task's events (SSE).
///
/// `GET /api/v1/tasks/{id}/events`: the task's past events, then live ones; the stream ends
/// after the terminal event (or when the hub shuts down). Each event's SSE `id` is its `seq`:
/// a reconnecting client sending `Last-Event-ID` gets only newer events, and 204 No Content
/// (which stops browser `EventSource` retries) once the task has ended and nothing is newer.
/// The stream also ends when the caller's credential is revoked (logout, key deleted).
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/events",
    tag = "tasks",
    operation_id = "streamTaskEvents",
    params(
        ("id" = String, Path, description = "Task id"),
        ("Last-Event-ID" = Option<u32>, Header, description = "Resume after this event `seq`"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: each event's `event` is its kind, `id` its `seq`, `data` the task event as JSON", content_type = "text/event-stream", body = String),
        (status = 204, description = "The task has ended and no event is newer than `Last-Event-ID`"),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
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
    let stream = super::auth::until_revoked(&state, caller, stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
