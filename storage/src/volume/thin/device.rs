//! A thin volume, snapshot or clone as a block device.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use crate::error::{Result, StorageError};
use crate::io::{IoQueue, QueueOptions};
use crate::volume::thin::pool::ThinPool;

/// Longest extent one `block_status` call reports, in blocks (callers ask again for the rest).
const STATUS_MAX_BLOCKS: u64 = 16384;

/// Keeps a device marked open in its pool (and its volume group locked) while any handle or
/// queue on it exists.
pub(crate) struct OpenThin {
    pub(crate) pool: Arc<ThinPool>,
    pub(crate) id: u32,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl OpenThin {
    pub(crate) fn new(
        pool: Arc<ThinPool>,
        id: u32,
        writable: bool,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<OpenThin> {
        pool.open_device(id, writable)?;
        Ok(OpenThin {
            pool,
            id,
            _owner: owner,
        })
    }
}

impl Drop for OpenThin {
    fn drop(&mut self) {
        self.pool.close_device(self.id);
    }
}

/// A thin device. See the module documentation.
pub struct ThinDevice {
    name: String,
    read_only: bool,
    alignment: usize,
    open: Arc<OpenThin>,
}

impl fmt::Debug for ThinDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThinDevice")
            .field("name", &self.name)
            .field("id", &self.open.id)
            .finish()
    }
}

impl ThinDevice {
    pub(crate) fn new(name: String, read_only: bool, open: OpenThin) -> ThinDevice {
        let alignment = crate::volume::pvs::pv_alignment(&open.pool.pvs);
        ThinDevice {
            name,
            read_only,
            alignment,
            open: Arc::new(open),
        }
    }

    /// `VG/NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool the device lives in.
    pub fn pool(&self) -> &Arc<ThinPool> {
        &self.open.pool
    }

    /// The device's identifier in its pool.
    pub fn id(&self) -> u32 {
        self.open.id
    }
}

impl BlockDevice for ThinDevice {
    fn size(&self) -> u64 {
        self.open.pool.device_size(self.open.id)
    }

    fn capabilities(&self) -> Capabilities {
        let base = Capabilities::FLUSH
            | Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP
            | Capabilities::BLOCK_STATUS;
        if self.read_only {
            base
        } else {
            base | Capabilities::WRITE | Capabilities::RESIZE
        }
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        crate::volume::thin::queue::open_queue(
            self.name.clone(),
            self.read_only,
            self.open.clone(),
            opts,
        )
    }

    fn flush(&self) -> Result<()> {
        self.open.pool.commit()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly(self.name.clone()));
        }
        self.open.pool.resize_device(self.open.id, new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let pool = &self.open.pool;
        let bs = pool.block_size();
        let st = pool.lock_state();
        let dev = st.dev(self.open.id)?;
        let size = dev.entry.size;
        if offset >= size || len == 0 {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        let end = offset.saturating_add(len).min(size);
        let root = dev.entry.root;
        let first = offset / bs;
        let limit = end.div_ceil(bs).min(first + STATUS_MAX_BLOCKS);
        let mapped = st.forest.lookup(root, first)?.is_some();
        let mut k = first + 1;
        if mapped {
            while k < limit && st.forest.lookup(root, k)?.is_some() {
                k += 1;
            }
        } else {
            k = st
                .forest
                .next_mapped(root, first)?
                .unwrap_or(limit)
                .min(limit);
        }
        Ok(Extent {
            offset,
            len: (k * bs).min(end) - offset,
            kind: if mapped {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            },
        })
    }
}
