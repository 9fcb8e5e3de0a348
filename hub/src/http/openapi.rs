//! The hub's OpenAPI 3.1 document, generated from the code: each handler's `#[utoipa::path]`
//! (method, path, parameters, request body, responses), the `ToSchema` types where they are
//! defined, and [`Finish`], which adds what is the same for many operations:
//!
//! - the security schemes `bearer` (an API key or a JWT) and `node_key`;
//! - the alias routes: `/api/admin/nodes…` and `/api/admin/config…` are `/v1/nodes…` and
//!   `/v1/config…`, the node channel's `/abp-distributed-server…` and
//!   `/vcp-distributed-server…` are `/distributed-server…`, the log channel's `/ABPlog…` and
//!   `/VCPlog…` are `/log…`, `/dashboard/` is `/dashboard` ([`ALIASES`]);
//! - a 401 on every operation that takes a key, and a 500 on every operation (the router's
//!   error middleware can answer one anywhere), both with the shared `ErrorBody`.
//!
//! Every 4xx/5xx response refers to the one `ErrorBody` schema ([`super::error`]). The drift
//! test (`hub/tests/openapi.rs`) fails when a route of the router is missing here.
//!
//! The bodies that handlers build with `json!` are described by the schema-only types of
//! [`schemas`], next to this document so that the two are read together.

use std::sync::LazyLock;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, PathItem, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::{Category, ErrorBody, ErrorObject};
pub use schemas::*;

/// Alias routes: `(alias prefix, documented prefix)`. A documented path equal to the prefix
/// or under it (`prefix/…`) is also listed under the alias, with the operation ids suffixed.
pub const ALIASES: &[(&str, &str)] = &[
    ("/api/admin/nodes", "/v1/nodes"),
    ("/api/admin/config", "/v1/config"),
    ("/abp-distributed-server", "/distributed-server"),
    ("/vcp-distributed-server", "/distributed-server"),
    ("/ABPlog", "/log"),
    ("/VCPlog", "/log"),
    ("/dashboard/", "/dashboard"),
];

