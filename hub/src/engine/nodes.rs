//! Nodes and their connection bindings: registration in both dialects, re-registration,
//! heartbeats, drain, removal, loss (with migration of in-flight work), and node views.

use super::*;

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
    pub(crate) fn send(&self, msg: impl Into<HubMessage>) -> bool {
        self.tx.try_send(Outbound::Msg(msg.into())).is_ok()
    }
}

pub(super) struct NodeEntry {
    pub(super) id: String,
    /// What the node declared at its last registration.
    pub(super) info: NodeInfo,
    pub(super) state: NodeState,
    pub(super) conn: Option<ConnHandle>,
    pub(super) inflight: HashSet<String>,
    pub(super) ips: Option<ReportIp>,
    pub(super) connected_at: SystemTime,
    pub(super) last_heartbeat_at: Option<SystemTime>,
    pub(super) disconnected_at: Option<SystemTime>,
    pub(super) completed: u64,
    pub(super) failed: u64,
}

/// What a node declares when it registers.
pub(super) struct NodeInfo {
    /// Models the node hosts (only for nodes offering `llm.chat`).
    pub(super) models: Vec<String>,
    pub(super) name: String,
    pub(super) node_type: NodeType,
    pub(super) dialect: Dialect,
    pub(super) version: Option<String>,
    pub(super) tools: Vec<String>,
    pub(super) tool_specs: Vec<ToolSpec>,
    pub(super) limit: u32,
    pub(super) stats: Option<NodeStats>,
    pub(super) cancel_tool: bool,
}

impl Cluster {
    /// Publishes a node event (with the node's current view, if it is still known).
    pub(super) fn node_event(
        &self,
        core: &Core,
        node_id: &str,
        kind: NodeEventKind,
        reason: Option<&str>,
    ) {
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
    pub(super) fn max_node_limit(&self) -> u32 {
        u32::try_from(self.shared.opts.outbound_queue_frames / 2).unwrap_or(u32::MAX)
    }

    pub(super) fn hub_info(&self, encoding: Encoding) -> HubInfo {
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
    pub(super) fn bind(
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

    pub(super) fn forget_locked(&self, core: &mut Core, node_id: &str, reason: &str) {
        if let Some(c) = core.nodes.get(node_id).and_then(|e| e.conn.clone()) {
            let _ =
                c.tx.try_send(Outbound::Close(1000, "removed by operator".to_owned()));
            c.kill.notify_one();
            // Migrates its in-flight tasks.
            self.lose_node_locked(core, node_id, reason);
        }
        for t in core.sched.pinned_to(node_id) {
            let err = ErrorInfo::new(
                apex_protocol::codes::NODE_REMOVED,
                format!("the task is pinned to node {node_id}, which was removed: {reason}"),
            );
            self.finish(core, &t, crate::model::Outcome::Failed(err));
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
    pub(super) fn lose_node_locked(&self, core: &mut Core, node_id: &str, reason: &str) {
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

    /// The status of every known node (cheaper than [`Cluster::nodes`]).
    pub fn node_states(&self) -> Vec<NodeState> {
        let core = self.shared.core.lock();
        core.nodes.values().map(|e| e.state).collect()
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

pub(super) fn node_view(e: &NodeEntry) -> NodeView {
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
