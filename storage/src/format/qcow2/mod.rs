//! qcow2 version 2 and 3 images, compatible with QEMU (docs/interop/qcow2.rst).
//!
//! Two planes, as everywhere in the block layer. [`Qcow2Image`] is the control plane (size,
//! flush, resize, snapshots, check, info) and owns the image's metadata ([`meta::Meta`]: header,
//! L1 table, refcounts with allocation, a bounded cache of L2 tables, allocations in flight)
//! behind one mutex. Its queues (`queue/`) map each request under that mutex — a short lookup in
//! memory that returns zero / allocated at a host offset / compressed / unallocated per cluster or
//! subcluster run — and run the data I/O on the host file's own queues (and the backing image's)
//! outside it, many requests in flight.
//!
//! Metadata is written back, not through: an allocating write takes a cluster (refcount raised
//! in the cache), writes the data with whatever it copies in, and only then updates the cached L2
//! entry; flush writes refcount blocks, syncs, writes L2 tables, syncs, writes the L1 table and
//! header, syncs (`writeback.rs`). A crash therefore leaves at worst leaked clusters.
//! Unsupported features (encryption, unknown incompatible bits) are refused at open with an error
//! naming them.
//!
//! With an external data file (`data_file`) guest clusters live in that file at their guest
//! offsets and are not refcounted; the queues send data I/O to the data file and metadata I/O to
//! the image file, and every write-back syncs the data file before it writes an L2 table. With
//! `data_file_raw` write-zeroes and discards write zeros to the data file, so that it stays a
//! raw image of the disk. An image opened with [`Qcow2Options::refuse_references`] that names a
//! data file is refused before the data file is opened, as one naming a backing file is.
//!
//! No data path makes a system call under the metadata mutex. A table missing from the cache is
//! read on the queue's host queue; write-backs (for guest flushes, or to make room in full caches)
//! and growing the file run on the image's metadata worker (`worker.rs`, a thread for each),
//! which holds the mutex only to copy dirty state and to record the outcome. One queue's flush
//! therefore never stalls another queue's mapping, nor its allocations waiting for the file to
//! grow.
//!
//! # Locking
//! | what | shared by | guarded by |
//! |---|---|---|
//! | [`meta::Meta`] (tables, caches, allocations in flight) | the image, its queues, its worker | one mutex, held for lookups, planning and copying dirty state — never across I/O on a data path; a poisoned one fails the image |
//! | write-backs | the worker, control-plane flushes and rewrites | the write-back lock (worker and control plane only), taken before the mutex |
//! | file growth | the worker, control-plane rewrites | the growth lock (worker and control plane only), taken after the write-back lock and before the mutex |
//! | control-plane rewrites (snapshots, resize, check and repair, rebase) | nothing else: they refuse while requests are in flight | all three locks, with their I/O done under them |
//! | the host file and the backing images | every queue | their own engines |
//! | a qcow2 queue | one consumer thread | `&mut self` |
//!
//! Two writes to one unallocated cluster never allocate twice: the second waits (parked in its
//! queue) until the first has pointed the L2 entry at its cluster.

pub mod backing;
pub mod bitmap_store;
mod bitmap_track;
pub mod bitmaps;
pub mod cache;
pub mod check;
mod check_refcounts;
pub mod codec;
pub mod compress;
pub mod create;
pub mod entry;
pub mod header;
mod inflight;
mod l1;
pub mod meta;
mod ops;
pub mod overlap;
pub mod plan;
mod queue;
pub mod refcount;
mod refcounts;
mod snapshot;
pub mod snapshot_table;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod tools;
mod worker;
mod writeback;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard};

use serde_json::json;

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::{Image, ImageFormat, ImageInfo};
use crate::io::engine::EngineChoice;
use crate::io::file::CacheMode;
use crate::io::{IoQueue, QueueOptions};

use backing::Backing;
use entry::{Geometry, Mapping};
use header::CompressionType;
use meta::{Meta, MetaOptions, Stall};
pub use ops::MapEntry;
use worker::{ControlGuard, Core, Worker};

