//! `/api/agents/profiles…`: the caller's agent profiles (list, defaults, init-defaults,
//! create, get, partial update, delete, clone, test), mapped to [`crate::agents::Agents`].

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::agents::{AgentProfile, AgentTemplate, Error, ProfileFields, TestResult};
use crate::principal::Principal;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { param, message } => ApiError::invalid(param, message),
            Error::NotFound(id) => ApiError::not_found("agent profile", &id),
            Error::Forbidden(message) => ApiError::forbidden(message),
            e @ Error::Conflict(_) => ApiError::conflict(e.to_string()),
            e @ Error::NoRunner => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_agent_runner",
                e.to_string(),
                None,
            ),
            e @ Error::RunFailed(_) => ApiError::custom(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "agent_run_failed",
                e.to_string(),
                None,
            ),
            Error::Tasks(e) => e.into(),
            Error::Store(e) => ApiError::store_unavailable(e),
        }
    }
}

/// Query of `GET /api/agents/profiles`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this cluster: `reasoning`, `information`, `production` or `coordination`.
    cluster: Option<String>,
    /// Only enabled (`true`) or disabled (`false`) profiles.
    is_enabled: Option<bool>,
}

/// `GET /api/agents/profiles`.
#[derive(Serialize, ToSchema)]
pub struct ProfileList {
    /// The profiles: defaults in template order, then custom ones oldest first.
    profiles: Vec<AgentProfile>,
    /// How many.
    total: usize,
}

/// `GET /api/agents/profiles/defaults`.
#[derive(Serialize, ToSchema)]
pub struct TemplateList {
    /// The 14 default templates.
    agents: Vec<AgentTemplate>,
}

/// `POST /api/agents/profiles/init-defaults`.
#[derive(Serialize, ToSchema)]
pub struct InitDefaults {
    /// `Default agents initialized`.
    message: &'static str,
    /// Defaults stored by this call (14 the first time, 0 after).
    created_count: usize,
}

/// Body of `POST /api/agents/profiles/{id}/test`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// What the agent should do, 1 to 20000 characters.
    task: String,
}

/// List agent profiles.
///
/// `GET /api/agents/profiles?cluster=&is_enabled=`: the caller's profiles (admins: everyone's),
/// `{"profiles": [...], "total"}`.
#[utoipa::path(
    get,
    path = "/api/agents/profiles",
    tag = "agents",
    operation_id = "listAgentProfiles",
    params(ListParams),
    responses(
        (status = 200, description = "The profiles", body = ProfileList),
        (status = 400, description = "Invalid `cluster` or `is_enabled`", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let profiles = state
        .agents
        .list(&caller, q.cluster.as_deref(), q.is_enabled)
        .await?;
    let total = profiles.len();
    Ok(Json(ProfileList { profiles, total }).into_response())
}

/// The default agent templates.
///
/// `GET /api/agents/profiles/defaults`: the 14 templates (not stored), `{"agents": [...]}`.
#[utoipa::path(
    get,
    path = "/api/agents/profiles/defaults",
    tag = "agents",
    operation_id = "listAgentDefaults",
    responses((status = 200, description = "The 14 default templates", body = TemplateList)),
    security(("bearer" = []))
)]
pub async fn defaults(State(state): State<AppState>) -> Response {
    Json(TemplateList {
        agents: state.agents.defaults(),
    })
    .into_response()
}

