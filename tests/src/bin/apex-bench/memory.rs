//! The `memory` suite: what memory search costs.
//!
//! - **Hot path**: the one thing a turn does for the index is call the chat hook, which queues
//!   a pointer for the feed. Measured in process (the hub's own `Memory::chat_hooks`, its feeder
//!   and tailer running on a memory store): `--memory-hook-calls` calls, per-call p50/p99.
//!   Then the turn latency through `POST /api/v1/chat` (mock model, embedded store) with
//!   `memory.enabled` true and false, `--memory-turns` turns each.
//! - **Query**: a hub (embedded store) given `--memory-messages` messages (default 100,000:
//!   half as many turns through `/api/v1/chat`, `--memory-sessions` sessions at once), then
//!   `--memory-queries` queries through `POST /api/v1/memory/query` one after another: common
//!   words (matching about half the messages), rare ones (one message in a thousand), a CJK
//!   word. p50/p99 over HTTP, plus the time the index took to catch up and its size on disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::stats::{ms, percentile};
use apex_tests::{Hub, HubOptions};
use futures::StreamExt;
use serde_json::{Value, json};

use super::Row;

/// Settings of the suite (from the command line).
pub(crate) struct MemoryArgs {
    /// Messages stored before the queries are measured.
    pub messages: usize,
    /// Sessions the messages are sent in at once.
    pub sessions: usize,
    /// Queries measured.
    pub queries: usize,
    /// Turns measured with memory on and off.
    pub turns: usize,
    /// In-process hook calls measured.
    pub hook_calls: usize,
}

const WORDS: [&str; 16] = [
    "schedule",
    "report",
    "monday",
    "remind",
    "meeting",
    "notes",
    "please",
    "summarise",
    "yesterday",
    "discussion",
    "budget",
    "travel",
    "invoice",
    "garden",
    "recipe",
    "weather",
];

/// Message `i`: 6 to 20 words of [`WORDS`], one in a thousand with a rare `ref<i>` token, one
/// in ten with Chinese text.
fn message(i: usize) -> String {
    let n = 6 + (i * 7) % 15;
    let mut words: Vec<String> = (0..n)
        .map(|k| WORDS[(i * 31 + k * 7) % WORDS.len()].to_owned())
        .collect();
    if i % 1000 == 7 {
        words.push(format!("ref{i}"));
    }
    if i % 10 == 3 {
        words.push("明天的会议安排".to_owned());
    }
    words.join(" ")
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &MemoryArgs) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    hook_cost(args.hook_calls, &mut rows).await?;
    for enabled in [false, true] {
        let lat = turn_latency(enabled, args.turns).await?;
        let p = |q: f64| percentile(&lat, q).map(ms).unwrap_or_default();
        rows.push(Row {
            metric: format!(
                "turn latency, mock model, embedded store, memory.enabled = {enabled}, p50 / p99"
            ),
            value: format!("{} / {}", p(50.0), p(99.0)),
            target: "",
        });
    }
    query_latency(args, &mut rows).await?;
    Ok(rows)
}

async fn hook_cost(calls: usize, rows: &mut Vec<Row>) -> Result<()> {
    let config = apex_hub::config::Config {
        store: "memory".to_owned(),
        ..Default::default()
    };
    let gateway = Arc::new(apex_hub::llm::GatewayHandle::new(
        apex_hub::llm::Gateway::empty(),
    ));
    let records = apex_hub::records::RecordStore::memory();
    let memory = apex_hub::memory::Memory::ram(records, gateway, &config);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _loops = memory.spawn(stop);
    let hooks = memory.chat_hooks();
    let hook = hooks.on_stored.context("no chat hook")?;
    let session = apex_hub::chat::Session {
        session_id: "bench".to_owned(),
        owner: "admin".to_owned(),
        ..Default::default()
    };
    let msg = |id: u64, role: &str| apex_hub::chat::StoredMessage {
        id: id.to_string(),
        role: role.to_owned(),
        content: "a message of ordinary length for the hot path".to_owned(),
        ts: 0,
        tok: 10,
        model: None,
        cut: false,
    };
    let mut lat = Vec::with_capacity(calls);
    for i in 0..calls as u64 {
        let msgs = [msg(2 * i + 1, "user"), msg(2 * i + 2, "assistant")];
        let t0 = Instant::now();
        hook(&session, &msgs);
        lat.push(t0.elapsed());
        if i % 4096 == 4095 {
            // Let the feeder drain so the queue never fills.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort();
    let p = |q: f64| {
        percentile(&lat, q)
            .map(|d| format!("{:.2} µs", d.as_secs_f64() * 1e6))
            .unwrap_or_default()
    };
    rows.push(Row {
        metric: format!("indexing on a turn's hot path (the chat hook), {calls} calls, p50 / p99"),
        value: format!("{} / {}", p(50.0), p(99.0)),
        target: "<= 1 ms",
    });
    rows.push(Row {
        metric: "  entries dropped (feed queue full)".to_owned(),
        value: memory.dropped().to_string(),
        target: "0",
    });
    Ok(())
}

async fn hub(dir: &std::path::Path, memory_enabled: bool) -> Result<Hub> {
    let cfg = dir.join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n\
             [chat]\ncontext_max_tokens = 256\n[memory]\nenabled = {memory_enabled}\n"
        ),
    )?;
    Hub::start(HubOptions {
        extra_args: vec!["--config".into(), cfg.display().to_string()],
        data_dir: Some(dir.join("data")),
        ..HubOptions::default()
    })
    .await
}

