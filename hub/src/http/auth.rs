//! Every credential check of the HTTP surface: API keys, managed keys and access tokens on the
//! API routes ([`authenticate`], then [`require_scope`] per route), node
//! keys on the node channel and node or API keys on the log channel (their upgrade handlers
//! call [`key_matches`] with the key of [`bearer`] or [`path_key`]), the 401 each answers, and
//! [`redact_path`], which hides a key-in-path segment wherever a request path is logged,
//! traced or echoed in an error body.
//!
//! Keys travel in `Authorization: Bearer <key>` or, on the WebSocket channels (browsers and
//! some node clients cannot set headers on an upgrade), as the last path segment
//! `VCP_Key=<key>` or `ABP_Key=<key>`.

use std::borrow::Cow;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::identity::Refusal;
#[cfg(doc)]
use crate::identity::Session;
use crate::principal::{Principal, Scope};

/// The prefixes of a key-in-path segment, as accepted (case-sensitive).
const PATH_KEY_PREFIXES: [&str; 2] = ["VCP_Key=", "ABP_Key="];

/// What [`redact_path`] puts in place of a key.
pub const REDACTED: &str = "<redacted>";

/// Whether `presented` equals one of `keys`, compared in constant time (every key is compared,
/// so the time does not tell which one matched or how much of it).
pub fn key_matches(keys: &[String], presented: &str) -> bool {
    let mut ok = subtle::Choice::from(0u8);
    for k in keys {
        ok |= k.as_bytes().ct_eq(presented.as_bytes());
    }
    ok.into()
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, token
/// trimmed); `None` without the header or with another scheme.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The key of a key-in-path segment (`VCP_Key=<key>` or `ABP_Key=<key>`, as the router
/// decoded it), possibly empty; `None` when the segment is not one (the channels answer 404).
pub fn path_key(segment: &str) -> Option<&str> {
    PATH_KEY_PREFIXES
        .iter()
        .find_map(|p| segment.strip_prefix(p))
}

/// The channel (route prefix) of a matched upgrade route: `/distributed-server/{key}` and
/// `/distributed-server` are `/distributed-server`. A static route string, so never a key.
pub fn channel_of(route: &MatchedPath) -> &str {
    let r = route.as_str();
    r.strip_suffix("/{key}").unwrap_or(r)
}

/// `path` with the key of every key-in-path segment replaced by [`REDACTED`]:
/// `/distributed-server/VCP_Key=s3cret` → `/distributed-server/VCP_Key=<redacted>`.
///
/// Stricter than [`path_key`], so that nothing the router could decode into a key is shown: a
/// segment counts when its percent-decoded start is `vcp_key=` or `abp_key=` in any case, and
/// the whole segment is replaced (`VCP%5FKey=s%33cret` → `VCP_Key=<redacted>`). Paths without
/// such a segment are returned as they are, without allocating.
pub fn redact_path(path: &str) -> Cow<'_, str> {
    if !path.split('/').any(|s| secret_prefix(s).is_some()) {
        return Cow::Borrowed(path);
    }
    let redacted: Vec<Cow<'_, str>> = path
        .split('/')
        .map(|s| match secret_prefix(s) {
            Some(p) => Cow::Owned(format!("{p}={REDACTED}")),
            None => Cow::Borrowed(s),
        })
        .collect();
    Cow::Owned(redacted.join("/"))
}

/// `VCP_Key` or `ABP_Key` when `segment` starts, once percent-decoded, with either of them and
/// `=` (ASCII case ignored).
fn secret_prefix(segment: &str) -> Option<&'static str> {
    let mut head = [0u8; 8];
    let mut n = 0;
    let mut rest = segment.as_bytes();
    while n < head.len() {
        let (b, tail) = match rest {
            [b'%', h, l, tail @ ..] => (hex(*h)? << 4 | hex(*l)?, tail),
            [b'%', ..] => return None,
            [b, tail @ ..] => (*b, tail),
            [] => return None,
        };
        head[n] = b.to_ascii_lowercase();
        n += 1;
        rest = tail;
    }
    match &head {
        b"vcp_key=" => Some("VCP_Key"),
        b"abp_key=" => Some("ABP_Key"),
        _ => None,
    }
}

/// The value of one hex digit.
fn hex(d: u8) -> Option<u8> {
    char::from(d)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
}

