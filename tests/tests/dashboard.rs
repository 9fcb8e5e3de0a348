//! The operator dashboard at `/dashboard`: its embedded assets as HTTP serves them, and the page
//! itself driven in headless Debian Chromium by Playwright (`tests/dashboard/dashboard.mjs`)
//! against a real hub and a real apex-node: sign-in (a wrong key refused), a node appearing
//! live, tasks completing in the list and the task view, status and tool filters, at most one
//! task-list render per second under traffic, drain and undrain, the live log tail, the
//! overview, sign-out and a revoked saved key, and screenshots (`target/dashboard*.png`, or
//! `$APEX_DASHBOARD_SCREENSHOT`).
//!
//! Needs Debian's `chromium` (`/usr/bin/chromium`, or `$CHROMIUM`) and `npm ci` run in
//! `tests/dashboard`; `scripts/test.sh` installs both.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apex_tests::api::json_of;
use apex_tests::{Hub, Node, NodeOptions};
use reqwest::StatusCode;
use reqwest::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Longest the whole browser run may take on a loaded 2-core machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(240);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `/dashboard/assets/<build>` as written in the page.
fn asset_base(html: &str) -> String {
    const PREFIX: &str = "/dashboard/assets/";
    let start = html.find(PREFIX).expect("index.html names no asset") + PREFIX.len();
    let build: String = html[start..].chars().take_while(|c| *c != '/').collect();
    assert!(!build.is_empty(), "no build id in {html}");
    format!("{PREFIX}{build}")
}

#[tokio::test]
async fn dashboard_assets_are_public_typed_and_cached() -> Result<()> {
    let hub = Hub::start_default().await?;
    let http = reqwest::Client::new();

    // The page is public (it holds no data) and revalidated on every load.
    for path in ["/dashboard", "/dashboard/"] {
        let resp = http.get(format!("{}{path}", hub.url())).send().await?;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers().clone();
        assert_eq!(h[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[CACHE_CONTROL], "no-cache");
        assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
        let csp = h[CONTENT_SECURITY_POLICY].to_str()?;
        assert!(
            csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        let body = resp.text().await?;
        assert!(body.contains("<title>apex"), "{body}");
        // Sent back with its ETag, the page is not sent again.
        let again = http
            .get(format!("{}{path}", hub.url()))
            .header(IF_NONE_MATCH, h[ETAG].clone())
            .send()
            .await?;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }

    let html = http
        .get(format!("{}/dashboard", hub.url()))
        .send()
        .await?
        .text()
        .await?;
    let base = asset_base(&html);
    for (file, ct) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("views.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let resp = http
            .get(format!("{}{base}/{file}", hub.url()))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::OK, "{file}");
        assert_eq!(resp.headers()[CONTENT_TYPE], ct, "{file}");
        assert_eq!(
            resp.headers()[CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{file}"
        );
        assert!(!resp.bytes().await?.is_empty(), "{file} is empty");
    }
    // An asset URL of another build still answers, but must not be cached for a year.
    let resp = http
        .get(format!(
            "{}/dashboard/assets/0000000000000000/app.js",
            hub.url()
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CACHE_CONTROL], "no-cache");
    // An unknown file is a 404 in the API's one error shape.
    let resp = http
        .get(format!("{}{base}/secrets.txt", hub.url()))
        .send()
        .await?;
    let (status, body) = json_of(resp).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].is_string(), "{body}");
    // The data the page shows still needs the key.
    let resp = http.get(format!("{}/v1/nodes", hub.url())).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

/// Chromium, node and the Playwright package, or a message saying how to get them.
fn browser_prerequisites(root: &Path) -> Result<PathBuf> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        bail!(
            "{} not found: the dashboard test needs Debian's chromium \
             (`apt-get install chromium`, or run scripts/test.sh, which installs it; \
             $CHROMIUM names another binary)",
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
    if std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        bail!("`node` not found: the dashboard test runs its Playwright script with Node.js");
    }
    Ok(chromium)
}

