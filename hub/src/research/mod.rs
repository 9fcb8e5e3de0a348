//! Research sessions (the NEXEN research platform's `/api/research/sessions…`): a research
//! task split by a coordinator agent into a dependency graph of agent tasks, each run as an
//! apex task of the node tool `agent.run`, group by group, then synthesised.
//!
//! - **Records.** A session is a record of kind [`SESSION`] (owner, name, task, and the
//!   status, stage, progress and tokens the run last reported). A run in progress has a record
//!   of kind [`RUN`]: its lease (which hub drives it, until when).
//! - **One event log.** Everything a run does is appended to the log [`EVENTS`]/`<session id>`
//!   ([`log`]); the SSE stream of `execute` is that log rendered (`id:` its sequence numbers,
//!   so `Last-Event-ID` resumes with no gap and no duplicate), and the run's state, the
//!   `tasks`, `executions` and memory-layer views are folds of it.
//! - **Durable and resumable.** The driver ([`run`]) appends before it acts on what it
//!   appended, and each agent step is submitted with the idempotency key
//!   `research:<session>:<task>`: a hub that restarts (or, in shared mode, another hub whose
//!   lease poll finds the run's lease expired) folds the log and continues; a task that had
//!   completed is not run again, one in flight is found again by its key.
//! - **Owner.** A session belongs to the principal that created it; others are told it does
//!   not exist; admins see all. The run acts as the owner ([`Principal::acting_for`]).

pub mod config;
pub mod graph;
mod lease;
pub mod log;
pub mod query;
mod roster;
mod run;
mod steps;

pub use lease::{LEASE_MS, resume_loop};
pub use steps::plan_schema;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

pub use config::ResearchConfig;
use log::{RunEvent, RunState};

use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;
use crate::tasks::TaskService;

/// Sessions by id (JSON of [`SessionRecord`]).
pub const SESSION: Kind = "research_session";
/// Runs in progress by session id (JSON of the lease: `{holder, until_ms}`).
pub const RUN: Kind = "research_run";
/// The event logs, keyed by session id.
pub const EVENTS: Kind = "research_events";

/// Where a session's files live, virtually (`<WORKSPACE>/<id>/L0/…`).
pub const WORKSPACE: &str = "/workspace/sessions";

/// Most characters of a session's `name`.
pub const MAX_NAME_CHARS: usize = 256;
/// Most characters of a session's `task`.
pub const MAX_TASK_CHARS: usize = 20_000;

/// Why a research call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is not acceptable; `param` names it.
    #[error("{message}")]
    Invalid {
        /// The field.
        param: &'static str,
        /// Why, for people.
        message: String,
    },
    /// No such session (or one the caller may not see), or no such file: what, and its id.
    #[error("{0} `{1}` not found")]
    NotFound(&'static str, String),
    /// The session's state does not allow it (an archived session cannot run).
    #[error("{0}")]
    Conflict(String),
    /// The record store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

fn invalid(param: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        param,
        message: message.into(),
    }
}

/// An agent that can do a step: the owner's profile of an agent type, as the arguments of
/// an `agent.run` task (without `task`, `inputs` and `response_format`, which the run adds).
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// The stored profile's id (`None`: the default template).
    pub profile_id: Option<String>,
    /// Its agent type.
    pub agent_type: String,
    /// Its display name.
    pub name: String,
    /// The model it asks first.
    pub model: String,
    /// `agent.run` arguments: `agent_type`, `persona`, `model`, `fallback_model`,
    /// `temperature`, `max_tokens`.
    pub args: serde_json::Map<String, Value>,
}

/// Who does research steps: the agent profiles (`crate::agents`).
pub trait Roster: Send + Sync + 'static {
    /// The agent of type `agent_type` for `owner` (its stored, enabled profile, else the
    /// default template), or `None` if there is no such type.
    fn agent<'a>(
        &'a self,
        owner: &'a str,
        agent_type: &'a str,
    ) -> BoxFuture<'a, Result<Option<Agent>, store::Error>>;

    /// The agent types the coordinator may assign tasks to, most generally useful first.
    fn assignable(&self) -> Vec<String>;
}