async fn turn(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    session: &str,
    msg: String,
) -> Result<()> {
    let r = http
        .post(url)
        .bearer_auth(key)
        .json(&json!({"message": msg, "session_id": session}))
        .send()
        .await?;
    let status = r.status();
    if !status.is_success() {
        let v: Value = r.json().await.unwrap_or_default();
        bail!("a turn answered {status}: {v}");
    }
    r.bytes().await?;
    Ok(())
}

async fn turn_latency(enabled: bool, turns: usize) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let hub = hub(dir.path(), enabled).await?;
    eprintln!("memory: turn latency, memory.enabled = {enabled}, {turns} turns");
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("{}/api/v1/chat", hub.url());
    for i in 0..50 {
        turn(&http, &url, hub.api_key(), "warm", message(i)).await?;
    }
    let mut lat = Vec::with_capacity(turns);
    for i in 0..turns {
        let t0 = Instant::now();
        turn(
            &http,
            &url,
            hub.api_key(),
            &format!("s{}", i % 8),
            message(i),
        )
        .await?;
        lat.push(t0.elapsed());
    }
    lat.sort();
    Ok(lat)
}

async fn query_latency(args: &MemoryArgs, rows: &mut Vec<Row>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = hub(dir.path(), true).await?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("{}/api/v1/chat", hub.url());
    let turns = args.messages.div_ceil(2);
    eprintln!(
        "memory: storing {} messages ({turns} turns, {} sessions at once)",
        turns * 2,
        args.sessions
    );
    let t0 = Instant::now();
    let sessions = args.sessions.max(1);
    let key = hub.api_key().to_owned();
    let results: Vec<Result<()>> = futures::stream::iter(0..sessions)
        .map(|s| {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move {
                let mut i = s;
                while i < turns {
                    turn(&http, &url, &key, &format!("s{s}"), message(i)).await?;
                    i += sessions;
                    if s == 0 && i % 10_000 < sessions {
                        eprintln!("  {i} turns");
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(sessions)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let stored = t0.elapsed();
    let qurl = format!("{}/api/v1/memory/query", hub.url());
    let q = |text: String, limit: u64| {
        let (http, qurl, key) = (http.clone(), qurl.clone(), key.clone());
        async move {
            let r = http
                .post(&qurl)
                .bearer_auth(&key)
                .json(&json!({"query": text, "limit": limit}))
                .send()
                .await?;
            let status = r.status();
            let v: Value = r.json().await?;
            if !status.is_success() {
                bail!("a query answered {status}: {v}");
            }
            Ok::<Value, anyhow::Error>(v)
        }
    };
    // Wait until the index holds every message: the last rare token is found.
    let t1 = Instant::now();
    let last_rare = (0..turns).rev().find(|i| i % 1000 == 7).unwrap_or(7);
    loop {
        let v = q(format!("ref{last_rare}"), 1).await?;
        if v["results"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        if t1.elapsed() > Duration::from_secs(600) {
            bail!("the index did not catch up within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = t1.elapsed();
    let index_bytes = dir_size(&dir.path().join("data").join("memory-index"));
    let queries: Vec<String> = (0..args.queries)
        .map(|i| match i % 4 {
            0 => WORDS[i % WORDS.len()].to_owned(),
            1 => format!(
                "{} {}",
                WORDS[i % WORDS.len()],
                WORDS[(i * 5 + 3) % WORDS.len()]
            ),
            2 => format!("ref{}", (i * 1000 + 7) % turns.max(8)),
            _ => "会议".to_owned(),
        })
        .collect();
    for text in queries.iter().take(50) {
        q(text.clone(), 10).await?;
    }
    let mut lat = Vec::with_capacity(queries.len());
    let mut found = 0usize;
    for text in &queries {
        let t = Instant::now();
        let v = q(text.clone(), 10).await?;
        lat.push(t.elapsed());
        found += v["results"].as_array().map_or(0, Vec::len);
    }
    lat.sort();
    let p = |q: f64| percentile(&lat, q).map(ms).unwrap_or_default();
    rows.push(Row {
        metric: format!(
            "memory query over {} stored messages, HTTP, limit 10, p50 / p99",
            turns * 2
        ),
        value: format!("{} / {}", p(50.0), p(99.0)),
        target: "p99 <= 10 ms",
    });
    rows.push(Row {
        metric: format!("  {} queries: results returned", queries.len()),
        value: found.to_string(),
        target: "",
    });
    rows.push(Row {
        metric: format!("  storing {} turns ({sessions} sessions at once)", turns),
        value: format!(
            "{:.1} s ({:.0} turns/s)",
            stored.as_secs_f64(),
            turns as f64 / stored.as_secs_f64()
        ),
        target: "",
    });
    rows.push(Row {
        metric: "  index caught up after the last turn".to_owned(),
        value: format!("{:.2} s", caught_up.as_secs_f64()),
        target: "",
    });
    rows.push(Row {
        metric: "  index size on disk".to_owned(),
        value: format!(
            "{:.1} MB ({:.0} bytes per message)",
            index_bytes as f64 / 1e6,
            index_bytes as f64 / (turns * 2) as f64
        ),
        target: "",
    });
    Ok(())
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
