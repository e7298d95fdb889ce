//! The hosted sparse extent header (`KDMV`, 512 bytes, little-endian) and the stream markers of
//! streamOptimized extents, as the VMDK specification lays them out.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KDMV` |
//! | 4 | 4 | version (1, 2 with zeroed-grain entries, 3 for streamOptimized) |
//! | 8 | 4 | flags: bit 0 newline test, bit 1 redundant grain directory, bit 2 zeroed-grain entries, bit 16 compressed grains, bit 17 markers |
//! | 12 | 8 | capacity in sectors |
//! | 20 | 8 | grain size in sectors |
//! | 28 | 8 | embedded descriptor offset (sectors) |
//! | 36 | 8 | embedded descriptor size (sectors) |
//! | 44 | 4 | grain table entries per grain table |
//! | 48 | 8 | redundant grain directory offset (sectors) |
//! | 56 | 8 | grain directory offset (sectors; all ones: in the footer) |
//! | 64 | 8 | overhead: sectors before the first grain |
//! | 72 | 1 | unclean shutdown |
//! | 73 | 4 | newline detection bytes `\n`, ` `, `\r`, `\n` |
//! | 77 | 2 | compression algorithm (0 none, 1 deflate) |

use crate::bytes::{le16, le32, le64};
use crate::error::{Result, StorageError};

/// Bytes in a sector, the unit of every offset in a vmdk.
pub const SECTOR: u64 = 512;
/// The header's magic bytes.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// `gdOffset` value saying the grain directory's offset is in the footer.
pub const GD_AT_END: u64 = u64::MAX;

/// Flag: the newline detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag: a redundant grain directory and tables are kept.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means a zeroed grain.
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Largest grain directory read into memory.
const MAX_GD_BYTES: u64 = 64 << 20;
const KNOWN_FLAGS: u32 =
    FLAG_NL_DETECT | FLAG_REDUNDANT_GD | FLAG_ZEROED_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;

/// Compression algorithm: deflate in zlib framing.
pub const COMPRESS_DEFLATE: u16 = 1;

/// Stream marker types (the `type` field of a marker whose `size` is 0).
pub const MARKER_EOS: u32 = 0;
/// Marker preceding a grain table.
pub const MARKER_GT: u32 = 1;
/// Marker preceding a grain directory.
pub const MARKER_GD: u32 = 2;
/// Marker preceding the footer (a copy of the header with the real `gdOffset`).
pub const MARKER_FOOTER: u32 = 3;

/// Largest grain this implementation accepts: 1 MiB (VMware and qemu use 64 KiB).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest virtual size accepted: 64 TiB (VMware's own limit is 62 TB).
pub const MAX_CAPACITY_BYTES: u64 = 64 << 40;
/// Most grain table entries per table (qemu and VMware use 512).
pub const MAX_GTES_PER_GT: u32 = 512;

