//! Reconnect delays: exponential backoff with full jitter (pure; the caller sleeps).

use std::time::Duration;

use rand::Rng;

/// First ceiling of the reconnect delay.
pub const INITIAL: Duration = Duration::from_millis(250);
/// Largest ceiling of the reconnect delay.
pub const MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, initial × 2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL, MAX)
    }
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// Upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The next delay, drawn from `rng`; each call doubles the ceiling up to the cap.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=ms))
    }

    /// Starts over from the initial ceiling (after a successful registration).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay(&mut rng);
            assert!(d <= MAX);
        }
        assert_eq!(
            ceilings,
            vec![250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000, 10000]
        );
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_vary() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = Backoff::default();
            let d = b.next_delay(&mut rng);
            assert!(d <= INITIAL, "{d:?}");
            seen.insert(d);
        }
        assert!(seen.len() > 10, "full jitter spreads delays");
        let mut b = Backoff::default();
        for _ in 0..1000 {
            assert!(b.next_delay(&mut rng) <= MAX);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert!(b.ceiling() > INITIAL);
        b.reset();
        assert_eq!(b.ceiling(), INITIAL);
    }
}
