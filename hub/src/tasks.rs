//! The task service: the one front door for creating and watching tasks, and the only code
//! that knows whether this hub runs alone (`Local`: the engine over its store) or shares Redis
//! with other hubs (`Shared`).
//!
//! HTTP handlers, and later quotas, agent runs and task graphs, call [`TaskService`]; none of
//! them branches on the mode. What the service guarantees in both modes:
//! - **accepted means durable**: [`TaskService::submit`] returns only once every task is in
//!   the store (on disk, or in Redis); while the store fails it accepts nothing
//!   ([`Error::StoreUnavailable`]);
//! - **what is read is durable** (the read barrier): a task, a page or an event handed out has
//!   been confirmed by the store, so it survives a crash of the hub right after. Locally the
//!   barrier waits only for the durability ticket of the task's own last write (at most one
//!   group commit, usually none); in shared mode every read comes from Redis;
//! - `get` with a wait, `cancel` and the event stream work for a task held by any hub.
//!
//! Where a task is cancelled: [`TaskService::cancel`] → the engine holding it
//! (`Cluster::cancel`), or, in shared mode, the shared store for a queued task no hub holds,
//! or the holding hub over `apex:shared:cancel`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, watch};

use crate::durable::DURABLE_WAIT;
use crate::engine::{CancelError, Cluster, SubmitError};
use crate::model::{Task, TaskEvent, TaskSpec};
use crate::principal::Principal;
use crate::shared::{SharedRedis, SubmittedTask};
use crate::store::{Order, Page, TaskFilter};

/// Why the service refused or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The submission is not acceptable (forbidden tool, unknown pinned node, node lacks the
    /// tool): a client error.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// No such task.
    #[error("task `{0}` not found")]
    NotFound(String),
    /// The task already ended (cancel).
    #[error("task is already {0}")]
    Terminal(&'static str),
    /// The hub holding the task did not confirm the cancel in time (shared mode).
    #[error("task {0} is held by another hub, which did not confirm the cancel within 10 s")]
    CancelUnconfirmed(String),
    /// The store cannot confirm the write or answer the read; nothing was accepted.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The hub is shutting down (its stop signal flipped, `shutdown_delay_ms` after SIGTERM):
    /// the submission was not accepted; another hub (or this one restarted) takes it.
    #[error("the hub is shutting down; the task was not accepted, retry at another hub")]
    ShuttingDown,
    /// The tool is a plugin switched off with `POST /api/v1/plugins/{name}/disable`.
    #[error("plugin `{0}` is disabled: enable it with POST /api/v1/plugins/{0}/enable")]
    PluginDisabled(String),
}

/// What a plugin's callback did to its task ([`TaskService::complete_by_callback`]).
#[derive(Debug, Clone)]
pub enum Settled {
    /// The callback ended the task with its outcome.
    Completed(Task),
    /// The task had ended already (an earlier callback, a timeout, a cancel): nothing
    /// changed.
    AlreadyFinished(Task),
}

/// What `GET /readyz` needs of the store (see [`TaskService::probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreProbe {
    /// Whether a submission would be accepted rather than answered 503 `store_unavailable`.
    pub available: bool,
    /// Shared mode: whether this hub's lease in Redis still holds its epoch (`false` too when
    /// Redis did not answer). `None` in single mode.
    pub lease_held: Option<bool>,
}

/// How long a long poll (`wait`) may wait at most.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Shared mode: how often a reader following a task another hub holds reads its record when
/// no wake-up came (pub/sub messages are lost while the subscription reconnects).
const SHARED_SAFETY_POLL: Duration = Duration::from_secs(1);

/// Shared mode: how long a cancel of a task another hub holds waits for that hub.
const SHARED_CANCEL_WAIT: Duration = Duration::from_secs(10);

/// How long [`TaskService::store_available`] waits for Redis, so `/health` never hangs on a
/// Redis that is down.
pub const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A task's events, oldest first, ending after the terminal one (or when the hub shuts down).
pub type EventStream = mpsc::Receiver<TaskEvent>;

