//! Conversations: the sessions of `/api/v1/chat` (nex's `ChatRequest`/`ChatResponse`, Kiki's
//! `/chat`, `/chat/stream`, `/chat/history`, `/chat/context`), kept durable per owner.
//!
//! - **Sessions belong to their owner**: a session is named by its owner (the caller's
//!   [`Principal::id`]) and its `session_id`, so two users' `"s1"` are two sessions and no user
//!   ever reaches another's (it reads as absent: 404).
//! - **Storage**: the record store's backends (memory, `records.redb`, Redis). Each session's
//!   messages are an append-only log ([`LOG_KIND`], one entry per message, appended once), and
//!   a small session record ([`SESSION_KIND`]) holds the counters the statistics read (O(1))
//!   and where the working context starts. A turn appends its user and assistant messages in
//!   one durable write before the answer (`200`, or the stream's `done` event) is sent, so an
//!   answered turn survives a hub SIGKILL. In shared mode every hub reads the same Redis.
//! - **Turns are serialised per session**: one in-process lock per session, plus a lock
//!   record with a lease in shared mode (any hub may serve any session). A second message waits
//!   (`chat.busy = "wait"`, up to `busy_wait_secs`) or answers 409 `session_busy`.
//! - **Context**: counted with a real BPE for OpenAI model families ([`tokens`]); past
//!   `chat.context_max_tokens` the oldest turns leave the context ([`context`]; a tool call is
//!   never cut from its result), optionally summarised by an `llm.summarize` task on a node.
//! - **Model choice**: [`choose`].
//! - **Hooks** ([`ChatHooks`], a constructor argument): told of each stored turn and deleted
//!   session; [`crate::memory`] indexes them.

pub mod choose;
pub mod config;
pub mod context;
pub mod tokens;
mod turn;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::llm::tool_loop::StartError;
use crate::llm::{CallContext, Caller, ChatRequest, ChunkStream, LlmError};
use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;

pub use choose::ModelType;
pub use config::{Busy, ChatConfig};

/// Session records: id `<owner>|<session_id>` → [`Session`] JSON.
pub const SESSION_KIND: Kind = "chat_session";
/// Message logs: key `<owner>|<session_id>`, one [`StoredMessage`] JSON per entry.
pub const LOG_KIND: Kind = "chat_log";
/// Turn locks of shared mode: id `<owner>|<session_id>` → a random holder token, with a
/// lease ([`LOCK_LEASE`]).
pub const LOCK_KIND: Kind = "chat_lock";
/// How long a shared-mode turn lock lives without being released (a hub that died
/// mid-turn frees its sessions after it).
pub const LOCK_LEASE: Duration = Duration::from_secs(600);

/// Longest `session_id`.
pub const MAX_SESSION_ID: usize = 128;

/// One stored message (an entry of a session's log). Short field names: the log's bytes are
/// the conversation's storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Message id: its sequence number in the session's log (not stored: derived on read, so
    /// the log holds only what was said).
    #[serde(skip)]
    pub id: String,
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// When it was said, Unix ms.
    pub ts: i64,
    /// Its prompt cost in tokens (text plus per-message overhead), counted once.
    pub tok: u64,
    /// The model that wrote an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// True for an answer cut short by an interrupt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cut: bool,
}

/// Messages per role (`role_distribution`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Roles {
    /// User messages.
    pub user: u64,
    /// Assistant messages.
    pub assistant: u64,
    /// System messages.
    pub system: u64,
    /// Tool results.
    pub tool: u64,
}

impl Roles {
    fn add(&mut self, role: &str) {
        match role {
            "user" => self.user += 1,
            "assistant" => self.assistant += 1,
            "system" => self.system += 1,
            _ => self.tool += 1,
        }
    }
}

