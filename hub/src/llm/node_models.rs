//! [`NodeModels`]: the gateway [`Backend`] for models hosted by nodes (`apex-node
//! --llm-upstream`).
//!
//! A node that offers tool `llm.chat` and lists models in `node_register.models` hosts them.
//! A chat call for such a model becomes a task on the scheduling lane `llm.chat@<model>`
//! ([`crate::engine::llm_lane`]), which only nodes hosting the model offer, so the scheduler
//! balances the calls over them (least loaded first). The node receives tool `llm.chat` with
//! the OpenAI request body as `toolArgs` (always `stream: true`), sends each upstream chunk as
//! a `task_stream` frame, then `task_result`. The chunks are read from
//! [`Cluster::submit_streaming`] and turned into [`ChatChunk`]s.
//!
//! Continuation: when the node serving a call is lost, the engine migrates the task to
//! another node hosting the model, with the next attempt number. Its
//! `toolArgs.resume.assistantPrefix` then holds the text already passed to the caller
//! ([`Cluster::set_resume`]), which the node appends as an assistant message so its server
//! continues the answer. Chunks of an older attempt are dropped (the engine fences them; this
//! reader checks again). If the new attempt starts by repeating the text already sent (a
//! server that ignores the prefix), the repetition is held back and dropped; as soon as it
//! differs, what was held is passed on. Before the first chunk a lost node simply means the
//! call runs elsewhere.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{
    Backend, CallContext, ChatChunk, ChatRequest, ChunkStream, LlmError, ModelInfo, Usage,
};
use crate::engine::{Cluster, StreamChunk, llm_lane};
use crate::model::{TaskSpec, TaskStatus};

/// Assignments a call may use (a node lost on each fails it).
pub const MAX_ATTEMPTS: u32 = 3;
/// Default of [`NodeModels::first_token_timeout`].
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`NodeModels::total_timeout`] (also the task's timeout).
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Priority of `llm.chat` tasks: a caller is waiting.
pub const PRIORITY: i32 = 10;
/// How often a call waiting for a node checks that some online node still hosts its model.
pub const ORPHAN_CHECK: Duration = Duration::from_secs(1);

/// The backend of node-hosted models (name `nodes`).
#[derive(Clone)]
pub struct NodeModels {
    cluster: Cluster,
}

impl NodeModels {
    /// The models of the nodes of `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

impl Backend for NodeModels {
    fn name(&self) -> &str {
        "nodes"
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.cluster
            .hosted_models()
            .into_iter()
            .map(|(id, nodes)| ModelInfo {
                id,
                created: 0,
                owned_by: match nodes.as_slice() {
                    [one] => format!("node:{one}"),
                    _ => "nodes".to_owned(),
                },
            })
            .collect()
    }

    fn serves(&self, model: &str) -> bool {
        self.cluster.hosts_model(model)
    }

    fn first_token_timeout(&self) -> Duration {
        FIRST_TOKEN_TIMEOUT
    }

    fn total_timeout(&self) -> Duration {
        TOTAL_TIMEOUT
    }

    fn call<'a>(
        &'a self,
        model: &'a str,
        req: &'a ChatRequest,
        ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        async move {
            let mut body = req.upstream_body(model);
            if let Value::Object(m) = &mut body {
                m.insert("stream".to_owned(), Value::Bool(true));
                m.insert("stream_options".to_owned(), json!({"include_usage": true}));
            }
            let spec = TaskSpec {
                tool: llm_lane(model),
                args: body,
                description: Some(format!("chat request {}", ctx.request_id)),
                priority: PRIORITY,
                timeout_seconds: TOTAL_TIMEOUT.as_secs_f64(),
                max_attempts: MAX_ATTEMPTS,
                idempotency_key: None,
                pinned_node: None,
                capability: None,
                owner: None,
            };
            let (task, rx) = self
                .cluster
                .submit_streaming(spec)
                .map_err(|e| LlmError::Unavailable(e.to_string()))?;
            let emitted = Arc::new(Mutex::new(String::new()));
            let prefix = emitted.clone();
            self.cluster.set_resume(
                &task.id,
                Arc::new(move || {
                    let text = prefix.lock().clone();
                    (!text.is_empty()).then(|| json!({ "assistantPrefix": text }))
                }),
            );
            tracing::debug!(task_id = %task.id, model, request_id = %ctx.request_id, "chat call dispatched to a node");
            let done = self.cluster.wait(&task.id);
            let reader = Reader {
                cluster: self.cluster.clone(),
                model: model.to_owned(),
                task_id: task.id,
                rx,
                done,
                emitted,
                attempt: 0,
                dedupe: None,
                stream: req.stream,
                include_usage: req.include_usage,
                whole: Whole::default(),
                ended: false,
            };
            Ok(Box::pin(reader.into_stream()) as ChunkStream)
        }
        .boxed()
    }
}

/// Text of a new attempt that so far repeats what was already sent.
struct Dedupe {
    prefix: String,
    matched: usize,
}

/// A non-streamed call's answer, added up.
#[derive(Default)]
struct Whole {
    finish_reason: Option<String>,
    usage: Option<Usage>,
    tool_calls: Vec<Value>,
}

/// Reads one call's task: chunks in, [`ChatChunk`]s out. Dropping it ends the subscription
/// and cancels the task if it still runs.
struct Reader {
    cluster: Cluster,
    model: String,
    task_id: String,
    rx: mpsc::UnboundedReceiver<StreamChunk>,
    done: Option<oneshot::Receiver<()>>,
    /// Text passed to the caller so far (read by the resume maker).
    emitted: Arc<Mutex<String>>,
    attempt: u32,
    dedupe: Option<Dedupe>,
    stream: bool,
    /// Whether the caller asked for usage (the node always does).
    include_usage: bool,
    whole: Whole,
    ended: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.cluster.close_stream(&self.task_id);
    }
}

