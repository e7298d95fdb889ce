//! Refcounts and cluster allocation (docs/interop/qcow2.rst, "Host cluster management"), with
//! the host file's extent and the map of clusters holding metadata (`overlap.rs`).
//!
//! Refcount changes are made in the refcount block cache and written back before any table that
//! points at the clusters they count (`writeback.rs`). Increments happen at once; decrements of
//! clusters that metadata stopped using wait in [`Refcounts::free_later`] until that metadata is
//! durable, so a crash can leave leaked clusters but never a refcount below its references.
//! New refcount blocks cover themselves where they can; a full refcount table is replaced by a
//! larger copy elsewhere, switched to through the header.
//!
//! Nothing here does I/O. An operation that needs a refcount block that is not in memory, or a
//! file longer than it is, stops with a [`Stall`] — and since such a stop can come after part of
//! an operation's changes, every operation runs [`Refcounts::atomically`]: its changes are
//! journalled and undone if it stalls or fails, so it can be retried once the block is read or
//! the file has grown, without leaking or counting anything twice.

use std::collections::{BTreeSet, HashSet};

use crate::error::StorageError;
use crate::io::IoBuf;

use super::cache::{DirtyTable, TableCache};
use super::entry::Geometry;
use super::header::MAX_REFTABLE_BYTES;
use super::meta::{corrupt, encode_units, Job, Stall, Step, Table};
use super::overlap::MetadataMap;
use super::refcount;

/// Bits 9-63 of a refcount table entry.
const RT_OFFSET_MASK: u64 = !0x1ff;

/// One change to undo.
#[derive(Debug)]
enum Undo {
    Count { block: u64, idx: usize, old: u64 },
    NewBlock(u64),
    TableEntry { ti: usize, old: u64 },
}

/// The journal of the operation running (see the module documentation).
#[derive(Debug)]
struct Journal {
    hwm: u64,
    free_hint: u64,
    table_len: usize,
    table_at: (u64, u32),
    moved: bool,
    pending_len: usize,
    reserved_len: usize,
    undo: Vec<Undo>,
}

/// How the refcount table is to be written back.
#[derive(Debug)]
pub enum TableWrite {
    /// Nothing changed.
    Nothing,
    /// Changed units: the table's host offset, and `(offset in the table, bytes)` per unit.
    Units(u64, Vec<(u64, Vec<u8>)>),
    /// The table moved: all of it at its new place, then the header.
    Moved {
        /// Host offset of the new table.
        offset: u64,
        /// The whole table.
        bytes: Vec<u8>,
        /// Which move this is.
        gen: u64,
    },
}

/// See the module documentation.
#[derive(Debug)]
pub struct Refcounts {
    geo: Geometry,
    name: String,
    table: Vec<u64>,
    table_dirty: BTreeSet<usize>,
    /// Host offset and clusters of the refcount table (the header's fields).
    table_at: (u64, u32),
    /// The table moved since it was last written back.
    moved: bool,
    move_gen: u64,
    blocks: TableCache,
    unit: usize,
    /// Search for free clusters starts here (cluster index).
    free_hint: u64,
    /// Clusters being allocated right now, which free-space searches skip.
    reserved: Vec<(u64, u64)>,
    /// Freed clusters whose hole is being punched: not to be handed out until it is.
    punching: HashSet<u64>,
    /// Clusters that must never be handed out (a repair in progress: every referenced cluster).
    exclude: Option<Vec<bool>>,
    /// Host clusters whose refcount drops once the metadata that stopped using them is durable.
    pending_free: Vec<u64>,
    /// Length of the file (we extend it ahead of allocations).
    file_len: u64,
    /// Clusters at or beyond this byte offset were never handed out since open: they read zeros.
    hwm: u64,
    /// Length at open, so close can trim only what we added.
    orig_len: u64,
    /// The file length asked of the metadata worker ahead of need, if not yet granted.
    grow_asked: Option<u64>,
    metadata: MetadataMap,
    journal: Option<Journal>,
    /// Where an allocation's search for free clusters stopped for a refcount block to be read:
    /// every cluster before it was in use, so the retry starts there (a search that needs more
    /// blocks than the cache holds must not start over each time).
    scan_resume: Option<u64>,
    /// While an allocation takes the clusters it found: searches it makes for new refcount
    /// blocks start no lower (everything below was in use).
    scan_floor: u64,
}

