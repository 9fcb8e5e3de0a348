#![allow(clippy::unwrap_used)]
//! The operator surface over real sockets: `apex_hub::run_with` on `127.0.0.1:0` in this
//! process, raw node-channel clients, `reqwest` for HTTP and SSE, tungstenite for the log
//! channel. No sleeps as assertions: every wait polls with a generous deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use apex_hub::RunOptions;
use apex_hub::config::{Cli, Config};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const API_KEY: &str = "ops-api-key-1";
const NODE_KEY: &str = "ops-node-key-1";
/// Upper bound for anything the tests wait for; far above what any step needs.
const PATIENCE: Duration = Duration::from_secs(30);

struct TestHub {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

async fn start_hub(f: impl FnOnce(&mut Config)) -> TestHub {
    start_hub_with(f, None).await
}

/// With `cli`, the config comes from it (as `main` does, with `--listen` set to the bound
/// address), so a reload reads the same sources.
async fn start_hub_with(f: impl FnOnce(&mut Config), mut cli: Option<Cli>) -> TestHub {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = match &mut cli {
        Some(cli) => {
            cli.listen = Some(addr);
            Config::load(cli).unwrap()
        }
        None => Config {
            listen: addr,
            api_keys: vec![API_KEY.to_owned()],
            node_keys: vec![NODE_KEY.to_owned()],
            data_dir: std::env::temp_dir().join("apex-hub-operator-tests"),
            // Tests run in parallel in one process: the embedded store would lock the dir.
            store: "memory".to_owned(),
            // Hubs stop when the test ends: no load-balancer delay.
            shutdown_delay_ms: 0,
            ..Config::default()
        },
    };
    f(&mut config);
    config.validate().unwrap();
    let metrics_listener = match config.metrics_listen {
        Some(m) => Some(TcpListener::bind(m).await.unwrap()),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let options = RunOptions {
        cli,
        metrics_listener,
        ..RunOptions::default()
    };
    tokio::spawn(apex_hub::run_with(
        config,
        listener,
        async move {
            let _ = rx.await;
        },
        options,
    ));
    TestHub {
        addr,
        metrics_addr,
        http: reqwest::Client::new(),
        _stop: tx,
    }
}

impl TestHub {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One request with the API key; the status and the JSON body (`Null` if not JSON).
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, self.url(path))
            .bearer_auth(API_KEY)
            .timeout(PATIENCE * 3);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Polls `path` until `pred` holds on (status, body).
    async fn wait_for(&self, path: &str, what: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (s, v) = self.call("GET", path, None).await;
            if pred(s, &v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never became {what}: {s} {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw node-channel client.
struct Node {
    ws: Ws,
}

impl Node {
    async fn connect(hub: &TestHub) -> Node {
        let (ws, _) = connect_async(hub.ws_url(&format!("/distributed-server/VCP_Key={NODE_KEY}")))
            .await
            .unwrap();
        let mut n = Node { ws };
        assert_eq!(
            n.recv_type("connection_ack").await["type"],
            "connection_ack"
        );
        n
    }

    async fn recv_json(&mut self) -> Option<Value> {
        loop {
            let m = timeout(PATIENCE, self.ws.next())
                .await
                .expect("no frame from the hub");
            match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(_)) => {}
            }
        }
    }

    async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self
                .recv_json()
                .await
                .unwrap_or_else(|| panic!("closed before {ty}"));
            if v["type"] == ty {
                return v;
            }
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn register(hub: &TestHub, id: &str, node_type: &str, tools: &[&str]) -> Node {
        let mut n = Node::connect(hub).await;
        n.send(json!({"type": "node_register", "data": {
            "nodeId": id, "name": id, "type": node_type, "tools": tools, "maxConcurrentTasks": 4,
        }}))
        .await;
        let r = n.recv_type("node_registered").await;
        assert_eq!(r["data"]["success"], true, "{r}");
        n
    }

    async fn result(&mut self, task_id: &str, attempt: u64, result: Value) {
        self.send(json!({"type": "task_result", "data": {
            "taskId": task_id, "attempt": attempt, "success": true, "result": result,
        }}))
        .await;
        self.recv_type("task_result_ack").await;
    }
}

/// Reads `data:` payloads of an SSE response.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(hub: &TestHub, path: &str) -> Sse {
        let resp = hub
            .http
            .get(hub.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if !data.is_empty() {
                    return serde_json::from_str(&data.join("\n")).unwrap();
                }
                continue;
            }
            let chunk = timeout(PATIENCE, self.resp.chunk())
                .await
                .expect("no SSE data")
                .unwrap()
                .expect("SSE stream ended");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Skips messages until one with this `event` arrives.
    async fn until(&mut self, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.next().await;
            if v["event"] == event && pred(&v) {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn nodes_list_filters_paginates_and_shows_one_node() {
    let hub = start_hub(|_| {}).await;
    let _a = Node::register(&hub, "w-a", "worker", &["echo", "sha256"]).await;
    let _b = Node::register(&hub, "w-b", "worker", &["echo"]).await;
    let _c = Node::register(&hub, "c-c", "companion", &["shell"]).await;

    let (s, v) = hub.call("GET", "/v1/nodes", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["meta"]["total"], 3);
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].clone())
        .collect();
    assert_eq!(ids, [json!("c-c"), json!("w-a"), json!("w-b")]);

    let (_, v) = hub
        .call("GET", "/v1/nodes?type=worker&tool=echo", None)
        .await;
    assert_eq!(v["meta"]["total"], 2);
    let (_, v) = hub.call("GET", "/v1/nodes?tool=sha256", None).await;
    assert_eq!(v["data"][0]["id"], "w-a");
    let (_, v) = hub.call("GET", "/v1/nodes?type=companion", None).await;
    assert_eq!(v["data"][0]["id"], "c-c");
    let (_, v) = hub.call("GET", "/v1/nodes?status=offline", None).await;
    assert_eq!(v["meta"]["total"], 0);

    let (_, v) = hub.call("GET", "/v1/nodes?limit=2&page=2", None).await;
    assert_eq!(
        v["meta"],
        json!({"total": 3, "page": 2, "limit": 2, "pages": 2})
    );
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "w-b");

    for bad in [
        "/v1/nodes?status=sleepy",
        "/v1/nodes?type=robot",
        "/v1/nodes?limit=0",
    ] {
        let (s, v) = hub.call("GET", bad, None).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"]["param"].is_string(), "{v}");
    }

    // The admin path answers the same.
    let (s, v) = hub.call("GET", "/api/admin/nodes/w-a", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["tools"], json!(["echo", "sha256"]));
    assert_eq!(v["status"], "online");
    let (s, v) = hub.call("GET", "/v1/nodes/nope", None).await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn drain_undrain_dispatch_to_a_node_and_its_task_list() {
    let hub = start_hub(|_| {}).await;
    let mut a = Node::register(&hub, "n-a", "worker", &["echo"]).await;
    let _b = Node::register(&hub, "n-b", "worker", &["echo"]).await;

    // Drained: no new work, and dispatching to it is refused.
    let (s, v) = hub.call("POST", "/v1/nodes/n-a/drain", None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("draining")), "{v}");
    let (s, v) = hub
        .call(
            "POST",
            "/v1/nodes/n-a/tasks",
            Some(json!({"tool": "echo", "args": {}})),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = hub.call("POST", "/api/admin/nodes/n-a/undrain", None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("online")), "{v}");

    // Dispatch to n-a and wait for the result in the same request.
    let h = hub.clone_for_task();
    let waiting = tokio::spawn(async move {
        h.call(
            "POST",
            "/v1/nodes/n-a/tasks",
            Some(json!({"tool": "echo", "args": {"x": 1}, "waitForResult": true})),
        )
        .await
    });
    let assign = a.recv_type("task_assign").await;
    let task_id = assign["data"]["taskId"].as_str().unwrap().to_owned();
    assert_eq!(assign["data"]["nodeId"], "n-a");
    a.result(&task_id, 1, json!({"echoed": 1})).await;
    let (s, v) = waiting.await.unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"echoed": 1}));
    assert_eq!(v["node_id"], "n-a");

    // Without waitForResult the answer is immediate.
    let (s, v) = hub
        .call("POST", "/v1/nodes/n-a/tasks", Some(json!({"tool": "echo"})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(
        ["queued", "assigned"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );

    let (s, v) = hub
        .call("GET", "/v1/nodes/n-a/tasks?status=succeeded", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["meta"]["total"], 1);
    assert_eq!(v["data"][0]["task_id"], task_id.as_str());
    let (_, v) = hub.call("GET", "/v1/nodes/n-b/tasks", None).await;
    assert_eq!(v["meta"]["total"], 0);
    let (s, _) = hub
        .call("POST", "/v1/nodes/n-a/tasks", Some(json!({"tool": "nope"})))
        .await;
    assert_eq!(s, 400);
    let (s, _) = hub
        .call(
            "POST",
            "/v1/nodes/ghost/tasks",
            Some(json!({"tool": "echo"})),
        )
        .await;
    assert_eq!(s, 404);
}

impl TestHub {
    /// A second handle on the same hub (for a request running in another task).
    fn clone_for_task(&self) -> TestHub {
        let (tx, _rx) = oneshot::channel();
        TestHub {
            addr: self.addr,
            metrics_addr: self.metrics_addr,
            http: self.http.clone(),
            _stop: tx,
        }
    }
}

#[tokio::test]
async fn deleting_a_node_disconnects_it_and_its_tasks_migrate() {
    let hub = start_hub(|_| {}).await;
    let mut a = Node::register(&hub, "d-a", "worker", &["echo"]).await;
    let (s, v) = hub
        .call("POST", "/api/v1/tasks", Some(json!({"tool": "echo"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let task_id = v["task_id"].as_str().unwrap().to_owned();
    let assign = a.recv_type("task_assign").await;
    assert_eq!(assign["data"]["taskId"], task_id.as_str());
    let mut b = Node::register(&hub, "d-b", "worker", &["echo"]).await;

    let (s, v) = hub.call("DELETE", "/v1/nodes/d-a", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["removed"], true);
    // d-a's socket is closed by the hub.
    while a.recv_json().await.is_some() {}
    // Its task runs on d-b, attempt 2.
    let assign = b.recv_type("task_assign").await;
    assert_eq!(assign["data"]["taskId"], task_id.as_str());
    assert_eq!(assign["data"]["attempt"], 2);
    b.result(&task_id, 2, json!("ok")).await;
    let v = hub
        .wait_for(&format!("/api/v1/tasks/{task_id}"), "succeeded", |_, v| {
            v["status"] == "succeeded"
        })
        .await;
    assert_eq!(v["node_id"], "d-b");
    let (s, _) = hub.call("GET", "/v1/nodes/d-a", None).await;
    assert_eq!(s, 404);
    let (s, _) = hub.call("DELETE", "/api/admin/nodes/d-a", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn offline_nodes_are_forgotten_after_the_retention() {
    let hub = start_hub(|c| c.offline_node_retention_ms = 300).await;
    let n = Node::register(&hub, "gone", "worker", &["echo"]).await;
    drop(n);
    hub.wait_for("/v1/nodes/gone", "forgotten", |s, _| s == 404)
        .await;
}

#[tokio::test]
async fn events_stream_node_and_task_changes() {
    let hub = start_hub(|_| {}).await;
    let mut sse = Sse::open(&hub, "/v1/events").await;
    let mut n = Node::register(&hub, "ev-1", "worker", &["echo"]).await;
    let v = sse.until("node_registered", |_| true).await;
    assert_eq!(v["type"], "node_event");
    assert_eq!(v["payload"]["node_id"], "ev-1");
    assert_eq!(v["payload"]["node"]["tools"], json!(["echo"]));
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));

    let (_, t) = hub
        .call("POST", "/api/v1/tasks", Some(json!({"tool": "echo"})))
        .await;
    let id = t["task_id"].as_str().unwrap().to_owned();
    let v = sse.until("task_created", |_| true).await;
    assert_eq!(v["payload"]["task_id"], id.as_str());
    let assign = n.recv_type("task_assign").await;
    assert_eq!(assign["data"]["taskId"], id.as_str());
    n.result(&id, 1, json!(1)).await;
    let v = sse.until("task_completed", |_| true).await;
    assert_eq!(v["payload"]["status"], "succeeded");

    hub.call("POST", "/v1/nodes/ev-1/drain", None).await;
    sse.until("node_drained", |_| true).await;
    drop(n);
    let v = sse.until("node_lost", |_| true).await;
    assert_eq!(v["payload"]["status"], "offline");
    hub.call("DELETE", "/v1/nodes/ev-1", None).await;
    sse.until("node_removed", |_| true).await;

    // Topic filter: only nodes.
    let mut only_nodes = Sse::open(&hub, "/v1/events?topics=nodes").await;
    let (_, _) = hub
        .call("POST", "/api/v1/tasks", Some(json!({"tool": "echo"})))
        .await;
    let _n2 = Node::register(&hub, "ev-2", "worker", &["x"]).await;
    let v = only_nodes.next().await;
    assert_eq!(
        v["event"], "node_registered",
        "task events were filtered out: {v}"
    );
    let (s, _) = hub.call("GET", "/v1/events?topics=bogus", None).await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn system_status_reports_machine_and_cluster_figures() {
    let hub = start_hub(|_| {}).await;
    let _n = Node::register(&hub, "st-1", "worker", &["echo"]).await;
    hub.call(
        "POST",
        "/api/v1/tasks",
        Some(json!({"tool": "nothing-offers-this"})),
    )
    .await;
    let v = hub
        .wait_for("/api/v1/system/status", "sampled", |s, v| {
            s == 200 && v["cpu_usage"].is_number()
        })
        .await;
    let cpu = v["cpu_usage"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "{v}");
    let mem = v["memory_usage"].as_f64().unwrap();
    assert!(mem > 0.0 && mem <= 100.0, "{v}");
    assert!(
        v.get("gpu_usage").is_some(),
        "gpu_usage is present (null without a GPU)"
    );
    assert!(v["active_sessions"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["nodes"]["online"], 1);
    assert_eq!(v["nodes"]["total"], 1);
    assert_eq!(v["tasks"]["queued"], 1);
    assert_eq!(v["queue_depth"], 1);
    assert!(v["dispatch_rate"].is_number());
    assert!(v["uptime_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

async fn log_client(hub: &TestHub, path: &str) -> Ws {
    let (ws, _) = connect_async(hub.ws_url(path)).await.unwrap();
    ws
}

async fn next_log(ws: &mut Ws) -> Value {
    loop {
        match timeout(PATIENCE, ws.next()).await.expect("no log entry") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("log channel closed: {other:?}"),
        }
    }
}

async fn log_until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = next_log(ws).await;
        if pred(&v) {
            return v;
        }
    }
}

#[tokio::test]
async fn log_channel_replays_filters_and_streams_tool_runs() {
    let hub = start_hub(|c| c.log_buffer_entries = 50).await;
    for path in ["/log/VCP_Key=wrong-key-9", "/VCPlog/ABP_Key=", "/ABPlog"] {
        match connect_async(hub.ws_url(path)).await.unwrap_err() {
            WsError::Http(r) => assert_eq!(r.status().as_u16(), 401, "{path}"),
            e => panic!("{path}: expected 401, got {e:?}"),
        }
    }
    match connect_async(hub.ws_url("/log/garbage")).await.unwrap_err() {
        WsError::Http(r) => assert_eq!(r.status().as_u16(), 404),
        e => panic!("expected 404, got {e:?}"),
    }
    // The 401 names what the log channel takes: a node key or an API key.
    for (path, channel) in [
        ("/VCPlog/VCP_Key=wrong-key-9", "/VCPlog"),
        ("/log/ABP_Key=", "/log"),
    ] {
        let (s, v) = hub.call("GET", path, None).await;
        assert_eq!(s, 401, "{path}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        assert_eq!(v["error"]["code"], "invalid_key", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("node key or an API key"), "{m}");
        assert!(m.contains(&format!("{channel}/VCP_Key=<key>")), "{m}");
        assert!(!m.contains("wrong-key-9"), "{m}");
    }

    let mut n = Node::register(&hub, "lg-1", "worker", &["echo"]).await;
    let _other = Node::register(&hub, "lg-2", "worker", &["echo"]).await;
    n.send(json!({"type": "log", "data": {"nodeId": "lg-1", "level": "warn", "message": "disk almost full"}}))
        .await;
    n.send(
        json!({"type": "log", "data": {"nodeId": "lg-1", "level": "debug", "message": "chatty"}}),
    )
    .await;

    // A client arriving later gets the buffered entries first: the node log with the node
    // key, filtered to warn and above for lg-1.
    let mut c = log_client(
        &hub,
        &format!("/VCPlog/VCP_Key={NODE_KEY}?node=lg-1&level=warn"),
    )
    .await;
    let v = log_until(&mut c, |v| v["type"] == "node_log").await;
    assert_eq!(v["data"]["message"], "disk almost full");
    assert_eq!(v["data"]["level"], "warn");
    assert_eq!(v["data"]["node_id"], "lg-1");

    // The API key works too (dashboards); everything for every node.
    let mut all = log_client(&hub, &format!("/ABPlog/ABP_Key={API_KEY}")).await;
    let v = log_until(&mut all, |v| {
        v["type"] == "hub_event" && v["data"]["node_id"] == "lg-2"
    })
    .await;
    assert_eq!(v["data"]["event"], "node_registered");

    // A tool run shows up live as vcp_log.
    let (_, t) = hub
        .call(
            "POST",
            "/v1/nodes/lg-1/tasks",
            Some(json!({"tool": "echo"})),
        )
        .await;
    let id = t["task_id"].as_str().unwrap().to_owned();
    let a = n.recv_type("task_assign").await;
    assert_eq!(a["data"]["taskId"], id.as_str());
    n.send(json!({"type": "task_result", "data": {
        "taskId": id, "attempt": 1, "success": false,
        "error": {"code": "task_execution_failed", "message": "tool crashed"},
    }}))
    .await;
    let v = log_until(&mut all, |v| v["type"] == "vcp_log").await;
    assert_eq!(v["data"]["tool_name"], "echo");
    assert_eq!(v["data"]["status"], "error");
    assert!(
        v["data"]["content"]
            .as_str()
            .unwrap()
            .contains("tool crashed"),
        "{v}"
    );
    assert_eq!(v["data"]["task_id"], id.as_str());
    // The filtered client (warn, lg-1) sees the failed run too, and never lg-2's entries.
    let v = log_until(&mut c, |v| v["type"] == "vcp_log").await;
    assert_eq!(v["data"]["node_id"], "lg-1");

    // Replay limit.
    let mut none = log_client(&hub, &format!("/log/VCP_Key={NODE_KEY}?replay=0")).await;
    n.send(json!({"type": "log", "data": {"nodeId": "lg-1", "level": "info", "message": "after"}}))
        .await;
    let v = next_log(&mut none).await;
    assert_eq!(
        v["data"]["message"], "after",
        "replay=0 sends nothing old: {v}"
    );
}

#[tokio::test]
async fn config_is_redacted_and_hot_keys_change_live() {
    let hub = start_hub(|c| {
        c.heartbeat_interval_ms = 10_000;
        c.heartbeat_timeout_ms = 60_000;
    })
    .await;
    let (s, v) = hub.call("GET", "/v1/config", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["config"]["api_keys"], json!(["<redacted>"]));
    assert!(!v.to_string().contains(API_KEY) && !v.to_string().contains(NODE_KEY));
    assert!(
        v["hot_reloadable"]
            .as_array()
            .unwrap()
            .contains(&json!("log_level"))
    );

    // Fixed and unknown keys are refused by name, nothing changes.
    let (s, v) = hub
        .call(
            "PUT",
            "/v1/config",
            Some(json!({"listen": "127.0.0.1:1", "log_level": "debug"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "listen");
    let (s, v) = hub
        .call("PUT", "/api/admin/config", Some(json!({"bogus_key": 1})))
        .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("bogus_key")),
        "{v}"
    );
    let (s, v) = hub
        .call(
            "PUT",
            "/v1/config",
            Some(json!({"heartbeat_timeout_ms": 5})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("heartbeat_timeout_ms")),
        "{v}"
    );
    let (_, v) = hub.call("GET", "/v1/config", None).await;
    assert_eq!(v["config"]["log_level"], "info");

    // A silent node survives under the 60 s timeout...
    let mut silent = Node::register(&hub, "quiet", "worker", &["echo"]).await;
    // ...until the timeout is lowered live: the open session picks it up.
    let (s, v) = hub
        .call(
            "PUT",
            "/v1/config",
            Some(json!({"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 400})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["changed"],
        json!(["heartbeat_interval_ms", "heartbeat_timeout_ms"])
    );
    // The raw client does not read, so it never answers the pings.
    hub.wait_for("/v1/nodes/quiet", "offline", |_, v| {
        v["status"] == "offline"
    })
    .await;
    let _ = silent.ws.close(None).await;
    // Nodes registering now are told the new settings.
    let mut n = Node::connect(&hub).await;
    n.send(json!({"type": "node_register", "data": {"nodeId": "told", "tools": ["echo"]}}))
        .await;
    let r = n.recv_type("node_registered").await;
    assert_eq!(r["data"]["hubInfo"]["heartbeatIntervalMs"], 100, "{r}");
    assert_eq!(r["data"]["hubInfo"]["heartbeatTimeoutMs"], 400, "{r}");

    // The GET body, edited, can be sent back whole.
    let (_, mut body) = hub.call("GET", "/v1/config", None).await;
    body["config"]["log_level"] = json!("apex_hub=debug,info");
    let (s, v) = hub.call("PUT", "/v1/config", Some(body)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["changed"], json!(["log_level"]));

    // Started without --config: nothing to reload.
    let (s, v) = hub.call("POST", "/v1/config/reload", None).await;
    assert_eq!(s, 409, "{v}");
}

#[tokio::test]
async fn reload_rereads_the_file_the_hub_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("hub.toml");
    let keys = format!(
        "api_keys = [\"{API_KEY}\"]\nnode_keys = [\"{NODE_KEY}\"]\nstore = \"memory\"\ndata_dir = \"{}\"\n",
        dir.path().display()
    );
    std::fs::write(&file, format!("{keys}log_level = \"info\"\n")).unwrap();
    let cli = Cli {
        config: Some(file.clone()),
        ..Cli::default()
    };
    let hub = start_hub_with(|_| {}, Some(cli)).await;
    std::fs::write(
        &file,
        format!("{keys}log_level = \"warn\"\noffline_node_retention_ms = 5000\n"),
    )
    .unwrap();
    let (s, v) = hub.call("POST", "/v1/config/reload", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["changed"],
        json!(["log_level", "offline_node_retention_ms"])
    );
    assert_eq!(v["config"]["offline_node_retention_ms"], 5000);

    // A fixed key changed in the file: refused by name, nothing applied.
    std::fs::write(
        &file,
        format!("{keys}log_level = \"error\"\nmax_batch_tasks = 7\n"),
    )
    .unwrap();
    let (s, v) = hub.call("POST", "/api/admin/config/reload", None).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("max_batch_tasks")),
        "{v}"
    );
    let (_, v) = hub.call("GET", "/v1/config", None).await;
    assert_eq!(v["config"]["log_level"], "warn");
}

/// Runs `promtool check metrics` on `text`; fails clearly when promtool is missing.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): install Debian's `prometheus` package \
                 (scripts/test.sh does this)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_carry_no_ids() {
    let hub = start_hub(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let mut n = Node::register(&hub, "metric-node-7", "worker", &["echo"]).await;
    let (_, t) = hub
        .call("POST", "/api/v1/tasks", Some(json!({"tool": "echo"})))
        .await;
    let id = t["task_id"].as_str().unwrap().to_owned();
    n.recv_type("task_assign").await;
    n.result(&id, 1, json!(1)).await;
    hub.wait_for(&format!("/api/v1/tasks/{id}"), "succeeded", |_, v| {
        v["status"] == "succeeded"
    })
    .await;
    n.send(json!({"type": "bogus_frame", "data": {}})).await;
    // The LLM gateway increments these; declared here, they show up once used.
    let m = apex_hub::metrics::get();
    m.llm_requests
        .with_label_values(&["mock", "m1", "ok"])
        .inc();
    m.llm_tokens
        .with_label_values(&["mock", "m1", "completion"])
        .inc_by(12);
    m.llm_ttft.with_label_values(&["mock", "m1"]).observe(0.05);
    n.recv_type("error").await;

    let (s, _) = hub
        .http
        .get(hub.url("/metrics"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(s, 401, "/metrics on the main listener needs the API key");
    let (s, text) = hub.text("/metrics").await;
    assert_eq!(s, 200);
    for name in [
        "apex_nodes{status=\"online\"}",
        "apex_tasks{state=\"succeeded\"}",
        "apex_queue_depth",
        "apex_tool_nodes{tool=\"echo\"} 1",
        "apex_tasks_finished_total{outcome=\"succeeded\",tool=\"echo\"}",
        "apex_task_dispatch_latency_seconds_bucket",
        "apex_task_duration_seconds_bucket",
        "apex_task_migrations_total",
        "apex_websocket_connections{channel=\"node\"}",
        "apex_node_frames_in_total",
        "apex_node_frames_out_total",
        "apex_node_frames_rejected_total{code=\"unknown_type\"}",
        "apex_http_requests_total{method=\"GET\",route=\"/api/v1/tasks/{id}\",status=\"200\"}",
        "apex_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"401\"}",
        "apex_llm_requests_total{model=\"m1\",outcome=\"ok\",provider=\"mock\"} 1",
        "apex_llm_tokens_total{kind=\"completion\",model=\"m1\",provider=\"mock\"} 12",
        "apex_llm_time_to_first_token_seconds_bucket",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    assert!(!text.contains(&id), "a task id leaked into a label");
    assert!(
        !text.contains("metric-node-7"),
        "a node id leaked into a label"
    );
    promtool_check_metrics(&text);

    // The separate listener serves the same without a key.
    let m = hub.metrics_addr.unwrap();
    let resp = hub
        .http
        .get(format!("http://{m}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.contains("apex_queue_depth"));
    let resp = hub
        .http
        .get(format!("http://{m}/v1/nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "only /metrics is served there");
}

#[tokio::test]
async fn a_client_that_stops_reading_skips_events_and_never_blocks_the_hub() {
    let hub = start_hub(|c| {
        c.stream_buffer_events = 16;
        // The raw node never reads, so it never answers pings: keep it alive meanwhile.
        c.heartbeat_interval_ms = 10_000;
        c.heartbeat_timeout_ms = 600_000;
    })
    .await;
    // An SSE client and a log client that read nothing for now.
    let mut sse = Sse::open(&hub, "/v1/events?topics=tasks").await;
    let (mut log, _) = connect_async(hub.ws_url(&format!("/log/VCP_Key={NODE_KEY}?replay=0")))
        .await
        .unwrap();
    let mut n = Node::register(&hub, "chatty", "worker", &["echo"]).await;
    // Far more than the engine's 8192-event buffer plus what the sockets hold: every submit
    // must still be answered (a blocked hub would hang here until the test's deadline).
    let batch: Vec<Value> = (0..1000)
        .map(|_| json!({"tool": "nobody-has-it"}))
        .collect();
    for _ in 0..60 {
        let (s, v) = hub
            .call(
                "POST",
                "/api/v1/tasks/batch",
                Some(json!({ "tasks": batch })),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let line = "x".repeat(1000);
    for i in 0..30_000 {
        n.send(json!({"type": "log", "data": {"nodeId": "chatty", "level": "info", "message": format!("{i} {line}")}}))
            .await;
    }
    // The hub still answers while both clients are stuck.
    let (s, _) = hub.call("GET", "/api/v1/system/status", None).await;
    assert_eq!(s, 200);

    // Reading now: each client is told how much it missed.
    let v = sse.until("events_dropped", |_| true).await;
    assert!(v["payload"]["skipped"].as_u64().unwrap() > 0, "{v}");
    let v = log_until(&mut log, |v| v["type"] == "log_dropped").await;
    assert!(v["data"]["skipped"].as_u64().unwrap() > 0, "{v}");
    let (_, text) = hub.text("/metrics").await;
    for stream in ["sse", "log"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "apex_stream_events_dropped_total{{stream=\"{stream}\"}}"
                ))
            })
            .unwrap();
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0.0, "{line}");
    }
}
