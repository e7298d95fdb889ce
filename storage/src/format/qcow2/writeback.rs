//! Writing dirty metadata back in an order that survives power loss at any point:
//!
//! 0. with an external data file, a sync of the data file (every L2 entry in the copy points at
//!    data whose write completed; this makes it durable before the entry is written);
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
//!
//! Each step's writes go to the file together, through a queue ([`write_tables`]), and of each
//! table only the granules that changed (`cache.rs`).
//!
//! A write-back runs in three phases so that no system call happens under the metadata lock:
//! [`Meta::begin_writeback`] copies everything dirty at one instant (under the lock), the copy
//! is written in the order above without the lock ([`Writeback::run`]), and
//! [`Meta::end_writeback`] marks clean what was written — only the versions copied, so a table
//! changed meanwhile stays dirty — or, if a write failed, makes everything dirty again. Every L2
//! entry copied points at data whose write completed before the copy, and every refcount it
//! relies on is in the same copy, so the order above covers it. Write-backs of one image never
//! overlap: the metadata worker and control-plane flushes run them under the image's write-back
//! lock ([`writeback_unlocked`]).

use std::sync::Mutex;

use crate::device::{HostFile, SharedFile};
use crate::error::{Result, StorageError};
use crate::io::blocking::BlockingQueue;
use crate::io::IoBuf;
use crate::sync::lock_meta;

use super::cache::DirtyTable;
use super::header::incompat;
use super::meta::{read_table, Meta, Table};
use super::refcounts::TableWrite;

/// What one write-back writes, copied under the metadata lock. See the module documentation.
#[derive(Debug)]
pub struct Writeback {
    lazy: bool,
    /// The header with the dirty bit set, to write and sync first (lazy refcounts).
    dirty_bit: Option<IoBuf>,
    blocks: Vec<DirtyTable>,
    table: TableWrite,
    /// The header to write after a moved refcount table.
    moved_header: Option<IoBuf>,
    l2: Vec<DirtyTable>,
    /// L1 units: offset within the table and bytes.
    l1: Vec<(u64, Vec<u8>)>,
    l1_offset: u64,
    header: Option<IoBuf>,
    frees: Vec<u64>,
    /// The external data file, synced first.
    data_file: Option<SharedFile>,
}

fn write_aligned(file: &dyn HostFile, offset: u64, bytes: &[u8]) -> Result<()> {
    let buf = IoBuf::from_slice(bytes);
    file.write_all_at(offset, buf.as_slice().unwrap_or(&[]))
}

/// Most writes of one step a write-back has in flight at once.
const WRITE_DEPTH: usize = 32;

/// Writes the changed parts of `tables` (taken out of them), all at once through a queue on
/// the file: one step of the order in the module documentation.
pub(super) fn write_tables(file: &dyn HostFile, tables: &mut [DirtyTable]) -> Result<()> {
    let mut pieces: Vec<(u64, IoBuf)> = tables
        .iter_mut()
        .flat_map(|t| std::mem::take(&mut t.pieces))
        .collect();
    match pieces.len() {
        0 => Ok(()),
        1 => {
            let (offset, buf) = pieces.remove(0);
            file.write_all_at(offset, buf.as_slice().unwrap_or(&[]))
        }
        n => BlockingQueue::open(file, n.min(WRITE_DEPTH))?.write_all(pieces),
    }
}

impl Writeback {
    /// Writes the copy in the order of the module documentation. No lock is held.
    pub fn run(&mut self, file: &dyn HostFile) -> Result<()> {
        if let Some(d) = &self.data_file {
            d.sync_data()?;
        }
        if let Some(h) = &self.dirty_bit {
            write_aligned(file, 0, h.as_slice().unwrap_or(&[]))?;
            file.sync_data()?;
        }
        if !self.lazy {
            write_tables(file, &mut self.blocks)?;
            file.sync_data()?;
            write_table(file, &self.table, self.moved_header.as_ref())?;
        } else {
            file.sync_data()?;
        }
        write_tables(file, &mut self.l2)?;
        if !self.l1.is_empty() || self.header.is_some() {
            file.sync_data()?;
            for (at, bytes) in &self.l1 {
                write_aligned(file, self.l1_offset + at, bytes)?;
            }
            if let Some(h) = &self.header {
                write_aligned(file, 0, h.as_slice().unwrap_or(&[]))?;
            }
        }
        file.sync_data()
    }
}

/// Writes the refcount table as `w` says (step 3), with the header after a move.
fn write_table(file: &dyn HostFile, w: &TableWrite, moved_header: Option<&IoBuf>) -> Result<()> {
    match w {
        TableWrite::Nothing => Ok(()),
        TableWrite::Units(table, units) => {
            for (at, bytes) in units {
                write_aligned(file, table + at, bytes)?;
            }
            file.sync_data()
        }
        TableWrite::Moved { offset, bytes, .. } => {
            write_aligned(file, *offset, bytes)?;
            file.sync_data()?;
            if let Some(h) = moved_header {
                write_aligned(file, 0, h.as_slice().unwrap_or(&[]))?;
            }
            file.sync_data()
        }
    }
}

