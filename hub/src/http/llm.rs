//! The OpenAI-compatible LLM routes: `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /v1/interrupt`. The work is done by
//! [`Gateway`](crate::llm::Gateway); this module only maps HTTP to it.
//!
//! Streams are written as `data: <chunk JSON>\n\n` frames and a final `data: [DONE]\n\n`;
//! chunks an upstream sent are forwarded as received (see [`ChatChunk::raw`]). An error after
//! the first chunk becomes a `data: {"error": {...}}` frame before `[DONE]`.
//!
//! A caller with a token budget (`rate_limits.llm_tokens_per_minute`) is charged each call's
//! usage as the gateway reports it; a stream is then asked for usage from its upstream even if
//! the client did not ask (`stream_options.include_usage`), and the usage-only chunk is not
//! forwarded to such a client.

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use serde_json::{Value, json};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::llm::{
    CallContext, Caller, ChatChunk, ChatRequest, ChunkStream, LlmError, Usage, UsageHook,
};
use crate::principal::Principal;

const X_REQUEST_ID: &str = "x-request-id";

/// The OpenAI error response for a gateway error.
pub(super) fn api_error(e: &LlmError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    ApiError::custom(
        status,
        e.kind(),
        e.code(),
        e.to_string(),
        e.param().map(str::to_owned),
    )
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    resp
}

