//! End-to-end tests of the node channel spoken by raw clients written in the test: both
//! dialects, captured third-party frames replayed, keys, bad frames, result fencing, timeouts
//! and cancel as a node sees them.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use apex_protocol::{
    Encoding, Heartbeat, HubMessage, NodeRegister, TaskAssign, TaskCancel, TaskResult,
    TaskResultAck, ToolDescription, ToolSpec,
};
use apex_tests::fixtures::captured;
use apex_tests::{DEFAULT_TIMEOUT, Hub, HubOptions, RawNode, Received, register_msg, wait_until};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(20);

async fn expect_assign(node: &mut RawNode) -> Result<TaskAssign> {
    node.expect("task_assign", |m| match m {
        HubMessage::TaskAssign(a) => Some(a.clone()),
        _ => None,
    })
    .await
}

async fn expect_result_ack(node: &mut RawNode) -> Result<TaskResultAck> {
    node.expect("task_result_ack", |m| match m {
        HubMessage::TaskResultAck(a) => Some(a.clone()),
        _ => None,
    })
    .await
}

async fn expect_cancel(node: &mut RawNode) -> Result<TaskCancel> {
    node.expect("task_cancel", |m| match m {
        HubMessage::TaskCancel(c) => Some(c.clone()),
        _ => None,
    })
    .await
}

async fn expect_error_code(node: &mut RawNode) -> Result<String> {
    node.expect("error frame", |m| match m {
        HubMessage::Error(e) => Some(e.code.clone()),
        _ => None,
    })
    .await
}

fn result_for(a: &TaskAssign, node_id: &str, attempt: Option<u32>, result: Value) -> TaskResult {
    TaskResult {
        task_id: a.task_id.clone(),
        node_id: Some(node_id.to_owned()),
        attempt,
        success: true,
        result: Some(result),
        ..TaskResult::default()
    }
}

