//! File-system primitives the datastore is built from: atomic file replacement (temp file, fsync,
//! rename, fsync directory), no-replace renames, explicit mtime updates (each through the
//! datastore's [`StoreFs`] seam), and advisory locks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// How the names of the temporary files for a file begin: the storage crate's convention, which
/// its atomic writes use too.
pub use strata_storage::durable::temp_name_prefix;
use strata_storage::{Result, StorageError};

use crate::storefs::StoreFs;

/// Wraps an `io::Error` about `path`: ENOENT becomes [`StorageError::NotFound`], ENOSPC
/// [`StorageError::OutOfSpace`].
pub fn io_err(what: &str, path: &Path, e: io::Error) -> StorageError {
    if e.kind() == io::ErrorKind::NotFound {
        return StorageError::NotFound(path.to_path_buf());
    }
    StorageError::io(format!("{what} {}", path.display()), e)
}

/// A name for a temporary file next to `final_name`, unique to this process and call.
pub fn temp_name(final_name: &str) -> String {
    format!(
        "{}{}-{:016x}",
        temp_name_prefix(final_name),
        std::process::id(),
        fastrand::u64(..)
    )
}

/// Whether a directory entry is one of our temporary files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(".tmp-")
}

/// Writes `data` into a new temporary file in `dir` and fsyncs it; returns its path.
/// On failure the temporary file is removed.
pub fn write_temp(fs: &dyn StoreFs, dir: &Path, final_name: &str, data: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(temp_name(final_name));
    match fs.write_new_synced(&tmp, data) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs.remove_file(&tmp);
            Err(io_err("Writing", &tmp, e))
        }
    }
}

/// Replaces (or creates) `dir/name` atomically with `data`: temp file, fsync, rename, fsync dir.
pub fn atomic_write(fs: &dyn StoreFs, dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = write_temp(fs, dir, name, data)?;
    let target = dir.join(name);
    if let Err(e) = fs.rename(&tmp, &target) {
        let _ = fs.remove_file(&tmp);
        return Err(io_err("Renaming into", &target, e));
    }
    fsync_dir(fs, dir)
}

/// Makes a directory's entries durable.
pub fn fsync_dir(fs: &dyn StoreFs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| io_err("Syncing directory", dir, e))
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
pub fn rename_noreplace(fs: &dyn StoreFs, from: &Path, to: &Path) -> Result<()> {
    match fs.rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            Err(StorageError::AlreadyExists(to.display().to_string()))
        }
        Err(e) => Err(io_err("Renaming", from, e)),
    }
}

/// Sets a file's modification time to now. `Ok(false)` when the file does not exist.
pub fn touch(fs: &dyn StoreFs, path: &Path) -> Result<bool> {
    fs.touch(path).map_err(|e| io_err("Touching", path, e))
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> i128 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// An advisory `flock` held on an open file or directory until dropped.
#[derive(Debug)]
pub struct Flock {
    file: File,
}

impl Flock {
    /// Locks `path` (created if `create`), shared or exclusive; `wait` blocks, otherwise a held
    /// lock gives [`StorageError::Busy`] with `busy_msg`.
    pub fn acquire(
        path: &Path,
        exclusive: bool,
        wait: bool,
        create: bool,
        busy_msg: &str,
    ) -> Result<Flock> {
        let file = if create {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
        } else {
            File::open(path)
        }
        .map_err(|e| io_err("Opening lock", path, e))?;
        let mut op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(Flock { file });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Err(StorageError::Busy(busy_msg.to_string())),
                _ => return Err(io_err("Locking", path, e)),
            }
        }
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Reads a whole file, refusing one larger than `max` bytes. The file is opened once and the
/// read itself is capped, so a symlink to a device, a FIFO or a file growing meanwhile cannot
/// make it allocate past `max`.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| io_err("Reading", path, e))?;
    read_bounded_file(file, path, max)
}

/// [`read_bounded`] on a file already open.
pub fn read_bounded_file(file: File, path: &Path, max: u64) -> Result<Vec<u8>> {
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
    use crate::storefs::RealFs;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        atomic_write(&RealFs, dir.path(), "a", b"one").unwrap();
        atomic_write(&RealFs, dir.path(), "a", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rename_noreplace_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        std::fs::write(dir.path().join("b"), b"b").unwrap();
        let e =
            rename_noreplace(&RealFs, &dir.path().join("a"), &dir.path().join("b")).unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists(_)));
        rename_noreplace(&RealFs, &dir.path().join("a"), &dir.path().join("c")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), b"a");
    }

    #[test]
    fn touch_reports_missing_files_and_moves_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(!touch(&RealFs, &p).unwrap());
        std::fs::write(&p, b"x").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(touch(&RealFs, &p).unwrap());
        let m = mtime_ns(&std::fs::metadata(&p).unwrap());
        assert!(m > 1_000_000_000_000_000_000);
    }

    #[test]
    fn exclusive_lock_excludes_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = Flock::acquire(&p, true, false, true, "x").unwrap();
        assert!(matches!(
            Flock::acquire(&p, false, false, true, "x"),
            Err(StorageError::Busy(_))
        ));
        drop(a);
        let _b = Flock::acquire(&p, false, false, true, "x").unwrap();
        let _c = Flock::acquire(&p, false, false, true, "x").unwrap();
    }
}
