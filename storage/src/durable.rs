//! Durable file updates: the one home for replacing a small file so that a crash at any point
//! leaves either the old contents or the new ones, never a mix or an empty file.
//!
//! [`write_atomically`] writes a temporary file in the same directory (created new, with the
//! mode the caller asks for), fsyncs it, renames it over the target — or, with
//! [`Create::New`], onto a name that must not exist yet — and fsyncs the directory so that the
//! rename itself is durable. On failure the temporary file is removed.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StorageError};

/// Whether the target may already exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// Replace the file if it exists, create it if not.
    OrReplace,
    /// The file must not exist yet ([`StorageError::AlreadyExists`] if it does).
    New,
}

/// fsyncs the directory holding `path`, so that a new entry in it is durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// fsyncs directory `dir`, so that its entries are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir)
        .map_err(|e| StorageError::io(format!("Opening {}", dir.display()), e))?;
    f.sync_all()
        .map_err(|e| StorageError::io(format!("Syncing directory {}", dir.display()), e))
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
        ".tmp-{name}-{}-{n:x}-{:016x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    ))
}

/// Replaces (or creates) `path` with `data`, durably and atomically; the file gets permission
/// bits `mode` (before the umask). See the module documentation.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32, create: Create) -> Result<()> {
    let tmp = temp_path(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(StorageError::io(format!("Writing {}", tmp.display()), e));
    }
    let renamed = match create {
        Create::OrReplace => std::fs::rename(&tmp, path).map_err(|e| {
            StorageError::io(
                format!("Renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        }),
        Create::New => rename_noreplace(&tmp, path),
    };
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent_dir(path)
}

/// Renames `from` to `to`, failing with [`StorageError::AlreadyExists`] instead of replacing it
/// (and with [`StorageError::NotFound`] if `from` does not exist).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let e = match rename_noreplace_io(from, to) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    match e.raw_os_error() {
        Some(libc::EEXIST) => return Err(StorageError::AlreadyExists(to.display().to_string())),
        Some(libc::ENOENT) => return Err(StorageError::NotFound(from.to_path_buf())),
        _ => {}
    }
    if e.kind() == std::io::ErrorKind::InvalidInput {
        return Err(StorageError::InvalidInput(format!(
            "{} or {} contains a NUL byte",
            from.display(),
            to.display()
        )));
    }
    Err(StorageError::io(
        format!("Renaming {} to {}", from.display(), to.display()),
        e,
    ))
}

/// [`rename_noreplace`] with the system's error as it is (`EEXIST` when `to` exists), for
/// callers that keep `std::io` errors (the datastore's file-system seam).
pub fn rename_noreplace_io(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
        })
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
        Err(std::io::Error::last_os_error())
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
