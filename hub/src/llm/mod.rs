//! The LLM gateway: one place where HTTP clients (`POST /v1/chat/completions`) and nodes
//! (`llm_request`) reach language models.
//!
//! # The seam
//! - [`Gateway`] is built from the hub's [`Config`](crate::config::Config) (its `llm` section,
//!   [`LlmConfig`]) plus any extra [`Backend`]s added with [`Gateway::with_backend`] (the
//!   node-hosted models of `node_models.rs`). It is immutable once built and shared as
//!   `Arc<Gateway>`; a config reload builds a new one (calls in flight keep the old one).
//! - [`Gateway::chat`] takes a parsed [`ChatRequest`] and a [`CallContext`] (request id,
//!   cancellation token, caller) and returns a [`ChatStream`] of normalized [`ChatChunk`]s, or an
//!   [`LlmError`] that maps to an HTTP status ([`LlmError::status`]) and a node error code
//!   ([`LlmError::node_code`]).
//! - Routing: the requested model name is resolved to an ordered list of deployments
//!   (backend + model name at that backend): an alias from `llm.aliases`, an explicit
//!   `provider/model`, or every backend that [`Backend::serves`] the name, in config order and
//!   then the added backends; then the name's `llm.fallbacks`. Connect errors, 429, 5xx and
//!   first-token timeouts before the first token (the first chunk that
//!   [`ChatChunk::carries_answer`]; role-only opening chunks are held until then) move on to the
//!   next deployment ([`LlmError::retryable`]); after it an error is yielded by the stream and
//!   the stream ends.
//! - Interrupts: while a call runs, its request id is registered; [`Gateway::interrupt`]
//!   cancels it. A cancelled call (by interrupt or by `ctx.cancel`) ends its stream with one
//!   chunk whose `finish_reason` is `"stop"` and `interrupted` is true. Dropping the
//!   [`ChatStream`] aborts the upstream call (the HTTP connection to the upstream is closed) and
//!   unregisters the id.
//! - Usage: each usage report of a call is passed, as the stream yields it, to the context's
//!   [`UsageHook`] (the rate limits charge a caller's token budget this way).
//!
//! Nothing here holds a lock across an `.await`.

pub mod config;
pub mod embeddings;
mod mock;
pub mod mock_schema;
pub mod node_models;
pub mod node_proxy;
mod openai;
mod sse;
pub mod tool_loop;
mod upstream_http;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use config::{LlmConfig, ProviderConfig, ProviderKind};
pub use mock::Mock;
pub use openai::OpenAiUpstream;

/// Who makes a call: an HTTP client of the hub or a node over the node channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client of `POST /v1/chat/completions`.
    Http,
    /// A node's `llm_request`; the node id.
    Node(String),
}

/// Per-call context.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The request id: `X-Request-ID` of the HTTP response, the key of `POST /v1/interrupt`,
    /// or the node's `llm_request.requestId`. Unique among calls in flight (a second call
    /// with an id in use is refused with [`LlmError::InvalidRequest`] on `requestId`).
    pub request_id: String,
    /// Cancelling this token aborts the call like an interrupt does (the stream ends with a
    /// `finish_reason: "stop"` chunk). The node side cancels it when the node disconnects.
    pub cancel: CancellationToken,
    /// Who calls.
    pub caller: Caller,
    /// Told each usage report of the call as its stream yields it (`None`: nobody).
    pub on_usage: Option<UsageHook>,
}

impl CallContext {
    /// A context with a fresh cancellation token.
    pub fn new(request_id: impl Into<String>, caller: Caller) -> Self {
        Self {
            request_id: request_id.into(),
            cancel: CancellationToken::new(),
            caller,
            on_usage: None,
        }
    }

    /// The context with `hook` told every usage report of the call.
    pub fn with_usage_hook(mut self, hook: UsageHook) -> Self {
        self.on_usage = Some(hook);
        self
    }
}

/// A function told each [`Usage`] a call reports, on the task polling its [`ChatStream`], as
/// the chunk carrying it is yielded (usually once, at the end; never for a call that ended
/// before its upstream reported usage). It must not block.
#[derive(Clone)]
pub struct UsageHook(Arc<dyn Fn(&Usage) + Send + Sync>);

impl UsageHook {
    /// A hook calling `f`.
    pub fn new(f: impl Fn(&Usage) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for UsageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageHook")
    }
}

