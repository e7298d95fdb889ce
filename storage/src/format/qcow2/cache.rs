//! A bounded cache of one-cluster metadata tables (L2 tables, refcount blocks), keyed by host
//! offset, with least-recently-used replacement, dirty tracking and loads in flight.
//!
//! Invariants, kept by this type alone:
//! - only clean tables are ever dropped ([`TableCache::trim`]); a dirty one stays until a
//!   write-back marks it clean — and only the version that write-back copied
//!   ([`TableCache::mark_clean`] compares a per-change generation), so a table changed while its
//!   write was in flight stays dirty;
//! - a table pinned by an allocation in flight is never dropped, nor one read for a waiting
//!   operation before that operation looked it up (else a cache full of dirty tables would drop
//!   every table it reads at once, and the operation would wait for it forever);
//! - nothing is dropped in the middle of an operation: inserting never evicts, trimming is done
//!   once an operation is over, so slot numbers stay valid within one operation;
//! - a load in flight (the I/O runs outside the metadata lock) is inserted only if nothing was
//!   inserted or forgotten at its offset meanwhile ([`TableCache::finish_load`]), so a stale
//!   read can never replace a newer table.
//!
//! Above its capacity the cache keeps growing with tables it cannot drop (all dirty or pinned);
//! when the tables a write-back would let it drop (neither pinned nor kept for a waiting
//! operation) reach twice its capacity, operations stop and ask for one
//! ([`TableCache::over_limit`]).
//! Tables are kept in aligned [`IoBuf`]s so that writing one back can go through O_DIRECT.
//!
//! A dirty table also records which of its granules changed (4 KiB, or 1/64 of a table of more
//! than 256 KiB; a table of at most 4 KiB is one granule): a write-back copies and writes only
//! those. A guest write that allocates one cluster changes one 8-byte L2 entry, and writing
//! the whole 64 KiB table back for it made flushes write sixteen times the data they covered.
//! Each entry lies within one granule, so on disk every entry is either old or new, as with
//! whole-table writes.
//!
//! The granules a write-back copied move out of the changed set at the copy
//! ([`TableCache::dirty_tables`]): a table that keeps changing while write-backs run (every
//! table of an image taking random writes does) is written next time for its new changes only,
//! not for everything since it was last wholly clean, which grew every such table to whole-table
//! writes. A failed write-back puts them back ([`TableCache::copy_failed`]).

use std::collections::HashMap;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::io::stack::wake::Waiters;
use crate::io::IoBuf;

#[derive(Debug)]
struct Slot {
    offset: u64,
    data: IoBuf,
    /// The generation of the last change not yet written back.
    dirty: Option<u64>,
    /// Granules changed since the last write-back copy (bit *i*: granule *i*).
    granules: u64,
    /// Granules in the copy of a write-back not finished yet.
    copied: u64,
    last_used: u64,
    pins: u32,
    /// Read for a waiting operation and not looked up since: kept until it is.
    fresh: bool,
}

#[derive(Debug, Default)]
struct Loading {
    waiters: Waiters,
    /// Cleared when the offset was inserted or forgotten while the load ran.
    valid: bool,
}

/// A dirty table copied for a write-back.
#[derive(Debug)]
pub struct DirtyTable {
    /// Host offset of the table.
    pub offset: u64,
    /// The changed parts as copied: runs of changed granules, by host offset.
    pub pieces: Vec<(u64, IoBuf)>,
    /// The change generation copied.
    pub gen: u64,
}

/// Bytes per dirty granule of a table of `len` bytes (see the module documentation).
fn granule(len: usize) -> usize {
    if len <= 4096 {
        len.max(1)
    } else {
        (len / 64).max(4096)
    }
}

/// The granule bits covering `len` bytes at `at` of a table of `table_len` bytes.
fn granule_bits(table_len: usize, at: usize, len: usize) -> u64 {
    let g = granule(table_len);
    let first = at / g;
    let last = (at + len.max(1) - 1) / g;
    (first..=last.min(63)).fold(0, |m, i| m | 1 << i)
}

