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

/// An error's text on one line (whitespace runs, newlines included, become one space), for
/// the one-line reasons of [`Error`] and of the backends' logs.
pub fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why the store cannot be opened or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Another hub holds the data directory.
    #[error(
        "data directory {dir} is in use by another apex-hub (lock file {lock} is held): give each hub its own --data-dir"
    )]
    Locked {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The lock file.
        lock: std::path::PathBuf,
    },
    /// The store exists but cannot be read (corrupt, wrong format, permissions).
    #[error("task store {what} is unreadable: {reason}")]
    Unreadable {
        /// File or URL.
        what: String,
        /// The cause, one line.
        reason: String,
    },
    /// Another hub owns the Redis store (one Redis store serves one hub).
    #[error(
        "task store {what} is owned by another hub ({owner}, key apex:store-owner): one Redis store serves one hub"
    )]
    Owned {
        /// The Redis URL.
        what: String,
        /// The owning hub's id.
        owner: String,
    },
    /// The store cannot be reached or written.
    #[error("task store {what} is unavailable: {reason}")]
    Unavailable {
        /// File or URL.
        what: String,
        /// The cause, one line.
        reason: String,
    },
}

/// Filters of `GET /api/v1/tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks in this state.
    pub status: Option<TaskStatus>,
    /// Only tasks of this tool.
    pub tool: Option<String>,
    /// Only tasks whose current or last node is this one.
    pub node_id: Option<String>,
    /// Only tasks of this owner ([`TaskSpec::owner`](crate::model::TaskSpec::owner)).
    pub owner: Option<String>,
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
            && self
                .owner
                .as_ref()
                .is_none_or(|o| t.spec.owner.as_deref() == Some(o.as_str()))
    }
}

/// The order of a task list: by acceptance (`seq`), which is the order of `created_at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// Newest first (`sort=-created_at`, the default).
    #[default]
    NewestFirst,
    /// Oldest first (`sort=created_at`).
    OldestFirst,
}

/// One page of tasks, in the order asked for.
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
    /// The task accepted under this idempotency index key ([`TaskSpec::idempotency_index`]:
    /// the client's key scoped to its owner).
    ///
    /// [`TaskSpec::idempotency_index`]: crate::model::TaskSpec::idempotency_index
    fn find_by_idempotency_key(&self, key: &str) -> Option<TaskId>;
    /// A page of tasks matching `filter` in `order`; `page` counts from 1.
    fn list(&self, filter: &TaskFilter, order: Order, page: usize, limit: usize) -> Page;
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
    /// The durability ticket of the last write of task `id` (see `durable::Durability`): once
    /// that ticket is durable, the task as stored now survives a crash. 0 for stores that
    /// write nothing (memory), or for a task not written since start.
    fn ticket_of(&self, _id: &str) -> u64 {
        0
    }
    /// Drops a task from memory only, writing nothing to durable storage (shared mode: the
    /// task's claim was fenced, another hub owns its stored record). Returns it if it was here.
    fn forget(&mut self, id: &str) -> Option<Task>;
}

/// Tasks in process memory: lost when the hub stops.
///
/// Besides the records, the store keeps listing indexes so that [`TaskStore::list`] never walks
/// every task: sets of task `seq`s (read from either end) for all tasks, per status, per tool, per
/// node, per (status, tool) and per (status, node). Every mutation path (`insert`, `restore`,
/// `update`, `remove_finished_before`) removes a task's old entries and adds its new ones, so
/// each set holds exactly the tasks with that key and its length is the exact `total` of that
/// filter. Invariant: `seq` is unique per task (the engine assigns it from a counter that
/// restore moves past every stored task).
#[derive(Debug, Default)]
pub struct MemoryStore {
    tasks: HashMap<TaskId, Task>,
    by_seq: BTreeMap<u64, TaskId>,
    idempotency: HashMap<String, TaskId>,
    counts: [u64; 7],
    /// Terminal tasks by finish time, for retention.
    finished: BTreeMap<(SystemTime, u64), TaskId>,
    /// Listing indexes.
    index: ListIndex,
}

