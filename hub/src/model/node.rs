//! Node state as the hub shows it: dialect, online/draining/offline, and the `/v1/nodes`
//! object. Beside the task model so that the engine, the events and the metrics all read
//! one definition.

use apex_protocol::{NodeStats, NodeType, ToolSpec};
use serde::Serialize;

use super::Rfc3339;

/// Which dialect a node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// `node_register` / `task_assign` / `task_result`.
    Native,
    /// `register_tools` / `execute_tool` / `tool_result`.
    Vcp,
}

/// Node state as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Connected and taking work.
    Online,
    /// Connected, finishing its work, taking no new work.
    Draining,
    /// Not connected.
    Offline,
}

impl NodeState {
    /// The snake_case name used on the wire and in HTTP bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Draining => "draining",
            NodeState::Offline => "offline",
        }
    }
}

/// A node as shown by `GET /v1/nodes` (OpenAPI schema `Node`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Node)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `worker`, `companion` or `custom`.
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "worker")]
    pub node_type: NodeType,
    /// `native` or `vcp`.
    pub dialect: Dialect,
    /// `online`, `draining` or `offline`.
    pub status: NodeState,
    /// Tool names.
    pub tools: Vec<String>,
    /// Tool descriptions with argument schemas, where the node sent them.
    #[schema(value_type = Vec<Object>)]
    pub tool_specs: Vec<ToolSpec>,
    /// Language models the node hosts (served by its `llm.chat` tool).
    pub models: Vec<String>,
    /// Concurrency limit.
    pub max_concurrent_tasks: u32,
    /// Tasks assigned and not finished.
    pub active_tasks: usize,
    /// `active_tasks / max_concurrent_tasks`, 0 to 1.
    pub load: f64,
    /// Tasks this hub committed from the node: succeeded.
    pub completed_tasks: u64,
    /// Tasks this hub committed from the node: failed.
    pub failed_tasks: u64,
    /// Node software version.
    pub version: Option<String>,
    /// Last self-reported counters (heartbeat), with snake_case keys in HTTP bodies
    /// (`active_tasks`, `cpu_usage`, ...; the node sends them camelCase).
    #[serde(serialize_with = "snake_case_stats")]
    #[schema(value_type = Option<Object>)]
    pub stats: Option<NodeStats>,
    /// VCP `report_ip` addresses.
    pub local_ips: Vec<String>,
    /// VCP `report_ip` public address.
    pub public_ip: Option<String>,
    /// Peer address of the connection.
    pub remote_addr: Option<String>,
    /// Last `heartbeat` frame.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_heartbeat_at: Option<Rfc3339>,
    /// Last frame or pong of any kind.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen_at: Option<Rfc3339>,
    /// Start of the current (or last) connection.
    #[schema(value_type = String, format = DateTime)]
    pub connected_at: Rfc3339,
    /// When the node went offline.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disconnected_at: Option<Rfc3339>,
}

/// Serializes [`NodeStats`] with snake_case keys: the node channel's camelCase counters as an
/// HTTP body field.
pub(crate) fn snake_case_stats<S: serde::Serializer>(
    stats: &Option<NodeStats>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    let Some(stats) = stats else {
        return ser.serialize_none();
    };
    let value = serde_json::to_value(stats).map_err(serde::ser::Error::custom)?;
    let snake: serde_json::Map<String, serde_json::Value> = match value {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let mut out = String::with_capacity(k.len() + 4);
                for ch in k.chars() {
                    if ch.is_ascii_uppercase() {
                        out.push('_');
                        out.push(ch.to_ascii_lowercase());
                    } else {
                        out.push(ch);
                    }
                }
                (out, v)
            })
            .collect(),
        _ => serde_json::Map::new(),
    };
    snake.serialize(ser)
}
