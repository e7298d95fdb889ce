//! The datastore on disk: a marker file, content-addressed chunk blobs in 256 fan-out
//! directories, and snapshot directories. See docs/format-datastore.md for the layout.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use std::sync::Arc;

use crate::blob;
use crate::crypt::CryptKey;
use crate::digest::Digest;
pub use crate::fsutil::read_bounded;
use crate::fsutil::{self, io_err};
use crate::index::Index;
use crate::manifest::{self, Manifest, MAX_MANIFEST_LEN};
use crate::remote::{BucketMarker, Remote, RemoteSpec};
use crate::snapshot::{self, SnapshotName};
use crate::storefs::{self, StoreFs};

/// Name of the marker file that identifies a datastore.
pub const MARKER: &str = ".strata-datastore";
/// The marker's `format` field.
pub const STORE_FORMAT: &str = "strata-datastore";
/// Datastore layout version.
pub const STORE_VERSION: u32 = 1;
/// Chunk size for block devices: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Index file name in a snapshot directory.
pub const INDEX_FILE: &str = "index";
/// Manifest file name in a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest";
/// Largest chunk file read (a bigger one is damaged: refused before reading it into memory).
pub const MAX_BLOB_FILE: u64 = (blob::BLOB_HEADER_LEN + blob::MAX_PAYLOAD_LEN) as u64;
/// Infix of a chunk that garbage collection has set aside before deleting it.
pub const GC_INFIX: &str = ".gc-";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Marker {
    format: String,
    version: u32,
    chunk_size: u32,
    /// Set in an encrypted datastore: its cipher and key fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<manifest::Encryption>,
    /// Set in the local folder of a pack datastore: where its objects are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote: Option<RemoteSpec>,
    /// An unprotected key file that opening loads (datastores the appliance manages, so that
    /// its jobs and resumed live restores run unattended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
}

/// How to create a datastore.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Chunk size (a power of two from 64 KiB to 16 MiB).
    pub chunk_size: u32,
    /// Encrypt with this key (see [`crate::crypt`]); `None` stores plaintext.
    pub key: Option<CryptKey>,
    /// Record this (unprotected) key file in the marker: opening the datastore loads it.
    pub key_file: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            key: None,
            key_file: None,
        }
    }
}

/// What storing a chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Written now; payload bytes.
    New(u32),
    /// Already present (its modification time was refreshed); payload bytes.
    Existing(u32),
}

/// An open datastore.
#[derive(Debug, Clone)]
pub struct Datastore {
    root: PathBuf,
    chunk_size: u32,
    /// The fingerprint of the datastore's key, when it is encrypted.
    fingerprint: Option<String>,
    /// The unlocked key, once given ([`Datastore::with_key`]).
    key: Option<Arc<CryptKey>>,
    /// For a pack datastore (S3): its objects. The folder is then its local cache.
    remote: Option<Arc<Remote>>,
    /// The seam through which the local folder is changed.
    fs: Arc<dyn StoreFs>,
}

impl Datastore {
    /// Creates a datastore in `root` (made if missing; an existing non-empty folder that is not a
    /// datastore is refused).
    pub fn create(root: &Path) -> Result<Datastore> {
        Datastore::create_with_chunk_size(root, DEFAULT_CHUNK_SIZE)
    }

    /// Creates a datastore whose snapshots use chunks of `chunk_size` bytes (a power of two from
    /// 64 KiB to 16 MiB; 4 MiB suits block devices).
    pub fn create_with_chunk_size(root: &Path, chunk_size: u32) -> Result<Datastore> {
        Datastore::create_with(
            root,
            &CreateOptions {
                chunk_size,
                ..Default::default()
            },
        )
    }

    /// Creates a datastore with the given options; an encrypted one comes back with its key.
    pub fn create_with(root: &Path, opts: &CreateOptions) -> Result<Datastore> {
        Datastore::create_on(root, opts, storefs::real())
    }

