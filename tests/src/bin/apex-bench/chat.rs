//! The `chat` suite: what a conversation costs to keep. One session of `--chat-turns` turns
//! (default 1,000) through `POST /api/v1/chat` on a hub with the built-in `mock` provider,
//! once with the embedded store and once with Redis; then the bytes the store spends on the
//! session's log against the raw message bytes (each message's JSON as the history returns it:
//! `{role, content, timestamp}`). apex appends each message once, so the ratio stays flat as
//! the session grows; a store that checkpoints the whole state every step writes the sum of
//! every prefix, quadratic in the turns (shown beside it for scale). Also the turn latency
//! with the mock model (store write included).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::stats::{ms, percentile};
use apex_tests::{Hub, HubOptions, RedisServer};
use serde_json::{Value, json};

use super::Row;

/// Settings of the suite (from the command line).
pub(crate) struct ChatArgs {
    /// Turns of the session.
    pub turns: usize,
}

/// A user message of realistic length (60 to 400 bytes), varying with `i`.
fn message(i: usize) -> String {
    let words = [
        "schedule",
        "the",
        "report",
        "for",
        "Monday",
        "and",
        "remind",
        "me",
        "about",
        "春天",
        "meeting",
        "notes",
        "please",
        "summarise",
        "yesterday's",
        "discussion",
        "budget",
    ];
    let n = 10 + (i * 7) % 60;
    (0..n)
        .map(|k| words[(i + k * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &ChatArgs) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let redis = RedisServer::start().map_err(anyhow::Error::msg)?;
    for store in ["embedded", "redis"] {
        let m = measure(store, &redis.url(), args.turns).await?;
        let ratio = m.stored as f64 / m.raw as f64;
        rows.push(Row {
            metric: format!(
                "chat storage, {store}, {} turns: stored / raw message bytes",
                args.turns
            ),
            value: format!("{ratio:.3} ({} / {} bytes)", m.stored, m.raw),
            target: "<= 1.1",
        });
        if let Some(f) = m.file {
            rows.push(Row {
                metric: format!("  {store}: records.redb file size after the run"),
                value: format!("{f} bytes ({:.2} x raw)", f as f64 / m.raw as f64),
                target: "",
            });
        }
        rows.push(Row {
            metric: format!("  {store}: checkpointing the whole session each turn would write"),
            value: format!(
                "{} bytes ({:.0} x raw)",
                m.quadratic,
                m.quadratic as f64 / m.raw as f64
            ),
            target: "",
        });
        let p = |q: f64| percentile(&m.latencies, q).map(ms).unwrap_or_default();
        rows.push(Row {
            metric: format!("  {store}: turn latency with the mock model, p50 / p99"),
            value: format!("{} / {}", p(50.0), p(99.0)),
            target: "",
        });
    }
    Ok(rows)
}

struct Measured {
    raw: u64,
    stored: u64,
    file: Option<u64>,
    quadratic: u64,
    latencies: Vec<Duration>,
}

async fn measure(store: &str, redis_url: &str, turns: usize) -> Result<Measured> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        "[[llm.providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock\"]\n\
         [chat]\ncontext_max_tokens = 4000\n",
    )?;
    let store_arg = if store == "redis" {
        redis_url.to_owned()
    } else {
        "embedded".to_owned()
    };
    let mut hub = Hub::start(HubOptions {
        extra_args: vec![
            "--config".into(),
            cfg.display().to_string(),
            "--store".into(),
            store_arg,
        ],
        data_dir: Some(data.clone()),
        ..HubOptions::default()
    })
    .await?;
    eprintln!("chat: hub {} ({store} store), {turns} turns", hub.url());
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("{}/api/v1/chat", hub.url());
    let mut latencies = Vec::with_capacity(turns);
    for i in 0..turns {
        let t0 = Instant::now();
        let r = http
            .post(&url)
            .bearer_auth(hub.api_key())
            .json(&json!({"message": message(i), "session_id": "bench"}))
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("turn {i} answered {status}: {v}");
        }
        latencies.push(t0.elapsed());
        if (i + 1) % 250 == 0 {
            eprintln!("  {} turns", i + 1);
        }
    }
    latencies.sort();
    let h: Value = http
        .get(format!("{}/api/v1/chat/history/bench", hub.url()))
        .bearer_auth(hub.api_key())
        .send()
        .await?
        .json()
        .await?;
    let msgs = h["messages"]
        .as_array()
        .context("history without messages")?;
    if msgs.len() != turns * 2 {
        bail!(
            "history has {} messages, expected {}",
            msgs.len(),
            turns * 2
        );
    }
    let mut raw = 0u64;
    let mut quadratic = 0u64;
    for m in msgs {
        let one = json!({"role": m["role"], "content": m["content"], "timestamp": m["timestamp"]});
        raw += serde_json::to_vec(&one)?.len() as u64;
        quadratic += raw;
    }
    // The log as the store holds it, read with the hub stopped.
    hub.signal(nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while hub.try_status()?.is_none() {
        if Instant::now() > deadline {
            bail!("the hub did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = "admin|bench";
    let (stored, file) = if store == "redis" {
        let rec = apex_hub::records::RecordStore::redis(redis_url).await?;
        let s = rec
            .log_footprint(apex_hub::chat::LOG_KIND, name)
            .await?
            .context("MEMORY USAGE gave nothing")?;
        (s, None)
    } else {
        let rec = apex_hub::records::RecordStore::embedded(&data)?;
        let s = rec
            .log_footprint(apex_hub::chat::LOG_KIND, name)
            .await?
            .context("no footprint")?;
        let f = std::fs::metadata(data.join(apex_hub::records::FILE_NAME))?.len();
        (s, Some(f))
    };
    Ok(Measured {
        raw,
        stored,
        file,
        quadratic,
        latencies,
    })
}
