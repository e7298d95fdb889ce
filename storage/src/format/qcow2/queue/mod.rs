//! The qcow2 data plane: one queue per consumer thread, a layer of the stacked-queue mechanism
//! (`crate::io::stack`) over the host file's queue (lower queue 0) and the backing image's
//! (lower queue 1).
//!
//! Each guest request is split at cluster (or subcluster-run) boundaries. Under the image's
//! metadata lock, held only for a lookup in memory, each piece is mapped: zeros are filled at
//! once, compressed clusters are decompressed (with a one-cluster cache), and everything else
//! becomes a request on the host file's queue or the backing image's, carrying the whole guest
//! buffer when the request maps to one extent, else an [`IoBuf::view`] of it. Allocating writes
//! first read what they copy in (backing file or old cluster), then write copy and data in one
//! vectored request, and point the L2 entry at the new cluster only when that write completed.
//!
//! A piece that cannot be planned yet is parked and retried when the image's generation moves:
//! one that hits a cluster whose allocation is in flight (from this queue or another), one whose
//! L2 table or refcount block must be read first (the read goes to the host queue, and its
//! completion wakes everyone waiting for that table), and one that needs the metadata worker
//! (a full cache, a file to grow). A flush with metadata to write goes to the worker, which
//! completes it through the queue's mailbox; without metadata to write it is a host flush.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the layer's state, accepting requests, flushes, routing lower completions, parking |
//! | `read.rs` | the read path: mapping, zero-fill, backing and host reads, compressed clusters |
//! | `write.rs` | the write path: direct writes, write-zeroes and discards, allocating writes |

mod read;
mod write;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::format::qcow2::meta::{Await, Job as MetaJob, Table};
use crate::format::qcow2::plan::{AllocPlan, ZeroMode};
use crate::format::qcow2::worker::{Mailbox, Post, Reply};
use crate::format::qcow2::Shared;
use crate::io::stack::wake::{Parked, Waiters};
use crate::io::stack::{Layer, Lower, ReqId, Slab, Stack, StackedQueue};
use crate::io::{check_range, Completion, IoBuf, IoQueue, Op, QueueOptions, Request};

use super::entry::Mapping;

/// Lower queue of the host file.
const HOST: usize = 0;
/// Lower queue of the backing image.
const BACKING: usize = 1;
/// Lower queue of the external data file.
const DATA: usize = 2;

type St = Stack<Sub>;

/// Where the bytes of a write come from.
#[derive(Clone, Copy, Debug)]
enum Src {
    /// The guest buffer from this byte on.
    Guest(usize),
    /// Zeros (write-zeroes and discards of partial clusters).
    Zeros,
}

/// What a lower request is for.
#[derive(Debug)]
enum Sub {
    /// A plain piece of a guest request.
    Piece(ReqId),
    /// A guest read sent down whole, with its own buffer: completes the request with this tag.
    Whole(u64),
    /// A read of data an allocating write copies in.
    CowRead(usize),
    /// The write of an allocating job.
    JobWrite(usize),
    /// A metadata table read for the cache.
    Load(Table),
}

/// An allocating write in flight.
#[derive(Debug)]
struct Job {
    req: ReqId,
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

/// Whole-cluster allocations planned and not yet written, contiguous in the guest and on the
/// host: they go out as one host write.
#[derive(Debug)]
struct Group {
    plans: Vec<AllocPlan>,
    /// Guest offset of the first cluster.
    at: u64,
    /// Where its data comes from.
    src: Src,
}

/// A piece waiting to be planned again.
#[derive(Debug)]
enum Blocked {
    /// A read of guest `[g, g+len)` into request `req`, whose buffer starts at guest `base`.
    Read {
        req: ReqId,
        base: u64,
        g: u64,
        len: u64,
    },
    /// A write of guest `[g, g+len)` from `src`, after the allocations of `group` (planned
    /// already, to be written with what follows).
    Write {
        req: ReqId,
        g: u64,
        len: u64,
        src: Src,
        group: Option<Group>,
    },
    /// A discard or write-zeroes of guest `[g, g+len)` inside one cluster.
    Zero {
        req: ReqId,
        g: u64,
        len: u64,
        mode: ZeroMode,
    },
}

/// See the module documentation.
struct Qcow2Layer {
    img: Arc<Shared>,
    jobs: Slab<Job>,
    parked: Parked<Blocked>,
    mailbox: Arc<Mailbox>,
    /// Requests accepted and not yet reaped (counted in the image's `active`).
    accepted: usize,
    zcache: Option<(u64, Vec<u8>)>,
    extents: Vec<(u64, u64, Mapping)>,
}

impl fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("image", &self.img.name)
            .field("jobs", &self.jobs.len())
            .field("parked", &self.parked.len())
            .finish()
    }
}

