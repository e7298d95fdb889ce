//! The metadata of an open qcow2 image, in memory, made of owned parts:
//! - the header (and whether it changed, and whether its dirty bit is on disk);
//! - the active L1 table ([`L1Table`], `l1.rs`);
//! - the cache of L2 tables ([`TableCache`], `cache.rs`);
//! - refcounts with allocation, the file's extent and the metadata map ([`Refcounts`],
//!   `refcounts.rs`);
//! - allocating writes in flight ([`Allocations`], `inflight.rs`);
//! - the internal snapshots.
//!
//! One [`Meta`] per image lives behind a mutex shared by every queue and the image's metadata
//! worker. Nothing a data path does under that mutex makes a system call: an operation that needs
//! a table that is not in memory, a longer file or room in a full cache stops with a [`Stall`]
//! (changing nothing), the queue reads the table on its host queue or asks the worker
//! (`worker.rs`), parks the piece and retries when woken. Control-plane operations that run with
//! the image idle (snapshots, resize, check and repair, close) do their I/O inline instead
//! (`*_blocking` methods).
//!
//! Write planning is in `plan.rs`, the ordered write-back of dirty tables in `writeback.rs`.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bytes::be64;
use crate::device::{HostFile, SharedFile};
use crate::error::{Result, StorageError};
use crate::io::stack::wake::Waiters;
use crate::io::IoBuf;

use super::cache::TableCache;
use super::entry::{subcluster_mapping, Geometry, L2Entry, Mapping, L1_RESERVED, OFFSET_MASK};
use super::header::{autoclear, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::inflight::Allocations;
use super::l1::L1Table;
use super::refcounts::Refcounts;
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

/// A metadata table, by its host offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// An L2 table.
    L2(u64),
    /// A refcount block.
    Refblock(u64),
}

impl Table {
    /// Host offset of the table.
    pub fn offset(self) -> u64 {
        match self {
            Table::L2(o) | Table::Refblock(o) => o,
        }
    }
}

/// Work for the image's metadata worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Write back dirty tables so that the caches can shrink.
    Room,
    /// Grow the file to at least this many bytes.
    Grow(u64),
}

/// Why a metadata operation stopped without changing anything. See the module documentation.
#[derive(Debug)]
pub enum Stall {
    /// A table must be read first.
    Load(Table),
    /// An allocation of the same cluster is in flight (the caller's eventfd was registered).
    Busy,
    /// The metadata worker must do this first.
    Worker(Job),
    /// The operation failed.
    Failed(StorageError),
}

impl From<StorageError> for Stall {
    fn from(e: StorageError) -> Self {
        Stall::Failed(e)
    }
}

/// The outcome of a metadata step.
pub type Step<T> = std::result::Result<T, Stall>;

/// What a queue does about a [`Stall`], decided under the lock by [`Meta::wait_for`].
#[derive(Debug)]
pub enum Await {
    /// Read this table on the host queue and hand it to [`Meta::finish_load`]; then retry.
    Read(Table),
    /// Someone else works on it; retry when woken.
    Wait,
    /// Post this job to the worker; retry when woken.
    Post(Job),
    /// Give up with this error.
    Fail(StorageError),
}

