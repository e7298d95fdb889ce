//! The pool's data path: what a thin queue asks under the pool's state lock — lookups for reads,
//! the plan for a write (in place, provision a new block, wait, or no space), mapping a block
//! once its data is written, unmapping, and the end of I/O (see `pool.rs` for the rules).

use crate::error::{Result, StorageError};
use crate::volume::thin::format::{block_of, pack};
use crate::volume::thin::pool::{Dev, PoolState};

/// Data blocks the never-written frontier moves by when a write reaches it (one commit each).
const ZERO_FRONTIER_STEP: u64 = 4096;

/// How a write to one block proceeds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WritePlan {
    /// Another request is provisioning this block, or a snapshot is being taken: retry later.
    Defer,
    /// The block is the device's alone: write in place.
    InPlace {
        /// Data block.
        block: u64,
        /// I/O epoch of the write.
        epoch: u64,
    },
    /// Write the whole block to `new` (after reading `old` for a partial write to a shared
    /// block), then map it.
    Provision {
        /// The new data block.
        new: u64,
        /// The block mapped before, if any.
        old: Option<u64>,
        /// `new` holds zeros: a partial write need only write its own bytes.
        zeroed: bool,
        /// `new` is past the committed never-written frontier: commit before writing it.
        commit_first: bool,
    },
    /// The pool is full; a commit may free blocks that wait for one.
    NoSpace {
        /// Whether committing could help.
        commit_may_help: bool,
    },
}

impl PoolState {
    pub(crate) fn dev(&self, id: u32) -> Result<&Dev> {
        self.devices
            .get(&id)
            .ok_or_else(|| StorageError::NotFound(format!("thin device #{id}").into()))
    }

    pub(crate) fn dev_mut(&mut self, id: u32) -> Result<&mut Dev> {
        self.devices
            .get_mut(&id)
            .ok_or_else(|| StorageError::NotFound(format!("thin device #{id}").into()))
    }

    /// The data block mapped at `vblock` and an I/O epoch for reading it.
    pub(crate) fn lookup_read(&mut self, dev: u32, vblock: u64) -> Result<Option<(u64, u64)>> {
        let root = self.dev(dev)?.entry.root;
        Ok(match self.forest.lookup_value(root, vblock)? {
            Some(v) => Some((block_of(v), self.epochs.begin())),
            None => None,
        })
    }

    /// Whether `vblock` is mapped, and the block if it is the device's alone.
    pub(crate) fn lookup(&self, dev: u32, vblock: u64) -> Result<Option<(u64, bool)>> {
        let root = self.dev(dev)?.entry.root;
        Ok(self
            .forest
            .lookup(root, vblock)?
            .map(|(v, e)| (block_of(v), e)))
    }

    /// Decides how a write to `vblock` proceeds (see [`WritePlan`]).
    pub(crate) fn prepare_write(&mut self, dev: u32, vblock: u64) -> Result<WritePlan> {
        if let Some(f) = &self.failed {
            return Err(StorageError::Unavailable(format!(
                "the thin pool stopped after a failed metadata commit ({f})"
            )));
        }
        if self.provisioning.contains_key(&(dev, vblock)) {
            return Ok(WritePlan::Defer);
        }
        let d = self.dev(dev)?;
        let frozen = d.frozen;
        match self.forest.lookup(d.entry.root, vblock)? {
            Some((v, true)) => {
                if frozen {
                    return Ok(WritePlan::Defer);
                }
                self.dev_mut(dev)?.writes_in_flight += 1;
                let epoch = self.epochs.begin();
                Ok(WritePlan::InPlace {
                    block: block_of(v),
                    epoch,
                })
            }
            other => {
                let new = match self.forest.data.alloc() {
                    Some(b) => b,
                    None => {
                        self.forest.data.release(&self.epochs);
                        match self.forest.data.alloc() {
                            Some(b) => b,
                            None => {
                                return Ok(WritePlan::NoSpace {
                                    commit_may_help: self.forest.data.has_pending(),
                                })
                            }
                        }
                    }
                };
                self.provisioning.insert((dev, vblock), new);
                let zeroed = self.known_zero.get(new);
                self.known_zero.set(new, false);
                if new >= self.zero_from {
                    self.zero_from = (new + ZERO_FRONTIER_STEP).min(self.forest.data.len());
                    self.dirty = true;
                }
                Ok(WritePlan::Provision {
                    new,
                    old: other.map(|(v, _)| block_of(v)),
                    zeroed,
                    commit_first: new >= self.zero_from_durable,
                })
            }
        }
    }

    /// Maps `vblock` to `new` once its data is written.
    pub(crate) fn finish_provision(&mut self, dev: u32, vblock: u64, new: u64) -> Result<()> {
        self.provisioning.remove(&(dev, vblock));
        self.events.fire();
        let tag = self.epochs.retire();
        let birth = self.seq + 1;
        let root = match self.dev(dev) {
            Ok(d) => d.entry.root,
            Err(e) => {
                self.forest.data.dec(new, tag);
                return Err(e);
            }
        };
        match self.forest.insert(root, vblock, pack(new, birth), tag) {
            Ok((root, old)) => {
                let d = self.dev_mut(dev)?;
                d.entry.root = root;
                match old {
                    Some(v) => {
                        self.forest.data.dec(block_of(v), tag);
                    }
                    None => d.entry.mapped += 1,
                }
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                self.forest.data.dec(new, tag);
                Err(e)
            }
        }
    }

    /// Gives up a provisioning whose data write failed.
    pub(crate) fn abort_provision(&mut self, dev: u32, vblock: u64, new: u64) {
        self.provisioning.remove(&(dev, vblock));
        self.events.fire();
        let tag = self.epochs.retire();
        self.forest.data.dec(new, tag);
    }

    /// Unmaps `lo..hi`; `None` if some block in the range is being provisioned (retry later).
    pub(crate) fn unmap(&mut self, dev: u32, lo: u64, hi: u64) -> Result<Option<u64>> {
        if let Some(f) = &self.failed {
            return Err(StorageError::Unavailable(format!(
                "the thin pool stopped after a failed metadata commit ({f})"
            )));
        }
        if self
            .provisioning
            .keys()
            .any(|&(d, b)| d == dev && b >= lo && b < hi)
        {
            return Ok(None);
        }
        let root = self.dev(dev)?.entry.root;
        let tag = self.epochs.retire();
        let (root, removed) = self.forest.remove_range(root, lo, hi, tag)?;
        let d = self.dev_mut(dev)?;
        d.entry.root = root;
        d.entry.mapped = d.entry.mapped.saturating_sub(removed);
        if removed > 0 {
            self.dirty = true;
        }
        Ok(Some(removed))
    }

    /// Ends I/O begun in `epochs`; `writes` in-place writes of `dev` completed.
    pub(crate) fn end_io(&mut self, dev: u32, epochs: &[u64], writes: u64) {
        for &e in epochs {
            self.epochs.end(e);
        }
        if writes > 0 {
            if let Ok(d) = self.dev_mut(dev) {
                d.writes_in_flight = d.writes_in_flight.saturating_sub(writes);
            }
            self.events.fire();
        }
        if self.forest.data.has_draining() {
            self.forest.data.release(&self.epochs);
        }
    }
}
