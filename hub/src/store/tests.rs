#![allow(clippy::unwrap_used)]
//! Store tests: the indexed [`MemoryStore::list`] against a naive filter over every task, on
//! random sequences of inserts, updates, restores and retention; plus an ignored timing run
//! over 1,000,000 tasks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;

use serde_json::json;

use super::*;
use crate::model::{Task, TaskSpec, TaskStatus};

fn task(seq: u64, tool: &str, status: TaskStatus, node: Option<&str>, at: SystemTime) -> Task {
    Task {
        id: format!("t-{seq}"),
        seq,
        spec: TaskSpec {
            tool: tool.to_owned(),
            args: json!({}),
            description: None,
            priority: 0,
            timeout_seconds: 60.0,
            max_attempts: 3,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            // Owners by seq: three of every four tasks have one of two owners.
            owner: OWNERS.get((seq % 4) as usize).map(|o| (*o).to_owned()),
        },
        status,
        attempt: u32::from(node.is_some()),
        node_id: node.map(str::to_owned),
        progress: 0.0,
        result: None,
        error: None,
        message: None,
        created_at: at,
        updated_at: at,
        started_at: None,
        finished_at: status.is_terminal().then_some(at),
        events: Vec::new(),
    }
}

/// Builds a store of `n` tasks over 10,000 nodes and 20 tools, mostly finished.
fn big_store(n: u64) -> MemoryStore {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let tools: Vec<String> = (0..20).map(|i| format!("tool-{i}")).collect();
    let nodes: Vec<String> = (0..10_000).map(|i| format!("node-{i}")).collect();
    let mut s = MemoryStore::new();
    for seq in 1..=n {
        let status = if seq > n - 10_000 {
            TaskStatus::Queued
        } else if seq > n - 30_000 {
            TaskStatus::Running
        } else if seq % 20 == 0 {
            TaskStatus::Failed
        } else {
            TaskStatus::Succeeded
        };
        let node = (status != TaskStatus::Queued).then(|| nodes[(seq % 10_000) as usize].as_str());
        let at = t0 + Duration::from_millis(seq);
        s.insert(task(seq, &tools[(seq % 20) as usize], status, node, at));
    }
    s
}

/// Times `list` over 1,000,000 tasks. Run with
/// `cargo test -p apex-hub --release --lib store::tests::list_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing run over 1,000,000 tasks; prints figures"]
fn list_timing() {
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS"))
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    println!("before: {}", rss());
    let began = Instant::now();
    let s = big_store(1_000_000);
    println!("built 1,000,000 tasks in {:?}; {}", began.elapsed(), rss());
    let f = |status: Option<TaskStatus>, tool: Option<&str>, node: Option<&str>| TaskFilter {
        status,
        tool: tool.map(str::to_owned),
        node_id: node.map(str::to_owned),
        owner: None,
    };
    let cases: Vec<(&str, TaskFilter, usize, usize)> = vec![
        ("no filter, page 1 of 50", f(None, None, None), 1, 50),
        ("no filter, page 5000 of 20", f(None, None, None), 5000, 20),
        (
            "no filter, page 49999 of 20",
            f(None, None, None),
            49_999,
            20,
        ),
        (
            "status=queued, page 1",
            f(Some(TaskStatus::Queued), None, None),
            1,
            50,
        ),
        (
            "status=succeeded, page 1",
            f(Some(TaskStatus::Succeeded), None, None),
            1,
            50,
        ),
        (
            "status=succeeded, page 5000 of 20",
            f(Some(TaskStatus::Succeeded), None, None),
            5000,
            20,
        ),
        ("tool=tool-7, page 1", f(None, Some("tool-7"), None), 1, 50),
        (
            "node_id=node-42, page 1",
            f(None, None, Some("node-42")),
            1,
            50,
        ),
        (
            "status=failed&tool=tool-0, page 1",
            f(Some(TaskStatus::Failed), Some("tool-0"), None),
            1,
            50,
        ),
        (
            "status=succeeded&node_id=node-42",
            f(Some(TaskStatus::Succeeded), None, Some("node-42")),
            1,
            50,
        ),
        (
            "tool=tool-2&node_id=node-42",
            f(None, Some("tool-2"), Some("node-42")),
            1,
            50,
        ),
        (
            "all three",
            f(Some(TaskStatus::Succeeded), Some("tool-2"), Some("node-42")),
            1,
            50,
        ),
        (
            "status=failed&tool=tool-3 (none)",
            f(Some(TaskStatus::Failed), Some("tool-3"), None),
            1,
            50,
        ),
    ];
    for (name, filter, page, limit) in cases {
        let mut times = Vec::new();
        let mut total = 0;
        for _ in 0..7 {
            let t = Instant::now();
            let p = s.list(&filter, Order::NewestFirst, page, limit);
            times.push(t.elapsed());
            total = p.total;
        }
        times.sort();
        println!(
            "{name:40} total {total:>8}  median {:?}",
            times[times.len() / 2]
        );
    }
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    /// A new task (`restore` when the flag is set).
    Insert {
        tool: usize,
        node: Option<usize>,
        status: usize,
        restore: bool,
    },
    /// The same id stored again with other fields.
    Replace {
        pick: usize,
        tool: usize,
        node: Option<usize>,
        status: usize,
    },
    /// `update` of an existing task; `None` fields stay.
    Update {
        pick: usize,
        status: Option<usize>,
        node: Option<Option<usize>>,
        tool: Option<usize>,
    },
    /// `update` of an unknown id.
    UpdateUnknown,
    /// Retention with a cutoff this many ms after the start.
    Collect { cutoff_ms: u64 },
    /// Compare every filter and several pages against the naive list.
    Check,
}

