#![allow(clippy::unwrap_used)]
//! Agent profiles (`/api/agents/profiles…`) end to end with the real `apex-hub` and
//! `apex-node`: the defaults and their idempotent initialisation, custom profiles, partial
//! updates, clones, the errors (unknown `agent_type` 400, deleting a default 403, another user's
//! profile 404), the filters, the `test` rate limit, and `POST /{id}/test` running the
//! built-in `agent.run` tool on a node through the hub's gateway to the fake upstream, with the
//! fallback model answering when the role model's upstream fails.

use apex_tests::api::call;
use apex_tests::fake_llm::{FakeLlm, FakeOptions, fake_text};
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A hub whose config file is `toml`.
async fn hub_with(toml: &str) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    Hub::start(HubOptions {
        extra_args: vec!["--config".into(), path.display().to_string()],
        ..HubOptions::default()
    })
    .await
    .unwrap()
}

fn profile_of<'a>(list: &'a Value, agent_type: &str) -> &'a Value {
    list["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["agent_type"] == agent_type)
        .unwrap()
}

#[tokio::test]
async fn profiles_are_initialised_once_edited_cloned_and_kept_to_their_owner() {
    let hub = Hub::start_default().await.unwrap();
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&hub.url(), "bob@example.com")
        .await
        .unwrap();
    const P: &str = "/api/agents/profiles";

    let (s, d) = call(&alice, Method::GET, &format!("{P}/defaults"), None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let agents = d["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 14);
    for t in [
        "meta_coordinator",
        "explorer",
        "critic",
        "synthesizer",
        "writer",
    ] {
        assert!(agents.iter().any(|a| a["agent_type"] == t), "{t}");
    }
    let (_, empty) = call(&alice, Method::GET, P, None).await;
    assert_eq!(empty, json!({"profiles": [], "total": 0}));

    // init-defaults: 14, then 0.
    let (s, v) = call(&alice, Method::POST, &format!("{P}/init-defaults"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"message": "Default agents initialized", "created_count": 14})
    );
    let (_, v) = call(&alice, Method::POST, &format!("{P}/init-defaults"), None).await;
    assert_eq!(v["created_count"], 0);
    let (_, list) = call(&alice, Method::GET, P, None).await;
    assert_eq!(list["total"], 14);
    let explorer = profile_of(&list, "explorer").clone();
    assert_eq!(explorer["cluster"], "information");
    assert_eq!(explorer["is_custom"], false);
    assert_eq!(explorer["is_enabled"], true);
    for key in [
        "id",
        "user_id",
        "display_name",
        "display_name_cn",
        "role_model",
        "fallback_model",
        "temperature",
        "max_tokens",
        "persona",
        "traits",
        "responsibilities",
        "pipeline_config",
        "data_sources",
        "enabled_skills",
        "created_at",
        "updated_at",
    ] {
        assert!(explorer.get(key).is_some(), "{key} in {explorer}");
    }
    let id = explorer["id"].as_str().unwrap();

    // Filters.
    let (_, info) = call(
        &alice,
        Method::GET,
        &format!("{P}?cluster=information"),
        None,
    )
    .await;
    let info = info["profiles"].as_array().unwrap().clone();
    assert!(!info.is_empty() && info.iter().all(|p| p["cluster"] == "information"));
    let (s, bad) = call(&alice, Method::GET, &format!("{P}?cluster=kitchen"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["param"], "cluster");
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .contains("reasoning, information, production, coordination"),
        "{bad}"
    );
    let (_, off) = call(&alice, Method::GET, &format!("{P}?is_enabled=false"), None).await;
    assert_eq!(off["total"], 0);

    // A partial update keeps the other fields.
    let (s, up) = call(
        &alice,
        Method::PUT,
        &format!("{P}/{id}"),
        Some(json!({"temperature": 0.5, "is_enabled": false, "id": "ignored"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{up}");
    assert_eq!(up["temperature"], 0.5);
    assert_eq!(up["is_enabled"], false);
    assert_eq!(up["persona"], explorer["persona"]);
    assert_eq!(up["id"], id);
    let (_, off) = call(&alice, Method::GET, &format!("{P}?is_enabled=false"), None).await;
    assert_eq!(off["total"], 1);
    assert_eq!(off["profiles"][0]["id"], id);
    let (_, on) = call(
        &alice,
        Method::GET,
        &format!("{P}?is_enabled=true&cluster=information"),
        None,
    )
    .await;
    assert_eq!(on["total"].as_u64().unwrap(), info.len() as u64 - 1);
    let (s, bad) = call(
        &alice,
        Method::PUT,
        &format!("{P}/{id}"),
        Some(json!({"max_tokens": 0})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(bad["error"]["param"], "max_tokens");

    // Errors: unknown type, bad values, deleting a default.
    let (s, bad) = call(
        &alice,
        Method::POST,
        P,
        Some(json!({"agent_type": "wizard"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .starts_with("Invalid agent_type: must be one of [meta_coordinator, "),
        "{bad}"
    );
    let (s, bad) = call(
        &alice,
        Method::POST,
        P,
        Some(json!({"agent_type": "explorer", "temperature": 2.5})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["param"], "temperature");
    let (s, bad) = call(&alice, Method::DELETE, &format!("{P}/{id}"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(bad["detail"], "Cannot delete default agents");

    // A custom profile, its clone, and deleting them.
    let (s, custom) = call(
        &alice,
        Method::POST,
        P,
        Some(
            json!({"agent_type": "custom_explorer", "display_name": "Custom Explorer",
            "display_name_cn": "自定义探索者", "cluster": "information",
            "role_model": "openai/gpt-4o", "temperature": 0.8, "max_tokens": 6000,
            "persona": "You explore deep learning.", "traits": {"creativity": "very_high"},
            "responsibilities": ["deep learning literature"], "data_sources": ["arxiv"],
            "enabled_skills": ["/survey"]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{custom}");
    assert_eq!(custom["is_custom"], true);
    assert_eq!(custom["max_tokens"], 6000);
    assert_eq!(custom["traits"]["creativity"], "very_high");
    let cid = custom["id"].as_str().unwrap();
    let (s, copy) = call(&alice, Method::POST, &format!("{P}/{id}/clone"), None).await;
    assert_eq!(s, StatusCode::CREATED, "{copy}");
    assert_eq!(copy["display_name"], "Explorer (Clone)");
    assert_eq!(copy["is_custom"], true);
    assert_eq!(copy["agent_type"], "explorer");
    assert_ne!(copy["id"], id);
    let (_, list) = call(&alice, Method::GET, P, None).await;
    assert_eq!(list["total"], 16);
    let copy_id = copy["id"].as_str().unwrap();
    let (s, v) = call(&alice, Method::DELETE, &format!("{P}/{copy_id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"message": "Agent profile deleted"}));
    let (s, _) = call(&alice, Method::GET, &format!("{P}/{copy_id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Another user sees none of it.
    let (_, theirs) = call(&bob, Method::GET, P, None).await;
    assert_eq!(theirs["total"], 0);
    for (method, path, body) in [
        (Method::GET, format!("{P}/{cid}"), None),
        (
            Method::PUT,
            format!("{P}/{cid}"),
            Some(json!({"temperature": 1.0})),
        ),
        (Method::DELETE, format!("{P}/{cid}"), None),
        (Method::POST, format!("{P}/{cid}/clone"), None),
        (
            Method::POST,
            format!("{P}/{cid}/test"),
            Some(json!({"task": "x"})),
        ),
    ] {
        let (s, v) = call(&bob, method.clone(), &path, body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {v}");
    }
    let (s, _) = call(&alice, Method::GET, &format!("{P}/{cid}"), None).await;
    assert_eq!(s, StatusCode::OK, "untouched by bob");
    // The admin sees everyone's.
    let (_, all) = call(hub.api(), Method::GET, P, None).await;
    assert_eq!(all["total"], 15);

    // The test route is limited to 20 a minute per caller (class `test`): a fresh user's 21st
    // call answers 429 with the rate-limit headers.
    let carol = Api::register_user(&hub.url(), "carol@example.com")
        .await
        .unwrap();
    for i in 0..20 {
        let (s, v) = call(
            &carol,
            Method::POST,
            &format!("{P}/nope/test"),
            Some(json!({"task": "x"})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "call {i}: {v}");
    }
    let resp = carol
        .request(Method::POST, &format!("{P}/nope/test"))
        .json(&json!({"task": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers();
    assert_eq!(h["x-ratelimit-limit"], "20");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert!(h.contains_key("x-ratelimit-reset"));
    assert!(h.contains_key("retry-after"));
    // Other routes have their own bucket.
    let (s, _) = call(&carol, Method::GET, P, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn the_test_route_runs_agent_run_on_a_node_and_the_fallback_answers_when_the_model_fails() {
    let fake = FakeLlm::start(FakeOptions::default()).await.unwrap();
    let hub = hub_with(&format!(
        "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\n\
         models = [\"json-a\", \"plain-a\", \"status-500-down\", \"status-503-down\"]\n\n\
         [agents]\nrole_model = \"json-a\"\n",
        fake.base_url()
    ))
    .await;
    let _node = Node::start(&hub, NodeOptions::named("agent-runner"))
        .await
        .unwrap();
    let alice = Api::register_user(&hub.url(), "alice@example.com")
        .await
        .unwrap();
    const P: &str = "/api/agents/profiles";
    call(&alice, Method::POST, &format!("{P}/init-defaults"), None).await;
    let (_, list) = call(&alice, Method::GET, P, None).await;
    let explorer = profile_of(&list, "explorer");
    assert_eq!(explorer["role_model"], "json-a", "from agents.role_model");
    let id = explorer["id"].as_str().unwrap().to_owned();

    let task = "Briefly analyse the core innovations of the Transformer";
    let (s, r) = call(
        &alice,
        Method::POST,
        &format!("{P}/{id}/test"),
        Some(json!({"task": task})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["agent_id"], id.as_str());
    assert_eq!(r["agent_type"], "explorer");
    assert_eq!(r["task"], task);
    assert_eq!(
        r["result"],
        fake_text(8).trim(),
        "the structured answer's `result`"
    );
    assert_eq!(r["model_used"], "json-a");
    assert_eq!(r["tokens_used"], 13, "5 prompt + 8 completion tokens");
    assert!(r["duration_ms"].is_u64());
    // What reached the upstream: persona, task, the structured-output request.
    let body = fake.requests().last().unwrap()["body"].clone();
    assert_eq!(body["model"], "json-a");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][0]["content"], explorer["persona"]);
    assert!(
        body["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains(task)
    );
    assert_eq!(body["temperature"], explorer["temperature"]);
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    let required = &body["response_format"]["json_schema"]["schema"]["required"];
    assert_eq!(
        required,
        &json!([
            "result",
            "key_findings",
            "uncertainties",
            "suggestions",
            "confidence"
        ])
    );

    // The role model's upstream fails: the fallback answers (plain text, kept as is).
    let (s, up) = call(
        &alice,
        Method::PUT,
        &format!("{P}/{id}"),
        Some(json!({"role_model": "status-500-down", "fallback_model": "plain-a"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{up}");
    let (s, r) = call(
        &alice,
        Method::POST,
        &format!("{P}/{id}/test"),
        Some(json!({"task": task})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["model_used"], "plain-a");
    assert_eq!(r["result"].as_str().unwrap().trim(), fake_text(8).trim());
    let models: Vec<Value> = fake
        .requests()
        .iter()
        .map(|r| r["body"]["model"].clone())
        .collect();
    assert!(models.contains(&json!("status-500-down")), "{models:?}");
    assert_eq!(models.last().unwrap(), "plain-a");

    // Both fail: 502 naming both.
    call(
        &alice,
        Method::PUT,
        &format!("{P}/{id}"),
        Some(json!({"fallback_model": "status-503-down"})),
    )
    .await;
    let (s, e) = call(
        &alice,
        Method::POST,
        &format!("{P}/{id}/test"),
        Some(json!({"task": task})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{e}");
    assert_eq!(e["error"]["code"], "agent_run_failed");
    let detail = e["detail"].as_str().unwrap();
    assert!(
        detail.contains("status-500-down") && detail.contains("status-503-down"),
        "{detail}"
    );

    // An empty task is refused before anything runs.
    let (s, e) = call(
        &alice,
        Method::POST,
        &format!("{P}/{id}/test"),
        Some(json!({"task": " "})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "task");
}
