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
//! The queue is a layer of storage's stacked queues ([`strata_storage::io::stack`]), which keep
//! the volume's queue and its backlog, and wait on one eventfd (the consumer's, or one of their
//! own) that both the volume's completions and the chunk table signal.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use strata_storage::io::stack::{Layer, Lower, Stack, StackedQueue};
use strata_storage::io::{check_range, Completion, IoQueue, Op, QueueOptions, Request};
use strata_storage::{Result, StorageError};

use super::chunks::Plan;
use super::{Inner, Shared};

/// A request handed to the volume's queue.
#[derive(Debug)]
pub(crate) struct Sent {
    /// The caller's tag.
    tag: u64,
    /// Chunks a whole-chunk write claimed.
    claimed: Vec<u64>,
    /// For a flush: the chunks on the volume when it was submitted.
    flush: Option<Vec<u64>>,
}

/// Opens a queue of a [`super::LiveRestore`]. See the module documentation.
pub(crate) fn open(dev: Arc<Inner>, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
    let target = dev.shared.target.clone();
    let lower = Lower {
        opener: Box::new(move |_, o| target.open_queue(o)),
        depth: opts.depth.max(1),
        own_eventfd: true,
    };
    let layer = LiveLayer {
        dev,
        parked: VecDeque::new(),
        planned_at: 0,
    };
    let mut q = StackedQueue::new(layer, opts, lower)?;
    q.open_lower(0)?;
    Ok(Box::new(q))
}

/// What a live-restore queue does with requests. See the module documentation.
struct LiveLayer {
    dev: Arc<Inner>,
    parked: VecDeque<Request>,
    /// The chunk table's change count ([`super::chunks::Chunks::changes`]) when the parked
    /// requests last went round.
    planned_at: u64,
}

impl fmt::Debug for LiveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveLayer")
            .field("parked", &self.parked.len())
            .finish()
    }
}

impl LiveLayer {
    fn shared(&self) -> &Shared {
        &self.dev.shared
    }

    /// Sends `req` down, parks it, or fails it.
    fn dispatch(&mut self, st: &mut Stack<Sent>, req: Request) {
        let plan = match &req.op {
            Op::Flush => {
                let captured = if self.shared().chunks.finished() {
                    None
                } else {
                    Some(self.shared().chunks.capture())
                };
                return down(st, req, Vec::new(), captured);
            }
            op => {
                let s = self.shared();
                let Some((off, len)) = op.range() else {
                    return down(st, req, Vec::new(), None);
                };
                if len == 0 || s.chunks.all_done() {
                    return down(st, req, Vec::new(), None);
                }
                if let Err(e) = check_range(op, s.index.size()) {
                    return st.complete(Completion::of(req, Err(e)));
                }
                let cs = u64::from(s.index.chunk_size());
                let (first, last) = (off / cs, (off + len - 1) / cs);
                if (first..=last).all(|i| s.chunks.is_done(i)) {
                    return down(st, req, Vec::new(), None);
                }
                let Some(waker) = st.waker() else {
                    // Not reached: the queue is opened with an eventfd of its own.
                    let e = StorageError::Unavailable(
                        "a live-restore queue has no eventfd to wait for chunks on".into(),
                    );
                    return st.complete(Completion::of(req, Err(e)));
                };
                match op {
                    Op::Read { .. } => s.chunks.plan_read(first, last, waker),
                    _ => s.chunks.plan_write(
                        first,
                        last,
                        |i| {
                            let (start, clen) = s.index.chunk_range(i);
                            off <= start && off + len >= start + clen as u64
                        },
                        waker,
                    ),
                }
            }
        };
        match plan {
            Plan::Go(claimed) => down(st, req, claimed, None),
            Plan::Park => self.parked.push_back(req),
            Plan::Fail(e) => st.complete(Completion::of(req, Err(e))),
        }
    }
}

/// Hands `req` to the volume's queue (the stack keeps it in the backlog while that is full).
fn down(st: &mut Stack<Sent>, req: Request, claimed: Vec<u64>, flush: Option<Vec<u64>>) {
    let sent = Sent {
        tag: req.tag,
        claimed,
        flush,
    };
    st.send(0, sent, req.op);
}

impl Layer for LiveLayer {
    type Sub = Sent;

    fn start(&mut self, st: &mut Stack<Sent>, req: Request) {
        self.dispatch(st, req);
    }

    fn finished(&mut self, st: &mut Stack<Sent>, sent: Sent, c: Completion) {
        let s = self.shared();
        s.chunks.guest_done(&sent.claimed, c.result.is_ok());
        let mut result = c.result;
        if let (Some(captured), true) = (sent.flush, result.is_ok()) {
            if let Err(e) = s.persist_flushed(captured) {
                result = Err(e);
            }
        }
        st.complete(Completion {
            tag: sent.tag,
            result,
            buf: c.buf,
        });
    }

    fn advance(&mut self, st: &mut Stack<Sent>) -> bool {
        // The stack calls this on every reap. Parked requests go round only when the chunk
        // table changed since they last did (a request parked since was planned against a
        // table at least that new): going round takes the table's lock and wakes its workers.
        // The count is read before planning, so a change made while they go round brings them
        // round again; each change signals the eventfd they registered on parking.
        let changes = self.shared().chunks.changes();
        if self.parked.is_empty() || changes == self.planned_at {
            return !self.parked.is_empty();
        }
        self.planned_at = changes;
        // Those whose chunks arrived go down, the rest park again (registering the eventfd
        // with the table once more).
        for _ in 0..self.parked.len() {
            if let Some(r) = self.parked.pop_front() {
                self.dispatch(st, r);
            }
        }
        !self.parked.is_empty()
    }
}
