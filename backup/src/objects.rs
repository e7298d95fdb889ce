//! The storage seam under a pack datastore ([`crate::remote`]): the few object operations it
//! needs — put, put-if-absent, get, ranged get, list, delete — with two implementations: a
//! folder ([`DirObjects`], for tests and for a datastore on a mounted remote file system) and any
//! S3-compatible store ([`crate::s3::S3Objects`]).
//!
//! Keys are `/`-separated paths of ASCII letters, digits and `-_.:+` (what snapshot names use); no component is empty or
//! starts with a dot. Every put is atomic (a reader sees the whole object or none) and durable
//! when it returns.

use std::fmt;
use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use strata_storage::{Result, StorageError};

use crate::fsutil::{self, io_err};
use crate::storefs::RealFs;

/// An object's key and size, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// The object operations a pack datastore needs. See the module documentation.
pub trait Objects: Send + Sync + fmt::Debug {
    /// Where the objects live, for messages.
    fn describe(&self) -> String;
    /// Stores `data` under `key`, replacing any object there.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<()>;
    /// Stores `data` under `key` unless an object exists there: `Ok(false)` then. Stores without
    /// conditional writes check first (documented per implementation).
    fn put_new(&self, key: &str, data: Vec<u8>) -> Result<bool>;
    /// The whole object, or `None` if there is none; an object larger than `max` is refused.
    fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>>;
    /// Bytes `start .. start + len` of an object (exactly that many, or an error).
    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>>;
    /// Every object whose key starts with `prefix` (a folder: ends with `/`).
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// Removes an object; removing a missing one succeeds.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Checks an object key (see the module documentation).
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+')
                })
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidInput(format!(
            "'{key}' is not a valid object key"
        )))
    }
}

/// Objects as files under a folder.
#[derive(Debug, Clone)]
pub struct DirObjects {
    root: PathBuf,
}

impl DirObjects {
    /// Objects under `root` (created if missing).
    pub fn new(root: &Path) -> Result<DirObjects> {
        fs::create_dir_all(root).map_err(|e| io_err("Creating", root, e))?;
        Ok(DirObjects {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn parent_of(path: &Path) -> Result<&Path> {
        path.parent()
            .ok_or_else(|| StorageError::InvalidInput(format!("{} has no folder", path.display())))
    }

    fn make_parent(&self, path: &Path) -> Result<()> {
        let dir = Self::parent_of(path)?;
        let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
        crate::lock::create_dirs_durably(&RealFs, &self.root, rel)
    }
}

impl Objects for DirObjects {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        self.make_parent(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fsutil::atomic_write(&RealFs, Self::parent_of(&path)?, &name, &data)
    }

    fn put_new(&self, key: &str, data: Vec<u8>) -> Result<bool> {
        let path = self.path(key)?;
        self.make_parent(&path)?;
        let dir = Self::parent_of(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = fsutil::write_temp(&RealFs, dir, &name, &data)?;
        match fsutil::rename_noreplace(&RealFs, &tmp, &path) {
            Ok(()) => {
                fsutil::fsync_dir(&RealFs, dir)?;
                Ok(true)
            }
            Err(StorageError::AlreadyExists(_)) => {
                let _ = fs::remove_file(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match crate::store::read_bounded(&path, max) {
            Ok(b) => Ok(Some(b)),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let mut f = fs::File::open(&path).map_err(|e| io_err("Reading", &path, e))?;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_err("Reading", &path, e))?;
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        f.take(len)
            .read_to_end(&mut out)
            .map_err(|e| io_err("Reading", &path, e))?;
        if out.len() as u64 != len {
            return Err(StorageError::corrupt(
                format!("object {key}"),
                format!("range {start}+{len} reaches past its end"),
            ));
        }
        Ok(out)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("Listing", &dir, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| io_err("Listing", &dir, e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let path = ent.path();
                let rel = path
                    .strip_prefix(&self.root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let ft = ent.file_type().map_err(|e| io_err("Listing", &path, e))?;
                if ft.is_dir() {
                    let as_dir = format!("{rel}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        stack.push(path);
                    }
                } else if ft.is_file() && rel.starts_with(prefix) {
                    let size = ent
                        .metadata()
                        .map_err(|e| io_err("Inspecting", &path, e))?
                        .len();
                    out.push(Listed { key: rel, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(&RealFs, Self::parent_of(&path)?),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("Removing", &path, e)),
        }
    }
}

/// The behaviour every [`Objects`] implementation shows, checked on an empty store (panics on
/// a difference): put, create-if-absent, whole and ranged gets with their bounds, listing by
/// prefix with sizes, idempotent delete, key checks. `big` is the size of one object that must
/// round-trip (past [`crate::s3::MULTIPART_THRESHOLD`] it tests multipart uploads on S3).
#[cfg(any(test, feature = "test-utils"))]
// Test support: a failed step panics the test, by design.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub fn check_conformance(o: &dyn Objects, big: usize) {
    o.put("a/b/c", b"hello".to_vec()).unwrap();
    assert!(o.put_new("a/b/d", b"x".to_vec()).unwrap());
    assert!(!o.put_new("a/b/d", b"y".to_vec()).unwrap());
    assert_eq!(o.get("a/b/d", 10).unwrap().unwrap(), b"x");
    assert!(o.get("a/b/e", 10).unwrap().is_none());
    assert!(o.get("a/b/c", 2).is_err());
    assert_eq!(o.get_range("a/b/c", 1, 3).unwrap(), b"ell");
    assert!(o.get_range("a/b/c", 3, 3).is_err());
    let data: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    o.put("big", data.clone()).unwrap();
    let at = big.saturating_sub(5000);
    let len = (big - at).min(4000);
    assert_eq!(
        o.get_range("big", at as u64, len as u64).unwrap(),
        &data[at..at + len]
    );
    // Snapshot names may hold `+` and `:`.
    o.put("s/image/a+b/2026-12-07T10:00:00Z/index", vec![1])
        .unwrap();
    let listed = o.list("").unwrap();
    let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "a/b/c",
            "a/b/d",
            "big",
            "s/image/a+b/2026-12-07T10:00:00Z/index"
        ]
    );
    assert_eq!(listed[2].size, big as u64);
    assert_eq!(o.list("a/").unwrap().len(), 2);
    assert!(o.list("zz/").unwrap().is_empty());
    o.delete("big").unwrap();
    o.delete("big").unwrap();
    o.delete("a/b/c").unwrap();
    assert_eq!(o.list("").unwrap().len(), 2);
    for bad in ["../x", "a//x", "a/b c", ".hidden", ""] {
        assert!(o.put(bad, vec![]).is_err(), "{bad:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_objects_conform() {
        let d = tempfile::tempdir().unwrap();
        check_conformance(&DirObjects::new(d.path()).unwrap(), 300_000);
    }
}
