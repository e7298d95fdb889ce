//! Garbage collection of a pack datastore's bucket: deletes orphan indexes (interrupted
//! backups), packs without a live chunk, and rewrites packs whose live fraction is below a
//! threshold (new packs are uploaded before the old are deleted).

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;

use serde::Serialize;
use strata_storage::{Result, StorageError};

use crate::digest::Digest;
use crate::pack::PackEntry;
use crate::remote::{pack_key, Remote};

/// Figures of a pack datastore's garbage collection.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PackGcStats {
    /// Packs before.
    pub packs: u64,
    /// Packs deleted without a live chunk.
    pub packs_removed: u64,
    /// Packs rewritten because their live fraction was below the threshold.
    pub packs_repacked: u64,
    /// Chunks copied into new packs.
    pub chunks_moved: u64,
    /// Bytes of deleted packs.
    pub bytes_removed: u64,
    /// Index objects without a manifest removed (interrupted backups or removals).
    pub orphan_indexes_removed: u64,
}

/// Garbage collection of a pack datastore (the caller holds `.gc.lock` exclusively and has
/// refreshed the snapshots). `marked` is every chunk a snapshot references.
pub fn collect(
    remote: &Arc<Remote>,
    marked: &HashSet<Digest>,
    repack_below: f64,
    progress: &dyn crate::Progress,
) -> Result<PackGcStats> {
    let mut stats = PackGcStats::default();
    let (_, orphans) = remote.list_snapshots()?;
    for key in orphans {
        remote.objects().delete(&key)?;
        stats.orphan_indexes_removed += 1;
    }
    remote.refresh_packs()?;
    let packs = remote.local_packs()?;
    stats.packs = packs.len() as u64;
    // Each chunk counts as live in one pack only: the catalog's (the first in id order).
    let catalog = remote.catalog_snapshot();
    let mut doomed: Vec<(String, u64)> = Vec::new();
    let mut rewrite: Vec<(String, Vec<PackEntry>)> = Vec::new();
    progress.begin("gc", packs.len() as u64);
    for (id, (size, entries)) in &packs {
        let live: Vec<PackEntry> = entries
            .iter()
            .filter(|e| {
                marked.contains(&e.digest)
                    && catalog
                        .get(&e.digest)
                        .is_some_and(|l| &*l.pack == id.as_str())
            })
            .copied()
            .collect();
        let live_bytes: u64 = live.iter().map(|e| e.len as u64).sum();
        if live.is_empty() {
            doomed.push((id.clone(), *size));
        } else if (live_bytes as f64) < repack_below * (*size as f64) {
            rewrite.push((id.clone(), live));
            doomed.push((id.clone(), *size));
        }
    }
    if !rewrite.is_empty() {
        let writer = remote.writer();
        // The rewritten chunks must go into new packs even though the catalog knows them.
        for (_, live) in &rewrite {
            for e in live {
                let blob = remote.fetch_blob(&e.digest)?;
                remote.forget(&e.digest);
                writer.insert_blob(&e.digest, &blob, e.raw_len)?;
                stats.chunks_moved += 1;
            }
        }
        writer.finish()?;
        stats.packs_repacked = rewrite.len() as u64;
    }
    // New packs are durable before an old one goes.
    for (id, size) in doomed {
        if progress.cancelled() {
            return Err(StorageError::Cancelled);
        }
        remote.objects().delete(&pack_key(&id))?;
        let _ = fs::remove_file(remote.idx_path(&id));
        if !rewrite.iter().any(|(r, _)| *r == id) {
            stats.packs_removed += 1;
        }
        stats.bytes_removed += size;
        progress.advance(1);
    }
    progress.finish();
    remote.refresh_packs()?;
    Ok(stats)
}