/// What one upstream chunk says.
struct Parsed {
    text: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    tool_calls: Option<Value>,
}

fn parse(chunk: &Value) -> Parsed {
    let choice = chunk.get("choices").and_then(|c| c.get(0));
    let delta = choice.and_then(|c| c.get("delta"));
    Parsed {
        text: delta
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        finish_reason: choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        usage: chunk
            .get("usage")
            .filter(|u| u.is_object())
            .and_then(|u| serde_json::from_value(u.clone()).ok()),
        tool_calls: delta
            .and_then(|d| d.get("tool_calls"))
            .filter(|t| !t.is_null())
            .cloned(),
    }
}

/// Adds streamed `delta.tool_calls` entries to whole tool calls: entries with the same
/// `index` are one call whose `function.arguments` pieces are concatenated; `id`, `type` and
/// `function.name` come from the first entry that has them. `index` is removed.
fn merge_tool_calls(calls: &mut Vec<Value>, deltas: Vec<Value>) {
    for d in deltas {
        let index = d.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        while calls.len() <= index {
            calls.push(
                json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}),
            );
        }
        let call = &mut calls[index];
        for key in ["id", "type"] {
            if let Some(v) = d.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()) {
                call[key] = Value::String(v.to_owned());
            }
        }
        if let Some(f) = d.get("function") {
            if let Some(n) = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                call["function"]["name"] = Value::String(n.to_owned());
            }
            if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                let mut args = call["function"]["arguments"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                args.push_str(a);
                call["function"]["arguments"] = Value::String(args);
            }
        }
    }
}

