//! `POST /v1/embeddings` (OpenAI-compatible), mapped to
//! [`Gateway::embeddings`](crate::llm::Gateway::embeddings).

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::llm::embeddings::EmbeddingRequest;

/// Create embeddings (OpenAI-compatible).
///
/// `POST /v1/embeddings`: `{model, input, encoding_format?, dimensions?}` →
/// `{object: "list", data: [{object: "embedding", index, embedding}], model, usage}`.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "llm",
    operation_id = "createEmbedding",
    request_body = schemas::EmbeddingRequest,
    responses(
        (status = 200, description = "One vector per input, in input order", body = schemas::EmbeddingList),
        (status = 400, description = "Invalid request (`error.param` names the field), or the model does not serve embeddings (`param: model`)", body = ErrorBody),
        (status = 404, description = "No provider serves the model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body larger than `max_body_bytes`", body = ErrorBody),
        (status = 429, description = "Every deployment was rate limited", body = ErrorBody),
        (status = 502, description = "The upstream failed (`upstream_error`)", body = ErrorBody),
        (status = 503, description = "No upstream could be reached in time (`upstream_unavailable`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::invalid("body", format!("the body is not valid JSON: {e}"))
                .into_response();
        }
    };
    let req = match EmbeddingRequest::from_json(value) {
        Ok(r) => r,
        Err(e) => return super::llm::api_error(&e).into_response(),
    };
    match state.llm.get().embeddings(&req).await {
        Ok(e) => axum::Json(e.to_json(&req.model, req.encoding_format)).into_response(),
        Err(e) => {
            tracing::debug!(model = %req.model, error = %e, "embeddings failed");
            super::llm::api_error(&e).into_response()
        }
    }
}

/// The schema-only types of the embeddings route (never built; they mirror the handler's
/// `json!`).
#[allow(dead_code)]
pub mod schemas {
    use serde_json::Value;
    use utoipa::ToSchema;

    /// `POST /v1/embeddings`: an OpenAI embeddings request. Other fields (`user`, …) are
    /// passed to the provider as sent.
    #[derive(ToSchema)]
    #[schema(example = json!({"model": "mock", "input": ["the budget meeting", "春天"]}))]
    pub struct EmbeddingRequest {
        /// A model of `GET /v1/models` served by a provider that embeds (the `mock`, or an
        /// OpenAI-compatible upstream).
        pub model: String,
        /// A string, an array of 1 to 2048 strings, an array of token ids, or an array of such
        /// arrays.
        #[schema(value_type = Object)]
        pub input: Value,
        /// `float` (default) or `base64` (little-endian `f32`s).
        pub encoding_format: Option<String>,
        /// Vector length (the mock: default 256; upstreams: as they support it).
        pub dimensions: Option<u32>,
    }

    /// One vector.
    #[derive(ToSchema)]
    pub struct Embedding {
        /// `embedding`.
        pub object: String,
        /// The input's position.
        pub index: u32,
        /// The vector: numbers, or a base64 string with `encoding_format: "base64"`.
        #[schema(value_type = Object)]
        pub embedding: Value,
    }

    /// The answer of `POST /v1/embeddings`.
    #[derive(ToSchema)]
    pub struct EmbeddingList {
        /// `list`.
        pub object: String,
        /// One per input, in order.
        pub data: Vec<Embedding>,
        /// The model as requested.
        pub model: String,
        /// `{prompt_tokens, total_tokens}`.
        #[schema(value_type = Object)]
        pub usage: Value,
    }
}