    /// [`Datastore::create_with`], changing the disk through `sfs`.
    pub fn create_on(
        root: &Path,
        opts: &CreateOptions,
        sfs: Arc<dyn StoreFs>,
    ) -> Result<Datastore> {
        let chunk_size = opts.chunk_size;
        Index::new(0, chunk_size, Vec::new())?;
        sfs.create_dir_all(root)
            .map_err(|e| io_err("Creating", root, e))?;
        // What an interrupted creation left may be there (and goes); anything else is refused.
        for t in require_new_folder(root)? {
            sfs.remove_file(&t).map_err(|e| io_err("Removing", &t, e))?;
        }
        let chunks = root.join("chunks");
        for i in 0..=255u8 {
            let d = chunks.join(format!("{i:02x}"));
            sfs.create_dir_all(&d)
                .map_err(|e| io_err("Creating", &d, e))?;
        }
        for d in ["snapshots", "writers"] {
            sfs.create_dir_all(&root.join(d))
                .map_err(|e| io_err("Creating", &root.join(d), e))?;
        }
        fsutil::fsync_dir(sfs.as_ref(), &chunks)?;
        fsutil::fsync_dir(sfs.as_ref(), root)?;
        let marker = manifest::frame_json(&Marker {
            format: STORE_FORMAT.into(),
            version: STORE_VERSION,
            chunk_size,
            encryption: opts.key.as_ref().map(|k| manifest::Encryption {
                cipher: crate::crypt::CIPHER.into(),
                key_fingerprint: k.fingerprint().to_string(),
            }),
            remote: None,
            key_file: opts.key_file.clone(),
        })?;
        // The marker goes last: a datastore whose creation was interrupted has none.
        fsutil::atomic_write(sfs.as_ref(), root, MARKER, &marker)?;
        let store = Datastore::open_on(root, sfs)?;
        match &opts.key {
            Some(k) => store.with_key(k.clone()),
            None => Ok(store),
        }
    }

    /// Opens the datastore in `root`.
    pub fn open(root: &Path) -> Result<Datastore> {
        Datastore::open_on(root, storefs::real())
    }

