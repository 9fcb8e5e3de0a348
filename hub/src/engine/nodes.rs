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

    /// Whether the connection is alive: its queue is open and it sent a frame or a pong less
    /// than `timeout_ms` ago (a live peer answers the session's pings, so this holds until
    /// the session itself would declare it silent).
    pub fn is_alive(&self, timeout_ms: u64) -> bool {
        let silent_ms = now_ms().saturating_sub(self.last_seen_ms.load(Ordering::Relaxed));
        !self.tx.is_closed() && silent_ms < i64::try_from(timeout_ms).unwrap_or(i64::MAX)
    }
}

/// A native registration, decoded and ready to bind.
pub(super) struct NativeReg {
    node_id: String,
    encoding: Encoding,
    info: NodeInfo,
    /// `node_register.inflight`: the tasks the node says it still runs (`None`: not sent).
    inflight: Option<Vec<String>>,
}

/// A connection whose registration was refused because a live connection holds its node id
/// (`node_id_in_use`). It waits, unbound, and takes the id over (registered as it asked) if
/// that connection is lost while it is still alive itself.
pub(super) struct Standby {
    conn: ConnHandle,
    reg: NativeReg,
}

pub(super) struct NodeEntry {
    pub(super) id: String,
    /// What the node declared at its last registration.
    pub(super) info: NodeInfo,
    pub(super) state: NodeState,
    pub(super) conn: Option<ConnHandle>,
    pub(super) inflight: HashSet<String>,
    /// A second connection for this node id, refused while `conn` is alive (see [`Standby`]).
    pub(super) standby: Option<Standby>,
    /// Kept tasks of a registration on a new connection without `inflight`, not sent again
    /// yet: the node's first heartbeat decides ([`Cluster::heartbeat`]). They stay in
    /// `inflight`, so they migrate if the connection is lost first.
    pub(super) awaiting_heartbeat: Option<Vec<String>>,
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
    /// The node's asynchronous plugins → whether their callbacks may go unsigned. On native
    /// nodes their `task_assign` carries `metadata.callback`; on VCP nodes their `tool_result`
    /// is an "accepted" answer and the result comes by `plugin_callback_forward`.
    pub(super) async_tools: HashMap<String, bool>,
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

    /// The silence timeout (ms) after which a connection is dead, as the sessions apply it.
    fn liveness_timeout_ms(&self) -> u64 {
        self.shared.liveness_ms[1].load(Ordering::Relaxed)
    }

    /// Handles `node_register`: binds the node to `conn`, answers `node_registered` (and switches
    /// the connection's encoding if asked), then dispatches queued work. Returns the node id.
    ///
    /// If another connection that is still alive ([`ConnHandle::is_alive`]) holds the node id,
    /// nothing is bound: `conn` gets `node_registered {success: false}` naming the conflict
    /// (`node_id_in_use`) and waits as the id's standby; if the holding connection is lost
    /// while `conn` is alive, `conn` takes the id over ([`Cluster::lose_node`]).
    /// [`Cluster::is_bound`] tells which happened. A holder that is closed or silent past the
    /// heartbeat timeout is replaced at once.
    pub fn register_native(&self, conn: &ConnHandle, reg: NodeRegister) -> String {
        let reg = self.native_reg(reg);
        let node_id = reg.node_id.clone();
        let llm_available = self.llm_available();
        let timeout = self.liveness_timeout_ms();
        let mut core = self.shared.core.lock();
        if let Some(e) = core.nodes.get_mut(&node_id)
            && let Some(holder) = &e.conn
            && holder.id != conn.id
            && holder.is_alive(timeout)
        {
            tracing::warn!(
                node_id,
                holder = %holder.remote_addr,
                refused = %conn.remote_addr,
                "node id already held by a live connection; registration refused, the new connection waits"
            );
            conn.send(NodeRegistered {
                node_id: node_id.clone(),
                success: false,
                message: format!(
                    "{}: node id `{node_id}` is held by another live connection; this \
                     connection stays unregistered and takes the id over if that one is lost",
                    apex_protocol::codes::NODE_ID_IN_USE
                ),
                hub_info: None,
            });
            e.standby = Some(Standby {
                conn: conn.clone(),
                reg,
            });
            return node_id;
        }
        self.bind_native(&mut core, conn, reg, llm_available);
        self.schedule(&mut core);
        node_id
    }

    /// Whether connection `conn_id` holds node `node_id` (false for a standby connection).
    pub fn is_bound(&self, node_id: &str, conn_id: u64) -> bool {
        let core = self.shared.core.lock();
        core.nodes
            .get(node_id)
            .and_then(|e| e.conn.as_ref())
            .is_some_and(|c| c.id == conn_id)
    }

