//! Planning writes, discards and write-zeroes against the metadata, under the metadata lock.
//!
//! A write to one guest cluster is either [`WritePlan::Direct`] (the cluster, or every touched
//! subcluster, is allocated with refcount one) or [`WritePlan::Alloc`]: the target host cluster
//! is chosen (and its refcount taken) now, the caller copies the untouched parts of the cluster
//! (or subclusters) from the old contents — backing file, old cluster, compressed data or zeros —
//! together with the guest data, and only after that write completes does
//! [`Meta::commit_alloc`] point the L2 entry at it. Clusters the old entry held are released once
//! that L2 entry is durable. A write to a cluster whose allocation is in flight stalls
//! ([`Stall::Busy`]) until it ends; so does one that needs a table read or the worker first.
//!
//! Every plan either stalls before it changes anything, or completes steps that each leave the
//! metadata whole (a new L2 table, an allocation), so a stalled plan is simply run again.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};
use crate::io::stack::wake::Waiters;
use crate::io::IoBuf;

use super::entry::{L2Entry, Mapping, COPIED, OFFSET_MASK, ZERO};
use super::meta::{l1_entry_offset, Meta, Stall, Step};

/// A reference an L2 entry held before it was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldRef {
    /// Nothing to release.
    None,
    /// A host cluster.
    Cluster(u64),
    /// The clusters a compressed cluster spans.
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// A part of the target cluster filled from the old contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CowPart {
    /// Guest offset.
    pub guest: u64,
    /// Length.
    pub len: u64,
    /// Where the old contents are.
    pub source: Mapping,
}

/// An allocating write. See the module documentation.
#[derive(Clone, Debug)]
pub struct AllocPlan {
    /// Guest cluster index.
    pub guest_cluster: u64,
    /// Target host cluster.
    pub host: u64,
    /// The target was allocated by this plan (a failed write releases it).
    pub new_cluster: bool,
    /// Guest offset at which the host write starts (the first copied-in part or the data).
    pub write_start: u64,
    /// Copied-in parts before and after the data, in guest order.
    pub cow: Vec<CowPart>,
    /// Subclusters to mark allocated (extended L2 entries).
    pub set_bits: u32,
    /// What the old entry referenced.
    pub old: OldRef,
}

/// What a write to one cluster needs.
#[derive(Debug)]
pub enum WritePlan {
    /// Write at this host offset.
    Direct(u64),
    /// Allocate. See [`AllocPlan`].
    Alloc(AllocPlan),
}

/// How a range is made to read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// A discard: free what can be freed.
    Discard,
    /// Write-zeroes that may free space.
    Unmap,
    /// Write-zeroes that keeps allocated clusters allocated.
    Keep,
}

/// What a discard or write-zeroes of one cluster needs once its metadata is updated: guest
/// ranges that still need zeros written as data.
pub type ZeroPlan = Vec<(u64, u64)>;

fn bits(first: u32, last: u32) -> u32 {
    let n = last - first + 1;
    (if n == 32 { u32::MAX } else { (1u32 << n) - 1 }) << first
}

impl Meta {
    /// Makes sure the L2 table for L1 index `i` exists and is not shared (refcount one).
    pub(super) fn writable_l2(&mut self, i: usize) -> Step<usize> {
        self.check_fresh()?;
        let e = self.l1.get(i);
        let off = l1_entry_offset(e, &self.geo, self.refs.file_len())?;
        if off != 0 && e & COPIED != 0 {
            return self.l2_lookup(off);
        }
        let copy = if off != 0 {
            let slot = self.l2_lookup(off)?;
            Some(IoBuf::from_slice(self.l2.bytes(slot)))
        } else {
            None
        };
        let (host, _) = self.refs.alloc(1)?;
        let data = copy.unwrap_or_else(|| IoBuf::new(self.geo.cluster_size as usize));
        let slot = self.l2.insert_new(host, data);
        self.refs.mark_metadata(host);
        self.set_l1(i, host | COPIED);
        if off != 0 {
            self.refs.free_later(off, 1);
        }
        Ok(slot)
    }

