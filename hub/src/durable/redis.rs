//! The Redis store: every task record is a field of one hash, `apex:tasks` (task id → task
//! record JSON), sent over a `redis` crate [`ConnectionManager`] (reconnects by itself) on a
//! current-thread Tokio runtime owned by the writer thread.
//!
//! One hub owns the data: `apex:store-owner` holds the owning hub's id (`<data_dir>/hub-id`)
//! with a time-to-live of [`OWNER_TTL_MS`], renewed by every batch and every idle second. Each
//! batch is one Lua script that checks the owner, renews it and applies the writes, so a hub
//! that has lost ownership (another hub took over after its lease expired) can never write: its
//! batches fail and its submissions answer 503. A hub whose id matches (the same hub
//! restarted) takes ownership at once; another waits for the lease to expire.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::Backend;
use crate::model::Task;
use crate::store;
use crate::store::NodeRecord;
use crate::store::one_line;

/// The hash holding every task record.
pub const TASKS_KEY: &str = "apex:tasks";

/// The hash holding the node registry snapshot (node id → node record JSON).
pub const NODES_KEY: &str = "apex:nodes";

/// The key naming the hub that owns the store.
pub const OWNER_KEY: &str = "apex:store-owner";

/// Lifetime of the ownership lease, in milliseconds.
pub const OWNER_TTL_MS: u64 = 10_000;

/// Takes or renews ownership: KEYS[1] owner key; ARGV[1] hub id, ARGV[2] ttl ms. Returns the
/// owner after the call.
const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return cur
";

/// A fenced batch: KEYS[1] owner key, KEYS[2] tasks hash, KEYS[3] nodes hash; ARGV[1] hub id,
/// ARGV[2] ttl ms, ARGV[3] number of task puts, ARGV[4] number of node puts, then task
/// id/record pairs, node id/record pairs, and task ids to delete. Returns 1, or an error if
/// another hub owns the store.
const WRITE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur ~= false and cur ~= ARGV[1] then
  return redis.error_reply('OWNER the store is owned by hub ' .. cur)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local i = 5
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, m do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
return 1
";

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The Redis backend.
pub struct RedisBackend {
    rt: tokio::runtime::Runtime,
    conn: ConnectionManager,
    what: String,
    hub_id: String,
    write: redis::Script,
}

impl RedisBackend {
    /// Connects to `url` (must answer now) and takes ownership of the store for `hub_id`,
    /// waiting up to one lease lifetime for another hub's lease to expire.
    ///
    /// # Errors
    /// [`store::Error::Unavailable`] if Redis cannot be reached; [`store::Error::Owned`] if another
    /// hub keeps renewing its lease.
    pub fn open(url: &str, hub_id: &str) -> Result<Self, store::Error> {
        let what = redacted(url);
        let unavailable = |e: String| store::Error::Unavailable {
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
        let claim = redis::Script::new(CLAIM);
        let deadline = std::time::Instant::now() + Duration::from_millis(OWNER_TTL_MS + 2000);
        let mut logged = false;
        loop {
            let mut c = conn.clone();
            let owner: String = rt
                .block_on(
                    claim
                        .key(OWNER_KEY)
                        .arg(hub_id)
                        .arg(OWNER_TTL_MS)
                        .invoke_async(&mut c),
                )
                .map_err(|e| unavailable(one_line(e)))?;
            if owner == hub_id {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(store::Error::Owned {
                    what: what.clone(),
                    owner,
                });
            }
            if !logged {
                tracing::warn!(store = %what, owner, "the Redis store is owned by another hub; waiting for its lease to expire");
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(Self {
            rt,
            conn,
            what,
            hub_id: hub_id.to_owned(),
            write: redis::Script::new(WRITE),
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> store::Error {
        store::Error::Unavailable {
            what: self.what.clone(),
            reason: one_line(e),
        }
    }
}

impl Backend for RedisBackend {
    fn load(&mut self) -> Result<(Vec<Task>, Vec<NodeRecord>), store::Error> {
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
        let tasks = rows
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice::<Task>(&v).map_err(|e| store::Error::Unreadable {
                    what: self.what.clone(),
                    reason: format!("record of task {k} in {TASKS_KEY} does not decode: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = self
            .rt
            .block_on(async move {
                redis::cmd("HGETALL")
                    .arg(NODES_KEY)
                    .query_async(&mut conn)
                    .await
            })
            .map_err(|e| self.unavailable(e))?;
        let nodes = rows
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice::<NodeRecord>(&v).map_err(|e| store::Error::Unreadable {
                    what: self.what.clone(),
                    reason: format!("record of node {k} in {NODES_KEY} does not decode: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((tasks, nodes))
    }

    fn write(
        &mut self,
        puts: &[(&str, u64, Vec<u8>)],
        nodes: &[(&str, Vec<u8>)],
        deletes: &[(&str, u64)],
    ) -> Result<(), store::Error> {
        let mut inv = self.write.key(OWNER_KEY);
        inv.key(TASKS_KEY)
            .key(NODES_KEY)
            .arg(&self.hub_id)
            .arg(OWNER_TTL_MS)
            .arg(puts.len())
            .arg(nodes.len());
        for (k, _, v) in puts {
            inv.arg(*k).arg(v.as_slice());
        }
        for (k, v) in nodes {
            inv.arg(*k).arg(v.as_slice());
        }
        for (k, _) in deletes {
            inv.arg(*k);
        }
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = self.rt.block_on(inv.invoke_async(&mut conn));
        r.map(|_| ()).map_err(|e| self.unavailable(e))
    }

    fn idle(&mut self) -> Result<(), store::Error> {
        self.write(&[], &[], &[])
    }
}
