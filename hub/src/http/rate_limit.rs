//! The rate-limit middleware of the API routes ([`limit`]), run after authentication: it
//! classifies the matched route ([`RouteClass::of`]), asks the [`Limiter`] about the
//! request's [`Principal`], and maps the answer to HTTP:
//! - admitted: the response carries `X-RateLimit-Limit` (requests a minute),
//!   `X-RateLimit-Remaining` and `X-RateLimit-Reset` (Unix seconds when the bucket is full
//!   again); `POST /v1/chat/completions` also carries OpenAI's `x-ratelimit-limit-requests`,
//!   `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (a duration such as `1s` or
//!   `6m0s`) and the same three for `-tokens`;
//! - refused: 429 `rate_limit_exceeded` ([`ApiError::rate_limited`]) with `Retry-After` and the
//!   same headers;
//! - not limited (limits off, an exempt admin, unlimited class): no headers;
//! - the store failed: as `on_store_error` says, the request goes on without headers, or 503
//!   `rate_limit_unavailable`.
//!
//! [`Limiter`]: crate::limits::Limiter

use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::limits::{Admission, Decision, OnStoreError, Quota, RouteClass};
use crate::principal::Principal;

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Middleware of the API routes, inside [`super::auth::authenticate`] (it reads the
/// [`Principal`] that one put in the request). See the module docs for what it answers.
pub(super) async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let class = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(RouteClass::Standard, |p| RouteClass::of(p.as_str()));
    let admission = match req.extensions().get::<Principal>() {
        Some(p) => state.limits.check(p, class).await,
        // Not behind authentication (a routing mistake): nobody to count.
        None => Admission::Unlimited,
    };
    admit(admission, next.run(req)).await
}

/// The response for `admission`: `run`'s with the rate-limit headers when admitted, 429 when
/// refused, 503 when the store failed and `on_store_error` is `deny` (see the module docs).
/// Also used by `POST /api/v1/auth/login`, which is limited per email and client address.
pub(super) async fn admit(
    admission: Admission,
    run: impl std::future::Future<Output = Response>,
) -> Response {
    match admission {
        Admission::Unlimited | Admission::StoreFailed(OnStoreError::Allow) => run.await,
        Admission::StoreFailed(OnStoreError::Deny) => ApiError::custom(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "rate_limit_unavailable",
            "the rate-limit store is unavailable and this hub refuses requests it cannot \
             count (rate_limits.on_store_error = \"deny\"); retry later",
            None,
        )
        .into_response(),
        Admission::Admitted(d) => {
            let mut resp = run.await;
            set_headers(resp.headers_mut(), &d);
            resp
        }
        Admission::Refused(d) => {
            let mut resp =
                ApiError::rate_limited(d.retry_after_secs(), d.message()).into_response();
            set_headers(resp.headers_mut(), &d);
            resp
        }
    }
}

/// The rate-limit headers of `d` (see the module docs).
fn set_headers(h: &mut HeaderMap, d: &Decision) {
    if let Some(q) = d.requests.or(d.tokens) {
        h.insert(LIMIT, q.limit.into());
        h.insert(REMAINING, q.remaining.into());
        h.insert(RESET, q.reset_at.into());
    }
    if d.class == RouteClass::Llm {
        let openai = |h: &mut HeaderMap, q: Quota, names: [HeaderName; 3]| {
            let [limit, remaining, reset] = names;
            h.insert(limit, q.limit.into());
            h.insert(remaining, q.remaining.into());
            if let Ok(v) = HeaderValue::from_str(&go_duration(q.reset_after)) {
                h.insert(reset, v);
            }
        };
        if let Some(q) = d.requests {
            openai(h, q, [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS]);
        }
        if let Some(q) = d.tokens {
            openai(h, q, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]);
        }
    }
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers write it (Go's `Duration.String`),
/// rounded up to the millisecond: `0s`, `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_micros().div_ceil(1000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let f = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", f.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_the_way_openai_writes_them() {
        for (d, want) in [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(59_120), "59.12s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(61_005), "1m1.005s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(7322), "2h2m2s"),
        ] {
            assert_eq!(go_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn llm_responses_carry_both_header_families() {
        let q = |limit, remaining| Quota {
            limit,
            remaining,
            reset_after: Duration::from_secs(6),
            reset_at: 1_700_000_006,
            retry_after: None,
        };
        let mut h = HeaderMap::new();
        set_headers(
            &mut h,
            &Decision {
                class: RouteClass::Llm,
                requests: Some(q(10, 9)),
                tokens: Some(q(1000, 400)),
            },
        );
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert_eq!(get("X-RateLimit-Limit"), "10");
        assert_eq!(get("X-RateLimit-Remaining"), "9");
        assert_eq!(get("X-RateLimit-Reset"), "1700000006");
        assert_eq!(get("x-ratelimit-limit-requests"), "10");
        assert_eq!(get("x-ratelimit-remaining-requests"), "9");
        assert_eq!(get("x-ratelimit-reset-requests"), "6s");
        assert_eq!(get("x-ratelimit-limit-tokens"), "1000");
        assert_eq!(get("x-ratelimit-remaining-tokens"), "400");
        assert_eq!(get("x-ratelimit-reset-tokens"), "6s");
        let mut h = HeaderMap::new();
        set_headers(
            &mut h,
            &Decision {
                class: RouteClass::Standard,
                requests: Some(q(100, 0)),
                tokens: None,
            },
        );
        assert_eq!(h.len(), 3, "{h:?}");
    }
}
