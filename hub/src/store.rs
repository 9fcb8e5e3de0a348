//! The task store: every task record and its events, behind the [`TaskStore`] trait.
//!
//! The cluster engine calls the store while it holds its state lock, so every method is
//! synchronous and must not block on I/O for long: durable backends (embedded, Redis) are to
//! buffer writes and group-commit them, handing the HTTP layer a durability ticket to await.
//! [`MemoryStore`] is the in-process index every store keeps; the durable stores
//! ([`crate::durable`]) wrap it and mirror every change to disk or Redis.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use apex_protocol::{NodeType, ToolSpec};
use serde::{Deserialize, Serialize};

use crate::model::{Task, TaskEvent, TaskId, TaskStatus};

/// Filters of `GET /api/v1/tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks in this state.
    pub status: Option<TaskStatus>,
    /// Only tasks of this tool.
    pub tool: Option<String>,
    /// Only tasks whose current or last node is this one.
    pub node_id: Option<String>,
}

impl TaskFilter {
    /// Whether `t` passes the filter.
    pub fn matches(&self, t: &Task) -> bool {
        self.status.is_none_or(|s| t.status == s)
            && self.tool.as_ref().is_none_or(|x| *x == t.spec.tool)
            && self
                .node_id
                .as_ref()
                .is_none_or(|n| t.node_id.as_deref() == Some(n.as_str()))
    }
}

/// One page of tasks, newest first.
#[derive(Debug, Clone)]
pub struct Page {
    /// The tasks of the page.
    pub tasks: Vec<Task>,
    /// Tasks matching the filter, over all pages.
    pub total: usize,
}

/// A node of the registry snapshot: what it declared at its last registration. Written at each
/// registration; after a restart the hub lists these nodes offline until they reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `worker`, `companion` or `custom`.
    pub node_type: NodeType,
    /// Whether it speaks the VCP dialect.
    pub vcp: bool,
    /// Node software version.
    pub version: Option<String>,
    /// Tool names.
    pub tools: Vec<String>,
    /// Tool descriptions.
    pub tool_specs: Vec<ToolSpec>,
    /// Concurrency limit.
    pub limit: u32,
    /// Whether a VCP node accepts `cancel_tool`.
    pub cancel_tool: bool,
}

/// Storage of task records.
pub trait TaskStore: Send + 'static {
    /// Stores a new task.
    fn insert(&mut self, task: Task);
    /// A task by id.
    fn get(&self, id: &str) -> Option<&Task>;
    /// Applies `f` to a task and persists the change. Returns false for an unknown id.
    fn update(&mut self, id: &str, f: &mut dyn FnMut(&mut Task)) -> bool;
    /// The task accepted under this idempotency key.
    fn find_by_idempotency_key(&self, key: &str) -> Option<TaskId>;
    /// A page of tasks matching `filter`, newest first; `page` counts from 1.
    fn list(&self, filter: &TaskFilter, page: usize, limit: usize) -> Page;
    /// Events of a task with `seq` greater than `after`.
    fn events_after(&self, id: &str, after: u32) -> Vec<TaskEvent>;
    /// How many tasks are in each state, indexed by [`TaskStatus::index`].
    fn counts(&self) -> [u64; 7];
    /// Puts back a task loaded from durable storage at start (not written again).
    fn restore(&mut self, task: Task) {
        self.insert(task);
    }
    /// Removes terminal tasks (and their events) that finished before `cutoff`, from memory and
    /// from durable storage. Returns how many.
    fn collect_finished_before(&mut self, cutoff: SystemTime) -> usize;
    /// Records a node in the registry snapshot (durable stores only; memory keeps none).
    fn put_node(&mut self, _node: NodeRecord) {}
    /// Drops a task from memory only, writing nothing to durable storage (shared mode: the
    /// task's claim was fenced, another hub owns its stored record). Returns it if it was here.
    fn forget(&mut self, id: &str) -> Option<Task>;
}

