//! File-system primitives the datastore is built from: atomic file replacement (temp file, fsync,
//! rename, fsync directory), no-replace renames, explicit mtime updates, and advisory locks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use strata_storage::durable;
use strata_storage::{Result, StorageError};

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
        ".tmp-{final_name}-{}-{:016x}",
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
pub fn write_temp(dir: &Path, final_name: &str, data: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(temp_name(final_name));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_data()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err("Writing", &tmp, e))
        }
    }
}

/// Replaces (or creates) `dir/name` atomically with `data`: temp file, fsync, rename, fsync dir
/// (the block layer's one helper for it, [`strata_storage::durable::write_atomically`]).
pub fn atomic_write(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    durable::write_atomically(&dir.join(name), data, 0o644, durable::Create::OrReplace)
}

/// Makes a directory's entries durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    durable::sync_dir(dir)
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
pub use strata_storage::durable::rename_noreplace;

/// Sets a file's modification time to now. `Ok(false)` when the file does not exist.
pub fn touch(path: &Path) -> Result<bool> {
    let c = cpath(path).map_err(|e| io_err("Touching", path, e))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` points at two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        return Ok(false);
    }
    Err(io_err("Touching", path, e))
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

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        atomic_write(dir.path(), "a", b"one").unwrap();
        atomic_write(dir.path(), "a", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rename_noreplace_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        std::fs::write(dir.path().join("b"), b"b").unwrap();
        let e = rename_noreplace(&dir.path().join("a"), &dir.path().join("b")).unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists(_)));
        rename_noreplace(&dir.path().join("a"), &dir.path().join("c")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), b"a");
    }

    #[test]
    fn touch_reports_missing_files_and_moves_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(!touch(&p).unwrap());
        std::fs::write(&p, b"x").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(touch(&p).unwrap());
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
