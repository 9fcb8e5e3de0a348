//! End-to-end tests of the `apex-hub` command line: generated keys, bad configuration, and a
//! graceful stop on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apex_tests::process::{Proc, bin_path};
use apex_tests::{Api, Hub, HubOptions};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

/// Reads stdout lines until `listening on`, collecting the lines before it.
async fn read_until_listening(
    rx: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(String, Vec<String>)> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("no `listening on` line within 30 s")?
            .context("hub closed stdout")?;
        if let Some(addr) = line.strip_prefix("listening on http://") {
            return Ok((addr.to_owned(), seen));
        }
        seen.push(line);
    }
}

fn key_line<'a>(lines: &'a [String], prefix: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
}

#[tokio::test]
async fn without_keys_the_hub_generates_and_keeps_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let start = |log: &str| -> Result<(Proc, mpsc::UnboundedReceiver<String>)> {
        let mut cmd = Command::new(bin_path("apex-hub")?);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data);
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Proc::spawn("apex-hub", cmd, &dir.path().join(log), Some(tx))?,
            rx,
        ))
    };

    let (mut first, mut rx) = start("first.log")?;
    let (addr, lines) = read_until_listening(&mut rx).await?;
    let api_key = key_line(&lines, "api key:")
        .with_context(|| format!("no `api key:` line in {lines:?}"))?
        .to_owned();
    let node_key = key_line(&lines, "node key:")
        .with_context(|| format!("no `node key:` line in {lines:?}"))?
        .to_owned();
    assert_ne!(api_key, node_key);
    let api = Api::new(&format!("http://{addr}"), &api_key)?;
    assert!(api.nodes().await.is_ok(), "the printed api key is refused");
    first.signal(Signal::SIGTERM)?;
    first.wait_exit(Duration::from_secs(20)).await?;

    // Restarted on the same data dir, the saved key still works.
    let (_second, mut rx) = start("second.log")?;
    let (addr, _) = read_until_listening(&mut rx).await?;
    let api = Api::new(&format!("http://{addr}"), &api_key)?;
    assert!(api.nodes().await.is_ok(), "the saved api key is not reused");
    Ok(())
}

#[tokio::test]
async fn bad_configuration_exits_64_with_one_line() -> Result<()> {
    let bin = bin_path("apex-hub")?;
    let dir = tempfile::tempdir()?;
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, "heartbeat_interval_ms = \"often\"\n")?;
    let cases: Vec<Vec<String>> = vec![
        vec![
            "--heartbeat-interval-ms".into(),
            "5000".into(),
            "--heartbeat-timeout-ms".into(),
            "1000".into(),
        ],
        vec!["--config".into(), bad_file.display().to_string()],
        vec![
            "--config".into(),
            dir.path().join("missing.toml").display().to_string(),
        ],
        vec!["--store".into(), "postgres://db".into()],
        vec!["--store".into(), "redis://localhost:notaport/0".into()],
        vec!["--task-retention-hours".into(), "0".into()],
    ];
    for args in cases {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--data-dir").arg(dir.path().join("data"));
        if !args.iter().any(|a| a == "--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        let out = tokio::time::timeout(Duration::from_secs(20), cmd.args(&args).output())
            .await
            .context("the hub did not exit on a bad configuration")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(64) {
            bail!("{args:?}: exit {:?}, stderr {stderr}", out.status.code());
        }
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: stderr {stderr:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_hub_cleanly() -> Result<()> {
    let mut hub = Hub::start(HubOptions::default()).await?;
    assert_eq!(hub.api().health().await?["status"], "ok");
    hub.signal(Signal::SIGTERM)?;
    let status = apex_tests::wait_until("the hub to exit", Duration::from_secs(20), || {
        let s = hub.try_status();
        async move { s }
    })
    .await?;
    assert!(status.success(), "hub exited with {status} on SIGTERM");
    Ok(())
}

#[tokio::test]
async fn check_config_validates_and_exits_without_touching_anything() -> Result<()> {
    let bin = bin_path("apex-hub")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let good = dir.path().join("good.toml");
    // Redis is not running: --check-config connects to nothing.
    std::fs::write(
        &good,
        "listen = \"0.0.0.0:8088\"\nstore = \"redis://127.0.0.1:1/0\"\nhub_mode = \"shared\"\n\
         shutdown_delay_ms = 7000\n",
    )?;
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "shutdown_delay = 7000\n")?;
    let run = |file: &std::path::Path| {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--check-config")
            .arg("--config")
            .arg(file)
            .arg("--data-dir")
            .arg(&data);
        async move {
            tokio::time::timeout(Duration::from_secs(20), cmd.output())
                .await
                .context("--check-config did not exit")?
                .context("running apex-hub")
        }
    };
    let out = run(&good).await?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration ok"
    );
    assert!(!data.exists(), "--check-config created the data directory");

    let out = run(&typo).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("shutdown_delay"), "{stderr:?}");
    Ok(())
}

/// `--healthcheck` (the image's `HEALTHCHECK`): exit 0 while the hub on `listen` answers
/// `/livez`, 1 with one line once it is gone.
#[tokio::test]
async fn healthcheck_probes_livez_on_the_configured_address() -> Result<()> {
    let hub = Hub::start(HubOptions::default()).await?;
    let check = |listen: String| {
        let bin = bin_path("apex-hub");
        async move {
            let out = tokio::process::Command::new(bin?)
                .arg("--healthcheck")
                .env("APEX_LISTEN", listen)
                .output()
                .await?;
            anyhow::Ok(out)
        }
    };
    let out = check(hub.addr().to_string()).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = hub.addr();
    drop(hub);
    let out = check(addr.to_string()).await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
    Ok(())
}

/// `APEX_*` variables are a config layer: a bad one is refused naming its key, a good one
/// applies (the container image and the chart configure the hub this way).
#[tokio::test]
async fn apex_environment_variables_configure_the_hub() -> Result<()> {
    let bin = bin_path("apex-hub")?;
    let out = tokio::process::Command::new(&bin)
        .arg("--check-config")
        .env("APEX_SHUTDOWN_DELAY_MS", "600001")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("shutdown_delay_ms"), "{stderr}");
    let out = tokio::process::Command::new(&bin)
        .arg("--check-config")
        .env("APEX_SHUTDOWN_DELAY_MS", "600000")
        .env("APEX_API_KEYS", r#"["env-api-key-1"]"#)
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
