//! Rate limits for log lines that outside input can trigger at will (a port scanner, a client
//! stuck in a reconnect loop): the first occurrence of each kind is logged, then at most one
//! line per interval, carrying how many it stands for. Metrics count every occurrence; the log
//! is for the operator to notice and read, not to be flooded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One interval's worth of lines per kind.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    logged_at: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log this occurrence of `kind` now: `Some(n)` with the number of occurrences
    /// suppressed since the last line, `None` to stay quiet (it is counted for the next line).
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match kinds.get_mut(kind) {
            Some(w) if now.duration_since(w.logged_at) < self.interval => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let suppressed = std::mem::take(&mut w.suppressed);
                w.logged_at = now;
                Some(suppressed)
            }
            None => {
                kinds.insert(
                    kind,
                    Window {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_and_interval_carrying_the_count() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.admit_at("a", t0), Some(0));
        assert_eq!(
            limiter.admit_at("b", t0),
            Some(0),
            "kinds are limited apart"
        );
        for s in 1..=5 {
            assert_eq!(limiter.admit_at("a", t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(limiter.admit_at("a", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(limiter.admit_at("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.admit_at("a", t0 + Duration::from_secs(25)), Some(1));
    }
}
