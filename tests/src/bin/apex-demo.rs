//! `apex-demo`: the main job. Starts a hub and three `apex-node` processes, submits a few
//! thousand real tasks (`http_fetch` of the hub's own `/health`, `sha256` of the repository's
//! files, `sleep`), kills one node with SIGKILL mid-run, shows progress, prints a summary and
//! leaves the cluster running until Ctrl-C. The nodes load the repository's example plugins
//! (`examples/plugins`): after the main job the demo runs a synchronous one in each manifest
//! format and an asynchronous one that ends its task by a signed callback. Last, a short
//! conversation (`/api/v1/chat`, on the hub's built-in `mock` provider) and a memory query
//! over it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::stats::{parse_rfc3339_ms, percentile};
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, Task};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Runs a real apex cluster (one hub, several nodes as separate processes), pushes a few
/// thousand tasks through it, kills a node with SIGKILL mid-run and shows that every task
/// still succeeds.
///
/// Binaries are taken from $APEX_BIN_DIR, else from the directory of this executable.
#[derive(Debug, Parser)]
#[command(name = "apex-demo", version)]
struct Args {
    /// Tasks to submit (a mix of http_fetch, sha256 and sleep).
    #[arg(long, default_value_t = 2400)]
    tasks: usize,
    /// Node processes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Tasks each node runs at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// Fraction of tasks finished at which one node is killed with SIGKILL (0 = never).
    #[arg(long, default_value_t = 0.4)]
    kill_at: f64,
    /// Directory whose files are hashed by the sha256 tasks (the nodes' file root)
    /// [default: the current directory].
    #[arg(long)]
    file_root: Option<PathBuf>,
    /// Plugin directory the nodes load [default: examples/plugins under the file root, when it
    /// exists].
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Address the hub listens on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Exit right after the summary instead of leaving the cluster running until Ctrl-C.
    #[arg(long)]
    no_wait: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("apex-demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the demo; `Ok(false)` when some task did not succeed.
async fn run(args: Args) -> Result<bool> {
    if args.nodes < 2 && args.kill_at > 0.0 {
        bail!(
            "killing a node needs at least 2 nodes (got --nodes {})",
            args.nodes
        );
    }
    let root = match &args.file_root {
        Some(r) => r.clone(),
        None => std::env::current_dir()?,
    };
    let root =
        std::fs::canonicalize(&root).with_context(|| format!("file root {}", root.display()))?;
    let files = repo_files(&root, 400)?;
    if files.is_empty() {
        bail!("no files to hash under {}", root.display());
    }

    let plugin_dir = match &args.plugin_dir {
        Some(d) => {
            Some(std::fs::canonicalize(d).with_context(|| format!("plugin dir {}", d.display()))?)
        }
        None => Some(root.join("examples/plugins")).filter(|d| d.is_dir()),
    };

    // The hub's config: the built-in `mock` provider, so the conversation needs no network.
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("hub.toml");
    std::fs::write(&config, DEMO_HUB_TOML)?;
    let hub = Hub::start(HubOptions {
        listen: args.listen.clone(),
        api_key: format!("demo-{}", uuid::Uuid::new_v4().simple()),
        extra_args: vec!["--config".to_owned(), config.display().to_string()],
        ..HubOptions::default()
    })
    .await?;
    let api = hub.api().clone();
    eprintln!("hub listening on {} (pid {})", hub.url(), hub.pid());

    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let mut opts = NodeOptions::named(&format!("demo-node-{i}"))
            .concurrency(args.concurrency)
            .args([
                "--file-root".to_owned(),
                root.display().to_string(),
                // The demo fetches the hub's own /health, on loopback, which http_fetch
                // refuses by default.
                "--http-fetch-allow".to_owned(),
                "127.0.0.1".to_owned(),
            ]);
        if let Some(d) = &plugin_dir {
            opts = opts.args(["--plugin-dir".to_owned(), d.display().to_string()]);
        }
        let node = Node::start(&hub, opts).await?;
        eprintln!(
            "node {} online as {} (pid {})",
            node.name(),
            node.id(),
            node.pid()
        );
        nodes.push(node);
    }

    // The task mix.
    let health_url = format!("{}/health", hub.url());
    let bodies: Vec<Value> = (0..args.tasks)
        .map(|i| match i % 10 {
            0..=2 => json!({
                "tool": "http_fetch",
                "args": {"url": health_url, "method": "GET",
                         "headers": {"Authorization": format!("Bearer {}", hub.api_key())}},
                "description": "fetch the hub's own /health",
            }),
            3..=6 => {
                let f = &files[i % files.len()];
                json!({"tool": "sha256", "args": {"path": f}, "description": format!("sha256 {f}")})
            }
            _ => json!({
                "tool": "sleep",
                "args": {"ms": 20 + (i * 7919) % 180},
                "description": "a short sleep",
            }),
        })
        .collect();

    let bar = ProgressBar::new(args.tasks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} [{elapsed_precise}] [{bar:40.cyan/blue}] {pos}/{len} eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));

    let started = Instant::now();
    let mut ids = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(500) {
        ids.extend(api.submit_ids(chunk).await?);
        bar.set_message(format!("submitted {}", ids.len()));
    }

    let kill_after = (args.kill_at * args.tasks as f64).ceil() as u64;
    let mut killed: Option<String> = None;
    let mut last_progress = (0u64, Instant::now());
    let step = (args.tasks as u64 / 10).max(1);
    let finished_at = loop {
        let health = api.health().await?;
        let t = &health["tasks"];
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        let done = n("succeeded") + n("failed") + n("cancelled") + n("timed_out");
        bar.set_position(done);
        let mut msg = format!("ok {} failed {}", n("succeeded"), n("failed"));
        if let Some(k) = &killed {
            msg.push_str(&format!(" | {k} killed"));
        }
        bar.set_message(msg);
        if done >= args.tasks as u64 {
            break Instant::now();
        }
        if killed.is_none() && args.kill_at > 0.0 && done >= kill_after {
            let victim = &mut nodes[args.nodes / 2];
            let in_flight = api
                .node(victim.id())
                .await?
                .and_then(|n| n.active_tasks)
                .unwrap_or(0);
            victim.kill()?;
            say(
                &bar,
                format!(
                    "SIGKILL {} (pid {}) with {in_flight} tasks in flight at {done}/{} done",
                    victim.name(),
                    victim.pid(),
                    args.tasks
                ),
            );
            killed = Some(victim.name().to_owned());
        }
        // Without a terminal the bar is hidden: log a line every 10% instead.
        if bar.is_hidden() && done / step > last_progress.0 / step {
            say(&bar, format!("{done}/{} tasks finished", args.tasks));
        }
        if done > last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(120) {
            bar.abandon();
            bail!(
                "no task finished for 2 minutes ({done}/{} done)",
                args.tasks
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bar.finish_with_message("all tasks finished");
    let elapsed = finished_at - started;

    let tasks = api
        .wait_all_terminal(&ids, Duration::from_secs(60), 32)
        .await?;
    let mut all_ok = summarize(&tasks, elapsed, &nodes);
    if plugin_dir.is_some() {
        all_ok &= plugin_tour(&api).await?;
    }
    all_ok &= conversation(&api).await?;
    all_ok &= research(&api).await?;
    all_ok &= knowledge_query(&api).await?;

    if args.no_wait {
        return Ok(all_ok);
    }
    println!();
    println!("The cluster is still running:");
    println!("  hub      {}", hub.url());
    println!("  API key  {}", hub.api_key());
    println!(
        "  try      curl -s -H 'Authorization: Bearer {}' {}/v1/nodes",
        hub.api_key(),
        hub.url()
    );
    println!("           curl -s {}/health", hub.url());
    println!("Press Ctrl-C to stop it.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping");
    drop(nodes);
    drop(hub);
    Ok(all_ok)
}

/// Runs the example plugins once each and prints what they answered; `Ok(false)` when one
/// did not succeed.
async fn plugin_tour(api: &Api) -> Result<bool> {
    println!();
    println!("plugins (examples/plugins, loaded by every node)");
    let catalogue: Value = api.get_json("/api/v1/plugins").await?;
    for p in catalogue.as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:<8} {:<13} on {} node(s): {}",
            p["name"].as_str().unwrap_or("?"),
            p["version"].as_str().unwrap_or("-"),
            p["plugin_type"].as_str().unwrap_or("-"),
            p["nodes"].as_array().map_or(0, Vec::len),
            p["description"].as_str().unwrap_or("")
        );
    }
    let calls = [
        (
            "word_count",
            json!({"text": "apex runs plugins in any language on its nodes, and the hub lists them all"}),
        ),
        ("disk_free", json!({})),
        (
            "slow_report",
            json!({"topic": "the demo cluster", "seconds": 2}),
        ),
    ];
    let mut ok = true;
    for (tool, args) in calls {
        let started = Instant::now();
        let t = api
            .submit(&json!({"tool": tool, "args": args, "timeout": 60}))
            .await?;
        let t = api
            .wait_terminal(&t.task_id, Duration::from_secs(90))
            .await?;
        let shown = if t.status == "succeeded" {
            t.result.to_string()
        } else {
            ok = false;
            format!("{:?}", t.error)
        };
        println!(
            "  {tool:<12} {} in {} ms: {shown}",
            t.status,
            started.elapsed().as_millis()
        );
    }
    println!("  (slow_report answered `pending` at once and ended its task by a signed callback)");
    Ok(ok)
}

