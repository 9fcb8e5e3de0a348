//! Nodes' `llm_request`s, answered through the [`Gateway`](super::Gateway), with per-node
//! quotas.
//!
//! Frames (PROTOCOL.md §10):
//! - non-stream: one `llm_response {success, content, usage, stream: false}`;
//! - stream: `llm_response_stream {chunk, done: false}` per piece of text, then one with
//!   `chunk: "", done: true` (and `usage`), then `llm_response {success: true, content: <all
//!   text>, stream: true}`;
//! - errors: `llm_response {success: false, error {code, message}}`, codes `llm_unavailable`
//!   (no model, or no provider serves it), `rate_limit_exceeded` (the node's requests per
//!   minute, or the upstream's 429), `quota_exceeded` (the node's tokens per day),
//!   `stream_limit_exceeded` (the node's concurrent streams), `llm_request_failed` (anything
//!   else, including an upstream failure after some text was sent).
//!
//! Each call runs in its own task and sends its frames through the connection's bounded
//! queue, waiting while it is more than half full (the other half is the engine's room for
//! task frames): a slow node slows its own upstream reads, never the engine or other
//! connections. When the connection closes, [`NodeProxy::connection_closed`] cancels
//! every call it made (the gateway aborts the upstream request).
//!
//! Quotas are kept per node id, across reconnections, in [`NodeProxy`]; see
//! [`NodeLlmQuotas`] for the keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::{ErrorInfo, HubMessage, LlmRequest, LlmResponse, LlmResponseStream, now_ms};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CallContext, Caller, ChatRequest, GatewayHandle, LlmError, Usage};
use crate::engine::Outbound;

/// Per-node limits on `llm_request` (the `[node_llm]` table; `APEX_NODE_LLM__<KEY>`).
/// 0 means unlimited for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeLlmQuotas {
    /// Requests one node may start per minute (a token bucket: bursts up to this many, refilled
    /// evenly over the minute). Past it: `rate_limit_exceeded`. Default 60.
    pub requests_per_minute: u32,
    /// Tokens (prompt + completion, as the upstream reports them, else estimated at 4
    /// characters per token) one node may use per UTC day. A call is refused with
    /// `quota_exceeded` once the day's total has reached it (the call that crosses it
    /// completes). Default 0 (unlimited).
    pub tokens_per_day: u64,
    /// Streamed calls one node may have open at once. Past it: `stream_limit_exceeded`.
    /// Default 4.
    pub max_concurrent_streams: u32,
}

impl Default for NodeLlmQuotas {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_day: 0,
            max_concurrent_streams: 4,
        }
    }
}

impl NodeLlmQuotas {
    /// Checks the values.
    ///
    /// # Errors
    /// `(key, reason)` for a value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.requests_per_minute > 1_000_000 {
            return Err((
                "node_llm.requests_per_minute",
                "must be at most 1000000 (0: unlimited)".to_owned(),
            ));
        }
        if self.max_concurrent_streams > 100_000 {
            return Err((
                "node_llm.max_concurrent_streams",
                "must be at most 100000 (0: unlimited)".to_owned(),
            ));
        }
        Ok(())
    }
}

/// A token bucket: `capacity` tokens, refilled at `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, per_minute: u32, now: Instant) -> bool {
        let cap = f64::from(per_minute);
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * cap / 60.0;
        self.tokens = (self.tokens + refill).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One node's usage.
#[derive(Debug)]
struct NodeUsage {
    bucket: Bucket,
    /// UTC day number of `tokens_today`.
    day: i64,
    tokens_today: u64,
    streams: u32,
    /// Calls in flight: request id → (connection id, cancel token, whether streamed).
    calls: HashMap<String, (u64, CancellationToken, bool)>,
}

/// The node side of the LLM gateway: quotas and calls in flight, per node id.
pub struct NodeProxy {
    /// Swapped by [`NodeProxy::set_quotas`] on a config change; read once per call.
    quotas: parking_lot::RwLock<Arc<NodeLlmQuotas>>,
    gateway: Arc<GatewayHandle>,
    nodes: Mutex<HashMap<String, NodeUsage>>,
}

/// What a call asks for, taken from the `llm_request`.
struct Call {
    request_id: String,
    node_id: String,
    stream: bool,
    req: ChatRequest,
}

fn utc_day() -> i64 {
    now_ms().div_euclid(86_400_000)
}

