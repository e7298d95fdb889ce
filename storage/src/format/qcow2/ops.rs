//! Whole-image operations: resize, map, unallocating (for commit), and changing the backing file
//! name (for rebase). The tools built on them (`rebase`, `commit`) live in `tools.rs`.

use serde::Serialize;

use crate::error::{Result, StorageError};

use super::entry::{L2Entry, Mapping, COPIED};
use super::header::{ext, l1_entries_for, Extension};
use super::meta::{l1_entry_offset, Meta};
use super::Qcow2Image;

/// One extent of `map` output, named as `qemu-img map --output json` names them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Layer of the backing chain that holds it (0: this image).
    pub depth: u32,
    /// Whether some layer holds it (else it reads as zeros with no layer holding it).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset in the file of its layer, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file of its layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

impl Meta {
    /// Changes the virtual size. Growing may move the L1 table (switched to through the header);
    /// shrinking (only with `shrink`) drops every cluster past the new end.
    pub fn resize(&mut self, new_size: u64, shrink: bool) -> Result<()> {
        if new_size == 0 {
            return Err(StorageError::InvalidInput(
                "Image size must be greater than zero".into(),
            ));
        }
        if !self.snapshots.is_empty() && self.header.version < 3 {
            return Err(StorageError::Unsupported(
                "resizing a version 2 (compat=0.10) image that has internal snapshots".into(),
            ));
        }
        let old = self.header.size;
        if new_size < old {
            if !shrink {
                return Err(StorageError::InvalidInput(format!(
                    "Shrinking from {old} to {new_size} bytes loses data; use --shrink to do it anyway"
                )));
            }
            if !self.snapshots.is_empty() {
                return Err(StorageError::Unsupported(
                    "shrinking an image that has internal snapshots".into(),
                ));
            }
            let cs = self.geo.cluster_size;
            let mut g = new_size.next_multiple_of(cs);
            while g < old {
                self.unallocate_cluster(g)?;
                g += cs;
            }
            self.header.size = new_size;
            self.header_dirty = true;
            return self.write_everything();
        }
        let needed = l1_entries_for(new_size, self.geo.cluster_bits, self.geo.extended)
            .filter(|&n| n * 8 <= super::header::MAX_L1_BYTES)
            .ok_or_else(|| {
                StorageError::InvalidInput(format!(
                    "Size {new_size} is too large for this cluster size"
                ))
            })?;
        if needed as usize > self.l1.len() {
            let cs = self.geo.cluster_size;
            let clusters = (needed * 8).div_ceil(cs);
            let (off, _) = self.alloc_clusters_blocking(clusters)?;
            let mut table = self.l1.entries().to_vec();
            table.resize((clusters * cs / 8) as usize, 0);
            let mut bytes = vec![0u8; (clusters * cs) as usize];
            for (i, e) in table.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            // The new table's refcounts and every pending table first, then the table, then
            // the header that points at it.
            self.write_everything()?;
            self.write_cluster(off, &bytes)?;
            self.file.sync_data()?;
            let old_off = self.header.l1_table_offset;
            let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
            self.header.l1_table_offset = off;
            self.header.l1_size = needed as u32;
            self.header.size = new_size;
            self.write_header()?;
            self.file.sync_data()?;
            table.truncate(needed as usize);
            self.l1.replace(table);
            self.rebuild_metadata_map();
            if old_off != 0 {
                self.refs.free_later(old_off, old_clusters);
            }
            return self.write_everything();
        }
        self.header.size = new_size;
        self.header_dirty = true;
        self.write_everything()
    }

    /// Makes the guest cluster at `g` unallocated (reads fall through to the backing file).
    pub fn unallocate_cluster(&mut self, g: u64) -> Result<()> {
        let (l1i, l2i) = self.geo.indices(g);
        if l1_entry_offset(self.l1.get(l1i), &self.geo, self.file_len())? == 0 {
            return Ok(());
        }
        let (entry, _) = self.blocking(|m| m.entry_at(g))?;
        if entry == L2Entry::Unallocated
            || matches!(
                entry,
                L2Entry::Extended {
                    host: None,
                    alloc: 0,
                    zero: 0,
                    ..
                }
            )
        {
            return Ok(());
        }
        let slot = self.writable_l2_blocking(l1i)?;
        self.set_l2_raw(slot, l2i, 0, 0);
        match entry {
            L2Entry::Compressed { offset, len } => {
                let range = self.compressed_clusters(offset, len);
                self.refs.free_clusters_later(range);
            }
            other => {
                if let Some(h) = other.host_cluster() {
                    self.free_data_later(h);
                }
            }
        }
        Ok(())
    }

