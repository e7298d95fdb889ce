//! The metadata area of a PV: two slots, each holding a checksummed, sequence-numbered copy of
//! the volume group's metadata (JSON, see `meta.rs`).
//!
//! A commit writes sequence number N to slot 0 of every PV, syncs them, then to slot 1 of every
//! PV, and syncs again. A reader takes the valid copy with the highest sequence number over all
//! slots of all PVs. So a crash or a torn write during a commit leaves either N-1 or N readable,
//! and after a commit either slot alone is enough: one damaged copy never loses anything.
//!
//! Slot layout (little-endian; see docs/format-volume.md):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STRATAMD` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | crc32 of this 64-byte header with this field zeroed |
//! | 16 | 8 | sequence number (≥ 1) |
//! | 24 | 8 | payload length in bytes |
//! | 32 | 4 | crc32 of the payload |
//! | 36 | 4 | slot index (0 or 1) |
//! | 40 | 16 | volume group identifier |
//! | 56 | 8 | reserved, zero |
//! | 64 | len | payload: the volume group metadata as UTF-8 JSON |
//!
//! An all-zero header means the slot is empty (a PV in no volume group).

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::volume::codec::{seal, sealed, uuid_bytes, uuid_string};
use crate::volume::label::Label;

/// Slot magic.
pub const MDA_MAGIC: &[u8; 8] = b"STRATAMD";
/// Slot format version.
pub const MDA_VERSION: u32 = 1;
/// Size of a slot header.
pub const HEADER_SIZE: usize = 64;

const HEADER_CRC_AT: usize = 12;

/// What one slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Never written, or wiped.
    Empty,
    /// A valid copy.
    Valid {
        /// Sequence number.
        seq: u64,
        /// The volume group it belongs to.
        vg_uuid: String,
        /// The metadata text.
        payload: Vec<u8>,
    },
    /// A copy that fails its checks, with the reason.
    Damaged(String),
}

fn slot_offset(label: &Label, slot: usize) -> u64 {
    label.mda_offset + slot as u64 * label.mda_slot_size
}

/// Largest payload a slot of this label holds.
pub fn capacity(label: &Label) -> usize {
    (label.mda_slot_size as usize).saturating_sub(HEADER_SIZE)
}

