//! Which host clusters hold metadata — the header, the L1 and refcount tables, refcount blocks,
//! the snapshot table and snapshot L1 tables, active L2 tables — so that a corrupt L2 entry
//! cannot turn a guest write, or the free of a copy-on-write's old cluster, into damage to the
//! image's own tables (QEMU calls this the overlap check; the qcow2 spec leaves it to writers).
//!
//! One bit per host cluster of the file. The map is rebuilt from the tables at open and after
//! the L1 or refcount table moves; new L2 tables and refcount blocks are marked as they are
//! made, and every allocation clears its clusters first (a fresh cluster is data until marked),
//! so a stale mark can only sit on a cluster nothing references. Inactive snapshot L2 tables
//! are not tracked.

use crate::error::Result;

use super::meta::{corrupt, Meta};

/// Bits 9-55 of L1 and refcount table entries: the table's host offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The map. See the module documentation.
#[derive(Debug, Default)]
pub struct MetadataMap {
    words: Vec<u64>,
    /// Clusters at or past this index are not tracked (beyond the file: nothing to protect).
    limit: u64,
}

impl MetadataMap {
    fn mark(&mut self, cluster: u64) {
        if cluster >= self.limit {
            return;
        }
        let w = (cluster / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (cluster % 64);
    }

    fn mark_range(&mut self, offset: u64, len: u64, cluster_size: u64) {
        if len == 0 {
            return;
        }
        let first = offset / cluster_size;
        let last = offset.saturating_add(len - 1) / cluster_size;
        for c in first..=last.min(self.limit) {
            self.mark(c);
        }
    }

    fn clear(&mut self, cluster: u64) {
        if let Some(w) = self.words.get_mut((cluster / 64) as usize) {
            *w &= !(1 << (cluster % 64));
        }
    }

    /// Marks a new metadata cluster; `limit` is the current end of tracking (in clusters).
    pub fn mark_new(&mut self, cluster: u64, limit: u64) {
        self.limit = self.limit.max(limit);
        self.mark(cluster);
    }

    /// Forgets marks on `n` clusters from `first` (they are being allocated as data).
    pub fn clear_range(&mut self, first: u64, n: u64) {
        for c in first..first + n {
            self.clear(c);
        }
    }

    /// Whether `cluster` holds metadata.
    pub fn contains(&self, cluster: u64) -> bool {
        self.words
            .get((cluster / 64) as usize)
            .is_some_and(|w| w & (1 << (cluster % 64)) != 0)
    }
}

impl Meta {
    /// Rebuilds the map from the tables in memory.
    pub(super) fn rebuild_metadata_map(&mut self) {
        let cs = self.geo.cluster_size;
        let mut map = MetadataMap {
            words: Vec::new(),
            limit: self.refs.file_len().max(self.refs.hwm()).div_ceil(cs) + 1,
        };
        map.mark(0);
        let h = &self.header;
        map.mark_range(h.l1_table_offset, u64::from(h.l1_size) * 8, cs);
        let (rt_off, rt_clusters) = self.refs.table_at();
        map.mark_range(rt_off, u64::from(rt_clusters) * cs, cs);
        if h.nb_snapshots > 0 {
            map.mark_range(h.snapshots_offset, self.snapshot_table_bytes, cs);
        }
        for s in &self.snapshots {
            map.mark_range(s.l1_offset, u64::from(s.l1_size) * 8, cs);
        }
        for &e in self.refs.table().iter().chain(self.l1.entries().iter()) {
            let off = e & TABLE_OFFSET_MASK;
            if off != 0 {
                map.mark(off / cs);
            }
        }
        self.refs.set_metadata(map);
    }

    /// Drops the reference an L2 entry held to data cluster `host` once durable — unless the
    /// entry (corrupt) named a metadata cluster, which is then left alone.
    pub(super) fn free_data_later(&mut self, host: u64) {
        if self.refs.holds_metadata(host / self.geo.cluster_size) {
            tracing::warn!(
                file = self.file.name(),
                cluster = host,
                "an L2 entry named a metadata cluster; it is not freed"
            );
            return;
        }
        self.refs.free_later(host, 1);
    }

    /// Refuses a data cluster (from an L2 entry) that holds metadata.
    pub(super) fn refuse_metadata(&self, host: u64, what: &str) -> Result<()> {
        let cs = self.geo.cluster_size;
        if self.refs.holds_metadata(host / cs) {
            return Err(corrupt(
                self.file.name(),
                format!(
                    "an L2 entry points {what} at cluster {host:#x}, which holds the image's \
                     metadata; repair it with 'strata image check -r all'"
                ),
            ));
        }
        Ok(())
    }
}
