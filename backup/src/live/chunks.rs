//! Which chunks of a live restore are where: missing (still only in the backup), busy (being
//! fetched and written by a worker, or written whole by the guest), done (on the volume) or
//! lost (the datastore could not give them). Guest I/O asks here before it touches the volume;
//! workers take their next chunk here, guest demands first.
//!
//! Done bits are also kept as atomics, so that a request whose chunks are all done — every
//! request, once the restore has finished — never takes the lock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use strata_storage::StorageError;
use vmm_sys_util::eventfd::EventFd;

/// Where one chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Missing,
    Busy,
    Done,
    Lost,
}

/// What a worker does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// Fetch and write this chunk (already marked busy).
    Chunk(u64),
    /// Every chunk is done: make it final.
    Finish,
    /// The device is closing.
    Stop,
}

/// What guest I/O on a run of chunks may do now.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Go to the volume; these chunks were claimed (busy) for a write covering them whole.
    Go(Vec<u64>),
    /// Wait: some chunk is being fetched (asked for first).
    Park,
    /// Fail: a chunk is lost.
    Fail(StorageError),
}

/// Counts of chunk states, for status and progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Not yet on the volume.
    pub missing: u64,
    /// Being fetched or written.
    pub busy: u64,
    /// On the volume.
    pub done: u64,
    /// The datastore could not give them.
    pub lost: u64,
}

#[derive(Debug)]
struct Table {
    states: Vec<State>,
    lost: BTreeMap<u64, String>,
    demand: VecDeque<u64>,
    cursor: u64,
    counts: Counts,
    background: bool,
    stop: bool,
    finish_due: bool,
    finished: bool,
    waiters: Vec<Arc<EventFd>>,
}

/// The chunk table of one live restore. See the module documentation.
#[derive(Debug)]
pub(crate) struct Chunks {
    table: Mutex<Table>,
    /// Workers wait here for work.
    work: Condvar,
    /// Anyone waiting for progress (the job, a closing device) waits here.
    changed: Condvar,
    done: Vec<AtomicU64>,
    all_done: AtomicBool,
    /// Bumped, under the table's lock, by every change that may let a parked request go: a
    /// chunk done, lost, or missing again.
    changes: AtomicU64,
    count: u64,
}

