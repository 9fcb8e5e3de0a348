//! The HTTP surface: router, request ids, `/health`; key checks in [`auth`], the node channel's
//! upgrade and sessions in [`node_channel`].
//!
//! Only this module tree imports axum (and `crate::run`, which serves the router).

mod agents;
pub mod auth;
mod chat;
pub mod client_ws;
mod config;
pub mod dashboard;
pub mod docs;
mod embeddings;
pub mod error;
pub mod events;
pub mod identity;
pub mod keys;
mod llm;
pub mod log_channel;
mod mcp;
mod memory;
pub mod node_channel;
mod nodes;
pub mod openapi;
mod plugins;
pub mod probes;
mod rate_limit;
mod research;
mod schedules;
mod system;
mod tasks;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::engine::Cluster;
use crate::model::TaskStatus;
use crate::ops::Ops;
use crate::principal::Scope;
pub use error::ApiError;
use error::ErrorBody;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The engine (nodes; tasks go through `tasks`).
    pub cluster: Cluster,
    /// The one front door for tasks (submit, read, list, cancel, events) in either mode.
    pub tasks: crate::tasks::TaskService,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The LLM gateway (chat completions, models, interrupts; nodes' `llm_request`).
    pub llm: Arc<crate::llm::GatewayHandle>,
    /// Nodes' `llm_request`s through the gateway, with per-node quotas.
    pub node_llm: Arc<crate::llm::node_proxy::NodeProxy>,
    /// Flips to true when the hub shuts down (ends SSE streams).
    pub shutdown: watch::Receiver<bool>,
    /// Live config, log channel buffer, machine sampler (the operator surface).
    pub ops: Ops,
    /// Shared mode's Redis handle (`hub_mode = "shared"`), `None` otherwise.
    pub shared: Option<Arc<crate::shared::SharedRedis>>,
    /// Records other than tasks (users, keys, revocations), in the tasks' backend.
    pub records: crate::records::RecordStore,
    /// Users, tokens, managed keys and revocations (over `records`).
    pub identity: crate::identity::Identity,
    /// The rate limits of the API routes (in memory, or in Redis in shared mode).
    pub limits: Arc<crate::limits::Limiter>,
    /// Plugin switches and the callback signer.
    pub plugins: crate::plugins::Plugins,
    /// Conversations (`/api/v1/chat…`).
    pub chat: crate::chat::ChatService,
    /// The notifications bus of client WebSockets (`GET /ws`).
    pub notifier: crate::notify::Notifier,
    /// Schedules (`/api/v1/schedules`), over `records`, firing through `tasks`.
    pub schedules: crate::schedules::Schedules,
    /// Research sessions (`/api/research/sessions…`), their runs driven through `tasks`.
    pub research: crate::research::Research,
    /// Memory search (`/api/v1/memory…`).
    pub memory: crate::memory::Memory,
    /// Agent profiles (`/api/agents/profiles…`), over `records`, run through `tasks`.
    pub agents: crate::agents::Agents,
}

impl AppState {
    /// State for a validated `config`, with operator handles whose config reload is refused
    /// (tests; `crate::run` builds its own with the startup flags).
    ///
    /// `config` must be validated; an LLM section that still fails to build (logged) leaves the
    /// gateway without providers.
    pub fn new(cluster: Cluster, config: Config, shutdown: watch::Receiver<bool>) -> Self {
        let config = Arc::new(config);
        let gateway = crate::llm::Gateway::from_config(&config.llm).unwrap_or_else(|e| {
            tracing::error!(error = %e, "LLM gateway not configured");
            crate::llm::Gateway::empty()
        });
        let gateway = gateway.with_backend(Arc::new(crate::llm::node_models::NodeModels::new(
            cluster.clone(),
        )));
        let llm = Arc::new(crate::llm::GatewayHandle::new(gateway));
        let node_llm = Arc::new(crate::llm::node_proxy::NodeProxy::new(
            config.node_llm.clone(),
            llm.clone(),
        ));
        let records = crate::records::RecordStore::memory();
        let identity = crate::identity::Identity::ephemeral(records.clone(), &config.auth);
        let limits = Arc::new(crate::limits::Limiter::memory(config.rate_limits.clone()));
        let plugins = crate::plugins::Plugins::ephemeral(records.clone(), "http://127.0.0.1");
        let tasks = crate::tasks::TaskService::local(cluster.clone(), shutdown.clone())
            .with_plugins(plugins.clone());
        let memory = crate::memory::Memory::ram(records.clone(), llm.clone(), &config);
        memory.spawn(shutdown.clone());
        let chat = crate::chat::ChatService::new(
            records.clone(),
            llm.clone(),
            tasks.clone(),
            plugins.clone(),
            config.clone(),
            memory.chat_hooks(),
        );
        let notifier = crate::notify::Notifier::new(config.ws_queue_len, None);
        let schedules =
            crate::schedules::Schedules::new(records.clone(), tasks.clone(), notifier.clone());
        let agents =
            crate::agents::Agents::new(records.clone(), tasks.clone(), llm.clone(), config.clone());
        let research = crate::research::Research::new(
            records.clone(),
            tasks.clone(),
            Arc::new(agents.clone()),
            Some(memory.clone()),
            config.research.clone(),
            shutdown.clone(),
        );
        Self {
            research,
            agents,
            tasks,
            chat,
            notifier,
            schedules,
            memory,
            plugins,
            ops: Ops::new(config.clone(), None),
            llm,
            node_llm,
            cluster,
            config,
            shutdown,
            shared: None,
            records,
            identity,
            limits,
        }
    }
}

