//! `GET /ws`: the client WebSocket of users and API clients (scope `chat`), authenticated like
//! every API route by [`super::auth::authenticate`] before the upgrade (bearer header, or
//! `?token=` for browsers, which cannot set headers on a WebSocket).
//!
//! Frames are JSON text, `{"type", "data"?}`:
//! - client → hub: `ping` (answered `pong`); `chat` `{message, session_id?, …}` (the body of
//!   `POST /api/v1/chat`: a turn through [`crate::chat::ChatService`]); `interrupt`
//!   `{session_id}` (ends that session's turn in progress; what was said is stored). Anything
//!   else gets an `error` frame naming the problem and the connection stays open.
//! - hub → client: `chat.chunk` `{content, session_id}` per piece of the answer, then
//!   `chat.completed` `{content, session_id, token_count, model_used, reasoning, latency_ms,
//!   confidence, timestamp, interrupted?}` once the turn is stored, or `error` (the API error
//!   shape, with the turn's `session_id` when there is one); `notification` `{title, body,
//!   task_id?}`; `alert` `{level, message}` (admins); `pong`.
//!
//! Each `chat` frame counts as one request of the `standard` rate-limit class, like
//! `POST /api/v1/chat` (refused: an `error` frame `rate_limit_exceeded` with `retry_after`).
//! Turns run concurrently, one task each (two for one session are serialised by the chat
//! service, as over HTTP); closing the connection (or being shed) cancels every turn it
//! started: the model call and its tool tasks are dropped and nothing of the turn is stored.
//!
//! One connection = one [`crate::notify::Connection`]: a bounded queue (`ws_queue_len`)
//! written by the bus and by this session's replies and turns, drained by the writer. A client
//! that lets it fill is shed; chat chunks wait while it is more than half full (the pace of
//! the client's reading) and shed a client that frees no room for 10 s. The connection ends when the client closes it, when it is shed,
//! when its credential is revoked (close 1008) or when the hub shuts down (close 1001).
//!
//! The session is generic over the socket's `Sink`/`Stream` ([`run`]), so it is tested with
//! channels.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Error as AxumError, Extension};
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Value, json};

use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::chat::{ChatInput, TurnEvent};
use crate::limits::{Admission, OnStoreError, RouteClass};
use crate::notify::{Connection, Outbox, PACED_MAX_WAIT};
use crate::principal::Principal;

/// How long a closing frame may take to leave before the socket is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Open the client WebSocket.
///
/// `GET /ws` (WebSocket upgrade; `Authorization: Bearer <token>` or `?token=<token>`).
#[utoipa::path(
    get,
    path = "/ws",
    tag = "channels",
    operation_id = "clientWebSocket",
    params(("token" = Option<String>, Query, description = "The credential, for clients that cannot set `Authorization` on an upgrade (browsers). Only `/ws` takes it; it is never logged")),
    responses(
        (status = 101, description = "Switched to WebSocket. Frames are JSON text `{type, data}`.\n\n\
            Client → hub: `{\"type\":\"chat\",\"data\":{\"message\",\"session_id\"?, …the fields of POST /api/v1/chat}}` (a turn; several may run at once for different sessions), \
            `{\"type\":\"interrupt\",\"data\":{\"session_id\"}}` (ends that session's turn; `error` `not_found` when none runs at this hub), `{\"type\":\"ping\"}`.\n\n\
            Hub → client: `{\"type\":\"chat.chunk\",\"data\":{\"content\",\"session_id\"}}` per piece of an answer, then `{\"type\":\"chat.completed\",\"data\":{\"content\",\"session_id\",\"token_count\",\"model_used\",\"reasoning\",\"latency_ms\",\"confidence\",\"timestamp\",\"interrupted\"?}}` once the turn is stored; \
            `{\"type\":\"notification\",\"data\":{\"title\",\"body\",\"task_id\"?}}` (a task of the caller ended, a schedule of theirs fired), \
            `{\"type\":\"alert\",\"data\":{\"level\",\"message\"}}` (admins: a node was lost), \
            `{\"type\":\"error\",\"data\":<ErrorBody and session_id?>}` (a frame the hub could not take or a turn that failed; the connection stays open), `{\"type\":\"pong\"}`.\n\n\
            Closing the connection cancels its turns.\n\n\
            A client that stops reading is disconnected once `ws_queue_len` frames wait (chat chunks wait for room instead, up to 10 s); close 1008 when the credential is revoked, 1001 when the hub shuts down."),
        (status = 400, description = "Not a WebSocket upgrade", body = super::error::ErrorBody),
        (status = 401, description = "Missing, unknown, expired or revoked credential (before the upgrade)", body = super::error::ErrorBody),
        (status = 403, description = "The credential lacks the `chat` scope", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn upgrade(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::invalid("upgrade", format!("not a WebSocket upgrade: {e}"))
                .into_response();
        }
    };
    ws.on_upgrade(move |socket| async move {
        let conn = state.notifier.connect(&principal);
        let session = Session::new(state, principal, conn.outbox.clone());
        let (sink, stream) = socket.split();
        run(session, conn, sink, stream).await;
    })
}

