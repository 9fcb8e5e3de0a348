//! `agent.run`: one call of a research agent (an agent profile of the hub's
//! `/api/agents/profiles`) through the hub's LLM gateway (`llm_request`), asking for structured
//! output.
//!
//! - **Prompt.** The system message is the persona; the user message is the task, then each
//!   input (a dependency's output) under its own heading, then one line saying what JSON to
//!   answer with (for models that ignore `response_format`).
//! - **Structured output.** The call sends `response_format: {"type": "json_schema",
//!   "json_schema": {"name", "schema", "strict": true}}` with the caller's schema, or the
//!   default [`default_schema`] (`result`, `key_findings`, `uncertainties`, `suggestions`,
//!   `confidence`).
//! - **Fallback.** The calls are not streamed, so any failure of `model` counts as a failure
//!   before the first token: the call is retried once with `fallback_model` when one is set.
//! - **Tools.** With `tools` (OpenAI function tools) the model may call them; the calls come
//!   back in the result's `tool_calls` for the caller (the hub's agent systems) to act on, and
//!   `history` / `after` carry the conversation before the task and the exchange after it.
//!   Without a `response_format` such a call answers in free text (no structured output).
//! - **Answers that are not JSON** (real models do this) are no failure: `result` is the raw
//!   text and `structured` null. A JSON answer inside a Markdown code fence is read too.

use apex_protocol::ChatMessage;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Error, Tool, ToolContext, ToolFuture, parse_args, schema_of};
use crate::llm::{Answer, CallError, LlmClient};

/// Largest `max_tokens`.
pub const MAX_TOKENS: u32 = 200_000;
/// Most `inputs`.
pub const MAX_INPUTS: usize = 64;
/// Most `tools`.
pub const MAX_TOOLS: usize = 128;
/// Most `history` and `after` messages together.
pub const MAX_MESSAGES: usize = 512;

/// Whether the call answers in free text with tool calls rather than structured output.
fn free_text(args: &RunArgs) -> bool {
    !args.tools.is_empty() && args.response_format.is_none()
}

/// A dependency's output given to the agent.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The task that produced it.
    #[serde(default)]
    pub task_id: String,
    /// The agent that produced it.
    #[serde(default)]
    pub agent_type: String,
    /// What that task was.
    #[serde(default)]
    pub description: String,
    /// Its output (text, or any JSON value, shown as JSON).
    #[serde(default)]
    pub output: Value,
}

/// Arguments of `agent.run`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// The agent's type (`explorer`, `custom_…`), for the prompt and logs.
    #[serde(default)]
    pub agent_type: String,
    /// The system prompt (empty: none).
    #[serde(default)]
    pub persona: String,
    /// The gateway model to ask (`provider/model`, an alias, a model); empty or absent: the
    /// node's `llm_model`, else the hub's first model.
    #[serde(default)]
    pub model: Option<String>,
    /// The model asked once when `model` fails (empty: none).
    #[serde(default)]
    pub fallback_model: Option<String>,
    /// Sampling temperature, 0 to 2.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Longest answer, in tokens (1 to 200000).
    #[schemars(range(min = 1, max = 200000))]
    pub max_tokens: Option<u32>,
    /// What to do (not empty).
    pub task: String,
    /// The outputs of the tasks this one depends on.
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// A JSON Schema object the answer must follow (default: `result`, `key_findings`,
    /// `uncertainties`, `suggestions`, `confidence`; none when `tools` are given).
    pub response_format: Option<Map<String, Value>>,
    /// Earlier messages of the conversation (OpenAI messages: `user`, `assistant`, `tool`),
    /// put between the persona and the task.
    #[serde(default)]
    #[schemars(with = "Vec<Value>")]
    pub history: Vec<ChatMessage>,
    /// The exchange after the task so far (an assistant message with `tool_calls`, then the
    /// `tool` messages answering them), for the next round of an agent that calls tools.
    #[serde(default)]
    #[schemars(with = "Vec<Value>")]
    pub after: Vec<ChatMessage>,
    /// OpenAI function tools the model may call (`[{type: "function", function: {name,
    /// description, parameters}}]`); its calls come back in the result's `tool_calls`, for
    /// the caller to run. With tools and no `response_format`, the answer is free text.
    #[serde(default)]
    pub tools: Vec<Value>,
    /// OpenAI `tool_choice` (`auto`, `required`, `none`, or a named function).
    pub tool_choice: Option<Value>,
}

