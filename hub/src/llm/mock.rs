//! [`Mock`]: the built-in `mock` provider. Deterministic text at a configurable pace, no
//! network; for local development, demos and tests.
//!
//! The answer is [`MOCK_WORDS`] repeated, one word per token, `max_tokens` tokens (or the
//! provider's `mock_tokens`); `finish_reason` is `length` when `max_tokens` cut it short,
//! else `stop`. Usage counts whitespace-separated words of the prompt's text contents.
//!
//! # Embeddings
//! `POST /v1/embeddings` with a mock model answers
//! [`mock_vector`](super::embeddings::mock_vector)s: deterministic, L2-normalised, 256
//! dimensions (or `dimensions`), texts sharing words near each other.
//!
//! # Structured outputs
//! So flows that need JSON run without an API key ([`structured`]): with `response_format:
//! {"type": "json_schema", "json_schema": {"schema": S, …}}` the content is the compact JSON
//! text of [`mock_schema::instance`]`(S)`, a deterministic instance that validates against S
//! (the rules are in [`mock_schema`]'s docs; without `schema`, the `json_object` answer);
//! with `{"type": "json_object"}` it is `{"answer": "<the mock text>"}` (`mock_tokens` words).
//! `finish_reason` is `stop` (`max_tokens` does not cut it), streamed in chunks split at
//! whitespace like any mock answer, usage counting its whitespace-separated words. A forced
//! or name-matched tool call (below) comes first; a structured answer comes before the
//! answer after tool results. `{"type": "text"}` changes nothing.
//!
//! # Tool calls
//! So demos and tests can show tool use without a real model ([`forced_tool_call`],
//! [`tool_call`], [`tool_answer`]):
//! - when `tool_choice` forces a call, `"required"` (or `"any"`) the first tool offered,
//!   `{"type": "function", "function": {"name": X}}` the tool `X` (if offered; else no forced
//!   call), the answer is one call of that tool, whatever the messages are, `finish_reason:
//!   "tool_calls"`, with arguments [`mock_schema::instance`] of its `parameters` (`{}` if it
//!   has none, or if that instance is not an object).
//! - `tool_choice: "none"` never calls a tool; with `tool_choice` absent or `"auto"`:
//!   when the request offers `tools` and the last message is a `user` message whose text
//!   names one of them (its function name, or that name with `__` read as `.`, as a whole
//!   word, any case), the answer is one call of the tool named first, `finish_reason:
//!   "tool_calls"`, with arguments taken from the prompt: the tool's string parameter
//!   (`text` if it has one, else the first required string, else the first string) gets the
//!   text after the first `:` following the name (else everything after the name), trimmed
//!   and unquoted; a tool without string parameters gets its first integer parameter set to
//!   the first whole number after the name; otherwise the arguments are `{}`.
//!   `"sha256: hello"` → `sha256 {"text": "hello"}`; `"sleep 3000"` → `sleep {"ms": 3000}`.
//! - when the last message is a `tool` message, the answer (`stop`) reports the trailing tool
//!   messages: ``The tool `sha256` returned {"sha256":"…","bytes":5}.`` (one sentence per
//!   result, the tool named from the assistant message that called it).

use std::collections::VecDeque;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};

use super::{
    Backend, CallContext, ChatChunk, ChatRequest, ChunkStream, LlmError, ModelInfo, ProviderConfig,
    Usage, mock_schema, unix_now,
};

/// The words the mock cycles through.
pub const MOCK_WORDS: [&str; 8] = [
    "This", " is", " a", " mock", " answer", " from", " apex", ".",
];

/// Token `i` of a mock answer: [`MOCK_WORDS`] in turn, a space before each repetition's
/// first word (`… from apex. This is …`).
pub(super) fn word(i: u64) -> &'static str {
    let n = MOCK_WORDS.len() as u64;
    if i > 0 && i.is_multiple_of(n) {
        " This"
    } else {
        MOCK_WORDS[(i % n) as usize]
    }
}

/// The `mock` provider.
#[derive(Debug, Clone)]
pub struct Mock {
    name: String,
    models: Vec<String>,
    tokens_per_second: f64,
    first_token_delay: Duration,
    tokens: u64,
    first_token_timeout: Duration,
    total_timeout: Duration,
}

