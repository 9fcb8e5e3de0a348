//! Durable task stores: the engine keeps its in-memory index ([`MemoryStore`]) as the authority
//! of a running hub, and [`MirroredStore`] mirrors every change (task upsert with its events,
//! retention delete) to a backend: the embedded database in the data directory
//! ([`embedded`]) or Redis ([`redis`]).
//!
//! Writes never block under the engine lock: each change is queued to a writer thread that
//! group-commits everything queued since its last commit (one redb write transaction or one
//! Redis `MULTI` pipeline per batch). Every queued change takes the next number of a
//! [`Durability`] counter; the HTTP layer reads the counter after submitting and awaits
//! [`Durability::wait`] before answering 201, so an answered task is on disk (or in Redis).
//! A failed batch is kept and retried with backoff; meanwhile [`Durability::check`] reports the
//! store unavailable and submissions answer 503.
//!
//! Records are the JSON of [`Task`] (spec, state, result, events), keyed by task id.

pub mod embedded;
pub mod redis;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::model::{Task, TaskEvent, TaskId};
use crate::store::{self, MemoryStore, NodeRecord, Order, Page, TaskFilter, TaskStore};

/// Which store a hub uses: config key `store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `memory`: nothing survives a restart.
    Memory,
    /// `embedded` (the default): `<data_dir>/tasks.redb`.
    Embedded,
    /// `redis://host:port/db` or `rediss://...`.
    Redis(String),
}

impl StoreKind {
    /// Parses the `store` config value.
    ///
    /// # Errors
    /// A one-line reason for anything other than `memory`, `embedded` or a valid
    /// `redis://`/`rediss://` URL.
    pub fn parse(s: &str) -> Result<StoreKind, String> {
        match s {
            "memory" => Ok(StoreKind::Memory),
            "embedded" => Ok(StoreKind::Embedded),
            url if url.starts_with("redis://") || url.starts_with("rediss://") => {
                ::redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
                Ok(StoreKind::Redis(url.to_owned()))
            }
            _ => Err("must be `memory`, `embedded`, or a redis:// or rediss:// URL".to_owned()),
        }
    }
}

/// A backend of [`MirroredStore`]: where records go. Runs on the writer thread only.
pub trait Backend: Send + 'static {
    /// Every stored task, in any order, and the node registry snapshot.
    ///
    /// # Errors
    /// [`store::Error::Unreadable`] for a record that does not decode; other errors as they come.
    fn load(&mut self) -> Result<(Vec<Task>, Vec<NodeRecord>), store::Error>;
    /// Writes `puts` (task id, task sequence number, record JSON) and `nodes` (node id, node
    /// record JSON), and removes `deletes` (task id, sequence number), atomically.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`]; nothing of the batch is written then.
    fn write(
        &mut self,
        puts: &[(&str, u64, Vec<u8>)],
        nodes: &[(&str, Vec<u8>)],
        deletes: &[(&str, u64)],
    ) -> Result<(), store::Error>;
    /// Called when no change arrived for [`IDLE_TICK`] (lease renewal).
    ///
    /// # Errors
    /// As [`Backend::write`].
    fn idle(&mut self) -> Result<(), store::Error> {
        Ok(())
    }
}

/// How often an idle writer calls [`Backend::idle`].
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// Writer progress: how many queued changes are durable, and the last failure if the store is
/// failing now.
#[derive(Debug, Clone, Default)]
pub struct WriterState {
    /// Changes committed so far (the counter of [`Durability::ticket`]).
    pub durable: u64,
    /// Set while the last commit failed; cleared by the next success.
    pub error: Option<String>,
}

/// Durability tickets: a counter of queued changes and the writer's progress.
#[derive(Debug)]
pub struct Durability {
    enqueued: AtomicU64,
    state: watch::Sender<WriterState>,
    what: String,
    mirrored: bool,
    /// The data-directory lock, held for the life of the hub.
    _lock: Option<std::fs::File>,
}

/// How long a submission waits for its ticket before answering 503.
pub const DURABLE_WAIT: Duration = Duration::from_secs(10);

