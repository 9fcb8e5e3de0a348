//! Rate limits (`[rate_limits]`) with the real `apex-hub` binaries: exact across three hubs in
//! shared mode on one real `redis-server`, the 429 body and headers of a hub alone, Redis
//! stopped mid-run (`on_store_error` allow and deny), and OpenAI's `x-ratelimit-*` headers on
//! `/v1/chat/completions` with the built-in `mock` provider, tokens charged from its usage.
//!
//! Only config-file keys exist on this branch: the hubs limit them with `apply_to_admin = true`.
//! No assertion is on timing; the limits are chosen so that refills (one unit every 600 ms or
//! more) are far apart from the requests of a check.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apex_tests::shared::shared_hub;
use apex_tests::{Hub, HubOptions, RedisServer};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

/// A config file with `body`, kept for the test's life (the hub reads it at start).
fn config_file(body: &str) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("hub.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A free loopback port (for `--metrics-listen`, which is not rate limited).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--config FILE --metrics-listen 127.0.0.1:PORT` appended to `opts`; the metrics URL.
fn with_config(mut opts: HubOptions, config: &Path) -> (HubOptions, String) {
    let port = free_port();
    opts.extra_args.extend([
        "--config".into(),
        config.display().to_string(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{port}"),
    ]);
    (opts, format!("http://127.0.0.1:{port}/metrics"))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    header(h, name).and_then(|v| v.parse().ok())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One answer: status, headers, JSON body (`Null` if not JSON).
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn get(http: &reqwest::Client, hub: &Hub, path: &str) -> Answer {
    let r = http
        .get(format!("{}{path}", hub.url()))
        .bearer_auth(hub.api_key())
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// The value of one sample of a metric in a text exposition (0 if absent).
async fn metric(http: &reqwest::Client, url: &str, sample: &str) -> f64 {
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shared_hubs_admit_exactly_the_limit_whichever_hub_answers() {
    let redis = RedisServer::start().unwrap();
    let cfg = config_file("[rate_limits]\napply_to_admin = true\nstandard_per_minute = 100\n");
    let (a_opts, a_metrics) = with_config(shared_hub(&redis, None), &cfg);
    let a = Hub::start(a_opts).await.unwrap();
    let mut hubs = vec![a];
    let mut metrics = vec![a_metrics];
    for _ in 0..2 {
        let (opts, m) = with_config(shared_hub(&redis, Some(hubs[0].options())), &cfg);
        hubs.push(Hub::start(opts).await.unwrap());
        metrics.push(m);
    }
    let http = client();
    // Open the connections first (`/health` is not limited), so the burst below is only
    // requests on warm connections.
    let warm = (0..300).map(|i| {
        let url = format!("{}/health", hubs[i % 3].url());
        let http = http.clone();
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    for s in futures::future::join_all(warm).await {
        assert_eq!(s.unwrap(), 200);
    }

    // 300 requests at once, spread over the hubs, against 100 a minute (one back every 600 ms).
    let began = Instant::now();
    let burst = (0..300).map(|i| get(&http, &hubs[i % 3], "/v1/models"));
    let answers = futures::future::join_all(burst).await;
    let took = began.elapsed();

    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    let context = format!("burst took {took:?} (a unit refills every 600 ms)");
    assert_eq!(ok.len(), 100, "{context}");
    assert_eq!(limited.len(), 200, "{context}");
    // Every admitted answer, whichever hub gave it, counted down one shared bucket: each of
    // 99..=0 seen exactly once.
    let mut remaining: Vec<u64> = ok
        .iter()
        .map(|a| header_u64(&a.headers, "x-ratelimit-remaining").unwrap())
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<u64>>(), "{context}");
    let now = unix_now();
    for a in &answers {
        assert_eq!(header_u64(&a.headers, "x-ratelimit-limit"), Some(100));
        let reset = header_u64(&a.headers, "x-ratelimit-reset").unwrap();
        assert!(reset <= now + 61, "reset {reset} vs now {now}");
    }
    for a in &limited {
        assert_eq!(header_u64(&a.headers, "x-ratelimit-remaining"), Some(0));
        let retry = header_u64(&a.headers, "retry-after").unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(a.body["error"]["code"], "rate_limit_exceeded", "{}", a.body);
        assert_eq!(a.body["retry_after"].as_u64(), Some(retry), "{}", a.body);
    }
    // Each hub counted the refusals it gave; together, all 200.
    let mut refused = 0.0;
    for m in &metrics {
        refused += metric(&http, m, "apex_rate_limited_total{class=\"standard\"}").await;
    }
    assert_eq!(refused, 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_alone_answers_429_with_retry_after_and_the_error_body() {
    let cfg = config_file("[rate_limits]\napply_to_admin = true\nstandard_per_minute = 3\n");
    let (opts, metrics_url) = with_config(HubOptions::default(), &cfg);
    let hub = Hub::start(opts).await.unwrap();
    let http = client();

    let before = unix_now();
    let mut resets = Vec::new();
    for want in [2, 1, 0] {
        let a = get(&http, &hub, "/v1/models").await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(header_u64(&a.headers, "x-ratelimit-limit"), Some(3));
        assert_eq!(header_u64(&a.headers, "x-ratelimit-remaining"), Some(want));
        assert_eq!(header(&a.headers, "retry-after"), None);
        resets.push(header_u64(&a.headers, "x-ratelimit-reset").unwrap());
    }
    // Full again 20 s after each request taken (3 a minute): later and later, within a minute.
    assert!(resets.windows(2).all(|w| w[0] <= w[1]), "{resets:?}");
    assert!(
        resets[0] >= before && resets[2] <= unix_now() + 61,
        "{resets:?}"
    );

    let a = get(&http, &hub, "/api/v1/tasks").await;
    assert_eq!(a.status, 429, "{}", a.body);
    let retry = header_u64(&a.headers, "retry-after").unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(header_u64(&a.headers, "x-ratelimit-remaining"), Some(0));
    assert_eq!(header_u64(&a.headers, "x-ratelimit-limit"), Some(3));
    assert_eq!(a.body["error"]["type"], "rate_limit_error", "{}", a.body);
    assert_eq!(a.body["error"]["code"], "rate_limit_exceeded", "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("3 requests per minute"), "{message}");
    assert_eq!(a.body["retry_after"].as_u64(), Some(retry), "{}", a.body);

    // Authentication comes first: a wrong key is 401, not counted, no rate-limit headers.
    let r = http
        .get(format!("{}/v1/models", hub.url()))
        .bearer_auth("not-the-key-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("x-ratelimit-limit").is_none());
    // `/health` is not an API route: never limited.
    let r = http
        .get(format!("{}/health", hub.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("x-ratelimit-limit").is_none());
    let refused = metric(
        &http,
        &metrics_url,
        "apex_rate_limited_total{class=\"standard\"}",
    )
    .await;
    assert_eq!(refused, 1.0);

    // With the defaults the config file's keys (operator tooling) are not limited at all.
    let plain = Hub::start_default().await.unwrap();
    for _ in 0..5 {
        let a = get(&http, &plain, "/v1/models").await;
        assert_eq!(a.status, 200);
        assert!(a.headers.get("x-ratelimit-limit").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_allow_lets_requests_through_and_deny_refuses_them() {
    let mut redis = RedisServer::start().unwrap();
    let allow = config_file("[rate_limits]\napply_to_admin = true\n");
    let deny = config_file("[rate_limits]\napply_to_admin = true\non_store_error = \"deny\"\n");
    let (opts, allow_metrics) = with_config(shared_hub(&redis, None), &allow);
    let a = Hub::start(opts).await.unwrap();
    let (opts, _) = with_config(shared_hub(&redis, Some(a.options())), &deny);
    let d = Hub::start(opts).await.unwrap();
    let http = client();

    for hub in [&a, &d] {
        let ans = get(&http, hub, "/v1/models").await;
        assert_eq!(ans.status, 200, "{}", ans.body);
        assert_eq!(header_u64(&ans.headers, "x-ratelimit-limit"), Some(100));
    }
    // Both hubs count in Redis: the second request of the same caller sees the first.
    assert_eq!(
        header_u64(
            &get(&http, &a, "/v1/models").await.headers,
            "x-ratelimit-remaining"
        ),
        Some(97)
    );
    assert_eq!(
        metric(&http, &allow_metrics, "apex_rate_limit_store_errors_total").await,
        0.0
    );

    redis.stop();
    for _ in 0..3 {
        let ans = get(&http, &a, "/v1/models").await;
        assert_eq!(ans.status, 200, "allow: {}", ans.body);
        assert!(ans.headers.get("x-ratelimit-limit").is_none());
        let ans = get(&http, &d, "/v1/models").await;
        assert_eq!(ans.status, 503, "deny: {}", ans.body);
        assert_eq!(
            ans.body["error"]["code"], "rate_limit_unavailable",
            "{}",
            ans.body
        );
    }
    let errors = metric(&http, &allow_metrics, "apex_rate_limit_store_errors_total").await;
    assert!(errors >= 3.0, "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_carry_openai_rate_limit_headers_and_charge_tokens() {
    // 5 requests and 10 tokens a minute; the mock answers 5 tokens to a 1-word prompt
    // (usage 6). A token comes back every 6 s, a request every 12 s.
    let cfg = config_file(
        "[rate_limits]\napply_to_admin = true\nllm_requests_per_minute = 5\n\
         llm_tokens_per_minute = 10\n\n[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\n\
         models = [\"mock\"]\nmock_tokens = 5\n",
    );
    let (opts, _) = with_config(HubOptions::default(), &cfg);
    let hub = Hub::start(opts).await.unwrap();
    let http = client();
    let chat = |stream: bool| {
        http.post(format!("{}/v1/chat/completions", hub.url()))
            .bearer_auth(hub.api_key())
            .json(&json!({"model": "mock", "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };

    let r = chat(false).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let h = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 6, "{body}");
    assert_eq!(header_u64(&h, "x-ratelimit-limit-requests"), Some(5));
    assert_eq!(header_u64(&h, "x-ratelimit-remaining-requests"), Some(4));
    // The first request of a full bucket: full again one interval (12 s) later.
    assert_eq!(
        header(&h, "x-ratelimit-reset-requests").as_deref(),
        Some("12s")
    );
    assert_eq!(header_u64(&h, "x-ratelimit-limit-tokens"), Some(10));
    // Checked before the call: the whole budget; nothing taken yet, so full now.
    assert_eq!(header_u64(&h, "x-ratelimit-remaining-tokens"), Some(10));
    assert_eq!(
        header(&h, "x-ratelimit-reset-tokens").as_deref(),
        Some("0s")
    );
    assert_eq!(header_u64(&h, "x-ratelimit-limit"), Some(5));
    assert_eq!(header_u64(&h, "x-ratelimit-remaining"), Some(4));

    // A stream whose client did not ask for usage: the hub still learns it (and charges
    // it) but forwards no usage chunk.
    let r = chat(true).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let h = r.headers().clone();
    let remaining = header_u64(&h, "x-ratelimit-remaining-tokens").unwrap();
    assert!(
        remaining < 10,
        "the first call's 6 tokens were charged: {remaining}"
    );
    assert!(header(&h, "x-ratelimit-reset-tokens").unwrap() != "0s");
    let text = r.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "usage was not asked for: {text}"
    );

    // 12 tokens used of 10: the next call is refused for its tokens, though requests remain.
    let r = chat(false).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let h = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("token budget of 10 tokens"), "{message}");
    let retry = header_u64(&h, "retry-after").unwrap();
    assert!(retry >= 1, "{retry}");
    assert_eq!(body["retry_after"].as_u64(), Some(retry), "{body}");
    assert_eq!(header_u64(&h, "x-ratelimit-remaining-tokens"), Some(0));
    assert!(header_u64(&h, "x-ratelimit-remaining-requests").unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_change_live_with_put_config() {
    let hub = Hub::start_default().await.unwrap();
    let http = client();
    assert!(
        get(&http, &hub, "/v1/models")
            .await
            .headers
            .get("x-ratelimit-limit")
            .is_none()
    );
    let r = http
        .put(format!("{}/v1/config", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"rate_limits": {"apply_to_admin": true, "standard_per_minute": 2}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&http, &hub, "/v1/models").await.status);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

/// The case with a managed key: a key created with `rate_limit: 100` (at one hub),
/// used for 300 requests at once spread over three shared hubs: exactly 100 answered 2xx, 200
/// refused, its remaining count going down one shared bucket (99..=0, each once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_keys_own_limit_is_exact_across_three_shared_hubs() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let mut hubs = vec![a];
    for _ in 0..2 {
        let opts = shared_hub(&redis, Some(hubs[0].options()));
        hubs.push(Hub::start(opts).await.unwrap());
    }
    let http = client();
    let created: serde_json::Value = http
        .post(format!("{}/v1/keys", hubs[0].url()))
        .bearer_auth(hubs[0].api_key())
        .json(&serde_json::json!({"name": "limited", "scopes": ["tasks"], "rate_limit": 100}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    // Warm connections (`/health` is not limited), and give the other hubs the key: they
    // load managed keys within one 250 ms poll of the records (probing with the key would
    // spend its budget).
    for hub in &hubs {
        let url = format!("{}/health", hub.url());
        assert_eq!(http.get(url).send().await.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burst = (0..300).map(|i| {
        let (http, key) = (http.clone(), key.clone());
        let url = format!("{}/api/v1/tasks?limit=1", hubs[i % 3].url());
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            let status = r.status().as_u16();
            (status, header_u64(r.headers(), "x-ratelimit-remaining"))
        }
    });
    let answers = futures::future::join_all(burst).await;
    let ok: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(ok.len(), 100, "{answers:?}");
    assert_eq!(refused, 200);
    let mut remaining: Vec<u64> = ok.iter().map(|(_, r)| r.unwrap()).collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<u64>>());
}
