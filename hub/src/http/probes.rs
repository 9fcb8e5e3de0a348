//! `GET /livez` and `GET /readyz`: the probes of load balancers, Kubernetes and Docker. Both
//! public (no key), plain JSON, 200 or 503, cheap enough to be polled every second.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// `GET /livez`: 200 `{"status": "ok"}` while the process serves requests, draining included
/// (a liveness probe must not restart a hub that is shutting down).
pub async fn livez() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

/// `GET /readyz`: 200 `{"status": "ready", "store": "ok", "draining": false}` when the hub
/// should get traffic; 503 with `"status": "not_ready"` while the task store refuses writes
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
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
