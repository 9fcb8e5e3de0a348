#![allow(clippy::unwrap_used)]
//! Engine tests: drive [`Cluster`] directly with fake connections (a `ConnHandle` and the
//! receiving end of its outbound queue), no sockets and no clock.

use std::time::{Duration, Instant};

use apex_protocol::{
    Heartbeat, HubMessage, NodeRegister, RegisterTools, TaskAssign, TaskProgress, TaskResult,
    TaskResultAck, ToolResult, ToolSpec, VcpCapabilities, VcpToolManifest,
};
use futures::FutureExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::model::{EventKind, Task, TaskSpec, TaskStatus};
use crate::store::{MemoryStore, TaskFilter};

fn options(outbound_queue_frames: usize) -> ClusterOptions {
    ClusterOptions {
        version: "test".to_owned(),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(3),
        default_node_max_concurrent_tasks: 16,
        vcp_max_concurrent_tasks: 8,
        allow_internal_request_file: false,
        outbound_queue_frames,
        callbacks: None,
    }
}

fn new_cluster() -> Cluster {
    Cluster::new(options(1024), Box::new(MemoryStore::new()))
}

fn spec(tool: &str) -> TaskSpec {
    TaskSpec {
        tool: tool.to_owned(),
        args: json!({"text": "hello"}),
        description: None,
        priority: 5,
        timeout_seconds: 300.0,
        max_attempts: 3,
        idempotency_key: None,
        pinned_node: None,
        capability: None,
        owner: None,
    }
}

fn submit(c: &Cluster, s: TaskSpec) -> Task {
    let (t, created) = c.submit(vec![s]).unwrap().remove(0);
    assert!(created);
    t
}

fn task(c: &Cluster, id: &str) -> Task {
    c.get(id).unwrap()
}

fn all_tasks(c: &Cluster) -> Vec<Task> {
    c.list(&TaskFilter::default(), 1, 10_000).tasks
}

fn registration(
    id: &str,
    tools: &[&str],
    limit: u32,
    inflight: Option<Vec<String>>,
) -> NodeRegister {
    NodeRegister {
        node_id: Some(id.to_owned()),
        name: format!("node {id}"),
        tools: tools
            .iter()
            .map(|t| ToolSpec::Name((*t).to_owned()))
            .collect(),
        max_concurrent_tasks: Some(limit),
        inflight,
        ..NodeRegister::default()
    }
}

/// Every message queued on a connection so far (pings and encoding switches skipped).
fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<HubMessage> {
    let mut out = Vec::new();
    while let Ok(o) = rx.try_recv() {
        if let Outbound::Msg(m) = o {
            out.push(m);
        }
    }
    out
}

