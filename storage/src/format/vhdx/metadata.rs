//! The VHDX metadata region: a table of items (64 KiB) followed by their values. We read the
//! file parameters (block size, "leave blocks allocated", "has parent"), the virtual disk size,
//! the logical and physical sector sizes, the disk's page 83 identifier, and a differencing
//! disk's parent locator (key/value pairs in UTF-16LE). An unknown item marked required is
//! refused by name.

use std::collections::BTreeMap;

use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::format::vhdx::guid::{
    Guid, FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, PAGE83_DATA, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE,
    VHDX_LOCATOR_TYPE, VIRTUAL_DISK_SIZE,
};
use crate::format::vhdx::header::{le16, le32, le64, Region};

/// The metadata table's signature.
pub const SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table at the start of the region.
pub const TABLE_LEN: usize = 64 << 10;
/// Most metadata entries.
pub const MAX_ENTRIES: u16 = 2047;
/// Smallest and largest block sizes (1 MiB to 256 MiB, powers of two).
pub const MIN_BLOCK: u32 = 1 << 20;
/// See [`MIN_BLOCK`].
pub const MAX_BLOCK: u32 = 256 << 20;
/// Largest virtual disk: 64 TiB.
pub const MAX_SIZE: u64 = 64 << 40;
/// Longest metadata value we read (a parent locator).
const MAX_ITEM: u32 = 1 << 20;

/// What the metadata region says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size.
    pub block_size: u32,
    /// Blocks are never unmapped (fixed disks).
    pub leave_blocks_allocated: bool,
    /// A differencing disk.
    pub has_parent: bool,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector: u32,
    /// The disk's identifier.
    pub page83: Guid,
    /// Parent locator entries (differencing disks), by key.
    pub parent_locator: BTreeMap<String, String>,
}

struct Entry {
    id: Guid,
    offset: u32,
    length: u32,
    required: bool,
}

impl Metadata {
    /// Reads the metadata region `r` of `file`.
    pub fn read(file: &dyn HostFile, r: &Region) -> Result<Metadata> {
        let name = file.name().to_string();
        let bad = |d: String| StorageError::corrupt(&name, d);
        if (r.length as usize) < TABLE_LEN {
            return Err(bad("VHDX metadata region is shorter than its table".into()));
        }
        let mut t = vec![0u8; TABLE_LEN];
        file.read_exact_at(r.offset, &mut t)?;
        if &t[..8] != SIGNATURE {
            return Err(bad("VHDX metadata table has no 'metadata' signature".into()));
        }
        let count = le16(&t, 10);
        if count > MAX_ENTRIES {
            return Err(bad(format!("VHDX metadata table claims {count} entries")));
        }
        let mut entries = Vec::new();
        for i in 0..count as usize {
            let at = 32 + 32 * i;
            let flags = le32(&t, at + 24);
            let e = Entry {
                id: Guid::read(&t, at),
                offset: le32(&t, at + 16),
                length: le32(&t, at + 20),
                required: flags & 4 != 0,
            };
            if e.length > 0
                && ((e.offset as usize) < TABLE_LEN
                    || e.offset as u64 + e.length as u64 > r.length as u64)
            {
                return Err(bad(format!(
                    "VHDX metadata item {} lies outside the metadata region",
                    e.id
                )));
            }
            if entries.iter().any(|o: &Entry| o.id == e.id) {
                return Err(bad(format!("VHDX metadata item {} is listed twice", e.id)));
            }
            entries.push(e);
        }
        let read = |id: Guid, want: Option<u32>| -> Result<Option<Vec<u8>>> {
            let Some(e) = entries.iter().find(|e| e.id == id) else {
                return Ok(None);
            };
            if want.is_some_and(|w| e.length != w) || e.length > MAX_ITEM {
                return Err(StorageError::corrupt(
                    &name,
                    format!("VHDX metadata item {id} has length {}", e.length),
                ));
            }
            let mut v = vec![0u8; e.length as usize];
            file.read_exact_at(r.offset + e.offset as u64, &mut v)?;
            Ok(Some(v))
        };
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if let Some(e) = entries
            .iter()
            .find(|e| e.required && !known.contains(&e.id))
        {
            return Err(StorageError::Unsupported(format!(
                "the required VHDX metadata item {} in {name}",
                e.id
            )));
        }
        let need = |id: Guid, len: u32, what: &str| -> Result<Vec<u8>> {
            read(id, Some(len))?.ok_or_else(|| {
                StorageError::corrupt(&name, format!("VHDX metadata lacks the {what}"))
            })
        };
        let fp = need(FILE_PARAMETERS, 8, "file parameters")?;
        let block_size = le32(&fp, 0);
        let flags = le32(&fp, 4);
        let virtual_size = le64(&need(VIRTUAL_DISK_SIZE, 8, "virtual disk size")?, 0);
        let logical_sector = le32(&need(LOGICAL_SECTOR_SIZE, 4, "logical sector size")?, 0);
        let physical_sector = le32(&need(PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?, 0);
        let page83 = read(PAGE83_DATA, Some(16))?
            .map(|v| Guid::read(&v, 0))
            .unwrap_or_default();
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(bad(format!(
                "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
            )));
        }
        for (what, s) in [("logical", logical_sector), ("physical", physical_sector)] {
            if s != 512 && s != 4096 {
                return Err(bad(format!("VHDX {what} sector size {s} (512 or 4096)")));
            }
        }
        if virtual_size == 0 || virtual_size > MAX_SIZE || virtual_size % logical_sector as u64 != 0
        {
            return Err(bad(format!(
                "VHDX virtual size {virtual_size} is zero, above 64 TiB or not a multiple of the sector size"
            )));
        }
        let has_parent = flags & 2 != 0;
        let parent_locator = if has_parent {
            let v = read(PARENT_LOCATOR, None)?.ok_or_else(|| {
                StorageError::corrupt(&name, "differencing VHDX without a parent locator")
            })?;
            parse_locator(&v).map_err(|d| StorageError::corrupt(&name, d))?
        } else {
            BTreeMap::new()
        };
        Ok(Metadata {
            block_size,
            leave_blocks_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            logical_sector,
            physical_sector,
            page83,
            parent_locator,
        })
    }

