//! The log channel: WebSocket `/ABPlog/<K>`, `/log/<K>`, `/VCPlog/<K>` with `<K>` =
//! `VCP_Key=<key>` or `ABP_Key=<key>` (or the bare paths with `Authorization: Bearer <key>`).
//! The key is a node key or an API key (browsers cannot set headers on a WebSocket, so the
//! dashboard passes its API key in the path); parsed and checked by [`super::auth`]. A missing
//! or wrong key is answered 401 `invalid_key` before the upgrade
//! ([`super::auth::log_key_refused`]), a last segment that is not a key 404.
//!
//! After the upgrade the client gets the buffered entries (the last `log_buffer_entries`,
//! oldest first), then live ones, each one text frame `{"type", "data"}` (shapes in
//! [`crate::ops::logs`]). Query filters: `node=<node id>` (entries about that node) and
//! `level=debug|info|warn|error` (at least that severe); `replay=N` limits the replay to the
//! last N entries (0: none).
//!
//! A client that falls behind skips entries and gets `{"type": "log_dropped", "data":
//! {"skipped"}}`; one whose socket accepts nothing for 10 s is disconnected (shed). Both are
//! counted in `/metrics`. Messages from the client are ignored.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast;

use super::auth::{bearer, channel_of, key_matches, log_key_refused, path_key};
use super::{ApiError, AppState};
use crate::metrics::{self, ConnectionGauge};
use crate::ops::logs::{Level, LogEntry};

/// How long one write may take before the client is shed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upgrade routes of the log channel.
pub fn routes() -> Router<AppState> {
    // Literal paths, a bare one (bearer key) and one with a key segment per prefix (the OpenAPI
    // drift test reads them from this source).
    Router::new()
        .route("/ABPlog", get(upgrade_bearer))
        .route("/ABPlog/{key}", get(upgrade_path_key))
        .route("/log", get(upgrade_bearer))
        .route("/log/{key}", get(upgrade_path_key))
        .route("/VCPlog", get(upgrade_bearer))
        .route("/VCPlog/{key}", get(upgrade_path_key))
}

/// Query of the log channel.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// Only entries about this node.
    node: Option<String>,
    /// At least this severe: `debug`, `info`, `warn` or `error`.
    level: Option<String>,
    /// Replay at most the last N buffered entries (0: none).
    replay: Option<usize>,
}

struct Filter {
    node: Option<String>,
    level: Level,
}

impl Filter {
    fn keeps(&self, e: &LogEntry) -> bool {
        e.level >= self.level
            && self
                .node
                .as_ref()
                .is_none_or(|n| e.node_id.as_deref() == Some(n.as_str()))
    }
}

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// Log channel upgrade (key in the path).
///
/// `GET /log/{key}` (and its prefixes): the key as `VCP_Key=<key>`.
#[utoipa::path(
    get,
    path = "/log/{key}",
    tag = "channels",
    operation_id = "logChannelPathKey",
    params(("key" = String, Path, description = "`VCP_Key=<key>` or `ABP_Key=<key>` (a node key or an API key); any other segment is 404"), LogParams),
    responses(
        (status = 101, description = "Switched to WebSocket: buffered then live log entries, one `{type, data}` text frame each"),
        (status = 400, description = "Not a WebSocket upgrade, or an invalid query (`level`)", body = super::error::ErrorBody),
        (status = 404, description = "The last segment is not a key", body = super::error::ErrorBody),
        (status = 401, description = "Missing key, or neither a node key nor an API key (`invalid_key`)", body = super::error::ErrorBody),
    ),
)]
async fn upgrade_path_key(
    State(state): State<AppState>,
    route: MatchedPath,
    Path(segment): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    q: Result<Query<LogParams>, QueryRejection>,
    ws: Upgrade,
) -> Response {
    let Some(key) = path_key(&segment) else {
        return ApiError::no_route(&format!("{}/{segment}", channel_of(&route))).into_response();
    };
    upgrade(state, channel_of(&route), key, peer, q, ws)
}

