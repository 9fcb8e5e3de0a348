//! End-to-end tests of node registration against the real `apex-hub` binary, with raw
//! node-channel clients written in the test:
//! - a node that keeps running its task across a reconnect (and registers again without
//!   `inflight`, as the Apex Bridge agent does) is not sent the task again: it runs once;
//!   one that comes back running nothing gets it again, same attempt;
//! - two live connections with one node id: the second is refused (`node_id_in_use`), the
//!   first keeps its tasks and finishes them;
//! - two live VCP servers with one `serverName`: two nodes with distinct ids, both run tasks;
//! - a connection that went silent is replaced by the next registration of its id.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use apex_protocol::{
    Heartbeat, HubMessage, NodeRegistered, NodeStats, TaskAssign, TaskProgress, TaskResult,
};
use apex_tests::{Hub, HubOptions, RawNode, Received, register_msg};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A hub that pings every 200 ms and declares a connection dead after 4 s of silence: a
/// connection that stops answering is still alive for a while, long enough for a test to
/// register its id again on another connection within that time.
async fn hub() -> Result<Hub> {
    Hub::start(HubOptions {
        heartbeat_interval_ms: Some(200),
        heartbeat_timeout_ms: Some(4000),
        ..HubOptions::default()
    })
    .await
}

async fn expect_assign(node: &mut RawNode) -> Result<TaskAssign> {
    node.expect("task_assign", |m| match m {
        HubMessage::TaskAssign(a) => Some(a.clone()),
        _ => None,
    })
    .await
}

/// Waits for `node_registered {success: true}`; returns it with the refusals that came first.
async fn registered(node: &mut RawNode) -> Result<(NodeRegistered, Vec<NodeRegistered>)> {
    let mut refused = Vec::new();
    loop {
        let r = node
            .expect_within("node_registered", WAIT, |m| match m {
                HubMessage::NodeRegistered(r) => Some(r.clone()),
                _ => None,
            })
            .await?;
        if r.success {
            return Ok((r, refused));
        }
        refused.push(r);
    }
}

/// Sends a heartbeat with `stats.activeTasks = active` and waits for its answer; returns every
/// frame received before the answer.
async fn heartbeat(node: &mut RawNode, node_id: &str, active: u64) -> Result<Vec<HubMessage>> {
    node.skipped.clear();
    node.send(Heartbeat {
        node_id: node_id.to_owned(),
        stats: Some(NodeStats {
            active_tasks: active,
            ..NodeStats::default()
        }),
        ..Heartbeat::default()
    })?;
    node.expect("heartbeat_ack", |m| match m {
        HubMessage::HeartbeatAck(_) => Some(()),
        _ => None,
    })
    .await?;
    Ok(node
        .skipped
        .drain(..)
        .filter_map(|r| match r {
            Received::Message { msg, .. } => Some(msg),
            _ => None,
        })
        .collect())
}

fn is_assign_of(m: &HubMessage, task_id: &str) -> bool {
    matches!(m, HubMessage::TaskAssign(a) if a.task_id == task_id)
}

/// A result without an attempt number, as a third-party agent sends it.
fn agent_result(task_id: &str, node_id: &str, result: Value) -> TaskResult {
    TaskResult {
        task_id: task_id.to_owned(),
        node_id: Some(node_id.to_owned()),
        success: true,
        result: Some(result),
        execution_time: Some(1),
        ..TaskResult::default()
    }
}

async fn result_acked(node: &mut RawNode, res: TaskResult) -> Result<bool> {
    let id = res.task_id.clone();
    node.send(res)?;
    node.expect("task_result_ack", |m| match m {
        HubMessage::TaskResultAck(a) if a.task_id == id => Some(a.success),
        _ => None,
    })
    .await
}

async fn event_types(hub: &Hub, task_id: &str) -> Result<Vec<String>> {
    Ok(hub
        .api()
        .events(task_id, WAIT)
        .await?
        .iter()
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect())
}

