//! Asynchronous plugins' signed callbacks and the plugin catalogue, against the real `apex-hub`
//! binary: a raw node declares plugins (as `apex-node --plugin-dir` does, in
//! `ToolDescription.plugin`), the hub puts the callback URL and signing key in `task_assign`,
//! and the test plays the plugin posting to `/plugin-callback/{plugin}/{taskId}`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use apex_protocol::{
    HubMessage, NodeRegister, PluginInfo, PluginType, TaskAssign, TaskProgress, ToolDescription,
    ToolSpec,
};
use apex_tests::shared::shared_hub;
use apex_tests::ws::{RawNode, register_msg};
use apex_tests::{Hub, HubOptions, RedisServer};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn plugin_tool(name: &str, plugin_type: PluginType, callback_auth: Option<&str>) -> ToolSpec {
    ToolSpec::Described(ToolDescription {
        plugin: Some(Box::new(PluginInfo {
            version: Some("1.2.0".into()),
            author: Some("apex tests".into()),
            capabilities: vec!["report".into()],
            plugin_type,
            callback_auth: callback_auth.map(str::to_owned),
            dependencies: vec!["python3".into()],
            ..PluginInfo::default()
        })),
        ..ToolDescription::new(
            name,
            Some("writes a report later".into()),
            Some(json!({"type": "object", "properties": {"topic": {"type": "string"}}})),
        )
    })
}

async fn plugin_node(hub: &Hub, id: &str, tools: Vec<ToolSpec>) -> RawNode {
    let mut node = RawNode::connect_native(hub).await.unwrap();
    let reg = NodeRegister {
        tools,
        ..register_msg(Some(id), id, &[], 4)
    };
    assert!(node.register(reg).await.unwrap().success);
    node
}

async fn assigned(node: &mut RawNode) -> TaskAssign {
    node.expect("task_assign", |m| match m {
        HubMessage::TaskAssign(a) => Some(a.clone()),
        _ => None,
    })
    .await
    .unwrap()
}