/// Tasks in process memory: lost when the hub stops.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tasks: HashMap<TaskId, Task>,
    by_seq: BTreeMap<u64, TaskId>,
    idempotency: HashMap<String, TaskId>,
    counts: [u64; 7],
    /// Terminal tasks by finish time, for retention.
    finished: BTreeMap<(SystemTime, u64), TaskId>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes terminal tasks that finished before `cutoff`; returns their ids and sequence
    /// numbers.
    pub fn remove_finished_before(&mut self, cutoff: SystemTime) -> Vec<(TaskId, u64)> {
        let keep = self.finished.split_off(&(cutoff, 0));
        let gone = std::mem::replace(&mut self.finished, keep);
        let mut ids = Vec::with_capacity(gone.len());
        for ((_, seq), id) in gone {
            self.by_seq.remove(&seq);
            if let Some(t) = self.tasks.remove(&id) {
                self.counts[t.status.index()] -= 1;
                if let Some(k) = &t.spec.idempotency_key
                    && self.idempotency.get(k) == Some(&id)
                {
                    self.idempotency.remove(k);
                }
            }
            ids.push((id, seq));
        }
        ids
    }

    fn index_finished(&mut self, t: &Task) {
        if t.status.is_terminal() {
            let at = t.finished_at.unwrap_or(t.updated_at);
            self.finished.insert((at, t.seq), t.id.clone());
        }
    }
}

impl TaskStore for MemoryStore {
    fn insert(&mut self, task: Task) {
        if let Some(k) = &task.spec.idempotency_key {
            self.idempotency.insert(k.clone(), task.id.clone());
        }
        self.counts[task.status.index()] += 1;
        self.by_seq.insert(task.seq, task.id.clone());
        self.index_finished(&task);
        self.tasks.insert(task.id.clone(), task);
    }

    fn get(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id)
    }

    fn update(&mut self, id: &str, f: &mut dyn FnMut(&mut Task)) -> bool {
        let Some(t) = self.tasks.get_mut(id) else {
            return false;
        };
        let before = t.status;
        f(t);
        if t.status != before {
            self.counts[before.index()] -= 1;
            self.counts[t.status.index()] += 1;
            if t.status.is_terminal() && !before.is_terminal() {
                let at = t.finished_at.unwrap_or(t.updated_at);
                self.finished.insert((at, t.seq), t.id.clone());
            }
        }
        true
    }

    fn find_by_idempotency_key(&self, key: &str) -> Option<TaskId> {
        self.idempotency.get(key).cloned()
    }

    fn list(&self, filter: &TaskFilter, page: usize, limit: usize) -> Page {
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let mut total = 0;
        let mut tasks = Vec::with_capacity(limit.min(1000));
        for id in self.by_seq.values().rev() {
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            if !filter.matches(t) {
                continue;
            }
            if total >= skip && tasks.len() < limit {
                tasks.push(t.clone());
            }
            total += 1;
        }
        Page { tasks, total }
    }

    fn events_after(&self, id: &str, after: u32) -> Vec<TaskEvent> {
        self.tasks
            .get(id)
            .map(|t| t.events.iter().filter(|e| e.seq > after).cloned().collect())
            .unwrap_or_default()
    }

    fn counts(&self) -> [u64; 7] {
        self.counts
    }

    fn collect_finished_before(&mut self, cutoff: SystemTime) -> usize {
        self.remove_finished_before(cutoff).len()
    }

    fn forget(&mut self, id: &str) -> Option<Task> {
        let t = self.tasks.remove(id)?;
        self.by_seq.remove(&t.seq);
        self.counts[t.status.index()] -= 1;
        if let Some(k) = &t.spec.idempotency_key
            && self.idempotency.get(k).map(String::as_str) == Some(id)
        {
            self.idempotency.remove(k);
        }
        if t.status.is_terminal() {
            let at = t.finished_at.unwrap_or(t.updated_at);
            self.finished.remove(&(at, t.seq));
        }
        Some(t)
    }
}