/// The demo hub's config file: the built-in `mock` provider (deterministic text, no network)
/// answers the conversation.
const DEMO_HUB_TOML: &str = r#"[[llm.providers]]
name = "mock"
kind = "mock"
models = ["mock"]
mock_tokens = 16
"#;

/// A short conversation in one session (`POST /api/v1/chat`, then the session's context
/// statistics) and a memory query that finds a word said in it; `Ok(false)` when a turn or
/// the query failed.
async fn conversation(api: &Api) -> Result<bool> {
    println!();
    println!("a conversation (POST /api/v1/chat, the built-in mock provider)");
    let session = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let mut ok = true;
    for message in [
        "Hello! My favourite fruit is the persimmon.",
        "What can an apex cluster run for me?",
        "Thanks, that is all for now.",
    ] {
        let resp = api
            .request(reqwest::Method::POST, "/api/v1/chat")
            .json(&json!({"message": message, "session_id": session}))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            println!("  you: {message}\n  hub: {status} {body}");
            ok = false;
            continue;
        }
        println!("  you: {message}");
        println!(
            "  {}: {}  ({} tokens, {} ms; {})",
            body["model_used"].as_str().unwrap_or("?"),
            body["content"].as_str().unwrap_or(""),
            body["token_count"],
            body["latency_ms"],
            body["reasoning"].as_str().unwrap_or("")
        );
    }
    let stats: Value = api
        .get_json(&format!("/api/v1/chat/context/{session}/stats"))
        .await?;
    println!(
        "  session {session}: {} messages, about {} tokens of context",
        stats["message_count"], stats["token_estimate"]
    );

    // Memory: the conversation is indexed asynchronously; the query waits for the index to
    // take in what the store holds (memory.query_wait_ms).
    println!();
    println!("a memory query (POST /api/v1/memory/query)");
    let resp = api
        .request(reqwest::Method::POST, "/api/v1/memory/query")
        .json(&json!({"query": "persimmon", "limit": 3}))
        .send()
        .await?;
    let status = resp.status();
    let found: Value = resp.json().await?;
    let results = found["results"].as_array().cloned().unwrap_or_default();
    println!("  \"persimmon\": {} result(s)", results.len());
    for r in &results {
        println!(
            "  {:.3}  {} in {}: {}",
            r["score"].as_f64().unwrap_or(0.0),
            r["role"].as_str().unwrap_or("?"),
            r["session_id"].as_str().unwrap_or("-"),
            r["content"].as_str().unwrap_or("")
        );
    }
    if !status.is_success() || results.is_empty() {
        println!("  memory query failed: {status} {found}");
        ok = false;
    }
    Ok(ok)
}

