//! Space reservations: a route that will write reserves the bytes it may write, against the
//! file system or the thin pool it writes into, before it starts, and releases them when done.
//!
//! A check of free space alone lets two requests that each fit take the same free bytes: two
//! 50 GiB uploads with 65 GB free would both start and one would fail half-way, possibly
//! filling the file system that holds the volume groups' metadata. A reservation is counted
//! against what later requests see as free until it is dropped. Space that a holder has
//! already written shows in the file system's own free count, so a holder reports its progress
//! ([`Reservation::consumed`]) and only the rest stays reserved.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use strata_storage::StorageError;

use super::{ServiceError, ServiceResult};

/// What space is reserved against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Pot {
    /// A file system, by device number.
    FileSystem(u64),
    /// A thin pool's data blocks, `VG/POOL`.
    Pool(String),
}

/// The reservations of one server.
#[derive(Debug, Default)]
pub struct Space {
    table: Mutex<BTreeMap<Pot, Vec<Arc<Held>>>>,
}

#[derive(Debug)]
struct Held {
    bytes: u64,
    consumed: AtomicU64,
}

impl Held {
    fn outstanding(&self) -> u64 {
        self.bytes
            .saturating_sub(self.consumed.load(Ordering::Relaxed))
    }
}

/// Reserved bytes; dropping it releases them.
#[derive(Debug)]
pub struct Reservation {
    space: Arc<Space>,
    pot: Pot,
    held: Arc<Held>,
}

impl Reservation {
    /// Reports that `bytes` of the reservation are now written (and so counted by the file
    /// system or pool itself).
    pub fn consumed(&self, bytes: u64) {
        self.held
            .consumed
            .store(bytes.min(self.held.bytes), Ordering::Relaxed);
    }

    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.held.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut table = self.space.lock();
        if let Some(list) = table.get_mut(&self.pot) {
            list.retain(|h| !Arc::ptr_eq(h, &self.held));
            if list.is_empty() {
                table.remove(&self.pot);
            }
        }
    }
}

impl Space {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Pot, Vec<Arc<Held>>>> {
        // Updated in single steps: whole even after a panic elsewhere.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reserve(
        self: &Arc<Self>,
        pot: Pot,
        bytes: u64,
        free: u64,
        what: impl FnOnce(u64) -> String,
    ) -> ServiceResult<Reservation> {
        let mut table = self.lock();
        let list = table.entry(pot.clone()).or_default();
        let reserved: u64 = list.iter().map(|h| h.outstanding()).sum();
        let available = free.saturating_sub(reserved);
        if bytes > available {
            if list.is_empty() {
                table.remove(&pot);
            }
            return Err(ServiceError::Storage(StorageError::OutOfSpace(format!(
                "{bytes} bytes are needed but {}",
                what(available)
            ))));
        }
        let held = Arc::new(Held {
            bytes,
            consumed: AtomicU64::new(0),
        });
        list.push(held.clone());
        Ok(Reservation {
            space: self.clone(),
            pot,
            held,
        })
    }

    /// Reserves `bytes` on the file system that holds `dir` (507 when they are not free after
    /// the other reservations there).
    pub fn on_file_system(self: &Arc<Self>, dir: &Path, bytes: u64) -> ServiceResult<Reservation> {
        let (dev, free) = file_system(dir)?;
        self.reserve(Pot::FileSystem(dev), bytes, free, |avail| {
            format!(
                "only {avail} are free (not yet reserved) on the file system of {}",
                dir.display()
            )
        })
    }

    /// Reserves `bytes` of the thin pool `vg/pool`, which has `free` bytes unmapped.
    pub fn in_pool(
        self: &Arc<Self>,
        vg: &str,
        pool: &str,
        free: u64,
        bytes: u64,
    ) -> ServiceResult<Reservation> {
        self.reserve(Pot::Pool(format!("{vg}/{pool}")), bytes, free, |avail| {
            format!("only {avail} are free (not yet reserved) in the thin pool {vg}/{pool}")
        })
    }

    /// Bytes reserved and not yet written on the file system of `dir`.
    pub fn reserved_on(&self, dir: &Path) -> u64 {
        let Ok((dev, _)) = file_system(dir) else {
            return 0;
        };
        self.lock()
            .get(&Pot::FileSystem(dev))
            .map_or(0, |l| l.iter().map(|h| h.outstanding()).sum())
    }
}

/// The device number and the bytes available to unprivileged users of the file system
/// holding `dir`.
fn file_system(dir: &Path) -> ServiceResult<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)
        .map_err(|e| ServiceError::internal(format!("{}: {e}", dir.display())))?
        .dev();
    Ok((dev, file_system_usage(dir)?.available))
}

/// The size of a file system and what unprivileged users may still write to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsUsage {
    /// Bytes in all.
    pub size: u64,
    /// Bytes available to unprivileged users.
    pub available: u64,
}

/// The usage of the file system holding `dir`.
pub fn file_system_usage(dir: &Path) -> ServiceResult<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ServiceError::internal(format!("{} holds a NUL byte", dir.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the size
    // statvfs fills; it is read only after the call reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(ServiceError::internal(format!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: statvfs succeeded, so it initialised the whole structure.
    let st = unsafe { st.assume_init() };
    Ok(FsUsage {
        size: st.f_blocks.saturating_mul(st.f_frsize),
        available: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_against_each_other_until_released_or_written() {
        let space = Arc::new(Space::default());
        let a = space.in_pool("vg", "data", 100, 60).unwrap();
        let e = space.in_pool("vg", "data", 100, 50).unwrap_err();
        assert_eq!(e.status(), 507, "{e}");
        // Other pools are separate.
        let _b = space.in_pool("vg", "other", 100, 50).unwrap();
        // What `a` has written is counted by the pool itself (free drops to 70).
        a.consumed(30);
        assert!(space.in_pool("vg", "data", 70, 50).is_err());
        assert!(space.in_pool("vg", "data", 70, 40).is_ok());
        drop(a);
        let _c = space.in_pool("vg", "data", 100, 100).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (_, free) = file_system(dir.path()).unwrap();
        let d = space.on_file_system(dir.path(), free / 2 + 1).unwrap();
        assert_eq!(space.reserved_on(dir.path()), free / 2 + 1);
        assert!(space.on_file_system(dir.path(), free / 2 + 1).is_err());
        drop(d);
        assert_eq!(space.reserved_on(dir.path()), 0);
    }
}
