//! The write path of a [`Qcow2Queue`]: splits writes, write-zeroes and discards at cluster
//! boundaries, merges direct writes that are contiguous on the host, parks pieces that hit an
//! allocation in flight, and runs allocating writes as jobs: read what is copied in, write copy
//! and data in one request, then commit (or roll back) the L2 update and wake the waiters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::Result;
use crate::format::qcow2::entry::Mapping;
use crate::format::qcow2::plan::{AllocPlan, WritePlan, ZeroMode, ZeroPlan};
use crate::io::{IoBuf, Op};

use super::{Blocked, Job, Kind, Lower, Qcow2Queue, Src, SubWhat};

/// The most clusters one allocating host write covers.
const MAX_GROUP_CLUSTERS: usize = 512;

impl Qcow2Queue {
    pub(super) fn start_write(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let r = self.new_req(tag, Kind::Write, Some(Arc::new(buf)), len);
        self.write_range(r, offset, len, Src::Guest(0));
        self.end_planning(r);
    }

    /// Splits `[g, g+len)` at cluster boundaries and writes each piece, merging direct writes
    /// that are contiguous on the host, and allocating writes of whole clusters that are
    /// contiguous on the host and copy nothing in (one host write for the group; each L2 entry
    /// still changes only after that write completed).
    pub(super) fn write_range(&mut self, r: usize, g: u64, len: u64, src: Src) {
        let cs = self.img.geo.cluster_size;
        let mut at = g;
        let end = g + len;
        // A run of direct writes: host offset, guest offset, length.
        let mut run: Option<(u64, u64, u64)> = None;
        // A group of whole-cluster allocations and the guest offset of its first cluster.
        let mut group: Vec<AllocPlan> = Vec::new();
        let mut group_at = 0;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let plan = self.lock().plan_write(at, n, self.notifier.clone());
            let continues = match &plan {
                Ok(WritePlan::Alloc(p)) => {
                    self.groupable(n, p)
                        && group.len() < MAX_GROUP_CLUSTERS
                        && group.last().is_none_or(|last| {
                            last.host + cs == p.host && last.guest_cluster + 1 == p.guest_cluster
                        })
                }
                _ => false,
            };
            if !continues && !group.is_empty() {
                let plans = std::mem::take(&mut group);
                let glen = plans.len() as u64 * cs;
                self.start_job(r, plans, group_at, glen, src_at(src, group_at - g));
            }
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
                        Ok(WritePlan::Alloc(plan)) if self.groupable(n, &plan) => {
                            if group.is_empty() {
                                group_at = at;
                            }
                            group.push(plan);
                        }
                        Ok(WritePlan::Alloc(plan)) => {
                            self.start_job(r, vec![plan], at, n, src_at(src, at - g))
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
        if !group.is_empty() {
            let glen = group.len() as u64 * cs;
            self.start_job(r, group, group_at, glen, src_at(src, group_at - g));
        }
    }

    /// Whether an allocating write of `n` bytes may join a group (see [`Self::write_range`]).
    fn groupable(&self, n: u64, plan: &AllocPlan) -> bool {
        n == self.img.geo.cluster_size && plan.cow.is_empty() && self.img.merge
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

    /// Starts an allocating write of `plans` (one, or a group without copied-in parts) with the
    /// `n` bytes of data at guest offset `g`.
    fn start_job(&mut self, r: usize, plans: Vec<AllocPlan>, g: u64, n: u64, src: Src) {
        let data = match src {
            Src::Guest(off) => match self.view(r, off, n as usize) {
                Some(v) => v,
                None => return,
            },
            Src::Zeros => IoBuf::new(n as usize),
        };
        let cow = plans.first().map(|p| p.cow.clone()).unwrap_or_default();
        let parts: Vec<Arc<IoBuf>> = cow
            .iter()
            .map(|p| Arc::new(IoBuf::new(p.len as usize)))
            .collect();
        if let Some(q) = self.reqs.get_mut(r) {
            q.pending += 1;
        }
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
                    if self.backing.is_some() && p.guest < bsize {
                        let inside = p.len.min(bsize - p.guest) as usize;
                        // SAFETY: a copied-in part has one view at a time: this read's, until
                        // `job_reads_done` (after every read of the job completed) cuts the
                        // write's.
                        let view = unsafe { IoBuf::view(&part, 0, inside) };
                        self.job_read(j, Lower::Backing, p.guest, view);
                    }
                }
                Mapping::Allocated(h) => {
                    // SAFETY: as for the backing read above.
                    let view = unsafe { IoBuf::view(&part, 0, p.len as usize) };
                    self.job_read(j, Lower::Host, h, view);
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

    pub(super) fn job_reads_done(&mut self, j: usize) {
        let failed = self.jobs.get_mut(j).and_then(|job| job.error.take());
        if let Some(e) = failed {
            self.end_job(j, Err(e));
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
    pub(super) fn end_job(&mut self, j: usize, result: Result<()>) {
        let Some(job) = self.jobs.remove(j) else {
            return;
        };
        let mut err = result.err();
        let mut waiters = Vec::new();
        {
            let mut m = self.lock();
            for plan in &job.plans {
                if err.is_some() {
                    waiters.extend(m.abort_alloc(plan));
                    continue;
                }
                match m.commit_alloc(plan) {
                    Ok(ws) => waiters.extend(ws),
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
            }
        }
        self.img.alloc_gen.fetch_add(1, Ordering::AcqRel);
        for w in waiters.into_iter().flatten() {
            if !self.notifier.as_ref().is_some_and(|n| Arc::ptr_eq(&w, n)) {
                let _ = w.write(1);
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

    pub(super) fn start_zero(&mut self, tag: u64, offset: u64, len: u64, mode: ZeroMode) {
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

    pub(super) fn zero_piece(&mut self, r: usize, g: u64, n: u64, mode: ZeroMode) {
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
}

fn src_at(src: Src, delta: u64) -> Src {
    match src {
        Src::Guest(off) => Src::Guest(off + delta as usize),
        Src::Zeros => Src::Zeros,
    }
}