/// [`SessionRecord::mode`] of a research session.
pub const MODE_RESEARCH: &str = "research";
/// [`SessionRecord::mode`] of a plan-executor query (`POST /api/v2/query`, [`query`]).
pub const MODE_QUERY: &str = "query";

fn research_mode() -> String {
    MODE_RESEARCH.to_owned()
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// `<uuid>`.
    pub id: String,
    /// [`MODE_RESEARCH`] (default) or [`MODE_QUERY`]: what its run does. Queries are not
    /// listed nor served by the research routes.
    #[serde(default = "research_mode")]
    pub mode: String,
    /// The owner ([`Principal::owner`]).
    pub owner: String,
    /// A label.
    pub name: String,
    /// The research task.
    pub task: String,
    /// `created`, `running`, `completed`, `failed` or `archived`.
    pub status: String,
    /// `created`, `decomposition`, `execution` or `synthesis`.
    pub current_stage: String,
    /// 0 to 100.
    pub progress: u32,
    /// Tokens the run's agents used.
    pub total_tokens: u64,
    /// Created, Unix ms.
    pub created_at_ms: i64,
    /// Last change, Unix ms.
    pub updated_at_ms: i64,
    /// When the run completed, Unix ms.
    pub completed_at_ms: Option<i64>,
}

/// The session object of the HTTP API (the research platform's `ResearchSession`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// The owner's user id (`user:` taken off for JWT users; else the owner string).
    pub user_id: String,
    /// A label.
    pub name: String,
    /// The research task.
    pub task: String,
    /// `created`, `running`, `completed`, `failed` or `archived`.
    pub status: String,
    /// `created`, `decomposition`, `execution` or `synthesis`.
    pub current_stage: String,
    /// Percent of the research tasks ended, 0 to 100.
    pub progress: u32,
    /// `/workspace/sessions/<id>`: the virtual root of the memory layers.
    pub workspace_path: String,
    /// Tokens the run's agents used.
    pub total_tokens: u64,
    /// Cost in USD (0: apex does not price models).
    pub total_cost: f64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// RFC 3339, once completed.
    pub completed_at: Option<String>,
}

/// RFC 3339 (UTC, seconds and milliseconds) of Unix ms.
pub fn rfc3339(ms: i64) -> String {
    use chrono::{SecondsFormat, TimeZone, Utc};
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The user id shown for an owner string.
pub fn user_id_of(owner: &str) -> String {
    owner.strip_prefix("user:").unwrap_or(owner).to_owned()
}

impl SessionRecord {
    /// A new session of `caller` with status `status`, created now.
    fn new(mode: &str, caller: &Principal, name: String, task: String, status: &str) -> Self {
        let now = now_ms();
        SessionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            mode: mode.to_owned(),
            owner: caller.owner().to_owned(),
            name,
            task,
            status: status.to_owned(),
            current_stage: "created".to_owned(),
            progress: 0,
            total_tokens: 0,
            created_at_ms: now,
            updated_at_ms: now,
            completed_at_ms: None,
        }
    }

    /// Its HTTP view.
    pub fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            user_id: user_id_of(&self.owner),
            name: self.name.clone(),
            task: self.task.clone(),
            status: self.status.clone(),
            current_stage: self.current_stage.clone(),
            progress: self.progress,
            workspace_path: format!("{WORKSPACE}/{}", self.id),
            total_tokens: self.total_tokens,
            total_cost: 0.0,
            created_at: rfc3339(self.created_at_ms),
            updated_at: rfc3339(self.updated_at_ms),
            completed_at: self.completed_at_ms.map(rfc3339),
        }
    }
}

