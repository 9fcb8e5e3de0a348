//! Shared mode's engine side (several hubs on one Redis, see `crate::shared`): how much work
//! this hub can take ([`Cluster::free_slots`]) and taking in tasks claimed from the shared
//! queues ([`Cluster::adopt`]), and dropping a task whose claim was fenced
//! ([`Cluster::disown`]). A child of the engine, used by `shared::loops`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use apex_protocol::{CancelTool, HubMessage, TaskCancel, TaskResult, TaskResultAck, now_ms};

use super::{Cluster, ConnHandle, Core, Dialect, NodeState, vcp_request_id};
use crate::model::{Task, TaskStatus};
use crate::scheduler::QueueKey;

/// Free capacity of this hub, for claiming from the shared queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreeSlots {
    /// Per tool: free slots of the online, undrained nodes offering it, minus the tasks of that
    /// tool already queued here. A node offering several tools counts for each, so this is an
    /// upper bound: a claimed task may wait here until a slot frees.
    pub by_tool: HashMap<String, usize>,
    /// Per online, undrained node: its free slots minus the tasks pinned to it queued here.
    pub by_node: HashMap<String, usize>,
    /// Free slots of the online, undrained nodes (each node once) minus every task queued
    /// here: the most this hub should claim in one round over all queues, so a node offering
    /// several tools is not counted once per tool.
    pub total: usize,
}

impl Cluster {
    /// How many more tasks this hub could start now, per tool and per node (for pinned tasks).
    pub fn free_slots(&self) -> FreeSlots {
        let core = self.shared.core.lock();
        let queued = core.sched.queued_by_tool();
        let mut out = FreeSlots::default();
        let mut free_total = 0usize;
        for e in core.nodes.values().filter(|e| e.state == NodeState::Online) {
            let free = (e.info.limit as usize).saturating_sub(e.inflight.len());
            free_total += free;
            let pinned = core.sched.pinned_to(&e.id).len();
            out.by_node
                .insert(e.id.clone(), free.saturating_sub(pinned));
            for t in &e.info.tools {
                *out.by_tool.entry(t.clone()).or_default() += free;
            }
        }
        for (tool, free) in &mut out.by_tool {
            *free = free.saturating_sub(queued.get(tool).copied().unwrap_or(0));
        }
        out.total = free_total.saturating_sub(queued.values().sum());
        out
    }

    /// Takes in tasks another hub accepted and this hub claimed: each must be `queued` (a task
    /// in another state, or one already known here, is skipped). It keeps its id, spec, attempt
    /// and events; it gets a local sequence number (adopted tasks keep their relative order),
    /// its deadline counts from its `created_at`, and it is dispatched like a submitted task.
    /// Returns how many were taken in.
    pub fn adopt(&self, tasks: Vec<Task>) -> usize {
        let mut core = self.shared.core.lock();
        let now_i = Instant::now();
        let now = SystemTime::now();
        let mut n = 0;
        for mut t in tasks {
            if t.status != TaskStatus::Queued || core.store.get(&t.id).is_some() {
                continue;
            }
            t.seq = core.next_seq;
            core.next_seq += 1;
            let due = Duration::try_from_secs_f64(t.spec.timeout_seconds)
                .ok()
                .and_then(|d| t.created_at.checked_add(d))
                .unwrap_or(now + Duration::from_secs(10 * 365 * 86_400));
            let deadline = now_i + due.duration_since(now).unwrap_or(Duration::ZERO);
            core.deadlines.insert((deadline, t.seq), t.id.clone());
            core.deadline_of.insert(t.id.clone(), (deadline, t.seq));
            core.sched.enqueue(
                &t.id,
                &t.spec.tool,
                QueueKey::new(t.spec.priority, t.seq),
                t.spec.pinned_node.as_deref(),
            );
            core.store.insert(t);
            n += 1;
        }
        self.schedule(&mut core);
        n
    }