impl Mock {
    /// A mock from its provider config (`models` default to `["mock"]`).
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            models: if cfg.models.is_empty() {
                vec!["mock".to_owned()]
            } else {
                cfg.models.clone()
            },
            tokens_per_second: cfg.mock_tokens_per_second,
            first_token_delay: Duration::from_millis(cfg.mock_first_token_delay_ms),
            tokens: cfg.mock_tokens.max(1),
            first_token_timeout: cfg.first_token_timeout(),
            total_timeout: cfg.total_timeout(),
        }
    }

    /// The whole text of an answer of `n` tokens.
    pub fn text(n: u64) -> String {
        (0..n).map(word).collect()
    }
}

fn prompt_tokens(req: &ChatRequest) -> u64 {
    req.messages
        .iter()
        .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
        .map(|s| s.split_whitespace().count() as u64)
        .sum()
}

impl Backend for Mock {
    fn name(&self) -> &str {
        &self.name
    }

    fn models(&self) -> Vec<ModelInfo> {
        let now = unix_now();
        self.models
            .iter()
            .map(|m| ModelInfo {
                id: m.clone(),
                created: now,
                owned_by: self.name.clone(),
            })
            .collect()
    }

    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    fn first_token_timeout(&self) -> Duration {
        self.first_token_timeout
    }

    fn total_timeout(&self) -> Duration {
        self.total_timeout
    }