fn next_msg(rx: &mut mpsc::Receiver<Outbound>) -> HubMessage {
    loop {
        match rx.try_recv() {
            Ok(Outbound::Msg(m)) => return m,
            Ok(_) => {}
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }
}

/// A fake node: its connection as the engine sees it, and the frames sent to it.
struct FakeNode {
    id: String,
    conn: ConnHandle,
    rx: mpsc::Receiver<Outbound>,
}

impl FakeNode {
    fn frames(&mut self) -> Vec<HubMessage> {
        drain(&mut self.rx)
    }

    fn assigns(&mut self) -> Vec<TaskAssign> {
        self.frames()
            .into_iter()
            .filter_map(|m| match m {
                HubMessage::TaskAssign(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    fn result(&self, c: &Cluster, task_id: &str, attempt: Option<u32>, v: Value) -> TaskResultAck {
        c.task_result(
            &self.id,
            TaskResult {
                task_id: task_id.to_owned(),
                node_id: Some(self.id.clone()),
                attempt,
                success: true,
                result: Some(v),
                error: None,
                execution_time: Some(1),
            },
        )
    }

    fn killed(&self) -> bool {
        self.conn.kill.notified().now_or_never().is_some()
    }

    /// The connection has sent nothing for longer than the heartbeat timeout (the session has
    /// not declared it dead yet): a registration of its node id on another connection
    /// replaces it at once.
    fn go_silent(&self) {
        self.conn.last_seen_ms.store(0, Ordering::Relaxed);
    }
}

/// A heartbeat whose `stats.activeTasks` is `active`.
fn heartbeat_with_active(active: u64) -> Heartbeat {
    Heartbeat {
        node_id: String::new(),
        status: None,
        stats: Some(apex_protocol::NodeStats {
            active_tasks: active,
            ..Default::default()
        }),
    }
}

/// Opens a connection, checks the `connection_ack` greeting, registers and checks that
/// `node_registered` comes next. Frames after it (task assignments) stay queued.
fn connect_with(c: &Cluster, reg: NodeRegister) -> FakeNode {
    let id = reg.node_id.clone().unwrap();
    let (conn, mut rx) = c.open_connection("test".into());
    match next_msg(&mut rx) {
        HubMessage::ConnectionAck(a) => assert!(!a.server_id.is_empty()),
        other => panic!("first frame must be connection_ack, got {other:?}"),
    }
    assert_eq!(c.register_native(&conn, reg), id);
    match next_msg(&mut rx) {
        HubMessage::NodeRegistered(r) => {
            assert!(r.success);
            assert_eq!(r.node_id, id);
            let info = r.hub_info.unwrap();
            assert_eq!(info.heartbeat_interval_ms, 1000);
            assert_eq!(info.heartbeat_timeout_ms, 3000);
        }
        other => panic!("expected node_registered, got {other:?}"),
    }
    FakeNode { id, conn, rx }
}

fn connect(c: &Cluster, id: &str, tools: &[&str], limit: u32) -> FakeNode {
    connect_with(c, registration(id, tools, limit, None))
}

fn kinds(t: &Task) -> Vec<EventKind> {
    t.events.iter().map(|e| e.kind).collect()
}

/// The invariants of an event log: starts with `task_created`, numbered 1..n, and a terminal
/// task has exactly one terminal event, the last one, matching its status.
fn check_events(t: &Task) {
    assert_eq!(t.events[0].kind, EventKind::TaskCreated, "{:?}", kinds(t));
    for (i, e) in t.events.iter().enumerate() {
        assert_eq!(e.seq as usize, i + 1);
        assert_eq!(e.task_id, t.id);
    }
    let terminal = t.events.iter().filter(|e| e.kind.is_terminal()).count();
    if t.status.is_terminal() {
        assert_eq!(terminal, 1, "{:?}", kinds(t));
        let last = t.events.last().unwrap();
        assert!(last.kind.is_terminal(), "{:?}", kinds(t));
        assert_eq!(last.status, t.status);
        assert!(t.finished_at.is_some());
    } else {
        assert_eq!(terminal, 0, "{:?}", kinds(t));
        assert!(t.finished_at.is_none());
    }
}

#[test]
fn registration_answers_node_registered_then_dispatches_queued_tasks() {
    let c = new_cluster();
    let t1 = submit(&c, spec("echo"));
    let t2 = submit(&c, spec("echo"));
    assert_eq!(t1.status, TaskStatus::Queued);
    assert_eq!(t1.attempt, 0);
    assert_eq!(t1.node_id, None);
    assert_eq!(c.health().queue_depth, 2);

    let mut n = connect(&c, "n1", &["echo"], 4);
    let a = n.assigns();
    assert_eq!(a.len(), 2);
    // Older first at equal priority.
    assert_eq!(a[0].task_id, t1.id);
    assert_eq!(a[1].task_id, t2.id);
    for x in &a {
        assert_eq!(x.node_id, "n1");
        assert_eq!(x.tool_name, "echo");
        assert_eq!(x.tool_args, json!({"text": "hello"}));
        assert_eq!(x.attempt, Some(1));
        assert_eq!(x.priority, Some(5));
        assert!(x.timeout.is_some_and(|ms| ms > 0 && ms <= 300_000));
    }
    let t = task(&c, &t1.id);
    assert_eq!(t.status, TaskStatus::Assigned);
    assert_eq!(t.attempt, 1);
    assert_eq!(t.node_id.as_deref(), Some("n1"));
    assert!(t.started_at.is_some());
    assert_eq!(kinds(&t), [EventKind::TaskCreated, EventKind::TaskAssigned]);
    let view = c.node("n1").unwrap();
    assert_eq!(view.status, NodeState::Online);
    assert_eq!(view.dialect, Dialect::Native);
    assert_eq!(view.tools, ["echo"]);
    assert_eq!(view.active_tasks, 2);
    assert_eq!(view.max_concurrent_tasks, 4);
    assert_eq!(c.health().queue_depth, 0);
}

#[test]
fn a_new_task_goes_straight_to_an_idle_node_and_respects_its_limit() {
    let c = new_cluster();
    let mut n = connect(&c, "n1", &["echo"], 2);
    let ts: Vec<Task> = (0..3).map(|_| submit(&c, spec("echo"))).collect();
    assert_eq!(
        ts[0].status,
        TaskStatus::Assigned,
        "submit returns the dispatched state"
    );
    assert_eq!(n.assigns().len(), 2);
    assert_eq!(task(&c, &ts[2].id).status, TaskStatus::Queued);
    // A finished task frees a slot for the waiting one.
    assert!(n.result(&c, &ts[0].id, Some(1), json!("ok")).success);
    let a = n.assigns();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task_id, ts[2].id);
}

#[test]
fn work_spreads_over_nodes_offering_the_tool() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 10);
    let mut b = connect(&c, "b", &["echo", "sha256"], 10);
    for _ in 0..4 {
        submit(&c, spec("echo"));
    }
    let sha = submit(&c, spec("sha256"));
    assert_eq!(a.assigns().len(), 2);
    let on_b = b.assigns();
    assert_eq!(on_b.len(), 3);
    assert!(on_b.iter().any(|x| x.task_id == sha.id));
    let nobody = submit(&c, spec("no-such-tool"));
    assert_eq!(task(&c, &nobody.id).status, TaskStatus::Queued);
}

#[test]
fn a_result_is_committed_exactly_once() {
    let c = new_cluster();
    let mut n = connect(&c, "n1", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    assert_eq!(n.assigns().len(), 1);

    let ack = n.result(&c, &t.id, Some(1), json!({"echo": "first"}));
    assert!(ack.success);
    assert_eq!(ack.task_id, t.id);
    assert_eq!(ack.node_id, "n1");
    let done = task(&c, &t.id);
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(done.result, Some(json!({"echo": "first"})));
    assert_eq!(done.progress, 100.0);

    let dup = n.result(&c, &t.id, Some(1), json!({"echo": "second"}));
    assert!(!dup.success);
    assert!(dup.message.is_some());
    let after = task(&c, &t.id);
    assert_eq!(after.result, Some(json!({"echo": "first"})));
    assert_eq!(after.events, done.events, "a duplicate adds no event");
    assert_eq!(c.stats().results_ignored.load(Ordering::Relaxed), 1);
    assert_eq!(c.node("n1").unwrap().completed_tasks, 1);
    assert_eq!(c.node("n1").unwrap().active_tasks, 0);
    check_events(&after);

    let unknown = n.result(&c, "no-such-task", Some(1), json!(null));
    assert!(!unknown.success);
}

#[test]
fn a_failure_result_is_committed_with_the_node_error() {
    let c = new_cluster();
    let mut n = connect(&c, "n1", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    n.assigns();
    let ack = c.task_result(
        "n1",
        TaskResult {
            task_id: t.id.clone(),
            attempt: Some(1),
            success: false,
            error: Some(ErrorInfo::new("invalid_arguments", "`text` is required")),
            ..TaskResult::default()
        },
    );
    assert!(ack.success);
    let t = task(&c, &t.id);
    assert_eq!(t.status, TaskStatus::Failed);
    let e = t.error.clone().unwrap();
    assert_eq!(e.code, "invalid_arguments");
    assert_eq!(e.message, "`text` is required");
    assert_eq!(t.events.last().unwrap().kind, EventKind::TaskFailed);
    assert_eq!(c.node("n1").unwrap().failed_tasks, 1);
    check_events(&t);
}

#[test]
fn a_result_without_attempt_from_the_right_node_is_accepted() {
    // Third-party nodes do not echo `attempt`.
    let c = new_cluster();
    let mut n = connect(&c, "n1", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    n.assigns();
    assert!(n.result(&c, &t.id, None, json!(1)).success);
    assert_eq!(task(&c, &t.id).status, TaskStatus::Succeeded);
}

#[test]
fn results_from_the_wrong_node_or_attempt_are_ignored() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    assert_eq!(a.assigns().len(), 1);
    let b = connect(&c, "b", &["echo"], 4);

    let from_b = b.result(&c, &t.id, Some(1), json!("from b"));
    assert!(!from_b.success);
    let wrong_attempt = a.result(&c, &t.id, Some(2), json!("attempt 2"));
    assert!(!wrong_attempt.success);
    let unknown_node = c.task_result(
        "ghost",
        TaskResult {
            task_id: t.id.clone(),
            attempt: Some(1),
            success: true,
            ..TaskResult::default()
        },
    );
    assert!(!unknown_node.success);
    let still = task(&c, &t.id);
    assert_eq!(still.status, TaskStatus::Assigned);
    assert_eq!(still.result, None);
    assert_eq!(c.stats().results_ignored.load(Ordering::Relaxed), 3);

    assert!(a.result(&c, &t.id, Some(1), json!("right")).success);
    assert_eq!(task(&c, &t.id).result, Some(json!("right")));
}

#[test]
fn node_loss_migrates_in_flight_tasks_to_another_node() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    assert_eq!(a.assigns()[0].attempt, Some(1));
    let mut b = connect(&c, "b", &["echo"], 4);
    assert!(b.assigns().is_empty());

    assert!(c.lose_node("a", a.conn.id, "socket closed"));
    let on_b = b.assigns();
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].task_id, t.id);
    assert_eq!(on_b[0].attempt, Some(2));
    assert_eq!(on_b[0].node_id, "b");

    let moved = task(&c, &t.id);
    assert_eq!(moved.status, TaskStatus::Assigned);
    assert_eq!(moved.attempt, 2);
    assert_eq!(moved.node_id.as_deref(), Some("b"));
    assert_eq!(
        kinds(&moved),
        [
            EventKind::TaskCreated,
            EventKind::TaskAssigned,
            EventKind::TaskMigrated,
            EventKind::TaskAssigned
        ]
    );
    let migrated = &moved.events[2];
    assert_eq!(migrated.status, TaskStatus::Queued);
    assert_eq!(migrated.node_id.as_deref(), Some("a"));
    assert_eq!(migrated.attempt, 1);
    assert_eq!(moved.events[3].attempt, 2);
    assert_eq!(moved.events[3].node_id.as_deref(), Some("b"));
    assert_eq!(c.stats().migrations.load(Ordering::Relaxed), 1);

    let view = c.node("a").unwrap();
    assert_eq!(view.status, NodeState::Offline);
    assert_eq!(view.active_tasks, 0);
    assert!(view.disconnected_at.is_some());
    assert_eq!(c.health().nodes_online, 1);
    assert_eq!(c.health().nodes_total, 2);

    // The lost node's late result for attempt 1 does not count; b's does.
    assert!(!a.result(&c, &t.id, Some(1), json!("late")).success);
    assert!(!b.result(&c, &t.id, Some(1), json!("old attempt")).success);
    assert!(b.result(&c, &t.id, Some(2), json!("done")).success);
    let done = task(&c, &t.id);
    assert_eq!(done.result, Some(json!("done")));
    check_events(&done);
    // Losing a node twice, or a node never seen, changes nothing.
    assert!(!c.lose_node("a", a.conn.id, "again"));
    assert!(!c.lose_node("ghost", 999, "never seen"));
}

#[test]
fn a_migrated_task_waits_in_the_queue_until_a_node_can_take_it() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    a.assigns();
    assert!(c.lose_node("a", a.conn.id, "socket closed"));
    let waiting = task(&c, &t.id);
    assert_eq!(waiting.status, TaskStatus::Queued);
    assert_eq!(
        waiting.attempt, 1,
        "the attempt counts up at the next assignment"
    );
    assert_eq!(c.health().queue_depth, 1);

    // The same node coming back on a new connection gets it again, as attempt 2.
    let mut a2 = connect(&c, "a", &["echo"], 4);
    let again = a2.assigns();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, Some(2));
    assert_eq!(c.node("a").unwrap().status, NodeState::Online);
}

#[test]
fn node_loss_on_the_last_attempt_fails_the_task_with_node_lost() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 4);
    let t = submit(
        &c,
        TaskSpec {
            max_attempts: 2,
            ..spec("echo")
        },
    );
    a.assigns();
    let mut b = connect(&c, "b", &["echo"], 4);
    assert!(c.lose_node("a", a.conn.id, "killed"));
    assert_eq!(b.assigns()[0].attempt, Some(2));
    assert!(c.lose_node("b", b.conn.id, "killed"));

    let failed = task(&c, &t.id);
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.attempt, 2);
    let err = failed.error.clone().unwrap();
    assert_eq!(err.code, "node_lost");
    assert_eq!(failed.events.last().unwrap().kind, EventKind::TaskFailed);
    check_events(&failed);
    // A node coming back does not revive it.
    let mut a2 = connect(&c, "a", &["echo"], 4);
    assert!(a2.assigns().is_empty());
    assert_eq!(c.health().queue_depth, 0);
}

