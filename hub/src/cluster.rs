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
    TaskAssign, TaskCancel, TaskProgress, TaskResult, TaskResultAck, TaskStream, ToolResult,
    ToolSpec, now_ms, parse_vcp_request_id, vcp_request_id,
};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use crate::events::{NodeEvent, NodeEventKind};
use crate::metrics;
use crate::model::{EventKind, Rfc3339, Task, TaskEvent, TaskSpec, TaskStatus};
use crate::scheduler::{QueueKey, Scheduler};
use crate::store::{Page, TaskFilter, TaskStore};

/// Name of the VCP built-in tool that returns any file of the node; never dispatched unless the
/// operator allows it.
pub const INTERNAL_REQUEST_FILE: &str = "internal_request_file";

/// The tool node-hosted models are served by.
pub const LLM_CHAT_TOOL: &str = "llm.chat";

/// The scheduling lane of `llm.chat` tasks for `model`: `llm.chat@<model>`. A native node that
/// offers `llm.chat` and lists `model` in `node_register.models` offers this lane; a task
/// submitted with this tool name is sent to the node as tool `llm.chat`.
pub fn llm_lane(model: &str) -> String {
    format!("{LLM_CHAT_TOOL}@{model}")
}

/// The tool name a node receives for a task's tool: lanes of [`llm_lane`] become `llm.chat`.
fn wire_tool(tool: &str) -> &str {
    match tool.strip_prefix(LLM_CHAT_TOOL) {
        Some(rest) if rest.starts_with('@') => LLM_CHAT_TOOL,
        _ => tool,
    }
}

/// One `task_stream` chunk handed to a stream subscriber ([`Cluster::submit_streaming`]).
#[derive(Debug, Clone)]
pub struct StreamChunk {
    /// The attempt the chunk belongs to (a higher one means the task moved to another node).
    pub attempt: u32,
    /// Position within the attempt, from 0, as the node numbered it.
    pub seq: u64,
    /// The chunk object.
    pub chunk: Value,
}

/// Computes `toolArgs.resume` of a task's re-assignment (attempt > 1); see
/// [`Cluster::set_resume`].
pub type ResumeFn = Arc<dyn Fn() -> Option<Value> + Send + Sync>;

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
    /// `toolArgs.resume` makers of streamed tasks, by task id.
    resume: HashMap<String, ResumeFn>,
    /// W3C `traceparent` of the request that submitted each live task (only with OTel on).
    trace_parents: HashMap<String, String>,
    /// Shared mode only (`Some` once `enable_handover` ran): tasks a re-registered node says it
    /// holds that another hub claimed, until this hub takes their claims over
    /// (`cluster_shared.rs`).
    handover: Option<HashMap<String, shared_mode::Handover>>,
}

struct Shared {
    core: Mutex<Core>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    node_events: broadcast::Sender<Arc<NodeEvent>>,
    opts: ClusterOptions,
    server_id: String,
    next_conn: AtomicU64,
    started: Instant,
    stats: ChannelStats,
    durability: Arc<crate::durable::Durability>,
    /// Subscribers of `task_stream` chunks, by task id. Its own lock, never taken while
    /// holding `core` (and `core` is never taken while holding it, except in
    /// `submit_streaming`, which takes them in the order streams → core).
    streams: Mutex<HashMap<String, mpsc::UnboundedSender<StreamChunk>>>,
    /// Tells whether the LLM gateway has any model (`hubInfo.llmAvailable`); called without
    /// the core lock held.
    llm_probe: Mutex<Option<LlmProbe>>,
    /// Assignment frames waiting for their state to be durable (`None` for the memory store).
    gate: Option<mpsc::UnboundedSender<recovery::Gated>>,
    /// Ping interval and silence timeout (ms) announced in `hubInfo`; follow the live config.
    liveness_ms: [AtomicU64; 2],
}

