//! `GET /livez` and `GET /readyz`: the probes of load balancers, Kubernetes and Docker. Both
//! public (no key), plain JSON, 200 or 503, cheap enough to be polled every second.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

#[utoipa::path(
    get,
    path = "/livez",
    tag = "system",
    operation_id = "livez",
    responses((status = 200, description = "`{status: \"ok\"}`: the process serves requests (also while draining)", body = Object))
)]
/// `GET /livez`: 200 `{"status": "ok"}` while the process serves requests, draining included
/// (a liveness probe must not restart a hub that is shutting down).
pub async fn livez() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "system",
    operation_id = "readyz",
    responses(
        (status = 200, description = "`{status: \"ready\", store: \"ok\", draining: false}` (shared mode adds `lease`)", body = Object),
        (status = 503, description = "Not ready (store unavailable, draining, or lease lost): the error shape with `status`, `store`, `draining` (and `lease`) beside it", body = super::error::ErrorBody),
    )
)]
/// `GET /readyz`: 200 `{"status": "ready", "store": "ok", "draining": false}` when the hub
/// should get traffic; 503 (the error shape, code `not_ready`, with the same fields beside
/// it) with `"status": "not_ready"` while the task store refuses writes
/// (`store: "unavailable"`), from SIGTERM on (`draining: true`, see
/// [`crate::ops::Lifecycle`]), or in shared mode while the hub's lease is lost. Shared-mode
/// bodies add `"lease": "held" | "lost"`. Answers within about a second even when Redis
/// does not answer ([`crate::tasks::STORE_PROBE_TIMEOUT`]).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let draining = state.ops.lifecycle.is_draining();
    let probe = state.tasks.probe().await;
    let ready = !draining && probe.available && probe.lease_held != Some(false);
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "store": if probe.available { "ok" } else { "unavailable" },
        "draining": draining,
    });
    if let Some(held) = probe.lease_held {
        body["lease"] = json!(if held { "held" } else { "lost" });
    }
    if ready {
        return (StatusCode::OK, Json(body)).into_response();
    }
    // Not ready: the one error shape, with the probe's fields beside it (as `/health`'s 503).
    let why = if draining {
        "the hub is shutting down"
    } else if !probe.available {
        "the task store is unavailable"
    } else {
        "this hub lost its shared-mode lease"
    };
    let mut e = super::ApiError::custom(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "not_ready",
        format!("not ready: {why}"),
        None,
    );
    if let serde_json::Value::Object(fields) = body {
        for (k, v) in fields {
            e = e.with_field(&k, v);
        }
    }
    e.into_response()
}
