#![allow(clippy::unwrap_used)]
//! Handler tests: the hub's router driven with `oneshot` requests, no sockets.

use std::time::Duration;

use apex_hub::config::Config;
use apex_hub::engine::{Cluster, ConnHandle, Outbound};
use apex_hub::http::{AppState, router};
use apex_protocol::{NodeRegister, ToolSpec};
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

const API_KEY: &str = "test-api-key-1";
const NODE_KEY: &str = "test-node-key-1";

struct Hub {
    app: Router,
    cluster: Cluster,
    // Dropping the sender would end SSE streams at once.
    _shutdown: watch::Sender<bool>,
}

fn hub_with(f: impl FnOnce(&mut Config)) -> Hub {
    let mut config = Config {
        api_keys: vec![API_KEY.to_owned()],
        node_keys: vec![NODE_KEY.to_owned()],
        ..Config::default()
    };
    f(&mut config);
    config.validate().unwrap();
    let cluster = apex_hub::cluster_for(&config);
    let (tx, rx) = watch::channel(false);
    let state = AppState::new(cluster.clone(), config, rx);
    Hub {
        app: router(state),
        cluster,
        _shutdown: tx,
    }
}

fn hub() -> Hub {
    hub_with(|_| {})
}

fn request(method: Method, uri: &str, body: Option<Value>) -> Request<Body> {
    let b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"));
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn body_bytes(resp: Response) -> Vec<u8> {
    axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec()
}

impl Hub {
    async fn send(&self, req: Request<Body>) -> Response {
        self.app.clone().oneshot(req).await.unwrap()
    }

    /// Sends a request and returns the status and the JSON body.
    async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.send(req).await;
        let status = resp.status();
        let bytes = body_bytes(resp).await;
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(request(Method::GET, uri, None)).await
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(request(Method::POST, uri, Some(body))).await
    }

    async fn create(&self, body: Value) -> Value {
        let (s, v) = self.post("/api/v1/tasks", body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }
}

/// Asserts the OpenAI error shape and returns the `error` object.
fn error_of(v: &Value) -> &serde_json::Map<String, Value> {
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {v}"));
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].as_str().is_some(), "{v}");
    assert!(e["code"].as_str().is_some(), "{v}");
    e
}

fn assert_rfc3339(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    // 2024-01-02T03:04:05.678Z
    assert_eq!(s.len(), 24, "{s}");
    assert_eq!(&s[10..11], "T", "{s}");
    assert!(s.ends_with('Z'), "{s}");
}

/// A fake node registered on the hub's engine, to see tasks dispatched.
fn register_node(c: &Cluster, id: &str, tools: &[&str]) -> (ConnHandle, mpsc::Receiver<Outbound>) {
    let (conn, rx) = c.open_connection("127.0.0.1:9".into());
    c.register_native(
        &conn,
        NodeRegister {
            node_id: Some(id.to_owned()),
            name: format!("node {id}"),
            version: Some("9.9.9".into()),
            tools: tools
                .iter()
                .map(|t| ToolSpec::Name((*t).to_owned()))
                .collect(),
            max_concurrent_tasks: Some(4),
            ..NodeRegister::default()
        },
    );
    (conn, rx)
}