impl Meta {
    /// Whether lazy refcounts are in effect.
    pub(super) fn lazy(&self) -> bool {
        self.writable && self.header.lazy_refcounts()
    }

    /// Whether a flush has metadata to write (or must wait for a write-back in progress).
    pub fn needs_writeback(&self) -> bool {
        self.writeback_running
            || self.l2.any_dirty()
            || self.l1.is_dirty()
            || self.header_dirty
            || self.refs.frees_pending()
            || (!self.lazy() && self.refs.is_dirty())
    }

    /// The header as it must be written now (the refcount table may have moved), padded to
    /// whole write units.
    fn header_bytes(&mut self) -> Result<IoBuf> {
        if self.refs.moves() != self.table_moves_seen {
            // Allocation moved the refcount table: the header follows. (Control-plane rewrites
            // set the header's fields themselves and leave this alone.)
            let (off, clusters) = self.refs.table_at();
            self.header.refcount_table_offset = off;
            self.header.refcount_table_clusters = clusters;
            self.table_moves_seen = self.refs.moves();
        }
        let mut bytes = self.header.serialize()?;
        let padded = (bytes.len() as u64)
            .next_multiple_of(self.unit as u64)
            .min(self.geo.cluster_size);
        bytes.resize(padded as usize, 0);
        Ok(IoBuf::from_slice(&bytes))
    }

    /// Writes the header now (control plane, or at open).
    pub fn write_header(&mut self) -> Result<()> {
        let bytes = self.header_bytes()?;
        write_aligned(self.file.as_ref(), 0, bytes.as_slice().unwrap_or(&[]))?;
        self.header_dirty = false;
        Ok(())
    }

    /// Writes `bytes` (one cluster) at `offset` now (control plane).
    pub(super) fn write_cluster(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        write_aligned(self.file.as_ref(), offset, bytes)
    }

    /// Phase one: copies everything dirty (see the module documentation). `None` if nothing is.
    pub fn begin_writeback(&mut self) -> Result<Option<Writeback>> {
        self.check_fresh()?;
        if self.writeback_running || !self.needs_writeback() {
            return Ok(None);
        }
        let lazy = self.lazy();
        let dirty_bit = if lazy && !self.dirty_on_disk {
            self.header.incompatible_features |= incompat::DIRTY;
            Some(self.header_bytes()?)
        } else {
            None
        };
        let (blocks, table, moved_header) = if lazy {
            (Vec::new(), TableWrite::Nothing, None)
        } else {
            let blocks = self.refs.dirty_blocks();
            let table = self.refs.take_table_write();
            let moved_header = match &table {
                TableWrite::Moved { .. } => match self.header_bytes() {
                    Ok(h) => Some(h),
                    Err(e) => {
                        self.refs.table_written(&table, false);
                        self.refs.blocks_mut().copy_failed();
                        return Err(e);
                    }
                },
                _ => None,
            };
            (blocks, table, moved_header)
        };
        let l1_bytes = (self.l1.len() as u64 * 8).next_multiple_of(self.geo.cluster_size);
        let l1 = self.l1.take_dirty(l1_bytes);
        let header = if self.header_dirty {
            match self.header_bytes() {
                Ok(h) => {
                    self.header_dirty = false;
                    Some(h)
                }
                Err(e) => {
                    self.l1.redirty(l1.iter().map(|u| u.0));
                    self.refs.table_written(&table, false);
                    self.refs.blocks_mut().copy_failed();
                    return Err(e);
                }
            }
        } else {
            None
        };
        self.writeback_running = true;
        Ok(Some(Writeback {
            lazy,
            dirty_bit,
            blocks,
            table,
            moved_header,
            l2: self.l2.dirty_tables(),
            l1,
            l1_offset: self.header.l1_table_offset,
            header,
            frees: self.refs.take_frees(),
            data_file: self.data_file.clone(),
        }))
    }

    /// Phase three: records the outcome of `wb`. Returns the decrements that are due now that
    /// the metadata is durable (none if the write-back failed).
    pub fn end_writeback(&mut self, wb: Writeback, ok: bool) -> Vec<u64> {
        self.writeback_running = false;
        self.l2.unprotect();
        self.refs.blocks_mut().unprotect();
        if !ok {
            self.l2.copy_failed();
            self.refs.blocks_mut().copy_failed();
            self.l1.redirty(wb.l1.iter().map(|u| u.0));
            if wb.header.is_some() {
                self.header_dirty = true;
            }
            self.refs.table_written(&wb.table, false);
            self.refs.restore_frees(wb.frees);
            return Vec::new();
        }
        if wb.dirty_bit.is_some() {
            self.dirty_on_disk = true;
        }
        self.refs.blocks_written(&wb.blocks);
        self.refs.table_written(&wb.table, true);
        for t in &wb.l2 {
            self.l2.mark_clean(t.offset, t.gen);
        }
        wb.frees
    }

