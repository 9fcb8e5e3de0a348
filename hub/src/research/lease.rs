//! The lease that makes one hub drive a research run at a time, and the loop that takes
//! over runs whose lease has expired.
//!
//! The record `research_run`/`<session>` is `{holder, until_ms}`. The driver renews it every
//! [`LEASE_MS`]/3 by compare-and-set; when a renewal finds another holder (or no record: the
//! session was deleted) the driver stops before its next append, and every append first checks
//! that the record still names this hub. Every hub polls the runs every [`RESUME_POLL`] and
//! takes over one whose record has not changed for a whole lease on its own monotonic clock; a
//! hub alone on its store (the data-dir lock) takes over every run at start, since no other hub
//! can hold one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Error, RUN, Research, now_ms};
/// How long a lease lasts without renewal, in ms.
pub const LEASE_MS: i64 = 6_000;
/// How often each hub looks for runs to take over.
pub const RESUME_POLL: Duration = Duration::from_secs(1);

/// A run's lease, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct LeaseRecord {
    pub(super) holder: String,
    pub(super) until_ms: i64,
}

/// The lease a driver holds: renewed in the background; [`Lease::held`] tells whether it may
/// still append.
#[derive(Clone)]
pub struct Lease {
    pub(super) holder: String,
    /// The bytes last written (what the next renewal compares with).
    last: Arc<parking_lot::Mutex<Vec<u8>>>,
    /// Until when this hub may act, Unix ms (a margin before the stored `until_ms`).
    valid_until: Arc<AtomicI64>,
    pub(super) lost: Arc<AtomicBool>,
}

impl Lease {
    /// A new lease of `holder`, from now.
    pub fn fresh(holder: &str) -> Lease {
        let rec = LeaseRecord {
            holder: holder.to_owned(),
            until_ms: now_ms() + LEASE_MS,
        };
        Lease {
            holder: holder.to_owned(),
            last: Arc::new(parking_lot::Mutex::new(super::encode(&rec))),
            valid_until: Arc::new(AtomicI64::new(rec.until_ms - LEASE_MS / 3)),
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        self.last.lock().clone()
    }

    /// Whether the driver may still append.
    pub(super) fn held(&self) -> bool {
        !self.lost.load(Ordering::Acquire) && now_ms() < self.valid_until.load(Ordering::Acquire)
    }

    /// Renews once: false when the lease is gone (another holder, or no record).
    pub(super) async fn renew(&self, r: &Research, id: &str) -> bool {
        let old = self.encode();
        let rec = LeaseRecord {
            holder: self.holder.clone(),
            until_ms: now_ms() + LEASE_MS,
        };
        let new = super::encode(&rec);
        match r
            .inner
            .records
            .compare_and_set(RUN, id, Some(&old), Some(&new), None)
            .await
        {
            Ok(true) => {
                *self.last.lock() = new;
                self.valid_until
                    .store(rec.until_ms - LEASE_MS / 3, Ordering::Release);
                true
            }
            Ok(false) => {
                self.lost.store(true, Ordering::Release);
                false
            }
            // The store is away: keep the lease until it would expire.
            Err(_) => true,
        }
    }
}

/// Takes over runs whose lease has expired (all runs held by others, on a hub alone on its
/// store), every [`RESUME_POLL`] until shutdown.
pub async fn resume_loop(r: Research) {
    let mut shutdown = r.inner.shutdown.clone();
    let exclusive = r.inner.tasks.exclusive();
    loop {
        if let Err(e) = resume_once(&r, exclusive).await {
            tracing::debug!(error = %e, "research runs not scanned");
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUME_POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn resume_once(r: &Research, exclusive: bool) -> Result<(), Error> {
    let runs = r.inner.records.list(RUN).await?;
    let now = std::time::Instant::now();
    {
        // Forget runs that ended.
        let mut seen = r.inner.lease_seen.lock();
        seen.retain(|id, _| runs.iter().any(|(r, _)| r == id));
    }
    for (id, bytes) in runs {
        if r.inner.driving.contains_key(&id) {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<LeaseRecord>(&bytes) else {
            continue;
        };
        // Expiry on this hub's own monotonic clock: the lease is dead when its record has not
        // changed (no renewal) for a whole lease, whatever the hubs' wall clocks say. A lease
        // given back (`until_ms: 0`) is free at once.
        let unchanged_for = {
            let mut seen = r.inner.lease_seen.lock();
            let e = seen
                .entry(id.clone())
                .or_insert_with(|| (bytes.clone(), now));
            if e.0 != bytes {
                *e = (bytes.clone(), now);
            }
            now.duration_since(e.1)
        };
        let expired = rec.until_ms == 0 || unchanged_for >= Duration::from_millis(LEASE_MS as u64);
        if !(expired || exclusive && rec.holder != r.inner.hub_id) {
            continue;
        }
        let lease = Lease::fresh(&r.inner.hub_id);
        if r.inner
            .records
            .compare_and_set(RUN, &id, Some(&bytes), Some(&lease.encode()), None)
            .await?
        {
            tracing::info!(session = %id, previous = %rec.holder, "research run taken over");
            r.spawn_driver(id, lease);
        }
    }
    Ok(())
}
