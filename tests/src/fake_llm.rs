//! A fake OpenAI-compatible upstream (an LLM provider is outside the machine, so tests use
//! this): `POST /v1/chat/completions` (streaming and not), `GET /v1/models`, and test hooks.
//!
//! # Answers
//! The answer to a request is [`fake_text`]`(n)`: `n` tokens `"t0 "`, `"t1 "`, … (default
//! [`DEFAULT_TOKENS`]). When the request has `tools`, the answer is instead one call of the
//! first tool, `arguments` `{"city":"Paris"}`, `finish_reason: "tool_calls"`.
//! Chunks and completions report `model` as the request sent it.
//!
//! # Behaviour by model name
//! - `status-<code>-…` (e.g. `status-429-a`, `status-500-x`): answers that HTTP status with an
//!   OpenAI error body, counted in `errors_sent`.
//! - `slow-<ms>-…` (e.g. `slow-5000-a`): waits `<ms>` milliseconds before answering.
//! - `cut-…` (e.g. `cut-a`): a stream sends its opening role-only chunk, then the connection is
//!   cut 100 ms later (as `fail_after: 0`), counted in `errors_sent`.
//! - `json-…` (e.g. `json-a`), not streamed: the answer's content is the JSON object
//!   [`fake_structured`]`(n)` (what an agent's default structured output looks like).
//! - any other name: a normal answer.
//!
//! # Knobs in the request body: `"fake": {...}` (an unknown field to the hub, passed through)
//! - `tokens`: answer length (default 8);
//! - `first_token_delay_ms`: wait before the response headers and first chunk;
//! - `token_delay_ms`: wait between stream chunks;
//! - `fail_after`: streaming only, after that many content chunks the connection is cut
//!   without ending the HTTP body;
//! - `error_after`: streaming only, after that many content chunks a
//!   `data: {"error": {...}}` frame is sent, then `[DONE]`;
//! - `continue_prefix`: streaming only; when the last message is an assistant message holding
//!   `fake_text(k)`, the answer continues from token `k` (as a server honouring an assistant
//!   prefix does).
//! - `calls`: a script of tool calls, one list per round, each call `{"name", "arguments"}`
//!   (`arguments` a JSON object, or a string sent as is). The round is the number of
//!   assistant messages with `tool_calls` in the request: round `r` answers with the calls of
//!   `calls[r]` (ids `call_<r>_<i>`, `finish_reason: "tool_calls"`; streamed as a first delta
//!   with id and name, then the arguments in two pieces); past the script the answer is the
//!   text [`tool_results_text`] of the trailing `tool` messages. With `calls_repeat: true`
//!   the last round of the script repeats forever. `calls` wins over the `tools` rule above.
//!
//! # Embeddings
//! `POST /v1/embeddings` answers [`fake_embedding`] of each input (a string, strings, token
//! ids as `t<id>` words), always as floats, `model` as sent, counted in `embeddings`;
//! `status-<code>-` and `slow-<ms>-` models behave as for chat.
//!
//! # Hooks
//! - `GET /fake/stats`: [`FakeStats`] as JSON (`requests`, `streams_started`,
//!   `streams_completed`, `streams_dropped`, `errors_sent`, `waits_dropped`, `unauthorized`);
//! - `GET /fake/requests`: the last 100 request bodies, oldest first, with the
//!   `authorization` header each came with (`{"authorization": ..., "body": ...}`).
//!
//! With an API key set, requests without `Authorization: Bearer <key>` get 401.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Tokens in an answer when the request sets none.
pub const DEFAULT_TOKENS: u64 = 8;

/// The content a `json-` model answers: `{"result": fake_text(n) trimmed, "key_findings":
/// ["finding one", "finding two"], "uncertainties": ["one doubt"], "suggestions": [],
/// "confidence": 0.75}` as JSON text.
pub fn fake_structured(n: u64) -> String {
    json!({"result": fake_text(n).trim(), "key_findings": ["finding one", "finding two"],
        "uncertainties": ["one doubt"], "suggestions": [], "confidence": 0.75})
    .to_string()
}

/// The text of an answer of `n` tokens: `"t0 t1 … t(n-1) "`.
pub fn fake_text(n: u64) -> String {
    (0..n).map(|i| format!("t{i} ")).collect()
}

