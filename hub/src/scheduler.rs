//! Placement: which queued task runs next, and on which node. Pure data structure, no I/O and
//! no clock, so every rule is unit-tested here.
//!
//! Rules: a task may go to an online, undrained node that offers its tool (or, if pinned, only
//! to its pinned node) and runs fewer tasks than its limit. Among queued tasks, higher priority
//! goes first, then the older one (acceptance order). Among eligible nodes the least loaded
//! (active / limit) wins; ties go round-robin.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

/// Queue order: higher priority first, then lower acceptance sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    priority: Reverse<i32>,
    seq: u64,
}

impl QueueKey {
    /// Key of a task with this priority and acceptance sequence.
    pub fn new(priority: i32, seq: u64) -> Self {
        Self {
            priority: Reverse(priority),
            seq,
        }
    }
}

/// Where a queued task waits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Tool(String),
    /// Tasks pinned to one node, per tool, so a task for a tool the node lacks never blocks
    /// the node's other pinned tasks.
    Pinned {
        node: String,
        tool: String,
    },
}

#[derive(Debug, Clone)]
struct SchedNode {
    tools: Vec<String>,
    limit: u32,
    active: u32,
    schedulable: bool,
}

impl SchedNode {
    fn has_room(&self) -> bool {
        self.schedulable && self.active < self.limit
    }
}

/// One placement decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The task to send.
    pub task_id: String,
    /// The node to send it to.
    pub node_id: String,
}