/// A node gets a long task, then its connection dies silently (the socket stays open, nothing
/// passes), and it registers again on a new connection without `inflight`. Returns the old
/// connection (keep it: its socket stays open), the new one once the hub has bound it, and
/// the task.
async fn reconnect_while_running(
    hub: &Hub,
    node_id: &str,
) -> Result<(RawNode, RawNode, TaskAssign)> {
    let mut first = RawNode::connect_registered(hub, node_id, &["sleep"], 2).await?;
    let task = hub
        .api()
        .submit(&json!({"tool": "sleep", "args": {"ms": 60_000}}))
        .await?;
    let assign = expect_assign(&mut first).await?;
    ensure!(assign.task_id == task.task_id && assign.attempt == Some(1));

    let mut second = RawNode::connect_native(hub).await?;
    first.go_silent();
    second.send(register_msg(Some(node_id), node_id, &["sleep"], 2))?;
    // While the first connection still counts as alive the id is not taken from it; once the
    // hub declares it dead, the waiting connection takes the id over.
    let (ack, _refused) = registered(&mut second).await?;
    ensure!(ack.node_id == node_id, "{ack:?}");
    ensure!(
        !second.skipped.iter().any(
            |r| matches!(r, Received::Message { msg, .. } if is_assign_of(msg, &task.task_id))
        ),
        "task sent again before any heartbeat: {:?}",
        second.skipped
    );
    Ok((first, second, assign))
}

#[tokio::test]
async fn a_node_that_keeps_its_task_across_a_reconnect_runs_it_once() -> Result<()> {
    let hub = hub().await?;
    let (_silent, mut node, assign) = reconnect_while_running(&hub, "keeper").await?;
    // As the agent does right after `node_registered`: it still runs the task.
    for _ in 0..3 {
        let before = heartbeat(&mut node, "keeper", 1).await?;
        assert!(
            !before.iter().any(|m| is_assign_of(m, &assign.task_id)),
            "the task was sent a second time: {before:?}"
        );
    }
    assert!(
        result_acked(
            &mut node,
            agent_result(&assign.task_id, "keeper", json!({"sleptMs": 60000}))
        )
        .await?
    );
    let done = hub.api().get(&assign.task_id).await?;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.attempt, 1);
    assert_eq!(done.node_id.as_deref(), Some("keeper"));
    let types = event_types(&hub, &assign.task_id).await?;
    assert_eq!(
        types.iter().filter(|t| *t == "task_assigned").count(),
        1,
        "{types:?}"
    );
    assert!(!types.iter().any(|t| t == "task_migrated"), "{types:?}");
    Ok(())
}