#[derive(Clone)]
enum Mode {
    /// The engine is the authority; its store mirrors it.
    Local,
    /// Several hubs on one Redis: submissions go to the shared store, reads fall back to it.
    Shared(Arc<SharedRedis>),
}

/// Handle on the task service; clone freely.
#[derive(Clone)]
pub struct TaskService {
    cluster: Cluster,
    mode: Mode,
    /// Whether `internal_request_file` may be submitted (shared submissions bypass the
    /// engine's own check).
    allow_internal_request_file: bool,
    shutdown: watch::Receiver<bool>,
    /// Plugin switches: tasks of a disabled plugin's tool are refused.
    plugins: Option<crate::plugins::Plugins>,
}

impl TaskService {
    /// A service over this hub's engine alone.
    pub fn local(cluster: Cluster, shutdown: watch::Receiver<bool>) -> Self {
        let allow = cluster.options().allow_internal_request_file;
        Self {
            cluster,
            mode: Mode::Local,
            allow_internal_request_file: allow,
            shutdown,
            plugins: None,
        }
    }

    /// The same service, refusing tasks of plugins `plugins` has switched off.
    pub fn with_plugins(self, plugins: crate::plugins::Plugins) -> Self {
        Self {
            plugins: Some(plugins),
            ..self
        }
    }

    /// Every node of the cluster as its `GET /v1/nodes` JSON object (shared mode: the nodes
    /// of every hub, each with its `hub`), by id.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the shared store cannot be read.
    pub async fn node_views(&self) -> Result<Vec<serde_json::Value>, Error> {
        match &self.mode {
            Mode::Local => Ok(self
                .cluster
                .nodes()
                .iter()
                .filter_map(|n| serde_json::to_value(n).ok())
                .collect()),
            Mode::Shared(redis) => crate::shared::all_node_views(redis, &self.cluster)
                .await
                .map_err(unavailable),
        }
    }