#[test]
fn a_stale_connection_cannot_unbind_a_re_registered_node() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    old.assigns();
    assert!(!old.killed());
    old.go_silent();

    let (conn2, mut rx2) = c.open_connection("second".into());
    assert_eq!(
        c.register_native(&conn2, registration("n", &["echo"], 4, None)),
        "n"
    );
    assert!(old.killed(), "the replaced connection is told to close");
    let frames = drain(&mut rx2);
    assert!(matches!(frames[0], HubMessage::ConnectionAck(_)));
    assert!(matches!(frames[1], HubMessage::NodeRegistered(_)));
    // The assignment may have died with the old connection, or the node may still run it:
    // nothing is sent until its first heartbeat says. It runs nothing: sent again, same
    // attempt.
    assert_eq!(frames.len(), 2, "{frames:?}");
    c.heartbeat(Some("n"), heartbeat_with_active(0));
    match drain(&mut rx2).as_slice() {
        [HubMessage::TaskAssign(a)] => {
            assert_eq!(a.task_id, t.id);
            assert_eq!(a.attempt, Some(1));
        }
        other => panic!("expected the task to be re-sent, got {other:?}"),
    }

    // The old socket closing afterwards changes nothing.
    assert!(!c.lose_node("n", old.conn.id, "old socket closed"));
    let view = c.node("n").unwrap();
    assert_eq!(view.status, NodeState::Online);
    assert_eq!(view.remote_addr.as_deref(), Some("second"));
    assert_eq!(view.active_tasks, 1);
    let same = task(&c, &t.id);
    assert_eq!(same.status, TaskStatus::Assigned);
    assert_eq!(
        same.attempt, 1,
        "re-registering without `inflight` keeps the tasks"
    );
    assert_eq!(c.stats().migrations.load(Ordering::Relaxed), 0);
    assert!(c.unregister("n", old.conn.id, "stale").success.eq(&false));

    // The node delivers the result on its new connection.
    let ack = c.task_result(
        "n",
        TaskResult {
            task_id: t.id.clone(),
            attempt: Some(1),
            success: true,
            result: Some(json!("ok")),
            ..TaskResult::default()
        },
    );
    assert!(ack.success);
    // Only the new connection's loss takes the node down.
    assert!(c.lose_node("n", conn2.id, "closed"));
    assert_eq!(c.node("n").unwrap().status, NodeState::Offline);
}

#[test]
fn re_registering_with_partial_inflight_migrates_the_tasks_not_listed() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["echo"], 10);
    let ts: Vec<Task> = (0..3).map(|_| submit(&c, spec("echo"))).collect();
    assert_eq!(old.assigns().len(), 3);

    old.go_silent();
    let mut new = connect_with(
        &c,
        registration("n", &["echo"], 10, Some(vec![ts[0].id.clone()])),
    );
    assert!(old.killed());
    let kept = task(&c, &ts[0].id);
    assert_eq!(kept.attempt, 1);
    assert_eq!(kept.status, TaskStatus::Assigned);
    assert!(!kinds(&kept).contains(&EventKind::TaskMigrated));

    let again = new.assigns();
    let mut ids: Vec<&str> = again.iter().map(|a| a.task_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![ts[1].id.as_str(), ts[2].id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(again.iter().all(|a| a.attempt == Some(2)));
    for t in &ts[1..] {
        let t = task(&c, &t.id);
        assert_eq!(t.attempt, 2);
        assert!(kinds(&t).contains(&EventKind::TaskMigrated));
    }
    assert_eq!(c.node("n").unwrap().active_tasks, 3);
    assert_eq!(c.stats().migrations.load(Ordering::Relaxed), 2);
}

#[test]
fn drain_stops_new_assignments_and_undrain_resumes() {
    let c = new_cluster();
    let mut n = connect(&c, "n", &["echo"], 4);
    let running = submit(&c, spec("echo"));
    assert_eq!(n.assigns().len(), 1);

    assert!(c.set_draining("n", true));
    assert_eq!(c.node("n").unwrap().status, NodeState::Draining);
    let hb = c.heartbeat(Some("n"), Heartbeat::default());
    assert!(hb.success);
    assert_eq!(hb.status, "draining");
    let waiting = submit(&c, spec("echo"));
    assert_eq!(waiting.status, TaskStatus::Queued);
    assert!(n.assigns().is_empty());
    // What it already runs still completes.
    assert!(n.result(&c, &running.id, Some(1), json!("ok")).success);
    assert!(
        n.assigns().is_empty(),
        "a freed slot on a draining node stays empty"
    );
    assert_eq!(task(&c, &waiting.id).status, TaskStatus::Queued);

    assert!(c.set_draining("n", false));
    assert_eq!(c.node("n").unwrap().status, NodeState::Online);
    let a = n.assigns();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task_id, waiting.id);
    assert!(!c.set_draining("ghost", true));
}

#[test]
fn heartbeats_are_answered_and_recorded() {
    let c = new_cluster();
    let _n = connect(&c, "n", &["echo"], 4);
    assert!(c.node("n").unwrap().last_heartbeat_at.is_none());
    let ack = c.heartbeat(
        Some("n"),
        Heartbeat {
            node_id: "n".into(),
            status: None,
            stats: Some(apex_protocol::NodeStats {
                active_tasks: 2,
                cpu_usage: Some(12.5),
                ..Default::default()
            }),
        },
    );
    assert!(ack.success);
    assert_eq!(ack.status, "online");
    let view = c.node("n").unwrap();
    assert!(view.last_heartbeat_at.is_some());
    assert_eq!(view.stats.unwrap().cpu_usage, Some(12.5));
    // A heartbeat on a connection that never registered is not accepted.
    let stranger = c.heartbeat(
        None,
        Heartbeat {
            node_id: "n".into(),
            ..Heartbeat::default()
        },
    );
    assert!(!stranger.success);
    assert_eq!(stranger.status, "unknown");
}

#[test]
fn unregister_takes_the_node_offline_and_migrates_its_work() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    a.assigns();
    let mut b = connect(&c, "b", &["echo"], 4);
    let wrong = c.unregister("a", b.conn.id, "wrong connection");
    assert!(!wrong.success);
    assert_eq!(c.node("a").unwrap().status, NodeState::Online);
    let ok = c.unregister("a", a.conn.id, "shutting down");
    assert!(ok.success);
    assert_eq!(ok.node_id, "a");
    assert_eq!(c.node("a").unwrap().status, NodeState::Offline);
    assert_eq!(b.assigns()[0].task_id, t.id);
}

