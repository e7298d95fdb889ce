//! `backup create`: plan what to read (everything, or only the dirty chunks relative to the
//! group's latest snapshot), run the pipeline, and commit the snapshot atomically.
//!
//! Commit order: new chunk files were fdatasync'd before their rename; their fan-out directories
//! are fsync'd; the index and manifest are written into a hidden staging folder (each file
//! fsync'd, the folder fsync'd); the staging folder is renamed to `ID/TIME` without replacing
//! anything; the group folder is fsync'd. A crash before the rename leaves only a staging folder
//! (invisible, removed by gc) and unreferenced chunks (removed by gc); after it, the snapshot is
//! complete.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use strata_storage::{BlockDevice, Result, StorageError};

use crate::changes::{dirty_chunks, ChangeTracker, Changes};
use crate::fsutil::{self, io_err};
use crate::index::{chunk_count, Entry, Index};
use crate::lock::{lock_group, WriterRegistration};
use crate::manifest::{BackupStats, ChangeTracking, Manifest, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::pipeline::{self, PipelineOptions};
use crate::progress::Progress;
use crate::snapshot::{check_id, SnapshotName};
use crate::store::{Datastore, INDEX_FILE, MANIFEST_FILE};
use crate::time;
use crate::writer::ChunkWriter;

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The snapshot group (`volume/vg0/vm-100-disk-0`).
    pub id: String,
    /// The source as the user named it (for the manifest).
    pub source_label: String,
    /// The source's format (for the manifest).
    pub source_format: String,
    /// Change tracking from the source.
    pub changes: Changes,
    /// Pipeline settings.
    pub pipeline: PipelineOptions,
}

/// A finished backup.
#[derive(Clone, Debug)]
pub struct BackupOutcome {
    /// The new snapshot.
    pub snapshot: SnapshotName,
    /// Its manifest (with the run's figures).
    pub manifest: Manifest,
}

struct Plan {
    parent: Option<SnapshotName>,
    /// Entries known without reading (from the parent), by chunk index.
    known: Vec<Option<Entry>>,
    to_read: Vec<u64>,
    tracking: ChangeTracking,
}

/// Backs up `dev` into `store`. See the module documentation.
pub fn create(
    store: &Datastore,
    dev: Arc<dyn BlockDevice>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    check_id(&opts.id)?;
    store.require_key()?;
    let started = Instant::now();
    // A pack datastore's backups and garbage collection exclude each other (see remote.rs).
    let _gc_excluded = match store.remote() {
        Some(_) => Some(crate::lock::lock_gc_shared(store)?),
        None => None,
    };
    let writer = WriterRegistration::register(store)?;
    let (_group_lock, group_dir) = lock_group(store, &opts.id)?;
    let span = tracing::info_span!("backup", id = %opts.id);
    let _enter = span.enter();

    let size = dev.size();
    let chunk_size = store.chunk_size();
    let plan = plan(store, size, opts)?;
    if let Some(reason) = &plan.tracking.fallback_reason {
        tracing::info!(%reason, "reading the whole source");
    }
    let read_bytes: u64 = plan
        .to_read
        .iter()
        .map(|&i| crate::index::chunk_range(size, chunk_size, i).1 as u64)
        .sum();
    progress.begin("backup", read_bytes);
    let chunks = ChunkWriter::new(store)?;
    let result = pipeline::run(store, &chunks, &dev, &plan.to_read, opts.pipeline, progress);
    progress.finish();
    let result = result?;
    chunks.finish()?;

    let mut known = plan.known;
    let from_parent = known.iter().filter(|e| e.is_some()).count() as u64;
    for (idx, e) in &result.entries {
        known[*idx as usize] = Some(*e);
    }
    let entries: Vec<Entry> = known
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            e.ok_or_else(|| {
                StorageError::Unavailable(format!("chunk {i} was neither read nor inherited"))
            })
        })
        .collect::<Result<_>>()?;
    let index = Index::new(size, chunk_size, entries)?;
    let index_bytes = index.encode();

    let latest = store.list_group(&opts.id)?.pop();
    let t = latest.map_or(time::now(), |l| time::now().max(l.time() + 1));
    let name = SnapshotName::new(&opts.id, t)?;
    let secs = started.elapsed().as_secs_f64();
    let stats = BackupStats {
        bytes_read: result.bytes_read,
        chunks_total: index.entries().len() as u64,
        chunks_zero: index
            .entries()
            .iter()
            .filter(|e| **e == Entry::Zero)
            .count() as u64,
        chunks_new: result.new,
        chunks_reused: result.reused,
        chunks_from_parent: from_parent,
        bytes_stored: result.bytes_stored,
        dedup_ratio: dedup_ratio(&index),
        duration_secs: secs,
        throughput_mib_s: size as f64 / (1 << 20) as f64 / secs.max(1e-9),
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        snapshot: name.to_string(),
        source: opts.source_label.clone(),
        source_format: opts.source_format.clone(),
        size,
        chunk_size,
        chunk_count: index.entries().len() as u64,
        index_len: index_bytes.len() as u64,
        index_crc32: crc32fast::hash(&index_bytes),
        parent: plan.parent.map(|p| p.to_string()),
        change_tracking: plan.tracking,
        stats,
        encryption: None,
        index_mac: None,
        signature: None,
    };
    let mut manifest = manifest;
    if let Some(key) = store.require_key()? {
        manifest.sign(key, &index_bytes)?;
    }
    commit(
        store,
        &group_dir,
        writer.nonce(),
        &name,
        &index_bytes,
        &manifest,
    )?;
    tracing::info!(snapshot = %name, "backup finished");
    drop(writer);
    Ok(BackupOutcome {
        snapshot: name,
        manifest,
    })
}

