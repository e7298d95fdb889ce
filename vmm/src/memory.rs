//! Guest physical memory: the layout and its creation.
//!
//! RAM starts at 0. The 1 GiB below 4 GiB is left for devices (virtio-mmio windows, the I/O
//! APIC and local APIC), so RAM above 3 GiB continues at 4 GiB. Memory is anonymous shared
//! mappings owned by a [`GuestMemoryMmap`] inside an `Arc`: the workers and every in-flight I/O
//! hold a clone, which keeps the mappings alive.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::blk::chain::SharedMemory;
use crate::error::{Result, VmmError};

/// Start of the device hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the device hole (RAM resumes here).
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Base of the virtio-mmio windows, one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The I/O APIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Smallest guest we create.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The RAM ranges for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Creates `size` bytes of guest memory (rounded down to 2 MiB).
pub fn create(size: u64) -> Result<SharedMemory> {
    let size = size & !((2 << 20) - 1);
    if size < MIN_MEMORY {
        return Err(VmmError::Config(format!(
            "Guest memory must be at least {} MiB",
            MIN_MEMORY >> 20
        )));
    }
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok(Arc::new(mem))
}

/// Total RAM in bytes.
pub fn total(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 4 << 30);
        assert!(create(1 << 20).is_err());
        assert_eq!(total(&create(64 << 20).unwrap()), 64 << 20);
    }
}
