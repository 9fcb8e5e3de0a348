//! The one error shape, end to end: a real `apex-hub` answers bad input on every route family
//! (tasks, nodes, admin nodes, config, events, the LLM gateway, the node and log channels, the
//! docs, unknown routes, wrong methods) with
//! `{"error": {message, type, code, param?}, "detail", "category", "success": false}`, the
//! category its status calls for, and an `x-request-id`; axum's own refusals (bad JSON, a wrong
//! content type, a body over `max_body_bytes`, a bad query) included.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use apex_tests::api::json_of;
use apex_tests::{Hub, HubOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A body over the hub's `max_body_bytes` below.
const MAX_BODY: usize = 4096;

/// One request and what its error must say.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    /// Whether to send the API key.
    key: bool,
    body: Option<(&'static str, Vec<u8>)>,
    status: u16,
    category: &'static str,
    code: &'static str,
}

fn case(name: &'static str, method: Method, path: impl Into<String>) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        key: true,
        body: None,
        status: 400,
        category: "validation",
        code: "invalid_request",
    }
}

impl Case {
    fn json(mut self, body: &str) -> Self {
        self.body = Some(("application/json", body.as_bytes().to_vec()));
        self
    }
    fn raw(mut self, content_type: &'static str, body: Vec<u8>) -> Self {
        self.body = Some((content_type, body));
        self
    }
    fn no_key(mut self) -> Self {
        self.key = false;
        self
    }
    fn expect(mut self, status: u16, category: &'static str, code: &'static str) -> Self {
        self.status = status;
        self.category = category;
        self.code = code;
        self
    }
}

/// Asserts the superset shape.
fn assert_shape(name: &str, status: StatusCode, body: &Value) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{name}: no error.message: {status} {body}"
    );
    assert!(e["type"].is_string(), "{name}: no error.type: {body}");
    assert!(e["code"].is_string(), "{name}: no error.code: {body}");
    assert_eq!(body["detail"], e["message"], "{name}: detail: {body}");
    assert_eq!(body["success"], false, "{name}: success: {body}");
    assert!(body["category"].is_string(), "{name}: category: {body}");
}

