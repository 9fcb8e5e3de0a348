//! A turn after its first model call ([`Run`]): drives the answer's stream into
//! [`TurnEvent`]s, stores the turn (one append of the user and assistant messages), updates
//! the session record, reports `Done`, and summarises trimmed turns while it still holds the
//! session.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    ChatAnswer, ChatService, Error, LOG_KIND, Roles, Session, StoredMessage, StreamMode, TurnEvent,
    TurnLock, choose, context, rfc3339, tokens,
};
use crate::llm::ChunkStream;
use crate::principal::Principal;

/// A turn after its first model call: drives the answer, stores it, reports.
pub(super) struct Run {
    pub(super) svc: ChatService,
    pub(super) name: String,
    pub(super) session: Session,
    pub(super) choice: choose::Choice,
    pub(super) message: String,
    pub(super) user_tokens: u64,
    pub(super) kept: Vec<StoredMessage>,
    /// Tokens of the prompt's fixed part (system prompt, context, summary).
    pub(super) fixed_tokens: u64,
    pub(super) dropped: Vec<StoredMessage>,
    pub(super) messages: Vec<Value>,
    pub(super) mode: StreamMode,
    pub(super) started: tokio::time::Instant,
    pub(super) started_ms: i64,
    pub(super) caller: Principal,
}

/// The mean token log-probability of a raw `chat.completion.chunk` (or whole completion):
/// `(sum, count)` of `choices[0].logprobs.content[].logprob`.
fn logprob_sum(raw: &[u8]) -> Option<(f64, u64)> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    let content = v["choices"][0]["logprobs"]["content"].as_array()?;
    let mut sum = 0.0;
    let mut n = 0;
    for t in content {
        if let Some(lp) = t["logprob"].as_f64() {
            sum += lp;
            n += 1;
        }
    }
    Some((sum, n))
}

