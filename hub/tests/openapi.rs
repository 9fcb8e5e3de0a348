#![allow(clippy::unwrap_used)]
//! The OpenAPI document against the router, both ways, so neither can drift from the other:
//!
//! - **Drift test** ([`every_route_of_the_router_is_documented_and_nothing_else`]): every
//!   `.route("<path>", <method>(..).<method>(..))` registration in the hub's sources
//!   (`hub/src/**/*.rs`, read at test time, so a new file is covered too) must be an operation
//!   of `/openapi.json` with that path and method, and every documented operation must be such a
//!   registration (test code is not read: `*tests.rs` files and a file's `#[cfg(test)] mod`). A registration the reader cannot understand (a path that is not a string
//!   literal, `nest`, `route_service`, `any(..)`) fails the test rather than being skipped.
//! - Every documented operation is routed for real: sent through the router it reaches its
//!   handler (never the `unknown_route` fallback or a 405).
//! - Every 4xx/5xx response refers to the shared `ErrorBody`; operation ids are unique.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use apex_hub::config::Config;
use apex_hub::http::{AppState, router};
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use tokio::sync::watch;
use tower::ServiceExt;

const API_KEY: &str = "test-api-key-1";

/// The methods a documented path item can hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One route registration: path as written (axum syntax), method, and where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Registration {
    path: String,
    method: String,
    at: String,
}