/// What a connection's handlers can reach.
#[derive(Clone)]
pub struct Session {
    /// The hub's state (task service, gateway, identity, …).
    pub state: AppState,
    /// Who is connected.
    pub principal: Principal,
    /// This connection's outbound queue: [`Outbox::send_json`] a frame, without waiting
    /// (false once the client is gone or shed).
    pub outbox: Outbox,
    /// Cancelled when the connection ends: its turns stop.
    closed: CancellationToken,
}

impl Session {
    /// The session of `principal`'s connection whose queue is `outbox`.
    pub fn new(state: AppState, principal: Principal, outbox: Outbox) -> Self {
        Self {
            state,
            principal,
            outbox,
            closed: CancellationToken::new(),
        }
    }

    /// Queues an `error` frame carrying `e`'s error shape.
    pub fn send_error(&self, e: &ApiError) -> bool {
        self.outbox
            .send_json(&json!({"type": "error", "data": e.to_json()}))
    }

    /// Queues the `error` frame of a turn of `session_id`: the error shape with `session_id`
    /// beside it (when the turn had one).
    fn send_turn_error(&self, session_id: Option<&str>, e: &ApiError) -> bool {
        let mut data = e.to_json();
        if let Some(sid) = session_id {
            data["session_id"] = json!(sid);
        }
        self.outbox
            .send_json(&json!({"type": "error", "data": data}))
    }
}

/// 400-class `error` frame of a frame the hub cannot take.
fn bad_frame(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::custom(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
        None,
    )
}

/// Serves one connection until the client leaves, is shed, is revoked or the hub stops.
pub async fn run<Si, St>(session: Session, mut conn: Connection, mut sink: Si, mut stream: St)
where
    Si: Sink<Message> + Unpin + Send,
    St: Stream<Item = Result<Message, AxumError>> + Unpin + Send,
{
    // `conn` unregisters from the bus when this returns; the guard cancels the turns.
    let _turns = session.closed.clone().drop_guard();
    let outbox = conn.outbox.clone();
    let rx = &mut conn.rx;
    let revoked = session.state.identity.revoked(session.principal.clone());
    let mut shutdown = session.state.shutdown.clone();
    let writer = async {
        tokio::pin!(revoked);
        let close = loop {
            let frame = tokio::select! {
                biased;
                _ = outbox.shed() => return,
                _ = &mut revoked => break Some((1008, "credential revoked")),
                _ = shutdown.wait_for(|s| *s) => break Some((1001, "hub shutting down")),
                f = rx.recv() => f,
            };
            let Some(frame) = frame else { break None };
            let sent = tokio::select! {
                r = sink.send(Message::Text(frame.as_ref().into())) => r.is_ok(),
                _ = outbox.shed() => false,
            };
            if !sent {
                return;
            }
        };
        if let Some((code, reason)) = close {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(frame)).await;
        }
    };
    let reader = async {
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Text(t)) => dispatch(&session, t.as_str()).await,
                Ok(Message::Binary(_)) => {
                    session.send_error(&bad_frame(
                        "unsupported_frame",
                        "binary frames are not supported: send JSON text frames",
                    ));
                }
                Ok(Message::Close(_)) | Err(_) => return,
                // Pings are answered by the WebSocket layer itself.
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