    /// [`Datastore::open`], changing the disk through `sfs`.
    pub fn open_on(root: &Path, sfs: Arc<dyn StoreFs>) -> Result<Datastore> {
        let path = root.join(MARKER);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StorageError::InvalidInput(format!(
                    "{} is not a datastore (no {MARKER}); create one with `strata backup init`",
                    root.display()
                )))
            }
            Err(e) => return Err(io_err("Reading", &path, e)),
        };
        let marker: Marker = manifest::unframe_json(&bytes, &path.display().to_string())?;
        if marker.format != STORE_FORMAT {
            return Err(StorageError::corrupt(
                path.display().to_string(),
                "not a datastore marker",
            ));
        }
        if marker.version != STORE_VERSION {
            return Err(StorageError::Unsupported(format!(
                "datastore version {} in {}",
                marker.version,
                root.display()
            )));
        }
        let chunk_size = marker.chunk_size;
        Index::new(0, chunk_size, Vec::new())
            .map_err(|e| StorageError::corrupt(path.display().to_string(), e.to_string()))?;
        if let Some(e) = &marker.encryption {
            if e.cipher != crate::crypt::CIPHER {
                return Err(StorageError::Unsupported(format!(
                    "cipher {} of datastore {}",
                    e.cipher,
                    root.display()
                )));
            }
        }
        let remote = match &marker.remote {
            None => None,
            Some(spec) => {
                let r = Arc::new(Remote::open(root, spec)?);
                r.refresh_packs()?;
                Some(r)
            }
        };
        let store = Datastore {
            root: root.to_path_buf(),
            chunk_size,
            fingerprint: marker.encryption.map(|e| e.key_fingerprint),
            key: None,
            remote,
            fs: sfs,
        };
        if let Some(r) = &store.remote {
            crate::mirror::refresh(&store, r)?;
        }
        match &marker.key_file {
            Some(f) => {
                let bytes = read_bounded(f, crate::crypt::MAX_KEY_FILE)?;
                let key = crate::crypt::open_key_file(
                    &bytes,
                    None,
                    &format!("key file {}", f.display()),
                )?;
                store.with_key(key)
            }
            None => Ok(store),
        }
    }

    /// Creates a pack datastore (S3): its objects per `spec`, its local cache folder in
    /// `root`. A bucket that already holds a datastore is attached (its chunk size and
    /// encryption are kept; the key must be its key). A new one is encrypted with `opts.key`;
    /// without a key it is refused unless `insecure_plaintext`.
    pub fn create_remote(
        root: &Path,
        spec: RemoteSpec,
        opts: &CreateOptions,
        insecure_plaintext: bool,
    ) -> Result<Datastore> {
        // Checked before the bucket is touched (and again once the folder exists).
        require_new_folder(root)?;
        let objects = spec.connect()?;
        let existing = Remote::read_bucket_marker(objects.as_ref())?;
        let bucket = match existing {
            Some(m) => {
                let want = opts.key.as_ref().map(|k| k.fingerprint());
                let have = m.encryption.as_ref().map(|e| e.key_fingerprint.as_str());
                if want != have {
                    return Err(StorageError::InvalidInput(format!(
                        "{} holds a datastore {}; the given key is {}",
                        objects.describe(),
                        have.map_or("without encryption".to_string(), |f| format!(
                            "encrypted with key {f}"
                        )),
                        want.unwrap_or("none")
                    )));
                }
                m
            }
            None => {
                if opts.key.is_none() && !insecure_plaintext {
                    return Err(StorageError::InvalidInput(
                        "A datastore on S3 is encrypted: give a key file (--key; `strata backups key create` makes one), or --insecure-plaintext".into(),
                    ));
                }
                Index::new(0, opts.chunk_size, Vec::new())?;
                let m = BucketMarker {
                    format: STORE_FORMAT.into(),
                    version: STORE_VERSION,
                    chunk_size: opts.chunk_size,
                    pack_size: spec.pack_size,
                    encryption: opts.key.as_ref().map(|k| manifest::Encryption {
                        cipher: crate::crypt::CIPHER.into(),
                        key_fingerprint: k.fingerprint().to_string(),
                    }),
                };
                if !objects.put_new(crate::remote::BUCKET_MARKER, manifest::frame_json(&m)?)? {
                    return Err(StorageError::Busy(format!(
                        "{} (another datastore was created there just now)",
                        objects.describe()
                    )));
                }
                m
            }
        };
        drop(objects);
        let sfs = storefs::real();
        sfs.create_dir_all(root)
            .map_err(|e| io_err("Creating", root, e))?;
        for t in require_new_folder(root)? {
            sfs.remove_file(&t).map_err(|e| io_err("Removing", &t, e))?;
        }
        for d in ["snapshots", "writers", "packs", "cache"] {
            sfs.create_dir_all(&root.join(d))
                .map_err(|e| io_err("Creating", &root.join(d), e))?;
        }
        let marker = manifest::frame_json(&Marker {
            format: STORE_FORMAT.into(),
            version: STORE_VERSION,
            chunk_size: bucket.chunk_size,
            encryption: bucket.encryption,
            remote: Some(spec),
            key_file: opts.key_file.clone(),
        })?;
        fsutil::fsync_dir(sfs.as_ref(), root)?;
        fsutil::atomic_write(sfs.as_ref(), root, MARKER, &marker)?;
        let store = Datastore::open_on(root, sfs)?;
        match (&opts.key, &store.key) {
            (Some(k), None) => store.with_key(k.clone()),
            _ => Ok(store),
        }
    }

    /// The object side of a pack datastore, if this is one.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// Where the datastore's data lives, for messages: its folder, or its bucket.
    pub fn describe(&self) -> String {
        match &self.remote {
            Some(r) => format!("{} (cache {})", r.objects().describe(), self.root.display()),
            None => self.root.display().to_string(),
        }
    }

    /// This datastore with its key unlocked; refused if the datastore is not encrypted or
    /// uses another key.
    pub fn with_key(mut self, key: CryptKey) -> Result<Datastore> {
        if let Some(k) = &self.key {
            if k.fingerprint() == key.fingerprint() {
                return Ok(self);
            }
        }
        match &self.fingerprint {
            None => Err(StorageError::InvalidInput(format!(
                "Datastore {} is not encrypted; it needs no key",
                self.root.display()
            ))),
            Some(fp) if fp != key.fingerprint() => Err(StorageError::InvalidInput(format!(
                "Datastore {} is encrypted with key {fp}, not with the given key {}",
                self.root.display(),
                key.fingerprint()
            ))),
            Some(_) => {
                self.key = Some(Arc::new(key));
                Ok(self)
            }
        }
    }

    /// The fingerprint of the datastore's key, if it is encrypted.
    pub fn encryption(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The unlocked key; for an encrypted datastore opened without one, an error saying so.
    pub fn require_key(&self) -> Result<Option<&CryptKey>> {
        match (&self.fingerprint, &self.key) {
            (None, _) => Ok(None),
            (Some(_), Some(k)) => Ok(Some(k)),
            (Some(fp), None) => Err(StorageError::InvalidInput(format!(
                "Datastore {} is encrypted (key fingerprint {fp}); give its key file (--key)",
                self.root.display()
            ))),
        }
    }

    /// The id of a chunk with bytes `data`: BLAKE3, keyed in an encrypted datastore.
    pub fn digest_of(&self, data: &[u8]) -> Digest {
        match &self.key {
            Some(k) => k.chunk_id(data),
            None => Digest::of(data),
        }
    }

    /// Opens the datastore in `root`, creating it if the folder is missing or empty.
    pub fn open_or_create(root: &Path) -> Result<Datastore> {
        if root.join(MARKER).exists() {
            Datastore::open(root)
        } else {
            Datastore::create(root)
        }
    }

    /// The seam through which this datastore changes the disk.
    pub fn fs(&self) -> &dyn StoreFs {
        self.fs.as_ref()
    }

    /// The datastore folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The chunk size for new snapshots.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The folder holding chunk fan-out directories.
    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }

    /// The folder holding snapshot groups.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The folder where running backups register.
    pub fn writers_dir(&self) -> PathBuf {
        self.root.join("writers")
    }

    /// The fan-out directory of a digest.
    pub fn chunk_dir(&self, d: &Digest) -> PathBuf {
        self.chunks_dir().join(format!("{:02x}", d.0[0]))
    }

    /// The file of a chunk.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.chunk_dir(d).join(d.to_hex())
    }

    /// Refreshes a chunk's modification time, which tells garbage collection it is in use.
    /// `Ok(false)` when the chunk is not stored.
    pub fn touch_chunk(&self, d: &Digest) -> Result<bool> {
        if let Some(r) = &self.remote {
            // Backups and gc of a pack datastore exclude each other: no time to refresh.
            return Ok(r.has(d));
        }
        fsutil::touch(self.fs(), &self.chunk_path(d))
    }

    /// Stores `data` under `d` unless it is already there: blob, temp file, fdatasync, rename.
    /// The caller makes the fan-out directory durable (see [`Datastore::sync_chunk_dirs`]) before
    /// anything refers to the chunk.
    pub fn insert_chunk(&self, d: &Digest, data: &[u8], level: i32) -> Result<Stored> {
        if self.remote.is_some() {
            return Err(StorageError::Unsupported(
                "single-chunk inserts into a pack datastore (use a ChunkWriter)".into(),
            ));
        }
        if self.touch_chunk(d)? {
            let path = self.chunk_path(d);
            let len = fs::metadata(&path)
                .map_err(|e| io_err("Inspecting", &path, e))?
                .len();
            return Ok(Stored::Existing(
                len.saturating_sub(blob::BLOB_HEADER_LEN as u64) as u32,
            ));
        }
        let encoded = blob::encode_for(data, level, self.require_key()?, d)?;
        let dir = self.chunk_dir(d);
        let name = d.to_hex();
        let tmp = fsutil::write_temp(self.fs(), &dir, &name, &encoded)?;
        let target = dir.join(&name);
        if let Err(e) = self.fs.rename(&tmp, &target) {
            let _ = self.fs.remove_file(&tmp);
            return Err(io_err("Renaming into", &target, e));
        }
        Ok(Stored::New((encoded.len() - blob::BLOB_HEADER_LEN) as u32))
    }

    /// fsyncs the fan-out directories with the given first digest bytes.
    pub fn sync_chunk_dirs(&self, first_bytes: impl IntoIterator<Item = u8>) -> Result<()> {
        for b in first_bytes {
            fsutil::fsync_dir(self.fs(), &self.chunks_dir().join(format!("{b:02x}")))?;
        }
        Ok(())
    }

    /// Opens a chunk's blob file. A chunk that garbage collection set aside at this moment
    /// (renamed with [`GC_INFIX`] while it re-checks the chunk's time) is opened there.
    pub fn open_blob(&self, d: &Digest) -> Result<(fs::File, PathBuf)> {
        if self.remote.is_some() {
            return Err(StorageError::Unsupported(
                "chunk files in a pack datastore".into(),
            ));
        }
        let path = self.chunk_path(d);
        match fs::File::open(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("Reading", &path, e)),
        }
        let dir = self.chunk_dir(d);
        let prefix = format!("{}{GC_INFIX}", d.to_hex());
        if let Ok(rd) = fs::read_dir(&dir) {
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().starts_with(&prefix) {
                    if let Ok(f) = fs::File::open(ent.path()) {
                        return Ok((f, ent.path()));
                    }
                }
            }
        }
        // One more look at the real name: garbage collection may just have put it back.
        match fs::File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StorageError::corrupt(
                format!("chunk {d}"),
                "missing from the datastore",
            )),
            Err(e) => Err(io_err("Reading", &path, e)),
        }
    }

    /// Reads a chunk's blob (see [`Datastore::open_blob`]).
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        if let Some(r) = &self.remote {
            return Ok(r.read_blob(d)?.0);
        }
        let (file, path) = self.open_blob(d)?;
        fsutil::read_bounded_file(file, &path, MAX_BLOB_FILE)
    }

    /// Loads chunk `d` into `out`, checking its blob crc, its length and its digest.
    pub fn load_chunk(&self, d: &Digest, expected_len: usize, out: &mut Vec<u8>) -> Result<()> {
        if let Some(r) = &self.remote {
            let (bytes, cached) = r.read_blob(d)?;
            let first = self.decode_checked(d, &bytes, expected_len, out);
            if first.is_err() && cached {
                // A damaged cache entry: drop it and fetch the chunk again.
                r.evict(d);
                let bytes = r.fetch_blob(d)?;
                return self.decode_checked(d, &bytes, expected_len, out);
            }
            return first;
        }
        let bytes = self.read_blob(d)?;
        self.decode_checked(d, &bytes, expected_len, out)
    }

    /// [`Datastore::load_chunk`] for verification: in a pack datastore the chunk is read from
    /// the bucket, never from the local cache (which is refreshed with what was read), so that
    /// a verify checks what a restore on another machine would get.
    pub fn load_chunk_from_source(
        &self,
        d: &Digest,
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        match &self.remote {
            Some(r) => {
                let bytes = r.fetch_blob(d)?;
                let checked = self.decode_checked(d, &bytes, expected_len, out);
                if checked.is_err() {
                    r.evict(d);
                }
                checked
            }
            None => self.load_chunk(d, expected_len, out),
        }
    }

    /// Checks and decodes blob `bytes` of chunk `d` into `out`.
    fn decode_checked(
        &self,
        d: &Digest,
        bytes: &[u8],
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let key = self.require_key()?;
        let what = format!("chunk {d}");
        check_sealed_as_store(bytes, key.is_some(), &what)?;
        blob::decode_into_with(bytes, &what, out, key, d)?;
        if out.len() != expected_len {
            return Err(StorageError::corrupt(
                what,
                format!(
                    "holds {} bytes, the index expects {expected_len}",
                    out.len()
                ),
            ));
        }
        if self.digest_of(out) != *d {
            return Err(StorageError::corrupt(
                what,
                "content does not match its digest",
            ));
        }
        Ok(())
    }

    /// The directory of a snapshot.
    pub fn snapshot_dir(&self, name: &SnapshotName) -> PathBuf {
        self.snapshots_dir().join(name.rel_path())
    }

    /// Every complete snapshot, sorted by id then time.
    pub fn list(&self) -> Result<Vec<SnapshotName>> {
        snapshot::list_all(&self.snapshots_dir())
    }

    /// The snapshots of one group, oldest first.
    pub fn list_group(&self, id: &str) -> Result<Vec<SnapshotName>> {
        snapshot::check_id(id)?;
        let mut v = Vec::new();
        let dir = self.snapshots_dir().join(id);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(io_err("Listing", &dir, e)),
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Ok(t) = crate::time::parse(&name) {
                if ent.file_type().is_ok_and(|t| t.is_dir()) {
                    v.push(SnapshotName::new(id, t)?);
                }
            }
        }
        v.sort();
        Ok(v)
    }

    /// Resolves `ID/TIME`, or `ID` alone for the group's latest snapshot.
    pub fn resolve(&self, text: &str) -> Result<SnapshotName> {
        if let Ok(name) = SnapshotName::parse(text) {
            if self.snapshot_dir(&name).is_dir() {
                return Ok(name);
            }
            return Err(StorageError::InvalidInput(format!(
                "No snapshot {name} in {}",
                self.root.display()
            )));
        }
        let id = text.trim_end_matches('/');
        self.list_group(id)?.pop().ok_or_else(|| {
            StorageError::InvalidInput(format!(
                "No snapshot named or in group '{text}' in {}",
                self.root.display()
            ))
        })
    }

    /// Reads and checks a snapshot's manifest.
    pub fn read_manifest(&self, name: &SnapshotName) -> Result<Manifest> {
        let path = self.snapshot_dir(name).join(MANIFEST_FILE);
        let bytes = read_bounded(&path, MAX_MANIFEST_LEN)?;
        Manifest::decode(&bytes, &format!("manifest of {name}"))
    }

    /// Reads and checks a snapshot's index against its manifest (and, in an encrypted
    /// datastore, the manifest's signature).
    pub fn read_index(&self, name: &SnapshotName, manifest: &Manifest) -> Result<Index> {
        let path = self.snapshot_dir(name).join(INDEX_FILE);
        let bytes = read_bounded(&path, crate::index::MAX_INDEX_LEN)?;
        self.check_index_bytes(name, manifest, &bytes)
    }

    /// Checks a snapshot's index file against its manifest and decodes it.
    pub fn check_index_bytes(
        &self,
        name: &SnapshotName,
        manifest: &Manifest,
        bytes: &[u8],
    ) -> Result<Index> {
        let what = format!("index of {name}");
        self.check_manifest_keying(name, manifest)?;
        if let Some(key) = &self.key {
            manifest.check_signature(key, bytes, &format!("manifest of {name}"))?;
        }
        if bytes.len() as u64 != manifest.index_len
            || crc32fast::hash(bytes) != manifest.index_crc32
        {
            return Err(StorageError::corrupt(
                what,
                "does not match the checksum and length in its manifest",
            ));
        }
        let index = Index::decode(bytes, &what)?;
        if index.size() != manifest.size || index.chunk_size() != manifest.chunk_size {
            return Err(StorageError::corrupt(
                what,
                "size or chunk size differs from the manifest",
            ));
        }
        Ok(index)
    }

    /// Refuses a snapshot whose encryption does not match this datastore and its key: an
    /// encrypted snapshot without the key (a clear error, not a decryption failure per chunk),
    /// a plaintext snapshot in an encrypted datastore (which nobody signed).
    pub fn check_manifest_keying(&self, name: &SnapshotName, manifest: &Manifest) -> Result<()> {
        let snap_fp = manifest
            .encryption
            .as_ref()
            .map(|e| e.key_fingerprint.as_str());
        match (snap_fp, self.fingerprint.as_deref()) {
            (None, None) => Ok(()),
            (Some(s), Some(d)) if s == d => {
                self.require_key()?;
                Ok(())
            }
            (Some(s), _) => Err(StorageError::InvalidInput(format!(
                "Snapshot {name} is encrypted with key {s}; {}",
                match (&self.fingerprint, &self.key) {
                    (Some(_), _) => "the datastore's key is another one".to_string(),
                    (None, _) => "give its key file (--key)".to_string(),
                }
            ))),
            (None, Some(_)) => Err(StorageError::corrupt(
                format!("manifest of {name}"),
                "an unencrypted, unsigned snapshot in an encrypted datastore",
            )),
        }
    }

    /// Reads a snapshot's manifest and index.
    pub fn read_snapshot(&self, name: &SnapshotName) -> Result<(Manifest, Index)> {
        let m = self.read_manifest(name)?;
        let i = self.read_index(name, &m)?;
        Ok((m, i))
    }

    /// [`Datastore::read_snapshot`] for verification: in a pack datastore, the manifest and
    /// index objects in the bucket (which must equal the local copies), not the local copies.
    pub fn read_snapshot_from_source(&self, name: &SnapshotName) -> Result<(Manifest, Index)> {
        let Some(r) = &self.remote else {
            return self.read_snapshot(name);
        };
        let (manifest_bytes, index_bytes) = r.read_snapshot_objects(name)?.ok_or_else(|| {
            StorageError::corrupt(
                format!("snapshot {name}"),
                format!("its manifest is gone from {}", r.objects().describe()),
            )
        })?;
        let m = Manifest::decode(
            &manifest_bytes,
            &format!("manifest of {name} in the bucket"),
        )?;
        let i = self.check_index_bytes(name, &m, &index_bytes)?;
        let dir = self.snapshot_dir(name);
        let local_index = read_bounded(&dir.join(INDEX_FILE), crate::index::MAX_INDEX_LEN)?;
        let local_manifest = read_bounded(&dir.join(MANIFEST_FILE), MAX_MANIFEST_LEN)?;
        if local_index != index_bytes || local_manifest != manifest_bytes {
            return Err(StorageError::corrupt(
                format!("snapshot {name}"),
                "the local copy differs from the bucket's",
            ));
        }
        Ok((m, i))
    }
}