async fn heartbeat_acked(node: &mut RawNode, node_id: &str) -> Result<bool> {
    node.send(Heartbeat {
        node_id: node_id.to_owned(),
        ..Heartbeat::default()
    })?;
    node.expect("heartbeat_ack", |m| match m {
        HubMessage::HeartbeatAck(a) => Some(a.success && a.node_id == node_id),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn native_registration_and_heartbeat() -> Result<()> {
    let hub = Hub::start_default().await?;
    let mut node = RawNode::connect_native(&hub).await?;

    // The hub greets first.
    match node.recv().await? {
        Received::Message {
            msg: HubMessage::ConnectionAck(ack),
            binary: false,
        } => ensure!(!ack.client_id.is_empty(), "connection_ack without clientId"),
        other => bail!("first frame is not a JSON connection_ack: {other:?}"),
    }

    let reg = NodeRegister {
        node_id: Some("it-native-1".into()),
        name: "native-one".into(),
        version: Some("9.9.9".into()),
        tools: vec![
            ToolSpec::Name("echo".into()),
            ToolSpec::Described(ToolDescription::new(
                "sleep",
                Some("waits".into()),
                Some(json!({"type": "object"})),
            )),
        ],
        max_concurrent_tasks: Some(3),
        ..NodeRegister::default()
    };
    let ack = node.register(reg).await?;
    assert!(ack.success, "registration refused: {}", ack.message);
    assert_eq!(
        ack.node_id, "it-native-1",
        "the hub must echo the node's id"
    );
    let info = ack.hub_info.context("node_registered without hubInfo")?;
    assert!(!info.version.is_empty());
    assert!(info.heartbeat_interval_ms > 0);
    assert!(info.heartbeat_timeout_ms > info.heartbeat_interval_ms);
    assert_eq!(info.encoding, Encoding::Json);

    assert!(heartbeat_acked(&mut node, "it-native-1").await?);

    let listed = hub
        .api()
        .node("it-native-1")
        .await?
        .context("node not listed")?;
    assert_eq!(listed.status, "online");
    assert_eq!(listed.name, "native-one");
    assert_eq!(listed.dialect.as_deref(), Some("native"));
    assert!(
        listed.tools.iter().any(|t| t == "echo"),
        "{:?}",
        listed.tools
    );
    assert!(
        listed.tools.iter().any(|t| t == "sleep"),
        "{:?}",
        listed.tools
    );
    assert_eq!(listed.max_concurrent_tasks, Some(3));
    assert!(
        hub.api()
            .nodes()
            .await?
            .iter()
            .any(|n| n.id == "it-native-1")
    );

    // A heartbeat on a connection that never registered is answered with success: false.
    let mut stranger = RawNode::connect_native(&hub).await?;
    stranger.send(Heartbeat {
        node_id: "nobody".into(),
        ..Heartbeat::default()
    })?;
    let unknown = stranger
        .expect("heartbeat_ack for an unknown node", |m| match m {
            HubMessage::HeartbeatAck(a) => Some(a.success),
            _ => None,
        })
        .await?;
    assert!(
        !unknown,
        "heartbeat of an unknown node acknowledged as success"
    );
    assert!(hub.api().node("nobody").await?.is_none());

    // Unregistering takes the node offline.
    node.send(apex_protocol::NodeUnregister {
        node_id: "it-native-1".into(),
        reason: Some("test over".into()),
    })?;
    let left = node
        .expect("node_unregistered", |m| match m {
            HubMessage::NodeUnregistered(u) => Some(u.clone()),
            _ => None,
        })
        .await?;
    assert!(left.success);
    hub.wait_node_status("it-native-1", "offline", WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn captured_apex_agent_frames_replay() -> Result<()> {
    let frames = captured("apex-bridge-node-agent.jsonl")?;
    let from_node = |ty: &str| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.from_node() && f.conn() == 1 && f.frame_type() == Some(ty))
            .map(|f| f.frame.clone())
            .collect()
    };
    let register = from_node("node_register").remove(0);
    let heartbeat = from_node("heartbeat").remove(0);
    let results = from_node("task_result");
    let ok_result = results
        .iter()
        .find(|r| r["data"]["success"] == true)
        .context("no successful task_result captured")?
        .clone();
    let err_result = results
        .iter()
        .find(|r| r["data"]["error"]["code"] == "capability_not_supported")
        .context("no capability_not_supported result captured")?
        .clone();
    let node_id = register["data"]["nodeId"].as_str().unwrap().to_owned();

    let hub = Hub::start_default().await?;
    let mut node = RawNode::connect_native(&hub).await?;
    node.send_json(&register)?;
    let ack = node
        .expect("node_registered", |m| match m {
            HubMessage::NodeRegistered(r) => Some(r.clone()),
            _ => None,
        })
        .await?;
    assert!(ack.success, "{}", ack.message);
    assert_eq!(ack.node_id, node_id);
    assert!(ack.hub_info.is_some());

    node.send_json(&heartbeat)?;
    let hb = node
        .expect("heartbeat_ack", |m| match m {
            HubMessage::HeartbeatAck(a) => Some(a.clone()),
            _ => None,
        })
        .await?;
    assert!(hb.success);
    assert_eq!(hb.node_id, node_id);

    // Listed with its tools and the concurrency limit from config.tasks.maxConcurrent.
    let listed = hub
        .api()
        .node(&node_id)
        .await?
        .context("agent not listed")?;
    assert_eq!(listed.status, "online");
    assert_eq!(listed.name, "Capture Worker");
    assert!(listed.tools.contains(&"echo".to_owned()));
    assert!(listed.tools.contains(&"wait".to_owned()));
    assert_eq!(listed.max_concurrent_tasks, Some(2));

    // A task for `echo` reaches the agent; its captured result (no `attempt`, as third-party
    // agents send it) completes the task.
    let task = hub
        .api()
        .submit(&json!({"tool": "echo", "args": {"hello": "world"}}))
        .await?;
    let assign = expect_assign(&mut node).await?;
    assert_eq!(assign.task_id, task.task_id);
    assert_eq!(assign.node_id, node_id);
    assert_eq!(assign.tool_name, "echo");
    assert_eq!(assign.tool_args, json!({"hello": "world"}));
    assert!(
        assign.timeout.is_some_and(|t| t > 0),
        "task_assign without a timeout"
    );
    let mut reply = ok_result.clone();
    reply["data"]["taskId"] = json!(task.task_id);
    node.send_json(&reply)?;
    let rack = expect_result_ack(&mut node).await?;
    assert!(rack.success, "captured result refused: {:?}", rack.message);
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.result, ok_result["data"]["result"]);

    // The captured error result fails the task with the agent's code.
    let task = hub
        .api()
        .submit(&json!({"tool": "wait", "args": {"durationMs": 10}}))
        .await?;
    let assign = expect_assign(&mut node).await?;
    assert_eq!(assign.task_id, task.task_id);
    let mut reply = err_result.clone();
    reply["data"]["taskId"] = json!(task.task_id);
    node.send_json(&reply)?;
    expect_result_ack(&mut node).await?;
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "failed");
    assert_eq!(
        done.error.context("failed task without error")?.code,
        "capability_not_supported"
    );

    // The agent's shutdown close takes it offline.
    node.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "Node agent shutdown".into(),
    })))?;
    hub.wait_node_status(&node_id, "offline", WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn vcp_dialect_replay() -> Result<()> {
    let frames = captured("vcp-distributed-server.jsonl")?;
    let first = |ty: &str| -> Result<Value> {
        frames
            .iter()
            .find(|f| f.from_node() && f.frame_type() == Some(ty))
            .map(|f| f.frame.clone())
            .with_context(|| format!("no {ty} captured"))
    };
    let register_tools = first("register_tools")?;
    let report_ip = first("report_ip")?;
    let tool_results: Vec<Value> = frames
        .iter()
        .filter(|f| f.from_node() && f.frame_type() == Some("tool_result"))
        .map(|f| f.frame.clone())
        .collect();
    let ok = tool_results
        .iter()
        .find(|f| f["data"]["status"] == "success")
        .context("no successful tool_result")?
        .clone();
    let err = tool_results
        .iter()
        .find(|f| f["data"]["status"] == "error")
        .context("no error tool_result")?
        .clone();
    let err_text = err["data"]["error"].as_str().unwrap().to_owned();

    let hub = Hub::start_default().await?;
    let mut node = RawNode::connect_vcp(&hub).await?;
    node.send_json(&register_tools)?;
    node.send_json(&report_ip)?;

    let listed = hub.wait_node_online("CaptureDistNode").await?;
    assert_eq!(listed.dialect.as_deref(), Some("vcp"));
    assert_eq!(listed.tools, vec!["EchoTest".to_owned()]);

    // The plugin's secrets and paths never leave the hub.
    for path in ["/v1/nodes".to_owned(), format!("/v1/nodes/{}", listed.id)] {
        let body = hub
            .api()
            .request(reqwest::Method::GET, &path)
            .send()
            .await?
            .text()
            .await?;
        for secret in [
            "sk-planted-secret",
            "basePath",
            "/path/on/node",
            "pluginSpecificEnvConfig",
        ] {
            assert!(
                !body.contains(secret),
                "GET {path} exposes {secret}: {body}"
            );
        }
    }

    // A task for its tool goes out as execute_tool; the captured result completes it.
    let task = hub
        .api()
        .submit(&json!({"tool": "EchoTest", "args": {"hello": "world"}}))
        .await?;
    let exec = node
        .expect("execute_tool", |m| match m {
            HubMessage::ExecuteTool(e) => Some(e.clone()),
            _ => None,
        })
        .await?;
    assert!(!exec.request_id.is_empty());
    assert_eq!(exec.tool_name, "EchoTest");
    assert_eq!(exec.tool_args, json!({"hello": "world"}));
    let mut reply = ok.clone();
    reply["data"]["requestId"] = json!(exec.request_id);
    node.send_json(&reply)?;
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.result, ok["data"]["result"]);
    assert_eq!(done.node_id.as_deref(), Some(listed.id.as_str()));

    // A string error fails the task and keeps the node's words.
    let task = hub
        .api()
        .submit(&json!({"tool": "EchoTest", "args": {"n": 2}}))
        .await?;
    let exec = node
        .expect("execute_tool", |m| match m {
            HubMessage::ExecuteTool(e) => Some(e.clone()),
            _ => None,
        })
        .await?;
    let mut reply = err.clone();
    reply["data"]["requestId"] = json!(exec.request_id);
    node.send_json(&reply)?;
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "failed");
    let error = done.error.context("failed task without error")?;
    let shown = format!("{} {}", error.message, error.details.unwrap_or_default());
    assert!(
        shown.contains(&err_text),
        "error {shown:?} lost the node's text"
    );

    // Nor does the secret reach the hub's log.
    assert!(
        !hub.log_text().contains("sk-planted-secret"),
        "the hub logged a plugin secret"
    );

    // Closing the socket takes the node offline.
    node.close();
    hub.wait_node_status(&listed.id, "offline", WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn node_key_is_checked_before_upgrade() -> Result<()> {
    let hub = Hub::start_default().await?;
    let host = hub.addr();
    let key = hub.node_key().to_owned();
    let bearer = format!("Bearer {key}");

    for path in [
        format!("/abp-distributed-server/VCP_Key={key}"),
        format!("/distributed-server/VCP_Key={key}"),
        format!("/vcp-distributed-server/VCP_Key={key}"),
        format!("/abp-distributed-server/ABP_Key={key}"),
    ] {
        let status = RawNode::upgrade_status(&format!("ws://{host}{path}"), &[]).await?;
        assert_eq!(status, 101, "upgrade on {path}");
    }
    let status = RawNode::upgrade_status(
        &format!("ws://{host}/distributed-server"),
        &[("Authorization", &bearer)],
    )
    .await?;
    assert_eq!(status, 101, "upgrade with a bearer header");

    let refused = [
        (
            format!("/abp-distributed-server/VCP_Key=wrong-{key}"),
            None,
            401,
        ),
        (
            format!("/vcp-distributed-server/VCP_Key={}", hub.api_key()),
            None,
            401,
        ),
        ("/distributed-server".to_owned(), None, 401),
        (
            "/distributed-server".to_owned(),
            Some("Bearer not-the-key".to_owned()),
            401,
        ),
        (format!("/no-such-channel/VCP_Key={key}"), None, 404),
    ];
    for (path, auth, want) in refused {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let status = RawNode::upgrade_status(&format!("ws://{host}{path}"), &headers).await?;
        assert_eq!(status, want, "upgrade on {path} with {auth:?}");
    }
    // The refusal says which key is missing or wrong, and how to send it.
    let resp = hub
        .api()
        .http()
        .get(format!(
            "{}/distributed-server/VCP_Key=not-the-key",
            hub.url()
        ))
        .send()
        .await?;
    let (status, body) = apex_tests::api::json_of(resp).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_node_key", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("missing or wrong node key")
            && message.contains("/distributed-server/VCP_Key=<node key>"),
        "{body}"
    );
    assert_eq!(hub.api().health().await?["status"], "ok");
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_an_error_and_the_connection_stays_up() -> Result<()> {
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--max-frame-bytes".into(), "65536".into()],
        ..HubOptions::default()
    })
    .await?;
    let mut node = RawNode::connect_native(&hub).await?;
    let ack = node
        .register(register_msg(
            Some("it-bad-frames"),
            "bad-frames",
            &["echo"],
            2,
        ))
        .await?;
    assert!(ack.success);

    node.send_text("this is not json {")?;
    assert_eq!(expect_error_code(&mut node).await?, "invalid_json");

    node.send_json(&json!({"type": "no_such_type", "data": {}}))?;
    assert_eq!(expect_error_code(&mut node).await?, "unknown_type");

    node.send_json(&json!({"type": "task_result", "data": {"nodeId": "it-bad-frames"}}))?;
    assert_eq!(expect_error_code(&mut node).await?, "invalid_payload");

    node.send_json(&json!([1, 2, 3]))?;
    assert!(!expect_error_code(&mut node).await?.is_empty());

    // Still connected, still online, and the hub is healthy.
    assert!(heartbeat_acked(&mut node, "it-bad-frames").await?);
    assert_eq!(hub.api().health().await?["status"], "ok");
    let listed = hub
        .api()
        .node("it-bad-frames")
        .await?
        .context("not listed")?;
    assert_eq!(listed.status, "online");

    // Another node is not affected by the oversized frame that ends this one's connection.
    let mut other = RawNode::connect_native(&hub).await?;
    assert!(
        other
            .register(register_msg(
                Some("it-bystander"),
                "bystander",
                &["echo"],
                2
            ))
            .await?
            .success
    );

    // A frame over --max-frame-bytes closes the connection with 1009 (message too big).
    node.send_text(format!(
        "{{\"type\":\"log\",\"data\":{{\"message\":\"{}\"}}}}",
        "x".repeat(200_000)
    ))?;
    let code = node.expect_closed(WAIT).await?;
    assert_eq!(code, Some(1009), "oversized frame closed with {code:?}");

    assert!(heartbeat_acked(&mut other, "it-bystander").await?);
    assert_eq!(hub.api().health().await?["status"], "ok");
    Ok(())
}

