//! A count of events over the last hour, for figures such as "ownership refusals in the last
//! hour" that `pgmm status` shows: a Prometheus counter only gives a rate to whoever scrapes it
//! over time, and a one-shot command has no history to subtract.
//!
//! Sixty one-minute buckets behind a mutex: memory stays bounded however many events arrive,
//! and the count is exact to the minute (the window is the current minute and the 59 before
//! it). The clock is monotonic (`Instant`), so a wall-clock step neither loses nor invents
//! events. The events counted are rare (a refusal is a client mistake), so the lock is never
//! contended on a hot path.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);
const BUCKETS: usize = 60;

/// Events per minute for the last hour; share it behind an `Arc`.
#[derive(Debug)]
pub struct LastHour {
    start: Instant,
    /// `(minute since start, events in that minute)`, indexed by minute modulo 60; a bucket
    /// whose minute is older than the window is stale and reused by the next event.
    buckets: Mutex<[(u64, u64); BUCKETS]>,
}

impl Default for LastHour {
    fn default() -> Self {
        Self::new()
    }
}

impl LastHour {
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(start: Instant) -> Self {
        LastHour {
            start,
            buckets: Mutex::new([(0, 0); BUCKETS]),
        }
    }

    /// Counts one event now.
    pub fn record(&self) {
        self.record_at(Instant::now());
    }

    /// Events recorded in the last hour (to the minute).
    pub fn count(&self) -> u64 {
        self.count_at(Instant::now())
    }

    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs() / MINUTE.as_secs()
    }

    fn record_at(&self, at: Instant) {
        let minute = self.minute(at);
        // A panic while holding this lock cannot leave the counts inconsistent: keep counting.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = &mut buckets[(minute % BUCKETS as u64) as usize];
        if bucket.0 != minute {
            *bucket = (minute, 0);
        }
        bucket.1 += 1;
    }

    fn count_at(&self, at: Instant) -> u64 {
        let now = self.minute(at);
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .iter()
            .filter(|(minute, _)| *minute <= now && now - *minute < BUCKETS as u64)
            .map(|(_, count)| count)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_happened_within_the_hour_and_forgets_older_events() {
        let t0 = Instant::now();
        let window = LastHour::starting_at(t0);
        assert_eq!(window.count_at(t0), 0);
        window.record_at(t0);
        window.record_at(t0 + Duration::from_secs(59));
        window.record_at(t0 + Duration::from_secs(30 * 60));
        assert_eq!(window.count_at(t0 + Duration::from_secs(30 * 60)), 3);
        // Minute 0 is still in the window during minute 59, and out of it from minute 60.
        assert_eq!(window.count_at(t0 + Duration::from_secs(59 * 60 + 59)), 3);
        assert_eq!(window.count_at(t0 + Duration::from_secs(60 * 60)), 1);
        assert_eq!(window.count_at(t0 + Duration::from_secs(91 * 60)), 0);
    }

    #[test]
    fn a_bucket_is_reused_an_hour_later_without_its_old_count() {
        let t0 = Instant::now();
        let window = LastHour::starting_at(t0);
        for _ in 0..5 {
            window.record_at(t0 + Duration::from_secs(10));
        }
        let later = t0 + Duration::from_secs(60 * 60 + 10);
        window.record_at(later);
        assert_eq!(window.count_at(later), 1);
    }
}
