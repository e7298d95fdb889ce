//! Turning a descriptor chain into a validated virtio-blk request.
//!
//! A chain is untrusted guest input. [`parse`] checks its shape (bounded length, no loop, no
//! readable descriptor after a writable one, a status byte at the end), every address against
//! guest memory, the header, the request type against the offered features, and the range
//! against the disk. What it returns is one of three outcomes:
//! - [`Parsed::Run`]: a request for the block layer, whose data buffers point straight into guest
//!   memory (an [`IoBuf`] that keeps the mapping alive);
//! - [`Parsed::Fail`]: complete at once with an error status (the status byte was found);
//! - [`Parsed::Broken`]: not even a status byte can be located; the head is returned with a used
//!   length of zero so that the driver is never left waiting.
//!
//! Framing follows the spec: no assumption about how the header, data and status are split into
//! descriptors. The header is the first 16 readable bytes, the status the last writable byte.

use std::sync::Arc;

use strata_storage::io::IoBuf;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::config::BlkConfig;
use super::{req_type, status, ID_BYTES, SECTOR_SIZE};

/// Largest number of descriptors we look at in one chain (direct or indirect) before calling it
/// oversized. Bounds the work and memory a single chain can cost.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024 + 2;

/// Guest memory shared with the workers: the `Arc` keeps the mapping alive while requests are in
/// flight.
pub type SharedMemory = Arc<GuestMemoryMmap>;

/// A validated operation.
#[derive(Debug)]
pub enum BlkOp {
    /// Read into guest memory.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers.
        buf: IoBuf,
    },
    /// Write from guest memory.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers.
        buf: IoBuf,
    },
    /// Flush.
    Flush,
    /// Write the serial into these guest ranges.
    GetId {
        /// Where the ID goes (at most [`ID_BYTES`] in all).
        dst: Vec<(GuestAddress, usize)>,
    },
    /// Discard a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Whether the device may deallocate.
        unmap: bool,
    },
}