/// Middleware of the API routes, the one place a bearer credential becomes a [`Principal`]
/// (put in the request's extensions; handlers take `Extension<Principal>`):
/// - a key of the config file (`api_keys`, compared in constant time): [`Principal::admin`];
/// - a managed key (`apex_<id>_<secret>`): its scopes, `key:<id>`;
/// - an access token (JWT of `/api/v1/auth/*`): [`Principal::user`], with the token's
///   [`Session`] as a second extension (`/auth/me`, `/auth/logout`).
///
/// The credential comes from `Authorization: Bearer`, or, on [`QUERY_TOKEN_PATH`] (`/ws`)
/// only, from `?token=` when there is no header.
///
/// Managed keys and tokens are checked in memory ([`crate::identity::Identity::authenticate`]),
/// revocations included. Scopes are checked after this, per route ([`require_scope`]).
///
/// # Errors
/// 401 ([`refused`]) for a missing, unknown, expired or revoked credential.
pub(super) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let from_query;
    let credential = match bearer(req.headers()).filter(|c| !c.is_empty()) {
        Some(c) => c,
        None => {
            from_query = query_token(&req);
            match from_query.as_deref() {
                Some(c) => c,
                None => return Err(ApiError::unauthorized()),
            }
        }
    };
    if key_matches(&state.config.api_keys, credential) {
        req.extensions_mut().insert(Principal::admin());
        return Ok(next.run(req).await);
    }
    let auth = state.identity.authenticate(credential).map_err(refused)?;
    req.extensions_mut().insert(auth.principal);
    if let Some(session) = auth.session {
        req.extensions_mut().insert(session);
    }
    Ok(next.run(req).await)
}

/// The only path that takes its credential as `?token=<token>` (the client WebSocket: browsers
/// cannot set headers on an upgrade). Request spans and errors show paths without the query,
/// so the token is never logged.
pub const QUERY_TOKEN_PATH: &str = "/ws";

/// The `token` query parameter of a request to [`QUERY_TOKEN_PATH`] (percent-decoded,
/// non-empty); `None` for every other path.
fn query_token(req: &Request) -> Option<String> {
    if req.uri().path() != QUERY_TOKEN_PATH {
        return None;
    }
    let q = req.uri().query()?;
    q.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "token")
        .and_then(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

/// `%XX` and `+` decoding of one query value; `None` if it is not UTF-8 or a `%` is broken.
fn percent_decode(v: &str) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut b = v.as_bytes();
    while let Some((&c, rest)) = b.split_first() {
        match (c, rest) {
            (b'%', [h, l, tail @ ..]) => {
                out.push(hex(*h)? << 4 | hex(*l)?);
                b = tail;
                continue;
            }
            (b'%', _) => return None,
            (b'+', _) => out.push(b' '),
            _ => out.push(c),
        }
        b = rest;
    }
    String::from_utf8(out).ok()
}

/// The 401 of a refused credential: `invalid_api_key` (unknown or malformed; the message says
/// to send a key or a token), `token_expired` (refresh it), `token_revoked` (log in again),
/// `key_expired`.
pub fn refused(why: Refusal) -> ApiError {
    let (code, message) = match why {
        Refusal::Invalid => return ApiError::unauthorized(),
        Refusal::Expired => (
            "token_expired",
            "the access token has expired: get a new one at POST /api/v1/auth/refresh",
        ),
        Refusal::Revoked => (
            "token_revoked",
            "the access token was revoked (logout or refresh-token reuse): log in again",
        ),
        Refusal::KeyExpired => ("key_expired", "the API key has expired"),
    };
    ApiError::custom(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        code,
        message,
        None,
    )
}

/// Route layer after [`authenticate`]: the request goes on if its principal has `scope`
/// (`admin` has every scope). Used as `middleware::from_fn_with_state(scope, require_scope)`.
///
/// # Errors
/// 403 `missing_scope` naming the scope ([`ApiError::missing_scope`]); 401 without a
/// principal (a route that skipped authentication).
pub(super) async fn require_scope(
    State(scope): State<Scope>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match req.extensions().get::<Principal>() {
        Some(p) if p.has(scope) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::missing_scope(scope)),
        None => Err(ApiError::unauthorized()),
    }
}