/// The derive that collects every operation and schema.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "apex hub",
        description = "The hub's HTTP API: tasks, nodes, configuration, system status, events, \
            metrics, health, the OpenAI-compatible LLM gateway, the node and log channel \
            upgrades, the dashboard and these docs.\n\n\
            Every error, on every route (also an unknown route, a wrong method or a body axum \
            refused), is an `ErrorBody`: the OpenAI error object `error{message, type, code, \
            param?}` plus `detail` (the same message), `category` (from the status: 400 and \
            other 4xx `validation`, 401 `auth`, 403 `permission`, 404 `not_found`, 409 \
            `conflict`, 429 `rate_limit` with `retry_after` seconds, 500 `internal`, 502/503/504 \
            `unavailable`) and `success: false`. Internal errors never show their cause; it \
            is logged with the request's `x-request-id`.\n\n\
            Lists take `page` (from 1), `limit` (1 to 1000) and `sort` (`field` or `-field`) \
            and answer `{data, meta{total, page, limit, pages}}`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        super::tasks::create,
        super::tasks::create_batch,
        super::tasks::list,
        super::tasks::get,
        super::tasks::cancel,
        super::tasks::events,
        super::nodes::list,
        super::nodes::get,
        super::nodes::remove,
        super::nodes::tasks,
        super::nodes::dispatch,
        super::nodes::drain,
        super::nodes::undrain,
        super::config::get,
        super::config::put,
        super::config::reload,
        super::system::status,
        super::events::stream,
        super::metrics,
        super::health,
        super::llm::chat_completions,
        super::llm::models,
        super::llm::model,
        super::llm::interrupt,
        super::node_channel::upgrade_bearer,
        super::node_channel::upgrade_path_key,
        super::log_channel::upgrade_bearer,
        super::log_channel::upgrade_path_key,
        super::dashboard::index,
        super::dashboard::asset,
        super::docs::openapi_json,
        super::docs::swagger_index,
        super::docs::swagger_root,
        super::docs::swagger_file,
        super::docs::redoc,
        super::docs::redoc_script,
        super::identity::register,
        super::identity::login,
        super::identity::refresh,
        super::identity::me,
        super::identity::logout,
        super::keys::create,
        super::keys::list,
        super::keys::remove,
        super::probes::livez,
        super::probes::readyz,
        super::plugins::list,
        super::plugins::enable,
        super::plugins::disable,
        super::plugins::list_tools,
        super::plugins::get_tool,
        super::plugins::callback,
        super::chat::chat,
        super::chat::chat_stream,
        super::chat::history,
        super::chat::delete_history,
        super::chat::context_stats,
        super::chat::clear_context,
        super::chat::sessions,
        super::chat::interrupt,
        super::mcp::serve,
        super::schedules::create,
        super::schedules::list,
        super::schedules::get,
        super::schedules::remove,
        super::agents::list,
        super::agents::defaults,
        super::agents::init_defaults,
        super::agents::create,
        super::agents::get,
        super::agents::update,
        super::agents::remove,
        super::agents::clone,
        super::agents::test,
        super::client_ws::upgrade,
        super::embeddings::create,
        super::memory::query,
        super::memory::save,
        super::memory::remove,
        super::research::create,
        super::research::list,
        super::research::get,
        super::research::update,
        super::research::remove,
        super::research::execute,
        super::research::tasks,
        super::research::executions,
        super::research::memory,
        super::research::memory_content,
        super::research::query,
    ),
    components(schemas(ErrorBody, ErrorObject, Category, super::ListMeta)),
    modifiers(&Finish),
    tags(
        (name = "tasks", description = "Submit, read, list, cancel and follow tasks"),
        (name = "chat", description = "Conversations: sessions with durable history and context, for the nex and Kiki clients"),
        (name = "plugins", description = "The cluster's plugins and tools, and asynchronous plugins' signed callbacks"),
        (name = "nodes", description = "The node registry (also under `/api/admin/nodes`)"),
        (name = "config", description = "The configuration in force (also under `/api/admin/config`)"),
        (name = "system", description = "Status, health and metrics"),
        (name = "events", description = "One SSE stream of node and task changes"),
        (name = "llm", description = "The OpenAI-compatible LLM gateway"),
        (name = "channels", description = "WebSocket upgrades of the node channel and the log channel"),
        (name = "dashboard", description = "The operator dashboard (public page; its data calls take a key)"),
        (name = "docs", description = "This document, Swagger UI and ReDoc, served by the hub"),
        (name = "auth", description = "Users: register, log in, refresh and log out (JWT access tokens, rotated refresh tokens)"),
        (name = "keys", description = "Managed API keys with scopes (the `admin` scope)"),
        (name = "schedules", description = "Tasks and notifications at cron times or once, fired exactly once across hubs"),
        (name = "agents", description = "Agent profiles of the research system: 14 default templates, the caller's own profiles, test runs"),
        (name = "mcp", description = "The Model Context Protocol server (Streamable HTTP, stateless): the cluster's tools for MCP clients"),
        (name = "research", description = "Research sessions: a task decomposed into a dependency graph of agent tasks run on nodes, with SSE progress and memory layers (the NEXEN research platform's API)"),
        (name = "memory", description = "Memory search over the caller's conversations and saved memories (BM25, hybrid with embeddings)"),
    )
)]
struct ApiDoc;

/// The document as served at `/openapi.json`.
pub fn document() -> &'static Document {
    static DOC: LazyLock<Document> = LazyLock::new(ApiDoc::openapi);
    &DOC
}

/// [`document`] as JSON, serialized once.
pub fn json() -> &'static str {
    static JSON: LazyLock<String> =
        LazyLock::new(|| serde_json::to_string(document()).unwrap_or_else(|_| "{}".to_owned()));
    &JSON
}

