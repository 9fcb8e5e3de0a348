//! `/v1/config` (and `/api/admin/config`): read the configuration in force (secrets redacted),
//! change its hot-reloadable keys, or re-read the file the hub was started with.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::ops::live::{ChangeError, HOT_RELOADABLE};

fn change_error(e: ChangeError) -> ApiError {
    match e {
        ChangeError::Field { field, reason } => {
            ApiError::invalid(field.clone(), format!("`{field}`: {reason}"))
        }
        ChangeError::NoSource(m) => ApiError::conflict(m),
    }
}

fn answer(state: &AppState, changed: Vec<String>) -> Response {
    Json(json!({
        "changed": changed,
        "config": state.ops.live.redacted(),
        "hot_reloadable": HOT_RELOADABLE,
    }))
    .into_response()
}

/// Read the configuration.
///
/// `GET /v1/config`: `{"config": {...every key...}, "hot_reloadable": [...]}`; `api_keys` and
/// `node_keys` entries read `<redacted>`.
#[utoipa::path(
    get,
    path = "/v1/config",
    tag = "config",
    operation_id = "getConfig",
    responses((status = 200, description = "The configuration in force, secrets redacted", body = super::openapi::ConfigView)),
    security(("bearer" = []))
)]
pub async fn get(State(state): State<AppState>) -> Response {
    Json(json!({
        "config": state.ops.live.redacted(),
        "hot_reloadable": HOT_RELOADABLE,
    }))
    .into_response()
}

/// Change hot-reloadable keys.
///
/// `PUT /v1/config`: a JSON object of keys to change (a whole `GET` body's `config`, edited,
/// works too: unchanged keys and `<redacted>` secrets are ignored). Applied all or nothing;
/// 200 `{"changed": [keys], "config", "hot_reloadable"}`, or 400 naming the first key that is
/// unknown, invalid, or cannot change while the hub runs.
#[utoipa::path(
    put,
    path = "/v1/config",
    tag = "config",
    operation_id = "putConfig",
    request_body(content = Object, description = "Keys to change (or a whole `GET` body, edited)", example = json!({"log_level": "debug"})),
    responses(
        (status = 200, description = "Applied: the keys changed and the configuration now", body = super::openapi::ConfigChanged),
        (status = 400, description = "A key is unknown, invalid or not hot-reloadable (`error.param` names it)", body = super::error::ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = super::error::ErrorBody),
        (status = 415, description = "Body is not `application/json`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    // Accept both `{keys...}` and the `GET` shape `{"config": {keys...}}`.
    let patch = match body.get("config") {
        Some(inner @ Value::Object(_)) if body.as_object().is_some_and(|m| m.len() <= 2) => {
            inner.clone()
        }
        _ => body,
    };
    let changed = state.ops.live.patch(&patch).map_err(change_error)?;
    Ok(answer(&state, changed))
}

/// Re-read the config file.
///
/// `POST /v1/config/reload`: re-reads the config file, `APEX_*` variables and flags the hub was
/// started with and applies them like `PUT`. 409 if the hub was started without `--config`.
#[utoipa::path(
    post,
    path = "/v1/config/reload",
    tag = "config",
    operation_id = "reloadConfig",
    responses(
        (status = 200, description = "Re-read and applied", body = super::openapi::ConfigChanged),
        (status = 400, description = "The new configuration is invalid or changes a key that is not hot-reloadable", body = super::error::ErrorBody),
        (status = 409, description = "The hub was started without `--config`", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn reload(State(state): State<AppState>) -> Result<Response, ApiError> {
    let changed = state.ops.live.reload().map_err(change_error)?;
    Ok(answer(&state, changed))
}
