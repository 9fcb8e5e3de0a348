//! Golden frames freeze the wire shape of every message type, in both directions.
//!
//! `tests/golden/<type>.json` (and `<type>.<variant>.json` for extra forms) holds one frame
//! exactly as the crate serializes it. Each golden must decode into the right direction enum,
//! re-encode to the same JSON value (so optional fields that are `None` must be absent), and
//! survive a MessagePack round trip unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apex_protocol::codec::{self, Message};
use apex_protocol::{Encoding, Frame, HubMessage, Limits, NodeMessage};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Every golden file: file name -> (wire type, parsed JSON).
fn goldens() -> BTreeMap<String, (String, Value)> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(golden_dir()).expect("tests/golden exists");
    for entry in entries {
        let path = entry.expect("readable dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name")
            .to_owned();
        let wire = file.split('.').next().expect("non-empty name").to_owned();
        let text = std::fs::read_to_string(&path).expect("readable golden");
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
        out.insert(file, (wire, value));
    }
    out
}

/// Decodes `golden` as `T`, checks the type name, the JSON re-encoding and the MessagePack round
/// trip. Returns the decoded message.
fn check_roundtrip<T>(
    file: &str,
    wire: &str,
    golden: &Value,
    type_name: fn(&T) -> &'static str,
) -> T
where
    T: Message + PartialEq + std::fmt::Debug,
{
    assert_eq!(
        golden.get("type").and_then(Value::as_str),
        Some(wire),
        "{file}: `type` must match the file name"
    );

    let text = serde_json::to_string(golden).expect("golden serializes");
    let msg: T = codec::decode(&Frame::Text(text))
        .unwrap_or_else(|e| panic!("{file}: golden does not decode: {e}"));
    assert_eq!(type_name(&msg), wire, "{file}: type_name()");

    // JSON: re-encoding gives back exactly the golden (no field added, renamed or dropped).
    let Frame::Text(json) = codec::encode(&msg, Encoding::Json).expect("encodes as json") else {
        panic!("{file}: Encoding::Json must give a text frame");
    };
    let reencoded: Value = serde_json::from_str(&json).expect("encoder emits json");
    assert_eq!(
        reencoded, *golden,
        "{file}: re-encoded JSON differs from the golden"
    );

    // MessagePack: a binary frame that decodes to the same message...
    let frame = codec::encode(&msg, Encoding::Msgpack).expect("encodes as msgpack");
    let Frame::Binary(bytes) = &frame else {
        panic!("{file}: Encoding::Msgpack must give a binary frame");
    };
    let back: T = codec::decode(&frame)
        .unwrap_or_else(|e| panic!("{file}: msgpack frame does not decode: {e}"));
    assert_eq!(back, msg, "{file}: msgpack round trip changed the message");

    // ...and that uses named maps, so it converts losslessly to the JSON frame.
    let as_value: Value = rmp_serde::from_slice(bytes).expect("msgpack converts to a value");
    assert_eq!(
        as_value, *golden,
        "{file}: msgpack frame is not the golden as named maps"
    );
    msg
}

#[test]
fn every_golden_round_trips_in_its_direction() {
    let goldens = goldens();
    assert!(!goldens.is_empty(), "no golden files found");
    for (file, (wire, golden)) in &goldens {
        let node = NodeMessage::TYPES.contains(&wire.as_str());
        let hub = HubMessage::TYPES.contains(&wire.as_str());
        match (node, hub) {
            (true, false) => {
                let msg =
                    check_roundtrip::<NodeMessage>(file, wire, golden, NodeMessage::type_name);
                msg.validate(&Limits::default())
                    .unwrap_or_else(|e| panic!("{file}: golden fails validation: {e}"));
                // The other direction must not accept it.
                let err = codec::decode_text::<HubMessage>(&golden.to_string())
                    .expect_err("node frame must not decode as a hub frame");
                assert_eq!(err.code(), "unknown_type", "{file}");
            }
            (false, true) => {
                check_roundtrip::<HubMessage>(file, wire, golden, HubMessage::type_name);
                let err = codec::decode_text::<NodeMessage>(&golden.to_string())
                    .expect_err("hub frame must not decode as a node frame");
                assert_eq!(err.code(), "unknown_type", "{file}");
            }
            (true, true) => panic!("{file}: `{wire}` is a type of both directions"),
            (false, false) => panic!("{file}: `{wire}` is not a message type of either direction"),
        }
    }
}

#[test]
fn every_message_type_has_a_golden() {
    let covered: Vec<String> = goldens().into_values().map(|(wire, _)| wire).collect();
    let missing: Vec<&str> = NodeMessage::TYPES
        .iter()
        .chain(HubMessage::TYPES)
        .copied()
        .filter(|t| !covered.iter().any(|c| c == t))
        .collect();
    assert!(
        missing.is_empty(),
        "message types without tests/golden/<type>.json: {missing:?}"
    );
}

#[test]
fn no_type_name_is_shared_between_directions() {
    // Goldens sit in one flat folder, keyed by type: a shared name would be ambiguous.
    for t in NodeMessage::TYPES {
        assert!(
            !HubMessage::TYPES.contains(t),
            "`{t}` is in both directions"
        );
    }
}