/// See the module documentation.
#[derive(Debug)]
pub struct Meta {
    /// Sizes that decode the tables.
    pub geo: Geometry,
    /// The header as last written (or to be written).
    pub header: Header,
    /// The header changed.
    pub(super) header_dirty: bool,
    /// The dirty bit is set in the header on disk.
    pub(super) dirty_on_disk: bool,
    /// The image file.
    pub file: SharedFile,
    /// The external data file, when the image has one (guest data lives there; see
    /// [`Geometry::external`]). Synced before any L2 table is written.
    pub data_file: Option<SharedFile>,
    /// Opened for writing.
    pub writable: bool,
    /// The metadata on disk was switched (a snapshot committed) but re-reading it failed: this
    /// copy is out of date, and nothing may be written from it (a close would trim the file
    /// under the new tables). Writes and flushes fail until the image is reopened.
    pub(super) stale: bool,
    /// Whether the image has a backing file (unallocated clusters read from it).
    pub has_backing: bool,
    /// The active L1 table.
    pub(super) l1: L1Table,
    /// Cached L2 tables.
    pub(super) l2: TableCache,
    /// Refcounts, allocation, the file's extent and the metadata map.
    pub(super) refs: Refcounts,
    /// Allocating writes in flight.
    pub(super) allocs: Allocations,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Length of the snapshot table on disk.
    pub snapshot_table_bytes: u64,
    /// The options the metadata was opened with (to reload it).
    pub(super) opts: MetaOptions,
    /// Metadata write unit: whole sectors, or the file's direct I/O alignment.
    pub(super) unit: usize,
    /// A write-back has copied dirty state and not finished: a flush must wait for it.
    pub(super) writeback_running: bool,
    /// Queues waiting for the worker's next job to end.
    pub(super) worker_waiters: Waiters,
    /// The worker's last write-back failed with this (cleared by one that succeeds).
    pub(super) worker_error: Option<StorageError>,
    /// The worker's last growth of the file failed with this (cleared by one that succeeds).
    pub(super) grow_error: Option<StorageError>,
    /// Table reads that failed, and how many waiters are still to be told.
    pub(super) failed_loads: Vec<(Table, StorageError, usize)>,
    /// Enabled persistent bitmaps this open flagged in use (consistent until then: whoever
    /// tracks them from now on may trust their bits). See `bitmaps.rs`.
    pub(super) bitmaps_flagged: Vec<String>,
    /// A cache is well above its capacity with nothing it may drop: a write-back would help.
    pub(super) room_wanted: bool,
    /// The refcount table moves the header's fields reflect.
    pub(super) table_moves_seen: u64,
}

pub(super) fn corrupt(what: &str, detail: impl Into<String>) -> StorageError {
    StorageError::corrupt(what, detail)
}

/// `(byte offset in the table, bytes)` of the write units `units` of a table of big-endian
/// u64s, never reaching past `limit_bytes`.
pub(super) fn encode_units(
    table: &[u64],
    units: &[usize],
    unit: usize,
    limit_bytes: u64,
) -> Vec<(u64, Vec<u8>)> {
    let per_unit = unit / 8;
    let mut out = Vec::with_capacity(units.len());
    for &u in units {
        let start = (u * unit) as u64;
        if start >= limit_bytes {
            continue;
        }
        let n = ((u + 1) * unit) as u64;
        let mut bytes = vec![0u8; (n.min(limit_bytes) - start) as usize];
        for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            if let Some(v) = table.get(u * per_unit + i) {
                chunk.copy_from_slice(&v.to_be_bytes());
            }
        }
        out.push((start, bytes));
    }
    out
}

/// Reads the header cluster of `file` and parses it.
pub fn read_header(file: &dyn HostFile) -> Result<Header> {
    let len = file.len();
    let mut first = vec![0u8; len.min(512) as usize];
    file.read_exact_at(0, &mut first)?;
    if first.len() < 24 {
        return Header::parse(&first);
    }
    let bits = crate::bytes::be32(&first, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Header::parse(&first);
    }
    let mut cluster = vec![0u8; len.min(1 << bits) as usize];
    file.read_exact_at(0, &mut cluster)?;
    Header::parse(&cluster)
}

