//! The hub as a Model Context Protocol server (`/mcp`, Streamable HTTP): MCP clients see the
//! cluster's tools and call them as tasks.
//!
//! - **`tools/list`** is the cluster's tool catalogue ([`crate::plugins::tool_list`] over
//!   [`TaskService::node_views`], so every hub's nodes in shared mode): name, description,
//!   `inputSchema` = the tool's parameters.
//! - **`tools/call`** submits one task for the tool with the call's arguments through the task
//!   service, as the calling [`Principal`] (owner, scopes, plugin switches and durability as
//!   for `POST /api/v1/tasks`), waits for it to end (long polls of [`TaskService::get`] until
//!   the task's timeout has passed), and answers its result as `text` content holding the
//!   JSON result (and `structuredContent` when the result is a JSON object). A failed, timed
//!   out or cancelled task answers `isError: true` with the error message. A client that
//!   cancels the request (or disconnects) cancels the task.
//! - **Stateless.** The transport runs without sessions (rmcp's stateless mode: no
//!   `Mcp-Session-Id`, one JSON-RPC request per POST, `initialize` answered but nothing kept),
//!   so consecutive requests of one client may reach different hubs behind a load balancer:
//!   everything a call needs is in the request and the shared task store.
//! - **Authentication** is the API's own: the route sits behind `http::auth::authenticate`
//!   and the `tasks` scope; the principal reaches the handler in the HTTP request parts rmcp
//!   hands over ([`http::request::Parts`] in the request context's extensions).
//!
//! No axum here: `http/mcp.rs` mounts [`service`] on the router.

use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, MetaObject, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::Config;
use crate::model::{Task, TaskSpec, TaskStatus};
use crate::principal::Principal;
use crate::tasks::{MAX_WAIT, TaskService};

/// How long after a task's own timeout a call still waits for its end: the hub's timeout sweep
/// and, in shared mode, the holding hub's commit take a moment to make it `timed_out`.
const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// The `_meta` key of a call result naming the task that ran it (`GET /api/v1/tasks/{id}`).
pub const TASK_ID_META: &str = "apex/taskId";

/// The defaults of the tasks a call submits (those of `POST /api/v1/tasks` without options).
#[derive(Debug, Clone, Copy)]
struct TaskDefaults {
    priority: i32,
    timeout_seconds: f64,
    max_attempts: u32,
}

/// The MCP server handler of one request (cheap to build: handles only).
#[derive(Clone)]
pub struct McpServer {
    tasks: TaskService,
    defaults: TaskDefaults,
    shutdown: watch::Receiver<bool>,
}

impl McpServer {
    /// A handler submitting through `tasks` with `config`'s task defaults; `shutdown` flips
    /// when the hub stops (calls still waiting then answer with the task id to follow).
    pub fn new(tasks: TaskService, config: &Config, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            tasks,
            defaults: TaskDefaults {
                priority: config.default_priority,
                timeout_seconds: config.default_task_timeout_seconds,
                max_attempts: config.default_max_attempts,
            },
            shutdown,
        }
    }

    /// The cluster's tools as MCP tools.
    async fn catalogue(&self) -> Result<Vec<Tool>, ErrorData> {
        let views = self
            .tasks
            .node_views()
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(crate::plugins::tool_list(&views)
            .into_iter()
            .map(|t| Tool::new(t.name, t.description, input_schema(t.parameters)))
            .collect())
    }

    /// Runs `name` with `args` as a task of `caller` and waits for its end.
    async fn run(
        &self,
        caller: &Principal,
        name: String,
        args: Value,
        cancelled: &tokio_util::sync::CancellationToken,
    ) -> Result<CallToolResult, ErrorData> {
        let spec = TaskSpec {
            tool: name,
            args,
            description: Some("MCP tools/call".to_owned()),
            priority: self.defaults.priority,
            timeout_seconds: self.defaults.timeout_seconds,
            max_attempts: self.defaults.max_attempts,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            owner: None,
        };
        let deadline =
            Instant::now() + Duration::from_secs_f64(spec.timeout_seconds.max(0.0)) + TIMEOUT_GRACE;
        let submitted = match self.tasks.submit(caller, vec![spec]).await {
            Ok(mut v) => v.pop().map(|(t, _)| t),
            Err(e) => return Ok(error_result(format!("task not accepted: {e}"), None)),
        };
        let Some(task) = submitted else {
            return Err(ErrorData::internal_error(
                "the task service accepted no task",
                None,
            ));
        };
        let id = task.id.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = tokio::select! {
                got = self.tasks.get(caller, &id, left.min(MAX_WAIT)) => got,
                () = cancelled.cancelled() => {
                    // The client gave up: the task is of no use to anyone now.
                    if let Err(e) = self.tasks.cancel(caller, &id).await {
                        tracing::debug!(task_id = %id, error = %e, "MCP call cancelled; task not cancelled");
                    }
                    return Err(ErrorData::internal_error("request cancelled", None));
                }
            };
            let task = match got {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(error_result(format!("task {id} is gone"), Some(&id))),
                Err(e) => {
                    return Ok(error_result(
                        format!("cannot read task {id}: {e}; follow it at GET /api/v1/tasks/{id}"),
                        Some(&id),
                    ));
                }
            };
            if task.status.is_terminal() {
                return Ok(outcome(&task));
            }
            if *self.shutdown.borrow() {
                return Ok(error_result(
                    format!(
                        "the hub is shutting down; task {id} goes on: follow it at GET \
                         /api/v1/tasks/{id}"
                    ),
                    Some(&id),
                ));
            }
            if Instant::now() >= deadline {
                return Ok(error_result(
                    format!(
                        "task {id} is still {} after its timeout; follow it at GET \
                         /api/v1/tasks/{id}",
                        task.status.as_str()
                    ),
                    Some(&id),
                ));
            }
        }
    }
}

