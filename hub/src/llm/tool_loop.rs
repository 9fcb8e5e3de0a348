//! Server-side tools: a chat completion whose model calls tools of the cluster, run by the hub
//! as tasks on nodes (`"server_tools": ["sha256", …]` or `"all"` in
//! `POST /v1/chat/completions`).
//!
//! # The loop
//! 1. [`ServerTools::resolve`] picks the offered tools from the cluster's catalogue
//!    ([`crate::plugins::tool_list`]); each becomes an OpenAI function definition
//!    (`{"type": "function", "function": {name, description, parameters}}`) added after the
//!    client's own `tools`. Function names are the tool names with every character outside
//!    `[A-Za-z0-9_-]` replaced (`.` by `__`, others by `_`), cut to 64 characters and made
//!    unique with a `_2`, `_3`… suffix ([`function_names`]); the hub maps them back.
//! 2. The model is called ([`Gateway::chat`]); its answer's `tool_calls` are assembled
//!    ([`CallAssembler`]) and classified ([`decide`]):
//!    - only calls of server tools, and fewer than `max_tool_rounds` rounds run so far: every
//!      call runs at once as a task through the task service, as the calling principal
//!      ([`ToolRunner`]; owners, scopes and plugin switches apply), in parallel. The
//!      assistant message and one `tool` message per call (its `content` the JSON of the
//!      task's result, or `{"error": {code, message, status}}` for a call that failed, timed
//!      out, was refused or had arguments that are not a JSON object: never an HTTP error)
//!      are appended and the model is called again;
//!    - anything else ends the loop: that answer goes to the client.
//! 3. The answer the client gets never holds calls of server tools: the calls of its own
//!    tools are returned as usual (`finish_reason: "tool_calls"`). Calls of server tools the
//!    hub did not run (they came in an answer that also called a client tool, or
//!    `max_tool_rounds` was reached) are left out and listed in `apex_tool_runs` with status
//!    `skipped` and no task; when the rounds ran out the response also carries
//!    `"apex_tool_rounds_exhausted": true`.
//!
//! `apex_tool_runs` is a top-level array of [`ToolRun`] in the `chat.completion` object, or
//! in the last chunk of a stream. `content` is the text of every round in order (models
//! usually say nothing in rounds that call tools); a stream sends each round's text as it
//! comes. `usage` is the sum over rounds. A task lost with its node migrates like any other
//! (attempts from `default_max_attempts`): the model sees its one final result.
//!
//! Interrupts (`POST /v1/interrupt` with the request id, or the client going away) end the
//! loop: a model call in flight stops as usual, tool tasks still running are cancelled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::{
    CallContext, ChatChunk, ChatRequest, ChatStream, ChunkStream, Gateway, LlmError, Usage,
};
use crate::plugins::ToolEntry;

/// Default of the hub config's `max_tool_rounds`.
pub const DEFAULT_MAX_TOOL_ROUNDS: u32 = 8;

/// Longest OpenAI function name.
const MAX_FUNCTION_NAME: usize = 64;

/// Which cluster tools a request offers: the parsed `server_tools` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `"all"`: every tool of the catalogue (except those [`ServerTools::resolve`] excludes).
    All,
    /// These tool names, as the catalogue spells them.
    Named(Vec<String>),
}

impl Selection {
    /// Parses `server_tools`: `"all"`, or an array of 1 to 128 distinct non-empty tool names.
    /// `None` for `null` and `[]` (no server tools).
    ///
    /// # Errors
    /// [`LlmError::InvalidRequest`] on `server_tools` for any other value.
    pub fn parse(v: &Value) -> Result<Option<Selection>, LlmError> {
        let bad = || {
            LlmError::invalid(
                "server_tools",
                "`server_tools` must be \"all\" or an array of up to 128 tool names",
            )
        };
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s == "all" => Ok(Some(Selection::All)),
            Value::Array(a) if a.is_empty() => Ok(None),
            Value::Array(a) if a.len() <= 128 => {
                let mut names = Vec::with_capacity(a.len());
                for n in a {
                    match n.as_str() {
                        Some(s) if !s.is_empty() && s.len() <= 256 => {
                            if !names.iter().any(|x: &String| x == s) {
                                names.push(s.to_owned());
                            }
                        }
                        _ => return Err(bad()),
                    }
                }
                Ok(Some(Selection::Named(names)))
            }
            _ => Err(bad()),
        }
    }
}

