//! The local chunk cache of a pack datastore. See [`ChunkCache`].

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use strata_storage::Result;

use crate::digest::Digest;
use crate::fsutil::{self, io_err};

/// The local chunk cache: blob files under `cache/XX/DIGEST`, at most `limit` bytes, least
/// recently used evicted first. Entries are checked like any blob when used; one that fails is
/// evicted and fetched again.
#[derive(Debug)]
pub(crate) struct ChunkCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<Lru>,
    pub(crate) hits: AtomicU64,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    total: u64,
    tick: u64,
}

impl Lru {
    fn bump(&mut self, d: &Digest) -> bool {
        let Some((size, tick)) = self.entries.get(d).copied() else {
            return false;
        };
        self.order.remove(&tick);
        self.tick += 1;
        self.order.insert(self.tick, *d);
        self.entries.insert(*d, (size, self.tick));
        true
    }

    fn insert(&mut self, d: Digest, size: u64) {
        if self.bump(&d) {
            return;
        }
        self.tick += 1;
        self.order.insert(self.tick, d);
        self.entries.insert(d, (size, self.tick));
        self.total += size;
    }

    fn remove(&mut self, d: &Digest) -> bool {
        match self.entries.remove(d) {
            Some((size, tick)) => {
                self.order.remove(&tick);
                self.total -= size;
                true
            }
            None => false,
        }
    }
}

impl ChunkCache {
    pub(crate) fn open(dir: &Path, limit: u64) -> Result<ChunkCache> {
        fs::create_dir_all(dir).map_err(|e| io_err("Creating", dir, e))?;
        let mut found: Vec<(i128, Digest, u64)> = Vec::new();
        for sub in fs::read_dir(dir)
            .map_err(|e| io_err("Listing", dir, e))?
            .flatten()
        {
            let Ok(rd) = fs::read_dir(sub.path()) else {
                continue;
            };
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let Ok(meta) = ent.metadata() else { continue };
                match Digest::from_hex(&name) {
                    Ok(d) => found.push((fsutil::mtime_ns(&meta), d, meta.len())),
                    Err(_) => {
                        let _ = fs::remove_file(ent.path());
                    }
                }
            }
        }
        found.sort();
        let mut lru = Lru::default();
        for (_, d, size) in found {
            lru.insert(d, size);
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(lru),
            hits: AtomicU64::new(0),
        };
        cache.evict_over_limit();
        Ok(cache)
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{:02x}", d.0[0])).join(d.to_hex())
    }

    pub(crate) fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        if !self.state.lock().unwrap_or_else(|p| p.into_inner()).bump(d) {
            return None;
        }
        let path = self.path(d);
        match crate::store::read_bounded(&path, crate::store::MAX_BLOB_FILE) {
            Ok(b) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // The order survives a restart through the file times.
                let _ = fsutil::touch(&crate::storefs::RealFs, &path);
                Some(b)
            }
            Err(_) => {
                self.remove(d);
                None
            }
        }
    }

    pub(crate) fn put(&self, d: &Digest, blob: &[u8]) {
        if self.limit == 0 || blob.len() as u64 > self.limit {
            return;
        }
        let path = self.path(d);
        let Some(dir) = path.parent() else { return };
        // A cache needs no fsync: an entry lost or torn by a crash fails its checks and is
        // fetched again.
        let written = fs::create_dir_all(dir).is_ok() && {
            let tmp = dir.join(fsutil::temp_name(&d.to_hex()));
            fs::write(&tmp, blob).is_ok() && fs::rename(&tmp, &path).is_ok() || {
                let _ = fs::remove_file(&tmp);
                false
            }
        };
        if written {
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*d, blob.len() as u64);
            self.evict_over_limit();
        }
    }

    pub(crate) fn remove(&self, d: &Digest) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(d);
        let _ = fs::remove_file(self.path(d));
    }

    fn evict_over_limit(&self) {
        loop {
            let victim = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if s.total <= self.limit {
                    return;
                }
                let Some((_, d)) = s.order.iter().next().map(|(t, d)| (*t, *d)) else {
                    return;
                };
                s.remove(&d);
                d
            };
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    #[cfg(test)]
    fn total(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used_within_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 3000).unwrap();
        let ids: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
        for id in &ids[..3] {
            c.put(id, &[1u8; 1000]);
        }
        assert!(c.get(&ids[0]).is_some());
        c.put(&ids[3], &[2u8; 1000]);
        // ids[1] was least recently used.
        assert!(c.get(&ids[1]).is_none());
        assert!(c.get(&ids[0]).is_some());
        assert!(c.get(&ids[3]).is_some());
        assert!(c.total() <= 3000);
        drop(c);
        // Reopened with a smaller bound, it shrinks.
        let c = ChunkCache::open(d.path(), 1000).unwrap();
        assert!(c.total() <= 1000);
    }
}
