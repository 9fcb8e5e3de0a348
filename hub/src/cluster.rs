//! The cluster engine: node registry, task lifecycle, dispatch, fencing and migration.
//!
//! All state sits behind one mutex ([`Core`]) that is never held across an `.await`: each
//! operation takes the lock, changes state, hands frames to the nodes' bounded outbound queues
//! with `try_send`, and returns. Sessions (`ws` module) and HTTP handlers call the methods of
//! [`Cluster`], a cheap-to-clone handle.
//!
//! Invariants kept here:
//! - a task id is in exactly one of: the scheduler's queue, one node's `inflight` set, or a
//!   terminal state;
//! - a result is committed only from the node and attempt the task is assigned to, once;
//! - a node's in-flight tasks go back to the queue (attempt + 1 at next assignment) the moment
//!   its connection is lost, or fail with `node_lost` after `max_attempts` assignments.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use apex_protocol::{
    CancelTool, ConnectionAck, Encoding, ErrorInfo, ExecuteTool, HeartbeatAck, HubInfo, HubMessage,
    NodeRegister, NodeRegistered, NodeStats, NodeType, NodeUnregistered, RegisterTools, ReportIp,
    TaskAssign, TaskCancel, TaskProgress, TaskResult, TaskResultAck, ToolResult, ToolSpec, now_ms,
    parse_vcp_request_id, vcp_request_id,
};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use crate::model::{EventKind, Rfc3339, Task, TaskEvent, TaskSpec, TaskStatus};
use crate::scheduler::{QueueKey, Scheduler};
use crate::store::{Page, TaskFilter, TaskStore};

/// Name of the VCP built-in tool that returns any file of the node; never dispatched unless the
/// operator allows it.
pub const INTERNAL_REQUEST_FILE: &str = "internal_request_file";

/// Settings the engine needs (a subset of the hub config).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Hub version reported to nodes.
    pub version: String,
    /// How often sessions ping nodes.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is declared dead.
    pub heartbeat_timeout: Duration,
    /// Concurrency limit of native nodes that declare none.
    pub default_node_max_concurrent_tasks: u32,
    /// Concurrency limit of VCP nodes (they cannot declare one).
    pub vcp_max_concurrent_tasks: u32,
    /// Whether `internal_request_file` may be dispatched.
    pub allow_internal_request_file: bool,
    /// Capacity of each node's outbound frame queue.
    pub outbound_queue_frames: usize,
}

/// Something for a connection's writer to do, in order.
#[derive(Debug)]
pub enum Outbound {
    /// Encode and send a message.
    Msg(HubMessage),
    /// Encode every later message this way.
    SetEncoding(Encoding),
    /// Send a WebSocket ping.
    Ping,
    /// Send a close frame and stop.
    Close(u16, String),
}

/// The engine's handle on one WebSocket connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Unique per hub process.
    pub id: u64,
    /// The connection's outbound queue (bounded).
    pub tx: mpsc::Sender<Outbound>,
    /// Notified when the engine wants the connection closed (replaced or overloaded).
    pub kill: Arc<Notify>,
    /// Epoch ms of the last frame or pong received; written by the session without the lock.
    pub last_seen_ms: Arc<AtomicI64>,
    /// Peer address.
    pub remote_addr: String,
}

impl ConnHandle {
    /// Queues a frame. False if the queue is full or the connection gone.
    fn send(&self, msg: impl Into<HubMessage>) -> bool {
        self.tx.try_send(Outbound::Msg(msg.into())).is_ok()
    }
}

/// Which dialect a node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// `node_register` / `task_assign` / `task_result`.
    Native,
    /// `register_tools` / `execute_tool` / `tool_result`.
    Vcp,
}

/// Node state as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

struct NodeEntry {
    id: String,
    /// What the node declared at its last registration.
    info: NodeInfo,
    state: NodeState,
    conn: Option<ConnHandle>,
    inflight: HashSet<String>,
    ips: Option<ReportIp>,
    connected_at: SystemTime,
    last_heartbeat_at: Option<SystemTime>,
    disconnected_at: Option<SystemTime>,
    completed: u64,
    failed: u64,
}