/// Copies the runs of granules set in `bits` of `data`, a table at host offset `offset`.
fn dirty_runs(offset: u64, data: &[u8], bits: u64) -> Vec<(u64, IoBuf)> {
    let g = granule(data.len());
    let count = data.len().div_ceil(g).min(64);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < count {
        if bits >> i & 1 == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < count && bits >> i & 1 == 1 {
            i += 1;
        }
        let (from, to) = (start * g, (i * g).min(data.len()));
        runs.push((offset + from as u64, IoBuf::from_slice(&data[from..to])));
    }
    runs
}

/// See the module documentation.
#[derive(Debug)]
pub struct TableCache {
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    loading: HashMap<u64, Loading>,
    capacity: usize,
    clock: u64,
    changes: u64,
    /// Slots with pins.
    pinned: usize,
    /// Slots kept for a waiting operation (`Slot::fresh`).
    fresh: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables it may drop (at least 2).
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: Vec::new(),
            index: HashMap::new(),
            loading: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
            changes: 0,
            pinned: 0,
            fresh: 0,
        }
    }

    /// Tables the cache keeps before it drops clean ones.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tables held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no table is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Tables a write-back would let the cache drop (neither pinned nor kept for a waiting
    /// operation).
    fn droppable(&self) -> usize {
        self.slots.len().saturating_sub(self.pinned + self.fresh)
    }

    /// Whether the cache holds half its capacity again in tables a write-back would let it
    /// drop: time to ask for one, before operations have to wait.
    pub fn wants_writeback(&self) -> bool {
        self.droppable() >= self.capacity + self.capacity / 2
    }

    /// Whether the cache holds twice its capacity in tables a write-back would let it drop:
    /// operations must wait for one.
    pub fn over_limit(&self) -> bool {
        self.droppable() >= self.capacity * 2
    }

    /// The slot holding the table at `offset`, marking it used.
    pub fn lookup(&mut self, offset: u64) -> Option<usize> {
        let slot = *self.index.get(&offset)?;
        self.clock += 1;
        let s = &mut self.slots[slot];
        s.last_used = self.clock;
        if std::mem::take(&mut s.fresh) {
            self.fresh -= 1;
        }
        Some(slot)
    }

    /// Whether the table at `offset` is held.
    pub fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    fn invalidate_load(&mut self, offset: u64) {
        if let Some(l) = self.loading.get_mut(&offset) {
            l.valid = false;
        }
    }

    fn push(&mut self, offset: u64, data: IoBuf, dirty: Option<u64>) -> usize {
        self.invalidate_load(offset);
        self.clock += 1;
        let slot = self.slots.len();
        if dirty.is_none() {
            self.fresh += 1;
        }
        self.slots.push(Slot {
            offset,
            data,
            fresh: dirty.is_none(),
            granules: if dirty.is_some() { u64::MAX } else { 0 },
            copied: 0,
            dirty,
            last_used: self.clock,
            pins: 0,
        });
        self.index.insert(offset, slot);
        slot
    }

    /// Adds a table made in memory (a new L2 table or refcount block), dirty. The caller made
    /// sure none is held at `offset`.
    pub fn insert_new(&mut self, offset: u64, data: IoBuf) -> usize {
        if let Some(&slot) = self.index.get(&offset) {
            // Cannot happen for a free cluster; keep the cache consistent anyway.
            if std::mem::take(&mut self.slots[slot].fresh) {
                self.fresh -= 1;
            }
            self.slots[slot].data = data;
            self.changes += 1;
            self.slots[slot].dirty = Some(self.changes);
            self.slots[slot].granules = u64::MAX;
            return slot;
        }
        self.changes += 1;
        let gen = self.changes;
        self.push(offset, data, Some(gen))
    }

    /// Adds a table read from disk (clean) unless one is held at `offset` already.
    pub fn insert_loaded(&mut self, offset: u64, data: IoBuf) -> usize {
        match self.index.get(&offset) {
            Some(&slot) => slot,
            None => self.push(offset, data, None),
        }
    }

    /// Registers interest in loading the table at `offset`, waking `waker` when it is in.
    /// Returns whether the caller must read it (nobody else is).
    pub fn begin_load(&mut self, offset: u64, waker: Option<&Arc<EventFd>>) -> bool {
        let mut first = false;
        let l = self.loading.entry(offset).or_insert_with(|| {
            first = true;
            Loading {
                waiters: Waiters::default(),
                valid: true,
            }
        });
        if let Some(w) = waker {
            l.waiters.add(w);
        }
        first
    }

    /// Ends the load of `offset`: inserts `data` (`None`: the read failed) if the load is still
    /// valid and nothing is held there, and returns whom to wake.
    pub(crate) fn finish_load(&mut self, offset: u64, data: Option<IoBuf>) -> Waiters {
        let Some(l) = self.loading.remove(&offset) else {
            return Waiters::default();
        };
        if let Some(d) = data.filter(|_| l.valid) {
            self.insert_loaded(offset, d);
        }
        l.waiters
    }

    /// Pins the table at `offset` (an allocation in flight will change it).
    pub fn pin(&mut self, offset: u64) {
        if let Some(&slot) = self.index.get(&offset) {
            let s = &mut self.slots[slot];
            if s.pins == 0 {
                self.pinned += 1;
            }
            s.pins += 1;
        }
    }

    /// Undoes one [`TableCache::pin`].
    pub fn unpin(&mut self, offset: u64) {
        if let Some(&slot) = self.index.get(&offset) {
            let s = &mut self.slots[slot];
            if s.pins == 1 {
                self.pinned -= 1;
            }
            s.pins = s.pins.saturating_sub(1);
        }
    }

    /// Host offset of the table in `slot`.
    pub fn offset(&self, slot: usize) -> u64 {
        self.slots[slot].offset
    }

    /// Contents of the table in `slot`.
    pub fn bytes(&self, slot: usize) -> &[u8] {
        self.slots[slot].data.as_slice().unwrap_or(&[])
    }

    /// Mutable contents of the table in `slot`, which becomes dirty; the caller changes only
    /// the `len` bytes at `at`.
    pub fn bytes_mut(&mut self, slot: usize, at: usize, len: usize) -> &mut [u8] {
        self.changes += 1;
        let s = &mut self.slots[slot];
        s.dirty = Some(self.changes);
        s.granules |= granule_bits(s.data.len(), at, len);
        s.data.as_mut_slice().unwrap_or(&mut [])
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty.is_some())
    }

    /// Copies of the dirty tables, in offset order, for a write-back. Their changed granules
    /// count as copied from now on: [`TableCache::mark_clean`] forgets them once written,
    /// [`TableCache::copy_failed`] makes them changed again.
    pub fn dirty_tables(&mut self) -> Vec<DirtyTable> {
        let mut v: Vec<DirtyTable> = self
            .slots
            .iter_mut()
            .filter_map(|s| {
                let gen = s.dirty?;
                s.copied |= std::mem::take(&mut s.granules);
                Some(DirtyTable {
                    offset: s.offset,
                    pieces: dirty_runs(s.offset, s.data.as_slice().unwrap_or(&[]), s.copied),
                    gen,
                })
            })
            .collect();
        v.sort_by_key(|t| t.offset);
        v
    }

    /// Records that the write-back copy of the table at `offset`, made at generation `gen`, is
    /// on disk: the table is clean if nothing changed since, else dirty for what changed since.
    pub fn mark_clean(&mut self, offset: u64, gen: u64) {
        if let Some(&slot) = self.index.get(&offset) {
            let s = &mut self.slots[slot];
            s.copied = 0;
            if s.dirty == Some(gen) {
                s.dirty = None;
                s.granules = 0;
            }
        }
    }

    /// A write-back failed (or was not started): what it copied is changed again.
    pub fn copy_failed(&mut self) {
        for s in &mut self.slots {
            s.granules |= std::mem::take(&mut s.copied);
        }
    }

    fn remove(&mut self, slot: usize) {
        let s = self.slots.swap_remove(slot);
        if s.fresh {
            self.fresh -= 1;
        }
        if s.pins > 0 {
            self.pinned -= 1;
        }
        self.index.remove(&s.offset);
        if slot < self.slots.len() {
            let moved = self.slots[slot].offset;
            self.index.insert(moved, slot);
        }
    }

    /// Drops the table at `offset` if held (its cluster was freed; dirty contents are lost),
    /// and makes a load of it in flight void.
    pub fn forget(&mut self, offset: u64) {
        self.invalidate_load(offset);
        if let Some(&slot) = self.index.get(&offset) {
            self.remove(slot);
        }
    }

    /// Drops clean, unpinned tables, least recently used first, until at most `capacity` are
    /// held. Returns whether that was reached.
    ///
    /// One pass over the slots whatever the excess: after a write-back cleans hundreds of tables
    /// at once, picking victims one scan each would cost the excess times the cache's size under
    /// the metadata lock.
    pub fn trim(&mut self) -> bool {
        let excess = self.slots.len().saturating_sub(self.capacity);
        if excess == 0 {
            return true;
        }
        let droppable = |s: &Slot| s.dirty.is_none() && s.pins == 0 && !s.fresh;
        if excess == 1 {
            // The steady state (one table read, one dropped): no list to build.
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| droppable(s))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            return match victim {
                Some(v) => {
                    self.remove(v);
                    true
                }
                None => false,
            };
        }
        // (last use, offset): offsets, because removing a slot moves another into its place.
        let mut victims: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|s| droppable(s))
            .map(|s| (s.last_used, s.offset))
            .collect();
        if victims.len() > excess {
            victims.select_nth_unstable(excess - 1);
            victims.truncate(excess);
        }
        for (_, offset) in victims {
            if let Some(&slot) = self.index.get(&offset) {
                self.remove(slot);
            }
        }
        self.slots.len() <= self.capacity
    }

    /// Lets tables read for waiting operations be dropped again (a write-back ran since: their
    /// operations had their chance).
    pub fn unprotect(&mut self) {
        for s in &mut self.slots {
            s.fresh = false;
        }
        self.fresh = 0;
    }

    /// Drops every table (after the metadata was rewritten as a whole).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.pinned = 0;
        self.fresh = 0;
        for l in self.loading.values_mut() {
            l.valid = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_clean_unpinned_tables_least_recently_used_first() {
        let mut c = TableCache::new(2);
        for off in [100u64, 200, 300] {
            c.insert_loaded(off, IoBuf::new(512));
        }
        assert!(!c.trim(), "tables read and not yet used are kept");
        c.lookup(200);
        c.lookup(300);
        c.lookup(100);
        assert!(c.trim());
        assert!(c.contains(100) && c.contains(300) && !c.contains(200));
        let s = c.lookup(300).unwrap();
        c.bytes_mut(s, 0, 1)[0] = 1;
        c.pin(100);
        c.insert_new(400, IoBuf::new(512));
        assert!(!c.trim(), "all held tables are dirty or pinned");
        assert_eq!(c.len(), 3);
        c.unpin(100);
        assert!(c.trim());
        assert!(!c.contains(100));
    }

    #[test]
    fn one_trim_drops_a_large_excess_least_recently_used_first() {
        let mut c = TableCache::new(4);
        for off in 0..40u64 {
            c.insert_loaded(off * 512, IoBuf::new(512));
        }
        // Used in a scrambled order; offsets 7 * 512 and 21 * 512 are dirtied and 9 * 512
        // pinned, so none of the three may go however old.
        for i in 0..40u64 {
            c.lookup((i * 17 % 40) * 512);
        }
        for off in [7u64, 21] {
            let s = c.lookup(off * 512).unwrap();
            c.bytes_mut(s, 0, 1)[0] = 1;
        }
        c.pin(9 * 512);
        for off in [3u64, 5, 11, 13] {
            c.lookup(off * 512);
        }
        assert!(c.trim());
        let kept: Vec<u64> = (0..40u64).filter(|o| c.contains(o * 512)).collect();
        assert_eq!(
            kept,
            vec![7, 9, 13, 21],
            "the three it may not drop, and the most recently used of the rest"
        );
    }

    #[test]
    fn a_write_back_cleans_only_the_version_it_copied() {
        let mut c = TableCache::new(4);
        let s = c.insert_new(100, IoBuf::new(512));
        c.bytes_mut(s, 0, 1)[0] = 1;
        let copy = c.dirty_tables();
        assert_eq!(copy.len(), 1);
        c.bytes_mut(s, 0, 1)[0] = 2;
        c.mark_clean(100, copy[0].gen);
        assert!(c.any_dirty());
        let copy = c.dirty_tables();
        c.mark_clean(100, copy[0].gen);
        assert!(!c.any_dirty());
    }

    #[test]
    fn a_write_back_copies_only_the_changed_granules() {
        let mut c = TableCache::new(4);
        let s = c.insert_loaded(1 << 20, IoBuf::new(64 << 10));
        assert!(c.dirty_tables().is_empty());
        c.bytes_mut(s, 8, 8)[8] = 1;
        c.bytes_mut(s, 4096 * 3 + 4088, 16)[4096 * 3 + 4088] = 2;
        c.bytes_mut(s, 4096 * 15, 8)[4096 * 15] = 3;
        let copy = c.dirty_tables();
        let runs: Vec<(u64, usize)> = copy[0].pieces.iter().map(|(o, b)| (*o, b.len())).collect();
        let base = 1u64 << 20;
        assert_eq!(
            runs,
            vec![
                (base, 4096),
                (base + 3 * 4096, 2 * 4096),
                (base + 15 * 4096, 4096)
            ],
            "entries 8 bytes into granule 0, across granules 3 and 4, and in granule 15"
        );
        assert_eq!(copy[0].pieces[1].1.as_slice().unwrap()[4088], 2);
        c.mark_clean(1 << 20, copy[0].gen);
        assert!(!c.any_dirty());
        c.bytes_mut(s, 100, 8);
        assert_eq!(
            c.dirty_tables()[0].pieces.len(),
            1,
            "cleaning forgot the old granules"
        );

        // A new table, and a table of one granule, are written whole.
        c.insert_new(2 << 20, IoBuf::new(64 << 10));
        let s = c.insert_loaded(3 << 20, IoBuf::new(2048));
        c.bytes_mut(s, 1000, 8);
        let lens: Vec<usize> = c
            .dirty_tables()
            .iter()
            .filter(|t| t.offset != 1 << 20)
            .map(|t| t.pieces.iter().map(|p| p.1.len()).sum())
            .collect();
        assert_eq!(lens, vec![64 << 10, 2048]);
    }

    fn copied_lens(c: &mut TableCache) -> Vec<(u64, usize)> {
        c.dirty_tables()[0]
            .pieces
            .iter()
            .map(|(o, b)| (*o, b.len()))
            .collect()
    }

    /// A cache holding one 64 KiB table at `base` with its first granule changed, and that
    /// table's slot.
    fn one_changed_table(base: u64) -> (TableCache, usize) {
        let mut c = TableCache::new(4);
        let s = c.insert_loaded(base, IoBuf::new(64 << 10));
        c.bytes_mut(s, 0, 8);
        (c, s)
    }

    #[test]
    fn a_table_changed_during_its_write_back_writes_only_the_new_changes_next_time() {
        let base = 1u64 << 20;
        let (mut c, s) = one_changed_table(base);
        let first = c.dirty_tables();
        // Changed while the copy is being written: stays dirty.
        c.bytes_mut(s, 4096 * 7, 8);
        c.mark_clean(base, first[0].gen);
        assert!(
            c.any_dirty(),
            "a change made during the write-back was forgotten"
        );
        assert_eq!(
            copied_lens(&mut c),
            vec![(base + 7 * 4096, 4096)],
            "granule 0 was written already and must not be written again"
        );
    }

    #[test]
    fn a_failed_write_back_leaves_every_granule_it_copied_to_write_again() {
        let base = 1u64 << 20;
        let (mut c, s) = one_changed_table(base);
        let _lost = c.dirty_tables();
        c.bytes_mut(s, 4096 * 2, 8);
        c.copy_failed();
        assert_eq!(
            copied_lens(&mut c),
            vec![(base, 4096), (base + 2 * 4096, 4096)]
        );
    }

    #[test]
    fn a_load_overtaken_by_an_insert_or_forget_is_dropped() {
        let mut c = TableCache::new(4);
        assert!(c.begin_load(100, None));
        assert!(!c.begin_load(100, None));
        c.insert_new(100, IoBuf::from_slice(&[7; 512]));
        c.finish_load(100, Some(IoBuf::new(512)));
        let s = c.lookup(100).unwrap();
        assert_eq!(c.bytes(s)[0], 7);

        assert!(c.begin_load(200, None));
        c.forget(200);
        c.finish_load(200, Some(IoBuf::new(512)));
        assert!(!c.contains(200));

        assert!(c.begin_load(300, None));
        c.finish_load(300, Some(IoBuf::new(512)));
        assert!(c.contains(300));
    }
}
