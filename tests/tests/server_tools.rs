//! End-to-end tests of server-side tools (`"server_tools"` in `POST /v1/chat/completions`):
//! the real `apex-hub` in front of the scripted fake upstream (`apex_tests::fake_llm`, knob
//! `calls`), with real `apex-node` processes running the tools, driven over HTTP and by the
//! official `openai` Python package (`tests/python/test_server_tools_sdk.py`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::{DEFAULT_TIMEOUT, Hub, HubOptions, Node, NodeOptions, wait_until};
use serde_json::{Value, json};

/// SHA-256 of `hello`.
const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

struct Setup {
    hub: Hub,
    fake: FakeLlm,
    http: reqwest::Client,
    _nodes: Vec<Node>,
}

/// A hub with providers `up` (the fake: `fake-model`) and `mock`, `max_tool_rounds = 3`, and
/// one node `n1` online (unless `node` is false).
async fn setup(opts: HubOptions, node: bool) -> Setup {
    let fake = FakeLlm::start(FakeOptions::default()).await.unwrap();
    let toml = format!(
        r#"
max_tool_rounds = 3

[[llm.providers]]
name = "up"
base_url = "{}"
models = ["fake-model"]

[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]
"#,
        fake.base_url()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    let mut opts = opts;
    opts.extra_args
        .extend(["--config".to_owned(), path.display().to_string()]);
    let hub = Hub::start(opts).await.unwrap();
    let mut nodes = Vec::new();
    if node {
        nodes.push(Node::start(&hub, NodeOptions::named("n1")).await.unwrap());
    }
    Setup {
        hub,
        fake,
        http: reqwest::Client::new(),
        _nodes: nodes,
    }
}

impl Setup {
    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chat/completions", self.hub.url()))
            .bearer_auth(self.hub.api_key())
            .json(body)
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let r = self.post(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// A streamed chat: the JSON of every `data:` frame before `[DONE]`.
    async fn chat_stream(&self, body: Value) -> Vec<Value> {
        let r = self.post(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        let frames: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(frames.last(), Some(&"[DONE]"), "{text}");
        frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    /// The bodies the fake received, oldest first.
    fn upstream_bodies(&self) -> Vec<Value> {
        self.fake
            .requests()
            .into_iter()
            .map(|r| r["body"].clone())
            .collect()
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// One round of the fake's script: call `sha256` with `arguments`.
fn sha256_call(arguments: Value) -> Value {
    json!({"name": "sha256", "arguments": arguments})
}

/// The `tool` messages of an upstream body.
fn tool_messages(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .cloned()
        .collect()
}

#[tokio::test]
async fn the_model_calls_sha256_on_a_node_and_answers_with_the_hash() {
    let s = setup(HubOptions::default(), true).await;
    let (status, v) = s
        .chat(json!({
            "model": "fake-model",
            "messages": user("what is the sha256 of hello?"),
            "server_tools": ["sha256"],
            "fake": {"calls": [[sha256_call(json!({"text": "hello"}))]]},
        }))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains(HELLO_SHA256), "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["usage"]["prompt_tokens"], 10, "usage of both rounds: {v}");

    // The fake was offered sha256 with its real schema, then saw the tool message.
    let bodies = s.upstream_bodies();
    assert_eq!(bodies.len(), 2);
    let offered = &bodies[0]["tools"][0];
    assert_eq!(offered["type"], "function");
    assert_eq!(offered["function"]["name"], "sha256");
    // The node's schema for `sha256 {text}` (`text` is an optional string).
    let text_type = &offered["function"]["parameters"]["properties"]["text"]["type"];
    assert!(
        text_type == "string"
            || text_type
                .as_array()
                .is_some_and(|a| a.contains(&json!("string"))),
        "{offered}"
    );
    assert!(offered["function"]["description"].as_str().is_some());
    assert!(bodies[0].get("server_tools").is_none(), "not sent upstream");
    let msgs = bodies[1]["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["tool_calls"][0]["function"]["name"], "sha256");
    let tools = tool_messages(&bodies[1]);
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["tool_call_id"], "call_0_0");
    let content: Value = serde_json::from_str(tools[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"sha256": HELLO_SHA256, "bytes": 5}));

    // `apex_tool_runs` names the real task, which the task API shows succeeded.
    let runs = v["apex_tool_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{v}");
    assert_eq!(runs[0]["tool"], "sha256");
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["tool_call_id"], "call_0_0");
    assert!(runs[0]["duration_ms"].as_f64().unwrap() > 0.0);
    let task = s
        .hub
        .api()
        .get(runs[0]["task_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(task.status, "succeeded");
    assert_eq!(task.tool, "sha256");
    assert_eq!(task.result["sha256"], HELLO_SHA256);
    assert_eq!(task.args, json!({"text": "hello"}));
}

#[tokio::test]
async fn a_streamed_answer_carries_the_tool_runs_in_its_last_chunk() {
    let s = setup(HubOptions::default(), true).await;
    let frames = s
        .chat_stream(json!({
            "model": "fake-model",
            "messages": user("hash hello"),
            "stream": true,
            "stream_options": {"include_usage": true},
            "server_tools": ["sha256"],
            "fake": {"calls": [[sha256_call(json!({"text": "hello"}))]]},
        }))
        .await;
    let text: String = frames
        .iter()
        .filter_map(|f| f["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains(HELLO_SHA256), "{text}");
    assert!(
        frames
            .iter()
            .all(|f| f["choices"][0]["delta"].get("tool_calls").is_none()),
        "server calls are not streamed to the client"
    );
    assert_eq!(frames[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes: Vec<&str> = frames
        .iter()
        .filter_map(|f| f["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, vec!["stop"]);
    let last = frames.last().unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let runs = last["apex_tool_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{last}");
    assert_eq!(runs[0]["status"], "succeeded");
    let task = s
        .hub
        .api()
        .get(runs[0]["task_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(task.status, "succeeded");
    // Both upstream calls were streamed.
    let bodies = s.upstream_bodies();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| b["stream"] == true));
    assert_eq!(tool_messages(&bodies[1]).len(), 1);
}

#[tokio::test]
async fn failing_calls_go_back_to_the_model_as_errors_in_parallel() {
    let s = setup(HubOptions::default(), true).await;
    let (status, v) = s
        .chat(json!({
            "model": "fake-model",
            "messages": user("three hashes"),
            "server_tools": ["sha256"],
            "fake": {"calls": [[
                sha256_call(json!({"text": "a", "path": "b"})),
                sha256_call(json!("{oops")),
                sha256_call(json!({"text": "hello"})),
            ]]},
        }))
        .await;
    assert_eq!(status, 200, "a tool failure is not an HTTP error: {v}");
    let runs = v["apex_tool_runs"].as_array().unwrap();
    let statuses: Vec<&str> = runs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["failed", "invalid_arguments", "succeeded"]);
    assert!(runs[1]["task_id"].is_null(), "bad JSON makes no task");
    let failed = s
        .hub
        .api()
        .get(runs[0]["task_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(failed.status, "failed");

    let bodies = s.upstream_bodies();
    let tools = tool_messages(&bodies[1]);
    assert_eq!(tools.len(), 3);
    let content = |i: usize| -> Value {
        serde_json::from_str(tools[i]["content"].as_str().unwrap()).unwrap()
    };
    assert_eq!(content(0)["error"]["code"], "invalid_arguments");
    assert_eq!(content(0)["error"]["status"], "failed");
    assert!(content(0)["error"]["message"].as_str().is_some());
    assert_eq!(content(1)["error"]["code"], "invalid_arguments");
    assert_eq!(content(2)["sha256"], HELLO_SHA256);
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("\"error\""), "{answer}");
    assert!(answer.contains(HELLO_SHA256), "{answer}");
}

#[tokio::test]
async fn rounds_stop_at_max_tool_rounds_and_say_so() {
    let s = setup(HubOptions::default(), true).await;
    let (status, v) = s
        .chat(json!({
            "model": "fake-model",
            "messages": user("hash forever"),
            "server_tools": ["sha256"],
            "fake": {"calls": [[sha256_call(json!({"text": "hello"}))]], "calls_repeat": true},
        }))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["apex_tool_rounds_exhausted"], true, "{v}");
    let statuses: Vec<&str> = v["apex_tool_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["succeeded", "succeeded", "succeeded", "skipped"],
        "three rounds ran (max_tool_rounds = 3), the fourth call was not"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(s.upstream_bodies().len(), 4);
}

#[tokio::test]
async fn client_tools_are_returned_to_the_client() {
    let s = setup(HubOptions::default(), true).await;
    let weather = json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    // The fake's default rule calls the first tool offered: the client's own.
    let (status, v) = s
        .chat(json!({
            "model": "fake-model",
            "messages": user("weather?"),
            "tools": weather,
            "server_tools": ["sha256"],
        }))
        .await;
    assert_eq!(status, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "weather");
    assert_eq!(
        msg["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["apex_tool_runs"], json!([]));
    let bodies = s.upstream_bodies();
    let names: Vec<&str> = bodies[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["weather", "sha256"]);

    // An answer calling both: the client gets its own call; the server call is not run.
    let v = s
        .chat_stream(json!({
            "model": "fake-model",
            "messages": user("both"),
            "tools": weather,
            "server_tools": ["sha256"],
            "stream": true,
            "fake": {"calls": [[sha256_call(json!({"text": "x"})),
                               {"name": "weather", "arguments": {"city": "Oslo"}}]]},
        }))
        .await;
    let calls: Vec<&Value> = v
        .iter()
        .filter_map(|f| f["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{v:?}");
    assert_eq!(calls[0]["function"]["name"], "weather");
    assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
    assert_eq!(calls[0]["index"], 0);
    let last = v.last().unwrap();
    assert_eq!(last["apex_tool_runs"][0]["status"], "skipped");
    assert_eq!(last["apex_tool_runs"][0]["tool"], "sha256");
    assert!(last["apex_tool_runs"][0]["task_id"].is_null());
}

#[tokio::test]
async fn unknown_server_tools_are_refused_and_all_offers_the_catalogue() {
    let s = setup(HubOptions::default(), true).await;
    let (status, v) = s
        .chat(json!({"model": "fake-model", "messages": user("x"),
                     "server_tools": ["sha256", "no_such_tool"]}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "server_tools");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`no_such_tool`"),
        "{v}"
    );
    let (status, v) = s
        .chat(json!({"model": "fake-model", "messages": user("x"), "server_tools": "some"}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(s.fake.stats().requests, 0, "refused before any model call");

    let (status, v) = s
        .chat(
            json!({"model": "fake-model", "messages": user("x"), "server_tools": "all",
                     "fake": {"calls": [[{"name": "echo", "arguments": {"a": 1}}]]}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let bodies = s.upstream_bodies();
    let names: Vec<&str> = bodies[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    for t in ["echo", "sha256", "sleep", "noop", "system_info"] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("llm__chat")),
        "{names:?}"
    );
    assert_eq!(v["apex_tool_runs"][0]["tool"], "echo");
    assert_eq!(v["apex_tool_runs"][0]["status"], "succeeded");
}

#[tokio::test]
async fn the_mock_provider_calls_a_tool_the_prompt_names() {
    let s = setup(HubOptions::default(), true).await;
    let (status, v) = s
        .chat(json!({"model": "mock", "messages": user("sha256: hello"),
                     "server_tools": ["sha256"]}))
        .await;
    assert_eq!(status, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains(HELLO_SHA256), "{answer}");
    assert!(answer.starts_with("The tool `sha256` returned"), "{answer}");
    assert_eq!(v["apex_tool_runs"][0]["status"], "succeeded");
}

#[tokio::test]
async fn a_node_lost_mid_call_hands_the_call_to_another_node() {
    let s = setup(HubOptions::fast_liveness(), false).await;
    let mut a = Node::start(&s.hub, NodeOptions::named("a")).await.unwrap();
    let body = json!({
        "model": "fake-model",
        "messages": user("sleep a while"),
        "server_tools": ["sleep"],
        "fake": {"calls": [[{"name": "sleep", "arguments": {"ms": 3000}}]]},
    });
    let req = s.post(&body);
    let chat = tokio::spawn(async move {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    });
    let api = s.hub.api();
    let task = wait_until("the sleep task running on a", DEFAULT_TIMEOUT, || async {
        let page = api.list(&[("tool", "sleep")]).await?;
        Ok(page
            .data
            .into_iter()
            .find(|t| t.status == "running" && t.node_id.as_deref() == Some(a.id())))
    })
    .await
    .unwrap();
    let b = Node::start(&s.hub, NodeOptions::named("b")).await.unwrap();
    a.kill().unwrap();
    let (status, v) = tokio::time::timeout(Duration::from_secs(60), chat)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let runs = v["apex_tool_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{v}");
    assert_eq!(runs[0]["task_id"], task.task_id.as_str());
    assert_eq!(runs[0]["status"], "succeeded");
    let done = api.get(&task.task_id).await.unwrap();
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.node_id.as_deref(), Some(b.id()), "finished on b");
    assert_eq!(done.attempt, 2);
    // The model saw one result.
    let bodies = s.upstream_bodies();
    assert_eq!(bodies.len(), 2);
    let tools = tool_messages(&bodies[1]);
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["content"], r#"{"slept_ms":3000}"#);
}

#[tokio::test]
async fn the_official_openai_python_sdk_gets_the_tool_runs() {
    let s = setup(HubOptions::default(), true).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_server_tools_sdk.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_HUB_URL", format!("{}/v1", s.hub.url()))
        .env("APEX_API_KEY", s.hub.api_key())
        .env("APEX_MODEL", "fake-model")
        .env("APEX_EXPECTED", HELLO_SHA256)
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python SDK test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for case in ["plain ok", "stream ok", "unknown ok"] {
        assert!(stdout.contains(case), "missing `{case}` in:\n{stdout}");
    }
}