/// How to open a qcow2 image.
#[derive(Clone, Copy, Debug, Default)]
pub struct Qcow2Options {
    /// L2 cache size in bytes (default: the whole image's L2 tables, at most 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// Refcount block cache size in bytes (default: 8 MiB).
    pub rb_cache_bytes: Option<u64>,
    /// Engine for backing files.
    pub engine: EngineChoice,
    /// Cache mode for backing files.
    pub cache: CacheMode,
    /// Open an image marked corrupt for writing (to repair it).
    pub allow_corrupt: bool,
    /// Do not open the backing file: unallocated clusters read as zeros (for inspecting a single
    /// layer, and for fuzzing without touching the file system). An image whose data is in an
    /// external data file is refused: it cannot be read without that file.
    pub no_backing: bool,
    /// Refuse an image that names another file — a backing file or an external data file —
    /// without opening it (appliance images, whose bytes an untrusted party may have written).
    pub refuse_references: bool,
    /// Open for `check`: an internal snapshot with an unusable L1 table is kept for the check to
    /// report, instead of refusing the image.
    pub for_check: bool,
}

/// State shared by an image and its queues.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The metadata, the file and what the worker shares.
    pub core: Arc<Core>,
    pub worker: Worker,
    pub file: SharedFile,
    /// The external data file, when guest data lives there rather than in `file`.
    pub data_file: Option<SharedFile>,
    pub geo: Geometry,
    pub backing: Option<Arc<dyn Image>>,
    pub backing_size: u64,
    pub size: AtomicU64,
    /// Guest requests accepted by queues and not yet reaped.
    pub active: AtomicUsize,
    pub read_only: bool,
    pub codec: CompressionType,
    pub name: String,
    /// Whether host requests may span clusters. Not when clusters are smaller than the file's
    /// direct I/O alignment: then every request stays below a page and takes the buffered path,
    /// like the metadata in the same pages, so direct and buffered writes never mix in a page.
    pub merge: bool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.worker.stop();
        match self.core.meta() {
            Ok(mut meta) => {
                if let Err(e) = meta.close() {
                    tracing::error!(image = %self.name, error = %e, "closing the qcow2 image failed");
                }
            }
            Err(e) => {
                tracing::error!(image = %self.name, error = %e, "the qcow2 image is not closed cleanly")
            }
        }
    }
}

/// An open qcow2 image. See the module documentation.
#[derive(Debug)]
pub struct Qcow2Image {
    shared: Arc<Shared>,
    backing: Option<Backing>,
}

/// Opens the qcow2 image in `file` (read-only unless the file is writable), with its backing
/// chain.
pub fn open(file: SharedFile, opts: &Qcow2Options) -> Result<Arc<Qcow2Image>> {
    let chain: Vec<PathBuf> = backing::canonical(file.name()).into_iter().collect();
    open_in_chain(file, opts, &chain)
}

/// Smallest cluster that never shares a memory page with another cluster.
const PAGE: u64 = 4096;

pub(crate) fn open_in_chain(
    file: SharedFile,
    opts: &Qcow2Options,
    chain: &[PathBuf],
) -> Result<Arc<Qcow2Image>> {
    let writable = file.capabilities().contains(Capabilities::WRITE);
    let file = buffered_for_small_clusters(file, opts, writable)?;
    let meta = Meta::open(
        file.clone(),
        MetaOptions {
            writable,
            l2_cache_bytes: opts.l2_cache_bytes,
            rb_cache_bytes: opts.rb_cache_bytes,
            allow_corrupt: opts.allow_corrupt,
            for_check: opts.for_check,
        },
    )?;
    let backing = match &meta.header.backing_file {
        Some(name) if opts.refuse_references => {
            return Err(StorageError::Forbidden(format!(
                "{} names the backing file {name:?}; this image must be self-contained",
                file.name()
            )))
        }
        Some(_) if opts.no_backing => None,
        Some(name) => Some(backing::open(
            file.name(),
            name,
            meta.header.backing_format().as_deref(),
            opts,
            chain,
        )?),
        None => None,
    };
    let data_file = match meta.header.data_file() {
        Some(name) if opts.refuse_references => {
            return Err(StorageError::Forbidden(format!(
                "{} keeps its data in the external data file {name:?} (qcow2 data_file); this \
                 image must be self-contained",
                file.name()
            )))
        }
        Some(name) if opts.no_backing => {
            return Err(StorageError::Unsupported(format!(
                "opening {} without the files it names: its guest data is in the external data \
                 file {name:?}",
                file.name()
            )))
        }
        Some(name) => Some(open_data_file(file.name(), &name, opts, writable)?),
        None => None,
    };
    let mut meta = meta;
    meta.data_file = data_file.clone();
    let geo = meta.geo;
    let size = meta.size();
    let codec = meta.header.compression_type();
    let name = file.name().to_string();
    let core = Arc::new(Core::new(meta, file.clone(), name.clone()));
    let shared = Arc::new(Shared {
        geo,
        backing_size: backing.as_ref().map_or(0, |b| b.image.size()),
        backing: backing.as_ref().map(|b| b.image.clone()),
        size: AtomicU64::new(size),
        active: AtomicUsize::new(0),
        read_only: !writable,
        codec,
        merge: geo.cluster_size >= PAGE || file.alignment() <= 1,
        worker: Worker::new(core.clone()),
        core,
        name,
        file,
        data_file,
    });
    let img = Qcow2Image { shared, backing };
    img.repair_if_dirty()?;
    Ok(Arc::new(img))
}