/// A chat request in the OpenAI Chat Completions shape, with the fields the gateway reads
/// taken out and everything else kept in `extra`, passed to the upstream untouched.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The requested model name (an alias, `provider/model`, or a model name).
    pub model: String,
    /// `messages`, as given (OpenAI message objects; not validated beyond being a non-empty
    /// array of objects).
    pub messages: Vec<Value>,
    /// `stream`: whether the caller wants chunks as they come. When false, the
    /// [`ChatStream`] yields exactly one chunk holding the whole answer.
    pub stream: bool,
    /// `stream_options.include_usage`: the upstream is asked to send usage in a last chunk.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens` (sent upstream under the name it came in).
    pub max_tokens: Option<u64>,
    /// `temperature`, 0 to 2.
    pub temperature: Option<f64>,
    /// `stop`: a string or an array of up to 4 strings, as given.
    pub stop: Option<Value>,
    /// `tools`, as given (passed through).
    pub tools: Option<Value>,
    /// `tool_choice`, as given (passed through).
    pub tool_choice: Option<Value>,
    /// Every other body field (including `max_tokens`/`max_completion_tokens`, `n`,
    /// `stream_options` and unknown ones), passed through to OpenAI-compatible upstreams.
    /// `requestId`/`messageId` are removed.
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// Parses an OpenAI Chat Completions body.
    ///
    /// Returns the request and the body's `requestId` (or `messageId`) if it had one.
    ///
    /// # Errors
    /// [`LlmError::InvalidRequest`] naming the field: body not an object, `model` missing or
    /// not a string, `messages` missing/empty/not objects, `n` other than 1, `stream` not a
    /// boolean, `temperature` not a number in 0..=2, `max_tokens` not a positive integer,
    /// `stop` not a string or array of strings, `tools` not an array.
    pub fn from_json(body: Value) -> Result<(ChatRequest, Option<String>), LlmError> {
        let Value::Object(mut m) = body else {
            return Err(LlmError::invalid("body", "the body must be a JSON object"));
        };
        let model = match m.remove("model") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(LlmError::invalid(
                    "model",
                    "`model` must be a non-empty string",
                ));
            }
        };
        let messages = match m.remove("messages") {
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_object) => a,
            _ => {
                return Err(LlmError::invalid(
                    "messages",
                    "`messages` must be a non-empty array of message objects",
                ));
            }
        };
        let mut id = None;
        for k in ["requestId", "messageId"] {
            match m.remove(k) {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => {
                    id.get_or_insert(s);
                }
                None | Some(Value::Null) => {}
                Some(_) => {
                    return Err(LlmError::invalid(
                        k,
                        format!("`{k}` must be a string of 1 to 256 characters"),
                    ));
                }
            }
        }
        match m.get("n") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(1) => {}
            Some(_) => return Err(LlmError::invalid("n", "only `n: 1` is supported")),
        }
        let stream = match m.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(LlmError::invalid("stream", "`stream` must be a boolean")),
        };
        let include_usage = stream
            && m.get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let mut max_tokens = None;
        for k in ["max_tokens", "max_completion_tokens"] {
            match m.get(k) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => max_tokens = Some(n),
                    _ => {
                        return Err(LlmError::invalid(
                            k,
                            format!("`{k}` must be a positive integer"),
                        ));
                    }
                },
            }
        }
        let temperature = match m.get("temperature") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(t) if (0.0..=2.0).contains(&t) => Some(t),
                _ => {
                    return Err(LlmError::invalid(
                        "temperature",
                        "`temperature` must be a number from 0 to 2",
                    ));
                }
            },
        };
        let stop = match m.get("stop") {
            None | Some(Value::Null) => None,
            Some(v @ Value::String(_)) => Some(v.clone()),
            Some(v @ Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
                Some(v.clone())
            }
            Some(_) => {
                return Err(LlmError::invalid(
                    "stop",
                    "`stop` must be a string or an array of up to 4 strings",
                ));
            }
        };
        let tools = match m.get("tools") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Array(_)) => Some(v.clone()),
            Some(_) => return Err(LlmError::invalid("tools", "`tools` must be an array")),
        };
        let tool_choice = m.get("tool_choice").filter(|v| !v.is_null()).cloned();
        // Read fields stay in `extra` too (except model/messages): the upstream gets the body
        // as the client sent it.
        Ok((
            ChatRequest {
                model,
                messages,
                stream,
                include_usage,
                max_tokens,
                temperature,
                stop,
                tools,
                tool_choice,
                extra: m,
            },
            id,
        ))
    }

    /// A request built from parts (the node proxy's `llm_request`). `extra` starts empty;
    /// fields set here are what the upstream receives.
    pub fn simple(model: impl Into<String>, messages: Vec<Value>, stream: bool) -> Self {
        Self {
            model: model.into(),
            messages,
            stream,
            ..Self::default()
        }
    }

    /// The body sent to an OpenAI-compatible upstream for `upstream_model`: `extra`, then the
    /// typed fields (which win), `model` replaced. Same content as
    /// [`ChatRequest::upstream_json`], as a `Value`.
    pub fn upstream_body(&self, upstream_model: &str) -> Value {
        serde_json::to_value(UpstreamBody {
            req: self,
            model: upstream_model,
        })
        .unwrap_or(Value::Null)
    }

    /// The upstream body of [`ChatRequest::upstream_body`] serialised straight to JSON bytes,
    /// without copying the messages (the hot path).
    ///
    /// # Errors
    /// Only if serialisation fails (it does not for values parsed from JSON).
    pub fn upstream_json(&self, upstream_model: &str) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&UpstreamBody {
            req: self,
            model: upstream_model,
        })
    }
}

