//! A datastore whose chunks live in packs on an object store (S3, or a folder), with a local
//! cache folder that holds everything else.
//!
//! The local folder is an ordinary datastore folder (marker, `snapshots/`, `writers/`, locks) —
//! so listing, locking, reading manifests and indexes work as for a local datastore — plus
//! `packs/XX/ID.idx` (a copy of each pack's index) and `cache/XX/DIGEST` (chunk blobs read
//! before, bounded in size, least recently used evicted first). The bucket is the truth:
//!
//! ```text
//! strata-datastore.json          the datastore's marker (chunk size, pack size, encryption)
//! packs/XX/ID                    a pack: blobs, then their index (see crate::pack)
//! snapshots/ID/TIME/index        a snapshot's index (as in a local datastore)
//! snapshots/ID/TIME/manifest     its manifest, written last, create-if-absent
//! ```
//!
//! Opening reconciles the local folder with the bucket (one LIST of `snapshots/`, one of
//! `packs/`, and GETs of what is new). A backup packs new chunks into packs of about the pack
//! size, uploaded by [`UPLOADERS`] threads while it reads on; then uploads the index, then the
//! manifest with a conditional put; only then is the snapshot committed locally. A crash or a
//! network failure at any point leaves at most packs no manifest references (garbage collection
//! removes them) and an index without a manifest (likewise): a snapshot is visible exactly when
//! its manifest exists. Retries with backoff are the object store's ([`crate::s3`]).
//!
//! A restore reads a chunk from the cache, else with one ranged GET from its pack (then caches
//! it); restore workers bound the GETs in flight. A pack that garbage collection rewrote
//! meanwhile is found again after re-listing the packs.
//!
//! Garbage collection and backups of a pack datastore exclude each other through `.gc.lock`
//! (backups hold it shared while they run; gc exclusively): the local mtimes a local datastore
//! uses to run both at once do not exist in a bucket. GC marks the chunks of every snapshot,
//! deletes packs without a live chunk, and rewrites packs whose live bytes are below a fraction
//! of their size (uploading the new packs before deleting the old).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use crate::blob::BLOB_HEADER_LEN;
use crate::chunk_cache::ChunkCache;
use crate::digest::Digest;
use crate::fsutil::{self, io_err};
use crate::objects::{DirObjects, Objects};
use crate::pack::{self, PackEntry};
use crate::pack_writer::PackWriter;
use crate::s3::{S3Config, S3Objects};
use crate::snapshot::SnapshotName;

/// Default pack size target.
pub const DEFAULT_PACK_SIZE: u64 = 16 << 20;
/// Default bound of the local chunk cache.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Default chunk size of a pack datastore: 1 MiB, so that a 16 MiB pack holds 16 or more
/// chunks (finer incremental granularity, and ≥16× fewer PUTs than an object per chunk).
pub const DEFAULT_REMOTE_CHUNK_SIZE: u32 = 1 << 20;
/// The bucket's marker object.
pub const BUCKET_MARKER: &str = "strata-datastore.json";
/// Packs whose live bytes fall below this fraction are rewritten by garbage collection.
pub const DEFAULT_REPACK_BELOW: f64 = 0.5;
/// Pack uploads in flight during a backup.
pub const UPLOADERS: usize = 4;
/// Largest pack accepted (bounds a whole-pack read).
pub const MAX_PACK_SIZE: u64 = 1 << 30;

/// Where a pack datastore's objects are, as its local marker records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteSpec {
    /// `s3` or `dir`.
    pub kind: String,
    /// For `s3`: the bucket (its secret is in `secret-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
    /// For `s3`: the file holding the secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// For `dir`: the folder holding the objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Pack size target in bytes.
    pub pack_size: u64,
    /// Bound of the local chunk cache in bytes.
    pub cache_bytes: u64,
}

impl RemoteSpec {
    /// Connects to the objects.
    pub fn connect(&self) -> Result<Box<dyn Objects>> {
        match self.kind.as_str() {
            "s3" => {
                let mut cfg = self.s3.clone().ok_or_else(|| {
                    StorageError::InvalidInput("An s3 datastore without its bucket".into())
                })?;
                let secret = self.secret_file.as_ref().ok_or_else(|| {
                    StorageError::InvalidInput("An s3 datastore without its secret file".into())
                })?;
                let text = crate::store::read_bounded(secret, 4096)?;
                cfg.secret_key = String::from_utf8_lossy(&text).trim().to_string();
                Ok(Box::new(S3Objects::new(&cfg)?))
            }
            "dir" => {
                let dir = self.dir.as_ref().ok_or_else(|| {
                    StorageError::InvalidInput("A dir datastore without its folder".into())
                })?;
                Ok(Box::new(DirObjects::new(dir)?))
            }
            other => Err(StorageError::Unsupported(format!(
                "datastore backend {other}"
            ))),
        }
    }
}

