//! Error codes carried in `ErrorInfo.code` on the node channel (`task_result.error`,
//! `task_cancel` outcomes, `error` frames, LLM answers) that both the hub and nodes read or
//! write. One definition, so the two sides cannot drift apart; the HTTP API shows the same
//! codes in a task's `error.code`.

/// The tool ran past the budget it was given (`task_assign.timeout`), or the hub's deadline
/// for the task passed. A task ending with it is `timed_out`.
pub const TASK_TIMEOUT: &str = "task_timeout";
/// The task was cancelled (by a user, or by the node on the hub's `task_cancel`). A task
/// ending with it is `cancelled`.
pub const TASK_CANCELLED: &str = "task_cancelled";
/// The tool failed (its own error, or a node failure without a more specific code).
pub const TASK_EXECUTION_FAILED: &str = "task_execution_failed";
/// The tool's arguments do not match its schema.
pub const INVALID_ARGUMENTS: &str = "invalid_arguments";
/// A draining node handed the task back unrun; the hub requeues it without using up an
/// attempt.
pub const NODE_DRAINING: &str = "node_draining";
/// The task's node was lost on its last attempt (`max_attempts`).
pub const NODE_LOST: &str = "node_lost";
/// The task was pinned to a node an operator removed.
pub const NODE_REMOVED: &str = "node_removed";
/// A frame that needs a registered node arrived before `node_register` / `register_tools`.
pub const NOT_REGISTERED: &str = "not_registered";
/// No model can serve a node's `llm_request` (none configured, or not found).
pub const LLM_UNAVAILABLE: &str = "llm_unavailable";
/// A node's `llm_request` failed (bad request or upstream error).
pub const LLM_REQUEST_FAILED: &str = "llm_request_failed";
/// A node-hosted chat call (`llm.chat@<model>` task) whose caller is gone: the HTTP stream
/// that asked for it died with the hub process before a restart, so nobody can read its
/// output. The restarted hub ends such a task `failed` with this code instead of running it
/// again, and sends its node `task_cancel` with this reason.
pub const CALLER_GONE: &str = "caller_gone";
/// A `node_register` named a node id that a live connection already holds (two processes
/// sharing one stored id). The registration is refused (`node_registered {success: false}`)
/// and frames that need a registered node get an `error` frame with this code, until that
/// other connection is lost and this one takes the id over.
pub const NODE_ID_IN_USE: &str = "node_id_in_use";