/// A node as shown by `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `worker`, `companion` or `custom`.
    #[serde(rename = "type")]
    pub node_type: NodeType,
    /// `native` or `vcp`.
    pub dialect: Dialect,
    /// `online`, `draining` or `offline`.
    pub status: NodeState,
    /// Tool names.
    pub tools: Vec<String>,
    /// Tool descriptions with argument schemas, where the node sent them.
    pub tool_specs: Vec<ToolSpec>,
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
    /// Last self-reported counters (heartbeat).
    pub stats: Option<NodeStats>,
    /// VCP `report_ip` addresses.
    pub local_ips: Vec<String>,
    /// VCP `report_ip` public address.
    pub public_ip: Option<String>,
    /// Peer address of the connection.
    pub remote_addr: Option<String>,
    /// Last `heartbeat` frame.
    pub last_heartbeat_at: Option<Rfc3339>,
    /// Last frame or pong of any kind.
    pub last_seen_at: Option<Rfc3339>,
    /// Start of the current (or last) connection.
    pub connected_at: Rfc3339,
    /// When the node went offline.
    pub disconnected_at: Option<Rfc3339>,
}

/// Counts for `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthCounts {
    /// Nodes online or draining.
    pub nodes_online: usize,
    /// Nodes known.
    pub nodes_total: usize,
    /// Tasks by status.
    pub tasks: [u64; 7],
    /// Tasks waiting for a node.
    pub queue_depth: usize,
}

/// Why a submission was refused (client errors).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The tool may not be dispatched.
    #[error("tool `{0}` may not be dispatched by this hub (see allow_internal_request_file)")]
    ForbiddenTool(String),
    /// A pinned node the hub has never seen.
    #[error("node `{0}` is not known to this hub")]
    UnknownNode(String),
    /// A pinned node that does not offer the tool.
    #[error("node `{node}` does not offer tool `{tool}`")]
    NodeLacksTool {
        /// The pinned node.
        node: String,
        /// The tool asked for.
        tool: String,
    },
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such task.
    #[error("task not found")]
    NotFound,
    /// Already terminal.
    #[error("task is already {0}")]
    Terminal(&'static str),
}

/// Counters of the node channel, read by `/health` and later `/metrics`.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Frames received from nodes.
    pub frames_in: AtomicU64,
    /// Frames answered with an `error` frame.
    pub frames_rejected: AtomicU64,
    /// Results acknowledged but not committed (stale, duplicate, unknown).
    pub results_ignored: AtomicU64,
    /// Tasks sent back to the queue after a node loss.
    pub migrations: AtomicU64,
    /// Frames dropped because a node's outbound queue was full.
    pub frames_shed: AtomicU64,
}

struct Core {
    store: Box<dyn TaskStore>,
    sched: Scheduler,
    nodes: HashMap<String, NodeEntry>,
    /// Non-terminal tasks: their deadline key.
    deadlines: BTreeMap<(Instant, u64), String>,
    deadline_of: HashMap<String, (Instant, u64)>,
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    next_seq: u64,
    /// Tasks loaded assigned or running at start, by node, until the node reclaims them or the
    /// recovery grace period ends (`cluster_recovery.rs`).
    recovering: HashMap<String, Vec<String>>,
}

struct Shared {
    core: Mutex<Core>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    opts: ClusterOptions,
    server_id: String,
    next_conn: AtomicU64,
    started: Instant,
    stats: ChannelStats,
    durability: Arc<crate::durable::Durability>,
    /// Assignment frames waiting for their state to be durable (`None` for the memory store).
    gate: Option<mpsc::UnboundedSender<recovery::Gated>>,
}