/// Store the default agents.
///
/// `POST /api/agents/profiles/init-defaults`: stores the default profiles the caller lacks;
/// `{"message": "Default agents initialized", "created_count"}` (14, then 0).
#[utoipa::path(
    post,
    path = "/api/agents/profiles/init-defaults",
    tag = "agents",
    operation_id = "initAgentDefaults",
    responses(
        (status = 200, description = "How many defaults were stored", body = InitDefaults),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn init_defaults(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
) -> Result<Response, ApiError> {
    let created_count = state.agents.init_defaults(&caller).await?;
    Ok(Json(InitDefaults {
        message: "Default agents initialized",
        created_count,
    })
    .into_response())
}

/// Create a custom agent profile.
///
/// `POST /api/agents/profiles`: 201 with the profile (`is_custom: true`).
#[utoipa::path(
    post,
    path = "/api/agents/profiles",
    tag = "agents",
    operation_id = "createAgentProfile",
    request_body = ProfileFields,
    responses(
        (status = 201, description = "The profile, stored", body = AgentProfile),
        (status = 400, description = "Invalid body (`error.param` names the field)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    body: Result<Json<ProfileFields>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(fields) = body?;
    let p = state.agents.create(&caller, fields).await?;
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

/// Get an agent profile.
#[utoipa::path(
    get,
    path = "/api/agents/profiles/{id}",
    tag = "agents",
    operation_id = "getAgentProfile",
    params(("id" = String, Path, description = "Profile id")),
    responses(
        (status = 200, description = "The profile", body = AgentProfile),
        (status = 404, description = "No such profile (or another owner's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.agents.get(&caller, &id).await?).into_response())
}

/// Update an agent profile.
///
/// `PUT /api/agents/profiles/{id}`: a partial update; the fields given replace the stored
/// ones (`id`, `user_id`, `is_custom`, `created_at`, `updated_at` are ignored).
#[utoipa::path(
    put,
    path = "/api/agents/profiles/{id}",
    tag = "agents",
    operation_id = "updateAgentProfile",
    params(("id" = String, Path, description = "Profile id")),
    request_body = ProfileFields,
    responses(
        (status = 200, description = "The updated profile", body = AgentProfile),
        (status = 400, description = "Invalid body (`error.param` names the field)", body = ErrorBody),
        (status = 404, description = "No such profile (or another owner's)", body = ErrorBody),
        (status = 409, description = "Concurrent updates kept replacing it; retry", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<ProfileFields>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(fields) = body?;
    Ok(Json(state.agents.update(&caller, &id, fields).await?).into_response())
}

/// Delete a custom agent profile.
///
/// `DELETE /api/agents/profiles/{id}`: `{"message": "Agent profile deleted"}`; a default
/// profile answers 403 (disable it instead).
#[utoipa::path(
    delete,
    path = "/api/agents/profiles/{id}",
    tag = "agents",
    operation_id = "deleteAgentProfile",
    params(("id" = String, Path, description = "Profile id")),
    responses(
        (status = 200, description = "`{\"message\": \"Agent profile deleted\"}`"),
        (status = 403, description = "`Cannot delete default agents`", body = ErrorBody),
        (status = 404, description = "No such profile (or another owner's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.agents.delete(&caller, &id).await?;
    Ok(Json(json!({"message": "Agent profile deleted"})).into_response())
}

/// Clone an agent profile.
///
/// `POST /api/agents/profiles/{id}/clone`: 201 with a custom copy whose `display_name` ends
/// ` (Clone)`.
#[utoipa::path(
    post,
    path = "/api/agents/profiles/{id}/clone",
    tag = "agents",
    operation_id = "cloneAgentProfile",
    params(("id" = String, Path, description = "Profile id")),
    responses(
        (status = 201, description = "The copy", body = AgentProfile),
        (status = 404, description = "No such profile (or another owner's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn clone(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = state.agents.clone_profile(&caller, &id).await?;
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

/// Test an agent.
///
/// `POST /api/agents/profiles/{id}/test` `{"task"}`: runs the profile once (an `agent.run`
/// task of the caller on a node, through the hub's LLM gateway) and answers
/// `{agent_id, agent_type, task, result, tokens_used, duration_ms, model_used}`. Rate limited
/// as class `test` (`rate_limits.test_per_minute`).
#[utoipa::path(
    post,
    path = "/api/agents/profiles/{id}/test",
    tag = "agents",
    operation_id = "testAgentProfile",
    params(("id" = String, Path, description = "Profile id")),
    request_body = TestRequest,
    responses(
        (status = 200, description = "The agent's answer", body = TestResult),
        (status = 400, description = "Invalid `task`", body = ErrorBody),
        (status = 404, description = "No such profile (or another owner's)", body = ErrorBody),
        (status = 429, description = "Too many tests (`test_per_minute`)", body = ErrorBody),
        (status = 502, description = "`agent_run_failed`: the model (and its fallback) failed", body = ErrorBody),
        (status = 503, description = "`no_agent_runner`: no online node offers `agent.run`; or the store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn test(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<TestRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let r = state.agents.test(&caller, &id, &req.task).await?;
    Ok(Json(r).into_response())
}
