//! What changed on a source since its last snapshot: the input of an incremental backup.
//!
//! Change tracking is supplied as a set of dirty byte ranges relative to a base snapshot, plus a
//! validity flag, taken atomically from the source so that writes during the backup land in the
//! next one. It comes from a volume's persistent dirty bitmap, or from a `--dirty-ranges` file
//! written by whatever tracked the writes (a guest agent, a hypervisor's bitmap export). When it
//! is missing, invalid, or relative to another snapshot than the group's latest, the backup reads
//! everything and says why.

use std::sync::Arc;

use strata_storage::{BlockDevice, Result, StorageError};

use crate::index::chunk_count;

/// Most ranges a dirty-ranges file may list.
pub const MAX_RANGES: usize = 16 << 20;

/// Change information for one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// The source tracks no changes.
    Untracked,
    /// The source's tracking is known to be unusable (a bitmap marked inconsistent after a
    /// crash, say).
    Invalid {
        /// Where the tracking came from.
        origin: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Bytes written since snapshot `base`.
    Dirty {
        /// Where the tracking came from (shown in the manifest).
        origin: String,
        /// The snapshot (`ID/TIME`) the ranges are relative to.
        base: String,
        /// Dirty `(offset, length)` ranges.
        ranges: Vec<(u64, u64)>,
    },
}

impl Changes {
    /// Parses a dirty-ranges file: `#` comments, one `base ID/TIME` line, then `OFFSET LENGTH`
    /// lines (decimal bytes).
    pub fn parse_ranges_file(text: &str, origin: &str) -> Result<Changes> {
        let mut base = None;
        let mut ranges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                StorageError::InvalidInput(format!(
                    "{origin} line {}: expected 'base ID/TIME' or 'OFFSET LENGTH', got '{line}'",
                    n + 1
                ))
            };
            let mut words = line.split_whitespace();
            let (a, b) = (words.next(), words.next());
            if words.next().is_some() {
                return Err(bad());
            }
            match (a, b) {
                (Some("base"), Some(name)) if base.is_none() => base = Some(name.to_string()),
                (Some(off), Some(len)) => {
                    if ranges.len() >= MAX_RANGES {
                        return Err(StorageError::InvalidInput(format!(
                            "{origin} lists more than {MAX_RANGES} ranges"
                        )));
                    }
                    let off: u64 = off.parse().map_err(|_| bad())?;
                    let len: u64 = len.parse().map_err(|_| bad())?;
                    ranges.push((off, len));
                }
                _ => return Err(bad()),
            }
        }
        let base = base.ok_or_else(|| {
            StorageError::InvalidInput(format!("{origin} has no 'base ID/TIME' line"))
        })?;
        Ok(Changes::Dirty {
            origin: origin.to_string(),
            base,
            ranges,
        })
    }
}

/// Changes taken from a tracker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakenChanges {
    /// Dirty `(offset, length)` ranges since the previous take.
    pub ranges: Vec<(u64, u64)>,
    /// False when writes may be missing (an unclean stop while tracking).
    pub valid: bool,
    /// Why they are invalid, when known.
    pub invalid_reason: Option<String>,
}

/// A source's change tracker: a volume's or image's persistent dirty bitmap, dedicated to one
/// datastore and group (a bitmap shared by two backup chains would give each only part of the
/// changes).
pub trait ChangeTracker {
    /// A description recorded in manifests (`bitmap NAME of lv:VG/NAME`): the next backup is
    /// incremental only if the group's latest snapshot recorded what this returns before its
    /// take. A bitmap's is constant; a snapshot tracker names its base before a take and the new
    /// snapshot after it.
    fn describe(&self) -> String;
    /// Returns the changes since the previous take and restarts tracking atomically, so writes
    /// during the backup land in the next take. `None` when there was no previous take (the
    /// tracker is created now).
    fn take(&mut self) -> Result<Option<TakenChanges>>;
    /// Merges the last take back after a failed backup.
    fn give_back(&mut self) -> Result<()>;
    /// The point-in-time copy the last take describes, when the tracker made one (an RBD
    /// snapshot): the backup reads it instead of the live source. `None` for trackers that
    /// only record writes (a bitmap).
    fn snapshot(&self) -> Option<Arc<dyn BlockDevice>>;
    /// Called once the backup of the last take is committed to the datastore (a snapshot
    /// tracker makes that take's snapshot the base of the next one).
    fn commit(&mut self) -> Result<()>;
}

