//! `/v1/nodes` (and the same routes under `/api/admin/nodes`): the node registry as operators
//! see it and act on it: list with filters and pagination, one node, its tasks, drain and
//! undrain, delete (disconnect and forget), and dispatch of a task to one node.

use std::cmp::Ordering;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::tasks::{TaskRequest, submit_one};
use super::{ApiError, AppState, Pagination, Sort};
use crate::model::{NodeState, NodeView, TaskView};
use crate::principal::Principal;
use crate::store::TaskFilter;

/// Query of `GET /v1/nodes`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `online`, `draining` or `offline`.
    #[param(inline, value_type = Option<NodeState>)]
    status: Option<String>,
    /// `worker`, `companion` or `custom`.
    #[serde(rename = "type")]
    node_type: Option<String>,
    /// Only nodes offering this tool.
    tool: Option<String>,
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Nodes per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `id` (the default), `name`, `connected_at`, `last_seen_at`, `active_tasks` or `load`;
    /// `-field` for descending.
    #[param(example = "-connected_at")]
    sort: Option<String>,
}

/// What node lists sort by; each also as `-field` (descending). Ties go by id.
const SORT_FIELDS: &[&str] = &[
    "id",
    "name",
    "connected_at",
    "last_seen_at",
    "active_tasks",
    "load",
];

/// The default order of node lists: by id.
const BY_ID: Sort = Sort {
    field: "id",
    descending: false,
};

/// Orders two node views by `sort.field` (one of [`SORT_FIELDS`]), then by id.
fn cmp_nodes(a: &NodeView, b: &NodeView, sort: Sort) -> Ordering {
    let by_id = a.id.cmp(&b.id);
    let primary = match sort.field {
        "name" => a.name.cmp(&b.name),
        "connected_at" => a.connected_at.0.cmp(&b.connected_at.0),
        "last_seen_at" => a
            .last_seen_at
            .map(|t| t.0)
            .cmp(&b.last_seen_at.map(|t| t.0)),
        "active_tasks" => a.active_tasks.cmp(&b.active_tasks),
        "load" => a.load.total_cmp(&b.load),
        _ => by_id,
    };
    let primary = if sort.descending {
        primary.reverse()
    } else {
        primary
    };
    primary.then(by_id)
}

/// [`cmp_nodes`] for the JSON views of shared mode (nodes of other hubs): numbers by value,
/// strings (ids, names, RFC 3339 UTC times, which sort as the times do) by text, a missing or
/// null field first.
fn cmp_node_values(a: &Value, b: &Value, sort: Sort) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Number(_) => 1,
            Value::String(_) => 2,
            _ => 0,
        }
    }
    fn cmp_field(a: &Value, b: &Value) -> Ordering {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&y.as_f64().unwrap_or(0.0)),
            (Value::String(x), Value::String(y)) => x.cmp(y),
            _ => rank(a).cmp(&rank(b)),
        }
    }
    let by_id = cmp_field(&a["id"], &b["id"]);
    if sort.field == "id" {
        return if sort.descending {
            by_id.reverse()
        } else {
            by_id
        };
    }
    let primary = cmp_field(&a[sort.field], &b[sort.field]);
    let primary = if sort.descending {
        primary.reverse()
    } else {
        primary
    };
    primary.then(by_id)
}

