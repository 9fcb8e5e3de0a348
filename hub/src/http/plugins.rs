//! The plugin and tool routes: `GET /api/v1/plugins` (the nex assistant's `PluginInfo` list),
//! `POST /api/v1/plugins/{name}/enable|disable`, `GET /api/v1/tools` and
//! `/api/v1/tools/{name}`, and the Apex Bridge route `POST /plugin-callback/{plugin}/{taskId}`
//! by which asynchronous plugins finish their tasks.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::model::Outcome;
use crate::plugins::callback::{Presented, Refusal};
use crate::plugins::{PluginEntry, ToolEntry, catalogue, tool_list, tools};
use crate::principal::Principal;
use crate::tasks::Settled;

/// The cluster's node views, or 503 when the shared store cannot be read.
async fn views(state: &AppState) -> Result<Vec<Value>, ApiError> {
    state.tasks.node_views().await.map_err(ApiError::from)
}

/// List plugins.
///
/// `GET /api/v1/plugins`: every plugin an online node has loaded, one entry per name, with
/// `enabled` and the `nodes` that have it (`versions` too when nodes run different ones).
#[utoipa::path(
    get,
    path = "/api/v1/plugins",
    tag = "plugins",
    operation_id = "listPlugins",
    responses(
        (status = 200, description = "The plugins, by name", body = Vec<PluginEntry>),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let v = views(&state).await?;
    Ok(Json(catalogue(&v, &state.plugins)).into_response())
}

