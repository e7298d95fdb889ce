//! Refcounts and cluster allocation (docs/interop/qcow2.rst, "Host cluster management").
//!
//! Refcount changes are made in the refcount block cache and written back before any table that
//! points at the clusters they count (`writeback.rs`). Increments happen at once; decrements of
//! clusters that metadata stopped using wait in [`Meta::free_later`] until that metadata is
//! durable, so a crash can leave leaked clusters but never a refcount below its references.
//! New refcount blocks cover themselves where they can; a full refcount table is replaced by a
//! larger copy elsewhere, switched to through the header.

use crate::error::{Result, StorageError};
use crate::io::IoBuf;

use super::header::MAX_REFTABLE_BYTES;
use super::meta::{corrupt, Meta};
use super::refcount;

/// Bits 9-63 of a refcount table entry.
const RT_OFFSET_MASK: u64 = !0x1ff;

impl Meta {
    fn rb_offset(&self, ti: usize) -> Result<u64> {
        let off = self.reftable.get(ti).copied().unwrap_or(0) & RT_OFFSET_MASK;
        if off != 0
            && (off % self.geo.cluster_size != 0
                || off
                    .checked_add(self.geo.cluster_size)
                    .is_none_or(|e| e > self.file_len))
        {
            return Err(corrupt(
                self.file.name(),
                format!(
                    "refcount block {ti} at {off:#x} is unaligned or beyond the end of the file"
                ),
            ));
        }
        Ok(off)
    }

    fn rb_load(&mut self, offset: u64) -> Result<usize> {
        if let Some(s) = self.rb.lookup(offset) {
            return Ok(s);
        }
        self.make_room_rb()?;
        let mut buf = IoBuf::new(self.geo.cluster_size as usize);
        self.file
            .read_exact_at(offset, buf.as_mut_slice().unwrap_or(&mut []))?;
        Ok(self.rb.insert(offset, buf, false))
    }

    /// Writes back (if dirty) and drops the least recently used refcount block when full.
    pub(super) fn make_room_rb(&mut self) -> Result<()> {
        if !self.rb.is_full() {
            return Ok(());
        }
        if let Some(v) = self.rb.victim() {
            if self.rb.is_dirty(v) {
                // Refcounts may always be written early: they only ever run ahead of pointers.
                let off = self.rb.offset(v);
                self.write_cluster(off, self.rb.bytes(v))?;
            }
            self.rb.remove(v);
        }
        Ok(())
    }

