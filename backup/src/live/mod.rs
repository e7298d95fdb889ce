//! Live restore: a backup snapshot served as a block device at once, read lazily and copied on
//! read into its target volume, while a background copy fills in the rest.
//!
//! [`LiveRestore`] is a [`BlockDevice`] over the target volume. The VMM, the NBD server and
//! convert use it like any device and know nothing of backups:
//! - a read of a range whose chunk is not yet on the volume asks for that chunk first (ahead of
//!   the background copy), waits until a worker has fetched, checked and written it, and is
//!   then served from the volume;
//! - a write covering a chunk whole claims it: the background copy skips it and it is restored
//!   when the write completes. A write covering part of a missing chunk waits for that chunk,
//!   like a read, so the chunk's other bytes come from the backup;
//! - a flush flushes the volume and then records every chunk that was on it when the flush was
//!   submitted in the map of restored chunks ([`map`]), so everything a completed flush
//!   acknowledged survives a crash: a chunk is never copied over after that;
//! - a chunk the datastore cannot give (corrupt, missing) is lost: guest reads and partial
//!   writes of it fail with an I/O error, everything else works, and the restore reports the
//!   lost chunks instead of finishing. Never is a lost chunk served as zeros.
//!
//! Workers ([`worker`], a pool of [`LiveOptions::workers`]) run while the device is open; the
//! background copy makes its progress durable every [`worker::PERSIST_EVERY`] or
//! [`worker::PERSIST_BYTES`] (volume flush, then map), so a crash repeats at most that much. When every chunk is on the volume, the last flush is made and the restore record
//! ([`record`]) and map are removed: the volume is an ordinary volume, equal to what a plain
//! restore writes plus the guest's own writes. A device dropped before that (or a process
//! killed) leaves record and map; [`LiveRestore::resume`] (or [`wrap_volume`], which every
//! opener of volumes calls) continues from the map, never from zero.
//!
//! # Locking
//! | what | guarded by |
//! |---|---|
//! | chunk states, demand queue, lost chunks ([`chunks`]) | one mutex, held for a few assignments; never during I/O |
//! | done bits read by guest I/O | atomics (no lock once a chunk is done) |
//! | the map file and what it last recorded | a mutex held while the volume is flushed and the map written |
//! | the map file against another process | an exclusive `flock` on it while the device lives |
//! | the snapshot against prune | a shared lock on its manifest while the device lives |

pub mod chunks;
pub mod map;
mod queue;
pub mod record;
mod worker;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_storage::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use strata_storage::io::{IoQueue, QueueOptions};
use strata_storage::{Result, StorageError};

use crate::fetch::ChunkFetcher;
use crate::fsutil::Flock;
use crate::index::{Entry, Index};
use crate::lock::lock_snapshot_shared;
use crate::progress::Progress;
use crate::snapshot::SnapshotName;
use crate::store::Datastore;
use chunks::Chunks;
use map::RestoredMap;
pub use record::{RestoreMode, RestorePaths, RestoreRecord};

/// How to run a live restore.
#[derive(Clone, Copy, Debug)]
pub struct LiveOptions {
    /// Workers fetching and writing chunks (guest demands and the background copy).
    pub workers: usize,
    /// Whether the background copy runs from the start (otherwise only chunks that guest I/O
    /// asks for are fetched until [`LiveRestore::set_background`] or
    /// [`LiveRestore::copy_to_end`]).
    pub background: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            workers: crate::restore::default_workers(),
            background: true,
        }
    }
}

/// A chunk the datastore could not give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LostChunk {
    /// Chunk number.
    pub chunk: u64,
    /// Its first byte on the volume.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Why.
    pub error: String,
}

/// Where a live restore is.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LiveStatus {
    /// The snapshot restored.
    pub snapshot: String,
    /// Chunks in all.
    pub chunks_total: u64,
    /// Chunks on the volume.
    pub chunks_done: u64,
    /// Chunks being fetched or written.
    pub chunks_busy: u64,
    /// Chunks the datastore could not give.
    pub lost: Vec<LostChunk>,
    /// Bytes fetched from the datastore and written, by this process.
    pub bytes_fetched: u64,
    /// Bytes of zero chunks written as zeroes.
    pub bytes_zeroed: u64,
    /// Bytes of zero chunks that needed no write (the volume already read as zeros).
    pub bytes_zero_skipped: u64,
    /// Every chunk is on the volume and the restore record is gone.
    pub finished: bool,
    /// Seconds since this process opened the restore.
    pub seconds: f64,
}

