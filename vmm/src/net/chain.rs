//! Walking a virtio-net descriptor chain: bounded, one direction only.

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::MAX_CHAIN_DESCRIPTORS;

/// A buffer of the chain.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    /// Where it is in guest memory.
    pub addr: GuestAddress,
    /// Its length.
    pub len: u32,
}

/// Collects the chain's buffers into `out` (cleared first): all must be device-writable
/// (`writable`) or all device-readable, at most [`MAX_CHAIN_DESCRIPTORS`] of them, and the
/// chain must end properly. Returns their total length.
pub fn collect(
    descs: impl Iterator<Item = Descriptor>,
    writable: bool,
    out: &mut Vec<Piece>,
) -> Result<u64, &'static str> {
    out.clear();
    let mut total = 0u64;
    let mut last_has_next = false;
    let mut wrong_direction = false;
    for d in descs.take(MAX_CHAIN_DESCRIPTORS + 1) {
        last_has_next = d.has_next();
        if d.is_write_only() != writable {
            wrong_direction = true;
        }
        total += u64::from(d.len());
        out.push(Piece {
            addr: d.addr(),
            len: d.len(),
        });
    }
    if out.is_empty() {
        return Err("empty or unreadable descriptor chain");
    }
    if out.len() > MAX_CHAIN_DESCRIPTORS {
        return Err("descriptor chain longer than the device accepts");
    }
    if last_has_next {
        return Err("descriptor chain loops, leaves the table or is unreadable");
    }
    if wrong_direction {
        return Err(if writable {
            "a receive buffer the device may not write"
        } else {
            "a transmit buffer the device may write"
        });
    }
    Ok(total)
}
