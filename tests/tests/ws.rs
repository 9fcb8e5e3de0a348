#![allow(clippy::unwrap_used)]
//! The client WebSocket (`GET /ws`) end to end with the real `apex-hub` (and `apex-node`):
//! chat turns streamed as `chat.chunk` then `chat.completed`, concurrent turns on one
//! connection, interrupts, a closed connection cancelling its turn, `?token=` and refused
//! credentials, task notifications reaching their owner only (one hub, and two shared hubs on
//! a real `redis-server`), node-loss alerts for admins, and a client that stops reading being
//! disconnected and counted while others carry on.

use apex_tests::client_ws::{ClientWs, Frame};
use apex_tests::shared::shared_hub;
use apex_tests::{Api, Hub, Node, NodeOptions, RedisServer, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

const MOCK: &str = "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n";

/// A hub with `toml` as its config file.
async fn hub_with(toml: &str) -> Hub {
    Hub::start_with_config(toml, &[], None).await.unwrap()
}

/// The frames of a turn: its chunks' text joined, and the `chat.completed` data.
fn answer_of(frames: &[Value], session: &str) -> (String, Value) {
    let mut text = String::new();
    let mut done = Value::Null;
    for f in frames {
        match f["type"].as_str().unwrap() {
            "chat.chunk" if f["data"]["session_id"] == session => {
                text.push_str(f["data"]["content"].as_str().unwrap());
            }
            "chat.completed" if f["data"]["session_id"] == session => done = f["data"].clone(),
            _ => {}
        }
    }
    (text, done)
}

async fn history(api: &Api, session: &str) -> Vec<Value> {
    let resp = api
        .request(Method::GET, &format!("/api/v1/chat/history/{session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    v["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn chat_over_ws_streams_chunks_then_completed_and_runs_turns_side_by_side() {
    let hub = hub_with(MOCK).await;
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    // A browser's way: the access token in the query.
    let mut ws = ClientWs::connect_query(&hub.url(), alice.api_key())
        .await
        .unwrap();
    ws.send(&json!({"type": "chat", "data": {"message": "hello there", "session_id": "w1"}}))
        .unwrap();
    let frames = ws.until("chat.completed").await.unwrap();
    assert!(frames.len() > 2, "{frames:?}");
    for f in &frames[..frames.len() - 1] {
        assert_eq!(f["type"], "chat.chunk", "{f}");
        assert_eq!(f["data"]["session_id"], "w1");
    }
    let (text, done) = answer_of(&frames, "w1");
    assert_eq!(done["content"], text, "completed carries the whole answer");
    assert!(text.starts_with("This is a mock answer"), "{text}");
    assert_eq!(done["model_used"], "mock");
    assert!(done["token_count"].as_u64().unwrap() > 0, "{done}");
    // The turn is stored like one of POST /api/v1/chat.
    let msgs = history(&alice, "w1").await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0]["content"], "hello there");
    assert_eq!(msgs[1]["content"], text);

    // Two turns at once on one connection, for two sessions (one created by the hub).
    ws.send(&json!({"type": "chat", "data": {"message": "first", "session_id": "w2"}}))
        .unwrap();
    ws.send(&json!({"type": "chat", "data": {"message": "second"}}))
        .unwrap();
    let mut frames = ws.until("chat.completed").await.unwrap();
    frames.extend(ws.until("chat.completed").await.unwrap());
    let sessions: Vec<String> = frames
        .iter()
        .filter(|f| f["type"] == "chat.completed")
        .map(|f| f["data"]["session_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(sessions.contains(&"w2".to_owned()), "{sessions:?}");
    let created = sessions.iter().find(|s| *s != "w2").unwrap();
    assert!(created.starts_with("sess_"), "{created}");
    for s in ["w2", created.as_str()] {
        let (text, done) = answer_of(&frames, s);
        assert_eq!(done["content"], text, "session {s}");
        assert_eq!(history(&alice, s).await.len(), 2);
    }

    // Bad frames are answered with the error shape; the connection stays open.
    ws.send(&json!({"type": "chat", "data": {"session_id": "w1"}}))
        .unwrap();
    let e = ws.next_json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["data"]["error"]["param"], "message", "{e}");
    assert_eq!(e["data"]["success"], false);
    ws.send(&json!({"type": "chat", "data": {"message": "hi", "model_type": "huge"}}))
        .unwrap();
    let e = ws.next_json().await.unwrap();
    assert_eq!(e["data"]["error"]["param"], "model_type", "{e}");
    let before_pong = ws.ping().await.unwrap();
    assert_eq!(before_pong.len(), 1, "{before_pong:?}");

    // The bearer header works too; a bad or missing credential is refused before the upgrade.
    let mut by_header = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    by_header.ping().await.unwrap();
    let mut admin = ClientWs::connect(&hub.url(), hub.api_key()).await.unwrap();
    admin.ping().await.unwrap();
    for in_query in [true, false] {
        let (status, body) = ClientWs::upgrade_status(&hub.url(), "not-a-token", in_query)
            .await
            .unwrap();
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    let (status, _) = ClientWs::upgrade_status(&hub.url(), "", true)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // `?token=` is taken on /ws only.
    let resp = alice
        .http()
        .get(format!(
            "{}/api/v1/tasks?token={}",
            hub.url(),
            alice.api_key()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_interrupt_ends_the_turn_and_a_closed_connection_cancels_its_turn() {
    let slow = format!(
        "{MOCK}mock_tokens = 2000\nmock_tokens_per_second = 40.0\n[chat]\nbusy = \"wait\"\n"
    );
    let hub = hub_with(&slow).await;
    let alice = Api::register_user(&hub.url(), "ann@example.com")
        .await
        .unwrap();
    let mut ws = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    ws.send(
        &json!({"type": "chat", "data": {"message": "tell me everything", "session_id": "i1"}}),
    )
    .unwrap();
    let first = ws.next_json().await.unwrap();
    assert_eq!(first["type"], "chat.chunk", "{first}");
    ws.send(&json!({"type": "interrupt", "data": {"session_id": "i1"}}))
        .unwrap();
    let mut frames = vec![first];
    frames.extend(ws.until("chat.completed").await.unwrap());
    let (text, done) = answer_of(&frames, "i1");
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["content"], text);
    assert!(
        text.split_whitespace().count() < 2000,
        "cut short: {} words",
        text.split_whitespace().count()
    );
    let msgs = history(&alice, "i1").await;
    assert_eq!(msgs.len(), 2, "what was said is stored");
    assert_eq!(msgs[1]["content"], text);
    // Nothing runs for that session now.
    ws.send(&json!({"type": "interrupt", "data": {"session_id": "i1"}}))
        .unwrap();
    let e = ws.next_json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["data"]["error"]["code"], "not_found", "{e}");
    assert_eq!(e["data"]["session_id"], "i1");

    // A connection that closes mid-turn cancels it: nothing of it is stored and the session
    // is free at once for the next message (which would otherwise wait for 2,000 tokens).
    let mut gone = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    gone.send(&json!({"type": "chat", "data": {"message": "never mind", "session_id": "c1"}}))
        .unwrap();
    assert_eq!(gone.next_json().await.unwrap()["type"], "chat.chunk");
    drop(gone);
    ws.send(
        &json!({"type": "chat", "data": {"message": "short one", "session_id": "c1",
        "max_tokens": 3}}),
    )
    .unwrap();
    let frames = ws.until("chat.completed").await.unwrap();
    let (text, _) = answer_of(&frames, "c1");
    assert_eq!(text, "This is a");
    let msgs = history(&alice, "c1").await;
    assert_eq!(msgs.len(), 2, "only the second turn is stored: {msgs:?}");
    assert_eq!(msgs[0]["content"], "short one");
}

/// Reads `ws` until its next `notification` (other frames skipped).
async fn notification(ws: &mut ClientWs) -> Value {
    ws.until("notification").await.unwrap().pop().unwrap()["data"].clone()
}

/// No notification is waiting on `ws`: a ping's pong comes first. Notifications are queued
/// to every connection of their owner at once, so one that came elsewhere before this ping
/// would be ahead of the pong here.
async fn no_notification(ws: &mut ClientWs) {
    let frames = ws.ping().await.unwrap();
    assert!(
        frames.iter().all(|f| f["type"] != "notification"),
        "unexpected notification: {frames:?}"
    );
}

#[tokio::test]
async fn a_task_notification_reaches_its_owner_only_and_admins_hear_of_node_loss() {
    let hub = Hub::start_default().await.unwrap();
    let mut node = Node::start(&hub, NodeOptions::named("worker"))
        .await
        .unwrap();
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&hub.url(), "bob@example.com")
        .await
        .unwrap();
    let mut a1 = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    let mut a2 = ClientWs::connect_query(&hub.url(), alice.api_key())
        .await
        .unwrap();
    let mut b = ClientWs::connect(&hub.url(), bob.api_key()).await.unwrap();
    let mut admin = ClientWs::connect(&hub.url(), hub.api_key()).await.unwrap();
    for ws in [&mut a1, &mut a2, &mut b, &mut admin] {
        ws.ping().await.unwrap();
    }

    let t = alice
        .submit(&json!({"tool": "echo", "args": {"text": "hi"}}))
        .await
        .unwrap();
    for ws in [&mut a1, &mut a2] {
        let n = notification(ws).await;
        assert_eq!(n["task_id"], t.task_id.as_str(), "{n}");
        assert_eq!(n["title"], "task echo succeeded", "{n}");
    }
    no_notification(&mut b).await;
    no_notification(&mut admin).await;

    let t = bob
        .submit(&json!({"tool": "no_such_tool", "timeout_seconds": 1}))
        .await
        .unwrap();
    let n = notification(&mut b).await;
    assert_eq!(n["task_id"], t.task_id.as_str());
    assert_eq!(n["title"], "task no_such_tool timed out", "{n}");
    no_notification(&mut a1).await;

    // Admins (and only they) get an alert when a node is lost.
    node.kill().unwrap();
    let alert = admin.until("alert").await.unwrap().pop().unwrap();
    assert_eq!(alert["data"]["level"], "warning");
    assert!(
        alert["data"]["message"]
            .as_str()
            .unwrap()
            .contains("worker"),
        "{alert}"
    );
    for ws in [&mut a1, &mut b] {
        let frames = ws.ping().await.unwrap();
        assert!(frames.iter().all(|f| f["type"] != "alert"), "{frames:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_cross_shared_hubs_once() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let _node = Node::start(&a, NodeOptions::named("at-a")).await.unwrap();
    let alice = Api::register_user(&a.url(), "alice@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&b.url(), "bob@example.com")
        .await
        .unwrap();
    // Alice's token works at hub B (users are shared); she listens there and at A.
    let mut at_b = ClientWs::connect(&b.url(), alice.api_key()).await.unwrap();
    let mut at_a = ClientWs::connect(&a.url(), alice.api_key()).await.unwrap();
    let mut bob_b = ClientWs::connect(&b.url(), bob.api_key()).await.unwrap();
    for ws in [&mut at_b, &mut at_a, &mut bob_b] {
        ws.ping().await.unwrap();
    }
    // Submitted at B, run by A's node: the end reaches both of her connections, once each.
    let via_b = Api::new(&b.url(), alice.api_key()).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let t = via_b
            .submit(&json!({"tool": "echo", "args": {"text": format!("n{i}")}}))
            .await
            .unwrap();
        ids.push(t.task_id);
    }
    for ws in [&mut at_b, &mut at_a] {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(
                notification(ws).await["task_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want, "each task's end once");
        no_notification(ws).await;
    }
    no_notification(&mut bob_b).await;

    // A task no hub ever claims (no node offers its tool) times out in the shared store:
    // its owner is told too, once, and nobody else.
    let bob_a = Api::new(&a.url(), bob.api_key()).unwrap();
    let t = bob_a
        .submit(&json!({"tool": "no_such_tool", "timeout_seconds": 1}))
        .await
        .unwrap();
    let n = notification(&mut bob_b).await;
    assert_eq!(n["task_id"], t.task_id.as_str(), "{n}");
    assert_eq!(n["title"], "task no_such_tool timed out", "{n}");
    no_notification(&mut bob_b).await;
    no_notification(&mut at_a).await;
}

/// `apex_ws_clients_shed_total` in the hub's `/metrics`.
async fn shed_total(hub: &Hub) -> u64 {
    let text = hub
        .api()
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("apex_ws_clients_shed_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_counted_and_nobody_else_waits() {
    let toml = format!("ws_queue_len = 16\n{MOCK}mock_tokens = 500000\n");
    let hub = hub_with(&toml).await;
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    let mut other = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    other.ping().await.unwrap();
    assert_eq!(shed_total(&hub).await, 0);
    // A turn of 500,000 tokens to a client that reads nothing.
    let stalled = ClientWs::connect_stalled(
        &hub.url(),
        alice.api_key(),
        &json!({"type": "chat", "data": {"message": "flood me", "session_id": "flood"}}),
    )
    .await
    .unwrap();
    // Its chunks wait for room while it reads nothing; after 10 s without room it is shed.
    wait_until(
        "the stalled client to be shed",
        Duration::from_secs(60),
        || async { Ok((shed_total(&hub).await >= 1).then_some(())) },
    )
    .await
    .unwrap();
    // The other connection of the same user was never held up, and the flood turn was
    // cancelled with its connection: the session takes a new message at once.
    other.ping().await.unwrap();
    other
        .send(
            &json!({"type": "chat", "data": {"message": "still here", "session_id": "flood",
            "max_tokens": 2}}),
        )
        .unwrap();
    let frames = other.until("chat.completed").await.unwrap();
    assert_eq!(answer_of(&frames, "flood").0, "This is");
    stalled.abort();
    let msgs = history(&alice, "flood").await;
    assert_eq!(msgs.len(), 2, "the cut-off turn stored nothing");
    match other.next(Duration::from_millis(10)).await {
        Err(_) | Ok(Frame::Json(_)) => {}
        Ok(Frame::Closed { code, reason }) => {
            panic!("the other client was closed: {code:?} {reason}")
        }
    }
}
