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

use super::{ApiError, AppState, Pagination, Sort};
use crate::identity::NewKey;

#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    operation_id = "createKey",
    request_body = NewKey,
    responses(
        (status = 201, description = "The key; `key` is shown this once", body = crate::identity::CreatedKey),
        (status = 400, description = "Invalid `name`, `scopes`, `expires_at` or `rate_limit` (`error.param`)", body = super::error::ErrorBody),
        (status = 403, description = "`missing_scope`: needs `admin`", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
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
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Keys per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `created_at` or `name`; `-field` for descending (default `-created_at`, newest first).
    #[param(example = "name")]
    sort: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    operation_id = "listKeys",
    params(ListParams),
    responses(
        (status = 200, description = "One page of keys, never a secret", body = super::openapi::KeyList),
        (status = 400, description = "Invalid `page`, `limit` or `sort`", body = super::error::ErrorBody),
        (status = 403, description = "`missing_scope`: needs `admin`", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
/// `GET /v1/keys[?page&limit&sort]`: `{data: [key without secret], meta}`, newest first by
/// default (`sort`: `created_at` or `name`, `-` for descending; default limit 100).
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let pages = Pagination::new(q.page, q.limit, 100)?;
    let sort = Sort::parse(
        q.sort.as_deref(),
        &["created_at", "name"],
        Sort::NEWEST_FIRST,
    )?;
    let mut keys = state.identity.list_keys().await?;
    keys.sort_by(|a, b| {
        let o = match sort.field {
            "name" => a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)),
            _ => a
                .created_at
                .0
                .cmp(&b.created_at.0)
                .then_with(|| a.id.cmp(&b.id)),
        };
        if sort.descending { o.reverse() } else { o }
    });
    let page: Vec<_> = keys.iter().skip(pages.offset()).take(pages.limit).collect();
    Ok(pages.body(&page, keys.len()).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    operation_id = "deleteKey",
    params(("id" = String, Path, description = "Key id")),
    responses(
        (status = 200, description = "Revoked at every hub within about 250 ms", body = super::openapi::KeyDeleted),
        (status = 403, description = "`missing_scope`: needs `admin`", body = super::error::ErrorBody),
        (status = 404, description = "No such key", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
/// `DELETE /v1/keys/{id}`: 200 `{"id", "deleted": true}`; the key is refused from now on at
/// every hub (within about 250 ms elsewhere). 404 for an unknown id.
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.identity.delete_key(&id).await?;
    Ok(Json(json!({"id": id, "deleted": true})).into_response())
}
