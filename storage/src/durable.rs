//! Durable file updates: the one home for replacing a small file so that a crash at any point
//! leaves either the old contents or the new ones, never a mix or an empty file.
//!
//! [`write_atomically`] writes a temporary file in the same directory (created new, with the
//! mode the caller asks for), fsyncs it, renames it over the target — or, with
//! [`Create::New`], onto a name that must not exist yet — and fsyncs the directory so that the
//! rename itself is durable. On failure the temporary file is removed.
//!
//! The file operations go through a seam, [`FileSystem`]: [`HostFs`] (the real one, which every
//! caller gets by default) or, in crash tests, the fault-injecting engine's file system
//! (`crate::io::fault_fs`, feature `test-utils`), which shares its operation count and its
//! power cut with a fault-injecting block device. It exists so that a test can cut the power
//! between a device's writes and the writes of the sidecar file of its dirty bitmaps
//! (`crate::bitmap::store`), which must stay in the right order with them. It holds only what a
//! small, wholly rewritten file needs: read it, write a new file and fsync it, rename, remove,
//! fsync a directory.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Result, StorageError};

/// Whether the target may already exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// Replace the file if it exists, create it if not.
    OrReplace,
    /// The file must not exist yet ([`StorageError::AlreadyExists`] if it does).
    New,
}

/// The file operations of a small file that is rewritten whole (see the module
/// documentation): the seam a crash test cuts.
pub trait FileSystem: Send + Sync + std::fmt::Debug {
    /// The whole contents of a file (`NotFound` if it does not exist).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether a file exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path`, which must not exist, with permission bits `mode` (before the umask),
    /// writes `data` and fsyncs the file. Its directory entry is durable only after
    /// [`FileSystem::sync_dir`] of its directory.
    fn write_new_synced(&self, path: &Path, data: &[u8], mode: u32) -> io::Result<()>;
    /// Renames `from` to `to`, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Renames `from` to `to`; `EEXIST` instead of replacing a file at `to`.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The host's file system, through `std::fs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostFs;

/// The host's file system as a shared seam (the default everywhere).
pub fn host_fs() -> Arc<dyn FileSystem> {
    Arc::new(HostFs)
}

impl FileSystem for HostFs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn write_new_synced(&self, path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(data)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        rename_noreplace_io(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// fsyncs the directory holding `path`, so that a new entry in it is durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    sync_dir(parent_dir(path))
}

/// fsyncs directory `dir`, so that its entries are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir)
        .map_err(|e| StorageError::io(format!("Opening {}", dir.display()), e))?;
    f.sync_all()
        .map_err(|e| StorageError::io(format!("Syncing directory {}", dir.display()), e))
}

/// How the names of the temporary files for a file named `final_name` begin, here and in the
/// datastore.
pub fn temp_name_prefix(final_name: &str) -> String {
    format!(".tmp-{final_name}-")
}

/// Removes the temporary files that updates of `path` ([`write_atomically`]) left beside it
/// when a crash cut them short. Only for a caller that holds what every writer of `path` holds
/// (a lock), so that none of them is an update in progress. Best effort: a directory that
/// cannot be listed or a file that cannot be removed is logged and left as it was.
pub fn remove_leftover_temporaries(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = temp_name_prefix(&name.to_string_lossy());
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the directory for leftover temporary files");
            return;
        }
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let leftover = entry.path();
        match std::fs::remove_file(&leftover) {
            Ok(()) => {
                tracing::info!(file = %leftover.display(), "removed a temporary file a cut-short update left")
            }
            Err(e) => {
                tracing::warn!(file = %leftover.display(), error = %e, "cannot remove a leftover temporary file")
            }
        }
    }
}

/// A temporary name next to `path` (`.tmp-` first, as the datastore's cleaning expects of
/// temporary files): unique within this process by a counter, and across processes by the pid
/// and the time — a process that is its pid namespace's init (the VMM) always has pid 1, and a
/// leftover of a killed run must not make every later write fail. (The clock, not a random
/// number: reading it is no system call a sandbox's filter must allow.)
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(
        "{}{}-{n:x}-{:016x}",
        temp_name_prefix(&name),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    ))
}

/// Replaces (or creates) `path` with `data`, durably and atomically; the file gets permission
/// bits `mode` (before the umask). See the module documentation.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32, create: Create) -> Result<()> {
    write_atomically_on(&HostFs, path, data, mode, create)
}

/// [`write_atomically`] through the file system `fs`.
pub fn write_atomically_on(
    fs: &dyn FileSystem,
    path: &Path,
    data: &[u8],
    mode: u32,
    create: Create,
) -> Result<()> {
    let tmp = temp_path(path);
    if let Err(e) = fs.write_new_synced(&tmp, data, mode) {
        let _ = fs.remove_file(&tmp);
        return Err(StorageError::io(format!("Writing {}", tmp.display()), e));
    }
    let renamed = match create {
        Create::OrReplace => fs.rename(&tmp, path).map_err(|e| {
            StorageError::io(
                format!("Renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        }),
        Create::New => fs
            .rename_noreplace(&tmp, path)
            .map_err(|e| rename_noreplace_error(e, &tmp, path)),
    };
    if let Err(e) = renamed {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    let dir = parent_dir(path);
    fs.sync_dir(dir)
        .map_err(|e| StorageError::io(format!("Syncing directory {}", dir.display()), e))
}

/// Renames `from` to `to`, failing with [`StorageError::AlreadyExists`] instead of replacing it
/// (and with [`StorageError::NotFound`] if `from` does not exist).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    rename_noreplace_io(from, to).map_err(|e| rename_noreplace_error(e, from, to))
}

/// What a failed no-replace rename of `from` to `to` means.
fn rename_noreplace_error(e: io::Error, from: &Path, to: &Path) -> StorageError {
    match e.raw_os_error() {
        Some(libc::EEXIST) => return StorageError::AlreadyExists(to.display().to_string()),
        Some(libc::ENOENT) => return StorageError::NotFound(from.to_path_buf()),
        _ => {}
    }
    if e.kind() == io::ErrorKind::InvalidInput {
        return StorageError::InvalidInput(format!(
            "{} or {} contains a NUL byte",
            from.display(),
            to.display()
        ));
    }
    StorageError::io(
        format!("Renaming {} to {}", from.display(), to.display()),
        e,
    )
}

/// [`rename_noreplace`] with the system's error as it is (`EEXIST` when `to` exists), for
/// callers that keep `std::io` errors (the datastore's file-system seam).
pub fn rename_noreplace_io(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_or_creates_with_the_mode_asked_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomically(&p, b"one", 0o600, Create::New).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_atomically(&p, b"two", 0o600, Create::New),
            Err(StorageError::AlreadyExists(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomically(&p, b"three", 0o644, Create::OrReplace).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}