/// Serialises a request for an upstream without cloning it.
struct UpstreamBody<'a> {
    req: &'a ChatRequest,
    model: &'a str,
}

impl Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.req;
        let usage = r.stream && r.include_usage;
        let typed_max = r.max_tokens.filter(|_| {
            !r.extra.contains_key("max_tokens") && !r.extra.contains_key("max_completion_tokens")
        });
        let overridden = |k: &str| match k {
            "model" | "messages" | "stream" => true,
            "stream_options" => usage,
            "temperature" => r.temperature.is_some(),
            "stop" => r.stop.is_some(),
            "tools" => r.tools.is_some(),
            "tool_choice" => r.tool_choice.is_some(),
            _ => false,
        };
        let mut m = s.serialize_map(None)?;
        for (k, v) in &r.extra {
            if !overridden(k) {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("model", self.model)?;
        m.serialize_entry("messages", &r.messages)?;
        m.serialize_entry("stream", &r.stream)?;
        if usage {
            m.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        if let Some(n) = typed_max {
            m.serialize_entry("max_tokens", &n)?;
        }
        if let Some(t) = r.temperature {
            m.serialize_entry("temperature", &t)?;
        }
        if let Some(v) = &r.stop {
            m.serialize_entry("stop", v)?;
        }
        if let Some(v) = &r.tools {
            m.serialize_entry("tools", v)?;
        }
        if let Some(v) = &r.tool_choice {
            m.serialize_entry("tool_choice", v)?;
        }
        m.end()
    }
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Sum of both.
    #[serde(default)]
    pub total_tokens: u64,
}

/// One normalized piece of an answer.
///
/// For a streamed call, one chunk per upstream `chat.completion.chunk`; for a non-streamed
/// call, exactly one chunk with the whole answer (`text` is the whole content, `tool_calls`
/// the whole `message.tool_calls` array, `finish_reason` and `usage` set).
#[derive(Debug, Clone, Default)]
pub struct ChatChunk {
    /// Text to append to the assistant message (`choices[0].delta.content`); may be empty.
    pub text: String,
    /// Tool calls as OpenAI sends them: the `choices[0].delta.tool_calls` array of a stream
    /// chunk (deltas keyed by `index`), or the `message.tool_calls` array of a whole answer.
    pub tool_calls: Option<Value>,
    /// Why the answer ended (`stop`, `length`, `tool_calls`, `content_filter`); set on the
    /// chunk that ends the choice.
    pub finish_reason: Option<String>,
    /// Token usage, when reported (usually on the last chunk, or a usage-only chunk).
    pub usage: Option<Usage>,
    /// True on the synthetic last chunk of a cancelled call (`finish_reason` is `"stop"`).
    pub interrupted: bool,
    /// The chunk exactly as an OpenAI client should receive it (the JSON of a
    /// `chat.completion.chunk`, or of a whole `chat.completion` for a non-streamed call), with
    /// `model` already set to the requested name. `None` for chunks the gateway or a backend
    /// made itself; the HTTP layer then serialises the normalized fields.
    pub raw: Option<Bytes>,
    /// Top-level fields the hub adds to the response object this chunk is rendered into
    /// (`apex_tool_runs`, `apex_tool_rounds_exhausted` of the server-side tool loop,
    /// [`tool_loop`]); only on chunks without `raw`. `None` for everything else.
    pub apex: Option<Map<String, Value>>,
}

impl ChatChunk {
    /// Whether the chunk carries part of the answer (text, tool calls, an end, usage or the
    /// interrupt stop), as opposed to an opening chunk with only `role`.
    pub fn carries_answer(&self) -> bool {
        !self.text.is_empty()
            || self.tool_calls.is_some()
            || self.finish_reason.is_some()
            || self.usage.is_some()
            || self.interrupted
    }
}

/// A model as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name clients put in `model`.
    pub id: String,
    /// Creation time, Unix seconds (0 when unknown).
    pub created: u64,
    /// Provider name, or `node:<node id>` for node-hosted models.
    pub owned_by: String,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// The request is malformed (HTTP 400, node code `llm_request_failed`).
    #[error("{message}")]
    InvalidRequest {
        /// The field at fault.
        param: String,
        /// What is wrong.
        message: String,
    },
    /// No backend serves the model (HTTP 404 `model_not_found`, node code `llm_unavailable`).
    #[error("the model `{0}` does not exist or is not served by this hub")]
    ModelNotFound(String),
    /// The upstream answered 429 on every deployment (HTTP 429, node code
    /// `rate_limit_exceeded`).
    #[error("rate limited by the upstream: {0}")]
    RateLimited(String),
    /// The upstream failed: a 5xx or another bad status, a broken or malformed stream, a
    /// timeout after connecting (HTTP 502, node code `llm_request_failed`).
    #[error("upstream error: {message}")]
    Upstream {
        /// Upstream HTTP status, when there was one.
        status: Option<u16>,
        /// What happened (never contains API keys).
        message: String,
    },
    /// No upstream could be reached, or none answered in time before the first token
    /// (HTTP 503, node code `llm_unavailable`).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

impl LlmError {
    /// An [`LlmError::InvalidRequest`].
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            param: param.into(),
            message: message.into(),
        }
    }

    /// Whether the gateway tries the next deployment when this happens before the first
    /// chunk: connect errors and timeouts, 429 and 5xx.
    pub fn retryable(&self) -> bool {
        match self {
            Self::RateLimited(_) | Self::Unavailable(_) => true,
            Self::Upstream { status, .. } => status.is_none_or(|s| s >= 500),
            Self::InvalidRequest { .. } | Self::ModelNotFound(_) => false,
        }
    }

    /// The HTTP status for a client: 400, 404, 429, 502 or 503.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidRequest { .. } => 400,
            Self::ModelNotFound(_) => 404,
            Self::RateLimited(_) => 429,
            Self::Upstream { status, .. } => match status {
                // An upstream's own client error (e.g. 400 on a bad tool schema) goes back as is.
                Some(s @ 400..=499) if *s != 401 && *s != 403 && *s != 429 => *s,
                _ => 502,
            },
            Self::Unavailable(_) => 503,
        }
    }

    /// The OpenAI error `code`: `invalid_request`, `model_not_found`, `rate_limit_exceeded`,
    /// `upstream_error`, `upstream_unavailable`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::ModelNotFound(_) => "model_not_found",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::Upstream { .. } => "upstream_error",
            Self::Unavailable(_) => "upstream_unavailable",
        }
    }

    /// The OpenAI error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request_error",
            Self::ModelNotFound(_) => "invalid_request_error",
            Self::RateLimited(_) => "rate_limit_error",
            Self::Upstream { .. } | Self::Unavailable(_) => "server_error",
        }
    }

    /// The `param` of the OpenAI error object, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => Some(param),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The node channel's `llm_response.error.code`: `llm_unavailable`,
    /// `rate_limit_exceeded` or `llm_request_failed`.
    pub fn node_code(&self) -> &'static str {
        match self {
            Self::ModelNotFound(_) | Self::Unavailable(_) => apex_protocol::codes::LLM_UNAVAILABLE,
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::InvalidRequest { .. } | Self::Upstream { .. } => {
                apex_protocol::codes::LLM_REQUEST_FAILED
            }
        }
    }
}

