//! `/v1/nodes`: the node registry as operators see it.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, AppState, Pagination};

/// Query of `GET /v1/nodes`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    tool: Option<String>,
    page: Option<usize>,
    limit: Option<usize>,
}

/// `GET /v1/nodes?status=&tool=&page=&limit=`: `{"data": [node, ...], "meta": {...}}`, by id.
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let pages = Pagination::new(q.page, q.limit, 100)?;
    let all: Vec<_> = state
        .cluster
        .nodes()
        .into_iter()
        .filter(|n| {
            q.status.as_deref().is_none_or(|s| n.status.as_str() == s)
                && q.tool
                    .as_deref()
                    .is_none_or(|t| n.tools.iter().any(|x| x == t))
        })
        .collect();
    let total = all.len();
    let data: Vec<_> = all
        .into_iter()
        .skip(pages.offset())
        .take(pages.limit)
        .collect();
    Ok(pages.body(&data, total).into_response())
}

/// `GET /v1/nodes/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .cluster
        .node(&id)
        .map(|n| Json(n).into_response())
        .ok_or_else(|| ApiError::not_found("node", &id))
}