#[test]
fn node_register_has_both_forms() {
    let goldens = goldens();
    let decode = |file: &str| -> apex_protocol::NodeRegister {
        let (_, v) = goldens
            .get(file)
            .unwrap_or_else(|| panic!("{file} missing"));
        match codec::decode_text::<NodeMessage>(&v.to_string()).expect("decodes") {
            NodeMessage::NodeRegister(r) => r,
            other => panic!("{file}: decoded as {}", other.type_name()),
        }
    };

    // Third-party form: bare tool names, limit in config.tasks.maxConcurrent.
    let third = decode("node_register.json");
    assert!(
        third
            .tools
            .iter()
            .all(|t| matches!(t, apex_protocol::ToolSpec::Name(_)))
    );
    assert_eq!(third.concurrency_limit(), Some(2));
    assert_eq!(third.tool_names(), ["echo", "wait"]);
    assert_eq!(third.encoding, None);
    assert_eq!(third.max_concurrent_tasks, None);

    // apex form: described tools (plus a bare one), top-level limit, encoding and inflight.
    let apex = decode("node_register.apex.json");
    let described: Vec<&str> = apex
        .tools
        .iter()
        .filter_map(|t| match t {
            apex_protocol::ToolSpec::Described(d) => Some(d.name.as_str()),
            apex_protocol::ToolSpec::Name(_) => None,
        })
        .collect();
    assert_eq!(described, ["echo", "wait"]);
    assert_eq!(apex.concurrency_limit(), Some(4));
    assert_eq!(apex.tool_names(), ["echo", "wait", "shell"]);
    assert_eq!(apex.encoding, Some(Encoding::Msgpack));
    assert_eq!(apex.inflight.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        apex.protocol_version.as_deref(),
        Some(apex_protocol::PROTOCOL_VERSION)
    );
    // Hosted models, as bare ids or objects with `id`.
    let models: Vec<&str> = apex.models.iter().map(|m| m.id()).collect();
    assert_eq!(models, ["llama3.2:1b", "qwen2.5:7b"]);
    assert!(third.models.is_empty());
}

#[test]
fn task_stream_is_fenced_data_and_needs_an_object_chunk() {
    let ok: NodeMessage = codec::decode_text(
        r#"{"type":"task_stream","data":{"taskId":"t1","attempt":3,"seq":7,
            "chunk":{"choices":[{"delta":{"content":"hi"}}]}}}"#,
    )
    .expect("decodes");
    let NodeMessage::TaskStream(s) = &ok else {
        panic!("not a task_stream");
    };
    assert_eq!((s.attempt, s.seq), (Some(3), 7));
    assert_eq!(s.chunk["choices"][0]["delta"]["content"], "hi");
    ok.validate(&Limits::default()).expect("valid");

    let not_object: NodeMessage =
        codec::decode_text(r#"{"type":"task_stream","data":{"taskId":"t1","seq":0,"chunk":"hi"}}"#)
            .expect("decodes");
    let err = not_object
        .validate(&Limits::default())
        .expect_err("a string chunk is refused");
    assert!(err.reason.contains("chunk"), "{err}");

    let missing_seq = codec::decode_text::<NodeMessage>(
        r#"{"type":"task_stream","data":{"taskId":"t1","chunk":{}}}"#,
    )
    .expect_err("seq is required");
    assert_eq!(missing_seq.code(), "invalid_payload");
}

#[test]
fn top_level_limit_wins_over_config() {
    let reg: NodeMessage = codec::decode_text(
        r#"{"type":"node_register","data":{"name":"n","maxConcurrentTasks":8,
            "config":{"tasks":{"maxConcurrent":2}}}}"#,
    )
    .expect("decodes");
    let NodeMessage::NodeRegister(reg) = reg else {
        panic!("not a node_register");
    };
    assert_eq!(reg.concurrency_limit(), Some(8));
    assert_eq!(reg.node_id, None);
}

#[test]
fn optional_fields_are_absent_not_null() {
    // A minimal native task_assign, as a third-party hub sends it: no timeout, attempt, ...
    let assign = HubMessage::from(apex_protocol::TaskAssign {
        task_id: "t1".into(),
        node_id: "n1".into(),
        tool_name: "echo".into(),
        capability: None,
        tool_args: serde_json::json!({}),
        timeout: None,
        priority: None,
        attempt: None,
        metadata: None,
    });
    let Frame::Text(text) = codec::encode(&assign, Encoding::Json).expect("encodes") else {
        panic!("json is text");
    };
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"type":"task_assign","data":{
            "taskId":"t1","nodeId":"n1","toolName":"echo","toolArgs":{}}})
    );
}

#[test]
fn envelope_tolerates_extra_fields_and_any_key_order() {
    let m: NodeMessage =
        codec::decode_text(r#"{"data":{"nodeId":"n1","x":2},"extra":1,"type":"heartbeat"}"#)
            .expect("extra fields and data-before-type are fine");
    assert_eq!(
        m,
        NodeMessage::from(apex_protocol::Heartbeat {
            node_id: "n1".into(),
            status: None,
            stats: None,
        })
    );
}

#[test]
fn text_frames_decode_even_when_msgpack_was_negotiated() {
    // Decoding is chosen by frame kind, never by the connection's encoding: the same message
    // arrives intact as text or binary.
    let msg = HubMessage::from(apex_protocol::CancelTool {
        request_id: "t1.2".into(),
    });
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let frame = codec::encode(&msg, enc).expect("encodes");
        assert_eq!(codec::decode::<HubMessage>(&frame).expect("decodes"), msg);
    }
}
