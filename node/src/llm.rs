//! Language models for the node, two ways:
//! - [`LlmClient`]: calls the hub's LLM gateway over the node channel (`llm_request`, then
//!   `llm_response_stream` frames and one `llm_response`, correlated by `requestId`). Tools use
//!   it through [`crate::tools::llm::Summarize`] and can use it directly.
//! - [`Upstream`]: a local OpenAI-compatible server (`--llm-upstream`, e.g. Ollama or a
//!   llama.cpp server) whose models the node hosts: [`Upstream::models`] lists them for
//!   `node_register.models`, [`Upstream::chat_stream`] streams an answer for the `llm.chat` tool.
//!
//! No lock is held across an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apex_protocol::{ChatMessage, ErrorInfo, LlmRequest, LlmResponse, LlmResponseStream, Usage};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Error code of a call the node gave up on itself (connection to the hub lost).
pub const CODE_REQUEST_FAILED: &str = apex_protocol::codes::LLM_REQUEST_FAILED;

/// A frame of an LLM call's answer, as it arrives from the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The next piece of text (`llm_response_stream`, `done: false`).
    Chunk(String),
    /// The last frame (`llm_response`): the whole answer or the error.
    Done(LlmResponse),
}

/// The answer of a finished call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    /// The whole text.
    pub content: String,
    /// The tool calls the model made (OpenAI `tool_calls` entries), when `options.tools`
    /// offered some.
    pub tool_calls: Vec<serde_json::Value>,
    /// Token counts, when the hub reported them.
    pub usage: Option<Usage>,
}

/// Why a call failed: the hub's `llm_response.error` (`llm_unavailable`,
/// `rate_limit_exceeded`, `quota_exceeded`, `stream_limit_exceeded`, `llm_request_failed`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CallError {
    /// Machine-readable code.
    pub code: String,
    /// What happened.
    pub message: String,
}

impl From<ErrorInfo> for CallError {
    fn from(e: ErrorInfo) -> Self {
        Self {
            code: e.code,
            message: e.message,
        }
    }
}

struct ClientInner {
    /// Requests for the connection to send (it fills in `nodeId`).
    out: mpsc::UnboundedSender<LlmRequest>,
    /// Calls waiting for answer frames, by request id.
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>,
    default_model: Option<String>,
    next: AtomicU64,
    prefix: String,
}

/// Client of the hub's LLM gateway over the node channel; cheap to clone.
///
/// Requests are queued for the connection and sent while the node is registered; a call whose
/// connection drops fails with `llm_request_failed` (the hub aborts it on its side too).
#[derive(Clone)]
pub struct LlmClient {
    inner: Arc<ClientInner>,
}

/// One call in flight: its answer frames. Dropping it forgets the call (later frames for it
/// are ignored).
pub struct Call {
    client: LlmClient,
    request_id: String,
    rx: mpsc::UnboundedReceiver<Reply>,
}

impl Call {
    /// The call's `requestId`.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next frame; `None` after [`Reply::Done`] or once the call was failed locally.
    pub async fn next(&mut self) -> Option<Reply> {
        self.rx.recv().await
    }

