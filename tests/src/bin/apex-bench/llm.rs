//! The `llm` suite: what the hub's LLM gateway adds over calling an OpenAI-compatible upstream
//! directly. The upstream is the fake of the test suite (`apex-fake-llm`, its own process);
//! the hub has one provider pointing at it.
//!
//! Measured, each direct and through the hub with the same closed-loop client:
//! - non-stream latency (request → whole body) at concurrency 1, 16, 64: p50 and p99;
//! - streaming time to first token (request → first `content` chunk) at the same levels;
//! - requests/s at saturation (non-stream, 64 clients, fixed duration);
//! - the hub's RSS idle and with 1,000 concurrent open streams.
//!
//! "Added" figures are the hub's percentile minus the direct percentile.
//!
//! The instruments (this load generator and the fake upstream) run one worker thread each by
//! default (`--llm-instrument-threads`), so they leave the hub its share of a small machine;
//! the hub runs with its defaults.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::process::{Proc, bin_path};
use apex_tests::stats::{ms, percentile};
use apex_tests::{Hub, HubOptions};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Row;

/// Settings of the suite (from the command line).
pub(crate) struct LlmArgs {
    /// Requests per measurement (each level, each path).
    pub samples: usize,
    /// Seconds of the saturation run.
    pub saturation_secs: u64,
    /// Concurrent streams for the RSS figure.
    pub streams: usize,
    /// Worker threads of the fake upstream (0: one per CPU); this process's runtime is built
    /// with the same count by `main`.
    pub instrument_threads: usize,
}

/// One side of a comparison: a URL and its headers.
#[derive(Clone)]
pub(crate) struct Target {
    /// `.../v1/chat/completions`.
    pub chat_url: String,
    /// The `Authorization` header, if any.
    pub auth: Option<String>,
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &LlmArgs) -> Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let (fake, fake_url) = start_fake(dir.path(), args.instrument_threads).await?;
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[llm.providers]]\nname = \"fake\"\nbase_url = \"{fake_url}/v1\"\nmodels = [\"fake-model\"]\npool_max_idle = 1024\n"
        ),
    )?;
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--config".into(), cfg.display().to_string()],
        ..HubOptions::default()
    })
    .await?;
    eprintln!(
        "fake upstream {fake_url} (pid {}), hub {} (pid {})",
        fake.pid(),
        hub.url(),
        hub.pid()
    );
    let direct = Target {
        chat_url: format!("{fake_url}/v1/chat/completions"),
        auth: None,
    };
    let via_hub = Target {
        chat_url: format!("{}/v1/chat/completions", hub.url()),
        auth: Some(format!("Bearer {}", hub.api_key())),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let mut rows = Vec::new();

    eprintln!("warming up");
    for t in [&direct, &via_hub] {
        closed_loop(&client, t, false, 16, 2000).await?;
        closed_loop(&client, t, true, 16, 1000).await?;
    }
    let rss_idle = rss_kib(hub.pid())?;

    for stream in [false, true] {
        let what = if stream {
            "stream time to first token"
        } else {
            "non-stream latency"
        };
        for conc in [1usize, 16, 64] {
            eprintln!("{what}, concurrency {conc}: {} requests each", args.samples);
            // Interleave the two paths in halves so drift on a shared machine hits both.
            let half = args.samples / 2;
            let mut d = closed_loop(&client, &direct, stream, conc, half).await?;
            let mut h = closed_loop(&client, &via_hub, stream, conc, half).await?;
            d.extend(closed_loop(&client, &direct, stream, conc, args.samples - half).await?);
            h.extend(closed_loop(&client, &via_hub, stream, conc, args.samples - half).await?);
            d.sort_unstable();
            h.sort_unstable();
            for p in [50.0, 99.0] {
                let (Some(dp), Some(hp)) = (percentile(&d, p), percentile(&h, p)) else {
                    bail!("no samples");
                };
                let added = hp.as_secs_f64() - dp.as_secs_f64();
                let target = match (conc, p as u32) {
                    (16, 50) => "added <= 0.3 ms",
                    (16, 99) => "added <= 1 ms",
                    _ => "",
                };
                rows.push(Row {
                    metric: format!("{what} p{p:.0} @ c={conc}: direct / via hub"),
                    value: format!("{} / {} (added {:+.3} ms)", ms(dp), ms(hp), added * 1000.0),
                    target,
                });
            }
        }
    }

    let secs = Duration::from_secs(args.saturation_secs);
    for (name, t) in [("direct", &direct), ("via hub", &via_hub)] {
        eprintln!("saturation {name}: 64 clients for {secs:?}");
        let (cpu0, fake0) = (cpu_ticks(hub.pid())?, cpu_ticks(fake.pid())?);
        let (rate, n) = saturate(&client, t, 64, secs).await?;
        let (cpu1, fake1) = (cpu_ticks(hub.pid())?, cpu_ticks(fake.pid())?);
        if name == "via hub" {
            rows.push(Row {
                metric: "  hub CPU per request at saturation (user+sys)".into(),
                value: format!(
                    "{:.1} us",
                    (cpu1 - cpu0) as f64 * 10_000.0 / n.max(1) as f64
                ),
                target: "",
            });
        }
        rows.push(Row {
            metric: format!("  fake upstream CPU per request, {name}"),
            value: format!(
                "{:.1} us",
                (fake1 - fake0) as f64 * 10_000.0 / n.max(1) as f64
            ),
            target: "",
        });
        rows.push(Row {
            metric: format!("non-stream requests/s at saturation (64 clients), {name}"),
            value: format!("{rate:.0} req/s"),
            target: if name == "via hub" {
                ">= 15000 req/s"
            } else {
                ""
            },
        });
    }

    eprintln!("{} concurrent open streams", args.streams);
    let (rss_open, opened) = open_streams(&via_hub, args.streams, hub.pid()).await?;
    rows.push(Row {
        metric: "hub RSS idle (after warm-up)".into(),
        value: format!("{:.1} MiB", rss_idle as f64 / 1024.0),
        target: "",
    });
    rows.push(Row {
        metric: format!("hub RSS with {opened} concurrent open streams"),
        value: format!("{:.1} MiB", rss_open as f64 / 1024.0),
        target: "<= 64 MB",
    });
    drop(hub);
    drop(fake);
    Ok(rows)
}

