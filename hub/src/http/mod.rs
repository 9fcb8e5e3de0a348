//! The HTTP surface: router, request ids, `/health`; key checks in [`auth`], the node channel's
//! upgrade and sessions in [`node_channel`].
//!
//! Only this module tree imports axum (and `crate::run`, which serves the router).

pub mod auth;
mod config;
pub mod dashboard;
pub mod error;
pub mod events;
mod llm;
pub mod log_channel;
pub mod node_channel;
mod nodes;
mod probes;
mod system;
mod tasks;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::engine::Cluster;
use crate::model::TaskStatus;
use crate::ops::Ops;
pub use error::ApiError;

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
        Self {
            tasks: crate::tasks::TaskService::local(cluster.clone(), shutdown.clone()),
            ops: Ops::new(config.clone(), None),
            llm,
            node_llm,
            cluster,
            config,
            shutdown,
            shared: None,
            records: crate::records::RecordStore::memory(),
        }
    }
}

/// `GET /health` (no key): 200 with `status: "ok"` and `store: "ok"`; 503 with
/// `status: "degraded"` and `store: "unavailable"` while the task store would refuse
/// submissions (they answer 503 `store_unavailable`). Both carry the version, uptime, node and
/// task counts, queue depth and node-channel counters.
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
    let (status, code, store) = if store_ok {
        ("ok", StatusCode::OK, "ok")
    } else {
        ("degraded", StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = axum::Json(json!({
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
    }));
    (code, body).into_response()
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
            "meta": {
                "total": total,
                "page": self.page,
                "limit": self.limit,
                "pages": total.div_ceil(self.limit),
            }
        }))
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

/// `GET /metrics`: the Prometheus text exposition.
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
        .with_state(state)
}

/// 404 naming the path (a key-in-path segment redacted by [`ApiError::no_route`]).
async fn no_route(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

/// The hub's whole HTTP router (API routes, `/health`, and the node channel upgrades).
pub fn router(state: AppState) -> Router {
    let mut api = Router::new()
        .route("/api/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/api/v1/tasks/batch", post(tasks::create_batch))
        .route("/api/v1/tasks/{id}", get(tasks::get))
        .route("/api/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/api/v1/tasks/{id}/events", get(tasks::events))
        .route("/api/v1/system/status", get(system::status))
        .route("/v1/events", get(events::stream))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(llm::chat_completions))
        .route("/v1/models", get(llm::models))
        .route("/v1/models/{*id}", get(llm::model))
        .route("/v1/interrupt", post(llm::interrupt));
    for base in ["/v1/nodes", "/api/admin/nodes"] {
        api = api
            .route(base, get(nodes::list))
            .route(
                &format!("{base}/{{id}}"),
                get(nodes::get).delete(nodes::remove),
            )
            .route(
                &format!("{base}/{{id}}/tasks"),
                get(nodes::tasks).post(nodes::dispatch),
            )
            .route(&format!("{base}/{{id}}/drain"), post(nodes::drain))
            .route(&format!("{base}/{{id}}/undrain"), post(nodes::undrain));
    }
    for base in ["/v1/config", "/api/admin/config"] {
        api = api
            .route(base, get(config::get).put(config::put))
            .route(&format!("{base}/reload"), post(config::reload));
    }
    let api = api.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_api_key,
    ));
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(probes::livez))
        .route("/readyz", get(probes::readyz))
        .merge(node_channel::routes())
        .merge(log_channel::routes())
        .merge(dashboard::routes())
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(middleware::from_fn(track_http))
                .layer(DefaultBodyLimit::max(state.config.max_body_bytes)),
        )
        .with_state(state)
}
