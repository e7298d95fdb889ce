//! The physical volume label: two 4 KiB copies at the start of a PV that say "this is a Strata
//! PV", give its identifier and where its metadata area and data extents are.
//!
//! Layout of each copy (little-endian; copy 0 at byte 0, copy 1 at byte 4096; see
//! docs/format-volume.md):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STRATAPV` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | crc32 of the 4096-byte block with this field zeroed |
//! | 16 | 16 | PV identifier |
//! | 32 | 8 | device size when the label was written |
//! | 40 | 8 | metadata area offset |
//! | 48 | 8 | metadata slot size (the area holds two slots) |
//! | 56 | 8 | first byte of the data extents (`pe_start`) |
//! | 64 | 8 | creation time (seconds since the epoch) |
//! | 72 | 4 | copy index (0 or 1) |
//!
//! Labels are written once, by `pv create`; a damaged copy is reported and rewritten from the
//! other by a repair.

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::volume::codec::{seal, sealed, uuid_bytes, uuid_string};

/// Label magic.
pub const LABEL_MAGIC: &[u8; 8] = b"STRATAPV";
/// Label format version.
pub const LABEL_VERSION: u32 = 1;
/// Size of one label copy.
pub const LABEL_SIZE: usize = 4096;
/// Offset of the metadata area on PVs we create.
pub const MDA_OFFSET: u64 = 64 << 10;
/// Size of one metadata slot on PVs we create (two slots make the area).
pub const MDA_SLOT_SIZE: u64 = 1 << 20;
/// Data extents start here on PVs we create (after the metadata area, 1 MiB aligned).
pub const PE_START: u64 = 3 << 20;
/// Smallest PV accepted: the label, the metadata area and 64 KiB (the smallest extent).
pub const MIN_PV_SIZE: u64 = PE_START + (64 << 10);

const CRC_AT: usize = 12;

/// A decoded PV label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The PV's identifier.
    pub uuid: String,
    /// Device size when the label was written.
    pub size: u64,
    /// Offset of the metadata area.
    pub mda_offset: u64,
    /// Size of each of the two metadata slots.
    pub mda_slot_size: u64,
    /// First byte of the data extents.
    pub pe_start: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// A label as read from a device, with the copies found damaged.
#[derive(Clone, Debug)]
pub struct LabelRead {
    /// The label.
    pub label: Label,
    /// Indexes (0, 1) of copies that failed their checksum or disagree with the good one.
    pub damaged: Vec<u8>,
}

impl Label {
    /// A new label for a device of `size` bytes.
    pub fn new(size: u64) -> Label {
        Label {
            uuid: crate::volume::name::new_uuid(),
            size,
            mda_offset: MDA_OFFSET,
            mda_slot_size: MDA_SLOT_SIZE,
            pe_start: PE_START,
            created: crate::volume::name::now_secs(),
        }
    }

    fn encode(&self, copy: u32) -> Vec<u8> {
        let mut b = vec![0u8; LABEL_SIZE];
        b[0..8].copy_from_slice(LABEL_MAGIC);
        put_le32(&mut b, 8, LABEL_VERSION);
        b[16..32].copy_from_slice(&uuid_bytes(&self.uuid));
        put_le64(&mut b, 32, self.size);
        put_le64(&mut b, 40, self.mda_offset);
        put_le64(&mut b, 48, self.mda_slot_size);
        put_le64(&mut b, 56, self.pe_start);
        put_le64(&mut b, 64, self.created);
        put_le32(&mut b, 72, copy);
        seal(&mut b, CRC_AT);
        b
    }

    /// Decodes one copy: `Ok(None)` when there is no label magic at all.
    fn decode(b: &[u8], name: &str) -> Result<Option<Label>> {
        if &b[0..8] != LABEL_MAGIC {
            return Ok(None);
        }
        let corrupt = |d: String| StorageError::corrupt(format!("PV label of {name}"), d);
        if !sealed(b, CRC_AT) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let version = le32(b, 8);
        if version != LABEL_VERSION {
            return Err(StorageError::Unsupported(format!(
                "PV label version {version} on {name} (this build reads version {LABEL_VERSION})"
            )));
        }
        let label = Label {
            uuid: uuid_string(&b[16..32]),
            size: le64(b, 32),
            mda_offset: le64(b, 40),
            mda_slot_size: le64(b, 48),
            pe_start: le64(b, 56),
            created: le64(b, 64),
        };
        let slot_ok = (64 << 10..=64 << 20).contains(&label.mda_slot_size);
        let area_end = label
            .mda_offset
            .checked_add(label.mda_slot_size.saturating_mul(2));
        if label.mda_offset < 2 * LABEL_SIZE as u64
            || !slot_ok
            || area_end.is_none_or(|end| end > label.pe_start)
            || label.pe_start % 4096 != 0
        {
            return Err(corrupt(format!(
                "impossible layout (metadata at {}, slots of {}, data at {})",
                label.mda_offset, label.mda_slot_size, label.pe_start
            )));
        }
        Ok(Some(label))
    }

