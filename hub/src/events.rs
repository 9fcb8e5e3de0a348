//! Node lifecycle events: what the engine publishes when a node registers, is drained or
//! undrained, is lost or is removed. Every status change has its own event (`online` on
//! registration, `draining` / `online` on drain / undrain, `offline` when lost), and the
//! payload carries the resulting `status`. `GET /v1/events` and the log channel read them
//! (next to the task events of [`crate::model::TaskEvent`]).
//!
//! The engine sends them on a bounded `tokio::sync::broadcast` channel: publishing never blocks,
//! and a subscriber that falls behind sees `Lagged(n)` and skips `n` events.

use std::time::SystemTime;

use serde::Serialize;

use crate::model::{NodeState, NodeView};

/// What happened to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeEventKind {
    /// A node registered (first time, or again on a new connection).
    NodeRegistered,
    /// The node stopped taking new work (operator `drain` or the node's own `node_drain`).
    NodeDrained,
    /// A drained node takes work again.
    NodeUndrained,
    /// The connection closed or went silent, or the node unregistered: it is offline and its
    /// tasks migrated.
    NodeLost,
    /// The hub forgot the node (`DELETE /v1/nodes/{id}` or offline past
    /// `offline_node_retention_ms`).
    NodeRemoved,
}

impl NodeEventKind {
    /// The snake_case name (`node_registered`, ...), as in the `event` field of `/v1/events`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeEventKind::NodeRegistered => "node_registered",
            NodeEventKind::NodeDrained => "node_drained",
            NodeEventKind::NodeUndrained => "node_undrained",
            NodeEventKind::NodeLost => "node_lost",
            NodeEventKind::NodeRemoved => "node_removed",
        }
    }
}

/// One node event. Serialized as the `payload` of a `/v1/events` message:
/// `{node_id, status, reason?, node?}` (`node` is the node as `GET /v1/nodes/{id}` shows it,
/// absent once removed).
#[derive(Debug, Clone, Serialize)]
pub struct NodeEvent {
    /// Kind (not serialized in the payload; it is the message's `event`).
    #[serde(skip)]
    pub kind: NodeEventKind,
    /// The node.
    pub node_id: String,
    /// Status after the event (`offline` after `node_lost` and `node_removed`).
    pub status: NodeState,
    /// Why, where known (close reason, operator action).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node after the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeView>,
    /// When it happened.
    #[serde(skip)]
    pub timestamp: SystemTime,
}