const TOOLS: [&str; 3] = ["echo", "sleep", "fetch"];
const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];
const OWNERS: [&str; 3] = ["user:a", "key:b", "user:a"];

fn op() -> impl Strategy<Value = Op> {
    let status = 0..7usize;
    let node = proptest::option::of(0..NODES.len());
    prop_oneof![
        5 => (0..TOOLS.len(), node.clone(), status.clone(), any::<bool>()).prop_map(
            |(tool, node, status, restore)| Op::Insert { tool, node, status, restore }
        ),
        1 => (any::<usize>(), 0..TOOLS.len(), node.clone(), status.clone()).prop_map(
            |(pick, tool, node, status)| Op::Replace { pick, tool, node, status }
        ),
        6 => (
            any::<usize>(),
            proptest::option::of(status),
            proptest::option::of(node),
            proptest::option::of(0..TOOLS.len()),
        )
            .prop_map(|(pick, status, node, tool)| Op::Update { pick, status, node, tool }),
        1 => Just(Op::UpdateUnknown),
        1 => (0..400u64).prop_map(|cutoff_ms| Op::Collect { cutoff_ms }),
        1 => Just(Op::Check),
    ]
}

/// The list a store must return, from a plain map of every task.
fn naive(
    model: &BTreeMap<u64, Task>,
    f: &TaskFilter,
    order: Order,
    page: usize,
    limit: usize,
) -> (Vec<TaskId>, usize) {
    let mut all: Vec<&Task> = model.values().filter(|t| f.matches(t)).collect();
    if order == Order::NewestFirst {
        all.reverse();
    }
    let skip = (page - 1) * limit;
    let ids = all
        .iter()
        .skip(skip)
        .take(limit)
        .map(|t| t.id.clone())
        .collect();
    (ids, all.len())
}

fn check_all(s: &MemoryStore, model: &BTreeMap<u64, Task>) {
    let statuses = std::iter::once(None).chain(TaskStatus::ALL.into_iter().map(Some));
    for status in statuses {
        for tool in std::iter::once(None).chain(TOOLS.iter().chain(&["nope"]).map(|t| Some(*t))) {
            for node in std::iter::once(None).chain(NODES.iter().chain(&["nope"]).map(|n| Some(*n)))
            {
                for owner in [None, Some("user:a"), Some("key:b"), Some("nope")] {
                    let f = TaskFilter {
                        status,
                        tool: tool.map(str::to_owned),
                        node_id: node.map(str::to_owned),
                        owner: owner.map(str::to_owned),
                    };
                    for order in [Order::NewestFirst, Order::OldestFirst] {
                        for (page, limit) in [(1, 1000), (1, 3), (2, 3), (5, 2), (40, 1), (1000, 7)]
                        {
                            let p = s.list(&f, order, page, limit);
                            let got: Vec<TaskId> = p.tasks.iter().map(|t| t.id.clone()).collect();
                            let (want, total) = naive(model, &f, order, page, limit);
                            assert_eq!(p.total, total, "total of {f:?}");
                            assert_eq!(got, want, "{order:?} page {page} of {limit} of {f:?}");
                        }
                    }
                }
            }
        }
    }
    for p in s
        .list(&TaskFilter::default(), Order::NewestFirst, 1, 1000)
        .tasks
    {
        assert_eq!(Some(&p), model.get(&p.seq), "stored record");
    }
}

fn check_counts(s: &MemoryStore, model: &BTreeMap<u64, Task>) {
    let mut want = [0u64; 7];
    for t in model.values() {
        want[t.status.index()] += 1;
    }
    assert_eq!(s.counts(), want);
}

