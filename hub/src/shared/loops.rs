//! Shared mode's background loops, each a named `async fn` started by [`spawn`]:
//! [`lease_loop`] (the hub lease, node views, deadlines and retention of unclaimed tasks, the
//! reaper), [`claim_loop`] (fills this hub's free capacity from the shared queues, woken by
//! [`wake_subscription_loop`] and [`engine_wake_loop`]), [`cancel_loop`], [`node_action_loop`],
//! [`handover_loop`] and [`fenced_loop`] (drops fenced tasks from the engine). Then the
//! graceful exit: [`drain`] and [`leave`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    Claims, Commit, EndRequest, Error, NextState, SharedHandles, SharedRedis, TakeOver, WAKE_ALL,
    Wake, pinned_queue, subscribe, subscribe_cancels, subscribe_node_actions, tool_queue,
};
use crate::engine::Cluster;
use crate::model::Task;

/// How often the lease is renewed, this hub's node views are published and the reaper runs,
/// at most (shorter leases renew every fifth of their lifetime: [`renew_interval`]).
pub const LEASE_TICK: Duration = Duration::from_secs(1);

/// The lease renewal interval for a lease of `ttl_ms`: `min(LEASE_TICK, ttl_ms / 5)`.
pub fn renew_interval(ttl_ms: u64) -> Duration {
    LEASE_TICK.min(Duration::from_millis(ttl_ms / 5))
}
/// How often the claimer looks at the shared queues when no wake-up (`Wake::Queue`) came.
pub const CLAIM_TICK: Duration = Duration::from_millis(100);

/// How often a hub tries to take over the claims of tasks its re-registered nodes hold.
pub const HANDOVER_TICK: Duration = Duration::from_millis(250);

/// How long a loop waits before subscribing again after its subscription failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Starts the loops; they end when `stop` turns true.
/// `retention` is how long finished tasks stay in the shared store (`task_retention_hours`).
pub fn spawn(
    handles: SharedHandles,
    cluster: Cluster,
    retention: Duration,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let SharedHandles {
        url,
        redis,
        claims,
        fenced,
    } = handles;
    cluster.enable_handover();
    // Wake-ups of the claimer: a task was queued somewhere, or a slot freed here.
    let wake = Arc::new(Notify::new());
    vec![
        tokio::spawn(node_action_loop(
            url.clone(),
            redis.clone(),
            cluster.clone(),
            stop.clone(),
        )),
        tokio::spawn(handover_loop(
            redis.clone(),
            claims.clone(),
            cluster.clone(),
            stop.clone(),
        )),
        tokio::spawn(cancel_loop(url.clone(), cluster.clone(), stop.clone())),
        tokio::spawn(lease_loop(
            redis.clone(),
            claims.clone(),
            cluster.clone(),
            retention,
            stop.clone(),
        )),
        tokio::spawn(wake_subscription_loop(
            url,
            redis.clone(),
            wake.clone(),
            stop.clone(),
        )),
        tokio::spawn(engine_wake_loop(
            cluster.clone(),
            wake.clone(),
            stop.clone(),
        )),
        tokio::spawn(claim_loop(
            redis,
            claims,
            cluster.clone(),
            wake,
            stop.clone(),
        )),
        tokio::spawn(fenced_loop(fenced, cluster, stop)),
    ]
}