/// Opens the external data file `name` of the image called `image_name` (relative names are
/// resolved against the image's folder, as backing files are).
fn open_data_file(
    image_name: &str,
    name: &str,
    opts: &Qcow2Options,
    writable: bool,
) -> Result<SharedFile> {
    let path = backing::resolve(image_name, name)?;
    if !path.exists() {
        return Err(StorageError::NotFound(path));
    }
    Ok(crate::io::engine::FileDevice::open(
        &path,
        crate::io::file::FileOptions {
            read_only: !writable,
            cache: opts.cache,
        },
        opts.engine,
    )?)
}

/// With clusters smaller than a page, metadata and data clusters share pages, and guest writes of
/// any alignment land in them: direct and buffered writes would race on one page (the kernel then
/// fails fsync with EIO). Such images are served through the page cache, like QEMU does for
/// requests below its alignment.
fn buffered_for_small_clusters(
    file: SharedFile,
    opts: &Qcow2Options,
    writable: bool,
) -> Result<SharedFile> {
    if file.alignment() <= 1 {
        return Ok(file);
    }
    let h = meta::read_header(file.as_ref())?;
    let path = std::path::Path::new(file.name());
    if h.cluster_size() >= PAGE || !path.is_file() {
        return Ok(file);
    }
    tracing::debug!(
        image = file.name(),
        "clusters below a page: using buffered I/O"
    );
    Ok(crate::io::engine::FileDevice::open(
        path,
        crate::io::file::FileOptions {
            read_only: !writable,
            cache: CacheMode::Writeback,
        },
        opts.engine,
    )?)
}