/// The stream a [`Backend`] returns: chunks until the answer ends, or an error.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, LlmError>> + Send>>;

/// A source of models: an OpenAI-compatible upstream, the mock, or the nodes hosting models.
///
/// Implementations must be cheap to query (`models`, `serves` are called on every request and
/// must not block: keep a cached list) and must abort their upstream work when the returned
/// stream is dropped.
pub trait Backend: Send + Sync + 'static {
    /// The name used in `provider/model` references and logs (a provider's `name`, or
    /// `nodes`).
    fn name(&self) -> &str;

    /// The models served now, for `GET /v1/models`.
    fn models(&self) -> Vec<ModelInfo>;

    /// Whether this backend serves `model` now (the name at this backend, not an alias).
    fn serves(&self, model: &str) -> bool;

    /// How long to wait from the start of [`Backend::call`] for the first chunk before trying
    /// the next deployment. Default 60 s.
    fn first_token_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Longest a whole call may take, from its start to its last chunk; past it the stream
    /// yields [`LlmError::Upstream`] and ends. Default 600 s.
    fn total_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    /// Starts a call of `model` (the name at this backend) for `req`.
    ///
    /// `req.model` is the name the caller asked for; chunks' `raw` must report it as `model`.
    /// The future resolves once the call is under way (for HTTP: response headers received);
    /// failures to start are errors of the future, later ones items of the stream. The gateway
    /// handles timeouts and cancellation around it; dropping the future or the stream must
    /// abort the work.
    fn call<'a>(
        &'a self,
        model: &'a str,
        req: &'a ChatRequest,
        ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>>;

    /// Embeds `req.texts` with `model` (the name at this backend): one vector per input, in
    /// order ([`embeddings`]). Default: 400 on `model`, the backend does not serve embeddings.
    fn embeddings<'a>(
        &'a self,
        model: &'a str,
        req: &'a embeddings::EmbeddingRequest,
    ) -> BoxFuture<'a, Result<embeddings::Embeddings, LlmError>> {
        let _ = req;
        let e = embeddings::unsupported(self.name(), model);
        Box::pin(async move { Err(e) })
    }
}