/// The listing indexes of [`MemoryStore`]: sets of task `seq`s by filter key. Empty sets are
/// dropped from the maps, so nodes and tools with no task left cost nothing.
#[derive(Debug, Default)]
struct ListIndex {
    all: SeqList,
    /// By [`TaskStatus::index`].
    status: [SeqList; 7],
    tool: HashMap<String, SeqList>,
    node: HashMap<String, SeqList>,
    /// By status index, then tool.
    status_tool: [HashMap<String, SeqList>; 7],
    /// By status index, then node.
    status_node: [HashMap<String, SeqList>; 7],
    /// By owner (an owner's own tasks; other filters are checked while walking it).
    owner: HashMap<String, SeqList>,
}

/// What places a task in the indexes; compared before and after an update.
#[derive(Debug, Clone)]
struct IndexKeys {
    seq: u64,
    status: TaskStatus,
    tool: String,
    node: Option<String>,
    owner: Option<String>,
    /// Key in [`MemoryStore::finished`], for terminal tasks.
    finished: Option<(SystemTime, u64)>,
}

impl IndexKeys {
    fn of(t: &Task) -> Self {
        Self {
            seq: t.seq,
            status: t.status,
            tool: t.spec.tool.clone(),
            node: t.node_id.clone(),
            owner: t.spec.owner.clone(),
            finished: Self::finished_of(t),
        }
    }

    fn finished_of(t: &Task) -> Option<(SystemTime, u64)> {
        t.status
            .is_terminal()
            .then(|| (t.finished_at.unwrap_or(t.updated_at), t.seq))
    }

    /// Whether `t` still has these keys (no allocation: most updates change none).
    fn same(&self, t: &Task) -> bool {
        self.seq == t.seq
            && self.status == t.status
            && self.tool == t.spec.tool
            && self.node == t.node_id
            && self.owner == t.spec.owner
            && self.finished == Self::finished_of(t)
    }
}

fn add_to(map: &mut HashMap<String, SeqList>, key: &str, seq: u64) {
    match map.get_mut(key) {
        Some(l) => l.insert(seq),
        None => {
            let mut l = SeqList::default();
            l.insert(seq);
            map.insert(key.to_owned(), l);
        }
    }
}

fn remove_from(map: &mut HashMap<String, SeqList>, key: &str, seq: u64) {
    if let Some(l) = map.get_mut(key) {
        l.remove(seq);
        if l.is_empty() {
            map.remove(key);
        }
    }
}

impl ListIndex {
    fn add(&mut self, k: &IndexKeys) {
        let s = k.status.index();
        self.all.insert(k.seq);
        self.status[s].insert(k.seq);
        add_to(&mut self.tool, &k.tool, k.seq);
        add_to(&mut self.status_tool[s], &k.tool, k.seq);
        if let Some(n) = &k.node {
            add_to(&mut self.node, n, k.seq);
            add_to(&mut self.status_node[s], n, k.seq);
        }
        if let Some(o) = &k.owner {
            add_to(&mut self.owner, o, k.seq);
        }
    }

    fn remove(&mut self, k: &IndexKeys) {
        let s = k.status.index();
        self.all.remove(k.seq);
        self.status[s].remove(k.seq);
        remove_from(&mut self.tool, &k.tool, k.seq);
        remove_from(&mut self.status_tool[s], &k.tool, k.seq);
        if let Some(n) = &k.node {
            remove_from(&mut self.node, n, k.seq);
            remove_from(&mut self.status_node[s], n, k.seq);
        }
        if let Some(o) = &k.owner {
            remove_from(&mut self.owner, o, k.seq);
        }
    }

    /// The set holding exactly the tasks matching `f`, for no filter, one filter, or status
    /// with tool or with node: `Some(None)` when no task has that key. `None` for tool and node
    /// together (no index has that pair), and for an owner with any other filter.
    fn exact(&self, f: &TaskFilter) -> Option<Option<&SeqList>> {
        let s = f.status.map(TaskStatus::index);
        if let Some(o) = f.owner.as_deref() {
            let alone = s.is_none() && f.tool.is_none() && f.node_id.is_none();
            return alone.then(|| self.owner.get(o));
        }
        match (s, f.tool.as_deref(), f.node_id.as_deref()) {
            (None, None, None) => Some(Some(&self.all)),
            (Some(s), None, None) => Some(Some(&self.status[s])),
            (None, Some(t), None) => Some(self.tool.get(t)),
            (None, None, Some(n)) => Some(self.node.get(n)),
            (Some(s), Some(t), None) => Some(self.status_tool[s].get(t)),
            (Some(s), None, Some(n)) => Some(self.status_node[s].get(n)),
            (_, Some(_), Some(_)) => None,
        }
    }

