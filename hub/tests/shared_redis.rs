//! Shared mode's Redis protocol (`apex_hub::shared`) against a real `redis-server`:
//! two hubs' handles on one Redis, submission at one and claim at the other, claims bounded by
//! the asked count, priority then age order, fencing of commits after a lost lease or claim,
//! the reaper requeueing a dead hub's tasks exactly once, idempotency keys across hubs, and the
//! cluster-wide node registry. Fails (never skips) when `redis-server` is missing.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code)]
mod redis_server;

use std::time::{Duration, Instant, SystemTime};

use apex_hub::model::{EventKind, Task, TaskSpec, TaskStatus};
use apex_hub::shared::{self, SharedRedis, Submitted, Wake, pinned_queue, tool_queue};
use apex_hub::store::NodeRecord;
use futures::StreamExt;
use redis_server::RedisServer;
use serde_json::json;

/// A queued task as a hub submits it (`shared::new_task`), with a fixed id and seq.
fn task(n: u64, tool: &str, priority: i32) -> Task {
    let spec = TaskSpec {
        tool: tool.to_owned(),
        args: json!({"n": n}),
        description: None,
        priority,
        timeout_seconds: 60.0,
        max_attempts: 2,
        idempotency_key: None,
        pinned_node: None,
        capability: None,
        owner: None,
    };
    let mut t = apex_hub::shared::new_task(spec);
    t.id = format!("00000000-0000-4000-8000-{n:012}");
    t.seq = n;
    for e in &mut t.events {
        e.task_id = t.id.clone();
    }
    t
}

/// What a hub's engine does when it assigns a claimed task to one of its nodes.
fn assign(t: &mut Task, node: &str) {
    t.status = TaskStatus::Assigned;
    t.attempt += 1;
    t.node_id = Some(node.to_owned());
    t.started_at.get_or_insert(SystemTime::now());
}

fn succeed(t: &mut Task) {
    t.status = TaskStatus::Succeeded;
    t.result = Some(json!({"ok": t.spec.args["n"]}));
    t.finished_at = Some(SystemTime::now());
}

async fn hub(redis: &RedisServer, id: &str, ttl_ms: u64) -> SharedRedis {
    SharedRedis::join(&redis.url(), id, ttl_ms).await.unwrap()
}

#[tokio::test]
async fn a_task_submitted_at_one_hub_is_claimed_and_finished_at_another_and_read_back() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    assert_ne!(a.epoch(), b.epoch());

    let t = task(1, "echo", 5);
    assert!(matches!(a.submit(&t).await.unwrap(), Submitted::New { .. }));
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 1);

    let mut claimed = b.claim(&tool_queue("echo"), 4).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].task.id, t.id);
    // Nobody else gets it.
    assert!(a.claim(&tool_queue("echo"), 4).await.unwrap().is_empty());

    let c = claimed.remove(0);
    let mut rec = c.task;
    assign(&mut rec, "node-b");
    b.commit(&rec, c.claim).await.unwrap();
    succeed(&mut rec);
    b.commit(&rec, c.claim).await.unwrap();

    let seen = a.get(&t.id).await.unwrap().unwrap();
    assert_eq!(seen.status, TaskStatus::Succeeded);
    assert_eq!(seen.node_id.as_deref(), Some("node-b"));
    assert_eq!(seen.result, Some(json!({"ok": 1})));
    // A finished task cannot be changed again, even by its last owner (the same record again,
    // a retried batch, writes nothing and succeeds).
    b.commit(&rec, c.claim).await.unwrap();
    let mut other = rec.clone();
    other.result = Some(json!({"ok": "twice"}));
    assert!(matches!(
        b.commit(&other, c.claim).await,
        Err(shared::Error::Fenced(_))
    ));
    assert_eq!(
        a.get(&t.id).await.unwrap().unwrap().result,
        Some(json!({"ok": 1}))
    );
}