/// The session record: what statistics and the next turn need without reading the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The client's session id.
    pub session_id: String,
    /// The owner ([`Principal::id`]).
    pub owner: String,
    /// A `user_id` the client sent (kept for the client; never used for ownership).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// First message, Unix ms.
    pub created_at_ms: i64,
    /// Last message, Unix ms.
    pub updated_at_ms: i64,
    /// The first user message, cut to 80 characters.
    pub title: String,
    /// Entries of the log this record accounts for (the log's last sequence number).
    pub log_len: u64,
    /// Messages in the history.
    pub message_count: u64,
    /// Tokens of the whole history.
    pub history_tokens: u64,
    /// The working context is the log's entries after this sequence number.
    pub context_after: u64,
    /// Messages in the working context.
    pub context_count: u64,
    /// Their tokens.
    pub context_tokens: u64,
    /// Their roles.
    pub context_roles: Roles,
    /// Summary of the turns that left the context (`chat.summarize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The model of the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_model: Option<String>,
}

/// `stream_mode` of `/chat/stream` (Kiki's): what the stream carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// `event: token` per piece of text (the default).
    #[default]
    Messages,
    /// `event: update` per step: model call, tool call, tool result.
    Updates,
    /// `event: values` with the whole message list after each step.
    Values,
}

/// The body of `POST /api/v1/chat` and `/chat/stream`: the union of nex's `ChatRequest` and
/// Kiki's chat body. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct ChatInput {
    /// The user's message (required, not empty, at most `chat.max_message_bytes`).
    pub message: String,
    /// The session; created when absent (`sess_<uuid>`). 1 to 128 characters of letters,
    /// digits and `-_.:@`.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Kiki's `user_id`: kept on the session, never used for ownership (the owner is the
    /// caller's credential).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Most tokens of the answer.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// 0 to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// `local_small`, `cloud_large`, `plugin` or `auto_select` (default).
    #[serde(default)]
    pub model_type: Option<ModelType>,
    /// A model to use when something serves it.
    #[serde(default)]
    pub preferred_model: Option<String>,
    /// This turn's system prompt (else `chat.system_prompt`).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Extra context (an object), given to the model as JSON in a system message.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    /// Cluster tools the model may call (`"all"` or a list of names), as in
    /// `/v1/chat/completions`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub server_tools: Option<Value>,
    /// `POST /api/v1/chat` with `stream: true` answers like `/chat/stream`.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `/chat/stream`: `messages` (default), `updates` or `values`.
    #[serde(default)]
    pub stream_mode: Option<StreamMode>,
}

/// nex's `ChatResponse` (of which Kiki's `{content, session_id}` is a part).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChatAnswer {
    /// The answer.
    pub content: String,
    /// The session.
    pub session_id: String,
    /// The model that answered.
    pub model_used: String,
    /// Why that model, in one sentence.
    pub reasoning: String,
    /// Tokens of the answer (the upstream's usage, else counted).
    pub token_count: u64,
    /// From the message to the last token, ms.
    pub latency_ms: u64,
    /// exp(mean token log-probability) of the answer, when the upstream returned
    /// log-probabilities; else null (never invented).
    pub confidence: Option<f64>,
    /// When the answer was stored, RFC 3339.
    pub timestamp: String,
    /// Always null in a 200 answer (errors are error responses or `event: error`).
    pub error: Option<String>,
    /// True when an interrupt cut the answer short (what was said is stored).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

/// What a turn's stream carries, in order: tokens and steps, then exactly one `Done` or
/// `Error`.
#[derive(Debug)]
pub enum TurnEvent {
    /// A piece of the answer's text.
    Token(String),
    /// A step (`updates` mode): `{"step": "model_call" | "tool_call" | "tool_result" |
    /// "answer", …}`.
    Update(Value),
    /// The whole message list after a step (`values` mode).
    Values(Vec<Value>),
    /// The turn is stored; the answer.
    Done(ChatAnswer),
    /// The turn failed; nothing of it is stored.
    Error(Error),
}

/// A started turn: its events, then the end.
#[derive(Debug)]
pub struct Turn {
    /// The session (given or created).
    pub session_id: String,
    /// The model chosen.
    pub model: String,
    /// The events; dropping the receiver cancels the model call and its tool tasks.
    pub events: mpsc::Receiver<TurnEvent>,
}

