#![allow(clippy::unwrap_used)]
//! Memory search end to end (`/api/v1/memory…`) with the real `apex-hub`: a word said ten
//! turns ago is found and another user's never is; saved memories found and deleted; CJK
//! queries; the index after a SIGKILL; two shared hubs on a real `redis-server`; hybrid ranking
//! with the mock's and the fake upstream's embeddings. `POST /v1/embeddings` itself is in
//! `tests/embeddings.rs`.

use std::time::Duration;

use apex_tests::api::call;
use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::redis::RedisServer;
use apex_tests::shared::shared_hub;
use apex_tests::{Api, DEFAULT_TIMEOUT, Hub, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const MOCK: &str = "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n";

/// Options of a hub with `toml` as its config file (and `base`'s keys when given).
async fn hub_with(toml: &str) -> Hub {
    Hub::start_with_config(toml, &[], None).await.unwrap()
}

async fn chat(api: &Api, session: &str, message: &str) {
    let (status, v) = call(
        api,
        Method::POST,
        "/api/v1/chat",
        Some(json!({"message": message, "session_id": session})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

/// The results of a query (200 asserted).
async fn query(api: &Api, body: Value) -> Vec<Value> {
    let (status, v) = call(
        api,
        Method::POST,
        "/api/v1/memory/query",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}: {v}");
    assert_eq!(v["query"], body["query"]);
    v["results"].as_array().unwrap().clone()
}

async fn find(api: &Api, q: &str) -> Vec<Value> {
    query(api, json!({"query": q})).await
}

fn contents(results: &[Value]) -> Vec<String> {
    results
        .iter()
        .map(|r| r["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Registers a user at `hub` and returns a client with their access token.
async fn user(hub: &Hub, email: &str) -> Api {
    let resp = hub
        .api()
        .http()
        .post(format!("{}/api/v1/auth/register", hub.url()))
        .json(&json!({"email": email, "password": "correct horse battery", "username": email}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap();
    Api::new(&hub.url(), body["access_token"].as_str().unwrap()).unwrap()
}

/// Logs `email` in at `hub` (the user was registered at another hub of the cluster).
async fn login(hub: &Hub, email: &str) -> Api {
    let resp = hub
        .api()
        .http()
        .post(format!("{}/api/v1/auth/login", hub.url()))
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    Api::new(&hub.url(), body["access_token"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_word_said_ten_turns_ago_is_found_and_another_users_never_is() {
    let hub = hub_with(MOCK).await;
    let alice = user(&hub, "alice@example.com").await;
    let bob = user(&hub, "bob@example.com").await;
    chat(
        &alice,
        "trip",
        "my passport number ends in zanzibar7 remember it",
    )
    .await;
    for i in 0..10 {
        chat(&alice, "trip", &format!("unrelated small talk number {i}")).await;
    }
    chat(&bob, "trip", "zanzibar7 is my wifi password").await;

    let got = find(&alice, "zanzibar7").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(
        r["content"],
        "my passport number ends in zanzibar7 remember it"
    );
    assert_eq!(r["session_id"], "trip");
    assert_eq!(r["role"], "user");
    assert_eq!(r["id"], "trip#1", "the message's position in its history");
    assert!(r["score"].as_f64().unwrap() > 0.0);
    assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    // Bob sees his own only; the admin key (another owner) sees neither.
    assert_eq!(
        contents(&find(&bob, "ZANZIBAR7").await),
        ["zanzibar7 is my wifi password"]
    );
    assert!(find(hub.api(), "zanzibar7").await.is_empty());
    // The answers are indexed too; the session and time filters hold.
    let answers = query(&alice, json!({"query": "mock answer", "limit": 50})).await;
    assert_eq!(
        answers.len(),
        11,
        "every assistant message of alice's: {answers:?}"
    );
    assert!(answers.iter().all(|r| r["role"] == "assistant"));
    assert!(
        query(&alice, json!({"query": "zanzibar7", "session_id": "other"}))
            .await
            .is_empty()
    );
    assert_eq!(
        query(&alice, json!({"query": "zanzibar7", "session_id": "trip"}))
            .await
            .len(),
        1
    );
    assert!(
        query(
            &alice,
            json!({"query": "zanzibar7", "since": "2999-01-01T00:00:00Z"})
        )
        .await
        .is_empty()
    );
    assert_eq!(
        query(&alice, json!({"query": "zanzibar7", "since": 0}))
            .await
            .len(),
        1
    );
    assert_eq!(
        query(&alice, json!({"query": "talk", "limit": 3}))
            .await
            .len(),
        3
    );
    // Bad requests name their field.
    for (body, param) in [
        (json!({}), "query"),
        (json!({"query": ""}), "query"),
        (json!({"query": "x", "limit": 0}), "limit"),
        (json!({"query": "x", "limit": 1000}), "limit"),
        (json!({"query": "x", "since": "yesterday"}), "since"),
        (json!({"query": "x", "session_id": "bad id!"}), "session_id"),
    ] {
        let (status, v) = call(&alice, Method::POST, "/api/v1/memory/query", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Deleting the conversation removes it from the index.
    let (status, v) = call(&alice, Method::DELETE, "/api/v1/chat/history/trip", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(find(&alice, "zanzibar7").await.is_empty());
    assert_eq!(find(&bob, "zanzibar7").await.len(), 1);
}

#[tokio::test]
async fn a_saved_memory_is_found_then_deleted_and_only_by_its_owner() {
    let hub = hub_with(MOCK).await;
    let alice = user(&hub, "alice@example.com").await;
    let bob = user(&hub, "bob@example.com").await;
    let (status, m) = call(
        &alice,
        Method::POST,
        "/api/v1/memory",
        Some(json!({"content": "my locker code is 4711", "tags": ["gym", "personal"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{m}");
    let id = m["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("mem_"), "{m}");
    assert_eq!(m["role"], "memory");
    assert!(m["session_id"].is_null());
    assert_eq!(m["tags"], json!(["gym", "personal"]));

    let got = find(&alice, "locker").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["role"], "memory");
    assert!(got[0]["session_id"].is_null());
    assert_eq!(
        contents(&find(&alice, "gym").await),
        ["my locker code is 4711"],
        "tags are searched"
    );
    assert!(find(&bob, "locker").await.is_empty());

    // Another user's id reads as absent.
    let path = format!("/api/v1/memory/{id}");
    let (status, v) = call(&bob, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(find(&alice, "locker").await.len(), 1);
    let (status, v) = call(&alice, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "success");
    assert!(
        find(&alice, "locker").await.is_empty(),
        "gone once the DELETE answered"
    );
    let (status, _) = call(&alice, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&alice, Method::DELETE, "/api/v1/memory/trip#1", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "messages are not deleted here"
    );

    for (body, param) in [
        (json!({}), "content"),
        (json!({"content": "  "}), "content"),
        (json!({"content": "x", "tags": "gym"}), "tags"),
        (json!({"content": "x", "tags": [""]}), "tags"),
    ] {
        let (status, v) = call(&alice, Method::POST, "/api/v1/memory", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test]
async fn cjk_text_is_searchable() {
    let hub = hub_with(MOCK).await;
    let api = hub.api();
    chat(api, "poems", "写一首关于春天的诗").await;
    chat(api, "poems", "今天天气很好").await;
    chat(api, "poems", "こんにちは、世界").await;
    let (status, _) = call(
        api,
        Method::POST,
        "/api/v1/memory",
        Some(json!({"content": "我喜欢喝绿茶"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(contents(&find(api, "春天").await)[0], "写一首关于春天的诗");
    assert_eq!(contents(&find(api, "诗").await), ["写一首关于春天的诗"]);
    assert_eq!(contents(&find(api, "天气").await)[0], "今天天气很好");
    assert_eq!(contents(&find(api, "绿茶").await), ["我喜欢喝绿茶"]);
    assert_eq!(contents(&find(api, "世界").await), ["こんにちは、世界"]);
    assert!(
        find(api, "红茶咖啡")
            .await
            .iter()
            .all(|r| r["content"] == "我喜欢喝绿茶")
    );
}

#[tokio::test]
async fn messages_are_still_found_after_a_hub_sigkill() {
    let mut hub = hub_with(MOCK).await;
    let api = hub.api().clone();
    for i in 0..5 {
        chat(
            &api,
            "durable",
            &format!("note {i}: the harbour key is under the stone"),
        )
        .await;
    }
    assert_eq!(find(&api, "harbour").await.len(), 5);
    let (status, _) = call(
        &api,
        Method::POST,
        "/api/v1/memory",
        Some(json!({"content": "the boat is called Marigold"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let index_dir = hub.dir().unwrap().join("data").join("memory-index");
    assert!(
        index_dir.join("meta.json").exists(),
        "{}",
        index_dir.display()
    );

    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    assert_eq!(find(&api, "harbour").await.len(), 5);
    assert_eq!(
        contents(&find(&api, "marigold").await),
        ["the boat is called Marigold"]
    );
    chat(
        &api,
        "durable",
        "after the restart: the harbour gate is green",
    )
    .await;
    assert_eq!(find(&api, "harbour").await.len(), 6);

    // An index lost entirely is rebuilt from the feed.
    std::fs::remove_dir_all(&index_dir).unwrap();
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    assert_eq!(find(&api, "harbour").await.len(), 6);
    assert_eq!(find(&api, "marigold").await.len(), 1);
}

#[tokio::test]
async fn two_shared_hubs_each_find_every_message() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start_with_config(MOCK, &[], Some(shared_hub(&redis, None)))
        .await
        .unwrap();
    let b = Hub::start_with_config(MOCK, &[], Some(shared_hub(&redis, Some(a.options()))))
        .await
        .unwrap();
    let alice_a = user(&a, "alice@example.com").await;
    let alice_b = login(&b, "alice@example.com").await;
    let bob_b = user(&b, "bob@example.com").await;

    chat(&alice_a, "s1", "the capybara sleeps at noon").await;
    // A's turn reaches the feed just after its answer; a query at B waits for B's index to
    // take in what the feed holds then. So B finds it within moments, not necessarily at once.
    let got = wait_until("B to find A's message", DEFAULT_TIMEOUT, || {
        let api = alice_b.clone();
        async move {
            let got = find(&api, "capybara").await;
            Ok((!got.is_empty()).then_some(got))
        }
    })
    .await
    .unwrap();
    assert_eq!(contents(&got), ["the capybara sleeps at noon"]);
    assert!(find(&bob_b, "capybara").await.is_empty());

    let (status, m) = call(
        &alice_b,
        Method::POST,
        "/api/v1/memory",
        Some(json!({"content": "the capybara likes oranges"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{m}");
    assert_eq!(find(&alice_a, "oranges").await.len(), 1);
    // Deleted at A: gone from A at once, from B within a poll.
    let (status, _) = call(
        &alice_a,
        Method::DELETE,
        &format!("/api/v1/memory/{}", m["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(find(&alice_a, "oranges").await.is_empty());
    wait_until("B to forget the memory", DEFAULT_TIMEOUT, || {
        let api = alice_b.clone();
        async move { Ok(find(&api, "oranges").await.is_empty().then_some(())) }
    })
    .await
    .unwrap();
    // Several turns on both hubs: every hub finds every one.
    for i in 0..4 {
        let (who, session) = if i % 2 == 0 {
            (&alice_a, "s2")
        } else {
            (&alice_b, "s3")
        };
        chat(who, session, &format!("wombat fact {i}")).await;
    }
    for api in [&alice_a, &alice_b] {
        wait_until("every hub to find every turn", DEFAULT_TIMEOUT, || {
            let api = api.clone();
            async move { Ok((find(&api, "wombat").await.len() == 4).then_some(())) }
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn hybrid_ranking_with_the_mocks_embeddings() {
    let toml = format!("{MOCK}[memory]\nembedding_model = \"mock\"\nvector_weight = 0.5\n");
    let hub = hub_with(&toml).await;
    let api = hub.api();
    for content in [
        "budget",
        "the quarterly budget review meeting with finance",
        "meeting room booking",
    ] {
        let (status, _) = call(
            api,
            Method::POST,
            "/api/v1/memory",
            Some(json!({"content": content})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let got = find(api, "quarterly budget review").await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0]["content"],
        "the quarterly budget review meeting with finance"
    );
    for r in &got {
        let s = r["score"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&s),
            "hybrid scores are blends in 0..1: {got:?}"
        );
    }
    assert!(got[0]["score"].as_f64().unwrap() > got[1]["score"].as_f64().unwrap());
}

#[tokio::test]
async fn hybrid_ranking_embeds_through_an_openai_compatible_upstream() {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["emb-a".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let toml = format!(
        "{MOCK}[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\nmodels = [\"emb-a\"]\n\
         [memory]\nembedding_model = \"up/emb-a\"\n",
        fake.base_url()
    );
    let hub = hub_with(&toml).await;
    let api = hub.api();
    chat(api, "s", "the okapi is a forest giraffe").await;
    let got = find(api, "okapi").await;
    assert_eq!(contents(&got), ["the okapi is a forest giraffe"]);
    // The user and assistant messages of the turn in one call, then the query.
    assert!(fake.stats().embeddings >= 2, "{:?}", fake.stats());
    let bodies: Vec<Value> = fake
        .requests()
        .into_iter()
        .map(|r| r["body"].clone())
        .filter(|b| b.get("input").is_some())
        .collect();
    assert!(
        bodies.iter().any(|b| b["input"] == json!(["okapi"])),
        "{bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .all(|b| b["model"] == "emb-a" && b["encoding_format"] == "float")
    );

    // With the upstream gone the index still finds by BM25.
    drop(fake);
    chat(api, "s", "a second okapi sentence").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(find(api, "okapi").await.len(), 2);
}

#[tokio::test]
async fn memory_can_be_turned_off() {
    let toml = format!("{MOCK}[memory]\nenabled = false\n");
    let hub = hub_with(&toml).await;
    chat(hub.api(), "s", "hello there").await;
    let (status, v) = call(
        hub.api(),
        Method::POST,
        "/api/v1/memory/query",
        Some(json!({"query": "hello"})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "memory_disabled");
}
