//! A hosted sparse extent: its header, grain directory and grain tables, and the mapping of
//! grains to host offsets.
//!
//! Grain tables are loaded on demand into a bounded cache. Lookups and allocations run under
//! one short lock per extent; data I/O is the caller's, on the extent file's queues.
//!
//! # Crash safety of allocating writes
//! A new grain is always appended at the end of the file, which is extended under the lock, so
//! an allocated grain never holds stale bytes: its unwritten parts are holes and read as zeros.
//! The grain table entry is set in memory at once (reads see the grain) and reaches the disk
//! only in [`SparseExtent::write_back`], which a flush runs in this order:
//! 1. `fdatasync`: the data of every completed write, and the file length, are durable;
//! 2. dirty grain tables are written, then `fdatasync`;
//! 3. the grain directory, if a new grain table was added, then `fdatasync`;
//! 4. the redundant grain tables, `fdatasync`, then the redundant directory, `fdatasync`.
//!
//! So an on-disk table never points at data that is not durable, the primary tables are never
//! behind the redundant ones, and after a crash at any point each tree is consistent: entries
//! of writes not covered by a completed flush are lost, as they may be.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vmdk::header::{
    parse_marker, SparseHeader, GD_AT_END, MAGIC, MARKER_EOS, MARKER_FOOTER, SECTOR,
};

/// Most grain tables cached per extent (8 MiB of 512-entry tables, mapping 128 GiB of 64 KiB
/// grains); dirty tables beyond it force a write-back.
const GT_CACHE_TABLES: usize = 4096;

/// Where a grain's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrainMap {
    /// Not allocated in this extent: the parent's data, or zeros.
    Unallocated,
    /// A zeroed grain (entry 1 with the zeroed-grain flag).
    Zero,
    /// Uncompressed data at this byte offset of the extent file.
    Data(u64),
    /// A compressed grain whose marker starts at this byte offset.
    Compressed(u64),
}

#[derive(Debug)]
struct Table {
    entries: Box<[u32]>,
    dirty: bool,
}

#[derive(Debug)]
struct Meta {
    gd: Vec<u32>,
    rgd: Vec<u32>,
    gd_dirty: bool,
    tables: HashMap<u32, Table>,
    /// Byte offset where the next grain or table is appended.
    next_free: u64,
}

/// A sparse extent. See the module documentation.
#[derive(Debug)]
pub struct SparseExtent {
    file: SharedFile,
    header: SparseHeader,
    writable: bool,
    meta: Mutex<Meta>,
}

pub(crate) fn read_u32s(file: &SharedFile, offset: u64, count: u64) -> Result<Vec<u32>> {
    let mut bytes = vec![0u8; (count * 4) as usize];
    file.read_exact_at(offset, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| crate::bytes::le32(c, 0))
        .collect())
}

fn u32s_to_bytes(v: &[u32], pad_to: u64) -> Vec<u8> {
    let mut out: Vec<u8> = v.iter().flat_map(|e| e.to_le_bytes()).collect();
    out.resize(out.len().max(pad_to as usize), 0);
    out
}