/// Health and store state.
///
/// `GET /health` (no key): 200 with `status: "ok"` and `store: "ok"`; 503 with
/// `status: "degraded"` and `store: "unavailable"` while the task store would refuse
/// submissions (they answer 503 `store_unavailable`). Both carry the version, uptime, node and
/// task counts, queue depth and node-channel counters; the 503 is also an error body
/// (`store_unavailable`, category `unavailable`) beside them.
#[utoipa::path(
    get,
    path = "/health",
    tag = "system",
    operation_id = "health",
    responses(
        (status = 200, description = "`status: ok`: the store accepts writes", body = openapi::Health),
        (status = 503, description = "`status: degraded`: submissions would answer 503 `store_unavailable`. The error shape (`error.code` `store_unavailable`) with every field of the health body beside it", body = ErrorBody),
    )
)]
async fn health(State(state): State<AppState>) -> Response {
    let store_ok = state.tasks.store_available().await;
    let h = state.cluster.health();
    let mut tasks = serde_json::Map::new();
    for s in TaskStatus::ALL {
        tasks.insert(s.as_str().to_owned(), json!(h.tasks[s.index()]));
    }
    tasks.insert("total".to_owned(), json!(h.tasks.iter().sum::<u64>()));
    let stats = state.cluster.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (status, store) = if store_ok {
        ("ok", "ok")
    } else {
        ("degraded", "unavailable")
    };
    let body = json!({
        "status": status,
        "store": store,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.cluster.uptime().as_secs_f64(),
        "nodes": {"online": h.nodes_online, "total": h.nodes_total},
        "tasks": tasks,
        "queue_depth": h.queue_depth,
        "node_channel": {
            "frames_in": load(&stats.frames_in),
            "frames_rejected": load(&stats.frames_rejected),
            "results_ignored": load(&stats.results_ignored),
            "migrations": load(&stats.migrations),
            "frames_shed": load(&stats.frames_shed),
        },
    });
    if store_ok {
        return axum::Json(body).into_response();
    }
    let mut e = ApiError::custom(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "store_unavailable",
        "the task store is unavailable: submissions answer 503 until it is back",
        None,
    );
    if let serde_json::Value::Object(fields) = body {
        for (k, v) in fields {
            e = e.with_field(&k, v);
        }
    }
    e.into_response()
}

/// `page` and `limit` of a list route, validated: pages count from 1, `limit` is 1 to 1000.
#[derive(Debug, Clone, Copy)]
pub struct Pagination {
    /// Page number, from 1.
    pub page: usize,
    /// Items per page.
    pub limit: usize,
}

impl Pagination {
    /// Validates query values, with `default_limit` when none is given.
    ///
    /// # Errors
    /// 400 naming `page` or `limit`.
    pub fn new(
        page: Option<usize>,
        limit: Option<usize>,
        default_limit: usize,
    ) -> Result<Self, ApiError> {
        let page = page.unwrap_or(1);
        let limit = limit.unwrap_or(default_limit);
        if page == 0 {
            return Err(ApiError::invalid("page", "`page` counts from 1"));
        }
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("limit", "`limit` must be 1 to 1000"));
        }
        Ok(Self { page, limit })
    }

    /// Items to skip before this page.
    pub fn offset(&self) -> usize {
        (self.page - 1).saturating_mul(self.limit)
    }

    /// The list body `{"data": [...], "meta": {"total", "page", "limit", "pages"}}`.
    pub fn body<T: serde::Serialize>(
        &self,
        data: &[T],
        total: usize,
    ) -> axum::Json<serde_json::Value> {
        axum::Json(json!({
            "data": data,
            "meta": ListMeta {
                total,
                page: self.page,
                limit: self.limit,
                pages: total.div_ceil(self.limit),
            }
        }))
    }
}

