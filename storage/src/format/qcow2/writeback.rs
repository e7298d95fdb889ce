//! Writing dirty metadata back in an order that survives power loss at any point:
//!
//! 1. refcount blocks (increments only ever run ahead of the pointers that use them);
//! 2. sync — this also makes every completed data write durable;
//! 3. a moved refcount table, sync, the header that points at it, sync (or changed refcount
//!    table entries, sync);
//! 4. L2 tables;
//! 5. sync;
//! 6. the L1 table and the header;
//! 7. sync;
//! 8. decrements of clusters the metadata just written stopped using (written next time).
//!
//! With lazy refcounts, steps 1 and 3 are skipped while the dirty bit is set on disk (set, and
//! synced, before the first table write); a clean close writes the refcounts and clears it.

use crate::error::Result;
use crate::io::IoBuf;

use super::header::incompat;
use super::meta::Meta;

impl Meta {
    /// Whether lazy refcounts are in effect.
    pub(super) fn lazy(&self) -> bool {
        self.writable && self.header.lazy_refcounts()
    }

    /// Whether a flush has metadata to write.
    pub fn needs_writeback(&self) -> bool {
        self.l2.any_dirty()
            || !self.l1_dirty.is_empty()
            || self.header_dirty
            || !self.pending_free.is_empty()
            || (!self.lazy()
                && (self.rb.any_dirty() || !self.reftable_dirty.is_empty() || self.reftable_moved))
    }

    /// Writes `bytes` (one cluster) at `offset` from an aligned buffer.
    pub(super) fn write_cluster(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.write_aligned(offset, bytes)
    }

    fn write_aligned(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let buf = IoBuf::from_slice(bytes);
        self.file
            .write_all_at(offset, buf.as_slice().unwrap_or(&[]))
    }

