//! `/api/research/sessions…`: the research platform's sessions (create, list, get, rename or
//! archive, delete), `execute` as Server-Sent Events, and the run's `tasks`, `executions`
//! and memory layers, mapped to [`crate::research::Research`].

use std::convert::Infallible;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::principal::Principal;
use crate::research::{Error, SessionView};

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { param, message } => ApiError::invalid(param, message),
            Error::NotFound(what, id) => ApiError::not_found(what, &id),
            Error::Conflict(message) => ApiError::conflict(message),
            Error::Store(e) => ApiError::store_unavailable(e),
        }
    }
}

/// Body of `POST /api/research/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "Mamba deep dive", "task": "Analyse the design of the Mamba architecture and compare it with Transformers"}))]
pub struct CreateSession {
    /// A label, 1 to 256 characters.
    name: String,
    /// The research task, 1 to 20000 characters.
    task: String,
}

/// Create a research session.
///
/// `POST /api/research/sessions`: 201 with the session (`status: "created"`); `execute` runs
/// it.
#[utoipa::path(
    post,
    path = "/api/research/sessions",
    tag = "research",
    operation_id = "createResearchSession",
    request_body = CreateSession,
    responses(
        (status = 201, description = "The session, stored", body = SessionView),
        (status = 400, description = "Invalid body (`error.param`: `name` or `task`)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    body: Result<Json<CreateSession>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let s = state.research.create(&caller, &req.name, &req.task).await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

/// Query of `GET /api/research/sessions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only sessions with this status (`created`, `running`, `completed`, `failed`,
    /// `archived`).
    status: Option<String>,
    /// Page number, from 1 (default 1).
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Sessions per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    page_size: Option<usize>,
}

/// List research sessions.
///
/// `GET /api/research/sessions`: the caller's sessions (admins: all), newest first, as
/// `{sessions, total, page, page_size}`.
#[utoipa::path(
    get,
    path = "/api/research/sessions",
    tag = "research",
    operation_id = "listResearchSessions",
    params(ListParams),
    responses(
        (status = 200, description = "`{sessions: [Session], total, page, page_size}`", body = Object),
        (status = 400, description = "Invalid query (`page`, `page_size`, `status`)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let page = q.page.unwrap_or(1);
    let page_size = q.page_size.unwrap_or(20);
    if page == 0 {
        return Err(ApiError::invalid("page", "`page` starts at 1"));
    }
    if !(1..=100).contains(&page_size) {
        return Err(ApiError::invalid(
            "page_size",
            "`page_size` must be 1 to 100",
        ));
    }
    if let Some(s) = &q.status
        && !["created", "running", "completed", "failed", "archived"].contains(&s.as_str())
    {
        return Err(ApiError::invalid(
            "status",
            "`status` must be one of created, running, completed, failed, archived",
        ));
    }
    let (sessions, total) = state
        .research
        .list(&caller, q.status.as_deref(), page, page_size)
        .await?;
    Ok(
        Json(json!({"sessions": sessions, "total": total, "page": page, "page_size": page_size}))
            .into_response(),
    )
}

/// Get a research session.
#[utoipa::path(
    get,
    path = "/api/research/sessions/{id}",
    tag = "research",
    operation_id = "getResearchSession",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 404, description = "No such session (or another user's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = state.research.session(&caller, &id).await?;
    Ok(Json(s.view()).into_response())
}

/// Body of `PUT /api/research/sessions/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateSession {
    /// A new label.
    name: Option<String>,
    /// Only `"archived"`: an archived session is kept but does not run.
    status: Option<String>,
}

