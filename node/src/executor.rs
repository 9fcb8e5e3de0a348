//! Runs assigned tasks: the concurrency limit, each task's timeout, cancellation and draining.
//! Every task that is accepted ends in exactly one `task_result`, delivered as an [`Event`] on
//! the channel returned by [`Executor::new`]; the executor does no network I/O.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use apex_protocol::{ErrorInfo, TaskAssign, TaskProgress, TaskResult, TaskStream};
use futures::FutureExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::stats::TaskCounters;
use crate::tools::{self, ProgressSink, Registry, ToolContext};

/// `error.code` of a task that ran past its timeout.
pub const CODE_TIMEOUT: &str = apex_protocol::codes::TASK_TIMEOUT;
/// `error.code` of a task stopped by `task_cancel`.
pub const CODE_CANCELLED: &str = apex_protocol::codes::TASK_CANCELLED;
/// `error.code` of a task refused or aborted because the node is draining.
pub const CODE_DRAINING: &str = apex_protocol::codes::NODE_DRAINING;
/// `error.code` of a task naming a tool the node does not have.
pub const CODE_UNSUPPORTED: &str = "capability_not_supported";
/// `error.code` of a tool that failed unexpectedly (panicked).
pub const CODE_FAILED: &str = apex_protocol::codes::TASK_EXECUTION_FAILED;

/// How long a task runs before the node reports it started (`task_progress` 0, "started").
pub const STARTED_AFTER: Duration = Duration::from_millis(50);

/// Something the connection must tell the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A task ended (`nodeId` is filled in when sent).
    Result(TaskResult),
    /// A running task reported progress.
    Progress(TaskProgress),
    /// A running task streamed a chunk of its output (`task_stream`).
    Stream(TaskStream),
}

/// Why a running task is stopped.
#[derive(Debug)]
enum Stop {
    /// `task_cancel` from the hub, with its reason.
    Cancelled(String),
    /// The drain timeout passed.
    Draining,
}

struct Running {
    run_id: u64,
    attempt: Option<u32>,
    stop: Option<oneshot::Sender<Stop>>,
}

struct Inner {
    registry: Arc<Registry>,
    permits: Arc<Semaphore>,
    running: Mutex<HashMap<String, Running>>,
    draining: AtomicBool,
    next_run: AtomicU64,
    /// Accepted tasks whose result has not been put on the event channel yet.
    unreported: AtomicUsize,
    counters: Arc<TaskCounters>,
    events: mpsc::UnboundedSender<Event>,
    default_timeout: Duration,
}