#[test]
fn cancel_of_a_running_task_tells_the_node_and_ignores_its_later_result() {
    let c = new_cluster();
    let mut n = connect(&c, "n", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    n.assigns();
    let cancelled = c.cancel(&t.id).unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(cancelled.error.as_ref().unwrap().code, "task_cancelled");
    let frames = n.frames();
    let cancels: Vec<&TaskCancel> = frames
        .iter()
        .filter_map(|m| match m {
            HubMessage::TaskCancel(x) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].task_id, t.id);
    assert_eq!(cancels[0].attempt, Some(1));
    assert_eq!(cancels[0].reason, "cancelled");

    let late = n.result(&c, &t.id, Some(1), json!("too late"));
    assert!(!late.success);
    let after = task(&c, &t.id);
    assert_eq!(after.status, TaskStatus::Cancelled);
    assert_eq!(after.result, None);
    check_events(&after);
    assert_eq!(c.node("n").unwrap().active_tasks, 0);
    assert!(matches!(
        c.cancel(&t.id),
        Err(CancelError::Terminal("cancelled"))
    ));
    assert!(matches!(
        c.cancel("no-such-task"),
        Err(CancelError::NotFound)
    ));
}

#[test]
fn a_cancelled_queued_task_is_never_dispatched() {
    let c = new_cluster();
    let t = submit(&c, spec("echo"));
    assert_eq!(c.cancel(&t.id).unwrap().status, TaskStatus::Cancelled);
    assert_eq!(c.health().queue_depth, 0);
    let mut n = connect(&c, "n", &["echo"], 4);
    assert!(n.assigns().is_empty());
    check_events(&task(&c, &t.id));
}

#[test]
fn expire_times_out_due_tasks_and_tells_their_node() {
    let c = new_cluster();
    let mut n = connect(&c, "n", &["echo"], 4);
    let running = submit(&c, spec("echo"));
    let queued = submit(&c, spec("nobody-offers-this"));
    n.assigns();
    assert!(c.next_deadline().is_some());
    assert_eq!(c.expire(Instant::now()), 0, "nothing is due yet");
    assert_eq!(task(&c, &running.id).status, TaskStatus::Assigned);

    assert_eq!(c.expire(Instant::now() + Duration::from_secs(100_000)), 2);
    for id in [&running.id, &queued.id] {
        let t = task(&c, id);
        assert_eq!(t.status, TaskStatus::TimedOut);
        assert_eq!(t.error.as_ref().unwrap().code, "task_timeout");
        assert_eq!(t.events.last().unwrap().kind, EventKind::TaskTimedOut);
        check_events(&t);
    }
    let cancel = n
        .frames()
        .into_iter()
        .find_map(|m| match m {
            HubMessage::TaskCancel(x) => Some(x),
            _ => None,
        })
        .unwrap();
    assert_eq!(cancel.task_id, running.id);
    assert_eq!(cancel.reason, "timeout");
    assert_eq!(c.next_deadline(), None);
    assert_eq!(c.expire(Instant::now() + Duration::from_secs(100_000)), 0);
    assert!(!n.result(&c, &running.id, Some(1), json!("late")).success);
    assert_eq!(c.health().queue_depth, 0);
}

#[test]
fn a_short_timeout_expires_before_a_long_one() {
    let c = new_cluster();
    let short = submit(
        &c,
        TaskSpec {
            timeout_seconds: 1.0,
            ..spec("echo")
        },
    );
    let long = submit(&c, spec("echo"));
    assert_eq!(c.expire(Instant::now() + Duration::from_secs(10)), 1);
    assert_eq!(task(&c, &short.id).status, TaskStatus::TimedOut);
    assert_eq!(task(&c, &long.id).status, TaskStatus::Queued);
}

fn vcp_tool(name: &str) -> VcpToolManifest {
    VcpToolManifest {
        name: name.to_owned(),
        description: Some(format!("the {name} plugin")),
        ..VcpToolManifest::default()
    }
}

#[test]
fn vcp_nodes_get_execute_tool_and_string_errors_fail_the_task() {
    let c = new_cluster();
    let (conn, mut rx) = c.open_connection("vcp".into());
    assert!(matches!(next_msg(&mut rx), HubMessage::ConnectionAck(_)));
    let id = c.register_vcp(
        &conn,
        RegisterTools {
            server_name: "desk".into(),
            tools: vec![vcp_tool("Calc"), vcp_tool(INTERNAL_REQUEST_FILE)],
            capabilities: None,
        },
    );
    assert_eq!(id, "vcp-desk");
    let view = c.node(&id).unwrap();
    assert_eq!(view.dialect, Dialect::Vcp);
    assert_eq!(
        view.tools,
        ["Calc"],
        "internal_request_file is never offered"
    );
    assert_eq!(view.max_concurrent_tasks, 8);

    let t = submit(&c, spec("Calc"));
    let exec = match next_msg(&mut rx) {
        HubMessage::ExecuteTool(e) => e,
        other => panic!("expected execute_tool, got {other:?}"),
    };
    assert_eq!(exec.request_id, format!("{}.1", t.id));
    assert_eq!(exec.tool_name, "Calc");
    assert_eq!(exec.tool_args, json!({"text": "hello"}));

    // A result for another attempt is ignored.
    c.tool_result(
        &id,
        ToolResult {
            request_id: format!("{}.2", t.id),
            status: "success".into(),
            result: Some(json!("stale")),
            error: None,
        },
    );
    assert_eq!(task(&c, &t.id).status, TaskStatus::Assigned);

    c.tool_result(
        &id,
        ToolResult {
            request_id: exec.request_id.clone(),
            status: "error".into(),
            result: None,
            error: Some(json!("division by zero")),
        },
    );
    let failed = task(&c, &t.id);
    assert_eq!(failed.status, TaskStatus::Failed);
    let err = failed.error.clone().unwrap();
    assert_eq!(err.message, "division by zero");
    assert_eq!(err.code, "task_execution_failed");
    check_events(&failed);

    let ok = submit(&c, spec("Calc"));
    let exec = match next_msg(&mut rx) {
        HubMessage::ExecuteTool(e) => e,
        other => panic!("expected execute_tool, got {other:?}"),
    };
    c.tool_result(
        &id,
        ToolResult {
            request_id: exec.request_id,
            status: "success".into(),
            result: Some(json!({"value": 42})),
            error: None,
        },
    );
    let ok = task(&c, &ok.id);
    assert_eq!(ok.status, TaskStatus::Succeeded);
    assert_eq!(ok.result, Some(json!({"value": 42})));
}

#[test]
fn vcp_cancel_tool_goes_only_to_nodes_that_declare_it() {
    let c = new_cluster();
    let (conn, rx) = c.open_connection("plain".into());
    let id = c.register_vcp(
        &conn,
        RegisterTools {
            server_name: "plain".into(),
            tools: vec![vcp_tool("A")],
            capabilities: None,
        },
    );
    let mut plain = FakeNode { id, conn, rx };
    let (conn, mut rx) = c.open_connection("able".into());
    let able = c.register_vcp(
        &conn,
        RegisterTools {
            server_name: "able".into(),
            tools: vec![vcp_tool("B")],
            capabilities: Some(VcpCapabilities { cancel_tool: true }),
        },
    );
    let ta = submit(&c, spec("A"));
    let tb = submit(&c, spec("B"));
    assert_eq!(task(&c, &ta.id).node_id.as_deref(), Some(plain.id.as_str()));
    assert_eq!(task(&c, &tb.id).node_id.as_deref(), Some(able.as_str()));
    plain.frames();
    drain(&mut rx);
    c.cancel(&ta.id).unwrap();
    c.cancel(&tb.id).unwrap();
    assert!(
        !plain
            .frames()
            .iter()
            .any(|m| matches!(m, HubMessage::CancelTool(_)))
    );
    let sent = drain(&mut rx);
    assert!(
        sent.iter().any(
            |m| matches!(m, HubMessage::CancelTool(x) if x.request_id == format!("{}.1", tb.id))
        ),
        "{sent:?}"
    );
}

#[test]
fn internal_request_file_is_refused_at_submit_and_not_offered() {
    let c = new_cluster();
    let err = c.submit(vec![spec(INTERNAL_REQUEST_FILE)]).unwrap_err();
    assert!(matches!(err, SubmitError::ForbiddenTool(ref t) if t == INTERNAL_REQUEST_FILE));
    // All or none: a good task in the same batch is not accepted either.
    assert!(
        c.submit(vec![spec("echo"), spec(INTERNAL_REQUEST_FILE)])
            .is_err()
    );
    assert!(all_tasks(&c).is_empty());
    let _n = connect(&c, "n", &["echo", INTERNAL_REQUEST_FILE], 4);
    assert_eq!(c.node("n").unwrap().tools, ["echo"]);
}

#[test]
fn internal_request_file_is_dispatched_when_allowed() {
    let c = Cluster::new(
        ClusterOptions {
            allow_internal_request_file: true,
            ..options(64)
        },
        Box::new(MemoryStore::new()),
    );
    let mut n = connect(&c, "n", &[INTERNAL_REQUEST_FILE], 4);
    assert_eq!(c.node("n").unwrap().tools, [INTERNAL_REQUEST_FILE]);
    submit(&c, spec(INTERNAL_REQUEST_FILE));
    assert_eq!(n.assigns().len(), 1);
}

#[test]
fn pinned_tasks_need_a_known_node_and_run_only_there() {
    let c = new_cluster();
    let err = c
        .submit(vec![TaskSpec {
            pinned_node: Some("ghost".into()),
            ..spec("echo")
        }])
        .unwrap_err();
    assert!(matches!(err, SubmitError::UnknownNode(ref n) if n == "ghost"));
    assert!(
        c.submit(vec![
            spec("echo"),
            TaskSpec {
                pinned_node: Some("ghost".into()),
                ..spec("echo")
            }
        ])
        .is_err()
    );
    assert!(all_tasks(&c).is_empty(), "a refused batch stores nothing");

    let mut a = connect(&c, "a", &["echo"], 10);
    let mut b = connect(&c, "b", &["echo"], 10);
    submit(&c, spec("echo"));
    submit(&c, spec("echo"));
    a.assigns();
    b.assigns();
    // b is now as loaded as a; pinned tasks still all go to b.
    let mut pinned_ids = Vec::new();
    for _ in 0..3 {
        let t = submit(
            &c,
            TaskSpec {
                pinned_node: Some("b".into()),
                ..spec("echo")
            },
        );
        assert_eq!(t.node_id.as_deref(), Some("b"));
        pinned_ids.push(t.id);
    }
    assert!(a.assigns().is_empty());
    assert_eq!(b.assigns().len(), 3);

    // Pinned to a node that is offline: it waits for that node, not for any other. (b's
    // unpinned task moves to a.)
    assert!(c.lose_node("b", b.conn.id, "gone"));
    let on_a = a.assigns();
    assert_eq!(on_a.len(), 1);
    assert!(
        !pinned_ids.contains(&on_a[0].task_id),
        "pinned tasks must not move to a"
    );
    let pinned = submit(
        &c,
        TaskSpec {
            pinned_node: Some("b".into()),
            ..spec("echo")
        },
    );
    assert_eq!(pinned.status, TaskStatus::Queued);
    pinned_ids.push(pinned.id);
    let mut b2 = connect(&c, "b", &["echo"], 10);
    let mut back: Vec<String> = b2.assigns().into_iter().map(|x| x.task_id).collect();
    back.sort_unstable();
    pinned_ids.sort_unstable();
    assert_eq!(
        back, pinned_ids,
        "the 3 migrated pinned tasks and the new one"
    );
}

#[test]
fn an_idempotency_key_returns_the_same_task() {
    let c = new_cluster();
    let keyed = TaskSpec {
        idempotency_key: Some("order-42".into()),
        ..spec("echo")
    };
    let (first, created) = c.submit(vec![keyed.clone()]).unwrap().remove(0);
    assert!(created);
    let (second, created) = c
        .submit(vec![TaskSpec {
            args: json!({"different": true}),
            ..keyed.clone()
        }])
        .unwrap()
        .remove(0);
    assert!(!created);
    assert_eq!(second.id, first.id);
    assert_eq!(second.spec.args, json!({"text": "hello"}));
    // Also within one batch.
    let batch = c
        .submit(vec![
            TaskSpec {
                idempotency_key: Some("k2".into()),
                ..spec("echo")
            },
            TaskSpec {
                idempotency_key: Some("k2".into()),
                ..spec("echo")
            },
        ])
        .unwrap();
    assert!(batch[0].1);
    assert!(!batch[1].1);
    assert_eq!(batch[0].0.id, batch[1].0.id);
    assert_eq!(all_tasks(&c).len(), 2);
}

#[test]
fn a_node_whose_outbound_queue_is_full_is_dropped_and_its_tasks_move() {
    // A node that stops reading: its queue is full by the time work arrives.
    let c = Cluster::new(options(32), Box::new(MemoryStore::new()));
    let (stuck_conn, _stuck_rx) = c.open_connection("stuck".into());
    c.register_native(&stuck_conn, registration("stuck", &["echo"], 100, None));
    while stuck_conn.tx.try_send(Outbound::Ping).is_ok() {}
    let mut b = connect(&c, "b", &["echo"], 100);
    let mut on_b = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(submit(&c, spec("echo")).id);
        on_b.extend(b.assigns());
    }
    assert!(
        stuck_conn.kill.notified().now_or_never().is_some(),
        "the stuck connection is told to close"
    );
    assert_eq!(c.node("stuck").unwrap().status, NodeState::Offline);
    assert_eq!(c.node("b").unwrap().active_tasks, 8);
    assert_eq!(on_b.len(), 8);
    let mut moved = 0;
    for id in &ids {
        let t = task(&c, id);
        assert_eq!(t.status, TaskStatus::Assigned);
        assert_eq!(t.node_id.as_deref(), Some("b"));
        if kinds(&t).contains(&EventKind::TaskMigrated) {
            assert_eq!(t.attempt, 2);
            moved += 1;
        } else {
            assert_eq!(t.attempt, 1);
        }
        check_events(&t);
    }
    assert!(moved >= 1, "the task sent to the stuck node moved: {moved}");
}