    /// The parts of `[from, to)` (guest offsets inside one cluster) as the old mapping has them.
    fn cow_parts(&mut self, from: u64, to: u64, out: &mut Vec<CowPart>) -> Step<()> {
        let mut at = from;
        while at < to {
            let (m, run) = self.map(at, to - at)?;
            out.push(CowPart {
                guest: at,
                len: run,
                source: m,
            });
            at += run;
        }
        Ok(())
    }

    /// Plans a write of `len` bytes at guest offset `g`, all inside one cluster. A
    /// [`Stall::Busy`] registers `waker` to be woken when the cluster's allocation ends.
    pub fn plan_write(
        &mut self,
        g: u64,
        len: u64,
        waker: Option<&Arc<EventFd>>,
    ) -> Step<WritePlan> {
        let cs = self.geo.cluster_size;
        let gc = g / cs;
        if self.allocs.wait_for(gc, waker) {
            return Err(Stall::Busy);
        }
        self.check_room()?;
        let within = g % cs;
        let end = within + len;
        let base = gc * cs;
        let (entry, _) = self.entry_at(g)?;
        let scs = self.geo.subcluster_size();
        let (first_sc, last_sc) = ((within / scs) as u32, ((end - 1) / scs) as u32);
        match entry {
            L2Entry::Normal { host, copied: true } => {
                self.refuse_metadata(host, "a guest write")?;
                return Ok(WritePlan::Direct(host + within));
            }
            L2Entry::Extended {
                host: Some(h),
                copied: true,
                alloc,
                ..
            } if alloc & bits(first_sc, last_sc) == bits(first_sc, last_sc) => {
                self.refuse_metadata(h, "a guest write")?;
                return Ok(WritePlan::Direct(h + within));
            }
            _ => {}
        }
        // The cluster the entry names is written or freed below: never one holding metadata.
        match entry {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            }
            | L2Entry::Extended {
                host: Some(host), ..
            } => self.refuse_metadata(host, "a guest write")?,
            _ => {}
        }
        // Everything below allocates or changes the entry.
        let (l1i, _) = self.geo.indices(g);
        let l2_slot = self.writable_l2(l1i)?;
        let l2_off = self.l2.offset(l2_slot);
        let mut reuse = None;
        let mut old = OldRef::None;
        let mut whole = true; // copy the whole cluster around the data
        let mut set_bits = 0;
        match entry {
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } => reuse = Some(h),
            L2Entry::Zero { host: Some(h), .. } => old = OldRef::Cluster(h),
            L2Entry::Normal { host, .. } => old = OldRef::Cluster(host),
            L2Entry::Compressed { offset, len } => {
                old = OldRef::Compressed { offset, len };
                set_bits = u32::MAX;
            }
            L2Entry::Extended {
                host: Some(h),
                copied: true,
                ..
            } => {
                reuse = Some(h);
                whole = false;
                set_bits = bits(first_sc, last_sc);
            }
            L2Entry::Extended {
                host: Some(h),
                copied: false,
                ..
            } => {
                old = OldRef::Cluster(h);
                set_bits = u32::MAX;
            }
            L2Entry::Extended { host: None, .. } | L2Entry::Unallocated | L2Entry::Zero { .. } => {
                if self.geo.extended {
                    whole = false;
                    set_bits = bits(first_sc, last_sc);
                }
            }
        }
        let mut cow = Vec::new();
        let (head_from, tail_to) = if whole {
            (base, base + cs)
        } else {
            let alloc = match entry {
                L2Entry::Extended { alloc, .. } if reuse.is_some() => alloc,
                _ => 0,
            };
            let head = if alloc & (1 << first_sc) != 0 {
                g
            } else {
                base + u64::from(first_sc) * scs
            };
            let tail = if alloc & (1 << last_sc) != 0 {
                g + len
            } else {
                base + (u64::from(last_sc) + 1) * scs
            };
            (head, tail)
        };
        self.cow_parts(head_from, g, &mut cow)?;
        self.cow_parts(g + len, tail_to, &mut cow)?;
        let (host, new_cluster, fresh) = match reuse {
            Some(h) => (h, false, false),
            // The data file holds guest cluster n at offset n, with whatever it held before.
            None if self.geo.external => (base, false, false),
            None => {
                let (h, fresh) = self.refs.alloc(1)?;
                (h, true, fresh)
            }
        };
        let reads_zero = |p: &CowPart, has_backing: bool| {
            p.source == Mapping::Zero || (p.source == Mapping::Unallocated && !has_backing)
        };
        if fresh {
            // The new cluster reads as zeros already: parts that would copy zeros can go, as long
            // as what remains is contiguous with the data.
            let hb = self.has_backing;
            while cow
                .first()
                .is_some_and(|p| p.guest < g && reads_zero(p, hb))
            {
                cow.remove(0);
            }
            while cow
                .last()
                .is_some_and(|p| p.guest >= g + len && reads_zero(p, hb))
            {
                cow.pop();
            }
        }
        let write_start = cow.first().filter(|p| p.guest < g).map_or(g, |p| p.guest);
        self.allocs.begin(gc, l2_off);
        self.l2.pin(l2_off);
        Ok(WritePlan::Alloc(AllocPlan {
            guest_cluster: gc,
            host,
            new_cluster,
            write_start,
            cow,
            set_bits,
            old,
        }))
    }

    /// Points the L2 entry at the plan's cluster after its data is written; returns the queues to
    /// wake.
    pub(crate) fn commit_alloc(&mut self, plan: &AllocPlan) -> (Result<()>, Waiters) {
        let cs = self.geo.cluster_size;
        let g = plan.guest_cluster * cs;
        let (l1i, l2i) = self.geo.indices(g);
        // The table is pinned since the plan made it writable: no stall can happen here.
        let r = match self.writable_l2(l1i) {
            Ok(slot) => {
                let (_, bitmap) = self.l2_raw(slot, l2i);
                let new_bitmap = if self.geo.extended {
                    let alloc = (bitmap as u32) | plan.set_bits;
                    let zero = ((bitmap >> 32) as u32) & !plan.set_bits;
                    u64::from(alloc) | (u64::from(zero) << 32)
                } else {
                    0
                };
                self.set_l2_raw(slot, l2i, plan.host | COPIED, new_bitmap);
                match plan.old {
                    OldRef::None => {}
                    // Skips clusters of an external data file (not refcounted).
                    OldRef::Cluster(h) => self.free_data_later(h),
                    OldRef::Compressed { offset, len } => {
                        let range = self.compressed_clusters(offset, len);
                        self.refs.free_clusters_later(range);
                    }
                }
                Ok(())
            }
            Err(Stall::Failed(e)) => Err(e),
            Err(other) => Err(StorageError::Unavailable(format!(
                "{}: the L2 table of an allocation in flight left memory ({other:?})",
                self.file.name()
            ))),
        };
        (r, self.end_alloc(plan.guest_cluster))
    }

    /// Gives up an allocation whose write failed; returns the queues to wake. The cluster it
    /// took is released at the next write-back (nothing points at it).
    pub(crate) fn abort_alloc(&mut self, plan: &AllocPlan) -> Waiters {
        if plan.new_cluster {
            self.refs.free_later(plan.host, 1);
        }
        self.end_alloc(plan.guest_cluster)
    }

    fn end_alloc(&mut self, gc: u64) -> Waiters {
        let waiters = match self.allocs.end(gc) {
            Some((l2, w)) => {
                self.l2.unpin(l2);
                w
            }
            None => Waiters::default(),
        };
        self.end_op();
        waiters
    }

    /// Plans making `len` bytes at guest offset `g` (inside one cluster) read as zeros.
    pub fn plan_zero(
        &mut self,
        g: u64,
        len: u64,
        mode: ZeroMode,
        waker: Option<&Arc<EventFd>>,
    ) -> Step<ZeroPlan> {
        let cs = self.geo.cluster_size;
        let gc = g / cs;
        if self.allocs.wait_for(gc, waker) {
            return Err(Stall::Busy);
        }
        self.check_room()?;
        let within = g % cs;
        let (entry, _) = self.entry_at(g)?;
        let hb = self.has_backing;
        let reads_zero = match entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => !hb,
            L2Entry::Extended { alloc, zero, .. } if self.geo.extended => {
                let scs = self.geo.subcluster_size();
                let b = bits((within / scs) as u32, ((within + len - 1) / scs) as u32);
                alloc & b == 0 && (zero & b == b || !hb)
            }
            _ => false,
        };
        if self.header.data_file_raw() {
            // A raw data file must read as the guest does: the zeros are written there.
            return Ok(vec![(g, len)]);
        }
        if reads_zero {
            return Ok(Vec::new());
        }
        let (l1i, l2i) = self.geo.indices(g);
        if !self.geo.extended {
            if len < cs {
                return Ok(vec![(g, len)]);
            }
            let keep = match entry {
                _ if mode != ZeroMode::Keep || !self.geo.v3 => None,
                L2Entry::Normal { host, copied: true } => Some(host),
                L2Entry::Zero {
                    host: Some(h),
                    copied: true,
                } => Some(h),
                _ => None,
            };
            let new_raw = match keep {
                Some(h) => h | COPIED | ZERO,
                _ if !hb => 0,
                _ if self.geo.v3 => ZERO,
                // Version 2 with a backing file cannot say "zeros" without data.
                _ => return Ok(vec![(g, len)]),
            };
            let slot = self.writable_l2(l1i)?;
            self.set_l2_raw(slot, l2i, new_raw, 0);
            self.release(entry, keep);
            return Ok(Vec::new());
        }
        // Extended L2: whole subclusters change state; partial ones get zeros written.
        let scs = self.geo.subcluster_size();
        let first_full = within.div_ceil(scs);
        let end_full = (within + len) / scs;
        let mut writes = Vec::new();
        if first_full >= end_full || matches!(entry, L2Entry::Compressed { .. }) && len < cs {
            return Ok(vec![(g, len)]);
        }
        let base = gc * cs;
        if within < first_full * scs {
            writes.push((g, first_full * scs - within));
        }
        if end_full * scs < within + len {
            writes.push((base + end_full * scs, within + len - end_full * scs));
        }
        let b = bits(first_full as u32, end_full as u32 - 1);
        let slot = self.writable_l2(l1i)?;
        let (raw, bitmap) = self.l2_raw(slot, l2i);
        let mut alloc = (bitmap as u32) & !b;
        let mut zero = (bitmap >> 32) as u32;
        if hb || mode == ZeroMode::Keep {
            zero |= b;
        } else {
            zero &= !b;
        }
        let mut new_raw = raw;
        if let L2Entry::Compressed { .. } = entry {
            // Whole cluster (checked above): the compressed data goes.
            alloc = 0;
            new_raw = 0;
            self.release(entry, None);
        } else if alloc == 0 && mode != ZeroMode::Keep && raw & OFFSET_MASK != 0 {
            new_raw = 0;
            self.release(entry, None);
        }
        self.set_l2_raw(
            slot,
            l2i,
            new_raw,
            u64::from(alloc) | (u64::from(zero) << 32),
        );
        Ok(writes)
    }

    /// Releases what `entry` referenced, except a cluster kept in place.
    fn release(&mut self, entry: L2Entry, keep: Option<u64>) {
        match entry {
            L2Entry::Compressed { offset, len } => {
                let range = self.compressed_clusters(offset, len);
                self.refs.free_clusters_later(range);
            }
            other => {
                if let Some(h) = other.host_cluster() {
                    if keep != Some(h) {
                        self.free_data_later(h);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bits;

    #[test]
    fn subcluster_bit_ranges() {
        assert_eq!(bits(0, 0), 1);
        assert_eq!(bits(1, 3), 0b1110);
        assert_eq!(bits(0, 31), u32::MAX);
    }
}
