//! Replays real traffic captured between a scripted hub and two unmodified third-party clients
//! (`tests/captured/*.jsonl`, see `shared/fixtures/README.md`): every node->hub frame must decode
//! as a [`NodeMessage`] and every hub->node frame as a [`HubMessage`], except a short allow-list
//! of frames the fake hub sent on purpose that apex's hub never sends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apex_protocol::codec::{self, Message};
use apex_protocol::{
    Encoding, Frame, HubMessage, Limits, NodeMessage, NodeRegister, NodeType, RegisterTools,
    TaskResult, ToolResult,
};
use serde_json::Value;

const NODE_ID: &str = "node-1795306155354-b886d014";
const SECRET: &str = "sk-planted-secret";

/// Frames that must NOT decode, with the error code the hub would answer.
/// (file, direction, t_ms, expected `DecodeError::code()`, why)
const EXPECTED_FAILURES: &[(&str, &str, f64, &str, &str)] = &[
    (
        "vcp-distributed-server.jsonl",
        "hub->node",
        3147.9,
        "unknown_type",
        "the VCP reference hub's `heartbeat {timestamp}` is not a hub message: apex never sends \
         it (liveness is WebSocket ping/pong)",
    ),
    (
        "vcp-distributed-server.edge-cases-and-backoff.jsonl",
        "hub->node",
        34.0,
        "invalid_payload",
        "`execute_tool` without `requestId`: the node drops it silently, so the type requires it",
    ),
];

/// One recorded message frame.
struct Entry {
    file: String,
    line: usize,
    dir: String,
    t_ms: f64,
    frame: Value,
}

fn captured_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/captured")
}

/// Every message frame of every capture, skipping upgrades, closes and refused upgrades.
fn entries() -> Vec<Entry> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(captured_dir())
        .expect("tests/captured exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("jsonl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_owned();
        let text = std::fs::read_to_string(&path).expect("readable capture");
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{file}:{}: not JSON: {e}", i + 1));
            let frame = v["frame"].clone();
            let reserved = ["http_upgrade", "ws_close", "http_response"];
            if reserved.iter().any(|k| frame.get(k).is_some()) {
                continue;
            }
            out.push(Entry {
                file: file.clone(),
                line: i + 1,
                dir: v["dir"].as_str().expect("dir is a string").to_owned(),
                t_ms: v["t_ms"].as_f64().expect("t_ms is a number"),
                frame,
            });
        }
    }
    out
}

fn expected_failure(e: &Entry) -> Option<&'static str> {
    EXPECTED_FAILURES
        .iter()
        .find(|(f, d, t, _, _)| *f == e.file && *d == e.dir && (*t - e.t_ms).abs() < 0.05)
        .map(|(_, _, _, code, _)| *code)
}

/// Decodes a frame, then checks it survives JSON and MessagePack re-encoding unchanged.
fn decode_and_reencode<T: Message + PartialEq + std::fmt::Debug>(
    e: &Entry,
) -> Result<T, apex_protocol::DecodeError> {
    let msg: T = codec::decode(&Frame::Text(e.frame.to_string()))?;
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let frame = codec::encode(&msg, enc).expect("encodes");
        let back: T = codec::decode(&frame)
            .unwrap_or_else(|err| panic!("{}:{} {enc:?} re-decode: {err}", e.file, e.line));
        assert_eq!(back, msg, "{}:{} {enc:?} round trip", e.file, e.line);
    }
    Ok(msg)
}

/// Decoded frames of the node->hub direction, keyed by (file, line).
fn node_frames() -> Vec<(Entry, NodeMessage)> {
    entries()
        .into_iter()
        .filter(|e| e.dir == "node->hub")
        .filter_map(|e| {
            let m = decode_and_reencode::<NodeMessage>(&e).ok()?;
            Some((e, m))
        })
        .collect()
}