/// A tool's parameters as an MCP `inputSchema`, which must be an object schema with
/// `"type": "object"` (MCP arguments are always an object): a schema without `type` (e.g. the
/// "any value" schema of `echo`) gets it, one of another type or not an object at all becomes
/// the plain `{"type": "object"}`.
fn input_schema(parameters: Value) -> serde_json::Map<String, Value> {
    let object = || serde_json::Map::from_iter([("type".to_owned(), json!("object"))]);
    match parameters {
        Value::Object(mut o) => match o.get("type") {
            Some(t) if t == "object" => o,
            None => {
                o.insert("type".to_owned(), json!("object"));
                o
            }
            Some(_) => object(),
        },
        _ => object(),
    }
}

/// A tool-level error the caller's client shows (`isError: true`), naming the task if any.
fn error_result(message: String, task: Option<&str>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)]).with_meta(task.map(task_meta))
}

fn task_meta(id: &str) -> MetaObject {
    MetaObject(serde_json::Map::from_iter([(
        TASK_ID_META.to_owned(),
        json!(id),
    )]))
}

/// The call result of an ended task.
fn outcome(task: &Task) -> CallToolResult {
    let meta = Some(task_meta(&task.id));
    match task.status {
        TaskStatus::Succeeded => {
            let value = task.result.clone().unwrap_or(Value::Null);
            let text = value.to_string();
            let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
            // `structuredContent` is a JSON object in MCP; other results are text only.
            if value.is_object() {
                r.structured_content = Some(value);
            }
            r.with_meta(meta)
        }
        status => {
            let why = match (&task.error, status) {
                (Some(e), _) => format!("{}: {}", e.code, e.message),
                (None, TaskStatus::Cancelled) => "the task was cancelled".to_owned(),
                (None, TaskStatus::TimedOut) => {
                    format!("the task timed out after {} s", task.spec.timeout_seconds)
                }
                (None, s) => format!("the task ended {}", s.as_str()),
            };
            CallToolResult::error(vec![ContentBlock::text(why)]).with_meta(meta)
        }
    }
}

/// The principal authentication put in the request (none: the route skipped it).
fn principal(ctx: &RequestContext<RoleServer>) -> Result<Principal, ErrorData> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Principal>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("unauthenticated MCP request", None))
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("apex-hub", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "The tools of an apex cluster: each call runs as a task on a node that offers \
                 the tool and answers with its result.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        principal(&ctx)?;
        Ok(ListToolsResult::with_all_items(self.catalogue().await?))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = principal(&ctx)?;
        let name = request.name.into_owned();
        // A tool no online node offers would wait in the queue until its timeout: refuse it
        // now, as MCP asks for an unknown tool.
        if !self.catalogue().await?.iter().any(|t| t.name == name) {
            return Err(ErrorData::invalid_params(
                format!("unknown tool `{name}`: no online node offers it"),
                None,
            ));
        }
        let args = Value::Object(request.arguments.unwrap_or_default());
        self.run(&caller, name, args, &ctx.ct).await.map(Into::into)
    }
}

/// The Streamable HTTP service of `/mcp`, stateless (no sessions), for one request.
pub fn service(
    server: McpServer,
    max_body_bytes: usize,
) -> StreamableHttpService<McpServer, NeverSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_max_request_body_bytes(max_body_bytes)
        // The host check guards unauthenticated local servers against DNS rebinding; this
        // endpoint takes a bearer credential a browser page cannot attach, and the hub is
        // reached under any name its operators give it.
        .disable_allowed_hosts();
    StreamableHttpService::new(
        move || Ok(server.clone()),
        std::sync::Arc::new(NeverSessionManager::default()),
        config,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_schemas_are_object_schemas() {
        let any =
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "AnyValue"});
        let got = input_schema(any);
        assert_eq!(got["type"], "object");
        assert_eq!(got["title"], "AnyValue");
        let typed = json!({"type": "object", "properties": {"ms": {"type": "integer"}}});
        assert_eq!(Value::Object(input_schema(typed.clone())), typed);
        assert_eq!(
            Value::Object(input_schema(json!({"type": "string"}))),
            json!({"type": "object"})
        );
        assert_eq!(
            Value::Object(input_schema(json!(true))),
            json!({"type": "object"})
        );
    }
}