/// `stream` until `principal`'s credential is revoked (logout, key deletion), at this hub or
/// another: long-lived responses (SSE) of a revoked credential end within one revocation poll.
pub fn until_revoked<S>(
    state: &AppState,
    principal: Principal,
    stream: S,
) -> impl futures::Stream<Item = S::Item> + Send + 'static
where
    S: futures::Stream + Send + 'static,
{
    futures::StreamExt::take_until(stream, state.identity.revoked(principal))
}

/// 401 `invalid_node_key` of the node channel at `prefix` (e.g. `/distributed-server`): the
/// node key is missing or wrong, and how to send it.
pub fn node_key_refused(prefix: &str) -> ApiError {
    ApiError::custom(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_node_key",
        format!(
            "missing or wrong node key: connect to {prefix}/VCP_Key=<node key> or send \
             `Authorization: Bearer <node key>`"
        ),
        None,
    )
}

/// 401 `invalid_key` of the log channel at `prefix` (e.g. `/log`), which takes a node key or
/// an API key: the key is missing or neither, and how to send it.
pub fn log_key_refused(prefix: &str) -> ApiError {
    ApiError::custom(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_key",
        format!(
            "missing or wrong key: the log channel takes a node key or an API key; connect to \
             {prefix}/VCP_Key=<key> or send `Authorization: Bearer <key>`"
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn path_keys_are_the_two_prefixes_only() {
        assert_eq!(path_key("VCP_Key=abc"), Some("abc"));
        assert_eq!(path_key("ABP_Key=abc=d"), Some("abc=d"));
        assert_eq!(path_key("VCP_Key="), Some(""));
        assert_eq!(path_key("vcp_key=abc"), None);
        assert_eq!(path_key("garbage"), None);
        assert_eq!(path_key(""), None);
    }

    #[test]
    fn only_the_client_websocket_takes_a_query_token() {
        let req = |uri: &str| {
            Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .expect("a request")
        };
        assert_eq!(query_token(&req("/ws?token=abc")).as_deref(), Some("abc"));
        assert_eq!(
            query_token(&req("/ws?x=1&token=a%2Eb")).as_deref(),
            Some("a.b")
        );
        assert_eq!(query_token(&req("/ws?token=")), None);
        assert_eq!(query_token(&req("/ws?token=%zz")), None);
        assert_eq!(query_token(&req("/api/v1/tasks?token=abc")), None);
        assert_eq!(query_token(&req("/ws/x?token=abc")), None);
        // Request spans log the path only, never the query.
        assert_eq!(redact_path(req("/ws?token=abc").uri().path()), "/ws");
    }

    #[test]
    fn keys_match_exactly() {
        let keys = vec!["k-1".to_owned(), "k-2".to_owned()];
        assert!(key_matches(&keys, "k-2"));
        assert!(!key_matches(&keys, "k-"));
        assert!(!key_matches(&keys, "k-22"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "k-1"));
    }

    #[test]
    fn bearer_takes_the_token_of_the_bearer_scheme() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  tok "),
        );
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic tok"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn redaction_hides_every_spelling_of_a_path_key() {
        for (path, want) in [
            (
                "/distributed-server/VCP_Key=s3cret",
                "/distributed-server/VCP_Key=<redacted>",
            ),
            ("/log/ABP_Key=s3cret", "/log/ABP_Key=<redacted>"),
            ("/log/abp_key=s3cret", "/log/ABP_Key=<redacted>"),
            ("/x/VCP%5FKey=s3cret/y", "/x/VCP_Key=<redacted>/y"),
            ("/x/VCP_Key%3ds3cret", "/x/VCP_Key=<redacted>"),
            ("/x/VCP_Key=", "/x/VCP_Key=<redacted>"),
            (
                "/a/VCP_Key=one/b/ABP_Key=two",
                "/a/VCP_Key=<redacted>/b/ABP_Key=<redacted>",
            ),
        ] {
            assert_eq!(redact_path(path), want, "{path}");
        }
        for path in [
            "/",
            "",
            "/api/v1/tasks/abc",
            "/distributed-server/garbage",
            "/x/VCP_Ke",
            "/x/VCP_Key",
            "/x/%",
            "/x/%zz_Key=1",
            "/x/VCP_Key%3",
        ] {
            assert!(
                matches!(redact_path(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
    }
}
