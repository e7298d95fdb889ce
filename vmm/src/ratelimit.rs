//! A rate limiter for log lines a guest can trigger.
//!
//! A malicious or buggy guest can produce a bad request per microsecond; logging each would fill
//! the host's disk. [`LogLimiter`] lets a burst through, then one line per interval, and counts
//! what it suppressed so the next line that gets through can say how many were dropped.

use std::time::{Duration, Instant};

/// Allows `burst` events, then one per `interval`, counting the rest.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter allowing `burst` lines per `interval`.
    pub fn new(burst: u32, interval: Duration) -> LogLimiter {
        LogLimiter {
            burst: burst.max(1),
            interval,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// The default for guest-triggered warnings: 10 lines per 5 seconds.
    pub fn for_guest_errors() -> LogLimiter {
        LogLimiter::new(10, Duration::from_secs(5))
    }

    /// Whether to log this event now; `Some(n)` with the number of events suppressed since the
    /// last line that got through, `None` to stay silent.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Option<u64> {
        let fresh = match self.window_start {
            None => true,
            Some(start) => now.duration_since(start) >= self.interval,
        };
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports_the_count() {
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(l.check_at(t0), None);
        }
        assert_eq!(l.check_at(t0 + Duration::from_secs(2)), Some(5));
    }
}
