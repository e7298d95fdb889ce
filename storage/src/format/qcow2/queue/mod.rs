//! The qcow2 data plane: one [`Qcow2Queue`] per consumer thread.
//!
//! Each guest request is split at cluster (or subcluster-run) boundaries. Under the image's
//! metadata lock, held only for the lookup, each piece is mapped: zeros are filled at once,
//! compressed clusters are decompressed (with a one-cluster cache), and everything else becomes a
//! request on the host file's own queue or on the backing image's queue, carrying an
//! [`IoBuf::view`] of the guest buffer. Allocating writes first read what they copy in (backing
//! file or old cluster), then write copy and data in one vectored request, and point the L2 entry
//! at the new cluster only when that write completed. Pieces that hit a cluster whose allocation
//! is in flight (from this queue or another) wait and are re-planned when it completes; the queue
//! that completed it signals the waiting queue's eventfd.
//!
//! The lower queues are opened with this queue's eventfd (the consumer's, or one of our own), so
//! one descriptor wakes the consumer for everything below.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the queue's state, its bookkeeping of guest requests, and routing of lower completions |
//! | `read.rs` | the read path: mapping, zero-fill, backing and host reads, compressed clusters |
//! | `write.rs` | the write path: direct writes, write-zeroes and discards, allocating writes |
//! | `io_queue.rs` | the [`IoQueue`] implementation: accepting, flushing, reaping, waiting, draining |

mod io_queue;
mod read;
mod write;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Result, StorageError};
use crate::io::{notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request};

use super::entry::Mapping;
use super::plan::{AllocPlan, ZeroMode};
use super::Shared;

struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, t: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(t);
                i
            }
            None => {
                self.items.push(Some(t));
                self.items.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take();
        if t.is_some() {
            self.free.push(i);
        }
        t
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }

    fn is_empty(&self) -> bool {
        self.items.len() == self.free.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Other,
}

struct GuestReq {
    tag: u64,
    kind: Kind,
    buf: Option<Arc<IoBuf>>,
    len: u64,
    /// Pieces not finished (lower requests, allocation jobs, waiting pieces).
    pending: usize,
    /// Still being split: don't complete yet.
    planning: bool,
    error: Option<StorageError>,
}

#[derive(Clone, Copy)]
enum Src {
    /// The guest buffer from this byte on.
    Guest(usize),
    /// Zeros (write-zeroes and discards of partial clusters).
    Zeros,
}

#[derive(Clone, Copy)]
enum SubWhat {
    /// A plain piece of a guest request.
    Piece,
    /// A read of data an allocating write copies in.
    CowRead(usize),
    /// The write of an allocating job.
    JobWrite(usize),
}

struct Sub {
    req: usize,
    what: SubWhat,
}

struct Job {
    req: usize,
    /// One plan, or several for consecutive whole clusters that are contiguous on the host and
    /// copy nothing in (written with one request).
    plans: Vec<AllocPlan>,
    /// Guest offset of the data.
    g: u64,
    parts: Vec<Arc<IoBuf>>,
    data: Option<IoBuf>,
    reads: usize,
    error: Option<StorageError>,
}

struct Blocked {
    req: usize,
    g: u64,
    len: u64,
    src: Src,
    zero: Option<ZeroMode>,
}

#[derive(Clone, Copy)]
enum Lower {
    Host,
    Backing,
}

/// See the module documentation.
pub struct Qcow2Queue {
    img: Arc<Shared>,
    host: Box<dyn IoQueue>,
    backing: Option<Box<dyn IoQueue>>,
    /// The eventfd the lower queues signal: the consumer's, or one of our own when a backing
    /// queue has to be waited on together with the host queue; none otherwise (then `wait`
    /// blocks in the host queue itself, one system call per wake-up).
    notifier: Option<Arc<EventFd>>,
    external: Option<Arc<EventFd>>,
    depth: usize,
    accepted: usize,
    reqs: Slab<GuestReq>,
    subs: Slab<Sub>,
    jobs: Slab<Job>,
    blocked: Vec<Blocked>,
    host_backlog: VecDeque<Request>,
    backing_backlog: VecDeque<Request>,
    ready: VecDeque<Completion>,
    seen_gen: u64,
    zcache: Option<(u64, Vec<u8>)>,
    scratch: Vec<Completion>,
    extents: Vec<(u64, u64, Mapping)>,
    /// Inside `reap`/`wait`: completions go straight to the caller, no eventfd signal needed.
    reaping: bool,
}

