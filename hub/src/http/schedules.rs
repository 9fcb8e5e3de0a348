//! `/api/v1/schedules`: create, list, get and delete the caller's schedules, mapped to
//! [`crate::schedules::Schedules`] (which stores them and fires them at every hub, once).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::tasks::TaskRequest;
use super::{ApiError, AppState, Pagination};
use crate::principal::Principal;
use crate::schedules::{Action, Error, NewSchedule, ScheduleView, When};

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { param, message } => ApiError::invalid(param, message),
            Error::NotFound(id) => ApiError::not_found("schedule", &id),
            Error::Store(e) => ApiError::store_unavailable(e),
        }
    }
}

/// The notification a schedule sends.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NotificationRequest {
    /// 1 to 256 characters.
    title: String,
    /// At most 4096 characters (default empty).
    #[serde(default)]
    body: String,
}

/// Body of `POST /api/v1/schedules`: exactly one of `cron` and `run_at`, exactly one of
/// `task` and `notification`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "nightly report", "cron": "0 3 * * *", "timezone": "Europe/Paris",
    "task": {"tool": "echo", "args": {"text": "report"}}}))]
pub struct ScheduleRequest {
    /// A label, 1 to 256 characters.
    name: Option<String>,
    /// A cron expression: 5 fields (`min hour day month weekday`) or 6 with seconds first
    /// (`*/10 * * * * *`), read in `timezone`.
    cron: Option<String>,
    /// One RFC 3339 time (`2026-12-24T18:00:00+01:00`); a past time fires at once.
    run_at: Option<String>,
    /// IANA time zone of `cron` (default `UTC`).
    timezone: Option<String>,
    /// Whether a fire missed while every hub was down happens once at start-up (default
    /// true) or is skipped.
    catch_up: Option<bool>,
    /// The task to submit at each fire, as the body of `POST /api/v1/tasks` (its
    /// `idempotency_key` is set by the hub, one per fire).
    task: Option<TaskRequest>,
    /// The notification to send at each fire to the owner's client WebSockets (`GET /ws`).
    notification: Option<NotificationRequest>,
}

/// Create a schedule.
///
/// `POST /api/v1/schedules`: 201 with the schedule (its `next_fire` computed).
#[utoipa::path(
    post,
    path = "/api/v1/schedules",
    tag = "schedules",
    operation_id = "createSchedule",
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "The schedule, stored", body = ScheduleView),
        (status = 400, description = "Invalid body (`error.param` names the field: `cron`, `run_at`, `timezone`, `name`, `task.*`, `notification.*`)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    body: Result<Json<ScheduleRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let when = match (req.cron, req.run_at) {
        (Some(c), None) => When::Cron(c),
        (None, Some(r)) => When::RunAt(r),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "run_at",
                "give either `cron` (recurring) or `run_at` (once), not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "cron",
                "`cron` (recurring) or `run_at` (once) is required",
            ));
        }
    };
    let action = match (req.task, req.notification) {
        (Some(t), None) => Action::Task {
            spec: t.into_spec(&state.config, "task.")?,
        },
        (None, Some(n)) => Action::Notification {
            title: n.title,
            body: n.body,
        },
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "notification",
                "give either `task` or `notification`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "task",
                "`task` (a task to submit) or `notification` (a notification to send) is required",
            ));
        }
    };
    let new = NewSchedule {
        name: req.name.unwrap_or_default(),
        when,
        timezone: req.timezone,
        catch_up: req.catch_up,
        action,
    };
    let s = state.schedules.create(&caller, new).await?;
    Ok((StatusCode::CREATED, Json(s.view())).into_response())
}

/// Query of `GET /api/v1/schedules`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Schedules per page, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// `GET /api/v1/schedules`: one page of schedules.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ScheduleList {
    /// The schedules of the page, newest first.
    data: Vec<ScheduleView>,
    /// Totals and the page.
    meta: super::ListMeta,
}

/// List schedules.
///
/// `GET /api/v1/schedules?page=&limit=`: the caller's schedules (admins: everyone's), newest
/// first, `{"data": [...], "meta": {"total", "page", "limit", "pages"}}`.
#[utoipa::path(
    get,
    path = "/api/v1/schedules",
    tag = "schedules",
    operation_id = "listSchedules",
    params(ListParams),
    responses(
        (status = 200, description = "One page of schedules", body = ScheduleList),
        (status = 400, description = "Invalid query (`page`, `limit`)", body = ErrorBody),
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
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let all = state.schedules.list(&caller).await?;
    let data: Vec<ScheduleView> = all
        .iter()
        .skip(pages.offset())
        .take(pages.limit)
        .map(|s| s.view())
        .collect();
    Ok(pages.body(&data, all.len()).into_response())
}

/// Get a schedule.
///
/// `GET /api/v1/schedules/{id}`: with its `next_fire`, `last_fire` and `last_task_id`.
#[utoipa::path(
    get,
    path = "/api/v1/schedules/{id}",
    tag = "schedules",
    operation_id = "getSchedule",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        (status = 404, description = "No such schedule (or another owner's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = state.schedules.get(&caller, &id).await?;
    Ok(Json(s.view()).into_response())
}

/// Delete a schedule.
///
/// `DELETE /api/v1/schedules/{id}`: 200 `{"deleted": true, "id"}`; it fires no more (tasks it
/// submitted are left as they are).
#[utoipa::path(
    delete,
    path = "/api/v1/schedules/{id}",
    tag = "schedules",
    operation_id = "deleteSchedule",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "`{\"deleted\": true, \"id\"}`"),
        (status = 404, description = "No such schedule (or another owner's)", body = ErrorBody),
        (status = 503, description = "The record store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.schedules.delete(&caller, &id).await?;
    Ok(Json(json!({"deleted": true, "id": id})).into_response())
}