#[tokio::test]
async fn claims_are_bounded_and_pop_higher_priority_then_older_first() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    // Submitted alternately at both hubs: the order is global.
    for (n, prio) in [(1, 1), (2, 9), (3, 1), (4, 9), (5, -3), (6, i32::MAX)] {
        let h = if n % 2 == 0 { &a } else { &b };
        h.submit(&task(n, "echo", prio)).await.unwrap();
    }
    let first = a.claim(&tool_queue("echo"), 3).await.unwrap();
    let ids: Vec<u64> = first
        .iter()
        .map(|c| c.task.spec.args["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![6, 2, 4]);
    let rest = b.claim(&tool_queue("echo"), 10).await.unwrap();
    let ids: Vec<u64> = rest
        .iter()
        .map(|c| c.task.spec.args["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3, 5]);
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 0);
    // Other tools' queues are untouched.
    a.submit(&task(7, "other", 5)).await.unwrap();
    assert!(b.claim(&tool_queue("echo"), 10).await.unwrap().is_empty());
    assert_eq!(b.claim(&tool_queue("other"), 0).await.unwrap().len(), 0);
    assert_eq!(b.claim(&tool_queue("other"), 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn every_hub_lists_every_task_newest_first_with_filters() {
    use apex_hub::store::{Order, TaskFilter};
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    for n in 1..=5 {
        let h = if n % 2 == 0 { &a } else { &b };
        h.submit(&task(n, if n == 3 { "other" } else { "echo" }, 5))
            .await
            .unwrap();
    }
    let c = a.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    let mut rec = c.task;
    assign(&mut rec, "node-a");
    succeed(&mut rec);
    a.commit(&rec, c.claim).await.unwrap();

    let all = b
        .list(&TaskFilter::default(), Order::NewestFirst, 1, 10)
        .await
        .unwrap();
    assert_eq!(all.total, 5);
    let ns: Vec<u64> = all
        .tasks
        .iter()
        .map(|t| t.spec.args["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![5, 4, 3, 2, 1]);
    let oldest = b
        .list(&TaskFilter::default(), Order::OldestFirst, 1, 10)
        .await
        .unwrap();
    let ns: Vec<u64> = oldest
        .tasks
        .iter()
        .map(|t| t.spec.args["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2, 3, 4, 5], "oldest first");
    let page2 = b
        .list(&TaskFilter::default(), Order::NewestFirst, 2, 2)
        .await
        .unwrap();
    assert_eq!(page2.total, 5);
    assert_eq!(page2.tasks.len(), 2);
    assert_eq!(page2.tasks[0].spec.args["n"], 3);
    let done = TaskFilter {
        status: Some(TaskStatus::Succeeded),
        ..TaskFilter::default()
    };
    let got = b.list(&done, Order::NewestFirst, 1, 10).await.unwrap();
    assert_eq!(got.total, 1);
    assert_eq!(got.tasks[0].id, rec.id);
    let other = TaskFilter {
        tool: Some("other".to_owned()),
        ..TaskFilter::default()
    };
    assert_eq!(
        a.list(&other, Order::NewestFirst, 1, 10)
            .await
            .unwrap()
            .total,
        1
    );
}

/// Every page of `filter` (`limit` per page) at `h`, in both orders, checked against the
/// records read one by one (`all` in submission order): the listed ids are exactly the matching
/// tasks, newest first or oldest first, and each page's total is exact.
async fn check_listing(
    h: &SharedRedis,
    all: &[String],
    filter: &apex_hub::store::TaskFilter,
    limit: usize,
) -> usize {
    use apex_hub::store::Order;
    let mut oldest_first = Vec::new();
    for id in all {
        if let Some(t) = h.get(id).await.unwrap()
            && filter.matches(&t)
        {
            oldest_first.push(t.id);
        }
    }
    for order in [Order::NewestFirst, Order::OldestFirst] {
        let mut want = oldest_first.clone();
        if order == Order::NewestFirst {
            want.reverse();
        }
        let mut got = Vec::new();
        for page in 1.. {
            let p = h.list(filter, order, page, limit).await.unwrap();
            assert_eq!(p.total, want.len(), "{filter:?} {order:?} page {page}");
            assert!(p.tasks.len() <= limit);
            if p.tasks.is_empty() {
                break;
            }
            assert!(p.tasks.iter().all(|t| filter.matches(t)), "{filter:?}");
            got.extend(p.tasks.into_iter().map(|t| t.id));
        }
        assert_eq!(got, want, "{filter:?} {order:?}");
    }
    oldest_first.len()
}

#[tokio::test]
async fn listing_indexes_follow_every_state_change_with_exact_totals_and_pages() {
    use apex_hub::store::{Order, TaskFilter};
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 60_000).await;
    let b = hub(&redis, "hub-b", 60_000).await;
    let dead = hub(&redis, "hub-dead", 1_000).await;
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    for n in 1..=14 {
        let mut t = task(n, if n % 3 == 0 { "other" } else { "echo" }, 5);
        // Owners: two principals and some tasks with none (the hub's own).
        t.spec.owner = ["user:a", "key:b", "user:a", ""]
            .get((n % 4) as usize)
            .filter(|o| !o.is_empty())
            .map(|o| (*o).to_owned());
        ids.push(t.id.clone());
        // The first half one by one, the rest as one batch: both paths keep the indexes.
        if n <= 7 {
            a.submit(&t).await.unwrap();
        } else {
            batch.push(t);
        }
    }
    a.submit_batch(&batch).await.unwrap();
    // A dead hub's two assigned tasks go back to the queue (attempt 1, last node node-d).
    for cl in dead.claim(&tool_queue("echo"), 2).await.unwrap() {
        let mut rec = cl.task;
        assign(&mut rec, "node-d");
        dead.commit(&rec, cl.claim).await.unwrap();
    }
    // Hub A: one assigned, one running, one succeeded (echo, node-a), committed as one batch.
    let got = a.claim(&tool_queue("echo"), 3).await.unwrap();
    let mut held = Vec::new();
    for (i, cl) in got.into_iter().enumerate() {
        let mut rec = cl.task;
        assign(&mut rec, "node-a");
        match i {
            0 => {}
            1 => rec.status = TaskStatus::Running,
            _ => succeed(&mut rec),
        }
        let json = serde_json::to_vec(&rec).unwrap();
        held.push((rec, json, cl.claim));
    }
    let commits: Vec<_> = held
        .iter()
        .map(|(t, json, claim)| apex_hub::shared::Commit::of(t, json, *claim))
        .collect();
    let written = a.commit_batch(&commits).await.unwrap();
    assert!(written.iter().all(Result::is_ok), "{written:?}");
    // Hub B: one failed, one assigned (other, node-b).
    let got = b.claim(&tool_queue("other"), 2).await.unwrap();
    for (i, cl) in got.into_iter().enumerate() {
        let mut rec = cl.task;
        assign(&mut rec, "node-b");
        if i == 0 {
            rec.status = TaskStatus::Failed;
            rec.finished_at = Some(SystemTime::now());
        }
        b.commit(&rec, cl.claim).await.unwrap();
    }
    // One queued task cancelled in the shared store.
    let mut cancelled = b.get(&ids[13]).await.unwrap().unwrap();
    cancelled.status = TaskStatus::Cancelled;
    assert!(b.finish_queued(&cancelled).await.unwrap());
    poll("the dead hub's lease to expire", || async {
        (!dead.lease_alive().await.unwrap()).then_some(())
    })
    .await;
    assert_eq!(b.reap().await.unwrap().requeued, 2);

    let mut statuses: Vec<Option<TaskStatus>> = vec![None];
    statuses.extend(TaskStatus::ALL.map(Some));
    let tools = [None, Some("echo"), Some("other"), Some("nothing")];
    let nodes = [
        None,
        Some("node-a"),
        Some("node-b"),
        Some("node-d"),
        Some("nope"),
    ];
    let mut nonempty = 0;
    for status in &statuses {
        for tool in tools {
            for node in nodes {
                for owner in [None, Some("user:a"), Some("key:b"), Some("nope")] {
                    let f = TaskFilter {
                        status: *status,
                        tool: tool.map(str::to_owned),
                        node_id: node.map(str::to_owned),
                        owner: owner.map(str::to_owned),
                    };
                    if check_listing(&b, &ids, &f, 3).await > 0 {
                        nonempty += 1;
                    }
                }
            }
        }
    }
    assert!(nonempty > 20, "the mix covers many filters: {nonempty}");
    // Spot checks of the mix.
    let count = |status, tool: Option<&str>, node: Option<&str>| {
        let f = TaskFilter {
            status,
            tool: tool.map(str::to_owned),
            node_id: node.map(str::to_owned),
            owner: None,
        };
        let b = &b;
        async move { b.list(&f, Order::NewestFirst, 1, 1).await.unwrap().total }
    };
    assert_eq!(count(None, None, None).await, 14);
    assert_eq!(
        count(Some(TaskStatus::Queued), None, Some("node-d")).await,
        2
    );
    assert_eq!(
        count(Some(TaskStatus::Running), Some("echo"), None).await,
        1
    );
    assert_eq!(
        count(Some(TaskStatus::Failed), Some("other"), Some("node-b")).await,
        1
    );
    assert_eq!(count(Some(TaskStatus::Cancelled), None, None).await, 1);
    assert_eq!(
        count(Some(TaskStatus::Queued), None, None).await,
        14 - 8 + 2
    );

    // Retention removes finished tasks from every index.
    let gone = a
        .collect_finished_before(SystemTime::now() + Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(gone, 3);
    assert_eq!(count(None, None, None).await, 11);
    assert_eq!(count(Some(TaskStatus::Succeeded), None, None).await, 0);
    assert_eq!(count(None, Some("other"), Some("node-b")).await, 1);
    for owner in ["user:a", "key:b"] {
        let f = TaskFilter {
            owner: Some(owner.to_owned()),
            ..TaskFilter::default()
        };
        check_listing(&b, &ids, &f, 4).await;
    }
    let keys: Vec<String> = {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg("apex:shared:ix:*failed*")
            .query_async(&mut c)
            .await
            .unwrap()
    };
    assert!(keys.is_empty(), "empty indexes are gone: {keys:?}");
}

#[tokio::test]
async fn retention_deletes_finished_tasks_with_their_idempotency_keys_only() {
    use apex_hub::store::{Order, TaskFilter};
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    let mut done = task(1, "echo", 5);
    done.spec.idempotency_key = Some("k-done".to_owned());
    let mut cancelled = task(2, "echo", 5);
    cancelled.spec.idempotency_key = Some("k-cancel".to_owned());
    let waiting = task(3, "other", 5);
    for t in [&done, &cancelled, &waiting] {
        a.submit(t).await.unwrap();
    }
    let c = b.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    let mut rec = c.task;
    assign(&mut rec, "node-b");
    succeed(&mut rec);
    b.commit(&rec, c.claim).await.unwrap();
    let mut cx = cancelled.clone();
    cx.status = TaskStatus::Cancelled;
    assert!(a.finish_queued(&cx).await.unwrap());

    // Nothing finished before an hour ago.
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    assert_eq!(a.collect_finished_before(hour_ago, 100).await.unwrap(), 0);
    let later = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(b.collect_finished_before(later, 100).await.unwrap(), 2);
    assert!(a.get(&done.id).await.unwrap().is_none());
    assert!(a.get(&cancelled.id).await.unwrap().is_none());
    let left = a
        .list(&TaskFilter::default(), Order::NewestFirst, 1, 10)
        .await
        .unwrap();
    assert_eq!(left.total, 1);
    assert_eq!(left.tasks[0].id, waiting.id);
    // The keys can be used again.
    let mut again = task(4, "echo", 5);
    again.spec.idempotency_key = Some("k-done".to_owned());
    assert!(matches!(
        a.submit(&again).await.unwrap(),
        Submitted::New { .. }
    ));
}

#[tokio::test]
async fn a_task_no_hub_claims_times_out_in_the_shared_store() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let mut short = task(1, "nobody", 5);
    short.spec.timeout_seconds = 0.2;
    let mut held = task(2, "echo", 5);
    held.spec.timeout_seconds = 0.2;
    let long = task(3, "nobody", 5);
    for t in [&short, &held, &long] {
        a.submit(t).await.unwrap();
    }
    let c = a.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if a.expire_queued(100).await.unwrap() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = a.get(&short.id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::TimedOut);
    assert_eq!(t.error.unwrap().code, "task_timeout");
    assert_eq!(t.events.last().unwrap().kind, EventKind::TaskTimedOut);
    assert_eq!(a.queue_len(&tool_queue("nobody")).await.unwrap(), 1);
    // The claimed one is its engine's business; the long one waits.
    assert_eq!(
        a.get(&held.id).await.unwrap().unwrap().status,
        TaskStatus::Queued
    );
    assert_eq!(
        a.get(&long.id).await.unwrap().unwrap().status,
        TaskStatus::Queued
    );
    assert_eq!(a.expire_queued(100).await.unwrap(), 0);
    let mut rec = c.task;
    assign(&mut rec, "n");
    a.commit(&rec, c.claim).await.unwrap();
}

#[tokio::test]
async fn pinned_tasks_wait_in_their_node_queue() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let mut t = task(1, "echo", 5);
    t.spec.pinned_node = Some("node-x".to_owned());
    a.submit(&t).await.unwrap();
    assert!(a.claim(&tool_queue("echo"), 5).await.unwrap().is_empty());
    let got = a.claim(&pinned_queue("node-x"), 5).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task.id, t.id);
}

#[tokio::test]
async fn a_hub_that_lost_its_lease_commits_nothing_and_the_reaper_requeues_its_tasks_once() {
    let redis = RedisServer::start().unwrap();
    let dead = hub(&redis, "hub-dead", 300).await;
    let a = hub(&redis, "hub-a", 60_000).await;
    let b = hub(&redis, "hub-b", 60_000).await;

    for n in 1..=3 {
        a.submit(&task(n, "echo", 5)).await.unwrap();
    }
    let claimed = dead.claim(&tool_queue("echo"), 3).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let mut held = Vec::new();
    for c in claimed {
        let mut rec = c.task;
        assign(&mut rec, "node-d");
        dead.commit(&rec, c.claim).await.unwrap();
        held.push((rec, c.claim));
    }
    // While its lease lives nothing is reaped.
    assert_eq!(a.reap().await.unwrap().requeued, 0);

    // The hub stalls past its lease.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead.lease_alive().await.unwrap() {
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dead.renew().await.unwrap(), "renew must report the loss");

    // Its result is refused: the lease is gone.
    let (mut late, late_claim) = held[0].clone();
    succeed(&mut late);
    assert!(matches!(
        dead.commit(&late, late_claim).await,
        Err(shared::Error::Fenced(_))
    ));
    assert!(matches!(
        dead.claim(&tool_queue("echo"), 1).await,
        Err(shared::Error::Fenced(_))
    ));
    // In a batch too, with the reason for that task.
    let late_json = serde_json::to_vec(&late).unwrap();
    assert_eq!(
        dead.commit_batch(&[shared::Commit::of(&late, &late_json, late_claim)])
            .await
            .unwrap(),
        vec![Err(shared::Fenced::LeaseLost)]
    );

    // Two reapers at once: every task is requeued exactly once.
    let (ra, rb) = tokio::join!(a.reap(), b.reap());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.requeued + rb.requeued, 3);
    assert_eq!(ra.failed + rb.failed, 0);
    assert_eq!(ra.hubs_forgotten + rb.hubs_forgotten, 1);

    for (rec, _) in &held {
        let t = a.get(&rec.id).await.unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Queued);
        assert_eq!(t.attempt, 1);
        assert_eq!(t.events.last().unwrap().kind, EventKind::TaskMigrated);
    }

    // The dead hub comes back with a new epoch: its old claims stay fenced even if the same
    // claim number were presented again.
    let old_epoch = dead.epoch();
    dead.rejoin().await.unwrap();
    assert!(dead.epoch() > old_epoch);
    assert!(matches!(
        dead.commit(&late, late_claim).await,
        Err(shared::Error::Fenced(_))
    ));
    assert_eq!(
        dead.commit_batch(&[shared::Commit::of(&late, &late_json, late_claim)])
            .await
            .unwrap(),
        vec![Err(shared::Fenced::NotHeld)]
    );

    // The requeued tasks run again elsewhere (attempt 2) and finish once.
    let again = b.claim(&tool_queue("echo"), 10).await.unwrap();
    assert_eq!(again.len(), 3);
    for c in again {
        assert!(c.claim > 1);
        let mut rec = c.task;
        assign(&mut rec, "node-b");
        assert_eq!(rec.attempt, 2);
        succeed(&mut rec);
        b.commit(&rec, c.claim).await.unwrap();
    }
    for (rec, _) in &held {
        let t = a.get(&rec.id).await.unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Succeeded);
        assert_eq!(t.node_id.as_deref(), Some("node-b"));
        let done = t
            .events
            .iter()
            .filter(|e| e.kind == EventKind::TaskCompleted)
            .count();
        assert!(done <= 1);
    }
}

fn node_record(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.to_owned(),
        name: id.to_owned(),
        node_type: apex_protocol::NodeType::Worker,
        vcp: false,
        version: None,
        tools: vec!["echo".to_owned()],
        tool_specs: vec![apex_protocol::ToolSpec::Name("echo".to_owned())],
        limit: 4,
        cancel_tool: true,
    }
}

/// Polls `f` every 50 ms until it gives `Some`, for at most 30 s.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_that_reconnects_to_another_hub_has_its_dead_hubs_claims_handed_over() {
    let redis = RedisServer::start().unwrap();
    let dead = hub(&redis, "hub-dead", 1_000).await;
    let b = hub(&redis, "hub-b", 60_000).await;
    let c = hub(&redis, "hub-c", 60_000).await;
    // A reaper whose hand-over window (3 lease lifetimes) is short: 6 s.
    let reaper = hub(&redis, "hub-r", 2_000).await;

    for n in 1..=4 {
        b.submit(&task(n, "echo", 5)).await.unwrap();
    }
    let mut held = Vec::new();
    for (i, cl) in dead
        .claim(&tool_queue("echo"), 4)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let mut rec = cl.task;
        // Tasks 1-3 run on node-n, task 4 on node-m.
        assign(&mut rec, if i < 3 { "node-n" } else { "node-m" });
        dead.commit(&rec, cl.claim).await.unwrap();
        held.push((rec, cl.claim));
    }
    let id = |i: usize| held[i].0.id.clone();
    // The dead hub's last renewal (its lease ends 1 s later); then node-n reconnects to hub
    // B (B's store writer registers it there).
    assert!(dead.renew().await.unwrap());
    b.put_node(&node_record("node-n")).await.unwrap();

    // While the dead hub's lease lives, B waits; a task of another node is refused.
    assert!(matches!(
        b.take_over(&id(0), "node-n").await.unwrap(),
        shared::TakeOver::Wait
    ));
    assert!(matches!(
        b.take_over(&id(3), "node-n").await.unwrap(),
        shared::TakeOver::Refused(_)
    ));
    poll("the dead hub's lease to expire", || async {
        (!dead.lease_alive().await.unwrap()).then_some(())
    })
    .await;

    // The reaper requeues only node-m's task: node-n is online at live hub B, which takes
    // its tasks over.
    let r = reaper.reap().await.unwrap();
    assert_eq!((r.requeued, r.handing_over), (1, 3), "{r:?}");
    assert_eq!(
        b.get(&id(3)).await.unwrap().unwrap().status,
        TaskStatus::Queued
    );
    // A requeued task is not handed over, even to its own node.
    assert!(matches!(
        b.take_over(&id(3), "node-m").await.unwrap(),
        shared::TakeOver::Refused(_)
    ));

    // B takes task 1 over: same record (assigned to node-n, attempt 1), claim + 1.
    let shared::TakeOver::Taken(got) = b.take_over(&id(0), "node-n").await.unwrap() else {
        panic!("not taken over");
    };
    assert_eq!(got.claim, held[0].1 + 1);
    assert_eq!(got.task.status, TaskStatus::Assigned);
    assert_eq!(got.task.attempt, 1);
    assert_eq!(got.task.node_id.as_deref(), Some("node-n"));
    // The old claim stays fenced; B's commit of the node's result lands, attempt 1, once.
    let (mut late, late_claim) = held[0].clone();
    succeed(&mut late);
    assert!(matches!(
        dead.commit(&late, late_claim).await,
        Err(shared::Error::Fenced(_))
    ));
    let mut rec = got.task;
    succeed(&mut rec);
    b.commit(&rec, got.claim).await.unwrap();
    let t = c.get(&id(0)).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempt), (TaskStatus::Succeeded, 1));
    assert!(!t.events.iter().any(|e| e.kind == EventKind::TaskMigrated));

    // Two hubs racing for task 2: exactly one gets it.
    let second = id(1);
    let (x, y) = tokio::join!(
        b.take_over(&second, "node-n"),
        c.take_over(&second, "node-n")
    );
    let taken = [x.unwrap(), y.unwrap()]
        .iter()
        .filter(|t| matches!(t, shared::TakeOver::Taken(_)))
        .count();
    assert_eq!(taken, 1);

    // Task 3 is never taken over: once the window after node-n's registration has passed, the
    // reaper requeues it (the dead hub is forgotten once nothing is left).
    poll("the reaper to requeue task 3", || async {
        let r = reaper.reap().await.unwrap();
        (r.requeued == 1).then_some(())
    })
    .await;
    let t = b.get(&id(2)).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Queued);
    assert_eq!(t.events.last().unwrap().kind, EventKind::TaskMigrated);
    assert!(matches!(
        b.take_over(&id(2), "node-n").await.unwrap(),
        shared::TakeOver::Refused(_)
    ));
}