/// A request ready to run.
#[derive(Debug)]
pub struct BlkRequest {
    /// What to do.
    pub op: BlkOp,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// Bytes the device writes into the chain on success (data read plus the status byte).
    pub used_len: u32,
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub enum Parsed {
    /// Run this request.
    Run(BlkRequest),
    /// Complete with `status` at `status_addr`; `reason` is for the (rate-limited) log.
    Fail {
        /// The status byte to write.
        status: u8,
        /// Where it goes.
        status_addr: GuestAddress,
        /// Why.
        reason: String,
    },
    /// Return the head with used length 0; `reason` is for the log.
    Broken {
        /// Why.
        reason: String,
    },
}

/// A piece of the chain: guest address and length.
#[derive(Clone, Copy, Debug)]
struct Piece {
    addr: GuestAddress,
    len: u64,
}

/// Parses one descriptor chain (given as its descriptors, in order).
pub fn parse(
    descs: impl Iterator<Item = Descriptor>,
    mem: &SharedMemory,
    cfg: &BlkConfig,
) -> Parsed {
    let mut readable: Vec<Piece> = Vec::new();
    let mut writable: Vec<Piece> = Vec::new();
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut order_error = false;
    for d in descs.take(MAX_CHAIN_DESCRIPTORS + 1) {
        count += 1;
        last_has_next = d.has_next();
        let piece = Piece {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        if d.is_write_only() {
            writable.push(piece);
        } else {
            if !writable.is_empty() {
                order_error = true;
            }
            readable.push(piece);
        }
    }
    if count == 0 {
        return broken("empty or unreadable descriptor chain");
    }
    if count > MAX_CHAIN_DESCRIPTORS {
        return broken("descriptor chain longer than the device accepts");
    }
    if last_has_next {
        return broken("descriptor chain loops, leaves the table or is unreadable");
    }
    // The status byte: the last byte of the last (writable) descriptor.
    let Some(last) = writable.last_mut() else {
        return broken("descriptor chain has no writable status byte");
    };
    if last.len == 0 {
        return broken("status descriptor is empty");
    }
    let Some(status_addr) = last.addr.0.checked_add(last.len - 1).map(GuestAddress) else {
        return broken("status descriptor wraps around the address space");
    };
    if !mem.check_range(status_addr, 1) {
        return broken("status byte is outside guest memory");
    }
    last.len -= 1;
    let fail = |status: u8, reason: &str| Parsed::Fail {
        status,
        status_addr,
        reason: reason.to_string(),
    };
    if order_error {
        return fail(status::IOERR, "readable descriptor after a writable one");
    }
    if count > cfg.seg_max() as usize + 2 {
        return fail(status::IOERR, "more segments than seg_max");
    }
    let mut header = [0u8; 16];
    let out_data = match take_bytes(mem, &readable, &mut header) {
        Ok(rest) => rest,
        Err(reason) => return fail(status::IOERR, reason),
    };
    let in_data: Vec<Piece> = writable.into_iter().filter(|p| p.len > 0).collect();
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    match build(kind, sector, &out_data, &in_data, mem, cfg) {
        Ok((op, used_data)) => Parsed::Run(BlkRequest {
            op,
            status_addr,
            used_len: used_data.saturating_add(1),
        }),
        Err((st, reason)) => fail(st, &reason),
    }
}

fn broken(reason: &str) -> Parsed {
    Parsed::Broken {
        reason: reason.to_string(),
    }
}

type BuildResult = Result<(BlkOp, u32), (u8, String)>;

fn build(
    kind: u32,
    sector: u64,
    out_data: &[Piece],
    in_data: &[Piece],
    mem: &SharedMemory,
    cfg: &BlkConfig,
) -> BuildResult {
    let ioerr = |r: &str| Err((status::IOERR, r.to_string()));
    let unsupp = |r: &str| Err((status::UNSUPP, r.to_string()));
    match kind {
        req_type::IN | req_type::OUT => {
            let (data, other, write) = if kind == req_type::IN {
                (in_data, out_data, false)
            } else {
                (out_data, in_data, true)
            };
            if !other.is_empty() {
                return ioerr("data descriptors have the wrong direction");
            }
            if write && cfg.read_only() {
                return ioerr("write to a read-only disk");
            }
            let len: u64 = data.iter().map(|p| p.len).sum();
            if len % SECTOR_SIZE != 0 {
                return ioerr("data length is not a multiple of 512 bytes");
            }
            let offset = check_range(sector, len, cfg)?;
            let buf = guest_buf(mem, data).map_err(|r| (status::IOERR, r.to_string()))?;
            // The used length is a u32: a larger read (segments summing past 4 GiB) is refused
            // rather than reported with a wrapped length.
            let Ok(read_len) = u32::try_from(len) else {
                return ioerr("request larger than 4 GiB");
            };
            let used = if write { 0 } else { read_len };
            let op = if write {
                BlkOp::Write { offset, buf }
            } else {
                BlkOp::Read { offset, buf }
            };
            Ok((op, used))
        }
        req_type::FLUSH => Ok((BlkOp::Flush, 0)),
        req_type::GET_ID => {
            if !out_data.is_empty() {
                return ioerr("GET_ID with readable data");
            }
            let mut dst = Vec::new();
            let mut left = ID_BYTES as u64;
            for p in in_data {
                let n = p.len.min(left);
                if n == 0 {
                    break;
                }
                if !mem.check_range(p.addr, n as usize) {
                    return ioerr("GET_ID buffer is outside guest memory");
                }
                dst.push((p.addr, n as usize));
                left -= n;
            }
            let written = ID_BYTES as u32 - left as u32;
            Ok((BlkOp::GetId { dst }, written))
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = kind == req_type::DISCARD;
            if (discard && !cfg.offers_discard()) || (!discard && !cfg.offers_write_zeroes()) {
                return unsupp("discard or write-zeroes is not offered for this disk");
            }
            if !in_data.is_empty() {
                return ioerr("discard or write-zeroes with writable data");
            }
            let mut seg = [0u8; 16];
            let rest =
                take_bytes(mem, out_data, &mut seg).map_err(|r| (status::IOERR, r.into()))?;
            if !rest.is_empty() {
                return ioerr("more than one discard or write-zeroes segment");
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (discard && unmap) {
                return unsupp("reserved discard or write-zeroes flags");
            }
            if sectors > super::config::MAX_DISCARD_SECTORS {
                // Above the advertised max_discard_sectors / max_write_zeroes_sectors: one such
                // request could hold the queue for a whole-disk zero fill.
                return ioerr("discard or write-zeroes longer than the advertised maximum");
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = check_range(start, len, cfg)?;
            let op = if discard {
                BlkOp::Discard { offset, len }
            } else {
                BlkOp::WriteZeroes { offset, len, unmap }
            };
            Ok((op, 0))
        }
        _ => unsupp("unknown request type"),
    }
}

/// Checks that `len` bytes at `sector` lie on the disk; returns the byte offset.
fn check_range(sector: u64, len: u64, cfg: &BlkConfig) -> Result<u64, (u8, String)> {
    let capacity = cfg.capacity_sectors() * SECTOR_SIZE;
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|off| off.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or_else(|| {
            (
                status::IOERR,
                "request beyond the end of the disk".to_string(),
            )
        })
}

/// Gathers `out.len()` bytes from the start of `pieces`; returns the pieces left after them.
fn take_bytes(
    mem: &SharedMemory,
    pieces: &[Piece],
    out: &mut [u8],
) -> Result<Vec<Piece>, &'static str> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for p in pieces {
        let want = (out.len() - filled) as u64;
        let n = p.len.min(want);
        if n > 0 {
            mem.read_slice(&mut out[filled..filled + n as usize], p.addr)
                .map_err(|_| "header or segment is outside guest memory")?;
            filled += n as usize;
        }
        if n < p.len {
            let addr = p.addr.0.checked_add(n).ok_or("descriptor wraps around")?;
            rest.push(Piece {
                addr: GuestAddress(addr),
                len: p.len - n,
            });
        }
    }
    if filled < out.len() {
        return Err("request header or segment is too short");
    }
    Ok(rest)
}

/// An [`IoBuf`] over guest memory for `pieces`. A piece that runs from one memory region into
/// the next adjacent one (a vhost-user front-end's table may have such regions) becomes one
/// segment per region; a piece that runs into a gap is refused.
fn guest_buf(mem: &SharedMemory, pieces: &[Piece]) -> Result<IoBuf, &'static str> {
    let mut segs = Vec::with_capacity(pieces.len());
    for p in pieces {
        let len = usize::try_from(p.len).map_err(|_| "descriptor too long")?;
        host_segments(mem, p.addr, len, |ptr, n| segs.push((ptr, n)))
            .map_err(|OutsideGuestMemory| "data buffer is outside guest memory")?;
    }
    // One segment (the common case) cannot overlap: no copy of the list for it.
    if segs.len() > 1 && overlapping(&mut segs.clone()) {
        return Err("data buffers overlap");
    }
    let keep_alive: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
    // SAFETY: every segment was just cut to lie inside one region of `mem` (`get_slice`
    // refuses ranges that leave a region). The regions are mappings owned by the
    // `GuestMemoryMmap` inside `mem`; `keep_alive` is a clone of that `Arc`, stored in the IoBuf,
    // so the mappings stay mapped until the IoBuf — moved into the I/O queue and handed back in
    // the completion — is dropped after the completion is reaped. Guest memory is shared with the
    // guest by design: the guest may race with the device on these bytes, which is the guest's
    // own data race and cannot violate the host's memory safety (the bytes are plain data).
    Ok(unsafe { IoBuf::from_raw_segments(&segs, keep_alive) })
}

/// A guest range that leaves guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideGuestMemory;

/// Calls `f` with the host address and length of each piece of the guest range
/// `addr..addr + len`, cut at memory-region ends (a range may run from one region into the next
/// adjacent one, as a vhost-user front-end's table allows); `Err` when part of it lies outside
/// guest memory (then `f` may have seen the pieces before the gap). Each address stays valid
/// while `mem`'s mappings do.
pub fn host_segments(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    mut f: impl FnMut(*mut u8, usize),
) -> Result<(), OutsideGuestMemory> {
    let (mut addr, mut left) = (addr, len);
    // Bounded: each round ends at a region's end or the range's, and regions are few.
    while left > 0 {
        let region = mem.find_region(addr).ok_or(OutsideGuestMemory)?;
        let offset = addr.0 - region.start_addr().0;
        let room = usize::try_from(region.len() - offset).unwrap_or(usize::MAX);
        let n = left.min(room);
        let slice = region
            .get_slice(MemoryRegionAddress(offset), n)
            .map_err(|_| OutsideGuestMemory)?;
        f(slice.ptr_guard_mut().as_ptr(), n);
        left -= n;
        addr = GuestAddress(addr.0.checked_add(n as u64).ok_or(OutsideGuestMemory)?);
    }
    Ok(())
}

/// Whether any two segments overlap (sorts its argument).
fn overlapping(segs: &mut [(*mut u8, usize)]) -> bool {
    if segs.len() < 2 {
        return false;
    }
    segs.sort_unstable_by_key(|s| s.0 as usize);
    segs.windows(2)
        .any(|w| (w[0].0 as usize).saturating_add(w[0].1) > w[1].0 as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_across_adjacent_regions_becomes_one_segment_per_region() {
        // Two adjacent regions, then a gap, then a third.
        let mem: SharedMemory = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10_0000),
                (GuestAddress(0x10_0000), 0x10_0000),
                (GuestAddress(0x40_0000), 0x10_0000),
            ])
            .unwrap(),
        );
        let across = Piece {
            addr: GuestAddress(0x10_0000 - 2048),
            len: 4096,
        };
        let buf = guest_buf(&mem, &[across]).unwrap();
        let lens: Vec<usize> = buf.segments().iter().map(|s| s.len()).collect();
        assert_eq!(lens, vec![2048, 2048]);
        // Writing through the buffer lands in guest memory on both sides of the boundary.
        for s in buf.segments() {
            // SAFETY: the segments point into `mem`'s mappings, kept alive by `buf`.
            unsafe { std::ptr::write_bytes(s.ptr(), 0x5a, s.len()) };
        }
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x10_0000 - 2048))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        // Into the gap after the second region: refused.
        let into_gap = Piece {
            addr: GuestAddress(0x20_0000 - 512),
            len: 1024,
        };
        assert!(guest_buf(&mem, &[into_gap]).is_err());
    }
}