    /// Writes both copies and syncs.
    pub fn write(&self, file: &dyn HostFile) -> Result<()> {
        file.write_all_at(0, &self.encode(0))?;
        file.write_all_at(LABEL_SIZE as u64, &self.encode(1))?;
        file.sync_data()
    }

    /// Rewrites one copy from this label (repair) and syncs.
    pub fn rewrite_copy(&self, file: &dyn HostFile, copy: u8) -> Result<()> {
        file.write_all_at(
            copy as u64 * LABEL_SIZE as u64,
            &self.encode(u32::from(copy)),
        )?;
        file.sync_data()
    }
}

/// Reads the label of `file`. A device without any label gives [`StorageError::InvalidInput`]
/// ("not a Strata PV"); a device whose copies are all damaged gives [`StorageError::Corrupt`].
pub fn read_label(file: &dyn HostFile) -> Result<LabelRead> {
    let name = file.name().to_string();
    if file.len() < MIN_PV_SIZE {
        return Err(StorageError::InvalidInput(format!(
            "{name} is not a Strata physical volume (only {} bytes)",
            file.len()
        )));
    }
    let mut copies = Vec::new();
    for i in 0..2u64 {
        let mut b = vec![0u8; LABEL_SIZE];
        file.read_exact_at(i * LABEL_SIZE as u64, &mut b)?;
        copies.push(Label::decode(&b, &name));
    }
    let mut damaged = Vec::new();
    let mut good: Option<Label> = None;
    let mut first_err = None;
    for (i, c) in copies.into_iter().enumerate() {
        match c {
            Ok(Some(l)) => match &good {
                None => good = Some(l),
                Some(g) if *g == l => {}
                Some(_) => damaged.push(i as u8),
            },
            Ok(None) => damaged.push(i as u8),
            Err(e) => {
                damaged.push(i as u8);
                first_err.get_or_insert(e);
            }
        }
    }
    match (good, first_err) {
        (Some(label), _) => {
            if label.pe_start > file.len() {
                return Err(StorageError::corrupt(
                    format!("PV {name}"),
                    format!(
                        "the device is {} bytes, smaller than its label's data start {}",
                        file.len(),
                        label.pe_start
                    ),
                ));
            }
            if !damaged.is_empty() {
                tracing::warn!(pv = %name, ?damaged, "a PV label copy is damaged; using the other");
            }
            Ok(LabelRead { label, damaged })
        }
        (None, Some(StorageError::Corrupt { .. })) => Err(StorageError::corrupt(
            format!("PV label of {name}"),
            "both copies are damaged",
        )),
        (None, Some(e)) => Err(e),
        (None, None) => Err(StorageError::InvalidInput(format!(
            "{name} is not a Strata physical volume (no label)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;

    #[test]
    fn label_round_trips_and_survives_one_damaged_copy() {
        let dev = MemoryDevice::new(64 << 20);
        let l = Label::new(64 << 20);
        l.write(dev.as_ref()).unwrap();
        let r = read_label(dev.as_ref()).unwrap();
        assert_eq!(r.label, l);
        assert!(r.damaged.is_empty());
        dev.write_all_at(100, b"garbage").unwrap();
        let r = read_label(dev.as_ref()).unwrap();
        assert_eq!(r.label, l);
        assert_eq!(r.damaged, vec![0]);
        r.label.rewrite_copy(dev.as_ref(), 0).unwrap();
        assert!(read_label(dev.as_ref()).unwrap().damaged.is_empty());
    }

    #[test]
    fn both_copies_damaged_or_absent_are_clear_errors() {
        let dev = MemoryDevice::new(64 << 20);
        let e = read_label(dev.as_ref()).unwrap_err().to_string();
        assert!(e.contains("not a Strata physical volume"), "{e}");
        Label::new(64 << 20).write(dev.as_ref()).unwrap();
        dev.write_all_at(40, &[1u8; 8]).unwrap();
        dev.write_all_at(4096 + 40, &[1u8; 8]).unwrap();
        let e = read_label(dev.as_ref()).unwrap_err().to_string();
        assert!(e.contains("both copies are damaged"), "{e}");
    }
}
