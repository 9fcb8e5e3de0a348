//! Gateway routing, fallback, interrupts and stream endings, with scripted backends.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::json;

use super::*;

/// What a scripted backend does on each call.
#[derive(Clone, Copy)]
enum Script {
    /// Answers `n` chunks "a".
    Ok(u32),
    /// Fails to start with this error kind.
    Fail(&'static str),
    /// One chunk, then an upstream error.
    BreakAfterOne,
    /// Never yields a chunk.
    Hang,
}

struct Scripted {
    name: String,
    model: String,
    script: Script,
    calls: AtomicU32,
}

impl Scripted {
    fn new(name: &str, model: &str, script: Script) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            model: model.into(),
            script,
            calls: AtomicU32::new(0),
        })
    }
}

impl Backend for Scripted {
    fn name(&self) -> &str {
        &self.name
    }
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: self.model.clone(),
            created: 1,
            owned_by: self.name.clone(),
        }]
    }
    fn serves(&self, model: &str) -> bool {
        model == self.model
    }
    fn first_token_timeout(&self) -> Duration {
        Duration::from_millis(200)
    }
    fn call<'a>(
        &'a self,
        _model: &'a str,
        _req: &'a ChatRequest,
        _ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let script = self.script;
        async move {
            let text = |t: &str| ChatChunk {
                text: t.into(),
                ..ChatChunk::default()
            };
            match script {
                Script::Ok(n) => {
                    let v: Vec<_> = (0..n).map(|_| Ok(text("a"))).collect();
                    Ok(futures::stream::iter(v).boxed())
                }
                Script::Fail("429") => Err(LlmError::RateLimited("x".into())),
                Script::Fail("500") => Err(LlmError::Upstream {
                    status: Some(500),
                    message: "x".into(),
                }),
                Script::Fail("400") => Err(LlmError::Upstream {
                    status: Some(400),
                    message: "bad".into(),
                }),
                Script::Fail(_) => Err(LlmError::Unavailable("refused".into())),
                Script::BreakAfterOne => Ok(futures::stream::iter(vec![
                    Ok(text("a")),
                    Err(LlmError::Upstream {
                        status: None,
                        message: "cut".into(),
                    }),
                ])
                .boxed()),
                Script::Hang => Ok(futures::stream::pending().boxed()),
            }
        }
        .boxed()
    }
}

fn gateway(backends: &[Arc<Scripted>], aliases: &[(&str, &[&str])]) -> Gateway {
    let mut cfg = LlmConfig::default();
    for (k, v) in aliases {
        cfg.aliases
            .insert((*k).into(), v.iter().map(|s| (*s).to_owned()).collect());
    }
    let mut g = Gateway::from_config(&cfg).unwrap();
    for b in backends {
        g = g.with_backend(b.clone());
    }
    g
}

fn req(model: &str) -> ChatRequest {
    ChatRequest::simple(model, vec![json!({"role": "user", "content": "hi"})], true)
}

async fn collect(s: ChatStream) -> (String, Option<LlmError>, bool) {
    let mut text = String::new();
    let mut err = None;
    let mut interrupted = false;
    let mut s = s;
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => {
                text.push_str(&c.text);
                interrupted |= c.interrupted;
            }
            Err(e) => err = Some(e),
        }
    }
    (text, err, interrupted)
}