/// Opens a queue on the image.
pub(crate) fn open_queue(img: Arc<Shared>, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
    let file = img.file.clone();
    let backing = img.backing.clone();
    let has_backing = backing.is_some();
    let data_file = img.data_file.clone();
    let has_data_file = data_file.is_some();
    let lower = Lower {
        opener: Box::new(move |i, o| match (i, &backing, &data_file) {
            (HOST, _, _) => file.open_queue(o),
            (DATA, _, Some(d)) => d.open_queue(o),
            (BACKING, Some(b), _) => b.open_queue(o),
            _ => Err(StorageError::Unavailable(format!("no lower queue {i}"))),
        }),
        depth: opts.depth.max(1) * 2 + 32,
        own_eventfd: true,
    };
    let layer = Qcow2Layer {
        img,
        jobs: Slab::default(),
        parked: Parked::default(),
        mailbox: Arc::new(Mailbox::new(None)),
        accepted: 0,
        zcache: None,
        extents: Vec::new(),
    };
    let mut q = StackedQueue::new(layer, opts, lower)?;
    q.open_lower(HOST)?;
    if has_backing {
        q.open_lower(BACKING)?;
    }
    if has_data_file {
        q.open_lower(DATA)?;
    }
    let waker = q.waker().cloned();
    q.layer_mut().mailbox = Arc::new(Mailbox::new(waker));
    Ok(Box::new(q))
}

impl Qcow2Layer {
    /// The lower queue guest data lives on: the external data file's, else the host file's.
    fn data_lower(&self) -> usize {
        if self.img.data_file.is_some() {
            DATA
        } else {
            HOST
        }
    }

    /// Acts on a stall decided under the lock (see [`Await`]); returns whether the piece must
    /// be parked.
    fn after_stall(&mut self, st: &mut St, r: ReqId, aw: Await) -> bool {
        match aw {
            Await::Read(t) => {
                let buf = IoBuf::new(self.img.geo.cluster_size as usize);
                st.send(
                    HOST,
                    Sub::Load(t),
                    Op::Read {
                        offset: t.offset(),
                        buf,
                    },
                );
                true
            }
            Await::Wait => true,
            Await::Post(job) => {
                self.post(job);
                true
            }
            Await::Fail(e) => {
                st.fail(r, e);
                false
            }
        }
    }

    fn post(&self, job: MetaJob) {
        self.img.worker.post(match job {
            MetaJob::Room => Post::Writeback,
            MetaJob::Grow(len) => Post::Grow(len),
        });
    }

    /// Posts what the metadata asked of the worker ahead of need.
    fn post_hints(&self, (grow, room): (Option<u64>, bool)) {
        if let Some(len) = grow {
            self.img.worker.post(Post::Grow(len));
        }
        if room {
            self.img.worker.post(Post::Writeback);
        }
    }

    /// Parks a piece of request `r` (which stays open until the piece is retried).
    fn park(&mut self, st: &mut St, b: Blocked) {
        let r = match &b {
            Blocked::Read { req, .. } | Blocked::Write { req, .. } | Blocked::Zero { req, .. } => {
                *req
            }
        };
        st.hold(r);
        self.parked.park(b);
    }

    /// Wakes the queues in `waiters` (not this one) after an event of this queue.
    fn announce(&self, st: &St, mut waiters: Waiters) {
        self.img.core.gen.bump();
        waiters.wake(st.waker());
    }

    fn start_flush(&mut self, st: &mut St, tag: u64) {
        let needs = match self.img.core.meta() {
            Ok(m) => m.needs_writeback(),
            Err(e) => return st.complete_now(tag, None, Err(e)),
        };
        if needs {
            self.img
                .worker
                .post(Post::Flush(Reply::new(&self.mailbox, tag)));
            return;
        }
        let r = st.open(tag, None, 0);
        st.hold(r);
        st.send(HOST, Sub::Piece(r), Op::Flush);
        if self.img.data_file.is_some() {
            st.hold(r);
            st.send(DATA, Sub::Piece(r), Op::Flush);
        }
        st.close(r);
    }