#[tokio::test]
async fn a_dead_hubs_task_on_its_last_attempt_fails_with_node_lost() {
    let redis = RedisServer::start().unwrap();
    let dead = hub(&redis, "hub-dead", 200).await;
    let a = hub(&redis, "hub-a", 60_000).await;
    let mut t = task(1, "echo", 5);
    t.spec.max_attempts = 1;
    a.submit(&t).await.unwrap();
    let c = dead.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    let mut rec = c.task;
    assign(&mut rec, "node-d");
    dead.commit(&rec, c.claim).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = a.reap().await.unwrap();
        if r.failed == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = a.get(&t.id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.error.unwrap().code, "node_lost");
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 0);
}

#[tokio::test]
async fn a_task_handed_back_goes_to_the_shared_queue_for_any_hub() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    a.submit(&task(1, "echo", 5)).await.unwrap();
    let c = a.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    // Hub A has no free node after all: it gives the task back.
    a.release(&c.task, c.claim).await.unwrap();
    let again = b.claim(&tool_queue("echo"), 1).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].claim, c.claim + 1);
    // A's old claim is fenced now.
    assert!(matches!(
        a.commit(&c.task, c.claim).await,
        Err(shared::Error::Fenced(_))
    ));
}

#[tokio::test]
async fn idempotency_keys_hold_across_hubs_and_queued_tasks_can_be_cancelled_anywhere() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    let mut t1 = task(1, "echo", 5);
    t1.spec.idempotency_key = Some("order-7".to_owned());
    let mut t2 = task(2, "echo", 5);
    t2.spec.idempotency_key = Some("order-7".to_owned());
    assert!(matches!(
        a.submit(&t1).await.unwrap(),
        Submitted::New { .. }
    ));
    assert_eq!(
        b.submit(&t2).await.unwrap(),
        Submitted::Existing(t1.id.clone())
    );
    assert!(b.get(&t2.id).await.unwrap().is_none());
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 1);

    let mut cancelled = t1.clone();
    cancelled.status = TaskStatus::Cancelled;
    cancelled.finished_at = Some(SystemTime::now());
    assert!(b.finish_queued(&cancelled).await.unwrap());
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 0);
    assert!(a.claim(&tool_queue("echo"), 5).await.unwrap().is_empty());
    assert_eq!(
        a.get(&t1.id).await.unwrap().unwrap().status,
        TaskStatus::Cancelled
    );
    // Finishing again (or a claimed task) writes nothing.
    assert!(!a.finish_queued(&cancelled).await.unwrap());
}