/// Marks the chunks that dirty `ranges` touch, for a source of `size` bytes. Linear in the
/// number of ranges plus chunks, however much the ranges overlap.
pub fn dirty_chunks(ranges: &[(u64, u64)], size: u64, chunk_size: u32) -> Result<Vec<bool>> {
    let count = chunk_count(size, chunk_size) as usize;
    let cs = chunk_size as u64;
    // +1 where a dirty run of chunks starts, -1 after it ends; a prefix sum marks the runs.
    let mut edges = vec![0i64; count + 1];
    for &(off, len) in ranges {
        if len == 0 {
            continue;
        }
        let end = off.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
            StorageError::InvalidInput(format!(
                "Dirty range at {off} of {len} bytes is beyond the source's {size} bytes"
            ))
        })?;
        edges[(off / cs) as usize] += 1;
        edges[end.div_ceil(cs) as usize] -= 1;
    }
    let mut depth = 0i64;
    Ok(edges[..count]
        .iter()
        .map(|e| {
            depth += e;
            depth > 0
        })
        .collect())
}

/// The change tracker of volume `lv` of `group` for backup group `id` in `store`: its dirty
/// bitmap on a local group, RBD snapshots and fast-diff on an RBD group. `label` names the
/// source in manifests (`lv:VG/NAME`). The one place that choice is made, for the `strata
/// backup` tool and the appliance's backup jobs alike.
pub fn volume_tracker(
    group: &strata_storage::volume::Group,
    lv: &str,
    store: &crate::Datastore,
    id: &str,
    label: String,
) -> strata_storage::Result<Box<dyn ChangeTracker + Send>> {
    use strata_storage::volume::Group;
    Ok(match group {
        Group::Local(vg) => Box::new(crate::bitmap_tracker::BitmapTracker::new(
            vg.bitmaps(lv)?,
            crate::bitmap_tracker::bitmap_name(store.root(), id),
            label,
        )),
        #[cfg(feature = "rbd")]
        Group::Rbd(g) => Box::new(crate::rbd_tracker::RbdTracker::new(
            g,
            lv,
            store.root(),
            id,
            label,
        )?),
        // A kind this crate was built without (its `rbd` feature off while storage's is on).
        #[allow(unreachable_patterns)]
        _ => {
            return Err(strata_storage::StorageError::Unsupported(format!(
                "change tracking of volumes in group {}",
                group.name()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_chunks() {
        let d = dirty_chunks(&[(0, 1), (3 << 20, 2 << 20), (10, 0)], 9 << 20, 1 << 20).unwrap();
        let set: Vec<usize> = d.iter().enumerate().filter(|x| *x.1).map(|x| x.0).collect();
        assert_eq!(set, [0, 3, 4]);
        assert!(dirty_chunks(&[(9 << 20, 1)], 9 << 20, 1 << 20).is_err());
        assert!(dirty_chunks(&[(u64::MAX, 2)], 9 << 20, 1 << 20).is_err());
    }

    #[test]
    fn ranges_file_parses_and_rejects_garbage() {
        let c = Changes::parse_ranges_file(
            "# x\nbase image/a/2026-11-27T05:00:00Z\n0 4096\n  8192 512\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            c,
            Changes::Dirty {
                origin: "f".into(),
                base: "image/a/2026-11-27T05:00:00Z".into(),
                ranges: vec![(0, 4096), (8192, 512)]
            }
        );
        assert!(Changes::parse_ranges_file("0 1\n", "f").is_err());
        assert!(Changes::parse_ranges_file("base a/b\n1 x\n", "f").is_err());
        assert!(Changes::parse_ranges_file("base a/b\n1 2 3\n", "f").is_err());
    }

    proptest::proptest! {
        #[test]
        fn dirty_chunks_match_a_naive_marking(
            ranges in proptest::collection::vec((0u64..(10 << 20), 0u64..(3 << 20)), 0..30)
        ) {
            let size = 13 << 20;
            let cs = 1u32 << 20;
            let got = dirty_chunks(&ranges, size, cs).unwrap();
            let mut want = vec![false; 13];
            for &(off, len) in &ranges {
                for byte_chunk in (off..off + len).step_by(4096).map(|b| b / cs as u64) {
                    want[byte_chunk as usize] = true;
                }
                if len > 0 {
                    want[((off + len - 1) / cs as u64) as usize] = true;
                }
            }
            proptest::prop_assert_eq!(got, want);
        }
    }
}
