//! `/health` tells a load balancer whether the hub can take tasks: a hub on a real
//! `redis-server` answers 200 `store: ok`, 503 `status: degraded, store: unavailable` while
//! Redis is down (when submissions answer 503 `store_unavailable`), and 200 again once Redis
//! is back, by itself. Both hub modes: single (`--store redis://`) and shared
//! (`--hub-mode shared`).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::Result;
use apex_tests::{Api, Hub, HubOptions, RedisServer, wait_until};
use serde_json::{Value, json};

/// Far above what the hub needs to notice (a second or two).
const WAIT: Duration = Duration::from_secs(60);

/// `GET /health`: status code and body.
async fn health(api: &Api) -> Result<(u16, Value)> {
    let resp = api
        .http()
        .get(format!("{}/health", api.base_url()))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let (status, body) = apex_tests::api::json_of(resp).await?;
    Ok((status.as_u16(), body))
}

/// Polls `/health` until it answers `code`; returns the body.
async fn health_becomes(api: &Api, code: u16) -> Result<Value> {
    wait_until(&format!("/health to answer {code}"), WAIT, || {
        let api = api.clone();
        async move {
            let (status, body) = health(&api).await?;
            Ok((status == code).then_some(body))
        }
    })
    .await
}

/// The fields every `/health` body has, whatever the store's state.
fn assert_full_body(body: &Value) {
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert!(body["uptime_seconds"].is_number(), "{body}");
    assert!(body["nodes"]["online"].is_number(), "{body}");
    assert!(body["tasks"]["total"].is_number(), "{body}");
    assert!(body["queue_depth"].is_number(), "{body}");
    assert!(body["node_channel"]["frames_in"].is_number(), "{body}");
}

/// The whole cycle against `hub` on `redis`: ok, Redis down → degraded and submissions
/// refused, Redis back → ok and submissions accepted.
async fn health_follows_redis(hub: &Hub, redis: &mut RedisServer) -> Result<()> {
    let api = hub.api().clone();
    let (status, body) = health(&api).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["store"], "ok", "{body}");
    assert_full_body(&body);
    let (status, body) = api.submit_raw(&json!({"tool": "echo"})).await?;
    assert_eq!(status.as_u16(), 201, "{body}");

    redis.stop();
    let body = health_becomes(&api, 503).await?;
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["store"], "unavailable", "{body}");
    assert_full_body(&body);
    // Answered promptly although Redis does not answer at all.
    let began = Instant::now();
    let (status, _) = health(&api).await?;
    assert_eq!(status, 503);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "/health took {:?} while Redis is down",
        began.elapsed()
    );
    // What /health announces is what a submission gets.
    let (status, body) = api.submit_raw(&json!({"tool": "echo"})).await?;
    assert_eq!(status.as_u16(), 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    redis.restart().map_err(anyhow::Error::msg)?;
    let body = health_becomes(&api, 200).await?;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["store"], "ok", "{body}");
    let (status, body) = api.submit_raw(&json!({"tool": "echo"})).await?;
    assert_eq!(status.as_u16(), 201, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_redis_store_going_away_and_coming_back() -> Result<()> {
    let redis_dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start_persistent(redis_dir.path()).map_err(anyhow::Error::msg)?;
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--store".into(), redis.url()],
        ..HubOptions::default()
    })
    .await?;
    health_follows_redis(&hub, &mut redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_of_a_shared_mode_hub_follows_redis() -> Result<()> {
    let redis_dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start_persistent(redis_dir.path()).map_err(anyhow::Error::msg)?;
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--store".into(),
            redis.url(),
            "--hub-mode".into(),
            "shared".into(),
        ],
        ..HubOptions::default()
    })
    .await?;
    health_follows_redis(&hub, &mut redis).await
}