#[derive(Debug, Default)]
struct Stats {
    fetched: AtomicU64,
    zeroed: AtomicU64,
    zero_skipped: AtomicU64,
}

impl Stats {
    fn fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }
    fn zero_written(&self, n: u64) {
        self.zeroed.fetch_add(n, Ordering::Relaxed);
    }
    fn zero_skipped(&self, n: u64) {
        self.zero_skipped.fetch_add(n, Ordering::Relaxed);
    }
}

/// The map file and what it last recorded.
#[derive(Debug)]
struct MapState {
    file: RestoredMap,
    persisted: Vec<u64>,
    at: Instant,
}

/// What the workers, the queues and the device share.
#[derive(Debug)]
pub(crate) struct Shared {
    chunks: Chunks,
    target: Arc<dyn BlockDevice>,
    fetcher: Arc<dyn ChunkFetcher>,
    index: Index,
    snapshot: SnapshotName,
    paths: RestorePaths,
    map: Mutex<MapState>,
    /// Bytes of chunks put on the volume since the map was last written.
    since_persist: AtomicU64,
    stats: Stats,
    errors: Mutex<Vec<String>>,
    opened: Instant,
    _hold: Flock,
}

impl Shared {
    fn lock_map(&self) -> MutexGuard<'_, MapState> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes the volume, then records every chunk that was on it before the flush.
    pub(crate) fn persist(&self) -> Result<()> {
        let mut m = self.lock_map();
        let capture = self.chunks.capture();
        self.write_map(&mut m, capture, true)
    }

    /// Records `captured` (taken before a volume flush that has completed since).
    pub(crate) fn persist_flushed(&self, captured: Vec<u64>) -> Result<()> {
        let mut m = self.lock_map();
        self.write_map(&mut m, captured, false)
    }

    fn write_map(&self, m: &mut MapState, captured: Vec<u64>, flush: bool) -> Result<()> {
        let merged: Vec<u64> = captured
            .iter()
            .zip(m.persisted.iter())
            .map(|(a, b)| a | b)
            .collect();
        m.at = Instant::now();
        self.since_persist.store(0, Ordering::Relaxed);
        if merged == m.persisted {
            return Ok(());
        }
        if flush {
            self.target.flush()?;
        }
        m.file.write(&merged)?;
        m.persisted = merged;
        Ok(())
    }

    /// Makes progress durable if the last time was [`worker::PERSIST_EVERY`] or
    /// [`worker::PERSIST_BYTES`] of copying ago and nobody else is doing it.
    fn maybe_persist(&self, copied: u64) {
        let since = self.since_persist.fetch_add(copied, Ordering::Relaxed) + copied;
        let Ok(mut m) = self.map.try_lock() else {
            return;
        };
        if m.at.elapsed() < worker::PERSIST_EVERY && since < worker::PERSIST_BYTES {
            return;
        }
        let capture = self.chunks.capture();
        if let Err(e) = self.write_map(&mut m, capture, true) {
            tracing::warn!(restore = %self.snapshot, error = %e, "recording live-restore progress failed");
        }
    }

    /// Every chunk is on the volume: final flush, then the record and map go.
    fn finish(&self) -> Result<()> {
        {
            let mut m = self.lock_map();
            let capture = self.chunks.capture();
            self.write_map(&mut m, capture, true)?;
            self.target.flush()?;
        }
        self.paths.remove()?;
        self.chunks.set_finished();
        tracing::info!(restore = %self.snapshot, "live restore finished");
        Ok(())
    }

    fn record_error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
        self.chunks.poke();
    }

    fn status(&self) -> LiveStatus {
        let c = self.chunks.counts();
        let lost = self
            .chunks
            .lost()
            .into_iter()
            .map(|(chunk, error)| {
                let (offset, len) = self.index.chunk_range(chunk);
                LostChunk {
                    chunk,
                    offset,
                    len: len as u64,
                    error,
                }
            })
            .collect();
        LiveStatus {
            snapshot: self.snapshot.to_string(),
            chunks_total: self.index.entries().len() as u64,
            chunks_done: c.done,
            chunks_busy: c.busy,
            lost,
            bytes_fetched: self.stats.fetched.load(Ordering::Relaxed),
            bytes_zeroed: self.stats.zeroed.load(Ordering::Relaxed),
            bytes_zero_skipped: self.stats.zero_skipped.load(Ordering::Relaxed),
            finished: self.chunks.finished(),
            seconds: self.opened.elapsed().as_secs_f64(),
        }
    }
}

