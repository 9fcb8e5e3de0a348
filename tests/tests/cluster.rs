//! End-to-end tests of a cluster of real `apex-node` processes: dispatch across nodes, pinned
//! tasks, MessagePack nodes, and failover when a node is killed (SIGKILL) or frozen (SIGSTOP).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use apex_tests::{Api, DEFAULT_TIMEOUT, Hub, HubOptions, Node, NodeOptions, Task, wait_until};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Checks that every task succeeded, that its event stream holds exactly one terminal event
/// (a `task_completed`), and returns how many tasks migrated (`task_migrated` seen).
async fn check_committed_once(api: &Api, tasks: &[Task]) -> Result<usize> {
    for t in tasks {
        ensure!(
            t.status == "succeeded",
            "task {} ended {} (attempt {}, error {:?})",
            t.task_id,
            t.status,
            t.attempt,
            t.error
        );
    }
    let migrated: Vec<bool> = futures::stream::iter(tasks.iter().map(|t| async move {
        let events = api.events(&t.task_id, DEFAULT_TIMEOUT).await?;
        let types = apex_tests::api::completed_once(&t.task_id, &events)?;
        let migrated = types.contains(&"task_migrated");
        ensure!(
            migrated == (t.attempt > 1),
            "task {} attempt {} but events {types:?}",
            t.task_id,
            t.attempt
        );
        Ok::<_, anyhow::Error>(migrated)
    }))
    .buffer_unordered(16)
    .try_collect()
    .await?;
    Ok(migrated.into_iter().filter(|m| *m).count())
}

/// Waits until `node` has at least `n` tasks assigned or running.
async fn wait_busy(api: &Api, node_id: &str, n: usize) -> Result<Vec<Task>> {
    wait_until(
        &format!("node {node_id} to run {n} tasks"),
        DEFAULT_TIMEOUT,
        || async move {
            let mut on_node = Vec::new();
            for status in ["assigned", "running"] {
                on_node.extend(
                    api.list_all(&[("node_id", node_id), ("status", status)])
                        .await?,
                );
            }
            Ok((on_node.len() >= n).then_some(on_node))
        },
    )
    .await
}

fn sleep_tasks(n: usize, ms: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"tool": "sleep", "args": {"ms": ms}, "description": format!("sleep {i}")}))
        .collect()
}