/// The bucket's marker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BucketMarker {
    /// `strata-datastore`.
    pub format: String,
    /// 1.
    pub version: u32,
    /// Chunk size of every snapshot.
    pub chunk_size: u32,
    /// Pack size target of the writer that created it.
    pub pack_size: u64,
    /// Encryption, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::manifest::Encryption>,
}

/// Where a chunk is: its pack and its blob's place in it.
#[derive(Clone, Debug)]
pub(crate) struct Location {
    pub(crate) pack: Arc<str>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// Figures of the object traffic of one [`Remote`].
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Traffic {
    /// Objects written (packs, indexes, manifests).
    pub puts: u64,
    /// Bytes written.
    pub bytes_put: u64,
    /// Ranged and whole GETs.
    pub gets: u64,
    /// Bytes read.
    pub bytes_got: u64,
    /// Chunks served from the local cache.
    pub cache_hits: u64,
}

/// The object side of a pack datastore. See the module documentation.
#[derive(Debug)]
pub struct Remote {
    objects: Box<dyn Objects>,
    root: PathBuf,
    pack_size: u64,
    cache: ChunkCache,
    catalog: RwLock<HashMap<Digest, Location>>,
    puts: AtomicU64,
    bytes_put: AtomicU64,
    gets: AtomicU64,
    bytes_got: AtomicU64,
}

/// The key of a pack.
pub fn pack_key(id: &str) -> String {
    format!("packs/{}/{id}", id.get(..2).unwrap_or("00"))
}

/// The key of a snapshot's file (`index`, `manifest`).
pub fn snapshot_key(name: &SnapshotName, file: &str) -> String {
    format!("snapshots/{name}/{file}")
}

pub(crate) fn new_pack_id() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| StorageError::Unavailable(format!("No random numbers: {e}")))?;
    Ok(crate::crypt::hex(&b))
}

impl Remote {
    /// Opens the object side of the pack datastore with local folder `root`.
    pub fn open(root: &Path, spec: &RemoteSpec) -> Result<Remote> {
        let objects = spec.connect()?;
        let remote = Remote {
            objects,
            root: root.to_path_buf(),
            pack_size: spec.pack_size.clamp(1 << 20, MAX_PACK_SIZE / 2),
            cache: ChunkCache::open(&root.join("cache"), spec.cache_bytes)?,
            catalog: RwLock::new(HashMap::new()),
            puts: AtomicU64::new(0),
            bytes_put: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            bytes_got: AtomicU64::new(0),
        };
        Ok(remote)
    }

    /// The objects.
    pub fn objects(&self) -> &dyn Objects {
        self.objects.as_ref()
    }