/// The workers of one open device; dropping it stops them and records progress.
#[derive(Debug)]
pub(crate) struct Inner {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.chunks.stop();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if !self.shared.chunks.finished() {
            if let Err(e) = self.shared.persist() {
                tracing::warn!(restore = %self.shared.snapshot, error = %e, "recording live-restore progress at close failed");
            }
        }
    }
}

/// A volume under live restore. See the module documentation.
#[derive(Debug, Clone)]
pub struct LiveRestore {
    inner: Arc<Inner>,
}

/// A handle that does not keep a [`LiveRestore`] open (for registries of open devices).
#[derive(Debug, Clone)]
pub struct WeakLiveRestore(std::sync::Weak<Inner>);

impl WeakLiveRestore {
    /// The device, if it is still open.
    pub fn upgrade(&self) -> Option<LiveRestore> {
        self.0.upgrade().map(|inner| LiveRestore { inner })
    }
}

impl LiveRestore {
    /// Starts a live restore of snapshot `name` of `store` onto `target` (the volume named
    /// `target_label`, `lv:VG/NAME`): writes the map and then the record at `paths`, and opens
    /// the device. The volume must not be under restore already.
    pub fn start(
        store: &Datastore,
        name: &SnapshotName,
        target: Arc<dyn BlockDevice>,
        target_label: &str,
        paths: &RestorePaths,
        opts: LiveOptions,
    ) -> Result<LiveRestore> {
        if let Some(rec) = paths.read()? {
            return Err(StorageError::Busy(format!(
                "{target_label} is already being restored from {}",
                rec.snapshot
            )));
        }
        let hold = lock_snapshot_shared(store, name)?;
        let (manifest, index) = store.read_snapshot(name)?;
        check_target(&target, manifest.size, name)?;
        let record = RestoreRecord {
            format: record::RECORD_FORMAT.into(),
            version: record::RECORD_VERSION,
            mode: RestoreMode::Live,
            restore_id: RestoreRecord::new_id(),
            snapshot: name.to_string(),
            datastore: absolute(store.root()),
            target: target_label.to_string(),
            size: manifest.size,
            chunk_size: index.chunk_size(),
            chunk_count: index.entries().len() as u64,
            started: crate::time::now().max(0) as u64,
        };
        let count = record.chunk_count;
        let file =
            RestoredMap::create(&paths.map(), index.chunk_size(), count, &record.id_bytes()?)?;
        // The record goes last: a map without a record is nothing, a record always has its map.
        paths.write(&record)?;
        let words = vec![0u64; map::words_for(count)];
        Ok(Self::open(
            store, name, index, target, paths, file, words, hold, opts,
        ))
    }

    /// Opens the live restore recorded at `paths` over its volume `target`, continuing from its
    /// map.
    pub fn resume(
        paths: &RestorePaths,
        target: Arc<dyn BlockDevice>,
        opts: LiveOptions,
    ) -> Result<LiveRestore> {
        let rec = paths.read()?.ok_or_else(|| {
            StorageError::InvalidInput(format!(
                "No restore is recorded in {}",
                paths.record().display()
            ))
        })?;
        if rec.mode != RestoreMode::Live {
            return Err(StorageError::InvalidInput(format!(
                "{} holds an unfinished plain restore of {}, not a live one",
                rec.target, rec.snapshot
            )));
        }
        let store = Datastore::open(&rec.datastore)?;
        let name = SnapshotName::parse(&rec.snapshot)?;
        let hold = lock_snapshot_shared(&store, &name)?;
        let (manifest, index) = store.read_snapshot(&name)?;
        if manifest.size != rec.size
            || index.chunk_size() != rec.chunk_size
            || index.entries().len() as u64 != rec.chunk_count
        {
            return Err(StorageError::corrupt(
                paths.record().display().to_string(),
                format!("does not match snapshot {name}"),
            ));
        }
        check_target(&target, manifest.size, &name)?;
        let (file, words) = RestoredMap::open(
            &paths.map(),
            rec.chunk_size,
            rec.chunk_count,
            &rec.id_bytes()?,
        )?;
        Ok(Self::open(
            &store, &name, index, target, paths, file, words, hold, opts,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        store: &Datastore,
        name: &SnapshotName,
        index: Index,
        target: Arc<dyn BlockDevice>,
        paths: &RestorePaths,
        file: RestoredMap,
        words: Vec<u64>,
        hold: Flock,
        opts: LiveOptions,
    ) -> LiveRestore {
        let count = index.entries().len() as u64;
        let shared = Arc::new(Shared {
            chunks: Chunks::new(count, &words, opts.background),
            target,
            fetcher: Arc::new(store.clone()),
            index,
            snapshot: name.clone(),
            paths: paths.clone(),
            map: Mutex::new(MapState {
                file,
                persisted: words,
                at: Instant::now(),
            }),
            since_persist: AtomicU64::new(0),
            stats: Stats::default(),
            errors: Mutex::new(Vec::new()),
            opened: Instant::now(),
            _hold: hold,
        });
        let workers = (0..opts.workers.clamp(1, crate::restore::MAX_WORKERS))
            .filter_map(|n| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("live-restore-{n}"))
                    .spawn(move || worker::run(s))
                    .ok()
            })
            .collect();
        LiveRestore {
            inner: Arc::new(Inner { shared, workers }),
        }
    }

