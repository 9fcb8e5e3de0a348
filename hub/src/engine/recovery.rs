//! Recovery after a restart, and retention. A child module of the engine, so it works on the
//! engine's state directly while `lifecycle` stays focused on the live task lifecycle.
//!
//! At start the hub loads every task from its store ([`Cluster::restore`]): queued tasks go
//! back in the queue, terminal tasks stay readable, and tasks that were assigned or running
//! wait in `Core::recovering` for their node. A node that registers listing a task in
//! `inflight` reclaims it (same attempt: its result is accepted by `fence`); one that registers
//! without `inflight` reclaims it too, and its first heartbeat decides whether the assignment
//! is sent again (same attempt; only if the heartbeat's `stats.activeTasks` is 0, see
//! [`Cluster::heartbeat`]); one that lists `inflight` without it has it requeued. When the
//! grace period ends ([`Cluster::end_recovery_grace`]) whatever is left is requeued for
//! `attempt + 1` (or fails with `node_lost` after `max_attempts`).
//!
//! Chat calls of node-hosted models (tasks on an `llm.chat@<model>` lane) are not recovered:
//! their caller was an HTTP stream of the process that died, so nobody would read the answer.
//! Every unfinished one ends `failed` with `caller_gone` at restore (its terminal event is
//! stored), and the node it was on gets `task_cancel` (reason `caller_gone`) when it registers
//! again within the grace period (unless its `inflight` leaves the task out).
//!
//! With a durable store, an assignment frame leaves only once the task's `assigned` state is
//! durable (the gate below), so after a crash every task a node holds is one the store has as
//! assigned to that node: the node reclaims it instead of the task running twice.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use apex_protocol::{ErrorInfo, HubMessage, TaskCancel, codes};
use tokio::sync::mpsc;

use super::{
    Cluster, ConnHandle, Core, Dialect, NodeEntry, NodeInfo, NodeState, Outbound, Shared,
    is_llm_lane,
};
use crate::durable::{DURABLE_WAIT, Durability};
use crate::model::{Outcome, Task, TaskStatus};
use crate::scheduler::QueueKey;
use crate::store::NodeRecord;

/// What [`Cluster::restore`] put back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Tasks back in the queue.
    pub queued: usize,
    /// Tasks waiting for their node to reclaim them.
    pub awaiting_node: usize,
    /// Finished tasks kept for reading.
    pub finished: usize,
    /// Unfinished chat calls ended `failed` with `caller_gone` (their caller died with the
    /// previous process).
    pub caller_gone: usize,
}

/// An assignment frame held until the store has the assignment.
pub(super) struct Gated {
    ticket: u64,
    conn: ConnHandle,
    node_id: String,
    frame: HubMessage,
}

type GateRx = Option<mpsc::UnboundedReceiver<Gated>>;

