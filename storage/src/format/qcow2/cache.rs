//! A bounded cache of one-cluster metadata tables (L2 tables, refcount blocks), keyed by host
//! offset, with least-recently-used replacement and dirty tracking.
//!
//! The cache only keeps tables; the ordering rules for writing dirty tables back live with the
//! metadata (`meta.rs`, `writeback.rs`), which asks for a victim, writes it if needed, then
//! inserts. Tables are kept in aligned [`IoBuf`]s so that writing one back can go through
//! O_DIRECT.

use std::collections::HashMap;

use crate::io::IoBuf;

#[derive(Debug)]
struct Slot {
    offset: u64,
    data: IoBuf,
    dirty: bool,
    last_used: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct TableCache {
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    capacity: usize,
    clock: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: Vec::new(),
            index: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// Most tables held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The slot holding the table at `offset`, marking it used.
    pub fn lookup(&mut self, offset: u64) -> Option<usize> {
        let slot = *self.index.get(&offset)?;
        self.clock += 1;
        self.slots[slot].last_used = self.clock;
        Some(slot)
    }

    /// Whether a new table needs a victim evicted first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used slot.
    pub fn victim(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i)
    }

    /// Adds a table; the caller made room. Returns its slot.
    pub fn insert(&mut self, offset: u64, data: IoBuf, dirty: bool) -> usize {
        debug_assert!(!self.index.contains_key(&offset));
        self.clock += 1;
        let slot = self.slots.len();
        self.slots.push(Slot {
            offset,
            data,
            dirty,
            last_used: self.clock,
        });
        self.index.insert(offset, slot);
        slot
    }

    /// Removes the table in `slot`, returning its offset, contents and dirtiness. Other slots'
    /// numbers may change.
    pub fn remove(&mut self, slot: usize) -> (u64, IoBuf, bool) {
        let s = self.slots.swap_remove(slot);
        self.index.remove(&s.offset);
        if slot < self.slots.len() {
            let moved = self.slots[slot].offset;
            self.index.insert(moved, slot);
        }
        (s.offset, s.data, s.dirty)
    }

    /// Drops the table at `offset` if cached (its cluster was freed); dirty contents are lost.
    pub fn forget(&mut self, offset: u64) {
        if let Some(&slot) = self.index.get(&offset) {
            self.remove(slot);
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

    /// Mutable contents of the table in `slot`, which becomes dirty.
    pub fn bytes_mut(&mut self, slot: usize) -> &mut [u8] {
        let s = &mut self.slots[slot];
        s.dirty = true;
        s.data.as_mut_slice().unwrap_or(&mut [])
    }

    /// Whether the table in `slot` has unwritten changes.
    pub fn is_dirty(&self, slot: usize) -> bool {
        self.slots[slot].dirty
    }

    /// Marks the table in `slot` written.
    pub fn mark_clean(&mut self, slot: usize) {
        self.slots[slot].dirty = false;
    }

    /// Slots with unwritten changes, in offset order.
    pub fn dirty_slots(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty)
            .collect();
        v.sort_by_key(|&i| self.slots[i].offset);
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// Drops every table (after the metadata was rewritten as a whole).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_and_keeps_the_index_right() {
        let mut c = TableCache::new(3);
        for off in [100u64, 200, 300] {
            c.insert(off, IoBuf::new(512), false);
        }
        assert!(c.is_full());
        c.lookup(100);
        let v = c.victim().unwrap();
        assert_eq!(c.offset(v), 200);
        c.remove(v);
        let s = c.lookup(300).unwrap();
        assert_eq!(c.offset(s), 300);
        c.bytes_mut(s)[0] = 1;
        assert_eq!(c.dirty_slots(), vec![s]);
        c.forget(100);
        assert!(c.lookup(100).is_none());
        assert!(c.lookup(300).is_some());
    }
}
