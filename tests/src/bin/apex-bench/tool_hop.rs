//! The `tool-hop` suite: the hub → node → hub hop of one server-side tool call, excluding
//! model time.
//!
//! A hub with the built-in `mock` provider (no network, answers at once) and one node; a
//! closed-loop client sends chat completions with `"server_tools": ["noop"]` whose prompt
//! names `noop`, so the mock calls it once and then answers with its result. Each response's
//! `apex_tool_runs[0].duration_ms` is the hop as the tool loop measures it: from submitting
//! the call's task through the task service (accepted and durable) to having its result
//! (dispatched to the node, run, committed, read back). Measured with the hub's default store
//! (embedded, fsynced group commits) and with the memory store. The client-side latency of
//! the whole request (two mock rounds and the hop) is shown beside it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::stats::{ms, percentile};
use apex_tests::{Hub, HubOptions, Node, NodeOptions};
use serde_json::{Value, json};

use super::Row;

/// Settings of the suite (from the command line).
pub(crate) struct ToolHopArgs {
    /// Measured requests per store.
    pub samples: usize,
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &ToolHopArgs) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for store in ["embedded", "memory"] {
        let (hops, whole) = measure(store, args.samples).await?;
        let p = |v: &[Duration], q: f64| percentile(v, q).map(ms).unwrap_or_default();
        rows.push(Row {
            metric: format!("tool hop hub→node→hub, {store} store: p50"),
            value: p(&hops, 50.0),
            target: "",
        });
        rows.push(Row {
            metric: format!("tool hop hub→node→hub, {store} store: p99"),
            value: p(&hops, 99.0),
            target: "<= 5 ms",
        });
        rows.push(Row {
            metric: format!("  whole request (2 mock rounds + hop), {store}: p50 / p99"),
            value: format!("{} / {}", p(&whole, 50.0), p(&whole, 99.0)),
            target: "",
        });
    }
    Ok(rows)
}

/// `samples` measured calls (after a warm-up) against a fresh hub on `store`: the hops and the
/// whole requests, each sorted.
async fn measure(store: &str, samples: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n",
    )?;
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--config".into(),
            cfg.display().to_string(),
            "--store".into(),
            store.into(),
        ],
        ..HubOptions::default()
    })
    .await?;
    let _node = Node::start(&hub, NodeOptions::named("hop-1")).await?;
    eprintln!("tool-hop: hub {} ({store} store), one node", hub.url());
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("{}/v1/chat/completions", hub.url());
    let body = json!({"model": "mock", "messages": [{"role": "user", "content": "run noop"}],
                      "server_tools": ["noop"]});
    let warm = (samples / 10).clamp(50, 500);
    let mut hops = Vec::with_capacity(samples);
    let mut whole = Vec::with_capacity(samples);
    for i in 0..warm + samples {
        let t0 = Instant::now();
        let r = http
            .post(&url)
            .bearer_auth(hub.api_key())
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        let took = t0.elapsed();
        if !status.is_success() {
            bail!("chat completion answered {status}: {v}");
        }
        let run = &v["apex_tool_runs"][0];
        if run["status"] != "succeeded" {
            bail!("the noop call did not succeed: {v}");
        }
        let hop = run["duration_ms"]
            .as_f64()
            .context("apex_tool_runs[0].duration_ms missing")?;
        if i >= warm {
            hops.push(Duration::from_secs_f64(hop / 1000.0));
            whole.push(took);
        }
    }
    hops.sort();
    whole.sort();
    Ok((hops, whole))
}
