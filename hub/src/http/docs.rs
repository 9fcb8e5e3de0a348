//! The API documentation, public and served from the binary (nothing is fetched from the
//! internet, so the pages work offline):
//!
//! - `GET /openapi.json`: the OpenAPI 3.1 document ([`super::openapi`]).
//! - `GET /docs`: a redirect to `/docs/`, where Swagger UI (the `utoipa-swagger-ui` crate's
//!   vendored copy) reads `../openapi.json`; `GET /docs/{file}` serves its files.
//! - `GET /redoc`: a page running ReDoc [`REDOC_VERSION`] on the same document; the script is
//!   `hub/assets/redoc/redoc.standalone.js` (version, checksum and licence in
//!   `hub/assets/redoc/README.md`), served at `GET /redoc/redoc.standalone.js`.
//!
//! The scripts are embedded gzipped (Swagger UI's by its crate's `gzip` feature, ReDoc's by
//! `build.rs`): 5 MB less in the binary. They are sent as they are, with
//! `Content-Encoding: gzip`, to clients whose `Accept-Encoding` takes gzip (every browser),
//! and inflated for the others ([`encoded`]).
//!
//! Both pages name the document and their assets by relative URLs, so they also work behind a
//! proxy that mounts the hub under a path. Their HTML carries a Content-Security-Policy that
//! allows nothing from another origin ([`CSP`]): ReDoc 2 shows a "powered by" logo from its CDN,
//! which the browser then refuses without sending the request (the image hides itself).

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::ApiError;

/// Content-Security-Policy of the docs pages: everything from the hub, inline styles and
/// `blob:` workers (both UIs inject styles; ReDoc runs its search in a worker), no other origin.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                       img-src 'self' data:; font-src 'self' data:; connect-src 'self'; \
                       worker-src 'self' blob:; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";

/// The ReDoc release embedded (`hub/assets/redoc/`).
pub const REDOC_VERSION: &str = "2.5.4";

/// ReDoc's standalone bundle, gzipped by `build.rs`.
const REDOC_JS_GZ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/redoc.standalone.js.gz"));

/// The ReDoc page: the script and the document by relative URL; no font or script from
/// elsewhere.
const REDOC_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>apex hub API (ReDoc)</title>
<style>body { margin: 0; }</style>
</head>
<body>
<redoc spec-url="openapi.json"></redoc>
<script src="redoc/redoc.standalone.js"></script>
</body>
</html>
"#;

/// The docs routes (public; merged into the hub's router).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(swagger_root))
        .route("/docs/", get(swagger_index))
        .route("/docs/{*file}", get(swagger_file))
        .route("/redoc", get(redoc))
        .route("/redoc/redoc.standalone.js", get(redoc_script))
}

/// This OpenAPI document.
///
/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "docs",
    operation_id = "openapi",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub(super) async fn openapi_json() -> Response {
    let mut resp = super::openapi::json().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Swagger UI (redirect).
///
/// `GET /docs`: Swagger UI's files are named relative to `/docs/`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "docs",
    operation_id = "swaggerUiRedirect",
    responses((status = 303, description = "To `/docs/`"))
)]
pub(super) async fn swagger_root() -> Redirect {
    Redirect::to("docs/")
}

/// Swagger UI's configuration: the document by relative URL, no online validator (it would
/// send the document to swagger.io).
static SWAGGER: LazyLock<Arc<utoipa_swagger_ui::Config<'static>>> = LazyLock::new(|| {
    Arc::new(
        utoipa_swagger_ui::Config::new(["../openapi.json"])
            .validator_url("none")
            .try_it_out_enabled(true)
            .persist_authorization(false)
            .display_operation_id(true),
    )
});