/// Reads one cluster-sized table at `offset` into an aligned buffer (for the cache).
pub(super) fn read_table(file: &dyn HostFile, offset: u64, cluster_size: u64) -> Result<IoBuf> {
    let mut buf = IoBuf::new(cluster_size as usize);
    file.read_exact_at(offset, buf.as_mut_slice().unwrap_or(&mut []))?;
    Ok(buf)
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
        let refs = Refcounts::new(
            geo,
            name.clone(),
            reftable,
            (header.refcount_table_offset, header.refcount_table_clusters),
            cap(rb_bytes),
            unit,
            file_len,
        );
        let mut meta = Meta {
            geo,
            header_dirty: false,
            dirty_on_disk: header.dirty(),
            has_backing: header.backing_file.is_some(),
            header,
            file,
            data_file: None,
            writable: opts.writable,
            stale: false,
            l1: L1Table::new(l1, unit),
            l2: TableCache::new(cap(l2_bytes)),
            refs,
            allocs: Allocations::default(),
            snapshots,
            snapshot_table_bytes,
            opts,
            unit,
            writeback_running: false,
            worker_waiters: Waiters::default(),
            worker_error: None,
            grow_error: None,
            failed_loads: Vec::new(),
            bitmaps_flagged: Vec::new(),
            room_wanted: false,
            table_moves_seen: 0,
        };
        meta.rebuild_metadata_map();
        if opts.writable {
            meta.flag_bitmaps_in_use()?;
        }
        if opts.writable && meta.header.autoclear_features & autoclear::NOT_MAINTAINED != 0 {
            // The spec asks writers to clear auto-clear bits they do not understand before
            // writing.
            meta.header.autoclear_features &= !autoclear::NOT_MAINTAINED;
            meta.write_header()?;
            meta.file.sync_data()?;
        }
        Ok(meta)
    }

    /// Before the first write: flags every enabled persistent bitmap in use (until a tracker
    /// writes their bits back, see `bitmap_store.rs`), or clears the bitmaps' auto-clear bit when their directory does not
    /// parse or cannot be rewritten. See `bitmaps.rs`.
    fn flag_bitmaps_in_use(&mut self) -> Result<()> {
        use super::bitmaps;
        if self.header.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(());
        }
        let Some(data) = self.header.extension(super::header::ext::BITMAPS) else {
            return Ok(());
        };
        let cs = self.geo.cluster_size;
        let file_len = self.file.len();
        let flagged = (|| -> Result<()> {
            let ext = bitmaps::parse_extension(data, file_len, cs)?;
            // Whole write units, from the cluster-aligned directory on.
            let span = ext
                .directory_size
                .next_multiple_of(self.unit as u64)
                .min(file_len - ext.directory_offset);
            let mut buf = IoBuf::new(span as usize);
            let bytes = buf.as_mut_slice().unwrap_or(&mut []);
            self.file.read_exact_at(ext.directory_offset, bytes)?;
            let dir = &mut bytes[..ext.directory_size as usize];
            let list =
                bitmaps::parse_directory(dir, ext.nb_bitmaps, self.header.size, file_len, cs)?;
            let flagged = bitmaps::mark_enabled_in_use(dir, &list);
            if !flagged.is_empty() {
                self.file
                    .write_all_at(ext.directory_offset, buf.as_slice().unwrap_or(&[]))?;
                self.file.sync_data()?;
            }
            self.bitmaps_flagged = flagged;
            Ok(())
        })();
        if let Err(e) = flagged {
            tracing::warn!(
                image = self.file.name(),
                error = %e,
                "the qcow2 bitmaps extension is unusable; it is marked inconsistent"
            );
            self.header.autoclear_features &= !autoclear::BITMAPS;
        }
        Ok(())
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The active L1 table.
    pub fn l1_table(&self) -> &[u64] {
        self.l1.entries()
    }

    /// Length of the file as the metadata knows it.
    pub fn file_len(&self) -> u64 {
        self.refs.file_len()
    }

    /// Host offset of the L2 table for L1 index `i`, validated (0 when there is none).
    pub fn l2_offset(&self, i: usize) -> Result<u64> {
        if i >= self.l1.len() {
            return Ok(0);
        }
        l1_entry_offset(self.l1.get(i), &self.geo, self.refs.file_len())
    }

    fn check_table(&self, offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        if offset
            .checked_add(cs)
            .is_none_or(|e| e > self.refs.file_len())
        {
            return Err(corrupt(
                self.file.name(),
                format!("L2 table at {offset:#x} lies beyond the end of the file"),
            ));
        }
        Ok(())
    }

    /// The cache slot holding the L2 table at `offset`, or a stall to read it.
    pub(super) fn l2_lookup(&mut self, offset: u64) -> Step<usize> {
        if let Some(s) = self.l2.lookup(offset) {
            return Ok(s);
        }
        self.check_table(offset)?;
        Err(Stall::Load(Table::L2(offset)))
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
        let b = self.l2.bytes_mut(slot, at, if extended { 16 } else { 8 });
        crate::bytes::put_be64(b, at, raw);
        if extended {
            crate::bytes::put_be64(b, at + 8, bitmap);
        }
    }

    /// Sets L1 entry `i`.
    pub(super) fn set_l1(&mut self, i: usize, value: u64) {
        self.l1.set(i, value);
    }

    /// The decoded L2 entry for guest offset `g`, with its table slot (None if no L2 table).
    pub(super) fn entry_at(&mut self, g: u64) -> Step<(L2Entry, Option<(usize, usize)>)> {
        let (l1i, l2i) = self.geo.indices(g);
        let l2_off = self.l2_offset(l1i)?;
        if l2_off == 0 {
            return Ok((L2Entry::Unallocated, None));
        }
        let slot = self.l2_lookup(l2_off)?;
        let (raw, bitmap) = self.l2_raw(slot, l2i);
        let e = self.geo.decode(raw, bitmap).map_err(|e| match e {
            StorageError::Corrupt { detail, .. } => corrupt(
                self.file.name(),
                format!("L2 table at {l2_off:#x}, entry {l2i}: {detail}"),
            ),
            other => other,
        })?;
        if self.geo.external {
            let base = g & !(self.geo.cluster_size - 1);
            if let Some(h) = e.host_cluster().filter(|&h| h != base) {
                return Err(Stall::Failed(corrupt(
                    self.file.name(),
                    format!(
                        "L2 table at {l2_off:#x}, entry {l2i}: guest cluster {base:#x} is mapped \
                         to {h:#x} of the external data file (it must be at the guest offset)"
                    ),
                )));
            }
        }
        Ok((e, Some((slot, l2i))))
    }

    /// How the bytes from guest offset `g` on are stored: a mapping and the length of the run it
    /// covers (at most `len`, never past the end of the cluster).
    pub fn map(&mut self, g: u64, len: u64) -> Step<(Mapping, u64)> {
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
        let file_len = self.refs.file_len();
        let last = (offset + len.max(1) - 1).min(file_len.max(offset + 1) - 1);
        (offset / cs)..=(last / cs)
    }

    /// Stops an operation before it changes anything when a cache holds twice its capacity in
    /// tables it cannot drop: a write-back must come first.
    pub(super) fn check_room(&self) -> Step<()> {
        if self.l2.over_limit() || self.refs.blocks().over_limit() {
            return Err(Stall::Worker(Job::Room));
        }
        Ok(())
    }

    /// Ends a data-path operation: drops clean tables beyond the caches' capacity.
    pub(super) fn end_op(&mut self) {
        self.l2.trim();
        let rb = self.refs.trim();
        if rb || self.l2.wants_writeback() {
            self.room_wanted = true;
        }
    }

    /// Work to ask of the worker ahead of need (each once): a file length to grow to, and
    /// whether a write-back would let a full cache shrink.
    /// Growth is asked for while a write-back runs too (the worker grows the file on a thread
    /// of its own); room is not (the write-back running makes it).
    pub(crate) fn take_hints(&mut self) -> (Option<u64>, bool) {
        if self.worker_failed().is_some() {
            return (None, false);
        }
        let room = !self.writeback_running && std::mem::take(&mut self.room_wanted);
        (self.refs.take_grow_hint(), room)
    }

    /// The error of the worker's last write-back or growth, if it failed.
    fn worker_failed(&self) -> Option<&StorageError> {
        self.worker_error.as_ref().or(self.grow_error.as_ref())
    }

    /// Decides, under the lock that saw it, what a queue does about `stall`, registering
    /// `waker` with whatever will end it.
    pub(crate) fn wait_for(&mut self, stall: Stall, waker: Option<&Arc<EventFd>>) -> Await {
        match stall {
            Stall::Failed(e) => Await::Fail(e),
            Stall::Busy => Await::Wait,
            Stall::Load(t) => {
                if let Some(i) = self.failed_loads.iter().position(|f| f.0 == t) {
                    let e = self.failed_loads[i].1.duplicate();
                    self.failed_loads[i].2 -= 1;
                    if self.failed_loads[i].2 == 0 {
                        self.failed_loads.swap_remove(i);
                    }
                    return Await::Fail(e);
                }
                if self.check_room().is_err() {
                    return self.wait_for(Stall::Worker(Job::Room), waker);
                }
                let cache = match t {
                    Table::L2(_) => &mut self.l2,
                    Table::Refblock(_) => self.refs.blocks_mut(),
                };
                if cache.begin_load(t.offset(), waker) {
                    Await::Read(t)
                } else {
                    Await::Wait
                }
            }
            Stall::Worker(job) => {
                // A failed job fails the first piece waiting for it that meets the failure, once:
                // the next one asks again (a transient error must not stop the image; a failed
                // write-back left everything it copied dirty, so retrying is safe).
                let failed = match job {
                    Job::Grow(_) => self.grow_error.take(),
                    Job::Room => self.worker_error.take(),
                };
                if let Some(e) = failed {
                    return Await::Fail(e);
                }
                if let Some(w) = waker {
                    self.worker_waiters.add(w);
                }
                Await::Post(job)
            }
        }
    }

    /// Ends a read started for [`Await::Read`]: `data` is the table, or the read's error.
    /// Returns whom to wake.
    pub(crate) fn finish_load(&mut self, t: Table, data: Result<IoBuf>) -> Waiters {
        let (buf, err) = match data {
            Ok(b) => (Some(b), None),
            Err(e) => (None, Some(e)),
        };
        let cache = match t {
            Table::L2(_) => &mut self.l2,
            Table::Refblock(_) => self.refs.blocks_mut(),
        };
        let waiters = cache.finish_load(t.offset(), buf);
        if let Some(e) = err {
            self.failed_loads.push((t, e, waiters.len().max(1)));
        }
        self.end_op();
        waiters
    }

    /// Inserts a table read outside the lock (by the worker or a control-plane caller), unless
    /// it is in memory already.
    pub(crate) fn insert_loaded(&mut self, t: Table, data: IoBuf) {
        match t {
            Table::L2(o) => self.l2.insert_loaded(o, data),
            Table::Refblock(o) => self.refs.blocks_mut().insert_loaded(o, data),
        };
    }

    /// Reads table `t` now, under the lock: for control-plane operations that run with the
    /// image idle.
    pub(super) fn load_blocking(&mut self, t: Table) -> Result<()> {
        let cache = match t {
            Table::L2(_) => &mut self.l2,
            Table::Refblock(_) => self.refs.blocks_mut(),
        };
        // Keep the cache bounded while a long operation walks many tables.
        cache.trim();
        let data = read_table(self.file.as_ref(), t.offset(), self.geo.cluster_size)?;
        self.insert_loaded(t, data);
        Ok(())
    }

    /// Grows the file to `len` now, under the lock (control plane; the worker grows it for the
    /// data path).
    pub(super) fn grow_blocking(&mut self, len: u64) -> Result<()> {
        if len > self.refs.file_len() {
            self.file.set_len(len)?;
            self.refs.set_file_len(len);
        }
        Ok(())
    }

    /// Runs `f` until it does not stall, doing the I/O it stalls on inline (under the lock):
    /// for control-plane operations that run with the image idle.
    pub(super) fn blocking<T>(&mut self, mut f: impl FnMut(&mut Meta) -> Step<T>) -> Result<T> {
        loop {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(Stall::Failed(e)) => return Err(e),
                Err(Stall::Load(t)) => self.load_blocking(t)?,
                Err(Stall::Worker(Job::Grow(len))) => self.grow_blocking(len)?,
                Err(Stall::Worker(Job::Room)) => {
                    self.writeback_blocking()?;
                    self.end_op();
                    if self.check_room().is_err() {
                        return Err(StorageError::Busy(format!(
                            "{} (its metadata caches are full of tables in use)",
                            self.file.name()
                        )));
                    }
                }
                Err(Stall::Busy) => {
                    return Err(StorageError::Busy(format!(
                        "{} (writes in flight)",
                        self.file.name()
                    )))
                }
            }
        }
    }

    /// The cache slot of the L2 table at `offset`, reading it if needed (control plane).
    pub(super) fn l2_slot_blocking(&mut self, offset: u64) -> Result<usize> {
        self.blocking(|m| m.l2_lookup(offset))
    }

    /// [`Meta::map`] for control-plane callers.
    pub fn map_blocking(&mut self, g: u64, len: u64) -> Result<(Mapping, u64)> {
        self.blocking(|m| m.map(g, len))
    }

    /// The refcount of host cluster `cluster` (control plane).
    pub fn refcount_blocking(&mut self, cluster: u64) -> Result<u64> {
        self.blocking(|m| m.refs.get(cluster))
    }

    /// Adds `delta` to the refcount of `cluster` (control plane).
    pub fn update_refcount_blocking(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        self.blocking(|m| m.refs.update(cluster, delta))
    }

    /// Sets the refcount of `cluster` (repair).
    pub fn set_refcount_blocking(&mut self, cluster: u64, value: u64) -> Result<()> {
        self.blocking(|m| m.refs.set(cluster, value))
    }

    /// Allocates `n` contiguous clusters (control plane): host offset, and whether they are
    /// fresh.
    pub fn alloc_clusters_blocking(&mut self, n: u64) -> Result<(u64, bool)> {
        self.blocking(|m| m.refs.alloc(n))
    }

    /// Makes the L2 table for L1 index `i` exist and be unshared (control plane).
    pub(super) fn writable_l2_blocking(&mut self, i: usize) -> Result<usize> {
        self.blocking(|m| m.writable_l2(i))
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
pub fn read_u64_table(file: &dyn HostFile, offset: u64, count: usize) -> Result<Vec<u64>> {
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
