//! `/api/v1/chat…`: conversations (the nex and Kiki platforms' chat routes) mapped to
//! [`crate::chat::ChatService`].
//!
//! The stream of `/chat/stream` is Server-Sent Events readable by both platforms' clients:
//! every `data:` line is a JSON object with `content` (nex's clients print `data['content']`
//! of each), and each event is named (Kiki's clients read `event: token` / `done`):
//!
//! ```text
//! event: token
//! data: {"content": "春", "session_id": "s1", "metadata": {"model": "…"}}
//!
//! event: done
//! data: {"content": "", "session_id": "s1", "done": true, "token_count": 42, …}
//! ```
//!
//! `stream_mode` `updates` sends `event: update` per step instead of tokens, `values` sends
//! `event: values` with the whole message list after each step. A failure is `event: error`
//! (the error shape, plus `content` and `session_id`), never a silent end. A client that
//! disconnects cancels the model call and its tool tasks.

use std::convert::Infallible;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, Pagination};
use crate::chat::{ChatAnswer, ChatInput, Error, TurnEvent};
use crate::principal::Principal;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { param, message } => ApiError::invalid(param, message),
            Error::NotFound(id) => ApiError::not_found("session", &id),
            Error::Busy(_) => ApiError::custom(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "session_busy",
                e.to_string(),
                Some("session_id".to_owned()),
            ),
            Error::NoModel => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_model",
                e.to_string(),
                None,
            ),
            Error::TooLong { .. } => ApiError::custom(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                e.to_string(),
                Some("message".to_owned()),
            ),
            Error::Llm(e) => super::llm::api_error(&e),
            Error::Start(e) => super::llm::start_error(e),
            Error::Store(e) => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "store_unavailable",
                format!("the conversation store is unavailable; nothing was stored: {e}"),
                None,
            ),
        }
    }
}

fn parse(body: Result<Bytes, BytesRejection>) -> Result<ChatInput, ApiError> {
    let body = body?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    parse_value(v)
}