/// The fake's answer after tool results (the `calls` knob): `"tool results: "` and the
/// `content` of each trailing `tool` message, joined by `" | "`.
pub fn tool_results_text(messages: &[Value]) -> String {
    let start = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) != Some("tool"))
        .map_or(0, |i| i + 1);
    let parts: Vec<&str> = messages[start..]
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .collect();
    format!("tool results: {}", parts.join(" | "))
}

/// The fake's vector of `text`: 8 numbers from a hash of the text, L2-normalised (the same
/// text always gets the same vector; different texts almost surely differ).
pub fn fake_embedding(text: &str) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let v: Vec<f32> = (0..8)
        .map(|i| ((h >> (8 * i)) & 0xff) as f32 / 255.0 - 0.5)
        .collect();
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.into_iter().map(|x| x / n).collect()
}

/// Counters of the fake, as `GET /fake/stats` returns them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeStats {
    /// Chat requests received (any outcome).
    pub requests: u64,
    /// Streamed answers started.
    pub streams_started: u64,
    /// Streamed answers that sent `[DONE]` (or their error frame and `[DONE]`).
    pub streams_completed: u64,
    /// Streamed answers whose client went away before the end (the body was dropped).
    pub streams_dropped: u64,
    /// Error statuses sent because of a `status-<code>-` model.
    pub errors_sent: u64,
    /// Requests whose caller went away while the fake was still waiting to answer (a
    /// `slow-` model or `first_token_delay_ms`).
    pub waits_dropped: u64,
    /// Requests refused for a missing or wrong API key.
    pub unauthorized: u64,
    /// Embeddings requests answered (any outcome but 401).
    #[serde(default)]
    pub embeddings: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    streams_started: AtomicU64,
    streams_completed: AtomicU64,
    streams_dropped: AtomicU64,
    errors_sent: AtomicU64,
    waits_dropped: AtomicU64,
    unauthorized: AtomicU64,
    embeddings: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FakeStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FakeStats {
            requests: l(&self.requests),
            streams_started: l(&self.streams_started),
            streams_completed: l(&self.streams_completed),
            streams_dropped: l(&self.streams_dropped),
            errors_sent: l(&self.errors_sent),
            waits_dropped: l(&self.waits_dropped),
            unauthorized: l(&self.unauthorized),
            embeddings: l(&self.embeddings),
        }
    }
}

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Address to listen on (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Models listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// API key required from callers, if any.
    pub api_key: Option<String>,
    /// Keep the last request bodies for `GET /fake/requests` (off for benchmarks).
    pub record: bool,
    /// Answers to structured-output requests (`response_format: {type: "json_schema"}`): the
    /// first entry whose key is a top-level property of the requested schema answers, as its
    /// JSON text with every `{seq}` replaced by the request's number (so each answer differs).
    /// A schema no entry matches gets the normal text answer (not JSON).
    pub structured: Vec<(String, Value)>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            models: vec!["fake-model".to_owned()],
            api_key: None,
            record: true,
            structured: Vec::new(),
        }
    }
}

struct Shared {
    opts: FakeOptions,
    counters: Counters,
    requests: parking_lot::Mutex<VecDeque<Value>>,
}