#[test]
fn task_progress_sets_running_and_is_fenced() {
    let c = new_cluster();
    let mut n = connect(&c, "n", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    n.assigns();
    let progress = |node: &str, attempt, pct: f64| {
        c.task_progress(
            node,
            TaskProgress {
                task_id: t.id.clone(),
                node_id: Some(node.to_owned()),
                attempt,
                progress: pct,
                message: Some(format!("{pct}% done")),
            },
        )
    };
    assert!(progress("n", Some(1), 40.0));
    let running = task(&c, &t.id);
    assert_eq!(running.status, TaskStatus::Running);
    assert_eq!(running.progress, 40.0);
    assert_eq!(running.message.as_deref(), Some("40% done"));
    let e = running.events.last().unwrap();
    assert_eq!(e.kind, EventKind::TaskProgress);
    assert_eq!(e.progress, Some(40.0));
    assert_eq!(e.status, TaskStatus::Running);

    assert!(!progress("other", Some(1), 50.0));
    assert!(!progress("n", Some(2), 60.0));
    assert_eq!(task(&c, &t.id).progress, 40.0);
    // A running task still takes its result.
    assert!(n.result(&c, &t.id, Some(1), json!("ok")).success);
    assert!(!progress("n", Some(1), 90.0), "no progress after the end");
    check_events(&task(&c, &t.id));
}

#[test]
fn subscribers_see_events_as_they_happen() {
    let c = new_cluster();
    let mut events = c.subscribe();
    let mut n = connect(&c, "n", &["echo"], 4);
    let t = submit(&c, spec("echo"));
    n.assigns();
    n.result(&c, &t.id, Some(1), json!("ok"));
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        assert_eq!(e.task_id, t.id);
        seen.push(e.kind);
    }
    assert_eq!(
        seen,
        [
            EventKind::TaskCreated,
            EventKind::TaskAssigned,
            EventKind::TaskCompleted
        ]
    );
}

#[test]
fn every_task_ends_with_exactly_one_terminal_event() {
    let c = new_cluster();
    let mut a = connect(&c, "a", &["echo"], 2);
    let mut b = connect(&c, "b", &["echo"], 2);
    let ts: Vec<Task> = (0..8)
        .map(|i| {
            submit(
                &c,
                TaskSpec {
                    max_attempts: if i == 0 { 1 } else { 3 },
                    ..spec("echo")
                },
            )
        })
        .collect();
    let mut rounds = 0;
    let mut k = 0u64;
    // Succeed, fail, cancel, lose nodes, time out: keep going until every task has ended.
    while all_tasks(&c).iter().any(|t| !t.status.is_terminal()) {
        rounds += 1;
        assert!(rounds < 50, "tasks never finished");
        for node in [&mut a, &mut b] {
            for x in node.assigns() {
                k += 1;
                let n = k;
                match n % 5 {
                    0 => {
                        // Report twice: the second must be ignored.
                        assert!(node.result(&c, &x.task_id, x.attempt, json!(n)).success);
                        assert!(!node.result(&c, &x.task_id, x.attempt, json!(0)).success);
                    }
                    1 => {
                        c.task_result(
                            &node.id,
                            TaskResult {
                                task_id: x.task_id.clone(),
                                attempt: x.attempt,
                                success: false,
                                error: Some(ErrorInfo::new("boom", "tool failed")),
                                ..TaskResult::default()
                            },
                        );
                    }
                    2 => {
                        let _ = c.cancel(&x.task_id);
                    }
                    _ => {}
                }
            }
        }
        if rounds == 2 {
            // Lose a, then bring it back on a new connection.
            c.lose_node("a", a.conn.id, "killed");
            a = connect(&c, "a", &["echo"], 2);
        }
        if rounds == 4 {
            c.expire(Instant::now() + Duration::from_secs(100_000));
        }
    }
    let all = all_tasks(&c);
    assert_eq!(all.len(), ts.len());
    let counts = c.health().tasks;
    let terminal: u64 = TaskStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| counts[s.index()])
        .sum();
    assert_eq!(terminal, 8);
    let mut endings = Vec::new();
    for t in &all {
        check_events(t);
        let last = t.events.last().unwrap().kind;
        if !endings.contains(&last) {
            endings.push(last);
        }
    }
    // The scenario reaches every way of ending.
    assert_eq!(endings.len(), 4, "{endings:?}");
    assert!(
        all.iter()
            .any(|t| kinds(t).contains(&EventKind::TaskMigrated))
    );
    assert_eq!(c.node("a").unwrap().active_tasks, 0);
    assert_eq!(c.node("b").unwrap().active_tasks, 0);
    assert_eq!(c.health().queue_depth, 0);
}

/// A node must never hold more tasks than its limit, also after a task of its failed with
/// `node_lost` on its last attempt while the node stayed connected.
#[test]
fn a_node_lost_failure_on_re_registration_frees_exactly_one_slot() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["echo"], 2);
    let once = || TaskSpec {
        max_attempts: 1,
        ..spec("echo")
    };
    let t1 = submit(&c, once());
    let t2 = submit(&c, once());
    assert_eq!(old.assigns().len(), 2);
    // The node comes back holding only t2: t1 has used its only attempt and fails.
    old.go_silent();
    let mut new = connect_with(
        &c,
        registration("n", &["echo"], 2, Some(vec![t2.id.clone()])),
    );
    assert_eq!(task(&c, &t1.id).error.unwrap().code, "node_lost");
    submit(&c, spec("echo"));
    submit(&c, spec("echo"));
    let view = c.node("n").unwrap();
    assert!(
        view.active_tasks <= view.max_concurrent_tasks as usize,
        "node runs {} tasks with a limit of {} (assigned now: {})",
        view.active_tasks,
        view.max_concurrent_tasks,
        new.assigns().len()
    );
}

