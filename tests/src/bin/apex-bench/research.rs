//! The `research` suite: the research engine's own cost per DAG node, and whether a
//! 10,000-task graph is accepted and runs.
//!
//! Setup per size N (a fresh cluster each, so the hub's histogram and RSS are the run's own):
//! an in-process fake upstream with no delays whose structured answers are a plan of N tasks
//! (key `tasks`) and a small agent result (key `result`); a release hub (embedded store) with
//! that fake as its one provider, `[research] max_plan_tasks` of at least 10,000,
//! `task_timeout_seconds = 3600` and `[node_llm]` unlimited (the nodes' `llm_request`s would
//! otherwise be limited to 60 a minute each); `--research-nodes` nodes with
//! `--research-node-concurrency` tasks each. The bench's key is a config-file key, which
//! `[rate_limits]` does not limit (`apply_to_admin = false`), so `execute` is not limited.
//!
//! The plan is a real DAG: the first ceil(sqrt(N)) tasks have no dependency, task `i` after
//! them depends on task `i / 2` and, when `i` is odd, also on `i / 3`. The group of a task
//! is then one more than the group of `i / 2`, so the widths double: for N = 1,000 six groups
//! (32, 32, 64, 128, 256, 488), for N = 10,000 eight (100 … 3,600).
//!
//! Measured: wall time of `execute` to `session_completed`, events, groups, tasks/s, the time
//! to `decomposition_complete`, the widest group's time, the hub's CPU time during the run and
//! its RSS after; from `/metrics` the `apex_research_step_overhead_seconds` histogram: count
//! (must be N), the fraction at most 1 ms and 2 ms, and p50/p99 interpolated linearly inside
//! the buckets (as Prometheus' `histogram_quantile` does), so they are estimates bounded by
//! the bucket edges. An `error` event, a stream that ends early or an event gap of more than
//! [`STALL`] fails the suite with the last event and the hub's log tail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::api::SseParser;
use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::stats::ms;
use apex_tests::{Hub, HubOptions, Node, NodeOptions};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::Row;
use super::llm::{cpu_ticks, rss_kib};

/// Settings of the suite (from the command line).
pub(crate) struct ResearchArgs {
    /// Plan sizes run one after another, each on a fresh cluster.
    pub sizes: Vec<usize>,
    /// Node processes.
    pub nodes: usize,
    /// `--max-concurrent-tasks` of each node.
    pub node_concurrency: u32,
}

/// Longest wait for the next event of the stream before the run is declared stuck.
const STALL: Duration = Duration::from_secs(120);

/// The metric read from `/metrics`.
const METRIC: &str = "apex_research_step_overhead_seconds";

/// Agent types the plan's tasks are spread over.
const AGENTS: [&str; 4] = ["explorer", "critic", "data_analyst", "writer"];

/// The plan of `n` tasks (see the module docs), as the coordinator answers it.
fn plan(n: usize) -> Value {
    let roots = roots(n);
    let tasks: Vec<Value> = (0..n)
        .map(|i| {
            let priority = ["high", "medium", "low"][i % 3];
            let mut deps: Vec<usize> = Vec::new();
            if i >= roots {
                deps.push(i / 2);
                if i % 2 == 1 && i / 3 != i / 2 {
                    deps.push(i / 3);
                }
            }
            json!({
                "description": format!("Research step {i}"),
                "assigned_agent": AGENTS[i % AGENTS.len()],
                "priority": priority,
                "dependencies": deps,
            })
        })
        .collect();
    json!({ "tasks": tasks })
}

/// Tasks without a dependency: ceil(sqrt(n)).
fn roots(n: usize) -> usize {
    let mut r = (n as f64).sqrt() as usize;
    while r * r < n {
        r += 1;
    }
    r.max(1)
}

/// The execution groups the plan must give: (groups, widest).
fn expected_groups(n: usize) -> (usize, usize) {
    let roots = roots(n);
    let mut depth = vec![0usize; n];
    let mut width: BTreeMap<usize, usize> = BTreeMap::new();
    for i in 0..n {
        if i >= roots {
            depth[i] = depth[i / 2] + 1;
        }
        *width.entry(depth[i]).or_default() += 1;
    }
    (width.len(), width.values().copied().max().unwrap_or(0))
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &ResearchArgs) -> Result<Vec<Row>> {
    if args.nodes == 0 {
        bail!("--research-nodes must be at least 1");
    }
    let mut rows = Vec::new();
    for &n in &args.sizes {
        if !(1..=20_000).contains(&n) {
            bail!("--research-tasks must be 1 to 20000 (the engine's limit), not {n}");
        }
        rows.extend(measure(n, args).await?);
    }
    Ok(rows)
}

