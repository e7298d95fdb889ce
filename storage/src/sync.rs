//! Locks and what a poisoned one means.
//!
//! A lock is poisoned when a thread panicked while holding it. Two kinds of state live behind
//! this crate's locks, and poisoning means something different for each:
//! - **state that is whole at every instant** — a job or completion list, a counter, the bytes of
//!   an in-memory test device, a lock that only serialises (`Mutex<()>`), a list of PV files or an
//!   extent map that is only ever pushed to or replaced whole, dirty bitmaps (atomic words; the
//!   lock only guards resizing): nothing can be half updated, so [`lock`], [`read`] and
//!   [`write`] carry on;
//! - **metadata** — a qcow2 image's tables, a vmdk's grain tables: a panic may have left it half
//!   changed, and writing it back would damage the image. [`lock_meta`] and [`read_meta`] return
//!   an error instead, and since a poisoned lock stays poisoned, the object refuses all further
//!   I/O with that error until it is reopened from disk. A volume group's and a thin pool's
//!   state locks do the same through the `failed` state they already have (a failed commit sets
//!   it too): a poisoned lock marks the group or pool failed.

use std::fmt::Display;
use std::sync::{
    Condvar, LockResult, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use crate::error::{Result, StorageError};

/// Locks state that is whole at every instant (see the module documentation).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks state that is whole at every instant.
pub(crate) fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks state that is whole at every instant.
pub(crate) fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Locks state that records its own failure (a volume group's or thin pool's `failed`): a
/// poisoned lock calls `mark` on it, so that it refuses further work.
pub(crate) fn lock_or_mark<T>(m: &Mutex<T>, mark: impl FnOnce(&mut T)) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => {
            let mut g = p.into_inner();
            mark(&mut g);
            g
        }
    }
}

/// Waits on `cv` with a guard from [`lock`].
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cv` with a guard from [`lock`] for at most `timeout`.
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    timeout: std::time::Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, timeout) {
        Ok((g, _)) => g,
        Err(p) => p.into_inner().0,
    }
}

/// The error of an object whose metadata lock is poisoned.
pub(crate) fn failed(what: impl Display) -> StorageError {
    StorageError::Unavailable(format!(
        "{what} failed: a thread panicked while changing its metadata, so it refuses I/O until \
         it is reopened"
    ))
}

fn checked<G>(r: LockResult<G>, what: impl Display) -> Result<G> {
    r.map_err(|_| failed(what))
}

/// Locks the metadata of `what` (see the module documentation).
pub(crate) fn lock_meta<T: ?Sized>(m: &Mutex<T>, what: impl Display) -> Result<MutexGuard<'_, T>> {
    checked(m.lock(), what)
}

/// Read-locks the metadata of `what`.
pub(crate) fn read_meta<T: ?Sized>(
    l: &RwLock<T>,
    what: impl Display,
) -> Result<RwLockReadGuard<'_, T>> {
    checked(l.read(), what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn poisoned_metadata_fails_and_stays_failed_while_plain_state_carries_on() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("half-way through an update");
        })
        .join();
        let e = lock_meta(&m, "image a.qcow2").unwrap_err();
        assert!(e.to_string().contains("image a.qcow2 failed"), "{e}");
        assert!(lock_meta(&m, "image a.qcow2").is_err());
        assert_eq!(*lock(&m), 1);
    }
}
