//! Memory search: `POST /api/v1/memory/query` over the caller's conversation messages and
//! saved memories, `POST /api/v1/memory` (save), `DELETE /api/v1/memory/{id}`.
//!
//! - **Index**: BM25 full text (tantivy, [`index`]) with a tokenizer that makes CJK text
//!   searchable ([`tokenizer`]), in `<data_dir>/memory-index/` beside the store (in RAM with
//!   the `memory` store). With `memory.embedding_model`, hybrid ranking ([`rank`]).
//! - **Owners**: every document carries its owner as an exact-match term and every search
//!   requires the caller's ([`Principal::owner`]); no user is ever shown another's message or
//!   memory (admins included: memory is personal).
//! - **Feed** ([`feed`]): chat turns (through [`Memory::chat_hooks`]), saved memories and
//!   deletes become entries of a durable log in the record store, and each hub tails it into
//!   its own index, its commit recording how far it got, so a restarted hub resumes and every
//!   hub of a shared cluster finds every message. Indexing is asynchronous: a turn only queues
//!   a pointer (well under a microsecond; `apex-bench memory` measures it).
//! - **Read your writes**: a query first waits (up to `memory.query_wait_ms`) until the index
//!   holds what the feed held when the query came (in shared mode, other hubs' entries too),
//!   and a save or delete answers once this hub's index has it.
//!
//! Not covered: a hub killed between a turn's durable append and its feed append (a few ms)
//! leaves that turn out of every index; the feed is never compacted (tens of bytes per turn);
//! BM25 statistics (document frequencies) are computed over the whole index, not per owner.

pub mod config;
mod feed;
pub mod index;
pub mod rank;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use crate::chat::{ChatHooks, Session, StoredMessage};
use crate::llm::embeddings::EmbeddingRequest;
use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;

pub use config::MemoryConfig;
pub use feed::{Entry, FEED_KEY, FEED_KIND};
use index::MemoryIndex;

/// Saved memories: id `<owner>|<memory id>` → [`SavedMemory`] JSON.
pub const MEMORY_KIND: Kind = "memory_item";
/// The index's directory under the data directory.
pub const INDEX_DIR: &str = "memory-index";
/// Entries this hub may have waiting for the feed; past it new ones are dropped (counted in
/// the log) rather than grow without bound while the store is down.
const QUEUE: usize = 65_536;
/// Longest query, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Longest saved memory, in bytes.
pub const MAX_CONTENT_BYTES: usize = 100_000;
/// Most results of one query.
pub const MAX_LIMIT: usize = 100;

/// A saved memory (`POST /api/v1/memory`), as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedMemory {
    /// `mem_<uuid>`.
    pub id: String,
    /// The text.
    pub content: String,
    /// The caller's tags (searchable too).
    #[serde(default)]
    pub tags: Vec<String>,
    /// When it was saved, Unix ms.
    pub created_at_ms: i64,
}

/// One result of a query.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MemoryHit {
    /// A message: `<session_id>#<seq>` (its history position); a saved memory: `mem_<uuid>`
    /// (what `DELETE /api/v1/memory/{id}` takes).
    pub id: String,
    /// The text.
    pub content: String,
    /// The session of a message; null for a saved memory.
    pub session_id: Option<String>,
    /// `user`, `assistant`, `system`, `tool`, or `memory` for a saved memory.
    pub role: String,
    /// When it was said or saved, RFC 3339.
    pub timestamp: String,
    /// BM25 score; with hybrid ranking the blend of normalised BM25 and cosine (0 to 1).
    pub score: f32,
}

/// Why a memory call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is invalid (400 naming it).
    #[error("{message}")]
    Invalid {
        /// The field.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such memory of the caller (404).
    #[error("no memory {0}")]
    NotFound(String),
    /// `memory.enabled = false` (503).
    #[error("memory search is off on this hub (memory.enabled = false)")]
    Disabled,
    /// The store failed (503).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The index failed (500).
    #[error("the memory index failed: {0}")]
    Index(String),
}

/// A query (`POST /api/v1/memory/query`).
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// The words to find (any may match).
    pub query: String,
    /// Only this session's messages.
    pub session_id: Option<String>,
    /// Most results (1 to [`MAX_LIMIT`], default 10).
    pub limit: Option<usize>,
    /// Only what was said or saved at or after this time, Unix ms.
    pub since_ms: Option<i64>,
}

/// The memory service (cheap to clone).
#[derive(Clone)]
pub struct Memory {
    inner: Option<Arc<Inner>>,
}

