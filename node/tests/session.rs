//! The node's connection logic against a tiny in-test hub: registration fields, a task result
//! with the attempt echoed, cancellation, results re-sent after a reconnect, MessagePack, and
//! the drain on shutdown.
#![allow(clippy::unwrap_used, clippy::result_large_err, missing_docs)]

use std::time::Duration;

use apex_node::config::RawConfig;
use apex_protocol::codec::{self, Encoding, Frame};
use apex_protocol::{
    ConnectionAck, HubInfo, HubMessage, NodeMessage, NodeRegister, NodeRegistered,
    NodeUnregistered, TaskAssign, TaskCancel, TaskResult, TaskResultAck, ToolSpec,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Upper bound for any single wait, so a broken node fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(15);

/// One accepted node connection, seen from the hub's side.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    encoding: Encoding,
    path: String,
    authorization: Option<String>,
}

impl Conn {
    async fn accept(listener: &TcpListener) -> Conn {
        let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("node did not connect")
            .unwrap();
        let mut seen = None;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            seen = Some((req.uri().path().to_owned(), auth));
            Ok(resp)
        })
        .await
        .unwrap();
        let (path, authorization) = seen.unwrap();
        Conn {
            ws,
            encoding: Encoding::Json,
            path,
            authorization,
        }
    }

    async fn send(&mut self, msg: impl Into<HubMessage>) {
        let frame = codec::encode(&msg.into(), self.encoding).unwrap();
        let message = match frame {
            Frame::Text(t) => Message::Text(t.into()),
            Frame::Binary(b) => Message::Binary(b.into()),
        };
        self.ws.send(message).await.unwrap();
    }

    /// The next frame from the node: a decoded message and whether it came as binary, or
    /// `None` for a close frame (with its code).
    async fn next_frame(&mut self) -> Result<(NodeMessage, bool), Option<u16>> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("node sent nothing")
                .expect("connection ended")
                .unwrap();
            match message {
                Message::Text(t) => return Ok((codec::decode_text(t.as_str()).unwrap(), false)),
                Message::Binary(b) => return Ok((codec::decode_binary(&b).unwrap(), true)),
                Message::Close(f) => return Err(f.map(|f| u16::from(f.code))),
                _ => continue,
            }
        }
    }

    async fn next(&mut self) -> NodeMessage {
        self.next_frame().await.expect("unexpected close").0
    }

    /// The next message that is not a heartbeat or a progress report (a task that runs past
    /// 50 ms reports that it started).
    async fn next_non_heartbeat(&mut self) -> NodeMessage {
        loop {
            match self.next().await {
                NodeMessage::Heartbeat(_) | NodeMessage::TaskProgress(_) => continue,
                m => return m,
            }
        }
    }

    async fn next_result(&mut self) -> TaskResult {
        match self.next_non_heartbeat().await {
            NodeMessage::TaskResult(r) => r,
            other => panic!("expected task_result, got {other:?}"),
        }
    }

    async fn register(&mut self) -> NodeRegister {
        self.send(ConnectionAck {
            server_id: "test-hub".into(),
            client_id: "c1".into(),
            message: "hello".into(),
        })
        .await;
        match self.next().await {
            NodeMessage::NodeRegister(r) => r,
            other => panic!("expected node_register, got {other:?}"),
        }
    }

    async fn registered(&mut self, node_id: &str, encoding: Encoding) {
        self.send(NodeRegistered {
            node_id: node_id.into(),
            success: true,
            message: "ok".into(),
            hub_info: Some(HubInfo {
                version: "test".into(),
                heartbeat_interval_ms: 500,
                heartbeat_timeout_ms: 3000,
                encoding,
                ..HubInfo::default()
            }),
        })
        .await;
        self.encoding = encoding;
    }

    async fn ack(&mut self, r: &TaskResult) {
        self.send(TaskResultAck {
            task_id: r.task_id.clone(),
            node_id: r.node_id.clone().unwrap_or_default(),
            success: true,
            message: None,
            timestamp: 0,
        })
        .await;
    }

    async fn assign(&mut self, id: &str, tool: &str, args: Value, attempt: u32) {
        self.send(TaskAssign {
            task_id: id.into(),
            node_id: String::new(),
            tool_name: tool.into(),
            capability: None,
            tool_args: args,
            timeout: Some(60_000),
            priority: None,
            attempt: Some(attempt),
            metadata: None,
        })
        .await;
    }

    /// Answers the unregister and expects a normal close.
    async fn goodbye(&mut self, node_id: &str) {
        match self.next_non_heartbeat().await {
            NodeMessage::NodeUnregister(u) => assert_eq!(u.node_id, node_id),
            other => panic!("expected node_unregister, got {other:?}"),
        }
        self.send(NodeUnregistered {
            node_id: node_id.into(),
            success: true,
            message: None,
        })
        .await;
        loop {
            match self.next_frame().await {
                Ok((NodeMessage::Heartbeat(_), _)) => continue,
                Ok((other, _)) => panic!("expected close, got {other:?}"),
                Err(code) => {
                    assert_eq!(code, Some(1000));
                    break;
                }
            }
        }
    }
}