/// Rename or archive a research session.
#[utoipa::path(
    put,
    path = "/api/research/sessions/{id}",
    tag = "research",
    operation_id = "updateResearchSession",
    params(("id" = String, Path, description = "Session id")),
    request_body = UpdateSession,
    responses(
        (status = 200, description = "The session, updated", body = SessionView),
        (status = 400, description = "Invalid body (`name`, `status`)", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "A running session cannot be archived", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<UpdateSession>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let s = state
        .research
        .update(&caller, &id, req.name.as_deref(), req.status.as_deref())
        .await?;
    Ok(Json(s).into_response())
}

/// Delete a research session, its events and its files (a run in progress stops and its
/// agent steps are cancelled).
#[utoipa::path(
    delete,
    path = "/api/research/sessions/{id}",
    tag = "research",
    operation_id = "deleteResearchSession",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "`{message: \"Research session deleted\"}`", body = Object),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.research.delete(&caller, &id).await?;
    Ok(Json(json!({"message": "Research session deleted"})).into_response())
}

/// Run a research session (SSE).
///
/// `POST /api/research/sessions/{id}/execute`: starts the run (the coordinator's plan, the
/// execution groups of agent tasks on nodes, the synthesis) and streams its events as
/// `data: {"type", "data"}` in the research platform's order: `session_started`,
/// `decomposition_complete`, per group `group_started`, `task_started`, `task_progress`,
/// `task_completed` | `task_failed`, `group_completed`, then `synthesis_started`,
/// `synthesis_complete`, `session_completed` (or `error`). Each event's SSE `id` is its
/// number in the run's log: reconnecting with `Last-Event-ID` resumes with no gap and no
/// duplicate. A second call while the run is in progress attaches to it; on a finished
/// session it replays the stream. Rate-limited as `execute` (`rate_limits.execute_per_minute`).
#[utoipa::path(
    post,
    path = "/api/research/sessions/{id}/execute",
    tag = "research",
    operation_id = "executeResearchSession",
    params(
        ("id" = String, Path, description = "Session id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id` the event's number, `data` `{type, data}`", content_type = "text/event-stream", body = String),
        (status = 204, description = "`Last-Event-ID` names the run's last event: nothing more will come"),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session is archived", body = ErrorBody),
        (status = 429, description = "Too many runs started this minute", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn execute(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let Some(rx) = state.research.execute(&caller, &id, after).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let stream = ReceiverStream::new(rx).map(|(seq, e)| {
        Ok::<_, Infallible>(
            Event::default()
                .id(seq.to_string())
                .json_data(e.wire())
                .unwrap_or_else(|_| Event::default().comment("unencodable event")),
        )
    });
    let stream = super::auth::until_revoked(&state, caller, stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The research tasks of a session's plan.
///
/// `GET /api/research/sessions/{id}/tasks` → `{tasks: [{id, session_id, parent_task_id,
/// description, assigned_agent, priority, status, dependencies, execution_order,
/// execution_group, output, created_at, updated_at}], total}`.
#[utoipa::path(
    get,
    path = "/api/research/sessions/{id}/tasks",
    tag = "research",
    operation_id = "listResearchTasks",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "`{tasks, total}`", body = Object),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn tasks(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tasks = state.research.tasks(&caller, &id).await?;
    let total = tasks.len();
    Ok(Json(json!({"tasks": tasks, "total": total})).into_response())
}

/// The agent executions of a session's run.
///
/// `GET /api/research/sessions/{id}/executions` → `{executions: [{id, session_id,
/// agent_profile_id, research_task_id, agent_type, agent_name, task_description, status,
/// input_context, output_result, structured_output {key_findings, uncertainties,
/// suggestions}, tokens_used, duration_ms, model_used, confidence, raw_output_path,
/// error_message, retry_count, started_at, completed_at}], total}`: the plan, each research
/// task, the synthesis.
#[utoipa::path(
    get,
    path = "/api/research/sessions/{id}/executions",
    tag = "research",
    operation_id = "listResearchExecutions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "`{executions, total}`", body = Object),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn executions(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let executions = state.research.executions(&caller, &id).await?;
    let total = executions.len();
    Ok(Json(json!({"executions": executions, "total": total})).into_response())
}

/// Query of `GET /api/research/sessions/{id}/memory`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LayerParams {
    /// `L0` (each agent's raw output), `L1` (each group's digest) or `L2` (the synthesis).
    layer: Option<String>,
}

/// A session's memory layers.
///
/// `GET /api/research/sessions/{id}/memory` → `{layers: [{layer, files: [{name, path, size,
/// modified_at}]}]}`, L2 first. Files live in the store (any hub serves them) under virtual
/// paths `/workspace/sessions/<id>/…`.
#[utoipa::path(
    get,
    path = "/api/research/sessions/{id}/memory",
    tag = "research",
    operation_id = "listResearchMemory",
    params(("id" = String, Path, description = "Session id"), LayerParams),
    responses(
        (status = 200, description = "`{layers}`", body = Object),
        (status = 400, description = "`layer` is not L0, L1 or L2", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn memory(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<LayerParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let layers = state
        .research
        .memory(&caller, &id, q.layer.as_deref())
        .await?;
    Ok(Json(layers).into_response())
}

/// Query of `GET /api/research/sessions/{id}/memory/content`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentParams {
    /// The file: `/workspace/sessions/<id>/L2/key_findings.md`, or relative to the session
    /// (`L2/key_findings.md`).
    path: String,
}

/// One memory-layer file.
///
/// `GET /api/research/sessions/{id}/memory/content?path=` → `{layer, path, content}`. A path
/// outside the session (`..`, another root, another session) answers 400.
#[utoipa::path(
    get,
    path = "/api/research/sessions/{id}/memory/content",
    tag = "research",
    operation_id = "getResearchMemoryContent",
    params(("id" = String, Path, description = "Session id"), ContentParams),
    responses(
        (status = 200, description = "`{layer, path, content}`", body = Object),
        (status = 400, description = "`path` is missing or outside the session", body = ErrorBody),
        (status = 404, description = "No such session or file", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn memory_content(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<ContentParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let file = state.research.memory_content(&caller, &id, &q.path).await?;
    Ok(Json(file).into_response())
}

/// Body of `POST /api/v2/query`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"query": "How are state space models used in finance?"}))]
pub struct QueryRequest {
    /// The question, 1 to 20000 characters.
    query: String,
}

/// Ask the knowledge agent (SSE, the knowledge platform's plan-executor protocol).
///
/// `POST /api/v2/query`: a run of three stages on the research engine — `planning` (the
/// planner agent), `retrieval` (the caller's memory and every search tool of the cluster),
/// `summary` (the writer agent) — streamed as `data: {"event_type", "context": {"mode":
/// "plan-executor", …}, "messages"}`: `PLAN_DECLARED`, `PLAN_CHANGE`, `STREAM_THING`,
/// `INVOCATION_DECLARED` / `INVOCATION_CHANGE`, `ARTIFACT_DECLARED` / `ARTIFACT_CHANGE`,
/// `STREAM_CONTENT`, `END`. A failure is a `STREAM_THING` starting `❌ 错误: `, then `END`.
/// Rate-limited as `execute`.
#[utoipa::path(
    post,
    path = "/api/v2/query",
    tag = "research",
    operation_id = "planExecutorQuery",
    request_body = QueryRequest,
    responses(
        (status = 200, description = "Server-Sent Events of the plan-executor protocol", content_type = "text/event-stream", body = String),
        (status = 400, description = "`query` is missing, empty or too long", body = ErrorBody),
        (status = 429, description = "Too many runs started this minute", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn query(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    body: Result<Json<QueryRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let rx = state.research.query(&caller, &req.query).await?;
    let stream = ReceiverStream::new(rx).flat_map(|(_, e)| {
        futures::stream::iter(
            crate::research::query::plan_executor(&e)
                .into_iter()
                .map(|m| {
                    Ok::<_, Infallible>(
                        Event::default()
                            .json_data(m)
                            .unwrap_or_else(|_| Event::default().comment("unencodable event")),
                    )
                }),
        )
    });
    let stream = super::auth::until_revoked(&state, caller, stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
