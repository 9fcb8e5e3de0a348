//! The one error shape of every HTTP route: the OpenAI error object, so OpenAI SDKs parse it,
//! inside a superset that other clients read without knowing OpenAI's types:
//!
//! ```json
//! {"error": {"message": "…", "type": "invalid_request_error", "code": "invalid_request",
//!            "param": "email"},
//!  "detail": "…same message…", "category": "validation", "success": false}
//! ```
//!
//! - `error.type` and `error.code` are the OpenAI-style values each constructor sets (stable:
//!   clients and tests match on them); `error.param` names the field at fault, when there is one.
//! - `detail` is always `error.message`; `success` is always `false`.
//! - `category` is derived from the status in one place, [`Category::of`]; a 429 also carries a
//!   top-level `retry_after` (seconds) and a `Retry-After` header.
//!
//! Client errors are returned as they are. Internal errors ([`ApiError::internal`]) answer a
//! generic 500: their cause travels to [`shape`] inside the response (never in the body) and is
//! logged there once, with the request's `x-request-id`.
//!
//! [`shape`] is the router's safety net: any 4xx/5xx response not built by [`ApiError`] (axum's
//! own rejections, a library's plain-text 404) is rebuilt in this shape from its status, so no
//! route can answer an error in another form.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// What kind of failure an error is, for clients that branch on it rather than on the status
/// or the OpenAI `type`. Derived from the status by [`Category::of`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The request itself is wrong: 400, and every other 4xx without a category of its own
    /// (405, 408, 411, 413, 414, 415, 422, 431, …).
    Validation,
    /// 401: no credentials, or wrong ones.
    Auth,
    /// 403: the caller may not do this.
    Permission,
    /// 404 (and 410): no such route or resource.
    NotFound,
    /// 409: the request conflicts with the resource's state.
    Conflict,
    /// 429: too many requests; the body's `retry_after` says when to try again.
    RateLimit,
    /// 500, and every other 5xx not below (501, …): the hub failed; retrying may not help.
    Internal,
    /// 502, 503, 504: something the hub needs (the store, an upstream) is unavailable; retry
    /// later.
    Unavailable,
}

impl Category {
    /// The category of an error status (the one place it is decided).
    pub fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            401 => Self::Auth,
            403 => Self::Permission,
            404 | 410 => Self::NotFound,
            409 => Self::Conflict,
            429 => Self::RateLimit,
            502..=504 => Self::Unavailable,
            500..=599 => Self::Internal,
            // 400 and every other 4xx; a success status never reaches an error body.
            _ => Self::Validation,
        }
    }

    /// The wire name (`validation`, `auth`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::Auth => "auth",
            Self::Permission => "permission",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::RateLimit => "rate_limit",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The seconds a 429 tells clients to wait when its cause gives no time of its own (an
/// upstream's 429 relayed by the LLM gateway, or a 429 the safety net rebuilt).
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<String>,
    /// Seconds to wait before retrying (429).
    retry_after: Option<u64>,
    /// What few errors carry, boxed to keep `Result<_, ApiError>` small.
    more: Option<Box<More>>,
}

/// The rarer parts of an [`ApiError`].
#[derive(Debug, Default)]
struct More {
    /// Top-level fields older clients of one route read beside the common shape.
    extra: Option<Map<String, Value>>,
    /// An internal error's cause: logged by [`shape`], never sent.
    cause: Option<String>,
}

/// The body of every error response (OpenAPI schema `ErrorBody`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(
    example = json!({
        "error": {"message": "`tool` is required", "type": "invalid_request_error",
                  "code": "invalid_request", "param": "tool"},
        "detail": "`tool` is required", "category": "validation", "success": false
    })
)]
pub struct ErrorBody<'a> {
    /// The OpenAI error object.
    pub error: ErrorObject<'a>,
    /// The same text as `error.message`.
    pub detail: &'a str,
    /// The kind of failure, from the status.
    pub category: Category,
    /// Always `false`.
    #[schema(value_type = bool, example = false)]
    pub success: bool,
    /// Seconds to wait before retrying; on every 429 (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Fields some routes add for older clients (`/v1/interrupt`: `requestId`, `reason`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub extra: Option<&'a Map<String, Value>>,
}

