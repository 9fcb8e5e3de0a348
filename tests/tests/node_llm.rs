//! End-to-end tests of the node side of the LLM gateway, with the real `apex-hub` and
//! `apex-node` binaries and the fake OpenAI-compatible upstream (`apex_tests::fake_llm`):
//! - a raw node's `llm_request`, non-streamed and streamed, answered with the exact frame
//!   sequences of PROTOCOL.md §10, and refused with the quota codes;
//! - a node started with `--llm-upstream` serving its model through `POST /v1/chat/completions`
//!   at the hub, streamed and not, and listed by `GET /v1/models`;
//! - SIGKILL of the node serving a stream, with a second node hosting the same model: the
//!   client sees one continuous answer;
//! - the built-in `llm.summarize` tool, run as a task, answering through the hub's gateway.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use apex_protocol::{ChatMessage, HubMessage, LlmRequest, LlmResponse, NodeMessage};
use apex_tests::fake_llm::{FakeLlm, FakeOptions, fake_text};
use apex_tests::{DEFAULT_TIMEOUT, Hub, HubOptions, Node, NodeOptions, RawNode, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};

/// The mock provider's answer of `n` tokens (`hub/src/llm/mock.rs`).
fn mock_text(n: u64) -> String {
    apex_hub::llm::Mock::text(n)
}

/// A hub whose config file is `toml` (plus `extra` flags).
async fn hub_with(toml: &str, fast: bool) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    let base = if fast {
        HubOptions::fast_liveness()
    } else {
        HubOptions::default()
    };
    Hub::start(HubOptions {
        extra_args: vec![
            "--config".into(),
            path.display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ],
        ..base
    })
    .await
    .unwrap()
}

/// A hub with the mock provider: `mock` (5 tokens), `mock-slow` (2000 tokens at 20/s) and
/// `mock-stuck` (first token after 1000 s).
async fn mock_hub(quotas: &str) -> Hub {
    hub_with(
        &format!(
            r#"
[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]
mock_tokens = 5

[[llm.providers]]
name = "mockslow"
kind = "mock"
models = ["mock-slow"]
mock_tokens = 2000
mock_tokens_per_second = 20.0

[[llm.providers]]
name = "mockstuck"
kind = "mock"
models = ["mock-stuck"]
mock_first_token_delay_ms = 1000000
first_token_timeout_ms = 2000000
total_timeout_ms = 3000000

{quotas}
"#
        ),
        false,
    )
    .await
}

fn request(id: &str, model: &str, stream: bool) -> LlmRequest {
    LlmRequest {
        request_id: id.to_owned(),
        node_id: String::new(),
        model: Some(model.to_owned()),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: json!("Say something"),
            name: None,
            ..Default::default()
        }],
        options: Some(json!({"stream": stream, "temperature": 0.5})),
    }
}

/// Every LLM frame for `request_id`, until its `llm_response` (which comes last).
async fn llm_frames(node: &mut RawNode, request_id: &str) -> Vec<HubMessage> {
    let mut frames = Vec::new();
    loop {
        let f = node
            .expect_within("an llm frame", DEFAULT_TIMEOUT, |m| match m {
                HubMessage::LlmResponseStream(s) if s.request_id == request_id => Some(m.clone()),
                HubMessage::LlmResponse(r) if r.request_id == request_id => Some(m.clone()),
                _ => None,
            })
            .await
            .unwrap();
        let last = matches!(f, HubMessage::LlmResponse(_));
        frames.push(f);
        if last {
            return frames;
        }
    }
}

async fn llm_response(node: &mut RawNode, request_id: &str) -> LlmResponse {
    let frames = llm_frames(node, request_id).await;
    match frames.last() {
        Some(HubMessage::LlmResponse(r)) => r.clone(),
        other => panic!("no llm_response: {other:?}"),
    }
}

fn error_code(r: &LlmResponse) -> &str {
    r.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
}

