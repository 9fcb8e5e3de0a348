//! `/dashboard`: the operator dashboard, static assets embedded in the binary.
//!
//! The page holds no data, so its routes are public; every data call the page makes carries
//! the API key the operator signs in with (kept in the browser's `sessionStorage`).
//!
//! Routes:
//! - `GET /dashboard`, `GET /dashboard/`: `index.html`, `Cache-Control: no-cache` with an `ETag`
//!   (a reload after an upgrade always gets the new page; otherwise 304).
//! - `GET /dashboard/assets/<build>/<file>`: scripts, styles and icons. `<build>` is a hash of
//!   every embedded asset ([`build_id`]), written into `index.html`, so the files are served
//!   `immutable` for a year; a request naming another build gets today's file with `no-cache`.
//!
//! The files live in `hub/dashboard/` (plain ES modules, HTML and CSS; no build step). HTML gets
//! a Content-Security-Policy allowing only same-origin scripts, styles and connections.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ApiError;

/// One embedded file.
struct Asset {
    /// File name under `hub/dashboard/`.
    name: &'static str,
    /// `Content-Type` header value.
    content_type: &'static str,
    /// The bytes.
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ct:literal) => {
        Asset {
            name: $name,
            content_type: $ct,
            body: include_bytes!(concat!("../../dashboard/", $name)),
        }
    };
}

/// Every file served under `/dashboard/assets/<build>/`.
const ASSETS: &[Asset] = &[
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("chart.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("views.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

/// The page template; `{{ASSETS}}` becomes `/dashboard/assets/<build>`.
const INDEX_TEMPLATE: &str = include_str!("../../dashboard/index.html");

/// Content-Security-Policy of the HTML page: nothing from other origins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// FNV-1a 64-bit, continuing from `h` (compile-time content hash for ETags and the build id).
const fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

const fn build_hash() -> u64 {
    let mut h = fnv1a(FNV_OFFSET, INDEX_TEMPLATE.as_bytes());
    let mut i = 0;
    while i < ASSETS.len() {
        h = fnv1a(h, ASSETS[i].name.as_bytes());
        h = fnv1a(h, ASSETS[i].body);
        i += 1;
    }
    h
}

/// Hash of every embedded asset, 16 hex digits: the `<build>` segment of asset URLs.
pub fn build_id() -> &'static str {
    static ID: LazyLock<String> = LazyLock::new(|| format!("{:016x}", build_hash()));
    &ID
}

/// `index.html` with asset URLs filled in, and its ETag.
static INDEX: LazyLock<(String, String)> = LazyLock::new(|| {
    let html = INDEX_TEMPLATE.replace("{{ASSETS}}", &format!("/dashboard/assets/{}", build_id()));
    let etag = format!("\"{:016x}\"", fnv1a(FNV_OFFSET, html.as_bytes()));
    (html, etag)
});

/// The dashboard routes (public; merged into the hub's router).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/assets/{build}/{file}", get(asset))
}

/// Whether `If-None-Match` lists `etag` (or `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// Headers every dashboard response carries.
fn common_headers(h: &mut HeaderMap, etag: &str, cache: &'static str) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The dashboard page.
///
/// `GET /dashboard` (and `/dashboard/`): the page.
#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "dashboard",
    operation_id = "dashboard",
    responses(
        (status = 200, description = "The dashboard page (it signs in with an API key)", content_type = "text/html", body = String),
        (status = 304, description = "Not modified (`If-None-Match`)"),
    )
)]
async fn index(headers: HeaderMap) -> Response {
    let (html, etag) = &*INDEX;
    let mut resp = if not_modified(&headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        html.clone().into_response()
    };
    let h = resp.headers_mut();
    common_headers(h, etag, "no-cache");
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// A dashboard asset.
///
/// `GET /dashboard/assets/{build}/{file}`: one embedded asset.
#[utoipa::path(
    get,
    path = "/dashboard/assets/{build}/{file}",
    tag = "dashboard",
    operation_id = "dashboardAsset",
    params(
        ("build" = String, Path, description = "The build id written in the page (another one is served `no-cache`)"),
        ("file" = String, Path, description = "Asset file name"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 404, description = "No such asset", body = super::error::ErrorBody),
    )
)]
async fn asset(Path((build, file)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == file) else {
        return ApiError::no_route(&format!("/dashboard/assets/{build}/{file}")).into_response();
    };
    let etag = format!("\"{:016x}\"", fnv1a(FNV_OFFSET, a.body));
    // Only the current build's URLs are immutable: an old page asking for an old build gets
    // today's file, which must not be cached under the old URL for a year.
    let cache = if build == build_id() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut resp = if not_modified(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        a.body.into_response()
    };
    let h = resp.headers_mut();
    common_headers(h, &etag, cache);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn index_points_at_the_current_build() {
        let (html, _) = &*INDEX;
        assert!(!html.contains("{{ASSETS}}"));
        assert!(html.contains(&format!("/dashboard/assets/{}/app.js", build_id())));
    }

    #[test]
    fn every_asset_is_named_once_and_typed() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            assert!(
                ASSETS[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
        }
    }

    #[test]
    fn if_none_match_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(not_modified(&h, "\"b\""));
        assert!(!not_modified(&h, "\"c\""));
    }
}
