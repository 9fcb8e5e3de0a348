//! The generic cell rate algorithm (GCRA), pure: no clock, no I/O, no allocation.
//!
//! A bucket is one number, its *theoretical arrival time* (TAT, µs since the Unix epoch): the
//! instant at which the bucket would be full again if nothing more were taken. A rate of `burst`
//! units per `burst × emission` µs (for "N per minute": `burst = N`, `emission = 60 s / N`)
//! gives the rules:
//! - a bucket never seen, or whose TAT is in the past, is full: `base = max(tat, now)`;
//! - taking `cost` units moves the TAT to `base + cost × emission`;
//! - a check is admitted when `max(cost, 1)` units fit: `base + max(cost, 1) × emission` is at
//!   most `now + burst × emission` (the tolerance). So a full bucket admits exactly `burst`
//!   units at once, then one every `emission` µs; `cost = 0` takes nothing and asks whether
//!   at least one unit is left (the token budget's check before an LLM call);
//! - a refused check changes nothing;
//! - [`charge`] takes units whatever the state (tokens already spent): the TAT may move past
//!   the tolerance, and the bucket refuses every check until it has refilled that debt.
//!
//! `scripts/gcra.lua` is the same algorithm for Redis: the two must stay identical (the
//! conformance test in `hub/tests/limits_conformance.rs` runs both on the same inputs).

/// What [`gcra`] decides for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the check is admitted.
    pub allowed: bool,
    /// The TAT to store: moved by the cost when admitted, the one given when refused.
    pub tat: u64,
    /// Whole units left in the bucket after this check (when refused: left now).
    pub remaining: u64,
    /// µs from `now` until the bucket is full again (0: full).
    pub reset_after_us: u64,
    /// When refused, µs from `now` until the same check would be admitted; 0 when admitted.
    pub retry_after_us: u64,
}

/// One GCRA check of a bucket whose stored TAT is `tat` (0 for a bucket never seen), at `now`,
/// for a rate of one unit per `emission_us` with room for `burst` units, taking `cost` units
/// (0: only check that one unit is left). All times in µs; arithmetic saturates.
pub fn gcra(tat: u64, now: u64, emission_us: u64, burst: u64, cost: u64) -> Verdict {
    let base = tat.max(now);
    let limit = now.saturating_add(emission_us.saturating_mul(burst));
    let needed = base.saturating_add(emission_us.saturating_mul(cost.max(1)));
    if needed <= limit {
        let new_tat = base.saturating_add(emission_us.saturating_mul(cost));
        Verdict {
            allowed: true,
            tat: new_tat,
            remaining: left(limit, new_tat, emission_us),
            reset_after_us: new_tat - now,
            retry_after_us: 0,
        }
    } else {
        Verdict {
            allowed: false,
            tat,
            remaining: left(limit, base, emission_us),
            reset_after_us: base - now,
            retry_after_us: needed - limit,
        }
    }
}

/// The TAT after taking `cost` units regardless of what is left (usage already spent).
pub fn charge(tat: u64, now: u64, emission_us: u64, cost: u64) -> u64 {
    tat.max(now)
        .saturating_add(emission_us.saturating_mul(cost))
}

