//! Quick checks of envelope handling.
use apex_protocol::codec::{decode_text, encode};
use apex_protocol::*;

#[test]
fn envelope_tolerates_extra_fields_and_reports_errors() {
    let m: NodeMessage =
        decode_text(r#"{"type":"heartbeat","extra":1,"data":{"nodeId":"n1","x":2}}"#).unwrap();
    assert_eq!(m.type_name(), "heartbeat");
    let e = decode_text::<NodeMessage>(r#"{"type":"nope","data":{}}"#).unwrap_err();
    assert_eq!(e.code(), "unknown_type");
    let e = decode_text::<NodeMessage>(r#"{"type":"task_result","data":{"success":true}}"#)
        .unwrap_err();
    assert_eq!(e.code(), "invalid_payload");
    println!("{e}");
    let e = decode_text::<NodeMessage>("nope").unwrap_err();
    assert_eq!(e.code(), "invalid_json");
    let f = encode(
        &HubMessage::from(CancelTool {
            request_id: "r".into(),
        }),
        Encoding::Msgpack,
    )
    .unwrap();
    let back: HubMessage = codec::decode(&f).unwrap();
    assert_eq!(back.type_name(), "cancel_tool");
    let m: NodeMessage = decode_text(r#"{"data":{"nodeId":"n1"},"type":"heartbeat"}"#).unwrap();
    assert_eq!(m.type_name(), "heartbeat");
}