#[tokio::test]
async fn dashboard_in_headless_chromium() -> Result<()> {
    let root = workspace_root();
    let chromium = browser_prerequisites(&root)?;
    let shot = std::env::var_os("APEX_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/dashboard.png"));
    let _ = std::fs::remove_file(&shot);

    let hub = Hub::start_default().await?;
    let node_name = "dashboard-node-1";
    let mut child = Command::new("node")
        .arg(root.join("tests/dashboard/dashboard.mjs"))
        .current_dir(&root)
        .env("APEX_URL", hub.url())
        .env("APEX_API_KEY", hub.api_key())
        .env("APEX_NODE_NAME", node_name)
        .env("APEX_SCREENSHOT", &shot)
        .env("APEX_WAIT_EMPTY", "1")
        .env("APEX_EXPECT_NODES", "2")
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting node tests/dashboard/dashboard.mjs")?;
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
        s
    });

    // The script signs in, sees the nodes table empty, and says so: only then does the node
    // start, so its row has to appear while the page is open.
    // A second node joins once the first is seen, so the overview counts two.
    let mut node: Option<Node> = None;
    let mut second: Option<Node> = None;
    let mut seen = Vec::new();
    let run = async {
        while let Some(line) = stdout.next_line().await? {
            eprintln!("[dashboard.mjs] {line}");
            if line == "STEP nodes-empty" && node.is_none() {
                node = Some(Node::spawn(&hub, &NodeOptions::named(node_name))?);
            }
            if line.starts_with("STEP node-online") && second.is_none() {
                second = Some(Node::spawn(&hub, &NodeOptions::named("dashboard-node-2"))?);
            }
            seen.push(line);
        }
        anyhow::Ok(child.wait().await?)
    };
    let status = match tokio::time::timeout(BROWSER_TIMEOUT, run).await {
        Ok(r) => r?,
        Err(_) => bail!(
            "the browser run did not finish within {BROWSER_TIMEOUT:?}; its steps so far: {seen:?}"
        ),
    };
    let err = stderr_task.await.unwrap_or_default();
    assert!(
        status.success() && seen.iter().any(|l| l.starts_with("DASHBOARD OK")),
        "the dashboard script failed ({status}); steps: {seen:#?}\nstderr:\n{err}"
    );
    assert!(
        node.is_some(),
        "the node was never started: the script did not see the empty nodes table"
    );
    for step in [
        "STEP wrong-key-refused",
        "STEP task-succeeded-in-list",
        "STEP task-view",
        "STEP node-drained",
        "STEP node-undrained",
        "STEP overview",
        "STEP stale-key-refused",
    ] {
        assert!(seen.iter().any(|l| l == step), "missing {step}: {seen:#?}");
    }
    let png =
        std::fs::read(&shot).with_context(|| format!("no screenshot at {}", shot.display()))?;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} is not a real screenshot ({} bytes)",
        shot.display(),
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    Ok(())
}

/// Median time of `n` authenticated GETs of `path`, in milliseconds, and the last body's
/// `meta.total`.
async fn time_get(hub: &Hub, path: &str, n: usize) -> Result<(f64, serde_json::Value)> {
    let mut times = Vec::with_capacity(n);
    let mut total = serde_json::Value::Null;
    for _ in 0..n {
        let start = std::time::Instant::now();
        let resp = hub.api().request(reqwest::Method::GET, path).send().await?;
        let (status, body) = json_of(resp).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        if status != StatusCode::OK {
            bail!("GET {path} answered {status}: {body}");
        }
        total = body["meta"]["total"].clone();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[n / 2], total))
}