    /// Sets the backing file name and format stored in the header (nothing is copied).
    pub fn set_backing(&mut self, name: Option<String>, format: Option<String>) -> Result<()> {
        self.write_everything()?;
        let mut h = self.header.clone();
        h.backing_file = name;
        h.set_extension(ext::BACKING_FORMAT, None);
        if let (Some(f), Some(_)) = (format, &h.backing_file) {
            h.extensions.insert(
                0,
                Extension {
                    kind: ext::BACKING_FORMAT,
                    data: f.into_bytes(),
                },
            );
        }
        h.serialize()?;
        self.header = h;
        self.has_backing = self.header.backing_file.is_some();
        self.write_header()?;
        self.file.sync_data()
    }

    /// Whether every active L1 entry with a table has its copied flag (used by tests).
    pub fn active_tables_unshared(&self) -> bool {
        self.l1.entries().iter().all(|&e| e == 0 || e & COPIED != 0)
    }
}

impl Qcow2Image {
    /// Changes the virtual size; see [`Meta::resize`]. Bytes past the old end read as zeros.
    pub fn resize_image(&self, new_size: u64, shrink: bool) -> Result<()> {
        let old = crate::device::BlockDevice::size(self);
        self.exclusive(|m| m.resize(new_size, shrink))?;
        let cs = self.cluster_size();
        if new_size > old && old % cs != 0 {
            // The tail of the old last cluster may hold data from before a shrink.
            let end = old.next_multiple_of(cs).min(new_size);
            let mut q = crate::io::blocking::BlockingQueue::open(self, 4)?;
            q.write_zeroes(old, end - old, false)?;
            q.flush()?;
        }
        Ok(())
    }

    /// The allocation map of `[offset, offset+len)` through the backing chain.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let mut out: Vec<MapEntry> = Vec::new();
        self.map_layer(offset, len, 0, &mut out)?;
        Ok(out)
    }

    fn map_layer(&self, offset: u64, len: u64, depth: u32, out: &mut Vec<MapEntry>) -> Result<()> {
        let end = offset + len;
        let mut at = offset;
        let name = self.file().name().to_string();
        while at < end {
            let (m, run) = self.mapping(at, end - at)?;
            let base = MapEntry {
                start: at,
                length: run,
                depth,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: None,
                filename: Some(name.clone()),
            };
            match m {
                Mapping::Allocated(h) => push(
                    out,
                    MapEntry {
                        offset: Some(h),
                        ..base
                    },
                ),
                Mapping::Compressed { .. } => push(
                    out,
                    MapEntry {
                        compressed: true,
                        ..base
                    },
                ),
                Mapping::Zero => push(
                    out,
                    MapEntry {
                        zero: true,
                        data: false,
                        ..base
                    },
                ),
                Mapping::Unallocated => self.map_below(at, run, depth, out)?,
            }
            at += run;
        }
        Ok(())
    }

    fn map_below(&self, at: u64, run: u64, depth: u32, out: &mut Vec<MapEntry>) -> Result<()> {
        let absent = |start: u64, length: u64, depth: u32| MapEntry {
            start,
            length,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        };
        let Some(b) = self.backing() else {
            push(out, absent(at, run, depth));
            return Ok(());
        };
        let bsize = b.image.size();
        let inside = if at < bsize { run.min(bsize - at) } else { 0 };
        if inside > 0 {
            if let Some(q) = &b.qcow2 {
                q.map_layer(at, inside, depth + 1, out)?;
            } else {
                let mut p = at;
                while p < at + inside {
                    let e = b.image.block_status(p, at + inside - p)?;
                    let data = e.kind == crate::device::ExtentKind::Data;
                    push(
                        out,
                        MapEntry {
                            start: p,
                            length: e.len,
                            depth: depth + 1,
                            present: true,
                            zero: !data,
                            data,
                            compressed: false,
                            offset: data.then_some(p),
                            filename: Some(b.path.display().to_string()),
                        },
                    );
                    p += e.len;
                }
            }
        }
        if inside < run {
            push(out, absent(at + inside, run - inside, depth + 1));
        }
        Ok(())
    }
}

fn push(out: &mut Vec<MapEntry>, e: MapEntry) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, e.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.start + last.length == e.start
            && contiguous
            && (
                last.depth,
                last.present,
                last.zero,
                last.data,
                last.compressed,
                &last.filename,
            ) == (
                e.depth,
                e.present,
                e.zero,
                e.data,
                e.compressed,
                &e.filename,
            )
        {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}
