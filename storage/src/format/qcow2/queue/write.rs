//! The write path of a qcow2 queue: splits writes, write-zeroes and discards at cluster
//! boundaries, merges direct writes that are contiguous on the host, parks pieces that hit an
//! allocation in flight or need a table read or the metadata worker first, and runs allocating
//! writes as jobs: read what is copied in, write copy and data in one request, then commit (or
//! roll back) the L2 update and wake the waiters.

use std::sync::Arc;

use crate::error::Result;
use crate::format::qcow2::entry::Mapping;
use crate::format::qcow2::meta::{Await, Stall};
use crate::format::qcow2::plan::{AllocPlan, WritePlan, ZeroMode};
use crate::io::stack::wake::Waiters;
use crate::io::stack::ReqId;
use crate::io::{IoBuf, Op};

use super::{Blocked, Group, Job, Qcow2Layer, Src, St, Sub, BACKING};

/// The most clusters one allocating host write covers.
const MAX_GROUP_CLUSTERS: usize = 512;

impl Qcow2Layer {
    pub(super) fn start_write(&mut self, st: &mut St, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let r = st.open(tag, Some(buf), len);
        self.write_range(st, r, offset, len, Src::Guest(0), None);
        st.close(r);
    }

    /// Plans a write of one cluster piece under the lock; a stall is decided there too.
    fn plan(&mut self, st: &St, at: u64, n: u64) -> std::result::Result<WritePlan, (bool, Await)> {
        let waker = st.waker();
        let (plan, hint) = match self.img.core.meta() {
            Err(e) => return Err((false, Await::Fail(e))),
            Ok(mut m) => {
                let p = match m.plan_write(at, n, waker) {
                    Ok(p) => Ok(p),
                    Err(stall) => {
                        let busy = matches!(stall, Stall::Busy);
                        Err((busy, m.wait_for(stall, waker)))
                    }
                };
                m.end_op();
                (p, m.take_hints())
            }
        };
        self.post_hints(hint);
        plan
    }