/// A parsed sparse extent header. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// Format version (1, 2 or 3).
    pub version: u32,
    /// Flag bits (`FLAG_*`).
    pub flags: u32,
    /// Capacity of this extent in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Embedded descriptor offset in sectors (0: none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size in sectors.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory offset in sectors (0: none).
    pub rgd_offset: u64,
    /// Grain directory offset in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Whether the extent was not closed cleanly.
    pub unclean_shutdown: bool,
    /// Compression algorithm.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses and validates a header from the first 512 bytes of an extent. `what` names the
    /// file for error messages. Checks that do not need the file's length are done here; the
    /// caller checks offsets against the file with [`SparseHeader::check_against_file`].
    pub fn parse(bytes: &[u8], what: &str) -> Result<SparseHeader> {
        let bad = |detail: String| StorageError::corrupt(what, detail);
        if bytes.len() < SECTOR as usize {
            return Err(bad("sparse extent header is shorter than 512 bytes".into()));
        }
        if &bytes[0..4] != MAGIC {
            return Err(bad("no KDMV magic at the start of the sparse extent".into()));
        }
        let h = SparseHeader {
            version: le32(bytes, 4),
            flags: le32(bytes, 8),
            capacity: le64(bytes, 12),
            grain_sectors: le64(bytes, 20),
            descriptor_offset: le64(bytes, 28),
            descriptor_size: le64(bytes, 36),
            gtes_per_gt: le32(bytes, 44),
            rgd_offset: le64(bytes, 48),
            gd_offset: le64(bytes, 56),
            overhead: le64(bytes, 64),
            unclean_shutdown: bytes[72] != 0,
            compress_algorithm: le16(bytes, 77),
        };
        h.validate(what)?;
        Ok(h)
    }

    fn validate(&self, what: &str) -> Result<()> {
        let bad = |detail: String| StorageError::corrupt(what, detail);
        if !(1..=3).contains(&self.version) {
            return Err(StorageError::Unsupported(format!(
                "vmdk sparse extent version {} ({what})",
                self.version
            )));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(StorageError::Unsupported(format!(
                "vmdk sparse extent flags {:#x} ({what})",
                self.flags & !KNOWN_FLAGS
            )));
        }
        if self.grain_sectors == 0 {
            return Err(bad("grain size is zero".into()));
        }
        if !self.grain_sectors.is_power_of_two() || self.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(StorageError::Unsupported(format!(
                "vmdk grain size of {} sectors ({what}; supported: powers of two up to {MAX_GRAIN_SECTORS})",
                self.grain_sectors
            )));
        }
        if self.capacity == 0 {
            return Err(bad("capacity is zero".into()));
        }
        if self.capacity > MAX_CAPACITY_BYTES / SECTOR {
            return Err(bad(format!(
                "capacity of {} sectors exceeds the 64 TiB limit",
                self.capacity
            )));
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(bad(format!(
                "{} entries per grain table (expected 1 to {MAX_GTES_PER_GT})",
                self.gtes_per_gt
            )));
        }
        // The directory is read whole into memory: bound it by itself, not only by the file's
        // length (a sparse host file can be long and empty). Real images need at most 8 MiB
        // (64 TiB in 64 KiB grains, 512 entries per table).
        if self.gd_bytes() > MAX_GD_BYTES {
            return Err(StorageError::Unsupported(format!(
                "vmdk grain directory of {} bytes ({what}; at most {MAX_GD_BYTES} supported)",
                self.gd_bytes()
            )));
        }
        if self.compressed() && self.compress_algorithm != COMPRESS_DEFLATE {
            return Err(StorageError::Unsupported(format!(
                "vmdk compression algorithm {} ({what})",
                self.compress_algorithm
            )));
        }
        if self.compressed() && !self.has_markers() {
            return Err(StorageError::Unsupported(format!(
                "compressed vmdk grains without markers ({what})"
            )));
        }
        if self.gd_offset == 0 {
            return Err(bad("grain directory offset is zero".into()));
        }
        if self.descriptor_size > 2048 {
            return Err(bad(format!(
                "embedded descriptor of {} sectors is larger than 1 MiB",
                self.descriptor_size
            )));
        }
        Ok(())
    }

    /// Checks every offset the header holds against an extent file of `file_len` bytes.
    pub fn check_against_file(&self, file_len: u64, what: &str) -> Result<()> {
        let bad = |detail: String| StorageError::corrupt(what, detail);
        let within = |start_sector: u64, bytes: u64| {
            start_sector
                .checked_mul(SECTOR)
                .and_then(|s| s.checked_add(bytes))
                .is_some_and(|end| end <= file_len)
        };
        if self.gd_offset != GD_AT_END && !within(self.gd_offset, self.gd_bytes()) {
            return Err(bad(format!(
                "grain directory at sector {} lies beyond the end of the file ({file_len} bytes)",
                self.gd_offset
            )));
        }
        if self.redundant_gd() && !within(self.rgd_offset, self.gd_bytes()) {
            return Err(bad(format!(
                "redundant grain directory at sector {} lies beyond the end of the file ({file_len} bytes)",
                self.rgd_offset
            )));
        }
        if self.descriptor_offset != 0
            && !within(self.descriptor_offset, self.descriptor_size * SECTOR)
        {
            return Err(bad(
                "embedded descriptor lies beyond the end of the file".into()
            ));
        }
        Ok(())
    }

    /// Whether grains are compressed (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Whether grains carry markers.
    pub fn has_markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Whether a grain table entry of 1 means a zeroed grain.
    pub fn zeroed_grain(&self) -> bool {
        self.flags & FLAG_ZEROED_GRAIN != 0
    }

    /// Whether a redundant grain directory is kept.
    pub fn redundant_gd(&self) -> bool {
        self.flags & FLAG_REDUNDANT_GD != 0 && self.rgd_offset != 0
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Bytes one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_bytes() * self.gtes_per_gt as u64
    }

    /// Number of grain directory entries.
    pub fn gd_entries(&self) -> u64 {
        (self.capacity * SECTOR).div_ceil(self.gt_coverage())
    }

    /// Bytes of the grain directory.
    pub fn gd_bytes(&self) -> u64 {
        self.gd_entries() * 4
    }

    /// Bytes of one grain table.
    pub fn gt_bytes(&self) -> u64 {
        self.gtes_per_gt as u64 * 4
    }

    /// Sectors one grain table occupies on disk.
    pub fn gt_sectors(&self) -> u64 {
        self.gt_bytes().div_ceil(SECTOR)
    }

    /// The header as 512 bytes.
    pub fn to_bytes(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// A stream marker sector: `val` (u64), `size` (u32, 0 for metadata markers), `type` (u32).
pub fn marker(val: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[0..8].copy_from_slice(&val.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// Reads a metadata marker: `(val, type)` if the sector is one (its `size` is 0).
pub fn parse_marker(sector: &[u8]) -> Option<(u64, u32)> {
    if sector.len() < 16 || le32(sector, 8) != 0 {
        return None;
    }
    Some((le64(sector, 0), le32(sector, 12)))
}

/// The head of a compressed grain: its LBA in sectors and the compressed length.
pub fn parse_grain_marker(bytes: &[u8]) -> (u64, u32) {
    (le64(bytes, 0), le32(bytes, 8))
}

/// Bytes of a grain marker's head (LBA and size) before the compressed data.
pub const GRAIN_MARKER_HEAD: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_REDUNDANT_GD,
            capacity: 2 << 20,
            grain_sectors: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 100,
            overhead: 256,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(SparseHeader::parse(&b, "t").unwrap(), h);
        assert_eq!(&b[73..77], b"\n \r\n");
    }

    #[test]
    fn malformed_headers_are_refused_with_reasons() {
        let mut zero_grain = sample();
        zero_grain.grain_sectors = 0;
        let e = SparseHeader::parse(&zero_grain.to_bytes(), "t").unwrap_err();
        assert!(e.to_string().contains("grain size is zero"), "{e}");

        let mut huge = sample();
        huge.capacity = u64::MAX / 2;
        let e = SparseHeader::parse(&huge.to_bytes(), "t").unwrap_err();
        assert!(e.to_string().contains("64 TiB"), "{e}");

        let mut gd_far = sample();
        gd_far.gd_offset = 1 << 40;
        let h = SparseHeader::parse(&gd_far.to_bytes(), "t").unwrap();
        let e = h.check_against_file(1 << 20, "t").unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");

        assert!(SparseHeader::parse(b"KDMV", "t").is_err());
        assert!(SparseHeader::parse(&[0u8; 512], "t").is_err());
    }

    #[test]
    fn geometry_of_the_tables() {
        let h = sample();
        assert_eq!(h.gt_coverage(), 32 << 20);
        assert_eq!(h.gd_entries(), 32);
        assert_eq!(h.gt_sectors(), 4);
    }
}
