#![allow(clippy::unwrap_used)]
//! Schedules (`/api/v1/schedules`) end to end with the real `apex-hub` and `apex-node`:
//! validation naming the field, owner scoping, a task fire owned by the schedule's owner, a
//! notification fire on the owner's `/ws`, exactly one fire per due time with two hubs on a
//! real `redis-server`, and a fire missed while the hub was down caught up once after the
//! restart (`catch_up: true`) or skipped (`false`).

use std::time::{Duration, SystemTime};

use apex_tests::api::call;
use apex_tests::client_ws::ClientWs;
use apex_tests::shared::shared_hub;
use apex_tests::{Api, DEFAULT_TIMEOUT, Hub, Node, NodeOptions, RedisServer, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn create(api: &Api, body: Value) -> Value {
    let (status, v) = call(api, Method::POST, "/api/v1/schedules", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

async fn get(api: &Api, id: &str) -> Value {
    let (status, v) = call(api, Method::GET, &format!("/api/v1/schedules/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// RFC 3339 of now + `after`.
fn at(after: Duration) -> String {
    humantime::format_rfc3339_millis(SystemTime::now() + after).to_string()
}

/// Waits until schedule `id` satisfies `done`; returns it. Polls with `api`: an admin key
/// (exempt from the rate limits polling would run into) or the owner.
async fn wait_schedule(api: &Api, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, DEFAULT_TIMEOUT, || async {
        let s = get(api, id).await;
        Ok(done(&s).then_some(s))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn bad_schedules_are_refused_naming_the_field_and_schedules_belong_to_their_owner() {
    let hub = Hub::start_default().await.unwrap();
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&hub.url(), "bob@example.com")
        .await
        .unwrap();
    let note = json!({"title": "stretch", "body": "stand up"});
    let task = json!({"tool": "echo", "args": {"text": "x"}});
    let cases = [
        (
            json!({"name": "n", "cron": "61 * * * *", "notification": note}),
            "cron",
        ),
        (
            json!({"name": "n", "cron": "not cron", "notification": note}),
            "cron",
        ),
        (
            json!({"name": "n", "cron": "0 9 * * *", "timezone": "Mars/Olympus", "notification": note}),
            "timezone",
        ),
        (
            json!({"name": "n", "cron": "0 9 * * *", "run_at": at(Duration::from_secs(60)), "notification": note}),
            "run_at",
        ),
        (json!({"name": "n", "notification": note}), "cron"),
        (
            json!({"name": "n", "run_at": "tomorrow", "notification": note}),
            "run_at",
        ),
        (
            json!({"name": "n", "cron": "0 9 * * *", "task": task, "notification": note}),
            "notification",
        ),
        (json!({"name": "n", "cron": "0 9 * * *"}), "task"),
        (json!({"cron": "0 9 * * *", "notification": note}), "name"),
        (
            json!({"name": "n", "cron": "0 9 * * *", "task": {"args": {}}}),
            "task.tool",
        ),
        (
            json!({"name": "n", "cron": "0 9 * * *", "notification": {"title": "", "body": "b"}}),
            "notification.title",
        ),
    ];
    for (body, param) in cases {
        let (status, v) = call(
            &alice,
            Method::POST,
            "/api/v1/schedules",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert_eq!(v["error"]["param"], param, "{body} → {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(param.split('.').next_back().unwrap()),
            "{v}"
        );
    }

    let s = create(
        &alice,
        json!({"name": "morning", "cron": "0 9 * * 1-5", "timezone": "Europe/Paris",
            "notification": note}),
    )
    .await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["timezone"], "Europe/Paris");
    assert_eq!(s["catch_up"], true, "the default");
    assert_eq!(s["done"], false);
    assert!(s["next_fire"].as_str().unwrap().ends_with('Z'), "{s}");
    assert_eq!(s["notification"]["title"], "stretch");
    let t = create(
        &alice,
        json!({"name": "once", "run_at": at(Duration::from_secs(3600)), "catch_up": false,
            "task": task}),
    )
    .await;
    assert_eq!(t["catch_up"], false);
    assert_eq!(t["task"]["tool"], "echo");

    let (status, list) = call(&alice, Method::GET, "/api/v1/schedules", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["meta"]["total"], 2, "{list}");
    assert_eq!(list["data"][0]["id"], t["id"], "newest first");
    let (_, list) = call(&bob, Method::GET, "/api/v1/schedules", None).await;
    assert_eq!(list["meta"]["total"], 0, "bob sees none of alice's: {list}");
    let (_, list) = call(hub.api(), Method::GET, "/api/v1/schedules", None).await;
    assert_eq!(list["meta"]["total"], 2, "the admin sees all");
    for method in [Method::GET, Method::DELETE] {
        let (status, v) = call(&bob, method, &format!("/api/v1/schedules/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    }
    let (status, v) = call(
        &alice,
        Method::DELETE,
        &format!("/api/v1/schedules/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = call(
        &alice,
        Method::GET,
        &format!("/api/v1/schedules/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_task_fire_runs_as_the_owner_and_a_notification_fire_reaches_the_owners_ws() {
    let hub = Hub::start_default().await.unwrap();
    let _node = Node::start(&hub, NodeOptions::named("worker"))
        .await
        .unwrap();
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&hub.url(), "bob@example.com")
        .await
        .unwrap();
    let mut ws = ClientWs::connect(&hub.url(), alice.api_key())
        .await
        .unwrap();
    let mut bob_ws = ClientWs::connect(&hub.url(), bob.api_key()).await.unwrap();
    ws.ping().await.unwrap();
    bob_ws.ping().await.unwrap();

    let s = create(
        &alice,
        json!({"name": "echo soon", "run_at": at(Duration::from_secs(1)),
            "task": {"tool": "echo", "args": {"text": "from a schedule"}}}),
    )
    .await;
    let id = s["id"].as_str().unwrap();
    let s = wait_schedule(hub.api(), id, "the task fire", |s| s["fires"] == 1).await;
    assert_eq!(s["done"], true, "{s}");
    assert!(s["next_fire"].is_null());
    let task_id = s["last_task_id"].as_str().unwrap();
    let t = alice.wait_terminal(task_id, DEFAULT_TIMEOUT).await.unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert!(
        serde_json::to_string(&t.result)
            .unwrap()
            .contains("from a schedule")
    );
    // Alice's task: she is told it ended; bob cannot see it.
    let n = ws.until("notification").await.unwrap().pop().unwrap();
    assert_eq!(n["data"]["task_id"], task_id, "{n}");
    let (status, _) = call(&bob, Method::GET, &format!("/api/v1/tasks/{task_id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let s = create(
        &alice,
        json!({"name": "reminder", "run_at": at(Duration::from_secs(1)),
            "notification": {"title": "tea", "body": "the kettle"}}),
    )
    .await;
    let n = ws.until("notification").await.unwrap().pop().unwrap();
    assert_eq!(
        n["data"],
        json!({"title": "tea", "body": "the kettle"}),
        "{n}"
    );
    let s = get(&alice, s["id"].as_str().unwrap()).await;
    assert_eq!(s["fires"], 1);
    let frames = bob_ws.ping().await.unwrap();
    assert!(
        frames.iter().all(|f| f["type"] != "notification"),
        "{frames:?}"
    );
}

/// The sum of `apex_schedule_fires_total{action, outcome}` lines of `hub`'s `/metrics`.
async fn fires_metric(hub: &Hub, action: &str, outcome: &str) -> u64 {
    let (_, text) = call(hub.api(), Method::GET, "/metrics", None).await;
    let text = text.as_str().unwrap().to_owned();
    let label = format!("action=\"{action}\",outcome=\"{outcome}\"");
    text.lines()
        .filter(|l| l.starts_with("apex_schedule_fires_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_on_two_shared_hubs_fires_once() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    let _node = Node::start(&b, NodeOptions::named("worker")).await.unwrap();
    let alice = Api::register_user(&a.url(), "alice@example.com")
        .await
        .unwrap();
    let alice_b = Api::new(&b.url(), alice.api_key()).unwrap();
    let mut at_a = ClientWs::connect(&a.url(), alice.api_key()).await.unwrap();
    let mut at_b = ClientWs::connect(&b.url(), alice.api_key()).await.unwrap();
    at_a.ping().await.unwrap();
    at_b.ping().await.unwrap();

    // Several one-off schedules due at the same moment, created at either hub: both hubs see
    // each due and race for it.
    let due = at(Duration::from_secs(3));
    let mut notes = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let api = if i % 2 == 0 { &alice } else { &alice_b };
        let n = create(
            api,
            json!({"name": format!("note {i}"), "run_at": due,
                "notification": {"title": format!("note {i}"), "body": "once"}}),
        )
        .await;
        notes.push(n["id"].as_str().unwrap().to_owned());
        let t = create(
            api,
            json!({"name": format!("task {i}"), "run_at": due,
                "task": {"tool": "echo", "args": {"text": format!("task {i}")}}}),
        )
        .await;
        tasks.push(t["id"].as_str().unwrap().to_owned());
    }
    for id in notes.iter().chain(&tasks) {
        let s = wait_schedule(a.api(), id, "every schedule to fire", |s| s["done"] == true).await;
        assert_eq!(s["fires"], 1, "{s}");
    }
    // Each connection got each notification exactly once.
    for ws in [&mut at_a, &mut at_b] {
        let mut titles = Vec::new();
        while titles.len() < 4 {
            let n = ws.until("notification").await.unwrap().pop().unwrap();
            if n["data"]["task_id"].is_null() {
                titles.push(n["data"]["title"].as_str().unwrap().to_owned());
            }
        }
        titles.sort();
        assert_eq!(titles, ["note 0", "note 1", "note 2", "note 3"]);
        let later = ws.ping().await.unwrap();
        assert!(
            later
                .iter()
                .all(|f| f["type"] != "notification" || !f["data"]["task_id"].is_null()),
            "a schedule's notification came twice: {later:?}"
        );
    }
    // One task per schedule, and the hubs claimed eight fires between them.
    for (i, id) in tasks.iter().enumerate() {
        let s = get(&alice, id).await;
        let t = alice
            .wait_terminal(s["last_task_id"].as_str().unwrap(), DEFAULT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(t.status, "succeeded");
        assert!(
            serde_json::to_string(&t.result)
                .unwrap()
                .contains(&format!("task {i}"))
        );
    }
    let all = alice.list_all(&[("tool", "echo")]).await.unwrap();
    assert_eq!(all.len(), 4, "one task per schedule: {all:?}");
    let notified = fires_metric(&a, "notification", "fired").await
        + fires_metric(&b, "notification", "fired").await;
    let submitted =
        fires_metric(&a, "task", "fired").await + fires_metric(&b, "task", "fired").await;
    assert_eq!((notified, submitted), (4, 4));
}

#[tokio::test]
async fn a_fire_missed_while_the_hub_was_down_is_caught_up_once_or_skipped() {
    let mut hub = Hub::start_default().await.unwrap();
    let _node = Node::start(&hub, NodeOptions::named("worker"))
        .await
        .unwrap();
    let api = hub.api().clone();
    let due = Duration::from_secs(3);
    let caught = create(
        &api,
        json!({"name": "caught", "run_at": at(due),
            "task": {"tool": "echo", "args": {"text": "caught up"}}}),
    )
    .await;
    let skipped = create(
        &api,
        json!({"name": "skipped", "run_at": at(due), "catch_up": false,
            "task": {"tool": "echo", "args": {"text": "skipped"}}}),
    )
    .await;
    hub.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    // Down past the due time and the grace of an on-time fire (5 s).
    tokio::time::sleep(due + Duration::from_secs(7)).await;
    hub.start_again().await.unwrap();
    let api = hub.api().clone();

    let c = wait_schedule(
        &api,
        caught["id"].as_str().unwrap(),
        "the catch-up fire",
        |s| s["fires"] == 1,
    )
    .await;
    assert_eq!(c["done"], true);
    let t = api
        .wait_terminal(c["last_task_id"].as_str().unwrap(), DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(t.status, "succeeded", "{t:?}");
    let s = wait_schedule(&api, skipped["id"].as_str().unwrap(), "the skip", |s| {
        s["skipped"] == 1
    })
    .await;
    assert_eq!(s["fires"], 0, "{s}");
    assert_eq!(s["done"], true);
    assert!(s["last_task_id"].is_null());
    let all = api.list_all(&[("tool", "echo")]).await.unwrap();
    assert_eq!(all.len(), 1, "only the caught-up fire ran: {all:?}");
    assert!(
        serde_json::to_string(&all[0].result)
            .unwrap()
            .contains("caught up")
    );
}