#[tokio::test]
async fn stale_and_duplicate_results_are_ignored() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();

    let mut a = RawNode::connect_registered(&hub, "raw-a", &["echo"], 4).await?;
    let task = api
        .submit(&json!({"tool": "echo", "args": {"x": 1}}))
        .await?;
    let first = expect_assign(&mut a).await?;
    assert_eq!(first.task_id, task.task_id);
    assert_eq!(first.attempt, Some(1));

    let mut b = RawNode::connect_registered(&hub, "raw-b", &["echo"], 4).await?;

    // A dies without a word: the task moves to B as attempt 2.
    a.abort();
    let second = expect_assign(&mut b).await?;
    assert_eq!(second.task_id, task.task_id);
    assert_eq!(second.attempt, Some(2));

    // A comes back and delivers its old result: acknowledged, not committed.
    let mut a = RawNode::connect_registered(&hub, "raw-a", &["echo"], 4).await?;
    a.send(result_for(&first, "raw-a", Some(1), json!({"from": "a"})))?;
    assert!(
        !expect_result_ack(&mut a).await?.success,
        "stale result from the old node committed"
    );
    // Same without an attempt number, as a third-party agent would send it.
    a.send(result_for(&first, "raw-a", None, json!({"from": "a"})))?;
    assert!(
        !expect_result_ack(&mut a).await?.success,
        "result from a node not assigned committed"
    );

    // B names the wrong attempt: refused.
    b.send(result_for(
        &second,
        "raw-b",
        Some(1),
        json!({"from": "b-wrong-attempt"}),
    ))?;
    assert!(
        !expect_result_ack(&mut b).await?.success,
        "result for the wrong attempt committed"
    );
    assert!(!api.get(&task.task_id).await?.is_terminal());

    // The right one is committed once; a duplicate is refused and changes nothing.
    b.send(result_for(&second, "raw-b", Some(2), json!({"from": "b"})))?;
    assert!(expect_result_ack(&mut b).await?.success);
    b.send(result_for(
        &second,
        "raw-b",
        Some(2),
        json!({"from": "b-duplicate"}),
    ))?;
    assert!(
        !expect_result_ack(&mut b).await?.success,
        "duplicate result committed"
    );

    let done = api.get(&task.task_id).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.result, json!({"from": "b"}));
    assert_eq!(done.attempt, 2);
    assert_eq!(done.node_id.as_deref(), Some("raw-b"));

    let events = api.events(&task.task_id, WAIT).await?;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.first(), Some(&"task_created"), "{types:?}");
    assert_eq!(
        types.iter().filter(|t| **t == "task_migrated").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "task_completed").count(),
        1,
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"task_completed"), "{types:?}");
    Ok(())
}