/// The `meta` of every list body.
#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct ListMeta {
    /// Items matching the filters, over all pages.
    pub total: usize,
    /// This page, from 1.
    pub page: usize,
    /// Items per page.
    pub limit: usize,
    /// Pages in all (`total / limit`, rounded up).
    pub pages: usize,
}

/// The `sort` of a list route: one field the route sorts by, ascending (`sort=created_at`) or
/// descending with a leading `-` (`sort=-created_at`). Ties keep the route's natural order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sort {
    /// The field, one of the route's.
    pub field: &'static str,
    /// Whether the order is descending (`-field`).
    pub descending: bool,
}

impl Sort {
    /// Newest first: the default of task lists.
    pub const NEWEST_FIRST: Sort = Sort {
        field: "created_at",
        descending: true,
    };

    /// Parses `sort` against the `fields` a route sorts by; `default` when absent or empty.
    ///
    /// # Errors
    /// 400 naming `sort` for a field the route does not sort by.
    pub fn parse(
        value: Option<&str>,
        fields: &[&'static str],
        default: Sort,
    ) -> Result<Self, ApiError> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(default);
        };
        let (name, descending) = match v.strip_prefix('-') {
            Some(name) => (name, true),
            None => (v, false),
        };
        fields
            .iter()
            .find(|f| **f == name)
            .map(|field| Sort { field, descending })
            .ok_or_else(|| {
                let allowed: Vec<String> = fields
                    .iter()
                    .flat_map(|f| [(*f).to_owned(), format!("-{f}")])
                    .collect();
                ApiError::invalid(
                    "sort",
                    format!("`sort` must be one of {}", allowed.join(", ")),
                )
            })
    }

    /// The store order of a sort by `created_at`.
    pub fn order(self) -> crate::store::Order {
        if self.descending {
            crate::store::Order::NewestFirst
        } else {
            crate::store::Order::OldestFirst
        }
    }
}