/// One Swagger UI file (`""` is `index.html`), answered to a request with `headers`.
fn swagger(file: &str, headers: &HeaderMap) -> Response {
    match utoipa_swagger_ui::serve(file, SWAGGER.clone()) {
        Ok(Some(f)) => {
            let mut resp = if f.gzpipped {
                encoded(&f.bytes, headers)
            } else {
                f.bytes.into_owned().into_response()
            };
            let h = resp.headers_mut();
            if let Ok(ct) = HeaderValue::from_str(&f.content_type) {
                h.insert(header::CONTENT_TYPE, ct);
            }
            if f.content_type.starts_with("text/html") {
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(CSP),
                );
            }
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            resp
        }
        Ok(None) => ApiError::no_route(&format!("/docs/{file}")).into_response(),
        Err(e) => ApiError::internal(format!("swagger ui file {file}: {e}")).into_response(),
    }
}

/// The answer with an embedded gzipped file `gz`: as it is, with `Content-Encoding: gzip`,
/// when the request's `Accept-Encoding` takes gzip (`gzip` or `*`, without `;q=0`); else
/// inflated (a 500 if the embedded data were corrupt). Either way `Vary: Accept-Encoding`.
fn encoded(gz: &[u8], headers: &HeaderMap) -> Response {
    let mut resp = if accepts_gzip(headers) {
        let mut resp = gz.to_vec().into_response();
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        resp
    } else {
        let mut plain = Vec::new();
        match std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut plain) {
            Ok(_) => plain.into_response(),
            Err(e) => return ApiError::internal(format!("an embedded file: {e}")).into_response(),
        }
    };
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    resp
}

/// Whether `Accept-Encoding` in `headers` takes gzip (RFC 9110 §12.5.3: `gzip` or `*`, and
/// not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// Swagger UI.
///
/// `GET /docs/`: Swagger UI.
#[utoipa::path(
    get,
    path = "/docs/",
    tag = "docs",
    operation_id = "swaggerUi",
    responses((status = 200, description = "Swagger UI on `/openapi.json`", content_type = "text/html", body = String))
)]
pub(super) async fn swagger_index(headers: HeaderMap) -> Response {
    swagger("", &headers)
}

/// A Swagger UI file.
///
/// `GET /docs/{file}`: a file of Swagger UI.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "docs",
    operation_id = "swaggerUiFile",
    params(("file" = String, Path, description = "A file of Swagger UI (`swagger-ui-bundle.js`, …)")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 404, description = "No such file", body = super::error::ErrorBody),
    )
)]
pub(super) async fn swagger_file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    swagger(&file, &headers)
}

/// ReDoc.
///
/// `GET /redoc`: ReDoc.
#[utoipa::path(
    get,
    path = "/redoc",
    tag = "docs",
    operation_id = "redoc",
    responses((status = 200, description = "ReDoc on `/openapi.json`", content_type = "text/html", body = String))
)]
pub(super) async fn redoc() -> Response {
    let mut resp = REDOC_HTML.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// ReDoc's script.
///
/// `GET /redoc/redoc.standalone.js`: ReDoc's script.
#[utoipa::path(
    get,
    path = "/redoc/redoc.standalone.js",
    tag = "docs",
    operation_id = "redocScript",
    responses((status = 200, description = "ReDoc's standalone bundle", content_type = "text/javascript", body = String))
)]
pub(super) async fn redoc_script(headers: HeaderMap) -> Response {
    let mut resp = encoded(REDOC_JS_GZ, &headers);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static("")),
        );
        h
    }

    #[test]
    fn gzip_is_sent_only_where_accepted() {
        assert!(accepts_gzip(&with("gzip, deflate, br, zstd")));
        assert!(accepts_gzip(&with("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(&with("*")));
        assert!(!accepts_gzip(&with("gzip;q=0, br")));
        assert!(!accepts_gzip(&with("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn redoc_inflates_for_clients_without_gzip() {
        let resp = encoded(REDOC_JS_GZ, &HeaderMap::new());
        assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
        let resp = encoded(REDOC_JS_GZ, &with("gzip"));
        assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
    }
}