#[tokio::test]
async fn raw_node_gets_the_exact_frame_sequences() {
    let hub = mock_hub("").await;
    let mut node = RawNode::connect_native(&hub).await.unwrap();
    let ack = node
        .register(apex_tests::register_msg(
            Some("llm-raw"),
            "llm-raw",
            &["echo"],
            2,
        ))
        .await
        .unwrap();
    assert!(ack.hub_info.unwrap().llm_available, "the hub has models");

    // Non-streamed: exactly one llm_response.
    node.send(NodeMessage::from(request("r1", "mock", false)))
        .unwrap();
    let frames = llm_frames(&mut node, "r1").await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    let HubMessage::LlmResponse(r) = &frames[0] else {
        panic!()
    };
    assert!(r.success, "{r:?}");
    assert!(!r.stream);
    assert_eq!(r.node_id, "llm-raw");
    assert_eq!(r.content.as_deref(), Some(mock_text(5).as_str()));
    let usage = r.usage.clone().expect("usage");
    assert_eq!(usage.completion_tokens, 5);

    // Streamed: chunks, one empty done frame, then llm_response with all the text.
    node.send(NodeMessage::from(request("r2", "mock", true)))
        .unwrap();
    let frames = llm_frames(&mut node, "r2").await;
    let n = frames.len();
    assert!(n >= 3, "{frames:?}");
    let mut text = String::new();
    for f in &frames[..n - 2] {
        let HubMessage::LlmResponseStream(s) = f else {
            panic!("expected a chunk, got {f:?}")
        };
        assert!(!s.done);
        assert!(!s.chunk.is_empty());
        assert_eq!(s.node_id, "llm-raw");
        text.push_str(&s.chunk);
    }
    assert_eq!(text, mock_text(5));
    let HubMessage::LlmResponseStream(done) = &frames[n - 2] else {
        panic!("expected the done frame, got {:?}", frames[n - 2])
    };
    assert!(done.done);
    assert_eq!(done.chunk, "");
    let HubMessage::LlmResponse(r) = &frames[n - 1] else {
        panic!()
    };
    assert!(r.success && r.stream, "{r:?}");
    assert_eq!(r.content.as_deref(), Some(text.as_str()));

    // No model given: the hub picks one.
    let mut req = request("r3", "mock", false);
    req.model = None;
    node.send(NodeMessage::from(req)).unwrap();
    let r = llm_response(&mut node, "r3").await;
    assert!(r.success, "{r:?}");

    // A model nobody serves.
    node.send(NodeMessage::from(request("r4", "no-such-model", true)))
        .unwrap();
    let r = llm_response(&mut node, "r4").await;
    assert!(!r.success);
    assert_eq!(error_code(&r), "llm_unavailable");
}

#[tokio::test]
async fn a_model_s_tool_calls_reach_the_node_in_llm_response() {
    let hub = mock_hub("").await;
    let mut node = RawNode::connect_native(&hub).await.unwrap();
    node.register(apex_tests::register_msg(
        Some("llm-tools"),
        "llm-tools",
        &["echo"],
        2,
    ))
    .await
    .unwrap();
    let mut req = request("t1", "mock", false);
    req.options = Some(json!({
        "stream": false,
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}],
        "toolChoice": "required",
    }));
    node.send(NodeMessage::from(req)).unwrap();
    let r = llm_response(&mut node, "t1").await;
    assert!(r.success, "{r:?}");
    let calls = r.tool_calls.expect("tool calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: serde_json::Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert!(calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    // Without tools nothing changes: no tool_calls field.
    node.send(NodeMessage::from(request("t2", "mock", false)))
        .unwrap();
    let r = llm_response(&mut node, "t2").await;
    assert!(r.tool_calls.is_none() && r.success);
}