/// Backs up `dev` with change tracking from `tracker`: takes its changes since the previous take
/// (restarting it, so writes during this backup land in the next one), uses them if they are valid
/// and the group's latest snapshot was the one made at that previous take, gives them back if
/// the backup fails and commits them when it succeeds. A tracker that made a point-in-time copy
/// (an RBD snapshot) is read instead of `dev`. `opts.changes` is ignored.
pub fn create_tracked(
    store: &Datastore,
    dev: Arc<dyn BlockDevice>,
    opts: &BackupOptions,
    tracker: &mut dyn ChangeTracker,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    check_id(&opts.id)?;
    let origin = tracker.describe();
    let taken = tracker.take()?;
    // What this backup records: the next one checks it against its own `origin`.
    let recorded = tracker.describe();
    let changes = match &taken {
        None => Changes::Invalid {
            origin: recorded.clone(),
            reason: "change tracking starts with this backup".into(),
        },
        Some(t) if !t.valid => Changes::Invalid {
            origin: recorded.clone(),
            reason: t
                .invalid_reason
                .clone()
                .unwrap_or_else(|| "the bitmap may have missed writes".into()),
        },
        Some(t) => match latest_taken_with(store, &opts.id, &origin)? {
            Ok(base) => Changes::Dirty {
                origin: recorded.clone(),
                base,
                ranges: t.ranges.clone(),
            },
            Err(reason) => Changes::Invalid {
                origin: recorded.clone(),
                reason,
            },
        },
    };
    let opts = BackupOptions {
        changes,
        ..opts.clone()
    };
    let dev = tracker.snapshot().unwrap_or(dev);
    let result = create(store, dev, &opts, progress);
    match &result {
        Err(_) => {
            if let Err(e) = tracker.give_back() {
                tracing::error!(error = %e, tracker = %origin, "could not give back the taken changes; the next backup must read everything");
            }
        }
        Ok(_) => {
            if let Err(e) = tracker.commit() {
                tracing::error!(error = %e, tracker = %recorded, "could not commit the tracker's take; the next backup reads more than it needs");
            }
        }
    }
    result
}

/// The group's latest snapshot if it was made with tracker `origin`, else why not.
fn latest_taken_with(
    store: &Datastore,
    id: &str,
    origin: &str,
) -> Result<std::result::Result<String, String>> {
    let Some(latest) = store.list_group(id)?.pop() else {
        return Ok(Err("no previous snapshot in this group".into()));
    };
    Ok(match store.read_manifest(&latest) {
        Ok(m) if m.change_tracking.bitmap.as_deref() == Some(origin) => Ok(latest.to_string()),
        Ok(_) => Err(format!(
            "the latest snapshot {latest} was not made with {origin}"
        )),
        Err(e) => Err(format!("the latest snapshot is unreadable: {e}")),
    })
}

/// Source size over the stored size of the distinct chunks the snapshot references.
fn dedup_ratio(index: &Index) -> Option<f64> {
    let mut seen = HashSet::new();
    let stored: u64 = index
        .entries()
        .iter()
        .filter_map(|e| match e {
            Entry::Stored { digest, stored_len } if seen.insert(*digest) => {
                Some(*stored_len as u64)
            }
            _ => None,
        })
        .sum();
    (stored > 0).then(|| index.size() as f64 / stored as f64)
}

/// Commits a snapshot whose chunks are durable: in a pack datastore, index and then manifest
/// (create-if-absent) go to the bucket first; then the local folder (the snapshot, or the
/// pack datastore's copy of it) is built in staging and renamed into place.
pub fn commit(
    store: &Datastore,
    group_dir: &std::path::Path,
    nonce: &str,
    name: &SnapshotName,
    index_bytes: &[u8],
    manifest: &Manifest,
) -> Result<()> {
    let manifest_bytes = manifest.encode()?;
    if let Some(r) = store.remote() {
        r.commit_snapshot(name, index_bytes, &manifest_bytes)?;
    }
    let staging = group_dir.join(format!(".tmp-{nonce}"));
    let sfs = store.fs();
    sfs.create_dir(&staging)
        .map_err(|e| io_err("Creating", &staging, e))?;
    let r = (|| {
        fsutil::atomic_write(sfs, &staging, INDEX_FILE, index_bytes)?;
        fsutil::atomic_write(sfs, &staging, MANIFEST_FILE, &manifest_bytes)?;
        let target = group_dir.join(time::format(name.time()));
        match fsutil::rename_noreplace(sfs, &staging, &target) {
            // A pack datastore's copy made by another process's refresh meanwhile.
            Err(StorageError::AlreadyExists(_)) if store.remote().is_some() => {
                let _ = sfs.remove_dir_all(&staging);
            }
            r => r?,
        }
        fsutil::fsync_dir(sfs, group_dir)
    })();
    if r.is_err() {
        let _ = sfs.remove_dir_all(&staging);
    }
    r
}

