//! The memory feed: a durable append-only log in the record store ([`FEED_KIND`] /
//! [`FEED_KEY`]) of what to index, written by every hub and read by every hub into its own
//! index.
//!
//! - Entries are pointers, not copies: a turn's entry names the session and its log's
//!   sequence numbers, a saved memory's entry its id; the tailer reads the text from the
//!   session log or the memory record when it indexes (what is gone by then is not indexed),
//!   so the feed costs tens of bytes per turn beside the conversation it points at.
//! - The **feeder** takes this hub's entries off a bounded queue (the chat hook only queues:
//!   nothing on a turn's path waits for the feed), gathers them for up to [`WINDOW`] with the embedded
//!   store (less when a query, save or delete waits for them) and appends them in one write (group
//!   commit), retrying while the store fails.
//! - The **tailer** reads the feed after the index's last commit, resolves a batch, embeds its
//!   texts when an embedding model is configured, applies it and commits with the batch's last
//!   sequence number ([`MemoryIndex::apply`]). It wakes when this hub appended, when a query
//!   waits for it, and every [`records::POLL`](crate::records::POLL) for other hubs' entries.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::index::{self, Doc, Op};
use super::{Inner, MEMORY_KIND, SavedMemory, record_id};
use crate::chat::{LOG_KIND, StoredMessage};
use crate::llm::embeddings::EmbeddingRequest;
use crate::records::Kind;

/// The feed's log kind.
pub const FEED_KIND: Kind = "memory_feed";
/// The feed's log key (one feed for the whole cluster).
pub const FEED_KEY: &str = "all";
/// Entries read (and indexed in one commit) at a time.
const BATCH: usize = 512;
/// Entries the feeder appends in one write at most.
const APPEND_BATCH: usize = 256;
/// With the embedded store, how long the feeder gathers entries before one append (unless a
/// query, save or delete asks for them at once): one store write (and one index commit) for
/// every turn in the window instead of one per turn, so the feed's writes do not queue in
/// front of the turns' own (redb's write transactions are serialised, each an fsync). Redis
/// appends (no fsync, no shared write lock) go at once, so other hubs see a turn sooner.
pub(super) const WINDOW: Duration = Duration::from_millis(50);
/// Texts embedded in one call.
const EMBED_BATCH: usize = 64;
/// Characters of a text sent to the embedding model.
const EMBED_CHARS: usize = 8000;

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    /// Messages `from..=to` of session `sid` of `owner` were stored.
    Turn {
        /// The owner.
        owner: String,
        /// The session id.
        sid: String,
        /// The first sequence number.
        from: u64,
        /// The last sequence number.
        to: u64,
    },
    /// Saved memory `id` of `owner` was stored.
    Save {
        /// The owner.
        owner: String,
        /// The memory id.
        id: String,
    },
    /// Saved memory `id` of `owner` was deleted.
    Forget {
        /// The owner.
        owner: String,
        /// The memory id.
        id: String,
    },
    /// Session `sid` of `owner` was deleted (its history and every message).
    DropSession {
        /// The owner.
        owner: String,
        /// The session id.
        sid: String,
    },
}

/// How far this hub's own entries got: how many were appended, and the feed sequence
/// number of the last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fed {
    pub(super) count: u64,
    pub(super) last_seq: u64,
}