/// Refuses a folder that holds a datastore, or anything else: a new datastore goes into a
/// missing or empty folder.
/// Checks that `root` holds no datastore and nothing else but what an interrupted creation
/// leaves; returns the temporary marker files of such a creation (to remove).
fn require_new_folder(root: &Path) -> Result<Vec<PathBuf>> {
    if root.join(MARKER).exists() {
        return Err(StorageError::AlreadyExists(format!(
            "A datastore in {}",
            root.display()
        )));
    }
    if !root.exists() {
        return Ok(Vec::new());
    }
    creation_leftovers(root)?.ok_or_else(|| {
        StorageError::InvalidInput(format!(
            "{} is not empty and not a datastore",
            root.display()
        ))
    })
}

/// The temporary marker files in `root` if it holds nothing but what an interrupted
/// [`Datastore::create_on`] (or [`Datastore::create_remote`]) leaves — its empty folders and
/// temporary marker files; `None` if it holds anything else.
fn creation_leftovers(root: &Path) -> Result<Option<Vec<PathBuf>>> {
    let entries = |dir: &Path| -> Result<Vec<fs::DirEntry>> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| io_err("Listing", dir, e))? {
            v.push(e.map_err(|e| io_err("Listing", dir, e))?);
            if v.len() > 256 {
                break;
            }
        }
        Ok(v)
    };
    let is_dir = |e: &fs::DirEntry| e.file_type().is_ok_and(|t| t.is_dir());
    let is_empty_dir =
        |e: &fs::DirEntry| -> Result<bool> { Ok(is_dir(e) && entries(&e.path())?.is_empty()) };
    let marker_temp = fsutil::temp_name_prefix(MARKER);
    let mut temps = Vec::new();
    for e in entries(root)? {
        let name = e.file_name().to_string_lossy().into_owned();
        let ok = match name.as_str() {
            "snapshots" | "writers" | "packs" | "cache" => is_empty_dir(&e)?,
            "chunks" if is_dir(&e) => {
                let fan_out = entries(&e.path())?;
                fan_out.len() <= 256
                    && fan_out.iter().try_fold(true, |ok, f| -> Result<bool> {
                        let n = f.file_name();
                        let hex = n.len() == 2
                            && n.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit());
                        Ok(ok && hex && is_empty_dir(f)?)
                    })?
            }
            n if n.starts_with(&marker_temp) && e.file_type().is_ok_and(|t| t.is_file()) => {
                temps.push(e.path());
                true
            }
            _ => false,
        };
        if !ok {
            return Ok(None);
        }
    }
    Ok(Some(temps))
}

