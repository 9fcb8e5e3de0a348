//! The task lifecycle after dispatch: results (fenced by node and attempt), progress,
//! cancel, timeouts, migration after a node loss, and the terminal transition.

use super::*;
use crate::model::lifecycle::{Loss, Outcome, TransitionError};
use apex_protocol::codes;

impl Cluster {
    /// Handles `task_result` from the node bound to this session. Commits it if it belongs to
    /// the task's current node and attempt; otherwise acknowledges and ignores it.
    pub fn task_result(&self, node_id: &str, res: TaskResult) -> TaskResultAck {
        let mut core = self.shared.core.lock();
        let verdict = fence(&core, &res.task_id, node_id, res.attempt);
        let (success, message) = match verdict {
            Ok(()) => {
                let returned = res
                    .error
                    .as_ref()
                    .is_some_and(|e| e.code == codes::NODE_DRAINING && !res.success);
                if returned {
                    self.migrate(
                        &mut core,
                        &res.task_id,
                        node_id,
                        "the node is draining",
                        false,
                    );
                } else {
                    let outcome = if res.success {
                        Outcome::Succeeded(res.result.unwrap_or(Value::Null))
                    } else {
                        // A node enforcing the budget it was given, or cancelling on its own,
                        // ends the task timed out or cancelled.
                        Outcome::from_node_error(res.error.unwrap_or_else(|| {
                            ErrorInfo::new(
                                codes::TASK_EXECUTION_FAILED,
                                "the node reported a failure",
                            )
                        }))
                    };
                    self.finish(&mut core, &res.task_id, outcome);
                }
                self.schedule(&mut core);
                (true, None)
            }
            Err(why) => {
                self.shared
                    .stats
                    .results_ignored
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(task_id = %res.task_id, node_id, why, "result ignored");
                (false, Some(why.to_owned()))
            }
        };
        TaskResultAck {
            task_id: res.task_id,
            node_id: node_id.to_owned(),
            success,
            message,
            timestamp: now_ms(),
        }
    }

    /// Handles VCP `tool_result` (correlated by `requestId` = `<taskId>.<attempt>`).
    ///
    /// For an asynchronous plugin of that node (`pluginType: asynchronous`) a successful
    /// `tool_result` is the plugin's "accepted" answer, not its result: the task stays
    /// `running` with the answer (as compact JSON, at most [`PENDING_ANSWER_CHARS`]) in its
    /// message after [`VCP_PENDING_PREFIX`], and ends when the node forwards the plugin's
    /// callback (`plugin_callback_forward`, whose `taskId` is the plugin's own id, found in
    /// that answer) or at its timeout.
    pub fn tool_result(&self, node_id: &str, res: ToolResult) {
        let (task_id, attempt) = parse_vcp_request_id(&res.request_id);
        let success = res.status == "success";
        if success && self.is_async_plugin_task(node_id, task_id) {
            let mut answer = res
                .result
                .as_ref()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            if let Some((cut, _)) = answer.char_indices().nth(PENDING_ANSWER_CHARS) {
                answer.truncate(cut);
            }
            self.task_progress(
                node_id,
                TaskProgress {
                    task_id: task_id.to_owned(),
                    node_id: Some(node_id.to_owned()),
                    attempt,
                    progress: 0.0,
                    message: Some(format!("{VCP_PENDING_PREFIX}{answer}")),
                },
            );
            return;
        }
        let error = (!success).then(|| {
            let message = match &res.error {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => format!("tool reported status `{}`", res.status),
            };
            ErrorInfo::new(codes::TASK_EXECUTION_FAILED, message)
        });
        self.task_result(
            node_id,
            TaskResult {
                task_id: task_id.to_owned(),
                node_id: Some(node_id.to_owned()),
                attempt,
                success,
                result: res.result,
                error,
                execution_time: None,
            },
        );
    }

    /// Whether task `task_id` runs a tool that node `node_id` declared as an asynchronous plugin.
    fn is_async_plugin_task(&self, node_id: &str, task_id: &str) -> bool {
        let core = self.shared.core.lock();
        let Some(t) = core.store.get(task_id) else {
            return false;
        };
        core.nodes
            .get(node_id)
            .is_some_and(|e| e.info.async_tools.contains_key(&t.spec.tool))
    }

