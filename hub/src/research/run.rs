//! The driver of a research run: plan, groups, synthesis, each agent step an `agent.run` task
//! through the task service (what it sends and reads back: `steps.rs`).
//!
//! The driver appends an event before acting on it and folds the log when it starts, so it
//! can stop anywhere (hub killed, lease lost, shutdown) and be started again by any hub:
//! - the plan step and the synthesis are tasks with the idempotency keys
//!   `research:<session>:plan` and `research:<session>:synthesis`, each research task
//!   `research:<session>:<task id>`: a restarted driver submitting them again gets the task
//!   that exists (finished or in flight) and runs nothing twice;
//! - `task_progress` events record the apex task's event number they came from, so a resumed
//!   driver reports only newer progress;
//! - every event is appended only while the run's lease (`lease.rs`) is held.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::graph::{Graph, PlannedTask};
use super::lease::{LEASE_MS, Lease, LeaseRecord};
use super::log::{Kind, PlanTask, RunEvent, RunState, TaskState, digest};
use super::steps::{
    cut, parse_plan, plan_schema, priority_of, result_text, run_args, step_details, task_error,
    watch,
};
use super::{Agent, EVENTS, Error, RUN, Research, now_ms};
use crate::model::{Task, TaskSpec, TaskStatus};
use crate::principal::Principal;

/// The node tool of every agent step.
pub const AGENT_TOOL: &str = "agent.run";
/// Groups wider than this report no `task_progress` (one event stream per task would cost
/// more than it tells); their tasks still report start and end.
pub const MAX_PROGRESS_STREAMS: usize = 256;
/// Most inputs of one step (`agent.run`'s limit).
pub const MAX_INPUTS: usize = 64;
/// Most steps submitted in one write.
pub const SUBMIT_BATCH: usize = 500;

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
pub(super) enum Msg {
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
