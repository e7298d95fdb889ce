//! The data path of a thin device.
//!
//! Each request is split at data block boundaries. Per block, under the pool's state lock for
//! a lookup only:
//! - a read of a mapped block goes to its PV; an unmapped block reads as zeros without I/O;
//! - a write to a block the device owns alone goes to it in place — no metadata change;
//! - a write to an unmapped or shared block takes a new block and writes it whole (zeros
//!   around a partial write, or the old block's data, read first, for a shared one); when that
//!   write completes the mapping is inserted and the request completes;
//! - discard and write-zeroes unmap whole blocks and zero partial ones in place (or copy a
//!   shared partial block like a write of zeros);
//! - flush commits the pool (`pool.rs`).
//!
//! A piece that meets a block being provisioned by another request, or a device frozen for a
//! snapshot, is parked; the pool's events (a provisioning or in-place write ending, a device
//! thawing) wake the queue through its eventfd and the piece is retried.
//!
//! The queue is a layer of the stacked-queue mechanism (`crate::io::stack`), which owns the PV
//! queues, the fan-in of pieces and the waiting.

use std::fmt;
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::io::stack::wake::{Generation, Parked};
use crate::io::stack::{Layer, Lower, ReqId, Stack, StackedQueue};
use crate::io::{check_range, notify, Completion, IoBuf, IoQueue, Op, QueueOptions, Request};
use crate::volume::pvs::pv_opener;
use crate::volume::thin::datapath::WritePlan;
use crate::volume::thin::device::OpenThin;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// Zero part of one block.
    ZeroPartial,
    /// Unmap whole blocks `vblock..hi`.
    Unmap {
        hi: u64,
    },
}

#[derive(Debug)]
struct Piece {
    parent: usize,
    kind: Kind,
    vblock: u64,
    within: u64,
    len: u64,
    buf: Option<IoBuf>,
    /// The buffer is ours (zeros for a copied partial discard), not the request's.
    synthetic: bool,
}

#[derive(Debug)]
enum Sub {
    Read {
        parent: usize,
        epoch: u64,
    },
    InPlace {
        parent: usize,
        epoch: u64,
        synthetic: bool,
    },
    CowRead {
        parent: usize,
        vblock: u64,
        new: u64,
        within: u64,
        data: IoBuf,
        synthetic: bool,
    },
    Provision {
        parent: usize,
        vblock: u64,
        new: u64,
        data: Option<IoBuf>,
        synthetic: bool,
    },
}

/// What a thin device's queue does with requests. See the module documentation.
struct ThinLayer {
    name: String,
    read_only: bool,
    open: Arc<OpenThin>,
    bs: u64,
    deferred: Parked<Piece>,
    gen: Arc<Generation>,
    ended: Vec<u64>,
    writes_ended: u64,
}

impl fmt::Debug for ThinLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThinLayer")
            .field("name", &self.name)
            .field("deferred", &self.deferred.len())
            .finish()
    }
}

/// Opens a queue on a thin device.
pub(crate) fn open_queue(
    name: String,
    read_only: bool,
    open: Arc<OpenThin>,
    opts: &QueueOptions,
) -> Result<Box<dyn IoQueue>> {
    let bs = open.pool.block_size();
    let gen = open.pool.lock_state().events.generation();
    let lower = Lower {
        opener: pv_opener(open.pool.pvs.clone()),
        depth: opts.depth.max(1),
        own_eventfd: true,
    };
    let layer = ThinLayer {
        name,
        read_only,
        open,
        bs,
        deferred: Parked::default(),
        gen,
        ended: Vec::new(),
        writes_ended: 0,
    };
    Ok(Box::new(StackedQueue::new(layer, opts, lower)?))
}

type St = Stack<Sub>;

impl ThinLayer {
    fn id(&self) -> u32 {
        self.open.id
    }

    fn piece_done(
        &mut self,
        st: &mut St,
        parent: ReqId,
        result: Result<()>,
        buf: Option<IoBuf>,
        synthetic: bool,
    ) {
        let buf = if synthetic { None } else { buf };
        st.release(parent, result, buf);
    }