#[tokio::test]
async fn timed_out_task_is_cancelled_on_the_node() -> Result<()> {
    let hub = Hub::start_default().await?;
    let mut node = RawNode::connect_registered(&hub, "raw-slow", &["sleep"], 2).await?;
    let task = hub
        .api()
        .submit(&json!({"tool": "sleep", "args": {"ms": 10_000}, "timeout_seconds": 1}))
        .await?;
    let assign = expect_assign(&mut node).await?;
    assert_eq!(assign.task_id, task.task_id);
    assert!(
        assign.timeout.is_some_and(|t| t > 0 && t <= 1000),
        "the node's budget should be the task's 1 s, got {:?}",
        assign.timeout
    );

    // The node never answers; the hub gives up, tells the node, and ends the task.
    let cancel = expect_cancel(&mut node).await?;
    assert_eq!(cancel.task_id, task.task_id);
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "timed_out");

    // A result arriving after the timeout changes nothing.
    node.send(result_for(
        &assign,
        "raw-slow",
        assign.attempt,
        json!({"late": true}),
    ))?;
    assert!(!expect_result_ack(&mut node).await?.success);
    assert_eq!(hub.api().get(&task.task_id).await?.status, "timed_out");
    let events = hub.api().events(&task.task_id, WAIT).await?;
    let last = events.last().context("no events")?;
    assert_eq!(last["type"], "task_timed_out");
    Ok(())
}