/// List nodes.
///
/// `GET /v1/nodes?status=&type=&tool=&page=&limit=&sort=`: `{"data": [node, ...], "meta":
/// {total, page, limit, pages}}`, by id unless `sort` names another field (`name`,
/// `connected_at`, `last_seen_at`, `active_tasks`, `load`, or `-field` descending). `status` is
/// `online`, `draining` or `offline`; `type` is `worker`, `companion` or `custom`; `tool` keeps
/// nodes offering that tool. `limit` defaults to 100 (at most 1000).
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "nodes",
    operation_id = "listNodes",
    params(ListParams),
    responses(
        (status = 200, description = "One page of nodes", body = super::openapi::NodeList),
        (status = 400, description = "Invalid query (`error.param`: `status`, `type`, `page`, `limit`, `sort`)", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = status
        && !["online", "draining", "offline"].contains(&s)
    {
        return Err(ApiError::invalid(
            "status",
            "`status` must be one of online, draining, offline",
        ));
    }
    let node_type = q.node_type.as_deref().filter(|s| !s.is_empty());
    if let Some(t) = node_type
        && !["worker", "companion", "custom"].contains(&t)
    {
        return Err(ApiError::invalid(
            "type",
            "`type` must be one of worker, companion, custom",
        ));
    }
    let tool = q.tool.as_deref().filter(|s| !s.is_empty());
    let pages = Pagination::new(q.page, q.limit, 100)?;
    let sort = Sort::parse(q.sort.as_deref(), SORT_FIELDS, BY_ID)?;
    if let Some(shared) = &state.shared {
        let mut all: Vec<_> = crate::shared::all_node_views(shared, &state.cluster)
            .await
            .map_err(ApiError::store_unavailable)?
            .into_iter()
            .filter(|n| {
                status.is_none_or(|s| n["status"] == s)
                    && node_type.is_none_or(|t| n["type"] == t)
                    && tool.is_none_or(|t| {
                        n["tools"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == t))
                    })
            })
            .collect();
        if sort != BY_ID {
            all.sort_by(|a, b| cmp_node_values(a, b, sort));
        }
        let total = all.len();
        let data: Vec<_> = all
            .into_iter()
            .skip(pages.offset())
            .take(pages.limit)
            .collect();
        return Ok(pages.body(&data, total).into_response());
    }
    let mut all: Vec<_> = state
        .cluster
        .nodes()
        .into_iter()
        .filter(|n| {
            status.is_none_or(|s| n.status.as_str() == s)
                && node_type.is_none_or(|t| {
                    serde_json::to_value(n.node_type)
                        .ok()
                        .as_ref()
                        .and_then(|v| v.as_str())
                        == Some(t)
                })
                && tool.is_none_or(|t| n.tools.iter().any(|x| x == t))
        })
        .collect();
    // `Cluster::nodes` lists by id already.
    if sort != BY_ID {
        all.sort_by(|a, b| cmp_nodes(a, b, sort));
    }
    let total = all.len();
    let data: Vec<_> = all
        .into_iter()
        .skip(pages.offset())
        .take(pages.limit)
        .collect();
    Ok(pages.body(&data, total).into_response())
}

/// Get a node.
///
/// `GET /v1/nodes/{id}`: the node, or 404. In shared mode also a node connected to another
/// hub (its published view, with a `hub` field), as `GET /v1/nodes` lists it.
#[utoipa::path(
    get,
    path = "/v1/nodes/{id}",
    tag = "nodes",
    operation_id = "getNode",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(shared) = &state.shared {
        return crate::shared::node_view(shared, &state.cluster, &id)
            .await
            .map_err(ApiError::store_unavailable)?
            .map(|v| Json(v).into_response())
            .ok_or_else(|| ApiError::not_found("node", &id));
    }
    state
        .cluster
        .node(&id)
        .map(|n| Json(n).into_response())
        .ok_or_else(|| ApiError::not_found("node", &id))
}

/// Query of `GET /v1/nodes/{id}/tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TasksParams {
    /// Only tasks in this state.
    #[param(inline, value_type = Option<crate::model::TaskStatus>)]
    status: Option<String>,
    /// Only tasks of this tool.
    tool: Option<String>,
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<usize>,
    /// Tasks per page, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `-created_at` (newest first, the default) or `created_at`.
    sort: Option<String>,
}

/// List a node's tasks.
///
/// `GET /v1/nodes/{id}/tasks?status=&tool=&page=&limit=&sort=`: tasks whose current or last
/// attempt is on the node, newest first (or `sort=created_at`), in the paged list shape of
/// `GET /api/v1/tasks`. 404 for a node
/// the hub does not know (forgotten nodes' tasks stay listed under `GET /api/v1/tasks?node_id=`).
/// In shared mode: any hub's node, and its tasks from the shared store.
#[utoipa::path(
    get,
    path = "/v1/nodes/{id}/tasks",
    tag = "nodes",
    operation_id = "listNodeTasks",
    params(("id" = String, Path, description = "Node id"), TasksParams),
    responses(
        (status = 200, description = "One page of the node's tasks", body = super::openapi::TaskList),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn tasks(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<TasksParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let known = match &state.shared {
        Some(shared) => crate::shared::node_view(shared, &state.cluster, &id)
            .await
            .map_err(ApiError::store_unavailable)?
            .is_some(),
        None => state.cluster.node(&id).is_some(),
    };
    if !known {
        return Err(ApiError::not_found("node", &id));
    }
    let status = super::tasks::status_filter(q.status.as_deref())?;
    let pages = Pagination::new(q.page, q.limit, 50)?;
    let sort = Sort::parse(
        q.sort.as_deref(),
        super::tasks::SORT_FIELDS,
        Sort::NEWEST_FIRST,
    )?;
    let filter = TaskFilter {
        status,
        tool: q.tool.filter(|s| !s.is_empty()),
        node_id: Some(id),
        owner: None,
    };
    super::tasks::list_page(&state, &caller, &filter, sort, pages).await
}

/// Drain a node.
///
/// `POST /v1/nodes/{id}/drain`: the node gets no new work and finishes what it runs; 200 with
/// the node. Draining an offline node keeps it out of scheduling until it reconnects. In shared
/// mode a node online at another hub is drained there (see [`forward_drain`]).
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/drain",
    tag = "nodes",
    operation_id = "drainNode",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node, draining", body = NodeView),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The hub holding the node did not confirm within 10 s", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(r) = forward_drain(&state, &id, true).await? {
        return Ok(r);
    }
    set_draining(&state, &id, true)
}