#[tokio::test]
async fn requests_without_a_valid_api_key_get_401_in_the_openai_shape() {
    let h = hub();
    for auth in [
        None,
        Some("Bearer wrong-key-123"),
        Some(API_KEY),
        Some("Basic x"),
    ] {
        for (method, uri) in [
            (Method::GET, "/api/v1/tasks"),
            (Method::POST, "/api/v1/tasks"),
            (Method::GET, "/v1/nodes"),
        ] {
            let mut b = Request::builder().method(method).uri(uri);
            if let Some(a) = auth {
                b = b.header(header::AUTHORIZATION, a);
            }
            let resp = h.send(b.body(Body::empty()).unwrap()).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?} {uri}");
            assert!(resp.headers().contains_key("x-request-id"));
            let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
            let e = error_of(&v);
            assert_eq!(e["type"], "authentication_error");
            assert_eq!(e["code"], "invalid_api_key");
        }
    }
    // The node key is not an API key.
    let resp = h
        .send(
            Request::get("/api/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {NODE_KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn health_is_public_and_counts_nodes_and_tasks() {
    let h = hub();
    let resp = h
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(v["status"], "ok");
    assert!(v["version"].as_str().is_some());
    assert!(v["uptime_seconds"].as_f64().is_some());
    assert_eq!(v["nodes"], json!({"online": 0, "total": 0}));
    for s in [
        "queued",
        "assigned",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
        "total",
    ] {
        assert_eq!(v["tasks"][s], 0, "{s}: {v}");
    }

    let (_conn, _rx) = register_node(&h.cluster, "n1", &["echo"]);
    h.create(json!({"tool": "echo"})).await;
    let t = h.create(json!({"tool": "nobody-has-this"})).await;
    h.post(
        &format!("/api/v1/tasks/{}/cancel", t["task_id"].as_str().unwrap()),
        json!({}),
    )
    .await;
    let resp = h
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(v["nodes"], json!({"online": 1, "total": 1}));
    assert_eq!(v["tasks"]["assigned"], 1);
    assert_eq!(v["tasks"]["cancelled"], 1);
    assert_eq!(v["tasks"]["total"], 2);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let h = hub();
    let resp = h
        .send(
            Request::get("/health")
                .header("x-request-id", "my-trace-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.headers()["x-request-id"], "my-trace-123");

    let a = h
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    let b = h
        .send(request(Method::GET, "/api/v1/tasks/nope", None))
        .await;
    let ida = a.headers()["x-request-id"].to_str().unwrap().to_owned();
    let idb = b.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!ida.is_empty());
    assert_ne!(ida, idb, "each request gets its own id");
    let echoed = h
        .send(
            Request::get("/api/v1/tasks/nope")
                .header("x-request-id", "err-req-1")
                .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(echoed.status(), StatusCode::NOT_FOUND);
    assert_eq!(echoed.headers()["x-request-id"], "err-req-1");
}

#[tokio::test]
async fn create_task_answers_201_with_the_task_object() {
    let h = hub();
    let v = h
        .create(json!({
            "tool": "echo",
            "args": {"text": "hi"},
            "description": "say hi",
            "idempotency_key": "create-1",
        }))
        .await;
    assert!(uuid_like(&v["task_id"]), "{v}");
    assert_eq!(v["status"], "queued");
    assert_eq!(v["tool"], "echo");
    assert_eq!(v["args"], json!({"text": "hi"}));
    assert_eq!(v["description"], "say hi");
    assert_eq!(v["priority"], 5);
    assert_eq!(v["progress"], 0.0);
    assert_eq!(v["result"], Value::Null);
    assert_eq!(v["error"], Value::Null);
    assert_eq!(v["attempt"], 0);
    assert_eq!(v["max_attempts"], 3);
    assert_eq!(v["node_id"], Value::Null);
    assert_eq!(v["idempotency_key"], "create-1");
    assert_eq!(v["timeout_seconds"], 300.0);
    assert_rfc3339(&v["created_at"]);
    assert_rfc3339(&v["updated_at"]);
    assert_eq!(v["finished_at"], Value::Null);
    assert!(v.get("message").is_some());

    let custom = h
        .create(json!({"tool": "echo", "priority": 9, "timeout_seconds": 2.5, "max_attempts": 1}))
        .await;
    assert_eq!(custom["priority"], 9);
    assert_eq!(custom["timeout_seconds"], 2.5);
    assert_eq!(custom["max_attempts"], 1);
    assert_eq!(custom["args"], json!({}), "args default to an empty object");

    let (s, got) = h
        .get(&format!("/api/v1/tasks/{}", v["task_id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["task_id"], v["task_id"]);
    assert_eq!(got["args"], json!({"text": "hi"}));
}

fn uuid_like(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4)
}

#[tokio::test]
async fn a_task_is_dispatched_to_a_registered_node() {
    let h = hub();
    let (_conn, mut rx) = register_node(&h.cluster, "n1", &["echo"]);
    let v = h.create(json!({"tool": "echo", "args": {"x": 1}})).await;
    assert_eq!(v["status"], "assigned");
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["node_id"], "n1");
    let mut assigned = None;
    while let Ok(o) = rx.try_recv() {
        if let Outbound::Msg(apex_protocol::HubMessage::TaskAssign(a)) = o {
            assigned = Some(a);
        }
    }
    let a = assigned.unwrap();
    assert_eq!(Some(a.task_id.as_str()), v["task_id"].as_str());
    assert_eq!(a.tool_args, json!({"x": 1}));

    let (s, list) = h.get("/api/v1/tasks?node_id=n1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["meta"]["total"], 1);
}

#[tokio::test]
async fn task_type_and_parameters_are_synonyms_of_tool_and_args() {
    let h = hub();
    let v = h
        .create(json!({"task_type": "sha256", "parameters": {"text": "abc"}}))
        .await;
    assert_eq!(v["tool"], "sha256");
    assert_eq!(v["args"], json!({"text": "abc"}));
}

#[tokio::test]
async fn invalid_submissions_get_400_naming_the_parameter() {
    let h = hub();
    let cases = [
        (json!({}), "tool"),
        (json!({"args": {"a": 1}}), "tool"),
        (json!({"tool": ""}), "tool"),
        (json!({"tool": "x".repeat(300)}), "tool"),
        (json!({"tool": "echo", "args": [1, 2]}), "args"),
        (json!({"tool": "echo", "args": "text"}), "args"),
        (
            json!({"tool": "echo", "timeout_seconds": 0}),
            "timeout_seconds",
        ),
        (
            json!({"tool": "echo", "timeout_seconds": -1}),
            "timeout_seconds",
        ),
        (
            json!({"tool": "echo", "timeout_seconds": 1.0e9}),
            "timeout_seconds",
        ),
        (json!({"tool": "echo", "max_attempts": 0}), "max_attempts"),
        (
            json!({"tool": "echo", "max_attempts": 1000}),
            "max_attempts",
        ),
        (
            json!({"tool": "echo", "idempotency_key": ""}),
            "idempotency_key",
        ),
        (
            json!({"tool": "echo", "node_id": "no-such-node"}),
            "node_id",
        ),
    ];
    for (body, param) in cases {
        let (s, v) = h.post("/api/v1/tasks", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        let e = error_of(&v);
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert_eq!(e["param"], param, "{body} -> {v}");
    }
    let (_, list) = h.get("/api/v1/tasks").await;
    assert_eq!(list["meta"]["total"], 0, "nothing was stored");
}

#[tokio::test]
async fn internal_request_file_is_forbidden() {
    let h = hub();
    let (s, v) = h
        .post("/api/v1/tasks", json!({"tool": "internal_request_file"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(error_of(&v)["type"], "permission_error");
}

#[tokio::test]
async fn malformed_or_untyped_bodies_get_json_errors() {
    let h = hub();
    let resp = h
        .send(
            Request::post("/api/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"tool\": \"echo\", "))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(error_of(&v)["param"], "body");

    let resp = h
        .send(
            Request::post("/api/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"tool\": 5}"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "wrong field type");
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    error_of(&v);

    let resp = h
        .send(
            Request::post("/api/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
                .body(Body::from("{\"tool\": \"echo\"}"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    error_of(&v);
}

#[tokio::test]
async fn an_oversized_body_gets_413_json() {
    let h = hub_with(|c| c.max_body_bytes = 2048);
    let (s, v) = h
        .post(
            "/api/v1/tasks",
            json!({"tool": "echo", "args": {"blob": "x".repeat(10_000)}}),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    error_of(&v);
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_existing_task_with_200() {
    let h = hub();
    let first = h
        .create(json!({"tool": "echo", "idempotency_key": "k-1", "args": {"n": 1}}))
        .await;
    let (s, again) = h
        .post(
            "/api/v1/tasks",
            json!({"tool": "echo", "idempotency_key": "k-1", "args": {"n": 2}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["task_id"], first["task_id"]);
    assert_eq!(again["args"], json!({"n": 1}));
    let (_, list) = h.get("/api/v1/tasks").await;
    assert_eq!(list["meta"]["total"], 1);
}

#[tokio::test]
async fn batch_creates_all_in_order_or_none() {
    let h = hub_with(|c| c.max_batch_tasks = 5);
    let (s, v) = h
        .post(
            "/api/v1/tasks/batch",
            json!({"tasks": [
                {"tool": "a"},
                {"task_type": "b", "parameters": {"k": 1}},
                {"tool": "c", "priority": 1},
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let data = v["data"].as_array().unwrap();
    let tools: Vec<&str> = data.iter().map(|t| t["tool"].as_str().unwrap()).collect();
    assert_eq!(tools, ["a", "b", "c"]);
    assert_eq!(data[1]["args"], json!({"k": 1}));
    assert!(data.iter().all(|t| uuid_like(&t["task_id"])));

    let (s, v) = h
        .post(
            "/api/v1/tasks/batch",
            json!({"tasks": [{"tool": "d"}, {"args": {}}, {"tool": "e"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&v)["param"], "tasks[1].tool");
    let (s, v) = h
        .post(
            "/api/v1/tasks/batch",
            json!({"tasks": [{"tool": "d"}, {"tool": "e", "node_id": "ghost"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let six: Vec<Value> = (0..6).map(|i| json!({"tool": format!("t{i}")})).collect();
    let (s, v) = h.post("/api/v1/tasks/batch", json!({ "tasks": six })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&v)["param"], "tasks");
    let (s, v) = h.post("/api/v1/tasks/batch", json!({"tasks": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&v)["param"], "tasks");

    let (_, list) = h.get("/api/v1/tasks").await;
    assert_eq!(list["meta"]["total"], 3, "refused batches store nothing");
}

#[tokio::test]
async fn get_of_an_unknown_task_is_404() {
    let h = hub();
    let (s, v) = h.get("/api/v1/tasks/does-not-exist").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let e = error_of(&v);
    assert_eq!(e["code"], "not_found");
    assert_eq!(e["type"], "not_found_error");
    let (s, _) = h.get("/api/v1/tasks/does-not-exist?wait_ms=10").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn get_with_wait_ms_answers_with_the_current_state() {
    let h = hub();
    let t = h.create(json!({"tool": "echo"})).await;
    let id = t["task_id"].as_str().unwrap();
    // Nothing runs it: the wait ends with the task still queued.
    let (s, v) = h.get(&format!("/api/v1/tasks/{id}?wait_ms=20")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "queued");
    // A waiter wakes up when the task ends.
    let waiting = {
        let app = h.app.clone();
        let uri = format!("/api/v1/tasks/{id}?wait_ms=60000");
        tokio::spawn(async move {
            let resp = app.oneshot(request(Method::GET, &uri, None)).await.unwrap();
            serde_json::from_slice::<Value>(&body_bytes(resp).await).unwrap()
        })
    };
    // Whether the waiter is already waiting or not, it answers with the cancelled task.
    h.post(&format!("/api/v1/tasks/{id}/cancel"), json!({}))
        .await;
    let v = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v["status"], "cancelled");
}

#[tokio::test]
async fn list_is_paginated_newest_first_and_filtered() {
    let h = hub();
    let mut ids = Vec::new();
    for i in 0..5 {
        let tool = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(h.create(json!({"tool": tool})).await["task_id"].clone());
    }
    let (s, v) = h.get("/api/v1/tasks?page=1&limit=2").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["meta"],
        json!({"total": 5, "page": 1, "limit": 2, "pages": 3})
    );
    let page1: Vec<&Value> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["task_id"])
        .collect();
    assert_eq!(page1, [&ids[4], &ids[3]]);
    let (_, v) = h.get("/api/v1/tasks?page=3&limit=2").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["task_id"], ids[0]);
    let (_, v) = h.get("/api/v1/tasks?page=9&limit=2").await;
    assert_eq!(v["data"], json!([]));
    assert_eq!(v["meta"]["total"], 5);
    let (_, v) = h.get("/api/v1/tasks").await;
    assert_eq!(v["meta"]["limit"], 50);
    assert_eq!(v["meta"]["page"], 1);
    assert_eq!(v["meta"]["pages"], 1);

    let (_, v) = h.get("/api/v1/tasks?tool=odd").await;
    assert_eq!(v["meta"]["total"], 2);

    let cancel = ids[2].as_str().unwrap();
    let (s, _) = h
        .post(&format!("/api/v1/tasks/{cancel}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = h.get("/api/v1/tasks?status=cancelled").await;
    assert_eq!(v["meta"]["total"], 1);
    assert_eq!(v["data"][0]["task_id"], ids[2]);
    let (_, v) = h.get("/api/v1/tasks?status=queued").await;
    assert_eq!(v["meta"]["total"], 4);
    let (_, v) = h.get("/api/v1/tasks?status=queued&tool=even").await;
    assert_eq!(v["meta"]["total"], 2);

    for (q, param) in [
        ("status=bogus", "status"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("page=0", "page"),
    ] {
        let (s, v) = h.get(&format!("/api/v1/tasks?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(error_of(&v)["param"], param, "{q}: {v}");
    }
    let (s, v) = h.get("/api/v1/tasks?page=abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    error_of(&v);
}

#[tokio::test]
async fn cancel_answers_200_then_409_and_404_for_unknown() {
    let h = hub();
    let t = h.create(json!({"tool": "echo"})).await;
    let id = t["task_id"].as_str().unwrap();
    let (s, v) = h
        .post(&format!("/api/v1/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["error"]["code"], "task_cancelled");
    assert_rfc3339(&v["finished_at"]);
    let (s, v) = h
        .post(&format!("/api/v1/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_of(&v)["code"], "conflict");
    // Without a body at all.
    let (s, v) = h
        .call(request(Method::POST, "/api/v1/tasks/nope/cancel", None))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&v);
}

/// Parses an SSE body into (event name, data JSON) pairs.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_owned());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if let Some(n) = name {
            out.push((n, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

async fn events_body(h: &Hub, id: &str) -> String {
    let resp = h
        .send(request(
            Method::GET,
            &format!("/api/v1/tasks/{id}/events"),
            None,
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let bytes = tokio::time::timeout(Duration::from_secs(30), body_bytes(resp))
        .await
        .expect("the event stream must end after the terminal event");
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn events_of_a_cancelled_task_replay_and_end_with_task_cancelled() {
    let h = hub();
    let t = h.create(json!({"tool": "echo"})).await;
    let id = t["task_id"].as_str().unwrap();
    h.post(&format!("/api/v1/tasks/{id}/cancel"), json!({}))
        .await;
    let body = events_body(&h, id).await;
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["task_created", "task_cancelled"], "{body}");
    for (name, data) in &events {
        assert_eq!(data["type"], *name);
        assert_eq!(data["task_id"], id);
        assert!(data.get("attempt").is_some());
        assert!(data.get("status").is_some());
        assert_rfc3339(&data["timestamp"]);
    }
    assert_eq!(events[1].1["status"], "cancelled");

    // A reconnecting EventSource resumes after the last id it saw...
    let mut req = request(Method::GET, &format!("/api/v1/tasks/{id}/events"), None);
    req.headers_mut()
        .insert("last-event-id", header::HeaderValue::from_static("1"));
    let resp = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = String::from_utf8(body_bytes(resp).await).unwrap();
    let names: Vec<String> = sse_events(&body).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["task_cancelled"], "{body}");
    // ...and is told with 204 that nothing more will come.
    let mut req = request(Method::GET, &format!("/api/v1/tasks/{id}/events"), None);
    req.headers_mut()
        .insert("last-event-id", header::HeaderValue::from_static("2"));
    assert_eq!(h.send(req).await.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn events_stream_live_until_the_task_ends() {
    let h = hub();
    let (_conn, _rx) = register_node(&h.cluster, "n1", &["echo"]);
    let t = h.create(json!({"tool": "echo"})).await;
    let id = t["task_id"].as_str().unwrap().to_owned();
    let reader = {
        let app = h.app.clone();
        let uri = format!("/api/v1/tasks/{id}/events");
        tokio::spawn(async move {
            let resp = app.oneshot(request(Method::GET, &uri, None)).await.unwrap();
            tokio::time::timeout(Duration::from_secs(30), body_bytes(resp))
                .await
                .expect("the event stream must end after the terminal event")
        })
    };
    h.cluster.task_progress(
        "n1",
        apex_protocol::TaskProgress {
            task_id: id.clone(),
            attempt: Some(1),
            progress: 50.0,
            ..Default::default()
        },
    );
    let ack = h.cluster.task_result(
        "n1",
        apex_protocol::TaskResult {
            task_id: id.clone(),
            attempt: Some(1),
            success: true,
            result: Some(json!("done")),
            ..Default::default()
        },
    );
    assert!(ack.success);
    let body = String::from_utf8(reader.await.unwrap()).unwrap();
    let names: Vec<String> = sse_events(&body).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "task_created",
            "task_assigned",
            "task_progress",
            "task_completed"
        ],
        "{body}"
    );
    let (s, _) = h
        .call(request(Method::GET, "/api/v1/tasks/nope/events", None))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_json_errors() {
    let h = hub();
    let (s, v) = h.get("/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&v)["code"], "unknown_route");
    let (s, v) = h.call(request(Method::DELETE, "/api/v1/tasks", None)).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    assert_eq!(error_of(&v)["code"], "method_not_allowed");
    let (s, v) = h
        .call(Request::put("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    error_of(&v);
}

#[tokio::test]
async fn nodes_list_and_get() {
    let h = hub();
    let (s, v) = h.get("/v1/nodes").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"], json!([]));
    assert_eq!(v["meta"]["total"], 0);
    let (s, v) = h.get("/v1/nodes/ghost").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&v)["code"], "not_found");

    let (_c1, _r1) = register_node(&h.cluster, "n1", &["echo", "sha256"]);
    let (c2, _r2) = register_node(&h.cluster, "n2", &["sleep"]);
    h.cluster.lose_node("n2", c2.id, "gone");
    let (_, v) = h.get("/v1/nodes").await;
    assert_eq!(v["meta"]["total"], 2);
    assert_eq!(v["data"][0]["id"], "n1");
    assert_eq!(v["data"][1]["status"], "offline");
    let (_, v) = h.get("/v1/nodes?status=online").await;
    assert_eq!(v["meta"]["total"], 1);
    let (_, v) = h.get("/v1/nodes?tool=sleep").await;
    assert_eq!(v["data"][0]["id"], "n2");

    h.cluster.heartbeat(
        Some("n1"),
        apex_protocol::Heartbeat {
            node_id: "n1".to_owned(),
            status: None,
            stats: Some(apex_protocol::NodeStats {
                active_tasks: 2,
                cpu_usage: Some(12.5),
                ..Default::default()
            }),
        },
    );
    let (s, n) = h.get("/v1/nodes/n1").await;
    assert_eq!(s, StatusCode::OK);
    // HTTP bodies are snake_case even where the node sent camelCase counters.
    assert_eq!(n["stats"]["active_tasks"], 2, "{n}");
    assert_eq!(n["stats"]["cpu_usage"], 12.5, "{n}");
    assert!(n["stats"].get("activeTasks").is_none(), "{n}");
    assert_eq!(n["id"], "n1");
    assert_eq!(n["name"], "node n1");
    assert_eq!(n["type"], "worker");
    assert_eq!(n["dialect"], "native");
    assert_eq!(n["status"], "online");
    assert_eq!(n["tools"], json!(["echo", "sha256"]));
    assert_eq!(n["max_concurrent_tasks"], 4);
    assert_eq!(n["active_tasks"], 0);
    assert_eq!(n["load"], 0.0);
    assert_eq!(n["version"], "9.9.9");
    assert!(n.get("stats").is_some());
    assert_rfc3339(&n["last_heartbeat_at"]);
    assert_rfc3339(&n["last_seen_at"]);
    assert_rfc3339(&n["connected_at"]);
}

#[tokio::test]
async fn lists_sort_newest_or_oldest_first_and_refuse_other_sorts() {
    let h = hub();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(h.create(json!({"tool": "echo"})).await["task_id"].clone());
    }
    let ids_of = |v: &Value| -> Vec<Value> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].clone())
            .collect()
    };
    let newest: Vec<Value> = ids.iter().rev().cloned().collect();
    let (_, v) = h.get("/api/v1/tasks").await;
    assert_eq!(ids_of(&v), newest, "newest first by default");
    let (_, v) = h.get("/api/v1/tasks?sort=-created_at").await;
    assert_eq!(ids_of(&v), newest);
    let (s, v) = h.get("/api/v1/tasks?sort=created_at&limit=3&page=1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids_of(&v), ids[..3].to_vec(), "oldest first");
    assert_eq!(
        v["meta"],
        json!({"total": 4, "page": 1, "limit": 3, "pages": 2})
    );
    let (_, v) = h.get("/api/v1/tasks?sort=created_at&limit=3&page=2").await;
    assert_eq!(ids_of(&v), ids[3..].to_vec());
    for uri in [
        "/api/v1/tasks?sort=priority",
        "/api/v1/tasks?sort=--created_at",
        "/v1/nodes?sort=created_at",
        "/api/admin/nodes?sort=cpu",
    ] {
        let (s, v) = h.get(uri).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(error_of(&v)["param"], "sort", "{uri}: {v}");
        assert_eq!(v["category"], "validation", "{uri}: {v}");
    }

    // Nodes: by id unless asked otherwise; ties by id.
    let (_c1, _r1) = register_node(&h.cluster, "n-b", &["echo"]);
    let (_c2, _r2) = register_node(&h.cluster, "n-a", &["echo"]);
    let (_c3, _r3) = register_node(&h.cluster, "n-c", &["echo"]);
    let node_ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for base in ["/v1/nodes", "/api/admin/nodes"] {
        let (_, v) = h.get(base).await;
        assert_eq!(node_ids(&v), ["n-a", "n-b", "n-c"], "{base}");
        let (_, v) = h.get(&format!("{base}?sort=-id")).await;
        assert_eq!(node_ids(&v), ["n-c", "n-b", "n-a"], "{base}");
        // Registered in the order b, a, c.
        let (_, v) = h.get(&format!("{base}?sort=connected_at")).await;
        assert_eq!(node_ids(&v), ["n-b", "n-a", "n-c"], "{base}: {v}");
        let (_, v) = h.get(&format!("{base}?sort=-connected_at&limit=1")).await;
        assert_eq!(node_ids(&v), ["n-c"], "{base}");
        assert_eq!(v["meta"]["pages"], 3, "{base}");
    }
    // A node's task list sorts like the task list.
    let (s, v) = h.get("/v1/nodes/n-a/tasks?sort=created_at").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = h.get("/v1/nodes/n-a/tasks?sort=name").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_of(&v)["param"], "sort");
}

/// `/livez` and `/readyz` need no key; `/readyz` turns 503 once the hub drains (SIGTERM)
/// while submissions are still accepted, and once the stop signal flips (`shutdown_delay_ms`
/// later) submissions answer 503 `shutting_down` and `/livez` still answers 200.
#[tokio::test]
async fn probes_are_public_and_follow_the_shutdown_order() {
    let config = Config {
        api_keys: vec![API_KEY.to_owned()],
        node_keys: vec![NODE_KEY.to_owned()],
        ..Config::default()
    };
    config.validate().unwrap();
    let cluster = apex_hub::cluster_for(&config);
    let (tx, rx) = watch::channel(false);
    let state = AppState::new(cluster.clone(), config, rx);
    let h = Hub {
        app: router(state.clone()),
        cluster,
        _shutdown: tx.clone(),
    };
    let probe = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (code, v) = h.call(probe("/livez")).await;
    assert_eq!((code, v), (StatusCode::OK, json!({"status": "ok"})));
    let (code, v) = h.call(probe("/readyz")).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"status": "ready", "store": "ok", "draining": false})
    );

    state.ops.lifecycle.begin_draining();
    let (code, v) = h.call(probe("/readyz")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(
        (&v["status"], &v["store"], &v["draining"]),
        (&json!("not_ready"), &json!("ok"), &json!(true)),
        "{v}"
    );
    assert_eq!(
        v["error"]["code"], "not_ready",
        "the one error shape too: {v}"
    );
    assert_eq!(v["category"], "unavailable", "{v}");
    assert_eq!(h.call(probe("/livez")).await.0, StatusCode::OK);
    // Still serving during the delay: load balancers have not taken the hub out yet.
    let (code, v) = h
        .call(request(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"tool": "echo"})),
        ))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");

    tx.send(true).unwrap();
    for (path, body) in [
        ("/api/v1/tasks", json!({"tool": "echo"})),
        ("/api/v1/tasks/batch", json!({"tasks": [{"tool": "echo"}]})),
    ] {
        let (code, v) = h.call(request(Method::POST, path, Some(body))).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{path}: {v}");
        assert_eq!(v["error"]["code"], "shutting_down", "{path}: {v}");
    }
    assert_eq!(h.call(probe("/livez")).await.0, StatusCode::OK);
}
