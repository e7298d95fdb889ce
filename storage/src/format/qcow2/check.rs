//! Consistency check and repair, with `qemu-img check`'s findings and exit-code meaning.
//!
//! Every structure that holds a reference (header, L1 tables of the image and its snapshots, L2
//! tables, data and compressed clusters, refcount table and blocks, snapshot table, bitmaps) is
//! counted into an in-memory reference array, which is compared with the stored refcounts:
//! a refcount above its references is a leak, below is a corruption. The copied flags of the
//! active tables must say "refcount is one" exactly when it is. Repair sets refcounts to the
//! references (leaks only, or everything) and fixes copied flags; new refcount blocks that repair
//! needs never land on a referenced cluster.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::{Result, StorageError};

use super::entry::{L2Entry, COPIED, OFFSET_MASK};
use super::header::{autoclear, ext, incompat};
use crate::bytes::{be16, be32, be64};

use super::meta::{l1_entry_offset, read_u64_table, Meta};

/// Most clusters a check counts (4 GiB of reference counters at most).
const MAX_CHECK_CLUSTERS: u64 = 1 << 30;

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and corruptions we know how to fix.
    All,
}

/// Findings, named as `qemu-img check --output json` names them.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The image.
    pub filename: String,
    /// Always "qcow2".
    pub format: String,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Corruptions left.
    pub corruptions: u64,
    /// Leaked clusters left.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters with data.
    pub allocated_clusters: u64,
    /// Guest clusters in all.
    pub total_clusters: u64,
    /// Allocated guest clusters not following their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last used host cluster.
    pub image_end_offset: u64,
    /// One line per finding.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check incomplete, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

struct Counter {
    refs: Vec<u32>,
    cs: u64,
}

impl Counter {
    fn add(&mut self, r: &mut CheckReport, offset: u64, len: u64, what: &str) {
        self.add_n(r, offset, len, 1, what);
    }

    fn add_n(&mut self, r: &mut CheckReport, offset: u64, len: u64, times: u32, what: &str) {
        if len == 0 {
            return;
        }
        if offset % self.cs != 0 && what != "compressed cluster" {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR {what} at {offset:#x} is not cluster aligned"
            ));
        }
        let first = offset / self.cs;
        let last = offset.saturating_add(len - 1) / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(times),
                None => {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR {what} at {offset:#x} lies beyond the end of the image file"
                    ));
                    return;
                }
            }
        }
    }
}

