//! The data plane of a live restore: a queue over one queue of the volume.
//!
//! Each request is planned against the chunk table ([`super::chunks`]): requests whose chunks
//! are all on the volume go straight down (the only path once the restore is done); a read,
//! or a write covering part of a missing chunk, is parked until a worker has put that chunk on
//! the volume (the table asks for it ahead of the background copy and signals this queue's
//! eventfd when it is there); a write covering missing chunks whole claims them and goes down
//! at once; a request touching a lost chunk completes with an I/O error. A flush records, when
//! it completes, every chunk that was on the volume when it was submitted.
//!
//! The volume's queue is opened with this queue's eventfd (the consumer's, or one of our own),
//! so a consumer waits on one descriptor for completions and for parked requests.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use strata_storage::io::{check_range, Completion, IoQueue, Op, QueueFull, QueueOptions, Request};
use strata_storage::{Result, StorageError};
use vmm_sys_util::eventfd::EventFd;

use super::chunks::Plan;
use super::{Inner, Shared};

/// The longest a [`IoQueue::wait`] with parked requests sleeps before looking again.
const PARKED_WAIT_CAP: Duration = Duration::from_secs(1);

/// A request handed to the volume's queue, by its tag there.
#[derive(Debug)]
struct Slot {
    /// The caller's tag.
    tag: u64,
    /// Chunks a whole-chunk write claimed.
    claimed: Vec<u64>,
    /// For a flush: the chunks on the volume when it was submitted.
    flush: Option<Vec<u64>>,
}

/// A queue of a [`super::LiveRestore`]. See the module documentation.
#[derive(Debug)]
pub(crate) struct LiveQueue {
    dev: Arc<Inner>,
    inner: Box<dyn IoQueue>,
    waker: Arc<EventFd>,
    consumer: Option<Arc<EventFd>>,
    depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    parked: VecDeque<Request>,
    ready: VecDeque<Completion>,
    reaped: Vec<Completion>,
}

impl LiveQueue {
    pub(crate) fn open(dev: Arc<Inner>, opts: &QueueOptions) -> Result<LiveQueue> {
        let waker = match &opts.notifier {
            Some(n) => n.clone(),
            None => Arc::new(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| StorageError::io("Creating an eventfd", e))?,
            ),
        };
        let depth = opts.depth.max(1);
        let inner_opts = QueueOptions {
            depth,
            notifier: Some(waker.clone()),
            submit_batch: opts.submit_batch,
        };
        let inner = dev.shared.target.open_queue(&inner_opts)?;
        Ok(LiveQueue {
            dev,
            inner,
            waker,
            consumer: opts.notifier.clone(),
            depth,
            slots: Vec::new(),
            free: Vec::new(),
            parked: VecDeque::new(),
            ready: VecDeque::new(),
            reaped: Vec::new(),
        })
    }

    fn shared(&self) -> &Shared {
        &self.dev.shared
    }

    /// Sends `req` down, parks it, or fails it.
    fn dispatch(&mut self, req: Request) {
        let plan = match &req.op {
            Op::Flush => {
                let captured = if self.shared().chunks.finished() {
                    None
                } else {
                    Some(self.shared().chunks.capture())
                };
                return self.down(req, Vec::new(), captured);
            }
            op => {
                let s = self.shared();
                let Some((off, len)) = op.range() else {
                    return self.down(req, Vec::new(), None);
                };
                if len == 0 || s.chunks.all_done() {
                    return self.down(req, Vec::new(), None);
                }
                if let Err(e) = check_range(op, s.index.size()) {
                    self.ready.push_back(Completion::of(req, Err(e)));
                    return;
                }
                let cs = u64::from(s.index.chunk_size());
                let (first, last) = (off / cs, (off + len - 1) / cs);
                if (first..=last).all(|i| s.chunks.is_done(i)) {
                    return self.down(req, Vec::new(), None);
                }
                match op {
                    Op::Read { .. } => s.chunks.plan_read(first, last, &self.waker),
                    _ => s.chunks.plan_write(
                        first,
                        last,
                        |i| {
                            let (start, clen) = s.index.chunk_range(i);
                            off <= start && off + len >= start + clen as u64
                        },
                        &self.waker,
                    ),
                }
            }
        };
        match plan {
            Plan::Go(claimed) => self.down(req, claimed, None),
            Plan::Park => self.parked.push_back(req),
            Plan::Fail(e) => self.ready.push_back(Completion::of(req, Err(e))),
        }
    }

    /// Hands `req` to the volume's queue.
    fn down(&mut self, mut req: Request, claimed: Vec<u64>, flush: Option<Vec<u64>>) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let tag = req.tag;
        req.tag = idx as u64;
        match self.inner.submit(req) {
            Ok(()) => {
                self.slots[idx] = Some(Slot {
                    tag,
                    claimed,
                    flush,
                })
            }
            Err(QueueFull(mut back)) => {
                // Not expected (the volume's queue is as deep as this one): try again later.
                back.tag = tag;
                self.free.push(idx);
                self.shared().chunks.guest_done(&claimed, false);
                self.parked.push_back(back);
            }
        }
    }

    fn retry_parked(&mut self) {
        for _ in 0..self.parked.len() {
            if let Some(r) = self.parked.pop_front() {
                self.dispatch(r);
            }
        }
    }

    fn busy_slots(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl IoQueue for LiveQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.busy_slots() + self.parked.len() + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        self.retry_parked();
        self.dispatch(req);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.retry_parked();
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        self.retry_parked();
        self.reaped.clear();
        self.inner.reap(&mut self.reaped);
        let mut reaped = std::mem::take(&mut self.reaped);
        for c in reaped.drain(..) {
            let idx = c.tag as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            self.free.push(idx);
            let s = &self.dev.shared;
            s.chunks.guest_done(&slot.claimed, c.result.is_ok());
            let mut result = c.result;
            if let (Some(captured), true) = (slot.flush, result.is_ok()) {
                if let Err(e) = s.persist_flushed(captured) {
                    result = Err(e);
                }
            }
            out.push(Completion {
                tag: slot.tag,
                result,
                buf: c.buf,
            });
        }
        self.reaped = reaped;
        // Whole-chunk writes that completed may have released parked requests.
        self.retry_parked();
        out.extend(self.ready.drain(..));
        out.len() - before
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.retry_parked();
        self.inner.commit()?;
        if !self.ready.is_empty() || self.in_flight() == 0 {
            return Ok(());
        }
        if self.parked.is_empty() {
            return self.inner.wait(timeout);
        }
        // Parked requests: sleep until a chunk arrives or the volume completes something (both
        // signal the eventfd).
        let cap = timeout.map_or(PARKED_WAIT_CAP, |t| t.min(PARKED_WAIT_CAP));
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.waker.as_ref()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, cap.as_millis() as libc::c_int) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(StorageError::io("Waiting for a live-restore chunk", e));
            }
        }
        if r > 0 && pfd.revents & libc::POLLIN != 0 {
            // The caller reaps next, so the signal is spent here. (Read only when signalled:
            // a consumer's eventfd may be blocking.)
            let _ = self.waker.read();
        }
        self.retry_parked();
        Ok(())
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.consumer.as_ref()
    }
}
