//! The dynamic disk header (1,024 bytes, big-endian) of dynamic and differencing VHDs: where the
//! BAT is, the block size, and for differencing disks the parent's identity and locators.

use crate::bytes::{be32, be64};
use crate::error::{Result, StorageError};
use crate::format::vhd::footer::{checksum, SECTOR};

/// The header's cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Size of the dynamic header.
pub const HEADER_LEN: usize = 1024;
/// A BAT entry for a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// Smallest block size we accept (8 sectors: one bitmap byte).
pub const MIN_BLOCK: u32 = 4096;
/// Largest block size we accept.
pub const MAX_BLOCK: u32 = 256 << 20;
/// The default block size (2 MiB), what Hyper-V, XenServer and qemu write.
pub const DEFAULT_BLOCK: u32 = 2 << 20;
/// Number of parent locator entries.
pub const LOCATORS: usize = 8;
/// Longest parent locator data we read.
pub const MAX_LOCATOR_BYTES: u32 = 64 * 1024;

/// One parent locator entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform code: `W2ku`, `W2ru`, `MacX`, ... (zero when unused).
    pub code: [u8; 4],
    /// Space reserved for the data (the specification says sectors; some writers give bytes).
    pub space: u32,
    /// Length of the data in bytes.
    pub len: u32,
    /// Absolute file offset of the data.
    pub offset: u64,
}

impl LocatorEntry {
    /// Whether the entry is in use.
    pub fn used(&self) -> bool {
        self.code != [0; 4]
    }

    /// Bytes reserved for the data at `offset`, whichever unit the writer used.
    pub fn reserved_bytes(&self) -> u64 {
        let s = self.space as u64;
        if s * SECTOR >= self.len as u64 && s < (1 << 20) {
            s * SECTOR
        } else {
            s
        }
    }
}

/// A parsed dynamic header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u32,
    /// Bytes per block.
    pub block_size: u32,
    /// The parent's footer unique ID (differencing disks).
    pub parent_id: [u8; 16],
    /// The parent's modification time (VHD time).
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16 big-endian, as text.
    pub parent_name: String,
    /// Parent locators.
    pub locators: [LocatorEntry; LOCATORS],
}

impl DynamicHeader {
    /// Parses and verifies a dynamic header; `what` names the image in errors.
    pub fn parse(b: &[u8], what: &str) -> Result<DynamicHeader> {
        let bad = |d: String| StorageError::corrupt(what, d);
        if b.len() < HEADER_LEN || &b[..8] != COOKIE {
            return Err(bad("no VHD dynamic header (cookie 'cxsparse')".into()));
        }
        let stored = be32(b, 36);
        let want = checksum(&b[..HEADER_LEN], 36);
        if stored != want {
            return Err(bad(format!(
                "VHD dynamic header checksum is {stored:08x}, expected {want:08x}"
            )));
        }
        let version = be32(b, 24);
        if version >> 16 != 1 {
            return Err(StorageError::Unsupported(format!(
                "VHD dynamic header version {version:#x} in {what}"
            )));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(bad(format!(
                "VHD block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
            )));
        }
        let table_offset = be64(b, 16);
        if table_offset % SECTOR != 0 {
            return Err(bad(format!(
                "BAT offset {table_offset} is not sector-aligned"
            )));
        }
        let units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&units);
        let mut locators: [LocatorEntry; LOCATORS] = Default::default();
        for (i, l) in locators.iter_mut().enumerate() {
            let at = 576 + 24 * i;
            l.code.copy_from_slice(&b[at..at + 4]);
            l.space = be32(b, at + 4);
            l.len = be32(b, at + 8);
            l.offset = be64(b, at + 16);
        }
        let mut parent_id = [0u8; 16];
        parent_id.copy_from_slice(&b[40..56]);
        Ok(DynamicHeader {
            table_offset,
            max_table_entries: be32(b, 28),
            block_size,
            parent_id,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// The header's 1,024 bytes with its checksum.
    pub fn render(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(255).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let at = 576 + 24 * i;
            b[at..at + 4].copy_from_slice(&l.code);
            b[at + 4..at + 8].copy_from_slice(&l.space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&l.len.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&l.offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Sectors per block.
    pub fn block_sectors(&self) -> u64 {
        self.block_size as u64 / SECTOR
    }

    /// Bytes of the sector bitmap in front of each block (rounded up to whole sectors).
    pub fn bitmap_bytes(&self) -> u64 {
        bitmap_bytes(self.block_size)
    }
}

/// Bytes of the sector bitmap in front of a block of `block_size` bytes.
pub fn bitmap_bytes(block_size: u32) -> u64 {
    (block_size as u64 / SECTOR)
        .div_ceil(8)
        .next_multiple_of(SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut h = DynamicHeader {
            table_offset: 1536,
            max_table_entries: 51,
            block_size: DEFAULT_BLOCK,
            parent_id: [3; 16],
            parent_timestamp: 9,
            parent_name: "base.vhd".into(),
            locators: Default::default(),
        };
        h.locators[0] = LocatorEntry {
            code: *b"W2ru",
            space: 1,
            len: 24,
            offset: 4096,
        };
        let b = h.render();
        assert_eq!(DynamicHeader::parse(&b, "t").unwrap(), h);
        assert_eq!(h.bitmap_bytes(), 512);
        let mut c = b.clone();
        c[32..36].copy_from_slice(&3000u32.to_be_bytes());
        let sum = checksum(&c, 36);
        c[36..40].copy_from_slice(&sum.to_be_bytes());
        assert!(DynamicHeader::parse(&c, "t")
            .unwrap_err()
            .to_string()
            .contains("block size"));
    }
}