    /// Traffic so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            puts: self.puts.load(Ordering::Relaxed),
            bytes_put: self.bytes_put.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            bytes_got: self.bytes_got.load(Ordering::Relaxed),
            cache_hits: self.cache.hits.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let n = data.len() as u64;
        self.objects.put(key, data)?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.bytes_put.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let b = self.objects.get_range(key, start, len)?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.bytes_got.fetch_add(len, Ordering::Relaxed);
        Ok(b)
    }

    /// Reads the bucket's marker, if it has one.
    pub fn read_bucket_marker(objects: &dyn Objects) -> Result<Option<BucketMarker>> {
        let Some(bytes) = objects.get(BUCKET_MARKER, 64 << 10)? else {
            return Ok(None);
        };
        let m: BucketMarker = crate::manifest::unframe_json(&bytes, BUCKET_MARKER)?;
        if m.format != crate::store::STORE_FORMAT || m.version != crate::store::STORE_VERSION {
            return Err(StorageError::Unsupported(format!(
                "bucket datastore {} version {}",
                m.format, m.version
            )));
        }
        Ok(Some(m))
    }

    pub(crate) fn idx_path(&self, id: &str) -> PathBuf {
        self.root
            .join("packs")
            .join(id.get(..2).unwrap_or("00"))
            .join(format!("{id}.idx"))
    }

    /// Every pack whose index is held locally: id → (pack size, entries).
    pub(crate) fn local_packs(&self) -> Result<BTreeMap<String, (u64, Vec<PackEntry>)>> {
        let mut out = BTreeMap::new();
        let dir = self.root.join("packs");
        for sub in fs::read_dir(&dir)
            .map_err(|e| io_err("Listing", &dir, e))?
            .flatten()
        {
            let Ok(rd) = fs::read_dir(sub.path()) else {
                continue;
            };
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".idx") else {
                    continue;
                };
                let bytes = crate::store::read_bounded(&ent.path(), 64 << 20)?;
                if bytes.len() < 8 {
                    continue;
                }
                let mut sz = [0u8; 8];
                sz.copy_from_slice(&bytes[..8]);
                let size = u64::from_le_bytes(sz);
                match pack::parse_tail(&bytes[8..], size, &format!("local index of pack {id}")) {
                    Ok(entries) => {
                        out.insert(id.to_string(), (size, entries));
                    }
                    // A damaged local copy is fetched again by the next refresh.
                    Err(_) => {
                        let _ = fs::remove_file(ent.path());
                    }
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn save_idx(&self, id: &str, size: u64, tail: &[u8]) -> Result<()> {
        let path = self.idx_path(id);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err("Creating", &dir, e))?;
        let mut bytes = size.to_le_bytes().to_vec();
        bytes.extend_from_slice(tail);
        fsutil::atomic_write(&crate::storefs::RealFs, &dir, &format!("{id}.idx"), &bytes)
    }

    pub(crate) fn add_to_catalog(&self, id: &str, entries: &[PackEntry]) {
        let pack: Arc<str> = Arc::from(id);
        let mut cat = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            cat.insert(
                e.digest,
                Location {
                    pack: pack.clone(),
                    offset: e.offset,
                    len: e.len,
                },
            );
        }
    }

    /// Lists the bucket's packs, fetches the indexes of packs not known locally, forgets
    /// packs that are gone, and rebuilds the chunk catalog.
    pub fn refresh_packs(&self) -> Result<()> {
        let listed = self.objects.list("packs/")?;
        let mut local = self.local_packs()?;
        let mut present = HashSet::new();
        for l in &listed {
            let Some(id) = l.key.rsplit('/').next() else {
                continue;
            };
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            present.insert(id.to_string());
            if local.contains_key(id) {
                continue;
            }
            if l.size > MAX_PACK_SIZE {
                return Err(StorageError::corrupt(
                    format!("pack {id}"),
                    format!("{} bytes exceeds {MAX_PACK_SIZE}", l.size),
                ));
            }
            let what = format!("pack {id}");
            let guess = pack::TAIL_GUESS.min(l.size);
            let mut tail = self.get_range(&l.key, l.size - guess, guess)?;
            let count = pack::parse_trailer(&tail, &what)?;
            let need = pack::tail_len(count);
            if need > tail.len() as u64 {
                if need > l.size {
                    return Err(StorageError::corrupt(what, "shorter than its index"));
                }
                tail = self.get_range(&l.key, l.size - need, need)?;
            }
            let entries = pack::parse_tail(&tail, l.size, &what)?;
            let tail = &tail[tail.len() - need as usize..];
            self.save_idx(id, l.size, tail)?;
            local.insert(id.to_string(), (l.size, entries));
        }
        for id in local.keys() {
            if !present.contains(id) {
                let _ = fs::remove_file(self.idx_path(id));
            }
        }
        local.retain(|id, _| present.contains(id));
        let mut cat = HashMap::new();
        for (id, (_, entries)) in &local {
            let pack: Arc<str> = Arc::from(id.as_str());
            for e in entries {
                cat.entry(e.digest).or_insert(Location {
                    pack: pack.clone(),
                    offset: e.offset,
                    len: e.len,
                });
            }
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = cat;
        Ok(())
    }

    /// The pack size target.
    pub(crate) fn pack_size(&self) -> u64 {
        self.pack_size
    }

    /// A copy of the chunk catalog.
    pub(crate) fn catalog_snapshot(&self) -> HashMap<Digest, Location> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets where chunk `d` is (garbage collection moves it into a new pack).
    pub(crate) fn forget(&self, d: &Digest) {
        self.catalog
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(d);
    }

    /// Whether the bucket holds chunk `d` (as far as the catalog knows).
    pub fn has(&self, d: &Digest) -> bool {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(d)
    }

    /// The stored payload length of chunk `d`, if known.
    pub fn payload_len(&self, d: &Digest) -> Option<u32> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .map(|l| l.len.saturating_sub(BLOB_HEADER_LEN as u32))
    }

    fn locate(&self, d: &Digest) -> Option<Location> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned()
    }

    /// A chunk's blob: from the cache, else by a ranged GET from its pack (then cached).
    /// `Ok((blob, from_cache))`.
    pub fn read_blob(&self, d: &Digest) -> Result<(Vec<u8>, bool)> {
        if let Some(b) = self.cache.get(d) {
            return Ok((b, true));
        }
        Ok((self.fetch_blob(d)?, false))
    }

    /// A chunk's blob from the bucket, bypassing (and refreshing) the cache.
    pub fn fetch_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let mut refreshed = false;
        loop {
            let loc = match self.locate(d) {
                Some(l) => l,
                None if !refreshed => {
                    self.refresh_packs()?;
                    refreshed = true;
                    continue;
                }
                None => {
                    return Err(StorageError::corrupt(
                        format!("chunk {d}"),
                        "missing from the datastore (in no pack)",
                    ))
                }
            };
            match self.get_range(&pack_key(&loc.pack), loc.offset, loc.len as u64) {
                Ok(b) => {
                    self.cache.put(d, &b);
                    return Ok(b);
                }
                // Garbage collection rewrote the pack: look again once.
                Err(StorageError::NotFound(_)) if !refreshed => {
                    self.refresh_packs()?;
                    refreshed = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops a chunk from the cache (it failed its checks).
    pub fn evict(&self, d: &Digest) {
        self.cache.remove(d);
    }

    /// Uploads a snapshot: index, then manifest (create-if-absent).
    pub fn commit_snapshot(
        &self,
        name: &SnapshotName,
        index: &[u8],
        manifest: &[u8],
    ) -> Result<()> {
        self.put(
            &snapshot_key(name, crate::store::INDEX_FILE),
            index.to_vec(),
        )?;
        let created = self.objects.put_new(
            &snapshot_key(name, crate::store::MANIFEST_FILE),
            manifest.to_vec(),
        )?;
        if !created {
            return Err(StorageError::AlreadyExists(format!(
                "Snapshot {name} in {}",
                self.objects.describe()
            )));
        }
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.bytes_put
            .fetch_add(manifest.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A snapshot's manifest and index objects as the bucket holds them; `None` if it has no
    /// manifest (no such snapshot), an error if it has a manifest but no index.
    pub fn read_snapshot_objects(&self, name: &SnapshotName) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let Some(manifest) = self.objects.get(
            &snapshot_key(name, crate::store::MANIFEST_FILE),
            crate::manifest::MAX_MANIFEST_LEN,
        )?
        else {
            return Ok(None);
        };
        let index = self
            .objects
            .get(
                &snapshot_key(name, crate::store::INDEX_FILE),
                crate::index::MAX_INDEX_LEN,
            )?
            .ok_or_else(|| {
                StorageError::corrupt(
                    format!("snapshot {name} in {}", self.objects.describe()),
                    "has a manifest but no index",
                )
            })?;
        self.gets.fetch_add(2, Ordering::Relaxed);
        self.bytes_got
            .fetch_add((manifest.len() + index.len()) as u64, Ordering::Relaxed);
        Ok(Some((manifest, index)))
    }

    /// Removes a snapshot from the bucket: manifest first (it disappears), then its index.
    pub fn remove_snapshot(&self, name: &SnapshotName) -> Result<()> {
        self.objects
            .delete(&snapshot_key(name, crate::store::MANIFEST_FILE))?;
        self.objects
            .delete(&snapshot_key(name, crate::store::INDEX_FILE))
    }

    /// The snapshots in the bucket (those with a manifest), and keys of indexes without one.
    pub fn list_snapshots(&self) -> Result<(Vec<SnapshotName>, Vec<String>)> {
        let listed = self.objects.list("snapshots/")?;
        let keys: HashSet<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        let mut names = Vec::new();
        let mut orphans = Vec::new();
        for l in &listed {
            let rest = l.key.strip_prefix("snapshots/").unwrap_or("");
            if let Some(n) = rest.strip_suffix("/manifest") {
                if let Ok(name) = SnapshotName::parse(n) {
                    names.push(name);
                }
            } else if let Some(n) = rest.strip_suffix("/index") {
                if !keys.contains(format!("snapshots/{n}/manifest").as_str()) {
                    orphans.push(l.key.clone());
                }
            }
        }
        names.sort();
        Ok((names, orphans))
    }

    /// A new pack writer for one backup (or repack, or sync).
    pub fn writer(self: &Arc<Self>) -> PackWriter {
        PackWriter::new(self.clone())
    }
}
