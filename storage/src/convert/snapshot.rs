//! `convert -l snapshot.name=NAME` / `snapshot.id=ID`: reading a qcow2 image's internal snapshot
//! without applying it.
//!
//! A snapshot is an L1 table (and a disk size) kept beside the active one; everything below the
//! L1 table is shared. So the snapshot is opened as the same qcow2 seen through a read-only view
//! of its file whose header names the snapshot's L1 table and size instead of the active ones:
//! the ordinary qcow2 reader (compression, zero clusters, extended L2, backing file) then reads
//! the snapshot, and nothing is ever written.

use std::sync::Arc;

use crate::device::{BlockDevice, Capabilities, Extent, HostFile, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::qcow2::{self, Qcow2Options};
use crate::format::{Image, References};
use crate::io::{IoQueue, QueueOptions};

/// Which snapshot `-l` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotSel {
    /// By name (`snapshot.name=` or a bare name).
    Name(String),
    /// By ID (`snapshot.id=`).
    Id(String),
}

impl SnapshotSel {
    /// Parses qemu-img's `-l` argument: `snapshot.name=NAME`, `snapshot.id=ID`, or a bare name.
    pub fn parse(text: &str) -> Result<SnapshotSel> {
        let mut name = None;
        let mut id = None;
        if !text.contains('=') {
            return Ok(SnapshotSel::Name(text.to_string()));
        }
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("snapshot.name", v)) => name = Some(v.to_string()),
                Some(("snapshot.id", v)) => id = Some(v.to_string()),
                _ => {
                    return Err(StorageError::InvalidInput(format!(
                        "Invalid snapshot selector '{part}' (expected snapshot.name=NAME or snapshot.id=ID)"
                    )))
                }
            }
        }
        match (name, id) {
            (Some(n), None) => Ok(SnapshotSel::Name(n)),
            (None, Some(i)) => Ok(SnapshotSel::Id(i)),
            _ => Err(StorageError::InvalidInput(
                "Name a snapshot by snapshot.name= or snapshot.id=, one of them".into(),
            )),
        }
    }
}

/// Opens the internal snapshot `sel` of the qcow2 image in `file` read-only, following the
/// files the image names (backing file, data file) only if `references` allows it.
pub fn open_snapshot(
    file: SharedFile,
    sel: &SnapshotSel,
    references: References,
) -> Result<Arc<dyn Image>> {
    let opts = Qcow2Options {
        refuse_references: references == References::Refuse,
        ..Qcow2Options::default()
    };
    let active = qcow2::open(file.clone(), &opts)?;
    let snaps = active.snapshots();
    let found = snaps.iter().find(|s| match sel {
        SnapshotSel::Name(n) => s.name == *n,
        SnapshotSel::Id(i) => s.id == *i,
    });
    let Some(s) = found else {
        return Err(StorageError::InvalidInput(format!(
            "{} has no snapshot {}",
            file.name(),
            match sel {
                SnapshotSel::Name(n) => format!("named '{n}'"),
                SnapshotSel::Id(i) => format!("with ID '{i}'"),
            }
        )));
    };
    let size = s.disk_size.unwrap_or_else(|| active.size());
    let mut patch = [0u8; 24];
    patch[..8].copy_from_slice(&size.to_be_bytes());
    patch[12..16].copy_from_slice(&s.l1_size.to_be_bytes());
    patch[16..24].copy_from_slice(&s.l1_offset.to_be_bytes());
    drop(active);
    let view: SharedFile = Arc::new(SnapshotView { inner: file, patch });
    Ok(qcow2::open(view, &opts)?)
}

/// Header bytes 24..48: size (24), cluster bits (32, kept), L1 size (36), L1 offset (40).
const PATCH_AT: u64 = 24;

/// A read-only view of a qcow2 file with the header's size and L1 fields replaced.
#[derive(Debug)]
struct SnapshotView {
    inner: SharedFile,
    patch: [u8; 24],
}

impl BlockDevice for SnapshotView {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities() & Capabilities::BLOCK_STATUS
    }

    fn alignment(&self) -> usize {
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        // Data clusters only: the header is read through `read_exact_at`.
        self.inner.open_queue(opts)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
}

impl HostFile for SnapshotView {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact_at(offset, buf)?;
        let (lo, hi) = (PATCH_AT, PATCH_AT + self.patch.len() as u64);
        let end = offset + buf.len() as u64;
        if offset < hi && lo < end {
            let from = offset.max(lo);
            let to = end.min(hi);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&self.patch[(from - lo) as usize..(to - lo) as usize]);
        }
        Ok(())
    }

    fn write_all_at(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn sync_data(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn allocate(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly(self.name().to_string()))
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_as_qemu_img_writes_them() {
        assert_eq!(
            SnapshotSel::parse("snapshot.name=before").unwrap(),
            SnapshotSel::Name("before".into())
        );
        assert_eq!(
            SnapshotSel::parse("snapshot.id=3").unwrap(),
            SnapshotSel::Id("3".into())
        );
        assert_eq!(
            SnapshotSel::parse("plain").unwrap(),
            SnapshotSel::Name("plain".into())
        );
        assert!(SnapshotSel::parse("snapshot.name=a,snapshot.id=1").is_err());
        assert!(SnapshotSel::parse("snap=1").is_err());
    }
}
