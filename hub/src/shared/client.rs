//! One hub's handle on the shared Redis ([`SharedRedis`]): connection, join and lease, the
//! wake-ups of readers following a task, and the task writes of a hub: submit, claim, fenced
//! commit and release ([`Commit`], [`Fenced`]); [`Claims`], the claim tokens of the tasks a
//! hub's engine holds; [`new_task`], the record of a new submission.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{
    EVENTS_CHANNEL, Error, HANDOVER_WINDOW_LEASES, PREFIX, WAKE_ALL, WAKE_CHANNEL, index_fields,
    lease_key, now_ms, one_line, owned_key, queue_key, score, scripts, task_key,
};
use crate::model::{Task, TaskSpec};

/// A hub's id, shared epoch and lease lifetime: see [`SharedRedis::identity`].
#[derive(Debug, Clone)]
pub struct HubIdentity {
    hub_id: String,
    epoch: Arc<AtomicU64>,
    lease_ttl_ms: u64,
}

/// One hub's handle on the shared Redis.
pub struct SharedRedis {
    pub(super) conn: ConnectionManager,
    /// The Redis URL without password, for errors.
    pub(super) what: String,
    pub(super) hub_id: String,
    epoch: Arc<AtomicU64>,
    pub(super) lease_ttl_ms: u64,
    /// Task ids whose shared record changed, fanned out from the hub's one subscription
    /// ([`SharedRedis::wake_task`]) to readers following a task ([`SharedRedis::task_wakes`]).
    task_wakes: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Tasks this handle finished in the store without an engine ([`SharedRedis::ended`]).
    ended: tokio::sync::broadcast::Sender<Arc<Task>>,
}

impl SharedRedis {
    /// Connects to `url` and joins as `hub_id`: takes the next epoch, sets the hub's lease
    /// (`lease_ttl_ms`) and registers the hub in `apex:shared:hubs`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if Redis cannot be reached.
    pub async fn join(url: &str, hub_id: &str, lease_ttl_ms: u64) -> Result<Self, Error> {
        let s = Self::connect(url, hub_id, Arc::new(AtomicU64::new(0)), lease_ttl_ms).await?;
        s.rejoin().await?;
        Ok(s)
    }

    /// What another connection needs to act as this hub: its id, its epoch (shared, so a
    /// [`SharedRedis::rejoin`] on any handle applies to all) and its lease lifetime.
    pub fn identity(&self) -> HubIdentity {
        HubIdentity {
            hub_id: self.hub_id.clone(),
            epoch: self.epoch.clone(),
            lease_ttl_ms: self.lease_ttl_ms,
        }
    }

    /// Another handle for the hub `who` on the current runtime (a `ConnectionManager` is driven
    /// by the runtime that made it). Does not join again.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if Redis cannot be reached.
    pub async fn attach(url: &str, who: &HubIdentity) -> Result<Self, Error> {
        Self::connect(url, &who.hub_id, who.epoch.clone(), who.lease_ttl_ms).await
    }

