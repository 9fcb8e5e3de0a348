#![allow(clippy::unwrap_used)]
//! `POST /api/v2/query` (the knowledge platform's plan-executor stream) end to end: the real
//! `apex-hub` and an `apex-node` with the `doc_search` example plugin (a search tool), against
//! the scripted fake upstream, read by `tests/python/test_plan_executor.py` the way the
//! platform's sample client reads it (httpx, `data: ` lines); a failing planner ends the stream
//! with the platform's error event; a bad body is a 400.

use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::{Api, Hub, Node, NodeOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn plugins_dir() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .display()
        .to_string()
}

async fn fake() -> FakeLlm {
    FakeLlm::start(FakeOptions {
        models: vec!["fake-model".to_owned(), "status-500-x".to_owned()],
        structured: vec![
            (
                "thinking".to_owned(),
                json!({"thinking": "Find what makes Mamba's scan selective.",
                       "queries": ["Mamba selective"]}),
            ),
            (
                "result".to_owned(),
                json!({"result": "Mamba makes the state space model's parameters depend on the input, a selective scan [1].",
                       "key_findings": ["selective scan"], "uncertainties": [], "suggestions": [],
                       "confidence": 0.9}),
            ),
        ],
        ..FakeOptions::default()
    })
    .await
    .unwrap()
}

async fn hub(fake: &FakeLlm, role_model: &str) -> (Hub, Node) {
    let toml = format!(
        "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\n\
         models = [\"fake-model\", \"status-500-x\"]\n[agents]\nrole_model = \"{role_model}\"\n",
        fake.base_url()
    );
    let hub = Hub::start_with_config(&toml, &[], None).await.unwrap();
    let node = Node::start(
        &hub,
        NodeOptions::named("knowledge").args(["--plugin-dir", &plugins_dir()]),
    )
    .await
    .unwrap();
    (hub, node)
}

async fn python(hub: &Hub, user: &Api, query: &str, expect: &str) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_plan_executor.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_URL", hub.url())
        .env("APEX_TOKEN", user.api_key())
        .env("APEX_QUERY", query)
        .env("APEX_EXPECT", expect)
        .env("APEX_SOURCE", "doc_search:state_space_models.md")
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "plan-executor client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn a_query_streams_the_plan_executor_sequence_with_memory_and_search_tool_references() {
    let fake = fake().await;
    let (hub, _node) = hub(&fake, "").await;
    let ann = Api::register_user(&hub.url(), "ann@example.com")
        .await
        .unwrap();
    let resp = ann
        .request(Method::POST, "/api/v1/memory")
        .json(&json!({"content": "Mamba's selective scan lets the model choose what to keep"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let out = python(&hub, &ann, "How does Mamba's selective scan work?", "ok").await;
    for case in ["envelope ok", "planning ok", "retrieval ok", "summary ok"] {
        assert!(out.contains(case), "{case} missing:\n{out}");
    }
    // The writer was given the references it cites.
    let asked = fake.requests();
    assert!(
        asked.iter().any(|r| {
            let text = r["body"]["messages"].to_string();
            text.contains("state_space_models.md") && text.contains("selective scan lets")
        }),
        "the writer did not get the references"
    );
    // Queries are not research sessions.
    let (status, list) = apex_tests::api::json_of(
        ann.request(Method::GET, "/api/research/sessions")
            .send()
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], 0);
}

#[tokio::test]
async fn a_failing_planner_ends_the_stream_with_the_platforms_error_event() {
    let fake = fake().await;
    let (hub, _node) = hub(&fake, "status-500-x").await;
    let ann = Api::register_user(&hub.url(), "ann@example.com")
        .await
        .unwrap();
    let out = python(&hub, &ann, "Anything", "error").await;
    assert!(out.contains("error ok"), "{out}");
    for body in [json!({}), json!({"query": "  "}), json!({"query": 5})] {
        let resp = ann
            .request(Method::POST, "/api/v2/query")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
}