/// What the stream of one run showed.
#[derive(Default)]
struct Seen {
    events: usize,
    by_kind: BTreeMap<String, usize>,
    decomposed: Option<Duration>,
    synthesis_started: Option<Duration>,
    /// Start of each group, and its width (from `group_started`).
    group_start: BTreeMap<u64, (Duration, u64)>,
    /// Duration of each completed group.
    group_took: BTreeMap<u64, Duration>,
    last: Option<(String, Value)>,
}

async fn measure(n: usize, args: &ResearchArgs) -> Result<Vec<Row>> {
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["fake-model".to_owned()],
        record: false,
        structured: vec![
            ("tasks".to_owned(), plan(n)),
            (
                "result".to_owned(),
                json!({"result": "finding {seq}", "key_findings": ["k{seq}"],
                       "uncertainties": [], "suggestions": [], "confidence": 0.9}),
            ),
        ],
        ..FakeOptions::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\nmodels = [\"fake-model\"]\n\
             [agents]\nrole_model = \"fake-model\"\n\
             [research]\nmax_plan_tasks = {}\ntask_timeout_seconds = 3600\n\
             [node_llm]\nrequests_per_minute = 0\nmax_concurrent_streams = 0\n",
            fake.base_url(),
            n.max(10_000),
        ),
    )?;
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--config".into(),
            cfg.display().to_string(),
            "--store".into(),
            "embedded".into(),
        ],
        ..HubOptions::default()
    })
    .await?;
    eprintln!(
        "research: {n} tasks, hub {} (pid {}), {} nodes x {}",
        hub.url(),
        hub.pid(),
        args.nodes,
        args.node_concurrency
    );
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        nodes.push(
            Node::start(
                &hub,
                NodeOptions::named(&format!("research-{i}")).concurrency(args.node_concurrency),
            )
            .await?,
        );
    }
    // The stream may last longer than the shared client's 90 s timeout: a client of its own,
    // with a stall timeout per event instead.
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let resp = http
        .post(format!("{}/api/research/sessions", hub.url()))
        .bearer_auth(hub.api_key())
        .json(&json!({"name": format!("bench {n}"), "task": "Benchmark the research engine"}))
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    if status != StatusCode::CREATED {
        bail!("creating the session answered {status}: {v}");
    }
    let id = v["id"].as_str().context("session without id")?.to_owned();

    let cpu0 = cpu_ticks(hub.pid())?;
    let t0 = Instant::now();
    let resp = http
        .request(
            Method::POST,
            format!("{}/api/research/sessions/{id}/execute", hub.url()),
        )
        .bearer_auth(hub.api_key())
        .send()
        .await?;
    if resp.status() != StatusCode::OK {
        let s = resp.status();
        bail!(
            "execute answered {s}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    let mut seen = Seen::default();
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let wall = 'read: loop {
        let chunk = match tokio::time::timeout(STALL, body.next()).await {
            Err(_) => bail!(
                "{n} tasks: no event for {STALL:?} after {} ({} events so far, {:?}); last event: {}\nhub log tail:\n{}",
                ms(t0.elapsed()),
                seen.events,
                seen.by_kind,
                last_text(&seen),
                hub_tail(&hub)
            ),
            Ok(None) => bail!(
                "{n} tasks: the stream ended without session_completed after {} ({} events, {:?}); last event: {}\nhub log tail:\n{}",
                ms(t0.elapsed()),
                seen.events,
                seen.by_kind,
                last_text(&seen),
                hub_tail(&hub)
            ),
            Ok(Some(c)) => c.context("reading the stream")?,
        };
        parser.push(&chunk)?;
        parser.ids.clear();
        for (_, ev) in parser.events.drain(..) {
            let at = t0.elapsed();
            let kind = ev["type"].as_str().unwrap_or("?").to_owned();
            seen.events += 1;
            *seen.by_kind.entry(kind.clone()).or_default() += 1;
            match kind.as_str() {
                "decomposition_complete" => {
                    seen.decomposed = Some(at);
                    eprintln!(
                        "  {}: decomposition_complete: {}",
                        ms(at),
                        ev["data"]["message"]
                    );
                }
                "group_started" => {
                    let g = ev["data"]["group"].as_u64().unwrap_or(0);
                    let w = ev["data"]["tasks"].as_u64().unwrap_or(0);
                    seen.group_start.insert(g, (at, w));
                }
                "group_completed" => {
                    let g = ev["data"]["group"].as_u64().unwrap_or(0);
                    if let Some((s, w)) = seen.group_start.get(&g) {
                        seen.group_took.insert(g, at - *s);
                        eprintln!("  {}: group {g} ({w} tasks) took {}", ms(at), ms(at - *s));
                    }
                }
                "synthesis_started" => seen.synthesis_started = Some(at),
                "error" => bail!(
                    "{n} tasks: the run failed after {}: {}\nhub log tail:\n{}",
                    ms(at),
                    ev["data"],
                    hub_tail(&hub)
                ),
                _ => {}
            }
            if kind != "decomposition_complete" {
                seen.last = Some((kind.clone(), ev["data"].clone()));
            } else {
                seen.last = Some((kind.clone(), json!("(the plan)")));
            }
            if kind == "session_completed" {
                break 'read at;
            }
        }
        if Instant::now() >= next_report {
            next_report = Instant::now() + Duration::from_secs(10);
            eprintln!(
                "  {}: {} events, {} tasks ended",
                ms(t0.elapsed()),
                seen.events,
                seen.by_kind.get("task_completed").copied().unwrap_or(0)
                    + seen.by_kind.get("task_failed").copied().unwrap_or(0)
            );
        }
    };
    drop(body);
    let cpu = cpu_ticks(hub.pid())?.saturating_sub(cpu0);
    let rss = rss_kib(hub.pid())?;
    let text = hub
        .api()
        .request(Method::GET, "/metrics")
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let h = Histogram::parse(&text, METRIC)?;
    drop(nodes);

    let count = |k: &str| seen.by_kind.get(k).copied().unwrap_or(0);
    let completed = count("task_completed");
    let failed = count("task_failed");
    let groups = count("group_started");
    let (want_groups, widest) = expected_groups(n);
    let mut rows = Vec::new();
    let p = |k: &str| format!("{n} tasks: {k}");
    rows.push(Row {
        metric: p("wall time, execute -> session_completed"),
        value: ms(wall),
        target: "",
    });
    rows.push(Row {
        metric: p("tasks completed / failed"),
        value: format!("{completed} / {failed}"),
        target: "all completed",
    });
    rows.push(Row {
        metric: p("tasks/s (tasks / wall time)"),
        value: format!("{:.0}", n as f64 / wall.as_secs_f64()),
        target: "",
    });
    rows.push(Row {
        metric: p("events in the stream"),
        value: seen.events.to_string(),
        target: "",
    });
    rows.push(Row {
        metric: p("groups (expected), widest"),
        value: format!("{groups} ({want_groups}), {widest}"),
        target: "",
    });
    rows.push(Row {
        metric: p("execute -> decomposition_complete"),
        value: seen.decomposed.map(ms).unwrap_or_else(|| "n/a".into()),
        target: "",
    });
    if let Some((g, took)) = seen.group_took.iter().max_by_key(|(_, d)| **d) {
        let w = seen.group_start.get(g).map_or(0, |x| x.1);
        rows.push(Row {
            metric: p(&format!("slowest group (group {g}, {w} tasks)")),
            value: format!(
                "{} ({:.0} tasks/s)",
                ms(*took),
                w as f64 / took.as_secs_f64()
            ),
            target: "",
        });
    }
    if let (Some(s), Some(d)) = (seen.synthesis_started, seen.decomposed) {
        rows.push(Row {
            metric: p("groups (decomposition -> synthesis_started)"),
            value: ms(s - d),
            target: "",
        });
        rows.push(Row {
            metric: p("synthesis_started -> session_completed"),
            value: ms(wall - s),
            target: "",
        });
    }
    rows.push(Row {
        metric: p("hub CPU time during the run (user + system)"),
        value: format!(
            "{:.2} s ({:.2} ms per task)",
            cpu as f64 / 100.0,
            cpu as f64 * 10.0 / n as f64
        ),
        target: "",
    });
    rows.push(Row {
        metric: p("hub RSS after the run"),
        value: format!("{:.1} MiB", rss as f64 / 1024.0),
        target: "",
    });
    let count_ok = h.count == n as u64;
    rows.push(Row {
        metric: p(&format!("{METRIC} count")),
        value: format!("{}{}", h.count, if count_ok { "" } else { " (NOT N)" }),
        target: "= tasks",
    });
    rows.push(Row {
        metric: p("step overhead <= 1 ms / <= 2 ms (fraction)"),
        value: format!(
            "{:.2} % / {:.2} %",
            h.fraction_le(0.001) * 100.0,
            h.fraction_le(0.002) * 100.0
        ),
        target: "",
    });
    rows.push(Row {
        metric: p("step overhead p50 / p99 (bucket-interpolated)"),
        value: format!("{} / {}", h.quantile_text(0.50), h.quantile_text(0.99)),
        target: "p99 <= 2 ms",
    });
    rows.push(Row {
        metric: p("step overhead mean (sum / count)"),
        value: if h.count > 0 {
            format!("{:.3} ms", h.sum / h.count as f64 * 1000.0)
        } else {
            "n/a".into()
        },
        target: "",
    });
    if !count_ok {
        eprintln!(
            "research: {n} tasks: {METRIC}_count is {}, not {n}",
            h.count
        );
    }
    Ok(rows)
}