#[tokio::test]
async fn a_node_that_lost_its_task_across_a_reconnect_gets_it_again_same_attempt() -> Result<()> {
    let hub = hub().await?;
    let (_silent, mut node, assign) = reconnect_while_running(&hub, "restarted").await?;
    // The process restarted: it runs nothing, so the task is sent again before the answer.
    let before = heartbeat(&mut node, "restarted", 0).await?;
    let again: Vec<&TaskAssign> = before
        .iter()
        .filter_map(|m| match m {
            HubMessage::TaskAssign(a) if a.task_id == assign.task_id => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(again.len(), 1, "{before:?}");
    assert_eq!(again[0].attempt, Some(1));
    // Once.
    let later = heartbeat(&mut node, "restarted", 1).await?;
    assert!(!later.iter().any(|m| is_assign_of(m, &assign.task_id)));
    assert!(
        result_acked(
            &mut node,
            agent_result(&assign.task_id, "restarted", json!("ok"))
        )
        .await?
    );
    let done = hub.api().get(&assign.task_id).await?;
    assert_eq!((done.status.as_str(), done.attempt), ("succeeded", 1));
    Ok(())
}

#[tokio::test]
async fn two_live_connections_with_one_node_id_keep_the_first() -> Result<()> {
    let hub = hub().await?;
    let api = hub.api();
    let mut first = RawNode::connect_registered(&hub, "twin", &["sleep"], 4).await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            api.submit(&json!({"tool": "sleep", "args": {"ms": 100}}))
                .await?
                .task_id,
        );
    }
    let mut assigns = vec![
        expect_assign(&mut first).await?,
        expect_assign(&mut first).await?,
    ];

    // Another live process with the same stored id.
    let mut second = RawNode::connect_native(&hub).await?;
    let ack = second
        .register(register_msg(Some("twin"), "twin", &["sleep"], 4))
        .await?;
    assert!(!ack.success, "{ack:?}");
    assert!(
        ack.message.contains("node_id_in_use") && ack.message.contains("twin"),
        "the refusal names the conflict: {}",
        ack.message
    );
    // The refused connection stays open, unregistered.
    second.send(TaskProgress {
        task_id: ids[0].clone(),
        node_id: Some("twin".into()),
        attempt: Some(1),
        progress: 50.0,
        message: None,
    })?;
    let err = second
        .expect("error frame", |m| match m {
            HubMessage::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(err.code, "node_id_in_use", "{err:?}");

    // The first keeps its tasks and gets new work.
    ids.push(
        api.submit(&json!({"tool": "sleep", "args": {"ms": 100}}))
            .await?
            .task_id,
    );
    assigns.push(expect_assign(&mut first).await?);
    for a in &assigns {
        assert_eq!(a.attempt, Some(1));
        let mut res = agent_result(&a.task_id, "twin", json!("done"));
        res.attempt = a.attempt;
        assert!(
            result_acked(&mut first, res).await?,
            "result of {}",
            a.task_id
        );
    }
    for id in &ids {
        let t = api.get(id).await?;
        assert_eq!((t.status.as_str(), t.attempt), ("succeeded", 1), "{t:?}");
        let types = event_types(&hub, id).await?;
        assert!(!types.iter().any(|t| t == "task_migrated"), "{types:?}");
    }
    let nodes = api.nodes().await?;
    let twins: Vec<_> = nodes.iter().filter(|n| n.id == "twin").collect();
    assert_eq!(twins.len(), 1);
    assert_eq!(twins[0].status, "online");
    // The first is still the node's connection (an unknown node's heartbeat is refused).
    first.send(Heartbeat {
        node_id: "twin".into(),
        ..Heartbeat::default()
    })?;
    let hb = first
        .expect("heartbeat_ack", |m| match m {
            HubMessage::HeartbeatAck(a) => Some(a.clone()),
            _ => None,
        })
        .await?;
    assert!(hb.success && hb.status == "online", "{hb:?}");
    Ok(())
}

#[tokio::test]
async fn two_vcp_servers_with_one_name_are_two_nodes_that_both_run_tasks() -> Result<()> {
    let hub = hub().await?;
    let api = hub.api();
    let register = json!({"type": "register_tools", "data": {
        "serverName": "twin-desk",
        "tools": [{"name": "EchoTest", "description": "echo"}],
    }});
    let mut servers = Vec::new();
    for _ in 0..2 {
        let s = RawNode::connect_vcp(&hub).await?;
        s.send_json(&register)?;
        servers.push(s);
    }
    let ids = apex_tests::wait_until("both servers listed", WAIT, || async {
        let mut online: Vec<String> = api
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.name == "twin-desk" && n.status == "online")
            .map(|n| n.id)
            .collect();
        online.sort();
        Ok((online.len() == 2).then_some(online))
    })
    .await?;
    assert_eq!(ids, ["vcp-twin-desk", "vcp-twin-desk-2"]);

    let tasks = api
        .submit_batch(&[
            json!({"tool": "EchoTest", "args": {"n": 1}}),
            json!({"tool": "EchoTest", "args": {"n": 2}}),
        ])
        .await?;
    for s in &mut servers {
        let exec = s
            .expect("execute_tool", |m| match m {
                HubMessage::ExecuteTool(e) => Some(e.clone()),
                _ => None,
            })
            .await?;
        s.send_json(&json!({"type": "tool_result", "data": {
            "requestId": exec.request_id, "status": "success", "result": exec.tool_args,
        }}))?;
    }
    let mut ran_on = Vec::new();
    for t in &tasks {
        let done = api.wait_terminal(&t.task_id, WAIT).await?;
        assert_eq!(done.status, "succeeded", "{done:?}");
        ran_on.push(done.node_id.context("no node")?);
    }
    ran_on.sort();
    assert_eq!(ran_on, ids, "one task on each server");
    let still: Vec<String> = api
        .nodes()
        .await?
        .into_iter()
        .filter(|n| n.name == "twin-desk" && n.status == "online")
        .map(|n| n.id)
        .collect();
    assert_eq!(still.len(), 2, "nobody was evicted");
    Ok(())
}

#[tokio::test]
async fn a_connection_gone_silent_is_replaced_by_the_next_registration() -> Result<()> {
    let hub = hub().await?;
    let first = RawNode::connect_registered(&hub, "fades", &["echo"], 2).await?;
    let mut second = RawNode::connect_native(&hub).await?;
    first.go_silent();
    second.send(register_msg(Some("fades"), "fades", &["echo"], 2))?;
    let (ack, _) = registered(&mut second).await?;
    assert_eq!(ack.node_id, "fades");
    let node = hub.api().node("fades").await?.context("node unknown")?;
    assert_eq!(node.status, "online");
    // Work for the node goes to the new connection.
    let task = hub
        .api()
        .submit(&json!({"tool": "echo", "args": {"x": 1}}))
        .await?;
    let a = expect_assign(&mut second).await?;
    assert_eq!(a.task_id, task.task_id);
    let mut res = agent_result(&a.task_id, "fades", json!({"x": 1}));
    res.attempt = a.attempt;
    assert!(result_acked(&mut second, res).await?);
    let done = hub.api().get(&task.task_id).await?;
    assert_eq!((done.status.as_str(), done.attempt), ("succeeded", 1));
    drop(first);
    Ok(())
}
