//! The embedded store: one redb database file, `<data_dir>/tasks.redb`, with one table
//! `tasks` (task id → task record JSON). Each batch is one write transaction committed with
//! redb's default durability (fsync before the commit returns).
//!
//! redb was chosen over SQLite (rusqlite) because it is pure Rust (no C build, no bundled
//! library), ACID with copy-on-write B-trees that survive a crash at any point without a
//! recovery log to replay, and key-value is all the hub needs: the engine indexes in memory.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Backend, StoreError};
use crate::model::Task;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "tasks.redb";

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

/// The redb backend.
pub struct Embedded {
    db: redb::Database,
    path: PathBuf,
}

fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Embedded {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    /// [`StoreError::Unreadable`] if the file exists and is not a valid redb database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let unreadable = |e: String| StoreError::Unreadable {
            what: path.display().to_string(),
            reason: e,
        };
        let db = redb::Database::create(path).map_err(|e| unreadable(one_line(e)))?;
        let txn = db.begin_write().map_err(|e| unreadable(one_line(e)))?;
        txn.open_table(TASKS).map_err(|e| unreadable(one_line(e)))?;
        txn.commit().map_err(|e| unreadable(one_line(e)))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            what: self.path.display().to_string(),
            reason: one_line(e),
        }
    }
}

impl Backend for Embedded {
    fn load(&mut self) -> Result<Vec<Task>, StoreError> {
        let unreadable = |e: String| StoreError::Unreadable {
            what: self.path.display().to_string(),
            reason: e,
        };
        let txn = self.db.begin_read().map_err(|e| unreadable(one_line(e)))?;
        let table = txn.open_table(TASKS).map_err(|e| unreadable(one_line(e)))?;
        let mut out = Vec::with_capacity(table.len().unwrap_or(0) as usize);
        for row in table.iter().map_err(|e| unreadable(one_line(e)))? {
            let (k, v) = row.map_err(|e| unreadable(one_line(e)))?;
            let t: Task = serde_json::from_slice(v.value()).map_err(|e| {
                unreadable(format!("record of task {} does not decode: {e}", k.value()))
            })?;
            out.push(t);
        }
        Ok(out)
    }

    fn write(&mut self, puts: &[(&str, Vec<u8>)], deletes: &[&str]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.unavailable(e))?;
        {
            let mut table = txn.open_table(TASKS).map_err(|e| self.unavailable(e))?;
            for (k, v) in puts {
                table
                    .insert(*k, v.as_slice())
                    .map_err(|e| self.unavailable(e))?;
            }
            for k in deletes {
                table.remove(*k).map_err(|e| self.unavailable(e))?;
            }
        }
        txn.commit().map_err(|e| self.unavailable(e))
    }
}
