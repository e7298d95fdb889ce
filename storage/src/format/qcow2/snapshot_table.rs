//! The internal snapshot table (docs/interop/qcow2.rst, "Snapshots"): parsing with every size
//! bounded, and serialization with unknown extra data kept.

use crate::bytes::{be16, be32, be64};
use crate::device::HostFile;
use crate::error::{Result, StorageError};

/// Most bytes of extra data per entry we accept (QEMU's limit).
pub const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table we read.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Extra data a version 3 entry carries: vm state size, disk size, icount.
pub const V3_EXTRA: usize = 24;

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of its L1 table.
    pub l1_offset: u64,
    /// Entries in its L1 table.
    pub l1_size: u32,
    /// Unique ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state.
    pub vm_state_size: u64,
    /// Virtual disk size when taken (version 3).
    pub disk_size: Option<u64>,
    /// Extra data beyond what we interpret, kept.
    pub extra_tail: Vec<u8>,
    /// icount (-1 if disabled), when present.
    pub icount: Option<u64>,
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("qcow2 snapshot table", detail)
}

/// Reads `count` entries at `offset`; also returns the table's length in bytes.
pub fn read_table(file: &dyn HostFile, offset: u64, count: u32) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut at = offset;
    let file_len = file.len();
    for i in 0..count {
        if at - offset > MAX_TABLE_BYTES {
            return Err(corrupt("the table is larger than 64 MiB"));
        }
        if at.checked_add(40).is_none_or(|e| e > file_len) {
            return Err(corrupt(format!(
                "entry {i} lies beyond the end of the file"
            )));
        }
        let mut head = [0u8; 40];
        file.read_exact_at(at, &mut head)?;
        let id_len = be16(&head, 12) as usize;
        let name_len = be16(&head, 14) as usize;
        let extra_len = be32(&head, 36);
        if extra_len > MAX_EXTRA {
            return Err(corrupt(format!(
                "entry {i} has {extra_len} bytes of extra data"
            )));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let mut var = vec![0u8; var_len];
        if (at + 40)
            .checked_add(var_len as u64)
            .is_none_or(|e| e > file_len)
        {
            return Err(corrupt(format!(
                "entry {i} lies beyond the end of the file"
            )));
        }
        file.read_exact_at(at + 40, &mut var)?;
        let extra = &var[..extra_len as usize];
        let id = String::from_utf8_lossy(&var[extra_len as usize..extra_len as usize + id_len])
            .into_owned();
        let name = String::from_utf8_lossy(&var[extra_len as usize + id_len..]).into_owned();
        let mut s = Snapshot {
            l1_offset: be64(&head, 0),
            l1_size: be32(&head, 8),
            id,
            name,
            date_sec: be32(&head, 16),
            date_nsec: be32(&head, 20),
            vm_clock_nsec: be64(&head, 24),
            vm_state_size: u64::from(be32(&head, 32)),
            disk_size: None,
            icount: None,
            extra_tail: Vec::new(),
        };
        if extra.len() >= 8 {
            s.vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            s.disk_size = Some(be64(extra, 8));
        }
        if extra.len() >= 24 {
            s.icount = Some(be64(extra, 16));
        }
        if extra.len() > V3_EXTRA {
            s.extra_tail = extra[V3_EXTRA..].to_vec();
        }
        out.push(s);
        at = (at + 40 + var_len as u64).next_multiple_of(8);
    }
    Ok((out, at - offset))
}

/// Serializes `snapshots` as a table (each entry with version 3 extra data).
pub fn serialize(snapshots: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snapshots {
        let mut extra = Vec::with_capacity(V3_EXTRA + s.extra_tail.len());
        extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&s.extra_tail);
        out.extend_from_slice(&s.l1_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;

    #[test]
    fn tables_round_trip() {
        let snaps = vec![
            Snapshot {
                l1_offset: 0x30000,
                l1_size: 2,
                id: "1".into(),
                name: "first".into(),
                date_sec: 1_700_000_000,
                date_nsec: 5,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size: Some(1 << 30),
                icount: Some(u64::MAX),
                extra_tail: vec![],
            },
            Snapshot {
                l1_offset: 0x50000,
                l1_size: 2,
                id: "2".into(),
                name: "second one".into(),
                date_sec: 1_700_000_100,
                date_nsec: 0,
                vm_clock_nsec: 7,
                vm_state_size: 0,
                disk_size: Some(1 << 30),
                icount: Some(u64::MAX),
                extra_tail: vec![1, 2, 3, 4, 5, 6, 7, 8],
            },
        ];
        let bytes = serialize(&snaps);
        let dev = MemoryDevice::new(1 << 20);
        dev.write_all_at(4096, &bytes).unwrap();
        assert_eq!(
            read_table(dev.as_ref(), 4096, 2).unwrap(),
            (snaps, bytes.len() as u64)
        );
        assert!(read_table(dev.as_ref(), (1 << 20) - 16, 1).is_err());
    }
}
