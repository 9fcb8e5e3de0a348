//! The `plugins` suite: stdio plugins on a real `apex-node` under load, with timeouts.
//!
//! One hub and one node with a POSIX sh plugin (`bench_plugin`, manifest timeout 300 ms):
//! `--plugin-calls` tasks (default 10,000) go in batches; every `1/--plugin-timeout-fraction`-th
//! one hangs with a child and a grandchild of its own until the timeout kills the process
//! group, the others answer at once. Then: the counts by status, plugin runs per second, the
//! submit→result latency of the answering calls (hub timestamps, queueing included), and what
//! is left behind: plugin processes still alive (found by their `APEX_PLUGIN_NAME`), zombies
//! under the node, and the node's open file descriptors before and after.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use apex_tests::process::leftover_processes;
use apex_tests::stats::{parse_rfc3339_ms, percentile};
use apex_tests::{Hub, HubOptions, Node, NodeOptions};
use serde_json::{Value, json};

use super::Row;

/// Settings of the suite (from the command line).
pub(crate) struct PluginArgs {
    /// Plugin calls in all.
    pub calls: usize,
    /// Fraction of them that hang until the manifest's timeout (0 to 1).
    pub timeout_fraction: f64,
    /// Plugin runs the node runs at once.
    pub concurrency: u32,
}

const NAME: &str = "bench_plugin";

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub(crate) async fn run(args: &PluginArgs) -> Result<Vec<Row>> {
    if !(0.0..=1.0).contains(&args.timeout_fraction) || args.calls == 0 {
        bail!("need --plugin-calls >= 1 and 0 <= --plugin-timeout-fraction <= 1");
    }
    let dir = tempfile::tempdir()?;
    let pdir = dir.path().join(NAME);
    std::fs::create_dir_all(&pdir)?;
    std::fs::write(
        pdir.join("plugin.json"),
        format!(r#"{{"name": "{NAME}", "entry_point": "sh run.sh", "timeout": 300}}"#),
    )?;
    std::fs::write(
        pdir.join("run.sh"),
        "input=$(cat)\n\
         case \"$input\" in *hang*) sh -c 'sleep 60 & sleep 60' & sleep 60; wait ;; esac\n\
         echo '{\"status\":\"success\",\"result\":\"ok\"}'\n",
    )?;
    let hub = Hub::start(HubOptions::default()).await?;
    let node = Node::start(
        &hub,
        NodeOptions::named("plugin-bench")
            .concurrency(args.concurrency)
            .args(["--plugin-dir".to_owned(), dir.path().display().to_string()]),
    )
    .await?;
    let api = hub.api().clone();
    let fds_before = open_fds(node.pid());
    let every = if args.timeout_fraction > 0.0 {
        (1.0 / args.timeout_fraction).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let bodies: Vec<Value> = (0..args.calls)
        .map(|i| {
            let mode = if i % every == 0 { "hang" } else { "answer" };
            json!({"tool": NAME, "args": {"mode": mode}, "timeout": 600})
        })
        .collect();
    let hanging = bodies
        .iter()
        .filter(|b| b["args"]["mode"] == "hang")
        .count();
    eprintln!(
        "plugins: {} calls, {hanging} of them hanging until the 300 ms timeout, {} at once",
        args.calls, args.concurrency
    );
    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(1000) {
        ids.extend(api.submit_ids(chunk).await?);
    }
    let tasks = api
        .wait_all_terminal(&ids, Duration::from_secs(3600), 32)
        .await?;
    let elapsed = t0.elapsed();
    let count = |s: &str| tasks.iter().filter(|t| t.status == s).count();
    let mut lat: Vec<i64> = tasks
        .iter()
        .filter(|t| t.status == "succeeded")
        .filter_map(|t| {
            Some(
                parse_rfc3339_ms(t.finished_at.as_deref()?)?
                    - parse_rfc3339_ms(t.created_at.as_deref()?)?,
            )
        })
        .collect();
    lat.sort_unstable();
    // Killed groups are reaped at once; give stragglers a moment before counting.
    let marker = format!("APEX_PLUGIN_NAME={NAME}");
    let mut left = leftover_processes(&marker, node.pid());
    for _ in 0..20 {
        if left.0.is_empty() && left.1.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftover_processes(&marker, node.pid());
    }
    let fds_after = open_fds(node.pid());
    let pick = |p: f64| {
        percentile(&lat, p)
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".into())
    };
    let other = args.calls - count("succeeded") - count("timed_out");
    Ok(vec![
        Row {
            metric: format!(
                "plugin calls ({} sh runs, {} at once)",
                args.calls, args.concurrency
            ),
            value: format!(
                "{} succeeded, {} timed out, {other} other",
                count("succeeded"),
                count("timed_out")
            ),
            target: "",
        },
        Row {
            metric: "  expected timed out".into(),
            value: hanging.to_string(),
            target: "",
        },
        Row {
            metric: "plugin runs per second (wall, timeouts included)".into(),
            value: format!(
                "{:.0}/s in {:.1} s",
                args.calls as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
            target: "",
        },
        Row {
            metric: "answering call submit->result p50 (batch queueing included)".into(),
            value: pick(50.0),
            target: "",
        },
        Row {
            metric: "answering call submit->result p99".into(),
            value: pick(99.0),
            target: "",
        },
        Row {
            metric: "plugin processes left alive".into(),
            value: left.0.len().to_string(),
            target: "0",
        },
        Row {
            metric: "zombies under the node".into(),
            value: left.1.len().to_string(),
            target: "0",
        },
        Row {
            metric: "node open fds before / after".into(),
            value: format!("{fds_before} / {fds_after}"),
            target: "equal",
        },
    ])
}