#[tokio::test]
async fn every_hub_lists_every_hubs_nodes() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    let node = |id: &str| NodeRecord {
        id: id.to_owned(),
        name: id.to_owned(),
        node_type: apex_protocol::NodeType::Worker,
        vcp: false,
        version: None,
        tools: vec!["echo".to_owned()],
        tool_specs: vec![apex_protocol::ToolSpec::Name("echo".to_owned())],
        limit: 4,
        cancel_tool: true,
    };
    a.put_node(&node("n1")).await.unwrap();
    b.put_node(&node("n2")).await.unwrap();
    let seen = a.nodes().await.unwrap();
    let pairs: Vec<(&str, &str)> = seen
        .iter()
        .map(|n| (n.node.id.as_str(), n.hub.as_str()))
        .collect();
    assert_eq!(pairs, vec![("n1", "hub-a"), ("n2", "hub-b")]);
    assert_eq!(b.nodes().await.unwrap(), seen);
}

#[tokio::test]
async fn redis_down_is_unavailable_and_the_hub_recovers_when_it_is_back() {
    let mut redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    redis.stop();
    let err = a.submit(&task(1, "echo", 5)).await.unwrap_err();
    assert!(matches!(err, shared::Error::Unavailable { .. }), "{err:?}");
    redis.restart().unwrap();
    // The restarted Redis is empty: the lease is gone, so the hub must rejoin before claiming.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        match a.renew().await {
            Ok(v) => break v,
            Err(_) => {
                assert!(Instant::now() < deadline, "never reconnected");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(!ok);
    assert!(matches!(
        a.submit(&task(2, "echo", 5)).await.unwrap(),
        Submitted::New { .. }
    ));
    a.rejoin().await.unwrap();
    assert_eq!(a.claim(&tool_queue("echo"), 5).await.unwrap().len(), 1);
}

async fn next(w: &mut (impl futures::Stream<Item = Wake> + Unpin)) -> Wake {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn subscribers_hear_of_new_queued_tasks_and_record_changes_from_any_hub() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    let mut wakes = Box::pin(shared::subscribe(&redis.url()).await.unwrap());
    let t = task(1, "echo", 5);
    a.submit(&t).await.unwrap();
    assert_eq!(next(&mut wakes).await, Wake::Queue(tool_queue("echo")));
    let c = b.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    let mut rec = c.task;
    assign(&mut rec, "node-b");
    b.commit(&rec, c.claim).await.unwrap();
    assert_eq!(next(&mut wakes).await, Wake::Task(t.id.clone()));
    // Handed back: the record changed and the queue got a task again.
    rec.status = TaskStatus::Queued;
    b.release(&rec, c.claim).await.unwrap();
    let mut got = vec![next(&mut wakes).await, next(&mut wakes).await];
    got.sort_by_key(|w| format!("{w:?}"));
    assert_eq!(
        got,
        vec![Wake::Queue(tool_queue("echo")), Wake::Task(t.id.clone())]
    );
}

/// The writer-thread backend: commits only tasks the hub holds, under their claim; a fenced
/// commit is reported, not retried, and does not fail the batch; a retried batch whose terminal
/// record is already stored succeeds.
#[test]
fn the_shared_backend_commits_held_tasks_and_reports_fenced_ones() {
    use apex_hub::durable::Backend;
    use apex_hub::shared::{Claims, SharedBackend};

    let redis = RedisServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, h) = rt.block_on(async {
        (
            hub(&redis, "hub-a", 60_000).await,
            hub(&redis, "hub-h", 400).await,
        )
    });
    let claims = Claims::default();
    let (tx, mut fenced) = tokio::sync::mpsc::unbounded_channel();
    let mut backend = SharedBackend::open(&redis.url(), &h.identity(), claims.clone(), tx).unwrap();

    let (t1, t2, stranger) = (task(1, "echo", 5), task(2, "echo", 5), task(3, "echo", 5));
    let got = rt.block_on(async {
        for t in [&t1, &t2, &stranger] {
            a.submit(t).await.unwrap();
        }
        h.claim(&tool_queue("echo"), 2).await.unwrap()
    });
    for c in &got {
        claims.insert(&c.task.id, c.claim);
    }
    let mut r1 = got[0].task.clone();
    let mut r2 = got[1].task.clone();
    assign(&mut r1, "node-h");
    assign(&mut r2, "node-h");
    // A put for a task the hub does not hold writes nothing.
    let mut s = stranger.clone();
    succeed(&mut s);
    let put = |t: &Task| (t.id.clone(), t.seq, serde_json::to_vec(t).unwrap());
    let batch = [put(&r1), put(&r2), put(&s)];
    let refs: Vec<(&str, u64, Vec<u8>)> = batch
        .iter()
        .map(|(id, seq, v)| (id.as_str(), *seq, v.clone()))
        .collect();
    backend.write(&refs, &[], &[]).unwrap();
    rt.block_on(async {
        assert_eq!(
            a.get(&r1.id).await.unwrap().unwrap().status,
            TaskStatus::Assigned
        );
        assert_eq!(
            a.get(&stranger.id).await.unwrap().unwrap().status,
            TaskStatus::Queued
        );
    });

    // r1 finishes: committed, claim released; the same batch again (a retry) still succeeds.
    succeed(&mut r1);
    let one = [(r1.id.as_str(), r1.seq, serde_json::to_vec(&r1).unwrap())];
    backend.write(&one, &[], &[]).unwrap();
    assert_eq!(claims.get(&r1.id), None);
    claims.insert(&r1.id, got[0].claim);
    backend.write(&one, &[], &[]).unwrap();
    assert!(fenced.try_recv().is_err());

    // The hub's lease runs out; r2's result is fenced, reported, and the batch does not fail.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.block_on(h.lease_alive()).unwrap() {
        assert!(Instant::now() < deadline, "lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    succeed(&mut r2);
    let two = [(r2.id.as_str(), r2.seq, serde_json::to_vec(&r2).unwrap())];
    backend.write(&two, &[], &[]).unwrap();
    assert_eq!(fenced.try_recv().unwrap(), r2.id);
    assert_eq!(claims.get(&r2.id), None);
    rt.block_on(async {
        assert_eq!(
            a.get(&r2.id).await.unwrap().unwrap().status,
            TaskStatus::Assigned
        );
        assert_eq!(
            a.get(&r1.id).await.unwrap().unwrap().status,
            TaskStatus::Succeeded
        );
    });
}

/// Shared mode's mirrored store end to end: engine-side changes of a held task go through the
/// group-committing writer, a durability ticket covers them, and a fenced change is reported
/// while the ticket still completes (nothing of it is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_mirrored_store_group_commits_held_tasks_under_their_claims() {
    use apex_hub::shared::Claims;

    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 60_000).await;
    let h = hub(&redis, "hub-h", 60_000).await;
    let claims = Claims::default();
    let (tx, mut fenced) = tokio::sync::mpsc::unbounded_channel();
    let opened = apex_hub::shared::open_shared(&redis.url(), h.identity(), claims.clone(), tx)
        .await
        .unwrap();
    assert!(opened.recovered.is_empty());
    let mut store = opened.store;
    let durability = opened.durability;

    for n in 1..=20 {
        a.submit(&task(n, "echo", 5)).await.unwrap();
    }
    let got = h.claim(&tool_queue("echo"), 20).await.unwrap();
    assert_eq!(got.len(), 20);
    for c in &got {
        claims.insert(&c.task.id, c.claim);
        store.insert(c.task.clone());
        store.update(&c.task.id, &mut |t| assign(t, "node-h"));
        store.update(&c.task.id, &mut |t| succeed(t));
    }
    let ticket = durability.ticket();
    durability
        .wait(ticket, Duration::from_secs(30))
        .await
        .unwrap();
    for c in &got {
        let t = a.get(&c.task.id).await.unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Succeeded, "{}", c.task.id);
    }
    assert!(claims.is_empty());

    // A claim that another hub took over (hand-back then claim elsewhere) is fenced.
    a.submit(&task(99, "echo", 5)).await.unwrap();
    let c = h.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    h.release(&c.task, c.claim).await.unwrap();
    let other = a.claim(&tool_queue("echo"), 1).await.unwrap().remove(0);
    claims.insert(&c.task.id, c.claim);
    store.insert(c.task.clone());
    store.update(&c.task.id, &mut |t| assign(t, "node-h"));
    let ticket = durability.ticket();
    durability
        .wait(ticket, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(fenced.recv().await.unwrap(), c.task.id);
    let stored = a.get(&c.task.id).await.unwrap().unwrap();
    assert_eq!(stored.status, TaskStatus::Queued);
    assert_eq!(other.claim, c.claim + 1);
}

