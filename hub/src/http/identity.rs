//! `/api/v1/auth/*`: register, login and refresh (public: they take no credential), `me` and
//! logout (a user's access token). Each handler maps its body to [`crate::identity`] and the
//! answer (or [`identity::Error`]) to HTTP.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::identity::{self, Login, Registration, Session};

/// Routes that take no credential (a body instead).
pub(super) fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/refresh", post(refresh))
}

/// Routes that need a user's access token (behind the authentication layer).
pub(super) fn user_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/auth/logout", post(logout))
}

impl From<identity::Error> for ApiError {
    fn from(e: identity::Error) -> Self {
        use identity::Error as E;
        match e {
            E::Invalid { param, reason } => ApiError::invalid(param, reason),
            E::EmailTaken => ApiError::custom(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "email_taken",
                e.to_string(),
                Some("email".to_owned()),
            ),
            E::WrongCredentials => ApiError::custom(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_credentials",
                e.to_string(),
                None,
            ),
            E::InvalidRefreshToken => ApiError::custom(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_refresh_token",
                e.to_string(),
                None,
            ),
            E::UserGone => ApiError::custom(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "user_gone",
                e.to_string(),
                None,
            ),
            E::KeyNotFound(id) => ApiError::not_found("API key", &id),
            E::Store(cause) => ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "store_unavailable",
                format!("the record store is unavailable; retry later: {cause}"),
                None,
            ),
            E::Internal(_) | E::Setup(_) => ApiError::internal(e),
        }
    }
}

/// 403 for a route that needs a user's access token, called with a key.
fn user_token_required() -> ApiError {
    ApiError::custom(
        StatusCode::FORBIDDEN,
        "permission_error",
        "user_token_required",
        "this route needs a user's access token (from POST /api/v1/auth/login), not an API key",
        None,
    )
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/register",
    tag = "auth",
    operation_id = "register",
    request_body = Registration,
    responses(
        (status = 201, description = "The account and its first token pair", body = super::openapi::Registered),
        (status = 400, description = "Malformed email, password under 8 characters, bad username (`error.param` names it)", body = super::error::ErrorBody),
        (status = 409, description = "`email_taken`: the email is registered (compared lower-cased)", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    )
)]
/// `POST /api/v1/auth/register {email, password, username}`: 201 with
/// `{access_token, refresh_token, token_type: "bearer", expires_in, user: {id, email,
/// username}}`. 400 naming `email` (malformed), `password` (under 8 characters) or
/// `username`; 409 `email_taken`.
pub async fn register(
    State(state): State<AppState>,
    body: Result<Json<Registration>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(reg) = body?;
    let (tokens, user) = state.identity.register(reg).await?;
    let mut v = serde_json::to_value(&tokens).map_err(ApiError::internal)?;
    v["user"] = serde_json::to_value(&user).map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    operation_id = "login",
    request_body = Login,
    responses(
        (status = 200, description = "A new token pair", body = crate::identity::TokenPair),
        (status = 401, description = "`invalid_credentials`: unknown email or wrong password (one answer for both)", body = super::error::ErrorBody),
        (status = 429, description = "Over `rate_limits.login_per_minute` attempts for this email or this client address", body = super::error::ErrorBody),
        (status = 503, description = "The record or rate-limit store is unavailable", body = super::error::ErrorBody),
    )
)]
/// `POST /api/v1/auth/login {email, password}`: 200 with
/// `{access_token, refresh_token, token_type, expires_in}`; 401 `invalid_credentials` for an
/// unknown email or a wrong password alike. Limited against password guessing to
/// `rate_limits.login_per_minute` attempts (default 10) per email and per client address,
/// across every hub in shared mode: 429 with `Retry-After` beyond, with the
/// `X-RateLimit-*` headers of the tighter of the two.
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<Login>, JsonRejection>,
) -> Response {
    let login = match body {
        Ok(Json(login)) => login,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let addr = peer.ip().to_string();
    let admission = state.limits.check_login(&login.email, &addr).await;
    super::rate_limit::admit(admission, async move {
        match state.identity.login(login).await {
            Ok(tokens) => Json(tokens).into_response(),
            Err(e) => ApiError::from(e).into_response(),
        }
    })
    .await
}

/// Body of `POST /api/v1/auth/refresh`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/refresh",
    tag = "auth",
    operation_id = "refreshToken",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new token pair; the refresh token sent is spent", body = crate::identity::TokenPair),
        (status = 401, description = "`invalid_refresh_token`: unknown, expired, spent (which also revokes its family) or revoked", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    )
)]
/// `POST /api/v1/auth/refresh {refresh_token}`: 200 with a new pair (the old refresh token is
/// spent); 401 `invalid_refresh_token` for an unknown, expired, spent or revoked one (a spent
/// one also revokes its whole family).
pub async fn refresh(
    State(state): State<AppState>,
    body: Result<Json<RefreshRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body?;
    let tokens = state.identity.refresh(&r.refresh_token).await?;
    Ok(Json(tokens).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/auth/me",
    tag = "auth",
    operation_id = "me",
    responses(
        (status = 200, description = "The token's user", body = crate::identity::Profile),
        (status = 403, description = "`user_token_required`: called with an API key", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
/// `GET /api/v1/auth/me`: `{id, email, username, created_at}` of the token's user. 403
/// `user_token_required` with an API key.
pub async fn me(
    State(state): State<AppState>,
    session: Option<Extension<Session>>,
) -> Result<Response, ApiError> {
    let Some(Extension(session)) = session else {
        return Err(user_token_required());
    };
    let profile = state.identity.profile(&session.user_id).await?;
    Ok(Json(profile).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "auth",
    operation_id = "logout",
    responses(
        (status = 200, description = "The access token and its refresh family are revoked at every hub", body = super::openapi::Message),
        (status = 403, description = "`user_token_required`: called with an API key", body = super::error::ErrorBody),
        (status = 503, description = "The record store is unavailable", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
/// `POST /api/v1/auth/logout`: 200 `{message}`. Revokes the token's refresh family and the
/// access token itself at every hub (refused everywhere within about 250 ms; the user's
/// streams opened with it end). 403 `user_token_required` with an API key.
pub async fn logout(
    State(state): State<AppState>,
    session: Option<Extension<Session>>,
) -> Result<Response, ApiError> {
    let Some(Extension(session)) = session else {
        return Err(user_token_required());
    };
    state.identity.logout(&session).await?;
    Ok(
        Json(json!({"message": "logged out: the access token and its refresh token are revoked"}))
            .into_response(),
    )
}