impl Meta {
    /// Checks the image and repairs what `repair` asks for. The metadata in memory (including
    /// unwritten changes) is what is checked; repairs are written back before returning.
    pub fn check(&mut self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && !self.writable {
            return Err(StorageError::ReadOnly(format!(
                "{} (repairs need write access)",
                self.file.name()
            )));
        }
        let cs = self.geo.cluster_size;
        let mut r = CheckReport {
            filename: self.file.name().to_string(),
            format: "qcow2".into(),
            total_clusters: self.header.size.div_ceil(cs),
            ..CheckReport::default()
        };
        let nb = self.file_len().max(self.refs.hwm()).div_ceil(cs);
        if nb > MAX_CHECK_CLUSTERS {
            r.check_errors += 1;
            r.messages.push(format!(
                "ERROR the image has {nb} clusters, too many to check"
            ));
            return Ok(r);
        }
        let mut c = Counter {
            refs: vec![0u32; nb as usize],
            cs,
        };
        c.add(&mut r, 0, cs, "header");
        let l1 = self.l1.entries().to_vec();
        let l1_off = self.header.l1_table_offset;
        // L2 tables by how many L1 entries reach them: each is read once however often it is
        // referenced, so the work is bounded by the file's size.
        let mut tables: HashMap<u64, u32> = HashMap::new();
        self.count_l1(&mut c, &mut r, l1_off, &l1, &mut tables);
        self.active_stats(&mut r, &l1);
        // Snapshot L1 tables are read once per offset, and all of them (with the bitmap
        // tables) within a budget tied to the file's size, so a crafted snapshot table cannot
        // make the check read terabytes.
        let mut budget = self.file_len().saturating_mul(4).saturating_add(64 << 20);
        let mut seen_l1 = HashSet::new();
        for s in self.snapshots.clone() {
            let bytes = u64::from(s.l1_size) * 8;
            if bytes > budget {
                r.check_errors += 1;
                r.messages.push(format!(
                    "ERROR the snapshot L1 tables add up to more than the file could hold; \
                     stopped at snapshot '{}'",
                    s.name
                ));
                break;
            }
            if !seen_l1.insert(s.l1_offset) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR snapshot '{}' shares its L1 table with another",
                    s.name
                ));
                continue;
            }
            budget -= bytes;
            match read_u64_table(self.file.as_ref(), s.l1_offset, s.l1_size as usize) {
                Ok(table) => self.count_l1(&mut c, &mut r, s.l1_offset, &table, &mut tables),
                Err(e) => {
                    r.check_errors += 1;
                    r.messages.push(format!(
                        "ERROR reading the L1 table of snapshot '{}': {e}",
                        s.name
                    ));
                }
            }
        }
        self.count_tables(&mut c, &mut r, &tables);
        let rt_off = self.header.refcount_table_offset;
        c.add(
            &mut r,
            rt_off,
            u64::from(self.header.refcount_table_clusters) * cs,
            "refcount table",
        );
        let mut blocks = HashSet::new();
        for (i, &e) in self.refs.table().to_vec().iter().enumerate() {
            let off = e & !0x1ff;
            if off != 0 {
                c.add(&mut r, off, cs, &format!("refcount block {i}"));
                if !blocks.insert(off) {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR refcount block {i} at {off:#x} is also another block"
                    ));
                }
            }
        }
        if self.header.nb_snapshots > 0 {
            c.add(
                &mut r,
                self.header.snapshots_offset,
                self.snapshot_table_bytes,
                "snapshot table",
            );
        }
        self.count_bitmaps(&mut c, &mut r, budget);
        r.image_end_offset = c
            .refs
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| (i as u64 + 1) * cs);
        self.compare_refcounts(&c, &mut r, repair)?;
        self.check_copied(&mut r, repair)?;
        if repair != Repair::None {
            if r.corruptions == 0 && r.check_errors == 0 {
                self.header.incompatible_features &= !incompat::CORRUPT;
                self.header_dirty = true;
            }
            self.write_everything()?;
        }
        Ok(r)
    }

    fn count_l1(
        &mut self,
        c: &mut Counter,
        r: &mut CheckReport,
        l1_off: u64,
        l1: &[u64],
        tables: &mut HashMap<u64, u32>,
    ) {
        c.add(r, l1_off, l1.len() as u64 * 8, "L1 table");
        for (i, &e) in l1.iter().enumerate() {
            match l1_entry_offset(e, &self.geo, self.file_len()) {
                Ok(0) => {}
                Ok(o) => *tables.entry(o).or_insert(0) += 1,
                Err(err) => {
                    r.corruptions += 1;
                    r.messages.push(format!("ERROR L1 entry {i}: {err}"));
                }
            }
        }
    }

    fn count_tables(&mut self, c: &mut Counter, r: &mut CheckReport, tables: &HashMap<u64, u32>) {
        let cs = self.geo.cluster_size;
        let mut order: Vec<(u64, u32)> = tables.iter().map(|(&t, &n)| (t, n)).collect();
        order.sort_unstable();
        for (l2_off, n) in order {
            c.add_n(r, l2_off, cs, n, "L2 table");
            let slot = match self.l2_slot_blocking(l2_off) {
                Ok(s) => s,
                Err(err) => {
                    r.check_errors += 1;
                    r.messages
                        .push(format!("ERROR reading L2 table at {l2_off:#x}: {err}"));
                    continue;
                }
            };
            for j in 0..self.geo.l2_entries as usize {
                let (raw, bitmap) = self.l2_raw(slot, j);
                if raw == 0 && bitmap == 0 {
                    continue;
                }
                match self.geo.decode(raw, bitmap) {
                    Ok(L2Entry::Compressed { offset, len }) => {
                        let range = self.compressed_clusters(offset, len);
                        let (first, last) = (*range.start(), *range.end());
                        c.add_n(
                            r,
                            first * cs,
                            (last - first + 1) * cs,
                            n,
                            "compressed cluster",
                        );
                    }
                    // Clusters in an external data file are not refcounted.
                    Ok(_) if self.geo.external => {}
                    Ok(other) => {
                        if let Some(h) = other.host_cluster() {
                            c.add_n(r, h, cs, n, "data cluster");
                        }
                    }
                    Err(err) => {
                        r.corruptions += 1;
                        r.messages
                            .push(format!("ERROR L2 table at {l2_off:#x}, entry {j}: {err}"));
                    }
                }
            }
        }
    }

    /// Allocation statistics of the active tables (each distinct table once).
    fn active_stats(&mut self, r: &mut CheckReport, l1: &[u64]) {
        let cs = self.geo.cluster_size;
        let mut seen = HashSet::new();
        let mut prev: Option<u64> = None;
        for &e in l1 {
            let Ok(t) = l1_entry_offset(e, &self.geo, self.file_len()) else {
                continue;
            };
            if t == 0 || !seen.insert(t) {
                continue;
            }
            let Ok(slot) = self.l2_slot_blocking(t) else {
                continue;
            };
            for j in 0..self.geo.l2_entries as usize {
                let (raw, bitmap) = self.l2_raw(slot, j);
                match self.geo.decode(raw, bitmap) {
                    Ok(L2Entry::Compressed { .. }) => {
                        r.allocated_clusters += 1;
                        r.compressed_clusters += 1;
                    }
                    Ok(L2Entry::Normal { host: h, .. })
                    | Ok(L2Entry::Extended { host: Some(h), .. }) => {
                        r.allocated_clusters += 1;
                        if prev.is_some_and(|p| p + cs != h) {
                            r.fragmented_clusters += 1;
                        }
                        prev = Some(h);
                    }
                    _ => {}
                }
            }
        }
    }

    fn count_bitmaps(&mut self, c: &mut Counter, r: &mut CheckReport, mut budget: u64) {
        if self.header.autoclear_features & autoclear::BITMAPS == 0 {
            return;
        }
        let Some(data) = self.header.extension(ext::BITMAPS).map(<[u8]>::to_vec) else {
            return;
        };
        if data.len() < 24 {
            r.corruptions += 1;
            r.messages
                .push("ERROR the bitmaps extension is truncated".into());
            return;
        }
        let nb = be32(&data, 0);
        let dir_size = be64(&data, 8);
        let dir_off = be64(&data, 16);
        if dir_size > 64 << 20
            || dir_off
                .checked_add(dir_size)
                .is_none_or(|e| e > self.file_len())
        {
            r.corruptions += 1;
            r.messages
                .push("ERROR the bitmap directory lies outside the file".into());
            return;
        }
        c.add(r, dir_off, dir_size, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        if self.file.read_exact_at(dir_off, &mut dir).is_err() {
            r.check_errors += 1;
            return;
        }
        let mut at = 0usize;
        for _ in 0..nb {
            if at + 24 > dir.len() {
                break;
            }
            let table_off = be64(&dir, at);
            let table_size = be32(&dir, at + 8);
            let name_size = be16(&dir, at + 18) as usize;
            let extra = be32(&dir, at + 20) as usize;
            c.add(r, table_off, u64::from(table_size) * 8, "bitmap table");
            let bytes = u64::from(table_size) * 8;
            if bytes > budget {
                r.check_errors += 1;
                r.messages
                    .push("ERROR the bitmap tables add up to more than the file could hold".into());
                return;
            }
            budget -= bytes;
            if bytes <= 64 << 20 {
                if let Ok(t) = read_u64_table(self.file.as_ref(), table_off, table_size as usize) {
                    for e in t {
                        if e & OFFSET_MASK != 0 {
                            c.add(r, e & OFFSET_MASK, self.geo.cluster_size, "bitmap data");
                        }
                    }
                }
            }
            at = (at + 24 + extra + name_size).next_multiple_of(8);
        }
    }

    fn compare_refcounts(
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
            let block = self.refs.table().get(ti).map_or(0, |&e| e & !0x1ff);
            let has_block = block != 0;
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
            let refs = u64::from(c.refs.get(cl as usize).copied().unwrap_or(0));
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

    fn block_is_zero(&self, offset: u64) -> Result<bool> {
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

    fn check_copied(&mut self, r: &mut CheckReport, repair: Repair) -> Result<()> {
        let fix = repair == Repair::All;
        let mut seen = HashSet::new();
        for i in 0..self.l1.len() {
            let e = self.l1.get(i);
            let Ok(l2_off) = l1_entry_offset(e, &self.geo, self.file_len()) else {
                continue;
            };
            if l2_off == 0 {
                continue;
            }
            if !seen.insert(l2_off) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR active L1 entries share the L2 table at {l2_off:#x}"
                ));
                continue;
            }
            let one = match self.refcount_blocking(l2_off / self.geo.cluster_size) {
                Ok(n) => n == 1,
                Err(err) => {
                    r.check_errors += 1;
                    r.messages.push(format!("ERROR reading a refcount: {err}"));
                    continue;
                }
            };
            if one != (e & COPIED != 0) {
                r.messages.push(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i}",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if fix {
                    self.set_l1(i, if one { e | COPIED } else { e & !COPIED });
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                }
            }
            let Ok(slot) = self.l2_slot_blocking(l2_off) else {
                continue;
            };
            for j in 0..self.geo.l2_entries as usize {
                let (raw, bitmap) = self.l2_raw(slot, j);
                let Ok(entry) = self.geo.decode(raw, bitmap) else {
                    continue;
                };
                let Some(h) = entry.host_cluster() else {
                    continue;
                };
                // Data file clusters always count as referenced once.
                let count = if self.geo.external {
                    Ok(1)
                } else {
                    self.refcount_blocking(h / self.geo.cluster_size)
                };
                let one = match count {
                    Ok(n) => n == 1,
                    Err(err) => {
                        r.check_errors += 1;
                        r.messages.push(format!("ERROR reading a refcount: {err}"));
                        continue;
                    }
                };
                if one != entry.copied() {
                    r.messages.push(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={raw:x}",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    if fix {
                        // Look the table up again: refcount lookups may have moved cache slots.
                        let slot = self.l2_slot_blocking(l2_off)?;
                        self.set_l2_raw(
                            slot,
                            j,
                            if one { raw | COPIED } else { raw & !COPIED },
                            bitmap,
                        );
                        r.corruptions_fixed += 1;
                    } else {
                        r.corruptions += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Rebuilds refcounts after a crash with the dirty bit set, then clears the bit.
    pub fn repair_dirty(&mut self) -> Result<CheckReport> {
        let report = self.check(Repair::All)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(StorageError::corrupt(
                self.file.name(),
                format!(
                    "the image was not closed cleanly and its metadata cannot be repaired automatically ({} corruptions, {} errors); run 'strata image check -r all'",
                    report.corruptions, report.check_errors
                ),
            ));
        }
        self.header.incompatible_features &= !incompat::DIRTY;
        self.write_header()?;
        self.file.sync_data()?;
        self.dirty_on_disk = false;
        Ok(report)
    }
}
