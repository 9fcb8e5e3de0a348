//! A task's transitions, as pure methods on [`Task`]: the only code that changes a task's
//! status, attempt, result or error, and the only code that builds a [`TaskEvent`].
//!
//! ```text
//! accept ──▶ queued ──assign──▶ assigned ──progress──▶ running
//!              ▲                    │                      │
//!              └──────requeue───────┴──────────────────────┤  (node lost: attempt + 1 next
//!                                                          │   time, or failed `node_lost`)
//!               finish / cancel / time_out (from any non-terminal state)
//!                                                          ▼
//!                              succeeded | failed | cancelled | timed_out
//! ```
//!
//! Rules kept here, once, for the engine and shared mode alike:
//! - a terminal state is final: every method on a terminal task returns
//!   [`TransitionError::Terminal`] and changes nothing;
//! - one event per change: each successful call appends exactly one event (numbered from 1 in
//!   `seq`) and returns it; a refused call appends none;
//! - `attempt` grows only at `assign`; `started_at` is the first assignment, `finished_at` the
//!   terminal transition.
//!
//! No I/O and no clock: every method takes `now`. Publishing the event (broadcast, store,
//! metrics) is the caller's business.

use std::time::SystemTime;

use apex_protocol::ErrorInfo;
use apex_protocol::codes;
use serde_json::Value;

use super::{EventKind, Task, TaskEvent, TaskId, TaskSpec, TaskStatus};

/// Why a transition was refused. The task is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The task has ended; terminal states are final.
    #[error("task is already {}", .0.as_str())]
    Terminal(TaskStatus),
    /// The transition does not start from the task's status (e.g. a result for a queued task).
    #[error("task is {}, so it cannot be {op}", .from.as_str())]
    NotFrom {
        /// The task's status.
        from: TaskStatus,
        /// What was attempted (`assigned`, `running`, `requeued`).
        op: &'static str,
    },
}

/// How a task ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `succeeded` with the tool's output.
    Succeeded(Value),
    /// `failed` with an error (from the node, or the hub's own: `node_removed`, `caller_gone`).
    Failed(ErrorInfo),
    /// `cancelled` (a user's cancel, or a node that cancelled on its own).
    Cancelled(ErrorInfo),
    /// `timed_out` (the hub's deadline, or a node enforcing the budget it was given).
    TimedOut(ErrorInfo),
}

impl Outcome {
    /// A user's cancel: `task_cancelled`, "the task was cancelled".
    pub fn cancelled() -> Self {
        Outcome::Cancelled(ErrorInfo::new(
            codes::TASK_CANCELLED,
            "the task was cancelled",
        ))
    }

    /// The hub's deadline: `task_timeout`, "the task ran past its timeout".
    pub fn timed_out() -> Self {
        Outcome::TimedOut(ErrorInfo::new(
            codes::TASK_TIMEOUT,
            "the task ran past its timeout",
        ))
    }

    /// A failure the node reported: `task_timeout` and `task_cancelled` end the task as
    /// `timed_out` and `cancelled`, any other code as `failed`.
    pub fn from_node_error(error: ErrorInfo) -> Self {
        match error.code.as_str() {
            codes::TASK_TIMEOUT => Outcome::TimedOut(error),
            codes::TASK_CANCELLED => Outcome::Cancelled(error),
            _ => Outcome::Failed(error),
        }
    }

    /// The terminal status this outcome leads to.
    pub fn status(&self) -> TaskStatus {
        match self {
            Outcome::Succeeded(_) => TaskStatus::Succeeded,
            Outcome::Failed(_) => TaskStatus::Failed,
            Outcome::Cancelled(_) => TaskStatus::Cancelled,
            Outcome::TimedOut(_) => TaskStatus::TimedOut,
        }
    }
}