impl Refcounts {
    /// Refcounts of an image with geometry `geo` whose refcount table `table` lies at
    /// `table_at` in a file of `file_len` bytes.
    pub fn new(
        geo: Geometry,
        name: String,
        table: Vec<u64>,
        table_at: (u64, u32),
        block_cache: usize,
        unit: usize,
        file_len: u64,
    ) -> Refcounts {
        Refcounts {
            geo,
            name,
            table,
            table_dirty: BTreeSet::new(),
            table_at,
            moved: false,
            move_gen: 0,
            blocks: TableCache::new(block_cache),
            unit,
            free_hint: 1,
            reserved: Vec::new(),
            punching: HashSet::new(),
            exclude: None,
            pending_free: Vec::new(),
            file_len,
            hwm: file_len.next_multiple_of(geo.cluster_size),
            orig_len: file_len,
            grow_asked: None,
            metadata: MetadataMap::default(),
            journal: None,
            scan_resume: None,
            scan_floor: 0,
        }
    }

    /// The refcount table's entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Host offset and clusters of the refcount table.
    pub fn table_at(&self) -> (u64, u32) {
        self.table_at
    }

    /// How many times the table moved (to tell whether the header must follow).
    pub fn moves(&self) -> u64 {
        self.move_gen
    }

    /// The refcount block cache.
    pub fn blocks(&self) -> &TableCache {
        &self.blocks
    }

    /// The refcount block cache, to insert blocks read from disk.
    pub fn blocks_mut(&mut self) -> &mut TableCache {
        &mut self.blocks
    }

    /// Length of the file as we know it.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// End of the clusters handed out since open (or the file's length at open).
    pub fn hwm(&self) -> u64 {
        self.hwm
    }

    /// Raises the high-water mark (clusters below it are no longer fresh).
    pub fn raise_hwm(&mut self, to: u64) {
        self.hwm = self.hwm.max(to);
    }

    /// The file's length at open.
    pub fn orig_len(&self) -> u64 {
        self.orig_len
    }

    /// Records a new file length (grown or trimmed by the caller).
    pub fn set_file_len(&mut self, len: u64) {
        self.file_len = len;
        if self.grow_asked.is_some_and(|a| a <= len) {
            self.grow_asked = None;
        }
    }

    /// Keeps what the file length was at open (after reloading the metadata).
    pub fn keep_orig_len(&mut self, len: u64) {
        self.orig_len = len;
    }

    /// The length to grow the file to so that `end` fits, with room for what follows.
    pub fn grow_target(&self, end: u64) -> u64 {
        let grow = (self.file_len / 8).clamp(1 << 20, 256 << 20);
        end.max(self.file_len + grow)
            .next_multiple_of(self.geo.cluster_size)
    }

    /// A file length to ask for ahead of need, once allocations come within half a growth step
    /// of the end (asked once until granted).
    pub fn take_grow_hint(&mut self) -> Option<u64> {
        let step = (self.file_len / 8).clamp(1 << 20, 256 << 20);
        if self.grow_asked.is_some() || self.hwm + step / 2 <= self.file_len {
            return None;
        }
        let target = self.grow_target(self.hwm + step / 2);
        self.grow_asked = Some(target);
        Some(target)
    }

    /// Forgets a request to grow that was not granted (so it is asked again).
    pub fn grow_failed(&mut self) {
        self.grow_asked = None;
    }

