//! The node channel: WebSocket upgrade with node-key check, and the per-connection session
//! (decode, validate, hand typed messages to the engine, liveness by ping/pong).
//!
//! Paths: `/abp-distributed-server/<K>`, `/distributed-server/<K>`, `/vcp-distributed-server/<K>`
//! with `<K>` = `VCP_Key=<key>` or `ABP_Key=<key>`, or the same paths without `<K>` and an
//! `Authorization: Bearer <key>` header (parsed and checked by [`super::auth`]). A missing or
//! wrong node key is answered 401 `invalid_node_key` before the upgrade
//! ([`super::auth::node_key_refused`]); a last segment that is not a key is 404. The key is
//! never logged: the request path is traced redacted ([`super::auth::redact_path`]).
//!
//! A session whose `node_register` was refused (its node id is held by another live
//! connection, `node_id_in_use`) waits as that id's standby: its results are fenced as the
//! node's, its progress, stream chunks and drain get an `error` frame, and it becomes the
//! node's session once the engine hands it the id (checked at its next frame, and at its end).
//!
//! The session is generic over the socket's `Stream` and `Sink`, so it runs on any transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::codec::{self, DecodeError};
use apex_protocol::{
    Encoding, ErrorFrame, ErrorInfo, Frame, HubMessage, LlmResponse, NodeMessage, TaskResultAck,
    now_ms,
};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, MatchedPath, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, interval};

use super::auth::{bearer, channel_of, key_matches, node_key_refused, path_key};
use super::{ApiError, AppState};
use crate::engine::{Cluster, ConnHandle, Outbound};
use crate::llm::node_proxy::NodeProxy;
use crate::model::Dialect;
use crate::ops::Ops;

/// The native path of the node channel, the one `apex-node` connects to (its default hub
/// path) with a bearer key; advertised in the `path` TXT record of [`crate::discovery`].
pub const NATIVE_PATH: &str = "/distributed-server";

/// Upgrade routes of the node channel.
pub fn routes() -> Router<AppState> {
    // Literal paths, a bare one (bearer key) and one with a key segment per prefix (the OpenAPI
    // drift test reads them from this source).
    Router::new()
        .route("/abp-distributed-server", get(upgrade_bearer))
        .route("/abp-distributed-server/{key}", get(upgrade_path_key))
        .route("/distributed-server", get(upgrade_bearer))
        .route("/distributed-server/{key}", get(upgrade_path_key))
        .route("/vcp-distributed-server", get(upgrade_bearer))
        .route("/vcp-distributed-server/{key}", get(upgrade_path_key))
}

/// Node channel upgrade (key in the path).
///
/// `GET /distributed-server/{key}` (and its prefixes): the key as `VCP_Key=<node key>`.
#[utoipa::path(
    get,
    path = "/distributed-server/{key}",
    tag = "channels",
    operation_id = "nodeChannelPathKey",
    params(("key" = String, Path, description = "`VCP_Key=<node key>` or `ABP_Key=<node key>`; any other segment is 404")),
    responses(
        (status = 101, description = "Switched to WebSocket: the node channel (see PROTOCOL.md)"),
        (status = 400, description = "Not a WebSocket upgrade request", body = super::error::ErrorBody),
        (status = 404, description = "The last segment is not a key", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong node key (`invalid_node_key`)", body = super::error::ErrorBody),
    ),
)]
async fn upgrade_path_key(
    State(state): State<AppState>,
    route: MatchedPath,
    Path(segment): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Some(key) = path_key(&segment) else {
        return ApiError::no_route(&format!("{}/{segment}", channel_of(&route))).into_response();
    };
    upgrade(state, channel_of(&route), key, peer, ws)
}

/// Node channel upgrade (key in the header).
///
/// `GET /distributed-server` (and its prefixes): the node key in `Authorization: Bearer`.
#[utoipa::path(
    get,
    path = "/distributed-server",
    tag = "channels",
    operation_id = "nodeChannel",
    responses(
        (status = 101, description = "Switched to WebSocket: the node channel (see PROTOCOL.md)"),
        (status = 400, description = "Not a WebSocket upgrade request", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong node key (`invalid_node_key`)", body = super::error::ErrorBody),
    ),
    security(("node_key" = []))
)]
async fn upgrade_bearer(
    State(state): State<AppState>,
    route: MatchedPath,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let key = bearer(&headers).unwrap_or("");
    upgrade(state, channel_of(&route), key, peer, ws)
}

