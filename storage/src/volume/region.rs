//! Synchronous byte access to a linear volume, for metadata: a thin pool's metadata volume is
//! read and written through its PVs' [`crate::HostFile`] methods, so the fault-injecting engine
//! sees every write and flush.

use std::sync::{Arc, RwLock};

use crate::error::{Result, StorageError};
use crate::volume::extents::ExtentMap;
use crate::volume::pvs::PvSet;

/// A linear volume seen as bytes. See the module documentation.
#[derive(Clone, Debug)]
pub struct Region {
    map: Arc<RwLock<ExtentMap>>,
    pvs: PvSet,
    name: String,
}

impl Region {
    /// The volume mapped by `map` on `pvs`; `name` is for messages.
    pub fn new(map: Arc<RwLock<ExtentMap>>, pvs: PvSet, name: String) -> Region {
        Region { map, pvs, name }
    }

    /// Bytes in the volume.
    pub fn size(&self) -> u64 {
        crate::sync::read(&self.map).size()
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PV indexes the volume uses.
    pub fn pv_indexes(&self) -> Vec<usize> {
        crate::sync::read(&self.map).pvs()
    }

    fn each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(usize, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let map = crate::sync::read(&self.map).clone();
        let mut at = 0usize;
        while at < len {
            let m = map
                .map(offset + at as u64)
                .ok_or_else(|| StorageError::OutOfRange {
                    offset,
                    len: len as u64,
                    size: map.size(),
                })?;
            let n = (m.len.min((len - at) as u64)) as usize;
            f(m.pv, m.pv_offset, at, n)?;
            at += n;
        }
        Ok(())
    }

    fn pv(&self, i: usize) -> Result<crate::SharedFile> {
        crate::sync::read(&self.pvs).get(i).cloned().ok_or_else(|| {
            StorageError::Unavailable(format!("PV #{i} of {} is not open", self.name))
        })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.each_piece(offset, len, |pv, pv_off, at, n| {
            self.pv(pv)?.read_exact_at(pv_off, &mut buf[at..at + n])
        })
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.each_piece(offset, data.len(), |pv, pv_off, at, n| {
            self.pv(pv)?.write_all_at(pv_off, &data[at..at + n])
        })
    }

    /// Makes every completed write to the volume's PVs durable.
    pub fn sync(&self) -> Result<()> {
        for i in self.pv_indexes() {
            self.pv(i)?.sync_data()?;
        }
        Ok(())
    }
}
