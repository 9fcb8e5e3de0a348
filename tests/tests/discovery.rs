//! Discovery end to end: a real `apex-node --hub auto`, started before any hub, finds a real
//! `apex-hub --discovery` over mDNS and registers, all inside a network namespace the test
//! creates (`unshare -n`, loopback only), so no multicast leaves for the machine's real
//! interfaces. The steps are `tests/fixtures/discovery_netns.sh`, run as the namespace's first
//! process; this test checks what it left behind (the hub's `/v1/nodes`, both logs).
//!
//! Skipped (with `skipped: …` on stderr) only when `unshare` cannot create a namespace here
//! (not root, no user namespaces): anything that fails after that fails the test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use apex_tests::process::{bin_dir, bin_path};

const API_KEY: &str = "apex-discovery-test-key";
const NODE_KEY: &str = "node-discovery-test-key";

/// Whether `unshare -n` can create a network namespace, and why not.
fn namespaces_work() -> Result<(), String> {
    match Command::new("unshare").args(["-n", "true"]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

#[test]
fn a_node_started_with_hub_auto_before_its_hub_finds_it_over_mdns_in_a_namespace() {
    if let Err(why) = namespaces_work() {
        eprintln!("skipped: unshare -n cannot create a network namespace here ({why})");
        return;
    }
    bin_path("apex-hub").unwrap();
    bin_path("apex-node").unwrap();
    let work = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/discovery_netns.sh");
    let out = Command::new("timeout")
        .arg("120")
        .args(["unshare", "-n", "sh"])
        .arg(&script)
        .arg(bin_dir().unwrap())
        .arg(work.path())
        .env("APEX_TEST_API_KEY", API_KEY)
        .env("APEX_NODE_KEY", NODE_KEY)
        .output()
        .unwrap();
    let log = |name: &str| std::fs::read_to_string(work.path().join(name)).unwrap_or_default();
    let (node_log, hub_log) = (log("node.log"), log("hub.log"));
    assert!(
        out.status.success(),
        "the check in the namespace failed ({}): {}\n--- node.log\n{node_log}\n--- hub.log\n{hub_log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The hub listed the node, online.
    let nodes: serde_json::Value = serde_json::from_str(&log("nodes.json")).unwrap();
    let node = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "discovered-node")
        .unwrap_or_else(|| panic!("node not listed: {nodes}"));
    assert_eq!(node["status"], "online", "{node}");

    // The hub said what it advertised, and withdrew it on SIGTERM.
    for line in [
        "advertising the hub on the local network (mDNS)",
        "apex-test-hub._apex._tcp.local.",
        "version=0.1.0 path=/distributed-server proto=1.0",
        "mDNS advertisement withdrawn",
    ] {
        assert!(hub_log.contains(line), "hub.log lacks {line:?}:\n{hub_log}");
    }
    // The node, started first, said it found none and kept looking; then found the hub and
    // connected to the URL built from the record.
    let none = node_log
        .find("no hub found on the local network (mDNS)")
        .unwrap_or_else(|| panic!("node.log:\n{node_log}"));
    let found = node_log
        .find("found a hub on the local network (mDNS)")
        .unwrap_or_else(|| panic!("node.log:\n{node_log}"));
    assert!(none < found, "node.log:\n{node_log}");
    for line in [
        "hub=ws://127.0.0.1:8088/distributed-server",
        "instance=apex-test-hub._apex._tcp.local.",
        "registered with hub",
    ] {
        assert!(
            node_log.contains(line),
            "node.log lacks {line:?}:\n{node_log}"
        );
    }
}
