//! The driver of a research run: plan, groups, synthesis, each agent step an `agent.run` task
//! through the task service; and the lease that makes one hub drive a run at a time.
//!
//! The driver appends an event before acting on it and folds the log when it starts, so it
//! can stop anywhere (hub killed, lease lost, shutdown) and be started again by any hub:
//! - the plan step and the synthesis are tasks with the idempotency keys
//!   `research:<session>:plan` and `research:<session>:synthesis`, each research task
//!   `research:<session>:<task id>`: a restarted driver submitting them again gets the task
//!   that exists (finished or in flight) and runs nothing twice;
//! - `task_progress` events record the apex task's event number they came from, so a resumed
//!   driver reports only newer progress;
//! - every event is appended only while the lease is held.
//!
//! **Lease.** The record `research_run`/`<session>` is `{holder, until_ms}`. The driver renews
//! it every [`LEASE_MS`]/3 by compare-and-set; when a renewal finds another holder (or no
//! record: the session was deleted) the driver stops before its next append. Every hub polls
//! the runs every [`RESUME_POLL`] and takes over one whose lease has expired; a hub alone on its
//! store (the data-dir lock) takes over every run at start, since no other hub can hold one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::graph::{Graph, PlannedTask};
use super::log::{Kind, PlanTask, RunEvent, RunState, TaskState, digest};
use super::{Agent, EVENTS, Error, RUN, Research, now_ms};
use crate::model::{EventKind, Task, TaskSpec, TaskStatus};
use crate::principal::Principal;
use crate::tasks::MAX_WAIT;

/// How long a lease lasts without renewal, in ms.
pub const LEASE_MS: i64 = 6_000;
/// How often each hub looks for runs to take over.
pub const RESUME_POLL: Duration = Duration::from_secs(1);
/// The node tool of every agent step.
pub const AGENT_TOOL: &str = "agent.run";
/// Groups wider than this report no `task_progress` (one event stream per task would cost
/// more than it tells); their tasks still report start and end.
pub const MAX_PROGRESS_STREAMS: usize = 256;
/// Most inputs of one step (`agent.run`'s limit).
pub const MAX_INPUTS: usize = 64;
/// Most steps submitted in one write.
pub const SUBMIT_BATCH: usize = 500;

/// A run's lease, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    until_ms: i64,
}

/// The lease a driver holds: renewed in the background; [`Lease::held`] tells whether it may
/// still append.
#[derive(Clone)]
pub struct Lease {
    holder: String,
    /// The bytes last written (what the next renewal compares with).
    last: Arc<parking_lot::Mutex<Vec<u8>>>,
    /// Until when this hub may act, Unix ms (a margin before the stored `until_ms`).
    valid_until: Arc<AtomicI64>,
    lost: Arc<AtomicBool>,
}