    fn embeddings<'a>(
        &'a self,
        _model: &'a str,
        req: &'a super::embeddings::EmbeddingRequest,
    ) -> BoxFuture<'a, Result<super::embeddings::Embeddings, LlmError>> {
        let out = super::embeddings::mock_embeddings(req);
        async move { Ok(out) }.boxed()
    }

    fn call<'a>(
        &'a self,
        _model: &'a str,
        req: &'a ChatRequest,
        _ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        let (words, tool_calls, finish): (Vec<String>, Option<Value>, &'static str) =
            if let Some(call) = forced_tool_call(req).or_else(|| tool_call(req)) {
                (Vec::new(), Some(call), "tool_calls")
            } else if let Some(content) = structured(req, self.tokens) {
                (split_words(&content), None, "stop")
            } else if let Some(text) = tool_answer(req) {
                let words = split_words(&text);
                (words, None, "stop")
            } else {
                let n = req.max_tokens.map_or(self.tokens, |m| m.min(self.tokens));
                let finish = if n < self.tokens { "length" } else { "stop" };
                let words = (0..n).map(|i| word(i).to_owned()).collect();
                (words, None, finish)
            };
        let n = words.len() as u64;
        let usage = Usage {
            prompt_tokens: prompt_tokens(req),
            completion_tokens: n.max(u64::from(tool_calls.is_some())),
            total_tokens: prompt_tokens(req) + n.max(u64::from(tool_calls.is_some())),
        };
        let gap = if self.tokens_per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.tokens_per_second)
        } else {
            Duration::ZERO
        };
        let delay = self.first_token_delay;
        let stream = req.stream;
        let include_usage = req.include_usage;
        async move {
            if !stream {
                let s = futures::stream::once(async move {
                    tokio::time::sleep(delay + gap * (n.saturating_sub(1) as u32)).await;
                    Ok(ChatChunk {
                        text: words.concat(),
                        tool_calls,
                        finish_reason: Some(finish.to_owned()),
                        usage: Some(usage),
                        ..ChatChunk::default()
                    })
                });
                return Ok(s.boxed());
            }
            // Items: words 0..n, then (n) the tool calls (if any), then the finish chunk, then
            // usage if asked.
            let mut items: VecDeque<ChatChunk> = words
                .into_iter()
                .map(|w| ChatChunk {
                    text: w,
                    ..ChatChunk::default()
                })
                .collect();
            if let Some(tc) = tool_calls {
                items.push_back(ChatChunk {
                    tool_calls: Some(tc),
                    ..ChatChunk::default()
                });
            }
            items.push_back(ChatChunk {
                finish_reason: Some(finish.to_owned()),
                ..ChatChunk::default()
            });
            if include_usage {
                items.push_back(ChatChunk {
                    usage: Some(usage),
                    ..ChatChunk::default()
                });
            }
            let s = futures::stream::unfold((0u64, items), move |(i, mut items)| async move {
                let c = items.pop_front()?;
                let wait = if i == 0 {
                    delay
                } else if i < n {
                    gap
                } else {
                    Duration::ZERO
                };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Some((Ok(c), (i + 1, items)))
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}

/// Splits text into stream tokens: each word with the whitespace before it.
fn split_words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_whitespace() && !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Byte offset just past the first whole-word, case-insensitive occurrence of `word` in
/// `text`, and where it starts.
fn find_word(text: &str, word: &str) -> Option<(usize, usize)> {
    if word.is_empty() {
        return None;
    }
    let lower = text.to_lowercase();
    let word = word.to_lowercase();
    // Lowercasing can change byte lengths outside ASCII: only use it when it does not.
    if lower.len() != text.len() {
        return None;
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(at) = lower[from..].find(&word) {
        let start = from + at;
        let end = start + word.len();
        let before = lower[..start].chars().next_back();
        let after = lower[end..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            return Some((start, end));
        }
        from = end;
    }
    None
}

/// The mock's tool call for `req`, if its rule applies (see the [module docs](self)): a
/// `tool_calls` array of one call.
pub fn tool_call(req: &ChatRequest) -> Option<Value> {
    // Only a free choice: `none` never calls, a forced choice is [`forced_tool_call`]'s.
    if req
        .tool_choice
        .as_ref()
        .is_some_and(|c| c.as_str() != Some("auto"))
    {
        return None;
    }
    let tools = req.tools.as_ref()?.as_array()?;
    let last = req.messages.last()?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let text = message_text(last);
    // The tool named first in the prompt.
    let (tool, end) = tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?;
            let dotted = name.replace("__", ".");
            let hit = [name, dotted.as_str()]
                .iter()
                .filter_map(|n| find_word(&text, n))
                .min()?;
            Some((f, hit))
        })
        .min_by_key(|(_, (start, _))| *start)
        .map(|(f, (_, end))| (f, end))?;
    let name = tool.get("name")?.as_str()?;
    let rest = &text[end..];
    let args = derive_arguments(tool.get("parameters"), rest);
    Some(one_call(req, name, &args))
}

/// A `tool_calls` array of one call of `name` with `args`, its id `call_mock_<k>` for the
/// `k` tool messages already in the conversation.
fn one_call(req: &ChatRequest, name: &str, args: &Value) -> Value {
    let k = req
        .messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .count();
    json!([{"index": 0, "id": format!("call_mock_{k}"), "type": "function",
             "function": {"name": name, "arguments": args.to_string()}}])
}

/// The mock's call when `tool_choice` forces one (see the [module docs](self)): `required`
/// (or `any`) → the first tool, `{"type": "function", "function": {"name": X}}` (or
/// `{"type": "function", "name": X}`) → the tool `X` if it is offered; the arguments are
/// [`mock_schema::instance`] of the tool's `parameters`.
pub fn forced_tool_call(req: &ChatRequest) -> Option<Value> {
    let tools = req.tools.as_ref()?.as_array()?;
    let functions = tools.iter().filter_map(|t| t.get("function"));
    let tool = match req.tool_choice.as_ref()? {
        Value::String(s) if s == "required" || s == "any" => functions.into_iter().next()?,
        Value::Object(c) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| c.get("name"))?
                .as_str()?;
            functions
                .into_iter()
                .find(|f| f.get("name").and_then(Value::as_str) == Some(name))?
        }
        _ => return None,
    };
    let name = tool.get("name")?.as_str()?;
    let args = match tool.get("parameters") {
        Some(p) => mock_schema::instance(p),
        None => json!({}),
    };
    // A tool's arguments are an object: a schema whose instance is not one gives `{}`.
    let args = if args.is_object() { args } else { json!({}) };
    Some(one_call(req, name, &args))
}

/// The mock's structured answer when `response_format` asks for JSON (see the [module
/// docs](self)): the JSON text of [`mock_schema::instance`] of a `json_schema`'s `schema`, or
/// `{"answer": <the mock text of tokens words>}` for `json_object`.
pub fn structured(req: &ChatRequest, tokens: u64) -> Option<String> {
    let format = req.extra.get("response_format")?;
    let value = match format.get("type").and_then(Value::as_str)? {
        "json_schema" => match format.pointer("/json_schema/schema") {
            Some(schema) => mock_schema::instance(schema),
            None => json!({"answer": Mock::text(tokens)}),
        },
        "json_object" => json!({"answer": Mock::text(tokens)}),
        _ => return None,
    };
    Some(value.to_string())
}