/// One place a model can be served: a backend and the model's name there.
#[derive(Clone)]
struct Deployment {
    backend: Arc<dyn Backend>,
    model: String,
}

/// The calls in flight, by request id, for interrupts.
#[derive(Default)]
struct Registry {
    calls: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next: AtomicU64,
}

/// Removes a call from the registry when its stream (or the failed attempt) ends.
struct Registration {
    registry: Arc<Registry>,
    id: String,
    token: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut calls = self.registry.calls.lock();
        if calls.get(&self.id).is_some_and(|(t, _)| *t == self.token) {
            calls.remove(&self.id);
        }
    }
}

/// The LLM gateway. See the [module docs](self).
pub struct Gateway {
    backends: Vec<Arc<dyn Backend>>,
    aliases: HashMap<String, Vec<String>>,
    fallbacks: HashMap<String, Vec<String>>,
    registry: Arc<Registry>,
}

impl Gateway {
    /// Builds the configured providers (no network I/O; model discovery, when a provider
    /// lists no models, runs in the background on the current Tokio runtime).
    ///
    /// # Errors
    /// A provider whose HTTP client cannot be built (bad `base_url`).
    pub fn from_config(cfg: &LlmConfig) -> Result<Gateway, LlmError> {
        let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
        for p in &cfg.providers {
            match p.kind {
                ProviderKind::Openai => backends.push(Arc::new(OpenAiUpstream::new(p)?)),
                ProviderKind::Mock => backends.push(Arc::new(Mock::new(p))),
            }
        }
        Ok(Gateway {
            backends,
            aliases: cfg.aliases.clone(),
            fallbacks: cfg.fallbacks.clone(),
            registry: Arc::default(),
        })
    }

    /// A gateway with no providers: every model is `model_not_found` until backends are added.
    pub fn empty() -> Gateway {
        Gateway {
            backends: Vec::new(),
            aliases: Default::default(),
            fallbacks: Default::default(),
            registry: Arc::default(),
        }
    }