fn last_text(seen: &Seen) -> String {
    match &seen.last {
        Some((k, d)) => {
            let mut s = format!("{k} {d}");
            s.truncate(600);
            s
        }
        None => "none".into(),
    }
}

fn hub_tail(hub: &Hub) -> String {
    let log = hub.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One Prometheus histogram of `/metrics` (no labels): cumulative buckets, sum and count.
struct Histogram {
    /// `(le, cumulative count)`, finite bounds ascending.
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn parse(text: &str, name: &str) -> Result<Histogram> {
        let bucket = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        let mut sum = None;
        let mut count = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let (le, v) = rest.split_once("\"}").context("bad bucket line")?;
                let v: u64 = v.trim().parse().context("bad bucket count")?;
                if le != "+Inf" {
                    buckets.push((le.parse::<f64>().context("bad le")?, v));
                }
            } else if let Some(v) = line.strip_prefix(&format!("{name}_sum ")) {
                sum = Some(v.trim().parse::<f64>()?);
            } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
                count = Some(v.trim().parse::<u64>()?);
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Histogram {
            buckets,
            sum: sum.with_context(|| format!("no {name}_sum in /metrics"))?,
            count: count.with_context(|| format!("no {name}_count in /metrics"))?,
        })
    }

    /// Fraction of observations at most `le` (a bucket bound).
    fn fraction_le(&self, le: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let c = self
            .buckets
            .iter()
            .find(|(b, _)| (*b - le).abs() < 1e-12)
            .map_or(0, |x| x.1);
        c as f64 / self.count as f64
    }

    /// The `q` quantile, interpolated linearly inside its bucket (from 0 for the first);
    /// `None` when it falls above the last finite bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(le, cum) in &self.buckets {
            if cum as f64 >= rank {
                let inside = (cum - lower.1) as f64;
                if inside == 0.0 {
                    return Some(le);
                }
                return Some(lower.0 + (le - lower.0) * (rank - lower.1 as f64) / inside);
            }
            lower = (le, cum);
        }
        None
    }

    fn quantile_text(&self, q: f64) -> String {
        if self.count == 0 {
            return "n/a".into();
        }
        match self.quantile(q) {
            Some(v) => format!("{:.3} ms", v * 1000.0),
            None => format!(
                "> {} ms (above the last bucket)",
                self.buckets.last().map_or(0.0, |b| b.0 * 1000.0)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram {
            buckets: vec![(0.001, 50), (0.002, 100)],
            sum: 0.0,
            count: 100,
        };
        assert!((h.quantile(0.5).unwrap_or(0.0) - 0.001).abs() < 1e-9);
        assert!((h.quantile(0.75).unwrap_or(0.0) - 0.0015).abs() < 1e-9);
        assert!((h.fraction_le(0.001) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_plan_has_doubling_groups() {
        assert_eq!(expected_groups(1000), (6, 488));
        assert_eq!(expected_groups(10_000), (8, 3600));
    }
}
