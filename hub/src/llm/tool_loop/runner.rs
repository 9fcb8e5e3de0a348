//! Running the server tools' calls: [`ToolRunner`] and the task-backed [`TaskRunner`] (each
//! call a task through the task service, as the calling principal), and what a run reports
//! ([`RunOutcome`], [`ToolRun`] in `apex_tool_runs`).

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};

use super::parse_arguments;
use crate::model::{Task, TaskSpec, TaskStatus};
use crate::principal::Principal;
use crate::tasks::TaskService;

/// One tool call the hub handled, as `apex_tool_runs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolRun {
    /// The task that ran it (`GET /api/v1/tasks/{id}`); `null` when none was made (skipped,
    /// bad arguments, refused submission).
    pub task_id: Option<String>,
    /// The tool (as the catalogue names it).
    pub tool: String,
    /// The `id` of the model's call.
    pub tool_call_id: String,
    /// From submitting the task to having its result, in milliseconds (fractional,
    /// microsecond resolution); 0 for a call not run.
    pub duration_ms: f64,
    /// The task's final status (`succeeded`, `failed`, `timed_out`, `cancelled`), or
    /// `refused` (not accepted, e.g. `plugin_disabled`), `invalid_arguments`, `skipped`.
    pub status: String,
}

/// The outcome of one call: what the model is told and what `apex_tool_runs` lists.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// The task, if one was made.
    pub task_id: Option<String>,
    /// As [`ToolRun::status`].
    pub status: String,
    /// The `tool` message's content as JSON: the task's result, or `{"error": …}`.
    pub content: Value,
    /// As [`ToolRun::duration_ms`].
    pub duration_ms: f64,
}

impl RunOutcome {
    /// A call that ran no task (or whose task is unknown): `{"error": {code, message}}`.
    pub fn error(
        task_id: Option<String>,
        status: &str,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            task_id,
            status: status.to_owned(),
            content: json!({"error": {"code": code, "message": message.into(), "status": status}}),
            duration_ms: 0.0,
        }
    }

    /// The outcome of a task that ended.
    pub fn of_task(t: &Task) -> Self {
        let status = t.status.as_str().to_owned();
        let content = if t.status == TaskStatus::Succeeded {
            t.result.clone().unwrap_or(Value::Null)
        } else {
            let (code, message) = t
                .error
                .as_ref()
                .map(|e| (e.code.clone(), e.message.clone()))
                .unwrap_or_else(|| (status.clone(), format!("the task ended {status}")));
            json!({"error": {"code": code, "message": message, "status": status}})
        };
        Self {
            task_id: Some(t.id.clone()),
            status,
            content,
            duration_ms: 0.0,
        }
    }
}

/// Runs one server-tool call. Dropping the future gives the call up (the task service
/// implementation cancels its task).
pub trait ToolRunner: Send + Sync + 'static {
    /// Runs `tool` with `arguments` (the model's JSON text) for the call `call_id`.
    fn run<'a>(
        &'a self,
        tool: &'a str,
        arguments: &'a str,
        call_id: &'a str,
    ) -> BoxFuture<'a, RunOutcome>;
}

/// [`ToolRunner`] over the task service: each call is one task of the calling principal.
pub struct TaskRunner {
    tasks: TaskService,
    principal: Principal,
    request_id: String,
    timeout_seconds: f64,
    max_attempts: u32,
    priority: i32,
}

impl TaskRunner {
    /// Tasks for `principal`, described with the chat's `request_id`, with the config's
    /// `tool_call_timeout_seconds`, `default_max_attempts` and `default_priority`.
    pub fn new(
        tasks: TaskService,
        principal: Principal,
        request_id: &str,
        cfg: &crate::config::Config,
    ) -> Self {
        Self {
            tasks,
            principal,
            request_id: request_id.to_owned(),
            timeout_seconds: cfg.tool_call_timeout_seconds,
            max_attempts: cfg.default_max_attempts,
            priority: cfg.default_priority,
        }
    }
}

/// Cancels a task whose call was given up before the task ended.
struct CancelOnDrop {
    tasks: TaskService,
    principal: Principal,
    id: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let (tasks, principal) = (self.tasks.clone(), self.principal.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = tasks.cancel(&principal, &id).await {
                    tracing::debug!(task_id = %id, error = %e, "abandoned tool task not cancelled");
                }
            });
        }
    }
}

impl ToolRunner for TaskRunner {
    fn run<'a>(
        &'a self,
        tool: &'a str,
        arguments: &'a str,
        call_id: &'a str,
    ) -> BoxFuture<'a, RunOutcome> {
        async move {
            let args = match parse_arguments(arguments) {
                Ok(a) => a,
                Err(m) => {
                    return RunOutcome::error(None, "invalid_arguments", "invalid_arguments", m);
                }
            };
            let spec = TaskSpec {
                tool: tool.to_owned(),
                args,
                description: Some(format!(
                    "tool call {call_id} of chat completion {}",
                    self.request_id
                )),
                priority: self.priority,
                timeout_seconds: self.timeout_seconds,
                max_attempts: self.max_attempts,
                idempotency_key: None,
                pinned_node: None,
                capability: None,
                owner: None,
            };
            let started = tokio::time::Instant::now();
            let submitted = self.tasks.submit(&self.principal, vec![spec]).await;
            let task = match submitted.map(|mut v| v.pop()) {
                Ok(Some((t, _))) => t,
                Ok(None) => {
                    return RunOutcome::error(None, "refused", "internal", "no task was made");
                }
                Err(e) => {
                    return RunOutcome::error(None, "refused", refusal_code(&e), e.to_string());
                }
            };
            let mut guard = CancelOnDrop {
                tasks: self.tasks.clone(),
                principal: self.principal.clone(),
                id: Some(task.id.clone()),
            };
            // The engine ends the task at its timeout; this is only a backstop.
            let until = started + Duration::from_secs_f64(self.timeout_seconds + 5.0);
            let mut last = task;
            loop {
                if last.status.is_terminal() {
                    guard.id = None;
                    let mut out = RunOutcome::of_task(&last);
                    out.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                    return out;
                }
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    let mut out = RunOutcome::error(
                        Some(last.id.clone()),
                        "timed_out",
                        "task_timeout",
                        "the tool task did not end in time",
                    );
                    out.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                    return out;
                }
                match self
                    .tasks
                    .get(&self.principal, &last.id, left.min(crate::tasks::MAX_WAIT))
                    .await
                {
                    Ok(Some(t)) => last = t,
                    Ok(None) => {
                        guard.id = None;
                        return RunOutcome::error(
                            Some(last.id.clone()),
                            "failed",
                            "not_found",
                            "the tool task is gone",
                        );
                    }
                    Err(e) => {
                        let mut out = RunOutcome::error(
                            Some(last.id.clone()),
                            "failed",
                            "store_unavailable",
                            e.to_string(),
                        );
                        out.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                        return out;
                    }
                }
            }
        }
        .boxed()
    }
}

/// The error code a refused submission tells the model.
fn refusal_code(e: &crate::tasks::Error) -> &'static str {
    use crate::tasks::Error as E;
    match e {
        E::Submit(crate::engine::SubmitError::ForbiddenTool(_)) => "forbidden",
        E::Submit(_) => "invalid_request",
        E::PluginDisabled(_) => "plugin_disabled",
        E::StoreUnavailable(_) => "store_unavailable",
        E::ShuttingDown => "shutting_down",
        E::NotFound(_) | E::Terminal(_) | E::CancelUnconfirmed(_) => "internal",
    }
}
