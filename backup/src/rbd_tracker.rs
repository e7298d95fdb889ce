//! A [`ChangeTracker`] over Ceph's own change tracking (feature `rbd`): each backup of an RBD
//! volume reads a new RBD snapshot, and only the objects `rbd_diff_iterate2` says changed since
//! the previous backup's snapshot (`strata_storage::volume::rbd::cbt`). No bitmap sidecar.
//!
//! Each datastore and group gets its own snapshots (the key is the same BLAKE3 of datastore
//! path and group id that names bitmaps), so two backup chains of one volume do not steal each
//! other's base.

use std::path::Path;
use std::sync::Arc;

use strata_storage::volume::rbd::cbt::RbdChanges;
use strata_storage::volume::rbd::RbdGroup;
use strata_storage::{BlockDevice, Result};

use crate::changes::{ChangeTracker, TakenChanges};

/// Change tracking of one RBD volume for one datastore and group.
#[derive(Debug)]
pub struct RbdTracker {
    changes: RbdChanges,
    source: String,
    snapshot: Option<Arc<dyn BlockDevice>>,
}

impl RbdTracker {
    /// Tracks volume `volume` of `group` (named `source` in manifests) for backups of group
    /// `id` into the datastore at `store_root`.
    pub fn new(
        group: &RbdGroup,
        volume: &str,
        store_root: &Path,
        id: &str,
        source: String,
    ) -> Result<RbdTracker> {
        let name = crate::bitmap_tracker::bitmap_name(store_root, id);
        let key = name.trim_start_matches("backup-");
        Ok(RbdTracker {
            changes: RbdChanges::new(group, volume, key)?,
            source,
            snapshot: None,
        })
    }
}

impl ChangeTracker for RbdTracker {
    fn describe(&self) -> String {
        let snap = self
            .changes
            .committed_name()
            .or_else(|| self.changes.base().map(str::to_string));
        match snap {
            Some(s) => format!("rbd snapshot {s} of {}", self.source),
            None => format!("rbd snapshots (none yet) of {}", self.source),
        }
    }

    fn take(&mut self) -> Result<Option<TakenChanges>> {
        let taken = self.changes.take()?;
        self.snapshot = Some(taken.device);
        Ok(taken.ranges.map(|ranges| TakenChanges {
            ranges,
            valid: true,
            invalid_reason: None,
        }))
    }

    fn give_back(&mut self) -> Result<()> {
        self.snapshot = None;
        self.changes.give_back()
    }

    fn snapshot(&self) -> Option<Arc<dyn BlockDevice>> {
        self.snapshot.clone()
    }

    fn commit(&mut self) -> Result<()> {
        self.snapshot = None;
        self.changes.commit()
    }
}
