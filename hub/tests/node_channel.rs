#![allow(clippy::unwrap_used)]
//! The node channel over real sockets: `apex_hub::run` on `127.0.0.1:0` in this process, raw
//! WebSocket clients speaking the wire protocol, and a minimal HTTP client for the task API.
//! No sleeps: every wait polls with a generous deadline.

use std::net::SocketAddr;
use std::time::Duration;

use apex_hub::config::Config;
use apex_protocol::codec;
use apex_protocol::{Encoding, Frame, HubMessage, NodeMessage, TaskResult};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const API_KEY: &str = "chan-api-key-1";
const NODE_KEY: &str = "chan-node-key-1";
/// Upper bound for anything the tests wait for; far above what any step needs.
const PATIENCE: Duration = Duration::from_secs(30);

struct TestHub {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

async fn start_hub(f: impl FnOnce(&mut Config)) -> TestHub {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config {
        listen: addr,
        api_keys: vec![API_KEY.to_owned()],
        node_keys: vec![NODE_KEY.to_owned()],
        data_dir: std::env::temp_dir().join("apex-hub-node-channel-tests"),
        // Many hubs run at once in this process: the embedded store would lock the dir.
        store: "memory".to_owned(),
        // Shutdown tests expect the drain at once, not after the load-balancer delay.
        shutdown_delay_ms: 0,
        ..Config::default()
    };
    f(&mut config);
    config.validate().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(apex_hub::run(config, listener, async move {
        let _ = rx.await;
    }));
    TestHub {
        addr,
        stop: Some(tx),
        served: Some(served),
    }
}

impl TestHub {
    /// One HTTP/1.1 request with the API key; returns the status and the JSON body.
    async fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        timeout(PATIENCE, s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    async fn submit(&self, body: Value) -> String {
        let (s, v) = self.http("POST", "/api/v1/tasks", Some(body)).await;
        assert_eq!(s, 201, "{v}");
        v["task_id"].as_str().unwrap().to_owned()
    }

    async fn task(&self, id: &str) -> Value {
        let (s, v) = self.http("GET", &format!("/api/v1/tasks/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    async fn node(&self, id: &str) -> (u16, Value) {
        self.http("GET", &format!("/v1/nodes/{id}"), None).await
    }

    /// Polls the node until `pred` holds.
    async fn wait_node(&self, id: &str, what: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (s, v) = self.node(id).await;
            if pred(s, &v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} never became {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a client read.
#[derive(Debug)]
enum In {
    Json(Value),
    Binary(Vec<u8>),
    Closed(Option<CloseFrame>),
}

struct Client {
    ws: Ws,
}

impl Client {
    async fn connect(hub: &TestHub) -> Client {
        let (ws, _) =
            connect_async(hub.url(&format!("/abp-distributed-server/VCP_Key={NODE_KEY}")))
                .await
                .unwrap();
        let mut c = Client { ws };
        let ack = c.recv_json().await;
        assert_eq!(
            ack["type"], "connection_ack",
            "the first frame is connection_ack"
        );
        c
    }

    /// The next data or close frame (pings and pongs skipped; reading answers pings).
    async fn recv(&mut self) -> In {
        loop {
            let m = timeout(PATIENCE, self.ws.next())
                .await
                .expect("no frame from the hub");
            match m {
                None | Some(Err(_)) => return In::Closed(None),
                Some(Ok(Message::Text(t))) => {
                    return In::Json(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(Message::Binary(b))) => return In::Binary(b.to_vec()),
                Some(Ok(Message::Close(f))) => return In::Closed(f),
                Some(Ok(_)) => {}
            }
        }
    }

    async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            In::Json(v) => v,
            other => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    /// Reads until a frame of this type arrives (others are skipped).
    async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv_json().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    async fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_owned())).await.unwrap();
    }

    async fn register(&mut self, id: &str, tools: &[&str]) -> Value {
        self.send_json(json!({"type": "node_register", "data": {
            "nodeId": id, "name": id, "type": "worker", "tools": tools,
            "maxConcurrentTasks": 4,
        }}))
        .await;
        let r = self.recv_type("node_registered").await;
        assert_eq!(r["data"]["success"], true, "{r}");
        assert_eq!(r["data"]["nodeId"], id);
        r
    }

    async fn result(&mut self, task_id: &str, attempt: u64, result: Value) -> Value {
        self.send_json(json!({"type": "task_result", "data": {
            "taskId": task_id, "attempt": attempt, "success": true, "result": result,
        }}))
        .await;
        self.recv_type("task_result_ack").await
    }
}

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_or_missing_node_keys_get_401_before_the_upgrade() {
    let hub = start_hub(|_| {}).await;
    for path in [
        "/abp-distributed-server/VCP_Key=wrong-key-1",
        "/distributed-server/ABP_Key=wrong-key-1",
        "/vcp-distributed-server/VCP_Key=",
        &format!("/distributed-server/VCP_Key={API_KEY}"),
    ] {
        let e = connect_async(hub.url(path)).await.unwrap_err();
        assert_eq!(http_status(e), 401, "{path}");
    }
    for auth in [
        None,
        Some("Bearer wrong-key-1".to_owned()),
        Some(NODE_KEY.to_owned()),
    ] {
        let mut req = hub
            .url("/distributed-server")
            .into_client_request()
            .unwrap();
        if let Some(a) = &auth {
            req.headers_mut()
                .insert("authorization", a.parse().unwrap());
        }
        let e = connect_async(req).await.unwrap_err();
        assert_eq!(http_status(e), 401, "{auth:?}");
    }
    let e = connect_async(hub.url("/distributed-server/garbage"))
        .await
        .unwrap_err();
    assert_eq!(http_status(e), 404);

    // Every accepted form.
    for path in [
        format!("/abp-distributed-server/VCP_Key={NODE_KEY}"),
        format!("/distributed-server/ABP_Key={NODE_KEY}"),
        format!("/vcp-distributed-server/VCP_Key={NODE_KEY}"),
    ] {
        let (mut ws, _) = connect_async(hub.url(&path)).await.unwrap();
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("no greeting on {path}");
        };
        assert!(t.as_str().contains("connection_ack"), "{t}");
    }
    let mut req = hub
        .url("/distributed-server")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {NODE_KEY}").parse().unwrap(),
    );
    let (mut ws, _) = connect_async(req).await.unwrap();
    let Some(Ok(Message::Text(t))) = ws.next().await else {
        panic!("no greeting");
    };
    let ack: Value = serde_json::from_str(t.as_str()).unwrap();
    assert_eq!(ack["type"], "connection_ack");
    assert!(ack["data"]["serverId"].as_str().is_some());
    assert!(ack["data"]["clientId"].as_str().is_some());
}

#[tokio::test]
async fn a_refused_node_key_is_named_in_the_401_and_a_404_never_echoes_a_key() {
    let hub = start_hub(|_| {}).await;
    // The API key (sent by `http` as a bearer token) is not a node key either.
    for (path, channel) in [
        (
            "/distributed-server/VCP_Key=wrong-key-2",
            "/distributed-server",
        ),
        (
            "/abp-distributed-server/ABP_Key=",
            "/abp-distributed-server",
        ),
        ("/vcp-distributed-server", "/vcp-distributed-server"),
    ] {
        let (status, v) = hub.http("GET", path, None).await;
        assert_eq!(status, 401, "{path}: {v}");
        let e = &v["error"];
        assert_eq!(e["type"], "authentication_error", "{v}");
        assert_eq!(e["code"], "invalid_node_key", "{v}");
        let m = e["message"].as_str().unwrap();
        assert!(m.starts_with("missing or wrong node key"), "{m}");
        assert!(m.contains(&format!("{channel}/VCP_Key=<node key>")), "{m}");
        assert!(m.contains("Authorization: Bearer <node key>"), "{m}");
        assert!(!m.contains("API key") && !m.contains("api key"), "{m}");
        assert!(!m.contains("wrong-key-2"), "{m}");
    }
    // A last segment that is not quite a key is 404, and the answer does not repeat it.
    for path in [
        "/distributed-server/vcp_key=secret-404",
        "/no-such-channel/VCP_Key=secret-404",
    ] {
        let (status, v) = hub.http("GET", path, None).await;
        assert_eq!(status, 404, "{path}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(!m.contains("secret-404"), "{m}");
        assert!(m.contains("_Key=<redacted>"), "{m}");
    }
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_usable() {
    let hub = start_hub(|_| {}).await;
    let mut c = Client::connect(&hub).await;
    let cases: [(&str, &str); 6] = [
        ("this is not json", "invalid_json"),
        ("{\"type\": \"node_register\", ", "invalid_json"),
        (r#"{"type": "no_such_type", "data": {}}"#, "unknown_type"),
        (
            r#"{"type": "node_register", "data": {"nodeId": 42}}"#,
            "invalid_payload",
        ),
        (
            r#"{"type": "task_result", "data": {"taskId": "", "success": true}}"#,
            "invalid_payload",
        ),
        ("[1, 2, 3]", "invalid_payload"),
    ];
    for (frame, code) in cases {
        c.send_text(frame).await;
        let e = c.recv_json().await;
        assert_eq!(e["type"], "error", "{frame} -> {e}");
        assert_eq!(e["data"]["code"], code, "{frame} -> {e}");
        assert!(e["data"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(Message::binary(vec![0xc1, 0x00])).await.unwrap();
    let e = c.recv_json().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["data"]["code"], "invalid_json");

    // A result before registering is refused but acknowledged.
    c.send_json(json!({"type": "task_result", "data": {"taskId": "t1", "success": true}}))
        .await;
    assert_eq!(c.recv_json().await["data"]["code"], "not_registered");
    let ack = c.recv_type("task_result_ack").await;
    assert_eq!(ack["data"]["success"], false);

    // Still usable.
    c.register("n1", &["echo"]).await;
    c.send_json(json!({"type": "heartbeat", "data": {"nodeId": "n1"}}))
        .await;
    let hb = c.recv_type("heartbeat_ack").await;
    assert_eq!(hb["data"]["success"], true);
    let (s, health) = hub.http("GET", "/health", None).await;
    assert_eq!(s, 200);
    assert!(health["node_channel"]["frames_rejected"].as_u64().unwrap() >= 8);
    assert_eq!(health["nodes"]["online"], 1);
}

#[tokio::test]
async fn an_oversized_message_closes_the_connection_with_1009() {
    let hub = start_hub(|c| c.max_frame_bytes = 4096).await;
    let mut c = Client::connect(&hub).await;
    c.register("big", &["echo"]).await;
    let t = hub.submit(json!({"tool": "echo"})).await;
    c.recv_type("task_assign").await;
    let huge = json!({"type": "log", "data": {"message": "x".repeat(10_000)}});
    c.send_json(huge).await;
    let code = loop {
        match c.recv().await {
            In::Closed(Some(f)) => break u16::from(f.code),
            In::Closed(None) => panic!("closed without a close frame"),
            _ => {}
        }
    };
    assert_eq!(code, 1009);
    hub.wait_node("big", "offline", |_, v| v["status"] == "offline")
        .await;
    let task = hub.task(&t).await;
    assert_eq!(task["status"], "queued", "its task went back to the queue");
}

#[tokio::test]
async fn msgpack_is_negotiated_at_registration() {
    let hub = start_hub(|_| {}).await;
    let mut c = Client::connect(&hub).await;
    c.send_json(json!({"type": "node_register", "data": {
        "nodeId": "mp", "name": "mp", "tools": ["echo"], "encoding": "msgpack",
    }}))
    .await;
    // node_registered itself is still JSON text.
    let r = c.recv_json().await;
    assert_eq!(r["type"], "node_registered");
    assert_eq!(r["data"]["hubInfo"]["encoding"], "msgpack");

    let id = hub
        .submit(json!({"tool": "echo", "args": {"text": "packed"}}))
        .await;
    let assign = match c.recv().await {
        In::Binary(b) => codec::decode_binary::<HubMessage>(&b).unwrap(),
        other => panic!("expected a MessagePack binary frame, got {other:?}"),
    };
    let HubMessage::TaskAssign(a) = assign else {
        panic!("expected task_assign, got {assign:?}");
    };
    assert_eq!(a.task_id, id);
    assert_eq!(a.tool_args, json!({"text": "packed"}));
    assert_eq!(a.attempt, Some(1));

    let msg = NodeMessage::from(TaskResult {
        task_id: id.clone(),
        node_id: Some("mp".into()),
        attempt: a.attempt,
        success: true,
        result: Some(json!({"echo": "packed"})),
        ..TaskResult::default()
    });
    let Frame::Binary(bytes) = codec::encode(&msg, Encoding::Msgpack).unwrap() else {
        panic!("msgpack encodes to binary");
    };
    c.ws.send(Message::binary(bytes)).await.unwrap();
    let ack = match c.recv().await {
        In::Binary(b) => codec::decode_binary::<HubMessage>(&b).unwrap(),
        other => panic!("expected a binary ack, got {other:?}"),
    };
    let HubMessage::TaskResultAck(ack) = ack else {
        panic!("expected task_result_ack, got {ack:?}");
    };
    assert!(ack.success);
    let task = hub.task(&id).await;
    assert_eq!(task["status"], "succeeded");
    assert_eq!(task["result"], json!({"echo": "packed"}));

    // A JSON text frame is still understood; the answer comes back as MessagePack.
    c.send_json(json!({"type": "heartbeat", "data": {"nodeId": "mp"}}))
        .await;
    match c.recv().await {
        In::Binary(b) => assert!(matches!(
            codec::decode_binary::<HubMessage>(&b).unwrap(),
            HubMessage::HeartbeatAck(h) if h.success
        )),
        other => panic!("expected a binary heartbeat_ack, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_that_stops_answering_is_declared_dead_and_its_task_moves() {
    let hub = start_hub(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut frozen = Client::connect(&hub).await;
    frozen.register("frozen", &["work"]).await;
    let id = hub.submit(json!({"tool": "work"})).await;
    let a = frozen.recv_type("task_assign").await;
    assert_eq!(a["data"]["attempt"], 1);
    let mut healthy = Client::connect(&hub).await;
    healthy.register("healthy", &["work"]).await;

    // `frozen` is never read again: it answers no ping. Reading `healthy` keeps it alive.
    let moved = healthy.recv_type("task_assign").await;
    assert_eq!(moved["data"]["taskId"], id.as_str());
    assert_eq!(moved["data"]["attempt"], 2);
    let (_, node) = hub.node("frozen").await;
    assert_eq!(node["status"], "offline");
    let task = hub.task(&id).await;
    assert_eq!(task["node_id"], "healthy");
    assert_eq!(task["attempt"], 2);

    let ack = healthy.result(&id, 2, json!("done")).await;
    assert_eq!(ack["data"]["success"], true);
    assert_eq!(hub.task(&id).await["status"], "succeeded");
    drop(frozen);
}

#[tokio::test]
async fn a_node_that_only_answers_pings_stays_online() {
    let hub = start_hub(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 600;
    })
    .await;
    let mut c = Client::connect(&hub).await;
    c.register("quiet", &["work"]).await;
    // Never send a heartbeat; just keep reading (tungstenite answers each ping). 25 pings at
    // 100 ms span four 600 ms timeouts.
    let mut pings = 0;
    while pings < 25 {
        let m = timeout(PATIENCE, c.ws.next())
            .await
            .expect("the hub keeps pinging")
            .expect("the connection stays open")
            .unwrap();
        match m {
            Message::Ping(_) => pings += 1,
            Message::Close(f) => panic!("closed by the hub: {f:?}"),
            _ => {}
        }
    }
    let (_, node) = hub.node("quiet").await;
    assert_eq!(node["status"], "online", "{node}");
    assert_eq!(node["last_heartbeat_at"], Value::Null);
    c.send_json(json!({"type": "heartbeat", "data": {"nodeId": "quiet"}}))
        .await;
    assert_eq!(c.recv_type("heartbeat_ack").await["data"]["success"], true);
}

#[tokio::test]
async fn closing_a_socket_migrates_its_tasks_at_once() {
    // Liveness would take ten minutes to notice: only the close can move the task in time.
    let hub = start_hub(|c| {
        c.heartbeat_interval_ms = 60_000;
        c.heartbeat_timeout_ms = 600_000;
    })
    .await;
    let mut a = Client::connect(&hub).await;
    a.register("a", &["work"]).await;
    let id = hub.submit(json!({"tool": "work"})).await;
    a.recv_type("task_assign").await;
    let mut b = Client::connect(&hub).await;
    b.register("b", &["work"]).await;

    a.ws.close(None).await.unwrap();
    let moved = b.recv_type("task_assign").await;
    assert_eq!(moved["data"]["taskId"], id.as_str());
    assert_eq!(moved["data"]["attempt"], 2);

    // An abrupt drop (no close frame) works the same way.
    let mut c = Client::connect(&hub).await;
    c.register("c", &["work"]).await;
    drop(b);
    let moved = c.recv_type("task_assign").await;
    assert_eq!(moved["data"]["attempt"], 3);
    let ack = c.result(&id, 3, json!("finally")).await;
    assert_eq!(ack["data"]["success"], true);
    let task = hub.task(&id).await;
    assert_eq!(task["status"], "succeeded");
    assert_eq!(task["node_id"], "c");
}

#[tokio::test]
async fn re_registering_on_a_new_connection_replaces_the_old_one() {
    let hub = start_hub(|_| {}).await;
    let mut old = Client::connect(&hub).await;
    old.register("n", &["work"]).await;
    let id = hub.submit(json!({"tool": "work"})).await;
    old.recv_type("task_assign").await;

    let mut new = Client::connect(&hub).await;
    // The old connection is alive (it answered the hub's pings while it was read): the id is
    // not taken from it.
    new.send_json(json!({"type": "node_register", "data": {
        "nodeId": "n", "name": "n", "type": "worker", "tools": ["work"],
        "maxConcurrentTasks": 4,
    }}))
    .await;
    let refused = new.recv_type("node_registered").await;
    assert_eq!(refused["data"]["success"], false, "{refused}");
    // Nothing reads the old connection now, so its pings go unanswered: once the hub declares
    // it dead, the waiting connection takes the id over.
    let taken = new.recv_type("node_registered").await;
    assert_eq!(taken["data"]["success"], true, "{taken}");
    assert_eq!(taken["data"]["nodeId"], "n");
    // The hub closes the replaced connection; that must not unbind the node.
    loop {
        match old.recv().await {
            In::Closed(_) => break,
            _ => continue,
        }
    }
    drop(old);
    let (_, node) = hub.node("n").await;
    assert_eq!(node["status"], "online");
    let task = hub.task(&id).await;
    assert_eq!(task["status"], "assigned");
    assert_eq!(task["attempt"], 1);
    let ack = new.result(&id, 1, json!("ok")).await;
    assert_eq!(ack["data"]["success"], true);
    // Still online after all that.
    new.send_json(json!({"type": "heartbeat", "data": {"nodeId": "n"}}))
        .await;
    assert_eq!(
        new.recv_type("heartbeat_ack").await["data"]["status"],
        "online"
    );
}

#[tokio::test]
async fn a_vcp_node_runs_tools_and_its_secrets_are_not_exposed() {
    let hub = start_hub(|_| {}).await;
    let (ws, _) = connect_async(hub.url(&format!("/vcp-distributed-server/VCP_Key={NODE_KEY}")))
        .await
        .unwrap();
    let mut c = Client { ws };
    assert_eq!(c.recv_json().await["type"], "connection_ack");
    c.send_json(json!({"type": "register_tools", "data": {
        "serverName": "desk",
        "tools": [{
            "name": "Calc",
            "displayName": "Calculator",
            "basePath": "/home/someone/plugins/Calc",
            "pluginSpecificEnvConfig": {"API_KEY": "super-secret-value"},
        }],
    }}))
    .await;
    let node = hub
        .wait_node("vcp-desk", "registered", |s, _| s == 200)
        .await;
    assert_eq!(node["dialect"], "vcp");
    assert_eq!(node["tools"], json!(["Calc"]));
    let text = node.to_string();
    assert!(!text.contains("super-secret-value"), "{text}");
    assert!(!text.contains("/home/someone"), "{text}");

    let id = hub
        .submit(json!({"tool": "Calc", "args": {"expr": "1/0"}}))
        .await;
    let exec = c.recv_type("execute_tool").await;
    assert_eq!(exec["data"]["toolName"], "Calc");
    assert_eq!(exec["data"]["toolArgs"], json!({"expr": "1/0"}));
    let rid = exec["data"]["requestId"].as_str().unwrap().to_owned();
    assert_eq!(rid, format!("{id}.1"));
    c.send_json(json!({"type": "tool_result", "data": {
        "requestId": rid, "status": "error", "error": "division by zero",
    }}))
    .await;
    let deadline = Instant::now() + PATIENCE;
    let task = loop {
        let t = hub.task(&id).await;
        if t["status"] != "assigned" {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the tool_result was never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"]["message"], "division by zero");
}

#[tokio::test]
async fn shutdown_closes_node_connections_and_event_streams_and_returns() {
    let mut hub = start_hub(|_| {}).await;
    let mut node = Client::connect(&hub).await;
    node.register("n", &["work"]).await;
    let id = hub.submit(json!({"tool": "never-offered"})).await;
    // An event stream of a task that will not end by itself.
    let mut sse = TcpStream::connect(hub.addr).await.unwrap();
    let req = format!(
        "GET /api/v1/tasks/{id}/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Connection: close\r\n\r\n",
        hub.addr
    );
    sse.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    sse.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = sse.read_to_end(&mut rest).await;
        String::from_utf8_lossy(&rest).into_owned()
    });

    // A long poll that would wait a minute.
    let mut poll = TcpStream::connect(hub.addr).await.unwrap();
    let req = format!(
        "GET /api/v1/tasks/{id}?wait_ms=60000 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Connection: close\r\n\r\n",
        hub.addr
    );
    poll.write_all(req.as_bytes()).await.unwrap();
    let poller = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = poll.read_to_end(&mut all).await;
        String::from_utf8_lossy(&all).into_owned()
    });

    hub.stop.take().unwrap().send(()).unwrap();
    let answer = timeout(PATIENCE, poller)
        .await
        .expect("a long poll is answered at shutdown, not after its wait")
        .unwrap();
    // Either answered with the task as it stands, or (if shutdown won the race with reading
    // the request) closed unanswered: never held until its wait ran out.
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"status\":\"queued\""), "{answer}");
    }
    let code = loop {
        match node.recv().await {
            In::Closed(Some(f)) => break u16::from(f.code),
            In::Closed(None) => panic!("closed without a close frame"),
            _ => {}
        }
    };
    assert_eq!(code, 1001, "going away");
    let events = timeout(PATIENCE, reader)
        .await
        .expect("the event stream ends at shutdown")
        .unwrap();
    assert!(events.contains("task_created"), "{events}");
    let served = timeout(PATIENCE, hub.served.take().unwrap())
        .await
        .expect("run returns after shutdown")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
}

#[tokio::test]
async fn drain_and_unregister_over_the_channel() {
    let hub = start_hub(|_| {}).await;
    let mut a = Client::connect(&hub).await;
    a.register("a", &["work"]).await;
    let running = hub.submit(json!({"tool": "work"})).await;
    a.recv_type("task_assign").await;
    a.send_json(json!({"type": "node_drain", "data": {"nodeId": "a"}}))
        .await;
    a.send_json(json!({"type": "heartbeat", "data": {"nodeId": "a"}}))
        .await;
    assert_eq!(
        a.recv_type("heartbeat_ack").await["data"]["status"],
        "draining"
    );
    let (_, node) = hub.node("a").await;
    assert_eq!(node["status"], "draining");
    let waiting = hub.submit(json!({"tool": "work"})).await;
    assert_eq!(hub.task(&waiting).await["status"], "queued");
    // What it runs still finishes.
    assert_eq!(
        a.result(&running, 1, json!("ok")).await["data"]["success"],
        true
    );
    assert_eq!(hub.task(&waiting).await["status"], "queued");

    a.send_json(json!({"type": "node_unregister", "data": {"nodeId": "a", "reason": "bye"}}))
        .await;
    let u = a.recv_type("node_unregistered").await;
    assert_eq!(u["data"]["success"], true);
    let (_, node) = hub.node("a").await;
    assert_eq!(node["status"], "offline");
    let mut b = Client::connect(&hub).await;
    b.register("b", &["work"]).await;
    let got = b.recv_type("task_assign").await;
    assert_eq!(got["data"]["taskId"], waiting.as_str());
}
