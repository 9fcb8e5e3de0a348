//! Shared mode's engine side (several hubs on one Redis, see `durable::shared`): how much work
//! this hub can take ([`Cluster::free_slots`]) and taking in tasks claimed from the shared
//! queues ([`Cluster::adopt`]), and dropping a task whose claim was fenced
//! ([`Cluster::disown`]). A child module of `cluster`, used by `shared_mode.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use apex_protocol::{CancelTool, HubMessage, TaskCancel};

use super::{Cluster, Dialect, NodeState, vcp_request_id};
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
}

impl Cluster {
    /// How many more tasks this hub could start now, per tool and per node (for pinned tasks).
    pub fn free_slots(&self) -> FreeSlots {
        let core = self.shared.core.lock();
        let queued = core.sched.queued_by_tool();
        let mut out = FreeSlots::default();
        for e in core.nodes.values().filter(|e| e.state == NodeState::Online) {
            let free = (e.info.limit as usize).saturating_sub(e.inflight.len());
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
