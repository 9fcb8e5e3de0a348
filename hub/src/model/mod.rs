//! The task model: states, the task record, its events, and their HTTP shapes.
//!
//! HTTP bodies use snake_case field names as the seed APIs do (`task_id`, `created_at`, ...);
//! timestamps are RFC 3339 strings in UTC with millisecond precision.

pub mod lifecycle;
pub mod node;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apex_protocol::ErrorInfo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use lifecycle::{Loss, Outcome, TransitionError};
pub use node::{Dialect, NodeState, NodeView};

/// Task id: a UUID v4 in its hyphenated string form.
pub type TaskId = String;

/// Where a task is in its life. `queued → assigned → running → succeeded | failed | cancelled |
/// timed_out`; a node loss sends `assigned`/`running` back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Stored, waiting for an eligible node.
    Queued,
    /// Sent to a node.
    Assigned,
    /// The node reported progress.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error (from the node, or `node_lost` after the last attempt).
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// Ran past its `timeout_seconds`.
    TimedOut,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Assigned,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    /// Whether no further transition can happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::TimedOut
        )
    }

    /// The snake_case name used in HTTP bodies and query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Position in [`TaskStatus::ALL`], for counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Lifecycle event kinds, as named on SSE streams and the log channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The task was accepted.
    TaskCreated,
    /// The task was sent to a node.
    TaskAssigned,
    /// The node reported progress.
    TaskProgress,
    /// The task's node was lost; the task went back to the queue.
    TaskMigrated,
    /// Terminal: succeeded.
    TaskCompleted,
    /// Terminal: failed.
    TaskFailed,
    /// Terminal: cancelled.
    TaskCancelled,
    /// Terminal: timed out.
    TaskTimedOut,
}

impl EventKind {
    /// The snake_case name (the SSE `event:` field).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskCreated => "task_created",
            EventKind::TaskAssigned => "task_assigned",
            EventKind::TaskProgress => "task_progress",
            EventKind::TaskMigrated => "task_migrated",
            EventKind::TaskCompleted => "task_completed",
            EventKind::TaskFailed => "task_failed",
            EventKind::TaskCancelled => "task_cancelled",
            EventKind::TaskTimedOut => "task_timed_out",
        }
    }

    /// Whether this event ends the task's stream.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::TaskCompleted
                | EventKind::TaskFailed
                | EventKind::TaskCancelled
                | EventKind::TaskTimedOut
        )
    }
}

/// One lifecycle event of a task: `{type, task_id, seq, attempt, node_id, status, timestamp, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Event kind (`task_created`, ...).
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The task.
    pub task_id: TaskId,
    /// Position in the task's event list, from 1.
    pub seq: u32,
    /// Attempt the event belongs to (0 before the first assignment).
    pub attempt: u32,
    /// Node involved, if any (for `task_migrated`, the node that was lost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Task status after the event.
    pub status: TaskStatus,
    /// Progress percent, for `task_progress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Human-readable detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Error, for failure events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// When it happened, RFC 3339.
    #[serde(with = "rfc3339")]
    pub timestamp: SystemTime,
}

/// What a client asked for: the immutable part of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Tool to run.
    pub tool: String,
    /// Tool arguments (a JSON object).
    pub args: Value,
    /// Free text.
    pub description: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Budget from submission to result, in seconds.
    pub timeout_seconds: f64,
    /// Assignments allowed before a node loss fails the task with `node_lost`.
    pub max_attempts: u32,
    /// Client-chosen key that makes submission idempotent.
    pub idempotency_key: Option<String>,
    /// Run only on this node.
    pub pinned_node: Option<String>,
    /// Capability asked for (passed to the node).
    pub capability: Option<String>,
    /// Who submitted it ([`crate::principal::Principal::owner`]: `user:<id>`, `key:<id>` or
    /// `admin`); `None` for tasks stored before owners were recorded and for the hub's own
    /// tasks (visible to admins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl TaskSpec {
    /// The key of the idempotency index: the client's key scoped to its owner
    /// (`<owner>\u{1f}<key>`), so two owners using the same key get two tasks and neither
    /// learns of the other's. `None` without a key.
    pub fn idempotency_index(&self) -> Option<std::borrow::Cow<'_, str>> {
        let key = self.idempotency_key.as_deref()?;
        Some(match &self.owner {
            Some(o) => std::borrow::Cow::Owned(format!("{o}\u{1f}{key}")),
            None => std::borrow::Cow::Borrowed(key),
        })
    }
}

