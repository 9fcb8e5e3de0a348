//! Durable tasks end to end with the real binaries: a hub on the embedded store SIGKILLed with
//! 10,000 tasks queued or running and restarted on the same data directory and port; a hub on
//! Redis whose `redis-server` is killed and restarted mid-run.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, RedisServer, Task, wait_until};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

fn sleep_tasks(n: usize, ms: u64) -> Vec<Value> {
    (0..n)
        .map(|_| json!({"tool": "sleep", "args": {"ms": ms}, "max_attempts": 5}))
        .collect()
}

/// Every task succeeded; its event stream holds events numbered 1, 2, 3... with no gap or
/// repeat and exactly one terminal event, `task_completed`. Returns how many tasks needed
/// more than one attempt.
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
    let retried: Vec<bool> = futures::stream::iter(tasks.iter().map(|t| async move {
        let events = api.events(&t.task_id, Duration::from_secs(30)).await?;
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        ensure!(
            seqs == (1..=events.len() as u64).collect::<Vec<_>>(),
            "task {} event seqs {seqs:?}",
            t.task_id
        );
        apex_tests::api::completed_once(&t.task_id, &events)?;
        Ok::<_, anyhow::Error>(t.attempt > 1)
    }))
    .buffer_unordered(16)
    .try_collect()
    .await?;
    Ok(retried.into_iter().filter(|r| *r).count())
}