/// The same through a `node_draining` return on the last attempt.
#[test]
fn a_task_returned_on_its_last_attempt_frees_exactly_one_slot() {
    let c = new_cluster();
    let mut n = connect(&c, "n", &["echo"], 2);
    let once = || TaskSpec {
        max_attempts: 1,
        ..spec("echo")
    };
    let t1 = submit(&c, once());
    submit(&c, once());
    assert_eq!(n.assigns().len(), 2);
    let ack = c.task_result(
        "n",
        TaskResult {
            task_id: t1.id.clone(),
            attempt: Some(1),
            success: false,
            error: Some(ErrorInfo::new("node_draining", "the node is shutting down")),
            ..TaskResult::default()
        },
    );
    assert!(ack.success);
    // Handed back unrun: it does not use up the only attempt, it runs again.
    let t = task(&c, &t1.id);
    assert_eq!(t.status, TaskStatus::Assigned);
    assert_eq!(t.attempt, 2);
    assert!(kinds(&t).contains(&EventKind::TaskMigrated));
    submit(&c, spec("echo"));
    submit(&c, spec("echo"));
    let view = c.node("n").unwrap();
    assert!(
        view.active_tasks <= view.max_concurrent_tasks as usize,
        "node runs {} tasks with a limit of {}",
        view.active_tasks,
        view.max_concurrent_tasks
    );
}

#[test]
fn a_drained_node_taking_a_new_connection_gets_work_again() {
    let c = new_cluster();
    let old = connect(&c, "n", &["echo"], 4);
    assert!(c.set_draining("n", true));
    let t = submit(&c, spec("echo"));
    assert_eq!(task(&c, &t.id).status, TaskStatus::Queued);
    // A restarted process registers before the hub noticed the old socket close.
    old.go_silent();
    let mut new = connect(&c, "n", &["echo"], 4);
    assert_eq!(c.node("n").unwrap().status, NodeState::Online);
    assert_eq!(new.assigns().len(), 1);
}

#[test]
fn a_pin_to_a_node_without_the_tool_is_refused() {
    let c = new_cluster();
    let _n = connect(&c, "n", &["echo"], 4);
    let err = c
        .submit(vec![TaskSpec {
            pinned_node: Some("n".into()),
            ..spec("sha256")
        }])
        .unwrap_err();
    assert!(matches!(err, SubmitError::NodeLacksTool { .. }), "{err}");
    assert!(err.to_string().contains("sha256"));
}

#[test]
fn a_node_limit_is_capped_to_fit_its_outbound_queue() {
    let c = Cluster::new(options(64), Box::new(MemoryStore::new()));
    let mut n = connect(&c, "n", &["echo"], 1000);
    assert_eq!(c.node("n").unwrap().max_concurrent_tasks, 32);
    let batch: Vec<TaskSpec> = (0..100).map(|_| spec("echo")).collect();
    c.submit(batch).unwrap();
    assert_eq!(n.assigns().len(), 32);
    assert_eq!(c.node("n").unwrap().status, NodeState::Online);
}

#[test]
fn an_adopted_task_from_another_hub_runs_here_and_keeps_its_history() {
    // Hub "other" accepted the task and has no node; this hub claimed it.
    let other = new_cluster();
    let foreign = submit(&other, spec("echo"));
    assert_eq!(foreign.status, TaskStatus::Queued);

    let c = new_cluster();
    let _earlier = submit(&c, spec("sleep"));
    let mut n = connect(&c, "n1", &["echo"], 4);
    assert_eq!(c.adopt(vec![foreign.clone()]), 1);
    let a = n.assigns();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task_id, foreign.id);
    assert_eq!(a[0].attempt, Some(1));
    assert!(
        n.result(&c, &foreign.id, Some(1), json!({"ok": true}))
            .success
    );
    let t = task(&c, &foreign.id);
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(t.events[0], foreign.events[0], "its history is kept");
    check_events(&t);

    // Known ids and tasks that are not queued are not taken in.
    let mut running = submit(&other, spec("echo"));
    running.status = TaskStatus::Running;
    assert_eq!(c.adopt(vec![foreign.clone(), running]), 0);
    assert_eq!(task(&c, &foreign.id).status, TaskStatus::Succeeded);
}

#[test]
fn free_slots_count_idle_capacity_per_tool_and_node_minus_local_queues() {
    let c = new_cluster();
    assert_eq!(c.free_slots(), FreeSlots::default());
    let mut n1 = connect(&c, "n1", &["echo"], 2);
    let _n2 = connect(&c, "n2", &["echo", "sleep"], 3);
    let s = c.free_slots();
    assert_eq!(s.by_tool["echo"], 5);
    assert_eq!(s.by_tool["sleep"], 3);
    assert_eq!(s.by_node["n1"], 2);
    // n2 offers two tools but has 3 slots: 5 in all, not 8.
    assert_eq!(s.total, 5);

    for _ in 0..6 {
        submit(&c, spec("echo"));
    }
    // 5 running, 1 queued here: nothing more to claim for echo or sleep.
    let s = c.free_slots();
    assert_eq!(s.total, 0);
    assert_eq!(s.by_tool["echo"], 0);
    assert_eq!(s.by_tool["sleep"], 0);
    assert_eq!(s.by_node["n1"], 0);

    // A drained node offers nothing.
    let done: Vec<_> = n1.assigns();
    assert_eq!(done.len(), 2);
    assert!(c.set_draining("n1", true));
    for a in &done {
        assert!(n1.result(&c, &a.task_id, a.attempt, json!(1)).success);
    }
    let s = c.free_slots();
    assert!(!s.by_node.contains_key("n1"));
}

#[test]
fn a_disowned_task_leaves_the_engine_without_an_event_and_its_node_is_told() {
    let c = new_cluster();
    let mut n = connect(&c, "n1", &["echo"], 1);
    let running = submit(&c, spec("echo"));
    let queued = submit(&c, spec("echo"));
    assert_eq!(n.assigns().len(), 1);
    let mut events = c.subscribe();

    // A queued task: simply gone.
    assert!(c.disown(&queued.id));
    assert!(c.get(&queued.id).is_none());

    // A running task: the node is told to stop, its slot is free again, a late result is
    // ignored, and no event was published for either.
    let next = submit(&c, spec("echo"));
    assert!(c.disown(&running.id));
    assert!(c.get(&running.id).is_none());
    let frames = n.frames();
    assert!(frames.iter().any(
        |m| matches!(m, HubMessage::TaskCancel(t) if t.task_id == running.id && t.attempt == Some(1))
    ));
    assert!(
        frames
            .iter()
            .any(|m| matches!(m, HubMessage::TaskAssign(a) if a.task_id == next.id))
    );
    assert!(!n.result(&c, &running.id, Some(1), json!("late")).success);
    while let Ok(e) = events.try_recv() {
        assert_ne!(e.task_id, running.id);
        assert_ne!(e.task_id, queued.id);
    }
    assert!(!c.disown(&running.id));
    assert_eq!(all_tasks(&c).len(), 1);
    let h = c.health();
    assert_eq!(
        h.tasks[TaskStatus::Running.index()] + h.tasks[TaskStatus::Assigned.index()],
        1,
        "the store's counts follow"
    );
    assert_eq!(h.tasks.iter().sum::<u64>(), 1);
    assert_eq!(h.queue_depth, 0);
}

#[test]
fn queued_tasks_without_a_local_node_are_stranded() {
    let c = new_cluster();
    let n = connect(&c, "n1", &["echo"], 1);
    let first = submit(&c, spec("echo"));
    let waiting = submit(&c, spec("echo"));
    // One runs, one waits for a slot of a node that is here: nothing is stranded.
    assert!(c.stranded().is_empty());
    let other = submit(&c, spec("sleep"));
    assert_eq!(
        c.stranded()
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>(),
        vec![other.id.clone()]
    );
    // The node goes: its task is requeued here and, with the waiting one, stranded.
    assert!(c.lose_node("n1", n.conn.id, "test"));
    let mut ids: Vec<String> = c.stranded().into_iter().map(|t| t.id).collect();
    ids.sort();
    let mut want = vec![first.id, waiting.id, other.id];
    want.sort();
    assert_eq!(ids, want);
}