    /// A handle that does not keep the device open.
    pub fn downgrade(&self) -> WeakLiveRestore {
        WeakLiveRestore(Arc::downgrade(&self.inner))
    }

    /// The snapshot restored.
    pub fn snapshot(&self) -> &SnapshotName {
        &self.inner.shared.snapshot
    }

    /// Where the restore is.
    pub fn status(&self) -> LiveStatus {
        self.inner.shared.status()
    }

    /// Pauses or continues the background copy (guest demands are served either way).
    pub fn set_background(&self, on: bool) {
        self.inner.shared.chunks.set_background(on);
    }

    /// Runs the background copy to its end, reporting progress: `Ok` when the restore is final
    /// (the volume is an ordinary volume); an error naming the lost chunks when the datastore
    /// could not give some (the volume stays under live restore and usable, those ranges
    /// failing); [`StorageError::Cancelled`] when `progress` asks to stop (the copy pauses,
    /// progress is recorded, and it continues wherever the volume is opened next).
    pub fn copy_to_end(&self, progress: &dyn Progress) -> Result<LiveStatus> {
        let s = &self.inner.shared;
        let chunk_size = u64::from(s.index.chunk_size());
        let size = s.index.size();
        s.chunks.set_background(true);
        progress.begin("live restore", size);
        let mut reported = 0u64;
        loop {
            let done = (s.chunks.counts().done * chunk_size).min(size);
            if done > reported {
                progress.advance(done - reported);
                reported = done;
            }
            if s.chunks.finished() {
                progress.finish();
                return Ok(s.status());
            }
            if let Some(e) = s.errors.lock().unwrap_or_else(|p| p.into_inner()).first() {
                progress.finish();
                return Err(StorageError::Unavailable(format!(
                    "Live restore of {}: {e}",
                    s.snapshot
                )));
            }
            if s.chunks.copy_ended() && !s.chunks.all_done() {
                progress.finish();
                return Err(lost_error(&s.status()));
            }
            if progress.cancelled() {
                s.chunks.set_background(false);
                progress.finish();
                s.persist()?;
                return Err(StorageError::Cancelled);
            }
            s.chunks.wait_change(Duration::from_millis(200));
        }
    }
}

/// The error of a restore that lost chunks, naming them.
fn lost_error(st: &LiveStatus) -> StorageError {
    const SHOWN: usize = 8;
    let mut list: Vec<String> = st
        .lost
        .iter()
        .take(SHOWN)
        .map(|l| {
            format!(
                "chunk {} (offset {}, {} bytes): {}",
                l.chunk, l.offset, l.len, l.error
            )
        })
        .collect();
    if st.lost.len() > SHOWN {
        list.push(format!("and {} more", st.lost.len() - SHOWN));
    }
    StorageError::corrupt(
        format!("live restore of {}", st.snapshot),
        format!(
            "{} of {} chunks could not be restored; the volume stays under live restore and \
             reads of those ranges fail: {}",
            st.lost.len(),
            st.chunks_total,
            list.join("; ")
        ),
    )
}

