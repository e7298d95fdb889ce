//! Adaptive polling before a virtqueue worker sleeps.
//!
//! A worker whose queue is busy expects an event soon: a completion from the disk, or the
//! driver's next kick. Sleeping for it costs a context switch and, when the CPU goes idle, the
//! host's wake-up of that CPU (about 27 µs on this project's PVM host, more than the device's
//! whole completion run). So before it sleeps, the worker polls its events without blocking for
//! a short window. The window adapts to how long events actually take to come:
//! - an event that came while polling leaves the window as it is;
//! - an event that came after the window, but within the longest window allowed, doubles it
//!   (starting from [`FIRST_WINDOW`]): a longer poll would have caught it;
//! - an event that took longer than that halves it, down to nothing: polling would only burn
//!   the CPU. An idle disk therefore stops polling after a few waits.
//!
//! This is the idea behind QEMU's IOThread polling (`poll-max-ns`).
//! [`crate::blk::DiskOptions::poll_max`] sets the longest window per disk
//! ([`crate::blk::config::DEFAULT_POLL`] says why its default is longer than QEMU's), and zero
//! turns polling off. The worker does not poll a queue that works one request at a time (see
//! `POLL_FROM_DEPTH` in [`crate::blk::worker`]).
//!
//! Between two polls the worker yields its CPU (`sched_yield`), so polling only takes time no
//! other thread on that CPU wants; it measured as fast as spinning, or faster (qcow2 at QD32:
//! 130k IOPS against 116k spinning and 107k without polling). The cost is CPU time nobody else
//! wanted: while a guest keeps a queue busy, its worker's CPU does not go idle.

use std::time::{Duration, Instant};

/// The window after the first event that a poll would have caught.
pub const FIRST_WINDOW: Duration = Duration::from_micros(4);

/// A window shorter than this is no window: polling stops.
const SHORTEST_WINDOW: Duration = Duration::from_micros(1);

/// One worker's polling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptivePoll {
    window: Duration,
    max: Duration,
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// An event came while polling.
    Polled,
    /// The worker slept; the event came this long after the wait began.
    Slept(Duration),
}

impl AdaptivePoll {
    /// A window that starts closed and never grows past `max` (zero: never poll).
    pub fn new(max: Duration) -> AdaptivePoll {
        AdaptivePoll {
            window: Duration::ZERO,
            max,
        }
    }

    /// How long to poll before sleeping now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Adapts the window to how the last wait ended.
    pub fn record(&mut self, waited: Waited) {
        let Waited::Slept(took) = waited else {
            return;
        };
        if took <= self.max {
            self.window = self
                .window
                .saturating_mul(2)
                .clamp(FIRST_WINDOW.min(self.max), self.max);
        } else {
            self.window /= 2;
            if self.window < SHORTEST_WINDOW {
                self.window = Duration::ZERO;
            }
        }
    }

    /// Waits for an event through `epoll_wait`-like `wait(timeout_ms)`, which returns the number
    /// of events it found: with a timeout of 0 (a poll) for the window, then with -1 (sleeping
    /// until an event). Returns what the last call returned.
    pub fn wait<E>(&mut self, mut wait: impl FnMut(i32) -> Result<usize, E>) -> Result<usize, E> {
        let start = Instant::now();
        if !self.window.is_zero() {
            loop {
                let n = wait(0)?;
                if n > 0 {
                    self.record(Waited::Polled);
                    return Ok(n);
                }
                if start.elapsed() >= self.window {
                    break;
                }
                // Polite polling: a thread that wants this CPU (the guest's vCPU, another
                // worker) runs before the next poll.
                std::thread::yield_now();
            }
        }
        let n = wait(-1)?;
        self.record(Waited::Slept(start.elapsed()));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(32);

    #[test]
    fn the_window_opens_when_events_come_within_the_longest_window() {
        let mut p = AdaptivePoll::new(MAX);
        assert_eq!(p.window(), Duration::ZERO);
        p.record(Waited::Slept(Duration::from_micros(10)));
        assert_eq!(p.window(), FIRST_WINDOW);
        for _ in 0..10 {
            p.record(Waited::Slept(Duration::from_micros(20)));
        }
        assert_eq!(p.window(), MAX, "doubles, up to the longest window");
        p.record(Waited::Polled);
        assert_eq!(
            p.window(),
            MAX,
            "a poll that caught its event keeps the window"
        );
    }

    #[test]
    fn the_window_closes_when_events_take_longer_than_the_longest_window() {
        let mut p = AdaptivePoll::new(MAX);
        for _ in 0..4 {
            p.record(Waited::Slept(Duration::from_micros(5)));
        }
        assert_eq!(p.window(), MAX);
        p.record(Waited::Slept(Duration::from_millis(5)));
        assert_eq!(p.window(), MAX / 2);
        for _ in 0..6 {
            p.record(Waited::Slept(Duration::from_secs(1)));
        }
        assert_eq!(p.window(), Duration::ZERO, "an idle disk stops polling");
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        p.record(Waited::Slept(Duration::ZERO));
        assert_eq!(p.window(), Duration::ZERO);
        let mut calls = Vec::new();
        let n = p.wait::<()>(|timeout| {
            calls.push(timeout);
            Ok(2)
        });
        assert_eq!(n, Ok(2));
        assert_eq!(calls, [-1], "straight to sleep");
    }

    #[test]
    fn a_wait_returns_what_the_poll_found_or_sleeps_after_the_window() {
        // A window far longer than three polls take.
        let long = Duration::from_secs(60);
        let mut p = AdaptivePoll::new(long);
        while p.window() < long {
            p.record(Waited::Slept(Duration::ZERO));
        }
        let mut calls = Vec::new();
        let n = p.wait::<()>(|timeout| {
            calls.push(timeout);
            Ok(usize::from(calls.len() == 3))
        });
        assert_eq!(n, Ok(1));
        assert_eq!(calls, [0, 0, 0], "the third poll found the event");

        let mut p = AdaptivePoll::new(MAX);
        p.record(Waited::Slept(Duration::from_micros(1)));
        let mut calls = Vec::new();
        let n = p.wait::<()>(|timeout| {
            calls.push(timeout);
            Ok(usize::from(timeout == -1))
        });
        assert_eq!(n, Ok(1));
        assert_eq!(
            calls.last(),
            Some(&-1),
            "nothing came within the window: it sleeps"
        );
        assert!(calls[..calls.len() - 1].iter().all(|&t| t == 0));
    }

    #[test]
    fn errors_from_either_side_pass_through() {
        let mut p = AdaptivePoll::new(MAX);
        p.record(Waited::Slept(Duration::from_micros(1)));
        assert_eq!(p.wait(|_| Err("poll")), Err("poll"));
        let sleep_fails = |timeout| if timeout == 0 { Ok(0) } else { Err("sleep") };
        assert_eq!(p.wait(sleep_fails), Err("sleep"));
    }
}