/// The gate's channel, for stores that mirror to durable storage inside a Tokio runtime.
pub(super) fn gate_channel(d: &Durability) -> (Option<mpsc::UnboundedSender<Gated>>, GateRx) {
    if !d.is_mirrored() || tokio::runtime::Handle::try_current().is_err() {
        return (None, None);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    (Some(tx), Some(rx))
}

/// Releases gated frames in order as their tickets become durable; a connection whose queue
/// is full by then loses its node (its tasks migrate), as a direct send would.
async fn gate_loop(
    weak: Weak<Shared>,
    durability: Arc<Durability>,
    mut rx: mpsc::UnboundedReceiver<Gated>,
) {
    while let Some(g) = rx.recv().await {
        while !durability.is_durable(g.ticket) && !g.conn.tx.is_closed() {
            if durability.wait(g.ticket, DURABLE_WAIT).await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if g.conn.tx.try_send(Outbound::Msg(g.frame)).is_err() {
            g.conn.kill.notify_one();
            let Some(shared) = weak.upgrade() else {
                return;
            };
            Cluster { shared }.lose_node(&g.node_id, g.conn.id, "outbound queue full or closed");
        }
    }
}

impl Cluster {
    pub(super) fn start_gate(&self, rx: GateRx) {
        if let Some(rx) = rx {
            tokio::spawn(gate_loop(
                Arc::downgrade(&self.shared),
                self.shared.durability.clone(),
                rx,
            ));
        }
    }

    /// Sends an assignment frame now (memory store) or once the assignment is durable. False
    /// if the connection cannot take it now.
    pub(super) fn send_assignment(
        &self,
        conn: &ConnHandle,
        node_id: &str,
        frame: HubMessage,
    ) -> bool {
        let Some(gate) = &self.shared.gate else {
            return conn.tx.try_send(Outbound::Msg(frame)).is_ok();
        };
        let ticket = self.shared.durability.ticket();
        if self.shared.durability.is_durable(ticket) {
            return conn.tx.try_send(Outbound::Msg(frame)).is_ok();
        }
        gate.send(Gated {
            ticket,
            conn: conn.clone(),
            node_id: node_id.to_owned(),
            frame,
        })
        .is_ok()
    }

    /// Puts back the node registry snapshot at start: every node is listed offline (and can be
    /// pinned) until it reconnects.
    pub fn restore_nodes(&self, nodes: Vec<NodeRecord>) {
        let mut core = self.shared.core.lock();
        let now = SystemTime::now();
        for n in nodes {
            if core.nodes.contains_key(&n.id) {
                continue;
            }
            let info = NodeInfo {
                name: n.name,
                node_type: n.node_type,
                dialect: if n.vcp { Dialect::Vcp } else { Dialect::Native },
                version: n.version,
                tools: n.tools,
                tool_specs: n.tool_specs,
                limit: n.limit,
                stats: None,
                cancel_tool: n.cancel_tool,
                // Declared again at registration; an offline node runs nothing.
                async_tools: Default::default(),
                // Hosted models are announced again at registration; an offline node serves none.
                models: Vec::new(),
            };
            core.nodes.insert(
                n.id.clone(),
                NodeEntry {
                    id: n.id,
                    info,
                    state: NodeState::Offline,
                    conn: None,
                    inflight: Default::default(),
                    standby: None,
                    awaiting_heartbeat: None,
                    ips: None,
                    connected_at: now,
                    last_heartbeat_at: None,
                    disconnected_at: Some(now),
                    completed: 0,
                    failed: 0,
                },
            );
        }
    }

    /// Writes a node's registration to the store's registry snapshot (from `bind`).
    pub(super) fn snapshot_node(core: &mut Core, node_id: &str) {
        let Some(e) = core.nodes.get(node_id) else {
            return;
        };
        let rec = NodeRecord {
            id: e.id.clone(),
            name: e.info.name.clone(),
            node_type: e.info.node_type,
            vcp: e.info.dialect == Dialect::Vcp,
            version: e.info.version.clone(),
            tools: e.info.tools.clone(),
            tool_specs: e.info.tool_specs.clone(),
            limit: e.info.limit,
            cancel_tool: e.info.cancel_tool,
        };
        core.store.put_node(rec);
    }

    /// The durability tickets of the engine's store.
    pub fn durability(&self) -> &Arc<Durability> {
        &self.shared.durability
    }

    /// Puts back tasks loaded from the store at start (before any node connects). Event
    /// sequence numbers continue from the stored events. Unfinished chat calls (tasks on an
    /// `llm.chat@<model>` lane) end `failed` with `caller_gone` instead (see the module docs).
    pub fn restore(&self, mut tasks: Vec<Task>) -> Restored {
        if !tasks.is_sorted_by_key(|t| t.seq) {
            tasks.sort_unstable_by_key(|t| t.seq);
        }
        let mut out = Restored::default();
        let mut core = self.shared.core.lock();
        let now_i = Instant::now();
        let now = SystemTime::now();
        let mut recovering: HashMap<String, Vec<String>> = HashMap::new();
        let mut orphaned: Vec<String> = Vec::new();
        for t in tasks {
            core.next_seq = core.next_seq.max(t.seq + 1);
            if !t.status.is_terminal() && is_llm_lane(&t.spec.tool) {
                // A chat call: its caller's stream died with the previous process.
                if matches!(t.status, TaskStatus::Assigned | TaskStatus::Running)
                    && let Some(node) = &t.node_id
                {
                    core.caller_gone
                        .entry(node.clone())
                        .or_default()
                        .push((t.id.clone(), t.attempt));
                }
                orphaned.push(t.id.clone());
                core.store.restore(t);
                continue;
            }
            if !t.status.is_terminal() {
                let due = Duration::try_from_secs_f64(t.spec.timeout_seconds)
                    .ok()
                    .and_then(|d| t.created_at.checked_add(d))
                    .unwrap_or(now + Duration::from_secs(10 * 365 * 86_400));
                let left = due.duration_since(now).unwrap_or(Duration::ZERO);
                let deadline = now_i + left;
                core.deadlines.insert((deadline, t.seq), t.id.clone());
                core.deadline_of.insert(t.id.clone(), (deadline, t.seq));
            }
            match (t.status, &t.node_id) {
                (TaskStatus::Assigned | TaskStatus::Running, Some(node)) => {
                    recovering
                        .entry(node.clone())
                        .or_default()
                        .push(t.id.clone());
                    out.awaiting_node += 1;
                }
                (s, _) if s.is_terminal() => out.finished += 1,
                _ => {
                    core.sched.enqueue(
                        &t.id,
                        &t.spec.tool,
                        QueueKey::new(t.spec.priority, t.seq),
                        t.spec.pinned_node.as_deref(),
                    );
                    out.queued += 1;
                }
            }
            let mut t = t;
            if !t.status.is_terminal() && t.node_id.is_none() {
                t.status = TaskStatus::Queued;
            }
            core.store.restore(t);
        }
        core.recovering = recovering;
        out.caller_gone = orphaned.len();
        for id in orphaned {
            let err = ErrorInfo::new(
                codes::CALLER_GONE,
                "the chat call's caller was lost with the hub process before a restart; not run again",
            );
            self.finish(&mut core, &id, Outcome::Failed(err));
        }
        if out.caller_gone > 0 {
            tracing::info!(
                tasks = out.caller_gone,
                "unfinished chat calls ended caller_gone: their callers died with the previous hub process"
            );
        }
        out
    }

    /// Called when native node `node_id` binds `conn`: sends `task_cancel` (reason
    /// `caller_gone`) for each chat call ended `caller_gone` at restore that was on this node,
    /// unless the node's `inflight` (`holds`) leaves it out.
    pub(super) fn cancel_caller_gone(
        &self,
        core: &mut Core,
        node_id: &str,
        conn: &ConnHandle,
        holds: Option<&[String]>,
    ) {
        let Some(calls) = core.caller_gone.remove(node_id) else {
            return;
        };
        for (task_id, attempt) in calls {
            if holds.is_some_and(|h| !h.contains(&task_id)) {
                continue;
            }
            tracing::info!(
                node_id,
                task_id,
                "telling the node to stop a chat call whose caller is gone"
            );
            conn.send(TaskCancel {
                task_id,
                attempt: Some(attempt),
                reason: codes::CALLER_GONE.to_owned(),
            });
        }
    }

    /// Called from `bind`: moves the tasks recovered for `node_id` onto the node when it holds
    /// them (`holds` lists them, or is `None`: then they are also added to `held`, to wait for
    /// the node's first heartbeat like any kept task), and queues the others for migration.
    /// Returns the node's in-flight count.
    pub(super) fn reclaim(
        &self,
        core: &mut Core,
        node_id: &str,
        holds: Option<&[String]>,
        held: &mut Vec<String>,
        to_migrate: &mut Vec<String>,
        active: u32,
    ) -> u32 {
        let Some(ids) = core.recovering.remove(node_id) else {
            return active;
        };
        let mut reclaimed = 0usize;
        let Core { store, nodes, .. } = core;
        let Some(e) = nodes.get_mut(node_id) else {
            return active;
        };
        for id in ids {
            let live = store.get(&id).is_some_and(|t| {
                matches!(t.status, TaskStatus::Assigned | TaskStatus::Running)
                    && t.node_id.as_deref() == Some(node_id)
            });
            if !live {
                continue;
            }
            match holds {
                None => {
                    e.inflight.insert(id.clone());
                    held.push(id);
                    reclaimed += 1;
                }
                Some(h) if h.contains(&id) => {
                    e.inflight.insert(id);
                    reclaimed += 1;
                }
                Some(_) => to_migrate.push(id),
            }
        }
        if reclaimed > 0 {
            tracing::info!(
                node_id,
                reclaimed,
                "node reclaimed tasks after a hub restart"
            );
        }
        e.inflight.len() as u32
    }

    /// Ends the recovery grace period: every recovered task no node reclaimed goes back to the
    /// queue for `attempt + 1` (or fails with `node_lost`). Returns how many.
    pub fn end_recovery_grace(&self) -> usize {
        let mut core = self.shared.core.lock();
        // Nodes that come back later are not told about chat calls ended `caller_gone`.
        core.caller_gone.clear();
        let left: Vec<(String, Vec<String>)> = core.recovering.drain().collect();
        let mut n = 0;
        for (node, ids) in left {
            for id in ids {
                n += 1;
                self.migrate(
                    &mut core,
                    &id,
                    &node,
                    "not reclaimed within the recovery grace period after a hub restart",
                    true,
                );
            }
        }
        self.schedule(&mut core);
        n
    }

    /// Removes finished tasks older than `retention` from memory and from the store. Returns
    /// how many.
    pub fn collect_finished(&self, retention: Duration) -> usize {
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.shared
            .core
            .lock()
            .store
            .collect_finished_before(cutoff)
    }
}