#[tokio::test]
async fn falls_back_in_order_before_the_first_chunk_only() {
    let a = Scripted::new("a", "m", Script::Fail("429"));
    let b = Scripted::new("b", "m", Script::Fail("conn"));
    let c = Scripted::new("c", "m", Script::Hang);
    let d = Scripted::new("d", "m", Script::Ok(3));
    let g = gateway(&[a.clone(), b.clone(), c.clone(), d.clone()], &[]);
    let s = g
        .chat(req("m"), CallContext::new("r1", Caller::Http))
        .await
        .unwrap();
    assert_eq!(s.deployment(), "d/m");
    assert_eq!(collect(s).await.0, "aaa");
    for x in [&a, &b, &c, &d] {
        assert_eq!(x.calls.load(Ordering::Relaxed), 1);
    }
    // After the first chunk an error ends the stream, with no retry.
    let e = Scripted::new("e", "n", Script::BreakAfterOne);
    let f = Scripted::new("f", "n", Script::Ok(1));
    let g = gateway(&[e, f.clone()], &[]);
    let (text, err, _) = collect(
        g.chat(req("n"), CallContext::new("r2", Caller::Http))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(text, "a");
    assert!(matches!(err, Some(LlmError::Upstream { .. })));
    assert_eq!(f.calls.load(Ordering::Relaxed), 0);
    assert_eq!(g.in_flight(), 0);
}

#[tokio::test]
async fn client_errors_are_not_retried_and_unknown_models_are_404() {
    let a = Scripted::new("a", "m", Script::Fail("400"));
    let b = Scripted::new("b", "m", Script::Ok(1));
    let g = gateway(&[a, b.clone()], &[("alias", &["b/m"])]);
    let e = g
        .chat(req("m"), CallContext::new("r", Caller::Http))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), 400);
    assert_eq!(b.calls.load(Ordering::Relaxed), 0);
    let e = g
        .chat(req("zzz"), CallContext::new("r", Caller::Http))
        .await
        .err()
        .unwrap();
    assert_eq!((e.status(), e.code()), (404, "model_not_found"));
    let s = g
        .chat(req("alias"), CallContext::new("r", Caller::Http))
        .await
        .unwrap();
    assert_eq!(s.deployment(), "b/m");
    assert_eq!(s.model(), "alias");
    let ids: Vec<String> = g.models().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec!["m", "alias"]);
}

#[tokio::test]
async fn interrupts_end_streams_with_stop_and_ids_are_unique_in_flight() {
    let a = Scripted::new("a", "slow", Script::Hang);
    let g = Arc::new(gateway(&[a], &[]));
    // Before the first chunk: chat resolves with only the stop chunk.
    let g2 = g.clone();
    let call = tokio::spawn(async move {
        g2.chat(
            req("slow"),
            CallContext::new("x1", Caller::Node("n1".into())),
        )
        .await
    });
    while !g.interrupt("x1") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = call.await.unwrap().unwrap();
    let (text, err, interrupted) = collect(s).await;
    assert!(text.is_empty() && err.is_none() && interrupted);
    assert!(!g.interrupt("x1"), "finished calls are unregistered");

    // A duplicate id in flight is refused.
    let b = Scripted::new("b", "m", Script::Ok(1));
    let g = gateway(&[b], &[]);
    let s = g
        .chat(req("m"), CallContext::new("dup", Caller::Http))
        .await
        .unwrap();
    let e = g
        .chat(req("m"), CallContext::new("dup", Caller::Http))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), 400);
    drop(s);
    assert!(
        g.chat(req("m"), CallContext::new("dup", Caller::Http))
            .await
            .is_ok()
    );
}

#[test]
fn parses_requests_and_keeps_unknown_fields() {
    let (r, id) = ChatRequest::from_json(json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
        "stream_options": {"include_usage": true}, "max_completion_tokens": 7,
        "tools": [], "messageId": "m1", "custom": {"x": 1}
    }))
    .unwrap();
    assert_eq!(id.as_deref(), Some("m1"));
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_tokens, Some(7));
    let body = r.upstream_body("up");
    assert_eq!(body["model"], "up");
    assert_eq!(body["custom"], json!({"x": 1}));
    assert_eq!(body["max_completion_tokens"], 7);
    assert!(body.get("max_tokens").is_none());
    assert!(body.get("messageId").is_none());
    for bad in [
        json!({"model": "m", "messages": [{"role": "user"}], "n": 3}),
        json!({"model": "", "messages": [{}]}),
        json!({"model": "m", "messages": "hi"}),
        json!({"model": "m", "messages": [{}], "stop": [1]}),
        json!({"model": "m", "messages": [{}], "max_tokens": 0}),
        json!([1]),
    ] {
        assert_eq!(ChatRequest::from_json(bad).unwrap_err().status(), 400);
    }
}