#[tokio::test]
async fn cancel_reaches_the_node() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();
    let mut node = RawNode::connect_registered(&hub, "raw-c", &["sleep"], 2).await?;
    let task = api
        .submit(&json!({"tool": "sleep", "args": {"ms": 10_000}}))
        .await?;
    let assign = expect_assign(&mut node).await?;
    node.send(apex_protocol::TaskProgress {
        task_id: assign.task_id.clone(),
        node_id: Some("raw-c".into()),
        attempt: assign.attempt,
        progress: 10.0,
        message: Some("sleeping".into()),
    })?;
    wait_until("task to be running", DEFAULT_TIMEOUT, || async {
        let t = api.get(&task.task_id).await?;
        Ok((t.status == "running").then_some(()))
    })
    .await?;

    let (status, body) = api.cancel(&task.task_id).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    let cancel = expect_cancel(&mut node).await?;
    assert_eq!(cancel.task_id, task.task_id);

    // Cancelling again is a conflict; the node's late result is refused.
    let (status, body) = api.cancel(&task.task_id).await?;
    assert_eq!(status, 409, "{body}");
    node.send(result_for(
        &assign,
        "raw-c",
        assign.attempt,
        json!({"late": true}),
    ))?;
    assert!(!expect_result_ack(&mut node).await?.success);
    let t = api.get(&task.task_id).await?;
    assert_eq!(t.status, "cancelled");

    let events = api.events(&task.task_id, WAIT).await?;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(types.contains(&"task_progress"), "{types:?}");
    assert_eq!(types.last(), Some(&"task_cancelled"), "{types:?}");
    Ok(())
}

