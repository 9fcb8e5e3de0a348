//! End-to-end tests of the hub's HTTP API as a client sees it: keys, the error shape, request
//! ids, task submission (synonyms, idempotency keys, validation), listing, cancel and events.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use apex_tests::Hub;
use apex_tests::api::json_of;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// Asserts the one error shape `{"error": {"message", "type", "code", "param"?}}`.
fn assert_error_shape(body: &Value) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {body}"
    );
    assert!(e["type"].is_string(), "error without type: {body}");
    assert!(
        e["code"].is_string() || e["code"].is_number(),
        "error without code: {body}"
    );
}

#[tokio::test]
async fn api_key_is_required_except_for_health() -> Result<()> {
    let hub = Hub::start_default().await?;
    let http = hub.api().http();

    for (path, method) in [
        ("/api/v1/tasks", Method::GET),
        ("/api/v1/tasks", Method::POST),
        ("/v1/nodes", Method::GET),
    ] {
        let resp = http
            .request(method.clone(), format!("{}{path}", hub.url()))
            .json(&json!({"tool": "echo"}))
            .send()
            .await?;
        assert!(resp.headers().contains_key("x-request-id"));
        let (status, body) = json_of(resp).await?;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a key"
        );
        assert_error_shape(&body);

        let resp = http
            .request(method.clone(), format!("{}{path}", hub.url()))
            .bearer_auth("not-the-key")
            .send()
            .await?;
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} wrong key"
        );

        // The node key is not an API key.
        let resp = http
            .request(method, format!("{}{path}", hub.url()))
            .bearer_auth(hub.node_key())
            .send()
            .await?;
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "node key accepted on {path}"
        );
    }

    let health = hub.api().health().await?;
    assert_eq!(health["status"], "ok");
    assert!(health["version"].is_string());
    assert!(health["nodes"]["online"].is_number(), "{health}");
    assert!(health["tasks"]["total"].is_number(), "{health}");
    Ok(())
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() -> Result<()> {
    let hub = Hub::start_default().await?;
    let resp = hub
        .api()
        .request(Method::GET, "/api/v1/tasks")
        .header("X-Request-ID", "it-req-42")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"it-req-42"[..])
    );
    let resp = hub
        .api()
        .http()
        .get(format!("{}/health", hub.url()))
        .send()
        .await?;
    let made = resp
        .headers()
        .get("x-request-id")
        .context("no X-Request-ID on /health")?;
    assert!(!made.is_empty());
    let resp = hub
        .api()
        .request(Method::GET, "/api/v1/tasks/no-such-task")
        .send()
        .await?;
    assert!(resp.headers().contains_key("x-request-id"));
    let (status, body) = json_of(resp).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body);
    Ok(())
}

#[tokio::test]
async fn submission_validation_synonyms_and_idempotency() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();

    // Nobody offers this tool, so tasks stay queued.
    let (status, created) = api
        .submit_raw(
            &json!({"tool": "nobody_has_it", "args": {"a": 1}, "priority": 7,
            "description": "a test task", "idempotency_key": "it-key-1"}),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["tool"], "nobody_has_it");
    assert_eq!(created["args"], json!({"a": 1}));
    assert_eq!(created["attempt"], 0);
    for field in ["task_id", "created_at", "updated_at"] {
        assert!(
            created[field].is_string(),
            "task without {field}: {created}"
        );
    }

    let (status, again) = api
        .submit_raw(
            &json!({"tool": "nobody_has_it", "args": {"a": 2}, "idempotency_key": "it-key-1"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["task_id"], created["task_id"]);
    assert_eq!(
        again["args"],
        json!({"a": 1}),
        "the existing task must come back"
    );

    let (status, other) = api
        .submit_raw(&json!({"tool": "nobody_has_it", "idempotency_key": "it-key-2"}))
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(other["task_id"], created["task_id"]);

    // The seed API's names.
    let (status, syn) = api
        .submit_raw(&json!({"task_type": "nobody_has_it", "parameters": {"b": true}}))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{syn}");
    assert_eq!(syn["tool"], "nobody_has_it");
    assert_eq!(syn["args"], json!({"b": true}));

    // Bad bodies are client errors in the one error shape.
    for bad in [
        json!({}),
        json!({"tool": ""}),
        json!({"tool": "x", "priority": "high"}),
    ] {
        let (status, body) = api.submit_raw(&bad).await?;
        assert!(status.is_client_error(), "{bad} answered {status}");
        assert_error_shape(&body);
    }
    let resp = api
        .request(Method::POST, "/api/v1/tasks")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    let (status, body) = json_of(resp).await?;
    assert!(status.is_client_error());
    assert_error_shape(&body);

    let (status, body) = api
        .submit_raw(&json!({"tool": "x", "max_attempts": 0}))
        .await?;
    assert!(status.is_client_error(), "max_attempts 0 accepted: {body}");
    Ok(())
}

#[tokio::test]
async fn list_cancel_and_events_of_queued_tasks() -> Result<()> {
    let hub = Hub::start_default().await?;
    let api = hub.api();
    let bodies: Vec<Value> = (0..5)
        .map(|i| json!({"tool": "nobody_has_it", "args": {"i": i}}))
        .collect();
    let tasks = api.submit_batch(&bodies).await?;
    assert!(tasks.iter().all(|t| t.status == "queued"));
    for (t, b) in tasks.iter().zip(&bodies) {
        assert_eq!(t.args, b["args"], "batch answer out of order");
    }

    let page = api
        .list(&[("tool", "nobody_has_it"), ("limit", "2"), ("page", "1")])
        .await?;
    assert_eq!(page.meta.total, 5);
    assert_eq!(page.meta.limit, 2);
    assert_eq!(page.meta.pages, 3);
    assert_eq!(page.data.len(), 2);
    let all = api.list_all(&[("tool", "nobody_has_it")]).await?;
    let listed: Vec<&str> = all.iter().map(|t| t.task_id.as_str()).collect();
    let newest_first: Vec<&str> = tasks.iter().rev().map(|t| t.task_id.as_str()).collect();
    assert_eq!(listed, newest_first, "list must be newest first");
    assert_eq!(api.list(&[("status", "succeeded")]).await?.meta.total, 0);

    // A long-poll on a task that cannot finish answers with its current state.
    let polled = api.get_wait(&tasks[1].task_id, 200).await?;
    assert_eq!(polled.status, "queued");

    let id = &tasks[0].task_id;
    let (status, body) = api.cancel(id).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    let (status, body) = api.cancel(id).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error_shape(&body);
    let (status, body) = api.cancel("no-such-task").await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(api.list(&[("status", "cancelled")]).await?.meta.total, 1);

    let events = api.events_named(id, WAIT).await?;
    let types: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(types, ["task_created", "task_cancelled"]);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["task_id"], id.as_str());
        assert!(data["timestamp"].is_string());
    }
    let (status, _) = json_of(
        api.request(Method::GET, "/api/v1/tasks/no-such-task/events")
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}
