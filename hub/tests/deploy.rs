#![allow(clippy::unwrap_used)]
//! `deploy/`: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), and the Grafana dashboard parses and only queries metrics the hub
//! declares (`apex_hub::metrics::names`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): install Debian's `prometheus` package \
                 (scripts/test.sh does this)"
            )
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `apex_*` identifier in `text`, with histogram series suffixes removed.
fn apex_metrics(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("apex_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                }
            }
            out.push(name.to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

fn assert_declared(used: &[String], what: &str) {
    let declared = apex_hub::metrics::names();
    assert!(!used.is_empty(), "{what} uses no apex metric");
    for m in used {
        assert!(
            declared.contains(m),
            "{what} uses `{m}`, which hub/src/metrics.rs does not declare (declared: {declared:?})"
        );
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "prometheus/alerts.yml"]);
    promtool(&["test", "rules", "prometheus/alerts.test.yml"]);
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    for alert in [
        "ApexNodeDown",
        "ApexQueueGrowing",
        "ApexTaskFailureRate",
        "ApexNoNodesForTool",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "missing {alert}"
        );
    }
    // Only expressions, not the prose of annotations (which names metrics in text too).
    let exprs: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_declared(&apex_metrics(&exprs), "alerts.yml");
}

#[test]
fn grafana_dashboard_parses_and_queries_only_declared_metrics() {
    let text = std::fs::read_to_string(deploy().join("grafana/apex-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut used = Vec::new();
    for p in panels {
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let found = apex_metrics(expr);
            assert!(
                !found.is_empty(),
                "panel {} queries no apex metric: {expr}",
                p["title"]
            );
            used.extend(found);
        }
    }
    assert_declared(&used, "apex-dashboard.json");
    // Every family that matters to an operator is on the dashboard.
    for m in [
        "apex_nodes",
        "apex_queue_depth",
        "apex_tasks_finished_total",
        "apex_task_dispatch_latency_seconds",
        "apex_task_duration_seconds",
        "apex_task_migrations_total",
        "apex_websocket_connections",
        "apex_http_requests_total",
        "apex_llm_requests_total",
        "apex_llm_time_to_first_token_seconds",
    ] {
        assert!(
            used.iter().any(|u| u == m),
            "the dashboard does not show {m}"
        );
    }
}

#[test]
fn the_scanner_finds_metric_names() {
    assert_eq!(
        apex_metrics("rate(apex_x_bucket[5m]) / my_apex_y + apex_z_total"),
        ["apex_x", "apex_z_total"]
    );
}

/// `helm/apex/values.schema.json` lists exactly the hub's config keys for `hub.config`, so a
/// typo fails the install and a new key is not refused by the chart.
#[test]
fn the_chart_schema_names_every_hub_config_key() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("helm/apex/values.schema.json")).unwrap(),
    )
    .unwrap();
    let listed = schema["properties"]["hub"]["properties"]["config"]["propertyNames"]["enum"]
        .as_array()
        .unwrap();
    let mut listed: Vec<&str> = listed.iter().map(|v| v.as_str().unwrap()).collect();
    listed.sort_unstable();
    let config = serde_json::to_value(apex_hub::config::Config::default()).unwrap();
    let mut keys: Vec<&str> = config
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        listed, keys,
        "update hub.config's propertyNames in values.schema.json"
    );
}
