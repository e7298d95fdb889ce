//! The VHDX header section (the first 1 MiB): file identifier, the two headers with their
//! sequence numbers, and the two copies of the region table. All little-endian; every structure
//! carries a CRC-32C over itself with the checksum field zeroed.
//!
//! ```text
//! 0       file identifier "vhdxfile" + creator (UTF-16)
//! 64 KiB  header 1        128 KiB header 2       (4 KiB used of each 64 KiB)
//! 192 KiB region table 1  256 KiB region table 2 (64 KiB each)
//! ```
//! The current header is the valid one with the larger sequence number; an update writes the
//! other slot with the next number and flushes, so a torn update leaves the old one current.

use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::format::vhdx::guid::{Guid, BAT_REGION, METADATA_REGION};

/// The file identifier's signature.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// A header's signature.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// The region table's signature.
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Offsets of the two region tables.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes of a header covered by its checksum.
pub const HEADER_LEN: usize = 4096;
/// Bytes of a region table.
pub const REGION_TABLE_LEN: usize = 64 << 10;
/// Most region table entries.
pub const MAX_REGIONS: u32 = 2047;
/// The alignment of regions, the log and payload blocks.
pub const MIB: u64 = 1 << 20;

/// CRC-32C of `bytes` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zeroed(bytes: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&bytes[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &bytes[at + 4..])
}