fn upgrade(
    state: AppState,
    prefix: &str,
    key: &str,
    peer: SocketAddr,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if key.is_empty() || !key_matches(&state.config.node_keys, key) {
        tracing::warn!(%peer, "node connection refused: missing or wrong node key");
        return node_key_refused(prefix).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::invalid("upgrade", format!("not a WebSocket upgrade: {e}"))
                .into_response();
        }
    };
    let max = state.config.max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket: WebSocket| async move {
            let (sink, stream) = socket.split();
            let _gauge = crate::metrics::ConnectionGauge::open("node");
            let (conn, rx) = state.cluster.open_connection(peer.to_string());
            Session::new(state.cluster.clone(), conn)
                .with_ops(state.ops.clone())
                .with_llm(state.node_llm.clone())
                .with_plugin_callbacks(state.clone())
                .run(stream, sink, rx)
                .await;
        })
}

/// One node connection.
pub struct Session {
    cluster: Cluster,
    conn: ConnHandle,
    node: Option<(String, Dialect)>,
    /// A native node id whose registration was refused here because another live connection
    /// holds it (`node_id_in_use`); this connection takes it over if that one is lost.
    standby: Option<String>,
    limits: apex_protocol::Limits,
    ops: Option<Ops>,
    llm: Option<Arc<NodeProxy>>,
    /// Where VCP nodes' `plugin_callback_forward`s are applied (without it: logged, dropped).
    callbacks: Option<super::AppState>,
}

impl Session {
    /// A session for a connection the engine has opened.
    pub fn new(cluster: Cluster, conn: ConnHandle) -> Self {
        Self {
            cluster,
            conn,
            node: None,
            standby: None,
            limits: apex_protocol::Limits::default(),
            ops: None,
            llm: None,
            callbacks: None,
        }
    }

    /// Applies the node's `plugin_callback_forward`s through `state`'s task service.
    pub fn with_plugin_callbacks(mut self, state: super::AppState) -> Self {
        self.callbacks = Some(state);
        self
    }