/// Reads a Server-Sent Events answer to its end, calling `each` with every `data:` line's
/// JSON.
async fn read_sse(resp: reqwest::Response, mut each: impl FnMut(&Value)) -> Result<()> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                each(&serde_json::from_str(data)?);
            }
        }
    }
    Ok(())
}

/// A research session on the mock (`POST /api/research/sessions`, then `execute`): every
/// step an `agent.run` task on the demo's nodes; prints the events as they come, then the
/// memory layers. `Ok(false)` when the run did not complete.
async fn research(api: &Api) -> Result<bool> {
    println!();
    println!(
        "a research session (POST /api/research/sessions/{{id}}/execute; agents on the nodes, the mock model)"
    );
    let resp = api
        .request(reqwest::Method::POST, "/api/research/sessions")
        .json(&json!({"name": "demo research", "task": "How did state space models evolve into Mamba?"}))
        .send()
        .await?;
    let session: Value = resp.json().await?;
    let Some(id) = session["id"].as_str() else {
        println!("  session not created: {session}");
        return Ok(false);
    };
    let resp = api
        .request(
            reqwest::Method::POST,
            &format!("/api/research/sessions/{id}/execute"),
        )
        .send()
        .await?;
    let mut done = false;
    read_sse(resp, |e| {
        let d = &e["data"];
        let what = match e["type"].as_str().unwrap_or("") {
            "decomposition_complete" => format!(
                "{} tasks: {}",
                d["tasks"].as_array().map_or(0, Vec::len),
                d["message"].as_str().unwrap_or("")
            ),
            "group_started" => format!("group {} ({} tasks)", d["group"], d["tasks"]),
            "task_started" => format!("{} starts", d["agent_type"].as_str().unwrap_or("?")),
            "task_progress" => {
                format!("{}% {}", d["progress"], d["message"].as_str().unwrap_or(""))
            }
            "task_completed" => format!(
                "{} done ({}% of the run): {}",
                d["agent_type"].as_str().unwrap_or("?"),
                d["progress"],
                d["result"].as_str().unwrap_or("")
            ),
            "task_failed" => format!("failed: {}", d["error"].as_str().unwrap_or("")),
            "synthesis_complete" => d["synthesis"].as_str().unwrap_or("").to_owned(),
            "session_completed" => {
                done = true;
                format!("{} tokens, {} ms", d["total_tokens"], d["duration_ms"])
            }
            "error" => d["error"].as_str().unwrap_or("").to_owned(),
            _ => String::new(),
        };
        println!("  {:<22} {what}", e["type"].as_str().unwrap_or("?"));
    })
    .await?;
    let layers: Value = api
        .get_json(&format!("/api/research/sessions/{id}/memory"))
        .await?;
    for l in layers["layers"].as_array().into_iter().flatten() {
        let files: Vec<&str> = l["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["name"].as_str())
            .collect();
        println!(
            "  memory {}: {}",
            l["layer"].as_str().unwrap_or("?"),
            files.join(", ")
        );
    }
    Ok(done)
}

/// A plan-executor query (`POST /api/v2/query`, the knowledge platform's stream): prints
/// each event's type and stage. `Ok(false)` when it did not reach `END` cleanly.
async fn knowledge_query(api: &Api) -> Result<bool> {
    println!();
    println!("a knowledge query (POST /api/v2/query, the plan-executor stream)");
    let resp = api
        .request(reqwest::Method::POST, "/api/v2/query")
        .json(&json!({"query": "What is my favourite fruit?"}))
        .send()
        .await?;
    let mut ended = false;
    let mut failed = false;
    read_sse(resp, |e| {
        let kind = e["event_type"].as_str().unwrap_or("?");
        let m = &e["messages"][0];
        let what = match kind {
            "PLAN_CHANGE" => format!(
                "{} {}",
                e["context"]["stage_id"].as_str().unwrap_or(""),
                m["status"].as_str().unwrap_or("")
            ),
            "INVOCATION_DECLARED" => m["name"].as_str().unwrap_or("").to_owned(),
            "INVOCATION_CHANGE" => m["content"].as_str().unwrap_or("").to_owned(),
            "ARTIFACT_DECLARED" => m["artifact_type"].as_str().unwrap_or("").to_owned(),
            "STREAM_THING" => {
                let c = m["content"].as_str().unwrap_or("");
                failed |= c.starts_with("❌");
                c.to_owned()
            }
            "STREAM_CONTENT" => m["content"].as_str().unwrap_or("").to_owned(),
            "END" => {
                ended = true;
                String::new()
            }
            _ => String::new(),
        };
        if kind != "ARTIFACT_CHANGE" {
            println!("  {kind:<20} {what}");
        }
    })
    .await?;
    Ok(ended && !failed)
}

/// Prints a line above the progress bar, or to stderr when the bar is hidden (no terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Prints the summary table; returns whether every task succeeded.
fn summarize(tasks: &[Task], elapsed: Duration, nodes: &[Node]) -> bool {
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_tool: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies_ms: Vec<i64> = Vec::with_capacity(tasks.len());
    let mut migrated = 0;
    for t in tasks {
        *by_status.entry(&t.status).or_default() += 1;
        *by_tool.entry(&t.tool).or_default() += 1;
        let node = t.node_id.clone().unwrap_or_else(|| "-".to_owned());
        let name = nodes
            .iter()
            .find(|n| n.id() == node)
            .map(|n| n.name().to_owned())
            .unwrap_or(node);
        *by_node.entry(name).or_default() += 1;
        if t.attempt > 1 {
            migrated += 1;
        }
        let created = t.created_at.as_deref().and_then(parse_rfc3339_ms);
        let finished = t.finished_at.as_deref().and_then(parse_rfc3339_ms);
        if let (Some(c), Some(f)) = (created, finished) {
            latencies_ms.push(f - c);
        }
    }
    latencies_ms.sort_unstable();
    let succeeded = by_status.get("succeeded").copied().unwrap_or(0);
    let failed = tasks.len() - succeeded;
    let fmt_ms = |p: f64| {
        percentile(&latencies_ms, p)
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".to_owned())
    };

    println!();
    println!("apex demo summary");
    println!("  tasks submitted       {}", tasks.len());
    println!("  succeeded             {succeeded}");
    println!("  not succeeded         {failed}");
    println!("  migrated (attempt>1)  {migrated}");
    println!(
        "  throughput            {:.0} tasks/s ({} tasks in {:.2} s)",
        tasks.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        tasks.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "  latency p50           {} (submit -> result; queueing included, all tasks go in at once)",
        fmt_ms(50.0)
    );
    println!("  latency p99           {}", fmt_ms(99.0));
    println!("  by tool               {by_tool:?}");
    println!("  by node (last attempt) {by_node:?}");
    if failed > 0 {
        println!("  statuses              {by_status:?}");
        for t in tasks.iter().filter(|t| t.status != "succeeded").take(5) {
            println!(
                "  e.g. {} {} {}: {:?}",
                t.task_id, t.tool, t.status, t.error
            );
        }
        println!("FAILED: {failed} task(s) did not succeed");
    } else {
        println!("OK: every task succeeded");
    }
    failed == 0
}

/// Up to `max` regular files under `root`, as paths relative to it, skipping build output,
/// VCS data and hidden directories; sorted for a stable mix.
fn repo_files(root: &Path, max: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" || name == "node_modules" {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file()
                && let Ok(rel) = path.strip_prefix(root)
            {
                out.push(rel.to_string_lossy().into_owned());
                if out.len() >= max {
                    out.sort();
                    return Ok(out);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}