/// A chat request (the body of `/api/v1/chat`, the `data` of a `/ws` `chat` frame) checked
/// field by field.
///
/// # Errors
/// 400 naming the field (`body` when `v` is not an object, `message`, `model_type`, …).
pub(super) fn parse_value(v: Value) -> Result<ChatInput, ApiError> {
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    if !v.get("message").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(
            "message",
            "`message` is required and must be a string",
        ));
    }
    for (param, allowed) in [
        (
            "model_type",
            &["local_small", "cloud_large", "plugin", "auto_select"][..],
        ),
        ("stream_mode", &["messages", "updates", "values"][..]),
    ] {
        if let Some(x) = v.get(param).filter(|x| !x.is_null())
            && !x.as_str().is_some_and(|s| allowed.contains(&s))
        {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` must be one of {}", allowed.join(", ")),
            ));
        }
    }
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let param = [
            "session_id",
            "user_id",
            "max_tokens",
            "temperature",
            "model_type",
            "preferred_model",
            "system_prompt",
            "stream_mode",
            "stream",
        ]
        .into_iter()
        .find(|p| msg.contains(p))
        .unwrap_or("body");
        ApiError::invalid(param, format!("invalid chat request: {msg}"))
    })
}

/// Send a message and get the whole answer.
///
/// `POST /api/v1/chat` (nex's `ChatRequest` → `ChatResponse`; Kiki's `{message, session_id,
/// user_id}` → `{content, session_id, …}`). With `stream: true` it answers as
/// `/api/v1/chat/stream`. The 200 is sent once the turn is stored.
#[utoipa::path(
    post,
    path = "/api/v1/chat",
    tag = "chat",
    operation_id = "chat",
    request_body = ChatInput,
    responses(
        (status = 200, description = "The answer (the turn is stored)", body = ChatAnswer),
        (status = 400, description = "Invalid request (`param` names the field); `context_length_exceeded` when the message alone exceeds `chat.context_max_tokens`", body = super::error::ErrorBody),
        (status = 404, description = "`model_not_found`: the chosen model vanished before the call", body = super::error::ErrorBody),
        (status = 409, description = "`session_busy`: the session answers another message (`chat.busy = \"reject\"`, or the wait timed out)", body = super::error::ErrorBody),
        (status = 502, description = "The model failed", body = super::error::ErrorBody),
        (status = 503, description = "`no_model`: no provider or node-hosted model; `store_unavailable`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn chat(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let input = match parse(body) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    if input.stream == Some(true) {
        return stream_turn(&state, &principal, input).await;
    }
    let mut turn = match state.chat.turn(&principal, input).await {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    while let Some(ev) = turn.events.recv().await {
        match ev {
            TurnEvent::Done(answer) => return Json(answer).into_response(),
            TurnEvent::Error(e) => return ApiError::from(e).into_response(),
            _ => {}
        }
    }
    ApiError::internal("the turn ended without an answer").into_response()
}

/// Send a message and stream the answer (Server-Sent Events).
///
/// `POST /api/v1/chat/stream`. Events: `token` `{content, session_id, metadata: {model}}`
/// (`stream_mode: "messages"`, the default), `update` `{content: "", session_id, step, …}`
/// (`updates`: `model_call`, `tool_call`, `tool_result`, `answer`), `values` `{content: "",
/// session_id, messages}` (`values`), then `done` `{content: "", session_id, done: true,
/// token_count, model_used, reasoning, latency_ms, confidence, timestamp}` once the turn is
/// stored, or `error` (the error shape with `content` and `session_id`).
#[utoipa::path(
    post,
    path = "/api/v1/chat/stream",
    tag = "chat",
    operation_id = "chatStream",
    request_body = ChatInput,
    responses(
        (status = 200, description = "`text/event-stream` of `token`/`update`/`values` events, then `done` or `error`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 409, description = "`session_busy`", body = super::error::ErrorBody),
        (status = 503, description = "`no_model` or `store_unavailable`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn chat_stream(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse(body) {
        Ok(input) => stream_turn(&state, &principal, input).await,
        Err(e) => e.into_response(),
    }
}

fn event(name: &str, data: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

async fn stream_turn(state: &AppState, principal: &Principal, input: ChatInput) -> Response {
    let turn = match state.chat.turn(principal, input).await {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let sid = turn.session_id.clone();
    let model = turn.model.clone();
    let events = futures::stream::unfold((turn.events, false), move |(mut rx, ended)| {
        let sid = sid.clone();
        let model = model.clone();
        async move {
            if ended {
                return None;
            }
            let ev = rx.recv().await;
            let (out, end) = match ev {
                Some(TurnEvent::Token(t)) => (
                    event(
                        "token",
                        &json!({"content": t, "session_id": sid, "metadata": {"model": model}}),
                    ),
                    false,
                ),
                Some(TurnEvent::Update(mut u)) => {
                    u["content"] = json!("");
                    u["session_id"] = json!(sid);
                    (event("update", &u), false)
                }
                Some(TurnEvent::Values(messages)) => (
                    event(
                        "values",
                        &json!({"content": "", "session_id": sid, "messages": messages}),
                    ),
                    false,
                ),
                Some(TurnEvent::Done(a)) => {
                    let mut v = serde_json::to_value(&a).unwrap_or_else(|_| json!({}));
                    v["content"] = json!("");
                    v["done"] = json!(true);
                    (event("done", &v), true)
                }
                Some(TurnEvent::Error(e)) => {
                    let mut v = ApiError::from(e).to_json();
                    v["content"] = json!("");
                    v["session_id"] = json!(sid);
                    (event("error", &v), true)
                }
                None => {
                    let mut v = ApiError::internal("the turn ended without an answer").to_json();
                    v["content"] = json!("");
                    v["session_id"] = json!(sid);
                    (event("error", &v), true)
                }
            };
            Some((out, (rx, end)))
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A message of `GET /api/v1/chat/history/{session_id}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct HistoryMessage {
    /// `user` or `assistant`.
    role: String,
    /// The text.
    content: String,
    /// When it was said, RFC 3339.
    timestamp: String,
    /// Message id.
    id: String,
    /// The model of an assistant message.
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

/// A session's history.
///
/// `GET /api/v1/chat/history/{session_id}` → `{messages: [{role, content, timestamp, id,
/// model?}], session_id}`, oldest first. Another user's session is 404.
#[utoipa::path(
    get,
    path = "/api/v1/chat/history/{session_id}",
    tag = "chat",
    operation_id = "chatHistory",
    params(("session_id" = String, Path, description = "The session")),
    responses(
        (status = 200, description = "`{messages, session_id}`", body = Object),
        (status = 404, description = "The caller has no such session", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let all = state.chat.history(&principal, &session_id).await?;
    let messages: Vec<HistoryMessage> = all
        .into_iter()
        .map(|m| HistoryMessage {
            role: m.role,
            content: m.content,
            timestamp: crate::chat::rfc3339(m.ts),
            id: m.id,
            model: m.model,
        })
        .collect();
    Ok(Json(
        json!({"messages": messages, "session_id": session_id}),
    ))
}

/// Delete a session's history.
///
/// `DELETE /api/v1/chat/history/{session_id}` → `{status: "success", message}`: the
/// messages, the session and its context are gone.
#[utoipa::path(
    delete,
    path = "/api/v1/chat/history/{session_id}",
    tag = "chat",
    operation_id = "deleteChatHistory",
    params(("session_id" = String, Path, description = "The session")),
    responses(
        (status = 200, description = "`{status: \"success\", message}`", body = Object),
        (status = 404, description = "The caller has no such session", body = super::error::ErrorBody),
        (status = 409, description = "`session_busy`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete_history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.chat.delete(&principal, &session_id).await?;
    Ok(Json(
        json!({"status": "success", "message": format!("chat history of {session_id} cleared")}),
    ))
}

/// A session's context statistics.
///
/// `GET /api/v1/chat/context/{session_id}/stats` → `{session_id, message_count,
/// token_estimate, role_distribution: {user, assistant, system, tool}, exists}` of the
/// working context (what the next turn sends the model, system prompt not counted). A
/// session the caller does not have answers `exists: false` with zeros.
#[utoipa::path(
    get,
    path = "/api/v1/chat/context/{session_id}/stats",
    tag = "chat",
    operation_id = "chatContextStats",
    params(("session_id" = String, Path, description = "The session")),
    responses((status = 200, description = "The statistics", body = Object)),
    security(("bearer" = []))
)]
pub(super) async fn context_stats(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = state.chat.session(&principal, &session_id).await?;
    Ok(Json(match s {
        Some(s) => json!({
            "session_id": session_id,
            "message_count": s.context_count,
            "token_estimate": s.context_tokens,
            "role_distribution": s.context_roles,
            "exists": true,
            "history_message_count": s.message_count,
            "history_token_estimate": s.history_tokens,
            "summary": s.summary,
        }),
        None => json!({
            "session_id": session_id,
            "message_count": 0,
            "token_estimate": 0,
            "role_distribution": crate::chat::Roles::default(),
            "exists": false,
        }),
    }))
}

/// Clear a session's working context.
///
/// `DELETE /api/v1/chat/context/{session_id}` → `{status: "success", message}`: the next turn
/// starts without the earlier messages; the history keeps them.
#[utoipa::path(
    delete,
    path = "/api/v1/chat/context/{session_id}",
    tag = "chat",
    operation_id = "clearChatContext",
    params(("session_id" = String, Path, description = "The session")),
    responses(
        (status = 200, description = "`{status: \"success\", message}`", body = Object),
        (status = 404, description = "The caller has no such session", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn clear_context(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.chat.clear_context(&principal, &session_id).await?;
    Ok(Json(
        json!({"status": "success", "message": format!("context of {session_id} cleared")}),
    ))
}

/// Query of `GET /api/v1/chat/sessions`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct SessionsQuery {
    /// Page, from 1.
    page: Option<usize>,
    /// Sessions per page (1 to 1000, default 50).
    limit: Option<usize>,
}

/// The caller's sessions.
///
/// `GET /api/v1/chat/sessions` → `{data: [{session_id, title, message_count, created_at,
/// updated_at, last_model}], meta: {total, page, limit, pages}}`, most recently used first.
#[utoipa::path(
    get,
    path = "/api/v1/chat/sessions",
    tag = "chat",
    operation_id = "listChatSessions",
    params(SessionsQuery),
    responses((status = 200, description = "A page of sessions", body = Object)),
    security(("bearer" = []))
)]
pub(super) async fn sessions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<SessionsQuery>,
) -> Result<Json<Value>, ApiError> {
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let all = state.chat.sessions(&principal).await?;
    let page: Vec<Value> = all
        .iter()
        .skip(pages.offset())
        .take(pages.limit)
        .map(|s| {
            json!({
                "session_id": s.session_id,
                "title": s.title,
                "message_count": s.message_count,
                "created_at": crate::chat::rfc3339(s.created_at_ms),
                "updated_at": crate::chat::rfc3339(s.updated_at_ms),
                "last_model": s.last_model,
            })
        })
        .collect();
    Ok(pages.body(&page, all.len()))
}

/// Body of `POST /api/v1/chat/interrupt`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct InterruptBody {
    /// The session whose answer to stop.
    session_id: String,
}

/// Interrupt a session's answer.
///
/// `POST /api/v1/chat/interrupt {session_id}` → `{interrupted: bool}`: the answer so far is
/// stored and ends the turn (its `done` has `interrupted: true`). False when no turn of the
/// caller's session runs at this hub.
#[utoipa::path(
    post,
    path = "/api/v1/chat/interrupt",
    tag = "chat",
    operation_id = "interruptChat",
    request_body = InterruptBody,
    responses((status = 200, description = "`{interrupted}`", body = Object)),
    security(("bearer" = []))
)]
pub(super) async fn interrupt(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<InterruptBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    Ok(Json(
        json!({"interrupted": state.chat.interrupt(&principal, &b.session_id)}),
    ))
}