pub(crate) struct Inner {
    records: RecordStore,
    llm: Arc<crate::llm::GatewayHandle>,
    config: MemoryConfig,
    /// Other hubs write the feed too.
    shared: bool,
    index: Arc<MemoryIndex>,
    queue: mpsc::Sender<Entry>,
    /// Taken by [`Memory::spawn`].
    queue_rx: parking_lot::Mutex<Option<mpsc::Receiver<Entry>>>,
    /// Entries this hub queued (and did not drop).
    queued: AtomicU64,
    /// Dropped because the queue was full.
    dropped: AtomicU64,
    fed: watch::Sender<feed::Fed>,
    /// The feed sequence number the index's last commit reached.
    applied: watch::Sender<u64>,
    /// Wakes the tailer.
    wake: Notify,
    /// Tells the feeder to append what it gathered now.
    flush: Notify,
    /// How long the feeder gathers entries ([`feed::WINDOW`] with the embedded store, else 0).
    window: Duration,
}

/// `<owner>|<id>`: a saved memory's record id.
fn record_id(owner: &str, id: &str) -> String {
    format!("{owner}|{id}")
}

fn unix_ms_now() -> i64 {
    apex_protocol::now_ms()
}

impl Memory {
    /// A service that serves nothing (`memory.enabled = false`): every call answers
    /// [`Error::Disabled`] and nothing is indexed.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens the index for a hub with `config` (in `<data_dir>/memory-index/`, or in RAM with
    /// the `memory` store or when the directory's index cannot be used: another process holds
    /// it, or it does not open, in which case it is rebuilt from the feed) and reads how long
    /// the feed is. Call [`Memory::spawn`] to start indexing.
    ///
    /// # Errors
    /// [`Error::Store`] when the feed cannot be read; [`Error::Index`] when not even an index
    /// in RAM can be made.
    pub async fn open(
        records: RecordStore,
        llm: Arc<crate::llm::GatewayHandle>,
        config: &crate::config::Config,
    ) -> Result<Self, Error> {
        if !config.memory.enabled {
            return Ok(Self::disabled());
        }
        let dir = match config.store_kind() {
            crate::durable::StoreKind::Memory => None,
            _ => Some(config.data_dir.join(INDEX_DIR)),
        };
        let (index, mut applied) = open_index(dir).await?;
        let len = records.log_len(FEED_KIND, FEED_KEY).await?;
        if len < applied {
            tracing::warn!(
                feed = len,
                index = applied,
                "the memory feed is shorter than the index: rebuilding the index"
            );
            index.clear().map_err(|e| Error::Index(e.to_string()))?;
            applied = 0;
        }
        tracing::info!(
            documents = index.len(),
            feed = len,
            indexed = applied,
            on_disk = index.on_disk(),
            hybrid = config.memory.embedding_model.is_some(),
            "memory index open"
        );
        Ok(Self::build(records, llm, config, index, applied, len))
    }

    /// A service over a fresh `records` (its feed empty) with its index in RAM (`AppState::new`
    /// and tests); disabled if `config` says so or the index cannot be made (logged).
    pub fn ram(
        records: RecordStore,
        llm: Arc<crate::llm::GatewayHandle>,
        config: &crate::config::Config,
    ) -> Self {
        if !config.memory.enabled {
            return Self::disabled();
        }
        match MemoryIndex::open(None) {
            Ok((index, _)) => Self::build(records, llm, config, index, 0, 0),
            Err(e) => {
                tracing::error!(error = %e, "memory index not made: memory search is off");
                Self::disabled()
            }
        }
    }