/// Whole units between a TAT and the tolerance limit.
fn left(limit: u64, tat: u64, emission_us: u64) -> u64 {
    limit.saturating_sub(tat) / emission_us.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 a minute: one every 600 ms, 100 at once.
    const T: u64 = 600_000;
    const N: u64 = 100;
    /// Some instant (µs since the epoch).
    const NOW: u64 = 1_700_000_000_000_000;

    #[test]
    fn a_fresh_bucket_admits_exactly_burst_at_once_with_remaining_counting_down() {
        let mut tat = 0;
        let mut remaining = Vec::new();
        for _ in 0..N {
            let v = gcra(tat, NOW, T, N, 1);
            assert!(v.allowed);
            assert_eq!(v.retry_after_us, 0);
            remaining.push(v.remaining);
            tat = v.tat;
        }
        assert_eq!(remaining, (0..N).rev().collect::<Vec<_>>());
        let refused = gcra(tat, NOW, T, N, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.tat, tat, "a refusal changes nothing");
        assert_eq!(refused.remaining, 0);
        // The next unit is one emission interval away; the bucket is full a minute from now.
        assert_eq!(refused.retry_after_us, T);
        assert_eq!(refused.reset_after_us, N * T);
    }

    #[test]
    fn after_the_burst_the_rate_is_one_per_emission_interval() {
        let mut tat = 0;
        for _ in 0..N {
            tat = gcra(tat, NOW, T, N, 1).tat;
        }
        for i in 1..=50u64 {
            let now = NOW + i * T;
            // Just before the next allowance: refused, told exactly how long to wait.
            let early = gcra(tat, now - 1, T, N, 1);
            assert!(!early.allowed, "{i}");
            assert_eq!(early.retry_after_us, 1);
            let v = gcra(tat, now, T, N, 1);
            assert!(v.allowed, "{i}");
            assert_eq!(v.remaining, 0);
            tat = v.tat;
            assert!(!gcra(tat, now, T, N, 1).allowed, "{i}: one per interval");
        }
    }

    #[test]
    fn remaining_and_reset_follow_elapsed_time() {
        let v = gcra(0, NOW, T, N, 1);
        assert_eq!((v.remaining, v.reset_after_us), (N - 1, T));
        let mut tat = v.tat;
        for _ in 0..9 {
            tat = gcra(tat, NOW, T, N, 1).tat;
        }
        // 10 taken; 3 intervals later 3 are back.
        let later = gcra(tat, NOW + 3 * T, T, N, 1);
        assert_eq!(later.remaining, N - 10 + 3 - 1);
        assert_eq!(later.reset_after_us, (10 - 3 + 1) * T);
        // A bucket whose TAT has passed is full.
        let full = gcra(tat, NOW + 10 * T, T, N, 1);
        assert_eq!((full.remaining, full.reset_after_us), (N - 1, T));
    }

    #[test]
    fn costs_above_one_take_that_many_units_or_nothing() {
        // 1,000 tokens a minute: one every 60 ms.
        let (t, n) = (60_000, 1_000);
        let v = gcra(0, NOW, t, n, 600);
        assert!(v.allowed);
        assert_eq!(v.remaining, 400);
        let refused = gcra(v.tat, NOW, t, n, 401);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 400, "what is left is reported");
        assert_eq!(refused.retry_after_us, t, "one more unit must refill");
        let v = gcra(v.tat, NOW, t, n, 400);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
        // More than the bucket holds is never admitted.
        let never = gcra(0, NOW, t, n, n + 1);
        assert!(!never.allowed);
        assert_eq!(never.tat, 0);
    }

    #[test]
    fn cost_zero_checks_for_one_unit_and_takes_nothing() {
        let (t, n) = (60_000, 1_000);
        let fresh = gcra(0, NOW, t, n, 0);
        assert!(fresh.allowed);
        assert_eq!((fresh.remaining, fresh.reset_after_us), (n, 0));
        assert_eq!(fresh.tat, NOW, "a full bucket stays full");
        let spent = gcra(0, NOW, t, n, n).tat;
        let empty = gcra(spent, NOW, t, n, 0);
        assert!(!empty.allowed, "no unit left");
        assert_eq!(empty.retry_after_us, t);
        assert!(gcra(spent, NOW + t, t, n, 0).allowed);
    }

    #[test]
    fn a_charge_goes_into_debt_and_refuses_until_it_is_refilled() {
        let (t, n) = (60_000, 1_000);
        // 1,500 tokens spent by one call against a 1,000 budget.
        let tat = charge(0, NOW, t, 1_500);
        assert_eq!(tat, NOW + 1_500 * t);
        let next = gcra(tat, NOW, t, n, 0);
        assert!(!next.allowed);
        assert_eq!(next.remaining, 0);
        // 500 tokens of debt, then one to have something left.
        assert_eq!(next.retry_after_us, 501 * t);
        assert!(gcra(tat, NOW + 501 * t, t, n, 0).allowed);
        // A charge on a bucket in the past starts from now.
        assert_eq!(charge(NOW - 5, NOW, t, 1), NOW + t);
    }

    #[test]
    fn extreme_inputs_saturate_instead_of_overflowing() {
        let v = gcra(u64::MAX, NOW, u64::MAX, u64::MAX, u64::MAX);
        assert!(!v.allowed || v.tat == u64::MAX);
        assert_eq!(charge(u64::MAX, 0, u64::MAX, u64::MAX), u64::MAX);
        let v = gcra(0, 0, 1, 1, 1);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
    }
}