/// An OpenAI function name for each tool name, in order: characters outside `[A-Za-z0-9_-]`
/// replaced (`.` by `__`, others by `_`), at most 64 characters, unique within the list and
/// against `taken` (the client's own function names) by a `_2`, `_3`… suffix.
pub fn function_names<'a>(
    tools: impl IntoIterator<Item = &'a str>,
    taken: &HashSet<String>,
) -> Vec<String> {
    let mut used: HashSet<String> = taken.clone();
    let mut out = Vec::new();
    for t in tools {
        let mut base = String::with_capacity(t.len());
        for c in t.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => base.push(c),
                '.' => base.push_str("__"),
                _ => base.push('_'),
            }
        }
        if base.is_empty() {
            base.push('_');
        }
        base.truncate(MAX_FUNCTION_NAME);
        let mut name = base.clone();
        let mut n = 2;
        while used.contains(&name) {
            let suffix = format!("_{n}");
            let mut b = base.clone();
            b.truncate(MAX_FUNCTION_NAME - suffix.len());
            name = format!("{b}{suffix}");
            n += 1;
        }
        used.insert(name.clone());
        out.push(name);
    }
    out
}

/// One cluster tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Offered {
    /// The function name the model sees.
    pub function: String,
    /// The tool name tasks run.
    pub tool: String,
    /// The OpenAI `tools` entry.
    pub definition: Value,
}

/// The cluster tools one request offers, by function name.
#[derive(Debug, Clone, Default)]
pub struct ServerTools {
    offered: Vec<Offered>,
    by_function: HashMap<String, usize>,
}

impl ServerTools {
    /// The tools of `selection` from `catalogue` (the `GET /api/v1/tools` list). `excluded`
    /// names tools that `"all"` leaves out (hub-internal tools, switched-off plugins); named
    /// ones are offered anyway (a refused call then answers the model with its error).
    /// `client_tools` is the request's own `tools`.
    ///
    /// # Errors
    /// [`LlmError::InvalidRequest`] on `server_tools` naming the first tool no online node
    /// offers, or a tool whose name the client's own `tools` also defines.
    pub fn resolve(
        selection: &Selection,
        catalogue: &[ToolEntry],
        client_tools: Option<&Value>,
        excluded: impl Fn(&str) -> bool,
    ) -> Result<ServerTools, LlmError> {
        let client: HashSet<String> = client_tools
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        let picked: Vec<&ToolEntry> = match selection {
            Selection::All => catalogue
                .iter()
                .filter(|t| !excluded(&t.name) && !client.contains(&t.name))
                .collect(),
            Selection::Named(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    let Some(t) = catalogue.iter().find(|t| &t.name == n) else {
                        return Err(LlmError::invalid(
                            "server_tools",
                            format!(
                                "unknown server tool `{n}`: no online node offers it \
                                 (see GET /api/v1/tools)"
                            ),
                        ));
                    };
                    if client.contains(n) {
                        return Err(LlmError::invalid(
                            "server_tools",
                            format!("`{n}` is both a server tool and one of the request's `tools`"),
                        ));
                    }
                    v.push(t);
                }
                v
            }
        };
        let names = function_names(picked.iter().map(|t| t.name.as_str()), &client);
        let mut out = ServerTools::default();
        for (t, function) in picked.into_iter().zip(names) {
            let parameters = match &t.parameters {
                Value::Object(m) if m.get("type").and_then(Value::as_str) == Some("object") => {
                    t.parameters.clone()
                }
                // OpenAI wants an object schema; tools taking anything get the loosest one.
                _ => json!({"type": "object"}),
            };
            let mut function_def = json!({"name": function, "parameters": parameters});
            if !t.description.is_empty() {
                function_def["description"] = Value::String(t.description.clone());
            }
            out.by_function.insert(function.clone(), out.offered.len());
            out.offered.push(Offered {
                function,
                tool: t.name.clone(),
                definition: json!({"type": "function", "function": function_def}),
            });
        }
        Ok(out)
    }

    /// The tool a function name of this request runs, if it is a server tool.
    pub fn tool_of(&self, function: &str) -> Option<&str> {
        self.by_function
            .get(function)
            .map(|&i| self.offered[i].tool.as_str())
    }

    /// The offered tools, in order.
    pub fn offered(&self) -> &[Offered] {
        &self.offered
    }

    /// Whether nothing is offered.
    pub fn is_empty(&self) -> bool {
        self.offered.is_empty()
    }

    /// The request's `tools` with the server tools' definitions appended (client ones first).
    pub fn merged_tools(&self, client_tools: Option<&Value>) -> Option<Value> {
        let mut all: Vec<Value> = client_tools
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        all.extend(self.offered.iter().map(|o| o.definition.clone()));
        (!all.is_empty()).then_some(Value::Array(all))
    }
}