fn full(
    count: u64,
    mode_reason: Option<String>,
    bitmap: Option<String>,
) -> (Vec<u64>, ChangeTracking) {
    (
        (0..count).collect(),
        ChangeTracking {
            mode: "full".into(),
            bitmap,
            fallback_reason: mode_reason,
            dirty_chunks: None,
        },
    )
}

fn plan(store: &Datastore, size: u64, opts: &BackupOptions) -> Result<Plan> {
    let chunk_size = store.chunk_size();
    let count = chunk_count(size, chunk_size);
    // The plan holds a few words per chunk: a source too large for an index (a huge sparse
    // image, say) is refused before anything of its size is allocated.
    let index_len = count
        .checked_mul(crate::index::INDEX_ENTRY_LEN as u64)
        .map(|n| n + (crate::index::INDEX_HEADER_LEN + crate::index::INDEX_TRAILER_LEN) as u64);
    if index_len.is_none_or(|n| n > crate::index::MAX_INDEX_LEN) {
        return Err(StorageError::InvalidInput(format!(
            "a source of {size} bytes needs {count} chunks of {chunk_size} bytes, more than a \
             backup index holds ({} bytes at most)",
            crate::index::MAX_INDEX_LEN
        )));
    }
    let parent = store.list_group(&opts.id)?.pop();
    let mut known: Vec<Option<Entry>> = vec![None; count as usize];
    let Some(parent_name) = parent else {
        let (reason, origin) = match &opts.changes {
            Changes::Untracked => (None, None),
            Changes::Invalid { origin, reason } => (Some(reason.clone()), Some(origin.clone())),
            Changes::Dirty { origin, .. } => (
                Some("no previous snapshot in this group".to_string()),
                Some(origin.clone()),
            ),
        };
        let (to_read, tracking) = full(count, reason, origin);
        return Ok(Plan {
            parent: None,
            known,
            to_read,
            tracking,
        });
    };
    let fallback = |reason: String, origin: Option<String>| {
        let (to_read, tracking) = full(count, Some(reason), origin);
        Ok(Plan {
            parent: Some(parent_name.clone()),
            known: vec![None; count as usize],
            to_read,
            tracking,
        })
    };
    let (origin, base, ranges) = match &opts.changes {
        Changes::Untracked => return fallback("the source has no dirty bitmap".into(), None),
        Changes::Invalid { origin, reason } => {
            return fallback(
                format!("dirty bitmap is invalid: {reason}"),
                Some(origin.clone()),
            )
        }
        Changes::Dirty {
            origin,
            base,
            ranges,
        } => (origin, base, ranges),
    };
    if *base != parent_name.to_string() {
        return fallback(
            format!("dirty bitmap is relative to {base}, the latest snapshot is {parent_name}"),
            Some(origin.clone()),
        );
    }
    let (pm, pindex) = match store.read_snapshot(&parent_name) {
        Ok(x) => x,
        Err(e) => {
            return fallback(
                format!("previous index is unusable: {e}"),
                Some(origin.clone()),
            )
        }
    };
    if pm.size != size || pm.chunk_size != chunk_size {
        return fallback(
            format!("the source size changed from {} to {size} bytes", pm.size),
            Some(origin.clone()),
        );
    }
    let dirty = dirty_chunks(ranges, size, chunk_size)?;
    // Every chunk taken from the parent must exist; touching it also protects it from a
    // concurrent garbage collection (see gc.rs).
    let mut checked = HashSet::new();
    for (i, e) in pindex.entries().iter().enumerate() {
        if dirty[i] {
            continue;
        }
        if let Some(d) = e.digest() {
            if checked.insert(d) && !store.touch_chunk(&d)? {
                return fallback(
                    format!("chunk {d} of the previous snapshot is missing"),
                    Some(origin.clone()),
                );
            }
        }
        known[i] = Some(*e);
    }
    let to_read: Vec<u64> = (0..count).filter(|&i| dirty[i as usize]).collect();
    Ok(Plan {
        parent: Some(parent_name),
        known,
        tracking: ChangeTracking {
            mode: "incremental".into(),
            bitmap: Some(origin.clone()),
            fallback_reason: None,
            dirty_chunks: Some(to_read.len() as u64),
        },
        to_read,
    })
}
