//! Internal snapshots: create, apply (revert) and delete.
//!
//! qemu-img check requires the copied flag of every entry of the active tables to say exactly
//! whether the refcount is one, so changing refcounts and flags in place can never be crash-safe:
//! some write has to come first. Each operation here therefore builds the new metadata beside the
//! old — fresh copies of the active L2 tables with their flags computed from the final
//! refcounts, a new active L1 table, new copies of every refcount block that changes, a new
//! refcount table and a new snapshot table, all in clusters past the end of everything in use —
//! syncs, and switches to it with one write of the header's first sector (which holds the L1,
//! refcount table and snapshot table pointers), then syncs again. A crash before the switch
//! leaves the old image untouched (the new clusters are not even counted), after it the new one;
//! what the old metadata used is counted free in the new refcounts.
//!
//! Every L1 path counts: data clusters are referenced once per L1 table (active or snapshot) that
//! reaches them, whether or not L2 tables are shared.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, StorageError};

use super::entry::{L2Entry, COPIED};
use crate::bytes::be64;

use super::meta::{l1_entry_offset, read_u64_table, Meta};
use super::refcount;
use super::snapshot_table::{self, Snapshot};

/// Longest snapshot name or ID.
const MAX_NAME: usize = 1024;

/// A new version of the metadata being assembled.
struct Shadow {
    /// Refcount changes by cluster.
    deltas: HashMap<u64, i64>,
    /// Next free cluster past everything in use.
    next: u64,
    /// Structures to write: host offset → bytes.
    writes: BTreeMap<u64, Vec<u8>>,
}

impl Shadow {
    fn add(&mut self, cluster: u64, d: i64) {
        *self.deltas.entry(cluster).or_insert(0) += d;
    }

    fn alloc(&mut self, n: u64) -> u64 {
        let start = self.next;
        self.next += n;
        for c in start..start + n {
            self.add(c, 1);
        }
        start
    }
}

fn now() -> (u32, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_nanos())
}

