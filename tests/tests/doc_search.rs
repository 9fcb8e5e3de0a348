//! The `doc_search` example plugin (`examples/plugins/doc_search`) on a real `apex-node`: found
//! as a search tool (`search` capability in `/api/v1/plugins`, `apex_hub::plugins::search_tools`
//! over the hub's node views), queries over its shipped `docs/` answering `{results, query,
//! total}`, a miss as `total: 0`, a clear error for an empty query, and a copy configured with
//! `DOC_SEARCH_ROOT` that reads nothing a symlink outside its root points to.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use apex_tests::{Hub, HubOptions, Node, NodeOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// The repository's example plugins.
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .canonicalize()
        .unwrap()
}

async fn search(hub: &Hub, tool: &str, args: Value) -> apex_tests::Task {
    let t = hub
        .api()
        .submit(&json!({"tool": tool, "args": args, "timeout": 30}))
        .await
        .unwrap();
    hub.api().wait_terminal(&t.task_id, WAIT).await.unwrap()
}

/// A copy of doc_search named `sandboxed_search` whose `config.env` points `DOC_SEARCH_ROOT`
/// at `root`; `root` holds one note, and symlinks (a file and a directory) to `outside`.
fn sandboxed_copy(plugins: &Path, root: &Path, outside: &Path) {
    let src = examples().join("doc_search");
    let dir = plugins.join("sandboxed_search");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("main.py"), dir.join("main.py")).unwrap();
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("plugin.json")).unwrap()).unwrap();
    manifest["name"] = json!("sandboxed_search");
    std::fs::write(dir.join("plugin.json"), manifest.to_string()).unwrap();
    std::fs::write(
        dir.join("config.env"),
        format!("DOC_SEARCH_ROOT={}\n", root.display()),
    )
    .unwrap();

    std::fs::create_dir_all(root.join("notes")).unwrap();
    std::fs::create_dir_all(outside).unwrap();
    std::fs::write(
        outside.join("leak.md"),
        "# Leak\nthe password is swordfish\n",
    )
    .unwrap();
    std::fs::write(
        root.join("notes/orchard.md"),
        "# Orchard\nApples and pears grow in the orchard; apples ripen first.\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.join("leak.md"), root.join("leak.md")).unwrap();
    std::os::unix::fs::symlink(outside, root.join("notes/outside")).unwrap();
}

#[tokio::test]
async fn doc_search_is_a_search_tool_that_finds_its_docs_and_stays_in_its_root() {
    let hub = Hub::start(HubOptions::default()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (more, root, outside) = (
        tmp.path().join("plugins"),
        tmp.path().join("root"),
        tmp.path().join("outside"),
    );
    sandboxed_copy(&more, &root, &outside);
    let node = Node::start(
        &hub,
        NodeOptions::named("search-node").args([
            "--plugin-dir".to_owned(),
            examples().display().to_string(),
            "--plugin-dir".to_owned(),
            more.display().to_string(),
        ]),
    )
    .await
    .unwrap();

    // The tool the node offers for the example, by listing the catalogue.
    let tools: Value = hub.api().get_json("/api/v1/tools").await.unwrap();
    let tool = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .find(|n| n.contains("doc_search"))
        .unwrap_or_else(|| panic!("no doc_search tool in {tools}"))
        .to_owned();
    assert_eq!(tool, "doc_search");
    let described: Value = hub
        .api()
        .get_json(&format!("/api/v1/tools/{tool}"))
        .await
        .unwrap();
    assert_eq!(described["parameters"]["required"], json!(["query"]));

    // The plugin catalogue shows the capability, and the hub counts both copies as search tools.
    let plugins: Value = hub.api().get_json("/api/v1/plugins").await.unwrap();
    let entry = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == tool.as_str())
        .unwrap_or_else(|| panic!("{tool} not in {plugins}"));
    assert_eq!(entry["capabilities"], json!(["search"]));
    assert_eq!(entry["nodes"], json!([node.id()]));
    let views: Value = hub.api().get_json("/v1/nodes").await.unwrap();
    let views = views["data"].as_array().unwrap().clone();
    assert_eq!(
        apex_hub::plugins::search_tools(&views),
        vec!["doc_search", "sandboxed_search"]
    );

    // A query that one shipped note matches: that note first, the word in its snippet.
    let t = search(&hub, &tool, json!({"query": "Mamba selective"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    let r = &t.result;
    assert_eq!(r["query"], "Mamba selective");
    assert_eq!(r["total"], 1, "{r}");
    let first = &r["results"][0];
    assert_eq!(first["source"], "state_space_models.md", "{r}");
    assert_eq!(first["title"], "State space models");
    let snippet = first["snippet"].as_str().unwrap();
    assert!(snippet.contains("Mamba"), "{snippet}");
    assert!(snippet.chars().count() <= 300, "{snippet}");
    assert!(first["score"].as_u64().unwrap() > 0);

    // Several matches: best first, at most `limit`, `total` counting them all.
    let t = search(&hub, &tool, json!({"query": "attention", "limit": 1})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["results"].as_array().unwrap().len(), 1);
    assert_eq!(t.result["results"][0]["source"], "transformers.md");
    assert!(t.result["total"].as_u64().unwrap() >= 2, "{}", t.result);

    // No hit is an empty answer, not an error.
    let t = search(&hub, &tool, json!({"query": "zeppelin"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["total"], 0);
    assert_eq!(t.result["results"], json!([]));

    // An empty query and a bad limit fail with their reason.
    let t = search(&hub, &tool, json!({"query": "  "})).await;
    assert_eq!(t.status, "failed");
    let message = t.error.unwrap().message;
    assert!(message.contains("`query` is empty"), "{message}");
    let t = search(&hub, &tool, json!({"query": "x", "limit": 51})).await;
    assert_eq!(t.status, "failed");
    assert!(t.error.unwrap().message.contains("`limit`"));

    // DOC_SEARCH_ROOT from config: its own note is found, with the path under the root;
    // nothing a symlink out of the root points to is read.
    let t = search(&hub, "sandboxed_search", json!({"query": "apples"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["total"], 1, "{}", t.result);
    assert_eq!(t.result["results"][0]["source"], "notes/orchard.md");
    let t = search(&hub, "sandboxed_search", json!({"query": "swordfish"})).await;
    assert_eq!(t.status, "succeeded", "{t:?}");
    assert_eq!(t.result["total"], 0, "read outside its root: {}", t.result);
}