    /// Parks piece `p`, which met a provisioning in flight or a frozen device when the pool's
    /// events were at generation `seen`.
    fn defer(&mut self, st: &mut St, p: Piece, seen: u64) {
        self.deferred.park(p);
        if let Some(efd) = st.waker() {
            self.open.pool.lock_state().events.wait(efd);
            if self.gen.get() != seen {
                // The event came before we registered: nobody will signal, so do it ourselves.
                notify(Some(efd));
            }
        }
    }

    // The error hands the bookkeeping back to the caller (rare: a corrupt data location).
    #[allow(clippy::result_large_err)]
    fn lower(
        &mut self,
        st: &mut St,
        block: u64,
        within: u64,
        sub: Sub,
        make: impl FnOnce(u64) -> Op,
    ) -> std::result::Result<(), (Sub, StorageError)> {
        let loc = match self.open.pool.data_location(block) {
            Ok(l) => l,
            Err(e) => return Err((sub, e)),
        };
        st.send(loc.pv, sub, make(loc.pv_offset + within));
        Ok(())
    }

    /// Splits a request into pieces and starts them.
    fn dispatch(&mut self, st: &mut St, mut req: Request) {
        let size = self.open.pool.device_size(self.id());
        if let Err(e) = check_range(&req.op, size) {
            return st.complete(Completion::of(req, Err(e)));
        }
        let writes = !matches!(req.op, Op::Read { .. } | Op::Flush);
        if writes && self.read_only {
            let e = StorageError::ReadOnly(self.name.clone());
            return st.complete(Completion::of(req, Err(e)));
        }
        let Some((offset, len)) = req.op.range() else {
            let r = self.open.pool.commit().map(|()| 0);
            return st.complete(Completion::of(req, r));
        };
        if len == 0 {
            return st.complete(Completion::of(req, Ok(0)));
        }
        let bs = self.bs;
        let mut plan: Vec<(Kind, u64, u64, u64, u64)> = Vec::new(); // kind, vblock, within, len, offset in request
        match req.op {
            Op::Read { .. } | Op::Write { .. } => {
                let kind = if matches!(req.op, Op::Read { .. }) {
                    Kind::Read
                } else {
                    Kind::Write
                };
                let mut at = 0;
                while at < len {
                    let pos = offset + at;
                    let within = pos % bs;
                    let n = (bs - within).min(len - at);
                    plan.push((kind, pos / bs, within, n, at));
                    at += n;
                }
            }
            _ => {
                let end = offset + len;
                let first_full = offset.div_ceil(bs);
                let last_full = end / bs;
                if first_full >= last_full {
                    // Within one block, or across one boundary without a whole block.
                    let mut at = offset;
                    while at < end {
                        let within = at % bs;
                        let n = (bs - within).min(end - at);
                        let kind = if n == bs {
                            Kind::Unmap { hi: at / bs + 1 }
                        } else {
                            Kind::ZeroPartial
                        };
                        plan.push((kind, at / bs, within, n, 0));
                        at += n;
                    }
                } else {
                    if offset % bs != 0 {
                        plan.push((
                            Kind::ZeroPartial,
                            offset / bs,
                            offset % bs,
                            first_full * bs - offset,
                            0,
                        ));
                    }
                    plan.push((Kind::Unmap { hi: last_full }, first_full, 0, 0, 0));
                    if end % bs != 0 {
                        plan.push((Kind::ZeroPartial, last_full, 0, end % bs, 0));
                    }
                }
            }
        }
        let buf = req.op.take_buf();
        let result_len = if buf.is_some() { len } else { 0 };
        let id = st.open(req.tag, buf, result_len);
        let whole = plan.len() == 1;
        let seen = self.gen.get();
        for (kind, vblock, within, n, at) in plan {
            st.hold(id);
            let buf = match kind {
                // SAFETY: reads and writes are planned by one walk over the request in order
                // (`at += n`), so the pieces' views are disjoint. Without a buffer the request
                // has failed (`Stack::piece`), whatever its piece does.
                Kind::Read | Kind::Write => unsafe { st.piece(id, whole, at, n) },
                _ => None,
            };
            let piece = Piece {
                parent: id,
                kind,
                vblock,
                within,
                len: n,
                buf,
                synthetic: false,
            };
            if let Err(p) = self.start_piece(st, piece) {
                self.defer(st, p, seen);
            }
        }
        st.close(id);
    }

