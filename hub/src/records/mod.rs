//! The record store: every kind of record that is not a task (users, refresh-token families,
//! managed API keys, revoked token ids, and the conversations, profiles and sessions to come)
//! in the same backend the hub keeps its tasks in: memory, the embedded redb database
//! (`<data_dir>/records.redb`), or Redis (`apex:rec:<kind>` hashes, shared by every hub of a
//! shared-mode cluster).
//!
//! A record is `kind` + `id` → bytes (JSON by convention), with an optional expiry. Writes are
//! durable when the call returns (redb commits with fsync; Redis acknowledges). The one atomic
//! primitive is [`RecordStore::compare_and_set`], enough for unique indexes (create if absent)
//! and rotations (replace only the value that was read), exact across hubs on Redis (one Lua
//! script). Every write of a kind bumps its [`RecordStore::version`], so hubs notice changes
//! made elsewhere by polling one counter.
//!
//! Expired records read as absent everywhere; they are dropped when a write or a listing meets
//! them.
//!
//! Beside records, the store keeps **append-only logs** (`kind` + `key` → entries numbered from
//! 1): a conversation's messages, the memory index's feed. An append is one durable write of
//! every entry given, whatever the log's length, so storage grows with the bytes appended (not
//! with the log's length times the number of writes, as rewriting one record per change would).
//! redb table `logs` keyed by (log number, sequence), Redis lists `apex:log:<kind>:<key>`.

mod embedded;
mod memory;
mod redis;

use std::path::Path;
use std::time::Duration;

use crate::store;

pub use embedded::FILE_NAME;

/// A record kind: the namespace of ids. Lowercase ASCII letters, digits and `_`.
pub type Kind = &'static str;

/// One stored value: the bytes and when they expire (Unix ms, `None` never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) expires_at_ms: Option<i64>,
    pub(crate) data: Vec<u8>,
}

impl Stored {
    fn live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|e| e > now_ms)
    }

    /// The envelope written by the embedded and Redis backends: `<expiry ms or 0>|<data>`
    /// (decimal expiry, so the Redis scripts can read it).
    fn encode(&self) -> Vec<u8> {
        let mut v = format!("{}|", self.expires_at_ms.unwrap_or(0)).into_bytes();
        v.extend_from_slice(&self.data);
        v
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let sep = raw.iter().position(|b| *b == b'|')?;
        let exp: i64 = std::str::from_utf8(&raw[..sep]).ok()?.parse().ok()?;
        Some(Self {
            expires_at_ms: (exp != 0).then_some(exp),
            data: raw[sep + 1..].to_vec(),
        })
    }
}

fn expiry(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| {
        apex_protocol::now_ms().saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
    })
}

/// The record store of this hub. Cheap to clone.
#[derive(Clone)]
pub struct RecordStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(memory::Memory),
    Embedded(embedded::Embedded),
    Redis(redis::Redis),
}

impl std::fmt::Debug for RecordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.backend {
            Backend::Memory(_) => "memory",
            Backend::Embedded(_) => "embedded",
            Backend::Redis(_) => "redis",
        };
        f.debug_struct("RecordStore")
            .field("backend", &what)
            .finish()
    }
}

