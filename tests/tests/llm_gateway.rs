//! End-to-end tests of the LLM gateway: the real `apex-hub` binary in front of the fake
//! OpenAI-compatible upstream (`apex_tests::fake_llm`), driven over HTTP like a client would,
//! and by the official `openai` Python package (`tests/python/test_openai_sdk.py`).
#![allow(clippy::unwrap_used)]

use apex_tests::fake_llm::{FakeLlm, FakeOptions, fake_text};
use apex_tests::{DEFAULT_TIMEOUT, Hub, HubOptions, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};

const SECRET: &str = "sk-upstream-secret-0123456789abcdef";
const SECRET_ENV: &str = "APEX_TEST_UPSTREAM_KEY";

struct Setup {
    hub: Hub,
    fake: FakeLlm,
    http: reqwest::Client,
}

/// A fake upstream requiring [`SECRET`], and a hub with providers:
/// - `up`: the fake, models `fake-model`, `status-429-x`, `status-500-x`, `status-503-y`,
///   `slow-5000-a` (first-token timeout 500 ms), key from [`SECRET_ENV`];
/// - `disc`: the fake again, models discovered from its `/v1/models`;
/// - `dead`: a refused port, model `dead-model`;
/// - `mock`: the mock, models `mock` and `mock-slow` (5 tokens; 20 tokens/s).
async fn setup() -> Setup {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["disc-a".to_owned(), "disc-b".to_owned()],
        api_key: Some(SECRET.to_owned()),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let base = fake.base_url();
    let toml = format!(
        r#"
[[llm.providers]]
name = "up"
base_url = "{base}"
api_key_env = "{SECRET_ENV}"
models = ["fake-model", "status-429-x", "status-500-x", "status-503-y", "slow-5000-a", "cut-a"]
first_token_timeout_ms = 500

[[llm.providers]]
name = "disc"
base_url = "{base}"
api_key_env = "{SECRET_ENV}"

[[llm.providers]]
name = "dead"
base_url = "http://127.0.0.1:1/v1"
models = ["dead-model"]

[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]
mock_tokens = 5

[[llm.providers]]
name = "mockslow"
kind = "mock"
models = ["mock-slow"]
mock_tokens = 200
mock_tokens_per_second = 20.0

[llm.aliases]
fast = ["up/fake-model"]
fb429 = ["up/status-429-x", "up/fake-model"]
fbdead = ["dead/dead-model", "up/fake-model"]
fbslow = ["up/slow-5000-a", "up/fake-model"]
fbcut = ["up/cut-a", "up/fake-model"]
only429 = ["up/status-429-x"]

[llm.fallbacks]
"status-500-x" = ["up/fake-model"]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep().join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--config".into(),
            path.display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ],
        env: vec![(SECRET_ENV.to_owned(), SECRET.to_owned())],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let s = Setup { hub, fake, http };
    // Discovery runs in the background: wait until the discovered models are listed.
    wait_until("discovered models", DEFAULT_TIMEOUT, || async {
        let ids = s.model_ids().await?;
        Ok(ids.iter().any(|i| i == "disc-a").then_some(()))
    })
    .await
    .unwrap();
    s
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .bearer_auth(self.hub.api_key())
            .json(body)
    }

    async fn model_ids(&self) -> anyhow::Result<Vec<String>> {
        let v: Value = self
            .http
            .get(self.url("/v1/models"))
            .bearer_auth(self.hub.api_key())
            .send()
            .await?
            .json()
            .await?;
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// A non-streamed chat: status, `X-Request-ID`, body.
    async fn chat(&self, body: Value) -> (u16, String, Value) {
        let r = self
            .post("/v1/chat/completions", &body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let id = header(&r, "x-request-id");
        (status, id, r.json().await.unwrap())
    }

    /// A streamed chat read to the end: status, content type, `data:` payloads.
    async fn chat_stream(&self, body: Value) -> (u16, String, Vec<String>) {
        let r = self
            .post("/v1/chat/completions", &body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let ct = header(&r, "content-type");
        let text = r.text().await.unwrap();
        (status, ct, data_lines(&text))
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn msgs(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Concatenated `delta.content` of stream payloads (ignoring `[DONE]` and errors).
fn stream_text(frames: &[String]) -> String {
    frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn finish_reasons(frames: &[String]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|v| v["choices"][0]["finish_reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn plain_and_streamed_chat_through_the_hub() {
    let s = setup().await;
    let (status, id, v) = s
        .chat(json!({"model": "fake-model", "messages": msgs("hi"), "max_tokens": 50}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(!id.is_empty());
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake-model");
    assert_eq!(v["choices"][0]["message"]["content"], fake_text(8));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let (status, ct, frames) = s
        .chat_stream(
            json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
            "stream_options": {"include_usage": true}, "fake": {"tokens": 20}}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(stream_text(&frames), fake_text(20));
    assert_eq!(finish_reasons(&frames), vec!["stop".to_owned()]);
    let usage: Vec<Value> = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter(|v| v["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{frames:?}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 20);
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
    }

    // The upstream got the provider key, the request fields, and the unknown ones untouched.
    let reqs = s.fake.requests();
    let last = &reqs.last().unwrap();
    assert_eq!(last["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(last["body"]["fake"], json!({"tokens": 20}));
    assert_eq!(last["body"]["stream_options"]["include_usage"], true);
    assert_eq!(reqs[reqs.len() - 2]["body"]["max_tokens"], 50);
}

#[tokio::test]
async fn request_ids_come_from_the_body_or_the_header() {
    let s = setup().await;
    let (status, id, _) = s
        .chat(json!({"model": "fake-model", "messages": msgs("hi"), "requestId": "req-abc"}))
        .await;
    assert_eq!((status, id.as_str()), (200, "req-abc"));
    let (_, id, _) = s
        .chat(json!({"model": "fake-model", "messages": msgs("hi"), "messageId": "msg-1"}))
        .await;
    assert_eq!(id, "msg-1");
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "fake-model", "messages": msgs("hi")}),
        )
        .header("x-request-id", "hdr-7")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-request-id"), "hdr-7");
    // requestId is the hub's, not the upstream's: it is not passed on.
    let reqs = s.fake.requests();
    assert!(reqs.iter().all(|r| r["body"].get("requestId").is_none()));
}

#[tokio::test]
async fn tools_and_tool_choice_pass_through() {
    let s = setup().await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let choice = json!({"type": "function", "function": {"name": "get_weather"}});
    let (status, _, v) = s
        .chat(
            json!({"model": "fake-model", "messages": msgs("weather?"), "tools": tools,
            "tool_choice": choice, "temperature": 0.2, "stop": ["\n\n"],
            "parallel_tool_calls": false, "x_vendor": {"a": [1, 2]}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let reqs = s.fake.requests();
    let body = &reqs.last().unwrap()["body"];
    assert_eq!(body["tools"], tools);
    assert_eq!(body["tool_choice"], choice);
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["stop"], json!(["\n\n"]));
    assert_eq!(body["parallel_tool_calls"], false);
    assert_eq!(body["x_vendor"], json!({"a": [1, 2]}));

    let (status, _, frames) = s
        .chat_stream(json!({"model": "fake-model", "messages": msgs("weather?"),
            "tools": tools, "stream": true}))
        .await;
    assert_eq!(status, 200);
    let args: String = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    assert_eq!(finish_reasons(&frames), vec!["tool_calls".to_owned()]);
}

#[tokio::test]
async fn aliases_report_the_alias_and_call_the_deployment() {
    let s = setup().await;
    let (status, _, v) = s
        .chat(json!({"model": "fast", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "fast");
    assert_eq!(
        s.fake.requests().last().unwrap()["body"]["model"],
        "fake-model"
    );
    let (_, _, frames) = s
        .chat_stream(json!({"model": "fast", "messages": msgs("hi"), "stream": true}))
        .await;
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).unwrap();
        assert_eq!(v["model"], "fast");
    }
    // `provider/model` addresses one deployment.
    let (status, _, v) = s
        .chat(json!({"model": "up/fake-model", "messages": msgs("hi")}))
        .await;
    assert_eq!((status, v["model"].as_str()), (200, Some("up/fake-model")));
}

#[tokio::test]
async fn fallback_before_the_first_token() {
    let s = setup().await;
    for (model, stream) in [
        ("fb429", false),
        ("fb429", true),
        ("fbdead", false),
        ("fbdead", true),
        ("status-500-x", false),
        ("fbslow", true),
        // The first deployment sends its opening role-only chunk, then fails: nothing of the
        // answer reached the client yet, so the next deployment answers.
        ("fbcut", true),
    ] {
        let before = s.fake.stats().errors_sent;
        let body = json!({"model": model, "messages": msgs("hi"), "stream": stream});
        if stream {
            let (status, _, frames) = s.chat_stream(body).await;
            assert_eq!(status, 200, "{model}: {frames:?}");
            assert_eq!(stream_text(&frames), fake_text(8), "{model}");
            assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
        } else {
            let (status, _, v) = s.chat(body).await;
            assert_eq!(status, 200, "{model}: {v}");
            assert_eq!(v["choices"][0]["message"]["content"], fake_text(8));
            assert_eq!(v["model"], model);
        }
        if model.contains("429") || model.contains("500") || model.contains("cut") {
            assert_eq!(s.fake.stats().errors_sent, before + 1, "{model}");
        }
    }
    // Without a fallback the upstream's failure is the answer.
    let (status, _, v) = s
        .chat(json!({"model": "only429", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let (status, _, v) = s
        .chat(json!({"model": "status-503-y", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["type"], "server_error");
    let (status, _, v) = s
        .chat(json!({"model": "dead-model", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 503, "{v}");
}

#[tokio::test]
async fn failure_after_the_first_token_is_an_error_frame_then_done() {
    let s = setup().await;
    for knob in ["error_after", "fail_after"] {
        let (status, _, frames) = s
            .chat_stream(
                json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
                "fake": {"tokens": 10, "token_delay_ms": 20, knob: 3}}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(stream_text(&frames), fake_text(3), "{knob}: {frames:?}");
        let n = frames.len();
        assert_eq!(frames[n - 1], "[DONE]", "{knob}");
        let err: Value = serde_json::from_str(&frames[n - 2]).unwrap();
        assert_eq!(err["error"]["type"], "server_error", "{knob}: {err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("upstream"),
            "{err}"
        );
        assert!(finish_reasons(&frames).is_empty(), "{knob}: {frames:?}");
    }
}

/// Reads a stream's `data:` payloads until `pred` holds for the payloads read so far.
async fn read_until<B: AsRef<[u8]> + std::fmt::Debug>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    buf: &mut String,
    pred: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    loop {
        let frames = data_lines(buf);
        if pred(&frames) {
            return frames;
        }
        match tokio::time::timeout(DEFAULT_TIMEOUT, body.next()).await {
            Ok(Some(Ok(b))) => buf.push_str(&String::from_utf8_lossy(b.as_ref())),
            other => panic!("stream ended or stalled: {other:?}; read so far: {buf}"),
        }
    }
}

#[tokio::test]
async fn interrupt_ends_the_stream_with_stop_and_aborts_the_upstream() {
    let s = setup().await;
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
                "requestId": "int-1", "fake": {"tokens": 1000, "token_delay_ms": 50}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-request-id"), "int-1");
    let mut body = r.bytes_stream();
    let mut buf = String::new();
    read_until(&mut body, &mut buf, |f| !stream_text(f).is_empty()).await;
    let dropped = s.fake.stats().streams_dropped;

    let r = s
        .post("/v1/interrupt", &json!({"requestId": "int-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["success"], true);
    assert_eq!(v["interrupted"], true);
    assert_eq!(v["requestId"], "int-1");
    assert!(v["message"].is_string());

    let frames = read_until(&mut body, &mut buf, |f| {
        f.last().map(String::as_str) == Some("[DONE]")
    })
    .await;
    assert_eq!(finish_reasons(&frames), vec!["stop".to_owned()]);
    let text = stream_text(&frames);
    assert!(text.len() < fake_text(1000).len() && fake_text(1000).starts_with(&text));
    wait_until("the upstream stream to be dropped", DEFAULT_TIMEOUT, || {
        let d = s.fake.stats().streams_dropped;
        async move { Ok((d > dropped).then_some(())) }
    })
    .await
    .unwrap();

    // Finished: the id is unknown now.
    let r = s
        .post("/v1/interrupt", &json!({"messageId": "int-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    // VCP's fields, inside the hub's one error shape.
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["requestId"], "int-1", "{v}");
    assert_eq!(v["reason"], "not_found", "{v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    assert_eq!(v["category"], "not_found", "{v}");
    assert_eq!(v["detail"], v["error"]["message"], "{v}");
    let r = s.post("/v1/interrupt", &json!({})).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // A non-streamed call interrupted by messageId before its answer.
    let s2 = s.http.clone();
    let url = s.url("/v1/chat/completions");
    let key = s.hub.api_key().to_owned();
    let call = tokio::spawn(async move {
        s2.post(url)
            .bearer_auth(key)
            .json(
                &json!({"model": "fake-model", "messages": msgs("hi"), "messageId": "int-2",
                "fake": {"first_token_delay_ms": 30000}}),
            )
            .send()
            .await
            .unwrap()
    });
    wait_until(
        "the interrupt to find the call",
        DEFAULT_TIMEOUT,
        || async {
            let r = s
                .post("/v1/interrupt", &json!({"messageId": "int-2"}))
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(DEFAULT_TIMEOUT, call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_client_that_disconnects_aborts_the_upstream_call() {
    let s = setup().await;
    let before = s.fake.stats();
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
                "fake": {"tokens": 1000, "token_delay_ms": 50}}),
        )
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut buf = String::new();
    read_until(&mut body, &mut buf, |f| !stream_text(f).is_empty()).await;
    drop(body);
    wait_until("the upstream stream to be dropped", DEFAULT_TIMEOUT, || {
        let d = s.fake.stats().streams_dropped;
        async move { Ok((d > before.streams_dropped).then_some(())) }
    })
    .await
    .unwrap();
    assert_eq!(s.fake.stats().streams_completed, before.streams_completed);
}

#[tokio::test]
async fn a_non_stream_client_that_gives_up_aborts_the_upstream_call() {
    let s = setup().await;
    let before = s.fake.stats().waits_dropped;
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "fake-model", "messages": msgs("hi"),
                "fake": {"first_token_delay_ms": 60000}}),
        )
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    wait_until("the upstream call to be dropped", DEFAULT_TIMEOUT, || {
        let d = s.fake.stats().waits_dropped;
        async move { Ok((d > before).then_some(())) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn models_are_listed_from_every_provider_and_alias() {
    let s = setup().await;
    let v: Value = s
        .http
        .get(s.url("/v1/models"))
        .bearer_auth(s.hub.api_key())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let find = |id: &str| data.iter().find(|m| m["id"] == id).cloned();
    for id in [
        "fake-model",
        "disc-a",
        "disc-b",
        "dead-model",
        "mock",
        "fast",
    ] {
        let m = find(id).unwrap_or_else(|| panic!("{id} missing from {v}"));
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64());
    }
    assert_eq!(find("disc-a").unwrap()["owned_by"], "disc");
    assert_eq!(find("disc-a").unwrap()["created"], 1_700_000_000u64);
    assert_eq!(find("mock").unwrap()["owned_by"], "mock");
    // A discovered model can be called.
    let (status, _, v) = s
        .chat(json!({"model": "disc-b", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 200, "{v}");
    let r = s
        .http
        .get(s.url("/v1/models/disc-a"))
        .bearer_auth(s.hub.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .get(s.url("/v1/models/nope"))
        .bearer_auth(s.hub.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_mock_provider_answers_deterministically() {
    let s = setup().await;
    let (status, _, v) = s
        .chat(json!({"model": "mock", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "This is a mock answer"
    );
    assert_eq!(v["model"], "mock");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (status, _, frames) = s
        .chat_stream(
            json!({"model": "mock", "messages": msgs("hi"), "stream": true,
            "max_tokens": 3, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(stream_text(&frames), "This is a");
    assert_eq!(finish_reasons(&frames), vec!["length".to_owned()]);
    let first: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["object"], "chat.completion.chunk");
    assert!(frames.iter().any(|f| f.contains("\"usage\"")));
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let s = setup().await;
    let (status, id, v) = s
        .chat(json!({"model": "no-such-model", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 404);
    assert!(!id.is_empty());
    assert_eq!(v["error"]["code"], "model_not_found");
    for (body, param) in [
        (
            json!({"model": "fake-model", "messages": msgs("hi"), "n": 2}),
            "n",
        ),
        (json!({"model": "fake-model", "messages": []}), "messages"),
        (json!({"messages": msgs("hi")}), "model"),
        (
            json!({"model": "fake-model", "messages": msgs("hi"), "temperature": 9}),
            "temperature",
        ),
        (
            json!({"model": "fake-model", "messages": msgs("hi"), "stream": "yes"}),
            "stream",
        ),
    ] {
        let (status, _, v) = s.chat(body).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(s.hub.api_key())
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for path in ["/v1/chat/completions", "/v1/interrupt"] {
        let r = s
            .http
            .post(s.url(path))
            .json(&json!({"model": "fake-model", "messages": msgs("hi")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = s.http.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn the_upstream_key_is_never_returned_or_logged() {
    let s = setup().await;
    // Exercise every route and error path, then look for the key everywhere.
    let mut seen = String::new();
    for body in [
        json!({"model": "fake-model", "messages": msgs("hi")}),
        json!({"model": "fake-model", "messages": msgs("hi"), "stream": true}),
        json!({"model": "only429", "messages": msgs("hi")}),
        json!({"model": "status-503-y", "messages": msgs("hi")}),
        json!({"model": "dead-model", "messages": msgs("hi")}),
        json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
            "fake": {"fail_after": 2}}),
    ] {
        let r = s.post("/v1/chat/completions", &body).send().await.unwrap();
        seen.push_str(&format!("{:?}", r.headers()));
        seen.push_str(&r.text().await.unwrap());
    }
    for path in [
        "/v1/models",
        "/v1/models/fake-model",
        "/health",
        "/v1/nodes",
        "/api/v1/tasks",
    ] {
        let r = s
            .http
            .get(s.url(path))
            .bearer_auth(s.hub.api_key())
            .send()
            .await
            .unwrap();
        seen.push_str(&r.text().await.unwrap());
    }
    assert!(seen.contains("upstream"), "the error paths were exercised");
    assert!(!seen.contains(SECRET), "the key was returned: {seen}");
    let log = s.hub.log_text();
    assert!(log.contains("DEBUG"), "the hub logged at debug level");
    assert!(!log.contains(SECRET), "the key was logged");
    // It was really used: the fake demands it.
    assert_eq!(s.fake.stats().unauthorized, 0);
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unmodified() {
    let s = setup().await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_openai_sdk.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("APEX_HUB_URL", format!("{}/v1", s.hub.url()))
        .env("APEX_API_KEY", s.hub.api_key())
        .env("APEX_MODEL", "fake-model")
        .env("APEX_SLOW_MODEL", "mock-slow")
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python SDK test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for case in [
        "plain ok",
        "stream ok",
        "models ok",
        "not_found ok",
        "interrupt ok",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in:\n{stdout}");
    }
}

/// The value of the `/metrics` sample whose name and labels contain every part of `parts`.
fn sample(metrics: &str, parts: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn llm_calls_show_in_the_metrics_without_request_ids() {
    let s = setup().await;
    let (status, _, v) = s
        .chat(json!({"model": "fake-model", "messages": msgs("hi"), "requestId": "metrics-req-1"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _, frames) = s
        .chat_stream(
            json!({"model": "fake-model", "messages": msgs("hi"), "stream": true,
            "stream_options": {"include_usage": true}, "fake": {"tokens": 6}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let (status, _, _) = s
        .chat(json!({"model": "no-such-model-xyz", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 404);

    // The streamed call is counted when its stream is dropped: poll until both show.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = s
            .http
            .get(s.url("/metrics"))
            .bearer_auth(s.hub.api_key())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let ok = sample(
            &text,
            &[
                "apex_llm_requests_total{",
                "provider=\"up\"",
                "model=\"fake-model\"",
                "outcome=\"ok\"",
            ],
        );
        if ok.is_some_and(|n| n >= 2.0) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let ok = sample(
        &text,
        &[
            "apex_llm_requests_total{",
            "provider=\"up\"",
            "model=\"fake-model\"",
            "outcome=\"ok\"",
        ],
    );
    assert_eq!(ok, Some(2.0), "{text}");
    let ttft = sample(
        &text,
        &[
            "apex_llm_time_to_first_token_seconds_count{",
            "model=\"fake-model\"",
        ],
    );
    assert_eq!(ttft, Some(2.0), "{text}");
    let completion = sample(
        &text,
        &[
            "apex_llm_tokens_total{",
            "model=\"fake-model\"",
            "kind=\"completion\"",
        ],
    );
    assert!(completion.is_some_and(|n| n >= 6.0), "{text}");
    // An unknown model is counted without its name: clients cannot grow the label set.
    let not_found = sample(
        &text,
        &["apex_llm_requests_total{", "outcome=\"model_not_found\""],
    );
    assert_eq!(not_found, Some(1.0), "{text}");
    assert!(!text.contains("no-such-model-xyz"), "{text}");
    assert!(!text.contains("metrics-req-1"), "{text}");
}

/// An `https://` provider: the hub checks the upstream's certificate against the system trust
/// store (here a test CA given in `SSL_CERT_FILE`) and proxies plain and streamed chats over
/// TLS; a provider whose certificate comes from another CA is refused with a clear error.
#[tokio::test]
async fn https_upstreams_are_verified_against_the_trust_store() {
    use apex_tests::tls::{TestCa, TlsFront};
    let fake = FakeLlm::start(FakeOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trusted = TestCa::new(dir.path(), "trusted").unwrap();
    let other = TestCa::new(dir.path(), "other").unwrap();
    let good = TlsFront::start(&trusted, fake.addr()).await.unwrap();
    let bad = TlsFront::start(&other, fake.addr()).await.unwrap();
    let toml = format!(
        r#"
[[llm.providers]]
name = "tls"
base_url = "{}"
models = ["fake-model"]

[[llm.providers]]
name = "untrusted"
base_url = "{}"
models = ["other-model"]
"#,
        good.base_url(),
        bad.base_url()
    );
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, toml).unwrap();
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--config".into(), path.display().to_string()],
        env: vec![(
            "SSL_CERT_FILE".to_owned(),
            trusted.pem_path().display().to_string(),
        )],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let s = Setup {
        hub,
        fake,
        http: reqwest::Client::new(),
    };
    let (status, _, v) = s
        .chat(json!({"model": "fake-model", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], fake_text(8));
    let (status, _, frames) = s
        .chat_stream(json!({"model": "fake-model", "messages": msgs("hi"), "stream": true}))
        .await;
    assert_eq!(status, 200, "{frames:?}");
    assert_eq!(stream_text(&frames), fake_text(8));
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(s.fake.stats().requests, 2);

    let (status, _, v) = s
        .chat(json!({"model": "other-model", "messages": msgs("hi")}))
        .await;
    assert_eq!(status, 503, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(s.fake.stats().requests, 2, "nothing reached the upstream");
}
