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

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Result, StorageError};
use crate::io::{
    check_range, notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request,
};

use super::codec;
use super::entry::Mapping;
use super::plan::{AllocPlan, WritePlan, ZeroMode, ZeroPlan};
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
    plan: AllocPlan,
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

    fn view(&self, r: usize, off: usize, len: usize) -> Option<IoBuf> {
        let parent = self.reqs.items.get(r)?.as_ref()?.buf.as_ref()?;
        Some(IoBuf::view(parent, off, len))
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

    /// The decompressed cluster whose compressed data is at `offset`.
    fn decompressed(&mut self, offset: u64, len: u64) -> Result<&[u8]> {
        if self.zcache.as_ref().is_none_or(|(o, _)| *o != offset) {
            let file_len = self.img.file.len();
            if offset >= file_len {
                return Err(StorageError::corrupt(
                    &self.img.name,
                    format!("compressed cluster at {offset:#x} lies beyond the end of the file"),
                ));
            }
            let n = len.min(file_len - offset) as usize;
            let mut raw = vec![0u8; n];
            self.img.file.read_exact_at(offset, &mut raw)?;
            let mut out = vec![0u8; self.img.geo.cluster_size as usize];
            codec::decompress(self.img.codec, &raw, &mut out).map_err(|e| match e {
                StorageError::Corrupt { detail, .. } => StorageError::corrupt(
                    &self.img.name,
                    format!("compressed cluster at {offset:#x}: {detail}"),
                ),
                other => other,
            })?;
            self.zcache = Some((offset, out));
        }
        Ok(self
            .zcache
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[]))
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

    fn start_read(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let r = self.new_req(tag, Kind::Read, Some(Arc::new(buf)), len);
        let mut extents = std::mem::take(&mut self.extents);
        extents.clear();
        let mapped = {
            let mut m = self.lock();
            let mut at = offset;
            let end = offset + len;
            let mut res = Ok(());
            while at < end {
                match m.map(at, end - at) {
                    Ok((mapping, run)) => {
                        push_extent(&mut extents, at, run, mapping, self.img.merge);
                        at += run;
                    }
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            res
        };
        if let Err(e) = mapped {
            self.fail(r, e);
        } else {
            for &(g, n, mapping) in &extents {
                self.read_extent(r, (g - offset) as usize, g, n, mapping);
            }
        }
        self.extents = extents;
        self.end_planning(r);
    }

    fn read_extent(&mut self, r: usize, off: usize, g: u64, n: u64, mapping: Mapping) {
        let Some(mut view) = self.view(r, off, n as usize) else {
            return;
        };
        match mapping {
            Mapping::Zero => view.fill_zero(0, n as usize),
            Mapping::Unallocated => {
                let bsize = self.img.backing_size;
                if self.backing.is_none() || g >= bsize {
                    view.fill_zero(0, n as usize);
                    return;
                }
                let inside = n.min(bsize - g);
                if inside < n {
                    view.fill_zero(inside as usize, (n - inside) as usize);
                }
                drop(view);
                let Some(part) = self.view(r, off, inside as usize) else {
                    return;
                };
                self.submit_lower(
                    Lower::Backing,
                    r,
                    SubWhat::Piece,
                    Op::Read {
                        offset: g,
                        buf: part,
                    },
                );
            }
            Mapping::Allocated(h) => {
                self.submit_lower(
                    Lower::Host,
                    r,
                    SubWhat::Piece,
                    Op::Read {
                        offset: h,
                        buf: view,
                    },
                );
            }
            Mapping::Compressed {
                offset,
                len,
                within,
            } => match self.decompressed(offset, len) {
                Ok(data) => {
                    let w = within as usize;
                    view.copy_from_slice(0, &data[w..w + n as usize]);
                }
                Err(e) => {
                    drop(view);
                    self.fail(r, e);
                }
            },
        }
    }

    fn start_write(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let r = self.new_req(tag, Kind::Write, Some(Arc::new(buf)), len);
        self.write_range(r, offset, len, Src::Guest(0));
        self.end_planning(r);
    }

    /// Splits `[g, g+len)` at cluster boundaries and writes each piece, merging direct writes
    /// that are contiguous on the host.
    fn write_range(&mut self, r: usize, g: u64, len: u64, src: Src) {
        let cs = self.img.geo.cluster_size;
        let mut at = g;
        let end = g + len;
        // A run of direct writes: host offset, guest offset, length.
        let mut run: Option<(u64, u64, u64)> = None;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let plan = self.lock().plan_write(at, n, self.notifier.clone());
            match plan {
                Ok(WritePlan::Direct(h)) => match run {
                    Some((rh, rg, rn)) if rh + rn == h && self.img.merge => {
                        run = Some((rh, rg, rn + n))
                    }
                    _ => {
                        if let Some((rh, rg, rn)) = run.take() {
                            self.direct_write(r, rh, rg, rn, src, g);
                        }
                        run = Some((h, at, n));
                    }
                },
                other => {
                    if let Some((rh, rg, rn)) = run.take() {
                        self.direct_write(r, rh, rg, rn, src, g);
                    }
                    match other {
                        Ok(WritePlan::Wait) => self.block(r, at, n, src_at(src, at - g), None),
                        Ok(WritePlan::Alloc(plan)) => {
                            self.start_job(r, plan, at, n, src_at(src, at - g))
                        }
                        Ok(WritePlan::Direct(_)) => {}
                        Err(e) => self.fail(r, e),
                    }
                }
            }
            at += n;
        }
        if let Some((rh, rg, rn)) = run {
            self.direct_write(r, rh, rg, rn, src, g);
        }
    }

    fn direct_write(&mut self, r: usize, h: u64, at: u64, n: u64, src: Src, g: u64) {
        let op = match src_at(src, at - g) {
            Src::Guest(off) => match self.view(r, off, n as usize) {
                Some(v) => Op::Write { offset: h, buf: v },
                None => return,
            },
            Src::Zeros => Op::WriteZeroes {
                offset: h,
                len: n,
                unmap: false,
            },
        };
        self.submit_lower(Lower::Host, r, SubWhat::Piece, op);
    }

    fn block(&mut self, r: usize, g: u64, len: u64, src: Src, zero: Option<ZeroMode>) {
        if let Some(q) = self.reqs.get_mut(r) {
            q.pending += 1;
        }
        self.blocked.push(Blocked {
            req: r,
            g,
            len,
            src,
            zero,
        });
    }

    fn start_job(&mut self, r: usize, plan: AllocPlan, g: u64, n: u64, src: Src) {
        let data = match src {
            Src::Guest(off) => match self.view(r, off, n as usize) {
                Some(v) => v,
                None => return,
            },
            Src::Zeros => IoBuf::new(n as usize),
        };
        let parts: Vec<Arc<IoBuf>> = plan
            .cow
            .iter()
            .map(|p| Arc::new(IoBuf::new(p.len as usize)))
            .collect();
        let cow = plan.cow.clone();
        if let Some(q) = self.reqs.get_mut(r) {
            q.pending += 1;
        }
        let j = self.jobs.insert(Job {
            req: r,
            plan,
            g,
            parts,
            data: Some(data),
            reads: 0,
            error: None,
        });
        for (i, p) in cow.iter().enumerate() {
            let part = match self.jobs.get_mut(j) {
                Some(job) => job.parts[i].clone(),
                None => return,
            };
            match p.source {
                Mapping::Zero => {}
                Mapping::Unallocated => {
                    let bsize = self.img.backing_size;
                    if self.backing.is_some() && p.guest < bsize {
                        let inside = p.len.min(bsize - p.guest) as usize;
                        let view = IoBuf::view(&part, 0, inside);
                        self.job_read(j, Lower::Backing, p.guest, view);
                    }
                }
                Mapping::Allocated(h) => {
                    let view = IoBuf::view(&part, 0, p.len as usize);
                    self.job_read(j, Lower::Host, h, view);
                }
                Mapping::Compressed {
                    offset,
                    len,
                    within,
                } => {
                    let copied = self.decompressed(offset, len).map(|d| {
                        let w = within as usize;
                        let mut v = IoBuf::view(&part, 0, p.len as usize);
                        v.copy_from_slice(0, &d[w..w + p.len as usize]);
                    });
                    if let (Err(e), Some(job)) = (copied, self.jobs.get_mut(j)) {
                        job.error.get_or_insert(e);
                    }
                }
            }
        }
        if self.jobs.get_mut(j).is_some_and(|job| job.reads == 0) {
            self.job_reads_done(j);
        }
    }

    fn job_read(&mut self, j: usize, which: Lower, offset: u64, view: IoBuf) {
        let r = match self.jobs.get_mut(j) {
            Some(job) => {
                job.reads += 1;
                job.req
            }
            None => return,
        };
        self.submit_lower(
            which,
            r,
            SubWhat::CowRead(j),
            Op::Read { offset, buf: view },
        );
    }

    fn job_reads_done(&mut self, j: usize) {
        let failed = self.jobs.get_mut(j).and_then(|job| job.error.take());
        if let Some(e) = failed {
            self.end_job(j, Err(e));
            return;
        }
        let Some(job) = self.jobs.get_mut(j) else {
            return;
        };
        let mut pieces = Vec::with_capacity(job.parts.len() + 1);
        let mut data = job.data.take();
        for (p, buf) in job.plan.cow.iter().zip(&job.parts) {
            if p.guest > job.g {
                if let Some(d) = data.take() {
                    pieces.push(d);
                }
            }
            pieces.push(IoBuf::view(buf, 0, p.len as usize));
        }
        if let Some(d) = data.take() {
            pieces.push(d);
        }
        let cs = self.img.geo.cluster_size;
        let offset = job.plan.host + (job.plan.write_start - job.plan.guest_cluster * cs);
        let r = job.req;
        let buf = IoBuf::chain(pieces);
        self.submit_lower(
            Lower::Host,
            r,
            SubWhat::JobWrite(j),
            Op::Write { offset, buf },
        );
    }

    /// Commits (or on failure rolls back) an allocating write and wakes the pieces waiting on it.
    fn end_job(&mut self, j: usize, result: Result<()>) {
        let Some(job) = self.jobs.remove(j) else {
            return;
        };
        let waiters = {
            let mut m = self.lock();
            match &result {
                Ok(()) => m.commit_alloc(&job.plan),
                Err(_) => Ok(m.abort_alloc(&job.plan)),
            }
        };
        self.img.alloc_gen.fetch_add(1, Ordering::AcqRel);
        let mut err = result.err();
        match waiters {
            Ok(ws) => {
                for w in ws.into_iter().flatten() {
                    if !self.notifier.as_ref().is_some_and(|n| Arc::ptr_eq(&w, n)) {
                        let _ = w.write(1);
                    }
                }
            }
            Err(e) => {
                err.get_or_insert(e);
            }
        }
        drop(job.parts);
        drop(job.data);
        if let Some(e) = err {
            self.fail(job.req, e);
        }
        if let Some(q) = self.reqs.get_mut(job.req) {
            q.pending -= 1;
        }
        self.maybe_finish(job.req);
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

    fn start_zero(&mut self, tag: u64, offset: u64, len: u64, mode: ZeroMode) {
        let r = self.new_req(tag, Kind::Other, None, len);
        let cs = self.img.geo.cluster_size;
        let mut at = offset;
        while at < offset + len {
            let n = (cs - at % cs).min(offset + len - at);
            self.zero_piece(r, at, n, mode);
            at += n;
        }
        self.end_planning(r);
    }

    fn zero_piece(&mut self, r: usize, g: u64, n: u64, mode: ZeroMode) {
        let plan = self.lock().plan_zero(g, n, mode, self.notifier.clone());
        match plan {
            Ok(ZeroPlan::Wait) => self.block(r, g, n, Src::Zeros, Some(mode)),
            Ok(ZeroPlan::Done(writes)) => {
                for (wg, wn) in writes {
                    self.write_range(r, wg, wn, Src::Zeros);
                }
            }
            Err(e) => self.fail(r, e),
        }
    }

    fn start_flush(&mut self, tag: u64) {
        let writeback = {
            let mut m = self.lock();
            if m.needs_writeback() {
                Some(m.writeback())
            } else {
                None
            }
        };
        match writeback {
            Some(r) => self.complete_now(tag, None, r.map(|()| 0)),
            None => {
                let r = self.new_req(tag, Kind::Other, None, 0);
                self.submit_lower(Lower::Host, r, SubWhat::Piece, Op::Flush);
                self.end_planning(r);
            }
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

fn src_at(src: Src, delta: u64) -> Src {
    match src {
        Src::Guest(off) => Src::Guest(off + delta as usize),
        Src::Zeros => Src::Zeros,
    }
}

fn push_extent(extents: &mut Vec<(u64, u64, Mapping)>, g: u64, n: u64, m: Mapping, merge: bool) {
    if let Some(last) = extents.last_mut().filter(|_| merge) {
        let merged = match (last.2, m) {
            (Mapping::Allocated(h), Mapping::Allocated(h2)) => h + last.1 == h2,
            (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => true,
            _ => false,
        };
        if merged && last.0 + last.1 == g {
            last.1 += n;
            return;
        }
    }
    extents.push((g, n, m));
}

impl IoQueue for Qcow2Queue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.accepted
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.accepted >= self.depth {
            return Err(QueueFull(req));
        }
        self.accepted += 1;
        self.img.active.fetch_add(1, Ordering::AcqRel);
        let Request { tag, mut op } = req;
        let size = self.img.size.load(Ordering::Acquire);
        if let Err(e) = check_range(&op, size) {
            let buf = op.take_buf();
            self.complete_now(tag, buf, Err(e));
            return Ok(());
        }
        let writes = !matches!(op, Op::Read { .. } | Op::Flush);
        if writes && self.img.read_only {
            let buf = op.take_buf();
            self.complete_now(tag, buf, Err(StorageError::ReadOnly(self.img.name.clone())));
            return Ok(());
        }
        match op {
            Op::Read { buf, .. } if buf.is_empty() => self.complete_now(tag, Some(buf), Ok(0)),
            Op::Write { offset: _, buf } if buf.is_empty() => {
                self.complete_now(tag, Some(buf), Ok(0))
            }
            Op::Read { offset, buf } => self.start_read(tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(tag, offset, buf),
            Op::Flush => self.start_flush(tag),
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                self.complete_now(tag, None, Ok(0))
            }
            Op::Discard { offset, len } => self.start_zero(tag, offset, len, ZeroMode::Discard),
            Op::WriteZeroes { offset, len, unmap } => {
                let mode = if unmap {
                    ZeroMode::Unmap
                } else {
                    ZeroMode::Keep
                };
                self.start_zero(tag, offset, len, mode)
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.host.commit()?;
        if let Some(b) = self.backing.as_mut() {
            b.commit()?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.reaping = true;
        self.process();
        self.reaping = false;
        let n = self.ready.len();
        self.accepted -= n;
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.reaping = true;
            self.process();
            self.reaping = false;
            if !self.ready.is_empty() || self.accepted == 0 {
                return Ok(());
            }
            let mut ms: i32 = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
                None => -1,
            };
            let stalled =
                !self.blocked.is_empty() || !self.host_backlog.is_empty() || !self.lower_busy();
            if stalled {
                // Waiting on another queue's allocation: it signals us, but poll briefly too.
                ms = if ms < 0 { 1 } else { ms.min(1) };
            }
            match &self.notifier {
                Some(n) => {
                    let mut fds = [libc::pollfd {
                        fd: n.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    // SAFETY: `fds` is one valid pollfd for the duration of the call.
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
                    if r > 0 {
                        // Readable, so this does not block even on a blocking eventfd.
                        let _ = n.read();
                    }
                }
                None if stalled => std::thread::sleep(Duration::from_millis(ms.max(0) as u64)),
                None => {
                    let t = (ms >= 0).then(|| Duration::from_millis(ms as u64));
                    self.host.wait(t)?;
                }
            }
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.external.as_ref()
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Allocations in flight must be committed or rolled back, or other queues would wait on
        // their clusters forever.
        let give_up = Instant::now() + Duration::from_secs(60);
        while (self.lower_busy()
            || !self.host_backlog.is_empty()
            || !self.backing_backlog.is_empty())
            && Instant::now() < give_up
        {
            let _ = self.commit();
            self.process();
            if self.lower_busy() {
                let _ = self.host.wait(Some(Duration::from_millis(10)));
                if let Some(b) = self.backing.as_mut() {
                    let _ = b.wait(Some(Duration::from_millis(1)));
                }
            }
        }
        let jobs: Vec<usize> = (0..self.jobs.items.len()).collect();
        for j in jobs {
            if self.jobs.get_mut(j).is_some() {
                self.end_job(j, Err(StorageError::Unavailable("queue closed".into())));
            }
        }
    }
}
