//! A qcow2 image as the home of change tracking: its enabled persistent bitmaps are the
//! bitmaps of a [`crate::bitmap::BitmapSet`] (see `crate::bitmap::persistent`). The writable
//! open flags them in use before the first write (`meta.rs`) and remembers which it flagged:
//! those were consistent and are tracked from their saved bits; one found flagged already was
//! left by a writer that did not close cleanly, and is reported inconsistent. A clean close
//! writes the tracked bits to new tables and clears the flag (`bitmap_store.rs`), so QEMU finds
//! the bitmap consistent with every write Strata made marked dirty.

use crate::bitmap::{BitmapBits, PersistentBitmaps, StoredBitmap};
use crate::device::BlockDevice;
use crate::error::Result;

use super::bitmap_store::NewBitmap;
use super::bitmaps::{self, FLAG_AUTO, FLAG_IN_USE};
use super::Qcow2Image;

impl PersistentBitmaps for Qcow2Image {
    fn load_enabled(&self) -> Result<Vec<StoredBitmap>> {
        let flagged = self.lock()?.bitmaps_flagged.clone();
        let mut out = Vec::new();
        for b in self.bitmaps()?.into_iter().filter(|b| b.auto) {
            let consistent = !b.in_use || flagged.contains(&b.name);
            let words = if consistent {
                let as_saved = bitmaps::Qcow2Bitmap {
                    in_use: false,
                    ..b.clone()
                };
                Some(bitmaps::read_words(
                    self.shared.file.as_ref(),
                    &as_saved,
                    self.size(),
                    self.shared.geo.cluster_size,
                )?)
            } else {
                None
            };
            out.push(StoredBitmap {
                name: b.name,
                granularity: b.granularity,
                words,
            });
        }
        Ok(out)
    }

    fn add_enabled(&self, name: &str, granularity: u64, in_use: bool) -> Result<()> {
        let words = vec![0u64; self.size().div_ceil(granularity).div_ceil(64) as usize];
        let flags = FLAG_AUTO | if in_use { FLAG_IN_USE } else { 0 };
        self.exclusive(|m| {
            m.add_bitmap(&NewBitmap {
                name,
                granularity,
                words: &words,
                flags,
            })?;
            if in_use {
                m.bitmaps_flagged.push(name.to_string());
            }
            Ok(())
        })
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.exclusive(|m| {
            m.remove_bitmap(name)?;
            m.bitmaps_flagged.retain(|n| n != name);
            Ok(())
        })
    }

    fn store(&self, list: &[BitmapBits<'_>]) -> Result<()> {
        self.exclusive(|m| {
            m.store_bitmaps(list)?;
            for b in list {
                let known = m.bitmaps_flagged.iter().any(|n| n == b.name);
                if b.in_use && !known {
                    m.bitmaps_flagged.push(b.name.to_string());
                }
            }
            Ok(())
        })
    }
}
