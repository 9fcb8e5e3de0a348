//! Every task has an owner and no user reaches another's: with one hub, and with two hubs in
//! shared mode on a real `redis-server` (the task submitted at one hub, probed at the other).
//! Another user's task answers 404 (not 403) on read, cancel and events, and is missing from
//! their list; admin keys see every task.
#![allow(clippy::unwrap_used)]

use apex_tests::api::{Api, json_of};
use apex_tests::redis::RedisServer;
use apex_tests::shared::shared_hub;
use apex_tests::{Hub, HubOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Registers a user at `hub` and returns an API client carrying their access token.
async fn user(hub: &Hub, email: &str) -> Api {
    Api::register_user(&hub.url(), email).await.unwrap()
}

async fn status_of(api: &Api, method: Method, path: &str) -> (StatusCode, Value) {
    json_of(api.request(method, path).send().await.unwrap())
        .await
        .unwrap()
}

/// Checks that `other` cannot reach task `id` in any way, and that `owner` and `admin` can.
async fn isolated(owner: &Api, other: &Api, admin: &Api, id: &str) {
    for (method, path) in [
        (Method::GET, format!("/api/v1/tasks/{id}")),
        (Method::GET, format!("/api/v1/tasks/{id}?wait_ms=50")),
        (Method::POST, format!("/api/v1/tasks/{id}/cancel")),
    ] {
        let (status, body) = status_of(other, method.clone(), &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }
    let resp = other
        .request(Method::GET, &format!("/api/v1/tasks/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "events of another's task"
    );
    let listed = other.list_all(&[]).await.unwrap();
    assert!(
        listed.iter().all(|t| t.task_id != id),
        "another user's list leaves the task out"
    );
    assert_eq!(
        owner.get(id).await.unwrap().task_id,
        id,
        "the owner reads it"
    );
    assert!(
        owner
            .list_all(&[])
            .await
            .unwrap()
            .iter()
            .any(|t| t.task_id == id),
        "the owner lists it"
    );
    assert_eq!(
        admin.get(id).await.unwrap().task_id,
        id,
        "an admin reads it"
    );
}

#[tokio::test]
async fn a_user_never_reaches_another_users_task_on_one_hub() {
    let hub = Hub::start(HubOptions::default()).await.unwrap();
    let alice = user(&hub, "alice@example.com").await;
    let bob = user(&hub, "bob@example.com").await;
    let task = alice
        .submit(&json!({"tool": "echo", "args": {"text": "mine"}, "idempotency_key": "k1"}))
        .await
        .unwrap();
    isolated(&alice, &bob, hub.api(), &task.task_id).await;

    // The same idempotency key from another user is another task, and tells nothing.
    let bobs = bob
        .submit(&json!({"tool": "echo", "args": {"text": "his"}, "idempotency_key": "k1"}))
        .await
        .unwrap();
    assert_ne!(bobs.task_id, task.task_id);
    let admin_ids: Vec<String> = hub
        .api()
        .list_all(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert!(admin_ids.contains(&task.task_id) && admin_ids.contains(&bobs.task_id));

    // Cancelling is the owner's: it works for Alice after Bob's 404.
    let (status, body) = status_of(
        &alice,
        Method::POST,
        &format!("/api/v1/tasks/{}/cancel", task.task_id),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
}

#[tokio::test]
async fn a_user_never_reaches_another_users_task_across_shared_hubs() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let alice = user(&a, "alice@example.com").await;
    // Bob registers at the other hub: users are shared through Redis.
    let bob = user(&b, "bob@example.com").await;
    let task = alice
        .submit(&json!({"tool": "echo", "args": {"text": "mine"}}))
        .await
        .unwrap();
    isolated(&alice, &bob, b.api(), &task.task_id).await;
    // Alice's token works at hub B too, and she sees her task there.
    let alice_at_b = Api::new(&b.url(), alice.api_key()).unwrap();
    let seen = alice_at_b.get_wait(&task.task_id, 100).await.unwrap();
    assert_eq!(seen.task_id, task.task_id);
}