    /// Adds a backend after the configured ones (e.g. node-hosted models). Its models are
    /// reachable by name, by `<name>/<model>`, and from aliases and fallback lists.
    pub fn with_backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backends.push(backend);
        self
    }

    /// Every model of every backend, then every alias (owned by `apex`), without duplicates
    /// (the first backend listing a name wins).
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for b in &self.backends {
            for m in b.models() {
                if seen.insert(m.id.clone()) {
                    out.push(m);
                }
            }
        }
        let mut aliases: Vec<&String> = self.aliases.keys().collect();
        aliases.sort();
        for a in aliases {
            if seen.insert(a.clone()) {
                out.push(ModelInfo {
                    id: a.clone(),
                    created: 0,
                    owned_by: "apex".to_owned(),
                });
            }
        }
        out
    }

    /// Cancels the call with this request id. Returns false when no such call is in flight.
    pub fn interrupt(&self, request_id: &str) -> bool {
        let token = self
            .registry
            .calls
            .lock()
            .get(request_id)
            .map(|(_, t)| t.clone());
        match token {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Registers `ctx`'s request id for interrupts while no model call of it runs (the tool
    /// loop between two model calls, [`tool_loop`]): [`Gateway::interrupt`] then cancels
    /// `ctx.cancel`. The id is freed when the returned guard drops; `None` if the id is in
    /// flight already.
    pub(crate) fn hold_request_id(&self, ctx: &CallContext) -> Option<impl Drop + Send + use<>> {
        let mut calls = self.registry.calls.lock();
        if calls.contains_key(&ctx.request_id) {
            return None;
        }
        let token = self.registry.next.fetch_add(1, Ordering::Relaxed);
        calls.insert(ctx.request_id.clone(), (token, ctx.cancel.clone()));
        Some(Registration {
            registry: self.registry.clone(),
            id: ctx.request_id.clone(),
            token,
        })
    }

    /// Number of calls in flight.
    pub fn in_flight(&self) -> usize {
        self.registry.calls.lock().len()
    }

    /// Resolves a reference (`provider/model`, or a model name served by some backend) to
    /// deployments, appending to `out`.
    fn resolve_ref(&self, r: &str, out: &mut Vec<Deployment>) {
        if let Some((prov, model)) = r.split_once('/')
            && let Some(b) = self.backends.iter().find(|b| b.name() == prov)
            && b.serves(model)
        {
            out.push(Deployment {
                backend: b.clone(),
                model: model.to_owned(),
            });
            return;
        }
        for b in &self.backends {
            if b.serves(r) {
                out.push(Deployment {
                    backend: b.clone(),
                    model: r.to_owned(),
                });
            }
        }
    }

    fn deployments(&self, model: &str) -> Vec<Deployment> {
        let mut out = Vec::new();
        if let Some(list) = self.aliases.get(model) {
            for r in list {
                self.resolve_ref(r, &mut out);
            }
        } else {
            self.resolve_ref(model, &mut out);
        }
        if let Some(list) = self.fallbacks.get(model) {
            for r in list {
                self.resolve_ref(r, &mut out);
            }
        }
        out
    }

    /// Runs a chat call. See the [module docs](self) for routing, fallback and interrupts.
    ///
    /// Resolves when the first chunk carrying part of the answer ([`ChatChunk::carries_answer`];
    /// opening role-only chunks are held with it) has arrived from some deployment (so fallback
    /// has been decided), or when the call was cancelled before (then the stream holds only the
    /// `interrupted` stop chunk).
    ///
    /// # Errors
    /// [`LlmError::ModelNotFound`] when nothing serves `req.model`;
    /// [`LlmError::InvalidRequest`] when `ctx.request_id` is already in flight; otherwise the
    /// error of the last deployment tried.
    pub async fn chat(&self, req: ChatRequest, ctx: CallContext) -> Result<ChatStream, LlmError> {
        let call_started = tokio::time::Instant::now();
        let deployments = self.deployments(&req.model);
        let Some(first) = deployments.first() else {
            let e = LlmError::ModelNotFound(req.model);
            record_failed(None, &e);
            return Err(e);
        };
        // One `chat {model}` client span for the whole call (kept by the stream's record).
        let span = crate::telemetry::llm_span(first.backend.name(), &req.model);
        let registration = {
            let mut calls = self.registry.calls.lock();
            if calls.contains_key(&ctx.request_id) {
                return Err(LlmError::invalid(
                    "requestId",
                    format!("request id `{}` is already in flight", ctx.request_id),
                ));
            }
            let token = self.registry.next.fetch_add(1, Ordering::Relaxed);
            calls.insert(ctx.request_id.clone(), (token, ctx.cancel.clone()));
            Registration {
                registry: self.registry.clone(),
                id: ctx.request_id.clone(),
                token,
            }
        };
        let mut last_err = None;
        for (i, d) in deployments.iter().enumerate() {
            let started = tokio::time::Instant::now();
            let first_token_timeout = d.backend.first_token_timeout();
            // Up to the first chunk that carries part of the answer (a role-only opening chunk
            // is held with it): until then a failure can still move to the next deployment,
            // and the client gets the opening chunks and the first token in one write.
            let attempt = async {
                let mut s = d.backend.call(&d.model, &req, &ctx).await?;
                let mut head = VecDeque::with_capacity(2);
                loop {
                    match s.next().await {
                        Some(Ok(c)) => {
                            let answer = c.carries_answer();
                            head.push_back(c);
                            if answer {
                                return Ok((head, s));
                            }
                        }
                        Some(Err(e)) => return Err(e),
                        None if head.is_empty() => {
                            return Err(LlmError::Upstream {
                                status: None,
                                message: "the upstream ended the answer without any chunk"
                                    .to_owned(),
                            });
                        }
                        // Ended with opening chunks only; the stream is done, never poll it again.
                        None => return Ok((head, futures::stream::empty().boxed())),
                    }
                }
            };
            let attempt = tracing::Instrument::instrument(attempt, span.clone());
            let outcome = tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => None,
                r = tokio::time::timeout(first_token_timeout, attempt) => Some(r),
            };
            let (head, rest) = match outcome {
                None => {
                    return Ok(ChatStream::interrupted(req.model, ctx, registration));
                }
                Some(Ok(Ok(pair))) => pair,
                Some(Ok(Err(e))) => {
                    if e.retryable() && i + 1 < deployments.len() {
                        tracing::warn!(request_id = %ctx.request_id, backend = d.backend.name(),
                            model = %d.model, error = %e, "llm deployment failed, trying the next");
                    }
                    if !e.retryable() {
                        record_failed(Some((d.backend.name(), &d.model)), &e);
                        return Err(e);
                    }
                    last_err = Some(e);
                    continue;
                }
                Some(Err(_)) => {
                    let e = LlmError::Unavailable(format!(
                        "no first token from `{}/{}` within {} ms",
                        d.backend.name(),
                        d.model,
                        first_token_timeout.as_millis()
                    ));
                    tracing::warn!(request_id = %ctx.request_id, error = %e, "llm first-token timeout");
                    last_err = Some(e);
                    continue;
                }
            };
            let deadline = started + d.backend.total_timeout();
            let record = CallRecord {
                provider: d.backend.name().to_owned(),
                model: d.model.clone(),
                started: call_started,
                outcome: "ok",
                ended: false,
                span: span.clone(),
            };
            let m = crate::metrics::get();
            m.llm_ttft
                .with_label_values(&[&record.provider, &record.model])
                .observe(call_started.elapsed().as_secs_f64());
            return Ok(ChatStream {
                on_usage: ctx.on_usage.clone(),
                model: req.model,
                deployment: format!("{}/{}", d.backend.name(), d.model),
                head,
                inner: Some(rest),
                cancel: Box::pin(ctx.cancel.clone().cancelled_owned()),
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                request_id: ctx.request_id,
                record: Some(record),
                _registration: registration,
            });
        }
        let e = last_err.unwrap_or_else(|| LlmError::Unavailable("no deployment".to_owned()));
        let last = deployments
            .last()
            .map(|d| (d.backend.name(), d.model.as_str()));
        record_failed(last, &e);
        Err(e)
    }
}

