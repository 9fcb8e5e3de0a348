#![allow(clippy::unwrap_used)]
//! The `mock` provider's structured outputs and forced tool calls end to end: the real
//! `apex-hub` over HTTP, and with the official `openai` Python package
//! (`tests/python/test_structured_outputs_sdk.py`: `chat.completions.parse` with a pydantic
//! model, a forced tool call).

use apex_tests::{Hub, HubOptions};
use serde_json::{Value, json};

/// A hub with the provider `mock` (model `mock`).
async fn setup() -> Hub {
    let toml = r#"
[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]
"#;
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    Hub::start(HubOptions {
        extra_args: vec!["--config".into(), path.display().to_string()],
        ..HubOptions::default()
    })
    .await
    .unwrap()
}

async fn chat(hub: &Hub, body: Value) -> Value {
    let resp = hub
        .api()
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_json_schema_answer_is_the_instance_of_the_schema() {
    let hub = setup().await;
    let schema = json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "topic": {"type": "string"},
            "questions": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "when": {"type": "string", "format": "date-time"}
        },
        "required": ["topic", "questions", "when"]
    });
    let v = chat(
        &hub,
        json!({"model": "mock", "messages": [{"role": "user", "content": "research plan"}],
               "response_format": {"type": "json_schema",
                   "json_schema": {"name": "plan", "schema": schema, "strict": true}}}),
    )
    .await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{v}");
    let content: Value =
        serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, apex_hub::llm::mock_schema::instance(&schema));
    assert_eq!(
        content["questions"][1],
        "item 1: This is a mock answer from apex."
    );
}

#[tokio::test]
async fn a_forced_tool_choice_is_a_call_with_schema_arguments() {
    let hub = setup().await;
    let parameters = json!({"type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
        "required": ["query", "limit"]});
    let v = chat(
        &hub,
        json!({"model": "mock", "messages": [{"role": "user", "content": "go"}],
               "tools": [{"type": "function", "function": {"name": "search", "parameters": parameters}}],
               "tool_choice": {"type": "function", "function": {"name": "search"}}}),
    )
    .await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let f = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(f["name"], "search");
    let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"query": "query: This is a mock answer from apex.", "limit": 1})
    );
}

#[tokio::test]
async fn the_official_openai_python_sdk_parses_structured_outputs() {
    let hub = setup().await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python/test_structured_outputs_sdk.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_HUB_URL", format!("{}/v1", hub.url()))
        .env("APEX_API_KEY", hub.api_key())
        .env("APEX_MODEL", "mock")
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python SDK test failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for case in ["parse ok", "stream ok", "json_object ok", "forced_tool ok"] {
        assert!(stdout.contains(case), "missing `{case}` in:\n{stdout}");
    }
    let plan: Value = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][2]["description"],
        "description 2: This is a mock answer from apex."
    );
}