impl RecordStore {
    /// A store in memory (the `memory` task store, unit tests).
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(memory::Memory::default()),
        }
    }

    /// Opens (or creates) `<data_dir>/records.redb`. The caller holds the data-dir lock.
    ///
    /// # Errors
    /// [`store::Error::Unreadable`] for a file that is not a redb database.
    pub fn embedded(data_dir: &Path) -> Result<Self, store::Error> {
        Ok(Self {
            backend: Backend::Embedded(embedded::Embedded::open(&data_dir.join(FILE_NAME))?),
        })
    }

    /// Records in the Redis at `url` (`redis://` or `rediss://`).
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] if Redis cannot be reached.
    pub async fn redis(url: &str) -> Result<Self, store::Error> {
        Ok(Self {
            backend: Backend::Redis(redis::Redis::connect(url).await?),
        })
    }

    /// The record store that goes with a task store of `kind` (same backend).
    ///
    /// # Errors
    /// As [`RecordStore::embedded`] and [`RecordStore::redis`].
    pub async fn open(
        kind: &crate::durable::StoreKind,
        data_dir: &Path,
    ) -> Result<Self, store::Error> {
        match kind {
            crate::durable::StoreKind::Memory => Ok(Self::memory()),
            crate::durable::StoreKind::Embedded => Self::embedded(data_dir),
            crate::durable::StoreKind::Redis(url) => Self::redis(url).await,
        }
    }

    /// The value of `kind`/`id`, `None` if absent or expired.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn get(&self, kind: Kind, id: &str) -> Result<Option<Vec<u8>>, store::Error> {
        let now = apex_protocol::now_ms();
        let got = match &self.backend {
            Backend::Memory(m) => m.get(kind, id),
            Backend::Embedded(e) => e.get(kind, id).await?,
            Backend::Redis(r) => r.get(kind, id).await?,
        };
        Ok(got.filter(|s| s.live(now)).map(|s| s.data))
    }

    /// Writes `value` (`None`: deletes) iff the current value is `expected` (`None`: absent or
    /// expired), atomically (across hubs on Redis). `ttl` sets the new value's expiry. True if
    /// it wrote.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails; nothing is written then.
    pub async fn compare_and_set(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, store::Error> {
        let new = value.map(|v| Stored {
            expires_at_ms: expiry(ttl),
            data: v.to_vec(),
        });
        match &self.backend {
            Backend::Memory(m) => Ok(m.compare_and_set(kind, id, expected, new)),
            Backend::Embedded(e) => e.compare_and_set(kind, id, expected, new).await,
            Backend::Redis(r) => r.compare_and_set(kind, id, expected, new).await,
        }
    }

    /// Creates `kind`/`id` unless it exists: false if it did (a unique index).
    ///
    /// # Errors
    /// As [`RecordStore::compare_and_set`].
    pub async fn create(
        &self,
        kind: Kind,
        id: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, store::Error> {
        self.compare_and_set(kind, id, None, Some(value), ttl).await
    }

    /// Writes `kind`/`id` whatever it held.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn put(
        &self,
        kind: Kind,
        id: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), store::Error> {
        let new = Stored {
            expires_at_ms: expiry(ttl),
            data: value.to_vec(),
        };
        match &self.backend {
            Backend::Memory(m) => {
                m.put(kind, id, Some(new));
                Ok(())
            }
            Backend::Embedded(e) => e.put(kind, id, Some(new)).await,
            Backend::Redis(r) => r.put(kind, id, Some(new)).await,
        }
    }

    /// Deletes `kind`/`id`; true if a live record was there.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<bool, store::Error> {
        let now = apex_protocol::now_ms();
        let old = match &self.backend {
            Backend::Memory(m) => m.put(kind, id, None),
            Backend::Embedded(e) => e.take(kind, id).await?,
            Backend::Redis(r) => r.take(kind, id).await?,
        };
        Ok(old.is_some_and(|s| s.live(now)))
    }

    /// Every live record of `kind`, `(id, value)`, in id order.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn list(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, store::Error> {
        let now = apex_protocol::now_ms();
        let mut all = match &self.backend {
            Backend::Memory(m) => m.list(kind),
            Backend::Embedded(e) => e.list(kind).await?,
            Backend::Redis(r) => r.list(kind).await?,
        };
        all.retain(|(_, s)| s.live(now));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all.into_iter().map(|(id, s)| (id, s.data)).collect())
    }

    /// A counter of the writes of `kind` (0 before the first): a changed value means some
    /// record of that kind changed, on this hub or another.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn version(&self, kind: Kind) -> Result<u64, store::Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.version(kind)),
            Backend::Embedded(e) => e.version(kind).await,
            Backend::Redis(r) => r.version(kind).await,
        }
    }
}