    /// Starts one piece; gives it back if it must wait.
    fn start_piece(&mut self, st: &mut St, mut p: Piece) -> std::result::Result<(), Piece> {
        let id = self.id();
        match p.kind {
            Kind::Read => {
                let found = self.open.pool.lock_state().lookup_read(id, p.vblock);
                match found {
                    Err(e) => self.piece_done(st, p.parent, Err(e), p.buf, false),
                    Ok(None) => {
                        let mut buf = p.buf.unwrap_or_else(IoBuf::empty);
                        let n = buf.len();
                        buf.fill_zero(0, n);
                        self.piece_done(st, p.parent, Ok(()), Some(buf), false);
                    }
                    Ok(Some((block, epoch))) => {
                        let buf = p.buf.unwrap_or_else(IoBuf::empty);
                        let sub = Sub::Read {
                            parent: p.parent,
                            epoch,
                        };
                        let within = p.within;
                        let mut slot = Some(buf);
                        if let Err((_, e)) = self.lower(st, block, within, sub, |o| Op::Read {
                            offset: o,
                            buf: slot.take().unwrap_or_else(IoBuf::empty),
                        }) {
                            self.ended.push(epoch);
                            self.piece_done(st, p.parent, Err(e), slot, false);
                        }
                    }
                }
                Ok(())
            }
            Kind::Write => self.start_write(st, p, true),
            Kind::ZeroPartial => {
                let looked = {
                    let mut st = self.open.pool.lock_state();
                    if st.provisioning.contains_key(&(id, p.vblock)) {
                        return Err(p);
                    }
                    match st.lookup(id, p.vblock) {
                        Ok(Some((block, true))) => match st.dev(id) {
                            Ok(d) if d.frozen => return Err(p),
                            _ => {
                                if let Ok(d) = st.dev_mut(id) {
                                    d.writes_in_flight += 1;
                                }
                                Ok(Some((block, true, st.epochs.begin())))
                            }
                        },
                        Ok(Some((block, false))) => Ok(Some((block, false, 0))),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match looked {
                    Err(e) => self.piece_done(st, p.parent, Err(e), None, true),
                    Ok(None) => self.piece_done(st, p.parent, Ok(()), None, true),
                    Ok(Some((block, true, epoch))) => {
                        let (within, len) = (p.within, p.len);
                        let sub = Sub::InPlace {
                            parent: p.parent,
                            epoch,
                            synthetic: true,
                        };
                        if let Err((_, e)) =
                            self.lower(st, block, within, sub, |o| Op::WriteZeroes {
                                offset: o,
                                len,
                                unmap: false,
                            })
                        {
                            self.ended.push(epoch);
                            self.writes_ended += 1;
                            self.piece_done(st, p.parent, Err(e), None, true);
                        }
                    }
                    Ok(Some((_, false, _))) => {
                        // Shared: copy the block with this part zeroed, like a write of zeros.
                        p.kind = Kind::Write;
                        p.buf = Some(IoBuf::new(p.len as usize));
                        p.synthetic = true;
                        return self.start_write(st, p, true);
                    }
                }
                Ok(())
            }
            Kind::Unmap { hi } => {
                let r = self.open.pool.lock_state().unmap(id, p.vblock, hi);
                match r {
                    Ok(None) => return Err(p),
                    Ok(Some(_)) => self.piece_done(st, p.parent, Ok(()), None, true),
                    Err(e) => self.piece_done(st, p.parent, Err(e), None, true),
                }
                Ok(())
            }
        }
    }

    fn start_write(
        &mut self,
        st: &mut St,
        p: Piece,
        may_commit: bool,
    ) -> std::result::Result<(), Piece> {
        let id = self.id();
        let plan = self.open.pool.lock_state().prepare_write(id, p.vblock);
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                self.piece_done(st, p.parent, Err(e), p.buf, p.synthetic);
                return Ok(());
            }
        };
        let bs = self.bs;
        let Piece {
            parent,
            vblock,
            within,
            len,
            buf,
            synthetic,
            ..
        } = p;
        let data = buf.unwrap_or_else(IoBuf::empty);
        match plan {
            WritePlan::Defer => {
                return Err(Piece {
                    parent,
                    kind: Kind::Write,
                    vblock,
                    within,
                    len,
                    buf: Some(data),
                    synthetic,
                });
            }
            WritePlan::InPlace { block, epoch } => {
                let sub = Sub::InPlace {
                    parent,
                    epoch,
                    synthetic,
                };
                let mut slot = Some(data);
                if let Err((_, e)) = self.lower(st, block, within, sub, |o| Op::Write {
                    offset: o,
                    buf: slot.take().unwrap_or_else(IoBuf::empty),
                }) {
                    self.ended.push(epoch);
                    self.writes_ended += 1;
                    self.piece_done(st, parent, Err(e), slot, synthetic);
                }
            }
            WritePlan::Provision {
                new,
                old,
                zeroed,
                commit_first,
            } => {
                if commit_first {
                    // The block is past the committed never-written frontier: move the
                    // frontier on disk first, so that a crash never takes it for zeros.
                    if let Err(e) = self.open.pool.commit() {
                        self.open.pool.lock_state().abort_provision(id, vblock, new);
                        self.piece_done(st, parent, Err(e), Some(data), synthetic);
                        return Ok(());
                    }
                }
                let outcome = if len == bs || (zeroed && old.is_none()) {
                    // A whole block, or part of one that holds zeros: write the request's data
                    // straight to the new block.
                    let sub = Sub::Provision {
                        parent,
                        vblock,
                        new,
                        data: None,
                        synthetic,
                    };
                    let mut slot = Some(data);
                    self.lower(st, new, within, sub, |o| Op::Write {
                        offset: o,
                        buf: slot.take().unwrap_or_else(IoBuf::empty),
                    })
                    .map_err(|(_, e)| (e, slot))
                } else if let Some(old) = old {
                    let sub = Sub::CowRead {
                        parent,
                        vblock,
                        new,
                        within,
                        data,
                        synthetic,
                    };
                    self.lower(st, old, 0, sub, |o| Op::Read {
                        offset: o,
                        buf: IoBuf::new(bs as usize),
                    })
                    .map_err(|(sub, e)| match sub {
                        Sub::CowRead { data, .. } => (e, Some(data)),
                        _ => (e, None),
                    })
                } else {
                    let mut block = IoBuf::new(bs as usize);
                    copy_into(&data, &mut block, within);
                    let sub = Sub::Provision {
                        parent,
                        vblock,
                        new,
                        data: Some(data),
                        synthetic,
                    };
                    self.lower(st, new, 0, sub, |o| Op::Write {
                        offset: o,
                        buf: block,
                    })
                    .map_err(|(sub, e)| match sub {
                        Sub::Provision { data, .. } => (e, data),
                        _ => (e, None),
                    })
                };
                if let Err((e, data)) = outcome {
                    self.open.pool.lock_state().abort_provision(id, vblock, new);
                    self.piece_done(st, parent, Err(e), data, synthetic);
                }
            }
            WritePlan::NoSpace { commit_may_help } => {
                if commit_may_help && may_commit {
                    // Blocks freed since the last commit become reusable once it is durable.
                    if let Err(e) = self.open.pool.commit() {
                        self.piece_done(st, parent, Err(e), Some(data), synthetic);
                        return Ok(());
                    }
                    let p = Piece {
                        parent,
                        kind: Kind::Write,
                        vblock,
                        within,
                        len,
                        buf: Some(data),
                        synthetic,
                    };
                    return self.start_write(st, p, false);
                }
                let e = StorageError::OutOfSpace(format!(
                    "thin pool {} is full",
                    self.open.pool.name()
                ));
                self.piece_done(st, parent, Err(e), Some(data), synthetic);
            }
        }
        Ok(())
    }

