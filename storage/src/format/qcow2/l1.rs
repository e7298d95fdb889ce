//! The active L1 table in memory, and which of its write units changed since it was last
//! written back.
//!
//! Invariant: every entry changed since the last successful write-back lies in a unit listed as
//! dirty. A write-back takes the dirty units ([`L1Table::take_dirty`]) and gives them back if it
//! fails ([`L1Table::redirty`]); a change made while it runs dirties its unit again.

use std::collections::BTreeSet;

use super::meta::encode_units;

/// See the module documentation.
#[derive(Debug)]
pub struct L1Table {
    entries: Vec<u64>,
    dirty: BTreeSet<usize>,
    /// Bytes per write unit.
    unit: usize,
}

impl L1Table {
    /// A clean table with `entries`, written back in units of `unit` bytes.
    pub fn new(entries: Vec<u64>, unit: usize) -> L1Table {
        L1Table {
            entries,
            dirty: BTreeSet::new(),
            unit,
        }
    }

    /// The entries.
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// Entry `i` (0 past the end).
    pub fn get(&self, i: usize) -> u64 {
        self.entries.get(i).copied().unwrap_or(0)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sets entry `i` (which must exist), dirtying its unit.
    pub fn set(&mut self, i: usize, value: u64) {
        if let Some(e) = self.entries.get_mut(i) {
            *e = value;
            self.dirty.insert(i * 8 / self.unit);
        }
    }

    /// Replaces the whole table with one already on disk (clean).
    pub fn replace(&mut self, entries: Vec<u64>) {
        self.entries = entries;
        self.dirty.clear();
    }

    /// Whether any unit is dirty.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Takes the dirty units for a write-back: `(byte offset in the table, bytes)` per unit,
    /// never reaching past `limit_bytes`.
    pub fn take_dirty(&mut self, limit_bytes: u64) -> Vec<(u64, Vec<u8>)> {
        let units: Vec<usize> = std::mem::take(&mut self.dirty).into_iter().collect();
        encode_units(&self.entries, &units, self.unit, limit_bytes)
    }

    /// Marks units dirty again after a failed write-back (`offsets` from
    /// [`L1Table::take_dirty`]).
    pub fn redirty(&mut self, offsets: impl IntoIterator<Item = u64>) {
        for o in offsets {
            self.dirty.insert(o as usize / self.unit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_units_are_written_and_given_back_on_failure() {
        let mut t = L1Table::new(vec![0; 128], 512);
        t.set(70, 0x1234);
        assert!(t.is_dirty());
        let units = t.take_dirty(1024);
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].0, 512);
        assert_eq!(&units[0].1[6 * 8..7 * 8], &0x1234u64.to_be_bytes());
        assert!(!t.is_dirty());
        t.redirty(units.iter().map(|u| u.0));
        assert!(t.is_dirty());
    }
}