/// A batch submission is one script: idempotency keys hold against earlier submissions at any
/// hub and within the batch, and a Redis error part-way through (here a key of the wrong type
/// behind the batch's last task) writes none of the batch.
#[tokio::test]
async fn a_batch_is_accepted_all_or_none_and_keeps_idempotency_keys() {
    use apex_hub::shared::SubmittedTask;

    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 5_000).await;
    let b = hub(&redis, "hub-b", 5_000).await;
    let keyed = |n, key: &str| {
        let mut t = task(n, "echo", 5);
        t.spec.idempotency_key = Some(key.to_owned());
        t
    };
    let first = keyed(1, "k1");
    assert!(matches!(
        b.submit(&first).await.unwrap(),
        Submitted::New { .. }
    ));
    let batch = [
        task(2, "echo", 5),
        keyed(3, "k1"),
        keyed(4, "k2"),
        keyed(5, "k2"),
    ];
    let got = a.submit_batch(&batch).await.unwrap();
    assert_eq!(got.len(), 4);
    assert!(matches!(got[0], SubmittedTask::New { .. }));
    match &got[1] {
        SubmittedTask::Existing(t) => {
            assert_eq!((&t.id, &t.spec), (&first.id, &first.spec));
            assert_eq!(t.status, TaskStatus::Queued);
        }
        other => panic!("k1 should name the task submitted at hub b, got {other:?}"),
    }
    assert!(matches!(got[2], SubmittedTask::New { .. }));
    match &got[3] {
        SubmittedTask::Existing(t) => assert_eq!(t.id, batch[2].id),
        other => panic!("k2 should name the batch's own earlier task, got {other:?}"),
    }
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 3);
    assert!(a.get(&batch[1].id).await.unwrap().is_none());
    // Every new task of the batch is claimable at the other hub, in order.
    let claimed: Vec<String> = b
        .claim(&tool_queue("echo"), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.task.id)
        .collect();
    assert_eq!(
        claimed,
        [first.id.clone(), batch[0].id.clone(), batch[2].id.clone()]
    );

    // A key of the wrong type behind the last task: the script fails, nothing is written.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("HSET")
        .arg("apex:shared:idem:broken")
        .arg("f")
        .arg("v")
        .query_async(&mut c)
        .await
        .map(|_: i64| ())
        .unwrap();
    let bad = [task(6, "echo", 5), task(7, "other", 5), keyed(8, "broken")];
    let err = a.submit_batch(&bad).await.unwrap_err();
    assert!(matches!(err, shared::Error::Unavailable { .. }), "{err:?}");
    for t in &bad {
        assert!(
            a.get(&t.id).await.unwrap().is_none(),
            "{} was written",
            t.id
        );
    }
    assert_eq!(a.queue_len(&tool_queue("echo")).await.unwrap(), 0);
    assert_eq!(a.queue_len(&tool_queue("other")).await.unwrap(), 0);
    let page = a
        .list(
            &apex_hub::store::TaskFilter::default(),
            apex_hub::store::Order::NewestFirst,
            1,
            100,
        )
        .await
        .unwrap();
    assert_eq!(page.total, 3);
}

