//! The metadata of an open qcow2 image: header, active L1 table, refcount table, the bounded
//! caches of L2 tables and refcount blocks, and the bookkeeping of allocations in flight.
//!
//! One [`Meta`] per image lives behind a mutex shared by every queue. Lookups ([`Meta::map`])
//! hold it only to walk L1 → L2 (loading an L2 table on a miss); data I/O runs outside it.
//! Refcounts and allocation are in `alloc.rs`, write planning in `plan.rs`, and the ordered
//! write-back of dirty tables in `writeback.rs`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::io::IoBuf;

use super::cache::TableCache;
use super::entry::{subcluster_mapping, Geometry, L2Entry, Mapping, L1_RESERVED, OFFSET_MASK};
use super::header::{autoclear, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::snapshot_table::{self, Snapshot};

/// Default cap on the L2 cache (QEMU's default on Linux).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Default cap on the refcount block cache.
pub const DEFAULT_RB_CACHE_BYTES: u64 = 8 << 20;

/// Options for opening the metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetaOptions {
    /// Open for writing.
    pub writable: bool,
    /// L2 cache size in bytes (default: enough for the whole image, at most 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// Refcount block cache size in bytes (default: 8 MiB at most).
    pub rb_cache_bytes: Option<u64>,
    /// Open for writing even with the corrupt bit set (repair).
    pub allow_corrupt: bool,
    /// Keep snapshots with unusable L1 tables for `check` to report.
    pub for_check: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Meta {
    /// Sizes that decode the tables.
    pub geo: Geometry,
    /// The header as last written (or to be written).
    pub header: Header,
    /// The image file.
    pub file: SharedFile,
    /// Opened for writing.
    pub writable: bool,
    /// The metadata on disk was switched (a snapshot committed) but re-reading it failed: this
    /// copy is out of date, and nothing may be written from it (a close would trim the file
    /// under the new tables). Writes and flushes fail until the image is reopened.
    pub(super) stale: bool,
    /// Whether the image has a backing file (unallocated clusters read from it).
    pub has_backing: bool,
    /// The active L1 table.
    pub(super) l1: Vec<u64>,
    /// Units of the L1 table to write back.
    pub(super) l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables.
    pub(super) l2: TableCache,
    /// Cached refcount blocks.
    pub(super) rb: TableCache,
    /// The refcount table.
    pub(super) reftable: Vec<u64>,
    /// Units of the refcount table to write back.
    pub(super) reftable_dirty: BTreeSet<usize>,
    /// The refcount table moved: write it whole, then the header.
    pub(super) reftable_moved: bool,
    /// The header changed.
    pub(super) header_dirty: bool,
    /// Search for free clusters starts here (cluster index).
    pub(super) free_hint: u64,
    /// Clusters at or beyond this byte offset were never handed out since open: they read zeros.
    pub(super) hwm: u64,
    /// Current length of the file (we extend it ahead of allocations).
    pub(super) file_len: u64,
    /// Length at open, so close can trim only what we added.
    pub(super) orig_len: u64,
    /// Host clusters whose refcount drops once the metadata that stopped using them is durable.
    pub(super) pending_free: Vec<u64>,
    /// Clusters being allocated right now, which free-space searches skip.
    pub(super) reserved: Vec<(u64, u64)>,
    /// Clusters that must never be handed out (a repair in progress: every referenced cluster).
    pub(super) exclude: Option<Vec<bool>>,
    /// Guest clusters with an allocating write in flight, and the notifiers of queues waiting.
    pub inflight: HashMap<u64, Vec<Option<Arc<EventFd>>>>,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Length of the snapshot table on disk.
    pub snapshot_table_bytes: u64,
    /// The options the metadata was opened with (to reload it).
    pub(super) opts: MetaOptions,
    /// Metadata write unit: whole sectors, or the file's direct I/O alignment.
    pub(super) unit: usize,
    /// The dirty bit is set in the header on disk.
    pub(super) dirty_on_disk: bool,
    /// Host clusters holding metadata (`overlap.rs`).
    pub(super) metadata: super::overlap::MetadataMap,
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(super) fn corrupt(what: &str, detail: impl Into<String>) -> StorageError {
    StorageError::corrupt(what, detail)
}

/// Reads the header cluster of `file` and parses it.
pub fn read_header(file: &dyn crate::device::HostFile) -> Result<Header> {
    let len = file.len();
    let mut first = vec![0u8; len.min(512) as usize];
    file.read_exact_at(0, &mut first)?;
    if first.len() < 24 {
        return Header::parse(&first);
    }
    let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Header::parse(&first);
    }
    let mut cluster = vec![0u8; len.min(1 << bits) as usize];
    file.read_exact_at(0, &mut cluster)?;
    Header::parse(&cluster)
}

impl Meta {
    /// Reads and validates the metadata of the image in `file`.
    pub fn open(file: SharedFile, opts: MetaOptions) -> Result<Meta> {
        let header = read_header(file.as_ref())?;
        let geo = Geometry::of(&header);
        let cs = geo.cluster_size;
        let file_len = file.len();
        let name = file.name().to_string();
        let within = |off: u64, len: u64, what: &str| -> Result<()> {
            if off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(corrupt(
                    &name,
                    format!("the {what} at offset {off:#x} ({len} bytes) lies beyond the end of the file ({file_len} bytes)"),
                ));
            }
            Ok(())
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        within(header.l1_table_offset, l1_bytes, "L1 table")?;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        within(header.refcount_table_offset, rt_bytes, "refcount table")?;
        let l1 = read_u64_table(
            file.as_ref(),
            header.l1_table_offset,
            header.l1_size as usize,
        )?;
        let reftable = read_u64_table(
            file.as_ref(),
            header.refcount_table_offset,
            (rt_bytes / 8) as usize,
        )?;
        let (snapshots, snapshot_table_bytes) = if header.nb_snapshots > 0 {
            snapshot_table::read_table(file.as_ref(), header.snapshots_offset, header.nb_snapshots)?
        } else {
            (Vec::new(), 0)
        };
        for s in &snapshots {
            let l1_bytes = u64::from(s.l1_size) * 8;
            if l1_bytes > super::header::MAX_L1_BYTES {
                return Err(corrupt(
                    &name,
                    format!("snapshot '{}' has an invalid L1 table", s.name),
                ));
            }
            if !opts.for_check {
                if s.l1_offset % cs != 0 {
                    return Err(corrupt(
                        &name,
                        format!("snapshot '{}' has an invalid L1 table", s.name),
                    ));
                }
                within(s.l1_offset, l1_bytes, "snapshot L1 table")?;
            }
            // Applying the snapshot sizes the active L1 table from its disk size.
            if let Some(size) = s.disk_size {
                let fits =
                    super::header::l1_entries_for(size, header.cluster_bits, header.extended_l2())
                        .is_some_and(|n| n * 8 <= super::header::MAX_L1_BYTES);
                if !fits {
                    return Err(corrupt(
                        &name,
                        format!("snapshot '{}' has an impossible disk size {size}", s.name),
                    ));
                }
            }
        }
        if opts.writable && header.corrupt() && !opts.allow_corrupt {
            return Err(StorageError::corrupt(
                &name,
                "the image is marked corrupt; open it read-only or repair it with 'strata image check -r all'",
            ));
        }
        let l2_need = (u64::from(header.l1_size).max(1)) * cs;
        let l2_bytes = opts
            .l2_cache_bytes
            .unwrap_or(l2_need.min(DEFAULT_L2_CACHE_BYTES));
        let rb_bytes = opts.rb_cache_bytes.unwrap_or(DEFAULT_RB_CACHE_BYTES);
        let cap = |bytes: u64| ((bytes / cs) as usize).clamp(4, 65536);
        let unit = (file.alignment().max(512) as u64).min(cs) as usize;
        let dirty_on_disk = header.dirty();
        let has_backing = header.backing_file.is_some();
        let mut meta = Meta {
            geo,
            file,
            writable: opts.writable,
            stale: false,
            has_backing,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(cap(l2_bytes)),
            rb: TableCache::new(cap(rb_bytes)),
            reftable,
            reftable_dirty: BTreeSet::new(),
            reftable_moved: false,
            header_dirty: false,
            free_hint: 1,
            hwm: file_len.next_multiple_of(cs),
            file_len,
            orig_len: file_len,
            pending_free: Vec::new(),
            reserved: Vec::new(),
            exclude: None,
            inflight: HashMap::new(),
            snapshots,
            snapshot_table_bytes,
            opts,
            unit,
            dirty_on_disk,
            header,
            metadata: Default::default(),
        };
        meta.rebuild_metadata_map();
        if opts.writable && meta.header.autoclear_features & autoclear::NOT_MAINTAINED != 0 {
            // We do not maintain bitmaps or a raw external data file: the spec asks writers to
            // clear auto-clear bits they do not understand before writing.
            meta.header.autoclear_features = 0;
            meta.write_header()?;
            meta.file.sync_data()?;
        }
        Ok(meta)
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The active L1 table.
    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }

    /// Host offset of the L2 table for L1 index `i`, validated (0 when there is none).
    pub fn l2_offset(&self, i: usize) -> Result<u64> {
        let Some(&e) = self.l1.get(i) else {
            return Ok(0);
        };
        l1_entry_offset(e, &self.geo, self.file_len)
    }

    /// The cache slot holding the L2 table at `offset`, loading it on a miss.
    pub(super) fn l2_slot(&mut self, offset: u64) -> Result<usize> {
        if let Some(s) = self.l2.lookup(offset) {
            return Ok(s);
        }
        let cs = self.geo.cluster_size;
        if offset.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(corrupt(
                self.file.name(),
                format!("L2 table at {offset:#x} lies beyond the end of the file"),
            ));
        }
        self.make_room_l2()?;
        let mut buf = IoBuf::new(cs as usize);
        self.file
            .read_exact_at(offset, buf.as_mut_slice().unwrap_or(&mut []))?;
        Ok(self.l2.insert(offset, buf, false))
    }

    /// Raw entry (and bitmap when extended) `index` of the cached table in `slot`.
    pub(super) fn l2_raw(&self, slot: usize, index: usize) -> (u64, u64) {
        let b = self.l2.bytes(slot);
        let at = self.geo.l2_entry_offset(index);
        let bitmap = if self.geo.extended {
            be64(b, at + 8)
        } else {
            0
        };
        (be64(b, at), bitmap)
    }

    /// Sets entry `index` of the cached table in `slot` (which becomes dirty).
    pub(super) fn set_l2_raw(&mut self, slot: usize, index: usize, raw: u64, bitmap: u64) {
        let at = self.geo.l2_entry_offset(index);
        let extended = self.geo.extended;
        let b = self.l2.bytes_mut(slot);
        b[at..at + 8].copy_from_slice(&raw.to_be_bytes());
        if extended {
            b[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
        }
    }

    /// Sets L1 entry `i`.
    pub(super) fn set_l1(&mut self, i: usize, value: u64) {
        self.l1[i] = value;
        self.l1_dirty.insert(i * 8 / self.unit);
    }

    /// The decoded L2 entry for guest offset `g`, with its table slot (None if no L2 table).
    pub(super) fn entry_at(&mut self, g: u64) -> Result<(L2Entry, Option<(usize, usize)>)> {
        let (l1i, l2i) = self.geo.indices(g);
        let l2_off = self.l2_offset(l1i)?;
        if l2_off == 0 {
            return Ok((L2Entry::Unallocated, None));
        }
        let slot = self.l2_slot(l2_off)?;
        let (raw, bitmap) = self.l2_raw(slot, l2i);
        let e = self.geo.decode(raw, bitmap).map_err(|e| match e {
            StorageError::Corrupt { detail, .. } => corrupt(
                self.file.name(),
                format!("L2 table at {l2_off:#x}, entry {l2i}: {detail}"),
            ),
            other => other,
        })?;
        Ok((e, Some((slot, l2i))))
    }

    /// How the bytes from guest offset `g` on are stored: a mapping and the length of the run it
    /// covers (at most `len`, never past the end of the cluster).
    pub fn map(&mut self, g: u64, len: u64) -> Result<(Mapping, u64)> {
        let cs = self.geo.cluster_size;
        let within = g & (cs - 1);
        let max_run = len.min(cs - within);
        let (entry, _) = self.entry_at(g)?;
        if !self.geo.extended || matches!(entry, L2Entry::Compressed { .. }) {
            let m = match entry {
                L2Entry::Unallocated => Mapping::Unallocated,
                L2Entry::Zero { .. } => Mapping::Zero,
                L2Entry::Normal { host, .. } => Mapping::Allocated(host + within),
                L2Entry::Compressed { offset, len } => Mapping::Compressed {
                    offset,
                    len,
                    within,
                },
                L2Entry::Extended { .. } => Mapping::Unallocated,
            };
            return Ok((m, max_run));
        }
        let scs = self.geo.subcluster_size();
        let first = (within / scs) as u32;
        let kind = subcluster_mapping(&entry, first, &self.geo);
        let mut end = (u64::from(first) + 1) * scs;
        while end < within + max_run {
            let next = subcluster_mapping(&entry, (end / scs) as u32, &self.geo);
            if std::mem::discriminant(&next) != std::mem::discriminant(&kind) {
                break;
            }
            end += scs;
        }
        let run = (end - within).min(max_run);
        let m = match kind {
            Mapping::Allocated(h) => Mapping::Allocated(h + within % scs),
            other => other,
        };
        Ok((m, run))
    }

    /// Every host cluster a compressed descriptor touches.
    pub fn compressed_clusters(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let cs = self.geo.cluster_size;
        let last = (offset + len.max(1) - 1).min(self.file_len.max(offset + 1) - 1);
        (offset / cs)..=(last / cs)
    }
}

/// The validated L2 table offset in L1 entry `e` (0 when unallocated).
pub fn l1_entry_offset(e: u64, geo: &Geometry, file_len: u64) -> Result<u64> {
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(0);
    }
    if e & L1_RESERVED != 0 {
        return Err(corrupt(
            "qcow2 L1 table",
            format!("entry {e:#x} has reserved bits set"),
        ));
    }
    if off % geo.cluster_size != 0 {
        return Err(corrupt(
            "qcow2 L1 table",
            format!("L2 table offset {off:#x} is not cluster aligned"),
        ));
    }
    if off + geo.cluster_size > file_len {
        return Err(corrupt(
            "qcow2 L1 table",
            format!("L2 table offset {off:#x} lies beyond the end of the file"),
        ));
    }
    Ok(off)
}

/// Reads `count` big-endian u64s at `offset` (count bounded by the caller).
pub fn read_u64_table(
    file: &dyn crate::device::HostFile,
    offset: u64,
    count: usize,
) -> Result<Vec<u64>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if offset
        .checked_add(count as u64 * 8)
        .is_none_or(|e| e > file.len())
    {
        return Err(corrupt(
            file.name(),
            format!("a table of {count} entries at {offset:#x} lies beyond the end of the file"),
        ));
    }
    let mut buf = IoBuf::new(count * 8);
    file.read_exact_at(offset, buf.as_mut_slice().unwrap_or(&mut []))?;
    Ok(buf
        .as_slice()
        .unwrap_or(&[])
        .chunks_exact(8)
        .map(|c| be64(c, 0))
        .collect())
}
