//! The fault-injecting engine's asynchronous queue (feature `test-utils`): requests stay in
//! flight after they are submitted and take effect on the device only when they complete, which
//! happens late and out of order, as a seeded random schedule decides. Each reap completes a
//! random subset (perhaps none) of what is in flight, in a random order; a wait completes at
//! least one. What a test learns from it: an ordering rule that only holds because completions
//! used to arrive at submit time ("write the data, then point the table at it") breaks here,
//! and power lost meanwhile ([`super::fault::FaultController::crash_at_op`]) loses what was
//! still in flight.
//!
//! The queue only makes progress when it is called: while requests are in flight it keeps its
//! eventfd signalled, so a consumer that sleeps on it comes back to reap. Dropping the queue
//! completes what is in flight (an engine drains its ring when dropped).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::io::fault::Shared;
use crate::io::{
    check_range, notify, Completion, IoQueue, QueueFull, QueueOptions, Request, SyncExecutor,
};

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct AsyncQueue {
    shared: Arc<Shared>,
    depth: usize,
    submit_batch: usize,
    staged: Vec<Request>,
    in_flight: Vec<Request>,
    ready: VecDeque<Completion>,
    notifier: Option<Arc<EventFd>>,
    rng: fastrand::Rng,
}

impl AsyncQueue {
    pub(crate) fn new(shared: Arc<Shared>, opts: &QueueOptions, seed: u64) -> AsyncQueue {
        AsyncQueue {
            shared,
            depth: opts.depth.max(1),
            submit_batch: opts.submit_batch.max(1),
            staged: Vec::new(),
            in_flight: Vec::new(),
            ready: VecDeque::new(),
            notifier: opts.notifier.clone(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Completes a random subset of the requests in flight (at least one if `at_least_one`), in a
    /// random order.
    fn progress(&mut self, at_least_one: bool) {
        if self.in_flight.is_empty() {
            return;
        }
        let mut n = self.rng.usize(..=self.in_flight.len());
        if at_least_one {
            n = n.max(1);
        }
        for _ in 0..n {
            let i = self.rng.usize(..self.in_flight.len());
            let mut req = self.in_flight.swap_remove(i);
            let result =
                check_range(&req.op, self.shared.size()).and_then(|_| self.shared.run(&mut req.op));
            self.ready.push_back(Completion::of(req, result));
        }
        // The consumer learns of completions through the eventfd; while requests are still in
        // flight it is woken again, as a real device's later completions would wake it (this
        // engine only makes progress when it is called).
        if n > 0 || !self.in_flight.is_empty() {
            notify(self.notifier.as_ref());
        }
    }
}

impl IoQueue for AsyncQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.staged.len() + self.in_flight.len() + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if IoQueue::in_flight(self) >= self.depth {
            return Err(QueueFull(req));
        }
        self.staged.push(req);
        if self.staged.len() >= self.submit_batch {
            let _ = self.commit();
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.in_flight.append(&mut self.staged);
        // Something may finish at once; the consumer learns of it through the eventfd.
        self.progress(false);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.progress(false);
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, _timeout: Option<Duration>) -> Result<()> {
        self.in_flight.append(&mut self.staged);
        if self.ready.is_empty() {
            self.progress(true);
        }
        Ok(())
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.notifier.as_ref()
    }
}

impl Drop for AsyncQueue {
    fn drop(&mut self) {
        self.in_flight.append(&mut self.staged);
        while !self.in_flight.is_empty() {
            self.progress(true);
        }
    }
}