fn check_target(target: &Arc<dyn BlockDevice>, size: u64, name: &SnapshotName) -> Result<()> {
    if target.size() != size {
        return Err(StorageError::InvalidInput(format!(
            "The target holds {} bytes, snapshot {name} has {size}",
            target.size()
        )));
    }
    if target.read_only() {
        return Err(StorageError::ReadOnly(
            "A live restore's target (the restore writes into it as it is read)".into(),
        ));
    }
    Ok(())
}

fn absolute(p: &Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

impl BlockDevice for LiveRestore {
    fn size(&self) -> u64 {
        self.inner.shared.index.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.shared.target.capabilities() - Capabilities::RESIZE
    }

    fn alignment(&self) -> usize {
        self.inner.shared.target.alignment()
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        queue::open(self.inner.clone(), opts)
    }

    fn flush(&self) -> Result<()> {
        let s = &self.inner.shared;
        if s.chunks.finished() {
            return s.target.flush();
        }
        s.persist()
    }

    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(StorageError::Unsupported(
            "resizing a volume under live restore".into(),
        ))
    }

    /// Chunks on the volume report what the volume says; the others what the snapshot holds.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let s = &self.inner.shared;
        let size = s.index.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        if s.chunks.all_done() {
            return s.target.block_status(offset, end - offset);
        }
        let chunk_size = u64::from(s.index.chunk_size());
        let i = offset / chunk_size;
        let chunk_end = ((i + 1) * chunk_size).min(end);
        if s.chunks.is_done(i) {
            return s.target.block_status(offset, chunk_end - offset);
        }
        let kind = match s.index.entries().get(i as usize) {
            Some(Entry::Zero) => ExtentKind::Zero,
            _ => ExtentKind::Data,
        };
        Ok(Extent {
            offset,
            len: chunk_end - offset,
            kind,
        })
    }
}

/// A volume as an opener gets it: itself, or the live-restore device over it.
#[derive(Debug)]
pub enum Wrapped {
    /// Not under restore.
    Plain(Arc<dyn BlockDevice>),
    /// Under live restore: the device to use instead.
    Live(LiveRestore),
}

impl Wrapped {
    /// The device to use.
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            Wrapped::Plain(d) => d.clone(),
            Wrapped::Live(l) => Arc::new(l.clone()),
        }
    }
}

/// What every opener of volume `VG/NAME` (of data directory `data_dir`) calls with the volume
/// it opened: a volume under live restore comes back as the live-restore device, resumed from
/// its map (its workers continue the copy while it is open); a volume left by an unfinished
/// plain restore is refused; any other volume comes back as it is.
pub fn wrap_volume(
    data_dir: &Path,
    vg: &str,
    lv: &str,
    device: Arc<dyn BlockDevice>,
    opts: LiveOptions,
) -> Result<Wrapped> {
    let paths = RestorePaths::of(data_dir, vg, lv);
    let Some(rec) = paths.read()? else {
        return Ok(Wrapped::Plain(device));
    };
    match rec.mode {
        RestoreMode::Full => Err(StorageError::Busy(format!(
            "lv:{vg}/{lv} holds an unfinished restore of {} (restore it again, or live with \
             --live, before using it)",
            rec.snapshot
        ))),
        RestoreMode::Live if device.read_only() => Err(StorageError::InvalidInput(format!(
            "lv:{vg}/{lv} is under live restore from {}: open it writable (the restore writes \
             into it as it is read)",
            rec.snapshot
        ))),
        RestoreMode::Live => Ok(Wrapped::Live(LiveRestore::resume(&paths, device, opts)?)),
    }
}

/// [`wrap_volume`] for a source opened by name (`strata_storage::source::open_source`): a
/// volume under live restore comes back as the live-restore device, an image as it is.
pub fn wrap_source(
    source: &strata_storage::source::Source,
    data_dir: &Path,
    opts: LiveOptions,
) -> Result<Wrapped> {
    match source {
        strata_storage::source::Source::Volume { name, device, .. } => {
            let (vg, lv) = name.split_once('/').ok_or_else(|| {
                StorageError::InvalidInput(format!("Volume name {name:?} is not VG/NAME"))
            })?;
            wrap_volume(data_dir, vg, lv, device.clone(), opts)
        }
        other => Ok(Wrapped::Plain(other.device())),
    }
}