impl Chunks {
    /// A table of `count` chunks, those set in `done_words` already restored; `background`:
    /// whether the background copy runs.
    pub fn new(count: u64, done_words: &[u64], background: bool) -> Chunks {
        let words = super::map::words_for(count);
        let mut states = Vec::with_capacity(count as usize);
        let mut counts = Counts::default();
        for i in 0..count {
            let done = done_words
                .get((i / 64) as usize)
                .is_some_and(|w| w >> (i % 64) & 1 == 1);
            states.push(if done { State::Done } else { State::Missing });
            if done {
                counts.done += 1;
            } else {
                counts.missing += 1;
            }
        }
        let done = (0..words)
            .map(|w| AtomicU64::new(done_words.get(w).copied().unwrap_or(0)))
            .collect();
        Chunks {
            all_done: AtomicBool::new(counts.done == count),
            table: Mutex::new(Table {
                states,
                lost: BTreeMap::new(),
                demand: VecDeque::new(),
                cursor: 0,
                finish_due: counts.done == count,
                finished: false,
                counts,
                background,
                stop: false,
                waiters: Vec::new(),
            }),
            work: Condvar::new(),
            changed: Condvar::new(),
            done,
            changes: AtomicU64::new(0),
            count,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every update of the table is a few assignments: it is whole even after a panic.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every chunk is on the volume.
    pub fn all_done(&self) -> bool {
        self.all_done.load(Ordering::Acquire)
    }

    /// Whether chunk `i` is on the volume.
    pub fn is_done(&self, i: u64) -> bool {
        self.done
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (i % 64) & 1 == 1)
    }

    /// How many changes that may let a parked request go have happened: a queue whose parked
    /// requests were planned at this count need not plan them again until it moves. Every
    /// change moves it before it signals the wakers registered by parking.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The done bits now.
    pub fn capture(&self) -> Vec<u64> {
        self.done
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Counts of each state.
    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Lost chunks and why.
    pub fn lost(&self) -> BTreeMap<u64, String> {
        self.lock().lost.clone()
    }

    /// Turns the background copy on or off (guest demands are served either way).
    pub fn set_background(&self, on: bool) {
        self.lock().background = on;
        self.work.notify_all();
    }

    /// Stops the workers.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.work.notify_all();
        self.changed.notify_all();
    }

    /// Whether the restore was made final.
    pub fn finished(&self) -> bool {
        self.lock().finished
    }

    /// Records that the restore was made final.
    pub fn set_finished(&self) {
        let mut t = self.lock();
        t.finished = true;
        t.finish_due = false;
        drop(t);
        self.changed.notify_all();
    }

    /// Whether the copy has nothing left to try: no chunk missing or busy.
    pub fn copy_ended(&self) -> bool {
        let t = self.lock();
        t.counts.missing == 0 && t.counts.busy == 0
    }

    /// Wakes everyone waiting for a change.
    pub fn poke(&self) {
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for a change.
    pub fn wait_change(&self, timeout: Duration) {
        let t = self.lock();
        let _ = self.changed.wait_timeout(t, timeout);
    }

    /// The next job for a worker, waiting for one.
    pub fn next_job(&self) -> Job {
        let mut t = self.lock();
        loop {
            if t.stop {
                return Job::Stop;
            }
            if t.finish_due {
                t.finish_due = false;
                return Job::Finish;
            }
            while let Some(i) = t.demand.pop_front() {
                if t.states[i as usize] == State::Missing {
                    set_state(&mut t, i, State::Busy);
                    return Job::Chunk(i);
                }
            }
            if t.background {
                while t.cursor < self.count {
                    let i = t.cursor;
                    t.cursor += 1;
                    if t.states[i as usize] == State::Missing {
                        set_state(&mut t, i, State::Busy);
                        return Job::Chunk(i);
                    }
                }
            }
            t = self.work.wait(t).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A worker finished chunk `i`: on the volume, or lost with `error`.
    pub fn complete(&self, i: u64, error: Option<String>) {
        let mut t = self.lock();
        match error {
            None => {
                self.set_done_bit(i);
                set_state(&mut t, i, State::Done);
            }
            Some(e) => {
                set_state(&mut t, i, State::Lost);
                t.lost.insert(i, e);
            }
        }
        self.after_change(t);
    }

    /// A guest write that claimed `chunks` ended: they are done if it succeeded, missing again
    /// (and asked for first) if not.
    pub fn guest_done(&self, chunks: &[u64], ok: bool) {
        if chunks.is_empty() {
            return;
        }
        let mut t = self.lock();
        for &i in chunks {
            if ok {
                self.set_done_bit(i);
                t.lost.remove(&i);
                set_state(&mut t, i, State::Done);
            } else {
                set_state(&mut t, i, State::Missing);
                t.demand.push_back(i);
            }
        }
        self.after_change(t);
    }

    fn set_done_bit(&self, i: u64) {
        if let Some(w) = self.done.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    fn after_change(&self, mut t: MutexGuard<'_, Table>) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        if t.counts.done == self.count {
            self.all_done.store(true, Ordering::Release);
            if !t.finished {
                t.finish_due = true;
            }
        }
        let waiters = std::mem::take(&mut t.waiters);
        drop(t);
        for w in waiters {
            let _ = w.write(1);
        }
        self.work.notify_all();
        self.changed.notify_all();
    }

    /// What a read of chunks `first..=last` may do; a parked read's chunks are asked for first
    /// and `waker` is signalled when any chunk changes.
    pub fn plan_read(&self, first: u64, last: u64, waker: &Arc<EventFd>) -> Plan {
        self.plan(first, last, |_| false, waker)
    }

    /// What a write (or discard, or write-zeroes) of chunks `first..=last` may do;
    /// `covers(i)` says whether it covers chunk `i` whole. A chunk covered whole needs nothing
    /// from the backup: it is claimed, and done when the write completes.
    pub fn plan_write(
        &self,
        first: u64,
        last: u64,
        covers: impl Fn(u64) -> bool,
        waker: &Arc<EventFd>,
    ) -> Plan {
        self.plan(first, last, covers, waker)
    }

    fn plan(
        &self,
        first: u64,
        last: u64,
        covers: impl Fn(u64) -> bool,
        waker: &Arc<EventFd>,
    ) -> Plan {
        let mut t = self.lock();
        let mut claim = Vec::new();
        let mut park = false;
        for i in first..=last.min(self.count.saturating_sub(1)) {
            match t.states[i as usize] {
                State::Done => {}
                State::Busy => park = true,
                State::Missing | State::Lost if covers(i) => claim.push(i),
                State::Missing => {
                    park = true;
                    if !t.demand.contains(&i) {
                        t.demand.push_back(i);
                    }
                }
                State::Lost => {
                    let why = t.lost.get(&i).cloned().unwrap_or_default();
                    return Plan::Fail(StorageError::corrupt(
                        "live restore",
                        format!("chunk {i} could not be restored: {why}"),
                    ));
                }
            }
        }
        if park {
            if !t.waiters.iter().any(|w| Arc::ptr_eq(w, waker)) {
                t.waiters.push(waker.clone());
            }
            drop(t);
            self.work.notify_all();
            return Plan::Park;
        }
        for &i in &claim {
            set_state(&mut t, i, State::Busy);
        }
        Plan::Go(claim)
    }
}

fn set_state(t: &mut Table, i: u64, new: State) {
    let old = std::mem::replace(&mut t.states[i as usize], new);
    let c = &mut t.counts;
    for (s, delta) in [(old, -1i64), (new, 1)] {
        let n = match s {
            State::Missing => &mut c.missing,
            State::Busy => &mut c.busy,
            State::Done => &mut c.done,
            State::Lost => &mut c.lost,
        };
        *n = n.saturating_add_signed(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efd() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn demands_come_first_and_claims_wait_for_busy_chunks() {
        let c = Chunks::new(8, &[0b1], true);
        assert_eq!(c.counts().done, 1);
        let w = efd();
        // A read of chunk 5 parks and asks for it: the next job is chunk 5, not chunk 1.
        assert!(matches!(c.plan_read(5, 5, &w), Plan::Park));
        assert_eq!(c.next_job(), Job::Chunk(5));
        // A whole-chunk write of the busy chunk parks too.
        assert!(matches!(c.plan_write(5, 5, |_| true, &w), Plan::Park));
        assert_eq!(c.changes(), 0, "parking and taking a job let nothing go");
        c.complete(5, None);
        assert_eq!(c.changes(), 1);
        assert_eq!(w.read().unwrap(), 1);
        assert!(c.is_done(5));
        assert!(matches!(c.plan_read(5, 5, &w), Plan::Go(v) if v.is_empty()));
        // A write covering chunk 2 whole claims it; the background skips it.
        assert!(matches!(c.plan_write(2, 2, |_| true, &w), Plan::Go(v) if v == vec![2]));
        assert_eq!(c.next_job(), Job::Chunk(1));
        assert_eq!(c.next_job(), Job::Chunk(3));
        c.guest_done(&[2], true);
        assert!(c.is_done(2));
        assert_eq!(c.changes(), 2);
        // A lost chunk fails reads and partial writes; a whole write replaces it.
        c.complete(3, Some("bad".into()));
        assert!(matches!(c.plan_read(3, 3, &w), Plan::Fail(_)));
        assert!(matches!(c.plan_write(3, 3, |_| false, &w), Plan::Fail(_)));
        assert!(matches!(c.plan_write(3, 3, |_| true, &w), Plan::Go(v) if v == vec![3]));
        c.guest_done(&[3], true);
        assert!(c.lost().is_empty());
        for i in [1, 4, 6, 7] {
            if i != 1 {
                assert_eq!(c.next_job(), Job::Chunk(i));
            }
            c.complete(i, None);
        }
        c.complete(0, None);
        assert!(c.all_done());
        assert_eq!(c.next_job(), Job::Finish);
        c.stop();
        assert_eq!(c.next_job(), Job::Stop);
    }
}