/// Shared mode's hand-over, engine side: a node that registers listing tasks another (dead)
/// hub assigned to it keeps running them here once the claim is taken over; a result it sent
/// meanwhile is held, then committed and acknowledged; a refused hand-over answers it unsaved.
#[test]
fn a_task_handed_over_from_a_dead_hub_stays_on_its_node_and_its_held_result_counts() {
    let c = new_cluster();
    c.enable_handover();
    let held = vec!["t-1".to_owned(), "t-2".to_owned()];
    let mut n = connect_with(&c, registration("n1", &["echo"], 4, Some(held)));
    let mut pending = c.handover_pending(Duration::from_secs(60));
    pending.sort();
    let n1 = "n1".to_owned();
    assert_eq!(
        pending,
        vec![
            ("t-1".to_owned(), n1.clone()),
            ("t-2".to_owned(), n1.clone())
        ]
    );
    let result = |id: &str| TaskResult {
        task_id: id.to_owned(),
        node_id: Some(n1.clone()),
        attempt: Some(1),
        success: true,
        result: Some(json!({"ok": id})),
        error: None,
        execution_time: Some(1),
    };
    // Results for both arrive before the hand-over: held, unanswered.
    assert!(c.task_result_or_hold("n1", result("t-1")).is_none());
    assert!(c.task_result_or_hold("n1", result("t-2")).is_none());
    assert!(n.frames().is_empty());

    // The claim on t-1 is taken over: same node and attempt, no new assignment; the held
    // result is committed and acknowledged.
    let mut t = crate::shared::new_task(spec("echo"));
    t.id = "t-1".to_owned();
    t.status = TaskStatus::Assigned;
    t.attempt = 1;
    t.node_id = Some(n1.clone());
    assert!(c.take_over(t));
    let done = task(&c, "t-1");
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!((done.attempt, done.node_id.as_deref()), (1, Some("n1")));
    assert_eq!(done.result, Some(json!({"ok": "t-1"})));
    let frames = n.frames();
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(matches!(&frames[0], HubMessage::TaskResultAck(a) if a.success && a.task_id == "t-1"));
    assert_eq!(c.node("n1").unwrap().active_tasks, 0);

    // t-2 is refused: its result is answered but not committed.
    c.handover_refused("t-2", "the task is not held by any hub");
    let frames = n.frames();
    assert!(
        matches!(&frames[..], [HubMessage::TaskResultAck(a)] if !a.success && a.task_id == "t-2"),
        "{frames:?}"
    );
    assert!(c.get("t-2").is_none());
    assert!(c.handover_pending(Duration::from_secs(60)).is_empty());

    // A later result for a task nobody hands over is refused at once, as before.
    assert!(!c.task_result_or_hold("n1", result("t-3")).unwrap().success);
}

// Re-registration without `inflight`: kept tasks wait for the node's first heartbeat.

/// Registers `id` on a new connection (the old one silent past the timeout) without
/// `inflight`, and checks that nothing but `node_registered` comes.
fn reconnect_without_inflight(c: &Cluster, old: &FakeNode, tools: &[&str]) -> FakeNode {
    old.go_silent();
    let mut new = connect(c, &old.id, tools, 4);
    let frames = new.frames();
    assert!(
        frames.is_empty(),
        "nothing before the first heartbeat: {frames:?}"
    );
    new
}

#[test]
fn a_node_still_running_its_kept_task_after_a_reconnect_is_not_sent_it_again() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["sleep"], 4);
    let t = submit(&c, spec("sleep"));
    assert_eq!(old.assigns().len(), 1);
    let mut new = reconnect_without_inflight(&c, &old, &["sleep"]);
    assert!(old.killed());
    // The node says it still runs a task: it keeps running its attempt.
    assert!(c.heartbeat(Some("n"), heartbeat_with_active(1)).success);
    assert!(new.assigns().is_empty(), "the kept task is not sent again");
    // Later heartbeats decide nothing either.
    c.heartbeat(Some("n"), heartbeat_with_active(0));
    assert!(new.assigns().is_empty());
    // Its result (a third-party agent sends no attempt) is committed: one execution.
    assert!(new.result(&c, &t.id, None, json!("slept")).success);
    let done = task(&c, &t.id);
    assert_eq!((done.status, done.attempt), (TaskStatus::Succeeded, 1));
    assert!(!kinds(&done).contains(&EventKind::TaskMigrated));
    check_events(&done);
}

#[test]
fn a_node_running_nothing_after_a_reconnect_gets_its_kept_tasks_again_same_attempt() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["sleep"], 4);
    let ts: Vec<Task> = (0..2).map(|_| submit(&c, spec("sleep"))).collect();
    assert_eq!(old.assigns().len(), 2);
    let mut new = reconnect_without_inflight(&c, &old, &["sleep"]);
    // A heartbeat without stats counts as none running.
    c.heartbeat(Some("n"), Heartbeat::default());
    let mut again: Vec<(String, Option<u32>)> = new
        .assigns()
        .into_iter()
        .map(|a| (a.task_id, a.attempt))
        .collect();
    again.sort();
    let mut want: Vec<(String, Option<u32>)> = ts.iter().map(|t| (t.id.clone(), Some(1))).collect();
    want.sort();
    assert_eq!(again, want);
    c.heartbeat(Some("n"), heartbeat_with_active(0));
    assert!(new.assigns().is_empty(), "sent again once");
    for t in &ts {
        assert!(new.result(&c, &t.id, Some(1), json!("ok")).success);
        assert_eq!(task(&c, &t.id).attempt, 1);
    }
}

#[test]
fn kept_tasks_migrate_if_the_new_connection_is_lost_before_the_first_heartbeat() {
    let c = new_cluster();
    let mut old = connect(&c, "n", &["sleep"], 4);
    let t = submit(&c, spec("sleep"));
    old.assigns();
    let new = reconnect_without_inflight(&c, &old, &["sleep"]);
    let mut b = connect(&c, "b", &["sleep"], 4);
    assert!(c.lose_node("n", new.conn.id, "closed"));
    let moved = b.assigns();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].task_id.as_str(), moved[0].attempt),
        (t.id.as_str(), Some(2))
    );
    // A heartbeat of the node on yet another connection sends nothing stale.
    let mut third = connect(&c, "n", &["sleep"], 4);
    c.heartbeat(Some("n"), heartbeat_with_active(0));
    assert!(third.assigns().is_empty());
}

// One node id, one live connection.

fn node_registered(rx: &mut mpsc::Receiver<Outbound>) -> apex_protocol::NodeRegistered {
    match next_msg(rx) {
        HubMessage::NodeRegistered(r) => r,
        other => panic!("expected node_registered, got {other:?}"),
    }
}

#[test]
fn a_second_live_connection_for_a_node_id_is_refused_and_waits_as_standby() {
    let c = new_cluster();
    let mut first = connect(&c, "twin", &["sleep"], 4);
    let t = submit(&c, spec("sleep"));
    assert_eq!(first.assigns().len(), 1);

    let (conn2, mut rx2) = c.open_connection("10.0.0.2:5000".into());
    assert!(matches!(next_msg(&mut rx2), HubMessage::ConnectionAck(_)));
    assert_eq!(
        c.register_native(&conn2, registration("twin", &["sleep"], 4, None)),
        "twin"
    );
    let refused = node_registered(&mut rx2);
    assert!(!refused.success);
    assert!(
        refused.message.contains("node_id_in_use"),
        "{}",
        refused.message
    );
    assert!(refused.message.contains("twin"), "{}", refused.message);
    assert!(
        drain(&mut rx2).is_empty(),
        "a refused connection gets no work"
    );
    assert!(!c.is_bound("twin", conn2.id));
    assert!(c.is_bound("twin", first.conn.id));
    assert!(!first.killed(), "the live connection is not replaced");
    assert_eq!(c.node("twin").unwrap().remote_addr.as_deref(), Some("test"));
    // New work still goes to the first connection, and its results count.
    let t2 = submit(&c, spec("sleep"));
    assert_eq!(first.assigns()[0].task_id, t2.id);
    assert!(first.result(&c, &t.id, Some(1), json!("a")).success);
    assert_eq!(c.stats().migrations.load(Ordering::Relaxed), 0);

    // The first connection is lost: the waiting one takes the id over, tasks kept.
    assert!(c.lose_node("twin", first.conn.id, "closed"));
    let taken = node_registered(&mut rx2);
    assert!(taken.success);
    assert!(c.is_bound("twin", conn2.id));
    assert_eq!(c.node("twin").unwrap().status, NodeState::Online);
    let kept = task(&c, &t2.id);
    assert_eq!((kept.status, kept.attempt), (TaskStatus::Assigned, 1));
    assert_eq!(c.stats().migrations.load(Ordering::Relaxed), 0);
    // It registered without `inflight`: its first heartbeat decides (it runs nothing).
    c.heartbeat(Some("twin"), heartbeat_with_active(0));
    match drain(&mut rx2).as_slice() {
        [HubMessage::TaskAssign(a)] => {
            assert_eq!((a.task_id.as_str(), a.attempt), (t2.id.as_str(), Some(1)))
        }
        other => panic!("expected the kept task again, got {other:?}"),
    }
}

