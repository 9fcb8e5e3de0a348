//! `/v1/keys`: managed API keys (the `admin` scope): create (the key shown once), list
//! (never a secret), delete (revoked at every hub within about 250 ms). The logic is in
//! [`crate::identity::keys`].

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, Pagination};
use crate::identity::NewKey;

/// `POST /v1/keys {name, scopes, expires_at?, rate_limit?}`: 201 with
/// `{id, name, scopes, expires_at, rate_limit, created_at, key}`, the only time `key`
/// (`apex_<id>_<secret>`) is shown. 400 naming `name`, `scopes` (none, or an unknown one),
/// `expires_at` (not RFC 3339 UTC, or past) or `rate_limit`.
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<NewKey>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let created = state.identity.create_key(new).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Query of `GET /v1/keys`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    page: Option<usize>,
    limit: Option<usize>,
}

/// `GET /v1/keys[?page&limit]`: `{data: [key without secret], meta}`, newest first
/// (default limit 100).
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let pages = Pagination::new(q.page, q.limit, 100)?;
    let keys = state.identity.list_keys().await?;
    let page: Vec<_> = keys.iter().skip(pages.offset()).take(pages.limit).collect();
    Ok(pages.body(&page, keys.len()).into_response())
}

/// `DELETE /v1/keys/{id}`: 200 `{"id", "deleted": true}`; the key is refused from now on at
/// every hub (within about 250 ms elsewhere). 404 for an unknown id.
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.identity.delete_key(&id).await?;
    Ok(Json(json!({"id": id, "deleted": true})).into_response())
}