fn encode(seq: u64, vg_uuid: &str, payload: &[u8], slot: usize) -> Vec<u8> {
    let len = (HEADER_SIZE + payload.len()).div_ceil(4096) * 4096;
    let mut b = vec![0u8; len];
    b[0..8].copy_from_slice(MDA_MAGIC);
    put_le32(&mut b, 8, MDA_VERSION);
    put_le64(&mut b, 16, seq);
    put_le64(&mut b, 24, payload.len() as u64);
    put_le32(&mut b, 32, crc32fast::hash(payload));
    put_le32(&mut b, 36, slot as u32);
    b[40..56].copy_from_slice(&uuid_bytes(vg_uuid));
    seal(&mut b[..HEADER_SIZE], HEADER_CRC_AT);
    b[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
    b
}

/// Reads one slot.
pub fn read_slot(file: &dyn HostFile, label: &Label, slot: usize) -> Result<Slot> {
    let at = slot_offset(label, slot);
    let mut h = [0u8; HEADER_SIZE];
    file.read_exact_at(at, &mut h)?;
    if h.iter().all(|&b| b == 0) {
        return Ok(Slot::Empty);
    }
    if &h[0..8] != MDA_MAGIC {
        return Ok(Slot::Damaged("bad magic".into()));
    }
    if !sealed(&h, HEADER_CRC_AT) {
        return Ok(Slot::Damaged("header checksum mismatch".into()));
    }
    let version = le32(&h, 8);
    if version != MDA_VERSION {
        return Err(StorageError::Unsupported(format!(
            "volume group metadata version {version} on {} (this build reads {MDA_VERSION})",
            file.name()
        )));
    }
    let seq = le64(&h, 16);
    let len = le64(&h, 24);
    if seq == 0 || len > capacity(label) as u64 {
        return Ok(Slot::Damaged(format!(
            "impossible header (sequence {seq}, length {len})"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact_at(at + HEADER_SIZE as u64, &mut payload)?;
    if crc32fast::hash(&payload) != le32(&h, 32) {
        return Ok(Slot::Damaged("payload checksum mismatch".into()));
    }
    Ok(Slot::Valid {
        seq,
        vg_uuid: uuid_string(&h[40..56]),
        payload,
    })
}

/// Reads both slots of a PV.
pub fn read_area(file: &dyn HostFile, label: &Label) -> Result<[Slot; 2]> {
    Ok([read_slot(file, label, 0)?, read_slot(file, label, 1)?])
}

/// The newest valid copy of two slots: `(seq, vg_uuid, payload)`.
pub fn newest(slots: &[Slot]) -> Option<(u64, &str, &[u8])> {
    slots
        .iter()
        .filter_map(|s| match s {
            Slot::Valid {
                seq,
                vg_uuid,
                payload,
            } => Some((*seq, vg_uuid.as_str(), payload.as_slice())),
            _ => None,
        })
        .max_by_key(|(seq, _, _)| *seq)
}

/// Commits `payload` as sequence `seq` of volume group `vg_uuid` to every PV: slot 0 of all,
/// sync, slot 1 of all, sync (see the module documentation).
pub fn commit(
    pvs: &[(&dyn HostFile, &Label)],
    seq: u64,
    vg_uuid: &str,
    payload: &[u8],
) -> Result<()> {
    for (file, label) in pvs {
        if payload.len() > capacity(label) {
            return Err(StorageError::OutOfSpace(format!(
                "volume group metadata is {} bytes; the metadata area of {} holds {}",
                payload.len(),
                file.name(),
                capacity(label)
            )));
        }
    }
    for slot in 0..2 {
        let block = encode(seq, vg_uuid, payload, slot);
        for (file, label) in pvs {
            file.write_all_at(slot_offset(label, slot), &block)?;
        }
        for (file, _) in pvs {
            file.sync_data()?;
        }
    }
    Ok(())
}

/// Empties both slots (the PV no longer belongs to a volume group) and syncs.
pub fn wipe(file: &dyn HostFile, label: &Label) -> Result<()> {
    for slot in 0..2 {
        file.write_all_at(slot_offset(label, slot), &[0u8; 4096])?;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;

    #[test]
    fn newest_valid_copy_wins_and_one_damaged_copy_is_survivable() {
        let dev = MemoryDevice::new(16 << 20);
        let l = Label::new(16 << 20);
        l.write(dev.as_ref()).unwrap();
        wipe(dev.as_ref(), &l).unwrap();
        assert_eq!(
            read_area(dev.as_ref(), &l).unwrap(),
            [Slot::Empty, Slot::Empty]
        );
        let u = crate::volume::name::new_uuid();
        commit(&[(dev.as_ref(), &l)], 1, &u, b"{\"a\":1}").unwrap();
        commit(&[(dev.as_ref(), &l)], 2, &u, b"{\"a\":2}").unwrap();
        let slots = read_area(dev.as_ref(), &l).unwrap();
        assert_eq!(newest(&slots).unwrap(), (2, u.as_str(), &b"{\"a\":2}"[..]));
        // Damage slot 0's payload: slot 1 still has sequence 2.
        dev.write_all_at(l.mda_offset + 70, b"xx").unwrap();
        let slots = read_area(dev.as_ref(), &l).unwrap();
        assert!(matches!(slots[0], Slot::Damaged(_)));
        assert_eq!(newest(&slots).unwrap().0, 2);
    }

    #[test]
    fn oversized_metadata_is_refused_before_writing() {
        let dev = MemoryDevice::new(16 << 20);
        let l = Label::new(16 << 20);
        let big = vec![b' '; capacity(&l) + 1];
        let e = commit(
            &[(dev.as_ref(), &l)],
            1,
            &crate::volume::name::new_uuid(),
            &big,
        );
        assert!(matches!(e, Err(StorageError::OutOfSpace(_))));
        assert_eq!(dev.allocated_bytes().unwrap(), 0);
    }
}