fn failure(request_id: &str, node_id: &str, code: &str, message: String) -> LlmResponse {
    LlmResponse {
        request_id: request_id.to_owned(),
        node_id: node_id.to_owned(),
        success: false,
        content: None,
        tool_calls: None,
        usage: None,
        error: Some(ErrorInfo::new(code, message)),
        stream: false,
        timestamp: now_ms(),
    }
}

/// `options[key]` (camelCase) or `options[snake_key]`.
fn opt<'a>(options: &'a Value, key: &str, snake: &str) -> Option<&'a Value> {
    options
        .get(key)
        .or_else(|| options.get(snake))
        .filter(|v| !v.is_null())
}

/// Queues `msg` once the queue is at most half full, so that LLM frames never take the room
/// the engine keeps for task frames (a node's concurrency limit is capped at half its queue).
/// False if the connection is gone.
async fn send_leaving_room(tx: &mpsc::Sender<Outbound>, msg: HubMessage) -> bool {
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if tx.is_closed() {
            return false;
        }
        if tx.capacity() > tx.max_capacity() / 2 {
            return tx.try_send(Outbound::Msg(msg)).is_ok();
        }
        // The writer drains the queue as the node reads; wait for it without blocking anyone.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

/// Rough token count of a text: 4 characters per token, rounded up.
fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

impl NodeProxy {
    /// A proxy with these quotas over `gateway`.
    pub fn new(quotas: NodeLlmQuotas, gateway: Arc<GatewayHandle>) -> Self {
        Self {
            quotas: parking_lot::RwLock::new(Arc::new(quotas)),
            gateway,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// The quotas in force.
    pub fn quotas(&self) -> Arc<NodeLlmQuotas> {
        self.quotas.read().clone()
    }

    /// Replaces the quotas (config reload). Calls in flight keep their admission; usage
    /// counted so far (requests this minute, tokens today) carries over.
    pub fn set_quotas(&self, quotas: NodeLlmQuotas) {
        *self.quotas.write() = Arc::new(quotas);
    }

    /// Whether the gateway has any model (`node_registered.hubInfo.llmAvailable`).
    pub fn available(&self) -> bool {
        !self.gateway.get().models().is_empty()
    }

    /// Calls in flight for `node_id`.
    pub fn in_flight(&self, node_id: &str) -> usize {
        self.nodes.lock().get(node_id).map_or(0, |n| n.calls.len())
    }

    /// Handles `llm_request` from `node_id` on connection `conn_id`: refuses it at once
    /// (quota, bad request) or starts the call in its own task. Every frame goes to `tx`
    /// (the connection's bounded outbound queue); the last one is always `llm_response`.
    pub fn handle(
        self: &Arc<Self>,
        node_id: &str,
        conn_id: u64,
        r: LlmRequest,
        tx: mpsc::Sender<Outbound>,
    ) {
        let call = match self.parse(node_id, r) {
            Ok(c) => c,
            Err(resp) => {
                let _ = tx.try_send(Outbound::Msg((*resp).into()));
                return;
            }
        };
        let token = CancellationToken::new();
        if let Err((code, message)) = self.admit(&call, conn_id, &token) {
            tracing::debug!(node_id, request_id = %call.request_id, code, "llm_request refused");
            let resp = failure(&call.request_id, &call.node_id, code, message);
            let _ = tx.try_send(Outbound::Msg(resp.into()));
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let (request_id, node_id, stream) =
                (call.request_id.clone(), call.node_id.clone(), call.stream);
            let tokens = this.run(call, token, &tx).await;
            this.release(&node_id, &request_id, stream, tokens);
        });
    }

    /// The call an `llm_request` asks for, or the `llm_response` refusing it.
    fn parse(&self, node_id: &str, r: LlmRequest) -> Result<Call, Box<LlmResponse>> {
        let options = r.options.unwrap_or(Value::Null);
        let bad = |message: String| {
            Box::new(failure(
                &r.request_id,
                node_id,
                "llm_request_failed",
                message,
            ))
        };
        if !options.is_null() && !options.is_object() {
            return Err(bad("`options` must be an object".to_owned()));
        }
        let stream = match opt(&options, "stream", "stream") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`options.stream` must be a boolean".to_owned())),
        };
        let model = r
            .model
            .clone()
            .filter(|m| !m.is_empty())
            .or_else(|| {
                opt(&options, "model", "model")
                    .and_then(Value::as_str)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
            })
            .or_else(|| self.gateway.get().models().into_iter().next().map(|m| m.id));
        let Some(model) = model else {
            return Err(Box::new(failure(
                &r.request_id,
                node_id,
                "llm_unavailable",
                "this hub has no language model configured".to_owned(),
            )));
        };
        if r.messages.is_empty() {
            return Err(bad("`messages` must not be empty".to_owned()));
        }
        let messages: Vec<Value> = r
            .messages
            .iter()
            .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
            .collect();
        let mut req = ChatRequest::simple(model, messages, stream);
        req.include_usage = stream;
        if let Some(t) = opt(&options, "temperature", "temperature") {
            match t.as_f64() {
                Some(t) if (0.0..=2.0).contains(&t) => req.temperature = Some(t),
                _ => {
                    return Err(bad(
                        "`options.temperature` must be a number from 0 to 2".into()
                    ));
                }
            }
        }
        if let Some(n) = opt(&options, "maxTokens", "max_tokens") {
            match n.as_u64() {
                Some(n) if n > 0 => req.max_tokens = Some(n),
                _ => return Err(bad("`options.maxTokens` must be a positive integer".into())),
            }
        }
        if let Some(s) = opt(&options, "stop", "stop") {
            req.stop = Some(s.clone());
        }
        if let Some(t) = opt(&options, "topP", "top_p") {
            req.extra.insert("top_p".to_owned(), t.clone());
        }
        // Structured output and tools reach the upstream as the OpenAI body fields.
        if let Some(f) = opt(&options, "responseFormat", "response_format") {
            if !f.is_object() {
                return Err(bad("`options.responseFormat` must be an object".into()));
            }
            req.extra.insert("response_format".to_owned(), f.clone());
        }
        if let Some(t) = opt(&options, "tools", "tools") {
            if !t.is_array() {
                return Err(bad("`options.tools` must be an array".into()));
            }
            req.tools = Some(t.clone());
        }
        if let Some(c) = opt(&options, "toolChoice", "tool_choice") {
            req.tool_choice = Some(c.clone());
        }
        Ok(Call {
            request_id: r.request_id,
            node_id: node_id.to_owned(),
            stream,
            req,
        })
    }

    /// Checks the quotas and records the call. `Err((code, message))` refuses it.
    fn admit(
        &self,
        call: &Call,
        conn_id: u64,
        token: &CancellationToken,
    ) -> Result<(), (&'static str, String)> {
        let q = self.quotas();
        let now = Instant::now();
        let mut nodes = self.nodes.lock();
        let n = nodes
            .entry(call.node_id.clone())
            .or_insert_with(|| NodeUsage {
                bucket: Bucket {
                    tokens: f64::from(q.requests_per_minute),
                    at: now,
                },
                day: utc_day(),
                tokens_today: 0,
                streams: 0,
                calls: HashMap::new(),
            });
        if n.calls.contains_key(&call.request_id) {
            return Err((
                "llm_request_failed",
                format!("request id `{}` is already in flight", call.request_id),
            ));
        }
        if call.stream && q.max_concurrent_streams > 0 && n.streams >= q.max_concurrent_streams {
            return Err((
                "stream_limit_exceeded",
                format!(
                    "this node already has {} streamed calls open (node_llm.max_concurrent_streams)",
                    n.streams
                ),
            ));
        }
        let day = utc_day();
        if n.day != day {
            n.day = day;
            n.tokens_today = 0;
        }
        if q.tokens_per_day > 0 && n.tokens_today >= q.tokens_per_day {
            return Err((
                "quota_exceeded",
                format!(
                    "this node used {} of its {} tokens today (node_llm.tokens_per_day)",
                    n.tokens_today, q.tokens_per_day
                ),
            ));
        }
        if q.requests_per_minute > 0 && !n.bucket.take(q.requests_per_minute, now) {
            return Err((
                "rate_limit_exceeded",
                format!(
                    "this node may make {} llm requests per minute (node_llm.requests_per_minute)",
                    q.requests_per_minute
                ),
            ));
        }
        if call.stream {
            n.streams += 1;
        }
        n.calls.insert(
            call.request_id.clone(),
            (conn_id, token.clone(), call.stream),
        );
        Ok(())
    }

    fn release(&self, node_id: &str, request_id: &str, stream: bool, tokens: u64) {
        let mut nodes = self.nodes.lock();
        if let Some(n) = nodes.get_mut(node_id) {
            if n.calls.remove(request_id).is_some() && stream {
                n.streams = n.streams.saturating_sub(1);
            }
            let day = utc_day();
            if n.day != day {
                n.day = day;
                n.tokens_today = 0;
            }
            n.tokens_today = n.tokens_today.saturating_add(tokens);
        }
    }

    /// Cancels every call made on connection `conn_id` (it closed).
    pub fn connection_closed(&self, conn_id: u64) {
        let nodes = self.nodes.lock();
        for n in nodes.values() {
            for (c, token, _) in n.calls.values() {
                if *c == conn_id {
                    token.cancel();
                }
            }
        }
    }

    /// Runs the call and sends its frames. Returns the tokens it used.
    async fn run(&self, call: Call, token: CancellationToken, tx: &mpsc::Sender<Outbound>) -> u64 {
        let Call {
            request_id,
            node_id,
            stream,
            req,
        } = call;
        let prompt_chars: String = req
            .messages
            .iter()
            .filter_map(|m| m.get("content").and_then(Value::as_str))
            .collect();
        let ctx = CallContext {
            // Node request ids are only unique per node; the gateway's registry is global.
            request_id: format!("node:{node_id}:{request_id}"),
            cancel: token.clone(),
            caller: Caller::Node(node_id.clone()),
            on_usage: None,
        };
        let gateway = self.gateway.get();
        let send = |msg: HubMessage| {
            let tx = tx.clone();
            let token = token.clone();
            async move {
                tokio::select! {
                    r = send_leaving_room(&tx, msg) => r,
                    _ = token.cancelled() => false,
                }
            }
        };
        let started = gateway.chat(req, ctx).await;
        let mut s = match started {
            Ok(s) => s,
            Err(e) => {
                let resp = failure(&request_id, &node_id, e.node_code(), e.to_string());
                send(resp.into()).await;
                return 0;
            }
        };
        let mut content = String::new();
        let mut calls = crate::llm::tool_loop::CallAssembler::default();
        let mut usage: Option<Usage> = None;
        let mut error: Option<LlmError> = None;
        let mut interrupted = false;
        while let Some(item) = s.next().await {
            match item {
                Ok(c) => {
                    if c.interrupted {
                        interrupted = true;
                        break;
                    }
                    if c.usage.is_some() {
                        usage = c.usage;
                    }
                    if let Some(tc) = &c.tool_calls {
                        calls.push(tc);
                    }
                    if c.text.is_empty() {
                        continue;
                    }
                    content.push_str(&c.text);
                    if stream {
                        let frame = LlmResponseStream {
                            request_id: request_id.clone(),
                            node_id: node_id.clone(),
                            chunk: c.text,
                            done: false,
                            usage: None,
                            timestamp: now_ms(),
                        };
                        if !send(frame.into()).await {
                            interrupted = true;
                            break;
                        }
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        drop(s);
        let tokens = usage
            .map(|u| u.total_tokens)
            .unwrap_or_else(|| estimate_tokens(&prompt_chars) + estimate_tokens(&content));
        if interrupted {
            // The node is gone (or stopped reading): nobody to answer.
            return tokens;
        }
        let wire_usage = usage.map(|u| apex_protocol::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        });
        if let Some(e) = error {
            let mut resp = failure(&request_id, &node_id, e.node_code(), e.to_string());
            resp.stream = stream;
            resp.content = (!content.is_empty()).then_some(content);
            send(resp.into()).await;
            return tokens;
        }
        if stream {
            let done = LlmResponseStream {
                request_id: request_id.clone(),
                node_id: node_id.clone(),
                chunk: String::new(),
                done: true,
                usage: wire_usage.clone(),
                timestamp: now_ms(),
            };
            if !send(done.into()).await {
                return tokens;
            }
        }
        let tool_calls: Vec<Value> = calls
            .finish(0)
            .iter()
            .map(crate::llm::tool_loop::ToolCall::to_json)
            .collect();
        let resp = LlmResponse {
            request_id,
            node_id,
            success: true,
            content: Some(content),
            tool_calls: (!tool_calls.is_empty()).then(|| tool_calls.into_boxed_slice()),
            usage: wire_usage,
            error: None,
            stream,
            timestamp: now_ms(),
        };
        send(resp.into()).await;
        tokens
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(options: Value) -> LlmRequest {
        LlmRequest {
            request_id: "r1".into(),
            node_id: String::new(),
            model: Some("m".into()),
            messages: vec![apex_protocol::ChatMessage {
                role: "user".into(),
                content: Value::String("hi".into()),
                name: None,
                ..Default::default()
            }],
            options: Some(options),
        }
    }

    #[test]
    fn response_format_and_tools_pass_through_to_the_upstream_body() {
        let proxy = NodeProxy::new(
            NodeLlmQuotas::default(),
            Arc::new(GatewayHandle::new(crate::llm::Gateway::empty())),
        );
        let format = serde_json::json!({"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}});
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let call = proxy
            .parse(
                "n1",
                request(serde_json::json!({"responseFormat": format, "tools": tools,
                    "toolChoice": "auto"})),
            )
            .map_err(|_| "refused")
            .unwrap();
        assert_eq!(call.req.extra["response_format"], format);
        assert_eq!(call.req.tools.as_ref(), Some(&tools));
        assert_eq!(call.req.tool_choice, Some(Value::String("auto".into())));
        let snake = proxy
            .parse(
                "n1",
                request(
                    serde_json::json!({"response_format": {"type": "json_object"},
                    "tool_choice": "none"}),
                ),
            )
            .map_err(|_| "refused")
            .unwrap();
        assert_eq!(snake.req.extra["response_format"]["type"], "json_object");
        assert_eq!(snake.req.tool_choice, Some(Value::String("none".into())));
        for bad in [
            serde_json::json!({"responseFormat": "json"}),
            serde_json::json!({"tools": {"a": 1}}),
        ] {
            let refused = proxy.parse("n1", request(bad.clone())).err().unwrap();
            let e = refused.error.unwrap();
            assert_eq!(e.code, "llm_request_failed", "{bad}");
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_refills_evenly() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            at: t0,
        };
        assert!(b.take(3, t0));
        assert!(b.take(3, t0));
        assert!(b.take(3, t0));
        assert!(!b.take(3, t0));
        // 3 per minute: one more after 20 s.
        assert!(!b.take(3, t0 + Duration::from_secs(19)));
        assert!(b.take(3, t0 + Duration::from_secs(40)));
    }

    fn from_toml(text: &str) -> Result<crate::config::Config, String> {
        use figment::providers::{Format, Serialized, Toml};
        figment::Figment::new()
            .merge(Serialized::defaults(crate::config::Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn quotas_are_config_keys_with_defaults_and_bounds() {
        let c = from_toml("").unwrap();
        assert_eq!(c.node_llm, NodeLlmQuotas::default());
        assert_eq!(c.node_llm.requests_per_minute, 60);
        let c = from_toml(
            "[node_llm]\nrequests_per_minute = 5\ntokens_per_day = 1000\nmax_concurrent_streams = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.node_llm,
            NodeLlmQuotas {
                requests_per_minute: 5,
                tokens_per_day: 1000,
                max_concurrent_streams: 0,
            }
        );
        c.validate().unwrap();
        assert!(from_toml("[node_llm]\nrequests_per_mintue = 5\n").is_err());
        assert!(from_toml("[node_llm]\nmax_concurrent_streams = -1\n").is_err());
        let mut c = from_toml("").unwrap();
        c.node_llm.max_concurrent_streams = 200_000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("node_llm.max_concurrent_streams"), "{e}");
    }

    #[tokio::test]
    async fn llm_frames_leave_half_the_queue_to_task_frames() {
        let (tx, mut rx) = mpsc::channel::<Outbound>(4);
        let frame = || HubMessage::from(failure("r", "n", "x", String::new()));
        assert!(send_leaving_room(&tx, frame()).await);
        assert!(send_leaving_room(&tx, frame()).await);
        // Half full: the next one waits until the writer takes a frame.
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { send_leaving_room(&tx, frame()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tx.capacity(), 2, "still waiting");
        rx.recv().await.unwrap();
        assert!(waiting.await.unwrap());
        drop(rx);
        assert!(!send_leaving_room(&tx, frame()).await, "connection gone");
    }

    #[test]
    fn tokens_are_estimated_from_characters() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
