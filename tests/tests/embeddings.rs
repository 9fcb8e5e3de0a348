#![allow(clippy::unwrap_used)]
//! `POST /v1/embeddings` end to end: the real `apex-hub` with the built-in `mock` and the fake
//! OpenAI-compatible upstream (`apex_tests::fake_llm`), over HTTP and with the official `openai`
//! Python package (`tests/python/test_embeddings_sdk.py`).

use apex_tests::fake_llm::{FakeLlm, FakeOptions, fake_embedding};
use apex_tests::{Hub, HubOptions};
use serde_json::{Value, json};

const SECRET: &str = "sk-embeddings-secret-0123456789";
const SECRET_ENV: &str = "APEX_TEST_EMBEDDINGS_KEY";

struct Setup {
    hub: Hub,
    fake: FakeLlm,
}

/// A fake upstream requiring [`SECRET`], and a hub with providers `mock` (models `mock`) and
/// `up` (the fake: `emb-a`, `status-503-e`), `status-503-e` falling back to `up/emb-a`, and
/// the alias `vectors` for `up/emb-a`.
async fn setup() -> Setup {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["emb-a".to_owned()],
        api_key: Some(SECRET.to_owned()),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let toml = format!(
        r#"
[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]

[[llm.providers]]
name = "up"
base_url = "{}"
api_key_env = "{SECRET_ENV}"
models = ["emb-a", "status-503-e"]

[llm.aliases]
vectors = ["up/emb-a"]

[llm.fallbacks]
"status-503-e" = ["up/emb-a"]
"#,
        fake.base_url()
    );
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--config".into(), path.display().to_string()],
        env: vec![(SECRET_ENV.into(), SECRET.into())],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    Setup { hub, fake }
}

async fn embed(hub: &Hub, body: Value) -> (reqwest::StatusCode, Value) {
    let resp = hub
        .api()
        .request(reqwest::Method::POST, "/v1/embeddings")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn the_mock_and_an_upstream_embed_with_routing_fallbacks_and_both_encodings() {
    let s = setup().await;
    // The mock: deterministic unit vectors, 256 by default.
    let (status, v) = embed(
        &s.hub,
        json!({"model": "mock", "input": ["hello", "hello"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "mock");
    let a = floats(&v["data"][0]["embedding"]);
    assert_eq!(a.len(), 256);
    assert_eq!(a, floats(&v["data"][1]["embedding"]));
    assert_eq!(v["data"][1]["index"], 1);
    assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    assert_eq!(v["usage"], json!({"prompt_tokens": 2, "total_tokens": 2}));
    assert_eq!(a, apex_hub::llm::embeddings::mock_vector("hello", 256));
    let (_, v) = embed(
        &s.hub,
        json!({"model": "mock", "input": "hello", "encoding_format": "base64"}),
    )
    .await;
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(apex_hub::llm::embeddings::floats_of_base64(b64).unwrap(), a);

    // The upstream through an alias: the key sent, `float` asked, the model renamed.
    let (status, v) = embed(
        &s.hub,
        json!({"model": "vectors", "input": "hello", "user": "u1"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "vectors");
    assert_eq!(floats(&v["data"][0]["embedding"]), fake_embedding("hello"));
    let last = s.fake.requests().pop().unwrap();
    assert_eq!(last["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(
        last["body"],
        json!({"model": "emb-a", "input": "hello", "encoding_format": "float", "user": "u1"})
    );
    // base64 asked of the hub: the upstream still gets `float`, the hub encodes.
    let (_, v) = embed(
        &s.hub,
        json!({"model": "up/emb-a", "input": [[1, 2], [3]], "encoding_format": "base64"}),
    )
    .await;
    let got =
        apex_hub::llm::embeddings::floats_of_base64(v["data"][1]["embedding"].as_str().unwrap());
    assert_eq!(got.unwrap(), fake_embedding("t3"));
    assert_eq!(
        s.fake.requests().pop().unwrap()["body"]["encoding_format"],
        "float"
    );

    // A 503 before any answer moves on to the fallback.
    let before = s.fake.stats();
    let (status, v) = embed(&s.hub, json!({"model": "status-503-e", "input": "x"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(floats(&v["data"][0]["embedding"]), fake_embedding("x"));
    let after = s.fake.stats();
    assert_eq!(after.embeddings - before.embeddings, 2);
    assert_eq!(after.errors_sent - before.errors_sent, 1);

    // Errors in the common shape.
    let (status, v) = embed(&s.hub, json!({"model": "nope", "input": "x"})).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    for (body, param) in [
        (json!({"model": "mock"}), "input"),
        (json!({"model": "mock", "input": ""}), "input"),
        (json!({"input": "x"}), "model"),
        (
            json!({"model": "mock", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (
            json!({"model": "mock", "input": "x", "dimensions": 0}),
            "dimensions",
        ),
    ] {
        let (status, v) = embed(&s.hub, body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test]
async fn the_official_openai_python_sdk_embeds() {
    let s = setup().await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_embeddings_sdk.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_HUB_URL", format!("{}/v1", s.hub.url()))
        .env("APEX_API_KEY", s.hub.api_key())
        .env("APEX_MODEL", "mock")
        .env("APEX_UPSTREAM", "emb-a")
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
    for case in [
        "default_base64 ok",
        "floats_and_batches ok",
        "upstream ok",
        "errors ok",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in:\n{stdout}");
    }
    // What the SDK decoded from base64 is exactly what the hub computed.
    let vectors: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        floats(&vectors[0]["vector"]),
        apex_hub::llm::embeddings::mock_vector("hello", 256)
    );
    assert_eq!(floats(&vectors[1]["vector"]), fake_embedding("hello"));
}