/// The OpenAI error object inside [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject<'a> {
    /// What went wrong, for people (lowercase, no trailing period).
    pub message: &'a str,
    /// The OpenAI error type: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    #[schema(example = "invalid_request_error")]
    pub kind: &'a str,
    /// A stable machine code: `invalid_request`, `invalid_api_key`, `not_found`,
    /// `unknown_route`, `method_not_allowed`, `body_too_large`, `unsupported_media_type`,
    /// `conflict`, `forbidden`, `rate_limit_exceeded`, `store_unavailable`, `internal_error`,
    /// the LLM gateway's and the channels' codes, …
    #[schema(example = "invalid_request")]
    pub code: &'a str,
    /// The request field (body key, query or path parameter) at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<&'a str>,
}

/// Marks a response built by [`ApiError`], so [`shape`] leaves it as it is.
#[derive(Clone, Copy)]
struct Shaped;

/// Marks `resp` as already in its final shape, so [`shape`] leaves it as it is (the JSON-RPC
/// error bodies of `/mcp`, which MCP clients read).
pub fn keep_shape(resp: &mut Response) {
    resp.extensions_mut().insert(Shaped);
}

/// An internal error's cause, carried from [`ApiError::into_response`] to [`shape`] (which
/// removes it) in the response's extensions.
#[derive(Clone)]
struct InternalCause(String);

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            param: None,
            retry_after: None,
            more: None,
        }
    }

    /// 400 `invalid_request_error`, naming the parameter at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message.into(),
        );
        e.param = Some(param.into());
        e
    }

    /// 401: no credential, or one that is neither an API key nor a valid access token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or invalid credential: send `Authorization: Bearer <api key or access \
             token>`"
                .to_owned(),
        )
    }

    /// 403 `missing_scope`: the credential is valid but lacks `scope` for this route.
    pub fn missing_scope(scope: crate::principal::Scope) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "missing_scope",
            format!("this route needs the `{scope}` scope, which the credential lacks"),
        )
    }

    /// 404 for a resource.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "not_found",
            format!("{what} `{id}` not found"),
        )
    }

    /// 404 for an unknown route, naming `path` with any key-in-path segment redacted
    /// ([`super::auth::redact_path`]).
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "unknown_route",
            format!("no route for {}", super::auth::redact_path(path)),
        )
    }

    /// 405 for a known route and a wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed on this route".to_owned(),
        )
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "conflict",
            message.into(),
        )
    }

    /// 403: not allowed by the hub's policy.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "forbidden",
            message.into(),
        )
    }

    /// 429 `rate_limit_error` / `rate_limit_exceeded`: retry after `retry_after_secs` seconds
    /// (the body's `retry_after` and the `Retry-After` header).
    pub fn rate_limited(retry_after_secs: u64, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            message.into(),
        );
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// 503 `store_unavailable`: the task store cannot confirm writes; nothing was accepted.
    pub fn store_unavailable(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "store_unavailable",
            format!(
                "the task store is unavailable, the task was not accepted; retry later \
                 (with an idempotency_key to retry safely): {cause}"
            ),
        )
    }

    /// Any status with the given OpenAI `type` and `code` (the LLM routes map upstream
    /// failures this way). A 429 gets [`DEFAULT_RETRY_AFTER_SECS`]; a 500 never shows
    /// `message` (it is logged as the cause, as [`ApiError::internal`] does).
    pub fn custom(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
        param: Option<String>,
    ) -> Self {
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            return Self::internal(message.into());
        }
        let mut e = Self::new(status, kind, code, message.into());
        e.param = param;
        if status == StatusCode::TOO_MANY_REQUESTS {
            e.retry_after = Some(DEFAULT_RETRY_AFTER_SECS);
        }
        e
    }

    /// 500: the client sees a generic message; the cause is logged once, with the request id,
    /// when the response leaves the router ([`shape`]).
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal server error".to_owned(),
        );
        e.more.get_or_insert_default().cause = Some(cause.to_string());
        e
    }

    /// Adds a top-level field beside the common shape, for a route whose older clients read it
    /// (the shape's own keys cannot be replaced).
    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        if !matches!(
            key,
            "error" | "detail" | "category" | "success" | "retry_after"
        ) {
            self.more
                .get_or_insert_default()
                .extra
                .get_or_insert_with(Map::new)
                .insert(key.to_owned(), value.into());
        }
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The error for a 4xx/5xx response that no [`ApiError`] built: its status with a code
    /// of its own, and `text` (the response's plain-text body, e.g. an axum rejection's) as the
    /// message of a client error or the logged cause of a server error.
    pub fn from_status(status: StatusCode, text: &str) -> Self {
        let text = text.trim();
        let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
        let message = if text.is_empty() {
            reason
        } else {
            text.to_owned()
        };
        match status.as_u16() {
            400 | 422 => Self::new(status, "invalid_request_error", "invalid_request", message),
            401 => Self::new(status, "authentication_error", "unauthorized", message),
            403 => Self::forbidden(message),
            404 | 410 => Self::new(status, "not_found_error", "not_found", message),
            405 => Self::method_not_allowed(),
            409 => Self::conflict(message),
            413 => Self::new(status, "invalid_request_error", "body_too_large", message),
            415 => Self::new(
                status,
                "invalid_request_error",
                "unsupported_media_type",
                message,
            ),
            429 => Self::rate_limited(DEFAULT_RETRY_AFTER_SECS, message),
            400..=499 => Self::new(status, "invalid_request_error", "invalid_request", message),
            502..=504 => {
                let mut e = Self::new(
                    status,
                    "server_error",
                    "unavailable",
                    format!(
                        "{}: retry later",
                        status
                            .canonical_reason()
                            .unwrap_or("unavailable")
                            .to_lowercase()
                    ),
                );
                e.more.get_or_insert_default().cause = Some(message);
                e
            }
            _ => {
                let mut e = Self::internal(message);
                e.status = status;
                e
            }
        }
    }

    /// The body this error is sent as.
    /// The error shape as JSON (the `data` of a WebSocket `error` frame).
    pub fn body_json(&self) -> Value {
        serde_json::to_value(self.body()).unwrap_or(Value::Null)
    }

    fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                code: self.code,
                param: self.param.as_deref(),
            },
            detail: &self.message,
            category: Category::of(self.status),
            success: false,
            retry_after: self.retry_after,
            extra: self.more.as_ref().and_then(|m| m.extra.as_ref()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(Shaped);
        if let Some(cause) = self.more.and_then(|m| m.cause) {
            resp.extensions_mut().insert(InternalCause(cause));
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let mut e = ApiError::invalid("body", r.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.status = status;
            e.code = "body_too_large";
        } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            e.status = status;
            e.code = "unsupported_media_type";
        }
        e
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let mut e = ApiError::invalid("body", r.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.status = status;
            e.code = "body_too_large";
        }
        e
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid("query", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::invalid("path", r.body_text())
    }
}

/// Largest error body [`shape`] reads to rebuild it (rejection texts are one line).
const MAX_FOREIGN_BODY: usize = 16 * 1024;

/// Middleware of every router: a 4xx/5xx response not built by [`ApiError`] is rebuilt in its
/// shape ([`ApiError::from_status`], keeping `Allow` and `WWW-Authenticate`), and an internal
/// error's cause is logged here, once, with the request id (`x-request-id`), method and route.
/// Other 5xx answers are logged at WARN with their code.
pub async fn shape(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let mut resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    if resp.extensions().get::<Shaped>().is_none() {
        resp = reshape(resp).await;
    }
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    if let Some(InternalCause(cause)) = resp.extensions_mut().remove::<InternalCause>() {
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(request_id, %method, route, %cause, "internal error");
        } else {
            tracing::warn!(request_id, %method, route, status = status.as_u16(), %cause,
                "request failed");
        }
    } else if status.is_server_error() {
        tracing::warn!(request_id, %method, route, status = status.as_u16(), "request failed");
    }
    resp
}

/// Rebuilds a foreign error response in the one shape.
async fn reshape(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_FOREIGN_BODY).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    // A JSON body of another shape is not a message to show.
    let text = if text.trim_start().starts_with(['{', '[']) {
        String::new()
    } else {
        text
    };
    let mut out = ApiError::from_status(parts.status, &text).into_response();
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Whether `body` is an [`ErrorBody`] as [`ApiError`] writes it (tests and the drift check).
pub fn is_error_body(body: &Value) -> bool {
    let e = &body["error"];
    e["message"].is_string()
        && e["type"].is_string()
        && e["code"].is_string()
        && body["detail"] == e["message"]
        && body["category"].is_string()
        && body["success"] == Value::Bool(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::Router;
    use axum::routing::get;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;

    async fn body_of(resp: Response) -> (StatusCode, axum::http::HeaderMap, Value) {
        let status = resp.status();
        let headers = resp.headers().clone();
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn category_follows_the_status() {
        let cases = [
            (400, Category::Validation),
            (405, Category::Validation),
            (408, Category::Validation),
            (413, Category::Validation),
            (415, Category::Validation),
            (422, Category::Validation),
            (401, Category::Auth),
            (403, Category::Permission),
            (404, Category::NotFound),
            (410, Category::NotFound),
            (409, Category::Conflict),
            (429, Category::RateLimit),
            (500, Category::Internal),
            (501, Category::Internal),
            (502, Category::Unavailable),
            (503, Category::Unavailable),
            (504, Category::Unavailable),
        ];
        for (code, want) in cases {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(Category::of(status), want, "{code}");
            assert_eq!(
                serde_json::to_value(want).unwrap(),
                json!(want.as_str()),
                "{code}"
            );
        }
    }

    #[tokio::test]
    async fn every_constructor_writes_the_superset() {
        let cases = [
            (ApiError::invalid("email", "bad email"), 400, "validation"),
            (ApiError::unauthorized(), 401, "auth"),
            (ApiError::forbidden("no"), 403, "permission"),
            (ApiError::not_found("task", "t-1"), 404, "not_found"),
            (ApiError::no_route("/x"), 404, "not_found"),
            (ApiError::method_not_allowed(), 405, "validation"),
            (ApiError::conflict("ended"), 409, "conflict"),
            (ApiError::rate_limited(7, "slow down"), 429, "rate_limit"),
            (ApiError::internal("disk on fire"), 500, "internal"),
            (
                ApiError::store_unavailable("redis down"),
                503,
                "unavailable",
            ),
        ];
        for (e, status, category) in cases {
            let (got, _, v) = body_of(e.into_response()).await;
            assert_eq!(got.as_u16(), status, "{v}");
            assert!(is_error_body(&v), "{v}");
            assert_eq!(v["category"], category, "{v}");
        }
    }

    #[tokio::test]
    async fn invalid_names_the_param() {
        let (_, _, v) =
            body_of(ApiError::invalid("email", "`email` is not an address").into_response()).await;
        assert_eq!(
            v,
            json!({
                "error": {"message": "`email` is not an address", "type": "invalid_request_error",
                          "code": "invalid_request", "param": "email"},
                "detail": "`email` is not an address",
                "category": "validation",
                "success": false,
            })
        );
    }

    #[tokio::test]
    async fn rate_limited_says_when_to_retry() {
        let (status, headers, v) =
            body_of(ApiError::rate_limited(30, "too many requests").into_response()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["retry_after"], 30);
        assert_eq!(v["category"], "rate_limit");
        assert_eq!(headers[header::RETRY_AFTER], "30");
        // A relayed 429 without a time of its own still says one.
        let e = ApiError::custom(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            "upstream said no",
            None,
        );
        let (_, _, v) = body_of(e.into_response()).await;
        assert_eq!(v["retry_after"], DEFAULT_RETRY_AFTER_SECS);
    }

    #[tokio::test]
    async fn internal_errors_never_show_their_cause() {
        let resp = ApiError::internal("secret path /etc/shadow").into_response();
        assert!(resp.extensions().get::<InternalCause>().is_some());
        let (_, _, v) = body_of(resp).await;
        assert!(!v.to_string().contains("shadow"), "{v}");
        assert_eq!(v["error"]["code"], "internal_error");
        let e = ApiError::custom(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "x",
            "secret",
            None,
        );
        let (_, _, v) = body_of(e.into_response()).await;
        assert!(!v.to_string().contains("secret"), "{v}");
    }

    #[tokio::test]
    async fn extra_fields_sit_beside_the_shape_and_cannot_replace_it() {
        let e = ApiError::not_found("request", "r-1")
            .with_field("requestId", "r-1")
            .with_field("success", true);
        let (_, _, v) = body_of(e.into_response()).await;
        assert_eq!(v["requestId"], "r-1");
        assert_eq!(v["success"], false);
        assert!(is_error_body(&v), "{v}");
    }

    #[tokio::test]
    async fn the_safety_net_reshapes_foreign_errors() {
        let app = Router::new()
            .route(
                "/plain",
                get(|| async { (StatusCode::BAD_REQUEST, "Failed to parse the thing") }),
            )
            .route("/empty", get(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/boom",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "db password is hunter2") }),
            )
            .route(
                "/gateway",
                get(|| async { (StatusCode::BAD_GATEWAY, "upstream 10.0.0.1 refused") }),
            )
            .route("/ok", get(|| async { "fine" }))
            .layer(axum::middleware::from_fn(shape));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                let req = Request::builder()
                    .uri(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                app.oneshot(req).await.unwrap()
            }
        };
        let (s, _, v) = body_of(call("/plain").await).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(is_error_body(&v), "{v}");
        assert_eq!(v["error"]["message"], "Failed to parse the thing");
        assert_eq!(v["category"], "validation");
        let (s, _, v) = body_of(call("/empty").await).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["detail"], "not found");
        let (s, _, v) = body_of(call("/boom").await).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!v.to_string().contains("hunter2"), "{v}");
        assert_eq!(v["category"], "internal");
        let (s, _, v) = body_of(call("/gateway").await).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        assert!(!v.to_string().contains("10.0.0.1"), "{v}");
        assert_eq!(v["category"], "unavailable");
        let resp = call("/ok").await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// A `MakeWriter` into a shared buffer, to read what was logged.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_internal_cause_is_logged_once_with_the_request_id() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route(
                "/fail",
                get(|| async { ApiError::internal("cause-xyz: the disk is gone") }),
            )
            .layer(axum::middleware::from_fn(shape));
        let req = Request::builder()
            .uri("/fail")
            .header("x-request-id", "req-123")
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, _, v) = body_of(app.oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!v.to_string().contains("cause-xyz"), "{v}");
        let text = String::from_utf8(logs.0.lock().clone()).unwrap();
        assert_eq!(text.matches("cause-xyz").count(), 1, "{text}");
        let line = text.lines().find(|l| l.contains("cause-xyz")).unwrap();
        assert!(line.contains("req-123") && line.contains("/fail"), "{line}");
    }
}
