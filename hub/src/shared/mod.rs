//! Shared mode (issue 3, `hub_mode = "shared"`): several hubs on one Redis. Any hub takes HTTP
//! calls and node connections; a task submitted at one hub runs on a node of another; a dead
//! hub's tasks are taken over once its lease expires, and a result from an expired lease is
//! never committed (see ARCHITECTURE.md, "Several hubs on one Redis", for what is built and
//! what is not).
//!
//! - [`SharedRedis`] (`client.rs`): one hub's handle on the shared Redis: join and lease,
//!   submit, claim, fenced commit and release; `reaper.rs` what any hub does for the others
//!   (reaper, hand-over, deadlines, retention); `listing.rs` the task list; `nodes.rs` the
//!   cluster-wide node registry and node views; `pubsub.rs` the subscriptions.
//! - [`SharedBackend`] (`backend.rs`): the store writer's backend, and [`open_hub`], which
//!   joins and gives the engine its [`MirroredStore`](crate::durable::MirroredStore).
//! - [`spawn`] (`loops.rs`): the hub's loops (lease and reaper, claimer, cancels, node actions,
//!   hand-over, fenced → disown) and the graceful exit ([`drain`], [`leave`]).
//! - `scripts/*.lua`: every Lua script, each with a header giving its keys, arguments and
//!   reply (loaded in `scripts.rs`).
//!
//! Keys (all under `apex:shared:`):
//! - `task:{id}`: hash with `record` (the [`Task`] JSON, events included), `state` (`queued`,
//!   `claimed` or `done`), `queue` and `member` (where it waits), `claim` (a counter bumped by
//!   every claim), and while claimed `owner` (hub id) and `epoch` (the owner's lease epoch).
//! - `queue:{tool}` and `pinned:{node}`: sorted sets of waiting tasks. Score `-priority`
//!   (exact for every `i32`); member `{seq:020}:{task id}` with `seq` from the global counter
//!   `seq`, so equal priorities pop oldest first (Redis orders equal scores by member).
//! - `epoch`: counter; every [`SharedRedis::join`] takes the next value as the hub's epoch.
//! - `hub:{id}`: the hub's lease, value = its epoch, time-to-live `lease_ttl_ms`, renewed by
//!   [`SharedRedis::renew`]. Once it is gone the hub must stop committing: every commit script
//!   checks it, and a hub that finds it gone has to join again (new epoch, nothing it claimed
//!   before is its any more).
//! - `hubs`: set of hub ids that joined and may still own tasks; `owned:{id}`: task ids a hub
//!   has claimed and not finished.
//! - `idem:{key}`: idempotency key → task id (`SET NX` inside the submit script).
//! - `index`: sorted set of every task id by its `seq` (for listing, newest first);
//!   `finished`: finished task ids by finish time in ms (for retention); `deadlines`: task
//!   ids by deadline in ms (for timing out tasks no hub claimed).
//! - `nodes`: hash node id → [`SharedNode`] JSON (the cluster-wide node registry);
//!   `node-views`: hash node id → the `GET /v1/nodes` object of the hub holding it.
//! - Listing indexes, sorted sets of task ids scored by `seq` (like `index`), kept by every
//!   script that writes a record (`apex_reindex` in `scripts/reindex.lua`, with the task hash
//!   fields `ix_s`, `ix_t`, `ix_n` naming the keys it is in): `ix:status:{status}`,
//!   `ix:tool:{tool}`, `ix:st:{status}:{tool}`, `ix:node:{node}`, `ix:sn:{status}:{node}`
//!   (node: the record's current or last `node_id`).
//!
//! Pub/sub: `apex:shared:wake` carries a queue key whenever a task is added to it;
//! `apex:shared:task-events` carries a task id whenever its record changed (readers re-read the
//! record and send the events after the last sequence number they saw); `apex:shared:cancel`
//! carries ids of tasks to cancel (the hub holding one cancels it); `apex:shared:node-actions`
//! carries drain/undrain requests for a node, naming the hub holding its connection.
//!
//! Fencing: [`SharedRedis::commit`] and [`SharedRedis::release`] write only if the hub's lease
//! still holds its epoch and the task's `owner`, `epoch` and `claim` are the ones it claimed.
//! [`SharedRedis::reap`] requeues a claimed task only if its owner's lease no longer holds the
//! claiming epoch. Both are single scripts, so a result from an expired lease is never
//! committed and a task is never both committed by its old owner and requeued.
//! [`SharedRedis::take_over`] (a dead hub's claim to the hub its node reconnected to) has the
//! same two conditions as the requeue (claim unchanged, old lease not holding its epoch), so the
//! two exclude each other; the reaper leaves such a task to that hub for the hand-over window
//! ([`HANDOVER_WINDOW_LEASES`]).
//!
//! The scripts touch keys they compute from others (the task hashes a claim pops), which a
//! standalone Redis allows; Redis Cluster is not supported.