impl Run {
    pub(super) async fn drive(
        mut self,
        mut stream: ChunkStream,
        tx: mpsc::Sender<TurnEvent>,
        lock: TurnLock,
    ) {
        let model = self.choice.model.clone();
        if self.mode == StreamMode::Updates {
            let _ = tx
                .send(TurnEvent::Update(json!({
                    "step": "model_call", "model": model, "reasoning": self.choice.reasoning,
                })))
                .await;
        }
        let mut text = String::new();
        let mut usage = None;
        let mut interrupted = false;
        let mut lp_sum = 0.0;
        let mut lp_n = 0u64;
        let mut runs = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(c) => {
                    if let Some((s, n)) = c.raw.as_deref().and_then(logprob_sum) {
                        lp_sum += s;
                        lp_n += n;
                    }
                    if !c.text.is_empty() {
                        text.push_str(&c.text);
                        // The client went away (a closed stream or WebSocket): stop here,
                        // dropping the model call; nothing of the turn is stored. Checked on
                        // every chunk because a stream that is always ready (the mock at full
                        // speed) never lets the caller's `closed()` branch run.
                        if tx.is_closed() {
                            return;
                        }
                        if self.mode == StreamMode::Messages {
                            let _ = tx.send(TurnEvent::Token(c.text)).await;
                        }
                    }
                    if c.usage.is_some() {
                        usage = c.usage;
                    }
                    interrupted |= c.interrupted;
                    if let Some(a) = &c.apex
                        && let Some(r) = a.get("apex_tool_runs")
                    {
                        runs = Some(r.clone());
                    }
                }
                Err(e) => {
                    let _ = tx.send(TurnEvent::Error(Error::Llm(e))).await;
                    return;
                }
            }
        }
        if self.mode == StreamMode::Updates {
            for r in runs
                .as_ref()
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let _ = tx
                    .send(TurnEvent::Update(
                        json!({"step": "tool_call", "tool": r["tool"],
                        "tool_call_id": r["tool_call_id"], "task_id": r["task_id"]}),
                    ))
                    .await;
                let _ = tx
                    .send(TurnEvent::Update(
                        json!({"step": "tool_result", "tool": r["tool"],
                        "tool_call_id": r["tool_call_id"], "status": r["status"],
                        "duration_ms": r["duration_ms"]}),
                    ))
                    .await;
            }
        }
        let completion = usage
            .map(|u| u.completion_tokens)
            .filter(|n| *n > 0)
            .unwrap_or_else(|| tokens::count(tokens::encoding_for(&model), &text));
        let now = apex_protocol::now_ms();
        let user = StoredMessage {
            id: String::new(),
            role: "user".to_owned(),
            content: std::mem::take(&mut self.message),
            ts: self.started_ms,
            tok: self.user_tokens,
            model: None,
            cut: false,
        };
        let assistant = StoredMessage {
            id: String::new(),
            role: "assistant".to_owned(),
            content: text.clone(),
            ts: now,
            tok: completion + tokens::MESSAGE_OVERHEAD,
            model: Some(model.clone()),
            cut: interrupted,
        };
        let mut stored = [user, assistant];
        let entries: Vec<Vec<u8>> = stored
            .iter()
            .filter_map(|m| serde_json::to_vec(m).ok())
            .collect();
        let records = &self.svc.inner.records;
        let last = match records.append(LOG_KIND, &self.name, entries).await {
            Ok(n) => {
                stored[0].id = (n - 1).to_string();
                stored[1].id = n.to_string();
                n
            }
            Err(e) => {
                let _ = tx.send(TurnEvent::Error(Error::Store(e))).await;
                return;
            }
        };
        let s = &mut self.session;
        s.log_len = last;
        s.updated_at_ms = now;
        s.message_count += 2;
        s.history_tokens += stored.iter().map(|m| m.tok).sum::<u64>();
        // The answer may push the context past the budget: the oldest turns leave it now, so
        // the statistics (and the next turn) stay within `context_max_tokens`.
        let all: Vec<&StoredMessage> = self.kept.iter().chain(stored.iter()).collect();
        let items: Vec<context::Item> = all
            .iter()
            .map(|m| context::Item {
                role: m.role.clone(),
                tokens: m.tok,
                calls: Vec::new(),
                answers: None,
            })
            .collect();
        let budget = self.svc.cfg().context_max_tokens;
        let start = context::window_start(&items, self.fixed_tokens, budget).unwrap_or(all.len());
        if start > 0 {
            s.context_after = all[start - 1].id.parse().unwrap_or(s.context_after);
        }
        let window = &all[start..];
        s.context_count = window.len() as u64;
        s.context_tokens = window.iter().map(|m| m.tok).sum();
        let mut roles = Roles::default();
        for m in window {
            roles.add(&m.role);
        }
        s.context_roles = roles;
        s.last_model = Some(model.clone());
        if let Err(e) = self.svc.save(&self.name, s).await {
            // The messages are stored; the record is recounted from the log on next read.
            tracing::warn!(session = %self.name, error = %e, "chat session record not updated; it is recounted from the log");
        }
        if let Some(hook) = &self.svc.inner.hooks.on_stored {
            hook(&self.session, &stored);
        }
        if self.mode == StreamMode::Values {
            let mut all = self.messages.clone();
            all.push(json!({"role": "assistant", "content": text}));
            let _ = tx.send(TurnEvent::Values(all)).await;
        }
        if self.mode == StreamMode::Updates {
            let _ = tx
                .send(TurnEvent::Update(json!({"step": "answer", "model": model,
                    "token_count": completion})))
                .await;
        }
        let answer = ChatAnswer {
            content: text,
            session_id: self.session.session_id.clone(),
            model_used: model,
            reasoning: self.choice.reasoning.clone(),
            token_count: completion,
            latency_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            confidence: (lp_n > 0).then(|| (lp_sum / lp_n as f64).exp()),
            timestamp: rfc3339(now),
            error: None,
            interrupted,
        };
        let _ = tx.send(TurnEvent::Done(answer)).await;
        if !self.dropped.is_empty() && self.svc.cfg().summarize {
            // Still holding the session: the next turn waits for the summary, this one's
            // answer does not.
            self.summarize().await;
        }
        drop(lock);
    }

    /// Summarises the turns that left the context with an `llm.summarize` task (as the
    /// session's owner) and keeps the summary on the session. Failures only log.
    async fn summarize(&mut self) {
        let mut text = String::new();
        if let Some(prev) = &self.session.summary {
            text.push_str(prev);
            text.push('\n');
        }
        for m in &self.dropped {
            text.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        let spec = crate::model::TaskSpec {
            tool: "llm.summarize".to_owned(),
            args: json!({"text": text, "max_words": 150}),
            description: Some(format!(
                "summary of chat session {}",
                self.session.session_id
            )),
            priority: 0,
            timeout_seconds: 60.0,
            max_attempts: 2,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            owner: None,
        };
        let tasks = &self.svc.inner.tasks;
        let task = match tasks.submit(&self.caller, vec![spec]).await {
            Ok(mut v) => match v.pop() {
                Some((t, _)) => t,
                None => return,
            },
            Err(e) => {
                tracing::info!(session = %self.name, error = %e, "no summary of the trimmed turns");
                return;
            }
        };
        let done = tasks
            .get(&self.caller, &task.id, Duration::from_secs(60))
            .await;
        let summary = match done {
            Ok(Some(t)) => t
                .result
                .as_ref()
                .and_then(|r| r["summary"].as_str().map(str::to_owned)),
            _ => None,
        };
        let Some(summary) = summary else {
            tracing::info!(session = %self.name, task_id = %task.id, "llm.summarize gave no summary");
            return;
        };
        self.session.summary = Some(summary);
        if let Err(e) = self.svc.save(&self.name, &self.session).await {
            tracing::warn!(session = %self.name, error = %e, "summary not stored");
        }
    }
}