    fn build(
        records: RecordStore,
        llm: Arc<crate::llm::GatewayHandle>,
        config: &crate::config::Config,
        index: MemoryIndex,
        applied: u64,
        feed_len: u64,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            inner: Some(Arc::new(Inner {
                records,
                llm,
                config: config.memory.clone(),
                shared: config.is_shared(),
                index: Arc::new(index),
                queue: tx,
                queue_rx: parking_lot::Mutex::new(Some(rx)),
                queued: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                fed: watch::Sender::new(feed::Fed {
                    count: 0,
                    last_seq: feed_len,
                }),
                applied: watch::Sender::new(applied),
                wake: Notify::new(),
                flush: Notify::new(),
                window: if config.store_kind() == crate::durable::StoreKind::Embedded {
                    feed::WINDOW
                } else {
                    Duration::ZERO
                },
            })),
        }
    }

    /// Starts the feeder and the tailer on the current Tokio runtime (once; later calls, and
    /// calls outside a runtime, do nothing). The tailer ends with `stop`, the feeder when the
    /// service is dropped.
    pub fn spawn(&self, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Vec::new();
        }
        let Some(rx) = inner.queue_rx.lock().take() else {
            return Vec::new();
        };
        vec![
            tokio::spawn(feed::feeder(inner.clone(), rx)),
            tokio::spawn(feed::tailer(inner.clone(), stop)),
        ]
    }

    /// The hooks that queue every stored turn and deleted session of a [`ChatService`]
    /// (crate::chat::ChatService) for the index. Empty when disabled.
    pub fn chat_hooks(&self) -> ChatHooks {
        let Some(inner) = &self.inner else {
            return ChatHooks::default();
        };
        let stored = inner.clone();
        let deleted = inner.clone();
        ChatHooks {
            on_stored: Some(Arc::new(move |s: &Session, msgs: &[StoredMessage]| {
                let seqs = msgs.iter().filter_map(|m| m.id.parse::<u64>().ok());
                let (Some(from), Some(to)) = (seqs.clone().min(), seqs.max()) else {
                    return;
                };
                stored.enqueue(Entry::Turn {
                    owner: s.owner.clone(),
                    sid: s.session_id.clone(),
                    from,
                    to,
                });
            })),
            on_deleted: Some(Arc::new(move |owner: &str, sid: &str| {
                deleted.enqueue(Entry::DropSession {
                    owner: owner.to_owned(),
                    sid: sid.to_owned(),
                });
            })),
        }
    }

    fn inner(&self) -> Result<&Arc<Inner>, Error> {
        self.inner.as_ref().ok_or(Error::Disabled)
    }

    /// Documents in the index now (0 when disabled).
    pub fn documents(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.index.len())
    }

    /// Waits until the index holds everything the feed held when called (this hub's queued
    /// entries appended first), up to `memory.query_wait_ms`. True if it caught up.
    pub async fn caught_up(&self) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.config.query_wait_ms);
        inner.caught_up(deadline).await
    }

    /// The caller's messages and saved memories matching `q`, best first.
    ///
    /// # Errors
    /// [`Error::Invalid`] (`query` empty or too long, `limit`, `session_id`),
    /// [`Error::Disabled`], [`Error::Index`].
    pub async fn query(&self, caller: &Principal, q: &Query) -> Result<Vec<MemoryHit>, Error> {
        let inner = self.inner()?;
        if q.query.trim().is_empty() || q.query.len() > MAX_QUERY_BYTES {
            return Err(Error::Invalid {
                param: "query",
                message: format!("`query` must be 1 to {MAX_QUERY_BYTES} bytes of text"),
            });
        }
        let limit = q.limit.unwrap_or(10);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Error::Invalid {
                param: "limit",
                message: format!("`limit` must be 1 to {MAX_LIMIT}"),
            });
        }
        if let Some(sid) = &q.session_id
            && crate::chat::validate_session_id(sid).is_err()
        {
            return Err(Error::Invalid {
                param: "session_id",
                message: "`session_id` must be 1 to 128 characters of letters, digits and -_.:@"
                    .to_owned(),
            });
        }
        let terms = tokenizer::query_terms(&q.query);
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.config.query_wait_ms);
        let embed = async {
            let model = inner.config.embedding_model.as_ref()?;
            let req = EmbeddingRequest::texts(model.clone(), vec![q.query.clone()]);
            match tokio::time::timeout_at(deadline, inner.llm.get().embeddings(&req)).await {
                Ok(Ok(mut e)) => e.vectors.pop(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "memory query without a vector");
                    None
                }
                Err(_) => None,
            }
        };
        let (_, qvec) = tokio::join!(inner.caught_up(deadline), embed);
        let owner = caller.owner().to_owned();
        let session = q
            .session_id
            .as_deref()
            .map(|sid| index::session_term(&owner, sid));
        let candidates = if qvec.is_some() {
            inner.config.candidates.max(limit)
        } else {
            limit
        };
        let since_ms = q.since_ms;
        let ix = inner.index.clone();
        let hits = tokio::task::spawn_blocking(move || {
            ix.search(&index::Search {
                owner: &owner,
                terms: &terms,
                session: session.as_deref(),
                since_ms,
                limit: candidates,
            })
        })
        .await
        .map_err(|e| Error::Index(e.to_string()))?
        .map_err(|e| Error::Index(e.to_string()))?;
        let cands = hits
            .into_iter()
            .map(|h| rank::Candidate {
                bm25: h.score,
                ts_ms: h.ts_ms,
                vector: h.vector.clone(),
                item: h,
            })
            .collect();
        let weight = inner.config.vector_weight as f32;
        Ok(rank::rank(cands, qvec.as_deref(), weight, limit)
            .into_iter()
            .map(|(score, h)| MemoryHit {
                id: match &h.sid {
                    Some(sid) => format!("{sid}#{}", h.key.rsplit('\u{1}').next().unwrap_or("")),
                    None => h.key.rsplit('\u{1}').next().unwrap_or("").to_owned(),
                },
                content: h.content,
                session_id: h.sid,
                role: h.role,
                timestamp: crate::chat::rfc3339(h.ts_ms),
                score,
            })
            .collect())
    }

    /// Saves a memory of the caller; answers once this hub's index has it.
    ///
    /// # Errors
    /// [`Error::Invalid`] (`content` empty or too long, `tags`), [`Error::Disabled`],
    /// [`Error::Store`].
    pub async fn save(
        &self,
        caller: &Principal,
        content: String,
        tags: Vec<String>,
    ) -> Result<SavedMemory, Error> {
        let inner = self.inner()?;
        if content.trim().is_empty() || content.len() > MAX_CONTENT_BYTES {
            return Err(Error::Invalid {
                param: "content",
                message: format!("`content` must be 1 to {MAX_CONTENT_BYTES} bytes of text"),
            });
        }
        if tags.len() > 32 || tags.iter().any(|t| t.is_empty() || t.len() > 64) {
            return Err(Error::Invalid {
                param: "tags",
                message: "`tags` must be up to 32 strings of 1 to 64 bytes".to_owned(),
            });
        }
        let m = SavedMemory {
            id: format!("mem_{}", uuid::Uuid::new_v4().simple()),
            content,
            tags,
            created_at_ms: unix_ms_now(),
        };
        let raw = serde_json::to_vec(&m).map_err(|e| Error::Index(e.to_string()))?;
        let owner = caller.owner();
        inner
            .records
            .put(MEMORY_KIND, &record_id(owner, &m.id), &raw, None)
            .await?;
        inner.enqueue(Entry::Save {
            owner: owner.to_owned(),
            id: m.id.clone(),
        });
        self.caught_up().await;
        Ok(m)
    }

    /// Deletes a saved memory of the caller; answers once this hub's index no longer has it
    /// (other hubs' within one poll).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the caller has no memory by that id (another user's included),
    /// [`Error::Disabled`], [`Error::Store`].
    pub async fn delete(&self, caller: &Principal, id: &str) -> Result<(), Error> {
        let inner = self.inner()?;
        let owner = caller.owner();
        let valid = id.len() <= 64 && id.starts_with("mem_");
        if !valid
            || !inner
                .records
                .delete(MEMORY_KIND, &record_id(owner, id))
                .await?
        {
            return Err(Error::NotFound(id.to_owned()));
        }
        inner.enqueue(Entry::Forget {
            owner: owner.to_owned(),
            id: id.to_owned(),
        });
        self.caught_up().await;
        Ok(())
    }

    /// Entries this hub dropped because its feed queue was full (0 normally).
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }
}

