//! Consistency check and repair, with `qemu-img check`'s findings and exit-code meaning.
//!
//! Every structure that holds a reference (header, L1 tables of the image and its snapshots, L2
//! tables, data and compressed clusters, refcount table and blocks, snapshot table, bitmaps) is
//! counted into an in-memory reference array, which is compared with the stored refcounts:
//! a refcount above its references is a leak, below is a corruption. The copied flags of the
//! active tables must say "refcount is one" exactly when it is. Repair sets refcounts to the
//! references (leaks only, or everything) and fixes copied flags; new refcount blocks that repair
//! needs never land on a referenced cluster.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::error::{Result, StorageError};

use super::entry::{L2Entry, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use super::header::{autoclear, ext, incompat};
use crate::bytes::{be16, be32, be64};

use super::meta::{l1_entry_offset, read_u64_table, Meta};

/// Most clusters a check counts (4 GiB of reference counters at most).
const MAX_CHECK_CLUSTERS: u64 = 1 << 30;
/// Most distinct clusters past the end of the file whose references a check remembers.
const MAX_BEYOND_CLUSTERS: usize = 1 << 16;
/// Reserved bits of a refcount table entry.
pub(super) const RT_RESERVED: u64 = 0x1ff;

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

pub(super) struct Counter {
    pub(super) refs: Vec<u32>,
    pub(super) cs: u64,
    /// References to clusters past the end of the file (each also reported as a corruption),
    /// so that the refcounts that still count them are not taken for leaks.
    pub(super) beyond: BTreeMap<u64, u32>,
    /// Tables that entries point at but the check could not follow (unaligned, or past the end
    /// of the file): what they reference is unknown, so leaks are reported and never freed.
    pub(super) unread_tables: u64,
    /// Refcount table entries whose block is unusable (unaligned, past the end of the file):
    /// the refcounts they would hold read as zero.
    pub(super) bad_blocks: HashSet<usize>,
}

impl Counter {
    pub(super) fn add(&mut self, r: &mut CheckReport, offset: u64, len: u64, what: &str) {
        self.add_n(r, offset, len, 1, what);
    }

    pub(super) fn add_n(
        &mut self,
        r: &mut CheckReport,
        offset: u64,
        len: u64,
        times: u32,
        what: &str,
    ) {
        if len == 0 {
            return;
        }
        if offset % self.cs != 0 && what != "compressed cluster" {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR {what} at {offset:#x} is not cluster aligned"
            ));
        }
        self.count(r, offset, len, times, what);
    }

    /// Counts `times` references to every cluster `[offset, offset + len)` touches; a range
    /// reaching past the end of the file is a corruption.
    pub(super) fn count(
        &mut self,
        r: &mut CheckReport,
        offset: u64,
        len: u64,
        times: u32,
        what: &str,
    ) {
        if len == 0 {
            return;
        }
        let first = offset / self.cs;
        let last = offset.saturating_add(len - 1) / self.cs;
        if last >= self.refs.len() as u64 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR {what} at {offset:#x} lies beyond the end of the image file"
            ));
        }
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(times),
                None if self.beyond.len() < MAX_BEYOND_CLUSTERS || self.beyond.contains_key(&c) => {
                    let n = self.beyond.entry(c).or_insert(0);
                    *n = n.saturating_add(times);
                }
                None => return,
            }
        }
    }

    /// Counts the reference to the cluster at `offset` that a repair just allocated (perhaps
    /// past the old end of the file).
    pub(super) fn count_new(&mut self, offset: u64) {
        let at = (offset / self.cs) as usize;
        if at >= self.refs.len() {
            self.refs.resize(at + 1, 0);
        }
        self.refs[at] += 1;
    }

    /// References counted to cluster `cl`.
    pub(super) fn refs_of(&self, cl: u64) -> u64 {
        match self.refs.get(cl as usize) {
            Some(&n) => u64::from(n),
            None => u64::from(self.beyond.get(&cl).copied().unwrap_or(0)),
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
            beyond: BTreeMap::new(),
            unread_tables: 0,
            bad_blocks: HashSet::new(),
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
            let unaligned = s.l1_offset % cs != 0;
            if unaligned
                || s.l1_offset
                    .checked_add(bytes)
                    .is_none_or(|e| e > self.file_len())
            {
                // What the table references is unknown: count the clusters it touches.
                if unaligned {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR snapshot '{}' l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                        s.name, s.l1_offset
                    ));
                }
                c.count(&mut r, s.l1_offset, bytes, 1, "snapshot L1 table");
                c.unread_tables += 1;
                continue;
            }
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
        self.count_tables(&mut c, &mut r, &tables, repair)?;
        let rt_off = self.header.refcount_table_offset;
        c.add(
            &mut r,
            rt_off,
            u64::from(self.header.refcount_table_clusters) * cs,
            "refcount table",
        );
        self.count_refcount_blocks(&mut c, &mut r, repair);
        if self.header.nb_snapshots > 0 {
            c.add(
                &mut r,
                self.header.snapshots_offset,
                self.snapshot_table_bytes,
                "snapshot table",
            );
        }
        self.count_bitmaps(&mut c, &mut r, budget);
        self.unshare_refcount_structures(&mut c, &mut r, repair)?;
        r.image_end_offset = c
            .refs
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| (i as u64 + 1) * cs);
        self.compare_refcounts(&c, &mut r, repair)?;
        self.check_copied(&c, &mut r, repair)?;
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
        let cs = self.geo.cluster_size;
        c.add(r, l1_off, l1.len() as u64 * 8, "L1 table");
        for (i, &e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR found L1 entry {i} with reserved bits set: {e:x}"
                ));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                // What it points at is not a table; the clusters it touches stay counted so a
                // repair frees none of them.
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry {i} corrupted"
                ));
                c.count(r, off, cs, 1, "L2 table");
                c.unread_tables += 1;
            } else if off.checked_add(cs).is_none_or(|end| end > self.file_len()) {
                c.count(r, off, cs, 1, "L2 table");
                c.unread_tables += 1;
            } else {
                *tables.entry(off).or_insert(0) += 1;
            }
        }
    }

    fn count_tables(
        &mut self,
        c: &mut Counter,
        r: &mut CheckReport,
        tables: &HashMap<u64, u32>,
        repair: Repair,
    ) -> Result<()> {
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
                    c.unread_tables += 1;
                    continue;
                }
            };
            for j in 0..self.geo.l2_entries as usize {
                let (raw, bitmap) = self.l2_raw(slot, j);
                if raw == 0 && bitmap == 0 {
                    continue;
                }
                if raw & COMPRESSED == 0
                    && self.standard_entry_is_bad(c, r, l2_off, j, raw, bitmap, n, repair)?
                {
                    continue;
                }
                match self.geo.decode(raw & !self.l2_reserved(raw), bitmap) {
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
        Ok(())
    }

    /// Reserved bits of L2 entry `raw` (compressed descriptors have none). Like qemu-img, bit 0
    /// (the zero flag of version 3) is not counted as reserved.
    fn l2_reserved(&self, raw: u64) -> u64 {
        if raw & COMPRESSED != 0 {
            0
        } else {
            L2_RESERVED
        }
    }

    /// Reports reserved bits and an unaligned host offset in the uncompressed L2 entry `j` of
    /// the table at `l2_off` (referenced `n` times). An unaligned offset of a cluster without
    /// data (preallocated zeros) is repaired by making the entry a plain zero cluster, as
    /// qemu-img does; one with data stays a corruption and the clusters it touches stay counted.
    /// True when the entry needs no further counting.
    #[allow(clippy::too_many_arguments)]
    fn standard_entry_is_bad(
        &mut self,
        c: &mut Counter,
        r: &mut CheckReport,
        l2_off: u64,
        j: usize,
        raw: u64,
        bitmap: u64,
        n: u32,
        repair: Repair,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size;
        if raw & self.l2_reserved(raw) != 0 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR found L2 entry with reserved bits set: {raw:x} (L2 table at {l2_off:#x}, entry {j})"
            ));
        }
        let host = raw & OFFSET_MASK;
        if host % cs == 0 {
            return Ok(false);
        }
        let has_data = if self.geo.extended {
            bitmap as u32 != 0
        } else {
            !(self.geo.v3 && raw & ZERO != 0)
        };
        if !has_data && repair == Repair::All {
            let (zero_raw, zero_bitmap) = if self.geo.extended {
                (0, u64::from(u32::MAX) << 32)
            } else {
                (ZERO, 0)
            };
            let slot = self.l2_slot_blocking(l2_off)?;
            self.set_l2_raw(slot, j, zero_raw, zero_bitmap);
            r.corruptions_fixed += 1;
            r.messages.push(format!(
                "Repairing offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
            ));
            return Ok(true);
        }
        r.corruptions += 1;
        r.messages.push(format!(
            "ERROR offset={host:x}: {} cluster is not properly aligned; L2 entry corrupted.",
            if has_data { "Data" } else { "Preallocated" }
        ));
        // Clusters in an external data file are not refcounted.
        if !self.geo.external {
            c.count(r, host, cs, n, "data cluster");
        }
        Ok(true)
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

    /// The copied flags of the active tables. Like qemu-img, any repair mode fixes them (they
    /// follow from the refcounts, which it runs after).
    fn check_copied(&mut self, c: &Counter, r: &mut CheckReport, repair: Repair) -> Result<()> {
        let repairing = repair != Repair::None;
        let foreign = self.non_l2_metadata_clusters();
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
            // A fix written into an "L2 table" that is really another table would damage that.
            let fix = repairing && !foreign.contains(&(l2_off / self.geo.cluster_size));
            let one = match self.stored_refcount(c, l2_off / self.geo.cluster_size) {
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
                    if repairing { "Repairing" } else { "ERROR" }
                ));
                if repairing {
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
                    self.stored_refcount(c, h / self.geo.cluster_size)
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

    /// Clusters that hold metadata other than L2 tables: the header, the L1 and refcount
    /// tables, refcount blocks, the snapshot table and snapshot L1 tables.
    fn non_l2_metadata_clusters(&self) -> HashSet<u64> {
        let cs = self.geo.cluster_size;
        let mut set = HashSet::from([0u64]);
        let mut range = |off: u64, len: u64| {
            if len > 0
                && off
                    .checked_add(len)
                    .is_some_and(|end| end <= self.file_len())
            {
                set.extend(off / cs..=(off + len - 1) / cs);
            }
        };
        let h = &self.header;
        range(h.l1_table_offset, u64::from(h.l1_size) * 8);
        range(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        if h.nb_snapshots > 0 {
            range(h.snapshots_offset, self.snapshot_table_bytes);
        }
        for s in &self.snapshots {
            range(s.l1_offset, u64::from(s.l1_size) * 8);
        }
        for &e in self.refs.table() {
            range(e & !RT_RESERVED, cs);
        }
        set
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