    /// Waits for the last frame and returns the whole answer.
    ///
    /// # Errors
    /// [`CallError`] from the hub, or `llm_request_failed` when the connection dropped.
    pub async fn finish(mut self) -> Result<Answer, CallError> {
        while let Some(r) = self.rx.recv().await {
            if let Reply::Done(resp) = r {
                return outcome(resp);
            }
        }
        Err(CallError {
            code: CODE_REQUEST_FAILED.to_owned(),
            message: "the call ended without an answer".to_owned(),
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.client.inner.pending.lock().remove(&self.request_id);
    }
}

/// The answer or error of an `llm_response`.
fn outcome(resp: LlmResponse) -> Result<Answer, CallError> {
    if resp.success {
        Ok(Answer {
            content: resp.content.unwrap_or_default(),
            tool_calls: resp.tool_calls.map(Vec::from).unwrap_or_default(),
            usage: resp.usage,
        })
    } else {
        Err(resp
            .error
            .map(CallError::from)
            .unwrap_or_else(|| CallError {
                code: CODE_REQUEST_FAILED.to_owned(),
                message: "the hub reported a failure without details".to_owned(),
            }))
    }
}

impl LlmClient {
    /// A client whose calls name `default_model` when they name none. Returns the receiving
    /// end of its request queue, for the connection.
    pub fn new(default_model: Option<String>) -> (Self, mpsc::UnboundedReceiver<LlmRequest>) {
        let (out, rx) = mpsc::unbounded_channel();
        let client = Self {
            inner: Arc::new(ClientInner {
                out,
                pending: Mutex::new(HashMap::new()),
                default_model,
                next: AtomicU64::new(1),
                prefix: uuid::Uuid::new_v4().simple().to_string(),
            }),
        };
        (client, rx)
    }

    /// Starts a call. `model` (else the default model, else the hub's choice) and `options`
    /// (`{stream, temperature, maxTokens, ...}`, an object) go into the `llm_request` as is.
    pub fn start(&self, model: Option<String>, messages: Vec<ChatMessage>, options: Value) -> Call {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let request_id = format!("llm-{}-{n}", self.inner.prefix);
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.pending.lock().insert(request_id.clone(), tx);
        let req = LlmRequest {
            request_id: request_id.clone(),
            node_id: String::new(),
            model: model.or_else(|| self.inner.default_model.clone()),
            messages,
            options: Some(options),
        };
        if self.inner.out.send(req).is_err() {
            self.fail(&request_id, "the node is shutting down");
        }
        Call {
            client: self.clone(),
            request_id,
            rx,
        }
    }

    /// A non-streamed call: the whole answer.
    ///
    /// # Errors
    /// [`CallError`] from the hub, or `llm_request_failed` when the connection dropped.
    pub async fn complete(
        &self,
        model: Option<String>,
        messages: Vec<ChatMessage>,
        options: Value,
    ) -> Result<Answer, CallError> {
        let mut options = match options {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        options.insert("stream".to_owned(), Value::Bool(false));
        self.start(model, messages, Value::Object(options))
            .finish()
            .await
    }

    /// Whether the call `request_id` is still waiting (the connection skips requests that are
    /// not, e.g. dropped before they were sent).
    pub fn is_pending(&self, request_id: &str) -> bool {
        self.inner.pending.lock().contains_key(request_id)
    }

    /// Routes an `llm_response_stream` frame to its call.
    pub fn on_stream(&self, f: LlmResponseStream) {
        if f.done {
            return;
        }
        let tx = self.inner.pending.lock().get(&f.request_id).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(Reply::Chunk(f.chunk));
            }
            None => tracing::debug!(request_id = %f.request_id, "llm chunk for no waiting call"),
        }
    }

    /// Routes an `llm_response` frame to its call, which ends.
    pub fn on_response(&self, f: LlmResponse) {
        let tx = self.inner.pending.lock().remove(&f.request_id);
        match tx {
            Some(tx) => {
                let _ = tx.send(Reply::Done(f));
            }
            None => tracing::debug!(request_id = %f.request_id, "llm answer for no waiting call"),
        }
    }

    fn fail(&self, request_id: &str, why: &str) {
        if let Some(tx) = self.inner.pending.lock().remove(request_id) {
            let _ = tx.send(Reply::Done(failure(request_id, why)));
        }
    }

    /// Fails every waiting call with `llm_request_failed` (the connection to the hub dropped).
    pub fn fail_all(&self, why: &str) {
        let calls: Vec<(String, mpsc::UnboundedSender<Reply>)> =
            self.inner.pending.lock().drain().collect();
        for (id, tx) in calls {
            let _ = tx.send(Reply::Done(failure(&id, why)));
        }
    }
}

fn failure(request_id: &str, why: &str) -> LlmResponse {
    LlmResponse {
        request_id: request_id.to_owned(),
        node_id: String::new(),
        success: false,
        content: None,
        tool_calls: None,
        usage: None,
        error: Some(ErrorInfo::new(CODE_REQUEST_FAILED, why)),
        stream: false,
        timestamp: apex_protocol::now_ms(),
    }
}

/// How long listing the local server's models may take.
pub const MODELS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the local server may take to start answering a chat request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A local OpenAI-compatible server the node hosts models from.
#[derive(Clone)]
pub struct Upstream {
    base: String,
    http: reqwest::Client,
}

/// A finished streamed answer of the local server.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    /// All `delta.content` text, in order.
    pub content: String,
    /// The last `finish_reason` seen.
    pub finish_reason: Option<String>,
    /// `usage`, when the server sent it.
    pub usage: Option<Value>,
    /// How many chunks were read.
    pub chunks: u64,
}