    /// The metadata region's bytes (table at 0, values from 64 KiB) for `region_len` bytes.
    pub fn render(&self, region_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; region_len];
        b[..8].copy_from_slice(SIGNATURE);
        let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
            (
                FILE_PARAMETERS,
                [
                    self.block_size.to_le_bytes(),
                    ((self.leave_blocks_allocated as u32) | (self.has_parent as u32) << 1)
                        .to_le_bytes(),
                ]
                .concat(),
                4,
            ),
            (
                VIRTUAL_DISK_SIZE,
                self.virtual_size.to_le_bytes().to_vec(),
                4 | 2,
            ),
            (PAGE83_DATA, self.page83.0.to_vec(), 4 | 2),
            (
                LOGICAL_SECTOR_SIZE,
                self.logical_sector.to_le_bytes().to_vec(),
                4 | 2,
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                self.physical_sector.to_le_bytes().to_vec(),
                4 | 2,
            ),
        ];
        if self.has_parent {
            items.push((PARENT_LOCATOR, render_locator(&self.parent_locator), 4));
        }
        b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut at_value = TABLE_LEN;
        for (i, (id, value, flags)) in items.iter().enumerate() {
            let at = 32 + 32 * i;
            b[at..at + 16].copy_from_slice(&id.0);
            b[at + 16..at + 20].copy_from_slice(&(at_value as u32).to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
            b[at_value..at_value + value.len()].copy_from_slice(value);
            at_value += value.len().next_multiple_of(8);
        }
        b
    }
}

fn utf16(b: &[u8]) -> std::result::Result<String, String> {
    if b.len() % 2 != 0 {
        return Err("parent locator text of odd length".into());
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).map_err(|_| "parent locator text is not UTF-16".into())
}

/// Parses a parent locator item: type GUID, key/value count, then (key offset, value offset,
/// key length, value length) entries pointing at UTF-16LE text within the item.
pub fn parse_locator(v: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    if v.len() < 20 {
        return Err("parent locator is too short".into());
    }
    if Guid::read(v, 0) != VHDX_LOCATOR_TYPE {
        return Err(format!(
            "parent locator of type {} (only VHDX parents are known)",
            Guid::read(v, 0)
        ));
    }
    let count = le16(v, 18) as usize;
    if 20 + count * 12 > v.len() {
        return Err("parent locator entries run past the item".into());
    }
    let mut out = BTreeMap::new();
    for i in 0..count {
        let at = 20 + 12 * i;
        let (ko, vo) = (le32(v, at) as usize, le32(v, at + 4) as usize);
        let (kl, vl) = (le16(v, at + 8) as usize, le16(v, at + 10) as usize);
        let key = v
            .get(ko..ko.saturating_add(kl))
            .ok_or("parent locator key lies outside the item")?;
        let val = v
            .get(vo..vo.saturating_add(vl))
            .ok_or("parent locator value lies outside the item")?;
        out.insert(utf16(key)?, utf16(val)?);
    }
    Ok(out)
}

/// Renders a parent locator item.
pub fn render_locator(kv: &BTreeMap<String, String>) -> Vec<u8> {
    let enc = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let mut head = VHDX_LOCATOR_TYPE.0.to_vec();
    head.extend_from_slice(&0u16.to_le_bytes());
    head.extend_from_slice(&(kv.len() as u16).to_le_bytes());
    let mut text = Vec::new();
    let base = 20 + 12 * kv.len();
    for (k, v) in kv {
        let (k, v) = (enc(k), enc(v));
        let ko = base + text.len();
        text.extend_from_slice(&k);
        let vo = base + text.len();
        text.extend_from_slice(&v);
        head.extend_from_slice(&(ko as u32).to_le_bytes());
        head.extend_from_slice(&(vo as u32).to_le_bytes());
        head.extend_from_slice(&(k.len() as u16).to_le_bytes());
        head.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    head.extend_from_slice(&text);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_round_trips_and_refuses_out_of_bounds_entries() {
        let mut kv = BTreeMap::new();
        kv.insert(
            "parent_linkage".to_string(),
            format!("{{{}}}", Guid::random()),
        );
        kv.insert("relative_path".to_string(), ".\\base.vhdx".to_string());
        let b = render_locator(&kv);
        assert_eq!(parse_locator(&b).unwrap(), kv);
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&9999u32.to_le_bytes());
        assert!(parse_locator(&bad).is_err());
        assert!(parse_locator(&b[..10]).is_err());
    }
}