    /// Applies due decrements. Clusters that reach zero are dropped from the caches and held
    /// back from allocation until their hole is punched (`punch`). Stops when a refcount block
    /// must be read first, returning it.
    pub fn apply_frees(
        &mut self,
        frees: &mut Vec<u64>,
        punch: &mut Vec<u64>,
    ) -> Result<Option<Table>> {
        let cs = self.geo.cluster_size;
        while let Some(&c) = frees.last() {
            match self.refs.update(c, -1) {
                Ok(0) => {
                    frees.pop();
                    self.l2.forget(c * cs);
                    self.refs.blocks_mut().forget(c * cs);
                    if c * cs < self.refs.file_len() {
                        self.refs.hold_for_punch(c);
                        punch.push(c);
                    }
                }
                Ok(_) => {
                    frees.pop();
                }
                Err(super::meta::Stall::Load(t)) => return Ok(Some(t)),
                Err(super::meta::Stall::Failed(e)) => {
                    frees.pop();
                    return Err(e);
                }
                Err(other) => {
                    frees.pop();
                    return Err(StorageError::Unavailable(format!(
                        "{}: releasing cluster {c} stalled ({other:?})",
                        self.file.name()
                    )));
                }
            }
        }
        Ok(None)
    }

    /// A whole write-back with its I/O done under the lock: for control-plane operations that
    /// run with the image idle.
    pub fn writeback_blocking(&mut self) -> Result<()> {
        let Some(mut wb) = self.begin_writeback()? else {
            return Ok(());
        };
        let r = wb.run(self.file.as_ref());
        let mut frees = self.end_writeback(wb, r.is_ok());
        r?;
        let mut punch = Vec::new();
        let result = loop {
            match self.apply_frees(&mut frees, &mut punch) {
                Ok(None) => break Ok(()),
                Ok(Some(t)) => {
                    if let Err(e) = self.load_blocking(t) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        self.refs.restore_frees(frees);
        punch_holes(self.file.as_ref(), &punch, self.geo.cluster_size);
        self.refs.punched(&punch);
        result
    }

    /// Writes every dirty table, refcounts included even with lazy refcounts, and syncs.
    pub(super) fn write_everything(&mut self) -> Result<()> {
        self.check_fresh()?;
        self.writeback_blocking()?;
        let mut blocks = self.refs.dirty_blocks();
        write_tables(self.file.as_ref(), &mut blocks)?;
        self.file.sync_data()?;
        self.refs.blocks_written(&blocks);
        let table = self.refs.take_table_write();
        let moved_header = match &table {
            TableWrite::Moved { .. } => Some(self.header_bytes()?),
            _ => None,
        };
        let r = write_table(self.file.as_ref(), &table, moved_header.as_ref());
        self.refs.table_written(&table, r.is_ok());
        r?;
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
        let keep = self.refs.orig_len().max(self.refs.hwm());
        if self.refs.file_len() > keep {
            self.file.set_len(keep)?;
            self.refs.set_file_len(keep);
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Punches the holes of freed clusters (failures only cost space).
fn punch_holes(file: &dyn HostFile, clusters: &[u64], cs: u64) {
    for &c in clusters {
        if let Err(e) = file.punch_hole(c * cs, cs) {
            tracing::debug!(error = %e, "punching a freed cluster failed");
        }
    }
}

/// A whole write-back of the image whose metadata is `meta`, without holding the metadata lock
/// across any I/O. The caller holds the image's write-back lock. Returns whether there was
/// anything to write.
pub(crate) fn writeback_unlocked(
    meta: &Mutex<Meta>,
    file: &dyn HostFile,
    name: &str,
) -> Result<bool> {
    let wb = {
        let mut m = lock_meta(meta, name)?;
        let wb = m.begin_writeback()?;
        if wb.is_none() {
            m.end_op();
        }
        wb
    };
    let Some(mut wb) = wb else {
        return Ok(false);
    };
    let r = wb.run(file);
    let mut frees = lock_meta(meta, name)?.end_writeback(wb, r.is_ok());
    r?;
    let cs = lock_meta(meta, name)?.geo.cluster_size;
    let mut punch = Vec::new();
    let result = loop {
        let step = lock_meta(meta, name)?.apply_frees(&mut frees, &mut punch);
        match step {
            Ok(None) => break Ok(()),
            Ok(Some(t)) => match read_table(file, t.offset(), cs) {
                Ok(data) => lock_meta(meta, name)?.insert_loaded(t, data),
                Err(e) => break Err(e),
            },
            Err(e) => break Err(e),
        }
    };
    {
        let mut m = lock_meta(meta, name)?;
        m.refs.restore_frees(frees);
        m.end_op();
    }
    punch_holes(file, &punch, cs);
    lock_meta(meta, name)?.refs.punched(&punch);
    result.map(|()| true)
}
