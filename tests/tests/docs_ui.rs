//! The API docs of a real hub: `/openapi.json`, Swagger UI at `/docs` and ReDoc at `/redoc`
//! are public and served whole by the hub (HTTP checks), and both pages render in headless
//! Debian Chromium with every request off the hub blocked (`tests/dashboard/docs.mjs`): Swagger
//! UI shows the operations and runs "Try it out" against the hub, ReDoc shows the document.
//! Screenshots: `target/docs.png`, `target/docs-redoc.png` (or `$APEX_DOCS_SCREENSHOT`).
//!
//! Needs Debian's `chromium` (`/usr/bin/chromium`, or `$CHROMIUM`) and `npm ci` run in
//! `tests/dashboard`; `scripts/test.sh` installs both.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apex_tests::Hub;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION};

/// Longest the browser run may take on a loaded 2-core machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test]
async fn docs_are_public_and_served_by_the_hub() -> Result<()> {
    let hub = Hub::start_default().await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let url = |p: &str| format!("{}{p}", hub.url());

    // The document: public, OpenAPI 3.1, the hub's routes and the one error schema.
    let resp = http.get(url("/openapi.json")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    let doc: serde_json::Value = resp.json().await?;
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/v1/tasks",
        "/v1/nodes",
        "/api/admin/nodes",
        "/v1/chat/completions",
        "/distributed-server/{key}",
    ] {
        assert!(doc["paths"][path].is_object(), "no {path} in the document");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());

    // Swagger UI: /docs → /docs/, its files from the hub, the page under a strict CSP.
    let resp = http.get(url("/docs")).send().await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "docs/");
    let resp = http.get(url("/docs/")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()[CONTENT_SECURITY_POLICY].to_str()?.to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = resp.text().await?;
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "Swagger UI's page names another origin: {html}"
    );
    let init = http
        .get(url("/docs/swagger-initializer.js"))
        .send()
        .await?
        .text()
        .await?;
    assert!(init.contains("../openapi.json"), "{init}");
    assert!(init.contains("\"validatorUrl\": \"none\""), "{init}");
    let js = http.get(url("/docs/swagger-ui-bundle.js")).send().await?;
    assert_eq!(js.status(), StatusCode::OK);
    assert!(js.bytes().await?.len() > 100_000);

    // ReDoc: the page and the embedded script.
    let resp = http.get(url("/redoc")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key(CONTENT_SECURITY_POLICY));
    let html = resp.text().await?;
    assert!(html.contains("spec-url=\"openapi.json\""), "{html}");
    assert!(
        !html.contains("https://"),
        "ReDoc's page names another origin: {html}"
    );
    let resp = http.get(url("/redoc/redoc.standalone.js")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    let js = resp.text().await?;
    assert!(js.contains("\"2.5.4\""), "not ReDoc 2.5.4");
    Ok(())
}

/// Chromium, node and the Playwright package, or a message saying how to get them.
fn browser_prerequisites(root: &Path) -> Result<PathBuf> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        bail!(
            "{} not found: the docs test needs Debian's chromium (`apt-get install chromium`, \
             or run scripts/test.sh, which installs it; $CHROMIUM names another binary)",
            chromium.display()
        );
    }
    let pw = root.join("tests/dashboard/node_modules/playwright-core");
    if !pw.is_dir() {
        bail!(
            "{} is missing: run `npm ci` in tests/dashboard (scripts/test.sh does it)",
            pw.display()
        );
    }
    Ok(chromium)
}

#[tokio::test]
async fn docs_render_in_headless_chromium_without_network() -> Result<()> {
    let root = workspace_root();
    let chromium = browser_prerequisites(&root)?;
    let shot = std::env::var_os("APEX_DOCS_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/docs.png"));
    let _ = std::fs::remove_file(&shot);
    let hub = Hub::start_default().await?;
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/dashboard/docs.mjs"))
        .current_dir(&root)
        .env("APEX_URL", hub.url())
        .env("APEX_API_KEY", hub.api_key())
        .env("APEX_SCREENSHOT", &shot)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(BROWSER_TIMEOUT, run).await {
        Ok(r) => r.context("running node tests/dashboard/docs.mjs")?,
        Err(_) => bail!("the browser run did not finish within {BROWSER_TIMEOUT:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines() {
        eprintln!("[docs.mjs] {line}");
    }
    assert!(
        out.status.success() && stdout.contains("DOCS OK"),
        "docs.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "STEP swagger-rendered",
        "STEP swagger-try-it-out 200",
        "STEP redoc-rendered",
    ] {
        assert!(stdout.contains(step), "missing {step}:\n{stdout}");
    }
    let png =
        std::fs::read(&shot).with_context(|| format!("no screenshot at {}", shot.display()))?;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} is not a real screenshot",
        shot.display()
    );
    Ok(())
}
