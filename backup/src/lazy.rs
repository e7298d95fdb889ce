//! A backup snapshot as a read-only block device, read lazily: a read loads only the chunks it
//! touches from the datastore (checking each blob's crc, length and digest as a restore does)
//! and keeps the most recently used ones in a bounded cache. An NBD export of a backup, a file
//! level browse or a live restore can use a snapshot without restoring it first.
//!
//! The snapshot's manifest is held with a shared lock for as long as the device lives, so prune
//! skips it; garbage collection keeps its chunks because its index still names them.
//!
//! # Locking
//! | what | guarded by |
//! |---|---|
//! | the chunk cache (map, use counters, chunks being loaded) | one mutex, never held during chunk I/O |
//! | a chunk several readers miss at once | loaded once: the others wait on a condition variable |
//! | chunk bytes handed out | `Arc<Vec<u8>>`, immutable |

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use strata_storage::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use strata_storage::io::{IoQueue, Op, QueueOptions, SyncExecutor, SyncQueue};
use strata_storage::{Result, StorageError};

use crate::fsutil::Flock;
use crate::index::{Entry, Index};
use crate::lock::lock_snapshot_shared;
use crate::snapshot::SnapshotName;
use crate::store::Datastore;

/// Default bytes of decoded chunks kept in memory per device.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// A backup snapshot read on demand. See the module documentation.
#[derive(Debug)]
pub struct SnapshotDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Datastore,
    name: SnapshotName,
    index: Index,
    cache: Mutex<Cache>,
    loaded: Condvar,
    _hold: Flock,
}

#[derive(Debug, Default)]
struct Cache {
    chunks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    loading: HashSet<u64>,
    clock: u64,
    capacity: usize,
    hits: u64,
    misses: u64,
}

/// Cache figures, for tests and status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunks in memory now.
    pub cached: usize,
    /// Most chunks kept.
    pub capacity: usize,
    /// Reads of a chunk found in the cache.
    pub hits: u64,
    /// Chunks loaded from the datastore.
    pub misses: u64,
}

impl SnapshotDevice {
    /// Opens snapshot `name` of `store`, keeping at most `cache_bytes` of decoded chunks
    /// (at least two chunks).
    pub fn open(store: &Datastore, name: &SnapshotName, cache_bytes: u64) -> Result<Self> {
        let hold = lock_snapshot_shared(store, name)?;
        let (_manifest, index) = store.read_snapshot(name)?;
        let capacity = (cache_bytes / u64::from(index.chunk_size().max(1))).clamp(2, 4096) as usize;
        Ok(SnapshotDevice {
            inner: Arc::new(Inner {
                store: store.clone(),
                name: name.clone(),
                index,
                cache: Mutex::new(Cache {
                    capacity,
                    ..Cache::default()
                }),
                loaded: Condvar::new(),
                _hold: hold,
            }),
        })
    }

    /// The snapshot served.
    pub fn snapshot(&self) -> &SnapshotName {
        &self.inner.name
    }

