//! Acceptance and dispatch: `submit` (all or none), placement through the scheduler, and the
//! assignment frames of both dialects.

use super::*;

impl Cluster {
    /// Accepts new tasks (all or none) and dispatches them. Returns each task and whether it was
    /// created now (false: an existing task with the same idempotency key).
    pub fn submit(&self, specs: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>, SubmitError> {
        for s in &specs {
            if s.tool == INTERNAL_REQUEST_FILE && !self.shared.opts.allow_internal_request_file {
                return Err(SubmitError::ForbiddenTool(s.tool.clone()));
            }
        }
        let mut core = self.shared.core.lock();
        for s in &specs {
            if let Some(n) = &s.pinned_node {
                let Some(e) = core.nodes.get(n) else {
                    return Err(SubmitError::UnknownNode(n.clone()));
                };
                if !e.info.tools.contains(&s.tool) {
                    return Err(SubmitError::NodeLacksTool {
                        node: n.clone(),
                        tool: s.tool.clone(),
                    });
                }
            }
        }
        let mut accepted: Vec<(String, bool)> = Vec::with_capacity(specs.len());
        let traceparent = crate::telemetry::current_traceparent();
        let now_i = Instant::now();
        for spec in specs {
            if let Some(key) = spec.idempotency_index()
                && let Some(id) = core.store.find_by_idempotency_key(&key)
            {
                accepted.push((id, false));
                continue;
            }
            let seq = core.next_seq;
            core.next_seq += 1;
            let now = SystemTime::now();
            let id = uuid::Uuid::new_v4().to_string();
            // Validated against max_task_timeout_seconds; saturate rather than panic.
            let deadline = Duration::try_from_secs_f64(spec.timeout_seconds)
                .ok()
                .and_then(|d| now_i.checked_add(d))
                .unwrap_or(now_i + Duration::from_secs(10 * 365 * 86_400));
            let task = Task::accept(id.clone(), seq, spec, now);
            if self.shared.events.receiver_count() > 0
                && let Some(created) = task.events.first()
            {
                let _ = self.shared.events.send(Arc::new(created.clone()));
            }
            core.sched.enqueue(
                &id,
                &task.spec.tool,
                QueueKey::new(task.spec.priority, seq),
                task.spec.pinned_node.as_deref(),
            );
            core.deadlines.insert((deadline, seq), id.clone());
            core.deadline_of.insert(id.clone(), (deadline, seq));
            if let Some(tp) = &traceparent {
                core.trace_parents.insert(id.clone(), tp.clone());
            }
            accepted.push((id, true));
            core.store.insert(task);
            metrics::get().tasks_submitted.inc();
        }
        self.schedule(&mut core);
        // The state after dispatch (a task may already be assigned).
        Ok(accepted
            .into_iter()
            .filter_map(|(id, created)| core.store.get(&id).map(|t| (t.clone(), created)))
            .collect())
    }

    /// Places queued tasks on nodes and sends the frames.
    pub(super) fn schedule(&self, core: &mut Core) {
        if core.sched.queued() == 0 {
            return;
        }
        let mut lost = Vec::new();
        for a in core.sched.assign(usize::MAX) {
            let node_id = a.node_id.clone();
            let dialect = core
                .nodes
                .get(&node_id)
                .map_or(Dialect::Native, |e| e.info.dialect);
            let now = SystemTime::now();
            // Queued since submission or the last migration.
            if let Some(queued_since) = core.store.get(&a.task_id).map(|t| t.updated_at) {
                metrics::task_dispatched(queued_since, now);
            }
            self.transition(core, &a.task_id, |t| t.assign(&node_id, now));
            let frame = core
                .store
                .get(&a.task_id)
                .map(|t| self.assign_frame(core, t, &node_id, dialect));
            let Some(e) = core.nodes.get_mut(&node_id) else {
                continue;
            };
            e.inflight.insert(a.task_id.clone());
            let sent = match (&e.conn, frame) {
                // With a durable store the frame waits for the `assigned` write (recovery.rs).
                (Some(c), Some(f)) => self.send_assignment(c, &node_id, f),
                _ => false,
            };
            if !sent {
                // The node cannot take frames (queue full or gone): treat it as lost so the
                // task moves on instead of waiting for a frame that was never sent.
                if let Some(c) = &e.conn {
                    c.kill.notify_one();
                }
                lost.push(node_id);
            }
        }
        if !lost.is_empty() {
            for node_id in lost {
                self.lose_node_locked(core, &node_id, "outbound queue full or closed");
            }
            // Each round removes at least one node, so this ends.
            self.schedule(core);
        }
    }

    /// `task_assign.metadata`: the W3C `traceparent`, and the signed `callback` `{url,
    /// secret}` when the tool is an asynchronous plugin of that node.
    fn assign_metadata(&self, core: &Core, t: &Task, node_id: &str) -> Option<Value> {
        let mut m = serde_json::Map::new();
        if let Some(tp) = core.trace_parents.get(&t.id) {
            m.insert("traceparent".to_owned(), tp.clone().into());
        }
        if let Some(signer) = &self.shared.opts.callbacks
            && let Some(token_only) = core
                .nodes
                .get(node_id)
                .filter(|e| e.info.dialect == Dialect::Native)
                .and_then(|e| e.info.async_tools.get(&t.spec.tool))
        {
            m.insert(
                "callback".to_owned(),
                signer.callback(&t.spec.tool, &t.id, *token_only),
            );
        }
        (!m.is_empty()).then_some(Value::Object(m))
    }

    /// The frame that assigns task `t` to a node of `dialect`.
    pub(super) fn assign_frame(
        &self,
        core: &Core,
        t: &Task,
        node_id: &str,
        dialect: Dialect,
    ) -> HubMessage {
        match dialect {
            Dialect::Vcp => HubMessage::ExecuteTool(ExecuteTool {
                request_id: vcp_request_id(&t.id, t.attempt),
                tool_name: wire_tool(&t.spec.tool).to_owned(),
                tool_args: t.spec.args.clone(),
            }),
            Dialect::Native => {
                let now = Instant::now();
                let remaining_ms = core
                    .deadline_of
                    .get(&t.id)
                    .map(|(d, _)| d.saturating_duration_since(now).as_millis() as u64);
                let mut tool_args = t.spec.args.clone();
                if t.attempt > 1
                    && let Some(f) = core.resume.get(&t.id)
                    && let Some(resume) = f()
                    && let Value::Object(m) = &mut tool_args
                {
                    m.insert("resume".to_owned(), resume);
                }
                HubMessage::TaskAssign(TaskAssign {
                    task_id: t.id.clone(),
                    node_id: node_id.to_owned(),
                    tool_name: wire_tool(&t.spec.tool).to_owned(),
                    capability: t.spec.capability.clone(),
                    tool_args,
                    timeout: remaining_ms,
                    priority: Some(t.spec.priority),
                    attempt: Some(t.attempt),
                    metadata: self.assign_metadata(core, t, node_id),
                })
            }
        }
    }
}
