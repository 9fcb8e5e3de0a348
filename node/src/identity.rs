//! The node's stable id, persisted in `<data-dir>/node-id` so the hub recognises the node across
//! restarts and reconnects.

use std::path::{Path, PathBuf};

/// Name of the file holding the id inside the data directory.
pub const NODE_ID_FILE: &str = "node-id";
const MAX_ID_LEN: usize = 128;

/// Why the id could not be read or saved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {path} is in use by another apex-node process: give each node its own --data-dir"
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
    },
    /// The id file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Takes an exclusive lock on `<data-dir>/lock` for as long as the returned file lives, so two
/// node processes never share one node id (they would keep replacing each other at the hub).
///
/// # Errors
/// [`Error::InUse`] if another process holds it; I/O errors otherwise.
pub fn lock(data_dir: &Path) -> Result<std::fs::File, Error> {
    std::fs::create_dir_all(data_dir).map_err(|source| Error::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse {
            path: data_dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(Error::Io { path, source }),
    }
}

/// Generates a fresh id, `node-<uuid v4>`.
pub fn generate() -> String {
    format!("node-{}", uuid::Uuid::new_v4())
}

/// Whether `id` is usable as a node id: 1 to 128 printable characters without whitespace.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

/// Reads the id from `data_dir`, or generates one and saves it there.
///
/// An unusable stored id is replaced by a fresh one (with a warning).
///
/// # Errors
/// [`Error`] if the directory cannot be created or the file cannot be read or written.
pub fn load_or_create(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if is_valid(id) {
                return Ok(id.to_owned());
            }
            tracing::warn!(path = %path.display(), "stored node id is unusable; generating a new one");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Io { path, source }),
    }
    let id = generate();
    store(data_dir, &id)?;
    Ok(id)
}

/// Saves `id` in `data_dir` (atomically: written aside, then renamed).
///
/// # Errors
/// [`Error`] if the directory cannot be created or the file cannot be written.
pub fn store(data_dir: &Path, id: &str) -> Result<(), Error> {
    std::fs::create_dir_all(data_dir).map_err(|source| Error::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(NODE_ID_FILE);
    let tmp = data_dir.join(format!("{NODE_ID_FILE}.tmp"));
    std::fs::write(&tmp, format!("{id}\n")).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| Error::Io { path, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_locked_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(Error::InUse { .. })));
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn id_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let first = load_or_create(&data).unwrap();
        assert!(first.starts_with("node-"));
        assert_eq!(load_or_create(&data).unwrap(), first);
        store(&data, "node-adopted").unwrap();
        assert_eq!(load_or_create(&data).unwrap(), "node-adopted");
    }

    #[test]
    fn unusable_id_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "  \n").unwrap();
        let id = load_or_create(dir.path()).unwrap();
        assert!(is_valid(&id));
    }
}
