//! The language-model tools: `llm.summarize` (through the hub's gateway) and `llm.chat`
//! (the node-hosted models of `--llm-upstream`, streamed back as `task_stream` chunks).

use apex_protocol::ChatMessage;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Error, Tool, ToolContext, ToolFuture, parse_args, schema_of};
use crate::llm::{LlmClient, Upstream, completion};

/// Largest `max_words` of `llm.summarize`.
pub const MAX_SUMMARY_WORDS: u32 = 2000;
/// Default `max_words` of `llm.summarize`.
pub const DEFAULT_SUMMARY_WORDS: u32 = 100;

/// Arguments of `llm.summarize`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SummarizeArgs {
    /// The text to summarize (not empty).
    pub text: String,
    /// Longest summary, in words (1 to 2000, default 100).
    #[schemars(range(min = 1, max = 2000))]
    pub max_words: Option<u32>,
    /// Model to ask the hub for (default: the node's `llm_model`, else the hub's choice).
    pub model: Option<String>,
}

/// `llm.summarize`: asks the hub's LLM gateway (`llm_request`) for a summary of `text` and
/// returns `{summary, model?, usage?}`.
pub struct Summarize {
    client: LlmClient,
}

impl Summarize {
    /// The tool, calling through `client`.
    pub fn new(client: LlmClient) -> Self {
        Self { client }
    }
}

impl Tool for Summarize {
    fn name(&self) -> &'static str {
        "llm.summarize"
    }
    fn description(&self) -> &'static str {
        "Summarizes text in at most max_words words with a language model reached through the hub; returns {summary, usage}"
    }
    fn parameters(&self) -> Value {
        schema_of::<SummarizeArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let client = self.client.clone();
        Box::pin(async move {
            let args: SummarizeArgs = parse_args(args)?;
            if args.text.trim().is_empty() {
                return Err(Error::InvalidArguments("`text` must not be empty".into()));
            }
            let words = args.max_words.unwrap_or(DEFAULT_SUMMARY_WORDS);
            if !(1..=MAX_SUMMARY_WORDS).contains(&words) {
                return Err(Error::InvalidArguments(format!(
                    "`max_words` must be between 1 and {MAX_SUMMARY_WORDS}"
                )));
            }
            let messages = vec![
                ChatMessage {
                    role: "system".into(),
                    content: Value::String(format!(
                        "Summarize the user's text in at most {words} words. \
                         Answer with the summary only."
                    )),
                    name: None,
                    ..Default::default()
                },
                ChatMessage {
                    role: "user".into(),
                    content: Value::String(args.text),
                    name: None,
                    ..Default::default()
                },
            ];
            // Roughly 2 tokens per word leaves room for the summary and no more.
            let options = json!({ "maxTokens": u64::from(words) * 2 + 16 });
            let answer = client
                .complete(args.model, messages, options)
                .await
                .map_err(|e| Error::Failed(format!("the hub's LLM call failed: {e}")))?;
            let mut out = json!({ "summary": answer.content.trim() });
            if let Some(u) = answer.usage {
                out["usage"] = serde_json::to_value(u).unwrap_or(Value::Null);
            }
            Ok(out)
        })
    }
}

/// `resume` of `llm.chat`: continue an answer another attempt started.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    /// The answer text already delivered; the model is asked to continue after it.
    pub assistant_prefix: String,
}

/// Arguments of `llm.chat`: an OpenAI Chat Completions request body (any other field is
/// passed to the local server as is), plus `resume`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ChatArgs {
    /// A model this node hosts.
    pub model: String,
    /// OpenAI chat messages.
    pub messages: Vec<Value>,
    /// Set by the hub when a stream moves to this node mid-answer.
    pub resume: Option<Resume>,
    /// Every other request field (temperature, max_tokens, stop, tools, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `llm.chat`: runs a chat request on the local OpenAI-compatible server, streaming each
/// `chat.completion.chunk` to the hub as `task_stream`, and returns the whole
/// `chat.completion`. With `resume.assistantPrefix`, the prefix is appended as an assistant
/// message and the server continues it (only the continuation is streamed).
pub struct Chat {
    upstream: Upstream,
}

impl Chat {
    /// The tool, serving from `upstream`.
    pub fn new(upstream: Upstream) -> Self {
        Self { upstream }
    }
}

impl Tool for Chat {
    fn name(&self) -> &'static str {
        "llm.chat"
    }
    fn description(&self) -> &'static str {
        "Runs an OpenAI chat request on this node's local model server, streaming chunks; returns the chat.completion"
    }
    fn parameters(&self) -> Value {
        schema_of::<ChatArgs>()
    }
    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let args: ChatArgs = parse_args(args)?;
            if args.messages.is_empty() || !args.messages.iter().all(Value::is_object) {
                return Err(Error::InvalidArguments(
                    "`messages` must be a non-empty array of message objects".into(),
                ));
            }
            let mut messages = args.messages;
            if let Some(r) = args.resume
                && !r.assistant_prefix.is_empty()
            {
                messages.push(json!({"role": "assistant", "content": r.assistant_prefix}));
            }
            let mut body = args.extra;
            body.insert("model".into(), Value::String(args.model.clone()));
            body.insert("messages".into(), Value::Array(messages));
            let progress = ctx.progress.clone();
            let streamed = upstream
                .chat_stream(Value::Object(body), |chunk| progress.chunk(chunk))
                .await
                .map_err(Error::Failed)?;
            Ok(completion(&args.model, &streamed))
        })
    }
}
