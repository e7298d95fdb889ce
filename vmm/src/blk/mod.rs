//! The virtio-blk device, fed by the block layer.
//!
//! The device is split the way its data flows:
//! - [`config`]: what the device offers (feature bits, the configuration space) for one disk;
//! - [`chain`]: turning a descriptor chain into a validated request (untrusted input: every
//!   address, length, direction and the chain's shape are checked);
//! - [`engine`]: one per virtqueue, moving requests between the virtqueue and one
//!   [`strata_storage::io::IoQueue`], with the data going straight between guest memory and the
//!   storage engine (no bounce copy).
//!
//! The same engine serves the in-process VMM (a worker thread per queue, woken by an ioeventfd,
//! interrupting through an irqfd) and the vhost-user-blk backend (woken by the front-end's kick
//! eventfd, interrupting through its call eventfd): only who owns the queue and who gets notified
//! differ.
//!
//! The disk is any `Arc<dyn BlockDevice>`: a raw, qcow2 or vmdk image, a volume, or a wrapper
//! such as a changed-block tracker that marks a dirty bitmap for every write it passes on.

pub mod chain;
pub mod config;
pub mod device;
pub mod engine;
pub mod poll;
#[cfg(test)]
mod props;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod worker;

pub use config::{BlkConfig, DiskOptions};
pub use device::BlkDevice;
pub use engine::{QueueEngine, Signal};

/// Bytes in a virtio-blk sector, the unit of request offsets and lengths.
pub const SECTOR_SIZE: u64 = 512;

/// Request types (virtio spec 5.2.6).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Feature bits (virtio spec 5.2.3 and 6).
pub mod features {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// The device supports multiqueue.
    pub const MQ: u64 = 1 << 12;
    /// The device supports discard.
    pub const DISCARD: u64 = 1 << 13;
    /// The device supports write zeroes.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.0 or later.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Length of the ID string GET_ID returns.
pub const ID_BYTES: usize = 20;