/// A message's text: a string `content`, or the `text` parts of an array of parts.
fn message_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Arguments for a tool with JSON Schema `parameters` from the prompt text after its name.
fn derive_arguments(parameters: Option<&Value>, rest: &str) -> Value {
    let props = parameters
        .and_then(|p| p.get("properties"))
        .and_then(Value::as_object);
    let Some(props) = props else {
        return json!({});
    };
    let required: Vec<&str> = parameters
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let of_type = |k: &str, ty: &str| {
        props.get(k).and_then(|p| p.get("type")).is_some_and(|t| {
            t.as_str() == Some(ty) || t.as_array().is_some_and(|a| a.iter().any(|x| x == ty))
        })
    };
    let string_prop = ["text"]
        .into_iter()
        .filter(|k| of_type(k, "string"))
        .chain(required.iter().copied().filter(|k| of_type(k, "string")))
        .chain(
            props
                .keys()
                .map(String::as_str)
                .filter(|k| of_type(k, "string")),
        )
        .next();
    if let Some(k) = string_prop {
        let value = match rest.find(':') {
            Some(i) => &rest[i + 1..],
            None => rest,
        };
        let value = value
            .trim()
            .trim_matches(|c| c == '"' || c == '\'' || c == '`');
        return json!({ k: value });
    }
    let int_prop = required
        .iter()
        .copied()
        .filter(|k| of_type(k, "integer") || of_type(k, "number"))
        .chain(
            props
                .keys()
                .map(String::as_str)
                .filter(|k| of_type(k, "integer") || of_type(k, "number")),
        )
        .next();
    if let Some(k) = int_prop {
        let digits: String = rest
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse::<u64>() {
            return json!({ k: n });
        }
    }
    json!({})
}