/// Log channel upgrade (key in the header).
///
/// `GET /log` (and its prefixes): the key in `Authorization: Bearer`.
#[utoipa::path(
    get,
    path = "/log",
    tag = "channels",
    operation_id = "logChannel",
    params(LogParams),
    responses(
        (status = 101, description = "Switched to WebSocket: buffered then live log entries, one `{type, data}` text frame each"),
        (status = 400, description = "Not a WebSocket upgrade, or an invalid query (`level`)", body = super::error::ErrorBody),
        (status = 401, description = "Missing key, or neither a node key nor an API key (`invalid_key`)", body = super::error::ErrorBody),
    ),
    security(("node_key" = []), ("bearer" = []))
)]
async fn upgrade_bearer(
    State(state): State<AppState>,
    route: MatchedPath,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    q: Result<Query<LogParams>, QueryRejection>,
    ws: Upgrade,
) -> Response {
    let key = bearer(&headers).unwrap_or("");
    upgrade(state, channel_of(&route), key, peer, q, ws)
}

fn upgrade(
    state: AppState,
    prefix: &str,
    key: &str,
    peer: SocketAddr,
    q: Result<Query<LogParams>, QueryRejection>,
    ws: Upgrade,
) -> Response {
    if key.is_empty()
        || !(key_matches(&state.config.node_keys, key) || key_matches(&state.config.api_keys, key))
    {
        tracing::warn!(%peer, "log client refused: missing or wrong key");
        return log_key_refused(prefix).into_response();
    }
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let level = match q.level.as_deref().filter(|l| !l.is_empty()) {
        None => Level::Debug,
        Some(l) => match Level::parse(l, false) {
            Some(l) => l,
            None => {
                return ApiError::invalid("level", "`level` must be debug, info, warn or error")
                    .into_response();
            }
        },
    };
    let filter = Filter {
        node: q.node.filter(|n| !n.is_empty()),
        level,
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::invalid("upgrade", format!("not a WebSocket upgrade: {e}"))
                .into_response();
        }
    };
    ws.on_upgrade(move |socket| serve(state, socket, filter, q.replay))
}

async fn serve(state: AppState, socket: WebSocket, filter: Filter, replay: Option<usize>) {
    let _gauge = ConnectionGauge::open("log");
    let (mut sink, mut incoming) = socket.split();
    let (past, mut rx) = state.ops.logs.snapshot_and_subscribe();
    let mut past: Vec<_> = past.into_iter().filter(|e| filter.keeps(e)).collect();
    if let Some(n) = replay {
        let skip = past.len().saturating_sub(n);
        past.drain(..skip);
    }
    let dropped = metrics::get().stream_dropped.with_label_values(&["log"]);
    let mut shutdown = state.shutdown.clone();
    let send = |text: String| Message::Text(text.into());
    for e in past {
        let Ok(text) = serde_json::to_string(&*e) else {
            continue;
        };
        if !write(&mut sink, send(text)).await {
            return;
        }
    }
    loop {
        let text = tokio::select! {
            r = rx.recv() => match r {
                Ok(e) if filter.keeps(&e) => match serde_json::to_string(&*e) {
                    Ok(t) => t,
                    Err(_) => continue,
                },
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    dropped.inc_by(n);
                    json!({"type": "log_dropped", "data": {"skipped": n}}).to_string()
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = incoming.next() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        if !write(&mut sink, send(text)).await {
            return;
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(CloseFrame {
            code: 1001,
            reason: "hub shutting down".into(),
        }))),
    )
    .await;
}

/// Sends one message; false (and the client is shed) if the socket failed or stalled.
async fn write<S>(sink: &mut S, msg: Message) -> bool
where
    S: futures::Sink<Message> + Unpin,
{
    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            metrics::get().log_clients_shed.inc();
            tracing::info!("log client shed: it accepted nothing for 10 s");
            false
        }
    }
}