/// Undrain a node.
///
/// `POST /v1/nodes/{id}/undrain`: the node takes work again; 200 with the node. In shared mode
/// a node online at another hub is undrained there.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/undrain",
    tag = "nodes",
    operation_id = "undrainNode",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node, taking work again", body = NodeView),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The hub holding the node did not confirm within 10 s", body = ErrorBody),
        (status = 503, description = "The shared store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn undrain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(r) = forward_drain(&state, &id, false).await? {
        return Ok(r);
    }
    set_draining(&state, &id, false)
}

/// Shared mode, a node that is not connected here but online at another live hub: the request
/// goes to that hub (`apex:shared:node-actions`), and the answer is the node's view once that
/// hub publishes it drained (or undrained): 200 with it, 409 if that does not happen within
/// 10 s. `None`: not such a node (act locally).
async fn forward_drain(
    state: &AppState,
    id: &str,
    draining: bool,
) -> Result<Option<Response>, ApiError> {
    let Some(shared) = &state.shared else {
        return Ok(None);
    };
    if state
        .cluster
        .node(id)
        .is_some_and(|n| n.status != NodeState::Offline)
    {
        return Ok(None);
    }
    let view = crate::shared::node_view(shared, &state.cluster, id)
        .await
        .map_err(ApiError::store_unavailable)?;
    let Some(hub) = view
        .as_ref()
        .filter(|v| v["status"] != "offline")
        .and_then(|v| v["hub"].as_str())
        .filter(|h| *h != shared.hub_id())
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    shared
        .request_node_action(&hub, id, draining)
        .await
        .map_err(ApiError::store_unavailable)?;
    let want = if draining { "draining" } else { "online" };
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let view = crate::shared::node_view(shared, &state.cluster, id)
            .await
            .map_err(ApiError::store_unavailable)?;
        if let Some(v) = view.filter(|v| v["status"] == want) {
            return Ok(Some(Json(v).into_response()));
        }
    }
    Err(ApiError::conflict(format!(
        "hub `{hub}` holding node `{id}` did not confirm the change within 10 s"
    )))
}

fn set_draining(state: &AppState, id: &str, draining: bool) -> Result<Response, ApiError> {
    if !state.cluster.set_draining(id, draining) {
        return Err(ApiError::not_found("node", id));
    }
    state
        .cluster
        .node(id)
        .map(|n| Json(n).into_response())
        .ok_or_else(|| ApiError::not_found("node", id))
}

/// Disconnect and forget a node.
///
/// `DELETE /v1/nodes/{id}`: closes the node's connection, migrates its in-flight tasks, fails
/// the queued tasks pinned to it (`node_removed`) and forgets it. 200
/// `{"id", "removed": true}`; 404 for an unknown node. A node process that reconnects registers
/// again.
#[utoipa::path(
    delete,
    path = "/v1/nodes/{id}",
    tag = "nodes",
    operation_id = "removeNode",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node was disconnected and forgotten", body = super::openapi::NodeRemoved),
        (status = 404, description = "No such node at this hub", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !state.cluster.remove_node(&id, "removed by operator") {
        return Err(ApiError::not_found("node", &id));
    }
    Ok(Json(serde_json::json!({ "id": id, "removed": true })).into_response())
}

/// Body of `POST /v1/nodes/{id}/tasks`: a task as for `POST /api/v1/tasks` (without
/// `node_id`), plus `waitForResult` (alias `wait_for_result`, default false) and `wait_ms`
/// (how long to wait, default and at most 60000).
#[derive(Debug, Deserialize, ToSchema)]
pub struct DispatchRequest {
    /// The task, as for `POST /api/v1/tasks` (its `node_id` is this node).
    #[serde(flatten)]
    task: TaskRequest,
    /// Answer when the task ends (or after `wait_ms`) rather than at once.
    #[serde(rename = "waitForResult", alias = "wait_for_result", default)]
    wait_for_result: bool,
    /// How long to wait with `waitForResult`, in ms (default and at most 60000).
    wait_ms: Option<u64>,
}

