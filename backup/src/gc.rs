//! Garbage collection: mark and sweep with a time cutoff, safe while backups run.
//!
//! Why not a lock that stops backups: a datastore with many groups would stall every backup for
//! the whole sweep. Instead, every chunk a backup uses gets a fresh modification time: a chunk it
//! writes is new, a chunk it finds already stored (or inherits from its parent's index) is
//! touched (`utimensat`) before the backup relies on it. GC then works like this:
//!
//! 1. One GC at a time (`.gc.lock`). Chunks a killed GC had set aside are put back.
//! 2. `start` = now. The writer registry gives the start of the oldest running backup; registrations
//!    of dead processes are removed, along with their staging folders.
//!    `cutoff = min(start, oldest running backup's start) − grace`.
//! 3. Mark: read the index of every snapshot. An unreadable index stops GC before anything is
//!    deleted (we cannot know what it references): fix or remove that snapshot first.
//! 4. Sweep each fan-out directory. A chunk is kept if marked, or if its mtime ≥ cutoff (a
//!    running backup may use it). Otherwise it is renamed aside (`DIGEST.gc-PID`), its mtime is
//!    read again, and it is put back if it changed (a backup touched it between our first look
//!    and the rename) — else it is deleted. A backup touching the chunk after the rename finds it
//!    missing and stores it again, so no interleaving loses a chunk a snapshot will reference.
//!    Temporary files older than the cutoff (left by killed backups) are deleted too.
//!
//! The grace period (default 5 minutes, at least 1 second) absorbs the coarseness of file-system
//! timestamps and small clock steps; correctness does not otherwise depend on it.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::Serialize;
use strata_storage::{Result, StorageError};

use crate::digest::Digest;
use crate::fsutil::{self, io_err, is_temp_name};
use crate::lock::{lock_gc, scan_writers, writer_alive};
use crate::progress::Progress;
use crate::store::{Datastore, GC_INFIX};
use crate::storefs::StoreFs;

/// Default grace period in seconds.
pub const DEFAULT_GRACE_SECS: u64 = 300;

/// Figures of a GC run.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcStats {
    /// Snapshots whose indexes were marked.
    pub snapshots: u64,
    /// Distinct chunks referenced.
    pub chunks_referenced: u64,
    /// Chunks kept although unreferenced (newer than the cutoff).
    pub chunks_recent: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Bytes of chunk files removed.
    pub bytes_removed: u64,
    /// Chunks put back after a concurrent backup touched them.
    pub chunks_rescued: u64,
    /// Temporary files, staging and deleted-snapshot folders removed.
    pub leftovers_removed: u64,
    /// In a pack datastore: what happened to the packs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packs: Option<crate::pack_gc::PackGcStats>,
}

/// Runs garbage collection with the given grace period.
pub fn gc(store: &Datastore, grace_secs: u64, progress: &dyn Progress) -> Result<GcStats> {
    gc_with(
        store,
        grace_secs,
        crate::remote::DEFAULT_REPACK_BELOW,
        progress,
    )
}

/// [`gc`]; in a pack datastore, packs whose live fraction is below `repack_below` are
/// rewritten.
pub fn gc_with(
    store: &Datastore,
    grace_secs: u64,
    repack_below: f64,
    progress: &dyn Progress,
) -> Result<GcStats> {
    let _gc = lock_gc(store)?;
    if let Some(remote) = store.remote() {
        return gc_packs(store, remote, repack_below, progress);
    }
    let mut stats = GcStats::default();
    let grace_ns = grace_secs.max(1) as i128 * 1_000_000_000;
    recover_set_aside(store)?;

    let start = fsutil::now_ns();
    let writers = scan_writers(store)?;
    let cutoff = writers.oldest_start_ns.unwrap_or(start).min(start) - grace_ns;
    stats.leftovers_removed += remove_leftover_folders(store, &writers.nonces)?;

    let mut marked: HashSet<Digest> = HashSet::new();
    for name in store.list()? {
        let index = match store.read_snapshot(&name) {
            Ok((_, index)) => index,
            // Pruned while we looked: nothing to mark.
            Err(_) if !store.snapshot_dir(&name).exists() => continue,
            Err(e) => {
                return Err(StorageError::corrupt(
                    format!("snapshot {name}"),
                    format!("{e}; garbage collection removed nothing. Verify the datastore and remove or repair this snapshot"),
                ))
            }
        };
        stats.snapshots += 1;
        marked.extend(index.entries().iter().filter_map(|e| e.digest()));
    }
    stats.chunks_referenced = marked.len() as u64;

    progress.begin("gc", 256);
    let pid = std::process::id();
    for b in 0..=255u8 {
        let dir = store.chunks_dir().join(format!("{b:02x}"));
        if progress.cancelled() {
            // Sweeping is per chunk and safe to stop anywhere.
            return Err(StorageError::Cancelled);
        }
        sweep_dir(store.fs(), &dir, &marked, cutoff, pid, &mut stats)?;
        progress.advance(1);
    }
    progress.finish();
    Ok(stats)
}

