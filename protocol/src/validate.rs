//! Checks on decoded node frames that serde cannot express: non-empty ids, bounded lengths and
//! counts. A frame that fails validation is answered with an `error` frame (`invalid_payload`)
//! and otherwise ignored.

use crate::NodeMessage;

/// Bounds applied to node frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest id (node, task, request), in bytes.
    pub max_id_len: usize,
    /// Longest node or tool name, in bytes.
    pub max_name_len: usize,
    /// Most tools one node may declare.
    pub max_tools: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_id_len: 256,
            max_name_len: 256,
            max_tools: 4096,
        }
    }
}

/// What made a frame invalid; the text goes into `error.message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{kind}` payload: {reason}")]
pub struct ValidationError {
    /// The frame's `type`.
    pub kind: &'static str,
    /// What was wrong.
    pub reason: String,
}

fn check_id(
    kind: &'static str,
    field: &str,
    v: &str,
    limits: &Limits,
) -> Result<(), ValidationError> {
    if v.is_empty() {
        return Err(ValidationError {
            kind,
            reason: format!("`{field}` must not be empty"),
        });
    }
    check_len(kind, field, v, limits.max_id_len)
}

fn check_len(kind: &'static str, field: &str, v: &str, max: usize) -> Result<(), ValidationError> {
    if v.len() > max {
        return Err(ValidationError {
            kind,
            reason: format!("`{field}` is longer than {max} bytes"),
        });
    }
    Ok(())
}

impl NodeMessage {
    /// Checks ids, names and counts against `limits`.
    ///
    /// # Errors
    /// [`ValidationError`] naming the field at fault.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        let kind = self.type_name();
        match self {
            NodeMessage::NodeRegister(r) => {
                if let Some(id) = &r.node_id {
                    check_id(kind, "nodeId", id, limits)?;
                }
                check_len(kind, "name", &r.name, limits.max_name_len)?;
                if r.tools.len() + r.capabilities.len() > limits.max_tools {
                    return Err(ValidationError {
                        kind,
                        reason: format!("more than {} tools", limits.max_tools),
                    });
                }
                for t in &r.tools {
                    check_id(kind, "tools[].name", t.name(), limits)?;
                    check_len(kind, "tools[].name", t.name(), limits.max_name_len)?;
                }
                if r.models.len() > limits.max_tools {
                    return Err(ValidationError {
                        kind,
                        reason: format!("more than {} models", limits.max_tools),
                    });
                }
                for m in &r.models {
                    check_id(kind, "models[].id", m.id(), limits)?;
                }
                if r.concurrency_limit() == Some(0) {
                    return Err(ValidationError {
                        kind,
                        reason: "`maxConcurrentTasks` must be at least 1".to_owned(),
                    });
                }
                Ok(())
            }
            NodeMessage::TaskResult(r) => check_id(kind, "taskId", &r.task_id, limits),
            NodeMessage::TaskStream(s) => {
                check_id(kind, "taskId", &s.task_id, limits)?;
                if !s.chunk.is_object() {
                    return Err(ValidationError {
                        kind,
                        reason: "`chunk` must be a JSON object".to_owned(),
                    });
                }
                Ok(())
            }
            NodeMessage::TaskProgress(p) => {
                check_id(kind, "taskId", &p.task_id, limits)?;
                if !(0.0..=100.0).contains(&p.progress) {
                    return Err(ValidationError {
                        kind,
                        reason: "`progress` must be between 0 and 100".to_owned(),
                    });
                }
                Ok(())
            }
            NodeMessage::RegisterTools(r) => {
                check_id(kind, "serverName", &r.server_name, limits)?;
                if r.tools.len() > limits.max_tools {
                    return Err(ValidationError {
                        kind,
                        reason: format!("more than {} tools", limits.max_tools),
                    });
                }
                for t in &r.tools {
                    check_id(kind, "tools[].name", &t.name, limits)?;
                    check_len(kind, "tools[].name", &t.name, limits.max_name_len)?;
                }
                Ok(())
            }
            NodeMessage::ToolResult(r) => check_id(kind, "requestId", &r.request_id, limits),
            NodeMessage::LlmRequest(r) => check_id(kind, "requestId", &r.request_id, limits),
            NodeMessage::Heartbeat(_)
            | NodeMessage::NodeUnregister(_)
            | NodeMessage::NodeDrain(_)
            | NodeMessage::Log(_)
            | NodeMessage::ReportIp(_)
            | NodeMessage::UpdateStaticPlaceholders(_)
            | NodeMessage::PluginCallbackForward(_) => Ok(()),
        }
    }
}
