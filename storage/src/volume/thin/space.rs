//! Space accounting for a thin pool: reference counts of data blocks and metadata blocks, and
//! when a freed block may be used again.
//!
//! Counts live in memory only: they are derived from the trees when a pool is opened (see
//! `pool.rs` for why), then maintained as trees change. A block whose count drops to zero is
//! not reusable at once:
//! - a block the last committed transaction still references stays *pending* until the next
//!   commit is durable — otherwise a crash could bring back metadata pointing at reused data;
//! - a data block may still be the target of a read or write that looked it up before it was
//!   freed; it is tagged with an I/O epoch and *drains* until every operation begun in that
//!   epoch or earlier has completed.

use std::collections::{BTreeMap, VecDeque};

/// A fixed-size set of bits.
#[derive(Clone, Debug, Default)]
pub(crate) struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub(crate) fn new(bits: u64) -> BitSet {
        BitSet {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub(crate) fn grow(&mut self, bits: u64) {
        self.words.resize(bits.div_ceil(64) as usize, 0);
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub(crate) fn set(&mut self, i: u64, on: bool) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    pub(crate) fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Indexes of the set bits, in order.
    pub(crate) fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                out.push(wi as u64 * 64 + b);
                w &= w - 1;
            }
        }
        out
    }
}

/// Counts of operations in flight per I/O epoch. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Epochs {
    current: u64,
    in_flight: BTreeMap<u64, u64>,
}

impl Epochs {
    /// Records an operation starting now; returns its epoch.
    pub(crate) fn begin(&mut self) -> u64 {
        *self.in_flight.entry(self.current).or_insert(0) += 1;
        self.current
    }

    /// Records the end of an operation begun in `epoch`.
    pub(crate) fn end(&mut self, epoch: u64) {
        if let Some(n) = self.in_flight.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&epoch);
            }
        }
    }

    /// A tag for blocks freed now: operations begun from here on cannot reach them.
    pub(crate) fn retire(&mut self) -> u64 {
        let e = self.current;
        self.current += 1;
        e
    }

    /// Whether every operation begun in epoch `tag` or earlier has completed.
    pub(crate) fn drained(&self, tag: u64) -> bool {
        self.in_flight
            .keys()
            .next()
            .is_none_or(|&oldest| oldest > tag)
    }
}

/// Where allocation looks for a free block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AllocPolicy {
    /// After the last block allocated, wrapping around: sequential layout (the default).
    #[default]
    NextFit,
    /// The lowest free block: reuses freed blocks as soon as the rules allow (tests use it to
    /// stress those rules).
    LowestFirst,
}

/// Reference counts and reuse rules for one kind of block. See the module documentation.
#[derive(Debug)]
pub(crate) struct Space {
    refs: Vec<u32>,
    /// Count is zero but the block may not be reused yet.
    held: BitSet,
    /// Allocated since the last commit began: no durable metadata refers to it.
    fresh: BitSet,
    /// Freed blocks the durable metadata still references: `(tag, block)`.
    pending: Vec<(u64, u64)>,
    /// Pending blocks of the commit in progress.
    committing: Vec<(u64, u64)>,
    /// Freed blocks waiting for I/O of their epoch to complete: `(tag, block)`.
    draining: VecDeque<(u64, u64)>,
    used: u64,
    held_count: u64,
    cursor: u64,
    pub(crate) policy: AllocPolicy,
    /// Whether blocks are data blocks (which drain) rather than metadata (which only wait for
    /// a commit: no I/O ever targets them outside one).
    drains: bool,
}

impl Space {
    /// `n` free blocks; `drains` for data blocks.
    pub(crate) fn new(n: u64, drains: bool) -> Space {
        Space {
            refs: vec![0; n as usize],
            held: BitSet::new(n),
            fresh: BitSet::new(n),
            pending: Vec::new(),
            committing: Vec::new(),
            draining: VecDeque::new(),
            used: 0,
            held_count: 0,
            cursor: 0,
            policy: AllocPolicy::NextFit,
            drains,
        }
    }

    /// Blocks in total.
    pub(crate) fn len(&self) -> u64 {
        self.refs.len() as u64
    }

    /// Blocks referenced.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Blocks that can be allocated now.
    pub(crate) fn free(&self) -> u64 {
        self.len() - self.used - self.held_count
    }

    /// Blocks freed but not yet reusable.
    pub(crate) fn held(&self) -> u64 {
        self.held_count
    }

    /// Adds blocks at the end.
    pub(crate) fn grow(&mut self, n: u64) {
        if n > self.len() {
            self.refs.resize(n as usize, 0);
            self.held.grow(n);
            self.fresh.grow(n);
        }
    }