/// The schema of an answer when the call gives none.
pub fn default_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "result": {"type": "string", "description": "the answer to the task"},
            "key_findings": {"type": "array", "items": {"type": "string"}},
            "uncertainties": {"type": "array", "items": {"type": "string"}},
            "suggestions": {"type": "array", "items": {"type": "string"}},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1}
        },
        "required": ["result", "key_findings", "uncertainties", "suggestions", "confidence"],
        "additionalProperties": false
    })
}

fn message(role: &str, text: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: Value::String(text),
        name: None,
        ..Default::default()
    }
}

/// Checks the arguments' ranges.
///
/// # Errors
/// [`Error::InvalidArguments`] naming the field.
pub fn check(args: &RunArgs) -> Result<(), Error> {
    if args.task.trim().is_empty() {
        return Err(Error::InvalidArguments("`task` must not be empty".into()));
    }
    if let Some(t) = args.temperature
        && !(t.is_finite() && (0.0..=2.0).contains(&t))
    {
        return Err(Error::InvalidArguments(
            "`temperature` must be a number from 0 to 2".into(),
        ));
    }
    if let Some(n) = args.max_tokens
        && !(1..=MAX_TOKENS).contains(&n)
    {
        return Err(Error::InvalidArguments(format!(
            "`max_tokens` must be from 1 to {MAX_TOKENS}"
        )));
    }
    if args.tools.len() > MAX_TOOLS {
        return Err(Error::InvalidArguments(format!(
            "`tools` must have at most {MAX_TOOLS} items"
        )));
    }
    if args.history.len() + args.after.len() > MAX_MESSAGES {
        return Err(Error::InvalidArguments(format!(
            "`history` and `after` must have at most {MAX_MESSAGES} messages together"
        )));
    }
    if args.inputs.len() > MAX_INPUTS {
        return Err(Error::InvalidArguments(format!(
            "`inputs` must have at most {MAX_INPUTS} items"
        )));
    }
    Ok(())
}

/// The chat messages of a call: the persona as the system message, then the task with each
/// input under a heading.
pub fn messages(args: &RunArgs) -> Vec<ChatMessage> {
    let mut out = Vec::new();
    if !args.persona.trim().is_empty() {
        out.push(message("system", args.persona.clone()));
    }
    out.extend(args.history.iter().cloned());
    let mut user = format!("## Task\n\n{}\n", args.task.trim());
    for (i, input) in args.inputs.iter().enumerate() {
        let mut heading = format!("## Input {}", i + 1);
        if !input.agent_type.is_empty() {
            heading.push_str(&format!(" from {}", input.agent_type));
        }
        if !input.task_id.is_empty() {
            heading.push_str(&format!(" (task {})", input.task_id));
        }
        user.push_str(&format!("\n{heading}\n\n"));
        if !input.description.is_empty() {
            user.push_str(&format!("Task: {}\n\n", input.description));
        }
        match &input.output {
            Value::String(s) => user.push_str(s),
            Value::Null => user.push_str("(no output)"),
            v => user.push_str(&serde_json::to_string_pretty(v).unwrap_or_default()),
        }
        user.push('\n');
    }
    user.push_str(if free_text(args) {
        ""
    } else if args.response_format.is_some() {
        "\nAnswer with one JSON object that follows the response schema.\n"
    } else {
        "\nAnswer with one JSON object: `result` (your full answer as text), `key_findings`, \
         `uncertainties` and `suggestions` (lists of strings), and `confidence` (a number from \
         0 to 1).\n"
    });
    out.push(message("user", user));
    out.extend(args.after.iter().cloned());
    out
}

/// The `llm_request.options` of a call: temperature, max tokens and the structured-output
/// request.
pub fn options(args: &RunArgs) -> Value {
    let (name, schema) = match &args.response_format {
        Some(s) => ("agent_output", Value::Object(s.clone())),
        None => ("agent_result", default_schema()),
    };
    let mut o = if free_text(args) {
        json!({})
    } else {
        json!({
            "responseFormat": {"type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": true}},
        })
    };
    if !args.tools.is_empty() {
        o["tools"] = Value::Array(args.tools.clone());
    }
    if let Some(c) = &args.tool_choice {
        o["toolChoice"] = c.clone();
    }
    if let Some(t) = args.temperature {
        o["temperature"] = json!(t);
    }
    if let Some(n) = args.max_tokens {
        o["maxTokens"] = json!(n);
    }
    o
}