/// The answer of [`Gateway::chat`]: a stream of [`ChatChunk`]s, then `None`.
///
/// It ends after the upstream's last chunk, after an `Err` item (upstream failure or total
/// timeout after the first chunk: never a silent truncation), or after the `interrupted`
/// stop chunk when the call is cancelled. Dropping it aborts the upstream call and frees the
/// request id.
pub struct ChatStream {
    model: String,
    deployment: String,
    request_id: String,
    /// Chunks already received (the opening ones and the first that carries the answer),
    /// yielded before `inner` is polled.
    head: VecDeque<ChatChunk>,
    inner: Option<ChunkStream>,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    record: Option<CallRecord>,
    on_usage: Option<UsageHook>,
    _registration: Registration,
}

/// One call's entry in the LLM metrics (`apex_llm_*`, declared in [`crate::metrics`]):
/// time to first token when the stream is made, tokens as usage chunks pass, and the outcome
/// and duration when the stream is dropped. Labels are the deployment that served the call
/// (a configured provider or node backend and one of its models), never request ids.
struct CallRecord {
    provider: String,
    model: String,
    started: tokio::time::Instant,
    /// `ok`, `error`, `interrupted`, or `aborted` (dropped before its end).
    outcome: &'static str,
    ended: bool,
    /// Kept for the life of the call, so the exported `chat {model}` span
    /// ([`crate::telemetry::llm_span`]) covers the whole call and carries its token usage.
    span: tracing::Span,
}

