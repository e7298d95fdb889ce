//! The file-system seam of the datastore: the few operations that change a datastore on disk
//! (make a folder, write a file durably, rename, remove, fsync a folder, touch a chunk), behind
//! one trait so that a test can cut power at any of them ([`crate::faultfs`] with the
//! `test-utils` feature).
//!
//! Reads (listing folders, reading chunks, indexes and manifests) go straight to `std::fs`: a
//! fault-injecting implementation keeps the real folder equal to what the running process sees,
//! and after a simulated crash it rolls back what would not have survived. Locks (`flock` on
//! lock files, writer registrations) are not part of the seam either: they live as long as the
//! process, so a crash drops them whatever the disk kept.
//!
//! Every datastore holds one `Arc<dyn StoreFs>`; [`RealFs`] is the default. What goes through
//! it is the local datastore's own structure (chunks, snapshot folders, the marker). A pack
//! datastore's local cache (chunk cache, pack indexes) and folder-backed objects
//! ([`crate::objects::DirObjects`]) write with [`RealFs`] directly: the bucket holds what must
//! survive, and the cache is rebuilt from it.

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// The operations that change a datastore on disk.
pub trait StoreFs: Send + Sync + Debug {
    /// Creates one folder (`AlreadyExists` if it is there).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a folder and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates `path` (which must not exist), writes `data` and makes the data durable
    /// (`fdatasync`). The folder entry is durable only after [`StoreFs::sync_dir`] of its parent.
    fn write_new_synced(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Renames `from` to `to`, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Renames `from` to `to`; `AlreadyExists` instead of replacing anything at `to`.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a folder and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes a folder's entries durable (`fsync` of the folder).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Sets a file's modification time to now; `Ok(false)` when it does not exist.
    fn touch(&self, path: &Path) -> io::Result<bool>;
}

/// The default seam for a datastore: the real file system.
pub fn real() -> Arc<dyn StoreFs> {
    Arc::new(RealFs)
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

impl StoreFs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn write_new_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)?;
        f.write_all(data)?;
        f.sync_data()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        strata_storage::durable::rename_noreplace_io(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn touch(&self, path: &Path) -> io::Result<bool> {
        let c = cpath(path)?;
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
        Err(e)
    }
}