impl Durability {
    /// A store with nothing to wait for (memory).
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            enqueued: AtomicU64::new(0),
            state: watch::channel(WriterState::default()).0,
            what: "memory".to_owned(),
            mirrored: false,
            _lock: None,
        })
    }

    /// What the store is (`memory`, a file path, a Redis URL without password).
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// The ticket covering every change queued so far.
    pub fn ticket(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// Whether changes are mirrored to durable storage (false for `memory`).
    pub fn is_mirrored(&self) -> bool {
        self.mirrored
    }

    /// Whether every change up to `ticket` is durable now.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.state.borrow().durable >= ticket
    }

    /// Err while the store is failing (submissions answer 503).
    ///
    /// # Errors
    /// The last failure.
    pub fn check(&self) -> Result<(), store::Error> {
        match &self.state.borrow().error {
            Some(e) => Err(self.unavailable(e.clone())),
            None => Ok(()),
        }
    }

    /// [`store::Error::Unavailable`] for this store with `reason`.
    fn unavailable(&self, reason: String) -> store::Error {
        store::Error::Unavailable {
            what: self.what.clone(),
            reason,
        }
    }

    /// Waits until every change up to `ticket` is durable.
    ///
    /// # Errors
    /// The store's failure if it fails first, or a timeout after `limit`.
    pub async fn wait(&self, ticket: u64, limit: Duration) -> Result<(), store::Error> {
        let mut rx = self.state.subscribe();
        let waited = tokio::time::timeout(
            limit,
            rx.wait_for(|s| s.durable >= ticket || s.error.is_some()),
        )
        .await;
        match waited {
            Ok(Ok(s)) if s.durable >= ticket => Ok(()),
            Ok(Ok(s)) => Err(self.unavailable(s.error.clone().unwrap_or_default())),
            Ok(Err(_)) => Err(self.unavailable("the store writer stopped".to_owned())),
            Err(_) => Err(self.unavailable(format!(
                "the task store did not confirm the write within {} s",
                limit.as_secs()
            ))),
        }
    }

    /// Waits until every change queued so far is durable (shutdown).
    pub async fn flush(&self, limit: Duration) -> Result<(), store::Error> {
        self.wait(self.ticket(), limit).await
    }
}

enum Op {
    Put(Box<Task>),
    Delete(TaskId, u64),
    PutNode(Box<NodeRecord>),
}

/// A [`MemoryStore`] whose every change is mirrored to a durable backend.
pub struct MirroredStore {
    inner: MemoryStore,
    tx: std_mpsc::Sender<Op>,
    durability: Arc<Durability>,
    /// The ticket of each task's last queued write, for the read barrier
    /// ([`TaskStore::ticket_of`]); an entry leaves with the task.
    tickets: HashMap<TaskId, u64>,
}

impl MirroredStore {
    /// Queues `op`; returns its ticket.
    fn send(&self, op: Op) -> u64 {
        let ticket = self.durability.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        if self.tx.send(op).is_err() {
            // The writer is gone (it only stops when this store is dropped): report it.
            self.durability.state.send_modify(|s| {
                s.error = Some("the store writer stopped".to_owned());
            });
        }
        ticket
    }

    /// Queues the task's record and notes the ticket of this, its last write. Only this store
    /// bumps the counter, and only through `&mut self`, so the next ticket is known before the
    /// send; a task already written keeps its map entry (no key copy per change).
    fn put(&mut self, task: Box<Task>) {
        let ticket = self.durability.enqueued.load(Ordering::Acquire) + 1;
        match self.tickets.get_mut(task.id.as_str()) {
            Some(t) => *t = ticket,
            None => {
                self.tickets.insert(task.id.clone(), ticket);
            }
        }
        let sent = self.send(Op::Put(task));
        debug_assert_eq!(sent, ticket);
    }
}

impl TaskStore for MirroredStore {
    fn insert(&mut self, task: Task) {
        self.put(Box::new(task.clone()));
        self.inner.insert(task);
    }

    fn get(&self, id: &str) -> Option<&Task> {
        self.inner.get(id)
    }

    fn update(&mut self, id: &str, f: &mut dyn FnMut(&mut Task)) -> bool {
        if !self.inner.update(id, f) {
            return false;
        }
        if let Some(t) = self.inner.get(id) {
            let t = Box::new(t.clone());
            self.put(t);
        }
        true
    }

    fn find_by_idempotency_key(&self, key: &str) -> Option<TaskId> {
        self.inner.find_by_idempotency_key(key)
    }

    fn list(&self, filter: &TaskFilter, order: Order, page: usize, limit: usize) -> Page {
        self.inner.list(filter, order, page, limit)
    }

    fn events_after(&self, id: &str, after: u32) -> Vec<TaskEvent> {
        self.inner.events_after(id, after)
    }

    fn counts(&self) -> [u64; 7] {
        self.inner.counts()
    }

    fn restore(&mut self, task: Task) {
        self.inner.insert(task);
    }

    fn put_node(&mut self, node: NodeRecord) {
        self.send(Op::PutNode(Box::new(node)));
    }

    fn ticket_of(&self, id: &str) -> u64 {
        self.tickets.get(id).copied().unwrap_or(0)
    }