    async fn connect(
        url: &str,
        hub_id: &str,
        epoch: Arc<AtomicU64>,
        lease_ttl_ms: u64,
    ) -> Result<Self, Error> {
        let what = crate::durable::redis::redacted(url);
        let unavailable = |e: String| Error::Unavailable {
            what: what.clone(),
            reason: e,
        };
        let client = redis::Client::open(url).map_err(|e| unavailable(one_line(e)))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| unavailable(one_line(e)))?;
        Ok(Self {
            conn,
            what: what.clone(),
            hub_id: hub_id.to_owned(),
            epoch,
            lease_ttl_ms,
            task_wakes: tokio::sync::broadcast::channel(1024).0,
            ended: tokio::sync::broadcast::channel(256).0,
        })
    }

    /// The terminal records of tasks this handle finished in the shared store while no engine
    /// held them ([`SharedRedis::finish_queued`]: cancelled while queued, timed out unclaimed),
    /// each once, at the hub that finished it (task ends in an engine are that engine's
    /// events). Bounded: a lagging receiver skips some.
    pub fn ended(&self) -> tokio::sync::broadcast::Receiver<Arc<Task>> {
        self.ended.subscribe()
    }

    /// Wake-ups of readers following task records (SSE and `wait_ms` at a hub that does not
    /// hold the task): each item is a task id whose record changed, or [`WAKE_ALL`]. A lagging
    /// receiver should read again. Subscribe before reading the record, so no change is missed.
    pub fn task_wakes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.task_wakes.subscribe()
    }

    /// Passes on a [`Wake::Task`](super::Wake::Task) (or [`WAKE_ALL`]) heard by the hub's subscription to the
    /// readers of [`SharedRedis::task_wakes`].
    pub fn wake_task(&self, id: &str) {
        if self.task_wakes.receiver_count() > 0 {
            let _ = self.task_wakes.send(Arc::from(id));
        }
    }

    /// Waits until `rx` (from [`SharedRedis::task_wakes`]) names task `id` or [`WAKE_ALL`], or
    /// lagged (some wake-up may be lost: read again). Never returns if the sender is gone.
    pub async fn task_woken(rx: &mut tokio::sync::broadcast::Receiver<Arc<str>>, id: &str) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(x) if &*x == id || &*x == WAKE_ALL => return,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return,
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// Takes a new epoch and lease (after [`SharedRedis::renew`] reported the lease lost).
    /// Claims taken under the old epoch stay fenced; the reaper of some hub requeues them.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn rejoin(&self) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        let epoch: u64 = redis::cmd("INCR")
            .arg(format!("{PREFIX}epoch"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(lease_key(&self.hub_id))
            .arg(epoch)
            .arg("PX")
            .arg(self.lease_ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(format!("{PREFIX}hubs"))
            .arg(&self.hub_id)
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(epoch)
    }

    /// This hub's id.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// The lifetime of this hub's lease, in milliseconds.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.lease_ttl_ms
    }

    /// How long a hub waits to take over a re-registered node's tasks, and the reapers leave
    /// them to it: [`HANDOVER_WINDOW_LEASES`] lease lifetimes.
    pub fn handover_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(HANDOVER_WINDOW_LEASES.saturating_mul(self.lease_ttl_ms))
    }

    /// This hub's current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(super) fn unavailable(&self, e: impl std::fmt::Display) -> Error {
        Error::Unavailable {
            what: self.what.clone(),
            reason: one_line(e),
        }
    }

    pub(super) fn classify(&self, e: redis::RedisError) -> Error {
        let text = one_line(&e);
        if text.contains("FENCED") || text.contains("LEASE") {
            Error::Fenced(text)
        } else {
            self.unavailable(text)
        }
    }

    /// Renews the hub's lease. `Ok(false)`: the lease is gone (expired, or the hub id joined
    /// elsewhere); the hub must stop committing and [`SharedRedis::rejoin`].
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn renew(&self) -> Result<bool, Error> {
        let mut c = self.conn.clone();
        let r: i64 = scripts::RENEW
            .key(lease_key(&self.hub_id))
            .arg(self.epoch())
            .arg(self.lease_ttl_ms)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r == 1)
    }

    /// Deletes this hub's lease if it still holds its epoch (graceful shutdown): from then on
    /// nothing this hub holds can be committed by it, and every hub's reaper requeues its tasks
    /// at its next pass instead of after the lease would have expired. `Ok(false)` if the
    /// lease was gone already.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn leave(&self) -> Result<bool, Error> {
        let mut c = self.conn.clone();
        let r: i64 = scripts::LEAVE
            .key(lease_key(&self.hub_id))
            .arg(self.epoch())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r == 1)
    }

    /// Whether the hub's lease still holds its epoch (reads only; does not renew).
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn lease_alive(&self) -> Result<bool, Error> {
        let mut c = self.conn.clone();
        let cur: Option<u64> = redis::cmd("GET")
            .arg(lease_key(&self.hub_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(cur == Some(self.epoch()))
    }

    /// A task's stored record, whoever owns it.
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::Unreadable`].
    pub async fn get(&self, id: &str) -> Result<Option<Task>, Error> {
        let mut c = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(task_key(id))
            .arg("record")
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        raw.map(|r| {
            serde_json::from_slice(&r).map_err(|e| Error::Unreadable {
                id: id.to_owned(),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    /// How many tasks wait in `queue`.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn queue_len(&self, queue: &str) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(queue)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Stores a new task (status `queued`) and queues it in [`queue_key`]; with an idempotency
    /// key already used (at any hub) nothing is written and the existing id is returned.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn submit(&self, task: &Task) -> Result<Submitted, Error> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let idem = task.spec.idempotency_index();
        let mut c = self.conn.clone();
        let r: Vec<String> = scripts::SUBMIT
            .key(task_key(&task.id))
            .key(queue_key(task))
            .key(format!("{PREFIX}seq"))
            .key(format!("{PREFIX}idem:{}", idem.as_deref().unwrap_or("")))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(&task.id)
            .arg(record)
            .arg(score(task))
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(WAKE_CHANNEL)
            .arg(deadline_ms(task))
            .arg(index_fields(task))
            .arg(task.spec.owner.as_deref().unwrap_or(""))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        match r.as_slice() {
            [flag, _, seq] if flag == "1" => Ok(Submitted::New {
                seq: seq.parse().unwrap_or(0),
            }),
            [_, id, _] => Ok(Submitted::Existing(id.clone())),
            _ => Err(self.unavailable("unexpected reply of the submit script")),
        }
    }

    /// Stores and queues a batch of new tasks (status `queued`) in one script, all or none:
    /// nothing is written unless every task can be (a Redis error, or a key of the wrong type,
    /// writes nothing). A task whose idempotency key was used before (at any hub, or by an
    /// earlier task of this batch) is not written; its entry names the existing task. One
    /// entry per task, in order; each queue is announced once on [`WAKE_CHANNEL`].
    ///
    /// # Errors
    /// [`Error::Unavailable`] (nothing written); [`Error::Unreadable`] if the
    /// existing task of an idempotency key does not decode.
    pub async fn submit_batch(&self, tasks: &[Task]) -> Result<Vec<SubmittedTask>, Error> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = scripts::SUBMIT_BATCH.prepare_invoke();
        script
            .key(format!("{PREFIX}seq"))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(WAKE_CHANNEL)
            .arg(format!("{PREFIX}task:"));
        for task in tasks {
            let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
            let idem = task.spec.idempotency_index();
            script
                .key(task_key(&task.id))
                .key(queue_key(task))
                .key(format!("{PREFIX}idem:{}", idem.as_deref().unwrap_or("")))
                .arg(&task.id)
                .arg(record)
                .arg(score(task))
                .arg(if idem.is_some() { "1" } else { "0" })
                .arg(deadline_ms(task))
                .arg(index_fields(task))
                .arg(task.spec.owner.as_deref().unwrap_or(""));
        }
        let mut c = self.conn.clone();
        let flat: Vec<Vec<u8>> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        if flat.len() != 3 * tasks.len() {
            return Err(self.unavailable("unexpected reply of the batch submit script"));
        }
        flat.chunks(3)
            .map(|row| match row {
                [flag, _, seq] if flag.as_slice() == b"1" => Ok(SubmittedTask::New {
                    seq: std::str::from_utf8(seq)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                }),
                [_, id, record] => serde_json::from_slice(record)
                    .map(|t| SubmittedTask::Existing(Box::new(t)))
                    .map_err(|e| Error::Unreadable {
                        id: String::from_utf8_lossy(id).into_owned(),
                        reason: e.to_string(),
                    }),
                _ => Err(self.unavailable("unexpected reply of the batch submit script")),
            })
            .collect()
    }

    /// Claims up to `n` queued tasks of `queue` (a [`tool_queue`](super::tool_queue) or
    /// [`pinned_queue`](super::pinned_queue)) for this
    /// hub, highest priority then oldest first. Claimed tasks keep their stored status
    /// (`queued`) until the hub commits the assignment.
    ///
    /// # Errors
    /// [`Error::Fenced`] if the hub's lease is lost (nothing claimed);
    /// [`Error::Unavailable`]; [`Error::Unreadable`] for a bad record.
    pub async fn claim(&self, queue: &str, n: usize) -> Result<Vec<Claimed>, Error> {
        self.claim_many(&[(queue.to_owned(), n)], n).await
    }

    /// [`SharedRedis::claim`] from several queues in one script call: up to `n` tasks of each
    /// `(queue, n)`, in that order (queues with `n = 0` are skipped), and at most `total` in
    /// all.
    ///
    /// # Errors
    /// As [`SharedRedis::claim`].
    pub async fn claim_many(
        &self,
        queues: &[(String, usize)],
        total: usize,
    ) -> Result<Vec<Claimed>, Error> {
        let queues: Vec<&(String, usize)> = queues.iter().filter(|(_, n)| *n > 0).collect();
        if queues.is_empty() || total == 0 {
            return Ok(Vec::new());
        }
        let mut script = scripts::CLAIM_MANY.prepare_invoke();
        script
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(format!("{PREFIX}task:"))
            .arg(total);
        for (queue, n) in &queues {
            script.key(queue).arg(*n);
        }
        let mut c = self.conn.clone();
        let flat: Vec<Vec<u8>> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.classify(e))?;
        parse_claimed(&flat)
    }

    /// Writes the record of a task this hub claimed (`claim` from [`Claimed`]). A terminal
    /// status releases the task (`done`); anything else keeps the claim (a `queued` record is a
    /// task waiting in this hub's engine).
    ///
    /// # Errors
    /// [`Error::Fenced`] if the hub's lease or the task's claim is no longer this hub's
    /// (nothing written); [`Error::Unavailable`].
    pub async fn commit(&self, task: &Task, claim: u64) -> Result<(), Error> {
        let next = if task.status.is_terminal() {
            "done"
        } else {
            "claimed"
        };
        self.fenced_write(task, claim, next).await
    }

    /// Hands a claimed, unfinished task back to its shared queue (for any hub), writing `task`
    /// (whose status should be `queued`) as its record.
    ///
    /// # Errors
    /// As [`SharedRedis::commit`].
    pub async fn release(&self, task: &Task, claim: u64) -> Result<(), Error> {
        self.fenced_write(task, claim, "queued").await
    }

    async fn fenced_write(&self, task: &Task, claim: u64, next: &str) -> Result<(), Error> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let _: i64 = scripts::COMMIT
            .key(task_key(&task.id))
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .key(queue_key(task))
            .key(format!("{PREFIX}finished"))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(claim)
            .arg(record)
            .arg(next)
            .arg(score(task))
            .arg(&task.id)
            .arg(EVENTS_CHANNEL)
            .arg(WAKE_CHANNEL)
            .arg(now_ms())
            .arg(index_fields(task))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Writes many records of tasks this hub holds in one script, each fenced on its own as
    /// [`SharedRedis::commit`] / [`SharedRedis::release`] do. Returns one entry per commit, in
    /// order: `Ok(())` (written, or released already with exactly this record) or
    /// `Err(why)` if that task's write was fenced (nothing written for it).
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the script did not run or failed part-way (commits are
    /// idempotent: retry the whole batch).
    pub async fn commit_batch(
        &self,
        commits: &[Commit<'_>],
    ) -> Result<Vec<Result<(), Fenced>>, Error> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = scripts::COMMIT_BATCH.prepare_invoke();
        script
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .key(format!("{PREFIX}finished"))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(EVENTS_CHANNEL)
            .arg(WAKE_CHANNEL)
            .arg(now_ms());
        for c in commits {
            script
                .key(task_key(c.id))
                .key(&c.queue)
                .arg(c.claim)
                .arg(c.record)
                .arg(c.next.as_str())
                .arg(c.score)
                .arg(c.id)
                .arg(&c.index);
        }
        let mut c = self.conn.clone();
        let rows: Vec<redis::Value> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        if rows.len() != commits.len() {
            return Err(self.unavailable("unexpected reply of the batch commit script"));
        }
        Ok(rows
            .into_iter()
            .map(|v| match v {
                redis::Value::Int(1) => Ok(()),
                redis::Value::BulkString(b) => {
                    Err(Fenced::from_reply(&String::from_utf8_lossy(&b)))
                }
                redis::Value::SimpleString(s) => Err(Fenced::from_reply(&s)),
                other => Err(Fenced::Unexpected(format!("{other:?}"))),
            })
            .collect())
    }

    /// Finishes a task that still waits in its queue (no hub claimed it) with `task`'s
    /// terminal record. `Ok(false)` if it is claimed or already finished (nothing written).
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn finish_queued(&self, task: &Task) -> Result<bool, Error> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let r: i64 = scripts::FINISH_QUEUED
            .key(task_key(&task.id))
            .key(queue_key(task))
            .key(format!("{PREFIX}finished"))
            .arg(record)
            .arg(&task.id)
            .arg(EVENTS_CHANNEL)
            .arg(now_ms())
            .arg(index_fields(task))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        if r == 1 {
            // Nobody listening is fine.
            let _ = self.ended.send(Arc::new(task.clone()));
        }
        Ok(r == 1)
    }
}

/// Result of [`SharedRedis::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The task was stored and queued; `seq` is its global acceptance order.
    New {
        /// Global acceptance sequence number.
        seq: u64,
    },
    /// The idempotency key names an existing task (possibly submitted at another hub).
    Existing(String),
}

/// Result of one task of [`SharedRedis::submit_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum SubmittedTask {
    /// The task was stored and queued; `seq` is its global acceptance order.
    New {
        /// Global acceptance sequence number.
        seq: u64,
    },
    /// The idempotency key names an existing task (submitted before at any hub, or earlier in
    /// the same batch): its record as stored.
    Existing(Box<Task>),
}

