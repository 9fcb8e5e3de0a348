//! Shared mode's store: [`SharedBackend`], the [`Backend`] the store writer thread runs (every
//! write of a held task is a fenced commit), and [`open_hub`], which joins the shared store and
//! gives the engine its [`MirroredStore`](crate::durable::MirroredStore) over that backend, so
//! the gates of single mode hold: an assignment frame leaves only after Redis names this hub
//! owner, a node's result is acknowledged only once its commit returned.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    Claims, Commit, DEFAULT_LEASE_TTL_MS, HubIdentity, NextState, SharedRedis, one_line,
    pinned_queue, tool_queue,
};
use crate::durable::{Backend, Opened};
use crate::model::{Task, TaskStatus};
use crate::store;
use crate::store::NodeRecord;

/// The [`Backend`] of shared mode, for [`MirroredStore`](crate::durable::MirroredStore)'s
/// writer thread: each put of a task this hub holds (see [`Claims`]) becomes a fenced
/// [`SharedRedis::commit`]; puts of tasks it does not hold are not written (the hub has no right
/// to them); node records go to the cluster-wide registry. A fenced commit is not an error of
/// the batch: the task is forgotten in [`Claims`] and its id sent on the `fenced` channel, so
/// the engine can drop it (another hub owns it now).
pub struct SharedBackend {
    rt: tokio::runtime::Runtime,
    redis: SharedRedis,
    claims: Claims,
    fenced: tokio::sync::mpsc::UnboundedSender<String>,
}