    /// For an owner with other filters: the owner's tasks. For tool and node together (status
    /// optional): the smaller of the two sets that contain
    /// every match, or `None` when either key has no task (then nothing matches).
    fn smallest_superset(&self, f: &TaskFilter) -> Option<&SeqList> {
        if let Some(o) = f.owner.as_deref() {
            return self.owner.get(o);
        }
        let tool = f.tool.as_deref()?;
        let node = f.node_id.as_deref()?;
        let (by_tool, by_node) = match f.status.map(TaskStatus::index) {
            Some(s) => (
                self.status_tool[s].get(tool)?,
                self.status_node[s].get(node)?,
            ),
            None => (self.tool.get(tool)?, self.node.get(node)?),
        };
        Some(if by_tool.len() <= by_node.len() {
            by_tool
        } else {
            by_node
        })
    }
}

/// Largest block of a [`SeqList`]; a fuller block splits in two.
const SEQ_BLOCK: usize = 1024;

/// A set of task `seq`s in ascending order, in blocks of at most [`SEQ_BLOCK`], so that insert
/// and remove cost O(log n + block) and starting a read at the `k`-th newest (or oldest) costs
/// O(n / block) steps over block lengths rather than `k` steps. New tasks (the largest seq)
/// append to the last block.
#[derive(Debug, Default, Clone)]
struct SeqList {
    blocks: Vec<Vec<u64>>,
    len: usize,
}

impl SeqList {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block that holds `seq` or where it belongs (the last block for a seq past the end).
    fn block_of(&self, seq: u64) -> usize {
        let i = self
            .blocks
            .partition_point(|b| b.last().is_some_and(|&last| last < seq));
        i.min(self.blocks.len().saturating_sub(1))
    }

    fn insert(&mut self, seq: u64) {
        if self.blocks.is_empty() {
            self.blocks.push(Vec::new());
        }
        let i = self.block_of(seq);
        let last_block = i + 1 == self.blocks.len();
        let b = &mut self.blocks[i];
        let Err(at) = b.binary_search(&seq) else {
            return;
        };
        b.insert(at, seq);
        self.len += 1;
        if b.len() > SEQ_BLOCK {
            // Appends (new tasks) leave a full block behind; other inserts split it in half.
            let appended = last_block && at + 1 == b.len();
            let tail = b.split_off(if appended { SEQ_BLOCK } else { SEQ_BLOCK / 2 });
            self.blocks.insert(i + 1, tail);
        }
    }

    fn remove(&mut self, seq: u64) {
        if self.blocks.is_empty() {
            return;
        }
        let i = self.block_of(seq);
        let b = &mut self.blocks[i];
        let Ok(at) = b.binary_search(&seq) else {
            return;
        };
        b.remove(at);
        self.len -= 1;
        let left = b.len();
        if left == 0 {
            self.blocks.remove(i);
        } else if left < SEQ_BLOCK / 8
            && self
                .blocks
                .get(i + 1)
                .is_some_and(|next| left + next.len() <= SEQ_BLOCK)
        {
            // Scattered removals (tasks leaving a status) must not fragment the blocks.
            let next = self.blocks.remove(i + 1);
            self.blocks[i].extend(next);
        }
    }