impl SparseExtent {
    /// Opens the sparse extent in `file`. For streamOptimized extents whose header defers the
    /// grain directory to the footer, the footer is read.
    pub fn open(file: SharedFile, writable: bool) -> Result<SparseExtent> {
        let name = file.name().to_string();
        let file_len = file.len();
        let mut head = [0u8; SECTOR as usize];
        if file_len < SECTOR {
            return Err(StorageError::corrupt(
                &name,
                "file is shorter than a vmdk header",
            ));
        }
        file.read_exact_at(0, &mut head)?;
        let mut header = SparseHeader::parse(&head, &name)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(&file, &header, &name)?;
        }
        header.check_against_file(file_len, &name)?;
        if header.compressed() && writable {
            return Err(StorageError::Unsupported(format!(
                "writing to the streamOptimized vmdk {name} in place (streamOptimized images are written once, as a stream, by `strata image convert -c` or `-o subformat=streamOptimized`; open it read-only)"
            )));
        }
        let entries = header.gd_entries();
        let gd = read_u32s(&file, header.gd_offset * SECTOR, entries)?;
        let rgd = if header.redundant_gd() {
            read_u32s(&file, header.rgd_offset * SECTOR, entries)?
        } else {
            Vec::new()
        };
        let next_free = file_len.div_ceil(SECTOR) * SECTOR;
        Ok(SparseExtent {
            file,
            header,
            writable,
            meta: Mutex::new(Meta {
                gd,
                rgd,
                gd_dirty: false,
                tables: HashMap::new(),
                next_free,
            }),
        })
    }

    /// The grain directory and tables; a poisoned lock fails the image (see `crate::sync`).
    fn meta(&self) -> Result<MutexGuard<'_, Meta>> {
        crate::sync::lock_meta(&self.meta, format_args!("vmdk extent {}", self.file.name()))
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::corrupt(self.file.name(), detail)
    }

    /// The extent's header (with the footer's grain directory offset for streams).
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The extent file.
    pub fn file(&self) -> &SharedFile {
        &self.file
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    /// Grain size in bytes.
    pub fn grain(&self) -> u64 {
        self.header.grain_bytes()
    }

    fn split(&self, grain_index: u64) -> (u32, usize) {
        let per = self.header.gtes_per_gt as u64;
        ((grain_index / per) as u32, (grain_index % per) as usize)
    }

    /// Loads grain table `gt` into the cache (if the directory has one) and returns it.
    fn table<'m>(&self, meta: &'m mut Meta, gt: u32) -> Result<Option<&'m mut Table>> {
        let sector = match meta.gd.get(gt as usize) {
            Some(&s) => s,
            None => return Err(self.corrupt(format!("grain table {gt} is outside the directory"))),
        };
        if sector == 0 && !meta.tables.contains_key(&gt) {
            return Ok(None);
        }
        if !meta.tables.contains_key(&gt) {
            let offset = sector as u64 * SECTOR;
            if offset + self.header.gt_bytes() > self.file.len() {
                return Err(self.corrupt(format!(
                    "grain table {gt} at sector {sector} lies beyond the end of the file"
                )));
            }
            let entries = read_u32s(&self.file, offset, self.header.gtes_per_gt as u64)?;
            if meta.tables.len() >= GT_CACHE_TABLES {
                self.evict(meta)?;
            }
            meta.tables.insert(
                gt,
                Table {
                    entries: entries.into_boxed_slice(),
                    dirty: false,
                },
            );
        }
        Ok(meta.tables.get_mut(&gt))
    }

    fn evict(&self, meta: &mut Meta) -> Result<()> {
        if let Some(&clean) = meta.tables.iter().find(|(_, t)| !t.dirty).map(|(k, _)| k) {
            meta.tables.remove(&clean);
            return Ok(());
        }
        self.write_back_locked(meta)?;
        meta.tables.clear();
        Ok(())
    }

    fn decode(&self, entry: u32, grain_index: u64) -> Result<GrainMap> {
        match entry {
            0 => Ok(GrainMap::Unallocated),
            1 if self.header.zeroed_grain() => Ok(GrainMap::Zero),
            s => {
                let offset = s as u64 * SECTOR;
                if s as u64 >= self.header.overhead.max(1) {
                    if offset >= self.file.len() {
                        return Err(self.corrupt(format!(
                            "grain {grain_index} at sector {s} lies beyond the end of the file"
                        )));
                    }
                    Ok(if self.header.compressed() {
                        GrainMap::Compressed(offset)
                    } else {
                        GrainMap::Data(offset)
                    })
                } else {
                    Err(self.corrupt(format!(
                        "grain {grain_index} at sector {s} overlaps the extent's metadata"
                    )))
                }
            }
        }
    }

    /// Where grain `grain_index` is.
    pub fn lookup(&self, grain_index: u64) -> Result<GrainMap> {
        let (gt, i) = self.split(grain_index);
        let mut meta = self.meta()?;
        let entry = match self.table(&mut meta, gt)? {
            Some(t) => t.entries[i],
            None => 0,
        };
        drop(meta);
        self.decode(entry, grain_index)
    }

    /// Returns the grain's data offset, allocating a fresh (all-zero) grain at the end of the
    /// file unless it is already allocated. `Ok((offset, true))` means a fresh grain.
    pub fn allocate(&self, grain_index: u64) -> Result<(u64, bool)> {
        self.check_writable()?;
        let (gt, i) = self.split(grain_index);
        let mut meta = self.meta()?;
        let entry = match self.table(&mut meta, gt)? {
            Some(t) => t.entries[i],
            None => {
                self.add_table(&mut meta, gt)?;
                0
            }
        };
        if let GrainMap::Data(off) = self.decode(entry, grain_index)? {
            return Ok((off, false));
        }
        let offset = self.reserve(&mut meta, self.grain())?;
        let sector = self.sector_of(offset)?;
        self.set_entry(&mut meta, gt, i, sector)?;
        Ok((offset, true))
    }

    fn sector_of(&self, offset: u64) -> Result<u32> {
        u32::try_from(offset / SECTOR).map_err(|_| {
            StorageError::OutOfSpace(format!(
                "{} has reached the 2 TiB limit of a sparse extent",
                self.file.name()
            ))
        })
    }

    fn set_entry(&self, meta: &mut Meta, gt: u32, i: usize, value: u32) -> Result<()> {
        let table = meta
            .tables
            .get_mut(&gt)
            .ok_or_else(|| self.corrupt("grain table vanished from the cache".into()))?;
        if table.entries[i] != value {
            table.entries[i] = value;
            table.dirty = true;
        }
        Ok(())
    }

    /// Sets a grain's entry to unallocated (0) or zeroed (1); returns the data offset it had.
    pub fn deallocate(&self, grain_index: u64, zeroed: bool) -> Result<Option<u64>> {
        self.check_writable()?;
        let (gt, i) = self.split(grain_index);
        let mut meta = self.meta()?;
        let new = u32::from(zeroed && self.header.zeroed_grain());
        if self.table(&mut meta, gt)?.is_none() {
            if new == 0 {
                return Ok(None);
            }
            self.add_table(&mut meta, gt)?;
        }
        self.deallocate_in(&mut meta, gt, i, new, grain_index)
    }

    fn deallocate_in(
        &self,
        meta: &mut Meta,
        gt: u32,
        i: usize,
        new: u32,
        grain_index: u64,
    ) -> Result<Option<u64>> {
        let old = meta
            .tables
            .get(&gt)
            .ok_or_else(|| self.corrupt("grain table vanished from the cache".into()))?
            .entries[i];
        self.set_entry(meta, gt, i, new)?;
        Ok(match self.decode(old, grain_index)? {
            GrainMap::Data(off) => Some(off),
            _ => None,
        })
    }

    /// Reserves a fresh grain at the end of the file without mapping it: copy-on-write fills
    /// it with the parent's data first, then [`SparseExtent::publish`]es it.
    pub fn reserve_grain(&self) -> Result<u64> {
        self.check_writable()?;
        let mut meta = self.meta()?;
        self.reserve(&mut meta, self.grain())
    }

    /// Maps grain `grain_index` to the grain at `offset` (whose data is written).
    pub fn publish(&self, grain_index: u64, offset: u64) -> Result<()> {
        self.check_writable()?;
        let (gt, i) = self.split(grain_index);
        let mut meta = self.meta()?;
        if self.table(&mut meta, gt)?.is_none() {
            self.add_table(&mut meta, gt)?;
        }
        let sector = self.sector_of(offset)?;
        self.set_entry(&mut meta, gt, i, sector)
    }

    /// Whether a zeroed grain can be recorded without data (the zeroed-grain flag).
    pub fn has_zeroed_grains(&self) -> bool {
        self.header.zeroed_grain()
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(StorageError::ReadOnly(self.file.name().to_string()))
        }
    }

    /// Appends `bytes` (rounded up to sectors) at the end of the file and extends the file.
    fn reserve(&self, meta: &mut Meta, bytes: u64) -> Result<u64> {
        let at = meta.next_free;
        let end = at + bytes.div_ceil(SECTOR) * SECTOR;
        if end > self.file.len() {
            self.file.set_len(end)?;
        }
        meta.next_free = end;
        Ok(at)
    }

    /// Adds a zeroed grain table (and its redundant copy) for directory entry `gt`.
    fn add_table(&self, meta: &mut Meta, gt: u32) -> Result<()> {
        let bytes = self.header.gt_sectors() * SECTOR;
        let at = self.reserve(meta, bytes)?;
        meta.gd[gt as usize] = self.sector_of(at)?;
        if self.header.redundant_gd() {
            let rat = self.reserve(meta, bytes)?;
            meta.rgd[gt as usize] = self.sector_of(rat)?;
        }
        meta.gd_dirty = true;
        if meta.tables.len() >= GT_CACHE_TABLES {
            self.evict(meta)?;
        }
        meta.tables.insert(
            gt,
            Table {
                entries: vec![0u32; self.header.gtes_per_gt as usize].into_boxed_slice(),
                dirty: true,
            },
        );
        Ok(())
    }

    /// The grain directory and its redundant copy (empty without one), as stored.
    pub(crate) fn directories(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let meta = self.meta()?;
        Ok((meta.gd.clone(), meta.rgd.clone()))
    }

    /// For `check -r all`: writes `entries` over the grain table at byte `offset`, synced.
    pub(crate) fn repair_table_in_place(&self, offset: u64, entries: &[u32]) -> Result<()> {
        self.check_writable()?;
        let pad = self.header.gt_sectors() * SECTOR;
        self.file
            .write_all_at(offset, &u32s_to_bytes(entries, pad))?;
        self.file.sync_data()?;
        self.meta()?.tables.clear();
        Ok(())
    }

    /// For `check -r all`: writes `entries` as a new grain table at the end of the file, then
    /// points entry `i` of the primary (or the redundant) directory at it, each step synced.
    pub(crate) fn repair_table_appended(
        &self,
        redundant: bool,
        i: usize,
        entries: &[u32],
    ) -> Result<()> {
        self.check_writable()?;
        let mut meta = self.meta()?;
        if i >= meta.gd.len() || (redundant && i >= meta.rgd.len()) {
            return Err(self.corrupt(format!("grain directory entry {i} does not exist")));
        }
        let pad = self.header.gt_sectors() * SECTOR;
        let at = self.reserve(&mut meta, pad)?;
        let sector = self.sector_of(at)?;
        self.file.write_all_at(at, &u32s_to_bytes(entries, pad))?;
        self.file.sync_data()?;
        let dir = if redundant {
            self.header.rgd_offset
        } else {
            self.header.gd_offset
        };
        self.file
            .write_all_at(dir * SECTOR + 4 * i as u64, &sector.to_le_bytes())?;
        self.file.sync_data()?;
        if redundant {
            meta.rgd[i] = sector;
        } else {
            meta.gd[i] = sector;
        }
        meta.tables.clear();
        Ok(())
    }

    /// Makes every completed write and the tables that map it durable. See the module
    /// documentation for the order.
    pub fn write_back(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut meta = self.meta()?;
        self.write_back_locked(&mut meta)
    }

    fn write_back_locked(&self, meta: &mut Meta) -> Result<()> {
        self.file.sync_data()?;
        let dirty: Vec<u32> = meta
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&k, _)| k)
            .collect();
        if dirty.is_empty() && !meta.gd_dirty {
            return Ok(());
        }
        let gt_pad = self.header.gt_sectors() * SECTOR;
        let write_tables = |dir: &[u32]| -> Result<()> {
            for gt in &dirty {
                let t = &meta.tables[gt];
                let at = dir[*gt as usize] as u64 * SECTOR;
                self.file
                    .write_all_at(at, &u32s_to_bytes(&t.entries, gt_pad))?;
            }
            Ok(())
        };
        let gd_pad = self.header.gd_bytes().div_ceil(SECTOR) * SECTOR;
        write_tables(&meta.gd)?;
        self.file.sync_data()?;
        if meta.gd_dirty {
            self.file.write_all_at(
                self.header.gd_offset * SECTOR,
                &u32s_to_bytes(&meta.gd, gd_pad),
            )?;
            self.file.sync_data()?;
        }
        if self.header.redundant_gd() {
            write_tables(&meta.rgd)?;
            self.file.sync_data()?;
            if meta.gd_dirty {
                self.file.write_all_at(
                    self.header.rgd_offset * SECTOR,
                    &u32s_to_bytes(&meta.rgd, gd_pad),
                )?;
                self.file.sync_data()?;
            }
        }
        meta.gd_dirty = false;
        for gt in dirty {
            if let Some(t) = meta.tables.get_mut(&gt) {
                t.dirty = false;
            }
        }
        Ok(())
    }

    /// Every grain table sector in the primary directory, for checks and `info`.
    pub fn allocated_tables(&self) -> usize {
        crate::sync::lock(&self.meta)
            .gd
            .iter()
            .filter(|&&s| s != 0)
            .count()
    }
}