/// A running fake upstream (in this process). Stops when dropped.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Binds and serves on the current Tokio runtime.
    ///
    /// # Errors
    /// If the address cannot be bound.
    pub async fn start(opts: FakeOptions) -> Result<Self> {
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("binding the fake upstream on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            opts,
            counters: Counters::default(),
            requests: parking_lot::Mutex::new(VecDeque::new()),
        });
        let app = router(shared.clone());
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`, what a provider's `base_url` takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The counters now.
    pub fn stats(&self) -> FakeStats {
        self.shared.counters.snapshot()
    }

    /// The recorded requests (`{"authorization", "body"}`), oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().iter().cloned().collect()
    }
}

/// The fake's router (also served by the `apex-fake-llm` binary).
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/fake/stats", get(stats))
        .route("/fake/requests", get(requests))
        .with_state(shared)
}

/// Serves the fake on `listener` until the process ends (for the `apex-fake-llm` binary).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(listener: TcpListener, opts: FakeOptions) -> Result<()> {
    let shared = Arc::new(Shared {
        opts,
        counters: Counters::default(),
        requests: parking_lot::Mutex::new(VecDeque::new()),
    });
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(shared)).await?;
    Ok(())
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(s.counters.snapshot()).into_response()
}

async fn requests(State(s): State<Arc<Shared>>) -> Response {
    let v: Vec<Value> = s.requests.lock().iter().cloned().collect();
    axum::Json(v).into_response()
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = check_key(&s, &headers) {
        return r;
    }
    let data: Vec<Value> = s
        .opts
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": "fake"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

fn error_response(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "code": null, "param": null}}),
        ),
    )
        .into_response()
}

fn check_key(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let want = s.opts.api_key.as_ref()?;
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if got == Some(want.as_str()) {
        return None;
    }
    s.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
    Some(error_response(
        StatusCode::UNAUTHORIZED,
        "invalid api key",
        "invalid_request_error",
    ))
}

async fn embeddings(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = check_key(&s, &headers) {
        return r;
    }
    s.counters.embeddings.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "body is not JSON",
            "invalid_request_error",
        );
    };
    if s.opts.record {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut q = s.requests.lock();
        if q.len() >= 100 {
            q.pop_front();
        }
        q.push_back(json!({"authorization": auth, "body": req}));
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(code) = model
        .strip_prefix("status-")
        .and_then(|r| r.split('-').next())
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        s.counters.errors_sent.fetch_add(1, Ordering::Relaxed);
        return error_response(
            code,
            &format!("fake failure {}", code.as_u16()),
            "server_error",
        );
    }
    if let Some(ms) = model
        .strip_prefix("slow-")
        .and_then(|r| r.split('-').next())
        .and_then(|c| c.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let as_text = |v: &Value| -> Option<String> {
        match v {
            Value::String(t) => Some(t.clone()),
            Value::Array(ids) => Some(
                ids.iter()
                    .map(|i| format!("t{}", i.as_u64().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        }
    };
    let input = req.get("input").cloned().unwrap_or(Value::Null);
    let texts: Vec<String> = match &input {
        Value::Array(a) if a.iter().all(Value::is_u64) => as_text(&input).into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(as_text).collect(),
        v => as_text(v).into_iter().collect(),
    };
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": fake_embedding(t)}))
        .collect();
    let tokens: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    axum::Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Knobs {
    tokens: Option<u64>,
    first_token_delay_ms: u64,
    token_delay_ms: u64,
    fail_after: Option<u64>,
    error_after: Option<u64>,
    continue_prefix: bool,
    calls: Option<Vec<Vec<ScriptedCall>>>,
    calls_repeat: bool,
}

/// One call of the `calls` knob.
#[derive(Debug, Clone, Deserialize)]
struct ScriptedCall {
    name: String,
    #[serde(default)]
    arguments: Value,
}

impl ScriptedCall {
    fn arguments_text(&self) -> String {
        match &self.arguments {
            Value::String(s) => s.clone(),
            Value::Null => "{}".to_owned(),
            v => v.to_string(),
        }
    }
}

/// The calls `(id, name, arguments)` of a scripted round, or the text answering tool results.
type Plan = Result<Vec<(String, String, String)>, String>;

/// What the `calls` knob makes of a request: the calls of this round, or the text answering
/// tool results.
fn scripted(knobs: &Knobs, req: &Value) -> Option<Plan> {
    let script = knobs.calls.as_ref()?;
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let round = messages
        .iter()
        .filter(|m| {
            m.get("role").and_then(Value::as_str) == Some("assistant")
                && m.get("tool_calls")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
        })
        .count();
    let pick = if round < script.len() {
        Some(round)
    } else if knobs.calls_repeat && !script.is_empty() {
        Some(script.len() - 1)
    } else {
        None
    };
    Some(match pick {
        Some(i) => Ok(script[i]
            .iter()
            .enumerate()
            .map(|(j, c)| {
                (
                    format!("call_{round}_{j}"),
                    c.name.clone(),
                    c.arguments_text(),
                )
            })
            .collect()),
        None => Err(tool_results_text(&messages)),
    })
}

/// The scripted answer of [`FakeOptions::structured`] to a `json_schema` request, if any.
fn structured_answer(opts: &FakeOptions, req: &Value, seq: u64) -> Option<String> {
    let format = req.get("response_format")?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    let props = format
        .pointer("/json_schema/schema/properties")?
        .as_object()?;
    let (_, answer) = opts
        .structured
        .iter()
        .find(|(k, _)| props.contains_key(k))?;
    Some(answer.to_string().replace("{seq}", &seq.to_string()))
}

/// With the `continue_prefix` knob: how many tokens of the answer a final assistant message
/// already holds (`fake_text(k)` exactly), so the answer goes on from token `k`.
fn prefix_tokens(req: &Value) -> u64 {
    let Some(last) = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
    else {
        return 0;
    };
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        return 0;
    }
    let text = last.get("content").and_then(Value::as_str).unwrap_or("");
    let k = text.split_whitespace().count() as u64;
    if fake_text(k) == text { k } else { 0 }
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let seq = s.counters.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(r) = check_key(&s, &headers) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "body is not JSON",
            "invalid_request_error",
        );
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let knobs: Knobs = req
        .get("fake")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let tool = req
        .pointer("/tools/0/function/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if s.opts.record {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut q = s.requests.lock();
        if q.len() >= 100 {
            q.pop_front();
        }
        q.push_back(json!({"authorization": auth, "body": req}));
    }
    if let Some(code) = model
        .strip_prefix("status-")
        .and_then(|r| r.split('-').next())
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        s.counters.errors_sent.fetch_add(1, Ordering::Relaxed);
        let kind = if code.as_u16() == 429 {
            "rate_limit_error"
        } else {
            "server_error"
        };
        return error_response(code, &format!("fake failure {}", code.as_u16()), kind);
    }
    let slow = model
        .strip_prefix("slow-")
        .and_then(|r| r.split('-').next())
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0);
    let wait = slow + knobs.first_token_delay_ms;
    if wait > 0 {
        let mut guard = WaitGuard {
            shared: s.clone(),
            done: false,
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        guard.done = true;
    }
    let mut knobs = knobs;
    if model.starts_with("cut-") {
        s.counters.errors_sent.fetch_add(1, Ordering::Relaxed);
        knobs.fail_after = Some(0);
        // Let the opening chunk reach the client before the cut.
        knobs.token_delay_ms = knobs.token_delay_ms.max(100);
    }
    let n = knobs.tokens.unwrap_or(DEFAULT_TOKENS);
    let start = if knobs.continue_prefix {
        prefix_tokens(&req)
    } else {
        0
    };
    let usage = json!({"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n});
    let id = "chatcmpl-fake";
    let created = 1_700_000_000u64;
    if let Some(text) = structured_answer(&s.opts, &req, seq) {
        return scripted_answer(Err(text), &model, stream, include_usage, &usage, s.clone());
    }
    if let Some(plan) = scripted(&knobs, &req) {
        return scripted_answer(plan, &model, stream, include_usage, &usage, s.clone());
    }
    if !stream {
        let message = match &tool {
            Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": name, "arguments": "{\"city\":\"Paris\"}"}}]}),
            None if model.starts_with("json-") => {
                json!({"role": "assistant", "content": fake_structured(n)})
            }
            None => json!({"role": "assistant", "content": fake_text(n)}),
        };
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        });
        return axum::Json(body).into_response();
    }
    s.counters.streams_started.fetch_add(1, Ordering::Relaxed);
    let chunk = |delta: Value, finish: Option<&str>| -> Bytes {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        Bytes::from(format!("data: {v}\n\n"))
    };
    // The frames, each with a flag telling whether the connection is cut before it.
    let mut frames: Vec<Result<Bytes, ()>> = Vec::new();
    match &tool {
        Some(name) => {
            frames.push(Ok(chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0,
                    "id": "call_1", "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
            )));
            for part in ["{\"city\":", "\"Paris\"}"] {
                frames.push(Ok(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                    None,
                )));
            }
            frames.push(Ok(chunk(json!({}), Some("tool_calls"))));
        }
        None => {
            frames.push(Ok(chunk(json!({"role": "assistant", "content": ""}), None)));
            for i in 0..n {
                if knobs.fail_after == Some(i) {
                    frames.push(Err(()));
                    break;
                }
                if knobs.error_after == Some(i) {
                    let e = json!({"error": {"message": "fake failure mid-stream",
                        "type": "server_error", "code": null, "param": null}});
                    frames.push(Ok(Bytes::from(format!("data: {e}\n\n"))));
                    break;
                }
                if i < start {
                    continue;
                }
                frames.push(Ok(chunk(json!({"content": format!("t{i} ")}), None)));
            }
            if !frames.iter().any(Result::is_err) && knobs.error_after.is_none_or(|e| e >= n) {
                frames.push(Ok(chunk(json!({}), Some("stop"))));
            }
        }
    }
    if include_usage && frames.iter().all(Result::is_ok) {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage});
        frames.push(Ok(Bytes::from(format!("data: {v}\n\n"))));
    }
    if frames.iter().all(Result::is_ok) {
        frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    let guard = StreamGuard {
        shared: s.clone(),
        done: false,
    };
    let delay = Duration::from_millis(knobs.token_delay_ms);
    let body = futures::stream::unfold(
        (frames.into_iter().enumerate(), guard),
        move |(mut it, mut guard)| async move {
            let (i, f) = it.next()?;
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match f {
                Ok(b) => {
                    if it.len() == 0 {
                        guard.done = true;
                    }
                    Some((Ok(b), (it, guard)))
                }
                Err(()) => {
                    // Counted as completed: the fake ended it on purpose.
                    guard.done = true;
                    Some((Err(std::io::Error::other("fake cut")), (it, guard)))
                }
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// The answer of the `calls` knob: this round's calls, or the tool results' text.
fn scripted_answer(
    plan: Plan,
    model: &str,
    stream: bool,
    include_usage: bool,
    usage: &Value,
    shared: Arc<Shared>,
) -> Response {
    let (id, created) = ("chatcmpl-fake", 1_700_000_000u64);
    let finish = if plan.is_ok() { "tool_calls" } else { "stop" };
    if !stream {
        let message = match &plan {
            Ok(calls) => json!({"role": "assistant", "content": null, "tool_calls":
                calls.iter().map(|(cid, name, args)| json!({"id": cid, "type": "function",
                    "function": {"name": name, "arguments": args}})).collect::<Vec<_>>()}),
            Err(text) => json!({"role": "assistant", "content": text}),
        };
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        });
        return axum::Json(body).into_response();
    }
    shared
        .counters
        .streams_started
        .fetch_add(1, Ordering::Relaxed);
    let chunk = |delta: Value, finish: Option<&str>| -> String {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    let mut frames = vec![chunk(json!({"role": "assistant", "content": null}), None)];
    match &plan {
        Ok(calls) => {
            for (i, (cid, name, args)) in calls.iter().enumerate() {
                frames.push(chunk(
                    json!({"tool_calls": [{"index": i, "id": cid, "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                    None,
                ));
                let cut = args.len() / 2;
                let cut = (0..=cut)
                    .rev()
                    .find(|c| args.is_char_boundary(*c))
                    .unwrap_or(0);
                for part in [&args[..cut], &args[cut..]] {
                    frames.push(chunk(
                        json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                        None,
                    ));
                }
            }
        }
        Err(text) => {
            for w in text.split_inclusive(' ') {
                frames.push(chunk(json!({"content": w}), None));
            }
        }
    }
    frames.push(chunk(json!({}), Some(finish)));
    if include_usage {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage});
        frames.push(format!("data: {v}\n\n"));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    let guard = StreamGuard { shared, done: true };
    let body = futures::stream::iter(frames.into_iter().map(move |f| {
        let _keep = &guard;
        Ok::<Bytes, std::io::Error>(Bytes::from(f))
    }));
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// Counts a wait cut short by the caller going away (the handler future dropped).
struct WaitGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if !self.done {
            let c = &self.shared.counters;
            c.waits_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a stream as completed or dropped when its body goes away.
struct StreamGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.shared.counters;
        if self.done {
            c.streams_completed.fetch_add(1, Ordering::Relaxed);
        } else {
            c.streams_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