impl fmt::Debug for Qcow2Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Queue")
            .field("image", &self.img.name)
            .field("depth", &self.depth)
            .field("in_flight", &self.accepted)
            .finish()
    }
}

impl Qcow2Queue {
    pub(super) fn new(img: Arc<Shared>, opts: &QueueOptions) -> Result<Qcow2Queue> {
        let notifier = match &opts.notifier {
            Some(n) => Some(n.clone()),
            None if img.backing.is_some() => Some(Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| StorageError::io("Creating an eventfd", e))?,
            )),
            None => None,
        };
        let depth = opts.depth.max(1);
        let mut lower = QueueOptions::with_depth(depth * 2 + 32).batch(opts.submit_batch);
        if let Some(n) = &notifier {
            lower = lower.notify(n.clone());
        }
        let host = img.file.open_queue(&lower)?;
        let backing = match &img.backing {
            Some(b) => Some(b.open_queue(&lower)?),
            None => None,
        };
        Ok(Qcow2Queue {
            seen_gen: img.alloc_gen.load(Ordering::Acquire),
            img,
            host,
            backing,
            notifier,
            external: opts.notifier.clone(),
            depth,
            accepted: 0,
            reqs: Slab::new(),
            subs: Slab::new(),
            jobs: Slab::new(),
            blocked: Vec::new(),
            host_backlog: VecDeque::new(),
            backing_backlog: VecDeque::new(),
            ready: VecDeque::new(),
            zcache: None,
            scratch: Vec::new(),
            extents: Vec::new(),
            reaping: false,
        })
    }

    fn complete_now(&mut self, tag: u64, buf: Option<IoBuf>, result: Result<u64>) {
        self.img.active.fetch_sub(1, Ordering::AcqRel);
        self.ready.push_back(Completion { tag, result, buf });
        if !self.reaping {
            notify(self.notifier.as_ref());
        }
    }

    fn fail(&mut self, r: usize, e: StorageError) {
        if let Some(req) = self.reqs.get_mut(r) {
            req.error.get_or_insert(e);
        }
    }

    /// A view of request `r`'s buffer.
    fn view(&self, r: usize, off: usize, len: usize) -> Option<IoBuf> {
        let parent = self.reqs.items.get(r)?.as_ref()?.buf.as_ref()?;
        // SAFETY: planning hands each byte of a read to one piece at a time (the walk advances
        // past every extent it maps; a piece cut again is cut after its first view is dropped),
        // and a write's views are only read. The buffer is taken back (`Arc::try_unwrap` in
        // `finish`) only when no piece of the request is pending.
        Some(unsafe { IoBuf::view(parent, off, len) })
    }

    fn submit_lower(&mut self, which: Lower, r: usize, what: SubWhat, op: Op) {
        let tag = self.subs.insert(Sub { req: r, what }) as u64;
        if let SubWhat::Piece = what {
            if let Some(req) = self.reqs.get_mut(r) {
                req.pending += 1;
            }
        }
        let req = Request { tag, op };
        let (q, backlog) = match which {
            Lower::Host => (Some(&mut self.host), &mut self.host_backlog),
            Lower::Backing => (self.backing.as_mut(), &mut self.backing_backlog),
        };
        let Some(q) = q else {
            // No backing queue: cannot happen, reads of unallocated data without a backing file
            // are zero-filled before getting here.
            let mut req = req;
            drop(req.op.take_buf());
            self.handle_lower(Completion {
                tag,
                result: Err(StorageError::Unavailable("no backing image".into())),
                buf: None,
            });
            return;
        };
        if !backlog.is_empty() {
            backlog.push_back(req);
            return;
        }
        if let Err(QueueFull(req)) = q.submit(req) {
            backlog.push_back(req);
        }
    }

    fn retry_backlogs(&mut self) {
        while let Some(req) = self.host_backlog.pop_front() {
            if let Err(QueueFull(req)) = self.host.submit(req) {
                self.host_backlog.push_front(req);
                break;
            }
        }
        if let Some(b) = self.backing.as_mut() {
            while let Some(req) = self.backing_backlog.pop_front() {
                if let Err(QueueFull(req)) = b.submit(req) {
                    self.backing_backlog.push_front(req);
                    break;
                }
            }
        }
    }

    fn new_req(&mut self, tag: u64, kind: Kind, buf: Option<Arc<IoBuf>>, len: u64) -> usize {
        self.reqs.insert(GuestReq {
            tag,
            kind,
            buf,
            len,
            pending: 0,
            planning: true,
            error: None,
        })
    }

    fn maybe_finish(&mut self, r: usize) {
        let done = self
            .reqs
            .get_mut(r)
            .is_some_and(|q| q.pending == 0 && !q.planning);
        if !done {
            return;
        }
        let Some(req) = self.reqs.remove(r) else {
            return;
        };
        let buf = req.buf.map(|b| {
            Arc::try_unwrap(b).unwrap_or_else(|_| {
                tracing::error!("a qcow2 request's buffer was still shared at completion");
                IoBuf::empty()
            })
        });
        let result = match req.error {
            Some(e) => Err(e),
            None if req.kind == Kind::Other => Ok(0),
            None => Ok(req.len),
        };
        self.complete_now(req.tag, buf, result);
    }

    fn end_planning(&mut self, r: usize) {
        if let Some(q) = self.reqs.get_mut(r) {
            q.planning = false;
        }
        self.maybe_finish(r);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, super::meta::Meta> {
        self.img.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle_lower(&mut self, c: Completion) {
        drop(c.buf);
        let Some(sub) = self.subs.remove(c.tag as usize) else {
            tracing::error!(tag = c.tag, "completion for an unknown qcow2 sub-request");
            return;
        };
        match sub.what {
            SubWhat::Piece => {
                if let Err(e) = c.result {
                    self.fail(sub.req, e);
                }
                if let Some(q) = self.reqs.get_mut(sub.req) {
                    q.pending -= 1;
                }
                self.maybe_finish(sub.req);
            }
            SubWhat::CowRead(j) => {
                let last = match self.jobs.get_mut(j) {
                    Some(job) => {
                        if let Err(e) = c.result {
                            job.error.get_or_insert(e);
                        }
                        job.reads -= 1;
                        job.reads == 0
                    }
                    None => false,
                };
                if last {
                    self.job_reads_done(j);
                }
            }
            SubWhat::JobWrite(j) => self.end_job(j, c.result.map(|_| ())),
        }
    }

    fn retry_blocked(&mut self) {
        let gen = self.img.alloc_gen.load(Ordering::Acquire);
        if gen == self.seen_gen || self.blocked.is_empty() {
            self.seen_gen = gen;
            return;
        }
        self.seen_gen = gen;
        let blocked = std::mem::take(&mut self.blocked);
        for b in blocked {
            if let Some(q) = self.reqs.get_mut(b.req) {
                q.pending -= 1;
                q.planning = true;
            }
            match b.zero {
                Some(mode) => self.zero_piece(b.req, b.g, b.len, mode),
                None => self.write_range(b.req, b.g, b.len, b.src),
            }
            self.end_planning(b.req);
        }
    }

    /// Reaps the lower queues and advances everything that can advance.
    fn process(&mut self) {
        loop {
            let mut got = 0;
            let mut scratch = std::mem::take(&mut self.scratch);
            got += self.host.reap(&mut scratch);
            if let Some(b) = self.backing.as_mut() {
                got += b.reap(&mut scratch);
            }
            for c in scratch.drain(..) {
                self.handle_lower(c);
            }
            self.scratch = scratch;
            self.retry_backlogs();
            self.retry_blocked();
            if got == 0 {
                break;
            }
        }
    }

    fn lower_busy(&self) -> bool {
        !self.subs.is_empty()
    }
}