    fn on_lower(&mut self, st: &mut St, sub: Sub, c: Completion) {
        let result = c.result.map(|_| ());
        match sub {
            Sub::Read { parent, epoch } => {
                self.ended.push(epoch);
                self.piece_done(st, parent, result, c.buf, false);
            }
            Sub::InPlace {
                parent,
                epoch,
                synthetic,
            } => {
                self.ended.push(epoch);
                self.writes_ended += 1;
                self.piece_done(st, parent, result, c.buf, synthetic);
            }
            Sub::CowRead {
                parent,
                vblock,
                new,
                within,
                data,
                synthetic,
            } => {
                let block = c.buf.filter(|_| result.is_ok());
                let Some(mut block) = block else {
                    self.open
                        .pool
                        .lock_state()
                        .abort_provision(self.id(), vblock, new);
                    let e = result.err().unwrap_or_else(|| {
                        StorageError::Unavailable("a copy lost its buffer".into())
                    });
                    return self.piece_done(st, parent, Err(e), Some(data), synthetic);
                };
                copy_into(&data, &mut block, within);
                let sub = Sub::Provision {
                    parent,
                    vblock,
                    new,
                    data: Some(data),
                    synthetic,
                };
                if let Err((sub, e)) = self.lower(st, new, 0, sub, |o| Op::Write {
                    offset: o,
                    buf: block,
                }) {
                    self.open
                        .pool
                        .lock_state()
                        .abort_provision(self.id(), vblock, new);
                    let data = match sub {
                        Sub::Provision { data, .. } => data,
                        _ => None,
                    };
                    self.piece_done(st, parent, Err(e), data, synthetic);
                }
            }
            Sub::Provision {
                parent,
                vblock,
                new,
                data,
                synthetic,
            } => {
                let id = self.id();
                let r = match result {
                    Ok(()) => self
                        .open
                        .pool
                        .lock_state()
                        .finish_provision(id, vblock, new),
                    Err(e) => {
                        self.open.pool.lock_state().abort_provision(id, vblock, new);
                        Err(e)
                    }
                };
                // A whole-block write carried the request's own buffer.
                let buf = data.or(c.buf);
                self.piece_done(st, parent, r, buf, synthetic);
            }
        }
    }