fn error_code(r: &TaskResult) -> &str {
    r.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
}

fn start_node(
    raw: RawConfig,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), apex_node::Error>>,
) {
    let config = raw.validate().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(apex_node::run(config, async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

#[tokio::test]
async fn registers_runs_cancels_and_resends_after_reconnect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let (stop, node) = start_node(RawConfig {
        hub: vec![format!("ws://127.0.0.1:{port}")],
        key: Some("secret-key".into()),
        name: Some("test-node".into()),
        max_concurrent_tasks: Some(3),
        data_dir: Some(data.path().into()),
        ..RawConfig::default()
    });

    // Registration.
    let mut c1 = Conn::accept(&listener).await;
    assert_eq!(c1.path, "/distributed-server");
    assert_eq!(c1.authorization.as_deref(), Some("Bearer secret-key"));
    let reg = c1.register().await;
    let stored = std::fs::read_to_string(data.path().join("node-id")).unwrap();
    let first_id = reg.node_id.clone().unwrap();
    assert!(first_id.starts_with("node-"), "{first_id}");
    assert_eq!(stored.trim(), first_id);
    assert_eq!(reg.name, "test-node");
    assert_eq!(reg.node_type, apex_protocol::NodeType::Worker);
    assert_eq!(reg.max_concurrent_tasks, Some(3));
    assert_eq!(
        reg.protocol_version.as_deref(),
        Some(apex_protocol::PROTOCOL_VERSION)
    );
    assert!(reg.version.is_some());
    assert_eq!(reg.encoding, None);
    assert_eq!(reg.inflight, Some(vec![]));
    assert!(reg.stats.is_some());
    for tool in [
        "echo",
        "noop",
        "sleep",
        "http_fetch",
        "sha256",
        "system_info",
    ] {
        assert!(reg.capabilities.iter().any(|c| c == tool), "{tool}");
        let spec = reg.tools.iter().find(|t| t.name() == tool).unwrap();
        let ToolSpec::Described(d) = spec else {
            panic!("{tool} declared without a schema")
        };
        assert!(d.parameters.is_some() && d.description.is_some(), "{tool}");
    }
    assert!(!reg.capabilities.iter().any(|c| c == "shell"));

    // The node adopts the id the hub gives it, and heartbeats with real figures.
    let hub_id = "node-chosen-by-hub";
    c1.registered(hub_id, Encoding::Json).await;
    match c1.next().await {
        NodeMessage::Heartbeat(h) => {
            assert_eq!(h.node_id, hub_id);
            let stats = h.stats.unwrap();
            assert!(stats.cpu_usage.is_some() && stats.memory_usage.is_some());
        }
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(data.path().join("node-id"))
            .unwrap()
            .trim(),
        hub_id
    );

    // echo: result with the attempt echoed.
    c1.assign("t-echo", "echo", json!({"hello": "world"}), 2)
        .await;
    let r = c1.next_result().await;
    assert_eq!(r.task_id, "t-echo");
    assert!(r.success);
    assert_eq!(r.attempt, Some(2));
    assert_eq!(r.node_id.as_deref(), Some(hub_id));
    assert_eq!(r.result, Some(json!({"echoed": {"hello": "world"}})));
    c1.ack(&r).await;

    // Unknown tool and bad arguments.
    c1.assign("t-unknown", "teleport", json!({}), 1).await;
    let r = c1.next_result().await;
    assert_eq!(
        (r.task_id.as_str(), error_code(&r)),
        ("t-unknown", "capability_not_supported")
    );
    c1.ack(&r).await;
    c1.assign("t-bad", "sleep", json!({"ms": "long"}), 1).await;
    let r = c1.next_result().await;
    assert_eq!(
        (r.task_id.as_str(), error_code(&r)),
        ("t-bad", "invalid_arguments")
    );
    assert!(r.error.as_ref().unwrap().message.contains("invalid type"));
    c1.ack(&r).await;

    // task_cancel aborts a long sleep. This result is received but not acknowledged.
    c1.assign("t-sleep", "sleep", json!({"ms": 600_000}), 1)
        .await;
    c1.send(TaskCancel {
        task_id: "t-sleep".into(),
        attempt: Some(1),
        reason: "cancelled".into(),
    })
    .await;
    let cancelled = c1.next_result().await;
    assert_eq!(cancelled.task_id, "t-sleep");
    assert!(!cancelled.success);
    assert_eq!(error_code(&cancelled), "task_cancelled");
    assert_eq!(cancelled.attempt, Some(1));

    // A task whose result is produced while the connection is gone.
    c1.assign("t-late", "sleep", json!({"ms": 50}), 4).await;
    drop(c1);

    let mut c2 = Conn::accept(&listener).await;
    let reg = c2.register().await;
    assert_eq!(reg.node_id.as_deref(), Some(hub_id));
    let inflight = reg.inflight.unwrap();
    for id in ["t-late", "t-sleep"] {
        assert!(inflight.iter().any(|x| x == id), "{id} not in {inflight:?}");
    }
    c2.registered(hub_id, Encoding::Json).await;
    let mut late = None;
    let mut resent_cancel = None;
    while late.is_none() || resent_cancel.is_none() {
        let r = c2.next_result().await;
        c2.ack(&r).await;
        match r.task_id.as_str() {
            "t-late" => late = Some(r),
            "t-sleep" => resent_cancel = Some(r),
            other => panic!("unexpected result for {other}"),
        }
    }
    let late = late.unwrap();
    assert!(late.success);
    assert_eq!(late.attempt, Some(4));
    assert_eq!(late.result, Some(json!({"slept_ms": 50})));
    assert_eq!(error_code(&resent_cancel.unwrap()), "task_cancelled");

    // Shutdown with nothing running: drain, unregister, close 1000.
    stop.send(()).unwrap();
    match c2.next_non_heartbeat().await {
        NodeMessage::NodeDrain(d) => assert_eq!(d.node_id, hub_id),
        other => panic!("expected node_drain, got {other:?}"),
    }
    c2.goodbye(hub_id).await;
    tokio::time::timeout(WAIT, node)
        .await
        .expect("node did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn msgpack_fallback_hub_and_drain_with_timeout() {
    // The first hub refuses connections; the node moves on to the second.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let (stop, node) = start_node(RawConfig {
        hub: vec![
            format!("ws://127.0.0.1:{dead_port}"),
            format!("ws://127.0.0.1:{port}/custom-path"),
        ],
        key: Some("k".into()),
        data_dir: Some(data.path().into()),
        msgpack: Some(true),
        drain_timeout_ms: Some(200),
        ..RawConfig::default()
    });

    let mut c = Conn::accept(&listener).await;
    assert_eq!(c.path, "/custom-path");
    let reg = c.register().await;
    assert_eq!(reg.encoding, Some(Encoding::Msgpack));
    let id = reg.node_id.unwrap();
    c.registered(&id, Encoding::Msgpack).await;

    // Every frame after node_registered is MessagePack.
    let (first, binary) = c.next_frame().await.unwrap();
    assert!(matches!(first, NodeMessage::Heartbeat(_)));
    assert!(
        binary,
        "heartbeat after msgpack registration must be binary"
    );

    c.assign("t-long", "sleep", json!({"ms": 600_000}), 1).await;
    // Wait until the node reports the task as running.
    loop {
        let (m, binary) = c.next_frame().await.unwrap();
        assert!(binary);
        if let NodeMessage::Heartbeat(h) = m
            && h.stats.unwrap().active_tasks == 1
        {
            break;
        }
    }

    stop.send(()).unwrap();
    match c.next_non_heartbeat().await {
        NodeMessage::NodeDrain(d) => assert_eq!(d.node_id, id),
        other => panic!("expected node_drain, got {other:?}"),
    }
    // New work is refused while draining.
    c.assign("t-new", "echo", json!({}), 1).await;
    let refused = c.next_result().await;
    assert_eq!(
        (refused.task_id.as_str(), error_code(&refused)),
        ("t-new", "node_draining")
    );
    c.ack(&refused).await;
    // The running task is aborted at the drain timeout.
    let aborted = c.next_result().await;
    assert_eq!(
        (aborted.task_id.as_str(), error_code(&aborted)),
        ("t-long", "node_draining")
    );
    assert_eq!(aborted.attempt, Some(1));
    c.ack(&aborted).await;
    c.goodbye(&id).await;
    tokio::time::timeout(WAIT, node)
        .await
        .expect("node did not stop")
        .unwrap()
        .unwrap();
}