/// Garbage collection of a pack datastore: backups are excluded by the lock we hold, so marking
/// every snapshot of the bucket (refreshed now) and collecting packs is safe. An unreadable
/// index stops it before anything is deleted.
fn gc_packs(
    store: &Datastore,
    remote: &std::sync::Arc<crate::remote::Remote>,
    repack_below: f64,
    progress: &dyn Progress,
) -> Result<GcStats> {
    let mut stats = GcStats::default();
    let writers = scan_writers(store)?;
    stats.leftovers_removed += remove_leftover_folders(store, &writers.nonces)?;
    crate::mirror::refresh(store, remote)?;
    let mut marked: HashSet<Digest> = HashSet::new();
    for name in store.list()? {
        let index = store.read_snapshot(&name).map_err(|e| {
            StorageError::corrupt(
                format!("snapshot {name}"),
                format!("{e}; garbage collection removed nothing"),
            )
        })?;
        stats.snapshots += 1;
        marked.extend(index.1.entries().iter().filter_map(|e| e.digest()));
    }
    stats.chunks_referenced = marked.len() as u64;
    let packs = crate::pack_gc::collect(remote, &marked, repack_below, progress)?;
    stats.bytes_removed = packs.bytes_removed;
    stats.packs = Some(packs);
    Ok(stats)
}

fn sweep_dir(
    sfs: &dyn StoreFs,
    dir: &Path,
    marked: &HashSet<Digest>,
    cutoff: i128,
    pid: u32,
    stats: &mut GcStats,
) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(|e| io_err("Listing", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| io_err("Listing", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let path = ent.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if is_temp_name(&name) {
            if fsutil::mtime_ns(&meta) < cutoff && sfs.remove_file(&path).is_ok() {
                stats.leftovers_removed += 1;
            }
            continue;
        }
        let Ok(digest) = Digest::from_hex(&name) else {
            continue;
        };
        if marked.contains(&digest) {
            continue;
        }
        if fsutil::mtime_ns(&meta) >= cutoff {
            stats.chunks_recent += 1;
            continue;
        }
        let aside = dir.join(format!("{name}{GC_INFIX}{pid}"));
        match sfs.rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("Setting aside", &path, e)),
        }
        let again = fs::symlink_metadata(&aside).map_err(|e| io_err("Inspecting", &aside, e))?;
        if fsutil::mtime_ns(&again) >= cutoff {
            put_back(sfs, &aside, &path)?;
            stats.chunks_rescued += 1;
            continue;
        }
        sfs.remove_file(&aside)
            .map_err(|e| io_err("Removing", &aside, e))?;
        stats.chunks_removed += 1;
        stats.bytes_removed += again.len();
    }
    Ok(())
}

/// Puts a set-aside chunk back; if a backup stored the same chunk again meanwhile, ours is a
/// duplicate and goes.
fn put_back(sfs: &dyn StoreFs, aside: &Path, path: &Path) -> Result<()> {
    match fsutil::rename_noreplace(sfs, aside, path) {
        Ok(()) => Ok(()),
        Err(StorageError::AlreadyExists(_)) => sfs
            .remove_file(aside)
            .map_err(|e| io_err("Removing", aside, e)),
        Err(e) => Err(e),
    }
}

/// Puts back every chunk a killed GC had set aside (we hold the GC lock: no GC is running).
fn recover_set_aside(store: &Datastore) -> Result<()> {
    for b in 0..=255u8 {
        let dir = store.chunks_dir().join(format!("{b:02x}"));
        let rd = fs::read_dir(&dir).map_err(|e| io_err("Listing", &dir, e))?;
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some((digest, _)) = name.split_once(GC_INFIX) {
                put_back(store.fs(), &ent.path(), &dir.join(digest))?;
            }
        }
    }
    Ok(())
}

/// Removes staging folders of dead backups and folders of interrupted snapshot removals.
fn remove_leftover_folders(store: &Datastore, live: &HashSet<String>) -> Result<u64> {
    let mut removed = 0;
    let mut stack = vec![store.snapshots_dir()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = ent.file_name().to_string_lossy().into_owned();
            let stale = if let Some(nonce) = name.strip_prefix(".tmp-") {
                // Check again: a backup may have registered after the registry scan.
                !live.contains(nonce) && !writer_alive(store, nonce)
            } else {
                name.starts_with(".del-")
            };
            if stale {
                if store.fs().remove_dir_all(&ent.path()).is_ok() {
                    removed += 1;
                }
            } else if !name.starts_with('.') && crate::time::parse(&name).is_err() {
                stack.push(ent.path());
            }
        }
    }
    Ok(removed)
}
