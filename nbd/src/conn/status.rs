//! Extents for `NBD_CMD_BLOCK_STATUS`: `base:allocation` from the device's own map
//! ([`BlockDevice::block_status`]) and `qemu:dirty-bitmap:NAME` from Strata's dirty bitmaps.
//! Both stop at [`MAX_DESCRIPTORS`] (the protocol lets a server answer less than asked; clients
//! ask again from where the answer ended) and never report past the requested range.

use strata_storage::bitmap::BitmapSet;
use strata_storage::{BlockDevice, ExtentKind, StorageError};

use crate::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// Most descriptors per context in one reply.
pub const MAX_DESCRIPTORS: usize = 1024;

/// Appends `(len, flags)` to `out`, merging with the previous descriptor when the flags match.
fn push(out: &mut Vec<(u32, u32)>, len: u64, flags: u32) {
    // The request length is a u32, so every extent clipped to it fits.
    let len = len.min(u64::from(u32::MAX)) as u32;
    match out.last_mut() {
        Some(last) if last.1 == flags && last.0.checked_add(len).is_some() => last.0 += len,
        _ => out.push((len, flags)),
    }
}

/// `base:allocation` descriptors for `len` bytes at `offset`.
pub fn allocation(
    device: &dyn BlockDevice,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, StorageError> {
    let end = offset + u64::from(len);
    let mut out = Vec::new();
    let mut pos = offset;
    // Each lookup is one map query (a system call for a host file): bound them too.
    for _ in 0..4 * MAX_DESCRIPTORS {
        if pos >= end || out.len() >= MAX_DESCRIPTORS {
            break;
        }
        let e = device.block_status(pos, end - pos)?;
        let n = e.len.min(end - pos);
        if n == 0 {
            break;
        }
        let flags = match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => STATE_ZERO,
            ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
        };
        push(&mut out, n, flags);
        pos += n;
        if req_one {
            break;
        }
    }
    if out.is_empty() {
        // A device that maps nothing here: report data, which is always safe.
        push(&mut out, end - offset, 0);
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}

/// `qemu:dirty-bitmap:NAME` descriptors for `len` bytes at `offset`.
pub fn dirty(
    bitmaps: &BitmapSet,
    name: &str,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, StorageError> {
    let end = offset + u64::from(len);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_DESCRIPTORS {
        let Some((is_dirty, n)) = bitmaps.dirty_run(name, pos, end - pos)? else {
            break;
        };
        if n == 0 {
            break;
        }
        push(&mut out, n, if is_dirty { STATE_DIRTY } else { 0 });
        pos += n;
        if req_one {
            break;
        }
    }
    if out.is_empty() {
        // The bitmap ends before the export (a resize racing the query): clean is unknown,
        // so report dirty.
        push(&mut out, end - offset, STATE_DIRTY);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::io::memory::MemoryDevice;

    #[test]
    fn allocation_of_a_sparse_device() {
        let dev = MemoryDevice::new(1 << 20);
        strata_storage::HostFile::write_all_at(dev.as_ref(), 65536, &[1u8; 4096]).unwrap();
        let v = allocation(dev.as_ref(), 0, 1 << 20, false).unwrap();
        let total: u64 = v.iter().map(|e| u64::from(e.0)).sum();
        assert_eq!(total, 1 << 20);
        assert!(v.iter().any(|e| e.1 == 0));
        let one = allocation(dev.as_ref(), 0, 1 << 20, true).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn dirty_runs_follow_the_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let set = BitmapSet::open(&dir.path().join("b"), 1 << 20).unwrap();
        set.add("b1", 4096).unwrap();
        set.mark(8192, 4096);
        let v = dirty(&set, "b1", 0, 1 << 20, false).unwrap();
        assert_eq!(
            v,
            vec![(8192, 0), (4096, STATE_DIRTY), ((1 << 20) - 12288, 0)]
        );
        assert_eq!(dirty(&set, "b1", 8192, 100, true).unwrap(), vec![(100, 1)]);
        assert!(dirty(&set, "nope", 0, 1, false).is_err());
    }
}
