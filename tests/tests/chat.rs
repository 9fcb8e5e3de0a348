#![allow(clippy::unwrap_used)]
//! Conversations end to end (`/api/v1/chat…`), with the real `apex-hub` (and `apex-node` for a
//! node-hosted model): both platforms' client snippets (`tests/python/test_chat_clients.py`),
//! stream modes, model choice, durability across a SIGKILL, ownership, trimming, busy
//! sessions. The LLM provider is the built-in `mock` or the scripted fake upstream.

use std::time::Duration;

use apex_tests::api::call;
use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::{Api, DEFAULT_TIMEOUT, Hub, Node, NodeOptions, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const MOCK: &str = "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n";

/// A hub with `toml` as its config file (and `extra` flags).
async fn hub_with(toml: &str, extra: &[&str]) -> Hub {
    Hub::start_with_config(toml, extra, None).await.unwrap()
}

async fn chat(api: &Api, body: Value) -> Value {
    let (status, v) = call(api, Method::POST, "/api/v1/chat", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// The events of a `/chat/stream` answer: `(event name, data)`.
async fn stream(api: &Api, body: Value) -> Vec<(String, Value)> {
    let resp = api
        .request(Method::POST, "/api/v1/chat/stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_owned();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        if !name.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

async fn history(api: &Api, session: &str) -> Vec<Value> {
    let (status, v) = call(
        api,
        Method::GET,
        &format!("/api/v1/chat/history/{session}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["session_id"], session);
    v["messages"].as_array().unwrap().clone()
}

async fn stats(api: &Api, session: &str) -> Value {
    let (status, v) = call(
        api,
        Method::GET,
        &format!("/api/v1/chat/context/{session}/stats"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// Registers a user and returns a client with their access token.
async fn user(hub: &Hub, email: &str) -> Api {
    Api::register_user(&hub.url(), email).await.unwrap()
}

#[tokio::test]
async fn both_platforms_clients_read_the_stream_and_the_answer_has_nex_fields() {
    let hub = hub_with(MOCK, &[]).await;
    let api = hub.api();
    let a = chat(
        api,
        json!({"message": "hello, I am Ada", "session_id": "py-1"}),
    )
    .await;
    for field in [
        "content",
        "session_id",
        "model_used",
        "reasoning",
        "token_count",
        "latency_ms",
        "confidence",
        "timestamp",
        "error",
    ] {
        assert!(a.get(field).is_some(), "ChatResponse field {field}: {a}");
    }
    assert_eq!(a["session_id"], "py-1");
    assert_eq!(a["model_used"], "mock");
    assert!(a["confidence"].is_null(), "the mock gives no logprobs: {a}");
    assert!(a["error"].is_null());
    assert!(a["token_count"].as_u64().unwrap() > 0);

    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_chat_clients.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_HUB_URL", hub.url())
        .env("APEX_API_KEY", hub.api_key())
        .env("APEX_SESSION", "py-1")
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chat client snippets failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let msgs = history(api, "py-1").await;
    assert_eq!(msgs.len(), 6, "three turns stored: {msgs:?}");
    assert_eq!(msgs[2]["content"], "你好");
    assert_eq!(
        lines[0]["nex_text"], msgs[3]["content"],
        "nex's reader printed the stored answer"
    );
    let events: Vec<&str> = lines[1]["kiki_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(events.len() > 2, "{events:?}");
    assert_eq!(events.last(), Some(&"done"));
    assert!(
        events[..events.len() - 1].iter().all(|e| *e == "token"),
        "{events:?}"
    );
    assert_eq!(msgs[4]["content"], "写一首关于春天的诗");

    // Two messages at once to one session: serialised, both stored, in turn order.
    let (x, y) = tokio::join!(
        chat(
            api,
            json!({"message": "first at once", "session_id": "py-2"})
        ),
        chat(
            api,
            json!({"message": "second at once", "session_id": "py-2"})
        ),
    );
    assert_eq!(x["session_id"], y["session_id"]);
    let msgs = history(api, "py-2").await;
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
}

#[tokio::test]
async fn stream_modes_updates_and_values_and_bad_requests() {
    let hub = hub_with(MOCK, &[]).await;
    let api = hub.api();
    let ev = stream(
        api,
        json!({"message": "hi", "session_id": "m-1", "stream_mode": "updates"}),
    )
    .await;
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["update", "update", "done"], "{ev:?}");
    assert_eq!(ev[0].1["step"], "model_call");
    assert_eq!(ev[1].1["step"], "answer");
    assert!(
        ev.iter().all(|(_, d)| d["content"].is_string()),
        "nex reads content of every event"
    );
    assert_eq!(ev[2].1["done"], true);

    let ev = stream(
        api,
        json!({"message": "and values", "session_id": "m-1", "stream_mode": "values"}),
    )
    .await;
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["values", "done"]);
    let messages = ev[0].1["messages"].as_array().unwrap();
    assert_eq!(
        messages.len(),
        4,
        "the earlier turn, the message and the answer"
    );
    assert_eq!(messages[2]["content"], "and values");
    assert_eq!(messages[3]["role"], "assistant");

    for (body, param) in [
        (json!({}), "message"),
        (json!({"message": 5}), "message"),
        (json!({"message": ""}), "message"),
        (json!({"message": "x", "model_type": "huge"}), "model_type"),
        (json!({"message": "x", "stream_mode": "all"}), "stream_mode"),
        (
            json!({"message": "x", "session_id": "has space"}),
            "session_id",
        ),
        (json!({"message": "x", "temperature": 7}), "temperature"),
    ] {
        let (status, v) = call(api, Method::POST, "/api/v1/chat", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (status, _) = call(api, Method::GET, "/api/v1/chat/history/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn history_and_stats_survive_a_hub_sigkill() {
    let mut hub = hub_with(MOCK, &[]).await;
    for i in 0..3 {
        chat(
            hub.api(),
            json!({"message": format!("turn {i} about the garden"), "session_id": "keep"}),
        )
        .await;
    }
    let before = history(hub.api(), "keep").await;
    let stats_before = stats(hub.api(), "keep").await;
    assert_eq!(before.len(), 6);
    assert_eq!(stats_before["message_count"], 6);
    assert_eq!(stats_before["role_distribution"]["user"], 3);
    assert_eq!(stats_before["exists"], true);
    hub.kill_and_restart().await.unwrap();
    assert_eq!(
        history(hub.api(), "keep").await,
        before,
        "history after SIGKILL"
    );
    assert_eq!(stats(hub.api(), "keep").await, stats_before);
    chat(
        hub.api(),
        json!({"message": "after the restart", "session_id": "keep"}),
    )
    .await;
    let after = history(hub.api(), "keep").await;
    assert_eq!(after.len(), 8, "the session goes on");
    assert_eq!(after[..6], before[..]);
    let (status, list) = call(hub.api(), Method::GET, "/api/v1/chat/sessions", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"][0]["session_id"], "keep");
    assert_eq!(list["data"][0]["message_count"], 8);
}

#[tokio::test]
async fn sessions_belong_to_their_owner() {
    let hub = hub_with(MOCK, &[]).await;
    let ann = user(&hub, "ann@example.com").await;
    let bob = user(&hub, "bob@example.com").await;
    chat(
        &ann,
        json!({"message": "ann's secret plan", "session_id": "s1", "user_id": "bob"}),
    )
    .await;
    let (status, v) = call(&bob, Method::GET, "/api/v1/chat/history/s1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    let s = stats(&bob, "s1").await;
    assert_eq!(s["exists"], false);
    assert_eq!(s["message_count"], 0);
    let (status, _) = call(&bob, Method::DELETE, "/api/v1/chat/history/s1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&bob, Method::DELETE, "/api/v1/chat/context/s1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Bob's own "s1" is another conversation.
    chat(&bob, json!({"message": "bob's own", "session_id": "s1"})).await;
    let bobs = history(&bob, "s1").await;
    assert_eq!(bobs.len(), 2);
    assert_eq!(bobs[0]["content"], "bob's own");
    let anns = history(&ann, "s1").await;
    assert_eq!(anns[0]["content"], "ann's secret plan");
    let (_, list) = call(&bob, Method::GET, "/api/v1/chat/sessions", None).await;
    assert_eq!(list["meta"]["total"], 1);
    // Deleting is the owner's, and leaves the other's alone.
    let (status, v) = call(&ann, Method::DELETE, "/api/v1/chat/history/s1", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "success");
    let (status, _) = call(&ann, Method::GET, "/api/v1/chat/history/s1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(history(&bob, "s1").await.len(), 2);
}

#[tokio::test]
async fn trimming_keeps_the_context_within_the_budget_and_the_history_whole() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["fake-model".to_owned()],
        record: true,
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let toml = format!(
        "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\nmodels = [\"fake-model\"]\n\
         [chat]\ncontext_max_tokens = 120\nlogprobs = false\n",
        fake.base_url()
    );
    let hub = hub_with(&toml, &[]).await;
    let api = hub.api();
    let msg = "please remember the number forty-two for me, it matters a lot to me";
    for _ in 0..8 {
        chat(api, json!({"message": msg, "session_id": "t"})).await;
        let s = stats(api, "t").await;
        assert!(
            s["token_estimate"].as_u64().unwrap() <= 120,
            "context over budget: {s}"
        );
    }
    assert_eq!(
        history(api, "t").await.len(),
        16,
        "the history keeps every message"
    );
    let s = stats(api, "t").await;
    assert!(s["message_count"].as_u64().unwrap() < 16, "{s}");
    let sent = fake.requests();
    let last = &sent.last().unwrap()["body"]["messages"];
    let last = last.as_array().unwrap();
    assert!(
        last.len() < 16,
        "the model got a trimmed context: {}",
        last.len()
    );
    assert!(["user", "assistant"].contains(&last[0]["role"].as_str().unwrap()));
    assert_eq!(last.last().unwrap()["content"], msg);

    let (status, v) = call(api, Method::DELETE, "/api/v1/chat/context/t", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(stats(api, "t").await["message_count"], 0);
    chat(api, json!({"message": "fresh start", "session_id": "t"})).await;
    let sent = fake.requests();
    let last = sent.last().unwrap()["body"]["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        last.len(),
        1,
        "only the new message after clearing: {last:?}"
    );
    assert_eq!(
        history(api, "t").await.len(),
        18,
        "clearing the context keeps the history"
    );

    let long = "word ".repeat(400);
    let (status, v) = call(
        api,
        Method::POST,
        "/api/v1/chat",
        Some(json!({"message": long, "session_id": "t"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(
        history(api, "t").await.len(),
        18,
        "a refused turn stores nothing"
    );
}

#[tokio::test]
async fn model_type_chooses_a_node_hosted_model_when_one_is_online() {
    let hub = hub_with(MOCK, &[]).await;
    let api = hub.api();
    let a = chat(api, json!({"message": "hi", "model_type": "local_small"})).await;
    assert_eq!(a["model_used"], "mock");
    assert_eq!(a["reasoning"], "no local model online, so the cloud model");

    let fake = FakeLlm::start(FakeOptions {
        models: vec!["house-1b".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let _node = Node::start(
        &hub,
        NodeOptions::named("llm-host").args(["--llm-upstream".to_owned(), fake.base_url()]),
    )
    .await
    .unwrap();
    wait_until("the node's model to be listed", DEFAULT_TIMEOUT, || async {
        let (_, v) = call(api, Method::GET, "/v1/models", None).await;
        Ok(v["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "house-1b"))
            .then_some(()))
    })
    .await
    .unwrap();
    let a = chat(api, json!({"message": "hi", "model_type": "local_small"})).await;
    assert_eq!(a["model_used"], "house-1b", "{a}");
    assert_eq!(a["reasoning"], "local model online");
    let a = chat(api, json!({"message": "short one"})).await;
    assert_eq!(
        a["model_used"], "house-1b",
        "auto_select, short prompt: {a}"
    );
    assert!(
        a["reasoning"]
            .as_str()
            .unwrap()
            .starts_with("local model online, short prompt")
    );
    let a = chat(api, json!({"message": "hi", "model_type": "cloud_large"})).await;
    assert_eq!(a["model_used"], "mock");
    assert_eq!(a["reasoning"], "cloud model requested");
    let a = chat(
        api,
        json!({"message": "hi", "model_type": "local_small", "preferred_model": "mock"}),
    )
    .await;
    assert_eq!(a["model_used"], "mock");
    assert_eq!(a["reasoning"], "preferred model mock is served");
}

#[tokio::test]
async fn a_busy_session_answers_409_with_busy_reject() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["slow-1500-a".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let toml = format!(
        "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\nmodels = [\"slow-1500-a\"]\n\
         [chat]\nbusy = \"reject\"\nlogprobs = false\n",
        fake.base_url()
    );
    let hub = hub_with(&toml, &[]).await;
    let api = hub.api().clone();
    let first = {
        let api = api.clone();
        tokio::spawn(
            async move { chat(&api, json!({"message": "slow one", "session_id": "b"})).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, v) = call(
        &api,
        Method::POST,
        "/api/v1/chat",
        Some(json!({"message": "meanwhile", "session_id": "b"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "session_busy");
    first.await.unwrap();
    assert_eq!(history(&api, "b").await.len(), 2, "only the first turn");
    chat(&api, json!({"message": "now", "session_id": "b"})).await;
    assert_eq!(history(&api, "b").await.len(), 4);
}