#[tokio::test]
async fn thousand_tasks_across_three_nodes() -> Result<()> {
    let hub = Hub::start_default().await?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(&hub, NodeOptions::named(&format!("n{i}")).concurrency(16)).await?);
    }
    let bodies: Vec<Value> = (0..1000)
        .map(|i| json!({"tool": "echo", "args": {"marker": format!("m-{i}-end")}}))
        .collect();
    let submitted = hub.api().submit_batch(&bodies).await?;
    let ids: Vec<String> = submitted.iter().map(|t| t.task_id.clone()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        1000,
        "task ids must be unique"
    );

    let done = hub.api().wait_all_terminal(&ids, WAIT, 32).await?;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (i, t) in done.iter().enumerate() {
        assert_eq!(t.status, "succeeded", "task {i}: {:?}", t.error);
        assert!(
            t.result.to_string().contains(&format!("m-{i}-end")),
            "task {i} result {} is not its own",
            t.result
        );
        *per_node
            .entry(t.node_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let node_ids: HashSet<String> = nodes.iter().map(|n| n.id().to_owned()).collect();
    assert_eq!(
        per_node.keys().cloned().collect::<HashSet<_>>(),
        node_ids,
        "every node should get some of the work: {per_node:?}"
    );
    let health = hub.api().health().await?;
    assert_eq!(health["tasks"]["succeeded"], 1000, "{health}");
    Ok(())
}

#[tokio::test]
async fn pinned_tasks_run_only_on_their_node() -> Result<()> {
    let hub = Hub::start_default().await?;
    let a = Node::start(&hub, NodeOptions::named("pin-a").concurrency(4)).await?;
    let b = Node::start(&hub, NodeOptions::named("pin-b").concurrency(4)).await?;
    let bodies: Vec<Value> = (0..30)
        .map(|i| json!({"tool": "sleep", "args": {"ms": 20}, "node_id": b.id(), "description": format!("p{i}")}))
        .collect();
    let ids: Vec<String> = hub.api().submit_ids(&bodies).await?;
    let done = hub.api().wait_all_terminal(&ids, WAIT, 16).await?;
    for t in &done {
        assert_eq!(t.status, "succeeded");
        assert_eq!(
            t.node_id.as_deref(),
            Some(b.id()),
            "pinned task ran elsewhere"
        );
    }
    assert_ne!(a.id(), b.id());
    Ok(())
}

#[tokio::test]
async fn msgpack_node_runs_tasks() -> Result<()> {
    let hub = Hub::start_default().await?;
    let node = Node::start(
        &hub,
        NodeOptions::named("mp").concurrency(8).args(["--msgpack"]),
    )
    .await?;
    let bodies: Vec<Value> = (0..50)
        .map(|i| json!({"tool": "echo", "args": {"n": i, "text": "päivää 🌍"}}))
        .collect();
    let ids: Vec<String> = hub.api().submit_ids(&bodies).await?;
    let done = hub.api().wait_all_terminal(&ids, WAIT, 16).await?;
    for (i, t) in done.iter().enumerate() {
        assert_eq!(t.status, "succeeded", "{:?}", t.error);
        assert_eq!(t.node_id.as_deref(), Some(node.id()));
        let s = t.result.to_string();
        assert!(
            s.contains("päivää 🌍") && s.contains(&format!("\"n\":{i}")),
            "{s}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sigkill_mid_run_loses_nothing_and_commits_once() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(&hub, NodeOptions::named(&format!("k{i}")).concurrency(8)).await?);
    }
    let ids: Vec<String> = api.submit_ids(&sleep_tasks(300, 100)).await?;

    // Kill one node while it is busy (the queue is still long, so it is full).
    let victim_id = nodes[1].id().to_owned();
    let in_flight = wait_busy(api, &victim_id, 4).await?;
    nodes[1].kill()?;
    hub.wait_node_status(&victim_id, "offline", DEFAULT_TIMEOUT)
        .await
        .context("a killed node must go offline")?;

    let done = api.wait_all_terminal(&ids, WAIT, 32).await?;
    let migrated = check_committed_once(api, &done).await?;
    assert!(
        migrated > 0,
        "the killed node's tasks should show task_migrated"
    );
    // Every task that moved finished elsewhere; some of the victim's in-flight ones moved (a
    // task that finished just before the kill keeps attempt 1).
    for t in done.iter().filter(|t| t.attempt >= 2) {
        assert_ne!(t.node_id.as_deref(), Some(victim_id.as_str()));
    }
    let in_flight: HashSet<&str> = in_flight.iter().map(|t| t.task_id.as_str()).collect();
    let moved = done
        .iter()
        .filter(|t| t.attempt >= 2 && in_flight.contains(t.task_id.as_str()))
        .count();
    assert!(moved > 0, "none of the victim's in-flight tasks moved");
    Ok(())
}

#[tokio::test]
async fn frozen_node_is_declared_dead_and_its_tasks_move() -> Result<()> {
    let hub = Hub::start(HubOptions::fast_liveness()).await?;
    let api = hub.api();
    let a = Node::start(&hub, NodeOptions::named("frozen").concurrency(4)).await?;
    let b = Node::start(&hub, NodeOptions::named("alive").concurrency(4)).await?;
    let ids: Vec<String> = api.submit_ids(&sleep_tasks(40, 300)).await?;

    // Freeze it while busy: its socket stays open, but it no longer answers pings.
    wait_busy(api, a.id(), 2).await?;
    a.freeze()?;
    hub.wait_node_status(a.id(), "offline", DEFAULT_TIMEOUT)
        .await
        .context("a frozen node must be declared dead")?;

    let done = api.wait_all_terminal(&ids, WAIT, 16).await?;
    let moved: Vec<&Task> = done.iter().filter(|t| t.attempt >= 2).collect();
    assert!(!moved.is_empty(), "none of the frozen node's tasks moved");
    for t in &moved {
        assert_eq!(t.status, "succeeded");
        assert_eq!(
            t.node_id.as_deref(),
            Some(b.id()),
            "migrated task ran elsewhere"
        );
    }

    // Thawed, the node comes back with results of attempts that moved on: they change nothing.
    a.thaw()?;
    hub.wait_node_online("frozen").await?;
    let migrated = check_committed_once(api, &done).await?;
    assert_eq!(migrated, moved.len());
    let by_id: HashMap<&str, &Task> = done.iter().map(|t| (t.task_id.as_str(), t)).collect();
    for t in api.wait_all_terminal(&ids, WAIT, 16).await? {
        let before = by_id[t.task_id.as_str()];
        assert_eq!(t.status, "succeeded");
        assert_eq!(
            (&before.node_id, before.attempt, &before.result),
            (&t.node_id, t.attempt, &t.result),
            "task changed after thaw"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_a_node_without_losing_work() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();
    let mut a = Node::start(&hub, NodeOptions::named("drain-a").concurrency(4)).await?;
    let _b = Node::start(&hub, NodeOptions::named("drain-b").concurrency(4)).await?;
    let ids: Vec<String> = api.submit_ids(&sleep_tasks(40, 150)).await?;
    wait_busy(api, a.id(), 2).await?;
    a.terminate()?;
    let status = a.wait_exit(Duration::from_secs(40)).await?;
    assert!(
        status.success(),
        "a draining node should exit cleanly, got {status}"
    );
    hub.wait_node_status(a.id(), "offline", DEFAULT_TIMEOUT)
        .await?;

    let done = api.wait_all_terminal(&ids, WAIT, 16).await?;
    check_committed_once(api, &done).await?;
    Ok(())
}
