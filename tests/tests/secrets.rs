//! Keys never reach the hub's logs: a hub at `--log-level debug` (every target, request spans
//! with their path) sees keys in paths of every kind (a real `apex-node` and a raw node with
//! the node key in the path, a wrong node key, the log channel with the API key, unknown
//! routes holding keys, `/ws?token=`), and its whole output holds none of them, only the
//! redacted form.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use apex_tests::process::strip_ansi;
use apex_tests::{Hub, HubOptions, Node, NodeOptions, RawNode, register_msg, wait_until};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_paths_never_reach_the_debug_log() -> Result<()> {
    let hub = Hub::start(HubOptions {
        extra_args: vec!["--log-level".into(), "debug".into()],
        ..HubOptions::default()
    })
    .await?;
    let node_key = hub.node_key().to_owned();
    let api_key = hub.api_key().to_owned();
    let wrong_key = format!("wrong-key-{}", uuid::Uuid::new_v4().simple());
    let host = hub.addr();

    // A real apex-node whose hub URL carries the node key in its path (it also sends the key
    // as a bearer header; the hub takes the path's).
    let mut node = Node::spawn_at(
        &format!("{}/distributed-server/VCP_Key={node_key}", hub.ws_base()),
        &node_key,
        &NodeOptions::named("secret-node"),
    )?;
    node.wait_online(&hub).await?;

    // A raw node with the key in the path, registered.
    let mut raw = RawNode::connect(&hub.node_url("abp-distributed-server"), &[]).await?;
    let ack = raw
        .register(register_msg(Some("raw-secret"), "raw-secret", &["echo"], 1))
        .await?;
    assert!(ack.success, "{}", ack.message);

    // Refused upgrades: a wrong node key, the API key on the node channel, a wrong key on
    // the log channel, the API key on the log channel (accepted: dashboards do this).
    for (path, want) in [
        (format!("/distributed-server/VCP_Key={wrong_key}"), 401),
        (format!("/vcp-distributed-server/ABP_Key={api_key}"), 401),
        (format!("/log/VCP_Key={wrong_key}"), 401),
        (format!("/VCPlog/VCP_Key={api_key}"), 101),
    ] {
        let status = RawNode::upgrade_status(&format!("ws://{host}{path}"), &[]).await?;
        assert_eq!(status, want, "upgrade on {path}");
    }

    // The client WebSocket with its credential in the query (browsers): accepted with the
    // API key, refused with a wrong one; neither is logged.
    for (key, want) in [(&api_key, 101), (&wrong_key, 401)] {
        let (status, body) = apex_tests::ClientWs::upgrade_status(&hub.url(), key, true).await?;
        assert_eq!(status, want, "/ws?token=: {body}");
        assert!(!body.to_string().contains(key.as_str()), "{body}");
    }

    // Unknown routes holding keys: 404, and the answer does not repeat the key.
    for path in [
        format!("/nothing-here/VCP_Key={node_key}"),
        format!("/nothing-here/VCP_Key={wrong_key}"),
        format!("/distributed-server/vcp_key={node_key}"),
    ] {
        let resp = hub
            .api()
            .http()
            .get(format!("{}{path}", hub.url()))
            .send()
            .await?;
        let (status, body) = apex_tests::api::json_of(resp).await?;
        assert_eq!(status, 404, "{path}: {body}");
        let text = body.to_string();
        for key in [&node_key, &wrong_key] {
            assert!(
                !text.contains(key.as_str()),
                "the 404 of {path} holds a key: {text}"
            );
        }
        assert!(text.contains("VCP_Key=<redacted>"), "{text}");
    }

    // The last request marks the end: once its span is in the log, so is everything before.
    let marker = format!("/end-of-secrets-test-{}", uuid::Uuid::new_v4().simple());
    hub.api()
        .http()
        .get(format!("{}{marker}", hub.url()))
        .send()
        .await?;
    wait_until("the hub to log the last request", WAIT, || {
        let seen = hub.log_text().contains(&marker);
        async move { Ok(seen.then_some(())) }
    })
    .await?;

    let log = strip_ansi(&hub.log_text());
    for (what, key) in [
        ("node key", &node_key),
        ("wrong node key", &wrong_key),
        ("API key", &api_key),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(key.as_str())).collect();
        assert!(
            lines.is_empty(),
            "the hub's debug log holds the {what} in {} lines, e.g.:\n{}",
            lines.len(),
            lines.iter().take(5).copied().collect::<Vec<_>>().join("\n")
        );
    }
    // The paths were logged, redacted: the test looks where the keys would be.
    for path in [
        "/distributed-server/VCP_Key=<redacted>",
        "/abp-distributed-server/VCP_Key=<redacted>",
        "/vcp-distributed-server/ABP_Key=<redacted>",
        "/log/VCP_Key=<redacted>",
        "/VCPlog/VCP_Key=<redacted>",
        "/nothing-here/VCP_Key=<redacted>",
    ] {
        assert!(
            log.contains(path),
            "the hub's debug log never mentions {path}"
        );
    }
    raw.close();
    Ok(())
}