/// The mock's answer after tool results, if the last message is a `tool` message.
pub fn tool_answer(req: &ChatRequest) -> Option<String> {
    let last = req.messages.last()?;
    if last.get("role").and_then(Value::as_str) != Some("tool") {
        return None;
    }
    let start = req
        .messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) != Some("tool"))
        .map_or(0, |i| i + 1);
    let name_of = |id: &str| {
        req.messages[..start].iter().rev().find_map(|m| {
            m.get("tool_calls")?.as_array()?.iter().find_map(|c| {
                (c.get("id")?.as_str()? == id)
                    .then(|| c.pointer("/function/name")?.as_str().map(str::to_owned))?
            })
        })
    };
    let sentences: Vec<String> = req.messages[start..]
        .iter()
        .map(|m| {
            let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
            let name = name_of(id).unwrap_or_else(|| "tool".to_owned());
            format!("The tool `{name}` returned {}.", message_text(m))
        })
        .collect();
    Some(sentences.join(" "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::StreamExt;
    use serde_json::{Value, json};

    use super::super::{Backend, CallContext, Caller, ChatChunk, ChatRequest, ProviderConfig};
    use super::Mock;

    fn mock() -> Mock {
        Mock::new(&ProviderConfig {
            name: "mock".to_owned(),
            ..ProviderConfig::default()
        })
    }

    async fn chunks(body: Value) -> Vec<ChatChunk> {
        let (req, _) = ChatRequest::from_json(body).unwrap();
        let ctx = CallContext::new("r", Caller::Http);
        let s = mock().call("mock", &req, &ctx).await.unwrap();
        s.map(Result::unwrap).collect().await
    }

    fn content(cs: &[ChatChunk]) -> String {
        cs.iter().map(|c| c.text.as_str()).collect()
    }

    fn finish(cs: &[ChatChunk]) -> Option<&str> {
        cs.iter().find_map(|c| c.finish_reason.as_deref())
    }

    const PLAN: &str = r#"{"type": "object", "additionalProperties": false,
        "properties": {"title": {"type": "string"},
                       "steps": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "steps"]}"#;

    #[tokio::test]
    async fn a_json_schema_response_format_gets_an_instance_streamed_or_not() {
        let schema: Value = serde_json::from_str(PLAN).unwrap();
        let format = json!({"type": "json_schema",
            "json_schema": {"name": "plan", "schema": schema, "strict": true}});
        let want = json!({"title": "title: This is a mock answer from apex.",
            "steps": ["item 0: This is a mock answer from apex.",
                      "item 1: This is a mock answer from apex.",
                      "item 2: This is a mock answer from apex."]});
        for stream in [false, true] {
            let cs = chunks(json!({"model": "mock", "stream": stream, "max_tokens": 2,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "plan a trip"}],
                "response_format": format}))
            .await;
            let text = content(&cs);
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                want,
                "{text}"
            );
            assert_eq!(finish(&cs), Some("stop"));
            assert!(cs.iter().all(|c| c.tool_calls.is_none()));
            if stream {
                assert!(cs.len() > 3, "{} chunks", cs.len());
            }
            let usage = cs.iter().find_map(|c| c.usage).unwrap();
            assert_eq!(usage.prompt_tokens, 3);
            assert_eq!(
                usage.completion_tokens,
                text.split_whitespace().count() as u64
            );
        }
    }

    #[tokio::test]
    async fn a_json_object_response_format_gets_an_answer_object() {
        let cs = chunks(
            json!({"model": "mock", "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        let v: Value = serde_json::from_str(&content(&cs)).unwrap();
        assert_eq!(v, json!({"answer": Mock::text(16)}));
        assert_eq!(finish(&cs), Some("stop"));
        // `text` is the plain answer.
        let cs = chunks(json!({"model": "mock", "response_format": {"type": "text"},
            "messages": [{"role": "user", "content": "hi"}]}))
        .await;
        assert_eq!(content(&cs), Mock::text(16));
    }

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "sha256",
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                               "required": ["text"]}}},
            {"type": "function", "function": {"name": "plan",
                "parameters": serde_json::from_str::<Value>(PLAN).unwrap()}}
        ])
    }

    fn the_call(cs: &[ChatChunk]) -> (String, Value) {
        let calls = cs.iter().find_map(|c| c.tool_calls.clone()).unwrap();
        let calls = calls.as_array().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let f = &calls[0]["function"];
        (
            f["name"].as_str().unwrap().to_owned(),
            serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_forced_tool_choice_calls_the_tool_with_an_instance_of_its_parameters() {
        let named = json!({"type": "function", "function": {"name": "plan"}});
        for stream in [false, true] {
            let cs = chunks(json!({"model": "mock", "stream": stream, "tools": tools(),
                "tool_choice": named, "messages": [{"role": "user", "content": "sha256: x"}]}))
            .await;
            assert_eq!(finish(&cs), Some("tool_calls"));
            let (name, args) = the_call(&cs);
            assert_eq!(name, "plan");
            assert_eq!(args["title"], "title: This is a mock answer from apex.");
            assert_eq!(args["steps"].as_array().unwrap().len(), 3);
        }
        let cs = chunks(
            json!({"model": "mock", "tools": tools(), "tool_choice": "required",
            "messages": [{"role": "user", "content": "anything"}]}),
        )
        .await;
        assert_eq!(
            the_call(&cs),
            (
                "sha256".to_owned(),
                json!({"text": "text: This is a mock answer from apex."})
            )
        );
        // A tool not offered: no forced call.
        let cs = chunks(json!({"model": "mock", "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
            "messages": [{"role": "user", "content": "anything"}]}))
        .await;
        assert_eq!(finish(&cs), Some("stop"));
    }

    #[tokio::test]
    async fn tool_choice_none_never_calls_and_auto_keeps_the_name_rule() {
        let ask = |choice: Value| {
            json!({"model": "mock", "tools": tools(), "tool_choice": choice,
                   "messages": [{"role": "user", "content": "sha256: hello"}]})
        };
        let cs = chunks(ask(json!("none"))).await;
        assert_eq!(finish(&cs), Some("stop"));
        assert!(cs.iter().all(|c| c.tool_calls.is_none()));
        let cs = chunks(ask(json!("auto"))).await;
        assert_eq!(
            the_call(&cs),
            ("sha256".to_owned(), json!({"text": "hello"}))
        );
        let cs = chunks(ask(Value::Null)).await;
        assert_eq!(
            the_call(&cs),
            ("sha256".to_owned(), json!({"text": "hello"}))
        );
    }
}
