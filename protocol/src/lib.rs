//! The contract of the apex node channel: every frame a hub and a node exchange, and how frames
//! are encoded.
//!
//! Two dialects share one WebSocket channel (see `PROTOCOL.md` at the repository root):
//! - the **native** dialect (`node_register`, `heartbeat`, `task_assign`, `task_result`, ...),
//!   spoken by `apex-node` and by third-party worker/companion nodes; apex extends it with
//!   `attempt`, `task_progress`, `node_drain`, `inflight` and MessagePack encoding;
//! - the **VCP** tool-server dialect (`register_tools`, `execute_tool`, `tool_result`, ...).
//!
//! Every frame is an envelope `{"type": "<snake_case type>", "data": {...}}`. Field names inside
//! `data` are camelCase, exactly as the third-party clients send them.
//!
//! This crate has no async runtime and no HTTP dependency: it is pure data plus [`codec`].

pub mod codec;
pub mod codes;
pub mod messages;
pub mod validate;

pub use codec::{DecodeError, EncodeError, Encoding, Frame};
pub use messages::*;
pub use validate::{Limits, ValidationError};

/// Version of apex's native dialect, sent to nodes in `node_registered.hubInfo.protocolVersion`.
///
/// Bumped on any change a node could notice; additions of optional fields do not bump it.
pub const PROTOCOL_VERSION: &str = "1.0";

/// Milliseconds since the Unix epoch, the unit of every `timestamp` field on the wire.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
