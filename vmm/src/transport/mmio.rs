//! The virtio-mmio transport (virtio spec 4.2, version 2) for any [`VirtioDevice`].
//!
//! The register window is served on MMIO exits — configuration only: queue notifications are
//! caught by one ioeventfd per queue (a write of the queue index to QueueNotify) and interrupts
//! leave through an irqfd, so the data path never exits to user space except to read and
//! acknowledge InterruptStatus. On DRIVER_OK the ready queues are handed to the device
//! ([`VirtioDevice::activate`]); a reset (status 0) stops it ([`VirtioDevice::reset`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Signal, VirtioDevice};
use crate::blk::chain::SharedMemory;
use crate::bus::{le_value, BusDevice};
use crate::ratelimit::LogLimiter;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5354_5241; // "STRA"
/// VIRTIO_F_VERSION_1.
const VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_EVENT_IDX.
const RING_EVENT_IDX: u64 = 1 << 29;

/// Offset of QueueNotify, where the ioeventfds listen.
pub const QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_SPACE: u64 = 0x100;

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_NEEDS_RESET: u32 = 64;

/// The interrupt line of one device: an irqfd plus the InterruptStatus register.
#[derive(Debug)]
pub struct MmioInterrupt {
    irqfd: EventFd,
    status: AtomicU32,
}

impl MmioInterrupt {
    /// An interrupt raising `irqfd`.
    pub fn new(irqfd: EventFd) -> MmioInterrupt {
        MmioInterrupt {
            irqfd,
            status: AtomicU32::new(0),
        }
    }
}

impl Signal for MmioInterrupt {
    fn signal_used(&self) {
        self.status.fetch_or(1, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            warn!("raising the virtio interrupt failed: {e}");
        }
    }
}