/// Handles one text frame from the client: the one dispatch on `type`.
pub async fn dispatch(session: &Session, text: &str) {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            session.send_error(&bad_frame(
                "invalid_json",
                format!("the frame is not JSON: {e}"),
            ));
            return;
        }
    };
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        session.send_error(&bad_frame(
            "invalid_frame",
            "a frame is a JSON object with a string `type` (ping, chat, interrupt)",
        ));
        return;
    };
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    match kind {
        "ping" => {
            session.outbox.send_json(&json!({"type": "pong"}));
        }
        "chat" => on_chat(session, data).await,
        "interrupt" => on_interrupt(session, data).await,
        other => {
            session.send_error(&bad_frame(
                "unknown_type",
                format!("unknown frame type `{other}`: expected ping, chat or interrupt"),
            ));
        }
    }
}

/// `{"type": "chat", "data": {message, session_id?, …}}`: checks `data` like the body of
/// `POST /api/v1/chat` (an `error` frame naming the field otherwise), then runs the turn in a
/// task of its own so the connection keeps reading (more turns, interrupts, pings).
async fn on_chat(session: &Session, data: Value) {
    let mut input = match super::chat::parse_value(data) {
        Ok(i) => i,
        Err(e) => {
            session.send_error(&e);
            return;
        }
    };
    // The frames of a turn are chunks and the end: `/chat`'s `stream` and `stream_mode`
    // (updates, values) do not apply.
    input.stream = None;
    input.stream_mode = None;
    let s = session.clone();
    tokio::spawn(async move {
        tokio::select! {
            // The connection ended: dropping the turn cancels the model call.
            () = s.closed.cancelled() => {}
            () = chat_turn(&s, input) => {}
        }
    });
}

/// Runs one turn, sending its `chat.chunk`s, then `chat.completed` or `error`. Returns (and
/// so drops the turn, cancelling the model call) as soon as the client cannot take a frame.
async fn chat_turn(s: &Session, input: ChatInput) {
    let asked = input.session_id.clone();
    // Each turn counts as one request of `POST /api/v1/chat` (the `standard` class).
    match s
        .state
        .limits
        .check(&s.principal, RouteClass::Standard)
        .await
    {
        Admission::Unlimited
        | Admission::Admitted(_)
        | Admission::StoreFailed(OnStoreError::Allow) => {}
        Admission::Refused(d) => {
            s.send_turn_error(
                asked.as_deref(),
                &ApiError::rate_limited(d.retry_after_secs(), d.message()),
            );
            return;
        }
        Admission::StoreFailed(OnStoreError::Deny) => {
            s.send_turn_error(
                asked.as_deref(),
                &ApiError::custom(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "rate_limit_unavailable",
                    "the rate-limit store is unavailable and this hub refuses turns it cannot count",
                    None,
                ),
            );
            return;
        }
    }
    let mut turn = match s.state.chat.turn(&s.principal, input).await {
        Ok(t) => t,
        Err(e) => {
            s.send_turn_error(asked.as_deref(), &ApiError::from(e));
            return;
        }
    };
    let sid = turn.session_id.clone();
    while let Some(ev) = turn.events.recv().await {
        match ev {
            TurnEvent::Token(content) => {
                let frame = json!({"type": "chat.chunk",
                    "data": {"content": content, "session_id": sid}});
                // Paced by the client's reading; shed if it reads nothing for a while.
                if !s
                    .outbox
                    .send_paced(frame.to_string().into(), PACED_MAX_WAIT)
                    .await
                {
                    return;
                }
            }
            TurnEvent::Done(answer) => {
                let mut data = serde_json::to_value(&answer).unwrap_or_else(|_| json!({}));
                if let Some(m) = data.as_object_mut() {
                    // Always null in an answer; errors are `error` frames.
                    m.remove("error");
                }
                s.outbox
                    .send_json(&json!({"type": "chat.completed", "data": data}));
                return;
            }
            TurnEvent::Error(e) => {
                s.send_turn_error(Some(&sid), &ApiError::from(e));
                return;
            }
            TurnEvent::Update(_) | TurnEvent::Values(_) => {}
        }
    }
    s.send_turn_error(
        Some(&sid),
        &ApiError::internal("the turn ended without an answer"),
    );
}