    fn load_done(&mut self, st: &mut St, t: Table, c: Completion) {
        let cs = self.img.geo.cluster_size;
        let data = match (c.result, c.buf) {
            (Ok(n), Some(b)) if n == cs => Ok(b),
            (Ok(n), _) => Err(StorageError::corrupt(
                &self.img.name,
                format!(
                    "metadata table at {:#x}: short read of {n} bytes",
                    t.offset()
                ),
            )),
            (Err(e), _) => Err(e),
        };
        let waiters = match self.img.core.meta() {
            Ok(mut m) => m.finish_load(t, data),
            Err(_) => Waiters::default(),
        };
        self.announce(st, waiters);
    }
}

impl Layer for Qcow2Layer {
    type Sub = Sub;

    fn start(&mut self, st: &mut St, req: Request) {
        self.accepted += 1;
        self.img.active.fetch_add(1, Ordering::AcqRel);
        let Request { tag, mut op } = req;
        let size = self.img.size.load(Ordering::Acquire);
        if let Err(e) = check_range(&op, size) {
            let buf = op.take_buf();
            return st.complete_now(tag, buf, Err(e));
        }
        let writes = !matches!(op, Op::Read { .. } | Op::Flush);
        if writes && self.img.read_only {
            let buf = op.take_buf();
            return st.complete_now(tag, buf, Err(StorageError::ReadOnly(self.img.name.clone())));
        }
        match op {
            Op::Read { buf, .. } | Op::Write { buf, .. } if buf.is_empty() => {
                st.complete_now(tag, Some(buf), Ok(0))
            }
            Op::Read { offset, buf } => self.start_read(st, tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(st, tag, offset, buf),
            Op::Flush => self.start_flush(st, tag),
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                st.complete_now(tag, None, Ok(0))
            }
            Op::Discard { offset, len } => self.start_zero(st, tag, offset, len, ZeroMode::Discard),
            Op::WriteZeroes { offset, len, unmap } => {
                let mode = if unmap {
                    ZeroMode::Unmap
                } else {
                    ZeroMode::Keep
                };
                self.start_zero(st, tag, offset, len, mode)
            }
        }
    }

    fn finished(&mut self, st: &mut St, sub: Sub, c: Completion) {
        match sub {
            Sub::Piece(r) => st.release(r, c.result.map(|_| ()), c.buf),
            Sub::Whole(tag) => st.complete_whole_read(tag, c),
            Sub::CowRead(j) => {
                drop(c.buf);
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
                    self.job_reads_done(st, j);
                }
            }
            Sub::JobWrite(j) => {
                drop(c.buf);
                self.end_job(st, j, c.result.map(|_| ()));
            }
            Sub::Load(t) => self.load_done(st, t, c),
        }
    }

    fn advance(&mut self, st: &mut St) -> bool {
        if self.mailbox.pending() > 0 {
            for (tag, r) in self.mailbox.take() {
                st.complete_now(tag, None, r.map(|()| 0));
            }
        }
        for b in self.parked.due(&self.img.core.gen) {
            let r = match b {
                Blocked::Read { req, base, g, len } => {
                    self.read_range(st, req, base, g, len);
                    req
                }
                Blocked::Write {
                    req,
                    g,
                    len,
                    src,
                    group,
                } => {
                    self.write_range(st, req, g, len, src, group);
                    req
                }
                Blocked::Zero { req, g, len, mode } => {
                    self.zero_piece(st, req, g, len, mode);
                    req
                }
            };
            st.release(r, Ok(()), None);
        }
        !self.parked.is_empty() || self.mailbox.pending() > 0
    }

    fn reaped(&mut self, n: usize) {
        self.accepted -= n.min(self.accepted);
        self.img.active.fetch_sub(n, Ordering::AcqRel);
    }

    fn close(&mut self, st: &mut St) {
        // Allocations in flight must be committed or rolled back, or other queues would wait on
        // their clusters forever (after the drain none should be left).
        for j in self.jobs.ids() {
            self.end_job(st, j, Err(StorageError::Unavailable("queue closed".into())));
        }
        // Allocations planned for a parked write: release them the same way.
        let mut waiters = Waiters::default();
        for b in self.parked.take_all() {
            if let Blocked::Write {
                group: Some(group), ..
            } = b
            {
                if let Ok(mut m) = self.img.core.meta() {
                    for p in &group.plans {
                        waiters.extend(m.abort_alloc(p));
                    }
                }
            }
        }
        self.announce(st, waiters);
        self.img.active.fetch_sub(self.accepted, Ordering::AcqRel);
        self.accepted = 0;
    }
}