impl RecordStore {
    /// Appends `entries` to the log `kind`/`key` in one durable write (one redb transaction, one
    /// `RPUSH`), atomically: every entry or none. Returns the sequence number of the last entry
    /// (entries are numbered from 1 in append order; concurrent appenders, on other hubs too,
    /// get distinct numbers). An empty `entries` appends nothing and returns the current length.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails; nothing is appended then.
    pub async fn append(
        &self,
        kind: Kind,
        key: &str,
        entries: Vec<Vec<u8>>,
    ) -> Result<u64, store::Error> {
        if entries.is_empty() {
            return self.log_len(kind, key).await;
        }
        match &self.backend {
            Backend::Memory(m) => Ok(m.append(kind, key, entries)),
            Backend::Embedded(e) => e.append(kind, key, entries).await,
            Backend::Redis(r) => r.append(kind, key, entries).await,
        }
    }

    /// Up to `limit` entries of the log `kind`/`key` after sequence number `after` (0: from the
    /// first), as `(seq, bytes)` in order. An absent log reads as empty.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn read_log(
        &self,
        kind: Kind,
        key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, store::Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Memory(m) => Ok(m.read_log(kind, key, after, limit)),
            Backend::Embedded(e) => e.read_log(kind, key, after, limit).await,
            Backend::Redis(r) => r.read_log(kind, key, after, limit).await,
        }
    }

    /// The sequence number of the log's last entry (0 when empty or absent).
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn log_len(&self, kind: Kind, key: &str) -> Result<u64, store::Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.log_len(kind, key)),
            Backend::Embedded(e) => e.log_len(kind, key).await,
            Backend::Redis(r) => r.log_len(kind, key).await,
        }
    }

    /// Deletes the whole log `kind`/`key`; true if it had entries. A later append starts again
    /// at sequence number 1.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn delete_log(&self, kind: Kind, key: &str) -> Result<bool, store::Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.delete_log(kind, key)),
            Backend::Embedded(e) => e.delete_log(kind, key).await,
            Backend::Redis(r) => r.delete_log(kind, key).await,
        }
    }

    /// The bytes the backend spends on the log `kind`/`key` (redb: its entries' keys and
    /// values; Redis: `MEMORY USAGE` of the list; memory: the entries' bytes). For the storage
    /// benchmark; `None` where it cannot be told.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] when the backend fails.
    pub async fn log_footprint(&self, kind: Kind, key: &str) -> Result<Option<u64>, store::Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(Some(m.log_bytes(kind, key))),
            Backend::Embedded(e) => e.log_footprint(kind, key).await.map(Some),
            Backend::Redis(r) => r.log_footprint(kind, key).await,
        }
    }
}

/// Whether a stored value's data equals `expected` (`None`: absent or expired).
fn matches(current: Option<&Stored>, expected: Option<&[u8]>, now_ms: i64) -> bool {
    let live = current.filter(|s| s.live(now_ms));
    match (live, expected) {
        (None, None) => true,
        (Some(s), Some(e)) => s.data == e,
        _ => false,
    }
}

/// How often hubs poll a record kind's version to reload their in-memory copy of it
/// ([`spawn_poll`]): revocations, API keys, plugin switches.
pub const POLL: Duration = Duration::from_millis(250);

/// Starts a loop that calls `sync` every [`POLL`] until `stop` turns true. `sync` reloads a
/// cache when a kind's [`RecordStore::version`] moved. While it fails the last copy stays in
/// use; the first failure and the recovery are logged once each, naming `what`.
pub fn spawn_poll<F, Fut>(
    what: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut sync: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), store::Error>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match sync().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("{what} read from the store again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "{what} not read from the store: the last copy is used");
                }
                Err(_) => {}
            }
        }
    })
}

impl RecordStore {
    /// A secret generated once for the whole cluster: the first hub creates `kind`/`id` with
    /// `fresh` (create-if-absent), the others read it. Returns the stored bytes.
    ///
    /// # Errors
    /// [`store::Error`] when the store cannot be reached, or the record vanished between the
    /// two steps.
    pub async fn generated_secret(
        &self,
        kind: Kind,
        id: &str,
        fresh: &[u8],
    ) -> Result<(Vec<u8>, bool), store::Error> {
        if self.create(kind, id, fresh, None).await? {
            return Ok((fresh.to_vec(), true));
        }
        match self.get(kind, id).await? {
            Some(s) => Ok((s, false)),
            None => Err(store::Error::Unreadable {
                what: format!("record {kind}/{id}"),
                reason: "the generated secret vanished while it was read".to_owned(),
            }),
        }
    }
}

pub mod conformance;