/// One tool call of an answer, assembled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// `id`, which the `tool` message answers (`tool_call_id`).
    pub id: String,
    /// `function.name`.
    pub name: String,
    /// `function.arguments`: JSON text, as the model wrote it.
    pub arguments: String,
}

impl ToolCall {
    /// As a `message.tool_calls` entry.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Assembles `tool_calls` from stream deltas (keyed by `index`; the first delta of a call
/// holds `id` and `function.name`, later ones pieces of `function.arguments`) or from a whole
/// `message.tool_calls` array (entries without `index` are keyed by position).
#[derive(Debug, Default)]
pub struct CallAssembler {
    calls: Vec<ToolCall>,
}

impl CallAssembler {
    /// Adds one `tool_calls` array (anything else is ignored).
    pub fn push(&mut self, v: &Value) {
        let Some(a) = v.as_array() else { return };
        for (pos, d) in a.iter().enumerate() {
            let i = d
                .get("index")
                .and_then(Value::as_u64)
                .map_or(pos, |i| i as usize);
            // A model cannot make the hub allocate without bound by sending a huge index.
            if i > 1024 {
                continue;
            }
            if self.calls.len() <= i {
                self.calls.resize_with(i + 1, ToolCall::default);
            }
            let c = &mut self.calls[i];
            if let Some(id) = d
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                c.id = id.to_owned();
            }
            if let Some(f) = d.get("function") {
                if let Some(n) = f
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    c.name = n.to_owned();
                }
                if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                    c.arguments.push_str(a);
                }
            }
        }
    }

    /// The calls, in index order, without empty slots; a call without an id gets
    /// `call_<round>_<n>`.
    pub fn finish(self, round: u32) -> Vec<ToolCall> {
        self.calls
            .into_iter()
            .filter(|c| !c.name.is_empty())
            .enumerate()
            .map(|(n, mut c)| {
                if c.id.is_empty() {
                    c.id = format!("call_{round}_{n}");
                }
                c
            })
            .collect()
    }
}

/// What to do with an answer ([`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run these calls (each with its tool name) and call the model again.
    Run(Vec<(ToolCall, String)>),
    /// The answer goes to the client.
    Final {
        /// Calls of the client's own tools, returned to it.
        client_calls: Vec<ToolCall>,
        /// Calls of server tools that are not run (listed as `skipped`), with their tool.
        skipped: Vec<(ToolCall, String)>,
        /// True when server calls were left because `max_tool_rounds` rounds had run.
        exhausted: bool,
    },
}

/// Classifies an answer's calls after `rounds_done` rounds of tool runs, at most
/// `max_rounds`: see the [module docs](self).
pub fn decide(
    calls: Vec<ToolCall>,
    tools: &ServerTools,
    rounds_done: u32,
    max_rounds: u32,
) -> Next {
    let mut server = Vec::new();
    let mut client = Vec::new();
    for c in calls {
        match tools.tool_of(&c.name) {
            Some(t) => {
                let t = t.to_owned();
                server.push((c, t));
            }
            None => client.push(c),
        }
    }
    if server.is_empty() {
        return Next::Final {
            client_calls: client,
            skipped: Vec::new(),
            exhausted: false,
        };
    }
    if client.is_empty() && rounds_done < max_rounds {
        return Next::Run(server);
    }
    Next::Final {
        exhausted: client.is_empty(),
        client_calls: client,
        skipped: server,
    }
}