    fn ensure_within(&self, end: u64) -> Step<()> {
        if end > self.file_len {
            return Err(Stall::Worker(Job::Grow(self.grow_target(end))));
        }
        Ok(())
    }

    /// Replaces the map of clusters holding metadata.
    pub fn set_metadata(&mut self, map: MetadataMap) {
        self.metadata = map;
    }

    /// Marks a new metadata cluster (an L2 table, a refcount block).
    pub fn mark_metadata(&mut self, offset: u64) {
        let limit = self.file_len.max(self.hwm).div_ceil(self.geo.cluster_size) + 1;
        self.metadata
            .mark_new(offset / self.geo.cluster_size, limit);
    }

    /// Whether host cluster `cluster` holds metadata.
    pub fn holds_metadata(&self, cluster: u64) -> bool {
        self.metadata.contains(cluster)
    }

    /// Sets refcount table entry `i` (repair); its unit becomes dirty.
    pub fn set_table_entry(&mut self, i: usize, value: u64) {
        if let Some(e) = self.table.get_mut(i) {
            *e = value;
            self.table_dirty.insert(i * 8 / self.unit);
        }
    }

    /// Points the refcount table at `offset` (repair copied it there, its size unchanged): it
    /// is written whole at its new place, and the header follows.
    pub fn relocate_table(&mut self, offset: u64) {
        self.table_at.0 = offset;
        self.moved = true;
        self.move_gen += 1;
    }

    /// Sets (or clears) the clusters a repair must never hand out.
    pub fn set_exclude(&mut self, exclude: Option<Vec<bool>>) {
        self.exclude = exclude;
    }

    /// Runs `f` so that it changes nothing if it stalls or fails (see the module documentation).
    pub fn atomically<T>(&mut self, f: impl FnOnce(&mut Refcounts) -> Step<T>) -> Step<T> {
        if self.journal.is_some() {
            return f(self);
        }
        self.journal = Some(Journal {
            hwm: self.hwm,
            free_hint: self.free_hint,
            table_len: self.table.len(),
            table_at: self.table_at,
            moved: self.moved,
            pending_len: self.pending_free.len(),
            reserved_len: self.reserved.len(),
            undo: Vec::new(),
        });
        let r = f(self);
        let Some(j) = self.journal.take() else {
            return r;
        };
        if r.is_err() {
            self.roll_back(j);
        }
        if let Some(at) = self.scan_resume.take() {
            self.free_hint = self.free_hint.max(at);
        }
        self.scan_floor = 0;
        r
    }

    fn roll_back(&mut self, j: Journal) {
        let order = self.geo.refcount_order;
        for u in j.undo.into_iter().rev() {
            match u {
                Undo::Count { block, idx, old } => {
                    if let Some(slot) = self.blocks.lookup(block) {
                        let (at, len) = refcount::span(order, idx);
                        refcount::set(self.blocks.bytes_mut(slot, at, len), order, idx, old);
                    }
                }
                Undo::NewBlock(off) => self.blocks.forget(off),
                Undo::TableEntry { ti, old } => {
                    if let Some(e) = self.table.get_mut(ti) {
                        *e = old;
                    }
                }
            }
        }
        self.table.truncate(j.table_len);
        self.hwm = j.hwm;
        self.free_hint = j.free_hint;
        self.table_at = j.table_at;
        self.moved = j.moved;
        self.pending_free.truncate(j.pending_len);
        self.reserved.truncate(j.reserved_len);
    }

    fn log(&mut self, u: Undo) {
        if let Some(j) = self.journal.as_mut() {
            j.undo.push(u);
        }
    }

    fn block_offset(&self, ti: usize) -> Step<u64> {
        let off = self.table.get(ti).copied().unwrap_or(0) & RT_OFFSET_MASK;
        let cs = self.geo.cluster_size;
        if off != 0 && (off % cs != 0 || off.checked_add(cs).is_none_or(|e| e > self.file_len)) {
            return Err(Stall::Failed(corrupt(
                &self.name,
                format!(
                    "refcount block {ti} at {off:#x} is unaligned or beyond the end of the file"
                ),
            )));
        }
        Ok(off)
    }

