//! What any hub does for the others, safe to run on every hub at once: the reaper (a dead
//! hub's claimed tasks back to their queues, or failed with `node_lost`), the hand-over of a
//! dead hub's claim to the hub its node reconnected to ([`SharedRedis::take_over`]), timing out
//! tasks no hub claimed, and retention.

use std::time::SystemTime;

use super::{
    Claimed, EVENTS_CHANNEL, Error, HANDOVER_WINDOW_LEASES, PREFIX, SharedNode, SharedRedis,
    WAKE_CHANNEL, index_fields, lease_key, now_ms, owned_key, queue_key, score, scripts, task_key,
};
use crate::model::{Loss, Task, TaskStatus};

/// What [`SharedRedis::take_over`] did.
#[derive(Debug, Clone)]
pub enum TakeOver {
    /// This hub holds the task now, under a new claim (same record: still assigned to the
    /// node, same attempt).
    Taken(Box<Claimed>),
    /// The old owner's lease still holds the claiming epoch: ask again later.
    Wait,
    /// Not taken and never will be: the reason (the task finished, was requeued, is held by
    /// a live hub, is assigned elsewhere, or does not exist).
    Refused(&'static str),
}

/// What the reaper did in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Tasks put back in their queue (attempts left).
    pub requeued: u64,
    /// Tasks failed with `node_lost` (no attempts left).
    pub failed: u64,
    /// Dead hubs forgotten (nothing left to reap).
    pub hubs_forgotten: u64,
    /// Tasks left alone because their node re-registered at a live hub, which takes them over
    /// ([`SharedRedis::take_over`]).
    pub handing_over: u64,
}