/// The JSON object of an answer, if it is one (bare, or in a Markdown code fence).
pub fn parse_structured(text: &str) -> Option<Map<String, Value>> {
    let t = text.trim();
    let t = match t.strip_prefix("```") {
        Some(rest) => {
            let rest = rest.strip_prefix("json").unwrap_or(rest);
            rest.strip_suffix("```").unwrap_or(rest).trim()
        }
        None => t,
    };
    match serde_json::from_str(t) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The tool's result for `answer` from `model` after `duration_ms`.
pub fn outcome(answer: &Answer, model: &str, duration_ms: u64) -> Value {
    let structured = parse_structured(&answer.content);
    let result = structured
        .as_ref()
        .and_then(|m| m.get("result"))
        .and_then(Value::as_str)
        .map_or_else(|| answer.content.clone(), str::to_owned);
    let confidence = structured
        .as_ref()
        .and_then(|m| m.get("confidence"))
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite());
    json!({
        "result": result,
        "structured": structured.map(Value::Object),
        "confidence": confidence,
        "tool_calls": answer.tool_calls,
        "tokens_used": answer.usage.as_ref().map_or(0, |u| u.total_tokens),
        "model_used": model,
        "duration_ms": duration_ms,
    })
}

/// `agent.run`: see the module doc.
pub struct AgentRun {
    client: LlmClient,
}

impl AgentRun {
    /// The tool, calling through `client`.
    pub fn new(client: LlmClient) -> Self {
        Self { client }
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|m| !m.trim().is_empty())
}

