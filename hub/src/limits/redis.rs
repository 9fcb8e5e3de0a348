//! [`RedisBuckets`]: the counts of hubs in shared mode, in their Redis: every check is one
//! atomic call of `scripts/gcra.lua` (keys `apex:rl:<bucket>:<caller>`, on Redis's clock).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{BucketCheck, Error, Left, Mode, Outcome, key};
use crate::store::one_line;

/// `scripts/gcra.lua` (hashed once; `EVALSHA`, falling back to `EVAL` the first time a Redis
/// has not seen it).
static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/gcra.lua")));

/// How long a check may wait for Redis before it counts as a store failure (then
/// `on_store_error` decides). Short: every API request waits for it.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Buckets in Redis, on a connection of their own: its short timeouts are the limiter's (a
/// request should not wait seconds for a count while Redis is away), and checks do not queue
/// behind the task store's batches. Clones share the connection.
#[derive(Clone)]
pub struct RedisBuckets {
    conn: ConnectionManager,
    /// The URL without password, for errors.
    what: String,
}

impl RedisBuckets {
    /// Connects to the Redis at `url`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if it cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let what = crate::durable::redis::redacted(url);
        let unavailable = |e: redis::RedisError| Error::Unavailable {
            what: what.clone(),
            reason: one_line(e),
        };
        let client = redis::Client::open(url).map_err(unavailable)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CHECK_TIMEOUT))
            .set_response_timeout(Some(CHECK_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(unavailable)?;
        Ok(Self { conn, what })
    }

    /// One check (see [`super::Buckets::check`]).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Redis fails or times out; [`Error::BadReply`].
    pub async fn check(
        &self,
        checks: &[BucketCheck<'_>],
        mode: Mode,
        now_us: Option<u64>,
    ) -> Result<Outcome, Error> {
        for (i, c) in checks.iter().enumerate() {
            if checks[..i]
                .iter()
                .any(|o| o.bucket == c.bucket && o.caller == c.caller)
            {
                return Err(Error::DuplicateBucket(c.bucket.as_str()));
            }
        }
        let mut inv = GCRA.prepare_invoke();
        for c in checks {
            inv.key(key(c.bucket, c.caller));
        }
        inv.arg(match mode {
            Mode::Check => "check",
            Mode::Charge => "charge",
        });
        inv.arg(now_us.map(|n| n.to_string()).unwrap_or_default());
        for c in checks {
            inv.arg(c.rate.emission_us())
                .arg(c.rate.burst())
                .arg(c.cost);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            inv.invoke_async(&mut conn)
                .await
                .map_err(|e| Error::Unavailable {
                    what: self.what.clone(),
                    reason: one_line(e),
                })?;
        parse(&reply, checks.len())
    }
}

/// The script's reply: `{admitted, now, (remaining, reset_after, retry_after) × n}`.
fn parse(reply: &[i64], n: usize) -> Result<Outcome, Error> {
    let bad = || Error::BadReply(format!("{reply:?} for {n} buckets"));
    if reply.len() != 2 + 3 * n || reply.iter().any(|v| *v < 0) {
        return Err(bad());
    }
    let u = |i: usize| reply.get(i).map_or(0, |v| *v as u64);
    Ok(Outcome {
        admitted: match reply[0] {
            1 => true,
            0 => false,
            _ => return Err(bad()),
        },
        now_us: u(1),
        buckets: (0..n)
            .map(|b| Left {
                remaining: u(2 + 3 * b),
                reset_after_us: u(3 + 3 * b),
                retry_after_us: u(4 + 3 * b),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_opens_with_its_header() {
        let text = include_str!("scripts/gcra.lua");
        assert!(text.starts_with("-- gcra.lua: "));
        let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("--")).collect();
        for part in ["-- KEYS[1] ", "-- ARGV[1] ", "-- Reply: "] {
            assert!(header.iter().any(|l| l.starts_with(part)), "{part}");
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors() {
        let ok = parse(&[1, 10, 5, 6, 0], 1).map(|o| o.buckets);
        assert!(matches!(
            ok.as_deref(),
            Ok([Left {
                remaining: 5,
                reset_after_us: 6,
                retry_after_us: 0
            }])
        ));
        for bad in [
            &[1, 10][..],
            &[2, 10, 5, 6, 0],
            &[1, 10, -5, 6, 0],
            &[1, 10, 5, 6],
        ] {
            assert!(matches!(parse(bad, 1), Err(Error::BadReply(_))), "{bad:?}");
        }
    }
}