impl Lease {
    /// A new lease of `holder`, from now.
    pub fn fresh(holder: &str) -> Lease {
        let rec = LeaseRecord {
            holder: holder.to_owned(),
            until_ms: now_ms() + LEASE_MS,
        };
        Lease {
            holder: holder.to_owned(),
            last: Arc::new(parking_lot::Mutex::new(super::encode(&rec))),
            valid_until: Arc::new(AtomicI64::new(rec.until_ms - LEASE_MS / 3)),
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        self.last.lock().clone()
    }

    /// Whether the driver may still append.
    fn held(&self) -> bool {
        !self.lost.load(Ordering::Acquire) && now_ms() < self.valid_until.load(Ordering::Acquire)
    }

    /// Renews once: false when the lease is gone (another holder, or no record).
    async fn renew(&self, r: &Research, id: &str) -> bool {
        let old = self.encode();
        let rec = LeaseRecord {
            holder: self.holder.clone(),
            until_ms: now_ms() + LEASE_MS,
        };
        let new = super::encode(&rec);
        match r
            .inner
            .records
            .compare_and_set(RUN, id, Some(&old), Some(&new), None)
            .await
        {
            Ok(true) => {
                *self.last.lock() = new;
                self.valid_until
                    .store(rec.until_ms - LEASE_MS / 3, Ordering::Release);
                true
            }
            Ok(false) => {
                self.lost.store(true, Ordering::Release);
                false
            }
            // The store is away: keep the lease until it would expire.
            Err(_) => true,
        }
    }
}

/// Takes over runs whose lease has expired (all runs held by others, on a hub alone on its
/// store), every [`RESUME_POLL`] until shutdown.
pub async fn resume_loop(r: Research) {
    let mut shutdown = r.inner.shutdown.clone();
    let exclusive = r.inner.tasks.exclusive();
    loop {
        if let Err(e) = resume_once(&r, exclusive).await {
            tracing::debug!(error = %e, "research runs not scanned");
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUME_POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn resume_once(r: &Research, exclusive: bool) -> Result<(), Error> {
    let runs = r.inner.records.list(RUN).await?;
    let now = std::time::Instant::now();
    {
        // Forget runs that ended.
        let mut seen = r.inner.lease_seen.lock();
        seen.retain(|id, _| runs.iter().any(|(r, _)| r == id));
    }
    for (id, bytes) in runs {
        if r.inner.driving.contains_key(&id) {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<LeaseRecord>(&bytes) else {
            continue;
        };
        // Expiry on this hub's own monotonic clock: the lease is dead when its record has not
        // changed (no renewal) for a whole lease, whatever the hubs' wall clocks say. A lease
        // given back (`until_ms: 0`) is free at once.
        let unchanged_for = {
            let mut seen = r.inner.lease_seen.lock();
            let e = seen
                .entry(id.clone())
                .or_insert_with(|| (bytes.clone(), now));
            if e.0 != bytes {
                *e = (bytes.clone(), now);
            }
            now.duration_since(e.1)
        };
        let expired = rec.until_ms == 0 || unchanged_for >= Duration::from_millis(LEASE_MS as u64);
        if !(expired || exclusive && rec.holder != r.inner.hub_id) {
            continue;
        }
        let lease = Lease::fresh(&r.inner.hub_id);
        if r.inner
            .records
            .compare_and_set(RUN, &id, Some(&bytes), Some(&lease.encode()), None)
            .await?
        {
            tracing::info!(session = %id, previous = %rec.holder, "research run taken over");
            r.spawn_driver(id, lease);
        }
    }
    Ok(())
}

/// Why the driver stopped before the run ended.
#[derive(Debug)]
pub(super) enum Stop {
    /// The lease is gone or the hub shuts down: another driver continues.
    Yield,
    /// The store failed: the lease expires and the run is taken over.
    Store(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Store(e.to_string())
    }
}

/// Drives run `id` to its end or until it must stop.
pub async fn drive(r: Research, id: String, lease: Lease) {
    let renewer = {
        let (r, id, lease) = (r.clone(), id.clone(), lease.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis((LEASE_MS / 3) as u64)).await;
                if !lease.renew(&r, &id).await {
                    return;
                }
            }
        })
    };
    let mut d = match Driver::open(r.clone(), id.clone(), lease.clone()).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(session = %id, error = ?e, "research run not started");
            renewer.abort();
            return;
        }
    };
    let outcome = d.run().await;
    renewer.abort();
    match outcome {
        Ok(()) => {
            let _ = r.inner.records.delete(RUN, &id).await;
        }
        Err(Stop::Yield) => {
            // Shutting down: give the lease back, so another hub takes it over at once.
            if lease.held() {
                let gone = LeaseRecord {
                    holder: lease.holder.clone(),
                    until_ms: 0,
                };
                let _ = r
                    .inner
                    .records
                    .compare_and_set(
                        RUN,
                        &id,
                        Some(&lease.encode()),
                        Some(&super::encode(&gone)),
                        None,
                    )
                    .await;
            }
        }
        Err(Stop::Store(e)) => {
            tracing::warn!(session = %id, error = %e, "research run paused: the store failed");
        }
    }
}

/// What a watcher of one agent step tells the driver.
enum Msg {
    Progress {
        key: String,
        seq: u32,
        progress: f64,
        message: String,
    },
    Done {
        key: String,
        task: Box<Task>,
    },
    Gone {
        key: String,
        error: String,
    },
}

/// The driver of one run (a research run, or a query run: `query.rs`).
pub(super) struct Driver {
    pub(super) r: Research,
    pub(super) id: String,
    lease: Lease,
    pub(super) owner: Principal,
    /// The research task, or the query's question.
    pub(super) task: String,
    /// `research` or `query`.
    mode: String,
    pub(super) state: RunState,
    pub(super) started_ms: i64,
}

impl Driver {
    async fn open(r: Research, id: String, lease: Lease) -> Result<Driver, Stop> {
        let Some((rec, _)) = r.read(&id).await? else {
            // The session was deleted: its lease record goes too (else every hub would take
            // it over forever).
            let _ = r
                .inner
                .records
                .compare_and_set(RUN, &id, Some(&lease.encode()), None, None)
                .await;
            return Err(Stop::Yield);
        };
        let state = r.state(&id).await?;
        Ok(Driver {
            owner: Principal::acting_for(&rec.owner),
            task: rec.task,
            mode: rec.mode,
            started_ms: state.started_at_ms.unwrap_or_else(now_ms),
            state,
            r,
            id,
            lease,
        })
    }

    fn stopping(&self) -> bool {
        *self.r.inner.shutdown.borrow() || !self.lease.held()
    }

    /// Appends `events` (one durable write), folds them in and wakes the streams.
    pub(super) async fn append(&mut self, events: Vec<RunEvent>) -> Result<(), Stop> {
        if events.is_empty() {
            return Ok(());
        }
        if self.stopping() {
            return Err(Stop::Yield);
        }
        // Fencing: the lease record must still be this driver's (not taken over, not deleted
        // with its session) right before the write.
        // (By holder: a renewal may be changing the bytes at this moment.)
        let holder = |b: &[u8]| {
            serde_json::from_slice::<LeaseRecord>(b).is_ok_and(|l| l.holder == self.lease.holder)
        };
        match self.r.inner.records.get(RUN, &self.id).await {
            Ok(Some(b)) if holder(&b) => {}
            Ok(_) => {
                self.lease.lost.store(true, Ordering::Release);
                return Err(Stop::Yield);
            }
            Err(e) => return Err(Stop::Store(e.to_string())),
        }
        let bytes: Vec<Vec<u8>> = events.iter().map(super::encode).collect();
        let last = self
            .r
            .inner
            .records
            .append(EVENTS, &self.id, bytes)
            .await
            .map_err(|e| Stop::Store(e.to_string()))?;
        let first = last + 1 - events.len() as u64;
        for (i, e) in events.iter().enumerate() {
            self.state.apply(first + i as u64, e);
        }
        self.r.wake(&self.id);
        Ok(())
    }