/// Enable a plugin.
///
/// `POST /api/v1/plugins/{name}/enable` → `{"message"}`; stored, in force at every hub.
#[utoipa::path(
    post,
    path = "/api/v1/plugins/{name}/enable",
    tag = "plugins",
    operation_id = "enablePlugin",
    params(("name" = String, Path, description = "Plugin name")),
    responses(
        (status = 200, description = "Enabled", body = Object, example = json!({"message": "plugin word_count enabled"})),
        (status = 404, description = "No node has this plugin and it was never switched", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn enable(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    switch(state, name?.0, true).await
}

/// Disable a plugin.
///
/// `POST /api/v1/plugins/{name}/disable` → `{"message"}`. Its tool is not dispatched while
/// disabled: submitting a task for it answers 409 `plugin_disabled`.
#[utoipa::path(
    post,
    path = "/api/v1/plugins/{name}/disable",
    tag = "plugins",
    operation_id = "disablePlugin",
    params(("name" = String, Path, description = "Plugin name")),
    responses(
        (status = 200, description = "Disabled", body = Object, example = json!({"message": "plugin word_count disabled"})),
        (status = 404, description = "No node has this plugin and it was never switched", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn disable(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    switch(state, name?.0, false).await
}

async fn switch(state: AppState, name: String, enabled: bool) -> Result<Response, ApiError> {
    let known = state.plugins.is_disabled(&name)
        || catalogue(&views(&state).await?, &state.plugins)
            .iter()
            .any(|p| p.name == name);
    if !known {
        return Err(ApiError::not_found("plugin", &name));
    }
    state
        .plugins
        .set_enabled(&name, enabled)
        .await
        .map_err(ApiError::store_unavailable)?;
    let word = if enabled { "enabled" } else { "disabled" };
    tracing::info!(plugin = %name, "plugin {word}");
    Ok(Json(json!({ "message": format!("plugin {name} {word}") })).into_response())
}

/// List tools.
///
/// `GET /api/v1/tools` → `{"tools": [{name, description, parameters}]}`: every tool an online
/// node offers (built-ins, plugins, VCP tools, MCP tools), with its JSON Schema.
#[utoipa::path(
    get,
    path = "/api/v1/tools",
    tag = "plugins",
    operation_id = "listTools",
    responses(
        (status = 200, description = "`{\"tools\": [Tool]}`, by name", body = Object),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_tools(State(state): State<AppState>) -> Result<Response, ApiError> {
    let v = views(&state).await?;
    Ok(Json(json!({ "tools": tool_list(&v) })).into_response())
}

/// Get a tool.
///
/// `GET /api/v1/tools/{name}`: the tool with its `examples` and the `nodes` offering it.
#[utoipa::path(
    get,
    path = "/api/v1/tools/{name}",
    tag = "plugins",
    operation_id = "getTool",
    params(("name" = String, Path, description = "Tool name")),
    responses(
        (status = 200, description = "The tool", body = ToolEntry),
        (status = 404, description = "No online node offers it", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_tool(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name?;
    let v = views(&state).await?;
    tools(&v)
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| Json(t).into_response())
        .ok_or_else(|| ApiError::not_found("tool", &name))
}

/// `?token=` of a callback URL.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CallbackQuery {
    /// The per-task token the hub put in the callback URL.
    token: Option<String>,
}

/// The callback body (the Apex Bridge's): `status` `success` or `failed` (any case; `succeed`
/// and `succeeded` are taken as `success`, `error` and `failure` as `failed`), the result as `output` or `result`, and an `error` (a string or an object
/// with `message`).
#[derive(Debug, Deserialize)]
struct CallbackBody {
    status: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl CallbackBody {
    fn outcome(self) -> Result<Outcome, ApiError> {
        match self.status.to_ascii_lowercase().as_str() {
            "success" | "succeeded" | "succeed" => Ok(Outcome::Succeeded(
                self.output.or(self.result).unwrap_or(Value::Null),
            )),
            "failed" | "error" | "failure" => {
                let message = match &self.error {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                    None => "the plugin reported a failure".to_owned(),
                };
                let mut e = apex_protocol::ErrorInfo::new("plugin_failed", message);
                if let Some(v) = self.error.filter(Value::is_object) {
                    e.details = Some(v);
                }
                Ok(Outcome::Failed(e))
            }
            other => Err(ApiError::invalid(
                "status",
                format!("`status` must be `success` or `failed`, got `{other}`"),
            )),
        }
    }
}

/// Finish an asynchronous plugin's task.
///
/// `POST /plugin-callback/{plugin}/{taskId}?token=…` with `X-Apex-Timestamp` and
/// `X-Apex-Signature: sha256=<hex HMAC-SHA256(APEX_CALLBACK_SECRET, "<timestamp>.<body>")>`
/// (or the token alone for plugins whose manifest says `callback_auth = "token"`). Body
/// `{"status": "success"|"failed", "output"|"result": …, "error"?: …}`. A callback for a
/// task that has ended already answers 200 and changes nothing.
#[utoipa::path(
    post,
    path = "/plugin-callback/{plugin}/{taskId}",
    tag = "plugins",
    operation_id = "pluginCallback",
    params(
        ("plugin" = String, Path, description = "The plugin (tool) name"),
        ("taskId" = String, Path, description = "The apex task id (`APEX_TASK_ID`)"),
        CallbackQuery,
        ("X-Apex-Timestamp" = Option<String>, Header, description = "Unix seconds; refused when more than 5 minutes off"),
        ("X-Apex-Signature" = Option<String>, Header, description = "`sha256=<hex>`"),
    ),
    request_body(content = Object, description = "`{status, output|result, error?}`"),
    responses(
        (status = 200, description = "`{\"status\":\"success\",\"message\"}`", body = Object),
        (status = 400, description = "Body is not a callback", body = ErrorBody),
        (status = 401, description = "Token, signature or timestamp missing or wrong", body = ErrorBody),
        (status = 404, description = "Unknown plugin or task", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    )
)]
pub async fn callback(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<CallbackQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Path((plugin, task_id)) = path?;
    let Query(query) = query?;
    // Unknown plugin or task first (404), then the credentials (401).
    let task = state
        .tasks
        .get(&Principal::admin(), &task_id, std::time::Duration::ZERO)
        .await
        .map_err(ApiError::from)?;
    match &task {
        Some(t) if t.spec.tool == plugin => {}
        Some(_) | None => {
            return Err(ApiError::not_found(
                "plugin task",
                &format!("{plugin}/{task_id}"),
            ));
        }
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let presented = Presented {
        token: query.token.as_deref(),
        timestamp: header("x-apex-timestamp"),
        signature: header("x-apex-signature"),
    };
    let now = apex_protocol::now_ms() / 1000;
    if let Err(refusal) = state
        .plugins
        .signer()
        .verify(&plugin, &task_id, presented, &body, now)
    {
        tracing::warn!(plugin = %plugin, task_id = %task_id, reason = %refusal, "plugin callback refused");
        return Err(refused(refusal));
    }
    let parsed: CallbackBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("body", format!("the callback body is not a callback: {e}"))
    })?;
    settle(&state, &plugin, &task_id, parsed.outcome()?).await
}

/// Ends the task with the callback's outcome and answers the Apex Bridge's 200.
async fn settle(
    state: &AppState,
    plugin: &str,
    task_id: &str,
    outcome: Outcome,
) -> Result<Response, ApiError> {
    let message = match state.tasks.complete_by_callback(task_id, outcome).await {
        Ok(Settled::Completed(t)) => {
            tracing::info!(
                plugin,
                task_id,
                status = t.status.as_str(),
                "plugin callback ended the task"
            );
            format!("task {task_id} {}", t.status.as_str())
        }
        Ok(Settled::AlreadyFinished(t)) => {
            format!(
                "task {task_id} had already ended ({}); nothing changed",
                t.status.as_str()
            )
        }
        Err(e) => return Err(ApiError::from(e)),
    };
    Ok((
        StatusCode::OK,
        Json(json!({ "status": "success", "message": message })),
    )
        .into_response())
}

/// A VCP node's `plugin_callback_forward` (`callbackData` holding `pluginName`, `taskId` and
/// the callback's own fields): ended like a `/plugin-callback` whose credentials are the
/// node's authenticated channel.
///
/// `taskId` is either the apex task id or, as VCP plugins make their own, the plugin's id: then
/// the task is the running task of that plugin on that node whose "accepted" answer (its
/// message, see [`crate::engine::VCP_PENDING_PREFIX`]) holds that id, or the only running
/// task of that plugin on that node. When the data has neither `output` nor `result`, the
/// result is `callbackData` without `pluginName`, `taskId` and `status` (VCP plugins post
/// their fields at the top level). Logs and drops a forward naming no such task.
pub async fn forwarded(state: &AppState, node_id: &str, data: &Value) {
    let plugin = data.get("pluginName").and_then(Value::as_str).unwrap_or("");
    let given = data.get("taskId").and_then(Value::as_str).unwrap_or("");
    let Some(task_id) = forwarded_task(state, node_id, plugin, given).await else {
        tracing::warn!(
            node_id,
            plugin,
            task_id = given,
            "plugin_callback_forward names no task of this plugin on this node; dropped"
        );
        return;
    };
    let mut data = data.clone();
    if let Value::Object(m) = &mut data
        && !m.contains_key("output")
        && !m.contains_key("result")
    {
        let mut rest = m.clone();
        for k in ["pluginName", "taskId", "status", "error"] {
            rest.remove(k);
        }
        m.insert("result".to_owned(), Value::Object(rest));
    }
    let outcome = serde_json::from_value::<CallbackBody>(data)
        .map_err(|e| e.to_string())
        .and_then(|b| b.outcome().map_err(|e| format!("{e:?}")));
    match outcome {
        Ok(o) => {
            if let Err(e) = settle(state, plugin, &task_id, o).await {
                tracing::warn!(node_id, plugin, task_id, error = ?e, "plugin_callback_forward not applied");
            }
        }
        Err(e) => {
            tracing::warn!(node_id, plugin, task_id, error = %e, "plugin_callback_forward unreadable; dropped")
        }
    }
}

/// The apex task a forward means (see [`forwarded`]).
async fn forwarded_task(
    state: &AppState,
    node_id: &str,
    plugin: &str,
    given: &str,
) -> Option<String> {
    if plugin.is_empty() {
        return None;
    }
    let admin = Principal::admin();
    if !given.is_empty()
        && let Ok(Some(t)) = state
            .tasks
            .get(&admin, given, std::time::Duration::ZERO)
            .await
        && t.spec.tool == plugin
        && t.node_id.as_deref() == Some(node_id)
    {
        return Some(t.id);
    }
    let filter = crate::store::TaskFilter {
        status: Some(crate::model::TaskStatus::Running),
        tool: Some(plugin.to_owned()),
        node_id: Some(node_id.to_owned()),
        owner: None,
    };
    let page = state
        .tasks
        .list(&admin, &filter, crate::store::Order::OldestFirst, 1, 1000)
        .await
        .ok()?;
    let pending: Vec<_> = page
        .tasks
        .iter()
        .filter(|t| {
            t.message
                .as_deref()
                .is_some_and(|m| m.starts_with(crate::engine::VCP_PENDING_PREFIX))
        })
        .collect();
    if !given.is_empty()
        && let Some(t) = pending
            .iter()
            .find(|t| t.message.as_deref().is_some_and(|m| m.contains(given)))
    {
        return Some(t.id.clone());
    }
    match pending.as_slice() {
        [only] => Some(only.id.clone()),
        _ => None,
    }
}

fn refused(r: Refusal) -> ApiError {
    ApiError::custom(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        r.code(),
        r.to_string(),
        None,
    )
}
