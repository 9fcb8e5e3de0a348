//! The hub's probes and shutdown order with the real binaries, and systemd notifications from
//! both binaries: `/livez` and `/readyz` without a key; on SIGTERM `/readyz` turns 503 at
//! once while submissions are still accepted for `--shutdown-delay-ms`, then (shared mode,
//! where the drain keeps the listener open) submissions answer 503 `shutting_down`; `READY=1`,
//! `WATCHDOG=1` and `STOPPING=1` on a `NOTIFY_SOCKET` the test binds.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use apex_tests::shared::shared_hub;
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, RedisServer, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::net::UnixDatagram;

const WAIT: Duration = Duration::from_secs(30);

/// `GET path` without a key: status and JSON body.
async fn probe(api: &Api, path: &str) -> Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .get(format!("{}{path}", api.base_url()))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    let (status, body) = apex_tests::api::json_of(resp).await?;
    Ok((status.as_u16(), body))
}

/// Polls `/readyz` until it answers `code`.
async fn readyz_becomes(api: &Api, code: u16) -> Result<Value> {
    wait_until(&format!("/readyz to answer {code}"), WAIT, || {
        let api = api.clone();
        async move {
            let (status, body) = probe(&api, "/readyz").await?;
            Ok((status == code).then_some(body))
        }
    })
    .await
}

async fn wait_exit(hub: &mut Hub) -> Result<std::process::ExitStatus> {
    wait_until("the hub to exit", WAIT, || {
        let s = hub.try_status();
        async move { s }
    })
    .await
}

#[tokio::test]
async fn sigterm_makes_the_hub_unready_at_once_and_it_serves_until_the_delay_ends() -> Result<()> {
    let delay = Duration::from_millis(4_000);
    let mut hub = Hub::start(HubOptions {
        shutdown_delay_ms: delay.as_millis() as u64,
        ..HubOptions::default()
    })
    .await?;
    let api = hub.api().clone();
    assert_eq!(probe(&api, "/livez").await?, (200, json!({"status": "ok"})));
    let (code, body) = probe(&api, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "ready", "store": "ok", "draining": false})
    );

    hub.signal(Signal::SIGTERM)?;
    let sent = Instant::now();
    let body = readyz_becomes(&api, 503).await?;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(body["draining"], true, "{body}");
    let unready_after = sent.elapsed();
    assert!(
        unready_after < delay / 2,
        "/readyz took {unready_after:?} to turn 503"
    );
    // Still serving: load balancers may still send traffic during the delay.
    assert_eq!(probe(&api, "/livez").await?.0, 200);
    let (code, body) = api.submit_raw(&json!({"tool": "echo"})).await?;
    assert_eq!(code.as_u16(), 201, "{body}");
    let status = wait_exit(&mut hub).await?;
    assert!(status.success(), "hub exited with {status}");
    assert!(
        sent.elapsed() >= delay,
        "the hub exited {:?} after SIGTERM, before its {delay:?} delay",
        sent.elapsed()
    );
    Ok(())
}

/// Shared mode keeps the listener open while it drains (`--shared-shutdown-drain-ms`, a
/// node still running a task): after the delay a submission is refused with 503
/// `shutting_down`, and `/readyz` reports the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_delay_submissions_answer_shutting_down_while_the_hub_drains() -> Result<()> {
    let redis = RedisServer::start().map_err(anyhow::Error::msg)?;
    let mut opts = shared_hub(&redis, None);
    opts.shutdown_delay_ms = 500;
    opts.extra_args
        .extend(["--shared-shutdown-drain-ms", "8000"].map(String::from));
    let mut hub = Hub::start(opts).await?;
    let api = hub.api().clone();
    let (code, body) = probe(&api, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["lease"], "held", "{body}");
    let _node = Node::start(&hub, NodeOptions::named("busy")).await?;
    let long = api
        .submit(&json!({"tool": "sleep", "args": {"ms": 20_000}}))
        .await?;
    wait_until("the task to run", WAIT, || {
        let (api, id) = (api.clone(), long.task_id.clone());
        async move { Ok((api.get(&id).await?.status == "running").then_some(())) }
    })
    .await?;

    hub.signal(Signal::SIGTERM)?;
    let refused = wait_until("a submission to answer 503 shutting_down", WAIT, || {
        let api = api.clone();
        async move {
            let (code, body) = api.submit_raw(&json!({"tool": "echo"})).await?;
            Ok((code.as_u16() == 503).then_some(body))
        }
    })
    .await?;
    assert_eq!(refused["error"]["code"], "shutting_down", "{refused}");
    let (code, body) = probe(&api, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["draining"], true, "{body}");
    let status = wait_exit(&mut hub).await?;
    assert!(status.success(), "hub exited with {status}");
    Ok(())
}

/// A bound `NOTIFY_SOCKET` and the environment that points a process at it.
struct Notify {
    _dir: tempfile::TempDir,
    sock: UnixDatagram,
    env: Vec<(String, String)>,
}

impl Notify {
    fn bind(watchdog: Option<Duration>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path)?;
        let mut env = vec![("NOTIFY_SOCKET".to_owned(), path.display().to_string())];
        if let Some(w) = watchdog {
            env.push(("WATCHDOG_USEC".to_owned(), w.as_micros().to_string()));
        }
        Ok(Self {
            _dir: dir,
            sock,
            env,
        })
    }

    /// Reads datagrams until one contains `what`; returns it.
    async fn until(&self, what: &str) -> Result<String> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout(WAIT, self.sock.recv(&mut buf))
                .await
                .with_context(|| format!("no {what} notification within {WAIT:?}"))??;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == what) {
                return Ok(msg);
            }
        }
    }
}

#[tokio::test]
async fn both_binaries_notify_systemd_ready_watchdog_and_stopping() -> Result<()> {
    let hub_notify = Notify::bind(Some(Duration::from_millis(400)))?;
    let mut hub = Hub::start(HubOptions {
        env: hub_notify.env.clone(),
        ..HubOptions::default()
    })
    .await?;
    let ready = hub_notify.until("READY=1").await?;
    assert!(
        ready.contains(&format!("STATUS=serving on {}", hub.url())),
        "{ready:?}"
    );
    // Pinged every half interval: two pings come well within a few intervals.
    hub_notify.until("WATCHDOG=1").await?;
    hub_notify.until("WATCHDOG=1").await?;

    let node_notify = Notify::bind(None)?;
    let mut opts = NodeOptions::named("notified");
    opts.env = node_notify.env.clone();
    let mut node = Node::start(&hub, opts).await?;
    let ready = node_notify.until("READY=1").await?;
    assert!(ready.contains("STATUS=connecting to ws://"), "{ready:?}");
    node.terminate()?;
    node_notify.until("STOPPING=1").await?;
    assert!(node.wait_exit(WAIT).await?.success());

    hub.signal(Signal::SIGTERM)?;
    hub_notify.until("STOPPING=1").await?;
    let status = wait_exit(&mut hub).await?;
    assert!(status.success(), "hub exited with {status}");
    Ok(())
}
