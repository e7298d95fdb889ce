//! Port I/O and MMIO dispatch: which device answers an access that exited to user space.
//!
//! Few accesses come here on the hot path: queue notifications go to ioeventfds and interrupts
//! leave through irqfds, both inside the kernel. What remains — the serial port, virtio-mmio
//! configuration, interrupt acknowledgement — is counted, so that tests can report exits per
//! request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
    exits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self.ranges.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Bus {
    /// A bus counting its exits in `exits` (shared with whoever reports them).
    pub fn with_counter(exits: Arc<AtomicU64>) -> Bus {
        Bus {
            ranges: Vec::new(),
            exits,
        }
    }

    /// Adds `dev` at `base..base+len`; refuses overlaps.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), String> {
        let end = base.checked_add(len).ok_or("bus range overflows")?;
        if self.ranges.iter().any(|&(b, l, _)| base < b + l && b < end) {
            return Err(format!("bus range {base:#x}+{len:#x} overlaps a device"));
        }
        self.ranges.push((base, len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        self.ranges.iter().find_map(|(b, l, d)| {
            let off = addr.checked_sub(*b)?;
            (off.checked_add(len as u64)? <= *l).then_some((d, off))
        })
    }

    /// Dispatches a read; unclaimed reads return all ones, as on real hardware.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        match self.find(addr, data.len()) {
            Some((dev, off)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        if let Some((dev, off)) = self.find(addr, data.len()) {
            lock(dev).write(off, data);
        }
    }

    /// Accesses that exited to user space so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }
}

/// Locks a device, carrying on if another vCPU panicked while holding it (the device state is
/// plain registers; a poisoned lock must not take the whole VM down).
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a little-endian value of up to 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_counts_exits() {
        let mut bus = Bus::default();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut d = [0u8; 1];
        bus.read(0x12, &mut d);
        assert_eq!(d, [3]);
        bus.write(0x10, &[9]);
        bus.read(0x10, &mut d);
        assert_eq!(d, [9]);
        bus.read(0x40, &mut d);
        assert_eq!(d, [0xff]);
        let mut wide = [0u8; 4];
        bus.read(0x16, &mut wide);
        assert_eq!(
            wide, [0xff; 4],
            "an access running past the device is unclaimed"
        );
        assert_eq!(bus.exits(), 5);
        assert_eq!(le_value(&[1, 2]), 0x201);
    }
}
