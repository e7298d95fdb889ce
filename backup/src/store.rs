//! The datastore on disk: a marker file, content-addressed chunk blobs in 256 fan-out
//! directories, and snapshot directories. See docs/format-datastore.md for the layout.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use crate::blob;
use crate::digest::Digest;
use crate::fsutil::{self, io_err};
use crate::index::Index;
use crate::manifest::{self, Manifest, MAX_MANIFEST_LEN};
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
const MAX_BLOB_FILE: u64 = (blob::BLOB_HEADER_LEN + blob::MAX_RAW_LEN) as u64;
/// Infix of a chunk that garbage collection has set aside before deleting it.
pub const GC_INFIX: &str = ".gc-";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Marker {
    format: String,
    version: u32,
    chunk_size: u32,
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
        Datastore::create_on(root, chunk_size, storefs::real())
    }

    /// [`Datastore::create_with_chunk_size`], changing the disk through `sfs`.
    pub fn create_on(root: &Path, chunk_size: u32, sfs: Arc<dyn StoreFs>) -> Result<Datastore> {
        Index::new(0, chunk_size, Vec::new())?;
        sfs.create_dir_all(root)
            .map_err(|e| io_err("Creating", root, e))?;
        if root.join(MARKER).exists() {
            return Err(StorageError::AlreadyExists(format!(
                "A datastore in {}",
                root.display()
            )));
        }
        // What an interrupted creation left may be there; anything else is someone's data.
        let temp_markers = creation_leftovers(root)?.ok_or_else(|| {
            StorageError::InvalidInput(format!(
                "{} is not empty and not a datastore",
                root.display()
            ))
        })?;
        for t in temp_markers {
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
        })?;
        // The marker goes last: a datastore whose creation was interrupted has none.
        fsutil::atomic_write(sfs.as_ref(), root, MARKER, &marker)?;
        Datastore::open_on(root, sfs)
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
        Ok(Datastore {
            root: root.to_path_buf(),
            chunk_size,
            fs: sfs,
        })
    }

    /// The seam through which this datastore changes the disk.
    pub fn fs(&self) -> &dyn StoreFs {
        self.fs.as_ref()
    }

    /// Opens the datastore in `root`, creating it if the folder is missing or empty.
    pub fn open_or_create(root: &Path) -> Result<Datastore> {
        if root.join(MARKER).exists() {
            Datastore::open(root)
        } else {
            Datastore::create(root)
        }
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
        fsutil::touch(self.fs(), &self.chunk_path(d))
    }

    /// Stores `data` under `d` unless it is already there: blob, temp file, fdatasync, rename.
    /// The caller makes the fan-out directory durable (see [`Datastore::sync_chunk_dirs`]) before
    /// anything refers to the chunk.
    pub fn insert_chunk(&self, d: &Digest, data: &[u8], level: i32) -> Result<Stored> {
        if self.touch_chunk(d)? {
            let path = self.chunk_path(d);
            let len = fs::metadata(&path)
                .map_err(|e| io_err("Inspecting", &path, e))?
                .len();
            return Ok(Stored::Existing(
                len.saturating_sub(blob::BLOB_HEADER_LEN as u64) as u32,
            ));
        }
        let encoded = blob::encode(data, level)?;
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
        let (file, path) = self.open_blob(d)?;
        read_bounded_file(file, &path, MAX_BLOB_FILE)
    }

    /// Loads chunk `d` into `out`, checking its blob crc, its length and its digest.
    pub fn load_chunk(&self, d: &Digest, expected_len: usize, out: &mut Vec<u8>) -> Result<()> {
        let bytes = self.read_blob(d)?;
        let what = format!("chunk {d}");
        blob::decode_into(&bytes, &what, out)?;
        if out.len() != expected_len {
            return Err(StorageError::corrupt(
                what,
                format!(
                    "holds {} bytes, the index expects {expected_len}",
                    out.len()
                ),
            ));
        }
        if Digest::of(out) != *d {
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

    /// Reads and checks a snapshot's index against its manifest.
    pub fn read_index(&self, name: &SnapshotName, manifest: &Manifest) -> Result<Index> {
        let path = self.snapshot_dir(name).join(INDEX_FILE);
        let bytes = read_bounded(&path, crate::index::MAX_INDEX_LEN)?;
        let what = format!("index of {name}");
        if bytes.len() as u64 != manifest.index_len
            || crc32fast::hash(&bytes) != manifest.index_crc32
        {
            return Err(StorageError::corrupt(
                what,
                "does not match the checksum and length in its manifest",
            ));
        }
        let index = Index::decode(&bytes, &what)?;
        if index.size() != manifest.size || index.chunk_size() != manifest.chunk_size {
            return Err(StorageError::corrupt(
                what,
                "size or chunk size differs from the manifest",
            ));
        }
        Ok(index)
    }

    /// Reads a snapshot's manifest and index.
    pub fn read_snapshot(&self, name: &SnapshotName) -> Result<(Manifest, Index)> {
        let m = self.read_manifest(name)?;
        let i = self.read_index(name, &m)?;
        Ok((m, i))
    }
}

/// The temporary marker files in `root` if it holds nothing but what an interrupted
/// [`Datastore::create_on`] leaves (its empty folders and temporary marker files); `None` if it
/// holds anything else.
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
            "snapshots" | "writers" => is_empty_dir(&e)?,
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

/// Reads a whole file, refusing one larger than `max` bytes. The file is opened once and the
/// read itself is capped, so a symlink to a device, a FIFO or a file growing meanwhile cannot
/// make it allocate past `max`.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = fs::File::open(path).map_err(|e| io_err("Reading", path, e))?;
    read_bounded_file(file, path, max)
}

/// [`read_bounded`] on a file already open.
fn read_bounded_file(file: fs::File, path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let too_big = |len: u64| {
        StorageError::corrupt(
            path.display().to_string(),
            format!("{len} bytes exceeds the limit of {max}"),
        )
    };
    let meta = file.metadata().map_err(|e| io_err("Reading", path, e))?;
    if !meta.is_file() {
        return Err(StorageError::corrupt(
            path.display().to_string(),
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| io_err("Reading", path, e))?;
    if out.len() as u64 > max {
        return Err(too_big(out.len() as u64));
    }
    Ok(out)
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