/// `{"type": "interrupt", "data": {session_id}}`: interrupts the caller's turn of that session
/// in progress at this hub (its `chat.completed` then says `interrupted: true`); an `error`
/// frame `not_found` when none runs.
async fn on_interrupt(session: &Session, data: Value) {
    let Some(sid) = data.get("session_id").and_then(Value::as_str) else {
        session.send_error(&ApiError::invalid(
            "session_id",
            "`interrupt` needs `data.session_id`, the session whose turn to end",
        ));
        return;
    };
    if !session.state.chat.interrupt(&session.principal, sid) {
        session.send_turn_error(
            Some(sid),
            &ApiError::custom(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                format!("no turn of session `{sid}` is in progress on this connection's hub"),
                Some("session_id".to_owned()),
            ),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use futures::channel::mpsc;
    use tokio::sync::watch;

    use super::*;

    /// A session over channels: the frames the hub writes, a sender of client frames, the
    /// hub's shutdown switch and the session's task.
    type Harness = (
        mpsc::UnboundedReceiver<Message>,
        mpsc::UnboundedSender<Result<Message, AxumError>>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    );

    fn session() -> Harness {
        let config = crate::config::Config {
            api_keys: vec!["api-key-123".into()],
            node_keys: vec!["node-key-123".into()],
            ..crate::config::Config::default()
        };
        let (stop_tx, stop) = watch::channel(false);
        let state = AppState::new(crate::cluster_for(&config), config, stop);
        let principal = Principal::user("a", "j");
        let conn = state.notifier.connect(&principal);
        let s = Session::new(state, principal, conn.outbox.clone());
        let (out_tx, out_rx) = mpsc::unbounded();
        let (in_tx, in_rx) = mpsc::unbounded();
        let task = tokio::spawn(run(s, conn, out_tx.sink_map_err(|_| ()), in_rx));
        (out_rx, in_tx, stop_tx, task)
    }

    async fn next_json(rx: &mut mpsc::UnboundedReceiver<Message>) -> Value {
        match rx.next().await.unwrap() {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => Value::String(format!("{other:?}")),
        }
    }

    #[tokio::test]
    async fn ping_pong_bad_frames_and_chat_errors_keep_the_connection_open() {
        let (mut out, input, stop, task) = session();
        let send = |t: &str| input.unbounded_send(Ok(Message::Text(t.into()))).unwrap();
        send(r#"{"type":"ping"}"#);
        assert_eq!(next_json(&mut out).await, json!({"type": "pong"}));
        send("{not json");
        let e = next_json(&mut out).await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["data"]["error"]["code"], "invalid_json");
        send(r#"{"type":"dance"}"#);
        let e = next_json(&mut out).await;
        assert_eq!(e["data"]["error"]["code"], "unknown_type");
        assert!(
            e["data"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("dance")
        );
        send(r#"[1]"#);
        assert_eq!(
            next_json(&mut out).await["data"]["error"]["code"],
            "invalid_frame"
        );
        send(r#"{"type":"chat","data":{"session_id":"s"}}"#);
        let e = next_json(&mut out).await;
        assert_eq!(e["data"]["error"]["param"], "message", "{e}");
        // No provider and no node-hosted model in this state: the turn fails, named.
        send(r#"{"type":"chat","data":{"message":"hi","session_id":"s"}}"#);
        let e = next_json(&mut out).await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["data"]["error"]["code"], "no_model", "{e}");
        assert_eq!(e["data"]["session_id"], "s");
        send(r#"{"type":"interrupt","data":{"session_id":"s"}}"#);
        let e = next_json(&mut out).await;
        assert_eq!(e["data"]["error"]["code"], "not_found", "{e}");
        assert_eq!(e["data"]["session_id"], "s");
        send(r#"{"type":"interrupt","data":{}}"#);
        assert_eq!(
            next_json(&mut out).await["data"]["error"]["param"],
            "session_id"
        );
        // Still open: a ping is answered after all of that.
        send(r#"{"type":"ping"}"#);
        assert_eq!(next_json(&mut out).await["type"], "pong");
        stop.send(true).unwrap();
        match out.next().await.unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, 1001),
            other => panic!("expected a close frame, got {other:?}"),
        }
        task.await.unwrap();
    }
}