impl CallRecord {
    fn tokens(&self, u: &Usage) {
        self.span
            .record("gen_ai.usage.input_tokens", u.prompt_tokens)
            .record("gen_ai.usage.output_tokens", u.completion_tokens);
        let m = crate::metrics::get();
        m.llm_tokens
            .with_label_values(&[&self.provider, &self.model, "prompt"])
            .inc_by(u.prompt_tokens);
        m.llm_tokens
            .with_label_values(&[&self.provider, &self.model, "completion"])
            .inc_by(u.completion_tokens);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let outcome = if self.ended || self.outcome != "ok" {
            self.outcome
        } else {
            "aborted"
        };
        let m = crate::metrics::get();
        m.llm_requests
            .with_label_values(&[&self.provider, &self.model, outcome])
            .inc();
        m.llm_duration
            .with_label_values(&[&self.provider, &self.model])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Counts a call that failed before any deployment answered (`outcome` = the error code).
/// Unknown models are counted under `provider="none", model=""` so clients cannot grow the
/// label set.
fn record_failed(deployment: Option<(&str, &str)>, e: &LlmError) {
    let (provider, model) = deployment.unwrap_or(("none", ""));
    crate::metrics::get()
        .llm_requests
        .with_label_values(&[provider, model, e.code()])
        .inc();
}

impl ChatStream {
    fn interrupted(model: String, ctx: CallContext, registration: Registration) -> Self {
        ChatStream {
            model,
            deployment: String::new(),
            head: VecDeque::from([stop_chunk()]),
            inner: None,
            cancel: Box::pin(ctx.cancel.clone().cancelled_owned()),
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            request_id: ctx.request_id,
            record: None,
            on_usage: None,
            _registration: registration,
        }
    }

    /// The model name the caller asked for (what responses report as `model`).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `backend/model` that serves the call (empty if it was cancelled before any answered).
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// The call's request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

fn stop_chunk() -> ChatChunk {
    ChatChunk {
        finish_reason: Some("stop".to_owned()),
        interrupted: true,
        ..ChatChunk::default()
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = this.poll_inner(cx);
        if let (Some(hook), Poll::Ready(Some(Ok(ChatChunk { usage: Some(u), .. })))) =
            (&this.on_usage, &item)
        {
            (hook.0)(u);
        }
        if let Some(r) = this.record.as_mut() {
            match &item {
                Poll::Ready(Some(Ok(c))) => {
                    if let Some(u) = &c.usage {
                        r.tokens(u);
                    }
                    if c.interrupted {
                        r.outcome = "interrupted";
                    }
                }
                Poll::Ready(Some(Err(_))) => r.outcome = "error",
                Poll::Ready(None) => r.ended = true,
                Poll::Pending => {}
            }
        }
        item
    }
}

impl ChatStream {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ChatChunk, LlmError>>> {
        let this = self;
        if let Some(c) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(c)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.cancel.as_mut().poll(cx).is_ready() {
            this.inner = None;
            return Poll::Ready(Some(Ok(stop_chunk())));
        }
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(c))) => Poll::Ready(Some(Ok(c))),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.inner = None;
                    return Poll::Ready(Some(Err(LlmError::Upstream {
                        status: None,
                        message: "the call exceeded its total timeout".to_owned(),
                    })));
                }
                Poll::Pending
            }
        }
    }
}

use std::future::Future as _;

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The current [`Gateway`], swappable on config reload. Cloning the inner `Arc` per call is
/// the only cost; calls in flight keep the gateway they started on, and interrupts reach them
/// after a swap (the interrupt registry moves to the new gateway).
pub struct GatewayHandle {
    inner: parking_lot::RwLock<Arc<Gateway>>,
}

impl GatewayHandle {
    /// Wraps a gateway.
    pub fn new(gateway: Gateway) -> Self {
        Self {
            inner: parking_lot::RwLock::new(Arc::new(gateway)),
        }
    }

    /// The current gateway.
    pub fn get(&self) -> Arc<Gateway> {
        self.inner.read().clone()
    }

    /// Replaces the gateway (after a config reload: build it with [`Gateway::from_config`] and
    /// add the same extra backends again). The interrupt registry carries over.
    pub fn replace(&self, mut gateway: Gateway) {
        let mut cur = self.inner.write();
        gateway.registry = cur.registry.clone();
        *cur = Arc::new(gateway);
    }
}

#[cfg(test)]
mod tests;
