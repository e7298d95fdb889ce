//! Changed-block tracking of RBD volumes from Ceph itself, for incremental backups: each backup
//! takes an RBD snapshot, reads that snapshot (a point-in-time copy), and asks librbd which
//! objects changed since the previous backup's snapshot (`rbd_diff_iterate2` with fast-diff: the
//! object maps answer, no data is read). No dirty bitmap is kept.
//!
//! Snapshots are named `.strata-backup-KEY-pSEQ` while a backup runs and renamed to
//! `.strata-backup-KEY-dSEQ` once it is committed (KEY tells datastores and groups apart). The
//! base of the next backup is the highest `d` snapshot; `p` snapshots are leftovers of backups
//! that failed or were killed and are removed. A crash after the datastore committed a backup
//! but before the rename leaves the older `d` snapshot as base: the next diff then covers more
//! than needed, never less.

use std::sync::Arc;

use super::device::RbdDevice;
use super::group::{RbdGroup, INTERNAL_PREFIX};
use super::image::Image;
use crate::device::BlockDevice;
use crate::error::{Result, StorageError};

/// A run of changed bytes: `(offset, length)`.
pub type Range = (u64, u64);

/// What one take produced.
#[derive(Debug)]
pub struct Taken {
    /// The new snapshot, read-only: what the backup reads.
    pub device: Arc<dyn BlockDevice>,
    /// Ranges changed since the previous committed take, or `None` when there was none.
    pub ranges: Option<Vec<Range>>,
}

/// Changed-block tracking of one RBD volume for one backup chain. See the module
/// documentation.
#[derive(Debug)]
pub struct RbdChanges {
    group: RbdGroup,
    volume: String,
    prefix: String,
    base: Option<(u64, String)>,
    pending: Option<(u64, String)>,
}

fn parse(prefix: &str, snap: &str) -> Option<(char, u64)> {
    let rest = snap.strip_prefix(prefix)?;
    let mut chars = rest.chars();
    let state = chars.next()?;
    let seq = chars.as_str().parse().ok()?;
    matches!(state, 'p' | 'd').then_some((state, seq))
}

impl RbdChanges {
    /// Tracking of volume `volume` of `group` for the backup chain `key` (a short identifier,
    /// letters and digits).
    pub fn new(group: &RbdGroup, volume: &str, key: &str) -> Result<RbdChanges> {
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(StorageError::InvalidInput(format!(
                "Invalid tracking key {key:?}"
            )));
        }
        let prefix = format!("{INTERNAL_PREFIX}backup-{key}-");
        let img = group.open_image(volume)?;
        let base = img
            .snapshots()?
            .into_iter()
            .filter_map(|s| match parse(&prefix, &s.name) {
                Some(('d', seq)) => Some((seq, s.name)),
                _ => None,
            })
            .max();
        Ok(RbdChanges {
            group: group.clone(),
            volume: volume.to_string(),
            prefix,
            base,
            pending: None,
        })
    }

    /// The snapshot the next take diffs against, if any.
    pub fn base(&self) -> Option<&str> {
        self.base.as_ref().map(|(_, n)| n.as_str())
    }

    /// The name the snapshot of the current take will have once committed.
    pub fn committed_name(&self) -> Option<String> {
        self.pending
            .as_ref()
            .map(|(seq, _)| format!("{}d{seq}", self.prefix))
    }

    fn image(&self) -> Result<Image> {
        self.group.open_image(&self.volume)
    }

    /// Takes a new snapshot: returns it as a read-only device and the ranges changed since the
    /// base (see the module documentation).
    pub fn take(&mut self) -> Result<Taken> {
        if self.pending.is_some() {
            return Err(StorageError::InvalidInput(
                "a take is still pending: commit it or give it back first".into(),
            ));
        }
        let img = self.image()?;
        let mut last = 0;
        for s in img.snapshots()? {
            match parse(&self.prefix, &s.name) {
                Some(('p', seq)) => {
                    tracing::info!(snapshot = %s.name, "removing the snapshot of a backup that did not finish");
                    img.snap_remove(&s.name)?;
                    last = last.max(seq);
                }
                Some((_, seq)) => last = last.max(seq),
                None => {}
            }
        }
        let seq = last + 1;
        let name = format!("{}p{seq}", self.prefix);
        img.snap_create(&name)?;
        self.pending = Some((seq, name.clone()));
        match self.open_taken(&name) {
            Ok(t) => Ok(t),
            Err(e) => {
                if let Err(e2) = self.give_back() {
                    tracing::warn!(error = %e2, "removing the new backup snapshot failed");
                }
                Err(e)
            }
        }
    }

    fn open_taken(&self, name: &str) -> Result<Taken> {
        let pool = self.group.pool();
        let at = Image::open(pool, &self.volume, Some(name), true)?;
        let ranges = match &self.base {
            None => None,
            Some((_, base)) => {
                let size = at.size()?;
                let mut ranges: Vec<Range> = Vec::new();
                // Extents discarded since the base changed too (they now read as zeros).
                at.diff(
                    Some(base),
                    0,
                    size,
                    false,
                    true,
                    &mut |off, len, _exists| {
                        match ranges.last_mut() {
                            Some((o, l)) if *o + *l == off => *l += len,
                            _ => ranges.push((off, len)),
                        }
                        true
                    },
                )?;
                Some(ranges)
            }
        };
        let label = format!("{}/{}@{name}", self.group.name(), self.volume);
        Ok(Taken {
            device: Arc::new(RbdDevice::new(&label, at, true, None)?),
            ranges,
        })
    }

    /// Drops the current take (after a failed backup): removes its snapshot.
    pub fn give_back(&mut self) -> Result<()> {
        match self.pending.take() {
            Some((_, name)) => self.image()?.snap_remove(&name),
            None => Ok(()),
        }
    }

    /// Makes the current take the base of the next one (after the backup was committed):
    /// renames its snapshot and removes older ones.
    pub fn commit(&mut self) -> Result<()> {
        let Some((seq, name)) = self.pending.take() else {
            return Ok(());
        };
        let img = self.image()?;
        let done = format!("{}d{seq}", self.prefix);
        img.snap_rename(&name, &done)?;
        for s in img.snapshots()? {
            if let Some(('d', old)) = parse(&self.prefix, &s.name) {
                if old < seq {
                    img.snap_remove(&s.name)?;
                }
            }
        }
        self.base = Some((seq, done));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_parse() {
        let p = ".strata-backup-ab12-";
        assert_eq!(parse(p, ".strata-backup-ab12-d7"), Some(('d', 7)));
        assert_eq!(parse(p, ".strata-backup-ab12-p8"), Some(('p', 8)));
        assert_eq!(parse(p, ".strata-backup-ab12-x8"), None);
        assert_eq!(parse(p, ".strata-backup-ab13-d1"), None);
        assert_eq!(parse(p, "snap1"), None);
    }
}