/// The dashboard against a big cluster: `APEX_SCALE_NODES` raw nodes (default 10,000) and
/// `APEX_SCALE_TASKS` tasks (default 1,000,000), some draining, most tasks run by two real
/// nodes. Prints the hub's time for each list call the dashboard makes and the time each view
/// takes to show its page in Chromium (`tests/dashboard/scale.mjs`); asserts only that every
/// view shows its data. A measurement, not part of CI:
/// `cargo test -p apex-tests --test dashboard -- --ignored --nocapture dashboard_at_scale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: several minutes and gigabytes of memory"]
async fn dashboard_at_scale() -> Result<()> {
    use futures::StreamExt;
    use serde_json::json;

    let root = workspace_root();
    let chromium = browser_prerequisites(&root)?;
    let n_nodes: usize = std::env::var("APEX_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let n_tasks: usize = std::env::var("APEX_SCALE_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // Raw nodes answer pings only when this busy process gets to them: relaxed liveness keeps
    // the 10,000 of them online while a million tasks are submitted.
    let hub = Hub::start(apex_tests::HubOptions {
        heartbeat_interval_ms: Some(5_000),
        heartbeat_timeout_ms: Some(120_000),
        ..apex_tests::HubOptions::default()
    })
    .await?;

    let start = std::time::Instant::now();
    let raw: Vec<apex_tests::RawNode> = futures::stream::iter(0..n_nodes)
        .map(|i| {
            let hub = &hub;
            async move {
                let id = format!("scale-node-{i:05}");
                let tool = format!("tool-{}", i % 100);
                apex_tests::RawNode::connect_registered(
                    hub,
                    &id,
                    &[tool.as_str(), "shared"],
                    (i % 16) as u32 + 1,
                )
                .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    eprintln!(
        "SETUP {} raw nodes registered in {:.1} s",
        raw.len(),
        start.elapsed().as_secs_f64()
    );
    for i in (0..n_nodes).step_by(20) {
        let path = format!("/v1/nodes/scale-node-{i:05}/drain");
        let resp = hub
            .api()
            .request(reqwest::Method::POST, &path)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("POST {path} answered {}", resp.status());
        }
    }
    let _workers = [
        Node::start(&hub, NodeOptions::named("scale-worker-1").concurrency(64)).await?,
        Node::start(&hub, NodeOptions::named("scale-worker-2").concurrency(64)).await?,
    ];

    let start = std::time::Instant::now();
    let batches: Vec<usize> = (0..n_tasks.div_ceil(1000)).collect();
    futures::stream::iter(batches)
        .map(|b| {
            let hub = &hub;
            async move {
                let n = 1000.min(n_tasks - b * 1000);
                let tasks: Vec<serde_json::Value> = (0..n)
                    .map(|i| match (b * 1000 + i) % 100 {
                        0 => json!({"tool": "sleep", "args": {"ms": -1}}),
                        1 => json!({"tool": "tool-7", "args": {}}),
                        _ => json!({"tool": "noop", "args": {"i": i}}),
                    })
                    .collect();
                let resp = hub
                    .api()
                    .request(reqwest::Method::POST, "/api/v1/tasks/batch")
                    .json(&json!({ "tasks": tasks }))
                    .send()
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    bail!("batch {b} answered {}", resp.status());
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "SETUP {n_tasks} tasks submitted in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    for path in [
        "/v1/nodes?limit=50",
        "/v1/nodes?status=draining&limit=50",
        "/v1/nodes?tool=tool-42&limit=50",
        "/v1/nodes?page=100&limit=100",
        "/api/v1/tasks?limit=50",
        "/api/v1/tasks?status=succeeded&limit=50",
        "/api/v1/tasks?status=queued&limit=50",
        "/api/v1/tasks?status=failed&limit=8",
        "/api/v1/tasks?tool=tool-7&limit=50",
        "/api/v1/tasks?page=5000&limit=100",
        "/api/v1/system/status",
    ] {
        let (ms, total) = time_get(&hub, path, 5).await?;
        eprintln!("API {path}: median {ms:.1} ms (total {total})");
    }
    let some_task = hub
        .api()
        .list(&[("tool", "noop"), ("limit", "1")])
        .await?
        .data
        .first()
        .map(|t| t.task_id.clone())
        .unwrap_or_default();

    let out = Command::new("node")
        .arg(root.join("tests/dashboard/scale.mjs"))
        .current_dir(&root)
        .env("APEX_URL", hub.url())
        .env("APEX_API_KEY", hub.api_key())
        .env("APEX_TASK_ID", &some_task)
        .env("APEX_NODE_PAGE", (n_nodes / 100).clamp(1, 100).to_string())
        .env("APEX_TASK_PAGE", (n_tasks / 100).clamp(1, 5000).to_string())
        .env("APEX_SCREENSHOT", root.join("target/dashboard-scale.png"))
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        eprintln!("[scale.mjs] {line}");
    }
    assert!(
        out.status.success() && stdout.contains("SCALE OK"),
        "scale.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(raw);
    Ok(())
}