/// The shared state a fenced write leaves a task in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    /// Still held by this hub (assigned, running, or waiting in its engine).
    Claimed,
    /// Finished: released, added to the finished set.
    Done,
    /// Handed back to its shared queue for any hub.
    Queued,
}

impl NextState {
    fn as_str(self) -> &'static str {
        match self {
            NextState::Claimed => "claimed",
            NextState::Done => "done",
            NextState::Queued => "queued",
        }
    }
}

/// One fenced write of [`SharedRedis::commit_batch`].
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// Task id.
    pub id: &'a str,
    /// The claim this hub holds the task under ([`Claimed::claim`]).
    pub claim: u64,
    /// The task's record: its [`Task`] JSON, as `serde_json::to_vec` writes it.
    pub record: &'a [u8],
    /// The shared state after the write.
    pub next: NextState,
    /// The task's queue ([`queue_key`]), where [`NextState::Queued`] puts it back.
    pub queue: String,
    /// Its queue score (`-priority`).
    pub score: f64,
    /// The record's status, tool and node (empty if none): its keys in the listing indexes
    /// (`index_fields`).
    pub index: Vec<String>,
}

impl<'a> Commit<'a> {
    /// The commit of `record` (the JSON of `task`) for `task` held under `claim`: `done` if
    /// the task is terminal, else `claimed`.
    pub fn of(task: &'a Task, record: &'a [u8], claim: u64) -> Self {
        Commit {
            id: &task.id,
            claim,
            record,
            next: if task.status.is_terminal() {
                NextState::Done
            } else {
                NextState::Claimed
            },
            queue: queue_key(task),
            score: score(task),
            index: index_fields(task),
        }
    }
}