/// The operations of a path item, by method name.
fn operations_mut(
    item: &mut PathItem,
) -> [(&'static str, &mut Option<utoipa::openapi::path::Operation>); 8] {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
}

/// The path `path` has under `alias` when `path` is `canonical` or under it (`canonical/…`);
/// an alias ending in `/` stands for `canonical` alone.
fn alias_of(path: &str, alias: &str, canonical: &str) -> Option<String> {
    if path == canonical {
        return Some(alias.to_owned());
    }
    if alias.ends_with('/') {
        return None;
    }
    let rest = path.strip_prefix(canonical)?;
    rest.starts_with('/').then(|| format!("{alias}{rest}"))
}

/// A response whose body is the shared `ErrorBody`.
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// Adds what many operations share (see the module doc).
struct Finish;

impl Modify for Finish {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`api_keys`) or a JWT, sent as `Authorization: Bearer <token>`",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "node_key",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A node key (`node_keys`), as `Authorization: Bearer <key>` or as the \
                         last path segment `VCP_Key=<key>`",
                    ))
                    .build(),
            ),
        );
        for item in doc.paths.paths.values_mut() {
            for (_, op) in operations_mut(item) {
                let Some(op) = op else { continue };
                let keyed = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let r = &mut op.responses.responses;
                if keyed && !r.contains_key("401") {
                    r.insert(
                        "401".to_owned(),
                        error_response("Missing or wrong key (`invalid_api_key`)"),
                    );
                }
                r.entry("500".to_owned()).or_insert_with(|| {
                    error_response(
                        "Internal error: a generic message; the cause is logged with the \
                         request's `x-request-id`",
                    )
                });
            }
        }
        let mut added = Vec::new();
        for (alias, canonical) in ALIASES {
            for (path, item) in &doc.paths.paths {
                let Some(alias_path) = alias_of(path, alias, canonical) else {
                    continue;
                };
                let mut item = item.clone();
                let suffix: String = alias
                    .trim_end_matches('/')
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                for (_, op) in operations_mut(&mut item) {
                    let Some(op) = op else { continue };
                    if let Some(id) = &mut op.operation_id {
                        id.push_str(&suffix);
                    }
                    let note = format!("Alias of `{path}`.");
                    op.description = Some(match op.description.take() {
                        Some(d) => format!("{note}\n\n{d}"),
                        None => note,
                    });
                }
                added.push((alias_path, item));
            }
        }
        for (path, item) in added {
            doc.paths.paths.entry(path).or_insert(item);
        }
    }
}

/// Schema-only types: the bodies handlers write with `json!`, as clients receive them. None is
/// ever built; each mirrors one handler's `json!` (named in its doc).
#[allow(dead_code)]
pub mod schemas {
    use serde_json::Value;
    use utoipa::ToSchema;

    use crate::http::ListMeta;
    use crate::model::{NodeView, TaskView};

    /// `GET /api/v1/tasks`, `GET /v1/nodes/{id}/tasks`: one page of tasks.
    #[derive(ToSchema)]
    pub struct TaskList {
        /// The tasks of the page, in the order asked for.
        pub data: Vec<TaskView<'static>>,
        /// Totals and the page.
        pub meta: ListMeta,
    }

    /// `POST /api/v1/tasks/batch`: every task, in request order.
    #[derive(ToSchema)]
    pub struct TaskBatch {
        /// The tasks.
        pub data: Vec<TaskView<'static>>,
    }

    /// `GET /v1/nodes`: one page of nodes (in shared mode each also has `hub`, the id of the
    /// hub it is connected to).
    #[derive(ToSchema)]
    pub struct NodeList {
        /// The nodes of the page.
        pub data: Vec<NodeView>,
        /// Totals and the page.
        pub meta: ListMeta,
    }

    /// `POST /api/v1/auth/register`: the first token pair and the user.
    #[derive(ToSchema)]
    pub struct Registered {
        /// The JWT for `Authorization: Bearer`.
        pub access_token: String,
        /// The refresh token (used once).
        pub refresh_token: String,
        /// Always `bearer`.
        pub token_type: String,
        /// Seconds the access token lives (1800 by default).
        pub expires_in: u64,
        /// The new account.
        pub user: crate::identity::UserView,
    }

    /// `POST /api/v1/auth/logout`.
    #[derive(ToSchema)]
    pub struct Message {
        /// What happened.
        pub message: String,
    }

