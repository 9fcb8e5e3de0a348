//! The Model Context Protocol both ways, with real parts: the official MCP Python SDK
//! (`tests/python/test_mcp_client.py`) as the client of the hub's `/mcp` against a real
//! `apex-node` (one hub, and two shared-mode hubs taking turns), and a small MCP server written
//! with the same SDK (`tests/fixtures/mcp_server.py`) mounted on a real `apex-node` through
//! `mcp_servers`, its tools run as tasks, killed and restarted.
//!
//! The Python `mcp` package is installed by `scripts/test.sh`. Without it the tests say so and
//! pass, unless `CI` is set: then they fail.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use apex_tests::shared::shared_hub;
use apex_tests::{Hub, Node, NodeOptions, RedisServer, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// The Python interpreter that has the `mcp` package, or `None` (outside CI) to skip.
fn python_with_mcp() -> Option<String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import mcp, httpx2, sys; print(sys.executable)"])
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "python3 with the `mcp` package is required under CI (scripts/test.sh installs it: pip install mcp)"
            )
        }
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: python3 with the `mcp` package (MCP Python SDK 2.x) is not installed; \
                 run `pip install mcp` or scripts/test.sh"
            );
            None
        }
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs the Python SDK client against `urls` and returns its stdout, asserting it passed.
async fn python_client(python: &str, urls: &[String], key: &str, expect: &[&str]) -> String {
    let out = tokio::process::Command::new(python)
        .arg(repo_file("python/test_mcp_client.py"))
        .env("APEX_MCP_URLS", urls.join(","))
        .env("APEX_API_KEY", key)
        .env("APEX_MCP_EXPECT_TOOLS", expect.join(","))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the MCP Python SDK client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// One raw MCP POST to `url` with `auth` as the Authorization header.
async fn raw_mcp(url: &str, auth: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(body);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_lists_and_calls_cluster_tools_with_a_bearer_key() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let hub = Hub::start_default().await.unwrap();
    let _node = Node::start(&hub, NodeOptions::named("mcp-builtins"))
        .await
        .unwrap();
    let url = format!("{}/mcp", hub.url());

    // Without a credential, or with a wrong one, nothing is answered but a 401.
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}});
    for auth in [None, Some("Bearer not-the-key")] {
        let (status, body) = raw_mcp(&url, auth, &list).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        assert_eq!(body["success"], false, "{body}");
        assert!(body.get("result").is_none(), "{body}");
    }

    let out = python_client(&python, &[url], hub.api_key(), &["sha256", "echo", "sleep"]).await;
    for case in [
        "list ok",
        "call sha256 ok",
        "call echo ok",
        "error call ok",
        "unknown tool ok",
        "anonymous refused ok",
    ] {
        assert!(out.contains(case), "missing `{case}` in:\n{out}");
    }
    // The calls were tasks of the caller, visible in the task API.
    let tasks = hub.api().list_all(&[("tool", "sha256")]).await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].status, "succeeded");
    let failed = hub.api().list_all(&[("tool", "sleep")]).await.unwrap();
    assert_eq!(failed[0].status, "failed", "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_mcp_requests_may_reach_different_shared_hubs() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let redis = RedisServer::start().unwrap();
    let a = Hub::start(shared_hub(&redis, None)).await.unwrap();
    let b = Hub::start(shared_hub(&redis, Some(a.options())))
        .await
        .unwrap();
    // The only node is at hub B; hub A sees its tools through the shared node views.
    let _node = Node::start(&b, NodeOptions::named("mcp-shared"))
        .await
        .unwrap();
    let api = a.api().clone();
    wait_until("hub A to list the node of hub B", WAIT, || {
        let api = api.clone();
        async move {
            let tools: Value = api.get_json("/api/v1/tools").await?;
            Ok(tools.to_string().contains("\"sha256\"").then_some(()))
        }
    })
    .await
    .unwrap();
    let urls = [format!("{}/mcp", a.url()), format!("{}/mcp", b.url())];
    let out = python_client(&python, &urls, a.api_key(), &["sha256", "echo"]).await;
    for case in [
        "list ok",
        "call sha256 ok",
        "error call ok",
        "round robin ok",
    ] {
        assert!(out.contains(case), "missing `{case}` in:\n{out}");
    }
}