impl Tool for AgentRun {
    fn name(&self) -> &'static str {
        "agent.run"
    }
    fn description(&self) -> &'static str {
        "Runs one research agent (persona, task, the outputs it depends on) on a language model reached through the hub, with structured output and a fallback model; returns {result, structured, confidence, tokens_used, model_used, duration_ms}"
    }
    fn parameters(&self) -> Value {
        schema_of::<RunArgs>()
    }
    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let client = self.client.clone();
        Box::pin(async move {
            let args: RunArgs = parse_args(args)?;
            check(&args)?;
            let began = std::time::Instant::now();
            let messages = messages(&args);
            let options = options(&args);
            let model = non_empty(args.model.clone());
            let fallback =
                non_empty(args.fallback_model.clone()).filter(|f| Some(f) != model.as_ref());
            let shown = |m: &Option<String>| m.clone().unwrap_or_else(|| "the hub's model".into());
            ctx.progress
                .report(10.0, Some(format!("asking {}", shown(&model))));
            let first: Result<Answer, CallError> = client
                .complete(model.clone(), messages.clone(), options.clone())
                .await;
            let (answer, used) = match (first, fallback) {
                (Ok(a), _) => (a, model),
                (Err(e), None) => {
                    return Err(Error::Failed(format!("{} failed: {e}", shown(&model))));
                }
                (Err(e), Some(f)) => {
                    tracing::info!(agent_type = %args.agent_type, model = %shown(&model),
                        fallback = %f, error = %e, "agent model failed; asking the fallback");
                    ctx.progress
                        .report(50.0, Some(format!("{} failed; asking {f}", shown(&model))));
                    match client.complete(Some(f.clone()), messages, options).await {
                        Ok(a) => (a, Some(f)),
                        Err(e2) => {
                            return Err(Error::Failed(format!(
                                "{} failed: {e}; fallback {f} failed: {e2}",
                                shown(&model)
                            )));
                        }
                    }
                }
            };
            ctx.progress
                .report(90.0, Some("answer received".to_owned()));
            Ok(outcome(
                &answer,
                &used.unwrap_or_default(),
                began.elapsed().as_millis() as u64,
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(v: Value) -> RunArgs {
        parse_args(v).unwrap()
    }

    #[test]
    fn the_prompt_has_the_persona_the_task_and_each_input() {
        let a = args(json!({"agent_type": "critic", "persona": "You criticise.",
            "model": "m", "task": "Judge the claim.",
            "inputs": [{"task_id": "t1", "agent_type": "explorer", "description": "find papers",
                        "output": "Three papers."},
                       {"task_id": "t2", "output": {"n": 2}}]}));
        check(&a).unwrap();
        let m = messages(&a);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert_eq!(m[0].content, "You criticise.");
        let user = m[1].content.as_str().unwrap();
        assert!(user.starts_with("## Task\n\nJudge the claim.\n"), "{user}");
        assert!(
            user.contains(
                "## Input 1 from explorer (task t1)\n\nTask: find papers\n\nThree papers."
            ),
            "{user}"
        );
        assert!(user.contains("## Input 2 (task t2)"), "{user}");
        assert!(user.contains("\"n\": 2"), "{user}");
        assert!(user.contains("`confidence`"), "{user}");
    }

    #[test]
    fn with_tools_the_call_offers_them_keeps_the_conversation_and_returns_the_calls() {
        let a = args(json!({
            "task": "route this", "persona": "You route.",
            "history": [{"role": "user", "content": "earlier"},
                        {"role": "assistant", "content": "ok"}],
            "after": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
                        "type": "function", "function": {"name": "transfer_to_bob", "arguments": "{}"}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "bob said hi"}],
            "tools": [{"type": "function", "function": {"name": "transfer_to_bob",
                        "parameters": {"type": "object"}}}],
            "tool_choice": "auto",
        }));
        let o = options(&a);
        assert!(o.get("responseFormat").is_none(), "{o}");
        assert_eq!(o["tools"][0]["function"]["name"], "transfer_to_bob");
        assert_eq!(o["toolChoice"], "auto");
        let m = messages(&a);
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "user", "assistant", "tool"]
        );
        assert_eq!(m[5].tool_call_id.as_deref(), Some("c1"));
        assert!(
            !m[3].content.as_str().unwrap().contains("JSON"),
            "free text: no JSON line"
        );
        let answer = Answer {
            content: String::new(),
            tool_calls: vec![json!({"id": "c2", "type": "function",
                "function": {"name": "transfer_to_bob", "arguments": "{}"}})],
            usage: None,
        };
        let out = outcome(&answer, "mock", 3);
        assert_eq!(out["tool_calls"][0]["id"], "c2");
        assert!(check(&a).is_ok());
    }

    #[test]
    fn options_ask_for_the_default_or_the_given_schema() {
        let a = args(json!({"task": "x", "temperature": 0.3, "max_tokens": 100}));
        let o = options(&a);
        assert_eq!(o["temperature"], 0.3);
        assert_eq!(o["maxTokens"], 100);
        assert_eq!(o["responseFormat"]["type"], "json_schema");
        assert_eq!(o["responseFormat"]["json_schema"]["strict"], true);
        assert_eq!(
            o["responseFormat"]["json_schema"]["schema"],
            default_schema()
        );
        let b = args(json!({"task": "x", "response_format": {"type": "object",
            "properties": {"plan": {"type": "array"}}}}));
        let o = options(&b);
        assert_eq!(
            o["responseFormat"]["json_schema"]["schema"]["properties"]["plan"]["type"],
            "array"
        );
        assert!(o.get("temperature").is_none());
        assert!(messages(&b).len() == 1, "no persona, no system message");
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            json!({"task": "  "}),
            json!({"task": "x", "temperature": 3.0}),
            json!({"task": "x", "max_tokens": 0}),
        ] {
            let a = args(bad.clone());
            assert!(
                matches!(check(&a), Err(Error::InvalidArguments(_))),
                "{bad}"
            );
        }
        assert!(parse_args::<RunArgs>(json!({"task": "x", "colour": 1})).is_err());
        assert!(
            parse_args::<RunArgs>(json!({"persona": "p"})).is_err(),
            "task is required"
        );
    }

    #[test]
    fn answers_are_read_as_json_or_kept_as_text() {
        let usage = Some(apex_protocol::Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
        });
        let json_answer = Answer {
            content: "```json\n{\"result\": \"done\", \"key_findings\": [\"a\"], \
                      \"uncertainties\": [], \"suggestions\": [], \"confidence\": 0.8}\n```"
                .into(),
            usage: usage.clone(),
            ..Answer::default()
        };
        let o = outcome(&json_answer, "m", 12);
        assert_eq!(o["result"], "done");
        assert_eq!(o["structured"]["key_findings"][0], "a");
        assert_eq!(o["confidence"], 0.8);
        assert_eq!(o["tokens_used"], 7);
        assert_eq!(o["model_used"], "m");
        assert_eq!(o["duration_ms"], 12);
        let text = Answer {
            content: "just words".into(),
            usage: None,
            ..Answer::default()
        };
        let o = outcome(&text, "m", 1);
        assert_eq!(o["result"], "just words");
        assert!(o["structured"].is_null());
        assert!(o["confidence"].is_null());
        assert_eq!(o["tokens_used"], 0);
    }
}