impl SharedBackend {
    /// A backend committing as `hub` (its own connection, on a runtime of its own, sharing
    /// the hub's epoch). Call from a thread that is not running a Tokio runtime (the writer
    /// thread).
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] if Redis cannot be reached.
    pub fn open(
        url: &str,
        hub: &HubIdentity,
        claims: Claims,
        fenced: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<Self, store::Error> {
        let what = crate::durable::redis::redacted(url);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| store::Error::Unavailable {
                what: what.clone(),
                reason: one_line(e),
            })?;
        let redis =
            rt.block_on(SharedRedis::attach(url, hub))
                .map_err(|e| store::Error::Unavailable {
                    what: what.clone(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            rt,
            redis,
            claims,
            fenced,
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> store::Error {
        store::Error::Unavailable {
            what: self.redis.what.clone(),
            reason: one_line(e),
        }
    }
}

/// Commits per script call in [`SharedBackend`]'s writes.
const COMMIT_CHUNK: usize = 256;

/// The fields of a stored record that place a commit (the rest is written as it is).
#[derive(Deserialize)]
struct RecordHead {
    status: TaskStatus,
    spec: SpecHead,
    #[serde(default)]
    node_id: Option<String>,
}

/// See [`RecordHead`].
#[derive(Deserialize)]
struct SpecHead {
    tool: String,
    priority: i32,
    pinned_node: Option<String>,
}

impl Backend for SharedBackend {
    fn load(&mut self) -> Result<(Vec<Task>, Vec<NodeRecord>), store::Error> {
        // A shared-mode hub starts empty: its tasks come from claims.
        Ok((Vec::new(), Vec::new()))
    }

    fn write(
        &mut self,
        puts: &[(&str, u64, Vec<u8>)],
        nodes: &[(&str, Vec<u8>)],
        _deletes: &[(&str, u64)],
    ) -> Result<(), store::Error> {
        // Held tasks only, in chunks of `COMMIT_CHUNK`, one script call per chunk; each commit
        // is fenced on its own. The record is written as the writer encoded it (no re-encode);
        // only the fields that place it are decoded.
        let mut commits = Vec::new();
        let mut terminal = Vec::new();
        for (id, _, record) in puts {
            let Some(claim) = self.claims.get(id) else {
                continue;
            };
            let head: RecordHead =
                serde_json::from_slice(record).map_err(|e| self.unavailable(e))?;
            terminal.push(head.status.is_terminal());
            commits.push(Commit {
                id,
                claim,
                record,
                next: if head.status.is_terminal() {
                    NextState::Done
                } else {
                    NextState::Claimed
                },
                queue: match &head.spec.pinned_node {
                    Some(node) => pinned_queue(node),
                    None => tool_queue(&head.spec.tool),
                },
                score: -f64::from(head.spec.priority),
                index: vec![
                    head.status.as_str().to_owned(),
                    head.spec.tool,
                    head.node_id.unwrap_or_default(),
                ],
            });
        }
        for (chunk, done) in commits
            .chunks(COMMIT_CHUNK)
            .zip(terminal.chunks(COMMIT_CHUNK))
        {
            let results = self
                .rt
                .block_on(self.redis.commit_batch(chunk))
                .map_err(|e| self.unavailable(e))?;
            for ((c, done), r) in chunk.iter().zip(done).zip(results) {
                match r {
                    Ok(()) => {
                        if *done {
                            self.claims.remove(c.id);
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(task_id = %c.id, %reason, "commit fenced: another hub holds the task now");
                        self.claims.remove(c.id);
                        let _ = self.fenced.send(c.id.to_owned());
                    }
                }
            }
        }
        for (_, raw) in nodes {
            let node: NodeRecord = serde_json::from_slice(raw).map_err(|e| self.unavailable(e))?;
            self.rt
                .block_on(self.redis.put_node(&node))
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(())
    }
}

/// What a shared-mode hub runs on: its Redis handle, the claims its engine holds, and the ids
/// whose commits were fenced (to drop from the engine).
pub struct SharedHandles {
    /// The Redis URL (for pub/sub connections).
    pub url: String,
    /// The hub's handle (lease, claims, submissions, reads).
    pub redis: Arc<SharedRedis>,
    /// Claim tokens of the tasks the engine holds.
    pub claims: Claims,
    /// Ids of fenced commits, from the store's writer thread.
    pub fenced: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Joins the shared store at `url` as `hub_id` and opens the engine's store over it
/// ([`open_shared`]).
///
/// # Errors
/// [`store::Error::Unavailable`] if Redis cannot be reached.
pub async fn open_hub(url: &str, hub_id: &str) -> Result<Opened, store::Error> {
    open_hub_with(url, hub_id, DEFAULT_LEASE_TTL_MS).await
}

/// [`open_hub`] with a lease lifetime of `lease_ttl_ms` (config `shared_lease_ttl_ms`).
///
/// # Errors
/// [`store::Error::Unavailable`] if Redis cannot be reached.
pub async fn open_hub_with(
    url: &str,
    hub_id: &str,
    lease_ttl_ms: u64,
) -> Result<Opened, store::Error> {
    let redis = SharedRedis::join(url, hub_id, lease_ttl_ms)
        .await
        .map_err(|e| store::Error::Unavailable {
            what: crate::durable::redis::redacted(url),
            reason: e.to_string(),
        })?;
    let claims = Claims::default();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opened = open_shared(url, redis.identity(), claims.clone(), tx).await?;
    opened.shared = Some(SharedHandles {
        url: url.to_owned(),
        redis: Arc::new(redis),
        claims,
        fenced: rx,
    });
    Ok(opened)
}

/// Opens shared mode's store for the hub `hub`: a [`MirroredStore`](crate::durable::MirroredStore)
/// whose writer commits the tasks in `claims` under their claim through a [`SharedBackend`] and
/// sends the ids of fenced commits on `fenced`. Starts empty (a shared-mode hub's tasks come
/// from claims).
///
/// # Errors
/// [`store::Error::Unavailable`] if Redis cannot be reached.
pub async fn open_shared(
    url: &str,
    hub: HubIdentity,
    claims: Claims,
    fenced: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<Opened, store::Error> {
    let what = crate::durable::redis::redacted(url);
    let url = url.to_owned();
    crate::durable::start(
        None,
        what,
        Box::new(move || {
            Ok(Box::new(SharedBackend::open(&url, &hub, claims, fenced)?) as Box<dyn Backend>)
        }),
    )
    .await
}