/// Answers whether the LLM gateway has any model; see [`Cluster::set_llm_probe`].
pub type LlmProbe = Arc<dyn Fn() -> bool + Send + Sync>;

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
        let (node_events, _) = broadcast::channel(1024);
        let (gate, gate_rx) = recovery::gate_channel(&durability);
        let liveness_ms = [
            AtomicU64::new(opts.heartbeat_interval.as_millis() as u64),
            AtomicU64::new(opts.heartbeat_timeout.as_millis() as u64),
        ];
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
                    resume: HashMap::new(),
                    trace_parents: HashMap::new(),
                    handover: None,
                }),
                events,
                node_events,
                opts,
                server_id: format!("apex-hub-{}", uuid::Uuid::new_v4().simple()),
                next_conn: AtomicU64::new(1),
                started: Instant::now(),
                stats: ChannelStats::default(),
                durability,
                streams: Mutex::new(HashMap::new()),
                llm_probe: Mutex::new(None),
                gate,
                liveness_ms,
            }),
        };
        cluster.start_gate(gate_rx);
        cluster
    }

    /// Engine settings.
    pub fn options(&self) -> &ClusterOptions {
        &self.shared.opts
    }

    /// Sets the ping interval and silence timeout announced to nodes that register from now on
    /// (`hubInfo`); sessions take the live values from the config themselves.
    pub fn set_liveness(&self, interval: Duration, timeout: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.shared.liveness_ms[0].store(ms(interval), Ordering::Relaxed);
        self.shared.liveness_ms[1].store(ms(timeout), Ordering::Relaxed);
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

    /// Subscribes to every node event from now on (bounded: a slow receiver gets `Lagged`).
    pub fn subscribe_nodes(&self) -> broadcast::Receiver<Arc<NodeEvent>> {
        self.shared.node_events.subscribe()
    }

    /// Publishes a node event (with the node's current view, if it is still known).
    fn node_event(&self, core: &Core, node_id: &str, kind: NodeEventKind, reason: Option<&str>) {
        if self.shared.node_events.receiver_count() == 0 {
            return;
        }
        let node = core.nodes.get(node_id).map(node_view);
        let _ = self.shared.node_events.send(Arc::new(NodeEvent {
            kind,
            node_id: node_id.to_owned(),
            status: node.as_ref().map_or(NodeState::Offline, |n| n.status),
            reason: reason.map(str::to_owned),
            node,
            timestamp: SystemTime::now(),
        }));
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
            heartbeat_interval_ms: self.shared.liveness_ms[0].load(Ordering::Relaxed),
            heartbeat_timeout_ms: self.shared.liveness_ms[1].load(Ordering::Relaxed),
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
        let models: Vec<String> = if tools.iter().any(|t| t == LLM_CHAT_TOOL) {
            let mut m: Vec<String> = Vec::with_capacity(reg.models.len());
            for id in reg.models.iter().map(|m| m.id()) {
                if !m.iter().any(|x| x == id) {
                    m.push(id.to_owned());
                }
            }
            m
        } else {
            Vec::new()
        };
        tools.extend(models.iter().map(|m| llm_lane(m)));
        let llm_available = self.llm_available();
        let mut core = self.shared.core.lock();
        let info = NodeInfo {
            models,
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
        let mut hub_info = self.hub_info(encoding);
        // This node's own models count once it is bound.
        hub_info.llm_available = llm_available || !core.nodes[&node_id].info.models.is_empty();
        conn.send(NodeRegistered {
            node_id: node_id.clone(),
            success: true,
            message: "node registered".to_owned(),
            hub_info: Some(hub_info),
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
            models: Vec::new(),
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
        Self::note_handover(core, node_id, holds);
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
        self.node_event(core, node_id, NodeEventKind::NodeRegistered, None);
        resend
    }

    /// The frame that assigns task `t` to a node of `dialect`.
    fn assign_frame(&self, core: &Core, t: &Task, node_id: &str, dialect: Dialect) -> HubMessage {
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
                    metadata: core
                        .trace_parents
                        .get(&t.id)
                        .map(|tp| serde_json::json!({ "traceparent": tp })),
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
        let kind = if draining {
            NodeEventKind::NodeDrained
        } else {
            NodeEventKind::NodeUndrained
        };
        self.node_event(&core, node_id, kind, None);
        true
    }

    /// Forgets a node at an operator's request: closes its connection (close code 1000,
    /// `removed by operator`), migrates its in-flight tasks, fails the queued tasks pinned to it
    /// (`node_removed`), and drops it from the registry. False for an unknown node. A node that
    /// reconnects afterwards registers again as new.
    pub fn remove_node(&self, node_id: &str, reason: &str) -> bool {
        let mut core = self.shared.core.lock();
        if !core.nodes.contains_key(node_id) {
            return false;
        }
        self.forget_locked(&mut core, node_id, reason);
        self.schedule(&mut core);
        true
    }

    /// Forgets every node that has been offline for longer than `retention`. Returns their ids.
    pub fn forget_offline(&self, retention: Duration) -> Vec<String> {
        let mut core = self.shared.core.lock();
        let now = SystemTime::now();
        let stale: Vec<String> = core
            .nodes
            .values()
            .filter(|e| {
                e.state == NodeState::Offline
                    && e.disconnected_at.is_some_and(|t| {
                        now.duration_since(t).unwrap_or(Duration::ZERO) >= retention
                    })
            })
            .map(|e| e.id.clone())
            .collect();
        for id in &stale {
            self.forget_locked(
                &mut core,
                id,
                "offline for longer than offline_node_retention_ms",
            );
        }
        if !stale.is_empty() {
            self.schedule(&mut core);
        }
        stale
    }

    fn forget_locked(&self, core: &mut Core, node_id: &str, reason: &str) {
        if let Some(c) = core.nodes.get(node_id).and_then(|e| e.conn.clone()) {
            let _ =
                c.tx.try_send(Outbound::Close(1000, "removed by operator".to_owned()));
            c.kill.notify_one();
            // Migrates its in-flight tasks.
            self.lose_node_locked(core, node_id, reason);
        }
        for t in core.sched.pinned_to(node_id) {
            let err = ErrorInfo::new(
                "node_removed",
                format!("the task is pinned to node {node_id}, which was removed: {reason}"),
            );
            self.finish(core, &t, TaskStatus::Failed, None, Some(err));
        }
        core.sched.remove_node(node_id);
        core.nodes.remove(node_id);
        tracing::info!(node_id, reason, "node removed");
        self.node_event(core, node_id, NodeEventKind::NodeRemoved, Some(reason));
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
        self.node_event(core, node_id, NodeEventKind::NodeLost, Some(reason));
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
                // Queued since submission or the last migration.
                metrics::task_dispatched(t.updated_at, now);
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
        let traceparent = crate::telemetry::current_traceparent();
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
            let mut task = Task::queued(id.clone(), seq, spec, now);
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

    /// Applies `f` to a task under the engine lock, without cloning it. Keep `f` short.
    pub fn with_task<R>(&self, id: &str, f: impl FnOnce(&Task) -> R) -> Option<R> {
        self.shared.core.lock().store.get(id).map(f)
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

    /// Queued tasks per tool.
    pub fn queued_by_tool(&self) -> HashMap<String, usize> {
        self.shared.core.lock().sched.queued_by_tool()
    }

    /// Online (not draining) nodes per tool they offer.
    pub fn tool_nodes(&self) -> HashMap<String, usize> {
        let core = self.shared.core.lock();
        let mut out: HashMap<String, usize> = HashMap::new();
        for e in core.nodes.values().filter(|e| e.state == NodeState::Online) {
            for t in &e.info.tools {
                *out.entry(t.clone()).or_default() += 1;
            }
        }
        out
    }

    /// The status of every known node (cheaper than [`Cluster::nodes`]).
    pub fn node_states(&self) -> Vec<NodeState> {
        let core = self.shared.core.lock();
        core.nodes.values().map(|e| e.state).collect()
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

    /// Handles `task_stream`: hands the chunk to the task's stream subscriber if it belongs to
    /// the task's current node and attempt (fenced like a result). Returns whether it was
    /// delivered.
    pub fn task_stream(&self, node_id: &str, s: TaskStream) -> bool {
        let attempt = {
            let core = self.shared.core.lock();
            if fence(&core, &s.task_id, node_id, s.attempt).is_err() {
                return false;
            }
            match core.store.get(&s.task_id) {
                Some(t) => t.attempt,
                None => return false,
            }
        };
        let streams = self.shared.streams.lock();
        match streams.get(&s.task_id) {
            Some(tx) => tx
                .send(StreamChunk {
                    attempt,
                    seq: s.seq,
                    chunk: s.chunk,
                })
                .is_ok(),
            None => false,
        }
    }

    /// Submits one task and subscribes to its `task_stream` chunks, in order and with their
    /// attempt, before any can arrive. The channel is unbounded (chunks are never dropped
    /// for a slow reader); [`Cluster::close_stream`] ends the subscription.
    ///
    /// # Errors
    /// As [`Cluster::submit`].
    pub fn submit_streaming(
        &self,
        spec: TaskSpec,
    ) -> Result<(Task, mpsc::UnboundedReceiver<StreamChunk>), SubmitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Held across the submit so that no chunk of the new task finds no subscriber.
        let mut streams = self.shared.streams.lock();
        let mut accepted = self.submit(vec![spec])?;
        let Some((task, _)) = accepted.pop() else {
            return Err(SubmitError::UnknownNode("no task was accepted".to_owned()));
        };
        streams.insert(task.id.clone(), tx);
        Ok((task, rx))
    }

    /// Sets how `toolArgs.resume` is computed when task `task_id` is assigned again after a
    /// migration (attempt > 1): the value `f` returns, if any, is added to the arguments.
    pub fn set_resume(&self, task_id: &str, f: ResumeFn) {
        self.shared.core.lock().resume.insert(task_id.to_owned(), f);
    }

    /// Ends a stream subscription and forgets the task's resume maker; cancels the task if it
    /// has not ended (the subscriber went away).
    pub fn close_stream(&self, task_id: &str) {
        self.shared.streams.lock().remove(task_id);
        self.shared.core.lock().resume.remove(task_id);
        let _ = self.cancel(task_id);
    }

    /// Every model hosted by an online (undrained) node, with the nodes hosting it, sorted by
    /// model id, then node id.
    pub fn hosted_models(&self) -> Vec<(String, Vec<String>)> {
        let core = self.shared.core.lock();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in core.nodes.values() {
            if e.state != NodeState::Online {
                continue;
            }
            for m in &e.info.models {
                out.entry(m.clone()).or_default().push(e.id.clone());
            }
        }
        for nodes in out.values_mut() {
            nodes.sort();
        }
        out.into_iter().collect()
    }

    /// Sets how `node_registered.hubInfo.llmAvailable` is decided (default: false). The probe
    /// is called without the engine lock held, so it may call back into the engine.
    pub fn set_llm_probe(&self, probe: LlmProbe) {
        *self.shared.llm_probe.lock() = Some(probe);
    }

    /// Whether the LLM gateway has any model, by the probe of [`Cluster::set_llm_probe`].
    pub fn llm_available(&self) -> bool {
        let probe = self.shared.llm_probe.lock().clone();
        probe.is_some_and(|p| p())
    }

    /// Whether an online node hosts `model`.
    pub fn hosts_model(&self, model: &str) -> bool {
        let core = self.shared.core.lock();
        core.nodes
            .values()
            .any(|e| e.state == NodeState::Online && e.info.models.iter().any(|m| m == model))
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
    /// Models the node hosts (only for nodes offering `llm.chat`).
    models: Vec<String>,
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
        models: e.info.models.clone(),
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

#[path = "cluster_shared.rs"]
mod shared_mode;
pub use shared_mode::FreeSlots;

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;

/// Serializes [`NodeStats`] with snake_case keys: the node channel's camelCase counters as an
/// HTTP body field.
fn snake_case_stats<S: serde::Serializer>(
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
