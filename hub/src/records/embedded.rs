//! Records in `<data_dir>/records.redb`: table `records` (`<kind>\0<id>` → envelope, see
//! [`Stored::encode`]) and table `versions` (`<kind>` → write counter). Logs: table `log_ids`
//! (`<kind>\0<key>` → log number, the next number kept in `versions` under `\0logs`) and table
//! `logs` ((log number, sequence) → entry), so an entry costs its bytes plus a 16-byte key. Every write is one
//! redb write transaction committed with fsync; redb serialises write transactions, which
//! makes [`Embedded::compare_and_set`] atomic. Calls run on Tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Kind, Stored, matches};
use crate::store;
use crate::store::one_line;

/// File name of the records database inside the data directory.
pub const FILE_NAME: &str = "records.redb";

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("versions");
const LOG_IDS: TableDefinition<&str, u64> = TableDefinition::new("log_ids");
const LOGS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("logs");
/// The `versions` row holding the next log number.
const NEXT_LOG: &str = "\0logs";

/// The redb backend. Clones share the database.
#[derive(Clone)]
pub(super) struct Embedded {
    db: Arc<redb::Database>,
    what: Arc<str>,
}

fn key(kind: Kind, id: &str) -> String {
    format!("{kind}\0{id}")
}

impl Embedded {
    pub(super) fn open(path: &Path) -> Result<Self, store::Error> {
        let what = path.display().to_string();
        let unreadable = |e: String| store::Error::Unreadable {
            what: what.clone(),
            reason: e,
        };
        let db = redb::Database::create(path).map_err(|e| unreadable(one_line(e)))?;
        let txn = db.begin_write().map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(RECORDS)
            .map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(VERSIONS)
            .map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(LOG_IDS)
            .map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(LOGS).map_err(|e| unreadable(one_line(e)))?;
        txn.commit().map_err(|e| unreadable(one_line(e)))?;
        Ok(Self {
            db: Arc::new(db),
            what: what.into(),
        })
    }