/// Opens the index in `dir`, falling back to RAM when it cannot be used (see
/// [`Memory::open`]); a directory whose index does not open is moved aside and made anew.
async fn open_index(dir: Option<PathBuf>) -> Result<(MemoryIndex, u64), Error> {
    tokio::task::spawn_blocking(move || {
        let Some(dir) = dir else {
            return MemoryIndex::open(None).map_err(|e| Error::Index(e.to_string()));
        };
        match MemoryIndex::open(Some(&dir)) {
            Ok(x) => return Ok(x),
            Err(tantivy::TantivyError::LockFailure(..)) => {
                tracing::warn!(dir = %dir.display(),
                    "memory index locked by another process: this hub keeps its index in RAM");
                return MemoryIndex::open(None).map_err(|e| Error::Index(e.to_string()));
            }
            Err(e) => {
                let aside = dir.with_extension(format!("broken-{}", unix_ms_now()));
                tracing::warn!(dir = %dir.display(), error = %e, aside = %aside.display(),
                    "memory index does not open: moved aside, rebuilding it from the feed");
                if std::fs::rename(&dir, &aside).is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        MemoryIndex::open(Some(&dir))
            .or_else(|_| MemoryIndex::open(None))
            .map_err(|e| Error::Index(e.to_string()))
    })
    .await
    .map_err(|e| Error::Index(e.to_string()))?
}

impl Inner {
    /// Queues an entry for the feed; never waits.
    fn enqueue(&self, e: Entry) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(e).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "memory feed queue full: entries not indexed");
            }
        }
    }

    async fn caught_up(&self, deadline: tokio::time::Instant) -> bool {
        let want = self.queued.load(Ordering::Acquire);
        let mut fed = self.fed.subscribe();
        if fed.borrow().count < want {
            self.flush.notify_one();
        }
        if tokio::time::timeout_at(deadline, fed.wait_for(|f| f.count >= want))
            .await
            .is_err()
        {
            return false;
        }
        let target = if self.shared {
            match self.records.log_len(FEED_KIND, FEED_KEY).await {
                Ok(n) => n,
                Err(_) => fed.borrow().last_seq,
            }
        } else {
            fed.borrow().last_seq
        };
        let mut applied = self.applied.subscribe();
        if *applied.borrow() >= target {
            return true;
        }
        self.wake.notify_one();
        tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= target))
            .await
            .is_ok()
    }
}