    async fn run(&mut self) -> Result<(), Stop> {
        if self.state.ended.is_some() {
            return self.settle().await;
        }
        if self.mode == super::MODE_QUERY {
            return self.run_query().await;
        }
        if self.state.started_at_ms.is_none() {
            let e = RunEvent::new(
                Kind::SessionStarted,
                json!({"session_id": self.id, "message": "Research started"}),
                now_ms(),
            );
            self.append(vec![e]).await?;
            self.started_ms = self.state.started_at_ms.unwrap_or_else(now_ms);
            self.report().await;
        }
        if self.state.plan.is_none()
            && let Err(message) = self.plan().await?
        {
            return self.fail(message).await;
        }
        let groups = self.groups();
        for (g, members) in groups.iter().enumerate() {
            if self.state.groups_completed.contains_key(&g) {
                continue;
            }
            self.group(g, members).await?;
            self.report().await;
        }
        if self.state.synthesis.is_none()
            && let Err(message) = self.synthesize().await?
        {
            return self.fail(message).await;
        }
        let e = RunEvent::new(
            Kind::SessionCompleted,
            json!({
                "session_id": self.id,
                "total_tokens": self.state.total_tokens,
                "duration_ms": (now_ms() - self.started_ms).max(0),
            }),
            now_ms(),
        );
        self.end(e).await
    }

    /// Records the run's failure (an `error` event ends it).
    pub(super) async fn fail(&mut self, message: String) -> Result<(), Stop> {
        let e = RunEvent::new(Kind::Error, json!({"error": message}), now_ms());
        self.end(e).await
    }

    /// Appends the terminal event `e`, the session record updated first: a client that has
    /// seen the stream end reads the session ended too.
    pub(super) async fn end(&mut self, e: RunEvent) -> Result<(), Stop> {
        let outcome = if e.kind == Kind::SessionCompleted {
            "completed"
        } else {
            "failed"
        };
        crate::metrics::get()
            .research_runs
            .with_label_values(&[outcome])
            .inc();
        let mut after = self.state.clone();
        after.apply(self.state.seq + 1, &e);
        let reported = self.report_state(&after).await;
        self.append(vec![e]).await?;
        if reported {
            return Ok(());
        }
        // The record must show the end: otherwise keep the run's lease record, so a driver
        // started again (here or at another hub) writes it.
        self.settle().await
    }

    /// Makes the session record show the ended run (a few tries), or stops with the store's
    /// error so the run is taken up again.
    async fn settle(&self) -> Result<(), Stop> {
        for attempt in 0..3u32 {
            if self.report_state(&self.state).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        Err(Stop::Store(
            "the session record could not be updated".to_owned(),
        ))
    }

    /// Copies status, stage, progress and tokens into the session record (best effort: the
    /// log is the truth, the record what listings show).
    pub(super) async fn report(&self) {
        self.report_state(&self.state).await;
    }

    /// Writes what the session record shows (see [`Driver::report`]); false when the store
    /// refused.
    async fn report_state(&self, s: &RunState) -> bool {
        let status = match s.ended {
            Some(Kind::SessionCompleted) => "completed",
            Some(_) => "failed",
            None => "running",
        };
        let done = s.ended.map(|_| now_ms());
        let result = self
            .r
            .modify(&self.id, |rec| {
                if rec.status != "archived" {
                    rec.status = status.to_owned();
                }
                rec.current_stage = s.stage().to_owned();
                rec.progress = s.progress();
                rec.total_tokens = s.total_tokens;
                if done.is_some() {
                    rec.completed_at_ms = done;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(session = %self.id, error = %e, "research session not updated");
                false
            }
        }
    }

    /// The execution groups of the recorded plan, as task ids.
    fn groups(&self) -> Vec<Vec<String>> {
        let mut groups: Vec<Vec<String>> = Vec::new();
        for t in self.state.plan.iter().flatten() {
            if groups.len() <= t.execution_group {
                groups.resize(t.execution_group + 1, Vec::new());
            }
            groups[t.execution_group].push(t.id.clone());
        }
        groups
    }

    pub(super) async fn agent(&self, agent_type: &str) -> Result<Option<Agent>, Stop> {
        self.r
            .inner
            .roster
            .agent(self.owner.owner(), agent_type)
            .await
            .map_err(|e| Stop::Store(e.to_string()))
    }

    /// Submits one step's task of `tool` (again after a restart: the key finds the same
    /// task) and returns it, retrying while the store is away.
    async fn submit_tool(
        &self,
        key: &str,
        tool: &str,
        args: Value,
        description: String,
        priority: i32,
    ) -> Result<Result<Task, String>, Stop> {
        let spec = self.spec(key, tool, args, description, priority);
        Ok(self
            .submit_specs(vec![spec])
            .await?
            .and_then(|mut v| v.pop().ok_or_else(|| "no task was made".to_owned())))
    }

    /// The task of step `key`: idempotency key `research:<session>:<key>`, the
    /// `[research]` budget.
    fn spec(
        &self,
        key: &str,
        tool: &str,
        args: Value,
        description: String,
        priority: i32,
    ) -> TaskSpec {
        let cfg = &self.r.inner.config;
        TaskSpec {
            tool: tool.to_owned(),
            args,
            description: Some(description),
            priority,
            timeout_seconds: cfg.task_timeout_seconds,
            max_attempts: cfg.max_attempts,
            idempotency_key: Some(format!("research:{}:{key}", self.id)),
            pinned_node: None,
            capability: None,
            owner: None,
        }
    }

    /// Submits steps in one durable write (again after a restart: their keys find the tasks
    /// that exist), retrying while the store is away. `Ok(Err(reason))`: refused.
    async fn submit_specs(&self, specs: Vec<TaskSpec>) -> Result<Result<Vec<Task>, String>, Stop> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.r.inner.tasks.submit(&self.owner, specs.clone()).await {
                Ok(v) => return Ok(Ok(v.into_iter().map(|(t, _)| t).collect())),
                Err(crate::tasks::Error::StoreUnavailable(_)) if !self.stopping() => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(crate::tasks::Error::ShuttingDown) => return Err(Stop::Yield),
                Err(e) if self.stopping() => return Err(Stop::Store(e.to_string())),
                Err(e) => return Ok(Err(e.to_string())),
            }
        }
    }

