//! `POST /mcp`: the hub's MCP server ([`crate::mcp`]) on the router, behind the API's
//! authentication and the `tasks` scope.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::Response;
use tower::ServiceExt;

use super::AppState;
use super::error::ErrorBody;

/// Model Context Protocol.
///
/// `POST /mcp`: one JSON-RPC message of the Model Context Protocol (Streamable HTTP transport,
/// stateless: no `Mcp-Session-Id`; send `Accept: application/json, text/event-stream`).
/// `tools/list` is the cluster's tool catalogue, `tools/call` runs the tool as a task of the
/// caller and answers its result when it ends (`isError: true` for a failed, timed-out or
/// cancelled task). Answers are `text/event-stream` with the JSON-RPC response (kept alive
/// while the task runs); transport errors are 4xx with a JSON-RPC error or the error shape.
#[utoipa::path(
    post,
    path = "/mcp",
    tag = "mcp",
    operation_id = "mcp",
    request_body(content = Object, description = "A JSON-RPC 2.0 message of MCP (`initialize`, `server/discover`, `tools/list`, `tools/call`, notifications)", content_type = "application/json"),
    responses(
        (status = 200, description = "The JSON-RPC response, as one `text/event-stream` event (or `application/json`)", content_type = "text/event-stream", body = String),
        (status = 202, description = "A notification was accepted"),
        (status = 400, description = "Not a valid MCP message (a JSON-RPC error body, or the error shape)", body = ErrorBody),
        (status = 401, description = "Missing or invalid credential", body = ErrorBody),
        (status = 403, description = "The credential lacks the `tasks` scope", body = ErrorBody),
        (status = 406, description = "The `Accept` header does not list both `application/json` and `text/event-stream`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn serve(State(state): State<AppState>, req: Request) -> Response {
    let server =
        crate::mcp::McpServer::new(state.tasks.clone(), &state.config, state.shutdown.clone());
    let service = crate::mcp::service(server, state.config.max_body_bytes);
    let resp = match service.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut resp = resp.map(Body::new);
    // A JSON-RPC error body is what an MCP client reads: keep it. rmcp's plain-text 4xx
    // answers are rebuilt in the API's error shape by `error::shape`.
    if json {
        super::error::keep_shape(&mut resp);
    }
    resp
}