impl Upstream {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:11434/v1`, no trailing `/`).
    ///
    /// # Errors
    /// A message if the HTTP client cannot be built.
    pub fn new(base: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the llm upstream client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET <base>/models`: the ids in `data[].id`, in the server's order.
    ///
    /// # Errors
    /// A one-line message: unreachable, non-2xx status, or not an OpenAI model list.
    pub async fn models(&self) -> Result<Vec<String>, String> {
        let url = format!("{}/models", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(MODELS_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("GET {url}: http {}", status.as_u16()));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("GET {url}: not json: {e}"))?;
        let Some(data) = body.get("data").and_then(Value::as_array) else {
            return Err(format!("GET {url}: no `data` array in the answer"));
        };
        let mut ids = Vec::with_capacity(data.len());
        for m in data {
            if let Some(id) = m.get("id").and_then(Value::as_str)
                && !id.is_empty()
                && !ids.iter().any(|x| x == id)
            {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// `POST <base>/chat/completions` with `body` (an OpenAI request object; `stream` is forced
    /// on) and reads the SSE answer, calling `on_chunk` with each `chat.completion.chunk`
    /// object in order. Dropping the future closes the connection to the server.
    ///
    /// # Errors
    /// A one-line message: unreachable, non-2xx status (with the server's error text), a
    /// chunk that is not JSON, or a stream that ends without `[DONE]` or a `finish_reason`.
    pub async fn chat_stream(
        &self,
        mut body: Value,
        mut on_chunk: impl FnMut(Value),
    ) -> Result<Streamed, String> {
        if let Value::Object(m) = &mut body {
            m.insert("stream".to_owned(), Value::Bool(true));
        }
        let url = format!("{}/chat/completions", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let detail: String = text.chars().take(300).collect();
            return Err(format!(
                "POST {url}: http {}: {}",
                status.as_u16(),
                detail.trim()
            ));
        }
        let mut out = Streamed {
            content: String::new(),
            finish_reason: None,
            usage: None,
            chunks: 0,
        };
        let json_answer = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if json_answer {
            // A server that ignores `stream: true`: its whole answer is one chunk.
            let whole: Value = resp
                .json()
                .await
                .map_err(|e| format!("POST {url}: not json: {e}"))?;
            let chunk = as_chunk(&whole);
            absorb(&mut out, &chunk);
            on_chunk(chunk);
            return Ok(out);
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut bytes = resp.bytes_stream();
        let mut done = false;
        'read: while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|e| format!("POST {url}: stream broken: {e}"))?;
            buf.extend_from_slice(&piece);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    break 'read;
                }
                let chunk: Value = serde_json::from_str(data)
                    .map_err(|e| format!("POST {url}: a chunk is not json: {e}"))?;
                if let Some(err) = chunk.get("error") {
                    return Err(format!("POST {url}: the server reported an error: {err}"));
                }
                absorb(&mut out, &chunk);
                on_chunk(chunk);
            }
        }
        if !done && out.finish_reason.is_none() {
            return Err(format!(
                "POST {url}: the stream ended before the answer was complete"
            ));
        }
        Ok(out)
    }
}

/// A whole `chat.completion` as one `chat.completion.chunk` (message becomes delta).
fn as_chunk(whole: &Value) -> Value {
    let choice = whole.get("choices").and_then(|c| c.get(0));
    let mut chunk = json!({
        "id": whole.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion.chunk",
        "created": whole.get("created").cloned().unwrap_or(Value::Null),
        "model": whole.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "delta": choice.and_then(|c| c.get("message")).cloned().unwrap_or(json!({})),
            "finish_reason": choice
                .and_then(|c| c.get("finish_reason"))
                .cloned()
                .unwrap_or(json!("stop")),
        }],
    });
    if let Some(u) = whole.get("usage").filter(|u| u.is_object()) {
        chunk["usage"] = u.clone();
    }
    chunk
}