    /// Decodes a `node_register` (no lock needed).
    fn native_reg(&self, reg: NodeRegister) -> NativeReg {
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
        let info = NodeInfo {
            models,
            name,
            node_type: reg.node_type,
            dialect: Dialect::Native,
            version: reg.version,
            tools,
            async_tools: reg
                .tools
                .iter()
                .filter_map(|s| Some((s.name().to_owned(), crate::plugins::async_plugin(s)?)))
                .collect(),
            tool_specs: reg.tools,
            limit,
            stats: reg.stats,
            cancel_tool: true,
        };
        NativeReg {
            node_id,
            encoding,
            info,
            inflight: reg.inflight,
        }
    }

    /// Binds a native registration to `conn` and answers `node_registered` (no scheduling).
    fn bind_native(&self, core: &mut Core, conn: &ConnHandle, reg: NativeReg, llm_available: bool) {
        let NativeReg {
            node_id,
            encoding,
            info,
            inflight,
        } = reg;
        self.bind(core, &node_id, conn, info, inflight.as_deref());
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
        // Chat calls ended `caller_gone` at a restart that this node may still run.
        self.cancel_caller_gone(core, &node_id, conn, inflight.as_deref());
    }

    /// Handles VCP `register_tools` (a full replacement of the node's tools). Returns the node
    /// id: `vcp-<serverName>`, or `vcp-<serverName>-<n>` (n = 2, 3, ...) when live connections
    /// of other servers with the same name hold the smaller ones (see `vcp_node_id`).
    pub fn register_vcp(&self, conn: &ConnHandle, reg: RegisterTools) -> String {
        let base = format!("vcp-{}", reg.server_name);
        let mut tools: Vec<String> = Vec::with_capacity(reg.tools.len());
        for t in &reg.tools {
            if !tools.contains(&t.name) {
                tools.push(t.name.clone());
            }
        }
        if !self.shared.opts.allow_internal_request_file {
            tools.retain(|t| t != INTERNAL_REQUEST_FILE);
        }
        let tool_specs: Vec<ToolSpec> = reg
            .tools
            .iter()
            .map(|t| ToolSpec::Described(vcp_tool_description(t)))
            .collect();
        let async_tools = tool_specs
            .iter()
            .filter_map(|s| Some((s.name().to_owned(), crate::plugins::async_plugin(s)?)))
            .collect();
        let mut core = self.shared.core.lock();
        let node_id = self.vcp_node_id(&core, &base, conn);
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
            async_tools,
        };
        // A VCP node cannot deliver results across connections: a new connection holds nothing.
        self.bind(&mut core, &node_id, conn, info, Some(&[]));
        self.schedule(&mut core);
        node_id
    }

    /// The node id of a VCP server registering on `conn` whose plain id is `base`
    /// (`vcp-<serverName>`). VCP servers have no id of their own, so two live servers with one
    /// name must not take each other's binding: the id is the first of `base`, `base-2`,
    /// `base-3`, ... that no other live connection holds (a closed or silent holder is replaced
    /// as on any reconnect). A connection already bound to one of them keeps it, so the id is
    /// stable while the server stays connected.
    fn vcp_node_id(&self, core: &Core, base: &str, conn: &ConnHandle) -> String {
        let timeout = self.liveness_timeout_ms();
        let mut free: Option<String> = None;
        let mut holder: Option<&str> = None;
        let mut n = 0usize;
        loop {
            n += 1;
            let id = if n == 1 {
                base.to_owned()
            } else {
                format!("{base}-{n}")
            };
            let Some(e) = core.nodes.get(&id) else {
                // Past the last id of this name: nothing bound to `conn` further on.
                let id = free.unwrap_or(id);
                if id != base {
                    tracing::warn!(
                        node_id = %id,
                        holder = holder.unwrap_or(""),
                        new = %conn.remote_addr,
                        "a second VCP server registered with a serverName a live connection holds; registered under a suffixed id"
                    );
                }
                return id;
            };
            match &e.conn {
                Some(c) if c.id == conn.id => return id,
                Some(c) if c.is_alive(timeout) => {
                    if n == 1 {
                        holder = Some(&c.remote_addr);
                    }
                }
                _ => {
                    free.get_or_insert(id);
                }
            }
        }
    }

    /// Binds `node_id` to `conn`, replacing any earlier binding (the caller checked that it may).
    /// `holds` lists the tasks the node says it still runs: on a new connection the node's
    /// other tasks migrate. `None` (the node did not say): every kept task stays assigned,
    /// same attempt, and waits for the node's first heartbeat, which decides whether it is
    /// sent again ([`Cluster::heartbeat`]); so a node that kept running its tasks across the
    /// reconnect does not run them twice.
    pub(super) fn bind(
        &self,
        core: &mut Core,
        node_id: &str,
        conn: &ConnHandle,
        info: NodeInfo,
        holds: Option<&[String]>,
    ) {
        let now = SystemTime::now();
        let mut to_migrate = Vec::new();
        let mut held = Vec::new();
        let new_conn;
        let active;
        match core.nodes.get_mut(node_id) {
            Some(e) => {
                let same_conn = e.conn.as_ref().is_some_and(|c| c.id == conn.id);
                new_conn = !same_conn;
                if e.standby.as_ref().is_some_and(|s| s.conn.id == conn.id) {
                    e.standby = None;
                }
                if !same_conn {
                    if let Some(old) = e.conn.take() {
                        tracing::info!(
                            node_id,
                            old_conn = old.id,
                            new_conn = conn.id,
                            old_addr = %old.remote_addr,
                            new_addr = %conn.remote_addr,
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
                        // The node did not say what it holds: it may still run them (a
                        // third-party agent keeps its tasks across a reconnect) or have lost
                        // them (it restarted). Its first heartbeat tells.
                        None => held = e.inflight.iter().cloned().collect(),
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
                new_conn = true;
                core.nodes.insert(
                    node_id.to_owned(),
                    NodeEntry {
                        id: node_id.to_owned(),
                        info,
                        state: NodeState::Online,
                        conn: Some(conn.clone()),
                        inflight: HashSet::new(),
                        standby: None,
                        awaiting_heartbeat: None,
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
        let active = self.reclaim(core, node_id, holds, &mut held, &mut to_migrate, active);
        if new_conn && let Some(e) = core.nodes.get_mut(node_id) {
            if !held.is_empty() {
                tracing::info!(
                    node_id,
                    kept = held.len(),
                    "node registered on a new connection without inflight; its kept tasks wait for its first heartbeat"
                );
            }
            e.awaiting_heartbeat = (!held.is_empty()).then_some(held);
        }
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
    }

    /// Handles `heartbeat` from the node bound to this session (`None`: not registered).
    ///
    /// The first heartbeat after a registration on a new connection without `inflight`
    /// decides about the tasks the node kept (see `bind`): with `stats.activeTasks` 0
    /// (or no `stats`) the node lost them, and they are sent again (same attempt, before this
    /// heartbeat's answer); otherwise the node still runs them, and each is left to its
    /// attempt (its result is accepted by the fence as usual).
    pub fn heartbeat(&self, node_id: Option<&str>, hb: apex_protocol::Heartbeat) -> HeartbeatAck {
        let mut core = self.shared.core.lock();
        let id = node_id.unwrap_or(&hb.node_id).to_owned();
        let mut resend = Vec::new();
        let (success, status) = match (node_id, core.nodes.get_mut(&id)) {
            (Some(_), Some(e)) => {
                e.last_heartbeat_at = Some(SystemTime::now());
                if let Some(kept) = e.awaiting_heartbeat.take() {
                    let active = hb.stats.as_ref().map_or(0, |s| s.active_tasks);
                    if active == 0 {
                        resend = kept;
                    } else {
                        tracing::info!(
                            node_id = %id,
                            active,
                            kept = kept.len(),
                            "node still runs tasks across its reconnect; not sending them again"
                        );
                    }
                }
                if hb.stats.is_some() {
                    e.info.stats = hb.stats;
                }
                (true, e.state.as_str())
            }
            _ => (false, "unknown"),
        };
        if !resend.is_empty() {
            self.resend_kept(&core, &id, resend);
        }
        HeartbeatAck {
            node_id: id,
            success,
            status: status.to_owned(),
            timestamp: now_ms(),
        }
    }

    /// Sends the assignments of `kept` again (same attempt) to `node_id`'s connection, each
    /// still assigned to it. Not gated: the assignment was durable when it was first sent.
    fn resend_kept(&self, core: &Core, node_id: &str, kept: Vec<String>) {
        let Some(e) = core.nodes.get(node_id) else {
            return;
        };
        let Some(conn) = &e.conn else {
            return;
        };
        let mut sent = 0usize;
        for id in kept {
            if !e.inflight.contains(&id) {
                continue;
            }
            let Some(t) = core.store.get(&id) else {
                continue;
            };
            if !matches!(t.status, TaskStatus::Assigned | TaskStatus::Running)
                || t.node_id.as_deref() != Some(node_id)
            {
                continue;
            }
            conn.send(self.assign_frame(core, t, node_id, Dialect::Native));
            sent += 1;
        }
        tracing::info!(
            node_id,
            sent,
            "node runs no task after its reconnect; its kept tasks are sent again"
        );
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
        if let Some(s) = core.nodes.get_mut(node_id).and_then(|e| e.standby.take()) {
            let _ = s
                .conn
                .tx
                .try_send(Outbound::Close(1000, "removed by operator".to_owned()));
            s.conn.kill.notify_one();
        }
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
    ///
    /// If a standby connection waits for the id (its registration was refused while this one
    /// was alive, see [`Cluster::register_native`]) and is alive itself, it takes the id over
    /// instead, as a re-registration on a new connection would: it gets
    /// `node_registered {success: true}`, and the node's tasks stay assigned (same attempt)
    /// under the rules for its registration's `inflight`. A standby connection that closes
    /// just stops waiting (returns false).
    pub fn lose_node(&self, node_id: &str, conn_id: u64, reason: &str) -> bool {
        let waiting = {
            let core = self.shared.core.lock();
            core.nodes.get(node_id).is_some_and(|e| e.standby.is_some())
        };
        // Asked without the lock (the probe may call into the engine).
        let llm_available = waiting && self.llm_available();
        let timeout = self.liveness_timeout_ms();
        let mut core = self.shared.core.lock();
        let Some(e) = core.nodes.get_mut(node_id) else {
            return false;
        };
        if e.standby.as_ref().is_some_and(|s| s.conn.id == conn_id) {
            e.standby = None;
            return false;
        }
        if e.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            return false;
        }
        let takes_over = e.standby.as_ref().is_some_and(|s| s.conn.is_alive(timeout));
        match e.standby.take() {
            Some(s) if takes_over => {
                tracing::warn!(
                    node_id,
                    lost = %e.conn.as_ref().map_or("", |c| c.remote_addr.as_str()),
                    standby = %s.conn.remote_addr,
                    reason,
                    "node connection lost; the connection waiting with its id takes it over"
                );
                self.bind_native(&mut core, &s.conn, s.reg, llm_available);
            }
            standby => {
                e.standby = standby;
                self.lose_node_locked(&mut core, node_id, reason);
            }
        }
        self.schedule(&mut core);
        true
    }

    /// Marks a node offline and migrates its in-flight tasks (no scheduling). A standby
    /// connection waiting for its id is closed (1013), so its client registers afresh.
    pub(super) fn lose_node_locked(&self, core: &mut Core, node_id: &str, reason: &str) {
        let Some(e) = core.nodes.get_mut(node_id) else {
            return;
        };
        e.conn = None;
        e.awaiting_heartbeat = None;
        if let Some(s) = e.standby.take() {
            // It cannot take over a node that went offline: let it register afresh.
            let _ = s.conn.tx.try_send(Outbound::Close(
                1013,
                "the node id is free again: register again".to_owned(),
            ));
        }
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

/// A VCP plugin manifest (`register_tools.tools[]`) as a described tool: its description (or
/// display name), its `invocationCommands` as capabilities and examples, and the plugin's
/// version, author and type. `basePath` and `pluginSpecificEnvConfig` are never read.
fn vcp_tool_description(t: &apex_protocol::VcpToolManifest) -> apex_protocol::ToolDescription {
    let commands = t
        .capabilities
        .as_ref()
        .and_then(|c| c.get("invocationCommands"))
        .and_then(Value::as_array);
    let capabilities = commands
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("commandIdentifier").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    let examples = commands
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let description = c.get("description").cloned().unwrap_or(Value::Null);
            let example = c.get("example").cloned().unwrap_or(Value::Null);
            (!description.is_null() || !example.is_null())
                .then(|| serde_json::json!({"description": description, "example": example}))
        })
        .collect();
    let plugin_type = match t.plugin_type.as_deref() {
        Some("asynchronous") => apex_protocol::PluginType::Asynchronous,
        _ => apex_protocol::PluginType::Synchronous,
    };
    apex_protocol::ToolDescription {
        name: t.name.clone(),
        description: t.description.clone().or_else(|| t.display_name.clone()),
        parameters: None,
        examples,
        plugin: Some(Box::new(apex_protocol::PluginInfo {
            version: t.version.clone(),
            author: t.author.clone(),
            capabilities,
            plugin_type,
            format: Some("plugin-manifest.json".into()),
            ..apex_protocol::PluginInfo::default()
        })),
    }
}