#[tokio::test]
async fn every_route_family_answers_bad_input_in_the_one_error_shape() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, format!("max_body_bytes = {MAX_BODY}\n"))?;
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--config".to_owned(), config.display().to_string()],
        ..HubOptions::default()
    })
    .await?;
    let big_json = format!(
        "{{\"tool\": \"echo\", \"args\": {{\"x\": \"{}\"}}}}",
        "a".repeat(MAX_BODY * 2)
    );
    let done = hub.api().submit(&json!({"tool": "echo"})).await?;
    let (s, _) = hub.api().cancel(&done.task_id).await?;
    assert_eq!(s, StatusCode::OK);
    let cancel_again = format!("/api/v1/tasks/{}/cancel", done.task_id);

    let cases = vec![
        // Tasks.
        case("bad JSON", Method::POST, "/api/v1/tasks").json("{not json"),
        case("wrong JSON type", Method::POST, "/api/v1/tasks").json("[1, 2]"),
        case("missing field", Method::POST, "/api/v1/tasks").json("{}"),
        case("wrong content type", Method::POST, "/api/v1/tasks")
            .raw("text/plain", b"{\"tool\": \"echo\"}".to_vec())
            .expect(415, "validation", "unsupported_media_type"),
        case("oversize body", Method::POST, "/api/v1/tasks")
            .json(&big_json)
            .expect(413, "validation", "body_too_large"),
        case("oversize batch", Method::POST, "/api/v1/tasks/batch")
            .json(&big_json)
            .expect(413, "validation", "body_too_large"),
        case("bad query", Method::GET, "/api/v1/tasks?page=abc"),
        case("bad sort", Method::GET, "/api/v1/tasks?sort=priority"),
        case("missing key", Method::GET, "/api/v1/tasks")
            .no_key()
            .expect(401, "auth", "invalid_api_key"),
        case("unknown task", Method::GET, "/api/v1/tasks/no-such-task").expect(
            404,
            "not_found",
            "not_found",
        ),
        case(
            "unknown task events",
            Method::GET,
            "/api/v1/tasks/no-such-task/events",
        )
        .expect(404, "not_found", "not_found"),
        case("cancel twice", Method::POST, cancel_again).expect(409, "conflict", "conflict"),
        // Nodes, under both prefixes.
        case("unknown node", Method::GET, "/v1/nodes/ghost").expect(404, "not_found", "not_found"),
        case(
            "unknown admin node",
            Method::DELETE,
            "/api/admin/nodes/ghost",
        )
        .expect(404, "not_found", "not_found"),
        case(
            "bad node status",
            Method::GET,
            "/api/admin/nodes?status=asleep",
        ),
        case("dispatch bad JSON", Method::POST, "/v1/nodes/ghost/tasks").json("{"),
        // Config, events.
        case("config bad JSON", Method::PUT, "/v1/config").json("{"),
        case("config unknown key", Method::PUT, "/api/admin/config").json("{\"no_such\": 1}"),
        case("bad topics", Method::GET, "/v1/events?topics=weather"),
        // The LLM gateway (HTTP errors; in-stream errors keep OpenAI's form).
        case("chat bad JSON", Method::POST, "/v1/chat/completions").json("{nope"),
        case("chat oversize", Method::POST, "/v1/chat/completions")
            .json(&big_json)
            .expect(413, "validation", "body_too_large"),
        case("chat no model", Method::POST, "/v1/chat/completions").json("{\"messages\": []}"),
        case("unknown model", Method::GET, "/v1/models/no/such-model").expect(
            404,
            "not_found",
            "model_not_found",
        ),
        case("interrupt nothing", Method::POST, "/v1/interrupt").json("{}"),
        case("interrupt unknown", Method::POST, "/v1/interrupt")
            .json("{\"requestId\": \"nobody\"}")
            .expect(404, "not_found", "not_found"),
        case("llm missing key", Method::GET, "/v1/models")
            .no_key()
            .expect(401, "auth", "invalid_api_key"),
        // The channels' 401s before the upgrade, and their 404 for a segment that is no key.
        case("node channel no key", Method::GET, "/distributed-server")
            .no_key()
            .expect(401, "auth", "invalid_node_key"),
        case(
            "node channel wrong key",
            Method::GET,
            "/vcp-distributed-server/VCP_Key=wrong",
        )
        .no_key()
        .expect(401, "auth", "invalid_node_key"),
        case(
            "node channel no key segment",
            Method::GET,
            "/distributed-server/garbage",
        )
        .no_key()
        .expect(404, "not_found", "unknown_route"),
        case("log channel no key", Method::GET, "/log")
            .no_key()
            .expect(401, "auth", "invalid_key"),
        // Routing.
        case("unknown route", Method::GET, "/no/such/route")
            .no_key()
            .expect(404, "not_found", "unknown_route"),
        case("unknown api route", Method::GET, "/api/v1/nothing").expect(
            404,
            "not_found",
            "unknown_route",
        ),
        case("wrong method", Method::DELETE, "/api/v1/tasks").expect(
            405,
            "validation",
            "method_not_allowed",
        ),
        case("wrong method, public route", Method::POST, "/health")
            .no_key()
            .expect(405, "validation", "method_not_allowed"),
        case("wrong method, docs", Method::POST, "/openapi.json")
            .no_key()
            .expect(405, "validation", "method_not_allowed"),
        case("unknown docs file", Method::GET, "/docs/nope.js")
            .no_key()
            .expect(404, "not_found", "unknown_route"),
        case(
            "unknown dashboard asset",
            Method::GET,
            "/dashboard/assets/x/nope.js",
        )
        .no_key()
        .expect(404, "not_found", "unknown_route"),
    ];
    let http = hub.api().http();
    for c in cases {
        let mut req = http.request(c.method.clone(), format!("{}{}", hub.url(), c.path));
        if c.key {
            req = req.bearer_auth(hub.api_key());
        }
        if let Some((ct, body)) = c.body {
            req = req.header("content-type", ct).body(body);
        }
        let resp = req.send().await?;
        let request_id = resp.headers().get("x-request-id").cloned();
        let (status, body) = json_of(resp).await?;
        let name = c.name;
        let shown: String = body.to_string().chars().take(400).collect();
        assert_eq!(status.as_u16(), c.status, "{name}: {shown}");
        assert_shape(name, status, &body);
        assert_eq!(body["category"], c.category, "{name}: {body}");
        assert_eq!(body["error"]["code"], c.code, "{name}: {body}");
        assert!(request_id.is_some(), "{name}: no x-request-id");
        if c.status == 400 && c.code == "invalid_request" {
            assert!(
                body["error"]["param"].is_string(),
                "{name}: a 400 names its param: {body}"
            );
        }
    }

    // Specific params and the fields /v1/interrupt's VCP clients read.
    let (_, v) = json_of(
        hub.api()
            .request(Method::GET, "/api/v1/tasks?sort=name")
            .send()
            .await?,
    )
    .await?;
    assert_eq!(v["error"]["param"], "sort", "{v}");
    let (_, v) = json_of(
        hub.api()
            .request(Method::POST, "/v1/interrupt")
            .json(&json!({"requestId": "nobody"}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(
        (v["requestId"].as_str(), v["reason"].as_str()),
        (Some("nobody"), Some("not_found"))
    );
    // Success bodies are untouched.
    let (s, v) = json_of(hub.api().request(Method::GET, "/health").send().await?).await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    assert!(v.get("success").is_none(), "{v}");
    Ok(())
}