/// Starts `apex-fake-llm` (model `fake-model`) with `threads` workers; the process and its URL.
pub(crate) async fn start_fake(dir: &std::path::Path, threads: usize) -> Result<(Proc, String)> {
    let mut cmd = std::process::Command::new(bin_path("apex-fake-llm")?);
    cmd.args(["--no-record", "--model", "fake-model"]);
    if threads > 0 {
        cmd.args(["--threads", &threads.to_string()]);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let proc = Proc::spawn("apex-fake-llm", cmd, &dir.join("fake.log"), Some(tx))?;
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = rx.recv().await {
            if let Some(a) = l.trim().strip_prefix("listening on ") {
                return Some(a.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .context("apex-fake-llm did not print `listening on`")?;
    Ok((proc, line))
}

fn body(stream: bool, fake: Value) -> Vec<u8> {
    let b = json!({"model": "fake-model", "stream": stream, "fake": fake,
        "messages": [{"role": "user", "content": "Say something short."}]});
    serde_json::to_vec(&b).unwrap_or_default()
}

/// One request; returns the time to the whole body (non-stream) or to the first content
/// chunk (stream; the rest is read too so the connection is reused).
async fn one(
    client: &reqwest::Client,
    t: &Target,
    body: Vec<u8>,
    stream: bool,
) -> Result<Duration> {
    let start = Instant::now();
    let mut rb = client
        .post(&t.chat_url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(a) = &t.auth {
        rb = rb.header("authorization", a);
    }
    let resp = rb.send().await?;
    if !resp.status().is_success() {
        bail!("{} answered {}", t.chat_url, resp.status());
    }
    if !stream {
        let b = resp.bytes().await?;
        let el = start.elapsed();
        if b.is_empty() {
            bail!("empty body");
        }
        return Ok(el);
    }
    let mut s = resp.bytes_stream();
    let mut first = None;
    let mut seen = Vec::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk?;
        if first.is_none() {
            seen.extend_from_slice(&chunk);
            if memchr_find(&seen, b"\"content\":\"t") {
                first = Some(start.elapsed());
            }
        }
    }
    first.context("the stream had no content")
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `n` requests over `conc` closed-loop clients; the latencies.
pub(crate) async fn closed_loop(
    client: &reqwest::Client,
    t: &Target,
    stream: bool,
    conc: usize,
    n: usize,
) -> Result<Vec<Duration>> {
    let left = Arc::new(AtomicUsize::new(n));
    let payload = body(stream, json!({"tokens": 8}));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, t, left, payload) = (client.clone(), t.clone(), left.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1))
                .is_ok()
            {
                out.push(one(&client, &t, payload.clone(), stream).await?);
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Requests/s completed by `conc` closed-loop clients over `dur`, and the request count.
async fn saturate(
    client: &reqwest::Client,
    t: &Target,
    conc: usize,
    dur: Duration,
) -> Result<(f64, u64)> {
    let payload = body(false, json!({"tokens": 8}));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, t, payload) = (client.clone(), t.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                one(&client, &t, payload.clone(), false).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total as f64 / start.elapsed().as_secs_f64(), total))
}

/// User + system CPU time of a process, in clock ticks (100 per second on Linux).
pub(crate) fn cpu_ticks(pid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = s
        .rsplit_once(')')
        .map(|x| x.1)
        .context("bad /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Ok(num(11).context("no utime")? + num(12).context("no stime")?)
}

/// Opens `n` slow streams through the hub, waits until each has sent its first token, reads
/// the hub's RSS, then drops them. Returns (RSS KiB, streams open).
async fn open_streams(t: &Target, n: usize, hub_pid: i32) -> Result<(u64, usize)> {
    // A client of its own: one connection per stream.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let payload = body(true, json!({"tokens": 120, "token_delay_ms": 500}));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let stop = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, t, payload, ready, mut stop) = (
            client.clone(),
            t.clone(),
            payload.clone(),
            ready_tx.clone(),
            stop.1.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rb = client
                .post(&t.chat_url)
                .header("content-type", "application/json")
                .body(payload);
            if let Some(a) = &t.auth {
                rb = rb.header("authorization", a);
            }
            let resp = rb.send().await?;
            let mut s = resp.bytes_stream();
            let mut seen = Vec::new();
            while let Some(c) = s.next().await {
                seen.extend_from_slice(&c?);
                if memchr_find(&seen, b"\"content\":\"t") {
                    break;
                }
            }
            let _ = ready.send(());
            // Hold the stream open (unread) until told to stop.
            let _ = stop.wait_for(|s| *s).await;
            drop(s);
            anyhow::Ok(())
        }));
    }
    drop(ready_tx);
    let mut opened = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened < n {
        match tokio::time::timeout_at(deadline.into(), ready_rx.recv()).await {
            Ok(Some(())) => opened += 1,
            _ => break,
        }
    }
    // Let allocations settle, then sample.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(hub_pid)?;
    let _ = stop.0.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if opened < n {
        eprintln!("only {opened} of {n} streams opened");
    }
    Ok((rss, opened))
}

/// Resident set size of a process, KiB (`VmRSS` of /proc/PID/status).
pub(crate) fn rss_kib(pid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}