/// Handle to the task runner; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl Executor {
    /// An executor running at most `max_concurrent` tools at once; tasks assigned without a
    /// timeout get `default_timeout`. Returns the channel of results and progress.
    pub fn new(
        registry: Arc<Registry>,
        max_concurrent: u32,
        default_timeout: Duration,
        counters: Arc<TaskCounters>,
    ) -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(max_concurrent.max(1) as usize));
        let inner = Inner {
            registry,
            permits,
            running: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            next_run: AtomicU64::new(1),
            unreported: AtomicUsize::new(0),
            counters,
            events,
            default_timeout,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    /// Accepts a task: answers at once (draining, unknown tool, duplicate) or starts it.
    ///
    /// Must be called within a tokio runtime.
    pub fn assign(&self, task: TaskAssign) {
        let inner = &self.inner;
        inner.counters.received();
        if inner.draining.load(Ordering::SeqCst) {
            self.finish_now(
                &task,
                ErrorInfo::new(CODE_DRAINING, "node is draining and takes no new tasks"),
            );
            return;
        }
        let Some(tool) = inner.registry.get(&task.tool_name) else {
            self.finish_now(
                &task,
                ErrorInfo::new(
                    CODE_UNSUPPORTED,
                    format!("tool `{}` is not offered by this node", task.tool_name),
                ),
            );
            return;
        };
        let run_id = inner.next_run.fetch_add(1, Ordering::Relaxed);
        let (stop_tx, stop_rx) = oneshot::channel();
        {
            let mut running = inner.running.lock();
            if let Some(existing) = running.get_mut(&task.task_id) {
                if existing.attempt == task.attempt {
                    tracing::debug!(task_id = %task.task_id, attempt = ?task.attempt, "duplicate task_assign ignored");
                    return;
                }
                // A newer attempt of a task still running here: the old attempt is stale.
                if let Some(stop) = existing.stop.take() {
                    let _ = stop.send(Stop::Cancelled("superseded by a new attempt".into()));
                }
            }
            running.insert(
                task.task_id.clone(),
                Running {
                    run_id,
                    attempt: task.attempt,
                    stop: Some(stop_tx),
                },
            );
        }
        inner.unreported.fetch_add(1, Ordering::SeqCst);
        let timeout = match task.timeout {
            Some(ms) if ms > 0 => Duration::from_millis(ms),
            _ => inner.default_timeout,
        };
        tracing::debug!(task_id = %task.task_id, tool = %task.tool_name, attempt = ?task.attempt, timeout_ms = timeout.as_millis() as u64, "task started");
        let this = self.clone();
        let span = crate::telemetry::task_span(&task);
        let run = async move {
            let ctx = ToolContext {
                progress: Arc::new(Progress {
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    events: this.inner.events.clone(),
                    next_seq: AtomicU64::new(0),
                }),
                task_id: task.task_id.clone(),
                callback: tools::Callback::from_metadata(task.metadata.as_ref()),
            };
            let start = Instant::now();
            let permits = this.inner.permits.clone();
            let args = task.tool_args;
            let started = ctx.progress.clone();
            let work = async move {
                // Queueing for a slot counts against the task's timeout.
                let _permit = permits.acquire_owned().await;
                let call = AssertUnwindSafe(tool.call(args, ctx)).catch_unwind();
                tokio::pin!(call);
                // A task still running after STARTED_AFTER tells the hub it is `running`;
                // quick tasks skip that frame and go straight to their result.
                tokio::select! {
                    r = &mut call => return r,
                    _ = tokio::time::sleep(STARTED_AFTER) => {
                        started.report(0.0, Some("started".to_owned()));
                    }
                }
                call.await
            };
            let mut stop_rx = stop_rx;
            let outcome: Result<Value, ErrorInfo> = tokio::select! {
                biased;
                stop = &mut stop_rx => Err(match stop {
                    Ok(Stop::Cancelled(reason)) => ErrorInfo::new(
                        CODE_CANCELLED,
                        format!("task cancelled by the hub ({reason})"),
                    ),
                    Ok(Stop::Draining) | Err(_) => ErrorInfo::new(
                        CODE_DRAINING,
                        "node is shutting down; task aborted after the drain timeout",
                    ),
                }),
                _ = tokio::time::sleep(timeout) => Err(ErrorInfo::new(
                    CODE_TIMEOUT,
                    format!("task exceeded its timeout of {} ms", timeout.as_millis()),
                )),
                r = work => match r {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(e)) => Err(tool_error(&e)),
                    Err(_) => Err(ErrorInfo::new(CODE_FAILED, "tool panicked")),
                },
            };
            let exec_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.complete(&task.task_id, run_id, task.attempt, outcome, Some(exec_ms));
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
    }

    /// Stops the task `task_id` if it runs here with `attempt` (any attempt if `None`); its
    /// result will carry `task_cancelled`. Returns whether a task was found.
    pub fn cancel(&self, task_id: &str, attempt: Option<u32>, reason: &str) -> bool {
        let mut running = self.inner.running.lock();
        let Some(r) = running.get_mut(task_id) else {
            return false;
        };
        if attempt.is_some() && r.attempt.is_some() && attempt != r.attempt {
            return false;
        }
        match r.stop.take() {
            Some(stop) => {
                let _ = stop.send(Stop::Cancelled(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// Stops taking work: later assignments are answered with `node_draining`.
    pub fn start_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Executor::start_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Aborts every running task; each reports `node_draining`.
    pub fn abort_all(&self) {
        let mut running = self.inner.running.lock();
        for r in running.values_mut() {
            if let Some(stop) = r.stop.take() {
                let _ = stop.send(Stop::Draining);
            }
        }
    }

    /// Tasks accepted and not finished (running or waiting for a slot).
    pub fn active(&self) -> usize {
        self.inner.running.lock().len()
    }

    /// Whether every accepted task has ended and its result is on the event channel (so an
    /// empty channel then means nothing is left to report).
    pub fn is_idle(&self) -> bool {
        self.inner.unreported.load(Ordering::SeqCst) == 0
    }

    /// Ids of the tasks accepted and not finished.
    pub fn running_ids(&self) -> Vec<String> {
        self.inner.running.lock().keys().cloned().collect()
    }

    fn finish_now(&self, task: &TaskAssign, error: ErrorInfo) {
        tracing::debug!(task_id = %task.task_id, code = %error.code, "task refused");
        self.inner.counters.finished(false, None);
        self.emit_result(&task.task_id, task.attempt, Err(error), Some(0));
    }

    fn complete(
        &self,
        task_id: &str,
        run_id: u64,
        attempt: Option<u32>,
        outcome: Result<Value, ErrorInfo>,
        exec_ms: Option<u64>,
    ) {
        self.inner.counters.finished(outcome.is_ok(), exec_ms);
        match &outcome {
            Ok(_) => tracing::debug!(task_id, ?attempt, exec_ms, "task succeeded"),
            Err(e) => {
                tracing::debug!(task_id, ?attempt, code = %e.code, message = %e.message, "task failed")
            }
        }
        // Result first, then leave `running`: a task is always in one of the two, so the
        // `inflight` list sent at re-registration never misses it.
        self.emit_result(task_id, attempt, outcome, exec_ms);
        {
            let mut running = self.inner.running.lock();
            if running.get(task_id).is_some_and(|r| r.run_id == run_id) {
                running.remove(task_id);
            }
        }
        self.inner.unreported.fetch_sub(1, Ordering::SeqCst);
    }

    fn emit_result(
        &self,
        task_id: &str,
        attempt: Option<u32>,
        outcome: Result<Value, ErrorInfo>,
        exec_ms: Option<u64>,
    ) {
        let (success, result, error) = match outcome {
            Ok(v) => (true, Some(v), None),
            Err(e) => (false, None, Some(e)),
        };
        let result = TaskResult {
            task_id: task_id.to_owned(),
            node_id: None,
            attempt,
            success,
            result,
            error,
            execution_time: exec_ms,
        };
        // The receiver lives as long as the node runs; after that nobody needs the result.
        let _ = self.inner.events.send(Event::Result(result));
    }
}

fn tool_error(e: &tools::Error) -> ErrorInfo {
    ErrorInfo::new(e.code(), e.to_string())
}

struct Progress {
    task_id: String,
    attempt: Option<u32>,
    events: mpsc::UnboundedSender<Event>,
    /// `seq` of the next `task_stream` chunk of this attempt.
    next_seq: AtomicU64,
}

impl ProgressSink for Progress {
    fn report(&self, percent: f64, message: Option<String>) {
        let percent = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            0.0
        };
        let _ = self.events.send(Event::Progress(TaskProgress {
            task_id: self.task_id.clone(),
            node_id: None,
            attempt: self.attempt,
            progress: percent,
            message,
        }));
    }

    fn chunk(&self, chunk: Value) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        // The same FIFO channel as the result: every chunk reaches the hub before it.
        let _ = self.events.send(Event::Stream(TaskStream {
            task_id: self.task_id.clone(),
            node_id: None,
            attempt: self.attempt,
            seq,
            chunk,
        }));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tools::basic::{Echo, Sleep};
    use serde_json::json;

    fn executor(limit: u32) -> (Executor, mpsc::UnboundedReceiver<Event>) {
        let mut r = Registry::new();
        r.add(Echo);
        r.add(Sleep);
        Executor::new(
            Arc::new(r),
            limit,
            Duration::from_secs(300),
            Arc::new(TaskCounters::default()),
        )
    }

    fn assign(id: &str, tool: &str, args: Value, timeout: Option<u64>) -> TaskAssign {
        TaskAssign {
            task_id: id.into(),
            node_id: "n".into(),
            tool_name: tool.into(),
            capability: None,
            tool_args: args,
            timeout,
            priority: None,
            attempt: Some(3),
            metadata: None,
        }
    }

    async fn next_result(rx: &mut mpsc::UnboundedReceiver<Event>) -> TaskResult {
        loop {
            match rx.recv().await.unwrap() {
                Event::Result(r) => return r,
                Event::Progress(_) | Event::Stream(_) => continue,
            }
        }
    }

    fn code(r: &TaskResult) -> &str {
        r.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
    }

    #[tokio::test]
    async fn runs_a_tool_and_echoes_the_attempt() {
        let (ex, mut rx) = executor(2);
        ex.assign(assign("t1", "echo", json!({"x": 1}), Some(1000)));
        let r = next_result(&mut rx).await;
        assert!(r.success);
        assert_eq!(r.attempt, Some(3));
        assert_eq!(r.result, Some(json!({"echoed": {"x": 1}})));
        assert_eq!(ex.active(), 0);
    }

    #[tokio::test]
    async fn unknown_tool_and_bad_arguments() {
        let (ex, mut rx) = executor(2);
        ex.assign(assign("t1", "teleport", json!({}), None));
        assert_eq!(code(&next_result(&mut rx).await), CODE_UNSUPPORTED);
        ex.assign(assign("t2", "sleep", json!({"seconds": 1}), None));
        let r = next_result(&mut rx).await;
        assert_eq!(code(&r), "invalid_arguments");
        assert!(r.error.unwrap().message.contains("unknown field `seconds`"));
    }

    #[tokio::test]
    async fn timeout_is_enforced() {
        let (ex, mut rx) = executor(2);
        ex.assign(assign("t1", "sleep", json!({"ms": 60_000}), Some(50)));
        let r = next_result(&mut rx).await;
        assert_eq!(code(&r), CODE_TIMEOUT);
        assert_eq!(r.attempt, Some(3));
    }

    #[tokio::test]
    async fn cancel_stops_a_task() {
        let (ex, mut rx) = executor(2);
        ex.assign(assign("t1", "sleep", json!({"ms": 60_000}), None));
        assert!(!ex.cancel("t1", Some(99), "cancelled"), "other attempt");
        assert!(ex.cancel("t1", Some(3), "cancelled"));
        let r = next_result(&mut rx).await;
        assert_eq!(code(&r), CODE_CANCELLED);
        assert!(!ex.cancel("t1", None, "cancelled"));
    }

    #[tokio::test]
    async fn concurrency_is_limited_and_draining_aborts() {
        let (ex, mut rx) = executor(1);
        ex.assign(assign("long", "sleep", json!({"ms": 200}), None));
        ex.assign(assign("short", "sleep", json!({"ms": 10}), None));
        // With one slot the short sleep waits for the long one, so it ends second.
        assert_eq!(next_result(&mut rx).await.task_id, "long");
        assert_eq!(next_result(&mut rx).await.task_id, "short");

        ex.assign(assign("c", "sleep", json!({"ms": 60_000}), None));
        ex.start_drain();
        ex.assign(assign("d", "echo", json!({}), None));
        let refused = next_result(&mut rx).await;
        assert_eq!(
            (refused.task_id.as_str(), code(&refused)),
            ("d", CODE_DRAINING)
        );
        assert_eq!(ex.running_ids(), vec!["c".to_owned()]);
        ex.abort_all();
        let aborted = next_result(&mut rx).await;
        assert_eq!(
            (aborted.task_id.as_str(), code(&aborted)),
            ("c", CODE_DRAINING)
        );
        assert_eq!(ex.active(), 0);
    }

    #[tokio::test]
    async fn sleep_reports_progress() {
        let (ex, mut rx) = executor(1);
        ex.assign(assign("p", "sleep", json!({"ms": 2000}), None));
        let mut progress = Vec::new();
        while let Event::Progress(p) = rx.recv().await.unwrap() {
            progress.push(p);
        }
        assert!(!progress.is_empty());
        assert!(
            progress
                .iter()
                .all(|p| p.attempt == Some(3) && p.progress <= 100.0)
        );
    }
}