    /// Runs one step to its end (for the plan and the synthesis, which have no progress
    /// events).
    pub(super) async fn step(
        &self,
        key: &str,
        agent: &Agent,
        task: String,
        inputs: Vec<Value>,
        schema: Option<Value>,
    ) -> Result<Result<Task, String>, Stop> {
        let args = run_args(agent, &task, inputs, schema);
        self.run_tool(key, AGENT_TOOL, args).await
    }

    /// Runs `tool` with `args` as the step `key` to its end.
    pub(super) async fn run_tool(
        &self,
        key: &str,
        tool: &str,
        args: Value,
    ) -> Result<Result<Task, String>, Stop> {
        let description = format!("research {}: {key}", self.id);
        let t = match self.submit_tool(key, tool, args, description, 5).await? {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(watch(
            self.r.clone(),
            self.owner.clone(),
            key.to_owned(),
            t.id.clone(),
            None,
            tx,
        ));
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = self.stopped() => {
                    self.cancel_if_deleted(std::slice::from_ref(&t.id)).await;
                    return Err(Stop::Yield);
                }
            };
            match msg {
                Some(Msg::Done { task, .. }) => return Ok(Ok(*task)),
                Some(Msg::Gone { error, .. }) => return Ok(Err(error)),
                Some(Msg::Progress { .. }) => {}
                None => return Err(Stop::Yield),
            }
        }
    }

    /// Resolves when the driver must stop (shutdown, or the lease lost).
    async fn stopped(&self) {
        let mut shutdown = self.r.inner.shutdown.clone();
        loop {
            if self.stopping() {
                return;
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The plan step: the coordinator's structured answer becomes the graph and
    /// `decomposition_complete`. `Ok(Err(message))` when the run cannot go on.
    async fn plan(&mut self) -> Result<Result<(), String>, Stop> {
        let Some(coordinator) = self.agent("meta_coordinator").await? else {
            return Ok(Err("no meta_coordinator agent is available".to_owned()));
        };
        let assignable = self.r.inner.roster.assignable();
        let max = self.r.inner.config.max_plan_tasks;
        let prompt = format!(
            "Decompose this research task into at most {max} research tasks for a team of \
             agents. Give each task a description, the agent type best suited to it (one of: \
             {}), a priority (high, medium or low), and its dependencies: the positions (from \
             0) of earlier tasks whose results it needs.\n\nResearch task: {}",
            assignable.join(", "),
            self.task
        );
        let started = now_ms();
        let t = match self
            .step(
                "plan",
                &coordinator,
                prompt,
                Vec::new(),
                Some(plan_schema(&assignable, max)),
            )
            .await?
        {
            Ok(t) => t,
            Err(e) => return Ok(Err(format!("the plan could not be made: {e}"))),
        };
        if t.status != TaskStatus::Succeeded {
            return Ok(Err(format!(
                "the plan could not be made: {}",
                task_error(&t)
            )));
        }
        let result = t.result.clone().unwrap_or(Value::Null);
        let Some(plan) = parse_plan(&result, &assignable, max) else {
            return Ok(Err(
                "the coordinator's plan is not a JSON object with a `tasks` array".to_owned(),
            ));
        };
        let planned: Vec<PlannedTask> = plan
            .iter()
            .enumerate()
            .map(|(i, p)| PlannedTask {
                id: i.to_string(),
                dependencies: p.3.clone(),
            })
            .collect();
        let graph = match Graph::build(&planned) {
            Ok(g) => g,
            Err(e) => return Ok(Err(format!("the plan cannot run: {e}"))),
        };
        // Deterministic: two drivers of one run (a lease taken over while its holder still ran)
        // name the same tasks, so their idempotency keys collapse onto one task each.
        let ids: Vec<String> = (0..graph.len())
            .map(|i| format!("{}-t{i}", self.id))
            .collect();
        let tasks: Vec<PlanTask> = plan
            .into_iter()
            .enumerate()
            .map(|(i, (description, agent, priority, _))| PlanTask {
                id: ids[i].clone(),
                description,
                assigned_agent: agent,
                priority,
                dependencies: graph.deps[i].iter().map(|&j| ids[j].clone()).collect(),
                execution_order: i,
                execution_group: graph.group_of[i],
            })
            .collect();
        let mut message = format!(
            "Decomposed into {} tasks in {} groups",
            tasks.len(),
            graph.groups.len()
        );
        if !graph.repairs.is_empty() {
            message.push_str(&format!(" (plan repaired: {})", graph.repairs.join("; ")));
        }
        let mut x = step_details(&t, &result);
        x["started_at_ms"] = json!(started);
        x["agent_name"] = json!(coordinator.name);
        x["agent_profile_id"] = json!(coordinator.profile_id);
        let e = RunEvent {
            kind: Kind::DecompositionComplete,
            data: json!({"tasks": tasks, "message": message}),
            at_ms: now_ms(),
            x,
        };
        self.append(vec![e]).await?;
        self.report().await;
        Ok(Ok(()))
    }

    /// Runs group `g`: starts what has not started, keeps at most
    /// `research.max_parallel_steps` of its steps submitted and not ended (a step's deadline
    /// counts from its submission, so a wide group must not queue all at once), waits for
    /// every one, then `group_completed` with its digest.
    async fn group(&mut self, g: usize, members: &[String]) -> Result<(), Stop> {
        if !self.state.groups_started.contains(&g) {
            let e = RunEvent::new(
                Kind::GroupStarted,
                json!({"group": g, "tasks": members.len()}),
                now_ms(),
            );
            self.append(vec![e]).await?;
        }
        let plan: Vec<PlanTask> = members
            .iter()
            .filter_map(|id| self.state.planned(id).cloned())
            .collect();
        // Agents of the group, resolved once per type.
        let mut agents: std::collections::HashMap<String, Option<Agent>> = Default::default();
        for t in &plan {
            if !agents.contains_key(&t.assigned_agent) {
                let a = self.agent(&t.assigned_agent).await?;
                agents.insert(t.assigned_agent.clone(), a);
            }
        }
        // Steps that run now (started before a restart or not), in plan order.
        let mut queue: std::collections::VecDeque<(PlanTask, Agent)> = Default::default();
        let mut failed_now = Vec::new();
        for t in plan {
            let st = self
                .state
                .state
                .get(&t.id)
                .copied()
                .unwrap_or(TaskState::Pending);
            if matches!(st, TaskState::Completed | TaskState::Failed) {
                continue;
            }
            match agents.get(&t.assigned_agent).cloned().flatten() {
                Some(agent) => queue.push_back((t, agent)),
                None => failed_now.push(t),
            }
        }
        if !failed_now.is_empty() {
            // Started, then failed: every step of the plan has an execution to show.
            let starts: Vec<RunEvent> = failed_now
                .iter()
                .filter(|t| self.state.state.get(&t.id) == Some(&TaskState::Pending))
                .map(|t| self.started_event(t, None, 0))
                .collect();
            self.append(starts).await?;
            let evs: Vec<RunEvent> = failed_now
                .iter()
                .map(|t| {
                    self.failed_event(
                        &t.id,
                        format!("no agent of type `{}`", t.assigned_agent),
                        Value::Null,
                    )
                })
                .collect();
            self.append_ended(evs).await?;
        }
        let window = self.r.inner.config.max_parallel_steps;
        let with_progress = queue.len().min(window) <= MAX_PROGRESS_STREAMS;
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let mut open: HashSet<String> = HashSet::new();
        let mut in_flight: Vec<String> = Vec::new();
        // When each open step became ready (for the overhead metric): when its group started
        // or a slot freed for it.
        let mut dispatch: std::collections::HashMap<String, Duration> = Default::default();
        loop {
            // Fill the window.
            let room = window.saturating_sub(open.len());
            if room > 0 && !queue.is_empty() {
                if self.stopping() {
                    return Err(Stop::Yield);
                }
                let ready = std::time::Instant::now();
                let chunk: Vec<(PlanTask, Agent)> = (0..room.min(SUBMIT_BATCH))
                    .filter_map(|_| queue.pop_front())
                    .collect();
                let mut starts = Vec::new();
                let mut specs = Vec::with_capacity(chunk.len());
                for (t, agent) in &chunk {
                    let inputs = self.inputs(t);
                    if self.state.state.get(&t.id) == Some(&TaskState::Pending) {
                        starts.push(self.started_event(t, Some(agent), inputs.len()));
                    }
                    let args = run_args(agent, &t.description, inputs, None);
                    specs.push(self.spec(
                        &t.id,
                        AGENT_TOOL,
                        args,
                        format!("research {}: task {}", self.id, t.id),
                        priority_of(&t.priority),
                    ));
                }
                self.append(starts).await?;
                match self.submit_specs(specs).await? {
                    Ok(tasks) => {
                        let took = ready.elapsed();
                        for ((t, _), task) in chunk.into_iter().zip(tasks) {
                            let key = t.id;
                            let after = with_progress
                                .then(|| self.state.progress_seen.get(&key).copied().unwrap_or(0));
                            dispatch.insert(key.clone(), took);
                            open.insert(key.clone());
                            in_flight.push(task.id.clone());
                            tokio::spawn(watch(
                                self.r.clone(),
                                self.owner.clone(),
                                key,
                                task.id,
                                after,
                                tx.clone(),
                            ));
                        }
                    }
                    Err(e) => {
                        let evs: Vec<RunEvent> = chunk
                            .iter()
                            .map(|(t, _)| self.failed_event(&t.id, e.clone(), Value::Null))
                            .collect();
                        self.append_ended(evs).await?;
                    }
                }
                continue;
            }
            if open.is_empty() {
                break;
            }
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = self.stopped() => {
                    self.cancel_if_deleted(&in_flight).await;
                    return Err(Stop::Yield);
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= 512 {
                    break;
                }
            }
            let mut events = Vec::with_capacity(batch.len());
            let mut ended = 0usize;
            // When each step's task ended (for the overhead metric).
            let mut finished: Vec<(String, std::time::SystemTime)> = Vec::new();
            for m in batch {
                match m {
                    Msg::Progress {
                        key,
                        seq,
                        progress,
                        message,
                    } => {
                        if open.contains(&key) {
                            events.push(RunEvent {
                                kind: Kind::TaskProgress,
                                data: json!({"task_id": key, "message": message, "progress": progress}),
                                at_ms: now_ms(),
                                x: json!({"task_seq": seq}),
                            });
                        }
                    }
                    Msg::Done { key, task } => {
                        if open.remove(&key) {
                            ended += 1;
                            events.push(self.ended_event(&key, &task, ended));
                            if let Some(at) = task.finished_at {
                                finished.push((key, at));
                            }
                        }
                    }
                    Msg::Gone { key, error } => {
                        if open.remove(&key) {
                            ended += 1;
                            events.push(self.failed_event_n(&key, error, Value::Null, ended));
                        }
                    }
                }
            }
            self.append(events).await?;
            let now = std::time::SystemTime::now();
            let metric = &crate::metrics::get().research_step_overhead;
            for (key, at) in finished {
                if let Some(d) = dispatch.remove(&key) {
                    let recorded = now.duration_since(at).unwrap_or_default();
                    metric.observe((d + recorded).as_secs_f64());
                }
            }
        }
        drop(tx);
        let e = RunEvent {
            kind: Kind::GroupCompleted,
            data: json!({"group": g}),
            at_ms: now_ms(),
            x: json!({"digest": digest(g, &self.state)}),
        };
        self.append(vec![e]).await
    }

    /// `task_started` of planned task `t` done by `agent` (`None`: there is none) with
    /// `inputs` of its dependencies' outputs.
    fn started_event(&self, t: &PlanTask, agent: Option<&Agent>, inputs: usize) -> RunEvent {
        RunEvent {
            kind: Kind::TaskStarted,
            data: json!({"task_id": t.id, "agent_type": t.assigned_agent, "description": t.description}),
            at_ms: now_ms(),
            x: json!({
                "agent_profile_id": agent.and_then(|a| a.profile_id.clone()),
                "agent_name": agent.map_or(t.assigned_agent.as_str(), |a| a.name.as_str()),
                "model": agent.map(|a| a.model.clone()),
                "input_context": {"dependencies": t.dependencies, "inputs": inputs},
            }),
        }
    }

    /// When the session was deleted under the run, cancels its steps in flight (no node keeps
    /// working for it).
    async fn cancel_if_deleted(&self, tasks: &[String]) {
        if !matches!(self.r.read(&self.id).await, Ok(None)) {
            return;
        }
        for t in tasks {
            let _ = self.r.inner.tasks.cancel(&self.owner, t).await;
        }
    }

    /// Appends end events built before the fold knew of each other (their `progress` is
    /// recomputed in order).
    async fn append_ended(&mut self, mut events: Vec<RunEvent>) -> Result<(), Stop> {
        for (i, e) in events.iter_mut().enumerate() {
            e.data["progress"] = json!(self.progress_after(i + 1));
        }
        self.append(events).await
    }

    /// The run's percent once `more` tasks beyond those recorded have ended.
    fn progress_after(&self, more: usize) -> u32 {
        let total = self.state.plan.as_ref().map_or(0, Vec::len);
        if total == 0 {
            return 0;
        }
        ((self.state.ended_tasks() + more).min(total) * 100 / total) as u32
    }

    fn failed_event(&self, key: &str, error: String, x: Value) -> RunEvent {
        self.failed_event_n(key, error, x, 1)
    }

    fn failed_event_n(&self, key: &str, error: String, x: Value, nth: usize) -> RunEvent {
        RunEvent {
            kind: Kind::TaskFailed,
            data: json!({"task_id": key, "error": error, "progress": self.progress_after(nth)}),
            at_ms: now_ms(),
            x,
        }
    }

    /// `task_completed` or `task_failed` for a finished apex task, the `nth` to end in this
    /// batch.
    fn ended_event(&self, key: &str, t: &Task, nth: usize) -> RunEvent {
        let result = t.result.clone().unwrap_or(Value::Null);
        let x = step_details(t, &result);
        if t.status != TaskStatus::Succeeded {
            return self.failed_event_n(key, task_error(t), x, nth);
        }
        let agent = self
            .state
            .planned(key)
            .map(|p| p.assigned_agent.clone())
            .unwrap_or_default();
        RunEvent {
            kind: Kind::TaskCompleted,
            data: json!({
                "task_id": key,
                "agent_type": agent,
                "result": result_text(&result),
                "progress": self.progress_after(nth),
            }),
            at_ms: now_ms(),
            x,
        }
    }

    /// The outputs of `t`'s dependencies, as `agent.run` inputs (each cut to
    /// `max_input_chars`).
    fn inputs(&self, t: &PlanTask) -> Vec<Value> {
        let max = self.r.inner.config.max_input_chars;
        t.dependencies
            .iter()
            .filter_map(|d| {
                let dep = self.state.planned(d)?;
                let out = self.state.output(d)?;
                Some(json!({
                    "task_id": d,
                    "agent_type": dep.assigned_agent,
                    "description": dep.description,
                    "output": cut(out, max),
                }))
            })
            // `agent.run` takes at most 64 inputs.
            .take(MAX_INPUTS)
            .collect()
    }

    /// The synthesis step: the synthesizer over every completed task's output.
    async fn synthesize(&mut self) -> Result<Result<(), String>, Stop> {
        if !self.state.synthesis_started {
            let e = RunEvent::new(
                Kind::SynthesisStarted,
                json!({"message": "Synthesizing the findings"}),
                now_ms(),
            );
            self.append(vec![e]).await?;
        }
        let Some(agent) = self.agent("synthesizer").await? else {
            return Ok(Err("no synthesizer agent is available".to_owned()));
        };
        let max = self.r.inner.config.max_input_chars;
        // The whole prompt stays bounded: at most 50 inputs, each cut.
        let inputs: Vec<Value> = self
            .state
            .plan
            .iter()
            .flatten()
            .filter_map(|p| {
                self.state.output(&p.id).map(|o| {
                    json!({"task_id": p.id, "agent_type": p.assigned_agent,
                           "description": p.description, "output": cut(o, max)})
                })
            })
            .take(50)
            .collect();
        let task = format!(
            "Synthesize the research team's findings into one report on: {}",
            self.task
        );
        let t = match self.step("synthesis", &agent, task, inputs, None).await? {
            Ok(t) => t,
            Err(e) => return Ok(Err(format!("the synthesis failed: {e}"))),
        };
        if t.status != TaskStatus::Succeeded {
            return Ok(Err(format!("the synthesis failed: {}", task_error(&t))));
        }
        let result = t.result.clone().unwrap_or(Value::Null);
        let structured = &result["structured"];
        let mut x = step_details(&t, &result);
        x["key_findings"] = structured
            .get("key_findings")
            .cloned()
            .unwrap_or_else(|| json!([]));
        x["open_questions"] = structured
            .get("uncertainties")
            .cloned()
            .unwrap_or_else(|| json!([]));
        x["agent_name"] = json!(agent.name);
        let e = RunEvent {
            kind: Kind::SynthesisComplete,
            data: json!({"synthesis": result_text(&result)}),
            at_ms: now_ms(),
            x,
        };
        self.append(vec![e]).await?;
        Ok(Ok(()))
    }
}

/// Follows one agent step's apex task: progress events after `progress_after` (none when
/// `None`), then its end.
async fn watch(
    r: Research,
    owner: Principal,
    key: String,
    task_id: String,
    progress_after: Option<u32>,
    tx: mpsc::Sender<Msg>,
) {
    if let Some(after) = progress_after
        && let Ok(Some(mut events)) = r.inner.tasks.events(&owner, &task_id, after).await
    {
        loop {
            let e = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
            let Some(e) = e else { break };
            if e.kind == EventKind::TaskProgress {
                let m = Msg::Progress {
                    key: key.clone(),
                    seq: e.seq,
                    progress: e.progress.unwrap_or(0.0),
                    message: e.message.clone().unwrap_or_default(),
                };
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            if e.status.is_terminal() {
                break;
            }
        }
    }
    let mut shutdown = r.inner.shutdown.clone();
    loop {
        let got = tokio::select! {
            g = r.inner.tasks.get(&owner, &task_id, MAX_WAIT) => g,
            _ = tx.closed() => return,
        };
        match got {
            Ok(Some(t)) if t.status.is_terminal() => {
                let _ = tx
                    .send(Msg::Done {
                        key,
                        task: Box::new(t),
                    })
                    .await;
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = tx
                    .send(Msg::Gone {
                        key,
                        error: format!("the agent task {task_id} is gone"),
                    })
                    .await;
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
        if *shutdown.borrow_and_update() || tx.is_closed() {
            return;
        }
    }
}

/// The `agent.run` arguments of `agent` doing `task` with `inputs`.
fn run_args(agent: &Agent, task: &str, inputs: Vec<Value>, schema: Option<Value>) -> Value {
    let mut args = agent.args.clone();
    args.insert("task".to_owned(), json!(task));
    if !inputs.is_empty() {
        args.insert("inputs".to_owned(), Value::Array(inputs));
    }
    if let Some(s) = schema {
        args.insert("response_format".to_owned(), s);
    }
    Value::Object(args)
}

/// The JSON Schema of the coordinator's plan: positions for dependencies (models keep them
/// straight more easily than invented ids), agent types from the roster.
pub fn plan_schema(assignable: &[String], max: usize) -> Value {
    json!({
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "maxItems": max,
                "items": {
                    "type": "object",
                    "properties": {
                        "description": {"type": "string"},
                        "assigned_agent": {"type": "string", "enum": assignable},
                        "priority": {"type": "string", "enum": ["high", "medium", "low"]},
                        "dependencies": {"type": "array", "items": {"type": "integer", "minimum": 0}}
                    },
                    "required": ["description", "assigned_agent", "priority", "dependencies"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["tasks"],
        "additionalProperties": false
    })
}

/// One task as the coordinator planned it: `(description, agent type, priority,
/// dependencies)`.
type Planned = (String, String, String, Vec<String>);

/// `(description, agent type, priority, dependencies)` of each planned task, from the
/// `agent.run` result (`structured`, else `result` parsed as JSON). Unknown agent types become
/// the first assignable one; a plan longer than `max` is cut.
fn parse_plan(result: &Value, assignable: &[String], max: usize) -> Option<Vec<Planned>> {
    let parsed;
    let plan = match result.get("structured").filter(|s| s.is_object()) {
        Some(s) => s,
        None => {
            let text = result.get("result").and_then(Value::as_str)?;
            parsed = serde_json::from_str::<Value>(extract_json(text)).ok()?;
            &parsed
        }
    };
    let tasks = plan.get("tasks")?.as_array()?;
    let fallback = assignable
        .first()
        .cloned()
        .unwrap_or_else(|| "explorer".to_owned());
    Some(
        tasks
            .iter()
            .take(max)
            .map(|t| {
                let description = t
                    .get("description")
                    .and_then(Value::as_str)
                    .filter(|d| !d.trim().is_empty())
                    .unwrap_or("(no description)")
                    .to_owned();
                let agent = t
                    .get("assigned_agent")
                    .and_then(Value::as_str)
                    .filter(|a| assignable.iter().any(|x| x == a))
                    .map_or_else(|| fallback.clone(), str::to_owned);
                let priority = t
                    .get("priority")
                    .and_then(Value::as_str)
                    .filter(|p| ["high", "medium", "low"].contains(p))
                    .unwrap_or("medium")
                    .to_owned();
                let deps = t
                    .get("dependencies")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| match d {
                                Value::Number(n) => Some(n.to_string()),
                                Value::String(s) => Some(s.clone()),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (description, agent, priority, deps)
            })
            .collect(),
    )
}

/// The JSON inside a Markdown code fence, or the text as is.
fn extract_json(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let body = rest.split_once('\n').map_or(rest, |(_, b)| b);
        return body.rsplit_once("```").map_or(body, |(b, _)| b).trim();
    }
    t
}

/// What the views need of a finished step.
pub(super) fn step_details(t: &Task, result: &Value) -> Value {
    json!({
        "apex_task_id": t.id,
        "structured": result.get("structured").cloned().unwrap_or(Value::Null),
        "tokens_used": result.get("tokens_used").and_then(Value::as_u64).unwrap_or(0),
        "duration_ms": result.get("duration_ms").cloned().unwrap_or(Value::Null),
        "model_used": result.get("model_used").cloned().unwrap_or(Value::Null),
        "confidence": result.get("confidence").cloned().unwrap_or(Value::Null),
        "retry_count": t.attempt.saturating_sub(1),
        "node_id": t.node_id,
    })
}

/// The text of an `agent.run` result.
pub(super) fn result_text(result: &Value) -> String {
    match result.get("result") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

pub(super) fn task_error(t: &Task) -> String {
    match &t.error {
        Some(e) => format!("{} ({})", e.message, e.code),
        None => format!("the agent task ended {}", t.status.as_str()),
    }
}

fn priority_of(p: &str) -> i32 {
    match p {
        "high" => 2,
        "low" => 0,
        _ => 1,
    }
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn types() -> Vec<String> {
        vec!["explorer".to_owned(), "critic".to_owned()]
    }

    #[test]
    fn a_plan_is_read_from_structured_output_or_fenced_json() {
        let structured = json!({"structured": {"tasks": [
            {"description": "find", "assigned_agent": "explorer", "priority": "high", "dependencies": []},
            {"description": "judge", "assigned_agent": "nobody", "priority": "urgent", "dependencies": [0, "x"]},
        ]}});
        let p = parse_plan(&structured, &types(), 10).unwrap();
        assert_eq!(
            p[0],
            ("find".into(), "explorer".into(), "high".into(), vec![])
        );
        assert_eq!(
            p[1],
            (
                "judge".into(),
                "explorer".into(),
                "medium".into(),
                vec!["0".into(), "x".into()]
            )
        );
        let fenced = json!({"result": "```json\n{\"tasks\": [{\"description\": \"a\"}]}\n```", "structured": null});
        assert_eq!(parse_plan(&fenced, &types(), 10).unwrap().len(), 1);
        assert!(parse_plan(&json!({"result": "no plan here"}), &types(), 10).is_none());
        let long = json!({"structured": {"tasks": vec![json!({"description": "x"}); 30]}});
        assert_eq!(parse_plan(&long, &types(), 12).unwrap().len(), 12);
    }

    #[test]
    fn the_plan_schema_names_the_roster() {
        let s = plan_schema(&types(), 5);
        assert_eq!(s["properties"]["tasks"]["maxItems"], 5);
        assert_eq!(
            s["properties"]["tasks"]["items"]["properties"]["assigned_agent"]["enum"],
            json!(["explorer", "critic"])
        );
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hi", 5), "hi");
    }
}
