//! The refcount side of [`Meta::check`]: refcount table entries and blocks (reserved bits,
//! unaligned or past the end of the file, shared with other structures) and the comparison of
//! every stored refcount with the references counted, with their repairs.

use std::collections::HashSet;

use crate::error::Result;

use super::check::{CheckReport, Counter, Repair, RT_RESERVED};
use super::meta::{read_table, Meta};

impl Meta {
    /// Counts the refcount blocks. An entry with reserved bits set, or whose block is unaligned
    /// or past the end of the file, is a corruption; `-r all` clears the bits, or drops the
    /// entry (the refcounts it held are rebuilt from the references).
    pub(super) fn count_refcount_blocks(
        &mut self,
        c: &mut Counter,
        r: &mut CheckReport,
        repair: Repair,
    ) {
        let cs = self.geo.cluster_size;
        let fix = repair == Repair::All;
        let mut blocks = HashSet::new();
        for i in 0..self.refs.table().len() {
            let e = self.refs.table()[i];
            if e & RT_RESERVED != 0 {
                r.messages.push(format!(
                    "{} refcount table entry {i} has reserved bits set",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if fix {
                    self.set_reftable_entry(i, e & !RT_RESERVED);
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                }
            }
            let off = e & !RT_RESERVED;
            if off == 0 {
                continue;
            }
            let unaligned = off % cs != 0;
            if unaligned || off.checked_add(cs).is_none_or(|end| end > self.file_len()) {
                r.messages.push(format!(
                    "{} refcount block {i} at {off:#x} {}",
                    if fix { "Repairing" } else { "ERROR" },
                    if unaligned {
                        "is not cluster aligned"
                    } else {
                        "is outside the image"
                    }
                ));
                if fix {
                    self.set_reftable_entry(i, 0);
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                    c.bad_blocks.insert(i);
                    if unaligned {
                        c.count(r, off, cs, 1, "refcount block");
                    }
                }
                continue;
            }
            c.add(r, off, cs, &format!("refcount block {i}"));
            if !blocks.insert(off) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR refcount block {i} at {off:#x} is also another block"
                ));
            }
        }
    }