/// Why a conversation call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is invalid (400 naming it).
    #[error("{message}")]
    Invalid {
        /// The field.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such session of the caller (404).
    #[error("no session {0}")]
    NotFound(String),
    /// The session is answering another message (409 `session_busy`).
    #[error("session {0} is answering another message; try again when it is done")]
    Busy(String),
    /// Nothing can answer: no provider and no node-hosted model (503).
    #[error(
        "no model can answer: configure an [llm] provider or connect a node that hosts a model"
    )]
    NoModel,
    /// The message and the fixed part of the prompt exceed `chat.context_max_tokens` (400).
    #[error(
        "the message needs {needed} tokens with the system prompt, more than chat.context_max_tokens ({budget})"
    )]
    TooLong {
        /// Tokens needed.
        needed: u64,
        /// The budget.
        budget: u64,
    },
    /// The model call failed.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The tool loop did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The store failed (503).
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The conversation service (cheap to clone).
#[derive(Clone)]
pub struct ChatService {
    inner: Arc<Inner>,
}

struct Inner {
    records: RecordStore,
    llm: Arc<crate::llm::GatewayHandle>,
    tasks: crate::tasks::TaskService,
    plugins: crate::plugins::Plugins,
    config: Arc<crate::config::Config>,
    /// Turn locks of this hub, per session name.
    locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Whether other hubs share the store (turn locks also in the store).
    shared: bool,
    /// The request id of each session's turn in progress (interrupts by session).
    running: DashMap<String, String>,
    /// Told of stored turns and deleted sessions (memory indexing).
    hooks: ChatHooks,
}

/// Told each stored turn's session and messages (ids set), after they are durable.
pub type StoredHook = Arc<dyn Fn(&Session, &[StoredMessage]) + Send + Sync>;
/// Told `(owner, session_id)` of each deleted session (history delete, retention).
pub type DeletedHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What a [`ChatService`] tells others about conversations ([`crate::memory`] indexes them).
/// Hooks run on the turn's task and must not block (queue and return).
#[derive(Clone, Default)]
pub struct ChatHooks {
    /// Each stored turn.
    pub on_stored: Option<StoredHook>,
    /// Each deleted session.
    pub on_deleted: Option<DeletedHook>,
}

/// `<owner>|<session_id>`: the name of a session's record, log and lock.
pub fn session_name(owner: &str, session_id: &str) -> String {
    format!("{owner}|{session_id}")
}

/// Checks a `session_id`: 1 to [`MAX_SESSION_ID`] characters of letters, digits and `-_.:@`.
///
/// # Errors
/// [`Error::Invalid`] on `session_id`.
pub fn validate_session_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            param: "session_id",
            message: format!(
                "`session_id` must be 1 to {MAX_SESSION_ID} characters of letters, digits and -_.:@"
            ),
        })
    }
}

/// RFC 3339 of Unix ms.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// The held turn lock of a session; released on drop.
struct TurnLock {
    _local: tokio::sync::OwnedMutexGuard<()>,
    store: Option<(RecordStore, String, String)>,
    inner: Arc<Inner>,
    name: String,
}

impl Drop for TurnLock {
    fn drop(&mut self) {
        if let Some((records, name, token)) = self.store.take() {
            tokio::spawn(async move {
                let _ = records
                    .compare_and_set(LOCK_KIND, &name, Some(token.as_bytes()), None, None)
                    .await;
            });
        }
        self.inner.running.remove(&self.name);
        // The guard is dropped after this body; the map entry goes once nobody else holds it.
        let inner = self.inner.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            inner
                .locks
                .remove_if(&name, |_, m| Arc::strong_count(m) == 1);
        });
    }
}

impl ChatService {
    /// The service over `records` (the tasks' backend), the gateway, the task service (tool
    /// calls, summaries) and the plugin switches, telling `hooks` of stored turns and deleted
    /// sessions. `config.chat` configures it.
    pub fn new(
        records: RecordStore,
        llm: Arc<crate::llm::GatewayHandle>,
        tasks: crate::tasks::TaskService,
        plugins: crate::plugins::Plugins,
        config: Arc<crate::config::Config>,
        hooks: ChatHooks,
    ) -> Self {
        let shared = config.is_shared();
        Self {
            inner: Arc::new(Inner {
                records,
                llm,
                tasks,
                plugins,
                config,
                locks: DashMap::new(),
                shared,
                running: DashMap::new(),
                hooks,
            }),
        }
    }