/// Stores the CRC-32C of `bytes` (checksum field at `at`) into it.
pub fn seal(bytes: &mut [u8], at: usize) {
    let c = crc_with_zeroed(bytes, at);
    bytes[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Whether the stored CRC-32C at `at` matches.
pub fn sealed(bytes: &[u8], at: usize) -> bool {
    le32(bytes, at) == crc_with_zeroed(bytes, at)
}

pub use crate::bytes::{le16, le32, le64};

/// A VHDX header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sequence number; the larger valid one is current.
    pub sequence: u64,
    /// Changed whenever the file is opened for writing.
    pub file_write_guid: Guid,
    /// Changed whenever guest-visible data first changes in a session.
    pub data_write_guid: Guid,
    /// The log's GUID; zero when the log is empty.
    pub log_guid: Guid,
    /// Log size in bytes (multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset (multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses and verifies a header; `what` names the image.
    pub fn parse(b: &[u8], what: &str) -> Result<Header> {
        let bad = |d: &str| StorageError::corrupt(what, d.to_string());
        if b.len() < HEADER_LEN || &b[..4] != HEADER_SIGNATURE {
            return Err(bad("VHDX header has no 'head' signature"));
        }
        if !sealed(&b[..HEADER_LEN], 4) {
            return Err(bad("VHDX header checksum (CRC-32C) does not match"));
        }
        let log_version = le16(b, 64);
        let version = le16(b, 66);
        if version != 1 || log_version != 0 {
            return Err(StorageError::Unsupported(format!(
                "VHDX version {version} with log version {log_version} in {what}"
            )));
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.log_length as u64 % MIB != 0 || h.log_offset % MIB != 0 || h.log_offset < MIB {
            return Err(bad(
                "VHDX log is not 1 MiB-aligned or lies in the header section",
            ));
        }
        Ok(h)
    }

    /// The header's 4 KiB with its checksum.
    pub fn render(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&0u16.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// Reads both headers and returns the current one and its slot (0 or 1).
pub fn read_current_header(file: &dyn HostFile) -> Result<(Header, usize)> {
    let name = file.name().to_string();
    if file.len() < MIB {
        return Err(StorageError::corrupt(
            &name,
            "too short for a VHDX (no room for its header section)",
        ));
    }
    let mut sig = [0u8; 8];
    file.read_exact_at(0, &mut sig)?;
    if &sig != FILE_SIGNATURE {
        return Err(StorageError::corrupt(&name, "no 'vhdxfile' signature"));
    }
    let mut found: Vec<(Header, usize)> = Vec::new();
    let mut errors = Vec::new();
    for (slot, at) in HEADER_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; HEADER_LEN];
        file.read_exact_at(*at, &mut b)?;
        match Header::parse(&b, &name) {
            Ok(h) => found.push((h, slot)),
            Err(e @ StorageError::Unsupported(_)) => return Err(e),
            Err(e) => errors.push(e),
        }
    }
    found
        .into_iter()
        .max_by_key(|(h, slot)| (h.sequence, std::cmp::Reverse(*slot)))
        .ok_or_else(|| {
            StorageError::corrupt(
                &name,
                format!(
                    "neither VHDX header is valid ({})",
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        })
}

/// Writes `h` (with the next sequence number) into the slot that is not current and flushes:
/// the atomic header update of the specification. Returns the new current slot.
pub fn update_header(file: &dyn HostFile, h: &mut Header, current_slot: usize) -> Result<usize> {
    h.sequence += 1;
    let slot = 1 - current_slot;
    file.write_all_at(HEADER_OFFSETS[slot], &h.render())?;
    file.sync_data()?;
    Ok(slot)
}

/// One region table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// File offset (multiple of 1 MiB).
    pub offset: u64,
    /// Length (multiple of 1 MiB).
    pub length: u32,
    /// Whether a reader must understand it.
    pub required: bool,
}

/// The regions we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// The BAT.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

/// Parses a region table.
pub fn parse_regions(b: &[u8], what: &str, file_len: u64) -> Result<Regions> {
    let bad = |d: String| StorageError::corrupt(what, d);
    if b.len() < REGION_TABLE_LEN || &b[..4] != REGION_SIGNATURE {
        return Err(bad("VHDX region table has no 'regi' signature".into()));
    }
    if !sealed(&b[..REGION_TABLE_LEN], 4) {
        return Err(bad(
            "VHDX region table checksum (CRC-32C) does not match".into()
        ));
    }
    let count = le32(b, 8);
    if count > MAX_REGIONS {
        return Err(bad(format!("VHDX region table claims {count} entries")));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let r = Region {
            guid: Guid::read(b, at),
            offset: le64(b, at + 16),
            length: le32(b, at + 24),
            required: le32(b, at + 28) & 1 != 0,
        };
        if r.offset % MIB != 0 || r.length as u64 % MIB != 0 || r.offset < MIB || r.length == 0 {
            return Err(bad(format!(
                "VHDX region {} at {} of {} bytes is not 1 MiB-aligned or lies in the header section",
                r.guid, r.offset, r.length
            )));
        }
        if r.offset + r.length as u64 > file_len {
            return Err(bad(format!(
                "VHDX region {} runs past the end of the file",
                r.guid
            )));
        }
        if let Some(o) = seen.iter().find(|o| {
            r.offset < o.offset + o.length as u64 && o.offset < r.offset + r.length as u64
        }) {
            return Err(bad(format!(
                "VHDX regions {} and {} overlap",
                o.guid, r.guid
            )));
        }
        seen.push(r);
        match r.guid {
            g if g == BAT_REGION && bat.is_none() => bat = Some(r),
            g if g == METADATA_REGION && meta.is_none() => meta = Some(r),
            g if g == BAT_REGION || g == METADATA_REGION => {
                return Err(bad(format!("VHDX region {g} is listed twice")))
            }
            g if r.required => {
                return Err(StorageError::Unsupported(format!(
                    "the required VHDX region {g} in {what}"
                )))
            }
            _ => {}
        }
    }
    match (bat, meta) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(bad(
            "VHDX region table lacks the BAT or the metadata region".into(),
        )),
    }
}

/// Reads the region table (the first copy, or the second when the first is damaged).
pub fn read_regions(file: &dyn HostFile) -> Result<Regions> {
    let name = file.name().to_string();
    let mut first_err = None;
    for at in REGION_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_LEN];
        file.read_exact_at(at, &mut b)?;
        match parse_regions(&b, &name, file.len()) {
            Ok(r) => return Ok(r),
            Err(e @ StorageError::Unsupported(_)) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| StorageError::corrupt(&name, "no VHDX region table")))
}

/// A region table listing the BAT and metadata regions.
pub fn render_regions(r: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_LEN];
    b[..4].copy_from_slice(REGION_SIGNATURE);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, reg) in [r.bat, r.metadata].iter().enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(&reg.guid.0);
        b[at + 16..at + 24].copy_from_slice(&reg.offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&reg.length.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&(reg.required as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// The file identifier: signature and creator.
pub fn render_file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 << 10];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_regions_round_trip_and_verify() {
        let h = Header {
            sequence: 7,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.render();
        assert_eq!(Header::parse(&b, "t").unwrap(), h);
        b[200] = 1;
        assert!(Header::parse(&b, "t")
            .unwrap_err()
            .to_string()
            .contains("CRC-32C"));
        let r = Regions {
            bat: Region {
                guid: BAT_REGION,
                offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
            metadata: Region {
                guid: METADATA_REGION,
                offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
        };
        let t = render_regions(&r);
        assert_eq!(parse_regions(&t, "t", 8 * MIB).unwrap(), r);
        assert!(parse_regions(&t, "t", 3 * MIB).is_err());
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
