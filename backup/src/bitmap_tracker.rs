//! A [`ChangeTracker`] over a volume's persistent dirty bitmap (`strata_storage::bitmap`).
//!
//! Each datastore and group gets its own bitmap on the volume, named `backup-` plus 16 hex digits
//! of BLAKE3(datastore path, group id): two backup chains of one volume must not share a bitmap,
//! or each would see only part of the changes. The first backup adds the bitmap (and reads
//! everything); later ones take it. Only volumes are tracked automatically: every writable open
//! of a volume goes through the bitmap, which is not true of an image file other programs may
//! write (use `--dirty-ranges` there).

use std::path::Path;
use std::sync::Arc;

use strata_storage::bitmap::{BitmapSet, TakenBitmap, DEFAULT_GRANULARITY};
use strata_storage::{Result, StorageError};

use crate::changes::{ChangeTracker, TakenChanges};
use crate::digest::Digest;

/// The bitmap name for backups of group `id` into the datastore at `store_root`.
pub fn bitmap_name(store_root: &Path, id: &str) -> String {
    let root = std::fs::canonicalize(store_root).unwrap_or_else(|_| store_root.to_path_buf());
    let mut key = root.as_os_str().as_encoded_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    format!("backup-{}", &Digest::of(&key).to_hex()[..16])
}

/// Change tracking through a named bitmap of a [`BitmapSet`].
#[derive(Debug)]
pub struct BitmapTracker {
    set: Arc<BitmapSet>,
    name: String,
    source: String,
    last: Option<TakenBitmap>,
}

impl BitmapTracker {
    /// Tracks `source` (for messages) through bitmap `name` of `set`.
    pub fn new(set: Arc<BitmapSet>, name: String, source: String) -> BitmapTracker {
        BitmapTracker {
            set,
            name,
            source,
            last: None,
        }
    }
}

impl ChangeTracker for BitmapTracker {
    fn describe(&self) -> String {
        format!("bitmap {} of {}", self.name, self.source)
    }

    fn take(&mut self) -> Result<Option<TakenChanges>> {
        match self.set.info(&self.name) {
            Ok(_) => {}
            Err(StorageError::NotFound(_)) => {
                self.set.add(&self.name, DEFAULT_GRANULARITY)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let taken = self.set.take(&self.name)?;
        let changes = TakenChanges {
            ranges: taken.dirty_ranges(),
            valid: taken.valid,
            invalid_reason: (!taken.valid).then(|| {
                format!(
                    "{} was not closed cleanly while tracked, so writes may be missing",
                    self.source
                )
            }),
        };
        self.last = Some(taken);
        Ok(Some(changes))
    }

    fn give_back(&mut self) -> Result<()> {
        match self.last.take() {
            Some(t) => self.set.restore(&t),
            None => Ok(()),
        }
    }

    fn snapshot(&self) -> Option<Arc<dyn strata_storage::BlockDevice>> {
        None
    }

    fn commit(&mut self) -> Result<()> {
        self.last = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_take_adds_the_bitmap_then_takes_restart_and_give_back_merges() {
        let d = tempfile::tempdir().unwrap();
        let set = Arc::new(BitmapSet::open(&d.path().join("x.bitmaps"), 16 << 20).unwrap());
        let name = bitmap_name(d.path(), "volume/vg/a");
        assert_ne!(name, bitmap_name(d.path(), "volume/vg/b"));
        let mut t = BitmapTracker::new(set.clone(), name, "lv:vg/a".into());
        assert_eq!(t.take().unwrap(), None);
        set.mark(1 << 20, 10);
        let taken = t.take().unwrap().unwrap();
        assert!(taken.valid);
        assert_eq!(taken.ranges, [(1 << 20, DEFAULT_GRANULARITY)]);
        assert!(
            t.take().unwrap().unwrap().ranges.is_empty(),
            "a take restarts the bitmap"
        );
        set.mark(0, 1);
        let _ = t.take().unwrap().unwrap();
        t.give_back().unwrap();
        assert_eq!(
            t.take().unwrap().unwrap().ranges,
            [(0, DEFAULT_GRANULARITY)]
        );
    }
}
