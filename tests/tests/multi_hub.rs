//! Several hubs on one Redis (`hub_mode = "shared"`) with the real binaries and a real
//! `redis-server`: a task submitted at one hub runs on a node connected only to another hub and
//! its result is readable at the first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use apex_tests::shared::{shared_hub, stored_record};
use apex_tests::{Hub, HubOptions, Node, NodeOptions, RedisServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_at_hub_a_runs_on_a_node_of_hub_b_and_is_read_at_a() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let node = Node::start(&b, NodeOptions::named("only-at-b"))
        .await
        .unwrap();

    let mut ids = Vec::new();
    for i in 0..5 {
        let t = a
            .api()
            .submit(&json!({"tool": "echo", "args": {"text": format!("hello {i}")}}))
            .await
            .unwrap();
        assert_eq!(t.status, "queued");
        ids.push(t.task_id);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = a.api().wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
        assert_eq!(t.node_id.as_deref(), Some(node.id()), "{t:?}");
        assert_eq!(t.attempt, 1);
        let text = serde_json::to_string(&t.result).unwrap();
        assert!(text.contains(&format!("hello {i}")), "{text}");
        // Hub B, which ran it, has it too.
        assert_eq!(b.api().get(id).await.unwrap().status, "succeeded");
    }
    // Hub A never held the tasks: it lists them, newest first.
    let listed = a.api().list_all(&[("status", "succeeded")]).await.unwrap();
    let listed: Vec<&str> = listed.iter().map(|t| t.task_id.as_str()).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    // Its SSE stream replays them from the shared record.
    let events = a.api().events(&ids[0], WAIT).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"task_created"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"task_completed"), "{kinds:?}");
    assert!(kinds.contains(&"task_assigned"), "{kinds:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // Followed live at A while it runs at B (A wakes on B's record changes): every event
    // once, in order, through the terminal one.
    let live = a
        .api()
        .submit(&json!({"tool": "sleep", "args": {"ms": 2_000}}))
        .await
        .unwrap();
    let events = a.api().events(&live.task_id, WAIT).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"task_created"), "{kinds:?}");
    assert!(kinds.contains(&"task_assigned"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"task_completed"), "{kinds:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // A task no node can run waits in the shared queue; hub B cancels it; hub A sees that.
    let stuck = a
        .api()
        .submit(&json!({"tool": "no_such_tool"}))
        .await
        .unwrap();
    let (status, body) = b.api().cancel(&stuck.task_id).await.unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    assert_eq!(
        a.api().get(&stuck.task_id).await.unwrap().status,
        "cancelled"
    );
    let (status, _) = a.api().cancel(&stuck.task_id).await.unwrap();
    assert_eq!(status.as_u16(), 409);

    // A task running at hub B's node is cancelled from hub A: B is asked and does it.
    let long = a
        .api()
        .submit(&json!({"tool": "sleep", "args": {"ms": 60_000}}))
        .await
        .unwrap();
    apex_tests::wait_until("the long task to run at hub B", WAIT, || {
        let (api, id) = (a.api().clone(), long.task_id.clone());
        async move { Ok((api.get(&id).await?.status == "running").then_some(())) }
    })
    .await
    .unwrap();
    let (status, body) = a.api().cancel(&long.task_id).await.unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    assert_eq!(
        b.api().get(&long.task_id).await.unwrap().status,
        "cancelled"
    );

    // Hub A lists hub B's node (online, connected to B) although it has none of its own.
    let b_id = b
        .api()
        .get_json::<serde_json::Value>("/v1/nodes")
        .await
        .unwrap()["data"][0]["hub"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = apex_tests::wait_until("hub A to list hub B's node", WAIT, || {
        let api = a.api().clone();
        let id = node.id().to_owned();
        async move {
            let body: serde_json::Value = api.get_json("/v1/nodes?status=online").await?;
            let data = body["data"].as_array().cloned().unwrap_or_default();
            Ok(data.into_iter().find(|n| n["id"] == id.as_str()))
        }
    })
    .await
    .unwrap();
    assert_eq!(listed["hub"], b_id.as_str(), "{listed}");
    assert_eq!(listed["name"], "only-at-b", "{listed}");

    // Hub A reads that node, lists its tasks, and drains and undrains it (at B).
    let path = format!("/v1/nodes/{}", node.id());
    let one: serde_json::Value = a.api().get_json(&path).await.unwrap();
    assert_eq!(one["hub"], b_id.as_str(), "{one}");
    assert_eq!(one["status"], "online", "{one}");
    let (status, _) = apex_tests::api::json_of(
        a.api()
            .request(reqwest::Method::GET, "/v1/nodes/no-such-node")
            .send()
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status.as_u16(), 404);
    let done: serde_json::Value = a
        .api()
        .get_json(&format!("{path}/tasks?status=succeeded&limit=100"))
        .await
        .unwrap();
    let rows = done["data"].as_array().unwrap();
    assert_eq!(done["meta"]["total"].as_u64(), Some(rows.len() as u64));
    for id in &ids {
        assert!(
            rows.iter().any(|t| t["task_id"] == id.as_str()),
            "{id}: {done}"
        );
    }
    for (action, want) in [("drain", "draining"), ("undrain", "online")] {
        let (status, body) = apex_tests::api::json_of(
            a.api()
                .request(reqwest::Method::POST, &format!("{path}/{action}"))
                .send()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(status.as_u16(), 200, "{action}: {body}");
        assert_eq!(body["status"], want, "{action}: {body}");
        let at_b: serde_json::Value = b.api().get_json(&path).await.unwrap();
        assert_eq!(at_b["status"], want, "{action} at B: {at_b}");
    }
    // Undrained, it takes work again.
    let after = a
        .api()
        .submit(&json!({"tool": "echo", "args": {"text": "after"}}))
        .await
        .unwrap();
    let t = a.api().wait_terminal(&after.task_id, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");

    // The same idempotency key at both hubs names one task.
    let body = json!({"tool": "echo", "args": {"text": "once"}, "idempotency_key": "k-1"});
    let first = a.api().submit(&body).await.unwrap();
    let (status, again) = b.api().submit_raw(&body).await.unwrap();
    assert_eq!(status.as_u16(), 200, "{again}");
    assert_eq!(again["task_id"], first.task_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_sigkilled_mid_run_loses_nothing_and_no_task_completes_twice() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    // Each node knows both hubs, listed in a different order: they start spread over both.
    // Their executors log each `task started` (debug), to count runs per task.
    let log = ["--log-level", "info,apex_node::executor=debug"];
    let na = Node::start(
        &a,
        NodeOptions::named("na")
            .concurrency(4)
            .args(["--hub", &b.ws_base()])
            .args(log),
    )
    .await
    .unwrap();
    let nb = Node::start(
        &b,
        NodeOptions::named("nb")
            .concurrency(4)
            .args(["--hub", &a.ws_base()])
            .args(log),
    )
    .await
    .unwrap();

    let mut ids = Vec::new();
    for i in 0..40 {
        let hub = if i % 2 == 0 { &a } else { &b };
        let t = hub
            .api()
            .submit(&json!({"tool": "sleep", "args": {"ms": 300}, "max_attempts": 5}))
            .await
            .unwrap();
        ids.push(t.task_id);
    }
    // Mid-run: some done, the rest queued or running on both hubs' nodes.
    apex_tests::wait_until("a few tasks to finish", WAIT, || {
        let (api, ids) = (b.api().clone(), ids.clone());
        async move {
            let mut done = 0;
            for id in &ids {
                if api.get(id).await?.status == "succeeded" {
                    done += 1;
                }
            }
            Ok((done >= 6).then_some(()))
        }
    })
    .await
    .unwrap();
    // While A's node runs tasks, freeze it, so they are still in flight when A dies; it
    // resumes, finds A gone and registers at B listing them.
    apex_tests::wait_until("hub A's node to run tasks", WAIT, || {
        let (api, id) = (a.api().clone(), na.id().to_owned());
        async move {
            let n = api.node(&id).await?;
            Ok(n.and_then(|n| n.active_tasks)
                .is_some_and(|k| k > 0)
                .then_some(()))
        }
    })
    .await
    .unwrap();
    na.freeze().unwrap();
    a.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    na.thaw().unwrap();

    // Hub B takes over: every task ends succeeded, read at B.
    for id in &ids {
        let t = b.api().wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
    }
    // Committed once: each stored record has exactly one terminal event, the last.
    let mut retried = 0;
    for id in &ids {
        let rec = stored_record(&redis, id).expect("a stored record");
        let kinds: Vec<&str> = rec["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        let terminal = kinds
            .iter()
            .filter(|k| {
                [
                    "task_completed",
                    "task_failed",
                    "task_cancelled",
                    "task_timed_out",
                ]
                .contains(k)
            })
            .count();
        assert_eq!(terminal, 1, "{id}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"task_completed"), "{id}: {kinds:?}");
        if kinds.contains(&"task_migrated") {
            retried += 1;
        }
    }
    eprintln!(
        "{retried} of {} tasks were requeued after the SIGKILL",
        ids.len()
    );
    // Run once: the tasks A's node was running when A died were handed over to B with their
    // node (which reconnected to B), not run again: each task id is in one `task started` line.
    let logs = [na.log_text(), nb.log_text()];
    let started = apex_tests::process::task_starts(logs.iter().map(String::as_str));
    let twice: Vec<_> = started.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks started more than once: {twice:?}");
    assert_eq!(started.len(), ids.len(), "every task started on a node");
    // And B did take some over (A's node was busy when A died).
    let b_log = b.log_text();
    let handed = b_log.matches("took over a task from a dead hub").count();
    assert!(handed > 0, "hub B took over no task: {b_log}");
    eprintln!("{handed} tasks were handed over to hub B with their node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_hubs_answer_503_while_redis_is_down_and_recover_by_themselves() {
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start_persistent(redis_dir.path()).unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let _node = Node::start(&b, NodeOptions::named("rb")).await.unwrap();
    let before = a
        .api()
        .submit(&json!({"tool": "echo", "args": {"text": "before"}}))
        .await
        .unwrap();
    assert_eq!(
        a.api()
            .wait_terminal(&before.task_id, WAIT)
            .await
            .unwrap()
            .status,
        "succeeded"
    );

    redis.stop();
    let (status, body) = a.api().submit_raw(&json!({"tool": "echo"})).await.unwrap();
    assert_eq!(status.as_u16(), 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    redis.restart().unwrap();
    // Both hubs recover by themselves: submissions are accepted again and run.
    let id = apex_tests::wait_until("submissions to be accepted again", WAIT, || {
        let api = a.api().clone();
        async move {
            let (status, body) = api
                .submit_raw(&json!({"tool": "echo", "args": {"text": "after"}}))
                .await?;
            Ok((status.as_u16() == 201).then(|| body["task_id"].as_str().unwrap().to_owned()))
        }
    })
    .await
    .unwrap();
    let t = a.api().wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    // What was accepted before the outage is still there.
    assert_eq!(
        b.api().get(&before.task_id).await.unwrap().status,
        "succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_whose_node_left_go_back_to_the_shared_queue_for_another_hubs_node() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(HubOptions {
        heartbeat_interval_ms: Some(200),
        heartbeat_timeout_ms: Some(600),
        ..shared_hub(&redis, Some(a.options()))
    })
    .await
    .unwrap();
    let mut gone = Node::start(&b, NodeOptions::named("gone").concurrency(2))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..6 {
        let t = a
            .api()
            .submit(&json!({"tool": "sleep", "args": {"ms": 3000}, "max_attempts": 3}))
            .await
            .unwrap();
        ids.push(t.task_id);
    }
    apex_tests::wait_until("two tasks running at hub B's node", WAIT, || {
        let (api, ids) = (a.api().clone(), ids.clone());
        async move {
            let mut running = 0;
            for id in &ids {
                if api.get(id).await?.status == "running" {
                    running += 1;
                }
            }
            Ok((running >= 2).then_some(()))
        }
    })
    .await
    .unwrap();
    // Hub B's only node dies; a node comes up at hub A. B holds tasks it cannot run now: it
    // hands them back and A's node runs them.
    gone.kill().unwrap();
    let fresh = Node::start(&a, NodeOptions::named("fresh").concurrency(2))
        .await
        .unwrap();
    let mut on_fresh = 0;
    for id in &ids {
        let t = a.api().wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
        if t.node_id.as_deref() == Some(fresh.id()) {
            on_fresh += 1;
        }
    }
    // At least the tasks that were running or queued at hub B when its node died (four or
    // more of six: two were running, each takes 3 s) finished on hub A's node.
    assert!(on_fresh >= 1, "no task ran on hub A's node");
}

/// SIGTERM of a shared hub whose leases last 120 s: a task its node finishes within the drain
/// (`--shared-shutdown-drain-ms 5000`) ends there, attempt 1; a task still running when the
/// drain ends is taken over by the other hub at once (not two minutes later, when the lease
/// would have expired) and runs on its node; tasks waiting in the shared queue run there too. The
/// hub exits cleanly, and every task ends `succeeded` with exactly one terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopped_with_sigterm_finishes_what_it_can_and_hands_the_rest_over_at_once() {
    let redis = RedisServer::start().unwrap();
    let mut opts = shared_hub(&redis, None);
    opts.extra_args.extend(
        [
            "--shared-lease-ttl-ms",
            "120000",
            "--shared-shutdown-drain-ms",
            "5000",
        ]
        .map(String::from),
    );
    let mut a = Hub::start(opts).await.unwrap();
    let mut opts = shared_hub(&redis, Some(a.options()));
    opts.extra_args
        .extend(["--shared-lease-ttl-ms", "120000"].map(String::from));
    let b = Hub::start(opts).await.unwrap();
    let na = Node::start(&a, NodeOptions::named("na").concurrency(2))
        .await
        .unwrap();

    let submit = |ms: u64| {
        let api = a.api().clone();
        async move {
            api.submit(&json!({"tool": "sleep", "args": {"ms": ms}}))
                .await
                .unwrap()
                .task_id
        }
    };
    let short = submit(2_500).await;
    let long = submit(20_000).await;
    apex_tests::wait_until("both tasks to run on hub A's node", WAIT, || {
        let (api, ids) = (a.api().clone(), [short.clone(), long.clone()]);
        async move {
            for id in &ids {
                if api.get(id).await?.status != "running" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await
    .unwrap();
    // Hub A's node is full and hub B has none: these wait in the shared queue.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(submit(100).await);
    }
    let nb = Node::start(&b, NodeOptions::named("nb").concurrency(2))
        .await
        .unwrap();

    a.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = apex_tests::wait_until("hub A to exit after SIGTERM", WAIT, || {
        let st = a.try_status();
        async move { st }
    })
    .await
    .unwrap();
    assert!(status.success(), "hub A exited with {status}");

    // Finished during the drain, on A's node, once.
    let t = b.api().wait_terminal(&short, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(
        (t.attempt, t.node_id.as_deref()),
        (1, Some(na.id())),
        "{t:?}"
    );
    // Still running when the drain ended: taken over at once and run on B's node. Hub A's
    // lease would have held it for 120 s; 60 s is plenty for the 20 s task and far short of
    // that.
    let t = b
        .api()
        .wait_terminal(&long, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(
        (t.attempt, t.node_id.as_deref()),
        (2, Some(nb.id())),
        "{t:?}"
    );
    for id in &waiting {
        let t = b.api().wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
    }
    for id in waiting.iter().chain([&short, &long]) {
        let rec = stored_record(&redis, id).expect("a stored record");
        let events = rec["events"].as_array().unwrap();
        let kinds = apex_tests::api::completed_once(id, events).unwrap();
        assert_eq!(
            kinds.contains(&"task_migrated"),
            id == &long,
            "{id}: {kinds:?}"
        );
    }
}

/// `apex_tasks_submitted_total` of a hub, from its `/metrics`.
async fn submitted_total(hub: &Hub) -> u64 {
    let text = hub
        .api()
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("apex_tasks_submitted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no apex_tasks_submitted_total in /metrics:\n{text}"))
}

/// A batch at a shared hub is accepted all or none: an invalid item gets 400 and a Redis error
/// part-way through (the last task's idempotency key is stored as a hash, so Redis refuses
/// it) gets 503 `store_unavailable`, and neither leaves any task behind at any hub; a good
/// batch is stored whole and counted in `apex_tasks_submitted_total` (an idempotent repeat is
/// not counted again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_at_a_shared_hub_is_accepted_all_or_none_and_counted() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    assert_eq!(submitted_total(&a).await, 0);
    let post = |body: serde_json::Value| {
        let api = a.api().clone();
        async move {
            let resp = api
                .request(reqwest::Method::POST, "/api/v1/tasks/batch")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };

    let (status, body) = post(json!({"tasks": [
        {"tool": "noop"},
        {"tool": "noop", "max_attempts": 0},
    ]}))
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "tasks[1].max_attempts", "{body}");

    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string()])
        // The idempotency index of the admin's key `broken` (keys are scoped to their owner).
        .args(["HSET", "apex:shared:idem:admin\u{1f}broken", "f", "v"])
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli failed");
    let (status, body) = post(json!({"tasks": [
        {"tool": "noop"},
        {"tool": "echo", "args": {"text": "x"}},
        {"tool": "noop", "idempotency_key": "broken"},
    ]}))
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    for hub in [&a, &b] {
        assert!(hub.api().list_all(&[]).await.unwrap().is_empty());
    }
    assert_eq!(submitted_total(&a).await, 0);

    let (status, body) = post(json!({"tasks": [
        {"tool": "noop"},
        {"tool": "echo", "args": {"text": "x"}},
        {"tool": "noop", "idempotency_key": "k"},
    ]}))
    .await;
    assert_eq!(status, 201, "{body}");
    let first: Vec<String> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first.len(), 3);
    assert_eq!(submitted_total(&a).await, 3);
    let (status, body) = post(json!({"tasks": [
        {"tool": "noop", "idempotency_key": "k"},
        {"tool": "noop"},
    ]}))
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"][0]["task_id"], first[2].as_str(), "{body}");
    assert_eq!(submitted_total(&a).await, 4);
    assert_eq!(submitted_total(&b).await, 0);
    let listed = b.api().list_all(&[]).await.unwrap();
    assert_eq!(listed.len(), 4);
}