    /// `GET /v1/keys`: one page of managed keys (never a secret).
    #[derive(ToSchema)]
    pub struct KeyList {
        /// The keys of the page.
        pub data: Vec<crate::identity::KeyView>,
        /// Totals and the page.
        pub meta: ListMeta,
    }

    /// `DELETE /v1/keys/{id}`.
    #[derive(ToSchema)]
    pub struct KeyDeleted {
        /// The key id.
        pub id: String,
        /// Always `true`.
        pub deleted: bool,
    }

    /// `DELETE /v1/nodes/{id}`.
    #[derive(ToSchema)]
    pub struct NodeRemoved {
        /// The node id.
        pub id: String,
        /// Always `true`.
        pub removed: bool,
    }

    /// `POST /v1/chat/completions`: an OpenAI chat completion request. Other OpenAI fields
    /// (`temperature`, `tools`, `tool_choice`, …) are passed to the provider as sent.
    #[derive(ToSchema)]
    #[schema(example = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}))]
    pub struct ChatCompletionRequest {
        /// A model of `GET /v1/models` (`provider/model`, an alias, or `llm.chat@<model>`
        /// served by a node).
        pub model: String,
        /// The conversation, OpenAI message objects.
        #[schema(value_type = Vec<Object>)]
        pub messages: Vec<Value>,
        /// Stream Server-Sent Events.
        pub stream: Option<bool>,
        /// `{"include_usage": true}` for a usage chunk at the end of a stream.
        #[schema(value_type = Option<Object>)]
        pub stream_options: Option<Value>,
        /// Only 1.
        pub n: Option<u32>,
        /// Output token limit.
        pub max_tokens: Option<u32>,
        /// The id `POST /v1/interrupt` takes (default: the `x-request-id`).
        #[schema(rename = "requestId")]
        pub request_id: Option<String>,
        /// Synonym of `requestId`.
        #[schema(rename = "messageId")]
        pub message_id: Option<String>,
        /// Cluster tools the model may call, run by the hub as tasks on nodes: `"all"`, or
        /// tool names of `GET /api/v1/tools`. An unknown name is 400 on `server_tools`; the
        /// credential needs the `tasks` scope. See the README, "Server-side tools".
        #[schema(value_type = Option<Object>, example = json!(["sha256"]))]
        pub server_tools: Option<Value>,
    }

    /// One entry of `apex_tool_runs`: a server-tool call the hub handled.
    #[derive(ToSchema)]
    pub struct ToolRun {
        /// The task that ran it (`GET /api/v1/tasks/{id}`); `null` when none was made.
        pub task_id: Option<String>,
        /// The tool.
        pub tool: String,
        /// The `id` of the model's call.
        pub tool_call_id: String,
        /// From submitting the task to having its result, milliseconds (fractional).
        pub duration_ms: f64,
        /// `succeeded`, `failed`, `timed_out`, `cancelled`, `refused`, `invalid_arguments`
        /// or `skipped` (not run).
        pub status: String,
    }

    /// A `chat.completion` object (OpenAI's shape).
    #[derive(ToSchema)]
    pub struct ChatCompletion {
        /// `chatcmpl-<request id>`.
        pub id: String,
        /// `chat.completion`.
        pub object: String,
        /// Unix seconds.
        pub created: u64,
        /// The model that answered.
        pub model: String,
        /// One choice: `{index, message{role, content, tool_calls?}, logprobs, finish_reason}`.
        #[schema(value_type = Vec<Object>)]
        pub choices: Vec<Value>,
        /// `{prompt_tokens, completion_tokens, total_tokens}`.
        #[schema(value_type = Object)]
        pub usage: Value,
        /// With `server_tools`: the calls the hub handled, in order (in a stream: on its
        /// last chunk).
        pub apex_tool_runs: Option<Vec<ToolRun>>,
        /// With `server_tools`: `true` when the model still called server tools after
        /// `max_tool_rounds` rounds (its last answer is returned without those calls).
        pub apex_tool_rounds_exhausted: Option<bool>,
    }

    /// `GET /v1/models`.
    #[derive(ToSchema)]
    pub struct ModelList {
        /// `list`.
        pub object: String,
        /// The models.
        pub data: Vec<Model>,
    }