/// The arguments of a call as the JSON object a task takes (`""` is `{}`).
///
/// # Errors
/// A message when they are not a JSON object.
pub fn parse_arguments(arguments: &str) -> Result<Value, String> {
    if arguments.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("the arguments must be a JSON object".to_owned()),
        Err(e) => Err(format!("the arguments are not valid JSON: {e}")),
    }
}

/// The `tool` message answering `call` with `outcome`.
pub fn tool_message(call: &ToolCall, outcome: &RunOutcome) -> Value {
    json!({"role": "tool", "tool_call_id": call.id, "content": outcome.content.to_string()})
}

/// The assistant message of a round that called tools.
pub fn assistant_message(text: &str, calls: &[ToolCall]) -> Value {
    let content = if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    };
    json!({"role": "assistant", "content": content,
           "tool_calls": calls.iter().map(ToolCall::to_json).collect::<Vec<_>>()})
}

/// The `apex_*` fields of the final response.
pub fn apex_fields(runs: &[ToolRun], exhausted: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "apex_tool_runs".to_owned(),
        serde_json::to_value(runs).unwrap_or(Value::Array(Vec::new())),
    );
    if exhausted {
        m.insert("apex_tool_rounds_exhausted".to_owned(), Value::Bool(true));
    }
    m
}

/// What [`start_for`] needs of the hub.
pub struct Cluster<'a> {
    /// The gateway in force.
    pub gateway: Arc<Gateway>,
    /// The task service the tool calls run through.
    pub tasks: &'a crate::tasks::TaskService,
    /// Plugin switches (a disabled plugin's tools are not offered).
    pub plugins: &'a crate::plugins::Plugins,
    /// The hub's config (`max_tool_rounds`, `tool_call_timeout_seconds`,
    /// `allow_internal_request_file`).
    pub config: &'a crate::config::Config,
}

/// Why [`start_for`] did not start a call.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `server_tools` was invalid, or the first model call failed.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The caller lacks the `tasks` scope that tool runs need.
    #[error("{0}")]
    Forbidden(String),
    /// The node views could not be read.
    #[error(transparent)]
    Tasks(#[from] crate::tasks::Error),
}

/// Starts a chat call of `principal` offering the cluster tools `selection` names (the
/// `server_tools` value: `"all"`, a list of names, or `null`/`[]` for none, then a plain
/// gateway call). Tool calls run as tasks of `principal`. Used by `/v1/chat/completions` and
/// the conversations of `/api/v1/chat`.
///
/// # Errors
/// [`StartError::Llm`] for a bad `selection` (400) or the first call's failure,
/// [`StartError::Forbidden`] without the `tasks` scope, [`StartError::Tasks`] when the node
/// views cannot be read.
pub async fn start_for(
    hub: &Cluster<'_>,
    principal: &crate::principal::Principal,
    selection: &Value,
    req: ChatRequest,
    ctx: CallContext,
) -> Result<ChunkStream, StartError> {
    let Some(selection) = Selection::parse(selection)? else {
        return Ok(hub.gateway.chat(req, ctx).await?.boxed());
    };
    if !principal.has(crate::principal::Scope::Tasks) {
        return Err(StartError::Forbidden(
            "`server_tools` runs tasks: the credential needs the `tasks` scope".to_owned(),
        ));
    }
    let views = hub.tasks.node_views().await?;
    let allow_internal = hub.config.allow_internal_request_file;
    let plugins = hub.plugins.clone();
    let excluded = |name: &str| {
        name == crate::engine::LLM_CHAT_TOOL
            || name.starts_with("llm.chat@")
            || (name == crate::engine::INTERNAL_REQUEST_FILE && !allow_internal)
            || plugins.is_disabled(name)
    };
    let tools = ServerTools::resolve(
        &selection,
        &crate::plugins::tool_list(&views),
        req.tools.as_ref(),
        excluded,
    )?;
    let runner = TaskRunner::new(
        hub.tasks.clone(),
        principal.clone(),
        &ctx.request_id,
        hub.config,
    );
    Ok(ToolLoop::new(
        hub.gateway.clone(),
        tools,
        Arc::new(runner),
        hub.config.max_tool_rounds,
    )
    .start(req, ctx)
    .await?)
}

/// A chat completion with server tools. Built per request; see the [module docs](self).
pub struct ToolLoop {
    gateway: Arc<Gateway>,
    tools: Arc<ServerTools>,
    runner: Arc<dyn ToolRunner>,
    max_rounds: u32,
}