#[tokio::test]
async fn msgpack_is_negotiated_at_registration() -> Result<()> {
    let hub = Hub::start_default().await?;
    let mut node = RawNode::connect_native(&hub).await?;
    let mut reg = register_msg(Some("raw-mp"), "raw-mp", &["echo"], 2);
    reg.encoding = Some(Encoding::Msgpack);
    let ack = node.register(reg).await?;
    assert!(ack.success);
    assert_eq!(ack.hub_info.map(|i| i.encoding), Some(Encoding::Msgpack));

    // From now on both directions are MessagePack binary frames.
    node.send(Heartbeat {
        node_id: "raw-mp".into(),
        ..Heartbeat::default()
    })?;
    let mut saw_ack = false;
    while !saw_ack {
        match node.recv().await? {
            Received::Message { msg, binary } => {
                if let HubMessage::HeartbeatAck(a) = msg {
                    assert!(
                        binary,
                        "heartbeat_ack after msgpack negotiation came as text"
                    );
                    assert!(a.success);
                    saw_ack = true;
                }
            }
            other => bail!("unexpected {other:?}"),
        }
    }

    let task = hub
        .api()
        .submit(&json!({"tool": "echo", "args": {"m": 1}}))
        .await?;
    let assign = loop {
        match node.recv().await? {
            Received::Message {
                msg: HubMessage::TaskAssign(a),
                binary,
            } => {
                assert!(binary, "task_assign came as text");
                break a;
            }
            Received::Message { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    };
    node.send(result_for(
        &assign,
        "raw-mp",
        assign.attempt,
        json!({"ok": true}),
    ))?;
    assert!(expect_result_ack(&mut node).await?.success);
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.result, json!({"ok": true}));
    Ok(())
}

#[tokio::test]
async fn agent_result_queued_while_offline_is_committed_once() -> Result<()> {
    // The captured agent finishes a task while disconnected, reconnects, and sends
    // node_register and the queued task_result back to back (no attempt number).
    let frames = captured("apex-bridge-node-agent.offline-result-and-backoff.jsonl")?;
    let conn2: Vec<Value> = frames
        .iter()
        .filter(|f| f.from_node() && f.conn() == 2 && f.frame_type().is_some())
        .map(|f| f.frame.clone())
        .collect();
    let register = conn2
        .iter()
        .find(|f| f["type"] == "node_register")
        .context("no node_register on conn#2")?
        .clone();
    let queued = conn2
        .iter()
        .find(|f| f["type"] == "task_result")
        .context("no queued task_result on conn#2")?
        .clone();
    let node_id = register["data"]["nodeId"].as_str().unwrap().to_owned();

    let hub = Hub::start_default().await?;
    let api = hub.api();
    let mut first = RawNode::connect_native(&hub).await?;
    first.send_json(&register)?;
    first
        .expect("node_registered", |m| {
            matches!(m, HubMessage::NodeRegistered(r) if r.success).then_some(())
        })
        .await?;
    let task = api
        .submit(&json!({"tool": "wait", "args": {"durationMs": 800}}))
        .await?;
    let assign = expect_assign(&mut first).await?;
    assert_eq!(assign.task_id, task.task_id);
    first.abort();

    let mut second = RawNode::connect_native(&hub).await?;
    let mut result = queued.clone();
    result["data"]["taskId"] = json!(task.task_id);
    second.send_json(&register)?;
    second.send_json(&result)?;

    // Whatever the hub made of the early result, a real agent runs any re-assignment it gets;
    // the task ends once, successfully.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = api.get(&task.task_id).await?;
        if t.is_terminal() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "task never finished: {t:?}"
        );
        if let Ok(got) = second.recv_timeout(Duration::from_millis(200)).await
            && let Received::Message {
                msg: HubMessage::TaskAssign(a),
                ..
            } = got
        {
            assert_eq!(a.task_id, task.task_id);
            let mut again = result.clone();
            again["data"]["attempt"] = json!(a.attempt);
            second.send_json(&again)?;
        }
    }
    let done = api.wait_terminal(&task.task_id, WAIT).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.result, queued["data"]["result"]);
    assert_eq!(done.node_id.as_deref(), Some(node_id.as_str()));
    let events = api.events(&task.task_id, WAIT).await?;
    let completed = events
        .iter()
        .filter(|e| e["type"] == "task_completed")
        .count();
    assert_eq!(completed, 1, "{events:?}");
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("task_completed"))
    );
    Ok(())
}
