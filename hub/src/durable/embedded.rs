//! The embedded store: one redb database file, `<data_dir>/tasks.redb`, with one table
//! `tasks` (task sequence number → task record JSON). Sequence numbers grow with submission,
//! so new records append at the right edge of the B-tree and the records a batch touches (the
//! recent tasks) share pages; loading returns tasks in submission order. Each batch is one write
//! transaction committed with redb's default durability (fsync before the commit returns).
//!
//! redb was chosen over SQLite (rusqlite) because it is pure Rust (no C build, no bundled
//! library), ACID with copy-on-write B-trees that survive a crash at any point without a
//! recovery log to replay, and key-value is all the hub needs: the engine indexes in memory.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::Backend;
use crate::model::Task;
use crate::store;
use crate::store::NodeRecord;
use crate::store::one_line;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "tasks.redb";

const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

/// The redb backend.
pub struct Embedded {
    db: redb::Database,
    path: PathBuf,
}

impl Embedded {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    /// [`store::Error::Unreadable`] if the file exists and is not a valid redb database.
    pub fn open(path: &Path) -> Result<Self, store::Error> {
        let unreadable = |e: String| store::Error::Unreadable {
            what: path.display().to_string(),
            reason: e,
        };
        let db = redb::Database::create(path).map_err(|e| unreadable(one_line(e)))?;
        let txn = db.begin_write().map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(TASKS).map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(NODES).map_err(|e| unreadable(one_line(e)))?;
        txn.commit().map_err(|e| unreadable(one_line(e)))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> store::Error {
        store::Error::Unavailable {
            what: self.path.display().to_string(),
            reason: one_line(e),
        }
    }
}

impl Backend for Embedded {
    /// Every task, in submission order. Two threads read and decode one half of the key range
    /// each.
    fn load(&mut self) -> Result<(Vec<Task>, Vec<NodeRecord>), store::Error> {
        let unreadable = |e: String| store::Error::Unreadable {
            what: self.path.display().to_string(),
            reason: e,
        };
        let mut nodes = Vec::new();
        {
            let txn = self.db.begin_read().map_err(|e| unreadable(one_line(e)))?;
            let table = txn.open_table(NODES).map_err(|e| unreadable(one_line(e)))?;
            for row in table.iter().map_err(|e| unreadable(one_line(e)))? {
                let (k, v) = row.map_err(|e| unreadable(one_line(e)))?;
                let n: NodeRecord = serde_json::from_slice(v.value()).map_err(|e| {
                    unreadable(format!("record of node {} does not decode: {e}", k.value()))
                })?;
                nodes.push(n);
            }
        }
        let (first, last) = {
            let txn = self.db.begin_read().map_err(|e| unreadable(one_line(e)))?;
            let table = txn.open_table(TASKS).map_err(|e| unreadable(one_line(e)))?;
            let first = table.first().map_err(|e| unreadable(one_line(e)))?;
            let last = table.last().map_err(|e| unreadable(one_line(e)))?;
            match (first, last) {
                (Some((a, _)), Some((b, _))) => (a.value(), b.value()),
                _ => return Ok((Vec::new(), nodes)),
            }
        };
        let mid = first + (last - first) / 2;
        let db = &self.db;
        let read = |range: std::ops::RangeInclusive<u64>| -> Result<Vec<Task>, String> {
            let txn = db.begin_read().map_err(one_line)?;
            let table = txn.open_table(TASKS).map_err(one_line)?;
            let mut out = Vec::new();
            for row in table.range(range).map_err(one_line)? {
                let (k, v) = row.map_err(one_line)?;
                let t: Task = serde_json::from_slice(v.value()).map_err(|e| {
                    format!("record of task number {} does not decode: {e}", k.value())
                })?;
                out.push(t);
            }
            Ok(out)
        };
        let (a, b) = std::thread::scope(|s| {
            let upper = s.spawn(|| read(mid + 1..=last));
            let lower = read(first..=mid);
            let upper = upper
                .join()
                .unwrap_or_else(|_| Err("the loading thread panicked".to_owned()));
            (lower, upper)
        });
        let mut out = a.map_err(unreadable)?;
        out.extend(b.map_err(unreadable)?);
        Ok((out, nodes))
    }

    fn write(
        &mut self,
        puts: &[(&str, u64, Vec<u8>)],
        nodes: &[(&str, Vec<u8>)],
        deletes: &[(&str, u64)],
    ) -> Result<(), store::Error> {
        let txn = self.db.begin_write().map_err(|e| self.unavailable(e))?;
        {
            let mut table = txn.open_table(TASKS).map_err(|e| self.unavailable(e))?;
            // In key order: appends and neighbouring pages stay together.
            let mut puts: Vec<&(&str, u64, Vec<u8>)> = puts.iter().collect();
            puts.sort_unstable_by_key(|p| p.1);
            for (_, seq, v) in puts {
                table
                    .insert(*seq, v.as_slice())
                    .map_err(|e| self.unavailable(e))?;
            }
            for (_, seq) in deletes {
                table.remove(*seq).map_err(|e| self.unavailable(e))?;
            }
            let mut table = txn.open_table(NODES).map_err(|e| self.unavailable(e))?;
            for (id, v) in nodes {
                table
                    .insert(*id, v.as_slice())
                    .map_err(|e| self.unavailable(e))?;
            }
        }
        txn.commit().map_err(|e| self.unavailable(e))
    }
}