    /// The refcount of host cluster `cluster`.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let ti = (cluster / self.geo.rb_entries) as usize;
        let off = self.rb_offset(ti)?;
        if off == 0 {
            return Ok(0);
        }
        let slot = self.rb_load(off)?;
        let idx = (cluster % self.geo.rb_entries) as usize;
        Ok(refcount::get(
            self.rb.bytes(slot),
            self.geo.refcount_order,
            idx,
        ))
    }

    /// Adds `delta` to the refcount of `cluster`; returns the new value. Creates refcount blocks
    /// (and grows the refcount table) as needed for increments.
    pub fn update_refcount(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        let ti = (cluster / self.geo.rb_entries) as usize;
        let mut off = self.rb_offset(ti)?;
        if off == 0 {
            if delta < 0 {
                return Err(corrupt(
                    self.file.name(),
                    format!("refcount of cluster {cluster} would drop below zero"),
                ));
            }
            off = self.new_refcount_block(ti)?;
        }
        let slot = self.rb_load(off)?;
        let idx = (cluster % self.geo.rb_entries) as usize;
        let order = self.geo.refcount_order;
        let old = refcount::get(self.rb.bytes(slot), order, idx);
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            corrupt(
                self.file.name(),
                format!("refcount of cluster {cluster} would drop below zero"),
            )
        })?;
        if new > self.geo.max_refcount() {
            return Err(StorageError::InvalidInput(format!(
                "Refcount overflow on cluster {cluster}: {}-bit refcounts cannot count {new} references",
                1u32 << order
            )));
        }
        refcount::set(self.rb.bytes_mut(slot), order, idx, new);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster.max(1));
        }
        Ok(new)
    }

    /// Sets the refcount of `cluster` to `value` (used by repair).
    pub fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let cur = self.refcount(cluster)?;
        if cur != value {
            let delta = i64::try_from(i128::from(value) - i128::from(cur)).map_err(|_| {
                StorageError::InvalidInput(format!("refcount {value} out of range"))
            })?;
            self.update_refcount(cluster, delta)?;
        }
        Ok(())
    }

    fn is_reserved(&self, c: u64) -> bool {
        self.reserved.iter().any(|&(s, n)| c >= s && c < s + n)
            || self
                .exclude
                .as_ref()
                .is_some_and(|ex| ex.get(c as usize).copied().unwrap_or(false))
    }

    /// The first run of `n` free clusters at or after the search hint.
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let coverage = self.reftable.len() as u64 * self.geo.rb_entries;
        let mut start = self.free_hint.max(1);
        let mut c = start;
        // Every cluster in use lies below the file's end or the allocation high-water mark (or
        // is reserved): refcounts that claim clusters far beyond are corrupt, and scanning them
        // all could take hours.
        let reserved: u64 = self.reserved.iter().map(|&(_, k)| k).sum();
        let limit = (self.file_len.max(self.hwm) / self.geo.cluster_size)
            .saturating_add(reserved)
            .saturating_add(n)
            .saturating_add(1);
        loop {
            if c - start == n {
                return Ok(start);
            }

            if c >= coverage {
                // Past the refcount table everything is free.
                if !self.is_reserved(c) {
                    c += 1;
                    continue;
                }
            } else if !self.is_reserved(c) && self.refcount(c)? == 0 {
                c += 1;
                continue;
            }
            // Cluster `c` is in use.
            if c > limit {
                return Err(StorageError::corrupt(
                    self.file.name(),
                    "refcounts claim clusters beyond the end of the file; repair it with \
                     'strata image check -r all'",
                ));
            }
            c += 1;
            start = c;
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1. Returns the host offset and whether the
    /// clusters are fresh (never used since open, so they read as zeros).
    pub fn alloc_clusters(&mut self, n: u64) -> Result<(u64, bool)> {
        let start = self.find_free(n)?;
        let cs = self.geo.cluster_size;
        let off = start * cs;
        let end = off + n * cs;
        // The file grows first: a failure here leaves no refcount taken (a refcount taken
        // before a failed extension would leak the clusters).
        self.ensure_len(end)?;
        self.reserved.push((start, n));
        let mut done = 0;
        let r = (|| {
            for c in start..start + n {
                self.update_refcount(c, 1)?;
                done += 1;
            }
            Ok(())
        })();
        self.reserved.pop();
        if let Err(e) = r {
            for c in start..start + done {
                let _ = self.update_refcount(c, -1);
            }
            return Err(e);
        }
        if n == 1 || start == self.free_hint {
            self.free_hint = start + n;
        }
        let fresh = off >= self.hwm;
        self.hwm = self.hwm.max(end);
        self.unmark_allocated(off, n);
        Ok((off, fresh))
    }

    /// Creates refcount block `ti`, placing it where it can count itself if possible.
    fn new_refcount_block(&mut self, ti: usize) -> Result<u64> {
        if ti >= self.reftable.len() {
            self.grow_reftable(ti)?;
        }
        let c = self.find_free(1)?;
        let cs = self.geo.cluster_size;
        let covers_itself = (c / self.geo.rb_entries) as usize == ti;
        let mut data = IoBuf::new(cs as usize);
        if covers_itself {
            let idx = (c % self.geo.rb_entries) as usize;
            refcount::set(
                data.as_mut_slice().unwrap_or(&mut []),
                self.geo.refcount_order,
                idx,
                1,
            );
        }
        let off = c * cs;
        self.ensure_len(off + cs)?;
        self.hwm = self.hwm.max(off + cs);
        self.make_room_rb()?;
        self.rb.insert(off, data, true);
        self.reftable[ti] = off;
        self.mark_metadata(off);
        self.reftable_dirty.insert(ti * 8 / self.unit);
        if !covers_itself {
            self.reserved.push((c, 1));
            let r = self.update_refcount(c, 1);
            self.reserved.pop();
            if let Err(e) = r {
                // Nothing may point at a block whose own refcount was not taken: a later
                // allocation could hand its cluster out again.
                self.reftable[ti] = 0;
                self.rb.forget(off);
                self.rebuild_metadata_map();
                return Err(e);
            }
        }
        Ok(off)
    }

    /// Replaces the refcount table by a larger one that covers refcount block `ti`.
    fn grow_reftable(&mut self, ti: usize) -> Result<()> {
        let cs = self.geo.cluster_size;
        let used_clusters = self.file_len.max(self.hwm) / cs;
        let need = (ti as u64 + 1)
            .max(self.reftable.len() as u64 * 2)
            .max(used_clusters / self.geo.rb_entries + 4);
        let clusters = (need * 8).div_ceil(cs);
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(StorageError::OutOfSpace(format!(
                "{}: the refcount table would exceed 8 MiB",
                self.file.name()
            )));
        }
        let entries = (clusters * cs / 8) as usize;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.reftable.resize(entries, 0);
        let start = self.find_free(clusters)?;
        self.reserved.push((start, clusters));
        let r = (|| {
            for c in start..start + clusters {
                self.update_refcount(c, 1)?;
            }
            Ok::<(), StorageError>(())
        })();
        self.reserved.pop();
        r?;
        let off = start * cs;
        self.ensure_len(off + clusters * cs)?;
        self.hwm = self.hwm.max(off + clusters * cs);
        self.header.refcount_table_offset = off;
        self.header.refcount_table_clusters = clusters as u32;
        self.reftable_moved = true;
        self.header_dirty = true;
        for c in 0..old_clusters {
            self.pending_free.push(old_off / cs + c);
        }
        self.rebuild_metadata_map();
        Ok(())
    }

    /// Extends the file ahead of allocations so queued writes stay within it.
    pub(super) fn ensure_len(&mut self, end: u64) -> Result<()> {
        if end <= self.file_len {
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        let grow = (self.file_len / 8).clamp(1 << 20, 256 << 20);
        let new_len = end.max(self.file_len + grow).next_multiple_of(cs);
        self.file.set_len(new_len)?;
        self.file_len = new_len;
        Ok(())
    }

    /// Drops one reference to each of `n` clusters at host offset `offset` once the metadata
    /// written so far is durable.
    pub fn free_later(&mut self, offset: u64, n: u64) {
        let first = offset / self.geo.cluster_size;
        self.pending_free.extend(first..first + n);
    }

    /// Drops the references a compressed cluster holds, once durable.
    pub fn free_compressed_later(&mut self, offset: u64, len: u64) {
        let range = self.compressed_clusters(offset, len);
        self.pending_free.extend(range);
    }

    /// Drops one reference to an allocation that nothing points to (a failed write).
    pub fn free_now(&mut self, offset: u64, n: u64) -> Result<()> {
        let first = offset / self.geo.cluster_size;
        for c in first..first + n {
            self.update_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Applies the pending decrements; clusters reaching zero are punched out of the file.
    pub(super) fn apply_pending_frees(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending_free).into_iter();
        let cs = self.geo.cluster_size;
        while let Some(c) = pending.next() {
            let left = match self.update_refcount(c, -1) {
                Ok(n) => n,
                Err(e) => {
                    // What was not applied stays pending for the next write-back.
                    self.pending_free.push(c);
                    self.pending_free.extend(pending);
                    return Err(e);
                }
            };
            if left == 0 {
                self.l2.forget(c * cs);
                self.rb.forget(c * cs);
                if c * cs < self.file_len {
                    if let Err(e) = self.file.punch_hole(c * cs, cs) {
                        tracing::debug!(error = %e, "punching a freed cluster failed");
                    }
                }
            }
        }
        Ok(())
    }
}
