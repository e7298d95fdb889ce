//! The datastore's usage for the dashboard and the metrics: snapshots, the bytes they
//! describe and the bytes their chunks take, the deduplication factor, the file system's free
//! space, the newest snapshot of each group, and the last garbage collection and verification.
//!
//! Counting the chunk bytes walks the chunk folders, so the server does it when it samples
//! usage (see [`super::usage_history`]) and shows the last sample.

use std::collections::BTreeMap;

use serde::Serialize;

use super::backup_state::TaskRun;
use super::space::{file_system_usage, FsUsage};
use super::{Service, ServiceResult};

/// Chunk files counted at most per sample (the walk is bounded; beyond it the figures are
/// marked partial).
pub const MAX_CHUNKS_COUNTED: u64 = 20_000_000;

/// The newest snapshot of one group.
#[derive(Clone, Debug, Serialize)]
pub struct GroupLatest {
    /// The group id (`volume/VG/NAME`, `image/NAME`).
    pub id: String,
    /// Snapshots in the group.
    pub snapshots: u64,
    /// Time of the newest, seconds since the Unix epoch.
    pub latest: i64,
}

/// See the module documentation.
#[derive(Clone, Debug, Serialize)]
pub struct DatastoreUsage {
    /// Snapshots in the datastore.
    pub snapshots: u64,
    /// Sum of the sizes of every snapshot's source.
    pub logical_bytes: u64,
    /// Chunk files in the datastore.
    pub chunks: u64,
    /// Bytes of chunk files on disk.
    pub stored_bytes: u64,
    /// `logical_bytes / stored_bytes` (none while nothing is stored).
    pub dedup_factor: Option<f64>,
    /// The file system holding the datastore.
    pub file_system: FsUsage,
    /// Whether the chunk walk stopped at [`MAX_CHUNKS_COUNTED`].
    pub partial: bool,
    /// Per group, its newest snapshot.
    pub groups: Vec<GroupLatest>,
    /// The last garbage collection.
    pub last_gc: Option<TaskRun>,
    /// The last verification.
    pub last_verify: Option<TaskRun>,
}

/// The newest snapshot of each group among `names`.
fn latest_of_groups(names: &[strata_backup::SnapshotName]) -> Vec<GroupLatest> {
    let mut groups: BTreeMap<String, GroupLatest> = BTreeMap::new();
    for n in names {
        let g = groups.entry(n.id().to_string()).or_insert(GroupLatest {
            id: n.id().to_string(),
            snapshots: 0,
            latest: i64::MIN,
        });
        g.snapshots += 1;
        g.latest = g.latest.max(n.time());
    }
    groups.into_values().collect()
}

impl Service {
    /// The newest snapshot of each backup group, listed now (cheap: no chunk walk), for
    /// backup ages that do not wait for the next usage sample.
    pub fn latest_backups(&self) -> ServiceResult<Vec<GroupLatest>> {
        Ok(latest_of_groups(&self.datastore()?.list()?))
    }

    /// Measures the datastore now (walks its chunk folders).
    pub fn measure_datastore(&self) -> ServiceResult<DatastoreUsage> {
        let store = self.datastore()?;
        let names = store.list()?;
        let mut logical = 0u64;
        for n in &names {
            if let Ok(m) = store.read_manifest(n) {
                logical = logical.saturating_add(m.size);
            }
        }
        let groups = latest_of_groups(&names);
        let (mut chunks, mut stored, mut partial) = (0u64, 0u64, false);
        'walk: for dir in std::fs::read_dir(store.chunks_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if chunks >= MAX_CHUNKS_COUNTED {
                    partial = true;
                    break 'walk;
                }
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        chunks += 1;
                        stored = stored.saturating_add(m.len());
                    }
                }
            }
        }
        let (last_gc, last_verify) = self.backup_state.last_runs();
        Ok(DatastoreUsage {
            snapshots: names.len() as u64,
            logical_bytes: logical,
            chunks,
            stored_bytes: stored,
            dedup_factor: (stored > 0).then(|| logical as f64 / stored as f64),
            file_system: file_system_usage(store.root())?,
            partial,
            groups,
            last_gc,
            last_verify,
        })
    }
}
