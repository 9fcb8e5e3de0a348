//! The notifications bus: every open client WebSocket (`GET /ws`, `http::client_ws`) of this
//! hub, by owner, each with a bounded outbound queue, and [`Notifier::notify`] /
//! [`Notifier::alert`], which put an event in the queues of the addressee's connections.
//!
//! Rules:
//! - **Never blocks.** Frames go to a connection's queue (`ws_queue_len` frames) with
//!   `try_send`; a connection whose queue is full is disconnected ("shed", counted in
//!   `apex_ws_clients_shed_total`) and nobody else waits for it. Streams the client asked for
//!   (chat chunks) are paced instead ([`Outbox::send_paced`]): they wait while the queue is
//!   more than half full, so a burst of tokens does not shed a client that reads, and a
//!   client that reads nothing for [`PACED_MAX_WAIT`] is shed. The registry's lock is never
//!   held across an `.await`.
//! - **Who gets what.** A notification for owner `o` (a [`Principal::id`]: `user:<uuid>`,
//!   `key:<id>`, `admin`) reaches every connection of `o`; an alert reaches every connection
//!   of an admin principal (the `admin` scope).
//! - **Every hub.** In shared mode an event is published once on
//!   [`crate::shared::NOTIFY_CHANNEL`] and each hub (the publisher too) delivers it to its own
//!   connections from its subscription, so a connection gets it exactly once whichever hub
//!   it is connected to. Without Redis (or when publishing fails) it is delivered here.
//!
//! Sources ([`spawn`]): a task of an owner ending (the hub whose engine ran it sees the
//! terminal event, once; in shared mode a task finished in the store while no engine held
//! it, by the hub that finished it), schedule fires (`crate::schedules`), and node loss (an
//! alert, from the hub the node was connected to).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::Cluster;
use crate::events::NodeEventKind;
use crate::principal::Principal;
use crate::shared::SharedRedis;

/// How long a paced frame ([`Outbox::send_paced`]) waits for room before its connection is
/// shed: a client that reads nothing for this long has stopped reading.
pub const PACED_MAX_WAIT: Duration = Duration::from_secs(10);

/// A notification for a user: `{"type": "notification", "data": {title, body, task_id?}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    /// A short line (`task echo succeeded`, a schedule's own title).
    pub title: String,
    /// The text.
    pub body: String,
    /// The task it is about (a task that ended, the task a schedule submitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

/// An operator alert for admins: `{"type": "alert", "data": {level, message}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    /// `info`, `warning` or `error`.
    pub level: String,
    /// What happened, for people.
    pub message: String,
}

/// What the bus carries, serialized as the WebSocket frame it becomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// For one owner's connections.
    Notification(Notification),
    /// For admins' connections.
    Alert(Alert),
}

/// An event with its addressee, as published on [`crate::shared::NOTIFY_CHANNEL`]:
/// `{"owner": "user:…", "event": {…}}` or `{"owner": null, "event": {"type": "alert", …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Envelope {
    /// The owner of a notification; `None` for an alert (admins).
    owner: Option<String>,
    event: Event,
}

/// One frame of a connection's queue: the JSON text, shared by every connection it goes to.
pub type Frame = Arc<str>;

/// The notifications bus of this hub. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    queue_len: usize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Registered>>,
    shared: Option<Arc<SharedRedis>>,
}

/// A connection as the registry holds it.
struct Registered {
    owner: String,
    admin: bool,
    tx: mpsc::Sender<Frame>,
    shed: CancellationToken,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("connections", &self.inner.conns.lock().len())
            .finish()
    }
}