#[tokio::test]
async fn a_hub_without_models_answers_llm_unavailable() {
    let hub = Hub::start_default().await.unwrap();
    let mut node = RawNode::connect_native(&hub).await.unwrap();
    let ack = node
        .register(apex_tests::register_msg(
            Some("llm-none"),
            "llm-none",
            &["echo"],
            2,
        ))
        .await
        .unwrap();
    assert!(!ack.hub_info.unwrap().llm_available);
    let mut req = request("r1", "x", false);
    req.model = None;
    node.send(NodeMessage::from(req)).unwrap();
    let r = llm_response(&mut node, "r1").await;
    assert!(!r.success);
    assert_eq!(error_code(&r), "llm_unavailable");
}

#[tokio::test]
async fn requests_per_minute_quota() {
    let hub = mock_hub("[node_llm]\nrequests_per_minute = 2\n").await;
    let mut node = RawNode::connect_registered(&hub, "llm-rpm", &["echo"], 2)
        .await
        .unwrap();
    for id in ["a", "b"] {
        node.send(NodeMessage::from(request(id, "mock", false)))
            .unwrap();
        let r = llm_response(&mut node, id).await;
        assert!(r.success, "{r:?}");
    }
    node.send(NodeMessage::from(request("c", "mock", false)))
        .unwrap();
    let r = llm_response(&mut node, "c").await;
    assert!(!r.success);
    assert_eq!(error_code(&r), "rate_limit_exceeded");

    // The quota is per node: another node still may.
    let mut other = RawNode::connect_registered(&hub, "llm-rpm-2", &["echo"], 2)
        .await
        .unwrap();
    other
        .send(NodeMessage::from(request("d", "mock", false)))
        .unwrap();
    assert!(llm_response(&mut other, "d").await.success);
}

#[tokio::test]
async fn tokens_per_day_quota() {
    // Each mock answer uses more than 5 tokens (prompt + 5).
    let hub = mock_hub("[node_llm]\ntokens_per_day = 5\n").await;
    let mut node = RawNode::connect_registered(&hub, "llm-tpd", &["echo"], 2)
        .await
        .unwrap();
    node.send(NodeMessage::from(request("a", "mock", false)))
        .unwrap();
    assert!(llm_response(&mut node, "a").await.success);
    node.send(NodeMessage::from(request("b", "mock", false)))
        .unwrap();
    let r = llm_response(&mut node, "b").await;
    assert!(!r.success);
    assert_eq!(error_code(&r), "quota_exceeded");
}

#[tokio::test]
async fn concurrent_stream_limit_and_abort_on_disconnect() {
    let hub = mock_hub("[node_llm]\nmax_concurrent_streams = 1\n").await;
    let mut node = RawNode::connect_registered(&hub, "llm-streams", &["echo"], 2)
        .await
        .unwrap();
    // A stream whose first token would take 1000 s is open (no frame is ever sent for it, so
    // only the hub's cancel on disconnect can end it)...
    node.send(NodeMessage::from(request("long", "mock-stuck", true)))
        .unwrap();
    // ...so a second one is refused, while a non-streamed call is fine.
    node.send(NodeMessage::from(request("second", "mock-slow", true)))
        .unwrap();
    let r = llm_response(&mut node, "second").await;
    assert!(!r.success);
    assert_eq!(error_code(&r), "stream_limit_exceeded");
    node.send(NodeMessage::from(request("plain", "mock", false)))
        .unwrap();
    assert!(llm_response(&mut node, "plain").await.success);

    // The node drops its connection: its stream is aborted, which frees the slot.
    node.abort();
    let mut again = RawNode::connect_registered(&hub, "llm-streams", &["echo"], 2)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("retry-{n}");
        again
            .send(NodeMessage::from(request(&id, "mock", true)))
            .unwrap();
        let r = llm_response(&mut again, &id).await;
        if r.success {
            break;
        }
        assert_eq!(error_code(&r), "stream_limit_exceeded", "{r:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aborted stream still holds the node's only stream slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads an SSE chat completion: the content deltas joined, and whether `[DONE]` came. Panics
/// on an error frame.
async fn read_sse(resp: reqwest::Response, on_text: impl FnMut(&str)) -> (String, bool) {
    let (text, done, error) = read_sse_full(resp, on_text).await;
    assert!(error.is_none(), "error frame: {error:?}");
    (text, done)
}

/// [`read_sse`], also returning the error frame if one came.
async fn read_sse_full(
    resp: reqwest::Response,
    mut on_text: impl FnMut(&str),
) -> (String, bool, Option<Value>) {
    let mut error = None;
    let mut text = String::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let Ok(piece) = piece else { break };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return (text, true, error);
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(e) = v.get("error") {
                error = Some(e.clone());
                continue;
            }
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                text.push_str(t);
                on_text(&text);
            }
        }
    }
    (text, false, error)
}

