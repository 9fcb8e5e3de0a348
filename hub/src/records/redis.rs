//! Records in Redis: one hash per kind, `apex:rec:<kind>` (id → envelope, see
//! [`Stored::encode`]), and its write counter `apex:rec:<kind>:v`. Every write is one Lua
//! script ([`scripts/cas.lua`](scripts/cas.lua)), so compare-and-set is atomic across every hub
//! of a shared-mode cluster, and expiry is judged on Redis's clock there.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Kind, Stored};
use crate::store;
use crate::store::one_line;

static CAS: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/cas.lua")));

/// The Redis backend. Clones share the connection.
#[derive(Clone)]
pub(super) struct Redis {
    conn: ConnectionManager,
    what: String,
}

fn hash(kind: Kind) -> String {
    format!("apex:rec:{kind}")
}

/// The list holding the log `kind`/`key` (entry `n` at index `n - 1`).
fn log_list(kind: Kind, key: &str) -> String {
    format!("apex:log:{kind}:{key}")
}

fn counter(kind: Kind) -> String {
    format!("apex:rec:{kind}:v")
}

impl Redis {
    pub(super) async fn connect(url: &str) -> Result<Self, store::Error> {
        let what = crate::durable::redis::redacted(url);
        let unavailable = |e: String| store::Error::Unavailable {
            what: what.clone(),
            reason: e,
        };
        let client = redis::Client::open(url).map_err(|e| unavailable(one_line(e)))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| unavailable(one_line(e)))?;
        Ok(Self { conn, what })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> store::Error {
        store::Error::Unavailable {
            what: self.what.clone(),
            reason: one_line(e),
        }
    }

    pub(super) async fn get(&self, kind: Kind, id: &str) -> Result<Option<Stored>, store::Error> {
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(hash(kind))
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(v.as_deref().and_then(Stored::decode))
    }

    /// One script call; `expected`: `None` writes unconditionally, `Some(e)` compares with `e`.
    async fn write(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<Option<&[u8]>>,
        new: Option<Stored>,
    ) -> Result<(bool, Option<Stored>), store::Error> {
        let mut c = self.conn.clone();
        let mut inv = CAS.key(hash(kind));
        inv.key(counter(kind)).arg(id);
        match expected {
            None => inv.arg("0").arg("0").arg(""),
            Some(None) => inv.arg("1").arg("0").arg(""),
            Some(Some(e)) => inv.arg("1").arg("1").arg(e),
        };
        match &new {
            Some(s) => inv.arg("1").arg(s.encode()),
            None => inv.arg("0").arg(""),
        };
        let (wrote, prev): (i64, Option<Vec<u8>>) = inv
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok((wrote == 1, prev.as_deref().and_then(Stored::decode)))
    }

    pub(super) async fn compare_and_set(
        &self,
        kind: Kind,
        id: &str,
        expected: Option<&[u8]>,
        new: Option<Stored>,
    ) -> Result<bool, store::Error> {
        Ok(self.write(kind, id, Some(expected), new).await?.0)
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
        let mut c = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(hash(kind))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let now = apex_protocol::now_ms();
        let mut out = Vec::with_capacity(all.len());
        let mut expired = Vec::new();
        for (id, raw) in all {
            match Stored::decode(&raw) {
                Some(s) if s.live(now) => out.push((id, s)),
                Some(_) => expired.push(id),
                None => {}
            }
        }
        if !expired.is_empty() {
            // Expired records are dropped lazily; a failure here only leaves them for later.
            let _: Result<i64, _> = redis::cmd("HDEL")
                .arg(hash(kind))
                .arg(&expired)
                .query_async(&mut c)
                .await;
        }
        Ok(out)
    }

    pub(super) async fn version(&self, kind: Kind) -> Result<u64, store::Error> {
        let mut c = self.conn.clone();
        let v: Option<u64> = redis::cmd("GET")
            .arg(counter(kind))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(v.unwrap_or(0))
    }

    pub(super) async fn append(
        &self,
        kind: Kind,
        key: &str,
        entries: Vec<Vec<u8>>,
    ) -> Result<u64, store::Error> {
        let mut c = self.conn.clone();
        let len: u64 = redis::cmd("RPUSH")
            .arg(log_list(kind, key))
            .arg(entries)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(len)
    }

    pub(super) async fn read_log(
        &self,
        kind: Kind,
        key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, store::Error> {
        let mut c = self.conn.clone();
        let start = i64::try_from(after).unwrap_or(i64::MAX);
        let stop = start.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX) - 1);
        let got: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(log_list(kind, key))
            .arg(start)
            .arg(stop)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(got
            .into_iter()
            .enumerate()
            .map(|(i, e)| (after + i as u64 + 1, e))
            .collect())
    }

    pub(super) async fn log_len(&self, kind: Kind, key: &str) -> Result<u64, store::Error> {
        let mut c = self.conn.clone();
        redis::cmd("LLEN")
            .arg(log_list(kind, key))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    pub(super) async fn delete_log(&self, kind: Kind, key: &str) -> Result<bool, store::Error> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("DEL")
            .arg(log_list(kind, key))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(n > 0)
    }

    pub(super) async fn log_footprint(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<Option<u64>, store::Error> {
        let mut c = self.conn.clone();
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(log_list(kind, key))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}
