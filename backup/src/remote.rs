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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use crate::blob::BLOB_HEADER_LEN;
use crate::digest::Digest;
use crate::fsutil::{self, io_err};
use crate::objects::{DirObjects, Objects};
use crate::pack::{self, PackBuilder, PackEntry};
use crate::s3::{S3Config, S3Objects};
use crate::snapshot::SnapshotName;
use crate::store::Stored;

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

#[derive(Clone, Debug)]
struct Location {
    pack: Arc<str>,
    offset: u64,
    len: u32,
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

fn new_pack_id() -> Result<String> {
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

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
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

    fn idx_path(&self, id: &str) -> PathBuf {
        self.root
            .join("packs")
            .join(id.get(..2).unwrap_or("00"))
            .join(format!("{id}.idx"))
    }

    /// Every pack whose index is held locally: id → (pack size, entries).
    fn local_packs(&self) -> Result<BTreeMap<String, (u64, Vec<PackEntry>)>> {
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

    fn save_idx(&self, id: &str, size: u64, tail: &[u8]) -> Result<()> {
        let path = self.idx_path(id);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err("Creating", &dir, e))?;
        let mut bytes = size.to_le_bytes().to_vec();
        bytes.extend_from_slice(tail);
        fsutil::atomic_write(&dir, &format!("{id}.idx"), &bytes)
    }

    fn add_to_catalog(&self, id: &str, entries: &[PackEntry]) {
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

/// Puts chunks into packs and uploads them. See the module documentation.
#[derive(Debug)]
pub struct PackWriter {
    remote: Arc<Remote>,
    open: Mutex<PackBuilder>,
    /// Chunks in this writer's packs not yet uploaded: payload lengths.
    pending: Mutex<HashMap<Digest, u32>>,
    tx: Option<crossbeam_channel::Sender<PackBuilder>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicBool>,
    first_err: Arc<Mutex<Option<StorageError>>>,
}

impl PackWriter {
    fn new(remote: Arc<Remote>) -> PackWriter {
        let (tx, rx) = crossbeam_channel::bounded::<PackBuilder>(2);
        let failed = Arc::new(AtomicBool::new(false));
        let first_err = Arc::new(Mutex::new(None));
        let threads = (0..UPLOADERS)
            .map(|_| {
                let (rx, remote, failed, first_err) = (
                    rx.clone(),
                    remote.clone(),
                    failed.clone(),
                    first_err.clone(),
                );
                std::thread::spawn(move || {
                    for builder in rx.iter() {
                        if failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Err(e) = upload_pack(&remote, builder) {
                            failed.store(true, Ordering::Relaxed);
                            first_err
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        PackWriter {
            remote,
            open: Mutex::new(PackBuilder::new()),
            pending: Mutex::new(HashMap::new()),
            tx: Some(tx),
            threads,
            failed,
            first_err,
        }
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            let e = self
                .first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(StorageError::Unavailable(format!(
                "Uploading a pack failed: {e}"
            )));
        }
        Ok(())
    }

    /// What is known of chunk `d` without storing it: `Some(payload length)` if the bucket or
    /// this writer holds it.
    pub fn known(&self, d: &Digest) -> Option<u32> {
        if let Some(n) = self.remote.payload_len(d) {
            return Some(n);
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .copied()
    }

    /// Adds an encoded blob for chunk `d` of `raw_len` bytes unless it is stored already.
    pub fn insert_blob(&self, d: &Digest, blob: &[u8], raw_len: u32) -> Result<Stored> {
        self.check_failed()?;
        if let Some(n) = self.known(d) {
            return Ok(Stored::Existing(n));
        }
        let payload = (blob.len() - BLOB_HEADER_LEN) as u32;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*d, payload);
        let full = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.push(*d, blob, raw_len);
            (open.len() as u64 >= self.remote.pack_size
                || open.count() >= pack::MAX_ENTRIES as usize)
                .then(|| std::mem::take(&mut *open))
        };
        if let Some(b) = full {
            self.send(b)?;
        }
        Ok(Stored::New(payload))
    }

    fn send(&self, b: PackBuilder) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("pack writer closed".into()))?;
        tx.send(b)
            .map_err(|_| StorageError::Unavailable("pack uploaders ended".into()))
    }

    /// Uploads the last pack and waits for every upload; the first failure is returned.
    pub fn finish(mut self) -> Result<()> {
        let last = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        let sent = if last.is_empty() {
            Ok(())
        } else {
            self.send(last)
        };
        self.close();
        sent?;
        if let Some(e) = self
            .first_err
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        Ok(())
    }

    fn close(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // An abandoned writer uploads nothing more: its packs would be garbage.
        self.failed.store(true, Ordering::Relaxed);
        self.close();
    }
}

fn upload_pack(remote: &Remote, builder: PackBuilder) -> Result<()> {
    let id = new_pack_id()?;
    let (bytes, entries) = builder.finish();
    let size = bytes.len() as u64;
    let tail = bytes[bytes.len() - pack::tail_len(entries.len() as u32) as usize..].to_vec();
    remote.put(&pack_key(&id), bytes)?;
    remote.save_idx(&id, size, &tail)?;
    remote.add_to_catalog(&id, &entries);
    Ok(())
}

/// Figures of a pack datastore's garbage collection.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PackGcStats {
    /// Packs before.
    pub packs: u64,
    /// Packs deleted without a live chunk.
    pub packs_removed: u64,
    /// Packs rewritten because their live fraction was below the threshold.
    pub packs_repacked: u64,
    /// Chunks copied into new packs.
    pub chunks_moved: u64,
    /// Bytes of deleted packs.
    pub bytes_removed: u64,
    /// Index objects without a manifest removed (interrupted backups or removals).
    pub orphan_indexes_removed: u64,
}

/// Garbage collection of a pack datastore (the caller holds `.gc.lock` exclusively and has
/// refreshed the snapshots). `marked` is every chunk a snapshot references.
pub fn collect(
    remote: &Arc<Remote>,
    marked: &HashSet<Digest>,
    repack_below: f64,
    progress: &dyn crate::Progress,
) -> Result<PackGcStats> {
    let mut stats = PackGcStats::default();
    let (_, orphans) = remote.list_snapshots()?;
    for key in orphans {
        remote.objects.delete(&key)?;
        stats.orphan_indexes_removed += 1;
    }
    remote.refresh_packs()?;
    let packs = remote.local_packs()?;
    stats.packs = packs.len() as u64;
    // Each chunk counts as live in one pack only: the catalog's (the first in id order).
    let catalog = remote
        .catalog
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut doomed: Vec<(String, u64)> = Vec::new();
    let mut rewrite: Vec<(String, Vec<PackEntry>)> = Vec::new();
    progress.begin("gc", packs.len() as u64);
    for (id, (size, entries)) in &packs {
        let live: Vec<PackEntry> = entries
            .iter()
            .filter(|e| {
                marked.contains(&e.digest)
                    && catalog
                        .get(&e.digest)
                        .is_some_and(|l| &*l.pack == id.as_str())
            })
            .copied()
            .collect();
        let live_bytes: u64 = live.iter().map(|e| e.len as u64).sum();
        if live.is_empty() {
            doomed.push((id.clone(), *size));
        } else if (live_bytes as f64) < repack_below * (*size as f64) {
            rewrite.push((id.clone(), live));
            doomed.push((id.clone(), *size));
        }
    }
    if !rewrite.is_empty() {
        let writer = remote.writer();
        // The rewritten chunks must go into new packs even though the catalog knows them.
        for (_, live) in &rewrite {
            for e in live {
                let blob = remote.fetch_blob(&e.digest)?;
                remote
                    .catalog
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&e.digest);
                writer.insert_blob(&e.digest, &blob, e.raw_len)?;
                stats.chunks_moved += 1;
            }
        }
        writer.finish()?;
        stats.packs_repacked = rewrite.len() as u64;
    }
    // New packs are durable before an old one goes.
    for (id, size) in doomed {
        if progress.cancelled() {
            return Err(StorageError::Cancelled);
        }
        remote.objects.delete(&pack_key(&id))?;
        let _ = fs::remove_file(remote.idx_path(&id));
        if !rewrite.iter().any(|(r, _)| *r == id) {
            stats.packs_removed += 1;
        }
        stats.bytes_removed += size;
        progress.advance(1);
    }
    progress.finish();
    remote.refresh_packs()?;
    Ok(stats)
}

/// The local chunk cache: blob files under `cache/XX/DIGEST`, at most `limit` bytes, least
/// recently used evicted first. Entries are checked like any blob when used; one that fails is
/// evicted and fetched again.
#[derive(Debug)]
struct ChunkCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<Lru>,
    hits: AtomicU64,
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
    fn open(dir: &Path, limit: u64) -> Result<ChunkCache> {
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

    fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        if !self.state.lock().unwrap_or_else(|p| p.into_inner()).bump(d) {
            return None;
        }
        let path = self.path(d);
        match crate::store::read_bounded(&path, crate::store::MAX_BLOB_FILE) {
            Ok(b) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // The order survives a restart through the file times.
                let _ = fsutil::touch(&path);
                Some(b)
            }
            Err(_) => {
                self.remove(d);
                None
            }
        }
    }

    fn put(&self, d: &Digest, blob: &[u8]) {
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

    fn remove(&self, d: &Digest) {
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
