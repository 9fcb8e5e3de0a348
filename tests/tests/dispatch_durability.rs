//! `POST /v1/nodes/{id}/tasks` (a task pinned to one node) goes through the task service like
//! `POST /api/v1/tasks`: its 201 means the task is in the store. With the embedded store a hub
//! SIGKILLed right after the 201 finds every dispatched task on restart; in shared mode the
//! task is in Redis, so another hub reads and lists it (and takes it over if the first hub
//! dies). `waitForResult: true` answers with the finished task in both modes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use apex_tests::shared::{shared_hub, stored_record};
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, RedisServer, Task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// `POST /v1/nodes/{node}/tasks` with `body`: the status and body as received.
async fn dispatch(api: &Api, node: &str, body: &Value) -> (StatusCode, Value) {
    let resp = api
        .request(Method::POST, &format!("/v1/nodes/{node}/tasks"))
        .json(body)
        .send()
        .await
        .unwrap();
    apex_tests::api::json_of(resp).await.unwrap()
}

/// As [`dispatch`], expecting 201; returns the task.
async fn dispatch_created(api: &Api, node: &str, body: &Value) -> Task {
    let (status, v) = dispatch(api, node, body).await;
    assert_eq!(status, StatusCode::CREATED, "dispatch to {node}: {v}");
    assert_eq!(v["pinned_node_id"], node, "{v}");
    serde_json::from_value(v).unwrap()
}

fn pinned_node(t: &Task) -> Option<&str> {
    t.extra.get("pinned_node_id").and_then(Value::as_str)
}

