//! OpenTelemetry end to end: a real hub and node with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at
//! an OTLP/HTTP receiver in this test (it accepts `POST /v1/traces` with JSON bodies). A task
//! submitted over HTTP yields spans from both services in one trace: the hub's request span,
//! its `task {tool}` span, and the node's `execute {tool}` span whose parent came in
//! `task_assign.metadata.traceparent`.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_tests::{Hub, HubOptions, Node, NodeOptions, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(60);

/// One exported span: (service.name, trace id, span id, parent span id, name).
#[derive(Debug, Clone)]
struct SpanRec {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
}

/// Starts an OTLP/HTTP JSON receiver on a free port; returns its base URL and what it got.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    // Request line and headers.
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path_ok = line.starts_with("POST /v1/traces ");
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if path_ok && let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        store.lock().unwrap().push(v);
                    }
                    let (status, reply) = if path_ok {
                        ("200 OK", "{}")
                    } else {
                        ("404 Not Found", "")
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

/// Every span in the received export requests.
fn spans(bodies: &[Value]) -> Vec<SpanRec> {
    let mut out = Vec::new();
    for b in bodies {
        for rs in b["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_owned();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let text = |k: &str| s[k].as_str().unwrap_or("").to_owned();
                    out.push(SpanRec {
                        service: service.clone(),
                        trace_id: text("traceId"),
                        span_id: text("spanId"),
                        parent: text("parentSpanId"),
                        name: text("name"),
                    });
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn hub_and_node_spans_share_the_trace_of_the_submitting_request() {
    let (url, got) = receiver().await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), url.clone()),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let hub = Hub::start(HubOptions {
        env: env.clone(),
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let node = Node::start(
        &hub,
        NodeOptions {
            env,
            ..NodeOptions::named("otel-node")
        },
    )
    .await
    .unwrap();

    let task = hub
        .api()
        .submit(&json!({"tool": "echo", "args": {"hello": "trace"}}))
        .await
        .unwrap();
    let done = hub.api().wait_terminal(&task.task_id, WAIT).await.unwrap();
    assert_eq!(done.status, "succeeded");

    // Wait for: the hub's POST /api/v1/tasks span, its task span, and the node's execute span,
    // all in one trace, the node's span a child of the request span.
    let found = wait_until("spans from hub and node in one trace", WAIT, || {
        let got = got.clone();
        async move {
            let all = spans(&got.lock().unwrap());
            let Some(req) = all
                .iter()
                .find(|s| s.service == "apex-hub" && s.name == "HTTP POST /api/v1/tasks")
            else {
                return Ok(None);
            };
            let task = all.iter().find(|s| {
                s.service == "apex-hub" && s.name == "task echo" && s.trace_id == req.trace_id
            });
            let exec = all.iter().find(|s| {
                s.service == "apex-node" && s.name == "execute echo" && s.trace_id == req.trace_id
            });
            Ok(match (task, exec) {
                (Some(t), Some(e)) => Some((req.clone(), t.clone(), e.clone())),
                _ => None,
            })
        }
    })
    .await;
    let (req, task_span, exec) = match found {
        Ok(f) => f,
        Err(e) => {
            let all = spans(&got.lock().unwrap());
            panic!(
                "{e}\nspans received: {all:#?}\nhub log:\n{}\nnode log:\n{}",
                hub.log_text(),
                node.log_text()
            );
        }
    };
    assert_eq!(req.trace_id.len(), 32, "hex trace id: {req:?}");
    assert_ne!(req.trace_id, "0".repeat(32));
    assert_eq!(
        task_span.parent, req.span_id,
        "the task span is the request's child"
    );
    assert_eq!(
        exec.parent, req.span_id,
        "the node's span continues the request"
    );
    assert_eq!(task_span.trace_id, exec.trace_id);
}

#[tokio::test]
async fn the_hub_flushes_buffered_spans_when_it_stops() {
    let (url, got) = receiver().await;
    let mut hub = Hub::start(HubOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), url),
            // Nothing is exported on schedule during the test: only the shutdown flush.
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()),
        ],
        ..HubOptions::default()
    })
    .await
    .unwrap();
    let (status, _) = hub
        .api()
        .submit_raw(&json!({"tool": "nobody-offers-this"}))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 201);
    assert!(
        spans(&got.lock().unwrap()).is_empty(),
        "exported before the flush"
    );
    hub.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the hub to exit", WAIT, || {
        let exited = hub.try_status().map(|s| s.is_some());
        async move { exited.map(|e| e.then_some(())) }
    })
    .await
    .unwrap();
    let all = spans(&got.lock().unwrap());
    assert!(
        all.iter()
            .any(|s| s.service == "apex-hub" && s.name == "HTTP POST /api/v1/tasks"),
        "no request span flushed at exit: {all:#?}"
    );
}
