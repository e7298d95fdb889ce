//! An RBD image as a [`BlockDevice`]: one open image, its queues (`queue.rs`), size, flush,
//! resize, and allocation status from the object map.

use std::any::Any;
use std::sync::Arc;

use super::hub::Hub;
use super::image::Image;
use super::queue::RbdQueue;
use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use crate::error::{Result, StorageError};
use crate::io::{IoQueue, QueueOptions};

/// An open RBD image (or snapshot, read-only). See the module documentation.
pub struct RbdDevice {
    name: Arc<str>,
    hub: Arc<Hub>,
    read_only: bool,
    /// Whatever must live as long as the device (the group that opened it).
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for RbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDevice")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl RbdDevice {
    /// A device over `image`, named `name` in messages; `read_only` refuses writes (an image
    /// opened at a snapshot is always read-only).
    pub fn new(
        name: &str,
        image: Image,
        read_only: bool,
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<RbdDevice> {
        Ok(RbdDevice {
            name: name.into(),
            hub: Hub::new(image)?,
            read_only,
            _owner: owner,
        })
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        self.hub.image()
    }
}

impl BlockDevice for RbdDevice {
    fn size(&self) -> u64 {
        self.hub.size()
    }

    fn capabilities(&self) -> Capabilities {
        if self.read_only {
            return Capabilities::BLOCK_STATUS;
        }
        Capabilities::WRITE
            | Capabilities::FLUSH
            | Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP
            | Capabilities::RESIZE
            | Capabilities::BLOCK_STATUS
    }

    fn alignment(&self) -> usize {
        // librbd takes any buffer and offset.
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(Box::new(RbdQueue::new(
            self.hub.clone(),
            self.name.clone(),
            self.read_only,
            opts,
        )?))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.hub.image().flush()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly(self.name.to_string()));
        }
        self.hub.image().resize(new_size)?;
        self.hub.set_size(self.hub.image().size()?);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        if len == 0 {
            return Ok(Extent {
                offset,
                len: 0,
                kind: ExtentKind::Unallocated,
            });
        }
        // The first allocated extent at or after `offset` (objects, from the object map; a
        // clone's parent counts).
        let mut first: Option<(u64, u64)> = None;
        self.hub
            .image()
            .diff(None, offset, len, true, true, &mut |o, l, exists| {
                if exists && l > 0 {
                    first = Some((o, l));
                    return false;
                }
                true
            })?;
        let end = offset + len;
        Ok(match first {
            Some((o, l)) if o <= offset => Extent {
                offset,
                len: (o + l).min(end) - offset,
                kind: ExtentKind::Data,
            },
            Some((o, _)) => Extent {
                offset,
                len: o.min(end) - offset,
                kind: ExtentKind::Unallocated,
            },
            None => Extent {
                offset,
                len,
                kind: ExtentKind::Unallocated,
            },
        })
    }
}