/// `sha256=<hex HMAC-SHA256(key, "<ts>.<body>")>`, computed here independently of the hub.
fn signature(key: &str, ts: &str, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn now_secs() -> i64 {
    apex_protocol::now_ms() / 1000
}

async fn post_callback(
    url: &str,
    body: &str,
    ts: Option<String>,
    sig: Option<String>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(ts) = ts {
        req = req.header("X-Apex-Timestamp", ts);
    }
    if let Some(sig) = sig {
        req = req.header("X-Apex-Signature", sig);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Submits a task for the async plugin and returns it with the callback its node was given.
async fn pending_task(hub: &Hub, node: &mut RawNode, tool: &str) -> (String, String, String) {
    let t = hub
        .api()
        .submit(&json!({"tool": tool, "args": {"topic": "weather"}}))
        .await
        .unwrap();
    let a = assigned(node).await;
    assert_eq!(a.task_id, t.task_id);
    let cb = &a.metadata.as_ref().expect("task_assign.metadata")["callback"];
    let url = cb["url"].as_str().expect("callback.url").to_owned();
    let key = cb["secret"].as_str().expect("callback.secret").to_owned();
    assert!(
        url.starts_with(&format!(
            "{}/plugin-callback/{tool}/{}?token=",
            hub.url(),
            t.task_id
        )),
        "{url}"
    );
    // The plugin answered "pending": the node reports it running.
    node.send(TaskProgress {
        task_id: t.task_id.clone(),
        attempt: a.attempt,
        progress: 0.0,
        message: Some("waiting for the plugin's callback".into()),
        ..TaskProgress::default()
    })
    .unwrap();
    (t.task_id, url, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_plugin_finishes_by_a_signed_callback_and_forgeries_are_refused() {
    let hub = Hub::start_default().await.unwrap();
    let mut node = plugin_node(
        &hub,
        "async-node",
        vec![plugin_tool("slow_report", PluginType::Asynchronous, None)],
    )
    .await;
    let (id, url, key) = pending_task(&hub, &mut node, "slow_report").await;
    let body = r#"{"status":"success","result":{"report":"sunny"}}"#;
    let ts = now_secs().to_string();

    // Unsigned, signed with another key, a replayed (old) timestamp, a wrong token.
    let (s, e) = post_callback(&url, body, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    assert_eq!(e["error"]["code"], "missing_signature", "{e}");
    let forged = signature("not-the-key", &ts, body);
    let (s, e) = post_callback(&url, body, Some(ts.clone()), Some(forged)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "invalid_signature", "{e}");
    let old = (now_secs() - 600).to_string();
    let replayed = signature(&key, &old, body);
    let (s, e) = post_callback(&url, body, Some(old), Some(replayed)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "stale_timestamp", "{e}");
    let wrong_token = format!("{}0", url.trim_end_matches(char::is_alphanumeric));
    let (s, e) = post_callback(
        &wrong_token,
        body,
        Some(ts.clone()),
        Some(signature(&key, &ts, body)),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "invalid_callback_token", "{e}");
    // Another plugin's name, or a task that does not exist: 404 in the error shape.
    let other = url.replace("/slow_report/", "/other_plugin/");
    let (s, e) = post_callback(&other, body, None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["success"], false);
    let unknown = url.replace(&id, "no-such-task");
    assert_eq!(
        post_callback(&unknown, body, None, None).await.0,
        StatusCode::NOT_FOUND
    );
    // None of them touched the task.
    assert_eq!(hub.api().get(&id).await.unwrap().status, "running");

    // The real one ends it, and the node is told to stop waiting.
    let (s, e) = post_callback(
        &url,
        body,
        Some(ts.clone()),
        Some(signature(&key, &ts, body)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(e["status"], "success", "{e}");
    assert!(e["message"].as_str().unwrap().contains("succeeded"), "{e}");
    let t = hub.api().get(&id).await.unwrap();
    assert_eq!(t.status, "succeeded");
    assert_eq!(t.result, json!({"report": "sunny"}));
    let reason = node
        .expect("task_cancel", |m| match m {
            HubMessage::TaskCancel(c) if c.task_id == id => Some(c.reason.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert!(reason.contains("callback"), "{reason}");

    // A second callback (here a failure) answers 200 and changes nothing.
    let failed = r#"{"status":"failed","error":"too late"}"#;
    let (s, e) = post_callback(
        &url,
        failed,
        Some(ts.clone()),
        Some(signature(&key, &ts, failed)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert!(e["message"].as_str().unwrap().contains("already"), "{e}");
    let again = hub.api().get(&id).await.unwrap();
    assert_eq!(again.status, "succeeded");
    assert_eq!(again.result, t.result);

    // A failure report fails the next task with the plugin's error.
    let (id2, url2, key2) = pending_task(&hub, &mut node, "slow_report").await;
    let (s, _) = post_callback(
        &url2,
        failed,
        Some(ts.clone()),
        Some(signature(&key2, &ts, failed)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let t2 = hub.api().get(&id2).await.unwrap();
    assert_eq!(t2.status, "failed");
    let err = format!("{:?}", t2.error);
    assert!(err.contains("too late"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_only_plugin_may_call_back_unsigned_but_a_signed_plugin_may_not() {
    let hub = Hub::start_default().await.unwrap();
    let mut node = plugin_node(
        &hub,
        "token-node",
        vec![plugin_tool(
            "legacy",
            PluginType::Asynchronous,
            Some("token"),
        )],
    )
    .await;
    let (id, url, _) = pending_task(&hub, &mut node, "legacy").await;
    let (s, e) = post_callback(&url, r#"{"status":"success","output":"done"}"#, None, None).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let t = hub.api().get(&id).await.unwrap();
    assert_eq!((t.status.as_str(), t.result), ("succeeded", json!("done")));
    // A synchronous plugin gets no callback at all.
    let mut sync = plugin_node(
        &hub,
        "sync-node",
        vec![plugin_tool("quick", PluginType::Synchronous, None)],
    )
    .await;
    hub.api()
        .submit(&json!({"tool": "quick", "args": {}}))
        .await
        .unwrap();
    let a = assigned(&mut sync).await;
    assert!(
        a.metadata
            .as_ref()
            .is_none_or(|m| m.get("callback").is_none()),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_task_survives_a_hub_sigkill_and_the_callback_after_restart_completes_it() {
    let mut hub = Hub::start(HubOptions::default()).await.unwrap();
    let mut node = plugin_node(
        &hub,
        "async-node",
        vec![plugin_tool("slow_report", PluginType::Asynchronous, None)],
    )
    .await;
    let (id, url, key) = pending_task(&hub, &mut node, "slow_report").await;
    // The progress is durable before the kill: wait until the hub shows it running.
    let mut status = String::new();
    for _ in 0..100 {
        status = hub.api().get(&id).await.unwrap().status;
        if status == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "running");
    hub.kill_and_restart().await.unwrap();
    node.abort();
    // The node comes back with the task still in flight (its plugin is still working).
    let mut node = RawNode::connect_native(&hub).await.unwrap();
    let reg = NodeRegister {
        tools: vec![plugin_tool("slow_report", PluginType::Asynchronous, None)],
        inflight: Some(vec![id.clone()]),
        ..register_msg(Some("async-node"), "async-node", &[], 4)
    };
    assert!(node.register(reg).await.unwrap().success);
    assert_eq!(hub.api().get(&id).await.unwrap().status, "running");

    let body = r#"{"status":"success","result":"after the restart"}"#;
    let ts = now_secs().to_string();
    let (s, e) = post_callback(
        &url,
        body,
        Some(ts.clone()),
        Some(signature(&key, &ts, body)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let t = hub.api().wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!(t.status, "succeeded");
    assert_eq!(t.result, json!("after the restart"));
    assert_eq!(t.attempt, 1, "the task never ran twice: {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_and_tools_are_listed_and_switches_hold_across_shared_hubs_and_restarts() {
    let redis = RedisServer::start().unwrap();
    let mut a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let _node = plugin_node(
        &a,
        "plugin-node",
        vec![
            plugin_tool("word_count", PluginType::Synchronous, None),
            ToolSpec::Name("echo".into()),
        ],
    )
    .await;

    // The catalogue at hub B shows hub A's node.
    let mut plugins: Value = Value::Null;
    for _ in 0..100 {
        plugins = b.api().get_json("/api/v1/plugins").await.unwrap();
        if plugins.as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = &plugins[0];
    assert_eq!(p["name"], "word_count", "{plugins}");
    assert_eq!(p["version"], "1.2.0");
    assert_eq!(p["author"], "apex tests");
    assert_eq!(p["capabilities"], json!(["report"]));
    assert_eq!(p["dependencies"], json!(["python3"]));
    assert_eq!(p["enabled"], true);
    assert_eq!(p["nodes"], json!(["plugin-node"]));
    let tools: Value = b.api().get_json("/api/v1/tools").await.unwrap();
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["echo", "word_count"], "{tools}");
    assert_eq!(
        tools["tools"][1]["parameters"]["properties"]["topic"]["type"],
        "string"
    );
    let one: Value = b.api().get_json("/api/v1/tools/word_count").await.unwrap();
    assert_eq!(one["nodes"], json!(["plugin-node"]), "{one}");
    let (s, e) = json_get(&b, "/api/v1/tools/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");

    // Disabled at B: A refuses its tasks (within a poll), says so in the list, and still does
    // after a restart; other tools run on.
    let (s, e) = json_post(&b, "/api/v1/plugins/word_count/disable").await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert!(e["message"].as_str().unwrap().contains("disabled"), "{e}");
    let refused = until_status(&a, "word_count", StatusCode::CONFLICT).await;
    assert_eq!(refused["error"]["code"], "plugin_disabled", "{refused}");
    let listed: Value = a.api().get_json("/api/v1/plugins").await.unwrap();
    assert_eq!(listed[0]["enabled"], false, "{listed}");
    a.kill_and_restart().await.unwrap();
    let (s, e) = a
        .api()
        .submit_raw(&json!({"tool": "word_count", "args": {}}))
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, _) = a
        .api()
        .submit_raw(&json!({"tool": "echo", "args": {}}))
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    // Enabled again at A: B takes its tasks.
    let (s, _) = json_post(&a, "/api/v1/plugins/word_count/enable").await;
    assert_eq!(s, StatusCode::OK);
    until_status(&b, "word_count", StatusCode::CREATED).await;
    // An unknown plugin is a 404.
    let (s, e) = json_post(&a, "/api/v1/plugins/nope/disable").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

async fn json_get(hub: &Hub, path: &str) -> (StatusCode, Value) {
    let r = hub
        .api()
        .request(reqwest::Method::GET, path)
        .send()
        .await
        .unwrap();
    apex_tests::api::json_of(r).await.unwrap()
}

async fn json_post(hub: &Hub, path: &str) -> (StatusCode, Value) {
    let r = hub
        .api()
        .request(reqwest::Method::POST, path)
        .send()
        .await
        .unwrap();
    apex_tests::api::json_of(r).await.unwrap()
}

/// Submits `tool` at `hub` until the answer has `status` (a switch reaches other hubs within
/// one poll); returns that answer's body.
async fn until_status(hub: &Hub, tool: &str, status: StatusCode) -> Value {
    let mut last = (StatusCode::OK, Value::Null);
    for _ in 0..100 {
        last = hub
            .api()
            .submit_raw(&json!({"tool": tool, "args": {}}))
            .await
            .unwrap();
        if last.0 == status {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{tool} at {} never answered {status}: {last:?}", hub.url());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_reaches_another_shared_hub_ends_the_task_at_its_holder() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let mut node = plugin_node(
        &a,
        "async-at-a",
        vec![plugin_tool("slow_report", PluginType::Asynchronous, None)],
    )
    .await;
    let (id, url, key) = pending_task(&a, &mut node, "slow_report").await;
    // A load balancer sends the plugin's POST to hub B.
    let at_b = url.replace(&a.url(), &b.url());
    assert_ne!(at_b, url);
    let body = r#"{"status":"success","result":"via b"}"#;
    let ts = now_secs().to_string();
    let (s, e) = post_callback(
        &at_b,
        body,
        Some(ts.clone()),
        Some(signature(&key, &ts, body)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let t = a.api().wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!((t.status.as_str(), t.result), ("succeeded", json!("via b")));
    // Hub A, which holds the node, told it to stop waiting.
    node.expect("task_cancel", |m| match m {
        HubMessage::TaskCancel(c) if c.task_id == id => Some(()),
        _ => None,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vcp_nodes_plugin_callback_forward_ends_its_task_once() {
    let hub = Hub::start_default().await.unwrap();
    let mut node = RawNode::connect_vcp(&hub).await.unwrap();
    node.send_json(&json!({"type": "register_tools", "data": {
        "serverName": "VcpAsync",
        "tools": [{"name": "VideoGen", "displayName": "Video", "version": "0.3",
                   "author": "vcp", "description": "renders a video later",
                   "pluginType": "asynchronous",
                   "capabilities": {"invocationCommands": [
                       {"commandIdentifier": "submit", "description": "start a render",
                        "example": "{\"prompt\":\"cat\"}"}]}}]}}))
        .unwrap();
    hub.wait_node_online("VcpAsync").await.unwrap();
    // Its manifest shows in the catalogue, with the invocation command as capability and
    // example.
    let plugins: Value = hub.api().get_json("/api/v1/plugins").await.unwrap();
    assert_eq!(plugins[0]["name"], "VideoGen", "{plugins}");
    assert_eq!(plugins[0]["plugin_type"], "asynchronous");
    assert_eq!(plugins[0]["capabilities"], json!(["submit"]));
    let tool: Value = hub.api().get_json("/api/v1/tools/VideoGen").await.unwrap();
    assert_eq!(
        tool["examples"][0]["description"], "start a render",
        "{tool}"
    );

    let t = hub
        .api()
        .submit(&json!({"tool": "VideoGen", "args": {"prompt": "cat"}}))
        .await
        .unwrap();
    node.expect("execute_tool", |m| match m {
        HubMessage::ExecuteTool(e) => Some(e.clone()),
        _ => None,
    })
    .await
    .unwrap();
    let forward = |status: &str, result: &str| {
        json!({"type": "plugin_callback_forward", "data": {"serverName": "VcpAsync",
            "callbackData": {"pluginName": "VideoGen", "taskId": t.task_id,
                             "status": status, "result": result}}})
    };
    node.send_json(&forward("success", "video.mp4")).unwrap();
    let done = hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap();
    assert_eq!(
        (done.status.as_str(), done.result),
        ("succeeded", json!("video.mp4"))
    );
    // A second forward changes nothing.
    node.send_json(&forward("failed", "late")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.api().get(&t.task_id).await.unwrap().status, "succeeded");

    // As VCP plugins do it: the plugin's `tool_result` is its "accepted" answer with an id of
    // its own; the task keeps running until the forward naming that id, whose fields are the
    // result.
    let t = hub
        .api()
        .submit(&json!({"tool": "VideoGen", "args": {"prompt": "dog"}}))
        .await
        .unwrap();
    let exec = node
        .expect("execute_tool", |m| match m {
            HubMessage::ExecuteTool(e) => Some(e.clone()),
            _ => None,
        })
        .await
        .unwrap();
    node.send_json(
        &json!({"type": "tool_result", "data": {"requestId": exec.request_id,
        "status": "success", "result": "Video task vid-42 submitted; the result follows."}}),
    )
    .unwrap();
    let running = wait_until_status(&hub, &t.task_id, "running").await;
    assert!(
        running.extra["message"]
            .as_str()
            .unwrap()
            .contains("vid-42"),
        "{running:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.api().get(&t.task_id).await.unwrap().status, "running");
    node.send_json(
        &json!({"type": "plugin_callback_forward", "data": {"serverName": "VcpAsync",
        "callbackData": {"pluginName": "VideoGen", "taskId": "vid-42", "status": "Succeed",
                         "videoUrl": "https://cdn.example/vid-42.mp4"}}}),
    )
    .unwrap();
    let done = hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap();
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(
        done.result,
        json!({"videoUrl": "https://cdn.example/vid-42.mp4"})
    );
}

async fn wait_until_status(hub: &Hub, id: &str, status: &str) -> apex_tests::Task {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = hub.api().get(id).await.unwrap();
        if t.status == status {
            return t;
        }
        assert!(
            !t.is_terminal() && tokio::time::Instant::now() < deadline,
            "{t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