    fn cfg(&self) -> &ChatConfig {
        &self.inner.config.chat
    }

    async fn lock(&self, name: &str, session_id: &str) -> Result<TurnLock, Error> {
        let cfg = self.cfg();
        let m = self
            .inner
            .locks
            .entry(name.to_owned())
            .or_default()
            .value()
            .clone();
        let wait = Duration::from_secs(cfg.busy_wait_secs);
        let deadline = tokio::time::Instant::now() + wait;
        let local = match cfg.busy {
            Busy::Reject => m
                .try_lock_owned()
                .map_err(|_| Error::Busy(session_id.to_owned()))?,
            Busy::Wait => tokio::time::timeout(wait, m.lock_owned())
                .await
                .map_err(|_| Error::Busy(session_id.to_owned()))?,
        };
        let mut store = None;
        if self.inner.shared {
            let token = uuid::Uuid::new_v4().to_string();
            loop {
                if self
                    .inner
                    .records
                    .create(LOCK_KIND, name, token.as_bytes(), Some(LOCK_LEASE))
                    .await?
                {
                    break;
                }
                if cfg.busy == Busy::Reject || tokio::time::Instant::now() >= deadline {
                    return Err(Error::Busy(session_id.to_owned()));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            store = Some((self.inner.records.clone(), name.to_owned(), token));
        }
        Ok(TurnLock {
            _local: local,
            store,
            inner: self.inner.clone(),
            name: name.to_owned(),
        })
    }

    async fn load(&self, name: &str) -> Result<Option<Session>, Error> {
        let Some(raw) = self.inner.records.get(SESSION_KIND, name).await? else {
            return Ok(None);
        };
        let mut s: Session = serde_json::from_slice(&raw).map_err(|e| {
            Error::Store(store::Error::Unreadable {
                what: format!("session record {name}"),
                reason: e.to_string(),
            })
        })?;
        // A turn whose log append landed but whose record update did not (a crash between
        // the two): count the log again.
        let len = self.inner.records.log_len(LOG_KIND, name).await?;
        if len != s.log_len {
            self.recount(name, &mut s).await?;
        }
        Ok(Some(s))
    }

    async fn read_all(&self, name: &str, after: u64) -> Result<Vec<(u64, StoredMessage)>, Error> {
        let mut out = Vec::new();
        let mut from = after;
        loop {
            let page = self
                .inner
                .records
                .read_log(LOG_KIND, name, from, 1000)
                .await?;
            let n = page.len();
            for (seq, raw) in page {
                from = seq;
                match serde_json::from_slice::<StoredMessage>(&raw) {
                    Ok(mut m) => {
                        m.id = seq.to_string();
                        out.push((seq, m));
                    }
                    Err(e) => {
                        tracing::warn!(session = %name, seq, error = %e, "a stored chat message does not decode; skipped");
                    }
                }
            }
            if n < 1000 {
                return Ok(out);
            }
        }
    }

    async fn recount(&self, name: &str, s: &mut Session) -> Result<(), Error> {
        let all = self.read_all(name, 0).await?;
        s.log_len = all.last().map_or(0, |(seq, _)| *seq);
        s.message_count = all.len() as u64;
        s.history_tokens = all.iter().map(|(_, m)| m.tok).sum();
        s.context_after = s.context_after.min(s.log_len);
        s.context_count = 0;
        s.context_tokens = 0;
        s.context_roles = Roles::default();
        for (seq, m) in &all {
            if *seq > s.context_after {
                s.context_count += 1;
                s.context_tokens += m.tok;
                s.context_roles.add(&m.role);
            }
            s.updated_at_ms = s.updated_at_ms.max(m.ts);
        }
        Ok(())
    }

    fn available(&self) -> choose::Available {
        let mut a = choose::Available::default();
        for m in self.inner.llm.get().models() {
            if m.owned_by == "nodes" || m.owned_by.starts_with("node:") {
                a.local.push(m.id);
            } else {
                a.cloud.push(m.id);
            }
        }
        a
    }

    /// Starts a turn of `caller`: validates, waits for the session (or 409), reads its
    /// context, chooses the model, trims the context, and makes the first model call; the
    /// answer then streams on [`Turn::events`]. The turn is stored (user and assistant
    /// messages, one durable append) before [`TurnEvent::Done`].
    ///
    /// # Errors
    /// [`Error::Invalid`], [`Error::Busy`], [`Error::NoModel`], [`Error::TooLong`],
    /// [`Error::Store`], and the first model call's [`Error::Llm`] / [`Error::Start`].
    pub async fn turn(&self, caller: &Principal, input: ChatInput) -> Result<Turn, Error> {
        let started = tokio::time::Instant::now();
        let started_ms = apex_protocol::now_ms();
        let cfg = self.cfg().clone();
        if input.message.trim().is_empty() {
            return Err(Error::Invalid {
                param: "message",
                message: "`message` is required and must not be empty".to_owned(),
            });
        }
        if input.message.len() > cfg.max_message_bytes {
            return Err(Error::Invalid {
                param: "message",
                message: format!(
                    "`message` is longer than chat.max_message_bytes ({} bytes)",
                    cfg.max_message_bytes
                ),
            });
        }
        if input
            .temperature
            .is_some_and(|t| !(0.0..=2.0).contains(&t) || t.is_nan())
        {
            return Err(Error::Invalid {
                param: "temperature",
                message: "`temperature` must be 0 to 2".to_owned(),
            });
        }
        if input.max_tokens == Some(0) {
            return Err(Error::Invalid {
                param: "max_tokens",
                message: "`max_tokens` must be at least 1".to_owned(),
            });
        }
        if input
            .context
            .as_ref()
            .is_some_and(|c| !c.is_object() && !c.is_null())
        {
            return Err(Error::Invalid {
                param: "context",
                message: "`context` must be an object".to_owned(),
            });
        }
        let session_id = match &input.session_id {
            Some(id) => {
                validate_session_id(id)?;
                id.clone()
            }
            None => format!("sess_{}", uuid::Uuid::new_v4().simple()),
        };
        let owner = caller.owner().to_owned();
        let name = session_name(&owner, &session_id);
        let lock = self.lock(&name, &session_id).await?;
        let mut session = self.load(&name).await?.unwrap_or_else(|| Session {
            session_id: session_id.clone(),
            owner: owner.clone(),
            created_at_ms: started_ms,
            title: input.message.chars().take(80).collect(),
            ..Session::default()
        });
        if input.user_id.is_some() {
            session.user_id.clone_from(&input.user_id);
        }
        let context = self.read_all(&name, session.context_after).await?;

        // The fixed part of the prompt: system prompt, extra context, summary.
        let mut fixed_msgs = Vec::new();
        let system = input
            .system_prompt
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| cfg.system_prompt.clone());
        if let Some(sp) = &system {
            fixed_msgs.push(json!({"role": "system", "content": sp}));
        }
        if let Some(c) = input.context.as_ref().filter(|c| c.is_object()) {
            fixed_msgs.push(json!({"role": "system", "content": format!("Context: {c}")}));
        }
        if let Some(sum) = &session.summary {
            fixed_msgs.push(json!({"role": "system",
                "content": format!("Summary of the earlier conversation: {sum}")}));
        }
        let fixed_text: String = fixed_msgs
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect::<Vec<_>>()
            .join("\n");

        // Choose with an estimate (the tokenizer depends on the model), then count for real.
        let estimate = session.context_tokens
            + tokens::estimate(&input.message)
            + tokens::estimate(&fixed_text);
        let choice = choose::choose(
            input.model_type.unwrap_or_default(),
            input.preferred_model.as_deref(),
            estimate,
            &self.available(),
            &cfg,
        )
        .ok_or(Error::NoModel)?;
        let model = choice.model.clone();
        let fixed_tokens = if fixed_msgs.is_empty() {
            0
        } else {
            tokens::message_tokens(&model, &fixed_text)
        };
        let user_tokens = tokens::message_tokens(&model, &input.message);

        let mut items: Vec<context::Item> = context
            .iter()
            .map(|(_, m)| context::Item {
                role: m.role.clone(),
                tokens: m.tok,
                calls: Vec::new(),
                answers: None,
            })
            .collect();
        items.push(context::Item {
            role: "user".to_owned(),
            tokens: user_tokens,
            calls: Vec::new(),
            answers: None,
        });
        let start = context::window_start(&items, fixed_tokens, cfg.context_max_tokens).ok_or(
            Error::TooLong {
                needed: fixed_tokens + user_tokens,
                budget: cfg.context_max_tokens,
            },
        )?;
        let dropped: Vec<StoredMessage> = context[..start].iter().map(|(_, m)| m.clone()).collect();
        let kept: Vec<StoredMessage> = context[start..].iter().map(|(_, m)| m.clone()).collect();
        if start > 0 {
            session.context_after = context[start - 1].0;
        }

        let mut messages = fixed_msgs;
        for m in &kept {
            messages.push(json!({"role": m.role, "content": m.content}));
        }
        messages.push(json!({"role": "user", "content": input.message}));

        let request_id = format!("chat-{}", uuid::Uuid::new_v4().simple());
        let mut req = ChatRequest::simple(model.clone(), messages.clone(), true);
        req.include_usage = true;
        req.max_tokens = input.max_tokens;
        req.temperature = input.temperature;
        if cfg.logprobs && !choice.local {
            req.extra.insert("logprobs".to_owned(), Value::Bool(true));
        }
        let ctx = CallContext::new(request_id.clone(), Caller::Http);
        let selection = if choice.all_tools {
            Some(json!("all"))
        } else {
            input.server_tools.clone()
        };
        let stream: ChunkStream = match &selection {
            Some(sel) => {
                let hub = crate::llm::tool_loop::Cluster {
                    gateway: self.inner.llm.get(),
                    tasks: &self.inner.tasks,
                    plugins: &self.inner.plugins,
                    config: &self.inner.config,
                };
                crate::llm::tool_loop::start_for(&hub, caller, sel, req, ctx).await?
            }
            None => self.inner.llm.get().chat(req, ctx).await?.boxed(),
        };
        self.inner.running.insert(name.clone(), request_id);

        let (tx, rx) = mpsc::channel(64);
        let run = turn::Run {
            svc: self.clone(),
            name,
            session,
            choice,
            message: input.message,
            user_tokens,
            kept,
            fixed_tokens,
            dropped,
            messages,
            mode: input.stream_mode.unwrap_or_default(),
            started,
            started_ms,
            caller: caller.clone(),
        };
        let model_out = model.clone();
        let sid = session_id.clone();
        tokio::spawn(async move {
            let tx2 = tx.clone();
            tokio::select! {
                // The client went away: dropping `run` drops the model call (and its tools).
                () = tx2.closed() => {}
                () = run.drive(stream, tx, lock) => {}
            }
        });
        Ok(Turn {
            session_id: sid,
            model: model_out,
            events: rx,
        })
    }

    /// Interrupts the turn in progress of the caller's session: the answer so far is stored
    /// and ends the turn. False when none runs (at this hub).
    pub fn interrupt(&self, caller: &Principal, session_id: &str) -> bool {
        let name = session_name(caller.owner(), session_id);
        let id = self.inner.running.get(&name).map(|r| r.value().clone());
        id.is_some_and(|id| self.inner.llm.get().interrupt(&id))
    }

    /// The caller's session record, `None` if it has none by that id.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn session(
        &self,
        caller: &Principal,
        session_id: &str,
    ) -> Result<Option<Session>, Error> {
        validate_session_id(session_id)?;
        self.load(&session_name(caller.owner(), session_id)).await
    }