/// The events of a run after some sequence number, then live ones: `(seq, event)`, ending
/// after the terminal event, when the session is deleted, or when the hub shuts down.
pub type EventStream = mpsc::Receiver<(u64, RunEvent)>;

/// The research service: sessions, runs and their views. Clones share everything.
#[derive(Clone)]
pub struct Research {
    inner: Arc<Inner>,
}

struct Inner {
    records: RecordStore,
    tasks: TaskService,
    roster: Arc<dyn Roster>,
    /// Memory search, for the retrieval stage of queries (`None`: nothing is searched there).
    memory: Option<crate::memory::Memory>,
    config: ResearchConfig,
    /// This hub's name in run leases.
    hub_id: String,
    /// Wakes the streams of a session when this hub appends to its log.
    appended: DashMap<String, Arc<Notify>>,
    /// Runs this hub drives now.
    driving: DashMap<String, ()>,
    /// Each run lease seen by the resume loop: its bytes and since when (this hub's
    /// monotonic clock) they have not changed.
    lease_seen:
        parking_lot::Mutex<std::collections::HashMap<String, (Vec<u8>, std::time::Instant)>>,
    shutdown: watch::Receiver<bool>,
}

/// Unix ms now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Research {
    /// The service over `records`, running agent steps through `tasks` with `roster`'s
    /// agents; queries search `memory`.
    pub fn new(
        records: RecordStore,
        tasks: TaskService,
        roster: Arc<dyn Roster>,
        memory: Option<crate::memory::Memory>,
        config: ResearchConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                records,
                tasks,
                roster,
                memory,
                config,
                hub_id: uuid::Uuid::new_v4().to_string(),
                appended: DashMap::new(),
                driving: DashMap::new(),
                lease_seen: Default::default(),
                shutdown,
            }),
        }
    }

    /// Creates a session for `caller`.
    ///
    /// # Errors
    /// [`Error::Invalid`] (`name`, `task`), [`Error::Store`].
    pub async fn create(
        &self,
        caller: &Principal,
        name: &str,
        task: &str,
    ) -> Result<SessionView, Error> {
        let name = check_name(name)?;
        let task = check_text("task", task)?;
        let rec = SessionRecord::new(MODE_RESEARCH, caller, name, task, "created");
        self.inner
            .records
            .create(SESSION, &rec.id, &encode(&rec), None)
            .await?;
        Ok(rec.view())
    }

    /// The session `id` if `caller` may see it.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Store`].
    pub async fn session(&self, caller: &Principal, id: &str) -> Result<SessionRecord, Error> {
        let (rec, _) = self.read(id).await?.ok_or_else(|| not_found(id))?;
        if !caller.sees(Some(&rec.owner)) || rec.mode != MODE_RESEARCH {
            return Err(not_found(id));
        }
        Ok(rec)
    }

    async fn read(&self, id: &str) -> Result<Option<(SessionRecord, Vec<u8>)>, Error> {
        let Some(bytes) = self.inner.records.get(SESSION, id).await? else {
            return Ok(None);
        };
        let rec: SessionRecord =
            serde_json::from_slice(&bytes).map_err(|e| store::Error::Unreadable {
                what: format!("research session {id}"),
                reason: e.to_string(),
            })?;
        Ok(Some((rec, bytes)))
    }

    /// A page (`page` from 1) of `caller`'s sessions (admins: all), newest first, with the
    /// total, optionally only those with `status`.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn list(
        &self,
        caller: &Principal,
        status: Option<&str>,
        page: usize,
        page_size: usize,
    ) -> Result<(Vec<SessionView>, usize), Error> {
        let mut all: Vec<SessionRecord> = self
            .inner
            .records
            .list(SESSION)
            .await?
            .into_iter()
            .filter_map(|(_, b)| serde_json::from_slice::<SessionRecord>(&b).ok())
            .filter(|r| r.mode == MODE_RESEARCH && caller.sees(Some(&r.owner)))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .collect();
        all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.id.cmp(&a.id)));
        let total = all.len();
        let start = page.saturating_sub(1).saturating_mul(page_size);
        let views = all
            .into_iter()
            .skip(start)
            .take(page_size)
            .map(|r| r.view())
            .collect();
        Ok((views, total))
    }

    /// Renames a session and/or archives it (`status: "archived"`; nothing else may be set).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Invalid`] (`name`, `status`), [`Error::Conflict`] to
    /// archive a running session, [`Error::Store`].
    pub async fn update(
        &self,
        caller: &Principal,
        id: &str,
        name: Option<&str>,
        status: Option<&str>,
    ) -> Result<SessionView, Error> {
        let name = name.map(check_name).transpose()?;
        if let Some(s) = status
            && s != "archived"
        {
            return Err(invalid(
                "status",
                "`status` may only be set to \"archived\"",
            ));
        }
        self.session(caller, id).await?;
        let rec = self
            .modify(id, |r| {
                if status.is_some() && r.status == "running" {
                    return Err(Error::Conflict(
                        "a running session cannot be archived; wait for it to end".to_owned(),
                    ));
                }
                if let Some(n) = &name {
                    r.name.clone_from(n);
                }
                if status.is_some() {
                    r.status = "archived".to_owned();
                }
                Ok(())
            })
            .await?;
        Ok(rec.view())
    }

    /// Deletes a session, its log and its run (a run in progress stops within a lease
    /// renewal, [`LEASE_MS`]/3, and cancels its agent steps in flight).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Store`].
    pub async fn delete(&self, caller: &Principal, id: &str) -> Result<(), Error> {
        self.session(caller, id).await?;
        self.inner.records.delete(SESSION, id).await?;
        // A run in progress loses its lease at its next renewal, and its driver cancels the
        // steps it has in flight.
        self.inner.records.delete(RUN, id).await?;
        self.inner.records.delete_log(EVENTS, id).await?;
        self.wake(id);
        Ok(())
    }

    /// Read-modify-write of a session record with compare-and-set (retried on a race).
    async fn modify(
        &self,
        id: &str,
        mut f: impl FnMut(&mut SessionRecord) -> Result<(), Error>,
    ) -> Result<SessionRecord, Error> {
        loop {
            let (mut rec, bytes) = self.read(id).await?.ok_or_else(|| not_found(id))?;
            f(&mut rec)?;
            rec.updated_at_ms = now_ms();
            if self
                .inner
                .records
                .compare_and_set(SESSION, id, Some(&bytes), Some(&encode(&rec)), None)
                .await?
            {
                return Ok(rec);
            }
        }
    }

    /// The whole log of session `id`, folded.
    async fn state(&self, id: &str) -> Result<RunState, Error> {
        let mut s = RunState::default();
        for (seq, e) in self.events_after(id, 0, usize::MAX).await? {
            s.apply(seq, &e);
        }
        Ok(s)
    }

    /// Up to `limit` events of session `id` after `after`.
    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RunEvent)>, Error> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < limit {
            let page = self
                .inner
                .records
                .read_log(EVENTS, id, cursor, (limit - out.len()).min(1024))
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            cursor = *last;
            for (seq, bytes) in page {
                match serde_json::from_slice::<RunEvent>(&bytes) {
                    Ok(e) => out.push((seq, e)),
                    Err(e) => {
                        return Err(store::Error::Unreadable {
                            what: format!("research event {id}/{seq}"),
                            reason: e.to_string(),
                        }
                        .into());
                    }
                }
            }
        }
        Ok(out)
    }

    /// `POST /{id}/execute`: starts the session's run if it has none (or attaches to the
    /// run in progress, or replays a finished one) and returns its events after `after`
    /// (`Last-Event-ID`; 0 from the start).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Conflict`] for an archived session, [`Error::Store`].
    pub async fn execute(
        &self,
        caller: &Principal,
        id: &str,
        after: u64,
    ) -> Result<Option<EventStream>, Error> {
        let rec = self.session(caller, id).await?;
        // A client resuming after the run's last event: nothing will come (`None`, a 204 that
        // stops browsers' EventSource retries).
        if after > 0
            && let Some((_, bytes)) = self
                .inner
                .records
                .read_log(EVENTS, id, after - 1, 1)
                .await?
                .first()
            && serde_json::from_slice::<RunEvent>(bytes).is_ok_and(|e| e.kind.is_terminal())
        {
            return Ok(None);
        }
        if rec.status == "archived" {
            return Err(Error::Conflict(
                "the session is archived; an archived session does not run".to_owned(),
            ));
        }
        if rec.status == "created" {
            // The first caller creates the run's lease and drives it; any other attaches.
            let lease = lease::Lease::fresh(&self.inner.hub_id);
            if self
                .inner
                .records
                .create(RUN, id, &lease.encode(), None)
                .await?
            {
                self.modify(id, |r| {
                    if r.status == "created" {
                        r.status = "running".to_owned();
                    }
                    Ok(())
                })
                .await?;
                self.spawn_driver(id.to_owned(), lease);
            }
        }
        Ok(Some(self.follow(id.to_owned(), after)))
    }

    /// `POST /api/v2/query`: starts a plan-executor query of `question` for `caller` and
    /// returns its events from the start (render them with [`query::plan_executor`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] (`query`), [`Error::Store`].
    pub async fn query(&self, caller: &Principal, question: &str) -> Result<EventStream, Error> {
        let question = check_text("query", question)?;
        let name = question.chars().take(MAX_NAME_CHARS).collect();
        let mut rec = SessionRecord::new(MODE_QUERY, caller, name, question, "running");
        rec.current_stage = "planning".to_owned();
        self.inner
            .records
            .create(SESSION, &rec.id, &encode(&rec), None)
            .await?;
        let lease = lease::Lease::fresh(&self.inner.hub_id);
        self.inner
            .records
            .create(RUN, &rec.id, &lease.encode(), None)
            .await?;
        self.spawn_driver(rec.id.clone(), lease);
        Ok(self.follow(rec.id, 0))
    }

    fn notify_of(&self, id: &str) -> Arc<Notify> {
        self.inner
            .appended
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    fn wake(&self, id: &str) {
        if let Some(n) = self.inner.appended.get(id) {
            n.notify_waiters();
        }
    }

    /// The stream of the events after `after`, then live ones (this hub's appends wake it at
    /// once; another hub's are read within [`FOLLOW_POLL`]).
    fn follow(&self, id: String, after: u64) -> EventStream {
        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            let mut cursor = after;
            let mut shutdown = this.inner.shutdown.clone();
            let notify = this.notify_of(&id);
            loop {
                let woken = notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let page = match this.events_after(&id, cursor, 256).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "research stream not read");
                        return;
                    }
                };
                let empty = page.is_empty();
                for (seq, e) in page {
                    cursor = seq;
                    let end = e.kind.is_terminal();
                    if tx.send((seq, e)).await.is_err() || end {
                        return;
                    }
                }
                if !empty {
                    continue;
                }
                // Nothing new: a deleted session's stream ends.
                if matches!(this.inner.records.get(SESSION, &id).await, Ok(None)) {
                    return;
                }
                tokio::select! {
                    _ = &mut woken => {}
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        rx
    }

    /// `GET /{id}/tasks`: the plan's tasks with their status and output.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Store`].
    pub async fn tasks(&self, caller: &Principal, id: &str) -> Result<Vec<Value>, Error> {
        self.session(caller, id).await?;
        let s = self.state(id).await?;
        let created = s.started_at_ms.unwrap_or(0);
        Ok(s.plan
            .iter()
            .flatten()
            .map(|t| {
                let status = s
                    .state
                    .get(&t.id)
                    .copied()
                    .unwrap_or(log::TaskState::Pending);
                json!({
                    "id": t.id,
                    "session_id": id,
                    "parent_task_id": null,
                    "description": t.description,
                    "assigned_agent": t.assigned_agent,
                    "priority": t.priority,
                    "status": status.as_str(),
                    "dependencies": t.dependencies,
                    "execution_order": t.execution_order,
                    "execution_group": t.execution_group,
                    "output": s.output(&t.id),
                    "created_at": rfc3339(created),
                    "updated_at": rfc3339(s.updated_ms.get(&t.id).copied().unwrap_or(created)),
                })
            })
            .collect())
    }

    /// `GET /{id}/executions`: every agent execution of the run (the plan, each research
    /// task, the synthesis), in the order they started.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Store`].
    pub async fn executions(&self, caller: &Principal, id: &str) -> Result<Vec<Value>, Error> {
        self.session(caller, id).await?;
        let s = self.state(id).await?;
        Ok(s.execution_order
            .iter()
            .filter_map(|k| s.executions.get(k).map(|x| (k, x)))
            .map(|(k, x)| {
                let structured = &x.end["structured"];
                let list = |f: &str| structured.get(f).cloned().unwrap_or_else(|| json!([]));
                let raw = (x.status == "completed"
                    && x.research_task_id.is_some())
                .then(|| format!("{WORKSPACE}/{id}/L0/{}/output.md", x.agent_type));
                json!({
                    "id": format!("{id}:{k}"),
                    "session_id": id,
                    "agent_profile_id": x.start.get("agent_profile_id").cloned().unwrap_or(Value::Null),
                    "research_task_id": x.research_task_id,
                    "agent_type": x.agent_type,
                    "agent_name": x.start.get("agent_name").cloned().unwrap_or_else(|| json!(x.agent_type)),
                    "task_description": x.description,
                    "status": x.status,
                    "input_context": x.start.get("input_context").cloned().unwrap_or_else(|| json!({})),
                    "output_result": x.output,
                    "structured_output": {
                        "key_findings": list("key_findings"),
                        "uncertainties": list("uncertainties"),
                        "suggestions": list("suggestions"),
                    },
                    "tokens_used": x.end.get("tokens_used").cloned().unwrap_or(json!(0)),
                    "duration_ms": x.end.get("duration_ms").filter(|d| !d.is_null()).cloned()
                        .unwrap_or_else(|| json!(x.completed_at_ms.map(|c| c - x.started_at_ms))),
                    "model_used": x.end.get("model_used").cloned().unwrap_or(Value::Null),
                    "confidence": x.end.get("confidence").cloned().unwrap_or(Value::Null),
                    "raw_output_path": raw,
                    "error_message": x.error,
                    "retry_count": x.end.get("retry_count").cloned().unwrap_or(json!(0)),
                    "started_at": rfc3339(x.started_at_ms),
                    "completed_at": x.completed_at_ms.map(rfc3339),
                })
            })
            .collect())
    }

    /// `GET /{id}/memory`: the memory layers' files, L2 first (only `layer` if given:
    /// `L0`, `L1` or `L2`).
    ///
    /// # Errors
    /// [`Error::Invalid`] (`layer`), [`Error::NotFound`], [`Error::Store`].
    pub async fn memory(
        &self,
        caller: &Principal,
        id: &str,
        layer: Option<&str>,
    ) -> Result<Value, Error> {
        if let Some(l) = layer
            && !["L0", "L1", "L2"].contains(&l)
        {
            return Err(invalid("layer", "`layer` must be L0, L1 or L2"));
        }
        self.session(caller, id).await?;
        let files = log::layer_files(&self.state(id).await?);
        let layers: Vec<Value> = ["L2", "L1", "L0"]
            .into_iter()
            .filter(|l| layer.is_none_or(|x| x == *l))
            .map(|l| {
                let files: Vec<Value> = files
                    .iter()
                    .filter(|f| f.layer == l)
                    .map(|f| {
                        json!({
                            "name": f.rel.rsplit('/').next().unwrap_or(&f.rel),
                            "path": format!("{WORKSPACE}/{id}/{}", f.rel),
                            "size": f.content.len(),
                            "modified_at": rfc3339(f.modified_ms),
                        })
                    })
                    .collect();
                json!({"layer": l, "files": files})
            })
            .collect();
        Ok(json!({"layers": layers}))
    }

    /// `GET /{id}/memory/content?path=`: one file, by its path (`/workspace/sessions/<id>/…`
    /// or relative to it, as `L2/key_findings.md`).
    ///
    /// # Errors
    /// [`Error::Invalid`] (`path`) for a path outside the session (`..`, another root, another
    /// session), [`Error::NotFound`] for a file it does not have, [`Error::Store`].
    pub async fn memory_content(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
    ) -> Result<Value, Error> {
        let rel = session_relative(id, path)?;
        self.session(caller, id).await?;
        let files = log::layer_files(&self.state(id).await?);
        let f = files
            .into_iter()
            .find(|f| f.rel == rel)
            .ok_or_else(|| Error::NotFound("file", path.to_owned()))?;
        Ok(json!({
            "layer": f.layer,
            "path": format!("{WORKSPACE}/{id}/{}", f.rel),
            "content": f.content,
        }))
    }

    /// Starts the driver of `id` on this hub, holding `lease`.
    fn spawn_driver(&self, id: String, lease: lease::Lease) {
        if self.inner.driving.insert(id.clone(), ()).is_some() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            run::drive(this.clone(), id.clone(), lease).await;
            this.inner.driving.remove(&id);
        });
    }
}