    /// Ends task `id` with the `outcome` its asynchronous plugin posted to
    /// `/plugin-callback` (already authenticated by the callback's token). The node still
    /// waiting on it is told to stop (`task_cancel`). Idempotent: a task that has ended is
    /// left as it is ([`Settled::AlreadyFinished`]).
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::CancelUnconfirmed`] if the hub holding it did not answer
    /// in time; [`Error::StoreUnavailable`].
    pub async fn complete_by_callback(
        &self,
        id: &str,
        outcome: crate::model::Outcome,
    ) -> Result<Settled, Error> {
        match self.cluster.complete_by_callback(id, outcome.clone()) {
            Ok(t) => {
                if let Some(ticket) = self.cluster.ticket_of(id) {
                    self.barrier(ticket).await;
                }
                Ok(Settled::Completed(t))
            }
            Err(CancelError::Terminal(_)) => match self.cluster.get(id) {
                Some(t) => Ok(Settled::AlreadyFinished(t)),
                None => Err(Error::NotFound(id.to_owned())),
            },
            Err(CancelError::NotFound) => match &self.mode {
                Mode::Local => Err(Error::NotFound(id.to_owned())),
                Mode::Shared(redis) => end_shared(redis, id, Some(outcome)).await,
            },
        }
    }

    /// Whether this hub is alone on its store (the data-dir lock or Redis's single-owner
    /// key): no other hub can be acting on the store's records, so work another process left
    /// behind (a run's lease) may be taken over at once.
    pub fn exclusive(&self) -> bool {
        matches!(self.mode, Mode::Local)
    }

    /// A service for a hub in shared mode over `redis`.
    pub fn shared(
        cluster: Cluster,
        redis: Arc<SharedRedis>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            mode: Mode::Shared(redis),
            ..Self::local(cluster, shutdown)
        }
    }

    /// Whether the store takes writes now, i.e. whether a submission would be accepted rather
    /// than answered [`Error::StoreUnavailable`] (`/health`). Locally the writer's last
    /// outcome; in shared mode one Redis round trip, given at most [`STORE_PROBE_TIMEOUT`].
    pub async fn store_available(&self) -> bool {
        match &self.mode {
            Mode::Local => self.check_store().is_ok(),
            Mode::Shared(redis) => matches!(
                tokio::time::timeout(STORE_PROBE_TIMEOUT, redis.lease_alive()).await,
                Ok(Ok(_))
            ),
        }
    }

    /// The store's state for `/readyz`: [`TaskService::store_available`] and, in shared mode,
    /// whether the hub's lease is held, from one Redis round trip given at most
    /// [`STORE_PROBE_TIMEOUT`].
    pub async fn probe(&self) -> StoreProbe {
        match &self.mode {
            Mode::Local => StoreProbe {
                available: self.check_store().is_ok(),
                lease_held: None,
            },
            Mode::Shared(redis) => {
                match tokio::time::timeout(STORE_PROBE_TIMEOUT, redis.lease_alive()).await {
                    Ok(Ok(held)) => StoreProbe {
                        available: true,
                        lease_held: Some(held),
                    },
                    _ => StoreProbe {
                        available: false,
                        lease_held: Some(false),
                    },
                }
            }
        }
    }

    /// Whether submissions would be refused because the store is failing now.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] with the store's last failure.
    pub fn check_store(&self) -> Result<(), Error> {
        self.cluster
            .durability()
            .check()
            .map_err(|e| Error::StoreUnavailable(e.to_string()))
    }

    /// Accepts `specs` all or none for `caller` (recorded as each task's owner) and returns
    /// each task with whether it was created now (false: an existing task of the caller with
    /// the same idempotency key). Returns once the store has every task. A spec with
    /// `pinned_node` runs only on that node.
    ///
    /// # Errors
    /// [`Error::Submit`] for a refused spec (nothing accepted); [`Error::StoreUnavailable`]
    /// while the store fails or if it does not confirm the write within [`DURABLE_WAIT`]
    /// (treat the tasks as not accepted; an idempotency key makes the retry safe).
    pub async fn submit(
        &self,
        caller: &Principal,
        mut specs: Vec<TaskSpec>,
    ) -> Result<Vec<(Task, bool)>, Error> {
        // After SIGTERM's `shutdown_delay_ms` the hub refuses new work before it drains.
        if *self.shutdown.borrow() {
            return Err(Error::ShuttingDown);
        }
        if let Some(p) = &self.plugins
            && let Some(s) = specs.iter().find(|s| p.is_disabled(&s.tool))
        {
            return Err(Error::PluginDisabled(s.tool.clone()));
        }
        for s in &mut specs {
            s.owner = Some(caller.owner().to_owned());
        }
        match &self.mode {
            Mode::Local => {
                let durability = self.cluster.durability();
                self.check_store()?;
                let out = self.cluster.submit(specs)?;
                let ticket = durability.ticket();
                durability
                    .wait(ticket, DURABLE_WAIT)
                    .await
                    .map_err(|e| Error::StoreUnavailable(e.to_string()))?;
                Ok(out)
            }
            Mode::Shared(redis) => self.submit_shared(redis, specs).await,
        }
    }

    /// Shared mode: one script writes the whole batch to the shared store (queued there for
    /// any hub), all or none; the engine is not touched (a hub's claimer adopts them). A pinned
    /// node is not checked (it may be connected to another hub).
    async fn submit_shared(
        &self,
        redis: &SharedRedis,
        specs: Vec<TaskSpec>,
    ) -> Result<Vec<(Task, bool)>, Error> {
        if let Some(s) = specs
            .iter()
            .find(|s| s.tool == crate::engine::INTERNAL_REQUEST_FILE)
            && !self.allow_internal_request_file
        {
            return Err(SubmitError::ForbiddenTool(s.tool.clone()).into());
        }
        let now = SystemTime::now();
        let tasks: Vec<Task> = specs
            .into_iter()
            .map(|spec| Task::accept(uuid::Uuid::new_v4().to_string(), 0, spec, now))
            .collect();
        let results = redis.submit_batch(&tasks).await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(tasks.len());
        for (task, r) in tasks.into_iter().zip(results) {
            match r {
                SubmittedTask::New { .. } => {
                    crate::metrics::get().tasks_submitted.inc();
                    out.push((task, true));
                }
                SubmittedTask::Existing(t) => out.push((*t, false)),
            }
        }
        Ok(out)
    }

    /// Whether `caller` may see task `id` (admins see every task; others their own). An
    /// unknown task is not visible. Others' tasks are answered as unknown, so their existence
    /// does not leak.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the shared store cannot be read.
    async fn visible(&self, caller: &Principal, id: &str) -> Result<bool, Error> {
        if caller.is_admin() {
            return Ok(true);
        }
        if let Some(t) = self.cluster.get(id) {
            return Ok(caller.sees(t.spec.owner.as_deref()));
        }
        match &self.mode {
            Mode::Local => Ok(false),
            Mode::Shared(redis) => Ok(redis
                .get(id)
                .await
                .map_err(unavailable)?
                .is_some_and(|t| caller.sees(t.spec.owner.as_deref()))),
        }
    }

    /// The task `id` as it is now, after waiting up to `wait` (at most [`MAX_WAIT`]; zero: not
    /// at all) for it to end or for the hub to shut down. `None` for an unknown task and for
    /// a task `caller` may not see. The state returned is durable.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the shared store cannot be read.
    pub async fn get(
        &self,
        caller: &Principal,
        id: &str,
        wait: Duration,
    ) -> Result<Option<Task>, Error> {
        if !self.visible(caller, id).await? {
            return Ok(None);
        }
        let until = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut shutdown = self.shutdown.clone();
        // Shared mode: subscribed before the first read, so no change after it is missed.
        let mut wakes = match &self.mode {
            Mode::Shared(redis) => Some(redis.task_wakes()),
            Mode::Local => None,
        };
        loop {
            let waiting = tokio::time::Instant::now() < until && !*shutdown.borrow();
            // Held here (in shared mode perhaps adopted from the shared queue meanwhile, as a
            // task pinned to a node of this hub is): wait for the engine to end it.
            if waiting && let Some(rx) = self.cluster.wait(id) {
                // Answer early on shutdown, so a long poll never holds the hub's exit.
                tokio::select! {
                    _ = tokio::time::timeout_at(until, rx) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
            }
            if let Some((t, ticket)) = self.cluster.get_with_ticket(id) {
                let waiting = tokio::time::Instant::now() < until && !*shutdown.borrow();
                // Shared mode: adopted between the wait and this read, so not waited on yet.
                if t.status.is_terminal() || !waiting || wakes.is_none() {
                    self.barrier(ticket).await;
                    return Ok(Some(t));
                }
                continue;
            }
            let (Mode::Shared(redis), Some(wakes)) = (&self.mode, wakes.as_mut()) else {
                return Ok(None);
            };
            // A task this hub does not hold: read from the shared store, again at each change
            // another hub publishes (`Wake::Task`) and every second as a safety net.
            let t = redis.get(id).await.map_err(unavailable)?;
            let done = t.as_ref().is_none_or(|t| t.status.is_terminal());
            if done || tokio::time::Instant::now() >= until || *shutdown.borrow() {
                return Ok(t);
            }
            tokio::select! {
                _ = SharedRedis::task_woken(wakes, id) => {}
                _ = tokio::time::sleep(SHARED_SAFETY_POLL) => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
    }

    /// A page of the tasks matching `filter` that `caller` may see (admins: all; others: their
    /// own), in `order` (`page` from 1): every hub's in shared mode, this hub's otherwise.
    /// Durable, like [`TaskService::get`].
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the shared store cannot be read.
    pub async fn list(
        &self,
        caller: &Principal,
        filter: &TaskFilter,
        order: Order,
        page: usize,
        limit: usize,
    ) -> Result<Page, Error> {
        let owned;
        let filter = match caller.list_filter() {
            None => filter,
            Some(o) => {
                owned = TaskFilter {
                    owner: Some(o.to_owned()),
                    ..filter.clone()
                };
                &owned
            }
        };
        match &self.mode {
            Mode::Shared(redis) => redis
                .list(filter, order, page, limit)
                .await
                .map_err(unavailable),
            Mode::Local => {
                let (p, ticket) = self.cluster.list_with_ticket(filter, order, page, limit);
                self.barrier(ticket).await;
                Ok(p)
            }
        }
    }

    /// Cancels task `id` wherever it is held; the node running it gets `task_cancel`. Returns
    /// the cancelled task.
    ///
    /// # Errors
    /// [`Error::NotFound`] (also for a task `caller` may not see), [`Error::Terminal`] if it
    /// already ended, and in shared mode [`Error::CancelUnconfirmed`] or
    /// [`Error::StoreUnavailable`].
    pub async fn cancel(&self, caller: &Principal, id: &str) -> Result<Task, Error> {
        if !self.visible(caller, id).await? {
            return Err(Error::NotFound(id.to_owned()));
        }
        match self.cluster.cancel(id) {
            Ok(t) => {
                if let Some(ticket) = self.cluster.ticket_of(id) {
                    self.barrier(ticket).await;
                }
                Ok(t)
            }
            Err(CancelError::Terminal(s)) => Err(Error::Terminal(s)),
            Err(CancelError::NotFound) => match &self.mode {
                Mode::Local => Err(Error::NotFound(id.to_owned())),
                Mode::Shared(redis) => match end_shared(redis, id, None).await? {
                    Settled::Completed(t) => Ok(t),
                    Settled::AlreadyFinished(t) => Err(Error::Terminal(t.status.as_str())),
                },
            },
        }
    }

    /// The events of task `id` after `after` (its `seq`, for `Last-Event-ID`), then live ones,
    /// ending after the terminal event or when the hub shuts down. `Ok(None)` when the task
    /// has ended and nothing is newer. Every event sent is durable.
    ///
    /// # Errors
    /// [`Error::NotFound`] (also for a task `caller` may not see);
    /// [`Error::StoreUnavailable`] if the shared store cannot be read.
    pub async fn events(
        &self,
        caller: &Principal,
        id: &str,
        after: u32,
    ) -> Result<Option<EventStream>, Error> {
        if !self.visible(caller, id).await? {
            return Err(Error::NotFound(id.to_owned()));
        }
        // Subscribe before reading the past, so no event falls between the two.
        let live = self.cluster.subscribe();
        match self.cluster.get(id) {
            Some(task) => {
                let backlog = self.cluster.events_after(id, after);
                if task.status.is_terminal() && backlog.is_empty() {
                    return Ok(None);
                }
                let (tx, rx) = mpsc::channel(64);
                tokio::spawn(
                    self.clone()
                        .follow_local(id.to_owned(), after, backlog, live, tx),
                );
                Ok(Some(rx))
            }
            None => match &self.mode {
                Mode::Local => Err(Error::NotFound(id.to_owned())),
                Mode::Shared(redis) => self.events_shared(redis.clone(), id, after).await,
            },
        }
    }

    /// Sends a held task's events from `backlog`, then live ones from the engine.
    async fn follow_local(
        self,
        id: String,
        mut last: u32,
        mut backlog: Vec<TaskEvent>,
        mut live: broadcast::Receiver<Arc<TaskEvent>>,
        tx: mpsc::Sender<TaskEvent>,
    ) {
        let mut shutdown = self.shutdown.clone();
        loop {
            // Events go out once they are durable: the task's last write covers them.
            if !backlog.is_empty()
                && let Some(ticket) = self.cluster.ticket_of(&id)
            {
                self.barrier(ticket).await;
            }
            if !send_newer(&tx, backlog.drain(..), &mut last).await {
                return;
            }
            tokio::select! {
                r = live.recv() => match r {
                    Ok(e) if e.task_id == id && e.seq > last => backlog.push((*e).clone()),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        backlog = self.cluster.events_after(&id, last);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Shared mode, a task this hub does not hold: its events from the shared record, read
    /// again at each change another hub publishes (and every second as a safety net).
    async fn events_shared(
        &self,
        redis: Arc<SharedRedis>,
        id: &str,
        after: u32,
    ) -> Result<Option<EventStream>, Error> {
        // Subscribed before the first read, so no change after it is missed.
        let mut wakes = redis.task_wakes();
        let Some(task) = redis.get(id).await.map_err(unavailable)? else {
            return Err(Error::NotFound(id.to_owned()));
        };
        if task.status.is_terminal() && task.events.iter().all(|e| e.seq <= after) {
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel(64);
        let mut shutdown = self.shutdown.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut last = after;
            let mut task = Some(task);
            loop {
                if let Some(t) = task.take()
                    && !send_newer(&tx, t.events, &mut last).await
                {
                    return;
                }
                tokio::select! {
                    _ = SharedRedis::task_woken(&mut wakes, &id) => {}
                    _ = tokio::time::sleep(SHARED_SAFETY_POLL) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                match redis.get(&id).await {
                    Ok(Some(t)) => task = Some(t),
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, task_id = %id, "shared task events not read")
                    }
                }
            }
        });
        Ok(Some(rx))
    }

    /// The read barrier: waits until the write with durability `ticket` is confirmed. If the
    /// store is failing, the answer goes out anyway after the wait (reads stay available).
    async fn barrier(&self, ticket: u64) {
        let durability = self.cluster.durability();
        if !durability.is_mirrored() || durability.is_durable(ticket) {
            return;
        }
        if let Err(e) = durability.wait(ticket, DURABLE_WAIT).await {
            tracing::warn!(error = %e, "answering with a state the store has not confirmed");
        }
    }
}

/// Shared mode, a task this hub does not hold: a queued one is cancelled in the shared store;
/// for one another hub holds, that hub is asked (pub/sub) and the answer waits up to 10 s for
/// the shared record to show the end.
/// Shared mode: ends task `id`, which this hub does not hold, with `outcome` (`None`: a
/// user's cancel). A queued task is ended in the shared store directly; one held by a hub is
/// ended by that hub (asked on the cancel channel), and the answer waits until the shared
/// record shows it ended.
async fn end_shared(
    redis: &SharedRedis,
    id: &str,
    outcome: Option<crate::model::Outcome>,
) -> Result<Settled, Error> {
    let Some(mut t) = redis.get(id).await.map_err(unavailable)? else {
        return Err(Error::NotFound(id.to_owned()));
    };
    if t.status.is_terminal() {
        return Ok(Settled::AlreadyFinished(t));
    }
    let ended = |t: &mut Task| match &outcome {
        None => t.cancel(SystemTime::now()).is_ok(),
        Some(o) => t.finish(o.clone(), SystemTime::now()).is_ok(),
    };
    if t.status == crate::model::TaskStatus::Queued
        && ended(&mut t)
        && redis.finish_queued(&t).await.map_err(unavailable)?
    {
        return Ok(Settled::Completed(t));
    }
    // Held by a hub (perhaps claimed just now): ask the holder, and answer once the shared
    // record shows the task ended, waking on its change notices.
    let mut wakes = redis.task_wakes();
    redis
        .request_end(id, outcome.as_ref())
        .await
        .map_err(unavailable)?;
    let until = tokio::time::Instant::now() + SHARED_CANCEL_WAIT;
    loop {
        match redis.get(id).await.map_err(unavailable)? {
            Some(t) if t.status.is_terminal() => return Ok(Settled::Completed(t)),
            Some(_) if tokio::time::Instant::now() < until => {}
            _ => return Err(Error::CancelUnconfirmed(id.to_owned())),
        }
        tokio::select! {
            _ = SharedRedis::task_woken(&mut wakes, id) => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// Sends the events of `events` newer than `last` (by `seq`), moving `last` on. False once the
/// stream is over: the terminal event was sent, or the reader went away.
async fn send_newer(
    tx: &mpsc::Sender<TaskEvent>,
    events: impl IntoIterator<Item = TaskEvent>,
    last: &mut u32,
) -> bool {
    for e in events {
        if e.seq <= *last {
            continue;
        }
        *last = e.seq;
        let end = e.kind.is_terminal();
        if tx.send(e).await.is_err() || end {
            return false;
        }
    }
    true
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::StoreUnavailable(e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::engine::ClusterOptions;
    use crate::store::MemoryStore;

    fn service() -> TaskService {
        let options = ClusterOptions {
            version: "test".to_owned(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            default_node_max_concurrent_tasks: 16,
            vcp_max_concurrent_tasks: 8,
            allow_internal_request_file: false,
            outbound_queue_frames: 64,
            callbacks: None,
        };
        let cluster = Cluster::new(options, Box::new(MemoryStore::new()));
        TaskService::local(cluster, watch::channel(false).1)
    }

    fn spec(key: Option<&str>) -> TaskSpec {
        TaskSpec {
            tool: "echo".to_owned(),
            args: json!({}),
            description: None,
            priority: 0,
            timeout_seconds: 60.0,
            max_attempts: 1,
            idempotency_key: key.map(str::to_owned),
            pinned_node: None,
            capability: None,
            owner: None,
        }
    }

    #[tokio::test]
    async fn a_user_reaches_only_their_own_tasks_and_admins_reach_all() {
        let svc = service();
        let alice = Principal::user("alice", "j-a");
        let bob = Principal::user("bob", "j-b");
        let admin = Principal::admin();
        let (a, _) = svc.submit(&alice, vec![spec(None)]).await.unwrap()[0].clone();
        assert_eq!(a.spec.owner.as_deref(), Some("user:alice"));
        let (b, _) = svc.submit(&bob, vec![spec(None)]).await.unwrap()[0].clone();
        let none = Duration::ZERO;

        assert!(svc.get(&alice, &a.id, none).await.unwrap().is_some());
        assert!(svc.get(&bob, &a.id, none).await.unwrap().is_none(), "read");
        assert!(matches!(
            svc.cancel(&bob, &a.id).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            svc.events(&bob, &a.id, 0).await,
            Err(Error::NotFound(_))
        ));
        let ids = |p: Page| p.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
        let all = TaskFilter::default();
        assert_eq!(
            ids(svc
                .list(&bob, &all, Order::NewestFirst, 1, 50)
                .await
                .unwrap()),
            vec![b.id.clone()]
        );
        assert_eq!(
            ids(svc
                .list(&admin, &all, Order::NewestFirst, 1, 50)
                .await
                .unwrap()),
            [b.id.clone(), a.id.clone()]
        );
        assert!(svc.get(&admin, &a.id, none).await.unwrap().is_some());
        // The one cancel that counts: the owner's.
        assert_eq!(
            svc.cancel(&alice, &a.id).await.unwrap().status,
            crate::model::TaskStatus::Cancelled
        );
    }

    #[tokio::test]
    async fn idempotency_keys_are_scoped_to_their_owner() {
        let svc = service();
        let alice = Principal::user("alice", "j-a");
        let bob = Principal::user("bob", "j-b");
        let (a, new_a) = svc.submit(&alice, vec![spec(Some("k"))]).await.unwrap()[0].clone();
        let (again, new_again) =
            svc.submit(&alice, vec![spec(Some("k"))]).await.unwrap()[0].clone();
        let (b, new_b) = svc.submit(&bob, vec![spec(Some("k"))]).await.unwrap()[0].clone();
        assert!(new_a && !new_again && new_b);
        assert_eq!(again.id, a.id, "the owner's retry finds their task");
        assert_ne!(b.id, a.id, "another owner's same key is another task");
    }
}
