//! Advisory locks between processes: `flock` on each PV of an open volume group (exclusive, so
//! a second process gets a clear "in use" error), and on the devices file while it changes.
//!
//! `flock` locks belong to an open file description, so a second open of the same group in the
//! same process is refused too: a group has one owner at a time.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

/// A held lock; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// The locked path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Extra attempts at a busy lock, [`BUSY_RETRY_PAUSE`] apart.
const BUSY_RETRIES: u32 = 10;
/// The pause between attempts at a busy lock.
const BUSY_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Takes an exclusive lock on `path` without waiting; `what` names the locked object in the
/// error ("volume group vg0").
pub fn try_lock_exclusive(path: &Path, what: &str) -> Result<FileLock> {
    try_lock(path, what, true)
}

/// Takes a lock on `path` without waiting: exclusive to change or use a group, shared to read
/// it (readers exclude a writer, not each other).
pub fn try_lock(path: &Path, what: &str, exclusive: bool) -> Result<FileLock> {
    let file = File::open(path)
        .map_err(|e| StorageError::io(format!("Opening {} to lock it", path.display()), e))?;
    let mode = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // A lock released a moment ago can still be held by a child process forked by another
    // thread of ours and not yet past its exec (descriptors close at exec): a busy lock is
    // tried again for a short while before it counts as another process's.
    let mut result = flock(&file, mode | libc::LOCK_NB);
    for _ in 0..BUSY_RETRIES {
        match &result {
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                // Control path (opening a group), not a data path: flock has no wake-up for
                // "released", and the retries are bounded.
                std::thread::sleep(BUSY_RETRY_PAUSE);
                result = flock(&file, mode | libc::LOCK_NB);
            }
            _ => break,
        }
    }
    match result {
        Ok(()) => Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(StorageError::Busy(format!(
            "{what} (locked by another process through {})",
            path.display()
        ))),
        Err(e) => Err(StorageError::io(format!("Locking {}", path.display()), e)),
    }
}

/// Takes an exclusive lock on `path` (created if missing), waiting for it.
pub fn lock_exclusive_wait(path: &Path) -> Result<FileLock> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(format!("Opening lock file {}", path.display()), e))?;
    flock(&file, libc::LOCK_EX)
        .map_err(|e| StorageError::io(format!("Locking {}", path.display()), e))?;
    Ok(FileLock {
        _file: file,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_lock_is_busy_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pv");
        std::fs::write(&p, b"x").unwrap();
        let a = try_lock_exclusive(&p, "volume group t").unwrap();
        let e = try_lock_exclusive(&p, "volume group t").unwrap_err();
        assert!(matches!(e, StorageError::Busy(_)), "{e}");
        assert!(e.to_string().contains("volume group t"));
        assert!(try_lock(&p, "t", false).is_err());
        drop(a);
        let r1 = try_lock(&p, "t", false).unwrap();
        let _r2 = try_lock(&p, "t", false).unwrap();
        assert!(try_lock_exclusive(&p, "t").is_err());
        drop(r1);
    }
}