    /// Takes liveness timings from the live config (changes apply to open sessions) and feeds
    /// node `log` frames to the log channel.
    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = Some(ops);
        self
    }

    /// Answers the node's `llm_request`s through `proxy` (without it: `llm_unavailable`).
    pub fn with_llm(mut self, proxy: Arc<NodeProxy>) -> Self {
        self.llm = Some(proxy);
        self
    }

    /// Runs the connection until it closes, goes silent past the heartbeat timeout, or the
    /// engine replaces it. On exit the node (if this connection still holds it) goes offline
    /// and its tasks migrate.
    pub async fn run<S, K>(mut self, mut stream: S, sink: K, rx: mpsc::Receiver<Outbound>)
    where
        S: Stream<Item = Result<Message, axum::Error>> + Unpin,
        K: Sink<Message> + Unpin + Send + 'static,
    {
        let writer = tokio::spawn(write_loop(sink, rx));
        let mut opts = self.cluster.options().clone();
        let mut live = self.ops.as_ref().map(|o| o.live.subscribe());
        if let Some(l) = &mut live {
            let c = l.borrow_and_update();
            opts.heartbeat_interval = c.heartbeat_interval();
            opts.heartbeat_timeout = c.heartbeat_timeout();
        }
        let mut tick = interval(opts.heartbeat_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        // Fires at `last_seen + timeout`; re-armed lazily when it fires early.
        let silence = tokio::time::sleep(opts.heartbeat_timeout);
        tokio::pin!(silence);
        let kill = self.conn.kill.clone();
        let (code, reason): (u16, String) = loop {
            tokio::select! {
                _ = kill.notified() => break (1008, "replaced by a newer connection or overloaded".into()),
                m = stream.next() => {
                    let msg = match m {
                        None => break (1000, "closed by the node".into()),
                        Some(Err(e)) => {
                            if is_too_long(e) {
                                break (1009, "message larger than max_frame_bytes".into());
                            }
                            break (1002, "websocket error".into());
                        }
                        Some(Ok(m)) => m,
                    };
                    last_seen = Instant::now();
                    self.conn.last_seen_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                    match msg {
                        Message::Text(t) => {
                            self.on_frame(codec::decode_text::<NodeMessage>(t.as_str()));
                        }
                        Message::Binary(b) => {
                            self.on_frame(codec::decode_binary::<NodeMessage>(&b));
                        }
                        Message::Close(_) => break (1000, "closed by the node".into()),
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                _ = &mut silence => {
                    let due = last_seen + opts.heartbeat_timeout;
                    if Instant::now() >= due {
                        break (1001, "no frame or pong within the heartbeat timeout".into());
                    }
                    silence.as_mut().reset(due.into());
                }
                _ = tick.tick() => {
                    let _ = self.conn.tx.try_send(Outbound::Ping);
                }
                Ok(()) = async { match &mut live { Some(l) => l.changed().await, None => std::future::pending().await } } => {
                    if let Some(l) = &mut live {
                        let c = l.borrow_and_update().clone();
                        if c.heartbeat_interval() != opts.heartbeat_interval {
                            opts.heartbeat_interval = c.heartbeat_interval();
                            tick = interval(opts.heartbeat_interval);
                            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        }
                        opts.heartbeat_timeout = c.heartbeat_timeout();
                        // Re-armed from the last frame: a shorter timeout may fire at once.
                        silence.as_mut().reset((last_seen + opts.heartbeat_timeout).into());
                    }
                }
            }
        };
        if let Some(llm) = &self.llm {
            llm.connection_closed(self.conn.id);
        }
        if let Some((node_id, _)) = self.node.take() {
            self.cluster.lose_node(&node_id, self.conn.id, &reason);
        }
        // A standby (maybe bound meanwhile, before any later frame said so).
        if let Some(node_id) = self.standby.take() {
            self.cluster.lose_node(&node_id, self.conn.id, &reason);
        }
        let _ = self.conn.tx.try_send(Outbound::Close(code, reason));
        drop(self.conn);
        // The writer ends after the close frame; don't wait on a peer that stopped reading.
        let abort = writer.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(2), writer)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    fn send(&self, msg: impl Into<HubMessage>) {
        if self.conn.tx.try_send(Outbound::Msg(msg.into())).is_err() {
            self.cluster
                .stats()
                .frames_shed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::get().frames_shed.inc();
        }
    }

    /// Sends `msg` once every store write queued so far is durable: a `task_result_ack` tells
    /// the node it may forget the result, so the commit must survive a hub crash first.
    fn send_when_durable(&self, msg: impl Into<HubMessage>) {
        let durability = self.cluster.durability().clone();
        let ticket = durability.ticket();
        if durability.is_durable(ticket) {
            return self.send(msg);
        }
        let msg = msg.into();
        let tx = self.conn.tx.clone();
        tokio::spawn(async move {
            // While the store fails, keep waiting: the node keeps the result until acknowledged.
            while durability
                .wait(ticket, crate::durable::DURABLE_WAIT)
                .await
                .is_err()
            {
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let _ = tx.try_send(Outbound::Msg(msg));
        });
    }

    fn reject(&self, code: &str, message: String) {
        self.cluster
            .stats()
            .frames_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::frame_rejected(code);
        tracing::debug!(conn = self.conn.id, code, %message, "frame rejected");
        self.send(ErrorFrame {
            code: code.to_owned(),
            message,
        });
    }

    fn on_frame(&mut self, decoded: Result<NodeMessage, DecodeError>) {
        self.cluster
            .stats()
            .frames_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::get().frames_in.inc();
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => return self.reject(e.code(), e.to_string()),
        };
        if let Err(e) = msg.validate(&self.limits) {
            return self.reject("invalid_payload", e.to_string());
        }
        if self.node.is_none()
            && let Some(id) = &self.standby
        {
            if self.cluster.is_bound(id, self.conn.id) {
                // The connection holding the id was lost: this one took it over.
                self.node = self.standby.take().map(|id| (id, Dialect::Native));
            } else if matches!(
                msg,
                NodeMessage::TaskProgress(_)
                    | NodeMessage::TaskStream(_)
                    | NodeMessage::NodeDrain(_)
            ) {
                let message = format!(
                    "node id `{id}` is held by another live connection; this connection is not registered"
                );
                return self.reject(apex_protocol::codes::NODE_ID_IN_USE, message);
            }
        }
        let node_id = self.node.as_ref().map(|(id, _)| id.clone());
        match msg {
            NodeMessage::NodeRegister(r) => {
                let id = self.cluster.register_native(&self.conn, r);
                if self.cluster.is_bound(&id, self.conn.id) {
                    self.standby = None;
                    self.rebind(id, Dialect::Native);
                } else {
                    self.standby = Some(id);
                }
            }
            NodeMessage::RegisterTools(r) => {
                let id = self.cluster.register_vcp(&self.conn, r);
                self.rebind(id, Dialect::Vcp);
            }
            NodeMessage::Heartbeat(h) => {
                let ack = self.cluster.heartbeat(node_id.as_deref(), h);
                self.send(ack);
            }
            // A standby's results are fenced like any of its node id's (the same process may
            // have reconnected before the hub saw its old connection die).
            NodeMessage::TaskResult(r) => match node_id.or_else(|| self.standby.clone()) {
                Some(id) => {
                    // Held without an answer while its claim is handed over (shared mode).
                    if let Some(ack) = self.cluster.task_result_or_hold(&id, r) {
                        self.send_when_durable(ack);
                    }
                }
                None => {
                    self.reject(
                        "not_registered",
                        "send node_register before task_result".to_owned(),
                    );
                    self.send(TaskResultAck {
                        task_id: r.task_id,
                        node_id: r.node_id.unwrap_or_default(),
                        success: false,
                        message: Some("connection is not registered".to_owned()),
                        timestamp: now_ms(),
                    });
                }
            },
            NodeMessage::ToolResult(r) => match node_id {
                Some(id) => self.cluster.tool_result(&id, r),
                None => self.reject(
                    "not_registered",
                    "send register_tools before tool_result".to_owned(),
                ),
            },
            NodeMessage::TaskStream(c) => match node_id {
                Some(id) => {
                    self.cluster.task_stream(&id, c);
                }
                None => self.reject(
                    "not_registered",
                    "send node_register before task_stream".to_owned(),
                ),
            },
            NodeMessage::TaskProgress(p) => match node_id {
                Some(id) => {
                    self.cluster.task_progress(&id, p);
                }
                None => self.reject(
                    "not_registered",
                    "send node_register before task_progress".to_owned(),
                ),
            },
            NodeMessage::NodeDrain(_) => match node_id {
                Some(id) => {
                    self.cluster.set_draining(&id, true);
                }
                None => self.reject(
                    "not_registered",
                    "send node_register before node_drain".to_owned(),
                ),
            },
            NodeMessage::NodeUnregister(u) => {
                let id = node_id.unwrap_or(u.node_id);
                let reason = u.reason.unwrap_or_else(|| "no reason given".to_owned());
                let ack = self.cluster.unregister(&id, self.conn.id, &reason);
                self.node = None;
                self.send(ack);
            }
            NodeMessage::Log(l) => {
                if let Some(ops) = &self.ops {
                    let id = node_id.as_deref().unwrap_or(&l.node_id);
                    ops.logs.node_log(id, &l.level, &l.message, l.timestamp);
                }
                tracing::info!(
                    target: "apex_hub::node_log",
                    node_id = node_id.as_deref().unwrap_or(&l.node_id),
                    level = %l.level,
                    "{}",
                    l.message
                );
            }
            NodeMessage::LlmRequest(r) => {
                if let (Some(llm), Some(id)) = (&self.llm, &node_id) {
                    return llm.handle(id, self.conn.id, r, self.conn.tx.clone());
                }
                let registered = node_id.is_some();
                self.send(LlmResponse {
                    request_id: r.request_id,
                    node_id: node_id.unwrap_or(r.node_id),
                    success: false,
                    content: None,
                    tool_calls: None,
                    usage: None,
                    error: Some(if registered {
                        ErrorInfo::new(
                            "llm_unavailable",
                            "this hub has no language model configured",
                        )
                    } else {
                        ErrorInfo::new(
                            "llm_request_failed",
                            "send node_register before llm_request",
                        )
                    }),
                    stream: false,
                    timestamp: now_ms(),
                });
            }
            NodeMessage::ReportIp(ip) => {
                if let Some(id) = node_id {
                    self.cluster.report_ip(&id, ip);
                }
            }
            NodeMessage::UpdateStaticPlaceholders(_) => {}
            NodeMessage::PluginCallbackForward(f) => match (&self.callbacks, node_id) {
                (Some(state), Some(id)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        super::plugins::forwarded(&state, &id, &f.callback_data).await;
                    });
                }
                _ => tracing::warn!(
                    conn = self.conn.id,
                    "plugin_callback_forward from an unregistered connection dropped"
                ),
            },
        }
    }

    /// Records the node this connection now holds; a different node id on the same connection
    /// releases the previous one.
    fn rebind(&mut self, id: String, dialect: Dialect) {
        if let Some((old, _)) = &self.node
            && *old != id
        {
            self.cluster
                .lose_node(old, self.conn.id, "re-registered under another id");
        }
        self.node = Some((id, dialect));
    }
}

