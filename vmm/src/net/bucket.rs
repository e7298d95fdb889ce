//! The token bucket of a NIC's rate limit (bytes per second, each way).
//!
//! The bucket holds at most `rate / 10` bytes (a tenth of a second's worth, and at least one
//! largest frame), refills continuously, and lets a frame through while it holds any tokens at
//! all: the frame's size is then taken, which may leave the bucket in debt. A frame larger than
//! the bucket therefore still passes, and the debt is paid before the next one: over any long
//! interval the rate holds.

use std::time::{Duration, Instant};

use super::{HDR_LEN, MAX_FRAME};

/// A token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: i64,
    tokens: i64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` bytes per second (`rate` > 0).
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1);
        let capacity = (rate / 10)
            .max((MAX_FRAME + HDR_LEN) as u64)
            .min(i64::MAX as u64) as i64;
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as i64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.capacity);
            // Advance by the time the added tokens stand for, keeping the remainder.
            let used =
                Duration::from_nanos((add as u128 * 1_000_000_000 / u128::from(self.rate)) as u64);
            self.last += used;
        }
    }

    /// Whether a frame may go now; if not, how long until one may.
    pub fn check(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens > 0 {
            return Ok(());
        }
        let missing = (1 - self.tokens) as u128;
        let nanos = missing * 1_000_000_000 / u128::from(self.rate) + 1;
        Err(Duration::from_nanos(nanos.min(u64::MAX as u128) as u64))
    }

    /// Takes `bytes` for a frame that went.
    pub fn take(&mut self, bytes: u64) {
        self.tokens = self
            .tokens
            .saturating_sub(bytes.min(i64::MAX as u64) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_holds_over_time() {
        let t0 = Instant::now();
        let rate = 1_000_000; // 1 MB/s
        let mut b = TokenBucket::new(rate, t0);
        let mut sent = 0u64;
        let mut now = t0;
        // Simulate 2 s in 1 ms steps, sending 1500-byte frames whenever allowed.
        for _ in 0..2000 {
            now += Duration::from_millis(1);
            while b.check(now).is_ok() {
                b.take(1500);
                sent += 1500;
            }
        }
        // 2 s at 1 MB/s plus the initial bucket (at most 100 kB... one largest frame here).
        let most = 2 * rate + b.capacity as u64 + 1500;
        assert!(sent <= most && sent >= 2 * rate - 1500, "sent {sent}");
    }

    #[test]
    fn an_empty_bucket_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        b.take(b.capacity as u64 + 1000);
        let wait = b.check(t0).unwrap_err();
        assert!(
            wait >= Duration::from_micros(1000) && wait < Duration::from_millis(2),
            "{wait:?}"
        );
        assert!(b.check(t0 + wait).is_ok());
    }
}