    /// Reference count of `b`.
    pub(crate) fn refs(&self, b: u64) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }

    /// Whether `b` was allocated since the last commit began.
    pub(crate) fn is_fresh(&self, b: u64) -> bool {
        self.fresh.get(b)
    }

    /// Blocks allocated since the last commit began.
    pub(crate) fn fresh_blocks(&self) -> Vec<u64> {
        self.fresh.ones()
    }

    /// Takes a free block (count 1, fresh).
    pub(crate) fn alloc(&mut self) -> Option<u64> {
        if self.free() == 0 {
            return None;
        }
        let n = self.len();
        if self.policy == AllocPolicy::LowestFirst {
            self.cursor = 0;
        }
        for i in 0..n {
            let b = (self.cursor + i) % n;
            if self.refs[b as usize] == 0 && !self.held.get(b) {
                self.refs[b as usize] = 1;
                self.used += 1;
                self.fresh.set(b, true);
                self.cursor = (b + 1) % n;
                return Some(b);
            }
        }
        None
    }

    /// Marks `b` used with one reference while loading (never fresh).
    pub(crate) fn load_ref(&mut self, b: u64) {
        if let Some(r) = self.refs.get_mut(b as usize) {
            if *r == 0 {
                self.used += 1;
            }
            *r += 1;
        }
    }

    /// Adds a reference to `b`.
    pub(crate) fn inc(&mut self, b: u64) {
        if let Some(r) = self.refs.get_mut(b as usize) {
            *r += 1;
        }
    }

    /// Drops a reference to `b`; returns true when it was the last. A freed block becomes
    /// reusable as the module documentation describes; `tag` is the epoch of the freeing.
    pub(crate) fn dec(&mut self, b: u64, tag: u64) -> bool {
        let Some(r) = self.refs.get_mut(b as usize) else {
            return false;
        };
        if *r == 0 {
            return false;
        }
        *r -= 1;
        if *r > 0 {
            return false;
        }
        self.used -= 1;
        let fresh = self.fresh.get(b);
        self.fresh.set(b, false);
        if fresh && !self.drains {
            return true;
        }
        self.held.set(b, true);
        self.held_count += 1;
        if fresh {
            self.draining.push_back((tag, b));
        } else {
            self.pending.push((tag, b));
        }
        true
    }

    /// Starts a commit: what is fresh now will be referenced by the new transaction, and what
    /// is pending now is freed by it.
    pub(crate) fn begin_commit(&mut self) {
        self.fresh.clear_all();
        self.committing.append(&mut self.pending);
    }

    /// Ends a commit: on success its freed blocks drain (data) or become free (metadata); on
    /// failure they stay held.
    pub(crate) fn end_commit(&mut self, ok: bool) {
        if !ok {
            self.pending.append(&mut self.committing);
            return;
        }
        for (tag, b) in std::mem::take(&mut self.committing) {
            if self.drains {
                self.draining.push_back((tag, b));
            } else {
                self.held.set(b, false);
                self.held_count -= 1;
            }
        }
    }

    /// Makes drained blocks reusable.
    pub(crate) fn release(&mut self, epochs: &Epochs) {
        let mut kept = VecDeque::new();
        while let Some((tag, b)) = self.draining.pop_front() {
            if epochs.drained(tag) {
                self.held.set(b, false);
                self.held_count -= 1;
            } else {
                kept.push_back((tag, b));
            }
        }
        self.draining = kept;
    }

    /// Whether some freed blocks wait for a commit.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether some freed blocks wait for I/O to drain.
    pub(crate) fn has_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// Whether `b` is held (freed, not yet reusable).
    pub(crate) fn is_held(&self, b: u64) -> bool {
        self.held.get(b)
    }

    /// Reserves block `b` permanently (the superblocks).
    pub(crate) fn reserve(&mut self, b: u64) {
        self.load_ref(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_block_is_reusable_only_after_the_next_commit_and_drain() {
        let mut s = Space::new(2, true);
        let mut ep = Epochs::default();
        let a = s.alloc().unwrap();
        s.begin_commit();
        s.end_commit(true);
        let io = ep.begin();
        let tag = ep.retire();
        assert!(s.dec(a, tag));
        assert_eq!(s.free(), 1);
        let b = s.alloc().unwrap();
        assert_ne!(a, b);
        assert!(s.alloc().is_none());
        s.begin_commit();
        s.end_commit(true);
        s.release(&ep);
        assert!(
            s.alloc().is_none(),
            "an operation from before the free is in flight"
        );
        ep.end(io);
        s.release(&ep);
        assert_eq!(s.alloc(), Some(a));
    }

    #[test]
    fn fresh_metadata_blocks_are_reusable_at_once() {
        let mut s = Space::new(1, false);
        let a = s.alloc().unwrap();
        assert!(s.dec(a, 0));
        assert_eq!(s.alloc(), Some(a));
        assert_eq!(BitSet::new(130).ones(), Vec::<u64>::new());
    }
}