    /// Drops a task this hub no longer holds (its commit was fenced: another hub owns it now).
    /// It leaves the queue, or its node's in-flight set (the node gets `task_cancel`, so it
    /// stops running a task whose result would be fenced), its deadline and waiters (woken, so
    /// they can read the task's shared record) and the store's memory, with no event and
    /// nothing written. Returns whether it was here.
    pub fn disown(&self, id: &str) -> bool {
        let mut core = self.shared.core.lock();
        let Some(t) = core.store.get(id) else {
            return false;
        };
        let (status, node, attempt) = (t.status, t.node_id.clone(), t.attempt);
        if status == TaskStatus::Queued {
            core.sched.dequeue(id);
        } else if matches!(status, TaskStatus::Assigned | TaskStatus::Running)
            && let Some(node) = &node
            && let Some(e) = core.nodes.get_mut(node)
            && e.inflight.remove(id)
        {
            if let Some(c) = &e.conn {
                let frame: Option<HubMessage> = match e.info.dialect {
                    Dialect::Native => Some(
                        TaskCancel {
                            task_id: id.to_owned(),
                            attempt: Some(attempt),
                            reason: "another hub holds this task now".to_owned(),
                        }
                        .into(),
                    ),
                    Dialect::Vcp if e.info.cancel_tool => Some(
                        CancelTool {
                            request_id: vcp_request_id(id, attempt),
                        }
                        .into(),
                    ),
                    Dialect::Vcp => None,
                };
                if let Some(f) = frame {
                    c.send(f);
                }
            }
            core.sched.release(node);
        }
        if let Some(key) = core.deadline_of.remove(id) {
            core.deadlines.remove(&key);
        }
        core.trace_parents.remove(id);
        core.resume.remove(id);
        for list in core.recovering.values_mut() {
            list.retain(|t| t != id);
        }
        if let Some(ws) = core.waiters.remove(id) {
            for w in ws {
                let _ = w.send(());
            }
        }
        core.store.forget(id);
        self.schedule(&mut core);
        true
    }

    /// Every task queued in this engine (held, not assigned to a node yet). Shared mode hands
    /// them back to the shared queue when the hub shuts down.
    pub fn queued_here(&self) -> Vec<Task> {
        let core = self.shared.core.lock();
        core.sched
            .queued_tasks()
            .into_iter()
            .filter_map(|(id, _, _)| core.store.get(&id).cloned())
            .collect()
    }

    /// Queued tasks no node here can take: no online, undrained node of this hub offers their
    /// tool (or is their pinned node). Shared mode hands them back to the shared queue.
    pub fn stranded(&self) -> Vec<Task> {
        let core = self.shared.core.lock();
        let online = |pred: &dyn Fn(&super::NodeEntry) -> bool| {
            core.nodes
                .values()
                .any(|e| e.state == NodeState::Online && pred(e))
        };
        core.sched
            .queued_tasks()
            .into_iter()
            .filter(|(_, tool, pinned)| match pinned {
                Some(node) => !online(&|e| &e.id == node),
                None => !online(&|e| e.info.tools.contains(tool)),
            })
            .filter_map(|(id, _, _)| core.store.get(&id).cloned())
            .collect()
    }
}

/// A task a re-registered node says it holds (`node_register.inflight`) that this hub does not:
/// another hub claimed and assigned it, then died. It waits here until this hub takes the claim
/// over ([`Cluster::take_over`]) or gives up ([`Cluster::handover_refused`]).
#[derive(Debug)]
pub struct Handover {
    node: String,
    since: Instant,
    /// The node's result for it, held unacknowledged until the hand-over is decided: a
    /// `task_result_ack` lets the node forget it.
    result: Option<TaskResult>,
}

impl Cluster {
    /// Turns on the hand-over of claims (shared mode): from now on a node that registers
    /// listing tasks this hub does not hold has them noted for [`Cluster::handover_pending`].
    pub fn enable_handover(&self) {
        self.shared
            .core
            .lock()
            .handover
            .get_or_insert_with(HashMap::new);
    }

    /// From `bind`: notes the tasks `node_id` says it holds that this hub does not know (shared
    /// mode only). A node registering again replaces its earlier list, and results held for it
    /// are dropped unanswered (the node sends them again on its new connection).
    pub(super) fn note_handover(core: &mut Core, node_id: &str, holds: Option<&[String]>) {
        let Core {
            handover, store, ..
        } = core;
        let Some(map) = handover.as_mut() else {
            return;
        };
        map.retain(|id, h| h.node != node_id || holds.is_some_and(|l| l.contains(id)));
        for h in map.values_mut().filter(|h| h.node == node_id) {
            h.result = None;
        }
        let now = Instant::now();
        for id in holds.unwrap_or_default() {
            if store.get(id).is_none() {
                map.entry(id.clone()).or_insert_with(|| Handover {
                    node: node_id.to_owned(),
                    since: now,
                    result: None,
                });
            }
        }
    }

