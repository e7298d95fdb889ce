//! Locks and the registry of running backups.
//!
//! - A running backup registers in `writers/NONCE.lock`, holding an exclusive `flock` on it for
//!   its whole run; the file holds its start time. Garbage collection keeps every chunk whose
//!   modification time is later than the oldest registered start (minus the grace period), and
//!   treats a registration whose lock it can take as left by a dead process.
//! - A backup holds an exclusive lock on its group (`snapshots/ID/.lock`): one backup per group
//!   at a time, so parents and timestamps are well defined.
//! - Restore and verify hold a shared lock on a snapshot's manifest; prune takes it exclusively
//!   without waiting and skips a snapshot in use.
//! - One garbage collection at a time: an exclusive lock on `.gc.lock`.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use strata_storage::{Result, StorageError};

use crate::fsutil::{self, io_err, Flock};
use crate::snapshot::SnapshotName;
use crate::store::{Datastore, MANIFEST_FILE};
use crate::storefs::StoreFs;

/// A running backup's registration; removed when dropped.
#[derive(Debug)]
pub struct WriterRegistration {
    _lock: Flock,
    path: PathBuf,
    nonce: String,
    start_ns: i128,
}

impl WriterRegistration {
    /// Registers a backup starting now.
    pub fn register(store: &Datastore) -> Result<WriterRegistration> {
        let dir = store.writers_dir();
        let nonce = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        let start_ns = fsutil::now_ns();
        // Locked under a temporary name first, so that garbage collection never sees the final
        // name unlocked.
        let tmp = dir.join(format!(".{nonce}.new"));
        let lock = Flock::acquire(&tmp, true, false, true, "writer registration")?;
        (|| -> std::io::Result<()> {
            let mut f = lock.file();
            f.write_all(start_ns.to_string().as_bytes())?;
            f.flush()
        })()
        .map_err(|e| io_err("Writing", &tmp, e))?;
        let path = dir.join(format!("{nonce}.lock"));
        fs::rename(&tmp, &path).map_err(|e| io_err("Registering", &path, e))?;
        Ok(WriterRegistration {
            _lock: lock,
            path,
            nonce,
            start_ns,
        })
    }

    /// A unique name for this run.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// When the run started, in nanoseconds since the epoch.
    pub fn start_ns(&self) -> i128 {
        self.start_ns
    }
}

impl Drop for WriterRegistration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The backups running now.
#[derive(Debug, Default)]
pub struct LiveWriters {
    /// Start of the oldest, in nanoseconds since the epoch.
    pub oldest_start_ns: Option<i128>,
    /// Their nonces.
    pub nonces: HashSet<String>,
    /// Registrations of dead processes removed by the scan.
    pub stale_removed: usize,
}

/// Finds running backups; removes registrations whose process is gone.
pub fn scan_writers(store: &Datastore) -> Result<LiveWriters> {
    let dir = store.writers_dir();
    let mut live = LiveWriters::default();
    let rd = fs::read_dir(&dir).map_err(|e| io_err("Listing", &dir, e))?;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(nonce) = name.strip_suffix(".lock") else {
            continue;
        };
        let path = ent.path();
        match Flock::acquire(&path, true, false, false, "writer") {
            Ok(_stale) => {
                let _ = fs::remove_file(&path);
                live.stale_removed += 1;
            }
            Err(StorageError::Busy(_)) => {
                let start = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i128>().ok())
                    // A registration being written: it started about now.
                    .unwrap_or_else(fsutil::now_ns);
                live.oldest_start_ns = Some(live.oldest_start_ns.map_or(start, |o| o.min(start)));
                live.nonces.insert(nonce.to_string());
            }
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(live)
}

/// Whether the backup with registration `nonce` is still running.
pub fn writer_alive(store: &Datastore, nonce: &str) -> bool {
    let path = store.writers_dir().join(format!("{nonce}.lock"));
    matches!(
        Flock::acquire(&path, true, false, false, "writer"),
        Err(StorageError::Busy(_))
    )
}