/// Sets status (with its finish time), node and tool as the engine would.
fn apply(
    t: &mut Task,
    status: Option<TaskStatus>,
    node: Option<Option<&str>>,
    tool: Option<&str>,
    now: SystemTime,
) {
    if let Some(st) = status {
        if st.is_terminal() && !t.status.is_terminal() {
            t.finished_at = Some(now);
        } else if !st.is_terminal() {
            t.finished_at = None;
        }
        t.status = st;
    }
    if let Some(n) = node {
        t.node_id = n.map(str::to_owned);
    }
    if let Some(x) = tool {
        t.spec.tool = x.to_owned();
    }
    t.updated_at = now;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The indexed `list` (pages and totals for every filter combination), the status counts
    /// and retention agree with a naive scan over any history of inserts, restores,
    /// replacements, updates and retention runs.
    #[test]
    fn indexed_list_matches_naive(ops in proptest::collection::vec(op(), 1..120)) {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut s = MemoryStore::new();
        let mut model: BTreeMap<u64, Task> = BTreeMap::new();
        let mut next_seq = 1;
        for (step, op) in ops.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(step as u64);
            match op {
                Op::Insert { tool, node, status, restore } => {
                    let t = task(next_seq, TOOLS[tool], TaskStatus::ALL[status], node.map(|n| NODES[n]), now);
                    next_seq += 1;
                    model.insert(t.seq, t.clone());
                    if restore { s.restore(t) } else { s.insert(t) }
                }
                Op::Replace { pick, tool, node, status } => {
                    let Some(&seq) = model.keys().nth(pick % model.len().max(1)) else { continue };
                    let t = task(seq, TOOLS[tool], TaskStatus::ALL[status], node.map(|n| NODES[n]), now);
                    model.insert(seq, t.clone());
                    s.insert(t);
                }
                Op::Update { pick, status, node, tool } => {
                    let Some(&seq) = model.keys().nth(pick % model.len().max(1)) else { continue };
                    let status = status.map(|i| TaskStatus::ALL[i]);
                    let node = node.map(|n| n.map(|i| NODES[i]));
                    let tool = tool.map(|i| TOOLS[i]);
                    let m = model.get_mut(&seq).unwrap();
                    apply(m, status, node, tool, now);
                    let id = m.id.clone();
                    prop_assert!(s.update(&id, &mut |t| apply(t, status, node, tool, now)));
                }
                Op::UpdateUnknown => {
                    prop_assert!(!s.update("t-none", &mut |t| t.status = TaskStatus::Failed));
                }
                Op::Collect { cutoff_ms } => {
                    let cutoff = t0 + Duration::from_millis(cutoff_ms);
                    let mut want: Vec<TaskId> = model
                        .values()
                        .filter(|t| t.status.is_terminal() && t.finished_at.unwrap_or(t.updated_at) < cutoff)
                        .map(|t| t.id.clone())
                        .collect();
                    model.retain(|_, t| !(t.status.is_terminal() && t.finished_at.unwrap_or(t.updated_at) < cutoff));
                    let mut got: Vec<TaskId> = s
                        .remove_finished_before(cutoff)
                        .into_iter()
                        .map(|(id, _)| id)
                        .collect();
                    got.sort();
                    want.sort();
                    prop_assert_eq!(got, want);
                }
                Op::Check => check_all(&s, &model),
            }
            check_counts(&s, &model);
        }
        check_all(&s, &model);
    }

    /// The block list keeps exactly the inserted seqs, in order, through splits and merges, and
    /// reads from any rank newest first and oldest first.
    #[test]
    fn seq_list_matches_btreeset(
        ops in proptest::collection::vec((any::<bool>(), 0..6000u64), 1..6000),
        skips in proptest::collection::vec(0..7000usize, 1..20),
    ) {
        let mut l = SeqList::default();
        let mut want = std::collections::BTreeSet::new();
        for (add, seq) in ops {
            // Mostly adds, so blocks fill and split; removals then thin them out.
            if add || seq % 3 == 0 {
                l.insert(seq);
                want.insert(seq);
            } else {
                l.remove(seq);
                want.remove(&seq);
            }
        }
        let check = |l: &SeqList, want: &std::collections::BTreeSet<u64>| {
            prop_assert_eq!(l.len(), want.len());
            prop_assert!(l.blocks.iter().all(|b| !b.is_empty() && b.len() <= SEQ_BLOCK));
            let flat: Vec<u64> = l.blocks.iter().flatten().copied().collect();
            prop_assert_eq!(flat, want.iter().copied().collect::<Vec<_>>());
            for &skip in &skips {
                let got: Vec<u64> = l.newest_after(skip).take(50).collect();
                let exp: Vec<u64> = want.iter().rev().skip(skip).take(50).copied().collect();
                prop_assert_eq!(got, exp);
            }
            let all: Vec<u64> = l.newest_after(0).collect();
            prop_assert_eq!(all, want.iter().rev().copied().collect::<Vec<_>>());
            for &skip in &skips {
                let got: Vec<u64> = l.oldest_after(skip).take(50).collect();
                let exp: Vec<u64> = want.iter().skip(skip).take(50).copied().collect();
                prop_assert_eq!(got, exp);
            }
            let all: Vec<u64> = l.oldest_after(0).collect();
            prop_assert_eq!(all, want.iter().copied().collect::<Vec<_>>());
            Ok(())
        };
        check(&l, &want)?;
        // Thin out three in four: blocks shrink and merge.
        for seq in want.clone().into_iter().filter(|s| s % 4 != 0) {
            l.remove(seq);
            want.remove(&seq);
        }
        check(&l, &want)?;
    }
}
