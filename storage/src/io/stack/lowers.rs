//! The lower queues of a stacked queue: one per device below, opened on first use (or at once)
//! with the stack's eventfd, each with a backlog for sub-requests it has no room for.
//!
//! A full lower queue keeps the rest of its sub-requests in order in its own backlog, handed down
//! as completions are reaped, so that one large request never fails for want of slots and a full
//! queue never holds up the others. A lower queue that cannot be opened completes the
//! sub-requests sent to it with the error.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::error::Result;
use crate::io::{notify, Completion, IoQueue, QueueFull, QueueOptions, Request};

/// Opens lower queue `index` with the given options.
pub type Opener = Box<dyn FnMut(usize, &QueueOptions) -> Result<Box<dyn IoQueue>> + Send>;

struct Lower {
    queue: Box<dyn IoQueue>,
    backlog: VecDeque<Request>,
}

impl Lower {
    fn push(&mut self, req: Request) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(req);
        } else if let Err(QueueFull(r)) = self.queue.submit(req) {
            self.backlog.push_back(r);
        }
    }

    fn drain_backlog(&mut self) {
        while let Some(r) = self.backlog.pop_front() {
            if let Err(QueueFull(r)) = self.queue.submit(r) {
                self.backlog.push_front(r);
                break;
            }
        }
    }

    fn busy(&self) -> bool {
        self.queue.in_flight() > 0 || !self.backlog.is_empty()
    }
}

/// Which lower queues have work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// None.
    None,
    /// Exactly this one.
    One(usize),
    /// Several.
    Many,
}

/// See the module documentation.
pub(crate) struct Lowers {
    slots: Vec<Option<Lower>>,
    opener: Opener,
    opts: QueueOptions,
    /// Completions made here: sub-requests whose lower queue could not be opened.
    failed: Vec<Completion>,
    /// Sub-requests were handed to a lower queue since its last commit (a queue may hold them
    /// until then: io_uring's submission batch).
    uncommitted: bool,
}

impl fmt::Debug for Lowers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lowers")
            .field("open", &self.slots.iter().flatten().count())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Lowers {
    /// Lower queues opened by `opener` with `opts` (which carry the stack's eventfd).
    pub(crate) fn new(opener: Opener, opts: QueueOptions) -> Lowers {
        Lowers {
            slots: Vec::new(),
            opener,
            opts,
            failed: Vec::new(),
            uncommitted: false,
        }
    }

    /// Opens lower queue `i` now, so that a failure shows when the stacked queue is opened.
    pub(crate) fn open(&mut self, i: usize) -> Result<()> {
        self.queue(i).map(|_| ())
    }

    fn queue(&mut self, i: usize) -> Result<&mut Lower> {
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].is_none() {
            let queue = (self.opener)(i, &self.opts)?;
            self.slots[i] = Some(Lower {
                queue,
                backlog: VecDeque::new(),
            });
        }
        match self.slots[i].as_mut() {
            Some(l) => Ok(l),
            None => Err(crate::StorageError::Unavailable(format!(
                "lower queue {i} is not open"
            ))),
        }
    }

    /// Sends `req` to lower queue `i` (or its backlog).
    pub(crate) fn submit(&mut self, i: usize, req: Request) {
        match self.queue(i) {
            Ok(l) => {
                l.push(req);
                self.uncommitted = true;
            }
            Err(e) => {
                self.failed.push(Completion::of(req, Err(e)));
                notify(self.opts.notifier.as_ref());
            }
        }
    }

    /// Hands backlogs and queued requests to the engines.
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.uncommitted = false;
        for l in self.slots.iter_mut().flatten() {
            l.drain_backlog();
            l.queue.commit()?;
        }
        Ok(())
    }

    /// Moves finished sub-requests to `out`, and refills lower queues from their backlogs.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.append(&mut self.failed);
        for l in self.slots.iter_mut().flatten() {
            l.queue.reap(out);
            if !l.backlog.is_empty() {
                l.drain_backlog();
                self.uncommitted = true;
            }
        }
        out.len() - before
    }

    /// Commits the lower queues if sub-requests went to them since the last commit.
    pub(crate) fn commit_sent(&mut self) -> Result<()> {
        if self.uncommitted {
            self.commit()
        } else {
            Ok(())
        }
    }

    /// Sub-requests not yet reaped (backlogs included).
    pub(crate) fn in_flight(&self) -> usize {
        self.failed.len()
            + self
                .slots
                .iter()
                .flatten()
                .map(|l| l.queue.in_flight() + l.backlog.len())
                .sum::<usize>()
    }

    /// Which lower queues have work (completions made here count as several, so that the
    /// caller does not block in one queue while they wait).
    pub(crate) fn busy(&self) -> Busy {
        if !self.failed.is_empty() {
            return Busy::Many;
        }
        let mut found = Busy::None;
        for (i, l) in self.slots.iter().enumerate() {
            if l.as_ref().is_some_and(Lower::busy) {
                if found != Busy::None {
                    return Busy::Many;
                }
                found = Busy::One(i);
            }
        }
        found
    }

    /// Blocks in lower queue `i` until it has a completion or `timeout` passes.
    pub(crate) fn wait_on(&mut self, i: usize, timeout: Option<Duration>) -> Result<()> {
        match self.slots.get_mut(i).and_then(Option::as_mut) {
            Some(l) => {
                l.drain_backlog();
                l.queue.wait(timeout)
            }
            None => Ok(()),
        }
    }
}