/// Run a task on this node.
///
/// `POST /v1/nodes/{id}/tasks`: submits a task pinned to this node. 201 with the task; with
/// `waitForResult: true`, the answer comes when the task ends (or after `wait_ms`, with the task
/// as it is then). 404 for an unknown node; 409 if the node is offline or draining; 400 if it
/// lacks the tool.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/tasks",
    tag = "nodes",
    operation_id = "dispatchToNode",
    params(("id" = String, Path, description = "Node id")),
    request_body = DispatchRequest,
    responses(
        (status = 201, description = "The task, accepted (ended, with `waitForResult`)", body = TaskView),
        (status = 200, description = "The task already accepted under this idempotency key", body = TaskView),
        (status = 400, description = "Invalid body, or the node lacks the tool", body = ErrorBody),
        (status = 404, description = "No such node at this hub", body = ErrorBody),
        (status = 409, description = "The node is offline or draining", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
        (status = 415, description = "Body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The task store is unavailable; nothing was accepted", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn dispatch(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<DispatchRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let Some(node) = state.cluster.node(&id) else {
        return Err(ApiError::not_found("node", &id));
    };
    if node.status != NodeState::Online {
        return Err(ApiError::conflict(format!(
            "node `{id}` is {} and takes no new work",
            node.status.as_str()
        )));
    }
    let mut spec = req.task.into_spec(&state.config, "")?;
    if !node.tools.contains(&spec.tool) {
        return Err(ApiError::invalid(
            "tool",
            crate::engine::SubmitError::NodeLacksTool {
                node: id,
                tool: spec.tool,
            }
            .to_string(),
        ));
    }
    spec.pinned_node = Some(id);
    // Through the task service like any submission: durable before the answer, and in
    // shared mode written to the shared store (pinned queue), so any hub sees it.
    let (task, created) = submit_one(&state, &caller, spec).await?;
    let task = if req.wait_for_result {
        let wait = std::time::Duration::from_millis(req.wait_ms.unwrap_or(60_000));
        state
            .tasks
            .get(&caller, &task.id, wait)
            .await?
            .unwrap_or(task)
    } else {
        task
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(task.view())).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn sorted(mut views: Vec<Value>, sort: &str) -> Vec<String> {
        let sort = Sort::parse(Some(sort), SORT_FIELDS, BY_ID).unwrap();
        views.sort_by(|a, b| cmp_node_values(a, b, sort));
        views
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn shared_mode_views_sort_by_value_then_id() {
        let views = vec![
            json!({"id": "b", "name": "zeta", "load": 0.5, "active_tasks": 2,
                   "connected_at": "2026-01-01T00:00:02.000Z", "last_seen_at": null}),
            json!({"id": "a", "name": "alpha", "load": 0.5, "active_tasks": 10,
                   "connected_at": "2026-01-01T00:00:03.000Z",
                   "last_seen_at": "2026-01-01T00:00:09.000Z"}),
            json!({"id": "c", "name": "mid", "load": 0.25, "active_tasks": 1,
                   "connected_at": "2026-01-01T00:00:01.000Z",
                   "last_seen_at": "2026-01-01T00:00:05.000Z"}),
        ];
        assert_eq!(sorted(views.clone(), "id"), ["a", "b", "c"]);
        assert_eq!(sorted(views.clone(), "-id"), ["c", "b", "a"]);
        assert_eq!(sorted(views.clone(), "name"), ["a", "c", "b"]);
        // Numbers compare as numbers (10 > 2), ties go by id.
        assert_eq!(sorted(views.clone(), "-active_tasks"), ["a", "b", "c"]);
        assert_eq!(sorted(views.clone(), "load"), ["c", "a", "b"]);
        assert_eq!(sorted(views.clone(), "-load"), ["a", "b", "c"]);
        assert_eq!(sorted(views.clone(), "connected_at"), ["c", "b", "a"]);
        // A node never seen (null) sorts first ascending.
        assert_eq!(sorted(views, "last_seen_at"), ["b", "c", "a"]);
    }

    #[test]
    fn unknown_sort_fields_name_the_param() {
        for bad in ["cpu", "-", "--id", "created_at"] {
            let e = Sort::parse(Some(bad), SORT_FIELDS, BY_ID).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(Sort::parse(Some(""), SORT_FIELDS, BY_ID).unwrap(), BY_ID);
        assert_eq!(Sort::parse(None, SORT_FIELDS, BY_ID).unwrap(), BY_ID);
    }
}