impl ToolLoop {
    /// A loop calling models through `gateway`, offering `tools`, running calls with
    /// `runner`, at most `max_rounds` rounds of tool runs.
    pub fn new(
        gateway: Arc<Gateway>,
        tools: ServerTools,
        runner: Arc<dyn ToolRunner>,
        max_rounds: u32,
    ) -> Self {
        Self {
            gateway,
            tools: Arc::new(tools),
            runner,
            max_rounds,
        }
    }

    /// Starts the loop: the first model call is made before this resolves, so its errors
    /// (unknown model, upstream refusal) are the request's. The stream yields what the HTTP
    /// layer renders: for `req.stream`, text chunks as they come, then the client's tool
    /// calls (if any), the finish chunk and (with `include_usage`) a usage chunk, the last
    /// one carrying [`ChatChunk::apex`]; otherwise one chunk with the whole answer.
    ///
    /// # Errors
    /// Those of [`Gateway::chat`] for the first call. Later failures are items of the stream.
    pub async fn start(
        self,
        mut req: ChatRequest,
        ctx: CallContext,
    ) -> Result<ChunkStream, LlmError> {
        req.tools = self.tools.merged_tools(req.tools.as_ref());
        let first = self.gateway.chat(req.clone(), ctx.clone()).await?;
        let st = LoopState {
            lp: self,
            stream: req.stream,
            include_usage: req.include_usage,
            req,
            ctx,
            current: Some(first),
            asm: CallAssembler::default(),
            text: String::new(),
            round_text: String::new(),
            finish: None,
            usage: None,
            rounds_done: 0,
            runs: Vec::new(),
            out: VecDeque::new(),
            done: false,
        };
        Ok(futures::stream::unfold(st, LoopState::step).boxed())
    }
}

struct LoopState {
    lp: ToolLoop,
    req: ChatRequest,
    ctx: CallContext,
    stream: bool,
    include_usage: bool,
    current: Option<ChatStream>,
    asm: CallAssembler,
    /// Text of every round so far.
    text: String,
    /// Text of the round in progress.
    round_text: String,
    finish: Option<String>,
    usage: Option<Usage>,
    rounds_done: u32,
    runs: Vec<ToolRun>,
    out: VecDeque<ChatChunk>,
    done: bool,
}

