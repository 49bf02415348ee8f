//! Reconnect delays: capped exponential with jitter.
//!
//! "Equal jitter": the n-th delay is drawn uniformly from `[d/2, d]` with
//! `d = min(cap, base * 2^n)`. Half of it stays deterministic, so the delay still grows; the
//! random half keeps the nodes of a cluster that lost a peer at the same moment from
//! reconnecting in lockstep.

use std::time::Duration;

/// First delay ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest delay: a peer back up is noticed within this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// Jitter needs no secrecy, only nodes that do not draw alike.
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE, BACKOFF_CAP)
    }
}

impl Backoff {
    /// Seeded from `fastrand`'s per-thread generator, itself seeded per process.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_seed(base, cap, fastrand::u64(..))
    }

    /// A reproducible sequence, for tests.
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng.u64(..=span))
    }

    /// After a connection that worked: the next failure starts over from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// `min(cap, base * 2^attempt)`, without overflowing.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_bounds_up_to_the_cap() {
        let mut backoff = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 42);
        let mut ceiling = BACKOFF_BASE;
        for _ in 0..40 {
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(BACKOFF_CAP);
        }
        // Long past the cap: still capped, never overflowing.
        for _ in 0..1000 {
            let delay = backoff.next_delay();
            assert!(delay >= BACKOFF_CAP / 2 && delay <= BACKOFF_CAP);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 7);
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() >= BACKOFF_CAP / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_BASE);
    }

    #[test]
    fn jitter_varies_delays() {
        // The same attempt under different seeds, and successive capped delays under one seed,
        // do not all coincide: nodes do not reconnect in lockstep.
        let firsts: std::collections::HashSet<Duration> = (1..=20)
            .map(|seed| Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, seed).next_delay())
            .collect();
        assert!(firsts.len() > 10, "{firsts:?}");
        let mut backoff = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 3);
        let capped: std::collections::HashSet<Duration> =
            (0..50).map(|_| backoff.next_delay()).skip(20).collect();
        assert!(capped.len() > 10);
    }

    #[test]
    fn same_seed_same_sequence_and_cap_below_base_is_base() {
        let seq = |seed| {
            let mut b = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, seed);
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(seq(99), seq(99));
        let mut tiny = Backoff::with_seed(Duration::from_secs(1), Duration::from_millis(1), 5);
        for _ in 0..5 {
            let d = tiny.next_delay();
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
        }
    }
}
