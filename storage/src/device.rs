//! The control plane: what a block device is and what it can do.
//!
//! [`BlockDevice`] is implemented by every image format and volume: its size, its explicit
//! [`Capabilities`], durable flush, resize, allocation status, and queues for the data plane.
//! [`HostFile`] is the narrower interface formats sit on: a byte-addressed container (a file, a
//! block device, an in-memory or fault-injecting test device) with synchronous positional I/O for
//! metadata, in addition to queues for data.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::error::Result;
use crate::io::{IoQueue, QueueOptions};

bitflags::bitflags! {
    /// What a device supports. A method whose capability is missing returns
    /// [`crate::StorageError::Unsupported`]; nothing is silently skipped.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Capabilities: u32 {
        /// Writes are accepted (the device is not read-only).
        const WRITE = 1 << 0;
        /// Flush makes completed writes durable (always set for devices that can write).
        const FLUSH = 1 << 1;
        /// Discard frees space, and discarded ranges read back as zeros.
        const DISCARD = 1 << 2;
        /// Write-zeroes is done without transferring a zero buffer.
        const WRITE_ZEROES = 1 << 3;
        /// Write-zeroes may deallocate (`unmap`).
        const WRITE_ZEROES_UNMAP = 1 << 4;
        /// The virtual size can change.
        const RESIZE = 1 << 5;
        /// [`BlockDevice::block_status`] reports real allocation (otherwise everything is data).
        const BLOCK_STATUS = 1 << 6;
    }
}

/// How a range of a device is backed, as reported by [`BlockDevice::block_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtentKind {
    /// Holds data (which may still happen to be zeros).
    Data,
    /// Reads as zeros, known without reading.
    Zero,
    /// Not allocated in the image or anywhere in its backing chain: reads as zeros. (For a
    /// range its top layer does not hold, an image with a backing file reports what the
    /// backing file has there.)
    Unallocated,
}

/// A run of bytes with one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes (at least 1 for a non-empty query).
    pub len: u64,
    /// How the range is backed.
    pub kind: ExtentKind,
}

/// A block device: an image, a volume, or a host file. See the module documentation.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// What the device supports.
    fn capabilities(&self) -> Capabilities;

    /// Buffer address, length and offset alignment for zero-copy I/O. Other requests still
    /// work, but may be bounced through an aligned buffer.
    fn alignment(&self) -> usize;

    /// Opens a data-plane queue.
    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>>;

    /// Makes every write completed so far durable, including format metadata.
    fn flush(&self) -> Result<()>;

    /// Changes the virtual size (needs [`Capabilities::RESIZE`]).
    fn resize(&self, new_size: u64) -> Result<()>;

    /// How the bytes from `offset` on are backed: one extent starting at `offset`, at most `len`
    /// long. Without [`Capabilities::BLOCK_STATUS`] the whole range is reported as data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        !self.capabilities().contains(Capabilities::WRITE)
    }

    /// The dirty bitmaps the device keeps itself (a qcow2 image's bitmaps extension), if any:
    /// change tracking then lives there instead of in a sidecar file.
    fn persistent_bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        None
    }
}

/// A byte container that formats store their data and metadata in. See the module documentation.
///
/// The synchronous methods are for metadata and control work; bulk data goes through queues.
/// Every engine routes both through the same file so that a fault-injecting engine sees all of it.
pub trait HostFile: BlockDevice {
    /// A name for messages (usually the path).
    fn name(&self) -> &str;

    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> Result<()>;

    /// Current length in bytes.
    fn len(&self) -> u64;

    /// Whether the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the length, truncating or extending with a hole.
    fn set_len(&self, len: u64) -> Result<()>;

    /// Deallocates a range; it reads as zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read as zeros, keeping it allocated.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()>;

    /// Allocates space for a range without changing its contents (fallocate).
    fn allocate(&self, offset: u64, len: u64) -> Result<()>;

    /// Bytes of storage actually allocated on the host.
    fn allocated_bytes(&self) -> Result<u64>;
}

/// A shared handle to a host file.
pub type SharedFile = Arc<dyn HostFile>;