/// Appends this hub's queued entries to the feed until the queue closes.
pub(super) async fn feeder(inner: Arc<Inner>, mut rx: mpsc::Receiver<Entry>) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let window = tokio::time::sleep(inner.window);
        tokio::pin!(window);
        while batch.len() < APPEND_BATCH {
            tokio::select! {
                biased;
                () = inner.flush.notified() => break,
                () = &mut window => break,
                e = rx.recv() => match e {
                    Some(e) => batch.push(e),
                    None => break,
                },
            }
        }
        while batch.len() < APPEND_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let bytes: Vec<Vec<u8>> = batch
            .iter()
            .filter_map(|e| serde_json::to_vec(e).ok())
            .collect();
        let mut delay = Duration::from_millis(20);
        loop {
            match inner
                .records
                .append(FEED_KIND, FEED_KEY, bytes.clone())
                .await
            {
                Ok(seq) => {
                    if failing {
                        failing = false;
                        tracing::info!("memory feed written again");
                    }
                    inner.fed.send_modify(|f| {
                        f.count += batch.len() as u64;
                        f.last_seq = f.last_seq.max(seq);
                    });
                    inner.wake.notify_one();
                    break;
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %e, entries = batch.len(),
                            "memory feed not written; retrying (searches miss these until then)");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Reads the feed into the index until `stop`.
pub(super) async fn tailer(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        let applied = *inner.applied.borrow();
        let result = step(&inner, applied).await;
        let more = match result {
            Ok(more) => {
                if failing {
                    failing = false;
                    tracing::info!("memory index follows the feed again");
                }
                more
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "memory index not updated; retrying");
                }
                false
            }
        };
        if more {
            continue;
        }
        let wait = if failing {
            Duration::from_secs(1)
        } else {
            crate::records::POLL
        };
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Indexes the next batch of the feed after `applied`. True when a full batch was read (more
/// may follow at once).
async fn step(inner: &Inner, applied: u64) -> Result<bool, String> {
    let entries = inner
        .records
        .read_log(FEED_KIND, FEED_KEY, applied, BATCH)
        .await
        .map_err(|e| e.to_string())?;
    let Some(&(last, _)) = entries.last() else {
        // Nothing new; a feed shorter than what the index has seen was started over (a
        // flushed Redis): forget the index and follow the new feed from its start.
        if applied > 0 {
            let len = inner
                .records
                .log_len(FEED_KIND, FEED_KEY)
                .await
                .map_err(|e| e.to_string())?;
            if len < applied {
                tracing::warn!(
                    feed = len,
                    index = applied,
                    "the memory feed is shorter than the index: rebuilding the index"
                );
                let ix = inner.index.clone();
                tokio::task::spawn_blocking(move || ix.clear())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                inner.applied.send_replace(0);
            }
        }
        return Ok(false);
    };
    let full = entries.len() == BATCH;
    let mut ops = Vec::with_capacity(entries.len() * 2);
    for (seq, raw) in entries {
        match serde_json::from_slice::<Entry>(&raw) {
            Ok(e) => resolve(inner, e, &mut ops).await?,
            Err(e) => {
                tracing::warn!(seq, error = %e, "a memory feed entry does not decode; skipped")
            }
        }
    }
    embed(inner, &mut ops).await;
    let ix = inner.index.clone();
    tokio::task::spawn_blocking(move || ix.apply(ops, last))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    inner.applied.send_replace(last);
    Ok(full)
}

/// The index operations of one feed entry (reading the texts it points at).
async fn resolve(inner: &Inner, e: Entry, ops: &mut Vec<Op>) -> Result<(), String> {
    match e {
        Entry::Turn {
            owner,
            sid,
            from,
            to,
        } => {
            let name = crate::chat::session_name(&owner, &sid);
            let n = usize::try_from(to.saturating_sub(from) + 1).unwrap_or(usize::MAX);
            let rows = inner
                .records
                .read_log(LOG_KIND, &name, from.saturating_sub(1), n.min(10_000))
                .await
                .map_err(|e| e.to_string())?;
            for (seq, raw) in rows {
                if seq > to {
                    break;
                }
                let Ok(m) = serde_json::from_slice::<StoredMessage>(&raw) else {
                    continue;
                };
                if m.content.trim().is_empty() {
                    continue;
                }
                ops.push(Op::Upsert(Doc {
                    key: index::message_key(&owner, &sid, seq),
                    owner: owner.clone(),
                    sid: Some(sid.clone()),
                    role: m.role,
                    ts_ms: m.ts,
                    content: m.content,
                    extra: String::new(),
                    vector: None,
                }));
            }
        }
        Entry::Save { owner, id } => {
            let key = index::memory_key(&owner, &id);
            let raw = inner
                .records
                .get(MEMORY_KIND, &record_id(&owner, &id))
                .await
                .map_err(|e| e.to_string())?;
            match raw.and_then(|r| serde_json::from_slice::<SavedMemory>(&r).ok()) {
                Some(m) => ops.push(Op::Upsert(Doc {
                    key,
                    owner,
                    sid: None,
                    role: "memory".to_owned(),
                    ts_ms: m.created_at_ms,
                    content: m.content,
                    extra: m.tags.join(" "),
                    vector: None,
                })),
                // Deleted before it was indexed.
                None => ops.push(Op::Delete(key)),
            }
        }
        Entry::Forget { owner, id } => ops.push(Op::Delete(index::memory_key(&owner, &id))),
        Entry::DropSession { owner, sid } => {
            ops.push(Op::DropSession(index::session_term(&owner, &sid)));
        }
    }
    Ok(())
}

/// Gives the batch's new documents their vectors (with `memory.embedding_model`). A failed
/// call leaves them without (BM25 still finds them) and is logged.
async fn embed(inner: &Inner, ops: &mut [Op]) {
    let Some(model) = inner.config.embedding_model.clone() else {
        return;
    };
    let mut docs: Vec<&mut Doc> = ops
        .iter_mut()
        .filter_map(|o| match o {
            Op::Upsert(d) => Some(d),
            _ => None,
        })
        .collect();
    for chunk in docs.chunks_mut(EMBED_BATCH) {
        let texts: Vec<String> = chunk
            .iter()
            .map(|d| {
                let mut t: String = d.content.chars().take(EMBED_CHARS).collect();
                if !d.extra.is_empty() {
                    t.push(' ');
                    t.push_str(&d.extra);
                }
                t
            })
            .collect();
        let req = EmbeddingRequest::texts(model.clone(), texts);
        match inner.llm.get().embeddings(&req).await {
            Ok(e) => {
                for (d, v) in chunk.iter_mut().zip(e.vectors) {
                    d.vector = Some(v);
                }
            }
            Err(e) => {
                tracing::warn!(model = %model, error = %e,
                    "memory: texts indexed without vectors (the embedding call failed)");
            }
        }
    }
}