/// One claim call over several queues takes at most the asked count from each, highest
/// priority then oldest first, and nothing once the hub's lease is lost.
#[tokio::test]
async fn one_claim_call_fills_several_queues_within_their_bounds() {
    let redis = RedisServer::start().unwrap();
    let a = hub(&redis, "hub-a", 60_000).await;
    let h = hub(&redis, "hub-h", 400).await;
    let batch: Vec<Task> = (1..=6)
        .map(|n| task(n, if n % 2 == 0 { "even" } else { "odd" }, n as i32))
        .collect();
    a.submit_batch(&batch).await.unwrap();
    let got = h
        .claim_many(
            &[
                (tool_queue("even"), 2),
                (tool_queue("odd"), 1),
                (tool_queue("none"), 5),
                (pinned_queue("nobody"), 0),
            ],
            10,
        )
        .await
        .unwrap();
    let ids: Vec<u64> = got.iter().map(|c| c.task.seq).collect();
    assert_eq!(ids, [6, 4, 5]);
    assert!(got.iter().all(|c| c.claim == 1));
    assert_eq!(a.queue_len(&tool_queue("even")).await.unwrap(), 1);
    assert_eq!(a.queue_len(&tool_queue("odd")).await.unwrap(), 2);

    let deadline = Instant::now() + Duration::from_secs(30);
    while h.lease_alive().await.unwrap() {
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A total bound smaller than the queues' bounds: the first queue gets it all (hub A here:
    // H's short lease may end while this runs).
    let more: Vec<Task> = (7..=10)
        .map(|n| task(n, if n % 2 == 0 { "even" } else { "odd" }, 0))
        .collect();
    a.submit_batch(&more).await.unwrap();
    let got = a
        .claim_many(&[(tool_queue("odd"), 5), (tool_queue("even"), 5)], 3)
        .await
        .unwrap();
    let tools: Vec<&str> = got.iter().map(|c| c.task.spec.tool.as_str()).collect();
    assert_eq!(tools, ["odd", "odd", "odd"]);
    assert_eq!(a.queue_len(&tool_queue("even")).await.unwrap(), 3);
    assert!(
        a.claim_many(&[(tool_queue("odd"), 5)], 0)
            .await
            .unwrap()
            .is_empty()
    );
    let err = h
        .claim_many(&[(tool_queue("odd"), 5)], 5)
        .await
        .unwrap_err();
    assert!(matches!(err, shared::Error::Fenced(_)), "{err:?}");
    assert_eq!(a.queue_len(&tool_queue("odd")).await.unwrap(), 1);
}