impl LoopState {
    async fn step(mut self) -> Option<(Result<ChatChunk, LlmError>, Self)> {
        loop {
            if let Some(c) = self.out.pop_front() {
                return Some((Ok(c), self));
            }
            if self.done {
                return None;
            }
            let Some(s) = self.current.as_mut() else {
                self.done = true;
                continue;
            };
            match s.next().await {
                Some(Ok(c)) => self.absorb(c),
                Some(Err(e)) => {
                    self.current = None;
                    self.done = true;
                    return Some((Err(e), self));
                }
                None => {
                    self.current = None;
                    if let Err(e) = self.end_of_round().await {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
            }
        }
    }

    fn absorb(&mut self, c: ChatChunk) {
        if c.interrupted {
            self.current = None;
            self.finish_with(Vec::new(), false, true);
            return;
        }
        if !c.text.is_empty() {
            if self.stream {
                self.out.push_back(ChatChunk {
                    text: c.text.clone(),
                    ..ChatChunk::default()
                });
            }
            self.round_text.push_str(&c.text);
        }
        if let Some(tc) = &c.tool_calls {
            self.asm.push(tc);
        }
        if c.finish_reason.is_some() {
            self.finish = c.finish_reason;
        }
        if let Some(u) = c.usage {
            let t = self.usage.get_or_insert_with(Usage::default);
            t.prompt_tokens += u.prompt_tokens;
            t.completion_tokens += u.completion_tokens;
            t.total_tokens += u.total_tokens;
        }
    }

    /// The model's answer of this round is complete: run its server calls and call the model
    /// again, or queue the final chunks.
    async fn end_of_round(&mut self) -> Result<(), LlmError> {
        let calls = std::mem::take(&mut self.asm).finish(self.rounds_done);
        let round_text = std::mem::take(&mut self.round_text);
        self.text.push_str(&round_text);
        match decide(calls, &self.lp.tools, self.rounds_done, self.lp.max_rounds) {
            Next::Final {
                client_calls,
                skipped,
                exhausted,
            } => {
                for (c, tool) in skipped {
                    self.runs.push(ToolRun {
                        task_id: None,
                        tool,
                        tool_call_id: c.id,
                        duration_ms: 0.0,
                        status: "skipped".to_owned(),
                    });
                }
                if exhausted {
                    tracing::info!(request_id = %self.ctx.request_id, rounds = self.rounds_done,
                        "server tool rounds exhausted; the last answer goes to the client");
                }
                self.finish_with(client_calls, exhausted, false);
                Ok(())
            }
            Next::Run(calls) => {
                let plain: Vec<ToolCall> = calls.iter().map(|(c, _)| c.clone()).collect();
                self.req
                    .messages
                    .push(assistant_message(&round_text, &plain));
                // Interrupts by request id reach the loop while the tools run, too.
                let held = self.lp.gateway.hold_request_id(&self.ctx);
                let runner = self.lp.runner.clone();
                let runs = futures::future::join_all(
                    calls
                        .iter()
                        .map(|(c, tool)| runner.run(tool, &c.arguments, &c.id)),
                );
                let outcomes = tokio::select! {
                    biased;
                    _ = self.ctx.cancel.cancelled() => None,
                    o = runs => Some(o),
                };
                drop(held);
                let Some(outcomes) = outcomes else {
                    // Interrupted while tools ran (the runs are dropped: their tasks cancelled).
                    self.finish_with(Vec::new(), false, true);
                    return Ok(());
                };
                for ((c, tool), o) in calls.iter().zip(outcomes) {
                    tracing::debug!(request_id = %self.ctx.request_id, tool = %tool,
                        task_id = ?o.task_id, status = %o.status, "server tool call ran");
                    self.req.messages.push(tool_message(c, &o));
                    self.runs.push(ToolRun {
                        task_id: o.task_id,
                        tool: tool.clone(),
                        tool_call_id: c.id.clone(),
                        duration_ms: o.duration_ms,
                        status: o.status,
                    });
                }
                self.rounds_done += 1;
                self.finish = None;
                let next = self
                    .lp
                    .gateway
                    .chat(self.req.clone(), self.ctx.clone())
                    .await?;
                self.current = Some(next);
                Ok(())
            }
        }
    }

    /// Queues the last chunks and ends the stream.
    fn finish_with(&mut self, client_calls: Vec<ToolCall>, exhausted: bool, interrupted: bool) {
        self.done = true;
        let apex = Some(apex_fields(&self.runs, exhausted));
        let finish = if interrupted {
            "stop".to_owned()
        } else {
            self.finish.clone().unwrap_or_else(|| {
                if client_calls.is_empty() {
                    "stop".to_owned()
                } else {
                    "tool_calls".to_owned()
                }
            })
        };
        if !self.stream {
            let tool_calls = (!client_calls.is_empty())
                .then(|| Value::Array(client_calls.iter().map(ToolCall::to_json).collect()));
            self.out.push_back(ChatChunk {
                text: std::mem::take(&mut self.text),
                tool_calls,
                finish_reason: Some(finish),
                usage: Some(self.usage.unwrap_or_default()),
                interrupted,
                apex,
                ..ChatChunk::default()
            });
            return;
        }
        if !client_calls.is_empty() {
            let deltas: Vec<Value> = client_calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut v = c.to_json();
                    v["index"] = json!(i);
                    v
                })
                .collect();
            self.out.push_back(ChatChunk {
                tool_calls: Some(Value::Array(deltas)),
                ..ChatChunk::default()
            });
        }
        let usage = self.include_usage.then(|| self.usage.unwrap_or_default());
        match usage {
            Some(u) => {
                self.out.push_back(ChatChunk {
                    finish_reason: Some(finish),
                    interrupted,
                    ..ChatChunk::default()
                });
                self.out.push_back(ChatChunk {
                    usage: Some(u),
                    apex,
                    ..ChatChunk::default()
                });
            }
            None => self.out.push_back(ChatChunk {
                finish_reason: Some(finish),
                interrupted,
                apex,
                ..ChatChunk::default()
            }),
        }
    }
}

mod runner;
pub use runner::{RunOutcome, TaskRunner, ToolRun, ToolRunner};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
