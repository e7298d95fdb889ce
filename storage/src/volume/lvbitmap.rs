//! Dirty bitmaps of logical volumes: one sidecar file per volume under
//! `DATA/bitmaps/VG-UUID/KEY.bitmaps`, where KEY is stable across renames (a linear volume's
//! identifier, or a thin device's pool identifier and device number). Every writable open of a
//! volume is tracked, so a bitmap added while the volume is open misses nothing; all handles
//! of one volume in this process share one [`BitmapSet`].

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use crate::bitmap::{BitmapSet, TrackedDevice};
use crate::device::BlockDevice;
use crate::durable::{host_fs, FileSystem};
use crate::error::{Result, StorageError};
use crate::volume::lv::Located;
use crate::volume::vg::{Vg, VgState};

impl Vg {
    /// The key of a volume's bitmap file.
    fn bitmap_key(&self, st: &mut VgState, name: &str) -> Result<String> {
        match self.locate(st, name)? {
            Located::Linear(lv) => Ok(lv.uuid),
            Located::Thin { pool, id } => Ok(format!("{}-{id}", pool.uuid)),
            Located::Pool(_) => Err(StorageError::InvalidInput(format!(
                "{}/{name} is a thin pool: bitmaps belong to its volumes",
                st.meta.name
            ))),
        }
    }

    fn bitmap_file(&self, st: &VgState, key: &str) -> Result<PathBuf> {
        let dir = self.inner.opts.bitmap_dir.as_ref().ok_or_else(|| {
            StorageError::Unsupported(
                "dirty bitmaps of a volume group opened without a data directory".into(),
            )
        })?;
        Ok(dir.join(&st.meta.uuid).join(format!("{key}.bitmaps")))
    }

    fn bitmap_set(&self, st: &mut VgState, name: &str, size: u64) -> Result<Arc<BitmapSet>> {
        let key = self.bitmap_key(st, name)?;
        if let Some(live) = st.tracked.get(&key).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let file = self.bitmap_file(st, &key)?;
        let set = Arc::new(BitmapSet::open_with(self.bitmap_fs(), &file, size)?);
        st.tracked.retain(|_, w| w.strong_count() > 0);
        st.tracked.insert(key, Arc::downgrade(&set));
        Ok(set)
    }

    /// The dirty bitmaps of volume `name`: the live set if the volume is open in this process.
    pub fn bitmaps(&self, name: &str) -> Result<Arc<BitmapSet>> {
        let size = self.lv_info(name)?.size;
        let mut st = self.state();
        self.bitmap_set(&mut st, name, size)
    }

    /// Wraps a volume just opened so that its writes are tracked (when the group has a data
    /// directory and the volume is writable).
    pub(crate) fn tracked(
        &self,
        st: &mut VgState,
        name: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<Arc<dyn BlockDevice>> {
        if dev.read_only() || self.inner.opts.bitmap_dir.is_none() {
            return Ok(dev);
        }
        let set = self.bitmap_set(st, name, dev.size())?;
        Ok(Arc::new(TrackedDevice::with_set(dev, set)?))
    }

    /// Follows a resize in the live bitmaps of `name`, if any.
    pub(crate) fn resize_bitmaps(&self, st: &mut VgState, name: &str, size: u64) -> Result<()> {
        let key = match self.bitmap_key(st, name) {
            Ok(k) => k,
            Err(_) => return Ok(()),
        };
        if let Some(live) = st.tracked.get(&key).and_then(Weak::upgrade) {
            live.resize(size)?;
        }
        Ok(())
    }

    /// The file system the bitmap files live in.
    pub(crate) fn bitmap_fs(&self) -> Arc<dyn FileSystem> {
        self.inner.opts.bitmap_fs.clone().unwrap_or_else(host_fs)
    }

    /// The key of `name`'s bitmaps, to delete them once the volume is gone.
    pub(crate) fn bitmap_file_of(&self, st: &mut VgState, name: &str) -> Option<PathBuf> {
        let key = self.bitmap_key(st, name).ok()?;
        self.bitmap_file(st, &key).ok()
    }
}
