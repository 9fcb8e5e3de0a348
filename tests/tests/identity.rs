//! Users, tokens and API keys against the real `apex-hub` binary: register, login, me,
//! refresh (rotation and reuse), logout; expired, forged and unsigned tokens; managed keys
//! and their scopes; two hubs in shared mode on a real `redis-server`, where a logout or a
//! deleted key at hub A is refused at hub B within a second and B's open SSE streams of that
//! credential end; and the login time of unknown and known emails.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apex_tests::api::json_of;
use apex_tests::shared::shared_hub;
use apex_tests::{Hub, HubOptions, RedisServer, wait_until};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// How soon a revocation at one hub must hold at another.
const PROPAGATION: Duration = Duration::from_secs(1);

/// One request to `hub` with an optional bearer credential and JSON body: status and body.
async fn call(
    hub: &Hub,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = hub
        .api()
        .http()
        .request(method, format!("{}{path}", hub.url()));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    json_of(req.send().await.unwrap()).await.unwrap()
}

async fn register(hub: &Hub, email: &str, password: &str) -> Value {
    let (s, v) = call(
        hub,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"email": email, "password": password, "username": "Ada"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

async fn login(hub: &Hub, email: &str, password: &str) -> (StatusCode, Value) {
    call(
        hub,
        Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

async fn refresh(hub: &Hub, token: &str) -> (StatusCode, Value) {
    call(
        hub,
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": token})),
    )
    .await
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{key}` in {v}"))
}

fn token_pair_shape(v: &Value) {
    assert_eq!(v["token_type"], "bearer", "{v}");
    assert_eq!(v["expires_in"], 1800, "{v}");
    assert_eq!(s(v, "access_token").split('.').count(), 3, "{v}");
    assert!(s(v, "refresh_token").len() >= 32, "{v}");
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_me_refresh_and_logout() {
    let hub = Hub::start_default().await.unwrap();
    let reg = register(&hub, "Ada@Example.com", "correct horse").await;
    token_pair_shape(&reg);
    let user = &reg["user"];
    assert_eq!(user["email"], "Ada@Example.com");
    assert_eq!(user["username"], "Ada");
    let user_id = s(user, "id").to_owned();

    // A taken email (in another case), a malformed email, a short password.
    for (body, status, param) in [
        (
            json!({"email": "ada@EXAMPLE.com", "password": "long enough", "username": "x"}),
            StatusCode::CONFLICT,
            "email",
        ),
        (
            json!({"email": "ada.example.com", "password": "long enough", "username": "x"}),
            StatusCode::BAD_REQUEST,
            "email",
        ),
        (
            json!({"email": "bob@example.com", "password": "1234567", "username": "x"}),
            StatusCode::BAD_REQUEST,
            "password",
        ),
    ] {
        let (st, v) = call(
            &hub,
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some(body),
        )
        .await;
        assert_eq!(st, status, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }

    // Wrong password and unknown email: one status, one message.
    let (st1, wrong) = login(&hub, "ada@example.com", "wrong horse").await;
    let (st2, unknown) = login(&hub, "nobody@example.com", "correct horse").await;
    assert_eq!(
        (st1, st2),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(wrong, unknown);
    let (st, session) = login(&hub, "ADA@example.com", "correct horse").await;
    assert_eq!(st, StatusCode::OK, "{session}");
    token_pair_shape(&session);
    assert!(session.get("user").is_none());
    let access = s(&session, "access_token");

    // Me: the user with an RFC 3339 creation time. Never the hash.
    let (st, me) = call(&hub, Method::GET, "/api/v1/auth/me", Some(access), None).await;
    assert_eq!(st, StatusCode::OK, "{me}");
    assert_eq!(me["id"], user_id.as_str());
    assert_eq!(me["email"], "Ada@Example.com");
    assert_eq!(me["username"], "Ada");
    assert!(s(&me, "created_at").ends_with('Z'), "{me}");
    assert!(!me.to_string().contains("argon2"), "{me}");
    // The user role: tasks yes, config and nodes no; me needs a user token, not the admin key.
    let (st, v) = call(&hub, Method::GET, "/api/v1/tasks", Some(access), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for path in ["/v1/config", "/v1/nodes", "/v1/keys"] {
        let (st, v) = call(&hub, Method::GET, path, Some(access), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path} {v}");
        assert_eq!(code(&v), "missing_scope", "{v}");
    }
    let (st, v) = call(
        &hub,
        Method::GET,
        "/api/v1/auth/me",
        Some(hub.api_key()),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, _) = call(&hub, Method::GET, "/api/v1/auth/me", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Refresh rotates: the new pair works, the old refresh token is spent.
    let (st, second) = refresh(&hub, s(&session, "refresh_token")).await;
    assert_eq!(st, StatusCode::OK, "{second}");
    token_pair_shape(&second);
    assert_ne!(second["refresh_token"], session["refresh_token"]);
    let (st, _) = call(
        &hub,
        Method::GET,
        "/api/v1/auth/me",
        Some(s(&second, "access_token")),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    // Reuse of the spent token revokes the family: its newest tokens die too.
    let (st, v) = refresh(&hub, s(&session, "refresh_token")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(code(&v), "invalid_refresh_token");
    let (st, _) = refresh(&hub, s(&second, "refresh_token")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    for t in [access, s(&second, "access_token")] {
        let (st, v) = call(&hub, Method::GET, "/api/v1/auth/me", Some(t), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(code(&v), "token_revoked", "{v}");
    }

    // Logout: the access token and its refresh token are refused from then on.
    let (_, fresh) = login(&hub, "ada@example.com", "correct horse").await;
    let access = s(&fresh, "access_token");
    let (st, v) = call(
        &hub,
        Method::POST,
        "/api/v1/auth/logout",
        Some(access),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["message"].is_string(), "{v}");
    let (st, v) = call(&hub, Method::GET, "/api/v1/tasks", Some(access), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let (st, _) = refresh(&hub, s(&fresh, "refresh_token")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Registration's own session is another family, still valid.
    let (st, _) = call(
        &hub,
        Method::GET,
        "/api/v1/auth/me",
        Some(s(&reg, "access_token")),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        !hub.log_text().contains("correct horse"),
        "a password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_forged_foreign_and_unsigned_tokens_get_401() {
    let secret = format!("test-secret-{}", uuid::Uuid::new_v4().simple());
    let hub = Hub::start(HubOptions {
        env: vec![
            (
                "APEX_AUTH__JWT_SECRET_ENV".into(),
                "APEX_TEST_JWT_SECRET".into(),
            ),
            ("APEX_TEST_JWT_SECRET".into(), secret.clone()),
        ],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let reg = register(&hub, "t@example.com", "correct horse").await;
    let access = s(&reg, "access_token").to_owned();
    let me = |token: String| {
        let hub = &hub;
        async move { call(hub, Method::GET, "/api/v1/auth/me", Some(&token), None).await }
    };
    assert_eq!(me(access.clone()).await.0, StatusCode::OK);

    // The secret of the environment variable signs the hub's tokens: one made with it works,
    // the same past its `exp` does not.
    let claims = |exp: u64| {
        json!({
            "sub": s(&reg["user"], "id"),
            "jti": format!("{}.x", uuid::Uuid::new_v4().simple()),
            "iat": now_secs() - 60,
            "exp": exp,
            "scope": "tasks chat agents",
        })
    };
    let sign = |claims: &Value, key: &[u8]| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let made = sign(&claims(now_secs() + 600), secret.as_bytes());
    assert_eq!(me(made.clone()).await.0, StatusCode::OK);
    let expired = sign(&claims(now_secs() - 5), secret.as_bytes());
    let (st, v) = me(expired).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(code(&v), "token_expired", "{v}");

    // Another secret; a changed signature; `alg: none`; claims swapped under a signature.
    let foreign = sign(
        &claims(now_secs() + 600),
        b"another cluster's secret, 32 bytes+",
    );
    let (head, sig) = access.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", sig.chars().rev().collect::<String>());
    let made_parts: Vec<&str> = made.split('.').collect();
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let unsigned = format!("{none_header}.{}.", made_parts[1]);
    let swapped = format!(
        "{}.{}.{sig}",
        head.split('.').next().unwrap(),
        made_parts[1]
    );
    for (what, t) in [
        ("another secret", foreign),
        ("forged signature", forged),
        ("alg none", unsigned),
        (
            "alg none, no dot",
            format!("{none_header}.{}", made_parts[1]),
        ),
        ("swapped claims", swapped),
        ("garbage", "a.b.c".to_owned()),
    ] {
        let (st, v) = me(t).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{what}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_variable_that_is_missing_or_short_stops_the_hub_before_it_listens() {
    for (var, value) in [
        ("APEX_TEST_SURELY_UNSET", None),
        ("APEX_TEST_SHORT", Some("short")),
    ] {
        let mut env = vec![("APEX_AUTH__JWT_SECRET_ENV".to_owned(), var.to_owned())];
        if let Some(v) = value {
            env.push((var.to_owned(), v.to_owned()));
        }
        let e = Hub::start(HubOptions {
            env,
            ..HubOptions::default()
        })
        .await
        .unwrap_err()
        .to_string();
        // The config error's line (exit 64), before the `listening on` line.
        assert!(e.contains("before printing `listening on`"), "{e}");
        assert!(e.contains("apex-hub: invalid configuration:"), "{e}");
        assert!(
            e.contains("`auth.jwt_secret_env`") && e.contains(var),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_keys_have_their_scopes_only_and_expire() {
    let hub = Hub::start_default().await.unwrap();
    let admin = Some(hub.api_key());
    let (st, created) = call(
        &hub,
        Method::POST,
        "/v1/keys",
        admin,
        Some(json!({"name": "ci", "scopes": ["tasks"], "rate_limit": 600})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let key = s(&created, "key").to_owned();
    let id = s(&created, "id").to_owned();
    assert!(key.starts_with(&format!("apex_{id}_")), "{created}");
    assert_eq!(created["scopes"], json!(["tasks"]));
    assert_eq!(created["rate_limit"], 600);
    assert_eq!(created["expires_at"], Value::Null);
    assert!(s(&created, "created_at").ends_with('Z'));

    // Only `tasks`: 200 there, 403 naming the scope elsewhere.
    let (st, v) = call(&hub, Method::GET, "/api/v1/tasks", Some(&key), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for (path, scope) in [
        ("/v1/config", "config"),
        ("/v1/nodes", "nodes:read"),
        ("/v1/events", "nodes:read"),
        ("/v1/models", "chat"),
        ("/v1/keys", "admin"),
    ] {
        let (st, v) = call(&hub, Method::GET, path, Some(&key), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path} {v}");
        assert_eq!(code(&v), "missing_scope", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(&format!("`{scope}`")), "{path}: {m}");
    }
    let (st, _) = call(
        &hub,
        Method::POST,
        "/v1/keys",
        Some(&key),
        Some(json!({"name": "escalate", "scopes": ["admin"]})),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // Listed without the secret; an unknown scope is a 400 naming `scopes`.
    let (st, list) = call(&hub, Method::GET, "/v1/keys", admin, None).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    assert_eq!(list["meta"]["total"], 1, "{list}");
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert!(list["data"][0].get("key").is_none(), "{list}");
    assert!(!list.to_string().contains(&key[key.len() - 20..]), "{list}");
    let (st, v) = call(
        &hub,
        Method::POST,
        "/v1/keys",
        admin,
        Some(json!({"name": "bad", "scopes": ["tasks", "superuser"]})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "scopes", "{v}");

    // A key that expires in a second: accepted, then 401 `key_expired`.
    let soon = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(2)).to_string();
    let (st, short) = call(
        &hub,
        Method::POST,
        "/v1/keys",
        admin,
        Some(json!({"name": "short", "scopes": ["nodes:read"], "expires_at": soon})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{short}");
    let short_key = s(&short, "key").to_owned();
    let (st, _) = call(&hub, Method::GET, "/v1/nodes", Some(&short_key), None).await;
    assert_eq!(st, StatusCode::OK);
    let expired = wait_until("the short key to expire", WAIT, || {
        let (hub, k) = (&hub, short_key.clone());
        async move {
            let (st, v) = call(hub, Method::GET, "/v1/nodes", Some(&k), None).await;
            Ok((st == StatusCode::UNAUTHORIZED).then_some(v))
        }
    })
    .await
    .unwrap();
    assert_eq!(code(&expired), "key_expired", "{expired}");

    // Deleted: refused; deleting again is a 404.
    let (st, v) = call(&hub, Method::DELETE, &format!("/v1/keys/{id}"), admin, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, _) = call(&hub, Method::GET, "/api/v1/tasks", Some(&key), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = call(&hub, Method::DELETE, &format!("/v1/keys/{id}"), admin, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(!hub.log_text().contains(&key), "a key reached the log");
}

/// An SSE response kept open (headers received, and the first chunk when asked), then
/// [`OpenStream::ended_within`] says whether the hub ends it in time.
struct OpenStream {
    resp: reqwest::Response,
}

impl OpenStream {
    async fn open(hub: &Hub, path: &str, bearer: &str, first_chunk: bool) -> Self {
        let mut resp = hub
            .api()
            .http()
            .get(format!("{}{path}", hub.url()))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        if first_chunk {
            let first = tokio::time::timeout(WAIT, resp.chunk()).await.unwrap();
            assert!(matches!(first, Ok(Some(_))), "{path}: {first:?}");
        }
        Self { resp }
    }

    /// Reads to the end; true if it ended within `limit`.
    async fn ended_within(mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            while let Ok(Some(_)) = self.resp.chunk().await {}
        })
        .await
        .is_ok()
    }
}

/// Polls `path` at `hub` with `bearer` until it answers 401; how long that took.
async fn refused_after(hub: &Hub, path: &str, bearer: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (st, _) = call(hub, Method::GET, path, Some(bearer), None).await;
        if st == StatusCode::UNAUTHORIZED {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < WAIT,
            "{path} still accepted after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_shared_mode_a_logout_or_deleted_key_at_hub_a_holds_at_hub_b_within_a_second() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();

    // A user registered at A is known at B (same records, same generated secret).
    let reg = register(&a, "shared@example.com", "correct horse").await;
    let access = s(&reg, "access_token").to_owned();
    let (st, me) = call(&b, Method::GET, "/api/v1/auth/me", Some(&access), None).await;
    assert_eq!(st, StatusCode::OK, "{me}");
    let (st, _) = login(&b, "shared@example.com", "correct horse").await;
    assert_eq!(st, StatusCode::OK);

    // The user follows a task no node can run (it stays queued) at B.
    let (st, task) = call(
        &a,
        Method::POST,
        "/api/v1/tasks",
        Some(&access),
        Some(json!({"tool": "no_such_tool"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{task}");
    let events = format!("/api/v1/tasks/{}/events", s(&task, "task_id"));
    let stream = OpenStream::open(&b, &events, &access, true).await;

    let (st, v) = call(&a, Method::POST, "/api/v1/auth/logout", Some(&access), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let logged_out = Instant::now();
    let took = refused_after(&b, "/api/v1/auth/me", &access).await;
    eprintln!("logout at hub A refused at hub B after {took:?}");
    assert!(took < PROPAGATION, "hub B refused the token after {took:?}");
    let left = PROPAGATION.saturating_sub(logged_out.elapsed());
    assert!(
        stream.ended_within(left + Duration::from_millis(100)).await,
        "the user's SSE stream at hub B did not end within a second of the logout"
    );
    let (st, _) = refresh(&b, s(&reg, "refresh_token")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // A key made at A works at B once B has seen it; deleted at A, it is refused at B within a
    // second, and B's `/v1/events` stream of it ends.
    let (st, created) = call(
        &a,
        Method::POST,
        "/v1/keys",
        Some(a.api_key()),
        Some(json!({"name": "dash", "scopes": ["nodes:read"]})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let key = s(&created, "key").to_owned();
    wait_until("hub B to accept the key", WAIT, || {
        let (b, k) = (&b, key.clone());
        async move {
            let (st, _) = call(b, Method::GET, "/v1/nodes", Some(&k), None).await;
            Ok((st == StatusCode::OK).then_some(()))
        }
    })
    .await
    .unwrap();
    let stream = OpenStream::open(&b, "/v1/events", &key, false).await;
    let (st, _) = call(
        &a,
        Method::DELETE,
        &format!("/v1/keys/{}", s(&created, "id")),
        Some(a.api_key()),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let deleted = Instant::now();
    let took = refused_after(&b, "/v1/nodes", &key).await;
    eprintln!("key deleted at hub A refused at hub B after {took:?}");
    assert!(took < PROPAGATION, "hub B refused the key after {took:?}");
    let left = PROPAGATION.saturating_sub(deleted.elapsed());
    assert!(
        stream.ended_within(left + Duration::from_millis(100)).await,
        "the key's /v1/events stream at hub B did not end within a second of the deletion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_with_unknown_and_known_emails_take_about_as_long() {
    // 22 logins from one address: more than the default 10 a minute allows.
    let hub = Hub::start(HubOptions {
        env: vec![("APEX_RATE_LIMITS__LOGIN_PER_MINUTE".into(), "0".into())],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    register(&hub, "known@example.com", "correct horse").await;
    // One of each first (connections, caches), then interleaved rounds.
    let _ = login(&hub, "known@example.com", "wrong horse").await;
    let _ = login(&hub, "unknown@example.com", "wrong horse").await;
    const ROUNDS: u32 = 10;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        for email in ["known@example.com", "unknown@example.com"] {
            let start = Instant::now();
            let (st, _) = login(&hub, email, &format!("wrong horse {i}")).await;
            let took = start.elapsed();
            assert_eq!(st, StatusCode::UNAUTHORIZED);
            if email.starts_with("known") {
                known.push(took);
            } else {
                unknown.push(took);
            }
        }
    }
    // Medians, and a wide band: an unknown email that skipped the password hash would answer
    // in a small fraction of the time (the hash is most of a login), while a loaded machine
    // (other builds, CI) only adds noise to both.
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    let ratio = unknown.as_secs_f64() / known.as_secs_f64();
    eprintln!("login medians: unknown email {unknown:?}, known email {known:?}, ratio {ratio:.2}");
    assert!(
        (0.5..=2.0).contains(&ratio),
        "unknown email {unknown:?} against known email {known:?} (ratio {ratio:.2})"
    );
}

/// Password guessing is limited: 10 attempts a minute per email (whatever the address) and per
/// client address (whatever the email), counted across two shared hubs; the 11th answers 429
/// with `Retry-After`, and a correct password is refused too until the bucket refills.
#[tokio::test]
async fn logins_are_limited_per_email_and_per_address_across_hubs() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    register(&a, "victim@example.com", "correct horse").await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let hub = if i % 2 == 0 { &a } else { &b };
        let (st, body) = login(hub, "victim@example.com", &format!("guess {i}")).await;
        statuses.push((st, body));
    }
    let refused: Vec<_> = statuses
        .iter()
        .filter(|(st, _)| *st == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|(st, _)| *st == StatusCode::UNAUTHORIZED)
            .count(),
        10,
        "ten wrong guesses are answered: {statuses:?}"
    );
    assert_eq!(refused.len(), 2, "{statuses:?}");
    let body = &refused[0].1;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["category"], "rate_limit", "{body}");
    assert!(body["retry_after"].as_u64().unwrap() >= 1, "{body}");
    // The right password is refused as well now: the limit is on attempts.
    let (st, _) = login(&a, "victim@example.com", "correct horse").await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    let resp = a
        .api()
        .http()
        .post(format!("{}/api/v1/auth/login", a.url()))
        .json(&json!({"email": "victim@example.com", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    // Per address: other emails from the same address are limited too (this address has
    // made 14 attempts by now).
    let (st, _) = login(&b, "someone-else@example.com", "whatever").await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "the address is limited");
}