/// Why a task leaves its node before finishing, for [`Task::requeue`].
#[derive(Debug, Clone, Copy)]
pub enum Loss<'a> {
    /// The node's connection was lost (closed, silent, overloaded, unregistered, removed):
    /// the attempt counts, so after `max_attempts` the task fails with `node_lost`.
    Node {
        /// The lost node.
        node: &'a str,
        /// What happened, for the message.
        reason: &'a str,
    },
    /// The node handed the task back unrun (draining): the attempt does not count.
    HandedBack {
        /// The node.
        node: &'a str,
        /// What it said, for the message.
        reason: &'a str,
    },
    /// The hub holding the task died (shared mode's reaper): counts like a node loss.
    Hub {
        /// The dead hub's id.
        hub: &'a str,
    },
}

impl Task {
    /// Accepts a task: status `queued`, attempt 0, created and updated `now`, with its
    /// `task_created` event (seq 1). `seq` orders acceptance (0 in shared mode, where the shared
    /// store keeps its own order and each hub numbers the tasks it adopts).
    pub fn accept(id: TaskId, seq: u64, spec: TaskSpec, now: SystemTime) -> Self {
        let mut task = Task {
            id,
            seq,
            spec,
            status: TaskStatus::Queued,
            attempt: 0,
            node_id: None,
            progress: 0.0,
            result: None,
            error: None,
            message: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            events: Vec::with_capacity(4),
        };
        task.record(EventKind::TaskCreated, now, None, None, None);
        task
    }

    /// `queued → assigned` on `node_id`: the next attempt (attempt + 1), `started_at` set at
    /// the first assignment. Event `task_assigned`.
    ///
    /// # Errors
    /// [`TransitionError::Terminal`], or `NotFrom` unless the task is queued.
    pub fn assign(
        &mut self,
        node_id: &str,
        now: SystemTime,
    ) -> Result<&TaskEvent, TransitionError> {
        self.check(&[TaskStatus::Queued], "assigned")?;
        self.status = TaskStatus::Assigned;
        self.attempt += 1;
        self.node_id = Some(node_id.to_owned());
        self.updated_at = now;
        self.started_at.get_or_insert(now);
        self.message = None;
        Ok(self.record(EventKind::TaskAssigned, now, None, None, None))
    }