/// How often a stream with nothing new reads the log again (another hub's appends).
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

fn not_found(id: &str) -> Error {
    Error::NotFound("research session", id.to_owned())
}

fn check_name(name: &str) -> Result<String, Error> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            "name",
            format!("`name` must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    Ok(n.to_owned())
}

/// `text` trimmed, or a 400 naming `param` when empty or over [`MAX_TASK_CHARS`].
fn check_text(param: &'static str, text: &str) -> Result<String, Error> {
    let t = text.trim();
    if t.is_empty() || t.chars().count() > MAX_TASK_CHARS {
        return Err(invalid(
            param,
            format!("`{param}` must be 1 to {MAX_TASK_CHARS} characters"),
        ));
    }
    Ok(t.to_owned())
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The path of a memory file relative to session `id`'s workspace, or a 400 for anything
/// that could reach outside it.
fn session_relative(id: &str, path: &str) -> Result<String, Error> {
    let bad = || {
        invalid(
            "path",
            "`path` must name a file inside this session's workspace",
        )
    };
    if path.is_empty() || path.contains('\\') || path.contains('\0') {
        return Err(bad());
    }
    let root = format!("{WORKSPACE}/{id}/");
    let rel = if let Some(r) = path.strip_prefix(&root) {
        r
    } else if path.starts_with('/') {
        return Err(bad());
    } else {
        path
    };
    let parts: Vec<&str> = rel.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_session_are_refused() {
        let id = "s1";
        assert_eq!(
            session_relative(id, "/workspace/sessions/s1/L2/key_findings.md").unwrap(),
            "L2/key_findings.md"
        );
        assert_eq!(
            session_relative(id, "L0/explorer/output.md").unwrap(),
            "L0/explorer/output.md"
        );
        for bad in [
            "",
            "/etc/passwd",
            "../s2/L2/key_findings.md",
            "/workspace/sessions/s2/L2/key_findings.md",
            "/workspace/sessions/s1/../s2/L2/key_findings.md",
            "L2/./x",
            "L2//x",
            "L2\\..\\x",
            "/workspace/sessions/s1",
        ] {
            assert!(
                matches!(
                    session_relative(id, bad),
                    Err(Error::Invalid { param: "path", .. })
                ),
                "{bad}"
            );
        }
    }
}