    /// The refcount table and each refcount block must be referenced once: one that another
    /// structure uses too is a corruption, and `-r all` moves it to free clusters (where
    /// qemu-img rebuilds the whole refcount structure) before any repair writes into the
    /// cluster the other structure sees.
    pub(super) fn unshare_refcount_structures(
        &mut self,
        c: &mut Counter,
        r: &mut CheckReport,
        repair: Repair,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let fix = repair == Repair::All;
        let rt_off = self.header.refcount_table_offset;
        let rt_clusters = u64::from(self.header.refcount_table_clusters);
        if rt_off % cs == 0 && (0..rt_clusters).any(|k| c.refs_of(rt_off / cs + k) > 1) {
            r.messages.push(format!(
                "{} the refcount table at {rt_off:#x} shares clusters with other structures",
                if fix { "Repairing" } else { "ERROR" }
            ));
            if fix {
                self.refs
                    .set_exclude(Some(c.refs.iter().map(|&n| n > 0).collect()));
                let moved = self.alloc_clusters_blocking(rt_clusters);
                self.refs.set_exclude(None);
                let (new, _) = moved?;
                for k in 0..rt_clusters {
                    if let Some(n) = c.refs.get_mut((rt_off / cs + k) as usize) {
                        *n -= 1;
                    }
                    c.count_new(new + k * cs);
                }
                self.header.refcount_table_offset = new;
                self.refs.relocate_table(new);
                self.header_dirty = true;
                self.rebuild_metadata_map();
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
        }
        for i in 0..self.refs.table().len() {
            let old = self.refs.table()[i] & !RT_RESERVED;
            if old == 0 || c.bad_blocks.contains(&i) {
                continue;
            }
            let n = c.refs_of(old / cs);
            if n <= 1 {
                continue;
            }
            r.messages.push(format!(
                "{} refcount block {i} refcount={n}",
                if fix { "Repairing" } else { "ERROR" }
            ));
            if !fix {
                r.corruptions += 1;
                continue;
            }
            self.refs
                .set_exclude(Some(c.refs.iter().map(|&n| n > 0).collect()));
            let moved = self.move_refcount_block(i, old);
            self.refs.set_exclude(None);
            let new = moved?;
            if let Some(n) = c.refs.get_mut((old / cs) as usize) {
                *n -= 1;
            }
            c.count_new(new);
            r.corruptions_fixed += 1;
        }
        Ok(())
    }

    /// Copies refcount block `i` from `old` to a newly allocated cluster and points the
    /// refcount table at the copy; the cluster at `old` is left to its other users.
    pub(super) fn move_refcount_block(&mut self, i: usize, old: u64) -> Result<u64> {
        let (new, _) = self.alloc_clusters_blocking(1)?;
        // The allocation may have counted itself in this very block: copy after it.
        let data = match self.refs.blocks_mut().lookup(old) {
            Some(s) => crate::io::IoBuf::from_slice(self.refs.blocks().bytes(s)),
            None => read_table(self.file.as_ref(), old, self.geo.cluster_size)?,
        };
        // The cluster at `old` belongs to its other users now: no write-back may go there.
        self.refs.blocks_mut().forget(old);
        self.refs.blocks_mut().insert_new(new, data);
        self.refs.set_table_entry(i, new);
        self.rebuild_metadata_map();
        Ok(new)
    }

    /// Sets refcount table entry `i` (which becomes dirty).
    pub(super) fn set_reftable_entry(&mut self, i: usize, value: u64) {
        self.refs.set_table_entry(i, value);
    }

    /// The stored refcount of `cl`; zero where its refcount block is unusable.
    pub(super) fn stored_refcount(&mut self, c: &Counter, cl: u64) -> Result<u64> {
        if c.bad_blocks
            .contains(&((cl / self.geo.rb_entries) as usize))
        {
            return Ok(0);
        }
        self.refcount_blocking(cl)
    }

    pub(super) fn compare_refcounts(
        &mut self,
        c: &Counter,
        r: &mut CheckReport,
        repair: Repair,
    ) -> Result<()> {
        let covered = self.refs.table().len() as u64 * self.geo.rb_entries;
        let end = covered.max(c.refs.len() as u64);
        let mut fixes: Vec<(u64, u64, bool)> = Vec::new();
        let mut cl = 0u64;
        let mut seen_blocks = HashSet::new();
        while cl < end {
            // Past the end of the file, only refcount blocks that exist (each once) can hold
            // anything; all-zero ones hold nothing.
            let ti = (cl / self.geo.rb_entries) as usize;
            let block = self.refs.table().get(ti).map_or(0, |&e| e & !RT_RESERVED);
            let has_block = block != 0 && !c.bad_blocks.contains(&ti);
            if cl >= c.refs.len() as u64 && cl % self.geo.rb_entries == 0 {
                let skip = !has_block
                    || !seen_blocks.insert(block)
                    || self.block_is_zero(block).unwrap_or(false);
                if skip {
                    cl = (ti as u64 + 1) * self.geo.rb_entries;
                    continue;
                }
            }
            let stored = if has_block {
                match self.refcount_blocking(cl) {
                    Ok(v) => v,
                    Err(e) => {
                        r.check_errors += 1;
                        r.messages
                            .push(format!("ERROR reading the refcount of cluster {cl}: {e}"));
                        cl = (ti as u64 + 1) * self.geo.rb_entries;
                        continue;
                    }
                }
            } else {
                0
            };
            let refs = c.refs_of(cl);
            if stored > refs {
                r.messages.push(format!(
                    "Leaked cluster {cl} refcount={stored} reference={refs}"
                ));
                fixes.push((cl, refs, true));
            } else if stored < refs {
                r.messages.push(format!(
                    "ERROR cluster {cl} refcount={stored} reference={refs}"
                ));
                fixes.push((cl, refs, false));
            }
            cl += 1;
        }
        let exclude: Vec<bool> = c.refs.iter().map(|&n| n > 0).collect();
        self.refs.set_exclude(Some(exclude));
        let mut result = Ok(());
        for (cl, refs, leak) in fixes {
            let fix = match repair {
                Repair::None => false,
                Repair::Leaks => leak,
                Repair::All => true,
            };
            // A table the check could not read may use a cluster that looks leaked.
            let fix = fix && !(leak && c.unread_tables > 0);
            if fix {
                if let Err(e) = self.set_refcount_blocking(cl, refs) {
                    result = Err(e);
                    break;
                }
            }
            match (leak, fix) {
                (true, true) => r.leaks_fixed += 1,
                (true, false) => r.leaks += 1,
                (false, true) => r.corruptions_fixed += 1,
                (false, false) => r.corruptions += 1,
            }
        }
        self.refs.set_exclude(None);
        result
    }

    pub(super) fn block_is_zero(&self, offset: u64) -> Result<bool> {
        if offset
            .checked_add(self.geo.cluster_size)
            .is_none_or(|e| e > self.file_len())
        {
            return Ok(false);
        }
        let mut b = vec![0u8; self.geo.cluster_size as usize];
        self.file.read_exact_at(offset, &mut b)?;
        Ok(crate::util::is_zero(&b))
    }
}