/// Adds a chunk's text, finish reason and usage to `out`.
fn absorb(out: &mut Streamed, chunk: &Value) {
    out.chunks += 1;
    if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
        if let Some(t) = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
        {
            out.content.push_str(t);
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            out.finish_reason = Some(f.to_owned());
        }
    }
    if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
        out.usage = Some(u.clone());
    }
}

/// The `chat.completion` object a streamed answer adds up to (the `llm.chat` task result).
pub fn completion(model: &str, s: &Streamed) -> Value {
    let mut v = json!({
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": s.content},
            "finish_reason": s.finish_reason.clone().unwrap_or_else(|| "stop".to_owned()),
        }],
    });
    if let Some(u) = &s.usage {
        v["usage"] = u.clone();
    }
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_correlated_and_failed_on_disconnect() {
        let (client, mut out) = LlmClient::new(Some("m1".into()));
        let mut call = client.start(None, vec![], json!({"stream": true}));
        let req = out.recv().await.unwrap();
        assert_eq!(req.model.as_deref(), Some("m1"));
        assert_eq!(req.request_id, call.request_id());
        client.on_stream(LlmResponseStream {
            request_id: req.request_id.clone(),
            node_id: "n".into(),
            chunk: "hel".into(),
            done: false,
            usage: None,
            timestamp: 0,
        });
        assert_eq!(call.next().await, Some(Reply::Chunk("hel".into())));
        // A frame for another call goes nowhere.
        client.on_stream(LlmResponseStream {
            request_id: "other".into(),
            node_id: "n".into(),
            chunk: "x".into(),
            done: false,
            usage: None,
            timestamp: 0,
        });
        client.fail_all("connection lost");
        let err = call.finish().await.unwrap_err();
        assert_eq!(err.code, CODE_REQUEST_FAILED);
        assert!(!client.is_pending(&req.request_id));
    }

    #[test]
    fn a_whole_answer_becomes_one_chunk() {
        let whole = json!({"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop"}], "usage": {"total_tokens": 2}});
        let c = as_chunk(&whole);
        assert_eq!(c["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(c["usage"]["total_tokens"], 2);
    }

    #[test]
    fn chunks_add_up_to_a_completion() {
        let mut s = Streamed {
            content: String::new(),
            finish_reason: None,
            usage: None,
            chunks: 0,
        };
        absorb(&mut s, &json!({"choices":[{"delta":{"role":"assistant"}}]}));
        absorb(&mut s, &json!({"choices":[{"delta":{"content":"Hi "}}]}));
        absorb(
            &mut s,
            &json!({"choices":[{"delta":{"content":"there"},"finish_reason":"stop"}]}),
        );
        absorb(&mut s, &json!({"choices":[],"usage":{"total_tokens":3}}));
        let c = completion("m", &s);
        assert_eq!(c["choices"][0]["message"]["content"], "Hi there");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(c["usage"]["total_tokens"], 3);
        assert_eq!(s.chunks, 4);
    }
}