    /// `assigned | running → running` with the node's progress (percent) and message: the
    /// first report starts the task. Event `task_progress`.
    ///
    /// # Errors
    /// [`TransitionError::Terminal`], or `NotFrom` unless the task is assigned or running.
    pub fn progress(
        &mut self,
        progress: f64,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<&TaskEvent, TransitionError> {
        self.check(&[TaskStatus::Assigned, TaskStatus::Running], "running")?;
        self.status = TaskStatus::Running;
        self.progress = progress;
        self.updated_at = now;
        if message.is_some() {
            self.message.clone_from(&message);
        }
        Ok(self.record(EventKind::TaskProgress, now, Some(progress), message, None))
    }

    /// Any non-terminal state → the outcome's terminal state, with its result or error;
    /// progress 100 on success. Event `task_completed`, `task_failed`, `task_cancelled` or
    /// `task_timed_out`.
    ///
    /// # Errors
    /// [`TransitionError::Terminal`].
    pub fn finish(
        &mut self,
        outcome: Outcome,
        now: SystemTime,
    ) -> Result<&TaskEvent, TransitionError> {
        self.check(
            &[
                TaskStatus::Queued,
                TaskStatus::Assigned,
                TaskStatus::Running,
            ],
            "finished",
        )?;
        let status = outcome.status();
        let (result, error) = match outcome {
            Outcome::Succeeded(v) => (Some(v), None),
            Outcome::Failed(e) | Outcome::Cancelled(e) | Outcome::TimedOut(e) => (None, Some(e)),
        };
        self.status = status;
        self.updated_at = now;
        self.finished_at = Some(now);
        if status == TaskStatus::Succeeded {
            self.progress = 100.0;
        }
        self.result = result;
        self.message = error.as_ref().map(|e| e.message.clone());
        self.error = error.clone();
        let kind = match status {
            TaskStatus::Succeeded => EventKind::TaskCompleted,
            TaskStatus::Cancelled => EventKind::TaskCancelled,
            TaskStatus::TimedOut => EventKind::TaskTimedOut,
            _ => EventKind::TaskFailed,
        };
        Ok(self.record(kind, now, None, None, error))
    }

    /// A user's cancel: [`Task::finish`] with [`Outcome::cancelled`].
    ///
    /// # Errors
    /// [`TransitionError::Terminal`].
    pub fn cancel(&mut self, now: SystemTime) -> Result<&TaskEvent, TransitionError> {
        self.finish(Outcome::cancelled(), now)
    }

    /// The deadline passed: [`Task::finish`] with [`Outcome::timed_out`].
    ///
    /// # Errors
    /// [`TransitionError::Terminal`].
    pub fn time_out(&mut self, now: SystemTime) -> Result<&TaskEvent, TransitionError> {
        self.finish(Outcome::timed_out(), now)
    }

    /// `assigned | running →` back to `queued` after `loss` (event `task_migrated` naming the
    /// node; the next `assign` is attempt + 1), or, when the loss counts and the task has used
    /// all its `max_attempts`, `failed` with `node_lost` (event `task_failed`). The caller
    /// tells which by the task's status afterwards.
    ///
    /// # Errors
    /// [`TransitionError::Terminal`], or `NotFrom` unless the task is assigned or running.
    pub fn requeue(
        &mut self,
        loss: Loss<'_>,
        now: SystemTime,
    ) -> Result<&TaskEvent, TransitionError> {
        self.check(&[TaskStatus::Assigned, TaskStatus::Running], "requeued")?;
        let (attempt, max) = (self.attempt, self.spec.max_attempts);
        let from = self.node_id.clone().unwrap_or_default();
        let (counts, cause) = match loss {
            Loss::Node { node, reason } => (true, format!("node {node} was lost ({reason})")),
            Loss::HandedBack { node, reason } => (
                false,
                format!("node {node} handed the task back ({reason})"),
            ),
            Loss::Hub { hub } => (true, format!("hub {hub} (holding node {from}) was lost")),
        };
        if counts && attempt >= max {
            let error = ErrorInfo::new(
                codes::NODE_LOST,
                format!("{cause} on attempt {attempt} of {max}"),
            );
            return self.finish(Outcome::Failed(error), now);
        }
        let message = if counts {
            format!("{cause}; requeued for attempt {}", attempt + 1)
        } else {
            format!("{cause}; requeued")
        };
        self.status = TaskStatus::Queued;
        self.updated_at = now;
        self.message = Some(message.clone());
        // The event names the node the task left.
        let node = Some(from).filter(|n| !n.is_empty());
        let ev = self.record(EventKind::TaskMigrated, now, None, Some(message), None);
        ev.node_id = node;
        Ok(ev)
    }

    /// Refuses a transition from a terminal state or from a status not in `from`.
    fn check(&self, from: &[TaskStatus], op: &'static str) -> Result<(), TransitionError> {
        if self.status.is_terminal() {
            return Err(TransitionError::Terminal(self.status));
        }
        if !from.contains(&self.status) {
            return Err(TransitionError::NotFrom {
                from: self.status,
                op,
            });
        }
        Ok(())
    }

    /// Appends the event of the change just made (numbered after the last one, with the
    /// task's attempt, node and new status) and returns it.
    fn record(
        &mut self,
        kind: EventKind,
        now: SystemTime,
        progress: Option<f64>,
        message: Option<String>,
        error: Option<ErrorInfo>,
    ) -> &mut TaskEvent {
        let seq = u32::try_from(self.events.len() + 1).unwrap_or(u32::MAX);
        self.events.push(TaskEvent {
            kind,
            task_id: self.id.clone(),
            seq,
            attempt: self.attempt,
            node_id: self.node_id.clone(),
            status: self.status,
            progress,
            message,
            error,
            timestamp: now,
        });
        let last = self.events.len() - 1;
        &mut self.events[last]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(max_attempts: u32) -> TaskSpec {
        TaskSpec {
            tool: "echo".into(),
            args: serde_json::json!({}),
            description: None,
            priority: 5,
            timeout_seconds: 30.0,
            max_attempts,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            owner: None,
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn kinds(t: &Task) -> Vec<EventKind> {
        t.events.iter().map(|e| e.kind).collect()
    }

    /// Every event is numbered 1, 2, 3... and carries the status it led to.
    fn assert_numbered(t: &Task) {
        for (i, e) in t.events.iter().enumerate() {
            assert_eq!(e.seq as usize, i + 1);
            assert_eq!(e.task_id, t.id);
        }
        assert_eq!(t.events.last().unwrap().status, t.status);
    }

    #[test]
    fn a_task_runs_from_acceptance_to_success_with_one_event_per_change() {
        let now = t0();
        let mut t = Task::accept("t1".into(), 7, spec(3), now);
        assert_eq!((t.status, t.attempt, t.seq), (TaskStatus::Queued, 0, 7));
        assert_eq!(t.assign("n1", now).unwrap().attempt, 1);
        assert_eq!(t.started_at, Some(now));
        let later = now + Duration::from_secs(1);
        let e = t.progress(40.0, Some("half".into()), later).unwrap();
        assert_eq!((e.status, e.progress), (TaskStatus::Running, Some(40.0)));
        t.progress(60.0, None, later).unwrap();
        assert_eq!(t.message.as_deref(), Some("half"));
        let e = t
            .finish(Outcome::Succeeded(serde_json::json!(1)), later)
            .unwrap();
        assert_eq!(
            (e.kind, e.node_id.as_deref()),
            (EventKind::TaskCompleted, Some("n1"))
        );
        assert_eq!((t.progress, t.finished_at), (100.0, Some(later)));
        assert_eq!(
            t.started_at,
            Some(now),
            "started_at is the first assignment"
        );
        assert_eq!(
            kinds(&t),
            [
                EventKind::TaskCreated,
                EventKind::TaskAssigned,
                EventKind::TaskProgress,
                EventKind::TaskProgress,
                EventKind::TaskCompleted
            ]
        );
        assert_numbered(&t);
    }

    #[test]
    fn a_terminal_state_is_final() {
        let now = t0();
        for end in [
            Outcome::Succeeded(Value::Null),
            Outcome::Failed(ErrorInfo::new("x", "y")),
            Outcome::cancelled(),
            Outcome::timed_out(),
        ] {
            let mut t = Task::accept("t".into(), 1, spec(3), now);
            t.assign("n", now).unwrap();
            let status = end.status();
            t.finish(end, now).unwrap();
            let before = t.clone();
            let refused = [
                t.assign("n", now).map(|_| ()),
                t.progress(1.0, None, now).map(|_| ()),
                t.cancel(now).map(|_| ()),
                t.time_out(now).map(|_| ()),
                t.finish(Outcome::Succeeded(Value::Null), now).map(|_| ()),
                t.requeue(
                    Loss::Node {
                        node: "n",
                        reason: "r",
                    },
                    now,
                )
                .map(|_| ()),
            ];
            for r in refused {
                assert_eq!(r, Err(TransitionError::Terminal(status)));
            }
            assert_eq!(t, before, "a refused transition changes nothing");
        }
    }

    #[test]
    fn transitions_from_the_wrong_state_are_refused_without_an_event() {
        let now = t0();
        let mut t = Task::accept("t".into(), 1, spec(3), now);
        assert!(matches!(
            t.progress(5.0, None, now),
            Err(TransitionError::NotFrom {
                from: TaskStatus::Queued,
                ..
            })
        ));
        assert!(
            t.requeue(
                Loss::Node {
                    node: "n",
                    reason: "r"
                },
                now
            )
            .is_err()
        );
        t.assign("n", now).unwrap();
        assert!(matches!(
            t.assign("m", now),
            Err(TransitionError::NotFrom {
                from: TaskStatus::Assigned,
                ..
            })
        ));
        assert_eq!(t.events.len(), 2);
        assert_eq!(t.node_id.as_deref(), Some("n"));
    }

    #[test]
    fn a_lost_node_requeues_until_the_last_attempt_then_fails_node_lost() {
        let now = t0();
        let mut t = Task::accept("t".into(), 1, spec(2), now);
        t.assign("a", now).unwrap();
        let e = t
            .requeue(
                Loss::Node {
                    node: "a",
                    reason: "connection closed",
                },
                now,
            )
            .unwrap();
        assert_eq!(e.kind, EventKind::TaskMigrated);
        assert_eq!((e.node_id.as_deref(), e.attempt), (Some("a"), 1));
        assert!(
            e.message
                .as_deref()
                .unwrap()
                .contains("requeued for attempt 2")
        );
        assert_eq!(t.status, TaskStatus::Queued);
        t.assign("b", now).unwrap();
        assert_eq!(t.attempt, 2);
        let e = t
            .requeue(
                Loss::Node {
                    node: "b",
                    reason: "silent",
                },
                now,
            )
            .unwrap();
        assert_eq!(e.kind, EventKind::TaskFailed);
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.error.as_ref().unwrap().code, codes::NODE_LOST);
        assert!(t.error.as_ref().unwrap().message.contains("attempt 2 of 2"));
        assert_numbered(&t);
    }

    #[test]
    fn a_task_handed_back_unrun_does_not_use_up_an_attempt() {
        let now = t0();
        let mut t = Task::accept("t".into(), 1, spec(1), now);
        t.assign("a", now).unwrap();
        let e = t
            .requeue(
                Loss::HandedBack {
                    node: "a",
                    reason: "the node is draining",
                },
                now,
            )
            .unwrap();
        assert_eq!(e.kind, EventKind::TaskMigrated);
        assert_eq!(
            t.status,
            TaskStatus::Queued,
            "not failed although max_attempts is 1"
        );
    }

    #[test]
    fn a_dead_hub_counts_like_a_lost_node() {
        let now = t0();
        let mut t = Task::accept("t".into(), 0, spec(1), now);
        t.assign("n", now).unwrap();
        t.requeue(Loss::Hub { hub: "hub-a" }, now).unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        let msg = &t.error.as_ref().unwrap().message;
        assert!(msg.contains("hub hub-a") && msg.contains("node n"), "{msg}");
    }

    #[test]
    fn node_errors_map_to_their_terminal_states() {
        let now = t0();
        for (code, status) in [
            (codes::TASK_TIMEOUT, TaskStatus::TimedOut),
            (codes::TASK_CANCELLED, TaskStatus::Cancelled),
            ("tool_error", TaskStatus::Failed),
        ] {
            let mut t = Task::accept("t".into(), 1, spec(1), now);
            t.assign("n", now).unwrap();
            t.finish(Outcome::from_node_error(ErrorInfo::new(code, "m")), now)
                .unwrap();
            assert_eq!(t.status, status);
            assert_eq!(t.error.as_ref().unwrap().code, code);
            assert_eq!(t.message.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_queued_task_can_be_cancelled_or_timed_out() {
        let now = t0();
        let mut t = Task::accept("t".into(), 1, spec(1), now);
        let e = t.cancel(now).unwrap();
        assert_eq!((e.kind, e.attempt), (EventKind::TaskCancelled, 0));
        assert_eq!(t.error.as_ref().unwrap().code, codes::TASK_CANCELLED);
        let mut t = Task::accept("u".into(), 2, spec(1), now);
        t.time_out(now).unwrap();
        assert_eq!(t.status, TaskStatus::TimedOut);
        assert_eq!(t.error.as_ref().unwrap().code, codes::TASK_TIMEOUT);
    }
}