    /// Handles `task_progress`: records it if it belongs to the current attempt.
    pub fn task_progress(&self, node_id: &str, p: TaskProgress) -> bool {
        let mut core = self.shared.core.lock();
        if fence(&core, &p.task_id, node_id, p.attempt).is_err() {
            return false;
        }
        let now = SystemTime::now();
        self.transition(&mut core, &p.task_id, |t| {
            t.progress(p.progress, p.message.clone(), now)
        })
        .is_some()
    }

    /// Cancels a task at a user's request; the node running it gets `task_cancel`.
    pub fn cancel(&self, task_id: &str) -> Result<Task, CancelError> {
        self.end_early(task_id, Outcome::cancelled(), "cancelled")
    }

    /// Ends task `task_id` with the outcome its asynchronous plugin posted to the hub (see
    /// `TaskService::complete_by_callback`); the node still waiting on it gets `task_cancel`
    /// with the reason `completed by the plugin's callback`.
    ///
    /// # Errors
    /// [`CancelError::NotFound`] if this hub does not hold it; [`CancelError::Terminal`].
    pub fn complete_by_callback(
        &self,
        task_id: &str,
        outcome: Outcome,
    ) -> Result<Task, CancelError> {
        self.end_early(task_id, outcome, "completed by the plugin's callback")
    }

    pub(super) fn end_early(
        &self,
        task_id: &str,
        outcome: Outcome,
        reason: &str,
    ) -> Result<Task, CancelError> {
        let mut core = self.shared.core.lock();
        let Some(t) = core.store.get(task_id) else {
            return Err(CancelError::NotFound);
        };
        if t.status.is_terminal() {
            return Err(CancelError::Terminal(t.status.as_str()));
        }
        let running_on = matches!(t.status, TaskStatus::Assigned | TaskStatus::Running)
            .then(|| t.node_id.clone())
            .flatten();
        let attempt = t.attempt;
        if let Some(node) = &running_on
            && let Some(e) = core.nodes.get(node)
            && let Some(c) = &e.conn
        {
            let frame: HubMessage = match e.info.dialect {
                Dialect::Native => TaskCancel {
                    task_id: task_id.to_owned(),
                    attempt: Some(attempt),
                    reason: reason.to_owned(),
                }
                .into(),
                Dialect::Vcp => CancelTool {
                    request_id: vcp_request_id(task_id, attempt),
                }
                .into(),
            };
            if e.info.dialect == Dialect::Native || e.info.cancel_tool {
                c.send(frame);
            }
        }
        self.finish(&mut core, task_id, outcome);
        self.schedule(&mut core);
        core.store
            .get(task_id)
            .cloned()
            .ok_or(CancelError::NotFound)
    }

