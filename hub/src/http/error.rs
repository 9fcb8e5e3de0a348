//! The one error shape of every HTTP route: the OpenAI error object
//! `{"error": {"message", "type", "code", "param"?}}`, so OpenAI SDKs parse it; a 429 of the
//! rate limits adds a top-level `retry_after` (seconds) and the `Retry-After` header.
//!
//! Client errors are returned as they are; internal errors become a generic 500 whose cause is
//! logged once here.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<String>,
    /// Seconds until a refused request may be retried (429): the body's top-level
    /// `retry_after` and the `Retry-After` header.
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the parameter at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_request",
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: "invalid_api_key",
            message: "missing or invalid API key: send `Authorization: Bearer <api key>`"
                .to_owned(),
            param: None,
            retry_after: None,
        }
    }

    /// 404 for a resource.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: "not_found",
            message: format!("{what} `{id}` not found"),
            param: None,
            retry_after: None,
        }
    }

    /// 404 for an unknown route, naming `path` with any key-in-path segment redacted
    /// ([`super::auth::redact_path`]).
    pub fn no_route(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: "unknown_route",
            message: format!("no route for {}", super::auth::redact_path(path)),
            param: None,
            retry_after: None,
        }
    }

    /// 405 for a known route and a wrong method.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "invalid_request_error",
            code: "method_not_allowed",
            message: "method not allowed on this route".to_owned(),
            param: None,
            retry_after: None,
        }
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            code: "conflict",
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 403: not allowed by the hub's policy.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: "forbidden",
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 503 `store_unavailable`: the task store cannot confirm writes; nothing was accepted.
    pub fn store_unavailable(cause: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "store_unavailable",
            message: format!(
                "the task store is unavailable, the task was not accepted; retry later \
                 (with an idempotency_key to retry safely): {cause}"
            ),
            param: None,
            retry_after: None,
        }
    }

    /// Any status with the given OpenAI `type` and `code` (the LLM routes map upstream
    /// failures this way).
    pub fn custom(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
        param: Option<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param,
            retry_after: None,
        }
    }

    /// 429 `rate_limit_exceeded` (type `rate_limit_error`): the caller is over a rate limit and
    /// may retry in `retry_after_secs` seconds, given as the `Retry-After` header and as the
    /// body's top-level `retry_after`.
    pub fn rate_limited(retry_after_secs: u64, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: "rate_limit_exceeded",
            message: message.into(),
            param: None,
            retry_after: Some(retry_after_secs),
        }
    }

    /// 500: the cause is logged here, the client sees a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: "internal_error",
            message: "internal server error".to_owned(),
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                code: self.code,
                param: self.param.as_deref(),
            },
            retry_after: self.retry_after,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
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

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid("query", r.body_text())
    }
}