/// Writes a node config mounting the fixture server as `pytools`, and a server that cannot
/// start as `broken`.
fn mcp_node_config(dir: &Path, python: &str) -> PathBuf {
    let file = dir.join("node.toml");
    let fixture = repo_file("fixtures/mcp_server.py");
    let toml = format!(
        "[[mcp_servers]]\nname = \"pytools\"\ncommand = {python:?}\nargs = [{fixture:?}]\n\
         env = {{ MCP_TEST_TAG = \"from-config\" }}\n\n\
         [[mcp_servers]]\nname = \"broken\"\ncommand = \"/nonexistent/mcp-server\"\n",
        fixture = fixture.display().to_string(),
    );
    std::fs::write(&file, toml).unwrap();
    file
}

async fn run_task(hub: &Hub, tool: &str, args: Value) -> apex_tests::Task {
    let t = hub
        .api()
        .submit(&json!({"tool": tool, "args": args}))
        .await
        .unwrap();
    hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_mounted_mcp_server_runs_tasks_and_is_restarted_when_it_dies() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let hub = Hub::start_default().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = mcp_node_config(dir.path(), &python);
    let mut opts = NodeOptions::named("mcp-mounted")
        .args(["--config".to_owned(), config.display().to_string()]);
    // The node key is also in the node's environment: it must not reach the server.
    opts.env
        .push(("APEX_NODE_KEY".to_owned(), hub.node_key().to_owned()));
    let node = Node::start(&hub, opts).await.unwrap();

    // The broken server cost one log line; the node started with the other's tools.
    let log = apex_tests::process::strip_ansi(&node.log_text());
    let broken: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broken") && l.contains("not started"))
        .collect();
    assert_eq!(broken.len(), 1, "{log}");

    // The server's tools are in the catalogue as `pytools.<tool>`, with their schemas.
    let tools: Value = hub.api().get_json("/api/v1/tools").await.unwrap();
    let list = tools["tools"].as_array().unwrap();
    let names: Vec<&str> = list.iter().filter_map(|t| t["name"].as_str()).collect();
    for t in [
        "pytools.reverse",
        "pytools.add",
        "pytools.whoami",
        "pytools.fail",
    ] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("broken.")), "{names:?}");
    let reverse = list
        .iter()
        .find(|t| t["name"] == "pytools.reverse")
        .unwrap();
    assert_eq!(reverse["description"], "Reverses a text.");
    assert_eq!(
        reverse["parameters"]["properties"]["text"]["type"], "string",
        "{reverse}"
    );
    assert_eq!(reverse["parameters"]["required"], json!(["text"]));

    // Tasks for them run on the server: text, JSON, an error, the server's environment.
    let t = run_task(&hub, "pytools.reverse", json!({"text": "apex mcp"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result, json!("pcm xepa"));
    let t = run_task(&hub, "pytools.add", json!({"a": 2, "b": 40})).await;
    assert_eq!(t.result, json!({"sum": 42}), "{t:?}");
    let t = run_task(
        &hub,
        "pytools.fail",
        json!({"message": "boom at the server"}),
    )
    .await;
    assert_eq!(t.status, "failed", "{t:?}");
    let e = t.error.unwrap();
    assert!(e.message.contains("boom at the server"), "{e:?}");
    let t = run_task(&hub, "pytools.whoami", json!({})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["tag"], "from-config", "{t:?}");
    assert_eq!(t.result["apex_env"], json!([]), "{t:?}");
    let first_pid = t.result["pid"].as_i64().unwrap();

    // The mounted tool through the hub's MCP server, with the Python SDK: MCP both ways.
    let out = python_client(
        &python,
        &[format!("{}/mcp", hub.url())],
        hub.api_key(),
        &["sha256", "pytools.reverse"],
    )
    .await;
    assert!(out.contains("mounted tool call ok"), "{out}");

    // Kill the server: the node restarts it, and a task right after succeeds on the new one
    // (it waits for the restart rather than failing).
    kill(
        Pid::from_raw(i32::try_from(first_pid).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let t = run_task(&hub, "pytools.whoami", json!({})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    let second_pid = t.result["pid"].as_i64().unwrap();
    assert_ne!(second_pid, first_pid, "{t:?}");
    let t = run_task(&hub, "pytools.reverse", json!({"text": "again"})).await;
    assert_eq!(t.result, json!("niaga"), "{t:?}");
    let log = apex_tests::process::strip_ansi(&node.log_text());
    assert!(log.contains("MCP server stopped; restarting it"), "{log}");
    assert!(log.contains("MCP server restarted"), "{log}");
    // The killed process is gone (reaped), not left as a zombie of the node.
    wait_until("the killed server to be reaped", WAIT, || async move {
        Ok((!Path::new(&format!("/proc/{first_pid}")).exists()).then_some(()))
    })
    .await
    .unwrap();
}