/// Counts every request in `apex_http_requests_total` by method, matched route pattern (never
/// the raw path, so no ids) and status.
async fn track_http(req: Request, next: Next) -> Response {
    // `MatchedPath` is an `Arc<str>` and `Method` a small enum: cloning them does not allocate.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = crate::metrics::get();
    m.http_requests
        .with_label_values(&[method.as_str(), route, resp.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[method.as_str(), route])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// The span of one HTTP request: `HTTP {method} {route}` at INFO (so an `info` log filter
/// exports it as an OpenTelemetry server span), continuing an incoming `traceparent` header.
/// None when neither traces nor debug logs would use it ([`crate::telemetry::request_spans`]).
fn request_span(req: &Request) -> tracing::Span {
    if !crate::telemetry::request_spans() {
        return tracing::Span::none();
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("HTTP {} {route}", req.method()),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = %route,
        // Never a key: the node and log channels take one as a path segment.
        url.path = %auth::redact_path(req.uri().path()),
    );
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    crate::telemetry::continue_trace(&span, tp);
    span
}

/// Prometheus metrics.
///
/// `GET /metrics`: the Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    operation_id = "metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4 (also on `metrics_listen` without a key, where configured)", content_type = "text/plain; version=0.0.4", body = String)),
    security(("bearer" = []))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match crate::metrics::render(&state.cluster.gauges()) {
        Ok(body) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// The router of the optional `metrics_listen` listener: only `GET /metrics`, no API key.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn(error::shape))
        .with_state(state)
}

/// 404 naming the path (a key-in-path segment redacted by [`ApiError::no_route`]).
async fn no_route(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

/// `route` behind the scope check: only principals with `scope` reach it (403
/// `missing_scope` otherwise). Every API route is wrapped in one of these or listed in
/// [`router`] as needing no scope.
fn needs(scope: Scope, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.route_layer(middleware::from_fn_with_state(scope, auth::require_scope))
}

/// The hub's whole HTTP router (API routes, `/health`, and the node channel upgrades).
///
/// Every API route is authenticated ([`auth::authenticate`]) and declares its scope here:
///
/// | routes | scope |
/// | --- | --- |
/// | `/api/v1/tasks…`, `POST /v1/nodes/{id}/tasks` | `tasks` |
/// | `/v1/chat/completions`, `/v1/models…`, `/v1/interrupt`, `/v1/embeddings`, `/api/v1/chat…`, `/api/v1/memory…`, `GET /ws` | `chat` |
/// | `/api/v1/schedules…` | `tasks` |
/// | `/api/research/sessions…`, `POST /api/v2/query` | `agents` |
/// | `/api/agents/profiles…` | `agents` |
/// | `GET /v1/nodes…` (and `/api/admin/nodes…`), `/v1/events`, `/api/v1/system/status` | `nodes:read` |
/// | node `DELETE`, `drain`, `undrain` | `nodes:write` |
/// | `/v1/config…` (and `/api/admin/config…`) | `config` |
/// | `/v1/keys…`, `POST /api/v1/plugins/{name}/enable\|disable` | `admin` |
/// | `GET /api/v1/plugins`, `/api/v1/tools…`, `POST /mcp` | `tasks` |
/// | `/metrics`, `/api/v1/auth/me`, `/api/v1/auth/logout` | none (any credential) |
///
/// `/health`, `POST /api/v1/auth/{register,login,refresh}`, `POST /plugin-callback/…` (its
/// per-task token and signature), the node and log channels and the
/// dashboard assets take no bearer credential.
pub fn router(state: AppState) -> Router {
    use Scope::{Admin, Agents, Chat, Config, NodesRead, NodesWrite, Tasks};
    let mut api = Router::new()
        .route(
            "/api/v1/tasks",
            needs(Tasks, post(tasks::create).get(tasks::list)),
        )
        .route(
            "/api/v1/tasks/batch",
            needs(Tasks, post(tasks::create_batch)),
        )
        .route("/api/v1/tasks/{id}", needs(Tasks, get(tasks::get)))
        .route(
            "/api/v1/tasks/{id}/cancel",
            needs(Tasks, post(tasks::cancel)),
        )
        .route(
            "/api/v1/tasks/{id}/events",
            needs(Tasks, get(tasks::events)),
        )
        .route(
            "/api/v1/schedules",
            needs(Tasks, post(schedules::create).get(schedules::list)),
        )
        .route(
            "/api/v1/schedules/{id}",
            needs(Tasks, get(schedules::get).delete(schedules::remove)),
        )
        .route(
            "/api/research/sessions",
            needs(Agents, post(research::create).get(research::list)),
        )
        .route(
            "/api/research/sessions/{id}",
            needs(
                Agents,
                get(research::get)
                    .put(research::update)
                    .delete(research::remove),
            ),
        )
        .route(
            "/api/research/sessions/{id}/execute",
            needs(Agents, post(research::execute)),
        )
        .route(
            "/api/research/sessions/{id}/tasks",
            needs(Agents, get(research::tasks)),
        )
        .route(
            "/api/research/sessions/{id}/executions",
            needs(Agents, get(research::executions)),
        )
        .route(
            "/api/research/sessions/{id}/memory",
            needs(Agents, get(research::memory)),
        )
        .route(
            "/api/research/sessions/{id}/memory/content",
            needs(Agents, get(research::memory_content)),
        )
        .route("/api/v2/query", needs(Agents, post(research::query)))
        .route(
            "/api/agents/profiles",
            needs(Agents, get(agents::list).post(agents::create)),
        )
        .route(
            "/api/agents/profiles/defaults",
            needs(Agents, get(agents::defaults)),
        )
        .route(
            "/api/agents/profiles/init-defaults",
            needs(Agents, post(agents::init_defaults)),
        )
        .route(
            "/api/agents/profiles/{id}",
            needs(
                Agents,
                get(agents::get).put(agents::update).delete(agents::remove),
            ),
        )
        .route(
            "/api/agents/profiles/{id}/clone",
            needs(Agents, post(agents::clone)),
        )
        .route(
            "/api/agents/profiles/{id}/test",
            needs(Agents, post(agents::test)),
        )
        .route("/ws", needs(Chat, get(client_ws::upgrade)))
        .route(
            "/api/v1/system/status",
            needs(NodesRead, get(system::status)),
        )
        .route("/v1/events", needs(NodesRead, get(events::stream)))
        .route("/metrics", get(metrics))
        .route(
            "/v1/chat/completions",
            needs(Chat, post(llm::chat_completions)),
        )
        .route("/v1/models", needs(Chat, get(llm::models)))
        .route("/v1/models/{*id}", needs(Chat, get(llm::model)))
        .route("/v1/interrupt", needs(Chat, post(llm::interrupt)))
        .route("/v1/keys", needs(Admin, post(keys::create).get(keys::list)))
        .route("/v1/keys/{id}", needs(Admin, delete(keys::remove)))
        .route("/api/v1/plugins", needs(Tasks, get(plugins::list)))
        .route(
            "/api/v1/plugins/{name}/enable",
            needs(Admin, post(plugins::enable)),
        )
        .route(
            "/api/v1/plugins/{name}/disable",
            needs(Admin, post(plugins::disable)),
        )
        .route("/api/v1/tools", needs(Tasks, get(plugins::list_tools)))
        .route("/api/v1/tools/{name}", needs(Tasks, get(plugins::get_tool)))
        .route("/mcp", needs(Tasks, post(mcp::serve)))
        .route("/api/v1/chat", needs(Chat, post(chat::chat)))
        .route("/api/v1/chat/stream", needs(Chat, post(chat::chat_stream)))
        .route("/api/v1/chat/sessions", needs(Chat, get(chat::sessions)))
        .route("/api/v1/chat/interrupt", needs(Chat, post(chat::interrupt)))
        .route(
            "/api/v1/chat/history/{session_id}",
            needs(Chat, get(chat::history).delete(chat::delete_history)),
        )
        .route(
            "/api/v1/chat/context/{session_id}/stats",
            needs(Chat, get(chat::context_stats)),
        )
        .route(
            "/api/v1/chat/context/{session_id}",
            needs(Chat, delete(chat::clear_context)),
        )
        .merge(identity::user_routes())
        .merge(memory::routes());
    // Literal paths, one per line (the OpenAPI drift test reads them from this source):
    // `/api/admin/nodes` and `/api/admin/config` are aliases of `/v1/nodes` and `/v1/config`.
    api = api
        .route("/v1/nodes", needs(NodesRead, get(nodes::list)))
        .route(
            "/v1/nodes/{id}",
            needs(NodesRead, get(nodes::get)).merge(needs(NodesWrite, delete(nodes::remove))),
        )
        .route(
            "/v1/nodes/{id}/tasks",
            needs(NodesRead, get(nodes::tasks)).merge(needs(Tasks, post(nodes::dispatch))),
        )
        .route(
            "/v1/nodes/{id}/drain",
            needs(NodesWrite, post(nodes::drain)),
        )
        .route(
            "/v1/nodes/{id}/undrain",
            needs(NodesWrite, post(nodes::undrain)),
        )
        .route("/api/admin/nodes", needs(NodesRead, get(nodes::list)))
        .route(
            "/api/admin/nodes/{id}",
            needs(NodesRead, get(nodes::get)).merge(needs(NodesWrite, delete(nodes::remove))),
        )
        .route(
            "/api/admin/nodes/{id}/tasks",
            needs(NodesRead, get(nodes::tasks)).merge(needs(Tasks, post(nodes::dispatch))),
        )
        .route(
            "/api/admin/nodes/{id}/drain",
            needs(NodesWrite, post(nodes::drain)),
        )
        .route(
            "/api/admin/nodes/{id}/undrain",
            needs(NodesWrite, post(nodes::undrain)),
        )
        .route(
            "/v1/config",
            needs(Config, get(config::get).put(config::put)),
        )
        .route("/v1/config/reload", needs(Config, post(config::reload)))
        .route(
            "/api/admin/config",
            needs(Config, get(config::get).put(config::put)),
        )
        .route(
            "/api/admin/config/reload",
            needs(Config, post(config::reload)),
        );
    // Layers run outermost last-added first: authentication, then the rate limits (which
    // read the principal authentication found).
    let api = api
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::limit,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(identity::public_routes())
        .route("/livez", get(probes::livez))
        .route("/readyz", get(probes::readyz))
        .route(
            "/plugin-callback/{plugin}/{taskId}",
            post(plugins::callback),
        )
        .merge(node_channel::routes())
        .merge(log_channel::routes())
        .merge(dashboard::routes())
        .merge(docs::routes())
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                // 5xx answers are logged by `error::shape`, with the request id and an
                // internal error's cause: not a second time here.
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_failure(()),
                )
                .layer(middleware::from_fn(error::shape))
                .layer(middleware::from_fn(track_http))
                .layer(DefaultBodyLimit::max(state.config.max_body_bytes)),
        )
        .with_state(state)
}
