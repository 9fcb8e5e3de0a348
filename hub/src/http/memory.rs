//! `/api/v1/memory…` (memory search, [`crate::memory::Memory`]) and `POST /v1/embeddings`
//! ([`super::embeddings`]); all with the `chat` scope.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ErrorBody;
use super::{ApiError, AppState, needs};
use crate::memory::{Error, MemoryHit, Query};
use crate::principal::{Principal, Scope};

/// The routes of this module, merged into the authenticated API.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/embeddings",
            needs(Scope::Chat, post(super::embeddings::create)),
        )
        .route("/api/v1/memory/query", needs(Scope::Chat, post(query)))
        .route("/api/v1/memory", needs(Scope::Chat, post(save)))
        .route("/api/v1/memory/{id}", needs(Scope::Chat, delete(remove)))
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { param, message } => ApiError::invalid(param, message),
            Error::NotFound(id) => ApiError::not_found("memory", &id),
            Error::Disabled => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "memory_disabled",
                e.to_string(),
                None,
            ),
            Error::Store(e) => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "store_unavailable",
                format!("the memory store is unavailable: {e}"),
                None,
            ),
            Error::Index(e) => ApiError::internal(e),
        }
    }
}

fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    Ok(v)
}

/// `since`: RFC 3339, or Unix seconds.
fn since_ms(v: &Value) -> Result<Option<i64>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "since",
            "`since` must be an RFC 3339 time (2026-01-31T12:00:00Z) or Unix seconds",
        )
    };
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s).map_err(|_| bad())?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| bad())?
                .as_millis();
            Ok(Some(i64::try_from(ms).map_err(|_| bad())?))
        }
        Value::Number(n) => {
            let secs = n
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(bad)?;
            Ok(Some((secs * 1000.0) as i64))
        }
        _ => Err(bad()),
    }
}

/// Search memory.
///
/// `POST /api/v1/memory/query {query, session_id?, limit?, since?}`: the caller's conversation
/// messages and saved memories matching any word of `query` (BM25; hybrid with embeddings when
/// `memory.embedding_model` is set), best first. Never another user's.
#[utoipa::path(
    post,
    path = "/api/v1/memory/query",
    tag = "memory",
    operation_id = "queryMemory",
    request_body = schemas::MemoryQuery,
    responses(
        (status = 200, description = "The results, best first", body = schemas::MemoryResults),
        (status = 400, description = "Invalid request (`param` names the field)", body = ErrorBody),
        (status = 503, description = "`memory_disabled` (`memory.enabled = false`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn query(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(body)?;
    let text = match v.get("query") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(ApiError::invalid(
                "query",
                "`query` is required and must be a string",
            ));
        }
    };
    let session_id = match v.get("session_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "session_id",
                "`session_id` must be a string",
            ));
        }
    };
    let limit = match v.get("limit") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| ApiError::invalid("limit", "`limit` must be 1 to 100"))?,
        ),
    };
    let q = Query {
        query: text,
        session_id,
        limit,
        since_ms: since_ms(v.get("since").unwrap_or(&Value::Null))?,
    };
    let results: Vec<MemoryHit> = state.memory.query(&principal, &q).await?;
    Ok(Json(json!({"query": q.query, "results": results})).into_response())
}

#[derive(Deserialize)]
struct SaveBody {
    content: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// Save a memory.
///
/// `POST /api/v1/memory {content, tags?}` → 201 with the saved item; searchable at this hub
/// when the answer comes (at other hubs within one poll, 250 ms).
#[utoipa::path(
    post,
    path = "/api/v1/memory",
    tag = "memory",
    operation_id = "saveMemory",
    request_body = schemas::MemorySave,
    responses(
        (status = 201, description = "The saved memory", body = schemas::MemoryItem),
        (status = 400, description = "Invalid request (`param` names the field)", body = ErrorBody),
        (status = 503, description = "`memory_disabled`, or `store_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn save(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(body)?;
    if !v.get("content").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(
            "content",
            "`content` is required and must be a string",
        ));
    }
    let b: SaveBody = serde_json::from_value(v)
        .map_err(|_| ApiError::invalid("tags", "`tags` must be an array of strings"))?;
    let m = state.memory.save(&principal, b.content, b.tags).await?;
    let item = json!({
        "id": m.id,
        "content": m.content,
        "tags": m.tags,
        "session_id": null,
        "role": "memory",
        "timestamp": crate::chat::rfc3339(m.created_at_ms),
    });
    Ok((StatusCode::CREATED, Json(item)).into_response())
}

/// Delete a saved memory.
///
/// `DELETE /api/v1/memory/{id}`: the caller's memory (another user's reads as absent: 404).
/// Gone from this hub's results when the answer comes, from other hubs' within one poll.
#[utoipa::path(
    delete,
    path = "/api/v1/memory/{id}",
    tag = "memory",
    operation_id = "deleteMemory",
    params(("id" = String, Path, description = "The memory's id (`mem_…`)")),
    responses(
        (status = 200, description = "Deleted", body = super::openapi::Message),
        (status = 404, description = "The caller has no memory by that id", body = ErrorBody),
        (status = 503, description = "`memory_disabled`, or `store_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn remove(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.memory.delete(&principal, &id).await?;
    Ok(Json(json!({
        "status": "success",
        "message": format!("memory {id} deleted"),
        "id": id,
    }))
    .into_response())
}

/// The schema-only types of the memory routes (never built; they mirror the handlers' `json!`).
#[allow(dead_code)]
pub mod schemas {
    use utoipa::ToSchema;

    /// `POST /api/v1/memory/query`.
    #[derive(ToSchema)]
    #[schema(example = json!({"query": "budget meeting", "limit": 5}))]
    pub struct MemoryQuery {
        /// The words to find (any may match; CJK text by characters and pairs).
        pub query: String,
        /// Only this session's messages.
        pub session_id: Option<String>,
        /// Most results, 1 to 100 (default 10).
        pub limit: Option<u32>,
        /// Only what was said or saved at or after this time: RFC 3339, or Unix seconds.
        #[schema(value_type = Option<Object>)]
        pub since: Option<String>,
    }

    /// The answer of `POST /api/v1/memory/query`.
    #[derive(ToSchema)]
    pub struct MemoryResults {
        /// The query as sent.
        pub query: String,
        /// Best first.
        pub results: Vec<crate::memory::MemoryHit>,
    }

    /// `POST /api/v1/memory`.
    #[derive(ToSchema)]
    #[schema(example = json!({"content": "my locker code is 4711", "tags": ["personal"]}))]
    pub struct MemorySave {
        /// The text (1 to 100000 bytes).
        pub content: String,
        /// Up to 32 tags of 1 to 64 bytes (searchable too).
        pub tags: Option<Vec<String>>,
    }

    /// A saved memory.
    #[derive(ToSchema)]
    pub struct MemoryItem {
        /// `mem_<uuid>`.
        pub id: String,
        /// The text.
        pub content: String,
        /// Its tags.
        pub tags: Vec<String>,
        /// Always null (a saved memory belongs to no session).
        pub session_id: Option<String>,
        /// `memory`.
        pub role: String,
        /// When it was saved, RFC 3339.
        pub timestamp: String,
    }
}