/// Waits [`RESUBSCRIBE_AFTER`]; `true` if `stop` turned true meanwhile (the loop should end).
async fn stopped_before_resubscribing(stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// Every [`renew_interval`]: renews the lease (a lost lease disowns every claimed task and
/// joins again with a new epoch), publishes this hub's node views, times out tasks that waited
/// in a shared queue past their deadline, deletes tasks finished more than `retention` ago, and
/// reaps the tasks of hubs whose lease expired.
async fn lease_loop(
    redis: Arc<SharedRedis>,
    claims: Claims,
    cluster: Cluster,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(renew_interval(redis.lease_ttl_ms()));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match redis.renew().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    hub = redis.hub_id(),
                    "hub lease lost: dropping every claimed task and joining again"
                );
                for id in claims.ids() {
                    claims.remove(&id);
                    cluster.disown(&id);
                }
                if let Err(e) = redis.rejoin().await {
                    tracing::error!(error = %e, "cannot join the shared store again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "hub lease not renewed"),
        }
        publish_node_views(&redis, &cluster).await;
        match redis.expire_queued(1000).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(tasks = n, "queued tasks timed out in the shared store")
            }
            Err(e) => tracing::warn!(error = %e, "shared deadline pass failed"),
        }
        if let Some(cutoff) = SystemTime::now().checked_sub(retention) {
            match redis.collect_finished_before(cutoff, 1000).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(tasks = n, "finished tasks collected from the shared store")
                }
                Err(e) => tracing::warn!(error = %e, "shared retention pass failed"),
            }
        }
        match redis.reap().await {
            Ok(r) if r.requeued + r.failed > 0 => tracing::info!(
                requeued = r.requeued,
                failed = r.failed,
                "took over the tasks of a hub whose lease expired"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaper pass failed"),
        }
    }
}