/// In an encrypted datastore every blob must be sealed (an unsealed one was not written by the
/// key holder); in a plaintext one none is.
pub fn check_sealed_as_store(bytes: &[u8], encrypted: bool, what: &str) -> Result<()> {
    let header = blob::parse_header(bytes, what)?;
    if header.encoding.sealed() != encrypted {
        return Err(StorageError::corrupt(
            what.to_string(),
            if encrypted {
                "unencrypted blob in an encrypted datastore"
            } else {
                "encrypted blob in a datastore without encryption"
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_refuse_foreign_folders() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        let s = Datastore::create(&root).unwrap();
        assert_eq!(s.chunk_size(), DEFAULT_CHUNK_SIZE);
        assert!(Datastore::create(&root).is_err());
        Datastore::open(&root).unwrap();
        let other = d.path().join("o");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("x"), b"x").unwrap();
        assert!(Datastore::open(&other).is_err());
        assert!(Datastore::create(&other).is_err());
        fs::write(root.join(MARKER), b"garbage").unwrap();
        assert!(matches!(
            Datastore::open(&root),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn chunks_are_stored_once_and_checked_on_load() {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(d.path()).unwrap();
        let data = b"hello chunk".repeat(1000);
        let dg = Digest::of(&data);
        assert!(matches!(
            s.insert_chunk(&dg, &data, 1).unwrap(),
            Stored::New(_)
        ));
        assert!(matches!(s.insert_chunk(&dg, &data, 1).unwrap(), Stored::Existing(n) if n > 0));
        let mut out = Vec::new();
        s.load_chunk(&dg, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
        assert!(s.load_chunk(&dg, data.len() + 1, &mut out).is_err());
        // A chunk stored under the wrong name is caught by the digest check.
        let other = Digest::of(b"other");
        fs::copy(s.chunk_path(&dg), s.chunk_path(&other)).unwrap();
        let e = s.load_chunk(&other, data.len(), &mut out).unwrap_err();
        assert!(e.to_string().contains("digest"), "{e}");
        let missing = Digest::of(b"missing");
        let e = s.load_chunk(&missing, 1, &mut out).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_chunk_set_aside_by_gc_is_still_readable() {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(d.path()).unwrap();
        let data = vec![7u8; 5000];
        let dg = Digest::of(&data);
        s.insert_chunk(&dg, &data, 0).unwrap();
        let aside = s
            .chunk_dir(&dg)
            .join(format!("{}{GC_INFIX}123", dg.to_hex()));
        fs::rename(s.chunk_path(&dg), &aside).unwrap();
        let mut out = Vec::new();
        s.load_chunk(&dg, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
    }
}