/// Reads the footer of a stream whose header says the directory is at the end: the last three
/// sectors are a footer marker, the footer (a header copy) and an end-of-stream marker.
fn read_footer(file: &SharedFile, header: &SparseHeader, name: &str) -> Result<SparseHeader> {
    let bad = |d: &str| StorageError::corrupt(name, d.to_string());
    if !header.has_markers() {
        return Err(bad(
            "grain directory is deferred to a footer but the extent has no markers",
        ));
    }
    let len = file.len();
    if len < 4 * SECTOR || len % SECTOR != 0 {
        return Err(bad(
            "stream is too short or not sector-aligned to hold a footer",
        ));
    }
    let mut tail = vec![0u8; 3 * SECTOR as usize];
    file.read_exact_at(len - 3 * SECTOR, &mut tail)?;
    let (marker, rest) = tail.split_at(SECTOR as usize);
    let (footer, eos) = rest.split_at(SECTOR as usize);
    if parse_marker(marker).map(|(_, t)| t) != Some(MARKER_FOOTER)
        || parse_marker(eos) != Some((0, MARKER_EOS))
        || &footer[0..4] != MAGIC
    {
        return Err(bad(
            "streamOptimized footer or end-of-stream marker is missing (an incomplete stream?)",
        ));
    }
    let f = SparseHeader::parse(footer, name)?;
    if f.gd_offset == GD_AT_END {
        return Err(bad("the footer does not give the grain directory's offset"));
    }
    if f.capacity != header.capacity || f.grain_sectors != header.grain_sectors {
        return Err(bad(
            "the footer disagrees with the header on capacity or grain size",
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::vmdk::create::{sparse_extent_bytes, SparseLayout};
    use crate::io::memory::MemoryDevice;
    use crate::HostFile;
    use std::sync::Arc;

    fn extent(size: u64) -> (Arc<MemoryDevice>, SparseExtent) {
        let layout = SparseLayout::new(size, false, false, None);
        let bytes = sparse_extent_bytes(&layout, None);
        let dev = MemoryDevice::new(0);
        dev.write_all_at(0, &bytes).unwrap();
        let ext = SparseExtent::open(dev.clone(), true).unwrap();
        (dev, ext)
    }

    #[test]
    fn allocation_appends_and_survives_reopen_after_write_back() {
        let (dev, ext) = extent(64 << 20);
        assert_eq!(ext.lookup(5).unwrap(), GrainMap::Unallocated);
        let end = dev.len();
        let (off, fresh) = ext.allocate(5).unwrap();
        assert!(fresh);
        assert_eq!(off, end);
        assert_eq!(ext.allocate(5).unwrap(), (off, false));
        ext.write_back().unwrap();
        let again = SparseExtent::open(dev.clone(), false).unwrap();
        assert_eq!(again.lookup(5).unwrap(), GrainMap::Data(off));
        assert_eq!(again.lookup(6).unwrap(), GrainMap::Unallocated);
    }

    #[test]
    fn entries_pointing_into_metadata_or_past_the_end_are_corrupt() {
        let (dev, ext) = extent(64 << 20);
        let gd0 = {
            let m = ext.meta().unwrap();
            m.gd[0] as u64
        };
        dev.write_all_at(gd0 * SECTOR, &3u32.to_le_bytes()).unwrap();
        dev.write_all_at(gd0 * SECTOR + 4, &u32::MAX.to_le_bytes())
            .unwrap();
        let ext = SparseExtent::open(dev, false).unwrap();
        assert!(ext.lookup(0).unwrap_err().to_string().contains("metadata"));
        assert!(ext
            .lookup(1)
            .unwrap_err()
            .to_string()
            .contains("beyond the end"));
    }
}