    /// The whole history of the caller's session, oldest first.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the caller has no such session; [`Error::Store`].
    pub async fn history(
        &self,
        caller: &Principal,
        session_id: &str,
    ) -> Result<Vec<StoredMessage>, Error> {
        validate_session_id(session_id)?;
        let name = session_name(caller.owner(), session_id);
        let all = self.read_all(&name, 0).await?;
        if all.is_empty() && self.load(&name).await?.is_none() {
            return Err(Error::NotFound(session_id.to_owned()));
        }
        Ok(all.into_iter().map(|(_, m)| m).collect())
    }

    /// Deletes the caller's session: its history, its record and its context.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Busy`] while it answers; [`Error::Store`].
    pub async fn delete(&self, caller: &Principal, session_id: &str) -> Result<(), Error> {
        validate_session_id(session_id)?;
        let name = session_name(caller.owner(), session_id);
        let _lock = self.lock(&name, session_id).await?;
        let had_log = self.inner.records.delete_log(LOG_KIND, &name).await?;
        let had_record = self.inner.records.delete(SESSION_KIND, &name).await?;
        if !had_log && !had_record {
            return Err(Error::NotFound(session_id.to_owned()));
        }
        if let Some(hook) = &self.inner.hooks.on_deleted {
            hook(caller.owner(), session_id);
        }
        Ok(())
    }