    /// Runs `f` on the blocking pool, mapping any redb error to `Unavailable`.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, String> + Send + 'static,
    ) -> Result<T, store::Error> {
        let db = self.db.clone();
        let what = self.what.to_string();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(reason)) => Err(store::Error::Unavailable { what, reason }),
            Err(e) => Err(store::Error::Unavailable {
                what,
                reason: format!("record store call failed: {e}"),
            }),
        }
    }

    pub(super) async fn get(&self, kind: Kind, id: &str) -> Result<Option<Stored>, store::Error> {
        let k = key(kind, id);
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let t = txn.open_table(RECORDS).map_err(one_line)?;
            let v = t.get(k.as_str()).map_err(one_line)?;
            Ok(v.and_then(|v| Stored::decode(v.value())))
        })
        .await
    }

    /// One write transaction: if `expected` is `Some(e)`, writes only when the current value
    /// matches `e` (see [`matches`]); returns (wrote, previous value).
    async fn write(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<Option<Vec<u8>>>,
        new: Option<Stored>,
    ) -> Result<(bool, Option<Stored>), store::Error> {
        let k = key(kind, id);
        self.run(move |db| {
            let now = apex_protocol::now_ms();
            let txn = db.begin_write().map_err(one_line)?;
            let previous;
            {
                let mut t = txn.open_table(RECORDS).map_err(one_line)?;
                previous = t
                    .get(k.as_str())
                    .map_err(one_line)?
                    .and_then(|v| Stored::decode(v.value()));
                if let Some(e) = &expected
                    && !matches(previous.as_ref(), e.as_deref(), now)
                {
                    return Ok((false, previous));
                }
                match &new {
                    Some(s) => {
                        t.insert(k.as_str(), s.encode().as_slice())
                            .map_err(one_line)?;
                    }
                    None => {
                        t.remove(k.as_str()).map_err(one_line)?;
                    }
                }
                let mut v = txn.open_table(VERSIONS).map_err(one_line)?;
                let n = v.get(kind).map_err(one_line)?.map_or(0, |g| g.value());
                v.insert(kind, n + 1).map_err(one_line)?;
            }
            txn.commit().map_err(one_line)?;
            Ok((true, previous))
        })
        .await
    }

    pub(super) async fn compare_and_set(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<&[u8]>,
        new: Option<Stored>,
    ) -> Result<bool, store::Error> {
        let expected = Some(expected.map(<[u8]>::to_vec));
        Ok(self.write(kind, id, expected, new).await?.0)
    }

    pub(super) async fn put(
        &self,
        kind: Kind,
        id: &str,
        new: Option<Stored>,
    ) -> Result<(), store::Error> {
        self.write(kind, id, None, new).await.map(|_| ())
    }

    pub(super) async fn take(&self, kind: Kind, id: &str) -> Result<Option<Stored>, store::Error> {
        Ok(self.write(kind, id, None, None).await?.1)
    }

    pub(super) async fn list(&self, kind: Kind) -> Result<Vec<(String, Stored)>, store::Error> {
        let from = format!("{kind}\0");
        let to = format!("{kind}\u{1}");
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let t = txn.open_table(RECORDS).map_err(one_line)?;
            let mut out = Vec::new();
            for row in t.range(from.as_str()..to.as_str()).map_err(one_line)? {
                let (k, v) = row.map_err(one_line)?;
                let id = k.value()[from.len()..].to_owned();
                if let Some(s) = Stored::decode(v.value()) {
                    out.push((id, s));
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn version(&self, kind: Kind) -> Result<u64, store::Error> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let t = txn.open_table(VERSIONS).map_err(one_line)?;
            Ok(t.get(kind).map_err(one_line)?.map_or(0, |g| g.value()))
        })
        .await
    }

    pub(super) async fn append(
        &self,
        kind: Kind,
        key: &str,
        entries: Vec<Vec<u8>>,
    ) -> Result<u64, store::Error> {
        let name = self::key(kind, key);
        self.run(move |db| {
            let txn = db.begin_write().map_err(one_line)?;
            let last;
            {
                let mut ids = txn.open_table(LOG_IDS).map_err(one_line)?;
                let existing = ids.get(name.as_str()).map_err(one_line)?.map(|g| g.value());
                let log = match existing {
                    Some(n) => n,
                    None => {
                        let mut v = txn.open_table(VERSIONS).map_err(one_line)?;
                        let n = v.get(NEXT_LOG).map_err(one_line)?.map_or(1, |g| g.value());
                        v.insert(NEXT_LOG, n + 1).map_err(one_line)?;
                        ids.insert(name.as_str(), n).map_err(one_line)?;
                        n
                    }
                };
                let mut t = txn.open_table(LOGS).map_err(one_line)?;
                let mut seq = last_seq(&t, log)?;
                for e in &entries {
                    seq += 1;
                    t.insert((log, seq), e.as_slice()).map_err(one_line)?;
                }
                last = seq;
            }
            txn.commit().map_err(one_line)?;
            Ok(last)
        })
        .await
    }

    /// The log number of `kind`/`key`, if it was ever appended to.
    fn log_id(txn: &redb::ReadTransaction, name: &str) -> Result<Option<u64>, String> {
        let ids = txn.open_table(LOG_IDS).map_err(one_line)?;
        Ok(ids.get(name).map_err(one_line)?.map(|g| g.value()))
    }

    pub(super) async fn read_log(
        &self,
        kind: Kind,
        key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, store::Error> {
        let name = self::key(kind, key);
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let Some(log) = Self::log_id(&txn, &name)? else {
                return Ok(Vec::new());
            };
            let t = txn.open_table(LOGS).map_err(one_line)?;
            let mut out = Vec::new();
            let start = after.saturating_add(1);
            for row in t.range((log, start)..=(log, u64::MAX)).map_err(one_line)? {
                let (k, v) = row.map_err(one_line)?;
                out.push((k.value().1, v.value().to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn log_len(&self, kind: Kind, key: &str) -> Result<u64, store::Error> {
        let name = self::key(kind, key);
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let Some(log) = Self::log_id(&txn, &name)? else {
                return Ok(0);
            };
            let t = txn.open_table(LOGS).map_err(one_line)?;
            last_seq(&t, log)
        })
        .await
    }

    pub(super) async fn delete_log(&self, kind: Kind, key: &str) -> Result<bool, store::Error> {
        let name = self::key(kind, key);
        self.run(move |db| {
            let txn = db.begin_write().map_err(one_line)?;
            let had;
            {
                let ids = txn.open_table(LOG_IDS).map_err(one_line)?;
                let log = ids.get(name.as_str()).map_err(one_line)?.map(|g| g.value());
                drop(ids);
                let Some(log) = log else {
                    return Ok(false);
                };
                let mut t = txn.open_table(LOGS).map_err(one_line)?;
                had = t
                    .range((log, 0)..=(log, u64::MAX))
                    .map_err(one_line)?
                    .next()
                    .is_some();
                t.retain_in((log, 0)..=(log, u64::MAX), |_, _| false)
                    .map_err(one_line)?;
            }
            txn.commit().map_err(one_line)?;
            Ok(had)
        })
        .await
    }

    pub(super) async fn log_footprint(&self, kind: Kind, key: &str) -> Result<u64, store::Error> {
        let name = self::key(kind, key);
        self.run(move |db| {
            let txn = db.begin_read().map_err(one_line)?;
            let Some(log) = Self::log_id(&txn, &name)? else {
                return Ok(0);
            };
            let t = txn.open_table(LOGS).map_err(one_line)?;
            let mut bytes = 0u64;
            for row in t.range((log, 0)..=(log, u64::MAX)).map_err(one_line)? {
                let (_, v) = row.map_err(one_line)?;
                bytes += 16 + v.value().len() as u64;
            }
            Ok(bytes)
        })
        .await
    }
}

/// The sequence number of log `log`'s last entry in `t` (the `logs` table), 0 when empty.
fn last_seq(t: &impl ReadableTable<(u64, u64), &'static [u8]>, log: u64) -> Result<u64, String> {
    Ok(t.range((log, 0)..=(log, u64::MAX))
        .map_err(one_line)?
        .next_back()
        .transpose()
        .map_err(one_line)?
        .map_or(0, |(k, _)| k.value().1))
}