impl Notifier {
    /// A bus whose connections queue at most `queue_len` frames (at least 1), delivering
    /// through `shared`'s Redis channel in shared mode.
    pub fn new(queue_len: usize, shared: Option<Arc<SharedRedis>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue_len: queue_len.max(1),
                next_id: AtomicU64::new(1),
                conns: Mutex::new(HashMap::new()),
                shared,
            }),
        }
    }

    /// Registers a connection of `principal`: it receives `principal`'s notifications (and
    /// alerts, for admins) until the returned [`Connection`] is dropped or it is shed.
    pub fn connect(&self, principal: &Principal) -> Connection {
        let (tx, rx) = mpsc::channel(self.inner.queue_len);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shed = CancellationToken::new();
        self.inner.conns.lock().insert(
            id,
            Registered {
                owner: principal.id.clone(),
                admin: principal.is_admin(),
                tx: tx.clone(),
                shed: shed.clone(),
            },
        );
        crate::metrics::get().ws_clients.inc();
        Connection {
            rx,
            outbox: Outbox {
                id,
                tx,
                shed,
                notifier: self.clone(),
            },
        }
    }

    /// Open connections at this hub.
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().len()
    }

    /// Sends `n` to every connection of `owner`, at every hub (see the module docs).
    pub async fn notify(&self, owner: &str, n: Notification) {
        self.publish(Envelope {
            owner: Some(owner.to_owned()),
            event: Event::Notification(n),
        })
        .await;
    }

    /// Sends `a` to every admin connection, at every hub.
    pub async fn alert(&self, a: Alert) {
        self.publish(Envelope {
            owner: None,
            event: Event::Alert(a),
        })
        .await;
    }

    async fn publish(&self, e: Envelope) {
        if let Some(redis) = &self.inner.shared {
            match serde_json::to_vec(&e) {
                Ok(payload) => match redis.publish_notification(&payload).await {
                    // Every hub (this one too) delivers it from its subscription.
                    Ok(_) => return,
                    Err(err) => tracing::warn!(
                        error = %err,
                        "notification not published to other hubs; delivered at this hub only"
                    ),
                },
                Err(err) => tracing::warn!(error = %err, "notification not encoded"),
            }
        }
        self.deliver(&e);
    }

    /// Puts `e` in the queue of each local connection it is for; sheds those that are full.
    fn deliver(&self, e: &Envelope) {
        let text: Frame = match serde_json::to_string(&e.event) {
            Ok(t) => t.into(),
            Err(err) => {
                tracing::warn!(error = %err, "notification not encoded");
                return;
            }
        };
        let mut full = Vec::new();
        {
            let conns = self.inner.conns.lock();
            for (id, c) in conns.iter() {
                let wanted = match &e.owner {
                    Some(o) => c.owner == *o,
                    None => c.admin,
                };
                if wanted
                    && let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(text.clone())
                {
                    full.push(*id);
                }
            }
        }
        for id in full {
            self.shed(id);
        }
    }

    /// Disconnects connection `id` because its queue is full.
    fn shed(&self, id: u64) {
        let removed = self.inner.conns.lock().remove(&id);
        if let Some(c) = removed {
            c.shed.cancel();
            crate::metrics::get().ws_clients_shed.inc();
            crate::metrics::get().ws_clients.dec();
            tracing::info!(
                owner = %c.owner,
                "client WebSocket disconnected: its outbound queue was full (it stopped reading)"
            );
        }
    }

    fn remove(&self, id: u64) {
        if self.inner.conns.lock().remove(&id).is_some() {
            crate::metrics::get().ws_clients.dec();
        }
    }
}

/// One registered connection: its queue's receiving end (for the writer) and its
/// [`Outbox`]. Dropping it unregisters the connection.
pub struct Connection {
    /// The frames to write, in order.
    pub rx: mpsc::Receiver<Frame>,
    /// The sending side, for the session's own replies.
    pub outbox: Outbox,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.outbox.notifier.remove(self.outbox.id);
    }
}

/// The sending side of one connection's queue, shared by the bus and the session's replies
/// (pong, error, chat frames). Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    id: u64,
    tx: mpsc::Sender<Frame>,
    shed: CancellationToken,
    notifier: Notifier,
}