    /// Tasks waiting for a hand-over, as (task id, node id). Those waiting longer than `window`
    /// are given up first (see [`Cluster::handover_refused`]).
    pub fn handover_pending(&self, window: Duration) -> Vec<(String, String)> {
        let expired: Vec<String> = {
            let core = self.shared.core.lock();
            let Some(map) = core.handover.as_ref() else {
                return Vec::new();
            };
            map.iter()
                .filter(|(_, h)| h.since.elapsed() >= window)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in expired {
            self.handover_refused(
                &id,
                "the hub holding this task did not hand it over in time",
            );
        }
        let core = self.shared.core.lock();
        core.handover
            .iter()
            .flatten()
            .map(|(id, h)| (id.clone(), h.node.clone()))
            .collect()
    }

    /// Gives up the hand-over of `id`: a result held for it is answered `success: false` with
    /// `why` (it is not committed here; the task runs again wherever it is requeued).
    pub fn handover_refused(&self, id: &str, why: &str) {
        let mut core = self.shared.core.lock();
        let Some(h) = core.handover.as_mut().and_then(|m| m.remove(id)) else {
            return;
        };
        tracing::info!(task_id = id, node_id = %h.node, why, "task not handed over");
        if let Some(res) = h.result
            && let Some(conn) = core.nodes.get(&h.node).and_then(|e| e.conn.as_ref())
        {
            conn.send(TaskResultAck {
                task_id: res.task_id,
                node_id: h.node.clone(),
                success: false,
                message: Some(format!("result not committed: {why}")),
                timestamp: now_ms(),
            });
        }
    }

    /// Handles `task_result` in shared mode: a result for a task waiting for its hand-over is
    /// held (`None`: no acknowledgement yet; [`Cluster::take_over`] commits and acknowledges
    /// it); any other goes to [`Cluster::task_result`].
    pub fn task_result_or_hold(&self, node_id: &str, res: TaskResult) -> Option<TaskResultAck> {
        {
            let mut core = self.shared.core.lock();
            if let Some(h) = core.handover.as_mut().and_then(|m| m.get_mut(&res.task_id))
                && h.node == node_id
            {
                h.result = Some(res);
                return None;
            }
        }
        Some(self.task_result(node_id, res))
    }

    /// Takes in a task whose claim this hub took over from a dead hub
    /// ([`crate::shared::SharedRedis::take_over`]): it is assigned or running on the
    /// node that reported it, same attempt, and joins that node's in-flight set (no frame is
    /// sent: the node is running it), so the node's result is accepted. A result the node sent
    /// meanwhile is committed now and acknowledged once durable. If the node left meanwhile (or
    /// registered again without listing the task) the task migrates as on any node loss. False
    /// if the task is known here already.
    pub fn take_over(&self, mut task: Task) -> bool {
        let mut core = self.shared.core.lock();
        let pending = core.handover.as_mut().and_then(|m| m.remove(&task.id));
        if core.store.get(&task.id).is_some() {
            return false;
        }
        let node = task.node_id.clone().unwrap_or_default();
        let id = task.id.clone();
        task.seq = core.next_seq;
        core.next_seq += 1;
        let now = SystemTime::now();
        let due = Duration::try_from_secs_f64(task.spec.timeout_seconds)
            .ok()
            .and_then(|d| task.created_at.checked_add(d))
            .unwrap_or(now + Duration::from_secs(10 * 365 * 86_400));
        let deadline = Instant::now() + due.duration_since(now).unwrap_or(Duration::ZERO);
        core.deadlines.insert((deadline, task.seq), id.clone());
        core.deadline_of.insert(id.clone(), (deadline, task.seq));
        let attempt = task.attempt;
        core.store.insert(task);
        // The node may have registered again meanwhile without listing it.
        let reported = pending.as_ref().is_some_and(|p| p.node == node);
        let conn = match core.nodes.get_mut(&node) {
            Some(e) if reported && e.state != NodeState::Offline && e.conn.is_some() => {
                e.inflight.insert(id.clone());
                let conn = e.conn.clone();
                core.sched.occupy(&node);
                conn
            }
            _ => None,
        };
        tracing::info!(task_id = %id, node_id = %node, attempt, "took over a task from a dead hub");
        if conn.is_none() {
            self.migrate(
                &mut core,
                &id,
                &node,
                "it left, or stopped listing the task, before the hand-over from a dead hub",
                true,
            );
        }
        self.schedule(&mut core);
        drop(core);
        if let (Some(conn), Some(res)) = (conn, pending.and_then(|p| p.result)) {
            let ack = self.task_result(&node, res);
            self.ack_when_durable(conn, ack);
        }
        true
    }

    /// Sends `ack` once every store write queued so far is durable (as the node session does).
    fn ack_when_durable(&self, conn: ConnHandle, ack: TaskResultAck) {
        let durability = self.shared.durability.clone();
        let ticket = durability.ticket();
        if durability.is_durable(ticket) {
            conn.send(ack);
            return;
        }
        tokio::spawn(async move {
            while durability
                .wait(ticket, crate::durable::DURABLE_WAIT)
                .await
                .is_err()
            {
                if conn.tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            conn.send(ack);
        });
    }
}