/// Takes the exclusive lock of a snapshot group, creating the group folder.
pub fn lock_group(store: &Datastore, id: &str) -> Result<(Flock, PathBuf)> {
    let dir = store.snapshots_dir().join(id);
    create_dirs_durably(store.fs(), &store.snapshots_dir(), Path::new(id))?;
    let lock = Flock::acquire(
        &dir.join(".lock"),
        true,
        false,
        true,
        &format!("Backup group {id} (another backup of it is running)"),
    )?;
    Ok((lock, dir))
}

/// Creates `base/rel` one component at a time, fsyncing each parent that gained an entry.
pub fn create_dirs_durably(sfs: &dyn StoreFs, base: &Path, rel: &Path) -> Result<()> {
    let mut cur = base.to_path_buf();
    for comp in rel.components() {
        let next = cur.join(comp);
        match sfs.create_dir(&next) {
            Ok(()) => fsutil::fsync_dir(sfs, &cur)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("Creating", &next, e)),
        }
        cur = next;
    }
    Ok(())
}

/// Holds a snapshot against removal while it is read.
pub fn lock_snapshot_shared(store: &Datastore, name: &SnapshotName) -> Result<Flock> {
    let path = store.snapshot_dir(name).join(MANIFEST_FILE);
    Flock::acquire(&path, false, true, false, "snapshot").map_err(|e| match e {
        StorageError::NotFound(_) => {
            StorageError::InvalidInput(format!("Snapshot {name} does not exist (was it pruned?)"))
        }
        e => e,
    })
}

/// Takes a snapshot for removal; `Busy` when it is being read.
pub fn lock_snapshot_exclusive(store: &Datastore, name: &SnapshotName) -> Result<Flock> {
    let path = store.snapshot_dir(name).join(MANIFEST_FILE);
    Flock::acquire(
        &path,
        true,
        false,
        false,
        &format!("Snapshot {name} (it is being read)"),
    )
}

/// Holds off garbage collection of a pack datastore for a backup's run (waits for a running
/// one to end).
pub fn lock_gc_shared(store: &Datastore) -> Result<Flock> {
    Flock::acquire(
        &store.root().join(".gc.lock"),
        false,
        true,
        true,
        "Garbage collection lock",
    )
}

/// Takes the garbage-collection lock without waiting.
pub fn lock_gc(store: &Datastore) -> Result<Flock> {
    Flock::acquire(
        &store.root().join(".gc.lock"),
        true,
        false,
        true,
        if store.remote().is_some() {
            // Backups of a pack datastore hold the lock shared.
            "Garbage collection (a backup or another gc is running)"
        } else {
            "Garbage collection (another one is running)"
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_seen_while_alive_and_cleaned_when_dead() {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(d.path()).unwrap();
        let w = WriterRegistration::register(&s).unwrap();
        let live = scan_writers(&s).unwrap();
        assert_eq!(live.oldest_start_ns, Some(w.start_ns()));
        assert!(live.nonces.contains(w.nonce()));
        // A registration whose lock nobody holds is a dead writer's.
        fs::write(s.writers_dir().join("1-dead.lock"), b"5").unwrap();
        let live = scan_writers(&s).unwrap();
        assert_eq!(live.stale_removed, 1);
        assert_eq!(live.nonces.len(), 1);
        drop(w);
        assert!(scan_writers(&s).unwrap().nonces.is_empty());
        assert_eq!(fs::read_dir(s.writers_dir()).unwrap().count(), 0);
    }

    #[test]
    fn group_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(d.path()).unwrap();
        let _a = lock_group(&s, "volume/vg/a").unwrap();
        assert!(matches!(
            lock_group(&s, "volume/vg/a"),
            Err(StorageError::Busy(_))
        ));
        let _b = lock_group(&s, "volume/vg/b").unwrap();
    }
}