impl Qcow2Image {
    /// The metadata, for reading in-memory state.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        self.shared.core.meta()
    }

    /// The write-back and growth locks and the metadata, for control-plane operations that do
    /// metadata I/O (see the module's locking table).
    pub(crate) fn control(&self) -> Result<(ControlGuard<'_>, MutexGuard<'_, Meta>)> {
        self.shared.core.control()
    }

    /// Runs `f` on the metadata until it no longer needs a table read, reading tables with the
    /// lock released: for control-plane lookups that run beside the data path.
    fn with_tables<T>(&self, mut f: impl FnMut(&mut Meta) -> meta::Step<T>) -> Result<T> {
        loop {
            let t = match f(&mut *self.lock()?) {
                Ok(v) => return Ok(v),
                Err(Stall::Load(t)) => t,
                Err(Stall::Failed(e)) => return Err(e),
                Err(other) => {
                    return Err(StorageError::Busy(format!(
                        "{} ({other:?})",
                        self.shared.name
                    )))
                }
            };
            let data = meta::read_table(
                self.shared.file.as_ref(),
                t.offset(),
                self.shared.geo.cluster_size,
            )?;
            let mut m = self.lock()?;
            m.insert_loaded(t, data);
            m.end_op();
        }
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// The image file.
    pub fn file(&self) -> &SharedFile {
        &self.shared.file
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.shared.geo.cluster_size
    }

    /// The header as it stands (for display: read even from an image that failed).
    pub fn header(&self) -> header::Header {
        crate::sync::lock(&self.shared.core.meta).header.clone()
    }

    /// How the bytes from `offset` on are stored in this layer (at most `len`, at most one
    /// cluster or subcluster run).
    pub fn mapping(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.with_tables(|m| m.map(offset, len))
    }

    fn repair_if_dirty(&self) -> Result<()> {
        let dirty = {
            let m = self.lock()?;
            m.writable && m.header.dirty()
        };
        if dirty {
            let report = self.control()?.1.repair_dirty()?;
            tracing::warn!(
                image = %self.shared.name,
                leaks_fixed = report.leaks_fixed,
                corruptions_fixed = report.corruptions_fixed,
                "the image was not closed cleanly; refcounts were rebuilt"
            );
        }
        Ok(())
    }

    /// Checks the image (see [`check`]); repairs need the image open for writing and no
    /// requests in flight.
    pub fn check(&self, repair: check::Repair) -> Result<check::CheckReport> {
        let (_wb, mut m) = self.control()?;
        if repair != check::Repair::None && !m.allocs.is_empty() {
            return Err(StorageError::Busy(format!(
                "{} (writes in flight)",
                self.shared.name
            )));
        }
        m.check(repair)
    }

    /// Runs a control-plane operation that rewrites metadata wholesale, refusing while any
    /// request is in flight.
    fn exclusive<T>(&self, f: impl FnOnce(&mut Meta) -> Result<T>) -> Result<T> {
        let (_wb, mut m) = self.control()?;
        if self.shared.active.load(Ordering::Acquire) > 0 || !m.allocs.is_empty() {
            return Err(StorageError::Busy(format!(
                "{} (requests are in flight)",
                self.shared.name
            )));
        }
        let r = f(&mut m);
        self.shared.size.store(m.size(), Ordering::Release);
        r
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> Vec<snapshot_table::Snapshot> {
        crate::sync::lock(&self.shared.core.meta).snapshots.clone()
    }

    /// The persistent dirty bitmaps in the image's bitmaps extension, validated (empty when the
    /// image has none, or when auto-clear bit 0 says the extension is not consistent). See
    /// [`bitmaps`].
    pub fn bitmaps(&self) -> Result<Vec<bitmaps::Qcow2Bitmap>> {
        let (data, cs) = {
            let m = self.lock()?;
            let consistent = m.header.autoclear_features & header::autoclear::BITMAPS != 0;
            match m.header.extension(header::ext::BITMAPS) {
                Some(d) if consistent => (d.to_vec(), m.geo.cluster_size),
                _ => return Ok(Vec::new()),
            }
        };
        let (_, _, list) =
            bitmaps::read_directory(self.shared.file.as_ref(), &data, self.size(), cs)?;
        Ok(list)
    }

    /// The bitmap `name` and its bits (see [`bitmaps::read_words`]); one flagged in use is an
    /// error: it was not saved consistently.
    pub fn bitmap_words(&self, name: &str) -> Result<(bitmaps::Qcow2Bitmap, Vec<u64>)> {
        let b = self
            .bitmaps()?
            .into_iter()
            .find(|b| b.name == name)
            .ok_or_else(|| {
                StorageError::InvalidInput(format!(
                    "{} has no bitmap named '{name}'",
                    self.shared.name
                ))
            })?;
        let words = bitmaps::read_words(
            self.shared.file.as_ref(),
            &b,
            self.size(),
            self.shared.geo.cluster_size,
        )?;
        Ok((b, words))
    }

    /// Adds a persistent bitmap (disabled) with the given bits to the image's bitmaps extension;
    /// needs the image open for writing and idle. See [`bitmap_store`].
    pub fn bitmap_add(&self, b: &bitmap_store::NewBitmap<'_>) -> Result<()> {
        self.exclusive(|m| m.add_bitmap(b))
    }

    /// Removes the persistent bitmap `name` with its clusters.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.exclusive(|m| m.remove_bitmap(name))
    }

    /// Creates an internal snapshot of the current contents.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.exclusive(|m| m.snapshot_create(name))
    }

    /// Reverts to snapshot `key` (ID or name).
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.exclusive(|m| m.snapshot_apply(key))
    }

    /// Deletes snapshot `key` (ID or name).
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.exclusive(|m| m.snapshot_delete(key))
    }

    /// Facts for `info` that are specific to qcow2.
    fn format_specific(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let m = self.lock()?;
        let h = &m.header;
        let mut f = BTreeMap::new();
        f.insert(
            "compat".into(),
            json!(if h.version >= 3 { "1.1" } else { "0.10" }),
        );
        f.insert("cluster-size".into(), json!(h.cluster_size()));
        f.insert("refcount-bits".into(), json!(1u32 << h.refcount_order));
        f.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        f.insert("extended-l2".into(), json!(h.extended_l2()));
        f.insert(
            "compression-type".into(),
            json!(h.compression_type().name()),
        );
        if let Some(d) = h.data_file() {
            f.insert("data-file".into(), json!(d));
            f.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        f.insert("corrupt".into(), json!(h.corrupt()));
        f.insert("dirty".into(), json!(h.dirty()));
        if let Some(b) = &h.backing_file {
            f.insert("backing-filename".into(), json!(b));
            if let Some(fmt) = h.backing_format() {
                f.insert("backing-filename-format".into(), json!(fmt));
            }
        }
        let snaps: Vec<serde_json::Value> = m
            .snapshots
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-nsec": s.vm_clock_nsec,
                    "disk-size": s.disk_size,
                })
            })
            .collect();
        if !snaps.is_empty() {
            f.insert("snapshots".into(), json!(snaps));
        }
        drop(m);
        match self.bitmaps() {
            Ok(list) if list.is_empty() => {}
            Ok(list) => {
                let list: Vec<serde_json::Value> = list
                    .iter()
                    .map(|b| {
                        json!({
                            "name": b.name,
                            "granularity": b.granularity,
                            "flags": b.flag_names(),
                        })
                    })
                    .collect();
                f.insert("bitmaps".into(), json!(list));
            }
            Err(e) => {
                f.insert("bitmaps-error".into(), json!(e.to_string()));
            }
        }
        let mut chain = Vec::new();
        let mut next = self.backing.clone();
        while let Some(b) = next {
            chain.push(json!({
                "filename": b.path.display().to_string(),
                "format": b.format.name(),
                "virtual-size": b.image.size(),
            }));
            next = b.qcow2.as_ref().and_then(|q| q.backing.clone());
        }
        if let Some(first) = chain.first() {
            f.insert("full-backing-filename".into(), first["filename"].clone());
            f.insert("backing-chain".into(), json!(chain));
        }
        Ok(f)
    }
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// Version 3 images keep change tracking in their bitmaps extension (`bitmap_track.rs`);
    /// version 2 has none, so theirs stays in a sidecar.
    fn persistent_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        self.shared.geo.v3.then_some(self as _)
    }

    fn capabilities(&self) -> Capabilities {
        if self.shared.read_only {
            Capabilities::FLUSH | Capabilities::BLOCK_STATUS
        } else {
            Capabilities::WRITE
                | Capabilities::FLUSH
                | Capabilities::DISCARD
                | Capabilities::WRITE_ZEROES
                | Capabilities::WRITE_ZEROES_UNMAP
                | Capabilities::RESIZE
                | Capabilities::BLOCK_STATUS
        }
    }

    fn alignment(&self) -> usize {
        self.shared.file.alignment()
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        queue::open_queue(self.shared.clone(), opts)
    }

    fn flush(&self) -> Result<()> {
        if self.shared.read_only {
            return Ok(());
        }
        self.shared.core.flush()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(StorageError::Unsupported(
            "resizing qcow2 images (not yet)".into(),
        ))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        let kind_of = |m: Mapping| match m {
            Mapping::Zero => ExtentKind::Zero,
            Mapping::Unallocated => ExtentKind::Unallocated,
            Mapping::Allocated(_) | Mapping::Compressed { .. } => ExtentKind::Data,
        };
        let (kind, at) = self.with_tables(|m| {
            let (first, run) = m.map(offset, end - offset)?;
            let kind = kind_of(first);
            let mut at = offset + run;
            let mut steps = 0;
            while at < end && steps < 4096 {
                let (next, run) = m.map(at, end - at)?;
                if kind_of(next) != kind {
                    break;
                }
                at += run;
                steps += 1;
            }
            Ok((kind, at))
        })?;
        // Clusters this layer does not hold read from the backing file: report what the backing
        // chain has there (as vmdk does for its parent), so that callers skipping non-data
        // ranges (conversion, space estimates) do not skip the backing file's data.
        if kind == ExtentKind::Unallocated {
            if let Some(b) = self.backing() {
                let bsize = b.image.size();
                if offset < bsize {
                    let e = b
                        .image
                        .block_status(offset, (at - offset).min(bsize - offset))?;
                    return Ok(Extent {
                        offset,
                        len: e.len.min(at - offset),
                        kind: e.kind,
                    });
                }
            }
        }
        Ok(Extent {
            offset,
            len: at - offset,
            kind,
        })
    }
}

impl Image for Qcow2Image {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            filename: self.shared.name.clone(),
            format: ImageFormat::Qcow2,
            virtual_size: self.size(),
            actual_size: self.shared.file.allocated_bytes()?,
            format_specific: self.format_specific()?,
        })
    }
}
