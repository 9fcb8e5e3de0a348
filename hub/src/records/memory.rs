//! Records in process memory: one mutex over a map per kind (record writes are rare next to
//! task traffic; a lock held for one map operation, never across an `.await`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Kind, Stored, matches};

#[derive(Default)]
struct Kinds {
    records: HashMap<Kind, BTreeMap<String, Stored>>,
    versions: HashMap<Kind, u64>,
    logs: HashMap<(Kind, String), Vec<Vec<u8>>>,
}

/// The memory backend. Clones share the records.
#[derive(Clone, Default)]
pub(super) struct Memory {
    inner: Arc<Mutex<Kinds>>,
}

impl Memory {
    pub(super) fn get(&self, kind: Kind, id: &str) -> Option<Stored> {
        self.inner.lock().records.get(kind)?.get(id).cloned()
    }

    pub(super) fn compare_and_set(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<&[u8]>,
        new: Option<Stored>,
    ) -> bool {
        let now = apex_protocol::now_ms();
        let mut k = self.inner.lock();
        let current = k.records.get(kind).and_then(|m| m.get(id));
        if !matches(current, expected, now) {
            return false;
        }
        write(&mut k, kind, id, new);
        true
    }

    /// Writes (or with `None` deletes) and returns the previous value.
    pub(super) fn put(&self, kind: Kind, id: &str, new: Option<Stored>) -> Option<Stored> {
        write(&mut self.inner.lock(), kind, id, new)
    }

    pub(super) fn list(&self, kind: Kind) -> Vec<(String, Stored)> {
        let now = apex_protocol::now_ms();
        let mut k = self.inner.lock();
        let Some(m) = k.records.get_mut(kind) else {
            return Vec::new();
        };
        m.retain(|_, s| s.live(now));
        m.iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    pub(super) fn version(&self, kind: Kind) -> u64 {
        self.inner.lock().versions.get(kind).copied().unwrap_or(0)
    }
}

impl Memory {
    pub(super) fn append(&self, kind: Kind, key: &str, entries: Vec<Vec<u8>>) -> u64 {
        let mut k = self.inner.lock();
        let log = k.logs.entry((kind, key.to_owned())).or_default();
        log.extend(entries);
        log.len() as u64
    }

    pub(super) fn read_log(
        &self,
        kind: Kind,
        key: &str,
        after: u64,
        limit: usize,
    ) -> Vec<(u64, Vec<u8>)> {
        let k = self.inner.lock();
        let Some(log) = k.logs.get(&(kind, key.to_owned())) else {
            return Vec::new();
        };
        let from = usize::try_from(after).unwrap_or(usize::MAX);
        log.iter()
            .enumerate()
            .skip(from)
            .take(limit)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect()
    }

    pub(super) fn log_len(&self, kind: Kind, key: &str) -> u64 {
        let k = self.inner.lock();
        k.logs
            .get(&(kind, key.to_owned()))
            .map_or(0, |l| l.len() as u64)
    }

    pub(super) fn delete_log(&self, kind: Kind, key: &str) -> bool {
        let mut k = self.inner.lock();
        k.logs
            .remove(&(kind, key.to_owned()))
            .is_some_and(|l| !l.is_empty())
    }

    pub(super) fn log_bytes(&self, kind: Kind, key: &str) -> u64 {
        let k = self.inner.lock();
        k.logs
            .get(&(kind, key.to_owned()))
            .map_or(0, |l| l.iter().map(|e| e.len() as u64).sum())
    }
}

fn write(k: &mut Kinds, kind: Kind, id: &str, new: Option<Stored>) -> Option<Stored> {
    *k.versions.entry(kind).or_default() += 1;
    let m = k.records.entry(kind).or_default();
    match new {
        Some(s) => m.insert(id.to_owned(), s),
        None => m.remove(id),
    }
}