/// Why one write of [`SharedRedis::commit_batch`] was fenced: nothing was written for that
/// task, and this hub no longer holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    /// The hub's lease no longer holds its epoch (it expired; the hub must join again).
    #[error("the hub lease is lost")]
    LeaseLost,
    /// The task's owner, epoch or claim is no longer this claim's (a reaper requeued it, or
    /// another hub took it over).
    #[error("the task is not held by this claim")]
    NotHeld,
    /// A reply the script never gives; counted as fenced, since nothing is known written.
    #[error("unexpected reply of the batch commit script: {0}")]
    Unexpected(String),
}

impl Fenced {
    /// The reason `commit_batch.lua` gave for one task.
    fn from_reply(reply: &str) -> Self {
        match reply {
            "FENCED the hub lease is lost" => Fenced::LeaseLost,
            "FENCED the task is not held by this claim" => Fenced::NotHeld,
            other => Fenced::Unexpected(other.to_owned()),
        }
    }
}

/// A task this hub claimed: its record and the claim number every commit must present.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The record as stored at claim time.
    pub task: Task,
    /// The task's claim counter after this claim (fencing token together with the epoch).
    pub claim: u64,
}

/// The reply of the claim scripts (record, claim number; flat) as [`Claimed`] tasks.
///
/// # Errors
/// [`Error::Unreadable`] if a record does not decode.
fn parse_claimed(flat: &[Vec<u8>]) -> Result<Vec<Claimed>, Error> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let [record, claim] = pair else { break };
        let task: Task = serde_json::from_slice(record).map_err(|e| Error::Unreadable {
            id: "(claimed)".to_owned(),
            reason: e.to_string(),
        })?;
        let claim = std::str::from_utf8(claim)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(Claimed { task, claim });
    }
    Ok(out)
}