    /// Seqs newest first, after skipping the `skip` newest.
    fn newest_after(&self, skip: usize) -> impl Iterator<Item = u64> + '_ {
        let mut skip = skip;
        let mut end = self.blocks.len();
        while end > 0 && skip >= self.blocks[end - 1].len() {
            skip -= self.blocks[end - 1].len();
            end -= 1;
        }
        self.blocks[..end]
            .iter()
            .rev()
            .enumerate()
            .flat_map(move |(k, b)| {
                let upto = if k == 0 { b.len() - skip } else { b.len() };
                b[..upto].iter().rev().copied()
            })
    }

    /// Seqs oldest first, after skipping the `skip` oldest.
    fn oldest_after(&self, skip: usize) -> impl Iterator<Item = u64> + '_ {
        let mut skip = skip;
        let mut start = 0;
        while start < self.blocks.len() && skip >= self.blocks[start].len() {
            skip -= self.blocks[start].len();
            start += 1;
        }
        self.blocks[start..]
            .iter()
            .enumerate()
            .flat_map(move |(k, b)| {
                let from = if k == 0 { skip } else { 0 };
                b[from..].iter().copied()
            })
    }

    /// Seqs in `order`, after skipping the first `skip` of that order.
    fn in_order(&self, order: Order, skip: usize) -> Box<dyn Iterator<Item = u64> + '_> {
        match order {
            Order::NewestFirst => Box::new(self.newest_after(skip)),
            Order::OldestFirst => Box::new(self.oldest_after(skip)),
        }
    }
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
            if let Some(t) = self.tasks.remove(&id) {
                self.unindex(&IndexKeys::of(&t));
                if let Some(k) = t.spec.idempotency_index()
                    && self.idempotency.get(k.as_ref()) == Some(&id)
                {
                    self.idempotency.remove(k.as_ref());
                }
            }
            ids.push((id, seq));
        }
        ids
    }

    /// Adds a task's entries to `by_seq`, the counts, the retention index and the listing
    /// indexes.
    fn index(&mut self, k: &IndexKeys, id: &TaskId) {
        self.counts[k.status.index()] += 1;
        self.by_seq.insert(k.seq, id.clone());
        if let Some(f) = k.finished {
            self.finished.insert(f, id.clone());
        }
        self.index.add(k);
    }

    /// Removes what [`Self::index`] added for the same keys.
    fn unindex(&mut self, k: &IndexKeys) {
        let c = &mut self.counts[k.status.index()];
        *c = c.saturating_sub(1);
        self.by_seq.remove(&k.seq);
        if let Some(f) = k.finished {
            self.finished.remove(&f);
        }
        self.index.remove(k);
    }

    fn at_seq(&self, seq: u64) -> Option<&Task> {
        self.by_seq.get(&seq).and_then(|id| self.tasks.get(id))
    }
}

impl TaskStore for MemoryStore {
    fn insert(&mut self, task: Task) {
        if let Some(k) = task.spec.idempotency_index() {
            self.idempotency.insert(k.into_owned(), task.id.clone());
        }
        if let Some(old) = self.tasks.remove(&task.id) {
            // The same id again: replace the record, leaving no stale index entry.
            self.unindex(&IndexKeys::of(&old));
        }
        self.index(&IndexKeys::of(&task), &task.id);
        self.tasks.insert(task.id.clone(), task);
    }

    fn get(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id)
    }

    fn update(&mut self, id: &str, f: &mut dyn FnMut(&mut Task)) -> bool {
        let Some(t) = self.tasks.get_mut(id) else {
            return false;
        };
        let before = IndexKeys::of(t);
        f(t);
        if !before.same(t) {
            let after = IndexKeys::of(t);
            let id = t.id.clone();
            self.unindex(&before);
            self.index(&after, &id);
        }
        true
    }

    fn find_by_idempotency_key(&self, key: &str) -> Option<TaskId> {
        self.idempotency.get(key).cloned()
    }

    /// No filter, one filter, or status with tool or with node: read from the index whose
    /// length is the exact total, O(log n + n / 1024 + limit) at any page. Tool and node
    /// together (with or without status) scan the smaller of the two indexes that contain every
    /// match (typically the node's tasks), in order, checking the rest: O(that index), and
    /// the total stays exact. Either order costs the same.
    fn list(&self, filter: &TaskFilter, order: Order, page: usize, limit: usize) -> Page {
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let empty = || Page {
            tasks: Vec::new(),
            total: 0,
        };
        match self.index.exact(filter) {
            Some(None) => empty(),
            Some(Some(seqs)) => Page {
                tasks: seqs
                    .in_order(order, skip)
                    .take(limit)
                    .filter_map(|seq| self.at_seq(seq).cloned())
                    .collect(),
                total: seqs.len(),
            },
            None => {
                let Some(seqs) = self.index.smallest_superset(filter) else {
                    return empty();
                };
                let mut total = 0;
                let mut tasks = Vec::with_capacity(limit.min(1000));
                for t in seqs.in_order(order, 0).filter_map(|seq| self.at_seq(seq)) {
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
        }
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
        if let Some(k) = t.spec.idempotency_index()
            && self.idempotency.get(k.as_ref()).map(String::as_str) == Some(id)
        {
            self.idempotency.remove(k.as_ref());
        }
        if t.status.is_terminal() {
            let at = t.finished_at.unwrap_or(t.updated_at);
            self.finished.remove(&(at, t.seq));
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests;