    /// Times out every task whose deadline is before `now`. Returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let due: Vec<String> = {
            let core = self.shared.core.lock();
            core.deadlines
                .range(..(now, u64::MAX))
                .map(|(_, id)| id.clone())
                .collect()
        };
        for id in &due {
            let _ = self.end_early(id, Outcome::timed_out(), "timeout");
        }
        due.len()
    }

    /// When the next deadline falls, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.shared
            .core
            .lock()
            .deadlines
            .keys()
            .next()
            .map(|(d, _)| *d)
    }

    /// Sends a task assigned to `from` back to the queue, or fails it with `node_lost` when it
    /// has used all its attempts ([`Task::requeue`] decides).
    ///
    /// `counts` is false when the node handed the task back unrun (draining): that does not use
    /// up an attempt.
    pub(super) fn migrate(
        &self,
        core: &mut Core,
        task_id: &str,
        from: &str,
        reason: &str,
        counts: bool,
    ) {
        // Free the slot only if the task was still on the node (exactly once per task).
        if let Some(e) = core.nodes.get_mut(from)
            && e.inflight.remove(task_id)
        {
            core.sched.release(from);
        }
        let Some(t) = core.store.get(task_id) else {
            return;
        };
        if !matches!(t.status, TaskStatus::Assigned | TaskStatus::Running)
            || t.node_id.as_deref() != Some(from)
        {
            return;
        }
        let loss = if counts {
            Loss::Node { node: from, reason }
        } else {
            Loss::HandedBack { node: from, reason }
        };
        let now = SystemTime::now();
        match self.transition(core, task_id, |t| t.requeue(loss, now)) {
            Some(TaskStatus::Queued) => {
                self.shared.stats.migrations.fetch_add(1, Ordering::Relaxed);
                metrics::get().migrations.inc();
                if let Some(t) = core.store.get(task_id) {
                    let (tool, key, pinned) = (
                        t.spec.tool.clone(),
                        QueueKey::new(t.spec.priority, t.seq),
                        t.spec.pinned_node.clone(),
                    );
                    core.sched.enqueue(task_id, &tool, key, pinned.as_deref());
                }
            }
            Some(_) => self.ended(core, task_id),
            None => {}
        }
    }

    /// Ends a non-terminal task with `outcome`: frees its node slot or queue place, records the
    /// outcome ([`Task::finish`]), wakes waiters. The caller schedules afterwards.
    pub(super) fn finish(&self, core: &mut Core, task_id: &str, outcome: Outcome) {
        let Some(t) = core.store.get(task_id) else {
            return;
        };
        if t.status.is_terminal() {
            return;
        }
        let status = outcome.status();
        match t.status {
            TaskStatus::Queued => {
                core.sched.dequeue(task_id);
            }
            _ => {
                if let Some(node) = t.node_id.clone()
                    && let Some(e) = core.nodes.get_mut(&node)
                    && e.inflight.remove(task_id)
                {
                    core.sched.release(&node);
                    match status {
                        TaskStatus::Succeeded => e.completed += 1,
                        TaskStatus::Failed => e.failed += 1,
                        _ => {}
                    }
                }
            }
        }
        let now = SystemTime::now();
        if self
            .transition(core, task_id, |t| t.finish(outcome, now))
            .is_some()
        {
            self.ended(core, task_id);
        }
    }

    /// What follows a terminal transition: the task leaves the deadlines, its duration is
    /// observed, its trace span is exported, and everyone waiting for its end is woken.
    fn ended(&self, core: &mut Core, task_id: &str) {
        if let Some(key) = core.deadline_of.remove(task_id) {
            core.deadlines.remove(&key);
        }
        let Some(t) = core.store.get(task_id) else {
            return;
        };
        let finished = t.finished_at.unwrap_or_else(SystemTime::now);
        metrics::task_finished(&t.spec.tool, t.status.as_str(), t.started_at, finished);
        if let Some(tp) = core.trace_parents.remove(task_id)
            && let Some(t) = core.store.get(task_id)
        {
            crate::telemetry::task_span(&tp, t);
        }
        if let Some(ws) = core.waiters.remove(task_id) {
            for w in ws {
                let _ = w.send(());
            }
        }
    }

    /// Applies transition `f` to the stored task `id` (one store update) and publishes the
    /// event it caused. Returns the task's status afterwards, or `None` if the task is unknown
    /// or the transition was refused (nothing changed, nothing published).
    pub(super) fn transition(
        &self,
        core: &mut Core,
        id: &str,
        f: impl FnOnce(&mut Task) -> Result<&TaskEvent, TransitionError>,
    ) -> Option<TaskStatus> {
        let events = &self.shared.events;
        let mut f = Some(f);
        let mut status = None;
        core.store.update(id, &mut |t| {
            let Some(f) = f.take() else { return };
            match f(t) {
                Ok(e) => {
                    if events.receiver_count() > 0 {
                        let _ = events.send(Arc::new(e.clone()));
                    }
                    status = Some(t.status);
                }
                Err(e) => tracing::debug!(task_id = %t.id, error = %e, "transition refused"),
            }
        });
        status
    }
}

/// Checks that a result or progress report comes from the task's current node and attempt.
/// Start of the message of a VCP asynchronous plugin's task between its "accepted" answer and
/// its callback; the answer follows.
pub const VCP_PENDING_PREFIX: &str = "waiting for the plugin's callback; it answered: ";
/// Most characters of the "accepted" answer kept in the task's message.
pub const PENDING_ANSWER_CHARS: usize = 512;

pub(super) fn fence(
    core: &Core,
    task_id: &str,
    node_id: &str,
    attempt: Option<u32>,
) -> Result<(), &'static str> {
    let Some(t) = core.store.get(task_id) else {
        return Err("unknown task");
    };
    if t.status.is_terminal() {
        return Err("task already finished; duplicate or late result ignored");
    }
    if !matches!(t.status, TaskStatus::Assigned | TaskStatus::Running) {
        return Err("task is not assigned; stale result ignored");
    }
    if t.node_id.as_deref() != Some(node_id) {
        return Err("task is assigned to another node; stale result ignored");
    }
    if attempt.is_some_and(|a| a != t.attempt) {
        return Err("result is for an earlier attempt; stale result ignored");
    }
    Ok(())
}