async fn health_count(api: &Api, status: &str) -> Result<u64> {
    let h = api.health().await?;
    Ok(h["tasks"][status].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_survives_sigkill_with_10000_tasks() {
    // A long grace period: every node reconnects (its backoff is capped at 10 s) and reclaims
    // what it holds, so no task may run twice.
    let mut hub = Hub::start(HubOptions {
        extra_args: vec![
            "--store".into(),
            "embedded".into(),
            "--recovery-grace-ms".into(),
            "30000".into(),
        ],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            Node::start(
                &hub,
                NodeOptions::named(&format!("dur-{i}"))
                    .concurrency(16)
                    .args(["--log-level", "info,apex_node::executor=debug"]),
            )
            .await
            .unwrap(),
        );
    }
    let api = hub.api().clone();
    let ids: Vec<String> = api
        .submit_many(&sleep_tasks(10_000, 40))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    // Kill while some are done, some running and most still queued.
    wait_until("some tasks to finish", WAIT, || {
        let api = api.clone();
        async move { Ok((health_count(&api, "succeeded").await? >= 500).then_some(())) }
    })
    .await
    .unwrap();
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    // Everything accepted is back at once: no task missing after the restart.
    let h = api.health().await.unwrap();
    assert_eq!(h["tasks"]["total"].as_u64(), Some(10_000), "{h}");
    let succeeded = h["tasks"]["succeeded"].as_u64().unwrap();
    assert!(succeeded >= 500, "finished tasks keep their results: {h}");
    assert!(
        succeeded < 9_000,
        "the kill came after most tasks were done: {h}"
    );
    // Nodes reconnect by themselves and reclaim what they were running.
    let tasks = api.wait_all_terminal(&ids, WAIT, 64).await.unwrap();
    let retried = check_committed_once(&api, &tasks).await.unwrap();
    eprintln!("{retried} of 10000 tasks needed a second attempt after the restart");
    // Executed once: the nodes' logs name each task in exactly one `task started` line.
    let logs: Vec<String> = nodes.iter().map(|n| n.log_text()).collect();
    let started = apex_tests::process::task_starts(logs.iter().map(String::as_str));
    let twice: Vec<_> = started.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks started more than once: {twice:?}");
    assert_eq!(started.len(), 10_000, "every task started on a node");
    let log = std::fs::read_to_string(hub.dir().unwrap().join("hub-2.log")).unwrap();
    assert!(log.contains("tasks recovered from the store"), "{log}");
    // Tasks that were running at the kill stayed with their nodes (same attempt).
    assert!(
        log.contains("node reclaimed tasks after a hub restart"),
        "no node reclaimed a task: {log}"
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_and_their_events_survive_a_restart() {
    let mut hub = Hub::start(HubOptions::fast_liveness()).await.unwrap();
    let node = Node::start(&hub, NodeOptions::named("ev-0")).await.unwrap();
    let api = hub.api().clone();
    let t = api
        .submit(&json!({"tool": "echo", "args": {"hello": "world"}}))
        .await
        .unwrap();
    let done = api.wait_terminal(&t.task_id, WAIT).await.unwrap();
    let before = api.events(&t.task_id, WAIT).await.unwrap();
    drop(node);
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    let again = api.get(&t.task_id).await.unwrap();
    assert_eq!(again.status, "succeeded");
    assert_eq!(again.result, done.result);
    let after = api.events(&t.task_id, WAIT).await.unwrap();
    assert_eq!(
        before, after,
        "the event stream is the same after a restart"
    );
    // The registry snapshot: the node is listed offline and can still be pinned.
    let nodes = api.nodes().await.unwrap();
    let n = nodes
        .iter()
        .find(|n| n.name == "ev-0")
        .expect("node listed after restart");
    assert_eq!(n.status, "offline");
    let pinned = api
        .submit(&json!({"tool": "echo", "node_id": n.id}))
        .await
        .unwrap();
    assert_eq!(pinned.status, "queued");
    // A second hub on the same data directory is refused, naming the lock file.
    let mut second = Hub::start(HubOptions {
        data_dir: Some(hub.dir().unwrap().join("data")),
        ..HubOptions::default()
    })
    .await;
    let e = match second.as_mut() {
        Ok(_) => panic!("a second hub opened a locked data directory"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("hub.lock"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_store_stops_the_hub_with_a_clear_error() {
    let mut hub = Hub::start(HubOptions::default()).await.unwrap();
    let t = hub.api().submit(&json!({"tool": "echo"})).await.unwrap();
    assert_eq!(t.status, "queued");
    hub.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let file = hub.dir().unwrap().join("data/tasks.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();
    let e = format!("{:#}", hub.start_again().await.unwrap_err());
    assert!(e.contains("tasks.redb") && e.contains("unreadable"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_loses_no_accepted_task_when_redis_restarts() {
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start_persistent(redis_dir.path()).unwrap();
    let mut hub = Hub::start(HubOptions {
        extra_args: vec!["--store".into(), redis.url()],
        ..HubOptions::fast_liveness()
    })
    .await
    .unwrap();
    let _nodes = [
        Node::start(&hub, NodeOptions::named("rd-0").concurrency(16))
            .await
            .unwrap(),
        Node::start(&hub, NodeOptions::named("rd-1").concurrency(16))
            .await
            .unwrap(),
    ];
    let api = hub.api().clone();
    // A client submits batches in a loop; 503s are counted, accepted ids kept.
    let accepted: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (api, accepted, refused, stop) =
            (api.clone(), accepted.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let resp = api
                    .request(reqwest::Method::POST, "/api/v1/tasks/batch")
                    .json(&json!({"tasks": sleep_tasks(50, 2)}))
                    .send()
                    .await;
                let (status, body) = apex_tests::api::json_of(resp.unwrap()).await.unwrap();
                match status.as_u16() {
                    201 => {
                        let ids = body["data"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|t| t["task_id"].as_str().unwrap().to_owned());
                        accepted.lock().unwrap().extend(ids);
                    }
                    503 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    other => panic!("unexpected answer {other}: {body}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.stop();
    // While Redis is down, submissions are refused with 503 and a clear error.
    let (status, body) = api.submit_raw(&json!({"tool": "echo"})).await.unwrap();
    assert_eq!(status.as_u16(), 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart().unwrap();
    // The hub recovers by itself.
    wait_until("submissions to be accepted again", WAIT, || {
        let api = api.clone();
        async move {
            let (s, _) = api.submit_raw(&json!({"tool": "echo"})).await?;
            Ok((s.as_u16() == 201).then_some(()))
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert!(refused.load(Ordering::Relaxed) > 0, "the client saw 503s");
    // Every accepted task finishes, and all of it is in Redis: a restarted hub has them all.
    let ids = accepted.lock().unwrap().clone();
    assert!(ids.len() >= 100, "only {} tasks accepted", ids.len());
    let tasks = api.wait_all_terminal(&ids, WAIT, 64).await.unwrap();
    check_committed_once(&api, &tasks).await.unwrap();
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    for chunk in ids.chunks(500) {
        for id in chunk {
            let t = api.get(id).await.unwrap();
            assert_eq!(t.status, "succeeded", "task {id} after the hub restarted");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_stream_resumes_across_a_restart_with_last_event_id() {
    let mut hub = Hub::start(HubOptions {
        extra_args: vec!["--recovery-grace-ms".into(), "30000".into()],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let _node = Node::start(&hub, NodeOptions::named("sse-0"))
        .await
        .unwrap();
    let api = hub.api().clone();
    let t = api
        .submit(&json!({"tool": "sleep", "args": {"ms": 3000}}))
        .await
        .unwrap();
    // Running: the node reported progress, so it holds the task.
    wait_until("the task to run", WAIT, || {
        let api = api.clone();
        let id = t.task_id.clone();
        async move { Ok((api.get(&id).await?.status == "running").then_some(())) }
    })
    .await
    .unwrap();
    // The client has seen events 1 (created) and 2 (assigned) when the hub dies.
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    let resp = api
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/tasks/{}/events", t.task_id),
        )
        .header("Last-Event-ID", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut parser = apex_tests::api::SseParser::default();
    let mut body = resp.bytes_stream();
    let read = async {
        while let Some(chunk) = body.next().await {
            parser.push(&chunk.unwrap()).unwrap();
        }
    };
    tokio::time::timeout(WAIT, read).await.unwrap();
    parser.finish().unwrap();
    let seqs: Vec<u64> = parser
        .events
        .iter()
        .filter_map(|(_, d)| d["seq"].as_u64())
        .collect();
    let names: Vec<&str> = parser.events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(seqs.first(), Some(&3), "{names:?} {seqs:?}");
    assert_eq!(
        seqs,
        (3..3 + seqs.len() as u64).collect::<Vec<_>>(),
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"task_completed"), "{names:?}");
    // The node kept the task across the restart: one attempt.
    assert_eq!(api.get(&t.task_id).await.unwrap().attempt, 1);
}
