//! Plugins on real `apex-node` processes (`--plugin-dir`): both manifest formats in Python and
//! POSIX sh (the repository's `examples/plugins` and plugins written here), bad manifests
//! skipped, the stdio contract as a user sees it in task results, timeouts that leave no
//! process behind, and an asynchronous plugin ending its task by a signed callback, also
//! across a hub SIGKILL.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use apex_tests::{Hub, HubOptions, Node, NodeOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// The repository's example plugins (word_count, disk_free, slow_report, doc_search).
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .canonicalize()
        .unwrap()
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A second plugin directory: the other language of each format, plugins that fail, bad
/// manifests and a disabled one.
fn more_plugins(root: &Path) {
    // Python in the VCP format.
    write(
        root,
        "reverse/plugin-manifest.json",
        r#"{"name": "reverse", "displayName": "Reverse", "version": "0.3.0", "author": "tests",
            "pluginType": "synchronous",
            "entryPoint": {"type": "python", "command": "python3 reverse.py"},
            "communication": {"protocol": "stdio", "timeout": 5000},
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "capabilities": {"invocationCommands": [{"commandIdentifier": "reverse",
                "description": "Reverses a text.", "example": "{\"text\": \"abc\"}"}]}}"#,
    );
    write(
        root,
        "reverse/reverse.py",
        "import json, sys\nargs = json.load(sys.stdin)\n\
         print(json.dumps({'status': 'success', 'result': args['text'][::-1]}))\n",
    );
    // POSIX sh in the nex format, printing plain text (a string result) from its config.
    write(
        root,
        "greet/plugin.json",
        r#"{"name": "greet", "version": "2.0.0", "description": "Greets.", "author": "tests",
            "capabilities": ["text"], "entry_point": "sh greet.sh",
            "config_schema": {"type": "object", "properties": {"GREETING": {"type": "string"}}}}"#,
    );
    write(
        root,
        "greet/greet.sh",
        "cat > /dev/null\necho \"$GREETING from $APEX_PLUGIN_NAME\"\n",
    );
    write(root, "greet/config.env", "GREETING=\"good morning\"\n");
    // Exits non-zero after lots of stderr.
    write(
        root,
        "crash/plugin.json",
        r#"{"name": "crash", "entry_point": ["sh", "-c", "for i in $(seq 1 400); do echo noise $i >&2; done; echo 'disk on fire' >&2; exit 3"]}"#,
    );
    // Reports an error in the stdio contract.
    write(
        root,
        "refuse/plugin.json",
        r#"{"name": "refuse", "entry_point": ["sh", "-c", "cat >/dev/null; echo '{\"status\":\"error\",\"error\":\"no such city\"}'"]}"#,
    );
    // Bad manifests, each naming its field, and a disabled plugin.
    write(root, "bad_json/plugin.json", "{ not json");
    write(
        root,
        "bad_entry/plugin-manifest.json",
        r#"{"name": "bad_entry"}"#,
    );
    write(
        root,
        "bad_type/plugin-manifest.json",
        r#"{"name": "bad_type", "pluginType": "static", "entryPoint": {"command": "sh x.sh"}}"#,
    );
    write(
        root,
        "bad_program/plugin.json",
        r#"{"name": "bad_program", "entry_point": "no-such-interpreter-xyz main.py"}"#,
    );
    write(
        root,
        "blocked/plugin-manifest.json.block",
        r#"{"name": "blocked", "entryPoint": {"command": "sh x.sh"}}"#,
    );
}

async fn run(hub: &Hub, tool: &str, args: Value) -> apex_tests::Task {
    let t = hub
        .api()
        .submit(&json!({"tool": tool, "args": args, "timeout": 30}))
        .await
        .unwrap();
    hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap()
}

