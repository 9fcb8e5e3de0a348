//! The log channel's source: a ring buffer of the last N entries and a bounded broadcast of new
//! ones. Entries come from node `log` frames (`http/node_channel.rs`), node events, and task
//! outcomes (tool runs, as VCP's `vcp_log`), fed by [`forward_cluster_events`].
//!
//! Publishing never blocks: the broadcast is bounded (`stream_buffer_events`) and a client that
//! falls behind skips entries, counted in `apex_stream_events_dropped_total{stream="log"}`.
//!
//! Wire shape of an entry (what log clients receive): `{"type": T, "data": {...}}` with
//! - `node_log`: `{node_id, level, message, timestamp}` (a node's `log` frame);
//! - `hub_event`: `{event, node_id?, task_id?, level, message, timestamp}`;
//! - `vcp_log`: `{tool_name, status: "success"|"error", content, task_id, node_id?, level,
//!   timestamp}` (a finished tool run; `content` is the result as JSON text, or the error
//!   message, cut at 4 KiB).
//!
//! `timestamp` is RFC 3339; `level` is `debug`, `info`, `warn` or `error`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use crate::engine::Cluster;
use crate::events::NodeEventKind;
use crate::metrics;
use crate::model::{EventKind, Rfc3339, TaskStatus};

/// Longest `content` of a `vcp_log` entry, in bytes.
const MAX_CONTENT: usize = 4096;

/// Severity of an entry, for the channel's `level` filter (at least this severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Debug detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something went wrong and was handled.
    Warn,
    /// A failure.
    Error,
}

impl Level {
    /// Parses `debug`, `info`, `warn`/`warning`, `error` (any case); other text is `info`
    /// when `lenient`, else `None`.
    pub fn parse(s: &str, lenient: bool) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "trace" | "debug" => Some(Level::Debug),
            "info" | "log" | "notice" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warn),
            "error" | "err" | "fatal" | "critical" => Some(Level::Error),
            _ => lenient.then_some(Level::Info),
        }
    }
}

/// One entry of the log channel.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// `node_log`, `hub_event` or `vcp_log`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The entry's fields (see the module docs).
    pub data: Value,
    /// Node the entry is about, for the `node` filter.
    #[serde(skip)]
    pub node_id: Option<String>,
    /// Severity, for the `level` filter.
    #[serde(skip)]
    pub level: Level,
}

/// Ring buffer plus live broadcast of log entries.
pub struct LogHub {
    ring: Mutex<VecDeque<Arc<LogEntry>>>,
    capacity: usize,
    tx: broadcast::Sender<Arc<LogEntry>>,
}

