//! The task lifecycle after dispatch: results (fenced by node and attempt), progress,
//! cancel, timeouts, migration after a node loss, and the terminal transition.

use super::*;

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
                    .is_some_and(|e| e.code == "node_draining" && !res.success);
                if returned {
                    self.migrate(
                        &mut core,
                        &res.task_id,
                        node_id,
                        "the node is draining",
                        false,
                    );
                } else if res.success {
                    self.finish(
                        &mut core,
                        &res.task_id,
                        TaskStatus::Succeeded,
                        Some(res.result.unwrap_or(Value::Null)),
                        None,
                    );
                } else {
                    let err = res.error.unwrap_or_else(|| {
                        ErrorInfo::new("task_execution_failed", "the node reported a failure")
                    });
                    // A node enforcing the budget it was given, or cancelling on its own.
                    let status = match err.code.as_str() {
                        "task_timeout" => TaskStatus::TimedOut,
                        "task_cancelled" => TaskStatus::Cancelled,
                        _ => TaskStatus::Failed,
                    };
                    self.finish(&mut core, &res.task_id, status, None, Some(err));
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
    pub fn tool_result(&self, node_id: &str, res: ToolResult) {
        let (task_id, attempt) = parse_vcp_request_id(&res.request_id);
        let success = res.status == "success";
        let error = (!success).then(|| {
            let message = match &res.error {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => format!("tool reported status `{}`", res.status),
            };
            ErrorInfo::new("task_execution_failed", message)
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

    /// Handles `task_progress`: records it if it belongs to the current attempt.
    pub fn task_progress(&self, node_id: &str, p: TaskProgress) -> bool {
        let mut core = self.shared.core.lock();
        if fence(&core, &p.task_id, node_id, p.attempt).is_err() {
            return false;
        }
        let events = &self.shared.events;
        core.store.update(&p.task_id, &mut |t| {
            t.status = TaskStatus::Running;
            t.progress = p.progress;
            t.updated_at = SystemTime::now();
            if p.message.is_some() {
                t.message = p.message.clone();
            }
            push_event(t, EventKind::TaskProgress, events, |e| {
                e.progress = Some(p.progress);
                e.message = p.message.clone();
            });
        })
    }

    /// Cancels a task at a user's request; the node running it gets `task_cancel`.
    pub fn cancel(&self, task_id: &str) -> Result<Task, CancelError> {
        self.end_early(task_id, TaskStatus::Cancelled, "cancelled")
    }

    pub(super) fn end_early(
        &self,
        task_id: &str,
        status: TaskStatus,
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
        let (code, msg) = match status {
            TaskStatus::TimedOut => ("task_timeout", "the task ran past its timeout"),
            _ => ("task_cancelled", "the task was cancelled"),
        };
        self.finish(
            &mut core,
            task_id,
            status,
            None,
            Some(ErrorInfo::new(code, msg)),
        );
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
            let _ = self.end_early(id, TaskStatus::TimedOut, "timeout");
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
    /// has used all its attempts.
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
        let (attempt, max) = (t.attempt, t.spec.max_attempts);
        if counts && attempt >= max {
            let err = ErrorInfo::new(
                "node_lost",
                format!("node {from} was lost on attempt {attempt} of {max}: {reason}"),
            );
            self.finish(core, task_id, TaskStatus::Failed, None, Some(err));
            return;
        }
        self.shared.stats.migrations.fetch_add(1, Ordering::Relaxed);
        metrics::get().migrations.inc();
        let msg = if counts {
            format!(
                "node {from} was lost ({reason}); requeued for attempt {}",
                attempt + 1
            )
        } else {
            format!("node {from} handed the task back ({reason}); requeued")
        };
        let mut key = None;
        let events = &self.shared.events;
        core.store.update(task_id, &mut |t| {
            t.status = TaskStatus::Queued;
            t.updated_at = SystemTime::now();
            t.message = Some(msg.clone());
            push_event(t, EventKind::TaskMigrated, events, |e| {
                e.node_id = Some(from.to_owned());
                e.message = Some(msg.clone());
            });
            key = Some((
                t.spec.tool.clone(),
                QueueKey::new(t.spec.priority, t.seq),
                t.spec.pinned_node.clone(),
            ));
        });
        if let Some((tool, key, pinned)) = key {
            core.sched.enqueue(task_id, &tool, key, pinned.as_deref());
        }
    }

    /// Ends a non-terminal task: frees its node slot or queue place, records the outcome, wakes
    /// waiters. The caller schedules afterwards.
    pub(super) fn finish(
        &self,
        core: &mut Core,
        task_id: &str,
        status: TaskStatus,
        result: Option<Value>,
        error: Option<ErrorInfo>,
    ) {
        let Some(t) = core.store.get(task_id) else {
            return;
        };
        if t.status.is_terminal() {
            return;
        }
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
        if let Some(key) = core.deadline_of.remove(task_id) {
            core.deadlines.remove(&key);
        }
        let kind = match status {
            TaskStatus::Succeeded => EventKind::TaskCompleted,
            TaskStatus::Cancelled => EventKind::TaskCancelled,
            TaskStatus::TimedOut => EventKind::TaskTimedOut,
            _ => EventKind::TaskFailed,
        };
        let events = &self.shared.events;
        let mut result = result;
        let mut error = error;
        core.store.update(task_id, &mut |t| {
            let now = SystemTime::now();
            metrics::task_finished(&t.spec.tool, status.as_str(), t.started_at, now);
            t.status = status;
            t.updated_at = now;
            t.finished_at = Some(now);
            if status == TaskStatus::Succeeded {
                t.progress = 100.0;
            }
            t.result = result.take();
            t.error = error.take();
            t.message = t.error.as_ref().map(|e| e.message.clone());
            let err = t.error.clone();
            push_event(t, kind, events, |e| e.error = err);
        });
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
}

/// Checks that a result or progress report comes from the task's current node and attempt.
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

/// Appends an event to the task and publishes it.
pub(super) fn push_event(
    t: &mut Task,
    kind: EventKind,
    events: &broadcast::Sender<Arc<TaskEvent>>,
    fill: impl FnOnce(&mut TaskEvent),
) {
    let mut e = TaskEvent {
        kind,
        task_id: t.id.clone(),
        seq: t.events.len() as u32 + 1,
        attempt: t.attempt,
        node_id: t.node_id.clone(),
        status: t.status,
        progress: None,
        message: None,
        error: None,
        timestamp: SystemTime::now(),
    };
    fill(&mut e);
    if events.receiver_count() > 0 {
        let _ = events.send(Arc::new(e.clone()));
    }
    t.events.push(e);
}