    /// Cache figures.
    pub fn cache_stats(&self) -> CacheStats {
        let c = self.inner.lock();
        CacheStats {
            cached: c.chunks.len(),
            capacity: c.capacity,
            hits: c.hits,
            misses: c.misses,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chunk `i` (a stored one), from the cache or loaded now.
    fn chunk(&self, i: u64, digest: &crate::Digest, len: usize) -> Result<Arc<Vec<u8>>> {
        let mut c = self.lock();
        loop {
            c.clock += 1;
            let now = c.clock;
            if let Some((data, used)) = c.chunks.get_mut(&i) {
                *used = now;
                let data = data.clone();
                c.hits += 1;
                return Ok(data);
            }
            if !c.loading.contains(&i) {
                break;
            }
            c = self.loaded.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.loading.insert(i);
        c.misses += 1;
        drop(c);
        let mut data = Vec::new();
        let loaded = self.store.load_chunk(digest, len, &mut data).map_err(|e| {
            let (off, _) = self.index.chunk_range(i);
            StorageError::corrupt(
                format!("snapshot {}", self.name),
                format!("chunk {i} at offset {off}: {e}"),
            )
        });
        let mut c = self.lock();
        c.loading.remove(&i);
        let out = loaded.map(|()| {
            let data = Arc::new(data);
            if c.chunks.len() >= c.capacity {
                if let Some(oldest) = c.chunks.iter().min_by_key(|(_, (_, u))| *u).map(|e| *e.0) {
                    c.chunks.remove(&oldest);
                }
            }
            let now = c.clock;
            c.chunks.insert(i, (data.clone(), now));
            data
        });
        drop(c);
        self.loaded.notify_all();
        out
    }

    fn read(&self, offset: u64, buf: &mut strata_storage::io::IoBuf) -> Result<u64> {
        let chunk_size = u64::from(self.index.chunk_size());
        let len = buf.len() as u64;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let i = pos / chunk_size;
            let (start, clen) = self.index.chunk_range(i);
            let within = pos - start;
            let n = (clen as u64 - within).min(len - done);
            let at = done as usize;
            match self.index.entries().get(i as usize) {
                Some(Entry::Zero) => buf.fill_zero(at, n as usize),
                Some(Entry::Stored { digest, .. }) => {
                    let data = self.chunk(i, digest, clen)?;
                    let from = within as usize;
                    buf.copy_from_slice(at, &data[from..from + n as usize]);
                }
                None => {
                    return Err(StorageError::OutOfRange {
                        offset: pos,
                        len: n,
                        size: self.index.size(),
                    })
                }
            }
            done += n;
        }
        Ok(len)
    }
}

impl SyncExecutor for Inner {
    fn size(&self) -> u64 {
        self.index.size()
    }

    fn execute(&self, op: &mut Op) -> Result<u64> {
        match op {
            Op::Read { offset, buf } => self.read(*offset, buf),
            Op::Flush => Ok(0),
            _ => Err(StorageError::ReadOnly(format!(
                "backup snapshot {}",
                self.name
            ))),
        }
    }
}

impl BlockDevice for SnapshotDevice {
    fn size(&self) -> u64 {
        self.inner.index.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::BLOCK_STATUS
    }

    fn alignment(&self) -> usize {
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(Box::new(SyncQueue::new(self.inner.clone(), opts)))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(StorageError::Unsupported(
            "resizing a backup snapshot".into(),
        ))
    }

    /// Zero chunks are not stored: they report as unallocated; stored chunks as data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let index = &self.inner.index;
        let size = index.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        let chunk_size = u64::from(index.chunk_size());
        let kind_of = |e: &Entry| match e {
            Entry::Zero => ExtentKind::Unallocated,
            Entry::Stored { .. } => ExtentKind::Data,
        };
        let first = offset / chunk_size;
        let kind = index
            .entries()
            .get(first as usize)
            .map_or(ExtentKind::Unallocated, kind_of);
        let mut i = first + 1;
        while i * chunk_size < end
            && index
                .entries()
                .get(i as usize)
                .is_some_and(|e| kind_of(e) == kind)
        {
            i += 1;
        }
        Ok(Extent {
            offset,
            len: (i * chunk_size).min(end) - offset,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{create, BackupOptions};
    use crate::progress::NoProgress;
    use strata_storage::io::memory::MemoryDevice;
    use strata_storage::io::{IoBuf, Request};

    fn read_all(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut q = dev.open_queue(&QueueOptions::with_depth(1))?;
        q.submit(Request::read(0, offset, IoBuf::new(len)))
            .map_err(|_| StorageError::Unavailable("full".into()))?;
        let mut out = Vec::new();
        q.wait(None)?;
        q.reap(&mut out);
        let c = out
            .pop()
            .ok_or_else(|| StorageError::Unavailable("none".into()))?;
        c.result?;
        Ok(c.buf.map(|b| b.to_vec()).unwrap_or_default())
    }

    #[test]
    fn reads_match_the_source_and_the_cache_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Datastore::create_with_chunk_size(&dir.path().join("ds"), 64 << 10).unwrap();
        let size = 1 << 20;
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate() {
            // Leave chunks 3 and 4 zero so they are not stored.
            if !(3 * 65536..5 * 65536).contains(&i) {
                *b = (i * 7 % 251) as u8;
            }
        }
        let src: Arc<dyn BlockDevice> = MemoryDevice::read_only_with(&data);
        let opts = BackupOptions {
            id: "image/test".into(),
            source_label: "test".into(),
            source_format: "raw".into(),
            changes: crate::Changes::Untracked,
            pipeline: crate::pipeline::PipelineOptions::default(),
        };
        let out = create(&store, src, &opts, &NoProgress).unwrap();
        let dev = SnapshotDevice::open(&store, &out.snapshot, 3 * 65536).unwrap();
        assert_eq!(dev.size(), size);
        assert!(dev.read_only());
        assert_eq!(read_all(&dev, 0, size as usize).unwrap(), data);
        assert_eq!(read_all(&dev, 65536 - 10, 20).unwrap(), data[65526..65546]);
        let stats = dev.cache_stats();
        assert!(stats.cached <= 3, "{stats:?}");
        let e = dev.block_status(3 * 65536 + 5, size).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, 2 * 65536 - 5));
        let e = dev.block_status(0, 100_000).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, 100_000));
        let mut q = dev.open_queue(&QueueOptions::with_depth(1)).unwrap();
        q.submit(Request::write(0, 0, IoBuf::new(512))).unwrap();
        let mut done = Vec::new();
        q.wait(None).unwrap();
        q.reap(&mut done);
        assert!(matches!(done[0].result, Err(StorageError::ReadOnly(_))));
        assert!(read_all(&dev, size - 1, 2).is_err());
    }
}