/// `GET /api/v1/tasks/{id}` answers 200 (anything else panics) with the task.
async fn found(api: &Api, id: &str) -> Task {
    let resp = api
        .request(Method::GET, &format!("/api/v1/tasks/{id}"))
        .send()
        .await
        .unwrap();
    let (status, v) = apex_tests::api::json_of(resp).await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET /api/v1/tasks/{id}: {v}");
    serde_json::from_value(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_dispatched_to_a_node_survive_a_sigkill_right_after_the_201() {
    // A long grace period: the node reconnects and reclaims what it runs.
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
    let node = Node::start(&hub, NodeOptions::named("pinned-0").concurrency(8))
        .await
        .unwrap();
    let node_id = node.id().to_owned();

    // Three rounds: sleeps still running at the kill, then a quick echo; the kill comes
    // right after the round's last 201, and after the restart every task dispatched so far
    // is there at once, pinned to its node.
    let (mut sleeps, mut echoes) = (Vec::new(), Vec::new());
    for round in 0..3 {
        hub.wait_node_online("pinned-0").await.unwrap();
        let api = hub.api().clone();
        for _ in 0..2 {
            let body = json!({"tool": "sleep", "args": {"ms": 4_000}, "max_attempts": 5});
            sleeps.push(dispatch_created(&api, &node_id, &body).await.task_id);
        }
        let text = format!("quick {round}");
        let body = json!({"tool": "echo", "args": {"text": text}, "max_attempts": 5});
        echoes.push((dispatch_created(&api, &node_id, &body).await.task_id, text));
        hub.kill_and_restart().await.unwrap();
        let api = hub.api().clone();
        let all: Vec<&String> = sleeps
            .iter()
            .chain(echoes.iter().map(|(id, _)| id))
            .collect();
        for id in &all {
            let t = found(&api, id).await;
            assert_eq!(pinned_node(&t), Some(node_id.as_str()), "{t:?}");
        }
        let listed = api.list_all(&[]).await.unwrap();
        for id in &all {
            let t = listed
                .iter()
                .find(|t| &&t.task_id == id)
                .unwrap_or_else(|| panic!("task {id} not in GET /api/v1/tasks: {listed:?}"));
            assert_eq!(pinned_node(t), Some(node_id.as_str()), "{t:?}");
        }
    }
    let api = hub.api().clone();

    // The node reconnects by itself; each task ends succeeded, on it.
    hub.wait_node_online("pinned-0").await.unwrap();
    for id in &sleeps {
        let t = api.wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
        assert_eq!(t.result, json!({"slept_ms": 4_000}), "{t:?}");
        assert_eq!(t.node_id.as_deref(), Some(node_id.as_str()), "{t:?}");
    }
    for (id, text) in &echoes {
        let t = api.wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(t.status, "succeeded", "{t:?}");
        assert_eq!(t.result, json!({"echoed": {"text": text}}), "{t:?}");
        assert_eq!(t.node_id.as_deref(), Some(node_id.as_str()), "{t:?}");
    }

    // `waitForResult: true` answers with the finished task, and what it answered survives a
    // SIGKILL right after.
    let body = json!({"tool": "echo", "args": {"text": "waited"}, "waitForResult": true});
    let (status, v) = dispatch(&api, &node_id, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"echoed": {"text": "waited"}}), "{v}");
    assert_eq!(v["pinned_node_id"], node_id.as_str(), "{v}");
    let waited = v["task_id"].as_str().unwrap().to_owned();
    hub.kill_and_restart().await.unwrap();
    let t = found(hub.api(), &waited).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"echoed": {"text": "waited"}}), "{t:?}");
    // And the earlier ones kept their results across this last restart.
    for (id, text) in &echoes {
        let t = found(hub.api(), id).await;
        assert_eq!(t.status, "succeeded", "{t:?}");
        assert_eq!(t.result, json!({"echoed": {"text": text}}), "{t:?}");
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_dispatched_at_hub_a_is_in_redis_and_readable_and_listed_at_hub_b() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let node = Node::start(&a, NodeOptions::named("only-at-a"))
        .await
        .unwrap();
    let node_id = node.id().to_owned();

    let body = json!({"tool": "sleep", "args": {"ms": 1_500}});
    let id = dispatch_created(a.api(), &node_id, &body).await.task_id;
    // Right after the 201: hub B knows it, and its record is in Redis.
    let t = found(b.api(), &id).await;
    assert_eq!(pinned_node(&t), Some(node_id.as_str()), "{t:?}");
    let rec = stored_record(&redis, &id).expect("no record in Redis after the 201");
    assert_eq!(rec["id"], id.as_str(), "{rec}");
    assert_eq!(rec["spec"]["pinned_node"], node_id.as_str(), "{rec}");
    // It runs on the node at A; B follows it to the end with one `?wait_ms=`.
    let t = b.api().get_wait(&id, 60_000).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"slept_ms": 1_500}), "{t:?}");
    assert_eq!(t.node_id.as_deref(), Some(node_id.as_str()), "{t:?}");
    // B lists it (every hub's tasks), pinned to the node.
    let listed = b.api().list_all(&[]).await.unwrap();
    let row = listed
        .iter()
        .find(|t| t.task_id == id)
        .unwrap_or_else(|| panic!("task {id} not in hub B's list: {listed:?}"));
    assert_eq!(pinned_node(row), Some(node_id.as_str()), "{row:?}");
    assert_eq!(row.status, "succeeded", "{row:?}");
    let rec = stored_record(&redis, &id).unwrap();
    assert_eq!(rec["status"], "succeeded", "{rec}");
    // At hub A, which adopts it from the shared queue for its node, one `?wait_ms=` right
    // after the 201 answers with the finished task too.
    let body = json!({"tool": "sleep", "args": {"ms": 500}});
    let second = dispatch_created(a.api(), &node_id, &body).await.task_id;
    let t = a.api().get_wait(&second, 60_000).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"slept_ms": 500}), "{t:?}");

    // `waitForResult: true` at A answers with the finished task; B reads the same at once.
    let body = json!({"tool": "echo", "args": {"text": "shared"}, "wait_for_result": true});
    let (status, v) = dispatch(a.api(), &node_id, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"echoed": {"text": "shared"}}), "{v}");
    let waited = v["task_id"].as_str().unwrap();
    let t = found(b.api(), waited).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"echoed": {"text": "shared"}}), "{t:?}");
    let rec = stored_record(&redis, waited).expect("no record in Redis");
    assert_eq!(rec["status"], "succeeded", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_dispatched_at_a_shared_hub_sigkilled_right_after_the_201_ends_at_the_other_hub() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    // The node is connected to A and knows B as its fallback.
    let node = Node::start(
        &a,
        NodeOptions::named("moves-to-b").args(["--hub", &b.ws_base()]),
    )
    .await
    .unwrap();
    let node_id = node.id().to_owned();

    let body = json!({"tool": "sleep", "args": {"ms": 2_000}, "max_attempts": 5});
    let slow = dispatch_created(a.api(), &node_id, &body).await.task_id;
    let body = json!({"tool": "echo", "args": {"text": "last"}, "max_attempts": 5});
    let quick = dispatch_created(a.api(), &node_id, &body).await.task_id;
    a.signal(nix::sys::signal::Signal::SIGKILL).unwrap();

    // Hub A is gone: hub B has both tasks, and they end succeeded on the node (now at B).
    for id in [&slow, &quick] {
        let t = found(b.api(), id).await;
        assert_eq!(pinned_node(&t), Some(node_id.as_str()), "{t:?}");
    }
    let t = b.api().wait_terminal(&slow, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"slept_ms": 2_000}), "{t:?}");
    let t = b.api().wait_terminal(&quick, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!({"echoed": {"text": "last"}}), "{t:?}");
    drop(node);
}