fn is_too_long(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e.into_inner().downcast::<WsError>() {
        Ok(e) => matches!(*e, WsError::Capacity(CapacityError::MessageTooLong { .. })),
        Err(_) => false,
    }
}

fn to_message(f: Frame) -> Message {
    match f {
        Frame::Text(t) => Message::Text(t.into()),
        Frame::Binary(b) => Message::Binary(b.into()),
    }
}

/// Writes queued frames, batching whatever is ready before each flush.
async fn write_loop<K>(mut sink: K, mut rx: mpsc::Receiver<Outbound>)
where
    K: Sink<Message> + Unpin,
{
    let mut encoding = Encoding::Json;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(item) = next.take() {
            let msg = match item {
                Outbound::Msg(m) => match codec::encode(&m, encoding) {
                    Ok(f) => to_message(f),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode frame");
                        continue;
                    }
                },
                Outbound::SetEncoding(e) => {
                    encoding = e;
                    next = rx.try_recv().ok();
                    continue;
                }
                Outbound::Ping => Message::Ping(bytes::Bytes::new()),
                Outbound::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    return;
                }
            };
            if sink.feed(msg).await.is_err() {
                return;
            }
            crate::metrics::get().frames_out.inc();
            batch += 1;
            if batch < 256 {
                next = rx.try_recv().ok();
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