/// A task: its spec and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub id: TaskId,
    /// Order of acceptance (ties in priority go to the older task).
    pub seq: u64,
    /// What was asked.
    pub spec: TaskSpec,
    /// Current state.
    pub status: TaskStatus,
    /// Assignments so far (0 while first queued).
    pub attempt: u32,
    /// Node of the current or last attempt.
    pub node_id: Option<String>,
    /// Last reported progress percent.
    pub progress: f64,
    /// Tool output, on success.
    pub result: Option<Value>,
    /// Error, on failure.
    pub error: Option<ErrorInfo>,
    /// Last status message.
    pub message: Option<String>,
    /// Acceptance time.
    pub created_at: SystemTime,
    /// Last change.
    pub updated_at: SystemTime,
    /// First assignment.
    pub started_at: Option<SystemTime>,
    /// Terminal transition.
    pub finished_at: Option<SystemTime>,
    /// Lifecycle events, oldest first.
    pub events: Vec<TaskEvent>,
}

impl Task {
    /// The HTTP view of the task (no event list).
    pub fn view(&self) -> TaskView<'_> {
        TaskView {
            task_id: &self.id,
            status: self.status,
            tool: &self.spec.tool,
            args: &self.spec.args,
            description: self.spec.description.as_deref(),
            priority: self.spec.priority,
            progress: self.progress,
            result: self.result.as_ref(),
            error: self.error.as_ref(),
            attempt: self.attempt,
            max_attempts: self.spec.max_attempts,
            node_id: self.node_id.as_deref(),
            pinned_node_id: self.spec.pinned_node.as_deref(),
            capability: self.spec.capability.as_deref(),
            idempotency_key: self.spec.idempotency_key.as_deref(),
            owner: self.spec.owner.as_deref(),
            timeout_seconds: self.spec.timeout_seconds,
            created_at: Rfc3339(self.created_at),
            updated_at: Rfc3339(self.updated_at),
            started_at: self.started_at.map(Rfc3339),
            finished_at: self.finished_at.map(Rfc3339),
            message: self.message.as_deref(),
        }
    }
}

/// The task object of the HTTP API (`POST/GET /api/v1/tasks...`; OpenAPI schema `Task`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Task)]
pub struct TaskView<'a> {
    /// Task id.
    pub task_id: &'a str,
    /// `queued`, `assigned`, `running`, `succeeded`, `failed`, `cancelled`, `timed_out`.
    pub status: TaskStatus,
    /// Tool.
    pub tool: &'a str,
    /// Arguments.
    #[schema(value_type = Object)]
    pub args: &'a Value,
    /// Free text.
    pub description: Option<&'a str>,
    /// Priority.
    pub priority: i32,
    /// Percent done.
    pub progress: f64,
    /// Tool output (any JSON).
    #[schema(value_type = Option<Object>)]
    pub result: Option<&'a Value>,
    /// `{code, message, details?}`.
    #[schema(value_type = Option<Object>)]
    pub error: Option<&'a ErrorInfo>,
    /// Assignments so far.
    pub attempt: u32,
    /// Assignment limit.
    pub max_attempts: u32,
    /// Node of the current or last attempt.
    pub node_id: Option<&'a str>,
    /// Node the task is pinned to.
    pub pinned_node_id: Option<&'a str>,
    /// Capability asked for.
    pub capability: Option<&'a str>,
    /// Idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// Who submitted it (`user:<id>`, `key:<id>`, `admin`); absent for the hub's own tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<&'a str>,
    /// Budget in seconds.
    pub timeout_seconds: f64,
    /// RFC 3339.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Rfc3339,
    /// RFC 3339.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Rfc3339,
    /// RFC 3339, first assignment.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Rfc3339>,
    /// RFC 3339, terminal transition.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Rfc3339>,
    /// Last status message.
    pub message: Option<&'a str>,
}

/// A timestamp that serializes as RFC 3339 with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

/// Milliseconds since the epoch of a `SystemTime` (0 before the epoch).
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// Serde adapter: `SystemTime` as an RFC 3339 string.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as RFC 3339 with milliseconds.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    /// Parses RFC 3339.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}