#[test]
fn a_standby_connection_that_closes_stops_waiting() {
    let c = new_cluster();
    let first = connect(&c, "twin", &["sleep"], 4);
    let (conn2, mut rx2) = c.open_connection("second".into());
    assert!(matches!(next_msg(&mut rx2), HubMessage::ConnectionAck(_)));
    c.register_native(&conn2, registration("twin", &["sleep"], 4, None));
    assert!(!node_registered(&mut rx2).success);
    // Its own close does not touch the node.
    assert!(!c.lose_node("twin", conn2.id, "closed"));
    assert!(c.is_bound("twin", first.conn.id));
    // The first connection's loss then takes the node offline as usual.
    assert!(c.lose_node("twin", first.conn.id, "closed"));
    assert_eq!(c.node("twin").unwrap().status, NodeState::Offline);
    assert!(drain(&mut rx2).is_empty());
}

#[test]
fn a_closed_or_silent_connection_is_replaced_at_once() {
    let c = new_cluster();
    // Closed: its queue is gone.
    let FakeNode { conn, rx, .. } = connect(&c, "n", &["echo"], 4);
    drop(rx);
    let _n2 = connect(&c, "n", &["echo"], 4);
    assert!(conn.kill.notified().now_or_never().is_some());
    // Silent past the heartbeat timeout.
    let n2 = _n2;
    n2.go_silent();
    let n3 = connect(&c, "n", &["echo"], 4);
    assert!(n2.killed());
    assert!(c.is_bound("n", n3.conn.id));
}

#[test]
fn vcp_servers_sharing_a_name_get_their_own_ids() {
    let c = new_cluster();
    let reg = || RegisterTools {
        server_name: "desk".into(),
        tools: vec![vcp_tool("Calc")],
        capabilities: None,
    };
    let (a, mut rx_a) = c.open_connection("10.0.0.1:1".into());
    let (b, mut rx_b) = c.open_connection("10.0.0.2:2".into());
    assert_eq!(c.register_vcp(&a, reg()), "vcp-desk");
    assert_eq!(c.register_vcp(&b, reg()), "vcp-desk-2");
    assert!(
        a.kill.notified().now_or_never().is_none(),
        "nobody is evicted"
    );
    // Stable while connected: registering again on the same connection keeps the id.
    assert_eq!(c.register_vcp(&b, reg()), "vcp-desk-2");
    assert_eq!(c.register_vcp(&a, reg()), "vcp-desk");
    let ids: Vec<String> = c.nodes().into_iter().map(|n| n.id).collect();
    assert_eq!(ids, ["vcp-desk", "vcp-desk-2"]);
    // Both run tasks.
    drain(&mut rx_a);
    drain(&mut rx_b);
    let ts: Vec<Task> = (0..2).map(|_| submit(&c, spec("Calc"))).collect();
    let mut on: Vec<String> = ts
        .iter()
        .map(|t| task(&c, &t.id).node_id.unwrap())
        .collect();
    on.sort();
    assert_eq!(on, ["vcp-desk", "vcp-desk-2"]);
    // The first server's connection dies silently; it comes back and takes its id again.
    a.last_seen_ms.store(0, Ordering::Relaxed);
    let (a2, _rx_a2) = c.open_connection("10.0.0.1:3".into());
    assert_eq!(c.register_vcp(&a2, reg()), "vcp-desk");
}

// Chat calls after a restart.

fn assigned(id: &str, seq: u64, tool: &str, node: &str) -> Task {
    let now = SystemTime::now();
    let mut t = Task::accept(id.to_owned(), seq, spec(tool), now);
    t.assign(node, now).unwrap();
    t
}

#[test]
fn chat_calls_found_at_restore_end_caller_gone_and_their_node_is_told_to_cancel() {
    let c = new_cluster();
    let now = SystemTime::now();
    let restored = c.restore(vec![
        assigned("chat-running", 1, "llm.chat@m", "n"),
        Task::accept("chat-queued".into(), 2, spec("llm.chat@m"), now),
        assigned("work", 3, "sleep", "n"),
    ]);
    assert_eq!(
        restored,
        Restored {
            queued: 0,
            awaiting_node: 1,
            finished: 0,
            caller_gone: 2
        }
    );
    for id in ["chat-running", "chat-queued"] {
        let t = task(&c, id);
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.error.as_ref().unwrap().code, "caller_gone");
        check_events(&t);
    }
    assert_eq!(c.health().queue_depth, 0);

    // The node comes back without `inflight`: told to stop the chat call, its other task kept.
    let mut n = connect_with(
        &c,
        NodeRegister {
            models: vec![apex_protocol::ModelSpec::Id("m".into())],
            ..registration("n", &["sleep", "llm.chat"], 4, None)
        },
    );
    match n.frames().as_slice() {
        [HubMessage::TaskCancel(x)] => {
            assert_eq!(x.task_id, "chat-running");
            assert_eq!(x.attempt, Some(1));
            assert_eq!(x.reason, "caller_gone");
        }
        other => panic!("expected one task_cancel, got {other:?}"),
    }
    // Its late result for the chat call changes nothing.
    assert!(!n.result(&c, "chat-running", Some(1), json!("late")).success);
    assert_eq!(task(&c, "chat-running").status, TaskStatus::Failed);
    // The restart-recovered task waits for the first heartbeat like any kept task.
    c.heartbeat(Some("n"), heartbeat_with_active(1));
    assert!(n.assigns().is_empty());
    assert!(n.result(&c, "work", None, json!("ok")).success);
    assert_eq!(task(&c, "work").attempt, 1);
}

#[test]
fn a_restart_recovered_task_is_sent_again_when_its_node_runs_nothing() {
    let c = new_cluster();
    c.restore(vec![assigned("work", 1, "sleep", "n")]);
    let mut n = connect(&c, "n", &["sleep"], 4);
    assert!(n.frames().is_empty());
    c.heartbeat(Some("n"), heartbeat_with_active(0));
    let again = n.assigns();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].task_id.as_str(), again[0].attempt),
        ("work", Some(1))
    );
}

#[test]
fn a_node_listing_inflight_without_a_gone_chat_call_is_not_told_to_cancel_it() {
    let c = new_cluster();
    c.restore(vec![assigned("chat", 1, "llm.chat@m", "n")]);
    let mut n = connect_with(&c, registration("n", &["llm.chat"], 4, Some(vec![])));
    assert!(n.frames().is_empty());
}

#[test]
fn an_adopted_llm_chat_task_without_a_stream_subscriber_runs_like_any_task() {
    let c = new_cluster();
    let mut n = connect_with(
        &c,
        NodeRegister {
            models: vec![apex_protocol::ModelSpec::Id("m".into())],
            ..registration("n", &["llm.chat"], 4, Some(vec![]))
        },
    );
    let t = Task::accept("http-chat".into(), 0, spec("llm.chat@m"), SystemTime::now());
    assert_eq!(c.adopt(vec![t]), 1);
    let a = n.assigns();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].tool_name, "llm.chat");
    assert!(
        n.result(&c, "http-chat", Some(1), json!({"choices": []}))
            .success
    );
    assert_eq!(task(&c, "http-chat").status, TaskStatus::Succeeded);
}

#[test]
fn a_silent_standby_does_not_take_over_and_is_told_to_register_again() {
    let c = new_cluster();
    let mut first = connect(&c, "twin", &["sleep"], 4);
    let t = submit(&c, spec("sleep"));
    first.assigns();
    let (conn2, mut rx2) = c.open_connection("second".into());
    assert!(matches!(next_msg(&mut rx2), HubMessage::ConnectionAck(_)));
    c.register_native(&conn2, registration("twin", &["sleep"], 4, None));
    assert!(!node_registered(&mut rx2).success);
    conn2.last_seen_ms.store(0, Ordering::Relaxed);
    assert!(c.lose_node("twin", first.conn.id, "closed"));
    assert!(!c.is_bound("twin", conn2.id));
    assert_eq!(c.node("twin").unwrap().status, NodeState::Offline);
    assert_eq!(
        task(&c, &t.id).status,
        TaskStatus::Queued,
        "migrated as on any loss"
    );
    assert!(matches!(rx2.try_recv(), Ok(Outbound::Close(1013, _))));
}
