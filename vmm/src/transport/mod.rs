//! Virtio transports. Strata uses virtio-mmio, described to the guest in ACPI tables (see
//! docs/architecture.md, "The VMM", for why).
//!
//! The transport knows registers, feature negotiation and queue set-up; what a device does with
//! its queues once the driver sets DRIVER_OK is behind [`VirtioDevice`] (virtio-blk in
//! `blk/device.rs`, virtio-net in `net/device.rs`).

pub mod mmio;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::blk::chain::SharedMemory;

pub use mmio::{MmioInterrupt, VirtioMmio};

/// Copies `data.len()` bytes of a device's configuration space `space` from `offset`; bytes past
/// its end (or an offset the driver made up) read as zero.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| space.get(at).copied())
            .unwrap_or(0);
    }
}

/// Interrupts the driver for a queue (an irqfd, a vhost-user call eventfd).
pub trait Signal: Send + Sync {
    /// Tells the driver that the used ring has new entries.
    fn signal_used(&self);
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// The ready queues: (index, queue, the queue's kick eventfd).
    pub queues: Vec<(usize, Queue, EventFd)>,
    /// Guest memory.
    pub mem: SharedMemory,
    /// The device's interrupt.
    pub interrupt: Arc<MmioInterrupt>,
    /// The features the driver accepted.
    pub driver_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device ID (1 network, 2 block).
    fn device_type(&self) -> u32;
    /// The feature bits offered.
    fn features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// The largest size of each virtqueue (a power of two, at most 1024).
    fn queue_max_size(&self) -> u16;
    /// Reads the configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving the queues (the driver set DRIVER_OK). An error sets NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Stops serving (the driver reset the device, or the VM ends); in-flight work is drained.
    fn reset(&mut self);
}