impl Reader {
    fn into_stream(self) -> impl Stream<Item = Result<ChatChunk, LlmError>> + Send {
        futures::stream::unfold(self, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        })
    }

    /// The next chunk for the caller; `None` once the answer is complete.
    async fn next(&mut self) -> Option<Result<ChatChunk, LlmError>> {
        if self.ended {
            return None;
        }
        loop {
            let got = match self.done.as_mut() {
                Some(done) => tokio::select! {
                    biased;
                    c = self.rx.recv() => c,
                    _ = done => {
                        self.done = None;
                        continue;
                    }
                    _ = tokio::time::sleep(ORPHAN_CHECK) => {
                        if let Some(e) = self.orphaned() {
                            self.ended = true;
                            return Some(Err(e));
                        }
                        continue;
                    }
                },
                // The task has ended: every chunk it sent is already queued.
                None => self.rx.try_recv().ok(),
            };
            match got {
                Some(c) => {
                    if let Some(out) = self.accept(c) {
                        return Some(Ok(out));
                    }
                }
                None => return self.finish(),
            }
        }
    }

    /// The error to end with when the task waits in the queue and no online node hosts the
    /// model any more (its node was lost and no other can continue).
    fn orphaned(&self) -> Option<LlmError> {
        let queued = self
            .cluster
            .get(&self.task_id)
            .is_some_and(|t| t.status == TaskStatus::Queued);
        if !queued || self.cluster.hosts_model(&self.model) {
            return None;
        }
        Some(if self.emitted.lock().is_empty() {
            LlmError::Unavailable(format!(
                "no online node hosts the model `{}` any more",
                self.model
            ))
        } else {
            LlmError::Upstream {
                status: None,
                message: format!(
                    "the node serving `{}` was lost and no other online node hosts it",
                    self.model
                ),
            }
        })
    }

    /// Takes a chunk; returns what the caller gets now, if anything.
    fn accept(&mut self, c: StreamChunk) -> Option<ChatChunk> {
        if c.attempt < self.attempt {
            return None;
        }
        if c.attempt > self.attempt {
            if self.attempt != 0 {
                tracing::info!(task_id = %self.task_id, attempt = c.attempt, "chat stream continues on another node");
            }
            self.attempt = c.attempt;
            let sent = self.emitted.lock().clone();
            self.dedupe = (!sent.is_empty()).then_some(Dedupe {
                prefix: sent,
                matched: 0,
            });
        }
        let p = parse(&c.chunk);
        let mut text = p.text;
        if let Some(d) = self.dedupe.as_mut()
            && !text.is_empty()
        {
            let rest = &d.prefix[d.matched..];
            if rest.starts_with(text.as_str()) {
                d.matched += text.len();
                if d.matched == d.prefix.len() {
                    // The whole answer so far was repeated: drop it and go on after it.
                    self.dedupe = None;
                }
                text = String::new();
            } else {
                // Not a repetition: what was held back is new text after all.
                let held = d.prefix[..d.matched].to_owned();
                self.dedupe = None;
                text = held + &text;
            }
        }
        self.absorb(text, p.finish_reason, p.usage, p.tool_calls)
    }

    fn absorb(
        &mut self,
        text: String,
        finish_reason: Option<String>,
        usage: Option<Usage>,
        tool_calls: Option<Value>,
    ) -> Option<ChatChunk> {
        if !text.is_empty() {
            self.emitted.lock().push_str(&text);
        }
        if !self.stream {
            if finish_reason.is_some() {
                self.whole.finish_reason = finish_reason;
            }
            if usage.is_some() {
                self.whole.usage = usage;
            }
            if let Some(Value::Array(deltas)) = tool_calls {
                merge_tool_calls(&mut self.whole.tool_calls, deltas);
            }
            return None;
        }
        let usage = usage.filter(|_| self.include_usage);
        if text.is_empty() && finish_reason.is_none() && usage.is_none() && tool_calls.is_none() {
            return None;
        }
        Some(ChatChunk {
            text,
            tool_calls,
            finish_reason,
            usage,
            ..ChatChunk::default()
        })
    }

    /// The task ended and its chunks are read: the last item, by the task's outcome.
    fn finish(&mut self) -> Option<Result<ChatChunk, LlmError>> {
        self.ended = true;
        // A repetition cut short by the end of the answer was new text after all.
        let held = self
            .dedupe
            .take()
            .map(|d| d.prefix[..d.matched].to_owned())
            .filter(|h| !h.is_empty());
        let task = self.cluster.get(&self.task_id);
        let status = task.as_ref().map(|t| t.status);
        if status != Some(TaskStatus::Succeeded) {
            let why = task
                .and_then(|t| t.error)
                .map(|e| format!("{}: {}", e.code, e.message))
                .unwrap_or_else(|| "the node task ended without an answer".to_owned());
            return Some(Err(LlmError::Upstream {
                status: None,
                message: format!("node-hosted model failed: {why}"),
            }));
        }
        // A node that sent no chunks (or a third-party one): take the text from the result.
        let nothing_sent = self.emitted.lock().is_empty();
        if nothing_sent
            && let Some(content) = task.as_ref().and_then(|t| {
                t.result.as_ref()?["choices"][0]["message"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            && !content.is_empty()
        {
            self.emitted.lock().push_str(&content);
            if self.stream {
                return Some(Ok(ChatChunk {
                    text: content,
                    finish_reason: Some("stop".to_owned()),
                    ..ChatChunk::default()
                }));
            }
        }
        if self.stream {
            return held.map(|text| {
                self.emitted.lock().push_str(&text);
                Ok(ChatChunk {
                    text,
                    ..ChatChunk::default()
                })
            });
        }
        if let Some(h) = held {
            self.emitted.lock().push_str(&h);
        }
        let whole = std::mem::take(&mut self.whole);
        Some(Ok(ChatChunk {
            text: self.emitted.lock().clone(),
            tool_calls: (!whole.tool_calls.is_empty()).then_some(Value::Array(whole.tool_calls)),
            finish_reason: Some(whole.finish_reason.unwrap_or_else(|| "stop".to_owned())),
            usage: whole.usage,
            ..ChatChunk::default()
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunk(attempt: u32, seq: u64, text: &str) -> StreamChunk {
        StreamChunk {
            attempt,
            seq,
            chunk: json!({"choices":[{"index":0,"delta":{"content":text}}]}),
        }
    }

    fn test_cluster() -> Cluster {
        Cluster::new(
            crate::engine::ClusterOptions {
                version: "t".into(),
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(3),
                default_node_max_concurrent_tasks: 4,
                vcp_max_concurrent_tasks: 4,
                allow_internal_request_file: false,
                outbound_queue_frames: 64,
                callbacks: None,
            },
            Box::new(crate::store::MemoryStore::default()),
        )
    }

    fn host(
        cluster: &Cluster,
        id: &str,
        models: &[&str],
    ) -> (
        crate::engine::ConnHandle,
        mpsc::Receiver<crate::engine::Outbound>,
    ) {
        let (conn, rx) = cluster.open_connection(id.into());
        cluster.register_native(
            &conn,
            apex_protocol::NodeRegister {
                node_id: Some(id.into()),
                name: id.into(),
                tools: vec![apex_protocol::ToolSpec::Name("llm.chat".into())],
                models: models
                    .iter()
                    .map(|m| apex_protocol::ModelSpec::Id((*m).into()))
                    .collect(),
                max_concurrent_tasks: Some(2),
                ..Default::default()
            },
        );
        (conn, rx)
    }

    fn assigns(rx: &mut mpsc::Receiver<crate::engine::Outbound>) -> Vec<apex_protocol::TaskAssign> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let crate::engine::Outbound::Msg(apex_protocol::HubMessage::TaskAssign(a)) = o {
                out.push(a);
            }
        }
        out
    }

    fn stream_frame(task: &str, attempt: u32, seq: u64) -> apex_protocol::TaskStream {
        apex_protocol::TaskStream {
            task_id: task.into(),
            node_id: None,
            attempt: Some(attempt),
            seq,
            chunk: json!({"choices":[{"delta":{"content":"x"}}]}),
        }
    }

    #[test]
    fn lanes_route_by_model_chunks_are_fenced_and_resume_rides_on_migration() {
        let cluster = test_cluster();
        let (_c1, mut rx1) = host(&cluster, "n1", &["m1"]);
        let (_c2, mut rx2) = host(&cluster, "n2", &["m2"]);
        let (_c3, mut rx3) = host(&cluster, "n3", &["m2"]);
        assert_eq!(
            cluster.hosted_models(),
            vec![
                ("m1".to_owned(), vec!["n1".to_owned()]),
                ("m2".to_owned(), vec!["n2".to_owned(), "n3".to_owned()]),
            ]
        );
        let backend = NodeModels::new(cluster.clone());
        assert!(backend.serves("m2") && !backend.serves("m3"));

        let spec = TaskSpec {
            tool: llm_lane("m2"),
            args: json!({"model": "m2", "messages": []}),
            description: None,
            priority: PRIORITY,
            timeout_seconds: 60.0,
            max_attempts: 3,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            owner: None,
        };
        let (task, mut chunks) = cluster.submit_streaming(spec).unwrap();
        let first = task.node_id.clone().unwrap();
        assert_ne!(first, "n1", "n1 does not host m2");
        assert!(assigns(&mut rx1).is_empty());
        let (first_rx, other_rx, other) = if first == "n2" {
            (&mut rx2, &mut rx3, "n3")
        } else {
            (&mut rx3, &mut rx2, "n2")
        };
        let a = assigns(first_rx);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].tool_name, "llm.chat", "the node sees the plain tool");
        assert_eq!(a[0].attempt, Some(1));
        assert!(a[0].tool_args.get("resume").is_none());

        // Only the assigned node's chunks of the current attempt get through.
        assert!(!cluster.task_stream("n1", stream_frame(&task.id, 1, 0)));
        assert!(!cluster.task_stream(&first, stream_frame(&task.id, 7, 0)));
        assert!(cluster.task_stream(&first, stream_frame(&task.id, 1, 0)));
        let c = chunks.try_recv().unwrap();
        assert_eq!((c.attempt, c.seq), (1, 0));
        assert!(chunks.try_recv().is_err());

        // The node is lost: the task moves to the other host with the resume value.
        cluster.set_resume(&task.id, Arc::new(|| Some(json!({"assistantPrefix": "x"}))));
        // The engine only drops a node through its bound connection.
        let conn_id = if first == "n2" { _c2.id } else { _c3.id };
        assert!(cluster.lose_node(&first, conn_id, "test"));
        let a = assigns(other_rx);
        assert_eq!(a.len(), 1, "migrated to {other}");
        assert_eq!(a[0].attempt, Some(2));
        assert_eq!(a[0].tool_args["resume"]["assistantPrefix"], "x");
        assert!(!cluster.task_stream(&first, stream_frame(&task.id, 1, 1)));
        assert!(cluster.task_stream(other, stream_frame(&task.id, 2, 0)));
        assert_eq!(chunks.try_recv().unwrap().attempt, 2);

        // Closing the subscription cancels the task.
        cluster.close_stream(&task.id);
        assert_eq!(cluster.get(&task.id).unwrap().status, TaskStatus::Cancelled);
        assert!(!cluster.task_stream(other, stream_frame(&task.id, 2, 1)));
    }

    #[tokio::test]
    async fn a_task_without_chunks_answers_from_its_result() {
        let cluster = test_cluster();
        let (_c, mut rx) = host(&cluster, "n1", &["m1"]);
        let backend = NodeModels::new(cluster.clone());
        for stream in [true, false] {
            let req =
                ChatRequest::simple("m1", vec![json!({"role": "user", "content": "hi"})], stream);
            let ctx = CallContext::new(format!("r-{stream}"), super::super::Caller::Http);
            let mut s = backend.call("m1", &req, &ctx).await.unwrap();
            let a = assigns(&mut rx).pop().unwrap();
            // A node that streams nothing and answers with the whole completion.
            let ack = cluster.task_result(
                "n1",
                apex_protocol::TaskResult {
                    task_id: a.task_id.clone(),
                    attempt: a.attempt,
                    success: true,
                    result: Some(json!({"choices": [{"message": {"content": "whole"}}]})),
                    ..Default::default()
                },
            );
            assert!(ack.success);
            let c = futures::StreamExt::next(&mut s).await.unwrap().unwrap();
            assert_eq!(c.text, "whole");
            assert_eq!(c.finish_reason.as_deref(), Some("stop"));
            assert!(futures::StreamExt::next(&mut s).await.is_none());
        }
    }

    fn reader(stream: bool) -> (Reader, mpsc::UnboundedSender<StreamChunk>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let cluster = test_cluster();
        let r = Reader {
            cluster,
            model: "m".into(),
            task_id: "t".into(),
            rx,
            done: None,
            emitted: Arc::default(),
            attempt: 0,
            dedupe: None,
            stream,
            include_usage: false,
            whole: Whole::default(),
            ended: false,
        };
        (r, tx)
    }

    fn texts(r: &mut Reader, chunks: Vec<StreamChunk>) -> String {
        let mut out = String::new();
        for c in chunks {
            if let Some(c) = r.accept(c) {
                out.push_str(&c.text);
            }
        }
        out
    }

    #[test]
    fn a_new_attempt_that_continues_is_passed_on() {
        let (mut r, _tx) = reader(true);
        let a = texts(&mut r, vec![chunk(1, 0, "Hello"), chunk(1, 1, " wor")]);
        let b = texts(&mut r, vec![chunk(2, 0, "ld"), chunk(2, 1, "!")]);
        assert_eq!(a + &b, "Hello world!");
        assert_eq!(*r.emitted.lock(), "Hello world!");
    }

    #[test]
    fn a_new_attempt_that_restarts_is_deduplicated() {
        let (mut r, _tx) = reader(true);
        let a = texts(&mut r, vec![chunk(1, 0, "Hello"), chunk(1, 1, " wor")]);
        // The new node ignored the prefix and starts over.
        let b = texts(
            &mut r,
            vec![
                chunk(2, 0, "Hel"),
                chunk(2, 1, "lo wor"),
                chunk(2, 2, "ld!"),
            ],
        );
        assert_eq!(a + &b, "Hello world!");
    }

    #[test]
    fn a_partial_repeat_that_diverges_is_kept() {
        let (mut r, _tx) = reader(true);
        let a = texts(&mut r, vec![chunk(1, 0, "Hello")]);
        let b = texts(&mut r, vec![chunk(2, 0, "He"), chunk(2, 1, "y")]);
        assert_eq!(a + &b, "HelloHey");
    }

    #[test]
    fn streamed_tool_call_pieces_make_whole_calls() {
        let mut calls = Vec::new();
        merge_tool_calls(
            &mut calls,
            vec![json!({"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": ""}})],
        );
        merge_tool_calls(
            &mut calls,
            vec![json!({"index": 0, "function": {"arguments": "{\"city\":"}})],
        );
        merge_tool_calls(
            &mut calls,
            vec![json!({"index": 0, "function": {"arguments": "\"Paris\"}"}})],
        );
        assert_eq!(
            calls,
            vec![json!({"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}})]
        );
    }

    #[test]
    fn chunks_of_an_older_attempt_are_dropped() {
        let (mut r, _tx) = reader(true);
        let a = texts(
            &mut r,
            vec![chunk(1, 0, "A"), chunk(2, 0, "B"), chunk(1, 1, "x")],
        );
        assert_eq!(a, "AB");
    }
}
