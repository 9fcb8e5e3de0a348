//! The Redis store: every task record is a field of one hash, `apex:tasks` (task id → task
//! record JSON). Each batch is one `MULTI`/`EXEC` pipeline of `HSET`/`HDEL` commands, sent over
//! a `redis` crate [`ConnectionManager`] (reconnects by itself) on a current-thread Tokio
//! runtime owned by the writer thread.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Backend, StoreError};
use crate::model::Task;

/// The hash holding every task record.
pub const TASKS_KEY: &str = "apex:tasks";

/// Fields per `HSET` command.
const CHUNK: usize = 1000;

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Redis backend.
pub struct RedisBackend {
    rt: tokio::runtime::Runtime,
    conn: ConnectionManager,
    what: String,
}

impl RedisBackend {
    /// Connects to `url` (must answer now).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if Redis cannot be reached.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let what = redacted(url);
        let unavailable = |e: String| StoreError::Unavailable {
            what: what.clone(),
            reason: e,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unavailable(one_line(e)))?;
        let client = redis::Client::open(url).map_err(|e| unavailable(one_line(e)))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = rt
            .block_on(ConnectionManager::new_with_config(client, cfg))
            .map_err(|e| unavailable(one_line(e)))?;
        Ok(Self { rt, conn, what })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            what: self.what.clone(),
            reason: one_line(e),
        }
    }
}

impl Backend for RedisBackend {
    fn load(&mut self) -> Result<Vec<Task>, StoreError> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = self
            .rt
            .block_on(async move {
                redis::cmd("HGETALL")
                    .arg(TASKS_KEY)
                    .query_async(&mut conn)
                    .await
            })
            .map_err(|e| self.unavailable(e))?;
        rows.into_iter()
            .map(|(k, v)| {
                serde_json::from_slice::<Task>(&v).map_err(|e| StoreError::Unreadable {
                    what: self.what.clone(),
                    reason: format!("record of task {k} in {TASKS_KEY} does not decode: {e}"),
                })
            })
            .collect()
    }

    fn write(&mut self, puts: &[(&str, Vec<u8>)], deletes: &[&str]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for chunk in puts.chunks(CHUNK) {
            let c = pipe.cmd("HSET").arg(TASKS_KEY);
            for (k, v) in chunk {
                c.arg(*k).arg(v.as_slice());
            }
            c.ignore();
        }
        for chunk in deletes.chunks(CHUNK) {
            pipe.cmd("HDEL").arg(TASKS_KEY).arg(chunk).ignore();
        }
        let mut conn = self.conn.clone();
        self.rt
            .block_on(async move { pipe.query_async::<()>(&mut conn).await })
            .map_err(|e| self.unavailable(e))
    }
}
