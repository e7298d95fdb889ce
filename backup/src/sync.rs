//! `backups sync`: copies snapshots from one datastore to another (local to S3, S3 to local, or
//! any pair), transferring only the chunks the target lacks.
//!
//! A snapshot the target already has (same `ID/TIME`) is skipped. When both datastores use the
//! same keying — both plaintext, or both encrypted with the same key — chunk ids are the same on
//! both sides and blobs are copied as they are (still encrypted: no decryption needed, PBS's
//! sync works the same way); only ids the target lacks are read from the source. When the keying
//! differs (a plaintext local datastore to an encrypted bucket, say), every chunk of the snapshot
//! is read and decoded with the source's key, its id computed with the target's, and it is
//! stored only if the target lacks that id; the index is rewritten with the target's ids and the
//! manifest signed with the target's key. The target snapshot is committed exactly as a backup
//! commits (chunks durable, then index, then manifest last), so an interrupted sync leaves no
//! partial snapshot.

use std::collections::HashMap;

use serde::Serialize;
use strata_storage::{Result, StorageError};

use crate::digest::Digest;
use crate::index::{Entry, Index};
use crate::lock::{lock_group, lock_snapshot_shared, WriterRegistration};
use crate::progress::Progress;
use crate::snapshot::SnapshotName;
use crate::store::{Datastore, Stored};
use crate::writer::ChunkWriter;

/// Figures of a sync.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncStats {
    /// Snapshots copied.
    pub copied: Vec<String>,
    /// Snapshots the target had already.
    pub skipped: u64,
    /// Chunks transferred.
    pub chunks_transferred: u64,
    /// Chunks the target had already.
    pub chunks_present: u64,
    /// Blob bytes transferred.
    pub bytes_transferred: u64,
    /// Whether chunks were re-encoded for another key (or from/to plaintext).
    pub rekeyed: bool,
}

/// Whether `name` is selected by `filters` (empty: all; else an exact `ID/TIME`, a group id, or
/// a group id prefix ending in `/`).
pub fn selected(name: &SnapshotName, filters: &[String]) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| {
            let f = f.as_str();
            f == name.to_string()
                || f == name.id()
                || (f.ends_with('/') && name.id().starts_with(f))
        })
}

/// Copies the snapshots of `from` selected by `filters` that `to` lacks. See the module
/// documentation.
pub fn sync(
    from: &Datastore,
    to: &Datastore,
    filters: &[String],
    progress: &dyn Progress,
) -> Result<SyncStats> {
    from.require_key()?;
    to.require_key()?;
    let mut stats = SyncStats {
        rekeyed: from.encryption() != to.encryption(),
        ..Default::default()
    };
    let names: Vec<SnapshotName> = from
        .list()?
        .into_iter()
        .filter(|n| selected(n, filters))
        .collect();
    if names.is_empty() && !filters.is_empty() {
        return Err(StorageError::InvalidInput(format!(
            "No snapshot in {} matches {}",
            from.describe(),
            filters.join(", ")
        )));
    }
    for name in names {
        if to.snapshot_dir(&name).is_dir() {
            stats.skipped += 1;
            continue;
        }
        if progress.cancelled() {
            return Err(StorageError::Cancelled);
        }
        copy_one(from, to, &name, &mut stats, progress)?;
        stats.copied.push(name.to_string());
    }
    Ok(stats)
}

fn copy_one(
    from: &Datastore,
    to: &Datastore,
    name: &SnapshotName,
    stats: &mut SyncStats,
    progress: &dyn Progress,
) -> Result<()> {
    let _hold = lock_snapshot_shared(from, name)?;
    let (manifest, index) = from.read_snapshot(name)?;
    let _gc_excluded = match to.remote() {
        Some(_) => Some(crate::lock::lock_gc_shared(to)?),
        None => None,
    };
    let registration = WriterRegistration::register(to)?;
    let (_group_lock, group_dir) = lock_group(to, name.id())?;
    let chunks = ChunkWriter::new(to)?;
    let rekey = from.encryption() != to.encryption();
    let mut mapped: HashMap<Digest, (Digest, u32)> = HashMap::new();
    let mut entries = Vec::with_capacity(index.entries().len());
    let mut buf = Vec::new();
    progress.begin("sync", index.size());
    for (i, e) in index.entries().iter().enumerate() {
        let len = index.chunk_range(i as u64).1;
        let Entry::Stored { digest, .. } = e else {
            entries.push(Entry::Zero);
            progress.advance(len as u64);
            continue;
        };
        if progress.cancelled() {
            return Err(StorageError::Cancelled);
        }
        let (id, stored_len) = match mapped.get(digest) {
            Some(m) => *m,
            None => {
                let (id, stored) = if rekey {
                    from.load_chunk(digest, len, &mut buf)?;
                    let id = to.digest_of(&buf);
                    (id, chunks.insert(&id, &buf, 1)?)
                } else if let Some(n) = chunks.known(digest)? {
                    (*digest, Stored::Existing(n))
                } else {
                    let blob = from.read_blob(digest)?;
                    (*digest, chunks.insert_blob(digest, &blob)?)
                };
                let n = match stored {
                    Stored::New(n) => {
                        stats.chunks_transferred += 1;
                        stats.bytes_transferred += n as u64;
                        n
                    }
                    Stored::Existing(n) => {
                        stats.chunks_present += 1;
                        n
                    }
                };
                mapped.insert(*digest, (id, n));
                (id, n)
            }
        };
        entries.push(Entry::Stored {
            digest: id,
            stored_len,
        });
        progress.advance(len as u64);
    }
    progress.finish();
    chunks.finish()?;
    let new_index = Index::new(index.size(), index.chunk_size(), entries)?;
    let index_bytes = new_index.encode();
    let mut m = manifest.clone();
    m.index_len = index_bytes.len() as u64;
    m.index_crc32 = crc32fast::hash(&index_bytes);
    m.encryption = None;
    m.index_mac = None;
    m.signature = None;
    if let Some(key) = to.require_key()? {
        m.sign(key, &index_bytes)?;
    }
    crate::backup::commit(to, &group_dir, registration.nonce(), name, &index_bytes, &m)
}
