//! Waking without polling: a stacked queue that must wait for something outside its own lower
//! queues (another queue's allocation, a metadata worker, a thin pool snapshot) parks the work
//! and registers its eventfd in a [`Waiters`] list kept next to the state it waits on; whoever
//! changes that state bumps a [`Generation`] and signals the list. The parked work is retried
//! when the generation it saw has moved ([`Parked`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};

/// Eventfds to signal when an event happens. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Waiters(Vec<Arc<EventFd>>);

impl Waiters {
    /// Adds `efd` (once).
    pub(crate) fn add(&mut self, efd: &Arc<EventFd>) {
        if !self.0.iter().any(|w| Arc::ptr_eq(w, efd)) {
            self.0.push(efd.clone());
        }
    }

    /// Adds every eventfd of `other`.
    pub(crate) fn extend(&mut self, other: Waiters) {
        for w in other.0 {
            self.add(&w);
        }
    }

    /// Takes the list, leaving it empty (to signal after a lock is released).
    pub(crate) fn take(&mut self) -> Waiters {
        Waiters(std::mem::take(&mut self.0))
    }

    /// Whether nobody waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many wait.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Signals every eventfd but `skip` (the caller's own, which needs no wake-up) and empties
    /// the list.
    pub(crate) fn wake(&mut self, skip: Option<&Arc<EventFd>>) {
        for w in self.0.drain(..) {
            if !skip.is_some_and(|s| Arc::ptr_eq(s, &w)) {
                // A failed write only happens when the counter would overflow: already awake.
                let _ = w.write(1);
            }
        }
    }
}

/// A counter bumped on every event that parked work may be waiting for.
#[derive(Debug, Default)]
pub(crate) struct Generation(AtomicU64);

impl Generation {
    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Records an event.
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// An event source: a [`Generation`] and the eventfds waiting for its next bump. Kept inside
/// the state the event changes, under the same lock.
#[derive(Debug, Default)]
pub(crate) struct Events {
    gen: Arc<Generation>,
    waiters: Waiters,
}

impl Events {
    /// The generation, for parked work to compare against without the lock.
    pub(crate) fn generation(&self) -> Arc<Generation> {
        self.gen.clone()
    }

    /// Wakes `efd` at the next event.
    pub(crate) fn wait(&mut self, efd: &Arc<EventFd>) {
        self.waiters.add(efd);
    }

    /// Records an event and wakes whoever waits for one (a system call only when someone does).
    pub(crate) fn fire(&mut self) {
        self.gen.bump();
        if !self.waiters.is_empty() {
            self.waiters.wake(None);
        }
    }
}

/// Work parked until a [`Generation`] moves.
#[derive(Debug)]
pub(crate) struct Parked<T> {
    items: Vec<T>,
    seen: u64,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Parked {
            items: Vec::new(),
            seen: 0,
        }
    }
}

impl<T> Parked<T> {
    /// Parks `t`. Register the queue's eventfd with the event's [`Waiters`] under the same lock
    /// that decided to wait, so that the event cannot slip between.
    pub(crate) fn park(&mut self, t: T) {
        self.items.push(t);
    }

    /// The parked work to retry, if the generation moved since the last call (everything is
    /// retried: one event may unblock several pieces).
    pub(crate) fn due(&mut self, gen: &Generation) -> Vec<T> {
        let now = gen.get();
        if now == self.seen || self.items.is_empty() {
            self.seen = now;
            return Vec::new();
        }
        self.seen = now;
        std::mem::take(&mut self.items)
    }

    /// Whether anything is parked.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Parked items.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Takes everything parked (when the queue closes).
    pub(crate) fn take_all(&mut self) -> Vec<T> {
        std::mem::take(&mut self.items)
    }
}

/// A new non-blocking eventfd.
pub(crate) fn new_eventfd() -> Result<Arc<EventFd>> {
    EventFd::new(libc::EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(|e| StorageError::io("Creating an eventfd", e))
}

/// Blocks until `efd` is readable or `timeout` passes, then resets it.
pub(crate) fn wait_eventfd(efd: &EventFd, timeout: Option<Duration>) -> Result<()> {
    let mut fds = [libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is one valid pollfd and `ts_ptr` null or a valid timespec, both alive for
    // the duration of the call; a null signal mask leaves the mask unchanged.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 1, ts_ptr, std::ptr::null()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(StorageError::io("Waiting on an eventfd", e));
    }
    if r > 0 {
        // Readable, so this does not block even on a blocking eventfd.
        let _ = efd.read();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_signal_wakes_a_waiter_and_parked_work_is_due_once() {
        let efd = new_eventfd().unwrap();
        let gen = Arc::new(Generation::default());
        let mut parked = Parked::default();
        parked.park(7);
        let mut waiters = Waiters::default();
        waiters.add(&efd);
        waiters.add(&efd);
        assert!(parked.due(&gen).is_empty(), "nothing happened yet");
        parked.park(8);
        let (g, mut w) = (gen.clone(), waiters.take());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            g.bump();
            w.wake(None);
        });
        let start = Instant::now();
        wait_eventfd(&efd, Some(Duration::from_secs(10))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        assert_eq!(parked.due(&gen), vec![7, 8]);
        assert!(parked.due(&gen).is_empty());
    }

    #[test]
    fn a_wait_times_out() {
        let efd = new_eventfd().unwrap();
        let start = Instant::now();
        wait_eventfd(&efd, Some(Duration::from_millis(5))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(5));
    }
}