    /// Splits `[g, g+len)` at cluster boundaries and writes each piece, merging direct writes
    /// that are contiguous on the host, and allocating writes of whole clusters that are
    /// contiguous on the host and copy nothing in (one host write for the group; each L2 entry
    /// still changes only after that write completed).
    pub(super) fn write_range(
        &mut self,
        st: &mut St,
        r: ReqId,
        g: u64,
        len: u64,
        src: Src,
        carried: Option<Group>,
    ) {
        let cs = self.img.geo.cluster_size;
        let mut at = g;
        let end = g + len;
        // A run of direct writes: host offset, guest offset, length.
        let mut run: Option<(u64, u64, u64)> = None;
        // A group of whole-cluster allocations not yet written (see `Group`).
        let mut group = carried.unwrap_or(Group {
            plans: Vec::new(),
            at: 0,
            src,
        });
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let plan = self.plan(st, at, n);
            let continues = match &plan {
                Ok(WritePlan::Alloc(p)) => {
                    self.groupable(n, p)
                        && group.plans.len() < MAX_GROUP_CLUSTERS
                        && group.plans.last().is_none_or(|last| {
                            last.host + cs == p.host && last.guest_cluster + 1 == p.guest_cluster
                        })
                }
                _ => false,
            };
            // The rest of the range waits (for a table read or the worker): a group planned so
            // far waits with it, so that it still goes out as one host write.
            let carry = matches!(&plan, Err((false, aw)) if !matches!(aw, Await::Fail(_)));
            if !continues && !carry && !group.plans.is_empty() {
                self.start_group(st, r, &mut group);
            }
            match plan {
                Ok(WritePlan::Direct(h)) => match run {
                    Some((rh, rg, rn)) if rh + rn == h && self.img.merge => {
                        run = Some((rh, rg, rn + n))
                    }
                    _ => {
                        if let Some((rh, rg, rn)) = run.take() {
                            self.direct_write(st, r, rh, rg, rn, src, g);
                        }
                        run = Some((h, at, n));
                    }
                },
                other => {
                    if let Some((rh, rg, rn)) = run.take() {
                        self.direct_write(st, r, rh, rg, rn, src, g);
                    }
                    match other {
                        Ok(WritePlan::Alloc(plan)) if self.groupable(n, &plan) => {
                            if group.plans.is_empty() {
                                group.at = at;
                                group.src = src_at(src, at - g);
                            }
                            group.plans.push(plan);
                        }
                        Ok(WritePlan::Alloc(plan)) => {
                            self.start_job(st, r, vec![plan], at, n, src_at(src, at - g))
                        }
                        Ok(WritePlan::Direct(_)) => {}
                        // Another allocation of this cluster is in flight: park this cluster,
                        // go on with the next.
                        Err((true, _)) => {
                            let b = Blocked::Write {
                                req: r,
                                g: at,
                                len: n,
                                src: src_at(src, at - g),
                                group: None,
                            };
                            self.park(st, b);
                        }
                        // A table read, the worker, or a failure: the rest waits (or fails).
                        Err((false, aw)) => {
                            if self.after_stall(st, r, aw) {
                                let waiting = std::mem::replace(
                                    &mut group,
                                    Group {
                                        plans: Vec::new(),
                                        at: 0,
                                        src,
                                    },
                                );
                                let b = Blocked::Write {
                                    req: r,
                                    g: at,
                                    len: end - at,
                                    src: src_at(src, at - g),
                                    group: (!waiting.plans.is_empty()).then_some(waiting),
                                };
                                self.park(st, b);
                            }
                            break;
                        }
                    }
                }
            }
            at += n;
        }
        if let Some((rh, rg, rn)) = run {
            self.direct_write(st, r, rh, rg, rn, src, g);
        }
        if !group.plans.is_empty() {
            self.start_group(st, r, &mut group);
        }
    }

    /// Starts the allocating write of a group (emptying it).
    fn start_group(&mut self, st: &mut St, r: ReqId, group: &mut Group) {
        let plans = std::mem::take(&mut group.plans);
        let glen = plans.len() as u64 * self.img.geo.cluster_size;
        self.start_job(st, r, plans, group.at, glen, group.src);
    }

    /// Whether an allocating write of `n` bytes may join a group (see [`Self::write_range`]).
    fn groupable(&self, n: u64, plan: &AllocPlan) -> bool {
        n == self.img.geo.cluster_size && plan.cow.is_empty() && self.img.merge
    }

    #[allow(clippy::too_many_arguments)]
    fn direct_write(&mut self, st: &mut St, r: ReqId, h: u64, at: u64, n: u64, src: Src, g: u64) {
        let op = match src_at(src, at - g) {
            // SAFETY: a write's views are only read (by the host file's queue).
            Src::Guest(off) => match unsafe { st.piece(r, false, off as u64, n) } {
                Some(v) => Op::Write { offset: h, buf: v },
                None => return, // The request failed (`Stack::piece`).
            },
            Src::Zeros => Op::WriteZeroes {
                offset: h,
                len: n,
                unmap: false,
            },
        };
        st.hold(r);
        st.send(self.data_lower(), Sub::Piece(r), op);
    }

    /// Starts an allocating write of `plans` (one, or a group without copied-in parts) with the
    /// `n` bytes of data at guest offset `g`.
    fn start_job(
        &mut self,
        st: &mut St,
        r: ReqId,
        plans: Vec<AllocPlan>,
        g: u64,
        n: u64,
        src: Src,
    ) {
        let data = match src {
            // SAFETY: the write's data is only read (copied into the job's write).
            Src::Guest(off) => match unsafe { st.piece(r, false, off as u64, n) } {
                Some(v) => v,
                None => {
                    // Cannot happen (the range lies in the buffer), and the request failed
                    // (`Stack::piece`); release what was taken.
                    let mut waiters = Waiters::default();
                    if let Ok(mut m) = self.img.core.meta() {
                        for p in &plans {
                            waiters.extend(m.abort_alloc(p));
                        }
                    }
                    return self.announce(st, waiters);
                }
            },
            Src::Zeros => IoBuf::new(n as usize),
        };
        let cow = plans.first().map(|p| p.cow.clone()).unwrap_or_default();
        let parts: Vec<Arc<IoBuf>> = cow
            .iter()
            .map(|p| Arc::new(IoBuf::new(p.len as usize)))
            .collect();
        st.hold(r);
        let j = self.jobs.insert(Job {
            req: r,
            plans,
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
                    if self.img.backing.is_some() && p.guest < bsize {
                        let inside = p.len.min(bsize - p.guest) as usize;
                        // SAFETY: a copied-in part has one view at a time: this read's, until
                        // `job_reads_done` (after every read of the job completed) cuts the
                        // write's.
                        let view = unsafe { IoBuf::view(&part, 0, inside) };
                        self.job_read(st, j, BACKING, p.guest, view);
                    }
                }
                Mapping::Allocated(h) => {
                    // SAFETY: as for the backing read above.
                    let view = unsafe { IoBuf::view(&part, 0, p.len as usize) };
                    let lower = self.data_lower();
                    self.job_read(st, j, lower, h, view);
                }
                Mapping::Compressed {
                    offset,
                    len,
                    within,
                } => {
                    let copied = self.decompressed(offset, len).map(|d| {
                        let w = within as usize;
                        // SAFETY: the only view of this part, dropped at the end of the closure.
                        let mut v = unsafe { IoBuf::view(&part, 0, p.len as usize) };
                        v.copy_from_slice(0, &d[w..w + p.len as usize]);
                    });
                    if let (Err(e), Some(job)) = (copied, self.jobs.get_mut(j)) {
                        job.error.get_or_insert(e);
                    }
                }
            }
        }
        if self.jobs.get_mut(j).is_some_and(|job| job.reads == 0) {
            self.job_reads_done(st, j);
        }
    }

    fn job_read(&mut self, st: &mut St, j: usize, which: usize, offset: u64, view: IoBuf) {
        match self.jobs.get_mut(j) {
            Some(job) => job.reads += 1,
            None => return,
        }
        st.send(which, Sub::CowRead(j), Op::Read { offset, buf: view });
    }

    pub(super) fn job_reads_done(&mut self, st: &mut St, j: usize) {
        let failed = self.jobs.get_mut(j).and_then(|job| job.error.take());
        if let Some(e) = failed {
            self.end_job(st, j, Err(e));
            return;
        }
        let Some(job) = self.jobs.get_mut(j) else {
            return;
        };
        let Some(first) = job.plans.first() else {
            return;
        };
        let mut pieces = Vec::with_capacity(job.parts.len() + 1);
        let mut data = job.data.take();
        for (p, buf) in first.cow.iter().zip(&job.parts) {
            if p.guest > job.g {
                if let Some(d) = data.take() {
                    pieces.push(d);
                }
            }
            // SAFETY: every read into the part completed (this runs after the job's last one);
            // the write only reads this view.
            pieces.push(unsafe { IoBuf::view(buf, 0, p.len as usize) });
        }
        if let Some(d) = data.take() {
            pieces.push(d);
        }
        let cs = self.img.geo.cluster_size;
        let offset = first.host + (first.write_start - first.guest_cluster * cs);
        let buf = IoBuf::chain(pieces);
        st.send(
            self.data_lower(),
            Sub::JobWrite(j),
            Op::Write { offset, buf },
        );
    }

    /// Commits (or on failure rolls back) an allocating write and wakes the pieces waiting on it.
    pub(super) fn end_job(&mut self, st: &mut St, j: usize, result: Result<()>) {
        let Some(job) = self.jobs.remove(j) else {
            return;
        };
        let mut err = result.err();
        let mut waiters = Waiters::default();
        match self.img.core.meta() {
            Ok(mut m) => {
                for plan in &job.plans {
                    if err.is_some() {
                        waiters.extend(m.abort_alloc(plan));
                        continue;
                    }
                    let (r, w) = m.commit_alloc(plan);
                    waiters.extend(w);
                    if let Err(e) = r {
                        err.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                err.get_or_insert(e);
            }
        }
        self.announce(st, waiters);
        drop(job.parts);
        drop(job.data);
        st.release(job.req, err.map_or(Ok(()), Err), None);
    }

    pub(super) fn start_zero(
        &mut self,
        st: &mut St,
        tag: u64,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) {
        let r = st.open(tag, None, 0);
        let cs = self.img.geo.cluster_size;
        let mut at = offset;
        while at < offset + len {
            let n = (cs - at % cs).min(offset + len - at);
            self.zero_piece(st, r, at, n, mode);
            at += n;
        }
        st.close(r);
    }

    pub(super) fn zero_piece(&mut self, st: &mut St, r: ReqId, g: u64, n: u64, mode: ZeroMode) {
        let waker = st.waker();
        let (planned, hints) = match self.img.core.meta() {
            Err(e) => (Err(Await::Fail(e)), (None, false)),
            Ok(mut m) => {
                let p = m
                    .plan_zero(g, n, mode, waker)
                    .map_err(|s| m.wait_for(s, waker));
                m.end_op();
                (p, m.take_hints())
            }
        };
        self.post_hints(hints);
        match planned {
            Ok(writes) => {
                for (wg, wn) in writes {
                    self.write_range(st, r, wg, wn, Src::Zeros, None);
                }
            }
            Err(aw) => {
                if self.after_stall(st, r, aw) {
                    self.park(
                        st,
                        Blocked::Zero {
                            req: r,
                            g,
                            len: n,
                            mode,
                        },
                    );
                }
            }
        }
    }
}

fn src_at(src: Src, delta: u64) -> Src {
    match src {
        Src::Guest(off) => Src::Guest(off + delta as usize),
        Src::Zeros => Src::Zeros,
    }
}