    /// Empties the working context of the caller's session (what the model is sent); the
    /// history stays.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Busy`]; [`Error::Store`].
    pub async fn clear_context(&self, caller: &Principal, session_id: &str) -> Result<(), Error> {
        validate_session_id(session_id)?;
        let name = session_name(caller.owner(), session_id);
        let _lock = self.lock(&name, session_id).await?;
        let mut s = self
            .load(&name)
            .await?
            .ok_or_else(|| Error::NotFound(session_id.to_owned()))?;
        s.context_after = s.log_len;
        s.context_count = 0;
        s.context_tokens = 0;
        s.context_roles = Roles::default();
        s.summary = None;
        self.save(&name, &s).await
    }

    /// The caller's sessions, most recently used first (admins: their own too).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn sessions(&self, caller: &Principal) -> Result<Vec<Session>, Error> {
        let prefix = format!("{}|", caller.owner());
        let mut out: Vec<Session> = self
            .inner
            .records
            .list(SESSION_KIND)
            .await?
            .into_iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .filter_map(|(_, raw)| serde_json::from_slice(&raw).ok())
            .collect();
        out.sort_by(|a: &Session, b: &Session| {
            b.updated_at_ms
                .cmp(&a.updated_at_ms)
                .then_with(|| a.session_id.cmp(&b.session_id))
        });
        Ok(out)
    }

    async fn save(&self, name: &str, s: &Session) -> Result<(), Error> {
        let raw = serde_json::to_vec(s).map_err(|e| {
            Error::Store(store::Error::Unreadable {
                what: format!("session record {name}"),
                reason: e.to_string(),
            })
        })?;
        self.inner
            .records
            .put(SESSION_KIND, name, &raw, None)
            .await?;
        Ok(())
    }

    /// Deletes sessions whose last message is older than `chat.retention_days` (0: none).
    /// Returns how many went.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn collect(&self) -> Result<usize, Error> {
        let days = self.cfg().retention_days;
        if days == 0 {
            return Ok(0);
        }
        let cutoff = apex_protocol::now_ms() - i64::try_from(days * 86_400_000).unwrap_or(i64::MAX);
        let mut n = 0;
        for (name, raw) in self.inner.records.list(SESSION_KIND).await? {
            let Ok(s) = serde_json::from_slice::<Session>(&raw) else {
                continue;
            };
            if s.updated_at_ms < cutoff {
                self.inner.records.delete_log(LOG_KIND, &name).await?;
                self.inner.records.delete(SESSION_KIND, &name).await?;
                if let Some(hook) = &self.inner.hooks.on_deleted {
                    hook(&s.owner, &s.session_id);
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Runs [`ChatService::collect`] at start and every hour until `stop`.
    pub fn spawn_retention(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match svc.collect().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        sessions = n,
                        "chat sessions past chat.retention_days deleted"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "chat retention failed; retried in an hour")
                    }
                }
            }
        });
    }
}