impl Meta {
    fn find_snapshot(&self, key: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == key)
            .or_else(|| self.snapshots.iter().position(|s| s.name == key))
            .ok_or_else(|| {
                StorageError::InvalidInput(format!("No snapshot with ID or name '{key}'"))
            })
    }

    fn begin_shadow(&mut self) -> Result<Shadow> {
        if !self.writable {
            return Err(StorageError::ReadOnly(self.file.name().to_string()));
        }
        if !self.allocs.is_empty() {
            return Err(StorageError::Busy(format!(
                "{} (writes in flight)",
                self.file.name()
            )));
        }
        // Start from a state where memory and disk agree, nothing pending.
        self.write_everything()?;
        let cs = self.geo.cluster_size;
        Ok(Shadow {
            deltas: HashMap::new(),
            next: self.file_len().max(self.refs.hwm()).div_ceil(cs),
            writes: BTreeMap::new(),
        })
    }

    /// Adds (`d` = 1) or removes (`d` = -1) the references of the L1 path `l1` (its L2 tables
    /// and everything they map), not counting the L1 table's own clusters.
    fn count_path(&mut self, sh: &mut Shadow, l1: &[u64], d: i64) -> Result<()> {
        let cs = self.geo.cluster_size;
        for &e in l1 {
            let t = l1_entry_offset(e, &self.geo, self.file_len())?;
            if t == 0 {
                continue;
            }
            sh.add(t / cs, d);
            self.count_table_data(sh, t, d)?;
        }
        Ok(())
    }

    fn count_table_data(&mut self, sh: &mut Shadow, t: u64, d: i64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let slot = self.l2_slot_blocking(t)?;
        let bytes = self.l2.bytes(slot).to_vec();
        let step = if self.geo.extended { 16 } else { 8 };
        for at in (0..bytes.len()).step_by(step) {
            let raw = be64(&bytes, at);
            let bitmap = if self.geo.extended {
                be64(&bytes, at + 8)
            } else {
                0
            };
            match self.geo.decode(raw, bitmap)? {
                L2Entry::Compressed { offset, len } => {
                    for c in self.compressed_clusters(offset, len) {
                        sh.add(c, d);
                    }
                }
                other => {
                    if let Some(h) = other.host_cluster() {
                        sh.add(h / cs, d);
                    }
                }
            }
        }
        Ok(())
    }

    fn final_refcount(&mut self, sh: &Shadow, c: u64) -> Result<u64> {
        let cur = self.refcount_blocking(c)?;
        let d = sh.deltas.get(&c).copied().unwrap_or(0);
        cur.checked_add_signed(d).ok_or_else(|| {
            StorageError::corrupt(
                self.file.name(),
                format!("refcount of cluster {c} would drop below zero"),
            )
        })
    }

    /// A new active L1 table whose tables are fresh copies of those `source` points at, their
    /// references added to the shadow. Returns the new L1 entries; flags are fixed later.
    fn copy_path(&mut self, sh: &mut Shadow, source: &[u64]) -> Result<Vec<(u64, Option<u64>)>> {
        let cs = self.geo.cluster_size;
        let mut out = Vec::with_capacity(source.len());
        for &e in source {
            let t = l1_entry_offset(e, &self.geo, self.file_len())?;
            if t == 0 {
                out.push((0, None));
                continue;
            }
            let copy = sh.alloc(1) * cs;
            self.count_table_data(sh, t, 1)?;
            out.push((copy, Some(t)));
        }
        Ok(out)
    }

    /// Writes the copies made by [`copy_path`] with flags from the final refcounts and queues
    /// the new L1 table (`l1_entries` entries) for writing; returns its offset.
    fn finish_path(
        &mut self,
        sh: &mut Shadow,
        path: &[(u64, Option<u64>)],
        l1_entries: usize,
    ) -> Result<u64> {
        let cs = self.geo.cluster_size;
        let l1_clusters = (l1_entries as u64 * 8).div_ceil(cs).max(1);
        let l1_off = sh.alloc(l1_clusters) * cs;
        let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
        let step = if self.geo.extended { 16 } else { 8 };
        for (i, &(copy, src)) in path.iter().enumerate().take(l1_entries) {
            let Some(src) = src else { continue };
            let slot = self.l2_slot_blocking(src)?;
            let mut bytes = self.l2.bytes(slot).to_vec();
            for at in (0..bytes.len()).step_by(step) {
                let raw = be64(&bytes, at);
                let bitmap = if self.geo.extended {
                    be64(&bytes, at + 8)
                } else {
                    0
                };
                let entry = self.geo.decode(raw, bitmap)?;
                if let Some(h) = entry.host_cluster() {
                    let one = self.final_refcount(sh, h / cs)? == 1;
                    let fixed = if one { raw | COPIED } else { raw & !COPIED };
                    bytes[at..at + 8].copy_from_slice(&fixed.to_be_bytes());
                }
            }
            sh.writes.insert(copy, bytes);
            l1[i * 8..i * 8 + 8].copy_from_slice(&(copy | COPIED).to_be_bytes());
        }
        sh.writes.insert(l1_off, l1);
        Ok(l1_off)
    }

    fn free_range(&self, sh: &mut Shadow, offset: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let cs = self.geo.cluster_size;
        for c in offset / cs..(offset + bytes).div_ceil(cs) {
            sh.add(c, -1);
        }
    }

    /// Writes the new snapshot table (if any) into the shadow.
    fn shadow_snapshot_table(&mut self, sh: &mut Shadow, snaps: &[Snapshot]) -> u64 {
        let cs = self.geo.cluster_size;
        if self.header.nb_snapshots > 0 {
            let (off, len) = (self.header.snapshots_offset, self.snapshot_table_bytes);
            self.free_range(sh, off, len);
        }
        if snaps.is_empty() {
            return 0;
        }
        let bytes = snapshot_table::serialize(snaps);
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = sh.alloc(n) * cs;
        sh.writes.insert(off, bytes);
        off
    }

    /// New refcount blocks and table for the shadow's deltas; returns (table offset, clusters).
    fn shadow_refcounts(&mut self, sh: &mut Shadow) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size;
        let rbe = self.geo.rb_entries;
        let old_table_off = self.header.refcount_table_offset;
        let old_table_clusters = u64::from(self.header.refcount_table_clusters);
        self.free_range(sh, old_table_off, old_table_clusters * cs);
        let mut relocated: BTreeMap<u64, u64> = BTreeMap::new();
        let mut table_len = self.refs.table().len() as u64;
        let mut table: Option<(u64, u64)> = None;
        loop {
            let mut changed = false;
            let touched: Vec<u64> = {
                let mut v: Vec<u64> = sh.deltas.keys().map(|c| c / rbe).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            for ti in touched {
                if relocated.contains_key(&ti) {
                    continue;
                }
                let loc = sh.alloc(1);
                if let Some(&e) = self.refs.table().get(ti as usize) {
                    if e & !0x1ff != 0 {
                        sh.add((e & !0x1ff) / cs, -1);
                    }
                }
                relocated.insert(ti, loc);
                changed = true;
            }
            let need_blocks = relocated.keys().next_back().map_or(0, |&t| t + 1);
            let need = need_blocks.max(self.refs.table().len() as u64);
            let fits = table.is_some_and(|(_, n)| n * cs / 8 >= need);
            if !fits {
                table_len = if need_blocks > self.refs.table().len() as u64 {
                    table_len.max(need_blocks * 2)
                } else {
                    table_len.max(need)
                };
                let clusters = (table_len * 8).div_ceil(cs);
                if clusters * cs > super::header::MAX_REFTABLE_BYTES {
                    return Err(StorageError::OutOfSpace(format!(
                        "{}: the refcount table would exceed 8 MiB",
                        self.file.name()
                    )));
                }
                if let Some((off, n)) = table {
                    for c in off..off + n {
                        sh.add(c, -1);
                    }
                }
                table = Some((sh.alloc(clusters), clusters));
                changed = true;
            }
            if !changed {
                break;
            }
        }
        let (table_start, table_clusters) = table.unwrap_or((0, 0));
        // Block contents: the old counts plus the deltas.
        let mut by_block: BTreeMap<u64, Vec<(u64, i64)>> = BTreeMap::new();
        for (&c, &d) in &sh.deltas {
            by_block.entry(c / rbe).or_default().push((c % rbe, d));
        }
        let order = self.geo.refcount_order;
        let max = self.geo.max_refcount();
        let mut new_table = vec![0u8; (table_clusters * cs) as usize];
        for (ti, &e) in self.refs.table().iter().enumerate() {
            new_table[ti * 8..ti * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        for (&ti, &loc) in &relocated {
            let old = self
                .refs
                .table()
                .get(ti as usize)
                .map_or(0, |&e| e & !0x1ff);
            let mut block = if old != 0 {
                let mut b = vec![0u8; cs as usize];
                self.file.read_exact_at(old, &mut b)?;
                b
            } else {
                vec![0u8; cs as usize]
            };
            for &(idx, d) in by_block.get(&ti).map(Vec::as_slice).unwrap_or(&[]) {
                let v = refcount::get(&block, order, idx as usize);
                let nv = v
                    .checked_add_signed(d)
                    .filter(|&n| n <= max)
                    .ok_or_else(|| {
                        StorageError::InvalidInput(format!(
                            "Refcount of cluster {} would leave the range of {}-bit refcounts",
                            ti * rbe + idx,
                            1u32 << order
                        ))
                    })?;
                refcount::set(&mut block, order, idx as usize, nv);
            }
            sh.writes.insert(loc * cs, block);
            new_table[ti as usize * 8..ti as usize * 8 + 8]
                .copy_from_slice(&(loc * cs).to_be_bytes());
        }
        sh.writes.insert(table_start * cs, new_table);
        Ok((table_start * cs, table_clusters as u32))
    }

    /// Writes the shadow, switches the header to it, and reloads the metadata.
    fn commit_shadow(
        &mut self,
        mut sh: Shadow,
        l1_off: u64,
        l1_size: u32,
        size: u64,
        snaps: Vec<Snapshot>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let snap_off = self.shadow_snapshot_table(&mut sh, &snaps);
        let (rt_off, rt_clusters) = self.shadow_refcounts(&mut sh)?;
        // Clusters the new metadata frees, to punch out once it is durable.
        let mut freed = Vec::new();
        for (&c, &d) in &sh.deltas {
            if d < 0 && self.final_refcount(&sh, c)? == 0 {
                freed.push(c);
            }
        }
        self.grow_blocking(sh.next * cs)?;
        for (off, bytes) in &sh.writes {
            let mut b = bytes.clone();
            b.resize(
                (b.len() as u64).next_multiple_of(self.unit as u64) as usize,
                0,
            );
            self.write_cluster(*off, &b)?;
        }
        self.file.sync_data()?;
        let mut h = self.header.clone();
        h.l1_table_offset = l1_off;
        h.l1_size = l1_size;
        h.size = size;
        h.refcount_table_offset = rt_off;
        h.refcount_table_clusters = rt_clusters;
        h.nb_snapshots = snaps.len() as u32;
        h.snapshots_offset = snap_off;
        self.header = h;
        self.write_header()?;
        self.file.sync_data()?;
        // The new metadata is durable; this copy describes the old until the reload succeeds.
        if let Err(e) = self.reload() {
            self.stale = true;
            return Err(e);
        }
        for c in freed {
            if c * cs < self.file_len() {
                let _ = self.file.punch_hole(c * cs, cs);
            }
        }
        Ok(())
    }

    /// Fails if this copy of the metadata is out of date (see `Meta::stale`).
    pub(super) fn check_fresh(&self) -> Result<()> {
        if self.stale {
            return Err(StorageError::Unavailable(format!(
                "{}: the metadata could not be re-read after a snapshot change; reopen the image",
                self.file.name()
            )));
        }
        Ok(())
    }

    /// Re-reads all metadata from disk (after a wholesale rewrite).
    fn reload(&mut self) -> Result<()> {
        let opts = self.opts;
        let file = self.file.clone();
        let hwm = self.refs.hwm().max(self.file_len());
        let mut fresh = Meta::open(file, opts)?;
        fresh.refs.raise_hwm(hwm);
        fresh.refs.keep_orig_len(self.refs.orig_len());
        *self = fresh;
        Ok(())
    }

    /// Creates a snapshot of the current contents named `name`.
    pub fn snapshot_create(&mut self, name: &str) -> Result<()> {
        if self.geo.external {
            return Err(StorageError::Unsupported(
                "internal snapshots of a qcow2 image with an external data file (the spec \
                 does not allow them)"
                    .into(),
            ));
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(StorageError::InvalidInput(format!(
                "Snapshot names must be 1 to {MAX_NAME} bytes long"
            )));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(StorageError::AlreadyExists(format!("Snapshot '{name}'")));
        }
        if self.snapshots.len() >= 65536 {
            return Err(StorageError::InvalidInput(
                "An image holds at most 65536 snapshots".into(),
            ));
        }
        let mut sh = self.begin_shadow()?;
        let active = self.l1.entries().to_vec();
        // The old active L1 becomes the snapshot's: its path stays counted as it is.
        let path = self.copy_path(&mut sh, &active)?;
        let l1_off = self.finish_path(&mut sh, &path, active.len())?;
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let (sec, nsec) = now();
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            l1_offset: self.header.l1_table_offset,
            l1_size: self.header.l1_size,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: sec,
            date_nsec: nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            icount: Some(u64::MAX),
            extra_tail: Vec::new(),
        });
        let (l1_size, size) = (self.header.l1_size, self.header.size);
        self.commit_shadow(sh, l1_off, l1_size, size, snaps)
    }

    /// Reverts the active contents to snapshot `key` (ID or name).
    pub fn snapshot_apply(&mut self, key: &str) -> Result<()> {
        let i = self.find_snapshot(key)?;
        let s = self.snapshots[i].clone();
        let mut sh = self.begin_shadow()?;
        let old = self.l1.entries().to_vec();
        self.count_path(&mut sh, &old, -1)?;
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        self.free_range(&mut sh, self.header.l1_table_offset, l1_bytes);
        let source = read_u64_table(self.file.as_ref(), s.l1_offset, s.l1_size as usize)?;
        let path = self.copy_path(&mut sh, &source)?;
        let size = s.disk_size.unwrap_or(self.header.size);
        let needed = super::header::l1_entries_for(size, self.geo.cluster_bits, self.geo.extended)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| u64::from(n) * 8 <= super::header::MAX_L1_BYTES)
            .ok_or_else(|| {
                StorageError::corrupt(
                    self.file.name(),
                    format!("snapshot '{}' has an impossible disk size {size}", s.name),
                )
            })?;
        let l1_size = s.l1_size.max(needed);
        let l1_off = self.finish_path(&mut sh, &path, l1_size as usize)?;
        let snaps = self.snapshots.clone();
        self.commit_shadow(sh, l1_off, l1_size, size, snaps)
    }

    /// Deletes snapshot `key` (ID or name).
    pub fn snapshot_delete(&mut self, key: &str) -> Result<()> {
        let i = self.find_snapshot(key)?;
        let s = self.snapshots[i].clone();
        let mut sh = self.begin_shadow()?;
        let table = read_u64_table(self.file.as_ref(), s.l1_offset, s.l1_size as usize)?;
        self.count_path(&mut sh, &table, -1)?;
        self.free_range(&mut sh, s.l1_offset, u64::from(s.l1_size) * 8);
        // Rebuild the active path so its flags match the lowered refcounts.
        let old = self.l1.entries().to_vec();
        self.count_path(&mut sh, &old, -1)?;
        self.free_range(
            &mut sh,
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        );
        let path = self.copy_path(&mut sh, &old)?;
        let l1_off = self.finish_path(&mut sh, &path, old.len())?;
        let mut snaps = self.snapshots.clone();
        snaps.remove(i);
        let (l1_size, size) = (self.header.l1_size, self.header.size);
        self.commit_shadow(sh, l1_off, l1_size, size, snaps)
    }
}