/// Chat completion (OpenAI-compatible).
///
/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "llm",
    operation_id = "createChatCompletion",
    request_body = super::openapi::ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` Server-Sent Events of `chat.completion.chunk` objects ending `data: [DONE]` (an error after the first chunk is a `data: {\"error\": …}` event before it)",
            content(
                (super::openapi::ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request (`error.param` names the field)", body = ErrorBody),
        (status = 404, description = "No provider serves the model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
        (status = 429, description = "Every deployment was rate limited", body = ErrorBody),
        (status = 502, description = "The upstream failed (`upstream_error`)", body = ErrorBody),
        (status = 503, description = "No upstream could be reached in time (`upstream_unavailable`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let header_id = headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let fallback_id = || header_id.clone().unwrap_or_else(new_id);
    let body = match body {
        Ok(b) => b,
        Err(e) => return with_request_id(ApiError::from(e).into_response(), &fallback_id()),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let err = ApiError::invalid("body", format!("the body is not valid JSON: {e}"));
            return with_request_id(err.into_response(), &fallback_id());
        }
    };
    let (mut req, body_id) = match ChatRequest::from_json(value) {
        Ok(x) => x,
        Err(e) => return with_request_id(api_error(&e).into_response(), &fallback_id()),
    };
    let id = body_id.unwrap_or_else(fallback_id);
    let stream = req.stream;
    let include_usage = req.include_usage;
    let gateway = state.llm.get();
    let mut ctx = CallContext::new(id.clone(), Caller::Http);
    // Usage the client did not ask for, asked of the upstream to charge the token budget.
    let mut hidden_usage = false;
    if state.limits.limits_tokens(&principal) {
        let limits = state.limits.clone();
        let principal = principal.clone();
        ctx = ctx.with_usage_hook(UsageHook::new(move |u: &Usage| {
            let tokens = u
                .total_tokens
                .max(u.prompt_tokens.saturating_add(u.completion_tokens));
            limits.charge_tokens(&principal, tokens);
        }));
        hidden_usage = stream && !include_usage;
        req.include_usage |= stream;
    }
    let model = req.model.clone();
    let server_tools = req.extra.remove("server_tools");
    let chat: ChunkStream = match server_tools {
        Some(sel) => match start_tool_loop(&state, &principal, &id, sel, req, ctx).await {
            Ok(s) => s,
            Err(resp) => return with_request_id(resp, &id),
        },
        None => match gateway.chat(req, ctx).await {
            Ok(s) => s.boxed(),
            Err(e) => {
                tracing::debug!(request_id = %id, error = %e, "chat completion failed");
                return with_request_id(api_error(&e).into_response(), &id);
            }
        },
    };
    let resp = if stream {
        sse_response(chat, &id, &model, include_usage, hidden_usage)
    } else {
        match whole_response(chat, &id, &model).await {
            Ok(r) => r,
            Err(e) => api_error(&e).into_response(),
        }
    };
    with_request_id(resp, &id)
}

/// Starts the server-side tool loop of a request with `server_tools` (see
/// [`crate::llm::tool_loop::start_for`]), errors rendered as the gateway's error responses.
async fn start_tool_loop(
    state: &AppState,
    principal: &Principal,
    id: &str,
    selection: Value,
    req: ChatRequest,
    ctx: CallContext,
) -> Result<ChunkStream, Response> {
    crate::llm::tool_loop::start_for(
        &crate::llm::tool_loop::Cluster {
            gateway: state.llm.get(),
            tasks: &state.tasks,
            plugins: &state.plugins,
            config: &state.config,
        },
        principal,
        &selection,
        req,
        ctx,
    )
    .await
    .map_err(|e| {
        tracing::debug!(request_id = %id, error = %e, "chat completion failed");
        start_error(e).into_response()
    })
}

/// The response of a tool loop that did not start.
pub(super) fn start_error(e: crate::llm::tool_loop::StartError) -> ApiError {
    use crate::llm::tool_loop::StartError;
    match e {
        StartError::Llm(e) => api_error(&e),
        StartError::Forbidden(m) => ApiError::forbidden(m),
        StartError::Tasks(e) => ApiError::from(e),
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Serialises a chunk the gateway or a backend made (no `raw`) as a `chat.completion.chunk`.
fn chunk_json(c: &ChatChunk, id: &str, model: &str, created: u64, first: bool) -> Value {
    let mut delta = serde_json::Map::new();
    if first {
        delta.insert("role".into(), json!("assistant"));
    }
    if !c.text.is_empty() {
        delta.insert("content".into(), json!(c.text));
    }
    if let Some(tc) = &c.tool_calls {
        delta.insert("tool_calls".into(), tc.clone());
    }
    let bare = c.text.is_empty() && c.finish_reason.is_none() && c.tool_calls.is_none();
    let choices = if bare && (c.usage.is_some() || c.apex.is_some()) {
        // A usage-only chunk, as OpenAI sends it with include_usage (or the tool loop's last
        // chunk carrying only `apex_tool_runs`).
        json!([])
    } else {
        json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": c.finish_reason}])
    };
    let mut v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let Some(u) = &c.usage {
        v["usage"] = json!(u);
    }
    merge_apex(&mut v, c);
    v
}

/// Adds a chunk's `apex_*` fields to the response object rendered from it.
fn merge_apex(v: &mut Value, c: &ChatChunk) {
    if let (Some(apex), Some(obj)) = (&c.apex, v.as_object_mut()) {
        for (k, x) in apex {
            obj.insert(k.clone(), x.clone());
        }
    }
}

fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(payload);
    b.put_slice(b"\n\n");
    b.freeze()
}

fn error_frame(e: &LlmError) -> Bytes {
    let v = json!({"error": {
        "message": e.to_string(),
        "type": e.kind(),
        "code": e.code(),
        "param": e.param(),
    }});
    frame(v.to_string().as_bytes())
}

/// The SSE answer of a streamed call. `include_usage`: the client asked for usage;
/// `hidden_usage`: usage was asked of the upstream for the hub alone, so usage-only chunks are
/// not forwarded.
fn sse_response(
    chat: ChunkStream,
    id: &str,
    model: &str,
    include_usage: bool,
    hidden_usage: bool,
) -> Response {
    let chunk_id = format!("chatcmpl-{id}");
    let model = model.to_owned();
    let request_id = id.to_owned();
    let created = crate::llm::unix_now();
    struct St {
        chat: Option<ChunkStream>,
        first: bool,
    }
    let body = futures::stream::unfold(
        St {
            chat: Some(chat),
            first: true,
        },
        move |mut st| {
            let (chunk_id, model) = (chunk_id.clone(), model.clone());
            let request_id = request_id.clone();
            async move {
                let chat = st.chat.as_mut()?;
                let mut next = chat.next().await;
                while hidden_usage && matches!(&next, Some(Ok(c)) if usage_only(c)) {
                    next = chat.next().await;
                }
                match next {
                    Some(Ok(c)) => {
                        let b = match &c.raw {
                            Some(raw) => frame(raw),
                            None => {
                                let mut c = c;
                                if !include_usage && c.text.is_empty() && c.finish_reason.is_none()
                                {
                                    c.usage = None;
                                }
                                let v = chunk_json(&c, &chunk_id, &model, created, st.first);
                                frame(v.to_string().as_bytes())
                            }
                        };
                        st.first = false;
                        Some((Ok::<Bytes, std::convert::Infallible>(b), st))
                    }
                    Some(Err(e)) => {
                        tracing::warn!(request_id = %request_id, error = %e,
                            "llm stream failed after its first chunk");
                        st.chat = None;
                        let mut b = BytesMut::new();
                        b.put(error_frame(&e));
                        b.put_slice(b"data: [DONE]\n\n");
                        Some((Ok(b.freeze()), st))
                    }
                    None => {
                        st.chat = None;
                        Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), st))
                    }
                }
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Whether a chunk carries only usage (OpenAI's last chunk with `include_usage`); one with
/// `apex_*` fields is sent anyway (without its usage when that was hidden).
fn usage_only(c: &ChatChunk) -> bool {
    c.usage.is_some()
        && c.apex.is_none()
        && c.text.is_empty()
        && c.tool_calls.is_none()
        && c.finish_reason.is_none()
        && !c.interrupted
}

async fn whole_response(
    mut chat: ChunkStream,
    id: &str,
    model: &str,
) -> Result<Response, LlmError> {
    let mut chunks = Vec::with_capacity(1);
    while let Some(c) = chat.next().await {
        chunks.push(c?);
    }
    if let [c] = chunks.as_slice()
        && let Some(raw) = &c.raw
        && !c.interrupted
    {
        let mut resp = Response::new(Body::from(raw.clone()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let mut text = String::new();
    let mut tool_calls: Option<Value> = None;
    let mut finish = None;
    let mut usage: Option<Usage> = None;
    let mut apex = None;
    for c in chunks {
        if c.apex.is_some() {
            apex = c.apex;
        }
        text.push_str(&c.text);
        if let Some(tc) = c.tool_calls {
            tool_calls = Some(tc);
        }
        if c.finish_reason.is_some() {
            finish = c.finish_reason;
        }
        if c.usage.is_some() {
            usage = c.usage;
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if let Some(tc) = tool_calls {
        message["tool_calls"] = tc;
    }
    let mut body = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": crate::llm::unix_now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": finish.unwrap_or_else(|| "stop".to_owned())}],
        "usage": usage.unwrap_or_default(),
    });
    if let (Some(apex), Some(obj)) = (apex, body.as_object_mut()) {
        obj.extend(apex);
    }
    Ok(axum::Json(body).into_response())
}

/// List models.
///
/// `GET /v1/models`.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "llm",
    operation_id = "listModels",
    responses((status = 200, description = "Every model the gateway serves", body = super::openapi::ModelList)),
    security(("bearer" = []))
)]
pub(super) async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state
        .llm
        .get()
        .models()
        .into_iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Get a model.
///
/// `GET /v1/models/{id}` (model ids may contain `/`).
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "llm",
    operation_id = "getModel",
    params(("id" = String, Path, description = "Model id (may contain `/`)")),
    responses(
        (status = 200, description = "The model", body = super::openapi::Model),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.llm.get().models().into_iter().find(|m| m.id == id) {
        Some(m) => axum::Json(
            json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}),
        )
        .into_response(),
        None => api_error(&LlmError::ModelNotFound(id)).into_response(),
    }
}

/// Interrupt a chat completion.
///
/// `POST /v1/interrupt {"requestId"}` (or `messageId`).
#[utoipa::path(
    post,
    path = "/v1/interrupt",
    tag = "llm",
    operation_id = "interruptChatCompletion",
    request_body = super::openapi::InterruptRequest,
    responses(
        (status = 200, description = "The call was interrupted (its stream ends with `finish_reason: stop`)", body = super::openapi::Interrupted),
        (status = 400, description = "No `requestId` or `messageId`", body = ErrorBody),
        (status = 404, description = "No call in flight has that id; the body also has `requestId` and `reason: \"not_found\"`", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn interrupt(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = ["requestId", "messageId", "request_id"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty());
    let Some(id) = id else {
        return ApiError::invalid(
            "requestId",
            "send `{\"requestId\": \"<id>\"}` (or `messageId`) naming the call to interrupt",
        )
        .into_response();
    };
    if state.llm.get().interrupt(id) {
        tracing::info!(request_id = %id, "llm call interrupted");
        axum::Json(json!({
            "success": true,
            "message": "the request was interrupted",
            "requestId": id,
            "interrupted": true,
        }))
        .into_response()
    } else {
        // `requestId` and `reason` beside the common shape: VCP clients read them.
        ApiError::not_found("call", id)
            .with_field("requestId", id)
            .with_field("reason", "not_found")
            .into_response()
    }
}