    /// Writes the units of a u64 table at `offset` named in `units`.
    fn write_units(
        &self,
        offset: u64,
        table: &[u64],
        units: &[usize],
        limit_bytes: u64,
    ) -> Result<()> {
        let per_unit = self.unit / 8;
        for &u in units {
            let first = u * per_unit;
            let end_byte = ((u + 1) * self.unit) as u64;
            // Never write past the clusters the table occupies.
            let n_bytes = end_byte.min(limit_bytes) - (u * self.unit) as u64;
            let mut bytes = vec![0u8; n_bytes as usize];
            for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
                if let Some(v) = table.get(first + i) {
                    chunk.copy_from_slice(&v.to_be_bytes());
                }
            }
            self.write_aligned(offset + (u * self.unit) as u64, &bytes)?;
        }
        Ok(())
    }

    /// Writes the header (and its extensions and backing name), padded to whole units.
    pub fn write_header(&mut self) -> Result<()> {
        let mut bytes = self.header.serialize()?;
        let padded = (bytes.len() as u64)
            .next_multiple_of(self.unit as u64)
            .min(self.geo.cluster_size);
        bytes.resize(padded as usize, 0);
        self.write_aligned(0, &bytes)?;
        self.header_dirty = false;
        Ok(())
    }

    fn write_refcount_blocks(&mut self) -> Result<()> {
        for slot in self.rb.dirty_slots() {
            let off = self.rb.offset(slot);
            self.write_cluster(off, self.rb.bytes(slot))?;
            self.rb.mark_clean(slot);
        }
        Ok(())
    }

    /// Writes the refcount table after its blocks are durable (step 3).
    fn write_reftable(&mut self) -> Result<()> {
        let bytes = u64::from(self.header.refcount_table_clusters) * self.geo.cluster_size;
        let off = self.header.refcount_table_offset;
        if self.reftable_moved {
            let all: Vec<usize> = (0..(bytes as usize).div_ceil(self.unit)).collect();
            let table = std::mem::take(&mut self.reftable);
            let r = self.write_units(off, &table, &all, bytes);
            self.reftable = table;
            r?;
            self.file.sync_data()?;
            self.write_header()?;
            self.file.sync_data()?;
            self.reftable_moved = false;
            self.reftable_dirty.clear();
        } else if !self.reftable_dirty.is_empty() {
            // The units stay dirty until written and synced: a failed write-back is retried
            // whole by the next one, never forgotten.
            let units: Vec<usize> = self.reftable_dirty.iter().copied().collect();
            let table = std::mem::take(&mut self.reftable);
            let r = self.write_units(off, &table, &units, bytes);
            self.reftable = table;
            r?;
            self.file.sync_data()?;
            for u in units {
                self.reftable_dirty.remove(&u);
            }
        }
        Ok(())
    }

    /// Sets the dirty bit on disk before lazily counted tables are written.
    fn ensure_dirty_bit(&mut self) -> Result<()> {
        if !self.dirty_on_disk {
            self.header.incompatible_features |= incompat::DIRTY;
            self.write_header()?;
            self.file.sync_data()?;
            self.dirty_on_disk = true;
        }
        Ok(())
    }

    /// Refcount structures before the pointers that depend on them, with a sync after: what an
    /// evicted L2 table or a full write-back needs first.
    pub(super) fn write_refcounts_and_sync(&mut self) -> Result<()> {
        if self.lazy() {
            self.ensure_dirty_bit()?;
            return self.file.sync_data();
        }
        self.write_refcount_blocks()?;
        self.file.sync_data()?;
        self.write_reftable()
    }

    /// Writes back (if dirty) and drops the least recently used L2 table when the cache is full.
    pub(super) fn make_room_l2(&mut self) -> Result<()> {
        if !self.l2.is_full() {
            return Ok(());
        }
        if let Some(v) = self.l2.victim() {
            if self.l2.is_dirty(v) {
                self.write_refcounts_and_sync()?;
                let off = self.l2.offset(v);
                self.write_cluster(off, self.l2.bytes(v))?;
            }
            self.l2.remove(v);
        }
        Ok(())
    }

    /// Writes every dirty table in the order of the module documentation and syncs. Completed
    /// data writes are durable afterwards too.
    pub fn writeback(&mut self) -> Result<()> {
        if !self.needs_writeback() {
            return Ok(());
        }
        self.write_refcounts_and_sync()?;
        for slot in self.l2.dirty_slots() {
            let off = self.l2.offset(slot);
            self.write_cluster(off, self.l2.bytes(slot))?;
            self.l2.mark_clean(slot);
        }
        if !self.l1_dirty.is_empty() || self.header_dirty {
            self.file.sync_data()?;
            // As for the refcount table: dirty until written (a failed write is retried).
            let units: Vec<usize> = self.l1_dirty.iter().copied().collect();
            let l1_bytes = (self.l1.len() as u64 * 8).next_multiple_of(self.geo.cluster_size);
            let l1 = std::mem::take(&mut self.l1);
            let r = self.write_units(self.header.l1_table_offset, &l1, &units, l1_bytes);
            self.l1 = l1;
            r?;
            for u in units {
                self.l1_dirty.remove(&u);
            }
            if self.header_dirty {
                self.write_header()?;
            }
        }
        self.file.sync_data()?;
        self.apply_pending_frees()
    }

    /// Writes every dirty table, refcounts included even with lazy refcounts, and syncs.
    pub(super) fn write_everything(&mut self) -> Result<()> {
        self.check_fresh()?;
        self.writeback()?;
        self.write_refcount_blocks()?;
        self.file.sync_data()?;
        self.write_reftable()?;
        if self.header_dirty {
            self.write_header()?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Writes everything, refcounts included, clears the dirty bit we set, and trims the file
    /// back to what is allocated: a clean close.
    pub fn close(&mut self) -> Result<()> {
        if !self.writable || self.stale {
            return Ok(());
        }
        self.write_everything()?;
        if self.dirty_on_disk && self.header.dirty() {
            self.header.incompatible_features &= !incompat::DIRTY;
            self.write_header()?;
            self.file.sync_data()?;
            self.dirty_on_disk = false;
        }
        let keep = self.orig_len.max(self.hwm);
        if self.file_len > keep {
            self.file.set_len(keep)?;
            self.file_len = keep;
            self.file.sync_data()?;
        }
        Ok(())
    }
}