    /// One model of `GET /v1/models`.
    #[derive(ToSchema)]
    pub struct Model {
        /// The model id to send as `model`.
        pub id: String,
        /// `model`.
        pub object: String,
        /// Unix seconds.
        pub created: u64,
        /// The provider, or `node:<id>` for a node-hosted model.
        pub owned_by: String,
    }

    /// `POST /v1/interrupt`.
    #[derive(ToSchema)]
    pub struct InterruptRequest {
        /// The `requestId` (or `x-request-id`) of the call to interrupt.
        #[schema(rename = "requestId")]
        pub request_id: Option<String>,
        /// Synonym of `requestId`.
        #[schema(rename = "messageId")]
        pub message_id: Option<String>,
    }

    /// `POST /v1/interrupt`: the call was found and interrupted.
    #[derive(ToSchema)]
    pub struct Interrupted {
        /// `true`.
        pub success: bool,
        /// What happened.
        pub message: String,
        /// The id sent.
        #[schema(rename = "requestId")]
        pub request_id: String,
        /// `true`.
        pub interrupted: bool,
    }

    /// `GET /api/v1/system/status`.
    #[derive(ToSchema)]
    pub struct SystemStatus {
        /// Percent of the machine's CPU (0 to 100), `null` until the first sample.
        pub cpu_usage: Option<f64>,
        /// Percent of the machine's memory.
        pub memory_usage: Option<f64>,
        /// Bytes of memory in use.
        pub memory_used_bytes: Option<u64>,
        /// Bytes of memory in all.
        pub memory_total_bytes: Option<u64>,
        /// Percent of the GPU, `null` without one.
        pub gpu_usage: Option<f64>,
        /// Open node-channel and log-channel WebSockets and `/v1/events` streams.
        pub active_sessions: u64,
        /// `{node, log, events}`: the sessions by kind.
        #[schema(value_type = Object)]
        pub sessions: Value,
        /// `{online, draining, offline, total}`.
        #[schema(value_type = Object)]
        pub nodes: Value,
        /// Tasks by state and `total`.
        #[schema(value_type = Object)]
        pub tasks: Value,
        /// Tasks waiting for a node.
        pub queue_depth: u64,
        /// Assignments per second over the last minute.
        pub dispatch_rate: f64,
        /// Seconds since the hub started.
        pub uptime_seconds: f64,
        /// The hub's version.
        pub version: String,
    }

    /// `GET /health` (200; a 503 is an `ErrorBody` carrying these fields too).
    #[derive(ToSchema)]
    pub struct Health {
        /// `ok`, or `degraded` while the store refuses writes.
        pub status: String,
        /// `ok` or `unavailable`.
        pub store: String,
        /// The hub's version.
        pub version: String,
        /// Seconds since the hub started.
        pub uptime_seconds: f64,
        /// `{online, total}`.
        #[schema(value_type = Object)]
        pub nodes: Value,
        /// Tasks by state and `total`.
        #[schema(value_type = Object)]
        pub tasks: Value,
        /// Tasks waiting for a node.
        pub queue_depth: u64,
        /// `{frames_in, frames_rejected, results_ignored, migrations, frames_shed}`.
        #[schema(value_type = Object)]
        pub node_channel: Value,
    }

    /// `GET /v1/config`.
    #[derive(ToSchema)]
    pub struct ConfigView {
        /// Every key in force; `api_keys` and `node_keys` entries read `<redacted>`.
        #[schema(value_type = Object)]
        pub config: Value,
        /// The keys `PUT /v1/config` may change.
        pub hot_reloadable: Vec<String>,
    }

    /// `PUT /v1/config`, `POST /v1/config/reload`.
    #[derive(ToSchema)]
    pub struct ConfigChanged {
        /// The keys that changed.
        pub changed: Vec<String>,
        /// Every key in force now (secrets redacted).
        #[schema(value_type = Object)]
        pub config: Value,
        /// The keys `PUT /v1/config` may change.
        pub hot_reloadable: Vec<String>,
    }
}