/// `HMGET record owner epoch claim state` of a task hash.
type ClaimFields = (
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl SharedRedis {
    /// Takes over the claim on task `id` that a dead hub holds, for this hub, because `node`
    /// (which the record names as running it) reconnected here and says it still holds it. Only
    /// if the task is claimed, assigned or running on `node`, and its owner's lease no longer
    /// holds the claiming epoch (one script checks that the claim and record are unchanged, so
    /// it excludes the reapers' requeue and the old owner's commits); the new claim has this
    /// hub's epoch and `claim + 1`, the record is unchanged.
    ///
    /// # Errors
    /// [`Error::Fenced`] if this hub's lease is lost; [`Error::Unavailable`];
    /// [`Error::Unreadable`] for a bad record.
    pub async fn take_over(&self, id: &str, node: &str) -> Result<TakeOver, Error> {
        let mut c = self.conn.clone();
        for _ in 0..3 {
            let h: ClaimFields = redis::cmd("HMGET")
                .arg(task_key(id))
                .arg("record")
                .arg("owner")
                .arg("epoch")
                .arg("claim")
                .arg("state")
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            let (Some(raw), owner, epoch, Some(claim), Some(state)) = h else {
                return Ok(TakeOver::Refused("the shared store has no such task"));
            };
            if state != "claimed" {
                return Ok(TakeOver::Refused(
                    "the task is not held by any hub (finished or requeued)",
                ));
            }
            let (Some(owner), Some(epoch)) = (owner, epoch) else {
                return Ok(TakeOver::Refused("the task has no owner"));
            };
            if owner == self.hub_id {
                return Ok(TakeOver::Refused("this hub holds the task already"));
            }
            let task: Task = serde_json::from_slice(&raw).map_err(|e| Error::Unreadable {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
            if !matches!(task.status, TaskStatus::Assigned | TaskStatus::Running)
                || task.node_id.as_deref() != Some(node)
            {
                return Ok(TakeOver::Refused("the task is not assigned to this node"));
            }
            let r: String = scripts::TAKE_OVER
                .key(task_key(id))
                .key(lease_key(&owner))
                .key(owned_key(&owner))
                .key(lease_key(&self.hub_id))
                .key(owned_key(&self.hub_id))
                .arg(&owner)
                .arg(&epoch)
                .arg(&claim)
                .arg(raw)
                .arg(&self.hub_id)
                .arg(self.epoch())
                .arg(id)
                .arg(EVENTS_CHANNEL)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.classify(e))?;
            match r.as_str() {
                "alive" => return Ok(TakeOver::Wait),
                "changed" => continue,
                n => {
                    let claim = n.parse().map_err(|_| {
                        self.unavailable("unexpected reply of the take-over script")
                    })?;
                    return Ok(TakeOver::Taken(Box::new(Claimed { task, claim })));
                }
            }
        }
        // Changing under us (its old owner is still committing): ask again later.
        Ok(TakeOver::Wait)
    }

    /// Whether `node` re-registered at a live hub other than `dead` less than the hand-over
    /// window ago ([`HANDOVER_WINDOW_LEASES`] lease lifetimes): that hub is taking over the
    /// tasks `dead` assigned to it, so the reaper leaves them alone meanwhile.
    async fn handing_over(&self, node: &str, dead: &str) -> Result<bool, Error> {
        let mut c = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(format!("{PREFIX}nodes"))
            .arg(node)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(entry) = raw.and_then(|r| serde_json::from_slice::<SharedNode>(&r).ok()) else {
            return Ok(false);
        };
        let window = HANDOVER_WINDOW_LEASES.saturating_mul(self.lease_ttl_ms);
        if entry.hub == dead || now_ms().saturating_sub(entry.seen_ms) >= window {
            return Ok(false);
        }
        redis::cmd("EXISTS")
            .arg(lease_key(&entry.hub))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// One reaper pass: for every other hub whose lease is gone, requeues each task it had
    /// claimed (a `task_migrated` event; attempt + 1 at its next assignment) or, if the task
    /// used all its attempts, fails it with `node_lost`; a hub with nothing left is forgotten.
    /// Safe to run on every hub at once: each requeue is conditional on the claim it read.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn reap(&self) -> Result<Reaped, Error> {
        let mut out = Reaped::default();
        let mut c = self.conn.clone();
        let hubs: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{PREFIX}hubs"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        for hub in hubs {
            if hub == self.hub_id {
                continue;
            }
            let alive: bool = redis::cmd("EXISTS")
                .arg(lease_key(&hub))
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            if alive {
                continue;
            }
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(owned_key(&hub))
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            for id in ids {
                let h: ClaimFields = redis::cmd("HMGET")
                    .arg(task_key(&id))
                    .arg("record")
                    .arg("owner")
                    .arg("epoch")
                    .arg("claim")
                    .arg("state")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                let (Some(raw), Some(owner), Some(epoch), Some(claim), Some(state)) = h else {
                    // Finished or deleted meanwhile: drop the stale membership.
                    let _: redis::RedisResult<i64> = redis::cmd("SREM")
                        .arg(owned_key(&hub))
                        .arg(&id)
                        .query_async(&mut c)
                        .await;
                    continue;
                };
                if owner != hub || state != "claimed" {
                    continue;
                }
                let mut task: Task =
                    serde_json::from_slice(&raw).map_err(|e| Error::Unreadable {
                        id: id.clone(),
                        reason: e.to_string(),
                    })?;
                // Its node reconnected to a live hub, which takes the claim over instead.
                if matches!(task.status, TaskStatus::Assigned | TaskStatus::Running)
                    && let Some(node) = task.node_id.as_deref()
                    && self.handing_over(node, &hub).await?
                {
                    out.handing_over += 1;
                    continue;
                }
                let failed = requeue_record(&mut task, &hub);
                let record = serde_json::to_vec(&task).map_err(|e| self.unavailable(e))?;
                let r: i64 = scripts::REQUEUE
                    .key(task_key(&id))
                    .key(lease_key(&hub))
                    .key(owned_key(&hub))
                    .key(queue_key(&task))
                    .key(format!("{PREFIX}finished"))
                    .arg(&hub)
                    .arg(&epoch)
                    .arg(&claim)
                    .arg(record)
                    .arg(if failed { "done" } else { "queued" })
                    .arg(score(&task))
                    .arg(&id)
                    .arg(EVENTS_CHANNEL)
                    .arg(WAKE_CHANNEL)
                    .arg(now_ms())
                    .arg(index_fields(&task))
                    .invoke_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                if r == 1 {
                    if failed {
                        out.failed += 1;
                    } else {
                        out.requeued += 1;
                    }
                }
            }
            let r: i64 = scripts::FORGET_HUB
                .key(format!("{PREFIX}hubs"))
                .key(lease_key(&hub))
                .key(owned_key(&hub))
                .arg(&hub)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            out.hubs_forgotten += u64::try_from(r).unwrap_or(0);
        }
        Ok(out)
    }

    /// Times out tasks still waiting in a shared queue past their deadline (no hub claimed
    /// them; a claimed task's deadline is its engine's): each gets a `task_timed_out` event and
    /// status `timed_out` with error `task_timeout`, as the engine does. Looks at up to `max`
    /// overdue tasks. Returns how many timed out. Any hub may run it.
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::Unreadable`] for a bad record.
    pub async fn expire_queued(&self, max: usize) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        let key = format!("{PREFIX}deadlines");
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut n = 0;
        for id in ids {
            let (state, raw): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(task_key(&id))
                .arg("state")
                .arg("record")
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            let (Some(state), Some(raw)) = (state, raw) else {
                let _: i64 = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&id)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                continue;
            };
            match state.as_str() {
                "queued" => {
                    let mut t: Task =
                        serde_json::from_slice(&raw).map_err(|e| Error::Unreadable {
                            id: id.clone(),
                            reason: e.to_string(),
                        })?;
                    time_out_record(&mut t);
                    if self.finish_queued(&t).await? {
                        n += 1;
                    }
                }
                "done" => {}
                _ => continue,
            }
            let _: i64 = redis::cmd("ZREM")
                .arg(&key)
                .arg(&id)
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(n)
    }

    /// Deletes up to `max` tasks that finished before `cutoff` (record, idempotency key, index
    /// entries), oldest first. Returns how many. Any hub may run it.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn collect_finished_before(
        &self,
        cutoff: SystemTime,
        max: usize,
    ) -> Result<u64, Error> {
        let cutoff_ms = cutoff
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut c = self.conn.clone();
        scripts::COLLECT
            .key(format!("{PREFIX}finished"))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(cutoff_ms)
            .arg(max)
            .arg(format!("{PREFIX}task:"))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}

/// Ends a queued task's record as timed out (as the engine's deadline does).
fn time_out_record(t: &mut Task) {
    if let Err(e) = t.time_out(SystemTime::now()) {
        tracing::debug!(task_id = %t.id, error = %e, "queued task not timed out");
    }
}

/// Turns the record of a task held by dead hub `hub` into its next state, as the engine's
/// migration does for a lost node: back to `queued` with a `task_migrated` event, or `failed`
/// with `node_lost` when it used all its attempts. A task the hub claimed but never assigned
/// (still `queued` in its record) goes back unchanged. Returns whether it failed.
pub fn requeue_record(task: &mut Task, hub: &str) -> bool {
    if task.status == TaskStatus::Queued || task.status.is_terminal() {
        return false;
    }
    match task.requeue(Loss::Hub { hub }, SystemTime::now()) {
        Ok(_) => task.status == TaskStatus::Failed,
        Err(_) => false,
    }
}