impl LogHub {
    /// A hub keeping the last `capacity` entries; subscribers may lag `buffer` entries.
    pub fn new(capacity: usize, buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(16));
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            tx,
        }
    }

    /// Publishes an entry to the ring and to live clients.
    pub fn publish(&self, entry: LogEntry) {
        metrics::get()
            .log_entries
            .with_label_values(&[entry.kind])
            .inc();
        let e = Arc::new(entry);
        let mut ring = self.ring.lock();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(e.clone());
        // Under the ring lock, so a new client's snapshot and subscription line up exactly.
        let _ = self.tx.send(e);
    }

    /// The buffered entries (oldest first) and a receiver of every later one.
    pub fn snapshot_and_subscribe(
        &self,
    ) -> (Vec<Arc<LogEntry>>, broadcast::Receiver<Arc<LogEntry>>) {
        let ring = self.ring.lock();
        let rx = self.tx.subscribe();
        (ring.iter().cloned().collect(), rx)
    }

    /// A node's `log` frame.
    pub fn node_log(&self, node_id: &str, level: &str, message: &str, timestamp: Option<i64>) {
        let lvl = Level::parse(level, true).unwrap_or(Level::Info);
        let ts = timestamp
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .unwrap_or_else(SystemTime::now);
        self.publish(LogEntry {
            kind: "node_log",
            data: json!({
                "node_id": node_id,
                "level": lvl,
                "message": message,
                "timestamp": Rfc3339(ts),
            }),
            node_id: Some(node_id.to_owned()),
            level: lvl,
        });
    }

    /// A hub event about a node or task.
    pub fn hub_event(
        &self,
        event: &str,
        level: Level,
        node_id: Option<&str>,
        task_id: Option<&str>,
        message: String,
    ) {
        let mut data = json!({
            "event": event,
            "level": level,
            "message": message,
            "timestamp": Rfc3339(SystemTime::now()),
        });
        if let Some(n) = node_id {
            data["node_id"] = json!(n);
        }
        if let Some(t) = task_id {
            data["task_id"] = json!(t);
        }
        self.publish(LogEntry {
            kind: "hub_event",
            data,
            node_id: node_id.map(str::to_owned),
            level,
        });
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_CONTENT {
        let mut end = MAX_CONTENT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Turns the engine's node and task events into log entries until `stop` flips. Lagging here
/// (a burst larger than the broadcast buffers) skips events and counts them.
pub async fn forward_cluster_events(
    cluster: Cluster,
    logs: Arc<LogHub>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = cluster.subscribe();
    let mut nodes = cluster.subscribe_nodes();
    let dropped = metrics::get().stream_dropped.with_label_values(&["log"]);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            n = nodes.recv() => match n {
                Ok(e) => {
                    let level = match e.kind {
                        NodeEventKind::NodeLost => Level::Warn,
                        _ => Level::Info,
                    };
                    let msg = match &e.reason {
                        Some(r) => format!("{} {}: {r}", e.kind.as_str(), e.node_id),
                        None => format!("{} {}", e.kind.as_str(), e.node_id),
                    };
                    logs.hub_event(e.kind.as_str(), level, Some(&e.node_id), None, msg);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => dropped.inc_by(n),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            t = tasks.recv() => match t {
                Ok(e) => match e.kind {
                    EventKind::TaskMigrated => logs.hub_event(
                        "task_migrated",
                        Level::Warn,
                        e.node_id.as_deref(),
                        Some(&e.task_id),
                        e.message.clone().unwrap_or_else(|| "task migrated".to_owned()),
                    ),
                    k if k.is_terminal() => {
                        // Read what the entry needs under the lock; no clone of the task.
                        let Some((tool, status, node_id, content)) =
                            cluster.with_task(&e.task_id, |t| {
                                let content = match (&t.result, &t.error) {
                                    _ if t.status != TaskStatus::Succeeded => t
                                        .error
                                        .as_ref()
                                        .map(|x| format!("{}: {}", x.code, x.message))
                                        .unwrap_or_else(|| t.status.as_str().to_owned()),
                                    (Some(r), _) => r.to_string(),
                                    (None, _) => String::new(),
                                };
                                (t.spec.tool.clone(), t.status, t.node_id.clone(), content)
                            })
                        else {
                            continue;
                        };
                        let ok = status == TaskStatus::Succeeded;
                        let level = if ok { Level::Info } else { Level::Warn };
                        logs.publish(LogEntry {
                            kind: "vcp_log",
                            data: json!({
                                "tool_name": tool,
                                "status": if ok { "success" } else { "error" },
                                "content": cut(content),
                                "task_id": e.task_id,
                                "node_id": node_id,
                                "outcome": status.as_str(),
                                "level": level,
                                "timestamp": Rfc3339(e.timestamp),
                            }),
                            node_id,
                            level,
                        });
                    }
                    _ => {}
                },
                Err(broadcast::error::RecvError::Lagged(n)) => dropped.inc_by(n),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_entries_and_subscribers_get_later_ones() {
        let hub = LogHub::new(3, 16);
        for i in 0..5 {
            hub.node_log("n1", "info", &format!("m{i}"), None);
        }
        let (past, mut rx) = hub.snapshot_and_subscribe();
        let msgs: Vec<_> = past
            .iter()
            .map(|e| e.data["message"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(msgs, ["m2", "m3", "m4"]);
        hub.node_log("n1", "ERROR", "boom", None);
        let e = rx.try_recv().unwrap();
        assert_eq!(e.level, Level::Error);
        assert_eq!(
            serde_json::to_value(&*e).unwrap()["data"]["message"],
            "boom"
        );
    }

    #[test]
    fn content_is_cut_on_a_char_boundary() {
        let s = cut("é".repeat(5000));
        assert!(s.len() <= MAX_CONTENT + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }
}