/// A task's deadline in ms since the Unix epoch: `created_at + timeout_seconds`.
fn deadline_ms(task: &Task) -> u64 {
    let created = task
        .created_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let ms = created + task.spec.timeout_seconds.max(0.0) * 1000.0;
    if ms.is_finite() && ms < 9.0e15 {
        ms as u64
    } else {
        9_000_000_000_000_000
    }
}

/// Claim tokens of the tasks a hub's engine holds in shared mode: task id → claim number. The
/// claimer adds one per adopted task; the [`SharedBackend`](super::SharedBackend) reads them to fence every commit and
/// removes a task's once it is released (finished, handed back, or fenced).
#[derive(Debug, Clone, Default)]
pub struct Claims(Arc<parking_lot::Mutex<HashMap<String, u64>>>);

impl Claims {
    /// Records that this hub holds `id` under `claim`.
    pub fn insert(&self, id: &str, claim: u64) {
        self.0.lock().insert(id.to_owned(), claim);
    }

    /// The claim this hub holds `id` under, if any.
    pub fn get(&self, id: &str) -> Option<u64> {
        self.0.lock().get(id).copied()
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &str) {
        self.0.lock().remove(id);
    }

    /// Every task id this hub holds.
    pub fn ids(&self) -> Vec<String> {
        self.0.lock().keys().cloned().collect()
    }

    /// How many tasks this hub holds.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Whether this hub holds no task.
    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}

/// A new task record for a submission at this hub (status `queued`, one `task_created` event).
/// Its `seq` is 0: the shared store orders tasks by its own counter and each hub numbers the
/// tasks it adopts.
pub fn new_task(spec: TaskSpec) -> Task {
    Task::accept(uuid::Uuid::new_v4().to_string(), 0, spec, SystemTime::now())
}
