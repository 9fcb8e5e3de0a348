//! The cluster engine: the in-memory authority over nodes and the tasks this hub holds.
//!
//! All state sits behind one mutex ([`Core`]) that is never held across an `.await`: each
//! operation takes the lock, changes state, hands frames to the nodes' bounded outbound queues
//! with `try_send`, and returns. Node sessions (the node channel) and the task service call
//! the methods of [`Cluster`], a cheap-to-clone handle.
//!
//! The engine is split by concern, each child an `impl Cluster` block over the same `Core`:
//! - `nodes`: registration in both dialects, connection bindings, heartbeats, drain, removal,
//!   node loss, node views;
//! - `dispatch`: `submit` (all or none), placement through the scheduler, assignment frames;
//! - `lifecycle`: results (fenced), progress, cancel, timeouts, migration, the terminal step;
//! - `recovery`: restore at start, reclaim on re-registration, the assignment gate, retention;
//! - `claims`: shared mode's engine side (free slots, adopt, disown, hand-over);
//! - `streams`: `task_stream` subscriptions of streamed tasks.
//!
//! Invariants kept here:
//! - a task id is in exactly one of: the scheduler's queue, one node's `inflight` set, the
//!   recovery set, or a terminal state;
//! - a result is committed only from the node and attempt the task is assigned to, once;
//! - a node's in-flight tasks go back to the queue (attempt + 1 at next assignment) the moment
//!   its connection is lost, or fail with `node_lost` after `max_attempts` assignments; unless
//!   a live standby connection of the same node id takes the id over at that moment (`nodes`);
//! - one node id is bound to one connection: a second registration while the bound
//!   connection is alive is refused (native: it waits as standby) or, for VCP, gets its own
//!   suffixed id; a closed or silent connection is replaced at once;
//! - a node registering on a new connection without `inflight` keeps its tasks (same
//!   attempt); they are sent again only if its first heartbeat reports no active task.

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
use crate::model::{Dialect, NodeState, NodeView, Rfc3339, Task, TaskEvent, TaskSpec, TaskStatus};
use crate::scheduler::{QueueKey, Scheduler};
use crate::store::{Order, Page, TaskFilter, TaskStore};

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

/// Whether `tool` is a lane of [`llm_lane`] (`llm.chat@<model>`).
pub fn is_llm_lane(tool: &str) -> bool {
    tool.strip_prefix(LLM_CHAT_TOOL)
        .is_some_and(|rest| rest.starts_with('@'))
}

/// The tool name a node receives for a task's tool: lanes of [`llm_lane`] become `llm.chat`.
pub(crate) fn wire_tool(tool: &str) -> &str {
    if is_llm_lane(tool) {
        LLM_CHAT_TOOL
    } else {
        tool
    }
}

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
    /// Issues the callback URLs of asynchronous plugins' tasks (none: not issued).
    pub callbacks: Option<Arc<crate::plugins::CallbackSigner>>,
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
    /// recovery grace period ends (`recovery.rs`).
    recovering: HashMap<String, Vec<String>>,
    /// Chat calls found unfinished at start and ended `caller_gone`, by the node they were on,
    /// with their attempt: the node is told `task_cancel` when it registers again, until the
    /// recovery grace period ends (`recovery.rs`).
    caller_gone: HashMap<String, Vec<(String, u32)>>,
    /// `toolArgs.resume` makers of streamed tasks, by task id.
    resume: HashMap<String, ResumeFn>,
    /// W3C `traceparent` of the request that submitted each live task (only with OTel on).
    trace_parents: HashMap<String, String>,
    /// Shared mode only (`Some` once `enable_handover` ran): tasks a re-registered node says it
    /// holds that another hub claimed, until this hub takes their claims over
    /// (`claims.rs`).
    handover: Option<HashMap<String, claims::Handover>>,
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
                    caller_gone: HashMap::new(),
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

    /// A task with the durability ticket of its last write (for the read barrier).
    pub fn get_with_ticket(&self, id: &str) -> Option<(Task, u64)> {
        let core = self.shared.core.lock();
        core.store
            .get(id)
            .map(|t| (t.clone(), core.store.ticket_of(id)))
    }

    /// The durability ticket of task `id`'s last write; `None` for an unknown task.
    pub fn ticket_of(&self, id: &str) -> Option<u64> {
        let core = self.shared.core.lock();
        core.store.get(id).map(|_| core.store.ticket_of(id))
    }

    /// A page of tasks in `order` with the highest durability ticket of their last writes.
    pub fn list_with_ticket(
        &self,
        filter: &TaskFilter,
        order: Order,
        page: usize,
        limit: usize,
    ) -> (Page, u64) {
        let core = self.shared.core.lock();
        let p = core.store.list(filter, order, page, limit);
        let ticket = p
            .tasks
            .iter()
            .map(|t| core.store.ticket_of(&t.id))
            .max()
            .unwrap_or(0);
        (p, ticket)
    }

    /// A page of tasks, newest first.
    pub fn list(&self, filter: &TaskFilter, page: usize, limit: usize) -> Page {
        self.shared
            .core
            .lock()
            .store
            .list(filter, Order::NewestFirst, page, limit)
    }

    /// The state gauges of `/metrics`, read at scrape time.
    pub fn gauges(&self) -> metrics::ClusterGauges {
        let h = self.health();
        metrics::ClusterGauges {
            uptime: self.uptime(),
            node_states: self.node_states(),
            tasks: h.tasks,
            queue_depth: h.queue_depth,
            queued_by_tool: self.queued_by_tool(),
            tool_nodes: self.tool_nodes(),
        }
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

    /// Queued tasks per tool.
    pub fn queued_by_tool(&self) -> HashMap<String, usize> {
        self.shared.core.lock().sched.queued_by_tool()
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
}

use lifecycle::fence;
use nodes::{NodeEntry, NodeInfo};

mod claims;
mod dispatch;
mod lifecycle;
mod nodes;
mod recovery;
mod streams;
#[cfg(test)]
mod tests;

pub use claims::FreeSlots;
pub use lifecycle::{PENDING_ANSWER_CHARS, VCP_PENDING_PREFIX};
pub use nodes::{ConnHandle, Outbound};
pub use recovery::Restored;
pub use streams::{ResumeFn, StreamChunk};