/// Every `.route(..)` registration in `source`, or the reasons some could not be read.
fn registrations(source: &str, file: &str) -> Result<Vec<Registration>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for needle in [".nest(", ".nest_service(", ".route_service("] {
        for (i, _) in source.match_indices(needle) {
            if !in_comment(source, i) {
                errors.push(format!(
                    "{file}:{}: `{needle}..)` is not read by the OpenAPI drift test; register \
                     each route with `.route(\"<literal path>\", ..)`",
                    line_of(source, i)
                ));
            }
        }
    }
    for (i, _) in source.match_indices(".route(") {
        if in_comment(source, i) {
            continue;
        }
        let at = format!("{file}:{}", line_of(source, i));
        match parse_route(&source[i + ".route(".len()..]) {
            Ok((path, methods)) => {
                for method in methods {
                    out.push(Registration {
                        path: path.clone(),
                        method,
                        at: at.clone(),
                    });
                }
            }
            Err(why) => errors.push(format!("{at}: {why}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Whether byte `i` of `source` is on a line comment (`//`, `///`, `//!`).
fn in_comment(source: &str, i: usize) -> bool {
    let start = source[..i].rfind('\n').map_or(0, |n| n + 1);
    source[start..i].contains("//")
}

fn line_of(source: &str, i: usize) -> usize {
    source[..i].matches('\n').count() + 1
}

/// The arguments of one `.route(` call (`rest` starts after the parenthesis): the literal
/// path and the methods of the method router.
fn parse_route(rest: &str) -> Result<(String, Vec<String>), String> {
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix('"') else {
        return Err(format!(
            "the path of `.route({}` is not a string literal: write it as one so the OpenAPI \
             drift test can check it",
            rest.chars().take(40).collect::<String>()
        ));
    };
    let end = rest
        .find('"')
        .ok_or_else(|| "unterminated path literal".to_owned())?;
    let path = rest[..end].to_owned();
    let rest = rest[end + 1..].trim_start();
    let rest = rest
        .strip_prefix(',')
        .ok_or_else(|| format!("`.route(\"{path}\"` has no method router"))?;
    // The method router, up to the `)` closing `.route(`: method calls at depth 0. The
    // router's scope wrapper `needs(Scope, <method router>)` and `.merge(..)` of two method
    // routers are read through (transparent).
    let mut methods = Vec::new();
    let mut depth = 0usize;
    let mut stack: Vec<bool> = Vec::new();
    let mut ident = String::new();
    let mut in_str = false;
    for c in rest.chars() {
        if in_str {
            in_str = c != '"';
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' => {
                let transparent = depth == 0 && matches!(ident.as_str(), "needs" | "merge");
                if depth == 0 && !ident.is_empty() && !transparent {
                    match ident.as_str() {
                        m if METHODS.contains(&m) => methods.push(m.to_owned()),
                        other => {
                            return Err(format!(
                                "`.route(\"{path}\", ..)` uses `{other}(..)`, which the OpenAPI \
                                 drift test does not read: use one function per method"
                            ));
                        }
                    }
                }
                if !transparent {
                    depth += 1;
                }
                stack.push(transparent);
                ident.clear();
            }
            ')' => {
                match stack.pop() {
                    None => break,
                    Some(true) => {}
                    Some(false) => depth -= 1,
                }
                ident.clear();
            }
            c if c.is_alphanumeric() || c == '_' => ident.push(c),
            _ => ident.clear(),
        }
    }
    if methods.is_empty() {
        return Err(format!("`.route(\"{path}\", ..)` names no method"));
    }
    Ok((path, methods))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every route registration of the hub's sources.
fn source_routes() -> Vec<Registration> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let name = f.strip_prefix(&src).unwrap().display().to_string();
        // Test code builds routers of its own: `tests.rs` files, and a file's
        // `#[cfg(test)] mod …` (which comes last), are not the hub's routes.
        if name.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let text = match test_module_start(&text) {
            Some(i) => &text[..i],
            None => &text[..],
        };
        match registrations(text, &name) {
            Ok(r) => all.extend(r),
            Err(e) => errors.extend(e),
        }
    }
    assert!(
        errors.is_empty(),
        "unreadable route registrations:\n{}",
        errors.join("\n")
    );
    all
}

/// Where a file's `#[cfg(test)]` module starts (`#[cfg(test)]` followed by `mod`).
fn test_module_start(text: &str) -> Option<usize> {
    text.match_indices("#[cfg(test)]")
        .map(|(i, _)| i)
        .find(|&i| {
            text[i + "#[cfg(test)]".len()..]
                .trim_start()
                .starts_with("mod ")
        })
}

/// The OpenAPI form of an axum path: `{*rest}` is `{rest}`.
fn openapi_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

fn state() -> (AppState, watch::Sender<bool>) {
    let config = Config {
        api_keys: vec![API_KEY.to_owned()],
        node_keys: vec!["test-node-key-1".to_owned()],
        ..Config::default()
    };
    config.validate().unwrap();
    let cluster = apex_hub::cluster_for(&config);
    let (tx, rx) = watch::channel(false);
    (AppState::new(cluster, config, rx), tx)
}

async fn get_json(app: &Router, uri: &str, key: Option<&str>) -> (StatusCode, Value) {
    let mut b = Request::builder().uri(uri);
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let resp = app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `/openapi.json` as the router serves it (no key).
async fn served_document() -> Value {
    let (state, _tx) = state();
    let app = router(state);
    let (status, doc) = get_json(&app, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "/openapi.json is public: {doc}");
    doc
}

/// Every documented `(path, method)`.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((path.clone(), m.to_owned()));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_route_of_the_router_is_documented_and_nothing_else() {
    let routes = source_routes();
    // Not vacuous: the reader finds the routes of every family.
    assert!(
        routes.len() >= 50,
        "only {} registrations read",
        routes.len()
    );
    for (path, method) in [
        ("/api/v1/tasks", "post"),
        ("/api/admin/nodes/{id}/tasks", "post"),
        ("/v1/models/{*id}", "get"),
        ("/vcp-distributed-server/{key}", "get"),
        ("/ABPlog", "get"),
        ("/dashboard/", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            routes.iter().any(|r| r.path == path && r.method == method),
            "the reader missed {method} {path}"
        );
    }
    let doc = served_document().await;
    let documented = documented(&doc);
    let missing: Vec<String> = routes
        .iter()
        .filter(|r| !documented.contains(&(openapi_path(&r.path), r.method.clone())))
        .map(|r| {
            format!(
                "{} {} (registered at {})",
                r.method.to_uppercase(),
                r.path,
                r.at
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "routes of the router missing from /openapi.json: add a #[utoipa::path] to the \
         handler and list it in hub/src/http/openapi.rs (or an ALIASES entry):\n{}",
        missing.join("\n")
    );
    let registered: BTreeSet<(String, String)> = routes
        .iter()
        .map(|r| (openapi_path(&r.path), r.method.clone()))
        .collect();
    let extra: Vec<_> = documented.difference(&registered).collect();
    assert!(
        extra.is_empty(),
        "/openapi.json documents routes the router does not have: {extra:?}"
    );
}

#[test]
fn the_route_reader_reads_methods_and_refuses_what_it_cannot_check() {
    let src = r#"
        // .route("/commented", get(x))
        Router::new()
            .route("/a", post(tasks::create).get(tasks::list))
            .route(
                "/b/{id}",
                get(nodes::get).delete(|| async { inner(1) }),
            )
            .route("/c/{*rest}", routing::put(handler))
            .route(
                "/d/{id}",
                needs(NodesRead, get(nodes::get)).merge(needs(NodesWrite, delete(nodes::remove))),
            );
    "#;
    let got = registrations(src, "x.rs").unwrap();
    let pairs: Vec<(&str, &str)> = got
        .iter()
        .map(|r| (r.path.as_str(), r.method.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("/a", "post"),
            ("/a", "get"),
            ("/b/{id}", "get"),
            ("/b/{id}", "delete"),
            ("/c/{*rest}", "put"),
            ("/d/{id}", "get"),
            ("/d/{id}", "delete"),
        ]
    );
    assert_eq!(openapi_path("/c/{*rest}"), "/c/{rest}");
    for bad in [
        r#"r.route(&format!("{base}/x"), get(h))"#,
        r#"r.route(PATH, get(h))"#,
        r#"r.route("/x", any(h))"#,
        r#"r.nest("/x", other)"#,
        r#"r.route_service("/x", svc)"#,
    ] {
        let e = registrations(bad, "x.rs").unwrap_err();
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
    }
}

/// A concrete URI for a documented path: each `{param}` replaced by a value the handler gets
/// past routing with.
fn concrete(path: &str) -> String {
    path.replace("{id}", "drift-check")
        .replace("{name}", "drift-check")
        .replace("{plugin}", "drift-check")
        .replace("{taskId}", "drift-check")
        .replace("{session_id}", "drift-check")
        .replace("{key}", "VCP_Key=wrong-key")
        .replace("{build}", "0000")
        .replace(
            "{file}",
            if path.starts_with("/docs") {
                "swagger-ui.css"
            } else {
                "app.js"
            },
        )
}

#[tokio::test]
async fn every_documented_operation_reaches_its_handler() {
    let doc = served_document().await;
    let (state, _tx) = state();
    let app = router(state);
    for (path, method) in documented(&doc) {
        let uri = concrete(&path);
        assert!(!uri.contains('{'), "no sample value for {path}");
        let mut req = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            continue;
        }
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            apex_hub::http::error::is_error_body(&body),
            "{method} {uri}: {status} {body}"
        );
        let code = body["error"]["code"].as_str().unwrap();
        assert!(
            code != "unknown_route" && code != "method_not_allowed",
            "documented {method} {path} is not routed ({uri}: {status} {body})"
        );
    }
}

#[tokio::test]
async fn every_error_response_is_the_shared_error_body() {
    let doc = served_document().await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{m} {path}: no id"));
            assert!(ids.insert(id.to_owned()), "operation id {id} twice");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("500"), "{m} {path}: no 500");
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{m} {path} {code}"
                    );
                }
            }
            let keyed = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if keyed {
                assert!(
                    responses.contains_key("401"),
                    "{m} {path}: keyed without 401"
                );
            }
        }
    }
    // The list endpoints take page, limit and sort.
    for path in ["/api/v1/tasks", "/v1/nodes", "/api/admin/nodes"] {
        let params: Vec<&str> = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for want in ["page", "limit", "sort"] {
            assert!(params.contains(&want), "{path}: {params:?}");
        }
    }
    // Request bodies are documented.
    for (path, method) in [
        ("/api/v1/tasks", "post"),
        ("/api/v1/tasks/batch", "post"),
        ("/v1/nodes/{id}/tasks", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/interrupt", "post"),
        ("/v1/config", "put"),
    ] {
        assert!(
            doc["paths"][path][method]["requestBody"].is_object(),
            "{method} {path} has no request body"
        );
    }
}

#[tokio::test]
async fn server_tools_fields_are_documented() {
    let doc = served_document().await;
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["ChatCompletionRequest"]["properties"]["server_tools"].is_object(),
        "{}",
        schemas["ChatCompletionRequest"]
    );
    let completion = &schemas["ChatCompletion"]["properties"];
    assert!(completion["apex_tool_runs"].is_object(), "{completion}");
    assert!(completion["apex_tool_rounds_exhausted"].is_object());
    for field in ["task_id", "tool", "tool_call_id", "duration_ms", "status"] {
        assert!(
            schemas["ToolRun"]["properties"][field].is_object(),
            "ToolRun.{field}: {}",
            schemas["ToolRun"]
        );
    }
}
