//! The hub's own life as the probes and the shutdown sequence see it.
//!
//! Order on SIGTERM (driven by `crate::run_with`): [`Lifecycle::begin_draining`] at once, so
//! `GET /readyz` answers 503 and the mDNS advertisement is withdrawn while everything else,
//! submissions included, is still served; `shutdown_delay_ms` later the hub's stop signal
//! flips, submissions answer 503 `shutting_down` and the drain starts (shared mode: hand back
//! and wait `shared_shutdown_drain_ms`; then node connections close and in-flight HTTP
//! requests finish). `GET /livez` answers 200 until the process stops serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the hub is draining; clone freely (all clones share one flag).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    draining: Arc<AtomicBool>,
}

impl Lifecycle {
    /// A hub that serves (not draining).
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the hub as draining (shutdown requested): from now on `/readyz` answers 503.
    /// Idempotent; never undone.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Lifecycle::begin_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_shared_by_clones_and_final() {
        let a = Lifecycle::new();
        let b = a.clone();
        assert!(!b.is_draining());
        a.begin_draining();
        a.begin_draining();
        assert!(b.is_draining());
    }
}