impl Outbox {
    /// Queues `frame` (JSON text) without waiting. False when the connection is gone or was
    /// just shed because its queue is full (the client stopped reading).
    pub fn send(&self, frame: Frame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.notifier.shed(self.id);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues `frame` once the queue is at most half full, waiting (without blocking anyone)
    /// while the writer drains it: the pace of a stream the client asked for (chat chunks),
    /// which leaves the other half to notifications. A client that frees no room for
    /// `max_wait` is shed. False when the connection is gone or shed.
    pub async fn send_paced(&self, frame: Frame, max_wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.tx.is_closed() || self.is_shed() {
                return false;
            }
            if self.tx.capacity() > self.tx.max_capacity() / 2 {
                return self.send(frame);
            }
            if tokio::time::Instant::now() >= deadline {
                self.notifier.shed(self.id);
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Queues `value` serialized as JSON text (see [`Outbox::send`]).
    pub fn send_json(&self, value: &impl Serialize) -> bool {
        match serde_json::to_string(value) {
            Ok(t) => self.send(t.into()),
            Err(_) => false,
        }
    }

    /// Resolves once the connection has been shed.
    pub fn shed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shed.cancelled()
    }

    /// Whether the connection has been shed.
    pub fn is_shed(&self) -> bool {
        self.shed.is_cancelled()
    }
}

/// The title and body of the notification of a task of `tool` that ended `status`.
fn task_ended(tool: &str, status: &str, detail: Option<&str>) -> (String, String) {
    let title = format!("task {tool} {}", status.replace('_', " "));
    let body = match detail {
        Some(d) if !d.is_empty() => d.to_owned(),
        _ => format!("the {tool} task ended: {status}"),
    };
    (title, body)
}

/// Starts the sources of the bus: task ends and node losses of this hub's engine, and in
/// shared mode the subscription that delivers other hubs' events here (`redis_url`).
pub fn spawn(
    notifier: Notifier,
    cluster: Cluster,
    redis_url: Option<String>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut out = vec![
        tokio::spawn(task_loop(notifier.clone(), cluster.clone(), stop.clone())),
        tokio::spawn(node_loop(notifier.clone(), cluster, stop.clone())),
    ];
    if let Some(redis) = notifier.inner.shared.clone() {
        out.push(tokio::spawn(store_end_loop(
            notifier.clone(),
            redis,
            stop.clone(),
        )));
    }
    if let Some(url) = redis_url {
        out.push(tokio::spawn(subscription_loop(notifier, url, stop)));
    }
    out
}

/// Notifies the owner of each task that ends in this hub's engine. Internal chat lanes
/// (`llm.chat@<model>`, the calls of `/v1/chat/completions`) and tasks without an owner are
/// left out.
async fn task_loop(notifier: Notifier, cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut events = cluster.subscribe();
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        let e = match e {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "task-end notifications skipped: the bus fell behind"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !e.status.is_terminal() {
            continue;
        }
        let Some((owner, tool)) =
            cluster.with_task(&e.task_id, |t| (t.spec.owner.clone(), t.spec.tool.clone()))
        else {
            continue;
        };
        let detail = e
            .error
            .as_ref()
            .map(|x| x.message.clone())
            .or_else(|| e.message.clone());
        notify_task_end(
            &notifier,
            owner.as_deref(),
            &tool,
            e.status.as_str(),
            detail.as_deref(),
            &e.task_id,
        )
        .await;
    }
}

/// Shared mode: notifies the owner of each task this hub finished in the shared store while
/// no engine held it (cancelled while queued, timed out unclaimed: [`SharedRedis::ended`]).
async fn store_end_loop(
    notifier: Notifier,
    redis: Arc<SharedRedis>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ended = redis.ended();
    loop {
        let t = tokio::select! {
            t = ended.recv() => t,
            _ = stop.wait_for(|s| *s) => return,
        };
        let t = match t {
            Ok(t) => t,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "task-end notifications skipped: the bus fell behind"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let detail = t.error.as_ref().map(|x| x.message.clone());
        notify_task_end(
            &notifier,
            t.spec.owner.as_deref(),
            &t.spec.tool,
            t.status.as_str(),
            detail.as_deref(),
            &t.id,
        )
        .await;
    }
}

/// The notification of task `id` of `tool` ending `status`, to its owner (none for internal
/// chat lanes or tasks without an owner).
async fn notify_task_end(
    notifier: &Notifier,
    owner: Option<&str>,
    tool: &str,
    status: &str,
    detail: Option<&str>,
    id: &impl std::fmt::Display,
) {
    let Some(owner) = owner else { return };
    if tool.starts_with("llm.chat@") {
        return;
    }
    let (title, body) = task_ended(tool, status, detail);
    notifier
        .notify(
            owner,
            Notification {
                title,
                body,
                task_id: Some(id.to_string()),
            },
        )
        .await;
}

/// Alerts admins when one of this hub's nodes is lost.
async fn node_loop(notifier: Notifier, cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut events = cluster.subscribe_nodes();
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        let e = match e {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if e.kind != NodeEventKind::NodeLost {
            continue;
        }
        let name = e.node.as_ref().map(|n| n.name.clone());
        let who = match name {
            Some(n) if n != e.node_id => format!("node {n} ({})", e.node_id),
            _ => format!("node {}", e.node_id),
        };
        let why = e.reason.as_deref().unwrap_or("connection lost");
        notifier
            .alert(Alert {
                level: "warning".to_owned(),
                message: format!("{who} is offline: {why}; its tasks migrate"),
            })
            .await;
    }
}

/// Shared mode: delivers every hub's events to this hub's connections, subscribing again
/// (after a second) whenever the subscription drops.
async fn subscription_loop(notifier: Notifier, url: String, mut stop: watch::Receiver<bool>) {
    loop {
        match crate::shared::subscribe_notifications(&url).await {
            Ok(stream) => {
                let mut stream = Box::pin(stream);
                loop {
                    let payload = tokio::select! {
                        p = stream.next() => p,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    let Some(payload) = payload else { break };
                    match serde_json::from_slice::<Envelope>(&payload) {
                        Ok(e) => notifier.deliver(&e),
                        Err(err) => tracing::debug!(error = %err, "undecodable notification"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "notifications not subscribed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn note(t: &str) -> Notification {
        Notification {
            title: t.into(),
            body: "b".into(),
            task_id: None,
        }
    }

    #[tokio::test]
    async fn notifications_reach_only_their_owner_and_alerts_only_admins() {
        let bus = Notifier::new(8, None);
        let alice = Principal::user("a", "j1");
        let bob = Principal::user("b", "j2");
        let mut a = bus.connect(&alice);
        let mut b = bus.connect(&bob);
        let mut admin = bus.connect(&Principal::admin());
        bus.notify("user:a", note("hi")).await;
        bus.alert(Alert {
            level: "warning".into(),
            message: "m".into(),
        })
        .await;
        let got: serde_json::Value = serde_json::from_str(&a.rx.try_recv().unwrap()).unwrap();
        assert_eq!(got["type"], "notification");
        assert_eq!(got["data"]["title"], "hi");
        assert!(got["data"].get("task_id").is_none());
        assert!(a.rx.try_recv().is_err(), "alice gets no alert");
        assert!(b.rx.try_recv().is_err(), "bob gets nothing");
        let got: serde_json::Value = serde_json::from_str(&admin.rx.try_recv().unwrap()).unwrap();
        assert_eq!(got["type"], "alert");
        assert_eq!(got["data"]["level"], "warning");
        drop(b);
        assert_eq!(bus.connections(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_sheds_that_connection_only() {
        let bus = Notifier::new(2, None);
        let slow = bus.connect(&Principal::user("a", "j1"));
        let mut fast = bus.connect(&Principal::user("a", "j2"));
        let before = crate::metrics::get().ws_clients_shed.get();
        for i in 0..3 {
            bus.notify("user:a", note(&i.to_string())).await;
            while fast.rx.try_recv().is_ok() {}
        }
        assert!(slow.outbox.is_shed());
        assert!(!fast.outbox.is_shed());
        assert!(crate::metrics::get().ws_clients_shed.get() > before);
        assert_eq!(bus.connections(), 1);
        assert!(!slow.outbox.send("x".into()) || slow.outbox.is_shed());
    }

    #[tokio::test]
    async fn paced_frames_wait_for_half_the_queue_and_shed_a_client_that_never_reads() {
        let bus = Notifier::new(4, None);
        let mut c = bus.connect(&Principal::user("a", "j1"));
        for i in 0..2 {
            assert!(
                c.outbox
                    .send_paced(i.to_string().into(), PACED_MAX_WAIT)
                    .await
            );
        }
        // Half full: the next one waits until the writer takes a frame.
        let outbox = c.outbox.clone();
        let paced =
            tokio::spawn(async move { outbox.send_paced("2".into(), PACED_MAX_WAIT).await });
        tokio::task::yield_now().await;
        assert_eq!(&*c.rx.recv().await.unwrap(), "0");
        assert!(paced.await.unwrap());
        // Notifications still find room in the other half.
        bus.notify("user:a", note("n")).await;
        assert!(!c.outbox.is_shed());
        // Nobody reads: after the wait, the client is shed.
        assert!(
            !c.outbox
                .send_paced("x".into(), Duration::from_millis(30))
                .await
        );
        assert!(c.outbox.is_shed());
        assert_eq!(bus.connections(), 0);
    }

    #[test]
    fn task_end_texts_name_tool_and_status() {
        let (t, b) = task_ended("echo", "timed_out", None);
        assert_eq!(t, "task echo timed out");
        assert_eq!(b, "the echo task ended: timed_out");
        let (_, b) = task_ended("echo", "failed", Some("boom"));
        assert_eq!(b, "boom");
    }
}