    /// Ends the I/O epochs and in-place writes that completed.
    fn end_io(&mut self) {
        if !self.ended.is_empty() || self.writes_ended > 0 {
            self.open
                .pool
                .lock_state()
                .end_io(self.open.id, &self.ended, self.writes_ended);
            self.ended.clear();
            self.writes_ended = 0;
        }
    }
}

impl Layer for ThinLayer {
    type Sub = Sub;

    fn start(&mut self, st: &mut St, req: Request) {
        self.dispatch(st, req);
    }

    fn finished(&mut self, st: &mut St, sub: Sub, c: Completion) {
        self.on_lower(st, sub, c);
    }

    fn advance(&mut self, st: &mut St) -> bool {
        self.end_io();
        let seen = self.gen.get();
        for p in self.deferred.due(&self.gen) {
            if let Err(p) = self.start_piece(st, p) {
                self.defer(st, p, seen);
            }
        }
        !self.deferred.is_empty()
    }

    fn close(&mut self, _st: &mut St) {
        // Pieces still deferred never started: their blocks hold nothing of ours. Give back
        // the epochs and in-place writes that ended so the pool stays usable.
        self.end_io();
    }
}

/// Copies all of `data` into `block` at `within`.
fn copy_into(data: &IoBuf, block: &mut IoBuf, within: u64) {
    if let Some(dst) = block.as_mut_slice() {
        let w = within as usize;
        data.copy_to_slice(0, &mut dst[w..w + data.len()]);
    }
}