/// Handle on the engine; clone freely.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl Cluster {
    /// A new engine over `store`.
    pub fn new(opts: ClusterOptions, store: Box<dyn TaskStore>) -> Self {
        Self::new_durable(opts, store, crate::durable::Durability::none())
    }

    /// A new engine over a durable `store` whose writes `durability` tracks.
    pub fn new_durable(
        opts: ClusterOptions,
        store: Box<dyn TaskStore>,
        durability: Arc<crate::durable::Durability>,
    ) -> Self {
        let (events, _) = broadcast::channel(8192);
        let (gate, gate_rx) = recovery::gate_channel(&durability);
        let cluster = Self {
            shared: Arc::new(Shared {
                core: Mutex::new(Core {
                    store,
                    sched: Scheduler::new(),
                    nodes: HashMap::new(),
                    deadlines: BTreeMap::new(),
                    deadline_of: HashMap::new(),
                    waiters: HashMap::new(),
                    next_seq: 1,
                    recovering: HashMap::new(),
                }),
                events,
                opts,
                server_id: format!("apex-hub-{}", uuid::Uuid::new_v4().simple()),
                next_conn: AtomicU64::new(1),
                started: Instant::now(),
                stats: ChannelStats::default(),
                durability,
                gate,
            }),
        };
        cluster.start_gate(gate_rx);
        cluster
    }

    /// Engine settings.
    pub fn options(&self) -> &ClusterOptions {
        &self.shared.opts
    }

    /// Channel counters.
    pub fn stats(&self) -> &ChannelStats {
        &self.shared.stats
    }

    /// Time since the engine started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Subscribes to every task event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.shared.events.subscribe()
    }

    /// A new connection: its handle and the receiving end of its outbound queue. The
    /// `connection_ack` greeting is already queued.
    pub fn open_connection(&self, remote_addr: String) -> (ConnHandle, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(self.shared.opts.outbound_queue_frames);
        let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = ConnHandle {
            id,
            tx,
            kill: Arc::new(Notify::new()),
            last_seen_ms: Arc::new(AtomicI64::new(now_ms())),
            remote_addr,
        };
        conn.send(ConnectionAck {
            server_id: self.shared.server_id.clone(),
            client_id: format!("conn-{id}"),
            message: "connected to apex hub".to_owned(),
        });
        (conn, rx)
    }

    /// The largest concurrency limit a node gets: half its outbound queue, so task frames
    /// always fit next to acknowledgements.
    fn max_node_limit(&self) -> u32 {
        u32::try_from(self.shared.opts.outbound_queue_frames / 2).unwrap_or(u32::MAX)
    }

    fn hub_info(&self, encoding: Encoding) -> HubInfo {
        HubInfo {
            version: self.shared.opts.version.clone(),
            protocol_version: apex_protocol::PROTOCOL_VERSION.to_owned(),
            llm_available: false,
            heartbeat_interval_ms: self.shared.opts.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: self.shared.opts.heartbeat_timeout.as_millis() as u64,
            encoding,
            server_id: self.shared.server_id.clone(),
        }
    }

    /// Handles `node_register`: binds the node to `conn`, answers `node_registered` (and switches
    /// the connection's encoding if asked), then dispatches queued work. Returns the node id.
    pub fn register_native(&self, conn: &ConnHandle, reg: NodeRegister) -> String {
        let node_id = reg
            .node_id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4()));
        let encoding = reg.encoding.unwrap_or_default();
        // Capped so that one dispatch burst always fits the node's outbound queue.
        let limit = reg
            .concurrency_limit()
            .unwrap_or(self.shared.opts.default_node_max_concurrent_tasks)
            .min(self.max_node_limit());
        let name = if reg.name.is_empty() {
            node_id.clone()
        } else {
            reg.name.clone()
        };
        let mut tools = reg.tool_names();
        if !self.shared.opts.allow_internal_request_file {
            tools.retain(|t| t != INTERNAL_REQUEST_FILE);
        }
        let mut core = self.shared.core.lock();
        let info = NodeInfo {
            name,
            node_type: reg.node_type,
            dialect: Dialect::Native,
            version: reg.version.clone(),
            tools,
            tool_specs: reg.tools.clone(),
            limit,
            stats: reg.stats.clone(),
            cancel_tool: true,
        };
        let resend = self.bind(&mut core, &node_id, conn, info, reg.inflight.as_deref());
        conn.send(NodeRegistered {
            node_id: node_id.clone(),
            success: true,
            message: "node registered".to_owned(),
            hub_info: Some(self.hub_info(encoding)),
        });
        let _ = conn.tx.try_send(Outbound::SetEncoding(encoding));
        for id in resend {
            if let Some(t) = core.store.get(&id) {
                let frame = self.assign_frame(&core, t, &node_id, Dialect::Native);
                conn.send(frame);
            }
        }
        self.schedule(&mut core);
        node_id
    }

    /// Handles VCP `register_tools` (a full replacement of the node's tools). Returns the node
    /// id, `vcp-<serverName>`.
    pub fn register_vcp(&self, conn: &ConnHandle, reg: RegisterTools) -> String {
        let node_id = format!("vcp-{}", reg.server_name);
        let mut tools: Vec<String> = Vec::with_capacity(reg.tools.len());
        for t in &reg.tools {
            if !tools.contains(&t.name) {
                tools.push(t.name.clone());
            }
        }
        if !self.shared.opts.allow_internal_request_file {
            tools.retain(|t| t != INTERNAL_REQUEST_FILE);
        }
        let tool_specs = reg
            .tools
            .iter()
            .map(|t| {
                ToolSpec::Described(apex_protocol::ToolDescription {
                    name: t.name.clone(),
                    description: t.description.clone().or_else(|| t.display_name.clone()),
                    parameters: None,
                })
            })
            .collect();
        let mut core = self.shared.core.lock();
        let info = NodeInfo {
            name: reg.server_name.clone(),
            node_type: NodeType::Custom,
            dialect: Dialect::Vcp,
            version: None,
            tools,
            tool_specs,
            limit: self
                .shared
                .opts
                .vcp_max_concurrent_tasks
                .min(self.max_node_limit()),
            stats: None,
            cancel_tool: reg.capabilities.as_ref().is_some_and(|c| c.cancel_tool),
        };
        // A VCP node cannot deliver results across connections: a new connection holds nothing.
        let _ = self.bind(&mut core, &node_id, conn, info, Some(&[]));
        self.schedule(&mut core);
        node_id
    }

    /// Binds `node_id` to `conn`, replacing any earlier binding. `holds` lists the tasks the node
    /// says it still runs (`None`: unknown, keep all).
    fn bind(
        &self,
        core: &mut Core,
        node_id: &str,
        conn: &ConnHandle,
        info: NodeInfo,
        holds: Option<&[String]>,
    ) -> Vec<String> {
        let now = SystemTime::now();
        let mut to_migrate = Vec::new();
        let mut resend = Vec::new();
        let active;
        match core.nodes.get_mut(node_id) {
            Some(e) => {
                let same_conn = e.conn.as_ref().is_some_and(|c| c.id == conn.id);
                if !same_conn {
                    if let Some(old) = e.conn.take() {
                        tracing::info!(
                            node_id,
                            old_conn = old.id,
                            new_conn = conn.id,
                            "node re-registered on a new connection; closing the old one"
                        );
                        old.kill.notify_one();
                    }
                    e.connected_at = now;
                    e.conn = Some(conn.clone());
                    match holds {
                        Some(holds) => {
                            to_migrate = e
                                .inflight
                                .iter()
                                .filter(|t| !holds.contains(t))
                                .cloned()
                                .collect();
                        }
                        // The node did not say what it holds: an assignment may have been lost
                        // with the old connection, so send it again (same attempt; duplicate
                        // results are fenced).
                        None => resend = e.inflight.iter().cloned().collect(),
                    }
                    // A new connection is a fresh start; a node still draining says so again.
                    if e.state == NodeState::Draining {
                        e.state = NodeState::Online;
                    }
                }
                let stats = info.stats.clone().or_else(|| e.info.stats.take());
                e.info = info;
                e.info.stats = stats;
                if e.state == NodeState::Offline {
                    e.state = NodeState::Online;
                }
                e.disconnected_at = None;
                active = e.inflight.len() as u32;
            }
            None => {
                core.nodes.insert(
                    node_id.to_owned(),
                    NodeEntry {
                        id: node_id.to_owned(),
                        info,
                        state: NodeState::Online,
                        conn: Some(conn.clone()),
                        inflight: HashSet::new(),
                        ips: None,
                        connected_at: now,
                        last_heartbeat_at: None,
                        disconnected_at: None,
                        completed: 0,
                        failed: 0,
                    },
                );
                active = 0;
            }
        }
        // Tasks loaded from the store after a restart that this node still holds.
        let active = self.reclaim(core, node_id, holds, &mut resend, &mut to_migrate, active);
        let (tools, limit, state) = {
            let e = &core.nodes[node_id];
            (e.info.tools.clone(), e.info.limit, e.state)
        };
        core.sched.upsert_node(node_id, &tools, limit, active);
        Self::snapshot_node(core, node_id);
        core.sched
            .set_schedulable(node_id, state == NodeState::Online);
        for t in to_migrate {
            self.migrate(core, &t, node_id, "the node re-registered without it", true);
        }
        tracing::info!(node_id, tools = tools.len(), limit, "node registered");
        resend
    }

    /// The frame that assigns task `t` to a node of `dialect`.
    fn assign_frame(&self, core: &Core, t: &Task, node_id: &str, dialect: Dialect) -> HubMessage {
        match dialect {
            Dialect::Vcp => HubMessage::ExecuteTool(ExecuteTool {
                request_id: vcp_request_id(&t.id, t.attempt),
                tool_name: t.spec.tool.clone(),
                tool_args: t.spec.args.clone(),
            }),
            Dialect::Native => {
                let now = Instant::now();
                let remaining_ms = core
                    .deadline_of
                    .get(&t.id)
                    .map(|(d, _)| d.saturating_duration_since(now).as_millis() as u64);
                HubMessage::TaskAssign(TaskAssign {
                    task_id: t.id.clone(),
                    node_id: node_id.to_owned(),
                    tool_name: t.spec.tool.clone(),
                    capability: t.spec.capability.clone(),
                    tool_args: t.spec.args.clone(),
                    timeout: remaining_ms,
                    priority: Some(t.spec.priority),
                    attempt: Some(t.attempt),
                    metadata: None,
                })
            }
        }
    }

    /// Handles `heartbeat` from the node bound to this session (`None`: not registered).
    pub fn heartbeat(&self, node_id: Option<&str>, hb: apex_protocol::Heartbeat) -> HeartbeatAck {
        let mut core = self.shared.core.lock();
        let id = node_id.unwrap_or(&hb.node_id).to_owned();
        let (success, status) = match (node_id, core.nodes.get_mut(&id)) {
            (Some(_), Some(e)) => {
                e.last_heartbeat_at = Some(SystemTime::now());
                if hb.stats.is_some() {
                    e.info.stats = hb.stats;
                }
                (true, e.state.as_str())
            }
            _ => (false, "unknown"),
        };
        HeartbeatAck {
            node_id: id,
            success,
            status: status.to_owned(),
            timestamp: now_ms(),
        }
    }

    /// Handles VCP `report_ip`.
    pub fn report_ip(&self, node_id: &str, ip: ReportIp) {
        if let Some(e) = self.shared.core.lock().nodes.get_mut(node_id) {
            e.ips = Some(ip);
        }
    }

    /// Stops (or resumes) sending new work to a node. False for an unknown node.
    pub fn set_draining(&self, node_id: &str, draining: bool) -> bool {
        let mut core = self.shared.core.lock();
        let Some(e) = core.nodes.get_mut(node_id) else {
            return false;
        };
        if e.state != NodeState::Offline {
            e.state = if draining {
                NodeState::Draining
            } else {
                NodeState::Online
            };
        }
        core.sched.set_schedulable(node_id, !draining);
        if !draining {
            self.schedule(&mut core);
        }
        tracing::info!(node_id, draining, "node drain state changed");
        true
    }

    /// Handles `node_unregister` on connection `conn_id`: the node leaves, its tasks migrate.
    pub fn unregister(&self, node_id: &str, conn_id: u64, reason: &str) -> NodeUnregistered {
        let success = self.lose_node(node_id, conn_id, &format!("node unregistered: {reason}"));
        NodeUnregistered {
            node_id: node_id.to_owned(),
            success,
            message: Some(if success {
                "node unregistered".to_owned()
            } else {
                "node was not registered on this connection".to_owned()
            }),
        }
    }

    /// The connection `conn_id` of `node_id` closed or went silent: the node goes offline and its
    /// in-flight tasks migrate at once. A stale connection (replaced by a newer one) changes
    /// nothing. Returns whether the node was bound to this connection.
    pub fn lose_node(&self, node_id: &str, conn_id: u64, reason: &str) -> bool {
        let mut core = self.shared.core.lock();
        let Some(e) = core.nodes.get_mut(node_id) else {
            return false;
        };
        if e.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            return false;
        }
        self.lose_node_locked(&mut core, node_id, reason);
        self.schedule(&mut core);
        true
    }

    /// Marks a node offline and migrates its in-flight tasks (no scheduling).
    fn lose_node_locked(&self, core: &mut Core, node_id: &str, reason: &str) {
        let Some(e) = core.nodes.get_mut(node_id) else {
            return;
        };
        e.conn = None;
        e.state = NodeState::Offline;
        e.disconnected_at = Some(SystemTime::now());
        let inflight: Vec<String> = e.inflight.iter().cloned().collect();
        core.sched.remove_node(node_id);
        tracing::warn!(node_id, reason, inflight = inflight.len(), "node lost");
        for t in inflight {
            self.migrate(core, &t, node_id, reason, true);
        }
    }

    /// Sends a task assigned to `from` back to the queue, or fails it with `node_lost` when it
    /// has used all its attempts.
    ///
    /// `counts` is false when the node handed the task back unrun (draining): that does not use
    /// up an attempt.
    fn migrate(&self, core: &mut Core, task_id: &str, from: &str, reason: &str, counts: bool) {
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
    fn finish(
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
        if let Some(ws) = core.waiters.remove(task_id) {
            for w in ws {
                let _ = w.send(());
            }
        }
    }

    /// Places queued tasks on nodes and sends the frames.
    fn schedule(&self, core: &mut Core) {
        if core.sched.queued() == 0 {
            return;
        }
        let mut lost = Vec::new();
        for a in core.sched.assign(usize::MAX) {
            let events = &self.shared.events;
            let node_id = a.node_id.clone();
            let dialect = core
                .nodes
                .get(&node_id)
                .map_or(Dialect::Native, |e| e.info.dialect);
            core.store.update(&a.task_id, &mut |t| {
                let now = SystemTime::now();
                t.status = TaskStatus::Assigned;
                t.attempt += 1;
                t.node_id = Some(node_id.clone());
                t.updated_at = now;
                t.started_at.get_or_insert(now);
                t.message = None;
                push_event(t, EventKind::TaskAssigned, events, |e| {
                    e.node_id = Some(node_id.clone());
                });
            });
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
        let now_i = Instant::now();
        for spec in specs {
            if let Some(key) = &spec.idempotency_key
                && let Some(id) = core.store.find_by_idempotency_key(key)
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
            let mut task = Task {
                id: id.clone(),
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
            push_event(
                &mut task,
                EventKind::TaskCreated,
                &self.shared.events,
                |_| {},
            );
            core.sched.enqueue(
                &id,
                &task.spec.tool,
                QueueKey::new(task.spec.priority, seq),
                task.spec.pinned_node.as_deref(),
            );
            core.deadlines.insert((deadline, seq), id.clone());
            core.deadline_of.insert(id.clone(), (deadline, seq));
            accepted.push((id, true));
            core.store.insert(task);
        }
        self.schedule(&mut core);
        // The state after dispatch (a task may already be assigned).
        Ok(accepted
            .into_iter()
            .filter_map(|(id, created)| core.store.get(&id).map(|t| (t.clone(), created)))
            .collect())
    }

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

    fn end_early(
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

    /// A task by id.
    pub fn get(&self, id: &str) -> Option<Task> {
        self.shared.core.lock().store.get(id).cloned()
    }

    /// A receiver that fires when the task ends; `None` if it has already ended or is unknown.
    pub fn wait(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let mut core = self.shared.core.lock();
        let t = core.store.get(id)?;
        if t.status.is_terminal() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let ws = core.waiters.entry(id.to_owned()).or_default();
        ws.retain(|w| !w.is_closed());
        ws.push(tx);
        Some(rx)
    }

    /// Events of a task after `seq`.
    pub fn events_after(&self, id: &str, seq: u32) -> Vec<TaskEvent> {
        self.shared.core.lock().store.events_after(id, seq)
    }

    /// A page of tasks.
    pub fn list(&self, filter: &TaskFilter, page: usize, limit: usize) -> Page {
        self.shared.core.lock().store.list(filter, page, limit)
    }

    /// Every known node, sorted by id.
    pub fn nodes(&self) -> Vec<NodeView> {
        let core = self.shared.core.lock();
        let mut v: Vec<NodeView> = core.nodes.values().map(node_view).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// One node.
    pub fn node(&self, id: &str) -> Option<NodeView> {
        self.shared.core.lock().nodes.get(id).map(node_view)
    }

    /// Counts for `/health`.
    pub fn health(&self) -> HealthCounts {
        let core = self.shared.core.lock();
        HealthCounts {
            nodes_online: core
                .nodes
                .values()
                .filter(|n| n.state != NodeState::Offline)
                .count(),
            nodes_total: core.nodes.len(),
            tasks: core.store.counts(),
            queue_depth: core.sched.queued(),
        }
    }

    /// Closes every node connection (hub shutdown). Nodes reconnect elsewhere or later.
    pub fn close_all(&self, reason: &str) {
        let core = self.shared.core.lock();
        for e in core.nodes.values() {
            if let Some(c) = &e.conn {
                let _ = c.tx.try_send(Outbound::Close(1001, reason.to_owned()));
            }
        }
    }
}

/// What a node declares when it registers.
struct NodeInfo {
    name: String,
    node_type: NodeType,
    dialect: Dialect,
    version: Option<String>,
    tools: Vec<String>,
    tool_specs: Vec<ToolSpec>,
    limit: u32,
    stats: Option<NodeStats>,
    cancel_tool: bool,
}

/// Checks that a result or progress report comes from the task's current node and attempt.
fn fence(
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
fn push_event(
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

fn node_view(e: &NodeEntry) -> NodeView {
    let active = e.inflight.len();
    let last_seen = e.conn.as_ref().map(|c| {
        let ms = c.last_seen_ms.load(Ordering::Relaxed).max(0) as u64;
        Rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    });
    NodeView {
        id: e.id.clone(),
        name: e.info.name.clone(),
        node_type: e.info.node_type,
        dialect: e.info.dialect,
        status: e.state,
        tools: e.info.tools.clone(),
        tool_specs: e.info.tool_specs.clone(),
        max_concurrent_tasks: e.info.limit,
        active_tasks: active,
        load: active as f64 / e.info.limit.max(1) as f64,
        completed_tasks: e.completed,
        failed_tasks: e.failed,
        version: e.info.version.clone(),
        stats: e.info.stats.clone(),
        local_ips: e
            .ips
            .as_ref()
            .map(|i| i.local_ips.clone())
            .unwrap_or_default(),
        public_ip: e.ips.as_ref().and_then(|i| i.public_ip.clone()),
        remote_addr: e.conn.as_ref().map(|c| c.remote_addr.clone()),
        last_heartbeat_at: e.last_heartbeat_at.map(Rfc3339),
        last_seen_at: last_seen,
        connected_at: Rfc3339(e.connected_at),
        disconnected_at: e.disconnected_at.map(Rfc3339),
    }
}

#[path = "cluster_recovery.rs"]
mod recovery;
pub use recovery::Restored;

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