/// The hub's one subscription to the wake-ups ([`subscribe`]): a queued task wakes the claimer
/// (claim at once instead of at the next tick); a changed record wakes the readers following
/// that task ([`SharedRedis::wake_task`]). Subscribes again when the connection drops.
async fn wake_subscription_loop(
    url: String,
    redis: Arc<SharedRedis>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match subscribe(&url).await {
            Ok(stream) => {
                // Changes published before this subscription may be missed.
                redis.wake_task(WAKE_ALL);
                let mut stream = Box::pin(stream);
                loop {
                    tokio::select! {
                        w = stream.next() => match w {
                            Some(Wake::Queue(_)) => wake.notify_one(),
                            // Readers following a task another hub holds.
                            Some(Wake::Task(id)) => redis.wake_task(&id),
                            None => break,
                        },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "queue wake-ups not subscribed"),
        }
        if stopped_before_resubscribing(&mut stop).await {
            return;
        }
    }
}

/// Room here: a task of this hub ended or a node event (registered, drained, lost, ...) wakes
/// the claimer, so it claims again at once.
async fn engine_wake_loop(cluster: Cluster, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut tasks = cluster.subscribe();
    let mut nodes = cluster.subscribe_nodes();
    loop {
        tokio::select! {
            e = tasks.recv() => match e {
                Ok(e) if e.status.is_terminal() => wake.notify_one(),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    wake.notify_one()
                }
                Err(_) => return,
            },
            e = nodes.recv() => match e {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    wake.notify_one()
                }
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One [`claim_round`] every [`CLAIM_TICK`] and at every wake-up; wake-ups coalesce (one round
/// at a time).
async fn claim_loop(
    redis: Arc<SharedRedis>,
    claims: Claims,
    cluster: Cluster,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(CLAIM_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        claim_round(&redis, &claims, &cluster).await;
    }
}

/// Cancels in the engine the tasks other hubs ask to cancel ([`subscribe_cancels`]); a task
/// not held here is another hub's business. Subscribes again when the connection drops.
async fn cancel_loop(url: String, cluster: Cluster, mut stop: watch::Receiver<bool>) {
    loop {
        match subscribe_cancels(&url).await {
            Ok(stream) => {
                let mut stream = Box::pin(stream);
                loop {
                    tokio::select! {
                        id = stream.next() => match id {
                            // Not held here: another hub's business.
                            Some(EndRequest { id, outcome: None }) => { let _ = cluster.cancel(&id); }
                            Some(EndRequest { id, outcome: Some(o) }) => {
                                let _ = cluster.complete_by_callback(&id, o);
                            }
                            None => break,
                        },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cancel requests not subscribed"),
        }
        if stopped_before_resubscribing(&mut stop).await {
            return;
        }
    }
}

/// Drops from the engine the tasks whose commit was fenced (ids from the store's writer
/// thread): another hub holds them now.
async fn fenced_loop(
    mut fenced: mpsc::UnboundedReceiver<String>,
    cluster: Cluster,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            id = fenced.recv() => match id {
                Some(id) => { cluster.disown(&id); }
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Publishes this hub's node views (`GET /v1/nodes` objects) for the other hubs.
async fn publish_node_views(redis: &SharedRedis, cluster: &Cluster) {
    let views: Vec<(String, serde_json::Value)> = cluster
        .nodes()
        .into_iter()
        .filter_map(|n| Some((n.id.clone(), serde_json::to_value(&n).ok()?)))
        .collect();
    if let Err(e) = redis.put_node_views(&views).await {
        tracing::warn!(error = %e, "node views not published");
    }
}

/// Applies the drain/undrain requests other hubs forward for this hub's nodes, then publishes
/// this hub's node views at once (the requesting hub answers when it sees the change there).
async fn node_action_loop(
    url: String,
    redis: Arc<SharedRedis>,
    cluster: Cluster,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match subscribe_node_actions(&url).await {
            Ok(stream) => {
                let mut stream = Box::pin(stream);
                loop {
                    let action = tokio::select! {
                        a = stream.next() => a,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    let Some(a) = action else { break };
                    if a.hub == redis.hub_id() && cluster.set_draining(&a.node, a.drain) {
                        tracing::info!(node_id = %a.node, drain = a.drain, "node action from another hub");
                        publish_node_views(&redis, &cluster).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "node actions not subscribed"),
        }
        if stopped_before_resubscribing(&mut stop).await {
            return;
        }
    }
}

/// Takes over, for this hub, the claims of tasks that nodes reconnecting here still hold while
/// the dead hub that assigned them holds the claim (`Cluster::handover_pending` →
/// `SharedRedis::take_over` → `Claims` → `Cluster::take_over`); waits while that hub's lease
/// lives, for at most `SharedRedis::handover_window`.
async fn handover_loop(
    redis: Arc<SharedRedis>,
    claims: Claims,
    cluster: Cluster,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HANDOVER_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for (id, node) in cluster.handover_pending(redis.handover_window()) {
            match redis.take_over(&id, &node).await {
                Ok(TakeOver::Taken(c)) => {
                    claims.insert(&id, c.claim);
                    if !cluster.take_over(c.task) {
                        claims.remove(&id);
                    }
                }
                Ok(TakeOver::Wait) => {}
                Ok(TakeOver::Refused(why)) => cluster.handover_refused(&id, why),
                // Our lease is lost: the lease loop rejoins; try again then.
                Err(Error::Fenced(_)) => break,
                Err(e) => {
                    tracing::warn!(error = %e, task_id = %id, "hand-over failed");
                    break;
                }
            }
        }
    }
}

/// Claim rounds so far (process-wide): which queue a round serves first.
static CLAIM_ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One claim pass: hands back the queued tasks no node here can take (their node left), then
/// claims as many tasks per tool and per pinned node as this hub has free slots.
async fn claim_round(redis: &Arc<SharedRedis>, claims: &Claims, cluster: &Cluster) {
    for t in cluster.stranded() {
        let Some(claim) = claims.get(&t.id) else {
            continue;
        };
        match redis.release(&t, claim).await {
            Ok(()) => {
                claims.remove(&t.id);
                cluster.disown(&t.id);
            }
            Err(Error::Fenced(_)) => {
                claims.remove(&t.id);
                cluster.disown(&t.id);
            }
            Err(e) => tracing::warn!(error = %e, task_id = %t.id, "hand-back failed"),
        }
    }
    let free = cluster.free_slots();
    // Every queue with room here, in one script call, at most `free.total` tasks in all. The
    // queue that is served first turns each round, so no tool starves another here.
    let mut queues: Vec<(String, usize)> = free
        .by_tool
        .iter()
        .map(|(t, n)| (tool_queue(t), *n))
        .chain(free.by_node.iter().map(|(id, n)| (pinned_queue(id), *n)))
        .filter(|(_, n)| *n > 0)
        .collect();
    if queues.is_empty() || free.total == 0 {
        return;
    }
    queues.sort_unstable();
    let turn = CLAIM_ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let len = queues.len();
    queues.rotate_left(turn % len);
    match redis.claim_many(&queues, free.total).await {
        Ok(got) if got.is_empty() => {}
        Ok(got) => {
            let mut tasks = Vec::with_capacity(got.len());
            for c in got {
                claims.insert(&c.task.id, c.claim);
                tasks.push(c.task);
            }
            cluster.adopt(tasks);
        }
        Err(e) => tracing::warn!(error = %e, "claim failed"),
    }
}

/// Graceful shutdown, first step (call once the loops of [`spawn`] have stopped, so nothing
/// more is claimed, and before the node connections close): hands every task queued here
/// (held, not started) back to the shared queue in fenced batch writes, so other hubs run them
/// now; then waits until every task this hub holds has finished and its result is committed
/// (its nodes' work is done), or `drain` has passed, renewing the lease meanwhile and handing
/// back whatever comes back to the queue here (a task whose node was lost). Returns (tasks
/// handed back, tasks still held at the end).
pub async fn drain(
    redis: &SharedRedis,
    claims: &Claims,
    cluster: &Cluster,
    drain: Duration,
) -> (usize, usize) {
    let until = tokio::time::Instant::now() + drain;
    let renew_every = renew_interval(redis.lease_ttl_ms());
    let mut renew_at = tokio::time::Instant::now();
    let mut handed = 0;
    loop {
        handed += hand_back(redis, claims, cluster).await;
        let now = tokio::time::Instant::now();
        if claims.is_empty() || now >= until {
            break;
        }
        if now >= renew_at {
            renew_at = now + renew_every;
            match redis.renew().await {
                Ok(true) => {}
                // Lost: nothing here can be committed any more; the reaper has the rest.
                Ok(false) => break,
                Err(e) => tracing::warn!(error = %e, "hub lease not renewed while draining"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (handed, claims.len())
}

/// Graceful shutdown, last step (node connections closed, the store writer flushed): deletes
/// this hub's lease, so every other hub's reaper requeues what it still holds (tasks whose
/// nodes did not finish in time) at its next pass instead of after the lease would expire.
pub async fn leave(redis: &SharedRedis, claims: &Claims) {
    match redis.leave().await {
        Ok(_) => tracing::info!(
            hub = redis.hub_id(),
            still_held = claims.len(),
            "left the shared store: other hubs take over what is still held"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "hub lease not deleted at shutdown; it expires by itself")
        }
    }
}

/// Hands every task queued in this engine back to the shared queue (one fenced batch write per
/// 256 tasks) and drops it here. Returns how many were handed back.
async fn hand_back(redis: &SharedRedis, claims: &Claims, cluster: &Cluster) -> usize {
    let held: Vec<(Task, Vec<u8>, u64)> = cluster
        .queued_here()
        .into_iter()
        .filter_map(|t| {
            let claim = claims.get(&t.id)?;
            let record = serde_json::to_vec(&t).ok()?;
            Some((t, record, claim))
        })
        .collect();
    let commits: Vec<Commit<'_>> = held
        .iter()
        .map(|(t, record, claim)| Commit {
            next: NextState::Queued,
            ..Commit::of(t, record, *claim)
        })
        .collect();
    let mut n = 0;
    for chunk in commits.chunks(256) {
        match redis.commit_batch(chunk).await {
            Ok(results) => {
                for (c, r) in chunk.iter().zip(results) {
                    // Handed back, or fenced (another hub holds it): not ours either way.
                    n += usize::from(r.is_ok());
                    claims.remove(c.id);
                    cluster.disown(c.id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "hand-back at shutdown failed; the reaper requeues these tasks");
                break;
            }
        }
    }
    n
}