mod backend;
mod client;
mod listing;
mod loops;
mod nodes;
mod pubsub;
mod reaper;
mod scripts;

pub use backend::{SharedBackend, SharedHandles, open_hub, open_hub_with, open_shared};
pub use client::{
    Claimed, Claims, Commit, Fenced, HubIdentity, NextState, SharedRedis, Submitted, SubmittedTask,
    new_task,
};
pub use loops::{CLAIM_TICK, HANDOVER_TICK, LEASE_TICK, drain, leave, renew_interval, spawn};
pub use nodes::{NodeAction, SharedNode, all_node_views, node_view, subscribe_node_actions};
pub use pubsub::{EndRequest, Wake, subscribe, subscribe_cancels, subscribe_notifications};
pub use reaper::{Reaped, TakeOver, requeue_record};

use crate::model::Task;
use crate::store::one_line;

/// Prefix of every shared-mode key.
pub const PREFIX: &str = "apex:shared:";
/// Pub/sub channel announcing a queue key that received a task.
pub const WAKE_CHANNEL: &str = "apex:shared:wake";
/// Pub/sub channel announcing a task id whose record changed.
pub const EVENTS_CHANNEL: &str = "apex:shared:task-events";
/// Pub/sub channel carrying ids of tasks to cancel: the hub holding the task cancels it.
pub const CANCEL_CHANNEL: &str = "apex:shared:cancel";
/// Pub/sub channel carrying operator actions on a node connected to another hub
/// ([`NodeAction`] JSON); the hub named in it applies them.
pub const NODE_ACTIONS_CHANNEL: &str = "apex:shared:node-actions";
/// Pub/sub channel carrying notifications and alerts for client WebSockets (`crate::notify`
/// JSON envelopes); every hub delivers each to its own connections of the addressee.
pub const NOTIFY_CHANNEL: &str = "apex:shared:notify";
/// Default lifetime of a hub lease, in milliseconds (renewed every second).
pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;
/// How long after a node re-registers at a live hub the reapers leave the tasks a dead hub
/// assigned to it alone (that hub takes them over, see [`SharedRedis::take_over`]), as a
/// multiple of the lease lifetime: the old owner's lease must expire first (one lifetime), then
/// the new hub's hand-over pass must run.
pub const HANDOVER_WINDOW_LEASES: u64 = 3;
/// The task id [`SharedRedis::wake_task`] sends when every follower should read again (the
/// subscription was made again: messages may have been missed meanwhile).
pub const WAKE_ALL: &str = "*";

/// Why a shared-mode call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Redis cannot be reached or answered an error (HTTP: 503).
    #[error("shared store {what} is unavailable: {reason}")]
    Unavailable {
        /// The Redis URL without password.
        what: String,
        /// The cause, one line.
        reason: String,
    },
    /// The hub's lease or the task's claim is no longer this hub's: nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A stored record does not decode.
    #[error("shared store record of task {id} does not decode: {reason}")]
    Unreadable {
        /// Task id.
        id: String,
        /// Decoder message.
        reason: String,
    },
}

/// Where a task waits: its tool's queue, or its pinned node's.
pub fn queue_key(task: &Task) -> String {
    match &task.spec.pinned_node {
        Some(node) => pinned_queue(node),
        None => tool_queue(&task.spec.tool),
    }
}

/// The queue key of a tool.
pub fn tool_queue(tool: &str) -> String {
    format!("{PREFIX}queue:{tool}")
}

/// The queue key of tasks pinned to a node.
pub fn pinned_queue(node: &str) -> String {
    format!("{PREFIX}pinned:{node}")
}

/// A task's hash.
fn task_key(id: &str) -> String {
    format!("{PREFIX}task:{id}")
}

/// A hub's lease.
fn lease_key(hub: &str) -> String {
    format!("{PREFIX}hub:{hub}")
}

/// The ids of the tasks a hub has claimed and not finished.
fn owned_key(hub: &str) -> String {
    format!("{PREFIX}owned:{hub}")
}

/// Queue score: lower pops first, so higher priority gets a lower score. Exact for any `i32`.
fn score(task: &Task) -> f64 {
    -f64::from(task.spec.priority)
}

/// A record's keys in the listing indexes, as script arguments: status, tool, node (empty if
/// none).
fn index_fields(task: &Task) -> Vec<String> {
    vec![
        task.status.as_str().to_owned(),
        task.spec.tool.clone(),
        task.node_id.clone().unwrap_or_default(),
    ]
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    u64::try_from(apex_protocol::now_ms()).unwrap_or(0)
}