#[test]
fn every_captured_frame_decodes_in_its_direction() {
    let entries = entries();
    let mut per_type: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut failures_seen = Vec::new();
    for e in &entries {
        let result = match e.dir.as_str() {
            "node->hub" => decode_and_reencode::<NodeMessage>(e).map(|m| m.type_name()),
            "hub->node" => decode_and_reencode::<HubMessage>(e).map(|m| m.type_name()),
            other => panic!("{}:{}: unknown dir {other}", e.file, e.line),
        };
        match (result, expected_failure(e)) {
            (Ok(t), None) => {
                assert_eq!(
                    e.frame["type"].as_str(),
                    Some(t),
                    "{}:{}: decoded into a different type",
                    e.file,
                    e.line
                );
                *per_type.entry((e.dir.clone(), t.to_owned())).or_default() += 1;
            }
            (Err(err), Some(code)) => {
                assert_eq!(err.code(), code, "{}:{}: {err}", e.file, e.line);
                failures_seen.push((e.file.clone(), e.t_ms));
            }
            (Ok(t), Some(code)) => panic!(
                "{}:{}: `{t}` decoded but was expected to fail with {code}",
                e.file, e.line
            ),
            (Err(err), None) => panic!(
                "{}:{}: {} frame does not decode: {err} (code {})\nframe: {}",
                e.file,
                e.line,
                e.dir,
                err.code(),
                e.frame
            ),
        }
    }
    // The allow-list must not go stale.
    assert_eq!(
        failures_seen.len(),
        EXPECTED_FAILURES.len(),
        "allow-list entries not matched: saw {failures_seen:?}"
    );

    // Guard against an empty or truncated capture folder: every type both clients produced.
    let count = |dir: &str, t: &str| {
        per_type
            .get(&(dir.to_owned(), t.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    for t in [
        "node_register",
        "heartbeat",
        "task_result",
        "register_tools",
        "report_ip",
        "tool_result",
    ] {
        assert!(count("node->hub", t) > 0, "no node->hub `{t}` replayed");
    }
    for t in [
        "connection_ack",
        "node_registered",
        "heartbeat_ack",
        "task_assign",
        "task_result_ack",
        "execute_tool",
        "cancel_tool",
    ] {
        assert!(count("hub->node", t) > 0, "no hub->node `{t}` replayed");
    }
    assert_eq!(count("node->hub", "node_register"), 5, "{per_type:?}");
    assert_eq!(count("node->hub", "register_tools"), 4, "{per_type:?}");
}

#[test]
fn apex_agent_registration_gives_limit_and_tools() {
    let regs: Vec<(Entry, NodeRegister)> = node_frames()
        .into_iter()
        .filter_map(|(e, m)| match m {
            NodeMessage::NodeRegister(r) => Some((e, r)),
            _ => None,
        })
        .collect();
    assert!(!regs.is_empty());
    for (e, r) in &regs {
        let at = format!("{}:{}", e.file, e.line);
        assert_eq!(r.concurrency_limit(), Some(2), "{at}");
        assert_eq!(r.tool_names(), ["echo", "wait"], "{at}");
        assert_eq!(
            r.node_id.as_deref(),
            Some(NODE_ID),
            "{at}: same id every time"
        );
        assert_eq!(r.node_type, NodeType::Worker, "{at}");
        assert_eq!(r.name, "Capture Worker", "{at}");
        assert_eq!(r.max_concurrent_tasks, None, "{at}: third-party form");
        assert_eq!(r.encoding, None, "{at}: third-party clients speak JSON");
        assert_eq!(r.stats.as_ref().map(|s| s.total_tasks), Some(0), "{at}");
        NodeMessage::NodeRegister(r.clone())
            .validate(&Limits::default())
            .unwrap_or_else(|err| panic!("{at}: {err}"));
    }
}

#[test]
fn vcp_register_tools_drops_paths_and_secrets() {
    let regs: Vec<(Entry, RegisterTools)> = node_frames()
        .into_iter()
        .filter_map(|(e, m)| match m {
            NodeMessage::RegisterTools(r) => Some((e, r)),
            _ => None,
        })
        .collect();
    assert!(!regs.is_empty());
    for (e, r) in &regs {
        let at = format!("{}:{}", e.file, e.line);
        // The captured frame really carries the secret; the decoded one must not.
        assert!(
            e.frame.to_string().contains(SECRET),
            "{at}: fixture changed"
        );
        assert_eq!(r.server_name, "CaptureDistNode", "{at}");
        let names: Vec<&str> = r.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["EchoTest"], "{at}");
        assert_eq!(
            r.tools[0].display_name.as_deref(),
            Some("Echo Test"),
            "{at}"
        );
        assert_eq!(
            r.tools[0].plugin_type.as_deref(),
            Some("synchronous"),
            "{at}"
        );
        assert_eq!(r.capabilities, None, "{at}: no cancelTool declared");

        let msg = NodeMessage::RegisterTools(r.clone());
        let Frame::Text(json) = codec::encode(&msg, Encoding::Json).expect("encodes") else {
            panic!("json is text");
        };
        for leak in [
            "basePath",
            "pluginSpecificEnvConfig",
            SECRET,
            "/path/on/node",
        ] {
            assert!(!json.contains(leak), "{at}: re-encoded JSON leaks {leak}");
        }
        let Frame::Binary(bin) = codec::encode(&msg, Encoding::Msgpack).expect("encodes") else {
            panic!("msgpack is binary");
        };
        assert!(
            !bin.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{at}: msgpack leaks the secret"
        );
        // What a log line would print.
        assert!(!format!("{msg:?}").contains(SECRET), "{at}: Debug leaks it");
        msg.validate(&Limits::default())
            .unwrap_or_else(|err| panic!("{at}: {err}"));
    }
}

#[test]
fn vcp_tool_results_keep_error_as_a_string() {
    let results: Vec<(Entry, ToolResult)> = node_frames()
        .into_iter()
        .filter_map(|(e, m)| match m {
            NodeMessage::ToolResult(r) => Some((e, r)),
            _ => None,
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for (e, r) in &results {
        let at = format!("{}:{}", e.file, e.line);
        match r.status.as_str() {
            "success" => {
                ok += 1;
                assert!(r.result.is_some(), "{at}: success carries result");
                assert_eq!(r.error, None, "{at}");
            }
            "error" => {
                failed += 1;
                let text = r.error.as_ref().and_then(Value::as_str);
                assert!(
                    text.is_some_and(|t| !t.is_empty()),
                    "{at}: error is a plain string, got {:?}",
                    r.error
                );
                assert_eq!(r.result, None, "{at}");
            }
            other => panic!("{at}: unexpected status {other}"),
        }
    }
    assert!(ok >= 3 && failed >= 2, "ok {ok}, failed {failed}");
    let not_found = results
        .iter()
        .find(|(_, r)| r.request_id == "req-a290aa51")
        .expect("NoSuchTool result captured");
    assert_eq!(
        not_found.1.error,
        Some(Value::String(
            "[DistPluginManager] Plugin \"NoSuchTool\" not found for tool call.".into()
        ))
    );
}

#[test]
fn task_result_error_codes_parse() {
    let results: Vec<(Entry, TaskResult)> = node_frames()
        .into_iter()
        .filter_map(|(e, m)| match m {
            NodeMessage::TaskResult(r) => Some((e, r)),
            _ => None,
        })
        .collect();
    let mut codes: Vec<String> = Vec::new();
    for (e, r) in &results {
        let at = format!("{}:{}", e.file, e.line);
        assert_eq!(
            r.attempt, None,
            "{at}: third-party clients do not echo attempt"
        );
        assert!(r.node_id.is_some(), "{at}");
        assert!(r.execution_time.is_some(), "{at}");
        if r.success {
            assert!(r.result.is_some() && r.error.is_none(), "{at}");
        } else {
            let err = r.error.as_ref().expect("failed result has an error");
            assert!(!err.message.is_empty(), "{at}");
            codes.push(err.code.clone());
        }
    }
    codes.sort();
    assert_eq!(codes, ["capability_not_supported", "task_timeout"]);

    // The late result after reconnect keeps its task id and payload.
    let late = results
        .iter()
        .find(|(_, r)| r.task_id == "task-wait-across-disconnect-6113c6a0")
        .expect("late result captured");
    assert_eq!(late.1.result, Some(serde_json::json!({"sleptMs": 1500})));
    assert_eq!(late.1.execution_time, Some(1502));
}

#[test]
fn hub_side_variants_decode_with_defaults() {
    let hub: Vec<(Entry, HubMessage)> = entries()
        .into_iter()
        .filter(|e| e.dir == "hub->node" && expected_failure(e).is_none())
        .map(|e| {
            let m = decode_and_reencode::<HubMessage>(&e).expect("decodes");
            (e, m)
        })
        .collect();

    // node_registered refused: no hubInfo.
    let refused = hub.iter().find_map(|(_, m)| match m {
        HubMessage::NodeRegistered(r) if !r.success => Some(r),
        _ => None,
    });
    let refused = refused.expect("a refused node_registered is captured");
    assert_eq!(refused.hub_info, None);
    assert_eq!(refused.message, "registration refused by capture hub");

    // hubInfo of a third-party hub: missing apex fields take defaults (JSON).
    let accepted = hub.iter().find_map(|(_, m)| match m {
        HubMessage::NodeRegistered(r) if r.success => r.hub_info.as_ref(),
        _ => None,
    });
    let info = accepted.expect("an accepted node_registered is captured");
    assert!(info.llm_available);
    assert_eq!(info.encoding, Encoding::Json);

    // task_assign without timeout; execute_tool without toolArgs.
    assert!(hub.iter().any(|(_, m)| matches!(
        m,
        HubMessage::TaskAssign(a) if a.task_id == "task-after-rename-echo" && a.timeout.is_none()
    )));
    assert!(hub.iter().any(|(_, m)| matches!(
        m,
        HubMessage::ExecuteTool(x) if x.request_id == "req-echo-noargs" && x.tool_args.is_null()
    )));
}

#[test]
fn report_ip_keeps_null_public_ip() {
    let frame = node_frames()
        .into_iter()
        .find_map(|(_, m)| match m {
            NodeMessage::ReportIp(r) => Some(r),
            _ => None,
        })
        .expect("report_ip captured");
    assert_eq!(frame.public_ip, None);
    assert!(frame.local_ips.is_empty());
    assert_eq!(frame.http_port, Some(17974));
    let Frame::Text(json) =
        codec::encode(&NodeMessage::ReportIp(frame), Encoding::Json).expect("encodes")
    else {
        panic!("json is text");
    };
    let v: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["data"]["publicIP"], Value::Null);
    assert!(
        v["data"].get("publicIP").is_some(),
        "publicIP is always sent"
    );
}
