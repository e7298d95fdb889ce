//! A queue for devices whose operations complete synchronously (the in-memory and
//! fault-injecting engines): each request runs when it is committed and its completion is ready at
//! once.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::io::{check_range, notify, Completion, IoQueue, Op, QueueFull, QueueOptions, Request};

/// Something that runs one operation to completion on the calling thread.
pub trait SyncExecutor: Send + Sync + fmt::Debug {
    /// Current size, for range checks.
    fn size(&self) -> u64;
    /// Runs `op`; returns bytes transferred for reads and writes, 0 otherwise.
    fn execute(&self, op: &mut Op) -> Result<u64>;
}

/// A queue over a [`SyncExecutor`]. See the module documentation.
#[derive(Debug)]
pub struct SyncQueue<E: SyncExecutor + ?Sized> {
    exec: Arc<E>,
    depth: usize,
    submit_batch: usize,
    staged: Vec<Request>,
    ready: VecDeque<Completion>,
    notifier: Option<Arc<EventFd>>,
}

impl<E: SyncExecutor + ?Sized> SyncQueue<E> {
    /// A queue running its requests on `exec`.
    pub fn new(exec: Arc<E>, opts: &QueueOptions) -> SyncQueue<E> {
        SyncQueue {
            exec,
            depth: opts.depth.max(1),
            submit_batch: opts.submit_batch.max(1),
            staged: Vec::new(),
            ready: VecDeque::new(),
            notifier: opts.notifier.clone(),
        }
    }
}

impl<E: SyncExecutor + ?Sized + 'static> IoQueue for SyncQueue<E> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.staged.len() + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        self.staged.push(req);
        if self.staged.len() >= self.submit_batch {
            // Running a request never fails the queue itself: errors go into its completion.
            let _ = self.commit();
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        for mut req in self.staged.drain(..) {
            let result =
                check_range(&req.op, self.exec.size()).and_then(|_| self.exec.execute(&mut req.op));
            self.ready.push_back(Completion::of(req, result));
        }
        notify(self.notifier.as_ref());
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, _timeout: Option<Duration>) -> Result<()> {
        self.commit()
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.notifier.as_ref()
    }
}