fn node_with_upstream(name: &str, fake: &FakeLlm) -> NodeOptions {
    NodeOptions::named(name).args(["--llm-upstream".to_owned(), fake.base_url()])
}

#[tokio::test]
async fn a_node_hosted_model_is_served_through_the_hub() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["house-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = Hub::start_default().await.unwrap();
    let node = Node::start(&hub, node_with_upstream("llm-host", &fake))
        .await
        .unwrap();
    let http = reqwest::Client::new();

    let models: Value = http
        .get(format!("{}/v1/models", hub.url()))
        .bearer_auth(hub.api_key())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "house-model")
        .cloned()
        .unwrap_or_else(|| panic!("house-model not listed: {models}"));
    assert_eq!(listed["owned_by"], format!("node:{}", node.id()));
    let view: Value = hub
        .api()
        .get_json(&format!("/v1/nodes/{}", node.id()))
        .await
        .unwrap();
    assert_eq!(view["models"], json!(["house-model"]), "{view}");

    // Not streamed.
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "house-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], fake_text(8), "{v}");
    assert_eq!(v["model"], "house-model");

    // Tools pass through to the node's server; its streamed tool call comes back whole.
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "house-model",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "weather",
                "parameters": {"type": "object"}}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_1", "{v}");
    assert_eq!(call["function"]["name"], "weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");

    // Streamed.
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "house-model", "stream": true,
            "messages": [{"role": "user", "content": "hi"}], "fake": {"tokens": 12}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (text, done) = read_sse(resp, |_| {}).await;
    assert!(done);
    assert_eq!(text, fake_text(12));

    // The node's upstream got the requests (the hub never talks to it directly).
    let bodies = fake.requests();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(bodies.iter().all(|b| b["body"]["stream"] == true));

    // A node that leaves takes its model with it.
    drop(node);
    wait_until("house-model unlisted", DEFAULT_TIMEOUT, || async {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/v1/models", hub.url()))
            .bearer_auth(hub.api_key())
            .send()
            .await?
            .json()
            .await?;
        let gone = !v["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"] == "house-model"));
        Ok(gone.then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stream_continues_from_the_prefix_on_another_node_after_sigkill() {
    // The second node's server honours the assistant prefix and goes on after it.
    continue_after_sigkill(true).await;
}

#[tokio::test]
async fn a_restarted_answer_is_deduplicated_after_sigkill() {
    // The second node's server ignores the prefix and answers from the start again.
    continue_after_sigkill(false).await;
}

async fn continue_after_sigkill(server_continues: bool) {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["shared-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = hub_with("", true).await;
    let mut a = Node::start(&hub, node_with_upstream("llm-a", &fake))
        .await
        .unwrap();
    let mut b = Node::start(&hub, node_with_upstream("llm-b", &fake))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let tokens = 40u64;
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "shared-model", "stream": true,
            "messages": [{"role": "user", "content": "count"}],
            "fake": {"tokens": tokens, "token_delay_ms": 100,
                "continue_prefix": server_continues}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Once a few tokens have arrived, find the serving node and SIGKILL it.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(async move {
        read_sse(resp, move |t| {
            let _ = seen_tx.send(t.len());
        })
        .await
    });
    loop {
        let n = tokio::time::timeout(DEFAULT_TIMEOUT, seen_rx.recv())
            .await
            .unwrap()
            .unwrap();
        if n >= "t0 t1 t2 t3 t4 ".len() {
            break;
        }
    }
    let tasks = hub
        .api()
        .list_all(&[("tool", "llm.chat@shared-model")])
        .await
        .unwrap();
    let task = tasks
        .iter()
        .find(|t| !t.is_terminal())
        .unwrap_or_else(|| panic!("no running llm.chat task: {tasks:?}"));
    let serving = task.node_id.clone().unwrap();
    let (victim, survivor) = if serving == a.id() {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    victim.kill().unwrap();

    let (text, done) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(done, "the stream must end with [DONE]; got {text:?}");
    assert_eq!(
        text,
        fake_text(tokens),
        "one continuous answer: no duplicated and no missing text"
    );

    // The second attempt ran on the survivor, asked to continue after the text already sent.
    let t = hub.api().get(&task.task_id).await.unwrap();
    assert_eq!(t.status, "succeeded");
    assert_eq!(t.attempt, 2);
    assert_eq!(t.node_id.as_deref(), Some(survivor.id()));
    let bodies = fake.requests();
    let resumed = bodies.last().unwrap();
    let msgs = resumed["body"]["messages"].as_array().unwrap();
    let last = msgs.last().unwrap();
    assert_eq!(last["role"], "assistant", "{resumed}");
    let prefix = last["content"].as_str().unwrap();
    assert!(
        !prefix.is_empty() && fake_text(tokens).starts_with(prefix),
        "prefix {prefix:?}"
    );
}

#[tokio::test]
async fn llm_summarize_runs_as_a_task_through_the_gateway() {
    let fake = FakeLlm::start(FakeOptions::default()).await.unwrap();
    let hub = hub_with(
        &format!(
            "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\nmodels = [\"fake-model\"]\n",
            fake.base_url()
        ),
        false,
    )
    .await;
    let _node = Node::start(&hub, NodeOptions::named("llm-summarizer"))
        .await
        .unwrap();
    let task = hub
        .api()
        .submit(&json!({"tool": "llm.summarize",
            "args": {"text": "A long text about many things.", "max_words": 5}}))
        .await
        .unwrap();
    let done = hub
        .api()
        .wait_terminal(&task.task_id, DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.result["summary"], fake_text(8).trim());
    // The request reached the upstream through the hub, with the instructions.
    let bodies = fake.requests();
    let body = &bodies.last().unwrap()["body"];
    assert_eq!(body["model"], "fake-model");
    assert!(
        body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("at most 5 words"),
        "{body}"
    );
    assert_eq!(
        body["messages"][1]["content"],
        "A long text about many things."
    );

    // Bad arguments fail the task with a clear error, without calling the model.
    let bad = hub
        .api()
        .submit(&json!({"tool": "llm.summarize", "args": {"text": ""}}))
        .await
        .unwrap();
    let bad = hub
        .api()
        .wait_terminal(&bad.task_id, DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(bad.status, "failed");
    assert_eq!(bad.error.unwrap().code, "invalid_arguments");
    assert_eq!(fake.requests().len(), bodies.len());
}

/// A streamed chat request for `model` at `hub` with the fake's knobs.
async fn start_stream(hub: &Hub, model: &str, fake: Value) -> reqwest::Response {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": "count"}], "fake": fake}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// The `llm.chat` tasks for `model` that are running on a node, once there are `n`.
async fn running_llm_tasks(hub: &Hub, model: &str, n: usize) -> Vec<apex_tests::Task> {
    let tool = format!("llm.chat@{model}");
    wait_until("llm.chat tasks on nodes", DEFAULT_TIMEOUT, || async {
        let tasks = hub.api().list_all(&[("tool", tool.as_str())]).await?;
        let on_nodes: Vec<apex_tests::Task> = tasks
            .into_iter()
            .filter(|t| matches!(t.status.as_str(), "assigned" | "running"))
            .collect();
        Ok((on_nodes.len() == n).then_some(on_nodes))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_node_lost_before_the_first_token_means_a_plain_retry_elsewhere() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["shared-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = hub_with("", true).await;
    let mut a = Node::start(&hub, node_with_upstream("first-a", &fake))
        .await
        .unwrap();
    let mut b = Node::start(&hub, node_with_upstream("first-b", &fake))
        .await
        .unwrap();
    // The response headers only come with the first token: read in the background.
    let req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "shared-model", "stream": true,
            "messages": [{"role": "user", "content": "count"}],
            "fake": {"tokens": 10, "first_token_delay_ms": 1500}}));
    let reader = tokio::spawn(async move {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        read_sse(resp, |_| {}).await
    });
    let task = running_llm_tasks(&hub, "shared-model", 1).await.remove(0);
    let serving = task.node_id.clone().unwrap();
    if serving == a.id() {
        a.kill().unwrap();
    } else {
        b.kill().unwrap();
    }
    let (text, done) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(done);
    assert_eq!(text, fake_text(10));
    let t = hub.api().get(&task.task_id).await.unwrap();
    assert_eq!((t.status.as_str(), t.attempt), ("succeeded", 2));
    assert_ne!(t.node_id.as_deref(), Some(serving.as_str()));
    // Nothing had been sent, so the retry is the original request: no assistant prefix.
    let bodies = fake.requests();
    let last = bodies.last().unwrap()["body"]["messages"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(last["role"], "user", "{last}");
}

#[tokio::test]
async fn calls_are_balanced_over_the_nodes_hosting_a_model() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["shared-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = Hub::start_default().await.unwrap();
    let a = Node::start(&hub, node_with_upstream("bal-a", &fake))
        .await
        .unwrap();
    let b = Node::start(&hub, node_with_upstream("bal-b", &fake))
        .await
        .unwrap();
    let knobs = json!({"tokens": 20, "token_delay_ms": 50});
    let r1 = start_stream(&hub, "shared-model", knobs.clone()).await;
    let r2 = start_stream(&hub, "shared-model", knobs).await;
    let tasks = running_llm_tasks(&hub, "shared-model", 2).await;
    let mut nodes: Vec<String> = tasks.iter().filter_map(|t| t.node_id.clone()).collect();
    nodes.sort();
    let mut expected = vec![a.id().to_owned(), b.id().to_owned()];
    expected.sort();
    assert_eq!(nodes, expected, "one call per node");
    for r in [r1, r2] {
        let (text, done) = read_sse(r, |_| {}).await;
        assert!(done);
        assert_eq!(text, fake_text(20));
    }
}

#[tokio::test]
async fn a_stream_whose_only_node_dies_ends_with_an_error_frame() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["lonely-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = hub_with("", true).await;
    let mut node = Node::start(&hub, node_with_upstream("lonely", &fake))
        .await
        .unwrap();
    let resp = start_stream(
        &hub,
        "lonely-model",
        json!({"tokens": 100, "token_delay_ms": 100}),
    )
    .await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(read_sse_full(resp, move |t| {
        let _ = seen_tx.send(t.len());
    }));
    // Some text has arrived...
    tokio::time::timeout(DEFAULT_TIMEOUT, seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    node.kill().unwrap();
    // ...and then the client learns the answer is incomplete: never a silent truncation.
    let (text, done, error) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(done);
    let error = error.unwrap_or_else(|| panic!("no error frame after {text:?}"));
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("lonely-model"),
        "{error}"
    );
    assert!(fake_text(100).starts_with(&text) && text.len() < fake_text(100).len());
}

#[tokio::test]
async fn interrupting_a_node_hosted_stream_stops_the_node_upstream_call() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["house-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let hub = Hub::start_default().await.unwrap();
    let _node = Node::start(&hub, node_with_upstream("int-host", &fake))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(
            &json!({"model": "house-model", "stream": true, "requestId": "int-1",
            "messages": [{"role": "user", "content": "count"}],
            "fake": {"tokens": 200, "token_delay_ms": 100}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(read_sse(resp, move |t| {
        let _ = seen_tx.send(t.len());
    }));
    tokio::time::timeout(DEFAULT_TIMEOUT, seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let r = http
        .post(format!("{}/v1/interrupt", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"requestId": "int-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (text, done) = tokio::time::timeout(DEFAULT_TIMEOUT, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(done);
    assert!(fake_text(200).starts_with(&text) && text.len() < fake_text(200).len());
    // The task is cancelled and the node closes its request to the local server.
    let tasks = hub
        .api()
        .list_all(&[("tool", "llm.chat@house-model")])
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1);
    let t = hub
        .api()
        .wait_terminal(&tasks[0].task_id, DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(t.status, "cancelled");
    wait_until(
        "the node's upstream stream dropped",
        DEFAULT_TIMEOUT,
        || async { Ok((fake.stats().streams_dropped == 1).then_some(())) },
    )
    .await
    .unwrap();
    assert_eq!(fake.stats().streams_completed, 0);
}

#[tokio::test]
async fn a_node_advertises_models_once_its_local_server_comes_up() {
    // A free port for a local server that is not running yet.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hub = Hub::start_default().await.unwrap();
    let node = Node::start(
        &hub,
        NodeOptions::named("late-host")
            .args(["--llm-upstream".to_owned(), format!("http://{addr}/v1")]),
    )
    .await
    .unwrap();
    let view: Value = hub
        .api()
        .get_json(&format!("/v1/nodes/{}", node.id()))
        .await
        .unwrap();
    assert_eq!(view["models"], json!([]), "{view}");
    let _fake = FakeLlm::start(FakeOptions {
        listen: addr,
        models: vec!["late-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    // The node reads the model list again every 15 s and registers again when it changes.
    wait_until("late-model advertised", Duration::from_secs(40), || async {
        let v: Value = hub
            .api()
            .get_json(&format!("/v1/nodes/{}", node.id()))
            .await?;
        Ok((v["models"] == json!(["late-model"])).then_some(()))
    })
    .await
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"model": "late-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], fake_text(8));
}

#[tokio::test]
async fn a_chat_call_whose_caller_died_with_the_hub_ends_caller_gone_and_is_not_run_again() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["house-model".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    // A grace period far longer than the node's reconnect, so it reclaims what it runs.
    let mut hub = Hub::start(HubOptions {
        extra_args: vec![
            "--store".into(),
            "embedded".into(),
            "--recovery-grace-ms".into(),
            "60000".into(),
        ],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let _node = Node::start(&hub, node_with_upstream("chat-host", &fake))
        .await
        .unwrap();
    let resp = start_stream(
        &hub,
        "house-model",
        json!({"tokens": 600, "token_delay_ms": 50}),
    )
    .await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(read_sse_full(resp, move |t| {
        let _ = seen_tx.send(t.len());
    }));
    // Mid-stream: text has reached the caller.
    tokio::time::timeout(DEFAULT_TIMEOUT, seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let task = running_llm_tasks(&hub, "house-model", 1).await.remove(0);

    hub.kill_and_restart().await.unwrap();
    let (_, done, _) = reader.await.unwrap();
    assert!(!done, "the caller's stream died with the hub");

    // Nobody can read the answer any more: the call ended instead of running on.
    let t = hub.api().get(&task.task_id).await.unwrap();
    assert_eq!(t.status, "failed", "{t:?}");
    assert_eq!(t.error.as_ref().unwrap().code, "caller_gone", "{t:?}");
    // The node, back on the restarted hub, is told to stop: its request to the model server
    // is dropped, and the server gets no new request for the call.
    wait_until(
        "the node's upstream stream dropped",
        Duration::from_secs(60),
        || async { Ok((fake.stats().streams_dropped == 1).then_some(())) },
    )
    .await
    .unwrap();
    assert_eq!(fake.requests().len(), 1, "{:?}", fake.requests());
    assert_eq!(fake.stats().streams_completed, 0);
    let again = hub.api().get(&task.task_id).await.unwrap();
    assert_eq!((again.status.as_str(), again.attempt), ("failed", 1));
}