/// The queue of waiting tasks and the capacity of every node.
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Queued task ids per lane, best first.
    lanes: HashMap<Lane, BTreeMap<QueueKey, String>>,
    /// task id -> where it waits, to remove it on cancel/timeout.
    index: HashMap<String, (Lane, QueueKey)>,
    nodes: HashMap<String, SchedNode>,
    /// tool -> nodes offering it, in registration order (the round-robin ring).
    tool_nodes: HashMap<String, Vec<String>>,
    rr: usize,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of queued tasks.
    pub fn queued(&self) -> usize {
        self.index.len()
    }

    /// Queues a task. A task already queued is left where it is.
    pub fn enqueue(&mut self, task_id: &str, tool: &str, key: QueueKey, pinned: Option<&str>) {
        if self.index.contains_key(task_id) {
            return;
        }
        let lane = match pinned {
            Some(node) => Lane::Pinned {
                node: node.to_owned(),
                tool: tool.to_owned(),
            },
            None => Lane::Tool(tool.to_owned()),
        };
        self.lanes
            .entry(lane.clone())
            .or_default()
            .insert(key, task_id.to_owned());
        self.index.insert(task_id.to_owned(), (lane, key));
    }

    /// Removes a queued task; returns whether it was queued.
    pub fn dequeue(&mut self, task_id: &str) -> bool {
        let Some((lane, key)) = self.index.remove(task_id) else {
            return false;
        };
        if let Some(q) = self.lanes.get_mut(&lane) {
            q.remove(&key);
            if q.is_empty() {
                self.lanes.remove(&lane);
            }
        }
        true
    }

    /// Adds or replaces a node. `active` is what it already runs (kept across re-registration).
    pub fn upsert_node(&mut self, node_id: &str, tools: &[String], limit: u32, active: u32) {
        self.remove_node(node_id);
        for t in tools {
            self.tool_nodes
                .entry(t.clone())
                .or_default()
                .push(node_id.to_owned());
        }
        self.nodes.insert(
            node_id.to_owned(),
            SchedNode {
                tools: tools.to_vec(),
                limit: limit.max(1),
                active,
                schedulable: true,
            },
        );
    }

    /// Removes a node; its queued pinned tasks stay queued (the node may come back).
    pub fn remove_node(&mut self, node_id: &str) {
        if let Some(n) = self.nodes.remove(node_id) {
            for t in &n.tools {
                if let Some(v) = self.tool_nodes.get_mut(t) {
                    v.retain(|x| x != node_id);
                    if v.is_empty() {
                        self.tool_nodes.remove(t);
                    }
                }
            }
        }
    }

    /// Queued tasks per tool (pinned ones included).
    pub fn queued_by_tool(&self) -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = HashMap::new();
        for (lane, q) in &self.lanes {
            let tool = match lane {
                Lane::Tool(t) | Lane::Pinned { tool: t, .. } => t,
            };
            *out.entry(tool.clone()).or_default() += q.len();
        }
        out
    }

    /// Every queued task: (task id, tool, pinned node), in no particular order.
    pub fn queued_tasks(&self) -> Vec<(String, String, Option<String>)> {
        let mut out = Vec::new();
        for (lane, q) in &self.lanes {
            let (tool, node) = match lane {
                Lane::Tool(t) => (t, None),
                Lane::Pinned { tool, node } => (tool, Some(node)),
            };
            out.extend(
                q.values()
                    .map(|id| (id.clone(), tool.clone(), node.cloned())),
            );
        }
        out
    }

    /// Ids of the queued tasks pinned to `node_id`, best first.
    pub fn pinned_to(&self, node_id: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (lane, q) in &self.lanes {
            if matches!(lane, Lane::Pinned { node, .. } if node == node_id) {
                out.extend(q.values().cloned());
            }
        }
        out
    }

    /// Marks a node as taking new work or not (drain).
    pub fn set_schedulable(&mut self, node_id: &str, schedulable: bool) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.schedulable = schedulable;
        }
    }

    /// A task already running on this node joined its in-flight set (a claim handed over
    /// from another hub): takes one slot.
    pub fn occupy(&mut self, node_id: &str) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.active = n.active.saturating_add(1);
        }
    }

    /// A task on this node ended: frees one slot.
    pub fn release(&mut self, node_id: &str) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.active = n.active.saturating_sub(1);
        }
    }

    /// Tasks running on a node, as the scheduler counts them.
    pub fn active(&self, node_id: &str) -> Option<u32> {
        self.nodes.get(node_id).map(|n| n.active)
    }

    /// Whether any known node offers the tool.
    pub fn has_tool(&self, tool: &str) -> bool {
        self.tool_nodes.contains_key(tool)
    }

    fn pick_node(&self, tool: &str) -> Option<&str> {
        let ring = self.tool_nodes.get(tool)?;
        let len = ring.len();
        let mut best: Option<(&str, u64, u64)> = None; // (id, active, limit)
        for i in 0..len {
            let id = &ring[(self.rr + i) % len];
            let Some(n) = self.nodes.get(id) else {
                continue;
            };
            if !n.has_room() {
                continue;
            }
            let (a, l) = (n.active as u64, n.limit as u64);
            // Compare load a/l < ba/bl without floating point.
            if best.is_none_or(|(_, ba, bl)| a * bl < ba * l) {
                best = Some((id, a, l));
            }
        }
        best.map(|(id, _, _)| id)
    }

    /// Places as many queued tasks as capacity allows, at most `max`, best task first.
    pub fn assign(&mut self, max: usize) -> Vec<Assignment> {
        let mut out = Vec::new();
        while out.len() < max {
            // Find the best head among lanes that can be placed now.
            let mut best: Option<(QueueKey, Lane, String)> = None;
            for (lane, q) in &self.lanes {
                let Some(key) = q.first_key_value().map(|(k, _)| k) else {
                    continue;
                };
                if best.as_ref().is_some_and(|(bk, _, _)| key >= bk) {
                    continue;
                }
                let node = match lane {
                    Lane::Tool(tool) => self.pick_node(tool).map(str::to_owned),
                    Lane::Pinned { node, tool } => self
                        .nodes
                        .get(node)
                        .filter(|n| n.has_room() && n.tools.contains(tool))
                        .map(|_| node.clone()),
                };
                if let Some(node) = node {
                    best = Some((*key, lane.clone(), node));
                }
            }
            let Some((key, lane, node_id)) = best else {
                break;
            };
            let Some(q) = self.lanes.get_mut(&lane) else {
                break;
            };
            let Some(task_id) = q.remove(&key) else {
                break;
            };
            if q.is_empty() {
                self.lanes.remove(&lane);
            }
            self.index.remove(&task_id);
            if let Some(n) = self.nodes.get_mut(&node_id) {
                n.active += 1;
            }
            self.rr = self.rr.wrapping_add(1);
            out.push(Assignment { task_id, node_id });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn higher_priority_then_older_goes_first() {
        let mut s = Scheduler::new();
        s.enqueue("low-old", "t", QueueKey::new(1, 1), None);
        s.enqueue("high-new", "t", QueueKey::new(9, 3), None);
        s.enqueue("high-old", "t", QueueKey::new(9, 2), None);
        s.upsert_node("n", &tools(&["t"]), 1, 0);
        let order: Vec<_> = (0..3)
            .map(|_| {
                let a = s.assign(1);
                s.release("n");
                a[0].task_id.clone()
            })
            .collect();
        assert_eq!(order, ["high-old", "high-new", "low-old"]);
    }

    #[test]
    fn respects_limits_and_waits_without_eligible_node() {
        let mut s = Scheduler::new();
        for i in 0..5 {
            s.enqueue(&format!("t{i}"), "echo", QueueKey::new(5, i), None);
        }
        assert!(s.assign(10).is_empty(), "no node yet");
        s.upsert_node("a", &tools(&["echo"]), 2, 0);
        assert_eq!(s.assign(10).len(), 2);
        assert_eq!(s.queued(), 3);
        s.release("a");
        assert_eq!(s.assign(10).len(), 1);
    }

    #[test]
    fn least_loaded_then_round_robin() {
        let mut s = Scheduler::new();
        s.upsert_node("a", &tools(&["t"]), 10, 3);
        s.upsert_node("b", &tools(&["t"]), 10, 0);
        s.upsert_node("c", &tools(&["t"]), 10, 0);
        for i in 0..6 {
            s.enqueue(&format!("t{i}"), "t", QueueKey::new(5, i), None);
        }
        let got = s.assign(6);
        let count = |n: &str| got.iter().filter(|a| a.node_id == n).count();
        // b and c catch up with a first, then all share.
        assert_eq!(count("a"), 0);
        assert_eq!(count("b"), 3);
        assert_eq!(count("c"), 3);
    }

    #[test]
    fn drained_node_and_tool_mismatch_get_nothing() {
        let mut s = Scheduler::new();
        s.upsert_node("a", &tools(&["x"]), 10, 0);
        s.upsert_node("b", &tools(&["y"]), 10, 0);
        s.set_schedulable("b", false);
        s.enqueue("1", "y", QueueKey::new(5, 1), None);
        s.enqueue("2", "x", QueueKey::new(5, 2), None);
        let got = s.assign(10);
        assert_eq!(
            got,
            vec![Assignment {
                task_id: "2".into(),
                node_id: "a".into()
            }]
        );
        s.set_schedulable("b", true);
        assert_eq!(s.assign(10)[0].node_id, "b");
    }

    #[test]
    fn pinned_tasks_run_only_on_their_node() {
        let mut s = Scheduler::new();
        s.upsert_node("a", &tools(&["t"]), 10, 0);
        s.enqueue("p", "t", QueueKey::new(5, 1), Some("b"));
        assert!(s.assign(10).is_empty());
        s.upsert_node("b", &tools(&["t"]), 10, 0);
        assert_eq!(s.assign(10)[0].node_id, "b");
    }

    #[test]
    fn a_pinned_task_for_a_missing_tool_does_not_block_others() {
        let mut s = Scheduler::new();
        s.upsert_node("n", &tools(&["echo"]), 10, 0);
        s.enqueue("blocker", "missing", QueueKey::new(9, 1), Some("n"));
        s.enqueue("echo", "echo", QueueKey::new(1, 2), Some("n"));
        let got = s.assign(10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].task_id, "echo");
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn dequeue_removes_and_requeue_keeps_age() {
        let mut s = Scheduler::new();
        s.enqueue("old", "t", QueueKey::new(5, 1), None);
        s.enqueue("new", "t", QueueKey::new(5, 2), None);
        assert!(s.dequeue("old"));
        assert!(!s.dequeue("old"));
        s.enqueue("old", "t", QueueKey::new(5, 1), None);
        s.upsert_node("n", &tools(&["t"]), 1, 0);
        assert_eq!(s.assign(1)[0].task_id, "old");
    }

    #[test]
    fn node_reregistration_keeps_active_count() {
        let mut s = Scheduler::new();
        s.upsert_node("n", &tools(&["t"]), 1, 1);
        s.enqueue("x", "t", QueueKey::new(5, 1), None);
        assert!(s.assign(1).is_empty(), "node is full");
        s.release("n");
        assert_eq!(s.assign(1).len(), 1);
        assert_eq!(s.active("n"), Some(1));
    }
}
