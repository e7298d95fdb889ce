//! The local copy of a pack datastore's snapshots (`snapshots/ID/TIME/{index,manifest}` in its
//! cache folder), reconciled with the bucket when the datastore is opened: snapshots the bucket
//! has and the folder lacks are downloaded (index, then manifest, into a staging folder renamed
//! into place, as a backup commits); snapshots the folder has and the bucket lacks (pruned
//! elsewhere) are removed locally, unless a reader holds them.

use std::collections::HashSet;

use strata_storage::{Result, StorageError};

use crate::fsutil::{self, io_err};
use crate::lock::{create_dirs_durably, lock_snapshot_exclusive};
use crate::remote::Remote;
use crate::snapshot::SnapshotName;
use crate::store::{Datastore, INDEX_FILE, MANIFEST_FILE};

/// Reconciles the local snapshot folders with the bucket. See the module documentation.
pub fn refresh(store: &Datastore, remote: &Remote) -> Result<()> {
    let (in_bucket, _) = remote.list_snapshots()?;
    let local: HashSet<SnapshotName> = store.list()?.into_iter().collect();
    let wanted: HashSet<&SnapshotName> = in_bucket.iter().collect();
    for name in &in_bucket {
        if local.contains(name) {
            continue;
        }
        download(store, remote, name)?;
    }
    for name in &local {
        if wanted.contains(name) {
            continue;
        }
        // Pruned from the bucket (by another appliance, or a removal cut short here).
        if let Ok(_excl) = lock_snapshot_exclusive(store, name) {
            remove_local(store, name)?;
        }
    }
    Ok(())
}

fn download(store: &Datastore, remote: &Remote, name: &SnapshotName) -> Result<()> {
    // Gone since the listing (pruned meanwhile): nothing to copy.
    let Some((manifest, index)) = remote.read_snapshot_objects(name)? else {
        return Ok(());
    };
    let group = store.snapshots_dir().join(name.id());
    let sfs = store.fs();
    create_dirs_durably(sfs, &store.snapshots_dir(), std::path::Path::new(name.id()))?;
    let staging = group.join(format!(".tmp-mirror-{:016x}", fastrand::u64(..)));
    sfs.create_dir(&staging)
        .map_err(|e| io_err("Creating", &staging, e))?;
    let r = (|| {
        fsutil::atomic_write(sfs, &staging, INDEX_FILE, &index)?;
        fsutil::atomic_write(sfs, &staging, MANIFEST_FILE, &manifest)?;
        let target = store.snapshot_dir(name);
        match fsutil::rename_noreplace(sfs, &staging, &target) {
            // Another process mirrored it meanwhile.
            Err(StorageError::AlreadyExists(_)) => Ok(()),
            r => r,
        }?;
        fsutil::fsync_dir(sfs, &group)
    })();
    if staging.exists() {
        let _ = sfs.remove_dir_all(&staging);
    }
    r
}

/// Removes a snapshot's local folder (the caller holds its exclusive lock): hidden rename (an
/// atomic disappearance), fsync of the group folder, then delete. Once the rename is durable
/// the snapshot is removed; a failure to delete its files after that is logged, and garbage
/// collection deletes the folder (`.del-…`).
pub fn remove_local(store: &Datastore, name: &SnapshotName) -> Result<()> {
    let dir = store.snapshot_dir(name);
    let group = dir
        .parent()
        .ok_or_else(|| StorageError::InvalidInput(format!("Bad snapshot path for {name}")))?
        .to_path_buf();
    let hidden = group.join(format!(
        ".del-{}-{:016x}",
        crate::time::format(name.time()),
        fastrand::u64(..)
    ));
    let sfs = store.fs();
    sfs.rename(&dir, &hidden)
        .map_err(|e| io_err("Removing", &dir, e))?;
    fsutil::fsync_dir(sfs, &group)?;
    // The snapshot is gone for good now; its files are garbage that gc deletes if this fails.
    if let Err(e) = sfs.remove_dir_all(&hidden) {
        tracing::warn!(folder = %hidden.display(), error = %e, "deleting a removed snapshot's files failed; gc will");
    }
    Ok(())
}
