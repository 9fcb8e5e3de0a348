//! [`MemoryBuckets`]: the counts of a hub alone, in this process: per bucket kind a sharded map
//! (`DashMap`) of caller → theoretical arrival time, on a monotonic clock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::one::RefMut;

use super::{Bucket, BucketCheck, Error, Left, Mode, Outcome, Rate, gcra};

/// In-process buckets. A check locks its buckets' shard entries (in [`Bucket::ALL`] order, so
/// two checks never wait on each other in a cycle) for the few nanoseconds of the arithmetic,
/// so concurrent requests of one caller are counted exactly.
pub struct MemoryBuckets {
    /// One map per [`Bucket`] kind (indexed by [`Bucket::index`]): caller → TAT (µs).
    maps: [DashMap<Box<str>, u64>; Bucket::ALL.len()],
    /// The clock: the Unix time at `started`, advanced by a monotonic clock so a wall-clock
    /// step never refills or drains a bucket.
    started: Instant,
    started_unix_us: u64,
}

impl Default for MemoryBuckets {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBuckets {
    /// Empty buckets (every caller full).
    pub fn new() -> Self {
        Self {
            maps: std::array::from_fn(|_| DashMap::new()),
            started: Instant::now(),
            started_unix_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
        }
    }

    /// Now, µs since the Unix epoch (monotonic).
    pub fn now_us(&self) -> u64 {
        self.started_unix_us
            .saturating_add(self.started.elapsed().as_micros() as u64)
    }

    /// The entry of `caller` in `bucket`'s map, created (full) if missing.
    fn entry(&self, bucket: Bucket, caller: &str) -> RefMut<'_, Box<str>, u64> {
        let map = &self.maps[bucket.index()];
        match map.get_mut(caller) {
            Some(e) => e,
            None => map.entry(Box::from(caller)).or_insert(0),
        }
    }

    /// One check (see [`super::Buckets::check`]); never fails but for a bucket named twice.
    ///
    /// # Errors
    /// [`Error::DuplicateBucket`].
    pub fn check(
        &self,
        checks: &[BucketCheck<'_>],
        mode: Mode,
        now_us: Option<u64>,
    ) -> Result<Outcome, Error> {
        // Lock order: bucket kind. Kinds are distinct within a check (one map entry each).
        let mut order: Vec<usize> = (0..checks.len()).collect();
        order.sort_by_key(|&i| checks[i].bucket);
        for w in order.windows(2) {
            if checks[w[0]].bucket == checks[w[1]].bucket {
                return Err(Error::DuplicateBucket(checks[w[0]].bucket.as_str()));
            }
        }
        let mut entries: Vec<Option<RefMut<'_, Box<str>, u64>>> =
            (0..checks.len()).map(|_| None).collect();
        for &i in &order {
            entries[i] = Some(self.entry(checks[i].bucket, checks[i].caller));
        }
        // The clock is read with the entries held, so a later check of the same bucket never
        // computes with an earlier time.
        let now = now_us.unwrap_or_else(|| self.now_us());
        let mut admitted = true;
        let mut results = Vec::with_capacity(checks.len());
        for (c, e) in checks.iter().zip(&entries) {
            let tat = e.as_ref().map_or(0, |e| **e);
            let (e_us, burst) = (c.rate.emission_us(), c.rate.burst());
            let (new_tat, left, ok) = match mode {
                Mode::Charge => {
                    let t = gcra::charge(tat, now, e_us, c.cost);
                    (t, Left::from(gcra::gcra(t, now, e_us, burst, 0)), true)
                }
                Mode::Check => {
                    let v = gcra::gcra(tat, now, e_us, burst, c.cost);
                    (v.tat, Left::from(v), v.allowed)
                }
            };
            admitted &= ok;
            results.push((tat, new_tat, left, ok));
        }
        let mut buckets = Vec::with_capacity(checks.len());
        for ((c, e), (tat, new_tat, left, ok)) in checks.iter().zip(&mut entries).zip(results) {
            if admitted {
                if let Some(e) = e {
                    **e = new_tat;
                }
                buckets.push(left);
            } else if ok {
                // Admitted by itself but not taken: its state as it is.
                buckets.push(Left::from(gcra::gcra(
                    tat,
                    now,
                    c.rate.emission_us(),
                    c.rate.burst(),
                    0,
                )));
            } else {
                buckets.push(left);
            }
        }
        Ok(Outcome {
            admitted,
            now_us: now,
            buckets,
        })
    }

    /// Takes `cost` from one bucket whatever is left ([`Mode::Charge`] of one bucket).
    pub fn charge(
        &self,
        bucket: Bucket,
        caller: &str,
        rate: Rate,
        cost: u64,
        now_us: Option<u64>,
    ) -> Left {
        let mut e = self.entry(bucket, caller);
        let now = now_us.unwrap_or_else(|| self.now_us());
        *e = gcra::charge(*e, now, rate.emission_us(), cost);
        Left::from(gcra::gcra(*e, now, rate.emission_us(), rate.burst(), 0))
    }

    /// Drops every bucket that is full again (its TAT has passed): it is the same as absent.
    /// Returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now = self.now_us();
        let mut dropped = 0;
        for map in &self.maps {
            let before = map.len();
            map.retain(|_, tat| *tat > now);
            dropped += before.saturating_sub(map.len());
        }
        dropped
    }

    /// Buckets held (not yet swept).
    pub fn len(&self) -> usize {
        self.maps.iter().map(DashMap::len).sum()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn full_buckets_are_swept_and_the_rest_kept() {
        let m = MemoryBuckets::new();
        let rate = Rate::per_minute(1).unwrap();
        let check = |caller: &'static str| {
            m.check(
                &[BucketCheck {
                    bucket: Bucket::Standard,
                    caller,
                    rate,
                    cost: 1,
                }],
                Mode::Check,
                None,
            )
            .unwrap()
        };
        assert!(check("a").admitted);
        assert!(!check("a").admitted);
        // A bucket checked far in the past is full now.
        m.check(
            &[BucketCheck {
                bucket: Bucket::Test,
                caller: "old",
                rate,
                cost: 1,
            }],
            Mode::Check,
            Some(1),
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m.sweep(), 1);
        assert_eq!(m.len(), 1);
        assert!(!check("a").admitted, "a bucket in use is kept");
    }

    #[test]
    fn a_bucket_named_twice_is_refused() {
        let m = MemoryBuckets::new();
        let c = BucketCheck {
            bucket: Bucket::LlmTokens,
            caller: "x",
            rate: Rate::per_minute(5).unwrap(),
            cost: 1,
        };
        assert!(matches!(
            m.check(&[c, c], Mode::Check, None),
            Err(Error::DuplicateBucket("llm_tokens"))
        ));
    }

    #[test]
    fn concurrent_checks_of_one_caller_admit_exactly_the_burst() {
        let m = std::sync::Arc::new(MemoryBuckets::new());
        let rate = Rate::per_minute(1000).unwrap();
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let o = m
                            .check(
                                &[BucketCheck {
                                    bucket: Bucket::Standard,
                                    caller: "c",
                                    rate,
                                    cost: 1,
                                }],
                                Mode::Check,
                                Some(1_000_000_000),
                            )
                            .unwrap();
                        if o.admitted {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 1000);
    }
}