/// A virtio device on virtio-mmio.
#[derive(Debug)]
pub struct VirtioMmio<D: VirtioDevice> {
    name: String,
    device: D,
    mem: SharedMemory,
    kicks: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    queues: Vec<Queue>,
    running: bool,
    limiter: LogLimiter,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// A transport for `device`. `kicks` are the per-queue ioeventfds (already registered with
    /// KVM at this window's QueueNotify) and `irqfd` the registered interrupt eventfd.
    pub fn new(
        name: String,
        device: D,
        mem: SharedMemory,
        kicks: Vec<EventFd>,
        irqfd: EventFd,
    ) -> VirtioMmio<D> {
        let n = device.num_queues();
        let size = device.queue_max_size();
        VirtioMmio {
            name,
            queues: (0..n).map(|_| new_queue(size)).collect(),
            device,
            mem,
            kicks,
            interrupt: Arc::new(MmioInterrupt::new(irqfd)),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            running: false,
            limiter: LogLimiter::for_guest_errors(),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Stops the device (at the VM's end).
    pub fn stop(&mut self) {
        self.device.reset();
        self.running = false;
    }

    fn reset(&mut self) {
        self.stop();
        let size = self.device.queue_max_size();
        self.queues = (0..self.queues.len()).map(|_| new_queue(size)).collect();
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            // A driver must not clear status bits other than by a reset (virtio 1.2, 2.1.2);
            // honouring it would unlock the queue registers under running workers and start a
            // second set on the next DRIVER_OK.
            let status = self.status;
            self.log(format_args!(
                "status write {value:#x} clears bits of {status:#x}; ignored (reset with 0)"
            ));
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0 && self.driver_features & VERSION_1 != 0;
            if !ok {
                value &= !STATUS_FEATURES_OK; // The driver reads it back and gives up.
            }
        }
        let starting = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if starting {
            if let Err(e) = self.activate() {
                self.log(format_args!("cannot start the device: {e}"));
                self.stop();
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.running {
            return Err("the device is running already".into());
        }
        let event_idx = self.driver_features & RING_EVENT_IDX != 0;
        let size = self.device.queue_max_size();
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(self.mem.as_ref()) {
                return Err(format!("queue {i} is not valid (size or ring addresses)"));
            }
            q.set_event_idx(event_idx);
            let queue = std::mem::replace(q, new_queue(size));
            let kick = self.kicks[i]
                .try_clone()
                .map_err(|e| format!("cloning an eventfd: {e}"))?;
            queues.push((i, queue, kick));
        }
        self.running = true;
        self.device.activate(Activation {
            queues,
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            driver_features: self.driver_features,
        })
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        if self.limiter.check().is_some() {
            warn!(device = %self.name, "{args}");
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => 0, // ConfigGeneration: the configuration never changes.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let running = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if !running => {
                if let Some(q) = self.selected() {
                    match offset {
                        0x38 => q.set_size(v as u16),
                        0x44 => q.set_ready(v == 1),
                        0x80 => q.set_desc_table_address(Some(v), None),
                        0x84 => q.set_desc_table_address(None, Some(v)),
                        0x90 => q.set_avail_ring_address(Some(v), None),
                        0x94 => q.set_avail_ring_address(None, Some(v)),
                        0xa0 => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; forward the odd one that is not.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            _ => self.log(format_args!(
                "ignored write of {v:#x} to register {offset:#x}"
            )),
        }
    }
}

fn new_queue(size: u16) -> Queue {
    // The size is a power of two from 2 to 1024 (checked by the device's configuration), which
    // Queue accepts.
    Queue::new(size).unwrap_or_default()
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // The configuration spaces we offer are read-only for the driver (virtio-blk has
            // no writeback toggle here; virtio-net's MAC is set through the control queue).
            return;
        }
        if data.len() == 4 {
            self.write_reg(offset, le_value(data) as u32);
        }
    }
}

impl<D: VirtioDevice> Drop for VirtioMmio<D> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::io::memory::MemoryDevice;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use crate::blk::{BlkConfig, BlkDevice, DiskOptions};

    fn device() -> VirtioMmio<BlkDevice> {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let cfg = BlkConfig::new(MemoryDevice::new(1 << 20), &DiskOptions::default()).unwrap();
        VirtioMmio::new(
            "vdt".into(),
            BlkDevice::new("vdt".into(), Arc::new(cfg)),
            mem,
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
    }

    fn r(d: &mut VirtioMmio<BlkDevice>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &mut VirtioMmio<BlkDevice>, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    /// A device the driver set up with VERSION_1 and queue 0 (16 entries, rings from `rings`
    /// on, a page each), then DRIVER_OK.
    fn started(rings: u32) -> VirtioMmio<BlkDevice> {
        let mut d = device();
        w(&mut d, 0x70, 1 | 2);
        w(&mut d, 0x24, 1);
        w(&mut d, 0x20, 1);
        w(&mut d, 0x70, 1 | 2 | 8);
        w(&mut d, 0x30, 0);
        w(&mut d, 0x38, 16);
        w(&mut d, 0x80, rings);
        w(&mut d, 0x90, rings + 0x1000);
        w(&mut d, 0xa0, rings + 0x2000);
        w(&mut d, 0x44, 1);
        w(&mut d, 0x70, 1 | 2 | 8 | 4);
        d
    }

    #[test]
    fn identifies_as_a_version_2_block_device_with_its_config() {
        let mut d = device();
        assert_eq!(r(&mut d, 0), MAGIC);
        assert_eq!(r(&mut d, 4), 2);
        assert_eq!(r(&mut d, 8), 2);
        w(&mut d, 0x14, 1);
        assert_eq!(r(&mut d, 0x10), 1, "VERSION_1 is bit 32");
        assert_eq!(r(&mut d, 0x100), 2048, "capacity in sectors");
        assert_eq!(r(&mut d, 0x34), 256, "QueueNumMax");
    }

    #[test]
    fn features_not_offered_are_refused_and_reset_clears_state() {
        let mut d = device();
        w(&mut d, 0x70, 1 | 2);
        w(&mut d, 0x24, 0);
        w(&mut d, 0x20, 1 << 7); // a feature we do not offer
        w(&mut d, 0x24, 1);
        w(&mut d, 0x20, 1);
        w(&mut d, 0x70, 1 | 2 | 8);
        assert_eq!(r(&mut d, 0x70) & 8, 0, "FEATURES_OK must not stick");
        w(&mut d, 0x70, 0);
        assert_eq!(r(&mut d, 0x70), 0);
        // Without VERSION_1 the driver is refused too.
        w(&mut d, 0x70, 1 | 2);
        w(&mut d, 0x24, 0);
        w(&mut d, 0x20, 1 << 9);
        w(&mut d, 0x70, 1 | 2 | 8);
        assert_eq!(r(&mut d, 0x70) & 8, 0);
    }

    #[test]
    fn an_invalid_queue_sets_needs_reset_instead_of_starting() {
        // Rings outside the 1 MiB of guest memory.
        let mut d = started(0x4000_0000);
        assert_ne!(r(&mut d, 0x70) & STATUS_NEEDS_RESET, 0);
        assert!(d.device().worker_count() == 0);
    }

    #[test]
    fn clearing_driver_ok_without_a_reset_neither_unlocks_nor_restarts_the_queue() {
        let mut d = started(0x1000);
        assert_eq!(d.device().worker_count(), 1);
        for _ in 0..20 {
            w(&mut d, 0x70, 1 | 2 | 8); // DRIVER_OK cleared: ignored
            assert_eq!(r(&mut d, 0x70), 1 | 2 | 8 | 4);
            w(&mut d, 0x80, 0x8000); // the running queue's registers stay locked
            w(&mut d, 0x70, 1 | 2 | 8 | 4);
        }
        assert_eq!(
            d.device().worker_count(),
            1,
            "one worker per queue, however often DRIVER_OK is written"
        );
        w(&mut d, 0x70, 0);
        assert!(d.device().worker_count() == 0);
    }
}