    fn forget(&mut self, id: &str) -> Option<Task> {
        self.tickets.remove(id);
        self.inner.forget(id)
    }

    fn collect_finished_before(&mut self, cutoff: SystemTime) -> usize {
        let ids = self.inner.remove_finished_before(cutoff);
        let n = ids.len();
        for (id, seq) in ids {
            self.tickets.remove(&id);
            self.send(Op::Delete(id, seq));
        }
        n
    }
}

/// An opened store: the engine's store, its durability handle, and the tasks loaded from it.
pub struct Opened {
    /// The store to give the engine.
    pub store: Box<dyn TaskStore>,
    /// Tickets for the HTTP layer.
    pub durability: Arc<Durability>,
    /// Every task found in the store at start (empty for `memory`).
    pub recovered: Vec<Task>,
    /// The node registry snapshot found at start.
    pub nodes: Vec<NodeRecord>,
    /// Shared mode's handles (`hub_mode = "shared"`), `None` otherwise.
    pub shared: Option<crate::shared::SharedHandles>,
}

/// Takes an exclusive lock on `<data_dir>/hub.lock` for as long as the file lives.
///
/// # Errors
/// [`store::Error::Locked`] if another process holds it; [`store::Error::Unavailable`] on I/O errors.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, store::Error> {
    let io = |e: std::io::Error| store::Error::Unavailable {
        what: data_dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let path = data_dir.join("hub.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(store::Error::Locked {
            dir: data_dir.to_owned(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// This hub's persistent id, `<data_dir>/hub-id` (`hub-<uuid>`, created on first use).
///
/// # Errors
/// [`store::Error::Unavailable`] if the file cannot be read or written.
pub fn hub_id(data_dir: &Path) -> Result<String, store::Error> {
    let path = data_dir.join("hub-id");
    let io = |e: std::io::Error| store::Error::Unavailable {
        what: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if !s.is_empty() {
            return Ok(s.to_owned());
        }
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let id = format!("hub-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &id).map_err(io)?;
    Ok(id)
}

/// Opens the store `kind` (embedded: in `data_dir`, which it locks), loads every task in it, and
/// starts its writer thread.
///
/// # Errors
/// [`store::Error`]: locked data directory, unreadable store, unreachable Redis.
pub async fn open(kind: &StoreKind, data_dir: &Path) -> Result<Opened, store::Error> {
    let (lock, what, make): (Option<std::fs::File>, String, BackendFactory) = match kind {
        StoreKind::Memory => {
            return Ok(Opened {
                store: Box::new(MemoryStore::new()),
                durability: Durability::none(),
                recovered: Vec::new(),
                nodes: Vec::new(),
                shared: None,
            });
        }
        StoreKind::Embedded => {
            let lock = lock_data_dir(data_dir)?;
            let path = data_dir.join(embedded::FILE_NAME);
            let what = path.display().to_string();
            (
                Some(lock),
                what,
                Box::new(
                    move || Ok(Box::new(embedded::Embedded::open(&path)?) as Box<dyn Backend>),
                ),
            )
        }
        StoreKind::Redis(url) => {
            let what = redis::redacted(url);
            let url = url.clone();
            let hub_id = hub_id(data_dir)?;
            (
                None,
                what,
                Box::new(move || {
                    Ok(Box::new(redis::RedisBackend::open(&url, &hub_id)?) as Box<dyn Backend>)
                }),
            )
        }
    };
    start(lock, what, make).await
}

/// Starts the writer thread over the backend `make` builds (on that thread), loads what it
/// holds, and returns the mirrored store.
pub(crate) async fn start(
    lock: Option<std::fs::File>,
    what: String,
    make: BackendFactory,
) -> Result<Opened, store::Error> {
    let durability = Arc::new(Durability {
        enqueued: AtomicU64::new(0),
        state: watch::channel(WriterState::default()).0,
        what,
        mirrored: true,
        _lock: lock,
    });
    let (tx, rx) = std_mpsc::channel();
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let d = durability.clone();
    std::thread::Builder::new()
        .name("apex-store".to_owned())
        .spawn(move || {
            let began = std::time::Instant::now();
            let mut backend = match make().and_then(|mut b| {
                let tasks = b.load()?;
                Ok((b, tasks))
            }) {
                Ok((b, (tasks, nodes))) => {
                    tracing::info!(
                        tasks = tasks.len(),
                        nodes = nodes.len(),
                        load_ms = began.elapsed().as_millis() as u64,
                        "task store loaded"
                    );
                    let _ = loaded_tx.send(Ok((tasks, nodes)));
                    b
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            writer_loop(backend.as_mut(), &rx, &d);
        })
        .map_err(|e| store::Error::Unavailable {
            what: durability.describe().to_owned(),
            reason: format!("cannot start the writer thread: {e}"),
        })?;
    let (recovered, nodes) = loaded_rx.await.map_err(|_| store::Error::Unavailable {
        what: durability.describe().to_owned(),
        reason: "the store thread stopped while loading".to_owned(),
    })??;
    Ok(Opened {
        store: Box::new(MirroredStore {
            inner: MemoryStore::new(),
            tx,
            durability: durability.clone(),
            tickets: HashMap::new(),
        }),
        durability,
        recovered,
        nodes,
        shared: None,
    })
}

type BackendFactory = Box<dyn FnOnce() -> Result<Box<dyn Backend>, store::Error> + Send>;

/// Group commit: waits for a change, takes everything queued, commits it in one batch, and
/// publishes progress. A failed batch is retried (with later changes merged in) until it
/// commits. Returns when the store is dropped and everything is written.
fn writer_loop(backend: &mut dyn Backend, rx: &std_mpsc::Receiver<Op>, d: &Durability) {
    let mut pending: HashMap<TaskId, (u64, Option<Box<Task>>)> = HashMap::new();
    let mut pending_nodes: HashMap<String, Box<NodeRecord>> = HashMap::new();
    let mut count: u64 = 0;
    let mut durable: u64 = 0;
    let mut backoff = Duration::from_millis(20);
    let mut closed = false;
    let mut failing_since: Option<std::time::Instant> = None;
    let take = |op: Op,
                pending: &mut HashMap<TaskId, (u64, Option<Box<Task>>)>,
                nodes: &mut HashMap<String, Box<NodeRecord>>| match op {
        Op::Put(t) => {
            pending.insert(t.id.clone(), (t.seq, Some(t)));
        }
        Op::Delete(id, seq) => {
            pending.insert(id, (seq, None));
        }
        Op::PutNode(n) => {
            nodes.insert(n.id.clone(), n);
        }
    };
    loop {
        if pending.is_empty() && pending_nodes.is_empty() {
            if closed {
                return;
            }
            match rx.recv_timeout(IDLE_TICK) {
                Ok(op) => {
                    take(op, &mut pending, &mut pending_nodes);
                    count += 1;
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    match backend.idle() {
                        Ok(()) => {
                            if failing_since.take().is_some() {
                                tracing::info!(
                                    store = d.describe(),
                                    "task store is writable again"
                                );
                                d.state.send_modify(|s| s.error = None);
                            }
                        }
                        Err(e) => {
                            if failing_since.is_none() {
                                failing_since = Some(std::time::Instant::now());
                                tracing::error!(error = %e, "task store unavailable");
                            }
                            d.state.send_modify(|s| s.error = Some(e.to_string()));
                        }
                    }
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(op) => {
                    take(op, &mut pending, &mut pending_nodes);
                    count += 1;
                }
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut puts = Vec::with_capacity(pending.len());
        let mut deletes = Vec::new();
        for (id, (seq, t)) in &pending {
            match t {
                Some(t) => match serde_json::to_vec(t.as_ref()) {
                    Ok(v) => puts.push((id.as_str(), *seq, v)),
                    Err(e) => tracing::error!(task_id = %id, error = %e, "task not encodable"),
                },
                None => deletes.push((id.as_str(), *seq)),
            }
        }
        let nodes: Vec<(&str, Vec<u8>)> = pending_nodes
            .iter()
            .filter_map(|(id, n)| {
                serde_json::to_vec(n.as_ref())
                    .ok()
                    .map(|v| (id.as_str(), v))
            })
            .collect();
        let began = std::time::Instant::now();
        let written = backend.write(&puts, &nodes, &deletes);
        tracing::debug!(
            records = puts.len() + deletes.len(),
            changes = count,
            write_us = began.elapsed().as_micros() as u64,
            "store batch"
        );
        match written {
            Ok(()) => {
                drop(puts);
                drop(deletes);
                drop(nodes);
                pending.clear();
                pending_nodes.clear();
                durable += count;
                count = 0;
                if failing_since.take().is_some() {
                    tracing::info!(store = d.describe(), "task store is writable again");
                }
                d.state.send_replace(WriterState {
                    durable,
                    error: None,
                });
                backoff = Duration::from_millis(20);
            }
            Err(e) => {
                drop(puts);
                drop(deletes);
                drop(nodes);
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    tracing::error!(error = %e, "task store write failed; retrying");
                }
                d.state.send_replace(WriterState {
                    durable,
                    error: Some(e.to_string()),
                });
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}