    fn block_slot(&mut self, off: u64) -> Step<usize> {
        self.blocks
            .lookup(off)
            .ok_or(Stall::Load(Table::Refblock(off)))
    }

    /// The refcount of host cluster `cluster`.
    pub fn get(&mut self, cluster: u64) -> Step<u64> {
        let ti = (cluster / self.geo.rb_entries) as usize;
        let off = self.block_offset(ti)?;
        if off == 0 {
            return Ok(0);
        }
        let slot = self.block_slot(off)?;
        let idx = (cluster % self.geo.rb_entries) as usize;
        Ok(refcount::get(
            self.blocks.bytes(slot),
            self.geo.refcount_order,
            idx,
        ))
    }

    /// Adds `delta` to the refcount of `cluster`; returns the new value. Creates refcount blocks
    /// (and grows the refcount table) as needed for increments.
    pub fn update(&mut self, cluster: u64, delta: i64) -> Step<u64> {
        self.atomically(|r| r.update_inner(cluster, delta))
    }

    fn update_inner(&mut self, cluster: u64, delta: i64) -> Step<u64> {
        let ti = (cluster / self.geo.rb_entries) as usize;
        let mut off = self.block_offset(ti)?;
        if off == 0 {
            if delta < 0 {
                return Err(Stall::Failed(corrupt(
                    &self.name,
                    format!("refcount of cluster {cluster} would drop below zero"),
                )));
            }
            off = self.new_block(ti)?;
        }
        let slot = self.block_slot(off)?;
        let idx = (cluster % self.geo.rb_entries) as usize;
        let order = self.geo.refcount_order;
        let old = refcount::get(self.blocks.bytes(slot), order, idx);
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            Stall::Failed(corrupt(
                &self.name,
                format!("refcount of cluster {cluster} would drop below zero"),
            ))
        })?;
        if new > self.geo.max_refcount() {
            return Err(Stall::Failed(StorageError::InvalidInput(format!(
                "Refcount overflow on cluster {cluster}: {}-bit refcounts cannot count {new} references",
                1u32 << order
            ))));
        }
        self.log(Undo::Count {
            block: off,
            idx,
            old,
        });
        let (at, len) = refcount::span(order, idx);
        refcount::set(self.blocks.bytes_mut(slot, at, len), order, idx, new);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster.max(1));
        }
        Ok(new)
    }

    /// Sets the refcount of `cluster` to `value` (used by repair).
    pub fn set(&mut self, cluster: u64, value: u64) -> Step<()> {
        self.atomically(|r| {
            let cur = r.get(cluster)?;
            if cur != value {
                let delta = i64::try_from(i128::from(value) - i128::from(cur)).map_err(|_| {
                    Stall::Failed(StorageError::InvalidInput(format!(
                        "refcount {value} out of range"
                    )))
                })?;
                r.update_inner(cluster, delta)?;
            }
            Ok(())
        })
    }

    fn is_reserved(&self, c: u64) -> bool {
        self.reserved.iter().any(|&(s, n)| c >= s && c < s + n)
            || self.punching.contains(&c)
            || self
                .exclude
                .as_ref()
                .is_some_and(|ex| ex.get(c as usize).copied().unwrap_or(false))
    }

    /// The first run of `n` free clusters at or after the search hint. `resumable`: the search
    /// of an allocation itself, whose progress survives a stall (see `scan_resume`).
    fn find_free(&mut self, n: u64, resumable: bool) -> Step<u64> {
        let coverage = self.table.len() as u64 * self.geo.rb_entries;
        let mut start = self.free_hint.max(self.scan_floor).max(1);
        let mut c = start;
        // Every cluster in use lies below the file's end or the allocation high-water mark (or
        // is reserved): refcounts that claim clusters far beyond are corrupt, and scanning them
        // all could take hours.
        let reserved: u64 =
            self.reserved.iter().map(|&(_, k)| k).sum::<u64>() + self.punching.len() as u64;
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
            } else if !self.is_reserved(c) {
                match self.get(c) {
                    Ok(0) => {
                        c += 1;
                        continue;
                    }
                    Ok(_) => {}
                    Err(stall) => {
                        if resumable && self.reserved.is_empty() && self.exclude.is_none() {
                            self.scan_resume = Some(start);
                        }
                        return Err(stall);
                    }
                }
            }
            // Cluster `c` is in use.
            if c > limit {
                return Err(Stall::Failed(StorageError::corrupt(
                    &self.name,
                    "refcounts claim clusters beyond the end of the file; repair it with \
                     'strata image check -r all'",
                )));
            }
            c += 1;
            start = c;
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1. Returns the host offset and whether the
    /// clusters are fresh (never used since open, so they read as zeros).
    pub fn alloc(&mut self, n: u64) -> Step<(u64, bool)> {
        self.atomically(|r| {
            let start = r.find_free(n, true)?;
            r.scan_resume = Some(start);
            r.scan_floor = start;
            let cs = r.geo.cluster_size;
            let off = start * cs;
            let end = off + n * cs;
            r.ensure_within(end)?;
            r.reserved.push((start, n));
            for c in start..start + n {
                r.update_inner(c, 1)?;
            }
            r.reserved.pop();
            if n == 1 || start == r.free_hint {
                r.free_hint = start + n;
            }
            let fresh = off >= r.hwm;
            r.hwm = r.hwm.max(end);
            r.metadata.clear_range(start, n);
            Ok((off, fresh))
        })
    }

    /// Creates refcount block `ti`, placing it where it can count itself if possible.
    fn new_block(&mut self, ti: usize) -> Step<u64> {
        if ti >= self.table.len() {
            self.grow_table(ti)?;
        }
        let c = self.find_free(1, false)?;
        let cs = self.geo.cluster_size;
        let off = c * cs;
        self.ensure_within(off + cs)?;
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
        self.hwm = self.hwm.max(off + cs);
        self.blocks.insert_new(off, data);
        self.log(Undo::NewBlock(off));
        let old = self.table[ti];
        self.log(Undo::TableEntry { ti, old });
        self.table[ti] = off;
        self.table_dirty.insert(ti * 8 / self.unit);
        self.mark_metadata(off);
        if !covers_itself {
            self.reserved.push((c, 1));
            self.update_inner(c, 1)?;
            self.reserved.pop();
        }
        Ok(off)
    }

    /// Replaces the refcount table by a larger one that covers refcount block `ti`.
    fn grow_table(&mut self, ti: usize) -> Step<()> {
        let cs = self.geo.cluster_size;
        let used_clusters = self.file_len.max(self.hwm) / cs;
        let need = (ti as u64 + 1)
            .max(self.table.len() as u64 * 2)
            .max(used_clusters / self.geo.rb_entries + 4);
        let clusters = (need * 8).div_ceil(cs);
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Stall::Failed(StorageError::OutOfSpace(format!(
                "{}: the refcount table would exceed 8 MiB",
                self.name
            ))));
        }
        let entries = (clusters * cs / 8) as usize;
        let (old_off, old_clusters) = self.table_at;
        self.table.resize(entries, 0);
        let start = self.find_free(clusters, false)?;
        let off = start * cs;
        self.ensure_within(off + clusters * cs)?;
        self.reserved.push((start, clusters));
        for c in start..start + clusters {
            self.update_inner(c, 1)?;
        }
        self.reserved.pop();
        self.hwm = self.hwm.max(off + clusters * cs);
        self.table_at = (off, clusters as u32);
        self.moved = true;
        self.move_gen += 1;
        for c in 0..u64::from(old_clusters) {
            self.pending_free.push(old_off / cs + c);
        }
        for c in start..start + clusters {
            self.mark_metadata(c * cs);
        }
        Ok(())
    }

    /// Drops one reference to each of `n` clusters at host offset `offset` once the metadata
    /// written so far is durable.
    pub fn free_later(&mut self, offset: u64, n: u64) {
        let first = offset / self.geo.cluster_size;
        self.pending_free.extend(first..first + n);
    }

    /// Drops the references a compressed cluster holds, once durable.
    pub fn free_clusters_later(&mut self, clusters: std::ops::RangeInclusive<u64>) {
        self.pending_free.extend(clusters);
    }

    /// Whether decrements wait for the next write-back.
    pub fn frees_pending(&self) -> bool {
        !self.pending_free.is_empty()
    }

    /// Takes the pending decrements (a write-back is about to make what stopped using them
    /// durable).
    pub fn take_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_free)
    }

    /// Puts decrements back (the write-back failed).
    pub fn restore_frees(&mut self, mut frees: Vec<u64>) {
        frees.append(&mut self.pending_free);
        self.pending_free = frees;
    }

    /// Keeps freed cluster `c` from being handed out until its hole is punched.
    pub fn hold_for_punch(&mut self, c: u64) {
        self.punching.insert(c);
    }

    /// Releases clusters held by [`Refcounts::hold_for_punch`].
    pub fn punched(&mut self, clusters: &[u64]) {
        for c in clusters {
            self.punching.remove(c);
            self.free_hint = self.free_hint.min((*c).max(1));
        }
    }

    /// Whether the table or blocks have changes to write back.
    pub fn is_dirty(&self) -> bool {
        self.blocks.any_dirty() || !self.table_dirty.is_empty() || self.moved
    }

    /// Copies of the dirty refcount blocks, for a write-back.
    pub fn dirty_blocks(&mut self) -> Vec<DirtyTable> {
        self.blocks.dirty_tables()
    }

    /// Marks written blocks clean.
    pub fn blocks_written(&mut self, written: &[DirtyTable]) {
        for t in written {
            self.blocks.mark_clean(t.offset, t.gen);
        }
    }

    /// Takes what of the table a write-back must write.
    pub fn take_table_write(&mut self) -> TableWrite {
        let bytes = u64::from(self.table_at.1) * self.geo.cluster_size;
        if self.moved {
            self.table_dirty.clear();
            let all: Vec<usize> = (0..(bytes as usize).div_ceil(self.unit)).collect();
            let mut out = Vec::with_capacity(bytes as usize);
            for (_, b) in encode_units(&self.table, &all, self.unit, bytes) {
                out.extend_from_slice(&b);
            }
            return TableWrite::Moved {
                offset: self.table_at.0,
                bytes: out,
                gen: self.move_gen,
            };
        }
        if self.table_dirty.is_empty() {
            return TableWrite::Nothing;
        }
        let units: Vec<usize> = std::mem::take(&mut self.table_dirty).into_iter().collect();
        TableWrite::Units(
            self.table_at.0,
            encode_units(&self.table, &units, self.unit, bytes),
        )
    }

    /// Ends the write of `w`: on failure its units are dirty again.
    pub fn table_written(&mut self, w: &TableWrite, ok: bool) {
        match w {
            TableWrite::Nothing => {}
            TableWrite::Units(_, units) if !ok => {
                for (o, _) in units {
                    self.table_dirty.insert(*o as usize / self.unit);
                }
            }
            TableWrite::Units(..) => {}
            TableWrite::Moved { gen, .. } => {
                if ok && *gen == self.move_gen {
                    self.moved = false;
                }
            }
        }
    }

    /// Drops refcount blocks beyond the cache's capacity that are clean; returns whether a
    /// write-back would help the cache shrink (see [`TableCache::wants_writeback`]).
    pub fn trim(&mut self) -> bool {
        self.blocks.trim();
        self.blocks.wants_writeback()
    }
}