#[tokio::test]
async fn plugins_of_both_formats_and_languages_run_as_tasks_and_bad_ones_are_skipped() {
    let hub = Hub::start(HubOptions::default()).await.unwrap();
    let more = tempfile::tempdir().unwrap();
    more_plugins(more.path());
    let node = Node::start(
        &hub,
        NodeOptions::named("plugin-node").args([
            "--plugin-dir".to_owned(),
            examples().display().to_string(),
            "--plugin-dir".to_owned(),
            more.path().display().to_string(),
        ]),
    )
    .await
    .unwrap();

    // The catalogue: every good plugin is a tool with its schema, the others are not.
    let tools: Value = hub.api().get_json("/api/v1/tools").await.unwrap();
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in [
        "word_count",
        "disk_free",
        "slow_report",
        "reverse",
        "greet",
        "crash",
        "refuse",
        "sha256",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for bad in [
        "bad_json",
        "bad_entry",
        "bad_type",
        "bad_program",
        "blocked",
    ] {
        assert!(!names.contains(&bad), "{bad} was loaded");
    }
    let wc: Value = hub
        .api()
        .get_json("/api/v1/tools/word_count")
        .await
        .unwrap();
    assert_eq!(wc["parameters"]["required"], json!(["text"]));
    assert_eq!(wc["examples"], json!([{"text": "the quick brown fox"}]));
    assert_eq!(wc["nodes"], json!([node.id()]));
    let rev: Value = hub.api().get_json("/api/v1/tools/reverse").await.unwrap();
    assert_eq!(rev["examples"][0]["command"], "reverse", "{rev}");

    let plugins: Value = hub.api().get_json("/api/v1/plugins").await.unwrap();
    let entry = |name: &str| {
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {plugins}"))
    };
    let wc = entry("word_count");
    assert_eq!(wc["version"], "1.0.0");
    assert_eq!(wc["author"], "apex examples");
    assert_eq!(wc["capabilities"], json!(["text"]));
    assert_eq!(wc["enabled"], true);
    assert_eq!(wc["nodes"], json!([node.id()]));
    assert_eq!(
        wc["config_schema"]["properties"]["WORD_COUNT_LOWERCASE"]["type"],
        "string"
    );
    assert_eq!(entry("slow_report")["plugin_type"], "asynchronous");
    assert_eq!(entry("greet")["version"], "2.0.0");

    // Each bad manifest is one warning naming the file and the field; the node runs on.
    let log = node.log_text();
    for (file, field) in [
        ("bad_json/plugin.json", "(file)"),
        ("bad_entry/plugin-manifest.json", "entryPoint"),
        ("bad_type/plugin-manifest.json", "pluginType"),
        ("bad_program/plugin.json", "entry_point"),
    ] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(file) && l.contains("plugin skipped"))
            .collect();
        assert_eq!(lines.len(), 1, "{file}: {lines:?}\n{log}");
        assert!(
            lines[0].contains(field),
            "{file} names {field}: {}",
            lines[0]
        );
    }
    assert!(log.contains("plugin-manifest.json.block"), "{log}");

    // The stdio contract, as task results.
    let t = run(&hub, "word_count", json!({"text": "The cat saw the dog"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["result"]["words"], 5);
    assert_eq!(t.result["result"]["distinct_words"], 4, "config: lowercase");
    assert_eq!(t.result["messageForAI"], "The text has 5 words.");
    let t = run(&hub, "word_count", json!({"text": 7})).await;
    assert_eq!(t.status, "failed");
    assert!(t.error.unwrap().message.contains("bad arguments"));

    let t = run(&hub, "disk_free", json!({})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert!(t.result["total_kb"].as_u64().unwrap() > 0, "{}", t.result);
    assert!(t.result["available_kb"].as_u64().unwrap() <= t.result["total_kb"].as_u64().unwrap());

    let t = run(&hub, "reverse", json!({"text": "apex"})).await;
    assert_eq!(
        (t.status.as_str(), t.result.clone()),
        ("succeeded", json!("xepa"))
    );

    let t = run(&hub, "greet", json!({})).await;
    assert_eq!(t.result, json!("good morning from greet"), "{t:?}");

    let t = run(&hub, "crash", json!({})).await;
    assert_eq!(t.status, "failed");
    let e = t.error.unwrap();
    assert_eq!(e.code, "task_execution_failed");
    assert!(e.message.contains("exited with code 3"), "{}", e.message);
    assert!(e.message.ends_with("disk on fire"), "{}", e.message);
    assert!(!e.message.contains("noise 1\n"), "only stderr's tail");

    let t = run(&hub, "refuse", json!({})).await;
    assert_eq!(t.status, "failed");
    assert!(t.error.unwrap().message.contains("no such city"));
}

/// Processes of plugin `name`'s runs still alive, and zombies left under `parent`.
fn leftovers(name: &str, parent: i32) -> (Vec<i32>, Vec<i32>) {
    apex_tests::process::leftover_processes(&format!("APEX_PLUGIN_NAME={name}"), parent)
}

#[tokio::test]
async fn timeouts_kill_the_whole_process_group_and_leave_no_process() {
    const CALLS: usize = 200;
    let hub = Hub::start(HubOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One call in ten hangs with a child and a grandchild of its own; the manifest's timeout
    // (300 ms) must kill all three.
    write(
        dir.path(),
        "hang_or_answer/plugin.json",
        r#"{"name": "hang_or_answer", "entry_point": "sh run.sh", "timeout": 300}"#,
    );
    write(
        dir.path(),
        "hang_or_answer/run.sh",
        "input=$(cat)\n\
         case \"$input\" in *hang*) sh -c 'sleep 60 & sleep 60' & sleep 60; wait ;; esac\n\
         echo \"{\\\"status\\\":\\\"success\\\",\\\"result\\\":\\\"ok\\\"}\"\n",
    );
    // The same plugin without the short timeout, to see the count work and cancellation kill.
    write(
        dir.path(),
        "hang_long/plugin.json",
        r#"{"name": "hang_long", "entry_point": "sh ../hang_or_answer/run.sh", "timeout": 60000}"#,
    );
    let node = Node::start(
        &hub,
        NodeOptions::named("timeout-node")
            .concurrency(16)
            .args(["--plugin-dir".to_owned(), dir.path().display().to_string()]),
    )
    .await
    .unwrap();
    let long = hub
        .api()
        .submit(&json!({"tool": "hang_long", "args": {"mode": "hang"}, "timeout": 60}))
        .await
        .unwrap();
    let mut running = Vec::new();
    for _ in 0..200 {
        running = leftovers("hang_long", node.pid()).0;
        if running.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        running.len() >= 4,
        "the run, its child and grandchildren: {running:?}"
    );
    let (status, _) = hub.api().cancel(&long.task_id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut left = running;
    for _ in 0..100 {
        left = leftovers("hang_long", node.pid()).0;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left,
        Vec::<i32>::new(),
        "cancelling the task kills its processes"
    );

    let bodies: Vec<Value> = (0..CALLS)
        .map(|i| {
            let args = if i % 10 == 0 {
                json!({"mode": "hang"})
            } else {
                json!({"mode": "answer"})
            };
            json!({"tool": "hang_or_answer", "args": args, "timeout": 30})
        })
        .collect();
    let ids = hub.api().submit_ids(&bodies).await.unwrap();
    let tasks = hub
        .api()
        .wait_all_terminal(&ids, Duration::from_secs(120), 32)
        .await
        .unwrap();
    let count = |s: &str| tasks.iter().filter(|t| t.status == s).count();
    assert_eq!(
        count("succeeded"),
        CALLS - CALLS / 10,
        "{:?}",
        tasks
            .iter()
            .find(|t| t.status != "succeeded" && t.status != "timed_out")
    );
    assert_eq!(count("timed_out"), CALLS / 10);
    let timed_out = tasks.iter().find(|t| t.status == "timed_out").unwrap();
    assert!(
        timed_out.error.as_ref().unwrap().message.contains("300 ms"),
        "{timed_out:?}"
    );

    // Nothing of any run is left: no plugin process, child or grandchild, and no zombie.
    let mut last = (Vec::new(), Vec::new());
    for _ in 0..50 {
        last = leftovers("hang_or_answer", node.pid());
        if last.0.is_empty() && last.1.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        (vec![], vec![]),
        "leftover processes (alive, zombies)"
    );
}

/// The hub's public URL is its listen address, which the restart keeps.
#[tokio::test]
async fn an_async_plugin_ends_its_task_by_a_signed_callback_even_across_a_hub_kill() {
    let mut hub = Hub::start(HubOptions::default()).await.unwrap();
    let node = Node::start(
        &hub,
        NodeOptions::named("async-node")
            .args(["--plugin-dir".to_owned(), examples().display().to_string()]),
    )
    .await
    .unwrap();

    // The plugin answers "pending" at once; the task stays running until the worker's
    // callback, a second later.
    let t = hub
        .api()
        .submit(&json!({"tool": "slow_report", "args": {"topic": "tides", "seconds": 1.5}, "timeout": 60}))
        .await
        .unwrap();
    let mut seen_running = false;
    let done = loop {
        let now = hub.api().get(&t.task_id).await.unwrap();
        if now.is_terminal() {
            break now;
        }
        seen_running |= now.status == "running";
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        seen_running,
        "the task was running while the report was written"
    );
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.result["topic"], "tides");
    assert!(
        done.result["report"]
            .as_str()
            .unwrap()
            .starts_with("Report on tides")
    );
    assert_eq!(done.attempt, 1);

    // A failure reported by the callback fails the task with the plugin's error.
    let t = run(
        &hub,
        "slow_report",
        json!({"topic": "x", "seconds": 0.2, "fail": true}),
    )
    .await;
    assert_eq!(t.status, "failed");
    assert!(t.error.unwrap().message.contains("no sources found"));

    // The hub dies while the report is being written; the callback reaches the restarted hub
    // and still ends the task.
    let t = hub
        .api()
        .submit(&json!({"tool": "slow_report", "args": {"topic": "storms", "seconds": 4}, "timeout": 120}))
        .await
        .unwrap();
    loop {
        if hub.api().get(&t.task_id).await.unwrap().status == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.kill_and_restart().await.unwrap();
    let done = hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap();
    assert_eq!(
        done.status,
        "succeeded",
        "{done:?}\nnode log:\n{}",
        node.log_text()
    );
    assert_eq!(done.result["topic"], "storms");

    // A repeated callback for the finished task changes nothing; a forged one is refused.
    let cb = format!("{}/plugin-callback/slow_report/{}", hub.url(), t.task_id);
    let r = hub
        .api()
        .http()
        .post(&cb)
        .header("X-Apex-Timestamp", "1")
        .header("X-Apex-Signature", "sha256=00")
        .json(&json!({"status": "failed", "error": "forged"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let after = hub.api().get(&t.task_id).await.unwrap();
    assert_eq!(after.status, "succeeded");
}
